// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Memory regions and RMA (spec §6.8.4, §6.8.5, §6.10).
//!
//! Every remote access is resolved under the lock of the device that owns the target endpoint:
//! the key is looked up among that device's regions, the range is checked against the region
//! (no overflow) and the region's rights against the operation. The lock is then released and
//! the bytes move (one copy, guest memory to guest memory) while the access holds the region
//! ([`Mr::enter`]). MR_DEREG removes the region from the table and then waits for the accesses
//! that entered it before it completes ([`Mr::retire`]); an access that comes later misses the
//! key or finds the region retired and completes ACCESS. Nothing reads or writes a region after
//! its deregistration has completed.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use smallvec::SmallVec;
use tracing::debug;
use vfabric_proto::{
    comp_flags, ep_open, flags, mr_flags, ByteValued, FabricAddr, MemSeg, Opcode, RmaIov, Status,
    MEM_SEG_LEN, RMA_IOV_LEN, VIRTIO_FABRIC_F_REMOTE_CQ_DATA,
};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use super::{eager_cost, Body, Dev, Fabric, Meta, Msg, Notify, Port};
use crate::chain::{
    completion, copy_stream, CopyFault, GuestMemoryMmap, Req, Seg, Segs, COPY_CHUNK,
};
use crate::pmem::PmemFile;
use crate::xmem::PeerProcess;

/// A registered memory region.
pub(crate) struct Mr {
    /// Address of the region's first byte in the remote address space.
    base: u64,
    /// The region's bytes in the owner's guest memory.
    segs: Segs,
    access: u64,
    rma_event: bool,
    /// Commits to the region wait for the target driver's verdict (`mr_flags::COMMIT_EVENT`).
    pub(super) commit_event: bool,
    /// The segments are addresses of this process (`mr_flags::PROCESS_MEMORY`), not guest memory.
    pub(super) process: Option<Arc<PeerProcess>>,
    /// The region is persistent memory (`mr_flags::PMEM`): the file behind it (§6.17).
    pub(super) pmem: Option<Arc<PmemFile>>,
    /// Accesses between [`Mr::enter`] and the drop of their [`MrAccess`].
    inflight: AtomicU32,
    /// Deregistered: no access may enter any more.
    retired: AtomicBool,
}

/// An access in progress on a region: the region cannot finish deregistering while it lives.
pub(crate) struct MrAccess(Arc<Mr>);

impl Drop for MrAccess {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Release);
    }
}

impl Mr {
    /// Start an access; `None` once the region is deregistered.
    pub(crate) fn enter(self: &Arc<Self>) -> Option<MrAccess> {
        // SeqCst pairs with `retire`: either it sees our increment, or we see its flag.
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let access = MrAccess(self.clone());
        (!self.retired.load(Ordering::SeqCst)).then_some(access)
    }

    pub(super) fn base(&self) -> u64 {
        self.base
    }

    pub(super) fn len(&self) -> u64 {
        self.segs.len
    }

    /// Refuse new accesses and wait for those in progress (copies of at most `max_msg_size`
    /// bytes that take no lock). Call without holding any device lock.
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        while self.inflight.load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
    }
}

/// Coalesced remote-access events: (key, target endpoint, is write) → (accesses, bytes, last
/// initiator).
pub(crate) type PendingEvents = HashMap<(u64, u32, bool), (u64, u64, FabricAddr)>;

/// Provider keys: a keyed hash (random per daemon) of a counter, so keys are unpredictable to
/// guests and a key is not produced twice (the live table is checked too).
pub(crate) struct KeyGen {
    state: RandomState,
    next: u64,
}

impl KeyGen {
    pub fn new() -> Self {
        Self {
            state: RandomState::new(),
            next: 0,
        }
    }

    fn generate(&mut self) -> u64 {
        let mut h = self.state.build_hasher();
        h.write_u64(self.next);
        self.next = self.next.wrapping_add(1);
        h.finish()
    }
}

