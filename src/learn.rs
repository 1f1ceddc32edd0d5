//! Learning dependencies: attributed calls -> deduplicated edges -> batches for the reconciler,
//! persisted in `ServiceFence.status`.
//!
//! - [`learner`]: the dedup state machine (sans I/O): which calls are new or refresh a stale
//!   last-seen time, with caps on memory.
//! - [`status`]: the pure merge of edges into a fence's status, and the restart seed.
//! - [`pump`]: the learner shared by the collector's streams and the consumer, which takes
//!   batches when it is ready for them, and the in-memory view of what each fence learned
//!   (`/debug/edges`).
//! - [`persist`]: writing the batches into the fences' statuses when lazyload has a cluster.
//! - [`prometheus`]: the alternative source, `metricSourceType: prometheus`.

pub mod learner;
pub mod persist;
pub mod prometheus;
pub mod pump;
pub mod schedule;
pub mod sink;
pub mod status;

use jiff::Timestamp;
use serde::Serialize;

use crate::vocab::ObjectKey;

pub use learner::{Learner, Limits, Observed};

/// A learned dependency: calls from the fence's workloads reach `host`, last seen at `seen`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Edge {
    /// The caller's fence: the Service selecting the calling pod, or its workload fence.
    pub fence: ObjectKey,
    /// The destination host (an FQDN, a ServiceEntry or dispatch host, or a short name with
    /// `enableShortDomain`).
    pub host: String,
    /// When it was seen.
    pub seen: Timestamp,
}
