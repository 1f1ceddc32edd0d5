//! Host names as they appear in fences and Sidecars, and their validation.
//!
//! A Sidecar egress host is `<namespace>/<dnsName>` with exactly one `/` (Istio rejects anything
//! else and a single bad host makes istiod ignore the whole Sidecar). Everything lazyload writes
//! into a Sidecar goes through this module first; what does not pass is reported, never written.

use std::fmt;

/// Why a host was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// Nothing was given.
    #[error("empty host")]
    Empty,
    /// `host:port`.
    #[error("a host must not carry a port")]
    Port,
    /// Zero or several `/` where a Sidecar host needs exactly one, or a `/` in a plain host.
    #[error("a Sidecar host is `namespace/host` with exactly one `/`")]
    Slashes,
    /// A label with characters DNS does not allow.
    #[error("`{0}` is not a DNS label (letters, digits and `-`, 1 to 63 characters)")]
    Label(String),
    /// More than 253 characters.
    #[error("longer than 253 characters")]
    TooLong,
    /// An IP address where a name is expected.
    #[error("an IP address is not a host name")]
    Ip,
    /// `*` somewhere other than as the whole first label.
    #[error("`*` may only stand for the whole first label (`*.example.com`)")]
    Wildcard,
    /// The namespace part of `namespace/host` is not a namespace name.
    #[error("`{0}` is not a namespace name")]
    Namespace(String),
}

/// Checks a DNS-1123 label: lowercase letters, digits and `-`, not starting or ending with `-`.
pub fn dns_label(label: &str) -> Result<(), HostError> {
    let b = label.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(HostError::Label(label.to_string()))
    }
}

/// Checks a DNS-1123 subdomain: dot-separated labels, at most 253 characters.
pub fn dns_name(name: &str) -> Result<(), HostError> {
    if name.is_empty() {
        return Err(HostError::Empty);
    }
    if name.len() > 253 {
        return Err(HostError::TooLong);
    }
    name.split('.').try_for_each(dns_label)
}

/// Validates and normalises (lower-cases) a host a workload may depend on: a DNS name,
/// optionally with a leading `*.` wildcard label. No port, no namespace, no IP address.
pub fn host_name(host: &str) -> Result<String, HostError> {
    let host = host.trim();
    if host.is_empty() {
        return Err(HostError::Empty);
    }
    if host.contains('/') {
        return Err(HostError::Slashes);
    }
    if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
        return Err(HostError::Ip);
    }
    if host.contains(':') {
        return Err(HostError::Port);
    }
    let lower = host.to_ascii_lowercase();
    let rest = lower.strip_prefix("*.").unwrap_or(&lower);
    if rest.contains('*') {
        return Err(HostError::Wildcard);
    }
    dns_name(rest)?;
    Ok(lower)
}

/// Completes a short name the way Istio does for VirtualService hosts: a name without a dot is
/// `<name>.<namespace>.svc.<domain>`; anything with a dot is already qualified.
pub fn qualify(host: &str, namespace: &str, domain: &str) -> String {
    if host.contains('.') || host == "*" {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.{domain}")
    }
}

/// The FQDN of a Kubernetes Service.
pub fn service_fqdn(name: &str, namespace: &str, domain: &str) -> String {
    format!("{name}.{namespace}.svc.{domain}")
}

/// A `spec.host` key of a ServiceFence, parsed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FenceHost {
    /// `ns/*`: every service of a namespace.
    Namespace(String),
    /// `ns/host` with an explicit namespace part (`.`, `~` or a namespace): written verbatim.
    Scoped(String),
    /// A host in any namespace, qualified: written as `*/host`.
    Host(String),
}

impl FenceHost {
    /// Parses a `spec.host` key. Short names are completed with the fence's namespace.
    pub fn parse(key: &str, fence_namespace: &str, domain: &str) -> Result<Self, HostError> {
        let key = key.trim();
        match key.split_once('/') {
            None => Ok(Self::Host(host_name(&qualify(key, fence_namespace, domain))?)),
            Some((ns, rest)) => {
                if rest.contains('/') {
                    return Err(HostError::Slashes);
                }
                if rest == "*" && ns != "*" && ns != "~" {
                    if ns != "." {
                        dns_label(ns).map_err(|_| HostError::Namespace(ns.to_string()))?;
                    }
                    let ns = if ns == "." { fence_namespace } else { ns };
                    return Ok(Self::Namespace(ns.to_string()));
                }
                let entry = sidecar_host(key)?;
                match entry.strip_prefix("*/") {
                    Some(h) => Ok(Self::Host(h.to_string())),
                    None => Ok(Self::Scoped(entry)),
                }
            }
        }
    }

    /// The Sidecar egress host this stands for.
    pub fn sidecar_entry(&self) -> String {
        match self {
            Self::Namespace(ns) => format!("{ns}/*"),
            Self::Scoped(s) => s.clone(),
            Self::Host(h) => format!("*/{h}"),
        }
    }
}

impl fmt::Display for FenceHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.sidecar_entry())
    }
}