/// Remote ranges of one request kept inline (most RMA requests name one): no heap allocation.
pub(super) type Targets = SmallVec<[Target; 2]>;

/// One checked remote range: the region, its bytes for this access and the key (for events).
pub(super) struct Target {
    pub mr: Arc<Mr>,
    pub segs: Segs,
    pub key: u64,
    pub len: u64,
    /// Offset of the range in the region.
    pub off: u64,
}

/// Check `len` bytes at `addr` of region `key` of device `d` for `need` rights.
fn target(d: &Dev, key: u64, addr: u64, len: u64, need: u64) -> Result<Target, Status> {
    let mr = d.mrs.get(&key).ok_or(Status::Access)?;
    if mr.access & need != need {
        return Err(Status::Access);
    }
    let off = addr.checked_sub(mr.base).ok_or(Status::Access)?;
    let end = off.checked_add(len).ok_or(Status::Access)?;
    if end > mr.segs.len {
        return Err(Status::Access);
    }
    let (_, tail) = mr.segs.split_at(off);
    let (segs, _) = tail.split_at(len);
    Ok(Target {
        mr: mr.clone(),
        segs,
        key,
        len,
        off,
    })
}

impl Fabric {
    pub(super) fn op_mr_reg(&self, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        let r = req.req;
        let fl = r.compare;
        if fl & !mr_flags::ALL != 0
            || fl & (mr_flags::REMOTE_READ | mr_flags::REMOTE_WRITE) == 0
            || r.count == 0
            || r.count > self.limits.max_sge
            || req.payload.len != u64::from(r.count) * MEM_SEG_LEN as u64
            || (fl & mr_flags::PROV_KEY != 0 && r.remote_key != 0)
            || (fl & mr_flags::COMMIT_EVENT != 0 && fl & mr_flags::PMEM == 0)
        {
            return self.fail(dev, port, &req, Status::Invalid, n);
        }
        // Persistent memory is process memory backed by a file (crate::pmem): in a guest
        // address space the device cannot make anything durable.
        if fl & mr_flags::PMEM != 0 && fl & mr_flags::PROCESS_MEMORY == 0 {
            return self.fail(dev, port, &req, Status::Access, n);
        }
        if fl & mr_flags::PMEM != 0 && r.count != 1 {
            return self.fail(dev, port, &req, Status::Invalid, n);
        }
        // Process memory: the frontend's own pages, checked by the kernel on each access.
        let process = if fl & mr_flags::PROCESS_MEMORY != 0 {
            match &port.process {
                Some(p) if p.pid().is_ok() => Some(p.clone()),
                _ => return self.fail(dev, port, &req, Status::Unsupported, n),
            }
        } else {
            None
        };
        let mem = port.mem.memory();
        let mut segs = Segs::default();
        for i in 0..u64::from(r.count) {
            let mut raw = MemSeg::default();
            if req
                .payload
                .read_at(&mem, i * MEM_SEG_LEN as u64, raw.as_mut_slice())
                .is_err()
            {
                return self.fail(dev, port, &req, Status::Fault, n);
            }
            let (mut addr, len) = (u64::from(raw.addr), u64::from(raw.len));
            if addr.checked_add(len).is_none() {
                return self.fail(dev, port, &req, Status::Fault, n);
            }
            let mut left = len;
            while left > 0 {
                let piece = left.min(1 << 30);
                if process.is_none()
                    && !GuestMemoryBackend::check_range(&*mem, GuestAddress(addr), piece as usize)
                {
                    return self.fail(dev, port, &req, Status::Fault, n);
                }
                segs.push(Seg {
                    addr,
                    len: piece as u32,
                });
                addr += piece;
                left -= piece;
            }
        }
        if segs.len == 0 || r.remote_addr.checked_add(segs.len - 1).is_none() {
            return self.fail(dev, port, &req, Status::Invalid, n);
        }
        let len = segs.len;
        if fl & mr_flags::PMEM != 0
            && super::pmem::pmem_regions(&self.dev(dev)) >= super::pmem::MAX_PMEM_REGIONS
        {
            return self.fail(dev, port, &req, Status::NoResources, n);
        }
        let pmem = match (fl & mr_flags::PMEM != 0, &process) {
            (true, Some(p)) => match super::pmem::open_region(p, &segs, r.tag, r.data) {
                Ok(f) => Some(Arc::new(f)),
                Err(why) => {
                    debug!(dev, %why, "persistent registration refused");
                    return self.fail(dev, port, &req, Status::Access, n);
                }
            },
            _ => None,
        };
        let granularity = pmem.as_ref().map_or(0, |p| p.granularity() as u64);
        let mut d = self.dev(dev);
        if d.mrs.len() >= self.limits.max_mrs as usize
            || (pmem.is_some() && super::pmem::pmem_regions(&d) >= super::pmem::MAX_PMEM_REGIONS)
        {
            drop(d);
            return self.fail(dev, port, &req, Status::NoResources, n);
        }
        let key = if fl & mr_flags::PROV_KEY != 0 {
            loop {
                let k = d.keys.generate();
                if !d.mrs.contains_key(&k) {
                    break k;
                }
            }
        } else {
            if d.mrs.contains_key(&r.remote_key) {
                drop(d);
                return self.fail(dev, port, &req, Status::KeyInUse, n);
            }
            r.remote_key
        };
        debug!(dev, key, len, flags = fl, "memory region registered");
        d.mrs.insert(
            key,
            Arc::new(Mr {
                base: r.remote_addr,
                segs,
                access: fl & (mr_flags::REMOTE_READ | mr_flags::REMOTE_WRITE),
                rma_event: fl & mr_flags::RMA_EVENT != 0,
                commit_event: fl & mr_flags::COMMIT_EVENT != 0,
                process,
                pmem,
                inflight: AtomicU32::new(0),
                retired: AtomicBool::new(false),
            }),
        );
        drop(d);
        let mut c = completion(Status::Ok, r.cookie);
        c.data = key.into();
        c.len = len.into();
        c.olen = granularity.into();
        self.done(dev, port, &req, &c, 0, n);
    }

