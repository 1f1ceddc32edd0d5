//! Where learned fences go: the one path from what a fence learned to its status, its Sidecar
//! and their output, shared by `serve`, `generate` and the demo.
//!
//! - [`Target::Api`]: a cluster. Statuses are patched through the fence status writer; the
//!   fence controller (watching them) evaluates and writes the Sidecars.
//! - [`Target::Directory`]: a manifests directory instead of a cluster (`serve --manifests-dir`,
//!   `generate`, the demo). The fence is updated in memory, evaluated, and it and its Sidecar
//!   are written as files ([`crate::manifests`]: atomic writes, read back at start).
//! - [`Target::Memory`]: no output: only the in-memory fences change (`/debug/fences` shows
//!   them), for `serve` with no cluster and no directory, and tests.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use jiff::Timestamp;

use super::Edge;
use super::persist::StatusWriter;
use crate::cluster::ClusterState;
use crate::config::Config;
use crate::index::ClusterIndex;
use crate::model::sidecar::NoSidecar;
use crate::vocab::ObjectKey;
use crate::vocab::fence::{ServiceFence, ServiceFenceStatus};
use crate::vocab::istio::IstioVersion;
use crate::vocab::istio::Sidecar;

use crate::readiness;

/// Where a [`FenceSink`] writes.
pub enum Target {
    /// The API server, through the fence status writer.
    Api(StatusWriter),
    /// Manifest files under `dir`; `ready` (when given) is failed while the last write failed.
    Directory {
        /// The directory.
        dir: PathBuf,
        /// Readiness of the directory's writes.
        ready: Option<readiness::Task>,
    },
    /// Nowhere but the in-memory fences.
    Memory,
}

/// Takes what fences learned (edges, Prometheus results) to their output.
pub struct FenceSink {
    state: ClusterState,
    config: Arc<Config>,
    target: Target,
}

/// What one fence became after a local write.
#[derive(Debug)]
pub struct Learned {
    /// Its Sidecar, or why it gets none.
    pub sidecar: Result<Sidecar, NoSidecar>,
}

impl FenceSink {
    /// A sink writing to `target`; the local targets update the fences of `state`.
    pub fn new(state: ClusterState, config: Arc<Config>, target: Target) -> Self {
        if let Target::Directory {
            ready: Some(ready), ..
        } = &target
        {
            ready.set(true);
        }
        Self {
            state,
            config,
            target,
        }
    }

    /// The fences and index it writes from.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// The configuration fences are evaluated with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Writes what each fence learned, one write per fence.
    pub async fn write(&mut self, learned: BTreeMap<ObjectKey, Vec<Edge>>, now: Timestamp) {
        if let Target::Api(writer) = &mut self.target {
            let done = writer.write(learned.into_values().flatten().collect(), now).await;
            tracing::debug!(?done, "learned dependencies written");
            return;
        }
        for (key, edges) in learned {
            self.apply_logged(&key, |s| super::status::apply_edges(s, edges.iter(), now), now);
        }
    }

    /// Writes one Prometheus poll of `key`.
    pub async fn write_metrics(
        &mut self,
        key: &ObjectKey,
        metrics: &BTreeMap<String, String>,
        now: Timestamp,
    ) {
        if let Target::Api(writer) = &mut self.target {
            let done = writer.write_metrics(key, metrics, now).await;
            tracing::debug!(?done, "prometheus results written");
            return;
        }
        self.apply_logged(key, |s| super::prometheus::apply_metrics(s, metrics, now), now);
    }

    /// [`Self::apply`], its failure logged and shown by the readiness task.
    fn apply_logged(
        &self,
        key: &ObjectKey,
        update: impl FnOnce(&mut ServiceFenceStatus) -> bool,
        now: Timestamp,
    ) {
        let ready = match &self.target {
            Target::Directory { ready, .. } => ready.as_ref(),
            _ => None,
        };
        match self.apply(key, update, now) {
            Ok(Some(Learned { sidecar: Err(why) })) => {
                tracing::info!(fence = %key, reason = why.reason(), "no Sidecar");
                ready.inspect(|r| r.set(true));
            }
            Ok(_) => {
                ready.inspect(|r| r.set(true));
            }
            Err(e) => {
                tracing::error!(fence = %key, error = %format!("{e:#}"), "writing the learned fence");
                ready.inspect(|r| r.fail(format!("writing {key}: {e}")));
            }
        }
    }

    /// Without a cluster: merges what `key` learned (`update`) into its in-memory copy (so
    /// `/debug/fences` shows the Sidecar it now gets) and, to a directory, writes the fence and
    /// its Sidecar there. `None` for a fence the state does not hold (what it learned stays in
    /// `/debug/edges` only) and with [`Target::Api`] (the cluster's fences are not held here).
    pub fn apply(
        &self,
        key: &ObjectKey,
        update: impl FnOnce(&mut ServiceFenceStatus) -> bool,
        now: Timestamp,
    ) -> crate::manifests::Result<Option<Learned>> {
        if matches!(self.target, Target::Api(_)) {
            return Ok(None);
        }
        let Some(mut fence) = self.state.fence(key) else {
            return Ok(None);
        };
        let sidecar = learned(&mut fence, update, &self.state.index(), &self.config, now);
        let written = match &self.target {
            Target::Directory { dir, .. } => write_manifests(dir, key, &fence, sidecar.as_ref().ok()),
            _ => Ok(()),
        };
        self.state.set_fence(key.clone(), Some(fence));
        written.map(|()| Some(Learned { sidecar }))
    }
}

