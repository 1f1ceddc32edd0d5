//! The part of an Envoy access-log entry that attribution reads, borrowed from the decoded
//! proto so that converting costs no allocation.

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::core::v3::Address;
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::data::accesslog::v3::tls_properties::certificate_properties::subject_alt_name::San;
use envoy_types::pb::envoy::data::accesslog::v3::{AccessLogCommon, HttpAccessLogEntry, TcpAccessLogEntry};

use crate::hash::FxHasher;

/// HTTP or TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// An HTTP request (`HTTPAccessLogEntry`).
    Http,
    /// A TCP connection (`TCPAccessLogEntry`).
    Tcp,
}

impl Kind {
    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tcp => "tcp",
        }
    }
}

/// One access-log entry, reduced to what attribution needs. Missing proto fields read as empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// HTTP or TCP.
    pub kind: Kind,
    /// The caller's IP: the socket peer (`downstream_direct_remote_address`), else
    /// `downstream_remote_address` (which `X-Forwarded-For` may have rewritten).
    pub source: Option<IpAddr>,
    /// The peer certificate's SPIFFE URI SAN, when the caller came over mTLS.
    pub peer_identity: Option<&'a str>,
    /// The cluster the global-sidecar routed to (`outbound|9080|v1|reviews.default.svc...`).
    pub upstream_cluster: &'a str,
    /// HTTP authority (`Host`), possibly with a port; empty for TCP.
    pub authority: &'a str,
    /// The `Slime-Orig-Dest` request header.
    pub orig_dest: Option<&'a str>,
    /// The `Slime-Source-Ns` request header.
    pub source_ns: Option<&'a str>,
    /// HTTP `User-Agent`.
    pub user_agent: &'a str,
    /// HTTP path.
    pub path: &'a str,
}

impl<'a> Entry<'a> {
    /// Reads an HTTP entry.
    pub fn http(e: &'a HttpAccessLogEntry) -> Self {
        let mut entry = Self::common(Kind::Http, e.common_properties.as_ref());
        if let Some(req) = &e.request {
            entry.authority = &req.authority;
            entry.user_agent = &req.user_agent;
            entry.path = &req.path;
            // Envoy logs header names lower-cased; accept other spellings from other loggers.
            for (k, v) in &req.request_headers {
                if k.eq_ignore_ascii_case(crate::vocab::ORIG_DEST_HEADER) {
                    entry.orig_dest = Some(v);
                } else if k.eq_ignore_ascii_case(crate::vocab::SOURCE_NS_HEADER) {
                    entry.source_ns = Some(v);
                }
            }
        }
        entry
    }

    /// Reads a TCP entry.
    pub fn tcp(e: &'a TcpAccessLogEntry) -> Self {
        Self::common(Kind::Tcp, e.common_properties.as_ref())
    }

    fn common(kind: Kind, common: Option<&'a AccessLogCommon>) -> Self {
        let mut entry = Entry {
            kind,
            source: None,
            peer_identity: None,
            upstream_cluster: "",
            authority: "",
            orig_dest: None,
            source_ns: None,
            user_agent: "",
            path: "",
        };
        let Some(c) = common else { return entry };
        entry.source = ip_of(c.downstream_direct_remote_address.as_ref())
            .or_else(|| ip_of(c.downstream_remote_address.as_ref()));
        entry.upstream_cluster = &c.upstream_cluster;
        entry.peer_identity = c
            .tls_properties
            .as_ref()
            .and_then(|t| t.peer_certificate_properties.as_ref())
            .and_then(|p| {
                p.subject_alt_name.iter().find_map(|s| match &s.san {
                    Some(San::Uri(uri)) if uri.starts_with("spiffe://") => Some(uri.as_str()),
                    _ => None,
                })
            });
        entry
    }
}

impl Entry<'_> {
    /// A 64-bit fingerprint of what attribution reads, except the health-check fields
    /// (`User-Agent` and path vary per request; a probe that repeats a known call's other fields
    /// is then counted as known, not as a health check).
    pub fn fingerprint(&self) -> u64 {
        let mut h = FxHasher::default();
        (self.kind as u8).hash(&mut h);
        self.source.hash(&mut h);
        self.peer_identity.hash(&mut h);
        self.upstream_cluster.hash(&mut h);
        self.authority.hash(&mut h);
        self.orig_dest.hash(&mut h);
        self.source_ns.hash(&mut h);
        h.finish()
    }
}

fn ip_of(addr: Option<&Address>) -> Option<IpAddr> {
    match addr?.address.as_ref()? {
        AddressKind::SocketAddress(s) => s.address.parse().ok(),
        _ => None,
    }
}

/// Parses `ip`, `ip:port` or `[v6]:port` (no allocation).
pub fn parse_ip(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    text.parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

/// A SPIFFE identity's namespace and service account (`spiffe://<td>/ns/<ns>/sa/<sa>`).
pub fn spiffe_ns_sa(uri: &str) -> Option<(&str, &str)> {
    let path = uri.strip_prefix("spiffe://")?.split_once('/')?.1;
    let rest = path.strip_prefix("ns/")?;
    let (ns, rest) = rest.split_once('/')?;
    let sa = rest.strip_prefix("sa/")?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains('/')).then_some((ns, sa))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_identities() {
        assert_eq!(parse_ip("10.0.0.7:9080"), Some("10.0.0.7".parse().unwrap()));
        assert_eq!(parse_ip("[fd00::1]:80"), Some("fd00::1".parse().unwrap()));
        assert_eq!(parse_ip(" 10.0.0.7 "), Some("10.0.0.7".parse().unwrap()));
        assert_eq!(parse_ip("reviews:80"), None);
        assert_eq!(
            spiffe_ns_sa("spiffe://cluster.local/ns/default/sa/bookinfo"),
            Some(("default", "bookinfo"))
        );
        assert_eq!(spiffe_ns_sa("spiffe://cluster.local/ns//sa/x"), None);
        assert_eq!(spiffe_ns_sa("https://x/ns/a/sa/b"), None);
    }

    #[test]
    fn empty_entries_read_as_empty() {
        let e = HttpAccessLogEntry::default();
        let entry = Entry::http(&e);
        assert_eq!(entry.kind, Kind::Http);
        assert_eq!(entry.source, None);
        assert_eq!(entry.authority, "");
        assert_eq!(Entry::tcp(&TcpAccessLogEntry::default()).kind, Kind::Tcp);
    }
}
