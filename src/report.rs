//! `lazyload report`: what each fenced workload would receive under its Sidecar, compared with
//! the full config a proxy without one (the global-sidecar) receives.
//!
//! The full config is an Envoy `/config_dump?include_eds` of such a proxy. A workload's scope
//! keeps the `outbound|port|subset|host` clusters (and their endpoints) and the route virtual
//! hosts (`host:port`) whose host its Sidecar imports (`*/host`, or `ns/*` for `<svc>.<ns>.svc…`),
//! the outbound listeners that still route to something kept, and everything not tied to a
//! service (passthrough, inbound, …). Sizes are the JSON sizes of the dumped resources (the
//! proto encoding istiod sends is smaller; the ratio is what matters). This approximates istiod's
//! scoping (it ignores `exportTo` and ServiceEntry namespaces).

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Context as _;
use jiff::Timestamp;
use serde::Serialize;
use serde_json::Value;

use crate::model::evaluate;
use crate::vocab::ObjectKey;
use crate::vocab::istio::IstioVersion;

pub mod istiod;

/// Flags of `lazyload report`.
#[derive(Clone, Debug, clap::Args)]
pub struct ReportArgs {
    /// Configuration file (SlimeBoot lazyload module).
    #[arg(short, long, env = "LAZYLOAD_CONFIG")]
    pub config: Option<PathBuf>,
    /// The cluster with its ServiceFences (`kubectl get ... servicefences -A -o yaml`).
    #[arg(long, required_unless_present = "istiod", conflicts_with = "istiod")]
    pub cluster_snapshot: Option<PathBuf>,
    /// Envoy config dump(s) of a proxy with the full config (`/config_dump?include_eds`).
    #[arg(long, required_unless_present = "istiod", conflicts_with = "istiod")]
    pub config_dump: Vec<PathBuf>,
    /// Measure a live mesh through istiod's debug endpoints instead (see [`istiod`]).
    #[command(flatten)]
    pub live: istiod::IstiodArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Resource counts and bytes of one config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Size {
    /// Clusters.
    pub clusters: usize,
    /// Endpoints (load assignments' hosts).
    pub endpoints: usize,
    /// Listeners.
    pub listeners: usize,
    /// Route virtual hosts.
    pub virtual_hosts: usize,
    /// JSON bytes of all of it.
    pub bytes: usize,
}

/// One fenced workload's row.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// `namespace/name` of the fence.
    pub fence: String,
    /// What its Sidecar scope keeps.
    pub scoped: Size,
    /// Share of the full config's bytes it no longer receives (0..1).
    pub saved: f64,
}

/// The report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The full config.
    pub full: Size,
    /// One row per fence with a Sidecar.
    pub workloads: Vec<Row>,
    /// Bytes all fenced workloads receive: full config vs scoped.
    pub total_full_bytes: usize,
    /// Bytes all fenced workloads receive under their Sidecars.
    pub total_scoped_bytes: usize,
    /// Snapshot objects skipped because they could not be read, each saying which and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<String>,
}

/// The resources of a config dump.
#[derive(Debug, Default)]
struct Dump {
    clusters: Vec<Value>,
    endpoints: Vec<Value>,
    listeners: Vec<Value>,
    routes: Vec<Value>,
}

fn load(paths: &[PathBuf]) -> anyhow::Result<Dump> {
    let mut dump = Dump::default();
    for p in paths {
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", p.display()))?;
        read_dump(&v, &mut dump)
            .with_context(|| format!("{} is not an Envoy config dump (no `configs`)", p.display()))?;
    }
    Ok(dump)
}

/// Adds the dynamic resources of config dump `v` (Envoy's `/config_dump`, or istiod's
/// `/debug/config_dump`, which has the same shape) to `dump`; `None` if `v` has no `configs`.
fn read_dump(v: &Value, dump: &mut Dump) -> Option<()> {
    for c in v["configs"].as_array()? {
        let pick = |list: &str, path: &[&str]| -> Vec<Value> {
            c[list]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| path.iter().try_fold(e, |acc, k| acc.get(*k)).cloned())
                .collect()
        };
        dump.clusters
            .extend(pick("dynamic_active_clusters", &["cluster"]));
        dump.endpoints
            .extend(pick("dynamic_endpoint_configs", &["endpoint_config"]));
        dump.listeners
            .extend(pick("dynamic_listeners", &["active_state", "listener"]));
        dump.routes
            .extend(pick("dynamic_route_configs", &["route_config"]));
    }
    Some(())
}

/// The resource counts and bytes of one config dump; `None` if it is not one.
pub fn dump_size(v: &Value) -> Option<Size> {
    let mut dump = Dump::default();
    read_dump(v, &mut dump)?;
    Some(size(&dump, None))
}

/// Whether a Sidecar with `hosts` imports service host `host`.
fn imports(hosts: &[String], host: &str) -> bool {
    let ns = host.split('.').nth(1).filter(|_| host.contains(".svc."));
    hosts.iter().any(|h| match h.split_once('/') {
        Some(("*", name)) => name == host || name.strip_prefix('*').is_some_and(|s| host.ends_with(s)),
        Some((n, "*")) => Some(n) == ns,
        Some((n, name)) => name == host && Some(n) == ns,
        None => false,
    })
}

/// The service host of an `outbound|port|subset|host` cluster.
fn cluster_host(name: &str) -> Option<&str> {
    let mut parts = name.split('|');
    (parts.next() == Some("outbound")).then(|| parts.nth(2)).flatten()
}

fn json_len(v: &Value) -> usize {
    serde_json::to_vec(v).map_or(0, |b| b.len())
}

