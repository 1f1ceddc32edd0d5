//! The decisions lazyload makes (a fence's dependencies and Sidecar, auto-fencing, the fallback
//! objects), over the types of [`crate::vocab`]. No I/O: every function here is a function
//! of its arguments, the current time included, so the controllers stay thin and the decisions
//! are table-tested.

pub mod alias;
pub mod autofence;
pub mod dependencies;
pub mod fallback;
pub mod scope;
pub mod sidecar;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::config::Config;
use crate::index::ClusterIndex;
use crate::vocab::ObjectKey;
use std::collections::BTreeMap;

use crate::vocab::fence::{
    CONDITION_HOST_CAP, CONDITION_HOSTS_VALID, CONDITION_SIDECAR, Destinations, ServiceFence,
    ServiceFenceStatus, metric_key_host,
};
use crate::vocab::istio::{IstioVersion, Sidecar};
use dependencies::{Dependencies, InvalidHost};
use sidecar::NoSidecar;

/// Everything the model decides about one fence.
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// The fence's new status (domains, learned dependencies, conditions).
    pub status: ServiceFenceStatus,
    /// The Sidecar that should exist, or why none should.
    pub sidecar: Result<Sidecar, NoSidecar>,
    /// When to evaluate again even if nothing changes (the next expiry).
    pub requeue_at: Option<Timestamp>,
}

impl Evaluation {
    /// The egress hosts of the Sidecar that should exist (its one egress listener), or `None`
    /// when none should.
    pub fn sidecar_hosts(&self) -> Option<&[String]> {
        let sidecar = self.sidecar.as_ref().ok()?;
        Some(sidecar.spec.egress.first().map_or(&[], |e| &e.hosts))
    }
}

/// At most this many invalid hosts are listed in a condition message.
const MAX_LISTED: usize = 10;

/// Evaluates a fence against the cluster at `now`.
pub fn evaluate(
    fence: &ServiceFence,
    index: &ClusterIndex,
    cfg: &Config,
    now: Timestamp,
    version: IstioVersion,
) -> Evaluation {
    let Dependencies {
        domains,
        metric_status,
        last_seen,
        invalid,
        next_change,
    } = dependencies::dependencies(fence, index, cfg, now);
    let sidecar = desired_sidecar(fence, &domains, index, cfg, version);
    let old = fence.status.clone().unwrap_or_default();
    let conditions = [
        Some(hosts_valid(&invalid)),
        Some(generated(&sidecar)),
        managed(fence, index, cfg),
        capped(&metric_status, cfg),
    ]
    .into_iter()
    .flatten()
    .map(|c| keep_transition_time(c, &old.conditions, now, fence.metadata.generation))
    .collect();

    Evaluation {
        status: ServiceFenceStatus {
            domains,
            metric_status,
            visitor: old.visitor,
            last_seen,
            conditions,
        },
        sidecar,
        requeue_at: next_change,
    }
}

/// The Sidecar `fence` should have for `domains`, or why none.
fn desired_sidecar(
    fence: &ServiceFence,
    domains: &BTreeMap<String, Destinations>,
    index: &ClusterIndex,
    cfg: &Config,
    version: IstioVersion,
) -> Result<Sidecar, NoSidecar> {
    let key = ObjectKey::of_or_empty(&fence.metadata);
    if !fence.spec.enable {
        Err(NoSidecar::Disabled)
    } else if sidecar::is_global_sidecar_fence(&key, cfg) {
        Err(NoSidecar::GlobalSidecar)
    } else {
        sidecar::workload_labels(fence, index, cfg).map(|labels| {
            let hosts = sidecar::egress_hosts(&key.namespace, domains, cfg, index.domain());
            sidecar::build(fence, labels, hosts, version)
        })
    }
}

/// `HostsValid`: whether every host of the fence could be used.
fn hosts_valid(invalid: &[InvalidHost]) -> NewCondition {
    if invalid.is_empty() {
        condition(CONDITION_HOSTS_VALID, true, "Valid", String::new())
    } else {
        condition(
            CONDITION_HOSTS_VALID,
            false,
            "InvalidHosts",
            describe_invalid(invalid),
        )
    }
}

/// `SidecarGenerated`: the Sidecar's size, or why there is none.
fn generated(sidecar: &Result<Sidecar, NoSidecar>) -> NewCondition {
    match sidecar {
        Ok(s) => {
            let n = s.spec.egress.first().map_or(0, |e| e.hosts.len());
            condition(CONDITION_SIDECAR, true, "Generated", format!("{n} egress hosts"))
        }
        Err(why) => condition(CONDITION_SIDECAR, false, why.reason(), why.message().to_string()),
    }
}

