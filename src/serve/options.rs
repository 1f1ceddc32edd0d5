//! The flags of `lazyload serve` and the plain options they become: clap stops here, the rest of
//! `serve` (and the demo, which builds [`Options`] itself) sees only [`Options`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use regex::Regex;

use crate::telemetry::LogFormat;
use crate::xds::upstream::{Upstream, UpstreamConfig};

/// Plaintext ADS listen address of the relay when none is given.
const XDS_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15010);
/// TLS ADS listen address of the relay when none is given.
const XDS_TLS_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15012);
/// Name istiod's certificate carries in a default Istio install.
const UPSTREAM_SERVER_NAME: &str = "istiod.istio-system.svc";
/// Address the global-sidecar's outbound listeners are rebound to when none is given.
const REBIND_ADDRESS: &str = "0.0.0.0";
/// Connections each xDS listener holds at once when no limit is given.
const XDS_MAX_CONNECTIONS: u32 = 1024;
/// Largest xDS request accepted when no limit is given (istiod's own default).
const XDS_MAX_REQUEST_BYTES: u32 = 4 << 20;
/// `--upstream-open-budget` when not given (the flag's default says the same; a test checks).
const UPSTREAM_OPEN_BUDGET: Duration = Duration::from_secs(5);
/// `--xds-handshake-timeout` when not given.
const XDS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// `--prometheus-interval` when not given.
const PROMETHEUS_INTERVAL: Duration = Duration::from_secs(30);

/// Flags of `lazyload serve` (each also read from an environment variable).
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file: a SlimeBoot lazyload module entry, or a whole SlimeBoot.
    #[arg(short, long, env = "LAZYLOAD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Admin HTTP address (`/metrics`, `/healthz`, `/readyz`, `/debug/...`);
    /// default: `global.misc.aux-addr` (`:8081`).
    #[arg(long, env = "LAZYLOAD_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, env = "LAZYLOAD_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
    /// Access-log collector (gRPC ALS) address; default: `global.misc.logSourcePort`
    /// (`:8082`). Runs with `metricSourceType: accesslog`, or whenever this flag is given.
    #[arg(long, env = "LAZYLOAD_ALS_LISTEN")]
    pub als_listen: Option<SocketAddr>,
    /// Which peers may send access logs (what they send becomes fences' dependencies).
    #[arg(long, env = "LAZYLOAD_ALS_TRUST", value_enum, default_value_t)]
    pub als_trust: AlsTrust,
    /// The cluster, from a file (`kubectl get
    /// ns,svc,pods,virtualservices,serviceentries,servicefences,sidecars -A -o yaml`); for running
    /// without a cluster (with one, its watchers keep the index up to date); required with
    /// --manifests-dir.
    #[arg(long, env = "LAZYLOAD_CLUSTER_SNAPSHOT")]
    pub cluster_snapshot: Option<PathBuf>,
    /// How often the Prometheus source (`metricSourceType: prometheus`) queries each enabled
    /// fence (`30s`, `2m`).
    #[arg(long, env = "LAZYLOAD_PROMETHEUS_INTERVAL", value_parser = parse_duration, default_value = "30s")]
    pub prometheus_interval: Duration,
    /// Kubeconfig of the cluster lazyload writes to (learned dependencies into fence statuses);
    /// without it, the in-cluster configuration when running in a pod, else none (learned
    /// dependencies are then kept in memory only). Not used with --manifests-dir.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Write each fence changed by learned dependencies, and its Sidecar, to
    /// `<dir>/<namespace>/<name>.{servicefence,sidecar}.yaml`: a file sink instead of the API
    /// server (for review or GitOps); with it, no cluster is contacted, even in a pod or with a
    /// kubeconfig (the cluster comes from --cluster-snapshot).
    #[arg(long, env = "LAZYLOAD_MANIFESTS_DIR", requires = "cluster_snapshot")]
    pub manifests_dir: Option<PathBuf>,
    /// The xDS relay.
    #[command(flatten)]
    pub relay: RelayArgs,
}

