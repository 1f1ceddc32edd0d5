//! The cluster index: what lazyload knows about the cluster, in the shape its decisions need.
//!
//! Kubernetes and Istio objects are converted to small domain types at the edge, one object at a
//! time ([`convert`], shared by the kube watchers and the [`snapshot`] loader), and kept in
//! tables with the lookups the model makes on every reconcile already built: Services by
//! namespace, label and cluster IP (`services`), pods by IP (`pods`), VirtualServices by host and
//! ServiceEntry hosts (`routing`). Each table owns its lookups; [`ClusterIndex`] is the one facade
//! over them and keeps what spans tables (a pod's fences come from the Services selecting it).
//!
//! For the access-log learner it also keeps pods by IP and, per pod, the fences a call from it
//! belongs to (the Services selecting it, and its workload fence): both are maintained when pods
//! or Services change, so attributing an access-log entry is two hash lookups and no allocation.
//! The index is a plain struct: a caller sharing it between tasks wraps it (the learner reads it
//! under an `RwLock` read guard; writers are rare).

pub mod convert;
mod objects;
mod pods;
mod routing;
mod services;
pub mod snapshot;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

pub use self::objects::{
    Error, ExportTo, NamespaceInfo, PodInfo, Result, ServiceEntryInfo, ServiceInfo, ServicePort,
    VirtualServiceInfo,
};
use self::pods::Pods;
use self::routing::{ServiceEntries, VirtualServices};
use self::services::Services;
use crate::config::FenceLabelKey;
use crate::vocab::ObjectKey;
use crate::vocab::host;
use crate::vocab::labels::{Labels, subset_matches};

/// The name of the workload fence of pods labelled `<key>: <value>` under `fenceLabelKeyAlias`
/// (`<alias>-<value>.workload.identity`, as documented on [`FenceLabelKey`]).
pub fn workload_fence_name(label: &FenceLabelKey, value: &str) -> String {
    format!("{}-{value}.workload.identity", label.alias)
}

/// An object the index keeps, converted ([`convert::convert`]).
#[derive(Clone, Debug)]
pub enum Indexed {
    /// A Namespace.
    Namespace(NamespaceInfo),
    /// A Service.
    Service(ServiceInfo),
    /// A Pod.
    Pod(PodInfo),
    /// A VirtualService.
    VirtualService(VirtualServiceInfo),
    /// A ServiceEntry.
    ServiceEntry(ServiceEntryInfo),
}

/// The cluster, indexed for the model's lookups.
#[derive(Clone, Debug, Default)]
pub struct ClusterIndex {
    domain: String,
    services: Services,
    namespaces: HashMap<String, NamespaceInfo>,
    pods: Pods,
    virtual_services: VirtualServices,
    service_entries: ServiceEntries,
    workload_label: Option<FenceLabelKey>,
    /// Bumped by every change attribution depends on (Services, Pods, ServiceEntries).
    generation: u64,
}

impl ClusterIndex {
    /// An empty index for a cluster whose domain is `domain` (`cluster.local`).
    pub fn new(domain: impl Into<String>) -> Self {
        Self {
            domain: domain.into(),
            ..Default::default()
        }
    }

    /// A number that changes whenever something attribution reads changes (Services, Pods,
    /// ServiceEntries, the workload label): caches of attribution results compare it.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn bump(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    /// The cluster domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// FQDN of a Service.
    pub fn fqdn(&self, key: &ObjectKey) -> String {
        host::service_fqdn(&key.name, &key.namespace, &self.domain)
    }

    /// Stores a converted object: the one step from [`convert::convert`] to the index, for the
    /// watchers and the snapshot loader alike.
    pub fn apply(&mut self, object: Indexed) {
        match object {
            Indexed::Namespace(n) => self.apply_namespace(n),
            Indexed::Service(s) => self.apply_service(s),
            Indexed::Pod(p) => self.apply_pod(p),
            Indexed::VirtualService(v) => self.apply_virtual_service(v),
            Indexed::ServiceEntry(e) => self.apply_service_entry(e),
        }
    }

