//! The cluster watchers: one kube watcher per kind (Services, Namespaces, Pods, VirtualServices,
//! ServiceEntries, ServiceFences, Sidecars) keeps the [`ClusterState`] up to date and announces
//! each [`Change`].
//!
//! The conversion and bookkeeping of one watch event ([`apply_event`]) is pure and separate from
//! the stream plumbing ([`run`]). Watch errors back off (kube's default: 0.8 s doubling to 30 s)
//! and the watcher re-lists on its own; a re-list replaces everything of its kind. A kind whose
//! API is not served (404: the Istio or ServiceFence CRD is not installed) counts as synced and
//! empty, and keeps being retried, so a cluster without Istio does not block readiness.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::{Change, ClusterState};
use crate::index::{
    self, NamespaceInfo, ObjectKey, PodInfo, ServiceEntryInfo, ServiceInfo, VirtualServiceInfo,
};
use crate::model::fence::ServiceFence;
use crate::model::istio::{IstioVersion, ServiceEntry, Sidecar, VirtualService};
use crate::model::sidecar::is_fence_controlled;
use crate::readiness::Task;

#[cfg(test)]
mod tests;

/// How many kinds [`run`] watches (readiness waits for each).
const KINDS: usize = 7;

/// Watches every kind until `shutdown` is cancelled, keeping `state` up to date; `ready` is set
/// once every kind has been listed once. Watch errors are logged and retried with backoff, never
/// returned: the index stays warm (and readiness stays set) while the API server is away.
pub async fn run(
    client: Client,
    state: ClusterState,
    domain: String,
    ready: Task,
    shutdown: CancellationToken,
) {
    let domain: Arc<str> = domain.into();
    let sync = Synced {
        pending: Arc::new(AtomicUsize::new(KINDS)),
        ready,
    };
    let w = Watch {
        client,
        state,
        domain,
        sync,
        shutdown,
    };
    tokio::join!(
        w.kind::<Service>(),
        w.kind::<Namespace>(),
        w.kind::<Pod>(),
        w.kind::<VirtualService>(),
        w.kind::<ServiceEntry>(),
        w.kind::<ServiceFence>(),
        w.kind::<Sidecar>(),
    );
}

/// Counts the kinds not yet listed; the last one marks the index ready.
struct Synced {
    pending: Arc<AtomicUsize>,
    ready: Task,
}

impl Synced {
    fn kind_synced(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            tracing::info!("cluster index synced");
            self.ready.set(true);
        }
    }
}

/// What every per-kind watch shares.
struct Watch {
    client: Client,
    state: ClusterState,
    domain: Arc<str>,
    sync: Synced,
    shutdown: CancellationToken,
}

impl Watch {
    async fn kind<K: Watched>(&self) {
        let stream =
            watcher::watcher(K::api(self.client.clone()), watcher::Config::default()).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut relist = Relist::default();
        let mut synced = false;
        let mut missing = false;
        loop {
            let next = tokio::select! {
                () = self.shutdown.cancelled() => return,
                next = stream.next() => next,
            };
            let listed = match next {
                // The watcher never ends on its own; nothing is left to do if it did.
                None => return,
                Some(Ok(event)) => {
                    let listed = apply_event(&self.state, &self.domain, event, &mut relist);
                    // Served again: a later outage is worth a warning again.
                    missing &= !listed;
                    listed
                }
                Some(Err(watcher::Error::InitialListFailed(kube::Error::Api(status))))
                    if status.is_not_found() =>
                {
                    // Logged once per outage, not every backoff round.
                    if !missing {
                        tracing::warn!(
                            kind = K::KIND,
                            "not served (CRD not installed?): treated as empty, retrying"
                        );
                    }
                    missing = true;
                    absent::<K>(&self.state, &mut relist);
                    true
                }
                Some(Err(e)) => {
                    tracing::warn!(kind = K::KIND, "watch failed, retrying with backoff: {e}");
                    false
                }
            };
            if listed && !synced {
                synced = true;
                self.sync.kind_synced();
            }
        }
    }
}

/// A watched kind: how to read it and how it is kept in the state.
trait Watched: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static {
    /// The kind's name, for logs.
    const KIND: &'static str;
    /// The API of every object of the kind, in all namespaces.
    fn api(client: Client) -> Api<Self>;
    /// The key the state keeps the object under; `None` without name (or namespace).
    fn key(&self) -> Option<ObjectKey> {
        let meta = self.meta();
        Some(ObjectKey::new(meta.namespace.clone()?, meta.name.clone()?))
    }
    /// Stores the object under `key`; `Ok(false)` when it is not one lazyload keeps.
    fn store(self, key: ObjectKey, state: &ClusterState, domain: &str) -> Result<bool, index::Error>;
    /// Removes the object; whether it was there.
    fn remove(state: &ClusterState, key: &ObjectKey) -> bool;
    /// The keys stored of this kind.
    fn keys(state: &ClusterState) -> Vec<ObjectKey>;
    /// The change announced when the object changed.
    fn change(key: ObjectKey) -> Change;
}

