//! The incremental route path equals the from-scratch one, reuses what it adjusted, and lets go
//! of what no stream serves.

use envoy_types::pb::envoy::config::route::v3::Route;
use proptest::prelude::*;

use super::*;
use crate::demo::mesh::route_to;
use crate::xds::NodeInfo;
use crate::xds::adjust::{PASSTHROUGH_CLUSTER, Settings};

const GLOBAL_SIDECAR: &str = "outbound|80||global-sidecar.mesh-operator.svc.cluster.local";

/// A service's virtual host as istiod writes it, in a few shapes.
#[derive(Clone, Debug)]
struct Service {
    name: u8,
    namespace: u8,
    /// Which of a few route sets (so that a service can change).
    variant: u8,
    /// istiod also gave it the short name (the proxy's own namespace).
    own_short: bool,
    /// One of its routes goes to the global-sidecar (A1 removes it).
    to_global_sidecar: bool,
    /// All its routes go to the global-sidecar (A1 drops the virtual host).
    only_global_sidecar: bool,
    port: u16,
}

/// One route configuration istiod sends.
#[derive(Clone, Debug)]
struct Push {
    services: Vec<Service>,
    /// Whether `allow_any` is there, and where.
    wildcard_at: Option<usize>,
    /// Whether its catch-all already goes to `PassthroughCluster` with no timeout.
    wildcard_adjusted: bool,
}

fn service() -> impl Strategy<Value = Service> {
    (
        0u8..4,
        0u8..6,
        0u8..3,
        any::<bool>(),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.05),
    )
        .prop_map(
            |(name, namespace, variant, own_short, to_global_sidecar, only_global_sidecar, other_port)| {
                Service {
                    name,
                    namespace,
                    variant,
                    own_short,
                    to_global_sidecar,
                    only_global_sidecar,
                    port: if other_port { 9081 } else { 9080 },
                }
            },
        )
}

fn push() -> impl Strategy<Value = Push> {
    (
        prop::collection::vec(service(), 0..12),
        prop::option::weighted(0.9, 0usize..12),
        any::<bool>(),
    )
        .prop_map(|(services, wildcard_at, wildcard_adjusted)| Push {
            wildcard_at: wildcard_at.map(|at| at.min(services.len())),
            services,
            wildcard_adjusted,
        })
}

fn routes(s: &Service, fqdn: &str) -> Vec<Route> {
    let cluster = format!("outbound|{}||{fqdn}", s.port);
    if s.only_global_sidecar {
        return vec![route_to(GLOBAL_SIDECAR)];
    }
    let mut routes = vec![route_to(&cluster)];
    for i in 0..s.variant {
        let mut r = route_to(&format!("{cluster}-v{i}"));
        r.name = format!("v{i}");
        routes.insert(0, r);
    }
    if s.to_global_sidecar {
        routes.insert(0, route_to(GLOBAL_SIDECAR));
    }
    routes
}

fn configuration(p: &Push) -> RouteConfiguration {
    let mut virtual_hosts: Vec<VirtualHost> = p
        .services
        .iter()
        .map(|s| {
            let (name, ns) = (format!("svc{}", s.name), format!("ns{}", s.namespace));
            let fqdn = format!("{name}.{ns}.svc.cluster.local");
            let mut domains = vec![fqdn.clone(), format!("{name}.{ns}")];
            if s.own_short {
                domains.extend([name.clone(), format!("{name}:{}", s.port)]);
            }
            VirtualHost {
                name: format!("{fqdn}:{}", s.port),
                domains,
                routes: routes(s, &fqdn),
                ..Default::default()
            }
        })
        .collect();
    if let Some(at) = p.wildcard_at {
        let mut catch_all = route_to(PASSTHROUGH_CLUSTER);
        if !p.wildcard_adjusted {
            catch_all = route_to("BlackHoleCluster");
        }
        virtual_hosts.insert(
            at,
            VirtualHost {
                name: "allow_any".into(),
                domains: vec!["*".into()],
                routes: vec![catch_all],
                ..Default::default()
            },
        );
    }
    RouteConfiguration {
        name: "9080".into(),
        virtual_hosts,
        ..Default::default()
    }
}

/// What a stream would send for `encoded`: (configuration, changed, counts), from scratch.
fn from_scratch(adj: &Adjuster<'_>, encoded: &[u8]) -> (RouteConfiguration, bool, Counts) {
    let mut rc = RouteConfiguration::decode(encoded).unwrap();
    let mut counts = Counts::default();
    let changed = adj.route(&mut rc, &mut counts);
    (rc, changed, counts)
}

