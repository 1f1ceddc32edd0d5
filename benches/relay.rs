//! Relay benchmark: an Istio-shaped mesh of N services (a cluster, 3 endpoints and a virtual host
//! per service over 20 ports) served by the test istiod; a global-sidecar client converges
//! directly and through `lazyload serve` (a separate process, so its memory can be read), in the
//! same run. Prints, per N: convergence time via the relay vs direct, the added latency of an
//! incremental EDS push (p50/p99), and the relay's RSS for the first and each further replica.
//!
//! `cargo bench --bench relay` (release). `LAZYLOAD_BENCH_SIZES=1000,10000` to choose N.
//!
//! The per-port listener and route configuration are the demo's (`demo::mesh::outbound_port`):
//! since 2026-11-23 each HCM carries a router filter and listeners bind (`bind_to_port` unset),
//! a few bytes more per listener than in the figures recorded before.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig,
};
use envoy_types::pb::envoy::config::core::v3::{ConfigSource, Node, config_source};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::route::v3::VirtualHost;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{Any, Struct, Value, value::Kind};
use lazyload::demo::mesh::{outbound_port, route_to};
use lazyload::xds::adjust::socket;
use lazyload::xds::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use support::free_port;
use support::istiod::{Config, TestIstiod, any};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const PORTS: u16 = 20;

fn cla(name: &str, i: usize, generation: u32) -> Any {
    let endpoints = (0..3)
        .map(|e| LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                address: Some(socket(
                    &format!("10.{}.{}.{}", (i >> 8) & 255, i & 255, e + generation),
                    8080,
                )),
                ..Default::default()
            })),
            ..Default::default()
        })
        .collect();
    any(&ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: endpoints,
            ..Default::default()
        }],
        ..Default::default()
    })
}

/// The mesh: config, cluster names, route names, and its size in bytes.
fn mesh(n: usize) -> (Config, Vec<String>, Vec<String>, usize) {
    let ads = ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(Default::default())),
        resource_api_version: 2,
        ..Default::default()
    };
    let mut clusters = BTreeMap::new();
    let mut endpoints = BTreeMap::new();
    let mut vhosts: BTreeMap<u16, Vec<VirtualHost>> = BTreeMap::new();
    for i in 0..n {
        let port = 8000 + (i % usize::from(PORTS)) as u16;
        let (svc, ns) = (format!("svc-{i}"), format!("ns-{}", i % 50));
        let fqdn = format!("{svc}.{ns}.svc.cluster.local");
        let name = format!("outbound|{port}||{fqdn}");
        clusters.insert(
            name.clone(),
            any(&Cluster {
                name: name.clone(),
                cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
                eds_cluster_config: Some(EdsClusterConfig {
                    eds_config: Some(ads.clone()),
                    service_name: name.clone(),
                }),
                connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: 10,
                    nanos: 0,
                }),
                ..Default::default()
            }),
        );
        endpoints.insert(name.clone(), cla(&name, i, 0));
        vhosts.entry(port).or_default().push(VirtualHost {
            name: format!("{fqdn}:{port}"),
            domains: vec![
                fqdn.clone(),
                format!("{svc}.{ns}"),
                format!("{svc}.{ns}.svc"),
                format!("10.96.{}.{}", (i >> 8) & 255, i & 255),
            ],
            routes: vec![route_to(&name)],
            ..Default::default()
        });
    }
    let mut routes = BTreeMap::new();
    let mut listeners = BTreeMap::new();
    for (port, vh) in vhosts {
        let (route, listener) = outbound_port("0.0.0.0", port, vh);
        routes.insert(route.name.clone(), any(&route));
        listeners.insert(listener.name.clone(), any(&listener));
    }
    let cluster_names = clusters.keys().cloned().collect();
    let route_names = routes.keys().cloned().collect();
    let mut config = Config::new();
    config.insert(CLUSTER.into(), clusters);
    config.insert(ENDPOINT.into(), endpoints);
    config.insert(ROUTE.into(), routes);
    config.insert(LISTENER.into(), listeners);
    let bytes = config
        .values()
        .flat_map(|m| m.values())
        .map(|a| a.value.len())
        .sum();
    (config, cluster_names, route_names, bytes)
}

