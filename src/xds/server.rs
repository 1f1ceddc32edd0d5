//! The relay's ADS server: couples each downstream stream to a fresh upstream stream.
//!
//! As istio-agent does: one upstream stream per downstream stream; when the upstream ends or
//! fails, the downstream stream ends too, and Envoy reconnects with its config intact. Requests
//! go upstream through an unbounded queue, responses downstream through a one-slot channel, and
//! the loop stops reading istiod while a response waits, so neither direction can deadlock the
//! other (istio issue 39209). When istiod cannot be reached as a global-sidecar connects, the
//! stream is served from the node class's last good config until istiod answers again.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as DeltaResource,
};
use prost::Message;
use regex::Regex;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::transport::{Server, ServerTlsConfig};
use tonic::{Request, Status};
use tracing::Instrument;

use super::adjust::{Adjuster, Counts, Settings};
use super::cache::{Interner, LastGood, ResourceSet, Snapshot};
use super::delta::DeltaStream;
use super::grpc::{self, Framed, Messages, Outgoing};
use super::metrics::{AdjustLabels, Metrics, StreamLabels, short_type};
use super::request::SotwRequest;
use super::response::{DecodeError, RawAny, ResponseHead, SotwResponse};
use super::sotw::SotwStream;
use super::stream::{Reply, StreamState};
use super::upstream::{Backoff, MAX_MESSAGE, Upstream, retryable, routine_close};
use super::{ENDPOINT, NodeInfo, ROUTE, is_wildcard_type};

/// How the relay behaves.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// The adjustments.
    pub settings: Settings,
    /// istiod.
    pub upstream: Upstream,
    /// Node ids matching this also get the adjustments.
    pub node_pattern: Option<Regex>,
    /// How long to keep trying istiod before a global-sidecar is served its last good config.
    pub open_budget: Duration,
    /// How often a stream served from the last good config checks whether istiod is back.
    pub probe_interval: Duration,
    /// Bounds on the listeners' connections and requests.
    pub limits: ServerLimits,
}

/// Bounds on what downstreams may hold or send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections at once and the handshake timeout, per listener.
    pub connections: crate::net::ConnectionLimits,
    /// Largest request accepted from a downstream (istiod's own limit is 4 MiB too); a larger
    /// one ends its stream with `ResourceExhausted`.
    pub max_request_bytes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            connections: crate::net::ConnectionLimits::default(),
            max_request_bytes: MAX_REQUEST,
        }
    }
}

/// Default of [`ServerLimits::max_request_bytes`]: istiod's default receive limit.
pub const MAX_REQUEST: usize = 4 << 20;
/// Idle connections are pinged this often; a peer that does not answer within
/// [`KEEPALIVE_TIMEOUT`] is gone and its connection (and streams, and their upstream streams)
/// is closed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent streams per connection: Envoy opens one ADS stream per connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 16;

/// An HTTP/2 receive window of `bytes`, within what HTTP/2 allows (2^31 - 1; h2 panics above).
fn receive_window(bytes: usize) -> u32 {
    u32::try_from(bytes).map_or(i32::MAX as u32, |b| b.clamp(65_535, i32::MAX as u32))
}

/// The relay service (cheap to clone).
#[derive(Clone, Debug)]
pub struct Relay {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: RelayConfig,
    interner: Interner,
    last_good: LastGood,
    metrics: Metrics,
    generation: AtomicU64,
    shutdown: CancellationToken,
    streams: Mutex<BTreeMap<u64, StreamView>>,
}

/// A stream as `/debug/relay` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct StreamView {
    /// Node id.
    pub node: String,
    /// Node class.
    pub class: String,
    /// `sotw` or `delta`.
    pub protocol: &'static str,
    /// Whether adjustments apply.
    pub global_sidecar: bool,
    /// `relay` or `last-good`.
    pub mode: &'static str,
    /// Latest version pushed per type.
    pub versions: BTreeMap<String, String>,
}

/// What `/debug/relay` returns.
#[derive(Debug, Serialize)]
pub struct DebugView {
    /// Open streams by generation.
    pub streams: BTreeMap<u64, StreamView>,
    /// Last good config per node class: generation and resources per type.
    pub last_good: BTreeMap<String, LastGoodView>,
}

