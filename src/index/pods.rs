//! The Pods table: each pod with the fences its calls belong to, found by key or by IP. Pods live
//! in slots so the by-IP lookup of the access-log hot path is one hash lookup and no key
//! comparison. The secondary maps (by namespace, by IP) are written only here, so they always
//! equal what rebuilding them from the pods would give.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use super::PodInfo;
use crate::hash::FastMap;
use crate::vocab::ObjectKey;
use crate::vocab::labels::{Labels, subset_matches};

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

/// Pods, by key and by IP.
#[derive(Clone, Debug, Default)]
pub(super) struct Pods {
    /// Pods by key -> their slot in `slots`.
    by_key: HashMap<ObjectKey, u32>,
    slots: Vec<Option<PodEntry>>,
    free: Vec<u32>,
    by_namespace: HashMap<String, BTreeSet<String>>,
    by_ip: FastMap<IpAddr, IpSlots>,
}

impl Pods {
    /// Adds or replaces a pod whose calls belong to `services` (the Services selecting it,
    /// sorted) and then to `workload` (its workload fence, if any).
    pub(super) fn insert(&mut self, pod: PodInfo, services: Vec<ObjectKey>, workload: Option<ObjectKey>) {
        self.remove(&pod.key);
        let service_count = services.len();
        let mut fences = services;
        fences.extend(workload);
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                // More than 4 billion pods do not fit in a process anyway.
                u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        if !pod.host_network {
            for ip in &pod.ips {
                match self.by_ip.get_mut(ip) {
                    Some(at) => at.add(slot),
                    None => {
                        self.by_ip.insert(*ip, IpSlots::One(slot));
                    }
                }
            }
        }
        self.by_namespace
            .entry(pod.key.namespace.clone())
            .or_default()
            .insert(pod.key.name.clone());
        self.by_key.insert(pod.key.clone(), slot);
        if let Some(s) = self.slots.get_mut(slot as usize) {
            *s = Some(PodEntry {
                info: pod,
                fences,
                services: service_count,
            });
        }
    }

    /// Removes a pod.
    pub(super) fn remove(&mut self, key: &ObjectKey) -> Option<PodInfo> {
        let slot = self.by_key.remove(key)?;
        let old = self.slots.get_mut(slot as usize)?.take()?;
        self.free.push(slot);
        for ip in &old.info.ips {
            if let Some(at) = self.by_ip.get_mut(ip)
                && at.remove(slot)
            {
                self.by_ip.remove(ip);
            }
        }
        if let Some(names) = self.by_namespace.get_mut(&key.namespace) {
            names.remove(&key.name);
            if names.is_empty() {
                self.by_namespace.remove(&key.namespace);
            }
        }
        Some(old.info)
    }

    /// Re-decides, for every pod of `service`'s namespace, whether the Service (now selecting
    /// with `selector`, `None` when it selects nothing or is gone) selects it. Costs one
    /// selector match per pod of the namespace, not a rebuild.
    pub(super) fn service_changed(&mut self, service: &ObjectKey, selector: Option<&Labels>) {
        let Some(names) = self.by_namespace.get(&service.namespace) else {
            return;
        };
        for name in names {
            let pod_key = ObjectKey::new(service.namespace.clone(), name.clone());
            let slot = self.by_key.get(&pod_key).map(|&s| s as usize);
            let Some(entry) = slot.and_then(|s| self.slots.get_mut(s)).and_then(Option::as_mut) else {
                continue;
            };
            let selected = selector.is_some_and(|sel| subset_matches(sel, &entry.info.labels));
            match (selected, entry.fences[..entry.services].binary_search(service)) {
                (true, Err(at)) => {
                    entry.fences.insert(at, service.clone());
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

    fn entry(&self, key: &ObjectKey) -> Option<&PodEntry> {
        let slot = *self.by_key.get(key)?;
        self.slots.get(slot as usize)?.as_ref()
    }

    /// A pod.
    pub(super) fn get(&self, key: &ObjectKey) -> Option<&PodInfo> {
        self.entry(key).map(|e| &e.info)
    }

    /// The fences a call from pod `key` belongs to.
    pub(super) fn fences(&self, key: &ObjectKey) -> &[ObjectKey] {
        self.entry(key).map_or(&[], |e| e.fences.as_slice())
    }

    /// The pods (not on the host network) that have `ip`, with their fences. One hash lookup,
    /// no allocation.
    pub(super) fn at(&self, ip: IpAddr) -> impl Iterator<Item = (&PodInfo, &[ObjectKey])> + '_ {
        self.by_ip
            .get(&ip)
            .map_or(&[][..], IpSlots::as_slice)
            .iter()
            .filter_map(|&slot| self.slots.get(slot as usize)?.as_ref())
            .map(|e| (&e.info, e.fences.as_slice()))
    }

    /// Every pod, in no particular order.
    pub(super) fn values(&self) -> impl Iterator<Item = &PodInfo> {
        self.slots.iter().flatten().map(|e| &e.info)
    }

    /// How many pods there are.
    pub(super) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// The secondary maps in a form independent of slot numbers: pods by namespace, and the
    /// keys of the pods at each IP. After any sequence of changes they must equal those of a
    /// table rebuilt from the pods alone.
    #[cfg(test)]
    pub(super) fn lookups(
        &self,
    ) -> (
        HashMap<String, BTreeSet<String>>,
        std::collections::BTreeMap<IpAddr, BTreeSet<ObjectKey>>,
    ) {
        let by_ip = self
            .by_ip
            .keys()
            .map(|ip| (*ip, self.at(*ip).map(|(p, _)| p.key.clone()).collect()))
            .collect();
        (self.by_namespace.clone(), by_ip)
    }
}
