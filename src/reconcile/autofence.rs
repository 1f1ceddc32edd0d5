//! The auto-fence controller: creates and deletes the fences auto-fencing decides
//! ([`crate::model::autofence::decide`]) when a Service, fence or Namespace changes, and for every
//! Service after a re-list or on taking over leadership. Manual fences are never touched.

use std::collections::BTreeSet;

use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::{FIELD_MANAGER, with_retries};
use crate::cluster::{Change, ClusterState};
use crate::config::Config;
use crate::index::ObjectKey;
use crate::model::autofence::{Action, decide};
use crate::model::fence::ServiceFence;

/// The auto-fence controller.
pub struct AutoFenceController {
    state: ClusterState,
    config: std::sync::Arc<Config>,
    client: Client,
}

impl AutoFenceController {
    /// A controller creating and deleting fences through `client`.
    pub fn new(state: ClusterState, config: std::sync::Arc<Config>, client: Client) -> Self {
        Self {
            state,
            config,
            client,
        }
    }

    /// Runs until `shutdown`, acting only while `leader` is true.
    pub async fn run(self, mut leader: watch::Receiver<bool>, shutdown: CancellationToken) {
        let mut changes = self.state.subscribe();
        if *leader.borrow() {
            self.all(&leader, &shutdown).await;
        }
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = leader.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if *leader.borrow() {
                        self.all(&leader, &shutdown).await;
                    }
                }
                change = changes.recv() => {
                    if !*leader.borrow() {
                        continue;
                    }
                    match change {
                        // A fence's own change too: a deleted auto fence comes back.
                        Ok(Change::Service(key) | Change::Fence(key)) => self.one(&key).await,
                        Ok(Change::Namespace(ns)) => {
                            let mut keys: BTreeSet<ObjectKey> =
                                self.state.index().services_in(&ns).map(|s| s.key.clone()).collect();
                            keys.extend(self.fences_in(&ns));
                            for key in &keys {
                                self.one(key).await;
                            }
                        }
                        Ok(Change::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => self.all(&leader, &shutdown).await,
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        }
    }

    fn fences_in(&self, namespace: &str) -> Vec<ObjectKey> {
        self.state
            .fence_keys()
            .into_iter()
            .filter(|k| k.namespace == namespace)
            .collect()
    }

    /// Every Service and every fence (a fence whose Service is gone may have to go too); stops
    /// as soon as the lease is lost or lazyload stops, so two leaders never write at once.
    async fn all(&self, leader: &watch::Receiver<bool>, shutdown: &CancellationToken) {
        let mut keys: BTreeSet<ObjectKey> = self.state.index().services().map(|s| s.key.clone()).collect();
        keys.extend(self.state.fence_keys());
        for key in keys {
            if !*leader.borrow() || shutdown.is_cancelled() {
                return;
            }
            self.one(&key).await;
        }
    }

    /// Applies the decision for one Service. Nothing is decided before every kind is listed
    /// (a Service not listed yet would look gone); the resync at the end of the sync brings
    /// every Service back here.
    pub async fn one(&self, key: &ObjectKey) {
        // A fence lazyload cannot read is still a fence: not created again, never deleted.
        if !self.state.unsynced().is_empty() || self.state.rejected_fence(key).is_some() {
            return;
        }
        let existing = self.state.fence(key);
        let action = decide(key, existing.as_ref(), &self.state.index(), &self.config);
        let api: Api<ServiceFence> = Api::namespaced(self.client.clone(), &key.namespace);
        match action {
            Action::Keep => {}
            Action::Create(fence) => {
                // Named, or the API server records the fields as managed by `unknown`.
                let pp = PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                };
                match with_retries(|| api.create(&pp, &fence)).await {
                    Ok(_) => tracing::info!(fence = %key, "auto fence created"),
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => tracing::warn!(fence = %key, "creating the auto fence failed: {e}"),
                }
            }
            Action::Delete => {
                let dp = DeleteParams::default();
                match with_retries(|| api.delete(&key.name, &dp)).await {
                    Ok(_) => tracing::info!(fence = %key, "auto fence deleted"),
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => tracing::warn!(fence = %key, "deleting the auto fence failed: {e}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock;

    use super::*;
    use crate::index::{ClusterIndex, ServiceInfo};

    #[tokio::test]
    async fn creates_for_fenced_services_and_deletes_only_its_own() {
        let cfg = Config::parse("general:\n  autoFence: true\n  defaultFence: true\n")
            .unwrap()
            .config;
        let mut index = ClusterIndex::new("cluster.local");
        index.apply_service(ServiceInfo {
            key: ObjectKey::new("default", "web"),
            labels: Default::default(),
            selector: Some([("app".to_string(), "web".to_string())].into()),
            ports: vec![],
            cluster_ips: vec![],
        });
        let ours = crate::model::autofence::new_fence(&ObjectKey::new("default", "gone"), &cfg);
        let mut manual = ours.clone();
        manual.metadata.name = Some("manual".into());
        manual.metadata.labels = None;
        let state = ClusterState::new(index, [ours, manual]);
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let ctl = AutoFenceController::new(state, std::sync::Arc::new(cfg), Client::new(service, "default"));
        let server = tokio::spawn(async move {
            let (mut seen, mut queries) = (Vec::new(), Vec::new());
            for _ in 0..2 {
                let (req, send) = handle.next_request().await.unwrap();
                let (method, path) = (req.method().clone(), req.uri().path().to_string());
                queries.push(req.uri().query().unwrap_or_default().to_string());
                let body: Value = serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap())
                    .unwrap_or(Value::Null);
                seen.push((method.clone(), path, body.clone()));
                let reply = if method == Method::POST {
                    body
                } else {
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})
                };
                send.send_response(
                    Response::builder()
                        .status(200)
                        .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                        .unwrap(),
                );
            }
            (seen, queries)
        });
        let (_lead, leader) = watch::channel(true);
        ctl.all(&leader, &CancellationToken::new()).await;
        let (seen, queries) = server.await.unwrap();
        // `gone` (ours, no Service) is deleted; `web` gets a fence; `manual` is left alone.
        assert_eq!(seen[0].0, Method::DELETE);
        assert_eq!(
            seen[0].1,
            "/apis/microservice.slime.io/v1alpha1/namespaces/default/servicefences/gone"
        );
        assert_eq!(seen[1].0, Method::POST);
        assert!(
            queries[1].split('&').any(|q| q == "fieldManager=lazyload"),
            "created with lazyload's field manager, not `unknown`: {}",
            queries[1]
        );
        assert_eq!(seen[1].2["metadata"]["name"], "web");
        assert_eq!(
            seen[1].2["metadata"]["labels"]["app.kubernetes.io/created-by"],
            "fence-controller"
        );
        assert_eq!(
            seen[1].2["spec"],
            json!({"enable": true, "workloadSelector": {"fromService": true}})
        );
    }
}
