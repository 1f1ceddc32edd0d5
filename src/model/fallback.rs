//! The fallback to the global-sidecar: the `to-global-sidecar` EnvoyFilter and the wormhole
//! ports it covers (auto-port).
//!
//! For every wormhole port P, a fenced workload's outbound route configuration `"P"` loses its
//! catch-all (`allow_any`, or `block_all` under `REGISTRY_ONLY`: Slime only removes the former, and
//! then Envoy rejects two `*` virtual hosts) and gains `allow_all`: unknown hosts go to
//! `outbound|P||global-sidecar.<ns>.svc.<domain>` with `Slime-Orig-Dest` and `Slime-Source-Ns`, so
//! the global-sidecar can forward them and report the call. `dispatches` route chosen domains
//! elsewhere first; a dispatch for `*` replaces the catch-all's target instead of adding a second
//! `*` virtual host.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

use super::autofence::{in_scope, is_own_service};
use crate::config::{Config, Dispatch, GlobalSidecarMode};
use crate::index::{ClusterIndex, ServicePort};
use crate::vocab::fence::LABEL_ISTIO_REV;
use crate::vocab::host::service_fqdn;
use crate::vocab::istio::{
    ConfigPatch, ConnectionPool, DestinationRule, DestinationRuleSpec, EnvoyFilter, EnvoyFilterSpec,
    HttpPool, IstioKind, IstioVersion, Patch, TrafficPolicy,
};
use crate::vocab::{GLOBAL_SIDECAR, ORIG_DEST_HEADER, SOURCE_NS_HEADER};

/// Name of the generated EnvoyFilter (Slime's).
pub const ENVOYFILTER_NAME: &str = "to-global-sidecar";

/// The EnvoyFilter's name: Slime's, or `to-global-sidecar-<revision>` for a lazyload with an Istio
/// revision, so that lazyloads for two revisions keep one each.
pub fn envoyfilter_name(cfg: &Config) -> String {
    cfg.global.per_revision(ENVOYFILTER_NAME)
}
/// Label on everything lazyload generates.
pub const LABEL_MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "lazyload");
/// Dispatch cluster meaning "the global-sidecar".
const GLOBAL_SIDECAR_CLUSTER: &str = "_GLOBAL_SIDECAR";

/// Whether a Service port carries HTTP (Istio's protocol selection: `appProtocol`, else the port
/// name's prefix); `grpc` and `http2` count with `supportH2`.
pub fn is_http_port(port: &ServicePort, support_h2: bool) -> bool {
    if port.protocol != "TCP" {
        return false;
    }
    let proto = port
        .app_protocol
        .clone()
        .unwrap_or_else(|| port.name.split('-').next().unwrap_or_default().to_string())
        .to_ascii_lowercase();
    proto == "http" || (support_h2 && (proto == "http2" || proto == "grpc" || proto == "grpc-web"))
}

/// Ports Istio keeps for itself (`15000`-`15099`: the sidecar's admin, inbound/outbound capture,
/// health, telemetry, istiod's xDS and webhooks): never an application's.
pub const ISTIO_PORTS: std::ops::RangeInclusive<u16> = 15000..=15099;

