//! A SotW response as the relay handles it: its few scalar fields decoded, each resource kept as
//! the bytes istiod sent.
//!
//! A full push at 10,000 services is 10,000 clusters or endpoints in one message. Decoding each
//! resource into a `prost` `Any` copies its bytes into a fresh `Vec` (and encoding copies them
//! back); the relay reads a resource's name in place and decodes only the few it adjusts. So a
//! resource here is a [`Bytes`] slice of the received message: no copy, no allocation, and the
//! downstream response is written from the same slices.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};
use envoy_types::pb::envoy::config::core::v3::ControlPlane;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryResponse, ResourceError};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use prost::encoding::{
    DecodeContext, WireType, decode_key, decode_varint, encode_key, encode_varint, encoded_len_varint,
};

use super::grpc::{Framed, frame_parts};

/// Why bytes are not a message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// prost could not read a field.
    #[error(transparent)]
    Prost(#[from] prost::DecodeError),
    /// The structure around the fields is wrong.
    #[error("{0}")]
    Malformed(&'static str),
}

/// The fields of a `DiscoveryResponse` other than its resources (same numbers).
#[derive(Clone, PartialEq, Message)]
pub struct ResponseHead {
    /// `version_info`.
    #[prost(string, tag = "1")]
    pub version_info: String,
    /// `canary`.
    #[prost(bool, tag = "3")]
    pub canary: bool,
    /// `type_url`.
    #[prost(string, tag = "4")]
    pub type_url: String,
    /// `nonce`.
    #[prost(string, tag = "5")]
    pub nonce: String,
    /// `control_plane`.
    #[prost(message, optional, tag = "6")]
    pub control_plane: Option<ControlPlane>,
    /// `resource_errors`.
    #[prost(message, repeated, tag = "7")]
    pub resource_errors: Vec<ResourceError>,
}

/// A protobuf `Any` whose value stays encoded and shared.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawAny {
    /// The type URL (shared by every resource of a response).
    pub type_url: Arc<str>,
    /// The encoded message.
    pub value: Bytes,
}

impl RawAny {
    /// An `Any` of `message` under `type_url`.
    pub fn pack(type_url: &str, message: &impl Message) -> Self {
        Self {
            type_url: type_url.into(),
            value: message.encode_to_vec().into(),
        }
    }

    /// As prost's `Any` (copies the value).
    pub fn to_any(&self) -> Any {
        Any {
            type_url: self.type_url.to_string(),
            value: self.value.to_vec(),
        }
    }

    /// As prost's `Any` (without a copy when nothing else holds the value).
    pub fn into_any(self) -> Any {
        Any {
            type_url: self.type_url.to_string(),
            value: self.value.into(),
        }
    }

    /// Encoded length of the `Any` message.
    fn encoded_len(&self) -> usize {
        field_len(self.type_url.len()) + field_len(self.value.len())
    }

    /// Encoded length as a `resources` field.
    fn field_len(&self) -> usize {
        let len = self.encoded_len();
        1 + encoded_len_varint(len as u64) + len
    }

    fn encode(&self, buf: &mut impl BufMut) {
        put_bytes(buf, 1, self.type_url.as_bytes());
        put_bytes(buf, 2, &self.value);
    }
}

impl From<Any> for RawAny {
    fn from(any: Any) -> Self {
        Self {
            type_url: any.type_url.into(),
            value: any.value.into(),
        }
    }
}

/// A `DiscoveryResponse` with its resources kept encoded.
#[derive(Clone, Debug, Default)]
pub struct SotwResponse {
    /// Every field but the resources.
    pub head: ResponseHead,
    resources: Arc<[RawAny]>,
    /// The `resources` fields encoded, when known: the slice of the received message they were
    /// read from (istiod writes them in one run), or a shared encoding of adjusted ones. Sent as
    /// it is, so a response is never copied into its frame.
    encoded: Option<Bytes>,
}

impl PartialEq for SotwResponse {
    fn eq(&self, other: &Self) -> bool {
        self.head == other.head && self.resources == other.resources
    }
}