    /// Removes the object of `kind` under `key`; whether there was one. Kinds the index does not
    /// keep (ServiceFences, Sidecars) are never in it.
    pub fn remove(&mut self, kind: convert::Kind, key: &ObjectKey) -> bool {
        use convert::Kind;
        match kind {
            Kind::Service => self.remove_service(key).is_some(),
            Kind::Namespace => self.remove_namespace(&key.name).is_some(),
            Kind::Pod => self.remove_pod(key).is_some(),
            Kind::VirtualService => self.remove_virtual_service(key).is_some(),
            Kind::ServiceEntry => self.remove_service_entry(key).is_some(),
            Kind::ServiceFence | Kind::Sidecar => false,
        }
    }

    /// Adds or replaces a Service.
    pub fn apply_service(&mut self, svc: ServiceInfo) {
        self.bump();
        let key = svc.key.clone();
        let selector = svc.selector.clone();
        let fqdn = self.fqdn(&key).into();
        let old = self.services.insert(svc, fqdn);
        if selector.is_some() || old.is_some_and(|o| o.selector.is_some()) {
            self.pods.service_changed(&key, selector.as_ref());
        }
    }

    /// Removes a Service.
    pub fn remove_service(&mut self, key: &ObjectKey) -> Option<ServiceInfo> {
        self.bump();
        let old = self.services.remove(key)?;
        if old.selector.is_some() {
            self.pods.service_changed(key, None);
        }
        Some(old)
    }

    /// The Service whose cluster IP is `vip`, and its FQDN.
    pub fn service_by_vip(&self, vip: IpAddr) -> Option<(&ObjectKey, &str)> {
        self.services.by_vip(vip)
    }

    /// Whether a Service exists whose `name.namespace` is `name_ns` (one hash lookup, no
    /// allocation).
    pub fn has_service(&self, name_ns: &str) -> bool {
        self.services.has_short_name(name_ns)
    }

    /// Attributes calls from pods with the label `label.key` also to their workload fence
    /// (`fenceLabelKeyAlias`). Recomputes every pod's fences.
    pub fn set_workload_label(&mut self, label: Option<FenceLabelKey>) {
        self.bump();
        self.workload_label = label;
        let pods: Vec<PodInfo> = self.pods.values().cloned().collect();
        for pod in pods {
            self.insert_pod(pod);
        }
    }

    /// Adds or replaces a Pod, computing the fences its calls belong to. A pod equal to the one
    /// indexed changes nothing: most Pod events touch nothing lazyload keeps (conditions,
    /// container statuses), and a change would invalidate every attribution cache for nothing.
    pub fn apply_pod(&mut self, pod: PodInfo) {
        if self.pods.get(&pod.key) != Some(&pod) {
            self.bump();
            self.insert_pod(pod);
        }
    }

    fn insert_pod(&mut self, pod: PodInfo) {
        let (services, workload) = self.fences_of(&pod);
        self.pods.insert(pod, services, workload);
    }

    /// The fences a call from `pod` belongs to: the Services selecting it (sorted), and its
    /// workload fence when `fenceLabelKeyAlias` applies.
    fn fences_of(&self, pod: &PodInfo) -> (Vec<ObjectKey>, Option<ObjectKey>) {
        let mut services: Vec<ObjectKey> = self
            .services_in(&pod.key.namespace)
            .filter(|s| {
                s.selector
                    .as_ref()
                    .is_some_and(|sel| subset_matches(sel, &pod.labels))
            })
            .map(|s| s.key.clone())
            .collect();
        services.sort();
        let workload = self.workload_label.as_ref().and_then(|label| {
            let value = pod.labels.get(&label.key)?;
            Some(ObjectKey::new(
                pod.key.namespace.clone(),
                workload_fence_name(label, value),
            ))
        });
        (services, workload)
    }

    /// Removes a Pod.
    pub fn remove_pod(&mut self, key: &ObjectKey) -> Option<PodInfo> {
        self.bump();
        self.pods.remove(key)
    }

