//! When learned edges are written (sans I/O): a fence not written within
//! [`FENCE_WRITE_INTERVAL`] is written at once (a first call is not delayed); one learning a
//! flood is written once per interval with everything it learned meanwhile, not once per batch
//! (a write costs the fence's size); more than [`MAX_UNWRITTEN`] edges waiting are written at
//! once. The consumer takes batches from the learner every [`EDGE_FLUSH`] and asks this schedule
//! what to write and when to wake.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::Edge;
use crate::vocab::ObjectKey;

/// How often queued edges are taken when no batch is full. A first call through the
/// global-sidecar waits on this (after the access logger's 50 ms flush, before the reconciler's
/// 100 ms debounce), so it is short; an idle tick takes a lock and takes nothing.
pub const EDGE_FLUSH: Duration = Duration::from_millis(50);
/// How often one fence is written at most.
pub const FENCE_WRITE_INTERVAL: Duration = Duration::from_secs(1);
/// Most learned edges kept unwritten; more are written at once.
pub const MAX_UNWRITTEN: usize = 100_000;

/// What each fence learned since its last write, and when it was last written.
#[derive(Debug, Default)]
pub struct WriteSchedule {
    unwritten: BTreeMap<ObjectKey, Vec<Edge>>,
    unwritten_len: usize,
    /// When each fence written within the last [`FENCE_WRITE_INTERVAL`] was written.
    written_at: BTreeMap<ObjectKey, Instant>,
}

impl WriteSchedule {
    /// Takes a batch, to be written when its fence is due.
    pub fn add(&mut self, batch: Vec<Edge>) {
        self.unwritten_len += batch.len();
        for edge in batch {
            self.unwritten.entry(edge.fence.clone()).or_default().push(edge);
        }
    }

    /// Edges taken and not written yet.
    pub fn unwritten(&self) -> usize {
        self.unwritten_len
    }

    /// True when so many edges wait that all should be written now ([`MAX_UNWRITTEN`]).
    pub fn is_full(&self) -> bool {
        self.unwritten_len >= MAX_UNWRITTEN
    }

