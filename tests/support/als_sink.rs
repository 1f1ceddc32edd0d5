//! A minimal Access Log Service that records what Envoy sends (for the relay tests: is the
//! logger wired, does the entry carry the caller's identity).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::{
    AccessLogService, AccessLogServiceServer,
};
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use envoy_types::pb::envoy::service::accesslog::v3::{StreamAccessLogsMessage, StreamAccessLogsResponse};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

/// A running sink.
pub struct AlsSink {
    /// Its address.
    pub addr: SocketAddr,
    entries: Arc<Mutex<Vec<(String, HttpAccessLogEntry)>>>,
}

struct Service(Arc<Mutex<Vec<(String, HttpAccessLogEntry)>>>);

#[tonic::async_trait]
impl AccessLogService for Service {
    async fn stream_access_logs(
        &self,
        req: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let mut stream = req.into_inner();
        let mut log_name = String::new();
        while let Some(msg) = stream.message().await? {
            if let Some(id) = msg.identifier {
                log_name = id.log_name;
            }
            if let Some(LogEntries::HttpLogs(logs)) = msg.log_entries {
                let mut all = self.0.lock().unwrap();
                all.extend(logs.log_entry.into_iter().map(|e| (log_name.clone(), e)));
            }
        }
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}

impl AlsSink {
    /// Starts on a free loopback port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let entries = Arc::new(Mutex::new(Vec::new()));
        let svc = AccessLogServiceServer::new(Service(entries.clone()));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Self { addr, entries }
    }

    /// `(log_name, entry)` received so far.
    pub fn entries(&self) -> Vec<(String, HttpAccessLogEntry)> {
        self.entries.lock().unwrap().clone()
    }
}
