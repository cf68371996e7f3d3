// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The seam between the fabric and the uplink thread: guest requests for another host go out
//! through the [`Outbox`], and so do the verdicts on requests that arrived from another host
//! and were held until a receive matched them.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use vfabric_proto::{FabricAddr, Status};

use super::rdv::GuestSink;
use super::wire;
use crate::chain::{GuestMemoryMmap, Req, Segs};
use crate::fabric::Port;

/// Requests to other hosts queued or waiting for their REPLY, at most.
pub(crate) const MAX_INFLIGHT: usize = 1024;
/// Bytes of requests to other hosts queued or waiting for their REPLY, at most (a single
/// larger request is let through alone).
pub(crate) const MAX_INFLIGHT_BYTES: u64 = 64 << 20;

/// A guest's send to an endpoint of another host, with what completes it later: the sender's
/// port and chain (exactly as a held send carries them).
pub(crate) struct RemoteSend {
    pub host: u16,
    pub dev: usize,
    pub port: Port,
    pub req: Req,
    /// The DATA description (its `req_id` and `offset` are filled in by the uplink).
    pub desc: wire::Data,
    /// The request's bytes: a send's payload; an RMA request's ranges and, for a write,
    /// the bytes to write.
    pub payload: Vec<u8>,
    /// Bytes the request moves (a send's length, an RMA transfer's total).
    pub len: u64,
    /// Bytes of this daemon's memory it holds while in flight (what [`Outbox::reserve`]
    /// charged): its copied bytes, and an RMA read's sink; 0 for bytes left in guest memory.
    pub charged: u64,
    /// The request's bytes still in guest memory, one entry per guest range (none: all in
    /// `payload`; else `payload` holds only what precedes them: nothing for a send, the
    /// ranges of an RMA write): named to the target as rendezvous sources with no copy, or
    /// copied into `payload` when they go in chunks.
    pub guest: Vec<GuestBytes>,
    /// An RMA read's destination when it is a few ranges of guest memory, one entry per
    /// range (none: the read's bytes come back to a daemon buffer): the uplink may name (a
    /// mapping of) those pages to the target as the read's sinks, so that the target's
    /// `fi_write` lands in guest memory with no copy.
    pub sink: Vec<GuestBytes>,
}

/// Bytes of a request left in the guest's memory: one range inside one memory region, with
/// the mapping it lies in (kept mapped by this `Arc` whatever the memory table does, so a
/// registration of these bytes never outlives their mapping).
pub(crate) struct GuestBytes {
    mem: Arc<GuestMemoryMmap>,
    segs: Segs,
    /// Host address of the first byte (in `mem`'s mapping).
    ptr: usize,
    len: usize,
}

