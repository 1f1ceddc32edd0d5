//! `lazyload generate`: ServiceFence and Sidecar manifests from a cluster snapshot and access logs,
//! for review (GitOps) instead of writes to the API server. The same model and attribution code as
//! `serve`; a directory is the sink.
//!
//! Access logs are Envoy JSON access logs, one object per line, with Istio's JSON format keys
//! (`downstream_remote_address`, `authority`, `upstream_cluster`, `user_agent`, `path`) and,
//! when the format logs them, `slime_orig_dest` / `slime_source_ns`. Lines that are not such
//! objects are counted and skipped. A Prometheus export (a `/api/v1/query` JSON result over
//! Istio's request metrics) is the other input: one dependency per series.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use jiff::Timestamp;
use serde_json::Value;

use crate::als::attribute::{Attributor, Hosts};
use crate::als::entry::{Entry, Kind, parse_ip};
use crate::cluster::ClusterState;
use crate::config::Config;
use crate::index::ClusterIndex;
use crate::inputs;
use crate::learn::Edge;
use crate::learn::sink::{FenceSink, Target};
use crate::learn::status::apply_edges;
use crate::manifests;
use crate::model::autofence::{Action, decide};
use crate::model::scope::{Scoped, scoped_global_sidecars};
use crate::model::sidecar::is_fence_controlled;
use crate::vocab::ObjectKey;
use crate::vocab::fence::ServiceFence;
use crate::vocab::host::host_name;

/// Flags of `lazyload generate`.
#[derive(Clone, Debug, clap::Args)]
pub struct GenerateArgs {
    /// Configuration file (SlimeBoot lazyload module); `general.autoFence` and `defaultFence`
    /// decide which Services get a fence besides the snapshot's own fences.
    #[arg(short, long, env = "LAZYLOAD_CONFIG")]
    pub config: Option<PathBuf>,
    /// The cluster: `kubectl get ns,svc,pods,virtualservices,serviceentries,servicefences,sidecars -A -o yaml`.
    #[arg(long)]
    pub cluster_snapshot: PathBuf,
    /// Envoy JSON access logs (repeatable).
    #[arg(long)]
    pub access_log: Vec<PathBuf>,
    /// Prometheus query results (repeatable): the JSON `/api/v1/query` returns for Istio's
    /// request metrics, e.g. `sum by (source_app, source_workload_namespace,
    /// destination_service) (istio_requests_total{reporter="source"})`. Each series with a
    /// non-zero value is a dependency of the fence `<source_workload_namespace>/<source_app>`
    /// (Slime's `$namespace` / `$source_app`) on `destination_service`.
    #[arg(long)]
    pub prometheus_export: Vec<PathBuf>,
    /// Directory the manifests are written to (`<namespace>/<name>.{servicefence,sidecar}.yaml`).
    #[arg(long)]
    pub out: PathBuf,
}

/// What a run produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Fences written.
    pub fences: usize,
    /// Sidecars written.
    pub sidecars: usize,
    /// `to-global-sidecar` EnvoyFilters written.
    pub envoyfilters: usize,
    /// Global-sidecar Services (their ports, for a server-side apply) written.
    pub services: usize,
    /// The wormhole ports they cover.
    pub wormhole_ports: Vec<u16>,
    /// Dependencies learned from the logs.
    pub edges: usize,
    /// Log lines and Prometheus series that named a dependency.
    pub attributed: usize,
    /// Log lines skipped, by reason.
    pub skipped: BTreeMap<String, usize>,
    /// Snapshot objects skipped because they could not be read, each saying which and why.
    pub rejected: Vec<String>,
    /// Sidecars of the snapshot that scope a global-sidecar (A8): each one breaks the fallback.
    pub scoped: Vec<Scoped>,
}

