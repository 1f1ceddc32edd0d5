//! The watchers: [`apply_event`] table tests without a server, [`run`] against a mocked API
//! server whose watch fails with `410 Gone` and which does not serve the Istio and fence CRDs,
//! and [`run`] against a faithful mock API server ([`MockApi`]) that has the CRDs.

use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tower_test::mock;

use super::*;
use crate::index::ClusterIndex;
use crate::index::convert::Reason;
use crate::readiness::Readiness;
use crate::testing::{MockApi, eventually_sync, eventually_true};
use crate::vocab::fence::ServiceFence;

const DOMAIN: &str = "cluster.local";

fn state() -> ClusterState {
    ClusterState::new(ClusterIndex::new(DOMAIN), [])
}

/// A raw object, as a watch delivers it.
fn obj(v: Value) -> DynamicObject {
    serde_json::from_value(v).expect("a valid test object")
}

/// Applies one event of `kind`.
fn event(s: &ClusterState, kind: Kind, e: Event<DynamicObject>, r: &mut Relist) -> bool {
    apply_event(s, DOMAIN, kind, e, r)
}

fn service(ns: &str, name: &str) -> DynamicObject {
    obj(json!({"metadata": {"name": name, "namespace": ns},
               "spec": {"selector": {"app": name}, "clusterIP": "10.0.0.1", "ports": [{"port": 80}]}}))
}

fn namespace(name: &str) -> DynamicObject {
    obj(json!({"metadata": {"name": name, "labels": {"team": "a"}}}))
}

fn sidecar(name: &str, owner_kind: &str, controller: bool) -> DynamicObject {
    obj(
        json!({"apiVersion": "networking.istio.io/v1beta1", "kind": "Sidecar",
               "metadata": {"name": name, "namespace": "default", "ownerReferences": [
                   {"apiVersion": "microservice.slime.io/v1alpha1", "kind": owner_kind, "name": name,
                    "uid": "u1", "controller": controller}]},
               "spec": {"egress": [{"hosts": ["*/*"]}]}}),
    )
}

fn fence(name: &str) -> DynamicObject {
    obj(
        json!({"apiVersion": "microservice.slime.io/v1alpha1", "kind": "ServiceFence",
               "metadata": {"name": name, "namespace": "default"}, "spec": {"enable": true}}),
    )
}