/// The step every sink shares: merges `update` into `fence`'s status, evaluates it at `now`
/// and keeps the evaluated status; its Sidecar, or why it gets none.
pub fn learned(
    fence: &mut ServiceFence,
    update: impl FnOnce(&mut ServiceFenceStatus) -> bool,
    index: &ClusterIndex,
    config: &Config,
    now: Timestamp,
) -> Result<Sidecar, NoSidecar> {
    update(fence.status.get_or_insert_with(Default::default));
    let eval = crate::model::evaluate(fence, index, config, now, IstioVersion::default());
    fence.status = Some(eval.status);
    eval.sidecar
}

/// Writes `fence` and, if it gets one, its Sidecar under `dir`.
fn write_manifests(
    dir: &std::path::Path,
    key: &ObjectKey,
    fence: &ServiceFence,
    sidecar: Option<&Sidecar>,
) -> crate::manifests::Result<()> {
    crate::manifests::write(dir, key, "servicefence", fence)?;
    match sidecar {
        Some(sidecar) => crate::manifests::write(dir, key, "sidecar", sidecar),
        None => Ok(()),
    }
}

/// `/debug/fences`: every fence of `state` with its status and the Sidecar hosts the model gives
/// it at `now` (or why it gets none).
pub fn fences_view(state: &ClusterState, config: &Config, now: Timestamp) -> serde_json::Value {
    let index = state.index();
    let fences: serde_json::Map<String, serde_json::Value> = state
        .fence_keys()
        .into_iter()
        .filter_map(|key| {
            let fence = state.fence(&key)?;
            let eval = crate::model::evaluate(&fence, &index, config, now, IstioVersion::default());
            let sidecar = match &eval.sidecar {
                Ok(_) => serde_json::json!({ "hosts": eval.sidecar_hosts() }),
                Err(why) => serde_json::json!({"none": why.reason()}),
            };
            Some((
                key.to_string(),
                serde_json::json!({"enable": fence.spec.enable, "status": eval.status, "sidecar": sidecar}),
            ))
        })
        .collect();
    serde_json::Value::Object(fences)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::fence::ServiceFenceSpec;

    const HOST: &str = "reviews.default.svc.cluster.local";

    /// A sink to `target` over one enabled fence, `default/productpage`, in an empty cluster.
    fn sink(target: Target) -> (FenceSink, ObjectKey) {
        let mut fence = ServiceFence::new(
            "productpage",
            ServiceFenceSpec {
                enable: true,
                ..Default::default()
            },
        );
        fence.metadata.namespace = Some("default".into());
        let state = ClusterState::new(ClusterIndex::new("cluster.local"), [fence]);
        let sink = FenceSink::new(state, Arc::new(Config::default()), target);
        (sink, ObjectKey::new("default", "productpage"))
    }

    fn learned(key: &ObjectKey) -> BTreeMap<ObjectKey, Vec<Edge>> {
        let edge = Edge {
            fence: key.clone(),
            host: HOST.into(),
            seen: Timestamp::UNIX_EPOCH,
        };
        BTreeMap::from([(key.clone(), vec![edge])])
    }

    fn knows_host(sink: &FenceSink, key: &ObjectKey) -> bool {
        let fence = sink.state().fence(key).expect("the fence");
        fence.status.is_some_and(|s| s.last_seen.contains_key(HOST))
    }

    #[tokio::test]
    async fn memory_keeps_what_a_fence_learned_in_its_copy() {
        let (mut sink, key) = sink(Target::Memory);
        sink.write(learned(&key), Timestamp::UNIX_EPOCH).await;
        assert!(knows_host(&sink, &key));
        let view = fences_view(sink.state(), sink.config(), Timestamp::UNIX_EPOCH);
        let hosts = view["default/productpage"]["sidecar"]["hosts"].to_string();
        assert!(hosts.contains(HOST), "{view}");
    }

    #[tokio::test]
    async fn a_directory_gets_the_fence_and_its_sidecar_and_is_ready() {
        let dir = std::env::temp_dir().join(format!("lazyload-sink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let readiness = readiness::Readiness::default();
        let ready = readiness.register("manifests-dir");
        let (mut sink, key) = sink(Target::Directory {
            dir: dir.clone(),
            ready: Some(ready),
        });
        sink.write(learned(&key), Timestamp::UNIX_EPOCH).await;
        assert!(knows_host(&sink, &key));
        let fence =
            std::fs::read_to_string(crate::manifests::path(&dir, &key, "servicefence")).expect("written");
        assert!(fence.contains(HOST), "{fence}");
        let sidecar =
            std::fs::read_to_string(crate::manifests::path(&dir, &key, "sidecar")).expect("written");
        assert!(sidecar.contains(HOST), "{sidecar}");
        assert!(readiness.pending().is_empty(), "{:?}", readiness.pending());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_fence_the_state_does_not_hold_is_not_written() {
        let dir = std::env::temp_dir().join(format!("lazyload-sink-unknown-{}", std::process::id()));
        let (sink, _) = sink(Target::Directory {
            dir: dir.clone(),
            ready: None,
        });
        let unknown = ObjectKey::new("default", "gone");
        let applied = sink
            .apply(&unknown, |_| true, Timestamp::UNIX_EPOCH)
            .expect("no error");
        assert!(applied.is_none());
        assert!(!dir.exists(), "nothing written");
    }
}
