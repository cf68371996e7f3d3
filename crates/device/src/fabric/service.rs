// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The host's service table (SVC_BIND, SVC_RESOLVE; docs/spec.md §6.8.10): a service number
//! names one open endpoint of this host, as a port names a socket on an IP host, so that a
//! consumer that knows only a host and a service reaches the endpoint bound to it.
//!
//! The table is a leaf lock: it is never held while a device lock is taken. An entry whose
//! endpoint closed is dropped by EP_CLOSE and device teardown ([`Fabric::release_services`]);
//! lookups also treat an entry naming a closed endpoint as free, which covers a close racing
//! with a bind.

use std::collections::HashMap;
use std::net::ToSocketAddrs;

use vfabric_proto::caps::HostAddrEntry;
use vfabric_proto::{service, FabricAddr, Status};

use super::{Fabric, Notify, Port};
use crate::chain::{completion, Req};

/// Service number → endpoint address (and the endpoint's EP_OPEN type).
#[derive(Default)]
pub(crate) struct Services {
    by_service: HashMap<u16, (FabricAddr, u64)>,
}

/// The IP addresses of each host's uplink (this host's `listen`, each peer's address), as
/// QUERY_CAPS `HOST_ADDRS` reports them so that a driver maps a host address to a host id.
/// Names are resolved once, at start; one that does not resolve is left out (and logged).
pub(crate) fn host_addrs(config: &crate::config::Config) -> Vec<HostAddrEntry> {
    let Some(up) = &config.uplink else {
        return Vec::new();
    };
    let mut out: Vec<HostAddrEntry> = Vec::new();
    let hosts = std::iter::once((config.host_id, up.listen.as_str()))
        .chain(up.peers.iter().map(|(id, a)| (*id, a.as_str())));
    for (host_id, addr) in hosts {
        let Ok((host, _)) = crate::uplink::split_addr(addr) else {
            continue;
        };
        match (host.as_str(), 0u16).to_socket_addrs() {
            Ok(ips) => {
                for ip in ips.map(|a| a.ip()) {
                    if !ip.is_unspecified() && !out.iter().any(|e| e.addr == ip) {
                        out.push(HostAddrEntry { host_id, addr: ip });
                    }
                }
            }
            Err(e) => tracing::warn!(host_id, addr, %e, "host address does not resolve"),
        }
    }
    out
}

impl Fabric {
    /// IP addresses naming hosts of the fabric (QUERY_CAPS `HOST_ADDRS`).
    pub(super) fn host_addrs(&self) -> &[HostAddrEntry] {
        &self.host_addrs
    }

    fn services(&self) -> std::sync::MutexGuard<'_, Services> {
        self.services.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// SVC_BIND: bind service `data` (0: any free ephemeral service) to endpoint `ep`.
    pub(super) fn op_svc_bind(&self, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        let wanted = req.req.data;
        if wanted > service::MAX {
            return self.fail(dev, port, &req, Status::Invalid, n);
        }
        let Some((generation, kind)) = self.ep_info(dev, req.req.ep) else {
            return self.fail(dev, port, &req, Status::BadEndpoint, n);
        };
        let me = FabricAddr::new(self.node_addr(dev), req.req.ep, generation);
        let status = self.bind_service(me, kind, wanted as u16);
        match status {
            Ok(svc) => {
                let mut c = completion(Status::Ok, req.req.cookie);
                c.data = u64::from(svc).into();
                c.src = me.to_wire();
                self.done(dev, port, &req, &c, 0, n);
            }
            Err(s) => self.fail(dev, port, &req, s, n),
        }
    }

    /// Bind `svc` (0: the first free ephemeral one) to `me`; the service bound.
    fn bind_service(&self, me: FabricAddr, kind: u64, svc: u16) -> Result<u16, Status> {
        // Liveness is checked outside the table's lock (it takes device locks).
        let stale: Vec<(u16, FabricAddr)> = self
            .services()
            .by_service
            .iter()
            .map(|(s, (a, _))| (*s, *a))
            .collect();
        let dead: Vec<(u16, FabricAddr)> = stale
            .into_iter()
            .filter(|(_, a)| !self.addr_live(*a))
            .collect();
        let mut t = self.services();
        for (s, a) in dead {
            if t.by_service.get(&s).is_some_and(|(b, _)| *b == a) {
                t.by_service.remove(&s);
            }
        }
        if let Some((&have, _)) = t.by_service.iter().find(|(_, (a, _))| *a == me) {
            // One service per endpoint; binding the one it has again is harmless.
            return if have == svc || svc == 0 {
                Ok(have)
            } else {
                Err(Status::Invalid)
            };
        }
        let svc = if svc == 0 {
            (service::EPHEMERAL_FIRST..=u16::MAX)
                .find(|s| !t.by_service.contains_key(s))
                .ok_or(Status::NoResources)?
        } else {
            svc
        };
        if t.by_service.contains_key(&svc) {
            return Err(Status::AddrInUse);
        }
        t.by_service.insert(svc, (me, kind));
        Ok(svc)
    }

