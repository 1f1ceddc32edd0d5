//! A small upstream xDS server that behaves like istiod where the relay can tell
//! (`docs/protocol.md`); the demo's built-in istiod, and the one the tests and benches run.
//!
//! SotW and Delta ADS, plaintext or TLS (as istiod's port 15012); nonce = version + counter;
//! only the nonce matters (stale ones ignored, NACKs logged, recorded and never answered);
//! full and partial (EDS) pushes; a newly subscribed name answered alone; an unknown route or
//! endpoint name answered with an empty resource; Delta removals. Started with a
//! [`SidecarShape`], it also shapes a sidecar's listeners and clusters by the node's
//! interception mode, as istiod does. Every request is recorded ([`FakeIstiod::seen`]): the
//! tests read what the relay sent upstream.

mod delta;
mod shape;
mod sotw;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

pub use self::shape::{Interception, SidecarShape};
use crate::xds::adjust::pack;
use crate::xds::{CLUSTER, ENDPOINT, LISTENER, ROUTE};

/// Resources by type URL, then name.
pub type Config = BTreeMap<String, BTreeMap<String, Any>>;

/// Why the fake istiod did not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The TLS certificate or key was refused.
    #[error("the TLS identity: {0}")]
    Tls(#[source] tonic::transport::Error),
}

/// A request as the fake istiod saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Type URL.
    pub type_url: String,
    /// `response_nonce`.
    pub nonce: String,
    /// NACK message, if any.
    pub error: Option<String>,
    /// Requested or subscribed names.
    pub names: Vec<String>,
    /// `authorization` metadata of the stream.
    pub authorization: Option<String>,
    /// Whether the request carried a node.
    pub has_node: bool,
}

/// A config change to push to every stream that has the type.
#[derive(Clone, Debug)]
enum Push {
    /// Every resource of the type changed.
    Full(String),
    /// Only these resources of the type changed (istiod's partial EDS push).
    Partial(String, Vec<String>),
}

impl Push {
    /// The type, and the names pushed (`None`: all).
    fn into_parts(self) -> (String, Option<Vec<String>>) {
        match self {
            Push::Full(t) => (t, None),
            Push::Partial(t, names) => (t, Some(names)),
        }
    }
}

/// How to start a [`FakeIstiod`].
#[derive(Default)]
pub struct Options {
    /// Where to listen (`None`: a free loopback port).
    pub addr: Option<SocketAddr>,
    /// Close connections with GOAWAY at this age, as istiod does every 30 minutes.
    pub max_age: Option<Duration>,
    /// Serve TLS with this identity (PEM certificate and key), as istiod's port 15012.
    pub tls: Option<(String, String)>,
    /// Shape a sidecar's config by the node's interception mode.
    pub shape: Option<SidecarShape>,
}

/// What the server and its streams share.
struct State {
    config: Mutex<Config>,
    shape: Mutex<Option<SidecarShape>>,
    sent: Mutex<BTreeMap<String, BTreeSet<String>>>,
    version: AtomicU64,
    nonce: AtomicU64,
    pushes: broadcast::Sender<Push>,
    seen: Mutex<Vec<Seen>>,
    streams: AtomicU64,
    open: Arc<AtomicU64>,
    silent: AtomicBool,
    stop: CancellationToken,
}

/// A running fake istiod; it stops serving when dropped.
pub struct FakeIstiod {
    /// Its address.
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

/// A lock that survives a panicked holder: the data is plain config and records.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FakeIstiod {
    /// Starts on a free loopback port serving `config`.
    ///
    /// # Errors
    /// If no loopback port can be bound.
    pub async fn start(config: Config) -> Result<Self, Error> {
        Self::start_with(config, Options::default()).await
    }

