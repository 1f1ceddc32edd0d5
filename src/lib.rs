//! lazyload gives every Istio sidecar only the configuration it needs, learned from live traffic.
//!
//! It is a Rust re-implementation of the Slime lazyload module, compatible with its
//! `ServiceFence` API and module configuration; the design is in `docs/design.md`. The modules
//! form layers that read one way (a module uses only lower layers or its own; `tests/layers.rs`
//! checks it), listed here lowest first:
//!
//! - [`vocab`]: the shared vocabulary: object keys, hosts, labels, Istio and fence types, headers.
//! - [`hash`]: a fast hasher for the access-log hot path.
//! - [`duration`]: Go-style durations with checked arithmetic (config and flags).
//! - [`net`]: socket helpers shared by the gRPC servers.
//! - [`readiness`]: the tasks `/readyz` waits for.
//! - [`yaml`]: YAML in and out (one library, one set of reader options).
//! - [`config`]: the Slime-compatible module configuration (SlimeBoot forms, defaults, checks).
//! - [`telemetry`]: logging, to standard error or a rotated file; metric family registration.
//! - [`index`]: the cluster state the model reads, and the one object -> index conversion.
//! - [`model`]: pure decisions: fence -> status and Sidecar, auto-fencing, the fallback objects.
//! - [`cluster`]: the kube I/O: the run-time cluster state, its watchers and every API write.
//! - [`learn`]: fair per-fence learning queues, the merge into fence status, the Prometheus source.
//! - [`als`]: the access-log collector (gRPC ALS) and the pure entry -> dependency attribution.
//! - [`reconcile`]: the lease-gated controllers that write fences, Sidecars and fallback objects.
//! - [`manifests`]: the file sink (`generate`, `serve --manifests-dir`), atomic and read back.
//! - [`inputs`]: the configuration file and cluster snapshot, read the same way by every command.
//! - [`admin`]: the admin HTTP endpoint (`/metrics`, `/healthz`, `/readyz`, `/debug/...`).
//! - [`xds`]: the ADS relay between istiod and the global-sidecar, with its adjustments.
//! - [`metrics`]: the catalog of every metric family (`lazyload metrics`).
//! - [`serve`]: `lazyload serve`, wiring the components.
//! - [`generate`]: `lazyload generate`, manifests from a snapshot and access logs.
//! - [`report`]: `lazyload report`, push sizes offline or from a live istiod.
//! - [`explain`]: `lazyload explain`, why each host is in a workload's Sidecar.
//! - [`fake_istiod`]: an istiod stand-in serving a fixed config over ADS (the demo's, the tests').
//! - [`demo`]: `lazyload demo`, the whole path on a sample mesh.
//! - `testing` (tests and benches only): shared test builders, the mock API server, `eventually`.

pub mod admin;
pub mod als;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod duration;
pub mod explain;
pub mod fake_istiod;
pub mod generate;
pub mod hash;
pub mod index;
pub mod inputs;
pub mod learn;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod net;
pub mod readiness;
pub mod reconcile;
pub mod report;
pub mod serve;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod vocab;
pub mod xds;
pub mod yaml;
