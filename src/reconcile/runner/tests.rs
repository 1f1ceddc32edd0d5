//! The runner's policy as a table: each case drives a scripted reconciler through changes,
//! leadership and sync in paused time, and lists when each key was reconciled. Every failing
//! case is reported, not only the first.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use super::*;
use crate::index::ClusterIndex;
use crate::index::convert::Kind;
use crate::vocab::ObjectKey;

/// How long a change to a key waits in the fake controller.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// What the fake reconcile answers, per key and call (then `Ok(done)`).
#[derive(Clone, Copy, Debug)]
enum Answer {
    Ok,
    Fail,
    RequeueIn(u64),
}

/// A reconciler whose keys are the fence keys of its state; a `Change::Fence` triggers its key.
struct Scripted {
    state: ClusterState,
    answers: HashMap<String, VecDeque<Answer>>,
    /// (key, milliseconds since the start) of every reconcile.
    calls: Arc<Mutex<Vec<(String, u64)>>>,
    started: Instant,
}

impl Reconciler for Scripted {
    type Key = ObjectKey;
    const NAME: &'static str = "scripted";

    fn all_keys(&self) -> Vec<ObjectKey> {
        self.state.fence_keys()
    }

    fn triggers(&self, change: &Change) -> Trigger<ObjectKey> {
        match change {
            Change::Fence(key) => Trigger::Keys(vec![key.clone()], DEBOUNCE),
            Change::Resync => Trigger::All(Duration::ZERO),
            _ => Trigger::Nothing,
        }
    }

    async fn reconcile(&mut self, key: &ObjectKey) -> Result<Action, Error> {
        let ms = self.started.elapsed().as_millis() as u64;
        self.calls.lock().unwrap().push((key.name.clone(), ms));
        let answer = self
            .answers
            .get_mut(&key.name)
            .and_then(VecDeque::pop_front)
            .unwrap_or(Answer::Ok);
        match answer {
            Answer::Ok => Ok(Action::done()),
            Answer::RequeueIn(ms) => Ok(Action::requeue_at(Instant::now() + Duration::from_millis(ms))),
            Answer::Fail => Err(Error::Serialize {
                object: key.to_string(),
                source: serde_json::from_str::<()>("x").unwrap_err(),
            }),
        }
    }
}

/// One step of a case, at a time in milliseconds since the start.
#[derive(Clone, Debug)]
enum Step {
    /// `Change::Fence` for the key.
    Touch(&'static str),
    /// The Lease is taken (`true`) or lost.
    Lead(bool),
    /// Every kind is listed (the state announces a resync).
    Synced,
}

struct Case {
    name: &'static str,
    /// The fences in the state (the keys `all_keys` gives).
    keys: &'static [&'static str],
    leading: bool,
    /// Whether the Service kind starts unsynced.
    unsynced: bool,
    answers: &'static [(&'static str, &'static [Answer])],
    steps: &'static [(u64, Step)],
    /// Every reconcile in order: (key, ms).
    want: &'static [(&'static str, u64)],
    /// `lazyload_reconcile_errors_total{controller="scripted"}` at the end.
    want_errors: u64,
}

fn fence(name: &str) -> crate::vocab::fence::ServiceFence {
    let mut f = crate::vocab::fence::ServiceFence::new(name, Default::default());
    f.metadata.namespace = Some("default".into());
    f
}

/// Runs `case` for 10 s of paused time; returns the reconciles and the error count.
async fn run(case: &Case) -> (Vec<(String, u64)>, u64) {
    let state = ClusterState::new(
        ClusterIndex::new("cluster.local"),
        case.keys.iter().map(|k| fence(k)),
    );
    if case.unsynced {
        state.await_sync([Kind::Service]);
    }
    let calls = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let reconciler = Scripted {
        state: state.clone(),
        answers: case
            .answers
            .iter()
            .map(|(k, a)| (k.to_string(), a.iter().copied().collect()))
            .collect(),
        calls: calls.clone(),
        started,
    };
    let metrics = Metrics::default();
    let (lead, leader) = watch::channel(case.leading);
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        Runner::new(reconciler, state.clone(), Gate::Leader(leader), &metrics).run(stop.clone()),
    );
    for (at, step) in case.steps {
        tokio::time::sleep_until(started + Duration::from_millis(*at)).await;
        match step {
            Step::Touch(k) => state.changed(Change::Fence(ObjectKey::new("default", *k))),
            Step::Lead(l) => {
                lead.send_replace(*l);
            }
            // The last kind to sync announces the resync.
            Step::Synced => {
                state.mark_synced(Kind::Service);
            }
        }
    }
    tokio::time::sleep_until(started + Duration::from_secs(10)).await;
    stop.cancel();
    task.await.unwrap();
    let errors = metrics
        .errors
        .get_or_create(&ControllerLabel {
            controller: "scripted",
        })
        .get();
    let calls = calls.lock().unwrap().clone();
    (calls, errors)
}

