//! Attribution: an access-log entry -> the fences of its caller and the hosts it called. Pure.
//!
//! Source: the caller's IP -> the pod with that IP (host-network pods excluded) -> the fences
//! the index keeps for that pod (the Services selecting it, its workload fence). A SPIFFE
//! identity in the entry must name the pod's namespace and service account: it picks the right
//! pod when IPs overlap (several clusters), and an entry whose identity matches no pod at that IP
//! is dropped rather than credited to a stranger.
//!
//! Destinations, every one that applies (deduplicated):
//! - the Service the global-sidecar routed to (`outbound|<port>|<subset>|<fqdn>`);
//! - the host the caller asked for (the authority without port): an FQDN as is; `name.ns` and
//!   `name.ns.svc` completed when that Service exists; a short name completed with
//!   `Slime-Source-Ns` (else the caller pod's namespace), and kept as written too with
//!   `enableShortDomain` (as Slime does); an IP or the `Slime-Orig-Dest` address -> the Service
//!   with that cluster IP;
//! - any other host only when the configuration allows it (a ServiceEntry host or a dispatch
//!   domain): arbitrary strings from the wire never become dependencies.
//!
//! Dropped, as Slime drops them: the global-sidecar's own traffic, health checks, invalid
//! hosts. Attribution writes hosts into a reused [`Hosts`] buffer and returns the fences as a
//! slice of the index, so a call costs no allocation once the buffer is warm.

use std::net::IpAddr;

use regex::Regex;

use super::entry::{Entry, Kind, parse_ip, spiffe_ns_sa};
use crate::config::Config;
use crate::index::ClusterIndex;
use crate::vocab::{GLOBAL_SIDECAR, ObjectKey};

/// At most this many destination hosts are taken from one entry.
const MAX_HOSTS_PER_ENTRY: usize = 4;

/// Why an entry yields no dependency. Each is a label value of the dropped-entries counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// No source address, or no pod / fence for it.
    UnknownSource,
    /// Several pods share the source IP, with different fences, and no identity tells them apart.
    AmbiguousSource,
    /// The peer's SPIFFE identity matches no pod at the source IP.
    IdentityMismatch,
    /// No valid destination host.
    InvalidHost,
    /// Traffic from or to the global-sidecar itself.
    OwnTraffic,
    /// A probe (`kube-probe`, Envoy health checks, Istio's `/app-health`).
    HealthCheck,
    /// A destination outside the mesh that the configuration does not allow.
    ExternalNotAllowed,
}

impl DropReason {
    /// Every reason, for pre-registering counters.
    pub const ALL: [DropReason; 7] = [
        DropReason::UnknownSource,
        DropReason::AmbiguousSource,
        DropReason::IdentityMismatch,
        DropReason::InvalidHost,
        DropReason::OwnTraffic,
        DropReason::HealthCheck,
        DropReason::ExternalNotAllowed,
    ];

    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UnknownSource => "unknown_source",
            DropReason::AmbiguousSource => "ambiguous_source",
            DropReason::IdentityMismatch => "identity_mismatch",
            DropReason::InvalidHost => "invalid_host",
            DropReason::OwnTraffic => "own_traffic",
            DropReason::HealthCheck => "health_check",
            DropReason::ExternalNotAllowed => "external_not_allowed",
        }
    }
}

/// The destination hosts of one entry: lower-case, valid, deduplicated. A buffer meant to be
/// reused across entries (clearing keeps its capacity).
#[derive(Clone, Debug, Default)]
pub struct Hosts {
    buf: String,
    ends: Vec<usize>,
}

impl Hosts {
    /// Empties the buffer.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.ends.clear();
    }

    /// The hosts, in the order they were found.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let s = &self.buf[start..end];
            start = end;
            s
        })
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Appends the concatenation of `parts`, lower-cased, unless present or the buffer is full.
    fn push(&mut self, parts: &[&str]) {
        if self.ends.len() >= MAX_HOSTS_PER_ENTRY {
            return;
        }
        let start = self.buf.len();
        for p in parts {
            self.buf.push_str(p);
        }
        self.buf[start..].make_ascii_lowercase();
        let new = &self.buf[start..];
        if self.iter().any(|h| h == new) {
            self.buf.truncate(start);
        } else {
            self.ends.push(self.buf.len());
        }
    }
}