    /// Starts on a free loopback port serving `config` as the config of an iptables sidecar,
    /// shaped per node as istiod shapes it for the node's interception mode (see [`SidecarShape`]).
    ///
    /// # Errors
    /// If no loopback port can be bound.
    pub async fn start_sidecar(config: Config, shape: SidecarShape) -> Result<Self, Error> {
        let shape = Some(shape);
        Self::start_with(
            config,
            Options {
                shape,
                ..Options::default()
            },
        )
        .await
    }

    /// Starts on a free loopback port with TLS (`cert`, `key`: PEM).
    ///
    /// # Errors
    /// If no loopback port can be bound or the identity is refused.
    pub async fn start_tls(config: Config, cert: &str, key: &str) -> Result<Self, Error> {
        let tls = Some((cert.to_string(), key.to_string()));
        Self::start_with(
            config,
            Options {
                tls,
                ..Options::default()
            },
        )
        .await
    }

    /// Starts on `addr` (restarting on a known port); with `max_age`, connections are closed
    /// with GOAWAY at that age.
    ///
    /// # Errors
    /// If `addr` cannot be bound.
    pub async fn start_on(
        addr: SocketAddr,
        config: Config,
        max_age: Option<Duration>,
    ) -> Result<Self, Error> {
        Self::start_with(
            config,
            Options {
                addr: Some(addr),
                max_age,
                ..Options::default()
            },
        )
        .await
    }

    /// Starts serving `config` as `options` say.
    ///
    /// # Errors
    /// If the address cannot be bound or the TLS identity is refused.
    pub async fn start_with(config: Config, options: Options) -> Result<Self, Error> {
        let addr = options.addr.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        let bind = |source| Error::Bind { addr, source };
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        let mut builder = Server::builder();
        if let Some((cert, key)) = options.tls {
            let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
            builder = builder.tls_config(tls).map_err(Error::Tls)?;
        }
        if let Some(age) = options.max_age {
            builder = builder
                .max_connection_age(age)
                .max_connection_age_grace(Duration::from_millis(100));
        }
        let state = Arc::new(State {
            config: Mutex::new(config),
            shape: Mutex::new(options.shape),
            sent: Mutex::default(),
            version: AtomicU64::new(1),
            nonce: AtomicU64::new(0),
            pushes: broadcast::channel(64).0,
            seen: Mutex::default(),
            streams: AtomicU64::new(0),
            open: Arc::default(),
            silent: AtomicBool::new(false),
            stop: CancellationToken::new(),
        });
        // Recorded istiod pushes of a large mesh exceed tonic's 4 MiB default.
        let service = AggregatedDiscoveryServiceServer::new(Service(state.clone()))
            .max_decoding_message_size(1 << 30)
            .max_encoding_message_size(1 << 30);
        let stop = state.stop.clone();
        let task = tokio::spawn(async move {
            let served = builder
                .add_service(service)
                .serve_with_incoming_shutdown(crate::net::nodelay_incoming(listener), stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the fake istiod stopped");
            }
        });
        Ok(Self { addr, state, task })
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the resources of a type and pushes them to every stream.
    pub fn set(&self, type_url: &str, resources: BTreeMap<String, Any>) {
        lock(&self.state.config).insert(type_url.to_string(), resources);
        self.state.push(Push::Full(type_url.to_string()));
    }

    /// Updates some resources of a named type and pushes only those (a partial EDS push).
    pub fn update_partial(&self, type_url: &str, resources: BTreeMap<String, Any>) {
        let names = resources.keys().cloned().collect();
        lock(&self.state.config)
            .entry(type_url.to_string())
            .or_default()
            .extend(resources);
        self.state.push(Push::Partial(type_url.to_string(), names));
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state.seen).clone()
    }

    /// The proxy's own Service now exists or changed: `resources` are the inbound listeners and
    /// clusters istiod adds for its target ports (see [`SidecarShape::own_service`]); istiod
    /// pushes CDS and LDS again. Only for an istiod started with a shape.
    pub fn set_own_service(&self, resources: Config) {
        if let Some(shape) = &mut *lock(&self.state.shape) {
            shape.own_service = resources;
        }
        for type_url in [CLUSTER, LISTENER] {
            self.state.push(Push::Full(type_url.to_string()));
        }
    }

