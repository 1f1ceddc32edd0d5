//! The cluster index: what lazyload knows about the cluster, in the shape its decisions need.
//!
//! Kubernetes and Istio objects are converted to small domain types at the edge
//! ([`ServiceInfo::try_from`] and friends) and kept with the lookups the model makes on every
//! reconcile already built: services by namespace and by label, VirtualServices by host. The
//! index is plain data; the kube reflectors (or a snapshot file, [`snapshot`]) feed it.
//!
//! For the access-log learner it also keeps pods by IP and, per pod, the fences a call from it
//! belongs to (the Services selecting it, and its workload fence): both are maintained when pods
//! or Services change, so attributing an access-log entry is two hash lookups and no allocation.
//! The index is a plain struct: a caller sharing it between tasks wraps it (the learner reads it
//! under an `RwLock` read guard; writers are rare).

pub mod snapshot;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};

use crate::config::FenceLabelKey;
use crate::hash::FastMap;

use crate::model::host;
use crate::model::istio::{HttpRoute, ServiceEntry, VirtualService};
use crate::model::labels::{Labels, subset_matches};

/// `Result` alias for index conversions.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an object could not be indexed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object has no name or namespace.
    #[error("{kind} without {field}")]
    Missing {
        /// Object kind.
        kind: &'static str,
        /// The missing metadata field.
        field: &'static str,
    },
    /// A field holds a value no cluster would accept (a port out of 1..=65535, an IP that is
    /// not one): the object is rejected rather than indexed with the value dropped.
    #[error("{field}: {value:?} is {why}")]
    Field {
        /// Path of the field (`spec.ports[0].port`).
        field: String,
        /// The value as written.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// `port` if it is a port number (1..=65535), else an error naming `field`.
fn port_number(field: impl FnOnce() -> String, port: impl Into<i64>) -> Result<u16> {
    let port = port.into();
    u16::try_from(port)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| Error::Field {
            field: field(),
            value: port.to_string(),
            why: "not a port (1..=65535)",
        })
}

/// `ip` parsed, else an error naming `field`.
fn ip_address(field: impl FnOnce() -> String, ip: &str) -> Result<IpAddr> {
    ip.parse().map_err(|_| Error::Field {
        field: field(),
        value: ip.to_string(),
        why: "not an IP address",
    })
}

/// Namespace and name of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectKey {
    /// A key.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn of(
        kind: &'static str,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> Result<Self> {
        let name = meta.name.clone().ok_or(Error::Missing { kind, field: "name" })?;
        let namespace = meta.namespace.clone().ok_or(Error::Missing {
            kind,
            field: "namespace",
        })?;
        Ok(Self { namespace, name })
    }
}

/// Serialised as `namespace/name`.
impl serde::Serialize for ObjectKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Port name (`http-web`); its prefix is Istio's protocol hint.
    pub name: String,
    /// Port number.
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    /// `appProtocol`, Istio's other protocol hint.
    pub app_protocol: Option<String>,
}

/// What lazyload needs of a Kubernetes Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Namespace and name.
    pub key: ObjectKey,
    /// Labels of the Service object.
    pub labels: Labels,
    /// Pod selector; `None` for Services without one (they select no pods).
    pub selector: Option<Labels>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Cluster IPs (VIPs).
    pub cluster_ips: Vec<String>,
}

impl TryFrom<&Service> for ServiceInfo {
    type Error = Error;

    fn try_from(svc: &Service) -> Result<Self> {
        let key = ObjectKey::of("Service", &svc.metadata)?;
        let spec = svc.spec.clone().unwrap_or_default();
        let ports = spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                Ok(ServicePort {
                    port: port_number(|| format!("spec.ports[{i}].port"), p.port)?,
                    name: p.name.unwrap_or_default(),
                    protocol: p.protocol.unwrap_or_else(|| "TCP".into()),
                    app_protocol: p.app_protocol,
                })
            })
            .collect::<Result<_>>()?;
        let mut cluster_ips: Vec<String> = spec.cluster_ips.unwrap_or_default();
        if let Some(ip) = spec.cluster_ip
            && !cluster_ips.contains(&ip)
        {
            cluster_ips.push(ip);
        }
        // `None` (headless) and empty (not yet allocated) are what the API server writes; any
        // other value must be an address.
        cluster_ips.retain(|ip| !ip.is_empty() && ip != "None");
        for ip in &cluster_ips {
            ip_address(|| "spec.clusterIPs".into(), ip)?;
        }
        Ok(Self {
            key,
            labels: svc.metadata.labels.clone().unwrap_or_default(),
            selector: spec.selector.filter(|s| !s.is_empty()),
            ports,
            cluster_ips,
        })
    }
}

