//! The catalog of every metric family `lazyload serve` can export (`lazyload metrics`).
//!
//! `serve` registers a component's metrics only when it starts that component (the relay with
//! `--upstream`, the fence controller with a cluster, ...), so no one `/metrics` page shows them
//! all. The dashboards and alerts in `deploy/monitoring/` are checked against this catalog
//! instead: it registers every component through the component's own `register` function, so a
//! metric added there appears here without a second list to keep in step.

use std::sync::Arc;

use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::cluster::ClusterState;
use crate::config::Config;
use crate::index::ClusterIndex;

/// The prefix of every lazyload metric (`lazyload_...`).
pub const PREFIX: &str = "lazyload";

/// One metric family as Prometheus sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MetricFamily {
    /// The family name (`lazyload_relay_pushes`).
    pub name: String,
    /// `counter`, `gauge`, `histogram`, ...
    pub r#type: String,
    /// The help text.
    pub help: String,
    /// The names of the series a query can select (`lazyload_relay_pushes_total`; a histogram's
    /// `_bucket`, `_sum` and `_count`).
    pub series: Vec<String>,
}

/// Registers the metrics of every component `serve` can start into `registry`, each through the
/// function `serve` calls for it, and gives each labelled family one placeholder series: the
/// text format leaves out a family with no series, and the catalog must show them all.
pub fn register_all(registry: &mut Registry) -> Result<(), crate::config::Error> {
    use crate::index::convert::{Kind, Reason, Rejection};
    use crate::xds::metrics::{AdjustLabels, Metrics, StreamLabels};

    let relay = Metrics::default();
    relay.register(registry);
    let per_type = Metrics::type_labels("placeholder");
    for family in [
        &relay.pushes,
        &relay.push_bytes,
        &relay.nacks,
        &relay.adjusted_nacks,
    ] {
        drop(family.get_or_create(&per_type));
    }
    drop(relay.streams.get_or_create(&StreamLabels {
        protocol: "sotw",
        global_sidecar: true,
    }));
    drop(relay.adjustments.get_or_create(&AdjustLabels {
        adjustment: "placeholder",
    }));
    crate::als::collector::Metrics::register(registry);
    crate::reconcile::fences::Metrics::register(registry);
    crate::reconcile::runner::Metrics::register(registry).touch("placeholder");
    crate::reconcile::autofence::AutoFenceController::register_metrics(registry);
    crate::reconcile::config_sync::ConfigSync::register_metrics(registry);
    let config = Config::parse("")?.config;
    let state = ClusterState::new(ClusterIndex::new(&config.general.cluster_domain), []);
    state.rejections().register(registry);
    state.rejections().reject(
        None,
        Rejection {
            kind: Kind::ALL[0],
            object: "placeholder".into(),
            reason: Reason::Invalid,
            message: "placeholder".into(),
        },
    );
    crate::reconcile::scope::ScopeCheck::new(state, Arc::new(config), registry);
    Ok(())
}

/// Every metric family lazyload can export, sorted by name.
pub fn catalog() -> Result<Vec<MetricFamily>, crate::config::Error> {
    let mut registry = Registry::with_prefix(PREFIX);
    register_all(&mut registry)?;
    let mut text = String::new();
    // Writing into a String cannot fail; an empty catalog would fail the tests that use it.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    Ok(families(&text))
}

/// The families declared in a Prometheus/OpenMetrics text exposition (`# TYPE` and `# HELP`
/// lines), sorted by name.
pub fn families(exposition: &str) -> Vec<MetricFamily> {
    let mut found: std::collections::BTreeMap<String, MetricFamily> = Default::default();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# ") else {
            continue;
        };
        let mut words = rest.splitn(3, ' ');
        let (Some(kind), Some(name)) = (words.next(), words.next()) else {
            continue;
        };
        let value = words.next().unwrap_or_default().to_string();
        let family = found.entry(name.to_string()).or_insert_with(|| MetricFamily {
            name: name.to_string(),
            r#type: String::new(),
            help: String::new(),
            series: Vec::new(),
        });
        match kind {
            "TYPE" => {
                family.series = series_names(name, &value);
                family.r#type = value;
            }
            "HELP" => family.help = value,
            _ => {}
        }
    }
    found.into_values().collect()
}

/// The series names of a family of type `kind`, as the text format writes them.
fn series_names(name: &str, kind: &str) -> Vec<String> {
    let suffixed = |suffixes: &[&str]| suffixes.iter().map(|s| format!("{name}{s}")).collect();
    match kind {
        "counter" => suffixed(&["_total"]),
        "histogram" | "gaugehistogram" => suffixed(&["_bucket", "_sum", "_count"]),
        "summary" => suffixed(&["", "_sum", "_count"]),
        "info" => suffixed(&["_info"]),
        _ => vec![name.to_string()],
    }
}

