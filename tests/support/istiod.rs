//! A small upstream xDS server that behaves like istiod where the relay can tell (PROTOCOL.md):
//! SotW and Delta ADS; nonce = version + counter; only the nonce matters (stale ones ignored,
//! NACKs recorded and never answered); partial EDS pushes; a newly subscribed name answered
//! alone; an unknown route name answered with an empty RouteConfiguration; Delta removals.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use lazyload::xds::{ENDPOINT, ROUTE, is_wildcard_type};
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
    version: AtomicU64,
    nonce: AtomicU64,
    pushes: broadcast::Sender<Push>,
    seen: Mutex<Vec<Seen>>,
    streams: AtomicU64,
    stop: CancellationToken,
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

    /// Starts on a free loopback port with TLS (`cert`, `key`: PEM), as istiod's port 15012.
    pub async fn start_tls(config: Config, cert: &str, key: &str) -> Self {
        let identity = tonic::transport::Identity::from_pem(cert, key);
        Self::start_with("127.0.0.1:0".parse().unwrap(), config, None, Some(identity)).await
    }

    /// Starts on `addr` (restarting on a known port); with `max_age`, connections are closed
    /// with GOAWAY at that age, as istiod does every 30 minutes.
    pub async fn start_on(addr: SocketAddr, config: Config, max_age: Option<std::time::Duration>) -> Self {
        Self::start_with(addr, config, max_age, None).await
    }

    async fn start_with(
        addr: SocketAddr,
        config: Config,
        max_age: Option<std::time::Duration>,
        tls: Option<tonic::transport::Identity>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            config: Mutex::new(config),
            version: AtomicU64::new(1),
            nonce: AtomicU64::new(0),
            pushes: broadcast::channel(64).0,
            seen: Mutex::new(Vec::new()),
            streams: AtomicU64::new(0),
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

    /// Streams opened so far.
    pub fn streams(&self) -> u64 {
        self.state.streams.load(Ordering::SeqCst)
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

    /// The resources of a type: all (wildcard) or the named ones, unknown routes and endpoints
    /// answered empty.
    fn resources(&self, type_url: &str, names: Option<&BTreeSet<String>>) -> Vec<(String, Any)> {
        let config = self.config.lock().unwrap();
        let have = config.get(type_url);
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
        let authorization = auth(&req);
        let mut inbound = req.into_inner();
        let mut pushes = state.pushes.subscribe();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            // per type: last nonce sent, subscribed names (None = wildcard)
            let mut types: HashMap<String, (String, Option<BTreeSet<String>>)> = HashMap::new();
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
                                    let items = state.resources(&r.type_url, send.as_ref());
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
                        let names = pushed_names(only.as_deref(), subscribed.as_ref());
                        let items = state.resources(&type_url, names.as_ref());
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
                        let items = state.resources(&r.type_url, names.as_ref());
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
                        let names = pushed_names(only.as_deref(), entry.0.as_ref());
                        let items = state.resources(&type_url, names.as_ref());
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
