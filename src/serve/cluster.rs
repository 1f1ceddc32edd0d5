//! `serve` and the cluster: its client, the watchers that keep the index up to date, and the
//! reconcilers that write to it while this replica leads.

use std::path::Path;

use anyhow::Context as _;

use super::Components;
use crate::cluster::{ClusterState, watch};

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
    let (config, shutdown) = (ctx.config.clone(), ctx.shutdown.clone());
    let tasks =
        crate::reconcile::controllers(client, &state, &config, &identity, &mut ctx.registry, &shutdown)
            .await?;
    for (name, task) in tasks {
        ctx.spawn(name, async move { Ok(task.await?) });
    }
    Ok(())
}
