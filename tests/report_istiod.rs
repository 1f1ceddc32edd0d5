//! `lazyload report --istiod`: against a stand-in istiod serving its debug endpoints and metrics
//! in the shapes istio/istio's debug.go (1.17/1.18) and monitoring.go serve them, with configs cut from the recorded dump.

mod support;

use std::process::{Command, Output};

use serde_json::Value;
use support::istiod_debug::{IstiodDebug, Proxy, Recorded};

/// istiod's push metrics as its `/metrics` writes them (counters without `_total`, histograms).
fn pilot_metrics(cds: u64, eds: u64, bytes: u64, convergence: f64, count: u64) -> String {
    format!(
        "# HELP pilot_xds_pushes Pilot build and send errors for lds, rds, cds and eds.\n\
         # TYPE pilot_xds_pushes counter\n\
         pilot_xds_pushes{{type=\"cds\"}} {cds}\n\
         pilot_xds_pushes{{type=\"eds\"}} {eds}\n\
         pilot_xds_pushes{{type=\"eds_senderr\"}} 2\n\
         # HELP pilot_xds_config_size_bytes Distribution of configuration sizes pushed to clients\n\
         # TYPE pilot_xds_config_size_bytes histogram\n\
         pilot_xds_config_size_bytes_bucket{{type=\"cds\",le=\"1\"}} 0\n\
         pilot_xds_config_size_bytes_bucket{{type=\"cds\",le=\"+Inf\"}} {cds}\n\
         pilot_xds_config_size_bytes_sum{{type=\"cds\"}} {bytes}\n\
         pilot_xds_config_size_bytes_count{{type=\"cds\"}} {cds}\n\
         # HELP pilot_proxy_convergence_time Delay in seconds between config change and a proxy receiving all required configuration.\n\
         # TYPE pilot_proxy_convergence_time histogram\n\
         pilot_proxy_convergence_time_bucket{{le=\"0.1\"}} {count}\n\
         pilot_proxy_convergence_time_sum {convergence}\n\
         pilot_proxy_convergence_time_count {count}\n"
    )
}

fn report(args: &[&str]) -> Output {
    let mut all = vec!["report"];
    all.extend_from_slice(args);
    Command::new(env!("CARGO_BIN_EXE_lazyload"))
        .args(all)
        .output()
        .unwrap()
}

fn json_of(out: &Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn row<'a>(report: &'a Value, proxy: &str) -> &'a Value {
    report["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["proxy"] == proxy)
        .unwrap_or_else(|| panic!("{proxy} not in {report}"))
}

const GEO: &str = "geo-7d9f8b6c5-x2x4q.hotel-res";
const FRONTEND: &str = "frontend-5c8b7d9f6-k8s2m.hotel-res";
const REVIEWS: &str = "reviews-v1-6f7d8c9b5-p9q8r.default";

