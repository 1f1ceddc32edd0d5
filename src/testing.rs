//! What the tests and benches share, in one place: builders for the objects they put in a
//! cluster (fences, Services, Pods, ServiceEntries, whole indexes), [`MockApi`] (the one mock
//! Kubernetes API server, faithful to the real paths), [`eventually`] (wait for a condition
//! without a fixed sleep) and [`assert_table`] (a table test that reports every failing case).
//!
//! Built for unit tests and, through the `testing` feature, for the integration tests and
//! benches; never part of the binary.

pub mod als;
mod mock_api;

use std::fmt::{Debug, Display};
use std::future::Future;
use std::time::Duration;

pub use self::mock_api::{MockApi, Write, json_body, json_response};
use crate::index::{ClusterIndex, PodInfo, ServiceEntryInfo, ServiceInfo};
use crate::vocab::ObjectKey;
use crate::vocab::fence::{ServiceFence, ServiceFenceSpec};
use crate::vocab::istio::ServiceEntry;

/// A raw gRPC client of a plaintext server at `addr`, ready: for sending messages of any type
/// (garbage included) or pre-encoded bytes to one of lazyload's gRPC ports.
pub async fn grpc_client(addr: std::net::SocketAddr) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("a loopback URL")
        .connect()
        .await
        .expect("the server listens");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("the connection is ready");
    grpc
}

/// A ServiceFence `ns/name` with an empty spec and no status.
pub fn fence(ns: &str, name: &str) -> ServiceFence {
    let mut f = ServiceFence::new(name, ServiceFenceSpec::default());
    f.metadata.namespace = Some(ns.into());
    f
}

/// A Service `ns/name` selecting the pods labelled `app: <app>`, with `cluster_ips` (none for a
/// headless one) and no labels or ports.
pub fn service(ns: &str, name: &str, app: &str, cluster_ips: &[&str]) -> ServiceInfo {
    ServiceInfo {
        key: ObjectKey::new(ns, name),
        labels: Default::default(),
        selector: Some([("app".to_string(), app.to_string())].into()),
        ports: vec![],
        cluster_ips: cluster_ips.iter().map(|ip| ip.to_string()).collect(),
    }
}

/// A running Pod `ns/name` (not on the host network) at `ip`, with `labels` and service
/// account `sa`.
///
/// # Panics
/// If `ip` is not an IP address (a mistake in the test itself).
pub fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ip: &str, sa: &str) -> PodInfo {
    PodInfo {
        key: ObjectKey::new(ns, name),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ips: vec![
            ip.parse()
                .unwrap_or_else(|e| panic!("pod {ns}/{name}: {ip}: {e}")),
        ],
        host_network: false,
        service_account: sa.into(),
    }
}

/// A ServiceEntry `ns/name` for `hosts`.
///
/// # Panics
/// If the hosts make no valid ServiceEntry (a mistake in the test itself).
pub fn service_entry(ns: &str, name: &str, hosts: &[&str]) -> ServiceEntryInfo {
    let object: ServiceEntry = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"hosts": hosts},
    }))
    .unwrap_or_else(|e| panic!("ServiceEntry {ns}/{name}: {e}"));
    ServiceEntryInfo::try_from(&object).unwrap_or_else(|e| panic!("ServiceEntry {ns}/{name}: {e}"))
}

/// An index (domain `cluster.local`) holding, for each `(ns, app, ip)`, a Service `ns/app`
/// selecting `app: <app>` (no cluster IP) and its one Pod `ns/<app>-1` at `ip` (service account
/// `default`).
pub fn index_of(apps: &[(&str, &str, &str)]) -> ClusterIndex {
    let mut idx = ClusterIndex::new("cluster.local");
    for &(ns, app, ip) in apps {
        idx.apply_service(service(ns, app, app, &[]));
        idx.apply_pod(pod(ns, &format!("{app}-1"), &[("app", app)], ip, "default"));
    }
    idx
}

