//! Writing the objects lazyload creates whole: auto fences, and the fallback path's
//! EnvoyFilters, global-sidecar DestinationRules and Service ports.

use k8s_openapi::api::core::v1::Service;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::Value;

use super::{Error, FIELD_MANAGER, Result, Write, apply, outcome, patch, with_retries};
use crate::vocab::GLOBAL_SIDECAR;
use crate::vocab::ObjectKey;
use crate::vocab::fence::ServiceFence;
use crate::vocab::istio::{DestinationRule, EnvoyFilter, IstioKind, IstioVersion};

/// Creates and deletes auto fences.
#[derive(Clone)]
pub struct AutoFenceWriter {
    client: Client,
}

impl AutoFenceWriter {
    /// A writer using `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    fn api(&self, namespace: &str) -> Api<ServiceFence> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Creates `fence` at `key`; one that exists already (409) is [`Write::Unchanged`].
    pub async fn create(&self, key: &ObjectKey, fence: &ServiceFence) -> Result<Write> {
        // Named, or the API server records the fields as managed by `unknown`.
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let api = self.api(&key.namespace);
        let created = with_retries(|| api.create(&pp, fence)).await;
        outcome(created, Write::Written, 409, "create auto ServiceFence", || {
            key.to_string()
        })
    }

    /// Deletes the fence `key`; one already gone (404) is [`Write::Unchanged`].
    pub async fn delete(&self, key: &ObjectKey) -> Result<Write> {
        let (api, params) = (self.api(&key.namespace), DeleteParams::default());
        let deleted = with_retries(|| api.delete(&key.name, &params)).await;
        outcome(deleted, Write::Deleted, 404, "delete auto ServiceFence", || {
            key.to_string()
        })
    }
}

/// Reads and writes the fallback path's objects.
#[derive(Clone)]
pub struct FallbackWriter {
    client: Client,
}

impl FallbackWriter {
    /// A writer using `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    fn envoyfilters(&self, namespace: &str) -> Api<EnvoyFilter> {
        Api::namespaced_with(
            self.client.clone(),
            namespace,
            &IstioVersion::V1alpha3.resource(IstioKind::EnvoyFilter),
        )
    }

    /// The EnvoyFilter `namespace/name`, if there is one.
    pub async fn envoyfilter(&self, namespace: &str, name: &str) -> Result<Option<EnvoyFilter>> {
        self.envoyfilters(namespace)
            .get_opt(name)
            .await
            .map_err(|source| Error::Kube {
                action: "read EnvoyFilter",
                object: format!("{namespace}/{name}"),
                source,
            })
    }

    /// Applies the EnvoyFilters, then the DestinationRules, then the global-sidecar Services
    /// (as applied: name, namespace and ports only).
    pub async fn apply(
        &self,
        envoyfilters: &[EnvoyFilter],
        destination_rules: &[DestinationRule],
        services: &[Value],
    ) -> Result<()> {
        for ef in envoyfilters {
            let api = self.envoyfilters(ef.metadata.namespace.as_deref().unwrap_or_default());
            apply(&api, ef, "apply EnvoyFilter").await?;
        }
        for dr in destination_rules {
            let api: Api<DestinationRule> = Api::namespaced_with(
                self.client.clone(),
                dr.metadata.namespace.as_deref().unwrap_or_default(),
                &IstioVersion::V1beta1.resource(IstioKind::DestinationRule),
            );
            apply(&api, dr, "apply global-sidecar DestinationRule").await?;
        }
        let params = PatchParams::apply(FIELD_MANAGER).force();
        for value in services {
            let ns = value["metadata"]["namespace"].as_str().unwrap_or_default();
            let api: Api<Service> = Api::namespaced(self.client.clone(), ns);
            let object = format!("{ns}/{GLOBAL_SIDECAR}");
            let action = "apply global-sidecar Service ports";
            patch(
                &api,
                GLOBAL_SIDECAR,
                &params,
                &Patch::Apply(value),
                action,
                object,
            )
            .await?;
        }
        Ok(())
    }
}
