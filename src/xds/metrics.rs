//! Relay metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::telemetry::register_families;

/// Labels of per-type metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// Short type name (`Cluster`, `Listener`, ...), `other` for unknown types.
    pub r#type: String,
}

/// Labels of stream metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// `sotw` or `delta`.
    pub protocol: &'static str,
    /// Whether the node is a global-sidecar.
    pub global_sidecar: bool,
}

/// Labels of adjustment metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdjustLabels {
    /// What was done.
    pub adjustment: &'static str,
}

/// Everything the relay counts.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Responses pushed downstream, per type.
    pub pushes: Family<TypeLabels, Counter>,
    /// Bytes of resources pushed downstream, per type.
    pub push_bytes: Family<TypeLabels, Counter>,
    /// NACKs from downstream, per type.
    pub nacks: Family<TypeLabels, Counter>,
    /// NACKs of responses holding adjusted resources.
    pub adjusted_nacks: Family<TypeLabels, Counter>,
    /// Upstream streams opened (a reconnect is one more).
    pub upstream_connects: Counter,
    /// Failed attempts to open an upstream stream.
    pub upstream_failures: Counter,
    /// Downstream streams open now.
    pub streams: Family<StreamLabels, Gauge>,
    /// Streams served from the last good config because istiod was unreachable.
    pub last_good_served: Counter,
    /// Adjustments applied, by kind.
    pub adjustments: Family<AdjustLabels, Counter>,
    /// Upstream responses dropped because their type was not requested or their resources are
    /// of another type.
    pub upstream_invalid: Family<TypeLabels, Counter>,
    /// Downstream streams ended because a request was undecodable, too large, or the first one
    /// had no node.
    pub invalid_requests: Counter,
    /// Connections closed at once because the connection limit was reached.
    pub refused_connections: Counter,
    /// Streams refused because the client was not authenticated and would have used the
    /// relay's own istiod credentials.
    pub unauthenticated: Counter,
}

impl Metrics {
    /// Registers the metrics under `registry` (prefix `relay_`).
    pub fn register(&self, registry: &mut Registry) {
        register_families(
            registry,
            "relay",
            vec![
                (
                    "pushes",
                    "xDS responses sent downstream",
                    Box::new(self.pushes.clone()),
                ),
                (
                    "push_bytes",
                    "Bytes of resources sent downstream",
                    Box::new(self.push_bytes.clone()),
                ),
                (
                    "nacks",
                    "Responses rejected by the downstream",
                    Box::new(self.nacks.clone()),
                ),
                (
                    "adjusted_nacks",
                    "Rejected responses that held adjusted resources",
                    Box::new(self.adjusted_nacks.clone()),
                ),
                (
                    "upstream_connects",
                    "Upstream streams opened",
                    Box::new(self.upstream_connects.clone()),
                ),
                (
                    "upstream_failures",
                    "Failed attempts to open an upstream stream",
                    Box::new(self.upstream_failures.clone()),
                ),
                (
                    "streams",
                    "Downstream streams open",
                    Box::new(self.streams.clone()),
                ),
                (
                    "last_good_served",
                    "Streams served from the last good config",
                    Box::new(self.last_good_served.clone()),
                ),
                (
                    "upstream_invalid",
                    "Upstream responses dropped: a type not requested, or resources of another type",
                    Box::new(self.upstream_invalid.clone()),
                ),
                (
                    "invalid_requests",
                    "Downstream streams ended for an invalid request",
                    Box::new(self.invalid_requests.clone()),
                ),
                (
                    "unauthenticated_streams",
                    "Streams refused: an unauthenticated client would have used the relay's own istiod credentials",
                    Box::new(self.unauthenticated.clone()),
                ),
                (
                    "refused_connections",
                    "Downstream connections closed because the connection limit was reached",
                    Box::new(self.refused_connections.clone()),
                ),
                (
                    "adjustments",
                    "Adjustments applied to global-sidecar config",
                    Box::new(self.adjustments.clone()),
                ),
            ],
        );
    }

    /// Per-type labels from a type URL: its short name for the types a mesh uses, `other` for any
    /// other (type URLs come from istiod and clients: as labels they must be a closed set).
    pub fn type_labels(type_url: &str) -> TypeLabels {
        let known = KNOWN_TYPES.contains(&type_url);
        TypeLabels {
            r#type: if known { short_type(type_url) } else { "other" }.to_string(),
        }
    }
}

/// The type URLs Envoy and istio-agent request over ADS (xDS core types and Istio's own); any
/// other is labelled `other`.
const KNOWN_TYPES: [&str; 11] = [
    super::CLUSTER,
    super::ENDPOINT,
    super::LISTENER,
    super::ROUTE,
    super::SECRET,
    "type.googleapis.com/envoy.config.route.v3.VirtualHost",
    "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration",
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
    "type.googleapis.com/envoy.service.runtime.v3.Runtime",
    "type.googleapis.com/istio.mesh.v1alpha1.ProxyConfig",
    "type.googleapis.com/istio.networking.nds.v1.NameTable",
];

/// A type URL's last part (`Cluster`, `ClusterLoadAssignment`, ...), as metrics and logs name it.
pub fn short_type(type_url: &str) -> &str {
    type_url.rsplit('.').next().unwrap_or(type_url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_labels_are_a_closed_set() {
        let table = [
            (crate::xds::CLUSTER, "Cluster"),
            (crate::xds::ENDPOINT, "ClusterLoadAssignment"),
            (
                "type.googleapis.com/istio.mesh.v1alpha1.ProxyConfig",
                "ProxyConfig",
            ),
            ("type.googleapis.com/attacker.Chosen1", "other"),
            ("", "other"),
            ("Cluster", "other"),
        ];
        for (type_url, want) in table {
            assert_eq!(Metrics::type_labels(type_url).r#type, want, "{type_url}");
        }
    }
}
