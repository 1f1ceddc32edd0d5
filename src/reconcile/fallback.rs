//! The fallback controller: keeps the `to-global-sidecar` EnvoyFilter(s), with `supportH2` the
//! global-sidecar DestinationRule(s), and, with `autoPort`, the global-sidecar Service's ports in
//! line with the wormhole ports
//! ([`crate::model::fallback`]).
//!
//! The computed port set is written into an annotation of the EnvoyFilter and read back when a
//! replica starts leading, so ports that only grow keep growing across restarts. Writes are
//! server-side applies (field manager `lazyload`), issued only when the port set changed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::{Error, FIELD_MANAGER, Result, with_retries};
use crate::cluster::{Change, ClusterState};
use crate::config::{Config, GlobalSidecarMode};
use crate::model::fallback::{
    envoyfilter_name, envoyfilters, global_sidecar_destination_rules, global_sidecar_service_ports,
    wormhole_ports,
};
use crate::model::scope::global_sidecar_namespaces;
use crate::vocab::GLOBAL_SIDECAR;
use crate::vocab::istio::{DestinationRule, EnvoyFilter, IstioKind, IstioVersion};

/// Annotation holding the wormhole ports the EnvoyFilter covers (`80,9080`).
pub const PORTS_ANNOTATION: &str = "lazyload.io/wormhole-ports";
/// How long after a Service or ServiceEntry change the ports are recomputed.
const DEBOUNCE: Duration = Duration::from_secs(1);

/// Server-side applies `object` (an Istio object of `api`'s kind) with retries.
async fn apply<K>(api: &Api<K>, object: &K, action: &'static str) -> Result<()>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let meta = object.meta();
    let (ns, name) = (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    );
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let patch = Patch::Apply(object);
    with_retries(|| api.patch(&name, &params, &patch))
        .await
        .map_err(|source| Error::Kube {
            action,
            object: format!("{ns}/{name}"),
            source,
        })?;
    Ok(())
}

/// What the fallback controller applies for a set of wormhole ports (and `generate` writes).
#[derive(Clone, Debug)]
pub struct Desired {
    /// The `to-global-sidecar` EnvoyFilter(s), the ports recorded in [`PORTS_ANNOTATION`].
    pub envoyfilters: Vec<EnvoyFilter>,
    /// With `supportH2`: the global-sidecar DestinationRule(s) (`useClientProtocol`).
    pub destination_rules: Vec<DestinationRule>,
    /// With `autoPort`: the global-sidecar Service(s) as applied (name, namespace and ports
    /// only: server-side apply leaves the rest of the Service to its other owners).
    pub services: Vec<serde_json::Value>,
}

