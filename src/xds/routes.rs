//! A1, A2 and A4 on encoded route configurations, incrementally.
//!
//! istiod resends a port's whole route configuration (a virtual host per service, megabytes at
//! 10,000 services) to every global-sidecar stream whenever one service changes. Here each
//! virtual host is adjusted once per distinct content, and the adjusted configuration is
//! spliced together from already-encoded pieces: a message's encoding is the concatenation of
//! its fields' encodings, so unchanged virtual hosts are copied, never decoded or re-encoded,
//! and A4's short-name virtual hosts are concatenations of per-service route chunks. Pieces are
//! shared by every stream and live as long as a stream still serves them ([`Pins`]).
//!
//! Anything unusual (an already adjusted configuration, several `*` virtual hosts, services on
//! different ports, bytes that do not parse) takes the from-scratch path of
//! [`Adjuster::route`], whose result this path must equal.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use prost::Message;

use super::adjust::{
    Adjuster, Counts, ensure_passthrough_catch_all, guarded_by_source_namespace, is_short_name_vhost,
    is_wildcard, passthrough_catch_all, short_name_vhost, strip_short_domains,
};
use super::cache::WeakTable;

/// Key of `RouteConfiguration.virtual_hosts` (field 2, length-delimited).
const VIRTUAL_HOSTS_KEY: u8 = 2 << 3 | 2;
/// Key of `VirtualHost.routes` (field 3, length-delimited).
const ROUTES_KEY: u8 = 3 << 3 | 2;

/// Adjusted virtual hosts and whole route configurations by content, shared by every stream of
/// the relay.
#[derive(Debug, Default)]
pub struct RouteCache {
    table: Mutex<WeakTable<Piece>>,
    configs: Mutex<WeakTable<Whole>>,
    hasher: foldhash::fast::RandomState,
}

/// An adjusted route configuration and the pieces it was made of: whoever serves the
/// configuration holds it, and what nobody holds leaves the cache.
#[derive(Clone, Debug, Default)]
pub struct Pins(Option<Arc<Whole>>);

impl Pins {
    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// The pieces held.
    pub fn pieces(&self) -> &[Arc<Piece>] {
        self.0.as_ref().map_or(&[], |w| &w.pieces)
    }
}

/// A route configuration as istiod sent it and as the relay sends it: a configuration that
/// did not change since another stream (or an earlier push) had it costs a lookup, not the
/// splicing of its virtual hosts again.
#[derive(Debug)]
pub struct Whole {
    cluster_domain: Box<str>,
    input: Box<[u8]>,
    output: Option<Bytes>,
    counts: Counts,
    pieces: Vec<Arc<Piece>>,
}

/// The pins of each resource a stream holds, by resource name.
#[derive(Debug, Default)]
pub struct PinsByName(HashMap<String, Pins>);

impl PinsByName {
    /// `name` is now served as made of `pins` (nothing: it holds nothing any more).
    pub fn hold(&mut self, name: &str, pins: Pins) {
        if !pins.is_empty() {
            self.0.insert(name.to_string(), pins);
        } else if !self.0.is_empty() {
            self.0.remove(name);
        }
    }

    /// Holds nothing.
    pub fn clear(&mut self) {
        self.0.clear();
    }
}

/// A route configuration after [`RouteCache::adjust`].
#[derive(Debug)]
pub struct AdjustedRoute {
    /// The new encoding, `None` when nothing changed (send istiod's bytes).
    pub encoded: Option<Bytes>,
    /// The pieces it was made of.
    pub pins: Pins,
}

/// One of istiod's virtual hosts, adjusted.
#[derive(Debug)]
pub struct Piece {
    cluster_domain: Box<str>,
    input: Box<[u8]>,
    /// A1 removed a route.
    a1_removed: bool,
    output: Output,
    /// Its name is one A4 gives (the configuration was adjusted already).
    short_name_vhost: bool,
    /// The `*` virtual host (after A1), which A2 adjusts with the whole configuration's view.
    wildcard: Option<VirtualHost>,
    service: Option<ServicePiece>,
}

#[derive(Debug)]
enum Output {
    /// No route left: the virtual host goes.
    Dropped,
    /// Send `input`.
    Same,
    /// Send this encoding.
    Changed(Box<[u8]>),
}

/// What a service's virtual host gives its short name's A4 virtual host.
#[derive(Debug)]
struct ServicePiece {
    short: String,
    port: String,
    /// The A4 virtual host's name and domains, encoded (its routes follow).
    head: Vec<u8>,
    /// Its routes guarded by its namespace, each encoded as a `VirtualHost.routes` field.
    guarded: Vec<u8>,
    /// Its routes unguarded, when istiod gave it the short name itself.
    own: Option<Vec<u8>>,
}

