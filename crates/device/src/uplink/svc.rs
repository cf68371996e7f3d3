// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Services of other hosts (SVC_RESOLVE, docs/spec.md §6.8.10): a guest's SVC_RESOLVE for a
//! host that is an uplink peer goes out as SVC_QUERY; the peer looks the service up in its own
//! table and answers SVC_ANSWER, with which the guest's request completes. A query unanswered
//! within the peer timeout (at most 5 s), or to a peer that is (or goes) down, completes
//! `HostUnreach`.
//!
//! ```text
//! host A: SVC_RESOLVE(host B, 9228) ─▶ uplink A ── SVC_QUERY{req_id, 9228} ──▶ uplink B
//!                                                                            table of B
//!         completion(src = B's ep) ◀─ uplink A ◀─ SVC_ANSWER{req_id, status, dev, ep, gen, type}
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use vfabric_proto::{ep_open, ByteValued, FabricAddr, Le16, Le32, Le64, Status};

use super::wire::{Message, WireError};
use super::{Outgoing, Stale, Worker};
use crate::chain::Req;
use crate::fabric::Port;

/// Longest wait for an answer (the peer timeout, if shorter): well inside the driver's control
/// timeout (10 s), so the guest hears HostUnreach rather than giving up on the request.
const MAX_WAIT: Duration = Duration::from_secs(5);

/// Body of SVC_QUERY: 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcQuery {
    /// The asker's id of this query, echoed by the answer.
    pub req_id: Le64,
    /// 1..=65535.
    pub service: Le16,
    pub reserved0: Le16,
    pub reserved1: Le32,
}
// SAFETY: plain-old-data, repr(C), no padding (16 bytes).
unsafe impl ByteValued for SvcQuery {}

/// Body of SVC_ANSWER: 24 bytes. With `status` OK, the endpoint bound to the service is
/// endpoint `ep` (generation `generation`) of device `dev` of the answering host, opened
/// with type `ep_type`; with `AddrNotAvail` nothing is bound to it (and the rest is zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcAnswer {
    pub req_id: Le64,
    /// A `vfabric_proto::Status`: `Ok` or `AddrNotAvail`.
    pub status: Le32,
    pub ep: Le32,
    pub generation: Le32,
    pub dev: Le16,
    /// `ep_open::TYPE_*`.
    pub ep_type: Le16,
}
// SAFETY: plain-old-data, repr(C), no padding (24 bytes, every field naturally aligned).
unsafe impl ByteValued for SvcAnswer {}

pub const QUERY_LEN: usize = std::mem::size_of::<SvcQuery>();
pub const ANSWER_LEN: usize = std::mem::size_of::<SvcAnswer>();

/// Parse the body of an SVC_QUERY.
pub(super) fn parse_query(body: &[u8]) -> Result<(u64, u16), WireError> {
    let q = SvcQuery::from_slice(body)
        .filter(|_| body.len() == QUERY_LEN)
        .ok_or(WireError::Length {
            field: QUERY_LEN as u32,
            got: body.len(),
        })?;
    if u16::from(q.reserved0) != 0 || u32::from(q.reserved1) != 0 {
        return Err(WireError::Reserved);
    }
    let service = u16::from(q.service);
    if service == 0 {
        return Err(WireError::Service);
    }
    Ok((q.req_id.into(), service))
}

/// Parse the body of an SVC_ANSWER: (request id, the endpoint or the status).
pub(super) fn parse_answer(body: &[u8]) -> Result<(u64, Result<Found, Status>), WireError> {
    let a = SvcAnswer::from_slice(body)
        .filter(|_| body.len() == ANSWER_LEN)
        .ok_or(WireError::Length {
            field: ANSWER_LEN as u32,
            got: body.len(),
        })?;
    let raw = u32::from(a.status);
    let req_id = u64::from(a.req_id);
    match Status::from_u32(raw) {
        Some(Status::Ok) => {
            let ep_type = u16::from(a.ep_type);
            if !matches!(
                u64::from(ep_type),
                ep_open::TYPE_RDM | ep_open::TYPE_DGRAM | ep_open::TYPE_MSG
            ) {
                return Err(WireError::EpKind(ep_type));
            }
            Ok((
                req_id,
                Ok(Found {
                    dev: a.dev.into(),
                    ep: a.ep.into(),
                    generation: a.generation.into(),
                    ep_type,
                }),
            ))
        }
        Some(Status::AddrNotAvail) => {
            if u32::from(a.ep) != 0
                || u32::from(a.generation) != 0
                || u16::from(a.dev) != 0
                || u16::from(a.ep_type) != 0
            {
                return Err(WireError::Reserved);
            }
            Ok((req_id, Err(Status::AddrNotAvail)))
        }
        _ => Err(WireError::Status(raw)),
    }
}