/// The ports as the annotation writes them (`80,9080`).
fn ports_annotation(ports: &BTreeSet<u16>) -> String {
    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

/// The objects the controller applies for `ports`.
pub fn desired(cfg: &Config, ports: &BTreeSet<u16>) -> Desired {
    let annotation = ports_annotation(ports);
    let envoyfilters = envoyfilters(cfg, ports)
        .into_iter()
        .map(|mut ef| {
            ef.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(PORTS_ANNOTATION.into(), annotation.clone());
            ef
        })
        .collect();
    let services = if cfg.general.auto_port {
        global_sidecar_namespaces(cfg)
            .into_iter()
            .map(|ns| {
                let svc = Service {
                    metadata: kube::core::ObjectMeta {
                        name: Some(GLOBAL_SIDECAR.into()),
                        namespace: Some(ns),
                        ..Default::default()
                    },
                    spec: Some(ServiceSpec {
                        ports: Some(global_sidecar_service_ports(ports)),
                        ..Default::default()
                    }),
                    status: None,
                };
                // Serialising a Service cannot fail (no maps with non-string keys).
                let mut value = serde_json::to_value(&svc).unwrap_or_default();
                value["apiVersion"] = "v1".into();
                value["kind"] = "Service".into();
                value
            })
            .collect()
    } else {
        Vec::new()
    };
    Desired {
        envoyfilters,
        destination_rules: global_sidecar_destination_rules(cfg),
        services,
    }
}

/// The fallback controller.
pub struct FallbackController {
    state: ClusterState,
    config: Arc<Config>,
    client: Client,
    ports: Option<BTreeSet<u16>>,
}

impl FallbackController {
    /// A controller writing through `client`.
    pub fn new(state: ClusterState, config: Arc<Config>, client: Client) -> Self {
        Self {
            state,
            config,
            client,
            ports: None,
        }
    }

    fn envoyfilters_api(&self, namespace: &str) -> Api<EnvoyFilter> {
        Api::namespaced_with(
            self.client.clone(),
            namespace,
            &IstioVersion::V1alpha3.resource(IstioKind::EnvoyFilter),
        )
    }

    /// The ports recorded by the previous leader (empty when there is no EnvoyFilter yet). A
    /// failed read is an error: computing without them could shrink the set.
    async fn recorded_ports(&self) -> Result<BTreeSet<u16>> {
        let ns = match self.config.general.global_sidecar_mode {
            GlobalSidecarMode::Cluster => self.config.global.istio_namespace.clone(),
            GlobalSidecarMode::Namespace => match self.config.general.namespace.first() {
                Some(ns) => ns.clone(),
                None => return Ok(BTreeSet::new()),
            },
        };
        let name = envoyfilter_name(&self.config);
        let ef = self
            .envoyfilters_api(&ns)
            .get_opt(&name)
            .await
            .map_err(|source| Error::Kube {
                action: "read EnvoyFilter",
                object: format!("{ns}/{name}"),
                source,
            })?;
        Ok(ef
            .and_then(|ef| ef.metadata.annotations)
            .and_then(|a| a.get(PORTS_ANNOTATION).cloned())
            .map(|v| v.split(',').filter_map(|p| p.trim().parse().ok()).collect())
            .unwrap_or_default())
    }

    /// Recomputes the ports and writes what changed. Returns whether anything was written.
    /// Nothing is computed before every kind is listed (with `cleanupWormholePort` the ports of
    /// Services not listed yet would be removed); the resync at the end of the sync comes back.
    pub async fn sync(&mut self) -> Result<bool> {
        if !self.state.unsynced().is_empty() {
            return Ok(false);
        }
        let previous = match &self.ports {
            Some(p) => p.clone(),
            None => self.recorded_ports().await?,
        };
        let ports = wormhole_ports(&self.config, &self.state.index(), &previous);
        if self.ports.as_ref() == Some(&ports) {
            return Ok(false);
        }
        let annotation = ports_annotation(&ports);
        let desired = desired(&self.config, &ports);
        for ef in &desired.envoyfilters {
            let api = self.envoyfilters_api(ef.metadata.namespace.as_deref().unwrap_or_default());
            apply(&api, ef, "apply EnvoyFilter").await?;
        }
        for dr in &desired.destination_rules {
            let api: Api<DestinationRule> = Api::namespaced_with(
                self.client.clone(),
                dr.metadata.namespace.as_deref().unwrap_or_default(),
                &IstioVersion::V1beta1.resource(IstioKind::DestinationRule),
            );
            apply(&api, dr, "apply global-sidecar DestinationRule").await?;
        }
        self.apply_service_ports(&desired.services).await?;
        tracing::info!(ports = %annotation, "wormhole ports applied");
        self.ports = Some(ports);
        Ok(true)
    }

    /// Applies the global-sidecar Service ports of [`desired`].
    async fn apply_service_ports(&self, services: &[serde_json::Value]) -> Result<()> {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        for value in services {
            let ns = value["metadata"]["namespace"].as_str().unwrap_or_default();
            let api: Api<Service> = Api::namespaced(self.client.clone(), ns);
            let patch = Patch::Apply(value);
            with_retries(|| api.patch(GLOBAL_SIDECAR, &params, &patch))
                .await
                .map_err(|source| Error::Kube {
                    action: "apply global-sidecar Service ports",
                    object: format!("{ns}/{GLOBAL_SIDECAR}"),
                    source,
                })?;
        }
        Ok(())
    }

    /// Runs until `shutdown`, writing only while `leader` is true.
    pub async fn run(mut self, mut leader: watch::Receiver<bool>, shutdown: CancellationToken) {
        let mut changes = self.state.subscribe();
        let mut due = (*leader.borrow()).then(tokio::time::Instant::now);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = leader.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if *leader.borrow() {
                        // A new leader reads the recorded ports again.
                        self.ports = None;
                        due = Some(tokio::time::Instant::now());
                    }
                }
                change = changes.recv() => match change {
                    Ok(Change::Service(_) | Change::Routing | Change::Resync)
                    | Err(broadcast::error::RecvError::Lagged(_)) => {
                        due = due.or(Some(tokio::time::Instant::now() + DEBOUNCE));
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                () = async { tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)).await },
                    if due.is_some() && *leader.borrow() => {
                    due = None;
                    if let Err(e) = self.sync().await {
                        tracing::warn!("writing the fallback EnvoyFilter failed, retrying: {e}");
                        due = Some(tokio::time::Instant::now() + DEBOUNCE * 5);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock;

    use super::*;
    use crate::index::{ClusterIndex, ServiceInfo, ServicePort};
    use crate::vocab::ObjectKey;

    #[tokio::test]
    async fn nothing_is_written_before_every_kind_synced() {
        let cfg = Config::parse("general:\n  autoPort: true\n  cleanupWormholePort: true\n")
            .unwrap()
            .config;
        let state = ClusterState::new(ClusterIndex::new("cluster.local"), []);
        state.await_sync([crate::index::convert::Kind::Service]);
        // Nobody answers: a request would hang.
        let (service, _handle) = mock::pair::<Request<Body>, Response<Body>>();
        let mut ctl = FallbackController::new(state.clone(), Arc::new(cfg), Client::new(service, "default"));
        let synced = tokio::time::timeout(std::time::Duration::from_secs(2), ctl.sync()).await;
        assert!(matches!(synced, Ok(Ok(false))), "wrote from an unsynced kind");
    }

    #[tokio::test]
    async fn ports_from_services_are_applied_once_and_recorded() {
        let cfg = Config::parse("general:\n  autoPort: true\n  supportH2: true\n  wormholePort: ['9080']\n")
            .unwrap()
            .config;
        let mut index = ClusterIndex::new("cluster.local");
        index.apply_service(ServiceInfo {
            key: ObjectKey::new("default", "web"),
            labels: Default::default(),
            selector: None,
            ports: vec![ServicePort {
                name: "http-web".into(),
                port: 8080,
                protocol: "TCP".into(),
                app_protocol: None,
            }],
            cluster_ips: vec![],
        });
        let state = ClusterState::new(index, []);
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let mut ctl = FallbackController::new(state, Arc::new(cfg), Client::new(service, "default"));
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..4 {
                let (req, send) = handle.next_request().await.unwrap();
                let (method, path) = (req.method().clone(), req.uri().path().to_string());
                let body: Value = serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap())
                    .unwrap_or(Value::Null);
                let reply = if method == Method::GET {
                    // A previous leader recorded port 7000.
                    json!({"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
                           "metadata": {"name": "to-global-sidecar", "namespace": "istio-system",
                                        "annotations": {"lazyload.io/wormhole-ports": "7000"}}, "spec": {}})
                } else {
                    body.clone()
                };
                seen.push((method, path, body));
                send.send_response(
                    Response::builder()
                        .status(200)
                        .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                        .unwrap(),
                );
            }
            seen
        });
        assert!(ctl.sync().await.unwrap());
        let seen = server.await.unwrap();
        assert_eq!(seen[0].0, Method::GET);
        assert_eq!(seen[1].0, Method::PATCH);
        assert_eq!(
            seen[1].1,
            "/apis/networking.istio.io/v1alpha3/namespaces/istio-system/envoyfilters/to-global-sidecar"
        );
        assert_eq!(
            seen[1].2["metadata"]["annotations"][PORTS_ANNOTATION], "7000,8080,9080",
            "ports only grow"
        );
        let patched: Vec<&str> = seen[1].2["spec"]["configPatches"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["match"]["routeConfiguration"]["name"].as_str())
            .collect();
        assert!(patched.contains(&"7000") && patched.contains(&"8080") && patched.contains(&"9080"));
        // supportH2: the global-sidecar's DestinationRule keeps the callers' protocol.
        assert_eq!(
            (&seen[2].0, seen[2].1.as_str()),
            (
                &Method::PATCH,
                "/apis/networking.istio.io/v1beta1/namespaces/mesh-operator/destinationrules/global-sidecar"
            )
        );
        assert_eq!(
            seen[2].2["spec"]["trafficPolicy"]["connectionPool"]["http"]["useClientProtocol"],
            true
        );
        assert_eq!(
            seen[3].1,
            "/api/v1/namespaces/mesh-operator/services/global-sidecar"
        );
        assert_eq!(seen[3].2["spec"]["ports"].as_array().unwrap().len(), 3);
        // Nothing changed: nothing written.
        assert!(!ctl.sync().await.unwrap());
    }
}
