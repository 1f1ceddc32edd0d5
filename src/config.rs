//! The lazyload configuration: the fields of a Slime `SlimeBoot` lazyload module entry.
//!
//! A Slime user pastes the `spec.module[]` entry of their SlimeBoot (`name`, `kind`, `enable`,
//! `general`, `global`, `metric`) into one YAML file, or the whole SlimeBoot object, and it loads
//! with Slime's defaults. Loading happens in two steps: [`raw`] mirrors the YAML with Slime's field
//! names (so unknown fields can be reported by path), then [`Config::from_raw`] validates every
//! value and produces typed settings. Errors name the field path and the offending value.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use regex::Regex;
use serde::Serialize;

use crate::vocab::{host, labels};
use crate::yaml;

/// `Result` alias for configuration loading.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text is not YAML, or a field has the wrong type.
    #[error("config is not valid: {0}")]
    Syntax(String),
    /// A field has a value lazyload cannot use.
    #[error("{path}: invalid value {value:?}: {reason}")]
    Invalid {
        /// Dotted path of the field, e.g. `general.domainAliases[0].pattern`.
        path: String,
        /// The value as written.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(path: impl Into<String>, value: impl ToString, reason: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.into(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Where the global-sidecar runs (Slime `globalSidecarMode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GlobalSidecarMode {
    /// One global-sidecar for the whole mesh, in `clusterGsNamespace`.
    #[default]
    Cluster,
    /// One global-sidecar per namespace listed in `general.namespace`.
    Namespace,
}

/// Where learned dependencies come from (Slime `metricSourceType`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricSourceType {
    /// The global-sidecar's access logs, over Envoy's gRPC Access Log Service.
    #[default]
    Accesslog,
    /// `istio_requests_total` queried from Prometheus.
    Prometheus,
}

/// A `domainAliases` rule: hosts matching `pattern` also depend on each expanded template.
#[derive(Clone, Debug, Serialize)]
pub struct DomainAlias {
    /// RE2 pattern with named groups (`(?P<service>...)`).
    #[serde(serialize_with = "serialize_regex")]
    pub pattern: Regex,
    /// Templates referring to the groups as `$name` or `${name}`.
    pub templates: Vec<String>,
}

/// A `dispatches` rule: unknown traffic for `domains` (or `domainRegex`) goes to `cluster`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Dispatch {
    /// Rule name (becomes the virtual host name).
    pub name: String,
    /// Domains matched by a virtual host of their own.
    pub domains: Vec<String>,
    /// Target cluster; `_GLOBAL_SIDECAR` and `PassthroughCluster` are special.
    pub cluster: String,
    /// Authority regex matched by a route inside the catch-all virtual host.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_opt_regex"
    )]
    pub domain_regex: Option<Regex>,
}

/// Which namespaces auto-fencing considers (Slime's `blackNamespaceList` / `whiteNamespaceList`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum NamespaceList {
    /// Every namespace except these.
    Black(BTreeSet<String>),
    /// Only these namespaces.
    White(BTreeSet<String>),
}

/// Workload fences keyed by a pod label (`fenceLabelKeyAlias: key[:alias]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FenceLabelKey {
    /// The pod label whose value names the workload.
    pub key: String,
    /// The alias used in the generated fence name (`<alias>-<value>.workload.identity`).
    pub alias: String,
}

/// The validated `general` section (Slime's `Fence` module config) plus lazyload's additions.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct General {
    /// Ports whose unknown traffic is sent to the global-sidecar.
    pub wormhole_port: BTreeSet<u16>,
    /// Create and delete fences for Services automatically.
    pub auto_fence: bool,
    /// In auto mode, fence Services whose labels and namespace say nothing.
    pub default_fence: bool,
    /// Add the HTTP ports of all Services to the wormhole ports.
    pub auto_port: bool,
    /// Namespaces with their own global-sidecar (namespace mode).
    pub namespace: Vec<String>,
    /// Routing of unknown traffic by domain.
    pub dispatches: Vec<Dispatch>,
    /// Host alias rules, applied to every dependency.
    pub domain_aliases: Vec<DomainAlias>,
    /// Cluster or namespace global-sidecar.
    pub global_sidecar_mode: GlobalSidecarMode,
    /// Access logs or Prometheus.
    pub metric_source_type: MetricSourceType,
    /// Namespace of the cluster-mode global-sidecar.
    pub cluster_gs_namespace: String,
    /// Sidecar hosts added to every fence (`ns/*` or a host).
    pub stable_host: Vec<String>,
    /// Namespaces auto-fencing manages (OR of selectors on namespace labels); empty = all.
    pub management_selectors: Vec<LabelSelector>,
    /// Namespace black or white list for auto-fencing.
    pub namespace_list: Option<NamespaceList>,
    /// Treat `grpc` and `http2` ports as HTTP for auto-port.
    pub support_h2: bool,
    /// Unknown traffic goes to `PassthroughCluster`, not the global-sidecar.
    pub passthrough_by_default: bool,
    /// Add `Slime-Orig-Dest` / `Slime-Source-Ns` with a Lua filter instead of route headers.
    pub add_env_header_via_lua: bool,
    /// Only proxies whose `ISTIO_VERSION` matches this RE2 get the fallback EnvoyFilter.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_opt_regex"
    )]
    pub proxy_version: Option<Regex>,
    /// Remove wormhole ports no Service uses any more (else they only grow).
    pub cleanup_wormhole_port: bool,
    /// Delete the fences lazyload created as soon as auto-fencing no longer wants them, learned
    /// dependencies and all (else they are kept and marked as no longer managed).
    pub cleanup_auto_fences: bool,
    /// Also record and import the short name a caller used.
    pub enable_short_domain: bool,
    /// Workload fences by pod label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fence_label_key_alias: Option<FenceLabelKey>,
    /// The Kubernetes cluster domain (Slime hard-codes `cluster.local`).
    pub cluster_domain: String,
    /// How long a learned dependency stays ACTIVE after it was last seen; `None` = forever.
    #[serde(serialize_with = "serialize_opt_duration")]
    pub dependency_ttl: Option<Duration>,
    /// How long an expired dependency stays in the Sidecar as EXPIREWAIT before it is removed.
    #[serde(serialize_with = "serialize_duration")]
    pub dependency_expire_wait: Duration,
    /// Most hosts learned for one fence; further ones are refused (and counted, and the fence
    /// gets a condition): one caller cannot make its Sidecar, or lazyload's memory, unbounded.
    pub max_learned_hosts_per_fence: usize,
}

/// Size-based log rotation (Slime `logRotateConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LogRotateConfig {
    /// The log file.
    pub file_path: String,
    /// Rotate when the file reaches this size.
    #[serde(rename = "maxSizeMB")]
    pub max_size_mb: u32,
    /// Rotated files kept.
    pub max_backups: u32,
    /// Rotated files older than this are removed.
    pub max_age_day: u32,
    /// Gzip rotated files.
    pub compress: bool,
}

/// Logging (Slime `global.log`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Log {
    /// A tracing filter: `info`, `debug`, or `lazyload=debug,kube=info`.
    pub log_level: String,
    /// Write to `logRotateConfig.filePath` with rotation instead of standard output.
    pub log_rotate: bool,
    /// Rotation settings.
    pub log_rotate_config: LogRotateConfig,
}

