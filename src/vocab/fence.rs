//! The `ServiceFence` custom resource (`microservice.slime.io/v1alpha1`), wire-compatible with
//! Slime's.
//!
//! Slime serialises fences with Go's `jsonpb`: enums as names (`EXPIREWAIT`) with the zero value
//! (`ACTIVE`) omitted, and `int64` seconds as JSON strings, while its CRD schema declares integers.
//! So objects in real clusters carry either form. lazyload reads both (the schema marks those
//! fields `x-kubernetes-int-or-string`) and writes names and numbers.
//!
//! Slime's first CRD had no schema at all and none of its CRDs requires anything, so a fence may
//! have no `spec`, and any map or list may be missing or `null`: all of them read as empty.
//!
//! Additions over Slime's schema (all optional, so Slime ignores them): `status.lastSeen` (when each
//! learned dependency was last seen, for expiry) and `status.conditions`.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Label that marks fences lazyload created (and may therefore delete).
pub const LABEL_CREATED_BY: &str = "app.kubernetes.io/created-by";
/// Value of [`LABEL_CREATED_BY`] on auto-created fences (Slime's value).
pub const CREATED_BY_FENCE_CONTROLLER: &str = "fence-controller";
/// Service or Namespace label that switches auto-fencing on (`"true"`) or off (`"false"`).
pub const LABEL_SERVICE_FENCED: &str = "slime.io/serviceFenced";
/// Istio revision label, propagated from a fence to its Sidecar.
pub const LABEL_ISTIO_REV: &str = "istio.io/rev";

/// Condition type: whether every host the fence declares or learned is valid.
pub const CONDITION_HOSTS_VALID: &str = "HostsValid";
/// Condition type: whether the fence yields a Sidecar, and why not.
pub const CONDITION_SIDECAR: &str = "SidecarGenerated";
/// Condition type, present only while true: the fence learned `general.maxLearnedHostsPerFence`
/// hosts and learns no more.
pub const CONDITION_HOST_CAP: &str = "LearnedHostCapReached";

/// A ServiceFence: which services a workload depends on, declared and learned.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "microservice.slime.io",
    version = "v1alpha1",
    kind = "ServiceFence",
    namespaced,
    status = "ServiceFenceStatus",
    shortname = "svf",
    derive = "PartialEq",
    derive = "Default",
    doc = "ServiceFence scopes a workload's Istio config to the services it depends on; lazyload derives an Istio Sidecar from it.",
    printcolumn = r#"{"name":"Enabled", "type":"boolean", "jsonPath":".spec.enable"}"#,
    printcolumn = r#"{"name":"Sidecar", "type":"string", "description":"Why a Sidecar is or is not generated", "jsonPath":".status.conditions[?(@.type==\"SidecarGenerated\")].reason"}"#,
    printcolumn = r#"{"name":"Hosts-Valid", "type":"string", "jsonPath":".status.conditions[?(@.type==\"HostsValid\")].status"}"#,
    printcolumn = r#"{"name":"Age", "type":"date", "jsonPath":".metadata.creationTimestamp"}"#
)]
// `remote = "Self"`: the derived code becomes `ServiceFenceSpec::deserialize`, wrapped by the
// `Deserialize` impl below so that a missing or `null` spec reads as the empty spec.
#[serde(rename_all = "camelCase", remote = "Self")]
pub struct ServiceFenceSpec {
    /// Static dependencies: host (FQDN, external host, `ns/*`) to its recycling strategy.
    #[serde(
        default,
        deserialize_with = "null_values_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub host: BTreeMap<String, RecyclingStrategy>,
    /// Render this fence as a Sidecar.
    #[serde(default, deserialize_with = "null_as_default")]
    pub enable: bool,
    /// Every service in these namespaces is a static dependency.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub namespace_selector: Vec<String>,
    /// Services matching any selector (all labels of one selector) are static dependencies.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub label_selector: Vec<Selector>,
    /// Which workloads the Sidecar applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
}

impl<'de> Deserialize<'de> for ServiceFenceSpec {
    /// A missing `spec` (serde asks an absent field for an option) and `spec: null` read as the
    /// empty spec: a fence Slime accepted is never unreadable here.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Present(#[serde(with = "ServiceFenceSpec")] ServiceFenceSpec);
        Ok(Option::<Present>::deserialize(d)?
            .map(|p| p.0)
            .unwrap_or_default())
    }
}

