//! The auto-fence controller: creates and deletes the fences auto-fencing decides
//! ([`crate::model::autofence::decide`]) when a Service, fence or Namespace changes, and for every
//! Service after a re-list or on taking over leadership. Manual fences are never touched; auto
//! fences no longer wanted are kept (counted in `lazyload_autofence_unmanaged_fences`, and marked
//! by the fence controller's `AutoFenceManaged` condition) unless the Service is gone and they
//! hold nothing learned, or `cleanupAutoFences` is on. A key is a Service's (or a workload
//! fence's) key, which is also its fence's; changes act at once (no debounce), as before.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::runner::{Action, Reconciler, Trigger};
use crate::cluster::writer::{AutoFenceWriter, Write};
use crate::cluster::{Change, ClusterState};
use crate::config::Config;
use crate::model::autofence::{self as decision, decide, wanted_workload_fences};
use crate::vocab::ObjectKey;

/// The auto-fence controller.
pub struct AutoFenceController {
    state: ClusterState,
    config: Arc<Config>,
    writer: AutoFenceWriter,
    /// Auto fences kept although auto-fencing no longer wants them.
    unmanaged: Mutex<BTreeSet<ObjectKey>>,
    unmanaged_gauge: Gauge,
}

impl AutoFenceController {
    /// A controller creating and deleting fences through `writer`; its gauge is registered in
    /// `registry` (`autofence_unmanaged_fences`).
    pub fn new(
        state: ClusterState,
        config: Arc<Config>,
        writer: AutoFenceWriter,
        registry: &mut Registry,
    ) -> Self {
        let unmanaged_gauge = Self::register_metrics(registry);
        Self {
            state,
            config,
            writer,
            unmanaged: Mutex::default(),
            unmanaged_gauge,
        }
    }

    /// Registers the controller's gauge (`autofence_unmanaged_fences`) in `registry`.
    pub fn register_metrics(registry: &mut Registry) -> Gauge {
        let gauge = Gauge::default();
        registry.sub_registry_with_prefix("autofence").register(
            "unmanaged_fences",
            "Fences lazyload created and keeps although auto-fencing no longer wants them",
            gauge.clone(),
        );
        gauge
    }

    /// Records whether the fence `key` is kept unmanaged; logs when that changes.
    fn track(&self, key: &ObjectKey, action: &decision::Action) {
        let Ok(mut set) = self.unmanaged.lock() else {
            return;
        };
        match action {
            decision::Action::Unmanaged(why) => {
                if set.insert(key.clone()) {
                    tracing::warn!(
                        fence = %key,
                        reason = why.reason(),
                        "auto fence no longer managed, kept with what it learned: {}",
                        why.message()
                    );
                }
            }
            _ => {
                set.remove(key);
            }
        }
        self.unmanaged_gauge.set(set.len() as i64);
    }

    /// The workload fences pods call for, and the auto fences that may be workload fences.
    fn workload_fence_keys(&self) -> BTreeSet<ObjectKey> {
        let mut keys = wanted_workload_fences(&self.state.index(), &self.config);
        keys.extend(self.state.fence_keys().into_iter().filter(|k| {
            self.state.fence(k).is_some_and(|f| {
                f.is_auto_created() && f.spec.workload_selector.as_ref().is_some_and(|w| !w.from_service)
            })
        }));
        keys
    }

    /// The Services and fences of `namespace`.
    fn keys_in(&self, namespace: &str) -> Vec<ObjectKey> {
        let mut keys: BTreeSet<ObjectKey> = self
            .state
            .index()
            .services_in(namespace)
            .map(|s| s.key.clone())
            .collect();
        keys.extend(
            self.state
                .fence_keys()
                .into_iter()
                .filter(|k| k.namespace == namespace),
        );
        keys.into_iter().collect()
    }
}

impl Reconciler for AutoFenceController {
    type Key = ObjectKey;
    const NAME: &'static str = "autofence";

    /// Every Service, every fence (a fence whose Service is gone may have to go too) and every
    /// workload fence pods call for.
    fn all_keys(&self) -> Vec<ObjectKey> {
        let mut keys: BTreeSet<ObjectKey> = self.state.index().services().map(|s| s.key.clone()).collect();
        keys.extend(self.state.fence_keys());
        keys.extend(wanted_workload_fences(&self.state.index(), &self.config));
        keys.into_iter().collect()
    }

    fn triggers(&self, change: &Change) -> Trigger<ObjectKey> {
        let now = Duration::ZERO;
        match change {
            // A fence's own change too: a deleted auto fence comes back.
            Change::Service(key) | Change::Fence(key) => Trigger::Keys(vec![key.clone()], now),
            Change::Namespace(ns) => Trigger::Keys(self.keys_in(ns), now),
            // Workload fences follow the pods' label values.
            Change::Pods if self.config.general.fence_label_key_alias.is_some() => {
                Trigger::Keys(self.workload_fence_keys().into_iter().collect(), now)
            }
            Change::Resync => Trigger::All(now),
            Change::Pods | Change::Routing | Change::Sidecar(_) => Trigger::Nothing,
        }
    }