#[tokio::test(flavor = "multi_thread")]
async fn every_connected_proxy_is_measured_with_the_mesh_totals() {
    let recorded = Recorded::load();
    let scoped = vec!["hotel-res".to_string(), "istio-system".to_string()];
    let (full_counts, scoped_counts) = (recorded.counts(None), recorded.counts(Some(&scoped)));
    let mut stale = Proxy::new(REVIEWS);
    stale.endpoints_acked = false;
    let istiod = IstiodDebug::start(
        recorded,
        vec![
            Proxy::new(GEO).fenced("geo", &["hotel-res", "istio-system"]),
            Proxy::new(FRONTEND),
            stale,
        ],
        pilot_metrics(10, 40, 123456, 1.5, 6),
    )
    .await;
    let url = format!("http://{}", istiod.addr);
    let metrics = format!("{url}/metrics");
    let out = tokio::task::spawn_blocking(move || {
        report(&["--istiod", &url, "--istiod-metrics", &metrics, "--json"])
    })
    .await
    .unwrap();
    let r = json_of(&out);

    let counts = |row: &Value| {
        let h = &row["holds"];
        let n = |k: &str| h[k].as_u64().unwrap() as usize;
        (n("clusters"), n("endpoints"), n("listeners"), n("virtual_hosts"))
    };
    let (geo, frontend, reviews) = (row(&r, GEO), row(&r, FRONTEND), row(&r, REVIEWS));
    assert_eq!(counts(frontend), full_counts);
    assert_eq!(counts(geo), scoped_counts);
    assert!(
        scoped_counts.0 < full_counts.0,
        "{scoped_counts:?} {full_counts:?}"
    );
    assert_eq!(geo["fenced"], true);
    assert_eq!(geo["sidecar"], "hotel-res/geo");
    assert_eq!(frontend["fenced"], false);
    assert_eq!(frontend["sidecar"], Value::Null);
    assert_eq!(
        (geo["sync"].as_str(), reviews["sync"].as_str()),
        (Some("SYNCED"), Some("STALE"))
    );
    let bytes = |row: &Value| row["holds"]["bytes"].as_u64().unwrap();
    assert!(
        bytes(geo) < bytes(frontend) / 2,
        "{} {}",
        bytes(geo),
        bytes(frontend)
    );
    assert_eq!(bytes(frontend), bytes(reviews));

    let total = &r["total"];
    assert_eq!(
        (total["proxies"].as_u64(), total["fenced"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(
        total["holds"]["bytes"].as_u64().unwrap(),
        bytes(geo) + bytes(frontend) + bytes(reviews)
    );
    assert_eq!(
        total["holds"]["clusters"].as_u64().unwrap() as usize,
        scoped_counts.0 + 2 * full_counts.0
    );
    let pilot = &r["pilot"];
    assert_eq!(pilot["pushes"], serde_json::json!({"cds": 10.0, "eds": 40.0}));
    assert_eq!(pilot["pushed_bytes"], 123456.0);
    assert_eq!(
        (
            pilot["convergence_seconds"].as_f64(),
            pilot["convergences"].as_f64()
        ),
        (Some(1.5), Some(6.0))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_table_and_a_proxy_gone_meanwhile() {
    let mut gone = Proxy::new(REVIEWS);
    gone.gone = true;
    let istiod = IstiodDebug::start(
        Recorded::load(),
        vec![Proxy::new(GEO).fenced("geo", &["hotel-res"]), gone],
        String::new(),
    )
    .await;
    let url = format!("http://{}", istiod.addr);
    let out = tokio::task::spawn_blocking(move || report(&["--istiod", &url]))
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("proxy") && lines[0].ends_with("bytes"),
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(GEO) && l.contains("hotel-res/geo")),
        "{table}"
    );
    // 404 from istiod: the row says why, the others are measured.
    assert!(
        lines.iter().any(|l| l.starts_with(REVIEWS)
            && l.contains("not measured")
            && l.contains("404: Proxy not connected to this Pilot instance")),
        "{table}"
    );
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("mesh: 2 proxies (1 scoped by a Sidecar) hold "),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn compare_prints_the_difference_between_two_runs() {
    let dir = support::TempDir::new("report-istiod");
    let before_path = dir.path("before.json");
    // Before: nothing fenced.
    let before = IstiodDebug::start(
        Recorded::load(),
        vec![Proxy::new(GEO), Proxy::new(FRONTEND)],
        pilot_metrics(10, 40, 100000, 1.0, 4),
    )
    .await;
    let url = format!("http://{}", before.addr);
    let out = tokio::task::spawn_blocking(move || {
        report(&[
            "--istiod",
            &url,
            "--istiod-metrics",
            &format!("{url}/metrics"),
            "--json",
        ])
    })
    .await
    .unwrap();
    std::fs::write(&before_path, &out.stdout).unwrap();
    drop(before);
    // After: geo fenced, istiod pushed more.
    let after = IstiodDebug::start(
        Recorded::load(),
        vec![
            Proxy::new(GEO).fenced("geo", &["hotel-res"]),
            Proxy::new(FRONTEND),
        ],
        pilot_metrics(15, 52, 130000, 2.5, 7),
    )
    .await;
    let url = format!("http://{}", after.addr);
    let compare = before_path.to_str().unwrap().to_string();
    let (json, table) = tokio::task::spawn_blocking(move || {
        let metrics = format!("{url}/metrics");
        let args = [
            "--istiod",
            &url,
            "--istiod-metrics",
            &metrics,
            "--compare",
            &compare,
        ];
        let table = report(&args);
        let mut with_json = args.to_vec();
        with_json.push("--json");
        (report(&with_json), table)
    })
    .await
    .unwrap();
    let c = json_of(&json);
    let change = c["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["proxy"] == GEO)
        .unwrap();
    let (b, a) = (
        change["before"]["bytes"].as_u64().unwrap(),
        change["after"]["bytes"].as_u64().unwrap(),
    );
    assert!(a < b, "{change}");
    assert_eq!(change["sidecar_before"], Value::Null);
    assert_eq!(change["sidecar_after"], "hotel-res/geo");
    assert_eq!(
        c["total_after"]["holds"]["bytes"].as_u64().unwrap() + (b - a),
        c["total_before"]["holds"]["bytes"].as_u64().unwrap()
    );
    // istiod's counters between the runs.
    assert_eq!(c["pilot"]["pushes"], serde_json::json!({"cds": 5.0, "eds": 12.0}));
    assert_eq!(c["pilot"]["pushed_bytes"], 30000.0);
    assert_eq!(
        (
            c["pilot"]["convergence_seconds"].as_f64(),
            c["pilot"]["convergences"].as_f64()
        ),
        (Some(1.5), Some(3.0))
    );

    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    let geo_line = text.lines().find(|l| l.starts_with(GEO)).unwrap();
    assert!(
        geo_line.contains(&b.to_string()) && geo_line.contains(&a.to_string()),
        "{text}"
    );
    assert!(geo_line.trim_end().ends_with("hotel-res/geo"), "{text}");
    assert!(text.contains("istiod between the runs: pushes cds=5 eds=12; 30000 bytes in 5 config pushes; mean convergence 0.500s"), "{text}");
}

#[test]
fn bad_addresses_and_a_missing_istiod_are_clear_errors() {
    let out = report(&["--istiod", "https://istiod.istio-system:15012"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected http://host[:port]"));
    let port = support::free_port();
    let out = report(&["--istiod", &format!("http://127.0.0.1:{port}")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("connecting to http://127.0.0.1:{port}/debug/syncz")),
        "{stderr}"
    );
    // --istiod with the offline flags is a usage error.
    let out = report(&["--istiod", "http://127.0.0.1:1", "--cluster-snapshot", "x.yaml"]);
    assert!(!out.status.success());
}
