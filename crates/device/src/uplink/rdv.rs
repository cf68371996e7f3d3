// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Rendezvous: large data moves with the uplink's RMA instead of as DATA chunks.
//!
//! A request whose bytes are larger than [`RDV_THRESHOLD`] goes as one RDV_DATA naming the
//! sender's registered copies of them (SOURCE, up to 4 ranges); the receiving host reads them
//! with one `fi_readmsg` and hands the whole message to its fabric exactly like a reassembled
//! DATA message (keys, ranges and matching are checked there as for any message). An RMA read
//! of more than [`RDV_THRESHOLD`] bytes names registered sinks (SINK, up to 4): the target
//! writes the bytes read with one `fi_writemsg` and then answers RDV_REPLY (sends are ordered
//! after writes, FI_ORDER_SAW, and the reply leaves only after the write completed). Both
//! sides use rendezvous only when
//! both uplinks granted RMA (HELLO `caps`); otherwise data goes in chunks as before.
//!
//! Messages from one host reach the fabric in the order they arrived: a message behind a
//! rendezvous still being read waits for it. Registrations are made per request with the
//! access it needs (remote read of a source, remote write of a sink) and closed when the
//! request completes or its host is lost; a buffer the provider may still be reading or
//! writing stays allocated until that operation's completion.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use vfabric_fi_sys as sys;
use vfabric_proto::{Opcode, Status};

use super::fi::Mr;
use super::remote::{GuestBytes, RemoteSend};
use super::wire::{self, rdv_flags, Message, Rdv, RdvDesc};
use super::{Outgoing, Stale, Worker};

use crate::fabric::{DirectDest, DirectSource, Incoming};

/// Requests with more bytes than this (or reads returning more) go by rendezvous: beyond
/// two DATA chunks one RMA transfer costs less than the chunks' copies and messages.
pub(crate) const RDV_THRESHOLD: usize = 16 << 10;
/// Access of a rendezvous source: peers read it.
const REMOTE_READ: u64 = sys::FI_REMOTE_READ as u64;
/// Rendezvous reads in flight per peer; later ones wait (in order) for a slot.
const MAX_READS_PER_HOST: usize = 4;
/// Messages of one peer waiting behind a rendezvous, at most (a well-behaved peer has at most
/// `remote::MAX_INFLIGHT` requests out, in all).
const MAX_QUEUED_PER_HOST: usize = super::remote::MAX_INFLIGHT;
/// Bytes of whole messages of one peer waiting behind a rendezvous, at most.
const MAX_QUEUED_BYTES_PER_HOST: u64 = super::remote::MAX_INFLIGHT_BYTES;
/// Context values of RMA operations (sends use `SEND_CONTEXT` and up, receives their index).
pub(super) const RMA_CONTEXT: u64 = 1 << 62;

/// A buffer and its registration; the registration is closed first (fields drop in order).
pub(super) struct Staged {
    mr: Mr,
    buf: Vec<u8>,
    /// The registered bytes are in a guest's memory, not in `buf` (a zero-copy source): the
    /// mapping stays alive until after the registration is closed.
    guest: Option<GuestBytes>,
    /// The registered bytes are a read's sink in its guest's memory (a shadow of its pages).
    sink: Option<Arc<GuestSink>>,
}

impl Staged {
    fn own(mr: Mr, buf: Vec<u8>) -> Self {
        Staged {
            mr,
            buf,
            guest: None,
            sink: None,
        }
    }

    /// Bytes of a source: its range of guest memory, or its buffer.
    fn source_len(&self) -> usize {
        self.guest.as_ref().map_or(self.buf.len(), GuestBytes::len)
    }

    fn into_bytes(self) -> Vec<u8> {
        let Staged { mr, buf, .. } = self;
        drop(mr);
        buf
    }
}

/// A mapping of its own, for one read, of the guest pages a read into a receive or target
/// region writes (the same pages as the device's mapping: the bytes land in guest memory with
/// no copy). It can be *revoked*: mapped over with private anonymous memory, after which
/// nothing the provider still writes for that read reaches the guest (a socket's late bytes
/// land in the daemon's throw-away pages), so the receive can be handed back at once, whatever
/// the provider does with the operation. Unmapped when the op goes.
struct Shadow {
    /// The file bytes it maps: kept (idle) after its read for the next read of the same bytes
    /// (a receive buffer posted again), since mapping costs about what the copy it saves does.
    key: ShadowKey,
    base: usize,
    map_len: usize,
    /// Address of the first byte to write (inside the mapping).
    at: usize,
    revoked: bool,
    /// Left mapped when dropped (a revoked sink whose target never answered: a write the
    /// provider took in before the link went silent may still land in it, however late).
    leak: bool,
}

/// A read's sinks in its initiator guest's memory: a shadow of each destination range's
/// pages, each registered for remote write, so that the target's `fi_writemsg` lands in guest
/// memory and the RDV_REPLY completes the read with no copy. Shared by the uplink and the request's pending
/// entry: whoever completes the request other than with its placed bytes (its guest withdrew
/// it, on the guest's thread; it failed; its host was lost) revokes it first, so the guest
/// never gets its buffer back while the wire may still write it.
pub(crate) struct GuestSink {
    /// One per range of the destination, in order.
    shadows: Mutex<Vec<Shadow>>,
    /// The file bytes each shadow maps (the destination's), for the overlap check of later
    /// reads.
    keys: Vec<ShadowKey>,
    len: usize,
    req_id: u64,
}