impl Serialize for ServiceFenceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ServiceFenceSpec::serialize(self, s)
    }
}

/// Reads `null` as the type's default (Slime's schemas allow `null` for every map and list).
fn null_as_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A map whose values may each be `null` (`host: {a.b.svc.cluster.local: }`): empty values.
fn null_values_as_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(
    d: D,
) -> Result<BTreeMap<String, T>, D::Error> {
    let map: Option<BTreeMap<String, Option<T>>> = Option::deserialize(d)?;
    Ok(map
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or_default()))
        .collect())
}

/// One label selector of `spec.labelSelector`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Selector {
    /// Labels a Service must all carry.
    #[serde(default, deserialize_with = "null_as_default")]
    pub selector: BTreeMap<String, String>,
}

/// `spec.workloadSelector`: `labels` wins over `fromService`; with neither, the Sidecar selects
/// `{<global.service>: <fence name>}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Use the selector of the Service named like the fence.
    #[serde(default, deserialize_with = "null_as_default")]
    pub from_service: bool,
    /// Explicit workload labels.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
}

/// How long a static dependency lasts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RecyclingStrategy {
    /// Never expires (also the meaning of an empty strategy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<Stable>,
    /// Expires at a fixed time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Deadline>,
    /// Expires `duration` after the dependency was last called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<Auto>,
    /// When the dependency was last called (Slime's field).
    #[serde(rename = "RecentlyCalled", default, skip_serializing_if = "Option::is_none")]
    pub recently_called: Option<ProtoTimestamp>,
}

/// `stable: {}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Stable {}

/// `deadline: {expire: {seconds}}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Deadline {
    /// The moment the dependency expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire: Option<ProtoTimestamp>,
}

/// `auto: {duration: {seconds}}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Auto {
    /// How long after the last call the dependency expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<ProtoTimestamp>,
}

/// Slime's own `Timestamp` message: seconds since the epoch (or a length, in `auto.duration`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ProtoTimestamp {
    /// Seconds; Slime writes them as a number or, via jsonpb, as a string.
    #[serde(default, deserialize_with = "int_or_string_i64")]
    #[schemars(schema_with = "int_or_string_schema")]
    pub seconds: i64,
    /// Nanoseconds (a number, or a string as some encoders write every integer).
    #[serde(default, deserialize_with = "int_or_string_i32")]
    #[schemars(schema_with = "int_or_string_schema")]
    pub nanos: i32,
}

impl ProtoTimestamp {
    /// This value as a point in time, when it is one.
    pub fn as_time(&self) -> Option<Timestamp> {
        Timestamp::new(self.seconds, self.nanos.clamp(0, 999_999_999)).ok()
    }

    /// This value as a length of time (negative lengths are zero).
    pub fn as_duration(&self) -> std::time::Duration {
        std::time::Duration::new(
            self.seconds.max(0) as u64,
            self.nanos.clamp(0, 999_999_999) as u32,
        )
    }
}

/// State of one dependency in `status.domains`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DomainStatus {
    /// Removed from the Sidecar (value 1).
    Expire,
    /// About to expire; still in the Sidecar (value 2).
    ExpireWait,
    /// In the Sidecar (value 0, Slime's default).
    #[default]
    Active,
}

impl DomainStatus {
    /// Whether the dependency belongs in the Sidecar.
    pub fn in_sidecar(self) -> bool {
        self != Self::Expire
    }

    /// Slime's enum name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Active => "ACTIVE",
            Self::Expire => "EXPIRE",
            Self::ExpireWait => "EXPIREWAIT",
        }
    }
}

impl Serialize for DomainStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for DomainStatus {
    /// Reads Slime's names and numbers. Unknown values read as ACTIVE: statuses are recomputed
    /// on every reconcile, so a stray value must not make the whole fence unreadable.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match IntOrStr::deserialize(d)? {
            IntOrStr::Int(1) => Self::Expire,
            IntOrStr::Int(2) => Self::ExpireWait,
            IntOrStr::Str(s) if s == "EXPIRE" => Self::Expire,
            IntOrStr::Str(s) if s == "EXPIREWAIT" => Self::ExpireWait,
            _ => Self::Active,
        })
    }
}