impl SotwResponse {
    /// A response of `resources`.
    pub fn new(head: ResponseHead, resources: Vec<RawAny>) -> Self {
        Self {
            head,
            resources: resources.into(),
            encoded: None,
        }
    }

    /// A response of shared `resources` whose `resources` fields `encoded` encodes (as
    /// [`SotwResponse::encode_resources`] or a decoder reading them would).
    pub fn shared(head: ResponseHead, resources: Arc<[RawAny]>, encoded: Bytes) -> Self {
        Self {
            head,
            resources,
            encoded: Some(encoded),
        }
    }

    /// The resources, in order.
    pub fn resources(&self) -> &[RawAny] {
        &self.resources
    }

    /// The head, the resources and their encoding when known.
    pub fn into_parts(self) -> (ResponseHead, Arc<[RawAny]>, Option<Bytes>) {
        (self.head, self.resources, self.encoded)
    }

    /// Reads a response; each resource is a slice of `bytes`. Fails where prost would (bad
    /// wire format, a type URL that is not UTF-8); fields it does not know are dropped, as prost
    /// drops them.
    pub fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        let mut head = ResponseHead::default();
        let mut resources: Vec<RawAny> = Vec::new();
        // Where the resources fields lie in `bytes`, while they lie in one run.
        let mut run: Option<std::ops::Range<usize>> = None;
        let mut in_one_run = true;
        let mut buf = bytes.clone();
        while buf.has_remaining() {
            let start = bytes.len() - buf.remaining();
            let (tag, wire_type) = decode_key(&mut buf)?;
            if tag == 2 {
                if wire_type != WireType::LengthDelimited {
                    return Err(DecodeError::Malformed("resources: not length-delimited"));
                }
                let any = length_delimited(&mut buf)?;
                let last = resources.last().map(|r| &r.type_url);
                resources.push(decode_any(any, last)?);
                let end = bytes.len() - buf.remaining();
                match &mut run {
                    None => run = Some(start..end),
                    Some(r) if r.end == start => r.end = end,
                    Some(_) => in_one_run = false,
                }
            } else {
                head.merge_field(tag, wire_type, &mut buf, DecodeContext::default())?;
            }
        }
        let encoded = match run {
            Some(run) if in_one_run => Some(bytes.slice(run)),
            Some(_) => None,
            None => Some(Bytes::new()),
        };
        Ok(Self {
            head,
            resources: resources.into(),
            encoded,
        })
    }

    /// The `resources` fields of `resources`, encoded.
    pub fn encode_resources(resources: &[RawAny]) -> Bytes {
        let len = resources.iter().map(RawAny::field_len).sum();
        let mut buf = bytes::BytesMut::with_capacity(len);
        for r in resources {
            encode_key(2, WireType::LengthDelimited, &mut buf);
            encode_varint(r.encoded_len() as u64, &mut buf);
            r.encode(&mut buf);
        }
        buf.freeze()
    }

    /// The message as two pieces: its head's fields (written now) and its resources' (shared
    /// when known, else written now). A field's position does not matter to a decoder.
    pub fn encode_parts(&self) -> (Vec<u8>, Bytes) {
        let resources = match &self.encoded {
            Some(encoded) => encoded.clone(),
            None => Self::encode_resources(&self.resources),
        };
        (self.head.encode_to_vec(), resources)
    }

    /// The message framed for the wire, its resources shared when their encoding is known.
    pub fn frame(&self) -> Framed {
        let (head, resources) = self.encode_parts();
        frame_parts(&head, resources)
    }

    /// Encoded bytes of its resources' values.
    pub fn resource_bytes(&self) -> usize {
        self.resources.iter().map(|r| r.value.len()).sum()
    }
}

impl From<DiscoveryResponse> for SotwResponse {
    fn from(r: DiscoveryResponse) -> Self {
        let head = ResponseHead {
            version_info: r.version_info,
            canary: r.canary,
            type_url: r.type_url,
            nonce: r.nonce,
            control_plane: r.control_plane,
            resource_errors: r.resource_errors,
        };
        Self::new(head, r.resources.into_iter().map(RawAny::from).collect())
    }
}