/// The configuration attribution needs.
#[derive(Clone, Debug)]
pub struct Attributor {
    domain: String,
    enable_short_domain: bool,
    /// Dispatch domains: exact hosts, and `.suffix` for `*.suffix`.
    dispatch_domains: Vec<String>,
    dispatch_regexes: Vec<Regex>,
}

impl Attributor {
    /// Attribution under `config` (cluster domain, `enableShortDomain`, dispatches).
    pub fn new(config: &Config) -> Self {
        let mut dispatch_domains = Vec::new();
        let mut dispatch_regexes = Vec::new();
        for d in &config.general.dispatches {
            for domain in &d.domains {
                let domain = domain.to_ascii_lowercase();
                match domain.strip_prefix('*') {
                    // `*` alone would allow any string: a catch-all dispatch is not an allow-list.
                    Some("") => {}
                    Some(suffix) => dispatch_domains.push(suffix.to_string()),
                    None => dispatch_domains.push(domain),
                }
            }
            dispatch_regexes.extend(d.domain_regex.clone());
        }
        Self {
            domain: config.general.cluster_domain.clone(),
            enable_short_domain: config.general.enable_short_domain,
            dispatch_domains,
            dispatch_regexes,
        }
    }

    /// Attributes `entry`: its caller's fences (a slice of `index`) and, in `hosts` (cleared
    /// first), the hosts it called; or why it yields nothing.
    pub fn attribute<'i>(
        &self,
        index: &'i ClusterIndex,
        entry: &Entry<'_>,
        hosts: &mut Hosts,
    ) -> Result<&'i [ObjectKey], DropReason> {
        hosts.clear();
        if entry.kind == Kind::Http && is_health_check(entry) {
            return Err(DropReason::HealthCheck);
        }
        let (pod, fences) = source(index, entry)?;
        if fences.iter().any(|f| f.name == GLOBAL_SIDECAR) {
            return Err(DropReason::OwnTraffic);
        }
        let mut why = DropReason::InvalidHost;
        let mut note = |d: DropReason| {
            if d > why {
                why = d;
            }
        };
        match cluster_host(entry.upstream_cluster) {
            Some(fqdn) => self.service_host(fqdn, hosts, &mut note),
            // Passthrough: what was called is only known from the request, if at all.
            None if entry.upstream_cluster == "PassthroughCluster" => note(DropReason::ExternalNotAllowed),
            None => {}
        }
        if entry.kind == Kind::Http {
            // Hosts are case-insensitive; a copy is made only for the rare upper-case one.
            let authority = ascii_lower_cow(strip_port(entry.authority));
            match parse_ip(entry.authority) {
                Some(ip) => self.vip_host(index, ip, hosts, &mut note),
                None if !authority.is_empty() => {
                    let ns = entry
                        .source_ns
                        .map(str::trim)
                        .filter(|n| is_dns_label(n))
                        .unwrap_or(&pod.namespace);
                    self.requested_host(index, &authority, ns, hosts, &mut note);
                }
                None => {}
            }
            if let Some(ip) = entry.orig_dest.and_then(parse_ip) {
                self.vip_host(index, ip, hosts, &mut note);
            }
        }
        if hosts.is_empty() { Err(why) } else { Ok(fences) }
    }

    /// An in-mesh host (`*.svc.<domain>`), unless it is the global-sidecar.
    fn service_host(&self, host: &str, hosts: &mut Hosts, note: &mut impl FnMut(DropReason)) {
        if !is_host(host) {
            return note(DropReason::InvalidHost);
        }
        if self.is_global_sidecar(host) {
            return note(DropReason::OwnTraffic);
        }
        hosts.push(&[host]);
    }

    fn vip_host(
        &self,
        index: &ClusterIndex,
        ip: IpAddr,
        hosts: &mut Hosts,
        note: &mut impl FnMut(DropReason),
    ) {
        match index.service_by_vip(ip) {
            Some((key, _)) if key.name == GLOBAL_SIDECAR => note(DropReason::OwnTraffic),
            Some((_, fqdn)) => hosts.push(&[fqdn]),
            // Passthrough to an address no Service owns: not a host anyone can import.
            None => note(DropReason::ExternalNotAllowed),
        }
    }

    /// `host` is lower-case, without port.
    fn requested_host(
        &self,
        index: &ClusterIndex,
        host: &str,
        source_ns: &str,
        hosts: &mut Hosts,
        note: &mut impl FnMut(DropReason),
    ) {
        let host = host.trim_end_matches('.');
        if !is_host(host) {
            return note(DropReason::InvalidHost);
        }
        let labels = host.split('.').count();
        let svc_suffix = host
            .strip_suffix(self.domain.as_str())
            .and_then(|h| h.strip_suffix(".svc."));
        if let Some(name_ns) = svc_suffix {
            // Already an FQDN of the cluster.
            if name_ns.split('.').count() == 2 {
                self.service_host(host, hosts, note);
            } else {
                note(DropReason::InvalidHost);
            }
            return;
        }
        if labels == 1 {
            if source_ns.is_empty() {
                return note(DropReason::InvalidHost);
            }
            if host == GLOBAL_SIDECAR {
                return note(DropReason::OwnTraffic);
            }
            hosts.push(&[host, ".", source_ns, ".svc.", &self.domain]);
            if self.enable_short_domain {
                hosts.push(&[host]);
            }
            return;
        }
        let short = host.strip_suffix(".svc").unwrap_or(host);
        if let Some((name, ns)) = short.split_once('.')
            && !ns.contains('.')
        {
            // Usually the routed cluster already named this Service: no lookup needed.
            let routed = hosts.iter().any(|h| {
                h.strip_prefix(short)
                    .and_then(|rest| rest.strip_prefix(".svc."))
                    .is_some_and(|d| d == self.domain)
            });
            if routed {
                return;
            }
            if index.has_service(short) {
                return self.service_host_parts(name, ns, hosts, note);
            }
        }
        if index.is_service_entry_host(host) || self.is_dispatch_host(host) {
            hosts.push(&[host]);
        } else {
            note(DropReason::ExternalNotAllowed);
        }
    }

    fn service_host_parts(&self, name: &str, ns: &str, hosts: &mut Hosts, note: &mut impl FnMut(DropReason)) {
        if name.eq_ignore_ascii_case(GLOBAL_SIDECAR) {
            return note(DropReason::OwnTraffic);
        }
        hosts.push(&[name, ".", ns, ".svc.", &self.domain]);
    }

    fn is_dispatch_host(&self, host: &str) -> bool {
        self.dispatch_domains.iter().any(|d| {
            if d.starts_with('.') {
                host.len() > d.len() && host.ends_with(d.as_str())
            } else {
                host == d
            }
        }) || self.dispatch_regexes.iter().any(|r| r.is_match(host))
    }

    fn is_global_sidecar(&self, host: &str) -> bool {
        host.len() > GLOBAL_SIDECAR.len()
            && host[..GLOBAL_SIDECAR.len()].eq_ignore_ascii_case(GLOBAL_SIDECAR)
            && host.as_bytes()[GLOBAL_SIDECAR.len()] == b'.'
            && crate::vocab::host::is_global_sidecar(host, &self.domain)
    }
}