/// Which peers the access-log collector takes streams from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AlsTrust {
    /// Global-sidecar pods only: the peer's address must be a global-sidecar pod's in the
    /// cluster's pods (watched, or from --cluster-snapshot).
    #[default]
    GlobalSidecar,
    /// Whoever reaches --als-listen: for the demo and tests on loopback, or a port only trusted
    /// hosts can reach.
    Any,
}

/// Flags of the xDS relay.
#[derive(Clone, Debug, clap::Args)]
pub struct RelayArgs {
    /// istiod's xDS address, `http://istiod.istio-system.svc:15010` or
    /// `https://istiod.istio-system.svc:15012`; enables the relay.
    #[arg(long, env = "LAZYLOAD_UPSTREAM")]
    pub upstream: Option<String>,
    /// Plaintext ADS listen address of the relay.
    #[arg(long, env = "LAZYLOAD_XDS_LISTEN", default_value_t = XDS_LISTEN)]
    pub xds_listen: SocketAddr,
    /// TLS ADS listen address (used when --xds-tls-cert and --xds-tls-key are set).
    #[arg(long, env = "LAZYLOAD_XDS_TLS_LISTEN", default_value_t = XDS_TLS_LISTEN)]
    pub xds_tls_listen: SocketAddr,
    /// Certificate (PEM) the TLS ADS listener presents (pilot-agent checks it against the mesh root).
    #[arg(long, env = "LAZYLOAD_XDS_TLS_CERT", requires = "xds_tls_key")]
    pub xds_tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "LAZYLOAD_XDS_TLS_KEY", requires = "xds_tls_cert")]
    pub xds_tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to; without it clients are not asked for one.
    #[arg(long, env = "LAZYLOAD_XDS_TLS_CLIENT_CA")]
    pub xds_tls_client_ca: Option<PathBuf>,
    /// Mesh root certificate (PEM) istiod's certificate is verified with.
    #[arg(long, env = "LAZYLOAD_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// Name istiod's certificate must carry.
    #[arg(
        long,
        env = "LAZYLOAD_UPSTREAM_SERVER_NAME",
        default_value = UPSTREAM_SERVER_NAME
    )]
    pub upstream_server_name: String,
    /// Token file sent to istiod for downstreams that send no `authorization` (plain Envoy).
    #[arg(long, env = "LAZYLOAD_UPSTREAM_TOKEN_FILE")]
    pub upstream_token_file: Option<PathBuf>,
    /// `ClusterID` sent to istiod for downstreams that send none.
    #[arg(long, env = "LAZYLOAD_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Node ids matching this RE2 pattern are global-sidecars too (besides node metadata
    /// `SLIME_APP=LAZYLOAD_GLOBAL_SIDECAR`).
    #[arg(long, env = "LAZYLOAD_GLOBAL_SIDECAR_NODE_PATTERN")]
    pub global_sidecar_node_pattern: Option<String>,
    /// `host:port` the global-sidecar sends access logs to; default
    /// `lazyload.<slimeNamespace>.svc.<clusterDomain>:<logSourcePort>`; `off` disables A6.
    #[arg(long, env = "LAZYLOAD_ALS_ADDRESS")]
    pub als_address: Option<String>,
    /// Address the global-sidecar's outbound listeners are rebound to (A10).
    #[arg(long, env = "LAZYLOAD_REBIND_ADDRESS", default_value = REBIND_ADDRESS)]
    pub rebind_address: String,
    /// Accept callers' Istio mTLS on the global-sidecar's listeners (A11).
    #[arg(long, env = "LAZYLOAD_ACCEPT_MTLS")]
    pub accept_mtls: bool,
    /// Ports besides Istio's own that no global-sidecar listener may bind (A5).
    #[arg(long, env = "LAZYLOAD_RESERVED_PORTS", value_delimiter = ',')]
    pub reserved_ports: Vec<u16>,
    /// How long to keep trying istiod before a global-sidecar gets its last good config.
    #[arg(long, env = "LAZYLOAD_UPSTREAM_OPEN_BUDGET", default_value = "5s", value_parser = parse_duration)]
    pub upstream_open_budget: Duration,
    /// Connections each xDS listener holds at once; more are closed as they arrive.
    #[arg(long, env = "LAZYLOAD_XDS_MAX_CONNECTIONS", default_value_t = XDS_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..))]
    pub xds_max_connections: u32,
    /// How long a new xDS connection may take to start its HTTP/2 (or TLS) handshake.
    #[arg(long, env = "LAZYLOAD_XDS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub xds_handshake_timeout: Duration,
    /// Largest xDS request accepted from a downstream, in bytes (istiod's default is 4 MiB).
    #[arg(long, env = "LAZYLOAD_XDS_MAX_REQUEST_BYTES", default_value_t = XDS_MAX_REQUEST_BYTES, value_parser = clap::value_parser!(u32).range(1024..))]
    pub xds_max_request_bytes: u32,
}

