//! The inputs the commands read the same way: the configuration file and the cluster snapshot.

use std::path::Path;

use anyhow::Context as _;

use crate::config::{Config, Loaded};
use crate::index::snapshot::Snapshot;

/// The configuration in `path`, or the defaults without one.
pub fn config(path: Option<&Path>) -> anyhow::Result<Loaded> {
    Ok(match path {
        Some(path) => Config::load(path)?,
        None => Config::parse("")?,
    })
}

/// The cluster in the snapshot file `path` (an empty cluster without one), indexed the way
/// `config` says (its cluster domain and workload label).
pub fn snapshot(path: Option<&Path>, config: &Config) -> anyhow::Result<Snapshot> {
    let domain = &config.general.cluster_domain;
    let mut snapshot = match path {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Snapshot::parse(&text, domain).with_context(|| format!("loading {}", path.display()))?
        }
        None => Snapshot::parse("", domain)?,
    };
    snapshot
        .index
        .set_workload_label(config.general.fence_label_key_alias.clone());
    Ok(snapshot)
}

/// The configuration (its warnings dropped: the offline commands print their results, not
/// these) and the snapshot it indexes.
pub fn config_and_snapshot(config: Option<&Path>, snapshot: &Path) -> anyhow::Result<(Config, Snapshot)> {
    let config = self::config(config)?.config;
    let snapshot = self::snapshot(Some(snapshot), &config)?;
    Ok((config, snapshot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_config_file_is_the_defaults_and_no_snapshot_an_empty_cluster() {
        let loaded = config(None).expect("the defaults");
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(format!("{:?}", loaded.config), format!("{:?}", Config::default()));
        let snapshot = snapshot(None, &loaded.config).expect("an empty cluster");
        assert!(snapshot.fences.is_empty() && snapshot.rejected.is_empty());
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let missing = Path::new("/nonexistent/lazyload/cluster.yaml");
        let err = config_and_snapshot(None, missing).expect_err("no such file");
        assert!(
            format!("{err:#}").contains("/nonexistent/lazyload/cluster.yaml"),
            "{err:#}"
        );
        let err = config(Some(Path::new("/nonexistent/lazyload/config.yaml"))).expect_err("no such file");
        assert!(format!("{err:#}").contains("config.yaml"), "{err:#}");
    }
}