fn ascii_lower_cow(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(s.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// The caller pod and its fences.
fn source<'i>(
    index: &'i ClusterIndex,
    entry: &Entry<'_>,
) -> Result<(&'i ObjectKey, &'i [ObjectKey]), DropReason> {
    let ip = entry.source.ok_or(DropReason::UnknownSource)?;
    let identity = entry.peer_identity.and_then(spiffe_ns_sa);
    let mut found: Option<(&ObjectKey, &[ObjectKey])> = None;
    let mut any = false;
    for (pod, fences) in index.pods_at(ip) {
        any = true;
        if let Some((ns, sa)) = identity
            && (pod.key.namespace != ns || pod.service_account != sa)
        {
            continue;
        }
        match found {
            None => found = Some((&pod.key, fences)),
            Some((_, seen)) if seen == fences => {}
            Some(_) => return Err(DropReason::AmbiguousSource),
        }
    }
    match found {
        Some((_, [])) => Err(DropReason::UnknownSource),
        Some(found) => Ok(found),
        None if any => Err(DropReason::IdentityMismatch),
        None => Err(DropReason::UnknownSource),
    }
}

fn is_health_check(entry: &Entry<'_>) -> bool {
    entry.user_agent.starts_with("kube-probe/")
        || entry.user_agent.starts_with("Envoy/HC")
        || entry.path.starts_with("/app-health/")
        || entry.path.starts_with("/healthz/ready")
}

/// The service of an Istio outbound cluster name, `outbound|<port>|<subset>|<fqdn>`.
pub fn cluster_host(cluster: &str) -> Option<&str> {
    let mut parts = cluster.split('|');
    let (dir, port, _subset, host) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    (dir == "outbound" && parts.next().is_none() && port.parse::<u16>().is_ok() && !host.is_empty())
        .then_some(host)
}

/// `host:port` -> `host` (IPv6 literals are handled by [`parse_ip`] first).
fn strip_port(authority: &str) -> &str {
    let a = authority.trim();
    match a.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => a,
    }
}