    pub(super) fn op_mr_dereg(&self, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        let mr = self.dev(dev).mrs.remove(&req.req.remote_key);
        let s = match mr {
            Some(mr) => {
                // Accesses that found the key before it left the table finish first.
                mr.retire();
                debug!(dev, key = req.req.remote_key, "memory region deregistered");
                Status::Ok
            }
            None => Status::Invalid,
        };
        self.fail(dev, port, &req, s, n);
    }

    /// MR_EVENT: a buffer-less request the device completes with a remote-access report.
    pub(super) fn op_mr_event(&self, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        if req.data.len != 0 {
            return self.fail(dev, port, &req, Status::BadChain, n);
        }
        let mut d = self.dev(dev);
        d.mr_events.push_back(req);
        self.flush_events(dev, &mut d, n);
    }

    /// Report coalesced events of `dev` (locked as `d`) into its posted MR_EVENT requests.
    fn flush_events(&self, dev: usize, d: &mut Dev, n: &mut Notify) {
        let Some(port) = d.port.clone() else {
            return;
        };
        while !d.mr_events.is_empty() {
            let Some(&k) = d.pending_events.keys().next() else {
                break;
            };
            let Some((count, bytes, src)) = d.pending_events.remove(&k) else {
                break;
            };
            let Some(req) = d.mr_events.pop_front() else {
                break;
            };
            let (key, ep, write) = k;
            let mut c = completion(Status::Ok, req.req.cookie);
            c.flags = if write {
                comp_flags::REMOTE_WRITE
            } else {
                comp_flags::REMOTE_READ
            }
            .into();
            c.data = key.into();
            c.len = bytes.into();
            c.tag = u64::from(ep).into();
            c.olen = count.into();
            c.src = src.to_wire();
            self.done(dev, &port, &req, &c, 0, n);
        }
    }

