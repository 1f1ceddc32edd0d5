//! The demo's sample mesh: bookinfo plus generated services, who calls whom, and the same mesh
//! in the three forms the demo needs: the cluster as `kubectl get -o yaml` prints it, the full
//! config istiod would push (as xDS resources for the built-in upstream, and as an Envoy config
//! dump for `report`), and the global-sidecar's access logs of the calls.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy,
};
use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, Node, config_source,
};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType as HttpFilterConfig;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, Identifier, LogEntries,
};
use envoy_types::pb::google::protobuf::{Duration as ProtoDuration, UInt32Value};
use serde_json::{Value, json};

use crate::fake_istiod::Config;
use crate::xds::adjust::{PASSTHROUGH_CLUSTER, pack, socket};
use crate::xds::{CLUSTER, ENDPOINT, LISTENER, ROUTE};

/// Bookinfo's namespace.
pub const BOOKINFO: &str = "bookinfo";

/// One service of the sample mesh (one port, one pod).
pub struct Service {
    /// Namespace.
    pub namespace: String,
    /// Name (also its `app` label and fence name).
    pub name: String,
    /// Its one HTTP port.
    pub port: u16,
    /// ClusterIP.
    pub cluster_ip: String,
    /// Its pod's IP.
    pub pod_ip: String,
}

impl Service {
    /// `name.namespace.svc.cluster.local`.
    pub fn fqdn(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    /// Its istiod cluster name, `outbound|port||fqdn`.
    pub fn cluster(&self) -> String {
        format!("outbound|{}||{}", self.port, self.fqdn())
    }

    /// Its ServiceFence, before anything is learned.
    pub fn fence(&self) -> Value {
        json!({"apiVersion": "microservice.slime.io/v1alpha1", "kind": "ServiceFence",
            "metadata": {"name": self.name, "namespace": self.namespace}, "spec": {"enable": true}})
    }
}

/// The sample mesh: its services and who calls whom (indexes into `services`).
pub struct Mesh {
    /// The services, bookinfo's first.
    pub services: Vec<Service>,
    /// Calls (caller, callee) as indexes into `services`, sorted.
    pub calls: Vec<(usize, usize)>,
    /// Where every pod's port is really served, when the mesh runs on this machine.
    pub backend: Option<SocketAddr>,
}

impl Mesh {
    /// Bookinfo (productpage -> details, reviews; reviews -> ratings) and `generated` services in
    /// `shop-*` namespaces, each calling two others (deterministically).
    pub fn sample(generated: usize) -> Self {
        let mut services = Vec::new();
        let mut add = |namespace: String, name: String, port: u16| {
            let i = services.len();
            services.push(Service {
                namespace,
                name,
                port,
                cluster_ip: format!("10.96.{}.{}", i / 250, i % 250 + 1),
                pod_ip: format!("10.1.{}.{}", i / 250, i % 250 + 1),
            });
        };
        for name in ["productpage", "details", "reviews", "ratings"] {
            add(BOOKINFO.into(), name.into(), 9080);
        }
        let namespaces = generated.div_ceil(25).max(1);
        for i in 0..generated {
            add(format!("shop-{}", i % namespaces), format!("svc-{i}"), 8080);
        }
        let mut calls = vec![(0, 1), (0, 2), (2, 3)];
        if generated > 1 {
            for i in 0..generated {
                for j in [(i + 1) % generated, (i * 7 + 3) % generated] {
                    if j != i {
                        calls.push((4 + i, 4 + j));
                    }
                }
            }
        }
        calls.sort_unstable();
        calls.dedup();
        Mesh {
            services,
            calls,
            backend: None,
        }
    }

    /// The same mesh laid out on this machine for a real Envoy: pods at loopback addresses
    /// (`127.1.x.y`, so that a caller is told apart by its source address), bookinfo's services
    /// on `ports[0]` and the others on `ports[1]` (the global-sidecar listens on them), and every
    /// pod served by the one `backend`.
    pub fn on_loopback(mut self, ports: [u16; 2], backend: SocketAddr) -> Self {
        for (i, s) in self.services.iter_mut().enumerate() {
            s.pod_ip = loopback_pod_ip(i).to_string();
            s.port = if s.namespace == BOOKINFO {
                ports[0]
            } else {
                ports[1]
            };
        }
        self.backend = Some(backend);
        self
    }