/// A global-sidecar node; replicas >= 1000 are ordinary sidecars (passed through unadjusted).
fn node(replica: usize) -> Node {
    let marker = (replica < 1000).then(|| {
        (
            "SLIME_APP".to_string(),
            Value {
                kind: Some(Kind::StringValue("LAZYLOAD_GLOBAL_SIDECAR".into())),
            },
        )
    });
    Node {
        id: format!(
            "sidecar~10.0.0.{replica}~global-sidecar-5d9f7-r{replica}.mesh-operator~mesh-operator.svc.cluster.local"
        ),
        metadata: Some(Struct {
            fields: marker.into_iter().collect(),
        }),
        ..Default::default()
    }
}

struct Client {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl Client {
    async fn recv(&mut self) -> DiscoveryResponse {
        self.rx.message().await.expect("stream").expect("response")
    }

    async fn send(&self, type_url: &str, names: &[String], nonce: &str, node: Option<Node>) {
        self.tx
            .send(DiscoveryRequest {
                node,
                type_url: type_url.into(),
                resource_names: names.to_vec(),
                response_nonce: nonce.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// Connects and converges: CDS, EDS for every cluster, LDS, RDS for every route; each ACKed.
    async fn converge(
        addr: SocketAddr,
        replica: usize,
        clusters: &[String],
        routes: &[String],
    ) -> (Client, Duration) {
        let start = Instant::now();
        let mut ads = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
            .max_decoding_message_size(1 << 30);
        let (tx, rx) = mpsc::channel(16);
        let rx = ads
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut c = Client { tx, rx };
        let mut plan = vec![
            (CLUSTER, vec![]),
            (ENDPOINT, clusters.to_vec()),
            (LISTENER, vec![]),
            (ROUTE, routes.to_vec()),
        ];
        let mut first = Some(node(replica));
        for (type_url, names) in plan.drain(..) {
            c.send(type_url, &names, "", first.take()).await;
            let resp = c.recv().await;
            c.send(type_url, &names, &resp.nonce, None).await;
        }
        (c, start.elapsed())
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

struct RelayProcess(Child);

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_relay(upstream: &str) -> (RelayProcess, SocketAddr) {
    let xds = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let child = Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .env_remove("KUBECONFIG")
        .args(["serve", "--upstream", upstream, "--als-address", "127.0.0.1:8082"])
        .args([
            "--xds-listen",
            &xds.to_string(),
            "--admin-listen",
            &admin.to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("lazyload serve");
    let relay = RelayProcess(child);
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(xds).await.is_ok() {
            return (relay, xds);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the relay did not start");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Time from istiod's push of one cluster's endpoints to the client receiving it.
async fn eds_latencies(
    istiod: &TestIstiod,
    client: &mut Client,
    clusters: &[String],
    rounds: usize,
) -> Vec<Duration> {
    let mut out = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let name = &clusters[r % clusters.len()];
        let start = Instant::now();
        istiod.update_partial(
            ENDPOINT,
            [(name.clone(), cla(name, r, 1 + (r % 7) as u32))].into(),
        );
        let resp = client.recv().await;
        out.push(start.elapsed());
        client.send(ENDPOINT, clusters, &resp.nonce, None).await;
        // istiod debounces pushes (100 ms and more): let the ACK settle before the next one.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    out.sort();
    out
}

/// Time the relay's state machine spends on each type's full response (no network).
fn adjust_costs(config: &Config) -> String {
    use lazyload::xds::NodeInfo;
    use lazyload::xds::adjust::{Adjuster, Counts, Settings};
    use lazyload::xds::cache::Interner;
    use lazyload::xds::sotw::SotwStream;
    use lazyload::xds::stream::StreamState;
    let settings = Settings {
        als_address: Some(("127.0.0.1".into(), 8082)),
        ..Default::default()
    };
    let node = NodeInfo::from_node(Some(&node(0)), None);
    let adj = Adjuster {
        settings: &settings,
        node: &node,
    };
    let interner = Interner::default();
    let mut state = SotwStream::new(1);
    let mut out = Vec::new();
    for (type_url, resources) in config {
        let resp = DiscoveryResponse {
            version_info: "v".into(),
            resources: resources.values().cloned().collect(),
            type_url: type_url.clone(),
            nonce: "n".into(),
            ..Default::default()
        };
        let start = Instant::now();
        let _ = state.upstream_response(resp, &adj, &interner, &mut Counts::default());
        let short = type_url.rsplit('.').next().unwrap_or_default();
        out.push(format!("{short} {:.1} ms", start.elapsed().as_secs_f64() * 1e3));
    }
    out.join(", ")
}

async fn run(n: usize) {
    let (config, clusters, routes, bytes) = mesh(n);
    let costs = adjust_costs(&config);
    let istiod = TestIstiod::start(config).await;
    let (relay, relay_addr) = start_relay(&istiod.url()).await;
    let pid = relay.0.id();

    // Warm both paths once (connection setup, allocator), then measure in alternation.
    let _ = Client::converge(istiod.addr, 90, &clusters, &routes).await;
    let mut direct_times = Vec::new();
    let mut relay_times = Vec::new();
    let rss_idle = rss_kib(pid);
    let mut replicas = Vec::new();
    let mut rss = vec![rss_idle];
    for replica in 0..3 {
        let (_, d) = Client::converge(istiod.addr, 100 + replica, &clusters, &routes).await;
        direct_times.push(d);
        let (c, r) = Client::converge(relay_addr, replica, &clusters, &routes).await;
        relay_times.push(r);
        replicas.push(c);
        tokio::time::sleep(Duration::from_millis(200)).await;
        rss.push(rss_kib(pid));
    }
    let direct = direct_times.iter().min().unwrap();
    let via = relay_times.iter().min().unwrap();
    let mut plain = Vec::new();
    for replica in 0..3 {
        plain.push(
            Client::converge(relay_addr, 1000 + replica, &clusters, &routes)
                .await
                .1,
        );
    }
    let plain = plain.iter().min().unwrap();

    // A push reaches every subscribed stream: measure each path with only its client connected.
    drop(replicas);
    let rounds = 300;
    let (mut direct_client, _) = Client::converge(istiod.addr, 200, &clusters, &routes).await;
    let direct_eds = eds_latencies(&istiod, &mut direct_client, &clusters, rounds).await;
    drop(direct_client);
    let (mut relay_client, _) = Client::converge(relay_addr, 201, &clusters, &routes).await;
    let relay_eds = eds_latencies(&istiod, &mut relay_client, &clusters, rounds).await;

    let mib = |k: u64| k as f64 / 1024.0;
    let config_mib = bytes as f64 / (1024.0 * 1024.0);
    println!(
        "N = {n}: config {config_mib:.2} MiB ({} clusters, {} routes)",
        clusters.len(),
        routes.len()
    );
    println!("  relay state machine per full response: {costs}");
    println!(
        "  converge (CDS+EDS+LDS+RDS, all ACKed): direct {:.1} ms, via relay {:.1} ms, ratio {:.2}x",
        direct.as_secs_f64() * 1e3,
        via.as_secs_f64() * 1e3,
        via.as_secs_f64() / direct.as_secs_f64()
    );
    println!(
        "  converge, ordinary sidecar through the relay (no adjustments): {:.1} ms, ratio {:.2}x",
        plain.as_secs_f64() * 1e3,
        plain.as_secs_f64() / direct.as_secs_f64()
    );
    let added = |p: f64| {
        percentile(&relay_eds, p).as_secs_f64() * 1e3 - percentile(&direct_eds, p).as_secs_f64() * 1e3
    };
    println!(
        "  incremental EDS push: direct p50 {:.3} ms p99 {:.3} ms; via relay p50 {:.3} ms p99 {:.3} ms; added p50 {:.3} ms p99 {:.3} ms",
        percentile(&direct_eds, 0.5).as_secs_f64() * 1e3,
        percentile(&direct_eds, 0.99).as_secs_f64() * 1e3,
        percentile(&relay_eds, 0.5).as_secs_f64() * 1e3,
        percentile(&relay_eds, 0.99).as_secs_f64() * 1e3,
        added(0.5),
        added(0.99)
    );
    let first = mib(rss[1].saturating_sub(rss[0]));
    let further: Vec<String> = rss
        .windows(2)
        .skip(1)
        .map(|w| format!("{:.2}", mib(w[1].saturating_sub(w[0]))))
        .collect();
    println!(
        "  relay RSS: idle {:.1} MiB; first replica +{first:.2} MiB ({:.2}x config); further replicas +[{}] MiB ({:.3}x config each, mean)",
        mib(rss[0]),
        first / config_mib,
        further.join(", "),
        (mib(rss[3].saturating_sub(rss[1])) / 2.0) / config_mib
    );
    drop(relay_client);
    drop(relay);
    istiod.stop().await;
}

fn main() {
    let sizes: Vec<usize> = std::env::var("LAZYLOAD_BENCH_SIZES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for n in sizes {
            run(n).await;
        }
    });
}
