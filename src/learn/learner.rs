//! The learner: deduplicates (fence, host) edges and queues the new or refreshed ones.
//!
//! Sources and hosts are interned once; an edge is a pair of small ids. Observing a known edge
//! is three hash lookups and no allocation. A known edge is queued again only when its stored
//! last-seen time is older than the refresh granularity, so a fence's status is rewritten at most
//! once per granularity per dependency, not on every call.
//!
//! In front of that, a cache of entry fingerprints found fully known: a call repeated within the
//! refresh granularity (same caller, cluster, authority, headers; same index generation) costs
//! one lookup and no attribution. Its price: a known edge's last-seen refresh can lag by up to
//! one more granularity (two minutes instead of one), which a TTL of hours does not notice.
//!
//! Memory is bounded: at most `max_edges` edges, `max_hosts` distinct hosts, `max_pending`
//! queued edges and `max_hosts_per_fence` hosts per fence. What does not fit is refused
//! ([`Observed::TableFull`], [`Observed::QueueFull`], [`Observed::FenceFull`]) and counted by the
//! caller; it is learned on a later call once there is room. The collector also stops reading
//! its streams while the queue is full (back-pressure), so `QueueFull` only happens inside one
//! message.
//!
//! The queue is fair: each fence has its own, and a batch takes from every fence with queued
//! edges in turn, so one fence's flood never holds another fence's edge back by more than one
//! batch (as long as a batch has a place for each fence with queued edges; with more such
//! fences than places, by as many batches as it takes to give each one). Queueing and taking cost O(1) per edge, whatever the fence's size.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use jiff::Timestamp;

use super::Edge;
use crate::hash::FastMap;
use crate::vocab::ObjectKey;

/// Caps and timing of a [`Learner`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most edges remembered.
    pub max_edges: usize,
    /// Most distinct destination hosts remembered.
    pub max_hosts: usize,
    /// Most edges waiting for the consumer.
    pub max_pending: usize,
    /// Most hosts learned for one fence (edges restored at start count, but are never refused).
    pub max_hosts_per_fence: usize,
    /// A known edge is re-queued when its last-seen time is older than this.
    pub refresh: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_edges: 1_000_000,
            max_hosts: 200_000,
            max_pending: 100_000,
            max_hosts_per_fence: crate::config::DEFAULT_MAX_LEARNED_HOSTS_PER_FENCE,
            refresh: Duration::from_secs(60),
        }
    }
}

/// What observing a call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Known and fresh (or already queued): nothing to do.
    Known,
    /// A new edge, queued.
    New,
    /// A known edge whose last-seen time was stale, queued.
    Refreshed,
    /// Not learned: the queue is full.
    QueueFull,
    /// Not learned: the edge or host table is full.
    TableFull,
    /// Not learned: the fence already has `max_hosts_per_fence` hosts.
    FenceFull,
}

#[derive(Clone, Copy, Debug)]
struct EdgeState {
    seen: Timestamp,
    pending: bool,
}

#[derive(Clone, Debug, Default)]
struct SourceState {
    hosts: usize,
    queue: VecDeque<u32>,
}

/// The dedup state machine. Pure: the caller passes the time.
#[derive(Clone, Debug, Default)]
pub struct Learner {
    limits: Limits,
    /// Fences come from the cluster index, ids are ours: a fast hash is safe. Hosts come from
    /// the wire (within what attribution allows): they keep std's keyed SipHash.
    source_ids: FastMap<ObjectKey, u32>,
    sources: Vec<ObjectKey>,
    /// Per source id: how many hosts it has, and its queued host ids, oldest first.
    per_source: Vec<SourceState>,
    /// Sources with queued edges, in the order their turn comes.
    turns: VecDeque<u32>,
    /// Queued edges, all sources together.
    queued: usize,
    /// Sources at their host cap.
    at_cap: usize,
    host_ids: HashMap<Box<str>, u32>,
    hosts: Vec<Box<str>>,
    edges: FastMap<(u32, u32), EdgeState>,
    /// Entry fingerprints whose every edge was known and fresh, with when that was decided and
    /// under which index generation: a repeated call then costs one lookup.
    recent: FastMap<u64, (Timestamp, u64)>,
}

