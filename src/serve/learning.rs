//! The learning side of `serve`: the cluster index (from a snapshot and, with a cluster, its
//! fences), the learner seeded from what the fences hold, the A8 scope check, the Prometheus
//! source, the consumer that takes learned edges to a [`FenceSink`], and the access-log
//! collector. What to write and when is decided in [`crate::learn`]; this file wires.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::options::{AlsTrust, Options};
use super::{Components, cluster};
use crate::als::attribute::Attributor;
use crate::als::collector::{self, Collector, Peers};
use crate::cluster::ClusterState;
use crate::config::{Config, MetricSourceType};
use crate::index::ClusterIndex;
use crate::index::snapshot::Snapshot;
use crate::learn::persist::StatusWriter;
use crate::learn::pump::{EdgeStore, LearnerHandle};
use crate::learn::schedule::{EDGE_FLUSH, WriteSchedule};
use crate::learn::sink::{FenceSink, Target, fences_view};
use crate::learn::{Edge, Learner, Limits, prometheus};
use crate::model::scope::global_sidecar_namespaces;
use crate::model::sidecar::is_fence_controlled;
use crate::reconcile::scope::ScopeCheck;
use crate::vocab::ObjectKey;

/// Most edges in one batch the consumer takes from the learner.
const EDGE_BATCH: usize = 500;
/// How long the final flush waits for the collector's streams to end (they end at once).
const COLLECTOR_STOP_WAIT: Duration = Duration::from_secs(2);
/// Prometheus polls waiting for the consumer; more are dropped (the next poll brings them again).
const METRICS_QUEUE: usize = 256;

/// One Prometheus poll of one fence.
type Metrics = (ObjectKey, BTreeMap<String, String>);

/// The cluster index, the learner and its consumer (`/debug/edges`, `/debug/fences`), the
/// cluster's watchers and reconcilers when there is a cluster, and the access-log collector.
pub async fn start_learning(ctx: &mut Components, options: &Options) -> anyhow::Result<()> {
    let config = ctx.config.clone();
    let mut snapshot = crate::inputs::snapshot(options.cluster_snapshot.as_deref(), &config)?;
    tracing::info!(counts = ?snapshot.index.counts(), fences = snapshot.fences.len(), "cluster index loaded");
    let client = client(options).await?;
    restore_fences(&mut snapshot, client.as_ref(), options.manifests_dir.as_deref()).await?;
    let mut learner = Learner::new(Limits {
        max_hosts_per_fence: config.general.max_learned_hosts_per_fence,
        ..Limits::default()
    });
    let store = EdgeStore::seeded(&snapshot.fences, &mut learner);
    tracing::info!(
        edges = learner.len(),
        "learned dependencies restored from fence statuses"
    );
    let learner = LearnerHandle::new(learner, EDGE_BATCH);
    ctx.debug = std::mem::take(&mut ctx.debug).merge(store.router());
    let state = cluster_state(ctx, snapshot);
    start_scope_check(ctx, &state);
    let metrics = start_prometheus(ctx, options, &store, &state)?;
    let target = target(ctx, options, client.clone());
    let consumer = EdgeConsumer {
        store,
        schedule: WriteSchedule::default(),
        sink: FenceSink::new(state.clone(), config.clone(), target),
    };
    // The final flush waits for the collector: what its streams were handling is learned too.
    let collector_stopped = CancellationToken::new();
    let (shutdown, stopped, queue) = (ctx.shutdown.clone(), collector_stopped.clone(), learner.clone());
    ctx.spawn("edge-consumer", consumer.run(queue, metrics, shutdown, stopped));
    route_fences_view(ctx, &state, &config);
    if let Some(client) = client {
        cluster::start(ctx, client, state.clone()).await?;
    }
    if config.general.metric_source_type == MetricSourceType::Accesslog || options.als_listen.is_some() {
        start_collector(ctx, options, state.index_handle(), learner, collector_stopped).await
    } else {
        collector_stopped.cancel();
        Ok(())
    }
}