/// The validated `global` section.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Global {
    /// Label key used as workload selector when a fence says nothing else (`app`).
    pub service: String,
    /// Istio's root namespace.
    pub istio_namespace: String,
    /// Where lazyload and (by default) the global-sidecar run.
    pub slime_namespace: String,
    /// Istio revisions this lazyload serves (`istio.io/rev`, comma-separated, as Slime reads it);
    /// empty = every object whatever its revision.
    pub istio_rev: String,
    /// With `istioRev`, only objects labelled with one of its revisions are handled (else also
    /// unlabelled ones).
    pub strict_rev: bool,
    /// The revision label lazyload puts on the fences and EnvoyFilters it creates; defaults to
    /// the first `istioRev` entry.
    pub self_resource_rev: String,
    /// Logging.
    pub log: Log,
    /// Free-form settings; the known ones are validated listen addresses.
    pub misc: BTreeMap<String, String>,
}

/// How a Prometheus handler's result is read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum HandlerType {
    /// One value for the whole query.
    #[default]
    Value,
    /// One value per label set (`destination_service`).
    Group,
}

/// A named Prometheus query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PrometheusHandler {
    /// PromQL with `$namespace` and `$source_app` placeholders.
    pub query: String,
    /// How the result is read.
    #[serde(rename = "type")]
    pub kind: HandlerType,
}

/// Prometheus source (Slime `metric.prometheus`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Prometheus {
    /// Base URL, e.g. `http://prometheus.istio-system:9090`.
    pub address: String,
    /// Queries by name.
    pub handlers: BTreeMap<String, PrometheusHandler>,
}

/// The whole validated configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// Module name (free-form).
    pub name: String,
    /// Whether the module is on.
    pub enable: bool,
    /// Module settings.
    pub general: General,
    /// Framework settings.
    pub global: Global,
    /// Prometheus source, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<Prometheus>,
}

/// A loaded configuration and what was ignored while loading it.
#[derive(Debug)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// Human-readable warnings (unknown fields, deprecated settings).
    pub warnings: Vec<String>,
}

/// Misc keys Slime's framework defines, with their defaults.
/// Default of `general.maxLearnedHostsPerFence`: far more than any service calls (a Sidecar of
/// thousands of hosts already costs its proxy megabytes), far less than a flood.
pub const DEFAULT_MAX_LEARNED_HOSTS_PER_FENCE: usize = 5_000;

const MISC_DEFAULTS: &[(&str, &str)] = &[
    ("metrics-addr", ":8080"),
    ("aux-addr", ":8081"),
    ("enableLeaderElection", "off"),
    ("logSourcePort", ":8082"),
    ("seLabelSelectorKeys", "app"),
];

/// Misc keys that hold listen addresses.
const MISC_ADDRESSES: &[&str] = &["metrics-addr", "aux-addr", "logSourcePort"];

impl Default for Config {
    fn default() -> Self {
        Self::from_raw(raw::Module::default()).expect("defaults are valid")
    }
}

impl Global {
    /// Whether an object labelled `istio.io/rev: rev` (`""` = unlabelled) is this lazyload's,
    /// as Slime decides it: every object without `istioRev`; else one of its revisions, or (without
    /// `strictRev`) no label.
    pub fn rev_in_scope(&self, rev: &str) -> bool {
        let mut revs = self
            .istio_rev
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .peekable();
        if revs.peek().is_none() {
            return true;
        }
        (!self.strict_rev && rev.is_empty()) || revs.any(|r| r == rev)
    }

    /// The revision label for what lazyload creates, if any.
    pub fn own_rev(&self) -> Option<&str> {
        (!self.self_resource_rev.is_empty()).then_some(self.self_resource_rev.as_str())
    }

    /// `base`, or `base-<revision>` when this lazyload has a revision: the names of the objects
    /// two lazyloads for two revisions must not share (the Lease, the fallback EnvoyFilter).
    pub fn per_revision(&self, base: &str) -> String {
        match self.own_rev() {
            Some(rev) => format!("{base}-{rev}"),
            None => base.to_string(),
        }
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Loaded> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates configuration text: a module entry, or a whole SlimeBoot.
    pub fn parse(text: &str) -> Result<Loaded> {
        let doc: yaml::Node = yaml::from_str(text).map_err(|e| {
            let hint = if text.contains("{{") {
                " (the file holds `{{`: an unrendered Helm template? render it with `helm template`)"
            } else {
                ""
            };
            Error::Syntax(format!("{e}{hint}"))
        })?;
        let (prefix, module) = select_module(doc)?;
        if let Some((path, value)) = helm_template(&module, "") {
            return Err(invalid(
                format!("{prefix}{path}"),
                value,
                "an unrendered Helm template: lazyload renders no templates (Slime rendered its \
                 chart, and a dispatch cluster, against its values); write the value itself",
            ));
        }
        let mut warnings = Vec::new();
        let mut unknown = |path: serde_ignored::Path<'_>| {
            warnings.push(format!("unknown field `{prefix}{}` ignored", field_path(&path)));
        };
        let module: raw::Module =
            serde_path_to_error::deserialize(serde_ignored::Deserializer::new(module, &mut unknown))
                .map_err(|e| Error::Syntax(format!("{prefix}{e}")))?;
        warnings.extend(module.deprecations(&prefix));
        warnings.extend(module.without_effect(&prefix));
        let metric_source_set = module.metric_source_set();
        let general = module.general.as_ref().or(module.fence.as_ref());
        for (i, d) in general
            .and_then(|g| g.dispatches.as_ref())
            .into_iter()
            .flatten()
            .enumerate()
        {
            if d.name.as_ref().is_none_or(|n| n.to_string().is_empty()) {
                warnings.push(format!(
                    "{prefix}general.dispatches[{i}] has no name: it is named `{}`",
                    unnamed_dispatch(i)
                ));
            }
        }
        let config = Self::from_raw(module).map_err(|e| match e {
            Error::Invalid { path, value, reason } => Error::Invalid {
                path: format!("{prefix}{path}"),
                value,
                reason,
            },
            other => other,
        })?;
        if config.prometheus.is_some() && !metric_source_set {
            warnings.push(format!(
                "{prefix}metric.prometheus is set but general.metricSourceType is not: Slime's default \
                 was `prometheus` before mid-2023, lazyload's is `accesslog`; set \
                 `metricSourceType: prometheus` to learn from Prometheus"
            ));
        }
        if !config.enable {
            warnings.push(format!(
                "{prefix}enable is false: lazyload will not fence anything"
            ));
        }
        if let Some(value) = config.global.misc.get("enableLeaderElection")
            && value != "on"
            && value != "off"
        {
            warnings.push(format!(
                "{prefix}global.misc.enableLeaderElection: {value:?} is neither \"on\" nor \"off\" (Slime \
                 reads it as off; lazyload always elects a leader when it writes to a cluster)"
            ));
        }
        Ok(Loaded { config, warnings })
    }

    /// Validates a raw module entry and applies Slime's defaults.
    pub fn from_raw(module: raw::Module) -> Result<Self> {
        if let Some(kind) = &module.kind
            && kind != "lazyload"
        {
            return Err(invalid(
                "kind",
                kind,
                "this file configures the `lazyload` module",
            ));
        }
        let global = validate_global(module.global)?;
        let general = validate_general(module.general.or(module.fence).unwrap_or_default(), &global)?;
        let prometheus = module
            .metric
            .and_then(|m| m.prometheus)
            .map(validate_prometheus)
            .transpose()?;
        Ok(Config {
            name: module.name.unwrap_or_else(|| "lazyload".into()),
            enable: module.enable.unwrap_or(true),
            general,
            global,
            prometheus,
        })
    }

