//! `lazyload serve`: runs the enabled components in one process until SIGTERM or Ctrl-C.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use regex::Regex;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::admin;
use crate::als::attribute::Attributor;
use crate::als::collector::{self, Collector, Peers};
use crate::cluster::{ClusterState, watch};
use crate::config::{Config, MetricSourceType};
use crate::index::ObjectKey;
use crate::index::snapshot::Snapshot;
use crate::learn::persist::{self, StatusWriter};
use crate::learn::pump::{EdgeStore, LearnerHandle};
use crate::learn::{Edge, Learner, Limits, prometheus};
use crate::model::fence::ServiceFenceStatus;
use crate::model::istio::IstioVersion;
use crate::model::scope::global_sidecar_namespaces;
use crate::model::sidecar::is_fence_controlled;
use crate::readiness::Readiness;
use crate::reconcile::scope::ScopeCheck;
use crate::telemetry::{self, LogFormat};
use crate::xds::adjust::{RESERVED_PORTS, Settings};
use crate::xds::server::{Relay, RelayConfig};
use crate::xds::upstream::{Upstream, UpstreamConfig};

/// How long components get to finish after shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Most edges in one batch the consumer takes from the learner.
const EDGE_BATCH: usize = 500;
/// How often queued edges are taken when no batch is full. A first call through the
/// global-sidecar waits on this (after the access logger's 50 ms flush, before the reconciler's
/// 100 ms debounce), so it is short; an idle tick takes a lock and takes nothing.
const EDGE_FLUSH: Duration = Duration::from_millis(50);
/// How often one fence is written at most: a fence that was not written this long is written at
/// once (a first call is not delayed), one learning a flood is rewritten once per interval with
/// everything it learned meanwhile, not once per batch (writing costs the fence's size).
const FENCE_WRITE_INTERVAL: Duration = Duration::from_secs(1);
/// Most learned edges kept unwritten; more are written at once.
const MAX_UNWRITTEN: usize = 100_000;
/// How long the final flush waits for the collector's streams to end (they end at once).
const COLLECTOR_STOP_WAIT: Duration = Duration::from_secs(2);

/// Flags of `lazyload serve` (each also read from an environment variable).
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file: a SlimeBoot lazyload module entry, or a whole SlimeBoot.
    #[arg(short, long, env = "LAZYLOAD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Admin HTTP address (`/metrics`, `/healthz`, `/readyz`, `/debug/...`);
    /// default: `global.misc.aux-addr` (`:8081`).
    #[arg(long, env = "LAZYLOAD_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, env = "LAZYLOAD_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
    /// Access-log collector (gRPC ALS) address; default: `global.misc.logSourcePort`
    /// (`:8082`). Runs with `metricSourceType: accesslog`, or whenever this flag is given.
    #[arg(long, env = "LAZYLOAD_ALS_LISTEN")]
    pub als_listen: Option<SocketAddr>,
    /// Which peers may send access logs (what they send becomes fences' dependencies).
    #[arg(long, env = "LAZYLOAD_ALS_TRUST", value_enum, default_value_t)]
    pub als_trust: AlsTrust,
    /// The cluster, from a file (`kubectl get
    /// ns,svc,pods,virtualservices,serviceentries,servicefences,sidecars -A -o yaml`); for running
    /// without a cluster (with one, its watchers keep the index up to date); required with
    /// --manifests-dir.
    #[arg(long, env = "LAZYLOAD_CLUSTER_SNAPSHOT")]
    pub cluster_snapshot: Option<PathBuf>,
    /// How often the Prometheus source (`metricSourceType: prometheus`) queries each enabled
    /// fence (`30s`, `2m`).
    #[arg(long, env = "LAZYLOAD_PROMETHEUS_INTERVAL", value_parser = parse_duration, default_value = "30s")]
    pub prometheus_interval: Duration,
    /// Kubeconfig of the cluster lazyload writes to (learned dependencies into fence statuses);
    /// without it, the in-cluster configuration when running in a pod, else none (learned
    /// dependencies are then kept in memory only). Not used with --manifests-dir.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Write each fence changed by learned dependencies, and its Sidecar, to
    /// `<dir>/<namespace>/<name>.{servicefence,sidecar}.yaml`: a file sink instead of the API
    /// server (for review or GitOps); with it, no cluster is contacted, even in a pod or with a
    /// kubeconfig (the cluster comes from --cluster-snapshot).
    #[arg(long, env = "LAZYLOAD_MANIFESTS_DIR", requires = "cluster_snapshot")]
    pub manifests_dir: Option<PathBuf>,
    /// The xDS relay.
    #[command(flatten)]
    pub relay: RelayArgs,
}

