//! The gRPC Access Log Service: many concurrent streams from global-sidecars, each entry
//! attributed and handed to the learner.
//!
//! Only trusted peers may stream ([`Peers`]): with the default, a global-sidecar pod, by the
//! peer's address in the pod index; anyone else is refused with `PermissionDenied` and counted,
//! since whatever a stream claims becomes a fence's dependency. A message that does not decode
//! ends its stream with `InvalidArgument` and a warning. On shutdown every stream ends at once
//! (Envoy keeps its stream open for ever; waiting for it would hold the process).
//!
//! Each stream names itself (node, log name) on its first message only; the collector keeps
//! that per stream for its logs. Entries are processed a message at a time under one learner
//! lock. While the learner's queue is full the stream is not read (back-pressure: Envoy buffers,
//! then drops, on its side, which its ALS contract allows).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::{
    AccessLogService, AccessLogServiceServer,
};
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use envoy_types::pb::envoy::service::accesslog::v3::{StreamAccessLogsMessage, StreamAccessLogsResponse};
use jiff::Timestamp;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};

use super::attribute::{Attributor, DropReason, Hosts};
use super::entry::{Entry, Kind};
use super::{LOG_NAME, MAX_MESSAGE_BYTES, SLIME_LOG_NAME};
use crate::index::ClusterIndex;
use crate::learn::pump::LearnerHandle;
use crate::learn::{Learner, Observed};
use crate::model::scope::is_global_sidecar_address;
use crate::telemetry::register_families;

/// Why the collector stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The gRPC server failed.
    #[error("access-log server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// What one message yielded, counted without touching shared counters per entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// HTTP entries.
    pub http: u64,
    /// TCP entries.
    pub tcp: u64,
    /// Dropped entries, by [`DropReason`] reason (indexed like [`DropReason::ALL`]).
    pub dropped: [u64; DropReason::ALL.len()],
    /// Edges not learned because the learner's queue was full.
    pub queue_full: u64,
    /// Edges not learned because the learner's tables were full.
    pub table_full: u64,
    /// Edges not learned because their fence had its most hosts.
    pub fence_full: u64,
    /// New edges.
    pub learned: u64,
    /// Known edges whose last-seen time was refreshed.
    pub refreshed: u64,
}

/// Attributes every entry of `msg` and records the edges in `learner`: decode is done, the rest
/// of the per-entry work is here (the part the benchmark measures). An entry the learner
/// recently found fully known (same fingerprint, same index generation) is skipped with one
/// lookup.
pub fn process(
    attributor: &Attributor,
    index: &ClusterIndex,
    learner: &mut Learner,
    msg: &StreamAccessLogsMessage,
    hosts: &mut Hosts,
    now: Timestamp,
    tally: &mut Tally,
) {
    let generation = index.generation();
    let mut one = |entry: Entry<'_>| {
        let fingerprint = entry.fingerprint();
        if learner.recently_known(fingerprint, generation, now) {
            return;
        }
        match attributor.attribute(index, &entry, hosts) {
            Err(why) => tally.dropped[why as usize] += 1,
            Ok(fences) => {
                let mut all_known = true;
                for fence in fences {
                    for host in hosts.iter() {
                        let observed = learner.observe(fence, host, now);
                        all_known &= observed == Observed::Known;
                        match observed {
                            Observed::Known => {}
                            Observed::New => tally.learned += 1,
                            Observed::Refreshed => tally.refreshed += 1,
                            Observed::QueueFull => tally.queue_full += 1,
                            Observed::TableFull => tally.table_full += 1,
                            Observed::FenceFull => tally.fence_full += 1,
                        }
                    }
                }
                if all_known {
                    learner.remember_known(fingerprint, generation, now);
                }
            }
        }
    };
    match &msg.log_entries {
        Some(LogEntries::HttpLogs(logs)) => {
            tally.http += logs.log_entry.len() as u64;
            logs.log_entry.iter().map(Entry::http).for_each(&mut one);
        }
        Some(LogEntries::TcpLogs(logs)) => {
            tally.tcp += logs.log_entry.len() as u64;
            logs.log_entry.iter().map(Entry::tcp).for_each(&mut one);
        }
        None => {}
    }
}

