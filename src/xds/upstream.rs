//! The connection to istiod: one fresh connection per downstream stream (as istio-agent does),
//! TLS against the mesh root with ALPN h2, the downstream's own credentials forwarded (or a
//! configured token for plain Envoy downstreams), keepalive no faster than istiod allows, a large
//! message limit, and jittered backoff when opening the stream fails.

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Largest xDS message accepted from istiod (istio-agent uses `MaxInt32`).
pub const MAX_MESSAGE: usize = 1 << 30;
/// Keepalive ping interval: istiod answers pings more often than every 15 s with GOAWAY.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// HTTP/2 receive windows for istiod's responses. A full push at 10,000 services is several
/// MiB; hyper's default windows (2 MiB per stream) make istiod wait for WINDOW_UPDATEs in the
/// middle of one. Envoy, the client the relay stands in for, advertises 256 MiB by default; the
/// relay reads one response at a time, so the window only bounds what istiod may have in flight.
const RECEIVE_WINDOW: u32 = 64 << 20;

/// Why the upstream could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address is not a URI tonic accepts.
    #[error("invalid upstream address {0:?}: {1}")]
    Address(String, String),
    /// A TLS file could not be read.
    #[error("cannot read {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TLS setup failed.
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// How to reach istiod.
#[derive(Clone, Debug, Default)]
pub struct UpstreamConfig {
    /// `http://istiod.istio-system.svc:15010` or `https://istiod.istio-system.svc:15012`.
    pub address: String,
    /// The mesh root certificate (PEM) to verify istiod with.
    pub ca_file: Option<PathBuf>,
    /// The name istiod's certificate is checked for (default `istiod.istio-system.svc`).
    pub server_name: Option<String>,
    /// A token file sent as `authorization: Bearer` when the downstream sends none.
    pub token_file: Option<PathBuf>,
    /// `ClusterID` sent when the downstream sends none.
    pub cluster_id: Option<String>,
}

/// A configured upstream.
#[derive(Clone, Debug)]
pub struct Upstream {
    config: UpstreamConfig,
    endpoint: Endpoint,
}

impl Upstream {
    /// Validates the configuration (address and scheme, TLS and token files).
    pub fn new(config: UpstreamConfig) -> Result<Self, Error> {
        // Only what the relay dials: plaintext h2c (`http`) or TLS (`https`).
        if !(config.address.starts_with("http://") || config.address.starts_with("https://")) {
            return Err(Error::Address(
                config.address.clone(),
                "the scheme must be http:// (plaintext) or https:// (TLS)".into(),
            ));
        }
        // Read again on every connection (it rotates), but it must be there from the start.
        if let Some(token) = &config.token_file {
            std::fs::read(token).map_err(|source| Error::File {
                path: token.clone(),
                source,
            })?;
        }
        let mut endpoint = Endpoint::from_shared(config.address.clone())
            .map_err(|e| Error::Address(config.address.clone(), e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .tcp_keepalive(Some(KEEPALIVE))
            .initial_stream_window_size(RECEIVE_WINDOW)
            .initial_connection_window_size(RECEIVE_WINDOW);
        if config.address.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().domain_name(
                config
                    .server_name
                    .clone()
                    .unwrap_or_else(|| "istiod.istio-system.svc".into()),
            );
            if let Some(ca) = &config.ca_file {
                let pem = std::fs::read(ca).map_err(|source| Error::File {
                    path: ca.clone(),
                    source,
                })?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            } else {
                tls = tls.with_enabled_roots();
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| Error::Tls(e.to_string()))?;
        }
        Ok(Self { config, endpoint })
    }

    /// The configured address.
    pub fn address(&self) -> &str {
        &self.config.address
    }

    /// Dials a fresh connection (calls on it frame their own messages: [`super::grpc`]).
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        self.endpoint.connect().await
    }

    /// Whether the relay may open istiod streams for this downstream. With a token of its own
    /// (`--upstream-token-file`) the relay would otherwise lend it to whoever reaches its port:
    /// a client brings its own `authorization` (forwarded; istiod authorises it), or it was
    /// authenticated by a client certificate the relay verified (`--xds-tls-client-ca`), or it
    /// is refused with `Unauthenticated`. Without a token there is nothing to lend.
    pub fn may_serve(&self, downstream: &MetadataMap, client_verified: bool) -> Result<(), tonic::Status> {
        if self.config.token_file.is_none() || client_verified || downstream.contains_key("authorization") {
            return Ok(());
        }
        Err(tonic::Status::unauthenticated(
            "the relay lends its istiod credentials only to clients it authenticated: present a \
             client certificate the relay trusts (--xds-tls-client-ca) or your own authorization",
        ))
    }

