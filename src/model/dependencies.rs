//! A fence's dependencies: what it declares and what was learned, expanded and aged.
//!
//! The result is a pure function of the fence (spec, learned hosts with their last-seen times),
//! the cluster index, the configuration and the current time. Statuses are never carried over
//! from the previous status: a dependency is ACTIVE while its source says so, EXPIREWAIT for
//! `dependencyExpireWait` after its lifetime ends (still in the Sidecar, a visible warning), then
//! EXPIRE. A learned dependency that reaches EXPIRE is forgotten (removed from `metricStatus`), so
//! the next call through the global-sidecar learns it afresh.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::alias::with_aliases;
use crate::config::Config;
use crate::index::ClusterIndex;
use crate::vocab::fence::{
    Destinations, DomainStatus, RecyclingStrategy, ServiceFence, ServiceFenceStatus, metric_key_host,
};
use crate::vocab::host::{self, FenceHost, HostError};

/// A host that was rejected, and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidHost {
    /// Where the host was found, e.g. `spec.host["reviews:9080"]`.
    pub source: String,
    /// Why it was rejected.
    pub error: HostError,
}

/// A fence's computed dependencies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dependencies {
    /// `status.domains`.
    pub domains: BTreeMap<String, Destinations>,
    /// `status.metricStatus` after forgetting expired learned hosts.
    pub metric_status: BTreeMap<String, String>,
    /// `status.lastSeen` for the learned hosts kept.
    pub last_seen: BTreeMap<String, Time>,
    /// Hosts that were not used because they are invalid.
    pub invalid: Vec<InvalidHost>,
    /// The next moment a status changes by itself (requeue then).
    pub next_change: Option<Timestamp>,
}

/// Computes the dependencies of `fence` at `now`.
pub fn dependencies(
    fence: &ServiceFence,
    index: &ClusterIndex,
    cfg: &Config,
    now: Timestamp,
) -> Dependencies {
    let namespace = fence.metadata.namespace.as_deref().unwrap_or_default();
    let mut b = Builder {
        index,
        cfg,
        namespace,
        now,
        domains: BTreeMap::new(),
        out: Dependencies::default(),
    };
    // Learned first: `auto` strategies read the learned last-seen times.
    let learned_since = b.learned(&fence.status.clone().unwrap_or_default());
    b.declared(fence, &learned_since);
    b.selected(fence);
    b.finish(fence)
}