impl Learner {
    /// An empty learner.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Default::default()
        }
    }

    /// Records a call from `fence` to `host` at `now`.
    pub fn observe(&mut self, fence: &ObjectKey, host: &str, now: Timestamp) -> Observed {
        if let (Some(&s), Some(&h)) = (self.source_ids.get(fence), self.host_ids.get(host))
            && let Some(state) = self.edges.get_mut(&(s, h))
        {
            if state.pending || !is_stale(state.seen, now, self.limits.refresh) {
                return Observed::Known;
            }
            if self.queued >= self.limits.max_pending {
                return Observed::QueueFull;
            }
            state.seen = now;
            state.pending = true;
            self.enqueue(s, h);
            return Observed::Refreshed;
        }
        if self.queued >= self.limits.max_pending {
            return Observed::QueueFull;
        }
        if self
            .source_ids
            .get(fence)
            .is_some_and(|&s| self.per_source[s as usize].hosts >= self.limits.max_hosts_per_fence)
        {
            return Observed::FenceFull;
        }
        match self.insert(fence, host, now, true) {
            Some(_) => Observed::New,
            None => Observed::TableFull,
        }
    }

    /// Remembers an edge already persisted (a fence's status at start-up), so it is not learned
    /// again. Without a last-seen time (learned by Slime) it counts as stale: the next call
    /// refreshes it and gives it one.
    pub fn seed(&mut self, fence: &ObjectKey, host: &str, seen: Option<Timestamp>) -> bool {
        self.insert(fence, host, seen.unwrap_or(Timestamp::MIN), false)
            .is_some()
    }

    fn insert(&mut self, fence: &ObjectKey, host: &str, seen: Timestamp, pending: bool) -> Option<()> {
        if self.edges.len() >= self.limits.max_edges {
            return None;
        }
        let h = match self.host_ids.get(host) {
            Some(&h) => h,
            None if self.hosts.len() >= self.limits.max_hosts => return None,
            None => {
                let h = u32::try_from(self.hosts.len()).ok()?;
                self.hosts.push(host.into());
                self.host_ids.insert(host.into(), h);
                h
            }
        };
        let s = match self.source_ids.get(fence) {
            Some(&s) => s,
            None => {
                let s = u32::try_from(self.sources.len()).ok()?;
                self.sources.push(fence.clone());
                self.per_source.push(SourceState::default());
                self.source_ids.insert(fence.clone(), s);
                s
            }
        };
        let mut added = false;
        let state = self.edges.entry((s, h)).or_insert_with(|| {
            added = true;
            EdgeState { seen, pending: false }
        });
        if seen > state.seen {
            state.seen = seen;
        }
        let queue = pending && !state.pending;
        if queue {
            state.pending = true;
        }
        if added {
            let source = &mut self.per_source[s as usize];
            source.hosts += 1;
            if source.hosts == self.limits.max_hosts_per_fence {
                self.at_cap += 1;
            }
        }
        if queue {
            self.enqueue(s, h);
        }
        Some(())
    }

    /// Queues edge `(s, h)` in its source's queue; the source takes its turn if it had none.
    fn enqueue(&mut self, s: u32, h: u32) {
        let queue = &mut self.per_source[s as usize].queue;
        if queue.is_empty() {
            self.turns.push_back(s);
        }
        queue.push_back(h);
        self.queued += 1;
    }

    /// Whether an entry with this fingerprint was found fully known (every edge known and fresh)
    /// within the refresh granularity, under the same index `generation`. Such an entry needs no
    /// attribution: whatever it would teach is already queued or recorded. A fingerprint
    /// collision can at worst delay learning a call by one refresh granularity.
    pub fn recently_known(&self, fingerprint: u64, generation: u64, now: Timestamp) -> bool {
        self.recent
            .get(&fingerprint)
            .is_some_and(|&(at, g)| g == generation && !is_stale(at, now, self.limits.refresh))
    }

    /// Records that an entry with this fingerprint was found fully known. The memory is bounded
    /// like the edge table; when full it starts over (a cache miss only costs an attribution).
    pub fn remember_known(&mut self, fingerprint: u64, generation: u64, now: Timestamp) {
        if self.recent.len() >= self.limits.max_edges {
            self.recent.clear();
        }
        self.recent.insert(fingerprint, (now, generation));
    }

    /// Whether the queue is full (the collector then stops reading until it drains).
    pub fn queue_full(&self) -> bool {
        self.queued >= self.limits.max_pending
    }

    /// Number of queued edges.
    pub fn pending(&self) -> usize {
        self.queued
    }

    /// Number of fences that reached `max_hosts_per_fence`.
    pub fn fences_at_cap(&self) -> usize {
        self.at_cap
    }

    /// Number of remembered edges.
    pub fn len(&self) -> usize {
        self.edges.len()
    }

    /// Whether no edge is remembered.
    pub fn is_empty(&self) -> bool {
        self.edges.is_empty()
    }

    /// Takes up to `max` queued edges: every fence with queued edges gets an equal share
    /// (its oldest first), in turn, and a share one fence leaves unused goes to the others. A
    /// fence not emptied goes to the back of the line, so the next batch starts with the
    /// fences this one served last or not at all.
    pub fn take_batch(&mut self, max: usize) -> Vec<Edge> {
        let mut out = Vec::with_capacity(max.min(self.queued));
        let share = max.div_ceil(self.turns.len().max(1)).max(1);
        while out.len() < max
            && let Some(s) = self.turns.pop_front()
        {
            let queue = &mut self.per_source[s as usize].queue;
            let n = share.min(max - out.len()).min(queue.len());
            for h in queue.drain(..n) {
                if let Some(state) = self.edges.get_mut(&(s, h)) {
                    state.pending = false;
                    out.push(Edge {
                        fence: self.sources[s as usize].clone(),
                        host: self.hosts[h as usize].to_string(),
                        seen: state.seen,
                    });
                }
            }
            self.queued -= n;
            if !queue.is_empty() {
                self.turns.push_back(s);
            }
        }
        out
    }
}

