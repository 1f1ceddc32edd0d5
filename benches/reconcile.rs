//! Reconciler benchmark with the API server mocked (kube-rs + tower-test, answering at once):
//! N Services, N fences, 10 learned dependencies per fence (100,000 edges at N = 10,000), at
//! N = 100 and 10,000 in the same run. Prints the full resync's wall and CPU time and RSS, the
//! learn -> Sidecar-apply latency (p50/p99, the 100 ms debounce included), and the writes per
//! fence per debounce window under a burst of changes.
//!
//! `cargo bench --bench reconcile`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, Response};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::Client;
use kube::client::Body;
use lazyload::cluster::writer::FenceWriter;
use lazyload::cluster::{Change, ClusterState};
use lazyload::config::Config;
use lazyload::index::{ClusterIndex, ServiceInfo};
use lazyload::reconcile::fences::{FenceController, Metrics};
use lazyload::vocab::ObjectKey;
use lazyload::vocab::fence::{
    ServiceFence, ServiceFenceSpec, ServiceFenceStatus, WorkloadSelector, metric_key,
};
use lazyload::vocab::istio::IstioVersion;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tower_test::mock;

fn fqdn(i: usize) -> String {
    format!("svc-{i}.ns-{}.svc.cluster.local", i % 50)
}

fn key(i: usize) -> ObjectKey {
    ObjectKey::new(format!("ns-{}", i % 50), format!("svc-{i}"))
}

fn fence(i: usize, n: usize, extra: Option<usize>) -> ServiceFence {
    let k = key(i);
    let mut f = ServiceFence::new(
        &k.name,
        ServiceFenceSpec {
            enable: true,
            workload_selector: Some(WorkloadSelector {
                from_service: true,
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    f.metadata = ObjectMeta {
        name: Some(k.name.clone()),
        namespace: Some(k.namespace.clone()),
        uid: Some(format!("uid-{i}")),
        ..Default::default()
    };
    let now = Timestamp::now();
    let mut status = ServiceFenceStatus::default();
    for d in (1..=10).map(|d| (i + d * 97) % n).chain(extra) {
        status.metric_status.insert(metric_key(&fqdn(d)), "1".into());
        status.last_seen.insert(fqdn(d), Time(now));
    }
    f.status = Some(status);
    f
}

/// Requests the mock API server received: (method, path, when).
type Seen = mpsc::UnboundedReceiver<(Method, String, Instant)>;

fn api(n: usize) -> (Client, Seen) {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let (tx, rx) = mpsc::unbounded_channel();
    let status_reply = serde_json::to_vec(&fence(0, n.max(11), None)).unwrap();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (method, path) = (req.method().clone(), req.uri().path().to_string());
            let _ = tx.send((method, path.clone(), Instant::now()));
            let body = req.into_body().collect_bytes().await.unwrap_or_default();
            let reply = if path.ends_with("/status") {
                status_reply.clone()
            } else {
                body.to_vec()
            };
            send.send_response(Response::builder().status(200).body(Body::from(reply)).unwrap());
        }
    });
    (Client::new(service, "default"), rx)
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn run(n: usize) {
    let mut index = ClusterIndex::new("cluster.local");
    for i in 0..n {
        let k = key(i);
        index.apply_service(ServiceInfo {
            labels: [("app".to_string(), k.name.clone())].into(),
            selector: Some([("app".to_string(), k.name.clone())].into()),
            key: k,
            ports: vec![],
            cluster_ips: vec![],
        });
    }
    let state = ClusterState::new(index, (0..n).map(|i| fence(i, n, None)));
    let (client, mut seen) = api(n);
    let mut registry = prometheus_client::registry::Registry::default();
    let controller = FenceController::new(
        state.clone(),
        Arc::new(Config::default()),
        FenceWriter::new(client, IstioVersion::V1beta1),
        None,
        Metrics::register(&mut registry),
    );
    let (_lead, lead_rx) = watch::channel(true);
    let stop = CancellationToken::new();

    // Full resync: every fence reconciled once (a Sidecar apply and a status patch each).
    let (cpu0, rss0, start) = (cpu_seconds(), rss_mib(), Instant::now());
    tokio::spawn(controller.run(lead_rx, stop.clone()));
    let mut writes = 0;
    while writes < 2 * n {
        seen.recv().await.unwrap();
        writes += 1;
    }
    let (resync_wall, resync_cpu, rss) = (start.elapsed(), cpu_seconds() - cpu0, rss_mib());

    // learn -> apply: a new dependency lands in one fence's status; time to its Sidecar apply.
    let mut latencies = Vec::new();
    for s in 0..200 {
        let i = (s * 7919) % n;
        let k = key(i);
        let begin = Instant::now();
        state.set_fence(k.clone(), Some(fence(i, n, Some((i + 5 + s) % n))));
        state.changed(Change::Fence(k.clone()));
        let sidecar = format!("/sidecars/{}", k.name);
        loop {
            let (_, path, at) = seen.recv().await.unwrap();
            if path.ends_with(&sidecar) {
                latencies.push(at - begin);
                break;
            }
        }
        // Drain its status patch.
        let _ = tokio::time::timeout(Duration::from_millis(20), seen.recv()).await;
    }
    latencies.sort();

    // A burst: ten changes to one fence within 50 ms -> Sidecar writes in the window.
    let k = key(1);
    state.set_fence(k.clone(), Some(fence(1, n, Some(3))));
    for _ in 0..10 {
        state.changed(Change::Fence(k.clone()));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut burst: BTreeMap<String, usize> = BTreeMap::new();
    while let Ok((_, path, _)) = seen.try_recv() {
        *burst.entry(path).or_default() += 1;
    }
    let sidecar_writes = burst
        .iter()
        .filter(|(p, _)| p.contains("/sidecars/"))
        .map(|(_, n)| n)
        .sum::<usize>();
    stop.cancel();

    println!("N = {n} services, {n} fences, {} learned edges", n * 10);
    println!(
        "  full resync: {:.0} ms wall, {:.2} s CPU (controller + mocked API in one process), RSS {:.0} MiB (+{:.0} MiB)",
        resync_wall.as_secs_f64() * 1e3,
        resync_cpu,
        rss,
        rss - rss0
    );
    println!(
        "  learn -> Sidecar apply issued (100 ms debounce included): p50 {:.1} ms, p99 {:.1} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3
    );
    println!("  burst of 10 changes to one fence in 50 ms: {sidecar_writes} Sidecar write(s)");
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for n in [100, 10_000] {
            run(n).await;
        }
    });
}
