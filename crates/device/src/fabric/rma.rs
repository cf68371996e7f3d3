// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Memory regions, RMA and atomics (spec §6.8.4, §6.8.5, §6.10, §6.11).
//!
//! Every remote access is resolved under the fabric lock: the key is looked up among the regions
//! of the device that owns the target endpoint, the range is checked against the region (no
//! overflow), the region's access rights against the operation, and only then does any byte
//! move (one copy, guest memory to guest memory). MR_DEREG takes the same lock, so an access is
//! either wholly before a deregistration or fails with ACCESS after it; nothing reads a freed
//! region.
//!
//! Atomics are read-modify-write sequences on guest memory done under the fabric lock. Every
//! device's requests — from its own vring thread or from the shared poller — are processed
//! under that one lock, so atomics of all initiators on all queue pairs are atomic with respect
//! to each other (not with respect to the target CPU's own accesses, spec §6.11).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use tracing::debug;
use vfabric_proto::{
    atomic_op as aop, comp_flags, datatype as dt, flags, mr_flags, ByteValued, FabricAddr, MemSeg,
    Opcode, RmaIov, Status, MEM_SEG_LEN, RMA_IOV_LEN, VIRTIO_FABRIC_F_REMOTE_CQ_DATA,
};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use super::{eager_cost, recv_matches, Body, Fabric, Inner, Meta, Msg, Notify, Port};
use crate::chain::{completion, copy_stream, CopyFault, Req, Seg, Segs};

/// Largest `count` of an atomic request (MAX_ATOMIC_COUNT).
pub(crate) const MAX_ATOMIC_COUNT: u32 = 4096;

/// ATOMIC_OPS: every libfabric operation MIN..MSWAP.
pub(crate) const ATOMIC_OPS: u64 = (1 << aop::COUNT) - 1;

/// ATOMIC_TYPES: the integer types (8 to 128 bits), FLOAT and DOUBLE. The complex and long
/// double types are not implemented.
pub(crate) const ATOMIC_TYPES: u64 = (1 << dt::INT8)
    | (1 << dt::UINT8)
    | (1 << dt::INT16)
    | (1 << dt::UINT16)
    | (1 << dt::INT32)
    | (1 << dt::UINT32)
    | (1 << dt::INT64)
    | (1 << dt::UINT64)
    | (1 << dt::FLOAT)
    | (1 << dt::DOUBLE)
    | (1 << dt::INT128)
    | (1 << dt::UINT128);

/// A registered memory region.
pub(crate) struct Mr {
    /// Address of the region's first byte in the remote address space.
    base: u64,
    /// The region's bytes in the owner's guest memory.
    segs: Segs,
    access: u64,
    rma_event: bool,
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

/// One checked remote range: the region's bytes and the key (for events).
struct Target {
    segs: Segs,
    key: u64,
    len: u64,
}

impl Fabric {
    /// Largest RMA transfer (MAX_RMA_SIZE): the message size limit.
    pub(crate) fn max_rma_size(&self) -> u64 {
        self.limits.max_msg_size
    }

