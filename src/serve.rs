//! `lazyload serve`: runs the enabled components in one process until SIGTERM or Ctrl-C.
//!
//! - [`options`]: the flags, and the plain [`Options`] they become (the demo builds these).
//! - `learning`: the cluster index, the learner, the edges' way to the fences, the collector.
//! - `cluster`: the cluster client, its watchers and reconcilers.
//! - `relay`: the xDS relay's listeners.
//! - `shutdown`: signals, and draining the components.

mod cluster;
mod learning;
pub mod options;
mod relay;
mod shutdown;

use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::config::Config;
use crate::readiness::Readiness;
use crate::telemetry;

pub use options::{AlsTrust, Options, RelayArgs, RelayOptions, ServeArgs, TlsFiles};
pub use shutdown::shutdown_signal;

/// What the components share while they start.
pub struct Components {
    /// The configuration.
    pub config: Arc<Config>,
    /// Cancelled when the process shuts down.
    pub shutdown: CancellationToken,
    /// Metrics registry (read by `/metrics`).
    pub registry: Registry,
    /// Readiness tasks (read by `/readyz`).
    pub readiness: Readiness,
    /// Debug routes (merged into the admin router).
    pub debug: Router,
    /// Running components, by name.
    pub tasks: shutdown::Tasks,
}

impl Components {
    /// Runs a component until it returns; its name is logged if it fails.
    pub fn spawn<F>(&mut self, name: &'static str, fut: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.tasks.spawn(async move { (name, fut.await) });
    }
}

/// Runs lazyload until a signal arrives or a component fails.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let options = Options::from(args);
    let loaded = crate::inputs::config(options.config.as_deref())?;
    telemetry::init(&loaded.config.global.log, options.log_format)?;
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    run_until(options, loaded.config, shutdown_signal()).await
}

/// Runs lazyload with `config` (logging already set up) until `stop` completes, with the reason
/// it gives, or a component fails; then drains the components.
pub async fn run_until(
    options: Options,
    config: Config,
    stop: impl Future<Output = &'static str>,
) -> anyhow::Result<()> {
    options.check()?;
    let admin_addr = match options.admin_listen {
        Some(a) => a,
        None => config
            .misc_address("aux-addr")
            .and_then(|a| a.parse().ok())
            .context("global.misc.aux-addr is not an address")?,
    };
    let mut ctx = Components {
        config: Arc::new(config),
        shutdown: CancellationToken::new(),
        registry: Registry::with_prefix(crate::metrics::PREFIX),
        readiness: Readiness::default(),
        debug: Router::new(),
        tasks: JoinSet::new(),
    };
    learning::start_learning(&mut ctx, &options).await?;
    if let Some(upstream) = &options.relay.upstream {
        relay::start_relay(&mut ctx, &options.relay, upstream).await?;
    }
    start_admin(&mut ctx, admin_addr).await?;
    let mut tasks = ctx.tasks;
    let failure = shutdown::first_end(&mut tasks, stop).await;
    ctx.shutdown.cancel();
    shutdown::drain(tasks).await;
    failure.map_or(Ok(()), Err)
}

/// The admin endpoint on `addr`: `/metrics`, `/healthz`, `/readyz` and the debug routes the
/// components added (it takes the registry and the routes).
async fn start_admin(ctx: &mut Components, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let listener = admin::bind(addr)
        .await
        .with_context(|| format!("binding the admin address {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "admin listening");
    let app = admin::router(
        Arc::new(std::mem::take(&mut ctx.registry)),
        ctx.readiness.clone(),
        std::mem::take(&mut ctx.debug),
    );
    let shutdown = ctx.shutdown.clone();
    ctx.spawn("admin", async move {
        admin::serve(listener, app, shutdown).await.map_err(Into::into)
    });
    Ok(())
}
