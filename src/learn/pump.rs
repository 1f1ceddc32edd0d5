//! Moving learned edges out: the shared learner handle the consumer takes batches from, and the
//! in-memory view of what each fence learned (`/debug/edges`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use jiff::Timestamp;
use tokio::sync::Notify;

use super::prometheus::apply_metrics;
use super::status::{apply_edges, by_fence, seed};
use super::{Edge, Learner};
use crate::vocab::ObjectKey;
use crate::vocab::fence::{ServiceFence, ServiceFenceStatus};

/// A [`Learner`] shared by the collector's streams and the consumer. The lock is a plain mutex held
/// for one message at a time, never across an await.
#[derive(Clone, Debug)]
pub struct LearnerHandle(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    learner: Mutex<Learner>,
    /// Signalled after the consumer took a batch (streams waiting for room resume).
    drained: Notify,
    /// Signalled when a full batch is waiting (the consumer takes it without waiting for its
    /// tick).
    ready: Notify,
    batch: usize,
}

impl LearnerHandle {
    /// Shares `learner`; the consumer takes batches of at most `batch` edges.
    pub fn new(learner: Learner, batch: usize) -> Self {
        Self(Arc::new(Inner {
            learner: Mutex::new(learner),
            drained: Notify::new(),
            ready: Notify::new(),
            batch: batch.max(1),
        }))
    }

    /// Locks the learner. A panic while it was held cannot leave it inconsistent in a way that
    /// matters (the worst is an edge learned twice), so poisoning is ignored.
    pub fn lock(&self) -> MutexGuard<'_, Learner> {
        self.0.learner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the learner's queue has room: the collector's back-pressure.
    pub async fn wait_for_room(&self) {
        loop {
            let drained = self.0.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if !self.lock().queue_full() {
                return;
            }
            drained.await;
        }
    }

    /// Tells the consumer that edges were queued; it takes them at once when a batch is full.
    pub fn queued(&self, pending: usize) {
        if pending >= self.0.batch {
            self.0.ready.notify_one();
        }
    }

    /// Waits until a batch is full or `interval` passed, then takes up to one batch (empty
    /// when nothing is queued). The consumer calls it when it is ready for more, so edges wait
    /// in the learner's fair queue, not in a buffer behind another fence's flood: an edge
    /// queued while a batch is applied is in the next one. Cancel-safe: it takes nothing until
    /// it stops waiting.
    pub async fn next_batch(&self, interval: Duration) -> Vec<Edge> {
        if self.lock().pending() < self.0.batch {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = self.0.ready.notified() => {}
            }
        }
        self.take_batch()
    }

    /// Takes up to one batch now (streams waiting for room resume).
    pub fn take_batch(&self) -> Vec<Edge> {
        let batch = self.lock().take_batch(self.0.batch);
        if !batch.is_empty() {
            self.0.drained.notify_waiters();
        }
        batch
    }
}

/// The learned dependencies kept in memory, as the statuses they would give each fence (the
/// consumer `serve` runs until the reconciler writes them to the cluster).
#[derive(Clone, Debug, Default)]
pub struct EdgeStore(Arc<Mutex<BTreeMap<ObjectKey, ServiceFenceStatus>>>);

impl EdgeStore {
    /// Starts from the fences' current statuses (and seeds `learner` with them, so nothing
    /// already known is learned again).
    pub fn seeded(fences: &[ServiceFence], learner: &mut Learner) -> Self {
        let mut map = BTreeMap::new();
        for f in fences {
            if let (Some(ns), Some(name), Some(status)) = (
                f.metadata.namespace.as_deref(),
                f.metadata.name.as_deref(),
                f.status.as_ref(),
            ) {
                map.insert(ObjectKey::new(ns, name), status.clone());
            }
        }
        seed(learner, fences);
        Self(Arc::new(Mutex::new(map)))
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<ObjectKey, ServiceFenceStatus>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Merges one batch into the statuses.
    pub fn apply(&self, batch: &[Edge], now: Timestamp) {
        let mut map = self.lock();
        for (fence, edges) in by_fence(batch) {
            apply_edges(map.entry(fence.clone()).or_default(), edges, now);
        }
    }

    /// Merges one Prometheus poll of `fence` into its status.
    pub fn apply_metrics(&self, fence: &ObjectKey, metrics: &BTreeMap<String, String>, now: Timestamp) {
        apply_metrics(self.lock().entry(fence.clone()).or_default(), metrics, now);
    }

    /// `{"<ns>/<name>": {"metricStatus": ..., "lastSeen": ...}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let map = self.lock();
        let obj = map
            .iter()
            .map(|(k, st)| {
                let status = serde_json::json!({
                    "metricStatus": st.metric_status,
                    "lastSeen": st.last_seen,
                });
                (k.to_string(), status)
            })
            .collect();
        serde_json::Value::Object(obj)
    }

    /// `GET /debug/edges`.
    pub fn router(&self) -> Router {
        let store = self.clone();
        Router::new().route(
            "/debug/edges",
            get(move || {
                let store = store.clone();
                async move {
                    let body = serde_json::to_string_pretty(&store.to_json()).unwrap_or_default();
                    ([(axum::http::header::CONTENT_TYPE, "application/json")], body)
                }
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::Limits;

    #[tokio::test]
    async fn a_full_batch_is_taken_at_once_and_releases_back_pressure() {
        let handle = LearnerHandle::new(
            Learner::new(Limits {
                max_pending: 2,
                ..Limits::default()
            }),
            2,
        );
        let now = Timestamp::now();
        let a = ObjectKey::new("n", "a");
        {
            let mut l = handle.lock();
            l.observe(&a, "h1.n.svc.cluster.local", now);
            l.observe(&a, "h2.n.svc.cluster.local", now);
            assert!(l.queue_full());
        }
        handle.queued(2);
        let waiting = handle.clone();
        let room = tokio::spawn(async move { waiting.wait_for_room().await });
        // A full batch does not wait for the (hour-long) tick.
        let batch = tokio::time::timeout(
            Duration::from_secs(5),
            handle.next_batch(Duration::from_secs(3600)),
        )
        .await
        .expect("a full batch at once");
        assert_eq!(batch.len(), 2);
        tokio::time::timeout(Duration::from_secs(5), room)
            .await
            .expect("room after the batch was taken")
            .unwrap();
        let store = EdgeStore::default();
        store.apply(&batch, now);
        let json = store.to_json();
        assert_eq!(
            json["n/a"]["metricStatus"][r#"{destination_service="h1.n.svc.cluster.local"}"#],
            "1"
        );
        // Nothing queued: the tick passes and the batch is empty.
        assert!(handle.next_batch(Duration::from_millis(10)).await.is_empty());
    }
}
