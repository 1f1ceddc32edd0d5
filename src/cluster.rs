//! What lazyload knows of the cluster at run time, shared by the collector and the controllers:
//! the cluster index, the ServiceFences and the fences' Sidecars as last seen, and a stream of
//! what changed so controllers react to exactly that.
//!
//! It is filled by the kube watchers (or once from a snapshot file); readers take short read
//! locks and never hold them across an await.

pub mod watch;
pub mod writer;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::broadcast;

use crate::index::ClusterIndex;
use crate::index::convert::{Kind, Rejections};
use crate::vocab::ObjectKey;
use crate::vocab::fence::ServiceFence;
use crate::vocab::istio::Sidecar;

/// One change the controllers may care about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A Service was added, changed or deleted.
    Service(ObjectKey),
    /// A Namespace was added, changed or deleted.
    Namespace(String),
    /// Pods changed (attribution, and which pods are the global-sidecar's for the A8 check).
    Pods,
    /// A VirtualService or ServiceEntry changed: any fence's expansion may have.
    Routing,
    /// A ServiceFence was added, changed or deleted.
    Fence(ObjectKey),
    /// A Sidecar changed or was deleted: a fence's (someone else edited it), or another one (it
    /// may now scope the global-sidecar, A8).
    Sidecar(ObjectKey),
    /// A watch re-listed everything of a kind: controllers should resync.
    Resync,
}

/// The shared state.
#[derive(Clone, Debug)]
pub struct ClusterState {
    index: Arc<RwLock<ClusterIndex>>,
    fences: Arc<RwLock<BTreeMap<ObjectKey, ServiceFence>>>,
    sidecars: Arc<RwLock<BTreeMap<ObjectKey, Sidecar>>>,
    /// Sidecars no fence owns (the users'): only read, to tell whether one scopes the
    /// global-sidecar.
    other_sidecars: Arc<RwLock<BTreeMap<ObjectKey, Sidecar>>>,
    /// ServiceFences that could not be read, as the API server holds them (their status is
    /// where lazyload says why).
    rejected_fences: Arc<RwLock<BTreeMap<ObjectKey, serde_json::Value>>>,
    rejections: Rejections,
    /// The kinds not listed yet. Nothing may be computed from a kind that has not synced: a
    /// Sidecar written from an unsynced VirtualService kind would lose every host that came
    /// from VirtualService expansion.
    unsynced: Arc<Mutex<BTreeSet<Kind>>>,
    changes: broadcast::Sender<Change>,
}

impl ClusterState {
    /// A state starting from `index` (and the fences of a snapshot, if any).
    pub fn new(index: ClusterIndex, fences: impl IntoIterator<Item = ServiceFence>) -> Self {
        let fences = fences
            .into_iter()
            .filter_map(|f| Some((ObjectKey::of(&f.metadata).ok()?, f)))
            .collect();
        Self {
            index: Arc::new(RwLock::new(index)),
            fences: Arc::new(RwLock::new(fences)),
            sidecars: Arc::new(RwLock::new(BTreeMap::new())),
            other_sidecars: Arc::new(RwLock::new(BTreeMap::new())),
            rejected_fences: Arc::new(RwLock::new(BTreeMap::new())),
            rejections: Rejections::default(),
            // A state made from a snapshot is whole; watchers say otherwise ([`Self::await_sync`]).
            unsynced: Arc::new(Mutex::new(BTreeSet::new())),
            changes: broadcast::channel(4096).0,
        }
    }

    /// From now on `kinds` count as not synced until each is [`Self::mark_synced`].
    pub fn await_sync(&self, kinds: impl IntoIterator<Item = Kind>) {
        self.unsynced_lock().extend(kinds);
    }

    /// `kind` has been listed; when it was the last one, every controller is told to resync
    /// (what they skipped while waiting). Returns whether every kind is now synced.
    pub fn mark_synced(&self, kind: Kind) -> bool {
        let (was_last, all) = {
            let mut unsynced = self.unsynced_lock();
            let removed = unsynced.remove(&kind);
            (removed && unsynced.is_empty(), unsynced.is_empty())
        };
        if was_last {
            self.changed(Change::Resync);
        }
        all
    }

