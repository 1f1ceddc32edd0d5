//! The fence controller: ServiceFence -> Sidecar and status.
//!
//! It reacts to the cluster state's change stream: a fence (or its Sidecar) that changed is
//! reconciled after the debounce window (default 100 ms, so a burst of learned edges costs one
//! write), a change that can move any fence's dependencies (Services, Namespaces, routing, a
//! re-list) reconciles every fence after a longer window, and each fence is reconciled again when
//! the model says a dependency expires. A failed write is retried with backoff; nothing learned
//! is lost meanwhile, because learned edges already live in the fence's status.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::runtime::events::{Event, EventType, Recorder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;

use super::fence::{FenceWriter, REASON_UNREADABLE, Write};
use super::queue::Queue;
use crate::cluster::{Change, ClusterState};
use crate::config::Config;
use crate::index::convert::Kind;
use crate::model::evaluate;
use crate::vocab::ObjectKey;
use crate::vocab::fence::ServiceFence;

/// How long a fence waits after a change to it before it is reconciled.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// How long every fence waits after a change that can affect all of them.
pub const RESYNC_DEBOUNCE: Duration = Duration::from_secs(1);
/// First retry delay after a failed write (doubles up to a minute).
const RETRY: Duration = Duration::from_millis(500);

/// Controller metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    reconciles: Counter,
    sidecar_writes: Counter,
    status_writes: Counter,
    skipped_writes: Counter,
    errors: Counter,
    queue_depth: Gauge,
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
            errors: Counter::default(),
            queue_depth: Gauge::default(),
            learn_to_apply: Histogram::new([0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        };
        let r = registry.sub_registry_with_prefix("reconcile");
        r.register("fences", "Fence reconciles", m.reconciles.clone());
        r.register(
            "sidecar_writes",
            "Sidecars applied or deleted",
            m.sidecar_writes.clone(),
        );
        r.register("status_writes", "Fence statuses patched", m.status_writes.clone());
        r.register(
            "skipped_writes",
            "Writes skipped because the live object was right",
            m.skipped_writes.clone(),
        );
        r.register("errors", "Failed reconciles (retried)", m.errors.clone());
        r.register(
            "queue_depth",
            "Fences waiting to be reconciled",
            m.queue_depth.clone(),
        );
        r.register(
            "learn_to_apply_seconds",
            "From a dependency learned to its Sidecar written",
            m.learn_to_apply.clone(),
        );
        m
    }
}

