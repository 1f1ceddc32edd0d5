//! `serve` and the cluster: its client, the watchers that keep the index up to date, and the
//! reconcilers that write to it while this replica leads.

use std::path::Path;

use anyhow::Context as _;

use super::Components;
use crate::cluster::{ClusterState, watch};
use crate::reconcile::autofence::AutoFenceController;
use crate::reconcile::config_sync::ConfigSync;
use crate::reconcile::fallback::FallbackController;
use crate::reconcile::fence::FenceWriter;
use crate::reconcile::fences::{self, FenceController};
use crate::vocab::istio::IstioVersion;

/// Lease duration: how long a follower waits before taking over from a silent leader.
const LEASE_SECONDS: u64 = 15;
/// How long before the lease ends its holder renews it.
const LEASE_GRACE_SECONDS: u64 = 5;

/// Keeps `state` up to date from the cluster and, while this replica leads, reconciles it (the
/// one call site of the watchers and controllers).
pub async fn start(ctx: &mut Components, client: kube::Client, state: ClusterState) -> anyhow::Result<()> {
    start_watching(ctx, client.clone(), state.clone()).await?;
    start_reconciling(ctx, client, state).await
}

/// A client of the cluster: from `--kubeconfig`, else in-cluster when running in a pod, else none.
pub async fn kube_client(kubeconfig: Option<&Path>) -> anyhow::Result<Option<kube::Client>> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
            kube::Config::incluster().context("the in-cluster configuration")?
        }
        None => return Ok(None),
    };
    Ok(Some(
        kube::Client::try_from(config).context("building the Kubernetes client")?,
    ))
}

/// The cluster watchers: keep `state` up to date from `client` until shutdown; readiness task
/// `cluster-index` is done once every kind has been listed (see [`watch::run`]).
async fn start_watching(
    ctx: &mut Components,
    client: kube::Client,
    state: ClusterState,
) -> anyhow::Result<()> {
    let ready = ctx.readiness.register("cluster-index");
    // Before any controller starts: nothing is computed from a kind not listed yet.
    state.await_sync(crate::index::convert::Kind::ALL);
    // The index's own domain, so converted VirtualService hosts match its Service FQDNs.
    let domain = state.index().domain().to_string();
    let shutdown = ctx.shutdown.clone();
    ctx.spawn("cluster watchers", async move {
        watch::run(client, state, domain, ready, shutdown).await;
        Ok(())
    });
    Ok(())
}

/// The reconciler: a Lease elects the one replica that writes (kube-lease-manager; followers
/// keep their state warm and take over within the lease duration), so only the leader's
/// configuration is applied; replicas publish their configuration's digest on the Lease and
/// report one that differs ([`ConfigSync`]). While it leads, the
/// auto-fence controller creates and deletes fences, the fallback controller keeps the
/// `to-global-sidecar` EnvoyFilter and wormhole ports, and the fence controller writes Sidecars
/// and statuses. The lease is released on shutdown.
async fn start_reconciling(
    ctx: &mut Components,
    client: kube::Client,
    state: ClusterState,
) -> anyhow::Result<()> {
    let identity = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| format!("lazyload-{}", std::process::id()));
    // Two lazyloads for two Istio revisions hold one Lease each.
    let lease_name = ctx.config.global.per_revision("lazyload");
    let lease = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &lease_name)
        .with_namespace(ctx.config.global.slime_namespace.clone())
        .with_identity(identity.clone())
        .with_duration(LEASE_SECONDS)
        .with_grace(LEASE_GRACE_SECONDS)
        .build()
        .await
        .context("setting up the leader lease")?;
    let (leader, lease_task) = lease.watch().await;
    let config_sync = ConfigSync::new(
        client.clone(),
        &ctx.config.global.slime_namespace,
        &lease_name,
        &identity,
        &ctx.config,
        &mut ctx.registry,
    );
    let (lead, shutdown) = (leader.clone(), ctx.shutdown.clone());
    ctx.spawn("configuration comparison", async move {
        config_sync.run(lead, shutdown).await;
        Ok(())
    });
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: "lazyload".into(),
            instance: Some(identity),
        },
    );
    let autofence = AutoFenceController::new(
        state.clone(),
        ctx.config.clone(),
        client.clone(),
        &mut ctx.registry,
    );
    let (lead, shutdown) = (leader.clone(), ctx.shutdown.clone());
    ctx.spawn("auto-fence controller", async move {
        autofence.run(lead, shutdown).await;
        Ok(())
    });
    let fallback = FallbackController::new(state.clone(), ctx.config.clone(), client.clone());
    let (lead, shutdown) = (leader.clone(), ctx.shutdown.clone());
    ctx.spawn("fallback controller", async move {
        fallback.run(lead, shutdown).await;
        Ok(())
    });
    let controller = FenceController::new(
        state,
        ctx.config.clone(),
        FenceWriter::new(client, IstioVersion::default()),
        Some(recorder),
        fences::Metrics::register(&mut ctx.registry),
    );
    let shutdown = ctx.shutdown.clone();
    ctx.spawn("fence controller", async move {
        controller.run(leader, shutdown).await;
        Ok(())
    });
    // The controller dropped its receiver: the lease task releases the lease and ends.
    ctx.spawn("leader lease", async move {
        lease_task.await?.context("the leader lease")?;
        Ok(())
    });
    Ok(())
}
