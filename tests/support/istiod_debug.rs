//! A stand-in for istiod's monitoring port (15014): the debug endpoints `istioctl proxy-status`
//! and `proxy-config` read, and `/metrics`, as istio/istio's `pilot/pkg/xds/debug.go` (1.17/1.18
//! line) serves them. Only those paths answer (anything else is a 404, as on istiod's mux):
//!
//! - `/debug/syncz`: `[{"cluster_id", "proxy", "istio_version", "<type>_sent", "<type>_acked"}]`.
//! - `/debug/config_dump?proxyID=<id>[&include_eds=true]`: the proxy's config in the shape of
//!   Envoy's admin config dump, built the way istiod builds it (dynamic resources only, in the
//!   order Bootstrap, Clusters, [Endpoints], Listeners, ScopedRoutes, Routes, Secrets; secrets'
//!   private keys redacted). 400 `You must provide a proxyID in the query string` without
//!   `proxyID`; 404 `Proxy not connected to this Pilot instance...` when no connection ID
//!   contains it (istiod matches by substring of `<proxy>-<n>`).
//! - `/debug/sidecarz?proxyID=<id>`: the SidecarScope (`name`, `namespace`, `sidecar`, ...;
//!   `default-sidecar` and `sidecar: null` without a Sidecar).
//! - `/metrics`: the Prometheus text given.
//!
//! The proxies' configs are cut from the recorded Envoy dump of `tests/fixtures/istio/`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const NO_PROXY_ID: &str = "You must provide a proxyID in the query string\n";
const NOT_CONNECTED: &str =
    "Proxy not connected to this Pilot instance. It may be connected to another instance.\n";
const VERSION: &str = "2026-12-04T23:00:00Z/42";

/// One connected proxy.
#[derive(Clone, Debug)]
pub struct Proxy {
    /// `<pod>.<namespace>`.
    pub id: String,
    /// The Sidecar that applies (`namespace`, `name`, its spec); none: istiod's default scope.
    pub sidecar: Option<(String, String, Value)>,
    /// The namespaces whose services it gets (`None`: all of them).
    pub namespaces: Option<Vec<String>>,
    /// Whether it acknowledged the last EDS push.
    pub endpoints_acked: bool,
    /// Listed by `/debug/syncz` but disconnected before its config is asked for (404 then).
    pub gone: bool,
}

impl Proxy {
    /// A connected, synced proxy seeing the whole mesh.
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_string(),
            sidecar: None,
            namespaces: None,
            endpoints_acked: true,
            gone: false,
        }
    }

    /// Scoped by Sidecar `name` (in the proxy's namespace) importing `<ns>/*` of `namespaces`.
    pub fn fenced(mut self, name: &str, namespaces: &[&str]) -> Self {
        let own = self.id.rsplit('.').next().unwrap_or_default().to_string();
        let hosts: Vec<String> = namespaces.iter().map(|ns| format!("{ns}/*")).collect();
        self.sidecar = Some((own, name.to_string(), json!({"egress": [{"hosts": hosts}]})));
        self.namespaces = Some(namespaces.iter().map(|ns| ns.to_string()).collect());
        self
    }
}

/// The recorded Envoy dump's dynamic resources: clusters, endpoints, listeners, routes, secrets.
pub struct Recorded {
    clusters: Vec<Value>,
    endpoints: Vec<Value>,
    listeners: Vec<Value>,
    routes: Vec<Value>,
    secrets: Vec<Value>,
}