/// The fence controller.
pub struct FenceController {
    state: ClusterState,
    config: Arc<Config>,
    writer: FenceWriter,
    recorder: Option<Recorder>,
    metrics: Metrics,
    queue: Queue<ObjectKey>,
    retries: std::collections::HashMap<ObjectKey, Duration>,
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
            recorder,
            metrics,
            queue: Queue::default(),
            retries: Default::default(),
        }
    }

    /// Runs until `shutdown`, reconciling only while `leader` is true (followers keep their
    /// state warm and take over with a full resync).
    pub async fn run(mut self, mut leader: watch::Receiver<bool>, shutdown: CancellationToken) {
        let mut changes = self.state.subscribe();
        self.schedule_all(Instant::now());
        loop {
            let wait = self.queue.next_due().filter(|_| *leader.borrow());
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = leader.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if *leader.borrow() {
                        tracing::info!("leading: reconciling every fence");
                        self.schedule_all(Instant::now());
                    }
                }
                change = changes.recv() => self.on_change(change),
                () = sleep_until(wait) => {
                    for key in self.queue.pop_due(Instant::now()) {
                        // Lease lost or stopping mid-batch: the rest waits (a new leader
                        // resyncs everything anyway), so two leaders never write at once.
                        if !*leader.borrow() || shutdown.is_cancelled() {
                            self.queue.schedule(key, Instant::now());
                            continue;
                        }
                        self.reconcile_key(key).await;
                    }
                }
            }
            self.metrics.queue_depth.set(self.queue.len() as i64);
        }
    }

    fn on_change(&mut self, change: Result<Change, broadcast::error::RecvError>) {
        let now = Instant::now();
        match change {
            Ok(Change::Fence(key)) => self.queue.schedule(key, now + DEBOUNCE),
            // Only a fence's own Sidecar; the users' ones (same change) are not this controller's.
            Ok(Change::Sidecar(key)) if self.state.fence(&key).is_some() => {
                self.queue.schedule(key, now + DEBOUNCE)
            }
            Ok(Change::Sidecar(_)) => {}
            Ok(Change::Pods) => {}
            Ok(Change::Service(_) | Change::Namespace(_) | Change::Routing | Change::Resync) => {
                self.schedule_all(now + RESYNC_DEBOUNCE - DEBOUNCE);
            }
            // Missed changes: look at everything.
            Err(broadcast::error::RecvError::Lagged(_)) => self.schedule_all(now),
            Err(broadcast::error::RecvError::Closed) => {}
        }
    }

    fn schedule_all(&mut self, at: Instant) {
        let mut keys = self.state.fence_keys();
        keys.extend(self.state.rejections().keys(Kind::ServiceFence));
        for key in keys {
            self.queue.schedule(key, at + DEBOUNCE);
        }
    }

    async fn reconcile_key(&mut self, key: ObjectKey) {
        // Never write from a kind that has not been listed: a Sidecar computed without the
        // VirtualServices would drop every host they expand to. The last kind to sync announces
        // a resync, which brings every fence back here.
        let unsynced = self.state.unsynced();
        if !unsynced.is_empty() {
            tracing::debug!(fence = %key, ?unsynced, "not reconciled: waiting for the cluster index");
            return;
        }
        let Some(fence) = self.state.fence(&key) else {
            if let (Some(raw), Some(rejection)) = (
                self.state.rejected_fence(&key),
                self.state.rejections().get(Kind::ServiceFence, &key),
            ) {
                self.report_rejected(&key, &raw, &rejection.message).await;
            }
            // Deleted: its Sidecar goes with it (owner reference).
            return;
        };
        // Another Istio revision's fence: the lazyload of that revision writes its Sidecar.
        if !self
            .config
            .global
            .rev_in_scope(&crate::model::autofence::revision(&fence))
        {
            return;
        }
        self.metrics.reconciles.inc();
        match self.reconcile(&fence).await {
            Ok(requeue) => {
                self.retries.remove(&key);
                if let Some(at) = requeue {
                    self.queue.schedule(key, at);
                }
            }
            Err(e) => {
                self.metrics.errors.inc();
                let delay = self
                    .retries
                    .get(&key)
                    .map_or(RETRY, |d| (*d * 2).min(Duration::from_secs(60)));
                tracing::warn!(fence = %key, retry_in = ?delay, "reconcile failed: {e}");
                self.publish(
                    &fence.object_ref(&()),
                    EventType::Warning,
                    "ReconcileFailed",
                    e.to_string(),
                )
                .await;
                self.retries.insert(key.clone(), delay);
                self.queue.schedule(key, Instant::now() + delay);
            }
        }
    }

    /// Evaluates a fence and writes its Sidecar and status; returns when to look again.
    pub async fn reconcile(&self, fence: &ServiceFence) -> super::Result<Option<Instant>> {
        let now = Timestamp::now();
        let eval = {
            let index = self.state.index();
            evaluate(fence, &index, &self.config, now, self.writer.version())
        };
        let key = ObjectKey::new(
            fence.metadata.namespace.clone().unwrap_or_default(),
            fence.metadata.name.clone().unwrap_or_default(),
        );
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
                    (_, Ok(s)) => (
                        "SidecarApplied",
                        format!(
                            "{} egress hosts",
                            s.spec.egress.first().map_or(0, |e| e.hosts.len())
                        ),
                    ),
                    _ => ("SidecarWritten", String::new()),
                };
                self.publish(&fence.object_ref(&()), EventType::Normal, reason, note)
                    .await;
            }
        }
        let counter = match self.writer.sync_status(fence, &eval.status).await? {
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
    async fn report_rejected(&self, key: &ObjectKey, raw: &serde_json::Value, message: &str) {
        match self.writer.report_rejected(key, raw, message).await {
            Ok(Write::Unchanged) => {
                self.metrics.skipped_writes.inc();
            }
            Ok(_) => {
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
                self.publish(&object, EventType::Warning, REASON_UNREADABLE, note)
                    .await;
            }
            // Retried at the next change or resync: the fence is skipped either way.
            Err(e) => {
                self.metrics.errors.inc();
                tracing::warn!(fence = %key, "{e}");
            }
        }
    }

    async fn publish(&self, object: &ObjectReference, type_: EventType, reason: &str, note: String) {
        let Some(recorder) = &self.recorder else { return };
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, object).await {
            tracing::debug!("publishing an event failed: {e}");
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
