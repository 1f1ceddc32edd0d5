//! The global-sidecar adjustments (`docs/design.md` A1-A11) as pure functions over decoded resources.
//!
//! The global-sidecar is an ordinary sidecar to istiod, so the mesh-wide fallback that sends
//! unknown hosts to the global-sidecar applies to it too; these functions undo that and make the
//! full config usable by a proxy that receives traffic on real ports. Every function is
//! idempotent: adjusting an adjusted resource changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::accesslog::v3::{AccessLog, access_log};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, LbConfig, LbPolicy, OriginalDstLbConfig,
};
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use envoy_types::pb::envoy::config::core::v3::grpc_service::{EnvoyGrpc, TargetSpecifier};
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{
    Address, ApiConfigSource, ApiVersion, ConfigSource, GrpcService, Http2ProtocolOptions, SocketAddress,
    TrafficDirection, TransportSocket, api_config_source::ApiType, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{
    FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::access_loggers::grpc::v3::{
    CommonGrpcAccessLogConfig, HttpGrpcAccessLogConfig,
};
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_filter,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, UpstreamTlsContext,
    common_tls_context::ValidationContextType,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration};
use prost::{Message, Name};

use super::{NodeInfo, SecretSource};
use crate::als::{ACCESS_LOG_CLUSTER, LOG_NAME, LOGGED_REQUEST_HEADERS};
use crate::vocab::host::is_global_sidecar;
use crate::vocab::{ORIG_DEST_HEADER, SOURCE_NS_HEADER};

/// The cluster istiod uses for unknown destinations.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// Ports a sidecar proxy itself binds (pilot-agent, Envoy admin, inbound/outbound capture, ...).
pub const RESERVED_PORTS: [u32; 10] = [
    15000, 15001, 15004, 15006, 15008, 15009, 15020, 15021, 15053, 15090,
];

/// How long the global-sidecar's gRPC access logger (A6) buffers entries before sending them.
/// Envoy's default is 1 s, which was most of the time from a first call to a learned Sidecar; at
/// 50 ms a first call reaches the collector well within 100 ms, for one timer tick per worker.
pub const ACCESS_LOG_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

const HCM_NAME: &str = "envoy.filters.network.http_connection_manager";
const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";
const TYPED_STRUCT: [&str; 2] = [
    "type.googleapis.com/udpa.type.v1.TypedStruct",
    "type.googleapis.com/xds.type.v3.TypedStruct",
];
const SDS_AGENT_CLUSTER: &str = "sds-grpc";
const SHORT_NAME_VHOST_PREFIX: &str = "lazyload-short~";

/// Settings of the adjustments (from the configuration and flags).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where the global-sidecar sends access logs (host, port); `None` disables A6.
    pub als_address: Option<(String, u16)>,
    /// Ports no listener may bind (A5).
    pub reserved_ports: BTreeSet<u32>,
    /// Address outbound listeners are rebound to (A10).
    pub rebind_address: String,
    /// Prometheus mode: remove `istio.metadata_exchange` (A7).
    pub remove_metadata_exchange: bool,
    /// Terminate callers' Istio mTLS on the rebound listeners (A11).
    pub accept_mtls: bool,
    /// The cluster domain (recognising `global-sidecar.<ns>.svc.<domain>` clusters, A1).
    pub cluster_domain: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            als_address: None,
            reserved_ports: RESERVED_PORTS.into_iter().collect(),
            rebind_address: "0.0.0.0".into(),
            remove_metadata_exchange: false,
            accept_mtls: false,
            cluster_domain: "cluster.local".into(),
        }
    }
}

/// Adjustments for one node: the settings plus what the node's Envoy supports.
#[derive(Clone, Copy, Debug)]
pub struct Adjuster<'a> {
    /// Settings.
    pub settings: &'a Settings,
    /// The node.
    pub node: &'a NodeInfo,
}

/// A virtual host istiod made for a Kubernetes service (A4 reads its name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ServiceHost<'v> {
    /// The service's name (the short name callers use).
    pub name: &'v str,
    /// Its namespace.
    pub namespace: &'v str,
    /// The port of the route configuration.
    pub port: &'v str,
}

