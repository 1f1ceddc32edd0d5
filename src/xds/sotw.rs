//! The state-of-the-world stream state machine (sans-IO), for global-sidecar streams.
//!
//! Each upstream response becomes one downstream response: resources adjusted (only those that
//! need it are decoded; a response equal to one another stream had is adjusted once:
//! [`super::memo`]), a relay nonce and version. Each downstream request becomes one upstream
//! request, its nonce and version translated back to istiod's (the rest of it kept encoded). The stream also keeps the merged
//! view of every type (partial EDS/RDS pushes merged by name) for the last-good cache.

use std::collections::HashMap;
use std::sync::Arc;

use super::adjust::{Adjuster, Counts};
use super::cache::{Interner, ResourceSet};
use super::is_wildcard_type;
use super::memo::{Adjusted, Input};
use super::request::SotwRequest;
use super::response::{ResponseHead, SotwResponse};
use super::routes::PinsByName;
use super::stream::{Reply, Sent, SentLog, StreamState};

#[derive(Debug, Default)]
struct TypeState {
    sent: SentLog,
    /// Shared with the last-good record once ACKed; copied (by shard) on the next change.
    resources: ResourceSet,
    pins: PinsByName,
    /// The latest response, held so that other streams receiving the same share its result.
    latest: Option<Arc<Adjusted>>,
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
    type Response = SotwResponse;

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
        resp: SotwResponse,
        adj: &Adjuster<'_>,
        interner: &Interner,
        counts: &mut Counts,
    ) -> SotwResponse {
        self.seq += 1;
        let (head, resources, encoded) = resp.into_parts();
        let nonce = format!("ll-{}-{}", self.generation, self.seq);
        let version = format!("ll{}:{}", self.seq, head.version_info);
        let adjusted = interner
            .responses
            .adjust(&head.type_url, Input { resources, encoded }, adj, interner);
        let state = self.types.entry(head.type_url.clone()).or_default();
        if is_wildcard_type(&head.type_url) {
            state.resources = ResourceSet::default();
            state.pins.clear();
        }
        let copied = !state.resources.is_empty();
        state.resources.merge(&adjusted.set);
        if copied {
            interner.share(&mut state.resources);
        }
        for (name, pins) in &adjusted.pins {
            state.pins.hold(name, pins.clone());
        }
        for (what, n) in &adjusted.counts.0 {
            *counts.0.entry(what).or_default() += n;
        }
        state.sent.push(Sent {
            nonce: nonce.clone(),
            version: version.clone(),
            upstream_nonce: head.nonce,
            upstream_version: head.version_info,
            adjusted: adjusted.adjusted.clone(),
        });
        let head = ResponseHead {
            version_info: version,
            nonce,
            ..head
        };
        let response = SotwResponse::shared(head, adjusted.output.clone(), adjusted.encoded.clone());
        state.latest = Some(adjusted);
        response
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
