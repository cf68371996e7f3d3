// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Messages across hosts, the fabric's side. A send to another host's address copies the
//! guest's bytes out and hands the request to the uplink ([`Outbox`]); it completes when that
//! host's daemon answers (TRANSMIT_COMPLETE: accepted by the remote device). A message that
//! arrives from another host is matched here exactly as a local eager send would be (posted
//! receive, else the unexpected queue within its bound, else held until a receive matches),
//! and the verdict goes back to its sender.
//!
//! [`Outbox`]: crate::uplink::remote::Outbox

use std::sync::atomic::Ordering;

use vfabric_proto::{ep_open, flags, FabricAddr, Opcode, Status};
use vm_memory::GuestAddressSpace;

use super::matching::take_posted;
use super::{eager_cost, Body, Fabric, Meta, Msg, Notify, Port};
use crate::chain::Req;
use crate::stats::Counters;
use crate::uplink::remote::{Outbound, RemoteSend};
use crate::uplink::wire::{self, data_flags};

/// The `src_dev` of queued messages from another host (no local device sent them).
const REMOTE_SRC_DEV: usize = usize::MAX;

/// A message from another host waiting in an unexpected queue for a receive.
pub(crate) struct HeldRemote {
    host: u16,
    req_id: u64,
    pub bytes: Vec<u8>,
}

/// A whole message from another host, as the uplink reassembled it (its description checked
/// by the wire parser; addresses and limits are checked here).
pub(crate) struct Incoming {
    pub host: u16,
    pub req_id: u64,
    pub desc: wire::Data,
    pub bytes: Vec<u8>,
}

impl Fabric {
    /// The remote seam of [`Fabric::op_send`]: `req` names no device of this host.
    pub(super) fn send_remote(
        &self,
        dev: usize,
        port: &Port,
        req: Req,
        sgen: u32,
        skind: u64,
        n: &mut Notify,
    ) {
        let r = req.req;
        let to = r.peer;
        if to.fabric() != self.fabric_id || to.host() == self.host_id {
            return self.fail(dev, port, &req, Status::AddrNotAvail, n);
        }
        let len = req.payload.len;
        if len > self.limits.max_msg_size {
            return self.fail(dev, port, &req, Status::TooLarge, n);
        }
        if let Err(status) = self.outbox.reserve(to.host(), len) {
            return self.fail(dev, port, &req, status, n);
        }
        let mut payload = vec![0u8; len as usize];
        if req
            .payload
            .read_at(&port.mem.memory(), 0, &mut payload)
            .is_err()
        {
            self.outbox.finished(len);
            return self.fail(dev, port, &req, Status::Fault, n);
        }
        let mut wire_flags = 0;
        if r.flags & flags::REMOTE_CQ_DATA != 0 {
            wire_flags |= data_flags::REMOTE_CQ_DATA;
        }
        if r.flags & flags::DELIVERY_COMPLETE != 0 {
            wire_flags |= data_flags::DELIVERY_COMPLETE;
        }
        let desc = wire::Data {
            req_id: 0.into(),
            total_len: len.into(),
            offset: 0.into(),
            tag: r.tag.into(),
            data: if wire_flags & data_flags::REMOTE_CQ_DATA != 0 {
                r.data
            } else {
                0
            }
            .into(),
            src_ep: r.ep.into(),
            src_gen: sgen.into(),
            dst_ep: to.ep.into(),
            dst_gen: to.generation.into(),
            src_dev: (dev as u16).into(),
            dst_dev: to.device().into(),
            opcode: (r.opcode as u16).into(),
            ep_kind: (skind as u16).into(),
            flags: wire_flags.into(),
            reserved: 0.into(),
        };
        self.outbox.push(Outbound::Send(Box::new(RemoteSend {
            host: to.host(),
            dev,
            port: port.clone(),
            req,
            desc,
            payload,
        })));
    }

    /// Complete a send to another host with the verdict its daemon sent back (or
    /// `HostUnreach` when that host went away first).
    pub(crate) fn complete_remote(
        &self,
        dev: usize,
        port: &Port,
        req: &Req,
        len: u64,
        status: Status,
        n: &mut Notify,
    ) {
        if status == Status::Ok {
            self.sent(dev, port, req, len, n);
        } else {
            self.fail(dev, port, req, status, n);
        }
    }

    /// Most bytes of messages from other hosts held in unexpected queues at once.
    fn remote_held_limit(&self) -> u64 {
        self.limits
            .max_unexpected_bytes
            .saturating_mul(16)
            .max(self.limits.max_msg_size)
    }

