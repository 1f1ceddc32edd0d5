//! Table tests of the adjustments: each one on a minimal resource, and idempotence.

use envoy_types::pb::envoy::config::core::v3::{Extension, Node};
use envoy_types::pb::envoy::config::route::v3::WeightedCluster;
use envoy_types::pb::envoy::config::route::v3::weighted_cluster::ClusterWeight;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::Rds;
use envoy_types::pb::envoy::extensions::wasm::v3::{PluginConfig, VmConfig, plugin_config::Vm};

use super::*;
use crate::demo::mesh::route_to;
use crate::xds::NodeInfo;

/// The adjuster for `node` under `settings` (the test owns both).
fn adjuster<'a>(settings: &'a Settings, node: &'a NodeInfo) -> Adjuster<'a> {
    Adjuster { settings, node }
}

fn settings() -> Settings {
    Settings {
        als_address: Some(("lazyload.mesh-operator.svc.cluster.local".into(), 8082)),
        ..Default::default()
    }
}

/// Istio's proxy under pilot-agent: it reports no extensions (older builds) and has
/// pilot-agent's `PROXY_CONFIG` metadata.
fn istio_proxy() -> NodeInfo {
    NodeInfo::from_node(Some(&node(Envoy::Istio, Bootstrap::PilotAgent)), None)
}

/// A stock Envoy with a plain bootstrap: a few extensions, none of Istio's, no pilot-agent.
fn stock() -> NodeInfo {
    NodeInfo::from_node(Some(&node(Envoy::Stock, Bootstrap::Plain)), None)
}

/// Which Envoy build a test node runs.
#[derive(Clone, Copy, Debug)]
enum Envoy {
    /// Istio's proxy build, reporting an `istio.*` extension.
    Istio,
    /// A stock build: a few extensions, none of Istio's.
    Stock,
}

/// Who wrote a test node's bootstrap.
#[derive(Clone, Copy, Debug)]
enum Bootstrap {
    /// pilot-agent (node metadata `PROXY_CONFIG`, an `sds-grpc` cluster).
    PilotAgent,
    /// A plain file such as `envoy/global-sidecar-bootstrap.yaml`.
    Plain,
}

fn node(envoy: Envoy, bootstrap: Bootstrap) -> Node {
    let ext = |name: &str, ty: &str| Extension {
        name: name.into(),
        type_urls: vec![ty.into()],
        ..Default::default()
    };
    let mut extensions = vec![
        ext(
            "envoy.filters.http.router",
            "envoy.extensions.filters.http.router.v3.Router",
        ),
        ext(
            "envoy.filters.http.wasm",
            "envoy.extensions.filters.http.wasm.v3.Wasm",
        ),
        ext(
            "envoy.filters.network.http_connection_manager",
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        ),
        ext(
            "envoy.transport_sockets.tls",
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        ),
    ];
    if let Envoy::Istio = envoy {
        extensions.push(ext("istio.stats", "stats.PluginConfig"));
    }
    let mut metadata = envoy_types::pb::google::protobuf::Struct::default();
    if let Bootstrap::PilotAgent = bootstrap {
        metadata.fields.insert(
            crate::xds::AGENT_METADATA.into(),
            envoy_types::pb::google::protobuf::Value {
                kind: Some(envoy_types::pb::google::protobuf::value::Kind::StructValue(
                    Default::default(),
                )),
            },
        );
    }
    Node {
        id: "gs".into(),
        extensions,
        metadata: Some(metadata),
        ..Default::default()
    }
}

fn any_named<M: Message + Name + Default>(type_url: &str) -> Any {
    Any {
        type_url: type_url.into(),
        value: M::default().encode_to_vec(),
    }
}