impl GuestSink {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Shadow>> {
        self.shadows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its shadows, once no one else holds it.
    fn into_shadows(self) -> Vec<Shadow> {
        self.shadows.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    /// Cut every shadow from the guest's pages: whatever the target still writes for this read
    /// lands in throw-away pages.
    pub(crate) fn revoke(&self) {
        let mut shadows = self.lock();
        if shadows.iter().all(|s| s.revoked) {
            return;
        }
        // Every range is cut (one that fails to is logged below).
        let mut cut = true;
        for s in shadows.iter_mut().filter(|s| !s.revoked) {
            cut &= s.revoke();
        }
        if cut {
            tracing::info!(
                req_id = self.req_id,
                "uplink: a read's sink in guest memory revoked"
            );
        } else {
            // Not expected (a MAP_FIXED over our own mapping); the log says it happened.
            warn!(
                req_id = self.req_id,
                "uplink: a read's sink in guest memory could not be revoked: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Which file bytes a shadow maps: the file's device and inode (the mapping keeps the file,
/// so its inode is not reused meanwhile), the offset of the first byte, the length.
type ShadowKey = (u64, u64, u64, usize);

/// Whether the file bytes `a` and `b` name share a byte.
fn keys_overlap(a: &ShadowKey, b: &ShadowKey) -> bool {
    let (&(ad, ai, ao, al), &(bd, bi, bo, bl)) = (a, b);
    let end = |o: u64, l: usize| u128::from(o) + l as u128;
    (ad, ai) == (bd, bi)
        && al > 0
        && bl > 0
        && u128::from(ao) < end(bo, bl)
        && u128::from(bo) < end(ao, al)
}

/// Idle shadows kept at most, and how long one is kept unused (it keeps the guest's memory
/// file open: a guest that left is freed within this).
const MAX_IDLE_SHADOWS: usize = 64;
const SHADOW_IDLE: Duration = Duration::from_secs(2);

impl Shadow {
    /// The file, key and offset of the `len` bytes of `g`.
    fn locate(g: &GuestBytes, len: usize) -> Option<(std::os::fd::RawFd, ShadowKey)> {
        let (fd, off) = g.file_at()?;
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `fd` is open (the guest memory in `g` holds it); `st` is room for a stat.
        if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: fstat succeeded and filled it.
        let st = unsafe { st.assume_init() };
        Some((fd, (st.st_dev, st.st_ino, off, len)))
    }

    /// Map the bytes `key` names (of file `fd`) once more; `None` when they cannot be mapped
    /// (then the read goes through a daemon buffer).
    fn new(fd: std::os::fd::RawFd, key: ShadowKey) -> Option<Shadow> {
        let (_, _, off, len) = key;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
        let delta = (off % page as u64) as usize;
        let map_len = (delta + len).div_ceil(page) * page;
        let file_off = libc::off_t::try_from(off - delta as u64).ok()?;
        // SAFETY: a new shared mapping of the guest's file at an address the kernel picks;
        // nothing else refers to it. MAP_POPULATE faults the pages in now (not one by one
        // under the read).
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                file_off,
            )
        };
        if base == libc::MAP_FAILED {
            debug!(
                "uplink: no mapping of a receive's pages: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(Shadow {
            key,
            base: base as usize,
            map_len,
            at: base as usize + delta,
            revoked: false,
            leak: false,
        })
    }

    /// Cut the mapping from the guest's pages (see the type). Returns whether it held.
    fn revoke(&mut self) -> bool {
        // SAFETY: replaces exactly our own mapping (MAP_FIXED over `base..base + map_len`)
        // with anonymous memory, atomically for any thread writing it meanwhile.
        let p = unsafe {
            libc::mmap(
                self.base as *mut libc::c_void,
                self.map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        self.revoked = p as usize == self.base;
        self.revoked
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        if self.leak {
            return;
        }
        // SAFETY: our own mapping; the op that wrote it is over (or its registration closed
        // and its connection's late bytes go nowhere we care about: revoked).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.map_len) };
    }
}

/// Whether rendezvous data may land in and leave from guest memory directly
/// (`VFABRIC_UPLINK_DIRECT=0` in the environment turns it off).
pub(crate) fn direct_allowed() -> bool {
    std::env::var("VFABRIC_UPLINK_DIRECT").map_or(true, |v| v != "0")
}

/// How long a withdrawn zero-copy source stays registered at most when its target does not
/// answer the CANCEL (a misbehaving peer): then it is closed anyway.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// A message from a peer that has not reached the fabric yet.
enum Inbound {
    /// Whole: delivered when it is at the front.
    Ready {
        req_id: u64,
        desc: wire::Data,
        bytes: Vec<u8>,
    },
    /// Its bytes are at the peer: read by `op` once started.
    Fetch {
        req_id: u64,
        desc: wire::Data,
        src: u64,
        /// The sender's sources.
        srcs: RmaSegs,
        /// Its head, inline in the RDV_DATA (an RMA write's ranges); the read brings the rest.
        head: Vec<u8>,
        op: Option<u64>,
        /// Its sender withdrew it (CANCEL) while it was being read: dropped when the read
        /// completes, and answered CANCELED then (the sender keeps its source until that).
        canceled: bool,
        /// Its read lands straight in the receive it matched (the op holds where).
        direct: bool,
    },
    /// Read straight into the receive it matched: that receive completes when it is at the
    /// front (receives complete in arrival order).
    Placed { req_id: u64, dest: Box<DirectDest> },
    /// Could not be read: its sender gets `status` when it is at the front.
    Failed { req_id: u64, status: Status },
}

/// The guest ranges a direct read writes (one `fi_readmsg` into all of them, in order): the
/// read's own mapping of each range's pages, each registered.
struct Landing {
    /// One per shadow, closed before the shadows are unmapped (fields drop in order).
    mrs: Vec<Mr>,
    shadows: Vec<Shadow>,
    /// The same ranges in the device's mapping (kept mapped with them), for the overlap
    /// check of later reads.
    guest: Vec<GuestBytes>,
}

impl Landing {
    /// (first byte, length) of each range in the device's mapping.
    fn spans(&self) -> impl Iterator<Item = (usize, usize)> + Clone + '_ {
        self.guest.iter().map(|g| (g.ptr() as usize, g.len()))
    }
}

/// (address, key, length) of each of a peer's sources or sinks, in order.
type RmaSegs = Vec<(u64, u64, u64)>;

/// [`RmaSegs`] of the sources or sinks a peer named.
fn rma_segs(segs: &[wire::RdvSeg]) -> RmaSegs {
    segs.iter()
        .map(|s| (s.addr.into(), s.key.into(), s.len.into()))
        .collect()
}

/// The first `len` bytes of the sources `srcs` (address, key, length), in order: `None` when
/// they hold fewer.
fn rma_prefix(srcs: &[(u64, u64, u64)], len: u64) -> Option<RmaSegs> {
    let mut left = len;
    let mut out = Vec::with_capacity(srcs.len());
    for &(addr, key, l) in srcs {
        if left == 0 {
            break;
        }
        let take = l.min(left);
        out.push((addr, key, take));
        left -= take;
    }
    (left == 0).then_some(out)
}

/// Whether any of the (first byte, length) spans of `a` shares a byte with one of `b`.
fn spans_overlap(
    a: &[(usize, usize)],
    b: impl IntoIterator<Item = (usize, usize)> + Clone,
) -> bool {
    a.iter().any(|&(lo, len)| {
        b.clone().into_iter().any(|(o, olen)| {
            len > 0 && olen > 0 && o < lo.saturating_add(len) && lo < o.saturating_add(olen)
        })
    })
}

/// An RMA operation in flight; its buffer lives here until its completion.
enum Op {
    /// A read into a daemon buffer.
    Read {
        host: u16,
        req_id: u64,
        staged: Staged,
    },
    /// A read straight into a receive's buffer or an RMA write's target regions.
    DirectRead {
        host: u16,
        req_id: u64,
        landing: Landing,
        /// The receive (or write) it reads into; its fence ends when the read is over (or
        /// when the read is revoked: then `None`, with the revoked `landing` still there).
        direct: Option<Box<DirectDest>>,
    },
    Write {
        host: u16,
        dest: u64,
        req_id: u64,
        written: u64,
        staged: Staged,
        /// Written straight from the source region (its region entered until the write is
        /// over) through the write's own mapping of its pages, revoked if the host is lost.
        source: Option<(Box<DirectSource>, Shadow)>,
    },
}

#[derive(Default)]
pub(super) struct Rendezvous {
    /// Our requests' bytes that peers read (one registration per source), by request id,
    /// with their host.
    sources: HashMap<u64, (u16, Vec<Staged>)>,
    /// Our RMA reads' sinks (one registration per sink), by request id, with their host.
    sinks: HashMap<u64, (u16, Vec<Staged>)>,
    /// Per peer, its messages in arrival order while one of them is being read.
    inbound: HashMap<u16, VecDeque<Inbound>>,
    ops: HashMap<u64, Op>,
    next_op: u64,
    /// Sinks that peers named for their requests not answered yet: (host, req id) →
    /// (address, key, length) of each, in order.
    peer_sinks: HashMap<(u16, u64), RmaSegs>,
    /// Rendezvous reads and writes done, per peer (the first of each is logged).
    done: HashMap<(u16, bool), u64>,
    /// Rendezvous messages per peer made stubs before they were read (the first is logged).
    unread: HashMap<u16, u64>,
    /// Zero-copy sources and sinks in guest memory of withdrawn requests (or of requests
    /// to a lost host), kept registered (and mapped) until their target answers the CANCEL,
    /// which it does only once no read of them is in flight (and, for a sink, after the
    /// write into it: the answer follows the write on the wire); or until `DRAIN_LIMIT`
    /// passed.
    draining: HashMap<u64, (u16, Vec<Staged>, Instant)>,
    /// Bytes of our rendezvous sources named in guest memory (no copy) and copied into a
    /// daemon buffer first (staged), since the start; logged when they change.
    pub zero_copy_bytes: u64,
    pub staged_bytes: u64,
    logged: (u64, u64),
    /// Bytes of messages read at this end straight into the receive they matched, and read
    /// into a daemon buffer that the fabric then copies, since the start; logged when they
    /// change.
    pub placed_bytes: u64,
    pub copied_bytes: u64,
    logged_reads: (u64, u64),
    /// Bytes of our RMA reads' rendezvous sinks written by the target straight into guest
    /// memory, and into a daemon buffer then copied, since the start; logged when they change.
    pub sink_placed_bytes: u64,
    pub sink_copied_bytes: u64,
    logged_sinks: (u64, u64),
    /// Bytes of peers' RMA reads written to their sinks straight from guest memory, and
    /// copied into a daemon buffer first, since the start; logged when they change.
    pub reply_direct_bytes: u64,
    pub reply_copied_bytes: u64,
    logged_replies: (u64, u64),
    /// Shadows no read uses now, with when they were last used (most recent last).
    idle_shadows: Vec<(Shadow, Instant)>,
    /// Shadows mapped for reads, and reads that used an idle one again (logged with the reads).
    shadows_mapped: u64,
    shadows_reused: u64,
}

impl Drop for Rendezvous {
    /// The uplink stops (the daemon exits): no progress call is made after this, so nothing
    /// writes into a receive's buffer any more; receives waiting for their reads go.
    fn drop(&mut self) {
        for op in self.ops.values() {
            if let Op::DirectRead {
                direct: Some(d), ..
            } = op
            {
                d.fence.end();
            }
        }
    }
}

impl Rendezvous {
    /// A mapping of the `len` bytes of `g` for a read: an idle one of the same bytes, or new.
    fn take_shadow(&mut self, g: &GuestBytes, len: usize) -> Option<Shadow> {
        let (fd, key) = Shadow::locate(g, len)?;
        match self.idle_shadows.iter().rposition(|(s, _)| s.key == key) {
            Some(i) => {
                self.shadows_reused += 1;
                Some(self.idle_shadows.remove(i).0)
            }
            None => {
                let s = Shadow::new(fd, key)?;
                self.shadows_mapped += 1;
                Some(s)
            }
        }
    }

    /// A shadow whose read is over (not revoked) is kept for the next read of its bytes.
    fn keep_shadow(&mut self, s: Shadow) {
        if s.revoked {
            return;
        }
        if self.idle_shadows.len() >= MAX_IDLE_SHADOWS {
            self.idle_shadows.remove(0);
        }
        self.idle_shadows.push((s, Instant::now()));
    }

    /// A source or sink whose request is withdrawn (or whose host is lost): a daemon buffer
    /// closes now; guest memory stays registered until its host answers (see `draining`), so
    /// that no read or write of it is in flight when the registration and the mapping go.
    fn drain(&mut self, req_id: u64, host: u16, staged: Vec<Staged>) {
        let held: Vec<Staged> = staged
            .into_iter()
            .filter(|st| st.guest.is_some() || st.sink.is_some())
            .collect();
        let Some(st) = held.first() else {
            return;
        };
        if st.guest.is_some() {
            tracing::info!(
                req_id,
                host,
                "uplink: a withdrawn zero-copy source waits for its target's answer"
            );
        } else {
            tracing::info!(
                req_id,
                host,
                "uplink: a withdrawn read's sink in guest memory waits for its target's answer"
            );
        }
        self.draining
            .entry(req_id)
            .or_insert_with(|| (host, Vec::new(), Instant::now()))
            .1
            .extend(held);
    }

    /// RMA operations in flight.
    pub fn in_flight(&self) -> usize {
        self.ops.len()
    }

    /// Whether `host`'s queue has room for one more message of `len` bytes held here (0 for
    /// one still at the peer): a peer that ignores its own bounds gets NoResources, not our
    /// memory.
    fn has_room(&self, host: u16, len: u64) -> bool {
        let Some(q) = self.inbound.get(&host) else {
            return true;
        };
        let held: u64 = q
            .iter()
            .map(|i| match i {
                Inbound::Ready { bytes, .. } => bytes.len() as u64,
                _ => 0,
            })
            .sum();
        q.len() < MAX_QUEUED_PER_HOST && held.saturating_add(len) <= MAX_QUEUED_BYTES_PER_HOST
    }
}

impl Worker {
    /// Whether requests to `host` may go by rendezvous.
    fn rdv_with(&self, host: u16) -> bool {
        self.ep.rma()
            && self
                .set
                .peers
                .iter()
                .any(|p| p.host_id == host && p.caps & wire::caps::RMA != 0)
    }

    /// Send `s` (request `req_id`) as one RDV_DATA if it is large enough and both uplinks do
    /// RMA. Returns it back, its bytes all in `payload`, when it goes as DATA chunks instead
    /// (`None` also when it failed: then it is completed).
    pub(super) fn send_rdv(
        &mut self,
        dest: u64,
        req_id: u64,
        s: Box<RemoteSend>,
        desc: wire::Data,
    ) -> Option<Box<RemoteSend>> {
        let mut s = self.try_rdv(dest, req_id, s, desc)?;
        // Chunks: bytes left in guest memory are copied now (the guest's request still
        // waits for its verdict, so they are the bytes it posted).
        for g in std::mem::take(&mut s.guest) {
            if g.copy_into(&mut s.payload).is_err() {
                self.complete_pending(req_id, None, Status::Fault);
                return None;
            }
        }
        Some(s)
    }

    fn try_rdv(
        &mut self,
        dest: u64,
        req_id: u64,
        mut s: Box<RemoteSend>,
        desc: wire::Data,
    ) -> Option<Box<RemoteSend>> {
        let is_read = s.req.req.opcode == Opcode::RmaRead;
        let sink_len = if is_read { s.len } else { 0 };
        let inline_room = wire::MAX_MESSAGE - wire::HEADER_LEN - wire::DATA_LEN - wire::RDV_LEN;
        let data_len = s.payload.len() + s.guest.iter().map(GuestBytes::len).sum::<usize>();
        let source = data_len > RDV_THRESHOLD.min(inline_room);
        let sink = sink_len as usize > RDV_THRESHOLD;
        if !(source || sink) || !self.rdv_with(s.host) {
            return Some(s);
        }
        let mut rdv = RdvDesc::default();
        let mut staged_src = None;
        if source {
            let guest = std::mem::take(&mut s.guest);
            // The bytes in guest memory are registered where they are, each range (no copy),
            // when the target reads them all in one operation; what precedes them (an RMA
            // write's ranges; nothing for a send) goes inline.
            // (An empty range would be an empty source, which the target refuses.)
            let in_place = !guest.is_empty()
                && s.payload.len() <= inline_room
                && guest.len() <= self.ep.rma_iov_limit()
                && guest.iter().all(|g| g.len() > 0);
            let reg = if in_place {
                self.register_sources(guest).map_err(|(g, e)| {
                    s.guest = g;
                    e
                })
            } else {
                for g in guest {
                    if g.copy_into(&mut s.payload).is_err() {
                        self.complete_pending(req_id, None, Status::Fault);
                        return None;
                    }
                }
                // The request's own bytes are registered (no further copy); given back if
                // they go in chunks after all.
                let buf = std::mem::take(&mut s.payload);
                // SAFETY: the buffer moves into `Staged` with its registration (a Vec's heap
                // bytes do not move) and is freed only after the registration is closed.
                match unsafe { self.ep.register(&buf, REMOTE_READ) } {
                    Ok(mr) => Ok(vec![Staged::own(mr, buf)]),
                    Err(e) => {
                        s.payload = buf;
                        Err(e)
                    }
                }
            };
            match reg {
                Ok(srcs) => {
                    for st in &srcs {
                        rdv.push_source(st.mr.addr, st.mr.key, st.source_len() as u64);
                        // Only the bytes the peer reads count (not an inline head).
                        match &st.guest {
                            Some(g) => self.rdv.zero_copy_bytes += g.len() as u64,
                            None => self.rdv.staged_bytes += st.buf.len() as u64,
                        }
                    }
                    staged_src = Some(srcs);
                }
                Err(e) => {
                    debug!("uplink: rendezvous source not registered, sending chunks: {e}");
                    return Some(s);
                }
            }
        }
        let mut staged_sink = None;
        let read_dest = std::mem::take(&mut s.sink);
        let in_guest = if sink && !read_dest.is_empty() && self.direct_reads_on() {
            self.guest_sink(req_id, &read_dest, sink_len as usize)
        } else {
            None
        };
        drop(read_dest);
        if let Some(sinks) = in_guest {
            for (st, len) in &sinks {
                rdv.push_sink(st.mr.addr, st.mr.key, *len as u64);
            }
            staged_sink = Some(sinks.into_iter().map(|(st, _)| st).collect());
        } else if sink {
            let buf = vec![0u8; sink_len as usize];
            // SAFETY: as for the source.
            match unsafe { self.ep.register(&buf, u64::from(sys::FI_REMOTE_WRITE)) } {
                Ok(mr) => {
                    rdv.push_sink(mr.addr, mr.key, sink_len);
                    staged_sink = Some(vec![Staged::own(mr, buf)]);
                }
                Err(e) => {
                    debug!("uplink: rendezvous sink not registered, sending chunks: {e}");
                    for st in staged_src.into_iter().flatten() {
                        let Staged { mr, buf, guest, .. } = st;
                        drop(mr);
                        match guest {
                            Some(g) => s.guest.push(g),
                            None => s.payload = buf,
                        }
                    }
                    return Some(s);
                }
            }
        }
        // With a source in daemon memory `payload` was moved into it (empty now); with one
        // in guest memory `payload` is the inline head.
        let chunk: &[u8] = &s.payload;
        let bytes = Message::Rdv(Rdv::Data {
            fabric_id: self.set.fabric_id,
            host_id: self.set.host_id,
            desc,
            rdv,
            chunk,
        })
        .encode();
        self.backlog.push_back(Outgoing {
            host: s.host,
            dest,
            bytes,
            req_id: Some(req_id),
        });
        if let Some(st) = staged_src {
            self.rdv.sources.insert(req_id, (s.host, st));
        }
        if let Some(st) = staged_sink {
            self.rdv.sinks.insert(req_id, (s.host, st));
        }
        None
    }

    /// Each of the `guest` ranges registered for the target's read (a zero-copy source each),
    /// or all of them given back with the error.
    #[allow(clippy::type_complexity)]
    fn register_sources(
        &mut self,
        guest: Vec<GuestBytes>,
    ) -> Result<Vec<Staged>, (Vec<GuestBytes>, super::FiError)> {
        let mut srcs = Vec::with_capacity(guest.len());
        let mut rest = guest.into_iter();
        while let Some(g) = rest.next() {
            // SAFETY: `g` keeps the guest mapping alive and moves into `Staged` with the
            // registration, which is closed before `g` drops.
            match unsafe { self.ep.register_raw(g.ptr(), g.len(), REMOTE_READ) } {
                Ok(mr) => srcs.push(Staged {
                    mr,
                    buf: Vec::new(),
                    guest: Some(g),
                    sink: None,
                }),
                Err(e) => {
                    let mut back: Vec<GuestBytes> = srcs
                        .into_iter()
                        .filter_map(|st| {
                            let Staged { mr, guest, .. } = st;
                            drop(mr);
                            guest
                        })
                        .collect();
                    back.push(g);
                    back.extend(rest);
                    return Err((back, e));
                }
            }
        }
        Ok(srcs)
    }

    /// The sinks of read `req_id` in its guest's memory (`dest`, the ranges of the read's
    /// first `len` bytes): a shadow of each range's pages registered for remote write, with
    /// its length, all attached to the pending request as one [`GuestSink`] (whose completer
    /// revokes it). `None` (a daemon buffer is the sink): more ranges than one write may
    /// name, no file behind them, the mapping or a registration failed, or the request was
    /// withdrawn meanwhile.
    fn guest_sink(
        &mut self,
        req_id: u64,
        dest: &[GuestBytes],
        len: usize,
    ) -> Option<Vec<(Staged, usize)>> {
        // (An empty range would be an empty sink, which the target refuses.)
        if dest.len() > self.ep.rma_iov_limit()
            || dest.iter().any(|g| g.len() == 0)
            || dest.iter().map(GuestBytes::len).sum::<usize>() != len
        {
            return None;
        }
        let keys: Vec<ShadowKey> = dest
            .iter()
            .map(|g| Shadow::locate(g, g.len()).map(|(_, key)| key))
            .collect::<Option<_>>()?;
        // Reads of one guest land in the order they were made (as on one host): bytes that
        // overlap a sink in flight go to a daemon buffer, copied when their reply comes.
        let overlaps = self.rdv.sinks.values().flat_map(|(_, sts)| sts).any(|st| {
            st.sink.as_ref().is_some_and(|s| {
                s.keys
                    .iter()
                    .any(|a| keys.iter().any(|b| keys_overlap(a, b)))
            })
        });
        if overlaps {
            debug!(
                req_id,
                "uplink: a read's destination overlaps a read in flight"
            );
            return None;
        }
        let mut mrs = Vec::with_capacity(dest.len());
        let mut shadows = Vec::with_capacity(dest.len());
        for g in dest {
            let Some(shadow) = self.rdv.take_shadow(g, g.len()) else {
                break;
            };
            // SAFETY: the shadow mapping lives in the `GuestSink` with the registration,
            // which is closed before the last `Arc` of it (so the mapping) goes.
            match unsafe {
                self.ep.register_raw(
                    shadow.at as *const u8,
                    g.len(),
                    u64::from(sys::FI_REMOTE_WRITE),
                )
            } {
                Ok(mr) => {
                    mrs.push((mr, g.len()));
                    shadows.push(shadow);
                }
                Err(e) => {
                    debug!(req_id, "uplink: a read's destination not registered: {e}");
                    self.rdv.keep_shadow(shadow);
                    break;
                }
            }
        }
        if shadows.len() < dest.len() {
            drop(mrs);
            for sh in shadows {
                self.rdv.keep_shadow(sh);
            }
            return None;
        }
        let sink = Arc::new(GuestSink {
            keys,
            shadows: Mutex::new(shadows),
            len,
            req_id,
        });
        if !self.outbox.attach_sink(req_id, &sink) {
            drop(mrs);
            if let Ok(gs) = Arc::try_unwrap(sink) {
                for sh in gs.into_shadows() {
                    self.rdv.keep_shadow(sh);
                }
            }
            return None;
        }
        Some(
            mrs.into_iter()
                .map(|(mr, len)| {
                    let st = Staged {
                        mr,
                        buf: Vec::new(),
                        guest: None,
                        sink: Some(sink.clone()),
                    };
                    (st, len)
                })
                .collect(),
        )
    }

    /// Request `req_id` completed: its rendezvous buffers go (a peer reading or writing them
    /// late gets an error completion, never another request's bytes: keys are not reused).
    pub(super) fn rdv_forget(&mut self, req_id: u64) {
        self.rdv.sources.remove(&req_id);
        self.rdv.sinks.remove(&req_id);
    }

    /// Request `req_id` was withdrawn (CANCEL): as [`Worker::rdv_forget`], but a zero-copy
    /// source stays registered until its target answers (it may be reading it now).
    pub(super) fn rdv_withdraw(&mut self, req_id: u64) {
        if let Some((host, st)) = self.rdv.sources.remove(&req_id) {
            self.rdv.drain(req_id, host, st);
        }
        if let Some((host, st)) = self.rdv.sinks.remove(&req_id) {
            self.rdv.drain(req_id, host, st);
        }
    }

    /// `host` answered request `req_id` (a verdict, or the answer to its CANCEL): no read
    /// of its source is in flight there any more, so a withdrawn zero-copy source closes.
    pub(super) fn rdv_answered(&mut self, req_id: u64, host: Option<u16>) {
        if self
            .rdv
            .draining
            .get(&req_id)
            .is_some_and(|(h, ..)| host.is_none_or(|x| x == *h))
        {
            let sink = self
                .rdv
                .draining
                .remove(&req_id)
                .is_some_and(|(_, st, _)| st.iter().any(|st| st.sink.is_some()));
            let what = if sink {
                "read's sink in guest memory"
            } else {
                "zero-copy source"
            };
            tracing::info!(
                req_id,
                ?host,
                "uplink: a withdrawn {what} closed on its target's answer"
            );
        }
    }

    /// CANCEL of `host`'s request `req_id`: a rendezvous of it not delivered yet is dropped
    /// and answered CANCELED, once no read of it is in flight (a read in flight is let
    /// complete first: the source it reads may be its sender's guest memory, which the
    /// sender keeps registered until this answer). Returns `false` when it is not here.
    pub(super) fn rdv_cancel(&mut self, host: u16, req_id: u64) -> bool {
        let Some(q) = self.rdv.inbound.get_mut(&host) else {
            return false;
        };
        let Some(item) = q.iter_mut().find(|i| {
            matches!(i, Inbound::Ready { req_id: r, .. } | Inbound::Fetch { req_id: r, .. }
                | Inbound::Failed { req_id: r, .. } | Inbound::Placed { req_id: r, .. }
                if *r == req_id)
        }) else {
            return false;
        };
        match item {
            Inbound::Fetch {
                op: Some(_),
                canceled,
                ..
            } => *canceled = true,
            _ => {
                let was = std::mem::replace(
                    item,
                    Inbound::Failed {
                        req_id,
                        status: Status::Canceled,
                    },
                );
                // Its bytes are in the receive, which was not completed: matched again.
                if let Inbound::Placed { dest, .. } = was {
                    self.fabric
                        .direct_unclaim(host, req_id, dest, &mut self.notify);
                }
            }
        }
        self.rdv_pump(host);
        true
    }

    /// Take the bytes a peer wrote into the sink of our request `req_id`, if it has one of
    /// exactly `written` bytes.
    fn take_sink(&mut self, req_id: u64, written: u64) -> Option<Vec<u8>> {
        let fits = self
            .rdv
            .sinks
            .get(&req_id)
            .is_some_and(|(_, sts)| {
                matches!(sts.as_slice(), [s] if s.sink.is_none() && s.buf.len() as u64 == written)
            });
        if !fits {
            return None;
        }
        let bytes = self.rdv.sinks.remove(&req_id)?.1.pop()?.into_bytes();
        self.rdv.sink_copied_bytes += bytes.len() as u64;
        Some(bytes)
    }

    /// `host` wrote `written` bytes into the sink in guest memory of our read `req_id` and
    /// answered `status` (RDV_REPLY, after the write): with all of them there the read
    /// completes with no copy; otherwise the sink is revoked and the read fails `Invalid`.
    fn sink_written(&mut self, host: u16, req_id: u64, status: Status, written: u64) {
        let Some((_, sts)) = self.rdv.sinks.remove(&req_id) else {
            return;
        };
        let Some(mut p) = self.outbox.take_placed(req_id, Some(host)) else {
            // Withdrawn meanwhile (its withdrawer revoked the sink): this is its answer, after
            // the write.
            drop(sts);
            return self.rdv_answered(req_id, Some(host));
        };
        let sink = sts.first().and_then(|st| st.sink.clone());
        // The write is over: nothing names the guest's pages any more.
        drop(sts);
        p.sink = None;
        match sink {
            Some(sink) if status == Status::Ok && written == sink.len as u64 => {
                let len = written;
                self.rdv.sink_placed_bytes += len;
                self.fabric.complete_remote(
                    p.dev,
                    &p.port,
                    &p.req,
                    p.len,
                    Status::Ok,
                    &[],
                    &mut self.notify,
                );
                if let Ok(gs) = Arc::try_unwrap(sink) {
                    for sh in gs.into_shadows() {
                        self.rdv.keep_shadow(sh);
                    }
                }
            }
            sink => {
                if let Some(sink) = sink {
                    sink.revoke();
                }
                warn!(
                    host,
                    req_id, written, "uplink: a rendezvous reply that fits no sink"
                );
                self.fabric.complete_remote(
                    p.dev,
                    &p.port,
                    &p.req,
                    p.len,
                    Status::Invalid,
                    &[],
                    &mut self.notify,
                );
            }
        }
    }

    /// A rendezvous message from peer `src`.
    pub(super) fn rdv_message(&mut self, src: u64, m: Rdv<'_>) {
        match m {
            Rdv::Data {
                fabric_id,
                host_id,
                desc,
                rdv,
                chunk,
            } => {
                let req_id = u64::from(desc.req_id);
                match self.introduced(src, fabric_id, host_id) {
                    Ok(()) => {}
                    Err(Stale::Down) => return self.stale_data(host_id, src, req_id),
                    Err(Stale::Refused(why)) => {
                        return warn!("uplink: refusing rendezvous data: {why}")
                    }
                }
                // A chunked message cut short by this one (the wire keeps order) is refused.
                self.abandon_partial(host_id);
                if !self.ep.rma() {
                    // We never offered RMA: a peer that uses it breaks the protocol.
                    warn!(
                        host = host_id,
                        "uplink: rendezvous from a peer we offered no RMA"
                    );
                    return self.reply(host_id, req_id, Status::Invalid, &[]);
                }
                let total = u64::from(desc.total_len);
                if total > self.max_incoming() {
                    return self.reply(host_id, req_id, Status::TooLarge, &[]);
                }
                let flags = u32::from(rdv.flags);
                if flags & rdv_flags::SINK != 0 {
                    self.rdv
                        .peer_sinks
                        .insert((host_id, req_id), rma_segs(rdv.sinks()));
                }
                if !self.rdv.has_room(host_id, chunk.len() as u64) {
                    self.rdv.peer_sinks.remove(&(host_id, req_id));
                    return self.reply(host_id, req_id, Status::NoResources, &[]);
                }
                let item = if flags & rdv_flags::SOURCE != 0 {
                    Inbound::Fetch {
                        req_id,
                        desc,
                        src,
                        srcs: rma_segs(rdv.sources()),
                        head: chunk.to_vec(),
                        op: None,
                        canceled: false,
                        direct: false,
                    }
                } else {
                    Inbound::Ready {
                        req_id,
                        desc,
                        bytes: chunk.to_vec(),
                    }
                };
                self.rdv.inbound.entry(host_id).or_default().push_back(item);
                self.rdv_pump(host_id);
            }
            Rdv::Reply {
                fabric_id,
                host_id,
                req_id,
                status,
                written,
            } => {
                if !self.reply_introduced(src, fabric_id, host_id) {
                    return;
                }
                // Only a pending read of that host with a sink of that size takes its bytes.
                let ours = self.outbox.pending_is(req_id, host_id, |_| true);
                if !ours {
                    // A withdrawn read's answer: its target writes its sink no more.
                    self.rdv_answered(req_id, Some(host_id));
                    return debug!(req_id, "uplink: a rendezvous verdict for no request");
                }
                let in_guest =
                    self.rdv.sinks.get(&req_id).is_some_and(|(h, sts)| {
                        *h == host_id && sts.iter().any(|s| s.sink.is_some())
                    });
                if in_guest {
                    return self.sink_written(host_id, req_id, status, written);
                }
                match self.take_sink(req_id, written) {
                    Some(bytes) if status == Status::Ok => {
                        self.complete_pending_with(req_id, Some(host_id), status, &bytes)
                    }
                    _ => {
                        warn!(
                            host = host_id,
                            req_id, written, "uplink: a rendezvous reply that fits no sink"
                        );
                        self.complete_pending(req_id, Some(host_id), Status::Invalid)
                    }
                }
            }
        }
    }

    /// A whole message from `host` for the fabric: now, or behind the ones still being read.
    pub(super) fn inbound(&mut self, host: u16, req_id: u64, desc: wire::Data, bytes: Vec<u8>) {
        if self.rdv.inbound.get(&host).is_none_or(VecDeque::is_empty) {
            return self.deliver(host, req_id, desc, bytes);
        }
        if !self.rdv.has_room(host, bytes.len() as u64) {
            return self.reply(host, req_id, Status::NoResources, &[]);
        }
        if let Some(q) = self.rdv.inbound.get_mut(&host) {
            q.push_back(Inbound::Ready {
                req_id,
                desc,
                bytes,
            });
        }
    }

    /// Start the reads `host`'s queue has room for, then deliver its messages from the front
    /// while they are whole.
    fn rdv_pump(&mut self, host: u16) {
        let Some(mut q) = self.rdv.inbound.remove(&host) else {
            return;
        };
        // A message at the front not read yet that the target would keep only as a stub (past
        // its bound) becomes one unread: its bytes stay at the sender until a receive pulls them.
        while let Some(Inbound::Fetch {
            req_id,
            desc,
            head,
            op: None,
            ..
        }) = q.front()
        {
            if !head.is_empty() || !self.fabric.stub_unread(host, *req_id, desc) {
                break;
            }
            q.pop_front();
            let n = self.rdv.unread.entry(host).or_default();
            *n += 1;
            if *n == 1 {
                tracing::info!(
                    host,
                    "uplink: a rendezvous from host {host} left unread (a stub)"
                );
            }
        }
        let mut reading = q
            .iter()
            .filter(|i| matches!(i, Inbound::Fetch { op: Some(_), .. }))
            .count();
        // Every message ahead has matched its receive already (read straight into it): this
        // one may match now too, so matching keeps arrival order.
        let mut matched_ahead = true;
        for item in q.iter_mut() {
            if reading >= MAX_READS_PER_HOST {
                break;
            }
            if let Inbound::Fetch {
                req_id,
                desc,
                src,
                srcs,
                head,
                op: op @ None,
                direct,
                ..
            } = item
            {
                let req_id = *req_id;
                let claim = matched_ahead.then_some(&*desc);
                match self.start_read(host, req_id, claim, desc.total_len.into(), head, *src, srcs)
                {
                    Ok(Some((ctx, d))) => {
                        *op = Some(ctx);
                        *direct = d;
                        reading += 1;
                    }
                    // No room at the provider now: the next turn tries again.
                    Ok(None) => break,
                    Err(status) => *item = Inbound::Failed { req_id, status },
                }
            }
            matched_ahead &= matches!(
                item,
                Inbound::Fetch { direct: true, .. } | Inbound::Placed { .. }
            );
        }
        while let Some(front) = q.front() {
            match front {
                Inbound::Fetch { .. } => break,
                _ => match q.pop_front() {
                    Some(Inbound::Ready {
                        req_id,
                        desc,
                        bytes,
                    }) => self.deliver(host, req_id, desc, bytes),
                    Some(Inbound::Failed { req_id, status }) => {
                        self.rdv.peer_sinks.remove(&(host, req_id));
                        self.reply(host, req_id, status, &[]);
                    }
                    Some(Inbound::Placed { req_id, dest }) => {
                        let status =
                            self.fabric
                                .direct_placed(host, req_id, dest, &mut self.notify);
                        self.reply(host, req_id, status, &[]);
                    }
                    _ => {}
                },
            }
        }
        if !q.is_empty() {
            self.rdv.inbound.insert(host, q);
        }
    }

    /// Post the read of a peer's source (the `len` bytes of a request after its inline
    /// `head`): `Ok(None)` when the provider has no room now.
    ///
    /// With `claim` (the message's description; every earlier message of `host` matched
    /// already), a plain message that a posted receive with a one-range buffer matches is read
    /// straight into that buffer: `Ok(Some((ctx, true)))`.
    #[allow(clippy::too_many_arguments)]
    fn start_read(
        &mut self,
        host: u16,
        req_id: u64,
        claim: Option<&wire::Data>,
        len: u64,
        head: &[u8],
        src: u64,
        srcs: &[(u64, u64, u64)],
    ) -> Result<Option<(u64, bool)>, Status> {
        let Ok(len) = usize::try_from(len) else {
            return Err(Status::TooLarge);
        };
        // The parser saw to it that the source holds at least one byte.
        if head.len() >= len {
            return Err(Status::Invalid);
        }
        // One operation reads them all: more than our provider takes come only from a peer
        // that ignores it (both ends run the uplink's one provider).
        if srcs.len() > self.ep.rma_iov_limit() {
            warn!(
                host,
                req_id,
                sources = srcs.len(),
                "uplink: a rendezvous with more sources than one read may name"
            );
            return Err(Status::Invalid);
        }
        if let Some(desc) = claim.filter(|_| self.direct_reads_on()) {
            let max_ranges = self.ep.iov_limit();
            let dest = if head.is_empty() {
                self.fabric.claim_direct(host, req_id, desc, max_ranges)
            } else {
                self.fabric.claim_direct_write(host, desc, head, max_ranges)
            };
            match dest {
                Some(dest) => match self.start_direct_read(host, req_id, dest, src, srcs) {
                    Ok(ctx) => return Ok(Some((ctx, true))),
                    // Read into a daemon buffer instead (the receive was matched again).
                    Err(again) if again => return Ok(None),
                    Err(_) => {}
                },
                // Its receive may be posted but not taken by the device yet: the next turn
                // tries again, once the device has taken its RX rings.
                None if head.is_empty() && self.fabric.receives_untaken(host, desc) => {
                    debug!(
                        host,
                        req_id, "uplink: a message waits for its device to take receives"
                    );
                    return Ok(None);
                }
                None => {}
            }
        }
        let mut buf = vec![0u8; len];
        buf[..head.len()].copy_from_slice(head);
        // SAFETY: the buffer moves into `Staged` in `self.rdv.ops` below (its heap bytes stay
        // put) and stays there until the read's completion.
        let mr = match unsafe { self.ep.register(&buf, u64::from(sys::FI_READ)) } {
            Ok(mr) => mr,
            Err(e) => {
                warn!(
                    host,
                    req_id, "uplink: cannot register a rendezvous buffer: {e}"
                );
                return Err(Status::NoResources);
            }
        };
        let mut staged = Staged::own(mr, buf);
        self.rdv.next_op += 1;
        let ctx = RMA_CONTEXT + self.rdv.next_op;
        let dst = &mut staged.buf[head.len()..];
        let iov = [(dst.as_mut_ptr(), dst.len(), &staged.mr)];
        // SAFETY: `staged` (buffer and registration) is kept in `self.rdv.ops` until the
        // completion with `ctx`; the endpoint outlives it (see `Worker`'s field order).
        let rc = unsafe { self.ep.read_raw_iov(&iov, src, srcs, ctx) };
        match rc {
            Ok(()) => {
                self.rdv.ops.insert(
                    ctx,
                    Op::Read {
                        host,
                        req_id,
                        staged,
                    },
                );
                Ok(Some((ctx, false)))
            }
            Err(e) if e.is_again() => Ok(None),
            Err(e) => {
                debug!(host, req_id, "uplink: rendezvous read not posted: {e}");
                Err(Status::HostUnreach)
            }
        }
    }

    /// Register the ranges of a claimed receive's buffer (or write's targets), a shadow of
    /// each, and post one read of the peer's source into all of them. `Err(again)`: not
    /// posted, and the receive was matched again (`again`: the provider had no room, try
    /// later; else read into a daemon buffer).
    fn start_direct_read(
        &mut self,
        host: u16,
        req_id: u64,
        mut dest: Box<DirectDest>,
        src: u64,
        srcs: &[(u64, u64, u64)],
    ) -> Result<u64, bool> {
        let guest = std::mem::take(&mut dest.bytes);
        // The sources' first bytes, as many as the ranges take (all of them, or a truncated
        // receive's head).
        let wanted = guest.iter().map(|g| g.len() as u64).sum::<u64>();
        let landing = match rma_prefix(srcs, wanted) {
            Some(rma) => self.land(host, req_id, guest).map(|l| (rma, l)),
            None => None,
        };
        let Some((rma, landing)) = landing else {
            dest.fence.end();
            self.fabric
                .direct_unclaim(host, req_id, dest, &mut self.notify);
            return Err(false);
        };
        self.rdv.next_op += 1;
        let ctx = RMA_CONTEXT + self.rdv.next_op;
        let iov: Vec<(*mut u8, usize, &Mr)> = landing
            .shadows
            .iter()
            .zip(&landing.guest)
            .zip(&landing.mrs)
            .map(|((sh, g), mr)| (sh.at as *mut u8, g.len(), mr))
            .collect();
        // SAFETY: each range's bytes at its shadow (the receive's guest pages, mapped once
        // more) stay mapped, in the op with the registrations, until the completion with
        // `ctx`; the guest does not get the receive back before the op's fence ends, which is
        // after the read or after every shadow was revoked (then the read writes throw-away
        // pages).
        let rc = unsafe { self.ep.read_raw_iov(&iov, src, &rma, ctx) };
        drop(iov);
        match rc {
            Ok(()) => {
                self.rdv.ops.insert(
                    ctx,
                    Op::DirectRead {
                        host,
                        req_id,
                        landing,
                        direct: Some(dest),
                    },
                );
                Ok(ctx)
            }
            Err(e) => {
                self.unland(landing);
                dest.fence.end();
                self.fabric
                    .direct_unclaim(host, req_id, dest, &mut self.notify);
                if !e.is_again() {
                    debug!(
                        host,
                        req_id, "uplink: direct rendezvous read not posted: {e}"
                    );
                }
                Err(e.is_again())
            }
        }
    }

    /// A shadow of each of the `guest` ranges, registered for a read into it. `None` (the
    /// read goes through a daemon buffer): a range overlaps one that a direct read in flight
    /// writes (writes of one peer land in order: the later one is copied when its turn
    /// comes), has no file behind it, or could not be mapped or registered.
    fn land(&mut self, host: u16, req_id: u64, guest: Vec<GuestBytes>) -> Option<Landing> {
        let spans: Vec<(usize, usize)> =
            guest.iter().map(|g| (g.ptr() as usize, g.len())).collect();
        let overlaps = self.rdv.ops.values().any(|op| match op {
            Op::DirectRead {
                landing,
                direct: Some(_),
                ..
            } => spans_overlap(&spans, landing.spans()),
            _ => false,
        });
        if guest.is_empty() || overlaps {
            return None;
        }
        let mut landing = Landing {
            mrs: Vec::with_capacity(guest.len()),
            shadows: Vec::with_capacity(guest.len()),
            guest: Vec::new(),
        };
        for g in &guest {
            let shadow = self.rdv.take_shadow(g, g.len());
            let Some(shadow) = shadow else {
                return self.unland(landing);
            };
            // SAFETY: the shadow mapping lives in the op with the registration, which is
            // closed before it is unmapped; the receive it names is the fabric's no more until
            // the fence ends (after the read, or its revocation).
            let mr = unsafe {
                self.ep
                    .register_raw(shadow.at as *const u8, g.len(), u64::from(sys::FI_READ))
            };
            match mr {
                Ok(mr) => {
                    landing.mrs.push(mr);
                    landing.shadows.push(shadow);
                }
                Err(e) => {
                    debug!(
                        host,
                        req_id, "uplink: a receive's buffer not registered: {e}"
                    );
                    self.rdv.keep_shadow(shadow);
                    return self.unland(landing);
                }
            }
        }
        landing.guest = guest;
        Some(landing)
    }

    /// A landing not used after all: its registrations close, its shadows go idle.
    fn unland(&mut self, landing: Landing) -> Option<Landing> {
        let Landing { mrs, shadows, .. } = landing;
        drop(mrs);
        for sh in shadows {
            self.rdv.keep_shadow(sh);
        }
        None
    }

    /// Whether reads land in guests' receives and regions (`VFABRIC_UPLINK_DIRECT=0` in the
    /// environment turns them off: everything goes through daemon buffers, as before). Only on
    /// a provider whose late writes revocation can cut off (`RdmEndpoint::writes_revocable`).
    fn direct_reads_on(&self) -> bool {
        self.ep.rma() && self.ep.writes_revocable() && direct_allowed()
    }

    /// `host` is lost (peer timeout) while reads from it into guests' receives or regions are
    /// in flight: a silent link never ends them by itself (TCP waits for minutes), so each
    /// is revoked (its mapping of the guest pages cut: whatever the provider still writes for
    /// it lands in throw-away pages) and its receive handed back to be matched again, its
    /// region access ended. The op stays until the provider completes it (or forever: a few
    /// pages of address space).
    fn revoke_lost_reads(&mut self, host: u16) {
        let mut revoked = 0;
        let mut kept = 0;
        let reads: Vec<u64> = self
            .rdv
            .ops
            .iter()
            .filter(|(_, op)| {
                matches!(op, Op::DirectRead { host: h, direct: Some(_), .. } if *h == host)
            })
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in reads {
            let Some(Op::DirectRead {
                req_id,
                direct,
                landing,
                ..
            }) = self.rdv.ops.get_mut(&ctx)
            else {
                continue;
            };
            // Every range is cut (one that fails to is still the guest's pages: the receive
            // waits for the read's own end).
            let mut cut = true;
            for sh in landing.shadows.iter_mut().filter(|sh| !sh.revoked) {
                cut &= sh.revoke();
            }
            if !cut {
                kept += 1;
                continue;
            }
            let req_id = *req_id;
            if let Some(dest) = direct.take() {
                dest.fence.end();
                self.fabric
                    .direct_unclaim(host, req_id, dest, &mut self.notify);
            }
            revoked += 1;
        }
        if revoked + kept > 0 {
            tracing::info!(
                host,
                revoked,
                kept,
                "uplink: reads into guest memory from a lost host revoked"
            );
        }
        // Writes to it from guest memory: their regions are let go at once (MR_DEREG waits
        // for nothing more); what the provider still sends for them is zeros.
        let (mut revoked, mut kept) = (0, 0);
        for op in self.rdv.ops.values_mut() {
            let Op::Write {
                host: h,
                source: Some((src, shadow)),
                ..
            } = op
            else {
                continue;
            };
            if *h != host || shadow.revoked {
                continue;
            }
            if shadow.revoke() {
                src.release();
                revoked += 1;
            } else {
                kept += 1;
            }
        }
        if revoked + kept > 0 {
            tracing::info!(
                host,
                revoked,
                kept,
                "uplink: writes from guest memory to a lost host revoked"
            );
        }
    }

    /// An RMA read of `host` (request `req_id`, `m`) that named a sink, answered straight
    /// from guest memory: when its source is one range of one region with a file, that
    /// region is entered (its deregistration waits for the write), a mapping of the range's
    /// pages of its own is registered and `fi_write`n to the sink, and the verdict follows
    /// the write (RDV_REPLY). `false`: not done (the fabric executes it as usual, copying).
    pub(super) fn reply_from_guest(&mut self, host: u16, req_id: u64, m: &Incoming) -> bool {
        if u16::from(m.desc.opcode) != Opcode::RmaRead as u16 || !self.direct_reads_on() {
            return false;
        }
        let Some(sinks) = self
            .rdv
            .peer_sinks
            .get(&(host, req_id))
            .filter(|s| s.len() <= self.ep.rma_iov_limit())
            .cloned()
        else {
            return false;
        };
        let len: u64 = sinks.iter().map(|s| s.2).sum();
        let Some(dest) = self.dest_of(host) else {
            return false;
        };
        let Some(mut src) = self.fabric.claim_direct_source(m) else {
            return false;
        };
        let Some(g) = src.bytes.take().filter(|_| src.len as u64 == len) else {
            return false;
        };
        let Some(shadow) = self.rdv.take_shadow(&g, src.len) else {
            return false;
        };
        drop(g);
        // SAFETY: the shadow mapping lives in the op with the registration, which is closed
        // before it is unmapped.
        let mr = match unsafe {
            self.ep
                .register_raw(shadow.at as *const u8, src.len, u64::from(sys::FI_WRITE))
        } {
            Ok(mr) => mr,
            Err(e) => {
                debug!(host, req_id, "uplink: a read's source not registered: {e}");
                self.rdv.keep_shadow(shadow);
                return false;
            }
        };
        self.rdv.next_op += 1;
        let ctx = RMA_CONTEXT + self.rdv.next_op;
        // SAFETY: the `src.len` bytes at `shadow.at` (the source range's guest pages, mapped
        // once more) stay mapped, with the registration, in the op until the completion with
        // `ctx` (if the host is lost they are revoked: anonymous pages, still mapped).
        let rc = unsafe {
            self.ep
                .write_raw(shadow.at as *const u8, src.len, &mr, dest, &sinks, ctx)
        };
        if let Err(e) = rc {
            debug!(
                host,
                req_id, "uplink: a write from guest memory not posted: {e}"
            );
            drop(mr);
            self.rdv.keep_shadow(shadow);
            return false;
        }
        self.rdv.peer_sinks.remove(&(host, req_id));
        self.rdv.reply_direct_bytes += len;
        self.rdv.ops.insert(
            ctx,
            Op::Write {
                host,
                dest,
                req_id,
                written: len,
                staged: Staged {
                    mr,
                    buf: Vec::new(),
                    guest: None,
                    sink: None,
                },
                source: Some((src, shadow)),
            },
        );
        true
    }

    /// The verdict on request `req_id` of `host` when it named a sink: the bytes go by
    /// `fi_write` (from `read` itself when the caller gave it up, else from a copy), the
    /// verdict after them (RDV_REPLY). Gives `read` back when the verdict is to go as an
    /// ordinary REPLY.
    pub(super) fn reply_to_sink<'a>(
        &mut self,
        host: u16,
        dest: u64,
        req_id: u64,
        status: Status,
        read: Cow<'a, [u8]>,
    ) -> Result<(), Cow<'a, [u8]>> {
        let Some(sinks) = self.rdv.peer_sinks.remove(&(host, req_id)) else {
            return Err(read);
        };
        let len: u64 = sinks.iter().map(|s| s.2).sum();
        if status != Status::Ok
            || read.len() as u64 != len
            || read.is_empty()
            || sinks.len() > self.ep.rma_iov_limit()
        {
            return Err(read);
        }
        let buf = read.into_owned();
        self.rdv.reply_copied_bytes += len;
        // SAFETY: as in `start_read`: kept in `self.rdv.ops` until the write's completion.
        let mr = match unsafe { self.ep.register(&buf, u64::from(sys::FI_WRITE)) } {
            Ok(mr) => mr,
            Err(e) => {
                debug!("uplink: rendezvous reply not registered, replying in chunks: {e}");
                return Err(Cow::Owned(buf));
            }
        };
        let staged = Staged::own(mr, buf);
        self.rdv.next_op += 1;
        let ctx = RMA_CONTEXT + self.rdv.next_op;
        // SAFETY: see above.
        let rc = unsafe {
            self.ep.write_raw(
                staged.buf.as_ptr(),
                staged.buf.len(),
                &staged.mr,
                dest,
                &sinks,
                ctx,
            )
        };
        match rc {
            Ok(()) => {
                self.rdv.ops.insert(
                    ctx,
                    Op::Write {
                        host,
                        dest,
                        req_id,
                        written: len,
                        staged,
                        source: None,
                    },
                );
                Ok(())
            }
            Err(e) => {
                debug!("uplink: rendezvous write not posted, replying in chunks: {e}");
                Err(Cow::Owned(staged.into_bytes()))
            }
        }
    }

    /// Completion (or error, `err`) of RMA operation `ctx`.
    pub(super) fn rdv_completion(&mut self, ctx: u64, err: Option<super::FiError>) {
        let Some(op) = self.rdv.ops.remove(&ctx) else {
            return;
        };
        if err.is_none() {
            let (Op::Read { host, .. } | Op::DirectRead { host, .. } | Op::Write { host, .. }) = op;
            self.heard_from(host);
        }
        match op {
            // Revoked (its host was lost): its receive was handed back then.
            Op::DirectRead { direct: None, .. } => {}
            Op::DirectRead {
                host,
                req_id,
                landing,
                direct: Some(dest),
            } => {
                // The read is over: nothing writes the receive's buffer any more.
                self.unland(landing);
                dest.fence.end();
                if let Some(e) = &err {
                    debug!(host, req_id, "uplink: direct rendezvous read failed: {e}");
                } else {
                    self.rdv_done(host, false);
                }
                let item = self.rdv.inbound.get_mut(&host).and_then(|q| {
                    q.iter_mut().find(|i| {
                        matches!(i, Inbound::Fetch { req_id: r, op: Some(o), .. } if *r == req_id && *o == ctx)
                    })
                });
                let Some(item) = item else {
                    // Its host was lost meanwhile: the receive is matched again.
                    return self
                        .fabric
                        .direct_unclaim(host, req_id, dest, &mut self.notify);
                };
                let Inbound::Fetch { canceled, .. } = *item else {
                    return;
                };
                *item = match err {
                    None if !canceled => {
                        self.rdv.placed_bytes += dest.len as u64;
                        Inbound::Placed { req_id, dest }
                    }
                    _ => {
                        self.fabric
                            .direct_unclaim(host, req_id, dest, &mut self.notify);
                        Inbound::Failed {
                            req_id,
                            status: if canceled {
                                Status::Canceled
                            } else {
                                Status::HostUnreach
                            },
                        }
                    }
                };
                self.rdv_pump(host);
            }
            Op::Read {
                host,
                req_id,
                staged,
            } => {
                if let Some(e) = &err {
                    debug!(host, req_id, "uplink: rendezvous read failed: {e}");
                }
                if err.is_none() {
                    self.rdv_done(host, false);
                }
                // The host may have been lost meanwhile: then its queue is gone.
                let Some(item) = self.rdv.inbound.get_mut(&host).and_then(|q| {
                    q.iter_mut().find(|i| {
                        matches!(i, Inbound::Fetch { req_id: r, op: Some(o), .. } if *r == req_id && *o == ctx)
                    })
                }) else {
                    return;
                };
                let Inbound::Fetch { desc, canceled, .. } = *item else {
                    return;
                };
                *item = match err {
                    // Withdrawn while it was read: dropped, and its sender told so now.
                    _ if canceled => Inbound::Failed {
                        req_id,
                        status: Status::Canceled,
                    },
                    None => {
                        // The fabric copies these into the receive or target region.
                        self.rdv.copied_bytes += staged.buf.len() as u64;
                        Inbound::Ready {
                            req_id,
                            desc,
                            bytes: staged.into_bytes(),
                        }
                    }
                    // The sender's buffer is gone or the link broke: the data cannot come.
                    Some(_) => Inbound::Failed {
                        req_id,
                        status: Status::HostUnreach,
                    },
                };
                self.rdv_pump(host);
            }
            Op::Write {
                host,
                dest,
                req_id,
                written,
                staged,
                source,
            } => {
                // The write is over: nothing reads the source's pages any more.
                drop(staged);
                if let Some((src, shadow)) = source {
                    // Revoked (its host was lost): it read zeros, and its region was let go.
                    if err.is_none() && !shadow.revoked {
                        self.fabric.direct_source_done(src, &mut self.notify);
                    }
                    self.rdv.keep_shadow(shadow);
                }
                if err.is_none() {
                    self.rdv_done(host, true);
                }
                let bytes = match err {
                    None => Message::Rdv(Rdv::Reply {
                        fabric_id: self.set.fabric_id,
                        host_id: self.set.host_id,
                        req_id,
                        status: Status::Ok,
                        written,
                    })
                    .encode(),
                    Some(e) => {
                        debug!(host, req_id, "uplink: rendezvous write failed: {e}");
                        self.unreach_reply(req_id)
                    }
                };
                self.backlog.push_back(Outgoing {
                    host,
                    dest,
                    bytes,
                    req_id: None,
                });
            }
        }
    }

    /// Count a rendezvous read (`write` false) or write with `host`; the first is logged.
    fn rdv_done(&mut self, host: u16, write: bool) {
        let n = self.rdv.done.entry((host, write)).or_default();
        *n += 1;
        if *n == 1 {
            let what = if write { "write to" } else { "read from" };
            tracing::info!(host, "uplink: first rendezvous {what} host {host}");
        }
    }

    /// Registrations of requests no longer pending (withdrawn by their guest's endpoint close
    /// or device reset on the guest's own thread) are closed: run on the uplink's interval.
    pub(super) fn rdv_sweep(&mut self) {
        let outbox = self.outbox.clone();
        let live = |id: &u64, host: u16| outbox.pending_is(*id, host, |_| true);
        let rdv = &mut self.rdv;
        let gone = |m: &mut HashMap<u64, (u16, Vec<Staged>)>| -> Vec<(u64, u16, Vec<Staged>)> {
            let ids: Vec<u64> = m
                .iter()
                .filter(|(id, (h, _))| !live(id, *h))
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| m.remove(&id).map(|(h, st)| (id, h, st)))
                .collect()
        };
        let mut closed = gone(&mut rdv.sources);
        closed.extend(gone(&mut rdv.sinks));
        for (id, host, st) in closed {
            rdv.drain(id, host, st);
        }
        let now = Instant::now();
        self.rdv.draining.retain(|id, (host, st, since)| {
            let keep = now.duration_since(*since) < DRAIN_LIMIT;
            if !keep {
                warn!(
                    host = *host,
                    req_id = *id,
                    "uplink: no answer to a CANCEL within {DRAIN_LIMIT:?}: closing its source"
                );
                // A revoked sink stays mapped (throw-away pages) for a write the provider
                // may still finish into it; only its registration closes.
                for sink in st.iter().filter_map(|st| st.sink.as_ref()) {
                    sink.lock().iter_mut().for_each(|sh| sh.leak = true);
                }
            }
            keep
        });
        let now = Instant::now();
        self.rdv
            .idle_shadows
            .retain(|(_, since)| now.duration_since(*since) < SHADOW_IDLE);
        let reads = (self.rdv.placed_bytes, self.rdv.copied_bytes);
        if reads != self.rdv.logged_reads {
            self.rdv.logged_reads = reads;
            tracing::info!(
                mapped = self.rdv.shadows_mapped,
                reused = self.rdv.shadows_reused,
                "uplink: rendezvous reads: {} bytes placed in guest memory, {} bytes copied",
                reads.0,
                reads.1
            );
        }
        log_counts(
            (self.rdv.sink_placed_bytes, self.rdv.sink_copied_bytes),
            &mut self.rdv.logged_sinks,
            "rendezvous read sinks",
            ("placed in guest memory", "copied"),
        );
        log_counts(
            (self.rdv.reply_direct_bytes, self.rdv.reply_copied_bytes),
            &mut self.rdv.logged_replies,
            "rendezvous read replies",
            ("written from guest memory", "copied"),
        );
        log_counts(
            (self.rdv.zero_copy_bytes, self.rdv.staged_bytes),
            &mut self.rdv.logged,
            "rendezvous sources",
            ("read from guest memory", "staged"),
        );
    }

    /// Reads may have been refused for room: try the queues again.
    pub(super) fn rdv_retry(&mut self) {
        let waiting: Vec<u16> = self
            .rdv
            .inbound
            .iter()
            .filter(|(_, q)| {
                q.iter()
                    .any(|i| matches!(i, Inbound::Fetch { op: None, .. }))
            })
            .map(|(h, _)| *h)
            .collect();
        for h in waiting {
            self.rdv_pump(h);
        }
    }

    /// `host` is lost: what it sent and we did not deliver is dropped (its request ids are
    /// returned for their verdicts); reads in flight keep their buffers until they complete.
    pub(super) fn rdv_host_lost(&mut self, host: u16) -> Vec<u64> {
        self.revoke_lost_reads(host);
        self.rdv.peer_sinks.retain(|(h, _), _| *h != host);
        // Our requests to it failed (their pending entries went with the host). A zero-copy
        // source drains: its link may still carry a read of it.
        let gone: Vec<u64> = self
            .rdv
            .sources
            .iter()
            .filter(|(_, (h, _))| *h == host)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some((h, st)) = self.rdv.sources.remove(&id) {
                self.rdv.drain(id, h, st);
            }
        }
        // Our reads' sinks in guest memory were revoked when their requests failed; they drain
        // too (the link may still carry a write into one).
        let gone: Vec<u64> = self
            .rdv
            .sinks
            .iter()
            .filter(|(_, (h, _))| *h == host)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some((h, st)) = self.rdv.sinks.remove(&id) {
                self.rdv.drain(id, h, st);
            }
        }
        self.rdv
            .inbound
            .remove(&host)
            .into_iter()
            .flatten()
            .map(|i| match i {
                Inbound::Ready { req_id, .. }
                | Inbound::Fetch { req_id, .. }
                | Inbound::Failed { req_id, .. } => req_id,
                Inbound::Placed { req_id, dest } => {
                    // Read, not completed: the receive is matched again.
                    self.fabric
                        .direct_unclaim(host, req_id, dest, &mut self.notify);
                    req_id
                }
            })
            .collect()
    }
}

