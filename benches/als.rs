//! Access-log benchmarks.
//!
//! - `per_entry/decode`: prost decode of `StreamAccessLogsMessage`s of 100 HTTP entries each,
//!   the limit to compare with;
//! - `per_entry/decode+attribute+dedup`: the same decode plus the collector's per-entry work
//!   (`process`: the learner's recent-entry cache, attribution against a 10,000-service /
//!   50,000-pod index, dedup) in a warm learner (steady state: the edges are known, as they are
//!   after the first minutes);
//! - `per_entry/decode+attribute+dedup, no entry cache`: every entry attributed and every edge
//!   looked up, as for entries not seen in the last refresh period;
//! - `e2e` (only under `cargo bench`): `lazyload serve` in its own process, loaded with the same
//!   cluster as a snapshot, receives entries from a tonic client streaming batches of 100 over
//!   loopback (encoded once, so that the client's encoding is not measured); prints entries/s and
//!   the collector's CPU time and RSS (from `/proc/<pid>`).
//!
//! Every entry attributes (the generated sources and destinations all exist); the steady state
//! measured is repeated calls, as a mesh makes them.

#![allow(missing_docs)]

use std::hint::black_box;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress};
use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties,
};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, Identifier, LogEntries,
};
use jiff::Timestamp;
use lazyload::als::LOG_NAME;
use lazyload::als::attribute::{Attributor, Hosts};
use lazyload::als::collector::{Tally, process};
use lazyload::als::entry::Entry;
use lazyload::config::Config;
use lazyload::index::ClusterIndex;
use lazyload::learn::{Learner, Limits, Observed};
use lazyload::testing;
use prost::Message;

const SERVICES: usize = 10_000;
const PODS: usize = 50_000;
const PER_NAMESPACE: usize = 100;
const BATCH: usize = 100;

fn ns(svc: usize) -> String {
    format!("ns{}", svc / PER_NAMESPACE)
}

fn pod_ip(pod: usize) -> String {
    let k = pod + 1;
    format!("10.{}.{}.{}", (k >> 16) & 255, (k >> 8) & 255, k & 255)
}

fn vip(svc: usize) -> String {
    format!("172.16.{}.{}", svc >> 8, svc & 255)
}

fn fqdn(svc: usize) -> String {
    format!("svc{svc}.{}.svc.cluster.local", ns(svc))
}

fn index() -> ClusterIndex {
    let mut idx = ClusterIndex::new("cluster.local");
    for s in 0..SERVICES {
        let app = format!("svc{s}");
        let mut service = testing::service(&ns(s), &app, &app, &[&vip(s)]);
        service.labels = [("app".to_string(), app)].into();
        idx.apply_service(service);
    }
    for p in 0..PODS {
        let s = p * SERVICES / PODS;
        let app = format!("svc{s}");
        idx.apply_pod(testing::pod(
            &ns(s),
            &format!("{app}-{p}"),
            &[("app", &app)],
            &pod_ip(p),
            "default",
        ));
    }
    idx
}

/// The same cluster as `kubectl -o yaml` would give it (JSON is YAML).
fn snapshot() -> String {
    let mut items = Vec::with_capacity(SERVICES + PODS);
    for s in 0..SERVICES {
        items.push(serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc{s}"), "namespace": ns(s)},
            "spec": {"selector": {"app": format!("svc{s}")}, "clusterIP": vip(s)}}));
    }
    for p in 0..PODS {
        let s = p * SERVICES / PODS;
        items.push(serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("svc{s}-{p}"), "namespace": ns(s), "labels": {"app": format!("svc{s}")}},
            "status": {"podIP": pod_ip(p)}}));
    }
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn sock(ip: &str, port: u32) -> Option<Address> {
    Some(Address {
        address: Some(AddressKind::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(
                envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(port),
            ),
            ..Default::default()
        })),
    })
}