/// A last-good snapshot summary.
#[derive(Debug, Serialize)]
pub struct LastGoodView {
    /// Upstream stream it came from.
    pub generation: u64,
    /// Resource count per type.
    pub resources: BTreeMap<String, usize>,
    /// Encoded bytes.
    pub bytes: usize,
}

impl Relay {
    /// A relay; its streams end when `shutdown` is cancelled.
    pub fn new(config: RelayConfig, shutdown: CancellationToken) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                interner: Interner::default(),
                last_good: LastGood::default(),
                metrics: Metrics::default(),
                generation: AtomicU64::new(0),
                shutdown,
                streams: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// The relay's metrics (register them once).
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Streams and last good config, for `/debug/relay`.
    pub fn debug_view(&self) -> DebugView {
        let streams = self
            .shared
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let last_good = self
            .shared
            .last_good
            .all()
            .into_iter()
            .map(|(class, snap)| {
                let view = LastGoodView {
                    generation: snap.generation,
                    resources: snap
                        .types
                        .iter()
                        .map(|(t, s)| (short_type(t).to_string(), s.len()))
                        .collect(),
                    bytes: snap.bytes(),
                };
                (class, view)
            })
            .collect();
        DebugView { streams, last_good }
    }

    /// Serves ADS on `listener` (TLS when `tls` is set) until shutdown.
    pub async fn serve(self, listener: TcpListener, tls: Option<ServerTlsConfig>) -> anyhow::Result<()> {
        let shutdown = self.shared.shutdown.clone();
        let limits = self.shared.config.limits;
        let refused = self.shared.metrics.refused_connections.clone();
        let service = AdsService {
            relay: self,
            max_request_bytes: limits.max_request_bytes,
        };
        let mut builder = Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            // A SotW EDS request names every cluster (hundreds of KiB at 10,000 services): a
            // window as large as the largest request accepted takes it without a round trip.
            .initial_stream_window_size(receive_window(limits.max_request_bytes))
            .initial_connection_window_size(receive_window(limits.max_request_bytes));
        if let Some(tls) = tls {
            builder = builder.tls_config(tls)?;
        }
        let incoming = crate::net::bounded_incoming(listener, limits.connections, refused);
        builder
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await?;
        Ok(())
    }

    /// Answers one ADS call of protocol `P`: its requests of at most `limit` bytes are served
    /// by a task of their own, its responses are the answer's body.
    fn start<P: Protocol>(&self, req: http::Request<Body>, limit: usize) -> http::Response<Body> {
        let (parts, body) = req.into_parts();
        let request = Request::from_http(http::Request::from_parts(parts, ()));
        // A client certificate tonic verified against --xds-tls-client-ca authenticates the client.
        let verified = request.peer_certs().is_some_and(|certs| !certs.is_empty());
        let metadata = request.into_parts().0;
        let (tx, rx) = mpsc::channel(1);
        match self.shared.config.upstream.may_serve(&metadata, verified) {
            Ok(()) => {
                let inbound = Decoded::new(Messages::request(body, limit), P::decode_request);
                tokio::spawn(run_stream::<P>(self.shared.clone(), metadata, inbound, tx));
            }
            Err(status) => {
                tracing::warn!(
                    "refused a stream from an unauthenticated client: {}",
                    status.message()
                );
                self.shared.metrics.unauthenticated.inc();
                // The channel is empty: this send cannot fail.
                let _ = tx.try_send(Err(status));
            }
        }
        grpc::response(Outgoing::response(ReceiverStream::new(rx)))
    }
}

/// Responses on their way to a downstream, framed (a one-slot channel: see the module doc).
type Downstream = mpsc::Sender<Result<Framed, Status>>;

/// The messages of a stream, decoded as they come.
struct Decoded<T> {
    messages: Messages,
    decode: fn(Bytes) -> Result<T, DecodeError>,
}

impl<T> Decoded<T> {
    fn new(messages: Messages, decode: fn(Bytes) -> Result<T, DecodeError>) -> Self {
        Self { messages, decode }
    }

    /// The next message; one that does not decode is `Internal`, as tonic reports it.
    async fn message(&mut self) -> Result<Option<T>, Status> {
        match self.messages.message().await? {
            Some(bytes) => (self.decode)(bytes)
                .map(Some)
                .map_err(|e| Status::internal(format!("failed to decode the message: {e}"))),
            None => Ok(None),
        }
    }
}