fn hcm_listener(address: &str, port: u32, http_filters: Vec<HttpFilter>) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: "outbound".into(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            route_config_name: port.to_string(),
            ..Default::default()
        })),
        http_filters,
        ..Default::default()
    };
    Listener {
        name: format!("{address}_{port}"),
        address: Some(socket(address, port)),
        filter_chains: vec![FilterChain {
            filters: vec![envoy_types::pb::envoy::config::listener::v3::Filter {
                name: HCM_NAME.into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack(&hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn hcm_of(l: &Listener) -> HttpConnectionManager {
    match &l.filter_chains[0].filters[0].config_type {
        Some(filter::ConfigType::TypedConfig(a)) => HttpConnectionManager::decode(&*a.value).unwrap(),
        _ => panic!("no HCM"),
    }
}

/// The first access logger of the listener's HTTP connection manager, as the gRPC one.
fn grpc_logger_of(l: &Listener) -> HttpGrpcAccessLogConfig {
    let Some(access_log::ConfigType::TypedConfig(cfg)) = &hcm_of(l).access_log[0].config_type else {
        panic!("no typed access logger")
    };
    HttpGrpcAccessLogConfig::decode(&*cfg.value).unwrap()
}

fn vhost(name: &str, domains: &[&str], routes: Vec<Route>) -> VirtualHost {
    VirtualHost {
        name: name.into(),
        domains: domains.iter().map(|d| d.to_string()).collect(),
        routes,
        ..Default::default()
    }
}

fn cluster_of(r: &Route) -> String {
    match &r.action {
        Some(Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(c)),
            ..
        })) => c.clone(),
        _ => String::new(),
    }
}

const GS: &str = "outbound|9080||global-sidecar.mesh-operator.svc.cluster.local";

#[test]
fn listeners_on_reserved_ports_are_dropped() {
    let (s, node) = (settings(), istio_proxy());
    let adj = adjuster(&s, &node);
    for (port, dropped) in [
        (15001, true),
        (15006, true),
        (15021, true),
        (15090, true),
        (9080, false),
        (15010, false),
    ] {
        let mut l = hcm_listener("0.0.0.0", port, vec![]);
        let out = adj.listener(&mut l, &mut Counts::default());
        assert_eq!(
            matches!(out, ListenerOutcome::Drop { .. }),
            dropped,
            "port {port}"
        );
    }
}

#[test]
fn loopback_listeners_are_rebound_and_get_the_access_logger_once() {
    let (s, node) = (settings(), istio_proxy());
    let adj = adjuster(&s, &node);
    let mut l = hcm_listener("127.0.0.1", 9080, vec![]);
    assert_eq!(
        adj.listener(&mut l, &mut Counts::default()),
        ListenerOutcome::Keep { changed: true }
    );
    assert_eq!(socket_address_mut(l.address.as_mut()).unwrap().address, "0.0.0.0");
    assert_eq!(hcm_of(&l).access_log.len(), 1);
    let cfg = grpc_logger_of(&l);
    assert_eq!(
        cfg.additional_request_headers_to_log,
        ["Slime-Orig-Dest", "Slime-Source-Ns"]
    );
    assert_eq!(cfg.common_config.unwrap().log_name, LOG_NAME);
    // Idempotent.
    assert_eq!(
        adj.listener(&mut l, &mut Counts::default()),
        ListenerOutcome::Keep { changed: false }
    );
    // Unbound listeners (iptables mode) keep their address.
    let mut unbound = hcm_listener("127.0.0.1", 9081, vec![]);
    unbound.bind_to_port = Some(BoolValue { value: false });
    adj.listener(&mut unbound, &mut Counts::default());
    assert_eq!(
        socket_address_mut(unbound.address.as_mut()).unwrap().address,
        "127.0.0.1"
    );
}

#[test]
fn stock_envoy_loses_istio_only_extensions() {
    let (s, node) = (settings(), stock());
    let adj = adjuster(&s, &node);
    assert!(adj.stock_envoy());
    let null_vm = Wasm {
        config: Some(PluginConfig {
            vm: Some(Vm::VmConfig(VmConfig {
                runtime: "envoy.wasm.runtime.null".into(),
                ..Default::default()
            })),
            ..Default::default()
        }),
    };
    let typed_struct = Any {
        type_url: TYPED_STRUCT[0].into(),
        value: TypedStruct {
            type_url: "type.googleapis.com/io.istio.http.peer_metadata.Config".into(),
        }
        .encode_to_vec(),
    };
    let filter = |name: &str, any: Any| HttpFilter {
        name: name.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any)),
        ..Default::default()
    };
    let filters = vec![
        filter("istio.metadata_exchange", pack(&null_vm)),
        filter(
            "istio.alpn",
            any_named::<Wasm>(
                "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
            ),
        ),
        filter("istio.peer", typed_struct),
        filter(
            "envoy.filters.http.router",
            any_named::<Wasm>("type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"),
        ),
    ];
    let mut l = hcm_listener("127.0.0.1", 9080, filters);
    adj.listener(&mut l, &mut Counts::default());
    let names: Vec<String> = hcm_of(&l).http_filters.iter().map(|f| f.name.clone()).collect();
    assert_eq!(names, ["envoy.filters.http.router"]);

    // The same listener for Istio's proxy keeps everything.
    let node = istio_proxy();
    let adj = adjuster(&s, &node);
    let mut l = hcm_listener(
        "127.0.0.1",
        9080,
        vec![filter("istio.alpn", any_named::<Wasm>("type.googleapis.com/x"))],
    );
    adj.listener(&mut l, &mut Counts::default());
    assert_eq!(hcm_of(&l).http_filters.len(), 1);
}

#[test]
fn prometheus_mode_removes_metadata_exchange() {
    let s = Settings {
        remove_metadata_exchange: true,
        ..settings()
    };
    let node = istio_proxy();
    let adj = adjuster(&s, &node);
    let f = HttpFilter {
        name: "istio.metadata_exchange".into(),
        ..Default::default()
    };
    let mut l = hcm_listener("127.0.0.1", 9080, vec![f]);
    adj.listener(&mut l, &mut Counts::default());
    assert!(hcm_of(&l).http_filters.is_empty());
}

#[test]
fn mtls_chain_is_added_in_front_of_the_plaintext_one() {
    let s = Settings {
        accept_mtls: true,
        ..settings()
    };
    for (node, sds_expected) in [(istio_proxy(), true), (stock(), false)] {
        let adj = adjuster(&s, &node);
        let mut l = hcm_listener("127.0.0.1", 9080, vec![]);
        adj.listener(&mut l, &mut Counts::default());
        assert_eq!(l.filter_chains.len(), 2);
        let tls = &l.filter_chains[1];
        assert_eq!(tls.filter_chain_match.as_ref().unwrap().transport_protocol, "tls");
        assert_eq!(
            l.filter_chains[0]
                .filter_chain_match
                .as_ref()
                .unwrap()
                .transport_protocol,
            "raw_buffer"
        );
        assert_eq!(l.listener_filters[0].name, TLS_INSPECTOR);
        let Some(transport_socket::ConfigType::TypedConfig(any)) =
            &tls.transport_socket.as_ref().unwrap().config_type
        else {
            panic!()
        };
        let ctx = DownstreamTlsContext::decode(&*any.value).unwrap();
        assert_eq!(ctx.require_client_certificate, Some(BoolValue { value: true }));
        let cert = &ctx.common_tls_context.unwrap().tls_certificate_sds_secret_configs[0];
        assert_eq!(cert.name, "default");
        assert_eq!(
            cert.sds_config.is_some(),
            sds_expected,
            "stock Envoy uses static secrets"
        );
        // Idempotent.
        let mut counts = Counts::default();
        assert_eq!(
            adj.listener(&mut l, &mut counts),
            ListenerOutcome::Keep { changed: false },
            "{counts:?}"
        );
        assert_eq!(l.filter_chains.len(), 2);
    }
}

#[test]
fn routes_never_lead_back_to_the_global_sidecar() {
    let (s, node) = (settings(), istio_proxy());
    let adj = adjuster(&s, &node);
    let weighted = Route {
        action: Some(Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::WeightedClusters(WeightedCluster {
                clusters: vec![ClusterWeight {
                    name: GS.into(),
                    ..Default::default()
                }],
                ..Default::default()
            })),
            ..Default::default()
        })),
        ..Default::default()
    };
    let mut rc = RouteConfiguration {
        name: "9080".into(),
        virtual_hosts: vec![
            vhost("sohu", &["*.sohu.com"], vec![route_to(GS)]),
            vhost(
                "egress",
                &["www.163.com"],
                vec![route_to("outbound|80||egress1.testns.svc.cluster.local")],
            ),
            vhost("allow_all", &["*"], vec![weighted, route_to(GS)]),
        ],
        ..Default::default()
    };
    assert!(adj.route(&mut rc, &mut Counts::default()));
    let names: Vec<&str> = rc.virtual_hosts.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["egress", "allow_any"]);
    let catch_all = &rc.virtual_hosts[1];
    assert_eq!(catch_all.domains, ["*"]);
    assert_eq!(cluster_of(&catch_all.routes[0]), PASSTHROUGH_CLUSTER);
    let Some(Action::Route(ra)) = &catch_all.routes[0].action else {
        panic!()
    };
    assert_eq!(ra.timeout, Some(Duration::default()));
    assert!(!adj.route(&mut rc, &mut Counts::default()), "idempotent");
}

