//! `lazyload report --istiod <url>`: what every proxy connected to a live istiod holds now.
//!
//! It reads the debug endpoints `istioctl proxy-status` and `istioctl proxy-config` read, on
//! istiod's monitoring port (15014), as written in istio/istio's `pilot/pkg/xds/debug.go` of the
//! 1.17/1.18 line, `pilot/pkg/model/sidecar.go` (SidecarScope's JSON) and
//! `pilot/pkg/xds/monitoring.go` of 1.19+ (fields a later release adds are ignored):
//!
//! - `GET /debug/syncz`: a JSON array, one object per connected proxy: `proxy`
//!   (`<pod>.<namespace>`), `cluster_id`, `istio_version`, and per type `<type>_sent` /
//!   `<type>_acked` nonces (`cluster`, `listener`, `route`, `endpoint`, `extensionconfig`).
//! - `GET /debug/config_dump?proxyID=<proxy>&include_eds=true`: the config istiod generates for
//!   that proxy now, in the shape of Envoy's admin config dump (`configs` of `ClustersConfigDump`,
//!   `EndpointsConfigDump`, `ListenersConfigDump`, `RoutesConfigDump`, ...). 400 without
//!   `proxyID`, 404 when the proxy is not connected to this istiod.
//! - `GET /debug/sidecarz?proxyID=<proxy>`: the proxy's SidecarScope: `name` and `namespace` of
//!   the Sidecar that applies (`default-sidecar` with `sidecar: null` when none does).
//! - `GET /metrics` (the same port; `--istiod-metrics`): `pilot_xds_pushes{type}`,
//!   `pilot_xds_config_size_bytes` and `pilot_proxy_convergence_time` (histograms).
//!
//! istiod answers these only to localhost or an authenticated caller: run it through
//! `kubectl -n istio-system port-forward deploy/istiod 15014`, or give a token
//! (`--istiod-token-file`, sent as a bearer token). Sizes are the JSON sizes of the dumped
//! resources, as in the offline report.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt as _;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use super::Size;

/// The name istiod gives the scope of a proxy no Sidecar applies to.
const DEFAULT_SIDECAR: &str = "default-sidecar";
/// The longest a single debug request may take (a config dump of a large mesh takes a while).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Config dumps asked for at the same time.
const PARALLEL_DUMPS: usize = 4;
/// The largest debug response read.
const MAX_BODY: usize = 256 * 1024 * 1024;

/// Flags of `lazyload report` for a live mesh.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct IstiodArgs {
    /// istiod's monitoring port (`http://localhost:15014` through `kubectl port-forward`): report
    /// what every connected proxy holds now instead of reading files.
    #[arg(long)]
    pub istiod: Option<String>,
    /// istiod's metrics (`http://localhost:15014/metrics`): add its push counters to the report.
    #[arg(long, requires = "istiod")]
    pub istiod_metrics: Option<String>,
    /// A file holding a token istiod accepts (sent as `Authorization: Bearer`), when not
    /// connecting from localhost.
    #[arg(long, requires = "istiod")]
    pub istiod_token_file: Option<PathBuf>,
    /// An earlier `--json` report: print what changed since (a benchmark's before and after).
    #[arg(long, requires = "istiod")]
    pub compare: Option<PathBuf>,
}

/// Why istiod could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address is not `http://host[:port][/prefix]`.
    #[error("istiod address {0:?}: expected http://host[:port] (its plaintext monitoring port)")]
    Address(String),
    /// Connecting failed.
    #[error("connecting to {url}: {source}")]
    Connect {
        /// The URL asked.
        url: String,
        /// The cause.
        source: std::io::Error,
    },
    /// HTTP failed.
    #[error("asking {url}: {source}")]
    Http {
        /// The URL asked.
        url: String,
        /// The cause.
        source: hyper::Error,
    },
    /// No answer in time.
    #[error("{0}: no answer within {REQUEST_TIMEOUT:?}")]
    Timeout(String),
    /// The answer is too large.
    #[error("{0}: answer larger than {MAX_BODY} bytes")]
    TooLarge(String),
    /// istiod answered with an error status.
    #[error("{url} answered {status}: {body}")]
    Status {
        /// The URL asked.
        url: String,
        /// The status.
        status: u16,
        /// The start of the body (istiod says why in it).
        body: String,
    },
    /// The answer is not what istiod sends there.
    #[error("{url}: unexpected answer: {why}")]
    Shape {
        /// The URL asked.
        url: String,
        /// What is wrong.
        why: String,
    },
}

