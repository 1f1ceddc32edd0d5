//! Writing a fence's Sidecar and status.
//!
//! The Sidecar is written by server-side apply (field manager `lazyload`, forced: lazyload owns
//! the fields it writes), owned by the fence, and only when the live object differs in a field
//! lazyload owns. The status is written as a JSON merge patch of the status subresource, and only
//! when it changed; map keys that went away are sent as `null`, so keys another replica added in
//! the meantime (learned dependencies) survive.

use jiff::Timestamp;
use kube::Api;
use kube::Client;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::ApiResource;
use serde_json::{Map, Value, json};

use super::{Error, FIELD_MANAGER, Result, with_retries};
use crate::model::sidecar::NoSidecar;
use crate::vocab::ObjectKey;
use crate::vocab::fence::{ServiceFence, ServiceFenceStatus};
use crate::vocab::istio::{IstioKind, IstioVersion, Sidecar};

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

/// Writes Sidecars and fence statuses.
#[derive(Clone)]
pub struct FenceWriter {
    client: Client,
    version: IstioVersion,
}

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

/// The merge patch that turns `old` into `new` (`null` for keys that went away).
pub fn status_patch(
    old: &ServiceFenceStatus,
    new: &ServiceFenceStatus,
) -> Result<Option<Value>, serde_json::Error> {
    let old = serde_json::to_value(old)?;
    let new = serde_json::to_value(new)?;
    Ok((old != new).then(|| serde_json::json!({ "status": diff(&old, &new) })))
}

/// Condition type lazyload sets on a ServiceFence it cannot read (status `False`, reason
/// [`REASON_UNREADABLE`], the message says which field and why): the fence is skipped, no Sidecar
/// is written or changed for it, until it is fixed.
pub const CONDITION_ACCEPTED: &str = "Accepted";
/// Reason of the [`CONDITION_ACCEPTED`] condition on a fence lazyload cannot read.
pub const REASON_UNREADABLE: &str = "Unreadable";

/// The status merge patch that reports a fence lazyload cannot read (`raw`, as the API server
/// holds it) on the fence itself; `None` when it already says so. The fence's other conditions
/// are kept (a merge patch replaces the whole list).
pub fn rejection_patch(raw: &Value, message: &str, now: Timestamp) -> Option<Value> {
    let existing = raw
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ours = |c: &Value| c.get("type").and_then(Value::as_str) == Some(CONDITION_ACCEPTED);
    let reported = existing.iter().any(|c| {
        ours(c)
            && c.get("status").and_then(Value::as_str) == Some("False")
            && c.get("message").and_then(Value::as_str) == Some(message)
    });
    if reported {
        return None;
    }
    let mut conditions: Vec<Value> = existing
        .into_iter()
        .filter(|c| c.is_object() && !ours(c))
        .collect();
    let mut condition = json!({
        "type": CONDITION_ACCEPTED,
        "status": "False",
        "reason": REASON_UNREADABLE,
        "message": message,
        "lastTransitionTime": now.to_string(),
    });
    if let Some(generation) = raw.pointer("/metadata/generation").and_then(Value::as_i64) {
        condition["observedGeneration"] = generation.into();
    }
    conditions.push(condition);
    Some(json!({"status": {"conditions": conditions}}))
}

/// Merge-patch diff of two JSON values: objects key by key, anything else replaced.
fn diff(old: &Value, new: &Value) -> Value {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut out = Map::new();
            for (k, nv) in n {
                match o.get(k) {
                    Some(ov) if ov == nv => {}
                    Some(ov) => {
                        out.insert(k.clone(), diff(ov, nv));
                    }
                    None => {
                        out.insert(k.clone(), nv.clone());
                    }
                }
            }
            for k in o.keys().filter(|k| !n.contains_key(*k)) {
                out.insert(k.clone(), Value::Null);
            }
            Value::Object(out)
        }
        (_, n) => n.clone(),
    }
}

impl FenceWriter {
    /// A writer that writes Sidecars at `version`.
    pub fn new(client: Client, version: IstioVersion) -> Self {
        Self { client, version }
    }

    /// The API version Sidecars are written at.
    pub fn version(&self) -> IstioVersion {
        self.version
    }

    fn sidecars(&self, namespace: &str) -> Api<Sidecar> {
        Api::namespaced_with(
            self.client.clone(),
            namespace,
            &self.version.resource(IstioKind::Sidecar),
        )
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
        let object = format!("{namespace}/{name}");
        let api = self.sidecars(&namespace);
        match desired {
            Ok(sidecar) => {
                if live.is_some_and(|l| sidecar_up_to_date(sidecar, l)) {
                    return Ok(Write::Unchanged);
                }
                let params = PatchParams::apply(FIELD_MANAGER).force();
                let patch = Patch::Apply(sidecar);
                with_retries(|| api.patch(&name, &params, &patch))
                    .await
                    .map_err(|source| Error::Kube {
                        action: "apply Sidecar",
                        object,
                        source,
                    })?;
                Ok(Write::Written)
            }
            Err(_) => match live {
                Some(l) if owned_by(l, fence) => {
                    let params = DeleteParams::default();
                    match with_retries(|| api.delete(&name, &params)).await {
                        Ok(_) => Ok(Write::Deleted),
                        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Write::Unchanged),
                        Err(source) => Err(Error::Kube {
                            action: "delete Sidecar",
                            object,
                            source,
                        }),
                    }
                }
                _ => Ok(Write::Unchanged),
            },
        }
    }

    /// Writes the fence's new status when it differs from the current one.
    pub async fn sync_status(&self, fence: &ServiceFence, status: &ServiceFenceStatus) -> Result<Write> {
        let namespace = fence.metadata.namespace.clone().unwrap_or_default();
        let name = fence.metadata.name.clone().unwrap_or_default();
        let object = format!("{namespace}/{name}");
        let current = fence.status.clone().unwrap_or_default();
        let Some(patch) = status_patch(&current, status).map_err(|source| Error::Serialize {
            object: object.clone(),
            source,
        })?
        else {
            return Ok(Write::Unchanged);
        };
        let api: Api<ServiceFence> = Api::namespaced(self.client.clone(), &namespace);
        let params = PatchParams::apply(FIELD_MANAGER);
        let patch = Patch::Merge(&patch);
        with_retries(|| api.patch_status(&name, &params, &patch))
            .await
            .map_err(|source| Error::Kube {
                action: "patch ServiceFence status",
                object,
                source,
            })?;
        Ok(Write::Written)
    }

    /// Says on a fence lazyload cannot read (`raw`) why it is skipped ([`rejection_patch`]),
    /// unless it already says so. The fence is patched as raw JSON: it does not fit the types.
    pub async fn report_rejected(&self, key: &ObjectKey, raw: &Value, message: &str) -> Result<Write> {
        let Some(patch) = rejection_patch(raw, message, Timestamp::now()) else {
            return Ok(Write::Unchanged);
        };
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &key.namespace,
            &ApiResource::erase::<ServiceFence>(&()),
        );
        let params = PatchParams::apply(FIELD_MANAGER);
        let patch = Patch::Merge(&patch);
        with_retries(|| api.patch_status(&key.name, &params, &patch))
            .await
            .map_err(|source| Error::Kube {
                action: "report an unreadable ServiceFence",
                object: key.to_string(),
                source,
            })?;
        Ok(Write::Written)
    }
}

#[cfg(test)]
mod tests;
