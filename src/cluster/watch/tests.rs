//! The watchers: [`apply_event`] table tests without a server, and [`run`] against a mocked API
//! server whose watch fails with `410 Gone` and which does not serve the Istio and fence CRDs.

use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tower_test::mock;

use super::*;
use crate::index::ClusterIndex;
use crate::readiness::Readiness;

const DOMAIN: &str = "cluster.local";

fn state() -> ClusterState {
    ClusterState::new(ClusterIndex::new(DOMAIN), [])
}

fn obj<K: DeserializeOwned>(v: Value) -> K {
    serde_json::from_value(v).expect("a valid test object")
}

fn service(ns: &str, name: &str) -> Service {
    obj(json!({"metadata": {"name": name, "namespace": ns},
               "spec": {"selector": {"app": name}, "clusterIP": "10.0.0.1", "ports": [{"port": 80}]}}))
}

fn namespace(name: &str) -> Namespace {
    obj(json!({"metadata": {"name": name, "labels": {"team": "a"}}}))
}

fn sidecar(name: &str, owner_kind: &str, controller: bool) -> Sidecar {
    obj(
        json!({"apiVersion": "networking.istio.io/v1beta1", "kind": "Sidecar",
               "metadata": {"name": name, "namespace": "default", "ownerReferences": [
                   {"apiVersion": "microservice.slime.io/v1alpha1", "kind": owner_kind, "name": name,
                    "uid": "u1", "controller": controller}]},
               "spec": {"egress": [{"hosts": ["*/*"]}]}}),
    )
}

fn fence(name: &str) -> ServiceFence {
    obj(
        json!({"apiVersion": "microservice.slime.io/v1alpha1", "kind": "ServiceFence",
               "metadata": {"name": name, "namespace": "default"}, "spec": {"enable": true}}),
    )
}

fn changes(rx: &mut broadcast::Receiver<Change>) -> Vec<Change> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

fn key(ns: &str, name: &str) -> ObjectKey {
    ObjectKey::new(ns, name)
}