impl JsonSchema for DomainStatus {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "DomainStatus".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "ACTIVE, EXPIREWAIT (expiring, still in the Sidecar) or EXPIRE; Slime's numbers 0, 2, 1 are read too.",
            "x-kubernetes-int-or-string": true,
        })
    }
}

/// One entry of `status.domains`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Destinations {
    /// Deprecated in Slime; kept so that it survives a rewrite.
    #[serde(rename = "RecentlyCalled", default, skip_serializing_if = "Option::is_none")]
    pub recently_called: Option<ProtoTimestamp>,
    /// The host and what it routes to (VirtualService destinations), each written as `*/<host>`.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub hosts: Vec<String>,
    /// Whether the hosts are in the Sidecar.
    #[serde(default, deserialize_with = "null_as_default")]
    pub status: DomainStatus,
}

/// What lazyload knows about a fence's dependencies.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceFenceStatus {
    /// Every dependency (declared and learned) with its expansion and state.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub domains: BTreeMap<String, Destinations>,
    /// Learned dependencies in Slime's format: `{destination_service="<fqdn>"}` -> call count.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub metric_status: BTreeMap<String, String>,
    /// Deprecated in Slime; kept so that it survives a rewrite.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub visitor: BTreeMap<String, bool>,
    /// lazyload: when each learned host was last seen (drives expiry).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub last_seen: BTreeMap<String, Time>,
    /// lazyload: `HostsValid` and `SidecarGenerated`.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub conditions: Vec<Condition>,
}

impl ServiceFence {
    /// The CustomResourceDefinition. Like every CRD Slime shipped it requires no `spec` (the
    /// derived schema would), so that fences written for Slime without one are accepted.
    pub fn definition() -> CustomResourceDefinition {
        let mut crd = <Self as kube::CustomResourceExt>::crd();
        for version in &mut crd.spec.versions {
            if let Some(root) = version
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
                && let Some(required) = root.required.as_mut()
            {
                required.retain(|field| field != "spec");
                if required.is_empty() {
                    root.required = None;
                }
            }
        }
        crd
    }

    /// Whether lazyload created this fence (and may delete it).
    pub fn is_auto_created(&self) -> bool {
        self.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_CREATED_BY))
            .is_some_and(|v| v == CREATED_BY_FENCE_CONTROLLER)
    }
}

/// The `metricStatus` key Slime uses for a learned destination.
pub fn metric_key(host: &str) -> String {
    format!("{{destination_service=\"{host}\"}}")
}

/// The destination host of a `metricStatus` key: the `destination_service` (or `request_host`)
/// label of a Prometheus-style label set, without a port. `None` for keys that name no host.
pub fn metric_key_host(key: &str) -> Option<&str> {
    let inner = key.trim().strip_prefix('{')?.strip_suffix('}')?;
    let mut rest = inner;
    while !rest.is_empty() {
        let (name, after) = rest.split_once('=')?;
        let after = after.trim_start().strip_prefix('"')?;
        let end = after.find('"')?;
        let value = &after[..end];
        let name = name.trim().trim_start_matches(',').trim();
        if name == "destination_service" || name == "request_host" {
            let host = value.split_once(':').map_or(value, |(h, _)| h);
            return (!host.is_empty()).then_some(host);
        }
        rest = after[end + 1..].trim_start().trim_start_matches(',');
    }
    None
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrStr {
    Int(i64),
    Str(String),
}

fn int_or_string_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    match IntOrStr::deserialize(d)? {
        IntOrStr::Int(i) => Ok(i),
        IntOrStr::Str(s) => s.trim().parse().map_err(serde::de::Error::custom),
    }
}

fn int_or_string_i32<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    i32::try_from(int_or_string_i64(d)?).map_err(serde::de::Error::custom)
}

