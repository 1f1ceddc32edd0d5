//! The Istio resources lazyload reads (VirtualService, ServiceEntry) and writes (Sidecar,
//! EnvoyFilter).
//!
//! Only the fields lazyload uses are typed; every other field is kept in an `extra` map, so a
//! read-modify-write never drops what another tool or a newer Istio put there. The API version is
//! chosen at run time ([`IstioVersion`]): Istio serves the same schema under `v1alpha3`,
//! `v1beta1` and (from 1.22) `v1`, and clusters differ in which ones they serve.

use std::collections::BTreeMap;

use kube::core::{ApiResource, GroupVersionKind, NotUsed, Object};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Fields of a message lazyload does not interpret, kept verbatim.
pub type Extra = BTreeMap<String, Value>;

/// A served version of Istio's `networking.istio.io` group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IstioVersion {
    /// `v1`, Istio 1.22 and later.
    V1,
    /// `v1beta1`, every Istio lazyload supports (1.8+) for Sidecar, VirtualService, ServiceEntry.
    #[default]
    V1beta1,
    /// `v1alpha3`, the only version of EnvoyFilter.
    V1alpha3,
}

impl IstioVersion {
    /// The version string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V1beta1 => "v1beta1",
            Self::V1alpha3 => "v1alpha3",
        }
    }

    /// The `ApiResource` of `kind` at this version.
    pub fn resource(self, kind: IstioKind) -> ApiResource {
        let gvk = GroupVersionKind::gvk("networking.istio.io", self.as_str(), kind.as_str());
        ApiResource::from_gvk_with_plural(&gvk, kind.plural())
    }
}

/// The `networking.istio.io` kinds lazyload reads or writes. A closed set, because the URL of a
/// kind needs its plural exactly as Istio's CRD declares it (`serviceentries`, not a guess made
/// by appending `s`: a wrong plural is a 404 on a real API server).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IstioKind {
    /// `Sidecar`.
    Sidecar,
    /// `VirtualService`.
    VirtualService,
    /// `ServiceEntry`.
    ServiceEntry,
    /// `EnvoyFilter`.
    EnvoyFilter,
    /// `DestinationRule`.
    DestinationRule,
}

impl IstioKind {
    /// The kind's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sidecar => "Sidecar",
            Self::VirtualService => "VirtualService",
            Self::ServiceEntry => "ServiceEntry",
            Self::EnvoyFilter => "EnvoyFilter",
            Self::DestinationRule => "DestinationRule",
        }
    }

    /// The plural of the kind's CRD (`spec.names.plural`), the last segment of its URLs.
    pub fn plural(self) -> &'static str {
        match self {
            Self::Sidecar => "sidecars",
            Self::VirtualService => "virtualservices",
            Self::ServiceEntry => "serviceentries",
            Self::EnvoyFilter => "envoyfilters",
            Self::DestinationRule => "destinationrules",
        }
    }
}

/// `workloadSelector` of Sidecar and EnvoyFilter.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadSelector {
    /// Pod labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// An Istio `Sidecar`.
pub type Sidecar = Object<SidecarSpec, NotUsed>;

/// `Sidecar.spec`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// Which pods the Sidecar applies to; none = the whole namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
    /// Egress listeners; lazyload writes one with `hosts`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressListener>,
    /// `ingress`, `outboundTrafficPolicy`, ...
    #[serde(flatten)]
    pub extra: Extra,
}

/// One `Sidecar.spec.egress[]` entry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EgressListener {
    /// `namespace/dnsName` hosts the workload may reach.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// `port`, `bind`, `captureMode`, ...
    #[serde(flatten)]
    pub extra: Extra,
}

/// An Istio `EnvoyFilter` (`v1alpha3`).
pub type EnvoyFilter = Object<EnvoyFilterSpec, NotUsed>;

/// An Istio DestinationRule (only the fields lazyload writes).
pub type DestinationRule = Object<DestinationRuleSpec, NotUsed>;

