//! A minimal SDS server standing in for pilot-agent's (the bootstrap cluster `sds-grpc`): it
//! answers `StreamSecrets` requests for the workload certificate `default` and the mesh root
//! `ROOTCA`, as pilot-agent does, and records the names asked for.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use lazyload::xds::SECRET;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use super::certs::Pem;

/// A running SDS server.
pub struct SdsServer {
    /// Its address.
    pub addr: SocketAddr,
    asked: Arc<Mutex<BTreeSet<String>>>,
}

struct Service {
    secrets: Vec<Secret>,
    asked: Arc<Mutex<BTreeSet<String>>>,
}

fn inline(pem: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(pem.as_bytes().to_vec())),
        ..Default::default()
    })
}

#[tonic::async_trait]
impl SecretDiscoveryService for Service {
    type DeltaSecretsStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn delta_secrets(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented("pilot-agent serves SotW SDS"))
    }

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let (secrets, asked) = (self.secrets.clone(), self.asked.clone());
        tokio::spawn(async move {
            let mut answered = BTreeSet::new();
            let mut nonce = 0u64;
            while let Ok(Some(r)) = inbound.message().await {
                asked.lock().unwrap().extend(r.resource_names.iter().cloned());
                // One stream per secret in Envoy; answer each name once, ACKs need nothing.
                let new: Vec<_> = secrets
                    .iter()
                    .filter(|s| r.resource_names.contains(&s.name) && answered.insert(s.name.clone()))
                    .map(lazyload::xds::adjust::pack)
                    .collect();
                if new.is_empty() {
                    continue;
                }
                nonce += 1;
                let resp = DiscoveryResponse {
                    version_info: nonce.to_string(),
                    resources: new,
                    type_url: SECRET.into(),
                    nonce: nonce.to_string(),
                    ..Default::default()
                };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_secrets(
        &self,
        _: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("pilot-agent serves streams"))
    }
}

impl SdsServer {
    /// Starts on a free loopback port serving `workload` as `default` and `root` as `ROOTCA`.
    pub async fn start(workload: &Pem, root: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let secrets = vec![
            Secret {
                name: "default".into(),
                r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: inline(&workload.cert),
                    private_key: inline(&workload.key),
                    ..Default::default()
                })),
            },
            Secret {
                name: "ROOTCA".into(),
                r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
                    trusted_ca: inline(root),
                    ..Default::default()
                })),
            },
        ];
        let asked = Arc::new(Mutex::new(BTreeSet::new()));
        let svc = SecretDiscoveryServiceServer::new(Service {
            secrets,
            asked: asked.clone(),
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Self { addr, asked }
    }

    /// Every secret name asked for so far.
    pub fn asked(&self) -> BTreeSet<String> {
        self.asked.lock().unwrap().clone()
    }
}
