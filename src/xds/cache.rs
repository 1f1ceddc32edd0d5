//! Resources as the relay keeps them, and the last good config per node class.
//!
//! Every resource the relay keeps is interned by content: replicas of the global-sidecar
//! receive identical resources from istiod, and each extra replica then costs a map of names to
//! shared buffers, not another copy of the config.
//!
//! The last good config of a node class is what a stream of that class last ACKed, taken whole
//! from one upstream stream (a generation): types ACKed on a newer stream replace the record
//! only once that stream has ACKed both CDS and LDS, so config from two generations never mix.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

use super::memo::ResponseMemo;
use super::response::RawAny;
use super::routes::RouteCache;
use super::{CLUSTER, LISTENER};

/// An encoded resource, shared between streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    /// Its type URL.
    pub type_url: Arc<str>,
    /// Its encoded bytes.
    pub value: Arc<[u8]>,
}

impl Resource {
    /// The resource as an `Any` to send (shares the bytes).
    pub fn to_raw(&self) -> RawAny {
        RawAny {
            type_url: self.type_url.clone(),
            value: Bytes::from_owner(self.value.clone()),
        }
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.value.len()
    }

    /// Whether the encoding is empty.
    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }
}

/// Shards of a [`ResourceSet`]: a change copies 1/64 of the set.
const SHARDS: usize = 64;

/// One shard of a [`ResourceSet`].
type Shard = BTreeMap<Arc<str>, Resource>;

/// The resources of one type, by name. Its shards are shared copy-on-write: handing the set to
/// the last-good record copies 64 pointers, and the stream's next change copies the one shard
/// it touches, not the 10,000 entries of a large EDS set. Streams holding the same resources
/// (replicas of the global-sidecar) share equal shards too ([`Interner::share`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceSet {
    /// Empty until the first insert.
    shards: Vec<Arc<Shard>>,
}

impl ResourceSet {
    fn shard_of(name: &str) -> usize {
        use std::hash::Hasher;
        let mut h = crate::hash::FxHasher::default();
        h.write(name.as_bytes());
        (h.finish() % SHARDS as u64) as usize
    }

    /// The resource named `name`.
    pub fn get(&self, name: &str) -> Option<&Resource> {
        self.shards.get(Self::shard_of(name))?.get(name)
    }

    /// Whether a resource is named `name`.
    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Keeps `resource` under `name` (copying the shard if it is shared).
    pub fn insert(&mut self, name: Arc<str>, resource: Resource) {
        if self.shards.is_empty() {
            self.shards = vec![Arc::default(); SHARDS];
        }
        let shard = &mut self.shards[Self::shard_of(&name)];
        Arc::make_mut(shard).insert(name, resource);
    }

    /// Forgets the resource named `name` (copying the shard if it is shared and has it).
    pub fn remove(&mut self, name: &str) {
        if let Some(shard) = self.shards.get_mut(Self::shard_of(name))
            && shard.contains_key(name)
        {
            Arc::make_mut(shard).remove(name);
        }
    }