fn int_or_string_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Seconds, as a number or a string.",
        "x-kubernetes-int-or-string": true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_slime_jsonpb_output() {
        // jsonpb: enum names, ACTIVE omitted, int64 as strings.
        let json = r#"{
            "host": {"a.b.svc.cluster.local": {"deadline": {"expire": {"seconds": "1700000000"}}},
                     "test/*": {}},
            "enable": true
        }"#;
        let spec: ServiceFenceSpec = serde_json::from_str(json).unwrap();
        let d = &spec.host["a.b.svc.cluster.local"].deadline;
        assert_eq!(d.as_ref().unwrap().expire.unwrap().seconds, 1_700_000_000);
        let status: ServiceFenceStatus = serde_json::from_str(
            r#"{"domains": {"a": {"hosts": ["a"]}, "b": {"hosts": ["b"], "status": "EXPIREWAIT"},
                            "c": {"status": 1}, "d": {"status": "bogus"}}}"#,
        )
        .unwrap();
        let st: Vec<_> = status.domains.values().map(|d| d.status).collect();
        assert_eq!(
            st,
            [
                DomainStatus::Active,
                DomainStatus::ExpireWait,
                DomainStatus::Expire,
                DomainStatus::Active
            ]
        );
    }

    #[test]
    fn stable_null_reads_as_empty_strategy() {
        let spec: ServiceFenceSpec =
            crate::yaml::from_str("enable: true\nhost:\n  reviews.default.svc.cluster.local:\n    stable:\n")
                .unwrap();
        assert_eq!(
            spec.host["reviews.default.svc.cluster.local"],
            RecyclingStrategy::default()
        );
    }

    #[test]
    fn missing_or_null_spec_status_and_maps_read_as_empty() {
        let cases = [
            "apiVersion: microservice.slime.io/v1alpha1\nkind: ServiceFence\nmetadata: {name: a}\n",
            "apiVersion: microservice.slime.io/v1alpha1\nkind: ServiceFence\nmetadata: {name: a}\nspec:\nstatus:\n",
            "apiVersion: microservice.slime.io/v1alpha1\nkind: ServiceFence\nmetadata: {name: a}\nspec: {host: null, enable: null, namespaceSelector: null, labelSelector: [{selector: null}], workloadSelector: {labels: null, fromService: null}}\nstatus: {domains: null, metricStatus: null, visitor: null, lastSeen: null, conditions: null}\n",
        ];
        for text in cases {
            let fence: ServiceFence = crate::yaml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert!(!fence.spec.enable && fence.spec.host.is_empty(), "{text}");
            assert!(fence.status.unwrap_or_default().domains.is_empty(), "{text}");
        }
        let spec: ServiceFenceSpec = serde_json::from_str(
            r#"{"host": {"a.b.svc.cluster.local": null, "c": {"deadline": {"expire": {"seconds": "5", "nanos": "7"}}}}}"#,
        )
        .unwrap();
        assert_eq!(spec.host["a.b.svc.cluster.local"], RecyclingStrategy::default());
        assert_eq!(
            spec.host["c"].deadline.as_ref().and_then(|d| d.expire),
            Some(ProtoTimestamp { seconds: 5, nanos: 7 })
        );
    }

    #[test]
    fn definition_requires_no_spec() {
        let crd = ServiceFence::definition();
        let root = crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap();
        assert!(
            root.required
                .as_ref()
                .is_none_or(|r| !r.iter().any(|f| f == "spec"))
        );
    }

    #[test]
    fn metric_keys() {
        assert_eq!(
            metric_key("a.b.svc.cluster.local"),
            "{destination_service=\"a.b.svc.cluster.local\"}"
        );
        let cases = [
            (
                "{destination_service=\"a.b.svc.cluster.local\"}",
                Some("a.b.svc.cluster.local"),
            ),
            ("{request_host=\"www.163.com:80\"}", Some("www.163.com")),
            (
                "{source_app=\"x\", destination_service=\"d.ns.svc.cluster.local\"}",
                Some("d.ns.svc.cluster.local"),
            ),
            ("{source_app=\"x\"}", None),
            ("{destination_service=\"\"}", None),
            ("destination_service", None),
            ("{destination_service=\"unterminated}", None),
            ("", None),
        ];
        for (key, want) in cases {
            assert_eq!(metric_key_host(key), want, "{key}");
        }
    }
}
