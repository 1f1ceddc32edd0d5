//! Relay benchmark: an Istio-shaped mesh of N services (a cluster, 3 endpoints and a virtual host
//! per service over 20 ports) served by the fake istiod; a global-sidecar client converges
//! directly, through a null relay (a TCP proxy forwarding bytes without decoding them: the
//! floor), and through `lazyload serve` (a separate process, so its memory can be read), all in
//! the same run. Prints, per N: convergence time via each path vs direct, the added latency of an
//! incremental EDS push (p50/p99), the relay's CPU time per converge (not inflated by other
//! load on the machine), the relay's RSS for the first replica and per further replica (the mean over
//! seven), the relay per response (read, adjusted, written), including the whole RDS response when one service
//! changed (the incremental route path) against adjusting it from scratch.
//!
//! `cargo bench --bench relay` (release). `LAZYLOAD_BENCH_SIZES=1000,10000` to choose N.
//! `LAZYLOAD_BENCH_BASELINE=/path/to/an/older/lazyload` also measures that binary in the same
//! run and prints the figures of this build as ratios against it.
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
use lazyload::fake_istiod::{Config, FakeIstiod};
use lazyload::xds::adjust::pack as any;
use lazyload::xds::adjust::socket;
use lazyload::xds::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use support::free_port;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const PORTS: u16 = 20;
/// Envoy's default HTTP/2 `initial_stream_window_size` and `initial_connection_window_size`.
const ENVOY_WINDOW: u32 = 256 << 20;

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
        // Envoy's HTTP/2 defaults: 256 MiB stream and connection windows (hyper's 2 MiB
        // would make every path, direct included, wait for WINDOW_UPDATEs mid-response).
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .initial_stream_window_size(ENVOY_WINDOW)
            .initial_connection_window_size(ENVOY_WINDOW)
            .connect()
            .await
            .unwrap();
        let mut ads = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(1 << 30);
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

/// CPU time the process `pid` has used (all its threads), from the scheduler's per-thread
/// nanosecond counters: a figure of the relay's own cost that other load on the machine does
/// not inflate, unlike wall-clock converge times.
fn cpu_time(pid: u32) -> Duration {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten();
    let ns: u64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

struct RelayProcess(Child);

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_relay(binary: &str, upstream: &str) -> (RelayProcess, SocketAddr) {
    let xds = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let child = Command::new(binary)
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
    istiod: &FakeIstiod,
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

/// A null relay: a TCP proxy to `upstream` that forwards bytes without decoding them.
async fn start_null_relay(upstream: SocketAddr) -> (tokio::task::JoinHandle<()>, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = down.set_nodelay(true);
                if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = up.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
            });
        }
    });
    (task, addr)
}

/// The route configuration of `config` holding `svc-0`, with that one service changed (a route
/// added in front of its own, as a VirtualService would).
fn one_service_changed(config: &Config) -> (String, Any) {
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use prost::Message;
    let routes = &config[ROUTE];
    for (name, any) in routes {
        let mut rc = RouteConfiguration::decode(&*any.value).unwrap();
        if let Some(vh) = rc.virtual_hosts.iter_mut().find(|v| v.name.starts_with("svc-0.")) {
            let mut canary = vh.routes[0].clone();
            canary.name = "canary".into();
            vh.routes.insert(0, canary);
            return (name.clone(), lazyload::xds::adjust::pack(&rc));
        }
    }
    panic!("svc-0 has no route configuration");
}

