//! Loading a cluster snapshot from YAML: the output of
//! `kubectl get ns,svc,pods,virtualservices,serviceentries,servicefences,sidecars -A -o yaml` (a `List`),
//! multi-document YAML, or any mix of both.

use serde::Deserialize;
use serde_json::Value;

use super::ClusterIndex;
use crate::cluster::convert::{Converted, Kind, Rejection, convert};
use crate::model::fence::ServiceFence;
use crate::model::istio::Sidecar;

/// Why a snapshot could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not YAML.
    #[error("document {document}: {source}")]
    Yaml {
        /// 1-based document number.
        document: usize,
        /// Parser error.
        source: serde_yaml::Error,
    },
    /// The file holds something, but not one Kubernetes object (a mapping with a `kind`).
    #[error(
        "not Kubernetes objects: no document is an object with a `kind` (expected `kubectl get ... -o yaml` output)"
    )]
    NotKubernetes,
}

/// A loaded snapshot.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Namespaces, Services, Pods, VirtualServices and ServiceEntries.
    pub index: ClusterIndex,
    /// ServiceFences.
    pub fences: Vec<ServiceFence>,
    /// Sidecars (read only to tell whether one scopes the global-sidecar, A8).
    pub sidecars: Vec<Sidecar>,
    /// Kinds that were present but are not used (`ConfigMap`, ...).
    pub skipped: Vec<String>,
    /// Objects of a kind lazyload uses that it could not read: skipped, each saying why.
    pub rejected: Vec<Rejection>,
    /// How many Kubernetes objects (with a `kind`) the file held.
    objects: usize,
}

impl Snapshot {
    /// Parses every document of `text` and indexes the objects. One object that cannot be read
    /// is skipped (see [`Snapshot::rejected`]); a file holding no Kubernetes object at all (but
    /// something) is an error, not an empty cluster.
    pub fn parse(text: &str, domain: &str) -> Result<Self, Error> {
        let mut snap = Snapshot {
            index: ClusterIndex::new(domain),
            ..Default::default()
        };
        let mut content = false;
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = Value::deserialize(doc).map_err(|source| Error::Yaml {
                document: i + 1,
                source,
            })?;
            content |= !value.is_null();
            snap.add(value);
        }
        if content && snap.objects == 0 {
            return Err(Error::NotKubernetes);
        }
        Ok(snap)
    }

    /// Adds one object, a `List` of objects, or a sequence of objects.
    pub fn add(&mut self, value: Value) {
        match value {
            Value::Null => {}
            Value::Array(items) => items.into_iter().for_each(|v| self.add(v)),
            Value::Object(ref map)
                if map
                    .get("kind")
                    .and_then(Value::as_str)
                    .is_some_and(|k| k.ends_with("List")) =>
            {
                let items = map.get("items").cloned().unwrap_or(Value::Array(vec![]));
                self.objects += 1;
                self.add(items)
            }
            object => self.add_object(object),
        }
    }

    fn add_object(&mut self, object: Value) {
        let kind = object.get("kind").and_then(Value::as_str).map(str::to_string);
        if kind.is_some() {
            self.objects += 1;
        }
        let Some(known) = kind.as_deref().and_then(Kind::named) else {
            self.skipped.push(kind.unwrap_or_else(|| "<no kind>".to_string()));
            return;
        };
        let domain = self.index.domain().to_string();
        match convert(known, object, &domain) {
            Ok((_, Converted::Namespace(n))) => self.index.apply_namespace(n),
            Ok((_, Converted::Service(s))) => self.index.apply_service(s),
            Ok((_, Converted::Pod(p))) => self.index.apply_pod(p),
            Ok((_, Converted::VirtualService(v))) => self.index.apply_virtual_service(v),
            Ok((_, Converted::ServiceEntry(e))) => self.index.apply_service_entry(e),
            Ok((_, Converted::ServiceFence(f))) => self.fences.push(*f),
            Ok((_, Converted::Sidecar(s))) => self.sidecars.push(*s),
            Err(rejection) => self.rejected.push(rejection),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::ObjectKey;

    #[test]
    fn reads_kubectl_lists_and_multi_documents() {
        let text = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: details, namespace: default, labels: {app: details}}
  spec: {selector: {app: details}, ports: [{name: http, port: 9080}], clusterIP: 10.0.0.7}
- apiVersion: v1
  kind: Pod
  metadata: {name: p, namespace: default, labels: {app: details}}
  status: {podIP: 10.1.0.5, podIPs: [{ip: 10.1.0.5}, {ip: "fd00::5"}]}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: c, namespace: default}
---
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio-injection: enabled}}
"#;
        let snap = Snapshot::parse(text, "cluster.local").unwrap();
        let svc = snap.index.service(&ObjectKey::new("default", "details")).unwrap();
        assert_eq!(svc.ports[0].port, 9080);
        assert_eq!(svc.cluster_ips, vec!["10.0.0.7"]);
        assert!(snap.index.namespace("default").is_some());
        assert_eq!(snap.skipped, vec!["ConfigMap"]);
        let pod = ObjectKey::new("default", "p");
        assert_eq!(
            snap.index
                .pods_at("fd00::5".parse().unwrap())
                .map(|(p, _)| &p.key)
                .collect::<Vec<_>>(),
            [&pod]
        );
        assert_eq!(
            snap.index.pod_fences(&pod),
            [ObjectKey::new("default", "details")]
        );
    }

    #[test]
    fn bad_objects_are_skipped_and_named_and_the_rest_is_used() {
        let snap = Snapshot::parse(
            r#"
kind: Service
metadata: {name: x, namespace: default}
spec: {ports: 7}
---
kind: Service
metadata: {name: x}
---
kind: VirtualService
metadata: {name: d, namespace: default}
spec: {hosts: [a], http: [{delegate: {namespace: other}}]}
---
kind: ServiceFence
metadata: {name: ok, namespace: default}
spec: {enable: true}
"#,
            "cluster.local",
        )
        .unwrap();
        let rejected: Vec<String> = snap.rejected.iter().map(|r| r.to_string()).collect();
        assert_eq!(rejected.len(), 3, "{rejected:?}");
        assert!(
            rejected[0].starts_with("Service default/x skipped (invalid): spec.ports"),
            "{rejected:?}"
        );
        assert!(
            rejected[1].starts_with("Service ?/x skipped (missing_name)"),
            "{rejected:?}"
        );
        assert!(rejected[2].starts_with("VirtualService default/d skipped (invalid): spec.http[0].delegate"));
        assert_eq!(snap.fences.len(), 1);
    }

    #[test]
    fn a_file_that_is_not_kubernetes_objects_is_an_error() {
        let e = Snapshot::parse("a: [", "cluster.local").unwrap_err().to_string();
        assert!(e.starts_with("document 1"), "{e}");
        // An access log, a config file, a bare list of strings: not an empty cluster.
        for text in [
            "{\"authority\": \"a\"}\n",
            "general: {autoFence: true}\n",
            "- a\n- b\n",
            "hello\n",
        ] {
            let e = Snapshot::parse(text, "cluster.local").unwrap_err();
            assert!(matches!(e, Error::NotKubernetes), "{text}: {e}");
        }
        // Empty files and empty lists are empty clusters.
        for text in ["", "---\n", "apiVersion: v1\nkind: List\nitems: []\n"] {
            assert!(Snapshot::parse(text, "cluster.local").is_ok(), "{text}");
        }
    }
}
