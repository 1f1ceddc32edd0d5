//! `lazyload serve` as a child process of a test.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `lazyload serve` without a cluster, its admin endpoint on a free loopback port; killed when
/// dropped, so a failed assertion never leaves it running.
pub struct Serve {
    /// The process.
    pub child: Child,
    /// Its admin address.
    pub admin: SocketAddr,
}

impl Serve {
    /// Starts `lazyload serve --admin-listen <free port> <args>` (standard error as `stderr`)
    /// and waits until `/healthz` answers.
    pub async fn start<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>, stderr: Stdio) -> Self {
        let admin: SocketAddr = format!("127.0.0.1:{}", super::free_port()).parse().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_lazyload"))
            .env_remove("KUBECONFIG")
            .args(["serve", "--admin-listen", &admin.to_string()])
            .args(args)
            .stderr(stderr)
            .spawn()
            .unwrap();
        let serve = Serve { child, admin };
        let deadline = Instant::now() + Duration::from_secs(20);
        while super::http::get(admin, "/healthz", &[]).await.is_err() {
            assert!(Instant::now() < deadline, "lazyload serve did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        serve
    }

    /// `serve` without a cluster: the cluster is `snapshot`, learned fences and Sidecars go to
    /// files under `manifests`; `args` besides.
    pub async fn offline(snapshot: &std::path::Path, manifests: &std::path::Path, args: &[&str]) -> Self {
        let files = [
            "--cluster-snapshot",
            snapshot.to_str().unwrap(),
            "--manifests-dir",
            manifests.to_str().unwrap(),
        ];
        Self::start(args.iter().chain(&files), Stdio::inherit()).await
    }
}

impl Serve {
    /// Starts `lazyload serve` learning from access logs without a cluster: the cluster from
    /// `snapshot`, learned fences written under `manifests`, the collector on a free loopback
    /// port (returned) taking streams from anyone (the tests send from loopback).
    pub async fn learning(snapshot: &Path, manifests: &Path) -> (Self, String) {
        let als = format!("127.0.0.1:{}", super::free_port());
        let args = ["--als-listen", als.as_str(), "--als-trust", "any"];
        (Self::offline(snapshot, manifests, &args).await, als)
    }

    /// Sends SIGTERM and waits up to `within` for the process to exit; its status and how long
    /// it took, or `None` if it was still running.
    pub async fn terminate(&mut self, within: Duration) -> Option<(std::process::ExitStatus, Duration)> {
        let start = Instant::now();
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success(), "kill -TERM {pid}");
        while start.elapsed() < within {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some((status, start.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
