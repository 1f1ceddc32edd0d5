//! `lazyload explain <namespace>/<name>`: why each host is (or is not) in a workload's Sidecar.
//!
//! The answer comes from the model itself, not from a second set of rules: the fence is
//! evaluated as `serve` evaluates it (the Sidecar and the status it would write), and then once
//! per source of hosts — each `spec.host` entry, each namespace and label selector, each learned
//! dependency — with the fence cut down to that one source, which tells which domains (and which
//! aliases and VirtualService destinations of them) that source brings. What the model adds by
//! itself (Istio's and lazyload's namespaces, `stableHost`, the global-sidecar) is named as such.
//! The fence's learned last-seen times are also the last calls that went through the
//! global-sidecar: only such a call (its access log) refreshes them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::Context as _;
use jiff::Timestamp;
use serde::Serialize;

use crate::config::{Config, MetricSourceType};
use crate::index::ClusterIndex;
use crate::model::alias::with_aliases;
use crate::model::dependencies::dependencies;
use crate::vocab::ObjectKey;
use crate::vocab::fence::{DomainStatus, ServiceFence, ServiceFenceStatus, metric_key_host};
use crate::vocab::host::is_global_sidecar;
use crate::vocab::istio::IstioVersion;

/// Flags of `lazyload explain`.
#[derive(Clone, Debug, clap::Args)]
pub struct ExplainArgs {
    /// The workload's fence, `<namespace>/<name>`.
    pub workload: String,
    /// Configuration file (SlimeBoot lazyload module).
    #[arg(short, long, env = "LAZYLOAD_CONFIG")]
    pub config: Option<PathBuf>,
    /// The cluster with its ServiceFences (`kubectl get ... -A -o yaml`).
    #[arg(long)]
    pub cluster_snapshot: PathBuf,
    /// What `serve --manifests-dir` (or `generate`) wrote: the fences' learned state is read
    /// from there.
    #[arg(long)]
    pub manifests_dir: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Why a host is in the Sidecar (or would be).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    /// Istio's namespace, always imported.
    IstioNamespace,
    /// lazyload's namespace, always imported.
    LazyloadNamespace,
    /// `general.stableHost` of the configuration.
    StableHost,
    /// The global-sidecar Service, imported when it lives in another namespace.
    GlobalSidecar,
    /// Declared in the fence's spec.
    Spec {
        /// Where: `spec.host["reviews"]`, `spec.namespaceSelector[0]`, `spec.labelSelector[1]`.
        source: String,
    },
    /// Learned from traffic.
    Learned {
        /// The learned host.
        host: String,
        /// When it was last seen (its TTL runs from there).
        at: Option<Timestamp>,
        /// How it was learned (`access log` through the global-sidecar, or `prometheus`).
        source: String,
    },
    /// A VirtualService of `of` routes here.
    VirtualService {
        /// The host the VirtualService is for.
        of: String,
        /// Why `of` is a dependency.
        because: Box<Reason>,
    },
    /// An alias (`domainAliases`) of `of`.
    Alias {
        /// The host it is an alias of.
        of: String,
        /// Why `of` is a dependency.
        because: Box<Reason>,
    },
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::IstioNamespace => write!(f, "Istio's namespace (always imported)"),
            Reason::LazyloadNamespace => write!(f, "lazyload's namespace (always imported)"),
            Reason::StableHost => write!(f, "general.stableHost"),
            Reason::GlobalSidecar => write!(f, "the global-sidecar (the fallback for everything else)"),
            Reason::Spec { source } => write!(f, "declared: {source}"),
            Reason::Learned { host, at, source } => match at {
                Some(at) => write!(f, "learned: {host}, last seen {at}, from the {source}"),
                None => write!(f, "learned: {host} (no last-seen time), from the {source}"),
            },
            Reason::VirtualService { of, because } => {
                write!(f, "VirtualService expansion of {of} ({because})")
            }
            Reason::Alias { of, because } => write!(f, "alias of {of} ({because})"),
        }
    }
}

/// One egress host of the Sidecar.
#[derive(Clone, Debug, Serialize)]
pub struct HostExplained {
    /// The host as the Sidecar lists it (`*/reviews.default.svc.cluster.local`, `ns/*`).
    pub host: String,
    /// Its dependency status (`ACTIVE`, or `EXPIREWAIT`: still in, about to leave).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Every reason it is there.
    pub reasons: Vec<Reason>,
}

/// A host that is not in the Sidecar although something named it.
#[derive(Clone, Debug, Serialize)]
pub struct HostLeftOut {
    /// The host (or the entry that named it).
    pub host: String,
    /// Why it is not in the Sidecar.
    pub why: String,
}