/// The wormhole ports: the configured ones, plus (with `autoPort`) the application ports: the
/// HTTP ports (by name or `appProtocol`) of the Services and ServiceEntries in the management
/// scope, but not lazyload's own Services, the global-sidecar's, nor Istio's ports. Ports only
/// grow (`previous` is kept) unless `cleanupWormholePort`.
pub fn wormhole_ports(cfg: &Config, index: &ClusterIndex, previous: &BTreeSet<u16>) -> BTreeSet<u16> {
    let g = &cfg.general;
    let mut ports = g.wormhole_port.clone();
    if g.auto_port {
        let managed =
            |namespace: &str| in_scope(namespace, index.namespace(namespace).map(|n| &n.labels), cfg);
        let services = index
            .services()
            .filter(|s| s.key.name != GLOBAL_SIDECAR && !is_own_service(s, cfg) && managed(&s.key.namespace));
        for svc in services {
            ports.extend(
                svc.ports
                    .iter()
                    .filter(|p| is_http_port(p, g.support_h2))
                    .map(|p| p.port)
                    .filter(|p| !ISTIO_PORTS.contains(p)),
            );
        }
        for se in index.service_entries().filter(|se| managed(&se.key.namespace)) {
            for (number, protocol) in &se.ports {
                let http =
                    protocol == "HTTP" || (g.support_h2 && (protocol == "HTTP2" || protocol == "GRPC"));
                if http
                    && let Ok(p) = u16::try_from(*number)
                    && !ISTIO_PORTS.contains(&p)
                {
                    ports.insert(p);
                }
            }
        }
        if !g.cleanup_wormhole_port {
            ports.extend(previous);
        }
    }
    ports
}

/// With `supportH2`, the DestinationRule of each global-sidecar telling the callers' sidecars to
/// speak their client's protocol to it (`useClientProtocol: true`, as Slime's chart ships it):
/// without it they send HTTP/1.1 upstream, and a gRPC (HTTP/2) call reaching the global-sidecar
/// is downgraded. Named `global-sidecar` (Slime's name), per revision like the EnvoyFilter.
pub fn global_sidecar_destination_rules(cfg: &Config) -> Vec<DestinationRule> {
    if !cfg.general.support_h2 {
        return Vec::new();
    }
    crate::model::scope::global_sidecar_namespaces(cfg)
        .into_iter()
        .map(|namespace| {
            let mut labels =
                BTreeMap::from([(LABEL_MANAGED_BY.0.to_string(), LABEL_MANAGED_BY.1.to_string())]);
            if let Some(rev) = cfg.global.own_rev() {
                labels.insert(LABEL_ISTIO_REV.to_string(), rev.to_string());
            }
            let mut dr = DestinationRule::new(
                &cfg.global.per_revision(GLOBAL_SIDECAR),
                &IstioVersion::V1beta1.resource(IstioKind::DestinationRule),
                DestinationRuleSpec {
                    host: service_fqdn(GLOBAL_SIDECAR, &namespace, &cfg.general.cluster_domain),
                    traffic_policy: Some(TrafficPolicy {
                        connection_pool: Some(ConnectionPool {
                            http: Some(HttpPool {
                                use_client_protocol: true,
                            }),
                        }),
                    }),
                },
            );
            dr.metadata = ObjectMeta {
                namespace: Some(namespace),
                labels: Some(labels),
                ..dr.metadata
            };
            dr
        })
        .collect()
}

/// The `to-global-sidecar` EnvoyFilters: one in Istio's root namespace (cluster mode) or one per
/// listed namespace (namespace mode).
pub fn envoyfilters(cfg: &Config, ports: &BTreeSet<u16>) -> Vec<EnvoyFilter> {
    let g = &cfg.general;
    let domain = &g.cluster_domain;
    let targets: Vec<(String, String)> = match g.global_sidecar_mode {
        GlobalSidecarMode::Cluster => {
            vec![(cfg.global.istio_namespace.clone(), g.cluster_gs_namespace.clone())]
        }
        GlobalSidecarMode::Namespace => g.namespace.iter().map(|ns| (ns.clone(), ns.clone())).collect(),
    };
    targets
        .into_iter()
        .map(|(namespace, gs_namespace)| {
            let gs_host = service_fqdn(GLOBAL_SIDECAR, &gs_namespace, domain);
            let patches = ports
                .iter()
                .flat_map(|port| port_patches(cfg, *port, &gs_host))
                .collect();
            let mut labels =
                BTreeMap::from([(LABEL_MANAGED_BY.0.to_string(), LABEL_MANAGED_BY.1.to_string())]);
            if let Some(rev) = cfg.global.own_rev() {
                labels.insert(LABEL_ISTIO_REV.to_string(), rev.to_string());
            }
            let mut ef = EnvoyFilter::new(
                &envoyfilter_name(cfg),
                &IstioVersion::V1alpha3.resource(IstioKind::EnvoyFilter),
                EnvoyFilterSpec {
                    config_patches: patches,
                    ..Default::default()
                },
            );
            ef.metadata = ObjectMeta {
                namespace: Some(namespace),
                labels: Some(labels),
                ..ef.metadata
            };
            ef
        })
        .collect()
}

