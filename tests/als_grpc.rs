//! The collector over real gRPC on loopback: concurrent streams each identified by their first
//! message only, an oversized message refused and counted without harming other streams, a
//! flood of distinct hosts kept within the learner's caps, streams from peers that are not
//! global-sidecars refused, garbage refused as such, and open streams ended by shutdown.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use lazyload::als::MAX_MESSAGE_BYTES;
use lazyload::als::attribute::Attributor;
use lazyload::als::collector::{self, Collector, Metrics, Peers};
use lazyload::config::Config;
use lazyload::index::ClusterIndex;
use lazyload::learn::pump::LearnerHandle;
use lazyload::learn::{Learner, Limits};
use lazyload::testing;
use lazyload::testing::als;
use prometheus_client::registry::Registry;
use support::als_client::client;
use tokio_util::sync::CancellationToken;

fn index() -> ClusterIndex {
    let mut idx = testing::index_of(&[("default", "productpage", "10.0.0.1")]);
    idx.apply_service_entry(testing::service_entry("default", "ext", &["*.example.org"]));
    idx
}

fn message(first: bool, authorities: impl IntoIterator<Item = String>) -> StreamAccessLogsMessage {
    als::message(first, authorities.into_iter().map(|a| als::entry("10.0.0.1", a)))
}

struct Running {
    addr: SocketAddr,
    learner: LearnerHandle,
    registry: Registry,
    index: Arc<RwLock<ClusterIndex>>,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<Result<(), collector::Error>>,
}

/// A collector taking streams from anyone (the tests' client is on loopback).
async fn start(limits: Limits) -> Running {
    start_for(limits, Peers::Any).await
}

async fn start_for(limits: Limits, peers: Peers) -> Running {
    start_with(limits, peers, lazyload::net::ConnectionLimits::default()).await
}

async fn start_with(limits: Limits, peers: Peers, connections: lazyload::net::ConnectionLimits) -> Running {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let learner = LearnerHandle::new(Learner::new(limits), 100);
    let index = Arc::new(RwLock::new(index()));
    let collector = Collector::new(
        index.clone(),
        Attributor::new(&Config::default()),
        learner.clone(),
        metrics,
        peers,
    );
    let listener = collector::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(collector::serve(
        listener,
        collector,
        connections,
        shutdown.clone(),
    ));
    Running {
        addr,
        learner,
        registry,
        index,
        shutdown,
        server,
    }
}

fn metrics_text(r: &Registry) -> String {
    let mut s = String::new();
    prometheus_client::encoding::text::encode(&mut s, r).unwrap();
    s
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
    testing::eventually_true("400 edges", Duration::from_secs(10), || {
        r.learner.lock().len() == 400
    })
    .await;
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
    let mut received = 0;
    while received < 1_000 {
        received += r.learner.next_batch(Duration::from_millis(10)).await.len();
    }
    call.await.unwrap().unwrap();
    assert_eq!(r.learner.lock().len(), 1_000);
    let text = metrics_text(&r.registry);
    assert!(text.contains("reason=\"queue_full\"} 0"), "{text}");
    r.shutdown.cancel();
}

