//! `lazyload demo` on a fresh directory: the built-in upstream's config reaches a global-sidecar
//! through the relay, adjusted; `lazyload serve` learns the sample mesh's Sidecars from access logs
//! (sent by a real Envoy global-sidecar, or replayed to its collector) and the demo prints them
//! with a push-size table; `lazyload report` on the mesh it wrote shows the same reduction per
//! workload.

mod support;

use std::process::Command;

/// Runs `lazyload demo` on 60 generated services with `--envoy <envoy>`; checks what both modes
/// print (the relay step, learning, the productpage Sidecar) and returns (stdout, stderr).
fn demo(dir: &support::TempDir, envoy: &str) -> (String, String) {
    demo_with_path(dir, envoy, std::env::var_os("PATH").unwrap_or_default())
}

/// [`demo`] with `PATH` set to `path`.
fn demo_with_path(dir: &support::TempDir, envoy: &str, path: std::ffi::OsString) -> (String, String) {
    // Run outside the checkout: `auto` must not find the checkout's `.venv/bin/envoy` here.
    let out = Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .current_dir(&dir.0)
        .env("PATH", path)
        .args(["demo", "--services", "60", "--envoy", envoy, "--out"])
        .arg(dir.path("demo"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stderr}");
    // 64 services; bookinfo's 3 calls and two distinct calls per generated service (i -> i+1 and
    // i -> 7i+3 mod 60 never coincide nor loop back).
    assert!(
        stderr.contains("[1/5] sample mesh: 64 services, 123 calls between them"),
        "{stderr}"
    );
    // The built-in upstream's config through the relay: every service's cluster plus
    // PassthroughCluster, BlackHoleCluster and the collector's cluster the relay adds.
    assert!(
        stderr.contains("[3/5] global-sidecar through the relay: 67 clusters, 64 endpoint assignments, 2 listeners, 2 route configurations"),
        "{stderr}"
    );
    assert!(
        stderr.contains("2/2 HTTP connection managers log to the collector (cluster added), 2/2 route configurations send unknown hosts to PassthroughCluster, which follows Slime-Orig-Dest"),
        "{stderr}"
    );
    assert!(stderr.contains("learned 123/123 dependencies"), "{stderr}");
    assert!(
        stderr.contains("bookinfo/productpage calls details.bookinfo.svc.cluster.local, reviews.bookinfo.svc.cluster.local"),
        "{stderr}"
    );
    assert!(
        stderr.contains("bookinfo/reviews calls ratings.bookinfo.svc.cluster.local"),
        "{stderr}"
    );
    for host in [
        r#""*/details.bookinfo.svc.cluster.local""#,
        r#""*/reviews.bookinfo.svc.cluster.local""#,
    ] {
        assert!(stdout.contains(host), "{stdout}");
    }
    assert!(
        !stdout.contains("ratings.bookinfo"),
        "productpage never calls ratings: {stdout}"
    );
    (stdout, stderr)
}

// Callers send from 127.1.x.y: every 127/8 address is local on Linux only.
#[cfg(target_os = "linux")]
#[test]
fn demo_through_a_real_envoy_global_sidecar() {
    let dir = support::TempDir::new("demo-envoy");
    let (_, stderr) = demo(&dir, &support::envoy::binary().to_string_lossy());
    assert!(
        stderr.contains("2 listeners and 67 clusters through the relay, 0 updates rejected; sending the mesh's 123 calls through it"),
        "{stderr}"
    );
    assert!(
        stderr.contains("123/123 calls answered by the backend behind Envoy"),
        "{stderr}"
    );
    assert!(!stderr.contains("replaying"), "{stderr}");
}

/// An `envoy` on PATH that does not run (a stale shim) is reported and the traffic replayed.
// Callers send from 127.1.x.y: every 127/8 address is local on Linux only.
#[cfg(target_os = "linux")]
#[test]
fn demo_goes_on_without_an_envoy_that_does_not_run() {
    let dir = support::TempDir::new("demo-broken-envoy");
    let bin = dir.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(
        bin.join("envoy"),
        "#!/bin/sh\necho 'envoy: command not found' >&2\nexit 127\n",
    )
    .unwrap();
    std::fs::set_permissions(
        bin.join("envoy"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let (_, stderr) = demo_with_path(&dir, "auto", path);
    assert!(stderr.contains("Envoy exited"), "{stderr}");
    assert!(
        stderr.contains("replaying the traffic as access-log entries instead"),
        "{stderr}"
    );
    assert!(
        stderr.contains("[4/5] replaying 369 access-log entries"),
        "{stderr}"
    );
}

/// Without any Envoy, `auto` says how to get one and replays the traffic.
#[test]
fn demo_without_an_envoy_says_how_to_get_one() {
    let dir = support::TempDir::new("demo-no-envoy");
    let empty = dir.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (_, stderr) = demo_with_path(&dir, "auto", empty.into_os_string());
    assert!(
        stderr.contains("no Envoy found") && stderr.contains("scripts/setup installs one"),
        "{stderr}"
    );
    assert!(
        stderr.contains("[4/5] replaying 369 access-log entries"),
        "{stderr}"
    );
}

#[test]
fn demo_prints_learned_sidecars_and_push_sizes() {
    let dir = support::TempDir::new("demo");
    let (stdout, stderr) = demo(&dir, "off");
    assert!(
        stderr.contains("[4/5] replaying 369 access-log entries of the global-sidecar over gRPC"),
        "{stderr}"
    );
    let row = |fence: &str| -> Vec<String> {
        stdout
            .lines()
            .find(|l| l.starts_with(fence))
            .unwrap_or_else(|| panic!("no row for {fence}: {stdout}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let full = row("(full config)");
    assert_eq!(full[2], "64", "clusters in the full config");
    let productpage = row("bookinfo/productpage ");
    assert_eq!(productpage[1], "2", "productpage keeps details and reviews");
    assert_eq!(productpage[2], "2", "and their endpoints");
    assert!(stdout.contains("mesh: 64 fenced workloads"), "{stdout}");

    // The manifests it wrote are what the controller would apply.
    let sidecar: serde_json::Value = lazyload::yaml::from_str(
        &std::fs::read_to_string(dir.path("demo/manifests/bookinfo/reviews.sidecar.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(sidecar["kind"], "Sidecar");
    assert_eq!(
        sidecar["spec"]["egress"][0]["hosts"][0],
        "*/ratings.bookinfo.svc.cluster.local"
    );

    // `lazyload report` on the demo mesh: the same per-workload reduction, as JSON.
    let report = Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .args(["report", "--json", "--cluster-snapshot"])
        .arg(dir.path("demo/cluster-with-fences.yaml"))
        .arg("--config-dump")
        .arg(dir.path("demo/full-config-dump.json"))
        .output()
        .unwrap();
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(report["workloads"].as_array().unwrap().len(), 64);
    let pp = report["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["fence"] == "bookinfo/productpage")
        .unwrap();
    assert_eq!(pp["scoped"]["clusters"], 2);
    assert!(pp["saved"].as_f64().unwrap() > 0.9, "{pp}");
    assert!(report["total_scoped_bytes"].as_u64() < report["total_full_bytes"].as_u64());
}

#[test]
fn an_unwritable_directory_is_a_clear_error() {
    let dir = support::TempDir::new("demo-unwritable");
    let file = dir.path("a-file");
    std::fs::write(&file, "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .args(["demo", "--out"])
        .arg(file.join("sub"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("a-file/sub"));
}
