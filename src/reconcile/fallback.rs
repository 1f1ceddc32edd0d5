//! The fallback controller: keeps the `to-global-sidecar` EnvoyFilter(s), with `supportH2` the
//! global-sidecar DestinationRule(s), and, with `autoPort`, the global-sidecar Service's ports in
//! line with the wormhole ports
//! ([`crate::model::fallback`]).
//!
//! The computed port set is written into an annotation of the EnvoyFilter and read back when a
//! replica starts leading, so ports that only grow keep growing across restarts. Writes are
//! server-side applies (field manager `lazyload`), issued only when the port set changed. The
//! controller has one key ([`WORMHOLE_PORTS`]); a Service, routing change or re-list triggers it
//! after a one-second debounce.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServiceSpec};

use super::Result;
use super::runner::{Action, Reconciler, Singleton, Trigger};
use crate::cluster::writer::FallbackWriter;
use crate::cluster::{Change, ClusterState};
use crate::config::{Config, GlobalSidecarMode};
use crate::model::fallback::{
    envoyfilter_name, envoyfilters, global_sidecar_destination_rules, global_sidecar_service_ports,
    wormhole_ports,
};
use crate::model::scope::global_sidecar_namespaces;
use crate::vocab::GLOBAL_SIDECAR;
use crate::vocab::istio::{DestinationRule, EnvoyFilter};

/// Annotation holding the wormhole ports the EnvoyFilter covers (`80,9080`).
pub const PORTS_ANNOTATION: &str = "lazyload.io/wormhole-ports";
/// How long after a Service or ServiceEntry change the ports are recomputed.
const DEBOUNCE: Duration = Duration::from_secs(1);

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

/// The fallback controller's one key: the wormhole port set and what follows from it.
pub const WORMHOLE_PORTS: Singleton = Singleton("wormhole ports");

/// The fallback controller.
pub struct FallbackController {
    state: ClusterState,
    config: Arc<Config>,
    writer: FallbackWriter,
    ports: Option<BTreeSet<u16>>,
}

impl FallbackController {
    /// A controller writing through `writer`.
    pub fn new(state: ClusterState, config: Arc<Config>, writer: FallbackWriter) -> Self {
        Self {
            state,
            config,
            writer,
            ports: None,
        }
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
        let ef = self
            .writer
            .envoyfilter(&ns, &envoyfilter_name(&self.config))
            .await?;
        Ok(ef
            .and_then(|ef| ef.metadata.annotations)
            .and_then(|a| a.get(PORTS_ANNOTATION).cloned())
            .map(|v| v.split(',').filter_map(|p| p.trim().parse().ok()).collect())
            .unwrap_or_default())
    }

    /// Recomputes the ports and writes what changed. Returns whether anything was written.
    /// Only called once every kind is listed (the [`Runner`](super::runner::Runner) sees to it):
    /// with `cleanupWormholePort` the ports of Services not listed yet would be removed.
    pub async fn sync(&mut self) -> Result<bool> {
        let previous = match &self.ports {
            Some(p) => p.clone(),
            None => self.recorded_ports().await?,
        };
        let ports = wormhole_ports(&self.config, &self.state.index(), &previous);
        if self.ports.as_ref() == Some(&ports) {
            return Ok(false);
        }
        let desired = desired(&self.config, &ports);
        self.writer
            .apply(
                &desired.envoyfilters,
                &desired.destination_rules,
                &desired.services,
            )
            .await?;
        tracing::info!(ports = %ports_annotation(&ports), "wormhole ports applied");
        self.ports = Some(ports);
        Ok(true)
    }
}

impl Reconciler for FallbackController {
    type Key = Singleton;
    const NAME: &'static str = "fallback";

    fn all_keys(&self) -> Vec<Singleton> {
        vec![WORMHOLE_PORTS]
    }

    fn triggers(&self, change: &Change) -> Trigger<Singleton> {
        match change {
            Change::Service(_) | Change::Routing | Change::Resync => {
                Trigger::Keys(vec![WORMHOLE_PORTS], DEBOUNCE)
            }
            Change::Namespace(_) | Change::Pods | Change::Fence(_) | Change::Sidecar(_) => Trigger::Nothing,
        }
    }

    /// A new leader reads the recorded ports again.
    fn started_leading(&mut self) {
        self.ports = None;
    }

    async fn reconcile(&mut self, _: &Singleton) -> Result<Action> {
        self.sync().await?;
        Ok(Action::done())
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, Request, Response};
    use kube::Client;
    use kube::client::Body;
    use serde_json::{Value, json};

    use crate::testing::{json_body, json_response};
    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;
    use tower_test::mock;

    use super::*;
    use crate::index::convert::Kind;
    use crate::index::{ClusterIndex, ServiceInfo, ServicePort};
    use crate::reconcile::runner::{self, Gate, Runner};
    use crate::vocab::ObjectKey;

    /// Under the runner, nothing is read or written before every kind synced; the resync at
    /// the end of the sync writes.
    #[tokio::test(start_paused = true)]
    async fn nothing_is_written_before_every_kind_synced() {
        let cfg = Config::parse("general:\n  autoPort: true\n  cleanupWormholePort: true\n")
            .unwrap()
            .config;
        let state = ClusterState::new(ClusterIndex::new("cluster.local"), []);
        state.await_sync([Kind::Service]);
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let writer = FallbackWriter::new(Client::new(service, "default"));
        let ctl = FallbackController::new(state.clone(), Arc::new(cfg), writer);
        let (_lead, leader) = watch::channel(true);
        let stop = CancellationToken::new();
        let metrics = runner::Metrics::default();
        tokio::spawn(Runner::new(ctl, state.clone(), Gate::Leader(leader), &metrics).run(stop.clone()));
        state.changed(Change::Service(ObjectKey::new("default", "web")));
        let early = tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await;
        assert!(early.is_err(), "wrote from an unsynced kind");
        // The last kind to sync announces a resync.
        state.mark_synced(Kind::Service);
        let (req, _) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
            .await
            .expect("a request once synced")
            .unwrap();
        assert_eq!(req.method(), Method::GET, "the recorded ports are read first");
        stop.cancel();
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
        let writer = FallbackWriter::new(Client::new(service, "default"));
        let mut ctl = FallbackController::new(state, Arc::new(cfg), writer);
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..4 {
                let (req, send) = handle.next_request().await.unwrap();
                let (method, path) = (req.method().clone(), req.uri().path().to_string());
                let body: Value = json_body(req).await;
                let reply = if method == Method::GET {
                    // A previous leader recorded port 7000.
                    json!({"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
                           "metadata": {"name": "to-global-sidecar", "namespace": "istio-system",
                                        "annotations": {"lazyload.io/wormhole-ports": "7000"}}, "spec": {}})
                } else {
                    body.clone()
                };
                seen.push((method, path, body));
                send.send_response(json_response(200, &reply));
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
