//! The Sidecar a fence stands for.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

use crate::config::{Config, GlobalSidecarMode};
use crate::index::ClusterIndex;
use crate::vocab::ObjectKey;
use crate::vocab::fence::{Destinations, LABEL_ISTIO_REV, ServiceFence};
use crate::vocab::istio::{EgressListener, IstioKind, IstioVersion, Sidecar, SidecarSpec, WorkloadSelector};
use crate::vocab::{GLOBAL_SIDECAR, host};

/// Whether a ServiceFence controls `sidecar` (the owner reference lazyload writes): such a
/// Sidecar is lazyload's; every other one is the users'.
pub fn is_fence_controlled(sidecar: &Sidecar) -> bool {
    let group = ServiceFence::group(&());
    sidecar.metadata.owner_references.iter().flatten().any(|o| {
        o.controller == Some(true)
            && o.kind == ServiceFence::kind(&())
            && o.api_version.split('/').next() == Some(&*group)
    })
}

/// Why a fence yields no Sidecar (the `SidecarGenerated` condition's reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoSidecar {
    /// `spec.enable` is false.
    Disabled,
    /// The fence is for the global-sidecar, which must see everything.
    GlobalSidecar,
    /// `workloadSelector.fromService` and no Service of that name exists.
    ServiceNotFound,
    /// `workloadSelector.fromService` and the Service selects no pods: an empty selector would
    /// scope every workload of the namespace.
    ServiceWithoutSelector,
}

impl NoSidecar {
    /// CamelCase reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Disabled => "Disabled",
            Self::GlobalSidecar => "GlobalSidecar",
            Self::ServiceNotFound => "ServiceNotFound",
            Self::ServiceWithoutSelector => "ServiceWithoutSelector",
        }
    }

    /// Human explanation.
    pub fn message(self) -> &'static str {
        match self {
            Self::Disabled => "spec.enable is false",
            Self::GlobalSidecar => "the global-sidecar must receive the full config and is never fenced",
            Self::ServiceNotFound => "workloadSelector.fromService is set but the Service does not exist",
            Self::ServiceWithoutSelector => {
                "workloadSelector.fromService is set but the Service has no selector"
            }
        }
    }
}

/// Whether a fence names the global-sidecar workload.
pub fn is_global_sidecar_fence(key: &ObjectKey, cfg: &Config) -> bool {
    key.name == GLOBAL_SIDECAR
        && (cfg.general.global_sidecar_mode == GlobalSidecarMode::Namespace
            || key.namespace == cfg.general.cluster_gs_namespace)
}

/// The egress hosts of a fence's Sidecar: Istio's and lazyload's namespaces, `stableHost`,
/// every ACTIVE or EXPIREWAIT dependency, and the global-sidecar when it lives elsewhere;
/// validated, sorted and de-duplicated.
pub fn egress_hosts(
    fence_namespace: &str,
    domains: &BTreeMap<String, Destinations>,
    cfg: &Config,
    domain: &str,
) -> Vec<String> {
    let defaults = [
        format!("{}/*", cfg.global.istio_namespace),
        format!("{}/*", cfg.global.slime_namespace),
    ];
    let mut hosts: BTreeSet<String> = defaults.iter().cloned().collect();
    hosts.extend(cfg.general.stable_host.iter().cloned());
    for (key, dest) in domains.iter().filter(|(_, d)| d.status.in_sidecar()) {
        if key.contains('/') {
            hosts.insert(key.clone());
        }
        hosts.extend(dest.hosts.iter().map(|h| format!("*/{h}")));
    }
    let gs_namespace = match cfg.general.global_sidecar_mode {
        GlobalSidecarMode::Namespace => Some(fence_namespace),
        GlobalSidecarMode::Cluster if cfg.general.cluster_gs_namespace != cfg.global.slime_namespace => {
            Some(cfg.general.cluster_gs_namespace.as_str())
        }
        GlobalSidecarMode::Cluster => None,
    };
    if let Some(ns) = gs_namespace {
        hosts.insert(format!("*/{}", host::service_fqdn(GLOBAL_SIDECAR, ns, domain)));
    }
    // Everything above was validated where it came from; this keeps a single bad entry from
    // ever reaching istiod, which would reject the whole Sidecar.
    hosts
        .into_iter()
        .filter(|h| host::sidecar_host(h).is_ok())
        .collect()
}

/// The workload labels the Sidecar selects.
pub fn workload_labels(
    fence: &ServiceFence,
    index: &ClusterIndex,
    cfg: &Config,
) -> Result<BTreeMap<String, String>, NoSidecar> {
    let name = fence.metadata.name.clone().unwrap_or_default();
    let namespace = fence.metadata.namespace.clone().unwrap_or_default();
    match &fence.spec.workload_selector {
        Some(ws) if !ws.labels.is_empty() => Ok(ws.labels.clone()),
        Some(ws) if ws.from_service => {
            let svc = index
                .service(&ObjectKey::new(namespace, name))
                .ok_or(NoSidecar::ServiceNotFound)?;
            svc.selector.clone().ok_or(NoSidecar::ServiceWithoutSelector)
        }
        _ => Ok(BTreeMap::from([(cfg.global.service.clone(), name)])),
    }
}

/// The desired Sidecar object: same name and namespace as the fence, owned by it, carrying its
/// `istio.io/rev` label.
pub fn build(
    fence: &ServiceFence,
    labels: BTreeMap<String, String>,
    hosts: Vec<String>,
    version: IstioVersion,
) -> Sidecar {
    let rev = fence
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_ISTIO_REV))
        .map(|r| BTreeMap::from([(LABEL_ISTIO_REV.to_string(), r.clone())]));
    let owner = fence.metadata.uid.as_ref().map(|uid| OwnerReference {
        api_version: ServiceFence::api_version(&()).into_owned(),
        kind: ServiceFence::kind(&()).into_owned(),
        name: fence.metadata.name.clone().unwrap_or_default(),
        uid: uid.clone(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    });
    let mut sidecar = Sidecar::new(
        fence.metadata.name.as_deref().unwrap_or_default(),
        &version.resource(IstioKind::Sidecar),
        SidecarSpec {
            workload_selector: Some(WorkloadSelector {
                labels,
                ..Default::default()
            }),
            egress: vec![EgressListener {
                hosts,
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    sidecar.metadata = ObjectMeta {
        namespace: fence.metadata.namespace.clone(),
        labels: rev,
        owner_references: owner.map(|o| vec![o]),
        ..sidecar.metadata
    };
    sidecar
}
