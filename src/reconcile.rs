//! The controllers: what lazyload decides to write, and when. Each is a small
//! [`runner::Reconciler`] (what triggers it, and `reconcile(key)`) run by the one
//! [`runner::Runner`], which owns leader gating, the debounced queue, requeues, backoff and the
//! error metric. Decisions come from [`crate::model`]; every API write goes through
//! [`crate::cluster::writer`].
//!
//! [`controllers`] is the one entry point: it takes the Lease and hands back every controller as
//! a task for the caller to run.

pub mod autofence;
pub mod config_sync;
pub mod fallback;
pub mod fences;
pub mod queue;
pub mod runner;
pub mod scope;

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::autofence::AutoFenceController;
use self::config_sync::ConfigSync;
use self::fallback::FallbackController;
use self::fences::FenceController;
use self::runner::{Gate, Runner};
use crate::cluster::ClusterState;
use crate::cluster::writer::{AutoFenceWriter, FallbackWriter, FenceWriter};
use crate::config::Config;
use crate::vocab::istio::IstioVersion;

/// `Result` of a reconcile: every failure is a failed write.
type Result<T, E = crate::cluster::writer::Error> = std::result::Result<T, E>;

/// Lease duration: how long a follower waits before taking over from a silent leader.
const LEASE_SECONDS: u64 = 15;
/// How long before the lease ends its holder renews it.
const LEASE_GRACE_SECONDS: u64 = 5;

/// Why the controllers could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The leader Lease could not be set up.
    #[error("setting up the leader lease: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    /// The Lease task failed (it releases the Lease on shutdown).
    #[error("the leader lease: {0}")]
    LeaseTask(String),
}

/// A task that runs until shutdown (or until it fails).
pub type Run = BoxFuture<'static, std::result::Result<(), Error>>;

/// A named task for the caller to run (and report by name if it fails).
pub type Task = (&'static str, Run);

/// Everything that writes to the cluster, under one Lease: a Lease (named per Istio revision, in
/// the slime namespace) elects the one replica that writes (followers keep their state warm and
/// take over within the lease duration), so only the leader's configuration is applied; replicas
/// publish their configuration's digest on the Lease and report one that differs
/// ([`ConfigSync`]). While it leads, the auto-fence controller creates and deletes fences, the
/// fallback controller keeps the `to-global-sidecar` EnvoyFilter and wormhole ports, and the
/// fence controller writes Sidecars and statuses. The lease is released on shutdown. `identity`
/// names this replica on the Lease and in Events.
pub async fn controllers(
    client: kube::Client,
    state: &ClusterState,
    config: &Arc<Config>,
    identity: &str,
    registry: &mut Registry,
    shutdown: &CancellationToken,
) -> std::result::Result<Vec<Task>, Error> {
    let (lease_name, leader, lease_task) = lease(client.clone(), config, identity).await?;
    let config_sync = ConfigSync::new(
        client.clone(),
        &config.global.slime_namespace,
        &lease_name,
        identity,
        config,
        registry,
    );
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: "lazyload".into(),
            instance: Some(identity.into()),
        },
    );
    let metrics = runner::Metrics::register(registry);
    let autofence = AutoFenceController::new(
        state.clone(),
        config.clone(),
        AutoFenceWriter::new(client.clone()),
        registry,
    );
    let fallback =
        FallbackController::new(state.clone(), config.clone(), FallbackWriter::new(client.clone()));
    let fences = FenceController::new(
        state.clone(),
        config.clone(),
        FenceWriter::new(client, IstioVersion::default()),
        Some(recorder),
        fences::Metrics::register(registry),
    );
    let gate = || Gate::Leader(leader.clone());
    let tasks: Vec<Task> = vec![
        (
            "configuration comparison",
            unfailing(config_sync.run(leader.clone(), shutdown.clone())),
        ),
        (
            "auto-fence controller",
            unfailing(Runner::new(autofence, state.clone(), gate(), &metrics).run(shutdown.clone())),
        ),
        (
            "fallback controller",
            unfailing(Runner::new(fallback, state.clone(), gate(), &metrics).run(shutdown.clone())),
        ),
        (
            "fence controller",
            unfailing(Runner::new(fences, state.clone(), gate(), &metrics).run(shutdown.clone())),
        ),
        // Once every controller dropped its receiver, the lease task releases the lease and
        // ends.
        ("leader lease", lease_task),
    ];
    Ok(tasks)
}

/// Takes part in the leader election: the Lease's name (one per Istio revision: two
/// lazyloads for two revisions hold one Lease each), whether this replica leads, and the task
/// that keeps the Lease and releases it once every receiver is dropped.
async fn lease(
    client: kube::Client,
    config: &Config,
    identity: &str,
) -> std::result::Result<(String, watch::Receiver<bool>, Run), Error> {
    let lease_name = config.global.per_revision("lazyload");
    let lease = kube_lease_manager::LeaseManagerBuilder::new(client, &lease_name)
        .with_namespace(config.global.slime_namespace.clone())
        .with_identity(identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(LEASE_GRACE_SECONDS)
        .build()
        .await?;
    let (leader, task) = lease.watch().await;
    let task = async move {
        match task.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Error::LeaseTask(e.to_string())),
            Err(e) => Err(Error::LeaseTask(e.to_string())),
        }
    };
    Ok((lease_name, leader, task.boxed()))
}

/// A task that cannot fail.
fn unfailing(
    task: impl Future<Output = ()> + Send + 'static,
) -> BoxFuture<'static, std::result::Result<(), Error>> {
    task.map(Ok).boxed()
}
