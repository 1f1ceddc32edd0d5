//! The fence controller driven through its change stream against a mocked API server: the first
//! reconcile applies the Sidecar and the status; a burst of changes that alters nothing writes
//! nothing; a learned dependency arriving with a burst of changes costs exactly one Sidecar write
//! per debounce window; followers write nothing until they lead.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use lazyload::cluster::writer::FenceWriter;
use lazyload::cluster::{Change, ClusterState};
use lazyload::config::Config;
use lazyload::index::ClusterIndex;
use lazyload::reconcile::fences::{FenceController, Metrics};
use lazyload::testing::{self, MockApi, Write};
use lazyload::vocab::ObjectKey;
use lazyload::vocab::fence::{ServiceFence, ServiceFenceStatus, metric_key};
use lazyload::vocab::istio::{IstioVersion, Sidecar};
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the mock API server received: (method, path?query, body).
type Log = Arc<Mutex<Vec<Write>>>;

fn fence(learned: &[&str]) -> ServiceFence {
    let mut f = testing::fence("default", "productpage");
    f.spec.enable = true;
    f.metadata.uid = Some("u1".into());
    f.status = Some(ServiceFenceStatus {
        metric_status: learned.iter().map(|h| (metric_key(h), "1".to_string())).collect(),
        ..Default::default()
    });
    f
}

/// The mock API server, holding the fence(s) the controller reads (as a real one would answer a
/// status write with the whole fence), and the log of what it received.
fn api(fences: &[ServiceFence]) -> (Client, Log) {
    let api = fences.iter().fold(MockApi::default(), |api, f| {
        api.with("ServiceFence", serde_json::to_value(f).unwrap())
    });
    let log = api.writes();
    (api.client(), log)
}

/// The writes received: method and path (without the query).
fn writes(log: &Log) -> Vec<(String, String)> {
    log.lock()
        .unwrap()
        .iter()
        .map(|(m, p, _)| (m.clone(), p.split('?').next().unwrap_or_default().to_string()))
        .collect()
}

const SIDECAR: &str = "/apis/networking.istio.io/v1beta1/namespaces/default/sidecars/productpage";
const STATUS: &str =
    "/apis/microservice.slime.io/v1alpha1/namespaces/default/servicefences/productpage/status";

/// Starts a leading fence controller over `state` against the mock API server.
fn start(
    state: ClusterState,
    fences: &[ServiceFence],
    config: Config,
) -> (Log, watch::Sender<bool>, CancellationToken) {
    let (client, log) = api(fences);
    let mut registry = prometheus_client::registry::Registry::default();
    let controller = FenceController::new(
        state,
        Arc::new(config),
        FenceWriter::new(client, IstioVersion::V1beta1),
        None,
        Metrics::register(&mut registry),
    );
    let (lead_tx, lead_rx) = watch::channel(true);
    let stop = CancellationToken::new();
    tokio::spawn(controller.run(lead_rx, stop.clone()));
    (log, lead_tx, stop)
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(400)).await;
}

