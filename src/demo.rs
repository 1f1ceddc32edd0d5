//! `lazyload demo`: the learning path on a built-in sample mesh, over loopback, with nothing but
//! this binary.
//!
//! It writes, into a working directory, a sample cluster (bookinfo plus generated services in
//! several namespaces, each with a ServiceFence, as `kubectl get -o yaml` prints them) and the
//! Istio-shaped full config every proxy of that mesh receives (an Envoy config dump: one cluster,
//! endpoint assignment and virtual host per service port, one listener per port). It starts
//! `lazyload serve` on that cluster (no API server: learned fences and Sidecars go to
//! `manifests/`), replays the mesh's traffic to its collector as the access-log entries a
//! global-sidecar sends (gRPC ALS over loopback), waits until every call is learned, then runs
//! `report` on the result (what each workload's Sidecar keeps). The relay is not part of it: it
//! needs an istiod (the tests run it against a test istiod and a real Envoy).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::{Address, Node, SocketAddress};
use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties,
};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, Identifier, LogEntries,
};
use jiff::Timestamp;
use serde_json::{Value, json};

use crate::report::{self, Report, ReportArgs};

/// Flags of `lazyload demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Services generated besides bookinfo's four.
    #[arg(long, default_value_t = 200)]
    pub services: usize,
    /// Working directory: the sample mesh, its access logs and the manifests are written here.
    #[arg(long, default_value = "lazyload-demo")]
    pub out: PathBuf,
}

/// What a demo run produced.
#[derive(Debug)]
pub struct Outcome {
    /// Dependencies learned by `lazyload serve`.
    pub learned: usize,
    /// The `report` step.
    pub report: Report,
    /// The bookinfo productpage's Sidecar, as written.
    pub productpage_sidecar: String,
}

/// One service of the sample mesh (one port, one pod).
struct Service {
    namespace: String,
    name: String,
    port: u16,
    cluster_ip: String,
    pod_ip: String,
}

impl Service {
    fn fqdn(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    fn cluster(&self) -> String {
        format!("outbound|{}||{}", self.port, self.fqdn())
    }

    /// Its ServiceFence, before anything is learned.
    fn fence(&self) -> Value {
        json!({"apiVersion": "microservice.slime.io/v1alpha1", "kind": "ServiceFence",
            "metadata": {"name": self.name, "namespace": self.namespace}, "spec": {"enable": true}})
    }
}

/// The sample mesh: its services and who calls whom (indexes into `services`).
struct Mesh {
    services: Vec<Service>,
    calls: Vec<(usize, usize)>,
}

impl Mesh {
    /// Bookinfo (productpage -> details, reviews; reviews -> ratings) and `generated` services in
    /// `shop-*` namespaces, each calling two others (deterministically).
    fn sample(generated: usize) -> Self {
        let mut services = Vec::new();
        let mut add = |namespace: String, name: String, port: u16| {
            let i = services.len();
            services.push(Service {
                namespace,
                name,
                port,
                cluster_ip: format!("10.96.{}.{}", i / 250, i % 250 + 1),
                pod_ip: format!("10.1.{}.{}", i / 250, i % 250 + 1),
            });
        };
        for name in ["productpage", "details", "reviews", "ratings"] {
            add("bookinfo".into(), name.into(), 9080);
        }
        let namespaces = generated.div_ceil(25).max(1);
        for i in 0..generated {
            add(format!("shop-{}", i % namespaces), format!("svc-{i}"), 8080);
        }
        let mut calls = vec![(0, 1), (0, 2), (2, 3)];
        if generated > 1 {
            for i in 0..generated {
                for j in [(i + 1) % generated, (i * 7 + 3) % generated] {
                    if j != i {
                        calls.push((4 + i, 4 + j));
                    }
                }
            }
        }
        calls.sort_unstable();
        calls.dedup();
        Mesh { services, calls }
    }

