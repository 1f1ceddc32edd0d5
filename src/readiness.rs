//! Readiness: each component registers a task and marks it done when it is ready
//! (listener bound, index synced); `/readyz` answers 200 once every task is done.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Shared readiness state.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<Mutex<BTreeMap<String, bool>>>);

/// One component's readiness.
#[derive(Clone, Debug)]
pub struct Task {
    name: String,
    all: Readiness,
}

impl Readiness {
    /// Registers a task that is not ready yet.
    pub fn register(&self, name: &str) -> Task {
        self.lock().insert(name.to_string(), false);
        Task {
            name: name.to_string(),
            all: self.clone(),
        }
    }

    /// Names of the tasks that are not ready.
    pub fn pending(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, ready)| !**ready)
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, bool>> {
        // A panic elsewhere must not make readiness unreadable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Task {
    /// Marks the task ready (or not, e.g. when a watch is lost).
    pub fn set(&self, ready: bool) {
        self.all.lock().insert(self.name.clone(), ready);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_when_every_task_is() {
        let r = Readiness::default();
        let a = r.register("relay");
        let b = r.register("index");
        assert_eq!(r.pending(), ["index", "relay"]);
        a.set(true);
        b.set(true);
        assert!(r.pending().is_empty());
        b.set(false);
        assert_eq!(r.pending(), ["index"]);
    }
}