/// Why a dashboard or rule file could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The file cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid JSON or YAML.
    #[error("{path} is not valid {format}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// `JSON` or `YAML`.
        format: &'static str,
        /// What the parser said.
        message: String,
    },
    /// The file holds no query at all (so the check would prove nothing).
    #[error("{path} holds no `expr`")]
    NoQuery {
        /// The file.
        path: String,
    },
}

/// The lazyload series names used in the `expr` fields of a Grafana dashboard (`.json`) or a
/// PrometheusRule (YAML, several documents allowed), sorted and deduplicated.
pub fn used_names(path: &std::path::Path) -> Result<Vec<String>, CheckError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| CheckError::Read {
        path: shown.clone(),
        source,
    })?;
    let syntax = |format, message: String| CheckError::Syntax {
        path: shown.clone(),
        format,
        message,
    };
    let docs: Vec<serde_json::Value> = if path.extension().is_some_and(|e| e == "json") {
        vec![serde_json::from_str(&text).map_err(|e| syntax("JSON", e.to_string()))?]
    } else {
        crate::yaml::documents(&text).map_err(|e| syntax("YAML", e.to_string()))?
    };
    let mut exprs = Vec::new();
    for doc in &docs {
        collect_exprs(doc, &mut exprs);
    }
    if exprs.is_empty() {
        return Err(CheckError::NoQuery { path: shown });
    }
    let mut names: Vec<String> = exprs.iter().flat_map(|e| series_in(e)).collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Every string under a key `expr`, at any depth.
fn collect_exprs<'a>(value: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The `lazyload_...` series names a PromQL expression selects.
fn series_in(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find(PREFIX) {
        let starts_word = rest[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'));
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        if starts_word && tail[PREFIX.len()..].starts_with('_') {
            names.push(tail[..len].to_string());
        }
        rest = &tail[len.max(1)..];
    }
    names
}

/// The names in `used` that no family of `catalog` exports.
pub fn unknown_names(used: &[String], catalog: &[MetricFamily]) -> Vec<String> {
    used.iter()
        .filter(|name| !catalog.iter().any(|f| f.series.contains(name)))
        .cloned()
        .collect()
}

/// The catalog as text: one series name per line, then its type and help, tab-separated.
pub fn table(families: &[MetricFamily]) -> String {
    let mut out = String::new();
    for family in families {
        for series in &family.series {
            out.push_str(&format!("{series}\t{}\t{}\n", family.r#type, family.help));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_names_follow_the_text_format() {
        let cases = [
            ("counter", vec!["m_total"]),
            ("gauge", vec!["m"]),
            ("histogram", vec!["m_bucket", "m_sum", "m_count"]),
            ("unknown", vec!["m"]),
        ];
        for (kind, want) in cases {
            assert_eq!(series_names("m", kind), want, "{kind}");
        }
    }

    #[test]
    fn the_catalog_holds_every_component() {
        let names: Vec<String> = catalog().unwrap().into_iter().map(|f| f.name).collect();
        for want in [
            "lazyload_relay_pushes",
            "lazyload_relay_nacks",
            "lazyload_relay_last_good_served",
            "lazyload_als_dropped_entries",
            "lazyload_reconcile_errors",
            "lazyload_reconcile_learn_to_apply_seconds",
            "lazyload_objects_rejected",
            "lazyload_global_sidecar_scoped",
            "lazyload_als_refused_streams",
            "lazyload_als_fences_at_host_cap",
            "lazyload_autofence_unmanaged_fences",
            "lazyload_config_mismatches",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
    }

    #[test]
    fn series_in_finds_whole_lazyload_names() {
        let cases = [
            ("sum(rate(lazyload_a_total[5m]))", vec!["lazyload_a_total"]),
            (
                "x_lazyload_b + lazyload_c{k=\"lazyload_d\"}",
                vec!["lazyload_c", "lazyload_d"],
            ),
            ("lazyloadx + up", vec![]),
            ("a / lazyload_b_bucket", vec!["lazyload_b_bucket"]),
        ];
        for (expr, want) in cases {
            assert_eq!(series_in(expr), want, "{expr}");
        }
    }

    #[test]
    fn families_reads_type_and_help() {
        let text = "# HELP a_b Things.\n# TYPE a_b counter\na_b_total 1\n# EOF\n";
        assert_eq!(
            families(text),
            vec![MetricFamily {
                name: "a_b".into(),
                r#type: "counter".into(),
                help: "Things.".into(),
                series: vec!["a_b_total".into()],
            }]
        );
    }
}
