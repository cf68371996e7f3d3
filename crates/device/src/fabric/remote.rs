// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Requests across hosts, the fabric's side. A send, RMA or atomic request for another host's
//! address copies what must travel out of the guest's chain and hands the request to the
//! uplink ([`Outbox`]); it completes when that host's daemon answers (TRANSMIT_COMPLETE:
//! accepted by the remote device). A message that arrives from another host is matched here
//! exactly as a local eager send would be (posted receive, else the unexpected queue within its
//! bound, else held until a receive matches); an RMA or atomic request is checked and executed
//! as a local one; the verdict goes back to the initiator.
//!
//! [`Outbox`]: crate::uplink::remote::Outbox

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::debug;
use vfabric_proto::{
    atomic_op as aop, datatype as dt, ep_open, flags, mr_flags, ByteValued, FabricAddr, Opcode,
    RmaIov, Status, RMA_IOV_LEN, VIRTIO_FABRIC_F_REMOTE_CQ_DATA,
};
use vm_memory::GuestAddressSpace;

use super::atomic::{self, ATOMIC_TYPES, MAX_ATOMIC_COUNT};
use super::commit::CommitOrigin;
use super::matching::take_posted;
use super::pmem::FlushAt;
use super::{eager_cost, Body, Dev, Fabric, Meta, Msg, Notify, Port};
use crate::chain::{completion, Req};
use crate::stats::Counters;
use crate::uplink::rdv::RDV_THRESHOLD;
use crate::uplink::remote::{returns_bytes, send_payload, GuestBytes, Outbound, RemoteSend};
use crate::uplink::wire::{self, data_flags};

/// The `src_dev` of queued messages from another host (no local device sent them).
const REMOTE_SRC_DEV: usize = usize::MAX;

/// The checks of an atomic request every device applies (the local path's, in the same
/// order): the element size, or the status that refuses it.
fn atomic_check(opcode: Opcode, op: u8, ty: u8, count: u32) -> Result<usize, Status> {
    let size = dt::size(ty).ok_or(Status::Unsupported)?;
    if op >= aop::COUNT || ATOMIC_TYPES & (1 << ty) == 0 || !atomic::op_supported_for(op, ty) {
        return Err(Status::Unsupported);
    }
    if !aop::allowed(opcode, op) || count == 0 || count > MAX_ATOMIC_COUNT {
        return Err(Status::Invalid);
    }
    Ok(size)
}

/// A message from another host waiting in an unexpected queue for a receive: with its bytes,
/// or only a stub of it (its description; the bytes stay at its sender, whose request stays
/// outstanding until a receive here matches the stub and asks for them with PULL).
pub(crate) struct HeldRemote {
    host: u16,
    req_id: u64,
    /// `None`: a stub.
    pub bytes: Option<Vec<u8>>,
}

impl HeldRemote {
    pub fn is_stub(&self) -> bool {
        self.bytes.is_none()
    }

    /// Bytes it holds here (counted in `remote_held_bytes`).
    fn held_len(&self) -> u64 {
        self.bytes.as_ref().map_or(0, |b| b.len() as u64)
    }
}

/// A receive that matched the stub of `host`'s message `req_id`, waiting (at its endpoint)
/// for the bytes its sender sends again.
pub(super) struct Pulling {
    host: u16,
    req_id: u64,
    rreq: Req,
    meta: Meta,
}

impl Pulling {
    /// The virtqueue of its receive.
    pub(super) fn queue(&self) -> u16 {
        self.rreq.queue
    }

    /// Back to a stub (its receive was stopped), with the receive.
    pub(super) fn unpull(self) -> (Msg, Req) {
        let m = Msg {
            meta: self.meta,
            src_dev: REMOTE_SRC_DEV,
            claimed: None,
            body: Body::Remote(HeldRemote {
                host: self.host,
                req_id: self.req_id,
                bytes: None,
            }),
        };
        (m, self.rreq)
    }
}

/// The end of an uplink read that writes straight into a guest's receive buffer. Whoever
/// hands that receive back to its guest (completed, CANCELED, or forgotten with its rings)
/// waits for it first: the guest never sees its buffer returned while the wire may still
/// write it. Ended by the uplink when the read completes (successfully or not), when the
/// read's host is lost and its connection closed (no operation to it can write after
/// that), or when the uplink stops.
pub(crate) struct ReadFence {
    /// (ended, someone waits for the end)
    state: std::sync::Mutex<(bool, bool)>,
    cv: std::sync::Condvar,
    /// The message read (for the log).
    host: u16,
    req_id: u64,
}

impl ReadFence {
    fn new(host: u16, req_id: u64) -> Arc<Self> {
        Arc::new(ReadFence {
            state: std::sync::Mutex::new((false, false)),
            cv: std::sync::Condvar::new(),
            host,
            req_id,
        })
    }

    /// The read is over: nothing writes the buffer any more.
    pub(crate) fn end(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !st.0 && st.1 {
            tracing::info!(
                host = self.host,
                req_id = self.req_id,
                "uplink: a read into a closing receive ended"
            );
        }
        st.0 = true;
        self.cv.notify_all();
    }

    pub(crate) fn has_ended(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// Wait until the read is over. Bounded by the uplink: a read ends with its completion,
    /// or when its host is declared down (peer timeout) and the uplink closed the connection.
    fn wait(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.1 = true;
        let since = std::time::Instant::now();
        let mut warned = false;
        while !st.0 {
            let (g, _) = self
                .cv
                .wait_timeout(st, std::time::Duration::from_millis(500))
                .unwrap_or_else(|p| p.into_inner());
            st = g;
            if !warned && since.elapsed() > std::time::Duration::from_secs(5) {
                warned = true;
                tracing::warn!("a receive waits for an uplink read into its buffer for over 5 s");
            }
        }
    }
}

/// A receive that matched a rendezvous message of `host` (request `req_id`) before its bytes
/// were read: the uplink reads them straight into the receive's buffer, and the receive waits
/// here (at its endpoint) until the read is over.
pub(super) struct DirectRecv {
    host: u16,
    req_id: u64,
    rreq: Req,
    meta: Meta,
    fence: Arc<ReadFence>,
}

impl DirectRecv {
    /// The virtqueue of its receive.
    pub(super) fn queue(&self) -> u16 {
        self.rreq.queue
    }
}

/// Where the uplink reads a rendezvous message of `len` bytes: `bytes` (the first `len` bytes
/// of a receive's buffer or of an RMA write's targets, each range in one guest memory region),
/// for the receive of endpoint `ep` (generation `generation`) of `dev`.
pub(crate) struct DirectDest {
    /// The ranges, in order (`len` bytes in all); taken by the uplink for the read's
    /// registrations.
    pub bytes: Vec<GuestBytes>,
    pub len: usize,
    pub fence: Arc<ReadFence>,
    pub dev: usize,
    pub ep: usize,
    pub generation: u32,
    /// An RMA write's target (`None`: a receive's buffer).
    write: Option<DirectWrite>,
}

impl Drop for DirectDest {
    /// It goes only once its read is over (or was never posted): a receive waiting for it
    /// is free to go (a safety net; the uplink ends the fence when the read completes).
    fn drop(&mut self) {
        self.fence.end();
    }
}

/// An RMA write from another host read straight into its target regions: checked (key,
/// range, access) before the read; each region's deregistration waits for its `access`,
/// which lives until the write is done (the read over).
struct DirectWrite {
    targets: super::rma::Targets,
    src: FabricAddr,
    /// A REMOTE_CQ_DATA notification reserved for it (delivered once the bytes are there).
    notify: Option<Meta>,
    _access: Vec<super::rma::MrAccess>,
}

/// An RMA read from another host answered straight from its source: one range of one region
/// in guest memory, checked as [`Fabric::accept_remote_rma`] checks it, and the region entered
/// (its deregistration waits) until the uplink's write of the bytes is over or revoked.
pub(crate) struct DirectSource {
    /// Taken by the uplink to map the range.
    pub bytes: Option<GuestBytes>,
    pub len: usize,
    dev: usize,
    ep: usize,
    src: FabricAddr,
    targets: super::rma::Targets,
    access: Option<super::rma::MrAccess>,
}

impl DirectSource {
    /// The uplink no longer reads the region's pages (the write was revoked): its
    /// deregistration waits no more.
    pub(crate) fn release(&mut self) {
        self.access = None;
    }
}

/// Stubs of one host's messages held here at most (queued or being pulled): a sender has at
/// most this many requests out to other hosts in all, so a peer that keeps its own bound never
/// meets it; one that does not gets NoResources, not this daemon's memory.
const MAX_STUBS_PER_HOST: usize = crate::uplink::remote::MAX_INFLIGHT;

/// A whole message from another host, as the uplink reassembled it (its description checked
/// by the wire parser; addresses and limits are checked here).
pub(crate) struct Incoming {
    pub host: u16,
    pub req_id: u64,
    pub desc: wire::Data,
    pub bytes: Vec<u8>,
}

impl Fabric {
    /// The remote seam of [`Fabric::op_send`]: `req` names no device of this host. Kept out
    /// of line: the local path pays only the branch to it.
    #[cold]
    #[inline(never)]
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
        let key = (dev, r.ep, to.host());
        let Some((guest, payload)) = send_payload(port, &req.payload, len) else {
            return self.fail(dev, port, &req, Status::Fault, n);
        };
        // Only copied bytes count against the in-flight bound: bytes left in guest memory
        // cost this daemon nothing (a window of large sends waits for no one).
        let charged = payload.len() as u64;
        if let Err(status) = self.outbox.reserve(key, charged) {
            return self.fail(dev, port, &req, status, n);
        }
        let mut wire_flags = 0;
        if r.flags & flags::REMOTE_CQ_DATA != 0 {
            wire_flags |= data_flags::REMOTE_CQ_DATA;
        }
        if r.flags & flags::DELIVERY_COMPLETE != 0 {
            wire_flags |= data_flags::DELIVERY_COMPLETE;
        }
        let mut desc = describe(&r, dev, sgen, to, len);
        desc.tag = r.tag.into();
        if wire_flags & data_flags::REMOTE_CQ_DATA != 0 {
            desc.data = r.data.into();
        }
        desc.ep_kind = (skind as u16).into();
        desc.flags = wire_flags.into();
        self.outbox.push(Outbound::Send(Box::new(RemoteSend {
            host: to.host(),
            dev,
            port: port.clone(),
            req,
            desc,
            payload,
            len,
            charged,
            guest,
            sink: Vec::new(),
        })));
    }

    /// The status of an RMA or atomic request for `to`, which names no device here:
    /// `Unsupported` marks a peer host's address (`op_rma`/`op_atomic` then send the request
    /// across instead of failing it), anything else is `AddrNotAvail`.
    pub(super) fn not_here(&self, to: FabricAddr) -> Status {
        if to.fabric() == self.fabric_id
            && to.host() != self.host_id
            && self.outbox.is_peer(to.host())
        {
            Status::Unsupported
        } else {
            Status::AddrNotAvail
        }
    }