    /// When the next fence with unwritten edges may be written (`now` for one not written
    /// within [`FENCE_WRITE_INTERVAL`]); `None` when nothing waits.
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        self.unwritten
            .keys()
            .map(|k| {
                self.written_at
                    .get(k)
                    .map_or(now, |at| (*at + FENCE_WRITE_INTERVAL).max(now))
            })
            .min()
    }

    /// The fences whose interval has passed at `now`, with their edges, counted as written now.
    pub fn take_due(&mut self, now: Instant) -> BTreeMap<ObjectKey, Vec<Edge>> {
        self.written_at
            .retain(|_, written| now.duration_since(*written) < FENCE_WRITE_INTERVAL);
        let (due, wait): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(&mut self.unwritten)
            .into_iter()
            .partition(|(k, _)| !self.written_at.contains_key(k));
        self.unwritten = wait;
        self.taken(due, now)
    }

    /// Every fence with unwritten edges (when full, and the final flush), counted as written now.
    pub fn take_all(&mut self, now: Instant) -> BTreeMap<ObjectKey, Vec<Edge>> {
        let all = std::mem::take(&mut self.unwritten);
        self.taken(all, now)
    }

    fn taken(
        &mut self,
        fences: BTreeMap<ObjectKey, Vec<Edge>>,
        now: Instant,
    ) -> BTreeMap<ObjectKey, Vec<Edge>> {
        self.unwritten_len -= fences.values().map(Vec::len).sum::<usize>();
        for key in fences.keys() {
            self.written_at.insert(key.clone(), now);
        }
        fences
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One step of a case, at a time in milliseconds from the start.
    enum Step {
        /// One edge of each fence is taken.
        Add(&'static [&'static str]),
        /// The schedule's next wake-up is this (ms), or none.
        NextDue(Option<u64>),
        /// The fences due are written: these, with this many edges each.
        Due(&'static [(&'static str, usize)]),
        /// Everything is written (full, or the final flush): these.
        All(&'static [(&'static str, usize)]),
    }
    use Step::*;

    fn edge(fence: &str, n: u64) -> Edge {
        Edge {
            fence: ObjectKey::new("default", fence),
            host: format!("h{n}.default.svc.cluster.local"),
            seen: jiff::Timestamp::UNIX_EPOCH,
        }
    }

    fn written(fences: &BTreeMap<ObjectKey, Vec<Edge>>) -> Vec<(String, usize)> {
        fences.iter().map(|(k, e)| (k.name.clone(), e.len())).collect()
    }

    fn expected(fences: &[(&str, usize)]) -> Vec<(String, usize)> {
        fences.iter().map(|(f, n)| (f.to_string(), *n)).collect()
    }

    #[test]
    fn fences_are_written_at_once_then_at_most_once_per_interval() {
        let cases: &[(&str, &[(u64, Step)])] = &[
            (
                "a first edge is written at once",
                &[
                    (0, Add(&["a"])),
                    (0, NextDue(Some(0))),
                    (0, Due(&[("a", 1)])),
                    (0, NextDue(None)),
                ],
            ),
            (
                "a fence written recently waits for its interval",
                &[
                    (0, Add(&["a"])),
                    (0, Due(&[("a", 1)])),
                    (100, Add(&["a"])),
                    (100, NextDue(Some(1000))),
                    (500, Due(&[])),
                    (1000, Due(&[("a", 1)])),
                ],
            ),
            (
                "a flooding fence is written once per interval with all it learned",
                &[
                    (0, Add(&["a"])),
                    (0, Due(&[("a", 1)])),
                    (50, Add(&["a"])),
                    (100, Add(&["a"])),
                    (150, Add(&["a"])),
                    (200, Due(&[])),
                    (1000, Due(&[("a", 3)])),
                    (1050, Add(&["a"])),
                    (1100, Due(&[])),
                    (2000, NextDue(Some(2000))),
                    (2000, Due(&[("a", 1)])),
                ],
            ),
            (
                "another fence is not held back by a flooding one",
                &[
                    (0, Add(&["a"])),
                    (0, Due(&[("a", 1)])),
                    (100, Add(&["a", "b"])),
                    (100, NextDue(Some(100))),
                    (100, Due(&[("b", 1)])),
                    (100, NextDue(Some(1000))),
                    (1000, Due(&[("a", 1)])),
                ],
            ),
            (
                "a fence silent for an interval is written at once again",
                &[
                    (0, Add(&["a"])),
                    (0, Due(&[("a", 1)])),
                    (1500, Add(&["a"])),
                    (1500, NextDue(Some(1500))),
                    (1500, Due(&[("a", 1)])),
                ],
            ),
            (
                "the final flush writes every waiting fence",
                &[
                    (0, Add(&["a", "b"])),
                    (0, Due(&[("a", 1), ("b", 1)])),
                    (10, Add(&["a", "b", "a"])),
                    (20, All(&[("a", 2), ("b", 1)])),
                    (20, NextDue(None)),
                    (30, Add(&["a"])),
                    (30, NextDue(Some(1020))),
                ],
            ),
        ];
        let start = Instant::now();
        let mut failures = Vec::new();
        for (name, steps) in cases {
            let mut schedule = WriteSchedule::default();
            let mut n = 0;
            for (i, (ms, step)) in steps.iter().enumerate() {
                let now = start + Duration::from_millis(*ms);
                let (got, want) = match step {
                    Add(fences) => {
                        let batch = fences.iter().map(|f| {
                            n += 1;
                            edge(f, n)
                        });
                        schedule.add(batch.collect());
                        continue;
                    }
                    NextDue(want) => (
                        format!(
                            "{:?}",
                            schedule
                                .next_due(now)
                                .map(|t| t.duration_since(start).as_millis())
                        ),
                        format!("{:?}", want.map(u128::from)),
                    ),
                    Due(want) => (
                        format!("{:?}", written(&schedule.take_due(now))),
                        format!("{:?}", expected(want)),
                    ),
                    All(want) => (
                        format!("{:?}", written(&schedule.take_all(now))),
                        format!("{:?}", expected(want)),
                    ),
                };
                if got != want {
                    failures.push(format!("{name}, step {i} at {ms} ms: got {got}, want {want}"));
                }
            }
            let waiting: usize = schedule.unwritten.values().map(Vec::len).sum();
            if schedule.unwritten() != waiting {
                failures.push(format!(
                    "{name}: counts {} unwritten, holds {waiting}",
                    schedule.unwritten()
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn too_many_waiting_edges_make_it_full() {
        let mut schedule = WriteSchedule::default();
        schedule.add((0..MAX_UNWRITTEN as u64 - 1).map(|n| edge("a", n)).collect());
        assert!(!schedule.is_full());
        schedule.add(vec![edge("b", 0)]);
        assert!(schedule.is_full());
        assert_eq!(schedule.take_all(Instant::now()).len(), 2);
        assert_eq!(schedule.unwritten(), 0);
    }
}