/// The ADS gRPC service. Written out rather than generated so that messages are framed by
/// [`grpc`] and SotW messages read as [`SotwRequest`] and [`SotwResponse`] (kept encoded)
/// instead of decoded whole.
#[derive(Clone)]
struct AdsService {
    relay: Relay,
    max_request_bytes: usize,
}

impl NamedService for AdsService {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

const SOTW_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

impl Service<http::Request<Body>> for AdsService {
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let response = match req.uri().path() {
            SOTW_PATH => self.relay.start::<Sotw>(req, self.max_request_bytes),
            DELTA_PATH => self.relay.start::<Delta>(req, self.max_request_bytes),
            _ => Status::unimplemented("not an ADS method").into_http(),
        };
        Box::pin(std::future::ready(Ok(response)))
    }
}

/// What differs between SotW and Delta.
trait Protocol: Send + 'static {
    type Request: Clone + Send + Sync + 'static;
    type Response: Send + 'static;
    type State: StreamState<Request = Self::Request, Response = Self::Response>;
    const NAME: &'static str;

    /// A request as received.
    fn decode_request(bytes: Bytes) -> Result<Self::Request, DecodeError>;
    /// A request framed for istiod.
    fn frame_request(req: &Self::Request) -> Bytes;
    /// A response as received from istiod.
    fn decode_response(bytes: Bytes) -> Result<Self::Response, DecodeError>;
    /// A response framed for the downstream.
    fn frame_response(resp: &Self::Response) -> Framed;

    fn node(req: &Self::Request) -> Option<&Node>;
    /// The type URL a request is for.
    fn requested_type(req: &Self::Request) -> &str;
    /// The type URLs of a response's resources.
    fn resource_types(resp: &Self::Response) -> impl Iterator<Item = &str>;
    /// The gRPC method's path.
    const PATH: &'static str;
    fn new_state(generation: u64) -> Self::State;
    /// Type URL, version and resource bytes of a response (for metrics and debug).
    fn describe(resp: &Self::Response) -> (&str, &str, usize);
    /// The answer to a request from a last good snapshot, when it needs one. `answered` keeps
    /// per type what was last answered.
    fn from_snapshot(
        snap: &Snapshot,
        req: &Self::Request,
        answered: &mut HashMap<String, Vec<String>>,
        seq: u64,
    ) -> Option<Self::Response>;
}

struct Sotw;
struct Delta;

impl Protocol for Sotw {
    type Request = SotwRequest;
    type Response = SotwResponse;
    type State = SotwStream;
    const NAME: &'static str = "sotw";
    const PATH: &'static str = SOTW_PATH;

    fn decode_request(bytes: Bytes) -> Result<SotwRequest, DecodeError> {
        Ok(SotwRequest::decode(&bytes)?)
    }

    fn frame_request(req: &SotwRequest) -> Bytes {
        grpc::frame_with(req.encoded_len(), |buf| req.encode(buf))
    }

    fn decode_response(bytes: Bytes) -> Result<SotwResponse, DecodeError> {
        SotwResponse::decode(bytes)
    }

    fn frame_response(resp: &SotwResponse) -> Framed {
        resp.frame()
    }

    fn node(req: &SotwRequest) -> Option<&Node> {
        req.head.node.as_ref()
    }

    fn requested_type(req: &SotwRequest) -> &str {
        &req.head.type_url
    }

    fn resource_types(resp: &SotwResponse) -> impl Iterator<Item = &str> {
        resp.resources().iter().map(|r| &*r.type_url)
    }

    fn new_state(generation: u64) -> SotwStream {
        SotwStream::new(generation)
    }

    fn describe(resp: &SotwResponse) -> (&str, &str, usize) {
        (
            &resp.head.type_url,
            &resp.head.version_info,
            resp.resource_bytes(),
        )
    }