    /// The names of every resource of a type sent so far, on any stream.
    pub fn sent(&self, type_url: &str) -> BTreeSet<String> {
        lock(&self.state.sent).get(type_url).cloned().unwrap_or_default()
    }

    /// Streams opened so far.
    pub fn streams(&self) -> u64 {
        self.state.streams.load(Ordering::SeqCst)
    }

    /// Streams open now (SotW).
    pub fn open_streams(&self) -> u64 {
        self.state.open.load(Ordering::SeqCst)
    }

    /// From now on, new SotW streams are read but never answered, not even with headers: as
    /// istiod (grpc-go) before its first response on a stream.
    pub fn go_silent(&self) {
        self.state.silent.store(true, Ordering::SeqCst);
    }

    /// Stops serving, closes every stream and waits for the server to end.
    pub async fn stop(mut self) {
        self.state.stop.cancel();
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for FakeIstiod {
    fn drop(&mut self) {
        self.state.stop.cancel();
    }
}

impl State {
    /// A new config version, pushed to every stream.
    fn push(&self, push: Push) {
        self.version.fetch_add(1, Ordering::SeqCst);
        // No receiver: no stream is open, nothing to push to.
        let _ = self.pushes.send(push);
    }

    fn nonce(&self) -> String {
        format!(
            "{}/{}",
            self.version.load(Ordering::SeqCst),
            self.nonce.fetch_add(1, Ordering::SeqCst)
        )
    }

    /// istiod's version: the push time and a counter.
    fn version(&self) -> String {
        format!("2026-11-23T00:00:00Z/{}", self.version.load(Ordering::SeqCst))
    }

    /// The resources of a type for a node in `mode`: all (wildcard) or the named ones, unknown
    /// routes and endpoints answered empty; recorded as sent.
    fn resources(
        &self,
        type_url: &str,
        names: Option<&BTreeSet<String>>,
        mode: Interception,
    ) -> Vec<(String, Any)> {
        let items = self.lookup(type_url, names, mode);
        lock(&self.sent)
            .entry(type_url.to_string())
            .or_default()
            .extend(items.iter().map(|(n, _)| n.clone()));
        items
    }

    fn lookup(
        &self,
        type_url: &str,
        names: Option<&BTreeSet<String>>,
        mode: Interception,
    ) -> Vec<(String, Any)> {
        let config = lock(&self.config);
        let shaped = lock(&self.shape)
            .as_ref()
            .and_then(|shape| shape.shape(type_url, config.get(type_url), mode));
        let have = shaped.as_ref().or(config.get(type_url));
        let Some(names) = names else {
            return have
                .into_iter()
                .flatten()
                .map(|(n, a)| (n.clone(), a.clone()))
                .collect();
        };
        names
            .iter()
            .filter_map(|n| match have.and_then(|h| h.get(n)) {
                Some(a) => Some((n.clone(), a.clone())),
                None => empty(type_url, n).map(|a| (n.clone(), a)),
            })
            .collect()
    }

    /// Records a request; a NACK is logged too (the demo's log shows it).
    fn record(&self, seen: Seen) {
        if let Some(error) = &seen.error {
            tracing::warn!(type_url = %seen.type_url, %error, "the fake istiod: NACK");
        }
        lock(&self.seen).push(seen);
    }
}

/// What istiod answers for a requested name it does not have: an empty RouteConfiguration or
/// ClusterLoadAssignment of that name; other types leave it out.
fn empty(type_url: &str, name: &str) -> Option<Any> {
    match type_url {
        ROUTE => Some(pack(&RouteConfiguration {
            name: name.to_string(),
            ..Default::default()
        })),
        ENDPOINT => Some(pack(&ClusterLoadAssignment {
            cluster_name: name.to_string(),
            ..Default::default()
        })),
        _ => None,
    }
}

/// The names a push sends: the pushed ones the stream subscribed to (all pushed ones for a
/// wildcard stream), or everything subscribed for a full push (`None`: every resource).
fn pushed_names(only: Option<&[String]>, subscribed: Option<&BTreeSet<String>>) -> Option<BTreeSet<String>> {
    match (only, subscribed) {
        (Some(only), Some(sub)) => Some(only.iter().filter(|n| sub.contains(*n)).cloned().collect()),
        (Some(only), None) => Some(only.iter().cloned().collect()),
        (None, sub) => sub.cloned(),
    }
}

/// The stream's `authorization` metadata.
fn authorization<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
}

/// What every stream keeps besides its per-type state: the shared state, where its responses
/// go, its `authorization` metadata and the node's interception mode (from its first request).
struct Peer<R> {
    state: Arc<State>,
    tx: mpsc::Sender<Result<R, Status>>,
    authorization: Option<String>,
    mode: Option<Interception>,
}

/// What the fake records of a request, and its node.
struct Heard<'a> {
    type_url: &'a str,
    nonce: &'a str,
    error: Option<&'a RpcStatus>,
    names: &'a [String],
    node: Option<&'a Node>,
}

