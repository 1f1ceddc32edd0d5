//! Learned edges <-> `ServiceFence.status`: the pure merge that persists them, the seed that
//! restores the learner after a restart, and which edges are written at all.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{Edge, Learner};
use crate::vocab::ObjectKey;
use crate::vocab::fence::{ServiceFence, ServiceFenceStatus, metric_key, metric_key_host};

/// Merges `edges` (all of one fence) into its status: each host gets a `metricStatus` entry in
/// Slime's format, `{destination_service="<host>"}` -> count as a string (`"1"` when new; an
/// existing count, e.g. Prometheus', is kept), and `lastSeen[host]` moves forward to the edge's
/// time, never past `now` (a skewed clock must not keep a dependency alive). Returns whether the
/// status changed, so the caller skips no-op writes.
pub fn apply_edges<'e>(
    status: &mut ServiceFenceStatus,
    edges: impl IntoIterator<Item = &'e Edge>,
    now: Timestamp,
) -> bool {
    let mut changed = false;
    for edge in edges {
        let key = metric_key(&edge.host);
        if let std::collections::btree_map::Entry::Vacant(v) = status.metric_status.entry(key) {
            v.insert("1".into());
            changed = true;
        }
        let seen = edge.seen.min(now);
        match status.last_seen.get_mut(&edge.host) {
            Some(t) if t.0 >= seen => {}
            Some(t) => {
                t.0 = seen;
                changed = true;
            }
            None => {
                status.last_seen.insert(edge.host.clone(), Time(seen));
                changed = true;
            }
        }
    }
    changed
}

/// Rebuilds the learner's memory from the fences' statuses: every `metricStatus` host with its
/// `lastSeen` time. Returns how many edges were seeded.
pub fn seed<'f>(learner: &mut Learner, fences: impl IntoIterator<Item = &'f ServiceFence>) -> usize {
    let mut n = 0;
    for fence in fences {
        let (Some(ns), Some(name), Some(status)) = (
            fence.metadata.namespace.as_deref(),
            fence.metadata.name.as_deref(),
            fence.status.as_ref(),
        ) else {
            continue;
        };
        let key = ObjectKey::new(ns, name);
        for metric in status.metric_status.keys() {
            if let Some(host) = metric_key_host(metric) {
                let seen = status.last_seen.get(host).map(|t| t.0);
                n += usize::from(learner.seed(&key, host, seen));
            }
        }
    }
    n
}

/// Groups edges by fence (the writers then skip the callers that have none).
pub fn by_fence(edges: &[Edge]) -> BTreeMap<&ObjectKey, Vec<&Edge>> {
    let mut out: BTreeMap<&ObjectKey, Vec<&Edge>> = BTreeMap::new();
    for e in edges {
        out.entry(&e.fence).or_default().push(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::Limits;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn edge(fence: &str, host: &str, seen: Timestamp) -> Edge {
        let (ns, name) = fence.split_once('/').unwrap();
        Edge {
            fence: ObjectKey::new(ns, name),
            host: host.into(),
            seen,
        }
    }

    #[test]
    fn merge_writes_slime_keys_and_moves_last_seen_forward() {
        let mut st = ServiceFenceStatus::default();
        st.metric_status.insert(
            r#"{destination_service="reviews.default.svc.cluster.local"}"#.into(),
            "42".into(),
        );
        let edges = [
            edge("default/productpage", "details.default.svc.cluster.local", t(10)),
            edge("default/productpage", "reviews.default.svc.cluster.local", t(20)),
            edge("default/productpage", "ratings.default.svc.cluster.local", t(999)),
        ];
        assert!(apply_edges(&mut st, &edges, t(100)));
        assert_eq!(
            st.metric_status[r#"{destination_service="details.default.svc.cluster.local"}"#],
            "1"
        );
        assert_eq!(
            st.metric_status[r#"{destination_service="reviews.default.svc.cluster.local"}"#],
            "42"
        );
        assert_eq!(st.last_seen["details.default.svc.cluster.local"].0, t(10));
        assert_eq!(
            st.last_seen["ratings.default.svc.cluster.local"].0,
            t(100),
            "clamped to now"
        );
        // Same edges again, or older ones: nothing to write.
        assert!(!apply_edges(&mut st, &edges[..2], t(100)));
        let older = [edge(
            "default/productpage",
            "details.default.svc.cluster.local",
            t(5),
        )];
        assert!(!apply_edges(&mut st, &older, t(100)));
        assert_eq!(st.last_seen["details.default.svc.cluster.local"].0, t(10));
    }

    #[test]
    fn seed_restores_what_status_holds() {
        let fence: ServiceFence = crate::yaml::from_str(
            r#"
metadata: {name: productpage, namespace: default}
spec: {enable: true}
status:
  metricStatus:
    '{destination_service="details.default.svc.cluster.local"}': "1"
    '{destination_service="reviews.default.svc.cluster.local"}': "1"
    'not a key': "1"
  lastSeen: {details.default.svc.cluster.local: "2023-11-14T22:13:20Z"}
"#,
        )
        .unwrap();
        let mut l = Learner::new(Limits::default());
        assert_eq!(seed(&mut l, [&fence]), 2);
        let pp = ObjectKey::new("default", "productpage");
        let now = Timestamp::from_second(1_700_000_010).unwrap();
        assert_eq!(
            l.observe(&pp, "details.default.svc.cluster.local", now),
            crate::learn::Observed::Known
        );
        // Learned by Slime (no lastSeen): refreshed once, to get a time.
        assert_eq!(
            l.observe(&pp, "reviews.default.svc.cluster.local", now),
            crate::learn::Observed::Refreshed
        );
    }

    #[test]
    fn edges_are_grouped_by_fence() {
        let edges = [
            edge("default/productpage", "a.default.svc.cluster.local", t(0)),
            edge("default/unfenced", "a.default.svc.cluster.local", t(0)),
            edge("default/productpage", "b.default.svc.cluster.local", t(0)),
        ];
        let got = by_fence(&edges);
        assert_eq!(got.len(), 2);
        assert_eq!(got[&ObjectKey::new("default", "productpage")].len(), 2);
    }
}
