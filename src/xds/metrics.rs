//! Relay metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of per-type metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// Short type name (`Cluster`, `Listener`, ...).
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
}

impl Metrics {
    /// Registers the metrics under `registry` (prefix `relay_`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("relay");
        r.register("pushes", "xDS responses sent downstream", self.pushes.clone());
        r.register(
            "push_bytes",
            "Bytes of resources sent downstream",
            self.push_bytes.clone(),
        );
        r.register(
            "nacks",
            "Responses rejected by the downstream",
            self.nacks.clone(),
        );
        r.register(
            "adjusted_nacks",
            "Rejected responses that held adjusted resources",
            self.adjusted_nacks.clone(),
        );
        r.register(
            "upstream_connects",
            "Upstream streams opened",
            self.upstream_connects.clone(),
        );
        r.register(
            "upstream_failures",
            "Failed attempts to open an upstream stream",
            self.upstream_failures.clone(),
        );
        r.register("streams", "Downstream streams open", self.streams.clone());
        r.register(
            "last_good_served",
            "Streams served from the last good config",
            self.last_good_served.clone(),
        );
        r.register(
            "adjustments",
            "Adjustments applied to global-sidecar config",
            self.adjustments.clone(),
        );
    }

    /// Per-type labels from a type URL.
    pub fn type_labels(type_url: &str) -> TypeLabels {
        TypeLabels {
            r#type: short_type(type_url).to_string(),
        }
    }
}

/// A type URL's last part (`Cluster`, `ClusterLoadAssignment`, ...), as metrics and logs name it.
pub fn short_type(type_url: &str) -> &str {
    type_url.rsplit('.').next().unwrap_or(type_url)
}