/// The collector's metrics. Every labelled series is created at registration (so it reads 0,
/// not absent, until something happens) and kept, so counting allocates nothing.
#[derive(Clone, Debug)]
pub struct Metrics {
    http: Counter,
    tcp: Counter,
    /// Indexed like [`DropReason::ALL`].
    dropped: Vec<Counter>,
    queue_full: Counter,
    table_full: Counter,
    fence_full: Counter,
    decode_error: Counter,
    learned: Counter,
    refreshed: Counter,
    streams: Gauge,
    /// Indexed like [`Refused::ALL`].
    refused: Vec<Counter>,
    fences_at_cap: Gauge,
    /// Connections closed because the collector's connection limit was reached.
    pub refused_connections: Counter,
}

/// Why a stream was refused: a closed set (a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The peer's address is not a global-sidecar pod's.
    NotGlobalSidecar,
    /// The connection has no peer address to check.
    NoPeerAddress,
}

impl Refused {
    /// Every reason, in counter order.
    pub const ALL: [Refused; 2] = [Refused::NotGlobalSidecar, Refused::NoPeerAddress];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::NotGlobalSidecar => "not_global_sidecar",
            Refused::NoPeerAddress => "no_peer_address",
        }
    }
}

/// Which peers may stream access logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peers {
    /// Only global-sidecar pods of these namespaces, by the peer's address in the pod index
    /// (see [`is_global_sidecar_address`]).
    GlobalSidecars(Vec<String>),
    /// Anyone who reaches the port: for the demo, tests, and collectors only trusted hosts can
    /// reach.
    Any,
}

impl Peers {
    /// Why `peer` may not stream, if it may not.
    fn refuses(&self, index: &ClusterIndex, peer: Option<IpAddr>) -> Option<Refused> {
        match (self, peer) {
            (Peers::Any, _) => None,
            (Peers::GlobalSidecars(_), None) => Some(Refused::NoPeerAddress),
            (Peers::GlobalSidecars(namespaces), Some(ip)) => {
                // An IPv4 client of a dual-stack listener shows as `::ffff:a.b.c.d`.
                let ip = ip.to_canonical();
                (!is_global_sidecar_address(index, namespaces, ip)).then_some(Refused::NotGlobalSidecar)
            }
        }
    }
}

impl Metrics {
    /// Registers the metrics under `als_`.
    pub fn register(registry: &mut Registry) -> Self {
        type Labels = Vec<(String, String)>;
        let entries = Family::<Labels, Counter>::default();
        let dropped = Family::<Labels, Counter>::default();
        let refused = Family::<Labels, Counter>::default();
        let series = |family: &Family<Labels, Counter>, key: &str, value: &str| {
            family
                .get_or_create(&vec![(key.to_string(), value.to_string())])
                .clone()
        };
        let m = Self {
            http: series(&entries, "kind", Kind::Http.as_str()),
            tcp: series(&entries, "kind", Kind::Tcp.as_str()),
            dropped: DropReason::ALL
                .iter()
                .map(|d| series(&dropped, "reason", d.as_str()))
                .collect(),
            queue_full: series(&dropped, "reason", "queue_full"),
            table_full: series(&dropped, "reason", "table_full"),
            fence_full: series(&dropped, "reason", "fence_full"),
            decode_error: series(&dropped, "reason", "decode_error"),
            learned: Counter::default(),
            refreshed: Counter::default(),
            streams: Gauge::default(),
            refused: Refused::ALL
                .iter()
                .map(|r| series(&refused, "reason", r.as_str()))
                .collect(),
            fences_at_cap: Gauge::default(),
            refused_connections: Counter::default(),
        };
        register_families(
            registry,
            "als",
            vec![
                (
                    "entries",
                    "Access-log entries received, by kind",
                    Box::new(entries),
                ),
                (
                    "dropped_entries",
                    "Entries or edges that taught nothing, by reason",
                    Box::new(dropped),
                ),
                (
                    "edges_learned",
                    "New dependencies learned",
                    Box::new(m.learned.clone()),
                ),
                (
                    "edges_refreshed",
                    "Known dependencies whose last-seen time was refreshed",
                    Box::new(m.refreshed.clone()),
                ),
                (
                    "streams_open",
                    "Access-log streams open",
                    Box::new(m.streams.clone()),
                ),
                (
                    "refused_streams",
                    "Access-log streams refused (untrusted peers), by reason",
                    Box::new(refused),
                ),
                (
                    "refused_connections",
                    "Connections closed at once because the collector's connection limit was reached",
                    Box::new(m.refused_connections.clone()),
                ),
                (
                    "fences_at_host_cap",
                    "Fences that reached general.maxLearnedHostsPerFence (further hosts are not learned)",
                    Box::new(m.fences_at_cap.clone()),
                ),
            ],
        );
        m
    }