/// The explanation of one workload's Sidecar.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    /// `namespace/name` of the fence.
    pub fence: String,
    /// Whether lazyload manages the workload's Sidecar (`spec.enable`).
    pub enabled: bool,
    /// The labels of the pods the Sidecar selects; none when there is no Sidecar.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<BTreeMap<String, String>>,
    /// Why there is no Sidecar (when there is none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_sidecar: Option<String>,
    /// The Sidecar's egress hosts and why each is there (what it would be without a Sidecar
    /// too: the hosts the fence would import).
    pub hosts: Vec<HostExplained>,
    /// Dependencies that expired (and were forgotten) or are expired by their strategy.
    pub expired: Vec<HostLeftOut>,
    /// Hosts refused: invalid, or a global-sidecar.
    pub refused: Vec<HostLeftOut>,
    /// The last calls that went through the global-sidecar (the learned hosts by last-seen
    /// time, newest first: only a call through the global-sidecar refreshes it).
    pub fallback_calls: Vec<FallbackCall>,
}

/// A call that went through the global-sidecar.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FallbackCall {
    /// The host called.
    pub host: String,
    /// When it was last called that way.
    pub at: Timestamp,
}

/// At most this many fallback calls are listed.
const MAX_FALLBACK_CALLS: usize = 10;

/// Loads the snapshot (and the manifests' learned state) and explains `args.workload`.
pub fn run(args: &ExplainArgs, now: Timestamp) -> anyhow::Result<Explanation> {
    let (config, mut snapshot) =
        crate::inputs::config_and_snapshot(args.config.as_deref(), &args.cluster_snapshot)?;
    if let Some(dir) = &args.manifests_dir {
        crate::manifests::restore_fence_status(dir, &mut snapshot.fences)
            .with_context(|| format!("reading {}", dir.display()))?;
    }
    let (namespace, name) = args
        .workload
        .split_once('/')
        .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
        .with_context(|| format!("{:?}: expected <namespace>/<name>", args.workload))?;
    let fence = snapshot
        .fences
        .iter()
        .find(|f| {
            f.metadata.namespace.as_deref() == Some(namespace) && f.metadata.name.as_deref() == Some(name)
        })
        .with_context(|| {
            format!(
                "no ServiceFence {namespace}/{name} in the snapshot: lazyload does not scope this workload"
            )
        })?;
    Ok(explain(fence, &snapshot.index, &config, now))
}

/// Explains `fence`'s Sidecar at `now`.
pub fn explain(fence: &ServiceFence, index: &ClusterIndex, cfg: &Config, now: Timestamp) -> Explanation {
    let eval = crate::model::evaluate(fence, index, cfg, now, IstioVersion::default());
    let namespace = fence.metadata.namespace.clone().unwrap_or_default();
    let egress: Vec<String> = match eval.sidecar_hosts() {
        Some(hosts) => hosts.to_vec(),
        None => crate::model::sidecar::egress_hosts(&namespace, &eval.status.domains, cfg, index.domain()),
    };

    let reasons = host_reasons(fence, &namespace, index, cfg, now);
    let status_of = |entry: &str| -> Option<String> {
        let host = entry.strip_prefix("*/").unwrap_or(entry);
        eval.status
            .domains
            .iter()
            .filter(|(k, d)| *k == entry || d.hosts.iter().any(|h| h == host))
            .map(|(_, d)| d.status)
            .max()
            .map(|s| status_name(s).to_string())
    };
    let hosts = egress
        .iter()
        .map(|h| {
            let mut why: Vec<Reason> = reasons
                .get(h)
                .map(|r| r.iter().cloned().collect())
                .unwrap_or_default();
            if why.is_empty() && h.contains("/global-sidecar.") {
                why.push(Reason::GlobalSidecar);
            }
            HostExplained {
                host: h.clone(),
                status: status_of(h),
                reasons: why,
            }
        })
        .collect();

    let old = fence.status.clone().unwrap_or_default();
    Explanation {
        fence: ObjectKey::of_or_empty(&fence.metadata).to_string(),
        enabled: fence.spec.enable,
        workload_selector: eval
            .sidecar
            .as_ref()
            .ok()
            .and_then(|s| s.spec.workload_selector.as_ref().map(|w| w.labels.clone())),
        no_sidecar: eval.sidecar.as_ref().err().map(|why| why.message().to_string()),
        hosts,
        expired: expired(&old, &eval.status, cfg, index.domain()),
        refused: refused(fence, index, cfg, now),
        fallback_calls: fallback_calls(&old),
    }
}

