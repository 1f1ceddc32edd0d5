//! A debouncing work queue (sans-IO): keys become due at a time; scheduling a key that is
//! already scheduled keeps the earlier time, so a burst of changes to one fence within the
//! debounce window costs one reconcile (and at most one write).

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use tokio::time::Instant;

/// Keys waiting for their due time.
#[derive(Debug)]
pub struct Queue<K> {
    due: HashMap<K, Instant>,
    order: BTreeSet<(Instant, K)>,
}

impl<K> Default for Queue<K> {
    fn default() -> Self {
        Self {
            due: HashMap::new(),
            order: BTreeSet::new(),
        }
    }
}

impl<K: Clone + Eq + Hash + Ord> Queue<K> {
    /// Makes `key` due at `at`, or earlier if it already is.
    pub fn schedule(&mut self, key: K, at: Instant) {
        match self.due.get(&key) {
            Some(current) if *current <= at => {}
            Some(current) => {
                self.order.remove(&(*current, key.clone()));
                self.order.insert((at, key.clone()));
                self.due.insert(key, at);
            }
            None => {
                self.order.insert((at, key.clone()));
                self.due.insert(key, at);
            }
        }
    }

    /// When the next key is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.order.first().map(|(at, _)| *at)
    }

    /// Removes and returns every key due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Vec<K> {
        let mut out = Vec::new();
        while let Some((at, _)) = self.order.first()
            && *at <= now
        {
            let Some((_, key)) = self.order.pop_first() else {
                break;
            };
            self.due.remove(&key);
            out.push(key);
        }
        out
    }

    /// Keys waiting.
    pub fn len(&self) -> usize {
        self.due.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.due.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn debounces_and_orders() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut q = Queue::default();
        q.schedule("a", ms(100));
        q.schedule("a", ms(150)); // later: the earlier time stays
        q.schedule("b", ms(300));
        q.schedule("b", ms(50)); // earlier: moves up
        assert_eq!(q.len(), 2);
        assert_eq!(q.next_due(), Some(ms(50)));
        assert_eq!(q.pop_due(ms(10)), Vec::<&str>::new());
        assert_eq!(q.pop_due(ms(100)), vec!["b", "a"]);
        assert!(q.is_empty());
        assert_eq!(q.next_due(), None);
    }
}
