// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Sends and receives: matching under the destination device's lock, the copy outside it.

use std::sync::Arc;

use tracing::debug;
use vfabric_proto::{comp_flags, ep_open, flags, FabricAddr, Opcode, Status};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

use super::posted::Posted;
use super::{
    completion_bytes, completion_used, eager_cost, msg_completion_words, recv_completion,
    recv_matches, send_ok, store_completion, Body, CompWords, Dev, DevGuard, Fabric, Meta, Msg,
    Notify, Port,
};
#[cfg(doc)]
use crate::chain::Verdict;
use crate::chain::{
    copy_stream_yielding, guest_copy, guest_move_small, CopyFault, GuestMemoryMmap, PlainRx,
    PlainTx, Req,
};
use crate::stats::Counters;

/// Payloads up to this size are read before the destination is locked (one lock instead of
/// two for the commonest small eager send; the read is wasted only if a receive is posted).
const EARLY_READ: u64 = 64;

// The straight placement moves an early payload with `guest_move_small`.
const _: () = assert!(EARLY_READ as usize <= crate::chain::SMALL_MOVE);

/// What is left of a transfer whose copy faulted on one side.
// Returned on the stack once per transfer: boxing the receive would allocate.
#[allow(clippy::large_enum_variant)]
enum Survivor {
    None,
    /// The sender faulted: the receive is still to be matched.
    Recv(Req),
    /// The receiver faulted: the send (the caller still has it) is still to be matched.
    Send,
}

/// Outcome of delivering a queued message into a receive.
enum Delivered {
    Done,
    /// The receiver faulted: the message goes back into its queue.
    Requeue(Msg),
    /// The sender faulted: the receive is still to be matched.
    Rematch(Req),
}

/// Take the first posted receive of endpoint `ep` that matches `meta`; `at` is set to its
/// position.
#[inline(always)]
pub(super) fn take_posted(d: &mut Dev, ep: usize, meta: &Meta, at: &mut usize) -> Option<Posted> {
    let e = d.ep_mut(ep)?;
    // The oldest receive matches most often: no search and no shifting of the queue for it.
    if e.posted.front().is_some_and(|x| x.matches(meta)) {
        *at = 0;
        return e.posted.pop_front();
    }
    let i = 1 + e.posted.iter().skip(1).position(|x| x.matches(meta))?;
    *at = i;
    e.posted.remove(i)
}

/// Make room for one more posted receive (out of line: a queue mostly has room).
#[cold]
#[inline(never)]
fn grow_posted(q: &mut std::collections::VecDeque<Posted>) {
    q.reserve(1);
}