impl Builder<'_> {
    /// Adds the learned hosts of `status.metricStatus` that have not expired; returns when each
    /// was last seen.
    fn learned(&mut self, status: &ServiceFenceStatus) -> BTreeMap<String, Timestamp> {
        let mut learned_since = BTreeMap::new();
        for (key, count) in &status.metric_status {
            let Some(raw) = metric_key_host(key) else {
                // Not a host (another Prometheus handler's result): kept, not interpreted.
                self.out.metric_status.insert(key.clone(), count.clone());
                continue;
            };
            if raw == "unknown" {
                self.out.metric_status.insert(key.clone(), count.clone());
                continue;
            }
            let host = match host::host_name(raw) {
                Ok(h) => h,
                Err(error) => {
                    self.invalid(format!("status.metricStatus[{key:?}]"), error);
                    self.out.metric_status.insert(key.clone(), count.clone());
                    continue;
                }
            };
            if host::is_global_sidecar(&host, self.index.domain()) {
                continue;
            }
            // Dependencies learned by Slime carry no last-seen time: they start their TTL now.
            let since = status.last_seen.get(&host).map_or(self.now, |t| t.0);
            let general = &self.cfg.general;
            let (st, next) = match general.dependency_ttl {
                None => (DomainStatus::Active, None),
                Some(ttl) => age(since, ttl, general.dependency_expire_wait, self.now),
            };
            self.requeue(next);
            if st == DomainStatus::Expire {
                continue;
            }
            self.out.metric_status.insert(key.clone(), count.clone());
            self.out.last_seen.insert(host.clone(), Time(since));
            learned_since.insert(host.clone(), since);
            self.add_host(&host, st, &format!("status.metricStatus[{key:?}]"));
        }
        learned_since
    }

    /// Adds the hosts `spec.host` declares, each aged by its recycling strategy.
    fn declared(&mut self, fence: &ServiceFence, learned_since: &BTreeMap<String, Timestamp>) {
        let created = fence.metadata.creation_timestamp.as_ref().map(|t| t.0);
        for (key, strategy) in &fence.spec.host {
            let source = format!("spec.host[{key:?}]");
            let parsed = match FenceHost::parse(key, self.namespace, self.index.domain()) {
                Err(error) => {
                    self.invalid(source, error);
                    continue;
                }
                Ok(parsed) => parsed,
            };
            let last = match &parsed {
                FenceHost::Host(h) => learned_since.get(h).copied(),
                _ => None,
            };
            let (st, next) = self.strategy_status(strategy, last, created);
            self.requeue(next);
            match parsed {
                FenceHost::Host(h) => self.add_host(&h, st, &source),
                FenceHost::Namespace(ns) => self.add_namespace(&ns, st, &source),
                FenceHost::Scoped(entry) => {
                    let target = entry.split_once('/').map_or("", |(_, h)| h).to_string();
                    let dests = self.index.destinations(&target, self.namespace);
                    self.merge(entry, st, dests);
                }
            }
        }
    }

    /// Adds what `spec.namespaceSelector` and `spec.labelSelector` select.
    fn selected(&mut self, fence: &ServiceFence) {
        for (i, ns) in fence.spec.namespace_selector.iter().enumerate() {
            let source = format!("spec.namespaceSelector[{i}]");
            match host::dns_label(ns) {
                Ok(()) => self.add_namespace(ns, DomainStatus::Active, &source),
                Err(_) => self.invalid(source, HostError::Namespace(ns.clone())),
            }
        }
        let index = self.index;
        for (i, selector) in fence.spec.label_selector.iter().enumerate() {
            let source = format!("spec.labelSelector[{i}]");
            for key in index.services_with_labels(&selector.selector) {
                self.add_host(&index.fqdn(&key), DomainStatus::Active, &source);
            }
        }
    }

    /// The dependencies, each domain in Slime's shape.
    fn finish(self, fence: &ServiceFence) -> Dependencies {
        let Builder { domains, mut out, .. } = self;
        out.domains = domains
            .into_iter()
            .map(|(key, (status, hosts))| {
                // Slime's shape: the domain itself first, then what it routes to.
                let mut list: Vec<String> = hosts.iter().filter(|h| **h == key).cloned().collect();
                list.extend(hosts.into_iter().filter(|h| *h != key));
                let recently_called = status_recently_called(fence, &key);
                (
                    key,
                    Destinations {
                        recently_called,
                        hosts: list,
                        status,
                    },
                )
            })
            .collect();
        out
    }
}

/// Keeps Slime's deprecated `RecentlyCalled` of a domain across rewrites.
fn status_recently_called(fence: &ServiceFence, key: &str) -> Option<crate::vocab::fence::ProtoTimestamp> {
    fence.status.as_ref()?.domains.get(key)?.recently_called
}

/// Status of something that lives `life` after `since`, then waits `wait` as EXPIREWAIT;
/// and when that status changes next.
fn age(
    since: Timestamp,
    life: Duration,
    wait: Duration,
    now: Timestamp,
) -> (DomainStatus, Option<Timestamp>) {
    let end = since.checked_add(life).unwrap_or(Timestamp::MAX);
    let gone = end.checked_add(wait).unwrap_or(Timestamp::MAX);
    if now < end {
        (DomainStatus::Active, Some(end))
    } else if now < gone {
        (DomainStatus::ExpireWait, Some(gone))
    } else {
        (DomainStatus::Expire, None)
    }
}

struct Builder<'a> {
    index: &'a ClusterIndex,
    cfg: &'a Config,
    namespace: &'a str,
    now: Timestamp,
    domains: BTreeMap<String, (DomainStatus, BTreeSet<String>)>,
    out: Dependencies,
}

