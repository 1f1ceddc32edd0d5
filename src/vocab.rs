//! The shared vocabulary every layer speaks: object keys, hosts, labels, the Istio and
//! ServiceFence resources, and the constants on the wire. It depends on nothing else in the crate,
//! so anything may use it.

pub mod fence;
pub mod host;
pub mod istio;
pub mod labels;

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Header carrying the caller's original destination (`%DOWNSTREAM_LOCAL_ADDRESS%`, a VIP:port),
/// set by the calling sidecar and logged by the global-sidecar (Slime's name).
pub const ORIG_DEST_HEADER: &str = "Slime-Orig-Dest";

/// Header carrying the caller's namespace, set by the calling sidecar (the fallback EnvoyFilter)
/// so short host names can be completed (Slime's name). HTTP header names are case-insensitive.
pub const SOURCE_NS_HEADER: &str = "Slime-Source-Ns";

/// Name of the global-sidecar Service, Deployment and fence, in whichever namespace (Slime's).
pub const GLOBAL_SIDECAR: &str = "global-sidecar";

/// Namespace and name of an object (the namespace is empty for a cluster-scoped kind).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// What [`ObjectKey::of`] found missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no metadata.{0}")]
pub struct MissingField(pub &'static str);

impl ObjectKey {
    /// A key.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of a namespaced object from its metadata: the one way keys are read from
    /// Kubernetes objects. Fails naming the field that is missing.
    pub fn of(meta: &ObjectMeta) -> Result<Self, MissingField> {
        let name = meta.name.clone().ok_or(MissingField("name"))?;
        let namespace = meta.namespace.clone().ok_or(MissingField("namespace"))?;
        Ok(Self { namespace, name })
    }

    /// The key of an object lazyload already holds (read from the API server, which names every
    /// object), an absent field read as empty.
    pub fn of_or_empty(meta: &ObjectMeta) -> Self {
        Self::new(
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        )
    }
}

/// Serialised as `namespace/name`.
impl serde::Serialize for ObjectKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}
