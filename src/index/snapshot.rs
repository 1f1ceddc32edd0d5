//! Loading a cluster snapshot from YAML: the output of
//! `kubectl get ns,svc,pods,virtualservices,serviceentries,servicefences,sidecars -A -o yaml` (a `List`),
//! multi-document YAML, or any mix of both.

use serde_json::Value;

use super::ClusterIndex;
use crate::index::convert::{Converted, Kind, Rejection, convert};
use crate::vocab::fence::ServiceFence;
use crate::vocab::istio::Sidecar;

/// Why a snapshot could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not YAML.
    #[error("not YAML: {source}")]
    Yaml {
        /// Parser error (it names the line and column).
        source: crate::yaml::Error,
    },
    /// The file holds something, but not one Kubernetes object (a mapping with a `kind`).
    #[error(
        "not Kubernetes objects: no document is an object with a `kind` (expected `kubectl get ... -o yaml` output)"
    )]
    NotKubernetes,
    /// Something other than objects, lists of objects or `List`s (a scalar, a list of lists, a
    /// `List` whose `items` is not a list).
    #[error(
        "document {document}: {what}: expected Kubernetes objects or lists of them (`kubectl get ... -o yaml` output)"
    )]
    Shape {
        /// 1-based document number.
        document: usize,
        /// What was found where.
        what: String,
    },
}

/// A value of the wrong shape, found by [`Snapshot::add`].
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ShapeError(String);

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
        let documents: Vec<Value> = crate::yaml::documents(text).map_err(|source| Error::Yaml { source })?;
        for (i, value) in documents.into_iter().enumerate() {
            content |= !value.is_null();
            snap.add(value).map_err(|ShapeError(what)| Error::Shape {
                document: i + 1,
                what,
            })?;
        }
        if content && snap.objects == 0 {
            return Err(Error::NotKubernetes);
        }
        Ok(snap)
    }

    /// Adds one object, a `List` of objects, or a sequence of objects; anything else (a scalar,
    /// a sequence of sequences, a `List` whose `items` is not a sequence) is refused whole.
    pub fn add(&mut self, value: Value) -> Result<(), ShapeError> {
        match value {
            Value::Null => Ok(()),
            Value::Array(items) => items
                .into_iter()
                .enumerate()
                .try_for_each(|(i, item)| match item {
                    Value::Object(_) => self.add(item),
                    other => Err(ShapeError(format!("item {i} is {}", shape(&other)))),
                }),
            Value::Object(ref map)
                if map
                    .get("kind")
                    .and_then(Value::as_str)
                    .is_some_and(|k| k.ends_with("List")) =>
            {
                self.objects += 1;
                match map.get("items").cloned() {
                    None | Some(Value::Null) => Ok(()),
                    Some(items @ Value::Array(_)) => self.add(items),
                    Some(other) => Err(ShapeError(format!("the List's items is {}", shape(&other)))),
                }
            }
            Value::Object(_) => {
                self.add_object(value);
                Ok(())
            }
            other => Err(ShapeError(format!("the document is {}", shape(&other)))),
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
            Ok((_, Converted::Indexed(object))) => self.index.apply(object),
            Ok((_, Converted::ServiceFence(f))) => self.fences.push(*f),
            Ok((_, Converted::Sidecar(s))) => self.sidecars.push(*s),
            Err(rejection) => self.rejected.push(rejection),
        }
    }
}

/// What kind of YAML value `v` is, for errors.
fn shape(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::ObjectKey;

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
    fn out_of_range_ports_and_invalid_ips_reject_their_object_with_the_field() {
        let cases = [
            (
                "kind: Service\nmetadata: {name: s, namespace: d}\nspec: {ports: [{port: 80}, {port: 70000}]}",
                "Service d/s skipped (invalid): spec.ports[1].port: \"70000\" is not a port",
            ),
            (
                "kind: Service\nmetadata: {name: s, namespace: d}\nspec: {ports: [{port: 0}]}",
                "spec.ports[0].port: \"0\" is not a port",
            ),
            (
                "kind: Service\nmetadata: {name: s, namespace: d}\nspec: {clusterIP: 10.0.0.300}",
                "spec.clusterIPs: \"10.0.0.300\" is not an IP address",
            ),
            (
                "kind: Pod\nmetadata: {name: p, namespace: d}\nstatus: {podIP: not-an-ip}",
                "Pod d/p skipped (invalid): status.podIPs: \"not-an-ip\" is not an IP address",
            ),
            (
                "kind: ServiceEntry\napiVersion: networking.istio.io/v1beta1\nmetadata: {name: e, namespace: d}\nspec: {hosts: [a.b], ports: [{number: 65536, name: x}]}",
                "spec.ports[0].number: \"65536\" is not a port",
            ),
        ];
        for (text, want) in cases {
            let snap = Snapshot::parse(text, "cluster.local").unwrap();
            let rejected: Vec<String> = snap.rejected.iter().map(|r| r.to_string()).collect();
            assert_eq!(rejected.len(), 1, "{text}: {rejected:?}");
            assert!(rejected[0].contains(want), "{text}: {rejected:?}");
        }
        // What the API server writes for headless and not-yet-allocated Services is fine.
        let ok = "kind: Service\nmetadata: {name: h, namespace: d}\nspec: {clusterIP: None, ports: [{port: 65535}]}\n---\n\
                  kind: Pod\nmetadata: {name: p, namespace: d}\nstatus: {podIP: ''}\n";
        let snap = Snapshot::parse(ok, "cluster.local").unwrap();
        assert!(snap.rejected.is_empty(), "{:?}", snap.rejected);
    }

    #[test]
    fn a_file_that_is_not_kubernetes_objects_is_an_error() {
        let e = Snapshot::parse("a: [", "cluster.local").unwrap_err().to_string();
        assert!(e.starts_with("not YAML: ") && e.contains("line 1"), "{e}");
        // An access log, a config file, a bare list of strings: not an empty cluster.
        for text in ["{\"authority\": \"a\"}\n", "general: {autoFence: true}\n"] {
            let e = Snapshot::parse(text, "cluster.local").unwrap_err();
            assert!(matches!(e, Error::NotKubernetes), "{text}: {e}");
        }
        // Scalars and lists of the wrong shape, even beside good objects: an error that says
        // where.
        let good = "kind: Namespace\nmetadata: {name: default}\n---\n";
        for (text, what) in [
            ("- a\n- b\n", "document 1: item 0 is a string"),
            ("hello\n", "document 1: the document is a string"),
            ("42\n", "document 1: the document is a number"),
            ("- [a]\n", "document 1: item 0 is a list"),
            (
                "kind: List\nitems: 5\n",
                "document 1: the List's items is a number",
            ),
            (
                "kind: List\nitems: [{kind: Namespace, metadata: {name: a}}, 7]\n",
                "document 1: item 1 is a number",
            ),
            (&format!("{good}true\n"), "document 2: the document is a boolean"),
        ] {
            let e = Snapshot::parse(text, "cluster.local").unwrap_err().to_string();
            assert!(e.starts_with(what), "{text}: {e}");
        }
        // Empty files and empty lists are empty clusters.
        for text in ["", "---\n", "apiVersion: v1\nkind: List\nitems: []\n"] {
            assert!(Snapshot::parse(text, "cluster.local").is_ok(), "{text}");
        }
    }
}