    fn from_snapshot(
        snap: &Snapshot,
        req: &SotwRequest,
        answered: &mut HashMap<String, Vec<String>>,
        seq: u64,
    ) -> Option<SotwResponse> {
        let (head, requested) = (&req.head, req.resource_names());
        let mut names = requested.clone();
        names.sort();
        if !head.response_nonce.is_empty() && answered.get(&head.type_url) == Some(&names) {
            return None; // an ACK
        }
        answered.insert(head.type_url.clone(), names);
        let set = snap.types.get(&head.type_url);
        let resources = if is_wildcard_type(&head.type_url) {
            set.map(|s| s.values().map(|r| r.to_raw()).collect())
                .unwrap_or_default()
        } else {
            requested
                .iter()
                .filter_map(|n| named_or_empty(&head.type_url, n, set))
                .collect()
        };
        let head = ResponseHead {
            version_info: format!("last-good-{}", snap.generation),
            type_url: head.type_url.clone(),
            nonce: format!("lg-{seq}"),
            ..Default::default()
        };
        Some(SotwResponse::new(head, resources))
    }
}

impl Protocol for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    type State = DeltaStream;
    const NAME: &'static str = "delta";
    const PATH: &'static str = DELTA_PATH;

    fn decode_request(bytes: Bytes) -> Result<DeltaDiscoveryRequest, DecodeError> {
        Ok(DeltaDiscoveryRequest::decode(bytes)?)
    }

    fn frame_request(req: &DeltaDiscoveryRequest) -> Bytes {
        grpc::frame(req)
    }

    fn decode_response(bytes: Bytes) -> Result<DeltaDiscoveryResponse, DecodeError> {
        Ok(DeltaDiscoveryResponse::decode(bytes)?)
    }

    fn frame_response(resp: &DeltaDiscoveryResponse) -> Framed {
        grpc::frame(resp).into()
    }

    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn requested_type(req: &DeltaDiscoveryRequest) -> &str {
        &req.type_url
    }

    fn resource_types(resp: &DeltaDiscoveryResponse) -> impl Iterator<Item = &str> {
        resp.resources
            .iter()
            .filter_map(|r| r.resource.as_ref())
            .map(|r| r.type_url.as_str())
    }

    fn new_state(generation: u64) -> DeltaStream {
        DeltaStream::new(generation)
    }

    fn describe(resp: &DeltaDiscoveryResponse) -> (&str, &str, usize) {
        let bytes = resp
            .resources
            .iter()
            .filter_map(|r| r.resource.as_ref())
            .map(|r| r.value.len())
            .sum();
        (&resp.type_url, &resp.system_version_info, bytes)
    }

    fn from_snapshot(
        snap: &Snapshot,
        req: &DeltaDiscoveryRequest,
        answered: &mut HashMap<String, Vec<String>>,
        seq: u64,
    ) -> Option<DeltaDiscoveryResponse> {
        let first = !answered.contains_key(&req.type_url);
        if !first && req.resource_names_subscribe.is_empty() {
            return None; // an ACK or an unsubscribe
        }
        let set = snap.types.get(&req.type_url);
        let wildcard = is_wildcard_type(&req.type_url)
            && (first && req.resource_names_subscribe.is_empty()
                || req.resource_names_subscribe.iter().any(|n| n == "*"));
        let names: Vec<String> = if wildcard {
            set.map(|s| s.keys().map(|k| k.to_string()).collect())
                .unwrap_or_default()
        } else {
            req.resource_names_subscribe.clone()
        };
        answered
            .entry(req.type_url.clone())
            .or_default()
            .extend(names.iter().cloned());
        let resources = names
            .iter()
            .filter_map(|n| {
                named_or_empty(&req.type_url, n, set).map(|any| DeltaResource {
                    name: n.clone(),
                    version: format!("last-good-{}", snap.generation),
                    resource: Some(any.into_any()),
                    ..Default::default()
                })
            })
            .collect();
        Some(DeltaDiscoveryResponse {
            system_version_info: format!("last-good-{}", snap.generation),
            resources,
            type_url: req.type_url.clone(),
            nonce: format!("lg-{seq}"),
            ..Default::default()
        })
    }
}

