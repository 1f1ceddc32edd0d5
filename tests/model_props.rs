//! Property tests of the model: for any fence and cluster, the derived Sidecar's hosts are
//! sorted, unique and syntactically valid, evaluation is deterministic and idempotent (feeding
//! the new status back in changes nothing), and nothing panics.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use lazyload::config::Config;
use lazyload::index::{ClusterIndex, ServiceInfo, VirtualServiceInfo};
use lazyload::model::evaluate;
use lazyload::vocab::ObjectKey;
use lazyload::vocab::fence::{
    Auto, Deadline, ProtoTimestamp, RecyclingStrategy, Selector, ServiceFence, ServiceFenceSpec,
    ServiceFenceStatus, Stable, WorkloadSelector, metric_key,
};
use lazyload::vocab::host::sidecar_host;
use lazyload::vocab::istio::{IstioVersion, VirtualService};
use proptest::prelude::*;

const NAMESPACES: &[&str] = &["default", "test", "istio-system", "prod"];
const NAMES: &[&str] = &["details", "reviews", "ratings", "productpage", "global-sidecar"];
const LABELS: &[(&str, &str)] = &[
    ("app", "details"),
    ("app", "reviews"),
    ("group", "default"),
    ("version", "v2"),
];

/// Hosts as users and learners write them: mostly plausible, sometimes garbage.
fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        (prop::sample::select(NAMES), prop::sample::select(NAMESPACES))
            .prop_map(|(n, ns)| format!("{n}.{ns}.svc.cluster.local")),
        prop::sample::select(NAMES).prop_map(String::from),
        prop::sample::select(NAMESPACES).prop_map(|ns| format!("{ns}/*")),
        Just("www.163.com".to_string()),
        Just("*.baidu.com".to_string()),
        "[a-zA-Z0-9./:*~_ -]{0,24}",
    ]
}

fn timestamp() -> impl Strategy<Value = ProtoTimestamp> {
    (1_700_000_000i64..1_800_000_000, 0i32..1_000_000_000)
        .prop_map(|(seconds, nanos)| ProtoTimestamp { seconds, nanos })
}

fn strategy() -> impl Strategy<Value = RecyclingStrategy> {
    (
        prop::option::of(Just(Stable {})),
        prop::option::of(prop::option::of(timestamp()).prop_map(|expire| Deadline { expire })),
        prop::option::of(
            prop::option::of((0i64..200_000).prop_map(|s| ProtoTimestamp { seconds: s, nanos: 0 }))
                .prop_map(|duration| Auto { duration }),
        ),
        prop::option::of(timestamp()),
    )
        .prop_map(|(stable, deadline, auto, recently_called)| RecyclingStrategy {
            stable,
            deadline,
            auto,
            recently_called,
        })
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::vec(prop::sample::select(LABELS), 0..3).prop_map(|l| {
        l.into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

fn fence() -> impl Strategy<Value = ServiceFence> {
    (
        prop::sample::select(NAMES),
        prop::sample::select(NAMESPACES),
        any::<bool>(),
        prop::collection::btree_map(host(), strategy(), 0..5),
        prop::collection::vec("[a-z_A-Z]{0,8}", 0..3),
        prop::collection::vec(labels().prop_map(|selector| Selector { selector }), 0..3),
        prop::option::of(
            (any::<bool>(), labels())
                .prop_map(|(from_service, labels)| WorkloadSelector { from_service, labels }),
        ),
        prop::collection::vec((host(), prop::option::of(timestamp())), 0..6),
        prop::collection::vec("[{}a-z_=\",. ]{0,20}", 0..2),
    )
        .prop_map(
            |(
                name,
                ns,
                enable,
                host,
                namespace_selector,
                label_selector,
                workload_selector,
                learned,
                junk,
            )| {
                let mut status = ServiceFenceStatus::default();
                for (h, seen) in learned {
                    status.metric_status.insert(metric_key(&h), "1".into());
                    if let Some(t) = seen.and_then(|t| t.as_time()) {
                        status.last_seen.insert(h, Time(t));
                    }
                }
                for j in junk {
                    status.metric_status.insert(j, "1".into());
                }
                ServiceFence {
                    metadata: ObjectMeta {
                        name: Some(name.into()),
                        namespace: Some(ns.into()),
                        uid: Some("uid".into()),
                        ..Default::default()
                    },
                    spec: ServiceFenceSpec {
                        host,
                        enable,
                        namespace_selector,
                        label_selector,
                        workload_selector,
                    },
                    status: Some(status),
                }
            },
        )
}

fn index() -> impl Strategy<Value = ClusterIndex> {
    let services = prop::collection::vec(
        (
            prop::sample::select(NAMES),
            prop::sample::select(NAMESPACES),
            labels(),
            any::<bool>(),
        ),
        0..12,
    );
    let vses = prop::collection::vec(
        (
            prop::sample::select(NAMESPACES),
            prop::collection::vec(host(), 1..3),
            prop::collection::vec(host(), 0..4),
        ),
        0..4,
    );
    (services, vses).prop_map(|(services, vses)| {
        let mut idx = ClusterIndex::new("cluster.local");
        for (name, ns, labels, has_selector) in services {
            idx.apply_service(ServiceInfo {
                key: ObjectKey::new(ns, name),
                labels,
                selector: has_selector.then(|| [("app".to_string(), name.to_string())].into()),
                ports: vec![],
                cluster_ips: vec![],
            });
        }
        for (i, (ns, hosts, dests)) in vses.into_iter().enumerate() {
            let vs: VirtualService = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("vs{i}"), "namespace": ns},
                "spec": {"hosts": hosts, "http": [{"route": dests.iter().map(|d| serde_json::json!({"destination": {"host": d}})).collect::<Vec<_>>()}]}
            }))
            .unwrap();
            idx.apply_virtual_service(VirtualServiceInfo::from_object(&vs, "cluster.local").unwrap());
        }
        idx
    })
}

