//! The fence controller: ServiceFence -> Sidecar and status.
//!
//! It reacts to the cluster state's change stream: a fence (or its Sidecar) that changed is
//! reconciled after the debounce window (default 100 ms, so a burst of learned edges costs one
//! write), a change that can move any fence's dependencies (Services, Namespaces, routing, a
//! re-list) reconciles every fence after a longer window, and each fence is reconciled again when
//! the model says a dependency expires. A failed write is retried with the runner's backoff;
//! nothing learned is lost meanwhile, because learned edges already live in the fence's status.
//! Leader gating, the queue and the backoff are the [`Runner`]'s.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use kube::runtime::events::{EventType, Recorder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::runner::{self, Action, Gate, Reconciler, Runner, Trigger};
use crate::cluster::writer::{EventPublisher, FenceWriter, REASON_UNREADABLE, Write};
use crate::cluster::{Change, ClusterState};
use crate::config::Config;
use crate::index::convert::Kind;
use crate::model::evaluate;
use crate::telemetry::register_families;
use crate::vocab::ObjectKey;
use crate::vocab::fence::ServiceFence;

/// How long a fence waits after a change to it before it is reconciled.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// How long every fence waits after a change that can affect all of them.
pub const RESYNC_DEBOUNCE: Duration = Duration::from_secs(1);

/// Controller metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    reconciles: Counter,
    sidecar_writes: Counter,
    status_writes: Counter,
    skipped_writes: Counter,
    learn_to_apply: Histogram,
}

impl Metrics {
    /// Registers the metrics (prefix `reconcile_`).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            reconciles: Counter::default(),
            sidecar_writes: Counter::default(),
            status_writes: Counter::default(),
            skipped_writes: Counter::default(),
            learn_to_apply: Histogram::new([0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        };
        register_families(
            registry,
            "reconcile",
            vec![
                ("fences", "Fence reconciles", Box::new(m.reconciles.clone())),
                (
                    "sidecar_writes",
                    "Sidecars applied or deleted",
                    Box::new(m.sidecar_writes.clone()),
                ),
                (
                    "status_writes",
                    "Fence statuses patched",
                    Box::new(m.status_writes.clone()),
                ),
                (
                    "skipped_writes",
                    "Writes skipped because the live object was right",
                    Box::new(m.skipped_writes.clone()),
                ),
                (
                    "learn_to_apply_seconds",
                    "From a dependency learned to its Sidecar written",
                    Box::new(m.learn_to_apply.clone()),
                ),
            ],
        );
        m
    }
}

/// The fence controller.
pub struct FenceController {
    state: ClusterState,
    config: Arc<Config>,
    writer: FenceWriter,
    events: EventPublisher,
    metrics: Metrics,
}

impl FenceController {
    /// A controller writing through `writer`; events go through `recorder` when given.
    pub fn new(
        state: ClusterState,
        config: Arc<Config>,
        writer: FenceWriter,
        recorder: Option<Recorder>,
        metrics: Metrics,
    ) -> Self {
        Self {
            state,
            config,
            writer,
            events: EventPublisher::new(recorder),
            metrics,
        }
    }

    /// Runs until `shutdown`, reconciling only while `leader` is true, under the
    /// [`Runner`] with its metrics unregistered (tests and benches;
    /// `serve` starts it through [`super::controllers`]).
    pub async fn run(self, leader: watch::Receiver<bool>, shutdown: CancellationToken) {
        let state = self.state.clone();
        Runner::new(self, state, Gate::Leader(leader), &runner::Metrics::default())
            .run(shutdown)
            .await;
    }

    /// Evaluates a fence and writes its Sidecar and status; returns when to look again.
    pub async fn sync_fence(&self, fence: &ServiceFence) -> super::Result<Option<Instant>> {
        let now = Timestamp::now();
        let eval = {
            let index = self.state.index();
            evaluate(fence, &index, &self.config, now, self.writer.version())
        };
        let key = ObjectKey::of_or_empty(&fence.metadata);
        let live = self.state.sidecar(&key);
        match self
            .writer
            .sync_sidecar(fence, &eval.sidecar, live.as_ref())
            .await?
        {
            Write::Unchanged => {
                self.metrics.skipped_writes.inc();
            }
            write => {
                self.metrics.sidecar_writes.inc();
                self.observe_learn_to_apply(fence, now);
                let (reason, note) = match (write, &eval.sidecar) {
                    (Write::Deleted, Err(why)) => ("SidecarDeleted", why.message().to_string()),
                    (_, Ok(_)) => (
                        "SidecarApplied",
                        format!("{} egress hosts", eval.sidecar_hosts().map_or(0, <[_]>::len)),
                    ),
                    _ => ("SidecarWritten", String::new()),
                };
                self.events
                    .publish(&fence.object_ref(&()), EventType::Normal, reason, note)
                    .await;
            }
        }
        let counter = match self.writer.status().sync_status(fence, &eval.status).await? {
            Write::Unchanged => &self.metrics.skipped_writes,
            _ => &self.metrics.status_writes,
        };
        counter.inc();
        Ok(eval.requeue_at.map(|at| {
            let wait = Duration::try_from(at.duration_since(now)).unwrap_or_default();
            Instant::now() + wait
        }))
    }

