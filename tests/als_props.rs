//! Property tests of the access-log path on wire input: arbitrary bytes and arbitrary entries
//! never panic, attribution is deterministic, and what it learns is always a valid host of a
//! known caller.

use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress};
use envoy_types::pb::envoy::data::accesslog::v3::tls_properties::CertificateProperties;
use envoy_types::pb::envoy::data::accesslog::v3::tls_properties::certificate_properties::SubjectAltName;
use envoy_types::pb::envoy::data::accesslog::v3::tls_properties::certificate_properties::subject_alt_name::San;
use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties, TcpAccessLogEntry, TlsProperties,
};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, LogEntries, TcpAccessLogEntries,
};
use jiff::Timestamp;
use lazyload::als::attribute::{Attributor, Hosts};
use lazyload::als::collector::{Tally, process};
use lazyload::als::entry::Entry;
use lazyload::config::Config;
use lazyload::index::ClusterIndex;
use lazyload::learn::{Learner, Limits};
use lazyload::testing;
use lazyload::vocab::ObjectKey;
use lazyload::vocab::host::host_name;
use proptest::prelude::*;
use prost::Message;

fn index() -> ClusterIndex {
    let mut idx = ClusterIndex::new("cluster.local");
    for (i, name) in ["productpage", "reviews", "details", "global-sidecar"]
        .into_iter()
        .enumerate()
    {
        let (vip, ip) = (format!("10.96.0.{}", i + 1), format!("10.0.0.{}", i + 1));
        idx.apply_service(testing::service("default", name, name, &[&vip]));
        idx.apply_pod(testing::pod(
            "default",
            &format!("{name}-1"),
            &[("app", name)],
            &ip,
            "default",
        ));
    }
    idx
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("details".to_string()),
        Just("details.default".to_string()),
        Just("reviews.default.svc.cluster.local:9080".to_string()),
        Just("10.96.0.2:9080".to_string()),
        Just("[fd00::1]:80".to_string()),
        Just("global-sidecar".to_string()),
        Just("outbound|9080|v1|reviews.default.svc.cluster.local".to_string()),
        Just("outbound|80||global-sidecar.default.svc.cluster.local".to_string()),
        Just("PassthroughCluster".to_string()),
        Just("spiffe://cluster.local/ns/default/sa/default".to_string()),
        "[a-zA-Z0-9.:|\\-_\\[\\]/]{0,40}",
        ".{0,300}",
    ]
}

fn ip() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("10.0.0.1".to_string()),
        Just("10.0.0.2".to_string()),
        Just("10.0.0.4".to_string()),
        Just("10.9.9.9".to_string()),
        text(),
    ]
}

fn common() -> impl Strategy<Value = AccessLogCommon> {
    (ip(), text(), proptest::option::of(text())).prop_map(|(ip, cluster, san)| AccessLogCommon {
        downstream_remote_address: Some(Address {
            address: Some(AddressKind::SocketAddress(SocketAddress {
                address: ip,
                ..Default::default()
            })),
        }),
        upstream_cluster: cluster,
        tls_properties: san.map(|uri| TlsProperties {
            peer_certificate_properties: Some(CertificateProperties {
                subject_alt_name: vec![SubjectAltName {
                    san: Some(San::Uri(uri)),
                }],
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn http_entry() -> impl Strategy<Value = HttpAccessLogEntry> {
    (
        proptest::option::of(common()),
        text(),
        text(),
        proptest::collection::vec(
            (
                prop_oneof![
                    Just("slime-orig-dest".to_string()),
                    Just("slime-source-ns".to_string()),
                    text()
                ],
                text(),
            ),
            0..3,
        ),
    )
        .prop_map(|(common, authority, ua, headers)| HttpAccessLogEntry {
            common_properties: common,
            request: Some(HttpRequestProperties {
                authority,
                user_agent: ua,
                request_headers: headers.into_iter().collect(),
                ..Default::default()
            }),
            ..Default::default()
        })
}

fn attributor(short: bool) -> Attributor {
    let mut cfg = Config::default();
    cfg.general.enable_short_domain = short;
    Attributor::new(&cfg)
}

fn outcome(
    a: &Attributor,
    idx: &ClusterIndex,
    entry: &Entry<'_>,
) -> Result<(Vec<ObjectKey>, Vec<String>), String> {
    let mut hosts = Hosts::default();
    a.attribute(idx, entry, &mut hosts)
        .map(|f| (f.to_vec(), hosts.iter().map(String::from).collect()))
        .map_err(|d| d.as_str().to_string())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(msg) = StreamAccessLogsMessage::decode(bytes.as_slice()) {
            let idx = index();
            let mut learner = Learner::new(Limits::default());
            let mut tally = Tally::default();
            process(&attributor(false), &idx, &mut learner, &msg, &mut Hosts::default(), Timestamp::now(), &mut tally);
        }
    }

    #[test]
    fn attribution_is_deterministic_and_learns_only_valid_hosts(
        entries in proptest::collection::vec(http_entry(), 1..8),
        tcp in proptest::collection::vec(proptest::option::of(common()), 0..4),
        short in any::<bool>(),
    ) {
        let idx = index();
        let a = attributor(short);
        for e in &entries {
            let first = outcome(&a, &idx, &Entry::http(e));
            prop_assert_eq!(&first, &outcome(&a, &idx, &Entry::http(e)));
            if let Ok((fences, hosts)) = first {
                prop_assert!(!fences.is_empty() && !hosts.is_empty());
                prop_assert!(fences.iter().all(|f| idx.service(f).is_some() && f.name != "global-sidecar"));
                for h in &hosts {
                    let valid = host_name(h);
                    prop_assert_eq!(valid.as_deref(), Ok(h.as_str()), "invalid learned host");
                    prop_assert!(h.contains('.') || short, "short name without enableShortDomain: {}", h);
                    prop_assert!(!h.starts_with("global-sidecar."));
                }
            }
        }
        // The same entries through the wire: encode, decode, process.
        let tcp: Vec<TcpAccessLogEntry> = tcp.into_iter().map(|c| TcpAccessLogEntry { common_properties: c, ..Default::default() }).collect();
        let mut learner = Learner::new(Limits { max_pending: 4, max_edges: 8, max_hosts: 4, ..Limits::default() });
        let mut tally = Tally::default();
        for log_entries in [
            LogEntries::HttpLogs(HttpAccessLogEntries { log_entry: entries }),
            LogEntries::TcpLogs(TcpAccessLogEntries { log_entry: tcp }),
        ] {
            let msg = StreamAccessLogsMessage { identifier: None, log_entries: Some(log_entries) };
            let decoded = StreamAccessLogsMessage::decode(msg.encode_to_vec().as_slice()).unwrap();
            process(&a, &idx, &mut learner, &decoded, &mut Hosts::default(), Timestamp::now(), &mut tally);
        }
        prop_assert!(learner.len() <= 8 && learner.pending() <= 4, "caps hold");
    }
}
