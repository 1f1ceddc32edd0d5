//! The recorded Istio config of `tests/fixtures/istio/` as protobuf.
//!
//! The dumps are proto-JSON and contain Istio-only types; they are encoded with `prost-reflect`
//! and a descriptor pool of Envoy's API (PyPI `xds-protos`) plus `proto/istio/`, written by
//! `tests/support/descriptors.py` (run here when the pool file is missing).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use envoy_types::pb::google::protobuf::Any;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage};
use serde_json::Value;

/// The recorded Istio fixtures directory.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/istio")
}

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let file = root.join("target/xds-descriptors.bin");
        if !file.exists() {
            // The checkout's venv (scripts/setup) has the packages; a system python3 may not.
            let venv = root.join(".venv/bin/python");
            let python = if venv.is_file() { venv } else { "python3".into() };
            let status = std::process::Command::new(&python)
                .arg(root.join("tests/support/descriptors.py"))
                .arg(&file)
                .status()
                .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
            assert!(
                status.success(),
                "writing descriptors failed: run scripts/setup (it installs xds-protos and grpcio-tools into .venv/)"
            );
        }
        DescriptorPool::decode(&*std::fs::read(&file).unwrap()).expect("descriptor pool")
    })
}

/// Encodes a proto-JSON object carrying `@type` as an `Any`.
pub fn any_from_json(v: &Value) -> Any {
    let type_url = v["@type"].as_str().expect("@type").to_string();
    let name = type_url.rsplit('/').next().unwrap();
    let desc = pool()
        .get_message_by_name(name)
        .unwrap_or_else(|| panic!("no descriptor for {name}"));
    let mut body = v.clone();
    body.as_object_mut().unwrap().remove("@type");
    let msg = DynamicMessage::deserialize_with_options(
        desc,
        body,
        &DeserializeOptions::new().deny_unknown_fields(false),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    Any {
        type_url,
        value: prost::Message::encode_to_vec(&msg),
    }
}

/// Resources of one Envoy config dump, as proto-JSON.
#[derive(Debug, Default)]
pub struct Dump {
    /// Dynamic active clusters.
    pub clusters: Vec<Value>,
    /// Active listeners.
    pub listeners: Vec<Value>,
    /// Dynamic route configurations.
    pub routes: Vec<Value>,
    /// Dynamic endpoint configurations.
    pub endpoints: Vec<Value>,
}

/// Reads config dumps (several files of one proxy add up).
pub fn load(files: &[&str]) -> Dump {
    let mut dump = Dump::default();
    for f in files {
        let path = fixtures_dir().join(f);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (the recorded fixtures live in tests/fixtures/istio/)",
                path.display()
            )
        });
        let v: Value = serde_json::from_str(&text).unwrap();
        for config in v["configs"].as_array().into_iter().flatten() {
            let pick = |list: &str, field: &[&str]| -> Vec<Value> {
                config[list]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| field.iter().try_fold(e, |acc, k| acc.get(k)).cloned())
                    .collect()
            };
            dump.clusters
                .extend(pick("dynamic_active_clusters", &["cluster"]));
            dump.listeners
                .extend(pick("dynamic_listeners", &["active_state", "listener"]));
            dump.routes
                .extend(pick("dynamic_route_configs", &["route_config"]));
            dump.endpoints
                .extend(pick("dynamic_endpoint_configs", &["endpoint_config"]));
        }
    }
    dump
}