/// A send's bytes as they leave: large bytes in at most [`wire::MAX_RDV_SEGS`] guest ranges
/// stay in guest memory (the uplink names them to the target as rendezvous sources, or copies
/// them if they go in chunks); any others are copied now. `None` when the guest's memory
/// faulted.
pub(crate) fn send_payload(
    port: &Port,
    payload: &Segs,
    len: u64,
) -> Option<(Vec<GuestBytes>, Vec<u8>)> {
    use vm_memory::GuestAddressSpace;
    let guest = if len as usize > super::rdv::RDV_THRESHOLD {
        GuestBytes::ranges(
            port.mem.memory().into_inner(),
            payload,
            len,
            wire::MAX_RDV_SEGS,
        )
        .unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut bytes = Vec::new();
    if guest.is_empty() {
        bytes.resize(len as usize, 0);
        payload.read_at(&port.mem.memory(), 0, &mut bytes).ok()?;
    }
    Some((guest, bytes))
}

impl GuestBytes {
    /// The bytes of `segs` when they are one range of one memory region (else `None`: the
    /// caller copies them).
    pub fn new(mem: Arc<GuestMemoryMmap>, segs: &Segs) -> Option<Self> {
        let [s] = segs.segs.as_slice() else {
            return None;
        };
        let len = s.len as usize;
        let ptr = crate::chain::host_ptr(&mem, s.addr, len)? as usize;
        Some(GuestBytes {
            mem,
            segs: segs.clone(),
            ptr,
            len,
        })
    }

    /// The first `len` bytes of `segs` (at least one, at most all) as one [`GuestBytes`] per
    /// range, in order, when there are at most `max` ranges and each lies in one memory
    /// region (else `None`: the caller copies them).
    pub fn ranges(
        mem: Arc<GuestMemoryMmap>,
        segs: &Segs,
        len: u64,
        max: usize,
    ) -> Option<Vec<Self>> {
        if len == 0 || len > segs.len {
            return None;
        }
        let (head, _) = segs.split_at(len);
        if head.segs.len() > max {
            return None;
        }
        head.segs
            .iter()
            .map(|&s| Self::new(mem.clone(), &Segs::one(s)))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Host address of the first byte; mapped as long as `self` lives.
    pub fn ptr(&self) -> *const u8 {
        self.ptr as *const u8
    }

    /// The file behind the bytes (a vhost-user frontend shares each memory region as one)
    /// and the offset of their first byte in it; open as long as `self` lives.
    pub fn file_at(&self) -> Option<(std::os::fd::RawFd, u64)> {
        use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
        let s = self.segs.segs.first()?;
        let r = self.mem.find_region(GuestAddress(s.addr))?;
        let fo = r.file_offset()?;
        Some((
            fo.file().as_raw_fd(),
            fo.start().checked_add(s.addr - r.start_addr().0)?,
        ))
    }

    /// Append a copy of the bytes to `out` (they go in chunks after all).
    pub fn copy_into(&self, out: &mut Vec<u8>) -> Result<(), crate::chain::MemFault> {
        let at = out.len();
        out.resize(at + self.len, 0);
        self.segs.read_at(&self.mem, 0, &mut out[at..])
    }
}

/// A guest's request to another host that went out (or is about to) and waits for that host's
/// verdict. Kept here, not in the uplink thread, so that the guest's own thread can withdraw it
/// when its endpoint closes or its device resets ([`Outbox::withdraw`]): whoever takes it out
/// of the table completes it, exactly once.
pub(crate) struct Pending {
    pub host: u16,
    pub dev: usize,
    pub port: Port,
    pub req: Req,
    pub len: u64,
    /// What it holds of the in-flight byte bound ([`RemoteSend::charged`]).
    pub charged: u64,
    /// The DATA description it went with (a message is sent again with it when its target
    /// kept only a stub and asks for the bytes: PULL).
    pub desc: wire::Data,
    /// PULLs answered for it so far (bounded: see [`MAX_PULLS`]).
    pub pulls: u8,
    /// An RMA read's sink in its guest's memory (the target writes it): revoked by whoever
    /// takes the request out of the table to complete it, before the guest gets its buffer
    /// back, unless its bytes were all placed ([`Outbox::take_placed`]).
    pub sink: Option<Arc<GuestSink>>,
}

/// Cut the sinks in guest memory of requests about to complete other than with their placed
/// bytes (withdrawn, failed, their host lost): whatever the wire still writes for them lands
/// in the daemon's throw-away pages.
fn revoke_sinks<'a>(ps: impl IntoIterator<Item = &'a Pending>) {
    for p in ps {
        if let Some(s) = &p.sink {
            s.revoke();
        }
    }
}

/// Times one message is sent again for its target's PULLs, at most: a target pulls a message
/// once per receive that matches its stub (again only when that receive's queue was stopped
/// meanwhile); a peer that pulls more gets nothing more than this from our memory and link.
pub(crate) const MAX_PULLS: u8 = 8;

/// The endpoint of a guest's ADDR_CHECK (`None`: it names no endpoint, so no FENCE waits on it).
pub(crate) const ADDR_CHECK_EP: u32 = u32::MAX;

/// What this host knows about an endpoint of another host that a directed receive here names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Live {
    /// An ADDR_QUERY about it is on its way.
    Asking,
    /// Its host said it is open; its EP_GONE (which the wire delivers after that answer) will
    /// say when it is not.
    Open,
}

/// Remote endpoints remembered at most (a full table is forgotten: they are asked again).
const MAX_LIVE: usize = 4096;

pub(crate) enum Outbound {
    Send(Box<RemoteSend>),
    /// Ask `host` whether its endpoint `addr` is open: for a guest's ADDR_CHECK (`req` is in the
    /// pending table under `req_id`) or, `req_id` 0, for receives directed at it.
    AddrQuery {
        host: u16,
        addr: FabricAddr,
        req_id: u64,
    },
    /// Withdraw request `req_id` from `host` (CANCEL).
    Cancel {
        host: u16,
        req_id: u64,
    },
    /// A receive here matched the stub of `host`'s message `req_id`: ask for its bytes (PULL).
    Pull {
        host: u16,
        req_id: u64,
    },
    /// Tell every peer that endpoint `addr` (every endpoint of its device with `whole_device`)
    /// is gone, `closed` by its driver or lost.
    EpGone {
        addr: FabricAddr,
        whole_device: bool,
        closed: bool,
    },
    /// The verdict on request `req_id` of `host` (held here until now), with the bytes it
    /// returns (a refused commit's handler value; else none).
    Reply {
        host: u16,
        req_id: u64,
        status: Status,
        bytes: Vec<u8>,
    },
    /// A guest's SVC_RESOLVE for a service of another host.
    SvcResolve(Box<super::svc::Resolve>),
}

