//! The Prometheus source (`metricSourceType: prometheus`): per enabled fence, every interval,
//! each configured handler query is run against Prometheus' `/api/v1/query` and its result
//! becomes the fence's `metricStatus`, as Slime does.
//!
//! Placeholders: `$namespace` is the fence's namespace and `$source_app` the fence's name.
//! Slime substitutes the fence name because an auto-created fence is named after its Service and
//! Istio's `source_app` label is the workload's `app` label, which by convention equals the
//! Service name; a fence whose Service is named differently from its pods' `app` label needs a
//! query written for it.
//!
//! Results: a `Group` handler yields one entry per series, keyed by the series' label set in
//! Slime's format (`{destination_service="<fqdn>"}`; series for `unknown` destinations are
//! skipped); a `Value` handler yields one entry keyed by the handler name. Errors (unreachable
//! Prometheus, a bad query) are logged and the query runs again at the next tick; they never stop
//! lazyload.
//!
//! The client is a plain HTTP/1.1 connection per poll (hyper): one query per fence per interval
//! does not need a pool. `https` Prometheus addresses are not supported yet.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::{HandlerType, Prometheus};
use crate::vocab::ObjectKey;
use crate::vocab::fence::{ServiceFenceStatus, metric_key_host};

/// How long one query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body read.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configured address is not `http://host[:port]`.
    #[error("prometheus address {0:?}: expected http://host[:port]")]
    Address(String),
    /// Connecting failed.
    #[error("connecting to prometheus: {0}")]
    Connect(#[from] std::io::Error),
    /// HTTP failed.
    #[error("prometheus HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// Building the request failed.
    #[error("prometheus request: {0}")]
    Request(#[from] hyper::http::Error),
    /// The query took too long.
    #[error("prometheus query timed out")]
    Timeout,
    /// The response body is too large.
    #[error("prometheus response larger than {MAX_BODY} bytes")]
    TooLarge,
    /// Prometheus answered with an error.
    #[error("prometheus answered {status}: {error_type} {error}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Prometheus' `errorType`.
        error_type: String,
        /// Prometheus' `error`.
        error: String,
    },
    /// The response is not what the query API returns.
    #[error("unexpected prometheus response: {0}")]
    Response(String),
}

/// A Prometheus HTTP API client for one server.
#[derive(Clone, Debug)]
pub struct Client {
    host: String,
    port: u16,
}

impl Client {
    /// A client for `address` (`http://prometheus.istio-system:9090`).
    pub fn new(address: &str) -> Result<Self, Error> {
        let bad = || Error::Address(address.to_string());
        let rest = address.trim().strip_prefix("http://").ok_or_else(bad)?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('/') {
            return Err(bad());
        }
        let uri: hyper::http::uri::Authority = authority.parse().map_err(|_| bad())?;
        Ok(Self {
            host: uri
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: uri.port_u16().unwrap_or(80),
        })
    }

    /// Runs an instant query; the `data` of the answer.
    pub async fn query(&self, promql: &str) -> Result<QueryData, Error> {
        tokio::time::timeout(QUERY_TIMEOUT, self.query_inner(promql))
            .await
            .map_err(|_| Error::Timeout)?
    }

    async fn query_inner(&self, promql: &str) -> Result<QueryData, Error> {
        let stream = TcpStream::connect((self.host.as_str(), self.port)).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // Stopped however the query ends (timeout included), so a hung Prometheus holds no
        // connection open.
        let _conn = AbortOnDrop(tokio::spawn(conn));
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, format!("{}:{}", self.host, self.port))
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => Error::Http(*e),
                Err(_) => Error::TooLarge,
            })?
            .to_bytes();
        parse_response(status, &body)
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `data` of a successful query.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
pub enum QueryData {
    /// One sample per series.
    Vector(Vec<Sample>),
    /// One number.
    Scalar(SampleValue),
    /// Anything else (`matrix`, `string`): not usable for dependencies.
    #[serde(other)]
    Other,
}

