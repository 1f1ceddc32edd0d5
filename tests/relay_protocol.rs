//! Protocol tests of the relay with an in-process xDS client and the fake istiod: nonce
//! translation, stale nonces, NACKs, partial EDS merge, upstream restarts and GOAWAYs, the last
//! good config when istiod is down, unknown types, pass-through for ordinary nodes, Delta.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Any, Struct, Value, value::Kind};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use lazyload::als::ACCESS_LOG_CLUSTER;
use lazyload::fake_istiod::{Config, FakeIstiod, SidecarShape};
use lazyload::testing::eventually_true;
use lazyload::xds::adjust::Settings;
use lazyload::xds::adjust::pack as any;
use lazyload::xds::upstream::{Upstream, UpstreamConfig};
use lazyload::xds::{CLUSTER, ENDPOINT, LISTENER};
use prost::Message;
use support::TestRelay;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const PCDS: &str = "type.googleapis.com/istio.mesh.v1alpha1.ProxyConfig";
const WAIT: Duration = Duration::from_secs(10);

fn cluster(name: &str) -> Any {
    any(&Cluster {
        name: name.into(),
        ..Default::default()
    })
}

fn cla(name: &str, weight: u32) -> Any {
    any(&ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![
            envoy_types::pb::envoy::config::endpoint::v3::LocalityLbEndpoints {
                load_balancing_weight: Some(envoy_types::pb::google::protobuf::UInt32Value { value: weight }),
                ..Default::default()
            },
        ],
        ..Default::default()
    })
}

fn listener(name: &str) -> Any {
    any(&Listener {
        name: name.into(),
        ..Default::default()
    })
}

fn mesh() -> Config {
    let mut c = Config::new();
    c.insert(
        CLUSTER.into(),
        ["a", "b", "c"]
            .iter()
            .map(|n| (n.to_string(), cluster(n)))
            .collect(),
    );
    c.insert(
        ENDPOINT.into(),
        ["a", "b", "c"]
            .iter()
            .map(|n| (n.to_string(), cla(n, 1)))
            .collect(),
    );
    c.insert(LISTENER.into(), [("l1".to_string(), listener("l1"))].into());
    c.insert(
        PCDS.into(),
        [(
            "pc".to_string(),
            Any {
                type_url: PCDS.into(),
                value: vec![1, 2, 3],
            },
        )]
        .into(),
    );
    c
}

fn node(global_sidecar: bool) -> Node {
    let mut fields = BTreeMap::new();
    if global_sidecar {
        fields.insert(
            "SLIME_APP".to_string(),
            Value {
                kind: Some(Kind::StringValue("LAZYLOAD_GLOBAL_SIDECAR".into())),
            },
        );
    }
    Node {
        id: "sidecar~10.0.0.9~global-sidecar-5d9f7-x2x.mesh-operator~mesh-operator.svc.cluster.local".into(),
        metadata: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
        ..Default::default()
    }
}

async fn relay(upstream: &str) -> TestRelay {
    let settings = Settings {
        als_address: Some(("127.0.0.1".into(), 8082)),
        ..Default::default()
    };
    TestRelay::start(upstream_config(upstream), settings).await
}

fn upstream_config(address: &str) -> UpstreamConfig {
    UpstreamConfig {
        address: address.into(),
        ..Default::default()
    }
}