/// Which peers the access-log collector takes streams from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AlsTrust {
    /// Global-sidecar pods only: the peer's address must be a global-sidecar pod's in the
    /// cluster's pods (watched, or from --cluster-snapshot).
    #[default]
    GlobalSidecar,
    /// Whoever reaches --als-listen: for the demo and tests on loopback, or a port only trusted
    /// hosts can reach.
    Any,
}

/// Flags of the xDS relay.
#[derive(Clone, Debug, clap::Args)]
pub struct RelayArgs {
    /// istiod's xDS address, `http://istiod.istio-system.svc:15010` or
    /// `https://istiod.istio-system.svc:15012`; enables the relay.
    #[arg(long, env = "LAZYLOAD_UPSTREAM")]
    pub upstream: Option<String>,
    /// Plaintext ADS listen address of the relay.
    #[arg(long, env = "LAZYLOAD_XDS_LISTEN", default_value = "0.0.0.0:15010")]
    pub xds_listen: SocketAddr,
    /// TLS ADS listen address (used when --xds-tls-cert and --xds-tls-key are set).
    #[arg(long, env = "LAZYLOAD_XDS_TLS_LISTEN", default_value = "0.0.0.0:15012")]
    pub xds_tls_listen: SocketAddr,
    /// Certificate (PEM) the TLS ADS listener presents (pilot-agent checks it against the mesh root).
    #[arg(long, env = "LAZYLOAD_XDS_TLS_CERT", requires = "xds_tls_key")]
    pub xds_tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "LAZYLOAD_XDS_TLS_KEY", requires = "xds_tls_cert")]
    pub xds_tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to; without it clients are not asked for one.
    #[arg(long, env = "LAZYLOAD_XDS_TLS_CLIENT_CA")]
    pub xds_tls_client_ca: Option<PathBuf>,
    /// Mesh root certificate (PEM) istiod's certificate is verified with.
    #[arg(long, env = "LAZYLOAD_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// Name istiod's certificate must carry.
    #[arg(
        long,
        env = "LAZYLOAD_UPSTREAM_SERVER_NAME",
        default_value = "istiod.istio-system.svc"
    )]
    pub upstream_server_name: String,
    /// Token file sent to istiod for downstreams that send no `authorization` (plain Envoy).
    #[arg(long, env = "LAZYLOAD_UPSTREAM_TOKEN_FILE")]
    pub upstream_token_file: Option<PathBuf>,
    /// `ClusterID` sent to istiod for downstreams that send none.
    #[arg(long, env = "LAZYLOAD_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Node ids matching this RE2 pattern are global-sidecars too (besides node metadata
    /// `SLIME_APP=LAZYLOAD_GLOBAL_SIDECAR`).
    #[arg(long, env = "LAZYLOAD_GLOBAL_SIDECAR_NODE_PATTERN")]
    pub global_sidecar_node_pattern: Option<String>,
    /// `host:port` the global-sidecar sends access logs to; default
    /// `lazyload.<slimeNamespace>.svc.<clusterDomain>:<logSourcePort>`; `off` disables A6.
    #[arg(long, env = "LAZYLOAD_ALS_ADDRESS")]
    pub als_address: Option<String>,
    /// Address the global-sidecar's outbound listeners are rebound to (A10).
    #[arg(long, env = "LAZYLOAD_REBIND_ADDRESS", default_value = "0.0.0.0")]
    pub rebind_address: String,
    /// Accept callers' Istio mTLS on the global-sidecar's listeners (A11).
    #[arg(long, env = "LAZYLOAD_ACCEPT_MTLS")]
    pub accept_mtls: bool,
    /// Ports besides Istio's own that no global-sidecar listener may bind (A5).
    #[arg(long, env = "LAZYLOAD_RESERVED_PORTS", value_delimiter = ',')]
    pub reserved_ports: Vec<u16>,
    /// How long to keep trying istiod before a global-sidecar gets its last good config.
    #[arg(long, env = "LAZYLOAD_UPSTREAM_OPEN_BUDGET", default_value = "5s", value_parser = parse_duration)]
    pub upstream_open_budget: Duration,
    /// Connections each xDS listener holds at once; more are closed as they arrive.
    #[arg(long, env = "LAZYLOAD_XDS_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub xds_max_connections: u32,
    /// How long a new xDS connection may take to start its HTTP/2 (or TLS) handshake.
    #[arg(long, env = "LAZYLOAD_XDS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub xds_handshake_timeout: Duration,
    /// Largest xDS request accepted from a downstream, in bytes (istiod's default is 4 MiB).
    #[arg(long, env = "LAZYLOAD_XDS_MAX_REQUEST_BYTES", default_value_t = 4 << 20, value_parser = clap::value_parser!(u32).range(1024..))]
    pub xds_max_request_bytes: u32,
}