/// One series of a vector.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Sample {
    /// Its labels.
    #[serde(default)]
    pub metric: BTreeMap<String, String>,
    /// `[time, "value"]`.
    pub value: SampleValue,
}

/// `[<unix time>, "<value>"]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct SampleValue(pub f64, pub String);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    status: String,
    data: Option<QueryData>,
    #[serde(default)]
    error_type: String,
    #[serde(default)]
    error: String,
}

/// Reads a `/api/v1/query` answer.
pub fn parse_response(status: u16, body: &[u8]) -> Result<QueryData, Error> {
    let parsed: Result<Response, _> = serde_json::from_slice(body);
    match parsed {
        Ok(r) if r.status == "success" && (200..300).contains(&status) => r
            .data
            .ok_or_else(|| Error::Response("success without data".into())),
        Ok(r) => Err(Error::Api {
            status,
            error_type: r.error_type,
            error: r.error,
        }),
        Err(e) if (200..300).contains(&status) => Err(Error::Response(e.to_string())),
        Err(_) => Err(Error::Api {
            status,
            error_type: String::new(),
            error: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        }),
    }
}

/// The query of a handler for a fence: `$namespace` and `$source_app` substituted.
pub fn render_query(template: &str, fence: &ObjectKey) -> String {
    template
        .replace("$namespace", &fence.namespace)
        .replace("$source_app", &fence.name)
}

/// Converts a handler's result into `metricStatus` entries.
pub fn to_metrics(handler: &str, kind: HandlerType, data: &QueryData) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match (kind, data) {
        (HandlerType::Group, QueryData::Vector(samples)) => {
            for s in samples {
                if s.metric.is_empty()
                    || s.metric
                        .get("destination_service")
                        .is_some_and(|d| d.is_empty() || d == "unknown")
                {
                    continue;
                }
                out.insert(label_set(&s.metric), s.value.1.clone());
            }
        }
        (HandlerType::Value, QueryData::Vector(samples)) => {
            if let Some(s) = samples.first() {
                out.insert(handler.to_string(), s.value.1.clone());
            }
        }
        (HandlerType::Value, QueryData::Scalar(v)) => {
            out.insert(handler.to_string(), v.1.clone());
        }
        _ => {}
    }
    out
}

/// `{a="x",b="y"}`: Prometheus' own rendering of a label set, sorted by name (Slime's keys).
fn label_set(labels: &BTreeMap<String, String>) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let v = v.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = write!(s, "{k}=\"{v}\"");
    }
    s.push('}');
    s
}

/// Merges a poll's entries into a fence's status: values are replaced (Prometheus' counts are
/// authoritative), and `lastSeen` of a host moves to `now` when its count is new or grew, so a
/// dependency whose calls stopped ages out like a learned one. Returns whether it changed.
pub fn apply_metrics(
    status: &mut ServiceFenceStatus,
    metrics: &BTreeMap<String, String>,
    now: Timestamp,
) -> bool {
    let mut changed = false;
    for (key, value) in metrics {
        let old = status.metric_status.insert(key.clone(), value.clone());
        if old.as_deref() == Some(value.as_str()) {
            continue;
        }
        changed = true;
        let grew = match (old.and_then(|o| o.parse::<f64>().ok()), value.parse::<f64>().ok()) {
            (_, None) => false,
            (None, Some(new)) => new > 0.0,
            (Some(old), Some(new)) => new > old,
        };
        if grew && let Some(host) = metric_key_host(key) {
            status.last_seen.insert(host.to_string(), Time(now));
        }
    }
    changed
}