#[test]
fn one_wildcard_host_routing_to_passthrough() {
    let (s, node) = (settings(), istio_proxy());
    let adj = adjuster(&s, &node);
    let block_all = Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(Action::DirectResponse(Default::default())),
        ..Default::default()
    };
    let mut rc = RouteConfiguration {
        virtual_hosts: vec![
            vhost("block_all", &["*"], vec![block_all]),
            vhost(
                "dispatch",
                &["*", "extra.example.com"],
                vec![route_to("outbound|80||egress.gw.svc.cluster.local")],
            ),
        ],
        ..Default::default()
    };
    adj.route(&mut rc, &mut Counts::default());
    let wildcards: Vec<&VirtualHost> = rc
        .virtual_hosts
        .iter()
        .filter(|v| v.domains.contains(&"*".to_string()))
        .collect();
    assert_eq!(wildcards.len(), 1);
    assert_eq!(
        cluster_of(&wildcards[0].routes[0]),
        PASSTHROUGH_CLUSTER,
        "REGISTRY_ONLY block_all replaced"
    );
    assert_eq!(
        rc.virtual_hosts.last().unwrap().domains,
        ["*"],
        "the catch-all is last"
    );
    assert!(
        rc.virtual_hosts
            .iter()
            .any(|v| v.domains == ["extra.example.com"])
    );
}

