//! The xDS relay: an ADS server for the global-sidecar (SotW and Delta) that is also an ADS client
//! of istiod, one upstream stream per downstream stream (as istio-agent does), passing istiod's
//! config through with the loop-preventing adjustments of `docs/design.md` (A1-A11).
//!
//! - [`adjust`]: the adjustments, pure functions over decoded Listener/RouteConfiguration/Cluster.
//! - [`sotw`] and [`delta`]: per-stream protocol state machines (sans-IO): nonce translation,
//!   merge by name, ACK tracking; [`stream`] holds what they share.
//! - [`routes`]: the route adjustments done incrementally on encoded configurations.
//! - [`memo`]: whole SotW responses adjusted once per distinct content, for every stream.
//! - [`cache`]: the last config each node class ACKed, served when istiod is unreachable.
//! - [`request`] and [`response`]: SotW messages with only the fields the relay reads decoded.
//! - [`grpc`]: gRPC message framing over HTTP/2, both directions, without per-stream buffers.
//! - [`upstream`]: the connection to istiod (TLS, token and metadata forwarding, keepalive).
//! - [`server`]: the ADS service (on tonic's server) coupling the streams.

pub mod adjust;
pub mod cache;
pub mod delta;
pub mod grpc;
pub mod memo;
pub mod metrics;
pub mod request;
pub mod response;
pub mod routes;
pub mod server;
pub mod sotw;
pub mod stream;
pub mod upstream;

use std::collections::HashSet;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use regex::Regex;

/// Type URL of clusters (CDS).
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Type URL of endpoints (EDS).
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// Type URL of listeners (LDS).
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Type URL of route configurations (RDS).
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Type URL of secrets (SDS).
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Node metadata that marks a global-sidecar (Slime's convention).
pub const GLOBAL_SIDECAR_METADATA: (&str, &str) = ("SLIME_APP", "LAZYLOAD_GLOBAL_SIDECAR");

/// Whether a type's SotW responses carry the whole set (CDS, LDS) or only some names (EDS, RDS).
pub fn is_wildcard_type(type_url: &str) -> bool {
    type_url == CLUSTER || type_url == LISTENER
}

/// What the relay knows about the node on the other end of a stream.
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    /// Node id (`sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`).
    pub id: String,
    /// The node class: replicas of one workload share last-good config.
    pub class: String,
    /// Whether the adjustments apply.
    pub global_sidecar: bool,
    /// Extension type URLs the Envoy reported (`node.extensions`); empty when it reported none.
    pub supported_type_urls: HashSet<String>,
    /// A stock Envoy: it reported its extensions and none is Istio's, so Istio-only extensions
    /// must go (A9). Says nothing about where its secrets come from: see `secrets`.
    pub stock_envoy: bool,
    /// Where the node's TLS secrets come from (A9, A11).
    pub secrets: SecretSource,
}

/// Where a node's TLS secrets (`default`, `ROOTCA`) come from. A separate fact from which Envoy
/// build runs: pilot-agent can run a stock Envoy, and a plain bootstrap can run Istio's build.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SecretSource {
    /// pilot-agent serves them over SDS (the bootstrap cluster `sds-grpc`): istiod's references
    /// stay as they are.
    #[default]
    Agent,
    /// No SDS server: the bootstrap's static secrets of the same names (a plain bootstrap such as
    /// `envoy/global-sidecar-bootstrap.yaml`).
    Static,
}

/// Node metadata pilot-agent writes into every bootstrap it generates (its `ProxyConfig`); a
/// plain bootstrap has no reason to. Its presence means pilot-agent, and so `sds-grpc`, is there.
pub const AGENT_METADATA: &str = "PROXY_CONFIG";

