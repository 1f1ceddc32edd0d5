//! The fence writers against a mocked API server (kube-rs + tower-test): the exact requests,
//! no write when nothing changed, 409 retried.

use std::time::Duration;

use http::{Request, Response};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock;

use kube::Client;

use super::*;
use crate::config::Config;
use crate::index::ClusterIndex;
use crate::model::evaluate;
use crate::testing::{json_body, json_response};
use crate::vocab::fence::{ServiceFence, ServiceFenceSpec, ServiceFenceStatus};
use crate::vocab::istio::IstioVersion;

type Handle = mock::Handle<Request<Body>, Response<Body>>;

fn writer() -> (FenceWriter, Handle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (
        FenceWriter::new(Client::new(service, "default"), IstioVersion::V1beta1),
        handle,
    )
}

fn fence() -> ServiceFence {
    let mut f = ServiceFence::new(
        "productpage",
        ServiceFenceSpec {
            enable: true,
            ..Default::default()
        },
    );
    f.metadata = ObjectMeta {
        name: Some("productpage".into()),
        namespace: Some("default".into()),
        uid: Some("f21e7d2b".into()),
        ..Default::default()
    };
    f.status = Some(ServiceFenceStatus {
        metric_status: [(
            "{destination_service=\"details.default.svc.cluster.local\"}".to_string(),
            "1".to_string(),
        )]
        .into(),
        ..Default::default()
    });
    f
}

fn desired(f: &ServiceFence) -> crate::model::Evaluation {
    let now: Timestamp = "2026-06-01T00:00:00Z".parse().unwrap();
    evaluate(
        f,
        &ClusterIndex::new("cluster.local"),
        &Config::default(),
        now,
        IstioVersion::V1beta1,
    )
}

/// A writer, its API server's handle, the fence and what the model wants written for it.
fn writer_for_fence() -> (FenceWriter, Handle, ServiceFence, crate::model::Evaluation) {
    let (w, handle) = writer();
    let f = fence();
    let eval = desired(&f);
    (w, handle, f, eval)
}

/// Applies the Sidecar of `f` (none live), checks it was written, and waits for the scripted
/// `server` to have seen every request it expected.
async fn assert_sidecar_written(
    w: &FenceWriter,
    f: &ServiceFence,
    eval: &crate::model::Evaluation,
    server: tokio::task::JoinHandle<()>,
) {
    assert_eq!(
        w.sync_sidecar(f, &eval.sidecar, None).await.unwrap(),
        Write::Written
    );
    server.await.unwrap();
}

fn ok(json: Value) -> Response<Body> {
    json_response(200, &json)
}

fn conflict() -> Response<Body> {
    json_response(
        409,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict",
                "message": "the object has been modified", "code": 409}),
    )
}

#[tokio::test]
async fn applies_the_sidecar_with_field_manager_and_owner() {
    let (w, mut handle, f, eval) = writer_for_fence();
    let server = tokio::spawn(async move {
        let (req, send) = handle.next_request().await.expect("a request");
        assert_eq!(req.method(), http::Method::PATCH);
        let uri = req.uri().to_string();
        assert!(
            uri.starts_with("/apis/networking.istio.io/v1beta1/namespaces/default/sidecars/productpage?"),
            "{uri}"
        );
        assert!(
            uri.contains("fieldManager=lazyload") && uri.contains("force=true"),
            "{uri}"
        );
        assert_eq!(req.headers()["content-type"], "application/apply-patch+yaml");
        let got = json_body(req).await;
        let want = json!({
            "apiVersion": "networking.istio.io/v1beta1",
            "kind": "Sidecar",
            "metadata": {
                "name": "productpage",
                "namespace": "default",
                "ownerReferences": [{"apiVersion": "microservice.slime.io/v1alpha1", "kind": "ServiceFence",
                    "name": "productpage", "uid": "f21e7d2b", "controller": true, "blockOwnerDeletion": true}]
            },
            "spec": {
                "workloadSelector": {"labels": {"app": "productpage"}},
                "egress": [{"hosts": ["*/details.default.svc.cluster.local", "istio-system/*", "mesh-operator/*"]}]
            }
        });
        assert_eq!(got, want);
        send.send_response(ok(got));
    });
    assert_sidecar_written(&w, &f, &eval, server).await;
}

