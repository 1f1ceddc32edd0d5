//! A global-sidecar's side of the access-log service as Envoy speaks it: the HTTP entries and
//! the stream messages that carry them (used by tests and benches).

use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::{Address, Node, SocketAddress};
use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties,
};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, Identifier, LogEntries,
};

/// An HTTP entry: a call from `source` (the caller's IP) for `authority`.
pub fn entry(source: &str, authority: String) -> HttpAccessLogEntry {
    HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon {
            downstream_remote_address: Some(Address {
                address: Some(AddressKind::SocketAddress(SocketAddress {
                    address: source.into(),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        }),
        request: Some(HttpRequestProperties {
            authority,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A stream message with `entries`; the first of a stream identifies the global-sidecar.
pub fn message(
    first: bool,
    entries: impl IntoIterator<Item = HttpAccessLogEntry>,
) -> StreamAccessLogsMessage {
    StreamAccessLogsMessage {
        identifier: first.then(|| Identifier {
            node: Some(Node {
                id: "global-sidecar-1".into(),
                ..Default::default()
            }),
            log_name: crate::als::LOG_NAME.into(),
        }),
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: entries.into_iter().collect(),
        })),
    }
}
