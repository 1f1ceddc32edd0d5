//! The cluster watchers: one kube watcher per kind (Services, Namespaces, Pods, VirtualServices,
//! ServiceEntries, ServiceFences, Sidecars) keeps the [`ClusterState`] up to date and announces
//! each [`Change`].
//!
//! Every kind is read as raw objects and converted one at a time ([`crate::index::convert`]): an object
//! lazyload cannot read is skipped, logged once, counted and (a ServiceFence) kept aside so that
//! the fence controller can say why on the object itself, while the rest of its kind is used and
//! the kind syncs.
//!
//! The conversion and bookkeeping of one watch event ([`apply_event`]) is pure and separate from
//! the stream plumbing ([`run`]). A failing list or watch backs off ([`Backoff`]: 1 s doubling to
//! a minute; the watcher's own `Init` before each attempt does not count as success) and is
//! retried; a re-list replaces everything of its kind. A kind whose API is not served at all (404,
//! and discovery does not list the kind: the Istio or ServiceFence CRD is not installed) counts as
//! synced and empty, and keeps being retried, so a cluster without Istio does not block
//! readiness. A 404 for a kind discovery does list never counts as synced.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::DynamicObject;
use kube::core::ApiResource;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{Change, ClusterState};
use crate::index::convert::{Converted, Kind, Rejection, convert, key_of};
use crate::model::sidecar::is_fence_controlled;
use crate::readiness::Task;
use crate::vocab::ObjectKey;

#[cfg(test)]
mod tests;

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
    state.await_sync(Kind::ALL);
    let w = Watch {
        client,
        state,
        domain: domain.into(),
        ready,
        shutdown,
    };
    futures::future::join_all(Kind::ALL.map(|kind| w.kind(kind))).await;
}

/// What every per-kind watch shares.
struct Watch {
    client: Client,
    state: ClusterState,
    domain: Arc<str>,
    ready: Task,
    shutdown: CancellationToken,
}

/// Where one kind's watch stands.
#[derive(Default)]
struct KindWatch {
    relist: Relist,
    backoff: Backoff,
    /// Listed once (the kind counts as synced).
    synced: bool,
    /// Not served (CRD not installed?), already said.
    missing: bool,
}