/// A named resource from a snapshot; a requested route or endpoint name the snapshot lacks is
/// answered empty, because Envoy waits forever for names nobody answers.
fn named_or_empty(type_url: &str, name: &str, set: Option<&ResourceSet>) -> Option<RawAny> {
    if let Some(r) = set.and_then(|s| s.get(name)) {
        return Some(r.to_raw());
    }
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    match type_url {
        ROUTE => Some(RawAny::pack(
            ROUTE,
            &RouteConfiguration {
                name: name.into(),
                ..Default::default()
            },
        )),
        ENDPOINT => Some(RawAny::pack(
            ENDPOINT,
            &ClusterLoadAssignment {
                cluster_name: name.into(),
                ..Default::default()
            },
        )),
        _ => None,
    }
}

async fn run_stream<P: Protocol>(
    shared: Arc<Shared>,
    metadata: MetadataMap,
    mut inbound: Decoded<P::Request>,
    tx: Downstream,
) {
    let first = match inbound.message().await {
        Ok(Some(first)) if P::node(&first).is_some() => first,
        Ok(Some(_)) => {
            let status = Status::invalid_argument("the first request of a stream must carry the node");
            refuse(&shared, &tx, status).await;
            return;
        }
        Ok(None) => return,
        Err(status) => {
            match invalid_request(&status) {
                Some(status) => refuse(&shared, &tx, status).await,
                None => tracing::debug!("downstream stream failed before its first request: {status}"),
            }
            return;
        }
    };
    let node = NodeInfo::from_node(P::node(&first), shared.config.node_pattern.as_ref());
    let generation = shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
    let span = tracing::info_span!("xds", node = %node.id, protocol = P::NAME, generation);
    let labels = StreamLabels {
        protocol: P::NAME,
        global_sidecar: node.global_sidecar,
    };
    async {
        tracing::info!(class = %node.class, global_sidecar = node.global_sidecar, "stream opened");
        shared.metrics.streams.get_or_create(&labels).inc();
        set_view(&shared, generation, |v| {
            *v = Some(StreamView {
                node: node.id.clone(),
                class: node.class.clone(),
                protocol: P::NAME,
                global_sidecar: node.global_sidecar,
                mode: "relay",
                versions: BTreeMap::new(),
            })
        });
        let result = couple::<P>(&shared, &metadata, first, inbound, &tx, node.clone(), generation).await;
        shared.metrics.streams.get_or_create(&labels).dec();
        shared.last_good.stream_ended(&node.class, generation);
        set_view(&shared, generation, |v| *v = None);
        match result {
            Ok(()) => tracing::info!("stream closed"),
            Err(status) => {
                tracing::info!("ending the stream: {}", status.message());
                let _ = tx.send(Err(status)).await;
            }
        }
    }
    .instrument(span)
    .await
}

/// The status to end a stream with when reading a downstream request failed because of what the
/// client sent (undecodable, or over the size limit); `None` when the client went away.
fn invalid_request(status: &Status) -> Option<Status> {
    match status.code() {
        // A message that is not protobuf is `Internal` (`Decoded`, as tonic's decoder reports it).
        tonic::Code::Internal => Some(Status::invalid_argument(format!(
            "undecodable request: {}",
            status.message()
        ))),
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => Some(Status::resource_exhausted(
            format!("request too large: {}", status.message()),
        )),
        _ => None,
    }
}

/// Ends a stream whose client sent an invalid request, with a warning and a count.
async fn refuse(shared: &Shared, tx: &Downstream, status: Status) {
    tracing::warn!(code = ?status.code(), "ending a downstream stream: {}", status.message());
    shared.metrics.invalid_requests.inc();
    let _ = tx.send(Err(status)).await;
}

/// Why a response from istiod is not relayed: its type was never requested on this stream, or a
/// resource in it is of another type than the response says.
fn invalid_response<P: Protocol>(resp: &P::Response, requested: &HashSet<String>) -> Option<String> {
    let (type_url, _, _) = P::describe(resp);
    if !requested.contains(type_url) {
        return Some(format!(
            "a response of type {type_url:?}, which this stream never requested"
        ));
    }
    P::resource_types(resp)
        .find(|t| *t != type_url)
        .map(|other| format!("a response of type {type_url:?} holding a resource of type {other:?}"))
}

fn set_view(shared: &Shared, generation: u64, f: impl FnOnce(&mut Option<StreamView>)) {
    let mut streams = shared.streams.lock().unwrap_or_else(|e| e.into_inner());
    let mut entry = streams.remove(&generation);
    f(&mut entry);
    if let Some(e) = entry {
        streams.insert(generation, e);
    }
}