    /// From the newest learned dependency (if learned within the last minute) to now.
    fn observe_learn_to_apply(&self, fence: &ServiceFence, now: Timestamp) {
        let newest = fence
            .status
            .as_ref()
            .and_then(|s| s.last_seen.values().map(|t| t.0).max());
        if let Some(seen) = newest
            && let Ok(d) = Duration::try_from(now.duration_since(seen))
            && d < Duration::from_secs(60)
        {
            self.metrics.learn_to_apply.observe(d.as_secs_f64());
        }
    }

    /// Reports a fence lazyload cannot read on the fence (a condition) and with an Event, once
    /// per fault: nothing is written when the condition already says it.
    async fn report_rejected(
        &self,
        key: &ObjectKey,
        raw: &serde_json::Value,
        message: &str,
    ) -> super::Result<()> {
        match self.writer.status().report_rejected(key, raw, message).await? {
            Write::Unchanged => {
                self.metrics.skipped_writes.inc();
            }
            _ => {
                self.metrics.status_writes.inc();
                let object = ObjectReference {
                    api_version: Some(ServiceFence::api_version(&()).into_owned()),
                    kind: Some(ServiceFence::kind(&()).into_owned()),
                    namespace: Some(key.namespace.clone()),
                    name: Some(key.name.clone()),
                    uid: raw
                        .pointer("/metadata/uid")
                        .and_then(|u| u.as_str())
                        .map(String::from),
                    ..Default::default()
                };
                let note = format!("skipped, no Sidecar is written for it: {message}");
                self.events
                    .publish(&object, EventType::Warning, REASON_UNREADABLE, note)
                    .await;
            }
        }
        Ok(())
    }
}

impl Reconciler for FenceController {
    type Key = ObjectKey;
    const NAME: &'static str = "fences";

    /// Every fence, and every fence lazyload cannot read (it says why on the fence).
    fn all_keys(&self) -> Vec<ObjectKey> {
        let mut keys = self.state.fence_keys();
        keys.extend(self.state.rejections().keys(Kind::ServiceFence));
        keys
    }

    fn triggers(&self, change: &Change) -> Trigger<ObjectKey> {
        match change {
            Change::Fence(key) => Trigger::Keys(vec![key.clone()], DEBOUNCE),
            // Only a fence's own Sidecar; the users' ones (same change) are not this controller's.
            Change::Sidecar(key) if self.state.fence(key).is_some() => {
                Trigger::Keys(vec![key.clone()], DEBOUNCE)
            }
            Change::Sidecar(_) | Change::Pods => Trigger::Nothing,
            Change::Service(_) | Change::Namespace(_) | Change::Routing | Change::Resync => {
                Trigger::All(RESYNC_DEBOUNCE)
            }
        }
    }

    async fn reconcile(&mut self, key: &ObjectKey) -> super::Result<Action> {
        let Some(fence) = self.state.fence(key) else {
            if let (Some(raw), Some(rejection)) = (
                self.state.rejected_fence(key),
                self.state.rejections().get(Kind::ServiceFence, key),
            ) {
                self.report_rejected(key, &raw, &rejection.message).await?;
            }
            // Deleted: its Sidecar goes with it (owner reference).
            return Ok(Action::done());
        };
        // Another Istio revision's fence: the lazyload of that revision writes its Sidecar.
        if !self
            .config
            .global
            .rev_in_scope(&crate::model::autofence::revision(&fence))
        {
            return Ok(Action::done());
        }
        self.metrics.reconciles.inc();
        match self.sync_fence(&fence).await {
            Ok(requeue) => Ok(requeue.map_or_else(Action::done, Action::requeue_at)),
            Err(e) => {
                let note = e.to_string();
                self.events
                    .publish(
                        &fence.object_ref(&()),
                        EventType::Warning,
                        "ReconcileFailed",
                        note,
                    )
                    .await;
                Err(e)
            }
        }
    }
}
