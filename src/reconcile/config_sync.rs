//! Replicas with different configurations: only the leader writes, so only the leader's
//! configuration is applied; every replica says so when its configuration differs.
//!
//! Each replica publishes a digest of its effective configuration in an annotation of the
//! leader Lease (`config.lazyload.io/<identity digest>: <config digest> <identity> <unix time>`),
//! and the leader also writes its own under `lazyload.io/leader-config`. A follower compares the
//! leader's digest with its own (it will not apply its configuration while it follows; if it takes
//! over, it applies its own and says that it differs from the previous leader's); the leader
//! compares every live replica's entry with its own. Entries not refreshed for
//! [`STALE_AFTER_SECONDS`] belong to replicas that are gone and are ignored. The annotations are
//! written with a JSON merge patch of `metadata.annotations`, which never touches the fields the
//! lease manager writes (`spec`).

use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hasher;
use std::time::Duration;

use kube::Client;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster::writer::LeaseAnnotations;
use crate::config::Config;
use crate::hash::FxHasher;

/// Annotation holding the leader's configuration digest.
pub const LEADER_CONFIG: &str = "lazyload.io/leader-config";
/// Prefix of the per-replica annotations.
pub const REPLICA_CONFIG_PREFIX: &str = "config.lazyload.io/";
/// How often a replica refreshes its entry and compares.
const PERIOD: Duration = Duration::from_secs(30);
/// A replica entry older than this is ignored (its replica stopped without removing it).
pub const STALE_AFTER_SECONDS: i64 = 3 * PERIOD.as_secs() as i64;

/// A digest of the effective configuration (what `check-config` prints), equal on every replica
/// loaded with the same settings however they were written.
pub fn config_digest(config: &Config) -> String {
    let text = serde_json::to_vec(config).unwrap_or_default();
    digest(&text)
}

fn digest(bytes: &[u8]) -> String {
    let mut h = FxHasher::default();
    h.write(bytes);
    format!("{:016x}", h.finish())
}

/// The annotation key of one replica (identities may be longer than an annotation name allows).
fn replica_key(identity: &str) -> String {
    format!("{REPLICA_CONFIG_PREFIX}{}", digest(identity.as_bytes()))
}

/// A configuration that differs from this replica's.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mismatch {
    /// Seen by a follower: the leader's configuration (applied) differs from this one (not
    /// applied while following).
    Leader {
        /// The leader's digest.
        digest: String,
    },
    /// Seen by a replica that just took over: the leader it replaces ran another configuration
    /// (its digest is still on the Lease until this replica publishes its own).
    Previous {
        /// The previous leader's digest.
        digest: String,
    },
    /// Seen by the leader: a follower runs with another configuration.
    Follower {
        /// The follower's identity.
        identity: String,
        /// Its digest.
        digest: String,
    },
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Leader { digest } => write!(
                f,
                "this replica's configuration differs from the leader's ({digest}): the leader's is \
                 applied, this one only if this replica takes over"
            ),
            Self::Previous { digest } => write!(
                f,
                "this replica took over with a configuration that differs from the previous leader's \
                 ({digest}): this one applies now"
            ),
            Self::Follower { identity, digest } => write!(
                f,
                "replica {identity} runs with another configuration ({digest}); this leader's is the \
                 one applied"
            ),
        }
    }
}