impl Watch {
    async fn kind(&self, kind: Kind) {
        let resource = kind.api_resource();
        let api = Api::<DynamicObject>::all_with(self.client.clone(), &resource);
        let stream = watcher::watcher(api, watcher::Config::default());
        let mut stream = std::pin::pin!(stream);
        let mut at = KindWatch::default();
        loop {
            let next = tokio::select! {
                () = self.shutdown.cancelled() => return,
                next = stream.next() => next,
            };
            let (listed, failed) = match next {
                // The watcher never ends on its own; nothing is left to do if it did.
                None => return,
                Some(Ok(event)) => {
                    // The watcher emits `Init` before every list attempt, failing ones too:
                    // only what comes after it shows the API server answers.
                    if !matches!(event, Event::Init) {
                        at.backoff.reset();
                    }
                    let listed = apply_event(&self.state, &self.domain, kind, event, &mut at.relist);
                    // Served again: a later outage is worth a warning again.
                    at.missing &= !listed;
                    (listed, false)
                }
                Some(Err(watcher::Error::InitialListFailed(kube::Error::Api(status))))
                    if status.is_not_found() =>
                {
                    (self.not_found(kind, &resource, &mut at).await, true)
                }
                Some(Err(e)) => {
                    at.backoff.warn(|| {
                        tracing::warn!(
                            kind = kind.as_str(),
                            retry_in = ?at.backoff.peek(),
                            "watch failed, retrying with backoff: {}",
                            short(&e)
                        )
                    });
                    (false, true)
                }
            };
            if listed && !at.synced {
                at.synced = true;
                if self.state.mark_synced(kind) {
                    tracing::info!("cluster index synced");
                    self.ready.set(true);
                }
            }
            if failed {
                let delay = at.backoff.next_delay();
                tokio::select! {
                    () = self.shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }

    /// A list answered 404: a kind discovery does not list (its CRD is not installed) counts
    /// as listed and empty; one it lists, or a failed discovery, does not. Returns whether the
    /// kind counts as listed.
    async fn not_found(&self, kind: Kind, resource: &ApiResource, at: &mut KindWatch) -> bool {
        match served(&self.client, resource).await {
            Ok(None) => {
                // Logged once per outage, not every backoff round.
                if !at.missing {
                    tracing::warn!(
                        kind = kind.as_str(),
                        "not served (CRD not installed?): treated as empty, retrying"
                    );
                }
                at.missing = true;
                absent(&self.state, kind, &mut at.relist);
                true
            }
            Ok(Some(plural)) => {
                at.backoff.warn(|| {
                    tracing::error!(
                        kind = kind.as_str(),
                        "served as `{plural}` but 404 at `{}`: not synced, retrying",
                        resource.plural
                    )
                });
                false
            }
            Err(e) => {
                at.backoff.warn(|| {
                    tracing::warn!(
                        kind = kind.as_str(),
                        "list 404 and discovery failed: {}",
                        short(&e)
                    )
                });
                false
            }
        }
    }
}

/// Whether discovery lists `resource`'s kind in its group-version: `Some(plural)` where it is
/// served, `None` when the group-version or the kind is not served (the CRD is not installed).
/// A core kind is always served.
async fn served(client: &Client, resource: &ApiResource) -> Result<Option<String>, kube::Error> {
    if resource.group.is_empty() {
        return Ok(Some(resource.plural.clone()));
    }
    match client.list_api_group_resources(&resource.api_version).await {
        Ok(list) => Ok(list
            .resources
            .into_iter()
            .find(|r| r.kind == resource.kind && !r.name.contains('/'))
            .map(|r| r.name)),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// An error in one line of bounded length: an API error's body can be a whole object list, and
/// it is logged on every failure.
fn short(e: &dyn std::fmt::Display) -> String {
    const MAX: usize = 300;
    let text = e.to_string().replace('\n', " ");
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// Backoff between failed attempts of one kind: 1 s doubling to a minute, back to 1 s once the
/// API server delivers something. Only the first failure of a streak and those at the cap (about
/// one a minute) are logged at warn level; the others at debug.
#[derive(Debug)]
struct Backoff {
    next: Duration,
    failures: u32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(60);

    /// The delay before the next attempt, doubling the one after.
    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        self.failures += 1;
        delay
    }

    /// The delay the next failure will wait.
    fn peek(&self) -> Duration {
        self.next
    }

    /// Logs a failure with `log` when it is worth a warning, else at debug level.
    fn warn(&self, log: impl FnOnce()) {
        if self.failures == 0 || self.next == Self::MAX {
            log();
        } else {
            tracing::debug!(failures = self.failures, "still failing, retrying with backoff");
        }
    }

    /// The API server answered: the next failure starts a new streak.
    fn reset(&mut self) {
        *self = Self::default();
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: Self::FIRST,
            failures: 0,
        }
    }
}

/// Stores a converted object under `key`.
fn store(state: &ClusterState, key: ObjectKey, converted: Converted) {
    match converted {
        Converted::Indexed(object) => state.index_mut().apply(object),
        // Fences are kept as they are: the controllers read spec and status.
        Converted::ServiceFence(f) => {
            state.set_rejected_fence(key.clone(), None);
            state.set_fence(key, Some(*f));
        }
        // The Sidecars a fence controls are kept for the controllers, which repair them when
        // someone else edits them; the others only so that the A8 check can tell whether one
        // scopes the global-sidecar (nothing ever writes them). Ownership can change: the
        // Sidecar moves between the two.
        Converted::Sidecar(s) => {
            if is_fence_controlled(&s) {
                state.set_other_sidecar(key.clone(), None);
                state.set_sidecar(key, Some(*s));
            } else {
                state.set_sidecar(key.clone(), None);
                state.set_other_sidecar(key, Some(*s));
            }
        }
    }
}

/// Removes the object of `kind` under `key` and forgets its rejection; whether one was stored.
fn remove(state: &ClusterState, kind: Kind, key: &ObjectKey) -> bool {
    let rejected = state.rejections().get(kind, key).is_some();
    state.rejections().clear(kind, key);
    remove_stored(state, kind, key) || rejected
}

/// Removes the object of `kind` stored under `key`; whether one was.
fn remove_stored(state: &ClusterState, kind: Kind, key: &ObjectKey) -> bool {
    match kind {
        Kind::Service | Kind::Namespace | Kind::Pod | Kind::VirtualService | Kind::ServiceEntry => {
            state.index_mut().remove(kind, key)
        }
        Kind::ServiceFence => {
            let had = state.fence(key).is_some() || state.rejected_fence(key).is_some();
            state.set_fence(key.clone(), None);
            state.set_rejected_fence(key.clone(), None);
            had
        }
        Kind::Sidecar => {
            let had = state.sidecar(key).is_some() || state.has_other_sidecar(key);
            state.set_sidecar(key.clone(), None);
            state.set_other_sidecar(key.clone(), None);
            had
        }
    }
}

/// The keys stored of `kind`, rejected ones included.
fn keys(state: &ClusterState, kind: Kind) -> Vec<ObjectKey> {
    let mut keys: Vec<ObjectKey> = match kind {
        Kind::Service => state.index().services().map(|s| s.key.clone()).collect(),
        Kind::Namespace => state
            .index()
            .namespaces()
            .map(|n| ObjectKey::new("", n.name.clone()))
            .collect(),
        Kind::Pod => state.index().pods().map(|p| p.key.clone()).collect(),
        Kind::VirtualService => state.index().virtual_services().map(|v| v.key.clone()).collect(),
        Kind::ServiceEntry => state.index().service_entries().map(|s| s.key.clone()).collect(),
        Kind::ServiceFence => state.fence_keys(),
        Kind::Sidecar => {
            let mut keys = state.sidecar_keys();
            keys.extend(state.other_sidecar_keys());
            keys
        }
    };
    keys.extend(state.rejections().keys(kind));
    keys
}

/// The change announced when an object of `kind` changed.
fn change(kind: Kind, key: ObjectKey) -> Change {
    match kind {
        Kind::Service => Change::Service(key),
        Kind::Namespace => Change::Namespace(key.name),
        Kind::Pod => Change::Pods,
        Kind::VirtualService | Kind::ServiceEntry => Change::Routing,
        Kind::ServiceFence => Change::Fence(key),
        Kind::Sidecar => Change::Sidecar(key),
    }
}

/// The keys listed since the last `Init`, while a (re-)list is under way.
#[derive(Debug, Default)]
struct Relist {
    listed: Option<BTreeSet<ObjectKey>>,
}

/// Applies one watch event of `kind` to `state`; returns whether it completed a list.
///
/// Objects that cannot be converted are rejected (logged once, counted; a rejected ServiceFence is
/// kept aside for the fence controller to report) and a stored older version with the same key
/// is removed, so the state never holds what the cluster no longer has. While a list is under way
/// no per-object change is announced: the single [`Change::Resync`] at its end covers them, and
/// thousands of Pods would otherwise overflow the change channel.
fn apply_event(
    state: &ClusterState,
    domain: &str,
    kind: Kind,
    event: Event<DynamicObject>,
    relist: &mut Relist,
) -> bool {
    match event {
        Event::Init => {
            relist.listed = Some(BTreeSet::new());
            false
        }
        Event::InitApply(obj) => {
            if let Some(key) = keep(state, domain, kind, obj).key()
                && let Some(listed) = &mut relist.listed
            {
                listed.insert(key);
            }
            false
        }
        Event::Apply(obj) => {
            match keep(state, domain, kind, obj) {
                Kept::Yes(key) | Kept::Rejected(key) => state.changed(change(kind, key)),
                Kept::Unnamed => {}
            }
            false
        }
        Event::Delete(obj) => {
            match key_of(kind, &raw(obj)) {
                Ok(key) => {
                    if remove(state, kind, &key) {
                        state.changed(change(kind, key));
                    }
                }
                Err(_) => tracing::warn!(kind = kind.as_str(), "deleted object without a name ignored"),
            }
            false
        }
        Event::InitDone => {
            finish_list(state, kind, relist);
            state.changed(Change::Resync);
            true
        }
    }
}

/// What [`keep`] did with an object.
enum Kept {
    /// Stored under this key.
    Yes(ObjectKey),
    /// Rejected; kept aside under this key (a ServiceFence) or only remembered as rejected.
    Rejected(ObjectKey),
    /// Not stored: it has no name.
    Unnamed,
}

impl Kept {
    /// The key the object is known under, if it has one.
    fn key(self) -> Option<ObjectKey> {
        match self {
            Kept::Yes(key) | Kept::Rejected(key) => Some(key),
            Kept::Unnamed => None,
        }
    }
}

/// The object as JSON. Serialising a `DynamicObject` (metadata and a JSON map) cannot fail; if it
/// did, the object would be rejected as not an object.
fn raw(obj: DynamicObject) -> Value {
    serde_json::to_value(obj).unwrap_or(Value::Null)
}

/// Converts and stores `obj`, or rejects it. A rejected object's older version is removed.
fn keep(state: &ClusterState, domain: &str, kind: Kind, obj: DynamicObject) -> Kept {
    let object = raw(obj);
    let key = key_of(kind, &object).ok();
    // Only a fence is reported on itself: keep what the API server holds for that.
    let fence = (kind == Kind::ServiceFence).then(|| object.clone());
    let rejection: Rejection = match convert(kind, object, domain) {
        Ok((key, converted)) => {
            state.rejections().clear(kind, &key);
            store(state, key.clone(), converted);
            return Kept::Yes(key);
        }
        Err(rejection) => rejection,
    };
    let Some(key) = key else {
        state.rejections().reject(None, rejection);
        return Kept::Unnamed;
    };
    // The older version goes: the new one is what the cluster has, and it is rejected.
    remove_stored(state, kind, &key);
    state.rejections().reject(Some(key.clone()), rejection);
    if let Some(raw) = fence {
        state.set_rejected_fence(key.clone(), Some(raw));
    }
    Kept::Rejected(key)
}

/// Ends a list: removes every stored (or rejected) object of `kind` the list did not have; how
/// many.
fn finish_list(state: &ClusterState, kind: Kind, relist: &mut Relist) -> usize {
    let listed = relist.listed.take().unwrap_or_default();
    let stale: BTreeSet<ObjectKey> = keys(state, kind)
        .into_iter()
        .filter(|k| !listed.contains(k))
        .collect();
    for key in &stale {
        remove(state, kind, key);
    }
    stale.len()
}

/// The kind is not served: as if listed empty. Announces a resync only when that removed
/// something, since this repeats every backoff round.
fn absent(state: &ClusterState, kind: Kind, relist: &mut Relist) {
    relist.listed = Some(BTreeSet::new());
    if finish_list(state, kind, relist) > 0 {
        state.changed(Change::Resync);
    }
}