    pub(super) fn op_mr_reg(
        &self,
        inner: &mut Inner,
        dev: usize,
        port: &Port,
        req: Req,
        n: &mut Notify,
    ) {
        let r = req.req;
        let fl = r.compare;
        if fl & !mr_flags::ALL != 0
            || fl & (mr_flags::REMOTE_READ | mr_flags::REMOTE_WRITE) == 0
            || r.count == 0
            || r.count > self.limits.max_sge
            || req.payload.len != u64::from(r.count) * MEM_SEG_LEN as u64
            || (fl & mr_flags::PROV_KEY != 0 && r.remote_key != 0)
        {
            return self.fail(dev, port, &req, Status::Invalid, n);
        }
        if fl & mr_flags::PMEM != 0 {
            return self.fail(dev, port, &req, Status::Unsupported, n);
        }
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
                if !GuestMemoryBackend::check_range(&*mem, GuestAddress(addr), piece as usize) {
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
        let d = &mut inner.devs[dev];
        if d.mrs.len() >= self.limits.max_mrs as usize {
            return self.fail(dev, port, &req, Status::NoResources, n);
        }
        let key = if fl & mr_flags::PROV_KEY != 0 {
            loop {
                let k = inner.keys.generate();
                if !inner.devs[dev].mrs.contains_key(&k) {
                    break k;
                }
            }
        } else {
            if d.mrs.contains_key(&r.remote_key) {
                return self.fail(dev, port, &req, Status::KeyInUse, n);
            }
            r.remote_key
        };
        let len = segs.len;
        debug!(dev, key, len, flags = fl, "memory region registered");
        inner.devs[dev].mrs.insert(
            key,
            Mr {
                base: r.remote_addr,
                segs,
                access: fl & (mr_flags::REMOTE_READ | mr_flags::REMOTE_WRITE),
                rma_event: fl & mr_flags::RMA_EVENT != 0,
            },
        );
        let mut c = completion(Status::Ok, r.cookie);
        c.data = key.into();
        c.len = len.into();
        self.done(dev, port, &req, &c, 0, n);
    }

    pub(super) fn op_mr_dereg(
        &self,
        inner: &mut Inner,
        dev: usize,
        port: &Port,
        req: Req,
        n: &mut Notify,
    ) {
        // Accesses run under the fabric lock we hold: none is in progress, later ones miss.
        let s = if inner.devs[dev].mrs.remove(&req.req.remote_key).is_some() {
            debug!(dev, key = req.req.remote_key, "memory region deregistered");
            Status::Ok
        } else {
            Status::Invalid
        };
        self.fail(dev, port, &req, s, n);
    }

    /// MR_EVENT: a buffer-less request the device completes with a remote-access report.
    pub(super) fn op_mr_event(
        &self,
        inner: &mut Inner,
        dev: usize,
        port: &Port,
        req: Req,
        n: &mut Notify,
    ) {
        if req.data.len != 0 {
            return self.fail(dev, port, &req, Status::BadChain, n);
        }
        inner.devs[dev].mr_events.push_back(req);
        self.flush_events(inner, dev, n);
    }

    /// Report coalesced events of `dev` into its posted MR_EVENT requests.
    fn flush_events(&self, inner: &mut Inner, dev: usize, n: &mut Notify) {
        let Some(port) = inner.devs[dev].port.clone() else {
            return;
        };
        while !inner.devs[dev].mr_events.is_empty() {
            let d = &mut inner.devs[dev];
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
    #[allow(clippy::too_many_arguments)]
    fn record_events(
        &self,
        inner: &mut Inner,
        ddev: usize,
        dep: usize,
        src: FabricAddr,
        write: bool,
        targets: &[Target],
        n: &mut Notify,
    ) {
        let mut any = false;
        for t in targets {
            let d = &mut inner.devs[ddev];
            if !d.mrs.get(&t.key).is_some_and(|m| m.rma_event) {
                continue;
            }
            let e = d
                .pending_events
                .entry((t.key, dep as u32, write))
                .or_insert((0, 0, src));
            e.0 += 1;
            e.1 = e.1.saturating_add(t.len);
            e.2 = src;
            any = true;
        }
        if any {
            self.flush_events(inner, ddev, n);
        }
    }

    /// Check `len` bytes at `addr` of region `key` of `ddev` for `need` rights.
    fn target(
        inner: &Inner,
        ddev: usize,
        key: u64,
        addr: u64,
        len: u64,
        need: u64,
    ) -> Result<Target, Status> {
        let mr = inner.devs[ddev].mrs.get(&key).ok_or(Status::Access)?;
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
        Ok(Target { segs, key, len })
    }

    /// Initiator-side checks shared by RMA and atomics: `(initiator address, target device,
    /// target endpoint, target port)`.
    fn rma_peer(
        &self,
        inner: &Inner,
        dev: usize,
        req: &Req,
    ) -> Result<(FabricAddr, usize, usize, Port), Status> {
        let r = &req.req;
        let gen = Self::ep_gen(inner, dev, r.ep).ok_or(Status::BadEndpoint)?;
        let kind = inner.devs[dev].eps[r.ep as usize]
            .ep
            .as_ref()
            .map(|e| e.kind)
            .ok_or(Status::BadEndpoint)?;
        if kind == vfabric_proto::ep_open::TYPE_DGRAM {
            return Err(Status::Invalid);
        }
        let (ddev, dep) = self.lookup(inner, r.peer).ok_or(Status::AddrNotAvail)?;
        let dport = inner.devs[ddev].port.clone().ok_or(Status::AddrNotAvail)?;
        Ok((
            FabricAddr::new(self.node_addr(dev), r.ep, gen),
            ddev,
            dep,
            dport,
        ))
    }

    pub(super) fn op_rma(
        &self,
        inner: &mut Inner,
        dev: usize,
        port: &Port,
        req: Req,
        n: &mut Notify,
    ) {
        let (me, ddev, dep, dport) = match self.rma_peer(inner, dev, &req) {
            Ok(x) => x,
            Err(s) => return self.fail(dev, port, &req, s, n),
        };
        let r = req.req;
        let write = r.opcode == Opcode::RmaWrite;
        let list_len = u64::from(r.count) * RMA_IOV_LEN as u64;
        // The parser checked the payload holds the scatter list (and nothing else for reads).
        let (list, src_data) = req.payload.split_at(list_len);
        let local = if write { src_data.len } else { req.data.len };
        let mut ranges = Vec::with_capacity(r.count.max(1) as usize);
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
                    return self.fail(dev, port, &req, Status::Fault, n);
                }
                ranges.push((e.addr.into(), e.len.into(), e.key.into()));
            }
        }
        let total = ranges
            .iter()
            .try_fold(0u64, |a, &(_, l, _)| a.checked_add(l));
        let Some(total) = total else {
            return self.fail(dev, port, &req, Status::Invalid, n);
        };
        if (write && total != local) || (!write && total > local) {
            return self.fail(dev, port, &req, Status::Invalid, n);
        }
        if total > self.max_rma_size() {
            return self.fail(dev, port, &req, Status::TooLarge, n);
        }
        let need = if write {
            mr_flags::REMOTE_WRITE
        } else {
            mr_flags::REMOTE_READ
        };
        let mut targets = Vec::with_capacity(ranges.len());
        for &(addr, len, key) in &ranges {
            match Self::target(inner, ddev, key, addr, len, need) {
                Ok(t) => targets.push(t),
                Err(s) => {
                    debug!(dev, ddev, key, addr, len, "remote access refused");
                    return self.fail(dev, port, &req, s, n);
                }
            }
        }
        let notify = write
            && r.flags & flags::REMOTE_CQ_DATA != 0
            && inner.devs[ddev].acked & vfabric_proto::bit(VIRTIO_FABRIC_F_REMOTE_CQ_DATA) != 0;
        let meta = Meta {
            src: me,
            tagged: false,
            tag: 0,
            cq_data: Some(r.data),
            len: 0,
            rma_len: Some(total),
        };
        if notify && !self.can_notify(inner, ddev, dep, &meta) {
            // No receive to consume and no room to queue the notification: nothing is written.
            return self.fail(dev, port, &req, Status::NoResources, n);
        }

        let lmem = port.mem.memory();
        let rmem = dport.mem.memory();
        let mut pos = 0u64;
        for t in &targets {
            let res = if write {
                let (_, from) = src_data.split_at(pos);
                copy_stream(&lmem, &from, &rmem, &t.segs, t.len)
            } else {
                let (_, to) = req.data.split_at(pos);
                copy_stream(&rmem, &t.segs, &lmem, &to, t.len)
            };
            if let Err(side) = res {
                let local_fault = matches!(
                    (write, side),
                    (true, CopyFault::Src) | (false, CopyFault::Dst)
                );
                debug!(dev, ddev, local_fault, "RMA copy faulted");
                return self.fail(dev, port, &req, Status::Fault, n);
            }
            pos += t.len;
        }
        drop((lmem, rmem));
        if let Some(c) = self.counters.get(dev) {
            crate::stats::Counters::add(&c.bytes_copied, total);
        }
        if notify {
            self.notify_write(inner, dev, ddev, dep, &dport, meta, n);
        }
        self.record_events(inner, ddev, dep, me, write, &targets, n);
        let mut c = completion(Status::Ok, r.cookie);
        c.len = total.into();
        self.done(dev, port, &req, &c, if write { 0 } else { total }, n);
    }