/// Opens the upstream stream (retrying within the budget), then pumps both directions.
async fn couple<P: Protocol>(
    shared: &Shared,
    metadata: &MetadataMap,
    first: P::Request,
    mut inbound: Decoded<P::Request>,
    tx: &Downstream,
    node: NodeInfo,
    generation: u64,
) -> Result<(), Status> {
    let mut requested: HashSet<String> = HashSet::from([P::requested_type(&first).to_string()]);
    let mut state = node.global_sidecar.then(|| P::new_state(generation));
    let first_up = match &mut state {
        Some(s) => s.downstream_request(first.clone()).0,
        None => first.clone(),
    };
    // istiod answers the stream (headers included) only with its first response: a downstream
    // that leaves before then must not leave the upstream stream and connection behind.
    let opened = tokio::select! {
        opened = open::<P>(shared, metadata, &first_up) => opened,
        () = tx.closed() => {
            tracing::info!("downstream left before istiod answered: upstream stream dropped");
            return Ok(());
        }
    };
    let (up_tx, mut upstream) = match opened {
        Ok(pair) => pair,
        Err(status) => {
            if node.global_sidecar
                && let Some(snap) = shared.last_good.get(&node.class)
            {
                return serve_last_good::<P>(shared, &snap, first, inbound, tx, generation).await;
            }
            return Err(status);
        }
    };
    let settings = &shared.config.settings;
    let adjuster = Adjuster {
        settings,
        node: &node,
    };
    let mut pending: VecDeque<P::Response> = VecDeque::new();
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return Err(Status::unavailable("the relay is shutting down")),
            () = tx.closed() => return Ok(()),
            permit = tx.reserve(), if !pending.is_empty() => match permit {
                Ok(permit) => send_oldest::<P>(permit, &mut pending),
                Err(_) => return Ok(()),
            },
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    if !requested.contains(P::requested_type(&req)) {
                        requested.insert(P::requested_type(&req).to_string());
                    }
                    forward_request::<P>(shared, &mut state, &node.class, generation, req, &up_tx)?;
                }
                Ok(None) => return Ok(()),
                Err(status) => return downstream_failed(shared, &status),
            },
            msg = upstream.message(), if pending.is_empty() => match msg {
                Ok(Some(resp)) if let Some(why) = invalid_response::<P>(&resp, &requested) => {
                    not_relayed::<P>(shared, &resp, &why);
                }
                Ok(Some(resp)) => {
                    let resp = match &mut state {
                        Some(s) => adjust_response::<P>(shared, s, &adjuster, resp),
                        None => resp,
                    };
                    record_push::<P>(shared, generation, &resp);
                    pending.push_back(resp);
                }
                Ok(None) => return Err(Status::unavailable("istiod closed the stream")),
                Err(status) => return Err(upstream_failed(&status)),
            },
        }
    }
}

/// Sends the oldest response waiting for the downstream, into the slot reserved for it.
fn send_oldest<P: Protocol>(
    permit: mpsc::Permit<'_, Result<Framed, Status>>,
    pending: &mut VecDeque<P::Response>,
) {
    if let Some(resp) = pending.pop_front() {
        permit.send(Ok(P::frame_response(&resp)));
    }
}

/// How a failed read of the downstream stream ends it: with the reason when the client sent
/// something invalid, quietly when it went away.
fn downstream_failed(shared: &Shared, status: &Status) -> Result<(), Status> {
    if let Some(status) = invalid_request(status) {
        shared.metrics.invalid_requests.inc();
        tracing::warn!(code = ?status.code(), "downstream sent an invalid request");
        return Err(status);
    }
    tracing::debug!("downstream stream failed: {status}");
    Ok(())
}

/// The status a downstream stream ends with when its upstream stream failed.
fn upstream_failed(status: &Status) -> Status {
    if routine_close(status) {
        tracing::info!("upstream stream ended: {}", status.message());
    } else {
        tracing::warn!("upstream stream failed: {status}");
    }
    Status::unavailable(format!("upstream: {}", status.message()))
}