impl NodeInfo {
    /// Classifies a node from the first request of a stream. `pattern` is the configured
    /// node-id pattern that also marks global-sidecars.
    pub fn from_node(node: Option<&Node>, pattern: Option<&Regex>) -> Self {
        let Some(node) = node else {
            return Self::default();
        };
        let meta = |key: &str| metadata_str(node.metadata.as_ref(), key);
        let marked = meta(GLOBAL_SIDECAR_METADATA.0).as_deref() == Some(GLOBAL_SIDECAR_METADATA.1);
        let global_sidecar = marked || pattern.is_some_and(|p| p.is_match(&node.id));
        let supported_type_urls = node
            .extensions
            .iter()
            .flat_map(|ext| ext.type_urls.iter().map(|u| format!("type.googleapis.com/{u}")))
            .collect();
        let stock_envoy =
            !node.extensions.is_empty() && !node.extensions.iter().any(|e| e.name.starts_with("istio."));
        let from_agent = node
            .metadata
            .as_ref()
            .is_some_and(|m| m.fields.contains_key(AGENT_METADATA));
        Self {
            class: node_class(&node.id, meta("NAMESPACE"), meta("WORKLOAD_NAME")),
            id: node.id.clone(),
            global_sidecar,
            supported_type_urls,
            stock_envoy,
            secrets: if from_agent {
                SecretSource::Agent
            } else {
                SecretSource::Static
            },
        }
    }

    /// Whether the Envoy can load an extension config of this type (true when it did not say).
    pub fn supports(&self, type_url: &str) -> bool {
        self.supported_type_urls.is_empty() || self.supported_type_urls.contains(type_url)
    }
}

/// The class of a node: its namespace and workload, so that replicas share a class. Istio node
/// ids are `type~ip~pod.ns~domain`; the pod name loses its ReplicaSet suffixes.
fn node_class(id: &str, namespace: Option<String>, workload: Option<String>) -> String {
    let parts: Vec<&str> = id.split('~').collect();
    let (pod, ns_from_id) = match parts.as_slice() {
        [_, _, pod_ns, _] => pod_ns.split_once('.').unwrap_or((pod_ns, "")),
        _ => (id, ""),
    };
    let namespace = namespace.unwrap_or_else(|| ns_from_id.to_string());
    let workload = workload.unwrap_or_else(|| {
        // `global-sidecar-7dd48b65c8-gc7g4` -> `global-sidecar`
        let mut segs: Vec<&str> = pod.split('-').collect();
        if segs.len() > 2 {
            segs.truncate(segs.len() - 2);
        }
        segs.join("-")
    });
    format!("{namespace}/{workload}")
}

/// A string value of `node.metadata`.
pub fn metadata_str(metadata: Option<&Struct>, key: &str) -> Option<String> {
    match metadata?.fields.get(key)? {
        Value {
            kind: Some(Kind::StringValue(s)),
        } => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Extension;

    fn node(id: &str, meta: &[(&str, &str)]) -> Node {
        Node {
            id: id.into(),
            metadata: Some(Struct {
                fields: meta
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            Value {
                                kind: Some(Kind::StringValue(v.to_string())),
                            },
                        )
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn classification() {
        let gs = node(
            "sidecar~10.0.0.5~global-sidecar-7dd48b65c8-gc7g4.mesh-operator~mesh-operator.svc.cluster.local",
            &[("SLIME_APP", "LAZYLOAD_GLOBAL_SIDECAR")],
        );
        let info = NodeInfo::from_node(Some(&gs), None);
        assert!(info.global_sidecar);
        assert_eq!(info.class, "mesh-operator/global-sidecar");
        let other = node(
            "sidecar~10.0.0.6~productpage-v1-abc-def.default~default.svc.cluster.local",
            &[],
        );
        assert!(!NodeInfo::from_node(Some(&other), None).global_sidecar);
        let pattern = Regex::new("^sidecar~[^~]+~productpage").unwrap();
        assert!(NodeInfo::from_node(Some(&other), Some(&pattern)).global_sidecar);
        let named = node("x", &[("NAMESPACE", "ns"), ("WORKLOAD_NAME", "gs")]);
        assert_eq!(NodeInfo::from_node(Some(&named), None).class, "ns/gs");
        assert!(!NodeInfo::from_node(None, None).global_sidecar);
    }

    #[test]
    fn supported_extensions() {
        let mut n = node("x", &[]);
        let info = NodeInfo::from_node(Some(&n), None);
        assert!(info.supports("type.googleapis.com/anything"));
        n.extensions.push(Extension {
            name: "envoy.filters.http.router".into(),
            type_urls: vec!["envoy.extensions.filters.http.router.v3.Router".into()],
            ..Default::default()
        });
        let info = NodeInfo::from_node(Some(&n), None);
        assert!(info.supports("type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"));
        assert!(!info.supports("type.googleapis.com/stats.PluginConfig"));
    }
}
