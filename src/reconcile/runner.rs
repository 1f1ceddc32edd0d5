//! The one controller runner: every controller (fences, auto-fence, fallback, the A8 scope check)
//! is a [`Reconciler`] — what a [`Change`] triggers, and `reconcile(key)` — and [`Runner`] does
//! the rest the same way for all of them:
//!
//! - **Leader gating.** A writing controller ([`Gate::Leader`]) reconciles only while this replica
//!   holds the Lease; a key popped after the lease was lost waits (the next leader resyncs
//!   everything anyway), so two leaders never write at once. Taking the lease enqueues every key.
//!   Followers keep their queue warm.
//! - **Nothing before the index is whole.** A writing controller reconciles nothing while a kind
//!   has not synced: a Sidecar computed without the VirtualServices would drop every host they
//!   expand to, a Service not listed yet would look gone. The last kind to sync announces
//!   [`Change::Resync`], which brings every key back.
//! - **One debounced queue** ([`Queue`]): a burst of changes to one key within its debounce window
//!   costs one reconcile; a reconcile can ask to be run again at a time ([`Action::requeue_at`]).
//! - **One backoff policy**: a failed reconcile is retried after [`RETRY_FIRST`], doubling to
//!   [`RETRY_MAX`], back to the start after a success; each failure counts in
//!   `lazyload_reconcile_errors_total{controller}`.
//!
//! Why not kube-runtime's `Controller`: it is driven by reflector stores of one resource kind and
//! hands the reconciler that kind's object. lazyload's controllers are driven by one shared
//! [`ClusterState`] fed by seven watchers and its [`Change`] stream, their keys are not always
//! objects (the fallback controller and the scope check have a single key), and the rules above
//! (the Lease, the whole-index gate) are not kube-runtime's. A second set of watches per
//! controller would cost memory and API load for nothing, so the runner is lazyload's own, and
//! small enough to read in one sitting.

use std::collections::HashMap;
use std::fmt::Display;
use std::hash::Hash;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::queue::Queue;
use crate::cluster::writer::Error;
use crate::cluster::{Change, ClusterState};
use crate::telemetry::register_families;

/// First retry delay after a failed reconcile.
pub const RETRY_FIRST: Duration = Duration::from_millis(500);
/// Longest retry delay (the backoff doubles up to it).
pub const RETRY_MAX: Duration = Duration::from_secs(60);

/// What a successful reconcile asks of the runner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Action {
    /// Reconcile the key again at this time (a dependency expires, ...), unless a change
    /// brings it back earlier.
    pub requeue_at: Option<Instant>,
}

impl Action {
    /// Nothing more until a change triggers the key again.
    pub fn done() -> Self {
        Self::default()
    }

    /// Reconcile again at `at`.
    pub fn requeue_at(at: Instant) -> Self {
        Self { requeue_at: Some(at) }
    }
}

/// The key of a controller that reconciles one thing, named for the logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Singleton(pub &'static str);

impl Display for Singleton {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Which keys a change enqueues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger<K> {
    /// None.
    Nothing,
    /// These keys, each after the delay (debounce).
    Keys(Vec<K>, Duration),
    /// Every key ([`Reconciler::all_keys`]) after the delay.
    All(Duration),
}

/// When a controller may reconcile.
#[derive(Debug)]
pub enum Gate {
    /// Only while the Lease is held (`true`) and every kind has synced: the controllers that
    /// write. The runner ends when the sender is dropped.
    Leader(watch::Receiver<bool>),
    /// Always: a controller that only reads (the scope check runs on every replica).
    EveryReplica,
}

impl Gate {
    fn leading(&self) -> bool {
        match self {
            Self::Leader(leader) => *leader.borrow(),
            Self::EveryReplica => true,
        }
    }

    /// Resolves when leadership changes: `Some(leading)`, or `None` when the Lease task ended.
    async fn changed(&mut self) -> Option<bool> {
        match self {
            Self::Leader(leader) => match leader.changed().await {
                Ok(()) => Some(*leader.borrow_and_update()),
                Err(_) => None,
            },
            Self::EveryReplica => std::future::pending().await,
        }
    }
}

/// One controller: what triggers it and how it reconciles one key.
pub trait Reconciler: Send + 'static {
    /// What is reconciled (a fence's key, or a unit type for a single-key controller).
    type Key: Clone + Eq + Hash + Ord + Display + Send + Sync + 'static;
    /// The controller's name in logs and in the `controller` label of the runner's metrics.
    const NAME: &'static str;

    /// Every key: reconciled on start, on taking the lease and after missed changes.
    fn all_keys(&self) -> Vec<Self::Key>;

    /// Which keys `change` enqueues, after how long.
    fn triggers(&self, change: &Change) -> Trigger<Self::Key>;

    /// Called when this replica starts leading, before every key is enqueued (forget what a
    /// previous term cached).
    fn started_leading(&mut self) {}

    /// Makes the cluster match the decision for `key`.
    fn reconcile(&mut self, key: &Self::Key) -> impl Future<Output = Result<Action, Error>> + Send;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabel {
    controller: &'static str,
}

/// The runner's metrics, one series per controller.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    errors: Family<ControllerLabel, Counter>,
    queue_depth: Family<ControllerLabel, Gauge>,
}

