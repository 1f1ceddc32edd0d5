//! `lazyload serve` as a process: the admin endpoint answers and SIGTERM stops it cleanly.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lazyload::testing;
use support::http;
use support::serve::Serve;

#[tokio::test]
async fn admin_endpoints_and_clean_shutdown() {
    let mut serve = Serve::start(["--als-listen", "127.0.0.1:0"], Stdio::null()).await;
    let addr = serve.admin;
    let health = http::get(addr, "/healthz", &[]).await.unwrap();
    assert_eq!(health.status, 200);
    assert_eq!(http::get(addr, "/readyz", &[]).await.unwrap().status, 200);
    let metrics = http::get(addr, "/metrics", &[]).await.unwrap();
    assert_eq!(metrics.status, 200);
    assert!(metrics.body.contains("# EOF"), "{}", metrics.body);

    // SIGTERM: the process exits 0.
    let (status, _) = serve
        .terminate(Duration::from_secs(10))
        .await
        .expect("serve did not stop on SIGTERM");
    assert!(status.success(), "exit status {status}");
}

#[test]
fn unusable_config_fails_with_the_field() {
    let dir = support::TempDir::new("serve-config");
    let cfg = dir.path("bad.yaml");
    std::fs::write(&cfg, "general:\n  wormholePort: ['99999']\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .env_remove("KUBECONFIG")
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("general.wormholePort[0]"), "{err}");
}

#[tokio::test]
async fn log_rotate_writes_to_the_configured_file() {
    let dir = support::TempDir::new("serve-logs");
    let cfg = dir.path("cfg.yaml");
    let log = dir.path("logs/slime.log");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  log:\n    logRotate: true\n    logRotateConfig:\n      filePath: {}\n",
            log.display()
        ),
    )
    .unwrap();
    drop(
        Serve::start(
            ["--als-listen", "127.0.0.1:0", "--config", cfg.to_str().unwrap()],
            Stdio::null(),
        )
        .await,
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("admin listening"), "{text}");
}

#[tokio::test]
async fn debug_fences_shows_each_fences_sidecar() {
    let dir = support::TempDir::new("serve-fences");
    let snapshot = dir.path("cluster.yaml");
    std::fs::write(
        &snapshot,
        r#"
apiVersion: microservice.slime.io/v1alpha1
kind: ServiceFence
metadata: {name: productpage, namespace: default}
spec: {enable: true, host: {reviews.default.svc.cluster.local: {stable: {}}}}
"#,
    )
    .unwrap();
    let serve = Serve::start(
        [
            "--als-listen",
            "127.0.0.1:0",
            "--cluster-snapshot",
            snapshot.to_str().unwrap(),
        ],
        Stdio::null(),
    )
    .await;
    let body = http::get(serve.admin, "/debug/fences", &[]).await.unwrap().body;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let hosts = &v["default/productpage"]["sidecar"]["hosts"];
    assert_eq!(hosts[0], "*/reviews.default.svc.cluster.local", "{body}");
}