/// The global-sidecar Service's ports: one per wormhole port, named `http-<port>`.
pub fn global_sidecar_service_ports(ports: &BTreeSet<u16>) -> Vec<k8s_openapi::api::core::v1::ServicePort> {
    ports
        .iter()
        .map(|p| k8s_openapi::api::core::v1::ServicePort {
            name: Some(format!("http-{p}")),
            port: i32::from(*p),
            protocol: Some("TCP".into()),
            target_port: Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(
                i32::from(*p),
            )),
            ..Default::default()
        })
        .collect()
}

fn matcher(cfg: &Config, port: u16, extra: Value) -> Value {
    let mut m = json!({
        "context": "SIDECAR_OUTBOUND",
        "routeConfiguration": {"name": port.to_string()},
    });
    if let Some(v) = &cfg.general.proxy_version {
        m["proxy"] = json!({"proxyVersion": v.as_str()});
    }
    merge(&mut m, extra);
    m
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn patch(apply_to: &str, matcher: Value, operation: &str, value: Option<Value>) -> ConfigPatch {
    ConfigPatch {
        apply_to: apply_to.into(),
        matcher: Some(matcher),
        patch: Some(Patch {
            operation: operation.into(),
            value,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A route to a dispatch target: the global-sidecar (with the headers it needs), the
/// passthrough cluster, or a named cluster.
fn route_to(cfg: &Config, cluster: &str, gs_cluster: &str, matcher: Value) -> Value {
    let to_gs = cluster == GLOBAL_SIDECAR_CLUSTER;
    let mut r = json!({
        "match": matcher,
        "route": {"cluster": if to_gs { gs_cluster } else { cluster }, "timeout": "0s"},
    });
    if to_gs {
        let mut headers = vec![
            json!({"header": {"key": ORIG_DEST_HEADER, "value": "%DOWNSTREAM_LOCAL_ADDRESS%"}, "append": false}),
        ];
        if !cfg.general.add_env_header_via_lua {
            headers.push(json!({"header": {"key": SOURCE_NS_HEADER, "value": "%ENVIRONMENT(POD_NAMESPACE)%"}, "append": false}));
        }
        r["request_headers_to_add"] = Value::Array(headers);
    }
    r
}

fn port_patches(cfg: &Config, port: u16, gs_host: &str) -> Vec<ConfigPatch> {
    let gs_cluster = format!("outbound|{port}||{gs_host}");
    let prefix = json!({"prefix": "/"});
    let mut patches = Vec::new();
    // Istio's catch-all is `allow_any`, or `block_all` under REGISTRY_ONLY: remove either.
    for vhost in ["allow_any", "block_all"] {
        patches.push(patch(
            "VIRTUAL_HOST",
            matcher(
                cfg,
                port,
                json!({"routeConfiguration": {"vhost": {"name": vhost}}}),
            ),
            "REMOVE",
            None,
        ));
    }
    let default_target = if cfg.general.passthrough_by_default {
        "PassthroughCluster"
    } else {
        GLOBAL_SIDECAR_CLUSTER
    };
    let mut catch_all_target = default_target.to_string();
    let mut vhosts = Vec::new();
    let mut regex_routes = Vec::new();
    for d in &cfg.general.dispatches {
        if let Some(re) = &d.domain_regex {
            let m = json!({"prefix": "/", "headers": [{"name": ":authority",
                "string_match": {"safe_regex": {"regex": re.as_str()}}}]});
            regex_routes.push(route_to(cfg, &d.cluster, &gs_cluster, m));
        }
        let (wildcard, domains) = split_wildcard(d);
        if wildcard {
            catch_all_target = d.cluster.clone();
        }
        if !domains.is_empty() {
            vhosts.push(json!({
                "name": d.name,
                "domains": domains,
                "routes": [route_to(cfg, &d.cluster, &gs_cluster, prefix.clone())],
            }));
        }
    }
    let mut routes = regex_routes;
    routes.push(route_to(cfg, &catch_all_target, &gs_cluster, prefix));
    vhosts.push(json!({"name": "allow_all", "domains": ["*"], "routes": routes}));
    patches.push(patch(
        "ROUTE_CONFIGURATION",
        matcher(cfg, port, json!({})),
        "MERGE",
        Some(json!({"virtual_hosts": vhosts})),
    ));
    if cfg.general.add_env_header_via_lua {
        patches.extend(lua_patches(cfg, port));
    }
    patches
}

/// A dispatch's `*` domain (handled by the catch-all) and its other domains.
fn split_wildcard(d: &Dispatch) -> (bool, Vec<String>) {
    let wildcard = d.domains.iter().any(|x| x == "*");
    (
        wildcard,
        d.domains.iter().filter(|x| *x != "*").cloned().collect(),
    )
}

/// `addEnvHeaderViaLua`: the caller's namespace set by a Lua filter from `POD_NAMESPACE`, enabled
/// on the fallback routes only.
fn lua_patches(cfg: &Config, port: u16) -> Vec<ConfigPatch> {
    let mut listener = json!({
        "context": "SIDECAR_OUTBOUND",
        "listener": {"portNumber": port, "filterChain": {"filter": {
            "name": "envoy.filters.network.http_connection_manager",
            "subFilter": {"name": "envoy.filters.http.router"}}}},
    });
    if let Some(v) = &cfg.general.proxy_version {
        listener["proxy"] = json!({"proxyVersion": v.as_str()});
    }
    let lua = json!({
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": "function envoy_on_request(h) end"},
            "source_codes": {"add.lua": {"inline_string": format!(
                "function envoy_on_request(request_handle)\n  request_handle:headers():replace(\"{SOURCE_NS_HEADER}\", os.getenv(\"POD_NAMESPACE\"))\nend\n")}},
        },
    });
    let per_route = json!({"typed_per_filter_config": {"envoy.filters.http.lua": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute",
        "name": "add.lua"}}});
    vec![
        patch("HTTP_FILTER", listener, "INSERT_BEFORE", Some(lua)),
        patch(
            "HTTP_ROUTE",
            matcher(
                cfg,
                port,
                json!({"routeConfiguration": {"vhost": {"name": "allow_all"}}}),
            ),
            "MERGE",
            Some(per_route),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{ServiceEntryInfo, ServiceInfo};
    use crate::vocab::ObjectKey;

    fn port(name: &str, port: u16, app: Option<&str>) -> ServicePort {
        ServicePort {
            name: name.into(),
            port,
            protocol: "TCP".into(),
            app_protocol: app.map(String::from),
        }
    }

    fn index() -> ClusterIndex {
        let mut idx = ClusterIndex::new("cluster.local");
        let svc = |ns: &str, name: &str, ports: Vec<ServicePort>| ServiceInfo {
            key: ObjectKey::new(ns, name),
            labels: Default::default(),
            selector: None,
            ports,
            cluster_ips: vec![],
        };
        idx.apply_service(svc(
            "default",
            "web",
            vec![port("http-web", 9080, None), port("tcp-db", 5432, None)],
        ));
        idx.apply_service(svc(
            "default",
            "api",
            vec![port("grpc", 9090, None), port("metrics", 8080, Some("http"))],
        ));
        idx.apply_service(svc(
            "mesh-operator",
            GLOBAL_SIDECAR,
            vec![port("http-80", 80, None)],
        ));
        idx.apply_service_entry(ServiceEntryInfo {
            key: ObjectKey::new("default", "ext"),
            hosts: vec!["www.163.com".into()],
            addresses: vec![],
            ports: vec![
                (8000, "HTTP".into()),
                (8443, "HTTPS".into()),
                (7000, "GRPC".into()),
            ],
            export_to: crate::index::ExportTo::All,
        });
        idx
    }

    #[test]
    fn support_h2_gives_each_global_sidecar_slimes_destination_rule() {
        let rules = |yaml: &str| {
            global_sidecar_destination_rules(&Config::parse(yaml).unwrap().config)
                .into_iter()
                .map(|dr| serde_json::to_value(dr).unwrap())
                .collect::<Vec<_>>()
        };
        assert!(rules("").is_empty());
        let cluster = rules("general:\n  supportH2: true\n");
        assert_eq!(
            cluster,
            [json!({
                "apiVersion": "networking.istio.io/v1beta1",
                "kind": "DestinationRule",
                "metadata": {"name": "global-sidecar", "namespace": "mesh-operator",
                             "labels": {"app.kubernetes.io/managed-by": "lazyload"}},
                "spec": {"host": "global-sidecar.mesh-operator.svc.cluster.local",
                         "trafficPolicy": {"connectionPool": {"http": {"useClientProtocol": true}}}}
            })]
        );
        let namespaced = rules(
            "general:\n  supportH2: true\n  globalSidecarMode: namespace\n  namespace: [a, b]\nglobal:\n  istioRev: canary\n",
        );
        let names: Vec<(&Value, &Value, &Value)> = namespaced
            .iter()
            .map(|d| {
                (
                    &d["metadata"]["namespace"],
                    &d["metadata"]["name"],
                    &d["spec"]["host"],
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                (
                    &json!("a"),
                    &json!("global-sidecar-canary"),
                    &json!("global-sidecar.a.svc.cluster.local")
                ),
                (
                    &json!("b"),
                    &json!("global-sidecar-canary"),
                    &json!("global-sidecar.b.svc.cluster.local")
                ),
            ]
        );
    }

    #[test]
    fn a_revision_names_and_labels_the_envoyfilter() {
        let ports = BTreeSet::from([9080]);
        let meta = |yaml: &str| {
            let ef = envoyfilters(&Config::parse(yaml).unwrap().config, &ports).remove(0);
            let rev = ef
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_ISTIO_REV))
                .cloned();
            (ef.metadata.name.unwrap_or_default(), rev)
        };
        assert_eq!(meta(""), ("to-global-sidecar".to_string(), None));
        assert_eq!(
            meta("global:\n  istioRev: 'canary,stable'\n"),
            ("to-global-sidecar-canary".to_string(), Some("canary".to_string()))
        );
    }

    #[test]
    fn http_ports_by_name_prefix_and_app_protocol() {
        assert!(is_http_port(&port("http", 80, None), false));
        assert!(is_http_port(&port("http-web", 80, None), false));
        assert!(is_http_port(&port("web", 80, Some("HTTP")), false));
        assert!(!is_http_port(&port("grpc-api", 80, None), false));
        assert!(is_http_port(&port("grpc-api", 80, None), true));
        assert!(is_http_port(&port("http2", 80, None), true));
        assert!(!is_http_port(&port("tcp", 80, None), true));
        let mut udp = port("http", 80, None);
        udp.protocol = "UDP".into();
        assert!(!is_http_port(&udp, false));
    }

    #[test]
    fn auto_port_grows_unless_cleanup() {
        let cfg = |yaml: &str| Config::parse(yaml).unwrap().config;
        let idx = index();
        let none = BTreeSet::new();
        let manual = cfg("general:\n  wormholePort: ['9080', '1234']\n");
        assert_eq!(
            wormhole_ports(&manual, &idx, &[5555].into()),
            [1234, 9080].into(),
            "no autoPort: as configured"
        );
        let auto = cfg("general:\n  autoPort: true\n  wormholePort: ['1234']\n");
        assert_eq!(
            wormhole_ports(&auto, &idx, &none),
            [1234, 8000, 8080, 9080].into(),
            "not the global-sidecar's 80"
        );
        assert_eq!(
            wormhole_ports(&auto, &idx, &[5555].into()),
            [1234, 5555, 8000, 8080, 9080].into(),
            "only grows"
        );
        let h2 = cfg("general:\n  autoPort: true\n  supportH2: true\n  cleanupWormholePort: true\n");
        assert_eq!(
            wormhole_ports(&h2, &idx, &[5555].into()),
            [7000, 8000, 8080, 9080, 9090].into(),
            "cleanup"
        );
    }

    /// Issue 15: with deploy/'s config (`autoPort`), lazyload took its own admin port 8081 (and
    /// would take any port of its own Services, the global-sidecar's, Istio's 150xx ones, or those
    /// of namespaces it does not manage): only application ports are wormhole ports.
    #[test]
    fn auto_port_takes_only_application_ports() {
        let mut idx = index();
        let svc = |ns: &str, name: &str, labels: &[(&str, &str)], ports: Vec<ServicePort>| ServiceInfo {
            key: ObjectKey::new(ns, name),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            selector: None,
            ports,
            cluster_ips: vec![],
        };
        // deploy/'s lazyload Services, in lazyload's namespace.
        idx.apply_service(svc(
            "mesh-operator",
            "lazyload-admin",
            &[],
            vec![port("http-admin", 8081, None)],
        ));
        idx.apply_service(svc(
            "mesh-operator",
            "lazyload",
            &[],
            vec![port("http-als", 8082, None)],
        ));
        // lazyload installed elsewhere is still lazyload.
        let own = [("app.kubernetes.io/name", "lazyload")];
        idx.apply_service(svc(
            "default",
            "lazyload-2",
            &own,
            vec![port("http-admin", 8083, None)],
        ));
        // Istio's ports, even when named HTTP (an ingress gateway's status port).
        idx.apply_service(svc("default", "gw", &[], vec![port("http-status", 15021, None)]));
        idx.apply_service(svc("team-b", "shop", &[], vec![port("http", 7070, None)]));
        idx.apply_service_entry(ServiceEntryInfo {
            key: ObjectKey::new("mesh-operator", "own"),
            hosts: vec!["x.example.com".into()],
            addresses: vec![],
            ports: vec![(8084, "HTTP".into()), (15000, "HTTP".into())],
            export_to: crate::index::ExportTo::All,
        });
        let cfg = |yaml: &str| Config::parse(yaml).unwrap().config;
        let auto = cfg("general:\n  autoPort: true\n  autoFence: true\n  defaultFence: true\n");
        assert_eq!(
            wormhole_ports(&auto, &idx, &BTreeSet::new()),
            [7070, 8000, 8080, 9080].into()
        );
        let scoped = cfg("general:\n  autoPort: true\n  blackNamespaceList: team-b\n");
        assert_eq!(
            wormhole_ports(&scoped, &idx, &BTreeSet::new()),
            [8000, 8080, 9080].into(),
            "only Services in the management scope"
        );
    }

    #[test]
    fn global_sidecar_service_ports_follow_the_wormhole_ports() {
        let ports = global_sidecar_service_ports(&[80, 9080].into());
        assert_eq!(ports.len(), 2);
        assert_eq!(ports[1].name.as_deref(), Some("http-9080"));
        assert_eq!(ports[1].port, 9080);
    }
}