/// Parses a positive Go-style duration (`30s`, `2m`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = crate::duration::parse(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("the duration must be positive".into());
    }
    Ok(d)
}

/// What `lazyload serve` runs with.
#[derive(Clone, Debug)]
pub struct Options {
    /// The configuration file, if any (read by [`super::run`]).
    pub config: Option<PathBuf>,
    /// Admin HTTP address; `None`: `global.misc.aux-addr`.
    pub admin_listen: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
    /// Access-log collector address; `None`: `global.misc.logSourcePort`, and only with
    /// `metricSourceType: accesslog`.
    pub als_listen: Option<SocketAddr>,
    /// Which peers may send access logs.
    pub als_trust: AlsTrust,
    /// The cluster from a file, for running without a cluster (or to start from).
    pub cluster_snapshot: Option<PathBuf>,
    /// How often the Prometheus source queries each enabled fence.
    pub prometheus_interval: Duration,
    /// Kubeconfig of the cluster written to; `None`: in-cluster when in a pod, else no cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Directory learned fences and Sidecars are written to instead of a cluster.
    pub manifests_dir: Option<PathBuf>,
    /// The xDS relay (it runs when [`RelayOptions::upstream`] is set).
    pub relay: RelayOptions,
}

impl Options {
    /// No cluster but `snapshot`, learned fences and Sidecars written under `manifests`, nothing
    /// else running until set (what the demo starts from).
    pub fn offline(snapshot: PathBuf, manifests: PathBuf) -> Self {
        Self {
            config: None,
            admin_listen: None,
            log_format: LogFormat::default(),
            als_listen: None,
            als_trust: AlsTrust::default(),
            cluster_snapshot: Some(snapshot),
            prometheus_interval: PROMETHEUS_INTERVAL,
            kubeconfig: None,
            manifests_dir: Some(manifests),
            relay: RelayOptions::default(),
        }
    }

    /// Checks every option before anything starts (addresses, the upstream's scheme, every file
    /// it names, the manifests directory): a mistake is an error now, not a failure per stream
    /// or per write later while `/readyz` says ready.
    pub fn check(&self) -> anyhow::Result<()> {
        self.relay.check()?;
        if let Some(dir) = &self.manifests_dir {
            crate::manifests::check_writable(dir)
                .map_err(|e| anyhow::anyhow!("--manifests-dir is not writable: {e}"))?;
        }
        Ok(())
    }
}

