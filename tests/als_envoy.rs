//! The access-log path end to end with real parts: a real Envoy with the gRPC access loggers the
//! relay installs (HTTP and TCP) sends its entries to `lazyload serve`'s collector; the learned
//! edges appear on `/debug/edges`, attributed with the snapshot's pod index.

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use lazyload::als::{ACCESS_LOG_CLUSTER, LOG_NAME};
use support::envoy::{Envoy, grpc_cluster, logged_http_listener};
use support::serve::Serve;
use support::{TempDir, free_port, http};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

/// The calling pods: productpage at 127.0.0.2, reviews at 127.0.0.3 (Linux routes all of
/// 127/8 to loopback, so each test client can have its own source address).
const SNAPSHOT: &str = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Service, metadata: {name: productpage, namespace: default}, spec: {selector: {app: productpage}, clusterIP: 10.96.0.1}}
- {apiVersion: v1, kind: Service, metadata: {name: reviews, namespace: default}, spec: {selector: {app: reviews}, clusterIP: 10.96.0.2}}
- {apiVersion: v1, kind: Service, metadata: {name: details, namespace: default}, spec: {selector: {app: details}, clusterIP: 10.96.0.3}}
- {apiVersion: v1, kind: Service, metadata: {name: ratings, namespace: default}, spec: {selector: {app: ratings}, clusterIP: 10.96.0.4}}
- {apiVersion: v1, kind: Pod, metadata: {name: productpage-1, namespace: default, labels: {app: productpage}}, status: {podIP: 127.0.0.2}}
- {apiVersion: v1, kind: Pod, metadata: {name: reviews-1, namespace: default, labels: {app: reviews}}, status: {podIP: 127.0.0.3}}
- apiVersion: microservice.slime.io/v1alpha1
  kind: ServiceFence
  metadata: {name: reviews, namespace: default}
  spec: {enable: true}
  status:
    metricStatus: {'{destination_service="known.default.svc.cluster.local"}': "1"}
    lastSeen: {known.default.svc.cluster.local: "2030-01-01T00:00:00Z"}
"#;

fn bootstrap(
    http_port: u16,
    tcp_port: u16,
    backend: SocketAddr,
    echo: SocketAddr,
    als: SocketAddr,
) -> String {
    let http_listener = logged_http_listener(
        "http",
        http_port,
        r#"            - name: details
              domains: ["details", "details.default", "details.default.svc.cluster.local", "details:*"]
              routes: [{match: {prefix: /}, route: {cluster: "outbound|9080||details.default.svc.cluster.local"}}]
            - name: reviews-v2
              domains: ["reviews", "reviews:*"]
              routes: [{match: {prefix: /}, route: {cluster: "outbound|9080|v2|reviews.default.svc.cluster.local"}}]
            - name: any
              domains: ["*"]
              routes: [{match: {prefix: /}, route: {cluster: PassthroughCluster}}]"#,
    );
    format!(
        r#"
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
static_resources:
  listeners:
{http_listener}
  - name: tcp
    address: {{socket_address: {{address: 127.0.0.1, port_value: {tcp_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: "outbound|3306||mysql.db.svc.cluster.local"
          access_log:
          - name: envoy.access_loggers.tcp_grpc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.TcpGrpcAccessLogConfig
              common_config:
                log_name: {LOG_NAME}
                transport_api_version: V3
                buffer_flush_interval: 0.1s
                grpc_service: {{envoy_grpc: {{cluster_name: {ACCESS_LOG_CLUSTER}}}}}
  clusters:
  - {cluster}
  - {cluster_v2}
  - {cluster_tcp}
  - name: PassthroughCluster
    type: STATIC
    load_assignment: {{cluster_name: PassthroughCluster, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {bip}, port_value: {bport}}}}}}}}}]}}]}}
  - {als_cluster}
"#,
        cluster = static_cluster("outbound|9080||details.default.svc.cluster.local", backend),
        cluster_v2 = static_cluster("outbound|9080|v2|reviews.default.svc.cluster.local", backend),
        cluster_tcp = static_cluster("outbound|3306||mysql.db.svc.cluster.local", echo),
        bip = backend.ip(),
        bport = backend.port(),
        als_cluster = grpc_cluster(ACCESS_LOG_CLUSTER, als),
    )
}

