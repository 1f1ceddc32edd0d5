//! Applies an EnvoyFilter's route patches to a route configuration (proto-JSON) the way istiod
//! does for `SIDECAR_OUTBOUND` (docs/protocol.md: ROUTE_CONFIGURATION MERGE, then VIRTUAL_HOST
//! REMOVE/MERGE): enough to check what a sidecar ends up with.

use lazyload::vocab::istio::EnvoyFilter;
use serde_json::Value;

/// Applies the patches of `ef` that match route configuration `rc["name"]`.
pub fn apply_route_patches(ef: &EnvoyFilter, rc: &mut Value) {
    let name = rc["name"].as_str().unwrap_or_default().to_string();
    let patches: Vec<_> = ef
        .spec
        .config_patches
        .iter()
        .filter(|p| {
            let m = p.matcher.as_ref().unwrap();
            m["context"] == "SIDECAR_OUTBOUND" && m["routeConfiguration"]["name"] == name.as_str()
        })
        .collect();
    for p in patches.iter().filter(|p| p.apply_to == "ROUTE_CONFIGURATION") {
        let patch = p.patch.as_ref().unwrap();
        assert_eq!(patch.operation, "MERGE");
        let added = patch.value.as_ref().unwrap()["virtual_hosts"]
            .as_array()
            .unwrap()
            .clone();
        rc["virtual_hosts"].as_array_mut().unwrap().extend(added);
    }
    for p in patches.iter().filter(|p| p.apply_to == "VIRTUAL_HOST") {
        let patch = p.patch.as_ref().unwrap();
        assert_eq!(patch.operation, "REMOVE");
        let vhost = p.matcher.as_ref().unwrap()["routeConfiguration"]["vhost"]["name"].clone();
        rc["virtual_hosts"]
            .as_array_mut()
            .unwrap()
            .retain(|v| v["name"] != vhost);
    }
}