    /// Applies the decision for one key.
    async fn reconcile(&mut self, key: &ObjectKey) -> super::Result<Action> {
        // A fence lazyload cannot read is still a fence: not created again, never deleted.
        if self.state.rejected_fence(key).is_some() {
            return Ok(Action::done());
        }
        let existing = self.state.fence(key);
        let action = decide(key, existing.as_ref(), &self.state.index(), &self.config);
        self.track(key, &action);
        match action {
            decision::Action::Keep | decision::Action::Unmanaged(_) => {}
            decision::Action::Create(fence) => {
                if self.writer.create(key, &fence).await? == Write::Written {
                    tracing::info!(fence = %key, "auto fence created");
                }
            }
            decision::Action::Delete => {
                if self.writer.delete(key).await? == Write::Deleted {
                    tracing::info!(fence = %key, "auto fence deleted");
                }
            }
        }
        Ok(Action::done())
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, Request, Response};
    use kube::Client;
    use kube::client::Body;
    use serde_json::{Value, json};

    use crate::testing::{json_body, json_response};
    use tower_test::mock;

    use super::*;
    use crate::index::{ClusterIndex, PodInfo, ServiceInfo};
    use crate::model::autofence::new_fence;
    use crate::vocab::fence::ServiceFence;

    fn service(ns: &str, name: &str) -> ServiceInfo {
        ServiceInfo {
            key: ObjectKey::new(ns, name),
            labels: Default::default(),
            selector: Some([("app".to_string(), name.to_string())].into()),
            ports: vec![],
            cluster_ips: vec![],
        }
    }

    /// An auto fence for `name` whose status holds a learned dependency.
    fn learned_fence(cfg: &Config, name: &str) -> ServiceFence {
        let mut f = new_fence(&ObjectKey::new("default", name), cfg);
        f.status = Some(crate::vocab::fence::ServiceFenceStatus {
            metric_status: [(
                crate::vocab::fence::metric_key("b.default.svc.cluster.local"),
                "1".to_string(),
            )]
            .into(),
            ..Default::default()
        });
        f
    }

    fn pod(name: &str, labels: &[(&str, &str)], ip: &str) -> PodInfo {
        crate::testing::pod("default", name, labels, ip, "default")
    }

    /// Runs the controller over every Service and fence against a mock API server that accepts
    /// everything; returns the requests (method, path, body) and the unmanaged gauge.
    async fn run_all(
        config: &str,
        services: Vec<ServiceInfo>,
        fences: Vec<ServiceFence>,
    ) -> (Vec<(Method, String, Value)>, i64) {
        run_all_with_pods(config, services, vec![], fences).await
    }

