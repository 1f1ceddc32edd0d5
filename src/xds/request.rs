//! A SotW request as the relay handles it: the few fields it reads or rewrites decoded, every
//! other field kept as the downstream encoded it.
//!
//! A SotW EDS request names every subscribed cluster (10,000 names, hundreds of KiB, at 10,000
//! services) and Envoy sends one per ACK. The relay only translates the nonce and version, so
//! decoding every name into a `String` and encoding them again for istiod is wasted: the names
//! (and any field this relay does not know) stay in [`SotwRequest::rest`] and are copied as
//! they are, copied in one piece. A protobuf message is the concatenation of its fields and a
//! decoder takes the last value of a repeated scalar, so head-then-rest decodes to the same
//! request.

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::google::rpc::Status;
use prost::Message;
use prost::bytes::BufMut;
use prost::encoding::{self, DecodeContext, WireType, decode_key};

/// The fields of a `DiscoveryRequest` the relay reads or rewrites (same numbers).
#[derive(Clone, PartialEq, Message)]
pub struct RequestHead {
    /// `version_info`: rewritten to istiod's version.
    #[prost(string, tag = "1")]
    pub version_info: String,
    /// `node`: read on a stream's first request.
    #[prost(message, optional, tag = "2")]
    pub node: Option<Node>,
    /// `type_url`.
    #[prost(string, tag = "4")]
    pub type_url: String,
    /// `response_nonce`: rewritten to istiod's nonce.
    #[prost(string, tag = "5")]
    pub response_nonce: String,
    /// `error_detail`: a NACK.
    #[prost(message, optional, tag = "6")]
    pub error_detail: Option<Status>,
}

/// A `DiscoveryRequest` with only [`RequestHead`] decoded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SotwRequest {
    /// The decoded fields.
    pub head: RequestHead,
    /// Every other field, encoded as received (`resource_names` among them).
    rest: Vec<u8>,
}

impl SotwRequest {
    /// Reads a request: the head's fields decoded, every other field copied as it is (a run of
    /// such fields, such as the names, in one copy). Fails where prost would.
    pub fn decode(bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        let mut head = RequestHead::default();
        let mut rest = Vec::new();
        let mut buf = bytes;
        // Where the run of kept fields being read began.
        let mut run: Option<usize> = None;
        while !buf.is_empty() {
            let start = bytes.len() - buf.len();
            let (tag, wire_type) = decode_key(&mut buf)?;
            let head_field = HEAD_FIELDS.contains(&tag);
            // DiscoveryRequest has no groups (a proto2 relic): they are dropped, as prost drops
            // any field it does not know.
            let group = matches!(wire_type, WireType::StartGroup | WireType::EndGroup);
            if (head_field || group)
                && let Some(from) = run.take()
            {
                rest.extend_from_slice(&bytes[from..start]);
            }
            if head_field {
                head.merge_field(tag, wire_type, &mut buf, DecodeContext::default())?;
            } else {
                encoding::skip_field(wire_type, tag, &mut buf, DecodeContext::default())?;
                if !group {
                    run.get_or_insert(start);
                }
            }
        }
        if let Some(from) = run {
            rest.extend_from_slice(&bytes[from..]);
        }
        Ok(Self { head, rest })
    }

    /// Encoded length.
    pub fn encoded_len(&self) -> usize {
        self.head.encoded_len() + self.rest.len()
    }

    /// Writes the request: the head's fields, then the others as they came.
    pub fn encode(&self, buf: &mut impl BufMut) {
        self.head.encode_raw(buf);
        buf.put_slice(&self.rest);
    }

    /// The encoding, in a fresh `Vec`.
    pub fn encode_to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out
    }

    /// The subscribed names (decodes them: for the rare paths that need them).
    pub fn resource_names(&self) -> Vec<String> {
        DiscoveryRequest::decode(self.rest.as_slice())
            .map(|r| r.resource_names)
            .unwrap_or_default()
    }
}

impl From<&DiscoveryRequest> for SotwRequest {
    fn from(req: &DiscoveryRequest) -> Self {
        // Decoding what prost just encoded cannot fail.
        Self::decode(req.encode_to_vec().as_slice()).unwrap_or_default()
    }
}

const HEAD_FIELDS: [u32; 5] = [1, 2, 4, 5, 6];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::encoding::{encode_key, encode_varint};

    fn request() -> impl Strategy<Value = DiscoveryRequest> {
        (
            ".{0,8}",
            proptest::option::of(".{0,12}"),
            proptest::collection::vec("[a-z|.0-9]{0,30}", 0..40),
            ".{0,8}",
            ".{0,8}",
            proptest::option::of((0i32..20, ".{0,12}")),
        )
            .prop_map(
                |(version_info, node, resource_names, type_url, response_nonce, error)| DiscoveryRequest {
                    version_info,
                    node: node.map(|id| Node {
                        id,
                        ..Default::default()
                    }),
                    resource_names,
                    type_url,
                    response_nonce,
                    error_detail: error.map(|(code, message)| Status {
                        code,
                        message,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )
    }

    proptest! {
        /// Rewriting the head of a kept-encoded request gives the bytes of decode, rewrite,
        /// encode (as a decoder sees them).
        #[test]
        fn rewriting_the_head_equals_decode_modify_encode(req in request(), version in ".{0,8}", nonce in ".{0,8}") {
            let encoded = req.encode_to_vec();
            let mut raw = SotwRequest::decode(encoded.as_slice()).unwrap();
            prop_assert_eq!(&raw.head.type_url, &req.type_url);
            prop_assert_eq!(&raw.head.node, &req.node);
            prop_assert_eq!(raw.resource_names(), req.resource_names.clone());
            raw.head.version_info = version.clone();
            raw.head.response_nonce = nonce.clone();
            let mut want = req.clone();
            want.version_info = version;
            want.response_nonce = nonce;
            let patched = DiscoveryRequest::decode(raw.encode_to_vec().as_slice()).unwrap();
            prop_assert_eq!(patched, want);
            prop_assert_eq!(raw.encoded_len(), raw.encode_to_vec().len());
        }

        /// Unknown fields and repeated head fields decode as prost decodes them.
        #[test]
        fn unknown_and_repeated_fields_survive(req in request(), extra in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut encoded = req.encode_to_vec();
            // An unknown field (number 99, length-delimited), then the nonce again (last wins).
            encode_key(99, WireType::LengthDelimited, &mut encoded);
            encode_varint(extra.len() as u64, &mut encoded);
            encoded.extend_from_slice(&extra);
            encode_key(5, WireType::LengthDelimited, &mut encoded);
            encode_varint(4, &mut encoded);
            encoded.extend_from_slice(b"last");
            let raw = SotwRequest::decode(encoded.as_slice()).unwrap();
            prop_assert_eq!(&raw.head.response_nonce, "last");
            let through = raw.encode_to_vec();
            prop_assert_eq!(
                DiscoveryRequest::decode(through.as_slice()).unwrap(),
                DiscoveryRequest::decode(encoded.as_slice()).unwrap()
            );
        }

        /// Garbage is an error or a request, never a panic: an error where prost fails, and
        /// what prost reads where it does not.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let prost = DiscoveryRequest::decode(bytes.as_slice());
            match SotwRequest::decode(bytes.as_slice()) {
                Ok(raw) => {
                    let _ = raw.resource_names();
                    let again = DiscoveryRequest::decode(raw.encode_to_vec().as_slice());
                    prop_assert_eq!(again.ok(), prost.ok());
                }
                Err(_) => prop_assert!(prost.is_err()),
            }
        }
    }
}
