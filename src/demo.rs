//! `lazyload demo`: the whole path on a built-in sample mesh, over loopback, in one process,
//! with nothing but this binary (and Envoy, when one is at hand).
//!
//! It writes, into a working directory, a sample cluster (bookinfo plus generated services in
//! several namespaces, each with a ServiceFence, as `kubectl get -o yaml` prints them) and the
//! full config every proxy of that mesh receives as an Envoy config dump ([`mesh`]). It serves
//! that config over ADS from the built-in istiod stand-in ([`crate::fake_istiod`]) and runs `lazyload serve`
//! in this process against it and that cluster (no API server: learned fences and Sidecars go to
//! `manifests/`, its log to `serve.log`). A global-sidecar ([`global_sidecar`]) takes the full
//! config through the relay. The mesh's traffic then goes through a real Envoy global-sidecar
//! ([`envoy`]) or, without one, is replayed to the collector as the access-log entries a
//! global-sidecar sends; the demo waits until every call is learned, then runs `report` on the
//! result (what each workload's Sidecar keeps).

pub mod envoy;
mod global_sidecar;
pub mod mesh;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

pub use self::global_sidecar::Received;
use self::mesh::Mesh;
use crate::config::Config;
use crate::fake_istiod::FakeIstiod;
use crate::report::{self, Report, ReportArgs};
use crate::serve::{self, AlsTrust, Options, RelayOptions};
use crate::telemetry::{self, LogFormat};
use crate::xds::{CLUSTER, ENDPOINT, LISTENER, ROUTE};

/// Flags of `lazyload demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Services generated besides bookinfo's four (at most 50,000).
    #[arg(long, default_value_t = 200, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=50_000))]
    pub services: usize,
    /// Working directory: the sample mesh, its access logs and the manifests are written here.
    #[arg(long, default_value = "lazyload-demo")]
    pub out: PathBuf,
    /// The global-sidecar's traffic: `auto` sends it through a real Envoy when one is found
    /// (`.venv/bin/envoy` from `scripts/setup`, else `envoy` on `PATH`) and runs (else replays it
    /// as access-log entries), `off` always replays, or the Envoy binary to use. Through Envoy,
    /// callers send from their pods' addresses on loopback (`127.1.x.y`, which Linux has;
    /// elsewhere `auto` replays).
    #[arg(long, env = "ENVOY_BIN", default_value = "auto", value_name = "auto|off|PATH")]
    pub envoy: String,
}

/// What a demo run produced.
#[derive(Debug)]
pub struct Outcome {
    /// Dependencies learned by `lazyload serve`.
    pub learned: usize,
    /// The `report` step.
    pub report: Report,
    /// The bookinfo productpage's Sidecar, as written.
    pub productpage_sidecar: String,
    /// The config the global-sidecar received through the relay.
    pub relayed: Received,
}

/// `lazyload serve`, running in this process; stopped when dropped.
struct Serve {
    /// `None` once its outcome was taken by [`Serve::failure`].
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    stop: CancellationToken,
}

impl Serve {
    /// Starts `lazyload serve` with `options` (never writing to a cluster), logging JSON to `log`.
    fn start(options: Options, log: &Path) -> anyhow::Result<Serve> {
        let mut config = Config::parse("")?.config;
        config.global.log.log_rotate = true;
        config.global.log.log_rotate_config.file_path = log.display().to_string();
        let _ = std::fs::remove_file(log);
        // A second demo run in one process (tests) keeps logging where the first one did.
        if !tracing::dispatcher::has_been_set() {
            telemetry::init(&config.global.log, LogFormat::Json)
                .with_context(|| format!("logging to {}", log.display()))?;
        }
        let stop = CancellationToken::new();
        let until = stop.clone();
        let task = tokio::spawn(serve::run_until(options, config, async move {
            until.cancelled().await;
            "demo finished"
        }));
        Ok(Serve {
            task: Some(task),
            stop,
        })
    }

    /// Stops `serve` as SIGTERM would (streams drained, files flushed) and waits for it.
    async fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        match self.task.take() {
            Some(task) => outcome(task.await).context("lazyload serve, stopping"),
            None => Ok(()),
        }
    }

    /// Why `serve` stopped, if it did (reported once).
    async fn failure(&mut self) -> Option<anyhow::Error> {
        let task = self.task.take_if(|t| t.is_finished())?;
        Some(match outcome(task.await) {
            Ok(()) => anyhow::anyhow!("lazyload serve stopped"),
            Err(e) => e,
        })
    }
}