    /// Complete a send to another host with the verdict its daemon sent back (or
    /// `HostUnreach` when that host went away first).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn complete_remote(
        &self,
        dev: usize,
        port: &Port,
        req: &Req,
        len: u64,
        status: Status,
        read: &[u8],
        n: &mut Notify,
    ) {
        if req.req.opcode == Opcode::AddrCheck {
            // OK, ADDR_NOT_AVAIL, or HOST_UNREACH when the host went away first.
            return self.fail(dev, port, req, status, n);
        }
        if req.req.opcode == Opcode::Flush {
            // A refusal by the target's commit handler carries the handler's value.
            let mut c = completion(status, req.req.cookie);
            if status == Status::CommitRefused {
                let mut value = [0u8; 8];
                if let Some(b) = read.get(..8) {
                    value.copy_from_slice(b);
                }
                c.data = u64::from_le_bytes(value).into();
            }
            return self.done(dev, port, req, &c, 0, n);
        }
        if status != Status::Ok {
            return self.fail(dev, port, req, status, n);
        }
        match req.req.opcode {
            Opcode::RmaWrite
            | Opcode::RmaRead
            | Opcode::Atomic
            | Opcode::FetchAtomic
            | Opcode::CompareAtomic => {
                let is_read = returns_bytes(req.req.opcode);
                // The target read exactly what was asked (checked by the uplink); none for
                // a read whose bytes the target wrote straight into guest memory (its sink).
                if is_read
                    && !read.is_empty()
                    && req.data.write_at(&port.mem.memory(), 0, read).is_err()
                {
                    return self.fail(dev, port, req, Status::Fault, n);
                }
                if let Some(c) = self.counters.get(dev) {
                    Counters::add(&c.bytes_copied, len);
                }
                let mut c = completion(Status::Ok, req.req.cookie);
                c.len = len.into();
                self.done(dev, port, req, &c, if is_read { len } else { 0 }, n);
            }
            _ => self.sent(dev, port, req, len, n),
        }
    }

    /// The remote seam of [`Fabric::op_rma`]: an RMA request for a peer host's endpoint.
    /// The ranges and (for a write) the bytes go to the target host, whose device checks keys,
    /// ranges and access as for a local initiator; a read's bytes come back with the verdict.
    #[cold]
    #[inline(never)]
    pub(super) fn rma_remote(&self, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        let r = req.req;
        let Some((sgen, _)) = self.ep_info(dev, r.ep) else {
            return self.fail(dev, port, &req, Status::BadEndpoint, n);
        };
        let write = r.opcode == Opcode::RmaWrite;
        let list_len = u64::from(r.count) * RMA_IOV_LEN as u64;
        let (list, src_data) = req.payload.split_at(list_len);
        let local = if write { src_data.len } else { req.data.len };
        let mem = port.mem.memory();
        let mut ranges: Vec<RmaIov> = Vec::new();
        if r.count == 0 {
            ranges.push(RmaIov {
                addr: r.remote_addr.into(),
                len: local.into(),
                key: r.remote_key.into(),
            });
        } else {
            for i in 0..u64::from(r.count) {
                let mut e = RmaIov::default();
                if list
                    .read_at(&mem, i * RMA_IOV_LEN as u64, e.as_mut_slice())
                    .is_err()
                {
                    return self.fail(dev, port, &req, Status::Fault, n);
                }
                ranges.push(e);
            }
        }
        if ranges.len() > wire::MAX_RANGES as usize {
            return self.fail(dev, port, &req, Status::Invalid, n);
        }
        let total = ranges
            .iter()
            .try_fold(0u64, |a, e| a.checked_add(u64::from(e.len)));
        let Some(total) = total else {
            return self.fail(dev, port, &req, Status::Invalid, n);
        };
        if (write && total != local) || (!write && total > local) {
            return self.fail(dev, port, &req, Status::Invalid, n);
        }
        if total > self.max_rma_size() {
            return self.fail(dev, port, &req, Status::TooLarge, n);
        }
        let to = r.peer;
        let key = (dev, r.ep, to.host());
        let mut bytes = Vec::with_capacity(ranges.len() * RMA_IOV_LEN + total as usize);
        for e in &ranges {
            bytes.extend_from_slice(e.as_slice());
        }
        // A large write's bytes in a few guest ranges stay there (as a send's).
        let guest = if write && total as usize > RDV_THRESHOLD {
            GuestBytes::ranges(
                port.mem.memory().into_inner(),
                &src_data,
                total,
                wire::MAX_RDV_SEGS,
            )
            .unwrap_or_default()
        } else {
            Vec::new()
        };
        // A large read's destination in a few guest ranges with a file may take the bytes
        // straight from the wire (its first `total` bytes: the uplink's sinks).
        let sink =
            if !write && total as usize > RDV_THRESHOLD && crate::uplink::rdv::direct_allowed() {
                GuestBytes::ranges(
                    port.mem.memory().into_inner(),
                    &req.data,
                    total,
                    wire::MAX_RDV_SEGS,
                )
                .filter(|gs| gs.iter().all(|g| g.file_at().is_some()))
                .unwrap_or_default()
            } else {
                Vec::new()
            };
        if write && guest.is_empty() {
            let at = bytes.len();
            bytes.resize(at + total as usize, 0);
            if src_data.read_at(&mem, 0, &mut bytes[at..]).is_err() {
                return self.fail(dev, port, &req, Status::Fault, n);
            }
        }
        drop(mem);
        // What this daemon holds in flight: the copied bytes, and a read's sink unless it is
        // the guest's own memory (a window of large reads then waits for no one).
        let charged = bytes.len() as u64 + if write || !sink.is_empty() { 0 } else { total };
        if let Err(status) = self.outbox.reserve(key, charged) {
            return self.fail(dev, port, &req, status, n);
        }
        let cq_data = write && r.flags & flags::REMOTE_CQ_DATA != 0;
        let wire_len = bytes.len() as u64 + guest.iter().map(|g| g.len() as u64).sum::<u64>();
        let mut desc = describe(&r, dev, sgen, to, wire_len);
        let mut wire_flags = 0;
        if cq_data {
            desc.data = r.data.into();
            wire_flags |= data_flags::REMOTE_CQ_DATA;
        }
        if write && r.flags & flags::COMMIT_COMPLETE != 0 {
            wire_flags |= data_flags::COMMIT_COMPLETE;
        }
        desc.flags = wire_flags.into();
        desc.count = (ranges.len() as u32).into();
        self.outbox.push(Outbound::Send(Box::new(RemoteSend {
            host: to.host(),
            dev,
            port: port.clone(),
            req,
            desc,
            payload: bytes,
            len: total,
            charged,
            guest,
            sink,
        })));
    }

    /// Execute an RMA request from another host at its target endpoint, with the checks of a
    /// local one (endpoint, keys, ranges, access rights; at COMMIT_COMPLETE, persistence).
    /// Returns the verdict and, for a read, the bytes read; `None` when a FLUSH waits for the
    /// target's commit handler (its verdict goes back later).
    pub(crate) fn accept_remote_rma(
        &self,
        m: Incoming,
        n: &mut Notify,
    ) -> Option<(Status, Vec<u8>)> {
        let desc = m.desc;
        match Opcode::from_u16(desc.opcode.into()) {
            Some(Opcode::Atomic | Opcode::FetchAtomic | Opcode::CompareAtomic) => {
                Some(self.accept_remote_atomic(m, n))
            }
            Some(Opcode::Flush) => self.accept_remote_flush(m, n),
            _ => Some(self.accept_remote_write_read(m, n)),
        }
    }

    /// An RMA write or read from another host.
    fn accept_remote_write_read(&self, m: Incoming, n: &mut Notify) -> (Status, Vec<u8>) {
        let desc = m.desc;
        let write = u16::from(desc.opcode) == Opcode::RmaWrite as u16;
        let count = u32::from(desc.count) as usize;
        let list_len = count * RMA_IOV_LEN;
        let Some((list, data)) = (m.bytes.len() >= list_len).then(|| m.bytes.split_at(list_len))
        else {
            return (Status::Invalid, Vec::new());
        };
        let ranges: Vec<(u64, u64, u64)> = list
            .chunks_exact(RMA_IOV_LEN)
            .filter_map(RmaIov::from_slice)
            .map(|e| (e.addr.into(), e.len.into(), e.key.into()))
            .collect();
        let total = ranges
            .iter()
            .try_fold(0u64, |a, &(_, l, _)| a.checked_add(l));
        let Some(total) = total else {
            return (Status::Invalid, Vec::new());
        };
        if (write && total != data.len() as u64) || (!write && !data.is_empty()) {
            return (Status::Invalid, Vec::new());
        }
        if total > self.max_rma_size() {
            return (Status::TooLarge, Vec::new());
        }
        let ddev = usize::from(u16::from(desc.dst_dev));
        if ddev >= self.devs.len() {
            return (Status::AddrNotAvail, Vec::new());
        }
        let (dep, dgen) = (u32::from(desc.dst_ep) as usize, u32::from(desc.dst_gen));
        let src = FabricAddr::new(
            FabricAddr::node_of(self.fabric_id, m.host, desc.src_dev.into()),
            desc.src_ep.into(),
            desc.src_gen.into(),
        );
        let need = if write {
            mr_flags::REMOTE_WRITE
        } else {
            mr_flags::REMOTE_READ
        };
        let (targets, dport) = match self.targets_of(ddev, dep, dgen, &ranges, need) {
            Ok(x) => x,
            Err(s) => {
                debug!(
                    ddev,
                    host = m.host,
                    ?s,
                    "remote access from another host refused"
                );
                return (s, Vec::new());
            }
        };
        // COMMIT_COMPLETE needs every target to be persistent memory (§6.17).
        let commit = u32::from(desc.flags) & data_flags::COMMIT_COMPLETE != 0;
        if commit && targets.iter().any(|t| t.mr.pmem.is_none()) {
            return (Status::Access, Vec::new());
        }
        let meta = Meta {
            src,
            tagged: false,
            tag: 0,
            cq_data: Some(desc.data.into()),
            len: 0,
            rma_len: Some(total),
        };
        let mut notify = false;
        if write && u32::from(desc.flags) & data_flags::REMOTE_CQ_DATA != 0 {
            let mut d = self.dev(ddev);
            if d.acked & vfabric_proto::bit(VIRTIO_FABRIC_F_REMOTE_CQ_DATA) != 0 {
                if !self.reserve_notification(&mut d, dep, &meta) {
                    return (Status::NoResources, Vec::new());
                }
                notify = true;
            }
        }
        let undo = |f: &Self| {
            if notify {
                f.dev(ddev).unexpected_bytes -= eager_cost(0);
            }
        };
        // Every range must still be registered before any byte moves.
        let accesses: Option<Vec<_>> = targets.iter().map(|t| t.mr.enter()).collect();
        let Some(accesses) = accesses else {
            undo(self);
            return (Status::Access, Vec::new());
        };
        let rmem = dport.mem.memory();
        let mut read = if write {
            Vec::new()
        } else {
            vec![0u8; total as usize]
        };
        let mut pos = 0usize;
        let mut ok = true;
        for t in targets.iter() {
            let len = t.len as usize;
            let res = match (&t.mr.process, write) {
                (Some(p), true) => p.write(&t.segs, 0, &data[pos..pos + len]).is_ok(),
                (Some(p), false) => p.read(&t.segs, 0, &mut read[pos..pos + len]).is_ok(),
                (None, true) => t.segs.write_at(&rmem, 0, &data[pos..pos + len]).is_ok(),
                (None, false) => t.segs.read_at(&rmem, 0, &mut read[pos..pos + len]).is_ok(),
            };
            if !res {
                ok = false;
                break;
            }
            pos += len;
        }
        drop((rmem, accesses));
        if !ok {
            undo(self);
            return (Status::Fault, Vec::new());
        }
        if commit {
            // Durable before the reply, as for a local initiator.
            let status = self.persist_targets(ddev, &targets);
            if status != Status::Ok {
                undo(self);
                return (status, Vec::new());
            }
        }
        if notify {
            self.notify_write(REMOTE_SRC_DEV, ddev, dep, &dport, meta, n);
        }
        self.record_events(ddev, dep, src, write, &targets, n);
        (Status::Ok, read)
    }

    /// The remote seam of [`Fabric::op_atomic`]: the operation, its range and operands go to
    /// the target host, whose device checks and executes it (atomically with its local
    /// operations on the same memory); fetched values come back with the verdict.
    #[cold]
    #[inline(never)]
    pub(super) fn atomic_remote(&self, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        let r = req.req;
        let Some((sgen, _)) = self.ep_info(dev, r.ep) else {
            return self.fail(dev, port, &req, Status::BadEndpoint, n);
        };
        let (op, ty) = (r.atomic_op, r.datatype);
        let status = atomic_check(r.opcode, op, ty, r.count);
        let Ok(size) = status else {
            return self.fail(dev, port, &req, status.unwrap_err(), n);
        };
        let nbytes = r.count as usize * size;
        let is_cmp = r.opcode == Opcode::CompareAtomic;
        let fetch = r.opcode != Opcode::Atomic;
        if fetch && req.data.len != nbytes as u64 {
            return self.fail(dev, port, &req, Status::BadChain, n);
        }
        let mut bytes = RmaIov {
            addr: r.remote_addr.into(),
            len: (nbytes as u64).into(),
            key: r.remote_key.into(),
        }
        .as_slice()
        .to_vec();
        // Operands (and compare values), as the local path reads them.
        if op == aop::ATOMIC_READ {
            if req.payload.len != 0 {
                return self.fail(dev, port, &req, Status::Invalid, n);
            }
        } else if req.payload.len == 0 && r.count == 1 && size <= 8 {
            bytes.extend_from_slice(&r.data.to_le_bytes()[..size]);
            if is_cmp {
                bytes.extend_from_slice(&r.compare.to_le_bytes()[..size]);
            }
        } else if req.payload.len == (nbytes * if is_cmp { 2 } else { 1 }) as u64 {
            let at = bytes.len();
            bytes.resize(at + req.payload.len as usize, 0);
            if req
                .payload
                .read_at(&port.mem.memory(), 0, &mut bytes[at..])
                .is_err()
            {
                return self.fail(dev, port, &req, Status::Fault, n);
            }
        } else {
            return self.fail(dev, port, &req, Status::Invalid, n);
        }
        let to = r.peer;
        if let Err(status) = self.outbox.reserve((dev, r.ep, to.host()), nbytes as u64) {
            return self.fail(dev, port, &req, status, n);
        }
        let mut desc = describe(&r, dev, sgen, to, bytes.len() as u64);
        desc.tag = (u64::from(op) | u64::from(ty) << 8).into();
        desc.count = 1.into();
        if r.flags & flags::COMMIT_COMPLETE != 0 {
            desc.flags = data_flags::COMMIT_COMPLETE.into();
        }
        self.outbox.push(Outbound::Send(Box::new(RemoteSend {
            host: to.host(),
            dev,
            port: port.clone(),
            req,
            desc,
            payload: bytes,
            len: nbytes as u64,
            charged: nbytes as u64,
            guest: Vec::new(),
            sink: Vec::new(),
        })));
    }

    /// Execute an atomic request from another host with the checks of a local one. Returns
    /// the verdict and, for fetching atomics, the values before the operation.
    fn accept_remote_atomic(&self, m: Incoming, n: &mut Notify) -> (Status, Vec<u8>) {
        let desc = m.desc;
        let refuse = |s: Status| (s, Vec::new());
        let Some(opcode) = Opcode::from_u16(desc.opcode.into()) else {
            return refuse(Status::Invalid);
        };
        let tag = u64::from(desc.tag);
        if u32::from(desc.count) != 1 || tag >> 16 != 0 || m.bytes.len() < RMA_IOV_LEN {
            return refuse(Status::Invalid);
        }
        let (op, ty) = (tag as u8, (tag >> 8) as u8);
        let (range, rest) = m.bytes.split_at(RMA_IOV_LEN);
        let Some(range) = RmaIov::from_slice(range) else {
            return refuse(Status::Invalid);
        };
        let Ok(size) = dt::size(ty).ok_or(Status::Unsupported) else {
            return refuse(Status::Unsupported);
        };
        let nbytes = u64::from(range.len);
        if nbytes == 0 || nbytes % size as u64 != 0 {
            return refuse(Status::Invalid);
        }
        let count = (nbytes / size as u64).min(u64::from(u32::MAX)) as u32;
        if let Err(s) = atomic_check(opcode, op, ty, count) {
            return refuse(s);
        }
        let nbytes = nbytes as usize;
        let is_cmp = opcode == Opcode::CompareAtomic;
        let want = match (op, is_cmp) {
            (aop::ATOMIC_READ, _) => 0,
            (_, true) => 2 * nbytes,
            _ => nbytes,
        };
        if rest.len() != want {
            return refuse(Status::Invalid);
        }
        let zeros = vec![0u8; nbytes];
        let (operands, compares): (&[u8], &[u8]) = match (op, is_cmp) {
            (aop::ATOMIC_READ, _) => (&zeros, &zeros),
            (_, true) => rest.split_at(nbytes),
            _ => (rest, &zeros),
        };
        let need = match (opcode, op) {
            (Opcode::Atomic, _) => mr_flags::REMOTE_WRITE,
            (Opcode::FetchAtomic, aop::ATOMIC_READ) => mr_flags::REMOTE_READ,
            _ => mr_flags::REMOTE_READ | mr_flags::REMOTE_WRITE,
        };
        let ddev = usize::from(u16::from(desc.dst_dev));
        if ddev >= self.devs.len() {
            return refuse(Status::AddrNotAvail);
        }
        let (dep, dgen) = (u32::from(desc.dst_ep) as usize, u32::from(desc.dst_gen));
        let ranges = [(u64::from(range.addr), nbytes as u64, u64::from(range.key))];
        let (t, dport) = match self.targets_of(ddev, dep, dgen, &ranges, need) {
            Ok((mut ts, p)) => (ts.pop(), p),
            Err(s) => return refuse(s),
        };
        let Some(t) = t else {
            return refuse(Status::Access);
        };
        let commit = u32::from(desc.flags) & data_flags::COMMIT_COMPLETE != 0;
        if commit && t.mr.pmem.is_none() {
            return refuse(Status::Access);
        }
        let Some(access) = t.mr.enter() else {
            return refuse(Status::Access);
        };
        let mut old = vec![0u8; nbytes];
        let rmem = dport.mem.memory();
        let res = match &t.mr.process {
            Some(p) => {
                atomic::execute_in_process(p, &t.segs, ty, op, size, operands, compares, &mut old)
            }
            None => atomic::execute(
                &self.stripes,
                &rmem,
                &t.segs,
                ty,
                op,
                size,
                operands,
                compares,
                &mut old,
            ),
        };
        drop((access, rmem));
        if res.is_err() {
            return refuse(Status::Fault);
        }
        if commit {
            let s = self.persist_targets(ddev, std::slice::from_ref(&t));
            if s != Status::Ok {
                return refuse(s);
            }
        }
        let src = FabricAddr::new(
            FabricAddr::node_of(self.fabric_id, m.host, desc.src_dev.into()),
            desc.src_ep.into(),
            desc.src_gen.into(),
        );
        self.record_events(
            ddev,
            dep,
            src,
            op != aop::ATOMIC_READ,
            std::slice::from_ref(&t),
            n,
        );
        if opcode == Opcode::Atomic {
            old.clear();
        }
        (Status::Ok, old)
    }

    /// The remote seam of [`Fabric::op_flush`]: a FLUSH of another host's endpoint. Its
    /// ranges (or the key of a whole region), level and remote CQ data go to that host, whose
    /// daemon runs the checks and persistence of a local FLUSH and answers with the verdict
    /// (after the target's commit handler, for a handled region).
    #[cold]
    #[inline(never)]
    pub(super) fn flush_remote(&self, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        let r = req.req;
        let Some((sgen, _)) = self.ep_info(dev, r.ep) else {
            return self.fail(dev, port, &req, Status::BadEndpoint, n);
        };
        let mut wire_flags = 0;
        let mut ranges: Vec<RmaIov> = Vec::new();
        if r.count == 0 {
            if r.remote_addr != 0 {
                return self.fail(dev, port, &req, Status::Invalid, n);
            }
            wire_flags |= data_flags::WHOLE_REGION;
            ranges.push(RmaIov {
                addr: 0.into(),
                len: 0.into(),
                key: r.remote_key.into(),
            });
        } else {
            if r.count > wire::MAX_RANGES {
                return self.fail(dev, port, &req, Status::Invalid, n);
            }
            let mem = port.mem.memory();
            for i in 0..u64::from(r.count) {
                let mut e = RmaIov::default();
                if req
                    .payload
                    .read_at(&mem, i * RMA_IOV_LEN as u64, e.as_mut_slice())
                    .is_err()
                {
                    return self.fail(dev, port, &req, Status::Fault, n);
                }
                ranges.push(e);
            }
        }
        let to = r.peer;
        let key = (dev, r.ep, to.host());
        if let Err(status) = self.outbox.reserve(key, 0) {
            return self.fail(dev, port, &req, status, n);
        }
        let bytes: Vec<u8> = ranges.iter().flat_map(|e| e.as_slice().to_vec()).collect();
        let mut desc = describe(&r, dev, sgen, to, bytes.len() as u64);
        if r.flags & flags::COMMIT_COMPLETE != 0 {
            wire_flags |= data_flags::COMMIT_COMPLETE;
        }
        if r.flags & flags::REMOTE_CQ_DATA != 0 {
            wire_flags |= data_flags::REMOTE_CQ_DATA;
            desc.data = r.data.into();
        }
        desc.flags = wire_flags.into();
        desc.count = (ranges.len() as u32).into();
        self.outbox.push(Outbound::Send(Box::new(RemoteSend {
            host: to.host(),
            dev,
            port: port.clone(),
            req,
            desc,
            payload: bytes,
            len: 0,
            charged: 0,
            guest: Vec::new(),
            sink: Vec::new(),
        })));
    }

    /// A FLUSH from another host at its target endpoint: the checks and persistence of a local
    /// one ([`Fabric::flush_at`]). `None`: a commit to a region with a commit handler waits for
    /// the target driver's verdict, which goes back as a REPLY (§6.17.3).
    fn accept_remote_flush(&self, m: Incoming, n: &mut Notify) -> Option<(Status, Vec<u8>)> {
        let desc = m.desc;
        let refuse = |s: Status| Some((s, Vec::new()));
        let wire_flags = u32::from(desc.flags);
        let count = u32::from(desc.count) as usize;
        // The parser checked the shape; the ranges are checked again as untrusted here.
        if m.bytes.len() != count * RMA_IOV_LEN || count == 0 {
            return refuse(Status::Invalid);
        }
        let ddev = usize::from(u16::from(desc.dst_dev));
        if ddev >= self.devs.len() {
            return refuse(Status::AddrNotAvail);
        }
        let mut ranges: Vec<(u64, u64, u64)> = m
            .bytes
            .chunks_exact(RMA_IOV_LEN)
            .filter_map(RmaIov::from_slice)
            .map(|e| (e.addr.into(), e.len.into(), e.key.into()))
            .collect();
        if wire_flags & data_flags::WHOLE_REGION != 0 {
            let [(0, 0, key)] = ranges[..] else {
                return refuse(Status::Invalid);
            };
            let Some(whole) = self.whole_region(ddev, key) else {
                return refuse(Status::Access);
            };
            ranges = vec![whole];
        }
        let commit = wire_flags & data_flags::COMMIT_COMPLETE != 0;
        let cq_data = (wire_flags & data_flags::REMOTE_CQ_DATA != 0).then(|| desc.data.into());
        let at = FlushAt {
            src_dev: REMOTE_SRC_DEV,
            src: FabricAddr::new(
                FabricAddr::node_of(self.fabric_id, m.host, desc.src_dev.into()),
                desc.src_ep.into(),
                desc.src_gen.into(),
            ),
            ddev,
            dep: u32::from(desc.dst_ep) as usize,
            gen: desc.dst_gen.into(),
        };
        let targets = match self.flush_at(&at, &ranges, commit, cq_data, n) {
            Ok(t) => t,
            Err(s) => {
                debug!(ddev, host = m.host, ?s, "flush from another host refused");
                return refuse(s);
            }
        };
        if commit && targets.iter().any(|t| t.mr.commit_event) {
            let origin = CommitOrigin::Remote {
                host: m.host,
                req_id: m.req_id,
            };
            let mut level = flags::SAVE | flags::COMMIT_COMPLETE;
            if cq_data.is_some() {
                level |= flags::REMOTE_CQ_DATA;
            }
            self.start_commit(origin, &at, level, cq_data, &targets, n);
            return None;
        }
        refuse(Status::Ok)
    }

    /// FENCE towards another host: an earlier request of the endpoint to that host is still
    /// waiting for its verdict.
    pub(super) fn remote_fence_blocked(&self, dev: usize, ep: u32, to: FabricAddr) -> bool {
        to.fabric() == self.fabric_id
            && to.host() != self.host_id
            && self.outbox.busy((dev, ep, to.host()))
    }

    /// A request to another host completed: fenced requests waiting for it may start (the
    /// uplink thread calls this after completions).
    pub(crate) fn remote_unfence(&self, n: &mut Notify) {
        if self.fenced_total.load(Ordering::Acquire) > 0 {
            self.run_fenced(n);
        }
    }

    /// Most bytes of messages from other hosts held in unexpected queues at once.
    fn remote_held_limit(&self) -> u64 {
        self.limits
            .max_unexpected_bytes
            .saturating_mul(16)
            .max(self.limits.max_msg_size)
    }

    /// What a receive matches a message of `len` bytes from `host` described by `desc` on.
    fn remote_meta(&self, host: u16, desc: &wire::Data, len: u64) -> Meta {
        let wire_flags = u32::from(desc.flags);
        Meta {
            src: FabricAddr::new(
                FabricAddr::node_of(self.fabric_id, host, desc.src_dev.into()),
                desc.src_ep.into(),
                desc.src_gen.into(),
            ),
            tagged: u16::from(desc.opcode) == Opcode::TSend as u16,
            tag: desc.tag.into(),
            cq_data: (wire_flags & data_flags::REMOTE_CQ_DATA != 0).then_some(desc.data.into()),
            len,
            rma_len: None,
        }
    }

    /// Where a rendezvous message of `host` not read yet goes, if the paths that act before
    /// reading it ([`Fabric::stub_unread`], [`Fabric::claim_direct`]) may take it: a plain send
    /// or tagged send (not a PULLed resend, not DGRAM, within `max_msg_size`) to a device of
    /// this host: its device, endpoint and generation, and what a receive matches on. `None`:
    /// it is read and handed to [`Fabric::accept_remote`], which checks everything.
    fn unread_target(&self, host: u16, desc: &wire::Data) -> Option<(usize, usize, u32, Meta)> {
        let op = u16::from(desc.opcode);
        let kind = u64::from(u16::from(desc.ep_kind));
        let len = u64::from(desc.total_len);
        let plain = op == Opcode::Send as u16 || op == Opcode::TSend as u16;
        if !plain
            || u32::from(desc.flags) & data_flags::PULLED != 0
            || kind == ep_open::TYPE_DGRAM
            || len > self.limits.max_msg_size
        {
            return None;
        }
        let ddev = usize::from(u16::from(desc.dst_dev));
        if ddev >= self.devs.len() {
            return None;
        }
        let (dep, dgen) = (u32::from(desc.dst_ep) as usize, u32::from(desc.dst_gen));
        Some((ddev, dep, dgen, self.remote_meta(host, desc, len)))
    }

    /// A rendezvous message from `host` (request `req_id`, described by `desc`) not read yet,
    /// with every earlier message of its host already matched: if it would be a stub once
    /// read (no posted receive matches it, and the held bytes are past their bound or it
    /// would queue behind a stub), it becomes one now, so that its bytes cross the wire only
    /// when a receive pulls them. `false`: read it and hand it to [`Fabric::accept_remote`]
    /// as usual (which also answers anything this does not check).
    pub(crate) fn stub_unread(&self, host: u16, req_id: u64, desc: &wire::Data) -> bool {
        let Some((ddev, dep, dgen, meta)) = self.unread_target(host, desc) else {
            return false;
        };
        let (len, kind) = (meta.len, u64::from(u16::from(desc.ep_kind)));
        let mut d = self.dev(ddev);
        if d.port.is_none() {
            return false;
        }
        let Some(e) = d.live_ep_mut(dep, dgen) else {
            return false;
        };
        if e.kind != kind || e.posted.iter().any(|r| r.matches(&meta)) {
            return false;
        }
        let behind_stub = e.unexpected.back().is_some_and(Msg::is_stub);
        let held = self.remote_held_bytes.load(Ordering::Acquire);
        if !behind_stub && held.saturating_add(len) <= self.remote_held_limit() {
            return false;
        }
        if !self.stub_reserve(host) {
            return false;
        }
        e.unexpected.push_back(Msg {
            meta,
            src_dev: REMOTE_SRC_DEV,
            claimed: None,
            body: Body::Remote(HeldRemote {
                host,
                req_id,
                bytes: None,
            }),
        });
        d.look_at_rx();
        true
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
        let meta = self.remote_meta(m.host, &desc, len);
        let delivery_complete = wire_flags & data_flags::DELIVERY_COMPLETE != 0;
        if delivery_complete && kind == ep_open::TYPE_DGRAM {
            return Some(Status::Invalid);
        }
        let m = if wire_flags & data_flags::PULLED != 0 {
            match self.accept_pulled(ddev, dep, dgen, m, n) {
                Ok(status) => return status,
                // The receive's memory faulted: matched again as a new message.
                Err(m) => m,
            }
        } else {
            m
        };
        loop {
            let mut d = self.dev(ddev);
            let Some(dport) = d.port.clone() else {
                return Some(Status::AddrNotAvail);
            };
            match d.live_ep(dep, dgen) {
                Some(dst) if dst.kind == kind => {}
                _ => return Some(Status::AddrNotAvail),
            }
            if let Some(rv) = take_posted(&mut d, dep, &meta, &mut 0) {
                drop(d);
                let rv = rv.into_req();
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
            // Behind a stub, a message is a stub too: receives then complete in order.
            let behind_stub = d
                .ep(dep)
                .and_then(|e| e.unexpected.back())
                .is_some_and(Msg::is_stub);
            let eager = len <= self.limits.eager_threshold
                && !delivery_complete
                && !behind_stub
                && d.unexpected_bytes.saturating_add(cost) <= self.limits.max_unexpected_bytes;
            let held = self.remote_held_bytes.load(Ordering::Acquire);
            let body = if eager {
                d.unexpected_bytes += cost;
                Body::Eager(m.bytes)
            } else if !behind_stub && held.saturating_add(len) <= self.remote_held_limit() {
                // Held here with its bytes, its sender waiting for the verdict.
                self.remote_held_bytes.fetch_add(len, Ordering::AcqRel);
                Body::Remote(HeldRemote {
                    host: m.host,
                    req_id: m.req_id,
                    bytes: Some(m.bytes),
                })
            } else {
                // Past the bound: only a stub stays, the bytes go back to being the sender's
                // (its request stays outstanding, its guest's chain with it, as a held send
                // waits in its TX ring); a receive that matches the stub pulls them. Stubs
                // are bounded per host by what its sender may have outstanding.
                if !self.stub_reserve(m.host) {
                    return Some(Status::NoResources);
                }
                Body::Remote(HeldRemote {
                    host: m.host,
                    req_id: m.req_id,
                    bytes: None,
                })
            };
            if let Some(e) = d.ep_mut(dep) {
                e.unexpected.push_back(Msg {
                    meta,
                    src_dev: REMOTE_SRC_DEV,
                    claimed: None,
                    body,
                });
                d.look_at_rx();
            }
            return if eager { Some(Status::Ok) } else { None };
        }
    }

    /// ADDR_CHECK of `req.req.peer`, an endpoint of another host: that host's device answers
    /// (through the uplink); `HostUnreach` at once when it is down.
    #[cold]
    #[inline(never)]
    pub(super) fn addr_check_remote(&self, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        let host = req.req.peer.host();
        if let Err((req, status)) = self.outbox.push_addr_check(host, dev, port.clone(), req) {
            self.fail(dev, port, &req, status, n);
        }
    }

    /// Whether `addr` names an open endpoint of this host (another host's ADDR_QUERY).
    pub(crate) fn endpoint_open(&self, addr: FabricAddr) -> bool {
        self.addr_live(addr)
    }

    /// Requests of endpoint `ep` of `dev` (every request of `dev` with `None`; with
    /// `flushes`, FLUSHes too) that wait for another host's verdict leave: completed
    /// `Canceled`, or forgotten when `silent` (the device's rings are gone). Their targets are
    /// told (CANCEL), so that a message still held there is dropped; a late verdict finds
    /// nothing.
    pub(super) fn withdraw_remote_of(
        &self,
        dev: usize,
        hit: impl Fn(&Req) -> bool,
        silent: bool,
        n: &mut Notify,
    ) {
        let victims = self.outbox.withdraw(dev, hit);
        if victims.is_empty() {
            return;
        }
        debug!(
            dev,
            count = victims.len(),
            "requests to other hosts withdrawn"
        );
        if silent {
            return;
        }
        for p in victims {
            self.fail(p.dev, &p.port, &p.req, Status::Canceled, n);
        }
    }

    /// Host `host` withdrew its request `req_id` (CANCEL): a message of it held here is
    /// dropped without a verdict (its sender completed it already); a receive waiting for the
    /// bytes of its stub is matched again.
    pub(crate) fn withdraw_remote(&self, host: u16, req_id: u64, n: &mut Notify) {
        for dev in 0..self.devs.len() {
            let mut d = self.dev(dev);
            for ep in 0..d.eps.len() {
                let Some(e) = d.ep_mut(ep) else { continue };
                let at = e.unexpected.iter().position(
                    |m| matches!(&m.body, Body::Remote(h) if h.host == host && h.req_id == req_id),
                );
                if let Some(Msg {
                    body: Body::Remote(h),
                    ..
                }) = at.and_then(|i| e.unexpected.remove(i))
                {
                    self.remote_held_bytes
                        .fetch_sub(h.held_len(), Ordering::AcqRel);
                    if h.is_stub() {
                        self.stub_release(host);
                    }
                    return;
                }
                let at = e
                    .pulling
                    .iter()
                    .position(|p| p.host == host && p.req_id == req_id);
                if let Some(p) = at.map(|i| e.pulling.remove(i)) {
                    self.stub_release(host);
                    drop(d);
                    return self.rematch(dev, ep, p.rreq, n);
                }
            }
        }
    }

    /// A receive of endpoint `ep` of `dev` that waited for a pulled message that will not come
    /// is matched again: with a queued message if one matches, else back at the front of the
    /// posted receives (it is older than those). Failed `Canceled` if its endpoint is gone.
    fn rematch(&self, dev: usize, ep: usize, mut rreq: Req, n: &mut Notify) {
        let mut d = self.dev(dev);
        let Some(port) = d.port.clone() else {
            return;
        };
        let Some(e) = d.ep_mut(ep) else {
            drop(d);
            return self.fail(dev, &port, &rreq, Status::Canceled, n);
        };
        let r = rreq.req;
        let queued = e
            .unexpected
            .iter()
            .any(|m| m.claimed.is_none() && super::recv_matches(&r, &m.meta));
        if !queued {
            e.posted.push_front(super::posted::Posted::new(&mut rreq));
            return;
        }
        drop(d);
        self.op_recv(dev, &port, &mut rreq, n);
    }

    /// Receive `rreq` matched the stub at `at` of endpoint `ep` (the caller holds `d`, the
    /// device's lock): it waits at the endpoint for the bytes, which the stub's sender is asked
    /// for (PULL, queued under the lock so that pulls leave in matching order). `Err` gives
    /// the receive back if that is not a stub.
    #[allow(clippy::result_large_err)]
    pub(super) fn pull_stub(
        &self,
        d: &mut Dev,
        ep: usize,
        at: usize,
        rreq: Req,
    ) -> Result<(), Req> {
        let Some(e) = d.ep_mut(ep) else {
            return Err(rreq);
        };
        let stub = e.unexpected.get(at).and_then(|m| match &m.body {
            Body::Remote(h) if h.is_stub() => Some((h.host, h.req_id, m.meta)),
            _ => None,
        });
        let Some((host, req_id, meta)) = stub else {
            return Err(rreq);
        };
        e.unexpected.remove(at);
        e.pulling.push(Pulling {
            host,
            req_id,
            rreq,
            meta,
        });
        self.outbox.push(Outbound::Pull { host, req_id });
        Ok(())
    }

    /// The bytes of a stub's message, sent again for our PULL: placed in the receive that
    /// matched the stub. `Err` gives the message back when that receive's memory faulted (it
    /// failed): the message is then matched as a new one.
    fn accept_pulled(
        &self,
        ddev: usize,
        dep: usize,
        dgen: u32,
        m: Incoming,
        n: &mut Notify,
    ) -> Result<Option<Status>, Incoming> {
        let mut d = self.dev(ddev);
        let Some(dport) = d.port.clone() else {
            return Ok(Some(Status::AddrNotAvail));
        };
        let Some(e) = d.live_ep_mut(dep, dgen) else {
            // Closed meanwhile: its sender heard PEER_GONE then.
            return Ok(Some(Status::AddrNotAvail));
        };
        let at = e
            .pulling
            .iter()
            .position(|p| p.host == m.host && p.req_id == m.req_id);
        let Some(p) = at.map(|i| e.pulling.remove(i)) else {
            // Its receive was stopped meanwhile and the stub queued again (it is pulled again
            // when matched), or the peer sent what nobody asked for.
            let stub = e.unexpected.iter().any(
                |q| matches!(&q.body, Body::Remote(h) if h.host == m.host && h.req_id == m.req_id),
            );
            return Ok((!stub).then_some(Status::Invalid));
        };
        drop(d);
        self.stub_release(m.host);
        let len = m.bytes.len() as u64;
        if len != p.meta.len {
            debug!(
                host = m.host,
                req_id = m.req_id,
                "a pulled message changed its length"
            );
            self.rematch(ddev, dep, p.rreq, n);
            return Ok(Some(Status::Invalid));
        }
        let placed = len.min(p.rreq.data.len);
        if p.rreq
            .data
            .write_at(&dport.mem.memory(), 0, &m.bytes[..placed as usize])
            .is_err()
        {
            self.fail(ddev, &dport, &p.rreq, Status::Fault, n);
            return Err(m);
        }
        self.received(ddev, &dport, &p.rreq, &p.meta, placed, n);
        Ok(Some(Status::Ok))
    }

    /// A rendezvous message of `host` (request `req_id`, described by `desc`), every earlier
    /// message of its host already matched, about to be read: if it is a plain message that a
    /// posted receive matches and the part of that receive's buffer it fills is at most
    /// `max_ranges` ranges, each in one guest memory region, the receive is taken now
    /// (matching order is arrival order) and waits at its endpoint while the uplink reads the
    /// bytes straight into it. `None`: read into a daemon buffer and hand it to
    /// [`Fabric::accept_remote`] as usual.
    pub(crate) fn claim_direct(
        &self,
        host: u16,
        req_id: u64,
        desc: &wire::Data,
        max_ranges: usize,
    ) -> Option<Box<DirectDest>> {
        let (ddev, dep, dgen, meta) = self.unread_target(host, desc)?;
        let (len, kind) = (meta.len, u64::from(u16::from(desc.ep_kind)));
        if len == 0 {
            return None;
        }
        let mut d = self.dev(ddev);
        let port = d.port.clone()?;
        let e = d.live_ep_mut(dep, dgen)?;
        if e.kind != kind {
            return None;
        }
        let i = e.posted.iter().position(|r| r.matches(&meta))?;
        let placed = len.min(e.posted[i].data_len()) as usize;
        if placed == 0 {
            return None;
        }
        let bytes = GuestBytes::ranges(
            port.mem.memory().into_inner(),
            &e.posted[i].data(),
            placed as u64,
            max_ranges,
        )?;
        let rreq = e.posted.remove(i)?.into_req();
        let fence = ReadFence::new(host, req_id);
        e.direct.push(DirectRecv {
            host,
            req_id,
            rreq,
            meta,
            fence: fence.clone(),
        });
        Some(Box::new(DirectDest {
            bytes,
            len: placed,
            fence,
            dev: ddev,
            ep: dep,
            generation: dgen,
            write: None,
        }))
    }

    /// The destination device of a message from `host` that [`Fabric::claim_direct`] found no
    /// receive for may hold receives it has not taken (LAZY_RX): it is woken to take them
    /// (`true`: try the claim again shortly, rather than read the message into a buffer).
    pub(crate) fn receives_untaken(&self, host: u16, desc: &wire::Data) -> bool {
        let Some((ddev, ..)) = self.unread_target(host, desc) else {
            return false;
        };
        let mut d = self.dev(ddev);
        d.look_at_rx();
        d.rx_waking
    }

    /// An RMA write from `host` (described by `desc`, its ranges in `head`), every earlier
    /// message of its host matched already, about to be read: if it targets regions in guest
    /// memory that it may write (the checks of [`Fabric::accept_remote_rma`]), at most
    /// `max_ranges` ranges in all, each in one guest memory region, and needs no commit, the
    /// regions are entered now and the uplink reads the bytes straight into them. `None`: read
    /// into a daemon buffer and handed to `accept_remote_rma` as usual (which also gives any
    /// error verdict).
    pub(crate) fn claim_direct_write(
        &self,
        host: u16,
        desc: &wire::Data,
        head: &[u8],
        max_ranges: usize,
    ) -> Option<Box<DirectDest>> {
        let wire_flags = u32::from(desc.flags);
        let count = u32::from(desc.count) as usize;
        if u16::from(desc.opcode) != Opcode::RmaWrite as u16
            || count == 0
            || count > max_ranges
            || head.len() != count * RMA_IOV_LEN
            || wire_flags & data_flags::COMMIT_COMPLETE != 0
        {
            return None;
        }
        let ranges: Vec<(u64, u64, u64)> = head
            .chunks_exact(RMA_IOV_LEN)
            .map(|c| RmaIov::from_slice(c).map(|e| (e.addr.into(), e.len.into(), e.key.into())))
            .collect::<Option<_>>()?;
        let len = ranges
            .iter()
            .try_fold(0u64, |a, &(_, l, _)| a.checked_add(l))?;
        if len == 0
            || len > self.max_rma_size()
            || len.checked_add(head.len() as u64)? != u64::from(desc.total_len)
        {
            return None;
        }
        let ddev = usize::from(u16::from(desc.dst_dev));
        if ddev >= self.devs.len() {
            return None;
        }
        let (dep, dgen) = (u32::from(desc.dst_ep) as usize, u32::from(desc.dst_gen));
        let (targets, dport) = self
            .targets_of(ddev, dep, dgen, &ranges, mr_flags::REMOTE_WRITE)
            .ok()?;
        let mem = dport.mem.memory().into_inner();
        let mut bytes = Vec::new();
        for (t, &(_, l, _)) in targets.iter().zip(&ranges) {
            if t.mr.process.is_some() || t.len != l {
                return None;
            }
            if l == 0 {
                continue;
            }
            bytes.extend(GuestBytes::ranges(mem.clone(), &t.segs, l, max_ranges)?);
            if bytes.len() > max_ranges {
                return None;
            }
        }
        let access = targets
            .iter()
            .map(|t| t.mr.enter())
            .collect::<Option<Vec<_>>>()?;
        let src = FabricAddr::new(
            FabricAddr::node_of(self.fabric_id, host, desc.src_dev.into()),
            desc.src_ep.into(),
            desc.src_gen.into(),
        );
        let meta = Meta {
            src,
            tagged: false,
            tag: 0,
            cq_data: Some(desc.data.into()),
            len: 0,
            rma_len: Some(len),
        };
        let mut notify = None;
        if wire_flags & data_flags::REMOTE_CQ_DATA != 0 {
            let mut d = self.dev(ddev);
            if d.acked & vfabric_proto::bit(VIRTIO_FABRIC_F_REMOTE_CQ_DATA) != 0 {
                if !self.reserve_notification(&mut d, dep, &meta) {
                    return None;
                }
                notify = Some(meta);
            }
        }
        Some(Box::new(DirectDest {
            bytes,
            len: len as usize,
            fence: ReadFence::new(host, u64::from(desc.req_id)),
            dev: ddev,
            ep: dep,
            generation: dgen,
            write: Some(DirectWrite {
                targets,
                src,
                notify,
                _access: access,
            }),
        }))
    }

    /// An RMA read from another host (`m`, whose sink the uplink knows) that reads one range
    /// of one region in guest memory it may read (the checks of
    /// [`Fabric::accept_remote_rma`]): the region is entered now and the uplink writes the
    /// bytes to the sink straight from guest memory. `None`: executed by `accept_remote_rma`
    /// as usual (which also gives any error verdict).
    pub(crate) fn claim_direct_source(&self, m: &Incoming) -> Option<Box<DirectSource>> {
        let desc = &m.desc;
        if u16::from(desc.opcode) != Opcode::RmaRead as u16
            || u32::from(desc.count) != 1
            || m.bytes.len() != RMA_IOV_LEN
        {
            return None;
        }
        let e = RmaIov::from_slice(&m.bytes)?;
        let (addr, len, key) = (u64::from(e.addr), u64::from(e.len), u64::from(e.key));
        if len == 0 || len > self.max_rma_size() {
            return None;
        }
        let ddev = usize::from(u16::from(desc.dst_dev));
        if ddev >= self.devs.len() {
            return None;
        }
        let (dep, dgen) = (u32::from(desc.dst_ep) as usize, u32::from(desc.dst_gen));
        let (targets, dport) = self
            .targets_of(ddev, dep, dgen, &[(addr, len, key)], mr_flags::REMOTE_READ)
            .ok()?;
        let [t] = targets.as_slice() else {
            return None;
        };
        if t.mr.process.is_some() || t.len != len {
            return None;
        }
        let bytes = GuestBytes::new(dport.mem.memory().into_inner(), &t.segs)?;
        let access = t.mr.enter()?;
        let src = FabricAddr::new(
            FabricAddr::node_of(self.fabric_id, m.host, desc.src_dev.into()),
            desc.src_ep.into(),
            desc.src_gen.into(),
        );
        Some(Box::new(DirectSource {
            bytes: Some(bytes),
            len: len as usize,
            dev: ddev,
            ep: dep,
            src,
            targets,
            access: Some(access),
        }))
    }

    /// The uplink's write of the bytes of `s` is over: the access is recorded (remote-access
    /// events, as `accept_remote_rma` does once it read) and the region let go.
    pub(crate) fn direct_source_done(&self, s: Box<DirectSource>, n: &mut Notify) {
        self.record_events(s.dev, s.ep, s.src, false, &s.targets, n);
    }

    /// The receive `dest` claimed for `host`'s message `req_id`, out of its endpoint's table
    /// (`None`: its endpoint closed or its queue stopped meanwhile, and that completed it).
    fn take_direct(&self, host: u16, req_id: u64, dest: &DirectDest) -> Option<DirectRecv> {
        let mut d = self.dev(dest.dev);
        let e = d.live_ep_mut(dest.ep, dest.generation)?;
        let at = e
            .direct
            .iter()
            .position(|r| r.host == host && r.req_id == req_id)?;
        Some(e.direct.remove(at))
    }

    /// The uplink's read into `dest` (for `host`'s message `req_id`) is over and its bytes are
    /// all there: the receive completes as if the message had been placed by
    /// [`Fabric::accept_remote`]. Returns the verdict for the sender (PEER_GONE when the
    /// receive was taken back meanwhile by its endpoint's close or its queue's stop).
    pub(crate) fn direct_placed(
        &self,
        host: u16,
        req_id: u64,
        mut dest: Box<DirectDest>,
        n: &mut Notify,
    ) -> Status {
        if let Some(w) = dest.write.take() {
            // What `accept_remote_write_read` does once the bytes are there.
            if let Some(meta) = w.notify {
                let port = self.dev(dest.dev).port.clone();
                match port {
                    Some(port) => {
                        self.notify_write(REMOTE_SRC_DEV, dest.dev, dest.ep, &port, meta, n)
                    }
                    None => self.unreserve_notification(dest.dev),
                }
            }
            self.record_events(dest.dev, dest.ep, w.src, true, &w.targets, n);
            return Status::Ok;
        }
        let Some(r) = self.take_direct(host, req_id, &dest) else {
            return Status::PeerGone;
        };
        let Some(port) = self.dev(dest.dev).port.clone() else {
            return Status::PeerGone;
        };
        self.received(dest.dev, &port, &r.rreq, &r.meta, dest.len as u64, n);
        Status::Ok
    }

    /// The message read into `dest` will not be delivered (its read failed, or its sender
    /// withdrew it): the receive is matched again, as a pulling receive whose bytes will not
    /// come. The read must be over.
    pub(crate) fn direct_unclaim(
        &self,
        host: u16,
        req_id: u64,
        mut dest: Box<DirectDest>,
        n: &mut Notify,
    ) {
        if let Some(w) = dest.write.take() {
            if w.notify.is_some() {
                self.unreserve_notification(dest.dev);
            }
            return;
        }
        if let Some(r) = self.take_direct(host, req_id, &dest) {
            self.rematch(dest.dev, dest.ep, r.rreq, n);
        }
    }

    /// A notification reserved by [`Fabric::reserve_notification`] that will not be made.
    fn unreserve_notification(&self, dev: usize) {
        let mut d = self.dev(dev);
        d.unexpected_bytes = d.unexpected_bytes.saturating_sub(eager_cost(0));
    }

    /// Receives of a closing endpoint (or a stopping queue) that wait for uplink reads into
    /// their buffers: each is handed back (completed `Canceled`, or forgotten when `silent`)
    /// only once its read is over. The message's sender hears PEER_GONE from the uplink when
    /// the read ends (see [`Fabric::direct_placed`]).
    pub(super) fn direct_closed(
        &self,
        dev: usize,
        port: Option<&Port>,
        direct: Vec<DirectRecv>,
        silent: bool,
        n: &mut Notify,
    ) {
        for r in direct {
            if !r.fence.has_ended() {
                tracing::info!(
                    dev,
                    host = r.host,
                    req_id = r.req_id,
                    "a closing receive waits for the uplink read into its buffer"
                );
                r.fence.wait();
                tracing::info!(
                    dev,
                    host = r.host,
                    req_id = r.req_id,
                    "a closing receive handed back after its read"
                );
            }
            if let (false, Some(port)) = (silent, port) {
                self.fail(dev, port, &r.rreq, Status::Canceled, n);
            }
        }
    }

    /// Another stub of `host`'s messages, if it has fewer than [`MAX_STUBS_PER_HOST`].
    fn stub_reserve(&self, host: u16) -> bool {
        let mut s = self.remote_stubs.lock().unwrap_or_else(|p| p.into_inner());
        let c = s.entry(host).or_default();
        if *c >= MAX_STUBS_PER_HOST {
            return false;
        }
        *c += 1;
        if *c == 1 {
            tracing::info!(
                host,
                "past the held-bytes bound: messages from host {host} wait at their sender (stubs)"
            );
        }
        true
    }

    fn stub_release(&self, host: u16) {
        let mut s = self.remote_stubs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = s.get_mut(&host) {
            *c = c.saturating_sub(1);
            if *c == 0 {
                s.remove(&host);
            }
        }
    }

    /// Stubs of `host`'s messages held here (queued or being pulled).
    #[cfg(test)]
    pub(crate) fn stubs_of(&self, host: u16) -> usize {
        let s = self.remote_stubs.lock().unwrap_or_else(|p| p.into_inner());
        s.get(&host).copied().unwrap_or(0)
    }

    /// Receives of a closed endpoint that waited for pulled messages: they complete
    /// `Canceled` (forgotten when `silent`), and the messages' senders learn PEER_GONE, as
    /// for a message held at a closing endpoint.
    pub(super) fn pulling_closed(
        &self,
        dev: usize,
        port: Option<&Port>,
        pulling: Vec<Pulling>,
        silent: bool,
        n: &mut Notify,
    ) {
        for p in pulling {
            self.stub_release(p.host);
            if let (false, Some(port)) = (silent, port) {
                self.fail(dev, port, &p.rreq, Status::Canceled, n);
            }
            self.outbox.push(Outbound::Reply {
                host: p.host,
                req_id: p.req_id,
                status: Status::PeerGone,
                bytes: Vec::new(),
            });
        }
    }

    /// A message of `host` (request `req_id`) was answered `status` by the uplink before it
    /// reached us (its pulled bytes could not be read, or were refused): a receive waiting for
    /// them is matched again.
    pub(crate) fn pull_failed(&self, host: u16, req_id: u64, n: &mut Notify) {
        for dev in 0..self.devs.len() {
            let mut d = self.dev(dev);
            for ep in 0..d.eps.len() {
                let Some(e) = d.ep_mut(ep) else { continue };
                let at = e
                    .pulling
                    .iter()
                    .position(|p| p.host == host && p.req_id == req_id);
                if let Some(p) = at.map(|i| e.pulling.remove(i)) {
                    drop(d);
                    self.stub_release(host);
                    return self.rematch(dev, ep, p.rreq, n);
                }
            }
        }
    }

    /// Endpoint `one` (`(ep, generation)`; every endpoint with `None`) of device `node` of
    /// another host is gone, `closed` by its driver or lost: receives directed at it fail
    /// PEER_GONE (`data` = PEER_CLOSED when closed).
    pub(crate) fn remote_ep_gone(
        &self,
        node: u64,
        one: Option<(u32, u32)>,
        closed: bool,
        n: &mut Notify,
    ) {
        let gone = |a: FabricAddr| {
            a.node == node
                && one.is_none_or(|(ep, generation)| a.ep == ep && a.generation == generation)
        };
        // Forgotten first: a receive directed at it posted from now on asks again.
        self.outbox.forget(gone);
        self.fail_directed_at(gone, None, closed, n);
    }

    /// A held message from another host left its queue: its sender learns `status`.
    pub(super) fn reply_remote(&self, held: HeldRemote, status: Status) {
        self.remote_held_bytes
            .fetch_sub(held.held_len(), Ordering::AcqRel);
        if held.is_stub() {
            self.stub_release(held.host);
        }
        self.outbox.push(Outbound::Reply {
            host: held.host,
            req_id: held.req_id,
            status,
            bytes: Vec::new(),
        });
    }

    /// Host `host` went away (or restarted): its held messages are dropped. Returns their
    /// request ids (the uplink tells their senders, in case they did not see us go).
    /// `host` is lost: receives posted here that are directed at one of its endpoints fail
    /// PEER_GONE (that source can send nothing more); returns the ids of the messages of
    /// `host` that were held here, now dropped.
    pub(crate) fn purge_remote(&self, host: u16, n: &mut Notify) -> Vec<u64> {
        let fabric = self.fabric_id;
        self.commits_host_lost(host, n);
        self.fail_directed_at(
            |peer| peer.fabric() == fabric && peer.host() == host,
            None,
            false,
            n,
        );
        let mut dropped = Vec::new();
        let mut rematch = Vec::new();
        for dev in 0..self.devs.len() {
            let mut d = self.dev(dev);
            for (ep, slot) in d.eps.iter_mut().enumerate() {
                let Some(e) = slot.ep.as_mut() else { continue };
                e.unexpected.retain(|m| match &m.body {
                    Body::Remote(h) if h.host == host => {
                        self.remote_held_bytes
                            .fetch_sub(h.held_len(), Ordering::AcqRel);
                        dropped.push(h.req_id);
                        false
                    }
                    _ => true,
                });
                // Receives waiting for its pulled messages: those will not come.
                let mut i = 0;
                while i < e.pulling.len() {
                    if e.pulling[i].host == host {
                        let p = e.pulling.remove(i);
                        dropped.push(p.req_id);
                        rematch.push((dev, ep, p.rreq));
                    } else {
                        i += 1;
                    }
                }
            }
        }
        self.remote_stubs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&host);
        // Oldest first, so that each goes back in front of the receives posted after it.
        for (dev, ep, rreq) in rematch.into_iter().rev() {
            self.rematch(dev, ep, rreq, n);
        }
        dropped
    }
}

