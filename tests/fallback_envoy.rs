//! The `to-global-sidecar` EnvoyFilter on a real Envoy: its patches applied to the recorded route
//! configuration `"9080"` of an Istio 1.18 sidecar (as istiod would), served to a stock Envoy 1.40
//! acting as a fenced workload. Envoy accepts it (one `*` virtual host, also when the mesh is
//! `REGISTRY_ONLY` and when a dispatch asks for `*`), and an unknown host goes to the
//! global-sidecar cluster with `Slime-Orig-Dest` and `Slime-Source-Ns`. With `supportH2`, the
//! global-sidecar's DestinationRule keeps a gRPC call HTTP/2 on its way to the global-sidecar, and
//! through a real global-sidecar Envoy it reaches its backend as HTTP/2 and is learned by
//! `lazyload serve`.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use lazyload::config::Config as LazyloadConfig;
use lazyload::fake_istiod::{Config, FakeIstiod};
use lazyload::model::fallback::envoyfilters;
use lazyload::xds::{CLUSTER, LISTENER, ROUTE};
use serde_json::{Value, json};
use support::envoy::{Envoy, grpc_cluster};
use support::envoyfilter::apply_route_patches;
use support::{fixtures, free_port, http};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GS_CLUSTER: &str = "outbound|9080||global-sidecar.mesh-operator.svc.cluster.local";

/// A backend that answers with the request headers it got.
async fn echo_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0; 16384];
                let mut n = 0;
                while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]).to_lowercase();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{head}",
                    head.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

fn static_cluster(name: &str, addr: SocketAddr) -> Value {
    json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
            {"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}}}}]}]}
    })
}

/// Route `"9080"` of the fixture, optionally with the mesh in `REGISTRY_ONLY` (Istio's
/// `block_all` instead of `allow_any`), patched by the EnvoyFilter for `config`.
fn patched_route(config: &str, registry_only: bool) -> Value {
    let dump = fixtures::load(&["dsb-geo-sidecar_istio-1.18.2_config_dump_without_listeners.json"]);
    let mut rc = dump.routes.iter().find(|r| r["name"] == "9080").unwrap().clone();
    if registry_only {
        for v in rc["virtual_hosts"].as_array_mut().unwrap() {
            if v["name"] == "allow_any" {
                *v = json!({"name": "block_all", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 502}}]});
            }
        }
    }
    let cfg = LazyloadConfig::parse(config).unwrap().config;
    let efs = envoyfilters(&cfg, &[9080].into());
    apply_route_patches(&efs[0], &mut rc);
    rc
}

async fn workload_envoy(route: Value, gs: SocketAddr) -> (Envoy, u16, FakeIstiod) {
    workload_envoy_with(route, static_cluster(GS_CLUSTER, gs)).await
}

/// [`workload_envoy`] with the global-sidecar cluster as given.
async fn workload_envoy_with(route: Value, gs_cluster: Value) -> (Envoy, u16, FakeIstiod) {
    let port = free_port();
    let listener = json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": "0.0.0.0_9080",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "outbound_0.0.0.0_9080",
            "rds": {"config_source": {"ads": {}, "resource_api_version": "V3"}, "route_config_name": "9080"},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]
    });
    let passthrough = json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": "PassthroughCluster", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "1s"
    });
    let by_name = |items: &[Value]| -> BTreeMap<String, envoy_types::pb::google::protobuf::Any> {
        items
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap().to_string(),
                    fixtures::any_from_json(v),
                )
            })
            .collect()
    };
    let mut config = Config::new();
    config.insert(LISTENER.into(), by_name(&[listener]));
    config.insert(ROUTE.into(), by_name(&[route]));
    config.insert(CLUSTER.into(), by_name(&[gs_cluster, passthrough]));
    let istiod = FakeIstiod::start(config).await.unwrap();
    let bootstrap = format!(
        r#"
node: {{id: "sidecar~127.0.0.1~productpage-v1-abc-def.default~default.svc.cluster.local", cluster: productpage.default}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - {}
"#,
        grpc_cluster("xds", istiod.addr)
    );
    let envoy = Envoy::start_with_env("workload", &bootstrap, &[("POD_NAMESPACE", "default")]).await;
    envoy
        .wait_for("the route configuration", Duration::from_secs(30), || async {
            let stats = envoy.stats("rds").await;
            let ok = stats
                .iter()
                .any(|(k, v)| k.ends_with("update_success") && *v >= 1);
            let rejected = stats
                .iter()
                .any(|(k, v)| k.ends_with("update_rejected") && *v > 0);
            (ok || rejected).then_some(())
        })
        .await;
    (envoy, port, istiod)
}