    /// Whether a writedata notification to endpoint `dep` of `ddev` can be delivered or queued.
    fn can_notify(&self, inner: &Inner, ddev: usize, dep: usize, meta: &Meta) -> bool {
        let Some(e) = inner.devs[ddev].eps[dep].ep.as_ref() else {
            return false;
        };
        e.posted.iter().any(|x| recv_matches(&x.req, meta))
            || inner.devs[ddev]
                .unexpected_bytes
                .saturating_add(eager_cost(0))
                <= self.limits.max_unexpected_bytes
    }

    /// Writedata: consume a posted RECV of the target (or queue a zero-byte notification).
    #[allow(clippy::too_many_arguments)]
    fn notify_write(
        &self,
        inner: &mut Inner,
        sdev: usize,
        ddev: usize,
        dep: usize,
        dport: &Port,
        meta: Meta,
        n: &mut Notify,
    ) {
        let Some(e) = inner.devs[ddev].eps[dep].ep.as_mut() else {
            return;
        };
        let posted = e
            .posted
            .iter()
            .position(|x| recv_matches(&x.req, &meta))
            .and_then(|i| e.posted.remove(i));
        if let Some(rv) = posted {
            return self.received(ddev, dport, &rv, &meta, 0, n);
        }
        inner.devs[ddev].unexpected_bytes += eager_cost(0);
        if let Some(e) = inner.devs[ddev].eps[dep].ep.as_mut() {
            e.unexpected.push_back(Msg {
                meta,
                src_dev: sdev,
                claimed: None,
                body: Body::Eager(Vec::new()),
            });
        }
    }