impl Recorded {
    /// Reads `tests/fixtures/istio/dsb-geo-sidecar_istio-1.18.2_*`.
    pub fn load() -> Self {
        let dir = super::fixtures::fixtures_dir();
        let read = |f: &str| -> Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap()
        };
        let main = read("dsb-geo-sidecar_istio-1.18.2_config_dump_without_listeners.json");
        let listeners = read("dsb-geo-sidecar_istio-1.18.2_listeners_config_dump.json");
        let configs: Vec<Value> = main["configs"]
            .as_array()
            .unwrap()
            .iter()
            .chain(listeners["configs"].as_array().unwrap())
            .cloned()
            .collect();
        let pick = |list: &str, path: &[&str]| -> Vec<Value> {
            configs
                .iter()
                .filter_map(|c| c[list].as_array())
                .flatten()
                .filter_map(|e| path.iter().try_fold(e, |acc, k| acc.get(*k)).cloned())
                .collect()
        };
        Self {
            clusters: pick("dynamic_active_clusters", &["cluster"]),
            endpoints: pick("dynamic_endpoint_configs", &["endpoint_config"]),
            listeners: pick("dynamic_listeners", &["active_state", "listener"]),
            routes: pick("dynamic_route_configs", &["route_config"]),
            secrets: pick("dynamic_active_secrets", &["secret"]),
        }
    }

    /// What the dump holds: (clusters, endpoints, listeners, virtual hosts) for a proxy seeing
    /// `namespaces`.
    pub fn counts(&self, namespaces: Option<&[String]>) -> (usize, usize, usize, usize) {
        let c = self.scoped(namespaces);
        let endpoints = c.endpoints.iter().map(lb_endpoints).sum();
        let vhosts = c
            .routes
            .iter()
            .map(|r| r["virtual_hosts"].as_array().map_or(0, Vec::len))
            .sum();
        (c.clusters.len(), endpoints, c.listeners.len(), vhosts)
    }

    /// The resources a proxy importing only `namespaces` gets (istiod's scoping, roughly: the
    /// outbound clusters, endpoints, virtual hosts and listeners of those namespaces' services,
    /// plus everything not tied to a service).
    fn scoped(&self, namespaces: Option<&[String]>) -> Recorded {
        let visible = |host: &str| match namespaces {
            None => true,
            Some(list) => list.iter().any(|ns| host.contains(&format!(".{ns}.svc."))),
        };
        let cluster_visible = |name: &str| match name.split('|').nth(3) {
            Some(host) if name.starts_with("outbound|") => visible(host),
            _ => true,
        };
        let clusters: Vec<Value> = self
            .clusters
            .iter()
            .filter(|c| cluster_visible(c["name"].as_str().unwrap_or_default()))
            .cloned()
            .collect();
        let endpoints = self
            .endpoints
            .iter()
            .filter(|e| cluster_visible(e["cluster_name"].as_str().unwrap_or_default()))
            .cloned()
            .collect();
        let routes = self
            .routes
            .iter()
            .map(|r| {
                let mut r = r.clone();
                if let Some(vhosts) = r["virtual_hosts"].as_array_mut() {
                    vhosts.retain(|v| {
                        let name = v["name"].as_str().unwrap_or_default();
                        !name.contains(".svc.") || visible(name)
                    });
                }
                r
            })
            .collect();
        let listeners = self
            .listeners
            .iter()
            .filter(|l| {
                let text = l.to_string();
                !text.contains("outbound|")
                    || clusters
                        .iter()
                        .any(|c| text.contains(&format!("\"{}\"", c["name"].as_str().unwrap_or_default())))
            })
            .cloned()
            .collect();
        Recorded {
            clusters,
            endpoints,
            listeners,
            routes,
            secrets: self.secrets.clone(),
        }
    }

    /// istiod's `/debug/config_dump` of these resources.
    fn config_dump(&self, include_eds: bool) -> Value {
        let t = |name: &str| format!("type.googleapis.com/envoy.admin.v3.{name}");
        let mut configs = vec![
            json!({"@type": t("BootstrapConfigDump")}),
            json!({
                "@type": t("ClustersConfigDump"),
                "version_info": VERSION,
                "dynamic_active_clusters": self.clusters.iter().map(|c| json!({"cluster": c})).collect::<Vec<_>>(),
            }),
        ];
        if include_eds {
            configs.push(json!({
                "@type": t("EndpointsConfigDump"),
                "dynamic_endpoint_configs": self.endpoints.iter()
                    .map(|e| json!({"version_info": VERSION, "endpoint_config": e})).collect::<Vec<_>>(),
            }));
        }
        configs.push(json!({
            "@type": t("ListenersConfigDump"),
            "version_info": VERSION,
            "dynamic_listeners": self.listeners.iter().map(|l| json!({
                "name": l["name"],
                "active_state": {"version_info": VERSION, "listener": l},
            })).collect::<Vec<_>>(),
        }));
        configs.push(json!({"@type": t("ScopedRoutesConfigDump")}));
        configs.push(json!({
            "@type": t("RoutesConfigDump"),
            "dynamic_route_configs": self.routes.iter()
                .map(|r| json!({"version_info": VERSION, "route_config": r})).collect::<Vec<_>>(),
        }));
        configs.push(json!({
            "@type": t("SecretsConfigDump"),
            "dynamic_active_secrets": self.secrets.iter().map(|s| {
                let mut s = s.clone();
                if let Some(cert) = s.get_mut("tls_certificate") {
                    cert["private_key"] = json!({"inline_bytes": "W3JlZGFjdGVkXQ=="});
                }
                json!({"version_info": VERSION, "secret": s})
            }).collect::<Vec<_>>(),
        }));
        json!({ "configs": configs })
    }
}