impl From<SotwResponse> for DiscoveryResponse {
    fn from(r: SotwResponse) -> Self {
        DiscoveryResponse {
            version_info: r.head.version_info,
            resources: r.resources.iter().map(RawAny::to_any).collect(),
            canary: r.head.canary,
            type_url: r.head.type_url,
            nonce: r.head.nonce,
            control_plane: r.head.control_plane,
            resource_errors: r.head.resource_errors,
        }
    }
}

/// The payload of a length-delimited field, as a slice.
fn length_delimited(buf: &mut Bytes) -> Result<Bytes, DecodeError> {
    let len = decode_varint(buf)?;
    match usize::try_from(len) {
        Ok(len) if len <= buf.remaining() => Ok(buf.split_to(len)),
        _ => Err(DecodeError::Malformed("a length past the end of the message")),
    }
}

/// An `Any` from its encoding; `last` is the type URL of the resource before it, shared when
/// equal (a response's resources are all of one type).
fn decode_any(mut bytes: Bytes, last: Option<&Arc<str>>) -> Result<RawAny, DecodeError> {
    let (mut type_url, mut value) = (Bytes::new(), Bytes::new());
    while bytes.has_remaining() {
        let (tag, wire_type) = decode_key(&mut bytes)?;
        match (tag, wire_type) {
            (1, WireType::LengthDelimited) => type_url = length_delimited(&mut bytes)?,
            (2, WireType::LengthDelimited) => value = length_delimited(&mut bytes)?,
            (1 | 2, _) => return Err(DecodeError::Malformed("Any: a field of the wrong wire type")),
            _ => prost::encoding::skip_field(wire_type, tag, &mut bytes, DecodeContext::default())?,
        }
    }
    let type_url = match last {
        Some(last) if last.as_bytes() == type_url.as_ref() => last.clone(),
        _ => std::str::from_utf8(&type_url)
            .map_err(|_| DecodeError::Malformed("Any.type_url: not UTF-8"))?
            .into(),
    };
    Ok(RawAny { type_url, value })
}

/// Length of a bytes field (omitted when empty, as proto3 does).
fn field_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        1 + encoded_len_varint(len as u64) + len
    }
}

fn put_bytes(buf: &mut impl BufMut, tag: u32, bytes: &[u8]) {
    if !bytes.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(bytes.len() as u64, buf);
        buf.put_slice(bytes);
    }
}

