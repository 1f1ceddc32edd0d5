//! Writing a fence's Sidecar: by server-side apply (field manager `lazyload`, forced: lazyload
//! owns the fields it writes), owned by the fence, and only when the live object differs in a
//! field lazyload owns.

use kube::api::DeleteParams;
use kube::{Api, Client};

use super::{FenceStatusWriter, Result, Write, apply, outcome, with_retries};
use crate::model::sidecar::NoSidecar;
use crate::vocab::fence::ServiceFence;
use crate::vocab::istio::{IstioKind, IstioVersion, Sidecar};

/// Whether the live Sidecar already has every field lazyload owns as desired.
pub fn sidecar_up_to_date(desired: &Sidecar, live: &Sidecar) -> bool {
    let label = |s: &Sidecar| s.metadata.labels.clone().unwrap_or_default();
    let owners_ok = desired.metadata.owner_references.iter().flatten().all(|want| {
        live.metadata
            .owner_references
            .iter()
            .flatten()
            .any(|have| have.uid == want.uid && have.controller == want.controller)
    });
    desired.spec.egress == live.spec.egress
        && desired.spec.workload_selector == live.spec.workload_selector
        && label(desired).iter().all(|(k, v)| label(live).get(k) == Some(v))
        && owners_ok
}

/// Whether a live Sidecar belongs to the fence (its controller owner reference).
pub fn owned_by(sidecar: &Sidecar, fence: &ServiceFence) -> bool {
    let Some(uid) = fence.metadata.uid.as_deref() else {
        return false;
    };
    sidecar
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

/// Writes what the fence controller writes: a fence's Sidecar, and its status through the one
/// [`FenceStatusWriter`].
#[derive(Clone)]
pub struct FenceWriter {
    client: Client,
    version: IstioVersion,
    status: FenceStatusWriter,
}

impl FenceWriter {
    /// A writer that writes Sidecars at `version`.
    pub fn new(client: Client, version: IstioVersion) -> Self {
        Self {
            status: FenceStatusWriter::new(client.clone()),
            client,
            version,
        }
    }

    /// The API version Sidecars are written at.
    pub fn version(&self) -> IstioVersion {
        self.version
    }

    /// The fence status writer.
    pub fn status(&self) -> &FenceStatusWriter {
        &self.status
    }

    /// Makes the cluster hold the desired Sidecar of `fence`, or none of its own when the model
    /// says there should be none. `live` is the Sidecar of the same name, if any.
    pub async fn sync_sidecar(
        &self,
        fence: &ServiceFence,
        desired: &Result<Sidecar, NoSidecar>,
        live: Option<&Sidecar>,
    ) -> Result<Write> {
        let namespace = fence.metadata.namespace.clone().unwrap_or_default();
        let name = fence.metadata.name.clone().unwrap_or_default();
        let api: Api<Sidecar> = Api::namespaced_with(
            self.client.clone(),
            &namespace,
            &self.version.resource(IstioKind::Sidecar),
        );
        match (desired, live) {
            (Ok(sidecar), Some(l)) if sidecar_up_to_date(sidecar, l) => Ok(Write::Unchanged),
            (Ok(sidecar), _) => {
                apply(&api, sidecar, "apply Sidecar").await?;
                Ok(Write::Written)
            }
            (Err(_), Some(l)) if owned_by(l, fence) => {
                let params = DeleteParams::default();
                let deleted = with_retries(|| api.delete(&name, &params)).await;
                outcome(deleted, Write::Deleted, 404, "delete Sidecar", || {
                    format!("{namespace}/{name}")
                })
            }
            (Err(_), _) => Ok(Write::Unchanged),
        }
    }
}