    pub(super) fn op_atomic(
        &self,
        inner: &mut Inner,
        dev: usize,
        port: &Port,
        req: Req,
        n: &mut Notify,
    ) {
        let (me, ddev, dep, dport) = match self.rma_peer(inner, dev, &req) {
            Ok(x) => x,
            Err(s) => return self.fail(dev, port, &req, s, n),
        };
        let r = req.req;
        let (op, ty) = (r.atomic_op, r.datatype);
        let Some(size) = dt::size(ty) else {
            return self.fail(dev, port, &req, Status::Unsupported, n);
        };
        if op >= aop::COUNT || ATOMIC_TYPES & (1 << ty) == 0 || !op_supported_for(op, ty) {
            return self.fail(dev, port, &req, Status::Unsupported, n);
        }
        if !aop::allowed(r.opcode, op) || r.count == 0 || r.count > MAX_ATOMIC_COUNT {
            return self.fail(dev, port, &req, Status::Invalid, n);
        }
        let count = r.count as usize;
        let nbytes = count * size;
        let is_cmp = r.opcode == Opcode::CompareAtomic;
        let fetch = r.opcode != Opcode::Atomic;
        let mem = port.mem.memory();
        let (operands, compares) = if op == aop::ATOMIC_READ {
            if req.payload.len != 0 {
                return self.fail(dev, port, &req, Status::Invalid, n);
            }
            (vec![0u8; nbytes], vec![0u8; nbytes])
        } else if req.payload.len == 0 && count == 1 && size <= 8 {
            (
                r.data.to_le_bytes()[..size].to_vec(),
                r.compare.to_le_bytes()[..size].to_vec(),
            )
        } else if req.payload.len == (nbytes * if is_cmp { 2 } else { 1 }) as u64 {
            let mut buf = vec![0u8; req.payload.len as usize];
            if req.payload.read_at(&mem, 0, &mut buf).is_err() {
                return self.fail(dev, port, &req, Status::Fault, n);
            }
            let cmp = if is_cmp {
                buf.split_off(nbytes)
            } else {
                vec![0u8; nbytes]
            };
            (buf, cmp)
        } else {
            return self.fail(dev, port, &req, Status::Invalid, n);
        };
        if fetch && req.data.len != nbytes as u64 {
            return self.fail(dev, port, &req, Status::BadChain, n);
        }
        let need = match (r.opcode, op) {
            (Opcode::Atomic, _) => mr_flags::REMOTE_WRITE,
            (Opcode::FetchAtomic, aop::ATOMIC_READ) => mr_flags::REMOTE_READ,
            _ => mr_flags::REMOTE_READ | mr_flags::REMOTE_WRITE,
        };
        let t = match Self::target(
            inner,
            ddev,
            r.remote_key,
            r.remote_addr,
            nbytes as u64,
            need,
        ) {
            Ok(t) => t,
            Err(s) => return self.fail(dev, port, &req, s, n),
        };
        let rmem = dport.mem.memory();
        let mut old = vec![0u8; nbytes];
        if t.segs.read_at(&rmem, 0, &mut old).is_err() {
            return self.fail(dev, port, &req, Status::Fault, n);
        }
        let mut new = old.clone();
        for i in 0..count {
            let at = i * size..(i + 1) * size;
            apply(
                ty,
                op,
                &mut new[at.clone()],
                &operands[at.clone()],
                &compares[at],
            );
        }
        if op != aop::ATOMIC_READ && new != old && t.segs.write_at(&rmem, 0, &new).is_err() {
            return self.fail(dev, port, &req, Status::Fault, n);
        }
        if fetch && req.data.write_at(&mem, 0, &old).is_err() {
            return self.fail(dev, port, &req, Status::Fault, n);
        }
        drop((mem, rmem));
        let write = op != aop::ATOMIC_READ;
        self.record_events(inner, ddev, dep, me, write, &[t], n);
        let mut c = completion(Status::Ok, r.cookie);
        c.len = (nbytes as u64).into();
        self.done(
            dev,
            port,
            &req,
            &c,
            if fetch { nbytes as u64 } else { 0 },
            n,
        );
    }
}

/// Whether operation `op` is implemented for datatype `ty`: bitwise operations and MSWAP are
/// defined for integers only (as in libfabric).
pub(crate) fn op_supported_for(op: u8, ty: u8) -> bool {
    !(dt::is_float(ty) && matches!(op, aop::BOR | aop::BAND | aop::BXOR | aop::MSWAP))
}

/// An element type of the atomic engine.
trait Elem: Copy + PartialOrd {
    fn load(b: &[u8]) -> Self;
    fn store(self, b: &mut [u8]);
    fn truth(self) -> bool;
    fn from_bool(v: bool) -> Self;
    fn sum(self, o: Self) -> Self;
    fn prod(self, o: Self) -> Self;
    /// BOR, BAND, BXOR and MSWAP (`None` for floating point).
    fn bits(self, op: u8, o: Self, c: Self) -> Option<Self>;
}

macro_rules! int_elem {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            fn load(b: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(&b[..std::mem::size_of::<$t>()]);
                <$t>::from_le_bytes(a)
            }
            fn store(self, b: &mut [u8]) {
                b[..std::mem::size_of::<$t>()].copy_from_slice(&self.to_le_bytes());
            }
            fn truth(self) -> bool {
                self != 0
            }
            fn from_bool(v: bool) -> Self {
                <$t>::from(v)
            }
            fn sum(self, o: Self) -> Self {
                self.wrapping_add(o)
            }
            fn prod(self, o: Self) -> Self {
                self.wrapping_mul(o)
            }
            fn bits(self, op: u8, o: Self, c: Self) -> Option<Self> {
                Some(match op {
                    aop::BOR => self | o,
                    aop::BAND => self & o,
                    aop::BXOR => self ^ o,
                    aop::MSWAP => (o & c) | (self & !c),
                    _ => return None,
                })
            }
        }
    )*};
}
int_elem!(i8, u8, i16, u16, i32, u32, i64, u64, i128, u128);

