//! The collector over real gRPC on loopback: concurrent streams each identified by their first
//! message only, an oversized message refused and counted without harming other streams, and a
//! flood of distinct hosts kept within the learner's caps.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use lazyload::als::MAX_MESSAGE_BYTES;
use lazyload::als::attribute::Attributor;
use lazyload::als::collector::{self, Collector, Metrics};
use lazyload::config::Config;
use lazyload::index::{ClusterIndex, ObjectKey, PodInfo, ServiceEntryInfo, ServiceInfo};
use lazyload::learn::pump::LearnerHandle;
use lazyload::learn::{Learner, Limits};
use prometheus_client::registry::Registry;
use support::als_client::{self, client};
use tokio_util::sync::CancellationToken;

fn index() -> ClusterIndex {
    let mut idx = ClusterIndex::new("cluster.local");
    idx.apply_service(ServiceInfo {
        key: ObjectKey::new("default", "productpage"),
        labels: Default::default(),
        selector: Some([("app".to_string(), "productpage".to_string())].into()),
        ports: vec![],
        cluster_ips: vec![],
    });
    idx.apply_pod(PodInfo {
        key: ObjectKey::new("default", "productpage-1"),
        labels: [("app".to_string(), "productpage".to_string())].into(),
        ips: vec!["10.0.0.1".parse().unwrap()],
        host_network: false,
        service_account: "default".into(),
    });
    let se =
        serde_yaml::from_str("metadata: {name: ext, namespace: default}\nspec: {hosts: ['*.example.org']}")
            .unwrap();
    idx.apply_service_entry(ServiceEntryInfo::try_from(&se).unwrap());
    idx
}

fn message(first: bool, authorities: impl IntoIterator<Item = String>) -> StreamAccessLogsMessage {
    als_client::message(
        first,
        authorities.into_iter().map(|a| als_client::entry("10.0.0.1", a)),
    )
}

struct Running {
    addr: SocketAddr,
    learner: LearnerHandle,
    registry: Registry,
    shutdown: CancellationToken,
}

async fn start(limits: Limits) -> Running {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let learner = LearnerHandle::new(Learner::new(limits), 100);
    let collector = Collector::new(
        Arc::new(RwLock::new(index())),
        Attributor::new(&Config::default()),
        learner.clone(),
        metrics,
    );
    let listener = collector::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(collector::serve(listener, collector, shutdown.clone()));
    Running {
        addr,
        learner,
        registry,
        shutdown,
    }
}

fn metrics_text(r: &Registry) -> String {
    let mut s = String::new();
    prometheus_client::encoding::text::encode(&mut s, r).unwrap();
    s
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn concurrent_streams_and_oversized_messages() {
    let r = start(Limits::default()).await;
    // Eight concurrent streams, each identified on its first message only.
    let mut streams = Vec::new();
    for s in 0..8 {
        let mut c = client(r.addr).await;
        streams.push(tokio::spawn(async move {
            let msgs = (0..5)
                .map(move |m| message(m == 0, (0..10).map(move |i| format!("h{s}-{m}-{i}.example.org"))));
            c.stream_access_logs(tokio_stream::iter(msgs)).await
        }));
    }
    // One stream sends a message over the limit: it is refused, the others are unaffected.
    let mut big = client(r.addr).await;
    let huge = message(true, ["x".repeat(MAX_MESSAGE_BYTES + 1)]);
    let refused = big.stream_access_logs(tokio_stream::iter([huge])).await;
    assert!(refused.is_err(), "oversized message accepted");
    for s in streams {
        s.await.unwrap().unwrap();
    }
    wait_for("400 edges", || r.learner.lock().len() == 400).await;
    let text = metrics_text(&r.registry);
    assert!(text.contains("als_entries_total{kind=\"http\"} 400"), "{text}");
    assert!(text.contains("reason=\"decode_error\"} 1"), "{text}");
    assert!(text.contains("als_streams_open 0"), "{text}");
    r.shutdown.cancel();
}

#[tokio::test]
async fn a_flood_of_distinct_hosts_stays_bounded() {
    let r = start(Limits {
        max_hosts: 1_000,
        max_edges: 1_000,
        max_pending: 10_000,
        ..Limits::default()
    })
    .await;
    let mut c = client(r.addr).await;
    // 100,000 distinct (allowed) hosts and 10,000 bogus ones, in messages of 100.
    let msgs = (0..1_100).map(|m| {
        message(
            m == 0,
            (0..100).map(move |i| {
                if m < 1_000 {
                    format!("h{m}-{i}.example.org")
                } else {
                    format!("bogus-{m}-{i}.invalid")
                }
            }),
        )
    });
    c.stream_access_logs(tokio_stream::iter(msgs)).await.unwrap();
    let text = metrics_text(&r.registry);
    assert!(text.contains("als_entries_total{kind=\"http\"} 110000"), "{text}");
    assert_eq!(r.learner.lock().len(), 1_000);
    assert!(text.contains("reason=\"table_full\"} 99000"), "{text}");
    assert!(text.contains("reason=\"external_not_allowed\"} 10000"), "{text}");
    r.shutdown.cancel();
}

#[tokio::test]
async fn a_full_queue_stops_reading_until_the_consumer_drains_it() {
    let r = start(Limits {
        max_pending: 50,
        ..Limits::default()
    })
    .await;
    let mut c = client(r.addr).await;
    let msgs = (0..20).map(|m| message(m == 0, (0..50).map(move |i| format!("h{m}-{i}.example.org"))));
    let call = tokio::spawn(async move { c.stream_access_logs(tokio_stream::iter(msgs)).await });
    // Nobody drains the queue: the collector stops reading after the first message.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!call.is_finished(), "the stream was read past a full queue");
    assert_eq!(r.learner.lock().pending(), 50);
    // A consumer appears: everything is learned, nothing dropped.
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(
        r.learner
            .clone()
            .pump(tx, Duration::from_millis(10), r.shutdown.clone()),
    );
    let mut received = 0;
    while received < 1_000 {
        received += rx.recv().await.unwrap().len();
    }
    call.await.unwrap().unwrap();
    assert_eq!(r.learner.lock().len(), 1_000);
    let text = metrics_text(&r.registry);
    assert!(text.contains("reason=\"queue_full\"} 0"), "{text}");
    r.shutdown.cancel();
}
