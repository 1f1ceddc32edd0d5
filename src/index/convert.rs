//! One object at a time, from what the API server (or a snapshot file) holds to lazyload's typed
//! objects.
//!
//! Watches and lists read every kind as raw JSON (kube's `DynamicObject`) and convert each object
//! here, rather than asking kube for typed lists: a typed list fails whole when one item does not
//! fit the types (an Istio VirtualService whose `delegate` has no `name` is valid for Istio), so
//! its kind would never sync, and kube's client logs the whole list body on every retry. Here one
//! such object is a [`Rejection`] naming it and saying why; the rest of its kind is used.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::core::ApiResource;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{Indexed, NamespaceInfo, PodInfo, ServiceEntryInfo, ServiceInfo, VirtualServiceInfo};
use crate::vocab::ObjectKey;
use crate::vocab::fence::ServiceFence;
use crate::vocab::istio::{IstioKind, IstioVersion, ServiceEntry, Sidecar, VirtualService};

/// A kind lazyload reads from the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `v1` Namespace.
    Namespace,
    /// `v1` Service.
    Service,
    /// `v1` Pod.
    Pod,
    /// Istio VirtualService.
    VirtualService,
    /// Istio ServiceEntry.
    ServiceEntry,
    /// Slime ServiceFence.
    ServiceFence,
    /// Istio Sidecar.
    Sidecar,
}

impl Kind {
    /// Every kind, in the order they are watched.
    pub const ALL: [Kind; 7] = [
        Kind::Service,
        Kind::Namespace,
        Kind::Pod,
        Kind::VirtualService,
        Kind::ServiceEntry,
        Kind::ServiceFence,
        Kind::Sidecar,
    ];

    /// The kind's name (also the `kind` label of the rejection metric).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Service => "Service",
            Kind::Pod => "Pod",
            Kind::VirtualService => "VirtualService",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::ServiceFence => "ServiceFence",
            Kind::Sidecar => "Sidecar",
        }
    }

    /// The kind named `kind` (an object's `kind` field).
    pub fn named(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == kind)
    }

    /// Where the API server serves the kind: group, version and the plural its CRD declares.
    pub fn api_resource(self) -> ApiResource {
        match self {
            Kind::Namespace => ApiResource::erase::<Namespace>(&()),
            Kind::Service => ApiResource::erase::<Service>(&()),
            Kind::Pod => ApiResource::erase::<Pod>(&()),
            Kind::VirtualService => IstioVersion::default().resource(IstioKind::VirtualService),
            Kind::ServiceEntry => IstioVersion::default().resource(IstioKind::ServiceEntry),
            Kind::ServiceFence => ApiResource::erase::<ServiceFence>(&()),
            Kind::Sidecar => IstioVersion::default().resource(IstioKind::Sidecar),
        }
    }

    /// Whether the kind is cluster-scoped (its key has an empty namespace).
    fn cluster_scoped(self) -> bool {
        self == Kind::Namespace
    }
}

/// Why an object was rejected: the `reason` label of `lazyload_objects_rejected_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// No `metadata.name` (or no namespace, for a namespaced kind).
    MissingName,
    /// The object does not fit lazyload's types (a field of the wrong type, a required one
    /// missing, not a JSON object).
    Invalid,
}

impl Reason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MissingName => "missing_name",
            Reason::Invalid => "invalid",
        }
    }
}

/// One object that could not be used, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} {object} skipped ({}): {message}", kind.as_str(), reason.as_str())]
pub struct Rejection {
    /// Its kind.
    pub kind: Kind,
    /// `namespace/name` as far as the object has them (`<unnamed>` otherwise).
    pub object: String,
    /// The closed-set reason.
    pub reason: Reason,
    /// What is wrong, with the path of the offending field.
    pub message: String,
}

/// An object converted to what lazyload keeps of it.
#[derive(Clone, Debug)]
pub enum Converted {
    /// An object the cluster index keeps ([`super::ClusterIndex::apply`]).
    Indexed(Indexed),
    /// A ServiceFence, whole (controllers read spec and status).
    ServiceFence(Box<ServiceFence>),
    /// A Sidecar, whole.
    Sidecar(Box<Sidecar>),
}