    /// SVC_RESOLVE: the endpoint bound to service `data` on the host `peer.node` names.
    pub(super) fn op_svc_resolve(&self, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        let svc = req.req.data;
        if svc == 0 || svc > service::MAX {
            return self.fail(dev, port, &req, Status::Invalid, n);
        }
        let host = req.req.peer;
        if host.fabric() != self.fabric_id {
            return self.fail(dev, port, &req, Status::AddrNotAvail, n);
        }
        if host.host() != self.host_id {
            // Services are resolved on their own host: an uplink peer is asked (its answer,
            // or HostUnreach, completes the request later); any other host is no host of
            // the fabric.
            if !self.outbox.is_peer(host.host()) {
                return self.fail(dev, port, &req, Status::AddrNotAvail, n);
            }
            let r = crate::uplink::svc_resolve(host.host(), svc as u16, dev, port.clone(), req);
            self.outbox.push(r);
            return;
        }
        let found = self.lookup_service(svc as u16).ok_or(Status::AddrNotAvail);
        self.complete_svc_resolve(dev, port, &req, found, n);
    }

    /// The live endpoint bound to `svc` on this host, with its EP_OPEN type.
    pub(crate) fn lookup_service(&self, svc: u16) -> Option<(FabricAddr, u64)> {
        let found = self.services().by_service.get(&svc).copied();
        found.filter(|(addr, _)| self.addr_live(*addr))
    }

    /// Complete SVC_RESOLVE `req` with the endpoint found (and its type) or a status.
    pub(crate) fn complete_svc_resolve(
        &self,
        dev: usize,
        port: &Port,
        req: &Req,
        found: Result<(FabricAddr, u64), Status>,
        n: &mut Notify,
    ) {
        match found {
            Ok((addr, kind)) => {
                let mut c = completion(Status::Ok, req.req.cookie);
                c.src = addr.to_wire();
                c.data = kind.into();
                self.done(dev, port, req, &c, 0, n);
            }
            Err(s) => self.fail(dev, port, req, s, n),
        }
    }

    /// Endpoints `gone` says are closed give up their services.
    pub(super) fn release_services(&self, gone: impl Fn(FabricAddr) -> bool) {
        self.services().by_service.retain(|_, (a, _)| !gone(*a));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_addrs_name_every_uplink() {
        let mut c = crate::config::Config::new(vec!["/t0".into()]);
        assert!(host_addrs(&c).is_empty(), "one host: none");
        c.host_id = 1;
        let mut up = crate::uplink::UplinkConfig::new("tcp", "127.0.0.1:9229");
        up.peers = vec![
            (2, "127.0.0.2".into()),
            (3, "[::1]:9229".into()),
            (4, "no-such-host.invalid".into()),
        ];
        c.uplink = Some(up);
        let a = host_addrs(&c);
        let has = |id: u16, ip: &str| {
            a.iter()
                .any(|e| e.host_id == id && e.addr == ip.parse::<std::net::IpAddr>().unwrap())
        };
        assert!(
            has(1, "127.0.0.1") && has(2, "127.0.0.2") && has(3, "::1"),
            "{a:?}"
        );
        assert!(
            a.iter().all(|e| e.host_id != 4),
            "unresolvable names are left out"
        );
        // The QUERY_CAPS encoding round-trips; a bad family or length is refused.
        let mut v = Vec::new();
        for e in &a {
            e.encode(&mut v);
        }
        assert_eq!(HostAddrEntry::decode_all(&v).unwrap(), a);
        assert!(HostAddrEntry::decode_all(&v[..v.len() - 1]).is_none());
        v[2] = 5;
        assert!(HostAddrEntry::decode_all(&v).is_none());
    }
}