#[tokio::test]
async fn only_global_sidecar_pods_may_stream() {
    let r = start_for(
        Limits::default(),
        Peers::GlobalSidecars(vec!["mesh-operator".into()]),
    )
    .await;
    let send = || async {
        let mut c = client(r.addr).await;
        c.stream_access_logs(tokio_stream::iter([message(true, ["a.example.org".to_string()])]))
            .await
    };
    // 127.0.0.1 is nobody's address yet, then a pod's that is not a global-sidecar.
    let refused = send().await.expect_err("an unknown peer was trusted");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    let pod =
        |ns: &str, name: &str, app: &str| testing::pod(ns, name, &[("app", app)], "127.0.0.1", "default");
    r.index
        .write()
        .unwrap()
        .apply_pod(pod("default", "impostor", "global-sidecar"));
    let refused = send()
        .await
        .expect_err("a pod outside the global-sidecar's namespace was trusted");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert_eq!(r.learner.lock().len(), 0, "a refused stream taught something");
    // The global-sidecar's pod at that address: trusted.
    r.index
        .write()
        .unwrap()
        .apply_pod(pod("mesh-operator", "global-sidecar-0", "global-sidecar"));
    send().await.expect("the global-sidecar's stream");
    assert_eq!(r.learner.lock().len(), 1);
    let text = metrics_text(&r.registry);
    assert!(
        text.contains("als_refused_streams_total{reason=\"not_global_sidecar\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("als_refused_streams_total{reason=\"no_peer_address\"} 0"),
        "{text}"
    );
    r.shutdown.cancel();
}

/// A message whose field 1 (the identifier, a message) arrives as a varint: not an access-log
/// message.
#[derive(Clone, PartialEq, prost::Message)]
struct Garbage {
    #[prost(uint64, tag = "1")]
    identifier: u64,
}

#[tokio::test]
async fn garbage_ends_the_stream_with_invalid_argument() {
    let r = start(Limits::default()).await;
    let mut grpc = lazyload::testing::grpc_client(r.addr).await;
    let path =
        http::uri::PathAndQuery::from_static("/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs");
    let codec = tonic_prost::ProstCodec::<
        Garbage,
        envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsResponse,
    >::default();
    let status = grpc
        .client_streaming(
            tonic::Request::new(tokio_stream::iter([Garbage { identifier: 7 }])),
            path,
            codec,
        )
        .await
        .expect_err("garbage accepted");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    let text = metrics_text(&r.registry);
    assert!(text.contains("reason=\"decode_error\"} 1"), "{text}");
    assert!(text.contains("als_streams_open 0"), "{text}");
    r.shutdown.cancel();
}

#[tokio::test]
async fn a_fence_at_its_host_cap_learns_no_more() {
    let r = start(Limits {
        max_hosts_per_fence: 10,
        ..Limits::default()
    })
    .await;
    let mut c = client(r.addr).await;
    let msgs = [message(true, (0..25).map(|i| format!("h{i}.example.org")))];
    c.stream_access_logs(tokio_stream::iter(msgs)).await.unwrap();
    assert_eq!(r.learner.lock().len(), 10);
    let text = metrics_text(&r.registry);
    assert!(text.contains("reason=\"fence_full\"} 15"), "{text}");
    assert!(text.contains("als_fences_at_host_cap 1"), "{text}");
    r.shutdown.cancel();
}

/// Envoy never closes its access-log stream: shutdown must end it, not wait for it.
#[tokio::test]
async fn shutdown_ends_open_streams_at_once() {
    let r = start(Limits::default()).await;
    let mut c = client(r.addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(message(true, ["a.example.org".to_string()]))
        .await
        .unwrap();
    let call = tokio::spawn(async move {
        c.stream_access_logs(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    testing::eventually_true("the edge", Duration::from_secs(10), || {
        r.learner.lock().len() == 1
    })
    .await;
    r.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), r.server)
        .await
        .expect("the server stopped with a stream open")
        .unwrap()
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .expect("the stream ended");
    drop(tx);
    ended.unwrap().expect("ended cleanly");
}

/// Issue 16: the collector's port is bounded like the relay's: a connection over the limit is
/// closed at once (and counted), one that never sends the HTTP/2 preface is closed after the
/// handshake timeout, and then a client is served again.
#[tokio::test]
async fn idle_connections_time_out_and_the_connection_limit_holds() {
    let connections = lazyload::net::ConnectionLimits {
        max_connections: 2,
        handshake_timeout: Duration::from_millis(500),
    };
    let r = start_with(Limits::default(), Peers::Any, connections).await;
    support::bounds::check_limit_and_handshake_timeout(r.addr, 2).await;
    assert!(
        metrics_text(&r.registry).contains("als_refused_connections_total 1"),
        "{}",
        metrics_text(&r.registry)
    );
    let mut c = client(r.addr).await;
    c.stream_access_logs(tokio_stream::iter([message(true, [])]))
        .await
        .expect("a client is served once places are free");
}