#[test]
fn short_names_route_by_source_namespace() {
    let (s, node) = (settings(), istio_proxy());
    let adj = adjuster(&s, &node);
    let mut rc = RouteConfiguration {
        name: "9080".into(),
        virtual_hosts: vec![
            vhost(
                "details.default.svc.cluster.local:9080",
                &["details.default.svc.cluster.local", "details.default"],
                vec![route_to("outbound|9080||details.default.svc.cluster.local")],
            ),
            vhost(
                "details.mesh-operator.svc.cluster.local:9080",
                &[
                    "details.mesh-operator.svc.cluster.local",
                    "details",
                    "details:9080",
                ],
                vec![route_to("outbound|9080||details.mesh-operator.svc.cluster.local")],
            ),
            vhost("allow_any", &["*"], vec![route_to(PASSTHROUGH_CLUSTER)]),
        ],
        ..Default::default()
    };
    assert!(adj.route(&mut rc, &mut Counts::default()));
    let short = rc
        .virtual_hosts
        .iter()
        .find(|v| v.name == "lazyload-short~details:9080")
        .unwrap();
    assert_eq!(short.domains, ["details", "details:9080"]);
    let guards: Vec<(String, Option<String>)> = short
        .routes
        .iter()
        .map(|r| {
            let ns = r
                .r#match
                .as_ref()
                .unwrap()
                .headers
                .first()
                .map(|h| match &h.header_match_specifier {
                    Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
                        match_pattern: Some(MatchPattern::Exact(v)),
                        ..
                    })) => v.clone(),
                    _ => String::new(),
                });
            (cluster_of(r), ns)
        })
        .collect();
    assert_eq!(
        guards,
        [
            (
                "outbound|9080||details.default.svc.cluster.local".to_string(),
                Some("default".to_string())
            ),
            (
                "outbound|9080||details.mesh-operator.svc.cluster.local".to_string(),
                Some("mesh-operator".to_string())
            ),
            (
                "outbound|9080||details.mesh-operator.svc.cluster.local".to_string(),
                None
            ),
            // A caller without the header is served as the `*` host would serve it.
            (PASSTHROUGH_CLUSTER.to_string(), None),
        ]
    );
    // No domain appears twice (Envoy rejects that).
    let mut all: Vec<&String> = rc.virtual_hosts.iter().flat_map(|v| &v.domains).collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n);
    assert!(!adj.route(&mut rc, &mut Counts::default()), "idempotent");
}

