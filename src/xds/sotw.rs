//! The state-of-the-world stream state machine (sans-IO), for global-sidecar streams.
//!
//! Each upstream response becomes one downstream response: resources adjusted (only those that
//! need it are decoded), a relay nonce and version. Each downstream request becomes one upstream
//! request, its nonce and version translated back to istiod's. The stream also keeps the merged
//! view of every type (partial EDS/RDS pushes merged by name) for the last-good cache.

use std::collections::{HashMap, VecDeque};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use super::adjust::{Adjuster, Counts, ListenerOutcome, pack};
use super::cache::{Interner, ResourceSet};
use super::{CLUSTER, ENDPOINT, LISTENER, NodeInfo, ROUTE, SECRET, is_wildcard_type};

/// Responses remembered per type for translating ACKs (Envoy only ever answers recent ones).
const REMEMBERED: usize = 8;

/// The `name` (field 1) shared by Cluster, ClusterLoadAssignment, Listener, RouteConfiguration
/// and Secret; decoding only it skips the rest of the message.
#[derive(Clone, PartialEq, Message)]
struct NameOnly {
    #[prost(string, tag = "1")]
    name: String,
}

/// The name of a resource of a type the relay knows.
pub fn resource_name(type_url: &str, bytes: &[u8]) -> Option<String> {
    matches!(type_url, CLUSTER | ENDPOINT | LISTENER | ROUTE | SECRET)
        .then(|| NameOnly::decode(bytes).ok().map(|n| n.name))
        .flatten()
}

/// What a downstream request meant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A first request or a subscription change.
    Request,
    /// The latest response of the type was accepted.
    Ack {
        /// Type URL.
        type_url: String,
    },
    /// A response was rejected.
    Nack {
        /// Type URL.
        type_url: String,
        /// Envoy's error message.
        detail: String,
        /// Resources of the rejected response the relay had adjusted.
        adjusted: Vec<String>,
    },
}

#[derive(Clone, Debug)]
struct Sent {
    nonce: String,
    version: String,
    upstream_nonce: String,
    upstream_version: String,
    adjusted: Vec<String>,
}

#[derive(Debug, Default)]
struct TypeState {
    sent: VecDeque<Sent>,
    resources: ResourceSet,
}

/// One SotW stream of a global-sidecar.
#[derive(Debug)]
pub struct SotwStream {
    /// The node.
    pub node: NodeInfo,
    generation: u64,
    seq: u64,
    types: HashMap<String, TypeState>,
}

/// A resource after adjustment.
pub(crate) enum Processed {
    /// Send it (`adjusted`: the relay changed it).
    Keep {
        /// Resource name (empty for types the relay does not know).
        name: String,
        /// The resource.
        any: Any,
        /// Whether it was changed.
        adjusted: bool,
    },
    /// Do not send it (a listener on a reserved port).
    Drop,
}

/// Adjusts one resource. Resources that cannot be decoded pass through unchanged (Envoy will
/// judge them) and are counted.
pub(crate) fn process(any: Any, adj: &Adjuster<'_>, counts: &mut Counts) -> Processed {
    let name = resource_name(&any.type_url, &any.value).unwrap_or_default();
    let keep = |any, adjusted| Processed::Keep {
        name: name.clone(),
        any,
        adjusted,
    };
    match any.type_url.as_str() {
        LISTENER => match Listener::decode(&*any.value) {
            Ok(mut l) => match adj.listener(&mut l, counts) {
                ListenerOutcome::Drop { port } => {
                    tracing::debug!(listener = %name, port, "dropped: reserved port");
                    Processed::Drop
                }
                ListenerOutcome::Keep { changed: true } => keep(pack(&l), true),
                ListenerOutcome::Keep { changed: false } => keep(any, false),
            },
            Err(e) => undecodable(any, &name, e, counts),
        },
        ROUTE => match RouteConfiguration::decode(&*any.value) {
            Ok(mut rc) => {
                if adj.route(&mut rc, counts) {
                    keep(pack(&rc), true)
                } else {
                    keep(any, false)
                }
            }
            Err(e) => undecodable(any, &name, e, counts),
        },
        CLUSTER if adj.cluster_needs_decode(&any.value) => match Cluster::decode(&*any.value) {
            Ok(mut c) => {
                if adj.cluster(&mut c, counts) {
                    keep(pack(&c), true)
                } else {
                    keep(any, false)
                }
            }
            Err(e) => undecodable(any, &name, e, counts),
        },
        _ => keep(any, false),
    }
}