impl Watched for Service {
    const KIND: &'static str = "Service";
    fn api(client: Client) -> Api<Self> {
        Api::all(client)
    }
    fn store(self, _: ObjectKey, state: &ClusterState, _: &str) -> Result<bool, index::Error> {
        state.index_mut().apply_service(ServiceInfo::try_from(&self)?);
        Ok(true)
    }
    fn remove(state: &ClusterState, key: &ObjectKey) -> bool {
        state.index_mut().remove_service(key).is_some()
    }
    fn keys(state: &ClusterState) -> Vec<ObjectKey> {
        state.index().services().map(|s| s.key.clone()).collect()
    }
    fn change(key: ObjectKey) -> Change {
        Change::Service(key)
    }
}

/// Namespaces are cluster-scoped: their key has an empty namespace.
impl Watched for Namespace {
    const KIND: &'static str = "Namespace";
    fn api(client: Client) -> Api<Self> {
        Api::all(client)
    }
    fn key(&self) -> Option<ObjectKey> {
        Some(ObjectKey::new("", self.metadata.name.clone()?))
    }
    fn store(self, _: ObjectKey, state: &ClusterState, _: &str) -> Result<bool, index::Error> {
        state.index_mut().apply_namespace(NamespaceInfo::try_from(&self)?);
        Ok(true)
    }
    fn remove(state: &ClusterState, key: &ObjectKey) -> bool {
        state.index_mut().remove_namespace(&key.name).is_some()
    }
    fn keys(state: &ClusterState) -> Vec<ObjectKey> {
        let index = state.index();
        index
            .namespaces()
            .map(|n| ObjectKey::new("", n.name.clone()))
            .collect()
    }
    fn change(key: ObjectKey) -> Change {
        Change::Namespace(key.name)
    }
}

impl Watched for Pod {
    const KIND: &'static str = "Pod";
    fn api(client: Client) -> Api<Self> {
        Api::all(client)
    }
    fn store(self, key: ObjectKey, state: &ClusterState, _: &str) -> Result<bool, index::Error> {
        let pod = PodInfo::try_from(&self)?;
        // Most Pod events change nothing lazyload keeps (conditions, container statuses);
        // re-applying would invalidate every attribution cache for nothing.
        if state.index().pod(&key) != Some(&pod) {
            state.index_mut().apply_pod(pod);
        }
        Ok(true)
    }
    fn remove(state: &ClusterState, key: &ObjectKey) -> bool {
        state.index_mut().remove_pod(key).is_some()
    }
    fn keys(state: &ClusterState) -> Vec<ObjectKey> {
        state.index().pods().map(|p| p.key.clone()).collect()
    }
    fn change(_: ObjectKey) -> Change {
        Change::Pods
    }
}

impl Watched for VirtualService {
    const KIND: &'static str = "VirtualService";
    fn api(client: Client) -> Api<Self> {
        Api::all_with(client, &IstioVersion::default().resource("VirtualService"))
    }
    fn store(self, _: ObjectKey, state: &ClusterState, domain: &str) -> Result<bool, index::Error> {
        let info = VirtualServiceInfo::from_object(&self, domain)?;
        state.index_mut().apply_virtual_service(info);
        Ok(true)
    }
    fn remove(state: &ClusterState, key: &ObjectKey) -> bool {
        state.index_mut().remove_virtual_service(key).is_some()
    }
    fn keys(state: &ClusterState) -> Vec<ObjectKey> {
        state.index().virtual_services().map(|v| v.key.clone()).collect()
    }
    fn change(_: ObjectKey) -> Change {
        Change::Routing
    }
}

impl Watched for ServiceEntry {
    const KIND: &'static str = "ServiceEntry";
    fn api(client: Client) -> Api<Self> {
        Api::all_with(client, &IstioVersion::default().resource("ServiceEntry"))
    }
    fn store(self, _: ObjectKey, state: &ClusterState, _: &str) -> Result<bool, index::Error> {
        state
            .index_mut()
            .apply_service_entry(ServiceEntryInfo::try_from(&self)?);
        Ok(true)
    }
    fn remove(state: &ClusterState, key: &ObjectKey) -> bool {
        state.index_mut().remove_service_entry(key).is_some()
    }
    fn keys(state: &ClusterState) -> Vec<ObjectKey> {
        state.index().service_entries().map(|s| s.key.clone()).collect()
    }
    fn change(_: ObjectKey) -> Change {
        Change::Routing
    }
}

/// Fences are kept as they are: the controllers read spec and status.
impl Watched for ServiceFence {
    const KIND: &'static str = "ServiceFence";
    fn api(client: Client) -> Api<Self> {
        Api::all(client)
    }
    fn store(self, key: ObjectKey, state: &ClusterState, _: &str) -> Result<bool, index::Error> {
        state.set_fence(key, Some(self));
        Ok(true)
    }
    fn remove(state: &ClusterState, key: &ObjectKey) -> bool {
        let had = state.fence(key).is_some();
        state.set_fence(key.clone(), None);
        had
    }
    fn keys(state: &ClusterState) -> Vec<ObjectKey> {
        state.fence_keys()
    }
    fn change(key: ObjectKey) -> Change {
        Change::Fence(key)
    }
}

