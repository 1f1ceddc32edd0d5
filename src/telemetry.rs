//! Logging: `tracing` with a `RUST_LOG`-style filter, as text or JSON, to standard error or, with
//! Slime's `logRotate`, to a rotated file ([`rotate`]).

pub mod rotate;

use std::sync::Mutex;

use anyhow::Context as _;
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