/// Polls `probe` (every 20 ms) until it returns `Ok`, and returns that value; after `within`,
/// panics naming `what` and the probe's last `Err` (what it saw instead). Uses tokio's clock, so
/// under paused time it takes no real time.
pub async fn eventually<T, E: Debug, F: Future<Output = Result<T, E>>>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(last) if tokio::time::Instant::now() >= deadline => {
                panic!("timed out after {within:?} waiting for {what}; last seen: {last:?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// [`eventually`] for a probe that answers at once (it reads state, it does not wait).
pub async fn eventually_sync<T, E: Debug>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> Result<T, E>,
) -> T {
    eventually(what, within, || std::future::ready(probe())).await
}

/// [`eventually`] for a plain condition.
pub async fn eventually_true(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    eventually_sync(what, within, || if check() { Ok(()) } else { Err("false") }).await
}

/// Checks every case of a table test, `(name, got, want)`, and fails once listing every case
/// whose `got` is not its `want` (not only the first).
///
/// # Panics
/// If any case fails.
#[track_caller]
pub fn assert_table<N: Display, T: PartialEq + Debug>(cases: impl IntoIterator<Item = (N, T, T)>) {
    assert_all(cases.into_iter().map(|(name, got, want)| {
        let outcome = if got == want {
            Ok(())
        } else {
            Err(format!("\n     got: {got:?}\n    want: {want:?}"))
        };
        (name, outcome)
    }));
}

/// Checks every case of a table test, `(name, outcome)`, and fails once listing every case whose
/// outcome is an `Err` (what was wrong).
///
/// # Panics
/// If any case fails.
#[track_caller]
pub fn assert_all<N: Display>(cases: impl IntoIterator<Item = (N, Result<(), String>)>) {
    let mut total = 0;
    let failures: Vec<String> = cases
        .into_iter()
        .inspect(|_| total += 1)
        .filter_map(|(name, outcome)| outcome.err().map(|why| format!("{name}: {why}")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_reports_every_failing_case() {
        let failed =
            std::panic::catch_unwind(|| assert_table([("one", 1, 2), ("two", 2, 2), ("three", 3, 4)]))
                .expect_err("two cases fail");
        let message = failed.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.starts_with("2 of 3 cases failed"), "{message}");
        assert!(
            message.contains("one:") && message.contains("three:") && !message.contains("two:"),
            "{message}"
        );
        let failed = std::panic::catch_unwind(|| {
            assert_all([
                ("a", Err("x".to_string())),
                ("b", Ok(())),
                ("c", Err("y".to_string())),
            ])
        })
        .expect_err("two cases fail");
        let message = failed.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains("a: x") && message.contains("c: y"), "{message}");
        assert_table([("same", 1, 1)]);
        assert_all([("fine", Ok(()))]);
    }

    #[tokio::test(start_paused = true)]
    async fn eventually_waits_on_the_clock_and_names_what_it_saw() {
        let start = tokio::time::Instant::now();
        let mut polls = 0;
        let got = eventually("the third poll", Duration::from_secs(5), || {
            polls += 1;
            std::future::ready(if polls == 3 { Ok(polls) } else { Err(polls) })
        })
        .await;
        assert_eq!(got, 3);
        assert_eq!(start.elapsed(), Duration::from_millis(40));
        let never = tokio::spawn(eventually("never", Duration::from_secs(1), || {
            std::future::ready(Err::<(), _>("still not"))
        }));
        let message = never.await.expect_err("it times out").into_panic();
        let message = message.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            message.contains("waiting for never; last seen: \"still not\""),
            "{message}"
        );
    }

    #[test]
    fn builders_make_what_they_say() {
        let idx = index_of(&[("default", "productpage", "10.0.0.1")]);
        let pod = idx
            .pod(&ObjectKey::new("default", "productpage-1"))
            .expect("the pod");
        assert_eq!(pod.labels.get("app").map(String::as_str), Some("productpage"));
        assert!(idx.service(&ObjectKey::new("default", "productpage")).is_some());
        let f = fence("ns", "name");
        assert_eq!(
            (f.metadata.namespace.as_deref(), f.metadata.name.as_deref()),
            (Some("ns"), Some("name"))
        );
        let se = service_entry("default", "ext", &["*.example.org"]);
        assert_eq!(se.key, ObjectKey::new("default", "ext"));
    }
}