    /// Match a message from another host at its destination endpoint. Returns the verdict for
    /// its sender, or `None` when the message is held (the verdict follows through the outbox
    /// when a receive takes it, or its endpoint closes).
    pub(crate) fn accept_remote(&self, m: Incoming, n: &mut Notify) -> Option<Status> {
        let desc = m.desc;
        let ddev = usize::from(u16::from(desc.dst_dev));
        if ddev >= self.devs.len() {
            return Some(Status::AddrNotAvail);
        }
        let (dep, dgen) = (u32::from(desc.dst_ep) as usize, u32::from(desc.dst_gen));
        let kind = u64::from(u16::from(desc.ep_kind));
        let wire_flags = u32::from(desc.flags);
        let len = m.bytes.len() as u64;
        if len > self.limits.max_msg_size {
            return Some(Status::TooLarge);
        }
        let tagged = u16::from(desc.opcode) == Opcode::TSend as u16;
        let meta = Meta {
            src: FabricAddr::new(
                FabricAddr::node_of(self.fabric_id, m.host, desc.src_dev.into()),
                desc.src_ep.into(),
                desc.src_gen.into(),
            ),
            tagged,
            tag: desc.tag.into(),
            cq_data: (wire_flags & data_flags::REMOTE_CQ_DATA != 0).then_some(desc.data.into()),
            len,
            rma_len: None,
        };
        let delivery_complete = wire_flags & data_flags::DELIVERY_COMPLETE != 0;
        if delivery_complete && kind == ep_open::TYPE_DGRAM {
            return Some(Status::Invalid);
        }
        loop {
            let mut d = self.dev(ddev);
            let Some(dport) = d.port.clone() else {
                return Some(Status::AddrNotAvail);
            };
            match d.live_ep(dep, dgen) {
                Some(dst) if dst.kind == kind => {}
                _ => return Some(Status::AddrNotAvail),
            }
            if let Some((_, rv)) = take_posted(&mut d, dep, &meta) {
                drop(d);
                let placed = len.min(rv.data.len);
                let bytes = &m.bytes[..placed as usize];
                if rv.data.write_at(&dport.mem.memory(), 0, bytes).is_err() {
                    // The receiver's memory faulted (its receive failed): match the next one.
                    self.fail(ddev, &dport, &rv, Status::Fault, n);
                    continue;
                }
                self.received(ddev, &dport, &rv, &meta, placed, n);
                return Some(Status::Ok);
            }
            if kind == ep_open::TYPE_DGRAM {
                drop(d);
                if let Some(c) = self.counters.get(ddev) {
                    Counters::inc(&c.dgram_drops);
                }
                return Some(Status::Ok);
            }
            let cost = eager_cost(len);
            let eager = len <= self.limits.eager_threshold
                && !delivery_complete
                && d.unexpected_bytes.saturating_add(cost) <= self.limits.max_unexpected_bytes;
            let body = if eager {
                d.unexpected_bytes += cost;
                Body::Eager(m.bytes)
            } else {
                // Held here, its sender waiting for the verdict: backpressure without loss,
                // bounded so that a peer cannot fill this daemon's memory.
                let held = self.remote_held_bytes.load(Ordering::Acquire);
                if held.saturating_add(len) > self.remote_held_limit() {
                    return Some(Status::NoResources);
                }
                self.remote_held_bytes.fetch_add(len, Ordering::AcqRel);
                Body::Remote(HeldRemote {
                    host: m.host,
                    req_id: m.req_id,
                    bytes: m.bytes,
                })
            };
            if let Some(e) = d.ep_mut(dep) {
                e.unexpected.push_back(Msg {
                    meta,
                    src_dev: REMOTE_SRC_DEV,
                    claimed: None,
                    body,
                });
            }
            return if eager { Some(Status::Ok) } else { None };
        }
    }

    /// A held message from another host left its queue: its sender learns `status`.
    pub(super) fn reply_remote(&self, held: HeldRemote, status: Status) {
        self.remote_held_bytes
            .fetch_sub(held.bytes.len() as u64, Ordering::AcqRel);
        self.outbox.push(Outbound::Reply {
            host: held.host,
            req_id: held.req_id,
            status,
        });
    }

    /// Host `host` went away (or restarted): its held messages are dropped without a verdict
    /// (their senders already completed `HostUnreach`). Returns how many.
    pub(crate) fn purge_remote(&self, host: u16) -> usize {
        let mut dropped = 0;
        for dev in 0..self.devs.len() {
            let mut d = self.dev(dev);
            for slot in d.eps.iter_mut() {
                let Some(e) = slot.ep.as_mut() else { continue };
                e.unexpected.retain(|m| match &m.body {
                    Body::Remote(h) if h.host == host => {
                        self.remote_held_bytes
                            .fetch_sub(h.bytes.len() as u64, Ordering::AcqRel);
                        dropped += 1;
                        false
                    }
                    _ => true,
                });
            }
        }
        dropped
    }
}