fn undecodable(any: Any, name: &str, e: prost::DecodeError, counts: &mut Counts) -> Processed {
    tracing::warn!(type_url = %any.type_url, resource = %name, "cannot decode resource, passing it through: {e}");
    counts
        .0
        .entry("undecodable_resource")
        .and_modify(|n| *n += 1)
        .or_insert(1);
    Processed::Keep {
        name: name.to_string(),
        any,
        adjusted: false,
    }
}

impl SotwStream {
    /// A stream for `node`; `generation` identifies its upstream stream.
    pub fn new(node: NodeInfo, generation: u64) -> Self {
        Self {
            node,
            generation,
            seq: 0,
            types: HashMap::new(),
        }
    }

    /// The upstream stream this state belongs to.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Translates a downstream request for istiod and says what it meant.
    pub fn downstream_request(&mut self, mut req: DiscoveryRequest) -> (DiscoveryRequest, Reply) {
        let state = self.types.entry(req.type_url.clone()).or_default();
        if req.response_nonce.is_empty() {
            return (req, Reply::Request);
        }
        // Envoy echoes the version it last accepted; that can be older than the nonce's response.
        if let Some(v) = state.sent.iter().find(|s| s.version == req.version_info) {
            req.version_info = v.upstream_version.clone();
        }
        let Some(pos) = state.sent.iter().position(|s| s.nonce == req.response_nonce) else {
            // Unknown or long-stale nonce: istiod ignores what it does not recognise.
            return (req, Reply::Request);
        };
        let sent = &state.sent[pos];
        let latest = pos + 1 == state.sent.len();
        req.response_nonce = sent.upstream_nonce.clone();
        let reply = match &req.error_detail {
            Some(status) => Reply::Nack {
                type_url: req.type_url.clone(),
                detail: status.message.clone(),
                adjusted: sent.adjusted.clone(),
            },
            None if latest => Reply::Ack {
                type_url: req.type_url.clone(),
            },
            None => Reply::Request,
        };
        (req, reply)
    }

    /// Adjusts an upstream response for the downstream and merges it into the stream's view.
    pub fn upstream_response(
        &mut self,
        resp: DiscoveryResponse,
        adj: &Adjuster<'_>,
        interner: &Interner,
        counts: &mut Counts,
    ) -> DiscoveryResponse {
        self.seq += 1;
        let nonce = format!("ll-{}-{}", self.generation, self.seq);
        let version = format!("ll{}:{}", self.seq, resp.version_info);
        let state = self.types.entry(resp.type_url.clone()).or_default();
        if is_wildcard_type(&resp.type_url) {
            state.resources.clear();
        }
        let mut adjusted = Vec::new();
        let mut resources = Vec::with_capacity(resp.resources.len() + 1);
        for any in resp.resources {
            match process(any, adj, counts) {
                Processed::Keep {
                    name,
                    any,
                    adjusted: changed,
                } => {
                    if changed {
                        adjusted.push(name.clone());
                    }
                    if !name.is_empty() {
                        state.resources.insert(
                            interner.name(&name),
                            interner.intern(&any.type_url, any.value.clone()),
                        );
                    }
                    resources.push(any);
                }
                Processed::Drop => {}
            }
        }
        if resp.type_url == CLUSTER
            && let Some(als) = adj.als_cluster()
            && !state.resources.contains_key(als.name.as_str())
        {
            let any = pack(&als);
            state.resources.insert(
                interner.name(&als.name),
                interner.intern(CLUSTER, any.value.clone()),
            );
            resources.push(any);
        }
        state.sent.push_back(Sent {
            nonce: nonce.clone(),
            version: version.clone(),
            upstream_nonce: resp.nonce,
            upstream_version: resp.version_info,
            adjusted,
        });
        if state.sent.len() > REMEMBERED {
            state.sent.pop_front();
        }
        DiscoveryResponse {
            version_info: version,
            resources,
            canary: resp.canary,
            type_url: resp.type_url,
            nonce,
            control_plane: resp.control_plane,
            resource_errors: resp.resource_errors,
        }
    }

    /// The merged resources of a type.
    pub fn resources(&self, type_url: &str) -> Option<&ResourceSet> {
        self.types.get(type_url).map(|s| &s.resources)
    }
}

#[cfg(test)]
mod tests;
