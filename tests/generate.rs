//! `lazyload generate`: fences and Sidecars from a snapshot and JSON access logs, as files.

mod support;

use std::process::Command;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/generate")
        .join(name)
}

/// Runs `generate` on the fixture cluster with `input` (`--access-log <file>` or
/// `--prometheus-export <file>`, a fixture); returns the output directory and standard error,
/// after checking that it succeeded.
fn generate(name: &str, input: [&str; 2]) -> (support::TempDir, String) {
    generate_from(name, input[0], &fixture(input[1]))
}

/// [`generate`] with an input file anywhere.
fn generate_from(name: &str, flag: &str, input: &std::path::Path) -> (support::TempDir, String) {
    let out = support::TempDir::new(name);
    let run = Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .arg("generate")
        .arg("--config")
        .arg(fixture("config.yaml"))
        .arg("--cluster-snapshot")
        .arg(fixture("cluster.yaml"))
        .arg(flag)
        .arg(input)
        .arg("--out")
        .arg(&out.0)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "{stderr}");
    (out, stderr)
}

#[test]
fn writes_learned_sidecars_for_review() {
    let (out, stderr) = generate("generate", ["--access-log", "access.log"]);
    assert!(stderr.contains("wrote 3 fences and 3 Sidecars"), "{stderr}");
    assert!(stderr.contains("not_json"), "{stderr}");

    let read = |f: &str| -> serde_json::Value {
        lazyload::yaml::from_str(&std::fs::read_to_string(out.path(&format!("default/{f}"))).unwrap())
            .unwrap()
    };
    let sidecar = read("productpage.sidecar.yaml");
    let hosts: Vec<&str> = sidecar["spec"]["egress"][0]["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert_eq!(
        hosts,
        [
            "*/details.default.svc.cluster.local",
            "*/reviews.default.svc.cluster.local",
            "istio-system/*",
            "mesh-operator/*"
        ]
    );
    assert_eq!(
        sidecar["spec"]["workloadSelector"]["labels"]["app"],
        "productpage"
    );
    let fence = read("productpage.servicefence.yaml");
    assert_eq!(
        fence["status"]["metricStatus"]["{destination_service=\"details.default.svc.cluster.local\"}"],
        "1"
    );
    assert_eq!(
        fence["metadata"]["labels"]["app.kubernetes.io/created-by"],
        "fence-controller"
    );
    // reviews called nothing: its Sidecar imports only the defaults.
    let reviews = read("reviews.sidecar.yaml");
    assert_eq!(reviews["spec"]["egress"][0]["hosts"].as_array().unwrap().len(), 2);
}

