//! Whole SotW responses adjusted once per distinct content, shared by every stream.
//!
//! Every replica of the global-sidecar gets the same responses from istiod: the same 10,000
//! clusters, the same endpoints, the same route configurations. Adjusting and interning them
//! resource by resource costs each replica as much as the first (a hash-table lookup and a
//! comparison per resource, most of it waiting on memory). Here a response is keyed by a hash
//! of its type, its resources' bytes and what of the node the adjustments read; a stream whose
//! response equals one already adjusted (compared byte for byte, not trusted to the hash) takes
//! the result as it is: the adjusted resources, their interned set, the route pieces they hold,
//! the counts. A result lives as long as a stream holds it as its latest response of a type.

use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::adjust::{Adjuster, Counts};
use super::cache::{Interner, ResourceSet, WeakTable};
use super::response::{RawAny, SotwResponse};
use super::routes::Pins;
use super::stream::{Processed, process, resource_name};
use super::{CLUSTER, ROUTE, SecretSource};

/// The resources of a response from istiod.
#[derive(Debug)]
pub struct Input {
    /// The resources, in order.
    pub resources: Arc<[RawAny]>,
    /// Their `resources` fields as received, when they came in one run.
    pub encoded: Option<Bytes>,
}

/// A response adjusted for a kind of node.
#[derive(Debug)]
pub struct Adjusted {
    type_url: String,
    profile: Profile,
    input: Arc<[RawAny]>,
    /// The resources to send, in order.
    pub output: Arc<[RawAny]>,
    /// Their `resources` fields, encoded once for every stream that sends them.
    pub encoded: Bytes,
    /// The named resources, interned (the stream merges them into its view).
    pub set: ResourceSet,
    /// The names of the resources the relay changed.
    pub adjusted: Vec<String>,
    /// The route pieces each route configuration is made of (route configurations only).
    pub pins: Vec<(String, Pins)>,
    /// What the adjustments did.
    pub counts: Counts,
}

/// What of the node the adjustments read (A9, A11).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Profile {
    stock_envoy: bool,
    static_secrets: bool,
    /// The extensions it supports, sorted; only read for a stock Envoy.
    supports: Vec<String>,
}

impl Profile {
    fn of(adj: &Adjuster<'_>) -> Self {
        let mut supports: Vec<String> = if adj.stock_envoy() {
            adj.node.supported_type_urls.iter().cloned().collect()
        } else {
            Vec::new()
        };
        supports.sort();
        Self {
            stock_envoy: adj.stock_envoy(),
            static_secrets: adj.node.secrets == SecretSource::Static,
            supports,
        }
    }
}

/// The adjusted responses, by content (weak: a result lives while a stream holds it). An
/// `Interner` serves one relay, whose settings do not change.
#[derive(Debug, Default)]
pub struct ResponseMemo {
    table: Mutex<WeakTable<Adjusted>>,
    hasher: foldhash::fast::RandomState,
}

impl ResponseMemo {
    /// The response of `type_url` holding `resources`, adjusted for the node of `adj`: taken
    /// from a stream that had the same, or made now.
    pub fn adjust(
        &self,
        type_url: &str,
        input: Input,
        adj: &Adjuster<'_>,
        interner: &Interner,
    ) -> Arc<Adjusted> {
        let profile = Profile::of(adj);
        let key = self.key(type_url, &profile, &input.resources);
        let same =
            |a: &Adjusted| a.type_url == type_url && a.profile == profile && a.input == input.resources;
        if let Some(found) = self.table().find(key, same) {
            return found;
        }
        let made = Arc::new(make(type_url, profile, input, adj, interner));
        self.table().hold(key, &made);
        made
    }