fn endpoints_of(cla: &Value) -> usize {
    cla["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| l["lb_endpoints"].as_array().map_or(0, Vec::len))
        .sum()
}

/// Sizes of the dump under a Sidecar importing `hosts` (`None`: everything).
fn size(dump: &Dump, hosts: Option<&[String]>) -> Size {
    let keep_host = |h: Option<&str>| match (h, hosts) {
        (None, _) | (_, None) => true,
        (Some(h), Some(hosts)) => imports(hosts, h),
    };
    let mut s = Size::default();
    let mut kept_clusters = BTreeSet::new();
    for c in &dump.clusters {
        let name = c["name"].as_str().unwrap_or_default();
        if keep_host(cluster_host(name)) {
            kept_clusters.insert(name.to_string());
            s.clusters += 1;
            s.bytes += json_len(c);
        }
    }
    for e in &dump.endpoints {
        if kept_clusters.contains(e["cluster_name"].as_str().unwrap_or_default()) {
            s.endpoints += endpoints_of(e);
            s.bytes += json_len(e);
        }
    }
    let mut kept_routes = BTreeSet::new();
    for rc in &dump.routes {
        let vhosts: Vec<&Value> = rc["virtual_hosts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| {
                let name = v["name"].as_str().unwrap_or_default();
                let host = name.rsplit_once(':').map(|(h, _)| h).filter(|h| h.contains('.'));
                keep_host(host)
            })
            .collect();
        if vhosts.iter().any(|v| {
            !v["domains"]
                .as_array()
                .is_some_and(|d| d.contains(&Value::from("*")))
        }) {
            kept_routes.insert(rc["name"].as_str().unwrap_or_default().to_string());
        }
        s.virtual_hosts += vhosts.len();
        s.bytes += vhosts.iter().map(|v| json_len(v)).sum::<usize>();
    }
    for l in &dump.listeners {
        let text = l.to_string();
        let outbound = l["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("0.0.0.0_") || n.contains('_') && !n.starts_with("virtual"));
        let keep = hosts.is_none()
            || !outbound
            || kept_routes
                .iter()
                .any(|r| text.contains(&format!("\"route_config_name\":\"{r}\"")))
            || kept_clusters
                .iter()
                .any(|c| cluster_host(c).is_some() && text.contains(&format!("\"{c}\"")));
        if keep {
            s.listeners += 1;
            s.bytes += text.len();
        }
    }
    s
}

/// Builds the report.
pub fn run(args: &ReportArgs, now: Timestamp) -> anyhow::Result<Report> {
    let snapshot = args
        .cluster_snapshot
        .as_ref()
        .context("--cluster-snapshot is required without --istiod")?;
    let (config, snap) = crate::inputs::config_and_snapshot(args.config.as_deref(), snapshot)?;
    let dump = load(&args.config_dump)?;
    let full = size(&dump, None);
    let mut workloads = Vec::new();
    for fence in &snap.fences {
        let eval = evaluate(fence, &snap.index, &config, now, IstioVersion::default());
        let Some(hosts) = eval.sidecar_hosts() else {
            continue;
        };
        let scoped = size(&dump, Some(hosts));
        workloads.push(Row {
            fence: ObjectKey::of_or_empty(&fence.metadata).to_string(),
            saved: 1.0 - scoped.bytes as f64 / full.bytes.max(1) as f64,
            scoped,
        });
    }
    Ok(Report {
        total_full_bytes: full.bytes * workloads.len(),
        total_scoped_bytes: workloads.iter().map(|w| w.scoped.bytes).sum(),
        full,
        workloads,
        rejected: snap.rejected.iter().map(ToString::to_string).collect(),
    })
}

/// The report as a table.
pub fn table(r: &Report) -> String {
    let mut out = format!(
        "{:<40} {:>9} {:>10} {:>10} {:>7} {:>12} {:>7}\n",
        "workload", "clusters", "endpoints", "listeners", "vhosts", "bytes", "saved"
    );
    out.push_str(&format!(
        "{:<40} {:>9} {:>10} {:>10} {:>7} {:>12} {:>7}\n",
        "(full config)",
        r.full.clusters,
        r.full.endpoints,
        r.full.listeners,
        r.full.virtual_hosts,
        r.full.bytes,
        "-"
    ));
    for w in &r.workloads {
        let s = &w.scoped;
        out.push_str(&format!(
            "{:<40} {:>9} {:>10} {:>10} {:>7} {:>12} {:>6.1}%\n",
            w.fence,
            s.clusters,
            s.endpoints,
            s.listeners,
            s.virtual_hosts,
            s.bytes,
            w.saved * 100.0
        ));
    }
    out.push_str(&format!(
        "mesh: {} fenced workloads receive {} bytes instead of {} ({:.1}% less)\n",
        r.workloads.len(),
        r.total_scoped_bytes,
        r.total_full_bytes,
        100.0 * (1.0 - r.total_scoped_bytes as f64 / r.total_full_bytes.max(1) as f64)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_host_matching() {
        let hosts: Vec<String> = ["*/details.default.svc.cluster.local", "test/*", "*/*.example.com"]
            .map(String::from)
            .into();
        assert!(imports(&hosts, "details.default.svc.cluster.local"));
        assert!(imports(&hosts, "anything.test.svc.cluster.local"));
        assert!(imports(&hosts, "api.example.com"));
        assert!(!imports(&hosts, "reviews.default.svc.cluster.local"));
        assert_eq!(
            cluster_host("outbound|9080|v1|reviews.default.svc.cluster.local"),
            Some("reviews.default.svc.cluster.local")
        );
        assert_eq!(cluster_host("PassthroughCluster"), None);
    }
}
