//! The index's entries: what lazyload keeps of each Kubernetes and Istio object, and the
//! conversion of one object into its entry (checked: a value no cluster would accept rejects the
//! object rather than being dropped).

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::vocab::host;
use crate::vocab::istio::{HttpRoute, ServiceEntry, VirtualService};
use crate::vocab::labels::Labels;
use crate::vocab::{MissingField, ObjectKey};

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

/// The key of a `kind` object, or which metadata field it lacks.
fn key_of(kind: &'static str, meta: &ObjectMeta) -> Result<ObjectKey> {
    ObjectKey::of(meta).map_err(|MissingField(field)| Error::Missing { kind, field })
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
        let key = key_of("Service", &svc.metadata)?;
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
        let key = key_of("Pod", &pod.metadata)?;
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
        let key = key_of("VirtualService", &vs.metadata)?;
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
        let key = key_of("ServiceEntry", &se.metadata)?;
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