    /// The pods (not on the host network) that have `ip`, each with the fences its calls
    /// belong to (see [`Self::pod_fences`]); several when IPs overlap (pods of several clusters,
    /// or a stale pod not yet removed). One hash lookup, no allocation.
    pub fn pods_at(&self, ip: IpAddr) -> impl Iterator<Item = (&PodInfo, &[ObjectKey])> + '_ {
        self.pods.at(ip)
    }

    /// The fences a call from pod `key` belongs to: the Services selecting it (sorted), then its
    /// workload fence when `fenceLabelKeyAlias` applies.
    pub fn pod_fences(&self, key: &ObjectKey) -> &[ObjectKey] {
        self.pods.fences(key)
    }

    /// A Service.
    pub fn service(&self, key: &ObjectKey) -> Option<&ServiceInfo> {
        self.services.get(key)
    }

    /// Every Service, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &ServiceInfo> {
        self.services.values()
    }

    /// The Services of a namespace, by name.
    pub fn services_in<'a>(&'a self, namespace: &str) -> impl Iterator<Item = &'a ServiceInfo> + 'a {
        self.services.in_namespace(namespace)
    }

    /// Services carrying every label of `selector` (none for an empty selector).
    pub fn services_with_labels(&self, selector: &Labels) -> BTreeSet<ObjectKey> {
        self.services.with_labels(selector)
    }

    /// Adds or replaces a Namespace.
    pub fn apply_namespace(&mut self, ns: NamespaceInfo) {
        self.namespaces.insert(ns.name.clone(), ns);
    }

    /// Removes a Namespace.
    pub fn remove_namespace(&mut self, name: &str) -> Option<NamespaceInfo> {
        self.namespaces.remove(name)
    }

    /// A Namespace.
    pub fn namespace(&self, name: &str) -> Option<&NamespaceInfo> {
        self.namespaces.get(name)
    }

    /// Every Namespace, in no particular order.
    pub fn namespaces(&self) -> impl Iterator<Item = &NamespaceInfo> {
        self.namespaces.values()
    }

    /// A Pod by key.
    pub fn pod(&self, key: &ObjectKey) -> Option<&PodInfo> {
        self.pods.get(key)
    }

    /// Every Pod, in no particular order.
    pub fn pods(&self) -> impl Iterator<Item = &PodInfo> {
        self.pods.values()
    }

    /// Every VirtualService, in no particular order.
    pub fn virtual_services(&self) -> impl Iterator<Item = &VirtualServiceInfo> {
        self.virtual_services.values()
    }

    /// Adds or replaces a VirtualService.
    pub fn apply_virtual_service(&mut self, vs: VirtualServiceInfo) {
        self.virtual_services.insert(vs);
    }

    /// Removes a VirtualService.
    pub fn remove_virtual_service(&mut self, key: &ObjectKey) -> Option<VirtualServiceInfo> {
        self.virtual_services.remove(key)
    }

    /// Adds or replaces a ServiceEntry.
    pub fn apply_service_entry(&mut self, se: ServiceEntryInfo) {
        self.bump();
        self.service_entries.insert(se);
    }

    /// Removes a ServiceEntry.
    pub fn remove_service_entry(&mut self, key: &ObjectKey) -> Option<ServiceEntryInfo> {
        self.bump();
        self.service_entries.remove(key)
    }

    /// Whether a ServiceEntry declares `host`, exactly or by a `*.suffix` wildcard (no
    /// allocation).
    pub fn is_service_entry_host(&self, host: &str) -> bool {
        self.service_entries.declares(host)
    }

    /// Every ServiceEntry, in no particular order.
    pub fn service_entries(&self) -> impl Iterator<Item = &ServiceEntryInfo> {
        self.service_entries.values()
    }

    /// Where a call to `host` from a workload in `namespace` can end up besides `host` itself:
    /// the destinations of every VirtualService for `host` that applies to sidecars and is
    /// exported to `namespace`, following delegates. Not transitive: the caller's proxy only
    /// needs the clusters its own routes name.
    pub fn destinations(&self, host: &str, namespace: &str) -> BTreeSet<String> {
        self.virtual_services.destinations(host, namespace)
    }

    /// Number of indexed objects per kind, for logs and readiness.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        BTreeMap::from([
            ("services", self.services.len()),
            ("namespaces", self.namespaces.len()),
            ("virtualservices", self.virtual_services.len()),
            ("serviceentries", self.service_entries.len()),
            ("pods", self.pods.len()),
        ])
    }
}
