//! One fence's flood, black-box: `lazyload serve --manifests-dir` learns N distinct hosts for one
//! fence (`default/flood`) from one access-log stream while two other fences learn one host
//! each from streams of their own: `default/quiet` when half the flood was sent, `default/late`
//! when all of it was. Reports, at N = 100 and 60,000 in the same run: the flood's apply rate
//! (hosts in the fence's file / time from the first entry sent to the last host on disk), the
//! other fences' latencies (their entry sent -> their host on disk), and the process's peak
//! RSS.
//!
//! First, with criterion, the learner alone (sans I/O): queueing and taking a batch of 500 new
//! edges for a fence that already has 100 or 60,000 (the cost must not grow with the fence).
//!
//! `cargo bench --bench learn_flood`. `LAZYLOAD_BENCH_BIN=<path>` runs another build of the
//! binary instead (a baseline built from an older commit: the bench passes only flags every
//! version has, and `--als-trust any` through its environment variable, which older versions
//! ignore). `LAZYLOAD_BENCH_SIZES=100,60000` picks the sizes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput};
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use jiff::Timestamp;
use lazyload::learn::{Learner, Limits};
use lazyload::testing::als::{entry, message};
use lazyload::vocab::ObjectKey;
use tokio_stream::wrappers::ReceiverStream;

const FLOOD_IP: &str = "10.1.0.1";
const QUIET_IP: &str = "10.1.0.2";
const LATE_IP: &str = "10.1.0.3";
/// What the other fences call.
const OTHER_HOST: &str = "other-dependency.example.org";
/// Longest a run may take (the flood at 60,000 took minutes before the fair queue).
const RUN_LIMIT: Duration = Duration::from_secs(900);

/// Two Services with a pod and a fence each, and a ServiceEntry that makes every
/// `*.example.org` host a valid dependency.
const SNAPSHOT: &str = r#"apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: default}}
- apiVersion: v1
  kind: Service
  metadata: {name: flood, namespace: default}
  spec: {selector: {app: flood}, clusterIP: 10.96.0.1, ports: [{name: http, port: 80}]}
- apiVersion: v1
  kind: Service
  metadata: {name: quiet, namespace: default}
  spec: {selector: {app: quiet}, clusterIP: 10.96.0.2, ports: [{name: http, port: 80}]}