#[test]
fn passthrough_cluster_takes_its_destination_from_the_header() {
    let (s, node) = (settings(), istio_proxy());
    let adj = adjuster(&s, &node);
    let mut c = Cluster {
        name: PASSTHROUGH_CLUSTER.into(),
        ..Default::default()
    };
    assert!(adj.cluster_needs_decode(&c.encode_to_vec()));
    assert!(adj.cluster(&mut c, &mut Counts::default()));
    let Some(LbConfig::OriginalDstLbConfig(o)) = &c.lb_config else {
        panic!()
    };
    assert!(o.use_http_header);
    assert_eq!(o.http_header_name, crate::vocab::ORIG_DEST_HEADER);
    assert!(!adj.cluster(&mut c, &mut Counts::default()), "idempotent");
    let other = Cluster {
        name: "outbound|9080||details.default.svc.cluster.local".into(),
        ..Default::default()
    };
    assert!(
        !adj.cluster_needs_decode(&other.encode_to_vec()),
        "left as istiod's bytes"
    );
}

#[test]
fn stock_envoy_clusters_use_static_secrets() {
    let (s, node) = (settings(), stock());
    let adj = adjuster(&s, &node);
    let tls = agent_tls();
    let mut c = Cluster {
        name: "outbound|9080||details.default.svc.cluster.local".into(),
        transport_socket: Some(TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(pack(&tls))),
        }),
        ..Default::default()
    };
    assert!(adj.cluster_needs_decode(&c.encode_to_vec()));
    assert!(adj.cluster(&mut c, &mut Counts::default()));
    let Some(transport_socket::ConfigType::TypedConfig(any)) =
        &c.transport_socket.as_ref().unwrap().config_type
    else {
        panic!()
    };
    let tls = UpstreamTlsContext::decode(&*any.value).unwrap();
    assert_eq!(
        tls.common_tls_context.unwrap().tls_certificate_sds_secret_configs[0].sds_config,
        None
    );
}

#[test]
fn als_cluster_points_at_the_collector() {
    let (s, node) = (settings(), istio_proxy());
    let adj = adjuster(&s, &node);
    let c = adj.als_cluster().unwrap();
    assert_eq!(c.name, ACCESS_LOG_CLUSTER);
    assert_eq!(
        c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32))
    );
    let off = Settings::default();
    assert!(adjuster(&off, &node).als_cluster().is_none());
}

/// A TLS context whose certificate comes from pilot-agent's `sds-grpc`, as istiod writes it.
fn agent_tls() -> UpstreamTlsContext {
    UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![SdsSecretConfig {
                name: "default".into(),
                sds_config: Some(agent_sds_source()),
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A cluster as istiod writes it for a sidecar: Istio's metadata-exchange filter and a TLS
/// socket whose certificate comes from pilot-agent's `sds-grpc`.
fn istio_cluster() -> Cluster {
    use envoy_types::pb::envoy::config::cluster::v3::Filter as ClusterFilter;
    let tls = agent_tls();
    Cluster {
        name: "outbound|9080||details.default.svc.cluster.local".into(),
        filters: vec![ClusterFilter {
            name: "istio.metadata_exchange".into(),
            typed_config: Some(any_named::<Wasm>(
                "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange",
            )),
            ..Default::default()
        }],
        transport_socket: Some(TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(pack(&tls))),
        }),
        ..Default::default()
    }
}

fn certificate_source(c: &Cluster) -> Option<ConfigSource> {
    let Some(transport_socket::ConfigType::TypedConfig(any)) =
        &c.transport_socket.as_ref().unwrap().config_type
    else {
        panic!("no TLS socket")
    };
    let tls = UpstreamTlsContext::decode(&*any.value).unwrap();
    tls.common_tls_context.unwrap().tls_certificate_sds_secret_configs[0]
        .sds_config
        .clone()
}

/// Which Istio extensions go (the Envoy build) and where secrets come from (pilot-agent or
/// not) are separate decisions: pilot-agent + a stock Envoy strips Istio's filters and keeps
/// `sds-grpc`.
#[test]
fn extensions_and_secret_source_are_decided_separately() {
    let s = Settings {
        accept_mtls: true,
        ..settings()
    };
    for (envoy, bootstrap, strips, sds_kept) in [
        (Envoy::Istio, Bootstrap::PilotAgent, false, true),
        (Envoy::Stock, Bootstrap::PilotAgent, true, true),
        (Envoy::Stock, Bootstrap::Plain, true, false),
        (Envoy::Istio, Bootstrap::Plain, false, false),
    ] {
        let case = format!("{envoy:?} + {bootstrap:?}");
        let node = NodeInfo::from_node(Some(&node(envoy, bootstrap)), None);
        let adj = adjuster(&s, &node);
        assert_eq!(adj.stock_envoy(), strips, "{case}");
        assert_eq!(adj.static_secrets(), !sds_kept, "{case}");

        let mut c = istio_cluster();
        let needs_decode = adj.cluster_needs_decode(&c.encode_to_vec());
        let changed = adj.cluster(&mut c, &mut Counts::default());
        assert_eq!(needs_decode, changed, "{case}: decoded exactly when it changes");
        assert_eq!(c.filters.is_empty(), strips, "{case}: metadata exchange");
        assert_eq!(
            certificate_source(&c),
            sds_kept.then(agent_sds_source),
            "{case}: certificate source"
        );

        // A11's TLS chain takes its certificates from the same source.
        let alpn = HttpFilter {
            name: "istio.alpn".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(any_named::<Wasm>(
                "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
            ))),
            ..Default::default()
        };
        let mut l = hcm_listener("127.0.0.1", 9080, vec![alpn]);
        adj.listener(&mut l, &mut Counts::default());
        assert_eq!(hcm_of(&l).http_filters.is_empty(), strips, "{case}: istio.alpn");
        let tls = l
            .filter_chains
            .iter()
            .find_map(|c| match &c.transport_socket.as_ref()?.config_type {
                Some(transport_socket::ConfigType::TypedConfig(any)) => {
                    DownstreamTlsContext::decode(&*any.value).ok()
                }
                _ => None,
            })
            .expect("the A11 chain");
        assert_eq!(
            tls.common_tls_context.unwrap().tls_certificate_sds_secret_configs[0].sds_config,
            sds_kept.then(agent_sds_source),
            "{case}: A11 certificate source"
        );
    }
}

