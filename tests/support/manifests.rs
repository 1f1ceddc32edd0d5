//! Reading what `lazyload serve --manifests-dir` wrote.

use std::collections::BTreeSet;
use std::path::Path;

use lazyload::vocab::fence::ServiceFence;

/// Every learned (fence, host) in the fence files under `dir`; panics on a file that is not a
/// whole ServiceFence.
pub fn edges_on_disk(dir: &Path) -> BTreeSet<(String, String)> {
    let mut edges = BTreeSet::new();
    let Ok(namespaces) = std::fs::read_dir(dir) else {
        return edges;
    };
    for namespace in namespaces {
        for file in std::fs::read_dir(namespace.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if !name.ends_with(".yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(!text.is_empty(), "{name} is empty");
            if !name.ends_with(".servicefence.yaml") {
                let _: serde_json::Value = lazyload::yaml::from_str(&text)
                    .unwrap_or_else(|e| panic!("{name} is not whole: {e}\n{text}"));
                continue;
            }
            let fence: ServiceFence = lazyload::yaml::from_str(&text)
                .unwrap_or_else(|e| panic!("{name} is not a whole ServiceFence: {e}\n{text}"));
            let id = format!(
                "{}/{}",
                fence.metadata.namespace.unwrap(),
                fence.metadata.name.unwrap()
            );
            for key in fence.status.unwrap_or_default().metric_status.into_keys() {
                edges.insert((id.clone(), key));
            }
        }
    }
    edges
}
