//! The fake istiod's SotW ADS streams.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{Conversation, Heard, Peer, Push, State, converse, pushed_names};
use crate::xds::is_wildcard_type;

/// The responses of one stream.
pub(super) type Responses = ReceiverStream<Result<DiscoveryResponse, Status>>;

/// Counts a stream as open until dropped.
struct OpenStream(Arc<std::sync::atomic::AtomicU64>);

impl OpenStream {
    fn new(open: &Arc<std::sync::atomic::AtomicU64>) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        Self(open.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Opens a stream: answered by a task, or (silent) only read until the client leaves.
pub(super) async fn open(
    state: Arc<State>,
    req: Request<Streaming<DiscoveryRequest>>,
) -> Result<Response<Responses>, Status> {
    let open = OpenStream::new(&state.open);
    let (peer, rx) = Peer::new(state.clone(), &req);
    let mut inbound = req.into_inner();
    if state.silent.load(Ordering::SeqCst) {
        while let Ok(Some(r)) = inbound.message().await {
            peer.record(&heard(&r));
        }
        return Err(Status::cancelled("the client left"));
    }
    let stream = Sotw {
        peer,
        types: HashMap::new(),
        _open: open,
    };
    tokio::spawn(converse(stream, state, inbound));
    Ok(Response::new(ReceiverStream::new(rx)))
}

/// What the fake records of a SotW request.
fn heard(r: &DiscoveryRequest) -> Heard<'_> {
    Heard {
        type_url: &r.type_url,
        nonce: &r.response_nonce,
        error: r.error_detail.as_ref(),
        names: &r.resource_names,
        node: r.node.as_ref(),
    }
}

/// One SotW stream.
struct Sotw {
    peer: Peer<DiscoveryResponse>,
    /// Per type: what was last sent.
    types: HashMap<String, Sent>,
    _open: OpenStream,
}

/// What a stream last sent of a type: the nonce, the subscribed names (`None`: wildcard).
type Sent = (String, Option<BTreeSet<String>>);

/// What to send for a request of `names` (`None`: wildcard), given what was `sent` of its type:
/// `None` nothing (an ACK, a NACK, a stale nonce, names only removed), else the names to send
/// (`None`: every resource of the type).
fn answer(
    sent: Option<&Sent>,
    r: &DiscoveryRequest,
    names: &Option<BTreeSet<String>>,
) -> Option<Option<BTreeSet<String>>> {
    match sent {
        None => Some(names.clone()),
        Some(_) if r.response_nonce.is_empty() => Some(names.clone()),
        Some((last, _)) if r.response_nonce != *last => None, // stale: ignored
        Some(_) if r.error_detail.is_some() => None,          // NACK: never answered
        Some((_, old)) => match (names, old) {
            // istiod answers only the newly added names
            (Some(new), Some(old)) if new != old => Some(Some(new.difference(old).cloned().collect())),
            _ => None,
        },
    }
}

impl Sotw {
    /// Sends the resources of a type; its nonce, or `None` when the client is gone.
    async fn send(&self, type_url: &str, items: Vec<(String, Any)>) -> Option<String> {
        let nonce = self.peer.state.nonce();
        let response = DiscoveryResponse {
            version_info: self.peer.state.version(),
            resources: items.into_iter().map(|(_, a)| a).collect(),
            type_url: type_url.to_string(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        self.peer.send(response).await.then_some(nonce)
    }
}

impl Conversation for Sotw {
    type Request = DiscoveryRequest;

    async fn on_request(&mut self, r: DiscoveryRequest) -> bool {
        let Some(mode) = self.peer.hear(heard(&r)).await else {
            return false;
        };
        let names: Option<BTreeSet<String>> =
            (!is_wildcard_type(&r.type_url)).then(|| r.resource_names.iter().cloned().collect());
        match answer(self.types.get(&r.type_url), &r, &names) {
            // An ACK that only drops names: nothing to send, the nonce stays.
            Some(Some(send)) if send.is_empty() => {
                let nonce = self
                    .types
                    .get(&r.type_url)
                    .map(|t| t.0.clone())
                    .unwrap_or_default();
                self.types.insert(r.type_url, (nonce, names));
            }
            Some(send) => {
                let items = self.peer.state.resources(&r.type_url, send.as_ref(), mode);
                let Some(nonce) = self.send(&r.type_url, items).await else {
                    return false;
                };
                self.types.insert(r.type_url, (nonce, names));
            }
            None => {
                if let Some(t) = self.types.get_mut(&r.type_url)
                    && r.error_detail.is_none()
                    && r.response_nonce == t.0
                {
                    t.1 = names;
                }
            }
        }
        true
    }

    async fn on_push(&mut self, push: Push) -> bool {
        let (type_url, only) = push.into_parts();
        let (Some((_, subscribed)), Some(mode)) = (self.types.get(&type_url), self.peer.mode) else {
            return true;
        };
        let names = pushed_names(only.as_deref(), subscribed.as_ref());
        let items = self.peer.state.resources(&type_url, names.as_ref(), mode);
        let Some(nonce) = self.send(&type_url, items).await else {
            return false;
        };
        if let Some(t) = self.types.get_mut(&type_url) {
            t.0 = nonce;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::google::rpc::Status;

    use super::{Sent, answer};
    use crate::testing::assert_table;

    fn set(names: &[&str]) -> Option<BTreeSet<String>> {
        Some(names.iter().map(|n| n.to_string()).collect())
    }

    fn request(nonce: &str, nack: bool) -> DiscoveryRequest {
        DiscoveryRequest {
            response_nonce: nonce.into(),
            error_detail: nack.then(Status::default),
            ..Default::default()
        }
    }

    #[test]
    fn requests_are_answered_as_istiod_answers_them() {
        let sent: Sent = ("1/0".into(), set(&["a", "b"]));
        let wildcard: Sent = ("1/0".into(), None);
        assert_table([
            (
                "first request",
                answer(None, &request("", false), &set(&["a"])),
                Some(set(&["a"])),
            ),
            (
                "first wildcard request",
                answer(None, &request("", false), &None),
                Some(None),
            ),
            (
                "reconnect (no nonce)",
                answer(Some(&sent), &request("", false), &set(&["a"])),
                Some(set(&["a"])),
            ),
            (
                "ACK",
                answer(Some(&sent), &request("1/0", false), &set(&["a", "b"])),
                None,
            ),
            (
                "wildcard ACK",
                answer(Some(&wildcard), &request("1/0", false), &None),
                None,
            ),
            (
                "stale nonce",
                answer(Some(&sent), &request("0/9", false), &set(&["c"])),
                None,
            ),
            (
                "NACK",
                answer(Some(&sent), &request("1/0", true), &set(&["a", "b"])),
                None,
            ),
            (
                "a name added: only it",
                answer(Some(&sent), &request("1/0", false), &set(&["a", "b", "c"])),
                Some(set(&["c"])),
            ),
            (
                "a name removed: nothing new",
                answer(Some(&sent), &request("1/0", false), &set(&["a"])),
                Some(set(&[])),
            ),
        ]);
    }
}
