//! A client of a collector, as a global-sidecar connects (its entries and messages:
//! `lazyload::testing::als`).

use std::net::SocketAddr;

use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;

/// A client of the collector at `addr`.
pub async fn client(addr: SocketAddr) -> AccessLogServiceClient<tonic::transport::Channel> {
    AccessLogServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_encoding_message_size(64 * 1024 * 1024)
}