/// An entry as the global-sidecar's logger writes it: addresses, timings, request and response.
fn entry(rng: &mut Rng) -> HttpAccessLogEntry {
    let pod = rng.below(PODS);
    let dst = rng.below(SERVICES);
    let ms = |n: i32| {
        Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 0,
            nanos: n * 1_000_000,
        })
    };
    HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon {
            downstream_remote_address: sock(&pod_ip(pod), 40_000 + (pod % 20_000) as u32),
            downstream_direct_remote_address: sock(&pod_ip(pod), 40_000 + (pod % 20_000) as u32),
            downstream_local_address: sock("10.255.0.1", 9080),
            upstream_remote_address: sock(&pod_ip(dst * PODS / SERVICES), 9080),
            upstream_local_address: sock("10.255.0.1", 50_000),
            upstream_cluster: format!("outbound|9080||{}", fqdn(dst)),
            route_name: "default".into(),
            start_time: Some(envoy_types::pb::google::protobuf::Timestamp {
                seconds: 1_763_870_000,
                nanos: 123_000_000,
            }),
            time_to_last_rx_byte: ms(1),
            time_to_first_upstream_tx_byte: ms(1),
            time_to_last_upstream_tx_byte: ms(1),
            time_to_first_upstream_rx_byte: ms(3),
            time_to_last_upstream_rx_byte: ms(3),
            time_to_first_downstream_tx_byte: ms(3),
            time_to_last_downstream_tx_byte: ms(4),
            stream_id: format!("{:016x}", rng.0),
            ..Default::default()
        }),
        protocol_version: 2,
        request: Some(HttpRequestProperties {
            request_method: 1,
            scheme: "http".into(),
            authority: format!("svc{dst}.{}:9080", ns(dst)),
            path: "/api/v1/items?page=2".into(),
            user_agent: "Go-http-client/1.1".into(),
            request_id: format!(
                "{:08x}-1b4c-4e8a-9f0d-{:012x}",
                rng.0 >> 32,
                rng.0 & 0xffff_ffff_ffff
            ),
            request_headers_bytes: 412,
            request_headers: [
                ("slime-orig-dest".to_string(), format!("{}:9080", vip(dst))),
                ("slime-source-ns".to_string(), ns(pod * SERVICES / PODS)),
            ]
            .into(),
            ..Default::default()
        }),
        response: Some(HttpResponseProperties {
            response_code: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 200 }),
            response_headers_bytes: 180,
            response_body_bytes: 1_532,
            response_code_details: "via_upstream".into(),
            ..Default::default()
        }),
    }
}

fn messages(count: usize, seed: u64) -> Vec<StreamAccessLogsMessage> {
    let mut rng = Rng(seed);
    (0..count)
        .map(|i| StreamAccessLogsMessage {
            identifier: (i == 0).then(|| Identifier {
                node: None,
                log_name: LOG_NAME.into(),
            }),
            log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
                log_entry: (0..BATCH).map(|_| entry(&mut rng)).collect(),
            })),
        })
        .collect()
}