    fn table(&self) -> std::sync::MutexGuard<'_, WeakTable<Adjusted>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key(&self, type_url: &str, profile: &Profile, resources: &[RawAny]) -> u64 {
        let mut h = self.hasher.build_hasher();
        std::hash::Hash::hash(&(type_url, profile), &mut h);
        for r in resources {
            h.write(r.type_url.as_bytes());
            h.write_usize(r.value.len());
            h.write(&r.value);
        }
        h.finish()
    }

    /// Responses held (for tests of the bound).
    pub fn len(&self) -> usize {
        self.table().live()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Adjusts every resource of a response (only those that need it are decoded), interns the
/// named ones, and adds the relay's access-log cluster to a cluster response that lacks it.
fn make(type_url: &str, profile: Profile, input: Input, adj: &Adjuster<'_>, interner: &Interner) -> Adjusted {
    let mut counts = Counts::default();
    let mut adjusted = Vec::new();
    let mut pins = Vec::new();
    let mut output = Vec::with_capacity(input.resources.len() + 1);
    // The name of each resource kept (an adjustment never renames one).
    let mut names = Vec::with_capacity(input.resources.len());
    for any in input.resources.iter() {
        let name = resource_name(&any.type_url, &any.value).unwrap_or_default();
        match process(any.clone(), name, adj, interner, &mut counts) {
            Processed::Keep {
                any,
                adjusted: changed,
                pins: held,
            } => {
                if changed {
                    adjusted.push(name.to_string());
                }
                if type_url == ROUTE && !name.is_empty() {
                    pins.push((name.to_string(), held));
                }
                output.push(any);
                names.push(name);
            }
            Processed::Drop => {}
        }
    }
    let mut set = ResourceSet::default();
    interner.remember_all(
        &mut set,
        names
            .iter()
            .zip(&output)
            .filter(|(name, _)| !name.is_empty())
            .map(|(name, any)| (*name, any)),
    );
    if type_url == CLUSTER
        && let Some(als) = adj.als_cluster()
        && !set.contains_key(als.name.as_str())
    {
        let any = RawAny::pack(CLUSTER, &als);
        interner.remember(&mut set, &als.name, &any);
        output.push(any);
    }
    interner.share(&mut set);
    // Unchanged resources are sent as istiod encoded them.
    let unchanged = adjusted.is_empty() && output.len() == input.resources.len();
    let encoded = match input.encoded {
        Some(encoded) if unchanged => encoded,
        _ => SotwResponse::encode_resources(&output),
    };
    Adjusted {
        type_url: type_url.to_string(),
        profile,
        input: input.resources,
        output: output.into(),
        encoded,
        set,
        adjusted,
        pins,
        counts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::mesh::{outbound_port, route_to};
    use crate::xds::adjust::{PASSTHROUGH_CLUSTER, Settings, pack};
    use crate::xds::sotw::SotwStream;
    use crate::xds::stream::StreamState;
    use crate::xds::{ENDPOINT, LISTENER, NodeInfo};
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::route::v3::VirtualHost;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use envoy_types::pb::google::protobuf::Any;
    use proptest::prelude::*;
    use prost::Message;
    use std::collections::HashSet;

    /// The responses the streams receive: each a type and some of a few resources of it
    /// (`mask`), among them ones the adjustments change (the passthrough cluster, listeners,
    /// route configurations with services of several namespaces).
    fn response(kind: usize, mask: u8) -> DiscoveryResponse {
        let vhost = |svc: &str, ns: &str| VirtualHost {
            name: format!("{svc}.{ns}.svc.cluster.local:9080"),
            domains: vec![format!("{svc}.{ns}.svc.cluster.local"), format!("{svc}.{ns}")],
            routes: vec![route_to(&format!("outbound|9080||{svc}.{ns}.svc.cluster.local"))],
            ..Default::default()
        };
        let (type_url, all): (&str, Vec<Any>) = match kind % 4 {
            0 => (
                CLUSTER,
                [
                    "outbound|9080||a.x.svc.cluster.local",
                    "outbound|9080||b.y.svc.cluster.local",
                    PASSTHROUGH_CLUSTER,
                ]
                .iter()
                .map(|name| {
                    pack(&Cluster {
                        name: name.to_string(),
                        ..Default::default()
                    })
                })
                .collect(),
            ),
            1 => (
                ENDPOINT,
                ["a", "b", "c"]
                    .iter()
                    .map(|name| {
                        pack(&ClusterLoadAssignment {
                            cluster_name: name.to_string(),
                            ..Default::default()
                        })
                    })
                    .collect(),
            ),
            2 => (
                LISTENER,
                [9080, 9081, 15001]
                    .iter()
                    .map(|port| pack(&outbound_port("0.0.0.0", *port, vec![]).1))
                    .collect(),
            ),
            _ => (
                ROUTE,
                [("a", "x"), ("b", "y"), ("a", "y")]
                    .iter()
                    .enumerate()
                    .map(|(i, (svc, ns))| {
                        let hosts = (0..=i).map(|j| vhost(&format!("{svc}{j}"), ns)).collect();
                        pack(&outbound_port("0.0.0.0", 9080 + i as u16, hosts).0)
                    })
                    .collect(),
            ),
        };
        let resources = all
            .into_iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, any)| any)
            .collect();
        DiscoveryResponse {
            type_url: type_url.into(),
            resources,
            version_info: "v".into(),
            nonce: "n".into(),
            ..Default::default()
        }
    }

    /// An Istio proxy, a stock Envoy, and an Istio proxy without pilot-agent.
    fn node(kind: usize) -> NodeInfo {
        let mut node = NodeInfo {
            global_sidecar: true,
            ..Default::default()
        };
        match kind % 3 {
            0 => {}
            1 => {
                node.stock_envoy = true;
                node.supported_type_urls = HashSet::from([format!(
                    "type.googleapis.com/{}",
                    "envoy.extensions.filters.http.router.v3.Router"
                )]);
            }
            _ => node.secrets = SecretSource::Static,
        }
        node
    }

    proptest! {
        /// Whatever other streams (of other kinds of node) received before, a stream's response
        /// is what a relay that had seen nothing else makes of it: the same resources, counts
        /// and view.
        #[test]
        fn a_shared_result_equals_adjusting_alone(
            steps in prop::collection::vec((0usize..4, 0usize..4, 1u8..8), 1..16),
        ) {
            let settings = Settings {
                als_address: Some(("127.0.0.1".into(), 8082)),
                ..Default::default()
            };
            let nodes: Vec<NodeInfo> = (0..4).map(node).collect();
            let shared = Interner::default();
            let mut streams: Vec<SotwStream> = (0..4).map(|g| SotwStream::new(g as u64)).collect();
            for (stream, kind, mask) in steps {
                let adj = Adjuster { settings: &settings, node: &nodes[stream] };
                let resp = response(kind, mask);
                let type_url = resp.type_url.clone();
                let mut counts = Counts::default();
                let got = streams[stream].upstream_response(SotwResponse::from(resp.clone()), &adj, &shared, &mut counts);
                let alone = Interner::default();
                let mut fresh = SotwStream::new(99);
                let mut want_counts = Counts::default();
                let want = fresh.upstream_response(SotwResponse::from(resp), &adj, &alone, &mut want_counts);
                prop_assert_eq!(got.resources(), want.resources());
                prop_assert_eq!(&counts, &want_counts);
                let (head, resources) = got.encode_parts();
                let sent = DiscoveryResponse::decode([head, resources.to_vec()].concat().as_slice()).unwrap();
                prop_assert_eq!(sent.resources, want.resources().iter().map(RawAny::to_any).collect::<Vec<_>>());
                let names = |s: &SotwStream| s.resources(&type_url).map(|set| set.keys().map(|k| k.to_string()).collect::<Vec<_>>());
                let view = names(&streams[stream]).unwrap_or_default();
                let mine = names(&fresh).unwrap_or_default();
                if crate::xds::is_wildcard_type(&type_url) {
                    prop_assert_eq!(view, mine);
                } else {
                    prop_assert!(mine.iter().all(|n| view.contains(n)), "{view:?} lacks some of {mine:?}");
                }
            }
            prop_assert!(shared.responses.len() <= 4 * 4, "a stream holds its latest response of each type only");
        }
    }
}