/// Parses a positive Go-style duration (`30s`, `2m`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = crate::duration::parse(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("the duration must be positive".into());
    }
    Ok(d)
}

/// What the components share while they start.
pub struct Components {
    /// The configuration.
    pub config: Arc<Config>,
    /// Cancelled when the process shuts down.
    pub shutdown: CancellationToken,
    /// Metrics registry (read by `/metrics`).
    pub registry: Registry,
    /// Readiness tasks (read by `/readyz`).
    pub readiness: Readiness,
    /// Debug routes (merged into the admin router).
    pub debug: Router,
    /// Running components, by name.
    pub tasks: JoinSet<(&'static str, anyhow::Result<()>)>,
}

impl Components {
    /// Runs a component until it returns; its name is logged if it fails.
    pub fn spawn<F>(&mut self, name: &'static str, fut: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.tasks.spawn(async move { (name, fut.await) });
    }
}

/// Runs lazyload until a signal arrives or a component fails.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let loaded = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::parse("")?,
    };
    telemetry::init(&loaded.config.global.log, args.log_format)?;
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    run_until(args, loaded.config, shutdown_signal()).await
}

/// Runs lazyload with `config` (logging already set up) until `stop` completes, with the reason
/// it gives, or a component fails; then drains the components.
pub async fn run_until(
    args: ServeArgs,
    config: Config,
    stop: impl Future<Output = &'static str>,
) -> anyhow::Result<()> {
    check_args(&args)?;
    let admin_addr = match args.admin_listen {
        Some(a) => a,
        None => config
            .misc_address("aux-addr")
            .and_then(|a| a.parse().ok())
            .context("global.misc.aux-addr is not an address")?,
    };

    let mut ctx = Components {
        config: Arc::new(config),
        shutdown: CancellationToken::new(),
        registry: Registry::with_prefix(crate::metrics::PREFIX),
        readiness: Readiness::default(),
        debug: Router::new(),
        tasks: JoinSet::new(),
    };

    start_learning(&mut ctx, &args).await?;
    if let Some(upstream) = &args.relay.upstream {
        start_relay(&mut ctx, &args.relay, upstream).await?;
    }

    let listener = admin::bind(admin_addr)
        .await
        .with_context(|| format!("binding the admin address {admin_addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "admin listening");
    let app = admin::router(
        Arc::new(std::mem::take(&mut ctx.registry)),
        ctx.readiness.clone(),
        ctx.debug,
    );
    let shutdown = ctx.shutdown.clone();
    let mut tasks = ctx.tasks;
    tasks.spawn(async move {
        (
            "admin",
            admin::serve(listener, app, shutdown).await.map_err(Into::into),
        )
    });

    let failure = tokio::select! {
        reason = stop => {
            tracing::info!("{reason}: shutting down");
            None
        }
        Some(done) = tasks.join_next() => Some(match done {
            Ok((name, Ok(()))) => anyhow::anyhow!("{name} stopped unexpectedly"),
            Ok((name, Err(e))) => e.context(format!("{name} failed")),
            Err(e) => anyhow::anyhow!("a component panicked: {e}"),
        }),
    };
    ctx.shutdown.cancel();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(done) = tasks.join_next().await {
            if let Ok((name, Err(e))) = done {
                tracing::warn!("{name} ended with an error during shutdown: {e:#}");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("components did not stop within {DRAIN_TIMEOUT:?}; exiting anyway");
    }
    failure.map_or(Ok(()), Err)
}

/// Checks every flag before anything starts (addresses, the upstream's scheme, every file it
/// names, the manifests directory): a mistake is an error now, not a failure per stream or per
/// write later while `/readyz` says ready.
fn check_args(args: &ServeArgs) -> anyhow::Result<()> {
    let relay = &args.relay;
    relay
        .rebind_address
        .parse::<std::net::IpAddr>()
        .with_context(|| format!("--rebind-address {:?} is not an IP address", relay.rebind_address))?;
    if let Some(address) = relay.als_address.as_deref().filter(|a| *a != "off") {
        parse_host_port(address).with_context(|| format!("--als-address {address:?}"))?;
    }
    if let Some(pattern) = &relay.global_sidecar_node_pattern {
        Regex::new(pattern).context("--global-sidecar-node-pattern")?;
    }
    if let Some(upstream) = &relay.upstream {
        // `{e}` alone: these errors name their cause already.
        upstream_of(relay, upstream).map_err(|e| anyhow::anyhow!("--upstream: {e}"))?;
    }
    let files = [
        ("--xds-tls-cert", &relay.xds_tls_cert),
        ("--xds-tls-key", &relay.xds_tls_key),
        ("--xds-tls-client-ca", &relay.xds_tls_client_ca),
        ("--upstream-ca", &relay.upstream_ca),
    ];
    for (flag, file) in files {
        if let Some(file) = file {
            std::fs::read(file).with_context(|| format!("{flag}: cannot read {}", file.display()))?;
        }
    }
    if let Some(dir) = &args.manifests_dir {
        crate::manifests::check_writable(dir)
            .map_err(|e| anyhow::anyhow!("--manifests-dir is not writable: {e}"))?;
    }
    Ok(())
}

/// The upstream the relay flags describe.
fn upstream_of(args: &RelayArgs, address: &str) -> Result<Upstream, crate::xds::upstream::Error> {
    Upstream::new(UpstreamConfig {
        address: address.to_string(),
        ca_file: args.upstream_ca.clone(),
        server_name: Some(args.upstream_server_name.clone()),
        token_file: args.upstream_token_file.clone(),
        cluster_id: args.cluster_id.clone(),
    })
}

/// Starts the xDS relay (plaintext, and TLS when configured).
async fn start_relay(ctx: &mut Components, args: &RelayArgs, upstream: &str) -> anyhow::Result<()> {
    let cfg = &ctx.config;
    let upstream = upstream_of(args, upstream)?;
    let als_address = match args.als_address.as_deref() {
        Some("off") => None,
        Some(a) => Some(parse_host_port(a).with_context(|| format!("--als-address {a:?}"))?),
        None => {
            let port = cfg
                .misc_address("logSourcePort")
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .map_or(8082, |a| a.port());
            let host = format!(
                "lazyload.{}.svc.{}",
                cfg.global.slime_namespace, cfg.general.cluster_domain
            );
            Some((host, port))
        }
    };
    let mut reserved_ports: std::collections::BTreeSet<u32> = RESERVED_PORTS.into_iter().collect();
    reserved_ports.extend(args.reserved_ports.iter().map(|&p| u32::from(p)));
    let node_pattern = args
        .global_sidecar_node_pattern
        .as_deref()
        .map(Regex::new)
        .transpose()
        .context("--global-sidecar-node-pattern")?;
    let relay = Relay::new(
        RelayConfig {
            settings: Settings {
                als_address,
                reserved_ports,
                rebind_address: args.rebind_address.clone(),
                remove_metadata_exchange: cfg.general.metric_source_type == MetricSourceType::Prometheus,
                accept_mtls: args.accept_mtls,
                cluster_domain: cfg.general.cluster_domain.clone(),
            },
            upstream,
            node_pattern,
            open_budget: args.upstream_open_budget,
            probe_interval: Duration::from_secs(2),
            limits: crate::xds::server::ServerLimits {
                connections: crate::net::ConnectionLimits {
                    max_connections: args.xds_max_connections as usize,
                    handshake_timeout: args.xds_handshake_timeout,
                },
                max_request_bytes: args.xds_max_request_bytes as usize,
            },
        },
        ctx.shutdown.clone(),
    );
    relay.metrics().register(&mut ctx.registry);
    let view = relay.clone();
    ctx.debug = std::mem::take(&mut ctx.debug).route(
        "/debug/relay",
        axum::routing::get(move || {
            let view = view.clone();
            async move { axum::Json(view.debug_view()) }
        }),
    );
    let ready = ctx.readiness.register("relay");
    let listener = TcpListener::bind(args.xds_listen)
        .await
        .with_context(|| format!("binding --xds-listen {}", args.xds_listen))?;
    tracing::info!(addr = %listener.local_addr()?, upstream = %relay_upstream(args), "xDS relay listening");
    ctx.spawn("relay", relay.clone().serve(listener, None));
    if let (Some(cert), Some(key)) = (&args.xds_tls_cert, &args.xds_tls_key) {
        let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
        if let Some(ca) = &args.xds_tls_client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        let listener = TcpListener::bind(args.xds_tls_listen)
            .await
            .with_context(|| format!("binding --xds-tls-listen {}", args.xds_tls_listen))?;
        tracing::info!(addr = %listener.local_addr()?, "xDS relay listening (TLS)");
        ctx.spawn("relay-tls", relay.serve(listener, Some(tls)));
    }
    ready.set(true);
    Ok(())
}

fn relay_upstream(args: &RelayArgs) -> &str {
    args.upstream.as_deref().unwrap_or_default()
}

/// Parses `host:port`.
fn parse_host_port(s: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = s.rsplit_once(':').context("expected host:port")?;
    anyhow::ensure!(!host.is_empty(), "expected host:port");
    Ok((
        host.trim_matches(['[', ']']).to_string(),
        port.parse().context("invalid port")?,
    ))
}

/// The cluster index, the learner and its in-memory consumer (`/debug/edges`), and the
/// access-log collector.
async fn start_learning(ctx: &mut Components, args: &ServeArgs) -> anyhow::Result<()> {
    let config = ctx.config.clone();
    let domain = &config.general.cluster_domain;
    let mut snapshot = match &args.cluster_snapshot {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Snapshot::parse(&text, domain).with_context(|| format!("loading {}", path.display()))?
        }
        None => Snapshot::parse("", domain)?,
    };
    snapshot
        .index
        .set_workload_label(config.general.fence_label_key_alias.clone());
    tracing::info!(counts = ?snapshot.index.counts(), fences = snapshot.fences.len(), "cluster index loaded");

    let mut learner = Learner::new(Limits {
        max_hosts_per_fence: config.general.max_learned_hosts_per_fence,
        ..Limits::default()
    });
    // `--manifests-dir` is a file sink instead of the API server: the cluster is not contacted.
    let client = match &args.manifests_dir {
        Some(_) => {
            if let Some(kubeconfig) = &args.kubeconfig {
                tracing::info!(kubeconfig = %kubeconfig.display(), "--manifests-dir given: the kubeconfig is not used");
            }
            None
        }
        None => kube_client(args.kubeconfig.as_deref()).await?,
    };
    if let Some(client) = &client {
        // What the cluster's fences already hold is not learned (and written) again.
        let fences = persist::list_fences(client.clone())
            .await
            .context("reading the ServiceFences of the cluster")?;
        snapshot.fences.extend(fences);
    }
    if let Some(dir) = &args.manifests_dir {
        // The directory is the state a previous run learned (the snapshot is not written).
        let restored = crate::manifests::restore_fence_status(dir, &mut snapshot.fences)
            .with_context(|| format!("reading back {}", dir.display()))?;
        for (file, why) in &restored.unreadable {
            tracing::warn!(file = %file.display(), %why, "not a ServiceFence: ignored");
        }
        for key in &restored.unknown {
            tracing::warn!(fence = %key, "a fence file of --manifests-dir for a fence the snapshot does not have: ignored");
        }
        tracing::info!(fences = restored.fences, dir = %dir.display(), "fence statuses read back from --manifests-dir");
    }
    let store = EdgeStore::seeded(&snapshot.fences, &mut learner);
    tracing::info!(
        edges = learner.len(),
        "learned dependencies restored from fence statuses"
    );
    let learner = LearnerHandle::new(learner, EDGE_BATCH);
    ctx.debug = std::mem::take(&mut ctx.debug).merge(store.router());
    let state = ClusterState::new(snapshot.index, snapshot.fences);
    state.rejections().register(&mut ctx.registry);
    for rejection in snapshot.rejected {
        state.rejections().reject(None, rejection);
    }
    for sidecar in snapshot.sidecars.into_iter().filter(|s| !is_fence_controlled(s)) {
        if let (Some(namespace), Some(name)) = (&sidecar.metadata.namespace, &sidecar.metadata.name) {
            state.set_other_sidecar(ObjectKey::new(namespace, name), Some(sidecar));
        }
    }
    // A8, from the snapshot's Sidecars and, with a cluster, as they change.
    let check = ScopeCheck::new(state.clone(), config.clone(), &mut ctx.registry);
    let shutdown = ctx.shutdown.clone();
    ctx.spawn("global-sidecar scope check", async move {
        check.run(shutdown).await;
        Ok(())
    });
    // Prometheus results take the learned edges' way to the fences (below).
    let (metrics_tx, mut metrics_rx) =
        tokio::sync::mpsc::channel::<(ObjectKey, BTreeMap<String, String>)>(256);
    if config.general.metric_source_type == MetricSourceType::Prometheus {
        let prom = config
            .prometheus
            .clone()
            .context("metricSourceType is prometheus but metric.prometheus is not configured")?;
        prometheus::Client::new(&prom.address)?;
        tracing::info!(address = %prom.address, "prometheus source polling the enabled fences");
        let (shutdown, interval, store, fences) = (
            ctx.shutdown.clone(),
            args.prometheus_interval,
            store.clone(),
            state.clone(),
        );
        let enabled = move || {
            fences
                .fence_keys()
                .into_iter()
                .filter(|k| fences.fence(k).is_some_and(|f| f.spec.enable))
                .collect()
        };
        ctx.spawn("prometheus source", async move {
            let sink = |fence: &ObjectKey, metrics: &BTreeMap<String, String>| {
                store.apply_metrics(fence, metrics, jiff::Timestamp::now());
                // Full: the consumer is behind; the next poll brings the same results again.
                if metrics_tx.try_send((fence.clone(), metrics.clone())).is_err() {
                    tracing::warn!(%fence, "prometheus results not written this time (writer busy)");
                }
            };
            Ok(prometheus::run(prom, enabled, interval, sink, shutdown).await?)
        });
    }
    let writer = client.clone().map(StatusWriter::new);
    if writer.is_none() {
        match &args.manifests_dir {
            Some(dir) => {
                tracing::info!(dir = %dir.display(), "learned fences and Sidecars are written as files (--manifests-dir), not to a cluster")
            }
            None => tracing::warn!("no cluster configured: learned dependencies are kept in memory only"),
        }
    }
    let mut consumer = EdgeConsumer {
        store: store.clone(),
        writer,
        state: state.clone(),
        config: config.clone(),
        manifests: args
            .manifests_dir
            .clone()
            .map(|dir| ManifestSink::new(dir, &ctx.readiness)),
        unwritten: BTreeMap::new(),
        unwritten_len: 0,
        written_at: BTreeMap::new(),
    };
    // The final flush waits for the collector: what its streams were handling is learned too.
    let collector_stopped = CancellationToken::new();
    let (shutdown, stopped, queue) = (ctx.shutdown.clone(), collector_stopped.clone(), learner.clone());
    ctx.spawn("edge-consumer", async move {
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    let _ = tokio::time::timeout(COLLECTOR_STOP_WAIT, stopped.cancelled()).await;
                    let mut flushed = consumer.unwritten_len;
                    loop {
                        let batch = queue.take_batch();
                        if batch.is_empty() {
                            break;
                        }
                        flushed += batch.len();
                        consumer.add(batch, jiff::Timestamp::now());
                    }
                    consumer.write(jiff::Timestamp::now()).await;
                    tracing::info!(edges = flushed, "learned dependencies flushed");
                    return Ok(());
                }
                () = tokio::time::sleep_until(consumer.next_due()), if consumer.unwritten_len > 0 => {
                    consumer.write_due(jiff::Timestamp::now()).await;
                }
                batch = queue.next_batch(EDGE_FLUSH) => {
                    consumer.add(batch, jiff::Timestamp::now());
                    if consumer.unwritten_len >= MAX_UNWRITTEN {
                        consumer.write(jiff::Timestamp::now()).await;
                    }
                }
                Some((key, metrics)) = metrics_rx.recv() => consumer.write_metrics(&key, &metrics, jiff::Timestamp::now()).await,
            }
        }
    });
    let (view, cfg) = (state.clone(), config.clone());
    ctx.debug = std::mem::take(&mut ctx.debug).route(
        "/debug/fences",
        axum::routing::get(move || {
            let (view, cfg) = (view.clone(), cfg.clone());
            async move { axum::Json(fences_view(&view, &cfg)) }
        }),
    );
    if let Some(client) = &client {
        start_watching(ctx, client.clone(), state.clone()).await?;
        start_reconciling(ctx, client.clone(), state.clone()).await?;
    }
    let index = state.index_handle();
    if config.general.metric_source_type == MetricSourceType::Accesslog || args.als_listen.is_some() {
        let addr = match args.als_listen {
            Some(a) => a,
            None => config
                .misc_address("logSourcePort")
                .and_then(|a| a.parse().ok())
                .context("global.misc.logSourcePort is not an address")?,
        };
        let listener = collector::bind(addr)
            .await
            .with_context(|| format!("binding the access-log address {addr}"))?;
        tracing::info!(addr = %listener.local_addr()?, "access-log collector listening");
        let metrics = collector::Metrics::register(&mut ctx.registry);
        let peers = match args.als_trust {
            AlsTrust::GlobalSidecar => Peers::GlobalSidecars(global_sidecar_namespaces(&config)),
            AlsTrust::Any => {
                tracing::warn!("--als-trust any: access logs are taken from whoever reaches the collector");
                Peers::Any
            }
        };
        let service = Collector::new(index, Attributor::new(&config), learner, metrics, peers);
        let shutdown = ctx.shutdown.clone();
        ctx.spawn("access-log collector", async move {
            let _stopped = collector_stopped.drop_guard();
            Ok(collector::serve(
                listener,
                service,
                crate::net::ConnectionLimits::default(),
                shutdown,
            )
            .await?)
        });
    } else {
        collector_stopped.cancel();
    }
    Ok(())
}