/// A DNS name (any case), at most 253 characters; no wildcard, no IP (checked without
/// allocating, unlike [`crate::vocab::host::host_name`], because bogus hosts are the common
/// bad input).
fn is_host(host: &str) -> bool {
    !host.is_empty() && host.len() <= 253 && host.split('.').all(is_dns_label_any_case)
}

fn is_dns_label(label: &str) -> bool {
    is_dns_label_any_case(label) && !label.bytes().any(|b| b.is_ascii_uppercase())
}

fn is_dns_label_any_case(label: &str) -> bool {
    let b = label.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress};
    use envoy_types::pb::envoy::data::accesslog::v3::tls_properties::CertificateProperties;
    use envoy_types::pb::envoy::data::accesslog::v3::tls_properties::certificate_properties::SubjectAltName;
    use envoy_types::pb::envoy::data::accesslog::v3::tls_properties::certificate_properties::subject_alt_name::San;
    use envoy_types::pb::envoy::data::accesslog::v3::{
        AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties, TcpAccessLogEntry, TlsProperties,
    };

    use super::*;
    use crate::config::{Dispatch, FenceLabelKey};
    use crate::testing::pod;

    /// The collector indexes its drop counters by `reason as usize`: `ALL` must list the
    /// reasons in declaration order.
    #[test]
    fn every_drop_reason_is_listed_in_order() {
        for (i, why) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*why as usize, i, "{}", why.as_str());
        }
    }

    fn svc(ns: &str, name: &str, app: &str, vip: &str) -> crate::index::ServiceInfo {
        crate::testing::service(ns, name, app, &[vip])
    }

    /// The test cluster: bookinfo in `default`, the global-sidecar, overlapping IPs, external
    /// hosts.
    pub(crate) fn index() -> ClusterIndex {
        let mut idx = ClusterIndex::new("cluster.local");
        idx.set_workload_label(Some(FenceLabelKey {
            key: "workload".into(),
            alias: "wl".into(),
        }));
        for (name, vip) in [
            ("productpage", "10.96.0.1"),
            ("reviews", "10.96.0.2"),
            ("details", "10.96.0.3"),
        ] {
            idx.apply_service(svc("default", name, name, vip));
        }
        idx.apply_service(svc("default", "reviews-all", "reviews", "10.96.0.4"));
        idx.apply_service(svc(
            "mesh-operator",
            "global-sidecar",
            "global-sidecar",
            "10.96.0.9",
        ));
        idx.apply_service(svc("a", "alpha", "alpha", "10.96.1.1"));
        idx.apply_service(svc("b", "beta", "beta", "10.96.1.2"));
        idx.apply_pod(pod(
            "default",
            "productpage-1",
            &[("app", "productpage")],
            "10.0.0.1",
            "bookinfo",
        ));
        idx.apply_pod(pod(
            "default",
            "reviews-1",
            &[("app", "reviews")],
            "10.0.0.2",
            "bookinfo",
        ));
        idx.apply_pod(pod(
            "default",
            "lonely",
            &[("app", "none")],
            "10.0.0.3",
            "default",
        ));
        idx.apply_pod(pod(
            "default",
            "job-1",
            &[("workload", "batch")],
            "10.0.0.4",
            "default",
        ));
        idx.apply_pod(pod(
            "mesh-operator",
            "gs-1",
            &[("app", "global-sidecar")],
            "10.0.0.9",
            "gs",
        ));
        idx.apply_pod(pod("a", "alpha-1", &[("app", "alpha")], "10.0.0.50", "x"));
        idx.apply_pod(pod("b", "beta-1", &[("app", "beta")], "10.0.0.50", "y"));
        let mut hostnet = pod(
            "default",
            "node-agent",
            &[("app", "productpage")],
            "10.0.0.100",
            "default",
        );
        hostnet.host_network = true;
        idx.apply_pod(hostnet);
        let se = crate::testing::service_entry("default", "ext", &["api.example.com", "*.wild.com"]);
        idx.apply_service_entry(se);
        idx
    }

    pub(crate) fn attributor(short: bool) -> Attributor {
        let mut cfg = Config::default();
        cfg.general.enable_short_domain = short;
        cfg.general.dispatches.push(Dispatch {
            name: "ext".into(),
            domains: vec!["dispatch.example.org".into(), "*".into()],
            cluster: "PassthroughCluster".into(),
            domain_regex: None,
        });
        Attributor::new(&cfg)
    }

    fn addr(ip: &str) -> Option<Address> {
        Some(Address {
            address: Some(AddressKind::SocketAddress(SocketAddress {
                address: ip.into(),
                ..Default::default()
            })),
        })
    }

    fn common(source: &str, cluster: &str) -> AccessLogCommon {
        AccessLogCommon {
            downstream_remote_address: addr(source),
            upstream_cluster: cluster.into(),
            ..Default::default()
        }
    }

    pub(crate) fn http(
        source: &str,
        cluster: &str,
        authority: &str,
        headers: &[(&str, &str)],
    ) -> HttpAccessLogEntry {
        HttpAccessLogEntry {
            common_properties: Some(common(source, cluster)),
            request: Some(HttpRequestProperties {
                authority: authority.into(),
                path: "/".into(),
                request_headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn with_identity(mut e: HttpAccessLogEntry, uri: &str) -> HttpAccessLogEntry {
        if let Some(c) = e.common_properties.as_mut() {
            c.tls_properties = Some(TlsProperties {
                peer_certificate_properties: Some(CertificateProperties {
                    subject_alt_name: vec![SubjectAltName {
                        san: Some(San::Uri(uri.into())),
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        e
    }

    /// Fences and hosts, as strings.
    type Outcome = Result<(Vec<String>, Vec<String>), DropReason>;

    fn run(a: &Attributor, idx: &ClusterIndex, entry: Entry<'_>) -> Outcome {
        let mut hosts = Hosts::default();
        let fences = a.attribute(idx, &entry, &mut hosts)?;
        Ok((
            fences.iter().map(ToString::to_string).collect(),
            hosts.iter().map(String::from).collect(),
        ))
    }

    const PP: &str = "10.0.0.1";
    const FQDN: &str = "details.default.svc.cluster.local";

    #[test]
    fn attribution_table() {
        let idx = index();
        let a = attributor(false);
        let short = attributor(true);
        let ok = |fences: &[&str], hosts: &[&str]| {
            Ok((
                fences.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                hosts.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            ))
        };
        let pp = ["default/productpage"];
        type Case<'a> = (&'a str, &'a Attributor, HttpAccessLogEntry, Outcome);
        let cases: Vec<Case<'_>> = vec![
            (
                "fqdn",
                &a,
                http(
                    PP,
                    "outbound|9080||details.default.svc.cluster.local",
                    "details.default.svc.cluster.local:9080",
                    &[],
                ),
                ok(&pp, &[FQDN]),
            ),
            (
                "name.ns",
                &a,
                http(PP, "", "details.default", &[]),
                ok(&pp, &[FQDN]),
            ),
            (
                "name.ns.svc",
                &a,
                http(PP, "", "Details.Default.svc:80", &[]),
                ok(&pp, &[FQDN]),
            ),
            (
                "short + Slime-Source-Ns",
                &a,
                http(PP, "", "details", &[("slime-source-ns", "default")]),
                ok(&pp, &[FQDN]),
            ),
            (
                "short, other ns",
                &a,
                http(PP, "", "details", &[("slime-source-ns", "test")]),
                ok(&pp, &["details.test.svc.cluster.local"]),
            ),
            (
                "short without header: caller's ns",
                &a,
                http(PP, "", "details:9080", &[]),
                ok(&pp, &[FQDN]),
            ),
            (
                "short with enableShortDomain",
                &short,
                http(PP, "", "details", &[("slime-source-ns", "default")]),
                ok(&pp, &[FQDN, "details"]),
            ),
            (
                "VIP in Slime-Orig-Dest",
                &a,
                http(PP, "", "10.96.0.2:9080", &[("slime-orig-dest", "10.96.0.2:9080")]),
                ok(&pp, &["reviews.default.svc.cluster.local"]),
            ),
            (
                "VIP and name",
                &a,
                http(PP, "", "reviews", &[("slime-orig-dest", "10.96.0.3:9080")]),
                ok(&pp, &["reviews.default.svc.cluster.local", FQDN]),
            ),
            (
                "subset cluster",
                &a,
                http(
                    PP,
                    "outbound|9080|v2|reviews.default.svc.cluster.local",
                    "reviews:9080",
                    &[],
                ),
                ok(&pp, &["reviews.default.svc.cluster.local"]),
            ),
            (
                "routed elsewhere than asked",
                &a,
                http(
                    PP,
                    "outbound|9080|v3|reviews.default.svc.cluster.local",
                    "details",
                    &[],
                ),
                ok(&pp, &["reviews.default.svc.cluster.local", FQDN]),
            ),
            (
                "passthrough, unknown host",
                &a,
                http(
                    PP,
                    "PassthroughCluster",
                    "unknown.example.net",
                    &[("slime-orig-dest", "93.184.216.34:80")],
                ),
                Err(DropReason::ExternalNotAllowed),
            ),
            (
                "passthrough, ServiceEntry host",
                &a,
                http(PP, "PassthroughCluster", "api.example.com", &[]),
                ok(&pp, &["api.example.com"]),
            ),
            (
                "ServiceEntry wildcard",
                &a,
                http(PP, "PassthroughCluster", "x.wild.com:443", &[]),
                ok(&pp, &["x.wild.com"]),
            ),
            (
                "dispatch domain",
                &a,
                http(PP, "PassthroughCluster", "dispatch.example.org", &[]),
                ok(&pp, &["dispatch.example.org"]),
            ),
            (
                "a one-dot external host is not name.ns",
                &a,
                http(PP, "", "example.com", &[]),
                Err(DropReason::ExternalNotAllowed),
            ),
            (
                "unknown source",
                &a,
                http("10.9.9.9", "", "details", &[]),
                Err(DropReason::UnknownSource),
            ),
            (
                "no source address",
                &a,
                http("", "", "details", &[]),
                Err(DropReason::UnknownSource),
            ),
            (
                "hostNetwork pod IP",
                &a,
                http("10.0.0.100", "", "details", &[]),
                Err(DropReason::UnknownSource),
            ),
            (
                "pod selected by no Service",
                &a,
                http("10.0.0.3", "", "details", &[]),
                Err(DropReason::UnknownSource),
            ),
            (
                "pod in several Services",
                &a,
                http("10.0.0.2", "", "details", &[]),
                ok(&["default/reviews", "default/reviews-all"], &[FQDN]),
            ),
            (
                "workload fence",
                &a,
                http("10.0.0.4", "", "details", &[]),
                ok(&["default/wl-batch.workload.identity"], &[FQDN]),
            ),
            (
                "global-sidecar's own calls",
                &a,
                http(
                    "10.0.0.9",
                    "outbound|9080||details.default.svc.cluster.local",
                    "details",
                    &[],
                ),
                Err(DropReason::OwnTraffic),
            ),
            (
                "calls to the global-sidecar",
                &a,
                http(
                    PP,
                    "outbound|80||global-sidecar.mesh-operator.svc.cluster.local",
                    "global-sidecar.mesh-operator.svc.cluster.local",
                    &[],
                ),
                Err(DropReason::OwnTraffic),
            ),
            (
                "global-sidecar VIP",
                &a,
                http(PP, "", "10.96.0.9", &[]),
                Err(DropReason::OwnTraffic),
            ),
            (
                "invalid host",
                &a,
                http(PP, "", "bad_host!", &[]),
                Err(DropReason::InvalidHost),
            ),
            (
                "invalid cluster host",
                &a,
                http(PP, "outbound|80||a..b", "", &[]),
                Err(DropReason::InvalidHost),
            ),
            (
                "no destination",
                &a,
                http(PP, "", "", &[]),
                Err(DropReason::InvalidHost),
            ),
            (
                "bad Slime-Source-Ns falls back to the caller's ns",
                &a,
                http(PP, "", "details", &[("slime-source-ns", "Bad NS")]),
                ok(&pp, &[FQDN]),
            ),
            (
                "upper-case FQDN",
                &a,
                http(PP, "", "DETAILS.default.svc.Cluster.Local", &[]),
                ok(&pp, &[FQDN]),
            ),
            (
                "trailing dot",
                &a,
                http(PP, "", "details.default.svc.cluster.local.", &[]),
                ok(&pp, &[FQDN]),
            ),
            (
                "overlapping IPs, no identity",
                &a,
                http("10.0.0.50", "", "details.default", &[]),
                Err(DropReason::AmbiguousSource),
            ),
            (
                "overlapping IPs, identity picks",
                &a,
                with_identity(
                    http("10.0.0.50", "", "details.default", &[]),
                    "spiffe://cluster.local/ns/b/sa/y",
                ),
                ok(&["b/beta"], &[FQDN]),
            ),
            (
                "identity of nobody at that IP",
                &a,
                with_identity(
                    http(PP, "", "details", &[]),
                    "spiffe://cluster.local/ns/default/sa/other",
                ),
                Err(DropReason::IdentityMismatch),
            ),
            (
                "identity confirms",
                &a,
                with_identity(
                    http(PP, "", "details", &[]),
                    "spiffe://cluster.local/ns/default/sa/bookinfo",
                ),
                ok(&pp, &[FQDN]),
            ),
        ];
        crate::testing::assert_table(
            cases.into_iter().map(|(name, attributor, entry, want)| {
                (name, run(attributor, &idx, Entry::http(&entry)), want)
            }),
        );
    }

    #[test]
    fn health_checks_and_tcp() {
        let idx = index();
        let a = attributor(false);
        let mut probe = http(PP, "", "details", &[]);
        if let Some(r) = probe.request.as_mut() {
            r.user_agent = "kube-probe/1.33".into();
        }
        assert_eq!(run(&a, &idx, Entry::http(&probe)), Err(DropReason::HealthCheck));
        let tcp = TcpAccessLogEntry {
            common_properties: Some(common(PP, "outbound|3306||mysql.db.svc.cluster.local")),
            ..Default::default()
        };
        assert_eq!(
            run(&a, &idx, Entry::tcp(&tcp)),
            Ok((
                vec!["default/productpage".into()],
                vec!["mysql.db.svc.cluster.local".into()]
            ))
        );
        let passthrough = TcpAccessLogEntry {
            common_properties: Some(common(PP, "PassthroughCluster")),
            ..Default::default()
        };
        assert_eq!(
            run(&a, &idx, Entry::tcp(&passthrough)),
            Err(DropReason::ExternalNotAllowed)
        );
    }

    #[test]
    fn cluster_names() {
        assert_eq!(
            cluster_host("outbound|9080|v1|reviews.default.svc.cluster.local"),
            Some("reviews.default.svc.cluster.local")
        );
        assert_eq!(cluster_host("inbound|9080||"), None);
        assert_eq!(cluster_host("outbound|x||a"), None);
        assert_eq!(cluster_host("outbound|1||a|b"), None);
    }
}