fn per_entry(c: &mut Criterion) {
    let idx = index();
    let attributor = Attributor::new(&Config::default());
    let encoded: Vec<Vec<u8>> = messages(100, 7).iter().map(Message::encode_to_vec).collect();
    let entries = (encoded.len() * BATCH) as u64;
    let mut learner = Learner::new(Limits::default());
    let mut hosts = Hosts::default();
    let now = Timestamp::now();
    let mut tally = Tally::default();
    for bytes in &encoded {
        let msg = StreamAccessLogsMessage::decode(bytes.as_slice()).unwrap();
        process(&attributor, &idx, &mut learner, &msg, &mut hosts, now, &mut tally);
    }
    assert_eq!(
        tally.dropped.iter().sum::<u64>(),
        0,
        "every generated entry attributes"
    );
    eprintln!("warm learner: {} edges from {entries} entries", learner.len());

    let mut g = c.benchmark_group("per_entry");
    g.throughput(Throughput::Elements(entries));
    g.bench_function("decode", |b| {
        b.iter(|| {
            for bytes in &encoded {
                black_box(StreamAccessLogsMessage::decode(bytes.as_slice()).unwrap());
            }
        })
    });
    g.bench_function("decode+attribute+dedup", |b| {
        b.iter(|| {
            let mut tally = Tally::default();
            for bytes in &encoded {
                let msg = StreamAccessLogsMessage::decode(bytes.as_slice()).unwrap();
                process(&attributor, &idx, &mut learner, &msg, &mut hosts, now, &mut tally);
            }
            black_box(tally)
        })
    });
    // The same work without the learner's recent-entry cache: every entry attributed and every
    // edge looked up (the cost of an entry seen for the first time in a refresh period).
    g.bench_function("decode+attribute+dedup, no entry cache", |b| {
        b.iter(|| {
            let mut known = 0u64;
            for bytes in &encoded {
                let msg = StreamAccessLogsMessage::decode(bytes.as_slice()).unwrap();
                let Some(LogEntries::HttpLogs(logs)) = &msg.log_entries else {
                    continue;
                };
                for e in &logs.log_entry {
                    if let Ok(fences) = attributor.attribute(&idx, &Entry::http(e), &mut hosts) {
                        for fence in fences {
                            for host in hosts.iter() {
                                known += u64::from(learner.observe(fence, host, now) == Observed::Known);
                            }
                        }
                    }
                }
            }
            black_box(known)
        })
    });
    g.finish();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::Read as _;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

fn entries_received(admin: SocketAddr) -> u64 {
    http_get(admin, "/metrics")
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("lazyload_als_entries_total{kind=\"http\"} "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// Sends pre-encoded `StreamAccessLogsMessage`s; ignores the (empty) response.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = bytes::Bytes;
    type Decode = ();
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        use bytes::Buf as _;
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

fn e2e() {
    const TOTAL_MESSAGES: usize = 10_000;
    let dir = std::env::temp_dir().join(format!("lazyload-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let snap = dir.join("cluster.json");
    std::fs::write(&snap, snapshot()).unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let als: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .env_remove("KUBECONFIG")
        .args([
            "serve",
            "--admin-listen",
            &admin.to_string(),
            "--als-listen",
            &als.to_string(),
            "--als-trust",
            "any",
        ])
        .arg("--cluster-snapshot")
        .arg(&snap)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let started = Instant::now();
    while http_get(admin, "/healthz").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "serve did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let load = started.elapsed();
    let rss_idle = status_kib(pid, "VmRSS:");
    let ticks0 = cpu_ticks(pid);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // Messages are encoded once: the client's own prost encoding would otherwise be measured
    // (on this two-core machine it shares the CPU with the collector).
    let pool: Vec<bytes::Bytes> = messages(200, 11)
        .iter()
        .map(|m| m.encode_to_vec().into())
        .collect();
    let total = (TOTAL_MESSAGES * BATCH) as u64;
    let t0 = Instant::now();
    rt.block_on(async {
        let mut grpc = lazyload::testing::grpc_client(als).await;
        let stream = tokio_stream::iter((0..TOTAL_MESSAGES).map(move |i| pool[i % pool.len()].clone()));
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs",
        );
        grpc.client_streaming(tonic::Request::new(stream), path, RawCodec)
            .await
            .unwrap();
    });
    while entries_received(admin) < total {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "collector did not receive everything"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = t0.elapsed();
    let cpu = (cpu_ticks(pid) - ticks0) as f64 / clock_ticks_per_second() as f64;
    let rss = status_kib(pid, "VmRSS:");
    let hwm = status_kib(pid, "VmHWM:");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "e2e: {total} entries over one gRPC stream (batches of {BATCH}) in {:.2} s = {:.0} entries/s; \
         collector CPU {:.2} s ({:.0} ns/entry, {:.0}% of one core); RSS {} MiB idle with the \
         {SERVICES}-service/{PODS}-pod index, {} MiB after, peak {} MiB; snapshot load {:.1} s",
        wall.as_secs_f64(),
        total as f64 / wall.as_secs_f64(),
        cpu,
        cpu * 1e9 / total as f64,
        100.0 * cpu / wall.as_secs_f64(),
        rss_idle / 1024,
        rss / 1024,
        hwm / 1024,
        load.as_secs_f64(),
    );
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    per_entry(&mut c);
    c.final_summary();
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: there the e2e run is
    // skipped. So it is when a filter that does not match `e2e` is given.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut filters = args.iter().filter(|a| !a.starts_with('-'));
    if args.iter().any(|a| a == "--bench") && filters.all(|f| "e2e".contains(f.as_str())) {
        e2e();
    }
}