/// The cluster written to: none with `--manifests-dir` (a file sink instead of the API server),
/// else from `--kubeconfig`, else in-cluster in a pod, else none.
async fn client(options: &Options) -> anyhow::Result<Option<kube::Client>> {
    if options.manifests_dir.is_some() {
        if let Some(kubeconfig) = &options.kubeconfig {
            tracing::info!(kubeconfig = %kubeconfig.display(), "--manifests-dir given: the kubeconfig is not used");
        }
        return Ok(None);
    }
    cluster::kube_client(options.kubeconfig.as_deref()).await
}

/// Adds what was learned before to the snapshot's fences: the cluster's fences (what they hold
/// is not learned and written again), or the fence statuses a previous run wrote to `manifests`
/// (the snapshot is not written, the directory is the state).
async fn restore_fences(
    snapshot: &mut Snapshot,
    client: Option<&kube::Client>,
    manifests: Option<&Path>,
) -> anyhow::Result<()> {
    if let Some(client) = client {
        let fences = crate::cluster::writer::list_fences(client.clone())
            .await
            .context("reading the ServiceFences of the cluster")?;
        snapshot.fences.extend(fences);
    }
    if let Some(dir) = manifests {
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
    Ok(())
}

/// The shared cluster state, from the snapshot: its index and fences, its rejections (counted),
/// and the Sidecars no fence owns.
fn cluster_state(ctx: &mut Components, snapshot: Snapshot) -> ClusterState {
    let state = ClusterState::new(snapshot.index, snapshot.fences);
    state.rejections().register(&mut ctx.registry);
    for rejection in snapshot.rejected {
        state.rejections().reject(None, rejection);
    }
    for sidecar in snapshot.sidecars.into_iter().filter(|s| !is_fence_controlled(s)) {
        if let Ok(key) = ObjectKey::of(&sidecar.metadata) {
            state.set_other_sidecar(key, Some(sidecar));
        }
    }
    state
}

/// A8, from the snapshot's Sidecars and, with a cluster, as they change.
fn start_scope_check(ctx: &mut Components, state: &ClusterState) {
    let check = ScopeCheck::new(state.clone(), ctx.config.clone(), &mut ctx.registry);
    let shutdown = ctx.shutdown.clone();
    ctx.spawn("global-sidecar scope check", async move {
        check.run(shutdown).await;
        Ok(())
    });
}

/// The Prometheus source, with `metricSourceType: prometheus`: its results go into
/// `/debug/edges` at once and, through the returned queue, the learned edges' way to the fences.
fn start_prometheus(
    ctx: &mut Components,
    options: &Options,
    store: &EdgeStore,
    state: &ClusterState,
) -> anyhow::Result<mpsc::Receiver<Metrics>> {
    let (metrics_tx, metrics_rx) = mpsc::channel::<Metrics>(METRICS_QUEUE);
    if ctx.config.general.metric_source_type != MetricSourceType::Prometheus {
        return Ok(metrics_rx);
    }
    let prom = ctx
        .config
        .prometheus
        .clone()
        .context("metricSourceType is prometheus but metric.prometheus is not configured")?;
    prometheus::Client::new(&prom.address)?;
    tracing::info!(address = %prom.address, "prometheus source polling the enabled fences");
    let (shutdown, interval, store, fences) = (
        ctx.shutdown.clone(),
        options.prometheus_interval,
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
    Ok(metrics_rx)
}

/// Where learned fences go: the cluster when there is one, else `--manifests-dir` (with its
/// readiness task, not ready while the last write failed), else memory only.
fn target(ctx: &Components, options: &Options, client: Option<kube::Client>) -> Target {
    match (client, &options.manifests_dir) {
        (Some(client), _) => Target::Api(StatusWriter::new(client)),
        (None, Some(dir)) => {
            tracing::info!(dir = %dir.display(), "learned fences and Sidecars are written as files (--manifests-dir), not to a cluster");
            Target::Directory {
                dir: dir.clone(),
                ready: Some(ctx.readiness.register("manifests-dir")),
            }
        }
        (None, None) => {
            tracing::warn!("no cluster configured: learned dependencies are kept in memory only");
            Target::Memory
        }
    }
}

/// `/debug/fences`: every fence with its status and the Sidecar the model gives it now.
fn route_fences_view(ctx: &mut Components, state: &ClusterState, config: &Arc<Config>) {
    let (view, cfg) = (state.clone(), config.clone());
    ctx.debug = std::mem::take(&mut ctx.debug).route(
        "/debug/fences",
        axum::routing::get(move || {
            let (view, cfg) = (view.clone(), cfg.clone());
            async move { axum::Json(fences_view(&view, &cfg, jiff::Timestamp::now())) }
        }),
    );
}

/// The access-log collector on `--als-listen` (or `global.misc.logSourcePort`); `stopped` is
/// cancelled once its streams have ended.
async fn start_collector(
    ctx: &mut Components,
    options: &Options,
    index: Arc<std::sync::RwLock<ClusterIndex>>,
    learner: LearnerHandle,
    stopped: CancellationToken,
) -> anyhow::Result<()> {
    let config = ctx.config.clone();
    let addr = match options.als_listen {
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
    let peers = match options.als_trust {
        AlsTrust::GlobalSidecar => Peers::GlobalSidecars(global_sidecar_namespaces(&config)),
        AlsTrust::Any => {
            tracing::warn!("--als-trust any: access logs are taken from whoever reaches the collector");
            Peers::Any
        }
    };
    let service = Collector::new(index, Attributor::new(&config), learner, metrics, peers);
    let shutdown = ctx.shutdown.clone();
    ctx.spawn("access-log collector", async move {
        let _stopped = stopped.drop_guard();
        Ok(collector::serve(
            listener,
            service,
            crate::net::ConnectionLimits::default(),
            shutdown,
        )
        .await?)
    });
    Ok(())
}

/// Takes learned edges from the learner: into `/debug/edges` as each batch is taken, and to the
/// sink when the [`WriteSchedule`] says (every edge a fence learned since its last write goes in
/// one write). Taking a batch costs O(its edges); a write costs the fence's size.
struct EdgeConsumer {
    store: EdgeStore,
    schedule: WriteSchedule,
    sink: FenceSink,
}

impl EdgeConsumer {
    /// Runs until `shutdown`, then takes what the collector (`collector_stopped`) still queued
    /// and writes everything.
    async fn run(
        mut self,
        queue: LearnerHandle,
        mut metrics: mpsc::Receiver<Metrics>,
        shutdown: CancellationToken,
        collector_stopped: CancellationToken,
    ) -> anyhow::Result<()> {
        loop {
            let due = self.schedule.next_due(Instant::now());
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    let _ = tokio::time::timeout(COLLECTOR_STOP_WAIT, collector_stopped.cancelled()).await;
                    self.flush(&queue).await;
                    return Ok(());
                }
                () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    let fences = self.schedule.take_due(Instant::now());
                    self.sink.write(fences, jiff::Timestamp::now()).await;
                }
                batch = queue.next_batch(EDGE_FLUSH) => {
                    self.add(batch);
                    if self.schedule.is_full() {
                        let fences = self.schedule.take_all(Instant::now());
                        self.sink.write(fences, jiff::Timestamp::now()).await;
                    }
                }
                Some((key, polled)) = metrics.recv() => {
                    self.sink.write_metrics(&key, &polled, jiff::Timestamp::now()).await;
                }
            }
        }
    }

    /// Takes a batch: shown at once, written when the schedule says.
    fn add(&mut self, batch: Vec<Edge>) {
        self.store.apply(&batch, jiff::Timestamp::now());
        self.schedule.add(batch);
    }

    /// The final flush: every queued edge taken, everything written.
    async fn flush(&mut self, queue: &LearnerHandle) {
        let mut flushed = self.schedule.unwritten();
        loop {
            let batch = queue.take_batch();
            if batch.is_empty() {
                break;
            }
            flushed += batch.len();
            self.add(batch);
        }
        let fences = self.schedule.take_all(Instant::now());
        self.sink.write(fences, jiff::Timestamp::now()).await;
        tracing::info!(edges = flushed, "learned dependencies flushed");
    }
}
