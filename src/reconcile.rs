//! The Kubernetes side of lazyload: writing what the model decides. Everything here is thin:
//! decisions come from [`crate::model`], and these functions only compare with what is live and
//! issue as few writes as possible (istiod recomputes scopes on every Sidecar change).

pub mod autofence;
pub mod config_sync;
pub mod fallback;
pub mod fence;
pub mod fences;
pub mod queue;
pub mod scope;

use std::time::Duration;

/// Field manager of every object lazyload writes (server-side apply).
pub const FIELD_MANAGER: &str = "lazyload";

/// `Result` alias for reconciler writes.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed, after retries where retrying made sense.
    #[error("{action} {object}: {source}")]
    Kube {
        /// What was attempted (`apply Sidecar`, ...).
        action: &'static str,
        /// `namespace/name`.
        object: String,
        /// The API error.
        source: kube::Error,
    },
    /// An object could not be serialised.
    #[error("serialising {object}: {source}")]
    Serialize {
        /// `namespace/name`.
        object: String,
        /// The error.
        source: serde_json::Error,
    },
}

/// How often a write is tried when the API server answers 409, 429 or 5xx.
const ATTEMPTS: u32 = 5;

/// Whether an API error is worth retrying: a conflict, throttling, or a server-side failure.
pub fn retryable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => status.code == 409 || status.code == 429 || status.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// Runs `op` until it succeeds, fails for good, or [`ATTEMPTS`] tries fail retryably (with
/// exponential backoff from 50 ms).
pub async fn with_retries<T, F, Fut>(mut op: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut delay = Duration::from_millis(50);
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if attempt < ATTEMPTS && retryable(&e) => {
                tracing::debug!(attempt, ?delay, "retrying: {e}");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            other => return other,
        }
    }
}