    /// The listen address for a `global.misc` address key, in `host:port` form.
    pub fn misc_address(&self, key: &str) -> Option<String> {
        self.global.misc.get(key).map(|a| normalize_listen(a))
    }
}

/// Writes a serde_ignored path as `a.b[2].c` (without its markers for `Option`s).
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => {
            let parent = field_path(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => {
            field_path(parent)
        }
    }
}

/// Picks the lazyload module out of a SlimeBoot, or takes the document as a module entry.
fn select_module(doc: yaml::Node) -> Result<(String, yaml::Node)> {
    if doc == yaml::Node::Null {
        return Ok((String::new(), yaml::Node::Mapping(Vec::new())));
    }
    let lazyload = |modules: &[yaml::Node], path: &str| {
        let is_lazyload = |m: &yaml::Node| m.get("kind").and_then(|k| k.as_str()) == Some("lazyload");
        match modules.iter().position(is_lazyload) {
            Some(i) => Ok(i),
            None if modules.len() == 1 => Ok(0),
            None => Err(invalid(path, "", "no module of kind `lazyload`")),
        }
    };
    // `module:` pasted with its leading dash: a list of module entries.
    if let Some(modules) = doc.as_sequence() {
        let i = lazyload(modules, "[]")?;
        return Ok((format!("[{i}]."), modules[i].clone()));
    }
    // `module:` as pasted from Slime's docs (the SlimeBoot's spec without its header), or a whole
    // SlimeBoot, with or without its `kind`.
    let (path, modules) = if let Some(m) = doc.get("module") {
        ("module", m)
    } else if let Some(m) = doc.get("spec").and_then(|s| s.get("module")) {
        ("spec.module", m)
    } else if doc.get("kind").and_then(|k| k.as_str()) == Some("SlimeBoot") {
        return Err(invalid("spec.module", "", "a SlimeBoot must list its modules"));
    } else {
        return Ok((String::new(), doc));
    };
    let modules = modules
        .as_sequence()
        .ok_or_else(|| invalid(path, "", "a list of module entries is expected"))?;
    let i = lazyload(modules, path)?;
    Ok((format!("{path}[{i}]."), modules[i].clone()))
}

/// The first string value holding a Helm template (`{{ .Values.x }}`), with its path: such a value
/// was meant to be rendered, and read literally it would silently mean something else.
fn helm_template(value: &yaml::Node, path: &str) -> Option<(String, String)> {
    let join = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match value {
        yaml::Node::String(s) if s.contains("{{") && s.contains("}}") => Some((path.to_string(), s.clone())),
        yaml::Node::Sequence(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| helm_template(v, &format!("{path}[{i}]"))),
        yaml::Node::Mapping(map) => map.iter().find_map(|(k, v)| {
            // Unquoted, `{{ .Values.x }}` is YAML for a mapping whose key is a mapping.
            if let yaml::Node::Mapping(inner) = k {
                let names: Vec<String> = inner.iter().map(|(k, _)| k.key_text()).collect();
                return Some((path.to_string(), format!("{{{{ {} }}}}", names.join(" "))));
            }
            let key = k.key_text();
            helm_template(k, &join(&key)).or_else(|| helm_template(v, &join(&key)))
        }),
        _ => None,
    }
}

fn validate_global(g: Option<raw::Global>) -> Result<Global> {
    let g = g.unwrap_or_default();
    let istio_namespace = namespace_or("global.istioNamespace", g.istio_namespace, "istio-system")?;
    let slime_namespace = namespace_or("global.slimeNamespace", g.slime_namespace, "mesh-operator")?;
    let service = g
        .service
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "app".into());
    if !is_label_key(&service) {
        return Err(invalid("global.service", &service, "not a valid label key"));
    }
    let istio_rev = g.istio_rev.unwrap_or_default();
    let self_resource_rev = revisions(&istio_rev, g.self_resource_rev)?;
    Ok(Global {
        service,
        istio_namespace,
        slime_namespace,
        istio_rev,
        strict_rev: g.strict_rev.unwrap_or(false),
        self_resource_rev,
        log: validate_log(g.log.unwrap_or_default())?,
        misc: validate_misc(g.misc.unwrap_or_default())?,
    })
}

/// `global.misc` over its defaults, its listen addresses checked.
fn validate_misc(misc: BTreeMap<String, String>) -> Result<BTreeMap<String, String>> {
    let mut all: BTreeMap<String, String> = MISC_DEFAULTS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    all.extend(misc);
    for key in MISC_ADDRESSES {
        let value = &all[*key];
        if parse_listen(value).is_none() {
            return Err(invalid(
                format!("global.misc.{key}"),
                value,
                "expected a listen address like `:8082` or `0.0.0.0:8082`",
            ));
        }
    }
    Ok(all)
}

/// Checks `global.istioRev` (comma-separated revisions) and returns `global.selfResourceRev`,
/// which defaults to the first of them.
fn revisions(istio_rev: &str, self_resource_rev: Option<String>) -> Result<String> {
    let mut revs = istio_rev.split(',').map(str::trim).filter(|r| !r.is_empty());
    if revs.clone().any(|rev| !is_label_value(rev)) {
        return Err(invalid(
            "global.istioRev",
            istio_rev,
            "each revision must be a label value",
        ));
    }
    let self_resource_rev = self_resource_rev
        .filter(|r| !r.is_empty())
        .or_else(|| revs.next().map(String::from))
        .unwrap_or_default();
    if !is_label_value(&self_resource_rev) {
        return Err(invalid(
            "global.selfResourceRev",
            &self_resource_rev,
            "not a label value",
        ));
    }
    Ok(self_resource_rev)
}

/// `global.log`, with Slime's defaults.
fn validate_log(log: raw::Log) -> Result<Log> {
    let level = log
        .log_level
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        return Err(invalid(
            "global.log.logLevel",
            &level,
            "not a log level or filter",
        ));
    }
    let rotate = log.log_rotate_config.unwrap_or_default();
    Ok(Log {
        log_level: level,
        log_rotate: log.log_rotate.unwrap_or(false),
        log_rotate_config: LogRotateConfig {
            file_path: rotate
                .file_path
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/tmp/log/slime.log".into()),
            max_size_mb: non_negative("global.log.logRotateConfig.maxSizeMB", rotate.max_size_mb, 100)?,
            max_backups: non_negative("global.log.logRotateConfig.maxBackups", rotate.max_backups, 10)?,
            max_age_day: non_negative("global.log.logRotateConfig.maxAgeDay", rotate.max_age_day, 10)?,
            compress: rotate.compress.unwrap_or(false),
        },
    })
}

/// Checks each item of an optional list with `check`, which gets the item's path
/// (`{path}[i]`), its position and the item.
fn each<T, U>(
    path: &str,
    items: Option<Vec<T>>,
    mut check: impl FnMut(&str, usize, T) -> Result<U>,
) -> Result<Vec<U>> {
    let items = items.unwrap_or_default().into_iter().enumerate();
    items
        .map(|(i, item)| check(&format!("{path}[{i}]"), i, item))
        .collect()
}

/// The values of `general.globalSidecarMode`, the default first.
const GLOBAL_SIDECAR_MODES: &[(&str, GlobalSidecarMode)] = &[
    ("cluster", GlobalSidecarMode::Cluster),
    ("namespace", GlobalSidecarMode::Namespace),
];

