//! The state-of-the-world stream state machine (sans-IO), for global-sidecar streams.
//!
//! Each upstream response becomes one downstream response: resources adjusted (only those that
//! need it are decoded), a relay nonce and version. Each downstream request becomes one upstream
//! request, its nonce and version translated back to istiod's (the rest of it kept encoded). The stream also keeps the merged
//! view of every type (partial EDS/RDS pushes merged by name) for the last-good cache.

use std::collections::HashMap;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;

use super::adjust::{Adjuster, Counts, pack};
use super::cache::{Interner, ResourceSet};
use super::request::SotwRequest;
use super::routes::PinsByName;
use super::stream::{Processed, Reply, Sent, SentLog, StreamState, process, resource_name};
use super::{CLUSTER, is_wildcard_type};

#[derive(Debug, Default)]
struct TypeState {
    sent: SentLog,
    /// Shared with the last-good record once ACKed; copied (by shard) on the next change.
    resources: ResourceSet,
    pins: PinsByName,
}

/// One SotW stream of a global-sidecar.
#[derive(Debug)]
pub struct SotwStream {
    generation: u64,
    seq: u64,
    types: HashMap<String, TypeState>,
}

impl StreamState for SotwStream {
    type Request = SotwRequest;
    type Response = DiscoveryResponse;

    fn downstream_request(&mut self, mut req: SotwRequest) -> (SotwRequest, Reply) {
        let head = &mut req.head;
        let state = self.types.entry(head.type_url.clone()).or_default();
        if head.response_nonce.is_empty() {
            return (req, Reply::Request);
        }
        // Envoy echoes the version it last accepted; that can be older than the nonce's response.
        if let Some(v) = state.sent.upstream_version(&head.version_info) {
            head.version_info = v.to_string();
        }
        let reply = state.sent.translate(
            &head.type_url,
            &mut head.response_nonce,
            head.error_detail.as_ref(),
            true,
        );
        (req, reply)
    }

    fn upstream_response(
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
            state.resources = ResourceSet::default();
            state.pins.clear();
        }
        let set = &mut state.resources;
        let mut adjusted = Vec::new();
        let mut resources = Vec::with_capacity(resp.resources.len() + 1);
        for any in resp.resources {
            let name = resource_name(&any.type_url, &any.value).unwrap_or_default();
            match process(any, &name, adj, interner, counts) {
                Processed::Keep {
                    any,
                    adjusted: changed,
                    pins,
                } => {
                    if !name.is_empty() {
                        interner.remember(set, &name, &any);
                        state.pins.hold(&name, pins);
                    }
                    if changed {
                        adjusted.push(name);
                    }
                    resources.push(any);
                }
                Processed::Drop => {}
            }
        }
        if resp.type_url == CLUSTER
            && let Some(als) = adj.als_cluster()
            && !set.contains_key(als.name.as_str())
        {
            let any = pack(&als);
            interner.remember(set, &als.name, &any);
            resources.push(any);
        }
        interner.share(set);
        state.sent.push(Sent {
            nonce: nonce.clone(),
            version: version.clone(),
            upstream_nonce: resp.nonce,
            upstream_version: resp.version_info,
            adjusted,
        });
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

    fn resources(&self, type_url: &str) -> Option<&ResourceSet> {
        self.types.get(type_url).map(|s| &s.resources)
    }
}

impl SotwStream {
    /// A stream whose upstream stream is `generation`.
    pub fn new(generation: u64) -> Self {
        Self {
            generation,
            seq: 0,
            types: HashMap::new(),
        }
    }
}

#[cfg(test)]
mod tests;
