//! The Slime input corpus (`tests/fixtures/slime/`): every config form loads through
//! `lazyload check-config` with the warnings each file announces (or is refused with its error),
//! and every ServiceFence form passes the CRD schema, reads into the typed model, and goes
//! through `lazyload generate`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use lazyload::vocab::fence::{DomainStatus, ServiceFence};
use serde_json::Value;

fn corpus(prefix: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/slime");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".yaml"))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no {prefix}* files");
    files
}

/// The values of `# <key>: <value>` comment lines.
fn expectations(text: &str, key: &str) -> Vec<String> {
    let marker = format!("# {key}: ");
    text.lines()
        .filter_map(|l| l.strip_prefix(&marker))
        .map(|v| v.trim().to_string())
        .collect()
}

fn check_config(file: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .args(["check-config", "--config"])
        .arg(file)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_forms_load_through_check_config_with_their_warnings() {
    for file in corpus("config-") {
        if file.to_string_lossy().contains("config-error-") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.starts_with("# "),
            "{}: no comment saying what it reproduces",
            file.display()
        );
        let (ok, stderr) = check_config(&file);
        assert!(ok, "{}: {stderr}", file.display());
        let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("warning: ")).collect();
        for expected in expectations(&text, "expect-warning") {
            if expected == "none" {
                assert!(warnings.is_empty(), "{}: {warnings:?}", file.display());
            } else {
                assert!(
                    warnings.iter().any(|w| w.contains(&expected)),
                    "{}: no warning {expected:?} in {warnings:?}",
                    file.display()
                );
            }
        }
    }
}

#[test]
fn config_forms_lazyload_cannot_honour_are_refused_saying_why() {
    for file in corpus("config-error-") {
        let text = std::fs::read_to_string(&file).unwrap();
        let expected = expectations(&text, "expect-error");
        assert!(!expected.is_empty(), "{}: no expect-error line", file.display());
        let (ok, stderr) = check_config(&file);
        assert!(!ok, "{} loaded", file.display());
        for e in expected {
            assert!(stderr.contains(&e), "{}: {e:?} not in {stderr}", file.display());
        }
    }
}

fn fences() -> Vec<(PathBuf, Value)> {
    corpus("fence-")
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            assert!(
                text.starts_with("# "),
                "{}: no comment saying what it reproduces",
                f.display()
            );
            let value: Value = lazyload::yaml::from_str(&text).unwrap();
            (f, value)
        })
        .collect()
}

fn schema() -> Value {
    let crd =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/servicefence.yaml")).unwrap();
    support::schema::crd_schema(&crd)
}

#[test]
fn fence_forms_pass_the_crd_schema_and_so_does_what_lazyload_writes_back() {
    let schema = schema();
    for (file, value) in fences() {
        let errors = support::schema::validate(&schema, &value);
        assert!(errors.is_empty(), "{}: {errors:#?}", file.display());
        let fence: ServiceFence = serde_json::from_value(value).unwrap();
        let written = serde_json::to_value(&fence).unwrap();
        let errors = support::schema::validate(&schema, &written);
        assert!(
            errors.is_empty(),
            "{} as written back: {errors:#?}",
            file.display()
        );
    }
    // The validator is not blind: a wrong type and an unknown field are found.
    let bad = serde_json::json!({"spec": {"enable": "yes", "hosts": {}}});
    assert_eq!(support::schema::validate(&schema, &bad).len(), 2);
}

#[test]
fn fence_forms_read_into_the_typed_model() {
    for (file, value) in fences() {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let fence: ServiceFence = serde_json::from_value(value).unwrap_or_else(|e| panic!("{name}: {e}"));
        let status = fence.status.clone().unwrap_or_default();
        match name.as_str() {
            "fence-no-spec.yaml" | "fence-null-spec.yaml" => {
                assert_eq!(fence.spec, Default::default(), "{name}");
            }
            "fence-null-maps.yaml" => {
                assert!(fence.spec.enable && fence.spec.label_selector.is_empty());
                assert_eq!(fence.spec.host.len(), 1);
            }
            "fence-jsonpb-status.yaml" | "fence-enum-numbers.yaml" => {
                let states: Vec<DomainStatus> = status.domains.values().map(|d| d.status).collect();
                // old, ratings, reviews (sorted)
                assert_eq!(
                    states,
                    [
                        DomainStatus::Expire,
                        DomainStatus::ExpireWait,
                        DomainStatus::Active
                    ],
                    "{name}"
                );
                let expire = fence.spec.host["reviews.shop.svc.cluster.local"]
                    .deadline
                    .as_ref()
                    .and_then(|d| d.expire);
                assert_eq!(expire.map(|e| e.seconds), Some(4_102_444_800), "{name}");
            }
            _ => {}
        }
    }
}

#[test]
fn fence_forms_go_through_generate() {
    let dir = support::TempDir::new("slime-corpus");
    let mut snapshot = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/slime/cluster.yaml"
    ))
    .unwrap();
    let fences = corpus("fence-");
    for f in &fences {
        snapshot.push_str("\n---\n");
        snapshot.push_str(&std::fs::read_to_string(f).unwrap());
    }
    std::fs::write(dir.path("cluster.yaml"), snapshot).unwrap();
    let out = dir.path("out");
    let run = Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .arg("generate")
        .arg("--cluster-snapshot")
        .arg(dir.path("cluster.yaml"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    // Every fence is written back; the four enabled ones get a Sidecar, the disabled and
    // spec-less ones do not.
    assert!(
        stderr.contains(&format!("wrote {} fences and 4 Sidecars", fences.len())),
        "{stderr}"
    );
    for name in ["no-spec", "null-spec", "disabled"] {
        assert!(
            out.join(format!("shop/{name}.servicefence.yaml")).exists(),
            "{name}"
        );
        assert!(!out.join(format!("shop/{name}.sidecar.yaml")).exists(), "{name}");
    }
    for name in ["cart", "jsonpb", "numbers", "stable"] {
        let sidecar: Value = lazyload::yaml::from_str(
            &std::fs::read_to_string(out.join(format!("shop/{name}.sidecar.yaml"))).unwrap(),
        )
        .unwrap();
        assert_eq!(
            sidecar["spec"]["workloadSelector"]["labels"]["app"], "cart",
            "{name}"
        );
    }
}
