//! Configurations Slime users already have load as they are (`tests/fixtures/config/`, copied
//! from the Slime lazyload documentation), through the `check-config` command.

use std::path::{Path, PathBuf};
use std::process::Command;

use lazyload::config::{Config, GlobalSidecarMode, HandlerType, MetricSourceType};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

fn load(name: &str) -> (Config, Vec<String>) {
    let loaded = Config::load(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    (loaded.config, loaded.warnings)
}

#[test]
fn cluster_accesslog_slimeboot() {
    let (c, warnings) = load("slimeboot-cluster-accesslog.yaml");
    assert_eq!(c.general.wormhole_port, [9080].into());
    assert_eq!(c.general.global_sidecar_mode, GlobalSidecarMode::Cluster);
    assert_eq!(c.general.metric_source_type, MetricSourceType::Accesslog);
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn cluster_prometheus_module_list() {
    let (c, _) = load("module-cluster-prometheus.yaml");
    let p = c.prometheus.expect("prometheus source");
    assert_eq!(p.address, "http://prometheus.istio-system:9090");
    assert_eq!(p.handlers["destination"].kind, HandlerType::Group);
    assert!(p.handlers["destination"].query.contains("$source_app"));
}

#[test]
fn namespace_mode_module() {
    let (c, _) = load("module-namespace-accesslog.yaml");
    assert_eq!(c.general.namespace, vec!["default"]);
}

#[test]
fn dispatches_module() {
    // The tutorial's templated cluster (Slime rendered it against its values) is refused by name;
    // with a value written in its place, the rest loads.
    let e = Config::load(&fixture("module-dispatches.yaml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("general.dispatches[1].cluster: invalid value") && e.contains("Helm template"),
        "{e}"
    );
    let text = std::fs::read_to_string(fixture("module-dispatches.yaml"))
        .unwrap()
        .replace(
            r#"'{{ (print .Values.foo "." .Values.namespace ) }}'"#,
            "outbound|80||baidu.testns.svc.cluster.local",
        );
    let c = Config::parse(&text).unwrap().config;
    let names: Vec<_> = c.general.dispatches.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["163", "baidu", "sohu", "default"]);
    assert_eq!(c.general.dispatches[2].cluster, "_GLOBAL_SIDECAR");
    assert_eq!(c.general.wormhole_port, [80, 8080].into());
}

#[test]
fn autofence_and_aliases_module() {
    let (c, _) = load("module-autofence-aliases.yaml");
    assert!(c.general.auto_fence && c.general.default_fence);
    assert_eq!(
        c.general.domain_aliases[0].templates,
        ["$namespace.$service.mailsaas"]
    );
}

#[test]
fn logrotate_module_with_the_old_fence_key() {
    let (c, warnings) = load("module-logrotate.yaml");
    assert!(c.global.log.log_rotate);
    assert!(c.global.log.log_rotate_config.compress);
    assert_eq!(c.global.log.log_rotate_config.max_backups, 10);
    assert!(warnings.iter().any(|w| w.contains("old name")), "{warnings:?}");
}

#[test]
fn check_config_command_reports_the_failing_field() {
    let dir = std::env::temp_dir().join(format!("lazyload-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "general:\n  domainAliases:\n    - pattern: '(?P<service>[^.]+'\n      templates: [x]\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("general.domainAliases[0].pattern"), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .args(["check-config", "--config"])
        .arg(fixture("module-logrotate.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: serde_json::Value = lazyload::yaml::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["general"]["wormholePort"][0], 9080);
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning: fence is the old name"));
    std::fs::remove_dir_all(dir).ok();
}
