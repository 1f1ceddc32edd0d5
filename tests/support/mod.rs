//! Test support shared by the black-box tests: a real Envoy process and a tiny HTTP/1.1 client.
#![allow(dead_code)] // each test binary uses a different part of it

pub mod als_client;
pub mod als_sink;
pub mod bounds;
pub mod certs;
pub mod envoy;
pub mod envoyfilter;
pub mod fixtures;
pub mod http;
pub mod istiod_debug;
pub mod manifests;
pub mod own_service;
pub mod schema;
pub mod sds;
pub mod serve;

/// A port nothing listens on right now, never handed out before to this or any other test
/// process running at the same time.
///
/// A test that rewrites many listeners to "free" ports runs Envoy with dozens of them, next to
/// other test processes doing the same. So the port is drawn below the kernel's ephemeral range
/// (no outgoing connection or `bind(0)` takes it meanwhile), claimed by a lock on a file in the
/// temporary directory that this process holds until it exits (no other test process takes
/// it), and checked bindable on every address, as Envoy binds it.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    static CLAIMED: std::sync::Mutex<Vec<(u16, std::fs::File)>> = std::sync::Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("lazyload-test-ports");
    std::fs::create_dir_all(&dir).unwrap();
    let mut claimed = CLAIMED.lock().unwrap();
    loop {
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let port = 20_000 + (random % 12_000) as u16;
        if claimed.iter().any(|(p, _)| *p == port) {
            continue;
        }
        let Ok(file) = std::fs::File::create(dir.join(port.to_string())) else {
            continue;
        };
        if file.try_lock().is_err() || std::net::TcpListener::bind(("0.0.0.0", port)).is_err() {
            continue;
        }
        claimed.push((port, file));
        return port;
    }
}

/// A relay serving on a free loopback port until dropped.
pub struct TestRelay {
    /// Its address.
    pub addr: std::net::SocketAddr,
    /// The relay (metrics, debug view).
    pub relay: lazyload::xds::server::Relay,
    stop: tokio_util::sync::CancellationToken,
}

impl TestRelay {
    /// Starts a relay in front of `upstream` with `settings`.
    pub async fn start(
        upstream: lazyload::xds::upstream::UpstreamConfig,
        settings: lazyload::xds::adjust::Settings,
    ) -> Self {
        Self::start_tls(upstream, settings, None).await
    }

    /// The same, serving TLS when `tls` is set.
    pub async fn start_tls(
        upstream: lazyload::xds::upstream::UpstreamConfig,
        settings: lazyload::xds::adjust::Settings,
        tls: Option<tonic::transport::ServerTlsConfig>,
    ) -> Self {
        Self::start_limited(upstream, settings, tls, Default::default()).await
    }

    /// The same, with `limits` on connections and requests.
    pub async fn start_limited(
        upstream: lazyload::xds::upstream::UpstreamConfig,
        settings: lazyload::xds::adjust::Settings,
        tls: Option<tonic::transport::ServerTlsConfig>,
        limits: lazyload::xds::server::ServerLimits,
    ) -> Self {
        use std::time::Duration;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let relay = lazyload::xds::server::Relay::new(
            lazyload::xds::server::RelayConfig {
                settings,
                upstream: lazyload::xds::upstream::Upstream::new(upstream).unwrap(),
                node_pattern: None,
                open_budget: Duration::from_millis(600),
                probe_interval: Duration::from_millis(200),
                limits,
            },
            stop.clone(),
        );
        tokio::spawn(relay.clone().serve(listener, tls));
        Self { addr, relay, stop }
    }

    /// Stops serving (streams end).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// Creates `lazyload-<name>-<pid>-<n>`.
    pub fn new(name: &str) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("lazyload-{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A path inside the directory.
    pub fn path(&self, file: &str) -> std::path::PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