/// Log a pair of byte counters (`uplink: WHAT: N bytes FIRST, M bytes SECOND`, which tests
/// read) when they changed since they were last logged.
fn log_counts(counts: (u64, u64), logged: &mut (u64, u64), what: &str, words: (&str, &str)) {
    if counts != *logged {
        *logged = counts;
        tracing::info!(
            "uplink: {what}: {} bytes {}, {} bytes {}",
            counts.0,
            words.0,
            counts.1,
            words.1
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{keys_overlap, rma_prefix, spans_overlap};

    #[test]
    fn keys_overlap_only_for_shared_bytes_of_one_file() {
        let k = (1, 7, 4096, 100);
        assert!(keys_overlap(&k, &(1, 7, 4195, 1)), "the last byte");
        assert!(keys_overlap(&k, &(1, 7, 0, 5000)), "around");
        assert!(!keys_overlap(&k, &(1, 7, 4196, 10)), "just after");
        assert!(!keys_overlap(&k, &(1, 7, 0, 4096)), "just before");
        assert!(!keys_overlap(&k, &(1, 8, 4096, 100)), "another file");
        assert!(!keys_overlap(&k, &(2, 7, 4096, 100)), "another device");
        assert!(!keys_overlap(&k, &(1, 7, 4100, 0)), "empty");
        assert!(
            keys_overlap(&(1, 7, u64::MAX - 1, 5), &(1, 7, u64::MAX, 1)),
            "no overflow"
        );
    }

    #[test]
    fn a_read_of_fewer_bytes_takes_the_first_sources_and_cuts_the_last() {
        let srcs = [(0x1000, 1, 100), (0x9000, 2, 50), (0x5000, 3, 10)];
        assert_eq!(rma_prefix(&srcs, 160), Some(srcs.to_vec()));
        assert_eq!(
            rma_prefix(&srcs, 120),
            Some(vec![(0x1000, 1, 100), (0x9000, 2, 20)])
        );
        assert_eq!(rma_prefix(&srcs, 100), Some(vec![(0x1000, 1, 100)]));
        assert_eq!(rma_prefix(&srcs, 161), None);
    }

    #[test]
    fn spans_overlap_when_any_range_shares_a_byte_with_any_other() {
        let inflight = [(1000, 100), (5000, 10)];
        assert!(
            !spans_overlap(&[(900, 100), (1100, 50)], inflight),
            "touching only"
        );
        assert!(spans_overlap(&[(900, 101)], inflight), "the last byte");
        assert!(
            spans_overlap(&[(0, 10), (5009, 1)], inflight),
            "a later range"
        );
        assert!(spans_overlap(&[(1050, 1)], inflight), "inside");
        assert!(
            spans_overlap(&[(0, usize::MAX)], inflight),
            "around, no overflow"
        );
        assert!(!spans_overlap(&[(2000, 0)], [(1990, 20)]), "empty");
        assert!(!spans_overlap(&[], inflight));
    }
}