impl From<ServeArgs> for Options {
    fn from(args: ServeArgs) -> Self {
        let relay = args.relay;
        Self {
            config: args.config,
            admin_listen: args.admin_listen,
            log_format: args.log_format,
            als_listen: args.als_listen,
            als_trust: args.als_trust,
            cluster_snapshot: args.cluster_snapshot,
            prometheus_interval: args.prometheus_interval,
            kubeconfig: args.kubeconfig,
            manifests_dir: args.manifests_dir,
            relay: RelayOptions {
                upstream: relay.upstream,
                xds_listen: relay.xds_listen,
                xds_tls_listen: relay.xds_tls_listen,
                tls: relay
                    .xds_tls_cert
                    .zip(relay.xds_tls_key)
                    .map(|(cert, key)| TlsFiles {
                        cert,
                        key,
                        client_ca: relay.xds_tls_client_ca,
                    }),
                upstream_ca: relay.upstream_ca,
                upstream_server_name: relay.upstream_server_name,
                upstream_token_file: relay.upstream_token_file,
                cluster_id: relay.cluster_id,
                global_sidecar_node_pattern: relay.global_sidecar_node_pattern,
                als_address: relay.als_address,
                rebind_address: relay.rebind_address,
                accept_mtls: relay.accept_mtls,
                reserved_ports: relay.reserved_ports,
                upstream_open_budget: relay.upstream_open_budget,
                xds_max_connections: relay.xds_max_connections,
                xds_handshake_timeout: relay.xds_handshake_timeout,
                xds_max_request_bytes: relay.xds_max_request_bytes,
            },
        }
    }
}

/// The xDS relay's options (see [`RelayArgs`] for each).
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// istiod's xDS address; the relay runs only with one.
    pub upstream: Option<String>,
    /// Plaintext ADS listen address.
    pub xds_listen: SocketAddr,
    /// TLS ADS listen address (used with [`RelayOptions::tls`]).
    pub xds_tls_listen: SocketAddr,
    /// The TLS listener's files; no TLS listener without them.
    pub tls: Option<TlsFiles>,
    /// Mesh root certificate istiod's certificate is verified with.
    pub upstream_ca: Option<PathBuf>,
    /// Name istiod's certificate must carry.
    pub upstream_server_name: String,
    /// Token file sent to istiod for downstreams that send no `authorization`.
    pub upstream_token_file: Option<PathBuf>,
    /// `ClusterID` sent to istiod for downstreams that send none.
    pub cluster_id: Option<String>,
    /// Node ids matching this RE2 pattern are global-sidecars too.
    pub global_sidecar_node_pattern: Option<String>,
    /// `host:port` the global-sidecar sends access logs to; `off` disables A6; `None`: lazyload's
    /// Service.
    pub als_address: Option<String>,
    /// Address the global-sidecar's outbound listeners are rebound to.
    pub rebind_address: String,
    /// Accept callers' Istio mTLS on the global-sidecar's listeners.
    pub accept_mtls: bool,
    /// Ports besides Istio's own that no global-sidecar listener may bind.
    pub reserved_ports: Vec<u16>,
    /// How long to keep trying istiod before a global-sidecar gets its last good config.
    pub upstream_open_budget: Duration,
    /// Connections each xDS listener holds at once.
    pub xds_max_connections: u32,
    /// How long a new xDS connection may take to start its handshake.
    pub xds_handshake_timeout: Duration,
    /// Largest xDS request accepted from a downstream, in bytes.
    pub xds_max_request_bytes: u32,
}

/// The files of the relay's TLS listener.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Certificate (PEM) the listener presents.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CA (PEM) client certificates must chain to; without it clients are not asked for one.
    pub client_ca: Option<PathBuf>,
}

impl Default for RelayOptions {
    /// No relay; every other option at the default its flag has.
    fn default() -> Self {
        Self {
            upstream: None,
            xds_listen: XDS_LISTEN,
            xds_tls_listen: XDS_TLS_LISTEN,
            tls: None,
            upstream_ca: None,
            upstream_server_name: UPSTREAM_SERVER_NAME.into(),
            upstream_token_file: None,
            cluster_id: None,
            global_sidecar_node_pattern: None,
            als_address: None,
            rebind_address: REBIND_ADDRESS.into(),
            accept_mtls: false,
            reserved_ports: Vec::new(),
            upstream_open_budget: UPSTREAM_OPEN_BUDGET,
            xds_max_connections: XDS_MAX_CONNECTIONS,
            xds_handshake_timeout: XDS_HANDSHAKE_TIMEOUT,
            xds_max_request_bytes: XDS_MAX_REQUEST_BYTES,
        }
    }
}

