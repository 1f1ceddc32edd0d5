//! The routing tables: VirtualServices (by host, and the delegate walk that says where a call to
//! a host can end up) and ServiceEntries (their hosts, for "is this a mesh host"). Each secondary
//! map is written only here, so it always equals what rebuilding it from the objects would give.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::{ServiceEntryInfo, VirtualServiceInfo};
use crate::vocab::ObjectKey;

/// VirtualServices, by key and by host.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct VirtualServices {
    by_key: HashMap<ObjectKey, VirtualServiceInfo>,
    by_host: HashMap<String, BTreeSet<ObjectKey>>,
}

impl VirtualServices {
    /// Adds or replaces a VirtualService.
    pub(super) fn insert(&mut self, vs: VirtualServiceInfo) {
        self.remove(&vs.key);
        for h in &vs.hosts {
            self.by_host.entry(h.clone()).or_default().insert(vs.key.clone());
        }
        self.by_key.insert(vs.key.clone(), vs);
    }

    /// Removes a VirtualService.
    pub(super) fn remove(&mut self, key: &ObjectKey) -> Option<VirtualServiceInfo> {
        let old = self.by_key.remove(key)?;
        for h in &old.hosts {
            if let Some(set) = self.by_host.get_mut(h) {
                set.remove(key);
                if set.is_empty() {
                    self.by_host.remove(h);
                }
            }
        }
        Some(old)
    }

    /// Every VirtualService, in no particular order.
    pub(super) fn values(&self) -> impl Iterator<Item = &VirtualServiceInfo> {
        self.by_key.values()
    }

    /// How many VirtualServices there are.
    pub(super) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Where a call to `host` from `namespace` can end up besides `host` itself (see
    /// [`super::ClusterIndex::destinations`]).
    pub(super) fn destinations(&self, host: &str, namespace: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut seen = HashSet::new();
        for key in self.for_host(host) {
            if let Some(vs) = self.by_key.get(key)
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
    fn for_host<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a ObjectKey> + 'a {
        let wildcards = host
            .match_indices('.')
            .map(|(i, _)| format!("*{}", &host[i..]))
            .filter_map(|w| self.by_host.get(&w));
        self.by_host.get(host).into_iter().chain(wildcards).flatten()
    }

    /// Adds the destinations of `vs` and of the VirtualServices it delegates to, each visited
    /// once (delegate cycles terminate).
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
            if let Some(delegate) = self.by_key.get(d) {
                self.collect_destinations(delegate, out, seen);
            }
        }
    }

    /// The table rebuilt from its VirtualServices alone.
    #[cfg(test)]
    pub(super) fn rebuilt(&self) -> Self {
        let mut fresh = Self::default();
        self.by_key.values().for_each(|vs| fresh.insert(vs.clone()));
        fresh
    }
}

/// ServiceEntries, and their hosts with reference counts.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct ServiceEntries {
    by_key: HashMap<ObjectKey, ServiceEntryInfo>,
    /// Exact ServiceEntry hosts and, for `*.suffix` hosts, `.suffix`, with reference counts.
    hosts: HashMap<String, usize>,
}

impl ServiceEntries {
    /// Adds or replaces a ServiceEntry.
    pub(super) fn insert(&mut self, se: ServiceEntryInfo) {
        self.remove(&se.key);
        for h in &se.hosts {
            *self.hosts.entry(host_key(h).to_string()).or_default() += 1;
        }
        self.by_key.insert(se.key.clone(), se);
    }

    /// Removes a ServiceEntry.
    pub(super) fn remove(&mut self, key: &ObjectKey) -> Option<ServiceEntryInfo> {
        let old = self.by_key.remove(key)?;
        for h in &old.hosts {
            let k = host_key(h);
            if let Some(n) = self.hosts.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.hosts.remove(k);
                }
            }
        }
        Some(old)
    }

    /// Whether a ServiceEntry declares `host`, exactly or by a `*.suffix` wildcard (no
    /// allocation).
    pub(super) fn declares(&self, host: &str) -> bool {
        self.hosts.contains_key(host)
            || host
                .match_indices('.')
                .any(|(i, _)| self.hosts.contains_key(&host[i..]))
    }

    /// Every ServiceEntry, in no particular order.
    pub(super) fn values(&self) -> impl Iterator<Item = &ServiceEntryInfo> {
        self.by_key.values()
    }

    /// How many ServiceEntries there are.
    pub(super) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// The table rebuilt from its ServiceEntries alone.
    #[cfg(test)]
    pub(super) fn rebuilt(&self) -> Self {
        let mut fresh = Self::default();
        self.by_key.values().for_each(|se| fresh.insert(se.clone()));
        fresh
    }
}

/// The key of a ServiceEntry host in the host set: a `*.suffix` wildcard is kept as `.suffix`.
fn host_key(host: &str) -> &str {
    host.strip_prefix('*').unwrap_or(host)
}
