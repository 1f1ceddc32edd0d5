//! lazyload gives every Istio sidecar only the configuration it needs, learned from live traffic.
//!
//! It is a Rust re-implementation of the Slime lazyload module, compatible with its
//! `ServiceFence` API and module configuration.
//!
//! - [`config`]: the Slime-compatible module configuration.
//! - [`model`]: the pure domain: ServiceFence and Istio types, fence -> Sidecar, auto-fencing.
//! - [`index`]: the cluster state the model reads (Services, Pods by IP, Namespaces,
//!   VirtualServices, ...).
//! - [`als`]: the access-log collector (gRPC ALS) and the pure entry -> dependency attribution.
//! - [`learn`]: dependency dedup, batches, the merge into fence status, the Prometheus source.
//! - [`manifests`]: the file sink (`generate`, `serve --manifests-dir`): atomic writes, read back at
//!   start.
//! - [`serve`]: `lazyload serve`, wiring the components with [`admin`], [`readiness`] and
//!   [`telemetry`].

pub mod admin;
pub mod als;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod duration;
pub mod generate;
pub mod hash;
pub mod index;
pub mod learn;
pub mod manifests;
pub mod model;
pub mod net;
pub mod readiness;
pub mod reconcile;
pub mod report;
pub mod serve;
pub mod telemetry;
pub mod xds;