/// The cluster watchers: keep `state` up to date from `client` until shutdown; readiness task
/// `cluster-index` is done once every kind has been listed (see [`watch::run`]).
pub async fn start_watching(
    ctx: &mut Components,
    client: kube::Client,
    state: ClusterState,
) -> anyhow::Result<()> {
    let ready = ctx.readiness.register("cluster-index");
    // Before any controller starts: nothing is computed from a kind not listed yet.
    state.await_sync(crate::cluster::convert::Kind::ALL);
    // The index's own domain, so converted VirtualService hosts match its Service FQDNs.
    let domain = state.index().domain().to_string();
    let shutdown = ctx.shutdown.clone();
    ctx.spawn("cluster watchers", async move {
        watch::run(client, state, domain, ready, shutdown).await;
        Ok(())
    });
    Ok(())
}

/// The controllers that write, under the leader Lease ([`crate::reconcile::controllers`]).
async fn start_reconciling(
    ctx: &mut Components,
    client: kube::Client,
    state: ClusterState,
) -> anyhow::Result<()> {
    let identity = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| format!("lazyload-{}", std::process::id()));
    let (config, shutdown) = (ctx.config.clone(), ctx.shutdown.clone());
    let tasks =
        crate::reconcile::controllers(client, &state, &config, &identity, &mut ctx.registry, &shutdown)
            .await?;
    for (name, task) in tasks {
        ctx.spawn(name, async move { Ok(task.await?) });
    }
    Ok(())
}