fn config() -> impl Strategy<Value = Config> {
    prop_oneof![
        Just(String::new()),
        Just("general:\n  globalSidecarMode: namespace\n".to_string()),
        Just("general:\n  clusterGsNamespace: gs\n  stableHost: [shared/*, a.b.svc.cluster.local]\n".to_string()),
        Just(
            "general:\n  dependencyTtl: 0s\n  domainAliases:\n    - pattern: '(?P<s>[^.]+)\\.(?P<n>[^.]+)\\.svc\\.cluster\\.local$'\n      templates: ['$n.$s.alias', '$s_$n', '${s}..bad']\n"
                .to_string()
        ),
    ]
    .prop_map(|text| Config::parse(&text).unwrap().config)
}

fn now() -> impl Strategy<Value = Timestamp> {
    (1_700_000_000i64..1_800_000_000).prop_map(|s| Timestamp::from_second(s).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn sidecar_hosts_are_sorted_unique_and_valid(f in fence(), idx in index(), cfg in config(), now in now()) {
        let eval = evaluate(&f, &idx, &cfg, now, IstioVersion::V1);
        if let Ok(sidecar) = &eval.sidecar {
            let hosts = &sidecar.spec.egress[0].hosts;
            prop_assert!(hosts.windows(2).all(|w| w[0] < w[1]), "not sorted/unique: {hosts:?}");
            for h in hosts {
                prop_assert_eq!(h.matches('/').count(), 1, "{}", h);
                prop_assert!(sidecar_host(h).is_ok(), "invalid host {}", h);
            }
            let istio = format!("{}/*", cfg.global.istio_namespace);
            prop_assert!(hosts.contains(&istio), "no {} in {:?}", istio, hosts);
            prop_assert!(!sidecar.spec.workload_selector.as_ref().unwrap().labels.is_empty());
        } else {
            prop_assert!(!f.spec.enable || f.spec.workload_selector.as_ref().is_some_and(|w| w.from_service)
                || f.metadata.name.as_deref() == Some("global-sidecar"));
        }
    }

    #[test]
    fn evaluation_is_deterministic_and_idempotent(f in fence(), idx in index(), cfg in config(), now in now()) {
        let first = evaluate(&f, &idx, &cfg, now, IstioVersion::V1);
        let again = evaluate(&f, &idx, &cfg, now, IstioVersion::V1);
        prop_assert_eq!(&first.status, &again.status);
        let mut fed_back = f.clone();
        fed_back.status = Some(first.status.clone());
        let second = evaluate(&fed_back, &idx, &cfg, now, IstioVersion::V1);
        prop_assert_eq!(&first.status, &second.status);
        prop_assert_eq!(
            serde_json::to_value(first.sidecar.as_ref().ok()).unwrap(),
            serde_json::to_value(second.sidecar.as_ref().ok()).unwrap()
        );
        prop_assert_eq!(first.requeue_at, second.requeue_at);
        if let Some(at) = first.requeue_at {
            prop_assert!(at > now, "requeue in the past: {} <= {}", at, now);
        }
    }
}
