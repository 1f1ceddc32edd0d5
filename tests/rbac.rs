//! deploy/'s RBAC grants list and watch of every kind lazyload watches, at the group and plural
//! lazyload lists it at (issue 15: ServiceEntries were listed at `serviceentrys`, which the RBAC,
//! granting `serviceentries`, refused with 403, so `/readyz` never became ready).

use lazyload::index::convert::Kind;
use serde_json::Value;

/// The ClusterRole rules of deploy/kustomize/base/rbac.yaml.
fn rules() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kustomize/base/rbac.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    lazyload::yaml::documents::<Value>(&text)
        .unwrap()
        .into_iter()
        .filter(|doc| doc["kind"] == "ClusterRole")
        .flat_map(|doc| doc["rules"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn has(list: &Value, item: &str) -> bool {
    list.as_array().is_some_and(|l| l.iter().any(|v| v == item))
}

#[test]
fn every_watched_kind_is_granted_list_and_watch_at_its_real_plural() {
    let rules = rules();
    for kind in Kind::ALL {
        let resource = kind.api_resource();
        let granted = |verb: &str| {
            rules.iter().any(|r| {
                has(&r["apiGroups"], &resource.group)
                    && has(&r["resources"], &resource.plural)
                    && has(&r["verbs"], verb)
                    && r.get("resourceNames").is_none()
            })
        };
        assert!(
            granted("list") && granted("watch"),
            "{kind:?}: list/watch of {}/{} not granted",
            resource.group,
            resource.plural
        );
    }
}
