//! Auto-fencing: which Services get a fence without anyone writing one.
//!
//! `slime.io/serviceFenced` on the Service overrides the Namespace's label, which overrides
//! `defaultFence`; only inside the management scope (namespace black/white list and
//! `managementSelectors`, never lazyload's own namespace `global.slimeNamespace`); Services
//! without a selector, lazyload's own Services and the global-sidecar never get one.
//! lazyload only ever deletes fences it created (label `app.kubernetes.io/created-by:
//! fence-controller`); unlike Slime it deletes them when `autoFence` is switched off.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::fence::{
    CREATED_BY_FENCE_CONTROLLER, LABEL_CREATED_BY, LABEL_ISTIO_REV, LABEL_SERVICE_FENCED, ServiceFence,
    ServiceFenceSpec, WorkloadSelector,
};
use super::labels::selector_matches;
use super::sidecar::is_global_sidecar_fence;
use crate::config::{Config, NamespaceList};
use crate::index::{ClusterIndex, ObjectKey, ServiceInfo};

/// The label lazyload's own Services carry (relay, collector, admin), wherever it is installed.
pub const LABEL_LAZYLOAD_NAME: (&str, &str) = ("app.kubernetes.io/name", "lazyload");

/// What to do about the auto fence of one Service.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Create this fence.
    Create(Box<ServiceFence>),
    /// Delete the fence lazyload created.
    Delete,
    /// Nothing to do.
    Keep,
}

/// Decides the auto fence for the Service `key`, given the fence that exists now (if any).
pub fn decide(
    key: &ObjectKey,
    existing: Option<&ServiceFence>,
    index: &ClusterIndex,
    cfg: &Config,
) -> Action {
    if existing.is_some_and(|f| !f.is_auto_created()) {
        return Action::Keep;
    }
    let wanted = cfg.general.auto_fence && wants_fence(key, index, cfg);
    match (wanted, existing) {
        (true, None) => Action::Create(Box::new(new_fence(key, cfg))),
        (false, Some(_)) => Action::Delete,
        _ => Action::Keep,
    }
}

/// Whether the Service should be fenced (ignoring `autoFence`).
fn wants_fence(key: &ObjectKey, index: &ClusterIndex, cfg: &Config) -> bool {
    let Some(svc) = index.service(key) else {
        return false;
    };
    if svc.selector.is_none() || is_own_service(svc, cfg) {
        return false;
    }
    let ns = index.namespace(&key.namespace);
    if !in_scope(&key.namespace, ns.map(|n| &n.labels), cfg) {
        return false;
    }
    let label = |labels: &BTreeMap<String, String>| match labels.get(LABEL_SERVICE_FENCED).map(String::as_str)
    {
        Some("true") => Some(true),
        Some("false") => Some(false),
        _ => None,
    };
    label(&svc.labels)
        .or_else(|| ns.and_then(|n| label(&n.labels)))
        .unwrap_or(cfg.general.default_fence)
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
    if !cfg.global.istio_rev.is_empty() {
        labels.insert(LABEL_ISTIO_REV.to_string(), cfg.global.istio_rev.clone());
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
