//! Golden tests of the model: every ServiceFence -> Sidecar example of the Slime documentation
//! (`tests/golden/fence/`), auto-fencing sequences (`tests/golden/autofence/`), and the cases
//! Slime gets wrong. Each YAML file is one case; its `expect` section was written by hand from
//! the documented behaviour, not produced by this code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use lazyload::config::Config;
use lazyload::index::snapshot::Snapshot;
use lazyload::model::autofence::{self, Action};
use lazyload::model::evaluate;
use lazyload::vocab::ObjectKey;
use lazyload::vocab::fence::ServiceFence;
use lazyload::vocab::istio::IstioVersion;
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FenceCase {
    #[allow(dead_code)]
    description: String,
    now: Timestamp,
    #[serde(default)]
    config: Option<Value>,
    #[serde(default)]
    cluster: Value,
    fence: Value,
    expect: FenceExpect,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FenceExpect {
    /// The Sidecar, or null with `noSidecar` saying why.
    sidecar: Value,
    #[serde(default)]
    no_sidecar: Option<String>,
    #[serde(default)]
    domains: Option<Value>,
    #[serde(default)]
    metric_status: Option<Value>,
    #[serde(default)]
    last_seen: Option<Value>,
    /// Condition type -> `status/reason`, and optionally a fragment of the message.
    #[serde(default)]
    conditions: BTreeMap<String, String>,
    #[serde(default)]
    condition_messages: BTreeMap<String, String>,
    #[serde(default)]
    requeue_at: Option<Timestamp>,
}

fn config(v: Option<Value>) -> Config {
    let text = v
        .map(|v| lazyload::yaml::to_string(&v).unwrap())
        .unwrap_or_default();
    Config::parse(&text).expect("case config loads").config
}

fn cases(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no cases in {}", dir.display());
    files
}

/// Adds a case's cluster; every object of it must be readable (a case is written to be).
fn add_cluster(snap: &mut Snapshot, cluster: Value) -> Result<(), String> {
    snap.add(cluster).map_err(|e| e.to_string())?;
    match snap.rejected.first() {
        Some(rejected) => Err(rejected.to_string()),
        None => Ok(()),
    }
}

fn run_fence_case(path: &Path) -> Result<(), String> {
    let case: FenceCase = lazyload::yaml::from_str(&std::fs::read_to_string(path).unwrap())
        .map_err(|e| format!("case: {e}"))?;
    let cfg = config(case.config);
    let mut snap = Snapshot::parse("", &cfg.general.cluster_domain).unwrap();
    add_cluster(&mut snap, case.cluster)?;
    let fence: ServiceFence = serde_json::from_value(case.fence).map_err(|e| format!("fence: {e}"))?;
    let eval = evaluate(&fence, &snap.index, &cfg, case.now, IstioVersion::V1beta1);
    let mut errors = Vec::new();
    let mut check = |what: &str, got: Value, want: &Value| {
        if &got != want {
            errors.push(format!(
                "{what}:\n--- want\n{}--- got\n{}",
                lazyload::yaml::to_string(want).unwrap(),
                lazyload::yaml::to_string(&got).unwrap()
            ));
        }
    };
    let e = &case.expect;
    match &eval.sidecar {
        Ok(s) => check("sidecar", serde_json::to_value(s).unwrap(), &e.sidecar),
        Err(why) => {
            check("sidecar", Value::Null, &e.sidecar);
            check(
                "noSidecar",
                Value::from(why.reason()),
                &Value::from(e.no_sidecar.clone()),
            );
        }
    }
    let status = serde_json::to_value(&eval.status).unwrap();
    let field = |name: &str| {
        status
            .get(name)
            .cloned()
            .unwrap_or(Value::Object(Default::default()))
    };
    if let Some(want) = &e.domains {
        check("status.domains", field("domains"), want);
    }
    if let Some(want) = &e.metric_status {
        check("status.metricStatus", field("metricStatus"), want);
    }
    if let Some(want) = &e.last_seen {
        check("status.lastSeen", field("lastSeen"), want);
    }
    for (ty, want) in &e.conditions {
        let c = eval.status.conditions.iter().find(|c| &c.type_ == ty);
        let got = c.map(|c| format!("{}/{}", c.status, c.reason));
        check(
            &format!("condition {ty}"),
            Value::from(got),
            &Value::from(want.clone()),
        );
    }
    check(
        "requeueAt",
        Value::from(eval.requeue_at.map(|t| t.to_string())),
        &Value::from(e.requeue_at.map(|t| t.to_string())),
    );
    for (ty, fragment) in &e.condition_messages {
        let msg = eval
            .status
            .conditions
            .iter()
            .find(|c| &c.type_ == ty)
            .map(|c| c.message.clone());
        if !msg.as_deref().is_some_and(|m| m.contains(fragment.as_str())) {
            errors.push(format!("condition {ty} message {msg:?} lacks {fragment:?}"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

#[test]
fn fence_cases() {
    let failures: Vec<String> = cases("fence")
        .iter()
        .filter_map(|p| {
            run_fence_case(p)
                .err()
                .map(|e| format!("== {}\n{e}", p.display()))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AutoFenceCase {
    #[allow(dead_code)]
    description: String,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    #[allow(dead_code)]
    description: String,
    #[serde(default)]
    config: Option<Value>,
    cluster: Value,
    /// `namespace/name` of every fence after auto-fencing ran.
    fences: Vec<String>,
}

fn run_autofence_case(path: &Path) -> Result<(), String> {
    let case: AutoFenceCase = lazyload::yaml::from_str(&std::fs::read_to_string(path).unwrap())
        .map_err(|e| format!("case: {e}"))?;
    let mut fences: BTreeMap<ObjectKey, ServiceFence> = BTreeMap::new();
    for (i, step) in case.steps.into_iter().enumerate() {
        let cfg = config(step.config);
        let mut snap = Snapshot::parse("", &cfg.general.cluster_domain).unwrap();
        add_cluster(&mut snap, step.cluster)?;
        // Fences written in the step exist (as written) before auto-fencing runs.
        for f in snap.fences.drain(..) {
            let key = ObjectKey::new(
                f.metadata.namespace.clone().unwrap(),
                f.metadata.name.clone().unwrap(),
            );
            fences.insert(key, f);
        }
        let mut keys: Vec<ObjectKey> = snap.index.services().map(|s| s.key.clone()).collect();
        keys.extend(fences.keys().cloned());
        keys.sort();
        keys.dedup();
        for key in keys {
            match autofence::decide(&key, fences.get(&key), &snap.index, &cfg) {
                Action::Create(f) => {
                    fences.insert(key, *f);
                }
                Action::Delete => {
                    fences.remove(&key);
                }
                Action::Keep | Action::Unmanaged(_) => {}
            }
        }
        let got: Vec<String> = fences.keys().map(|k| k.to_string()).collect();
        if got != step.fences {
            return Err(format!(
                "step {i} ({}): want {:?}, got {got:?}",
                step.description, step.fences
            ));
        }
    }
    Ok(())
}

#[test]
fn autofence_cases() {
    let failures: Vec<String> = cases("autofence")
        .iter()
        .filter_map(|p| {
            run_autofence_case(p)
                .err()
                .map(|e| format!("== {}\n{e}", p.display()))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvoyFilterCase {
    #[allow(dead_code)]
    description: String,
    #[serde(default)]
    config: Option<Value>,
    ports: Vec<u16>,
    expect: Value,
}

fn run_envoyfilter_case(path: &Path) -> Result<(), String> {
    let case: EnvoyFilterCase = lazyload::yaml::from_str(&std::fs::read_to_string(path).unwrap())
        .map_err(|e| format!("case: {e}"))?;
    let cfg = config(case.config);
    let got = serde_json::to_value(lazyload::model::fallback::envoyfilters(
        &cfg,
        &case.ports.into_iter().collect(),
    ))
    .unwrap();
    if got == case.expect {
        Ok(())
    } else {
        Err(format!(
            "--- want\n{}--- got\n{}",
            lazyload::yaml::to_string(&case.expect).unwrap(),
            lazyload::yaml::to_string(&got).unwrap()
        ))
    }
}

#[test]
fn envoyfilter_cases() {
    let failures: Vec<String> = cases("envoyfilter")
        .iter()
        .filter_map(|p| {
            run_envoyfilter_case(p)
                .err()
                .map(|e| format!("== {}\n{e}", p.display()))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
