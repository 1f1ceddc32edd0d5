//! How istiod shapes a sidecar's config by the node's interception mode.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::protobuf::value::Kind;
use prost::Message;
use tonic::Status;

use super::Config;
use crate::xds::adjust::{pack, socket};
use crate::xds::{CLUSTER, LISTENER};

/// A node's interception mode, from node metadata `INTERCEPTION_MODE` (a string; istiod fails
/// the stream on a wrongly typed metadata value). Missing means iptables (`REDIRECT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interception {
    /// Traffic is redirected by iptables (`REDIRECT`, `TPROXY`).
    Redirect,
    /// `NONE`: no iptables; listeners bind their ports.
    None,
}

impl Interception {
    /// The stream's mode: read from the node on its first request, then remembered.
    pub(super) fn remember(mode: &mut Option<Self>, node: Option<&Node>) -> Result<Self, Status> {
        match *mode {
            Some(m) => Ok(m),
            None => Ok(*mode.insert(Self::of(node)?)),
        }
    }

    fn of(node: Option<&Node>) -> Result<Self, Status> {
        let value = node
            .and_then(|n| n.metadata.as_ref())
            .and_then(|m| m.fields.get("INTERCEPTION_MODE"));
        match value.map(|v| &v.kind) {
            None => Ok(Self::Redirect),
            Some(Some(Kind::StringValue(mode))) if mode == "NONE" => Ok(Self::None),
            Some(Some(Kind::StringValue(_))) => Ok(Self::Redirect),
            Some(other) => Err(Status::invalid_argument(format!(
                "failed to parse node metadata: INTERCEPTION_MODE is not a string: {other:?}"
            ))),
        }
    }
}

/// How istiod 1.14 changes a sidecar's listeners and clusters for a node in interception mode
/// `NONE` (the global-sidecar), starting from what an iptables sidecar gets (the served config,
/// as it is to any other node):
///
/// - outbound HTTP listeners `0.0.0.0_<port>` (`bind_to_port: false`) become `127.0.0.1_<port>`,
///   bound on 127.0.0.1 (on the port `outbound_binds` gives: tests cannot bind 9080); other
///   outbound listeners are left as they are;
/// - no `virtualOutbound` / `virtualInbound` (they exist only for iptables);
/// - once the proxy's own Pod and Service exist, for each of the Service's target ports an
///   inbound listener `0.0.0.0_<port>` bound on 0.0.0.0 and a STATIC cluster `inbound|<port>||`
///   pointing at the application on 127.0.0.1: `own_service`, as istiod renders them.
#[derive(Clone, Debug, Default)]
pub struct SidecarShape {
    /// Outbound HTTP port -> the port its NONE-mode listener binds.
    pub outbound_binds: BTreeMap<u64, u16>,
    /// The inbound listeners and clusters of the proxy's own Service (empty: no Pod or Service
    /// yet), added to the others.
    pub own_service: Config,
}

impl SidecarShape {
    /// The resources of a type for a node in `mode`, when they differ from the served ones.
    pub(super) fn shape(
        &self,
        type_url: &str,
        served: Option<&BTreeMap<String, Any>>,
        mode: Interception,
    ) -> Option<BTreeMap<String, Any>> {
        if mode != Interception::None || (type_url != LISTENER && type_url != CLUSTER) {
            return None;
        }
        let mut out = BTreeMap::new();
        for (name, resource) in served.into_iter().flatten() {
            if type_url == LISTENER {
                if name == "virtualOutbound" || name == "virtualInbound" {
                    continue;
                }
                if let Some(bound) = self.bound(name, resource) {
                    out.insert(bound.name.clone(), pack(&bound));
                    continue;
                }
            }
            out.insert(name.clone(), resource.clone());
        }
        let own = self.own_service.get(type_url).into_iter().flatten();
        out.extend(own.map(|(n, a)| (n.clone(), a.clone())));
        Some(out)
    }

    /// An outbound listener `0.0.0.0_<port>` rebound as `outbound_binds` says; `None` for any
    /// other listener (or one that does not decode: served as it is).
    fn bound(&self, name: &str, listener: &Any) -> Option<Listener> {
        let port = name.strip_prefix("0.0.0.0_")?.parse::<u64>().ok()?;
        let bind = self.outbound_binds.get(&port)?;
        let mut l = Listener::decode(&*listener.value).ok()?;
        l.name = format!("127.0.0.1_{port}");
        l.address = Some(socket("127.0.0.1", u32::from(*bind)));
        l.bind_to_port = None;
        Some(l)
    }
}