fn typed_fence(name: &str) -> ServiceFence {
    serde_json::from_value(serde_json::to_value(fence(name)).expect("JSON")).expect("a fence")
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
    assert!(!event(
        &s,
        Kind::Service,
        Event::Apply(service("default", "reviews")),
        &mut r
    ));
    assert!(s.index().service(&key("default", "reviews")).is_some());
    event(&s, Kind::Namespace, Event::Apply(namespace("default")), &mut r);
    assert_eq!(s.index().namespace("default").map(|n| n.labels.len()), Some(1));
    let pod = obj(
        json!({"metadata": {"name": "reviews-1", "namespace": "default", "labels": {"app": "reviews"}},
                              "status": {"podIP": "10.1.0.7"}}),
    );
    event(&s, Kind::Pod, Event::Apply(pod.clone()), &mut r);
    let ip = "10.1.0.7".parse().expect("an IP");
    assert_eq!(
        s.index().pods_at(ip).map(|(_, f)| f.to_vec()).collect::<Vec<_>>(),
        [vec![key("default", "reviews")]]
    );
    let vs = obj(json!({"metadata": {"name": "r", "namespace": "default"},
        "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "ratings"}}]}]}}));
    event(&s, Kind::VirtualService, Event::Apply(vs.clone()), &mut r);
    assert_eq!(
        s.index()
            .destinations("reviews.default.svc.cluster.local", "default"),
        BTreeSet::from(["ratings.default.svc.cluster.local".to_string()])
    );
    let se = obj(json!({"metadata": {"name": "ext", "namespace": "default"},
        "spec": {"hosts": ["api.example.com"]}}));
    event(&s, Kind::ServiceEntry, Event::Apply(se.clone()), &mut r);
    assert!(s.index().is_service_entry_host("api.example.com"));
    event(&s, Kind::ServiceFence, Event::Apply(fence("reviews")), &mut r);
    assert!(s.fence(&key("default", "reviews")).is_some());

    event(
        &s,
        Kind::Service,
        Event::Delete(service("default", "reviews")),
        &mut r,
    );
    event(&s, Kind::Namespace, Event::Delete(namespace("default")), &mut r);
    event(&s, Kind::Pod, Event::Delete(pod), &mut r);
    event(&s, Kind::VirtualService, Event::Delete(vs), &mut r);
    event(&s, Kind::ServiceEntry, Event::Delete(se), &mut r);
    event(&s, Kind::ServiceFence, Event::Delete(fence("reviews")), &mut r);
    // Deleting what is not there announces nothing.
    event(&s, Kind::ServiceFence, Event::Delete(fence("reviews")), &mut r);
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
    let s = ClusterState::new(
        ClusterIndex::new(DOMAIN),
        [typed_fence("seeded"), typed_fence("kept")],
    );
    let mut r = Relist::default();
    for name in ["a", "b", "c"] {
        event(&s, Kind::Namespace, Event::Apply(namespace(name)), &mut r);
    }
    let mut rx = s.subscribe();

    event(&s, Kind::Namespace, Event::Init, &mut r);
    event(&s, Kind::Namespace, Event::InitApply(namespace("a")), &mut r);
    event(&s, Kind::Namespace, Event::InitApply(namespace("d")), &mut r);
    assert!(event(&s, Kind::Namespace, Event::InitDone, &mut r));
    let mut names: Vec<String> = s.index().namespaces().map(|n| n.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["a", "d"]);

    // Fences of a snapshot (or an earlier list) the cluster no longer has go too.
    let mut rf = Relist::default();
    event(&s, Kind::ServiceFence, Event::Init, &mut rf);
    event(&s, Kind::ServiceFence, Event::InitApply(fence("kept")), &mut rf);
    event(&s, Kind::ServiceFence, Event::InitDone, &mut rf);
    assert_eq!(s.fence_keys(), [key("default", "kept")]);

    assert_eq!(changes(&mut rx), [Change::Resync, Change::Resync]);
}

#[test]
fn an_unserved_kind_counts_as_empty_and_announces_only_a_removal() {
    let s = ClusterState::new(ClusterIndex::new(DOMAIN), [typed_fence("seeded")]);
    let mut rx = s.subscribe();
    let mut r = Relist::default();
    absent(&s, Kind::ServiceFence, &mut r);
    assert!(s.fence_keys().is_empty());
    absent(&s, Kind::ServiceFence, &mut r);
    assert_eq!(changes(&mut rx), [Change::Resync]);
}

#[test]
fn sidecars_a_fence_controls_are_kept_apart_from_the_others() {
    let s = state();
    let mut rx = s.subscribe();
    let mut r = Relist::default();
    let k = key("default", "reviews");
    let mut event = |e: Event<DynamicObject>| {
        event(&s, Kind::Sidecar, e, &mut r);
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
fn bad_objects_are_skipped_counted_once_and_the_watch_goes_on() {
    let s = state();
    let mut rx = s.subscribe();
    let mut r = Relist::default();
    let no_ns = obj(json!({"metadata": {"name": "x"}}));
    let no_name = obj(json!({"metadata": {"namespace": "default"}}));
    let no_ns_vs = obj(json!({"metadata": {"name": "x"}, "spec": {}}));
    event(&s, Kind::Service, Event::Apply(no_ns), &mut r);
    event(&s, Kind::Pod, Event::Apply(no_name.clone()), &mut r);
    event(&s, Kind::Pod, Event::Delete(no_name), &mut r);
    event(&s, Kind::VirtualService, Event::Apply(no_ns_vs), &mut r);
    assert_eq!(s.index().counts().values().sum::<usize>(), 0);
    assert!(changes(&mut rx).is_empty());
    assert_eq!(s.rejections().count(Kind::Pod, Reason::MissingName), 1);

    // A good version, then one that does not fit (valid for Istio: a delegate without a name):
    // the old version goes, the new one is rejected, once, however often it comes again.
    let k = key("default", "r");
    let vs = |http: Value| {
        obj(json!({"metadata": {"name": "r", "namespace": "default"},
        "spec": {"hosts": ["reviews"], "http": [http]}}))
    };
    event(
        &s,
        Kind::VirtualService,
        Event::Apply(vs(json!({"route": [{"destination": {"host": "a"}}]}))),
        &mut r,
    );
    assert_eq!(s.index().virtual_services().count(), 1);
    for _ in 0..3 {
        event(
            &s,
            Kind::VirtualService,
            Event::Apply(vs(json!({"delegate": {"namespace": "x"}}))),
            &mut r,
        );
    }
    assert_eq!(s.index().virtual_services().count(), 0);
    assert_eq!(s.rejections().count(Kind::VirtualService, Reason::Invalid), 1);
    assert!(s.rejections().get(Kind::VirtualService, &k).is_some());
    // A re-list without it forgets it.
    event(&s, Kind::VirtualService, Event::Init, &mut r);
    event(&s, Kind::VirtualService, Event::InitDone, &mut r);
    assert!(s.rejections().keys(Kind::VirtualService).is_empty());

    // A fence that cannot be read is kept aside, raw, for the fence controller to report.
    let bad_fence = obj(
        json!({"apiVersion": "microservice.slime.io/v1alpha1", "kind": "ServiceFence",
        "metadata": {"name": "f", "namespace": "default"}, "spec": {"host": "not a map"}}),
    );
    event(&s, Kind::ServiceFence, Event::Apply(bad_fence.clone()), &mut r);
    let f = key("default", "f");
    assert!(s.fence(&f).is_none());
    assert_eq!(
        s.rejected_fence(&f)
            .and_then(|v| v.pointer("/spec/host").cloned()),
        Some(json!("not a map"))
    );
    event(&s, Kind::ServiceFence, Event::Apply(fence("f")), &mut r);
    assert!(s.fence(&f).is_some() && s.rejected_fence(&f).is_none(), "fixed");
    event(&s, Kind::ServiceFence, Event::Apply(bad_fence.clone()), &mut r);
    event(&s, Kind::ServiceFence, Event::Delete(bad_fence), &mut r);
    assert!(s.rejected_fence(&f).is_none() && s.rejections().keys(Kind::ServiceFence).is_empty());

    changes(&mut rx);
    event(&s, Kind::Service, Event::Apply(service("default", "ok")), &mut r);
    assert_eq!(changes(&mut rx), [Change::Service(key("default", "ok"))]);
}

#[test]
fn the_backoff_doubles_to_a_minute_and_resets() {
    let mut b = Backoff::default();
    let delays: Vec<u64> = (0..9).map(|_| b.next_delay().as_secs()).collect();
    assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    b.reset();
    assert_eq!(b.next_delay(), Duration::from_secs(1));
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

#[tokio::test(start_paused = true)]
async fn a_watch_that_fails_with_gone_relists_and_the_index_recovers() {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let s = ClusterState::new(ClusterIndex::new(DOMAIN), [typed_fence("stale")]);
    let readiness = Readiness::default();
    let ready = readiness.register("cluster-index");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(api_server(handle));
    let watch = tokio::spawn(run(client, s.clone(), DOMAIN.into(), ready, shutdown.clone()));

    eventually_sync(
        "the index recovered (its counts seen)",
        Duration::from_secs(20),
        || {
            let names: BTreeSet<String> = s.index().namespaces().map(|n| n.name.clone()).collect();
            let recovered =
                names == BTreeSet::from(["a", "c", "d"].map(String::from)) && readiness.pending().is_empty();
            recovered.then_some(()).ok_or_else(|| s.index().counts())
        },
    )
    .await;
    // The fences CRD is not served: none, and the stale one from the start is gone.
    assert!(s.fence_keys().is_empty());
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(5), watch).await;
    assert!(matches!(stopped, Ok(Ok(()))), "run did not stop on shutdown");
    server.abort();
}

/// Waits until `readiness` has nothing pending (failing with the kinds still unsynced).
async fn until_ready(readiness: &Readiness, s: &ClusterState) {
    eventually_sync("ready (unsynced kinds seen)", Duration::from_secs(10), || {
        readiness
            .pending()
            .is_empty()
            .then_some(())
            .ok_or_else(|| s.unsynced())
    })
    .await;
}

/// The watchers of `client` into a fresh state; readiness, the state, and the shutdown.
fn watching(client: Client) -> (Readiness, ClusterState, CancellationToken) {
    let s = state();
    let readiness = Readiness::default();
    let ready = readiness.register("cluster-index");
    let shutdown = CancellationToken::new();
    tokio::spawn(run(client, s.clone(), DOMAIN.into(), ready, shutdown.clone()));
    (readiness, s, shutdown)
}

/// The status `/readyz` of lazyload's admin endpoint answers with `readiness`.
async fn readyz(readiness: &Readiness) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let registry = std::sync::Arc::new(prometheus_client::registry::Registry::default());
    let app = crate::admin::router(registry, readiness.clone(), axum::Router::new());
    let listener = crate::admin::bind("127.0.0.1:0".parse().expect("an address"))
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("bound");
    let stop = CancellationToken::new();
    let server = tokio::spawn(crate::admin::serve(listener, app, stop.clone()));
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connected");
    conn.write_all(b"GET /readyz HTTP/1.1\r\nHost: lazyload\r\nConnection: close\r\n\r\n")
        .await
        .expect("sent");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.expect("an answer");
    stop.cancel();
    let _ = server.await;
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_default()
}

/// A small mesh: namespace `default`, Services `productpage` and `details`, a productpage pod,
/// a fence for productpage, and a ServiceEntry for `api.example.com`.
fn mesh() -> MockApi {
    MockApi::default()
        .with("Namespace", json!({"metadata": {"name": "default"}}))
        .with("Service", json!({"metadata": {"name": "productpage", "namespace": "default"},
            "spec": {"selector": {"app": "productpage"}, "clusterIP": "10.0.0.9", "ports": [{"name": "http", "port": 9080}]}}))
        .with("Service", json!({"metadata": {"name": "details", "namespace": "default"},
            "spec": {"selector": {"app": "details"}, "clusterIP": "10.0.0.7", "ports": [{"name": "http", "port": 9080}]}}))
        .with("Pod", json!({"metadata": {"name": "productpage-1", "namespace": "default", "labels": {"app": "productpage"}},
            "spec": {"containers": [{"name": "app"}]}, "status": {"podIP": "10.1.0.5"}}))
        .with("ServiceEntry", json!({"apiVersion": "networking.istio.io/v1beta1", "kind": "ServiceEntry",
            "metadata": {"name": "ext", "namespace": "default"},
            "spec": {"hosts": ["api.example.com"], "ports": [{"number": 80, "protocol": "HTTP", "name": "http"}]}}))
        .with("ServiceFence", json!({"apiVersion": "microservice.slime.io/v1alpha1", "kind": "ServiceFence",
            "metadata": {"name": "productpage", "namespace": "default", "uid": "u-pp"},
            "spec": {"enable": true, "workloadSelector": {"fromService": true}}}))
}

/// What the collector makes of a call from the productpage pod to `authority` through the
/// global-sidecar's passthrough.
fn attribute(s: &ClusterState, authority: &str) -> Result<Vec<String>, &'static str> {
    use crate::als::attribute::{Attributor, Hosts};
    use crate::als::entry::{Entry, Kind as EntryKind};
    let entry = Entry {
        kind: EntryKind::Http,
        source: "10.1.0.5".parse().ok(),
        peer_identity: None,
        upstream_cluster: "PassthroughCluster",
        authority,
        orig_dest: None,
        source_ns: None,
        user_agent: "",
        path: "/",
    };
    let mut hosts = Hosts::default();
    let attributor = Attributor::new(&crate::config::Config::default());
    match attributor.attribute(&s.index(), &entry, &mut hosts) {
        Ok(_) => Ok(hosts.iter().map(String::from).collect()),
        Err(why) => Err(why.as_str()),
    }
}

/// Issue 15: ServiceEntries were listed at `serviceentrys`; a real API server answers 404, so
/// the kind never synced and its hosts were never indexed.
#[tokio::test(start_paused = true)]
async fn ready_against_the_real_paths_and_a_service_entry_host_is_learned() {
    let (readiness, s, shutdown) = watching(mesh().client());
    until_ready(&readiness, &s).await;
    assert!(s.index().is_service_entry_host("api.example.com"));
    assert_eq!(
        attribute(&s, "api.example.com"),
        Ok(vec!["api.example.com".to_string()])
    );
    assert_eq!(attribute(&s, "unknown.example.net"), Err("external_not_allowed"));
    shutdown.cancel();
}

/// A 404 for a kind discovery says is served (here: its CRD declares another plural than the
/// one lazyload lists at) is a fault, never "not installed, so synced and empty". On paused
/// time: while `/readyz` is asked over a real socket the clock may jump, which only runs more
/// retries of a kind that never syncs.
#[tokio::test(start_paused = true)]
async fn a_kind_served_at_another_path_never_counts_as_synced() {
    let (readiness, s, shutdown) = watching(mesh().plural("ServiceEntry", "serviceentriez").client());
    eventually_sync("only ServiceEntry unsynced", Duration::from_secs(10), || {
        let unsynced = s.unsynced();
        (unsynced == [Kind::ServiceEntry]).then_some(()).ok_or(unsynced)
    })
    .await;
    // Past two retries (1 s, 2 s): still not synced, still not ready.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(s.unsynced(), [Kind::ServiceEntry]);
    assert_eq!(readiness.pending(), ["cluster-index"]);
    assert_eq!(readyz(&readiness).await, 503);
    shutdown.cancel();
}

/// The writes the mock API server received at paths starting with `path`.
fn written_at(
    writes: &std::sync::Mutex<Vec<crate::testing::Write>>,
    path: &str,
) -> Vec<crate::testing::Write> {
    let writes = writes.lock().unwrap_or_else(|e| e.into_inner());
    writes
        .iter()
        .filter(|(_, p, _)| p.starts_with(path))
        .cloned()
        .collect()
}

/// A leading fence controller over `client` and `s`, with Events.
fn controller(client: Client, s: &ClusterState, shutdown: &CancellationToken) {
    use crate::cluster::writer::FenceWriter;
    use crate::reconcile::fences::{FenceController, Metrics};
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: "lazyload".into(),
            instance: None,
        },
    );
    let ctl = FenceController::new(
        s.clone(),
        std::sync::Arc::new(crate::config::Config::default()),
        FenceWriter::new(client, crate::vocab::istio::IstioVersion::default()),
        Some(recorder),
        Metrics::register(&mut prometheus_client::registry::Registry::default()),
    );
    let (lead, leader) = tokio::sync::watch::channel(true);
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        ctl.run(leader, shutdown).await;
        drop(lead);
    });
}