    /// The metadata of the upstream stream: the downstream's `authorization` and `ClusterID`
    /// (istiod authorises the proxy, not the relay), else the configured token and cluster id.
    /// The token file is read on every connection: it rotates.
    pub fn metadata(&self, downstream: &MetadataMap) -> MetadataMap {
        let mut out = MetadataMap::new();
        for key in ["authorization", "clusterid"] {
            if let Some(v) = downstream.get(key) {
                out.insert(key, v.clone());
            }
        }
        if !out.contains_key("authorization")
            && let Some(path) = &self.config.token_file
        {
            match std::fs::read_to_string(path) {
                Ok(token) => match MetadataValue::try_from(format!("Bearer {}", token.trim())) {
                    Ok(v) => {
                        out.insert("authorization", v);
                    }
                    Err(_) => {
                        tracing::warn!(file = %path.display(), "token file holds characters a header cannot")
                    }
                },
                Err(e) => tracing::warn!(file = %path.display(), "cannot read the token file: {e}"),
            }
        }
        if !out.contains_key("clusterid")
            && let Some(id) = &self.config.cluster_id
            && let Ok(v) = MetadataValue::try_from(id.as_str())
        {
            out.insert("clusterid", v);
        }
        out
    }
}

/// Whether an error opening a stream is worth retrying (istiod not ready, rate limited, or the
/// connection failed).
pub fn retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::ResourceExhausted
            | tonic::Code::Unknown
            | tonic::Code::Internal
    )
}

/// Whether an upstream stream ended the routine way: istiod's max-connection-age GOAWAY.
pub fn routine_close(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable || status.message().contains("NO_ERROR")
}

/// Exponential backoff with jitter: 100 ms doubling to `cap`, each delay scaled by 0.5..1.5.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
    cap: Duration,
    seed: u64,
}

impl Backoff {
    /// A backoff capped at `cap`.
    pub fn new(cap: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        Self {
            next: Duration::from_millis(100),
            cap,
            seed,
        }
    }

    /// The next delay.
    pub fn delay(&mut self) -> Duration {
        // xorshift: jitter only needs to decorrelate relays, not to be unpredictable.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let factor = 0.5 + (self.seed % 1000) as f64 / 1000.0;
        let d = self.next.mul_f64(factor);
        self.next = (self.next * 2).min(self.cap);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(2));
        let delays: Vec<Duration> = (0..8).map(|_| b.delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(150));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(3)));
        assert!(delays[7] >= Duration::from_secs(1));
    }

    #[test]
    fn metadata_forwarding() {
        let dir = std::env::temp_dir().join(format!("lazyload-token-{}", std::process::id()));
        std::fs::write(&dir, "tok\n").unwrap();
        let up = Upstream::new(UpstreamConfig {
            address: "http://127.0.0.1:15010".into(),
            token_file: Some(dir.clone()),
            cluster_id: Some("Kubernetes".into()),
            ..Default::default()
        })
        .unwrap();
        let md = up.metadata(&MetadataMap::new());
        assert_eq!(md.get("authorization").unwrap(), "Bearer tok");
        assert_eq!(md.get("clusterid").unwrap(), "Kubernetes");
        let mut down = MetadataMap::new();
        down.insert("authorization", "Bearer theirs".parse().unwrap());
        down.insert("clusterid", "c2".parse().unwrap());
        let md = up.metadata(&down);
        assert_eq!(md.get("authorization").unwrap(), "Bearer theirs");
        assert_eq!(md.get("clusterid").unwrap(), "c2");
        // Only authenticated clients get the relay's own token.
        assert_eq!(
            up.may_serve(&MetadataMap::new(), false).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert!(up.may_serve(&MetadataMap::new(), true).is_ok());
        assert!(up.may_serve(&down, false).is_ok());
        let without_token = Upstream::new(UpstreamConfig {
            address: "http://127.0.0.1:15010".into(),
            ..Default::default()
        })
        .unwrap();
        assert!(without_token.may_serve(&MetadataMap::new(), false).is_ok());
        std::fs::remove_file(dir).ok();
        assert!(
            Upstream::new(UpstreamConfig {
                address: "not a uri".into(),
                ..Default::default()
            })
            .is_err()
        );
    }
}
