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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_metadata_name_what_is_missing() {
        let meta = |namespace: Option<&str>, name: Option<&str>| ObjectMeta {
            namespace: namespace.map(String::from),
            name: name.map(String::from),
            ..Default::default()
        };
        let cases = [
            (
                meta(Some("a"), Some("b")),
                Ok(ObjectKey::new("a", "b")),
                ObjectKey::new("a", "b"),
            ),
            (
                meta(Some("a"), None),
                Err(MissingField("name")),
                ObjectKey::new("a", ""),
            ),
            (
                meta(None, Some("b")),
                Err(MissingField("namespace")),
                ObjectKey::new("", "b"),
            ),
        ];
        let failures: Vec<String> = cases
            .into_iter()
            .filter(|(m, strict, lenient)| {
                ObjectKey::of(m) != *strict || ObjectKey::of_or_empty(m) != *lenient
            })
            .map(|(m, strict, lenient)| format!("{m:?}: expected {strict:?} and {lenient}"))
            .collect();
        assert!(failures.is_empty(), "{failures:#?}");
        assert_eq!(ObjectKey::new("a", "b").to_string(), "a/b");
    }
}