/// The same, incrementally; `None` when it took the from-scratch path.
fn incremental(
    cache: &RouteCache,
    adj: &Adjuster<'_>,
    encoded: &[u8],
) -> Option<(RouteConfiguration, bool, Counts, Pins)> {
    let mut counts = Counts::default();
    let out = cache.adjust(adj, encoded, &mut counts)?;
    let changed = out.encoded.is_some();
    let rc = RouteConfiguration::decode(out.encoded.as_deref().unwrap_or(encoded)).unwrap();
    Some((rc, changed, counts, out.pins))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// For any sequence of route configurations (services added, changed, removed, namespaces
    /// appearing), two streams sharing the cache get what adjusting from scratch gives.
    #[test]
    fn incremental_equals_from_scratch(pushes in prop::collection::vec(push(), 1..8)) {
        let settings = Settings::default();
        let node = NodeInfo::default();
        let adj = Adjuster { settings: &settings, node: &node };
        let cache = RouteCache::default();
        let mut held: [Pins; 2] = Default::default();
        for (i, p) in pushes.iter().enumerate() {
            let encoded = configuration(p).encode_to_vec();
            let expected = from_scratch(&adj, &encoded);
            let uniform_ports = p.services.iter().all(|s| s.port == 9080);
            for stream in &mut held {
                match incremental(&cache, &adj, &encoded) {
                    Some((rc, changed, counts, pins)) => {
                        prop_assert_eq!(&rc, &expected.0, "push {}", i);
                        prop_assert_eq!(changed, expected.1, "push {}", i);
                        prop_assert_eq!(&counts, &expected.2, "push {}", i);
                        *stream = pins;
                    }
                    None => prop_assert!(!uniform_ports, "push {} took the from-scratch path", i),
                }
            }
        }
    }

    /// Bytes that are not a route configuration never panic, and are left to the from-scratch
    /// path unless they parse.
    #[test]
    fn garbage_is_no_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let settings = Settings::default();
        let node = NodeInfo::default();
        let adj = Adjuster { settings: &settings, node: &node };
        let cache = RouteCache::default();
        let mut counts = Counts::default();
        if cache.adjust(&adj, &bytes, &mut counts).is_some() {
            prop_assert!(RouteConfiguration::decode(bytes.as_slice()).is_ok());
        }
    }
}

/// Runs `f` with the default settings and an Istio proxy's node.
fn with_defaults(f: impl FnOnce(&Adjuster<'_>)) {
    let settings = Settings::default();
    let node = NodeInfo::default();
    f(&Adjuster {
        settings: &settings,
        node: &node,
    });
}

fn mesh(services: usize, changed: Option<usize>) -> Vec<u8> {
    let p = Push {
        services: (0..services)
            .map(|i| Service {
                name: (i % 200) as u8,
                namespace: (i / 200) as u8,
                variant: u8::from(changed == Some(i)),
                own_short: i % 50 == 0,
                to_global_sidecar: false,
                only_global_sidecar: false,
                port: 9080,
            })
            .collect(),
        wildcard_at: Some(services),
        wildcard_adjusted: true,
    };
    configuration(&p).encode_to_vec()
}

#[test]
fn one_changed_service_is_the_only_one_adjusted_again() {
    with_defaults(|adj| {
        let cache = RouteCache::default();
        let first = incremental(&cache, adj, &mesh(600, None)).unwrap().3;
        assert_eq!(cache.len(), 601, "a piece per virtual host");
        let second = incremental(&cache, adj, &mesh(600, Some(7))).unwrap().3;
        let shared = first
            .pieces()
            .iter()
            .zip(second.pieces())
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert_eq!(shared, 600, "every piece but the changed service's is reused");
        assert_eq!(
            cache.len(),
            602,
            "the old version is held by the first stream still"
        );
        drop(first);
        assert_eq!(cache.len(), 601, "what no stream serves leaves the cache");
        drop(second);
        assert!(cache.is_empty());
    });
}

#[test]
fn settings_are_part_of_the_key() {
    let node = NodeInfo::default();
    let local = Settings::default();
    let other = Settings {
        cluster_domain: "example.org".into(),
        ..Default::default()
    };
    let cache = RouteCache::default();
    let encoded = mesh(10, None);
    for settings in [&local, &other] {
        let adj = Adjuster {
            settings,
            node: &node,
        };
        let (rc, ..) = incremental(&cache, &adj, &encoded).unwrap();
        assert_eq!(rc, from_scratch(&adj, &encoded).0);
    }
}

#[test]
fn an_unchanged_configuration_is_looked_up_not_spliced_again() {
    with_defaults(|adj| {
        let cache = RouteCache::default();
        let encoded = mesh(50, None);
        let (mut first_counts, mut again_counts) = (Counts::default(), Counts::default());
        let first = cache.adjust(adj, &encoded, &mut first_counts).unwrap();
        let again = cache.adjust(adj, &encoded, &mut again_counts).unwrap();
        let (a, b) = (first.encoded.unwrap(), again.encoded.unwrap());
        assert_eq!(a.as_ptr(), b.as_ptr(), "the same encoding, shared");
        assert_eq!(first_counts, again_counts, "and counted as if adjusted again");
        assert!(!first_counts.0.is_empty());
    });
}
