//! The incremental (Delta) stream state machine (sans-IO), for global-sidecar streams.
//!
//! Like [`super::sotw`]: one downstream response per upstream response with a relay nonce,
//! nonces translated back on the way up, the stream's view kept for the last-good cache. Delta
//! specifics: removals are applied to the view; the relay's own access-log cluster is sent once
//! per stream, hidden from istiod (filtered from `initial_resource_versions`) and never removed
//! by it; a listener the relay drops is sent as a removal.

use std::collections::HashMap;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};

use super::CLUSTER;
use super::adjust::{Adjuster, Counts};
use super::cache::{Interner, ResourceSet};
use super::response::RawAny;
use super::routes::{Pins, PinsByName};
use super::stream::{Processed, Reply, Sent, SentLog, StreamState, process};
use crate::als::ACCESS_LOG_CLUSTER;

#[derive(Debug, Default)]
struct TypeState {
    sent: SentLog,
    /// Shared with the last-good record once ACKed; copied (by shard) on the next change.
    resources: ResourceSet,
    pins: PinsByName,
    own_cluster_sent: bool,
}

/// One Delta stream of a global-sidecar.
#[derive(Debug)]
pub struct DeltaStream {
    generation: u64,
    seq: u64,
    types: HashMap<String, TypeState>,
}

impl DeltaStream {
    /// A stream whose upstream stream is `generation`.
    pub fn new(generation: u64) -> Self {
        Self {
            generation,
            seq: 0,
            types: HashMap::new(),
        }
    }
}

impl StreamState for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn downstream_request(&mut self, mut req: DeltaDiscoveryRequest) -> (DeltaDiscoveryRequest, Reply) {
        req.initial_resource_versions.remove(ACCESS_LOG_CLUSTER);
        let state = self.types.entry(req.type_url.clone()).or_default();
        if req.response_nonce.is_empty() {
            return (req, Reply::Request);
        }
        let subscription_change =
            !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty();
        let reply = state.sent.translate(
            &req.type_url,
            &mut req.response_nonce,
            req.error_detail.as_ref(),
            !subscription_change,
        );
        (req, reply)
    }

    fn upstream_response(
        &mut self,
        resp: DeltaDiscoveryResponse,
        adj: &Adjuster<'_>,
        interner: &Interner,
        counts: &mut Counts,
    ) -> DeltaDiscoveryResponse {
        self.seq += 1;
        let nonce = format!("ll-{}-{}", self.generation, self.seq);
        let state = self.types.entry(resp.type_url.clone()).or_default();
        let set = &mut state.resources;
        let mut adjusted = Vec::new();
        let mut resources = Vec::with_capacity(resp.resources.len() + 1);
        let mut removed: Vec<String> = resp
            .removed_resources
            .into_iter()
            .filter(|n| n != ACCESS_LOG_CLUSTER)
            .collect();
        for mut r in resp.resources {
            let Some(any) = r.resource.take() else {
                resources.push(r);
                continue;
            };
            match process(any.into(), &r.name, adj, interner, counts) {
                Processed::Keep {
                    any,
                    adjusted: changed,
                    pins,
                } => {
                    if changed {
                        adjusted.push(r.name.clone());
                    }
                    interner.remember(set, &r.name, &any);
                    state.pins.hold(&r.name, pins);
                    r.resource = Some(any.into_any());
                    resources.push(r);
                }
                Processed::Drop => removed.push(r.name),
            }
        }
        for name in &removed {
            set.remove(name.as_str());
            state.pins.hold(name, Pins::default());
        }
        if resp.type_url == CLUSTER
            && !state.own_cluster_sent
            && let Some(als) = adj.als_cluster()
        {
            let any = RawAny::pack(CLUSTER, &als);
            interner.remember(set, &als.name, &any);
            resources.push(Resource {
                name: als.name,
                version: "lazyload".into(),
                resource: Some(any.into_any()),
                ..Default::default()
            });
            state.own_cluster_sent = true;
        }
        interner.share(set);
        state.sent.push(Sent {
            nonce: nonce.clone(),
            upstream_nonce: resp.nonce,
            adjusted,
            ..Default::default()
        });
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

    fn resources(&self, type_url: &str) -> Option<&ResourceSet> {
        self.types.get(type_url).map(|s| &s.resources)
    }
}