/// A10b: the global-sidecar's inbound listeners (istiod's NONE-mode shape for its own Service
/// ports) are dropped whatever their port; outbound ones on the same port stay and are rebound.
#[test]
fn inbound_listeners_are_dropped() {
    let (s, node) = (settings(), istio_proxy());
    let adj = adjuster(&s, &node);
    for (address, direction, dropped) in [
        ("0.0.0.0", TrafficDirection::Inbound, true),
        ("127.0.0.1", TrafficDirection::Inbound, true),
        ("127.0.0.1", TrafficDirection::Outbound, false),
        ("127.0.0.1", TrafficDirection::Unspecified, false),
        ("0.0.0.0", TrafficDirection::Outbound, false),
    ] {
        let mut l = hcm_listener(address, 9080, vec![]);
        l.traffic_direction = direction as i32;
        let mut counts = Counts::default();
        let out = adj.listener(&mut l, &mut counts);
        let expected = if dropped {
            ListenerOutcome::Drop {
                port: 9080,
                reason: DropReason::Inbound,
            }
        } else {
            ListenerOutcome::Keep { changed: true }
        };
        assert_eq!(out, expected, "{address} {direction:?}");
        assert_eq!(
            counts.0.get("listener_dropped_inbound").copied(),
            dropped.then_some(1),
            "{address} {direction:?}"
        );
    }
    // On a reserved port the reason stays A5.
    let mut virtual_inbound = hcm_listener("0.0.0.0", 15006, vec![]);
    virtual_inbound.traffic_direction = TrafficDirection::Inbound as i32;
    assert_eq!(
        adj.listener(&mut virtual_inbound, &mut Counts::default()),
        ListenerOutcome::Drop {
            port: 15006,
            reason: DropReason::ReservedPort
        }
    );
}

/// A6: the logger flushes well within 100 ms (Envoy's default is 1 s).
#[test]
fn access_logger_flushes_quickly() {
    let (s, node) = (settings(), istio_proxy());
    let adj = adjuster(&s, &node);
    let mut l = hcm_listener("127.0.0.1", 9080, vec![]);
    adj.listener(&mut l, &mut Counts::default());
    let common = grpc_logger_of(&l).common_config.unwrap();
    let interval = common.buffer_flush_interval.expect("a flush interval");
    let interval = std::time::Duration::new(interval.seconds as u64, interval.nanos as u32);
    assert!(
        interval > std::time::Duration::ZERO && interval <= std::time::Duration::from_millis(100),
        "{interval:?}"
    );
}
