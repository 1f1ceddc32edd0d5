//! The file sink of `generate` and of `serve --manifests-dir`: one manifest per object, at
//! `<dir>/<namespace>/<name>.<kind>.yaml`.
//!
//! With `serve` the directory is the learned state (as fence status is with a cluster), so a
//! write must never leave a partial file and a restart must not forget what was written: each
//! file is written to a temporary file beside it, flushed to disk, then renamed over the old one
//! (a rename within a directory is atomic), and [`restore_fence_status`] reads the fences back
//! at start.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::vocab::ObjectKey;
use crate::vocab::fence::ServiceFence;

/// What went wrong with one manifest file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading, writing, flushing or renaming a file or directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// An object could not be written as YAML.
    #[error("serialising {}: {source}", path.display())]
    Serialise {
        /// The manifest it was meant for.
        path: PathBuf,
        /// The failure.
        source: crate::yaml::WriteError,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The suffix of a manifest being written; such a file left by a kill is removed at start.
const PARTIAL: &str = ".partial";

/// The path of `key`'s manifest of `kind` (`servicefence`, `sidecar`) under `out`.
pub fn path(out: &Path, key: &ObjectKey, kind: &str) -> PathBuf {
    out.join(&key.namespace).join(format!("{}.{kind}.yaml", key.name))
}

/// Writes `object` as `key`'s manifest of `kind` under `out`, atomically: after a crash at any
/// point the file holds either its previous content or the new one, never a part of either.
pub fn write<T: serde::Serialize>(out: &Path, key: &ObjectKey, kind: &str, object: &T) -> Result<()> {
    let target = path(out, key, kind);
    let yaml = crate::yaml::to_string(object).map_err(|source| Error::Serialise {
        path: target.clone(),
        source,
    })?;
    let dir = out.join(&key.namespace);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let partial = PathBuf::from(format!("{}{PARTIAL}", target.display()));
    let mut file = File::create(&partial).map_err(io(&partial))?;
    file.write_all(yaml.as_bytes()).map_err(io(&partial))?;
    // On disk before the rename makes it visible: else a power loss could expose an empty file.
    file.sync_all().map_err(io(&partial))?;
    drop(file);
    std::fs::rename(&partial, &target).map_err(io(&target))?;
    // The rename itself is durable only once the directory is.
    File::open(&dir).and_then(|d| d.sync_all()).map_err(io(&dir))
}

/// Creates `dir` if it is missing and checks that a file can be written in it (a temporary
/// file, removed at once): an unusable directory is an error at start, not at the first write.
pub fn check_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let probe = dir.join(format!(".lazyload-write-check{PARTIAL}"));
    let mut file = File::create(&probe).map_err(io(&probe))?;
    file.write_all(b"lazyload").map_err(io(&probe))?;
    file.sync_all().map_err(io(&probe))?;
    drop(file);
    std::fs::remove_file(&probe).map_err(io(&probe))
}

/// What [`restore_fence_status`] found.
#[derive(Debug, Default, PartialEq)]
pub struct Restored {
    /// Fences whose status was taken from their file.
    pub fences: usize,
    /// Fence files of fences the cluster does not have (kept on disk, not used).
    pub unknown: Vec<ObjectKey>,
    /// Files that could not be read as a ServiceFence, with the reason (kept on disk, not used).
    pub unreadable: Vec<(PathBuf, String)>,
}

/// Takes the status of every fence of `fences` that has a manifest under `dir` from that file
/// (the files were written by a previous run from the same fences, so their status holds
/// everything the cluster's had plus what was learned since), and removes the temporary files a
/// kill left behind. A missing directory is an empty one.
pub fn restore_fence_status(dir: &Path, fences: &mut [ServiceFence]) -> Result<Restored> {
    let mut restored = Restored::default();
    let namespaces = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(restored),
        Err(source) => {
            return Err(Error::Io {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut files = Vec::new();
    for namespace in namespaces {
        let namespace = namespace.map_err(io(dir))?.path();
        if !namespace.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&namespace).map_err(io(&namespace))? {
            files.push(file.map_err(io(&namespace))?.path());
        }
    }
    files.sort();
    for file in files {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.ends_with(PARTIAL) {
            std::fs::remove_file(&file).map_err(io(&file))?;
            continue;
        }
        if !name.ends_with(".servicefence.yaml") {
            continue;
        }
        let read = std::fs::read_to_string(&file)
            .map_err(|e| e.to_string())
            .and_then(|text| crate::yaml::from_str::<ServiceFence>(&text).map_err(|e| e.to_string()));
        let on_disk = match read {
            Ok(fence) => fence,
            Err(why) => {
                restored.unreadable.push((file, why));
                continue;
            }
        };
        let key = ObjectKey::of_or_empty(&on_disk.metadata);
        let known = fences.iter_mut().find(|f| {
            f.metadata.namespace.as_deref() == Some(key.namespace.as_str())
                && f.metadata.name.as_deref() == Some(key.name.as_str())
        });
        match (known, on_disk.status) {
            (Some(fence), Some(status)) => {
                fence.status = Some(status);
                restored.fences += 1;
            }
            (Some(_), None) => {}
            (None, _) => restored.unknown.push(key),
        }
    }
    Ok(restored)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fence;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lazyload-manifests-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn written_fences_come_back_with_their_status_and_partial_files_go() {
        let dir = temp_dir("restore");
        let key = ObjectKey::new("default", "productpage");
        let mut learned = fence("default", "productpage");
        learned.status = Some(
            serde_json::from_value(serde_json::json!({
                "metricStatus": {"{destination_service=\"reviews.default.svc.cluster.local\"}": "1"}
            }))
            .expect("a status"),
        );
        write(&dir, &key, "servicefence", &learned).expect("written");
        write(
            &dir,
            &ObjectKey::new("gone", "old"),
            "servicefence",
            &fence("gone", "old"),
        )
        .expect("written");
        std::fs::write(dir.join("default/x.servicefence.yaml"), "spec: [not a fence").expect("written");
        let partial = dir.join(format!("default/y.servicefence.yaml{PARTIAL}"));
        std::fs::write(&partial, "").expect("written");

        let mut fences = vec![fence("default", "productpage"), fence("default", "details")];
        let restored = restore_fence_status(&dir, &mut fences).expect("restored");
        assert_eq!(restored.fences, 1);
        assert_eq!(restored.unknown, [ObjectKey::new("gone", "old")]);
        assert_eq!(restored.unreadable.len(), 1, "{restored:?}");
        assert_eq!(fences[0].status, learned.status);
        assert_eq!(fences[1].status, None);
        assert!(!partial.exists(), "a partial file left by a kill is removed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_directory_restores_nothing() {
        let mut fences = vec![fence("default", "a")];
        let restored = restore_fence_status(&temp_dir("missing"), &mut fences).expect("nothing");
        assert_eq!(restored, Restored::default());
    }

    #[test]
    fn a_rewrite_replaces_the_file_and_leaves_no_temporary_file() {
        let dir = temp_dir("rewrite");
        let key = ObjectKey::new("ns", "a");
        write(&dir, &key, "sidecar", &serde_json::json!({"v": 1})).expect("written");
        write(&dir, &key, "sidecar", &serde_json::json!({"v": 2})).expect("written");
        let files: Vec<_> = std::fs::read_dir(dir.join("ns"))
            .expect("a directory")
            .map(|e| e.expect("an entry").file_name())
            .collect();
        assert_eq!(files, ["a.sidecar.yaml"]);
        let text = std::fs::read_to_string(path(&dir, &key, "sidecar")).expect("readable");
        assert_eq!(text, "v: 2\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
