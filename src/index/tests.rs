use super::*;

fn svc(ns: &str, name: &str, labels: &[(&str, &str)]) -> ServiceInfo {
    ServiceInfo {
        key: ObjectKey::new(ns, name),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        selector: Some([("app".to_string(), name.to_string())].into()),
        ports: vec![],
        cluster_ips: vec![],
    }
}

fn vs(yaml: &str) -> VirtualServiceInfo {
    VirtualServiceInfo::from_object(&crate::yaml::from_str(yaml).unwrap(), "cluster.local").unwrap()
}

#[test]
fn label_and_namespace_lookups_follow_updates() {
    let mut idx = ClusterIndex::new("cluster.local");
    idx.apply_service(svc(
        "default",
        "reviews",
        &[("app", "reviews"), ("group", "default")],
    ));
    idx.apply_service(svc("test", "reviews", &[("app", "reviews")]));
    let sel: Labels = [
        ("app".into(), "reviews".into()),
        ("group".into(), "default".into()),
    ]
    .into();
    assert_eq!(
        idx.services_with_labels(&sel),
        [ObjectKey::new("default", "reviews")].into()
    );
    idx.apply_service(svc("default", "reviews", &[("app", "reviews")]));
    assert!(idx.services_with_labels(&sel).is_empty());
    assert_eq!(idx.services_in("test").count(), 1);
    idx.remove_service(&ObjectKey::new("test", "reviews"));
    assert_eq!(idx.services_in("test").count(), 0);
    assert!(idx.services_with_labels(&Labels::new()).is_empty());
}

#[test]
fn destinations_follow_routes_delegates_and_visibility() {
    let mut idx = ClusterIndex::new("cluster.local");
    idx.apply_virtual_service(vs(r#"
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews-v2}}, {destination: {host: "bad:host"}}]
    mirror: {host: shadow.tools.svc.cluster.local}
  - delegate: {name: more, namespace: other}
  tcp: [{route: [{destination: {host: tcp-backend}}]}]