/// One connected proxy, as `/debug/syncz` lists it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct SyncStatus {
    proxy: String,
    cluster_id: String,
    istio_version: String,
    cluster_sent: String,
    cluster_acked: String,
    listener_sent: String,
    listener_acked: String,
    route_sent: String,
    route_acked: String,
    endpoint_sent: String,
    endpoint_acked: String,
}

impl SyncStatus {
    /// `SYNCED` when every type sent was acknowledged, `STALE` otherwise (as `istioctl
    /// proxy-status` says it per type).
    fn state(&self) -> &'static str {
        let pairs = [
            (&self.cluster_sent, &self.cluster_acked),
            (&self.listener_sent, &self.listener_acked),
            (&self.route_sent, &self.route_acked),
            (&self.endpoint_sent, &self.endpoint_acked),
        ];
        if pairs.iter().all(|(sent, acked)| sent.is_empty() || sent == acked) {
            "SYNCED"
        } else {
            "STALE"
        }
    }
}

/// What one proxy holds now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProxyRow {
    /// `<pod>.<namespace>`, as istiod names it.
    pub proxy: String,
    /// The cluster it runs in.
    pub cluster_id: String,
    /// Its Istio version.
    pub istio_version: String,
    /// `SYNCED` or `STALE` (some type sent but not acknowledged yet).
    pub sync: String,
    /// The Sidecar that scopes it (`namespace/name`); none: it gets the whole mesh.
    pub sidecar: Option<String>,
    /// Whether a Sidecar scopes it.
    pub fenced: bool,
    /// What istiod gives it now; none if it could not be measured (see `error`).
    pub holds: Option<Size>,
    /// Why it could not be measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The sums over all measured proxies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Proxies connected.
    pub proxies: usize,
    /// Of which scoped by a Sidecar.
    pub fenced: usize,
    /// Everything the measured proxies hold.
    pub holds: Size,
}

/// istiod's push counters (since it started).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PilotMetrics {
    /// `pilot_xds_pushes` by type (`cds`, `eds`, `lds`, `rds`, ...; send errors left out).
    pub pushes: BTreeMap<String, f64>,
    /// Bytes of config pushed (`pilot_xds_config_size_bytes_sum`, all types).
    pub pushed_bytes: f64,
    /// Config pushes measured (`pilot_xds_config_size_bytes_count`, all types).
    pub sized_pushes: f64,
    /// `pilot_proxy_convergence_time_sum` (seconds).
    pub convergence_seconds: f64,
    /// `pilot_proxy_convergence_time_count`.
    pub convergences: f64,
}

/// The live report (`--json` prints it; `--compare` reads it back).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LiveReport {
    /// The istiod asked.
    pub istiod: String,
    /// When.
    pub taken_at: Timestamp,
    /// One row per connected proxy.
    pub proxies: Vec<ProxyRow>,
    /// The mesh totals.
    pub total: Totals,
    /// istiod's push counters, with `--istiod-metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pilot: Option<PilotMetrics>,
}

/// A plain-HTTP client for istiod's monitoring port.
#[derive(Clone, Debug)]
struct Client {
    host: String,
    port: u16,
    prefix: String,
    token: Option<String>,
}

impl Client {
    fn new(address: &str, token: Option<String>) -> Result<Self, Error> {
        let bad = || Error::Address(address.to_string());
        let rest = address.trim().strip_prefix("http://").ok_or_else(bad)?;
        let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let uri: hyper::http::uri::Authority = authority.parse().map_err(|_| bad())?;
        Ok(Self {
            host: uri.host().trim_matches(['[', ']']).to_string(),
            port: uri.port_u16().unwrap_or(80),
            prefix: prefix.trim_end_matches('/').to_string(),
            token,
        })
    }

