//! The one writer of `ServiceFence.status`: the fence controller's evaluations, the learner's
//! edges and Prometheus results, and the condition on a fence lazyload cannot read all go
//! through [`FenceStatusWriter`], which also reads the live fence it merges into; and
//! [`list_fences`], the read of every fence at start.
//!
//! A status is written as a JSON merge patch of the status subresource, and only when it
//! changed; map keys that went away are sent as `null`, so keys another replica added in the
//! meantime (learned dependencies) survive.

use jiff::Timestamp;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams};
use kube::core::ApiResource;
use kube::{Api, Client};
use serde_json::{Map, Value, json};

use super::{Error, FIELD_MANAGER, Result, Write, with_retries};
use crate::index::convert::{Kind, Rejection, service_fence};
use crate::vocab::ObjectKey;
use crate::vocab::fence::{ServiceFence, ServiceFenceStatus};

/// Condition type lazyload sets on a ServiceFence it cannot read (status `False`, reason
/// [`REASON_UNREADABLE`], the message says which field and why): the fence is skipped, no Sidecar
/// is written or changed for it, until it is fixed.
pub const CONDITION_ACCEPTED: &str = "Accepted";
/// Reason of the [`CONDITION_ACCEPTED`] condition on a fence lazyload cannot read.
pub const REASON_UNREADABLE: &str = "Unreadable";

/// The merge patch that turns `old` into `new` (`null` for keys that went away).
pub fn status_patch(
    old: &ServiceFenceStatus,
    new: &ServiceFenceStatus,
) -> Result<Option<Value>, serde_json::Error> {
    let old = serde_json::to_value(old)?;
    let new = serde_json::to_value(new)?;
    Ok((old != new).then(|| json!({ "status": diff(&old, &new) })))
}

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

/// Writes ServiceFence statuses (merge patches of the status subresource).
#[derive(Clone)]
pub struct FenceStatusWriter {
    client: Client,
}

impl FenceStatusWriter {
    /// A writer using `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// Reads the live fence `key`: `None` when there is none, else the fence or why lazyload
    /// cannot read it. Read raw and converted here: kube's typed read of an unreadable fence
    /// would log the whole object at every call.
    pub async fn read(
        &self,
        key: &ObjectKey,
    ) -> kube::Result<Option<std::result::Result<ServiceFence, Rejection>>> {
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &key.namespace,
            &Kind::ServiceFence.api_resource(),
        );
        Ok(api.get_opt(&key.name).await?.map(fence_of))
    }

    /// Writes `status` on `fence` when it differs from the fence's current status.
    pub async fn sync_status(&self, fence: &ServiceFence, status: &ServiceFenceStatus) -> Result<Write> {
        let key = ObjectKey::of_or_empty(&fence.metadata);
        let current = fence.status.clone().unwrap_or_default();
        let patch = status_patch(&current, status).map_err(|source| Error::Serialize {
            object: key.to_string(),
            source,
        })?;
        match patch {
            Some(patch) => self.patch_status(&key, &patch, "patch ServiceFence status").await,
            None => Ok(Write::Unchanged),
        }
    }

    /// Says on a fence lazyload cannot read (`raw`) why it is skipped ([`rejection_patch`]),
    /// unless it already says so.
    pub async fn report_rejected(&self, key: &ObjectKey, raw: &Value, message: &str) -> Result<Write> {
        match rejection_patch(raw, message, Timestamp::now()) {
            Some(patch) => {
                self.patch_status(key, &patch, "report an unreadable ServiceFence")
                    .await
            }
            None => Ok(Write::Unchanged),
        }
    }

    /// Merge-patches the status subresource of the fence `key`. The fence is patched as raw
    /// JSON: the answer of a fence that does not fit the types must not fail the write.
    async fn patch_status(&self, key: &ObjectKey, patch: &Value, action: &'static str) -> Result<Write> {
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &key.namespace,
            &ApiResource::erase::<ServiceFence>(&()),
        );
        let params = PatchParams::apply(FIELD_MANAGER);
        let patch = Patch::Merge(patch);
        with_retries(|| api.patch_status(&key.name, &params, &patch))
            .await
            .map_err(|source| Error::Kube {
                action,
                object: key.to_string(),
                source,
            })?;
        Ok(Write::Written)
    }
}

/// Reads every ServiceFence of the cluster (the learner is then seeded from them). Listed raw and
/// converted one at a time: a fence lazyload cannot read is skipped with a warning (the watcher
/// reports it on the fence), not a reason to stop.
pub async fn list_fences(client: Client) -> kube::Result<Vec<ServiceFence>> {
    let api: Api<DynamicObject> = Api::all_with(client, &Kind::ServiceFence.api_resource());
    let mut fences = Vec::new();
    for object in api.list(&ListParams::default()).await?.items {
        match fence_of(object) {
            Ok(fence) => fences.push(fence),
            Err(rejection) => tracing::warn!("{rejection}"),
        }
    }
    Ok(fences)
}

/// A raw ServiceFence as lazyload's type, or why it cannot be.
fn fence_of(object: DynamicObject) -> std::result::Result<ServiceFence, Rejection> {
    service_fence(serde_json::to_value(object).unwrap_or_default())
}
