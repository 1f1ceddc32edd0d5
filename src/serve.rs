//! `lazyload serve`: runs the enabled components in one process until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::config::Config;
use crate::readiness::Readiness;
use crate::telemetry::{self, LogFormat};

/// How long components get to finish after shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags of `lazyload serve` (each also read from an environment variable).
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file: a SlimeBoot lazyload module entry, or a whole SlimeBoot.
    #[arg(short, long, env = "LAZYLOAD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Admin HTTP address (`/metrics`, `/healthz`, `/readyz`, `/debug/...`);
    /// default: `global.misc.aux-addr` (`:8081`).
    #[arg(long, env = "LAZYLOAD_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, env = "LAZYLOAD_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

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
    pub tasks: JoinSet<(&'static str, anyhow::Result<()>)>,
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
    let loaded = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::parse("")?,
    };
    telemetry::init(&loaded.config.global.log.log_level, args.log_format)?;
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    let admin_addr = match args.admin_listen {
        Some(a) => a,
        None => loaded
            .config
            .misc_address("aux-addr")
            .and_then(|a| a.parse().ok())
            .context("global.misc.aux-addr is not an address")?,
    };

    let mut ctx = Components {
        config: Arc::new(loaded.config),
        shutdown: CancellationToken::new(),
        registry: Registry::with_prefix("lazyload"),
        readiness: Readiness::default(),
        debug: Router::new(),
        tasks: JoinSet::new(),
    };

    let listener = admin::bind(admin_addr)
        .await
        .with_context(|| format!("binding the admin address {admin_addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "admin listening");
    let app = admin::router(
        Arc::new(std::mem::take(&mut ctx.registry)),
        ctx.readiness.clone(),
        ctx.debug,
    );
    let shutdown = ctx.shutdown.clone();
    let mut tasks = ctx.tasks;
    tasks.spawn(async move {
        (
            "admin",
            admin::serve(listener, app, shutdown).await.map_err(Into::into),
        )
    });

    let failure = tokio::select! {
        signal = shutdown_signal() => {
            tracing::info!("{signal}: shutting down");
            None
        }
        Some(done) = tasks.join_next() => Some(match done {
            Ok((name, Ok(()))) => anyhow::anyhow!("{name} stopped unexpectedly"),
            Ok((name, Err(e))) => e.context(format!("{name} failed")),
            Err(e) => anyhow::anyhow!("a component panicked: {e}"),
        }),
    };
    ctx.shutdown.cancel();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(done) = tasks.join_next().await {
            if let Ok((name, Err(e))) = done {
                tracing::warn!("{name} ended with an error during shutdown: {e:#}");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("components did not stop within {DRAIN_TIMEOUT:?}; exiting anyway");
    }
    failure.map_or(Ok(()), Err)
}

async fn shutdown_signal() -> &'static str {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return "interrupt";
            }
        };
        tokio::select! {
            _ = ctrl_c => "interrupt",
            _ = term.recv() => "SIGTERM",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
        "interrupt"
    }
}
