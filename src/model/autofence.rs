//! Auto-fencing: which Services get a fence without anyone writing one.
//!
//! `slime.io/serviceFenced` on the Service overrides the Namespace's label, which overrides
//! `defaultFence`; only inside the management scope (namespace black/white list and
//! `managementSelectors`, never lazyload's own namespace `global.slimeNamespace`); Services
//! without a selector, lazyload's own Services and the global-sidecar never get one.
//! lazyload only ever deletes fences it created (label `app.kubernetes.io/created-by:
//! fence-controller`), and only when their Service is deleted (and they hold nothing learned) or
//! when `cleanupAutoFences` asks for it: learned dependencies live in a fence's status, so a
//! configuration change (autoFence off, a narrower scope, `defaultFence`) must not destroy them.
//! A fence lazyload keeps but no longer wants is reported ([`Unmanaged`], a condition on it).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::sidecar::is_global_sidecar_fence;
use crate::config::{Config, FenceLabelKey, NamespaceList};
use crate::index::{ClusterIndex, ServiceInfo, workload_fence_name};
use crate::vocab::ObjectKey;
use crate::vocab::fence::{
    CREATED_BY_FENCE_CONTROLLER, LABEL_CREATED_BY, LABEL_ISTIO_REV, LABEL_SERVICE_FENCED, ServiceFence,
    ServiceFenceSpec, WorkloadSelector,
};
use crate::vocab::labels::selector_matches;

/// The label lazyload's own Services carry (relay, collector, admin), wherever it is installed.
pub const LABEL_LAZYLOAD_NAME: (&str, &str) = ("app.kubernetes.io/name", "lazyload");

/// What to do about the auto fence of one Service.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Create this fence.
    Create(Box<ServiceFence>),
    /// Delete the fence lazyload created.
    Delete,
    /// Keep the fence lazyload created although auto-fencing no longer wants it.
    Unmanaged(Unmanaged),
    /// Nothing to do.
    Keep,
}

/// Why auto-fencing does not want a fence for a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmanaged {
    /// The Service is gone.
    ServiceDeleted,
    /// The Service has no selector (no workload to scope).
    NoSelector,
    /// The Service is the global-sidecar's.
    GlobalSidecar,
    /// The Service is lazyload's own (label `app.kubernetes.io/name: lazyload`).
    Lazyload,
    /// `general.autoFence` is off.
    AutoFenceOff,
    /// The namespace is outside the management scope (black/white list, `managementSelectors`).
    OutOfScope,
    /// `slime.io/serviceFenced: "false"` on the Service or namespace, or `defaultFence` false.
    NotFenced,
    /// The Service (or its namespace) belongs to another Istio revision.
    OtherRevision,
    /// A workload fence: no running pod carries its label value any more.
    NoPods,
}

impl Unmanaged {
    /// CamelCase reason, for the condition.
    pub fn reason(self) -> &'static str {
        match self {
            Self::ServiceDeleted => "ServiceDeleted",
            Self::NoSelector => "ServiceWithoutSelector",
            Self::GlobalSidecar => "GlobalSidecar",
            Self::Lazyload => "LazyloadService",
            Self::AutoFenceOff => "AutoFenceOff",
            Self::OutOfScope => "OutOfScope",
            Self::NotFenced => "NotFenced",
            Self::OtherRevision => "OtherRevision",
            Self::NoPods => "NoPods",
        }
    }

    /// What happened, and what the user can do about it.
    pub fn message(self) -> &'static str {
        match self {
            Self::ServiceDeleted => {
                "the Service is gone; kept because the fence holds learned dependencies \
                 (delete it, or set general.cleanupAutoFences)"
            }
            Self::NoSelector => "the Service has no selector",
            Self::GlobalSidecar => "the Service is the global-sidecar's",
            Self::Lazyload => "the Service is lazyload's own",
            Self::AutoFenceOff => "general.autoFence is off",
            Self::OutOfScope => "the namespace is outside the management scope",
            Self::NotFenced => "slime.io/serviceFenced or defaultFence says no fence",
            Self::OtherRevision => "the Service belongs to another Istio revision (global.istioRev)",
            Self::NoPods => {
                "no running pod carries the label value; kept because the fence holds learned \
                 dependencies (delete it, or set general.cleanupAutoFences)"
            }
        }
    }
}

/// Condition type on auto-created fences: whether auto-fencing still manages the fence.
pub const CONDITION_AUTO_FENCE_MANAGED: &str = "AutoFenceManaged";

