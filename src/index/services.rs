//! The Services table: Services by key, with the lookups kept beside them (by namespace, by
//! label, by cluster IP, by `name.namespace`). Every secondary map is written only here, so it
//! always equals what rebuilding it from the Services would give ([`Services::rebuilt`]).

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use super::ServiceInfo;
use crate::hash::FastMap;
use crate::vocab::ObjectKey;
use crate::vocab::labels::Labels;

/// Services and their lookups.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Services {
    by_key: HashMap<ObjectKey, ServiceInfo>,
    by_namespace: FastMap<String, BTreeSet<String>>,
    by_label: HashMap<(String, String), BTreeSet<ObjectKey>>,
    /// Cluster IP -> the Service and its FQDN (written as is into learned hosts).
    by_vip: FastMap<IpAddr, (ObjectKey, Box<str>)>,
    /// `name.namespace` of every Service, for the `name.ns` authorities of the hot path.
    short_names: FastMap<Box<str>, ()>,
}

impl Services {
    /// Adds or replaces a Service whose FQDN is `fqdn`; returns the one it replaced.
    pub(super) fn insert(&mut self, svc: ServiceInfo, fqdn: Box<str>) -> Option<ServiceInfo> {
        let old = self.remove(&svc.key);
        self.by_namespace
            .entry(svc.key.namespace.clone())
            .or_default()
            .insert(svc.key.name.clone());
        for (k, v) in &svc.labels {
            self.by_label
                .entry((k.clone(), v.clone()))
                .or_default()
                .insert(svc.key.clone());
        }
        for ip in &svc.cluster_ips {
            if let Ok(ip) = ip.parse() {
                self.by_vip.insert(ip, (svc.key.clone(), fqdn.clone()));
            }
        }
        self.short_names.insert(short_name(&svc.key).into(), ());
        self.by_key.insert(svc.key.clone(), svc);
        old
    }

    /// Removes a Service.
    pub(super) fn remove(&mut self, key: &ObjectKey) -> Option<ServiceInfo> {
        let old = self.by_key.remove(key)?;
        if let Some(names) = self.by_namespace.get_mut(&key.namespace) {
            names.remove(&key.name);
            if names.is_empty() {
                self.by_namespace.remove(&key.namespace);
            }
        }
        for label in &old.labels {
            let label = (label.0.clone(), label.1.clone());
            if let Some(set) = self.by_label.get_mut(&label) {
                set.remove(key);
                if set.is_empty() {
                    self.by_label.remove(&label);
                }
            }
        }
        for ip in &old.cluster_ips {
            if let Ok(ip) = ip.parse::<IpAddr>()
                && self.by_vip.get(&ip).is_some_and(|(k, _)| k == key)
            {
                self.by_vip.remove(&ip);
            }
        }
        self.short_names.remove(short_name(key).as_str());
        Some(old)
    }

    /// A Service.
    pub(super) fn get(&self, key: &ObjectKey) -> Option<&ServiceInfo> {
        self.by_key.get(key)
    }

    /// Every Service, in no particular order.
    pub(super) fn values(&self) -> impl Iterator<Item = &ServiceInfo> {
        self.by_key.values()
    }

    /// How many Services there are.
    pub(super) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// The Services of a namespace, by name.
    pub(super) fn in_namespace<'a>(&'a self, namespace: &str) -> impl Iterator<Item = &'a ServiceInfo> + 'a {
        let ns = namespace.to_string();
        self.by_namespace
            .get(namespace)
            .into_iter()
            .flatten()
            .filter_map(move |name| self.by_key.get(&ObjectKey::new(ns.clone(), name.clone())))
    }

    /// Services carrying every label of `selector` (none for an empty selector).
    pub(super) fn with_labels(&self, selector: &Labels) -> BTreeSet<ObjectKey> {
        let mut sets = selector
            .iter()
            .map(|(k, v)| self.by_label.get(&(k.clone(), v.clone())));
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

    /// The Service whose cluster IP is `vip`, and its FQDN.
    pub(super) fn by_vip(&self, vip: IpAddr) -> Option<(&ObjectKey, &str)> {
        self.by_vip.get(&vip).map(|(k, fqdn)| (k, &**fqdn))
    }

    /// Whether a Service's `name.namespace` is `name_ns` (one hash lookup, no allocation).
    pub(super) fn has_short_name(&self, name_ns: &str) -> bool {
        self.short_names.contains_key(name_ns)
    }

    /// The table rebuilt from its Services alone (`fqdn` names each): what the secondary maps
    /// must equal after any sequence of changes.
    #[cfg(test)]
    pub(super) fn rebuilt(&self, fqdn: impl Fn(&ObjectKey) -> Box<str>) -> Self {
        let mut fresh = Self::default();
        for svc in self.by_key.values() {
            fresh.insert(svc.clone(), fqdn(&svc.key));
        }
        fresh
    }
}

/// `name.namespace`.
fn short_name(key: &ObjectKey) -> String {
    format!("{}.{}", key.name, key.namespace)
}
