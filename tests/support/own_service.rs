//! What istiod renders for a NONE-mode sidecar's own Service (`SidecarShape::own_service` of
//! the fake istiod): for each target port, the inbound listener `0.0.0.0_<port>` (the PERMISSIVE
//! pair of chains: mTLS with pilot-agent's SDS certificates, and plaintext HTTP, each an HTTP
//! connection manager routing to `inbound|<port>||`) and that STATIC cluster, pointing at the
//! application on 127.0.0.1.

use lazyload::fake_istiod::Config;
use lazyload::xds::{CLUSTER, LISTENER};
use serde_json::json;

use super::fixtures::any_from_json;
use envoy_types::pb::google::protobuf::Any;

/// The inbound listeners and clusters of a Service with these target ports (none: no Pod or
/// Service yet).
pub fn own_service(ports: &[u16]) -> Config {
    let mut config = Config::new();
    for &port in ports {
        config
            .entry(LISTENER.to_string())
            .or_default()
            .insert(format!("0.0.0.0_{port}"), inbound_listener(port));
        config
            .entry(CLUSTER.to_string())
            .or_default()
            .insert(format!("inbound|{port}||"), inbound_cluster(port));
    }
    config
}

/// pilot-agent's SDS source, as istiod writes it.
fn agent_sds() -> serde_json::Value {
    json!({"api_config_source": {"api_type": "GRPC", "transport_api_version": "V3",
        "set_node_on_first_message_only": true,
        "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]},
        "initial_fetch_timeout": "0s", "resource_api_version": "V3"})
}

/// istiod's inbound listener for a NONE-mode sidecar's own Service port (HTTP, PERMISSIVE).
fn inbound_listener(port: u16) -> Any {
    let cluster = format!("inbound|{port}||");
    let name = format!("0.0.0.0_{port}");
    let hcm = json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": format!("inbound_0.0.0.0_{port}"),
            "route_config": {"name": cluster, "validate_clusters": false, "virtual_hosts": [{
                "name": format!("inbound|http|{port}"), "domains": ["*"],
                "routes": [{"name": "default", "match": {"prefix": "/"},
                            "route": {"cluster": cluster, "timeout": "0s"}}]}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            "normalize_path": true,
            "forward_client_cert_details": "APPEND_FORWARD",
            "set_current_client_cert_details": {"subject": true, "dns": true, "uri": true},
            "upgrade_configs": [{"upgrade_type": "websocket"}],
            "stream_idle_timeout": "0s",
            "server_name": "istio-envoy"
        }
    });
    let mtls = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": agent_sds()}],
                "combined_validation_context": {
                    "default_validation_context": {},
                    "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": agent_sds()}
                }
            },
            "require_client_certificate": true
        }
    });
    any_from_json(&json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": name,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "traffic_direction": "INBOUND",
        "filter_chains": [
            {"filter_chain_match": {"destination_port": port, "transport_protocol": "tls",
                "application_protocols": ["istio-http/1.0", "istio-http/1.1", "istio-h2"]},
             "filters": [hcm], "transport_socket": mtls, "name": name},
            {"filter_chain_match": {"destination_port": port, "transport_protocol": "raw_buffer",
                "application_protocols": ["http/1.1", "http/1.0", "h2c"]},
             "filters": [hcm], "name": name}
        ],
        "listener_filters": [
            {"name": "envoy.filters.listener.tls_inspector", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}},
            {"name": "envoy.filters.listener.http_inspector", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}}
        ],
        "listener_filters_timeout": "0s",
        "continue_on_listener_filters_timeout": true
    }))
}

/// istiod's inbound cluster for a NONE-mode sidecar's own Service port: the application on
/// 127.0.0.1.
fn inbound_cluster(port: u16) -> Any {
    let name = format!("inbound|{port}||");
    any_from_json(&json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "STATIC",
        "connect_timeout": "10s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}
    }))
}
