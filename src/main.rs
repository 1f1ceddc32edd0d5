//! The `lazyload` command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use lazyload::config::Config;
use lazyload::serve::ServeArgs;
use lazyload::vocab::fence::ServiceFence;

/// lazyload: Istio Sidecars learned from live traffic (Slime lazyload, in Rust).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the ServiceFence CustomResourceDefinition as YAML.
    Crd,
    /// Run lazyload: the admin endpoint and every enabled component.
    Serve(Box<ServeArgs>),
    /// Write ServiceFence and Sidecar manifests from a cluster snapshot and access logs.
    Generate(lazyload::generate::GenerateArgs),
    /// Compare the full config with what each fenced workload's Sidecar scope keeps.
    Report(lazyload::report::ReportArgs),
    /// Explain a workload's Sidecar: each host and why, what expired or was refused.
    Explain(lazyload::explain::ExplainArgs),
    /// Learn Sidecars for a built-in sample mesh and show how much smaller each proxy's config is.
    Demo(lazyload::demo::DemoArgs),
    /// List every metric family lazyload can export (series name, type, help; `--json` for more).
    Metrics {
        /// Print JSON instead of tab-separated lines.
        #[arg(long)]
        json: bool,
        /// Instead: check that every lazyload metric the `expr` fields of these Grafana
        /// dashboards (.json) or PrometheusRules (YAML) use exists.
        #[arg(long, num_args = 1..)]
        check: Vec<PathBuf>,
    },
    /// Load a configuration file, report problems, and print the effective settings.
    CheckConfig {
        /// A SlimeBoot lazyload module entry, or a whole SlimeBoot.
        #[arg(short, long, env = "LAZYLOAD_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`lazyload metrics | head`): what it wanted it got.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => runtime()?.block_on(lazyload::serve::run(*args)),
        Command::Generate(args) => generate(&args),
        Command::Report(args) => report(&args),
        Command::Explain(args) => explain(&args),
        Command::Demo(args) => demo(&args),
        Command::Metrics { json, check } => metrics(json, &check),
        Command::Crd => {
            out(crd_yaml()?)?;
            Ok(())
        }
        Command::CheckConfig { config } => check_config(&config),
    }
}

/// Writes `text` to standard output. Unlike `print!`, which panics when the reader closed the
/// pipe, this returns the error, so `main` can end quietly.
fn out(text: impl std::fmt::Display) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .context("writing to standard output")
}

/// Whether `error` is a write into a pipe whose reader has gone.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The async runtime of the commands that need one.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the async runtime")
}

/// `lazyload generate`: writes the manifests and says what it wrote.
fn generate(args: &lazyload::generate::GenerateArgs) -> anyhow::Result<()> {
    let summary = lazyload::generate::run(args, jiff::Timestamp::now())?;
    eprintln!(
        "wrote {} fences and {} Sidecars to {} ({} dependencies from {} log lines and series; skipped: {:?})",
        summary.fences,
        summary.sidecars,
        args.out.display(),
        summary.edges,
        summary.attributed,
        summary.skipped
    );
    eprintln!(
        "wrote {} to-global-sidecar EnvoyFilters and {} global-sidecar Service port lists (wormhole ports {:?})",
        summary.envoyfilters, summary.services, summary.wormhole_ports
    );
    for rejected in &summary.rejected {
        eprintln!("warning: {rejected}");
    }
    for scoped in &summary.scoped {
        eprintln!("warning: {scoped}");
    }
    Ok(())
}

/// `lazyload report`: from a live istiod, or from a snapshot and config dumps.
fn report(args: &lazyload::report::ReportArgs) -> anyhow::Result<()> {
    let now = jiff::Timestamp::now();
    if args.live.istiod.is_some() {
        let text = runtime()?.block_on(lazyload::report::istiod::run(&args.live, args.json, now))?;
        out(text)?;
        return Ok(());
    }
    let report = lazyload::report::run(args, now)?;
    for rejected in &report.rejected {
        eprintln!("warning: {rejected}");
    }
    if args.json {
        out(format_args!(
            "{}\n",
            serde_json::to_string_pretty(&report).context("printing the report")?
        ))?;
    } else {
        out(lazyload::report::table(&report))?;
    }
    Ok(())
}

/// `lazyload explain`.
fn explain(args: &lazyload::explain::ExplainArgs) -> anyhow::Result<()> {
    let explanation = lazyload::explain::run(args, jiff::Timestamp::now())?;
    if args.json {
        out(format_args!(
            "{}\n",
            serde_json::to_string_pretty(&explanation).context("printing the explanation")?
        ))?;
    } else {
        out(lazyload::explain::text(&explanation))?;
    }
    Ok(())
}

/// `lazyload demo`: on a signal the demo is dropped, which stops what it started (Envoy included).
fn demo(args: &lazyload::demo::DemoArgs) -> anyhow::Result<()> {
    let mut say = |line: &str| eprintln!("{line}");
    let outcome = runtime()?.block_on(async {
        tokio::select! {
            outcome = lazyload::demo::run(args, jiff::Timestamp::now(), &mut say) => outcome,
            signal = lazyload::serve::shutdown_signal() => Err(anyhow::anyhow!("{signal}: demo stopped")),
        }
    })?;
    out(lazyload::demo::summary(&outcome))?;
    Ok(())
}

/// `lazyload metrics`: the catalog, or `--check` of dashboards and rules.
fn metrics(json: bool, check: &[PathBuf]) -> anyhow::Result<()> {
    let catalog = lazyload::metrics::catalog()?;
    if !check.is_empty() {
        return check_metric_names(check, &catalog);
    }
    if json {
        out(format_args!(
            "{}\n",
            serde_json::to_string_pretty(&catalog).context("printing the catalog")?
        ))?;
    } else {
        out(lazyload::metrics::table(&catalog))?;
    }
    Ok(())
}

/// `lazyload check-config`: the warnings, then the effective settings.
fn check_config(path: &Path) -> anyhow::Result<()> {
    let loaded = Config::load(path)?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    out(lazyload::yaml::to_string(&loaded.config).context("printing the config")?)?;
    Ok(())
}

/// `lazyload metrics --check`: fails naming each file's unknown metrics.
fn check_metric_names(files: &[PathBuf], catalog: &[lazyload::metrics::MetricFamily]) -> anyhow::Result<()> {
    let mut failed = false;
    for file in files {
        let used = lazyload::metrics::used_names(file)?;
        let unknown = lazyload::metrics::unknown_names(&used, catalog);
        if unknown.is_empty() {
            out(format_args!(
                "ok: {}: {} metrics, all exported\n",
                file.display(),
                used.len()
            ))?;
        } else {
            failed = true;
            eprintln!(
                "{}: not exported by lazyload: {}",
                file.display(),
                unknown.join(", ")
            );
        }
    }
    anyhow::ensure!(!failed, "unknown metrics (see `lazyload metrics` for the names)");
    Ok(())
}

/// The CRD as YAML, exactly as `crds/servicefence.yaml` holds it.
fn crd_yaml() -> anyhow::Result<String> {
    let yaml = lazyload::yaml::to_string(&ServiceFence::definition()).context("serialising the CRD")?;
    Ok(format!("# Generated by `lazyload crd`; do not edit.\n{yaml}"))
}