- apiVersion: v1
  kind: Service
  metadata: {name: late, namespace: default}
  spec: {selector: {app: late}, clusterIP: 10.96.0.3, ports: [{name: http, port: 80}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: late-0, namespace: default, labels: {app: late}}
  spec: {containers: [{name: app, image: app}]}
  status: {phase: Running, podIP: 10.1.0.3, podIPs: [{ip: 10.1.0.3}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: flood-0, namespace: default, labels: {app: flood}}
  spec: {containers: [{name: app, image: app}]}
  status: {phase: Running, podIP: 10.1.0.1, podIPs: [{ip: 10.1.0.1}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: quiet-0, namespace: default, labels: {app: quiet}}
  spec: {containers: [{name: app, image: app}]}
  status: {phase: Running, podIP: 10.1.0.2, podIPs: [{ip: 10.1.0.2}]}
- apiVersion: networking.istio.io/v1
  kind: ServiceEntry
  metadata: {name: external, namespace: default}
  spec: {hosts: ['*.example.org'], location: MESH_EXTERNAL, ports: [{number: 80, name: http, protocol: HTTP}]}
- apiVersion: microservice.slime.io/v1alpha1
  kind: ServiceFence
  metadata: {name: flood, namespace: default}
  spec: {enable: true, workloadSelector: {fromService: true}}
- apiVersion: microservice.slime.io/v1alpha1
  kind: ServiceFence
  metadata: {name: late, namespace: default}
  spec: {enable: true, workloadSelector: {fromService: true}}
- apiVersion: microservice.slime.io/v1alpha1
  kind: ServiceFence
  metadata: {name: quiet, namespace: default}
  spec: {enable: true, workloadSelector: {fromService: true}}
"#;

/// The flood needs more hosts than the default cap per fence (older versions warn and go on).
const CONFIG: &str = "general:\n  maxLearnedHostsPerFence: 1000000\n";

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// The learned hosts in a fence's file, re-read only when the file changed.
struct FenceFile {
    path: PathBuf,
    seen: Option<(std::time::SystemTime, u64)>,
    hosts: usize,
}

impl FenceFile {
    fn new(dir: &Path, name: &str) -> Self {
        Self {
            path: dir.join("default").join(format!("{name}.servicefence.yaml")),
            seen: None,
            hosts: 0,
        }
    }

    fn hosts(&mut self) -> usize {
        let Ok(meta) = std::fs::metadata(&self.path) else {
            return 0;
        };
        let stamp = (meta.modified().ok().unwrap_or(std::time::UNIX_EPOCH), meta.len());
        if self.seen != Some(stamp) {
            self.seen = Some(stamp);
            let text = std::fs::read_to_string(&self.path).unwrap_or_default();
            self.hosts = text.matches("{destination_service=").count();
        }
        self.hosts
    }

    fn has(&self, host: &str) -> bool {
        std::fs::read_to_string(&self.path).is_ok_and(|t| t.contains(host))
    }
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn run(bin: &Path, n: usize) {
    let dir = std::env::temp_dir().join(format!("lazyload-bench-flood-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let (snapshot, config, manifests) = (
        dir.join("cluster.yaml"),
        dir.join("config.yaml"),
        dir.join("manifests"),
    );
    std::fs::write(&snapshot, SNAPSHOT).expect("the snapshot");
    std::fs::write(&config, CONFIG).expect("the config");
    let (admin, als) = (free_addr(), free_addr());
    let child = Command::new(bin)
        .env_remove("KUBECONFIG")
        .env("LAZYLOAD_ALS_TRUST", "any")
        .env("RUST_LOG", "warn")
        .arg("serve")
        .args([
            "--admin-listen",
            &admin.to_string(),
            "--als-listen",
            &als.to_string(),
        ])
        .arg("--config")
        .arg(&config)
        .arg("--cluster-snapshot")
        .arg(&snapshot)
        .arg("--manifests-dir")
        .arg(&manifests)
        .stderr(Stdio::null())
        .spawn()
        .expect("lazyload serve");
    let child = Killed(child);
    let connect = || async {
        for _ in 0..500 {
            if let Ok(c) = AccessLogServiceClient::connect(format!("http://{als}")).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the collector did not come up");
    };
    let (mut flood_client, other_client) = (connect().await, connect().await);
    // Another fence's one call, on a stream of its own; when it was sent.
    let send_one = |from: &'static str| {
        let one = message(true, [entry(from, OTHER_HOST.into())]);
        let mut client = other_client.clone();
        async move {
            client
                .stream_access_logs(tokio_stream::iter([one]))
                .await
                .expect("another fence's stream");
            Instant::now()
        }
    };

    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let flood = tokio::spawn(async move { flood_client.stream_access_logs(ReceiverStream::new(rx)).await });
    let start = Instant::now();
    let mut quiet_sent = None;
    for (m, chunk) in (0..n).collect::<Vec<_>>().chunks(100).enumerate() {
        let entries = chunk.iter().map(|i| entry(FLOOD_IP, format!("h{i}.example.org")));
        tx.send(message(m == 0, entries)).await.expect("the flood stream");
        if quiet_sent.is_none() && (m + 1) * 100 >= n / 2 {
            quiet_sent = Some(send_one(QUIET_IP).await);
        }
    }
    let sent = start.elapsed();
    let late_sent = send_one(LATE_IP).await;
    let quiet_sent = quiet_sent.expect("the quiet entry was sent");

    let mut flood_file = FenceFile::new(&manifests, "flood");
    let others = [
        (FenceFile::new(&manifests, "quiet"), quiet_sent),
        (FenceFile::new(&manifests, "late"), late_sent),
    ];
    let mut flood_done = None;
    let mut others_done = [None, None];
    while flood_done.is_none() || others_done.contains(&None) {
        assert!(
            start.elapsed() < RUN_LIMIT,
            "N = {n}: not applied within {RUN_LIMIT:?}"
        );
        for ((file, sent), done) in others.iter().zip(&mut others_done) {
            if done.is_none() && file.has(OTHER_HOST) {
                *done = Some(sent.elapsed());
            }
        }
        if flood_done.is_none() && flood_file.hosts() >= n {
            flood_done = Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let flood_done = flood_done.unwrap_or_default();
    let [quiet_done, late_done] = others_done.map(Option::unwrap_or_default);
    let rss = peak_rss_mib(child.0.id());
    drop(tx);
    let _ = flood.await;
    println!(
        "N = {n:>6}: flood sent in {:>7.2} s, on disk after {:>7.2} s ({:>8.0} hosts/s); \
         other fences' edges on disk {:>6.2} s (sent mid-flood) and {:>6.2} s (sent after it) \
         after they were sent; peak RSS {rss:.0} MiB",
        sent.as_secs_f64(),
        flood_done.as_secs_f64(),
        n as f64 / flood_done.as_secs_f64(),
        quiet_done.as_secs_f64(),
        late_done.as_secs_f64(),
    );
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The learner's cost per new edge, for a small and a huge fence.
fn learner(c: &mut Criterion) {
    let mut group = c.benchmark_group("learner");
    group.throughput(Throughput::Elements(500));
    let now = Timestamp::now();
    let fence = ObjectKey::new("default", "flood");
    let new_hosts: Vec<String> = (0..500).map(|i| format!("new-{i}.example.org")).collect();
    for size in [100, 60_000] {
        let mut full = Learner::new(Limits {
            max_hosts_per_fence: usize::MAX,
            ..Limits::default()
        });
        for i in 0..size {
            full.seed(&fence, &format!("h{i}.example.org"), Some(now));
        }
        group.bench_function(format!("500 new edges into a fence of {size}"), |b| {
            b.iter_batched_ref(
                || full.clone(),
                |l| {
                    for host in &new_hosts {
                        l.observe(&fence, host, now);
                    }
                    l.take_batch(500)
                },
                BatchSize::LargeInput,
            );
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    learner(&mut c);
    let bin = std::env::var_os("LAZYLOAD_BENCH_BIN")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_lazyload")), PathBuf::from);
    let sizes: Vec<usize> = std::env::var("LAZYLOAD_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 60_000]);
    println!("binary: {}", bin.display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        for n in sizes {
            run(&bin, n).await;
        }
    });
}
