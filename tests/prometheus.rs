//! The Prometheus source in `lazyload serve`: a local server speaking the Prometheus query API
//! returns recorded responses (first an error, then a result); the fence's `metricStatus`
//! appears on `/debug/edges`, with the query's placeholders substituted, and reaches the fence
//! itself (here the file sink; the API server path shares the status writer with access logs).

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lazyload::testing;
use support::serve::Serve;
use support::{TempDir, http};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A recorded answer of `sum(istio_requests_total{...}) by (destination_service)`.
const RECORDED: &str = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"destination_service":"details.default.svc.cluster.local"},"value":[1763870000.123,"17"]},{"metric":{"destination_service":"unknown"},"value":[1763870000.123,"2"]}]}}"#;
const RECORDED_ERROR: &str = r#"{"status":"error","errorType":"unavailable","error":"warming up"}"#;

/// Answers the first query with a 503, every later one with [`RECORDED`]; records the request
/// lines.
async fn fake_prometheus(seen: Arc<Mutex<Vec<String>>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&got)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                let first = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(line);
                    seen.len() == 1
                };
                let (status, body) = if first {
                    ("503 Service Unavailable", RECORDED_ERROR)
                } else {
                    ("200 OK", RECORDED)
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn prometheus_results_become_metric_status() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let prom = fake_prometheus(seen.clone()).await;
    let dir = TempDir::new("prometheus");
    let config = dir.path("config.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
name: lazyload
kind: lazyload
general: {{metricSourceType: prometheus}}
metric:
  prometheus:
    address: http://{prom}
    handlers:
      destination:
        query: sum(istio_requests_total{{source_app="$source_app",namespace="$namespace",reporter="destination"}})by(destination_service)
        type: Group
"#
        ),
    )
    .unwrap();
    let snapshot = dir.path("cluster.yaml");
    std::fs::write(
        &snapshot,
        r#"
- {apiVersion: microservice.slime.io/v1alpha1, kind: ServiceFence, metadata: {name: productpage, namespace: default}, spec: {enable: true}}
- {apiVersion: microservice.slime.io/v1alpha1, kind: ServiceFence, metadata: {name: off, namespace: default}, spec: {enable: false}}
"#,
    )
    .unwrap();
    let serve = Serve::offline(
        &snapshot,
        &dir.path("manifests"),
        &[
            "--prometheus-interval",
            "200ms",
            "--config",
            config.to_str().unwrap(),
        ],
    )
    .await;
    let admin = serve.admin;

    let key = r#"{destination_service="details.default.svc.cluster.local"}"#;
    let seen_so_far = &seen;
    let edges = testing::eventually(
        "metricStatus from prometheus",
        Duration::from_secs(20),
        || async move {
            let r = http::get(admin, "/debug/edges", &[])
                .await
                .map_err(|e| e.to_string())?;
            let json: serde_json::Value =
                serde_json::from_str(&r.body).map_err(|e| format!("{e}: {}", r.body))?;
            if json["default/productpage"]["metricStatus"][key] == "17" {
                Ok(json)
            } else {
                Err(format!("edges {json}; queries {:?}", seen_so_far.lock().unwrap()))
            }
        },
    )
    .await;
    // The `unknown` series is skipped, the disabled fence is not queried, and the host got a
    // last-seen time.
    assert_eq!(
        edges["default/productpage"]["metricStatus"]
            .as_object()
            .unwrap()
            .len(),
        1
    );
    assert!(edges["default/productpage"]["lastSeen"]["details.default.svc.cluster.local"].is_string());
    assert!(edges.get("default/off").is_none(), "{edges:#}");
    let queries = seen.lock().unwrap().clone();
    assert!(queries.len() >= 2, "the failed query was retried: {queries:?}");
    for q in &queries {
        assert!(
            q.starts_with("GET /api/v1/query?query=")
                && q.contains("source_app%3D%22productpage%22")
                && q.contains("namespace%3D%22default%22"),
            "{q}"
        );
    }
    // The fence got it, not only the debug view.
    let fence = dir.path("manifests/default/productpage.servicefence.yaml");
    testing::eventually(
        "the fence written with the results",
        Duration::from_secs(10),
        || {
            let text = std::fs::read_to_string(&fence).unwrap_or_default();
            let written = text.contains("details.default.svc.cluster.local") && text.contains(r#""17""#);
            std::future::ready(if written { Ok(()) } else { Err(text) })
        },
    )
    .await;
}