/// The values of `general.metricSourceType`, the default first.
const METRIC_SOURCE_TYPES: &[(&str, MetricSourceType)] = &[
    ("accesslog", MetricSourceType::Accesslog),
    ("prometheus", MetricSourceType::Prometheus),
];

/// The value `value` names in `choices`; absent or empty is the first choice.
fn one_of<T: Copy>(path: &str, value: Option<String>, choices: &[(&str, T)]) -> Result<T> {
    match value.as_deref().filter(|v| !v.is_empty()) {
        None => Ok(choices[0].1),
        Some(v) => choices
            .iter()
            .find(|(name, _)| *name == v)
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                let names: Vec<String> = choices.iter().map(|(name, _)| format!("`{name}`")).collect();
                invalid(path, v, format!("expected {}", names.join(" or ")))
            }),
    }
}

fn validate_dispatch(path: &str, i: usize, d: raw::Dispatch) -> Result<Dispatch> {
    // Slime's `Dispatch.name` may be empty, but it names an Envoy virtual host, which must
    // have a name: an unnamed dispatch gets its position (and a warning, see `parse`).
    let name = d
        .name
        .map(|n| n.to_string())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| unnamed_dispatch(i));
    let cluster = d.cluster.unwrap_or_default();
    if cluster.is_empty() {
        return Err(invalid(
            format!("{path}.cluster"),
            "",
            "every dispatch needs a cluster",
        ));
    }
    let domain_regex = match d.domain_regex.filter(|r| !r.is_empty()) {
        Some(r) => Some(compile(&format!("{path}.domainRegex"), &r)?),
        None => None,
    };
    let domains = d.domains.unwrap_or_default();
    if domains.is_empty() && domain_regex.is_none() {
        return Err(invalid(
            format!("{path}.domains"),
            "[]",
            "a dispatch needs domains or a domainRegex",
        ));
    }
    Ok(Dispatch {
        name,
        domains,
        cluster,
        domain_regex,
    })
}

fn validate_domain_alias(path: &str, a: raw::DomainAlias) -> Result<DomainAlias> {
    let pattern = compile(&format!("{path}.pattern"), &a.pattern.unwrap_or_default())?;
    let templates = a.templates.unwrap_or_default();
    if templates.is_empty() {
        return Err(invalid(
            format!("{path}.templates"),
            "[]",
            "at least one template is needed",
        ));
    }
    Ok(DomainAlias { pattern, templates })
}

fn validate_namespace_list(black: Option<String>, white: Option<String>) -> Result<Option<NamespaceList>> {
    match (black.filter(|l| !l.is_empty()), white.filter(|l| !l.is_empty())) {
        (Some(b), Some(_)) => Err(invalid(
            "general.whiteNamespaceList",
            b,
            "set blackNamespaceList or whiteNamespaceList, not both",
        )),
        (Some(b), None) => Ok(Some(NamespaceList::Black(split_list(&b)))),
        (None, Some(w)) => Ok(Some(NamespaceList::White(split_list(&w)))),
        (None, None) => Ok(None),
    }
}

/// `general.fenceLabelKeyAlias`: `labelKey` or `labelKey:alias`, the alias `app` by default.
fn validate_fence_label_key_alias(value: Option<String>) -> Result<Option<FenceLabelKey>> {
    let Some(v) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let (key, alias) = v.split_once(':').unwrap_or((&v, ""));
    if !is_label_key(key) {
        return Err(invalid(
            "general.fenceLabelKeyAlias",
            &v,
            "expected `labelKey` or `labelKey:alias`",
        ));
    }
    let alias = if alias.is_empty() { "app" } else { alias };
    if host::dns_label(alias).is_err() {
        return Err(invalid(
            "general.fenceLabelKeyAlias",
            &v,
            "the alias must be a DNS label",
        ));
    }
    Ok(Some(FenceLabelKey {
        key: key.to_string(),
        alias: alias.to_string(),
    }))
}

fn validate_general(f: raw::General, global: &Global) -> Result<General> {
    // Older Slime releases read these two from `global.misc`; `general` wins when both are set.
    let misc_fallback = |key: &str| global.misc.get(key).cloned();
    // Fields are checked in this order, so the first error reported is the first in the schema.
    Ok(General {
        wormhole_port: each("general.wormholePort", f.wormhole_port, |path, _, p| {
            parse_port(path, &p)
        })?
        .into_iter()
        .collect(),
        auto_fence: f.auto_fence.unwrap_or(false),
        default_fence: f.default_fence.unwrap_or(false),
        auto_port: f.auto_port.unwrap_or(false),
        namespace: each("general.namespace", f.namespace, |path, _, ns| {
            namespace_name(path, ns)
        })?,
        dispatches: each("general.dispatches", f.dispatches, validate_dispatch)?,
        domain_aliases: each("general.domainAliases", f.domain_aliases, |path, _, a| {
            validate_domain_alias(path, a)
        })?,
        global_sidecar_mode: one_of(
            "general.globalSidecarMode",
            f.global_sidecar_mode
                .or_else(|| misc_fallback("globalSidecarMode")),
            GLOBAL_SIDECAR_MODES,
        )?,
        metric_source_type: one_of(
            "general.metricSourceType",
            f.metric_source_type.or_else(|| misc_fallback("metricSourceType")),
            METRIC_SOURCE_TYPES,
        )?,
        cluster_gs_namespace: namespace_or(
            "general.clusterGsNamespace",
            f.cluster_gs_namespace,
            &global.slime_namespace,
        )?,
        stable_host: each("general.stableHost", f.stable_host, |path, _, h| {
            host::stable_host_entry(&h).map_err(|e| invalid(path, &h, e.to_string()))
        })?,
        management_selectors: validate_selectors(f.management_selectors.unwrap_or_default())?,
        namespace_list: validate_namespace_list(f.black_namespace_list, f.white_namespace_list)?,
        support_h2: f.support_h2.unwrap_or(false),
        passthrough_by_default: f.passthrough_by_default.unwrap_or(false),
        add_env_header_via_lua: f.add_env_header_via_lua.unwrap_or(false),
        proxy_version: match f.proxy_version.filter(|v| !v.is_empty()) {
            Some(v) => Some(compile("general.proxyVersion", &v)?),
            None => None,
        },
        cleanup_wormhole_port: f.cleanup_wormhole_port.unwrap_or(false),
        cleanup_auto_fences: f.cleanup_auto_fences.unwrap_or(false),
        enable_short_domain: f.enable_short_domain.unwrap_or(false),
        fence_label_key_alias: validate_fence_label_key_alias(f.fence_label_key_alias)?,
        cluster_domain: validate_cluster_domain(f.cluster_domain)?,
        dependency_ttl: match f.dependency_ttl.as_deref() {
            None => Some(Duration::from_secs(30 * 24 * 3600)),
            Some(s) => Some(parse_duration("general.dependencyTtl", s)?).filter(|d| !d.is_zero()),
        },
        dependency_expire_wait: match f.dependency_expire_wait.as_deref() {
            None => Duration::from_secs(3600),
            Some(s) => parse_duration("general.dependencyExpireWait", s)?,
        },
        max_learned_hosts_per_fence: match f.max_learned_hosts_per_fence {
            None => DEFAULT_MAX_LEARNED_HOSTS_PER_FENCE,
            Some(0) => {
                return Err(invalid(
                    "general.maxLearnedHostsPerFence",
                    "0",
                    "must be at least 1",
                ));
            }
            Some(n) => n as usize,
        },
    })
}

