//! What the SotW and Delta stream state machines share: the resource pipeline (name, adjust),
//! the log of responses sent (to translate replies back to istiod's nonces), what a reply meant,
//! and the interface the server drives them through.

use std::collections::VecDeque;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::rpc::Status;
use prost::Message;

use super::adjust::{Adjuster, Counts, ListenerOutcome};
use super::cache::{Interner, ResourceSet};
use super::response::{RawAny, name_of};
use super::routes::{AdjustedRoute, Pins};
use super::{CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET};

/// Responses remembered per type for translating replies (Envoy only answers recent ones).
const REMEMBERED: usize = 8;

/// A stream state machine as the server drives it.
pub trait StreamState: Send + Sync {
    /// Downstream request type.
    type Request;
    /// Downstream response type.
    type Response;
    /// Translates a downstream request for istiod and says what it meant.
    fn downstream_request(&mut self, req: Self::Request) -> (Self::Request, Reply);
    /// Adjusts an upstream response for the downstream and keeps the stream's view of it.
    fn upstream_response(
        &mut self,
        resp: Self::Response,
        adj: &Adjuster<'_>,
        interner: &Interner,
        counts: &mut Counts,
    ) -> Self::Response;
    /// The resources of a type as the downstream holds them (shared, copied on write).
    fn resources(&self, type_url: &str) -> Option<&ResourceSet>;
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

/// A response sent downstream.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sent {
    /// The relay's nonce.
    pub nonce: String,
    /// The relay's version (SotW).
    pub version: String,
    /// istiod's nonce.
    pub upstream_nonce: String,
    /// istiod's version (SotW).
    pub upstream_version: String,
    /// Resources the relay changed.
    pub adjusted: Vec<String>,
}

/// The recent responses of one type.
#[derive(Debug, Default)]
pub(crate) struct SentLog(VecDeque<Sent>);

impl SentLog {
    /// Remembers a response, forgetting the oldest beyond [`REMEMBERED`].
    pub fn push(&mut self, sent: Sent) {
        self.0.push_back(sent);
        if self.0.len() > REMEMBERED {
            self.0.pop_front();
        }
    }

    /// istiod's version for one of the relay's.
    pub fn upstream_version(&self, version: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|s| s.version == version)
            .map(|s| s.upstream_version.as_str())
    }

    /// Rewrites a reply's nonce to istiod's and says what the reply meant. A reply to an
    /// unknown or forgotten nonce is passed as it is: istiod ignores nonces it does not know.
    /// `acks` says whether a reply without error can be an ACK (a Delta subscription change is not).
    pub fn translate(&self, type_url: &str, nonce: &mut String, error: Option<&Status>, acks: bool) -> Reply {
        let Some(pos) = self.0.iter().position(|s| s.nonce == *nonce) else {
            return Reply::Request;
        };
        let sent = &self.0[pos];
        *nonce = sent.upstream_nonce.clone();
        match error {
            Some(status) => Reply::Nack {
                type_url: type_url.to_string(),
                detail: status.message.clone(),
                adjusted: sent.adjusted.clone(),
            },
            None if acks && pos + 1 == self.0.len() => Reply::Ack {
                type_url: type_url.to_string(),
            },
            None => Reply::Request,
        }
    }
}

/// The name of a resource of a type the relay knows, read in place.
pub(crate) fn resource_name<'a>(type_url: &str, bytes: &'a [u8]) -> Option<&'a str> {
    matches!(type_url, CLUSTER | ENDPOINT | LISTENER | ROUTE | SECRET)
        .then(|| name_of(bytes))
        .flatten()
}

/// A resource after adjustment.
pub(crate) enum Processed {
    /// Send it (`adjusted`: the relay changed it).
    Keep {
        /// The resource.
        any: RawAny,
        /// Whether it was changed.
        adjusted: bool,
        /// The cached pieces it was made of (route configurations), to hold while it is served.
        pins: Pins,
    },
    /// Do not send it (a listener on a reserved port).
    Drop,
}

/// Adjusts one resource, `name` (for logs). Resources that cannot be decoded pass through
/// unchanged (Envoy will judge them) and are counted.
pub(crate) fn process(
    any: RawAny,
    name: &str,
    adj: &Adjuster<'_>,
    interner: &Interner,
    counts: &mut Counts,
) -> Processed {
    let keep = |any, adjusted| Processed::Keep {
        any,
        adjusted,
        pins: Pins::default(),
    };
    match &*any.type_url {
        LISTENER => match Listener::decode(&*any.value) {
            Ok(mut l) => match adj.listener(&mut l, counts) {
                ListenerOutcome::Drop { port, reason } => {
                    tracing::debug!(listener = %name, port, "dropped: {}", reason.as_str());
                    Processed::Drop
                }
                ListenerOutcome::Keep { changed: true } => keep(repack(&any, &l), true),
                ListenerOutcome::Keep { changed: false } => keep(any, false),
            },
            Err(e) => undecodable(any, name, e, counts),
        },
        ROUTE => match interner.routes.adjust(adj, &any.value, counts) {
            Some(AdjustedRoute { encoded, pins }) => {
                let adjusted = encoded.is_some();
                let any = match encoded {
                    Some(value) => RawAny {
                        type_url: any.type_url,
                        value,
                    },
                    None => any,
                };
                Processed::Keep { any, adjusted, pins }
            }
            None => route_from_scratch(any, name, adj, counts),
        },
        CLUSTER if adj.cluster_needs_decode(&any.value) => match Cluster::decode(&*any.value) {
            Ok(mut c) => {
                if adj.cluster(&mut c, counts) {
                    keep(repack(&any, &c), true)
                } else {
                    keep(any, false)
                }
            }
            Err(e) => undecodable(any, name, e, counts),
        },
        _ => keep(any, false),
    }
}

/// The route adjustments on the whole decoded configuration, for what the incremental path
/// does not take.
fn route_from_scratch(any: RawAny, name: &str, adj: &Adjuster<'_>, counts: &mut Counts) -> Processed {
    match RouteConfiguration::decode(&*any.value) {
        Ok(mut rc) => {
            let adjusted = adj.route(&mut rc, counts);
            let any = if adjusted { repack(&any, &rc) } else { any };
            Processed::Keep {
                any,
                adjusted,
                pins: Pins::default(),
            }
        }
        Err(e) => undecodable(any, name, e, counts),
    }
}

/// `message` under the type URL of `any`, which it replaces.
fn repack(any: &RawAny, message: &impl Message) -> RawAny {
    RawAny {
        type_url: any.type_url.clone(),
        value: message.encode_to_vec().into(),
    }
}

fn undecodable(any: RawAny, name: &str, e: prost::DecodeError, counts: &mut Counts) -> Processed {
    tracing::warn!(type_url = %any.type_url, resource = %name, "cannot decode resource, passing it through: {e}");
    counts.add("undecodable_resource");
    Processed::Keep {
        any,
        adjusted: false,
        pins: Pins::default(),
    }
}