#[tokio::test(start_paused = true)]
async fn writes_only_what_changed_once_per_window() {
    let key = ObjectKey::new("default", "productpage");
    let fences = [fence(&["details.default.svc.cluster.local"])];
    let state = ClusterState::new(ClusterIndex::new("cluster.local"), fences.clone());
    let (log, lead_tx, stop) = start(state.clone(), &fences, Config::default());

    // 1. First reconcile: the Sidecar is applied, then the status written.
    settle().await;
    assert_eq!(
        writes(&log),
        [
            ("PATCH".to_string(), SIDECAR.to_string()),
            ("PATCH".to_string(), STATUS.to_string())
        ]
    );
    let applied: Sidecar = serde_json::from_value(log.lock().unwrap()[0].2.clone()).unwrap();
    let status = log.lock().unwrap()[1].2["status"].clone();
    assert_eq!(
        applied.spec.egress[0].hosts,
        [
            "*/details.default.svc.cluster.local",
            "istio-system/*",
            "mesh-operator/*"
        ]
    );

    // The watches report what was written back.
    let mut current = fence(&["details.default.svc.cluster.local"]);
    let merged: ServiceFenceStatus = serde_json::from_value(status).unwrap();
    let mut full = current.status.clone().unwrap();
    full.domains = merged.domains;
    full.last_seen = merged.last_seen;
    full.conditions = merged.conditions;
    current.status = Some(full);
    state.set_fence(key.clone(), Some(current.clone()));
    state.set_sidecar(key.clone(), Some(applied));
    log.lock().unwrap().clear();

    // 2. A burst of changes that alters nothing writes nothing.
    for _ in 0..5 {
        state.changed(Change::Fence(key.clone()));
        state.changed(Change::Service(ObjectKey::new("default", "details")));
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(writes(&log), []);

    // 3. A learned dependency with a burst of fence changes: one Sidecar write, one status write.
    let status = current.status.as_mut().unwrap();
    status
        .metric_status
        .insert(metric_key("reviews.default.svc.cluster.local"), "1".into());
    state.set_fence(key.clone(), Some(current));
    for _ in 0..5 {
        state.changed(Change::Fence(key.clone()));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    settle().await;
    let w = writes(&log);
    assert_eq!(w.iter().filter(|(_, p)| p == SIDECAR).count(), 1, "{w:?}");
    let body = log.lock().unwrap()[0].2.clone();
    assert!(body.to_string().contains("*/reviews.default.svc.cluster.local"));
    log.lock().unwrap().clear();

    // 4. A follower writes nothing, whatever changes; leading again resyncs.
    lead_tx.send(false).unwrap();
    state.set_sidecar(key.clone(), None);
    state.changed(Change::Sidecar(key.clone()));
    settle().await;
    assert_eq!(writes(&log), []);
    lead_tx.send(true).unwrap();
    settle().await;
    assert_eq!(
        writes(&log).first().map(|(_, p)| p.as_str()),
        Some(SIDECAR),
        "the new leader restores the Sidecar"
    );
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn only_fences_of_this_lazyloads_istio_revision_are_written() {
    let labelled = |rev: Option<&str>, name: &str| {
        let mut f = fence(&[]);
        f.metadata.name = Some(name.into());
        f.metadata.labels = rev.map(|r| [("istio.io/rev".to_string(), r.to_string())].into());
        f
    };
    let fences = [
        labelled(Some("canary"), "canary"),
        labelled(Some("stable"), "stable"),
        labelled(None, "unlabelled"),
    ];
    let cases = [
        ("global:\n  istioRev: canary\n", vec!["canary", "unlabelled"]),
        ("global:\n  istioRev: canary\n  strictRev: true\n", vec!["canary"]),
        ("", vec!["canary", "stable", "unlabelled"]),
    ];
    let mut results = Vec::new();
    for (config, written) in cases {
        let state = ClusterState::new(ClusterIndex::new("cluster.local"), fences.clone());
        let (log, _lead, stop) = start(state, &fences, Config::parse(config).unwrap().config);
        settle().await;
        stop.cancel();
        let mut sidecars: Vec<String> = writes(&log)
            .into_iter()
            .filter_map(|(_, p)| {
                p.strip_prefix("/apis/networking.istio.io/v1beta1/namespaces/default/sidecars/")
                    .map(String::from)
            })
            .collect();
        sidecars.sort();
        // A Sidecar carries its fence's revision.
        let revisions: Vec<Value> = (log.lock().unwrap().iter())
            .filter(|(_, path, _)| path.contains("/sidecars/canary"))
            .map(|(_, _, body)| body["metadata"]["labels"]["istio.io/rev"].clone())
            .collect();
        let want_revisions = vec![Value::from("canary"); revisions.len()];
        results.push((
            format!("{config:?}"),
            (sidecars, revisions),
            (written.into_iter().map(String::from).collect(), want_revisions),
        ));
    }
    testing::assert_table(results);
}
