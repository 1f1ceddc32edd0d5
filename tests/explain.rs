//! `lazyload explain`: a workload's Sidecar hosts and why, from a snapshot (and a manifests
//! directory), with the config's TTL, aliases and stableHost.

mod support;

use std::path::PathBuf;
use std::process::Command;

use jiff::Timestamp;
use lazyload::explain::{ExplainArgs, Explanation, Reason, run};
use lazyload::testing;

fn fixture(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/explain")
        .join(file)
}

fn args(workload: &str, manifests: Option<PathBuf>) -> ExplainArgs {
    ExplainArgs {
        workload: workload.to_string(),
        config: Some(fixture("config.yaml")),
        cluster_snapshot: fixture("cluster.yaml"),
        manifests_dir: manifests,
        json: false,
    }
}

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn reasons<'a>(e: &'a Explanation, host: &str) -> &'a [Reason] {
    &e.hosts
        .iter()
        .find(|h| h.host == host)
        .unwrap_or_else(|| {
            panic!(
                "{host} not among {:?}",
                e.hosts.iter().map(|h| &h.host).collect::<Vec<_>>()
            )
        })
        .reasons
}

fn status(e: &Explanation, host: &str) -> Option<String> {
    e.hosts
        .iter()
        .find(|h| h.host == host)
        .and_then(|h| h.status.clone())
}

const REVIEWS: &str = "reviews.default.svc.cluster.local";

fn learned_reviews() -> Reason {
    Reason::Learned {
        host: REVIEWS.into(),
        at: Some(at("2026-06-01T11:30:00Z")),
        source: "access log of a call through the global-sidecar".into(),
    }
}

