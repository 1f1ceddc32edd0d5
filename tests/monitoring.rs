//! deploy/monitoring/: the dashboard and the alerts use only metrics the binary exports, and the
//! catalog they are checked against (`lazyload metrics`) covers what `serve` registers.

mod support;

use std::process::{Command, Output, Stdio};

use support::http;
use support::serve::Serve;

fn lazyload(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_dashboard_and_the_alerts_use_only_exported_metrics() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard = format!("{root}/deploy/monitoring/lazyload-dashboard.json");
    let rules = format!("{root}/deploy/monitoring/lazyload-rules.yaml");
    let out = lazyload(&["metrics", "--check", &dashboard, &rules]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches(", all exported").count(), 2, "{stdout}");
}

/// `lazyload metrics | head -1`: the reader closes the pipe; the command ends quietly, as Unix
/// tools do, instead of panicking on the write.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    for args in [&["metrics"][..], &["crd"], &["metrics", "--json"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_lazyload"))
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "{args:?}: {:?} {stderr}",
            out.status
        );
    }
}

#[test]
fn an_unknown_metric_or_a_broken_file_fails_the_check() {
    let dir = support::TempDir::new("monitoring-check");
    let rules = dir.path("rules.yaml");
    std::fs::write(
        &rules,
        "spec:\n  groups:\n    - rules:\n        - alert: A\n          expr: rate(lazyload_relay_pushes_total[5m]) + lazyload_no_such_total\n",
    )
    .unwrap();
    let out = lazyload(&["metrics", "--check", rules.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("not exported by lazyload: lazyload_no_such_total\n"),
        "{stderr}"
    );

    let broken = dir.path("dashboard.json");
    std::fs::write(&broken, "{\"panels\": [").unwrap();
    let out = lazyload(&["metrics", "--check", broken.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("is not valid JSON"), "{stderr}");
}

/// `serve` with the relay and the collector: every family on its `/metrics` is in the catalog
/// (a component registered by `serve` but left out of `lazyload::metrics::register_all` fails).
#[tokio::test]
async fn serve_exports_only_cataloged_families() {
    let xds = format!("127.0.0.1:{}", support::free_port());
    let serve = Serve::start(
        [
            "--als-listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:1",
            "--xds-listen",
            &xds,
        ],
        Stdio::null(),
    )
    .await;
    let body = http::get(serve.admin, "/metrics", &[]).await.unwrap().body;
    let served = lazyload::metrics::families(&body);
    assert!(
        served
            .iter()
            .any(|f| f.name == "lazyload_relay_upstream_connects"),
        "{body}"
    );
    assert!(served.iter().any(|f| f.name == "lazyload_als_entries"), "{body}");
    let catalog = lazyload::metrics::catalog().unwrap();
    for family in &served {
        assert!(
            catalog.iter().any(|c| c == family),
            "{family:?} is served but not in the catalog"
        );
    }
}