/// What a `serve` task ended with.
fn outcome(joined: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    match joined {
        Ok(result) => result.context("lazyload serve failed"),
        Err(e) => Err(anyhow::anyhow!("lazyload serve panicked: {e}")),
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What the demo runs `serve` with: the sample cluster from `snapshot` (learned fences and
/// Sidecars written under `manifests`, no cluster contacted), the relay to the built-in `istiod`
/// on `xds`, the collector on `als`, the admin endpoint on `admin`.
fn demo_serve(
    snapshot: &Path,
    manifests: &Path,
    istiod: SocketAddr,
    xds: SocketAddr,
    als: SocketAddr,
    admin: SocketAddr,
) -> Options {
    let mut options = Options::offline(snapshot.to_path_buf(), manifests.to_path_buf());
    options.admin_listen = Some(admin);
    options.als_listen = Some(als);
    // The demo's Envoy is a process on this machine, not a pod of the snapshot; the collector
    // listens on loopback only.
    options.als_trust = AlsTrust::Any;
    options.relay = RelayOptions {
        upstream: Some(format!("http://{istiod}")),
        xds_listen: xds,
        als_address: Some(als.to_string()),
        // The global-sidecar's listeners stay on loopback: its PassthroughCluster goes wherever
        // a request's Slime-Orig-Dest says.
        rebind_address: "127.0.0.1".into(),
        ..RelayOptions::default()
    };
    options
}

/// `N` distinct loopback ports nothing listens on right now (all probed at once, so none is
/// handed out twice).
fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let probes = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut ports = [0; N];
    for (port, probe) in ports.iter_mut().zip(&probes) {
        *port = probe.local_addr()?.port();
    }
    Ok(ports)
}

/// Step 4 without Envoy: the mesh's calls as the access-log entries a global-sidecar sends.
async fn replay_access_logs(mesh: &Mesh, als: SocketAddr, say: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    let mut client = AccessLogServiceClient::connect(format!("http://{als}"))
        .await
        .with_context(|| format!("connecting to the collector on {als}"))?;
    let messages = mesh.access_logs();
    let entries: usize = messages
        .iter()
        .map(|m| match &m.log_entries {
            Some(LogEntries::HttpLogs(h)) => h.log_entry.len(),
            _ => 0,
        })
        .sum();
    say(&format!(
        "[4/5] replaying {entries} access-log entries of the global-sidecar over gRPC"
    ));
    client
        .stream_access_logs(tokio_stream::iter(messages))
        .await
        .context("streaming access logs to the collector")?;
    Ok(())
}

/// Step 4 with Envoy: a real global-sidecar (started on the relay), and each of the mesh's calls sent
/// through it from the caller's address, as the caller's sidecar forwards an unknown host.
async fn send_through_envoy(
    envoy: envoy::Envoy,
    mesh: &Mesh,
    relayed: &Received,
    binary: &Path,
    dir: &Path,
    say: &mut dyn FnMut(&str),
) -> anyhow::Result<envoy::Envoy> {
    let log = dir.join("envoy.log");
    let (listeners, clusters) = (relayed.count(LISTENER) as u64, relayed.count(CLUSTER) as u64);
    // Its own static cluster (the relay) comes on top of the relayed ones.
    envoy
        .wait_for(listeners, clusters + 1, Duration::from_secs(30))
        .await
        .with_context(|| format!("see {}", log.display()))?;
    let rejected = envoy.rejected().await?;
    say(&format!(
        "[4/5] Envoy global-sidecar ({}, admin http://{}): {listeners} listeners and {clusters} \
         clusters through the relay, {rejected} updates rejected; sending the mesh's {} calls through it",
        binary.display(),
        envoy.admin,
        mesh.calls.len()
    ));
    if rejected > 0 {
        bail!(
            "Envoy rejected {rejected} config updates from the relay (see {})",
            log.display()
        );
    }
    let mut answered = 0;
    for &(from, to) in &mesh.calls {
        let (a, b) = (&mesh.services[from], &mesh.services[to]);
        let caller: std::net::IpAddr = a.pod_ip.parse().context("a pod address")?;
        let orig_dest = format!("{}:{}", b.cluster_ip, b.port);
        let headers = [
            ("host", mesh::authority(a, b)),
            (crate::vocab::SOURCE_NS_HEADER, a.namespace.clone()),
            (crate::vocab::ORIG_DEST_HEADER, orig_dest),
        ];
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let to = SocketAddr::from(([127, 0, 0, 1], b.port));
        let (status, _) = envoy::call(Some(caller), to, "/", &headers)
            .await
            .with_context(|| format!("{}/{} calling {}", a.namespace, a.name, b.name))?;
        answered += usize::from(status == 200);
    }
    say(&format!(
        "      {answered}/{} calls answered by the backend behind Envoy",
        mesh.calls.len()
    ));
    if answered != mesh.calls.len() {
        bail!("Envoy did not route every call (see {})", log.display());
    }
    Ok(envoy)
}

/// The hosts each fence `serve` wrote so far has learned (its status' `lastSeen`), by
/// `namespace/name`.
fn learned_so_far(manifests: &Path, mesh: &Mesh) -> BTreeMap<String, Vec<String>> {
    mesh.services
        .iter()
        .filter_map(|s| {
            let path = manifests
                .join(&s.namespace)
                .join(format!("{}.servicefence.yaml", s.name));
            let fence: serde_json::Value =
                crate::yaml::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
            let hosts = fence["status"]["lastSeen"].as_object()?.keys().cloned().collect();
            Some((format!("{}/{}", s.namespace, s.name), hosts))
        })
        .collect()
}

/// Runs the demo, printing what it does to `say` as it goes.
pub async fn run(args: &DemoArgs, now: Timestamp, say: &mut dyn FnMut(&str)) -> anyhow::Result<Outcome> {
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let mut mesh = Mesh::sample(args.services);
    let envoy_binary = usable_envoy(&args.envoy, say)?;
    if envoy_binary.is_some() {
        let backend = envoy::backend(stop.clone())
            .await
            .context("starting the demo backend")?;
        mesh = mesh.on_loopback(free_ports()?, backend);
    }
    let dir = &args.out;
    let files = Files::write(&mesh, dir, say)?;
    let upstream = FakeIstiod::start(mesh.xds())
        .await
        .context("starting the built-in istiod")?;
    let istiod = upstream.addr;

    let [xds, als, admin] = free_ports()?.map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
    let log = dir.join("serve.log");
    let options = demo_serve(&files.cluster, &files.manifests, istiod, xds, als, admin);
    let mut serve = Serve::start(options, &log)?;
    say(&format!(
        "[2/5] lazyload serve: relay on {xds} (upstream: the built-in istiod stand-in on {istiod}), \
         collector on {als}, admin on http://{admin} (log: {})",
        log.display()
    ));
    let relayed = match global_sidecar::subscribe(xds, Duration::from_secs(30)).await {
        Ok(r) => r,
        Err(e) => {
            return Err(serve
                .failure()
                .await
                .unwrap_or(e)
                .context(format!("see {}", log.display())));
        }
    };
    show_relayed(&relayed, &log, say)?;
    let traffic = Traffic {
        mesh: &mesh,
        relayed: &relayed,
        dir,
        xds,
        als,
        log: &log,
    };
    // Kept running until everything is learned: its access logs are still being flushed.
    let envoy = traffic.send(envoy_binary, &args.envoy, say).await?;
    let learned = wait_until_learned(&mesh, &files.manifests, &mut serve, &log, say).await?;
    drop(envoy);
    serve.shutdown().await?;
    let productpage_sidecar = read(&files.manifests.join("bookinfo/productpage.sidecar.yaml"))?;
    say("[5/5] comparing each workload's scoped config with the full config");
    let report = compare(&mesh, &files, dir, now)?;
    Ok(Outcome {
        learned,
        report,
        productpage_sidecar,
        relayed,
    })
}

/// The Envoy `--envoy` names if it can carry the demo's traffic here, else `None` (said why);
/// an error when one was asked for by path and cannot.
fn usable_envoy(wanted: &str, say: &mut dyn FnMut(&str)) -> anyhow::Result<Option<PathBuf>> {
    let binary = envoy::find(wanted);
    if binary.is_none() && wanted == "auto" {
        say(&format!(
            "      no Envoy found: the traffic is replayed as access-log entries ({})",
            envoy::HOW_TO_GET_ENVOY
        ));
    }
    let first_pod = mesh::loopback_pod_ip(0);
    if binary.is_some() && !envoy::can_bind(first_pod.into()) {
        let why = format!("this machine cannot send from {first_pod} (a pod's address on loopback)");
        if wanted != "auto" {
            bail!("--envoy {wanted}: {why}");
        }
        say(&format!(
            "      {why}: the traffic is replayed as access-log entries instead of through Envoy"
        ));
        return Ok(None);
    }
    Ok(binary)
}

/// The files of a demo run in its working directory.
struct Files {
    /// The sample cluster, as `kubectl get -o yaml` prints it.
    cluster: PathBuf,
    /// The full config every proxy of the mesh receives, as an Envoy config dump.
    dump: PathBuf,
    /// Where `serve` writes the learned fences and Sidecars (emptied first).
    manifests: PathBuf,
}

impl Files {
    /// Step 1: writes the sample mesh's cluster and full config under `dir`.
    fn write(mesh: &Mesh, dir: &Path, say: &mut dyn FnMut(&str)) -> anyhow::Result<Files> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        say(&format!(
            "[1/5] sample mesh: {} services, {} calls between them, written to {}",
            mesh.services.len(),
            mesh.calls.len(),
            dir.display()
        ));
        let cluster = dir.join("cluster.yaml");
        write(&cluster, &mesh.cluster_yaml(true))?;
        let dump = dir.join("full-config-dump.json");
        write(&dump, &mesh.config_dump().to_string())?;
        let manifests = dir.join("manifests");
        if manifests.exists() {
            std::fs::remove_dir_all(&manifests)
                .with_context(|| format!("clearing {}", manifests.display()))?;
        }
        Ok(Files {
            cluster,
            dump,
            manifests,
        })
    }
}

/// Step 3: what the global-sidecar received through the relay; an error unless the relay
/// adjusted it (access logs to the collector, unknown hosts to PassthroughCluster).
fn show_relayed(relayed: &Received, log: &Path, say: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    say(&format!(
        "[3/5] global-sidecar through the relay: {} clusters, {} endpoint assignments, {} listeners, \
         {} route configurations ({} virtual hosts), {:.2} MiB",
        relayed.count(CLUSTER),
        relayed.count(ENDPOINT),
        relayed.count(LISTENER),
        relayed.count(ROUTE),
        relayed.virtual_hosts,
        relayed.bytes as f64 / (1024.0 * 1024.0)
    ));
    say(&format!(
        "      relay adjustments: {}/{} HTTP connection managers log to the collector{}, \
         {}/{} route configurations send unknown hosts to PassthroughCluster, \
         which {} Slime-Orig-Dest",
        relayed.logging_to_collector,
        relayed.connection_managers,
        if relayed.collector_cluster {
            " (cluster added)"
        } else {
            " (no cluster!)"
        },
        relayed.catch_all_to_passthrough,
        relayed.count(ROUTE),
        if relayed.passthrough_by_header {
            "follows"
        } else {
            "ignores"
        },
    ));
    if !relayed.collector_cluster
        || !relayed.passthrough_by_header
        || relayed.logging_to_collector != relayed.connection_managers
        || relayed.catch_all_to_passthrough != relayed.count(ROUTE)
    {
        bail!(
            "the relay did not adjust the global-sidecar's config (see {})",
            log.display()
        );
    }
    Ok(())
}

/// What step 4 sends the mesh's traffic with.
struct Traffic<'a> {
    mesh: &'a Mesh,
    relayed: &'a Received,
    dir: &'a Path,
    xds: SocketAddr,
    als: SocketAddr,
    log: &'a Path,
}