    fn url(&self, path: &str) -> String {
        let prefix = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("/{}", self.prefix)
        };
        format!("http://{}:{}{prefix}{path}", self.host, self.port)
    }

    /// GETs `path` (below the prefix); the body of a 200 answer.
    async fn get(&self, path: &str) -> Result<String, Error> {
        let url = self.url(path);
        tokio::time::timeout(REQUEST_TIMEOUT, self.get_inner(&url))
            .await
            .map_err(|_| Error::Timeout(url.clone()))?
    }

    async fn get_inner(&self, url: &str) -> Result<String, Error> {
        let http = |source| Error::Http {
            url: url.to_string(),
            source,
        };
        let stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| Error::Connect {
                url: url.to_string(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let conn = tokio::spawn(conn);
        let path = url
            .splitn(4, '/')
            .nth(3)
            .map_or("/".to_string(), |p| format!("/{p}"));
        let mut req =
            hyper::Request::get(path).header(hyper::header::HOST, format!("{}:{}", self.host, self.port));
        if let Some(token) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| Error::Address(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(http);
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                conn.abort();
                return Err(e);
            }
        };
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes());
        conn.abort();
        let body = body.map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(e) => http(*e),
            Err(_) => Error::TooLarge(url.to_string()),
        })?;
        let text = String::from_utf8_lossy(&body).into_owned();
        if status != 200 {
            return Err(Error::Status {
                url: url.to_string(),
                status,
                body: text.chars().take(200).collect::<String>().trim().to_string(),
            });
        }
        Ok(text)
    }
}

fn shape(url: String, why: impl std::fmt::Display) -> Error {
    Error::Shape {
        url,
        why: why.to_string(),
    }
}

/// The proxies of a `/debug/syncz` answer.
fn parse_syncz(url: String, body: &str) -> Result<Vec<SyncStatus>, Error> {
    serde_json::from_str(body).map_err(|e| shape(url, format!("not a list of proxies: {e}")))
}

/// The Sidecar (`namespace/name`) of a `/debug/sidecarz` answer; none for istiod's default.
fn parse_sidecarz(url: String, body: &str) -> Result<Option<String>, Error> {
    #[derive(Deserialize)]
    struct Scope {
        name: String,
        #[serde(default)]
        namespace: String,
        #[serde(default)]
        sidecar: Option<serde_json::Value>,
    }
    let scope: Scope =
        serde_json::from_str(body).map_err(|e| shape(url, format!("not a SidecarScope: {e}")))?;
    let applies = scope.name != DEFAULT_SIDECAR && scope.sidecar.is_some_and(|s| !s.is_null());
    Ok(applies.then(|| format!("{}/{}", scope.namespace, scope.name)))
}

/// istiod's push counters from its Prometheus text exposition.
pub fn parse_pilot_metrics(text: &str) -> PilotMetrics {
    let mut m = PilotMetrics::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        // `name{labels} value [timestamp]`, or `name value [timestamp]`.
        let (series, rest) = match line.find('}') {
            Some(end) => line.split_at(end + 1),
            None => line.split_once(' ').unwrap_or((line, "")),
        };
        let Some(Ok(value)) = rest.split_whitespace().next().map(str::parse::<f64>) else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        match name {
            "pilot_xds_pushes" | "pilot_xds_pushes_total" => {
                if let Some(kind) = label(labels, "type").filter(|t| !t.ends_with("_senderr")) {
                    *m.pushes.entry(kind.to_string()).or_default() += value;
                }
            }
            "pilot_xds_config_size_bytes_sum" => m.pushed_bytes += value,
            "pilot_xds_config_size_bytes_count" => m.sized_pushes += value,
            "pilot_proxy_convergence_time_sum" => m.convergence_seconds += value,
            "pilot_proxy_convergence_time_count" => m.convergences += value,
            _ => {}
        }
    }
    m
}

/// The value of label `key` in `a="x",b="y"}`.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.trim_end_matches('}').split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

/// Asks istiod (and its metrics endpoint) what every connected proxy holds now.
pub async fn collect(args: &IstiodArgs, now: Timestamp) -> anyhow::Result<LiveReport> {
    use anyhow::Context as _;
    let address = args.istiod.as_deref().context("--istiod is required")?;
    let token = match &args.istiod_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let istiod = Client::new(address, token.clone())?;
    let syncz = istiod.get("/debug/syncz").await?;
    let statuses = parse_syncz(istiod.url("/debug/syncz"), &syncz)?;
    // A few at a time: each config dump makes istiod generate the proxy's whole config.
    let mut proxies: Vec<ProxyRow> = futures::stream::iter(statuses)
        .map(|status| measure(&istiod, status))
        .buffer_unordered(PARALLEL_DUMPS)
        .collect()
        .await;
    proxies.sort_by(|a, b| a.proxy.cmp(&b.proxy));
    let pilot = match &args.istiod_metrics {
        Some(url) => {
            let (base, path) = match url.trim().strip_prefix("http://").and_then(|r| r.split_once('/')) {
                Some((authority, path)) => (format!("http://{authority}"), format!("/{path}")),
                None => (url.clone(), "/metrics".to_string()),
            };
            let metrics = Client::new(&base, token)?;
            Some(parse_pilot_metrics(&metrics.get(&path).await?))
        }
        None => None,
    };
    let mut total = Totals {
        proxies: proxies.len(),
        fenced: proxies.iter().filter(|p| p.fenced).count(),
        holds: Size::default(),
    };
    for holds in proxies.iter().filter_map(|p| p.holds) {
        add(&mut total.holds, &holds);
    }
    Ok(LiveReport {
        istiod: address.to_string(),
        taken_at: now,
        proxies,
        total,
        pilot,
    })
}