/// Where learned edges go: into `/debug/edges` as each batch is taken, and into the cluster's
/// fence statuses or the snapshot's fences (and files) per fence, coalesced: every edge a fence
/// learned since its last write goes in one write. Taking a batch costs O(its edges); a write
/// costs the fence's size, once per write, not once per edge or batch.
struct EdgeConsumer {
    store: EdgeStore,
    writer: Option<StatusWriter>,
    state: ClusterState,
    config: Arc<Config>,
    manifests: Option<ManifestSink>,
    unwritten: BTreeMap<ObjectKey, Vec<Edge>>,
    unwritten_len: usize,
    /// When each fence written within the last [`FENCE_WRITE_INTERVAL`] was written.
    written_at: BTreeMap<ObjectKey, tokio::time::Instant>,
}

impl EdgeConsumer {
    /// Takes a batch: shown at once, written at the next write.
    fn add(&mut self, batch: Vec<Edge>, now: jiff::Timestamp) {
        self.store.apply(&batch, now);
        self.unwritten_len += batch.len();
        for edge in batch {
            self.unwritten.entry(edge.fence.clone()).or_default().push(edge);
        }
    }

    /// When the next fence with unwritten edges may be written (now, for one not written within
    /// [`FENCE_WRITE_INTERVAL`]).
    fn next_due(&self) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        self.unwritten
            .keys()
            .map(|k| {
                self.written_at
                    .get(k)
                    .map_or(now, |at| *at + FENCE_WRITE_INTERVAL)
            })
            .min()
            .unwrap_or(now)
    }

    /// Writes the fences whose interval has passed.
    async fn write_due(&mut self, now: jiff::Timestamp) {
        let at = tokio::time::Instant::now();
        self.written_at
            .retain(|_, written| at.duration_since(*written) < FENCE_WRITE_INTERVAL);
        let (due, wait): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(&mut self.unwritten)
            .into_iter()
            .partition(|(k, _)| !self.written_at.contains_key(k));
        self.unwritten = wait;
        self.write_fences(due, now).await;
    }

    /// Writes every fence that learned something since its last write, once.
    async fn write(&mut self, now: jiff::Timestamp) {
        let unwritten = std::mem::take(&mut self.unwritten);
        self.write_fences(unwritten, now).await;
    }

    async fn write_fences(&mut self, unwritten: BTreeMap<ObjectKey, Vec<Edge>>, now: jiff::Timestamp) {
        let at = tokio::time::Instant::now();
        self.unwritten_len -= unwritten.values().map(Vec::len).sum::<usize>();
        for key in unwritten.keys() {
            self.written_at.insert(key.clone(), at);
        }
        match &mut self.writer {
            Some(w) => {
                let done = w.write(unwritten.into_values().flatten().collect(), now).await;
                tracing::debug!(?done, "learned dependencies written");
            }
            None => {
                for (key, edges) in unwritten {
                    let update = |s: &mut _| {
                        crate::learn::status::apply_edges(s, edges.iter(), now);
                    };
                    apply_locally(
                        &self.state,
                        &self.config,
                        &key,
                        update,
                        now,
                        self.manifests.as_ref(),
                    );
                }
            }
        }
    }

    /// Writes one Prometheus poll of `key`.
    async fn write_metrics(
        &mut self,
        key: &ObjectKey,
        metrics: &BTreeMap<String, String>,
        now: jiff::Timestamp,
    ) {
        match &mut self.writer {
            Some(w) => {
                let done = w.write_metrics(key, metrics, now).await;
                tracing::debug!(?done, "prometheus results written");
            }
            None => {
                let update = |s: &mut _| {
                    crate::learn::prometheus::apply_metrics(s, metrics, now);
                };
                apply_locally(
                    &self.state,
                    &self.config,
                    key,
                    update,
                    now,
                    self.manifests.as_ref(),
                );
            }
        }
    }
}