#[test]
fn every_host_says_why() {
    let e = run(&args("default/productpage", None), at("2026-06-01T12:00:00Z")).unwrap();
    assert_eq!(e.fence, "default/productpage");
    assert!(e.no_sidecar.is_none());
    assert_eq!(
        e.workload_selector
            .as_ref()
            .unwrap()
            .get("app")
            .map(String::as_str),
        Some("productpage")
    );
    let spec = |s: &str| Reason::Spec { source: s.into() };
    let details = spec(r#"spec.host["details.default.svc.cluster.local"]"#);
    let shop = spec("spec.namespaceSelector[0] (shop)");
    let backend = spec("spec.labelSelector[0] (tier=backend)");
    let cases: Vec<(&str, Vec<Reason>)> = vec![
        ("istio-system/*", vec![Reason::IstioNamespace]),
        ("mesh-operator/*", vec![Reason::LazyloadNamespace]),
        ("*/auth.example.com", vec![Reason::StableHost]),
        ("*/details.default.svc.cluster.local", vec![details.clone()]),
        (
            "*/default.details.mailsaas",
            vec![Reason::Alias {
                of: "details.default.svc.cluster.local".into(),
                because: Box::new(details),
            }],
        ),
        ("shop/*", vec![shop.clone()]),
        (
            "*/shop.catalog.mailsaas",
            vec![Reason::Alias {
                of: "catalog.shop.svc.cluster.local".into(),
                because: Box::new(shop),
            }],
        ),
        ("*/inventory.stock.svc.cluster.local", vec![backend.clone()]),
        (
            "*/stock.inventory.mailsaas",
            vec![Reason::Alias {
                of: "inventory.stock.svc.cluster.local".into(),
                because: Box::new(backend),
            }],
        ),
        ("*/reviews.default.svc.cluster.local", vec![learned_reviews()]),
        (
            "*/reviews-v2.default.svc.cluster.local",
            vec![Reason::VirtualService {
                of: REVIEWS.into(),
                because: Box::new(learned_reviews()),
            }],
        ),
        (
            "*/default.reviews.mailsaas",
            vec![Reason::Alias {
                of: REVIEWS.into(),
                because: Box::new(learned_reviews()),
            }],
        ),
    ];
    testing::assert_table(
        cases
            .iter()
            .map(|(host, want)| (host, reasons(&e, host), want.as_slice())),
    );
    assert_eq!(e.hosts.len(), cases.len(), "{:#?}", e.hosts);
    assert_eq!(
        status(&e, "*/reviews.default.svc.cluster.local").as_deref(),
        Some("ACTIVE")
    );

    // ratings-old: learned 2026-05-01, TTL 1h + 10m: forgotten. The global-sidecar and the bad
    // spec entry: refused.
    let expired: Vec<&str> = e.expired.iter().map(|h| h.host.as_str()).collect();
    assert_eq!(expired, ["ratings-old.default.svc.cluster.local"]);
    assert!(
        e.expired[0].why.contains("last seen 2026-05-01T00:00:00Z"),
        "{}",
        e.expired[0].why
    );
    let refused: Vec<&str> = e.refused.iter().map(|h| h.host.as_str()).collect();
    assert_eq!(
        refused,
        [
            r#"spec.host["Bad_Host!"]"#,
            "global-sidecar.mesh-operator.svc.cluster.local"
        ]
    );
    assert!(e.refused[0].why.starts_with("invalid: "), "{}", e.refused[0].why);

    // The last calls through the global-sidecar: the learned last-seen times, newest first.
    let calls: Vec<(&str, String)> = e
        .fallback_calls
        .iter()
        .map(|c| (c.host.as_str(), c.at.to_string()))
        .collect();
    assert_eq!(
        calls,
        [
            (REVIEWS, "2026-06-01T11:30:00Z".to_string()),
            (
                "ratings-old.default.svc.cluster.local",
                "2026-05-01T00:00:00Z".to_string()
            )
        ]
    );

    // The text names the same.
    let text = lazyload::explain::text(&e);
    assert!(text.contains("last calls through the global-sidecar:\n  2026-06-01T11:30:00Z reviews.default.svc.cluster.local\n"), "{text}");
    assert!(text.contains("  */reviews-v2.default.svc.cluster.local [ACTIVE]\n    - VirtualService expansion of reviews.default.svc.cluster.local (learned: reviews.default.svc.cluster.local, last seen 2026-06-01T11:30:00Z, from the access log of a call through the global-sidecar)\n"), "{text}");
}

#[test]
fn a_dependency_past_its_ttl_waits_then_goes() {
    // 12:35: TTL (1h from 11:30) over, expiry wait (10m) not: still in, EXPIREWAIT.
    let e = run(&args("default/productpage", None), at("2026-06-01T12:35:00Z")).unwrap();
    assert_eq!(
        status(&e, "*/reviews.default.svc.cluster.local").as_deref(),
        Some("EXPIREWAIT")
    );
    // 12:45: gone from the Sidecar, listed as expired.
    let e = run(&args("default/productpage", None), at("2026-06-01T12:45:00Z")).unwrap();
    assert!(
        !e.hosts.iter().any(|h| h.host.contains("reviews")),
        "{:?}",
        e.hosts
    );
    assert!(e.expired.iter().any(|h| h.host == REVIEWS));
}

#[test]
fn what_serve_learned_since_is_read_from_the_manifests_dir() {
    let dir = support::TempDir::new("explain-manifests");
    // The fence as `serve --manifests-dir` wrote it after learning details-v2 at 11:50.
    let text = std::fs::read_to_string(fixture("cluster.yaml")).unwrap();
    let snapshot = lazyload::index::snapshot::Snapshot::parse(&text, "cluster.local").unwrap();
    let mut fence = snapshot.fences[0].clone();
    let status = fence.status.as_mut().unwrap();
    let host = "details-v2.default.svc.cluster.local";
    status
        .metric_status
        .insert(lazyload::vocab::fence::metric_key(host), "1".into());
    status.last_seen.insert(
        host.into(),
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at("2026-06-01T11:50:00Z")),
    );
    let key = lazyload::vocab::ObjectKey::new("default", "productpage");
    lazyload::manifests::write(&dir.0, &key, "servicefence", &fence).unwrap();

    let e = run(
        &args("default/productpage", Some(dir.0.clone())),
        at("2026-06-01T12:00:00Z"),
    )
    .unwrap();
    assert_eq!(
        reasons(&e, "*/details-v2.default.svc.cluster.local"),
        [Reason::Learned {
            host: host.into(),
            at: Some(at("2026-06-01T11:50:00Z")),
            source: "access log of a call through the global-sidecar".into(),
        }]
    );
}

#[test]
fn the_command_prints_json_and_says_what_is_wrong() {
    let run = |a: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_lazyload"))
            .arg("explain")
            .args(a)
            .args(["--cluster-snapshot", fixture("cluster.yaml").to_str().unwrap()])
            .args(["-c", fixture("config.yaml").to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = run(&["default/productpage", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["fence"], "default/productpage");
    let hosts = v["hosts"].as_array().unwrap();
    let stable = hosts.iter().find(|h| h["host"] == "*/auth.example.com").unwrap();
    assert_eq!(stable["reasons"], serde_json::json!([{"kind": "stable_host"}]));

    let out = run(&["default/ratings"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no ServiceFence default/ratings in the snapshot"));
    let out = run(&["productpage"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected <namespace>/<name>"));
}