    /// Adds a message's tally.
    pub fn record(&self, t: &Tally) {
        self.http.inc_by(t.http);
        self.tcp.inc_by(t.tcp);
        for (counter, n) in self.dropped.iter().zip(t.dropped) {
            counter.inc_by(n);
        }
        self.queue_full.inc_by(t.queue_full);
        self.table_full.inc_by(t.table_full);
        self.fence_full.inc_by(t.fence_full);
        self.learned.inc_by(t.learned);
        self.refreshed.inc_by(t.refreshed);
    }

    fn decode_error(&self) {
        self.decode_error.inc();
    }
}

/// The `AccessLogService` implementation.
#[derive(Clone, Debug)]
pub struct Collector {
    index: Arc<RwLock<ClusterIndex>>,
    attributor: Arc<Attributor>,
    learner: LearnerHandle,
    metrics: Metrics,
    peers: Arc<Peers>,
    /// Ends every stream (set by [`serve`]).
    shutdown: CancellationToken,
}

impl Collector {
    /// A collector taking streams from `peers`, attributing against `index` and learning into
    /// `learner`.
    pub fn new(
        index: Arc<RwLock<ClusterIndex>>,
        attributor: Attributor,
        learner: LearnerHandle,
        metrics: Metrics,
        peers: Peers,
    ) -> Self {
        Self {
            index,
            attributor: Arc::new(attributor),
            learner,
            metrics,
            peers: Arc::new(peers),
            shutdown: CancellationToken::new(),
        }
    }