/// Time the relay's state machine spends on each type's full response (no network), then on
/// the whole RDS response in which one service changed: incrementally (what the relay does)
/// and from scratch (decode, adjust and re-encode every route configuration, as before the
/// incremental path) in the same run.
fn adjust_costs(config: &Config) -> (String, String) {
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use lazyload::xds::NodeInfo;
    use lazyload::xds::adjust::{Adjuster, Counts, Settings, pack};
    use lazyload::xds::cache::Interner;
    use lazyload::xds::request::SotwRequest;
    use lazyload::xds::response::SotwResponse;
    use lazyload::xds::sotw::SotwStream;
    use lazyload::xds::stream::StreamState;
    use prost::Message;
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
    // A response as istiod's bytes: the relay reads it, adjusts it and writes it.
    let response = |type_url: &str, resources: Vec<Any>| {
        let resp = DiscoveryResponse {
            version_info: "v".into(),
            resources,
            type_url: type_url.into(),
            nonce: "n".into(),
            ..Default::default()
        };
        prost::bytes::Bytes::from(resp.encode_to_vec())
    };
    let relay = |state: &mut SotwStream, bytes: prost::bytes::Bytes| {
        let resp = SotwResponse::decode(bytes).unwrap();
        let out = state.upstream_response(resp, &adj, &interner, &mut Counts::default());
        std::hint::black_box(out.frame());
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut out = Vec::new();
    for (type_url, resources) in config {
        let resp = response(type_url, resources.values().cloned().collect());
        let start = Instant::now();
        relay(&mut state, resp);
        let short = type_url.rsplit('.').next().unwrap_or_default();
        out.push(format!("{short} {:.1} ms", ms(start.elapsed())));
    }

    let (changed_name, changed) = one_service_changed(config);
    let original = config[ROUTE][&changed_name].clone();
    let mut routes = config[ROUTE].clone();
    routes.insert(changed_name, changed.clone());
    let best_of = |f: &mut dyn FnMut() -> Duration| (0..5).map(|_| f()).min().unwrap();
    // Alternate the changed and the original configuration so that each push has a change.
    let mut flip = false;
    let mut push = |resources: Vec<Any>| {
        let resp = response(ROUTE, resources);
        let start = Instant::now();
        relay(&mut state, resp);
        start.elapsed()
    };
    let whole = best_of(&mut || {
        flip = !flip;
        let set = if flip { &routes } else { &config[ROUTE] };
        push(set.values().cloned().collect())
    });
    let single = best_of(&mut || {
        flip = !flip;
        let any = if flip { changed.clone() } else { original.clone() };
        push(vec![any])
    });
    let scratch = best_of(&mut || {
        let start = Instant::now();
        for any in routes.values() {
            let mut rc = RouteConfiguration::decode(&*any.value).unwrap();
            adj.route(&mut rc, &mut Counts::default());
            std::hint::black_box(pack(&rc));
        }
        start.elapsed()
    });
    // What the relay pays per SotW EDS ACK (every subscribed name in it): decode the head
    // (the names stay encoded), translate, encode for istiod; from a shared buffer, as tonic
    // hands it over. Against decoding the whole request and encoding it again (as before).
    let ack = prost::bytes::Bytes::from(
        DiscoveryRequest {
            version_info: "ll3:v".into(),
            resource_names: config[ENDPOINT].keys().cloned().collect(),
            type_url: ENDPOINT.into(),
            response_nonce: "ll-1-3".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let mut ack_state = SotwStream::new(1);
    let translate_ack = best_of(&mut || {
        let start = Instant::now();
        let req = SotwRequest::decode(&ack).unwrap();
        let (req, _) = ack_state.downstream_request(req);
        std::hint::black_box(req.encode_to_vec());
        start.elapsed()
    });
    let whole_ack = best_of(&mut || {
        let start = Instant::now();
        let mut req = DiscoveryRequest::decode(ack.clone()).unwrap();
        req.response_nonce = "istiod-3".into();
        std::hint::black_box(req.encode_to_vec());
        start.elapsed()
    });
    let incremental = format!(
        "whole RDS response with one service changed: incremental {:.2} ms, from scratch {:.1} ms, ratio {:.3}x; the changed route configuration alone {:.2} ms",
        ms(whole),
        ms(scratch),
        ms(whole) / ms(scratch),
        ms(single)
    );
    let incremental = format!(
        "{incremental}\n  a SotW EDS ACK ({} names) read, translated and written for istiod: {:.3} ms; decoded whole and encoded again (before): {:.3} ms",
        config[ENDPOINT].len(),
        ms(translate_ack),
        ms(whole_ack)
    );
    (out.join(", "), incremental)
}

/// What one relay did in the run.
struct RelayFigures {
    converge: Duration,
    /// The relay's CPU time for one global-sidecar converge (least of three).
    cpu: Duration,
    plain: Duration,
    eds: Vec<Duration>,
    /// RSS (KiB) idle, then after each global-sidecar replica converged.
    rss: Vec<u64>,
}

/// Global-sidecar replicas converged through each relay. The RSS figure is the mean over the
/// further ones: a single replica's step is mostly the allocator's noise (a transient buffer
/// kept or returned), which the mean over several evens out.
const REPLICAS: usize = 8;

/// RSS (KiB) the relay grew by per further replica, mean (negative when it shrank).
fn per_further_replica(rss: &[u64]) -> f64 {
    (rss[REPLICAS] as f64 - rss[1] as f64) / (REPLICAS - 1) as f64
}

/// Converges the global-sidecar replicas and three ordinary sidecars through the relay at
/// `addr` (each converge of a replica follows a direct one, so both see the same machine), then
/// measures incremental EDS pushes through it alone.
async fn measure_relay(
    istiod: &FakeIstiod,
    addr: SocketAddr,
    pid: u32,
    clusters: &[String],
    routes: &[String],
    direct_times: &mut Vec<Duration>,
) -> RelayFigures {
    let _ = Client::converge(addr, 80, clusters, routes).await;
    let mut times = Vec::new();
    let mut cpu = Vec::new();
    let mut rss = vec![rss_kib(pid)];
    let mut replicas = Vec::new();
    for replica in 0..REPLICAS {
        let (_, d) = Client::converge(istiod.addr, 100 + replica, clusters, routes).await;
        direct_times.push(d);
        let before = cpu_time(pid);
        let (c, r) = Client::converge(addr, replica, clusters, routes).await;
        cpu.push(cpu_time(pid).saturating_sub(before));
        times.push(r);
        replicas.push(c);
        tokio::time::sleep(Duration::from_millis(200)).await;
        rss.push(rss_kib(pid));
    }
    let mut plain = Vec::new();
    for replica in 0..3 {
        plain.push(Client::converge(addr, 1000 + replica, clusters, routes).await.1);
    }
    // A push reaches every subscribed stream: measure with only this client connected.
    drop(replicas);
    let (mut client, _) = Client::converge(addr, 201, clusters, routes).await;
    let eds = eds_latencies(istiod, &mut client, clusters, 300).await;
    RelayFigures {
        converge: times.into_iter().min().unwrap(),
        cpu: cpu.into_iter().min().unwrap(),
        plain: plain.into_iter().min().unwrap(),
        eds,
        rss,
    }
}

fn print_relay(name: &str, f: &RelayFigures, direct: Duration, direct_eds: &[Duration], config_mib: f64) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mib = |k: u64| k as f64 / 1024.0;
    println!("  {name}:");
    println!(
        "    converge (CDS+EDS+LDS+RDS, all ACKed): {:.1} ms, ratio to direct {:.2}x; ordinary sidecar {:.1} ms ({:.2}x)",
        ms(f.converge),
        ms(f.converge) / ms(direct),
        ms(f.plain),
        ms(f.plain) / ms(direct)
    );
    println!(
        "    relay CPU time per global-sidecar converge: {:.1} ms",
        ms(f.cpu)
    );
    let added = |p: f64| ms(percentile(&f.eds, p)) - ms(percentile(direct_eds, p));
    println!(
        "    incremental EDS push: p50 {:.3} ms p99 {:.3} ms; added to direct p50 {:.3} ms p99 {:.3} ms",
        ms(percentile(&f.eds, 0.5)),
        ms(percentile(&f.eds, 0.99)),
        added(0.5),
        added(0.99)
    );
    let rss = &f.rss;
    let first = mib(rss[1].saturating_sub(rss[0]));
    let further: Vec<String> = rss
        .windows(2)
        .skip(1)
        .map(|w| format!("{:+.2}", (w[1] as f64 - w[0] as f64) / 1024.0))
        .collect();
    println!(
        "    RSS: idle {:.1} MiB; first replica +{first:.2} MiB ({:.2}x config); further replicas [{}] MiB ({:.3}x config each, mean)",
        mib(rss[0]),
        first / config_mib,
        further.join(", "),
        per_further_replica(rss) / 1024.0 / config_mib
    );
}

async fn run(n: usize, baseline: Option<&str>) {
    let (config, clusters, routes, bytes) = mesh(n);
    let (costs, incremental) = adjust_costs(&config);
    let istiod = FakeIstiod::start(config).await.unwrap();
    let (null_task, null_addr) = start_null_relay(istiod.addr).await;
    let _ = Client::converge(istiod.addr, 90, &clusters, &routes).await;

    let mut direct_times = Vec::new();
    let mut null_times = Vec::new();
    for replica in 0..3 {
        direct_times.push(
            Client::converge(istiod.addr, 110 + replica, &clusters, &routes)
                .await
                .1,
        );
        null_times.push(
            Client::converge(null_addr, 120 + replica, &clusters, &routes)
                .await
                .1,
        );
    }
    let mut relays = vec![("this build", env!("CARGO_BIN_EXE_lazyload").to_string())];
    relays.extend(baseline.map(|b| ("baseline", b.to_string())));
    let mut figures = Vec::new();
    for (name, binary) in &relays {
        let (relay, addr) = start_relay(binary, &istiod.url()).await;
        let f = measure_relay(&istiod, addr, relay.0.id(), &clusters, &routes, &mut direct_times).await;
        figures.push((*name, f));
        drop(relay);
    }
    let (mut direct_client, _) = Client::converge(istiod.addr, 200, &clusters, &routes).await;
    let direct_eds = eds_latencies(&istiod, &mut direct_client, &clusters, 300).await;
    drop(direct_client);
    let (mut null_client, _) = Client::converge(null_addr, 202, &clusters, &routes).await;
    let null_eds = eds_latencies(&istiod, &mut null_client, &clusters, 300).await;
    drop(null_client);

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let direct = direct_times.iter().min().copied().unwrap();
    let null = null_times.iter().min().copied().unwrap();
    let config_mib = bytes as f64 / (1024.0 * 1024.0);
    println!(
        "N = {n}: config {config_mib:.2} MiB ({} clusters, {} routes)",
        clusters.len(),
        routes.len()
    );
    println!("  relay per full response (read, adjusted, written; no network): {costs}");
    println!("  {incremental}");
    println!(
        "  direct: converge {:.1} ms; incremental EDS push p50 {:.3} ms p99 {:.3} ms",
        ms(direct),
        ms(percentile(&direct_eds, 0.5)),
        ms(percentile(&direct_eds, 0.99))
    );
    println!(
        "  null relay (bytes forwarded, not decoded): converge {:.1} ms, ratio {:.2}x; EDS push added p50 {:.3} ms p99 {:.3} ms",
        ms(null),
        ms(null) / ms(direct),
        ms(percentile(&null_eds, 0.5)) - ms(percentile(&direct_eds, 0.5)),
        ms(percentile(&null_eds, 0.99)) - ms(percentile(&direct_eds, 0.99))
    );
    for (name, f) in &figures {
        print_relay(name, f, direct, &direct_eds, config_mib);
    }
    if let [(_, now), (_, base)] = figures.as_slice() {
        let further = |f: &RelayFigures| per_further_replica(&f.rss);
        println!(
            "  this build / baseline: converge {:.2}x, relay CPU per converge {:.2}x, EDS push p99 {:.2}x, RSS per further replica {:.2}x",
            ms(now.converge) / ms(base.converge),
            ms(now.cpu) / ms(base.cpu),
            ms(percentile(&now.eds, 0.99)) / ms(percentile(&base.eds, 0.99)),
            further(now) / further(base).max(1.0)
        );
    }
    null_task.abort();
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
    let baseline = std::env::var("LAZYLOAD_BENCH_BASELINE").ok();
    rt.block_on(async {
        for n in sizes {
            run(n, baseline.as_deref()).await;
        }
    });
}