/// The mismatches this replica sees in the Lease's annotations at `now` (unix seconds).
pub fn mismatches(
    identity: &str,
    own: &str,
    leading: bool,
    annotations: &BTreeMap<String, String>,
    now: i64,
) -> BTreeSet<Mismatch> {
    let mut out = BTreeSet::new();
    if let Some(leader) = annotations.get(LEADER_CONFIG)
        && leader != own
    {
        let digest = leader.clone();
        out.insert(if leading {
            Mismatch::Previous { digest }
        } else {
            Mismatch::Leader { digest }
        });
    }
    if !leading {
        return out;
    }
    for (key, value) in annotations {
        if !key.starts_with(REPLICA_CONFIG_PREFIX) {
            continue;
        }
        let mut parts = value.split(' ');
        let (Some(digest), Some(other), Some(at)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let fresh = at.parse::<i64>().is_ok_and(|at| now - at <= STALE_AFTER_SECONDS);
        if other != identity && fresh && digest != own {
            out.insert(Mismatch::Follower {
                identity: other.to_string(),
                digest: digest.to_string(),
            });
        }
    }
    out
}

/// The merge patch that publishes this replica's digest (and, when leading, the leader's).
pub fn publish_patch(identity: &str, own: &str, leading: bool, now: i64) -> Value {
    let mut annotations = serde_json::Map::new();
    annotations.insert(replica_key(identity), json!(format!("{own} {identity} {now}")));
    if leading {
        annotations.insert(LEADER_CONFIG.to_string(), json!(own));
    }
    json!({"metadata": {"annotations": annotations}})
}

/// Publishes and compares configurations through the Lease `name` in `namespace`.
pub struct ConfigSync {
    lease: LeaseAnnotations,
    identity: String,
    digest: String,
    mismatched: Gauge,
}

impl ConfigSync {
    /// Registers the checker's gauge (`config_mismatches`) in `registry`.
    pub fn register_metrics(registry: &mut Registry) -> Gauge {
        let gauge = Gauge::default();
        registry.register(
            "config_mismatches",
            "Replicas (seen by the leader) or leaders (seen by a follower) whose configuration differs",
            gauge.clone(),
        );
        gauge
    }

    /// A checker for this replica; its gauge (`config_mismatches`) is registered in `registry`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        config: &Config,
        registry: &mut Registry,
    ) -> Self {
        let mismatched = Self::register_metrics(registry);
        Self {
            lease: LeaseAnnotations::new(client, namespace, name),
            identity: identity.to_string(),
            digest: config_digest(config),
            mismatched,
        }
    }

    /// Every [`PERIOD`] and on every change of leadership: compares, logs each new mismatch once,
    /// and publishes. The Lease is read before this replica publishes, so a new leader reports the
    /// configuration it replaces.
    pub async fn run(self, mut leader: watch::Receiver<bool>, shutdown: CancellationToken) {
        let mut logged = BTreeSet::new();
        loop {
            let leading = *leader.borrow();
            self.step(leading, &mut logged).await;
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = leader.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(PERIOD) => {}
            }
        }
    }

    /// One comparison, then one publication.
    pub async fn step(&self, leading: bool, logged: &mut BTreeSet<Mismatch>) {
        let now = jiff::Timestamp::now().as_second();
        match self.lease.get().await {
            Ok(Some(annotations)) => {
                let found = mismatches(&self.identity, &self.digest, leading, &annotations, now);
                self.mismatched.set(found.len() as i64);
                for m in found.difference(logged) {
                    tracing::warn!("{m}");
                }
                *logged = found;
            }
            Ok(None) => {}
            Err(e) => tracing::debug!("reading the lease for configuration digests: {e}"),
        }
        let patch = publish_patch(&self.identity, &self.digest, leading, now);
        if let Err(e) = self.lease.merge(&patch).await {
            tracing::debug!("publishing the configuration digest on the lease: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_digest_is_of_the_effective_configuration() {
        let a = Config::parse("general:\n  autoFence: true\n").unwrap().config;
        let b = Config::parse("general: {autoFence: true, defaultFence: false}\n")
            .unwrap()
            .config;
        let c = Config::parse("general:\n  autoFence: false\n").unwrap().config;
        assert_eq!(config_digest(&a), config_digest(&b));
        assert_ne!(config_digest(&a), config_digest(&c));
    }

    #[test]
    fn who_sees_what() {
        let now = 1_000;
        let ours = "aaaa";
        let follower_b = publish_patch("b", "bbbb", false, now - 10)["metadata"]["annotations"].clone();
        let follower_b: BTreeMap<String, String> = serde_json::from_value(follower_b).unwrap();
        let stale_c =
            publish_patch("c", "cccc", false, now - STALE_AFTER_SECONDS - 1)["metadata"]["annotations"]
                .clone();
        let stale_c: BTreeMap<String, String> = serde_json::from_value(stale_c).unwrap();
        let same_d = publish_patch("d", ours, false, now)["metadata"]["annotations"].clone();
        let same_d: BTreeMap<String, String> = serde_json::from_value(same_d).unwrap();
        let mut all = annotations(&[(LEADER_CONFIG, "llll"), ("unrelated", "x")]);
        all.extend(follower_b);
        all.extend(stale_c);
        all.extend(same_d);
        let none = BTreeMap::new();
        let cases = [
            // A follower compares with the leader only.
            (
                "a",
                false,
                &all,
                vec![Mismatch::Leader {
                    digest: "llll".into(),
                }],
            ),
            // A new leader sees the leader it replaces, and the live follower that differs (not
            // the stale one, nor the one with the same configuration).
            (
                "a",
                true,
                &all,
                vec![
                    Mismatch::Previous {
                        digest: "llll".into(),
                    },
                    Mismatch::Follower {
                        identity: "b".into(),
                        digest: "bbbb".into(),
                    },
                ],
            ),
            // Its own entry is never a mismatch.
            ("b", true, &annotations(&[(LEADER_CONFIG, "bbbb")]), vec![]),
            ("a", false, &none, vec![]),
        ];
        for (identity, leading, seen, want) in cases {
            let own = if identity == "b" { "bbbb" } else { ours };
            let got: Vec<Mismatch> = mismatches(identity, own, leading, seen, now)
                .into_iter()
                .collect();
            assert_eq!(got, want, "{identity} leading={leading}");
        }
    }

    #[tokio::test]
    async fn a_follower_reads_the_lease_then_publishes_its_digest() {
        use http::{Method, Request, Response};
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let mut registry = Registry::default();
        let config = Config::default();
        let sync = ConfigSync::new(
            Client::new(service, "default"),
            "mesh-operator",
            "lazyload",
            "pod-2",
            &config,
            &mut registry,
        );
        let server = tokio::spawn(async move {
            let path = "/apis/coordination.k8s.io/v1/namespaces/mesh-operator/leases/lazyload";
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!((req.method(), req.uri().path()), (&Method::GET, path));
            let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "lazyload", "namespace": "mesh-operator",
                             "annotations": {LEADER_CONFIG: "0123456789abcdef"}},
                "spec": {"holderIdentity": "pod-1"}});
            send.send_response(Response::new(Body::from(serde_json::to_vec(&lease).unwrap())));
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!((req.method(), req.uri().path()), (&Method::PATCH, path));
            assert_eq!(req.headers()["content-type"], "application/merge-patch+json");
            let body: Value =
                serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
            send.send_response(Response::new(Body::from(serde_json::to_vec(&lease).unwrap())));
            body
        });
        let mut logged = BTreeSet::new();
        sync.step(false, &mut logged).await;
        let body = server.await.unwrap();
        let published = body["metadata"]["annotations"][&replica_key("pod-2")]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            published.starts_with(&format!("{} pod-2 ", config_digest(&config))),
            "{published}"
        );
        assert!(body["metadata"]["annotations"].get(LEADER_CONFIG).is_none());
        assert_eq!(
            logged.into_iter().collect::<Vec<_>>(),
            [Mismatch::Leader {
                digest: "0123456789abcdef".into()
            }]
        );
        assert_eq!(sync.mismatched.get(), 1);
    }

    #[test]
    fn only_the_leader_publishes_the_leader_digest() {
        let p = publish_patch("pod-1", "abcd", true, 5);
        assert_eq!(p["metadata"]["annotations"][LEADER_CONFIG], "abcd");
        let key = replica_key("pod-1");
        assert!(key.len() - REPLICA_CONFIG_PREFIX.len() <= 63);
        assert_eq!(p["metadata"]["annotations"][&key], "abcd pod-1 5");
        assert!(
            publish_patch("pod-1", "abcd", false, 5)["metadata"]["annotations"]
                .get(LEADER_CONFIG)
                .is_none()
        );
    }
}
