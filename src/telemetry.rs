//! Logging: `tracing` with a `RUST_LOG`-style filter, as text or JSON, to standard error or, with
//! Slime's `logRotate`, to a rotated file ([`rotate`]); and the one way components register their
//! metric families ([`register_families`]).

pub mod rotate;

use std::sync::Mutex;

use anyhow::Context as _;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Metric, Registry};
use tracing_subscriber::EnvFilter;

use crate::config::Log;

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. `RUST_LOG`, when set, wins over the configured level.
pub fn init(log: &Log, format: LogFormat) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => EnvFilter::try_new(env)?,
        _ => EnvFilter::try_new(&log.log_level)?,
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let result = if log.log_rotate {
        let file = rotate::RotatingFile::open(&log.log_rotate_config)
            .with_context(|| format!("opening the log file {}", log.log_rotate_config.file_path))?;
        let builder = builder.with_ansi(false).with_writer(Mutex::new(file));
        match format {
            LogFormat::Text => builder.try_init(),
            LogFormat::Json => builder.json().try_init(),
        }
    } else {
        let builder = builder.with_writer(std::io::stderr);
        match format {
            LogFormat::Text => builder.try_init(),
            LogFormat::Json => builder.json().try_init(),
        }
    };
    result.map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
}

/// One metric family to register: its name below the registry's prefix, its help text and the
/// metric (a clone sharing the series with the one the code updates).
pub type Family = (&'static str, &'static str, Box<dyn Metric>);

/// Registers each of `families` under `registry` with the name prefix `prefix` (`prefix_name`),
/// so that a component's metrics read as one table of names and help texts.
pub fn register_families(registry: &mut Registry, prefix: &str, families: Vec<Family>) {
    let r = registry.sub_registry_with_prefix(prefix);
    for (name, help, metric) in families {
        r.register(name, help, Registered(metric));
    }
}

/// A boxed metric the registry can hold (it takes metrics by value, of one sized type).
#[derive(Debug)]
struct Registered(Box<dyn Metric>);

impl EncodeMetric for Registered {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