impl Fabric {
    /// Lent the request: only the paths that keep it (held for a receive, another host, a
    /// large transfer) pay for a copy; the common eager send moves nothing.
    /// `smem` is the sender's guest memory, if the caller has it loaded.
    pub(super) fn op_send(
        &self,
        dev: usize,
        port: &Port,
        smem: Option<&GuestMemoryMmap>,
        req: &Req,
        n: &mut Notify,
    ) {
        let r = req.req;
        let Some((sgen, skind)) = self.ep_info(dev, r.ep) else {
            return self.fail(dev, port, req, Status::BadEndpoint, n);
        };
        if skind == ep_open::TYPE_DGRAM && r.flags & flags::DELIVERY_COMPLETE != 0 {
            // A datagram is never "delivered" in the reliable sense (spec: DGRAM endpoints).
            return self.fail(dev, port, req, Status::Invalid, n);
        }
        let Some((ddev, dep)) = self.locate(r.peer) else {
            // Another host's address (or nothing): the one comparison the local path pays.
            return self.send_remote(dev, port, req.clone(), sgen, skind, n);
        };
        let dgen = r.peer.generation;
        let meta = Meta {
            src: FabricAddr::new(self.node_addr(dev), r.ep, sgen),
            tagged: r.opcode == Opcode::TSend,
            tag: r.tag,
            cq_data: (r.flags & flags::REMOTE_CQ_DATA != 0).then_some(r.data),
            len: req.payload.len,
            rma_len: None,
        };
        let may_be_eager = meta.len <= self.limits.eager_threshold
            && r.flags & flags::DELIVERY_COMPLETE == 0
            && skind != ep_open::TYPE_DGRAM;
        // A small payload is located up front: where its parse resolved it in the sender's
        // memory (`direct`: the straight placement below moves it from there, guest to guest),
        // else read onto the stack. Copied into a heap buffer only if it has to wait in the
        // unexpected queue.
        let mut early_buf = [0u8; EARLY_READ as usize];
        let mut early_at: Option<*const u8> = None;
        let mut direct = false;
        // Loaded for the early read (unless the caller has it), the sender's memory serves its
        // completion too, and keeps a `direct` payload mapped.
        let loaded;
        let mut smem = smem;
        if may_be_eager && meta.len <= EARLY_READ {
            let m = match smem {
                Some(m) => m,
                None => {
                    loaded = port.mem.memory();
                    &*loaded
                }
            };
            if let Some(at) = req.payload_at(m, meta.len as usize) {
                early_at = Some(at);
                direct = true;
            } else {
                let buf = &mut early_buf[..meta.len as usize];
                if req.read_payload(m, buf).is_err() {
                    return self.fail(dev, port, req, Status::Fault, n);
                }
                early_at = Some(buf.as_ptr());
            }
            smem = Some(m);
        }

        let mut d = self.dev(ddev);
        let dv = &mut *d;
        let Some(dport) = dv.port.as_ref() else {
            drop(d);
            return self.fail(dev, port, req, Status::AddrNotAvail, n);
        };
        let Some(dst) = dv.eps.get_mut(dep).and_then(|s| s.ep.as_mut()) else {
            drop(d);
            return self.fail(dev, port, req, Status::AddrNotAvail, n);
        };
        if dst.generation != dgen || dst.kind != skind {
            // Gone, or another kind: reliable and datagram endpoints do not talk to each other.
            drop(d);
            return self.fail(dev, port, req, Status::AddrNotAvail, n);
        }
        if let Some(src) = early_at {
            // Written out rather than `front().filter(..)`, which stayed a call of its own.
            let front = match dst.posted.front() {
                Some(rv) if rv.matches(&meta) => Some(rv),
                _ => None,
            };
            if let Some(rv) = front {
                // The commonest send, straight through: the bytes and the receive's completion
                // (64 + 64 at most: no long copy under the lock) go into the oldest receive
                // where it waits, through the host addresses its parse resolved, and it leaves
                // its queue. Its chain goes to its used ring after the lock: publishing may
                // signal the receiver's guest, whose next receive would find the lock held.
                let placed = match rv.resolved() {
                    Some((data_at, room, comp_at)) => {
                        let placed = meta.len.min(room);
                        // SAFETY: `data_at` holds `room` >= `placed` bytes and `comp_at` a
                        // whole completion, in the table the record holds (mapped while it
                        // lives, and it is in its queue until after this); `src` holds
                        // `meta.len` >= `placed` <= 64 bytes: `early_buf`, or the payload's
                        // first range in `smem` (mapped while it is borrowed), which a loopback
                        // send may make overlap the data area (the move allows that). The
                        // bytes first: fewer values live across the copy.
                        unsafe { guest_move_small(data_at, src, placed as usize) };
                        let (c, status) = msg_completion_words(rv.cookie, rv.tagged, &meta, placed);
                        // SAFETY: as above, for the completion area.
                        unsafe { store_completion(comp_at, &c) };
                        Some((placed, status, completion_used(Ok(()), placed)))
                    }
                    // SAFETY: `src` holds `meta.len` bytes (as above).
                    None => unsafe { Self::place_early(&dport.mem, rv, &meta, src) },
                };
                if let Some((placed, status, used)) = placed {
                    let (queue, head) = (rv.queue, rv.head);
                    if let Some(rv) = dst.posted.pop_front() {
                        rv.discard();
                    }
                    let dport = Arc::clone(dport);
                    drop(d);
                    Counters::inc(&dport.counters.messages_received);
                    Counters::add(&dport.counters.bytes_copied, placed);
                    self.completed(ddev, &dport, queue, head, status, used, n);
                    return self.sent_inline(dev, port, smem, req, meta.len, n);
                }
                let rv = dst.posted.pop_front();
                let dport = Arc::clone(dport);
                drop(d);
                if let Some(rv) = rv {
                    self.fail_posted(ddev, &dport, &rv, Status::Fault, n);
                }
                // The message is not lost: try the next receive (or queue it).
                return self.op_send(dev, port, smem, req, n);
            }
        }
        // Past the straight placement, the bytes of a `direct` payload are read as they would
        // have been before the lock (64 bytes at most).
        let early: Option<&[u8]> = match early_at {
            Some(src) if direct => {
                let buf = &mut early_buf[..meta.len as usize];
                // SAFETY: `src` is the payload's first range in `smem` (mapped while it is
                // borrowed), holding `meta.len` bytes; `buf` is ours.
                unsafe { guest_copy(buf.as_mut_ptr(), src, buf.len()) };
                Some(buf)
            }
            Some(_) => Some(&early_buf[..meta.len as usize]),
            None => None,
        };
        let dport = Arc::clone(dport);
        let mut at = 0;
        // Placed from where it was taken to (not moved once more into a binding of its own).
        let taken = take_posted(&mut d, dep, &meta, &mut at);
        if taken.is_some() {
            drop(d);
            if let (Some(buf), Some(rv)) = (early, taken.as_ref()) {
                return self.place(dev, port, smem, req, &meta, ddev, &dport, rv, buf, n);
            }
            let Some(rv) = taken else { return };
            match self.transfer(dev, port, req, &meta, ddev, &dport, rv.into_req(), n) {
                Survivor::None => {}
                // Our memory faulted: the receive goes back where it was.
                Survivor::Recv(mut rv) => {
                    if let Some(e) = self.dev(ddev).live_ep_mut(dep, dgen) {
                        e.posted
                            .insert(at.min(e.posted.len()), Posted::new(&mut rv));
                    }
                }
                // The receiver's memory faulted (its receive failed): match the next one.
                Survivor::Send => self.op_send(dev, port, smem, req, n),
            }
            return;
        }
        if skind == ep_open::TYPE_DGRAM {
            drop(d);
            if let Some(c) = self.counters.get(ddev) {
                Counters::inc(&c.dgram_drops);
            }
            return self.sent(dev, port, req, meta.len, n);
        }
        let cost = eager_cost(meta.len);
        let eager = may_be_eager
            && d.unexpected_bytes.saturating_add(cost) <= self.limits.max_unexpected_bytes;
        if !eager {
            let msg = Msg {
                meta,
                src_dev: dev,
                claimed: None,
                body: Body::Held(req.clone(), port.clone()),
            };
            if let Some(e) = d.ep_mut(dep) {
                e.unexpected.push_back(msg);
                d.look_at_rx();
            }
            return;
        }
        // Eager: the room is reserved now, so concurrent senders respect the bound.
        d.unexpected_bytes += cost;
        let buf = match early {
            Some(buf) => buf.to_vec(),
            None => {
                // The copy into the device runs without the lock; a receive posted meanwhile
                // is found when the lock is taken again.
                drop(d);
                let mut buf = vec![0u8; meta.len as usize];
                let read = req.payload.read_at(&port.mem.memory(), 0, &mut buf);
                d = self.dev(ddev);
                if read.is_err() {
                    d.unexpected_bytes -= cost;
                    drop(d);
                    return self.fail(dev, port, req, Status::Fault, n);
                }
                if d.live_ep(dep, dgen).is_none() {
                    d.unexpected_bytes -= cost;
                    drop(d);
                    return self.fail(dev, port, req, Status::AddrNotAvail, n);
                }
                if let Some(rv) = take_posted(&mut d, dep, &meta, &mut 0) {
                    d.unexpected_bytes -= cost;
                    drop(d);
                    return self.place(dev, port, smem, req, &meta, ddev, &dport, &rv, &buf, n);
                }
                buf
            }
        };
        if let Some(e) = d.ep_mut(dep) {
            e.unexpected.push_back(Msg {
                meta,
                src_dev: dev,
                claimed: None,
                body: Body::Eager(buf),
            });
            d.look_at_rx();
        }
        drop(d);
        self.sent_in(dev, port, smem, req, meta.len, n);
    }