/// The DATA description of request `r` of endpoint `r.ep` (generation `sgen`) of device `dev`
/// for `to`, carrying `total_len` bytes: an RDM request with no tag, data, flags or ranges; the
/// caller sets what its operation adds.
fn describe(
    r: &vfabric_proto::Request,
    dev: usize,
    sgen: u32,
    to: FabricAddr,
    total_len: u64,
) -> wire::Data {
    wire::Data {
        req_id: 0.into(),
        total_len: total_len.into(),
        offset: 0.into(),
        tag: 0.into(),
        data: 0.into(),
        src_ep: r.ep.into(),
        src_gen: sgen.into(),
        dst_ep: to.ep.into(),
        dst_gen: to.generation.into(),
        src_dev: (dev as u16).into(),
        dst_dev: to.device().into(),
        opcode: (r.opcode as u16).into(),
        ep_kind: (ep_open::TYPE_RDM as u16).into(),
        flags: 0.into(),
        count: 0.into(),
    }
}

#[cfg(test)]
mod tests {
    use vfabric_proto::{
        comp_flags, ep_open, flags, ByteValued, FabricAddr, Opcode, Request, Status, RMA_IOV_LEN,
    };

    use super::super::{eager_cost, Notify, Teardown};
    use super::Incoming;
    use crate::config::Limits;
    use crate::testutil::{World, TEST_FABRIC};
    use crate::uplink::remote::Outbound;
    use crate::uplink::wire::{self, data_flags};

