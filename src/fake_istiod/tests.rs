//! The fake istiod over loopback, with a plain ADS client as its peer.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use super::{Config, FakeIstiod};
use crate::xds::adjust::pack;
use crate::xds::{CLUSTER, ENDPOINT};

const WAIT: Duration = Duration::from_secs(5);

fn clusters(names: &[&str]) -> Config {
    let of_type = names
        .iter()
        .map(|n| {
            let c = Cluster {
                name: n.to_string(),
                ..Default::default()
            };
            (n.to_string(), pack(&c))
        })
        .collect();
    [(CLUSTER.to_string(), of_type)].into()
}

/// One ADS stream to the fake: requests in, responses out.
struct Client<Req, Resp> {
    tx: mpsc::Sender<Req>,
    rx: Streaming<Resp>,
}

impl<Req, Resp> Client<Req, Resp> {
    async fn send(&self, req: Req) {
        self.tx.send(req).await.unwrap();
    }

    async fn recv(&mut self) -> Resp {
        let next = tokio::time::timeout(WAIT, self.rx.message()).await;
        next.expect("a response in time").unwrap().expect("a response")
    }

    /// Nothing comes for a while.
    async fn silent(&mut self) -> bool {
        tokio::time::timeout(Duration::from_millis(200), self.rx.message())
            .await
            .is_err()
    }
}

async fn sotw(istiod: &FakeIstiod) -> Client<DiscoveryRequest, DiscoveryResponse> {
    let mut client = AggregatedDiscoveryServiceClient::connect(istiod.url())
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let rx = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap();
    Client {
        tx,
        rx: rx.into_inner(),
    }
}

async fn delta(istiod: &FakeIstiod) -> Client<DeltaDiscoveryRequest, DeltaDiscoveryResponse> {
    let mut client = AggregatedDiscoveryServiceClient::connect(istiod.url())
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let rx = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap();
    Client {
        tx,
        rx: rx.into_inner(),
    }
}

fn request(type_url: &str, names: &[&str], nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn sotw_answers_requests_not_acks_and_records_nacks() {
    let istiod = FakeIstiod::start(clusters(&["a", "b"])).await.unwrap();
    let mut c = sotw(&istiod).await;
    c.send(request(CLUSTER, &[], "")).await;
    let cds = c.recv().await;
    assert_eq!(cds.resources.len(), 2);
    c.send(request(CLUSTER, &[], &cds.nonce)).await;
    assert!(c.silent().await, "an ACK is not answered");

    c.send(request(ENDPOINT, &["unknown"], "")).await;
    let eds = c.recv().await;
    let cla = ClusterLoadAssignment::decode(&*eds.resources[0].value).unwrap();
    assert_eq!(cla.cluster_name, "unknown", "an unknown name is answered empty");
    assert!(cla.endpoints.is_empty());

    let mut nack = request(ENDPOINT, &["unknown"], &eds.nonce);
    nack.error_detail = Some(Status {
        message: "bad".into(),
        ..Default::default()
    });
    c.send(nack).await;
    assert!(c.silent().await, "a NACK is not answered");
    let seen = istiod.seen();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[3].error.as_deref(), Some("bad"));
    assert_eq!(istiod.sent(ENDPOINT), ["unknown".to_string()].into());
}

#[tokio::test]
async fn delta_pushes_changes_and_removals() {
    let istiod = FakeIstiod::start(clusters(&["a", "b"])).await.unwrap();
    let mut c = delta(&istiod).await;
    c.send(DeltaDiscoveryRequest {
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await;
    assert_eq!(c.recv().await.resources.len(), 2);
    istiod.set(CLUSTER, clusters(&["a"]).remove(CLUSTER).unwrap());
    let push = c.recv().await;
    assert_eq!(push.resources.len(), 1);
    assert_eq!(push.removed_resources, ["b"]);
    istiod.stop().await;
}
