//! Tests of the SotW state machine: nonce and version translation, ACK/NACK classification,
//! merge by name, and that arbitrary bytes never panic it.

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status;
use proptest::prelude::*;

use super::*;
use crate::xds::adjust::{Settings, pack};
use crate::xds::stream::StreamState;
use crate::xds::{CLUSTER, ENDPOINT, LISTENER, NodeInfo, ROUTE, SECRET, SecretSource};

fn cla(name: &str) -> Any {
    pack(&ClusterLoadAssignment {
        cluster_name: name.into(),
        ..Default::default()
    })
}

fn response(type_url: &str, resources: Vec<Any>, version: &str, nonce: &str) -> SotwResponse {
    SotwResponse::from(DiscoveryResponse {
        version_info: version.into(),
        resources,
        type_url: type_url.into(),
        nonce: nonce.into(),
        ..Default::default()
    })
}

fn request(type_url: &str, version: &str, nonce: &str, error: Option<&str>) -> SotwRequest {
    SotwRequest::from(&DiscoveryRequest {
        type_url: type_url.into(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        error_detail: error.map(|m| Status {
            message: m.into(),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Runs `f` with the default adjustments and a fresh interner.
fn with_defaults(f: impl FnOnce(&Adjuster<'_>, &Interner)) {
    let settings = Settings::default();
    let node = NodeInfo::default();
    let adj = Adjuster {
        settings: &settings,
        node: &node,
    };
    f(&adj, &Interner::default());
}

#[test]
fn nonces_versions_and_replies() {
    with_defaults(|adj, interner| {
        let mut s = SotwStream::new(7);
        let first = s.upstream_response(
            response(ENDPOINT, vec![cla("a")], "v1", "n1"),
            adj,
            interner,
            &mut Counts::default(),
        );
        let second = s.upstream_response(
            response(ENDPOINT, vec![cla("b")], "v2", "n2"),
            adj,
            interner,
            &mut Counts::default(),
        );
        assert_eq!(first.head.nonce, "ll-7-1");
        assert_ne!(first.head.version_info, "v1");

        // (request, translated nonce, translated version, reply)
        let cases = [
            (request(ENDPOINT, "", "", None), "", "", Reply::Request),
            (
                request(ENDPOINT, &second.head.version_info, &second.head.nonce, None),
                "n2",
                "v2",
                Reply::Ack {
                    type_url: ENDPOINT.into(),
                },
            ),
            (
                request(ENDPOINT, &first.head.version_info, &first.head.nonce, None),
                "n1",
                "v1",
                Reply::Request,
            ),
            (
                request(
                    ENDPOINT,
                    &first.head.version_info,
                    &second.head.nonce,
                    Some("bad"),
                ),
                "n2",
                "v1",
                Reply::Nack {
                    type_url: ENDPOINT.into(),
                    detail: "bad".into(),
                    adjusted: vec![],
                },
            ),
            (
                request(ENDPOINT, "x", "unknown-nonce", None),
                "unknown-nonce",
                "x",
                Reply::Request,
            ),
        ];
        for (req, nonce, version, reply) in cases {
            let (up, got) = s.downstream_request(req);
            assert_eq!(
                (
                    up.head.response_nonce.as_str(),
                    up.head.version_info.as_str(),
                    got
                ),
                (nonce, version, reply)
            );
        }
        // Partial EDS pushes merge by name.
        let names: Vec<&str> = s.resources(ENDPOINT).unwrap().keys().map(|k| &**k).collect();
        assert_eq!(names, ["a", "b"]);
    });
}

/// The last-good record shares the set the stream ACKed (no copy per ACK); the stream's next
/// push copies it, so the record keeps what was ACKed.
#[test]
fn acked_sets_are_shared_then_copied_on_write() {
    use crate::xds::cache::LastGood;
    with_defaults(|adj, interner| {
        let record = LastGood::default();
        let mut s = SotwStream::new(1);
        let cluster = pack(&Cluster {
            name: "c0".into(),
            ..Default::default()
        });
        let listener = pack(&Listener {
            name: "l0".into(),
            ..Default::default()
        });
        for (type_url, any) in [(CLUSTER, cluster), (LISTENER, listener)] {
            let nonce = s
                .upstream_response(
                    response(type_url, vec![any], "v1", "u1"),
                    adj,
                    interner,
                    &mut Counts::default(),
                )
                .head
                .nonce;
            let (_, reply) = s.downstream_request(request(type_url, "", &nonce, None));
            assert_eq!(
                reply,
                Reply::Ack {
                    type_url: type_url.into()
                }
            );
            record.acked("gs", 1, type_url, s.resources(type_url).unwrap());
        }
        let acked = record.get("gs").unwrap();
        assert!(acked.types[CLUSTER].shares_with(s.resources(CLUSTER).unwrap()));
        let named = pack(&Cluster {
            name: "c".into(),
            ..Default::default()
        });
        s.upstream_response(
            response(CLUSTER, vec![named], "v2", "u2"),
            adj,
            interner,
            &mut Counts::default(),
        );
        assert!(s.resources(CLUSTER).unwrap().contains_key("c"));
        assert!(acked.types[CLUSTER].contains_key("c0"));
        assert!(
            !record.get("gs").unwrap().types[CLUSTER].contains_key("c"),
            "the record keeps what was ACKed"
        );
    });
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(
        type_url in prop::sample::select(vec![CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, "type.googleapis.com/x"]),
        resources in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..4),
        nonce in "[a-z0-9-]{0,8}",
        stock in any::<bool>(),
        static_secrets in any::<bool>(),
    ) {
        let settings = Settings { accept_mtls: true, als_address: Some(("127.0.0.1".into(), 1)), ..Default::default() };
        let secrets = if static_secrets { SecretSource::Static } else { SecretSource::Agent };
        let node = NodeInfo { stock_envoy: stock, secrets, ..Default::default() };
        let adj = Adjuster { settings: &settings, node: &node };
        let interner = Interner::default();
        let mut s = SotwStream::new(1);
        let anys: Vec<Any> = resources.into_iter().map(|value| Any { type_url: type_url.into(), value }).collect();
        let n = anys.len();
        let out = s.upstream_response(response(type_url, anys, "v", "n"), &adj, &interner, &mut Counts::default());
        prop_assert!(out.resources().len() <= n + 1);
        let _ = s.downstream_request(request(type_url, "v", &nonce, None));
    }
}