fn static_cluster(name: &str, addr: SocketAddr) -> String {
    format!(
        r#"{{name: "{name}", type: STATIC, load_assignment: {{cluster_name: "{name}", endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}}}]}}]}}}}"#,
        addr.ip(),
        addr.port()
    )
}

/// An HTTP/1.1 backend answering `200 ok` to every request.
async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = conn
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                    .await;
            });
        }
    });
    addr
}

/// A TCP echo server.
async fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Connects to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> tokio::net::TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// A GET from the loopback address `from`; the status line.
async fn get_from(from: &str, to: SocketAddr, headers: &[(&str, &str)]) -> String {
    let mut conn = connect_from(from, to).await;
    let mut req = String::from("GET /x HTTP/1.1\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    conn.read_to_end(&mut resp).await.unwrap();
    String::from_utf8_lossy(&resp)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn envoy_access_logs_teach_lazyload_serve() {
    let dir = TempDir::new("als-envoy");
    let snapshot = dir.path("cluster.yaml");
    std::fs::write(&snapshot, SNAPSHOT).unwrap();
    let als: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let serve = Serve::start(
        [
            "--als-listen",
            &als.to_string(),
            "--als-trust",
            "any",
            "--cluster-snapshot",
            snapshot.to_str().unwrap(),
        ],
        Stdio::inherit(),
    )
    .await;
    let admin = serve.admin;

    let (http_port, tcp_port) = (free_port(), free_port());
    let envoy = Envoy::start(
        "als",
        &bootstrap(http_port, tcp_port, backend().await, echo().await, als),
    )
    .await;
    let http_addr: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    let tcp_addr: SocketAddr = format!("127.0.0.1:{tcp_port}").parse().unwrap();

    // productpage: a short name completed with Slime-Source-Ns; `name.ns`; a VIP through the
    // catch-all (passthrough) route; an external host nothing allows.
    for headers in [
        vec![("host", "details"), ("slime-source-ns", "default")],
        vec![("host", "details.default")],
        vec![("host", "10.96.0.4:9080"), ("slime-orig-dest", "10.96.0.4:9080")],
        vec![("host", "unknown.example.net")],
    ] {
        let status = get_from("127.0.0.2", http_addr, &headers).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{headers:?}: {status}");
    }
    // reviews: a subset cluster, asked for by its short name.
    let status = get_from("127.0.0.3", http_addr, &[("host", "reviews")]).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    // reviews over TCP.
    let mut conn = connect_from("127.0.0.3", tcp_addr).await;
    conn.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).await.unwrap();
    drop(conn);
    // An unknown caller.
    let status = get_from("127.0.0.9", http_addr, &[("host", "details")]).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");

    let want_pp = [
        "details.default.svc.cluster.local",
        "ratings.default.svc.cluster.local",
    ];
    let want_reviews = [
        "known.default.svc.cluster.local",
        "mysql.db.svc.cluster.local",
        "reviews.default.svc.cluster.local",
    ];
    let edges = envoy
        .wait_for("learned edges", Duration::from_secs(20), || async {
            let body = http::get(admin, "/debug/edges", &[]).await.ok()?.body;
            let json: serde_json::Value = serde_json::from_str(&body).ok()?;
            let hosts = |fence: &str| -> Vec<String> {
                json[fence]["lastSeen"]
                    .as_object()
                    .map(|m| m.keys().cloned().collect())
                    .unwrap_or_default()
            };
            (hosts("default/productpage") == want_pp && hosts("default/reviews") == want_reviews)
                .then_some(json)
        })
        .await;
    assert_eq!(
        edges["default/productpage"]["metricStatus"][r#"{destination_service="details.default.svc.cluster.local"}"#],
        "1"
    );
    // The seeded edge kept its time: it was not relearned.
    assert_eq!(
        edges["default/reviews"]["lastSeen"]["known.default.svc.cluster.local"],
        "2030-01-01T00:00:00Z"
    );
    assert_eq!(edges.as_object().unwrap().len(), 2, "{edges:#}");

    let metrics = http::get(admin, "/metrics", &[]).await.unwrap().body;
    for line in [
        "lazyload_als_entries_total{kind=\"http\"} 6",
        "lazyload_als_entries_total{kind=\"tcp\"} 1",
        "lazyload_als_dropped_entries_total{reason=\"unknown_source\"} 1",
        "lazyload_als_dropped_entries_total{reason=\"external_not_allowed\"} 1",
        "lazyload_als_edges_learned_total 4",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
}