/// Every `interval` until `shutdown`, polls the fences `fences` lists then (enabled ones: fences
/// created later are polled too), handing each fence's merged handler results to `sink`. Failed
/// queries are logged and retried at the next tick.
pub async fn run(
    config: Prometheus,
    fences: impl Fn() -> Vec<ObjectKey>,
    interval: Duration,
    mut sink: impl FnMut(&ObjectKey, &BTreeMap<String, String>),
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let client = Client::new(&config.address)?;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        for fence in &fences() {
            let mut metrics = BTreeMap::new();
            for (name, handler) in &config.handlers {
                let query = render_query(&handler.query, fence);
                match client.query(&query).await {
                    Ok(data) => metrics.extend(to_metrics(name, handler.kind, &data)),
                    Err(e) => {
                        tracing::warn!(%fence, handler = %name, "prometheus query failed (retried next tick): {e}")
                    }
                }
            }
            if !metrics.is_empty() {
                sink(fence, &metrics);
            }
        }
    }
}

/// Percent-encodes a query-string value (everything but RFC 3986 unreserved characters).
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GROUP: &str = r#"{"status":"success","data":{"resultType":"vector","result":[
        {"metric":{"destination_service":"details.default.svc.cluster.local"},"value":[1700000000.1,"12"]},
        {"metric":{"destination_service":"unknown"},"value":[1700000000.1,"3"]},
        {"metric":{"destination_service":"reviews.default.svc.cluster.local"},"value":[1700000000.1,"4"]}]}}"#;

    #[test]
    fn group_and_value_results() {
        let data = parse_response(200, GROUP.as_bytes()).unwrap();
        let m = to_metrics("destination", HandlerType::Group, &data);
        assert_eq!(
            m.into_iter().collect::<Vec<_>>(),
            [
                (
                    r#"{destination_service="details.default.svc.cluster.local"}"#.to_string(),
                    "12".to_string()
                ),
                (
                    r#"{destination_service="reviews.default.svc.cluster.local"}"#.to_string(),
                    "4".to_string()
                ),
            ]
        );
        let m = to_metrics("total", HandlerType::Value, &data);
        assert_eq!(m["total"], "12");
        let scalar = parse_response(
            200,
            br#"{"status":"success","data":{"resultType":"scalar","result":[1,"7"]}}"#,
        )
        .unwrap();
        assert_eq!(to_metrics("total", HandlerType::Value, &scalar)["total"], "7");
        assert!(to_metrics("g", HandlerType::Group, &scalar).is_empty());
    }

    #[test]
    fn errors_are_reported() {
        let e = parse_response(
            400,
            br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("bad_data parse error"), "{e}");
        assert!(matches!(
            parse_response(502, b"bad gateway"),
            Err(Error::Api { status: 502, .. })
        ));
        assert!(matches!(parse_response(200, b"{"), Err(Error::Response(_))));
        assert!(Client::new("https://p:9090").is_err());
        assert!(Client::new("http://prometheus.istio-system:9090/").is_ok());
    }

    #[test]
    fn queries_and_merges() {
        let fence = ObjectKey::new("default", "productpage");
        assert_eq!(
            render_query(
                r#"sum(istio_requests_total{source_app="$source_app",namespace="$namespace"})"#,
                &fence
            ),
            r#"sum(istio_requests_total{source_app="productpage",namespace="default"})"#
        );
        assert_eq!(percent_encode("a b{\"}"), "a%20b%7B%22%7D");
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let t1 = Timestamp::from_second(1_700_000_060).unwrap();
        let key = r#"{destination_service="details.default.svc.cluster.local"}"#;
        let mut st = ServiceFenceStatus::default();
        assert!(apply_metrics(
            &mut st,
            &[(key.to_string(), "3".to_string())].into(),
            t0
        ));
        assert_eq!(st.last_seen["details.default.svc.cluster.local"].0, t0);
        assert!(!apply_metrics(
            &mut st,
            &[(key.to_string(), "3".to_string())].into(),
            t1
        ));
        assert_eq!(
            st.last_seen["details.default.svc.cluster.local"].0, t0,
            "no new calls"
        );
        assert!(apply_metrics(
            &mut st,
            &[(key.to_string(), "5".to_string())].into(),
            t1
        ));
        assert_eq!(st.last_seen["details.default.svc.cluster.local"].0, t1);
    }
}