impl Builder<'_> {
    fn invalid(&mut self, source: String, error: HostError) {
        self.out.invalid.push(InvalidHost { source, error });
    }

    fn requeue(&mut self, at: Option<Timestamp>) {
        if let Some(at) = at {
            self.out.next_change = Some(self.out.next_change.map_or(at, |n| n.min(at)));
        }
    }

    /// Adds a domain: the most alive status wins, hosts accumulate.
    fn merge(&mut self, key: String, status: DomainStatus, hosts: impl IntoIterator<Item = String>) {
        let entry = self
            .domains
            .entry(key)
            .or_insert((DomainStatus::Expire, BTreeSet::new()));
        entry.0 = entry.0.max(status);
        entry.1.extend(hosts);
    }

    /// Adds a host, each of its aliases, and what their VirtualServices route to.
    fn add_host(&mut self, host: &str, status: DomainStatus, source: &str) {
        for alias in with_aliases(host, &self.cfg.general.domain_aliases) {
            let alias = match host::host_name(&alias) {
                Ok(a) => a,
                Err(error) => {
                    self.invalid(format!("{source} alias {alias:?}"), error);
                    continue;
                }
            };
            let mut hosts = self.index.destinations(&alias, self.namespace);
            hosts.insert(alias.clone());
            self.merge(alias, status, hosts);
        }
    }

    /// Adds `ns/*`: the namespace itself, plus what its services' aliases and VirtualServices
    /// lead to outside it (inside it, `ns/*` already covers them).
    fn add_namespace(&mut self, ns: &str, status: DomainStatus, source: &str) {
        let suffix = format!(".{ns}.svc.{}", self.index.domain());
        let mut hosts = BTreeSet::new();
        for svc in self.index.services_in(ns) {
            let fqdn = self.index.fqdn(&svc.key);
            for alias in with_aliases(&fqdn, &self.cfg.general.domain_aliases) {
                match host::host_name(&alias) {
                    Ok(alias) => {
                        hosts.extend(self.index.destinations(&alias, self.namespace));
                        hosts.insert(alias);
                    }
                    Err(error) => self.invalid(format!("{source} alias {alias:?}"), error),
                }
            }
        }
        hosts.retain(|h| !h.ends_with(&suffix));
        self.merge(format!("{ns}/*"), status, hosts);
    }

    /// Status of a declared host under its recycling strategy (Slime's precedence: stable,
    /// then deadline, then auto). `last` is when the host was last learned.
    fn strategy_status(
        &self,
        s: &RecyclingStrategy,
        last: Option<Timestamp>,
        created: Option<Timestamp>,
    ) -> (DomainStatus, Option<Timestamp>) {
        if s.stable.is_some() {
            return (DomainStatus::Active, None);
        }
        if let Some(expire) = s
            .deadline
            .as_ref()
            .and_then(|d| d.expire)
            .and_then(|e| e.as_time())
        {
            return if self.now < expire {
                (DomainStatus::Active, Some(expire))
            } else {
                (DomainStatus::Expire, None)
            };
        }
        if let Some(duration) = s.auto.as_ref().and_then(|a| a.duration) {
            let called = s.recently_called.and_then(|r| r.as_time());
            // Never called: the clock starts when the fence was created.
            if let Some(since) = called.max(last).or(created) {
                return age(
                    since,
                    duration.as_duration(),
                    self.cfg.general.dependency_expire_wait,
                    self.now,
                );
            }
        }
        (DomainStatus::Active, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn ageing_windows() {
        let hour = Duration::from_secs(3600);
        let since = ts("2026-01-01T00:00:00Z");
        let cases = [
            (
                "2026-01-01T00:30:00Z",
                DomainStatus::Active,
                Some("2026-01-01T01:00:00Z"),
            ),
            (
                "2026-01-01T01:00:00Z",
                DomainStatus::ExpireWait,
                Some("2026-01-01T02:00:00Z"),
            ),
            (
                "2026-01-01T01:59:59Z",
                DomainStatus::ExpireWait,
                Some("2026-01-01T02:00:00Z"),
            ),
            ("2026-01-01T02:00:00Z", DomainStatus::Expire, None),
        ];
        for (now, status, next) in cases {
            assert_eq!(age(since, hour, hour, ts(now)), (status, next.map(ts)), "{now}");
        }
        assert_eq!(age(since, Duration::MAX, hour, since).0, DomainStatus::Active);
    }
}