    /// Record remote accesses to regions registered with RMA_EVENT.
    pub(super) fn record_events(
        &self,
        ddev: usize,
        dep: usize,
        src: FabricAddr,
        write: bool,
        targets: &[Target],
        n: &mut Notify,
    ) {
        if !targets.iter().any(|t| t.mr.rma_event) {
            return;
        }
        let mut d = self.dev(ddev);
        for t in targets.iter().filter(|t| t.mr.rma_event) {
            // A region deregistered meanwhile reports nothing more.
            if !d.mrs.get(&t.key).is_some_and(|m| Arc::ptr_eq(m, &t.mr)) {
                continue;
            }
            let e = d
                .pending_events
                .entry((t.key, dep as u32, write))
                .or_insert((0, 0, src));
            e.0 += 1;
            e.1 = e.1.saturating_add(t.len);
            e.2 = src;
        }
        self.flush_events(ddev, &mut d, n);
    }

    /// Initiator-side checks shared by RMA and atomics: `(initiator address, target device,
    /// target endpoint)`.
    pub(super) fn rma_peer(
        &self,
        dev: usize,
        req: &Req,
    ) -> Result<(FabricAddr, usize, usize), Status> {
        let r = &req.req;
        let (gen, kind) = self.ep_info(dev, r.ep).ok_or(Status::BadEndpoint)?;
        if kind == ep_open::TYPE_DGRAM {
            return Err(Status::Invalid);
        }
        let (ddev, dep) = self.locate(r.peer).ok_or_else(|| self.not_here(r.peer))?;
        Ok((FabricAddr::new(self.node_addr(dev), r.ep, gen), ddev, dep))
    }

    /// Resolve remote `ranges` (addr, len, key) at endpoint `dep` (generation `gen`) of `ddev`
    /// under its lock: the checked targets and the target device's port.
    pub(super) fn targets_of(
        &self,
        ddev: usize,
        dep: usize,
        gen: u32,
        ranges: &[(u64, u64, u64)],
        need: u64,
    ) -> Result<(Targets, Arc<Port>), Status> {
        let d = self.dev(ddev);
        let port = d.port.clone().ok_or(Status::AddrNotAvail)?;
        d.live_ep(dep, gen).ok_or(Status::AddrNotAvail)?;
        let targets = ranges
            .iter()
            .map(|&(addr, len, key)| target(&d, key, addr, len, need))
            .collect::<Result<Targets, _>>()?;
        Ok((targets, port))
    }

