//! Property tests of the parsers that take user or wire input: configuration text, snapshots,
//! host names and `metricStatus` keys never panic, and what validates stays valid.

use lazyload::config::Config;
use lazyload::index::convert::{Kind, convert};
use lazyload::index::snapshot::Snapshot;
use lazyload::vocab::fence::{ServiceFence, metric_key_host};
use lazyload::vocab::host::{FenceHost, host_name, sidecar_host};
use proptest::prelude::*;
use serde_json::Value;

/// Arbitrary JSON-like trees with the config's field names sprinkled in.
fn tree() -> impl Strategy<Value = Value> {
    tree_with(&[
        "general",
        "global",
        "metric",
        "wormholePort",
        "domainAliases",
        "pattern",
        "templates",
        "dispatches",
        "misc",
        "kind",
        "spec",
        "module",
        "prometheus",
        "handlers",
        "type",
        "log",
        "logRotateConfig",
        "maxSizeMB",
        "mode",
        "name",
    ])
}

/// Arbitrary trees with a ServiceFence's field names sprinkled in.
fn fence_tree() -> impl Strategy<Value = Value> {
    tree_with(&[
        "spec",
        "status",
        "host",
        "enable",
        "namespaceSelector",
        "labelSelector",
        "selector",
        "workloadSelector",
        "fromService",
        "labels",
        "stable",
        "deadline",
        "expire",
        "auto",
        "duration",
        "seconds",
        "nanos",
        "RecentlyCalled",
        "domains",
        "hosts",
        "metricStatus",
        "visitor",
        "lastSeen",
        "conditions",
        "metadata",
    ])
}

/// Arbitrary trees with the field names of the kinds the cluster watchers convert.
fn object_tree() -> impl Strategy<Value = Value> {
    tree_with(&[
        "hosts",
        "http",
        "route",
        "delegate",
        "destination",
        "host",
        "ports",
        "port",
        "selector",
        "labels",
        "egress",
        "workloadSelector",
        "clusterIP",
        "podIP",
        "podIPs",
        "spec",
        "status",
        "metadata",
    ])
}

/// Arbitrary JSON-like trees whose keys are often one of `names`.
fn tree_with(names: &[&'static str]) -> impl Strategy<Value = Value> + use<> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let key = prop_oneof![prop::sample::select(names), "[a-zA-Z]{1,8}",];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::from),
        Just(Value::from("SlimeBoot")),
        Just(Value::from("lazyload")),
        Just(Value::from("{{ .Values.x }}")),
        Just(Value::from("EXPIREWAIT")),
        Just(Value::from("1700000000")),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn config_text_never_panics(text in "[ -~\n]{0,200}") {
        let _ = Config::parse(&text);
    }

    #[test]
    fn config_trees_never_panic(tree in tree()) {
        let _ = Config::parse(&lazyload::yaml::to_string(&tree).unwrap());
    }

    #[test]
    fn fence_trees_never_panic_and_what_reads_round_trips(tree in fence_tree()) {
        if let Ok(fence) = serde_json::from_value::<ServiceFence>(tree) {
            let written = serde_json::to_value(&fence).unwrap();
            let again: ServiceFence = serde_json::from_value(written).unwrap();
            prop_assert_eq!(again, fence);
        }
    }

    #[test]
    fn fence_text_never_panics(text in "[ -~\n]{0,200}") {
        let _ = lazyload::yaml::from_str::<ServiceFence>(&text);
    }

    #[test]
    fn snapshots_never_panic(tree in tree(), kind in prop::sample::select(vec!["Service", "Namespace", "VirtualService", "ServiceEntry", "ServiceFence", "List"])) {
        let mut object = tree;
        if let Value::Object(map) = &mut object {
            map.insert("kind".into(), Value::from(kind));
        }
        let _ = Snapshot::parse(&lazyload::yaml::to_string(&object).unwrap(), "cluster.local");
    }

    /// Each object the watchers receive goes through one converter per kind: whatever it holds,
    /// it is converted or rejected with a reason, never a panic.
    #[test]
    fn object_converters_never_panic(spec in object_tree(), status in object_tree(), named in any::<bool>()) {
        let object = if named {
            serde_json::json!({"metadata": {"name": "x", "namespace": "default"}, "spec": spec, "status": status})
        } else {
            spec
        };
        for kind in Kind::ALL {
            match convert(kind, object.clone(), "cluster.local") {
                Ok((key, _)) => prop_assert_eq!(key.name.as_str(), "x"),
                Err(e) => prop_assert!(!e.message.is_empty()),
            }
        }
    }

    #[test]
    fn host_parsers_never_panic_and_normalise_idempotently(s in "[ -~]{0,40}") {
        if let Ok(h) = host_name(&s) {
            prop_assert_eq!(host_name(&h), Ok(h.clone()));
        }
        if let Ok(e) = sidecar_host(&s) {
            prop_assert_eq!(sidecar_host(&e), Ok(e.clone()));
            prop_assert_eq!(e.matches('/').count(), 1);
        }
        if let Ok(f) = FenceHost::parse(&s, "default", "cluster.local") {
            prop_assert!(sidecar_host(&f.sidecar_entry()).is_ok(), "{}", f);
        }
        let _ = metric_key_host(&s);
    }
}