    /// Where a service's endpoint is: its pod, or the backend standing in for every pod.
    fn endpoint(&self, s: &Service) -> (String, u16) {
        match self.backend {
            Some(b) => (b.ip().to_string(), b.port()),
            None => (s.pod_ip.clone(), s.port),
        }
    }

    /// The cluster as one `kubectl get ns,svc,pods,servicefences -A -o yaml` List (fences
    /// only with `fences`).
    pub fn cluster_yaml(&self, fences: bool) -> String {
        let mut items = Vec::new();
        let mut namespaces: Vec<&str> = self.services.iter().map(|s| s.namespace.as_str()).collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        for ns in namespaces {
            items.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
        }
        for s in &self.services {
            let labels = json!({"app": s.name});
            items.push(json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": s.name, "namespace": s.namespace, "labels": labels},
                "spec": {"selector": labels, "clusterIP": s.cluster_ip,
                         "ports": [{"name": "http", "port": s.port}]}}));
            items.push(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("{}-v1-0", s.name), "namespace": s.namespace, "labels": labels},
                "spec": {"containers": [{"name": "app", "image": "demo"}]},
                "status": {"phase": "Running", "podIP": s.pod_ip, "podIPs": [{"ip": s.pod_ip}]}}));
            if fences {
                items.push(s.fence());
            }
        }
        crate::yaml::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": items}))
            .unwrap_or_default()
    }

    /// The full config of a proxy without a Sidecar, shaped like istiod's output.
    pub fn config_dump(&self) -> Value {
        let clusters: Vec<Value> = self.services.iter().map(dumped_cluster).collect();
        let endpoints: Vec<Value> = self.services.iter().map(|s| self.dumped_endpoints(s)).collect();
        let mut ports: Vec<u16> = self.services.iter().map(|s| s.port).collect();
        ports.sort_unstable();
        ports.dedup();
        let listeners: Vec<Value> = ports.iter().map(|&port| dumped_listener(port)).collect();
        let routes: Vec<Value> = ports.iter().map(|&port| self.dumped_route(port)).collect();
        json!({"configs": [
            {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump", "dynamic_active_clusters": clusters},
            {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "dynamic_listeners": listeners},
            {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "dynamic_route_configs": routes},
            {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump", "dynamic_endpoint_configs": endpoints},
        ]})
    }

    /// A service's endpoints in a config dump, as istiod's EDS has them.
    fn dumped_endpoints(&self, s: &Service) -> Value {
        let (ip, port) = self.endpoint(s);
        json!({"endpoint_config": {
            "cluster_name": s.cluster(),
            "endpoints": [{"locality": {}, "lb_endpoints": [{
                "endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}},
                "health_status": "HEALTHY",
                "metadata": {"filter_metadata": {"istio": {"workload": format!("{};{};{};v1;Kubernetes", s.name, s.namespace, s.name)},
                    "envoy.transport_socket_match": {"tlsMode": "istio"}}},
                "load_balancing_weight": 1}]}]}})
    }

    /// A port's route configuration in a config dump: a virtual host per service on the port,
    /// then istiod's `allow_any`.
    fn dumped_route(&self, port: u16) -> Value {
        let mut vhosts: Vec<Value> = self
            .services
            .iter()
            .filter(|s| s.port == port)
            .map(|s| {
                let short = format!("{}.{}", s.name, s.namespace);
                json!({"name": format!("{}:{port}", s.fqdn()),
                    "domains": [s.fqdn(), format!("{}:{port}", s.fqdn()), short.clone(),
                                format!("{short}:{port}"), s.cluster_ip.clone(),
                                format!("{}:{port}", s.cluster_ip)],
                    "routes": [{"name": "default", "match": {"prefix": "/"},
                        "route": {"cluster": s.cluster(), "timeout": "0s",
                            "retry_policy": {"retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
                                "num_retries": 2, "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}],
                                "host_selection_retry_max_attempts": "5"},
                            "max_grpc_timeout": "0s"},
                        "decorator": {"operation": format!("{}:{port}/*", s.fqdn())}}],
                    "include_request_attempt_count": true})
            })
            .collect();
        vhosts.push(json!({"name": "allow_any", "domains": ["*"],
            "routes": [{"name": "allow_any", "match": {"prefix": "/"},
                "route": {"cluster": "PassthroughCluster", "timeout": "0s"}}]}));
        json!({"route_config": {"name": port.to_string(),
            "virtual_hosts": vhosts, "validate_clusters": false}})
    }

    /// The mesh's calls as a global-sidecar reports them (three requests per call; callers in the
    /// same namespace use the short name, as applications do), in messages of 100 entries.
    pub fn access_logs(&self) -> Vec<StreamAccessLogsMessage> {
        let mut entries = Vec::new();
        for (n, &(from, to)) in self.calls.iter().enumerate() {
            let (a, b) = (&self.services[from], &self.services[to]);
            let authority = authority(a, b);
            for k in 0..3u32 {
                let address = socket(&a.pod_ip, 40_000 + (n as u32 * 3 + k) % 20_000);
                entries.push(HttpAccessLogEntry {
                    common_properties: Some(AccessLogCommon {
                        downstream_remote_address: Some(address),
                        upstream_cluster: b.cluster(),
                        ..Default::default()
                    }),
                    request: Some(HttpRequestProperties {
                        authority: authority.clone(),
                        path: "/".into(),
                        user_agent: "demo".into(),
                        request_headers: [("slime-source-ns".to_string(), a.namespace.clone())].into(),
                        ..Default::default()
                    }),
                    response: Some(HttpResponseProperties {
                        response_code: Some(UInt32Value { value: 200 }),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
        }
        let mut messages = Vec::new();
        let mut rest = entries.into_iter().peekable();
        while rest.peek().is_some() {
            messages.push(StreamAccessLogsMessage {
                identifier: messages.is_empty().then(|| Identifier {
                    node: Some(Node {
                        id: "sidecar~10.0.0.1~global-sidecar-demo.mesh-operator~mesh-operator.svc.cluster.local"
                            .into(),
                        ..Default::default()
                    }),
                    log_name: crate::als::LOG_NAME.into(),
                }),
                log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
                    log_entry: rest.by_ref().take(100).collect(),
                })),
            });
        }
        messages
    }

    /// The full config istiod pushes to the global-sidecar (a proxy without a Sidecar, in
    /// INTERCEPTION_MODE=NONE), as xDS resources: per service an EDS cluster over ADS, its
    /// endpoints and a virtual host; per port an outbound listener on `127.0.0.1` whose routes
    /// come by RDS, ending in istiod's `allow_any` virtual host; and istiod's
    /// `PassthroughCluster` and `BlackHoleCluster`.
    pub fn xds(&self) -> Config {
        let mut clusters = BTreeMap::new();
        let mut endpoints = BTreeMap::new();
        let mut vhosts: BTreeMap<u16, Vec<VirtualHost>> = BTreeMap::new();
        for s in &self.services {
            let name = s.cluster();
            clusters.insert(name.clone(), pack(&eds_cluster(&name)));
            endpoints.insert(name.clone(), pack(&self.load_assignment(s)));
            vhosts.entry(s.port).or_default().push(virtual_host(s));
        }
        for (name, kind) in [
            (PASSTHROUGH_CLUSTER, DiscoveryType::OriginalDst),
            ("BlackHoleCluster", DiscoveryType::Static),
        ] {
            clusters.insert(name.into(), pack(&istio_cluster(name, kind)));
        }
        let mut routes = BTreeMap::new();
        let mut listeners = BTreeMap::new();
        for (port, vh) in vhosts {
            // As istiod binds them for a proxy with INTERCEPTION_MODE=NONE (the global-sidecar).
            let (route, listener) = outbound_port("127.0.0.1", port, vh);
            routes.insert(route.name.clone(), pack(&route));
            listeners.insert(listener.name.clone(), pack(&listener));
        }
        [
            (CLUSTER, clusters),
            (ENDPOINT, endpoints),
            (LISTENER, listeners),
            (ROUTE, routes),
        ]
        .into_iter()
        .map(|(t, r)| (t.to_string(), r))
        .collect()
    }

    /// A service's endpoints: its one pod.
    fn load_assignment(&self, s: &Service) -> ClusterLoadAssignment {
        let (ip, port) = self.endpoint(s);
        ClusterLoadAssignment {
            cluster_name: s.cluster(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket(&ip, port.into())),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }
}

/// A service's cluster in a config dump, as istiod renders it (mTLS when the peer has a
/// sidecar, plaintext otherwise).
fn dumped_cluster(s: &Service) -> Value {
    let name = s.cluster();
    json!({"cluster": {
        "name": name, "type": "EDS",
        "eds_cluster_config": {"eds_config": {"ads": {}, "initial_fetch_timeout": "0s",
            "resource_api_version": "V3"}, "service_name": name},
        "connect_timeout": "10s", "lb_policy": "LEAST_REQUEST",
        "circuit_breakers": {"thresholds": [{"max_connections": 4294967295u64,
            "max_pending_requests": 4294967295u64, "max_requests": 4294967295u64,
            "max_retries": 4294967295u64, "track_remaining": true}]},
        "common_lb_config": {},
        "metadata": {"filter_metadata": {"istio": {"services": [
            {"host": s.fqdn(), "name": s.name, "namespace": s.namespace}]}}},
        "filters": [{"name": "istio.metadata_exchange", "typed_config": {
            "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
            "type_url": "type.googleapis.com/io.istio.http.peer_metadata.Config"}}],
        "transport_socket_matches": [{"name": "tlsMode-istio",
            "match": {"tlsMode": "istio"},
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {
                    "alpn_protocols": ["istio-peer-exchange", "istio"],
                    "tls_certificate_sds_secret_configs": [{"name": "default"}],
                    "combined_validation_context": {"validation_context_sds_secret_config":
                        {"name": "ROOTCA"}}},
                "sni": format!("outbound_.{}_._.{}", s.port, s.fqdn())}}},
            {"name": "tlsMode-disabled", "match": {},
             "transport_socket": {"name": "envoy.transport_sockets.raw_buffer"}}]}})
}

/// A port's outbound listener in a config dump, its routes by RDS.
fn dumped_listener(port: u16) -> Value {
    json!({"active_state": {"listener": {
        "name": format!("0.0.0.0_{port}"),
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
            "typed_config": {"stat_prefix": format!("outbound_0.0.0.0_{port}"),
                "rds": {"config_source": {"ads": {}, "resource_api_version": "V3"},
                        "route_config_name": port.to_string()}}}]}],
        "traffic_direction": "OUTBOUND"}}})
}