/// Issue 11/15: one object of each kind that does not fit lazyload's types. Every kind syncs,
/// the good objects are used, each bad one is counted, and the bad fence says why on itself.
#[tokio::test(start_paused = true)]
async fn one_malformed_object_of_each_kind_is_skipped_and_every_kind_syncs() {
    let meta = |name: &str| json!({"name": name, "namespace": "default"});
    let api = mesh()
        // Metadata is always well-formed (the API server validates it); the rest need not be.
        .with(
            "Namespace",
            json!({"metadata": {"name": "bad"}, "spec": {"finalizers": "not a list"}}),
        )
        .with("Service", json!({"metadata": meta("bad"), "spec": {"ports": 7}}))
        .with(
            "Pod",
            json!({"metadata": meta("bad"), "spec": {"containers": "not a list"}}),
        )
        .with(
            "VirtualService",
            json!({"metadata": meta("good"),
            "spec": {"hosts": ["productpage"], "http": [{"route": [{"destination": {"host": "details"}}]}]}}),
        )
        // Valid for Istio: a delegate names its VirtualService, lazyload's type insists.
        .with(
            "VirtualService",
            json!({"metadata": meta("bad"),
            "spec": {"hosts": ["x"], "http": [{"delegate": {"namespace": "default"}}]}}),
        )
        .with(
            "ServiceEntry",
            json!({"metadata": meta("bad"), "spec": {"ports": [{"number": "eighty"}]}}),
        )
        .with(
            "ServiceFence",
            json!({"apiVersion": "microservice.slime.io/v1alpha1", "kind": "ServiceFence",
            "metadata": {"name": "bad", "namespace": "default", "uid": "u-bad", "generation": 3},
            "spec": {"enable": {"yes": 1}}, "status": {"conditions": [{"type": "Other", "status": "True"}]}}),
        )
        .with(
            "Sidecar",
            json!({"metadata": meta("good"), "spec": {"egress": [{"hosts": ["*/*"]}]}}),
        )
        .with(
            "Sidecar",
            json!({"metadata": meta("bad"), "spec": {"egress": [{"hosts": "*/*"}]}}),
        );
    let writes = api.writes();
    let client = api.client();
    let (readiness, s, shutdown) = watching(client.clone());
    controller(client, &s, &shutdown);
    until_ready(&readiness, &s).await;
    let index = s.index().counts();
    assert!(s.index().namespace("default").is_some());
    assert!(s.index().service(&key("default", "details")).is_some());
    assert_eq!(s.index().pods().count(), 1);
    assert_eq!(s.index().virtual_services().count(), 1, "{index:?}");
    assert!(s.index().is_service_entry_host("api.example.com"));
    assert!(s.fence(&key("default", "productpage")).is_some());
    assert_eq!(s.other_sidecar_keys(), [key("default", "good")]);
    for kind in Kind::ALL {
        assert_eq!(s.rejections().count(kind, Reason::Invalid), 1, "{kind:?}");
    }

    let bad_status = "/apis/microservice.slime.io/v1alpha1/namespaces/default/servicefences/bad/status";
    let written = |path: &str| written_at(&writes, path);
    eventually_true("a condition on the bad fence", Duration::from_secs(10), || {
        !written(bad_status).is_empty()
    })
    .await;
    let (method, path, body) = written(bad_status).remove(0);
    assert_eq!(method, "PATCH");
    assert!(path.contains("fieldManager=lazyload"), "{path}");
    let conditions = &body["status"]["conditions"];
    assert_eq!(
        conditions[0],
        json!({"type": "Other", "status": "True"}),
        "kept: {body}"
    );
    assert_eq!(
        (
            &conditions[1]["type"],
            &conditions[1]["status"],
            &conditions[1]["reason"],
            &conditions[1]["observedGeneration"]
        ),
        (
            &json!("Accepted"),
            &json!("False"),
            &json!("Unreadable"),
            &json!(3)
        )
    );
    assert!(
        conditions[1]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("spec.enable")),
        "{body}"
    );
    let events = "/apis/events.k8s.io/v1/namespaces/default/events";
    eventually_true("an Unreadable event", Duration::from_secs(5), || {
        written(events)
            .iter()
            .any(|(_, _, e)| e["reason"] == "Unreadable")
    })
    .await;
    // The good fence got its Sidecar.
    let sidecar = "/apis/networking.istio.io/v1beta1/namespaces/default/sidecars/productpage";
    eventually_true("the good fence's Sidecar", Duration::from_secs(5), || {
        !written(sidecar).is_empty()
    })
    .await;
    shutdown.cancel();
}

