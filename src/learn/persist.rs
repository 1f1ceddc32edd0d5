//! Persisting learned dependencies in `ServiceFence.status`, so nothing learned is lost on a
//! restart: each batch is grouped by fence, merged into the fence's current status
//! ([`apply_edges`]) and written as a merge patch of what changed (new `metricStatus` keys and
//! `lastSeen` times; keys other writers added are untouched). Edges of callers without a fence
//! are not written. A fence whose write fails keeps its edges for the next batch. Prometheus
//! results ([`apply_metrics`]) go the same way.

use std::collections::BTreeMap;

use jiff::Timestamp;
use kube::Client;

use super::Edge;
use super::prometheus::apply_metrics;
use super::status::apply_edges;
use crate::cluster::writer::{FenceStatusWriter, Write};
use crate::vocab::ObjectKey;
use crate::vocab::fence::ServiceFenceStatus;

/// Writes learned edges and Prometheus results into fence statuses.
pub struct StatusWriter {
    writer: FenceStatusWriter,
    retry: BTreeMap<ObjectKey, Vec<Edge>>,
}

/// What one batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Fences whose status was patched.
    pub patched: usize,
    /// Fences whose status already held everything.
    pub unchanged: usize,
    /// Callers without a fence (their edges are not written).
    pub unfenced: usize,
    /// Fences kept for a retry after an error.
    pub failed: usize,
}

impl StatusWriter {
    /// A writer using `client`.
    pub fn new(client: Client) -> Self {
        Self {
            writer: FenceStatusWriter::new(client),
            retry: BTreeMap::new(),
        }
    }

    /// Writes a batch (and whatever earlier batches could not write).
    pub async fn write(&mut self, batch: Vec<Edge>, now: Timestamp) -> Written {
        let mut all = std::mem::take(&mut self.retry);
        for edge in batch {
            all.entry(edge.fence.clone()).or_default().push(edge);
        }
        let mut done = Written::default();
        for (key, edges) in all {
            let outcome = self
                .patch(&key, |status| apply_edges(status, edges.iter(), now))
                .await;
            if done.count(&key, outcome) {
                self.retry.insert(key, edges);
            }
        }
        done
    }

    /// Writes one fence's Prometheus results (`metricStatus` entries). Not kept on failure: the
    /// next poll brings them again.
    pub async fn write_metrics(
        &mut self,
        key: &ObjectKey,
        metrics: &BTreeMap<String, String>,
        now: Timestamp,
    ) -> Written {
        let outcome = self
            .patch(key, |status| apply_metrics(status, metrics, now))
            .await;
        let mut done = Written::default();
        done.count(key, outcome);
        done
    }

    /// Merges `update` into the live fence's status and patches what changed.
    async fn patch(
        &self,
        key: &ObjectKey,
        update: impl FnOnce(&mut ServiceFenceStatus) -> bool,
    ) -> Result<Patched, String> {
        let read = match self.writer.read(key).await {
            Ok(Some(read)) => read,
            Ok(None) => return Ok(Patched::NoFence),
            Err(e) => return Err(format!("reading the fence failed: {e}")),
        };
        let fence = match read {
            Ok(fence) => fence,
            // A fence lazyload cannot read is skipped (the watcher reports it on the fence):
            // retrying would fail the same way every batch.
            Err(rejection) => {
                tracing::debug!(fence = %key, "edges not written: {rejection}");
                return Ok(Patched::NoFence);
            }
        };
        let mut status = fence.status.clone().unwrap_or_default();
        if !update(&mut status) {
            return Ok(Patched::Unchanged);
        }
        match self.writer.sync_status(&fence, &status).await {
            Ok(Write::Unchanged) => Ok(Patched::Unchanged),
            Ok(_) => Ok(Patched::Yes),
            Err(e) => Err(format!("writing the status failed: {e}")),
        }
    }
}

/// What [`StatusWriter::patch`] did to one fence.
enum Patched {
    Yes,
    Unchanged,
    NoFence,
}