/// What lazyload needs of a Namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: Labels,
}

impl TryFrom<&Namespace> for NamespaceInfo {
    type Error = Error;

    fn try_from(ns: &Namespace) -> Result<Self> {
        Ok(Self {
            name: ns.metadata.name.clone().ok_or(Error::Missing {
                kind: "Namespace",
                field: "name",
            })?,
            labels: ns.metadata.labels.clone().unwrap_or_default(),
        })
    }
}

/// What lazyload needs of a Pod: where calls from it come from, and who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace and name.
    pub key: ObjectKey,
    /// Labels (matched by Service selectors and `fenceLabelKeyAlias`).
    pub labels: Labels,
    /// Every pod IP (`status.podIPs`, `status.podIP`); empty once the pod has finished, because a
    /// finished pod's IP may already belong to another pod.
    pub ips: Vec<IpAddr>,
    /// `spec.hostNetwork`: such a pod shares its node's IP, so calls from that IP are never
    /// attributed to it.
    pub host_network: bool,
    /// `spec.serviceAccountName` (`default` when unset), checked against a SPIFFE identity.
    pub service_account: String,
}

impl TryFrom<&Pod> for PodInfo {
    type Error = Error;

    fn try_from(pod: &Pod) -> Result<Self> {
        let key = ObjectKey::of("Pod", &pod.metadata)?;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let finished = status
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        let mut ips: Vec<IpAddr> = Vec::new();
        if !finished && let Some(status) = status {
            let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
            for ip in listed.chain(status.pod_ip.as_deref()).filter(|ip| !ip.is_empty()) {
                let ip = ip_address(|| "status.podIPs".into(), ip)?;
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        Ok(Self {
            key,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ips,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
        })
    }
}

/// The name of the workload fence of pods labelled `<key>: <value>` under `fenceLabelKeyAlias`
/// (`<alias>-<value>.workload.identity`, as documented on [`FenceLabelKey`]).
pub fn workload_fence_name(label: &FenceLabelKey, value: &str) -> String {
    format!("{}-{value}.workload.identity", label.alias)
}

/// The pod slots of one IP: almost always one, kept inline so that the hot path makes no extra
/// memory hop.
#[derive(Clone, Debug)]
enum IpSlots {
    One(u32),
    Many(Vec<u32>),
}

impl IpSlots {
    fn as_slice(&self) -> &[u32] {
        match self {
            Self::One(s) => std::slice::from_ref(s),
            Self::Many(v) => v,
        }
    }

    fn add(&mut self, slot: u32) {
        match self {
            Self::One(s) if *s == slot => {}
            Self::One(s) => *self = Self::Many(vec![*s, slot]),
            Self::Many(v) if v.contains(&slot) => {}
            Self::Many(v) => v.push(slot),
        }
    }

    /// Removes `slot`; whether none is left.
    fn remove(&mut self, slot: u32) -> bool {
        match self {
            Self::One(s) => *s == slot,
            Self::Many(v) => {
                v.retain(|s| *s != slot);
                match v.as_slice() {
                    [] => true,
                    [one] => {
                        *self = Self::One(*one);
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

/// An indexed pod and the fences its calls belong to.
#[derive(Clone, Debug)]
struct PodEntry {
    info: PodInfo,
    /// Services selecting the pod (sorted), then its workload fence.
    fences: Vec<ObjectKey>,
    /// How many of `fences` are Services.
    services: usize,
}

/// Which namespaces see an Istio object (`exportTo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExportTo {
    /// Every namespace (`*`, or no `exportTo`).
    All,
    /// These namespaces (`.` already resolved to the object's own).
    Namespaces(BTreeSet<String>),
}

impl ExportTo {
    fn parse(export_to: &[String], own: &str) -> Self {
        if export_to.is_empty() || export_to.iter().any(|e| e == "*") {
            return Self::All;
        }
        Self::Namespaces(
            export_to
                .iter()
                .filter(|e| *e != "~")
                .map(|e| if e == "." { own.to_string() } else { e.clone() })
                .collect(),
        )
    }

    /// Whether a workload in `namespace` sees the object.
    pub fn visible_to(&self, namespace: &str) -> bool {
        match self {
            Self::All => true,
            Self::Namespaces(set) => set.contains(namespace),
        }
    }
}

/// A VirtualService reduced to where its routes lead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualServiceInfo {
    /// Namespace and name.
    pub key: ObjectKey,
    /// Hosts, qualified with the VirtualService's namespace.
    pub hosts: Vec<String>,
    /// Whether the routes apply to sidecars (`gateways` empty or listing `mesh`).
    pub applies_to_mesh: bool,
    /// Who sees it.
    pub export_to: ExportTo,
    /// Destination and mirror hosts of HTTP, TCP and TLS routes, qualified.
    pub destinations: BTreeSet<String>,
    /// VirtualServices this one delegates HTTP routes to.
    pub delegates: Vec<ObjectKey>,
}

impl VirtualServiceInfo {
    /// Converts a VirtualService; destinations that are not valid hosts are dropped.
    pub fn from_object(vs: &VirtualService, domain: &str) -> Result<Self> {
        let key = ObjectKey::of("VirtualService", &vs.metadata)?;
        let ns = key.namespace.clone();
        let qualify = |h: &str| host::host_name(&host::qualify(h, &ns, domain)).ok();
        let spec = &vs.spec;
        let http_hosts = spec.http.iter().flat_map(|r: &HttpRoute| {
            r.route
                .iter()
                .chain(&r.mirrors)
                .filter_map(|d| d.destination.as_ref())
                .chain(&r.mirror)
        });
        let l4_hosts = spec
            .tcp
            .iter()
            .chain(&spec.tls)
            .flat_map(|r| r.route.iter().filter_map(|d| d.destination.as_ref()));
        let destinations = http_hosts
            .chain(l4_hosts)
            .filter_map(|d| qualify(&d.host))
            .collect();
        let delegates = spec
            .http
            .iter()
            .filter_map(|r| r.delegate.as_ref())
            .map(|d| {
                let dns = d
                    .namespace
                    .clone()
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| ns.clone());
                ObjectKey::new(dns, d.name.clone())
            })
            .collect();
        Ok(Self {
            hosts: spec.hosts.iter().filter_map(|h| qualify(h)).collect(),
            applies_to_mesh: spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == "mesh"),
            export_to: ExportTo::parse(&spec.export_to, &ns),
            destinations,
            delegates,
            key,
        })
    }
}

/// A ServiceEntry reduced to its hosts and ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntryInfo {
    /// Namespace and name.
    pub key: ObjectKey,
    /// Hosts (valid ones, lower-cased).
    pub hosts: Vec<String>,
    /// Virtual IPs.
    pub addresses: Vec<String>,
    /// `(number, protocol)` pairs.
    pub ports: Vec<(u32, String)>,
    /// Who sees it.
    pub export_to: ExportTo,
}

impl TryFrom<&ServiceEntry> for ServiceEntryInfo {
    type Error = Error;

    fn try_from(se: &ServiceEntry) -> Result<Self> {
        let key = ObjectKey::of("ServiceEntry", &se.metadata)?;
        for (i, p) in se.spec.ports.iter().enumerate() {
            port_number(|| format!("spec.ports[{i}].number"), p.number)?;
        }
        Ok(Self {
            hosts: se
                .spec
                .hosts
                .iter()
                .filter_map(|h| host::host_name(h).ok())
                .collect(),
            addresses: se.spec.addresses.clone(),
            ports: se
                .spec
                .ports
                .iter()
                .map(|p| {
                    (
                        p.number,
                        p.protocol.clone().unwrap_or_default().to_ascii_uppercase(),
                    )
                })
                .collect(),
            export_to: ExportTo::parse(&se.spec.export_to, &key.namespace),
            key,
        })
    }
}

/// The cluster, indexed for the model's lookups.
#[derive(Clone, Debug, Default)]
pub struct ClusterIndex {
    domain: String,
    services: HashMap<ObjectKey, ServiceInfo>,
    services_by_namespace: FastMap<String, BTreeSet<String>>,
    services_by_label: HashMap<(String, String), BTreeSet<ObjectKey>>,
    namespaces: HashMap<String, NamespaceInfo>,
    virtual_services: HashMap<ObjectKey, VirtualServiceInfo>,
    virtual_services_by_host: HashMap<String, BTreeSet<ObjectKey>>,
    service_entries: HashMap<ObjectKey, ServiceEntryInfo>,
    /// Exact ServiceEntry hosts and, for `*.suffix` hosts, `.suffix`, with reference counts.
    service_entry_hosts: HashMap<String, usize>,
    /// Cluster IP -> the Service and its FQDN (written as is into learned hosts).
    services_by_vip: FastMap<IpAddr, (ObjectKey, Box<str>)>,
    /// `name.namespace` of every Service, for the `name.ns` authorities of the hot path.
    service_short_names: FastMap<Box<str>, ()>,
    /// Pods by key -> their slot in `pod_slots`, so that the by-IP lookup of the hot path is one
    /// hash lookup and no key comparison.
    pods: HashMap<ObjectKey, u32>,
    pod_slots: Vec<Option<PodEntry>>,
    free_slots: Vec<u32>,
    pods_by_namespace: HashMap<String, BTreeSet<String>>,
    pods_by_ip: FastMap<IpAddr, IpSlots>,
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

    /// The cluster domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// FQDN of a Service.
    pub fn fqdn(&self, key: &ObjectKey) -> String {
        host::service_fqdn(&key.name, &key.namespace, &self.domain)
    }

    /// Adds or replaces a Service.
    pub fn apply_service(&mut self, svc: ServiceInfo) {
        self.generation = self.generation.wrapping_add(1);
        self.remove_service(&svc.key);
        self.services_by_namespace
            .entry(svc.key.namespace.clone())
            .or_default()
            .insert(svc.key.name.clone());
        for (k, v) in &svc.labels {
            self.services_by_label
                .entry((k.clone(), v.clone()))
                .or_default()
                .insert(svc.key.clone());
        }
        let fqdn: Box<str> = self.fqdn(&svc.key).into();
        for ip in &svc.cluster_ips {
            if let Ok(ip) = ip.parse() {
                self.services_by_vip.insert(ip, (svc.key.clone(), fqdn.clone()));
            }
        }
        self.service_short_names
            .insert(format!("{}.{}", svc.key.name, svc.key.namespace).into(), ());
        let key = svc.key.clone();
        let selects = svc.selector.is_some();
        self.services.insert(key.clone(), svc);
        if selects {
            self.refresh_pods_of(&key);
        }
    }

    /// Removes a Service.
    pub fn remove_service(&mut self, key: &ObjectKey) -> Option<ServiceInfo> {
        self.generation = self.generation.wrapping_add(1);
        let old = self.services.remove(key)?;
        if let Some(names) = self.services_by_namespace.get_mut(&key.namespace) {
            names.remove(&key.name);
            if names.is_empty() {
                self.services_by_namespace.remove(&key.namespace);
            }
        }
        for label in &old.labels {
            let label = (label.0.clone(), label.1.clone());
            if let Some(set) = self.services_by_label.get_mut(&label) {
                set.remove(key);
                if set.is_empty() {
                    self.services_by_label.remove(&label);
                }
            }
        }
        for ip in &old.cluster_ips {
            if let Ok(ip) = ip.parse::<IpAddr>()
                && self.services_by_vip.get(&ip).is_some_and(|(k, _)| k == key)
            {
                self.services_by_vip.remove(&ip);
            }
        }
        self.service_short_names
            .remove(format!("{}.{}", key.name, key.namespace).as_str());
        if old.selector.is_some() {
            self.refresh_pods_of(key);
        }
        Some(old)
    }

    /// Re-decides, for every pod of `key`'s namespace, whether Service `key` selects it. Costs
    /// one selector match per pod of the namespace, not a rebuild.
    fn refresh_pods_of(&mut self, key: &ObjectKey) {
        let selector = self.services.get(key).and_then(|s| s.selector.clone());
        let Some(names) = self.pods_by_namespace.get(&key.namespace) else {
            return;
        };
        for name in names {
            let pod_key = ObjectKey::new(key.namespace.clone(), name.clone());
            let slot = self.pods.get(&pod_key).map(|&s| s as usize);
            if let Some(entry) = slot
                .and_then(|s| self.pod_slots.get_mut(s))
                .and_then(Option::as_mut)
            {
                let selected = selector
                    .as_ref()
                    .is_some_and(|sel| subset_matches(sel, &entry.info.labels));
                let pos = entry.fences[..entry.services].binary_search(key);
                match (selected, pos) {
                    (true, Err(at)) => {
                        entry.fences.insert(at, key.clone());
                        entry.services += 1;
                    }
                    (false, Ok(at)) => {
                        entry.fences.remove(at);
                        entry.services -= 1;
                    }
                    _ => {}
                }
            }
        }
    }

    /// The Service whose cluster IP is `vip`, and its FQDN.
    pub fn service_by_vip(&self, vip: IpAddr) -> Option<(&ObjectKey, &str)> {
        self.services_by_vip.get(&vip).map(|(k, fqdn)| (k, &**fqdn))
    }

    /// Whether a Service exists whose `name.namespace` is `name_ns` (one hash lookup, no
    /// allocation).
    pub fn has_service(&self, name_ns: &str) -> bool {
        self.service_short_names.contains_key(name_ns)
    }

    /// Attributes calls from pods with the label `label.key` also to their workload fence
    /// (`fenceLabelKeyAlias`). Recomputes every pod's fences.
    pub fn set_workload_label(&mut self, label: Option<FenceLabelKey>) {
        self.generation = self.generation.wrapping_add(1);
        self.workload_label = label;
        let pods: Vec<PodInfo> = self.pod_slots.iter().flatten().map(|e| e.info.clone()).collect();
        for pod in pods {
            self.apply_pod(pod);
        }
    }

    /// Adds or replaces a Pod, computing the fences its calls belong to.
    pub fn apply_pod(&mut self, pod: PodInfo) {
        self.generation = self.generation.wrapping_add(1);
        self.remove_pod(&pod.key);
        let mut fences: Vec<ObjectKey> = self
            .services_in(&pod.key.namespace)
            .filter(|s| {
                s.selector
                    .as_ref()
                    .is_some_and(|sel| subset_matches(sel, &pod.labels))
            })
            .map(|s| s.key.clone())
            .collect();
        fences.sort();
        let services = fences.len();
        if let Some(label) = &self.workload_label
            && let Some(value) = pod.labels.get(&label.key)
        {
            fences.push(ObjectKey::new(
                pod.key.namespace.clone(),
                workload_fence_name(label, value),
            ));
        }
        let slot = match self.free_slots.pop() {
            Some(slot) => slot,
            None => {
                self.pod_slots.push(None);
                // More than 4 billion pods do not fit in a process anyway.
                u32::try_from(self.pod_slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        if !pod.host_network {
            for ip in &pod.ips {
                match self.pods_by_ip.get_mut(ip) {
                    Some(at) => at.add(slot),
                    None => {
                        self.pods_by_ip.insert(*ip, IpSlots::One(slot));
                    }
                }
            }
        }
        self.pods_by_namespace
            .entry(pod.key.namespace.clone())
            .or_default()
            .insert(pod.key.name.clone());
        self.pods.insert(pod.key.clone(), slot);
        if let Some(s) = self.pod_slots.get_mut(slot as usize) {
            *s = Some(PodEntry {
                info: pod,
                fences,
                services,
            });
        }
    }

    /// Removes a Pod.
    pub fn remove_pod(&mut self, key: &ObjectKey) -> Option<PodInfo> {
        self.generation = self.generation.wrapping_add(1);
        let slot = self.pods.remove(key)?;
        let old = self.pod_slots.get_mut(slot as usize)?.take()?;
        self.free_slots.push(slot);
        for ip in &old.info.ips {
            if let Some(at) = self.pods_by_ip.get_mut(ip)
                && at.remove(slot)
            {
                self.pods_by_ip.remove(ip);
            }
        }
        if let Some(names) = self.pods_by_namespace.get_mut(&key.namespace) {
            names.remove(&key.name);
            if names.is_empty() {
                self.pods_by_namespace.remove(&key.namespace);
            }
        }
        Some(old.info)
    }

    fn pod_entry(&self, key: &ObjectKey) -> Option<&PodEntry> {
        let slot = *self.pods.get(key)?;
        self.pod_slots.get(slot as usize)?.as_ref()
    }

    /// The pods (not on the host network) that have `ip`, each with the fences its calls
    /// belong to (see [`Self::pod_fences`]); several when IPs overlap (pods of several clusters,
    /// or a stale pod not yet removed). One hash lookup, no allocation.
    pub fn pods_at(&self, ip: IpAddr) -> impl Iterator<Item = (&PodInfo, &[ObjectKey])> + '_ {
        self.pods_by_ip
            .get(&ip)
            .map_or(&[][..], IpSlots::as_slice)
            .iter()
            .filter_map(|&slot| self.pod_slots.get(slot as usize)?.as_ref())
            .map(|e| (&e.info, e.fences.as_slice()))
    }

    /// The fences a call from pod `key` belongs to: the Services selecting it (sorted), then its
    /// workload fence when `fenceLabelKeyAlias` applies.
    pub fn pod_fences(&self, key: &ObjectKey) -> &[ObjectKey] {
        self.pod_entry(key).map_or(&[], |e| e.fences.as_slice())
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
        let ns = namespace.to_string();
        self.services_by_namespace
            .get(namespace)
            .into_iter()
            .flatten()
            .filter_map(move |name| self.services.get(&ObjectKey::new(ns.clone(), name.clone())))
    }

    /// Services carrying every label of `selector` (none for an empty selector).
    pub fn services_with_labels(&self, selector: &Labels) -> BTreeSet<ObjectKey> {
        let mut sets = selector
            .iter()
            .map(|(k, v)| self.services_by_label.get(&(k.clone(), v.clone())));
        let Some(Some(first)) = sets.next() else {
            return BTreeSet::new();
        };
        let mut result = first.clone();
        for set in sets {
            match set {
                Some(set) => result.retain(|k| set.contains(k)),
                None => return BTreeSet::new(),
            }
        }
        result
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
        let slot = *self.pods.get(key)?;
        self.pod_slots.get(slot as usize)?.as_ref().map(|e| &e.info)
    }

    /// Every Pod, in no particular order.
    pub fn pods(&self) -> impl Iterator<Item = &PodInfo> {
        self.pod_slots.iter().flatten().map(|e| &e.info)
    }

    /// Every VirtualService, in no particular order.
    pub fn virtual_services(&self) -> impl Iterator<Item = &VirtualServiceInfo> {
        self.virtual_services.values()
    }

    /// Adds or replaces a VirtualService.
    pub fn apply_virtual_service(&mut self, vs: VirtualServiceInfo) {
        self.remove_virtual_service(&vs.key);
        for h in &vs.hosts {
            self.virtual_services_by_host
                .entry(h.clone())
                .or_default()
                .insert(vs.key.clone());
        }
        self.virtual_services.insert(vs.key.clone(), vs);
    }

    /// Removes a VirtualService.
    pub fn remove_virtual_service(&mut self, key: &ObjectKey) -> Option<VirtualServiceInfo> {
        let old = self.virtual_services.remove(key)?;
        for h in &old.hosts {
            if let Some(set) = self.virtual_services_by_host.get_mut(h) {
                set.remove(key);
                if set.is_empty() {
                    self.virtual_services_by_host.remove(h);
                }
            }
        }
        Some(old)
    }

    /// Adds or replaces a ServiceEntry.
    pub fn apply_service_entry(&mut self, se: ServiceEntryInfo) {
        self.generation = self.generation.wrapping_add(1);
        self.remove_service_entry(&se.key);
        for h in &se.hosts {
            *self
                .service_entry_hosts
                .entry(se_host_key(h).to_string())
                .or_default() += 1;
        }
        self.service_entries.insert(se.key.clone(), se);
    }

    /// Removes a ServiceEntry.
    pub fn remove_service_entry(&mut self, key: &ObjectKey) -> Option<ServiceEntryInfo> {
        self.generation = self.generation.wrapping_add(1);
        let old = self.service_entries.remove(key)?;
        for h in &old.hosts {
            let k = se_host_key(h);
            if let Some(n) = self.service_entry_hosts.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.service_entry_hosts.remove(k);
                }
            }
        }
        Some(old)
    }

    /// Whether a ServiceEntry declares `host`, exactly or by a `*.suffix` wildcard (no
    /// allocation).
    pub fn is_service_entry_host(&self, host: &str) -> bool {
        self.service_entry_hosts.contains_key(host)
            || host
                .match_indices('.')
                .any(|(i, _)| self.service_entry_hosts.contains_key(&host[i..]))
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
        let mut out = BTreeSet::new();
        let mut seen = HashSet::new();
        for key in self.virtual_services_for(host) {
            if let Some(vs) = self.virtual_services.get(key)
                && vs.applies_to_mesh
                && vs.export_to.visible_to(namespace)
            {
                self.collect_destinations(vs, &mut out, &mut seen);
            }
        }
        out.remove(host);
        out
    }

    /// VirtualServices whose hosts match `host` exactly or by a `*.suffix` wildcard.
    fn virtual_services_for<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a ObjectKey> + 'a {
        let wildcards = host
            .match_indices('.')
            .map(|(i, _)| format!("*{}", &host[i..]))
            .filter_map(|w| self.virtual_services_by_host.get(&w));
        self.virtual_services_by_host
            .get(host)
            .into_iter()
            .chain(wildcards)
            .flatten()
    }

    fn collect_destinations<'a>(
        &'a self,
        vs: &'a VirtualServiceInfo,
        out: &mut BTreeSet<String>,
        seen: &mut HashSet<&'a ObjectKey>,
    ) {
        if !seen.insert(&vs.key) {
            return;
        }
        out.extend(vs.destinations.iter().cloned());
        for d in &vs.delegates {
            if let Some(delegate) = self.virtual_services.get(d) {
                self.collect_destinations(delegate, out, seen);
            }
        }
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

/// The key of a ServiceEntry host in the host set: a `*.suffix` wildcard is kept as `.suffix`.
fn se_host_key(host: &str) -> &str {
    host.strip_prefix('*').unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, labels: &[(&str, &str)]) -> ServiceInfo {
        ServiceInfo {
            key: ObjectKey::new(ns, name),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            selector: Some([("app".to_string(), name.to_string())].into()),
            ports: vec![],
            cluster_ips: vec![],
        }
    }

    fn vs(yaml: &str) -> VirtualServiceInfo {
        VirtualServiceInfo::from_object(&crate::yaml::from_str(yaml).unwrap(), "cluster.local").unwrap()
    }

    #[test]
    fn label_and_namespace_lookups_follow_updates() {
        let mut idx = ClusterIndex::new("cluster.local");
        idx.apply_service(svc(
            "default",
            "reviews",
            &[("app", "reviews"), ("group", "default")],
        ));
        idx.apply_service(svc("test", "reviews", &[("app", "reviews")]));
        let sel: Labels = [
            ("app".into(), "reviews".into()),
            ("group".into(), "default".into()),
        ]
        .into();
        assert_eq!(
            idx.services_with_labels(&sel),
            [ObjectKey::new("default", "reviews")].into()
        );
        idx.apply_service(svc("default", "reviews", &[("app", "reviews")]));
        assert!(idx.services_with_labels(&sel).is_empty());
        assert_eq!(idx.services_in("test").count(), 1);
        idx.remove_service(&ObjectKey::new("test", "reviews"));
        assert_eq!(idx.services_in("test").count(), 0);
        assert!(idx.services_with_labels(&Labels::new()).is_empty());
    }

    #[test]
    fn destinations_follow_routes_delegates_and_visibility() {
        let mut idx = ClusterIndex::new("cluster.local");
        idx.apply_virtual_service(vs(r#"
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews-v2}}, {destination: {host: "bad:host"}}]
    mirror: {host: shadow.tools.svc.cluster.local}
  - delegate: {name: more, namespace: other}
  tcp: [{route: [{destination: {host: tcp-backend}}]}]
"#));
        idx.apply_virtual_service(vs(r#"
metadata: {name: more, namespace: other}
spec:
  http: [{route: [{destination: {host: delegated}}]}]
"#));
        idx.apply_virtual_service(vs(r#"
metadata: {name: gw-only, namespace: default}
spec: {hosts: [reviews], gateways: [ingress], http: [{route: [{destination: {host: edge}}]}]}
"#));
        idx.apply_virtual_service(vs(r#"
metadata: {name: private, namespace: default}
spec: {hosts: [reviews], exportTo: ["."], http: [{route: [{destination: {host: private}}]}]}
"#));
        idx.apply_virtual_service(vs(r#"
metadata: {name: wild, namespace: default}
spec: {hosts: ["*.example.com"], tls: [{route: [{destination: {host: egress.gw.svc.cluster.local}}]}]}
"#));
        let got = idx.destinations("reviews.default.svc.cluster.local", "default");
        let want: BTreeSet<String> = [
            "delegated.other.svc.cluster.local",
            "private.default.svc.cluster.local",
            "reviews-v2.default.svc.cluster.local",
            "shadow.tools.svc.cluster.local",
            "tcp-backend.default.svc.cluster.local",
        ]
        .map(String::from)
        .into();
        assert_eq!(got, want);
        assert!(
            !idx.destinations("reviews.default.svc.cluster.local", "other")
                .contains("private.default.svc.cluster.local")
        );
        assert_eq!(
            idx.destinations("api.example.com", "x"),
            ["egress.gw.svc.cluster.local".to_string()].into()
        );
        idx.remove_virtual_service(&ObjectKey::new("default", "reviews"));
        assert!(
            !idx.destinations("reviews.default.svc.cluster.local", "default")
                .contains("shadow.tools.svc.cluster.local")
        );
    }

    #[test]
    fn pod_fences_follow_pod_and_service_updates() {
        let mut idx = ClusterIndex::new("cluster.local");
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let pod = PodInfo {
            key: ObjectKey::new("default", "reviews-1"),
            labels: [("app".to_string(), "reviews".to_string())].into(),
            ips: vec![ip],
            host_network: false,
            service_account: "default".into(),
        };
        idx.apply_pod(pod.clone());
        assert_eq!(
            idx.pods_at(ip).map(|(p, _)| &p.key).collect::<Vec<_>>(),
            [&pod.key]
        );
        assert!(idx.pod_fences(&pod.key).is_empty());
        // A Service created after the pod selects it; so does a second one.
        idx.apply_service(svc("default", "reviews", &[]));
        let mut all = svc("default", "all", &[]);
        all.selector = Some([("app".to_string(), "reviews".to_string())].into());
        idx.apply_service(all.clone());
        idx.apply_service(svc("other", "reviews", &[]));
        let both = [
            ObjectKey::new("default", "all"),
            ObjectKey::new("default", "reviews"),
        ];
        assert_eq!(idx.pod_fences(&pod.key), both);
        // The workload fence comes last.
        idx.set_workload_label(Some(FenceLabelKey {
            key: "app".into(),
            alias: "app".into(),
        }));
        assert_eq!(
            idx.pod_fences(&pod.key).last(),
            Some(&ObjectKey::new("default", "app-reviews.workload.identity"))
        );
        // A selector that stops matching, a removed Service.
        all.selector = Some([("app".to_string(), "other".to_string())].into());
        idx.apply_service(all);
        idx.remove_service(&ObjectKey::new("default", "reviews"));
        assert_eq!(idx.pod_fences(&pod.key).len(), 1);
        // The pod moves to a new IP.
        let moved = PodInfo {
            ips: vec!["10.0.0.2".parse().unwrap()],
            ..pod.clone()
        };
        idx.apply_pod(moved);
        assert_eq!(idx.pods_at(ip).count(), 0);
        idx.remove_pod(&pod.key);
        assert_eq!(idx.pods_at("10.0.0.2".parse().unwrap()).count(), 0);
        assert_eq!(idx.counts()["pods"], 0);
    }

    #[test]
    fn overlapping_ips_keep_every_pod() {
        let mut idx = ClusterIndex::new("cluster.local");
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let pod = |ns: &str| PodInfo {
            key: ObjectKey::new(ns, "p"),
            labels: Labels::new(),
            ips: vec![ip],
            host_network: false,
            service_account: "default".into(),
        };
        let names =
            |idx: &ClusterIndex| -> Vec<String> { idx.pods_at(ip).map(|(p, _)| p.key.to_string()).collect() };
        idx.apply_pod(pod("a"));
        idx.apply_pod(pod("b"));
        idx.apply_pod(pod("c"));
        idx.apply_pod(pod("b"));
        let mut all = names(&idx);
        all.sort();
        assert_eq!(all, ["a/p", "b/p", "c/p"]);
        idx.remove_pod(&ObjectKey::new("a", "p"));
        idx.remove_pod(&ObjectKey::new("c", "p"));
        assert_eq!(names(&idx), ["b/p"]);
        idx.remove_pod(&ObjectKey::new("b", "p"));
        assert!(names(&idx).is_empty());
        // Slots are reused.
        idx.apply_pod(pod("d"));
        assert_eq!(names(&idx), ["d/p"]);
    }

    #[test]
    fn vips_and_service_entry_hosts() {
        let mut idx = ClusterIndex::new("cluster.local");
        let mut s = svc("default", "reviews", &[]);
        s.cluster_ips = vec!["10.96.0.2".into()];
        idx.apply_service(s);
        assert_eq!(
            idx.service_by_vip("10.96.0.2".parse().unwrap()),
            Some((
                &ObjectKey::new("default", "reviews"),
                "reviews.default.svc.cluster.local"
            ))
        );
        assert!(idx.has_service("reviews.default"));
        idx.remove_service(&ObjectKey::new("default", "reviews"));
        assert_eq!(idx.service_by_vip("10.96.0.2".parse().unwrap()), None);
        assert!(!idx.has_service("reviews.default"));
        let se: ServiceEntry = crate::yaml::from_str(
            "metadata: {name: e, namespace: n}\nspec: {hosts: [a.example.com, '*.w.io']}",
        )
        .unwrap();
        idx.apply_service_entry(ServiceEntryInfo::try_from(&se).unwrap());
        assert!(idx.is_service_entry_host("a.example.com"));
        assert!(idx.is_service_entry_host("x.y.w.io"));
        assert!(!idx.is_service_entry_host("w.io"));
        assert!(!idx.is_service_entry_host("b.example.com"));
        idx.remove_service_entry(&ObjectKey::new("n", "e"));
        assert!(!idx.is_service_entry_host("a.example.com"));
    }

    #[test]
    fn delegate_cycles_terminate() {
        let mut idx = ClusterIndex::new("cluster.local");
        idx.apply_virtual_service(vs(
            "metadata: {name: a, namespace: n}\nspec: {hosts: [a], http: [{delegate: {name: b}}]}",
        ));
        idx.apply_virtual_service(vs("metadata: {name: b, namespace: n}\nspec: {http: [{delegate: {name: a}}, {route: [{destination: {host: x}}]}]}"));
        assert_eq!(
            idx.destinations("a.n.svc.cluster.local", "n"),
            ["x.n.svc.cluster.local".to_string()].into()
        );
    }
}