/// Decides the auto fence for the Service `key`, given the fence that exists now (if any).
///
/// A fence lazyload created and no longer wants is deleted only when its Service is deleted and
/// its status holds nothing learned, or when `cleanupAutoFences` is on; otherwise it is kept
/// ([`Action::Unmanaged`]).
pub fn decide(
    key: &ObjectKey,
    existing: Option<&ServiceFence>,
    index: &ClusterIndex,
    cfg: &Config,
) -> Action {
    match (existing, unwanted(key, index, cfg)) {
        // Another revision's fence is another lazyload's business (Slime skips it too).
        (Some(fence), _) if !fence.is_auto_created() || !cfg.global.rev_in_scope(&revision(fence)) => {
            Action::Keep
        }
        (None, None) => Action::Create(Box::new(match workload_value(&key.name, cfg) {
            Some((label, value)) => new_workload_fence(key, &label.key, value, cfg),
            None => new_fence(key, cfg),
        })),
        (None, Some(_)) | (Some(_), None) => Action::Keep,
        (Some(_), Some(_)) if cfg.general.cleanup_auto_fences => Action::Delete,
        (Some(fence), Some(Unmanaged::ServiceDeleted | Unmanaged::NoPods)) if !holds_learned(fence) => {
            Action::Delete
        }
        (Some(_), Some(why)) => Action::Unmanaged(why),
    }
}

/// For a fence lazyload created: `None` while auto-fencing wants it, else why not.
pub fn unmanaged(fence: &ServiceFence, index: &ClusterIndex, cfg: &Config) -> Option<Unmanaged> {
    unwanted(&ObjectKey::of_or_empty(&fence.metadata), index, cfg)
}

/// A fence's `istio.io/rev` label (`""` when unlabelled).
pub fn revision(fence: &ServiceFence) -> String {
    fence
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_ISTIO_REV))
        .cloned()
        .unwrap_or_default()
}

/// Whether the fence's status holds learned dependencies (what a deletion would lose).
pub fn holds_learned(fence: &ServiceFence) -> bool {
    fence
        .status
        .as_ref()
        .is_some_and(|s| !s.metric_status.is_empty() || !s.last_seen.is_empty())
}

/// `None` if the fence `key` (a Service's or a workload fence) should exist, else why not.
fn unwanted(key: &ObjectKey, index: &ClusterIndex, cfg: &Config) -> Option<Unmanaged> {
    match workload_value(&key.name, cfg) {
        Some((label, value)) => unwanted_workload(key, &label.key, value, index, cfg),
        None => unwanted_service(key, index, cfg),
    }
}

/// With `fenceLabelKeyAlias`, the label and value a workload fence name stands for.
fn workload_value<'n>(name: &'n str, cfg: &'n Config) -> Option<(&'n FenceLabelKey, &'n str)> {
    let label = cfg.general.fence_label_key_alias.as_ref()?;
    let value = name
        .strip_prefix(label.alias.as_str())?
        .strip_prefix('-')?
        .strip_suffix(WORKLOAD_FENCE_SUFFIX)?;
    (workload_fence_name(label, value) == name).then_some((label, value))
}

/// Suffix of workload fence names (Slime's).
const WORKLOAD_FENCE_SUFFIX: &str = ".workload.identity";

/// Whether a pod is running with an IP (what Slime's pod handler requires).
fn running_with(pod: &crate::index::PodInfo, key: &str, value: &str) -> bool {
    !pod.ips.is_empty() && pod.labels.get(key).is_some_and(|v| v == value)
}

/// `None` if the workload fence for `key: value` in `fence.namespace` should exist.
fn unwanted_workload(
    fence: &ObjectKey,
    key: &str,
    value: &str,
    index: &ClusterIndex,
    cfg: &Config,
) -> Option<Unmanaged> {
    let carried = index
        .pods()
        .any(|p| p.key.namespace == fence.namespace && running_with(p, key, value));
    if !carried {
        return Some(Unmanaged::NoPods);
    }
    managed_here(&fence.namespace, None, index, cfg)
}

/// `None` if auto-fencing manages objects in `namespace` labelled with revision `rev` (else the
/// namespace's revision, as Istio picks one): `autoFence` on, inside the management scope, and of
/// this lazyload's revision.
fn managed_here(
    namespace: &str,
    rev: Option<&String>,
    index: &ClusterIndex,
    cfg: &Config,
) -> Option<Unmanaged> {
    if !cfg.general.auto_fence {
        return Some(Unmanaged::AutoFenceOff);
    }
    let ns = index.namespace(namespace);
    if !in_scope(namespace, ns.map(|n| &n.labels), cfg) {
        return Some(Unmanaged::OutOfScope);
    }
    let rev = rev.or_else(|| ns.and_then(|n| n.labels.get(LABEL_ISTIO_REV)));
    (!cfg.global.rev_in_scope(rev.map_or("", String::as_str))).then_some(Unmanaged::OtherRevision)
}