/// Issue 15: a kind that never syncs (here RBAC refuses VirtualServices) must not let the leader
/// write Sidecars computed without it (it would drop every host VirtualServices expand to).
#[tokio::test(start_paused = true)]
async fn while_a_kind_has_not_synced_no_sidecar_is_written() {
    let api = mesh()
        .with(
            "Sidecar",
            json!({"metadata": {"name": "productpage", "namespace": "default", "ownerReferences": [
            {"apiVersion": "microservice.slime.io/v1alpha1", "kind": "ServiceFence", "name": "productpage",
             "uid": "u-pp", "controller": true}]},
            "spec": {"egress": [{"hosts": ["*/reviews.default.svc.cluster.local", "istio-system/*"]}]}}),
        )
        .failing("VirtualService", 403);
    let writes = api.writes();
    let client = api.client();
    let (readiness, s, shutdown) = watching(client.clone());
    controller(client, &s, &shutdown);
    eventually_sync("only VirtualService unsynced", Duration::from_secs(10), || {
        let unsynced = s.unsynced();
        (unsynced == [Kind::VirtualService]).then_some(()).ok_or(unsynced)
    })
    .await;
    assert!(s.sidecar(&key("default", "productpage")).is_some());
    // Past the debounce windows and two retries of the list.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(readiness.pending(), ["cluster-index"]);
    let writes = writes.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        writes.is_empty(),
        "wrote while VirtualServices were unknown: {writes:?}"
    );
    shutdown.cancel();
}