struct SotwClient {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl SotwClient {
    async fn connect(addr: SocketAddr, metadata: &[(&'static str, &str)]) -> Self {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(16);
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        for (k, v) in metadata {
            req.metadata_mut().insert(*k, v.parse().unwrap());
        }
        let rx = client
            .stream_aggregated_resources(req)
            .await
            .unwrap()
            .into_inner();
        Self { tx, rx }
    }

    async fn send(&self, req: DiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    async fn request(&self, node: Option<Node>, type_url: &str, names: &[&str], nonce: &str) {
        self.send(DiscoveryRequest {
            node,
            type_url: type_url.into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        })
        .await;
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("response in time")
            .unwrap()
            .expect("a response")
    }

    async fn silent(&mut self, for_: Duration) -> bool {
        tokio::time::timeout(for_, self.rx.message()).await.is_err()
    }

    async fn ended(&mut self) -> tonic::Status {
        match tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("stream ends in time")
        {
            Err(status) => status,
            Ok(other) => panic!("expected the stream to end, got {other:?}"),
        }
    }
}

fn names(resp: &DiscoveryResponse) -> Vec<String> {
    let mut v: Vec<String> = resp
        .resources
        .iter()
        .map(|a| match a.type_url.as_str() {
            CLUSTER => Cluster::decode(&*a.value).unwrap().name,
            ENDPOINT => ClusterLoadAssignment::decode(&*a.value).unwrap().cluster_name,
            LISTENER => Listener::decode(&*a.value).unwrap().name,
            other => other.to_string(),
        })
        .collect();
    v.sort();
    v
}

/// Connects a global-sidecar, takes CDS, EDS and LDS and ACKs them all.
async fn converge(addr: SocketAddr) -> SotwClient {
    let mut c = SotwClient::connect(addr, &[]).await;
    c.request(Some(node(true)), CLUSTER, &[], "").await;
    let cds = c.recv().await;
    assert_eq!(names(&cds), ["a", "b", "c", ACCESS_LOG_CLUSTER]);
    c.request(None, CLUSTER, &[], &cds.nonce).await;
    c.request(None, ENDPOINT, &["a", "b", "c"], "").await;
    let eds = c.recv().await;
    c.request(None, ENDPOINT, &["a", "b", "c"], &eds.nonce).await;
    c.request(None, LISTENER, &[], "").await;
    let lds = c.recv().await;
    c.request(None, LISTENER, &[], &lds.nonce).await;
    c
}

#[tokio::test]
async fn nonces_are_translated_and_stale_ones_ignored() {
    let istiod = FakeIstiod::start(mesh()).await.unwrap();
    let r = relay(&istiod.url()).await;
    let mut c = SotwClient::connect(r.addr, &[("authorization", "Bearer gs-token")]).await;
    c.request(Some(node(true)), CLUSTER, &[], "").await;
    let first = c.recv().await;
    assert!(first.nonce.starts_with("ll-"), "relay nonce: {}", first.nonce);
    c.request(None, CLUSTER, &[], &first.nonce).await;
    istiod.set(CLUSTER, [("a".to_string(), cluster("a"))].into());
    let second = c.recv().await;
    assert_eq!(names(&second), ["a", ACCESS_LOG_CLUSTER]);
    // ACK the new one, then send a request with the old (stale) nonce: istiod sees both
    // translated, ignores the stale one, and nothing comes back.
    c.request(None, CLUSTER, &[], &second.nonce).await;
    c.request(None, CLUSTER, &[], &first.nonce).await;
    assert!(c.silent(Duration::from_millis(300)).await);
    let seen: Vec<_> = istiod
        .seen()
        .into_iter()
        .filter(|s| s.type_url == CLUSTER)
        .collect();
    assert_eq!(seen.len(), 4);
    assert!(seen[0].has_node && seen[0].nonce.is_empty());
    assert!(seen.iter().all(|s| !s.nonce.starts_with("ll-")), "{seen:?}");
    assert_eq!(
        seen[3].nonce, seen[1].nonce,
        "the stale nonce maps to istiod's first nonce"
    );
    assert_ne!(seen[2].nonce, seen[1].nonce);
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some("Bearer gs-token"),
        "downstream credentials forwarded"
    );
}

#[tokio::test]
async fn nack_reaches_istiod_once_and_is_counted() {
    let istiod = FakeIstiod::start(mesh()).await.unwrap();
    let r = relay(&istiod.url()).await;
    let mut c = SotwClient::connect(r.addr, &[]).await;
    c.request(Some(node(true)), LISTENER, &[], "").await;
    let lds = c.recv().await;
    c.send(DiscoveryRequest {
        type_url: LISTENER.into(),
        response_nonce: lds.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "bad listener".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    assert!(
        c.silent(Duration::from_millis(300)).await,
        "a NACK is never answered"
    );
    let nacks: Vec<_> = istiod.seen().into_iter().filter(|s| s.error.is_some()).collect();
    assert_eq!(nacks.len(), 1);
    assert_eq!(nacks[0].error.as_deref(), Some("bad listener"));
    assert!(!nacks[0].nonce.starts_with("ll-"));
    let counted: u64 = r
        .relay
        .metrics()
        .nacks
        .get_or_create(&lazyload::xds::metrics::Metrics::type_labels(LISTENER))
        .get();
    assert_eq!(counted, 1);
}

#[tokio::test]
async fn partial_eds_pushes_merge_into_the_last_good_config() {
    let istiod = FakeIstiod::start(mesh()).await.unwrap();
    let r = relay(&istiod.url()).await;
    let mut c = converge(r.addr).await;
    istiod.update_partial(ENDPOINT, [("b".to_string(), cla("b", 7))].into());
    let partial = c.recv().await;
    assert_eq!(names(&partial), ["b"], "a partial push passes as it is");
    c.request(None, ENDPOINT, &["a", "b", "c"], &partial.nonce).await;
    // The relay records an ACK in the last good config before forwarding it: once istiod has
    // seen the ACK of the partial push (the second EDS ACK), the cache holds it.
    eventually_true("the partial push ACKed into the last good config", WAIT, || {
        let acks = istiod
            .seen()
            .iter()
            .filter(|s| s.type_url == ENDPOINT && !s.nonce.is_empty())
            .count();
        acks >= 2
    })
    .await;
    assert_eq!(
        r.relay.debug_view().last_good.values().next().unwrap().resources["ClusterLoadAssignment"],
        3
    );
    // istiod goes away; a new replica connecting gets the merged endpoints.
    let addr = istiod.addr;
    istiod.stop().await;
    let status = c.ended().await;
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let mut n = SotwClient::connect(r.addr, &[]).await;
    n.request(Some(node(true)), ENDPOINT, &["a", "b", "c", "missing"], "")
        .await;
    let eds = n.recv().await;
    assert!(eds.version_info.starts_with("last-good-"));
    let weights: BTreeMap<String, u32> = eds
        .resources
        .iter()
        .map(|a| ClusterLoadAssignment::decode(&*a.value).unwrap())
        .map(|c| {
            (
                c.cluster_name.clone(),
                c.endpoints
                    .first()
                    .and_then(|e| e.load_balancing_weight)
                    .map_or(0, |w| w.value),
            )
        })
        .collect();
    assert_eq!(
        weights,
        [
            ("a".into(), 1),
            ("b".into(), 7),
            ("c".into(), 1),
            ("missing".into(), 0)
        ]
        .into()
    );
    n.request(None, CLUSTER, &[], "").await;
    assert_eq!(names(&n.recv().await), ["a", "b", "c", ACCESS_LOG_CLUSTER]);
    // istiod returns: the last-good stream ends so the next one is a clean handshake.
    let back = FakeIstiod::start_on(addr, mesh(), None).await.unwrap();
    assert_eq!(n.ended().await.code(), tonic::Code::Unavailable);
    let mut fresh = SotwClient::connect(r.addr, &[]).await;
    fresh.request(Some(node(true)), CLUSTER, &[], "").await;
    assert!(!fresh.recv().await.version_info.starts_with("last-good-"));
    assert!(back.streams() >= 1);
}

#[tokio::test]
async fn upstream_restart_ends_the_stream_and_a_reconnect_converges() {
    let istiod = FakeIstiod::start(mesh()).await.unwrap();
    let addr = istiod.addr;
    let r = relay(&istiod.url()).await;
    let mut c = converge(r.addr).await;
    istiod.stop().await;
    assert_eq!(c.ended().await.code(), tonic::Code::Unavailable);
    let _back = FakeIstiod::start_on(addr, mesh(), None).await.unwrap();
    let c = converge(r.addr).await;
    drop(c);
}

#[tokio::test]
async fn istiod_down_without_last_good_config_fails_the_stream() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = relay(&format!("http://127.0.0.1:{port}")).await;
    let mut c = SotwClient::connect(r.addr, &[]).await;
    c.request(Some(node(true)), CLUSTER, &[], "").await;
    assert_eq!(c.ended().await.code(), tonic::Code::Unavailable);
    assert!(
        r.relay.metrics().upstream_failures.get() >= 2,
        "retried with backoff"
    );
}

#[tokio::test]
async fn goaway_ends_the_stream_quietly_and_the_client_reconnects() {
    let istiod = FakeIstiod::start_on(
        "127.0.0.1:0".parse().unwrap(),
        mesh(),
        Some(Duration::from_millis(700)),
    )
    .await
    .unwrap();
    let r = relay(&istiod.url()).await;
    let mut c = converge(r.addr).await;
    // The routine max-connection-age GOAWAY (every 30 minutes in istiod) arrives.
    assert_eq!(c.ended().await.code(), tonic::Code::Unavailable);
    let _c = converge(r.addr).await;
    assert!(istiod.streams() >= 2);
}

#[tokio::test]
async fn unknown_types_and_ordinary_nodes_pass_through_unchanged() {
    let istiod = FakeIstiod::start(mesh()).await.unwrap();
    let r = relay(&istiod.url()).await;
    let mut gs = SotwClient::connect(r.addr, &[]).await;
    gs.request(Some(node(true)), PCDS, &["pc"], "").await;
    let pc = gs.recv().await;
    assert_eq!(
        pc.resources,
        vec![Any {
            type_url: PCDS.into(),
            value: vec![1, 2, 3]
        }]
    );

    // An ordinary sidecar: istiod's responses exactly, no relay nonce, no extra cluster.
    let mut plain = SotwClient::connect(r.addr, &[]).await;
    plain.request(Some(node(false)), CLUSTER, &[], "").await;
    let via_relay = plain.recv().await;
    let mut direct = SotwClient::connect(istiod.addr, &[]).await;
    direct.request(Some(node(false)), CLUSTER, &[], "").await;
    let from_istiod = direct.recv().await;
    assert_eq!(via_relay.resources, from_istiod.resources);
    assert!(!via_relay.nonce.starts_with("ll-"));
}

/// A node in interception mode NONE whose own Service exists gets istiod's inbound listener for
/// its port: the relay drops it for a global-sidecar (A10b) and passes it to any other node. A
/// wrongly typed `INTERCEPTION_MODE` fails the stream at istiod, as it does at the real one.
#[tokio::test]
async fn inbound_listeners_reach_only_ordinary_nodes() {
    let shape = SidecarShape {
        own_service: support::own_service::own_service(&[9080]),
        ..Default::default()
    };
    let istiod = FakeIstiod::start_sidecar(mesh(), shape).await.unwrap();
    let r = relay(&istiod.url()).await;
    let none_mode = |global_sidecar: bool, mode: Kind| {
        let mut n = node(global_sidecar);
        if let Some(m) = n.metadata.as_mut() {
            m.fields
                .insert("INTERCEPTION_MODE".into(), Value { kind: Some(mode) });
        }
        n
    };
    let none = || Kind::StringValue("NONE".into());
    let mut gs = SotwClient::connect(r.addr, &[]).await;
    gs.request(Some(none_mode(true, none())), LISTENER, &[], "").await;
    assert_eq!(names(&gs.recv().await), ["l1"]);
    let mut plain = SotwClient::connect(r.addr, &[]).await;
    plain
        .request(Some(none_mode(false, none())), LISTENER, &[], "")
        .await;
    assert_eq!(names(&plain.recv().await), ["0.0.0.0_9080", "l1"]);
    assert!(
        r.relay
            .metrics()
            .adjustments
            .get_or_create(&lazyload::xds::metrics::AdjustLabels {
                adjustment: "listener_dropped_inbound"
            })
            .get()
            >= 1
    );

    let mut bad = SotwClient::connect(r.addr, &[]).await;
    bad.request(Some(none_mode(true, Kind::BoolValue(true))), LISTENER, &[], "")
        .await;
    let status = bad.ended().await;
    assert!(status.message().contains("INTERCEPTION_MODE"), "{status:?}");
}

#[tokio::test]
async fn delta_streams_translate_nonces_and_hide_the_relay_cluster() {
    let istiod = FakeIstiod::start(mesh()).await.unwrap();
    let r = relay(&istiod.url()).await;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", r.addr))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(16);
    let mut stream = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut recv = async || -> DeltaDiscoveryResponse {
        tokio::time::timeout(WAIT, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    };
    tx.send(DeltaDiscoveryRequest {
        node: Some(node(true)),
        type_url: CLUSTER.into(),
        // A reconnecting Envoy lists what it has, the relay's own cluster included.
        initial_resource_versions: [
            ("a".to_string(), String::new()),
            (ACCESS_LOG_CLUSTER.to_string(), "lazyload".to_string()),
        ]
        .into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let cds = recv().await;
    let mut got: Vec<_> = cds.resources.iter().map(|r| r.name.clone()).collect();
    got.sort();
    assert_eq!(got, ["a", "b", "c", ACCESS_LOG_CLUSTER]);
    assert!(
        cds.removed_resources.is_empty(),
        "istiod never saw (and so never removes) the relay's cluster"
    );
    assert!(cds.nonce.starts_with("ll-"));
    tx.send(DeltaDiscoveryRequest {
        type_url: CLUSTER.into(),
        response_nonce: cds.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    istiod.set(CLUSTER, [("a".to_string(), cluster("a"))].into());
    let update = recv().await;
    let mut removed = update.removed_resources.clone();
    removed.sort();
    assert_eq!(removed, ["b", "c"]);
    eventually_true("the ACK reached istiod", WAIT, || {
        istiod.seen().iter().any(|s| !s.nonce.is_empty())
    })
    .await;
    assert!(istiod.seen().iter().all(|s| !s.nonce.starts_with("ll-")));
}

#[tokio::test]
async fn tls_towards_pilot_agent_and_towards_istiod() {
    let ca = support::certs::Ca::new();
    let istiod_cert = ca.workload("istio-system", "istiod", &["istiod.istio-system.svc"]);
    let istiod = FakeIstiod::start_tls(mesh(), &istiod_cert.cert, &istiod_cert.key)
        .await
        .unwrap();
    let dir = support::TempDir::new("relay-tls");
    std::fs::write(dir.path("root-cert.pem"), &ca.root).unwrap();

    let relay_cert = ca.workload("mesh-operator", "lazyload", &["lazyload.mesh-operator.svc"]);
    let tls = tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
        &relay_cert.cert,
        &relay_cert.key,
    ));
    let upstream = UpstreamConfig {
        address: format!("https://{}", istiod.addr),
        ca_file: Some(dir.path("root-cert.pem")),
        server_name: Some("istiod.istio-system.svc".into()),
        ..Default::default()
    };
    let relay = TestRelay::start_tls(upstream, Settings::default(), Some(tls)).await;
    let addr = relay.addr;

    // pilot-agent's side: verify the relay against the mesh root for its discoveryAddress host.
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&ca.root))
                .domain_name("lazyload.mesh-operator.svc"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(DiscoveryRequest {
        node: Some(node(true)),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let cds = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(names(&cds), ["a", "b", "c"]);
    relay.stop();

    // A relay that does not trust istiod's certificate fails the stream instead.
    let wrong = Upstream::new(UpstreamConfig {
        address: format!("https://{}", istiod.addr),
        ca_file: Some(dir.path("root-cert.pem")),
        server_name: Some("someone-else.svc".into()),
        ..Default::default()
    })
    .unwrap();
    assert!(wrong.connect().await.is_err(), "server name is checked");
}

/// Opens a SotW stream whose requests are `M` (not `DiscoveryRequest`): garbage on the wire.
async fn raw_stream<M: prost::Message + Default + Send + Sync + 'static>(
    addr: SocketAddr,
    messages: Vec<M>,
) -> Result<Streaming<DiscoveryResponse>, tonic::Status> {
    let mut grpc = lazyload::testing::grpc_client(addr).await;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
    );
    let codec = tonic_prost::ProstCodec::<M, DiscoveryResponse>::default();
    let request = tonic::Request::new(tokio_stream::iter(messages));
    grpc.streaming(request, path, codec)
        .await
        .map(tonic::Response::into_inner)
}

/// Issue 16 item 8: a first request that is not a `DiscoveryRequest` (field 1, a string, holds
/// bytes that are not UTF-8) or that has no node ends the stream with `InvalidArgument`, and
/// is counted; istiod is never asked.
#[tokio::test]
async fn garbage_first_requests_end_the_stream_with_invalid_argument() {
    let istiod = FakeIstiod::start(mesh()).await.unwrap();
    let r = relay(&istiod.url()).await;
    let garbage = envoy_types::pb::google::protobuf::BytesValue {
        value: vec![0xff, 0xfe, 0xfd],
    };
    let status = match raw_stream(r.addr, vec![garbage]).await {
        Ok(mut stream) => tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("the stream ends in time")
            .expect_err("an error status"),
        Err(status) => status,
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    let mut c = SotwClient::connect(r.addr, &[]).await;
    c.request(None, CLUSTER, &[], "").await;
    let status = c.ended().await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("node"), "{status:?}");
    assert_eq!(r.relay.metrics().invalid_requests.get(), 2);
    assert_eq!(
        istiod.streams(),
        0,
        "istiod is not asked for a stream that is refused"
    );
}

/// Issue 16 item 8: a response whose resources are of another type than the response says is
/// not relayed (counted, logged); the next valid one is.
#[tokio::test]
async fn responses_holding_resources_of_another_type_are_not_relayed() {
    let istiod = FakeIstiod::start(mesh()).await.unwrap();
    let r = relay(&istiod.url()).await;
    let mut c = SotwClient::connect(r.addr, &[]).await;
    c.request(Some(node(false)), CLUSTER, &[], "").await;
    let cds = c.recv().await;
    c.request(None, CLUSTER, &[], &cds.nonce).await;
    // A "Cluster" response holding a Listener.
    istiod.set(CLUSTER, [("x".to_string(), listener("x"))].into());
    assert!(
        c.silent(Duration::from_millis(500)).await,
        "a mistyped response was relayed"
    );
    let dropped = r
        .relay
        .metrics()
        .upstream_invalid
        .get_or_create(&lazyload::xds::metrics::Metrics::type_labels(CLUSTER))
        .get();
    assert_eq!(dropped, 1);
    istiod.set(CLUSTER, [("a".to_string(), cluster("a"))].into());
    assert_eq!(names(&c.recv().await), ["a"]);
}

/// Issue 16 item 5: a downstream that leaves before istiod's first answer (istiod sends no
/// headers before it) takes its upstream stream with it.
#[tokio::test]
async fn a_downstream_leaving_before_istiods_first_answer_drops_the_upstream_stream() {
    let istiod = FakeIstiod::start(mesh()).await.unwrap();
    istiod.go_silent();
    let r = relay(&istiod.url()).await;
    for global_sidecar in [false, true] {
        let c = SotwClient::connect(r.addr, &[]).await;
        c.request(Some(node(global_sidecar)), CLUSTER, &[], "").await;
        eventually_true("istiod sees the stream", WAIT, || istiod.open_streams() == 1).await;
        drop(c);
        eventually_true("the upstream stream is closed", WAIT, || {
            istiod.open_streams() == 0
        })
        .await;
    }
}

/// Issue 16 item 5: a request over the size limit ends its stream with `ResourceExhausted`
/// before it is read whole, and is never relayed.
#[tokio::test]
async fn requests_over_the_size_limit_end_the_stream() {
    let istiod = FakeIstiod::start(mesh()).await.unwrap();
    let limits = lazyload::xds::server::ServerLimits {
        max_request_bytes: 64 << 10,
        ..Default::default()
    };
    let r = TestRelay::start_limited(upstream_config(&istiod.url()), Settings::default(), None, limits).await;
    let mut c = SotwClient::connect(r.addr, &[]).await;
    let name = "x".repeat(100 << 10);
    c.request(Some(node(false)), ENDPOINT, &[&name], "").await;
    let status = c.ended().await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(istiod.streams(), 0);
    // A request under the limit is served.
    let mut c = SotwClient::connect(r.addr, &[]).await;
    c.request(Some(node(false)), ENDPOINT, &["a"], "").await;
    assert_eq!(c.recv().await.resources.len(), 1);
}

/// Issue 16 item 5: connections that never send the HTTP/2 preface are closed after the
/// handshake timeout, and connections past the limit are closed at once (counted), while a
/// real client still gets through once a place is free.
#[tokio::test]
async fn idle_connections_time_out_and_the_connection_limit_holds() {
    let istiod = FakeIstiod::start(mesh()).await.unwrap();
    let limits = lazyload::xds::server::ServerLimits {
        connections: lazyload::net::ConnectionLimits {
            max_connections: 2,
            handshake_timeout: Duration::from_millis(500),
        },
        ..Default::default()
    };
    let r = TestRelay::start_limited(upstream_config(&istiod.url()), Settings::default(), None, limits).await;
    support::bounds::check_limit_and_handshake_timeout(r.addr, 2).await;
    assert_eq!(r.relay.metrics().refused_connections.get(), 1);
    // Places are free again: a client is served.
    let mut c = SotwClient::connect(r.addr, &[]).await;
    c.request(Some(node(false)), CLUSTER, &[], "").await;
    assert_eq!(names(&c.recv().await), ["a", "b", "c"]);
}

/// Issue 16 item 2: with a token of its own (`--upstream-token-file`), the relay lends it only to
/// clients it authenticated. A plaintext client without credentials is refused with
/// `Unauthenticated` before istiod is asked (nor is it served the last good config); one that
/// brings its own `authorization` is served with that, never with the relay's token.
#[tokio::test]
async fn the_relay_lends_its_own_token_to_no_unauthenticated_client() {
    let istiod = FakeIstiod::start(mesh()).await.unwrap();
    let dir = support::TempDir::new("relay-token");
    let token = dir.path("token");
    std::fs::write(&token, "relay-own-token\n").unwrap();
    let upstream = UpstreamConfig {
        token_file: Some(token),
        ..upstream_config(&istiod.url())
    };
    let r = TestRelay::start(upstream, Settings::default()).await;

    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", r.addr))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(16);
    tx.send(DiscoveryRequest {
        node: Some(node(true)),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let status = match client
        .stream_aggregated_resources(tonic::Request::new(ReceiverStream::new(rx)))
        .await
    {
        Ok(resp) => tokio::time::timeout(WAIT, resp.into_inner().message())
            .await
            .expect("the stream ends in time")
            .expect_err("an error status"),
        Err(status) => status,
    };
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert_eq!(r.relay.metrics().unauthenticated.get(), 1);
    assert_eq!(istiod.streams(), 0, "istiod is never asked on its behalf");

    let mut c = SotwClient::connect(r.addr, &[("authorization", "Bearer gs-token")]).await;
    c.request(Some(node(true)), CLUSTER, &[], "").await;
    c.recv().await;
    let seen = istiod.seen();
    assert!(!seen.is_empty());
    assert!(
        seen.iter()
            .all(|s| s.authorization.as_deref() == Some("Bearer gs-token")),
        "only the client's own credentials reach istiod: {seen:?}"
    );
}

/// Issue 16 item 2: a client authenticated by a certificate from `--xds-tls-client-ca` (a stock
/// Envoy global-sidecar with its workload certificate) is served with the relay's own token.
#[tokio::test]
async fn a_client_with_a_verified_certificate_gets_the_relays_token() {
    let istiod = FakeIstiod::start(mesh()).await.unwrap();
    let ca = support::certs::Ca::new();
    let dir = support::TempDir::new("relay-mtls-token");
    let token = dir.path("token");
    std::fs::write(&token, "relay-own-token\n").unwrap();
    let relay_cert = ca.workload("mesh-operator", "lazyload", &["lazyload.mesh-operator.svc"]);
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            &relay_cert.cert,
            &relay_cert.key,
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(&ca.root));
    let upstream = UpstreamConfig {
        token_file: Some(token),
        ..upstream_config(&istiod.url())
    };
    let relay = TestRelay::start_tls(upstream, Settings::default(), Some(tls)).await;

    let gs = ca.workload(
        "mesh-operator",
        "global-sidecar",
        &["global-sidecar.mesh-operator.svc"],
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", relay.addr))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&ca.root))
                .identity(tonic::transport::Identity::from_pem(&gs.cert, &gs.key))
                .domain_name("lazyload.mesh-operator.svc"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(node(true)),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let cds = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a response in time")
        .expect("served, not refused")
        .expect("a response");
    assert!(!cds.resources.is_empty());
    assert_eq!(relay.relay.metrics().unauthenticated.get(), 0);
    assert_eq!(
        istiod.seen()[0].authorization.as_deref(),
        Some("Bearer relay-own-token"),
        "the relay's own token, for a client it authenticated"
    );
}

/// An "istiod" that answers every ADS call with one message that is not a `DiscoveryResponse`
/// (a resources field whose length is cut short) and then keeps the call open.
#[derive(Clone)]
struct MalformedIstiod;

impl tonic::server::NamedService for MalformedIstiod {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

impl tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for MalformedIstiod {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        use futures::StreamExt;
        use lazyload::xds::grpc::{Outgoing, frame_with, response};
        let malformed = frame_with(2, |buf| buf.extend_from_slice(&[0x12, 0xff]));
        let messages =
            futures::stream::iter([Ok::<_, tonic::Status>(malformed)]).chain(futures::stream::pending());
        std::future::ready(Ok(response(Outgoing::response(messages))))
    }
}

/// A response from istiod that does not decode ends the stream, global-sidecar or not, with
/// `Unavailable` saying why (Envoy reconnects with its config intact); the relay serves the
/// next stream the same way rather than hanging or failing.
#[tokio::test]
async fn a_malformed_response_from_istiod_ends_the_stream_saying_why() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MalformedIstiod)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let r = relay(&format!("http://{addr}")).await;
    for global_sidecar in [true, false, true] {
        let mut c = SotwClient::connect(r.addr, &[]).await;
        c.request(Some(node(global_sidecar)), CLUSTER, &[], "").await;
        let status = c.ended().await;
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("decode"), "{status:?}");
    }
}