/// `DestinationRule.spec`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// The service the rule applies to.
    pub host: String,
    /// Connection settings for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// `DestinationRule.spec.trafficPolicy`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// Connection pool settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
}

/// `trafficPolicy.connectionPool`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectionPool {
    /// HTTP settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpPool>,
}

/// `connectionPool.http`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpPool {
    /// Speak the client's protocol (HTTP/1.1 or HTTP/2) to the upstream instead of HTTP/1.1.
    #[serde(default)]
    pub use_client_protocol: bool,
}

/// `EnvoyFilter.spec`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvoyFilterSpec {
    /// Which pods the filter applies to; none = every proxy in scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
    /// The patches, applied in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_patches: Vec<ConfigPatch>,
    /// Ordering among EnvoyFilters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// `targetRefs`, ...
    #[serde(flatten)]
    pub extra: Extra,
}

/// One `EnvoyFilter.spec.configPatches[]` entry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigPatch {
    /// `ROUTE_CONFIGURATION`, `VIRTUAL_HOST`, `HTTP_FILTER`, ...
    pub apply_to: String,
    /// Which objects the patch applies to (free-form Istio match).
    #[serde(rename = "match", default, skip_serializing_if = "Option::is_none")]
    pub matcher: Option<Value>,
    /// The patch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<Patch>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `configPatches[].patch`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Patch {
    /// `MERGE`, `ADD`, `REMOVE`, `INSERT_BEFORE`, ...
    pub operation: String,
    /// The Envoy config fragment (free-form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// Other fields (`filterClass`).
    #[serde(flatten)]
    pub extra: Extra,
}

/// An Istio `VirtualService` (the routing parts lazyload follows).
pub type VirtualService = Object<VirtualServiceSpec, NotUsed>;

/// `VirtualService.spec`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    /// Hosts the routes apply to; short names are relative to the VirtualService's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Gateways the routes bind to; empty or `mesh` means sidecars.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// Namespaces that see this VirtualService (`*` all, `.` own); empty = all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    /// HTTP routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRoute>,
    /// TCP routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<L4Route>,
    /// TLS routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<L4Route>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// An HTTP route.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpRoute {
    /// Weighted destinations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<RouteDestination>,
    /// Mirror target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Destination>,
    /// Mirror targets (Istio 1.18+).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<RouteDestination>,
    /// Routes taken from another VirtualService.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegate: Option<Delegate>,
    /// `match`, `retries`, `rewrite`, ...
    #[serde(flatten)]
    pub extra: Extra,
}

/// A TCP or TLS route.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct L4Route {
    /// Weighted destinations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<RouteDestination>,
    /// `match`, ...
    #[serde(flatten)]
    pub extra: Extra,
}

/// `route[]` (and `mirrors[]`) entry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteDestination {
    /// Where the traffic goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Destination>,
    /// `weight`, `headers`, ...
    #[serde(flatten)]
    pub extra: Extra,
}

/// A route destination.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Destination {
    /// Destination host; short names are relative to the VirtualService's namespace.
    #[serde(default)]
    pub host: String,
    /// `subset`, `port`, ...
    #[serde(flatten)]
    pub extra: Extra,
}

/// `http[].delegate`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Delegate {
    /// Name of the delegate VirtualService.
    pub name: String,
    /// Its namespace; empty = the parent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// An Istio `ServiceEntry` (the parts lazyload uses).
pub type ServiceEntry = Object<ServiceEntrySpec, NotUsed>;

/// `ServiceEntry.spec`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    /// Hosts the entry adds to the registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Virtual IPs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServiceEntryPort>,
    /// Namespaces that see this entry; empty = all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    /// `location`, `resolution`, `endpoints`, ...
    #[serde(flatten)]
    pub extra: Extra,
}