/// Whether `r` is a message sent again for its target's PULL (its request id is set, and it is
/// in the pending table already).
fn is_pulled(r: &RemoteSend) -> bool {
    u32::from(r.desc.flags) & wire::data_flags::PULLED != 0
}

/// Whether a request of `opcode` gets bytes back with its verdict (RMA read, fetching
/// atomics).
pub(crate) fn returns_bytes(opcode: vfabric_proto::Opcode) -> bool {
    use vfabric_proto::Opcode::*;
    matches!(opcode, RmaRead | FetchAtomic | CompareAtomic)
}

/// Bytes a verdict of `status` on a request of `opcode` moving `len` bytes carries: a read's
/// bytes on success; a FLUSH refused by the target's commit handler, the handler's value (8
/// bytes); nothing else.
pub(crate) fn reply_len(opcode: vfabric_proto::Opcode, status: Status, len: u64) -> u64 {
    match (opcode, status) {
        (op, Status::Ok) if returns_bytes(op) => len,
        (vfabric_proto::Opcode::Flush, Status::CommitRefused) => 8,
        _ => 0,
    }
}

/// Whose requests to which host: `(device, endpoint, host)` (FENCE waits on it).
pub(crate) type EpKey = (usize, u32, u16);

impl State {
    fn release(&mut self, key: EpKey, len: u64) {
        self.inflight = self.inflight.saturating_sub(1);
        self.inflight_bytes = self.inflight_bytes.saturating_sub(len);
        if let Some(c) = self.by_ep.get_mut(&key) {
            *c -= 1;
            if *c == 0 {
                self.by_ep.remove(&key);
            }
        }
    }

    /// A request id not in use (0 means "none" on the wire of ADDR_QUERY probes).
    fn new_req_id(&mut self) -> u64 {
        loop {
            self.next_req = self.next_req.wrapping_add(1);
            if self.next_req != 0 && !self.pending.contains_key(&self.next_req) {
                return self.next_req;
            }
        }
    }
}

#[derive(Default)]
struct State {
    /// An uplink runs: other hosts' addresses lead somewhere.
    enabled: bool,
    /// Configured peers and whether each is up now.
    hosts: HashMap<u16, bool>,
    queue: VecDeque<Outbound>,
    inflight: usize,
    inflight_bytes: u64,
    /// Requests in flight per endpoint and host.
    by_ep: HashMap<EpKey, usize>,
    /// Requests taken by the uplink and waiting for their verdict, by request id.
    pending: HashMap<u64, Pending>,
    next_req: u64,
    /// Endpoints of other hosts that receives here are directed at.
    live: HashMap<FabricAddr, Live>,
}

/// Shared by the fabric (producers: guest threads) and the uplink thread (consumer).
#[derive(Default)]
pub(crate) struct Outbox {
    state: Mutex<State>,
    wake: Condvar,
    /// An eventfd that wakes the uplink thread from its sleep in the kernel (beside the
    /// provider's wait fd), made when the uplink first asks for it.
    wake_fd: OnceLock<Option<OwnedFd>>,
    /// The uplink thread sleeps on `wake_fd`: a push must write it.
    sleeping: AtomicBool,
    /// `State::enabled` with at least one peer, read without the lock: a pass of a daemon
    /// without an uplink or peers (nothing can be pushed) makes no assist scope (a pass that
    /// starts just before the first peer joins has its pushes posted by the uplink thread, as
    /// without a scope).
    enabled_hint: AtomicBool,
    /// The uplink's worker while its thread runs: what [`Outbox::assist`] drives.
    driver: Mutex<Option<super::SharedWorker>>,
}

thread_local! {
    /// The outbox whose pushes on this thread are posted by the thread itself at the end of
    /// its pass ([`Outbox::assist_scope`]), and whether one was made.
    static ASSIST: std::cell::Cell<(*const Outbox, bool)> =
        const { std::cell::Cell::new((std::ptr::null(), false)) };
}

/// While it lives, requests this thread queues in its outbox wait for the end of its pass
/// (no uplink thread is woken for them); dropped, the thread posts them to the wire itself
/// ([`Outbox::assist`]). Hold it only where no device or ring lock is held at its end.
pub(crate) struct AssistScope<'a> {
    outbox: &'a Outbox,
    outer: bool,
}

impl Drop for AssistScope<'_> {
    // Inline: a device pass without an uplink (or nested) pays one check, not a call.
    #[inline(always)]
    fn drop(&mut self) {
        if !self.outer {
            self.end();
        }
    }
}