/// Why each Sidecar entry (`ns/*`, `*/host`) would be there: the namespaces every Sidecar
/// imports, the stable hosts, and each source of the fence's dependencies.
fn host_reasons(
    fence: &ServiceFence,
    namespace: &str,
    index: &ClusterIndex,
    cfg: &Config,
    now: Timestamp,
) -> BTreeMap<String, BTreeSet<Reason>> {
    let mut reasons: BTreeMap<String, BTreeSet<Reason>> = BTreeMap::new();
    reasons
        .entry(format!("{}/*", cfg.global.istio_namespace))
        .or_default()
        .insert(Reason::IstioNamespace);
    reasons
        .entry(format!("{}/*", cfg.global.slime_namespace))
        .or_default()
        .insert(Reason::LazyloadNamespace);
    for h in &cfg.general.stable_host {
        reasons.entry(h.clone()).or_default().insert(Reason::StableHost);
    }
    let aliases = &cfg.general.domain_aliases;
    for (source, single) in sources(fence, cfg) {
        let deps = dependencies(&single, index, cfg, now);
        for (key, dest) in &deps.domains {
            // A domain that is an alias of another domain of the same source is there for it.
            let alias_of = deps.domains.keys().find(|other| {
                *other != key && !other.contains('/') && with_aliases(other, aliases).contains(key)
            });
            let why = match alias_of {
                Some(of) => Reason::Alias {
                    of: of.clone(),
                    because: Box::new(source.clone()),
                },
                None => source.clone(),
            };
            if let Some(ns) = key.strip_suffix("/*") {
                reasons.entry(key.clone()).or_default().insert(why.clone());
                for h in &dest.hosts {
                    let r = namespace_host_reason(index, cfg, ns, namespace, h, &why);
                    reasons.entry(format!("*/{h}")).or_default().insert(r);
                }
                continue;
            }
            for h in &dest.hosts {
                let r = if h == key {
                    why.clone()
                } else {
                    Reason::VirtualService {
                        of: key.clone(),
                        because: Box::new(why.clone()),
                    }
                };
                reasons.entry(format!("*/{h}")).or_default().insert(r);
            }
        }
    }
    reasons
}

/// The sources of a fence's hosts: why, and the fence cut down to that source alone.
fn sources(fence: &ServiceFence, cfg: &Config) -> Vec<(Reason, ServiceFence)> {
    let bare = || {
        let mut f = fence.clone();
        f.spec.host.clear();
        f.spec.namespace_selector.clear();
        f.spec.label_selector.clear();
        f.status = None;
        f
    };
    let mut out = Vec::new();
    for (key, strategy) in &fence.spec.host {
        let mut f = bare();
        f.spec.host.insert(key.clone(), strategy.clone());
        out.push((
            Reason::Spec {
                source: format!("spec.host[{key:?}]"),
            },
            f,
        ));
    }
    for (i, ns) in fence.spec.namespace_selector.iter().enumerate() {
        let mut f = bare();
        f.spec.namespace_selector.push(ns.clone());
        out.push((
            Reason::Spec {
                source: format!("spec.namespaceSelector[{i}] ({ns})"),
            },
            f,
        ));
    }
    for (i, selector) in fence.spec.label_selector.iter().enumerate() {
        let mut f = bare();
        f.spec.label_selector.push(selector.clone());
        let labels: Vec<String> = selector
            .selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        out.push((
            Reason::Spec {
                source: format!("spec.labelSelector[{i}] ({})", labels.join(",")),
            },
            f,
        ));
    }
    let status = fence.status.clone().unwrap_or_default();
    let how = match cfg.general.metric_source_type {
        MetricSourceType::Accesslog => "access log of a call through the global-sidecar",
        MetricSourceType::Prometheus => "Prometheus query results",
    };
    for (key, count) in &status.metric_status {
        let Some(host) = metric_key_host(key) else {
            continue;
        };
        let mut f = bare();
        let mut s = ServiceFenceStatus::default();
        s.metric_status.insert(key.clone(), count.clone());
        if let Some(seen) = status.last_seen.get(host) {
            s.last_seen.insert(host.to_string(), seen.clone());
        }
        f.status = Some(s);
        out.push((
            Reason::Learned {
                host: host.to_string(),
                at: status.last_seen.get(host).map(|t| t.0),
                source: how.to_string(),
            },
            f,
        ));
    }
    out
}

/// Why host `h` of domain `ns/*` is there: an alias, or a VirtualService destination, of one of
/// the namespace's Services (the namespace's own hosts are covered by `ns/*` itself).
fn namespace_host_reason(
    index: &ClusterIndex,
    cfg: &Config,
    ns: &str,
    fence_namespace: &str,
    h: &str,
    why: &Reason,
) -> Reason {
    for svc in index.services_in(ns) {
        let fqdn = index.fqdn(&svc.key);
        for alias in with_aliases(&fqdn, &cfg.general.domain_aliases) {
            if alias == h && alias != fqdn {
                return Reason::Alias {
                    of: fqdn,
                    because: Box::new(why.clone()),
                };
            }
            if index.destinations(&alias, fence_namespace).contains(h) {
                return Reason::VirtualService {
                    of: alias,
                    because: Box::new(why.clone()),
                };
            }
        }
    }
    why.clone()
}