impl Written {
    /// Counts one fence's outcome; true when it failed (and should be retried).
    fn count(&mut self, key: &ObjectKey, outcome: Result<Patched, String>) -> bool {
        match outcome {
            Ok(Patched::Yes) => self.patched += 1,
            Ok(Patched::Unchanged) => self.unchanged += 1,
            Ok(Patched::NoFence) => self.unfenced += 1,
            Err(e) => {
                tracing::warn!(fence = %key, "{e}; retrying later");
                self.failed += 1;
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock;

    use super::*;
    use crate::cluster::writer::list_fences;
    use crate::testing::json_response;

    fn edge(ns: &str, name: &str, host: &str) -> Edge {
        Edge {
            fence: ObjectKey::new(ns, name),
            host: host.into(),
            seen: "2026-06-01T00:00:00Z".parse().unwrap(),
        }
    }

    fn fence_json() -> Value {
        json!({"apiVersion": "microservice.slime.io/v1alpha1", "kind": "ServiceFence",
               "metadata": {"name": "productpage", "namespace": "default", "uid": "u1"},
               "spec": {"enable": true},
               "status": {"metricStatus": {"{destination_service=\"details.default.svc.cluster.local\"}": "1"}}})
    }

    /// Issue 11: one fence lazyload cannot read made the start-up list fail, so serve exited.
    #[tokio::test]
    async fn an_unreadable_fence_is_skipped_by_the_list_and_by_the_writer() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let bad = json!({"apiVersion": "microservice.slime.io/v1alpha1", "kind": "ServiceFence",
                         "metadata": {"name": "bad", "namespace": "default"}, "spec": {"enable": {"yes": 1}}});
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(
                req.uri().path(),
                "/apis/microservice.slime.io/v1alpha1/servicefences"
            );
            send.send_response(json_response(
                200,
                &json!({"apiVersion": "microservice.slime.io/v1alpha1", "kind": "ServiceFenceList",
                       "metadata": {"resourceVersion": "1"}, "items": [bad.clone(), fence_json()]}),
            ));
            // The writer reads the bad fence and writes nothing.
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.method(), http::Method::GET);
            send.send_response(json_response(200, &bad));
        });
        let fences = list_fences(client.clone()).await.unwrap();
        assert_eq!(fences.len(), 1);
        assert_eq!(fences[0].metadata.name.as_deref(), Some("productpage"));
        let mut w = StatusWriter::new(client);
        let done = w
            .write(
                vec![edge("default", "bad", "reviews.default.svc.cluster.local")],
                Timestamp::now(),
            )
            .await;
        assert_eq!((done.unfenced, done.failed), (1, 0));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn edges_become_status_patches_of_existing_fences_only() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let mut w = StatusWriter::new(Client::new(service, "default"));
        let server = tokio::spawn(async move {
            // `ghost` has no fence: read, not written.
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(
                req.uri().path(),
                "/apis/microservice.slime.io/v1alpha1/namespaces/default/servicefences/ghost"
            );
            send.send_response(json_response(
                404,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": "not found"}),
            ));
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.method(), http::Method::GET);
            send.send_response(json_response(200, &fence_json()));
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.method(), http::Method::PATCH);
            assert!(req.uri().path().ends_with("/servicefences/productpage/status"));
            let body: Value =
                serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
            let status = &body["status"];
            assert_eq!(
                status["metricStatus"],
                json!({"{destination_service=\"reviews.default.svc.cluster.local\"}": "1"})
            );
            assert_eq!(
                status["lastSeen"]["reviews.default.svc.cluster.local"],
                "2026-06-01T00:00:00Z"
            );
            send.send_response(json_response(200, &fence_json()));
        });
        let batch = vec![
            edge("default", "productpage", "reviews.default.svc.cluster.local"),
            edge("default", "ghost", "reviews.default.svc.cluster.local"),
        ];
        let now = "2026-06-01T00:00:05Z".parse().unwrap();
        let done = w.write(batch, now).await;
        assert_eq!(
            done,
            Written {
                patched: 1,
                unchanged: 0,
                unfenced: 1,
                failed: 0
            }
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_write_is_kept_for_the_next_batch() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let mut w = StatusWriter::new(Client::new(service, "default"));
        let server = tokio::spawn(async move {
            let (_, send) = handle.next_request().await.unwrap();
            send.send_response(json_response(
                403,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "Forbidden", "code": 403, "message": "forbidden"}),
            ));
            // Next batch (empty): the kept edge is written now.
            let (_, send) = handle.next_request().await.unwrap();
            send.send_response(json_response(200, &fence_json()));
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.method(), http::Method::PATCH);
            send.send_response(json_response(200, &fence_json()));
        });
        let now = "2026-06-01T00:00:05Z".parse().unwrap();
        let first = w
            .write(
                vec![edge(
                    "default",
                    "productpage",
                    "ratings.default.svc.cluster.local",
                )],
                now,
            )
            .await;
        assert_eq!(first.failed, 1);
        let second = w.write(vec![], now).await;
        assert_eq!(second.patched, 1);
        server.await.unwrap();
    }
}
