//! A small upstream xDS server that behaves like istiod where the relay can tell (`docs/protocol.md`):
//! SotW and Delta ADS; nonce = version + counter; only the nonce matters (stale ones ignored,
//! NACKs recorded and never answered); partial EDS pushes; a newly subscribed name answered
//! alone; an unknown route name answered with an empty RouteConfiguration; Delta removals.
//! Started with a [`SidecarShape`], it also shapes a sidecar's listeners and clusters by the
//! node's interception mode, as istiod does (see [`SidecarShape`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use lazyload::xds::{CLUSTER, ENDPOINT, LISTENER, ROUTE, is_wildcard_type};
use prost::Message;
use serde_json::json;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// Resources by type URL, then name.
pub type Config = BTreeMap<String, BTreeMap<String, Any>>;

/// A request as the test istiod saw it.
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

#[derive(Clone, Debug)]
enum Push {
    Full(String),
    Partial(String, Vec<String>),
}

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
    silent: std::sync::atomic::AtomicBool,
    stop: CancellationToken,
}

/// Counts a stream as open until dropped.
struct OpenStream(Arc<AtomicU64>);

impl OpenStream {
    fn new(open: &Arc<AtomicU64>) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        Self(open.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running test istiod.
pub struct TestIstiod {
    /// Its address.
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

pub use lazyload::xds::adjust::pack as any;

impl TestIstiod {
    /// Starts on a free loopback port.
    pub async fn start(config: Config) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), config, None).await
    }

    /// Starts on a free loopback port serving `config` as the config of an iptables sidecar,
    /// shaped per node as istiod shapes it for the node's interception mode (see [`SidecarShape`]).
    pub async fn start_sidecar(config: Config, shape: SidecarShape) -> Self {
        Self::start_with("127.0.0.1:0".parse().unwrap(), config, None, None, Some(shape)).await
    }

    /// Starts on a free loopback port with TLS (`cert`, `key`: PEM), as istiod's port 15012.
    pub async fn start_tls(config: Config, cert: &str, key: &str) -> Self {
        let identity = tonic::transport::Identity::from_pem(cert, key);
        Self::start_with("127.0.0.1:0".parse().unwrap(), config, None, Some(identity), None).await
    }

    /// Starts on `addr` (restarting on a known port); with `max_age`, connections are closed
    /// with GOAWAY at that age, as istiod does every 30 minutes.
    pub async fn start_on(addr: SocketAddr, config: Config, max_age: Option<std::time::Duration>) -> Self {
        Self::start_with(addr, config, max_age, None, None).await
    }

    async fn start_with(
        addr: SocketAddr,
        config: Config,
        max_age: Option<std::time::Duration>,
        tls: Option<tonic::transport::Identity>,
        shape: Option<SidecarShape>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            config: Mutex::new(config),
            shape: Mutex::new(shape),
            sent: Mutex::new(BTreeMap::new()),
            version: AtomicU64::new(1),
            nonce: AtomicU64::new(0),
            pushes: broadcast::channel(64).0,
            seen: Mutex::new(Vec::new()),
            streams: AtomicU64::new(0),
            open: Arc::new(AtomicU64::new(0)),
            silent: std::sync::atomic::AtomicBool::new(false),
            stop: CancellationToken::new(),
        });
        let stop = state.stop.clone();
        let svc = AggregatedDiscoveryServiceServer::new(Service(state.clone()))
            .max_decoding_message_size(1 << 30)
            .max_encoding_message_size(1 << 30);
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut builder = tonic::transport::Server::builder();
            if let Some(identity) = tls {
                builder = builder
                    .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                    .unwrap();
            }
            if let Some(age) = max_age {
                builder = builder
                    .max_connection_age(age)
                    .max_connection_age_grace(std::time::Duration::from_millis(100));
            }
            let incoming = lazyload::net::nodelay_incoming(listener);
            let _ = builder
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
                .await;
        });
        Self {
            addr,
            state,
            stop,
            task,
        }
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the resources of a type and pushes them to every stream.
    pub fn set(&self, type_url: &str, resources: BTreeMap<String, Any>) {
        self.state
            .config
            .lock()
            .unwrap()
            .insert(type_url.to_string(), resources);
        self.state.version.fetch_add(1, Ordering::SeqCst);
        let _ = self.state.pushes.send(Push::Full(type_url.to_string()));
    }

    /// Updates some resources of a named type and pushes only those (a partial EDS push).
    pub fn update_partial(&self, type_url: &str, resources: BTreeMap<String, Any>) {
        let names = resources.keys().cloned().collect();
        self.state
            .config
            .lock()
            .unwrap()
            .entry(type_url.to_string())
            .or_default()
            .extend(resources);
        self.state.version.fetch_add(1, Ordering::SeqCst);
        let _ = self.state.pushes.send(Push::Partial(type_url.to_string(), names));
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// The proxy's own Service now has these target ports (its Pod and Service were created or
    /// changed): istiod pushes CDS and LDS again. Only for an istiod started with a shape.
    pub fn set_own_service_ports(&self, ports: Vec<u16>) {
        if let Some(shape) = &mut *self.state.shape.lock().unwrap() {
            shape.own_service_ports = ports;
        }
        for type_url in [CLUSTER, LISTENER] {
            self.state.version.fetch_add(1, Ordering::SeqCst);
            let _ = self.state.pushes.send(Push::Full(type_url.to_string()));
        }
    }

    /// The names of every resource of a type sent so far, on any stream.
    pub fn sent(&self, type_url: &str) -> BTreeSet<String> {
        self.state
            .sent
            .lock()
            .unwrap()
            .get(type_url)
            .cloned()
            .unwrap_or_default()
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

    /// Stops serving and closes every stream.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task.abort();
        let _ = self.task.await;
    }
}