/// Counts and logs an invalid upstream response (it is dropped).
fn not_relayed<P: Protocol>(shared: &Shared, resp: &P::Response, why: &str) {
    let (type_url, _, _) = P::describe(resp);
    let labels = Metrics::type_labels(type_url);
    shared.metrics.upstream_invalid.get_or_create(&labels).inc();
    tracing::warn!("istiod sent {why}: not relayed");
}

/// Sends a downstream request to istiod, translated on a global-sidecar stream.
fn forward_request<P: Protocol>(
    shared: &Shared,
    state: &mut Option<P::State>,
    class: &str,
    generation: u64,
    req: P::Request,
    up_tx: &mpsc::UnboundedSender<Bytes>,
) -> Result<(), Status> {
    let req = match state {
        Some(s) => relay_request::<P>(shared, s, class, generation, req),
        None => req,
    };
    up_tx
        .send(P::frame_request(&req))
        .map_err(|_| Status::unavailable("upstream stream closed"))
}

/// A downstream request translated for istiod, its meaning recorded.
fn relay_request<P: Protocol>(
    shared: &Shared,
    state: &mut P::State,
    class: &str,
    generation: u64,
    req: P::Request,
) -> P::Request {
    let (req, reply) = state.downstream_request(req);
    on_reply::<P>(shared, state, class, generation, reply);
    req
}

/// An upstream response adjusted for the downstream, the adjustments counted.
fn adjust_response<P: Protocol>(
    shared: &Shared,
    state: &mut P::State,
    adjuster: &Adjuster<'_>,
    resp: P::Response,
) -> P::Response {
    let mut counts = Counts::default();
    let resp = state.upstream_response(resp, adjuster, &shared.interner, &mut counts);
    for (what, n) in counts.0 {
        let labels = AdjustLabels { adjustment: what };
        shared.metrics.adjustments.get_or_create(&labels).inc_by(n);
    }
    resp
}

/// Counts a push and shows its version in `/debug/relay`.
fn record_push<P: Protocol>(shared: &Shared, generation: u64, resp: &P::Response) {
    let (type_url, version, bytes) = P::describe(resp);
    let labels = Metrics::type_labels(type_url);
    shared.metrics.pushes.get_or_create(&labels).inc();
    shared
        .metrics
        .push_bytes
        .get_or_create(&labels)
        .inc_by(bytes as u64);
    tracing::debug!(type_url, version, bytes, "push");
    let (t, v) = (short_type(type_url).to_string(), version.to_string());
    set_view(shared, generation, |view| {
        if let Some(view) = view {
            view.versions.insert(t, v);
        }
    });
}

fn on_reply<P: Protocol>(shared: &Shared, state: &P::State, class: &str, generation: u64, reply: Reply) {
    match reply {
        Reply::Request => {}
        Reply::Ack { type_url } => {
            if let Some(set) = state.resources(&type_url) {
                shared.last_good.acked(class, generation, &type_url, set);
            }
        }
        Reply::Nack {
            type_url,
            detail,
            adjusted,
        } => {
            let labels = Metrics::type_labels(&type_url);
            shared.metrics.nacks.get_or_create(&labels).inc();
            if adjusted.is_empty() {
                tracing::warn!(type_url, "downstream rejected istiod's config: {detail}");
            } else {
                shared.metrics.adjusted_nacks.get_or_create(&labels).inc();
                tracing::warn!(type_url, adjusted = ?adjusted, "downstream rejected a response with adjusted resources: {detail}");
            }
        }
    }
}

/// The upstream stream: framed requests to istiod, and its responses.
type Opened<P> = (mpsc::UnboundedSender<Bytes>, Decoded<<P as Protocol>::Response>);