/// The workload fences the running pods call for (`fenceLabelKeyAlias` with `autoFence`): one per
/// namespace and label value, named `<alias>-<value>.workload.identity`. Values that cannot make
/// a fence name (a label value may hold `_` or capitals) are skipped.
pub fn wanted_workload_fences(index: &ClusterIndex, cfg: &Config) -> std::collections::BTreeSet<ObjectKey> {
    let Some(label) = cfg.general.fence_label_key_alias.as_ref() else {
        return Default::default();
    };
    index
        .pods()
        .filter(|p| !p.ips.is_empty())
        .filter_map(|p| {
            let value = p.labels.get(&label.key)?;
            let name = workload_fence_name(label, value);
            crate::vocab::host::dns_name(&name).ok()?;
            Some(ObjectKey::new(p.key.namespace.clone(), name))
        })
        .filter(|key| unwanted(key, index, cfg).is_none())
        .collect()
}

/// The workload fence lazyload creates for pods labelled `key: value` (Slime's shape: it selects
/// them by that label).
pub fn new_workload_fence(fence: &ObjectKey, key: &str, value: &str, cfg: &Config) -> ServiceFence {
    let mut f = new_fence(fence, cfg);
    f.spec.workload_selector = Some(WorkloadSelector {
        from_service: false,
        labels: BTreeMap::from([(key.to_string(), value.to_string())]),
    });
    f
}

/// `None` if the Service should be fenced, else why not.
fn unwanted_service(key: &ObjectKey, index: &ClusterIndex, cfg: &Config) -> Option<Unmanaged> {
    let Some(svc) = index.service(key) else {
        return Some(Unmanaged::ServiceDeleted);
    };
    if svc.selector.is_none() {
        return Some(Unmanaged::NoSelector);
    }
    if is_global_sidecar_fence(key, cfg) {
        return Some(Unmanaged::GlobalSidecar);
    }
    if is_own_service(svc, cfg) {
        return Some(Unmanaged::Lazyload);
    }
    if let Some(why) = managed_here(&key.namespace, svc.labels.get(LABEL_ISTIO_REV), index, cfg) {
        return Some(why);
    }
    let ns = index.namespace(&key.namespace);
    let label = |labels: &BTreeMap<String, String>| match labels.get(LABEL_SERVICE_FENCED).map(String::as_str)
    {
        Some("true") => Some(true),
        Some("false") => Some(false),
        _ => None,
    };
    let fenced = label(&svc.labels)
        .or_else(|| ns.and_then(|n| label(&n.labels)))
        .unwrap_or(cfg.general.default_fence);
    (!fenced).then_some(Unmanaged::NotFenced)
}

/// Whether a Service is lazyload's own or the global-sidecar's: it is never fenced, and its ports
/// are not application ports.
pub fn is_own_service(svc: &ServiceInfo, cfg: &Config) -> bool {
    let (label, value) = LABEL_LAZYLOAD_NAME;
    is_global_sidecar_fence(&svc.key, cfg) || svc.labels.get(label).is_some_and(|v| v == value)
}

/// Whether lazyload manages a namespace (auto-fencing, auto-port): inside the configured scope
/// and not lazyload's own namespace.
pub fn in_scope(namespace: &str, labels: Option<&BTreeMap<String, String>>, cfg: &Config) -> bool {
    if namespace == cfg.global.slime_namespace {
        return false;
    }
    let listed = match &cfg.general.namespace_list {
        Some(NamespaceList::Black(list)) => !list.contains(namespace),
        Some(NamespaceList::White(list)) => list.contains(namespace),
        None => true,
    };
    let selectors = &cfg.general.management_selectors;
    listed
        && (selectors.is_empty() || labels.is_some_and(|l| selectors.iter().any(|s| selector_matches(s, l))))
}