    const RDM: u64 = ep_open::TYPE_RDM;

    fn limits() -> Limits {
        Limits {
            eager_threshold: 200,
            max_unexpected_bytes: 2 * eager_cost(150),
            ..Limits::default()
        }
    }

    /// A message of request `req_id` from endpoint 5 (generation 6) of device 1 of host 2.
    fn incoming(req_id: u64, to: FabricAddr, tag: Option<u64>, bytes: &[u8]) -> Incoming {
        Incoming {
            host: 2,
            req_id,
            desc: wire::Data {
                req_id: req_id.into(),
                total_len: (bytes.len() as u64).into(),
                offset: 0.into(),
                tag: tag.unwrap_or(0).into(),
                data: 0.into(),
                src_ep: 5.into(),
                src_gen: 6.into(),
                dst_ep: to.ep.into(),
                dst_gen: to.generation.into(),
                src_dev: 1.into(),
                dst_dev: to.device().into(),
                opcode: (if tag.is_some() {
                    Opcode::TSend
                } else {
                    Opcode::Send
                } as u16)
                    .into(),
                ep_kind: (RDM as u16).into(),
                flags: 0.into(),
                count: 0.into(),
            },
            bytes: bytes.to_vec(),
        }
    }

    fn accept(w: &World, m: Incoming) -> Option<Status> {
        let mut n = Notify::default();
        w.fabric.accept_remote(m, &mut n)
    }