fn is_stale(seen: Timestamp, now: Timestamp, refresh: Duration) -> bool {
    let age = now.duration_since(seen);
    age.is_negative() || age.unsigned_abs() >= refresh
}

#[cfg(test)]
mod tests {
    use super::*;

    const DETAILS: &str = "details.default.svc.cluster.local";
    const REVIEWS: &str = "reviews.default.svc.cluster.local";

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    #[test]
    fn new_known_refreshed() {
        let mut l = Learner::new(Limits::default());
        let a = ObjectKey::new("default", "productpage");
        assert_eq!(l.observe(&a, DETAILS, t(0)), Observed::New);
        assert_eq!(l.observe(&a, DETAILS, t(1)), Observed::Known);
        let batch = l.take_batch(10);
        assert_eq!(
            batch,
            vec![Edge {
                fence: a.clone(),
                host: DETAILS.into(),
                seen: t(0)
            }]
        );
        assert_eq!(l.observe(&a, DETAILS, t(59)), Observed::Known);
        assert_eq!(l.observe(&a, DETAILS, t(60)), Observed::Refreshed);
        // Already queued: not queued twice.
        assert_eq!(l.observe(&a, DETAILS, t(200)), Observed::Known);
        assert_eq!(l.take_batch(10)[0].seen, t(60));
        assert!(l.take_batch(10).is_empty());
    }