    /// The cluster as one `kubectl get ns,svc,pods,servicefences -A -o yaml` List (fences
    /// only with `fences`).
    fn cluster_yaml(&self, fences: bool) -> String {
        let mut items = Vec::new();
        let mut namespaces: Vec<&str> = self.services.iter().map(|s| s.namespace.as_str()).collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        for ns in namespaces {
            items.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
        }
        for s in &self.services {
            let labels = json!({"app": s.name});
            items.push(json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": s.name, "namespace": s.namespace, "labels": labels},
                "spec": {"selector": labels, "clusterIP": s.cluster_ip,
                         "ports": [{"name": "http", "port": s.port}]}}));
            items.push(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("{}-v1-0", s.name), "namespace": s.namespace, "labels": labels},
                "spec": {"containers": [{"name": "app", "image": "demo"}]},
                "status": {"phase": "Running", "podIP": s.pod_ip, "podIPs": [{"ip": s.pod_ip}]}}));
            if fences {
                items.push(s.fence());
            }
        }
        serde_yaml::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": items}))
            .unwrap_or_default()
    }

    /// The full config of a proxy without a Sidecar, shaped like istiod's output.
    fn config_dump(&self) -> Value {
        let mut clusters = Vec::new();
        let mut endpoints = Vec::new();
        let mut ports: Vec<u16> = self.services.iter().map(|s| s.port).collect();
        ports.sort_unstable();
        ports.dedup();
        for s in &self.services {
            let name = s.cluster();
            clusters.push(json!({"cluster": {
                "name": name, "type": "EDS",
                "eds_cluster_config": {"eds_config": {"ads": {}, "initial_fetch_timeout": "0s",
                    "resource_api_version": "V3"}, "service_name": name},
                "connect_timeout": "10s", "lb_policy": "LEAST_REQUEST",
                "circuit_breakers": {"thresholds": [{"max_connections": 4294967295u64,
                    "max_pending_requests": 4294967295u64, "max_requests": 4294967295u64,
                    "max_retries": 4294967295u64, "track_remaining": true}]},
                "common_lb_config": {},
                "metadata": {"filter_metadata": {"istio": {"services": [
                    {"host": s.fqdn(), "name": s.name, "namespace": s.namespace}]}}},
                "filters": [{"name": "istio.metadata_exchange", "typed_config": {
                    "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                    "type_url": "type.googleapis.com/io.istio.http.peer_metadata.Config"}}],
                "transport_socket_matches": [{"name": "tlsMode-istio",
                    "match": {"tlsMode": "istio"},
                    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                        "common_tls_context": {
                            "alpn_protocols": ["istio-peer-exchange", "istio"],
                            "tls_certificate_sds_secret_configs": [{"name": "default"}],
                            "combined_validation_context": {"validation_context_sds_secret_config":
                                {"name": "ROOTCA"}}},
                        "sni": format!("outbound_.{}_._.{}", s.port, s.fqdn())}}},
                    {"name": "tlsMode-disabled", "match": {},
                     "transport_socket": {"name": "envoy.transport_sockets.raw_buffer"}}]}}));
            endpoints.push(json!({"endpoint_config": {
                "cluster_name": name,
                "endpoints": [{"locality": {}, "lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {"address": s.pod_ip, "port_value": s.port}}},
                    "health_status": "HEALTHY",
                    "metadata": {"filter_metadata": {"istio": {"workload": format!("{};{};{};v1;Kubernetes", s.name, s.namespace, s.name)},
                        "envoy.transport_socket_match": {"tlsMode": "istio"}}},
                    "load_balancing_weight": 1}]}]}}));
        }
        let mut listeners = Vec::new();
        let mut routes = Vec::new();
        for port in ports {
            listeners.push(json!({"active_state": {"listener": {
                "name": format!("0.0.0.0_{port}"),
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {"stat_prefix": format!("outbound_0.0.0.0_{port}"),
                        "rds": {"config_source": {"ads": {}, "resource_api_version": "V3"},
                                "route_config_name": port.to_string()}}}]}],
                "traffic_direction": "OUTBOUND"}}}));
            let mut vhosts: Vec<Value> = self
                .services
                .iter()
                .filter(|s| s.port == port)
                .map(|s| {
                    let short = format!("{}.{}", s.name, s.namespace);
                    json!({"name": format!("{}:{port}", s.fqdn()),
                        "domains": [s.fqdn(), format!("{}:{port}", s.fqdn()), short.clone(),
                                    format!("{short}:{port}"), s.cluster_ip.clone(),
                                    format!("{}:{port}", s.cluster_ip)],
                        "routes": [{"name": "default", "match": {"prefix": "/"},
                            "route": {"cluster": s.cluster(), "timeout": "0s",
                                "retry_policy": {"retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
                                    "num_retries": 2, "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}],
                                    "host_selection_retry_max_attempts": "5"},
                                "max_grpc_timeout": "0s"},
                            "decorator": {"operation": format!("{}:{port}/*", s.fqdn())}}],
                        "include_request_attempt_count": true})
                })
                .collect();
            vhosts.push(json!({"name": "allow_any", "domains": ["*"],
                "routes": [{"name": "allow_any", "match": {"prefix": "/"},
                    "route": {"cluster": "PassthroughCluster", "timeout": "0s"}}]}));
            routes.push(json!({"route_config": {"name": port.to_string(),
                "virtual_hosts": vhosts, "validate_clusters": false}}));
        }
        json!({"configs": [
            {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump", "dynamic_active_clusters": clusters},
            {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "dynamic_listeners": listeners},
            {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "dynamic_route_configs": routes},
            {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump", "dynamic_endpoint_configs": endpoints},
        ]})
    }

    /// The mesh's calls as a global-sidecar reports them (three requests per call; callers in the
    /// same namespace use the short name, as applications do), in messages of 100 entries.
    fn access_logs(&self) -> Vec<StreamAccessLogsMessage> {
        let mut entries = Vec::new();
        for (n, &(from, to)) in self.calls.iter().enumerate() {
            let (a, b) = (&self.services[from], &self.services[to]);
            let authority = if a.namespace == b.namespace {
                format!("{}:{}", b.name, b.port)
            } else {
                format!("{}.{}:{}", b.name, b.namespace, b.port)
            };
            for k in 0..3u32 {
                let address = Address {
                    address: Some(AddressKind::SocketAddress(SocketAddress {
                        address: a.pod_ip.clone(),
                        port_specifier: Some(
                            envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                                40_000 + (n as u32 * 3 + k) % 20_000,
                            ),
                        ),
                        ..Default::default()
                    })),
                };
                entries.push(HttpAccessLogEntry {
                    common_properties: Some(AccessLogCommon {
                        downstream_remote_address: Some(address),
                        upstream_cluster: b.cluster(),
                        ..Default::default()
                    }),
                    request: Some(HttpRequestProperties {
                        authority: authority.clone(),
                        path: "/".into(),
                        user_agent: "demo".into(),
                        request_headers: [("slime-source-ns".to_string(), a.namespace.clone())].into(),
                        ..Default::default()
                    }),
                    response: Some(HttpResponseProperties {
                        response_code: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 200 }),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
        }
        let mut messages = Vec::new();
        let mut rest = entries.into_iter().peekable();
        while rest.peek().is_some() {
            messages.push(StreamAccessLogsMessage {
                identifier: messages.is_empty().then(|| Identifier {
                    node: Some(Node {
                        id: "sidecar~10.0.0.1~global-sidecar-demo.mesh-operator~mesh-operator.svc.cluster.local"
                            .into(),
                        ..Default::default()
                    }),
                    log_name: crate::als::LOG_NAME.into(),
                }),
                log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
                    log_entry: rest.by_ref().take(100).collect(),
                })),
            });
        }
        messages
    }
}