    /// [`run_all`] with pods in the index.
    async fn run_all_with_pods(
        config: &str,
        services: Vec<ServiceInfo>,
        pods: Vec<PodInfo>,
        fences: Vec<ServiceFence>,
    ) -> (Vec<(Method, String, Value)>, i64) {
        let cfg = Config::parse(config).unwrap().config;
        let mut index = ClusterIndex::new("cluster.local");
        index.set_workload_label(cfg.general.fence_label_key_alias.clone());
        for s in services {
            index.apply_service(s);
        }
        for p in pods {
            index.apply_pod(p);
        }
        let state = ClusterState::new(index, fences);
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let mut registry = Registry::default();
        let mut ctl = AutoFenceController::new(
            state,
            Arc::new(cfg),
            AutoFenceWriter::new(Client::new(service, "default")),
            &mut registry,
        );
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some((req, send)) = handle.next_request().await {
                let (method, path) = (req.method().clone(), req.uri().path().to_string());
                let query = req.uri().query().unwrap_or_default().to_string();
                // Every write carries lazyload's field manager (a real API server records
                // `unknown` otherwise).
                assert!(
                    method == Method::DELETE || query.split('&').any(|q| q == "fieldManager=lazyload"),
                    "{method} {path} without lazyload's field manager: {query}"
                );
                let body: Value = json_body(req).await;
                seen.push((method.clone(), path, body.clone()));
                let reply = if method == Method::POST {
                    body
                } else {
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})
                };
                send.send_response(json_response(200, &reply));
            }
            seen
        });
        for key in ctl.all_keys() {
            ctl.reconcile(&key).await.unwrap();
        }
        let gauge = ctl.unmanaged_gauge.get();
        drop(ctl);
        (server.await.unwrap(), gauge)
    }

    const PATH: &str = "/apis/microservice.slime.io/v1alpha1/namespaces/default/servicefences";

    #[tokio::test]
    async fn creates_for_fenced_services_and_deletes_only_its_own() {
        let on = "general:\n  autoFence: true\n  defaultFence: true\n";
        let cfg = Config::parse(on).unwrap().config;
        let ours = new_fence(&ObjectKey::new("default", "gone"), &cfg);
        let mut manual = ours.clone();
        manual.metadata.name = Some("manual".into());
        manual.metadata.labels = None;
        let (seen, unmanaged) = run_all(on, vec![service("default", "web")], vec![ours, manual]).await;
        // `gone` (ours, no Service, nothing learned) is deleted; `web` gets a fence; `manual` is
        // left alone.
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(
            (&seen[0].0, seen[0].1.as_str()),
            (&Method::DELETE, &*format!("{PATH}/gone"))
        );
        assert_eq!(seen[1].0, Method::POST);
        assert_eq!(seen[1].2["metadata"]["name"], "web");
        assert_eq!(
            seen[1].2["metadata"]["labels"]["app.kubernetes.io/created-by"],
            "fence-controller"
        );
        assert_eq!(
            seen[1].2["spec"],
            json!({"enable": true, "workloadSelector": {"fromService": true}})
        );
        assert_eq!(unmanaged, 0);
    }

    #[tokio::test]
    async fn workload_fences_follow_the_label_values_pods_carry() {
        let config = "general:\n  autoFence: true\n  fenceLabelKeyAlias: 'istio.io/wl:wl'\n";
        let cfg = Config::parse(config).unwrap().config;
        let label = cfg.general.fence_label_key_alias.clone().unwrap();
        let workload = |value: &str| {
            crate::model::autofence::new_workload_fence(
                &ObjectKey::new("default", crate::index::workload_fence_name(&label, value)),
                &label.key,
                value,
                &cfg,
            )
        };
        let pods = vec![
            pod("batch-1", &[("istio.io/wl", "batch")], "10.0.0.1"),
            pod("batch-2", &[("istio.io/wl", "batch")], "10.0.0.2"),
            // A label value that cannot make a fence name: skipped.
            pod("odd", &[("istio.io/wl", "Odd_Value")], "10.0.0.3"),
            pod("plain", &[("app", "plain")], "10.0.0.4"),
        ];
        let mut manual = workload("manual");
        manual.metadata.labels = None;
        let (seen, unmanaged) = run_all_with_pods(
            config,
            vec![],
            pods,
            // `gone`: no pod carries it any more, nothing learned; `learned`: same, but it learned.
            vec![
                workload("gone"),
                learned_fence(&cfg, "x"),
                {
                    let mut f = workload("learned");
                    f.status = learned_fence(&cfg, "x").status;
                    f
                },
                manual,
            ],
        )
        .await;
        let calls: Vec<(Method, &str)> = seen.iter().map(|(m, p, _)| (m.clone(), p.as_str())).collect();
        assert_eq!(
            calls,
            [
                (Method::POST, PATH),
                (Method::DELETE, &*format!("{PATH}/wl-gone.workload.identity")),
            ]
        );
        let created = &seen[0].2;
        assert_eq!(created["metadata"]["name"], "wl-batch.workload.identity");
        assert_eq!(
            created["metadata"]["labels"]["app.kubernetes.io/created-by"],
            "fence-controller"
        );
        assert_eq!(
            created["spec"],
            json!({"enable": true, "workloadSelector": {"fromService": false, "labels": {"istio.io/wl": "batch"}}})
        );
        // `learned` (workload) and `x` (its Service is gone) are kept.
        assert_eq!(unmanaged, 2);
    }

    #[tokio::test]
    async fn switching_auto_fencing_off_or_narrowing_it_keeps_the_fences() {
        let cfg = Config::default();
        let fences = || {
            vec![
                learned_fence(&cfg, "web"),
                new_fence(&ObjectKey::new("default", "api"), &cfg),
            ]
        };
        let services = || vec![service("default", "web"), service("default", "api")];
        for config in [
            "general:\n  autoFence: false\n",
            "general:\n  autoFence: true\n  defaultFence: false\n",
            "general:\n  autoFence: true\n  defaultFence: true\n  blackNamespaceList: default\n",
        ] {
            let (seen, unmanaged) = run_all(config, services(), fences()).await;
            assert!(seen.is_empty(), "{config}: {seen:?}");
            assert_eq!(unmanaged, 2, "{config}");
        }
    }

    #[tokio::test]
    async fn cleanup_auto_fences_removes_them_learned_or_not() {
        let cfg = Config::default();
        let (seen, unmanaged) = run_all(
            "general:\n  autoFence: false\n  cleanupAutoFences: true\n",
            vec![service("default", "web")],
            vec![learned_fence(&cfg, "web"), learned_fence(&cfg, "gone")],
        )
        .await;
        let deleted: Vec<&str> = seen
            .iter()
            .filter(|s| s.0 == Method::DELETE)
            .map(|s| s.1.as_str())
            .collect();
        assert_eq!(deleted, [format!("{PATH}/gone"), format!("{PATH}/web")]);
        assert_eq!(unmanaged, 0);
    }

    #[tokio::test]
    async fn a_deleted_service_takes_its_fence_unless_the_fence_learned_something() {
        let on = "general:\n  autoFence: true\n  defaultFence: true\n";
        let cfg = Config::parse(on).unwrap().config;
        let (seen, unmanaged) = run_all(
            on,
            vec![],
            vec![
                new_fence(&ObjectKey::new("default", "fresh"), &cfg),
                learned_fence(&cfg, "learned"),
            ],
        )
        .await;
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(
            (&seen[0].0, seen[0].1.as_str()),
            (&Method::DELETE, &*format!("{PATH}/fresh"))
        );
        assert_eq!(unmanaged, 1);
    }
}