/// `--manifests-dir` is a file sink instead of the API server: in a pod (where lazyload would
/// otherwise use the in-cluster configuration, here pointing at a closed port) it starts without
/// contacting a cluster; without it, the in-cluster configuration is used and its failure is the
/// error (a missing service-account token, or the closed port where there is one).
#[test]
fn manifests_dir_never_contacts_a_cluster() {
    let dir = support::TempDir::new("serve-manifests-in-pod");
    let admin = format!("127.0.0.1:{}", support::free_port());
    let als = format!("127.0.0.1:{}", support::free_port());
    let snapshot = dir.path("cluster.yaml");
    std::fs::write(&snapshot, "").unwrap();
    let serve = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lazyload"));
        cmd.env_remove("KUBECONFIG")
            .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("KUBERNETES_SERVICE_PORT", "1")
            .args(["serve", "--admin-listen", &admin, "--als-listen", &als])
            .args(extra)
            .stderr(std::process::Stdio::piped());
        cmd
    };
    let failed = serve(&[]).output().unwrap();
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success());
    assert!(err.contains("cluster"), "{err}");

    let manifests = dir.path("manifests").display().to_string();
    let snapshot = snapshot.display().to_string();
    let mut with_files = serve(&["--manifests-dir", &manifests, "--cluster-snapshot", &snapshot])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let came_up = loop {
        if with_files.try_wait().unwrap().is_some() {
            break false;
        }
        if std::net::TcpStream::connect(&admin).is_ok() {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = with_files.kill();
    let out = with_files.wait_with_output().unwrap();
    assert!(came_up, "{}", String::from_utf8_lossy(&out.stderr));
}

/// A8 in the binary: a snapshot's namespace-default Sidecar in the global-sidecar's namespace
/// that imports only that namespace scopes it; `/metrics` counts it and the log names it.
#[tokio::test]
async fn a_sidecar_scoping_the_global_sidecar_is_reported() {
    let dir = support::TempDir::new("serve-scoped");
    let snapshot = dir.path("cluster.yaml");
    std::fs::write(
        &snapshot,
        "apiVersion: networking.istio.io/v1beta1\nkind: Sidecar\n\
         metadata: {name: default, namespace: mesh-operator}\n\
         spec: {egress: [{hosts: ['./*']}]}\n",
    )
    .unwrap();
    let log = dir.path("serve.log");
    let serve = Serve::start(
        [
            "--als-listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--cluster-snapshot".as_ref(),
            snapshot.as_os_str(),
        ],
        Stdio::from(std::fs::File::create(&log).unwrap()),
    )
    .await;
    testing::eventually(
        "the scoped global-sidecar counted",
        Duration::from_secs(10),
        || async {
            let metrics = http::get(serve.admin, "/metrics", &[]).await.unwrap().body;
            if metrics.lines().any(|l| l == "lazyload_global_sidecar_scoped 1") {
                Ok(())
            } else {
                Err(metrics)
            }
        },
    )
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(
            "Sidecar mesh-operator/default (namespace default) scopes the global-sidecar in mesh-operator"
        ),
        "{text}"
    );
}

/// productpage (fenced, learning) and details in `default`, a VirtualService lazyload's types do
/// not fit and a fence without `spec` (both skipped).
const PRODUCTPAGE_SNAPSHOT: &str = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: default}}
- {apiVersion: v1, kind: Service, metadata: {name: productpage, namespace: default}, spec: {selector: {app: productpage}, ports: [{name: http, port: 9080}]}}
- {apiVersion: v1, kind: Service, metadata: {name: details, namespace: default}, spec: {selector: {app: details}, ports: [{name: http, port: 9080}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: productpage-1, namespace: default, labels: {app: productpage}}, status: {podIP: 10.1.0.5}}
- apiVersion: networking.istio.io/v1beta1
  kind: VirtualService
  metadata: {name: delegating, namespace: default}
  spec: {hosts: [reviews], http: [{delegate: {namespace: default}}]}
- {apiVersion: microservice.slime.io/v1alpha1, kind: ServiceFence, metadata: {name: legacy, namespace: default}}
- {apiVersion: microservice.slime.io/v1alpha1, kind: ServiceFence, metadata: {name: productpage, namespace: default, uid: u1}, spec: {enable: true, workloadSelector: {fromService: true}}}
"#;

/// Issue 11: a snapshot with a ServiceFence without `spec` (valid under every CRD Slime shipped)
/// and a VirtualService lazyload's types do not fit (a `delegate` without `name`, valid for
/// Istio): serve starts, skips what it cannot read (counted), learns, and writes the Sidecar of
/// the good fence.
#[tokio::test]
async fn a_snapshot_with_unreadable_objects_still_serves_and_learns() {
    let dir = support::TempDir::new("serve-tolerant");
    let snapshot = dir.path("cluster.yaml");
    std::fs::write(&snapshot, PRODUCTPAGE_SNAPSHOT).unwrap();
    let (serve, als) = Serve::learning(&snapshot, &dir.path("manifests")).await;
    let als: std::net::SocketAddr = als.parse().unwrap();
    assert_eq!(http::get(serve.admin, "/readyz", &[]).await.unwrap().status, 200);
    let metrics = http::get(serve.admin, "/metrics", &[]).await.unwrap().body;
    assert!(
        metrics.contains(r#"lazyload_objects_rejected_total{kind="VirtualService",reason="invalid"} 1"#),
        "{metrics}"
    );

    use lazyload::testing::als::{entry, message};
    use support::als_client::client;
    let mut c = client(als).await;
    let messages = [message(true, [entry("10.1.0.5", "details:9080".into())])];
    c.stream_access_logs(tokio_stream::iter(messages)).await.unwrap();

    let sidecar = dir.path("manifests/default/productpage.sidecar.yaml");
    testing::eventually("a Sidecar learned", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&sidecar).unwrap_or_default();
        std::future::ready(if text.contains("details.default.svc.cluster.local") {
            Ok(())
        } else {
            Err(text)
        })
    })
    .await;
}

