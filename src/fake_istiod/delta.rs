//! The fake istiod's Delta ADS streams.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{Conversation, Heard, Peer, Push, State, converse, pushed_names};
use crate::xds::is_wildcard_type;

/// The responses of one stream.
pub(super) type Responses = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

/// Opens a stream, answered by a task.
pub(super) fn open(state: Arc<State>, req: Request<Streaming<DeltaDiscoveryRequest>>) -> Response<Responses> {
    let (peer, rx) = Peer::new(state.clone(), &req);
    let stream = Delta {
        peer,
        types: HashMap::new(),
    };
    tokio::spawn(converse(stream, state, req.into_inner()));
    Response::new(ReceiverStream::new(rx))
}

/// What a stream knows of one type.
struct Type {
    /// The subscribed names (`None`: wildcard).
    subscribed: Option<BTreeSet<String>>,
    /// The names the client has.
    has: BTreeSet<String>,
}

impl Type {
    /// Notes what a response sends and removes: `removed` are the names the client has that
    /// `items` (the whole of a full answer) lacks; none for an answer of some names only.
    fn update(&mut self, items: &[(String, Any)], whole: bool) -> Vec<String> {
        let removed: Vec<String> = if whole {
            self.has
                .iter()
                .filter(|n| !items.iter().any(|(i, _)| i == *n))
                .cloned()
                .collect()
        } else {
            vec![]
        };
        self.has.extend(items.iter().map(|(n, _)| n.clone()));
        for n in &removed {
            self.has.remove(n);
        }
        removed
    }
}

/// One Delta stream.
struct Delta {
    peer: Peer<DeltaDiscoveryResponse>,
    types: HashMap<String, Type>,
}

impl Delta {
    /// Sends resources and removals of a type; `false` when the client is gone.
    async fn send(&self, type_url: &str, items: Vec<(String, Any)>, removed: Vec<String>) -> bool {
        let response = DeltaDiscoveryResponse {
            system_version_info: self.peer.state.version(),
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
            nonce: self.peer.state.nonce(),
            ..Default::default()
        };
        self.peer.send(response).await
    }
}

impl Conversation for Delta {
    type Request = DeltaDiscoveryRequest;

    async fn on_request(&mut self, r: DeltaDiscoveryRequest) -> bool {
        let heard = Heard {
            type_url: &r.type_url,
            nonce: &r.response_nonce,
            error: r.error_detail.as_ref(),
            names: &r.resource_names_subscribe,
            node: r.node.as_ref(),
        };
        let Some(mode) = self.peer.hear(heard).await else {
            return false;
        };
        let first = !self.types.contains_key(&r.type_url);
        let entry = self.types.entry(r.type_url.clone()).or_insert_with(|| Type {
            subscribed: (!is_wildcard_type(&r.type_url)
                || r.resource_names_subscribe.iter().any(|n| n != "*"))
            .then(BTreeSet::new),
            has: r.initial_resource_versions.keys().cloned().collect(),
        });
        if let Some(sub) = &mut entry.subscribed {
            sub.extend(r.resource_names_subscribe.iter().cloned());
            for n in &r.resource_names_unsubscribe {
                sub.remove(n);
            }
        }
        let names = if first {
            entry.subscribed.clone()
        } else if !r.resource_names_subscribe.is_empty() {
            Some(r.resource_names_subscribe.iter().cloned().collect())
        } else {
            return true;
        };
        let items = self.peer.state.resources(&r.type_url, names.as_ref(), mode);
        let removed = entry.update(&items, first);
        self.send(&r.type_url, items, removed).await
    }

    async fn on_push(&mut self, push: Push) -> bool {
        let (type_url, only) = push.into_parts();
        let (Some(entry), Some(mode)) = (self.types.get_mut(&type_url), self.peer.mode) else {
            return true;
        };
        let names = pushed_names(only.as_deref(), entry.subscribed.as_ref());
        let items = self.peer.state.resources(&type_url, names.as_ref(), mode);
        let removed = entry.update(&items, only.is_none());
        self.send(&type_url, items, removed).await
    }
}