"#));
    idx.apply_virtual_service(vs(r#"
metadata: {name: more, namespace: other}
spec:
  http: [{route: [{destination: {host: delegated}}]}]
"#));
    idx.apply_virtual_service(vs(r#"
metadata: {name: gw-only, namespace: default}
spec: {hosts: [reviews], gateways: [ingress], http: [{route: [{destination: {host: edge}}]}]}
"#));
    idx.apply_virtual_service(vs(r#"
metadata: {name: private, namespace: default}
spec: {hosts: [reviews], exportTo: ["."], http: [{route: [{destination: {host: private}}]}]}
"#));
    idx.apply_virtual_service(vs(r#"
metadata: {name: wild, namespace: default}
spec: {hosts: ["*.example.com"], tls: [{route: [{destination: {host: egress.gw.svc.cluster.local}}]}]}
"#));
    let got = idx.destinations("reviews.default.svc.cluster.local", "default");
    let want: BTreeSet<String> = [
        "delegated.other.svc.cluster.local",
        "private.default.svc.cluster.local",
        "reviews-v2.default.svc.cluster.local",
        "shadow.tools.svc.cluster.local",
        "tcp-backend.default.svc.cluster.local",
    ]
    .map(String::from)
    .into();
    assert_eq!(got, want);
    assert!(
        !idx.destinations("reviews.default.svc.cluster.local", "other")
            .contains("private.default.svc.cluster.local")
    );
    assert_eq!(
        idx.destinations("api.example.com", "x"),
        ["egress.gw.svc.cluster.local".to_string()].into()
    );
    idx.remove_virtual_service(&ObjectKey::new("default", "reviews"));
    assert!(
        !idx.destinations("reviews.default.svc.cluster.local", "default")
            .contains("shadow.tools.svc.cluster.local")
    );
}

#[test]
fn pod_fences_follow_pod_and_service_updates() {
    let mut idx = ClusterIndex::new("cluster.local");
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let pod = PodInfo {
        key: ObjectKey::new("default", "reviews-1"),
        labels: [("app".to_string(), "reviews".to_string())].into(),
        ips: vec![ip],
        host_network: false,
        service_account: "default".into(),
    };
    idx.apply_pod(pod.clone());
    assert_eq!(
        idx.pods_at(ip).map(|(p, _)| &p.key).collect::<Vec<_>>(),
        [&pod.key]
    );
    assert!(idx.pod_fences(&pod.key).is_empty());
    // A Service created after the pod selects it; so does a second one.
    idx.apply_service(svc("default", "reviews", &[]));
    let mut all = svc("default", "all", &[]);
    all.selector = Some([("app".to_string(), "reviews".to_string())].into());
    idx.apply_service(all.clone());
    idx.apply_service(svc("other", "reviews", &[]));
    let both = [
        ObjectKey::new("default", "all"),
        ObjectKey::new("default", "reviews"),
    ];
    assert_eq!(idx.pod_fences(&pod.key), both);
    // The workload fence comes last.
    idx.set_workload_label(Some(FenceLabelKey {
        key: "app".into(),
        alias: "app".into(),
    }));
    assert_eq!(
        idx.pod_fences(&pod.key).last(),
        Some(&ObjectKey::new("default", "app-reviews.workload.identity"))
    );
    // A selector that stops matching, a removed Service.
    all.selector = Some([("app".to_string(), "other".to_string())].into());
    idx.apply_service(all);
    idx.remove_service(&ObjectKey::new("default", "reviews"));
    assert_eq!(idx.pod_fences(&pod.key).len(), 1);
    // The pod moves to a new IP.
    let moved = PodInfo {
        ips: vec!["10.0.0.2".parse().unwrap()],
        ..pod.clone()
    };
    idx.apply_pod(moved);
    assert_eq!(idx.pods_at(ip).count(), 0);
    idx.remove_pod(&pod.key);
    assert_eq!(idx.pods_at("10.0.0.2".parse().unwrap()).count(), 0);
    assert_eq!(idx.counts()["pods"], 0);
}

#[test]
fn overlapping_ips_keep_every_pod() {
    let mut idx = ClusterIndex::new("cluster.local");
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let pod = |ns: &str| PodInfo {
        key: ObjectKey::new(ns, "p"),
        labels: Labels::new(),
        ips: vec![ip],
        host_network: false,
        service_account: "default".into(),
    };
    let names =
        |idx: &ClusterIndex| -> Vec<String> { idx.pods_at(ip).map(|(p, _)| p.key.to_string()).collect() };
    idx.apply_pod(pod("a"));
    idx.apply_pod(pod("b"));
    idx.apply_pod(pod("c"));
    idx.apply_pod(pod("b"));
    let mut all = names(&idx);
    all.sort();
    assert_eq!(all, ["a/p", "b/p", "c/p"]);
    idx.remove_pod(&ObjectKey::new("a", "p"));
    idx.remove_pod(&ObjectKey::new("c", "p"));
    assert_eq!(names(&idx), ["b/p"]);
    idx.remove_pod(&ObjectKey::new("b", "p"));
    assert!(names(&idx).is_empty());
    // Slots are reused.
    idx.apply_pod(pod("d"));
    assert_eq!(names(&idx), ["d/p"]);
}

#[test]
fn vips_and_service_entry_hosts() {
    let mut idx = ClusterIndex::new("cluster.local");
    let mut s = svc("default", "reviews", &[]);
    s.cluster_ips = vec!["10.96.0.2".into()];
    idx.apply_service(s);
    assert_eq!(
        idx.service_by_vip("10.96.0.2".parse().unwrap()),
        Some((
            &ObjectKey::new("default", "reviews"),
            "reviews.default.svc.cluster.local"
        ))
    );
    assert!(idx.has_service("reviews.default"));
    idx.remove_service(&ObjectKey::new("default", "reviews"));
    assert_eq!(idx.service_by_vip("10.96.0.2".parse().unwrap()), None);
    assert!(!idx.has_service("reviews.default"));
    let se: crate::vocab::istio::ServiceEntry =
        crate::yaml::from_str("metadata: {name: e, namespace: n}\nspec: {hosts: [a.example.com, '*.w.io']}")
            .unwrap();
    idx.apply_service_entry(ServiceEntryInfo::try_from(&se).unwrap());
    assert!(idx.is_service_entry_host("a.example.com"));
    assert!(idx.is_service_entry_host("x.y.w.io"));
    assert!(!idx.is_service_entry_host("w.io"));
    assert!(!idx.is_service_entry_host("b.example.com"));
    idx.remove_service_entry(&ObjectKey::new("n", "e"));
    assert!(!idx.is_service_entry_host("a.example.com"));
}

#[test]
fn delegate_cycles_terminate() {
    let mut idx = ClusterIndex::new("cluster.local");
    idx.apply_virtual_service(vs(
        "metadata: {name: a, namespace: n}\nspec: {hosts: [a], http: [{delegate: {name: b}}]}",
    ));
    idx.apply_virtual_service(vs("metadata: {name: b, namespace: n}\nspec: {http: [{delegate: {name: a}}, {route: [{destination: {host: x}}]}]}"));
    assert_eq!(
        idx.destinations("a.n.svc.cluster.local", "n"),
        ["x.n.svc.cluster.local".to_string()].into()
    );
}

/// One change to the index, over a small universe of names so that changes collide.
#[derive(Clone, Debug)]
enum Op {
    Service {
        key: (u8, u8),
        labels: u8,
        selector: Option<u8>,
        vip: bool,
    },
    RemoveService((u8, u8)),
    Pod {
        key: (u8, u8),
        labels: u8,
        ip: u8,
        host_network: bool,
    },
    RemovePod((u8, u8)),
    VirtualService {
        key: (u8, u8),
        hosts: u8,
        delegate: Option<(u8, u8)>,
    },
    RemoveVirtualService((u8, u8)),
    ServiceEntry {
        key: (u8, u8),
        hosts: u8,
    },
    RemoveServiceEntry((u8, u8)),
    WorkloadLabel(bool),
}

fn key_of(k: (u8, u8)) -> ObjectKey {
    ObjectKey::new(format!("ns{}", k.0), format!("n{}", k.1))
}

/// The labels of the bits of `bits` among three.
fn labels_of(bits: u8) -> Labels {
    (0..3)
        .filter(|i| bits & (1 << i) != 0)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect()
}

fn hosts_of(bits: u8) -> Vec<String> {
    [
        "a.ns0.svc.cluster.local",
        "b.ns1.svc.cluster.local",
        "*.svc.cluster.local",
        "*.example.com",
    ]
    .into_iter()
    .enumerate()
    .filter(|(i, _)| bits & (1 << i) != 0)
    .map(|(_, h)| h.to_string())
    .collect()
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    let key = (0u8..2, 0u8..3);
    prop_oneof![
        (key.clone(), 0u8..8, proptest::option::of(1u8..8), any::<bool>()).prop_map(
            |(key, labels, selector, vip)| Op::Service {
                key,
                labels,
                selector,
                vip
            }
        ),
        key.clone().prop_map(Op::RemoveService),
        (key.clone(), 0u8..8, 0u8..3, any::<bool>()).prop_map(|(key, labels, ip, host_network)| Op::Pod {
            key,
            labels,
            ip,
            host_network
        }),
        key.clone().prop_map(Op::RemovePod),
        (key.clone(), 0u8..16, proptest::option::of(key.clone()))
            .prop_map(|(key, hosts, delegate)| Op::VirtualService { key, hosts, delegate }),
        key.clone().prop_map(Op::RemoveVirtualService),
        (key.clone(), 0u8..16).prop_map(|(key, hosts)| Op::ServiceEntry { key, hosts }),
        key.prop_map(Op::RemoveServiceEntry),
        any::<bool>().prop_map(Op::WorkloadLabel),
    ]
}

fn run(idx: &mut ClusterIndex, op: Op) {
    match op {
        Op::Service {
            key,
            labels,
            selector,
            vip,
        } => idx.apply_service(ServiceInfo {
            key: key_of(key),
            labels: labels_of(labels),
            selector: selector.map(labels_of),
            ports: vec![],
            // One address per Service: the API server never gives two Services the same one.
            cluster_ips: vip
                .then(|| format!("10.0.{}.{}", key.0, key.1))
                .into_iter()
                .collect(),
        }),
        Op::RemoveService(key) => drop(idx.remove_service(&key_of(key))),
        Op::Pod {
            key,
            labels,
            ip,
            host_network,
        } => idx.apply_pod(PodInfo {
            key: key_of(key),
            labels: labels_of(labels),
            ips: vec![format!("10.1.0.{ip}").parse().unwrap()],
            host_network,
            service_account: "default".into(),
        }),
        Op::RemovePod(key) => drop(idx.remove_pod(&key_of(key))),
        Op::VirtualService { key, hosts, delegate } => idx.apply_virtual_service(VirtualServiceInfo {
            key: key_of(key),
            hosts: hosts_of(hosts),
            applies_to_mesh: true,
            export_to: ExportTo::All,
            destinations: hosts_of(hosts >> 1).into_iter().collect(),
            delegates: delegate.map(key_of).into_iter().collect(),
        }),
        Op::RemoveVirtualService(key) => drop(idx.remove_virtual_service(&key_of(key))),
        Op::ServiceEntry { key, hosts } => idx.apply_service_entry(ServiceEntryInfo {
            key: key_of(key),
            hosts: hosts_of(hosts),
            addresses: vec![],
            ports: vec![],
            export_to: ExportTo::All,
        }),
        Op::RemoveServiceEntry(key) => drop(idx.remove_service_entry(&key_of(key))),
        Op::WorkloadLabel(on) => idx.set_workload_label(on.then(|| FenceLabelKey {
            key: "k0".into(),
            alias: "app".into(),
        })),
    }
}

proptest::proptest! {
    /// Every table's lookups equal those rebuilt from its objects alone, and every pod's fences
    /// equal those computed from scratch, whatever the sequence of changes.
    #[test]
    fn lookups_equal_a_rebuild_after_any_changes(ops in proptest::collection::vec(op(), 0..60)) {
        let mut idx = ClusterIndex::new("cluster.local");
        for op in ops {
            run(&mut idx, op);
            let domain = idx.domain().to_string();
            let fqdn = |k: &ObjectKey| host::service_fqdn(&k.name, &k.namespace, &domain).into();
            proptest::prop_assert_eq!(&idx.services.rebuilt(fqdn), &idx.services);
            proptest::prop_assert_eq!(&idx.virtual_services.rebuilt(), &idx.virtual_services);
            proptest::prop_assert_eq!(&idx.service_entries.rebuilt(), &idx.service_entries);
            let mut pods = pods::Pods::default();
            for pod in idx.pods() {
                pods.insert(pod.clone(), vec![], None);
            }
            proptest::prop_assert_eq!(pods.lookups(), idx.pods.lookups());
            for pod in idx.pods() {
                let (mut fences, workload) = idx.fences_of(pod);
                fences.extend(workload);
                proptest::prop_assert_eq!(idx.pod_fences(&pod.key), fences.as_slice(), "{}", pod.key);
            }
        }
    }
}
