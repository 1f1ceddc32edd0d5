//! Readiness: each component registers a task and marks it done when it is ready
//! (listener bound, index synced); `/readyz` answers 200 once every task is done. A task that
//! fails (a write to `--manifests-dir` that did not land) is not ready, with its reason.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Shared readiness state.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<Mutex<BTreeMap<String, State>>>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Ready,
    Pending,
    Failed(String),
}

/// One component's readiness.
#[derive(Clone, Debug)]
pub struct Task {
    name: String,
    all: Readiness,
}

impl Readiness {
    /// Registers a task that is not ready yet.
    pub fn register(&self, name: &str) -> Task {
        self.lock().insert(name.to_string(), State::Pending);
        Task {
            name: name.to_string(),
            all: self.clone(),
        }
    }

    /// Names of the tasks that are not ready, each failed one with its reason
    /// (`manifests-dir (permission denied)`).
    pub fn pending(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter_map(|(name, state)| match state {
                State::Ready => None,
                State::Pending => Some(name.clone()),
                State::Failed(why) => Some(format!("{name} ({why})")),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, State>> {
        // A panic elsewhere must not make readiness unreadable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Task {
    /// Marks the task ready (or not, e.g. when a watch is lost).
    pub fn set(&self, ready: bool) {
        let state = if ready { State::Ready } else { State::Pending };
        self.all.lock().insert(self.name.clone(), state);
    }

    /// Marks the task not ready because of `why` (shown on `/readyz`), until it is set ready again.
    pub fn fail(&self, why: impl std::fmt::Display) {
        self.all
            .lock()
            .insert(self.name.clone(), State::Failed(why.to_string()));
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
        a.fail("disk full");
        assert_eq!(r.pending(), ["index", "relay (disk full)"]);
        a.set(true);
        assert_eq!(r.pending(), ["index"]);
    }
}
