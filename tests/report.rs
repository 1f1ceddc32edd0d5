//! `lazyload report` on the recorded config of an Istio 1.18 sidecar: a fence that learned two
//! services keeps those services' clusters and virtual hosts and a fraction of the bytes.

mod support;

use std::process::Command;

#[test]
fn scoped_config_is_a_fraction_of_the_full_one() {
    let dir = support::TempDir::new("report");
    let snapshot = dir.path("cluster.yaml");
    std::fs::write(
        &snapshot,
        r#"
apiVersion: microservice.slime.io/v1alpha1
kind: ServiceFence
metadata: {name: productpage, namespace: default}
spec: {enable: true}
status:
  metricStatus:
    '{destination_service="details.default.svc.cluster.local"}': "1"
    '{destination_service="reviews.default.svc.cluster.local"}': "1"
"#,
    )
    .unwrap();
    let fixtures = support::fixtures::fixtures_dir();
    let out = Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .args(["report", "--json", "--cluster-snapshot"])
        .arg(&snapshot)
        .arg("--config-dump")
        .arg(fixtures.join("dsb-geo-sidecar_istio-1.18.2_config_dump_without_listeners.json"))
        .arg("--config-dump")
        .arg(fixtures.join("dsb-geo-sidecar_istio-1.18.2_listeners_config_dump.json"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["full"]["clusters"], 138);
    let row = &report["workloads"][0];
    assert_eq!(row["fence"], "default/productpage");
    let scoped = row["scoped"]["clusters"].as_u64().unwrap();
    assert!((2..138).contains(&scoped), "{row}");
    let saved = row["saved"].as_f64().unwrap();
    assert!(saved > 0.5 && saved < 1.0, "{row}");
}

#[test]
fn not_a_config_dump_is_a_clear_error() {
    let dir = support::TempDir::new("report-bad");
    let file = dir.path("x.json");
    std::fs::write(&file, "{\"hello\": 1}").unwrap();
    let snapshot = dir.path("c.yaml");
    std::fs::write(&snapshot, "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .args(["report", "--cluster-snapshot"])
        .arg(&snapshot)
        .arg("--config-dump")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an Envoy config dump"));
}