/// The body of an SVC_ANSWER.
pub(super) fn answer_body(req_id: u64, found: &Result<Found, Status>) -> SvcAnswer {
    match found {
        Ok(f) => SvcAnswer {
            req_id: req_id.into(),
            status: (Status::Ok as u32).into(),
            ep: f.ep.into(),
            generation: f.generation.into(),
            dev: f.dev.into(),
            ep_type: f.ep_type.into(),
        },
        Err(_) => SvcAnswer {
            req_id: req_id.into(),
            status: (Status::AddrNotAvail as u32).into(),
            ..Default::default()
        },
    }
}

/// The endpoint a service names on the answering host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    pub dev: u16,
    pub ep: u32,
    pub generation: u32,
    pub ep_type: u16,
}

/// A guest's SVC_RESOLVE for a service of another host (from the fabric to the uplink).
pub(crate) struct Resolve {
    pub host: u16,
    pub service: u16,
    pub dev: usize,
    pub port: Port,
    pub req: Req,
}

/// A query sent and not answered yet.
struct Waiting {
    host: u16,
    dev: usize,
    port: Port,
    req: Req,
    deadline: Instant,
}

/// The uplink's queries in flight, by request id.
#[derive(Default)]
pub(super) struct Queries {
    waiting: HashMap<u64, Waiting>,
}

impl Worker {
    /// Send a guest's query (or fail it at once: the host is down or unknown).
    pub(super) fn svc_out(&mut self, r: Resolve) {
        let Some(dest) = self.dest_of(r.host) else {
            return self.svc_complete(r.dev, &r.port, &r.req, Err(Status::HostUnreach));
        };
        // From the outbox's counter: no request or query of another kind has it.
        let req_id = self.outbox.probe_id();
        let bytes = Message::SvcQuery {
            fabric_id: self.set.fabric_id,
            host_id: self.set.host_id,
            req_id,
            service: r.service,
        }
        .encode();
        self.backlog.push_back(Outgoing {
            host: r.host,
            dest,
            bytes,
            req_id: None,
        });
        self.svc.waiting.insert(
            req_id,
            Waiting {
                host: r.host,
                dev: r.dev,
                port: r.port,
                req: r.req,
                deadline: Instant::now() + self.set.timeout.min(MAX_WAIT),
            },
        );
    }

    /// An SVC_QUERY from `host` at `src`: answer from this host's table.
    pub(super) fn svc_query_in(
        &mut self,
        src: u64,
        fabric_id: u32,
        host_id: u16,
        req_id: u64,
        service: u16,
    ) {
        match self.introduced(src, fabric_id, host_id) {
            Ok(()) => {}
            Err(Stale::Down) => return debug!(host = host_id, "uplink: a stale query dropped"),
            Err(Stale::Refused(why)) => return warn!("uplink: refusing a query: {why}"),
        }
        let found = self
            .fabric
            .lookup_service(service)
            .map(|(a, ep_type)| Found {
                dev: a.device(),
                ep: a.ep,
                generation: a.generation,
                ep_type: ep_type as u16,
            })
            .ok_or(Status::AddrNotAvail);
        let bytes = Message::SvcAnswer {
            fabric_id: self.set.fabric_id,
            host_id: self.set.host_id,
            req_id,
            found,
        }
        .encode();
        self.backlog.push_back(Outgoing {
            host: host_id,
            dest: src,
            bytes,
            req_id: None,
        });
    }

