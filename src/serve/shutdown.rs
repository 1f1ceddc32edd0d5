//! How `serve` stops: on a signal, or when a component fails; then every component gets
//! [`DRAIN_TIMEOUT`] to finish.

use std::time::Duration;

use tokio::task::JoinSet;

/// How long components get to finish after shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The running components, each returning its name with its outcome.
pub type Tasks = JoinSet<(&'static str, anyhow::Result<()>)>;

/// Waits until `stop` completes (logging the reason it gives) or a component ends; the failure
/// when a component ended (any end is one: components run until shutdown).
pub async fn first_end(tasks: &mut Tasks, stop: impl Future<Output = &'static str>) -> Option<anyhow::Error> {
    tokio::select! {
        reason = stop => {
            tracing::info!("{reason}: shutting down");
            None
        }
        Some(done) = tasks.join_next() => Some(match done {
            Ok((name, Ok(()))) => anyhow::anyhow!("{name} stopped unexpectedly"),
            Ok((name, Err(e))) => e.context(format!("{name} failed")),
            Err(e) => anyhow::anyhow!("a component panicked: {e}"),
        }),
    }
}

/// Waits up to [`DRAIN_TIMEOUT`] for the (cancelled) components to end, logging their errors.
pub async fn drain(mut tasks: Tasks) {
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
}

/// Waits for SIGTERM or an interrupt; names which came.
pub async fn shutdown_signal() -> &'static str {
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
