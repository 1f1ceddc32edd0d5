//! The xDS relay of `serve`: its listeners (plaintext, and TLS when configured), metrics,
//! `/debug/relay` and readiness.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use super::Components;
use super::options::{RelayOptions, TlsFiles};
use crate::config::{Config, MetricSourceType};
use crate::xds::adjust::{RESERVED_PORTS, Settings};
use crate::xds::server::{Relay, RelayConfig, ServerLimits};

/// Port the global-sidecar sends access logs to when `global.misc.logSourcePort` names none.
const DEFAULT_ALS_PORT: u16 = 8082;

/// Starts the xDS relay to `upstream` (plaintext, and TLS when configured).
pub async fn start_relay(ctx: &mut Components, options: &RelayOptions, upstream: &str) -> anyhow::Result<()> {
    let relay = Relay::new(
        relay_config(&ctx.config, options, upstream)?,
        ctx.shutdown.clone(),
    );
    relay.metrics().register(&mut ctx.registry);
    let view = relay.clone();
    ctx.debug = std::mem::take(&mut ctx.debug).route(
        "/debug/relay",
        axum::routing::get(move || {
            let view = view.clone();
            async move { axum::Json(view.debug_view()) }
        }),
    );
    let ready = ctx.readiness.register("relay");
    let listener = TcpListener::bind(options.xds_listen)
        .await
        .with_context(|| format!("binding --xds-listen {}", options.xds_listen))?;
    tracing::info!(addr = %listener.local_addr()?, %upstream, "xDS relay listening");
    ctx.spawn("relay", relay.clone().serve(listener, None));
    if let Some(files) = &options.tls {
        let listener = TcpListener::bind(options.xds_tls_listen)
            .await
            .with_context(|| format!("binding --xds-tls-listen {}", options.xds_tls_listen))?;
        tracing::info!(addr = %listener.local_addr()?, "xDS relay listening (TLS)");
        ctx.spawn("relay-tls", relay.serve(listener, Some(tls_config(files)?)));
    }
    ready.set(true);
    Ok(())
}

/// What the relay runs with: the options, and the configuration's defaults for what they leave out.
fn relay_config(cfg: &Config, options: &RelayOptions, upstream: &str) -> anyhow::Result<RelayConfig> {
    let als_address = match options.als_address.as_deref() {
        Some(_) => options.als_host_port()?,
        None => {
            let port = cfg
                .misc_address("logSourcePort")
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .map_or(DEFAULT_ALS_PORT, |a| a.port());
            let host = format!(
                "lazyload.{}.svc.{}",
                cfg.global.slime_namespace, cfg.general.cluster_domain
            );
            Some((host, port))
        }
    };
    let mut reserved_ports: BTreeSet<u32> = RESERVED_PORTS.into_iter().collect();
    reserved_ports.extend(options.reserved_ports.iter().map(|&p| u32::from(p)));
    Ok(RelayConfig {
        settings: Settings {
            als_address,
            reserved_ports,
            rebind_address: options.rebind_address.clone(),
            remove_metadata_exchange: cfg.general.metric_source_type == MetricSourceType::Prometheus,
            accept_mtls: options.accept_mtls,
            cluster_domain: cfg.general.cluster_domain.clone(),
        },
        upstream: options.upstream(upstream)?,
        node_pattern: options.node_pattern()?,
        open_budget: options.upstream_open_budget,
        probe_interval: Duration::from_secs(2),
        limits: ServerLimits {
            connections: crate::net::ConnectionLimits {
                max_connections: options.xds_max_connections as usize,
                handshake_timeout: options.xds_handshake_timeout,
            },
            max_request_bytes: options.xds_max_request_bytes as usize,
        },
    })
}

/// The TLS listener's identity and, with a client CA, the client certificates it asks for.
fn tls_config(files: &TlsFiles) -> anyhow::Result<ServerTlsConfig> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?));
    if let Some(ca) = &files.client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(tls)
}