#[test]
fn apply_and_delete_update_the_index_and_announce_the_change() {
    let s = state();
    let mut rx = s.subscribe();
    let mut r = Relist::default();
    assert!(!apply_event(
        &s,
        DOMAIN,
        Event::Apply(service("default", "reviews")),
        &mut r
    ));
    assert!(s.index().service(&key("default", "reviews")).is_some());
    apply_event(&s, DOMAIN, Event::Apply(namespace("default")), &mut r);
    assert_eq!(s.index().namespace("default").map(|n| n.labels.len()), Some(1));
    let pod: Pod = obj(
        json!({"metadata": {"name": "reviews-1", "namespace": "default", "labels": {"app": "reviews"}},
                              "status": {"podIP": "10.1.0.7"}}),
    );
    apply_event(&s, DOMAIN, Event::Apply(pod.clone()), &mut r);
    let ip = "10.1.0.7".parse().expect("an IP");
    assert_eq!(
        s.index().pods_at(ip).map(|(_, f)| f.to_vec()).collect::<Vec<_>>(),
        [vec![key("default", "reviews")]]
    );
    let vs: VirtualService = obj(json!({"metadata": {"name": "r", "namespace": "default"},
        "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "ratings"}}]}]}}));
    apply_event(&s, DOMAIN, Event::Apply(vs.clone()), &mut r);
    assert_eq!(
        s.index()
            .destinations("reviews.default.svc.cluster.local", "default"),
        BTreeSet::from(["ratings.default.svc.cluster.local".to_string()])
    );
    let se: ServiceEntry = obj(json!({"metadata": {"name": "ext", "namespace": "default"},
        "spec": {"hosts": ["api.example.com"]}}));
    apply_event(&s, DOMAIN, Event::Apply(se.clone()), &mut r);
    assert!(s.index().is_service_entry_host("api.example.com"));
    apply_event(&s, DOMAIN, Event::Apply(fence("reviews")), &mut r);
    assert!(s.fence(&key("default", "reviews")).is_some());

    apply_event(&s, DOMAIN, Event::Delete(service("default", "reviews")), &mut r);
    apply_event(&s, DOMAIN, Event::Delete(namespace("default")), &mut r);
    apply_event(&s, DOMAIN, Event::Delete(pod), &mut r);
    apply_event(&s, DOMAIN, Event::Delete(vs), &mut r);
    apply_event(&s, DOMAIN, Event::Delete(se), &mut r);
    apply_event(&s, DOMAIN, Event::Delete(fence("reviews")), &mut r);
    // Deleting what is not there announces nothing.
    apply_event(&s, DOMAIN, Event::Delete(fence("reviews")), &mut r);
    assert_eq!(s.index().counts().values().sum::<usize>(), 0);
    assert!(s.fence_keys().is_empty());

    let svc = || Change::Service(key("default", "reviews"));
    let ns = || Change::Namespace("default".into());
    let f = || Change::Fence(key("default", "reviews"));
    let each = [svc(), ns(), Change::Pods, Change::Routing, Change::Routing, f()];
    assert_eq!(changes(&mut rx), [each.clone(), each].concat());
}

#[test]
fn a_relist_removes_what_it_did_not_list_and_announces_one_resync() {
    let s = ClusterState::new(ClusterIndex::new(DOMAIN), [fence("seeded"), fence("kept")]);
    let mut r = Relist::default();
    for name in ["a", "b", "c"] {
        apply_event(&s, DOMAIN, Event::Apply(namespace(name)), &mut r);
    }
    let mut rx = s.subscribe();

    apply_event::<Namespace>(&s, DOMAIN, Event::Init, &mut r);
    apply_event(&s, DOMAIN, Event::InitApply(namespace("a")), &mut r);
    apply_event(&s, DOMAIN, Event::InitApply(namespace("d")), &mut r);
    assert!(apply_event::<Namespace>(&s, DOMAIN, Event::InitDone, &mut r));
    let mut names: Vec<String> = s.index().namespaces().map(|n| n.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["a", "d"]);

    // Fences of a snapshot (or an earlier list) the cluster no longer has go too.
    let mut rf = Relist::default();
    apply_event::<ServiceFence>(&s, DOMAIN, Event::Init, &mut rf);
    apply_event(&s, DOMAIN, Event::InitApply(fence("kept")), &mut rf);
    apply_event::<ServiceFence>(&s, DOMAIN, Event::InitDone, &mut rf);
    assert_eq!(s.fence_keys(), [key("default", "kept")]);

    assert_eq!(changes(&mut rx), [Change::Resync, Change::Resync]);
}

#[test]
fn an_unserved_kind_counts_as_empty_and_announces_only_a_removal() {
    let s = ClusterState::new(ClusterIndex::new(DOMAIN), [fence("seeded")]);
    let mut rx = s.subscribe();
    let mut r = Relist::default();
    absent::<ServiceFence>(&s, &mut r);
    assert!(s.fence_keys().is_empty());
    absent::<ServiceFence>(&s, &mut r);
    assert_eq!(changes(&mut rx), [Change::Resync]);
}

#[test]
fn sidecars_a_fence_controls_are_kept_apart_from_the_others() {
    let s = state();
    let mut rx = s.subscribe();
    let mut r = Relist::default();
    let k = key("default", "reviews");
    let mut event = |e: Event<Sidecar>| {
        apply_event(&s, DOMAIN, e, &mut r);
    };
    // Not a fence's, or a fence's but not as controller: not the controllers' (kept apart for
    // the A8 check, and announced, since one may scope the global-sidecar).
    event(Event::Apply(sidecar("reviews", "Deployment", true)));
    event(Event::Apply(sidecar("reviews", "ServiceFence", false)));
    event(Event::Delete(sidecar("reviews", "Deployment", true)));
    assert!(s.sidecar(&k).is_none());
    assert!(s.other_sidecar_keys().is_empty(), "deleted");
    assert_eq!(changes(&mut rx), vec![Change::Sidecar(k.clone()); 3]);

    event(Event::Apply(sidecar("reviews", "ServiceFence", true)));
    assert!(s.sidecar(&k).is_some());
    // Someone took the fence's ownership away: it is no longer lazyload's.
    event(Event::Apply(sidecar("reviews", "Deployment", true)));
    assert!(s.sidecar(&k).is_none());
    assert!(
        s.other_sidecar_keys() == std::slice::from_ref(&k),
        "kept apart, for the A8 check"
    );
    // And back: a fence controls it again.
    event(Event::Apply(sidecar("reviews", "ServiceFence", true)));
    assert!(s.sidecar(&k).is_some());
    assert!(!s.has_other_sidecar(&k), "moved, not copied");
    assert_eq!(changes(&mut rx), vec![Change::Sidecar(k.clone()); 3]);

    // A re-list keeps each in its place and drops what it no longer has.
    event(Event::Init);
    event(Event::InitApply(sidecar("other", "Deployment", true)));
    event(Event::InitApply(sidecar("mine", "ServiceFence", true)));
    event(Event::InitDone);
    assert_eq!(s.sidecar_keys(), [key("default", "mine")]);
    assert_eq!(s.other_sidecar_keys(), [key("default", "other")]);
}

#[test]
fn bad_objects_are_skipped_and_the_watch_goes_on() {
    let s = state();
    let mut rx = s.subscribe();
    let mut r = Relist::default();
    let no_ns: Service = obj(json!({"metadata": {"name": "x"}}));
    let no_name: Pod = obj(json!({"metadata": {"namespace": "default"}}));
    let no_ns_vs: VirtualService = obj(json!({"metadata": {"name": "x"}, "spec": {}}));
    apply_event(&s, DOMAIN, Event::Apply(no_ns), &mut r);
    apply_event(&s, DOMAIN, Event::Apply(no_name.clone()), &mut r);
    apply_event(&s, DOMAIN, Event::Delete(no_name), &mut r);
    apply_event(&s, DOMAIN, Event::Apply(no_ns_vs), &mut r);
    assert_eq!(s.index().counts().values().sum::<usize>(), 0);
    assert!(changes(&mut rx).is_empty());

    apply_event(&s, DOMAIN, Event::Apply(service("default", "ok")), &mut r);
    assert_eq!(changes(&mut rx), [Change::Service(key("default", "ok"))]);
}

type Handle = mock::Handle<Request<Body>, Response<Body>>;

fn respond(status: u16, body: Value) -> Response<Body> {
    let bytes = serde_json::to_vec(&body).expect("JSON");
    Response::builder()
        .status(status)
        .body(Body::from(bytes))
        .expect("a response")
}

fn list(kind: &str, rv: &str, items: &[&str]) -> Response<Body> {
    let items: Vec<Value> = items
        .iter()
        .map(|n| json!({"apiVersion": "v1", "kind": kind, "metadata": {"name": n, "resourceVersion": rv}}))
        .collect();
    respond(
        200,
        json!({"apiVersion": "v1", "kind": format!("{kind}List"), "metadata": {"resourceVersion": rv}, "items": items}),
    )
}

/// Namespaces: listed `a, b` at version 1; the watch from 1 fails with 410 Gone (as an API server
/// does when the version is too old); the re-list has `a, c` at version 2, its watch adds `d`,
/// and the watch from `d`'s version 3 stays open. Services and Pods: empty, watches stay open. Everything else: 404 (no CRDs).
async fn api_server(mut handle: Handle) {
    let mut open = Vec::new();
    let mut namespace_lists = 0;
    while let Some((req, send)) = handle.next_request().await {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        let watching = query.contains("watch=true");
        match (path.as_str(), watching) {
            ("/api/v1/namespaces", false) => {
                namespace_lists += 1;
                if namespace_lists == 1 {
                    send.send_response(list("Namespace", "1", &["a", "b"]));
                } else {
                    send.send_response(list("Namespace", "2", &["a", "c"]));
                }
            }
            ("/api/v1/namespaces", true) if query.contains("resourceVersion=1") => {
                let gone = json!({"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status",
                    "status": "Failure", "reason": "Expired", "message": "too old resource version", "code": 410}});
                send.send_response(respond(200, gone));
            }
            ("/api/v1/namespaces", true) if query.contains("resourceVersion=2") => {
                let added = json!({"type": "ADDED", "object": {"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": "d", "resourceVersion": "3"}}});
                send.send_response(respond(200, added));
            }
            ("/api/v1/services", false) => send.send_response(list("Service", "1", &[])),
            ("/api/v1/pods", false) => send.send_response(list("Pod", "1", &[])),
            (_, true) => open.push(send),
            (_, false) => send.send_response(respond(
                404,
                json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "NotFound",
                       "message": "the server could not find the requested resource", "code": 404}),
            )),
        }
    }
}

#[tokio::test]
async fn a_watch_that_fails_with_gone_relists_and_the_index_recovers() {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let s = ClusterState::new(ClusterIndex::new(DOMAIN), [fence("stale")]);
    let readiness = Readiness::default();
    let ready = readiness.register("cluster-index");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(api_server(handle));
    let watch = tokio::spawn(run(client, s.clone(), DOMAIN.into(), ready, shutdown.clone()));

    let recovered = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let names: BTreeSet<String> = s.index().namespaces().map(|n| n.name.clone()).collect();
            if names == BTreeSet::from(["a", "c", "d"].map(String::from)) && readiness.pending().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        recovered.is_ok(),
        "the index did not recover: {:?}",
        s.index().counts()
    );
    // The fences CRD is not served: none, and the stale one from the start is gone.
    assert!(s.fence_keys().is_empty());
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(5), watch).await;
    assert!(matches!(stopped, Ok(Ok(()))), "run did not stop on shutdown");
    server.abort();
}