#[tokio::test(start_paused = true)]
async fn no_write_when_the_live_sidecar_is_right() {
    let (w, mut handle, f, eval) = writer_for_fence();
    let mut live = eval.sidecar.clone().unwrap();
    // Fields lazyload does not own, set by someone else, do not count.
    live.spec
        .extra
        .insert("outboundTrafficPolicy".into(), json!({"mode": "REGISTRY_ONLY"}));
    live.metadata.resource_version = Some("42".into());
    assert_eq!(
        w.sync_sidecar(&f, &eval.sidecar, Some(&live)).await.unwrap(),
        Write::Unchanged
    );
    let mut f2 = f.clone();
    f2.status = Some(eval.status.clone());
    assert_eq!(
        w.status().sync_status(&f2, &eval.status).await.unwrap(),
        Write::Unchanged
    );
    let none = tokio::time::timeout(Duration::from_millis(100), handle.next_request()).await;
    assert!(none.is_err(), "no request was made");
}

#[tokio::test]
async fn conflict_is_retried_until_it_succeeds() {
    let (w, mut handle, f, eval) = writer_for_fence();
    let server = tokio::spawn(async move {
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(conflict());
        let (req, send) = handle.next_request().await.unwrap();
        let got = json_body(req).await;
        send.send_response(ok(got));
    });
    assert_sidecar_written(&w, &f, &eval, server).await;
}

#[tokio::test]
async fn disabled_fence_deletes_only_its_own_sidecar() {
    let (w, mut handle) = writer();
    let mut f = fence();
    f.spec.enable = false;
    let eval = desired(&f);
    assert!(eval.sidecar.is_err());
    let mut owned = desired(&fence()).sidecar.unwrap();
    let foreign = {
        let mut s = owned.clone();
        s.metadata.owner_references = None;
        s
    };
    assert_eq!(
        w.sync_sidecar(&f, &eval.sidecar, Some(&foreign)).await.unwrap(),
        Write::Unchanged
    );
    owned.metadata.name = Some("productpage".into());
    let server = tokio::spawn(async move {
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.method(), http::Method::DELETE);
        assert_eq!(
            req.uri().path(),
            "/apis/networking.istio.io/v1beta1/namespaces/default/sidecars/productpage"
        );
        send.send_response(ok(
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        ));
    });
    assert_eq!(
        w.sync_sidecar(&f, &eval.sidecar, Some(&owned)).await.unwrap(),
        Write::Deleted
    );
    server.await.unwrap();
}

#[tokio::test]
async fn status_is_a_merge_patch_that_keeps_keys_added_elsewhere() {
    let (w, mut handle) = writer();
    let mut f = fence();
    f.status
        .as_mut()
        .unwrap()
        .metric_status
        .insert("{destination_service=\"gone\"}".into(), "1".into());
    let eval = desired(&f);
    let server = tokio::spawn(async move {
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.method(), http::Method::PATCH);
        assert_eq!(
            req.uri().path(),
            "/apis/microservice.slime.io/v1alpha1/namespaces/default/servicefences/productpage/status"
        );
        assert_eq!(req.headers()["content-type"], "application/merge-patch+json");
        let got = json_body(req).await;
        let status = &got["status"];
        assert_eq!(
            status["domains"]["details.default.svc.cluster.local"]["status"],
            "ACTIVE"
        );
        // Only what changed: the existing learned key is not resent.
        assert!(
            status["metricStatus"]
                .get("{destination_service=\"details.default.svc.cluster.local\"}")
                .is_none()
        );
        send.send_response(ok(
            json!({"apiVersion": "microservice.slime.io/v1alpha1", "kind": "ServiceFence",
            "metadata": {"name": "productpage", "namespace": "default"}, "spec": {}}),
        ));
    });
    assert_eq!(
        w.status().sync_status(&f, &eval.status).await.unwrap(),
        Write::Written
    );
    server.await.unwrap();
}

#[test]
fn status_patch_nulls_removed_keys() {
    let mut old = ServiceFenceStatus::default();
    old.metric_status.insert("a".into(), "1".into());
    old.metric_status.insert("b".into(), "1".into());
    let mut new = old.clone();
    new.metric_status.remove("a");
    new.metric_status.insert("c".into(), "2".into());
    let patch = status_patch(&old, &new).unwrap().unwrap();
    assert_eq!(patch, json!({"status": {"metricStatus": {"a": null, "c": "2"}}}));
    assert_eq!(status_patch(&new, &new).unwrap(), None);
}