/// A failing list's error can carry the whole list body: the warning keeps one short line.
#[test]
fn errors_are_logged_in_one_short_line() {
    let body = format!("{{\"items\": [{}]}}\n", "{\"metadata\": {}},".repeat(1000));
    let line = short(&body);
    assert_eq!(line.chars().count(), 301);
    assert!(line.ends_with('…') && !line.contains('\n'));
    assert_eq!(short(&"403 Forbidden"), "403 Forbidden");
}

/// Log output of the current thread (the tests' runtime runs every task on it).
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Issue 15: a list with one object lazyload's types do not fit failed whole, retried every
/// second, and kube's client logged the whole list body at every failure. Now the object is
/// logged once (namespace/name and the field), and no list body is ever logged.
#[tokio::test(start_paused = true)]
async fn an_unreadable_object_is_logged_once_and_no_list_body_ever() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    let _log = tracing::subscriber::set_default(subscriber);
    let api = mesh().with(
        "VirtualService",
        json!({"metadata": {"name": "delegating", "namespace": "default"},
               "spec": {"hosts": ["x"], "http": [{"delegate": {"namespace": "default"}}]}}),
    );
    let (readiness, s, shutdown) = watching(api.client());
    until_ready(&readiness, &s).await;
    // Time for retries, had there been any.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    shutdown.cancel();
    let log = String::from_utf8_lossy(&captured.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let skipped: Vec<&str> = log.lines().filter(|l| l.contains("object skipped")).collect();
    assert_eq!(skipped.len(), 1, "{log}");
    assert!(
        skipped[0].contains("default/delegating") && skipped[0].contains("spec.http[0].delegate"),
        "{log}"
    );
    assert!(!log.contains("\"items\""), "a list body was logged: {log}");
    assert!(log.lines().all(|l| l.len() < 600), "{log}");
}