impl Metrics {
    /// Registers `reconcile_errors` and `reconcile_queue_depth` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        register_families(
            registry,
            "reconcile",
            vec![
                (
                    "errors",
                    "Failed reconciles (retried)",
                    Box::new(m.errors.clone()),
                ),
                (
                    "queue_depth",
                    "Keys waiting to be reconciled",
                    Box::new(m.queue_depth.clone()),
                ),
            ],
        );
        m
    }

    /// Gives each family the series of `controller` (the metrics catalog shows every family).
    pub fn touch(&self, controller: &'static str) {
        let label = ControllerLabel { controller };
        drop(self.errors.get_or_create(&label));
        drop(self.queue_depth.get_or_create(&label));
    }
}

/// Per-key retry delays: [`RETRY_FIRST`] doubling to [`RETRY_MAX`], forgotten after a success.
#[derive(Debug)]
struct Backoff<K> {
    delays: HashMap<K, Duration>,
}

impl<K: Eq + Hash> Backoff<K> {
    /// The delay before `key`'s next attempt after one more failure.
    fn failed(&mut self, key: K) -> Duration {
        let delay = self
            .delays
            .get(&key)
            .map_or(RETRY_FIRST, |d| (*d * 2).min(RETRY_MAX));
        self.delays.insert(key, delay);
        delay
    }

    fn succeeded(&mut self, key: &K) {
        self.delays.remove(key);
    }
}

/// Runs one [`Reconciler`] (see the module documentation for the policy).
pub struct Runner<R: Reconciler> {
    reconciler: R,
    /// The state the reconciler reads: its change stream drives the runner.
    state: ClusterState,
    gate: Gate,
    queue: Queue<R::Key>,
    backoff: Backoff<R::Key>,
    errors: Counter,
    queue_depth: Gauge,
}

impl<R: Reconciler> Runner<R> {
    /// A runner for `reconciler` over `state` (the state it reads), gated by `gate`, counting
    /// in `metrics`.
    pub fn new(reconciler: R, state: ClusterState, gate: Gate, metrics: &Metrics) -> Self {
        let label = ControllerLabel { controller: R::NAME };
        Self {
            reconciler,
            state,
            gate,
            queue: Queue::default(),
            backoff: Backoff {
                delays: HashMap::new(),
            },
            errors: metrics.errors.get_or_create(&label).clone(),
            queue_depth: metrics.queue_depth.get_or_create(&label).clone(),
        }
    }

    /// Runs until `shutdown`, or until the Lease task or the change stream ends.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut changes = self.state.subscribe();
        self.schedule_all(Duration::ZERO);
        loop {
            let due = self.queue.next_due().filter(|_| self.gate.leading());
            tokio::select! {
                () = shutdown.cancelled() => return,
                leading = self.gate.changed() => match leading {
                    None => return,
                    Some(true) => {
                        tracing::info!(controller = R::NAME, "leading: reconciling everything");
                        self.reconciler.started_leading();
                        self.schedule_all(Duration::ZERO);
                    }
                    Some(false) => {}
                },
                change = changes.recv() => match change {
                    Ok(change) => self.on_change(&change),
                    // Missed changes: look at everything.
                    Err(broadcast::error::RecvError::Lagged(_)) => self.schedule_all(Duration::ZERO),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                () = sleep_until(due) => self.run_due(&shutdown).await,
            }
            self.queue_depth.set(self.queue.len() as i64);
        }
    }

    fn on_change(&mut self, change: &Change) {
        match self.reconciler.triggers(change) {
            Trigger::Nothing => {}
            Trigger::Keys(keys, delay) => {
                let at = Instant::now() + delay;
                for key in keys {
                    self.queue.schedule(key, at);
                }
            }
            Trigger::All(delay) => self.schedule_all(delay),
        }
    }

    fn schedule_all(&mut self, delay: Duration) {
        let at = Instant::now() + delay;
        for key in self.reconciler.all_keys() {
            self.queue.schedule(key, at);
        }
    }

    /// Reconciles every key that is due, one at a time.
    async fn run_due(&mut self, shutdown: &CancellationToken) {
        for key in self.queue.pop_due(Instant::now()) {
            // Lease lost or stopping mid-batch: the rest waits.
            if !self.gate.leading() || shutdown.is_cancelled() {
                self.queue.schedule(key, Instant::now());
                continue;
            }
            if matches!(self.gate, Gate::Leader(_)) {
                let unsynced = self.state.unsynced();
                if !unsynced.is_empty() {
                    tracing::debug!(controller = R::NAME, %key, ?unsynced, "not reconciled: waiting for the cluster index");
                    continue;
                }
            }
            match self.reconciler.reconcile(&key).await {
                Ok(action) => {
                    self.backoff.succeeded(&key);
                    if let Some(at) = action.requeue_at {
                        self.queue.schedule(key, at);
                    }
                }
                Err(e) => {
                    self.errors.inc();
                    let delay = self.backoff.failed(key.clone());
                    tracing::warn!(controller = R::NAME, %key, retry_in = ?delay, "reconcile failed: {e}");
                    self.queue.schedule(key, Instant::now() + delay);
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