impl RelayOptions {
    /// Checks the addresses, the upstream's scheme and every file named.
    fn check(&self) -> anyhow::Result<()> {
        self.rebind_address
            .parse::<IpAddr>()
            .with_context(|| format!("--rebind-address {:?} is not an IP address", self.rebind_address))?;
        self.als_host_port()?;
        self.node_pattern()?;
        if let Some(upstream) = &self.upstream {
            // `{e}` alone: these errors name their cause already.
            self.upstream(upstream)
                .map_err(|e| anyhow::anyhow!("--upstream: {e}"))?;
        }
        let tls = self.tls.as_ref();
        let files = [
            ("--xds-tls-cert", tls.map(|t| &t.cert)),
            ("--xds-tls-key", tls.map(|t| &t.key)),
            ("--xds-tls-client-ca", tls.and_then(|t| t.client_ca.as_ref())),
            ("--upstream-ca", self.upstream_ca.as_ref()),
        ];
        for (flag, file) in files {
            if let Some(file) = file {
                std::fs::read(file).with_context(|| format!("{flag}: cannot read {}", file.display()))?;
            }
        }
        Ok(())
    }

    /// The upstream at `address` these options describe.
    pub fn upstream(&self, address: &str) -> Result<Upstream, crate::xds::upstream::Error> {
        Upstream::new(UpstreamConfig {
            address: address.to_string(),
            ca_file: self.upstream_ca.clone(),
            server_name: Some(self.upstream_server_name.clone()),
            token_file: self.upstream_token_file.clone(),
            cluster_id: self.cluster_id.clone(),
        })
    }

    /// `--als-address` as host and port; `None` when not given or `off`.
    pub fn als_host_port(&self) -> anyhow::Result<Option<(String, u16)>> {
        match self.als_address.as_deref() {
            None | Some("off") => Ok(None),
            Some(a) => parse_host_port(a)
                .with_context(|| format!("--als-address {a:?}"))
                .map(Some),
        }
    }

    /// `--global-sidecar-node-pattern`, compiled.
    pub fn node_pattern(&self) -> anyhow::Result<Option<Regex>> {
        self.global_sidecar_node_pattern
            .as_deref()
            .map(Regex::new)
            .transpose()
            .context("--global-sidecar-node-pattern")
    }
}

/// Parses `host:port`.
fn parse_host_port(s: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = s.rsplit_once(':').context("expected host:port")?;
    anyhow::ensure!(!host.is_empty(), "expected host:port");
    Ok((
        host.trim_matches(['[', ']']).to_string(),
        port.parse().context("invalid port")?,
    ))
}

#[cfg(test)]
mod tests {
    use clap::{Args as _, FromArgMatches as _};

    use super::*;

    fn parse(flags: &[&str]) -> Options {
        let command = ServeArgs::augment_args(clap::Command::new("serve")).mut_args(|a| a.env(None));
        let matches = command
            .try_get_matches_from(std::iter::once("serve").chain(flags.iter().copied()))
            .expect("valid flags");
        ServeArgs::from_arg_matches(&matches).expect("valid flags").into()
    }

    #[test]
    fn the_flags_defaults_are_the_plain_options_defaults() {
        let options = parse(&[]);
        assert_eq!(
            format!("{:?}", options.relay),
            format!("{:?}", RelayOptions::default())
        );
        assert_eq!(options.prometheus_interval, PROMETHEUS_INTERVAL);
        assert!(options.relay.upstream.is_none(), "no --upstream, no relay");
    }

    #[test]
    fn tls_files_come_as_a_pair() {
        let options = parse(&[
            "--upstream",
            "http://istiod:15010",
            "--xds-tls-cert",
            "c.pem",
            "--xds-tls-key",
            "k.pem",
        ]);
        let tls = options.relay.tls.expect("TLS files");
        assert_eq!((tls.cert, tls.key), ("c.pem".into(), "k.pem".into()));
    }
}