impl RouteCache {
    /// A1, A2, A4 on an encoded route configuration; `None` when the configuration must take
    /// the from-scratch path. Counts are added only when it succeeds.
    pub fn adjust(&self, adj: &Adjuster<'_>, encoded: &[u8], counts: &mut Counts) -> Option<AdjustedRoute> {
        let domain = adj.settings.cluster_domain.as_str();
        let key = self.key(domain, encoded);
        let whole = match self.known(key, domain, encoded) {
            Some(whole) => whole,
            None => {
                let whole = Arc::new(self.splice(adj, encoded)?);
                let mut configs = self.configs.lock().unwrap_or_else(|e| e.into_inner());
                configs.hold(key, &whole);
                whole
            }
        };
        for (what, n) in &whole.counts.0 {
            *counts.0.entry(what).or_default() += n;
        }
        Some(AdjustedRoute {
            encoded: whole.output.clone(),
            pins: Pins(Some(whole)),
        })
    }

    /// The configuration adjusted already, if a stream still holds it.
    fn known(&self, key: u64, domain: &str, encoded: &[u8]) -> Option<Arc<Whole>> {
        let configs = self.configs.lock().unwrap_or_else(|e| e.into_inner());
        configs.find(key, |w| *w.input == *encoded && *w.cluster_domain == *domain)
    }

    /// A1, A2, A4 spliced from the adjusted pieces of the virtual hosts; `None` when the
    /// configuration must take the from-scratch path.
    fn splice(&self, adj: &Adjuster<'_>, encoded: &[u8]) -> Option<Whole> {
        let (vhosts, rest) = split_virtual_hosts(encoded)?;
        // The other fields are small: decoding them checks them as the from-scratch path would.
        RouteConfiguration::decode(rest.as_slice()).ok()?;
        let pieces = self.pieces(adj, &vhosts)?;
        let kept: Vec<&Piece> = pieces
            .iter()
            .map(Arc::as_ref)
            .filter(|p| !matches!(p.output, Output::Dropped))
            .collect();
        let mut wildcards = kept.iter().enumerate().filter(|(_, p)| p.wildcard.is_some());
        let wildcard_at = wildcards.next().map(|(i, _)| i);
        let mut ports = kept.iter().filter_map(|p| p.service.as_ref()).map(|s| &s.port);
        let port = ports.next();
        let unusual = wildcards.next().is_some()
            || wildcard_at.is_some_and(|i| kept[i].service.is_some())
            || ports.any(|p| Some(p) != port)
            || (port.is_some() && kept.iter().any(|p| p.short_name_vhost));
        if unusual {
            return None;
        }

        let mut local = Counts::default();
        let mut changed = kept.len() != pieces.len();
        for _ in pieces.iter().filter(|p| p.a1_removed) {
            local.add("route_to_global_sidecar_removed");
            changed = true;
        }
        let mut out = rest;
        // Short-name virtual hosts repeat every route once more.
        out.reserve(2 * encoded.len());
        let at = wildcard_at.unwrap_or(kept.len());
        for p in &kept[..at] {
            put_virtual_host(&mut out, p.encoded());
        }
        if port.is_some() {
            put_short_name_vhosts(&mut out, &kept);
            local.add("short_name_vhost_added");
            changed = true;
        }
        for p in kept.iter().skip(at + 1) {
            put_virtual_host(&mut out, p.encoded());
        }
        let mut wildcard = RouteConfiguration {
            virtual_hosts: wildcard_at
                .and_then(|i| kept[i].wildcard.clone())
                .into_iter()
                .collect(),
            ..Default::default()
        };
        changed |= ensure_passthrough_catch_all(&mut wildcard, &mut local);
        for vh in &wildcard.virtual_hosts {
            put_virtual_host(&mut out, &vh.encode_to_vec());
        }
        Some(Whole {
            cluster_domain: adj.settings.cluster_domain.as_str().into(),
            input: encoded.into(),
            output: changed.then(|| out.into()),
            counts: local,
            pieces,
        })
    }

    /// The adjusted piece of every virtual host, from the cache or made now; `None` when one
    /// does not decode.
    fn pieces(&self, adj: &Adjuster<'_>, vhosts: &[&[u8]]) -> Option<Vec<Arc<Piece>>> {
        let domain = adj.settings.cluster_domain.as_str();
        let keys: Vec<u64> = vhosts.iter().map(|v| self.key(domain, v)).collect();
        let mut found: Vec<Option<Arc<Piece>>> = {
            let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            keys.iter()
                .zip(vhosts)
                .map(|(k, v)| table.find(*k, |p| *p.input == **v && *p.cluster_domain == *domain))
                .collect()
        };
        let mut made = Vec::new();
        for (i, slot) in found.iter_mut().enumerate() {
            if slot.is_none() {
                let piece = Arc::new(Piece::new(adj, vhosts[i])?);
                made.push((keys[i], piece.clone()));
                *slot = Some(piece);
            }
        }
        if !made.is_empty() {
            let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            for (key, piece) in made {
                table.hold(key, &piece);
            }
        }
        found.into_iter().collect()
    }

    /// The key of `bytes` (a virtual host or a whole configuration) under a cluster domain.
    fn key(&self, domain: &str, vhost: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        domain.hash(&mut h);
        vhost.hash(&mut h);
        h.finish()
    }