    #[test]
    fn seeded_edges_are_not_relearned_and_slime_ones_refresh() {
        let mut l = Learner::new(Limits::default());
        let a = ObjectKey::new("default", "productpage");
        assert!(l.seed(&a, DETAILS, Some(t(0))));
        assert!(l.seed(&a, REVIEWS, None));
        assert_eq!(l.pending(), 0);
        assert_eq!(l.observe(&a, DETAILS, t(10)), Observed::Known);
        assert_eq!(l.observe(&a, REVIEWS, t(10)), Observed::Refreshed);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn recent_entries_expire_with_time_and_index_changes() {
        let mut l = Learner::new(Limits::default());
        assert!(!l.recently_known(7, 1, t(0)));
        l.remember_known(7, 1, t(0));
        assert!(l.recently_known(7, 1, t(59)));
        assert!(!l.recently_known(7, 1, t(60)), "stale");
        assert!(!l.recently_known(7, 2, t(1)), "index changed");
        assert!(!l.recently_known(8, 1, t(1)));
    }

    #[test]
    fn caps_refuse_and_recover() {
        let mut l = Learner::new(Limits {
            max_edges: 3,
            max_hosts: 2,
            max_pending: 2,
            max_hosts_per_fence: 10,
            refresh: Duration::from_secs(60),
        });
        let a = ObjectKey::new("n", "a");
        let b = ObjectKey::new("n", "b");
        assert_eq!(l.observe(&a, "h1", t(0)), Observed::New);
        assert_eq!(l.observe(&a, "h2", t(0)), Observed::New);
        assert!(l.queue_full());
        assert_eq!(l.observe(&b, "h1", t(0)), Observed::QueueFull);
        assert_eq!(l.take_batch(1).len(), 1);
        assert_eq!(l.observe(&a, "h3", t(0)), Observed::TableFull, "host table full");
        assert_eq!(l.observe(&b, "h1", t(0)), Observed::New);
        l.take_batch(10);
        assert_eq!(l.observe(&b, "h2", t(0)), Observed::TableFull, "edge table full");
        assert_eq!(l.len(), 3);
    }

    #[test]
    fn a_fence_at_its_cap_learns_no_more_hosts_but_keeps_refreshing() {
        let mut l = Learner::new(Limits {
            max_hosts_per_fence: 2,
            ..Limits::default()
        });
        let (a, b) = (ObjectKey::new("n", "a"), ObjectKey::new("n", "b"));
        assert!(l.seed(&b, "h1", Some(t(0))));
        assert!(l.seed(&b, "h2", Some(t(0))));
        assert!(l.seed(&b, "h3", Some(t(0))), "restored edges are never refused");
        assert_eq!(l.fences_at_cap(), 1);
        assert_eq!(l.observe(&b, "h4", t(1)), Observed::FenceFull);
        assert_eq!(l.observe(&a, "h1", t(0)), Observed::New);
        assert_eq!(l.observe(&a, "h2", t(0)), Observed::New);
        assert_eq!(l.fences_at_cap(), 2);
        assert_eq!(l.observe(&a, "h3", t(0)), Observed::FenceFull);
        l.take_batch(10);
        assert_eq!(
            l.observe(&a, "h1", t(60)),
            Observed::Refreshed,
            "known hosts still refresh"
        );
        assert_eq!(l.len(), 5);
    }

    /// The fairness property: however many edges one fence queued, another fence's edge is in
    /// the very next batch (when a batch has a place for each fence with queued edges), and the
    /// flooding fence still gets the rest of the batch.
    #[test]
    fn one_fence_flood_never_delays_another_fence_by_more_than_one_batch() {
        let (flood, quiet, third) = (
            ObjectKey::new("n", "flood"),
            ObjectKey::new("n", "quiet"),
            ObjectKey::new("n", "third"),
        );
        // (edges the flooding fence queued first, batch size, fences whose edges come after)
        let cases: [(usize, usize, &[&ObjectKey]); 5] = [
            (10_000, 500, &[&quiet]),
            (10_000, 500, &[&quiet, &third]),
            (3, 500, &[&quiet]),
            (10_000, 1, &[&quiet]),
            (10_000, 2, &[&quiet, &third]),
        ];
        for (flooded, batch, others) in cases {
            let mut l = Learner::new(Limits {
                max_hosts_per_fence: usize::MAX,
                ..Limits::default()
            });
            for i in 0..flooded {
                l.observe(&flood, &format!("f{i}"), t(0));
            }
            // The flood had a batch taken already: its turn came and it is behind the others.
            let first = l.take_batch(batch);
            for other in others {
                l.observe(other, "late", t(1));
            }
            let (mut waited, mut taken) = (0, first.len());
            let mut missing: Vec<&ObjectKey> = others.to_vec();
            while !missing.is_empty() {
                let got = l.take_batch(batch);
                assert!(!got.is_empty(), "{flooded}/{batch}: the queue ran dry");
                missing.retain(|o| !got.iter().any(|e| &&e.fence == o));
                waited += 1;
                taken += got.len();
            }
            // Every fence in line (the flood's included) gets a place in a batch: one batch
            // when the batch has room for each, more only when fences outnumber its places.
            let allowed = (others.len() + 1).div_ceil(batch);
            assert!(
                waited <= allowed,
                "{flooded} flood edges, batch {batch}, {} others: waited {waited} batches, allowed {allowed}",
                others.len()
            );
            assert_eq!(first.len(), batch.min(flooded));
            // Nothing lost, nothing twice: everything queued comes out once.
            taken += l.take_batch(usize::MAX).len();
            assert_eq!(taken, flooded + others.len(), "{flooded}/{batch}");
            assert_eq!(l.pending(), 0);
        }
    }
}