/// Validates a Sidecar egress host (`ns/dnsName`) and returns it normalised.
///
/// The namespace part is `*`, `.`, `~` or a namespace name; the host part is `*` or a host name
/// (optionally `*.`-prefixed). `~/*` (import nothing) and `*/*` (import everything) are refused:
/// neither belongs in a lazyload Sidecar.
pub fn sidecar_host(entry: &str) -> Result<String, HostError> {
    let (ns, host) = entry.split_once('/').ok_or(HostError::Slashes)?;
    if host.contains('/') {
        return Err(HostError::Slashes);
    }
    if !matches!(ns, "*" | "." | "~") {
        dns_label(ns).map_err(|_| HostError::Namespace(ns.to_string()))?;
    }
    if host == "*" {
        return if ns == "*" || ns == "~" {
            Err(HostError::Wildcard)
        } else {
            Ok(entry.to_string())
        };
    }
    Ok(format!("{ns}/{}", host_name(host)?))
}

/// Turns a `stableHost` config entry into its Sidecar egress host: `ns/*` and `ns/host` as they
/// are, a bare host as `*/host`.
pub fn stable_host_entry(entry: &str) -> Result<String, HostError> {
    if entry.contains('/') {
        sidecar_host(entry.trim())
    } else {
        Ok(format!("*/{}", host_name(entry)?))
    }
}

/// Whether `host` is a global-sidecar Service (never a dependency).
pub fn is_global_sidecar(host: &str, domain: &str) -> bool {
    host.strip_prefix(crate::vocab::GLOBAL_SIDECAR)
        .and_then(|rest| rest.strip_prefix('.'))
        .and_then(|rest| rest.strip_suffix(domain))
        .and_then(|rest| rest.strip_suffix(".svc."))
        .is_some_and(|ns| !ns.is_empty() && !ns.contains('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        let ok = [
            (
                "reviews.default.svc.cluster.local",
                "reviews.default.svc.cluster.local",
            ),
            ("WWW.Example.COM", "www.example.com"),
            ("*.baidu.com", "*.baidu.com"),
            ("details", "details"),
        ];
        for (input, want) in ok {
            assert_eq!(host_name(input).as_deref(), Ok(want), "{input}");
        }
        let bad = [
            ("", HostError::Empty),
            ("reviews:9080", HostError::Port),
            ("a/b", HostError::Slashes),
            ("10.0.0.1", HostError::Ip),
            ("[::1]:80", HostError::Ip),
            ("a.*.com", HostError::Wildcard),
            ("-a.com", HostError::Label("-a".into())),
            ("a..com", HostError::Label(String::new())),
            ("under_score.com", HostError::Label("under_score".into())),
        ];
        for (input, want) in bad {
            assert_eq!(host_name(input), Err(want), "{input}");
        }
        assert_eq!(host_name(&"a.".repeat(127)), Err(HostError::TooLong));
    }

    #[test]
    fn fence_hosts() {
        let d = "cluster.local";
        let cases = [
            ("test/*", Ok(FenceHost::Namespace("test".into()))),
            ("./*", Ok(FenceHost::Namespace("default".into()))),
            (
                "reviews",
                Ok(FenceHost::Host("reviews.default.svc.cluster.local".into())),
            ),
            ("reviews.other", Ok(FenceHost::Host("reviews.other".into()))),
            ("www.163.com", Ok(FenceHost::Host("www.163.com".into()))),
            ("*/www.163.com", Ok(FenceHost::Host("www.163.com".into()))),
            (
                "prod/ratings.prod.svc.cluster.local",
                Ok(FenceHost::Scoped("prod/ratings.prod.svc.cluster.local".into())),
            ),
            ("*/*", Err(HostError::Wildcard)),
            ("~/*", Err(HostError::Wildcard)),
            ("a/b/c", Err(HostError::Slashes)),
            ("Bad_NS/*", Err(HostError::Namespace("Bad_NS".into()))),
            ("reviews:9080", Err(HostError::Port)),
        ];
        for (key, want) in cases {
            assert_eq!(FenceHost::parse(key, "default", d), want, "{key}");
        }
    }

    #[test]
    fn stable_hosts() {
        assert_eq!(stable_host_entry("foo/*").unwrap(), "foo/*");
        assert_eq!(
            stable_host_entry("a.b.svc.cluster.local").unwrap(),
            "*/a.b.svc.cluster.local"
        );
        assert!(stable_host_entry("a/b/c").is_err());
    }

    #[test]
    fn qualify_follows_istio() {
        assert_eq!(
            qualify("reviews", "ns", "cluster.local"),
            "reviews.ns.svc.cluster.local"
        );
        assert_eq!(qualify("reviews.other", "ns", "cluster.local"), "reviews.other");
        assert_eq!(qualify("*", "ns", "cluster.local"), "*");
    }

    #[test]
    fn global_sidecar_hosts() {
        assert!(is_global_sidecar(
            "global-sidecar.mesh-operator.svc.cluster.local",
            "cluster.local"
        ));
        assert!(!is_global_sidecar(
            "global-sidecar.a.b.svc.cluster.local",
            "cluster.local"
        ));
        assert!(!is_global_sidecar(
            "global-sidecar-x.ns.svc.cluster.local",
            "cluster.local"
        ));
        assert!(!is_global_sidecar(
            "reviews.default.svc.cluster.local",
            "cluster.local"
        ));
    }
}