/// The name (field 1) of a resource's encoding, read in place: Cluster, ClusterLoadAssignment,
/// Listener, RouteConfiguration and Secret all keep it there. `None` when the bytes do not
/// parse or the name is not UTF-8; empty when there is none.
pub fn name_of(mut bytes: &[u8]) -> Option<&str> {
    let mut name: &[u8] = &[];
    while !bytes.is_empty() {
        let (tag, wire_type) = decode_key(&mut bytes).ok()?;
        if (tag, wire_type) == (1, WireType::LengthDelimited) {
            let len = usize::try_from(decode_varint(&mut bytes).ok()?).ok()?;
            name = bytes.get(..len)?;
            bytes = &bytes[len..];
            // prost keeps the last occurrence; istiod writes one, first.
            continue;
        }
        prost::encoding::skip_field(wire_type, tag, &mut bytes, DecodeContext::default()).ok()?;
    }
    std::str::from_utf8(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use proptest::prelude::*;

    fn response() -> impl Strategy<Value = DiscoveryResponse> {
        let resource = ("[a-z./]{0,20}", proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(type_url, value)| Any { type_url, value });
        (
            ".{0,8}",
            proptest::collection::vec(resource, 0..12),
            any::<bool>(),
            ".{0,12}",
            ".{0,8}",
            proptest::option::of(".{0,8}"),
            proptest::collection::vec(".{0,8}", 0..3),
        )
            .prop_map(|(version_info, resources, canary, type_url, nonce, cp, errors)| {
                DiscoveryResponse {
                    version_info,
                    resources,
                    canary,
                    type_url,
                    nonce,
                    control_plane: cp.map(|identifier| ControlPlane { identifier }),
                    resource_errors: errors
                        .into_iter()
                        .map(|message| ResourceError {
                            error_detail: Some(envoy_types::pb::google::rpc::Status {
                                code: 3,
                                message,
                                details: vec![],
                            }),
                            ..Default::default()
                        })
                        .collect(),
                }
            })
    }

    proptest! {
        /// Decoding kept-encoded and encoding again is prost's decode and encode.
        #[test]
        fn decode_encode_equals_prost(resp in response()) {
            let bytes = resp.encode_to_vec();
            let raw = SotwResponse::decode(Bytes::from(bytes.clone())).unwrap();
            prop_assert_eq!(&DiscoveryResponse::from(raw.clone()), &resp);
            prop_assert!(raw.encoded.is_some(), "prost writes the resources in one run");
            let fresh = SotwResponse::new(raw.head.clone(), raw.resources().to_vec());
            for r in [&raw, &fresh] {
                let (head, resources) = r.encode_parts();
                let out = [head, resources.to_vec()].concat();
                prop_assert_eq!(DiscoveryResponse::decode(out.as_slice()).unwrap(), resp.clone());
            }
        }

        /// Garbage is an error or a response, never a panic; where prost reads it, so do we.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let ours = SotwResponse::decode(Bytes::from(bytes.clone()));
            if let Ok(ours) = ours {
                prop_assert_eq!(DiscoveryResponse::from(ours), DiscoveryResponse::decode(bytes.as_slice()).unwrap());
            }
            let _ = name_of(&bytes);
        }
    }

    /// A sender may interleave other fields between the resources (protobuf allows any order):
    /// the response is read the same, and its resources are encoded again instead of sliced.
    #[test]
    fn resources_between_other_fields_are_read_and_sent_whole() {
        let any = |v: &[u8]| Any {
            type_url: "t".into(),
            value: v.to_vec(),
        };
        let field = |m: DiscoveryResponse| m.encode_to_vec();
        let wire = [
            field(DiscoveryResponse {
                resources: vec![any(b"one")],
                ..Default::default()
            }),
            field(DiscoveryResponse {
                nonce: "n".into(),
                ..Default::default()
            }),
            field(DiscoveryResponse {
                resources: vec![any(b"two")],
                ..Default::default()
            }),
        ]
        .concat();
        let raw = SotwResponse::decode(Bytes::from(wire.clone())).unwrap();
        assert!(raw.encoded.is_none(), "not one run");
        let (head, resources) = raw.encode_parts();
        let sent = DiscoveryResponse::decode([head, resources.to_vec()].concat().as_slice()).unwrap();
        assert_eq!(sent, DiscoveryResponse::decode(wire.as_slice()).unwrap());
        assert_eq!(sent.resources.len(), 2);
    }

    #[test]
    fn resources_are_slices_of_the_message() {
        let resp = DiscoveryResponse {
            type_url: "t".into(),
            resources: vec![
                Any {
                    type_url: "t".into(),
                    value: b"one".to_vec(),
                },
                Any {
                    type_url: "t".into(),
                    value: b"two".to_vec(),
                },
            ],
            ..Default::default()
        };
        let bytes = Bytes::from(resp.encode_to_vec());
        let range = bytes.as_ptr() as usize..bytes.as_ptr() as usize + bytes.len();
        let raw = SotwResponse::decode(bytes).unwrap();
        assert!(
            raw.resources()
                .iter()
                .all(|r| range.contains(&(r.value.as_ptr() as usize)))
        );
        assert!(Arc::ptr_eq(
            &raw.resources()[0].type_url,
            &raw.resources()[1].type_url
        ));
        let encoded = raw.encoded.as_ref().unwrap();
        assert!(
            range.contains(&(encoded.as_ptr() as usize)),
            "the resources' encoding is the message's"
        );
    }

    #[test]
    fn names_are_read_in_place() {
        let cluster = Cluster {
            name: "outbound|80||a.ns.svc.cluster.local".into(),
            alt_stat_name: "x".into(),
            ..Default::default()
        };
        let bytes = cluster.encode_to_vec();
        assert_eq!(name_of(&bytes), Some("outbound|80||a.ns.svc.cluster.local"));
        assert_eq!(name_of(&Cluster::default().encode_to_vec()), Some(""));
        assert_eq!(name_of(&[0x0a, 0x05, b'a']), None, "a name cut short");
    }
}