/// Learned hosts the model forgot (their TTL and the expiry wait passed) and domains whose
/// strategy expired them.
fn expired(
    old: &ServiceFenceStatus,
    new: &ServiceFenceStatus,
    cfg: &Config,
    domain: &str,
) -> Vec<HostLeftOut> {
    let mut out = Vec::new();
    for key in old
        .metric_status
        .keys()
        .filter(|k| !new.metric_status.contains_key(*k))
    {
        // A global-sidecar is refused, not expired (see `refused`).
        let Some(host) = metric_key_host(key).filter(|h| !is_global_sidecar(h, domain)) else {
            continue;
        };
        let seen = old.last_seen.get(host).map(|t| t.0);
        let why = match (seen, cfg.general.dependency_ttl) {
            (Some(seen), Some(ttl)) => format!(
                "learned, last seen {seen}; dependencyTtl ({}) and dependencyExpireWait ({}) have passed: forgotten (the next call through the global-sidecar learns it again)",
                humantime(ttl),
                humantime(cfg.general.dependency_expire_wait)
            ),
            _ => "learned, expired: forgotten".to_string(),
        };
        out.push(HostLeftOut {
            host: host.to_string(),
            why,
        });
    }
    for (key, dest) in new.domains.iter().filter(|(_, d)| !d.status.in_sidecar()) {
        out.push(HostLeftOut {
            host: key.clone(),
            why: format!(
                "its recycling strategy expired it (status {}): not in the Sidecar",
                status_name(dest.status)
            ),
        });
    }
    out
}

/// The learned hosts by last-seen time, newest first.
fn fallback_calls(status: &ServiceFenceStatus) -> Vec<FallbackCall> {
    let mut calls: Vec<FallbackCall> = status
        .last_seen
        .iter()
        .map(|(host, at)| FallbackCall {
            host: host.clone(),
            at: at.0,
        })
        .collect();
    calls.sort_by(|a, b| b.at.cmp(&a.at).then_with(|| a.host.cmp(&b.host)));
    calls.truncate(MAX_FALLBACK_CALLS);
    calls
}

/// Slime's name of a dependency status.
fn status_name(s: DomainStatus) -> &'static str {
    match s {
        DomainStatus::Active => "ACTIVE",
        DomainStatus::ExpireWait => "EXPIREWAIT",
        DomainStatus::Expire => "EXPIRE",
    }
}

fn humantime(d: std::time::Duration) -> String {
    format!("{}s", d.as_secs())
}

/// Hosts named but refused: invalid entries, and global-sidecars learned as dependencies.
fn refused(fence: &ServiceFence, index: &ClusterIndex, cfg: &Config, now: Timestamp) -> Vec<HostLeftOut> {
    let deps = dependencies(fence, index, cfg, now);
    let mut out: Vec<HostLeftOut> = deps
        .invalid
        .iter()
        .map(|i| HostLeftOut {
            host: i.source.clone(),
            why: format!("invalid: {}", i.error),
        })
        .collect();
    let status = fence.status.clone().unwrap_or_default();
    for host in status.metric_status.keys().filter_map(|k| metric_key_host(k)) {
        if is_global_sidecar(host, index.domain()) {
            out.push(HostLeftOut {
                host: host.to_string(),
                why: "a global-sidecar is never a dependency (calls to it are the fallback itself)"
                    .to_string(),
            });
        }
    }
    out
}

/// The explanation as text.
pub fn text(e: &Explanation) -> String {
    let mut out = format!("fence {} (enable: {})\n", e.fence, e.enabled);
    match (&e.workload_selector, &e.no_sidecar) {
        (Some(labels), _) => {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!(
                "Sidecar {} selects pods {}\n",
                e.fence,
                labels.join(",")
            ));
        }
        (None, Some(why)) => out.push_str(&format!("no Sidecar: {why} (the hosts it would import:)\n")),
        (None, None) => {}
    }
    out.push_str(&format!("egress hosts ({}):\n", e.hosts.len()));
    for h in &e.hosts {
        let status = h.status.as_deref().map(|s| format!(" [{s}]")).unwrap_or_default();
        out.push_str(&format!("  {}{status}\n", h.host));
        for r in &h.reasons {
            out.push_str(&format!("    - {r}\n"));
        }
    }
    if !e.fallback_calls.is_empty() {
        out.push_str("last calls through the global-sidecar:\n");
        for c in &e.fallback_calls {
            out.push_str(&format!("  {} {}\n", c.at, c.host));
        }
    }
    for (title, list) in [("expired", &e.expired), ("refused", &e.refused)] {
        if !list.is_empty() {
            out.push_str(&format!("{title}:\n"));
            for h in list {
                out.push_str(&format!("  {}: {}\n", h.host, h.why));
            }
        }
    }
    out
}
