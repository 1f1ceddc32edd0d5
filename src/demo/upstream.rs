//! The demo's built-in upstream: a minimal istiod stand-in serving a fixed config over SotW ADS,
//! so the relay has something to relay without a cluster.
//!
//! Enough of istiod's behaviour for one config version: each request for a type is answered with
//! its resources (CDS and LDS whole, EDS and RDS the names asked for), an ACK (the last nonce, the
//! same names) is not answered, a NACK is logged. Delta ADS is refused: the demo's global-sidecar
//! speaks SotW.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::mesh::Resources;
use crate::xds::is_wildcard_type;

/// The config version every response carries (the config never changes).
const VERSION: &str = "demo-1";

/// The ADS service over one fixed config.
struct Upstream {
    resources: Arc<Resources>,
    nonces: Arc<AtomicU64>,
}

/// What a stream last sent per type: (nonce, names asked for).
type Sent = HashMap<String, (String, Vec<String>)>;

/// The response to `req`, or `None` when it is an ACK or NACK of what was sent.
fn respond(
    resources: &Resources,
    sent: &mut Sent,
    nonces: &AtomicU64,
    req: DiscoveryRequest,
) -> Option<DiscoveryResponse> {
    if let Some(error) = &req.error_detail {
        tracing::warn!(type_url = %req.type_url, error = %error.message, "demo upstream: NACK");
        return None;
    }
    if let Some((nonce, names)) = sent.get(&req.type_url)
        && *nonce == req.response_nonce
        && *names == req.resource_names
    {
        return None;
    }
    let of_type = resources.get(&req.type_url);
    let wildcard = is_wildcard_type(&req.type_url) || req.resource_names.is_empty();
    let chosen = of_type
        .into_iter()
        .flat_map(|r| r.iter())
        .filter(|(name, _)| wildcard || req.resource_names.contains(name))
        .map(|(_, any)| any.clone())
        .collect();
    let nonce = nonces.fetch_add(1, Ordering::Relaxed).to_string();
    sent.insert(req.type_url.clone(), (nonce.clone(), req.resource_names));
    Some(DiscoveryResponse {
        version_info: VERSION.into(),
        resources: chosen,
        type_url: req.type_url,
        nonce,
        ..Default::default()
    })
}

type ResponseStream<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Upstream {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let (resources, nonces) = (self.resources.clone(), self.nonces.clone());
        tokio::spawn(async move {
            let mut sent = Sent::new();
            while let Ok(Some(req)) = requests.message().await {
                if let Some(resp) = respond(&resources, &mut sent, &nonces, req)
                    && tx.send(Ok(resp)).await.is_err()
                {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("the demo upstream speaks SotW ADS only"))
    }
}

/// Starts the upstream on a loopback port; it serves until `shutdown` is cancelled.
pub async fn start(resources: Resources, shutdown: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let service = AggregatedDiscoveryServiceServer::new(Upstream {
        resources: Arc::new(resources),
        nonces: Arc::new(AtomicU64::new(1)),
    })
    .max_encoding_message_size(usize::MAX);
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(crate::net::nodelay_incoming(listener), shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "demo upstream stopped");
        }
    });
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::mesh::Mesh;
    use crate::xds::{CLUSTER, ENDPOINT};

    fn req(type_url: &str, names: &[&str], nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: type_url.into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    #[test]
    fn answers_requests_not_acks() {
        let resources = Mesh::sample(2).xds();
        let (mut sent, nonces) = (Sent::new(), AtomicU64::new(1));
        let cds = respond(&resources, &mut sent, &nonces, req(CLUSTER, &[], "")).unwrap();
        assert_eq!(
            cds.resources.len(),
            6 + 2,
            "every service, PassthroughCluster, BlackHoleCluster"
        );
        assert!(respond(&resources, &mut sent, &nonces, req(CLUSTER, &[], &cds.nonce)).is_none());
        let one = "outbound|9080||details.bookinfo.svc.cluster.local";
        let eds = respond(&resources, &mut sent, &nonces, req(ENDPOINT, &[one], "")).unwrap();
        assert_eq!(eds.resources.len(), 1);
        assert!(respond(&resources, &mut sent, &nonces, req(ENDPOINT, &[one], &eds.nonce)).is_none());
        let two = [one, "outbound|9080||ratings.bookinfo.svc.cluster.local"];
        let more = respond(&resources, &mut sent, &nonces, req(ENDPOINT, &two, &eds.nonce)).unwrap();
        assert_eq!(more.resources.len(), 2, "a changed subscription is answered");
        assert_ne!(more.nonce, eds.nonce);
        let mut nack = req(ENDPOINT, &two, &more.nonce);
        nack.error_detail = Some(Default::default());
        assert!(respond(&resources, &mut sent, &nonces, nack).is_none());
        assert!(
            respond(
                &resources,
                &mut sent,
                &nonces,
                req("type.googleapis.com/unknown", &[], "")
            )
            .is_some_and(|r| r.resources.is_empty())
        );
    }
}