fn add(sum: &mut Size, s: &Size) {
    sum.clusters += s.clusters;
    sum.endpoints += s.endpoints;
    sum.listeners += s.listeners;
    sum.virtual_hosts += s.virtual_hosts;
    sum.bytes += s.bytes;
}

/// One proxy's row: its config dump and Sidecar scope. A proxy that cannot be measured (it
/// disconnected meanwhile, istiod failed) is a row saying why; the others go on.
async fn measure(istiod: &Client, status: SyncStatus) -> ProxyRow {
    let id = crate::learn::prometheus::percent_encode(&status.proxy);
    let mut row = ProxyRow {
        proxy: status.proxy.clone(),
        cluster_id: status.cluster_id.clone(),
        istio_version: status.istio_version.clone(),
        sync: status.state().to_string(),
        sidecar: None,
        fenced: false,
        holds: None,
        error: None,
    };
    let dump_path = format!("/debug/config_dump?proxyID={id}&include_eds=true");
    let scope_path = format!("/debug/sidecarz?proxyID={id}");
    let measured = async {
        let dump = istiod.get(&dump_path).await?;
        let dump: serde_json::Value =
            serde_json::from_str(&dump).map_err(|e| shape(istiod.url(&dump_path), e))?;
        let holds = super::dump_size(&dump).ok_or_else(|| shape(istiod.url(&dump_path), "no `configs`"))?;
        let scope = istiod.get(&scope_path).await?;
        let sidecar = parse_sidecarz(istiod.url(&scope_path), &scope)?;
        Ok::<_, Error>((holds, sidecar))
    };
    match measured.await {
        Ok((holds, sidecar)) => {
            row.fenced = sidecar.is_some();
            row.sidecar = sidecar;
            row.holds = Some(holds);
        }
        Err(e) => row.error = Some(e.to_string()),
    }
    row
}

/// The report as a table.
pub fn table(r: &LiveReport) -> String {
    let mut out = format!(
        "{:<48} {:<7} {:<32} {:>9} {:>10} {:>10} {:>7} {:>12}\n",
        "proxy", "sync", "sidecar", "clusters", "endpoints", "listeners", "vhosts", "bytes"
    );
    for p in &r.proxies {
        let sidecar = p.sidecar.as_deref().unwrap_or("(none: whole mesh)");
        match &p.holds {
            Some(s) => out.push_str(&format!(
                "{:<48} {:<7} {:<32} {:>9} {:>10} {:>10} {:>7} {:>12}\n",
                p.proxy, p.sync, sidecar, s.clusters, s.endpoints, s.listeners, s.virtual_hosts, s.bytes
            )),
            None => out.push_str(&format!(
                "{:<48} {:<7} not measured: {}\n",
                p.proxy,
                p.sync,
                p.error.as_deref().unwrap_or_default()
            )),
        }
    }
    let t = &r.total;
    out.push_str(&format!(
        "mesh: {} proxies ({} scoped by a Sidecar) hold {} bytes: {} clusters, {} endpoints, {} listeners, {} virtual hosts\n",
        t.proxies, t.fenced, t.holds.bytes, t.holds.clusters, t.holds.endpoints, t.holds.listeners, t.holds.virtual_hosts
    ));
    if let Some(p) = &r.pilot {
        out.push_str(&format!("istiod since start: {}\n", pilot_line(p)));
    }
    out
}

fn pilot_line(p: &PilotMetrics) -> String {
    let pushes: Vec<String> = p.pushes.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let convergence = if p.convergences > 0.0 {
        format!("{:.3}s", p.convergence_seconds / p.convergences)
    } else {
        "-".to_string()
    };
    format!(
        "pushes {}; {} bytes in {} config pushes; mean convergence {convergence}",
        if pushes.is_empty() {
            "-".to_string()
        } else {
            pushes.join(" ")
        },
        p.pushed_bytes,
        p.sized_pushes
    )
}

