//! Loading a cluster snapshot from YAML: the output of
//! `kubectl get ns,svc,pods,virtualservices,serviceentries,servicefences,sidecars -A -o yaml` (a `List`),
//! multi-document YAML, or any mix of both.

use serde::Deserialize;
use serde_json::Value;

use super::{ClusterIndex, NamespaceInfo, PodInfo, ServiceEntryInfo, ServiceInfo, VirtualServiceInfo};
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
    /// A known kind whose content does not fit its schema.
    #[error("{kind} {name}: {reason}")]
    Object {
        /// Object kind.
        kind: String,
        /// Object name as written.
        name: String,
        /// What is wrong.
        reason: String,
    },
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
}

impl Snapshot {
    /// Parses every document of `text` and indexes the objects.
    pub fn parse(text: &str, domain: &str) -> Result<Self, Error> {
        let mut snap = Snapshot {
            index: ClusterIndex::new(domain),
            ..Default::default()
        };
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = Value::deserialize(doc).map_err(|source| Error::Yaml {
                document: i + 1,
                source,
            })?;
            snap.add(value)?;
        }
        Ok(snap)
    }

    /// Adds one object, a `List` of objects, or a sequence of objects.
    pub fn add(&mut self, value: Value) -> Result<(), Error> {
        match value {
            Value::Null => Ok(()),
            Value::Array(items) => items.into_iter().try_for_each(|v| self.add(v)),
            Value::Object(ref map)
                if map
                    .get("kind")
                    .and_then(Value::as_str)
                    .is_some_and(|k| k.ends_with("List")) =>
            {
                let items = map.get("items").cloned().unwrap_or(Value::Array(vec![]));
                self.add(items)
            }
            object => self.add_object(object),
        }
    }

    fn add_object(&mut self, object: Value) -> Result<(), Error> {
        let kind = object
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("<unnamed>")
            .to_string();
        let err = |reason: String| Error::Object {
            kind: kind.clone(),
            name: name.clone(),
            reason,
        };
        let domain = self.index.domain().to_string();
        match kind.as_str() {
            "Namespace" => {
                let ns = serde_json::from_value(object).map_err(|e| err(e.to_string()))?;
                self.index
                    .apply_namespace(NamespaceInfo::try_from(&ns).map_err(|e| err(e.to_string()))?);
            }
            "Service" => {
                let svc = serde_json::from_value(object).map_err(|e| err(e.to_string()))?;
                self.index
                    .apply_service(ServiceInfo::try_from(&svc).map_err(|e| err(e.to_string()))?);
            }
            "Pod" => {
                let pod = serde_json::from_value(object).map_err(|e| err(e.to_string()))?;
                self.index
                    .apply_pod(PodInfo::try_from(&pod).map_err(|e| err(e.to_string()))?);
            }
            "VirtualService" => {
                let vs = serde_json::from_value(object).map_err(|e| err(e.to_string()))?;
                let info = VirtualServiceInfo::from_object(&vs, &domain).map_err(|e| err(e.to_string()))?;
                self.index.apply_virtual_service(info);
            }
            "ServiceEntry" => {
                let se = serde_json::from_value(object).map_err(|e| err(e.to_string()))?;
                self.index
                    .apply_service_entry(ServiceEntryInfo::try_from(&se).map_err(|e| err(e.to_string()))?);
            }
            "ServiceFence" => {
                let fence: ServiceFence = serde_json::from_value(object).map_err(|e| err(e.to_string()))?;
                self.fences.push(fence);
            }
            "Sidecar" => {
                let sidecar: Sidecar = serde_json::from_value(object).map_err(|e| err(e.to_string()))?;
                self.sidecars.push(sidecar);
            }
            _ => {
                let label = if kind.is_empty() {
                    "<no kind>".to_string()
                } else {
                    kind
                };
                self.skipped.push(label);
            }
        }
        Ok(())
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
    fn bad_objects_are_named() {
        let e = Snapshot::parse(
            "kind: Service\nmetadata: {name: x}\nspec: {ports: 7}\n",
            "cluster.local",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("Service x:"), "{e}");
        let e = Snapshot::parse("kind: Service\nmetadata: {name: x}\n", "cluster.local")
            .unwrap_err()
            .to_string();
        assert!(e.contains("without namespace"), "{e}");
        let e = Snapshot::parse("a: [", "cluster.local").unwrap_err().to_string();
        assert!(e.starts_with("document 1"), "{e}");
    }
}