/// Without a cluster: merges what was learned for one fence (`update`) into its in-memory copy
/// (so `/debug/fences` shows the Sidecar it now gets) and, with a manifests directory, writes the
/// fence and its Sidecar there. What was learned for a fence the snapshot does not hold stays in
/// `/debug/edges` only; a file that cannot be written is logged.
fn apply_locally(
    state: &ClusterState,
    config: &Config,
    key: &ObjectKey,
    update: impl FnOnce(&mut ServiceFenceStatus),
    now: jiff::Timestamp,
    sink: Option<&ManifestSink>,
) {
    let Some(mut fence) = state.fence(key) else {
        return;
    };
    update(fence.status.get_or_insert_with(Default::default));
    let eval = crate::model::evaluate(&fence, &state.index(), config, now, IstioVersion::default());
    fence.status = Some(eval.status);
    if let Some(ManifestSink { dir, ready }) = sink {
        let written =
            crate::manifests::write(dir, key, "servicefence", &fence).and_then(|()| match &eval.sidecar {
                Ok(sidecar) => crate::manifests::write(dir, key, "sidecar", sidecar),
                Err(why) => {
                    tracing::info!(fence = %key, reason = why.reason(), "no Sidecar");
                    Ok(())
                }
            });
        match written {
            Ok(()) => ready.set(true),
            Err(e) => {
                tracing::error!(fence = %key, error = %format!("{e:#}"), "writing the learned fence");
                ready.fail(format!("writing {key}: {e}"));
            }
        }
    }
    state.set_fence(key.clone(), Some(fence));
}