/// Runs `generate`.
pub fn run(args: &GenerateArgs, now: Timestamp) -> anyhow::Result<Summary> {
    let (config, snap) = inputs::config_and_snapshot(args.config.as_deref(), &args.cluster_snapshot)?;
    let mut summary = Summary {
        scoped: scoped_global_sidecars(
            &config,
            &snap.index,
            snap.sidecars.iter().filter(|s| !is_fence_controlled(s)),
        ),
        rejected: snap.rejected.iter().map(ToString::to_string).collect(),
        ..Default::default()
    };
    let fences = wanted_fences(snap.fences, &snap.index, &config);
    let attributor = Attributor::new(&config);
    let mut edges: Vec<Edge> = Vec::new();
    for path in &args.access_log {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        edges.extend(access_log_edges(
            &bytes,
            &attributor,
            &snap.index,
            now,
            &mut summary,
        ));
    }
    for path in &args.prometheus_export {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let found = prometheus_edges(&text, now, &mut summary)
            .with_context(|| format!("{} is not a Prometheus query result", path.display()))?;
        edges.extend(found);
    }
    edges.sort_by(|a, b| (&a.fence, &a.host).cmp(&(&b.fence, &b.host)));
    edges.dedup_by(|a, b| a.fence == b.fence && a.host == b.host);
    summary.edges = edges.len();

    let keys: Vec<ObjectKey> = fences.keys().cloned().collect();
    let state = ClusterState::new(snap.index, fences.into_values());
    let sink = FenceSink::new(
        state,
        Arc::new(config),
        Target::Directory {
            dir: args.out.clone(),
            ready: None,
        },
    );
    for key in &keys {
        let learned = edges.iter().filter(|e| &e.fence == key);
        if let Some(written) = sink.apply(key, |status| apply_edges(status, learned, now), now)? {
            summary.fences += 1;
            summary.sidecars += usize::from(written.sidecar.is_ok());
        }
    }
    write_fallback(&args.out, sink.config(), &sink.state().index(), &mut summary)?;
    Ok(summary)
}

/// The snapshot's fences and those `general.autoFence` and `defaultFence` give its Services and
/// workloads, by key.
fn wanted_fences(
    snapshot: Vec<ServiceFence>,
    index: &ClusterIndex,
    config: &Config,
) -> BTreeMap<ObjectKey, ServiceFence> {
    let mut fences: BTreeMap<ObjectKey, ServiceFence> = BTreeMap::new();
    for f in snapshot {
        if let Ok(key) = ObjectKey::of(&f.metadata) {
            fences.insert(key, f);
        }
    }
    let mut services: Vec<ObjectKey> = index.services().map(|s| s.key.clone()).collect();
    services.extend(crate::model::autofence::wanted_workload_fences(index, config));
    for key in services {
        if let Action::Create(f) = decide(&key, fences.get(&key), index, config) {
            fences.insert(key, *f);
        }
    }
    fences
}

/// The dependencies in Envoy JSON access logs `bytes`; lines that are not such objects or name
/// no dependency are counted as skipped.
fn access_log_edges(
    bytes: &[u8],
    attributor: &Attributor,
    index: &ClusterIndex,
    now: Timestamp,
    summary: &mut Summary,
) -> Vec<Edge> {
    let mut edges = Vec::new();
    let mut hosts = Hosts::default();
    // Line by line as bytes: one line that is not UTF-8 (or not a JSON object) is counted and
    // skipped, not the whole file.
    for line in bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.trim_ascii().is_empty())
    {
        let Ok(v @ Value::Object(_)) = serde_json::from_slice::<Value>(line) else {
            *summary.skipped.entry("not_json".into()).or_default() += 1;
            continue;
        };
        let field = |k: &str| v.get(k).and_then(Value::as_str);
        let entry = Entry {
            kind: Kind::Http,
            source: field("downstream_remote_address").and_then(parse_ip),
            peer_identity: None,
            upstream_cluster: field("upstream_cluster").unwrap_or_default(),
            authority: field("authority").unwrap_or_default(),
            orig_dest: field("slime_orig_dest"),
            source_ns: field("slime_source_ns"),
            user_agent: field("user_agent").unwrap_or_default(),
            path: field("path").unwrap_or_default(),
        };
        match attributor.attribute(index, &entry, &mut hosts) {
            Ok(sources) => {
                summary.attributed += 1;
                for fence in sources {
                    edges.extend(hosts.iter().map(|h| Edge {
                        fence: fence.clone(),
                        host: h.to_string(),
                        seen: now,
                    }));
                }
            }
            Err(why) => *summary.skipped.entry(why.as_str().into()).or_default() += 1,
        }
    }
    edges
}

/// The fallback: what the fallback controller applies to a cluster with no EnvoyFilter yet.
fn write_fallback(
    out: &Path,
    config: &Config,
    index: &ClusterIndex,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let ports = crate::model::fallback::wormhole_ports(config, index, &Default::default());
    let desired = crate::reconcile::fallback::desired(config, &ports);
    for ef in &desired.envoyfilters {
        manifests::write(out, &ObjectKey::of_or_empty(&ef.metadata), "envoyfilter", ef)?;
        summary.envoyfilters += 1;
    }
    for dr in &desired.destination_rules {
        manifests::write(out, &ObjectKey::of_or_empty(&dr.metadata), "destinationrule", dr)?;
    }
    for svc in &desired.services {
        let field = |k: &str| svc["metadata"][k].as_str().unwrap_or_default().to_string();
        manifests::write(
            out,
            &ObjectKey::new(field("namespace"), field("name")),
            "service",
            svc,
        )?;
        summary.services += 1;
    }
    summary.wormhole_ports = ports.into_iter().collect();
    Ok(())
}