    /// The kinds not listed yet (empty: everything lazyload reads is known).
    pub fn unsynced(&self) -> Vec<Kind> {
        self.unsynced_lock().iter().copied().collect()
    }

    fn unsynced_lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<Kind>> {
        self.unsynced.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The objects that could not be read, and their counter.
    pub fn rejections(&self) -> &Rejections {
        &self.rejections
    }

    /// A ServiceFence that could not be read, as the API server holds it.
    pub fn rejected_fence(&self, key: &ObjectKey) -> Option<serde_json::Value> {
        self.rejected_fences
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// Stores or removes a ServiceFence that could not be read (watchers only).
    pub fn set_rejected_fence(&self, key: ObjectKey, raw: Option<serde_json::Value>) {
        set(&self.rejected_fences, key, raw);
    }

    /// The index, for reading.
    pub fn index(&self) -> RwLockReadGuard<'_, ClusterIndex> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The index, for updating (watchers only).
    pub fn index_mut(&self) -> RwLockWriteGuard<'_, ClusterIndex> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The shared index handle (the collector keeps one).
    pub fn index_handle(&self) -> Arc<RwLock<ClusterIndex>> {
        self.index.clone()
    }

    /// A fence as last seen.
    pub fn fence(&self, key: &ObjectKey) -> Option<ServiceFence> {
        read(&self.fences).get(key).cloned()
    }

    /// Every fence's key.
    pub fn fence_keys(&self) -> Vec<ObjectKey> {
        read(&self.fences).keys().cloned().collect()
    }

    /// Stores or removes a fence (watchers only).
    pub fn set_fence(&self, key: ObjectKey, fence: Option<ServiceFence>) {
        set(&self.fences, key, fence);
    }

    /// The Sidecar of a fence as last seen.
    pub fn sidecar(&self, key: &ObjectKey) -> Option<Sidecar> {
        read(&self.sidecars).get(key).cloned()
    }

    /// Every stored Sidecar's key.
    pub fn sidecar_keys(&self) -> Vec<ObjectKey> {
        read(&self.sidecars).keys().cloned().collect()
    }

    /// Stores or removes a Sidecar (watchers only).
    pub fn set_sidecar(&self, key: ObjectKey, sidecar: Option<Sidecar>) {
        set(&self.sidecars, key, sidecar);
    }

    /// The Sidecars no fence owns, as last seen.
    pub fn other_sidecars(&self) -> Vec<Sidecar> {
        read(&self.other_sidecars).values().cloned().collect()
    }

    /// Whether a Sidecar no fence owns is stored under `key`.
    pub fn has_other_sidecar(&self, key: &ObjectKey) -> bool {
        read(&self.other_sidecars).contains_key(key)
    }

    /// Every stored Sidecar no fence owns, by key.
    pub fn other_sidecar_keys(&self) -> Vec<ObjectKey> {
        read(&self.other_sidecars).keys().cloned().collect()
    }

    /// Stores or removes a Sidecar no fence owns (watchers only).
    pub fn set_other_sidecar(&self, key: ObjectKey, sidecar: Option<Sidecar>) {
        set(&self.other_sidecars, key, sidecar);
    }

    /// Announces a change.
    pub fn changed(&self, change: Change) {
        // No subscriber yet is fine: controllers resync when they start.
        let _ = self.changes.send(change);
    }

    /// Subscribes to changes (a lagging subscriber gets `Lagged` and should resync).
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}

/// Reads a map; a writer that panicked left it whole (each write is one insert or remove).
fn read<T>(map: &RwLock<BTreeMap<ObjectKey, T>>) -> RwLockReadGuard<'_, BTreeMap<ObjectKey, T>> {
    map.read().unwrap_or_else(|e| e.into_inner())
}

/// Stores `value` under `key`, or removes the key.
fn set<T>(map: &RwLock<BTreeMap<ObjectKey, T>>, key: ObjectKey, value: Option<T>) {
    let mut map = map.write().unwrap_or_else(|e| e.into_inner());
    match value {
        Some(v) => map.insert(key, v),
        None => map.remove(&key),
    };
}
