//! The incremental (Delta) stream state machine (sans-IO), for global-sidecar streams.
//!
//! Like [`super::sotw`]: one downstream response per upstream response with a relay nonce,
//! nonces translated back on the way up, the stream's view kept for the last-good cache. Delta
//! specifics: removals are applied to the view; the relay's own access-log cluster is sent once
//! per stream, hidden from istiod (filtered from `initial_resource_versions`) and never removed
//! by it; a listener the relay drops is sent as a removal.

use std::collections::{HashMap, VecDeque};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};

use super::adjust::{ALS_CLUSTER, Adjuster, Counts, pack};
use super::cache::{Interner, ResourceSet};
use super::sotw::{Processed, Reply, process};
use super::{CLUSTER, NodeInfo};

const REMEMBERED: usize = 8;

#[derive(Clone, Debug)]
struct Sent {
    nonce: String,
    upstream_nonce: String,
    adjusted: Vec<String>,
}

#[derive(Debug, Default)]
struct TypeState {
    sent: VecDeque<Sent>,
    resources: ResourceSet,
    own_cluster_sent: bool,
}

/// One Delta stream of a global-sidecar.
#[derive(Debug)]
pub struct DeltaStream {
    /// The node.
    pub node: NodeInfo,
    generation: u64,
    seq: u64,
    types: HashMap<String, TypeState>,
}

impl DeltaStream {
    /// A stream for `node`; `generation` identifies its upstream stream.
    pub fn new(node: NodeInfo, generation: u64) -> Self {
        Self {
            node,
            generation,
            seq: 0,
            types: HashMap::new(),
        }
    }

    /// Translates a downstream request for istiod and says what it meant.
    pub fn downstream_request(&mut self, mut req: DeltaDiscoveryRequest) -> (DeltaDiscoveryRequest, Reply) {
        req.initial_resource_versions.remove(ALS_CLUSTER);
        let state = self.types.entry(req.type_url.clone()).or_default();
        if req.response_nonce.is_empty() {
            return (req, Reply::Request);
        }
        let Some(pos) = state.sent.iter().position(|s| s.nonce == req.response_nonce) else {
            return (req, Reply::Request);
        };
        let sent = &state.sent[pos];
        let latest = pos + 1 == state.sent.len();
        req.response_nonce = sent.upstream_nonce.clone();
        let subscription_change =
            !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty();
        let reply = match &req.error_detail {
            Some(status) => Reply::Nack {
                type_url: req.type_url.clone(),
                detail: status.message.clone(),
                adjusted: sent.adjusted.clone(),
            },
            None if latest && !subscription_change => Reply::Ack {
                type_url: req.type_url.clone(),
            },
            None => Reply::Request,
        };
        (req, reply)
    }

    /// Adjusts an upstream response for the downstream and applies it to the stream's view.
    pub fn upstream_response(
        &mut self,
        resp: DeltaDiscoveryResponse,
        adj: &Adjuster<'_>,
        interner: &Interner,
        counts: &mut Counts,
    ) -> DeltaDiscoveryResponse {
        self.seq += 1;
        let nonce = format!("ll-{}-{}", self.generation, self.seq);
        let state = self.types.entry(resp.type_url.clone()).or_default();
        let mut adjusted = Vec::new();
        let mut resources = Vec::with_capacity(resp.resources.len() + 1);
        let mut removed: Vec<String> = resp
            .removed_resources
            .into_iter()
            .filter(|n| n != ALS_CLUSTER)
            .collect();
        for mut r in resp.resources {
            let Some(any) = r.resource.take() else {
                resources.push(r);
                continue;
            };
            match process(any, adj, counts) {
                Processed::Keep {
                    any,
                    adjusted: changed,
                    ..
                } => {
                    if changed {
                        adjusted.push(r.name.clone());
                    }
                    state.resources.insert(
                        interner.name(&r.name),
                        interner.intern(&any.type_url, any.value.clone()),
                    );
                    r.resource = Some(any);
                    resources.push(r);
                }
                Processed::Drop => removed.push(r.name),
            }
        }
        for name in &removed {
            state.resources.remove(name.as_str());
        }
        if resp.type_url == CLUSTER
            && !state.own_cluster_sent
            && let Some(als) = adj.als_cluster()
        {
            let any = pack(&als);
            state.resources.insert(
                interner.name(&als.name),
                interner.intern(CLUSTER, any.value.clone()),
            );
            resources.push(Resource {
                name: als.name,
                version: "lazyload".into(),
                resource: Some(any),
                ..Default::default()
            });
            state.own_cluster_sent = true;
        }
        state.sent.push_back(Sent {
            nonce: nonce.clone(),
            upstream_nonce: resp.nonce,
            adjusted,
        });
        if state.sent.len() > REMEMBERED {
            state.sent.pop_front();
        }
        DeltaDiscoveryResponse {
            system_version_info: resp.system_version_info,
            resources,
            type_url: resp.type_url,
            removed_resources: removed,
            removed_resource_names: resp.removed_resource_names,
            nonce,
            control_plane: resp.control_plane,
            resource_errors: resp.resource_errors,
        }
    }

    /// The resources of a type as the downstream holds them.
    pub fn resources(&self, type_url: &str) -> Option<&ResourceSet> {
        self.types.get(type_url).map(|s| &s.resources)
    }
}