    /// A plain send ([`Verdict::Send`]: SEND or TSEND with the plain flags, a payload of one
    /// range, no data area): [`Fabric::op_send`]'s straight placement, from the payload's first
    /// range and the completion area where the parse resolved them, without the request's
    /// streams. Every other case (a fence, no endpoint, a datagram, DELIVERY_COMPLETE, a payload
    /// past the early read or not resolved, another host, no matching receive with resolved
    /// areas at the front of its queue) builds the streams and goes the general way, which
    /// decides every status: nothing is done here before the straight placement is certain.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) fn op_send_plain(
        &self,
        dev: usize,
        port: &Port,
        mem: &GuestMemoryMmap,
        req: &mut Req,
        tx: &PlainTx,
        acked: u64,
        n: &mut Notify,
    ) {
        if !self.send_straight(dev, port, mem, req, tx, n) {
            tx.fill(req);
            self.dispatch(dev, port, Some(mem), req, acked, n);
        }
    }

    /// [`Fabric::op_send_plain`]'s straight placement: `true` if it sent the message (and
    /// completed both chains), `false` (nothing done) for the general path.
    #[inline(always)]
    fn send_straight(
        &self,
        dev: usize,
        port: &Port,
        mem: &GuestMemoryMmap,
        req: &Req,
        tx: &PlainTx,
        n: &mut Notify,
    ) -> bool {
        let r = &req.req;
        let len = u64::from(tx.payload.len);
        // The payload's host address is `mem`'s only if the request's table is `mem`.
        if len == 0
            || len > EARLY_READ
            || len > self.limits.eager_threshold
            || r.flags & (flags::DELIVERY_COMPLETE | flags::FENCE) != 0
            || tx.payload_at == 0
            || !req.table().is_some_and(|t| std::ptr::eq(t, mem))
            || self.devs[dev]
                .fenced
                .load(std::sync::atomic::Ordering::Acquire)
                != 0
        {
            return false;
        }
        let Some((sgen, skind)) = self.ep_info(dev, r.ep) else {
            return false;
        };
        if skind == ep_open::TYPE_DGRAM {
            return false;
        }
        let Some((ddev, dep)) = self.locate(r.peer) else {
            return false;
        };
        let meta = Meta {
            src: FabricAddr::new(self.node_addr(dev), r.ep, sgen),
            tagged: r.opcode == Opcode::TSend,
            tag: r.tag,
            cq_data: (r.flags & flags::REMOTE_CQ_DATA != 0).then_some(r.data),
            len,
            rma_len: None,
        };
        let mut d = self.dev(ddev);
        let dv = &mut *d;
        let Some(dport) = dv.port.as_ref() else {
            return false;
        };
        let Some(dst) = dv.eps.get_mut(dep).and_then(|s| s.ep.as_mut()) else {
            return false;
        };
        if dst.generation != r.peer.generation || dst.kind != skind {
            return false;
        }
        let rv = match dst.posted.front() {
            Some(rv) if rv.matches(&meta) => rv,
            _ => return false,
        };
        let Some((data_at, room, comp_at)) = rv.resolved() else {
            return false;
        };
        let placed = meta.len.min(room);
        // SAFETY: `data_at` holds `room` >= `placed` bytes and `comp_at` a whole completion, in
        // the table the record holds (mapped while it lives, and it is in its queue until after
        // this); `tx.payload_at` holds the payload's first range, `meta.len` >= `placed` <= 64
        // bytes, in `mem` (the request's table, mapped while it is borrowed), which a loopback
        // send may make overlap the data area (the move allows that).
        unsafe { guest_move_small(data_at, tx.payload_at as *const u8, placed as usize) };
        let (c, status) = msg_completion_words(rv.cookie, rv.tagged, &meta, placed);
        // SAFETY: as above, for the completion area.
        unsafe { store_completion(comp_at, &c) };
        let used = completion_used(Ok(()), placed);
        let (queue, head) = (rv.queue, rv.head);
        if let Some(rv) = dst.posted.pop_front() {
            rv.discard();
        }
        let dport = Arc::clone(dport);
        drop(d);
        Counters::inc(&dport.counters.messages_received);
        Counters::add(&dport.counters.bytes_copied, placed);
        self.completed(ddev, &dport, queue, head, status, used, n);
        Counters::inc(&port.counters.messages_sent);
        let w: CompWords = [0, r.cookie, len, 0, 0, 0, 0, 0];
        // SAFETY: `tx.comp_at` is the host address of the request's whole completion area
        // (its descriptor holds exactly 64 bytes) in `mem`, mapped while it is borrowed.
        unsafe { store_completion(tx.comp_at as *mut u8, &w) };
        let used = completion_used(Ok(()), 0);
        self.completed(dev, port, req.queue, req.head, Status::Ok as u32, used, n);
        true
    }

    /// [`Fabric::op_send`]'s straight placement of the early payload at `src` (message `meta`; read
    /// onto the stack first: it may be guest memory) into receive `rv` (of a device whose guest
    /// memory is `rmem`) when its parse did not resolve both areas:
    /// through the memory table. `(placed, raw status, used length)`, or `None` if the data
    /// area faulted.
    ///
    /// # Safety
    /// `src` must be valid for reads of `meta.len` <= [`EARLY_READ`] bytes.
    #[cold]
    #[inline(never)]
    unsafe fn place_early(
        rmem: &GuestMemoryAtomic<GuestMemoryMmap>,
        rv: &Posted,
        meta: &Meta,
        src: *const u8,
    ) -> Option<(u64, u32, u32)> {
        let mut buf = [0u8; EARLY_READ as usize];
        let buf = &mut buf[..meta.len as usize];
        // SAFETY: the caller's contract; `buf` is ours (so no overlap with guest memory).
        unsafe { guest_copy(buf.as_mut_ptr(), src, buf.len()) };
        let placed = meta.len.min(rv.data_len());
        let bytes = buf.get(..placed as usize).unwrap_or(buf);
        let mut loaded = None;
        let mem = rv.placement_table(rmem, &mut loaded);
        rv.write_data(mem, bytes).ok()?;
        let (c, status) = msg_completion_words(rv.cookie, rv.tagged, meta, placed);
        Some((
            placed,
            status,
            completion_used(rv.write_comp_words(mem, &c), placed),
        ))
    }

    /// Deliver bytes the device already holds (`buf`, from send `req` of `dev`) into receive
    /// `rv` of `rdev`; both complete. A fault in the receiver's memory fails the receive only.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn place(
        &self,
        dev: usize,
        port: &Port,
        smem: Option<&GuestMemoryMmap>,
        req: &Req,
        meta: &Meta,
        rdev: usize,
        rport: &Port,
        rv: &Posted,
        buf: &[u8],
        n: &mut Notify,
    ) {
        let placed = meta.len.min(rv.data_len());
        let bytes = buf.get(..placed as usize).unwrap_or(buf);
        let mut loaded = None;
        let rmem = rv.placement_table(&rport.mem, &mut loaded);
        if rv.write_data(rmem, bytes).is_err() {
            self.fail_posted(rdev, rport, rv, Status::Fault, n);
            // The message is not lost: try the next receive (or queue it).
            return self.op_send(dev, port, smem, req, n);
        }
        // Both completions are written here rather than through `received_in` and `sent_in`
        // (two more calls, each with its own counter and memory look-ups): this is the
        // commonest send.
        if let Some(c) = self.counters.get(rdev) {
            Counters::inc(&c.messages_received);
            Counters::add(&c.bytes_copied, placed);
        }
        let c = rv.completion(meta, placed);
        self.write_posted(rdev, rport, rmem, rv, &c, placed, n);
        self.sent_inline(dev, port, smem, req, meta.len, n);
    }

    /// [`Fabric::sent_in`] inlined, for the eager placements (`place`, `op_send`'s straight path), which
    /// complete the receive and then the send in a row.
    #[inline(always)]
    fn sent_inline(
        &self,
        dev: usize,
        port: &Port,
        smem: Option<&GuestMemoryMmap>,
        req: &Req,
        len: u64,
        n: &mut Notify,
    ) {
        Counters::inc(&port.counters.messages_sent);
        let loaded;
        let smem: &GuestMemoryMmap = match smem {
            Some(m) => m,
            None => {
                loaded = port.mem.memory();
                &loaded
            }
        };
        // Status OK, no flags, the cookie and the length: stored straight into the completion
        // area where the parse resolved it.
        let w: CompWords = [0, req.req.cookie, len, 0, 0, 0, 0, 0];
        let wrote = match req.comp_at(smem) {
            Some(at) => {
                // SAFETY: `at` is the host address of the request's whole completion area in
                // `smem`, the table it was resolved in (which the request keeps mapped).
                unsafe { store_completion(at, &w) };
                Ok(())
            }
            None => req.write_comp(smem, &completion_bytes(&w)),
        };
        let used = completion_used(wrote, 0);
        self.completed(dev, port, req.queue, req.head, Status::Ok as u32, used, n);
    }

    pub(super) fn sent(&self, dev: usize, port: &Port, req: &Req, len: u64, n: &mut Notify) {
        self.sent_in(dev, port, None, req, len, n);
    }

    /// [`Fabric::sent`] with the sender's memory already loaded, if the caller has it.
    #[inline]
    fn sent_in(
        &self,
        dev: usize,
        port: &Port,
        mem: Option<&GuestMemoryMmap>,
        req: &Req,
        len: u64,
        n: &mut Notify,
    ) {
        if let Some(c) = self.counters.get(dev) {
            Counters::inc(&c.messages_sent);
        }
        self.done_in(dev, port, mem, req, &send_ok(&req.req, len), 0, n);
    }

    /// Receive completion for a message placed in `rreq`'s buffer.
    pub(super) fn received(
        &self,
        rdev: usize,
        rport: &Port,
        rreq: &Req,
        meta: &Meta,
        placed: u64,
        n: &mut Notify,
    ) {
        self.received_in(rdev, rport, None, rreq, meta, placed, n);
    }

    /// [`Fabric::received`] with the receiver's memory already loaded, if the caller has it.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn received_in(
        &self,
        rdev: usize,
        rport: &Port,
        rmem: Option<&GuestMemoryMmap>,
        rreq: &Req,
        meta: &Meta,
        placed: u64,
        n: &mut Notify,
    ) {
        if let Some(c) = self.counters.get(rdev) {
            Counters::inc(&c.messages_received);
            Counters::add(&c.bytes_copied, placed);
        }
        let c = recv_completion(&rreq.req, meta, placed);
        self.done_in(rdev, rport, rmem, rreq, &c, placed, n);
    }

    /// The one copy: held send `sreq` of `sdev` into receive `rreq` of `rdev`; both complete.
    /// Runs without any device lock.
    ///
    /// Guest ranges are resolved before any byte moves, so a fault copies nothing. Only the side
    /// whose memory faulted fails (with `Fault`); the other request is handed back so the caller
    /// can match it again: one guest's bad (or just replaced) memory table must never cost a
    /// well-behaved peer its request.
    #[allow(clippy::too_many_arguments)]
    fn transfer(
        &self,
        sdev: usize,
        sport: &Port,
        sreq: &Req,
        meta: &Meta,
        rdev: usize,
        rport: &Port,
        rreq: Req,
        n: &mut Notify,
    ) -> Survivor {
        let placed = meta.len.min(rreq.data.len);
        let res = copy_stream_yielding(
            &sport.mem.memory(),
            &sreq.payload,
            &rport.mem.memory(),
            &rreq.data,
            placed,
        );
        match res {
            Ok(()) => {
                self.received(rdev, rport, &rreq, meta, placed, n);
                self.sent(sdev, sport, sreq, meta.len, n);
                Survivor::None
            }
            Err(CopyFault::Src) => {
                debug!(sdev, rdev, "copy faulted in the sender's memory");
                self.fail(sdev, sport, sreq, Status::Fault, n);
                Survivor::Recv(rreq)
            }
            Err(CopyFault::Dst) => {
                debug!(sdev, rdev, "copy faulted in the receiver's memory");
                self.fail(rdev, rport, &rreq, Status::Fault, n);
                Survivor::Send
            }
        }
    }

    /// Deliver unexpected message `m` (already out of `rdev`'s queue, its eager bytes already
    /// returned) into receive `rreq`, without any lock. On a copy fault the request of the side
    /// that did not fault comes back (see [`Fabric::transfer`]).
    fn deliver(&self, rdev: usize, rport: &Port, rreq: Req, m: Msg, n: &mut Notify) -> Delivered {
        match m.body {
            Body::Eager(buf) => {
                let placed = m.meta.len.min(rreq.data.len);
                let bytes = buf.get(..placed as usize).unwrap_or(&buf);
                if rreq.write_data(&rport.mem.memory(), bytes).is_err() {
                    // The receiver's memory faulted: the message stays queued for the next one.
                    self.fail(rdev, rport, &rreq, Status::Fault, n);
                    return Delivered::Requeue(Msg {
                        body: Body::Eager(buf),
                        ..m
                    });
                }
                self.received(rdev, rport, &rreq, &m.meta, placed, n);
                Delivered::Done
            }
            Body::Remote(held) => {
                let Some(buf) = held.bytes.as_deref() else {
                    // A stub is pulled by `op_recv`, never delivered from here.
                    self.fail(rdev, rport, &rreq, Status::NoMessage, n);
                    return Delivered::Requeue(Msg {
                        body: Body::Remote(held),
                        ..m
                    });
                };
                let placed = m.meta.len.min(rreq.data.len);
                let bytes = buf.get(..placed as usize).unwrap_or(buf);
                if rreq.write_data(&rport.mem.memory(), bytes).is_err() {
                    self.fail(rdev, rport, &rreq, Status::Fault, n);
                    return Delivered::Requeue(Msg {
                        body: Body::Remote(held),
                        ..m
                    });
                }
                self.received(rdev, rport, &rreq, &m.meta, placed, n);
                self.reply_remote(held, Status::Ok);
                Delivered::Done
            }
            Body::Held(sreq, sport) => {
                match self.transfer(m.src_dev, &sport, &sreq, &m.meta, rdev, rport, rreq, n) {
                    Survivor::None => Delivered::Done,
                    Survivor::Recv(rreq) => Delivered::Rematch(rreq),
                    Survivor::Send => Delivered::Requeue(Msg {
                        body: Body::Held(sreq, sport),
                        ..m
                    }),
                }
            }
        }
    }

    /// Drop message `m` (out of its queue, eager bytes returned): a held sender completes
    /// with `status`.
    pub(super) fn release(&self, m: Msg, status: Status, n: &mut Notify) {
        match m.body {
            Body::Held(sreq, sport) => {
                if status == Status::Ok {
                    self.sent(m.src_dev, &sport, &sreq, m.meta.len, n);
                } else {
                    self.fail(m.src_dev, &sport, &sreq, status, n);
                }
            }
            Body::Remote(held) => self.reply_remote(held, status),
            Body::Eager(_) => {}
        }
    }

    /// Take message `i` out of endpoint `ep`'s unexpected queue, returning its eager bytes.
    fn take_unexpected(&self, d: &mut Dev, ep: usize, i: usize) -> Option<Msg> {
        let m = d.ep_mut(ep)?.unexpected.remove(i)?;
        if let Body::Eager(buf) = &m.body {
            d.unexpected_bytes = d
                .unexpected_bytes
                .saturating_sub(eager_cost(buf.len() as u64));
        }
        Some(m)
    }

    /// Put message `m` back at position `at` of endpoint `ep` (generation `gen`) of `dev`,
    /// charging its eager bytes again. Dropped (a held sender completes PeerGone) if the
    /// endpoint closed meanwhile.
    fn requeue(&self, dev: usize, ep: usize, gen: u32, at: usize, m: Msg, n: &mut Notify) {
        let mut d = self.dev(dev);
        let cost = match &m.body {
            Body::Eager(buf) => eager_cost(buf.len() as u64),
            Body::Held(..) | Body::Remote(_) => 0,
        };
        if d.ep(ep).is_some_and(|e| e.generation == gen) {
            d.unexpected_bytes += cost;
            if let Some(e) = d.ep_mut(ep) {
                e.unexpected.insert(at.min(e.unexpected.len()), m);
                d.look_at_rx();
            }
            return;
        }
        drop(d);
        self.release(m, Status::PeerGone, n);
    }

    /// A plain receive ([`Verdict::Recv`]: RECV or TRECV, no flag but DIRECTED, its data area
    /// one range, where `rx` says), lent with its header and memory table but no streams. With
    /// nothing waiting unexpected at its endpoint it goes into the posted queue as its record,
    /// as [`Fabric::op_recv`] would put it there; anything else takes `op_recv`'s path with the
    /// streams the general parse gives it.
    #[inline(always)]
    pub(super) fn op_recv_plain(
        &self,
        dev: usize,
        port: &Port,
        req: &mut Req,
        rx: &PlainRx,
        n: &mut Notify,
    ) {
        let ep = req.req.ep as usize;
        let mut d = self.dev(dev);
        if let Some(e) = d.ep_mut(ep).filter(|e| e.unexpected.is_empty()) {
            let directed = (req.req.flags & flags::DIRECTED != 0)
                .then_some(req.req.peer)
                .filter(|src| !self.known_live(e, *src));
            let cookie = req.req.cookie;
            // Room first (rarely wanting), and the push told it has room: the record is then
            // built where it stays rather than on the stack and copied in.
            if e.posted.len() == e.posted.capacity() {
                grow_posted(&mut e.posted);
            }
            if e.posted.len() >= e.posted.capacity() {
                // SAFETY: `grow_posted` made room for one more if there was none.
                unsafe { std::hint::unreachable_unchecked() }
            }
            e.posted.push_back(Posted::plain(req, rx));
            if let Some(src) = directed {
                drop(d);
                self.check_directed_source(dev, port, ep, src, cookie, n);
            }
            return;
        }
        self.recv_plain_apart(dev, port, req, *rx, d, n);
    }

    /// [`Fabric::op_recv_plain`]'s other cases: the receive with the streams the general parse
    /// gives it, on `op_recv`'s path under the same lock (`d`).
    #[inline(never)]
    fn recv_plain_apart(
        &self,
        dev: usize,
        port: &Port,
        req: &mut Req,
        rx: PlainRx,
        d: DevGuard<'_, Dev>,
        n: &mut Notify,
    ) {
        rx.fill(req);
        self.recv_locked(dev, port, req, d, n);
    }

    /// Lent the request (as [`Fabric::op_send`]): it is taken only when posted or delivered.
    pub(super) fn op_recv(&self, dev: usize, port: &Port, req: &mut Req, n: &mut Notify) {
        let d = self.dev(dev);
        self.recv_locked(dev, port, req, d, n);
    }

    /// [`Fabric::op_recv`] with `dev`'s lock taken (`d`).
    #[inline(always)]
    fn recv_locked(
        &self,
        dev: usize,
        port: &Port,
        req: &mut Req,
        mut d: DevGuard<'_, Dev>,
        n: &mut Notify,
    ) {
        // Not the whole header: a copy of it costs as much as the rest of a post.
        let (ep, rflags) = (req.req.ep as usize, req.req.flags);
        let Some(e) = d.ep_mut(ep) else {
            drop(d);
            return self.fail(dev, port, req, Status::BadEndpoint, n);
        };
        let gen = e.generation;

        if rflags & flags::PEEK != 0 {
            let r = req.req;
            let found = e
                .unexpected
                .iter()
                .position(|m| m.claimed.is_none() && recv_matches(&r, &m.meta));
            let Some(at) = found else {
                drop(d);
                return self.fail(dev, port, req, Status::NoMessage, n);
            };
            if r.flags & flags::DISCARD != 0 {
                // PEEK | DISCARD (fi_tagged(3)): report the match as PEEK would, and drop it.
                let m = self.take_unexpected(&mut d, ep, at);
                drop(d);
                let Some(m) = m else {
                    return self.fail(dev, port, req, Status::NoMessage, n);
                };
                let meta = m.meta;
                self.release(m, Status::Ok, n);
                let c = recv_completion(&r, &meta, meta.len);
                return self.done(dev, port, req, &c, 0, n);
            }
            let Some(m) = e.unexpected.get_mut(at) else {
                drop(d);
                return self.fail(dev, port, req, Status::NoMessage, n);
            };
            if r.flags & flags::CLAIM != 0 {
                m.claimed = Some(r.cookie);
            }
            let mut c = recv_completion(&r, &m.meta, m.meta.len);
            drop(d);
            c.flags = (u32::from(c.flags) | comp_flags::CLAIMED).into();
            return self.done(dev, port, req, &c, 0, n);
        }

        if rflags & flags::CLAIM != 0 {
            let r = req.req;
            let at = e.unexpected.iter().position(|m| m.claimed == Some(r.data));
            let stub = at
                .and_then(|i| e.unexpected.get(i))
                .is_some_and(Msg::is_stub);
            if let (Some(i), true, 0) = (at, stub, r.flags & flags::DISCARD) {
                // Its bytes are at its sender: the receive waits for them.
                if let Err(back) = self.pull_stub(&mut d, ep, i, req.take()) {
                    *req = back;
                } else {
                    return;
                }
            }
            let m = at.and_then(|i| self.take_unexpected(&mut d, ep, i));
            drop(d);
            let (Some(at), Some(m)) = (at, m) else {
                return self.fail(dev, port, req, Status::NoMessage, n);
            };
            if r.flags & flags::DISCARD != 0 {
                let meta = m.meta;
                self.release(m, Status::Ok, n);
                let mut c = recv_completion(&r, &meta, 0);
                c.status = (Status::Ok as u32).into();
                c.olen = 0.into();
                c.flags = (u32::from(c.flags) | comp_flags::CLAIMED).into();
                return self.done(dev, port, req, &c, 0, n);
            }
            match self.deliver(dev, port, req.take(), m, n) {
                Delivered::Done => {}
                Delivered::Requeue(m) => self.requeue(dev, ep, gen, at, m, n),
                // The claimed message's sender faulted (and failed): nothing left to claim.
                Delivered::Rematch(req) => self.fail(dev, port, &req, Status::NoMessage, n),
            }
            return;
        }

        // Nothing waits unexpected most of the time: no search then.
        let at = if e.unexpected.is_empty() {
            None
        } else {
            e.unexpected
                .iter()
                .position(|m| m.claimed.is_none() && recv_matches(&req.req, &m.meta))
        };
        let Some(at) = at else {
            let directed = (rflags & flags::DIRECTED != 0)
                .then_some(req.req.peer)
                .filter(|src| !self.known_live(e, *src));
            let cookie = req.req.cookie;
            e.posted.push_back(Posted::new(req));
            if let Some(src) = directed {
                drop(d);
                self.check_directed_source(dev, port, ep, src, cookie, n);
            }
            return;
        };
        if e.unexpected.get(at).is_some_and(Msg::is_stub) {
            // Its bytes are at its sender: the receive waits for them.
            match self.pull_stub(&mut d, ep, at, req.take()) {
                Ok(()) => return,
                Err(back) => *req = back,
            }
        }
        let m = self.take_unexpected(&mut d, ep, at);
        drop(d);
        let Some(m) = m else {
            return self.fail(dev, port, req, Status::NoMessage, n);
        };
        match self.deliver(dev, port, req.take(), m, n) {
            Delivered::Done => {}
            Delivered::Requeue(m) => self.requeue(dev, ep, gen, at, m, n),
            // The sender's memory faulted (its send failed): try the next message.
            Delivered::Rematch(mut req) => self.op_recv(dev, port, &mut req, n),
        }
    }
}
