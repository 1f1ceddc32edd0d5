//! Reading and merge-patching the annotations of the leader Lease (the replicas' configuration
//! digests). The lease manager writes the Lease's `spec`; these writes never touch it.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::Value;

use super::{Error, Result};

/// The annotations of one Lease.
#[derive(Clone)]
pub struct LeaseAnnotations {
    leases: Api<Lease>,
    name: String,
}

impl LeaseAnnotations {
    /// The Lease `name` in `namespace`, through `client`.
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        Self {
            leases: Api::namespaced(client, namespace),
            name: name.to_string(),
        }
    }

    /// The Lease's annotations, `None` when there is no Lease yet.
    pub async fn get(&self) -> Result<Option<BTreeMap<String, String>>> {
        let lease = self
            .leases
            .get_opt(&self.name)
            .await
            .map_err(|source| self.error("read Lease", source))?;
        Ok(lease.map(|l| l.metadata.annotations.unwrap_or_default()))
    }

    /// Applies `patch` (a JSON merge patch of `metadata.annotations`) to the Lease.
    pub async fn merge(&self, patch: &Value) -> Result<()> {
        self.leases
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(|source| self.error("annotate Lease", source))?;
        Ok(())
    }

    fn error(&self, action: &'static str, source: kube::Error) -> Error {
        Error::Kube {
            action,
            object: format!("{}/{}", self.leases.namespace().unwrap_or_default(), self.name),
            source,
        }
    }
}
