//! The A8 watchdog: tells the operator, loudly, when a Sidecar lazyload does not own scopes a
//! global-sidecar ([`crate::model::scope`]). It writes nothing: the Sidecar is the user's, and
//! the fix (import `*/*`, or give the global-sidecar's namespace its own open default) is theirs
//! to choose. Runs on every replica (the runner's [`Gate::EveryReplica`]), so each one's
//! `/metrics` shows it. Its one key ([`GLOBAL_SIDECARS`]) is checked at the start and
//! [`DEBOUNCE`] after a change that may matter.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::runner::{self, Action, Gate, Reconciler, Runner, Singleton, Trigger};
use crate::cluster::{Change, ClusterState};
use crate::config::Config;
use crate::model::scope::{Scoped, global_sidecar_namespaces, scoped_global_sidecars};
use crate::vocab::GLOBAL_SIDECAR;

/// How long after a change the check runs (pods change often; one check covers a burst).
const DEBOUNCE: Duration = Duration::from_secs(1);

/// Watches the cluster's Sidecars for ones that scope a global-sidecar.
pub struct ScopeCheck {
    state: ClusterState,
    config: Arc<Config>,
    scoped: Gauge,
    /// What the last check found (reported when it changes).
    found: Vec<Scoped>,
    /// The namespaces whose Sidecars can scope a global-sidecar: theirs and Istio's root.
    watched: BTreeSet<String>,
}

impl ScopeCheck {
    /// A check over `state`; registers `lazyload_global_sidecar_scoped` in `registry`.
    pub fn new(state: ClusterState, config: Arc<Config>, registry: &mut Registry) -> Self {
        let scoped = Gauge::default();
        registry.register(
            "global_sidecar_scoped",
            "Global-sidecars scoped by a Sidecar that does not import */* (should be 0; see the log)",
            scoped.clone(),
        );
        let mut watched: BTreeSet<String> = global_sidecar_namespaces(&config).into_iter().collect();
        watched.insert(config.global.istio_namespace.clone());
        Self {
            state,
            config,
            scoped,
            found: Vec::new(),
            watched,
        }
    }

    /// Checks now and after changes that may matter (at most once per [`DEBOUNCE`]), until
    /// `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let state = self.state.clone();
        Runner::new(self, state, Gate::EveryReplica, &runner::Metrics::default())
            .run(shutdown)
            .await;
    }

    /// Looks at the Sidecars as they are now; logs what started or stopped scoping a
    /// global-sidecar and sets the gauge.
    fn check(&mut self) {
        let sidecars = self.state.other_sidecars();
        let found = scoped_global_sidecars(&self.config, &self.state.index(), &sidecars);
        for s in found.iter().filter(|s| !self.found.contains(s)) {
            tracing::error!(sidecar = %s.sidecar, namespace = %s.global_sidecar_namespace, "{s}");
        }
        for s in self.found.iter().filter(|s| !found.contains(s)) {
            tracing::info!(
                sidecar = %s.sidecar,
                namespace = %s.global_sidecar_namespace,
                "the global-sidecar is no longer scoped by this Sidecar"
            );
        }
        self.scoped.set(found.len() as i64);
        self.found = found;
    }
}

/// The scope check's one key: every global-sidecar.
pub const GLOBAL_SIDECARS: Singleton = Singleton("global-sidecars");

impl Reconciler for ScopeCheck {
    type Key = Singleton;
    const NAME: &'static str = "scope";

    fn all_keys(&self) -> Vec<Singleton> {
        vec![GLOBAL_SIDECARS]
    }

    fn triggers(&self, change: &Change) -> Trigger<Singleton> {
        let matters = match change {
            // Sidecars where one can apply to a global-sidecar, or which pods are the
            // global-sidecar's (its Service, its pods).
            Change::Sidecar(key) => self.watched.contains(&key.namespace),
            Change::Service(key) => key.name == GLOBAL_SIDECAR && self.watched.contains(&key.namespace),
            Change::Pods | Change::Resync => true,
            Change::Namespace(_) | Change::Routing | Change::Fence(_) => false,
        };
        if matters {
            Trigger::Keys(vec![GLOBAL_SIDECARS], DEBOUNCE)
        } else {
            Trigger::Nothing
        }
    }

    async fn reconcile(&mut self, _: &Singleton) -> super::Result<Action> {
        self.check();
        Ok(Action::done())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::ClusterIndex;
    use crate::testing::eventually_sync;
    use crate::vocab::ObjectKey;
    use crate::vocab::istio::{EgressListener, IstioKind, IstioVersion, Sidecar, SidecarSpec};

    fn mesh_default(hosts: &[&str]) -> Sidecar {
        let mut s = Sidecar::new(
            "default",
            &IstioVersion::default().resource(IstioKind::Sidecar),
            SidecarSpec {
                egress: vec![EgressListener {
                    hosts: hosts.iter().map(|h| h.to_string()).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        s.metadata.namespace = Some("istio-system".into());
        s
    }

    fn metrics(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    #[tokio::test(start_paused = true)]
    async fn reports_a_scoping_sidecar_until_it_is_fixed() {
        let state = ClusterState::new(ClusterIndex::new("cluster.local"), []);
        let config = Arc::new(Config::parse("").unwrap().config);
        let mut registry = Registry::with_prefix("lazyload");
        let key = ObjectKey::new("istio-system", "default");
        state.set_other_sidecar(key.clone(), Some(mesh_default(&["./*", "istio-system/*"])));
        let check = ScopeCheck::new(state.clone(), config, &mut registry);
        let stop = CancellationToken::new();
        let task = tokio::spawn(check.run(stop.clone()));
        let gauge = |registry: &Registry| {
            metrics(registry)
                .lines()
                .find(|l| l.starts_with("lazyload_global_sidecar_scoped "))
                .map(str::to_string)
        };
        let wait_for = async |want: &str| {
            eventually_sync(want, std::time::Duration::from_secs(5), || {
                let seen = gauge(&registry);
                (seen.as_deref() == Some(want)).then_some(()).ok_or(seen)
            })
            .await
        };
        wait_for("lazyload_global_sidecar_scoped 1").await;

        // The operator opens the mesh default: the next Sidecar change clears it.
        state.set_other_sidecar(key.clone(), Some(mesh_default(&["*/*"])));
        state.changed(Change::Sidecar(key));
        wait_for("lazyload_global_sidecar_scoped 0").await;
        stop.cancel();
        task.await.unwrap();
    }
}
