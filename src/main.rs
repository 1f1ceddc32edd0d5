//! The `lazyload` command.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use lazyload::config::Config;
use lazyload::model::fence::ServiceFence;
use lazyload::serve::ServeArgs;

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
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(lazyload::serve::run(*args))?;
        }
        Command::Generate(args) => {
            let summary = lazyload::generate::run(&args, jiff::Timestamp::now())?;
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
        }
        Command::Report(args) if args.live.istiod.is_some() => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let now = jiff::Timestamp::now();
            print!(
                "{}",
                runtime.block_on(lazyload::report::istiod::run(&args.live, args.json, now))?
            );
        }
        Command::Report(args) => {
            let report = lazyload::report::run(&args, jiff::Timestamp::now())?;
            for rejected in &report.rejected {
                eprintln!("warning: {rejected}");
            }
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).context("printing the report")?
                );
            } else {
                print!("{}", lazyload::report::table(&report));
            }
        }
        Command::Explain(args) => {
            let explanation = lazyload::explain::run(&args, jiff::Timestamp::now())?;
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&explanation).context("printing the explanation")?
                );
            } else {
                print!("{}", lazyload::explain::text(&explanation));
            }
        }
        Command::Demo(args) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            // On a signal the demo is dropped, which stops what it started (Envoy included).
            let mut say = |line: &str| eprintln!("{line}");
            let outcome = runtime.block_on(async {
                tokio::select! {
                    outcome = lazyload::demo::run(&args, jiff::Timestamp::now(), &mut say) => outcome,
                    signal = lazyload::serve::shutdown_signal() => Err(anyhow::anyhow!("{signal}: demo stopped")),
                }
            })?;
            print!("{}", lazyload::demo::summary(&outcome));
        }
        Command::Metrics { json, check } => {
            let catalog = lazyload::metrics::catalog()?;
            if !check.is_empty() {
                return check_metric_names(&check, &catalog);
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&catalog).context("printing the catalog")?
                );
            } else {
                print!("{}", lazyload::metrics::table(&catalog));
            }
        }
        Command::Crd => {
            print!("{}", crd_yaml()?);
        }
        Command::CheckConfig { config } => {
            let loaded = Config::load(&config)?;
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            print!(
                "{}",
                lazyload::yaml::to_string(&loaded.config).context("printing the config")?
            );
        }
    }
    Ok(())
}

/// `lazyload metrics --check`: fails naming each file's unknown metrics.
fn check_metric_names(files: &[PathBuf], catalog: &[lazyload::metrics::MetricFamily]) -> anyhow::Result<()> {
    let mut failed = false;
    for file in files {
        let used = lazyload::metrics::used_names(file)?;
        let unknown = lazyload::metrics::unknown_names(&used, catalog);
        if unknown.is_empty() {
            println!("ok: {}: {} metrics, all exported", file.display(), used.len());
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
