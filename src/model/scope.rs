//! A8: the global-sidecar must see the whole mesh. lazyload never fences it, but a Sidecar
//! someone else wrote can still scope it: one selecting its pods, its namespace's default, or
//! (when its namespace has none) the mesh-wide default in Istio's root namespace. Istio applies
//! the first of these that exists; if that one does not import every host, requests for the
//! services it leaves out fail at the global-sidecar instead of being forwarded. This finds it,
//! so the operator is told loudly.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::config::{Config, GlobalSidecarMode};
use crate::index::ClusterIndex;
use crate::vocab::GLOBAL_SIDECAR;
use crate::vocab::ObjectKey;
use crate::vocab::istio::Sidecar;
use crate::vocab::labels::Labels;

/// A Sidecar that scopes a global-sidecar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scoped {
    /// The global-sidecar's namespace.
    pub global_sidecar_namespace: String,
    /// The Sidecar that applies to it.
    pub sidecar: ObjectKey,
    /// How it applies: `selects its pods`, `namespace default`, `mesh-wide default`.
    pub how: &'static str,
}

impl std::fmt::Display for Scoped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Sidecar {} ({}) scopes the global-sidecar in {}: it must import */* (on every port) or \
             the fallback fails for every service it leaves out",
            self.sidecar, self.how, self.global_sidecar_namespace
        )
    }
}

/// The namespaces global-sidecars run in.
pub fn global_sidecar_namespaces(cfg: &Config) -> Vec<String> {
    match cfg.general.global_sidecar_mode {
        GlobalSidecarMode::Cluster => vec![cfg.general.cluster_gs_namespace.clone()],
        GlobalSidecarMode::Namespace => cfg.general.namespace.clone(),
    }
}

/// Every global-sidecar that a Sidecar in `sidecars` (those lazyload does not own) scopes.
/// The global-sidecar's pods are the pods of its namespace its Service selects (by the
/// selector alone when the index has none of them; `app: global-sidecar` when it has no such
/// Service).
pub fn scoped_global_sidecars<'a>(
    cfg: &Config,
    index: &ClusterIndex,
    sidecars: impl IntoIterator<Item = &'a Sidecar> + Clone,
) -> Vec<Scoped> {
    let root = &cfg.global.istio_namespace;
    let mut found = Vec::new();
    for ns in global_sidecar_namespaces(cfg) {
        let pods = global_sidecar_pod_labels(index, &ns);
        let in_ns = |namespace: &str| {
            let mut of: Vec<&Sidecar> = sidecars
                .clone()
                .into_iter()
                .filter(|s| s.metadata.namespace.as_deref() == Some(namespace))
                .collect();
            // Istio takes the oldest when several apply, then the first by name.
            of.sort_by(|a, b| {
                let created = |s: &Sidecar| s.metadata.creation_timestamp.as_ref().map(|t| t.0);
                (created(a), &a.metadata.name).cmp(&(created(b), &b.metadata.name))
            });
            of
        };
        let here = in_ns(&ns);
        let selecting = here.iter().find(|s| {
            s.spec.workload_selector.as_ref().is_some_and(|w| {
                !w.labels.is_empty()
                    && pods
                        .iter()
                        .any(|labels| w.labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
            })
        });
        let default_of = |list: &[&'a Sidecar]| {
            list.iter()
                .find(|s| {
                    s.spec
                        .workload_selector
                        .as_ref()
                        .is_none_or(|w| w.labels.is_empty())
                })
                .copied()
        };
        let applies = match selecting {
            Some(s) => Some((*s, "selects its pods")),
            None => match default_of(&here) {
                Some(s) => Some((s, "namespace default")),
                None if *root != ns => default_of(&in_ns(root)).map(|s| (s, "mesh-wide default")),
                None => None,
            },
        };
        if let Some((s, how)) = applies
            && !imports_everything(s)
            && let Ok(sidecar) = ObjectKey::of(&s.metadata)
        {
            found.push(Scoped {
                global_sidecar_namespace: ns.clone(),
                sidecar,
                how,
            });
        }
    }
    found
}

/// The label sets of the global-sidecar's pods in `namespace` (see [`scoped_global_sidecars`]).
fn global_sidecar_pod_labels(index: &ClusterIndex, namespace: &str) -> Vec<Labels> {
    let selector = global_sidecar_selector(index, namespace);
    let pods: Vec<Labels> = index
        .pods()
        .filter(|p| p.key.namespace == namespace && selects(&selector, &p.labels))
        .map(|p| p.labels.clone())
        .collect();
    if pods.is_empty() { vec![selector] } else { pods }
}

/// The labels of the global-sidecar's pods in `namespace`: its Service's selector, else
/// `app: global-sidecar`.
fn global_sidecar_selector(index: &ClusterIndex, namespace: &str) -> Labels {
    index
        .service(&ObjectKey::new(namespace, GLOBAL_SIDECAR))
        .and_then(|s| s.selector.clone())
        .unwrap_or_else(|| BTreeMap::from([("app".to_string(), GLOBAL_SIDECAR.to_string())]))
}

fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether `ip` is a global-sidecar pod's address: a pod at `ip`, in one of the global-sidecar
/// `namespaces` (see [`global_sidecar_namespaces`]), with the global-sidecar's labels (see
/// [`scoped_global_sidecars`]). A host-network pod's address is its node's, shared by every
/// host-network process there: it proves nothing and never counts ([`ClusterIndex::pods_at`]
/// leaves such pods out).
pub fn is_global_sidecar_address(index: &ClusterIndex, namespaces: &[String], ip: IpAddr) -> bool {
    index.pods_at(ip).any(|(pod, _)| {
        namespaces.contains(&pod.key.namespace)
            && selects(&global_sidecar_selector(index, &pod.key.namespace), &pod.labels)
    })
}

/// Whether a Sidecar leaves its proxies the whole mesh: no egress (Istio reads that as one
/// `*/*` listener), or every egress listener imports everything and one of them serves every
/// port (Istio routes a port by the listener for that port first).
fn imports_everything(s: &Sidecar) -> bool {
    s.spec.egress.is_empty()
        || (s.spec.egress.iter().all(|e| {
            // Within a listener a namespace's own entries replace `*/*` for that namespace:
            // only `*/…`, `<ns>/*` and `~/…` (imports nothing) leave it whole.
            e.hosts.iter().any(|h| h == "*/*")
                && e.hosts
                    .iter()
                    .all(|h| h.starts_with("*/") || h.ends_with("/*") || h.starts_with("~/"))
        }) && s.spec.egress.iter().any(|e| !e.extra.contains_key("port")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::istio::{EgressListener, IstioKind, IstioVersion, SidecarSpec, WorkloadSelector};

    fn sidecar(ns: &str, name: &str, selector: &[(&str, &str)], hosts: &[&str]) -> Sidecar {
        let mut s = Sidecar::new(
            name,
            &IstioVersion::default().resource(IstioKind::Sidecar),
            SidecarSpec {
                workload_selector: (!selector.is_empty()).then(|| WorkloadSelector {
                    labels: selector
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..Default::default()
                }),
                egress: vec![EgressListener {
                    hosts: hosts.iter().map(|h| h.to_string()).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        s.metadata.namespace = Some(ns.into());
        s
    }

    fn cfg(yaml: &str) -> Config {
        Config::parse(yaml).unwrap().config
    }

    #[test]
    fn which_sidecar_scopes_the_global_sidecar() {
        let cluster = cfg("");
        let index = ClusterIndex::new("cluster.local");
        let root_default = sidecar("istio-system", "default", &[], &["./*", "istio-system/*"]);
        let root_open = sidecar("istio-system", "default", &[], &["*/*"]);
        let ns_open = sidecar("mesh-operator", "default", &[], &["*/*"]);
        let ns_narrow = sidecar("mesh-operator", "default", &[], &["./*"]);
        let gs_narrow = sidecar("mesh-operator", "gs", &[("app", "global-sidecar")], &["./*"]);
        let gs_open = sidecar("mesh-operator", "gs", &[("app", "global-sidecar")], &["*/*"]);
        let other_app = sidecar("mesh-operator", "other", &[("app", "other")], &["./*"]);
        let elsewhere = sidecar("bookinfo", "default", &[], &["./*"]);
        let found = |list: Vec<&Sidecar>| {
            scoped_global_sidecars(&cluster, &index, list)
                .into_iter()
                .map(|s| format!("{} {}", s.sidecar, s.how))
                .collect::<Vec<_>>()
        };
        let cases: Vec<(&str, Vec<&Sidecar>, Vec<&str>)> = vec![
            ("no Sidecars", vec![], vec![]),
            (
                "a narrow mesh-wide default",
                vec![&root_default],
                vec!["istio-system/default mesh-wide default"],
            ),
            ("an open mesh-wide default", vec![&root_open], vec![]),
            (
                "its namespace's open default wins",
                vec![&root_default, &ns_open],
                vec![],
            ),
            (
                "its namespace's narrow default",
                vec![&root_open, &ns_narrow],
                vec!["mesh-operator/default namespace default"],
            ),
            ("a Sidecar selecting it wins", vec![&ns_narrow, &gs_open], vec![]),
            (
                "a narrow Sidecar selecting it",
                vec![&root_open, &gs_narrow],
                vec!["mesh-operator/gs selects its pods"],
            ),
            (
                "another app's Sidecar does not apply",
                vec![&other_app, &root_open],
                vec![],
            ),
            ("other namespaces do not matter", vec![&elsewhere], vec![]),
        ];
        for (what, list, want) in cases {
            assert_eq!(found(list), want, "{what}");
        }
    }

    #[test]
    fn namespace_mode_checks_each_listed_namespace() {
        let cfg = cfg("general:\n  globalSidecarMode: namespace\n  namespace: [bookinfo, shop]\n");
        let index = ClusterIndex::new("cluster.local");
        let narrow = sidecar("shop", "default", &[], &["./*"]);
        let root = sidecar("istio-system", "default", &[], &["./*"]);
        let found = scoped_global_sidecars(&cfg, &index, [&narrow, &root]);
        let got: Vec<(String, String)> = found
            .iter()
            .map(|s| (s.global_sidecar_namespace.clone(), s.sidecar.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                ("bookinfo".to_string(), "istio-system/default".to_string()),
                ("shop".to_string(), "shop/default".to_string())
            ]
        );
        assert!(found[1].to_string().contains("must import */*"));
    }

    #[test]
    fn what_imports_everything() {
        let with_port = |hosts: &[&str]| EgressListener {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            extra: [(
                "port".to_string(),
                serde_json::json!({"number": 9080, "protocol": "HTTP"}),
            )]
            .into(),
        };
        let open = sidecar("istio-system", "default", &[], &["*/*"]);
        let mut s = open.clone();
        assert!(imports_everything(&s));
        s.spec.egress[0] = with_port(&["*/*"]);
        assert!(!imports_everything(&s), "only port 9080");
        s.spec.egress.push(open.spec.egress[0].clone());
        assert!(imports_everything(&s), "9080 and every other port, all open");
        s.spec.egress[0] = with_port(&["./*"]);
        assert!(!imports_everything(&s), "9080 is routed by the narrow listener");
        s.spec.egress.clear();
        assert!(imports_everything(&s), "no egress: Istio's */*");
        for (hosts, open) in [
            (vec!["*/*", "*/reviews.bookinfo.svc.cluster.local"], true),
            (vec!["*/*", "istio-system/*", "~/*"], true),
            (vec!["*/*", "bookinfo/reviews.bookinfo.svc.cluster.local"], false),
            (vec!["*/*", "./foo"], false),
            (vec!["./*", "istio-system/*"], false),
        ] {
            let s = sidecar("istio-system", "default", &[], &hosts);
            assert_eq!(imports_everything(&s), open, "{hosts:?}");
        }
    }

    #[test]
    fn the_global_sidecars_pods_are_found_by_its_service() {
        use crate::index::{PodInfo, ServiceInfo};
        let cfg = cfg("");
        let mut index = ClusterIndex::new("cluster.local");
        let labels = |pairs: &[(&str, &str)]| -> Labels {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        index.apply_service(ServiceInfo {
            key: ObjectKey::new("mesh-operator", "global-sidecar"),
            labels: Labels::new(),
            selector: Some(labels(&[("component", "gs")])),
            ports: vec![],
            cluster_ips: vec![],
        });
        let by_version = sidecar("mesh-operator", "pinned", &[("version", "v2")], &["./*"]);
        let by_component = sidecar("mesh-operator", "gs", &[("component", "gs")], &["./*"]);
        let found = |index: &ClusterIndex, list: &[&Sidecar]| -> Vec<String> {
            scoped_global_sidecars(&cfg, index, list.iter().copied())
                .iter()
                .map(|s| s.sidecar.to_string())
                .collect()
        };
        assert_eq!(
            found(&index, &[&by_component]),
            ["mesh-operator/gs"],
            "the Service's selector"
        );
        assert!(
            found(&index, &[&by_version]).is_empty(),
            "no pod known to carry version=v2"
        );
        index.apply_pod(PodInfo {
            key: ObjectKey::new("mesh-operator", "global-sidecar-0"),
            labels: labels(&[("component", "gs"), ("version", "v2")]),
            ips: vec![],
            host_network: false,
            service_account: "default".into(),
        });
        assert_eq!(
            found(&index, &[&by_version]),
            ["mesh-operator/pinned"],
            "its pods' labels"
        );
    }
}