    /// Virtual hosts held (for tests of the bound).
    pub fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).live()
    }

    /// Whether no virtual host is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Piece {
    fn new(adj: &Adjuster<'_>, input: &[u8]) -> Option<Self> {
        let mut vh = VirtualHost::decode(input).ok()?;
        let a1_removed = adj.remove_routes_to_global_sidecar(&mut vh);
        let mut piece = Piece {
            cluster_domain: adj.settings.cluster_domain.as_str().into(),
            input: input.into(),
            a1_removed,
            output: Output::Dropped,
            short_name_vhost: is_short_name_vhost(&vh.name),
            wildcard: None,
            service: None,
        };
        if vh.routes.is_empty() {
            return Some(piece);
        }
        let service = adj
            .service_of(&vh.name)
            .map(|s| (s.name.to_string(), s.namespace.to_string(), s.port.to_string()));
        let mut had_short = false;
        if let Some((short, namespace, port)) = service {
            had_short = strip_short_domains(&mut vh, &short_name_vhost(&short, &port).domains);
            let mut guarded = Vec::new();
            for r in &vh.routes {
                put_route(&mut guarded, &guarded_by_source_namespace(r, &namespace));
            }
            let own = had_short.then(|| {
                let mut own = Vec::new();
                vh.routes.iter().for_each(|r| put_route(&mut own, r));
                own
            });
            let head = short_name_vhost(&short, &port).encode_to_vec();
            piece.service = Some(ServicePiece {
                short,
                port,
                head,
                guarded,
                own,
            });
        }
        piece.output = if a1_removed || had_short {
            Output::Changed(vh.encode_to_vec().into())
        } else {
            Output::Same
        };
        if is_wildcard(&vh) {
            piece.wildcard = Some(vh);
        }
        Some(piece)
    }

    fn encoded(&self) -> &[u8] {
        match &self.output {
            Output::Changed(bytes) => bytes,
            Output::Same | Output::Dropped => &self.input,
        }
    }
}

/// A4's virtual hosts, one per short name in name order, from the services' route chunks in
/// the order of their virtual hosts (all on one port, so any service's head serves).
fn put_short_name_vhosts(out: &mut Vec<u8>, kept: &[&Piece]) {
    let mut services: Vec<&ServicePiece> = kept.iter().filter_map(|p| p.service.as_ref()).collect();
    // Stable: a short name's services stay in the order of their virtual hosts.
    services.sort_by(|a, b| a.short.cmp(&b.short));
    let mut catch_all = Vec::new();
    put_route(&mut catch_all, &passthrough_catch_all());
    for group in services.chunk_by(|a, b| a.short == b.short) {
        let own = || group.iter().filter_map(|s| s.own.as_deref());
        let len = group[0].head.len()
            + group.iter().map(|s| s.guarded.len()).sum::<usize>()
            + own().map(<[u8]>::len).sum::<usize>()
            + catch_all.len();
        out.push(VIRTUAL_HOSTS_KEY);
        put_len(out, len);
        out.extend_from_slice(&group[0].head);
        group.iter().for_each(|s| out.extend_from_slice(&s.guarded));
        own().for_each(|chunk| out.extend_from_slice(chunk));
        out.extend_from_slice(&catch_all);
    }
}

fn put_virtual_host(out: &mut Vec<u8>, encoded: &[u8]) {
    out.push(VIRTUAL_HOSTS_KEY);
    put_len(out, encoded.len());
    out.extend_from_slice(encoded);
}

fn put_route(out: &mut Vec<u8>, route: &envoy_types::pb::envoy::config::route::v3::Route) {
    out.push(ROUTES_KEY);
    // Writing into a Vec cannot run out of room.
    let _ = route.encode_length_delimited(out);
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    // Writing a varint into a Vec cannot run out of room.
    let _ = prost::encode_length_delimiter(len, out);
}

/// The encoded virtual hosts of a route configuration, and its other fields as they were.
/// `None` when the bytes are not a well-formed message.
fn split_virtual_hosts(encoded: &[u8]) -> Option<(Vec<&[u8]>, Vec<u8>)> {
    let mut vhosts = Vec::new();
    let mut rest = Vec::new();
    let mut pos = 0;
    while pos < encoded.len() {
        let start = pos;
        let key = varint(encoded, &mut pos)?;
        let (field, wire_type) = (key >> 3, key & 7);
        if field == 0 {
            return None;
        }
        let payload_start;
        match wire_type {
            0 => {
                varint(encoded, &mut pos)?;
                payload_start = pos;
            }
            1 => {
                payload_start = pos;
                pos = pos.checked_add(8)?;
            }
            2 => {
                let len = usize::try_from(varint(encoded, &mut pos)?).ok()?;
                payload_start = pos;
                pos = pos.checked_add(len)?;
            }
            5 => {
                payload_start = pos;
                pos = pos.checked_add(4)?;
            }
            _ => return None, // groups: not in RouteConfiguration
        }
        let whole = encoded.get(start..pos)?;
        match (field, wire_type) {
            (2, 2) => vhosts.push(encoded.get(payload_start..pos)?),
            (2, _) => return None,
            _ => rest.extend_from_slice(whole),
        }
    }
    Some((vhosts, rest))
}

fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..70).step_by(7) {
        let byte = *buf.get(*pos)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f).checked_shl(shift)?;
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests;