/// The fence auto-fencing creates for a Service.
pub fn new_fence(key: &ObjectKey, cfg: &Config) -> ServiceFence {
    let mut labels = BTreeMap::from([(
        LABEL_CREATED_BY.to_string(),
        CREATED_BY_FENCE_CONTROLLER.to_string(),
    )]);
    if let Some(rev) = cfg.global.own_rev() {
        labels.insert(LABEL_ISTIO_REV.to_string(), rev.to_string());
    }
    ServiceFence {
        metadata: ObjectMeta {
            name: Some(key.name.clone()),
            namespace: Some(key.namespace.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: ServiceFenceSpec {
            enable: true,
            workload_selector: Some(WorkloadSelector {
                from_service: true,
                ..Default::default()
            }),
            ..Default::default()
        },
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::ServiceInfo;
    use crate::vocab::istio::IstioVersion;

    fn condition(fence: &ServiceFence, index: &ClusterIndex, cfg: &Config) -> Option<(String, String)> {
        let eval = crate::model::evaluate(
            fence,
            index,
            cfg,
            jiff::Timestamp::UNIX_EPOCH,
            IstioVersion::default(),
        );
        assert!(eval.sidecar.is_ok(), "a kept fence keeps its Sidecar");
        eval.status
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_AUTO_FENCE_MANAGED)
            .map(|c| (c.status.clone(), c.reason.clone()))
    }

    #[test]
    fn revisions_decide_which_services_and_fences_are_this_lazyloads() {
        let mut index = ClusterIndex::new("cluster.local");
        for (ns, rev) in [
            ("canary-ns", Some("canary")),
            ("stable-ns", Some("stable")),
            ("plain", None),
        ] {
            index.apply_namespace(crate::index::NamespaceInfo {
                name: ns.to_string(),
                labels: rev
                    .map(|r| [(LABEL_ISTIO_REV.to_string(), r.to_string())].into())
                    .unwrap_or_default(),
            });
            index.apply_service(ServiceInfo {
                key: ObjectKey::new(ns, "web"),
                labels: Default::default(),
                selector: Some([("app".to_string(), "web".to_string())].into()),
                ports: vec![],
                cluster_ips: vec![],
            });
        }
        let on = "general:\n  autoFence: true\n  defaultFence: true\n";
        let cases = [
            (
                format!("{on}global:\n  istioRev: canary\n"),
                vec!["canary-ns", "plain"],
            ),
            (
                format!("{on}global:\n  istioRev: canary\n  strictRev: true\n"),
                vec!["canary-ns"],
            ),
            (on.to_string(), vec!["canary-ns", "plain", "stable-ns"]),
        ];
        for (config, created) in cases {
            let cfg = Config::parse(&config).unwrap().config;
            let mut got = Vec::new();
            for ns in ["canary-ns", "plain", "stable-ns"] {
                if let Action::Create(f) = decide(&ObjectKey::new(ns, "web"), None, &index, &cfg) {
                    // Created fences carry this lazyload's revision.
                    let rev = f
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(LABEL_ISTIO_REV))
                        .cloned();
                    assert_eq!(rev.as_deref(), cfg.global.own_rev(), "{config}");
                    got.push(ns);
                }
            }
            assert_eq!(got, created, "{config}");
        }
        // Another revision's auto fence is never touched, even with clean-up on and no Service.
        let cfg = Config::parse(&format!(
            "{on}  cleanupAutoFences: true\nglobal:\n  istioRev: canary\n"
        ))
        .unwrap()
        .config;
        let stable = Config::parse("global:\n  istioRev: stable\n").unwrap().config;
        let theirs = new_fence(&ObjectKey::new("gone", "web"), &stable);
        assert_eq!(
            decide(&ObjectKey::new("gone", "web"), Some(&theirs), &index, &cfg),
            Action::Keep
        );
        let ours = new_fence(&ObjectKey::new("gone", "web"), &cfg);
        assert_eq!(
            decide(&ObjectKey::new("gone", "web"), Some(&ours), &index, &cfg),
            Action::Delete
        );
    }

    #[test]
    fn kept_fences_keep_their_sidecar_and_say_they_are_no_longer_managed() {
        let mut index = ClusterIndex::new("cluster.local");
        index.apply_service(ServiceInfo {
            key: ObjectKey::new("default", "web"),
            labels: Default::default(),
            selector: Some([("app".to_string(), "web".to_string())].into()),
            ports: vec![],
            cluster_ips: vec![],
        });
        let on = Config::parse("general:\n  autoFence: true\n  defaultFence: true\n")
            .unwrap()
            .config;
        let fence = new_fence(&ObjectKey::new("default", "web"), &on);
        let cases = [
            (
                "general:\n  autoFence: true\n  defaultFence: true\n",
                "True",
                "Managed",
            ),
            ("general:\n  autoFence: false\n", "False", "AutoFenceOff"),
            ("general:\n  autoFence: true\n", "False", "NotFenced"),
            (
                "general:\n  autoFence: true\n  defaultFence: true\n  whiteNamespaceList: other\n",
                "False",
                "OutOfScope",
            ),
        ];
        for (config, status, reason) in cases {
            let cfg = Config::parse(config).unwrap().config;
            assert_eq!(
                condition(&fence, &index, &cfg),
                Some((status.to_string(), reason.to_string())),
                "{config}"
            );
        }
        let mut manual = fence.clone();
        manual.metadata.labels = None;
        assert_eq!(condition(&manual, &index, &Config::default()), None);
    }
}