/// `--manifests-dir` and its readiness task: not ready while the last write failed.
struct ManifestSink {
    dir: std::path::PathBuf,
    ready: crate::readiness::Task,
}

impl ManifestSink {
    fn new(dir: std::path::PathBuf, readiness: &Readiness) -> Self {
        let ready = readiness.register("manifests-dir");
        ready.set(true);
        Self { dir, ready }
    }
}

/// `/debug/fences`: every fence with its status and the Sidecar hosts the model gives it now
/// (or why it gets none).
fn fences_view(state: &ClusterState, config: &Config) -> serde_json::Value {
    let now = jiff::Timestamp::now();
    let index = state.index();
    let fences: serde_json::Map<String, serde_json::Value> = state
        .fence_keys()
        .into_iter()
        .filter_map(|key| {
            let fence = state.fence(&key)?;
            let eval = crate::model::evaluate(&fence, &index, config, now, IstioVersion::default());
            let sidecar = match &eval.sidecar {
                Ok(s) => serde_json::json!({"hosts": s.spec.egress.first().map(|e| e.hosts.clone()).unwrap_or_default()}),
                Err(why) => serde_json::json!({"none": why.reason()}),
            };
            Some((
                key.to_string(),
                serde_json::json!({"enable": fence.spec.enable, "status": eval.status, "sidecar": sidecar}),
            ))
        })
        .collect();
    serde_json::Value::Object(fences)
}

/// A client of the cluster: from `--kubeconfig`, else in-cluster when running in a pod, else none.
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Option<kube::Client>> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
            kube::Config::incluster().context("the in-cluster configuration")?
        }
        None => return Ok(None),
    };
    Ok(Some(
        kube::Client::try_from(config).context("building the Kubernetes client")?,
    ))
}

/// Waits for SIGTERM or an interrupt; names which came.
pub async fn shutdown_signal() -> &'static str {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return "interrupt";
            }
        };
        tokio::select! {
            _ = ctrl_c => "interrupt",
            _ = term.recv() => "SIGTERM",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
        "interrupt"
    }
}