async fn check(config: &str, registry_only: bool) {
    let gs = echo_backend().await;
    let route = patched_route(config, registry_only);
    let wildcards = route["virtual_hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["domains"].as_array().unwrap().contains(&json!("*")))
        .count();
    assert_eq!(wildcards, 1, "exactly one `*` virtual host");
    let (envoy, port, _istiod) = workload_envoy(route, gs).await;
    let rejected: BTreeMap<String, i64> = envoy
        .stats("update_rejected")
        .await
        .into_iter()
        .filter(|(_, v)| *v != 0)
        .collect();
    assert!(rejected.is_empty(), "{rejected:?}\n{}", envoy.log());

    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let r = http::get(addr, "/", &[("Host", "unknown.example.com")])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", envoy.log());
    assert!(
        r.body.contains(&format!("slime-orig-dest: 127.0.0.1:{port}")),
        "{}",
        r.body
    );
    assert!(r.body.contains("slime-source-ns: default"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_hosts_go_to_the_global_sidecar() {
    check("", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_only_mesh_gets_one_catch_all_too() {
    check("", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_star_dispatch_retargets_the_catch_all() {
    // The Slime tutorial's dispatch list: `*.sohu.com` to the global-sidecar, the rest (`*`)
    // passthrough. A request for www.sohu.com reaches the global-sidecar with its headers.
    let config = "general:\n  dispatches:\n    - {name: sohu, domains: ['*.sohu.com'], cluster: _GLOBAL_SIDECAR}\n    - {name: default, domains: ['*'], cluster: PassthroughCluster}\n";
    let gs = echo_backend().await;
    let route = patched_route(config, false);
    let (envoy, port, _istiod) = workload_envoy(route, gs).await;
    let rejected: BTreeMap<String, i64> = envoy
        .stats("update_rejected")
        .await
        .into_iter()
        .filter(|(_, v)| *v != 0)
        .collect();
    assert!(rejected.is_empty(), "{rejected:?}\n{}", envoy.log());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let r = http::get(addr, "/", &[("Host", "www.sohu.com")]).await.unwrap();
    assert!(
        r.body.contains("slime-source-ns: default"),
        "{} {}",
        r.status,
        r.body
    );
}

/// A gRPC server standing in for the global-sidecar's upstream: it speaks HTTP/2 only (as a gRPC
/// backend does) and records the HTTP version and the `Slime-Orig-Dest` of each call it gets.
#[derive(Clone)]
struct GrpcBackend(std::sync::Arc<std::sync::Mutex<Vec<Call>>>);

/// What the backend saw of one call: the HTTP version and `Slime-Orig-Dest`.
type Call = (::http::Version, Option<String>);

impl tonic::server::NamedService for GrpcBackend {
    const NAME: &'static str = "test.Echo";
}

impl tonic::codegen::Service<::http::Request<tonic::body::Body>> for GrpcBackend {
    type Response = ::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ::http::Request<tonic::body::Body>) -> Self::Future {
        let orig = req
            .headers()
            .get("slime-orig-dest")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        self.0.lock().unwrap().push((req.version(), orig));
        // A trailers-only gRPC answer: OK, no message.
        let resp = ::http::Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "0")
            .body(tonic::body::Body::empty())
            .unwrap();
        std::future::ready(Ok(resp))
    }
}

async fn grpc_backend() -> (SocketAddr, GrpcBackend) {
    let backend = GrpcBackend(Default::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = tonic::service::Routes::new(backend.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (addr, backend)
}

/// A gRPC call (HTTP/2, prior knowledge) for `authority` to the workload Envoy's port 9080
/// listener: its host is unknown to the route configuration, so the fallback sends it to the
/// global-sidecar cluster.
/// Returns the call's `grpc-status` (Envoy answers a failed upstream with HTTP 200 and a
/// trailers-only gRPC error).
async fn grpc_call(port: u16, authority: &str) -> Result<String, String> {
    use tonic::codegen::Service as _;
    let mut channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .origin(format!("http://{authority}").parse().unwrap())
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let req = ::http::Request::builder()
        .method("POST")
        .uri(format!("http://{authority}/test.Echo/Call"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::empty())
        .unwrap();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| e.to_string())?;
    let resp = channel.call(req).await.map_err(|e| e.to_string())?;
    Ok(resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string())
}

/// What istiod renders into a cluster for a DestinationRule with `useClientProtocol: true`.
fn keep_client_protocol(cluster: &mut Value) {
    cluster["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "use_downstream_protocol_config": {"http_protocol_options": {}, "http2_protocol_options": {}}
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_support_h2_a_grpc_call_reaches_the_global_sidecar_as_http2() {
    // What istiod renders for the outbound global-sidecar cluster: by default HTTP/1.1 upstream;
    // with lazyload's DestinationRule (`useClientProtocol: true`) the downstream protocol.
    let cfg = LazyloadConfig::parse("general:\n  supportH2: true\n")
        .unwrap()
        .config;
    let rules = lazyload::model::fallback::global_sidecar_destination_rules(&cfg);
    let use_client_protocol = rules[0]
        .spec
        .traffic_policy
        .as_ref()
        .and_then(|t| t.connection_pool.as_ref())
        .and_then(|c| c.http.as_ref())
        .is_some_and(|h| h.use_client_protocol);
    assert_eq!(
        rules[0].spec.host,
        "global-sidecar.mesh-operator.svc.cluster.local"
    );
    for (client_protocol, reaches_as_h2) in [(use_client_protocol, true), (false, false)] {
        let (gs, backend) = grpc_backend().await;
        let mut cluster = static_cluster(GS_CLUSTER, gs);
        if client_protocol {
            keep_client_protocol(&mut cluster);
        }
        let (envoy, port, _istiod) = workload_envoy_with(patched_route("", false), cluster).await;
        let outcome = grpc_call(port, &format!("127.0.0.1:{port}")).await;
        let seen = backend.0.lock().unwrap().clone();
        if reaches_as_h2 {
            assert_eq!(outcome.as_deref(), Ok("0"), "{}", envoy.log());
            assert_eq!(seen.len(), 1, "{seen:?}");
            assert_eq!(seen[0].0, ::http::Version::HTTP_2);
            assert_eq!(seen[0].1.as_deref(), Some(&*format!("127.0.0.1:{port}")));
        } else {
            // Downgraded to HTTP/1.1, which a gRPC backend refuses: the call never arrives.
            assert!(seen.is_empty(), "{seen:?}");
            assert_ne!(outcome.as_deref(), Ok("0"));
        }
    }
}

/// The caller (productpage at 127.0.0.2) and the gRPC Service it calls.
const GRPC_SNAPSHOT: &str = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Service, metadata: {name: productpage, namespace: default}, spec: {selector: {app: productpage}, clusterIP: 10.96.0.1}}
- {apiVersion: v1, kind: Service, metadata: {name: grpc, namespace: default}, spec: {selector: {app: grpc}, clusterIP: 10.96.0.9, ports: [{name: grpc, port: 9080}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: productpage-1, namespace: default, labels: {app: productpage}}, status: {podIP: 127.0.0.2}}
- apiVersion: microservice.slime.io/v1alpha1
  kind: ServiceFence
  metadata: {name: productpage, namespace: default}
  spec: {enable: true}
"#;

/// A global-sidecar Envoy: the gRPC Service's route (HTTP/2 upstream, as istiod renders a `grpc`
/// port) and the access logger the relay installs, towards lazyload's collector at `als`.
fn global_sidecar_bootstrap(port: u16, backend: SocketAddr, als: SocketAddr) -> String {
    let listener = support::envoy::logged_http_listener(
        "gs",
        port,
        r#"            - name: grpc
              domains: ["grpc.default.svc.cluster.local", "grpc.default.svc.cluster.local:*"]
              routes: [{match: {prefix: /}, route: {cluster: "outbound|9080||grpc.default.svc.cluster.local"}}]"#,
    );
    let cluster = |name: &str, addr: SocketAddr| {
        format!(
            r#"{{name: "{name}", type: STATIC, typed_extension_protocol_options: {{envoy.extensions.upstreams.http.v3.HttpProtocolOptions: {{"@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, explicit_http_config: {{http2_protocol_options: {{}}}}}}}}, load_assignment: {{cluster_name: "{name}", endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}}}]}}]}}}}"#,
            addr.ip(),
            addr.port()
        )
    };
    format!(
        r#"
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
static_resources:
  listeners:
{listener}
  clusters:
  - {grpc}
  - {als_cluster}
"#,
        grpc = cluster("outbound|9080||grpc.default.svc.cluster.local", backend),
        als_cluster = cluster(lazyload::als::ACCESS_LOG_CLUSTER, als),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_through_the_global_sidecar_arrives_as_http2_and_is_learned() {
    let dir = support::TempDir::new("grpc-fallback");
    let snapshot = dir.path("cluster.yaml");
    std::fs::write(&snapshot, GRPC_SNAPSHOT).unwrap();
    let als: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let serve = support::serve::Serve::start(
        [
            "--als-listen",
            &als.to_string(),
            // The global-sidecar Envoy here sends from loopback, not from a global-sidecar pod.
            "--als-trust",
            "any",
            "--cluster-snapshot",
            snapshot.to_str().unwrap(),
        ],
        std::process::Stdio::inherit(),
    )
    .await;

    let (backend_addr, backend) = grpc_backend().await;
    let gs_port = free_port();
    let gs = Envoy::start(
        "global-sidecar",
        &global_sidecar_bootstrap(gs_port, backend_addr, als),
    )
    .await;
    // The caller's sidecar: the fallback route, and the global-sidecar cluster as istiod renders
    // it with lazyload's DestinationRule; its connections leave from the caller pod's IP.
    let mut cluster = static_cluster(GS_CLUSTER, format!("127.0.0.1:{gs_port}").parse().unwrap());
    keep_client_protocol(&mut cluster);
    cluster["upstream_bind_config"] = json!({"source_address": {"address": "127.0.0.2", "port_value": 0}});
    let (caller, port, _istiod) =
        workload_envoy_with(patched_route("general:\n  supportH2: true\n", false), cluster).await;

    let outcome = grpc_call(port, "grpc.default.svc.cluster.local:9080").await;
    assert_eq!(outcome.as_deref(), Ok("0"), "{}\n{}", caller.log(), gs.log());
    let seen = backend.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].0,
        ::http::Version::HTTP_2,
        "the backend got the call as HTTP/2"
    );

    let edges = gs
        .wait_for("the learned edge", Duration::from_secs(20), || async {
            let body = http::get(serve.admin, "/debug/edges", &[]).await.ok()?.body;
            let json: Value = serde_json::from_str(&body).ok()?;
            json["default/productpage"]["lastSeen"]
                .get("grpc.default.svc.cluster.local")
                .is_some()
                .then_some(json)
        })
        .await;
    assert_eq!(
        edges["default/productpage"]["metricStatus"][r#"{destination_service="grpc.default.svc.cluster.local"}"#],
        "1"
    );
}