/// `ServiceEntry.spec.ports[]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceEntryPort {
    /// Port number.
    pub number: u32,
    /// `HTTP`, `HTTP2`, `GRPC`, `TCP`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Port name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `targetPort`, ...
    #[serde(flatten)]
    pub extra: Extra,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decoding into the typed struct and encoding again gives back the same object.
    fn round_trip<T: serde::de::DeserializeOwned + Serialize>(yaml: &str) {
        let original: Value = crate::yaml::from_str(yaml).unwrap();
        let typed: T = serde_json::from_value(original.clone()).unwrap();
        assert_eq!(serde_json::to_value(&typed).unwrap(), original);
    }

    #[test]
    fn sidecar_keeps_fields_lazyload_does_not_own() {
        round_trip::<Sidecar>(
            r#"
apiVersion: networking.istio.io/v1beta1
kind: Sidecar
metadata: {name: productpage, namespace: default, resourceVersion: "7", annotations: {a: b}}
spec:
  workloadSelector: {labels: {app: productpage}}
  egress:
  - hosts: ["*/details.default.svc.cluster.local", "istio-system/*"]
    port: {number: 9080, protocol: HTTP, name: http}
  ingress:
  - port: {number: 9080, protocol: HTTP, name: http}
    defaultEndpoint: 127.0.0.1:9080
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
"#,
        );
    }

    #[test]
    fn envoyfilter_round_trips() {
        round_trip::<EnvoyFilter>(
            r#"
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: to-global-sidecar, namespace: istio-system}
spec:
  priority: 10
  configPatches:
  - applyTo: VIRTUAL_HOST
    match: {context: SIDECAR_OUTBOUND, routeConfiguration: {name: "9080", vhost: {name: allow_any}}}
    patch: {operation: REMOVE}
  - applyTo: HTTP_FILTER
    patch: {operation: INSERT_BEFORE, filterClass: AUTHZ, value: {name: x}}
  targetRefs: [{kind: Gateway, name: gw}]
"#,
        );
    }

    #[test]
    fn virtualservice_and_serviceentry_round_trip() {
        round_trip::<VirtualService>(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}, weight: 100}]
    mirror: {host: shadow}
    retries: {attempts: 3}
  - delegate: {name: reviews-delegate, namespace: other}
  tcp:
  - route: [{destination: {host: mongo.backends.svc.cluster.local, port: {number: 27017}}}]
"#,
        );
        round_trip::<ServiceEntry>(
            r#"
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: ext, namespace: default}
spec:
  hosts: [www.163.com]
  addresses: [240.0.0.1]
  ports: [{number: 80, protocol: HTTP, name: http, targetPort: 8080}]
  location: MESH_EXTERNAL
  resolution: DNS
"#,
        );
    }

    #[test]
    fn api_resources() {
        let ar = IstioVersion::V1.resource(IstioKind::Sidecar);
        assert_eq!(
            (ar.api_version.as_str(), ar.plural.as_str()),
            ("networking.istio.io/v1", "sidecars")
        );
        let ar = IstioVersion::V1alpha3.resource(IstioKind::EnvoyFilter);
        assert_eq!(ar.plural, "envoyfilters");
    }

    /// The plurals Istio's CRDs declare (`spec.names.plural`); appending `s` gets ServiceEntry
    /// wrong.
    #[test]
    fn plurals_are_the_crds() {
        let plurals: Vec<(&str, String)> = [
            IstioKind::Sidecar,
            IstioKind::VirtualService,
            IstioKind::ServiceEntry,
            IstioKind::EnvoyFilter,
            IstioKind::DestinationRule,
        ]
        .into_iter()
        .map(|k| (k.as_str(), IstioVersion::V1beta1.resource(k).plural))
        .collect();
        assert_eq!(
            plurals,
            [
                ("Sidecar", "sidecars".to_string()),
                ("VirtualService", "virtualservices".into()),
                ("ServiceEntry", "serviceentries".into()),
                ("EnvoyFilter", "envoyfilters".into()),
                ("DestinationRule", "destinationrules".into()),
            ]
        );
    }
}