impl From<Indexed> for Converted {
    fn from(object: Indexed) -> Self {
        Converted::Indexed(object)
    }
}

/// The key of a raw object: its namespace (empty for a cluster-scoped kind) and name.
pub fn key_of(kind: Kind, object: &Value) -> Result<ObjectKey, Rejection> {
    let field = |name: &str| {
        object
            .get("metadata")?
            .get(name)?
            .as_str()
            .filter(|s| !s.is_empty())
    };
    let name = field("name");
    let namespace = if kind.cluster_scoped() {
        Some("")
    } else {
        field("namespace")
    };
    match (namespace, name) {
        (Some(namespace), Some(name)) => Ok(ObjectKey::new(namespace, name)),
        _ => Err(Rejection {
            kind,
            object: format!("{}/{}", namespace.unwrap_or("?"), name.unwrap_or("?")),
            reason: Reason::MissingName,
            message: "no metadata.name or metadata.namespace".into(),
        }),
    }
}

/// Converts one raw object of `kind`; `domain` is the cluster domain VirtualService hosts are
/// qualified with. Never panics, whatever `object` is.
pub fn convert(kind: Kind, object: Value, domain: &str) -> Result<(ObjectKey, Converted), Rejection> {
    let key = key_of(kind, &object)?;
    let invalid = |message: String| Rejection {
        kind,
        object: key.to_string(),
        reason: Reason::Invalid,
        message,
    };
    let entry = |e: super::Error| invalid(e.to_string());
    let converted = match kind {
        Kind::Namespace => Indexed::Namespace(
            NamespaceInfo::try_from(&typed::<Namespace>(object).map_err(invalid)?).map_err(entry)?,
        )
        .into(),
        Kind::Service => Indexed::Service(
            ServiceInfo::try_from(&typed::<Service>(object).map_err(invalid)?).map_err(entry)?,
        )
        .into(),
        Kind::Pod => {
            Indexed::Pod(PodInfo::try_from(&typed::<Pod>(object).map_err(invalid)?).map_err(entry)?).into()
        }
        Kind::VirtualService => Indexed::VirtualService(
            VirtualServiceInfo::from_object(&typed::<VirtualService>(object).map_err(invalid)?, domain)
                .map_err(entry)?,
        )
        .into(),
        Kind::ServiceEntry => Indexed::ServiceEntry(
            ServiceEntryInfo::try_from(&typed::<ServiceEntry>(object).map_err(invalid)?).map_err(entry)?,
        )
        .into(),
        Kind::ServiceFence => Converted::ServiceFence(Box::new(service_fence(object)?)),
        Kind::Sidecar => Converted::Sidecar(Box::new(typed(object).map_err(invalid)?)),
    };
    Ok((key, converted))
}

/// Converts one raw ServiceFence.
pub fn service_fence(object: Value) -> Result<ServiceFence, Rejection> {
    let key = key_of(Kind::ServiceFence, &object)?;
    typed(object).map_err(|message| Rejection {
        kind: Kind::ServiceFence,
        object: key.to_string(),
        reason: Reason::Invalid,
        message,
    })
}

/// `object` as `T`; the error names the offending field's path.
fn typed<T: DeserializeOwned>(object: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(object).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        }
    })
}

/// Labels of `lazyload_objects_rejected_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectedLabels {
    kind: &'static str,
    reason: &'static str,
}

/// The objects currently rejected, per kind, and the counter of rejections. Each rejection is
/// logged and counted once: the same object rejected again for the same reason (a re-list, a
/// status write, a new version with the same fault) is not news.
#[derive(Clone, Debug, Default)]
pub struct Rejections {
    current: Arc<Mutex<BTreeMap<(Kind, ObjectKey), Rejection>>>,
    counter: Family<RejectedLabels, Counter>,
}