    /// The tonic service, with a bounded message size.
    pub fn into_service(self) -> AccessLogServiceServer<Self> {
        AccessLogServiceServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn handle(&self, msg: &StreamAccessLogsMessage, hosts: &mut Hosts) {
        let mut tally = Tally::default();
        let (pending, at_cap) = {
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            let mut learner = self.learner.lock();
            process(
                &self.attributor,
                &index,
                &mut learner,
                msg,
                hosts,
                Timestamp::now(),
                &mut tally,
            );
            (learner.pending(), learner.fences_at_cap())
        };
        self.learner.queued(pending);
        self.metrics.record(&tally);
        self.metrics
            .fences_at_cap
            .set(i64::try_from(at_cap).unwrap_or(i64::MAX));
    }
}

/// How prost's decode errors begin (tonic passes them on as the status message).
const PROST_DECODE_ERROR: &str = "failed to decode Protobuf message";

impl Collector {
    /// Counts and logs a stream that failed, and says why to its sender: what does not decode
    /// is the sender's fault (`InvalidArgument`, or the size limit's own status); a stream the
    /// sender broke off is only logged at debug level.
    fn failed(&self, peer: Option<SocketAddr>, status: Status) -> Status {
        match status.code() {
            // tonic reports a message that does not decode as `Internal`, with prost's error.
            Code::Internal if status.message().starts_with(PROST_DECODE_ERROR) => {
                self.metrics.decode_error();
                tracing::warn!(
                    ?peer,
                    "access-log stream ended: a message is not an access-log message: {}",
                    status.message()
                );
                Status::invalid_argument(format!("not a StreamAccessLogsMessage: {}", status.message()))
            }
            Code::OutOfRange | Code::ResourceExhausted => {
                self.metrics.decode_error();
                tracing::warn!(?peer, "access-log stream ended: {}", status.message());
                status
            }
            _ => {
                tracing::debug!(?peer, "access-log stream failed: {status}");
                status
            }
        }
    }
}

/// Decrements the open-streams gauge when a stream ends, however it ends.
struct StreamGuard(Gauge);

impl std::ops::Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[tonic::async_trait]
impl AccessLogService for Collector {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let peer = request.remote_addr();
        let refused = {
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            self.peers.refuses(&index, peer.map(|p| p.ip()))
        };
        if let Some(why) = refused {
            self.metrics.refused[why as usize].inc();
            tracing::warn!(
                ?peer,
                reason = why.as_str(),
                "access-log stream refused: only global-sidecars may send access logs"
            );
            return Err(Status::permission_denied(format!(
                "access logs are taken from global-sidecar pods only ({})",
                why.as_str()
            )));
        }
        let mut stream = request.into_inner();
        self.metrics.streams.inc();
        let _guard = StreamGuard(self.metrics.streams.clone());
        // The identifier comes on the first message only.
        let mut identified = false;
        let mut hosts = Hosts::default();
        loop {
            let next = async {
                self.learner.wait_for_room().await;
                stream.message().await
            };
            let msg = tokio::select! {
                biased;
                // What was read is learned; the rest stays with the sender.
                () = self.shutdown.cancelled() => break,
                msg = next => msg,
            };
            let msg = match msg {
                Ok(Some(msg)) => msg,
                Ok(None) => break,
                Err(status) => return Err(self.failed(peer, status)),
            };
            if !identified {
                identified = true;
                let (node, log_name) = msg.identifier.as_ref().map_or(("", ""), |id| {
                    (
                        id.node.as_ref().map_or("", |n| n.id.as_str()),
                        id.log_name.as_str(),
                    )
                });
                if log_name == LOG_NAME || log_name == SLIME_LOG_NAME {
                    tracing::info!(?peer, node, log_name, "access-log stream");
                } else {
                    tracing::warn!(
                        ?peer,
                        node,
                        log_name,
                        "access-log stream with an unexpected log name; reading it anyway"
                    );
                }
            }
            self.handle(&msg, &mut hosts);
        }
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}

/// How long connections may linger after shutdown ended their streams (a sender keeps its
/// connection open and the server would wait for it to close).
const CONNECTION_GRACE: std::time::Duration = std::time::Duration::from_millis(300);

/// Serves `collector` on `listener` until `shutdown`: then every stream ends at once (what was
/// read is learned) and connections still open a moment later are closed.
pub async fn serve(
    listener: TcpListener,
    mut collector: Collector,
    limits: crate::net::ConnectionLimits,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    collector.shutdown = shutdown.clone();
    // The collector sends almost nothing but HTTP/2 window updates; Nagle's algorithm held them
    // back and stalled the sender (measured: 63k entries/s with it, 370k+ without; larger
    // HTTP/2 windows made no measurable difference once it was off). The connections are
    // bounded like the relay's: a limit, and a deadline for the HTTP/2 preface, so idle sockets
    // cannot exhaust file descriptors; keepalive pings find peers that went away.
    let refused = collector.metrics.refused_connections.clone();
    let incoming = crate::net::bounded_incoming(listener, limits, refused);
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(collector.into_service())
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    tokio::select! {
        served = server => served?,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(CONNECTION_GRACE).await;
        } => tracing::debug!("access-log connections still open after shutdown: closed"),
    }
    Ok(())
}

/// Binds the collector's listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