/// `general.managementSelectors`, each checked.
fn validate_selectors(selectors: Vec<LabelSelector>) -> Result<Vec<LabelSelector>> {
    for (i, s) in selectors.iter().enumerate() {
        labels::check_selector(s).map_err(|reason| {
            invalid(
                format!("general.managementSelectors[{i}]"),
                format!("{s:?}"),
                reason,
            )
        })?;
    }
    Ok(selectors)
}

/// `general.clusterDomain` (`cluster.local` by default), lower-cased.
fn validate_cluster_domain(domain: Option<String>) -> Result<String> {
    let domain = domain.unwrap_or_else(|| "cluster.local".into());
    host::dns_name(&domain).map_err(|e| invalid("general.clusterDomain", &domain, e.to_string()))?;
    Ok(domain.to_ascii_lowercase())
}

/// The name an unnamed dispatch gets.
fn unnamed_dispatch(index: usize) -> String {
    format!("dispatch-{index}")
}

fn validate_prometheus(p: raw::Prometheus) -> Result<Prometheus> {
    let address = p.address.unwrap_or_default();
    // What the Prometheus client speaks: plain HTTP to host[:port], queries at /api/v1/query.
    let authority = address.trim().strip_prefix("http://").unwrap_or_default();
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    if authority.is_empty()
        || authority.contains('/')
        || authority.parse::<hyper::http::uri::Authority>().is_err()
    {
        return Err(invalid(
            "metric.prometheus.address",
            &address,
            "expected http://host[:port] (no https, no path)",
        ));
    }
    let mut handlers = BTreeMap::new();
    for (name, h) in p.handlers.unwrap_or_default() {
        let path = format!("metric.prometheus.handlers.{name}");
        let query = h.query.unwrap_or_default();
        if query.trim().is_empty() {
            return Err(invalid(format!("{path}.query"), "", "a handler needs a query"));
        }
        // Slime's `Prometheus_Source.Type` enum, by name or (jsonpb) by number.
        let kind = match h.kind.map(|k| k.to_string()).as_deref().map(str::trim) {
            None | Some("Value") | Some("0") | Some("") => HandlerType::Value,
            Some("Group") | Some("1") => HandlerType::Group,
            Some(other) => {
                return Err(invalid(
                    format!("{path}.type"),
                    other,
                    "expected `Value` (0) or `Group` (1)",
                ));
            }
        };
        handlers.insert(name, PrometheusHandler { query, kind });
    }
    Ok(Prometheus { address, handlers })
}

fn compile(path: &str, pattern: &str) -> Result<Regex> {
    if pattern.is_empty() {
        return Err(invalid(path, pattern, "a pattern is required"));
    }
    Regex::new(pattern).map_err(|e| invalid(path, pattern, format!("not a valid RE2 regex: {e}")))
}

fn parse_port(path: &str, p: &raw::IntOrString) -> Result<u16> {
    let text = p.to_string();
    match text.trim().parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        _ => Err(invalid(path, text, "expected a port number between 1 and 65535")),
    }
}

fn namespace_or(path: &str, value: Option<String>, default: &str) -> Result<String> {
    match value.filter(|v| !v.is_empty()) {
        Some(v) => namespace_name(path, v),
        None => Ok(default.to_string()),
    }
}

fn namespace_name(path: &str, value: String) -> Result<String> {
    host::dns_label(&value).map_err(|e| invalid(path, &value, e.to_string()))?;
    Ok(value)
}

/// A count written as a number or (jsonpb int64, or by hand) a string; 0 means the default.
fn non_negative(path: &str, value: Option<raw::IntOrString>, default: u32) -> Result<u32> {
    let Some(value) = value else {
        return Ok(default);
    };
    match value.to_string().trim().parse::<u32>() {
        Ok(0) => Ok(default),
        Ok(n) => Ok(n),
        Err(_) => Err(invalid(path, value, "expected a positive number")),
    }
}

fn split_list(list: &str) -> BTreeSet<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Parses a Go-style duration (`720h`, `1h30m`, `90s`).
fn parse_duration(path: &str, s: &str) -> Result<Duration> {
    crate::duration::parse(s).map_err(|e| invalid(path, s, e.to_string()))
}

/// A Kubernetes label value: empty, or up to 63 alphanumerics, `-`, `_`, `.` starting and ending
/// alphanumeric.
fn is_label_value(value: &str) -> bool {
    value.is_empty()
        || (value.len() <= 63
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && value.as_bytes()[0].is_ascii_alphanumeric()
            && value.as_bytes()[value.len() - 1].is_ascii_alphanumeric())
}

/// A Kubernetes label key: optional DNS-subdomain prefix and a name of up to 63 characters.
fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    name_ok && prefix.is_none_or(|p| host::dns_name(p).is_ok())
}

/// Parses `:8082`, `8082`, `0.0.0.0:8082` or `[::]:8082` into a socket address.
pub fn parse_listen(addr: &str) -> Option<std::net::SocketAddr> {
    normalize_listen(addr).parse().ok()
}

fn normalize_listen(addr: &str) -> String {
    let addr = addr.trim();
    if let Some(port) = addr.strip_prefix(':') {
        format!("0.0.0.0:{port}")
    } else if addr.bytes().all(|b| b.is_ascii_digit()) {
        format!("0.0.0.0:{addr}")
    } else {
        addr.to_string()
    }
}

fn serialize_regex<S: serde::Serializer>(r: &Regex, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

fn serialize_opt_regex<S: serde::Serializer>(
    r: &Option<Regex>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match r {
        Some(r) => s.serialize_str(r.as_str()),
        None => s.serialize_none(),
    }
}

fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

fn serialize_opt_duration<S: serde::Serializer>(
    d: &Option<Duration>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&d.map_or_else(|| "0s".to_string(), format_duration))
}

/// Formats a duration the way it is written in the config (`720h`, `90m`, `45s`).
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs > 0 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs > 0 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

/// The configuration as written, with Slime's field names; every field optional.
pub mod raw {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use serde::Deserialize;

    /// A port written as `"9080"` (Slime) or `9080`.
    #[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
    #[serde(untagged)]
    pub enum IntOrString {
        /// A number.
        Int(i64),
        /// A string.
        String(String),
    }

