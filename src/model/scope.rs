//! A8: the global-sidecar must see the whole mesh. lazyload never fences it, but a Sidecar
//! someone else wrote can still scope it: one selecting its pods, its namespace's default, or
//! (when its namespace has none) the mesh-wide default in Istio's root namespace. Istio applies
//! the first of these that exists; if that one does not import every host, requests for the
//! services it leaves out fail at the global-sidecar instead of being forwarded. This finds it,
//! so the operator is told loudly.

use std::collections::BTreeMap;

use super::istio::Sidecar;
use super::labels::Labels;
use super::sidecar::GLOBAL_SIDECAR;
use crate::config::{Config, GlobalSidecarMode};
use crate::index::{ClusterIndex, ObjectKey};

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
            "Sidecar {} ({}) scopes the global-sidecar in {}: it must import */* or the fallback \
             fails for every service it leaves out",
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
/// The global-sidecar's pods are known by its Service's selector (`app: global-sidecar` when the
/// index has no such Service).
pub fn scoped_global_sidecars<'a>(
    cfg: &Config,
    index: &ClusterIndex,
    sidecars: impl IntoIterator<Item = &'a Sidecar> + Clone,
) -> Vec<Scoped> {
    let root = &cfg.global.istio_namespace;
    let mut found = Vec::new();
    for ns in global_sidecar_namespaces(cfg) {
        let pods: Labels = index
            .service(&ObjectKey::new(&ns, GLOBAL_SIDECAR))
            .and_then(|s| s.selector.clone())
            .unwrap_or_else(|| BTreeMap::from([("app".to_string(), GLOBAL_SIDECAR.to_string())]));
        let in_ns = |namespace: &str| {
            let mut of: Vec<&Sidecar> = sidecars
                .clone()
                .into_iter()
                .filter(|s| s.metadata.namespace.as_deref() == Some(namespace))
                .collect();
            // Istio takes the oldest when several match; names make it deterministic here.
            of.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
            of
        };
        let here = in_ns(&ns);
        let selecting = here.iter().find(|s| {
            s.spec
                .workload_selector
                .as_ref()
                .is_some_and(|w| !w.labels.is_empty() && w.labels.iter().all(|(k, v)| pods.get(k) == Some(v)))
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
            && let (Some(namespace), Some(name)) = (&s.metadata.namespace, &s.metadata.name)
        {
            found.push(Scoped {
                global_sidecar_namespace: ns.clone(),
                sidecar: ObjectKey::new(namespace, name),
                how,
            });
        }
    }
    found
}

/// Whether a Sidecar leaves its proxies the whole mesh: no egress (Istio's defaults), or an
/// egress listener for every port (no `port`) importing `*/*`.
fn imports_everything(s: &Sidecar) -> bool {
    s.spec.egress.is_empty()
        || s.spec
            .egress
            .iter()
            .any(|e| !e.extra.contains_key("port") && e.hosts.iter().any(|h| h == "*/*"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::istio::{EgressListener, IstioVersion, SidecarSpec, WorkloadSelector};

    fn sidecar(ns: &str, name: &str, selector: &[(&str, &str)], hosts: &[&str]) -> Sidecar {
        let mut s = Sidecar::new(
            name,
            &IstioVersion::default().resource("Sidecar"),
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
    fn an_egress_listener_for_one_port_does_not_import_everything() {
        let mut s = sidecar("istio-system", "default", &[], &["*/*"]);
        s.spec.egress[0].extra.insert(
            "port".into(),
            serde_json::json!({"number": 9080, "protocol": "HTTP"}),
        );
        assert!(!imports_everything(&s));
        s.spec.egress.clear();
        assert!(imports_everything(&s));
    }
}