    fn replies(w: &World) -> Vec<(u16, u64, Status)> {
        w.fabric
            .outbox
            .take()
            .into_iter()
            .filter_map(|m| match m {
                Outbound::Reply {
                    host,
                    req_id,
                    status,
                    ..
                } => Some((host, req_id, status)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn sends_to_another_host_go_out_or_fail_at_once() {
        let mut w = World::new(1, Limits::default());
        let a = w.open(0, RDM);
        let there = FabricAddr::new(FabricAddr::node_of(TEST_FABRIC, 2, 1), 3, 4);
        let s = w.send(0, a, there, None, 0, 1, b"x");
        assert_eq!(w.status(&s), Some(Status::AddrNotAvail), "no uplink");
        w.fabric.outbox.set_hosts([(2, false)].into_iter());
        let s = w.send(0, a, there, None, 0, 2, b"x");
        assert_eq!(w.status(&s), Some(Status::HostUnreach), "host down");
        // RMA to a down host fails as a send does.
        let mut rd = Request::new(Opcode::RmaRead);
        rd.ep = a.ep;
        rd.peer = there;
        let h = w.submit(0, rd, &[], 8);
        assert_eq!(w.status(&h), Some(Status::HostUnreach));
        let other_fabric = FabricAddr::new(FabricAddr::node_of(0xbad, 2, 1), 3, 4);
        let s = w.send(0, a, other_fabric, None, 0, 3, b"x");
        assert_eq!(w.status(&s), Some(Status::AddrNotAvail));

        w.fabric.outbox.set_hosts([(2, true)].into_iter());
        let mut r = Request::new(Opcode::TSend);
        r.ep = a.ep;
        r.peer = there;
        r.tag = 0x77;
        r.data = 0x55;
        r.flags = flags::REMOTE_CQ_DATA;
        r.cookie = 4;
        let s = w.submit(0, r, b"payload", 0);
        assert!(w.result(&s).is_none(), "waits for the other host's verdict");
        let mut out: Vec<_> = w.fabric.outbox.take().into();
        assert_eq!(out.len(), 1);
        let Some(Outbound::Send(send)) = out.pop() else {
            panic!("not a send");
        };
        let d = send.desc;
        assert_eq!(send.host, 2);
        assert_eq!(send.payload, b"payload");
        assert_eq!(u64::from(d.total_len), 7);
        assert_eq!((u64::from(d.tag), u64::from(d.data)), (0x77, 0x55));
        assert_eq!(u32::from(d.flags), data_flags::REMOTE_CQ_DATA);
        assert_eq!(u16::from(d.opcode), Opcode::TSend as u16);
        assert_eq!(
            (u32::from(d.src_ep), u32::from(d.src_gen)),
            (a.ep, a.generation)
        );
        assert_eq!((u16::from(d.dst_dev), u32::from(d.dst_ep)), (1, 3));
        assert_eq!(u32::from(d.dst_gen), 4);
        let mut n = Notify::default();
        w.fabric
            .complete_remote(send.dev, &send.port, &send.req, 7, Status::Ok, &[], &mut n);
        drop(n);
        assert_eq!(w.status(&s), Some(Status::Ok));
        assert_eq!(u64::from(w.comp(&s).len), 7);

        // An RMA read: its range goes out, the bytes that come back land in the data area.
        let mut rd = Request::new(Opcode::RmaRead);
        rd.ep = a.ep;
        rd.peer = there;
        rd.remote_addr = 0x1000;
        rd.remote_key = 9;
        rd.cookie = 5;
        let h = w.submit(0, rd, &[], 6);
        let Some(Outbound::Send(send)) = w.fabric.outbox.take().pop_front() else {
            panic!("no RMA request went out");
        };
        assert_eq!(u32::from(send.desc.count), 1);
        assert_eq!(u16::from(send.desc.opcode), Opcode::RmaRead as u16);
        let range = vfabric_proto::RmaIov::from_slice(&send.payload).unwrap();
        assert_eq!(
            (
                u64::from(range.addr),
                u64::from(range.len),
                u64::from(range.key)
            ),
            (0x1000, 6, 9)
        );
        let mut n = Notify::default();
        w.fabric.complete_remote(
            send.dev,
            &send.port,
            &send.req,
            6,
            Status::Ok,
            b"remote",
            &mut n,
        );
        drop(n);
        assert_eq!(w.status(&h), Some(Status::Ok));
        assert_eq!(w.data(&h, 6), b"remote");
    }

    #[test]
    fn a_fence_towards_another_host_waits_for_earlier_verdicts() {
        let mut w = World::new(1, Limits::default());
        let a = w.open(0, RDM);
        let there = FabricAddr::new(FabricAddr::node_of(TEST_FABRIC, 2, 0), 1, 1);
        w.fabric.outbox.set_hosts([(2, true)].into_iter());
        let first = w.send(0, a, there, None, 0, 1, b"first");
        let fenced = w.send(0, a, there, None, flags::FENCE, 2, b"fenced");
        let mut out: Vec<_> = w.fabric.outbox.take().into();
        assert_eq!(out.len(), 1, "the fenced send waits");
        let Some(Outbound::Send(s)) = out.pop() else {
            panic!("not a send");
        };
        assert_eq!(s.payload, b"first");
        // Its verdict arrives: the fenced send goes out.
        let mut n = Notify::default();
        w.fabric.outbox.finished((0, a.ep, 2), s.charged);
        w.fabric
            .complete_remote(s.dev, &s.port, &s.req, s.len, Status::Ok, &[], &mut n);
        w.fabric.remote_unfence(&mut n);
        drop(n);
        assert_eq!(w.status(&first), Some(Status::Ok));
        assert!(w.result(&fenced).is_none());
        let mut out: Vec<_> = w.fabric.outbox.take().into();
        let Some(Outbound::Send(s)) = out.pop() else {
            panic!("the fenced send did not start");
        };
        assert_eq!(s.payload, b"fenced");
    }

    #[test]
    fn messages_from_another_host_match_like_local_ones() {
        let mut w = World::new(1, limits());
        let b = w.open(0, RDM);
        let src = FabricAddr::new(FabricAddr::node_of(TEST_FABRIC, 2, 1), 5, 6);

        // Into a posted receive, truncated.
        let r = w.recv(0, b, None, 0, 1, 0, 4);
        assert_eq!(
            accept(&w, incoming(1, b, None, b"0123456789")),
            Some(Status::Ok)
        );
        let c = w.comp(&r);
        assert_eq!(w.status(&r), Some(Status::Truncated));
        assert_eq!((u64::from(c.len), u64::from(c.olen)), (4, 6));
        assert_eq!(FabricAddr::from_wire(&c.src), src);
        assert_eq!(w.data(&r, 4), b"0123");

        // Unexpected (eager, within the bound), tagged, matched later with ignore bits.
        assert_eq!(
            accept(&w, incoming(2, b, Some(0x1234), b"tagged")),
            Some(Status::Ok)
        );
        assert_eq!(w.fabric.unexpected_bytes(0), eager_cost(6));
        let r = w.recv(0, b, Some((0x1200, 0xff)), 0, 2, 0, 64);
        assert_eq!(w.data(&r, 6), b"tagged");
        assert_ne!(u32::from(w.comp(&r).flags) & comp_flags::TAGGED, 0);
        assert_eq!(w.fabric.unexpected_bytes(0), 0);

        // Above the eager threshold: held, its verdict sent when a receive takes it.
        let big = vec![7u8; 1000];
        assert_eq!(accept(&w, incoming(3, b, None, &big)), None);
        assert!(replies(&w).is_empty());
        let r = w.recv(0, b, None, 0, 3, 0, 2000);
        assert_eq!(w.data(&r, 1000), big);
        assert_eq!(replies(&w), vec![(2, 3, Status::Ok)]);

        // A directed receive for another source (on another peer host, so it stays posted)
        // does not take it.
        w.fabric
            .outbox
            .set_hosts([(2, true), (3, true)].into_iter());
        let other = FabricAddr::new(FabricAddr::node_of(TEST_FABRIC, 3, 1), 5, 6);
        let mut rq = Request::new(Opcode::Recv);
        rq.ep = b.ep;
        rq.peer = other;
        rq.flags = flags::DIRECTED;
        rq.cookie = 4;
        let directed = w.submit(0, rq, &[], 64);
        assert_eq!(
            accept(&w, incoming(4, b, None, b"not yours")),
            Some(Status::Ok)
        );
        assert!(w.result(&directed).is_none());

        // Held messages of a host that went away are dropped without a verdict.
        assert_eq!(accept(&w, incoming(5, b, None, &big)), None);
        let mut n = Notify::default();
        assert!(w.result(&directed).is_none());
        assert!(
            w.fabric.purge_remote(3, &mut n).is_empty(),
            "another host's"
        );
        n.flush();
        // The receive directed at host 3's endpoint can never be satisfied now.
        assert_eq!(w.status(&directed), Some(Status::PeerGone));
        assert_eq!(w.fabric.purge_remote(2, &mut n), vec![5]);
        drop(n);
        assert!(replies(&w).is_empty());
        assert_eq!(
            w.fabric
                .remote_held_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );

        // A held message whose endpoint closes: its sender learns PeerGone.
        assert_eq!(accept(&w, incoming(6, b, None, &big)), None);
        let mut cl = Request::new(Opcode::EpClose);
        cl.ep = b.ep;
        let h = w.submit(0, cl, &[], 0);
        assert_eq!(w.status(&h), Some(Status::Ok));
        assert_eq!(replies(&w), vec![(2, 6, Status::PeerGone)]);

        // A closed endpoint, a stale generation, a device that does not exist, a mismatched
        // endpoint type: AddrNotAvail, as for a local sender.
        assert_eq!(
            accept(&w, incoming(7, b, None, b"x")),
            Some(Status::AddrNotAvail)
        );
        let b2 = w.open(0, RDM);
        let stale = FabricAddr::new(b2.node, b2.ep, b2.generation + 1);
        assert_eq!(
            accept(&w, incoming(8, stale, None, b"x")),
            Some(Status::AddrNotAvail)
        );
        let nowhere = FabricAddr::new(FabricAddr::node_of(TEST_FABRIC, 0, 9), b2.ep, b2.generation);
        assert_eq!(
            accept(&w, incoming(9, nowhere, None, b"x")),
            Some(Status::AddrNotAvail)
        );
        let mut dgram = incoming(10, b2, None, b"x");
        dgram.desc.ep_kind = (ep_open::TYPE_DGRAM as u16).into();
        assert_eq!(accept(&w, dgram), Some(Status::AddrNotAvail));
        // Delivery complete is never buffered eagerly.
        let mut dc = incoming(11, b2, None, b"x");
        dc.desc.flags = data_flags::DELIVERY_COMPLETE.into();
        assert_eq!(accept(&w, dc), None);
        let r = w.recv(0, b2, None, 0, 11, 0, 8);
        assert_eq!(w.data(&r, 1), b"x");
        assert_eq!(replies(&w), vec![(2, 11, Status::Ok)]);
    }
    /// Limits where three 1000-byte messages fill the held-bytes bound.
    fn stub_limits() -> Limits {
        Limits {
            eager_threshold: 200,
            max_unexpected_bytes: 200,
            max_msg_size: 3000,
            ..Limits::default()
        }
    }

    /// The PULLs the outbox holds for the uplink (host, request id), in order; other
    /// messages are returned apart.
    type Verdicts = Vec<(u16, u64, Status)>;

    fn pulls(w: &World) -> (Vec<(u16, u64)>, Verdicts) {
        let (mut pulls, mut replies) = (Vec::new(), Vec::new());
        for m in w.fabric.outbox.take() {
            match m {
                Outbound::Pull { host, req_id } => pulls.push((host, req_id)),
                Outbound::Reply {
                    host,
                    req_id,
                    status,
                    ..
                } => replies.push((host, req_id, status)),
                _ => {}
            }
        }
        (pulls, replies)
    }

    fn pulled(req_id: u64, to: FabricAddr, bytes: &[u8]) -> Incoming {
        let mut m = incoming(req_id, to, None, bytes);
        m.desc.flags = data_flags::PULLED.into();
        m
    }

    fn held_bytes(w: &World) -> u64 {
        w.fabric
            .remote_held_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    #[test]
    fn past_the_bound_messages_from_another_host_are_stubs_that_receives_pull() {
        let mut w = World::new(1, stub_limits());
        let b = w.open(0, RDM);
        let msg = |i: u64| vec![i as u8; 1000];
        // Ten messages, none refused: three held with their bytes, then stubs (and a small
        // one behind a stub is a stub too, not eager).
        for i in 1..=10 {
            assert_eq!(accept(&w, incoming(i, b, None, &msg(i))), None, "{i}");
        }
        assert_eq!(accept(&w, incoming(11, b, None, b"small")), None);
        assert_eq!(held_bytes(&w), 3000);
        assert_eq!(w.fabric.stubs_of(2), 8);
        assert_eq!(w.fabric.unexpected_bytes(0), 0);
        // Receives take the held ones at once and pull the stubs, in order.
        let rs: Vec<_> = (1..=11)
            .map(|i| w.recv(0, b, None, 0, i, 0, 2000))
            .collect();
        for (i, r) in rs.iter().enumerate().take(3) {
            assert_eq!(w.data(r, 1000), msg(i as u64 + 1));
        }
        assert!(rs[3..].iter().all(|r| w.result(r).is_none()));
        let (p, r) = pulls(&w);
        assert_eq!(p, (4..=11).map(|i| (2, i)).collect::<Vec<_>>());
        assert_eq!(
            r,
            vec![(2, 1, Status::Ok), (2, 2, Status::Ok), (2, 3, Status::Ok)]
        );
        // The bytes come (in any order); each lands in its receive.
        for i in (4..=10).rev() {
            assert_eq!(accept(&w, pulled(i, b, &msg(i))), Some(Status::Ok));
            assert_eq!(w.data(&rs[i as usize - 1], 1000), msg(i));
        }
        // Bytes of another length than the stub said: refused, the receive matched again.
        assert_eq!(accept(&w, pulled(11, b, b"longer")), Some(Status::Invalid));
        assert!(w.result(&rs[10]).is_none());
        assert_eq!(accept(&w, incoming(12, b, None, b"next")), Some(Status::Ok));
        assert_eq!(w.data(&rs[10], 4), b"next");
        // Bytes nobody asked for.
        assert_eq!(accept(&w, pulled(4, b, &msg(4))), Some(Status::Invalid));
        assert_eq!(w.fabric.stubs_of(2), 0);
        assert_eq!(held_bytes(&w), 0);

        // Stubs of one host are bounded by what a sender may have outstanding.
        let c = w.open(0, RDM);
        for i in 0..3 {
            assert_eq!(accept(&w, incoming(100 + i, c, None, &msg(1))), None);
        }
        let max = crate::uplink::remote::MAX_INFLIGHT as u64;
        for i in 0..max {
            let bytes = if i == 0 { msg(1) } else { Vec::new() };
            assert_eq!(accept(&w, incoming(200 + i, c, None, &bytes)), None);
        }
        assert_eq!(
            accept(&w, incoming(200 + max, c, None, b"")),
            Some(Status::NoResources)
        );
        let mut n = Notify::default();
        assert_eq!(w.fabric.purge_remote(2, &mut n).len() as u64, 3 + max);
        drop(n);
        assert_eq!(w.fabric.stubs_of(2), 0);
    }

    /// A rendezvous message not read yet is a stub at once when it would be one once read.
    /// Write `bytes` where a direct read of `dest` lands (what the uplink's `fi_read` does).
    fn land(dest: &super::DirectDest, bytes: &[u8]) {
        let room: usize = dest.bytes.iter().map(|g| g.len()).sum();
        assert!(bytes.len() <= dest.len && dest.len == room);
        let mut left = bytes;
        for g in &dest.bytes {
            let n = left.len().min(g.len());
            // SAFETY: the receive's buffer, mapped through `g`, claimed for this read.
            unsafe { std::ptr::copy_nonoverlapping(left.as_ptr(), g.ptr().cast_mut(), n) };
            left = &left[n..];
        }
    }

    #[test]
    fn a_receive_read_into_directly_completes_once_and_only_after_its_read() {
        let mut w = World::new(1, limits());
        let b = w.open(0, RDM);
        let msg = |i: u8, len: usize| vec![i; len];
        // Claimed before the read, completed when placed, as accept_remote would.
        let r1 = w.recv(0, b, None, 0, 1, 0, 60_000);
        let m1 = incoming(1, b, None, &msg(1, 50_000));
        let d1 = w
            .fabric
            .claim_direct(2, 1, &m1.desc, 4)
            .expect("a posted receive");
        assert_eq!(d1.len, 50_000);
        assert!(w.result(&r1).is_none());
        // A later message does not find the claimed receive: it is buffered.
        assert_eq!(accept(&w, incoming(2, b, None, b"two")), Some(Status::Ok));
        land(&d1, &msg(1, 50_000));
        let mut n = Notify::default();
        assert_eq!(w.fabric.direct_placed(2, 1, d1, &mut n), Status::Ok);
        drop(n);
        assert_eq!(w.data(&r1, 50_000), msg(1, 50_000));
        let r2 = w.recv(0, b, None, 0, 2, 0, 100);
        assert_eq!(w.data(&r2, 3), b"two");
        // No posted receive: not claimed.
        let m3 = incoming(3, b, None, &msg(3, 50_000));
        assert!(w.fabric.claim_direct(2, 3, &m3.desc, 4).is_none());

        // A failed read gives the receive back to matching, in front of later receives.
        let r4 = w.recv(0, b, None, 0, 4, 0, 60_000);
        let d4 = w.fabric.claim_direct(2, 4, &m3.desc, 4).expect("claimed");
        let r5 = w.recv(0, b, None, 0, 5, 0, 60_000);
        let mut n = Notify::default();
        w.fabric.direct_unclaim(2, 4, d4, &mut n);
        drop(n);
        assert_eq!(accept(&w, incoming(6, b, None, b"six")), Some(Status::Ok));
        assert_eq!(w.data(&r4, 3), b"six", "the older receive first");
        assert!(w.result(&r5).is_none());

        // EP_CLOSE with a read in flight: the close waits for the read's end, then the receive
        // completes CANCELED; the late placement finds nothing (its sender hears PEER_GONE).
        let d7 = w.fabric.claim_direct(2, 7, &m3.desc, 4).expect("claimed");
        let reader = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            land(&d7, &msg(7, 50_000));
            let at = std::time::Instant::now();
            d7.fence.end();
            (d7, at)
        });
        let mut cl = Request::new(Opcode::EpClose);
        cl.ep = b.ep;
        let h = w.submit(0, cl, &[], 0);
        let closed = std::time::Instant::now();
        let (d7, ended) = reader.join().unwrap();
        assert!(ended <= closed, "EP_CLOSE completed before the read ended");
        assert_eq!(w.status(&h), Some(Status::Ok));
        assert_eq!(w.status(&r5), Some(Status::Canceled));
        let mut n = Notify::default();
        assert_eq!(w.fabric.direct_placed(2, 7, d7, &mut n), Status::PeerGone);
        drop(n);

        // A reset with a read in flight whose destination was dropped (the uplink stopped):
        // the fence ends with it, the reset does not hang.
        let c = w.open(0, RDM);
        let _r8 = w.recv(0, c, None, 0, 8, 0, 60_000);
        let m8 = incoming(8, c, None, &msg(8, 50_000));
        let d8 = w.fabric.claim_direct(2, 8, &m8.desc, 4).expect("claimed");
        drop(d8);
        let mut n = Notify::default();
        w.fabric.reset(0, Teardown::Silent, &mut n);
    }

    /// A receive whose buffer is several ranges is read into directly, one range per piece of
    /// it the message fills (a shorter message, fewer), when the uplink can read into that
    /// many at once; more ranges than that are left to the daemon buffer's copy.
    #[test]
    fn a_receive_in_several_ranges_is_read_into_range_by_range() {
        use crate::chain::Seg;
        let mut w = World::new(1, limits());
        let b = w.open(0, RDM);
        let segs: Vec<Seg> = [3000u32, 5, 7000, 20_000]
            .iter()
            .map(|&len| Seg {
                addr: w.guests[0].alloc(u64::from(len) + 100) + 3,
                len,
            })
            .collect();
        let recv = |w: &mut World, cookie: u64| {
            let mut r = Request::new(Opcode::Recv);
            r.ep = b.ep;
            r.cookie = cookie;
            w.submit_into(0, r, &[], &segs)
        };
        let msg: Vec<u8> = (0..9_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let m = incoming(1, b, None, &msg);
        // Three ranges hold the message's 9 000 bytes: more than the uplink's limit of two.
        let r1 = recv(&mut w, 1);
        assert!(w.fabric.claim_direct(2, 1, &m.desc, 2).is_none());
        assert!(w.result(&r1).is_none(), "still posted");
        let d = w.fabric.claim_direct(2, 1, &m.desc, 3).expect("claimed");
        let lens: Vec<usize> = d.bytes.iter().map(|g| g.len()).collect();
        assert_eq!((d.len, lens), (9_000, vec![3000, 5, 5995]));
        land(&d, &msg);
        let mut n = Notify::default();
        assert_eq!(w.fabric.direct_placed(2, 1, d, &mut n), Status::Ok);
        drop(n);
        assert_eq!(w.status(&r1), Some(Status::Ok));
        use vm_memory::Bytes;
        let mut got = Vec::new();
        for s in &segs {
            let mut v = vec![0u8; s.len as usize];
            w.guests[0]
                .mem
                .read_slice(&mut v, vm_memory::GuestAddress(s.addr))
                .unwrap();
            got.extend(v);
        }
        assert_eq!(&got[..msg.len()], msg.as_slice());
        assert!(got[msg.len()..].iter().all(|&x| x == 0), "nothing past it");
    }

    /// An RMA write from another host into ranges of two regions is read straight into both
    /// (one range each), both regions entered until the write is over; past the uplink's
    /// limit of ranges, or with a bad key among them, it is left to `accept_remote_rma`.
    #[test]
    fn a_remote_write_into_several_regions_is_read_into_each() {
        let mut w = World::new(1, Limits::default());
        let b = w.open(0, RDM);
        const B1: u64 = 0x10_0000;
        const B2: u64 = 0x20_0000;
        let k1 = plain_region(&mut w, B1);
        let k2 = plain_region(&mut w, B2);
        let data: Vec<u8> = (0..50u8).collect();
        let ranges = [(B1 + 3, 20, k1), (B2 + 1, 30, k2)];
        let m = flush_from_host(b, &ranges, &data, 0);
        let head = &m.bytes[..2 * RMA_IOV_LEN];
        assert!(w.fabric.claim_direct_write(2, &m.desc, head, 1).is_none());
        let bad = flush_from_host(b, &[ranges[0], (B2 + 1, 30, k2 ^ 1)], &data, 0);
        let bad_head = &bad.bytes[..2 * RMA_IOV_LEN];
        assert!(w
            .fabric
            .claim_direct_write(2, &bad.desc, bad_head, 2)
            .is_none());
        let d = w
            .fabric
            .claim_direct_write(2, &m.desc, head, 2)
            .expect("claimed");
        let lens: Vec<usize> = d.bytes.iter().map(|g| g.len()).collect();
        assert_eq!((d.len, lens), (50, vec![20, 30]));
        land(&d, &data);
        let mut n = Notify::default();
        assert_eq!(w.fabric.direct_placed(2, 1, d, &mut n), Status::Ok);
        drop(n);
        let read = |w: &mut World, addr: u64, key: u64, len: u64| {
            let mut rd = Request::new(Opcode::RmaRead);
            rd.ep = b.ep;
            rd.peer = b;
            rd.remote_addr = addr;
            rd.remote_key = key;
            let h = w.submit(0, rd, &[], len);
            assert_eq!(w.status(&h), Some(Status::Ok));
            w.data(&h, len as usize)
        };
        let mut want = vec![0u8; 3];
        want.extend_from_slice(&data[..20]);
        want.resize(64, 0);
        assert_eq!(read(&mut w, B1, k1, 64), want);
        let mut want = vec![0u8; 1];
        want.extend_from_slice(&data[20..]);
        want.resize(64, 0);
        assert_eq!(read(&mut w, B2, k2, 64), want);
    }

    #[test]
    fn an_unread_rendezvous_message_past_the_bound_is_a_stub_without_its_bytes() {
        let mut w = World::new(1, stub_limits());
        let b = w.open(0, RDM);
        let msg = |i: u64| vec![i as u8; 1000];
        let unread = |w: &World, i: u64| {
            let m = incoming(i, b, None, &msg(i));
            w.fabric.stub_unread(2, i, &m.desc)
        };
        assert!(!unread(&w, 1), "within the bound: read it");
        for i in 1..=3 {
            assert_eq!(accept(&w, incoming(i, b, None, &msg(i))), None);
        }
        // A posted receive that matches: read it (it goes straight there).
        let mut tagged = Request::new(Opcode::TRecv);
        tagged.ep = b.ep;
        tagged.tag = 9;
        let other = w.submit(0, tagged, &[], 2000);
        assert!(w.result(&other).is_none());
        assert!(unread(&w, 4), "past the bound, no receive for it");
        assert_eq!(w.fabric.stubs_of(2), 1);
        let mut pulled_flag = incoming(5, b, None, &msg(5));
        pulled_flag.desc.flags = data_flags::PULLED.into();
        assert!(!w.fabric.stub_unread(2, 5, &pulled_flag.desc));
        let mut dgram = incoming(5, b, None, &msg(5));
        dgram.desc.ep_kind = (ep_open::TYPE_DGRAM as u16).into();
        assert!(!w.fabric.stub_unread(2, 5, &dgram.desc));
        let mut t = incoming(5, b, Some(9), &msg(5));
        t.desc.opcode = (Opcode::TSend as u16).into();
        assert!(
            !w.fabric.stub_unread(2, 5, &t.desc),
            "the tagged receive takes it"
        );
        // Receives take the held three, then pull the stub made unread.
        let rs: Vec<_> = (1..=4).map(|i| w.recv(0, b, None, 0, i, 0, 2000)).collect();
        assert_eq!(pulls(&w).0, vec![(2, 4)]);
        assert_eq!(accept(&w, pulled(4, b, &msg(4))), Some(Status::Ok));
        assert_eq!(w.data(&rs[3], 1000), msg(4));
        assert_eq!(w.fabric.stubs_of(2), 0);
    }

    #[test]
    fn stubs_end_cleanly_on_cancel_close_and_a_lost_host() {
        let mut w = World::new(1, stub_limits());
        let b = w.open(0, RDM);
        let msg = |i: u64| vec![i as u8; 1000];
        for i in 1..=3 {
            assert_eq!(accept(&w, incoming(i, b, None, &msg(i))), None);
        }
        // A queued stub withdrawn by its sender: gone, unanswered.
        assert_eq!(accept(&w, incoming(4, b, None, &msg(4))), None);
        assert_eq!(w.fabric.stubs_of(2), 1);
        let mut n = Notify::default();
        w.fabric.withdraw_remote(2, 4, &mut n);
        drop(n);
        assert_eq!(w.fabric.stubs_of(2), 0);
        // A stub being pulled, withdrawn: its receive goes back in front of later ones.
        assert_eq!(accept(&w, incoming(5, b, None, &msg(5))), None);
        let _ = pulls(&w);
        let held: Vec<_> = (1..=3).map(|i| w.recv(0, b, None, 0, i, 0, 2000)).collect();
        let r5 = w.recv(0, b, None, 0, 5, 0, 2000);
        let (p, _) = pulls(&w);
        assert_eq!(p, vec![(2, 5)]);
        assert!(held.iter().all(|r| w.status(r) == Some(Status::Ok)));
        let later = w.recv(0, b, None, 0, 6, 0, 2000);
        let mut n = Notify::default();
        w.fabric.withdraw_remote(2, 5, &mut n);
        drop(n);
        assert!(w.result(&r5).is_none());
        assert_eq!(accept(&w, incoming(6, b, None, b"six")), Some(Status::Ok));
        assert_eq!(w.data(&r5, 3), b"six", "the older receive first");
        assert!(w.result(&later).is_none());
        // Its late bytes find nothing.
        assert_eq!(accept(&w, pulled(5, b, &msg(5))), Some(Status::Invalid));

        // A stub being pulled when its sender's host is lost: the receive waits for another
        // message, the stub's id is among the dropped.
        assert_eq!(accept(&w, incoming(7, b, None, &msg(7))), Some(Status::Ok));
        assert_eq!(w.data(&later, 1000), msg(7));
        for i in 8..=11 {
            assert_eq!(accept(&w, incoming(i, b, None, &msg(i))), None);
        }
        let _ = pulls(&w);
        let rs: Vec<_> = (8..=11)
            .map(|i| w.recv(0, b, None, 0, i, 0, 2000))
            .collect();
        for (i, r) in rs.iter().enumerate().take(3) {
            assert_eq!(w.data(r, 1000), msg(i as u64 + 8));
        }
        assert_eq!(pulls(&w).0, vec![(2, 11)]);
        let mut n = Notify::default();
        assert_eq!(w.fabric.purge_remote(2, &mut n), vec![11]);
        drop(n);
        assert!(w.result(&rs[3]).is_none(), "posted again");
        assert_eq!(w.fabric.stubs_of(2), 0);
        assert_eq!(
            accept(&w, incoming(12, b, None, b"twelve")),
            Some(Status::Ok)
        );
        assert_eq!(w.data(&rs[3], 6), b"twelve");

        // The receiver's endpoint closes with one stub queued and one being pulled: the
        // receive completes CANCELED, both senders learn PEER_GONE, late bytes are refused.
        for i in 13..=17 {
            assert_eq!(accept(&w, incoming(i, b, None, &msg(i))), None);
        }
        let rs: Vec<_> = (13..=16)
            .map(|i| w.recv(0, b, None, 0, i, 0, 2000))
            .collect();
        assert_eq!(pulls(&w).0, vec![(2, 16)]);
        let mut cl = Request::new(Opcode::EpClose);
        cl.ep = b.ep;
        let h = w.submit(0, cl, &[], 0);
        assert_eq!(w.status(&h), Some(Status::Ok));
        assert_eq!(w.status(&rs[3]), Some(Status::Canceled));
        let (_, mut r) = pulls(&w);
        r.sort_by_key(|x| x.1);
        assert_eq!(
            r,
            vec![(2, 16, Status::PeerGone), (2, 17, Status::PeerGone)]
        );
        assert_eq!(
            accept(&w, pulled(16, b, &msg(16))),
            Some(Status::AddrNotAvail)
        );
        assert_eq!(w.fabric.stubs_of(2), 0);

        // A device reset (its rings gone) with a stub being pulled: forgotten, PEER_GONE.
        let c = w.open(0, RDM);
        for i in 20..=23 {
            assert_eq!(accept(&w, incoming(i, c, None, &msg(i))), None);
        }
        let rs: Vec<_> = (20..=23)
            .map(|i| w.recv(0, c, None, 0, i, 0, 2000))
            .collect();
        assert!(w.result(&rs[3]).is_none());
        let _ = pulls(&w);
        let mut n = Notify::default();
        w.fabric.reset(0, Teardown::Silent, &mut n);
        drop(n);
        assert!(w.result(&rs[3]).is_none(), "no completion into a gone ring");
        assert_eq!(pulls(&w).1, vec![(2, 23, Status::PeerGone)]);
        assert_eq!(w.fabric.stubs_of(2), 0);
    }

    /// The sender's side of a PULL: only a message pending at the pulling host, at most
    /// `MAX_PULLS` times; a message sent again keeps its id, goes only while it is pending, and
    /// a withdrawal drops it (its pending entry gets the CANCEL).
    #[test]
    fn a_pulled_message_is_sent_again_only_while_pending() {
        use crate::uplink::remote::MAX_PULLS;
        let mut w = World::new(1, Limits::default());
        let a = w.open(0, RDM);
        let there = FabricAddr::new(FabricAddr::node_of(TEST_FABRIC, 2, 1), 3, 4);
        w.fabric
            .outbox
            .set_hosts([(2, true), (3, true)].into_iter());
        let _ = w.send(0, a, there, None, 0, 1, b"pull me");
        let mut rd = Request::new(Opcode::RmaRead);
        rd.ep = a.ep;
        rd.peer = there;
        let _read = w.submit(0, rd, &[], 8);
        let (_, ids) = outgoing(&w);
        let (send_id, read_id) = (ids[0], ids[1]);
        assert!(
            w.fabric.outbox.pulled(read_id, 2).is_none(),
            "not a message"
        );
        assert!(
            w.fabric.outbox.pulled(send_id, 3).is_none(),
            "another host's"
        );
        let again = |w: &World, send_id: u64| {
            let (dev, port, req, mut desc, len) = w.fabric.outbox.pulled(send_id, 2)?;
            desc.flags = (u32::from(desc.flags) | data_flags::PULLED).into();
            w.fabric.outbox.push(Outbound::Send(Box::new(
                crate::uplink::remote::RemoteSend {
                    host: 2,
                    dev,
                    port,
                    req,
                    desc,
                    payload: b"pull me".to_vec(),
                    len,
                    charged: 0,
                    guest: Vec::new(),
                    sink: Vec::new(),
                },
            )));
            Some(())
        };
        for _ in 0..MAX_PULLS {
            assert!(again(&w, send_id).is_some());
        }
        assert!(again(&w, send_id).is_none(), "pulled too often");
        // Sent again under its own id, not entered twice.
        let (_, ids) = outgoing(&w);
        assert_eq!(ids, vec![send_id; MAX_PULLS as usize]);
        // Withdrawn (its endpoint closes) with a resend still queued: the resend never
        // leaves, the pending entry completes CANCELED and its CANCEL goes.
        let mut w = World::new(1, Limits::default());
        let a = w.open(0, RDM);
        w.fabric.outbox.set_hosts([(2, true)].into_iter());
        let s2 = w.send(0, a, there, None, 0, 1, b"pull me");
        let (_, ids) = outgoing(&w);
        let send_id = ids[0];
        assert!(again(&w, send_id).is_some());
        let mut cl = Request::new(Opcode::EpClose);
        cl.ep = a.ep;
        let h = w.submit(0, cl, &[], 0);
        assert_eq!(w.status(&h), Some(Status::Ok));
        assert_eq!(w.status(&s2), Some(Status::Canceled));
        let (cancels, sends) = outgoing(&w);
        assert_eq!((cancels, sends), (vec![(2, send_id)], vec![]));
        assert!(!w.fabric.outbox.busy((0, a.ep, 2)), "released once");
    }

    /// What the outbox holds for the uplink: `(kind, host, request id)` of every CANCEL, and
    /// the request ids of the DATA requests (which enter the pending table here).
    fn outgoing(w: &World) -> (Vec<(u16, u64)>, Vec<u64>) {
        let (mut cancels, mut sends) = (Vec::new(), Vec::new());
        for m in w.fabric.outbox.take() {
            match m {
                Outbound::Cancel { host, req_id } => cancels.push((host, req_id)),
                Outbound::Send(s) => sends.push(u64::from(s.desc.req_id)),
                _ => {}
            }
        }
        (cancels, sends)
    }

    #[test]
    fn an_endpoint_close_withdraws_its_requests_to_other_hosts() {
        let mut w = World::new(1, Limits::default());
        let a = w.open(0, RDM);
        let other = w.open(0, RDM);
        let there = FabricAddr::new(FabricAddr::node_of(TEST_FABRIC, 2, 1), 3, 4);
        w.fabric.outbox.set_hosts([(2, true)].into_iter());
        // Two sends and a read out on the wire (waiting for host 2's verdict), a FLUSH out too,
        // a send of another endpoint, then a send still queued here.
        let sent = w.send(0, a, there, None, 0, 1, b"sent");
        let mut rd = Request::new(Opcode::RmaRead);
        rd.ep = a.ep;
        rd.peer = there;
        rd.cookie = 2;
        let read = w.submit(0, rd, &[], 8);
        let mut fl = Request::new(Opcode::Flush);
        fl.ep = a.ep;
        fl.peer = there;
        fl.remote_key = 9;
        fl.cookie = 3;
        let flush = w.submit(0, fl, &[], 0);
        let theirs = w.send(0, other, there, None, 0, 4, b"theirs");
        let (_, ids) = outgoing(&w);
        assert_eq!(ids.len(), 4);
        let queued = w.send(0, a, there, None, 0, 5, b"queued");

        let mut cl = Request::new(Opcode::EpClose);
        cl.ep = a.ep;
        let h = w.submit(0, cl, &[], 0);
        assert_eq!(w.status(&h), Some(Status::Ok));
        for (x, what) in [(&sent, "sent"), (&read, "read"), (&queued, "queued")] {
            assert_eq!(w.status(x), Some(Status::Canceled), "{what}");
        }
        assert!(
            w.result(&flush).is_none(),
            "EP_CLOSE leaves a FLUSH pending"
        );
        assert!(w.result(&theirs).is_none(), "another endpoint's send stays");
        // The targets are told about what went out (not the queued send, which never left).
        let (mut cancels, sends) = outgoing(&w);
        cancels.sort();
        assert_eq!(cancels, vec![(2, ids[0]), (2, ids[1])]);
        assert!(sends.is_empty(), "the queued send never leaves");
        // Late verdicts find nothing (the uplink drops them); the others are still there.
        assert!(w.fabric.outbox.take_pending(ids[0], Some(2)).is_none());
        assert!(w.fabric.outbox.take_pending(ids[1], Some(2)).is_none());
        let p = w
            .fabric
            .outbox
            .take_pending(ids[3], Some(2))
            .expect("theirs");
        let mut n = Notify::default();
        w.fabric
            .complete_remote(p.dev, &p.port, &p.req, p.len, Status::Ok, &[], &mut n);
        drop(n);
        assert_eq!(w.status(&theirs), Some(Status::Ok));

        // A reset whose rings survive cancels the FLUSH too, and a pending ADDR_CHECK.
        let mut ck = Request::new(Opcode::AddrCheck);
        ck.peer = there;
        ck.cookie = 6;
        let check = w.submit(0, ck, &[], 0);
        assert!(w.result(&check).is_none(), "asks host 2");
        let mut n = Notify::default();
        w.fabric.reset(0, Teardown::Cancel, &mut n);
        drop(n);
        assert_eq!(w.status(&flush), Some(Status::Canceled));
        assert_eq!(w.status(&check), Some(Status::Canceled));
        assert!(!w.fabric.outbox.busy((0, a.ep, 2)), "reservations released");

        // A reset whose rings are gone (RESET_DEVICE, disconnection): forgotten, not completed,
        // and the target is still told.
        let c = w.open(0, RDM);
        let lost = w.send(0, c, there, None, 0, 7, b"lost");
        let (_, ids) = outgoing(&w);
        let mut n = Notify::default();
        w.fabric.reset(0, Teardown::Silent, &mut n);
        drop(n);
        assert!(w.result(&lost).is_none(), "no completion into a gone ring");
        let (cancels, _) = outgoing(&w);
        assert_eq!(cancels, vec![(2, ids[0])]);
        assert!(w.fabric.outbox.take_pending(ids[0], None).is_none());
        assert!(!w.fabric.outbox.busy((0, c.ep, 2)));
    }

    #[test]
    fn a_cancel_from_the_sender_drops_its_held_message() {
        let mut w = World::new(1, limits());
        let b = w.open(0, RDM);
        let big = vec![7u8; 1000];
        assert_eq!(accept(&w, incoming(3, b, None, &big)), None, "held");
        assert_eq!(accept(&w, incoming(4, b, None, &big)), None, "held");
        let mut n = Notify::default();
        w.fabric.withdraw_remote(2, 3, &mut n);
        w.fabric.withdraw_remote(3, 4, &mut n); // another host's id: not its request
        drop(n);
        let r = w.recv(0, b, None, 0, 1, 0, 2000);
        assert_eq!(w.status(&r), Some(Status::Ok));
        assert_eq!(
            replies(&w),
            vec![(2, 4, Status::Ok)],
            "request 3 never answered"
        );
        assert_eq!(
            w.fabric
                .remote_held_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        let r = w.recv(0, b, None, 0, 2, 0, 2000);
        assert!(w.result(&r).is_none(), "the withdrawn message is gone");
    }

    #[test]
    fn receives_directed_at_another_hosts_endpoint_fail_when_it_goes() {
        let mut w = World::new(1, limits());
        let b = w.open(0, RDM);
        w.fabric
            .outbox
            .set_hosts([(2, true), (3, false)].into_iter());
        let node = FabricAddr::node_of(TEST_FABRIC, 2, 1);
        let (x, y) = (FabricAddr::new(node, 5, 6), FabricAddr::new(node, 7, 1));
        let directed = |w: &mut World, at: FabricAddr, cookie: u64| {
            let mut rq = Request::new(Opcode::Recv);
            rq.ep = b.ep;
            rq.peer = at;
            rq.flags = flags::DIRECTED;
            rq.cookie = cookie;
            w.submit(0, rq, &[], 64)
        };
        let rx = directed(&mut w, x, 1);
        let rx2 = directed(&mut w, x, 2);
        let ry = directed(&mut w, y, 3);
        assert!(w.result(&rx).is_none() && w.result(&ry).is_none());
        // One query per endpoint asked about.
        let queries: Vec<FabricAddr> = w
            .fabric
            .outbox
            .take()
            .into_iter()
            .filter_map(|m| match m {
                Outbound::AddrQuery {
                    addr, req_id: 0, ..
                } => Some(addr),
                _ => None,
            })
            .collect();
        assert_eq!(queries, vec![x, y]);
        // x's driver closes it: PEER_GONE with PEER_CLOSED; y stays.
        let mut n = Notify::default();
        w.fabric.remote_ep_gone(node, Some((5, 6)), true, &mut n);
        drop(n);
        for h in [&rx, &rx2] {
            assert_eq!(w.status(h), Some(Status::PeerGone));
            assert_eq!(u64::from(w.comp(h).data), vfabric_proto::PEER_CLOSED);
        }
        assert!(w.result(&ry).is_none());
        // y is known open: no new query; then its device is reset (lost: data 0).
        w.fabric.outbox.known_open(y);
        let ry2 = directed(&mut w, y, 4);
        assert!(
            w.fabric.outbox.take().is_empty(),
            "known open, not asked again"
        );
        let mut n = Notify::default();
        w.fabric.remote_ep_gone(node, None, false, &mut n);
        drop(n);
        for h in [&ry, &ry2] {
            assert_eq!(w.status(h), Some(Status::PeerGone));
            assert_eq!(u64::from(w.comp(h).data), 0);
        }
        // Forgotten once gone: a new receive directed at it asks again.
        let _ = directed(&mut w, y, 5);
        assert_eq!(w.fabric.outbox.take().len(), 1);
        // A host that is down: PEER_GONE at once.
        let z = FabricAddr::new(FabricAddr::node_of(TEST_FABRIC, 3, 0), 1, 1);
        let rz = directed(&mut w, z, 6);
        assert_eq!(w.status(&rz), Some(Status::PeerGone));
        assert_eq!(u64::from(w.comp(&rz).data), 0);
    }

    /// A guest's ADDR_CHECK of another host's address is that host's to answer.
    #[test]
    fn addr_check_of_another_hosts_address_asks_that_host() {
        let mut w = World::new(1, Limits::default());
        w.fabric
            .outbox
            .set_hosts([(2, true), (3, false)].into_iter());
        let check = |w: &mut World, at: FabricAddr| {
            let mut ck = Request::new(Opcode::AddrCheck);
            ck.peer = at;
            w.submit(0, ck, &[], 0)
        };
        let x = FabricAddr::new(FabricAddr::node_of(TEST_FABRIC, 2, 1), 5, 6);
        let h = check(&mut w, x);
        assert!(w.result(&h).is_none(), "waits for host 2");
        let Some(Outbound::AddrQuery {
            host: 2,
            addr,
            req_id,
        }) = w.fabric.outbox.take().pop_front()
        else {
            panic!("no query");
        };
        assert_eq!(addr, x);
        let p = w
            .fabric
            .outbox
            .take_pending(req_id, Some(2))
            .expect("pending");
        let mut n = Notify::default();
        w.fabric
            .complete_remote(p.dev, &p.port, &p.req, 0, Status::Ok, &[], &mut n);
        drop(n);
        assert_eq!(w.status(&h), Some(Status::Ok));
        let down = FabricAddr::new(FabricAddr::node_of(TEST_FABRIC, 3, 0), 1, 1);
        let h = check(&mut w, down);
        assert_eq!(w.status(&h), Some(Status::HostUnreach));
        let stranger = FabricAddr::new(FabricAddr::node_of(TEST_FABRIC, 9, 0), 1, 1);
        let h = check(&mut w, stranger);
        assert_eq!(w.status(&h), Some(Status::AddrNotAvail));
    }

    /// A plain (not persistent) region of 64 bytes at address `base` of device 0 with remote
    /// read and write access: its key.
    fn plain_region(w: &mut World, base: u64) -> u64 {
        let mut r = Request::new(Opcode::MrReg);
        r.count = 1;
        r.remote_addr = base;
        r.compare = vfabric_proto::mr_flags::REMOTE_READ
            | vfabric_proto::mr_flags::REMOTE_WRITE
            | vfabric_proto::mr_flags::PROV_KEY;
        let seg = w.guests[0].alloc(64);
        let mut payload = seg.to_le_bytes().to_vec();
        payload.extend_from_slice(&64u64.to_le_bytes());
        let h = w.submit(0, r, &payload, 0);
        assert_eq!(w.status(&h), Some(Status::Ok));
        u64::from(w.comp(&h).data)
    }

    /// A FLUSH (or, with `data`, an RMA write) from host 2 to `to` with `ranges` and wire
    /// `flags`.
    fn flush_from_host(
        to: FabricAddr,
        ranges: &[(u64, u64, u64)],
        data: &[u8],
        flags: u32,
    ) -> Incoming {
        let mut bytes: Vec<u8> = ranges
            .iter()
            .flat_map(|&(addr, len, key)| {
                vfabric_proto::RmaIov {
                    addr: addr.into(),
                    len: len.into(),
                    key: key.into(),
                }
                .as_slice()
                .to_vec()
            })
            .collect();
        bytes.extend_from_slice(data);
        let mut m = incoming(1, to, None, &bytes);
        let opcode = if data.is_empty() {
            Opcode::Flush
        } else {
            Opcode::RmaWrite
        };
        m.desc.opcode = (opcode as u16).into();
        m.desc.count = (ranges.len() as u32).into();
        m.desc.flags = flags.into();
        m
    }

    #[test]
    fn flushes_from_another_host_are_checked_like_local_ones() {
        let mut w = World::new(1, Limits::default());
        let b = w.open(0, RDM);
        const BASE: u64 = 0x10_0000;
        let key = plain_region(&mut w, BASE);
        let verdict = |w: &World, m: Incoming| {
            let mut n = Notify::default();
            w.fabric
                .accept_remote_rma(m, &mut n)
                .map(|(s, _)| s)
                .expect("no handled region: an answer at once")
        };
        let commit = data_flags::COMMIT_COMPLETE;
        let whole = data_flags::WHOLE_REGION;
        // A visibility flush of a plain region works; a persistent one is refused.
        assert_eq!(
            verdict(&w, flush_from_host(b, &[(BASE, 8, key)], &[], 0)),
            Status::Ok
        );
        assert_eq!(
            verdict(&w, flush_from_host(b, &[(BASE, 8, key)], &[], commit)),
            Status::Access
        );
        // So is a COMMIT_COMPLETE write to it, before any byte moves.
        assert_eq!(
            verdict(&w, flush_from_host(b, &[(BASE, 4, key)], b"abcd", commit)),
            Status::Access
        );
        let read4 = |w: &mut World| {
            let mut rd = Request::new(Opcode::RmaRead);
            rd.ep = b.ep;
            rd.peer = b;
            rd.remote_addr = BASE;
            rd.remote_key = key;
            let h = w.submit(0, rd, &[], 4);
            assert_eq!(w.status(&h), Some(Status::Ok));
            w.data(&h, 4)
        };
        assert_eq!(read4(&mut w), [0u8; 4], "the refused write left no trace");
        assert_eq!(
            verdict(&w, flush_from_host(b, &[(BASE, 4, key)], b"abcd", 0)),
            Status::Ok
        );
        assert_eq!(read4(&mut w), *b"abcd", "a plain write lands");
        // Out of range, a wrong key, an unknown device.
        assert_eq!(
            verdict(&w, flush_from_host(b, &[(BASE + 60, 8, key)], &[], 0)),
            Status::Access
        );
        assert_eq!(
            verdict(&w, flush_from_host(b, &[(BASE, 8, key ^ 1)], &[], 0)),
            Status::Access
        );
        let mut m = flush_from_host(b, &[(BASE, 8, key)], &[], 0);
        m.desc.dst_dev = 9.into();
        assert_eq!(verdict(&w, m), Status::AddrNotAvail);
        // A whole region names a key only; an unknown key is refused.
        assert_eq!(
            verdict(&w, flush_from_host(b, &[(0, 0, key)], &[], whole)),
            Status::Ok
        );
        assert_eq!(
            verdict(&w, flush_from_host(b, &[(BASE, 0, key)], &[], whole)),
            Status::Invalid
        );
        assert_eq!(
            verdict(&w, flush_from_host(b, &[(0, 0, key ^ 1)], &[], whole)),
            Status::Access
        );
        // Bytes beyond the ranges (the parser refuses them too): refused, not read.
        let mut m = flush_from_host(b, &[(BASE, 8, key)], &[], 0);
        m.bytes.push(0);
        assert_eq!(verdict(&w, m), Status::Invalid);
        // A stale generation of the target endpoint.
        let stale = FabricAddr::new(b.node, b.ep, b.generation + 1);
        assert_eq!(
            verdict(&w, flush_from_host(stale, &[(BASE, 8, key)], &[], 0)),
            Status::AddrNotAvail
        );
    }
}