impl Rejections {
    /// Registers `objects_rejected` (`lazyload_objects_rejected_total` under serve's prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "objects_rejected",
            "Cluster objects skipped because lazyload could not read them, by kind and reason",
            self.counter.clone(),
        );
    }

    /// Records that the object under `key` is rejected; logs and counts it unless it already
    /// was, for the same reason. Returns whether this was news.
    pub fn reject(&self, key: Option<ObjectKey>, rejection: Rejection) -> bool {
        let news = match key {
            Some(key) => {
                let mut current = self.lock();
                let slot = (rejection.kind, key);
                if current.get(&slot) == Some(&rejection) {
                    false
                } else {
                    current.insert(slot, rejection.clone());
                    true
                }
            }
            // Nothing to remember it by: an object without a name is rare (the API server
            // refuses to store one), so each occurrence is reported.
            None => true,
        };
        if news {
            tracing::warn!(
                kind = rejection.kind.as_str(),
                object = %rejection.object,
                reason = rejection.reason.as_str(),
                "object skipped: {}",
                rejection.message
            );
            self.counter
                .get_or_create(&RejectedLabels {
                    kind: rejection.kind.as_str(),
                    reason: rejection.reason.as_str(),
                })
                .inc();
        }
        news
    }

    /// The object under `key` is no longer rejected (converted, deleted, or not listed again).
    pub fn clear(&self, kind: Kind, key: &ObjectKey) {
        self.lock().remove(&(kind, key.clone()));
    }

    /// The objects of `kind` rejected now.
    pub fn keys(&self, kind: Kind) -> Vec<ObjectKey> {
        self.lock()
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, key)| key.clone())
            .collect()
    }

    /// Why the object of `kind` under `key` is rejected, if it is.
    pub fn get(&self, kind: Kind, key: &ObjectKey) -> Option<Rejection> {
        self.lock().get(&(kind, key.clone())).cloned()
    }

    /// How many rejections of `kind` and `reason` were counted.
    #[cfg(test)]
    pub(crate) fn count(&self, kind: Kind, reason: Reason) -> u64 {
        self.counter
            .get_or_create(&RejectedLabels {
                kind: kind.as_str(),
                reason: reason.as_str(),
            })
            .get()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(Kind, ObjectKey), Rejection>> {
        // A panic elsewhere must not stop the watchers.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const DOMAIN: &str = "cluster.local";

    #[test]
    fn a_delegate_without_a_name_is_one_rejected_virtualservice() {
        // Valid for Istio's schema; lazyload's type requires the name.
        let vs = json!({"metadata": {"name": "r", "namespace": "default"},
            "spec": {"hosts": ["reviews"], "http": [{"delegate": {"namespace": "other"}}]}});
        let e = convert(Kind::VirtualService, vs, DOMAIN).unwrap_err();
        assert_eq!((e.reason, e.object.as_str()), (Reason::Invalid, "default/r"));
        assert!(e.message.starts_with("spec.http[0].delegate"), "{}", e.message);
    }

    #[test]
    fn objects_without_a_name_are_named_as_far_as_they_can_be() {
        let e = convert(Kind::Pod, json!({"metadata": {"namespace": "a"}}), DOMAIN).unwrap_err();
        assert_eq!((e.reason, e.object.as_str()), (Reason::MissingName, "a/?"));
        let (key, _) = convert(Kind::Namespace, json!({"metadata": {"name": "a"}}), DOMAIN).unwrap();
        assert_eq!(key, ObjectKey::new("", "a"));
        let e = convert(Kind::Sidecar, json!([1]), DOMAIN).unwrap_err();
        assert_eq!(e.reason, Reason::MissingName);
    }

    #[test]
    fn a_rejection_is_counted_once_until_it_changes() {
        let r = Rejections::default();
        let key = ObjectKey::new("default", "f");
        let rejection = |message: &str| Rejection {
            kind: Kind::ServiceFence,
            object: key.to_string(),
            reason: Reason::Invalid,
            message: message.into(),
        };
        assert!(r.reject(Some(key.clone()), rejection("a")));
        assert!(!r.reject(Some(key.clone()), rejection("a")));
        assert!(r.reject(Some(key.clone()), rejection("b")));
        assert_eq!(r.count(Kind::ServiceFence, Reason::Invalid), 2);
        assert_eq!(r.keys(Kind::ServiceFence), std::slice::from_ref(&key));
        r.clear(Kind::ServiceFence, &key);
        assert!(r.get(Kind::ServiceFence, &key).is_none());
        assert!(
            r.reject(Some(key.clone()), rejection("b")),
            "news again once it was cleared"
        );
    }
}