/// What changed between two live reports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comparison {
    /// When the earlier report was taken.
    pub before_taken_at: Timestamp,
    /// When the later one was.
    pub after_taken_at: Timestamp,
    /// Per proxy (in either report): its bytes before and after.
    pub proxies: Vec<ProxyChange>,
    /// The mesh totals before.
    pub total_before: Totals,
    /// The mesh totals after.
    pub total_after: Totals,
    /// istiod's push counters between the two runs (both reports have them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pilot: Option<PilotMetrics>,
}

/// One proxy in a comparison.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProxyChange {
    /// The proxy.
    pub proxy: String,
    /// What it held before (none: not connected or not measured).
    pub before: Option<Size>,
    /// What it holds now.
    pub after: Option<Size>,
    /// Its Sidecar before.
    pub sidecar_before: Option<String>,
    /// Its Sidecar now.
    pub sidecar_after: Option<String>,
}

/// Compares `before` with `after`. istiod's counters are differences; a counter that went down
/// (istiod restarted between the runs) counts from 0.
pub fn compare(before: &LiveReport, after: &LiveReport) -> Comparison {
    let mut names: Vec<&str> = before
        .proxies
        .iter()
        .chain(&after.proxies)
        .map(|p| p.proxy.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    let find = |r: &LiveReport, name: &str| r.proxies.iter().find(|p| p.proxy == name).cloned();
    let proxies = names
        .into_iter()
        .map(|name| {
            let (b, a) = (find(before, name), find(after, name));
            ProxyChange {
                proxy: name.to_string(),
                before: b.as_ref().and_then(|p| p.holds),
                after: a.as_ref().and_then(|p| p.holds),
                sidecar_before: b.and_then(|p| p.sidecar),
                sidecar_after: a.and_then(|p| p.sidecar),
            }
        })
        .collect();
    let pilot = match (&before.pilot, &after.pilot) {
        (Some(b), Some(a)) => Some(pilot_delta(b, a)),
        _ => None,
    };
    Comparison {
        before_taken_at: before.taken_at,
        after_taken_at: after.taken_at,
        proxies,
        total_before: before.total,
        total_after: after.total,
        pilot,
    }
}

fn pilot_delta(b: &PilotMetrics, a: &PilotMetrics) -> PilotMetrics {
    let delta = |before: f64, after: f64| if after >= before { after - before } else { after };
    PilotMetrics {
        pushes: a
            .pushes
            .iter()
            .map(|(k, v)| (k.clone(), delta(b.pushes.get(k).copied().unwrap_or(0.0), *v)))
            .collect(),
        pushed_bytes: delta(b.pushed_bytes, a.pushed_bytes),
        sized_pushes: delta(b.sized_pushes, a.sized_pushes),
        convergence_seconds: delta(b.convergence_seconds, a.convergence_seconds),
        convergences: delta(b.convergences, a.convergences),
    }
}

fn change(before: usize, after: usize) -> String {
    if before == 0 {
        return "-".to_string();
    }
    format!("{:+.1}%", 100.0 * (after as f64 - before as f64) / before as f64)
}

/// A comparison as a table.
pub fn comparison_table(c: &Comparison) -> String {
    let mut out = format!(
        "{:<48} {:>14} {:>14} {:>8}  sidecar now\n",
        "proxy", "bytes before", "bytes now", "change"
    );
    let bytes = |s: &Option<Size>| s.map_or("-".to_string(), |s| s.bytes.to_string());
    for p in &c.proxies {
        let diff = match (p.before, p.after) {
            (Some(b), Some(a)) => change(b.bytes, a.bytes),
            _ => "-".to_string(),
        };
        out.push_str(&format!(
            "{:<48} {:>14} {:>14} {:>8}  {}\n",
            p.proxy,
            bytes(&p.before),
            bytes(&p.after),
            diff,
            p.sidecar_after.as_deref().unwrap_or("(none)")
        ));
    }
    let (b, a) = (&c.total_before, &c.total_after);
    out.push_str(&format!(
        "mesh: {} bytes before ({} proxies, {} scoped), {} now ({} proxies, {} scoped): {}; clusters {} -> {}, endpoints {} -> {}\n",
        b.holds.bytes,
        b.proxies,
        b.fenced,
        a.holds.bytes,
        a.proxies,
        a.fenced,
        change(b.holds.bytes, a.holds.bytes),
        b.holds.clusters,
        a.holds.clusters,
        b.holds.endpoints,
        a.holds.endpoints
    ));
    if let Some(p) = &c.pilot {
        out.push_str(&format!("istiod between the runs: {}\n", pilot_line(p)));
    }
    out
}

/// `lazyload report --istiod`: the text to print (the report, or with `--compare` the
/// comparison; `json` for JSON).
pub async fn run(args: &IstiodArgs, json: bool, now: Timestamp) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let report = collect(args, now).await?;
    let Some(path) = &args.compare else {
        return Ok(if json {
            serde_json::to_string_pretty(&report)? + "\n"
        } else {
            table(&report)
        });
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let before: LiveReport = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a `lazyload report --istiod --json` output",
            path.display()
        )
    })?;
    let comparison = compare(&before, &report);
    Ok(if json {
        serde_json::to_string_pretty(&comparison)? + "\n"
    } else {
        comparison_table(&comparison)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_state_per_proxy() {
        let cases = [
            (("a", "a", "", ""), "SYNCED"),
            (("a", "b", "", ""), "STALE"),
            (("a", "a", "c", "c"), "SYNCED"),
            (("", "", "", ""), "SYNCED"),
        ];
        for ((cs, ca, es, ea), want) in cases {
            let s = SyncStatus {
                cluster_sent: cs.into(),
                cluster_acked: ca.into(),
                endpoint_sent: es.into(),
                endpoint_acked: ea.into(),
                ..Default::default()
            };
            assert_eq!(s.state(), want, "{cs} {ca} {es} {ea}");
        }
    }

    #[test]
    fn sidecarz_names_the_sidecar_or_none() {
        let url = || "u".to_string();
        let default = r#"{"name":"default-sidecar","namespace":"default","sidecar":null,"version":"v"}"#;
        assert_eq!(parse_sidecarz(url(), default).unwrap(), None);
        let scoped =
            r#"{"name":"productpage","namespace":"default","sidecar":{"egress":[{"hosts":["*/a"]}]}}"#;
        assert_eq!(
            parse_sidecarz(url(), scoped).unwrap(),
            Some("default/productpage".to_string())
        );
        assert!(parse_sidecarz(url(), "[]").is_err());
    }

    #[test]
    fn pilot_metrics_from_the_exposition() {
        let text = "# TYPE pilot_xds_pushes counter\n\
            pilot_xds_pushes{type=\"cds\"} 3\n\
            pilot_xds_pushes{type=\"eds\"} 5\n\
            pilot_xds_pushes{type=\"cds_senderr\"} 1\n\
            pilot_xds_config_size_bytes_bucket{type=\"cds\",le=\"1\"} 0\n\
            pilot_xds_config_size_bytes_sum{type=\"cds\"} 1000\n\
            pilot_xds_config_size_bytes_sum{type=\"eds\"} 500\n\
            pilot_xds_config_size_bytes_count{type=\"cds\"} 3\n\
            pilot_proxy_convergence_time_sum 1.5 1700000000000\n\
            pilot_proxy_convergence_time_count 3\n";
        let m = parse_pilot_metrics(text);
        assert_eq!(
            m.pushes,
            BTreeMap::from([("cds".into(), 3.0), ("eds".into(), 5.0)])
        );
        assert_eq!((m.pushed_bytes, m.sized_pushes), (1500.0, 3.0));
        assert_eq!((m.convergence_seconds, m.convergences), (1.5, 3.0));
    }

    #[test]
    fn addresses() {
        let c = Client::new("http://localhost:15014/", None).unwrap();
        assert_eq!(c.url("/debug/syncz"), "http://localhost:15014/debug/syncz");
        let c = Client::new("http://istiod:15014/prefix", None).unwrap();
        assert_eq!(c.url("/metrics"), "http://istiod:15014/prefix/metrics");
        assert!(Client::new("https://istiod:15012", None).is_err());
        assert!(Client::new("istiod:15014", None).is_err());
    }

    #[test]
    fn a_counter_that_went_down_counts_from_zero() {
        let b = PilotMetrics {
            pushed_bytes: 100.0,
            ..Default::default()
        };
        let a = PilotMetrics {
            pushed_bytes: 40.0,
            ..Default::default()
        };
        assert_eq!(pilot_delta(&b, &a).pushed_bytes, 40.0);
    }
}