struct Service(Arc<State>);

impl State {
    fn nonce(&self) -> String {
        format!(
            "{}/{}",
            self.version.load(Ordering::SeqCst),
            self.nonce.fetch_add(1, Ordering::SeqCst)
        )
    }

    fn version(&self) -> String {
        format!("2026-11-23T00:00:00Z/{}", self.version.load(Ordering::SeqCst))
    }

    /// The resources of a type for a node in `mode`: all (wildcard) or the named ones, unknown
    /// routes and endpoints answered empty.
    fn resources(
        &self,
        type_url: &str,
        names: Option<&BTreeSet<String>>,
        mode: Interception,
    ) -> Vec<(String, Any)> {
        let items = self.lookup(type_url, names, mode);
        self.sent
            .lock()
            .unwrap()
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
        let config = self.config.lock().unwrap();
        let shaped = match &*self.shape.lock().unwrap() {
            Some(shape) => shape.shape(type_url, config.get(type_url), mode),
            None => None,
        };
        let have = shaped.as_ref().or(config.get(type_url));
        match names {
            None => have
                .into_iter()
                .flatten()
                .map(|(n, a)| (n.clone(), a.clone()))
                .collect(),
            Some(names) => names
                .iter()
                .filter_map(|n| match have.and_then(|h| h.get(n)) {
                    Some(a) => Some((n.clone(), a.clone())),
                    None if type_url == ROUTE => Some((
                        n.clone(),
                        any(&RouteConfiguration {
                            name: n.clone(),
                            ..Default::default()
                        }),
                    )),
                    None if type_url == ENDPOINT => Some((
                        n.clone(),
                        any(&ClusterLoadAssignment {
                            cluster_name: n.clone(),
                            ..Default::default()
                        }),
                    )),
                    None => None,
                })
                .collect(),
        }
    }