fn lb_endpoints(cla: &Value) -> usize {
    cla["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| l["lb_endpoints"].as_array().map_or(0, Vec::len))
        .sum()
}

struct Mesh {
    recorded: Recorded,
    proxies: Vec<Proxy>,
    metrics: String,
}

impl Mesh {
    /// istiod's `getProxyConnection`: the first connection whose ID (`<proxy>-<n>`) contains
    /// the requested ID.
    fn connection(&self, query: &BTreeMap<String, String>) -> Result<&Proxy, (StatusCode, &'static str)> {
        let id = query.get("proxyID").filter(|id| !id.is_empty());
        let Some(id) = id else {
            return Err((StatusCode::BAD_REQUEST, NO_PROXY_ID));
        };
        self.proxies
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.gone)
            .find(|(n, p)| format!("{}-{}", p.id, n + 1).contains(id.as_str()))
            .map(|(_, p)| p)
            .ok_or((StatusCode::NOT_FOUND, NOT_CONNECTED))
    }
}

fn json_response(v: Value) -> Response {
    ([("content-type", "application/json")], v.to_string()).into_response()
}

/// A running stand-in; stopped when dropped.
pub struct IstiodDebug {
    /// Its address (`http://<addr>` is what `--istiod` takes).
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for IstiodDebug {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl IstiodDebug {
    /// Serves `proxies` (their configs cut from `recorded`) and `metrics` on 127.0.0.1:0.
    pub async fn start(recorded: Recorded, proxies: Vec<Proxy>, metrics: String) -> Self {
        let mesh = Arc::new(Mesh {
            recorded,
            proxies,
            metrics,
        });
        let app = axum::Router::new()
            .route("/debug/syncz", get(syncz))
            .route("/debug/config_dump", get(config_dump))
            .route("/debug/sidecarz", get(sidecarz))
            .route(
                "/metrics",
                get(|State(m): State<Arc<Mesh>>| async move { m.metrics.clone() }),
            )
            .with_state(mesh);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { until.cancelled().await })
                .await
                .unwrap();
        });
        Self { addr, stop }
    }
}

async fn syncz(State(mesh): State<Arc<Mesh>>) -> Response {
    let nonce = format!("{VERSION}-nonce");
    let list: Vec<Value> = mesh
        .proxies
        .iter()
        .map(|p| {
            json!({
                "cluster_id": "Kubernetes",
                "proxy": p.id,
                "istio_version": "1.18.2",
                "cluster_sent": nonce, "cluster_acked": nonce,
                "listener_sent": nonce, "listener_acked": nonce,
                "route_sent": nonce, "route_acked": nonce,
                "endpoint_sent": nonce,
                "endpoint_acked": if p.endpoints_acked { nonce.clone() } else { "old".to_string() },
            })
        })
        .collect();
    json_response(Value::Array(list))
}

async fn config_dump(State(mesh): State<Arc<Mesh>>, Query(q): Query<BTreeMap<String, String>>) -> Response {
    let proxy = match mesh.connection(&q) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let include_eds = q.get("include_eds").is_some_and(|v| v == "true");
    json_response(
        mesh.recorded
            .scoped(proxy.namespaces.as_deref())
            .config_dump(include_eds),
    )
}

async fn sidecarz(State(mesh): State<Arc<Mesh>>, Query(q): Query<BTreeMap<String, String>>) -> Response {
    let proxy = match mesh.connection(&q) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let own_namespace = proxy.id.rsplit('.').next().unwrap_or_default();
    let (name, sidecar) = match &proxy.sidecar {
        Some((_, name, spec)) => (name.as_str(), spec.clone()),
        None => ("default-sidecar", Value::Null),
    };
    json_response(json!({
        "version": VERSION,
        "rootNamespace": "istio-system",
        "name": name,
        "namespace": own_namespace,
        "outboundTrafficPolicy": {"mode": "ALLOW_ANY"},
        "services": [],
        "sidecar": sidecar,
        "destinationRules": {},
    }))
}