#[test]
fn a_prometheus_export_is_learned_like_access_logs() {
    let (out, stderr) = generate("generate-prometheus", ["--prometheus-export", "prometheus.json"]);
    assert!(
        stderr.contains("1 dependencies from 1 log lines and series"),
        "{stderr}"
    );
    assert!(stderr.contains("prometheus_invalid_destination"), "{stderr}");
    let sidecar: serde_json::Value =
        lazyload::yaml::from_str(&std::fs::read_to_string(out.path("default/reviews.sidecar.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        sidecar["spec"]["egress"][0]["hosts"][0],
        "*/ratings.default.svc.cluster.local"
    );
}

#[test]
fn a_missing_snapshot_is_a_clear_error() {
    let out = support::TempDir::new("generate-missing");
    let run = Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .args(["generate", "--cluster-snapshot", "/nonexistent.yaml", "--out"])
        .arg(&out.0)
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("/nonexistent.yaml"));
}

/// `generate` with the fixture config and access log on `snapshot`, into `out`: whether it
/// succeeded, and its standard error.
fn generate_snapshot(snapshot: &std::path::Path, out: &std::path::Path) -> (bool, String) {
    let run = Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .arg("generate")
        .arg("--config")
        .arg(fixture("config.yaml"))
        .arg("--cluster-snapshot")
        .arg(snapshot)
        .arg("--access-log")
        .arg(fixture("access.log"))
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    (
        run.status.success(),
        String::from_utf8_lossy(&run.stderr).into_owned(),
    )
}

/// Issue 11: one object lazyload cannot read (a VirtualService whose `delegate` has no `name`,
/// valid for Istio) is skipped with a warning naming it; the rest of the snapshot is used. A file
/// that holds no Kubernetes object at all is an error, not an empty cluster.
#[test]
fn an_unreadable_object_is_a_warning_and_a_non_kubernetes_file_an_error() {
    let dir = support::TempDir::new("generate-unreadable");
    let snapshot = dir.path("cluster.yaml");
    let odd = "\n---\napiVersion: networking.istio.io/v1beta1\nkind: VirtualService\n\
               metadata: {name: delegating, namespace: default}\n\
               spec: {hosts: [reviews], http: [{delegate: {namespace: default}}]}\n";
    let cluster = std::fs::read_to_string(fixture("cluster.yaml")).unwrap();
    std::fs::write(&snapshot, format!("{cluster}{odd}")).unwrap();
    let (ok, stderr) = generate_snapshot(&snapshot, &dir.path("out"));
    assert!(ok, "{stderr}");
    assert!(
        stderr
            .contains("warning: VirtualService default/delegating skipped (invalid): spec.http[0].delegate"),
        "{stderr}"
    );
    assert!(stderr.contains("wrote 3 fences and 3 Sidecars"), "{stderr}");

    // An access-log line given as the snapshot.
    let line = std::fs::read_to_string(fixture("access.log")).unwrap();
    let not_objects = dir.path("line.json");
    std::fs::write(&not_objects, line.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
    let (ok, stderr) = generate_snapshot(&not_objects, &dir.path("out2"));
    assert!(!ok);
    assert!(stderr.contains("not Kubernetes objects"), "{stderr}");
}

/// A8 offline: a snapshot whose mesh-wide default Sidecar imports only its own namespace would
/// scope the global-sidecar; `generate` says so (and still writes the manifests).
#[test]
fn a_sidecar_that_scopes_the_global_sidecar_is_a_warning() {
    let dir = support::TempDir::new("generate-scoped");
    let snapshot = dir.path("cluster.yaml");
    let narrow = "\n---\napiVersion: networking.istio.io/v1beta1\nkind: Sidecar\n\
                  metadata: {name: default, namespace: istio-system}\n\
                  spec: {egress: [{hosts: ['./*', 'istio-system/*']}]}\n";
    let cluster = std::fs::read_to_string(fixture("cluster.yaml")).unwrap();
    std::fs::write(&snapshot, format!("{cluster}{narrow}")).unwrap();
    let (ok, stderr) = generate_snapshot(&snapshot, &dir.path("out"));
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains(
            "warning: Sidecar istio-system/default (mesh-wide default) scopes the global-sidecar in mesh-operator"
        ),
        "{stderr}"
    );
}

/// A line that is not UTF-8, or JSON that is not an object, is counted and skipped; the rest of
/// the file is still read.
#[test]
fn garbage_lines_are_skipped_not_fatal() {
    let dir = support::TempDir::new("generate-garbage");
    let log = dir.path("access.log");
    let mut bytes = b"\xff\xfe not utf-8\n[1, 2]\n".to_vec();
    bytes.extend(std::fs::read(fixture("access.log")).unwrap());
    std::fs::write(&log, bytes).unwrap();
    let (_, stderr) = generate_from("generate-garbage-out", "--access-log", &log);
    assert!(stderr.contains("wrote 3 fences and 3 Sidecars"), "{stderr}");
    let (_, clean) = generate("generate-clean", ["--access-log", "access.log"]);
    let not_json = |s: &str| {
        s.split("\"not_json\": ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0)
    };
    assert_eq!(not_json(&stderr), not_json(&clean) + 2, "{stderr}");
}

/// Issue 14: with `fenceLabelKeyAlias`, `generate` also writes the workload fences auto-fencing
/// creates for the label values the pods carry (Slime's `<alias>-<value>.workload.identity`),
/// with the workload selector on that label.
#[test]
fn writes_workload_fences_for_the_label_values_pods_carry() {
    let out = support::TempDir::new("generate-workload-fences");
    let config = out.path("config.yaml");
    std::fs::write(
        &config,
        "general:\n  autoFence: true\n  defaultFence: true\n  fenceLabelKeyAlias: app:wl\n",
    )
    .unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .arg("generate")
        .arg("--config")
        .arg(&config)
        .arg("--cluster-snapshot")
        .arg(fixture("cluster.yaml"))
        .arg("--access-log")
        .arg(fixture("access.log"))
        .arg("--out")
        .arg(out.path("out"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "{stderr}");
    let fence: serde_json::Value = lazyload::yaml::from_str(
        &std::fs::read_to_string(out.path("out/default/wl-productpage.workload.identity.servicefence.yaml"))
            .unwrap_or_else(|e| panic!("no workload fence for app=productpage: {e}\n{stderr}")),
    )
    .unwrap();
    assert_eq!(fence["spec"]["workloadSelector"]["labels"]["app"], "productpage");
    assert_eq!(
        fence["metadata"]["labels"]["app.kubernetes.io/created-by"],
        "fence-controller"
    );
    assert!(
        out.path("out/default/wl-reviews.workload.identity.servicefence.yaml")
            .exists(),
        "{stderr}"
    );
}
