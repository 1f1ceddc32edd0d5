//! Every write lazyload makes to the API server, beside the watchers that read it: fence
//! statuses ([`FenceStatusWriter`], the one writer of `ServiceFence.status`, used by the fence
//! controller and by the learner's persistence alike), the fences' Sidecars ([`FenceWriter`]),
//! auto fences ([`AutoFenceWriter`]), the fallback objects ([`FallbackWriter`]), Events
//! ([`EventPublisher`]) and the configuration digests on the leader Lease ([`LeaseAnnotations`]).
//!
//! The controllers in [`crate::reconcile`] decide; these types only compare with what is live
//! and issue as few writes as possible (istiod recomputes scopes on every Sidecar change). Every
//! write names lazyload's field manager and is retried on conflicts, throttling and server
//! errors ([`with_retries`]).

mod events;
mod lease;
mod objects;
mod sidecar;
mod status;

use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};

pub use self::events::EventPublisher;
pub use self::lease::LeaseAnnotations;
pub use self::objects::{AutoFenceWriter, FallbackWriter};
pub use self::sidecar::{FenceWriter, owned_by, sidecar_up_to_date};
pub use self::status::{
    CONDITION_ACCEPTED, FenceStatusWriter, REASON_UNREADABLE, list_fences, rejection_patch, status_patch,
};

/// Field manager of every object lazyload writes (server-side apply).
pub const FIELD_MANAGER: &str = "lazyload";

/// `Result` alias for writes.
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

/// What a sync did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// Nothing: the live object was already right.
    Unchanged,
    /// The object was applied or patched.
    Written,
    /// The object was deleted.
    Deleted,
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

/// What a create or delete did: `done` when it succeeded, [`Write::Unchanged`] when the API
/// server answered `nothing_to_do` (409 for a create: it exists; 404 for a delete: it is gone).
fn outcome<T>(
    result: Result<T, kube::Error>,
    done: Write,
    nothing_to_do: u16,
    action: &'static str,
    object: impl FnOnce() -> String,
) -> Result<Write> {
    match result {
        Ok(_) => Ok(done),
        Err(kube::Error::Api(s)) if s.code == nothing_to_do => Ok(Write::Unchanged),
        Err(source) => Err(Error::Kube {
            action,
            object: object(),
            source,
        }),
    }
}

/// Patches `name` through `api` with retries; `action` and `object` name it in the error.
async fn patch<K>(
    api: &Api<K>,
    name: &str,
    params: &PatchParams,
    patch: &Patch<impl serde::Serialize + std::fmt::Debug>,
    action: &'static str,
    object: String,
) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    with_retries(|| api.patch(name, params, patch))
        .await
        .map_err(|source| Error::Kube {
            action,
            object,
            source,
        })?;
    Ok(())
}

/// Server-side applies `object` (forced: lazyload owns the fields it writes) with retries.
async fn apply<K>(api: &Api<K>, object: &K, action: &'static str) -> Result<()>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let meta = object.meta();
    let (ns, name) = (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    );
    let params = PatchParams::apply(FIELD_MANAGER).force();
    patch(
        api,
        &name,
        &params,
        &Patch::Apply(object),
        action,
        format!("{ns}/{name}"),
    )
    .await
}

#[cfg(test)]
mod tests;