    /// Adds every resource of `other`, replacing those of the same names. A shard this set
    /// has nothing in is taken shared, not copied.
    pub fn merge(&mut self, other: &ResourceSet) {
        if other.shards.is_empty() {
            return;
        }
        if self.shards.is_empty() {
            self.shards = vec![Arc::default(); SHARDS];
        }
        for (mine, theirs) in self.shards.iter_mut().zip(&other.shards) {
            if theirs.is_empty() {
                continue;
            }
            if mine.is_empty() {
                *mine = theirs.clone();
            } else {
                Arc::make_mut(mine).extend(theirs.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
    }

    /// Number of resources.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.is_empty())
    }

    /// The resources by name, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Resource)> {
        let mut all: Vec<_> = self.shards.iter().flat_map(|s| s.iter()).collect();
        all.sort_by(|a, b| a.0.cmp(b.0));
        all.into_iter()
    }

    /// The names, in order.
    pub fn keys(&self) -> impl Iterator<Item = &Arc<str>> {
        self.iter().map(|(k, _)| k)
    }

    /// The resources, in name order.
    pub fn values(&self) -> impl Iterator<Item = &Resource> {
        self.iter().map(|(_, v)| v)
    }

    /// Whether both share every shard (nothing was copied).
    pub fn shares_with(&self, other: &ResourceSet) -> bool {
        self.shards.len() == other.shards.len()
            && self
                .shards
                .iter()
                .zip(&other.shards)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

impl FromIterator<(Arc<str>, Resource)> for ResourceSet {
    fn from_iter<I: IntoIterator<Item = (Arc<str>, Resource)>>(iter: I) -> Self {
        let mut set = ResourceSet::default();
        iter.into_iter().for_each(|(k, v)| set.insert(k, v));
        set
    }
}

/// Values by a hash of their content, held weakly: a value stays findable while someone holds
/// it, and what nobody holds is forgotten. Equal hashes are only candidates; `find` is given
/// the real comparison. Used for every content-addressed cache of the relay.
pub(crate) struct WeakTable<T: ?Sized> {
    map: HashMap<u64, Vec<Weak<T>>>,
}

impl<T: ?Sized> Default for WeakTable<T> {
    fn default() -> Self {
        Self { map: HashMap::new() }
    }
}

impl<T: ?Sized> std::fmt::Debug for WeakTable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeakTable")
            .field("keys", &self.map.len())
            .finish()
    }
}

impl<T: ?Sized> WeakTable<T> {
    /// A live value under `key` that `same` accepts.
    pub(crate) fn find(&self, key: u64, same: impl Fn(&T) -> bool) -> Option<Arc<T>> {
        self.map
            .get(&key)?
            .iter()
            .filter_map(Weak::upgrade)
            .find(|v| same(v))
    }

    /// Makes `value` findable under `key`. Dead handles of the key go now; those of every key
    /// go each time the table doubles past 4,096 keys.
    pub(crate) fn hold(&mut self, key: u64, value: &Arc<T>) {
        let bucket = self.map.entry(key).or_default();
        bucket.retain(|w| w.strong_count() > 0);
        bucket.push(Arc::downgrade(value));
        if self.map.len() > 4096 && self.map.len().is_power_of_two() {
            self.map.retain(|_, b| b.iter().any(|w| w.strong_count() > 0));
        }
    }