const CASES: &[Case] = &[
    Case {
        name: "every key at the start, then a burst of changes costs one reconcile after the debounce",
        keys: &["a", "b"],
        leading: true,
        unsynced: false,
        answers: &[],
        steps: &[
            (1000, Step::Touch("a")),
            (1030, Step::Touch("a")),
            (1060, Step::Touch("a")),
        ],
        want: &[("a", 0), ("b", 0), ("a", 1100)],
        want_errors: 0,
    },
    Case {
        name: "requeue-at brings the key back at that time",
        keys: &["a"],
        leading: true,
        unsynced: false,
        answers: &[("a", &[Answer::RequeueIn(2500)])],
        steps: &[],
        want: &[("a", 0), ("a", 2500)],
        want_errors: 0,
    },
    Case {
        name: "a change earlier than the requeue time wins",
        keys: &["a"],
        leading: true,
        unsynced: false,
        answers: &[("a", &[Answer::RequeueIn(5000)])],
        steps: &[(1000, Step::Touch("a"))],
        want: &[("a", 0), ("a", 1100)],
        want_errors: 0,
    },
    Case {
        name: "failures back off doubling from 500 ms, and a success resets the backoff",
        keys: &["a"],
        leading: true,
        unsynced: false,
        answers: &[(
            "a",
            &[Answer::Fail, Answer::Fail, Answer::Fail, Answer::Ok, Answer::Fail],
        )],
        steps: &[(5000, Step::Touch("a"))],
        // 0 fails (+500), 500 fails (+1000), 1500 fails (+2000), 3500 ok; 5100 fails (+500).
        want: &[
            ("a", 0),
            ("a", 500),
            ("a", 1500),
            ("a", 3500),
            ("a", 5100),
            ("a", 5600),
        ],
        want_errors: 4,
    },
    Case {
        name: "the backoff is per key",
        keys: &["a", "b"],
        leading: true,
        unsynced: false,
        answers: &[("a", &[Answer::Fail, Answer::Fail]), ("b", &[Answer::Fail])],
        steps: &[],
        want: &[("a", 0), ("b", 0), ("a", 500), ("b", 500), ("a", 1500)],
        want_errors: 3,
    },
    Case {
        name: "a follower reconciles nothing; taking the lease reconciles everything",
        keys: &["a", "b"],
        leading: false,
        unsynced: false,
        answers: &[],
        steps: &[(500, Step::Touch("a")), (2000, Step::Lead(true))],
        want: &[("a", 2000), ("b", 2000)],
        want_errors: 0,
    },
    Case {
        name: "losing the lease stops writes, even a retry that was due",
        keys: &["a"],
        leading: true,
        unsynced: false,
        answers: &[("a", &[Answer::Fail])],
        steps: &[
            (100, Step::Lead(false)),
            (1000, Step::Touch("a")),
            (3000, Step::Lead(true)),
        ],
        want: &[("a", 0), ("a", 3000)],
        want_errors: 1,
    },
    Case {
        name: "nothing is reconciled before every kind synced; the resync brings every key",
        keys: &["a", "b"],
        leading: true,
        unsynced: true,
        answers: &[],
        steps: &[(500, Step::Touch("a")), (2000, Step::Synced)],
        want: &[("a", 2000), ("b", 2000)],
        want_errors: 0,
    },
];

#[tokio::test(start_paused = true)]
async fn the_runner_policy() {
    let mut failures = Vec::new();
    for case in CASES {
        let (calls, errors) = run(case).await;
        let want: Vec<(String, u64)> = case.want.iter().map(|(k, ms)| (k.to_string(), *ms)).collect();
        if calls != want || errors != case.want_errors {
            failures.push(format!(
                "{}:\n  reconciles {calls:?}\n  wanted     {want:?}\n  errors {errors}, wanted {}",
                case.name, case.want_errors
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing case(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A controller that only reads runs on every replica, synced or not.
#[tokio::test(start_paused = true)]
async fn a_reading_controller_runs_on_every_replica() {
    let state = ClusterState::new(ClusterIndex::new("cluster.local"), [fence("a")]);
    state.await_sync([Kind::Service]);
    let calls = Arc::new(Mutex::new(Vec::new()));
    let reconciler = Scripted {
        state: state.clone(),
        answers: HashMap::new(),
        calls: calls.clone(),
        started: Instant::now(),
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        Runner::new(reconciler, state.clone(), Gate::EveryReplica, &Metrics::default()).run(stop.clone()),
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    state.changed(Change::Fence(ObjectKey::new("default", "a")));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    task.await.unwrap();
    let keys: BTreeSet<_> = calls.lock().unwrap().iter().cloned().collect();
    assert_eq!(keys, [("a".to_string(), 0), ("a".to_string(), 150)].into());
}

/// Dropping the Lease's sender (the lease task ended) ends the runner.
#[tokio::test(start_paused = true)]
async fn the_runner_ends_with_the_lease_task() {
    let state = ClusterState::new(ClusterIndex::new("cluster.local"), []);
    let reconciler = Scripted {
        state: state.clone(),
        answers: HashMap::new(),
        calls: Arc::default(),
        started: Instant::now(),
    };
    let (lead, leader) = watch::channel(true);
    let task = tokio::spawn(
        Runner::new(reconciler, state, Gate::Leader(leader), &Metrics::default())
            .run(CancellationToken::new()),
    );
    drop(lead);
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .unwrap()
        .unwrap();
}