/// `serve`'s controllers as it starts them ([`crate::reconcile::controllers`]): this replica
/// takes the Lease, the fence controller writes the fence's Sidecar once every kind synced, and
/// on shutdown every task ends cleanly and the Lease is released.
#[tokio::test(start_paused = true)]
async fn the_controllers_take_the_lease_write_and_release_it() {
    let api = mesh();
    let writes = api.writes();
    let client = api.client();
    let (_readiness, s, shutdown) = watching(client.clone());
    let config = std::sync::Arc::new(crate::config::Config::default());
    let mut registry = prometheus_client::registry::Registry::default();
    let tasks = crate::reconcile::controllers(client, &s, &config, "lazyload-0", &mut registry, &shutdown)
        .await
        .expect("the controllers start");
    let names: Vec<&str> = tasks.iter().map(|(name, _)| *name).collect();
    let running: Vec<_> = tasks
        .into_iter()
        .map(|(name, task)| tokio::spawn(async move { (name, task.await) }))
        .collect();
    let lease = "/apis/coordination.k8s.io/v1/namespaces/mesh-operator/leases/lazyload";
    let written = |path: &str| {
        written_at(&writes, path)
            .into_iter()
            .map(|(_, _, body)| body)
            .collect::<Vec<_>>()
    };
    let held = |body: &Value| body.pointer("/spec/holderIdentity") == Some(&json!("lazyload-0"));
    eventually_sync(
        "the lease taken (its writes seen)",
        Duration::from_secs(10),
        || {
            let writes = written(lease);
            writes.iter().any(held).then_some(()).ok_or(writes)
        },
    )
    .await;
    let sidecar = "/apis/networking.istio.io/v1beta1/namespaces/default/sidecars/productpage";
    eventually_true(
        &format!("a Sidecar written (tasks {names:?})"),
        Duration::from_secs(10),
        || !written(sidecar).is_empty(),
    )
    .await;
    shutdown.cancel();
    for task in running {
        let (name, outcome) = task.await.expect("the task does not panic");
        assert!(outcome.is_ok(), "{name}: {outcome:?}");
    }
    // The last write of the Lease's holder (not of the configuration digests' annotations).
    let last = written(lease)
        .into_iter()
        .rfind(|body| {
            body.pointer("/spec")
                .is_some_and(|s| s.get("holderIdentity").is_some())
        })
        .expect("holder writes");
    assert_eq!(
        last["spec"]["holderIdentity"],
        Value::Null,
        "the lease was not released: {last}"
    );
}
