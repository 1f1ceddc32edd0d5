//! The demo's global-sidecar: an ADS client that subscribes through the relay the way Envoy does
//! (CDS, then EDS for the EDS clusters, LDS, then RDS for the listeners' routes; each response
//! ACKed) and sums up the config it ends with, including the relay's adjustments.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use envoy_types::pb::envoy::config::accesslog::v3::{AccessLog, access_log};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType, LbConfig};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::extensions::access_loggers::grpc::v3::HttpGrpcAccessLogConfig;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{Any, Struct, Value, value::Kind};
use prost::{Message, Name};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::als::ACCESS_LOG_CLUSTER;
use crate::vocab::ORIG_DEST_HEADER;
use crate::xds::adjust::PASSTHROUGH_CLUSTER;
use crate::xds::{CLUSTER, ENDPOINT, GLOBAL_SIDECAR_METADATA, LISTENER, ROUTE};

/// The config the global-sidecar ended with.
#[derive(Clone, Debug, Default)]
pub struct Received {
    /// Resources per type URL.
    pub counts: BTreeMap<String, usize>,
    /// Encoded bytes of all resources.
    pub bytes: usize,
    /// Virtual hosts over all route configurations.
    pub virtual_hosts: usize,
    /// HTTP connection managers.
    pub connection_managers: usize,
    /// HTTP connection managers with lazyload's access logger.
    pub logging_to_collector: usize,
    /// Whether the collector's cluster was added (A6).
    pub collector_cluster: bool,
    /// Whether `PassthroughCluster` goes where `Slime-Orig-Dest` says (A7).
    pub passthrough_by_header: bool,
    /// Route configurations whose last route sends unknown hosts to `PassthroughCluster`.
    pub catch_all_to_passthrough: usize,
}

impl Received {
    /// Resources of one type.
    pub fn count(&self, type_url: &str) -> usize {
        self.counts.get(type_url).copied().unwrap_or(0)
    }
}

/// The node a global-sidecar presents (Slime's metadata marker).
fn node() -> Node {
    let (key, value) = GLOBAL_SIDECAR_METADATA;
    Node {
        id: "sidecar~127.0.0.1~global-sidecar-demo.mesh-operator~mesh-operator.svc.cluster.local".into(),
        cluster: "global-sidecar.mesh-operator".into(),
        metadata: Some(Struct {
            fields: [(
                key.to_string(),
                Value {
                    kind: Some(Kind::StringValue(value.into())),
                },
            )]
            .into(),
        }),
        ..Default::default()
    }
}

/// One ADS stream.
struct Stream {
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: Streaming<DiscoveryResponse>,
    node: Option<Node>,
}

impl Stream {
    /// Subscribes to `names` of a type, waits for its response and ACKs it.
    async fn fetch(&mut self, type_url: &str, names: Vec<String>) -> anyhow::Result<Vec<Any>> {
        let request = DiscoveryRequest {
            node: self.node.take(),
            type_url: type_url.into(),
            resource_names: names.clone(),
            ..Default::default()
        };
        self.requests
            .send(request)
            .await
            .context("the relay closed the stream")?;
        loop {
            let response = self
                .responses
                .message()
                .await
                .context("the relay ended the stream with an error")?
                .context("the relay ended the stream")?;
            self.requests
                .send(DiscoveryRequest {
                    type_url: response.type_url.clone(),
                    version_info: response.version_info.clone(),
                    response_nonce: response.nonce.clone(),
                    resource_names: if response.type_url == type_url {
                        names.clone()
                    } else {
                        vec![]
                    },
                    ..Default::default()
                })
                .await
                .context("the relay closed the stream")?;
            if response.type_url == type_url {
                return Ok(response.resources);
            }
        }
    }
}

/// Whether an access logger sends to lazyload's collector cluster.
fn logs_to_collector(log: &AccessLog) -> bool {
    let Some(access_log::ConfigType::TypedConfig(any)) = &log.config_type else {
        return false;
    };
    let Ok(config) = decode::<HttpGrpcAccessLogConfig>(any) else {
        return false;
    };
    config
        .common_config
        .and_then(|c| c.grpc_service)
        .and_then(|g| g.target_specifier)
        .is_some_and(|t| matches!(t, TargetSpecifier::EnvoyGrpc(e) if e.cluster_name == ACCESS_LOG_CLUSTER))
}

