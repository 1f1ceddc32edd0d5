//! `generate` writes the fallback objects — the `to-global-sidecar` EnvoyFilter and the
//! global-sidecar Service ports — exactly as the fallback controller applies them to a cluster
//! that has none yet (the controller runs against a mock API server here).

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;

use http::{Method, Request, Response};
use kube::client::Body;
use lazyload::cluster::ClusterState;
use lazyload::cluster::writer::FallbackWriter;
use lazyload::config::Config;
use lazyload::index::snapshot::Snapshot;
use lazyload::reconcile::fallback::FallbackController;
use lazyload::testing;
use serde_json::{Value, json};
use tower_test::mock;

const CONFIG: &str =
    "general:\n  autoFence: true\n  defaultFence: true\n  autoPort: true\n  wormholePort: ['9080', '7070']\n";

/// Every object the controller applies, by request path (an empty cluster: the EnvoyFilter it
/// reads first is not there).
async fn controller_applies(config: &Config, snapshot: Snapshot) -> BTreeMap<String, Value> {
    let state = ClusterState::new(snapshot.index, snapshot.fences);
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let mut ctl = FallbackController::new(
        state,
        Arc::new(config.clone()),
        FallbackWriter::new(kube::Client::new(service, "default")),
    );
    let server = tokio::spawn(async move {
        let mut applied = BTreeMap::new();
        while let Some((req, send)) = handle.next_request().await {
            let (method, path) = (req.method().clone(), req.uri().path().to_string());
            let body: Value = serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap())
                .unwrap_or(Value::Null);
            let (status, reply) = if method == Method::GET {
                let name = path.rsplit('/').next().unwrap_or_default().to_string();
                (
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": format!("envoyfilters.networking.istio.io \"{name}\" not found"),
                           "reason": "NotFound", "details": {"name": name, "group": "networking.istio.io", "kind": "envoyfilters"},
                           "code": 404}),
                )
            } else {
                assert_eq!(method, Method::PATCH, "{path}");
                applied.insert(path, body.clone());
                (200, body)
            };
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
        applied
    });
    assert!(ctl.sync().await.unwrap(), "the controller wrote nothing");
    drop(ctl);
    server.await.unwrap()
}

#[tokio::test]
async fn generate_writes_what_the_fallback_controller_applies() {
    let dir = support::TempDir::new("generate-fallback");
    let config_path = dir.path("config.yaml");
    std::fs::write(&config_path, CONFIG).unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/generate");
    let out = dir.path("out");
    let run = Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .args(["generate", "-c", config_path.to_str().unwrap()])
        .args([
            "--cluster-snapshot",
            fixtures.join("cluster.yaml").to_str().unwrap(),
        ])
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("wrote 1 to-global-sidecar EnvoyFilters and 1 global-sidecar Service port lists (wormhole ports [7070, 9080])"),
        "{stderr}"
    );

    let config = Config::parse(CONFIG).unwrap().config;
    let text = std::fs::read_to_string(fixtures.join("cluster.yaml")).unwrap();
    let snapshot = Snapshot::parse(&text, "cluster.local").unwrap();
    let applied = controller_applies(&config, snapshot).await;

    let file = |p: &str| -> Value {
        lazyload::yaml::from_str(&std::fs::read_to_string(out.join(p)).unwrap()).unwrap()
    };
    let expected = [
        (
            "/apis/networking.istio.io/v1alpha3/namespaces/istio-system/envoyfilters/to-global-sidecar",
            "istio-system/to-global-sidecar.envoyfilter.yaml",
        ),
        (
            "/api/v1/namespaces/mesh-operator/services/global-sidecar",
            "mesh-operator/global-sidecar.service.yaml",
        ),
    ];
    assert_eq!(applied.len(), expected.len(), "{:?}", applied.keys());
    testing::assert_table(expected.into_iter().map(|(path, written)| {
        (
            format!("{written} (what the controller applies at {path})"),
            file(written),
            applied[path].clone(),
        )
    }));
    // The EnvoyFilter covers both ports (7070, 9080: the configured ones; the fixture's Services
    // name their ports http and listen on 9080).
    let ef = file("istio-system/to-global-sidecar.envoyfilter.yaml");
    assert_eq!(
        ef["metadata"]["annotations"]["lazyload.io/wormhole-ports"],
        "7070,9080"
    );
}