/// The dependencies in a Prometheus `/api/v1/query` result (a vector); series that name no
/// fence or no valid destination, or whose value is zero, are counted as skipped.
fn prometheus_edges(text: &str, now: Timestamp, summary: &mut Summary) -> anyhow::Result<Vec<Edge>> {
    let v: Value = serde_json::from_str(text).context("not JSON")?;
    if v["status"].as_str().is_some_and(|s| s != "success") {
        anyhow::bail!(
            "the query failed: {}",
            v["error"].as_str().unwrap_or("no error message")
        );
    }
    let results = v["data"]["result"].as_array().context("no `data.result` list")?;
    let mut edges = Vec::new();
    for r in results {
        let label = |k: &str| {
            r["metric"][k]
                .as_str()
                .filter(|s| !s.is_empty() && *s != "unknown")
        };
        let value = r["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        let fence = match (label("source_workload_namespace"), label("source_app")) {
            (Some(ns), Some(app)) => ObjectKey::new(ns, app),
            _ => {
                *summary.skipped.entry("prometheus_no_source".into()).or_default() += 1;
                continue;
            }
        };
        let Some(host) = label("destination_service").and_then(|h| host_name(h).ok()) else {
            *summary
                .skipped
                .entry("prometheus_invalid_destination".into())
                .or_default() += 1;
            continue;
        };
        if value > 0.0 {
            summary.attributed += 1;
            edges.push(Edge {
                fence,
                host,
                seen: now,
            });
        } else {
            *summary.skipped.entry("prometheus_zero".into()).or_default() += 1;
        }
    }
    Ok(edges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_series_become_edges() {
        let text = r#"{"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"source_app": "productpage", "source_workload_namespace": "default",
                        "destination_service": "details.default.svc.cluster.local"}, "value": [1.7e9, "12"]},
            {"metric": {"source_app": "productpage", "source_workload_namespace": "default",
                        "destination_service": "reviews.default.svc.cluster.local"}, "value": [1.7e9, "0"]},
            {"metric": {"source_app": "unknown", "source_workload_namespace": "default",
                        "destination_service": "details.default.svc.cluster.local"}, "value": [1.7e9, "3"]},
            {"metric": {"source_app": "reviews", "source_workload_namespace": "default",
                        "destination_service": "10.96.0.1:9080"}, "value": [1.7e9, "3"]},
            {"metric": {}, "value": "garbage"}
        ]}}"#;
        let now = Timestamp::UNIX_EPOCH;
        let mut summary = Summary::default();
        let edges = prometheus_edges(text, now, &mut summary).unwrap();
        assert_eq!(
            edges,
            [Edge {
                fence: ObjectKey::new("default", "productpage"),
                host: "details.default.svc.cluster.local".into(),
                seen: now,
            }]
        );
        assert_eq!(summary.attributed, 1);
        assert_eq!(summary.skipped["prometheus_zero"], 1);
        assert_eq!(summary.skipped["prometheus_no_source"], 2);
        assert_eq!(summary.skipped["prometheus_invalid_destination"], 1);
    }

    #[test]
    fn a_failed_or_foreign_export_is_an_error() {
        let mut summary = Summary::default();
        let now = Timestamp::UNIX_EPOCH;
        for text in [
            "not json",
            r#"{"status": "error", "error": "bad query"}"#,
            r#"{"status": "success", "data": {"resultType": "scalar", "result": [1, "2"]}}"#,
            r#"{"configs": []}"#,
        ] {
            let err = prometheus_edges(text, now, &mut summary);
            assert!(
                err.is_err() || err.as_ref().is_ok_and(|e| e.is_empty()),
                "{text}: {err:?}"
            );
        }
        let err =
            prometheus_edges(r#"{"status": "error", "error": "bad query"}"#, now, &mut summary).unwrap_err();
        assert!(err.to_string().contains("bad query"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn any_export_is_an_error_or_edges(text in ".{0,200}", value in ".{0,12}", dest in ".{0,40}") {
            let mut summary = Summary::default();
            let _ = prometheus_edges(&text, Timestamp::UNIX_EPOCH, &mut summary);
            let shaped = serde_json::json!({"status": "success", "data": {"result": [
                {"metric": {"source_app": "a", "source_workload_namespace": "n", "destination_service": dest},
                 "value": [0, value]}]}});
            let edges = prometheus_edges(&shaped.to_string(), Timestamp::UNIX_EPOCH, &mut summary).unwrap();
            proptest::prop_assert!(edges.iter().all(|e| host_name(&e.host).is_ok()));
        }
    }
}