fn decode<M: Message + Name + Default>(any: &Any) -> anyhow::Result<M> {
    M::decode(any.value.as_slice()).with_context(|| format!("the relay sent an invalid {}", M::full_name()))
}

/// Connects to the relay at `relay` (retrying until `patience` is spent, as it may still be
/// starting), converges and sums up what it received.
pub async fn subscribe(relay: SocketAddr, patience: Duration) -> anyhow::Result<Received> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut client = loop {
        match AggregatedDiscoveryServiceClient::connect(format!("http://{relay}")).await {
            Ok(c) => break c.max_decoding_message_size(1 << 30),
            Err(e) if tokio::time::Instant::now() > deadline => {
                bail!("the relay at {relay} did not come up: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let (requests, rx) = mpsc::channel(4);
    let responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .context("opening an ADS stream to the relay")?
        .into_inner();
    let mut stream = Stream {
        requests,
        responses,
        node: Some(node()),
    };
    tokio::time::timeout_at(deadline, converge(&mut stream))
        .await
        .context("the relay did not deliver the whole config in time")?
}

async fn converge(stream: &mut Stream) -> anyhow::Result<Received> {
    let mut got = Received::default();
    let mut keep = |type_url: &str, resources: &[Any]| {
        got.counts.insert(type_url.into(), resources.len());
        got.bytes += resources.iter().map(|a| a.value.len()).sum::<usize>();
    };

    let clusters = stream.fetch(CLUSTER, vec![]).await?;
    keep(CLUSTER, &clusters);
    let mut eds = BTreeSet::new();
    let (mut collector_cluster, mut passthrough_by_header) = (false, false);
    for any in &clusters {
        let c: Cluster = decode(any)?;
        collector_cluster |= c.name == ACCESS_LOG_CLUSTER;
        if c.name == PASSTHROUGH_CLUSTER {
            passthrough_by_header = matches!(&c.lb_config,
                Some(LbConfig::OriginalDstLbConfig(o)) if o.use_http_header && o.http_header_name == ORIG_DEST_HEADER);
        }
        if c.cluster_discovery_type == Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)) {
            let service = c.eds_cluster_config.map(|e| e.service_name).unwrap_or_default();
            eds.insert(if service.is_empty() { c.name } else { service });
        }
    }
    let endpoints = stream.fetch(ENDPOINT, eds.into_iter().collect()).await?;
    keep(ENDPOINT, &endpoints);

    let listeners = stream.fetch(LISTENER, vec![]).await?;
    keep(LISTENER, &listeners);
    let mut rds = BTreeSet::new();
    let (mut connection_managers, mut logging_to_collector) = (0, 0);
    for any in &listeners {
        let l: Listener = decode(any)?;
        for f in l.filter_chains.iter().flat_map(|c| &c.filters) {
            let Some(filter::ConfigType::TypedConfig(tc)) = &f.config_type else {
                continue;
            };
            if tc.type_url != HttpConnectionManager::type_url() {
                continue;
            }
            let hcm: HttpConnectionManager = decode(tc)?;
            connection_managers += 1;
            if hcm.access_log.iter().any(logs_to_collector) {
                logging_to_collector += 1;
            }
            if let Some(RouteSpecifier::Rds(r)) = hcm.route_specifier {
                rds.insert(r.route_config_name);
            }
        }
    }
    let routes = stream.fetch(ROUTE, rds.into_iter().collect()).await?;
    keep(ROUTE, &routes);
    let (mut virtual_hosts, mut catch_all_to_passthrough) = (0, 0);
    for any in &routes {
        let rc: RouteConfiguration = decode(any)?;
        virtual_hosts += rc.virtual_hosts.len();
        let last = rc
            .virtual_hosts
            .iter()
            .filter(|v| v.domains.iter().any(|d| d == "*"))
            .flat_map(|v| v.routes.last());
        if last.into_iter().any(|r| {
            matches!(&r.action, Some(Action::Route(a))
                if a.cluster_specifier == Some(ClusterSpecifier::Cluster(PASSTHROUGH_CLUSTER.into())))
        }) {
            catch_all_to_passthrough += 1;
        }
    }
    Ok(Received {
        virtual_hosts,
        connection_managers,
        logging_to_collector,
        collector_cluster,
        passthrough_by_header,
        catch_all_to_passthrough,
        ..got
    })
}