macro_rules! float_elem {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            fn load(b: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(&b[..std::mem::size_of::<$t>()]);
                <$t>::from_le_bytes(a)
            }
            fn store(self, b: &mut [u8]) {
                b[..std::mem::size_of::<$t>()].copy_from_slice(&self.to_le_bytes());
            }
            fn truth(self) -> bool {
                self != 0.0
            }
            fn from_bool(v: bool) -> Self {
                if v { 1.0 } else { 0.0 }
            }
            fn sum(self, o: Self) -> Self {
                self + o
            }
            fn prod(self, o: Self) -> Self {
                self * o
            }
            fn bits(self, _op: u8, _o: Self, _c: Self) -> Option<Self> {
                None
            }
        }
    )*};
}
float_elem!(f32, f64);

/// libfabric semantics of `op` on one element: `t` is the target, `o` the operand, `c` the
/// compare value. Returns the new target value.
fn compute<T: Elem>(op: u8, t: T, o: T, c: T) -> T {
    let store_if = |cond: bool| if cond { o } else { t };
    match op {
        aop::MIN => {
            if o < t {
                o
            } else {
                t
            }
        }
        aop::MAX => {
            if o > t {
                o
            } else {
                t
            }
        }
        aop::SUM => t.sum(o),
        aop::PROD => t.prod(o),
        aop::LOR => T::from_bool(t.truth() || o.truth()),
        aop::LAND => T::from_bool(t.truth() && o.truth()),
        aop::LXOR => T::from_bool(t.truth() != o.truth()),
        aop::ATOMIC_READ => t,
        aop::ATOMIC_WRITE => o,
        aop::CSWAP => store_if(c == t),
        aop::CSWAP_NE => store_if(c != t),
        aop::CSWAP_LE => store_if(c <= t),
        aop::CSWAP_LT => store_if(c < t),
        aop::CSWAP_GE => store_if(c >= t),
        aop::CSWAP_GT => store_if(c > t),
        _ => t.bits(op, o, c).unwrap_or(t),
    }
}