/// A service's EDS cluster over ADS.
fn eds_cluster(name: &str) -> Cluster {
    Cluster {
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.into(),
        }),
        lb_policy: LbPolicy::LeastRequest as i32,
        ..istio_cluster(name, DiscoveryType::Eds)
    }
}

/// A cluster of a discovery type with istiod's connect timeout; istiod's `PassthroughCluster`
/// (original destination, its own load balancer) and `BlackHoleCluster` (static, empty) as they are.
fn istio_cluster(name: &str, kind: DiscoveryType) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(kind as i32)),
        connect_timeout: Some(ProtoDuration {
            seconds: 10,
            nanos: 0,
        }),
        lb_policy: if kind == DiscoveryType::OriginalDst {
            LbPolicy::ClusterProvided as i32
        } else {
            LbPolicy::RoundRobin as i32
        },
        ..Default::default()
    }
}

/// A service's virtual host: its names (FQDN, `name.namespace`, cluster IP) with and without the
/// port, every path to its cluster.
fn virtual_host(s: &Service) -> VirtualHost {
    let (fqdn, short) = (s.fqdn(), format!("{}.{}", s.name, s.namespace));
    VirtualHost {
        name: format!("{fqdn}:{}", s.port),
        domains: [fqdn, short, s.cluster_ip.clone()]
            .into_iter()
            .flat_map(|d| [format!("{d}:{}", s.port), d])
            .collect(),
        routes: vec![route_to(&s.cluster())],
        ..Default::default()
    }
}