    impl std::fmt::Display for IntOrString {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Self::Int(i) => write!(f, "{i}"),
                Self::String(s) => f.write_str(s),
            }
        }
    }

    /// A SlimeBoot `spec.module[]` entry.
    #[derive(Debug, Default, Deserialize)]
    pub struct Module {
        /// Module name.
        pub name: Option<String>,
        /// Must be `lazyload` when present.
        pub kind: Option<String>,
        /// Whether the module runs.
        pub enable: Option<bool>,
        /// Module settings.
        pub general: Option<General>,
        /// Older Slime releases called `general` `fence`.
        pub fence: Option<General>,
        /// Framework settings.
        pub global: Option<Global>,
        /// Metric sources.
        pub metric: Option<Metric>,
        /// Slime's `Config.Mode`: `Module` (0) or `BundleItem` (1); a name, or a number in
        /// Slime's older enum. lazyload always runs as one module.
        pub mode: Option<IntOrString>,
        /// Slime's bundle of modules; no effect here.
        pub bundle: Option<crate::yaml::Node>,
    }

    impl Module {
        /// Whether the metric source is chosen explicitly (`general`, or older Slime's
        /// `global.misc`).
        pub fn metric_source_set(&self) -> bool {
            let general = self.general.as_ref().or(self.fence.as_ref());
            general.is_some_and(|g| g.metric_source_type.is_some())
                || self
                    .global
                    .as_ref()
                    .and_then(|g| g.misc.as_ref())
                    .is_some_and(|m| m.contains_key("metricSourceType"))
        }

        /// Warnings for Slime settings that load but have no effect in lazyload, so that none is
        /// taken for honoured.
        pub fn without_effect(&self, prefix: &str) -> Vec<String> {
            let mut fields: Vec<(&str, &str)> = Vec::new();
            match self.mode.as_ref().map(ToString::to_string).as_deref() {
                None | Some("Module") | Some("0") | Some("") => {}
                Some(_) => fields.push(("mode", "lazyload always runs as a module of its own")),
            }
            if self.bundle.is_some() {
                fields.push(("bundle", "lazyload always runs as a module of its own"));
            }
            if self.metric.as_ref().is_some_and(|m| m.k8s.is_some()) {
                fields.push(("metric.k8s", "lazyload learns from access logs or Prometheus"));
            }
            if let Some(g) = &self.global {
                let framework = "a setting of Slime's framework lazyload has no use for";
                let set = [
                    (
                        "global.multicluster",
                        g.multicluster.as_ref().is_some_and(|v| !v.is_empty()),
                    ),
                    (
                        "global.masterUrl",
                        g.master_url.as_ref().is_some_and(|v| !v.is_empty()),
                    ),
                    (
                        "global.deployRev",
                        g.deploy_rev.as_ref().is_some_and(|v| !v.is_empty()),
                    ),
                    (
                        "global.configRev",
                        g.config_rev.as_ref().is_some_and(|v| !v.is_empty()),
                    ),
                    ("global.configSources", g.config_sources.is_some()),
                    ("global.istioConfigSource", g.istio_config_source.is_some()),
                    ("global.clientGoTokenBucket", g.client_go_token_bucket.is_some()),
                    (
                        "global.enableConvertSeToIstioRes",
                        g.enable_convert_se_to_istio_res.is_some(),
                    ),
                ];
                fields.extend(set.into_iter().filter(|(_, on)| *on).map(|(f, _)| (f, framework)));
                if let Some(log) = &g.log {
                    let logging = "lazyload logs through `logLevel` (a tracing filter) only";
                    let set = [
                        ("global.log.klogLevel", log.klog_level.is_some()),
                        ("global.log.enableQuote", log.enable_quote.is_some()),
                        ("global.log.ilogLevel", log.ilog_level.is_some()),
                    ];
                    fields.extend(set.into_iter().filter(|(_, on)| *on).map(|(f, _)| (f, logging)));
                }
            }
            fields
                .into_iter()
                .map(|(field, why)| format!("{prefix}{field} has no effect: {why}"))
                .collect()
        }

        /// Warnings for settings that load but no longer do anything, or moved.
        pub fn deprecations(&self, prefix: &str) -> Vec<String> {
            let mut out = Vec::new();
            if self.fence.is_some() {
                out.push(format!("{prefix}fence is the old name of `general`; rename it"));
                if self.general.is_some() {
                    out.push(format!("{prefix}fence ignored because `general` is set"));
                }
            }
            if let Some(g) = self.general.as_ref().or(self.fence.as_ref()) {
                if g.disable_ipv4_passthrough.is_some() {
                    out.push(format!(
                        "{prefix}general.disableIpv4Passthrough is deprecated in Slime and has no effect"
                    ));
                }
                if g.render.is_some() {
                    out.push(format!(
                        "{prefix}general.render has no effect: lazyload renders nothing with Helm"
                    ));
                }
            }
            out
        }
    }

    /// `general` (Slime's `Fence` message) plus lazyload's additions.
    #[derive(Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct General {
        /// Wormhole ports.
        pub wormhole_port: Option<Vec<IntOrString>>,
        /// Auto mode.
        pub auto_fence: Option<bool>,
        /// Default in auto mode.
        pub default_fence: Option<bool>,
        /// Auto-port.
        pub auto_port: Option<bool>,
        /// Namespace-mode namespaces.
        pub namespace: Option<Vec<String>>,
        /// Unknown-traffic dispatch.
        pub dispatches: Option<Vec<Dispatch>>,
        /// Alias rules.
        pub domain_aliases: Option<Vec<DomainAlias>>,
        /// Cluster or namespace.
        pub global_sidecar_mode: Option<String>,
        /// Access log or Prometheus.
        pub metric_source_type: Option<String>,
        /// Cluster-mode global-sidecar namespace.
        pub cluster_gs_namespace: Option<String>,
        /// Hosts added to every fence.
        pub stable_host: Option<Vec<String>>,
        /// Namespace selectors for auto mode.
        pub management_selectors: Option<Vec<LabelSelector>>,
        /// Comma-separated excluded namespaces.
        pub black_namespace_list: Option<String>,
        /// Comma-separated included namespaces.
        pub white_namespace_list: Option<String>,
        /// gRPC / HTTP2 ports count as HTTP.
        #[serde(rename = "supportH2")]
        pub support_h2: Option<bool>,
        /// Default to passthrough.
        pub passthrough_by_default: Option<bool>,
        /// Headers via Lua.
        pub add_env_header_via_lua: Option<bool>,
        /// Proxy version regex.
        pub proxy_version: Option<String>,
        /// Shrink wormhole ports.
        pub cleanup_wormhole_port: Option<bool>,
        /// lazyload: delete auto fences no longer wanted.
        pub cleanup_auto_fences: Option<bool>,
        /// Keep short names.
        pub enable_short_domain: Option<bool>,
        /// Workload fences.
        pub fence_label_key_alias: Option<String>,
        /// Deprecated in Slime.
        pub disable_ipv4_passthrough: Option<bool>,
        /// Slime's chart rendering switch.
        pub render: Option<String>,
        /// lazyload: cluster domain.
        pub cluster_domain: Option<String>,
        /// lazyload: TTL of learned dependencies (`0s` = never expire).
        pub dependency_ttl: Option<String>,
        /// lazyload: EXPIREWAIT period.
        pub dependency_expire_wait: Option<String>,
        /// lazyload: cap on the hosts learned per fence.
        pub max_learned_hosts_per_fence: Option<u32>,
    }

    /// A dispatch rule.
    #[derive(Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Dispatch {
        /// Name (`163` in Slime's own example is a number).
        pub name: Option<IntOrString>,
        /// Domains.
        pub domains: Option<Vec<String>>,
        /// Cluster.
        pub cluster: Option<String>,
        /// Regex.
        pub domain_regex: Option<String>,
    }

    /// An alias rule.
    #[derive(Debug, Default, Deserialize)]
    pub struct DomainAlias {
        /// Pattern.
        pub pattern: Option<String>,
        /// Templates.
        pub templates: Option<Vec<String>>,
    }

    /// `global`.
    #[derive(Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Global {
        /// Workload label key.
        pub service: Option<String>,
        /// Multicluster switch (Slime framework), unused.
        pub multicluster: Option<String>,
        /// Istio root namespace.
        pub istio_namespace: Option<String>,
        /// lazyload's namespace.
        pub slime_namespace: Option<String>,
        /// Logging.
        pub log: Option<Log>,
        /// Free-form settings.
        pub misc: Option<BTreeMap<String, String>>,
        /// Istio revision.
        pub istio_rev: Option<String>,
        /// Slime framework settings accepted for compatibility.
        pub strict_rev: Option<bool>,
        /// Slime framework settings accepted for compatibility.
        pub self_resource_rev: Option<String>,
        /// Slime framework settings accepted for compatibility.
        pub master_url: Option<String>,
        /// Slime framework settings accepted for compatibility.
        pub deploy_rev: Option<String>,
        /// Slime framework settings accepted for compatibility.
        pub config_rev: Option<String>,
        /// Slime framework settings accepted for compatibility (no effect).
        pub config_sources: Option<crate::yaml::Node>,
        /// Slime framework settings accepted for compatibility (no effect).
        pub istio_config_source: Option<crate::yaml::Node>,
        /// Slime framework settings accepted for compatibility (no effect).
        pub client_go_token_bucket: Option<crate::yaml::Node>,
        /// Slime framework settings accepted for compatibility (no effect).
        pub enable_convert_se_to_istio_res: Option<crate::yaml::Node>,
    }

    /// `global.log`.
    #[derive(Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Log {
        /// Level.
        pub log_level: Option<String>,
        /// klog verbosity, unused.
        pub klog_level: Option<IntOrString>,
        /// Rotate to a file.
        pub log_rotate: Option<bool>,
        /// Rotation settings.
        pub log_rotate_config: Option<LogRotateConfig>,
        /// Quote log values, unused.
        pub enable_quote: Option<bool>,
        /// Istio log scopes, unused.
        pub ilog_level: Option<String>,
    }

    /// `global.log.logRotateConfig`.
    #[derive(Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct LogRotateConfig {
        /// File.
        pub file_path: Option<String>,
        /// Size.
        #[serde(rename = "maxSizeMB")]
        pub max_size_mb: Option<IntOrString>,
        /// Backups.
        pub max_backups: Option<IntOrString>,
        /// Age.
        pub max_age_day: Option<IntOrString>,
        /// Gzip.
        pub compress: Option<bool>,
    }

    /// `metric`.
    #[derive(Debug, Default, Deserialize)]
    pub struct Metric {
        /// Prometheus source.
        pub prometheus: Option<Prometheus>,
        /// Kubernetes metric source (Slime), unused.
        pub k8s: Option<crate::yaml::Node>,
    }

    /// `metric.prometheus`.
    #[derive(Debug, Default, Deserialize)]
    pub struct Prometheus {
        /// URL.
        pub address: Option<String>,
        /// Handlers by name.
        pub handlers: Option<BTreeMap<String, Handler>>,
    }

    /// A handler.
    #[derive(Debug, Default, Deserialize)]
    pub struct Handler {
        /// PromQL.
        pub query: Option<String>,
        /// `Value` or `Group`, or their numbers 0 and 1.
        #[serde(rename = "type")]
        pub kind: Option<IntOrString>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn empty_file_gives_slime_defaults() {
        let c = Config::parse("").unwrap().config;
        assert_eq!(c.global.istio_namespace, "istio-system");
        assert_eq!(c.global.slime_namespace, "mesh-operator");
        assert_eq!(c.global.service, "app");
        assert_eq!(c.general.cluster_gs_namespace, "mesh-operator");
        assert_eq!(c.general.global_sidecar_mode, GlobalSidecarMode::Cluster);
        assert_eq!(c.general.metric_source_type, MetricSourceType::Accesslog);
        assert_eq!(c.general.cluster_domain, "cluster.local");
        assert!(!c.general.auto_fence && !c.general.default_fence);
        assert_eq!(c.global.log.log_rotate_config.max_size_mb, 100);
        assert_eq!(c.misc_address("logSourcePort").as_deref(), Some("0.0.0.0:8082"));
        assert_eq!(c.general.dependency_ttl, Some(Duration::from_secs(2_592_000)));
    }

    #[test]
    fn bad_domain_alias_regex_names_the_field() {
        let e = err("general:\n  domainAliases:\n    - pattern: '(?P<svc>[^.]+'\n      templates: [x]\n");
        assert!(
            e.starts_with("general.domainAliases[0].pattern: invalid value \"(?P<svc>[^.]+\""),
            "{e}"
        );
    }

    #[test]
    fn invalid_values_name_path_and_value() {
        let cases = [
            (
                "general:\n  wormholePort: ['9080', '70000']\n",
                "general.wormholePort[1]",
                "70000",
            ),
            ("general:\n  wormholePort: [0]\n", "general.wormholePort[0]", "0"),
            (
                "general:\n  globalSidecarMode: pod\n",
                "general.globalSidecarMode",
                "pod",
            ),
            (
                "general:\n  metricSourceType: kafka\n",
                "general.metricSourceType",
                "kafka",
            ),
            (
                "general:\n  maxLearnedHostsPerFence: 0\n",
                "general.maxLearnedHostsPerFence",
                "0",
            ),
            (
                "general:\n  dependencyTtl: soon\n",
                "general.dependencyTtl",
                "soon",
            ),
            (
                "general:\n  clusterDomain: 'a..b'\n",
                "general.clusterDomain",
                "a..b",
            ),
            (
                "general:\n  stableHost: ['a/b/c']\n",
                "general.stableHost[0]",
                "a/b/c",
            ),
            (
                "general:\n  proxyVersion: '1.1[('\n",
                "general.proxyVersion",
                "1.1[(",
            ),
            (
                "global:\n  misc:\n    logSourcePort: nowhere\n",
                "global.misc.logSourcePort",
                "nowhere",
            ),
            (
                "global:\n  log:\n    logLevel: 'info,,=='\n",
                "global.log.logLevel",
                "info,,==",
            ),
            (
                "metric:\n  prometheus:\n    address: prom:9090\n",
                "metric.prometheus.address",
                "prom:9090",
            ),
            (
                "metric:\n  prometheus:\n    address: https://prom:9090\n",
                "metric.prometheus.address",
                "https://prom:9090",
            ),
            (
                "metric:\n  prometheus:\n    address: http://prom:9090/prefix\n",
                "metric.prometheus.address",
                "http://prom:9090/prefix",
            ),
            ("kind: limiter\n", "kind", "limiter"),
        ];
        for (text, path, value) in cases {
            let e = err(text);
            assert!(
                e.starts_with(&format!("{path}: invalid value {value:?}")),
                "{text} -> {e}"
            );
        }
    }

    #[test]
    fn type_errors_name_the_field() {
        let e = err("general:\n  autoFence: maybe\n");
        assert!(e.contains("general.autoFence"), "{e}");
    }

    #[test]
    fn unknown_fields_are_warnings_with_paths() {
        let loaded = Config::parse("general:\n  autoFence: true\n  colour: blue\nextra: 1\n").unwrap();
        assert!(loaded.config.general.auto_fence);
        assert_eq!(
            loaded.warnings,
            vec![
                "unknown field `general.colour` ignored",
                "unknown field `extra` ignored"
            ]
        );
    }

    #[test]
    fn leader_election_switch_other_than_on_or_off_is_a_warning() {
        for (value, warned) in [("on", false), ("off", false), ("banana", true)] {
            let loaded =
                Config::parse(&format!("global:\n  misc:\n    enableLeaderElection: {value}\n")).unwrap();
            assert_eq!(
                loaded
                    .warnings
                    .iter()
                    .any(|w| w.contains("global.misc.enableLeaderElection")),
                warned,
                "{value}: {:?}",
                loaded.warnings
            );
        }
    }

    #[test]
    fn prometheus_handler_type_by_name_or_number() {
        for (written, want) in [
            ("Value", HandlerType::Value),
            ("0", HandlerType::Value),
            ("'0'", HandlerType::Value),
            ("Group", HandlerType::Group),
            ("1", HandlerType::Group),
            ("'1'", HandlerType::Group),
        ] {
            let text = format!(
                "general:\n  metricSourceType: prometheus\nmetric:\n  prometheus:\n    address: http://p:9090\n    handlers:\n      d:\n        query: q\n        type: {written}\n"
            );
            let c = Config::parse(&text).unwrap().config;
            assert_eq!(c.prometheus.unwrap().handlers["d"].kind, want, "{written}");
        }
        let e = err(
            "metric:\n  prometheus:\n    address: http://p:9090\n    handlers:\n      d:\n        query: q\n        type: 2\n",
        );
        assert!(
            e.starts_with("metric.prometheus.handlers.d.type: invalid value \"2\""),
            "{e}"
        );
    }

    #[test]
    fn integers_may_be_strings() {
        let c = Config::parse("global:\n  log:\n    klogLevel: '5'\n    logRotateConfig:\n      maxSizeMB: '7'\n      maxBackups: 3\n")
            .unwrap()
            .config;
        assert_eq!(c.global.log.log_rotate_config.max_size_mb, 7);
        assert_eq!(c.global.log.log_rotate_config.max_backups, 3);
    }

    #[test]
    fn module_wrappers_as_pasted_from_slime_docs() {
        for text in [
            "module:\n  - name: lazyload\n    kind: lazyload\n    general:\n      wormholePort: ['9080']\n",
            "spec:\n  module:\n    - name: lazyload\n      kind: lazyload\n      general:\n        wormholePort: ['9080']\n",
            "- name: lazyload\n  kind: lazyload\n  general:\n    wormholePort: ['9080']\n",
        ] {
            let c = Config::parse(text)
                .unwrap_or_else(|e| panic!("{text}: {e}"))
                .config;
            assert_eq!(c.general.wormhole_port, [9080].into(), "{text}");
        }
        let e = err("spec:\n  module:\n    - name: lazyload\n      general:\n        wormholePort: [x]\n");
        assert!(e.starts_with("spec.module[0].general.wormholePort[0]"), "{e}");
    }

    #[test]
    fn helm_templates_are_errors_naming_the_field() {
        for (text, path) in [
            (
                "general:\n  clusterGsNamespace: '{{ .Values.ns }}'\n",
                "general.clusterGsNamespace",
            ),
            (
                "general:\n  autoFence: {{ .Values.autoFence }}\n",
                "general.autoFence",
            ),
            (
                "general:\n  wormholePort:\n    - \"{{ .Values.port }}\"\n",
                "general.wormholePort[0]",
            ),
        ] {
            let e = err(text);
            assert!(
                e.starts_with(&format!("{path}: invalid value")) && e.contains("Helm template"),
                "{text} -> {e}"
            );
        }
        let e = err("general:\n  wormholePort: [{{ .Values.port }}-x]\n");
        assert!(e.contains("Helm template"), "{e}");
    }

    #[test]
    fn prometheus_without_metric_source_is_warned_about() {
        let text = "metric:\n  prometheus:\n    address: http://p:9090\n";
        let loaded = Config::parse(text).unwrap();
        assert_eq!(
            loaded.config.general.metric_source_type,
            MetricSourceType::Accesslog
        );
        assert!(
            loaded.warnings.iter().any(|w| w.contains("before mid-2023")),
            "{:?}",
            loaded.warnings
        );
        let loaded = Config::parse(&format!("general:\n  metricSourceType: prometheus\n{text}")).unwrap();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    }

    #[test]
    fn fields_without_effect_and_unnamed_dispatches_are_warned_about() {
        let loaded = Config::parse(
            "mode: BundleItem\nglobal:\n  multicluster: 'true'\n  log:\n    klogLevel: 3\ngeneral:\n  dispatches:\n    - domains: [a.com]\n      cluster: PassthroughCluster\n",
        )
        .unwrap();
        assert_eq!(loaded.config.general.dispatches[0].name, "dispatch-0");
        for field in [
            "mode",
            "global.multicluster",
            "global.log.klogLevel",
            "dispatches[0] has no name",
        ] {
            assert!(
                loaded.warnings.iter().any(|w| w.contains(field)),
                "{field}: {:?}",
                loaded.warnings
            );
        }
        assert!(Config::parse("mode: Module\n").unwrap().warnings.is_empty());
        assert!(Config::parse("mode: 0\n").unwrap().warnings.is_empty());
    }

    #[test]
    fn revisions_as_slime_scopes_them() {
        let global = |text: &str| Config::parse(text).unwrap().config.global;
        let any = global("");
        assert!(any.rev_in_scope("") && any.rev_in_scope("canary"));
        assert_eq!(
            (any.own_rev(), any.per_revision("lazyload").as_str()),
            (None, "lazyload")
        );
        let loose = global("global:\n  istioRev: 'canary, stable'\n");
        let cases = [("", true), ("canary", true), ("stable", true), ("other", false)];
        for (rev, want) in cases {
            assert_eq!(loose.rev_in_scope(rev), want, "{rev:?}");
        }
        assert_eq!(loose.own_rev(), Some("canary"));
        assert_eq!(loose.per_revision("lazyload"), "lazyload-canary");
        let strict = global("global:\n  istioRev: canary\n  strictRev: true\n  selfResourceRev: c2\n");
        assert!(!strict.rev_in_scope("") && strict.rev_in_scope("canary"));
        assert_eq!(strict.own_rev(), Some("c2"));
        assert!(err("global:\n  istioRev: 'a b'\n").starts_with("global.istioRev"));
    }

    #[test]
    fn zero_ttl_means_never_expire() {
        let c = Config::parse("general:\n  dependencyTtl: 0s\n").unwrap().config;
        assert_eq!(c.general.dependency_ttl, None);
    }

    #[test]
    fn black_and_white_lists_are_exclusive() {
        let e = err("general:\n  blackNamespaceList: a,b\n  whiteNamespaceList: c\n");
        assert!(e.contains("not both"), "{e}");
        let c = Config::parse("general:\n  blackNamespaceList: 'a, b'\n")
            .unwrap()
            .config;
        assert_eq!(
            c.general.namespace_list,
            Some(NamespaceList::Black(["a".to_string(), "b".to_string()].into()))
        );
    }

    #[test]
    fn slimeboot_object_selects_the_lazyload_module() {
        let text = "apiVersion: config.netease.com/v1alpha1\nkind: SlimeBoot\nspec:\n  module:\n    - name: limiter\n      kind: limiter\n    - name: lazyload\n      kind: lazyload\n      general:\n        wormholePort: ['bad']\n";
        let e = err(text);
        assert!(e.starts_with("spec.module[1].general.wormholePort[0]"), "{e}");
    }

    #[test]
    fn fence_is_the_old_name_of_general() {
        let loaded = Config::parse("fence:\n  wormholePort: ['9080']\n").unwrap();
        assert_eq!(loaded.config.general.wormhole_port, [9080].into());
        assert!(loaded.warnings[0].contains("old name"));
    }

    #[test]
    fn fence_label_key_alias_splits() {
        let c = Config::parse("general:\n  fenceLabelKeyAlias: 'istio.io/wl:wl'\n")
            .unwrap()
            .config;
        assert_eq!(
            c.general.fence_label_key_alias,
            Some(FenceLabelKey {
                key: "istio.io/wl".into(),
                alias: "wl".into()
            })
        );
    }
}