impl AssistScope<'_> {
    /// The outermost scope ends: post what this thread queued meanwhile.
    #[inline(never)]
    fn end(&self) {
        let (_, pushed) = ASSIST.with(|a| a.replace((std::ptr::null(), false)));
        if pushed {
            self.outbox.assist();
        }
    }
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a send of `len` bytes to `host` may go out now: `AddrNotAvail` for a host that
    /// is not a peer (or no uplink), `HostUnreach` for a peer that is down, `NoResources`
    /// past the in-flight bounds. On success the request counts as in flight until
    /// [`Outbox::finished`].
    pub fn reserve(&self, key: EpKey, len: u64) -> Result<(), Status> {
        let host = key.2;
        let mut s = self.lock();
        match s.hosts.get(&host) {
            _ if !s.enabled => return Err(Status::AddrNotAvail),
            None => return Err(Status::AddrNotAvail),
            Some(false) => return Err(Status::HostUnreach),
            Some(true) => {}
        }
        if s.inflight >= MAX_INFLIGHT
            || (s.inflight > 0 && s.inflight_bytes.saturating_add(len) > MAX_INFLIGHT_BYTES)
        {
            return Err(Status::NoResources);
        }
        s.inflight += 1;
        s.inflight_bytes = s.inflight_bytes.saturating_add(len);
        *s.by_ep.entry(key).or_default() += 1;
        Ok(())
    }

    /// Whether requests of endpoint `key.1` of device `key.0` to host `key.2` are in flight.
    pub fn busy(&self, key: EpKey) -> bool {
        self.lock().by_ep.contains_key(&key)
    }

    /// Whether `host` is a peer of a running uplink.
    pub fn is_peer(&self, host: u16) -> bool {
        let s = self.lock();
        s.enabled && s.hosts.contains_key(&host)
    }

    /// A request reserved with `len` bytes completed (or never went out).
    pub fn finished(&self, key: EpKey, len: u64) {
        self.lock().release(key, len);
    }

    pub fn push(&self, m: Outbound) {
        self.lock().queue.push_back(m);
        self.queued();
    }

    /// Something was queued: posted at the end of this thread's pass if it is in an
    /// [`AssistScope`] of this outbox, else the uplink thread is woken for it.
    fn queued(&self) {
        let mine = ASSIST.with(|a| {
            let (o, _) = a.get();
            let mine = std::ptr::eq(o, self);
            if mine {
                a.set((o, true));
            }
            mine
        });
        if !mine {
            self.wake_uplink();
        }
    }

    /// See [`AssistScope`]. Nested scopes are one (the outermost posts).
    pub fn assist_scope(&self) -> AssistScope<'_> {
        if !self.enabled_hint.load(Ordering::Relaxed) {
            return AssistScope {
                outbox: self,
                outer: true,
            };
        }
        // Inside another scope (of this outbox; or of another fabric's, and then pushes here
        // wake the uplink thread as without a scope), this one adds nothing.
        let outer = ASSIST.with(|a| {
            let nested = !a.get().0.is_null();
            if !nested {
                a.set((self, false));
            }
            nested
        });
        AssistScope {
            outbox: self,
            outer,
        }
    }

    /// Post what is queued from this thread, when nobody drives the uplink's endpoint right
    /// now (the lock on its worker is free): the request leaves without waking the uplink
    /// thread and waiting for it to be scheduled. Otherwise (or when the provider had no room
    /// for everything) the uplink thread is woken, as for any push; a holder of the lock
    /// looks at the queue again before it sleeps.
    pub fn assist(&self) {
        let driver = self
            .driver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(driver) = driver else {
            return self.wake_uplink();
        };
        let more = match driver.try_lock() {
            Ok(mut g) => g.as_mut().is_none_or(|w| w.assist()),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                p.into_inner().as_mut().is_none_or(|w| w.assist())
            }
            Err(std::sync::TryLockError::WouldBlock) => true,
        };
        if more {
            self.wake_uplink();
        }
    }

    /// The uplink thread runs with `driver` (`None`: it stopped).
    pub(super) fn set_driver(&self, driver: Option<super::SharedWorker>) {
        *self.driver.lock().unwrap_or_else(|p| p.into_inner()) = driver;
    }

    /// Something was queued: wake the uplink thread, whether it waits on the condvar or sleeps
    /// in the kernel.
    fn wake_uplink(&self) {
        self.wake.notify_one();
        // After queueing: an uplink that announced its sleep before we queued either saw the
        // message or is told here.
        if self.sleeping.load(Ordering::SeqCst) {
            if let Some(Some(fd)) = self.wake_fd.get() {
                let one = 1u64.to_ne_bytes();
                // SAFETY: writing 8 bytes from a live buffer to our own eventfd.
                let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
            }
        }
    }

    /// The eventfd that [`Outbox::push`] writes while the uplink sleeps (`None` if the
    /// kernel refused one: the uplink then polls).
    pub fn wake_fd(&self) -> Option<RawFd> {
        self.wake_fd
            .get_or_init(|| {
                // SAFETY: eventfd takes no pointers; a non-negative result is a new fd we own.
                let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
                // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
                (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
            })
            .as_ref()
            .map(|f| f.as_raw_fd())
    }

    /// The uplink is about to sleep on [`Outbox::wake_fd`]: `false` (do not sleep) if
    /// something is queued already.
    pub fn sleep_begin(&self) -> bool {
        self.sleeping.store(true, Ordering::SeqCst);
        if self.lock().queue.is_empty() {
            return true;
        }
        self.sleeping.store(false, Ordering::SeqCst);
        false
    }

    /// The uplink woke up: pushes need not write the eventfd any more (it is drained).
    pub fn sleep_end(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
        if let Some(Some(fd)) = self.wake_fd.get() {
            let mut b = [0u8; 8];
            // SAFETY: reading at most 8 bytes into a live buffer from our non-blocking eventfd.
            let _ = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
        }
    }

    /// Everything queued so far. Requests that wait for a verdict enter the pending table here,
    /// under the same lock, each with a new request id (`desc.req_id`, `req_id`).
    pub fn take(&self) -> VecDeque<Outbound> {
        let mut s = self.lock();
        let mut queue = std::mem::take(&mut s.queue);
        // A message sent again for its target's PULL keeps its id, and goes only while it is
        // still pending (not answered or withdrawn meanwhile).
        queue.retain(|m| match m {
            Outbound::Send(r) if is_pulled(r) => s.pending.contains_key(&r.desc.req_id.into()),
            _ => true,
        });
        // (A guest's ADDR_CHECK entered the table when it was queued.)
        for m in queue.iter_mut() {
            if let Outbound::Send(r) = m {
                if is_pulled(r) {
                    continue;
                }
                let id = s.new_req_id();
                r.desc.req_id = id.into();
                let p = Pending {
                    host: r.host,
                    dev: r.dev,
                    port: r.port.clone(),
                    req: r.req.clone(),
                    len: r.len,
                    charged: r.charged,
                    desc: r.desc,
                    pulls: 0,
                    sink: None,
                };
                s.pending.insert(id, p);
            }
        }
        queue
    }

    /// Request ids start where the uplink says (a value drawn at its start, so that a late
    /// verdict meant for a previous life of this daemon matches nothing).
    pub fn first_req_id(&self, id: u64) {
        self.lock().next_req = id;
    }

    /// Take request `req_id` out of the pending table, if it is there and (when `host` is
    /// given) was sent to `host`: its taker completes it.
    pub fn take_pending(&self, req_id: u64, host: Option<u16>) -> Option<Pending> {
        let p = self.take_placed(req_id, host)?;
        revoke_sinks([&p]);
        Some(p)
    }

    /// [`Outbox::take_pending`] of a read whose bytes the target wrote, all of them, into its
    /// sink in guest memory (left as it is).
    pub fn take_placed(&self, req_id: u64, host: Option<u16>) -> Option<Pending> {
        let mut s = self.lock();
        let ours = s
            .pending
            .get(&req_id)
            .is_some_and(|p| host.is_none_or(|h| h == p.host));
        if !ours {
            return None;
        }
        let p = s.pending.remove(&req_id)?;
        s.release((p.dev, p.req.req.ep, p.host), p.charged);
        Some(p)
    }

    /// What a message sent again for `host`'s PULL of request `req_id` needs: its device, port,
    /// chain, description and length, if it is a message pending at `host` (a peer may pull
    /// only its own messages, each at most [`MAX_PULLS`] times; anything else is ignored).
    pub fn pulled(&self, req_id: u64, host: u16) -> Option<(usize, Port, Req, wire::Data, u64)> {
        use vfabric_proto::Opcode;
        let mut s = self.lock();
        let p = s.pending.get_mut(&req_id)?;
        let message = matches!(p.req.req.opcode, Opcode::Send | Opcode::TSend);
        if p.host != host || !message || p.pulls >= MAX_PULLS {
            return None;
        }
        p.pulls += 1;
        Some((p.dev, p.port.clone(), p.req.clone(), p.desc, p.len))
    }

    /// Whether request `req_id` to `host` is pending and `f` holds for it.
    pub fn pending_is(&self, req_id: u64, host: u16, f: impl FnOnce(&Pending) -> bool) -> bool {
        self.lock()
            .pending
            .get(&req_id)
            .is_some_and(|p| p.host == host && f(p))
    }

    /// Take every pending request to `host` out (that host is lost).
    pub fn take_pending_of(&self, host: u16) -> Vec<Pending> {
        let mut s = self.lock();
        let ids: Vec<u64> = s
            .pending
            .iter()
            .filter(|(_, p)| p.host == host)
            .map(|(id, _)| *id)
            .collect();
        let lost: Vec<Pending> = ids
            .into_iter()
            .filter_map(|id| {
                let p = s.pending.remove(&id)?;
                s.release((p.dev, p.req.req.ep, p.host), p.charged);
                Some(p)
            })
            .collect();
        drop(s);
        revoke_sinks(&lost);
        lost
    }

    /// Request `req_id`'s read writes into `sink` in its guest's memory from now on, if it is
    /// still pending (`false`: withdrawn meanwhile; the sink is not to be named).
    pub fn attach_sink(&self, req_id: u64, sink: &Arc<GuestSink>) -> bool {
        let mut s = self.lock();
        let Some(p) = s.pending.get_mut(&req_id) else {
            return false;
        };
        p.sink = Some(sink.clone());
        true
    }

    /// Withdraw every request of device `dev` for which `hit` holds, wherever it is: still
    /// queued here (it never leaves), or out and waiting for its verdict (a CANCEL follows it,
    /// so that the target drops it if it still holds it, and its late verdict finds nothing).
    /// The caller completes (or, for a device whose rings are gone, forgets) what is returned.
    pub fn withdraw(&self, dev: usize, hit: impl Fn(&Req) -> bool) -> Vec<Pending> {
        let mut s = self.lock();
        let mut out = Vec::new();
        let queue = std::mem::take(&mut s.queue);
        for m in queue {
            match m {
                // Its pending entry (withdrawn below) stands for it.
                Outbound::Send(r) if is_pulled(&r) && r.dev == dev && hit(&r.req) => {}
                Outbound::Send(r) if r.dev == dev && hit(&r.req) => {
                    s.release((r.dev, r.req.req.ep, r.host), r.charged);
                    out.push(Pending {
                        host: r.host,
                        dev: r.dev,
                        port: r.port,
                        req: r.req,
                        len: r.len,
                        charged: r.charged,
                        desc: r.desc,
                        pulls: 0,
                        sink: None,
                    });
                }
                Outbound::AddrQuery { req_id, .. }
                    if req_id != 0
                        && s.pending
                            .get(&req_id)
                            .is_some_and(|p| p.dev == dev && hit(&p.req)) =>
                {
                    if let Some(p) = s.pending.remove(&req_id) {
                        s.release((p.dev, p.req.req.ep, p.host), p.charged);
                        out.push(p);
                    }
                }
                m => s.queue.push_back(m),
            }
        }
        let ids: Vec<u64> = s
            .pending
            .iter()
            .filter(|(_, p)| p.dev == dev && hit(&p.req))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(p) = s.pending.remove(&id) else {
                continue;
            };
            s.release((p.dev, p.req.req.ep, p.host), p.charged);
            if p.req.req.opcode != vfabric_proto::Opcode::AddrCheck {
                s.queue.push_back(Outbound::Cancel {
                    host: p.host,
                    req_id: id,
                });
            }
            out.push(p);
        }
        drop(s);
        if !out.is_empty() {
            revoke_sinks(&out);
            self.queued();
        }
        out
    }

    /// A guest's ADDR_CHECK of `req.req.peer`, an endpoint of peer `host`: reserved like a
    /// request (`AddrNotAvail`, `HostUnreach`, `NoResources` refuse it) and queued.
    #[allow(clippy::result_large_err)]
    pub fn push_addr_check(
        &self,
        host: u16,
        dev: usize,
        port: Port,
        req: Req,
    ) -> Result<(), (Req, Status)> {
        if let Err(status) = self.reserve((dev, ADDR_CHECK_EP, host), 0) {
            return Err((req, status));
        }
        let addr = req.req.peer;
        let mut req = req;
        // Its endpoint field is ignored by ADDR_CHECK: the pending table keys it apart.
        req.req.ep = ADDR_CHECK_EP;
        let mut s = self.lock();
        let id = s.new_req_id();
        s.pending.insert(
            id,
            Pending {
                host,
                dev,
                port,
                req,
                len: 0,
                charged: 0,
                desc: wire::Data::default(),
                pulls: 0,
                sink: None,
            },
        );
        s.queue.push_back(Outbound::AddrQuery {
            host,
            addr,
            req_id: id,
        });
        drop(s);
        self.queued();
        Ok(())
    }

    /// A receive here was directed at `addr`, an endpoint of peer host `addr.host()`. Returns
    /// false when that host is down (the receive fails PEER_GONE now); else the receive stays
    /// posted and, unless `addr` is known open or being asked about, an ADDR_QUERY goes out
    /// (a "gone" answer or a later EP_GONE fails it). The caller posted the receive first.
    pub fn watch(&self, addr: FabricAddr) -> bool {
        let host = addr.host();
        let mut s = self.lock();
        if !s.enabled || s.hosts.get(&host) != Some(&true) {
            return false;
        }
        if s.live.contains_key(&addr) {
            return true;
        }
        if s.live.len() >= MAX_LIVE {
            s.live.clear();
        }
        s.live.insert(addr, Live::Asking);
        s.queue.push_back(Outbound::AddrQuery {
            host,
            addr,
            req_id: 0,
        });
        drop(s);
        self.queued();
        true
    }

    /// An id for an ADDR_QUERY probe (from the requests' counter: it names no request).
    pub fn probe_id(&self) -> u64 {
        self.lock().new_req_id()
    }

    /// `addr`'s host answered that it is open.
    pub fn known_open(&self, addr: FabricAddr) {
        let mut s = self.lock();
        if s.live.len() >= MAX_LIVE && !s.live.contains_key(&addr) {
            s.live.clear();
        }
        s.live.insert(addr, Live::Open);
    }

    /// Forget what is known of remote endpoints for which `gone` holds (before the receives
    /// directed at them are failed, so that one posted meanwhile asks again).
    pub fn forget(&self, gone: impl Fn(FabricAddr) -> bool) {
        self.lock().live.retain(|a, _| !gone(*a));
    }

    /// Endpoint `addr` of this host is gone: tell the peers (if an uplink runs).
    pub fn ep_gone(&self, addr: FabricAddr, whole_device: bool, closed: bool) {
        let mut s = self.lock();
        if !s.enabled || s.hosts.is_empty() {
            return;
        }
        s.queue.push_back(Outbound::EpGone {
            addr,
            whole_device,
            closed,
        });
        drop(s);
        self.queued();
    }

    /// Sleep until something is queued or `timeout` passed.
    pub fn wait(&self, timeout: Duration) {
        let s = self.lock();
        if s.queue.is_empty() {
            let _ = self.wake.wait_timeout(s, timeout);
        }
    }

    /// The uplink's view of its peers (called whenever it may have changed).
    pub fn set_hosts(&self, hosts: impl Iterator<Item = (u16, bool)>) {
        let mut s = self.lock();
        s.enabled = true;
        s.hosts.clear();
        s.hosts.extend(hosts);
        self.enabled_hint
            .store(!s.hosts.is_empty(), Ordering::Relaxed);
    }

    /// The uplink stopped: nothing leaves any more. Returns what was queued and every request
    /// still waiting for a verdict (the caller completes them).
    pub fn disable(&self) -> (VecDeque<Outbound>, Vec<Pending>) {
        let mut s = self.lock();
        s.enabled = false;
        self.enabled_hint.store(false, Ordering::Relaxed);
        s.hosts.clear();
        s.live.clear();
        let queue = std::mem::take(&mut s.queue);
        let ids: Vec<u64> = s.pending.keys().copied().collect();
        let pending: Vec<Pending> = ids
            .into_iter()
            .filter_map(|id| {
                let p = s.pending.remove(&id)?;
                s.release((p.dev, p.req.req.ep, p.host), p.charged);
                Some(p)
            })
            .collect();
        drop(s);
        revoke_sinks(&pending);
        (queue, pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first `len` bytes of a stream as one piece per range: cut at `len`, at most `max`
    /// pieces, each inside one memory region.
    #[test]
    fn guest_bytes_ranges_cut_the_stream_at_its_length() {
        use crate::chain::Seg;
        use vm_memory::GuestAddress;
        let mem = Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 0x10000),
                (GuestAddress(0x20000), 0x10000),
            ])
            .unwrap(),
        );
        let segs = Segs::from_slice(&[
            Seg {
                addr: 0x100,
                len: 10,
            },
            Seg {
                addr: 0x20003,
                len: 20,
            },
            Seg {
                addr: 0x500,
                len: 30,
            },
        ]);
        let lens = |len, max| {
            GuestBytes::ranges(mem.clone(), &segs, len, max).map(|v| {
                v.iter()
                    .map(|g| (g.ptr() as usize - mem_ptr(&mem, g), g.len()))
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            lens(60, 3),
            Some(vec![(0x100, 10), (0x20003, 20), (0x500, 30)])
        );
        assert_eq!(lens(25, 3), Some(vec![(0x100, 10), (0x20003, 15)]));
        assert_eq!(lens(10, 1), Some(vec![(0x100, 10)]));
        assert_eq!(lens(11, 1), None, "past the limit");
        assert_eq!(lens(61, 3), None, "past the stream");
        assert_eq!(lens(0, 3), None);
        // A range across the end of a region is not one range of guest memory.
        let across = Segs::from_slice(&[Seg {
            addr: 0xfff0,
            len: 0x20,
        }]);
        assert!(GuestBytes::ranges(mem.clone(), &across, 0x20, 4).is_none());
    }

    /// The guest address of `g` (its host address minus its region's host base, plus the
    /// region's guest start).
    fn mem_ptr(mem: &GuestMemoryMmap, g: &GuestBytes) -> usize {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
        let s = g.segs.segs[0];
        let r = mem.find_region(vm_memory::GuestAddress(s.addr)).unwrap();
        r.get_host_address(MemoryRegionAddress(0)).unwrap() as usize - r.start_addr().0 as usize
    }

    #[test]
    fn reservations_follow_peer_state_and_bounds() {
        const K2: EpKey = (0, 1, 2);
        let o = Outbox::default();
        assert_eq!(o.reserve(K2, 8), Err(Status::AddrNotAvail), "no uplink");
        o.set_hosts([(2, true), (3, false)].into_iter());
        assert_eq!(
            o.reserve((0, 1, 4), 8),
            Err(Status::AddrNotAvail),
            "not a peer"
        );
        assert_eq!(
            o.reserve((0, 1, 3), 8),
            Err(Status::HostUnreach),
            "peer down"
        );
        // One request larger than the byte bound goes alone.
        assert_eq!(o.reserve(K2, MAX_INFLIGHT_BYTES * 2), Ok(()));
        assert_eq!(o.reserve(K2, 8), Err(Status::NoResources));
        o.finished(K2, MAX_INFLIGHT_BYTES * 2);
        for _ in 0..MAX_INFLIGHT {
            assert_eq!(o.reserve(K2, 8), Ok(()));
        }
        assert_eq!(o.reserve(K2, 8), Err(Status::NoResources));
        o.finished(K2, 8);
        assert_eq!(o.reserve(K2, 8), Ok(()));
        assert!(o.busy(K2) && !o.busy((0, 2, 2)) && !o.busy((1, 1, 2)));
        for _ in 0..MAX_INFLIGHT {
            o.finished(K2, 8);
        }
        assert!(!o.busy(K2), "nothing in flight for the endpoint any more");
        o.disable();
        assert_eq!(o.reserve(K2, 8), Err(Status::AddrNotAvail));
    }

    #[test]
    fn a_push_wakes_a_sleeping_uplink_through_its_eventfd() {
        let o = Outbox::default();
        let fd = o.wake_fd().expect("eventfd");
        let readable = || {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, no waiting.
            unsafe { libc::poll(&mut p, 1, 0) == 1 }
        };
        // Not sleeping: a push leaves the fd alone.
        o.push(Outbound::Reply {
            host: 2,
            req_id: 1,
            status: Status::Ok,
            bytes: Vec::new(),
        });
        assert!(!readable());
        assert!(!o.sleep_begin(), "something is queued: no sleep");
        assert_eq!(o.take().len(), 1);
        assert!(o.sleep_begin());
        assert!(!readable());
        o.push(Outbound::Reply {
            host: 2,
            req_id: 2,
            status: Status::Ok,
            bytes: Vec::new(),
        });
        assert!(readable(), "a push while asleep wakes");
        o.sleep_end();
        assert!(!readable(), "drained on waking");
    }

    #[test]
    fn a_push_in_an_assist_scope_is_left_to_the_end_of_the_pass() {
        let reply = |req_id| Outbound::Reply {
            host: 2,
            req_id,
            status: Status::Ok,
            bytes: Vec::new(),
        };
        let o = Outbox::default();
        let other = Outbox::default();
        let fd = o.wake_fd().expect("eventfd");
        let other_fd = other.wake_fd().expect("eventfd");
        let readable = |fd| {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, no waiting.
            unsafe { libc::poll(&mut p, 1, 0) == 1 }
        };
        assert!(o.sleep_begin());
        // Without a peer a pass makes no scope: a push wakes the uplink at once.
        {
            let _pass = o.assist_scope();
            o.push(reply(0));
            assert!(readable(fd), "a scope without peers holds nothing back");
        }
        assert_eq!(o.take().len(), 1);
        o.sleep_end();
        o.set_hosts([(2, true)].into_iter());
        assert!(o.sleep_begin() && other.sleep_begin());
        {
            let _pass = o.assist_scope();
            {
                let _nested = o.assist_scope();
                o.push(reply(1));
            }
            assert!(
                !readable(fd),
                "the end of a nested scope is not the pass's end"
            );
            o.push(reply(2));
            // Another outbox's push is not this pass's to post: it wakes its uplink at once.
            other.push(reply(3));
            assert!(readable(other_fd));
            assert!(
                !readable(fd),
                "the pass posts its pushes itself when it ends"
            );
        }
        // No worker to drive (no uplink thread): the end of the pass wakes the uplink thread
        // instead, once, for both.
        assert!(readable(fd));
        assert_eq!(o.take().len(), 2);
        o.sleep_end();
        // Outside a scope a push wakes at once, as before.
        assert!(o.sleep_begin());
        o.push(reply(4));
        assert!(readable(fd));
    }
}