    /// Values someone still holds.
    pub(crate) fn live(&self) -> usize {
        self.map
            .values()
            .flatten()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

/// Content-addressed store of resource bytes (weak: a buffer lives as long as someone uses it),
/// plus the type URLs and resource names streams share, the shards of their resource sets, and
/// the adjusted virtual hosts. Its hashes are seeded (foldhash): istiod's content chooses the
/// keys, and a seed keeps anyone who shapes a Service from making them collide.
#[derive(Debug, Default)]
pub struct Interner {
    /// Adjusted virtual hosts by content (A1, A2, A4 done incrementally).
    pub routes: RouteCache,
    /// Adjusted SotW responses by content.
    pub responses: ResponseMemo,
    tables: Mutex<Tables>,
    shards: Mutex<WeakTable<Shard>>,
    hasher: foldhash::fast::RandomState,
}

/// The interned strings and buffers, behind one lock taken once per response.
#[derive(Debug, Default)]
struct Tables {
    strings: std::collections::HashSet<Arc<str>, foldhash::fast::RandomState>,
    buffers: WeakTable<[u8]>,
}

impl Tables {
    fn name(&mut self, s: &str) -> Arc<str> {
        if let Some(v) = self.strings.get(s) {
            return v.clone();
        }
        if self.strings.len() > 4096 && self.strings.len().is_power_of_two() {
            self.strings.retain(|v| Arc::strong_count(v) > 1);
        }
        let v: Arc<str> = s.into();
        self.strings.insert(v.clone());
        v
    }

    fn buffer(&mut self, key: u64, bytes: &[u8]) -> Arc<[u8]> {
        if let Some(found) = self.buffers.find(key, |v| v == bytes) {
            return found;
        }
        let value: Arc<[u8]> = bytes.into();
        self.buffers.hold(key, &value);
        value
    }
}

impl Interner {
    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps each `(name, resource)` in `set`, interned. The content is hashed before the lock
    /// is taken, and the lock is taken once.
    pub fn remember_all<'a>(
        &self,
        set: &mut ResourceSet,
        resources: impl IntoIterator<Item = (&'a str, &'a RawAny)>,
    ) {
        let keyed: Vec<(&str, &RawAny, u64)> = resources
            .into_iter()
            .map(|(name, any)| (name, any, self.hasher.hash_one(&*any.value)))
            .collect();
        let mut tables = self.tables();
        let mut type_url: Option<(&str, Arc<str>)> = None;
        for (name, any, key) in keyed {
            let shared_type = match &type_url {
                Some((raw, shared)) if *raw == &*any.type_url => shared.clone(),
                _ => {
                    let shared = tables.name(&any.type_url);
                    type_url = Some((&any.type_url, shared.clone()));
                    shared
                }
            };
            let resource = Resource {
                type_url: shared_type,
                value: tables.buffer(key, &any.value),
            };
            set.insert(tables.name(name), resource);
        }
    }

    /// Keeps `any` in `set` under `name`, interned.
    pub fn remember(&self, set: &mut ResourceSet, name: &str, any: &RawAny) {
        self.remember_all(set, [(name, any)]);
    }

    /// Makes `set` share each shard it alone holds with an equal shard another set holds (the
    /// same resources of another replica's stream), so N replicas hold one map, not N. Shards
    /// already shared were shared when they were made; only those a change copied are looked
    /// up. Names and buffers are interned, so equal shards hold the same pointers: the key is a
    /// hash of pointers, and equality a comparison that usually stops at the pointers.
    pub fn share(&self, set: &mut ResourceSet) {
        let mut table = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        for shard in set
            .shards
            .iter_mut()
            .filter(|s| Arc::strong_count(s) == 1 && !s.is_empty())
        {
            let key = shard_key(shard);
            match table.find(key, |other| *other == **shard) {
                Some(other) => *shard = other,
                None => table.hold(key, shard),
            }
        }
    }
}

/// A hash of the pointers a shard holds (see [`Interner::share`]).
fn shard_key(shard: &Shard) -> u64 {
    use std::hash::Hasher;
    let mut h = crate::hash::FxHasher::default();
    for (name, resource) in shard {
        h.write_usize(name.as_ptr() as usize);
        h.write_usize(resource.value.as_ptr() as usize);
    }
    h.finish()
}

/// Config of one node class as last ACKed.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The upstream stream it came from.
    pub generation: u64,
    /// Resources by type URL, shared with the streams that ACKed them.
    pub types: BTreeMap<String, ResourceSet>,
}

impl Snapshot {
    /// Whether a global-sidecar can become ready from it (clusters and listeners are there).
    pub fn is_complete(&self) -> bool {
        self.types.contains_key(CLUSTER) && self.types.contains_key(LISTENER)
    }

    /// Total encoded bytes.
    pub fn bytes(&self) -> usize {
        self.types
            .values()
            .flat_map(|s| s.values())
            .map(Resource::len)
            .sum()
    }
}

/// The last good config per node class, plus generations still being collected.
#[derive(Debug, Default)]
pub struct LastGood {
    inner: Mutex<LastGoodInner>,
}

#[derive(Debug, Default)]
struct LastGoodInner {
    good: HashMap<String, Arc<Snapshot>>,
    collecting: HashMap<(String, u64), Snapshot>,
}

impl LastGood {
    /// Records that the stream `generation` of `class` had `resources` of `type_url` ACKed. The
    /// record shares the set with the stream (no copy per ACK).
    pub fn acked(&self, class: &str, generation: u64, type_url: &str, resources: &ResourceSet) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = (class.to_string(), generation);
        let snap = inner.collecting.entry(key.clone()).or_insert_with(|| Snapshot {
            generation,
            types: BTreeMap::new(),
        });
        snap.types.insert(type_url.to_string(), resources.clone());
        if snap.is_complete() {
            let snap = Arc::new(snap.clone());
            let newer = inner.good.get(class).is_none_or(|g| g.generation <= generation);
            if newer {
                inner.good.insert(class.to_string(), snap);
            }
        }
    }

    /// Forgets a stream's partial collection when it ends.
    pub fn stream_ended(&self, class: &str, generation: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.collecting.remove(&(class.to_string(), generation));
    }