/// `lazyload serve`, killed when dropped.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback address nothing listens on right now.
fn free_address() -> anyhow::Result<SocketAddr> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(probe.local_addr()?)
}

/// Dependencies recorded in the fences `serve` wrote so far.
fn learned_so_far(manifests: &Path, mesh: &Mesh) -> usize {
    mesh.services
        .iter()
        .filter_map(|s| {
            let path = manifests
                .join(&s.namespace)
                .join(format!("{}.servicefence.yaml", s.name));
            let fence: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
            Some(
                fence["status"]["metricStatus"]
                    .as_mapping()
                    .map_or(0, |m| m.len()),
            )
        })
        .sum()
}

/// Runs the demo, printing what it does to `say` as it goes.
pub async fn run(args: &DemoArgs, now: Timestamp, say: &mut dyn FnMut(&str)) -> anyhow::Result<Outcome> {
    let mesh = Mesh::sample(args.services);
    let dir = &args.out;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    say(&format!(
        "[1/4] sample mesh: {} services, {} calls between them, written to {}",
        mesh.services.len(),
        mesh.calls.len(),
        dir.display()
    ));
    let cluster = dir.join("cluster.yaml");
    write(&cluster, &mesh.cluster_yaml(true))?;
    let dump = dir.join("full-config-dump.json");
    write(&dump, &mesh.config_dump().to_string())?;
    let manifests = dir.join("manifests");
    if manifests.exists() {
        std::fs::remove_dir_all(&manifests).with_context(|| format!("clearing {}", manifests.display()))?;
    }

    let (als, admin) = (free_address()?, free_address()?);
    let log = dir.join("serve.log");
    let log_file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let exe = std::env::current_exe().context("locating the lazyload binary")?;
    let mut serve = Serve(
        Command::new(exe)
            .env("RUST_LOG", "info")
            .env_remove("KUBECONFIG")
            .args(["serve", "--log-format", "json"])
            .args([
                "--als-listen",
                &als.to_string(),
                "--admin-listen",
                &admin.to_string(),
            ])
            .arg("--cluster-snapshot")
            .arg(&cluster)
            .arg("--manifests-dir")
            .arg(&manifests)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting lazyload serve")?,
    );
    say(&format!(
        "[2/4] lazyload serve: collector on {als}, admin on http://{admin} (log: {})",
        log.display()
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = loop {
        match AccessLogServiceClient::connect(format!("http://{als}")).await {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => {
                bail!("lazyload serve did not come up (see {}): {e}", log.display())
            }
            Err(_) => {
                if let Some(status) = serve.0.try_wait().context("watching lazyload serve")? {
                    bail!("lazyload serve exited ({status}); see {}", log.display())
                }
                tokio::time::sleep(Duration::from_millis(100)).await
            }
        }
    };
    let messages = mesh.access_logs();
    let entries: usize = messages
        .iter()
        .map(|m| match &m.log_entries {
            Some(LogEntries::HttpLogs(h)) => h.log_entry.len(),
            _ => 0,
        })
        .sum();
    say(&format!(
        "[3/4] replaying {entries} access-log entries of the global-sidecar over gRPC"
    ));
    client
        .stream_access_logs(tokio_stream::iter(messages))
        .await
        .context("streaming access logs to the collector")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut shown = None;
    let learned = loop {
        let learned = learned_so_far(&manifests, &mesh);
        if shown != Some(learned) {
            say(&format!(
                "      learned {learned}/{} dependencies",
                mesh.calls.len()
            ));
            shown = Some(learned);
        }
        if learned >= mesh.calls.len() {
            break learned;
        }
        if Instant::now() > deadline {
            bail!(
                "only {learned} of {} dependencies learned after 60 s (see {})",
                mesh.calls.len(),
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let productpage_sidecar = read(&manifests.join("bookinfo/productpage.sidecar.yaml"))?;

    say("[4/4] comparing each workload's scoped config with the full config");
    let mut fenced = mesh.cluster_yaml(false);
    for m in &mesh.services {
        let fence = manifests
            .join(&m.namespace)
            .join(format!("{}.servicefence.yaml", m.name));
        fenced.push_str("\n---\n");
        if fence.exists() {
            fenced.push_str(&read(&fence)?);
        } else {
            fenced.push_str(&serde_yaml::to_string(&m.fence()).context("serialising a fence")?);
        }
    }
    let fenced_path = dir.join("cluster-with-fences.yaml");
    write(&fenced_path, &fenced)?;
    let report = report::run(
        &ReportArgs {
            config: None,
            cluster_snapshot: fenced_path,
            config_dump: vec![dump],
            json: false,
        },
        now,
    )?;
    Ok(Outcome {
        learned,
        report,
        productpage_sidecar,
    })
}

/// The end-of-run summary: the productpage Sidecar, the bookinfo rows and the mesh total.
pub fn summary(outcome: &Outcome) -> String {
    let table = report::table(&outcome.report);
    let mut lines = table.lines();
    let mut out = String::from("\nLearned Sidecar of bookinfo/productpage:\n");
    out.push_str(&outcome.productpage_sidecar);
    out.push_str("\nPush size per workload (bookinfo shown; `lazyload report` lists all):\n");
    for l in lines.by_ref().take(2) {
        let _ = writeln!(out, "{l}");
    }
    for l in lines {
        if l.starts_with("bookinfo/") || l.starts_with("mesh:") {
            let _ = writeln!(out, "{l}");
        }
    }
    out
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_mesh_is_consistent() {
        for generated in [0, 1, 2, 60] {
            let mesh = Mesh::sample(generated);
            assert_eq!(mesh.services.len(), 4 + generated);
            assert!(mesh.calls.iter().all(|&(a, b)| a != b && b < mesh.services.len()));
            let ips: std::collections::BTreeSet<&str> =
                mesh.services.iter().map(|s| s.pod_ip.as_str()).collect();
            assert_eq!(ips.len(), mesh.services.len(), "pod IPs are unique");
        }
        assert_eq!(Mesh::sample(60).calls.len(), 3 + 120);
    }
}