    fn record(
        &self,
        type_url: &str,
        nonce: &str,
        error: Option<String>,
        names: Vec<String>,
        auth: &Option<String>,
        has_node: bool,
    ) {
        self.seen.lock().unwrap().push(Seen {
            type_url: type_url.to_string(),
            nonce: nonce.to_string(),
            error,
            names,
            authorization: auth.clone(),
            has_node,
        });
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

fn auth<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let state = self.0.clone();
        state.streams.fetch_add(1, Ordering::SeqCst);
        let open = OpenStream::new(&state.open);
        let authorization = auth(&req);
        let mut inbound = req.into_inner();
        if state.silent.load(Ordering::SeqCst) {
            while let Ok(Some(r)) = inbound.message().await {
                state.record(
                    &r.type_url,
                    &r.response_nonce,
                    None,
                    r.resource_names.clone(),
                    &authorization,
                    r.node.is_some(),
                );
            }
            return Err(Status::cancelled("the client left"));
        }
        let mut pushes = state.pushes.subscribe();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let _open = open;
            // per type: last nonce sent, subscribed names (None = wildcard)
            let mut types: HashMap<String, (String, Option<BTreeSet<String>>)> = HashMap::new();
            // From the node on the first request of the stream.
            let mut mode = None;
            let respond = |type_url: &str, items: Vec<(String, Any)>| {
                let nonce = state.nonce();
                let resp = DiscoveryResponse {
                    version_info: state.version(),
                    resources: items.into_iter().map(|(_, a)| a).collect(),
                    type_url: type_url.to_string(),
                    nonce: nonce.clone(),
                    ..Default::default()
                };
                (nonce, resp)
            };
            loop {
                tokio::select! {
                    () = state.stop.cancelled() => return,
                    msg = inbound.message() => {
                        let Ok(Some(r)) = msg else { return };
                        state.record(&r.type_url, &r.response_nonce, r.error_detail.as_ref().map(|e| e.message.clone()), r.resource_names.clone(), &authorization, r.node.is_some());
                        let mode = match Interception::remember(&mut mode, r.node.as_ref()) {
                            Ok(m) => m,
                            Err(status) => { let _ = tx.send(Err(status)).await; return; }
                        };
                        let names: Option<BTreeSet<String>> = (!is_wildcard_type(&r.type_url)).then(|| r.resource_names.iter().cloned().collect());
                        let entry = types.get(&r.type_url).cloned();
                        let to_send = match entry {
                            None => Some(names.clone()),
                            Some((last, _)) if r.response_nonce.is_empty() => { let _ = last; Some(names.clone()) }
                            Some((last, _)) if r.response_nonce != last => None, // stale: ignored
                            Some(_) if r.error_detail.is_some() => None,          // NACK: never answered
                            Some((_, old)) => match (&names, &old) {
                                (Some(new), Some(old)) if new != old => {
                                    // istiod answers only the newly added names
                                    Some(Some(new.difference(old).cloned().collect()))
                                }
                                _ => None,
                            },
                        };
                        if let Some(send) = to_send {
                            let nonce = match &send {
                                Some(n) if n.is_empty() => types.get(&r.type_url).map(|t| t.0.clone()).unwrap_or_default(),
                                _ => {
                                    let items = state.resources(&r.type_url, send.as_ref(), mode);
                                    let (nonce, resp) = respond(&r.type_url, items);
                                    if tx.send(Ok(resp)).await.is_err() { return; }
                                    nonce
                                }
                            };
                            types.insert(r.type_url.clone(), (nonce, names));
                        } else if let Some(t) = types.get_mut(&r.type_url)
                            && r.error_detail.is_none()
                            && r.response_nonce == t.0
                        {
                            t.1 = names;
                        }
                    }
                    push = pushes.recv() => {
                        let Ok(push) = push else { return };
                        let (type_url, only) = match push {
                            Push::Full(t) => (t, None),
                            Push::Partial(t, names) => (t, Some(names)),
                        };
                        let Some((_, subscribed)) = types.get(&type_url).cloned() else { continue };
                        let Some(mode) = mode else { continue };
                        let names = pushed_names(only.as_deref(), subscribed.as_ref());
                        let items = state.resources(&type_url, names.as_ref(), mode);
                        let (nonce, resp) = respond(&type_url, items);
                        if tx.send(Ok(resp)).await.is_err() { return; }
                        if let Some(t) = types.get_mut(&type_url) { t.0 = nonce; }
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let state = self.0.clone();
        state.streams.fetch_add(1, Ordering::SeqCst);
        let authorization = auth(&req);
        let mut inbound = req.into_inner();
        let mut pushes = state.pushes.subscribe();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            // per type: subscribed names (None = wildcard), names the client has
            let mut types: HashMap<String, (Option<BTreeSet<String>>, BTreeSet<String>)> = HashMap::new();
            // From the node on the first request of the stream.
            let mut mode = None;
            let respond =
                |type_url: &str, items: Vec<(String, Any)>, removed: Vec<String>| DeltaDiscoveryResponse {
                    system_version_info: state.version(),
                    resources: items
                        .into_iter()
                        .map(|(name, a)| Resource {
                            name,
                            resource: Some(a),
                            ..Default::default()
                        })
                        .collect(),
                    type_url: type_url.to_string(),
                    removed_resources: removed,
                    nonce: state.nonce(),
                    ..Default::default()
                };
            loop {
                tokio::select! {
                    () = state.stop.cancelled() => return,
                    msg = inbound.message() => {
                        let Ok(Some(r)) = msg else { return };
                        state.record(&r.type_url, &r.response_nonce, r.error_detail.as_ref().map(|e| e.message.clone()), r.resource_names_subscribe.clone(), &authorization, r.node.is_some());
                        let mode = match Interception::remember(&mut mode, r.node.as_ref()) {
                            Ok(m) => m,
                            Err(status) => { let _ = tx.send(Err(status)).await; return; }
                        };
                        let first = !types.contains_key(&r.type_url);
                        let entry = types.entry(r.type_url.clone()).or_insert_with(|| {
                            let sub = (!is_wildcard_type(&r.type_url) || r.resource_names_subscribe.iter().any(|n| n != "*")).then(BTreeSet::new);
                            (sub, r.initial_resource_versions.keys().cloned().collect())
                        });
                        if let Some(sub) = &mut entry.0 {
                            sub.extend(r.resource_names_subscribe.iter().cloned());
                            for n in &r.resource_names_unsubscribe { sub.remove(n); }
                        }
                        let names: Option<BTreeSet<String>> = if first {
                            entry.0.clone()
                        } else if !r.resource_names_subscribe.is_empty() {
                            Some(r.resource_names_subscribe.iter().cloned().collect())
                        } else {
                            continue;
                        };
                        let items = state.resources(&r.type_url, names.as_ref(), mode);
                        let removed: Vec<String> = if first {
                            entry.1.iter().filter(|n| !items.iter().any(|(i, _)| i == *n)).cloned().collect()
                        } else { vec![] };
                        entry.1.extend(items.iter().map(|(n, _)| n.clone()));
                        for n in &removed { entry.1.remove(n); }
                        if tx.send(Ok(respond(&r.type_url, items, removed))).await.is_err() { return; }
                    }
                    push = pushes.recv() => {
                        let Ok(push) = push else { return };
                        let (type_url, only) = match push {
                            Push::Full(t) => (t, None),
                            Push::Partial(t, names) => (t, Some(names)),
                        };
                        let Some(entry) = types.get_mut(&type_url) else { continue };
                        let Some(mode) = mode else { continue };
                        let names = pushed_names(only.as_deref(), entry.0.as_ref());
                        let items = state.resources(&type_url, names.as_ref(), mode);
                        let removed: Vec<String> = if only.is_none() {
                            entry.1.iter().filter(|n| !items.iter().any(|(i, _)| i == *n)).cloned().collect()
                        } else { vec![] };
                        entry.1.extend(items.iter().map(|(n, _)| n.clone()));
                        for n in &removed { entry.1.remove(n); }
                        if tx.send(Ok(respond(&type_url, items, removed))).await.is_err() { return; }
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A node's interception mode, from node metadata `INTERCEPTION_MODE` (a string; istiod fails
/// the stream on a wrongly typed metadata value). Missing means iptables (`REDIRECT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interception {
    /// Traffic is redirected by iptables (`REDIRECT`, `TPROXY`).
    Redirect,
    /// `NONE`: no iptables; listeners bind their ports.
    None,
}

impl Interception {
    /// The stream's mode: read from the node on its first request, then remembered.
    fn remember(mode: &mut Option<Self>, node: Option<&Node>) -> Result<Self, Status> {
        match *mode {
            Some(m) => Ok(m),
            None => Ok(*mode.insert(Self::of(node)?)),
        }
    }

    fn of(node: Option<&Node>) -> Result<Self, Status> {
        use envoy_types::pb::google::protobuf::value::Kind;
        let value = node
            .and_then(|n| n.metadata.as_ref())
            .and_then(|m| m.fields.get("INTERCEPTION_MODE"));
        match value.map(|v| &v.kind) {
            None => Ok(Self::Redirect),
            Some(Some(Kind::StringValue(mode))) if mode == "NONE" => Ok(Self::None),
            Some(Some(Kind::StringValue(_))) => Ok(Self::Redirect),
            Some(other) => Err(Status::invalid_argument(format!(
                "failed to parse node metadata: INTERCEPTION_MODE is not a string: {other:?}"
            ))),
        }
    }
}

/// How istiod 1.14 changes a sidecar's listeners and clusters for a node in interception mode
/// `NONE` (the global-sidecar), starting from what an iptables sidecar gets (the recorded
/// config, served as it is to any other node):
///
/// - outbound HTTP listeners `0.0.0.0_<port>` (`bind_to_port: false`) become `127.0.0.1_<port>`,
///   bound on 127.0.0.1 (here on the port `outbound_binds` gives: tests cannot bind 9080);
///   other recorded outbound listeners are left as recorded;
/// - no `virtualOutbound` / `virtualInbound` (they exist only for iptables);
/// - once the proxy's own Pod and Service exist, for each of the Service's target ports an
///   inbound listener `0.0.0.0_<port>` bound on 0.0.0.0 (`traffic_direction: INBOUND`, the
///   PERMISSIVE pair of chains: mTLS with pilot-agent's SDS certificates, and plaintext HTTP,
///   each an HTTP connection manager routing to `inbound|<port>||`) and that STATIC cluster,
///   pointing at the application on 127.0.0.1.
#[derive(Clone, Debug, Default)]
pub struct SidecarShape {
    /// Recorded outbound HTTP port -> the port its NONE-mode listener binds.
    pub outbound_binds: BTreeMap<u64, u16>,
    /// Target ports of the proxy's own Service (empty: no Pod or Service yet).
    pub own_service_ports: Vec<u16>,
}

impl SidecarShape {
    /// The resources of a type for a node in `mode`, when they differ from the recorded ones.
    fn shape(
        &self,
        type_url: &str,
        recorded: Option<&BTreeMap<String, Any>>,
        mode: Interception,
    ) -> Option<BTreeMap<String, Any>> {
        if mode != Interception::None {
            return None;
        }
        let mut out = BTreeMap::new();
        match type_url {
            LISTENER => {
                for (name, listener) in recorded.into_iter().flatten() {
                    if name == "virtualOutbound" || name == "virtualInbound" {
                        continue;
                    }
                    let recorded_port = name.strip_prefix("0.0.0.0_").and_then(|p| p.parse::<u64>().ok());
                    match recorded_port.and_then(|p| Some((p, self.outbound_binds.get(&p)?))) {
                        Some((port, bind)) => {
                            let mut l = Listener::decode(&*listener.value).expect("a recorded listener");
                            l.name = format!("127.0.0.1_{port}");
                            l.address = Some(lazyload::xds::adjust::socket("127.0.0.1", u32::from(*bind)));
                            l.bind_to_port = None;
                            out.insert(l.name.clone(), any(&l));
                        }
                        None => {
                            out.insert(name.clone(), listener.clone());
                        }
                    }
                }
                for port in &self.own_service_ports {
                    out.insert(format!("0.0.0.0_{port}"), inbound_listener(*port));
                }
            }
            CLUSTER => {
                out.extend(
                    recorded
                        .into_iter()
                        .flatten()
                        .map(|(n, a)| (n.clone(), a.clone())),
                );
                for port in &self.own_service_ports {
                    out.insert(format!("inbound|{port}||"), inbound_cluster(*port));
                }
            }
            _ => return None,
        }
        Some(out)
    }
}

/// pilot-agent's SDS source, as istiod writes it.
fn agent_sds() -> serde_json::Value {
    json!({"api_config_source": {"api_type": "GRPC", "transport_api_version": "V3",
        "set_node_on_first_message_only": true,
        "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]},
        "initial_fetch_timeout": "0s", "resource_api_version": "V3"})
}

/// istiod's inbound listener for a NONE-mode sidecar's own Service port (HTTP, PERMISSIVE).
fn inbound_listener(port: u16) -> Any {
    let cluster = format!("inbound|{port}||");
    let name = format!("0.0.0.0_{port}");
    let hcm = json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": format!("inbound_0.0.0.0_{port}"),
            "route_config": {"name": cluster, "validate_clusters": false, "virtual_hosts": [{
                "name": format!("inbound|http|{port}"), "domains": ["*"],
                "routes": [{"name": "default", "match": {"prefix": "/"},
                            "route": {"cluster": cluster, "timeout": "0s"}}]}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            "normalize_path": true,
            "forward_client_cert_details": "APPEND_FORWARD",
            "set_current_client_cert_details": {"subject": true, "dns": true, "uri": true},
            "upgrade_configs": [{"upgrade_type": "websocket"}],
            "stream_idle_timeout": "0s",
            "server_name": "istio-envoy"
        }
    });
    let mtls = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": agent_sds()}],
                "combined_validation_context": {
                    "default_validation_context": {},
                    "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": agent_sds()}
                }
            },
            "require_client_certificate": true
        }
    });
    super::fixtures::any_from_json(&json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": name,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "traffic_direction": "INBOUND",
        "filter_chains": [
            {"filter_chain_match": {"destination_port": port, "transport_protocol": "tls",
                "application_protocols": ["istio-http/1.0", "istio-http/1.1", "istio-h2"]},
             "filters": [hcm], "transport_socket": mtls, "name": name},
            {"filter_chain_match": {"destination_port": port, "transport_protocol": "raw_buffer",
                "application_protocols": ["http/1.1", "http/1.0", "h2c"]},
             "filters": [hcm], "name": name}
        ],
        "listener_filters": [
            {"name": "envoy.filters.listener.tls_inspector", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}},
            {"name": "envoy.filters.listener.http_inspector", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}}
        ],
        "listener_filters_timeout": "0s",
        "continue_on_listener_filters_timeout": true
    }))
}

/// istiod's inbound cluster for a NONE-mode sidecar's own Service port: the application on
/// 127.0.0.1.
fn inbound_cluster(port: u16) -> Any {
    let name = format!("inbound|{port}||");
    super::fixtures::any_from_json(&json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "STATIC",
        "connect_timeout": "10s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}
    }))
}