/// The Sidecars a fence controls are kept for the controllers, which repair them when someone
/// else edits them; the others only so that the A8 check can tell whether one scopes the
/// global-sidecar (nothing ever writes them).
impl Watched for Sidecar {
    const KIND: &'static str = "Sidecar";
    fn api(client: Client) -> Api<Self> {
        Api::all_with(client, &IstioVersion::default().resource("Sidecar"))
    }
    fn store(self, key: ObjectKey, state: &ClusterState, _: &str) -> Result<bool, index::Error> {
        // Ownership can change: the Sidecar moves between the two.
        if is_fence_controlled(&self) {
            state.set_other_sidecar(key.clone(), None);
            state.set_sidecar(key, Some(self));
        } else {
            state.set_sidecar(key.clone(), None);
            state.set_other_sidecar(key, Some(self));
        }
        Ok(true)
    }
    fn remove(state: &ClusterState, key: &ObjectKey) -> bool {
        let had = state.sidecar(key).is_some() || state.has_other_sidecar(key);
        state.set_sidecar(key.clone(), None);
        state.set_other_sidecar(key.clone(), None);
        had
    }
    fn keys(state: &ClusterState) -> Vec<ObjectKey> {
        let mut keys = state.sidecar_keys();
        keys.extend(state.other_sidecar_keys());
        keys
    }
    fn change(key: ObjectKey) -> Change {
        Change::Sidecar(key)
    }
}

/// The keys listed since the last `Init`, while a (re-)list is under way.
#[derive(Debug, Default)]
struct Relist {
    listed: Option<BTreeSet<ObjectKey>>,
}

/// Applies one watch event of kind `K` to `state`; returns whether it completed a list.
///
/// Objects that cannot be converted are logged and dropped (a stored older version with the same
/// key is removed, so the state never holds what the cluster no longer has). While a list is under
/// way no per-object change is announced: the single [`Change::Resync`] at its end covers them, and
/// thousands of Pods would otherwise overflow the change channel.
fn apply_event<K: Watched>(state: &ClusterState, domain: &str, event: Event<K>, relist: &mut Relist) -> bool {
    match event {
        Event::Init => {
            relist.listed = Some(BTreeSet::new());
            false
        }
        Event::InitApply(obj) => {
            if let Kept::Yes(key) = keep(state, domain, obj)
                && let Some(listed) = &mut relist.listed
            {
                listed.insert(key);
            }
            false
        }
        Event::Apply(obj) => {
            match keep(state, domain, obj) {
                Kept::Yes(key) | Kept::No(Some(key)) => state.changed(K::change(key)),
                Kept::No(None) => {}
            }
            false
        }
        Event::Delete(obj) => {
            match obj.key() {
                Some(key) => {
                    if K::remove(state, &key) {
                        state.changed(K::change(key));
                    }
                }
                None => tracing::warn!(kind = K::KIND, "deleted object without a name ignored"),
            }
            false
        }
        Event::InitDone => {
            finish_list::<K>(state, relist);
            state.changed(Change::Resync);
            true
        }
    }
}

/// Whether [`keep`] stored an object.
enum Kept {
    /// Stored under this key.
    Yes(ObjectKey),
    /// Not stored; the key of an older version it removed, if any.
    No(Option<ObjectKey>),
}

/// Stores `obj` if lazyload keeps it. A dropped object's older version is removed.
fn keep<K: Watched>(state: &ClusterState, domain: &str, obj: K) -> Kept {
    let Some(key) = obj.key() else {
        tracing::warn!(kind = K::KIND, "object without a name or namespace skipped");
        return Kept::No(None);
    };
    match obj.store(key.clone(), state, domain) {
        Ok(true) => return Kept::Yes(key),
        Ok(false) => {}
        Err(e) => tracing::warn!(kind = K::KIND, object = %key, "skipped: {e}"),
    }
    Kept::No(K::remove(state, &key).then_some(key))
}

/// Ends a list: removes every stored object of the kind the list did not have; how many.
fn finish_list<K: Watched>(state: &ClusterState, relist: &mut Relist) -> usize {
    let listed = relist.listed.take().unwrap_or_default();
    let stale: Vec<ObjectKey> = K::keys(state)
        .into_iter()
        .filter(|k| !listed.contains(k))
        .collect();
    for key in &stale {
        K::remove(state, key);
    }
    stale.len()
}

/// The kind is not served: as if listed empty. Announces a resync only when that removed
/// something, since this repeats every backoff round.
fn absent<K: Watched>(state: &ClusterState, relist: &mut Relist) {
    relist.listed = Some(BTreeSet::new());
    if finish_list::<K>(state, relist) > 0 {
        state.changed(Change::Resync);
    }
}