    /// The last good config of a class.
    pub fn get(&self, class: &str) -> Option<Arc<Snapshot>> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .good
            .get(class)
            .cloned()
    }

    /// Every class with its snapshot (for `/debug/relay`).
    pub fn all(&self) -> Vec<(String, Arc<Snapshot>)> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = inner.good.iter().map(|(k, s)| (k.clone(), s.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(bytes: &[u8]) -> RawAny {
        RawAny {
            type_url: "t".into(),
            value: Bytes::copy_from_slice(bytes),
        }
    }

    fn set(items: &[(&str, &[u8])], interner: &Interner) -> ResourceSet {
        let mut set = ResourceSet::default();
        for (name, bytes) in items {
            interner.remember(&mut set, name, &any(bytes));
        }
        set
    }

    #[test]
    fn interning_shares_equal_buffers_names_and_type_urls() {
        let i = Interner::default();
        let (a, b) = (
            set(&[("x", b"same")], &i),
            set(&[("y", b"same"), ("z", b"other")], &i),
        );
        let (x, y, z) = (a.get("x").unwrap(), b.get("y").unwrap(), b.get("z").unwrap());
        assert!(Arc::ptr_eq(&x.value, &y.value));
        assert!(!Arc::ptr_eq(&x.value, &z.value));
        assert!(Arc::ptr_eq(&x.type_url, &z.type_url));
        let (k1, k2) = (
            a.keys().next().unwrap(),
            set(&[("x", b"1")], &i).keys().next().unwrap().clone(),
        );
        assert!(Arc::ptr_eq(k1, &k2));
    }

    #[test]
    fn equal_sets_of_two_streams_share_their_shards() {
        let i = Interner::default();
        let items: Vec<(String, Vec<u8>)> = (0..500).map(|n| (format!("c{n}"), vec![n as u8; 40])).collect();
        let build = |skip: Option<usize>| {
            let mut set = ResourceSet::default();
            for (n, (name, bytes)) in items.iter().enumerate() {
                if Some(n) != skip {
                    i.remember(&mut set, name, &any(bytes));
                }
            }
            i.share(&mut set);
            set
        };
        let a = build(None);
        let b = build(None);
        assert!(
            a.shares_with(&b),
            "a second stream with the same resources holds no map of its own"
        );
        let c = build(Some(7));
        assert!(!c.shares_with(&a) && c.len() == a.len() - 1);
        let shared = a
            .shards
            .iter()
            .zip(&c.shards)
            .filter(|(x, y)| Arc::ptr_eq(x, y))
            .count();
        assert_eq!(shared, SHARDS - 1, "only the shard that differs is a copy");
        // A change copies the one shard it touches, and the sets still read as before.
        let mut d = b.clone();
        i.remember(&mut d, "new", &any(b"new"));
        i.share(&mut d);
        assert!(d.contains_key("new") && !b.contains_key("new") && a == b);
    }

    #[test]
    fn generations_never_mix() {
        let i = Interner::default();
        let lg = LastGood::default();
        lg.acked("gs", 1, CLUSTER, &set(&[("c1", b"1")], &i));
        assert!(lg.get("gs").is_none(), "LDS not acked yet");
        lg.acked("gs", 1, LISTENER, &set(&[("l1", b"1")], &i));
        assert_eq!(lg.get("gs").unwrap().generation, 1);
        // A newer stream ACKs clusters only: the record stays generation 1, whole.
        lg.acked("gs", 2, CLUSTER, &set(&[("c2", b"2")], &i));
        let g = lg.get("gs").unwrap();
        assert_eq!(g.generation, 1);
        assert!(g.types[CLUSTER].contains_key("c1"));
        lg.acked("gs", 2, LISTENER, &set(&[("l2", b"2")], &i));
        let g = lg.get("gs").unwrap();
        assert_eq!(g.generation, 2);
        assert!(g.types[CLUSTER].contains_key("c2") && !g.types[CLUSTER].contains_key("c1"));
        // An older stream finishing late does not win.
        lg.acked("gs", 1, CLUSTER, &set(&[("c9", b"9")], &i));
        assert_eq!(lg.get("gs").unwrap().generation, 2);
    }
}