impl Traffic<'_> {
    /// Step 4: through a real Envoy global-sidecar when `binary` starts (returned: it keeps
    /// flushing access logs), else replayed to the collector.
    async fn send(
        &self,
        binary: Option<PathBuf>,
        wanted: &str,
        say: &mut dyn FnMut(&str),
    ) -> anyhow::Result<Option<envoy::Envoy>> {
        let started = match &binary {
            Some(binary) => match envoy::Envoy::start(binary, self.xds, self.dir).await {
                Ok(envoy) => Some((envoy, binary)),
                // `envoy` found on PATH may still not run (a stale shim): the demo goes on without.
                Err(e) if wanted == "auto" => {
                    say(&format!(
                        "      {e:#}: replaying the traffic as access-log entries instead"
                    ));
                    None
                }
                Err(e) => return Err(e),
            },
            None => None,
        };
        match started {
            Some((envoy, binary)) => {
                send_through_envoy(envoy, self.mesh, self.relayed, binary, self.dir, say)
                    .await
                    .map(Some)
            }
            None => {
                replay_access_logs(self.mesh, self.als, say)
                    .await
                    .with_context(|| format!("see {}", self.log.display()))?;
                Ok(None)
            }
        }
    }
}

/// Waits (up to a minute) until `serve` wrote every call of the mesh into its caller's fence;
/// how many it learned.
async fn wait_until_learned(
    mesh: &Mesh,
    manifests: &Path,
    serve: &mut Serve,
    log: &Path,
    say: &mut dyn FnMut(&str),
) -> anyhow::Result<usize> {
    let bookinfo = format!("{}/", mesh::BOOKINFO);
    let expected: Vec<(String, String)> = mesh
        .calls
        .iter()
        .map(|&(from, to)| {
            let (a, b) = (&mesh.services[from], &mesh.services[to]);
            (format!("{}/{}", a.namespace, a.name), b.fqdn())
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut shown = None;
    loop {
        let by_fence = learned_so_far(manifests, mesh);
        let learned = expected
            .iter()
            .filter(|(fence, host)| by_fence.get(fence).is_some_and(|hosts| hosts.contains(host)))
            .count();
        if shown != Some(learned) {
            say(&format!(
                "      learned {learned}/{} dependencies",
                mesh.calls.len()
            ));
            shown = Some(learned);
        }
        if learned == expected.len() {
            for (fence, hosts) in by_fence.iter().filter(|(f, _)| f.starts_with(&bookinfo)) {
                say(&format!("      {fence} calls {}", hosts.join(", ")));
            }
            say(&format!(
                "      ... and {} more workloads",
                by_fence.keys().filter(|f| !f.starts_with(&bookinfo)).count()
            ));
            return Ok(learned);
        }
        if let Some(e) = serve.failure().await {
            return Err(e.context(format!("see {}", log.display())));
        }
        if Instant::now() > deadline {
            bail!(
                "only {learned} of {} dependencies learned after 60 s (see {})",
                mesh.calls.len(),
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Step 5: `report` on the sample cluster with the fences `serve` wrote (the sample's own for
/// workloads that learned nothing).
fn compare(mesh: &Mesh, files: &Files, dir: &Path, now: Timestamp) -> anyhow::Result<Report> {
    let mut fenced = mesh.cluster_yaml(false);
    for m in &mesh.services {
        let fence = files
            .manifests
            .join(&m.namespace)
            .join(format!("{}.servicefence.yaml", m.name));
        fenced.push_str("\n---\n");
        if fence.exists() {
            fenced.push_str(&read(&fence)?);
        } else {
            fenced.push_str(&crate::yaml::to_string(&m.fence()).context("serialising a fence")?);
        }
    }
    let fenced_path = dir.join("cluster-with-fences.yaml");
    write(&fenced_path, &fenced)?;
    report::run(
        &ReportArgs {
            config: None,
            cluster_snapshot: Some(fenced_path),
            config_dump: vec![files.dump.clone()],
            json: false,
            live: Default::default(),
        },
        now,
    )
}

/// The end-of-run summary: the productpage Sidecar, the bookinfo rows and the mesh total.
pub fn summary(outcome: &Outcome) -> String {
    let table = report::table(&outcome.report);
    let mut lines = table.lines();
    let r = &outcome.relayed;
    let mut out = format!(
        "\nThe global-sidecar's full config through the relay: {} clusters, {} endpoint assignments, \
         {} listeners, {} virtual hosts ({:.2} MiB); each fenced workload now receives \
         only what its Sidecar imports.\n",
        r.count(CLUSTER),
        r.count(ENDPOINT),
        r.count(LISTENER),
        r.virtual_hosts,
        r.bytes as f64 / (1024.0 * 1024.0)
    );
    out.push_str("\nLearned Sidecar of bookinfo/productpage:\n");
    out.push_str(&outcome.productpage_sidecar);
    out.push_str("\nPush size per workload (bookinfo shown; `lazyload report` lists all):\n");
    for l in lines.by_ref().take(2) {
        let _ = writeln!(out, "{l}");
    }
    for l in lines {
        if l.starts_with("bookinfo/") || l.starts_with("mesh:") {
            let _ = writeln!(out, "{l}");
        }
    }
    out
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}