    /// Lent the request (as [`Fabric::op_send`]); taken only when it crosses hosts.
    pub(super) fn op_rma(&self, dev: usize, port: &Port, req: &mut Req, n: &mut Notify) {
        let (me, ddev, dep) = match self.rma_peer(dev, req) {
            Ok(x) => x,
            // A peer host's address: the request crosses hosts.
            Err(Status::Unsupported) => return self.rma_remote(dev, port, req.take(), n),
            Err(s) => return self.fail(dev, port, req, s, n),
        };
        let r = req.req;
        let write = r.opcode == Opcode::RmaWrite;
        let list_len = u64::from(r.count) * RMA_IOV_LEN as u64;
        // The parser checked the payload holds the scatter list (and nothing else for reads).
        let (list, src_data) = req.payload.split_at(list_len);
        let local = if write { src_data.len } else { req.data.len };
        let mut ranges: SmallVec<[(u64, u64, u64); 2]> = SmallVec::new();
        if r.count == 0 {
            ranges.push((r.remote_addr, local, r.remote_key));
        } else {
            let mem = port.mem.memory();
            for i in 0..u64::from(r.count) {
                let mut e = RmaIov::default();
                if list
                    .read_at(&mem, i * RMA_IOV_LEN as u64, e.as_mut_slice())
                    .is_err()
                {
                    return self.fail(dev, port, req, Status::Fault, n);
                }
                ranges.push((e.addr.into(), e.len.into(), e.key.into()));
            }
        }
        let total = ranges
            .iter()
            .try_fold(0u64, |a, &(_, l, _)| a.checked_add(l));
        let Some(total) = total else {
            return self.fail(dev, port, req, Status::Invalid, n);
        };
        if (write && total != local) || (!write && total > local) {
            return self.fail(dev, port, req, Status::Invalid, n);
        }
        if total > self.max_rma_size() {
            return self.fail(dev, port, req, Status::TooLarge, n);
        }
        let need = if write {
            mr_flags::REMOTE_WRITE
        } else {
            mr_flags::REMOTE_READ
        };
        let meta = Meta {
            src: me,
            tagged: false,
            tag: 0,
            cq_data: Some(r.data),
            len: 0,
            rma_len: Some(total),
        };
        let (targets, dport, notify) = {
            let (targets, dport) =
                match self.targets_of(ddev, dep, r.peer.generation, &ranges, need) {
                    Ok(x) => x,
                    Err(s) => {
                        debug!(dev, ddev, ?s, "remote access refused");
                        return self.fail(dev, port, req, s, n);
                    }
                };
            // COMMIT_COMPLETE needs every target to be persistent memory (§6.17).
            if r.flags & flags::COMMIT_COMPLETE != 0 && targets.iter().any(|t| t.mr.pmem.is_none())
            {
                return self.fail(dev, port, req, Status::Access, n);
            }
            let mut notify = false;
            if write && r.flags & flags::REMOTE_CQ_DATA != 0 {
                let mut d = self.dev(ddev);
                if d.acked & vfabric_proto::bit(VIRTIO_FABRIC_F_REMOTE_CQ_DATA) != 0 {
                    // Reserve the notification's room now: nothing is written if it has none.
                    if !self.reserve_notification(&mut d, dep, &meta) {
                        drop(d);
                        return self.fail(dev, port, req, Status::NoResources, n);
                    }
                    notify = true;
                }
            }
            (targets, dport, notify)
        };
        // Every range must still be registered before any byte moves.
        let accesses: Option<SmallVec<[MrAccess; 2]>> =
            targets.iter().map(|t| t.mr.enter()).collect();
        let Some(accesses) = accesses else {
            if notify {
                self.dev(ddev).unexpected_bytes -= eager_cost(0);
            }
            return self.fail(dev, port, req, Status::Access, n);
        };
        let lmem = port.mem.memory();
        let rmem = dport.mem.memory();
        // The checked accesses, one per target, used by each target's first chunk; dropped at a
        // yield point (a nested MR_DEREG on this thread must not wait for them).
        let mut held: SmallVec<[Option<MrAccess>; 2]> = accesses.into_iter().map(Some).collect();
        let mut pos = 0u64;
        let mut status = Status::Ok;
        'copy: for (i, t) in targets.iter().enumerate() {
            // Large transfers move in chunks. Between chunks the region is released (a
            // deregistration in between fails the rest of the transfer with ACCESS) and a
            // poller serves its other devices (no head-of-line blocking behind a bulk copy).
            let mut done = 0u64;
            while done < t.len {
                let chunk = (t.len - done).min(COPY_CHUNK);
                let access = match held.get_mut(i).and_then(Option::take) {
                    Some(a) => a,
                    None => match t.mr.enter() {
                        Some(a) => a,
                        None => {
                            status = Status::Access;
                            break 'copy;
                        }
                    },
                };
                let (_, remote) = t.segs.split_at(done);
                let local = if write { &src_data } else { &req.data };
                let (_, local) = local.split_at(pos + done);
                let res = match &t.mr.process {
                    Some(p) => process_copy(p, write, &lmem, &local, &remote, chunk),
                    None if write => copy_stream(&lmem, &local, &rmem, &remote, chunk),
                    None => copy_stream(&rmem, &remote, &lmem, &local, chunk),
                };
                drop(access);
                if let Err(side) = res {
                    let local_fault = matches!(
                        (write, side),
                        (true, CopyFault::Src) | (false, CopyFault::Dst)
                    );
                    debug!(dev, ddev, local_fault, "RMA copy faulted");
                    status = Status::Fault;
                    break 'copy;
                }
                done += chunk;
                if done < t.len {
                    held.iter_mut().for_each(|a| *a = None);
                    crate::poller::yield_point();
                }
            }
            pos += t.len;
        }
        drop((lmem, rmem, held));
        if status == Status::Ok && r.flags & flags::COMMIT_COMPLETE != 0 {
            // Durable before any completion, local or at the target.
            status = self.persist_targets(ddev, &targets);
        }
        if status != Status::Ok {
            if notify {
                self.dev(ddev).unexpected_bytes -= eager_cost(0);
            }
            return self.fail(dev, port, req, status, n);
        }
        if let Some(c) = self.counters.get(dev) {
            crate::stats::Counters::add(&c.bytes_copied, total);
        }
        if notify {
            self.notify_write(dev, ddev, dep, &dport, meta, n);
        }
        self.record_events(ddev, dep, me, write, &targets, n);
        let mut c = completion(Status::Ok, r.cookie);
        c.len = total.into();
        self.done(dev, port, req, &c, if write { 0 } else { total }, n);
    }

    /// Reserve room for a writedata notification to endpoint `dep` of the locked device `d`:
    /// the eager charge of an empty message (returned by [`Fabric::notify_write`]).
    pub(super) fn reserve_notification(&self, d: &mut Dev, dep: usize, meta: &Meta) -> bool {
        let Some(e) = d.eps.get(dep).and_then(|s| s.ep.as_ref()) else {
            return false;
        };
        let posted = e.posted.iter().any(|x| x.matches(meta));
        let room =
            d.unexpected_bytes.saturating_add(eager_cost(0)) <= self.limits.max_unexpected_bytes;
        if !posted && !room {
            return false;
        }
        d.unexpected_bytes += eager_cost(0);
        true
    }

    /// Writedata: consume a posted RECV of the target (or queue a zero-byte notification), using
    /// the room reserved by [`Fabric::reserve_notification`].
    pub(super) fn notify_write(
        &self,
        sdev: usize,
        ddev: usize,
        dep: usize,
        dport: &Port,
        meta: Meta,
        n: &mut Notify,
    ) {
        let mut d = self.dev(ddev);
        let Some(e) = d.eps.get_mut(dep).and_then(|s| s.ep.as_mut()) else {
            d.unexpected_bytes -= eager_cost(0);
            return;
        };
        let posted = e
            .posted
            .iter()
            .position(|x| x.matches(&meta))
            .and_then(|i| e.posted.remove(i));
        if let Some(rv) = posted {
            d.unexpected_bytes -= eager_cost(0);
            drop(d);
            return self.received(ddev, dport, &rv.into_req(), &meta, 0, n);
        }
        e.unexpected.push_back(Msg {
            meta,
            src_dev: sdev,
            claimed: None,
            body: Body::Eager(Vec::new()),
        });
        d.look_at_rx();
    }
}

/// One RMA chunk between guest memory (`local` in `lmem`) and a process memory region
/// (`remote`), through a bounce buffer: `write` moves local bytes to the region.
fn process_copy(
    process: &PeerProcess,
    write: bool,
    lmem: &GuestMemoryMmap,
    local: &Segs,
    remote: &Segs,
    len: u64,
) -> Result<(), CopyFault> {
    let mut bounce = vec![0u8; len as usize];
    if write {
        local
            .read_at(lmem, 0, &mut bounce)
            .map_err(|_| CopyFault::Src)?;
        process
            .write(remote, 0, &bounce)
            .map_err(|_| CopyFault::Dst)
    } else {
        process
            .read(remote, 0, &mut bounce)
            .map_err(|_| CopyFault::Src)?;
        local.write_at(lmem, 0, &bounce).map_err(|_| CopyFault::Dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ() {
        let mut g = KeyGen::new();
        let a = g.generate();
        let b = g.generate();
        assert_ne!(a, b);
    }
}