    /// An SVC_ANSWER from `host`: the query it answers completes (only a query sent to that
    /// host, naming a device it has).
    pub(super) fn svc_answer_in(
        &mut self,
        src: u64,
        fabric_id: u32,
        host_id: u16,
        req_id: u64,
        found: Result<Found, Status>,
    ) {
        match self.introduced(src, fabric_id, host_id) {
            Ok(()) => {}
            Err(Stale::Down) => return debug!(host = host_id, "uplink: a stale answer dropped"),
            Err(Stale::Refused(why)) => return warn!("uplink: refusing an answer: {why}"),
        }
        if self
            .svc
            .waiting
            .get(&req_id)
            .is_none_or(|w| w.host != host_id)
        {
            return debug!(
                req_id,
                host = host_id,
                "uplink: an answer to no query of ours"
            );
        }
        let Some(w) = self.svc.waiting.remove(&req_id) else {
            return;
        };
        let devices = self
            .set
            .peers
            .iter()
            .find(|p| p.host_id == host_id)
            .map_or(0, |p| p.num_devices);
        let result = match found {
            Ok(f) if f.dev >= devices => {
                warn!(
                    host = host_id,
                    dev = f.dev,
                    "uplink: an answer naming no device of its host"
                );
                Err(Status::Invalid)
            }
            Ok(f) => Ok((
                FabricAddr::new(
                    FabricAddr::node_of(self.set.fabric_id, host_id, f.dev),
                    f.ep,
                    f.generation,
                ),
                u64::from(f.ep_type),
            )),
            Err(s) => Err(s),
        };
        self.svc_complete(w.dev, &w.port, &w.req, result);
    }

    /// Queries past their deadline, or to `lost` (down or restarted), or all (`None` for
    /// both: the uplink stops) complete `HostUnreach`.
    pub(super) fn svc_expire(&mut self, lost: Option<u16>, all: bool) {
        let now = Instant::now();
        let ids: Vec<u64> = self
            .svc
            .waiting
            .iter()
            .filter(|(_, w)| all || Some(w.host) == lost || w.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(w) = self.svc.waiting.remove(&id) {
                debug!(host = w.host, "uplink: a service query unanswered");
                self.svc_complete(w.dev, &w.port, &w.req, Err(Status::HostUnreach));
            }
        }
    }

    fn svc_complete(
        &mut self,
        dev: usize,
        port: &Port,
        req: &Req,
        r: Result<(FabricAddr, u64), Status>,
    ) {
        self.fabric
            .complete_svc_resolve(dev, port, req, r, &mut self.notify);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_answers_round_trip_and_bad_ones_are_refused() {
        let q = Message::SvcQuery {
            fabric_id: 0x5eed,
            host_id: 2,
            req_id: 77,
            service: 9228,
        };
        let b = q.encode();
        assert_eq!(b.len(), super::super::wire::HEADER_LEN + QUERY_LEN);
        assert_eq!(Message::parse(&b), Ok(q));
        let found = Found {
            dev: 1,
            ep: 5,
            generation: 3,
            ep_type: ep_open::TYPE_MSG as u16,
        };
        for found in [Ok(found), Err(Status::AddrNotAvail)] {
            let a = Message::SvcAnswer {
                fabric_id: 0x5eed,
                host_id: 2,
                req_id: 77,
                found,
            };
            let b = a.encode();
            assert_eq!(b.len(), super::super::wire::HEADER_LEN + ANSWER_LEN);
            assert_eq!(Message::parse(&b), Ok(a));
        }
        let h = super::super::wire::HEADER_LEN;
        // Service 0, reserved bits, a short body.
        let mut bad = q.encode();
        bad[h + 8] = 0;
        bad[h + 9] = 0;
        assert_eq!(Message::parse(&bad), Err(WireError::Service));
        let mut bad = q.encode();
        bad[h + 12] = 1;
        assert_eq!(Message::parse(&bad), Err(WireError::Reserved));
        let mut bad = q.encode();
        bad.pop();
        assert!(matches!(
            Message::parse(&bad),
            Err(WireError::Length { .. })
        ));
        // An answer with another status, an unknown endpoint type, or a refusal that names an
        // endpoint.
        let ok = Message::SvcAnswer {
            fabric_id: 1,
            host_id: 2,
            req_id: 3,
            found: Ok(found),
        }
        .encode();
        let mut bad = ok.clone();
        bad[h + 8] = Status::Invalid as u8;
        assert_eq!(
            Message::parse(&bad),
            Err(WireError::Status(Status::Invalid as u32))
        );
        let mut bad = ok.clone();
        bad[h + 22] = 9;
        assert_eq!(Message::parse(&bad), Err(WireError::EpKind(9)));
        let mut bad = ok;
        bad[h + 8] = Status::AddrNotAvail as u8;
        assert_eq!(Message::parse(&bad), Err(WireError::Reserved));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(0u8..=255, 0..64)) {
            let _ = parse_query(&body);
            let _ = parse_answer(&body);
        }
    }
}