impl<R> Peer<R> {
    /// The peer of a new stream, and where its responses come out.
    fn new<T>(state: Arc<State>, req: &Request<T>) -> (Self, mpsc::Receiver<Result<R, Status>>) {
        state.streams.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel(16);
        let authorization = authorization(req);
        let peer = Peer {
            state,
            tx,
            authorization,
            mode: None,
        };
        (peer, rx)
    }

    /// Records a request.
    fn record(&self, heard: &Heard<'_>) {
        self.state.record(Seen {
            type_url: heard.type_url.to_string(),
            nonce: heard.nonce.to_string(),
            error: heard.error.map(|e| e.message.clone()),
            names: heard.names.to_vec(),
            authorization: self.authorization.clone(),
            has_node: heard.node.is_some(),
        });
    }

    /// Records a request and returns the node's interception mode; `None` once the stream is
    /// failed for a node istiod would refuse.
    async fn hear(&mut self, heard: Heard<'_>) -> Option<Interception> {
        self.record(&heard);
        match Interception::remember(&mut self.mode, heard.node) {
            Ok(mode) => Some(mode),
            Err(status) => {
                let _ = self.tx.send(Err(status)).await;
                None
            }
        }
    }

    /// Sends a response; `false` when the client is gone.
    async fn send(&self, response: R) -> bool {
        self.tx.send(Ok(response)).await.is_ok()
    }
}

/// The ADS service.
struct Service(Arc<State>);

/// One ADS stream's side of the conversation: a request from the client, or a push.
trait Conversation {
    /// A request of the stream.
    type Request;

    /// Answers a request; `false` ends the stream.
    async fn on_request(&mut self, request: Self::Request) -> bool;

    /// Sends a push; `false` ends the stream.
    async fn on_push(&mut self, push: Push) -> bool;
}

/// Runs a stream until the client leaves, the server stops or the conversation ends it.
async fn converse<C: Conversation>(
    mut conversation: C,
    state: Arc<State>,
    mut inbound: Streaming<C::Request>,
) {
    let mut pushes = state.pushes.subscribe();
    loop {
        let go_on = tokio::select! {
            () = state.stop.cancelled() => false,
            msg = inbound.message() => match msg {
                Ok(Some(request)) => conversation.on_request(request).await,
                _ => false,
            },
            push = pushes.recv() => match push {
                Ok(push) => conversation.on_push(push).await,
                Err(_) => false,
            },
        };
        if !go_on {
            return;
        }
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream = sotw::Responses;
    type DeltaAggregatedResourcesStream = delta::Responses;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        sotw::open(self.0.clone(), req).await
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(delta::open(self.0.clone(), req))
    }
}