/// Opens the upstream stream, retrying connection failures and `Unavailable` /
/// `ResourceExhausted` with jittered backoff within the open budget.
async fn open<P: Protocol>(
    shared: &Shared,
    metadata: &MetadataMap,
    first: &P::Request,
) -> Result<Opened<P>, Status> {
    let upstream = &shared.config.upstream;
    let deadline = Instant::now() + shared.config.open_budget;
    let mut backoff = Backoff::new(Duration::from_secs(2));
    loop {
        let attempt = async {
            let mut channel = upstream
                .connect()
                .await
                .map_err(|e| Status::unavailable(format!("cannot connect to {}: {e}", upstream.address())))?;
            let (up_tx, up_rx) = mpsc::unbounded_channel();
            // The receiver is alive: this send cannot fail.
            let _ = up_tx.send(P::frame_request(first));
            let body = Outgoing::request(UnboundedReceiverStream::new(up_rx).map(Ok));
            let metadata = upstream.metadata(metadata);
            let messages = grpc::call(&mut channel, P::PATH, metadata, body, MAX_MESSAGE).await?;
            Ok::<_, Status>((up_tx, Decoded::new(messages, P::decode_response)))
        };
        let result = tokio::select! {
            r = attempt => r,
            () = shared.shutdown.cancelled() => return Err(Status::unavailable("the relay is shutting down")),
        };
        match result {
            Ok(pair) => {
                shared.metrics.upstream_connects.inc();
                return Ok(pair);
            }
            Err(status) => {
                shared.metrics.upstream_failures.inc();
                let delay = backoff.delay();
                if !retryable(&status) || Instant::now() + delay > deadline {
                    tracing::warn!("cannot open the upstream stream: {status}");
                    return Err(status);
                }
                tracing::debug!(?delay, "opening the upstream stream failed, retrying: {status}");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Serves a stream from the last good config until istiod can be reached again, then ends it
/// so that the next stream is a clean handshake with istiod.
async fn serve_last_good<P: Protocol>(
    shared: &Shared,
    snap: &Snapshot,
    first: P::Request,
    mut inbound: Decoded<P::Request>,
    tx: &Downstream,
    generation: u64,
) -> Result<(), Status> {
    shared.metrics.last_good_served.inc();
    tracing::warn!(
        from_generation = snap.generation,
        "istiod is unreachable: serving the last good config"
    );
    set_view(shared, generation, |v| {
        if let Some(v) = v {
            v.mode = "last-good";
        }
    });
    let mut answered = HashMap::new();
    let mut seq = 0;
    let mut pending = VecDeque::new();
    pending.extend(P::from_snapshot(snap, &first, &mut answered, seq));
    let mut probe = tokio::time::interval(shared.config.probe_interval);
    probe.tick().await;
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return Err(Status::unavailable("the relay is shutting down")),
            permit = tx.reserve(), if !pending.is_empty() => match permit {
                Ok(permit) => send_oldest::<P>(permit, &mut pending),
                Err(_) => return Ok(()),
            },
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    seq += 1;
                    pending.extend(P::from_snapshot(snap, &req, &mut answered, seq));
                }
                Ok(None) | Err(_) => return Ok(()),
            },
            _ = probe.tick() => {
                if shared.config.upstream.connect().await.is_ok() {
                    tracing::info!("istiod is reachable again: ending the last-good stream");
                    return Err(Status::unavailable("istiod is reachable again; reconnect for a fresh handshake"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::{CLUSTER, LISTENER};
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use envoy_types::pb::google::protobuf::Any;

    #[test]
    fn responses_of_an_unrequested_type_or_with_resources_of_another_type_are_invalid() {
        let any = |type_url: &str| Any {
            type_url: type_url.into(),
            value: vec![],
        };
        let response = |type_url: &str, resources: Vec<Any>| {
            SotwResponse::from(DiscoveryResponse {
                type_url: type_url.into(),
                resources,
                ..Default::default()
            })
        };
        let requested = HashSet::from([CLUSTER.to_string()]);
        let table = [
            (response(CLUSTER, vec![any(CLUSTER), any(CLUSTER)]), None),
            (response(CLUSTER, vec![]), None),
            (response(LISTENER, vec![any(LISTENER)]), Some("never requested")),
            (
                response(CLUSTER, vec![any(CLUSTER), any(LISTENER)]),
                Some("holding a resource of type"),
            ),
        ];
        for (resp, want) in table {
            let got = invalid_response::<Sotw>(&resp, &requested);
            match want {
                None => assert_eq!(got, None, "{resp:?}"),
                Some(why) => assert!(got.as_deref().is_some_and(|g| g.contains(why)), "{got:?}"),
            }
        }
        let delta = DeltaDiscoveryResponse {
            type_url: CLUSTER.into(),
            resources: vec![DeltaResource {
                resource: Some(any(LISTENER)),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(invalid_response::<Delta>(&delta, &requested).is_some());
    }
}