fn apply_as<T: Elem>(op: u8, target: &mut [u8], operand: &[u8], cmp: &[u8]) {
    let v = compute(op, T::load(target), T::load(operand), T::load(cmp));
    v.store(target);
}

/// Apply `op` on one element of datatype `ty` (checked supported by the caller; slices are
/// exactly one element long).
fn apply(ty: u8, op: u8, target: &mut [u8], operand: &[u8], cmp: &[u8]) {
    match ty {
        dt::INT8 => apply_as::<i8>(op, target, operand, cmp),
        dt::UINT8 => apply_as::<u8>(op, target, operand, cmp),
        dt::INT16 => apply_as::<i16>(op, target, operand, cmp),
        dt::UINT16 => apply_as::<u16>(op, target, operand, cmp),
        dt::INT32 => apply_as::<i32>(op, target, operand, cmp),
        dt::UINT32 => apply_as::<u32>(op, target, operand, cmp),
        dt::INT64 => apply_as::<i64>(op, target, operand, cmp),
        dt::UINT64 => apply_as::<u64>(op, target, operand, cmp),
        dt::FLOAT => apply_as::<f32>(op, target, operand, cmp),
        dt::DOUBLE => apply_as::<f64>(op, target, operand, cmp),
        dt::INT128 => apply_as::<i128>(op, target, operand, cmp),
        dt::UINT128 => apply_as::<u128>(op, target, operand, cmp),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one<T: Elem>(op: u8, t: T, o: T, c: T) -> T {
        compute(op, t, o, c)
    }

    #[test]
    fn integer_ops() {
        assert_eq!(one::<i32>(aop::MIN, 5, -3, 0), -3);
        assert_eq!(one::<u8>(aop::MAX, 5, 3, 0), 5);
        assert_eq!(one::<u8>(aop::SUM, 250, 10, 0), 4);
        assert_eq!(one::<i64>(aop::PROD, -3, 7, 0), -21);
        assert_eq!(one::<u16>(aop::LOR, 0, 9, 0), 1);
        assert_eq!(one::<u16>(aop::LAND, 2, 0, 0), 0);
        assert_eq!(one::<u16>(aop::LXOR, 2, 3, 0), 0);
        assert_eq!(one::<u16>(aop::LXOR, 0, 3, 0), 1);
        assert_eq!(one::<u32>(aop::BOR, 0b1010, 0b0101, 0), 0b1111);
        assert_eq!(one::<u32>(aop::BAND, 0b1010, 0b0110, 0), 0b0010);
        assert_eq!(one::<u32>(aop::BXOR, 0b1010, 0b0110, 0), 0b1100);
        assert_eq!(one::<u64>(aop::ATOMIC_READ, 7, 9, 0), 7);
        assert_eq!(one::<u64>(aop::ATOMIC_WRITE, 7, 9, 0), 9);
        assert_eq!(one::<u64>(aop::CSWAP, 7, 9, 7), 9);
        assert_eq!(one::<u64>(aop::CSWAP, 7, 9, 8), 7);
        assert_eq!(one::<u64>(aop::CSWAP_NE, 7, 9, 8), 9);
        assert_eq!(one::<i8>(aop::CSWAP_LE, 7, 9, 7), 9);
        assert_eq!(one::<i8>(aop::CSWAP_LT, 7, 9, 7), 7);
        assert_eq!(one::<i8>(aop::CSWAP_GE, 7, 9, 8), 9);
        assert_eq!(one::<i8>(aop::CSWAP_GT, 7, 9, 7), 7);
        assert_eq!(one::<u8>(aop::MSWAP, 0xf0, 0x0f, 0x3c), 0xcc);
        assert_eq!(one::<u128>(aop::SUM, u128::MAX, 2, 0), 1);
    }

    #[test]
    fn float_ops() {
        assert_eq!(one::<f64>(aop::SUM, 1.5, 2.25, 0.0), 3.75);
        assert_eq!(one::<f32>(aop::MIN, 1.5, -2.0, 0.0), -2.0);
        assert_eq!(one::<f32>(aop::CSWAP, 1.5, 4.0, 1.5), 4.0);
        assert!(!op_supported_for(aop::BOR, dt::DOUBLE));
        assert!(op_supported_for(aop::BOR, dt::UINT8));
    }

    #[test]
    fn keys_differ() {
        let mut g = KeyGen::new();
        let a = g.generate();
        let b = g.generate();
        assert_ne!(a, b);
    }
}