/// SIGTERM with an access-log stream open (Envoy never closes its own) and learned edges still
/// queued: the stream is ended, the queue flushed to the files, and the process exits at once,
/// not after the 10 s drain timeout.
#[tokio::test]
async fn sigterm_with_an_open_stream_and_a_backlog_exits_at_once_and_loses_nothing() {
    use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;

    let dir = support::TempDir::new("serve-sigterm");
    let mesh = lazyload::demo::mesh::Mesh::sample(120);
    let snapshot = dir.path("cluster.yaml");
    std::fs::write(&snapshot, mesh.cluster_yaml(true)).unwrap();
    let manifests = dir.path("manifests");
    let (mut serve, als) = Serve::learning(&snapshot, &manifests).await;
    let mut client = AccessLogServiceClient::connect(format!("http://{als}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    for msg in mesh.access_logs() {
        tx.send(msg).await.unwrap();
    }
    // The stream stays open: `tx` lives until the end of the test.
    let call = tokio::spawn(async move {
        client
            .stream_access_logs(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    // Everything sent was learned (and part of it is still queued: batches are written each
    // second), then SIGTERM at once.
    let learned = learned_total(serve.admin).await;
    let (status, took) = serve
        .terminate(Duration::from_secs(3))
        .await
        .expect("serve did not exit within 3 s of SIGTERM");
    assert!(status.success(), "exit status {status}");
    println!("exited {took:?} after SIGTERM, {learned} edges learned");
    let on_disk = support::manifests::edges_on_disk(&manifests);
    assert_eq!(on_disk.len(), learned, "learned edges missing from the files");
    let ended = tokio::time::timeout(Duration::from_secs(2), call).await;
    assert!(ended.is_ok(), "the access-log stream was left open");
    drop(tx);
}

/// Waits until the collector learned what was sent (its edges counter is above 0 and stopped
/// moving) and returns how many edges it learned.
async fn learned_total(admin: std::net::SocketAddr) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = 0;
    loop {
        let body = http::get(admin, "/metrics", &[]).await.unwrap().body;
        let learned = body
            .lines()
            .find_map(|l| l.strip_prefix("lazyload_als_edges_learned_total "))
            .and_then(|n| n.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if learned > 0 && learned == last {
            return learned;
        }
        last = learned;
        assert!(Instant::now() < deadline, "learned only {learned} edges");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `lazyload` with `args` (no cluster) to its end: it must fail at start, with a message
/// and no panic.
fn fails_at_start(args: &[&str]) -> String {
    let admin = format!("127.0.0.1:{}", support::free_port());
    let als = format!("127.0.0.1:{}", support::free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lazyload"));
    if args.first() == Some(&"serve") {
        cmd.args(["serve", "--admin-listen", &admin, "--als-listen", &als]);
        cmd.args(&args[1..]);
    } else {
        cmd.args(args);
    }
    let mut child = cmd
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?} started instead of failing");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    // 1: refused by lazyload; 2: by the flag parser; never 101 (a panic).
    assert!(
        matches!(out.status.code(), Some(1 | 2)),
        "{args:?}: {:?} {err}",
        out.status
    );
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    err
}

/// Issue 16 item 6: a huge duration in the config or a flag, a rebind address that is not an IP,
/// an upstream scheme the relay cannot dial, unreadable CA, token and TLS files, and a
/// manifests directory that cannot be written are errors at start, each naming its flag or field.
#[test]
fn every_flag_and_config_value_is_checked_at_start() {
    let dir = support::TempDir::new("serve-checks");
    let huge = dir.path("huge.yaml");
    std::fs::write(&huge, "general:\n  dependencyTtl: 99999999999999999999s\n").unwrap();
    let huge = huge.to_str().unwrap();
    let snapshot = dir.path("cluster.yaml");
    std::fs::write(&snapshot, "").unwrap();
    let snapshot = snapshot.to_str().unwrap();
    let not_a_dir = dir.path("file");
    std::fs::write(&not_a_dir, "").unwrap();
    let under_a_file = format!("{}/manifests", not_a_dir.display());
    let cases: &[(&[&str], &str)] = &[
        (&["check-config", "-c", huge], "general.dependencyTtl"),
        (&["serve", "-c", huge], "general.dependencyTtl"),
        (
            &["serve", "--prometheus-interval", "99999999999999999999s"],
            "--prometheus-interval",
        ),
        (
            &["serve", "--upstream-open-budget", "99999999999999999999h"],
            "--upstream-open-budget",
        ),
        (
            &[
                "serve",
                "--upstream",
                "http://127.0.0.1:1",
                "--rebind-address",
                "not-an-ip",
            ],
            "--rebind-address",
        ),
        (&["serve", "--upstream", "ftp://istiod:15010"], "scheme"),
        (
            &[
                "serve",
                "--upstream",
                "http://127.0.0.1:1",
                "--als-address",
                "no-port",
            ],
            "--als-address",
        ),
        (
            &[
                "serve",
                "--upstream",
                "http://127.0.0.1:1",
                "--global-sidecar-node-pattern",
                "(",
            ],
            "--global-sidecar-node-pattern",
        ),
        (
            &["serve", "--xds-handshake-timeout", "1d"],
            "--xds-handshake-timeout",
        ),
        (&["serve", "--xds-max-connections", "0"], "--xds-max-connections"),
        (
            &[
                "serve",
                "--upstream",
                "http://127.0.0.1:1",
                "--upstream-token-file",
                "/nonexistent/token",
            ],
            "/nonexistent/token",
        ),
        (
            &[
                "serve",
                "--upstream",
                "https://127.0.0.1:1",
                "--upstream-ca",
                "/nonexistent/ca.pem",
            ],
            "/nonexistent/ca.pem",
        ),
        (
            &[
                "serve",
                "--xds-tls-cert",
                "/nonexistent/cert.pem",
                "--xds-tls-key",
                "/nonexistent/key.pem",
            ],
            "--xds-tls-cert",
        ),
        (
            &[
                "serve",
                "--cluster-snapshot",
                snapshot,
                "--manifests-dir",
                &under_a_file,
            ],
            "--manifests-dir",
        ),
    ];
    testing::assert_all(cases.iter().map(|(args, names)| {
        let err = fails_at_start(args);
        let outcome = if err.contains(names) {
            Ok(())
        } else {
            Err(format!("does not name {names}: {err}"))
        };
        (format!("{args:?}"), outcome)
    }));
}

/// A missing `--manifests-dir` is created; when writes to it fail later, `/readyz` says so with
/// the reason (and says ready again once a write lands).
#[tokio::test]
async fn readiness_reflects_manifest_write_failures() {
    let dir = support::TempDir::new("serve-unwritable");
    let snapshot = dir.path("cluster.yaml");
    std::fs::write(&snapshot, PRODUCTPAGE_SNAPSHOT).unwrap();
    let manifests = dir.path("new/manifests");
    let (serve, als) = Serve::learning(&snapshot, &manifests).await;
    let als: std::net::SocketAddr = als.parse().unwrap();
    assert!(manifests.is_dir(), "--manifests-dir is created");
    assert_eq!(http::get(serve.admin, "/readyz", &[]).await.unwrap().status, 200);

    // The namespace directory becomes a file: the next write of the fence fails.
    std::fs::write(manifests.join("default"), "").unwrap();
    use lazyload::testing::als::{entry, message};
    use support::als_client::client;
    let mut c = client(als).await;
    let messages = [message(true, [entry("10.1.0.5", "details:9080".into())])];
    c.stream_access_logs(tokio_stream::iter(messages)).await.unwrap();
    let ready = testing::eventually(
        "not ready after a failed write",
        Duration::from_secs(20),
        || async {
            let ready = http::get(serve.admin, "/readyz", &[]).await.unwrap();
            if ready.status == 503 {
                Ok(ready.body)
            } else {
                Err(ready.body)
            }
        },
    )
    .await;
    assert!(
        ready.contains("manifests-dir (writing default/productpage"),
        "{ready}"
    );
}