/// What happened to a listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenerOutcome {
    /// Keep it; `changed` tells whether it must be re-encoded.
    Keep {
        /// Whether anything was modified.
        changed: bool,
    },
    /// Drop it.
    Drop {
        /// The port.
        port: u32,
        /// Why.
        reason: DropReason,
    },
}

/// Why a listener is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A5: it would bind a port the proxy uses itself.
    ReservedPort,
    /// A10b: an inbound listener of the global-sidecar's own Service.
    Inbound,
}

impl DropReason {
    /// How logs name it.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::ReservedPort => "reserved port",
            DropReason::Inbound => "inbound listener of the global-sidecar's own Service",
        }
    }
}

/// Counts of what the adjustments did, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts(pub BTreeMap<&'static str, u64>);

impl Counts {
    pub(crate) fn add(&mut self, what: &'static str) {
        *self.0.entry(what).or_default() += 1;
    }
}

impl Adjuster<'_> {
    /// Whether this node is a stock Envoy (it reported its extensions and none is Istio's): what
    /// it cannot load is removed (A9).
    pub fn stock_envoy(&self) -> bool {
        self.node.stock_envoy
    }

    /// Whether the node has no SDS server, so istiod's `sds-grpc` secrets must come from the
    /// bootstrap's static ones (A9). Independent of [`Adjuster::stock_envoy`].
    pub fn static_secrets(&self) -> bool {
        self.node.secrets == SecretSource::Static
    }

    /// A5, A6, A7, A9, A10, A10b, A11 on a listener.
    pub fn listener(&self, l: &mut Listener, counts: &mut Counts) -> ListenerOutcome {
        let Some(port) = socket_port(l.address.as_ref()) else {
            return ListenerOutcome::Keep { changed: false };
        };
        if self.settings.reserved_ports.contains(&port) {
            counts.add("listener_dropped_reserved_port");
            return ListenerOutcome::Drop {
                port,
                reason: DropReason::ReservedPort,
            };
        }
        if is_inbound(l) {
            counts.add("listener_dropped_inbound");
            return ListenerOutcome::Drop {
                port,
                reason: DropReason::Inbound,
            };
        }
        let mut changed = false;
        // A10: NONE-mode listeners are bound to 127.0.0.1; other pods must reach them.
        let mut rebound = false;
        if let Some(sa) = socket_address_mut(l.address.as_mut())
            && sa.address == "127.0.0.1"
            && l.bind_to_port.as_ref().is_none_or(|b| b.value)
            && sa.address != self.settings.rebind_address
        {
            sa.address = self.settings.rebind_address.clone();
            rebound = true;
            changed = true;
            counts.add("listener_rebound");
        }
        let chains = l.filter_chains.iter_mut().chain(l.default_filter_chain.as_mut());
        for chain in chains {
            changed |= self.filter_chain(chain, counts);
        }
        if self.stock_envoy() {
            let before = l.listener_filters.len();
            // The TLS inspector is what A11 relies on; every Envoy build has it.
            l.listener_filters.retain(|f| match &f.config_type {
                Some(listener_filter::ConfigType::TypedConfig(any)) => {
                    f.name == TLS_INSPECTOR || self.supported(any)
                }
                _ => true,
            });
            if l.listener_filters.len() != before {
                counts.add("unsupported_extension_removed");
                changed = true;
            }
        }
        if rebound && self.settings.accept_mtls && self.add_mtls_chains(l) {
            counts.add("listener_mtls_added");
            changed = true;
        }
        ListenerOutcome::Keep { changed }
    }

    fn filter_chain(&self, chain: &mut FilterChain, counts: &mut Counts) -> bool {
        let mut changed = false;
        let before = chain.filters.len();
        chain.filters.retain(|f| {
            let any = match &f.config_type {
                Some(filter::ConfigType::TypedConfig(any)) => Some(any),
                _ => None,
            };
            self.keeps_filter(&f.name, any)
        });
        if chain.filters.len() != before {
            counts.add("network_filter_removed");
            changed = true;
        }
        for f in &mut chain.filters {
            if let Some(filter::ConfigType::TypedConfig(any)) = &mut f.config_type
                && any.type_url == HttpConnectionManager::type_url()
                && let Ok(mut hcm) = HttpConnectionManager::decode(&*any.value)
                && self.http_connection_manager(&mut hcm, counts)
            {
                *any = pack(&hcm);
                changed = true;
            }
        }
        if self.static_secrets()
            && let Some(ts) = &mut chain.transport_socket
        {
            changed |= rewrite_transport_socket(ts);
        }
        changed
    }

    /// A7 and A9 for one network or HTTP filter: metadata exchange goes in Prometheus mode, and
    /// what this Envoy cannot load goes.
    fn keeps_filter(&self, name: &str, any: Option<&Any>) -> bool {
        !(self.settings.remove_metadata_exchange && is_metadata_exchange(name, any))
            && any.is_none_or(|a| self.supported(a))
    }

    fn http_connection_manager(&self, hcm: &mut HttpConnectionManager, counts: &mut Counts) -> bool {
        let mut changed = false;
        let before = hcm.http_filters.len();
        hcm.http_filters.retain(|f| {
            let any = match &f.config_type {
                Some(http_filter::ConfigType::TypedConfig(any)) => Some(any),
                _ => None,
            };
            self.keeps_filter(&f.name, any)
        });
        if hcm.http_filters.len() != before {
            counts.add("http_filter_removed");
            changed = true;
        }
        if let Some(logger) = self.access_logger()
            && !hcm
                .access_log
                .iter()
                .any(|a| a.name == logger.name && a.config_type == logger.config_type)
        {
            hcm.access_log.push(logger);
            counts.add("access_logger_added");
            changed = true;
        }
        changed
    }

    /// A6: the gRPC access logger every HTTP connection manager gets.
    fn access_logger(&self) -> Option<AccessLog> {
        self.settings.als_address.as_ref()?;
        let config = HttpGrpcAccessLogConfig {
            common_config: Some(CommonGrpcAccessLogConfig {
                log_name: LOG_NAME.into(),
                grpc_service: Some(GrpcService {
                    target_specifier: Some(TargetSpecifier::EnvoyGrpc(EnvoyGrpc {
                        cluster_name: ACCESS_LOG_CLUSTER.into(),
                        ..Default::default()
                    })),
                    ..Default::default()
                }),
                transport_api_version: ApiVersion::V3 as i32,
                buffer_flush_interval: Some(Duration {
                    seconds: ACCESS_LOG_FLUSH_INTERVAL.as_secs() as i64,
                    nanos: ACCESS_LOG_FLUSH_INTERVAL.subsec_nanos() as i32,
                }),
                ..Default::default()
            }),
            additional_request_headers_to_log: LOGGED_REQUEST_HEADERS.iter().map(|h| h.to_string()).collect(),
            ..Default::default()
        };
        Some(AccessLog {
            name: "envoy.access_loggers.http_grpc".into(),
            config_type: Some(access_log::ConfigType::TypedConfig(pack(&config))),
            ..Default::default()
        })
    }

    /// A6: the cluster that points at the access-log collector.
    pub fn als_cluster(&self) -> Option<Cluster> {
        let (host, port) = self.settings.als_address.as_ref()?;
        let is_ip = host.parse::<std::net::IpAddr>().is_ok();
        let http2 = HttpProtocolOptions {
            upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                ExplicitHttpConfig {
                    protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                        Http2ProtocolOptions::default(),
                    )),
                },
            )),
            ..Default::default()
        };
        Some(Cluster {
            name: ACCESS_LOG_CLUSTER.into(),
            connect_timeout: Some(Duration { seconds: 5, nanos: 0 }),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(if is_ip {
                DiscoveryType::Static as i32
            } else {
                DiscoveryType::StrictDns as i32
            })),
            typed_extension_protocol_options: [(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
                pack(&http2),
            )]
            .into(),
            load_assignment: Some(ClusterLoadAssignment {
                cluster_name: ACCESS_LOG_CLUSTER.into(),
                endpoints: vec![LocalityLbEndpoints {
                    lb_endpoints: vec![LbEndpoint {
                        host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                            address: Some(socket(host, u32::from(*port))),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// A11: a TLS filter chain in front of each plaintext HTTP chain, terminating the callers'
    /// Istio mTLS with the global-sidecar's own certificates; the plaintext chain stays.
    fn add_mtls_chains(&self, l: &mut Listener) -> bool {
        if l.filter_chains.iter().any(|c| {
            c.filter_chain_match
                .as_ref()
                .is_some_and(|m| m.transport_protocol == "tls")
        }) {
            return false;
        }
        let plaintext: Vec<FilterChain> = l
            .filter_chains
            .iter()
            .filter(|c| c.transport_socket.is_none() && c.filters.iter().any(|f| f.name == HCM_NAME))
            .cloned()
            .collect();
        if plaintext.is_empty() {
            return false;
        }
        let sds_source = (!self.static_secrets()).then(agent_sds_source);
        let secret = |name: &str| SdsSecretConfig {
            name: name.into(),
            sds_config: sds_source.clone(),
        };
        let tls = DownstreamTlsContext {
            common_tls_context: Some(CommonTlsContext {
                tls_certificate_sds_secret_configs: vec![secret("default")],
                validation_context_type: Some(ValidationContextType::ValidationContextSdsSecretConfig(
                    secret("ROOTCA"),
                )),
                alpn_protocols: vec!["h2".into(), "http/1.1".into()],
                ..Default::default()
            }),
            require_client_certificate: Some(BoolValue { value: true }),
            ..Default::default()
        };
        for chain in &mut l.filter_chains {
            if chain.transport_socket.is_none() && chain.filters.iter().any(|f| f.name == HCM_NAME) {
                chain
                    .filter_chain_match
                    .get_or_insert_with(Default::default)
                    .transport_protocol = "raw_buffer".into();
            }
        }
        for mut chain in plaintext {
            let m = chain
                .filter_chain_match
                .get_or_insert_with(FilterChainMatch::default);
            m.transport_protocol = "tls".into();
            chain.name = format!("{}-mtls", chain.name);
            chain.transport_socket = Some(TransportSocket {
                name: "envoy.transport_sockets.tls".into(),
                config_type: Some(transport_socket::ConfigType::TypedConfig(pack(&tls))),
            });
            l.filter_chains.push(chain);
        }
        if !l.listener_filters.iter().any(|f| f.name == TLS_INSPECTOR) {
            let inspector = envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector::default();
            l.listener_filters.insert(
                0,
                ListenerFilter {
                    name: TLS_INSPECTOR.into(),
                    config_type: Some(listener_filter::ConfigType::TypedConfig(pack(&inspector))),
                    ..Default::default()
                },
            );
        }
        true
    }

    /// A1, A2, A4 on a route configuration, from scratch ([`super::routes::RouteCache`] does the
    /// same incrementally on encoded configurations, reusing what it adjusted before).
    pub fn route(&self, rc: &mut RouteConfiguration, counts: &mut Counts) -> bool {
        let mut changed = false;
        for vh in &mut rc.virtual_hosts {
            if self.remove_routes_to_global_sidecar(vh) {
                counts.add("route_to_global_sidecar_removed");
                changed = true;
            }
        }
        let before = rc.virtual_hosts.len();
        rc.virtual_hosts.retain(|vh| !vh.routes.is_empty());
        changed |= rc.virtual_hosts.len() != before;
        changed |= self.short_names(rc, counts);
        changed |= ensure_passthrough_catch_all(rc, counts);
        changed
    }

    /// A1 on one virtual host: nothing may route back to the global-sidecar. Returns whether a
    /// route was removed.
    pub(crate) fn remove_routes_to_global_sidecar(&self, vh: &mut VirtualHost) -> bool {
        let before = vh.routes.len();
        vh.routes.retain(|r| !self.targets_global_sidecar(r));
        vh.routes.len() != before
    }

    fn targets_global_sidecar(&self, r: &Route) -> bool {
        let Some(Action::Route(ra)) = &r.action else {
            return false;
        };
        let is_gs = |cluster: &str| {
            cluster
                .rsplit('|')
                .next()
                .is_some_and(|host| is_global_sidecar(host, &self.settings.cluster_domain))
        };
        match &ra.cluster_specifier {
            Some(ClusterSpecifier::Cluster(c)) => is_gs(c),
            Some(ClusterSpecifier::WeightedClusters(w)) => w.clusters.iter().any(|c| is_gs(&c.name)),
            _ => false,
        }
    }

    /// The service a virtual host istiod named `<name>.<ns>.svc.<domain>:<port>` is for.
    pub(crate) fn service_of<'v>(&self, vhost_name: &'v str) -> Option<ServiceHost<'v>> {
        let (host, port) = vhost_name.rsplit_once(':')?;
        let (name, namespace) = host
            .strip_suffix(self.settings.cluster_domain.as_str())?
            .strip_suffix(".svc.")?
            .split_once('.')?;
        (!namespace.contains('.')).then_some(ServiceHost {
            name,
            namespace,
            port,
        })
    }

    /// A4: a caller in namespace N asking for the short name `reviews` must reach
    /// `reviews.N`. Istio only adds short names for the proxy's own namespace, so for every
    /// short name one virtual host collects the routes of each namespace's service, guarded by
    /// `Slime-Source-Ns: N`; istiod's own unguarded short-name routes follow, and last a
    /// catch-all to `PassthroughCluster`, so that a request without the header is served as the
    /// `*` virtual host would have served it.
    fn short_names(&self, rc: &mut RouteConfiguration, counts: &mut Counts) -> bool {
        // short name -> [(namespace, vhost index)]
        let mut by_short: BTreeMap<String, Vec<(String, usize)>> = BTreeMap::new();
        let mut port = None;
        for (i, vh) in rc.virtual_hosts.iter().enumerate() {
            let Some(service) = self.service_of(&vh.name) else {
                continue;
            };
            port = Some(service.port.to_string());
            by_short
                .entry(service.name.to_string())
                .or_default()
                .push((service.namespace.to_string(), i));
        }
        let Some(port) = port else { return false };
        if rc.virtual_hosts.iter().any(|vh| is_short_name_vhost(&vh.name)) {
            return false; // already adjusted
        }
        let mut added = Vec::new();
        for (short, services) in by_short {
            let mut short_vh = short_name_vhost(&short, &port);
            let mut own = Vec::new();
            for (ns, i) in &services {
                let vh = &mut rc.virtual_hosts[*i];
                let had_short = strip_short_domains(vh, &short_vh.domains);
                short_vh
                    .routes
                    .extend(vh.routes.iter().map(|r| guarded_by_source_namespace(r, ns)));
                if had_short {
                    own.extend(vh.routes.iter().cloned());
                }
            }
            short_vh.routes.extend(own);
            short_vh.routes.push(passthrough_catch_all());
            added.push(short_vh);
        }
        if added.is_empty() {
            return false;
        }
        counts.add("short_name_vhost_added");
        // Keep the catch-all last.
        let wildcard_at = rc.virtual_hosts.iter().position(is_wildcard);
        let at = wildcard_at.unwrap_or(rc.virtual_hosts.len());
        rc.virtual_hosts.splice(at..at, added);
        true
    }

    /// A3 and A9 on a cluster.
    pub fn cluster(&self, c: &mut Cluster, counts: &mut Counts) -> bool {
        let mut changed = false;
        if c.name == PASSTHROUGH_CLUSTER {
            let wanted = OriginalDstLbConfig {
                use_http_header: true,
                http_header_name: ORIG_DEST_HEADER.into(),
                ..Default::default()
            };
            let current = match &c.lb_config {
                Some(LbConfig::OriginalDstLbConfig(o)) => Some(o),
                _ => None,
            };
            if current != Some(&wanted) {
                c.cluster_discovery_type =
                    Some(ClusterDiscoveryType::Type(DiscoveryType::OriginalDst as i32));
                c.lb_policy = LbPolicy::ClusterProvided as i32;
                c.lb_config = Some(LbConfig::OriginalDstLbConfig(wanted));
                counts.add("passthrough_original_dst_header");
                changed = true;
            }
        }
        if self.stock_envoy() {
            let before = c.filters.len();
            c.filters
                .retain(|f| f.typed_config.as_ref().is_none_or(|a| self.supported(a)));
            if c.filters.len() != before {
                counts.add("cluster_filter_removed");
                changed = true;
            }
        }
        if self.static_secrets() {
            let sockets = c.transport_socket.iter_mut().chain(
                c.transport_socket_matches
                    .iter_mut()
                    .filter_map(|m| m.transport_socket.as_mut()),
            );
            for ts in sockets {
                if rewrite_transport_socket(ts) {
                    counts.add("sds_source_rewritten");
                    changed = true;
                }
            }
        }
        changed
    }

    /// Cheap check on an encoded cluster: does [`Adjuster::cluster`] need to see it? Clusters
    /// that need no change are passed through as istiod's bytes.
    pub fn cluster_needs_decode(&self, encoded: &[u8]) -> bool {
        contains(encoded, PASSTHROUGH_CLUSTER.as_bytes())
            || (self.static_secrets() && contains(encoded, SDS_AGENT_CLUSTER.as_bytes()))
            || (self.stock_envoy()
                && (contains(encoded, b"metadataexchange") || contains(encoded, b"TypedStruct")))
    }

    /// Whether the node can load an extension config (A9). Istio's null-VM Wasm plugins exist
    /// only in Istio's proxy build; TypedStructs are judged by the type they wrap.
    fn supported(&self, any: &Any) -> bool {
        if !self.stock_envoy() {
            return true;
        }
        if TYPED_STRUCT.contains(&any.type_url.as_str()) {
            return TypedStruct::decode(&*any.value).is_ok_and(|t| self.node.supports(&t.type_url));
        }
        if any.type_url == Wasm::type_url() {
            let null_vm = Wasm::decode(&*any.value).is_ok_and(|w| {
                w.config
                    .and_then(|c| match c.vm {
                        Some(envoy_types::pb::envoy::extensions::wasm::v3::plugin_config::Vm::VmConfig(
                            vm,
                        )) => Some(vm),
                        _ => None,
                    })
                    .is_some_and(|vm| vm.runtime == "envoy.wasm.runtime.null")
            });
            return !null_vm;
        }
        self.node.supports(&any.type_url)
    }
}

/// A10b: whether istiod built the listener for inbound traffic. In interception mode NONE,
/// once the global-sidecar's own Pod and Service exist, istiod binds one such listener per
/// Service port (`0.0.0.0_9080`, `traffic_direction: INBOUND`, chains to `inbound|9080||`),
/// on the very address the rebound outbound listener takes (A10): Envoy rejects the whole LDS
/// update (`duplicate address`), or, depending on push order, the inbound one wins and the
/// wormhole port no longer reaches the outbound routes. The global-sidecar serves no
/// application, and A11 terminates callers' mTLS on the rebound listeners, so its inbound
/// listeners have nothing to do: all of them are dropped, whatever the push order, which keeps
/// the decision per listener (a Delta push may carry either one alone).
fn is_inbound(l: &Listener) -> bool {
    l.traffic_direction == TrafficDirection::Inbound as i32
}

/// `udpa.type.v1.TypedStruct` / `xds.type.v3.TypedStruct`: only the wrapped type URL matters.
#[derive(Clone, PartialEq, Message)]
struct TypedStruct {
    #[prost(string, tag = "1")]
    type_url: String,
}

/// A2: exactly one `*` virtual host, last, whose catch-all route goes to `PassthroughCluster`
/// with no timeout (Envoy rejects two `*` hosts; without one unknown hosts fail).
pub(crate) fn ensure_passthrough_catch_all(rc: &mut RouteConfiguration, counts: &mut Counts) -> bool {
    let mut changed = false;
    let mut wildcard: Option<VirtualHost> = None;
    let mut rest = Vec::with_capacity(rc.virtual_hosts.len());
    for mut vh in std::mem::take(&mut rc.virtual_hosts) {
        if !is_wildcard(&vh) {
            rest.push(vh);
            continue;
        }
        match &mut wildcard {
            None => wildcard = Some(vh),
            Some(first) => {
                counts.add("duplicate_wildcard_merged");
                changed = true;
                first.routes.append(&mut vh.routes);
                vh.domains.retain(|d| d != "*");
                if !vh.domains.is_empty() {
                    rest.push(vh);
                }
            }
        }
    }
    let mut wildcard = wildcard.unwrap_or_else(|| {
        changed = true;
        counts.add("passthrough_vhost_added");
        VirtualHost {
            name: "allow_any".into(),
            domains: vec!["*".into()],
            ..Default::default()
        }
    });
    let mut has_catch_all = false;
    for r in &mut wildcard.routes {
        if is_catch_all(r.r#match.as_ref()) {
            has_catch_all = true;
            let wanted = passthrough_action();
            if !matches!(&r.action, Some(Action::Route(ra)) if ra.cluster_specifier == wanted.cluster_specifier && ra.timeout == wanted.timeout)
            {
                r.action = Some(Action::Route(wanted));
                changed = true;
            }
        }
    }
    if !has_catch_all {
        wildcard.routes.push(passthrough_catch_all());
        changed = true;
    }
    rest.push(wildcard);
    rc.virtual_hosts = rest;
    changed
}

/// Where unknown hosts go: `PassthroughCluster`, with no timeout.
fn passthrough_action() -> RouteAction {
    RouteAction {
        cluster_specifier: Some(ClusterSpecifier::Cluster(PASSTHROUGH_CLUSTER.into())),
        timeout: Some(Duration::default()),
        ..Default::default()
    }
}

/// The route every request no other route matched takes (A2).
pub(crate) fn passthrough_catch_all() -> Route {
    Route {
        name: "allow_any".into(),
        r#match: Some(RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(Action::Route(passthrough_action())),
        ..Default::default()
    }
}

/// Whether a virtual host serves every host (`*`).
pub(crate) fn is_wildcard(vh: &VirtualHost) -> bool {
    vh.domains.iter().any(|d| d == "*")
}

/// Whether a virtual host is one A4 added.
pub(crate) fn is_short_name_vhost(name: &str) -> bool {
    name.starts_with(SHORT_NAME_VHOST_PREFIX)
}

/// The A4 virtual host for a short name, without routes.
pub(crate) fn short_name_vhost(short: &str, port: &str) -> VirtualHost {
    VirtualHost {
        name: format!("{SHORT_NAME_VHOST_PREFIX}{short}:{port}"),
        domains: vec![short.to_string(), format!("{short}:{port}")],
        ..Default::default()
    }
}

/// Removes the short-name domains (they move to the A4 virtual host); returns whether the
/// virtual host had one (istiod's own short name, for the proxy's namespace).
pub(crate) fn strip_short_domains(vh: &mut VirtualHost, short_domains: &[String]) -> bool {
    let before = vh.domains.len();
    vh.domains.retain(|d| !short_domains.contains(d));
    vh.domains.len() != before
}

/// A route that only matches callers from namespace `ns` (A4).
pub(crate) fn guarded_by_source_namespace(r: &Route, ns: &str) -> Route {
    let mut guarded = r.clone();
    guarded
        .r#match
        .get_or_insert_with(RouteMatch::default)
        .headers
        // In lower case, as Envoy keeps header names (and HTTP/2 sends them).
        .push(exact_header(&SOURCE_NS_HEADER.to_ascii_lowercase(), ns));
    guarded
}

fn is_catch_all(m: Option<&RouteMatch>) -> bool {
    m.is_some_and(|m| {
        matches!(&m.path_specifier, Some(PathSpecifier::Prefix(p)) if p == "/" || p.is_empty())
            && m.headers.is_empty()
            && m.query_parameters.is_empty()
            && m.grpc.is_none()
            && m.runtime_fraction.is_none()
    })
}

fn exact_header(name: &str, value: &str) -> HeaderMatcher {
    HeaderMatcher {
        name: name.into(),
        header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(MatchPattern::Exact(value.into())),
            ignore_case: false,
        })),
        ..Default::default()
    }
}

fn is_metadata_exchange(name: &str, any: Option<&Any>) -> bool {
    name == "istio.metadata_exchange"
        || any.is_some_and(|a| {
            a.type_url.ends_with("metadataexchange.config.MetadataExchange")
                || (TYPED_STRUCT.contains(&a.type_url.as_str())
                    && TypedStruct::decode(&*a.value).is_ok_and(|t| t.type_url.contains("peer_metadata")))
        })
}

/// A9: secrets istiod points at pilot-agent's `sds-grpc` come from the bootstrap's static
/// secrets of the same name (`default`, `ROOTCA`) on a node without pilot-agent.
fn rewrite_transport_socket(ts: &mut TransportSocket) -> bool {
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &mut ts.config_type else {
        return false;
    };
    if any.type_url == UpstreamTlsContext::type_url() {
        if let Ok(mut up) = UpstreamTlsContext::decode(&*any.value)
            && up.common_tls_context.as_mut().is_some_and(rewrite_sds)
        {
            *any = pack(&up);
            return true;
        }
    } else if any.type_url == DownstreamTlsContext::type_url()
        && let Ok(mut down) = DownstreamTlsContext::decode(&*any.value)
        && down.common_tls_context.as_mut().is_some_and(rewrite_sds)
    {
        *any = pack(&down);
        return true;
    }
    false
}

fn rewrite_sds(ctx: &mut CommonTlsContext) -> bool {
    let mut changed = false;
    let mut fix = |s: &mut SdsSecretConfig| {
        if s.sds_config.as_ref().is_some_and(points_at_agent) {
            s.sds_config = None;
            changed = true;
        }
    };
    ctx.tls_certificate_sds_secret_configs
        .iter_mut()
        .for_each(&mut fix);
    match &mut ctx.validation_context_type {
        Some(ValidationContextType::ValidationContextSdsSecretConfig(s)) => fix(s),
        Some(ValidationContextType::CombinedValidationContext(c)) => {
            if let Some(s) = &mut c.validation_context_sds_secret_config {
                fix(s);
            }
        }
        _ => {}
    }
    changed
}

fn points_at_agent(source: &ConfigSource) -> bool {
    matches!(&source.config_source_specifier, Some(ConfigSourceSpecifier::ApiConfigSource(api))
        if api.grpc_services.iter().any(|g| matches!(&g.target_specifier,
            Some(TargetSpecifier::EnvoyGrpc(e)) if e.cluster_name == SDS_AGENT_CLUSTER)))
}

/// The SDS source pilot-agent serves (what istiod writes for workload certificates).
fn agent_sds_source() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(ConfigSourceSpecifier::ApiConfigSource(ApiConfigSource {
            api_type: ApiType::Grpc as i32,
            transport_api_version: ApiVersion::V3 as i32,
            grpc_services: vec![GrpcService {
                target_specifier: Some(TargetSpecifier::EnvoyGrpc(EnvoyGrpc {
                    cluster_name: SDS_AGENT_CLUSTER.into(),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            set_node_on_first_message_only: true,
            ..Default::default()
        })),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

/// Packs a message into an `Any`.
pub fn pack<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// A socket address `host:port`.
pub fn socket(host: &str, port: u32) -> Address {
    Address {
        address: Some(AddressKind::SocketAddress(SocketAddress {
            address: host.into(),
            port_specifier: Some(PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn socket_address_mut(a: Option<&mut Address>) -> Option<&mut SocketAddress> {
    match a?.address.as_mut()? {
        AddressKind::SocketAddress(sa) => Some(sa),
        _ => None,
    }
}

/// The port a listener address binds, if it is a socket address.
pub fn socket_port(a: Option<&Address>) -> Option<u32> {
    match a?.address.as_ref()? {
        AddressKind::SocketAddress(SocketAddress {
            port_specifier: Some(PortSpecifier::PortValue(p)),
            ..
        }) => Some(*p),
        _ => None,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

#[cfg(test)]
mod tests;