/// The address of the `i`th pod when the mesh runs on loopback ([`Mesh::on_loopback`]).
pub fn loopback_pod_ip(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// Config from the ADS stream (`ads: {}`), as istiod's resources refer to each other.
fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

/// istiod's route for a service: every path to its cluster, no timeout.
pub fn route_to(cluster: &str) -> Route {
    Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
            timeout: Some(ProtoDuration::default()),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// istiod's outbound config for one port: the route configuration named after the port (the
/// services' virtual hosts, then `allow_any` to `PassthroughCluster`) and the `<bind>_<port>`
/// listener whose HTTP connection manager takes it by RDS.
pub fn outbound_port(
    bind: &str,
    port: u16,
    mut virtual_hosts: Vec<VirtualHost>,
) -> (RouteConfiguration, Listener) {
    virtual_hosts.push(VirtualHost {
        name: "allow_any".into(),
        domains: vec!["*".into()],
        routes: vec![route_to(PASSTHROUGH_CLUSTER)],
        ..Default::default()
    });
    let name = port.to_string();
    let hcm = HttpConnectionManager {
        stat_prefix: format!("outbound_{bind}_{port}"),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: name.clone(),
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(HttpFilterConfig::TypedConfig(pack(&Router::default()))),
            ..Default::default()
        }],
        ..Default::default()
    };
    let listener = Listener {
        name: format!("{bind}_{port}"),
        address: Some(socket(bind, port.into())),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack(&hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let route = RouteConfiguration {
        name,
        virtual_hosts,
        ..Default::default()
    };
    (route, listener)
}

/// The authority a caller asks for: the short name within its namespace (as applications do),
/// `name.namespace` across.
pub fn authority(from: &Service, to: &Service) -> String {
    if from.namespace == to.namespace {
        format!("{}:{}", to.name, to.port)
    } else {
        format!("{}.{}:{}", to.name, to.namespace, to.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_mesh_is_consistent() {
        for generated in [0, 1, 2, 60] {
            let mesh = Mesh::sample(generated);
            assert_eq!(mesh.services.len(), 4 + generated);
            assert!(mesh.calls.iter().all(|&(a, b)| a != b && b < mesh.services.len()));
            let ips: std::collections::BTreeSet<&str> =
                mesh.services.iter().map(|s| s.pod_ip.as_str()).collect();
            assert_eq!(ips.len(), mesh.services.len(), "pod IPs are unique");
        }
        assert_eq!(Mesh::sample(60).calls.len(), 3 + 120);
    }

    /// The resources the built-in upstream serves are the config dump `report` reads (plus
    /// istiod's two clusters not tied to a service), and they reference only each other.
    #[test]
    fn the_xds_config_matches_the_config_dump() {
        use prost::Message as _;
        for mesh in [
            Mesh::sample(30),
            Mesh::sample(30).on_loopback([1000, 2000], "127.0.0.1:3000".parse().unwrap()),
        ] {
            let xds = mesh.xds();
            let dump = mesh.config_dump();
            let dumped = |i: usize, list: &str| dump["configs"][i][list].as_array().unwrap().len();
            assert_eq!(xds[CLUSTER].len(), dumped(0, "dynamic_active_clusters") + 2);
            assert_eq!(xds[LISTENER].len(), dumped(1, "dynamic_listeners"));
            assert_eq!(xds[ROUTE].len(), dumped(2, "dynamic_route_configs"));
            assert_eq!(xds[ENDPOINT].len(), dumped(3, "dynamic_endpoint_configs"));
            for any in xds[ROUTE].values() {
                let rc = RouteConfiguration::decode(any.value.as_slice()).unwrap();
                for route in rc.virtual_hosts.iter().flat_map(|v| &v.routes) {
                    let Some(Action::Route(RouteAction {
                        cluster_specifier: Some(ClusterSpecifier::Cluster(c)),
                        ..
                    })) = &route.action
                    else {
                        panic!("{route:?}")
                    };
                    assert!(xds[CLUSTER].contains_key(c), "{c}");
                }
            }
            for any in xds[ENDPOINT].values() {
                let cla = ClusterLoadAssignment::decode(any.value.as_slice()).unwrap();
                let ep = &cla.endpoints[0].lb_endpoints[0];
                let Some(HostIdentifier::Endpoint(Endpoint { address, .. })) = &ep.host_identifier else {
                    panic!()
                };
                let port = crate::xds::adjust::socket_port(address.as_ref()).unwrap();
                assert_eq!(port == 3000, mesh.backend.is_some(), "{cla:?}");
            }
        }
    }
}
