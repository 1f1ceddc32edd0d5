//! The access-log collector: Envoy's gRPC Access Log Service, fed by the global-sidecar.
//!
//! - [`entry`]: the part of an access-log entry lazyload reads, borrowed from the decoded proto.
//! - [`attribute`]: entry -> (source fences, destination hosts); pure, no I/O.
//! - [`collector`]: the `StreamAccessLogs` gRPC service that decodes, attributes and hands the
//!   dependencies to the [`crate::learn::Learner`].
//!
//! The wire contract with the relay (which adds the logger to the global-sidecar) is the
//! constants below.

pub mod attribute;
pub mod collector;
pub mod entry;

use crate::vocab::{ORIG_DEST_HEADER, SOURCE_NS_HEADER};

/// Name of the global-sidecar's cluster that points at the collector (Slime's name).
pub const ACCESS_LOG_CLUSTER: &str = "lazyload-accesslog-source";
/// `log_name` of the logger the relay installs.
pub const LOG_NAME: &str = "lazyload";
/// `log_name` of Slime's own global-sidecar logger (its EnvoyFilter); handled the same way.
pub const SLIME_LOG_NAME: &str = "http_envoy_accesslog";
/// `additional_request_headers_to_log` of the logger the relay installs.
pub const LOGGED_REQUEST_HEADERS: [&str; 2] = [ORIG_DEST_HEADER, SOURCE_NS_HEADER];
/// Largest gRPC message the collector decodes. Envoy flushes its buffer at 16 KiB by default
/// (`buffer_size_bytes`); 4 MiB leaves room for large configured buffers and huge headers while
/// bounding what one bad peer can make us allocate.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