/// Only on fences lazyload created: whether auto-fencing still wants them (kept either way).
fn managed(fence: &ServiceFence, index: &ClusterIndex, cfg: &Config) -> Option<NewCondition> {
    fence
        .is_auto_created()
        .then(|| match autofence::unmanaged(fence, index, cfg) {
            None => condition(
                autofence::CONDITION_AUTO_FENCE_MANAGED,
                true,
                "Managed",
                String::new(),
            ),
            Some(why) => condition(
                autofence::CONDITION_AUTO_FENCE_MANAGED,
                false,
                why.reason(),
                format!("no longer managed by auto-fencing, kept: {}", why.message()),
            ),
        })
}

/// `LearnedHostCapReached`, when the fence has learned as many hosts as it may.
fn capped(metric_status: &BTreeMap<String, String>, cfg: &Config) -> Option<NewCondition> {
    let learned = metric_status
        .keys()
        .filter(|k| metric_key_host(k).is_some())
        .count();
    let cap = cfg.general.max_learned_hosts_per_fence;
    (learned >= cap).then(|| {
        condition(
            CONDITION_HOST_CAP,
            true,
            "MaxLearnedHostsPerFence",
            format!(
                "{learned} learned hosts, general.maxLearnedHostsPerFence is {cap}: further hosts \
                 are not learned"
            ),
        )
    })
}

/// A condition without its times.
struct NewCondition {
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: String,
}

fn condition(type_: &'static str, status: bool, reason: &'static str, message: String) -> NewCondition {
    NewCondition {
        type_,
        status,
        reason,
        message,
    }
}

/// Completes a condition, keeping the previous transition time when the status did not change.
fn keep_transition_time(
    c: NewCondition,
    old: &[Condition],
    now: Timestamp,
    generation: Option<i64>,
) -> Condition {
    let status = if c.status { "True" } else { "False" };
    let since = old
        .iter()
        .find(|o| o.type_ == c.type_ && o.status == status)
        .map_or(Time(now), |o| o.last_transition_time.clone());
    Condition {
        type_: c.type_.to_string(),
        status: status.to_string(),
        reason: c.reason.to_string(),
        message: c.message,
        last_transition_time: since,
        observed_generation: generation,
    }
}

fn describe_invalid(invalid: &[InvalidHost]) -> String {
    let mut parts: Vec<String> = invalid
        .iter()
        .take(MAX_LISTED)
        .map(|i| format!("{}: {}", i.source, i.error))
        .collect();
    if invalid.len() > MAX_LISTED {
        parts.push(format!("and {} more", invalid.len() - MAX_LISTED));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::fence::{ServiceFenceSpec, metric_key};

    #[test]
    fn a_fence_at_the_learned_host_cap_says_so() {
        let mut cfg = Config::default();
        cfg.general.max_learned_hosts_per_fence = 2;
        let index = ClusterIndex::new("cluster.local");
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let with = |hosts: &[&str]| {
            let mut f = ServiceFence::new("a", ServiceFenceSpec::default());
            f.metadata.namespace = Some("n".into());
            let mut status = ServiceFenceStatus::default();
            for h in hosts {
                status.metric_status.insert(metric_key(h), "1".into());
                status.last_seen.insert(h.to_string(), Time(now));
            }
            f.status = Some(status);
            evaluate(&f, &index, &cfg, now, IstioVersion::default())
                .status
                .conditions
        };
        let capped = |conditions: &[Condition]| {
            conditions
                .iter()
                .find(|c| c.type_ == CONDITION_HOST_CAP)
                .map(|c| (c.status.clone(), c.message.clone()))
        };
        // (learned hosts, the condition's message prefix; the condition is `True` when present)
        let cases: [(&[&str], Option<&str>); 3] = [
            (&["a.n.svc.cluster.local"], None),
            (
                &["a.n.svc.cluster.local", "b.n.svc.cluster.local"],
                Some("2 learned hosts, general.maxLearnedHostsPerFence is 2"),
            ),
            (
                &[
                    "a.n.svc.cluster.local",
                    "b.n.svc.cluster.local",
                    "c.n.svc.cluster.local",
                ],
                Some("3 learned hosts"),
            ),
        ];
        for (hosts, want) in cases {
            let got = capped(&with(hosts));
            match want {
                None => assert_eq!(got, None, "{hosts:?}"),
                Some(message) => {
                    let (status, m) = got.unwrap_or_else(|| panic!("{hosts:?}: no condition"));
                    assert_eq!(status, "True", "{hosts:?}");
                    assert!(m.starts_with(message), "{hosts:?}: {m}");
                }
            }
        }
    }
}
