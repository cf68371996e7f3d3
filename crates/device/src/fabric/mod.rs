// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The shared local fabric: endpoints of every device of the daemon, matching, and the one copy
//! from a sender's guest memory into a receiver's.
//!
//! # Model
//!
//! Each destination endpoint has one queue of *unexpected* messages (arrival order; eager copies
//! and held sends alike) and one queue of *posted* receives (posting order). A send first looks
//! for a posted receive; otherwise it is buffered eagerly (≤ `eager_threshold`, no
//! DELIVERY_COMPLETE, and the destination device's eager bytes stay ≤ `max_unexpected_bytes`) and
//! completes at once, or it is *held*: the validated chain stays here and the data moves with one
//! copy when a receive matches. A receive first scans the unexpected queue, otherwise it is
//! posted. Because both sides always look at the other queue first, messages from one source
//! endpoint to one destination endpoint are received in arrival order.
//!
//! # Locking
//!
//! There is no fabric-wide lock. Each device's state (its endpoints with their queues, its
//! memory regions, its eager byte count) sits behind that device's own mutex, [`Fabric::dev`].
//! A thread holds **at most one device lock at a time** and never holds one while it copies
//! bytes: a send reads its own endpoint's generation and kind without a lock
//! ([`DevCell::ep_words`]), locks the destination device to match, takes the matched receive
//! (or held send) out of the queue, releases the lock, and only then copies. The one exception
//! is bounded: an eager payload of at most 64 bytes is written with its completion straight
//! into the oldest receive if that one takes it (`Fabric::op_send`), moved from the sender's
//! guest memory where its parse resolved it (else read onto the stack before the lock).
//! Messages from one source endpoint stay in order because one device's requests are handled
//! by one thread at a time (the backend's pass lock).
//!
//! While a copy runs without a lock, the guest memories stay mapped through the
//! `GuestMemoryAtomic` snapshots it holds, a held send carries its sender's [`Port`] (so a
//! disconnect or reconnect of the sender only sends the completion to the old, dead rings), and
//! remote accesses hold their memory region ([`rma::Mr::enter`]) so deregistration waits for
//! them. Completions are staged in their rings at once and published by a [`Notify`] (a
//! ring's first of a batch at once, the rest when it is flushed), each taking only the target
//! ring's own lock. Lock order, never acquired in
//! the other direction:
//!
//! 1. the per-device pass lock (`FabricBackend::work`),
//! 2. one device lock (`Fabric::dev`) — never two at once,
//! 3. one vring's `VringRwLock` (read),
//! 4. that ring's state lock (`ring::Ring::state`), taken and released per publish.

use std::collections::{HashMap, VecDeque};
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tracing::debug;
use vfabric_proto::{
    comp_flags, tag_matches, Completion, FabricAddr, Opcode, Request, Status, COMPLETION_LEN,
};
use vm_memory::{ByteValued, GuestAddressSpace, GuestMemoryAtomic};

#[cfg(test)]
use crate::chain::Parsed;
use crate::chain::{completion, GuestMemoryMmap, Req, Verdict};
use crate::config::{Config, Limits, VendorAttr};
use crate::stats::Counters;
use parking_lot::{Mutex as DevLock, MutexGuard as DevGuard};

mod atomic;
mod caps;
mod commit;
mod fence;
mod lifecycle;
mod matching;
mod pmem;
mod posted;
mod remote;
mod rma;
mod service;

pub(crate) use remote::{DirectDest, DirectSource, Incoming};

/// Where completions of one device go: its used rings.
pub(crate) trait CompletionSink: Send + Sync {
    /// Chain `head` of virtqueue `queue` is done, `len` bytes written: staged for its used
    /// ring in completion order, shared with every other thread completing chains of that ring.
    fn stage(&self, queue: u16, head: u16, len: u32);
    /// Put what is staged for virtqueue `queue` (by any thread) in its used ring with one index
    /// update, and signal the guest if it asked for it (EVENT_IDX).
    fn publish(&self, queue: u16);
    /// [`CompletionSink::stage`] then [`CompletionSink::publish`], as one step (a sink may do
    /// both under one lock).
    fn stage_and_publish(&self, queue: u16, head: u16, len: u32) {
        self.stage(queue, head, len);
        self.publish(queue);
    }
    /// Make the device look at its RX rings soon (from any thread, under a device's lock: it
    /// must not block): they may hold receives it has not taken (LAZY_RX).
    fn wake_rx(&self) {}
}

/// A connected device: its guest memory and its used rings.
#[derive(Clone)]
pub(crate) struct Port {
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    sink: Arc<dyn CompletionSink>,
    /// `sink`'s identity ([`RingId::sink`]), worked out once: from a `dyn` pointer it takes
    /// the vtable's alignment, per completion otherwise.
    sink_id: usize,
    /// `sink` itself as a plain trait object, for the same reason: a call through the `Arc`
    /// works its data's address out of the vtable's alignment every time.
    sink_at: SinkAt,
    /// The frontend process, for regions of its own memory (`crate::xmem`); `None` in tests.
    pub process: Option<Arc<crate::xmem::PeerProcess>>,
    /// The device's counters, set when it connects ([`Fabric::connect`]): a completion counts
    /// through the port it goes to, without a look-up by device index.
    counters: Arc<Counters>,
}

impl Port {
    pub fn new(
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        sink: Arc<dyn CompletionSink>,
        process: Option<Arc<crate::xmem::PeerProcess>>,
    ) -> Self {
        Self {
            sink_id: RingId::of(&sink, 0).sink,
            sink_at: SinkAt(Arc::as_ptr(&sink)),
            mem,
            sink,
            process,
            counters: Arc::default(),
        }
    }
}

/// [`Port::sink_at`]: the sink the same port holds (its `Arc` keeps it alive as long as the
/// port, so as long as any copy of this pointer in it).
#[derive(Clone, Copy)]
struct SinkAt(*const dyn CompletionSink);

// SAFETY: the pointer is only dereferenced for shared access to a `CompletionSink`, which is
// `Send + Sync`, while the port that holds its `Arc` lives.
unsafe impl Send for SinkAt {}
// SAFETY: as for `Send`.
unsafe impl Sync for SinkAt {}

impl Port {
    /// The port's sink, without the `Arc`'s address arithmetic.
    #[inline(always)]
    fn sink(&self) -> &dyn CompletionSink {
        // SAFETY: `sink_at` points at the sink `self.sink` holds (see `SinkAt`), alive while
        // `self` is borrowed.
        unsafe { &*self.sink_at.0 }
    }
}

/// A ring a batch completed chains of: its sink, by address (identity only, no reference
/// held), and its queue.
#[derive(Clone, Copy, PartialEq, Eq)]
struct RingId {
    sink: usize,
    queue: u16,
}

impl RingId {
    fn of(sink: &Arc<dyn CompletionSink>, queue: u16) -> Self {
        Self {
            sink: Arc::as_ptr(sink) as *const () as usize,
            queue,
        }
    }
}

/// Completions of a batch on their way to their used rings, in the order they happened
/// whichever thread made them (a receive completed by the sender's pass is never published
/// after a later receive completed by the receiver's own pass). A ring's first completion of
/// the batch is published at once (staged and published under one lock of the ring: most
/// batches complete one chain per ring, a ping-pong's always); the ones after it are staged in
/// the ring at once and get one index update and at most one more notification when the batch
/// is flushed (explicitly or on drop). A batch mostly touches one or two rings: they have
/// fields of their own (no list to search, grow or drain), filled in that order and emptied
/// together; the lists for more rings are made on first need, so a batch that never needs them
/// starts, ends and drops with one word to look at.
#[derive(Default)]
pub(crate) struct Notify {
    first: Option<RingId>,
    second: Option<RingId>,
    // Dropped by hand (see `Drop`): the drop glue of the field would be one more call per batch.
    more: ManuallyDrop<Option<Box<NotifyMore>>>,
}

/// What a [`Notify`] keeps past its first two rings.
#[derive(Default)]
struct NotifyMore {
    /// Rings after the first two, in the order they were first completed.
    rings: Vec<RingId>,
    /// Rings with completions staged after their first, for the flush to publish.
    staged: Vec<(Arc<dyn CompletionSink>, u16)>,
}

impl Notify {
    /// Chain `head` of virtqueue `queue` of `sink` is done, `len` bytes written.
    #[cfg(test)]
    pub fn complete(&mut self, sink: &Arc<dyn CompletionSink>, queue: u16, head: u16, len: u32) {
        self.complete_ring(&**sink, sink, RingId::of(sink, queue), head, len);
    }

    /// [`Notify::complete`] of a chain of `port`'s device.
    #[inline(always)]
    pub fn complete_at(&mut self, port: &Port, queue: u16, head: u16, len: u32) {
        let ring = RingId {
            sink: port.sink_id,
            queue,
        };
        self.complete_ring(port.sink(), &port.sink, ring, head, len);
    }

    /// `at` is `sink`'s sink itself.
    #[inline(always)]
    fn complete_ring(
        &mut self,
        at: &dyn CompletionSink,
        sink: &Arc<dyn CompletionSink>,
        ring: RingId,
        head: u16,
        len: u32,
    ) {
        // A batch's first ring, and its second (a message's two completions): inline.
        let free = match (self.first, self.second) {
            (None, _) => &mut self.first,
            (Some(f), None) if f != ring => &mut self.second,
            _ => return self.complete_more(sink, ring, head, len),
        };
        at.stage_and_publish(ring.queue, head, len);
        *free = Some(ring);
    }

    /// [`Notify::complete`] with both ring fields filled.
    #[inline(never)]
    fn complete_more(&mut self, sink: &Arc<dyn CompletionSink>, ring: RingId, head: u16, len: u32) {
        let more = self.more.get_or_insert_with(Default::default);
        let seen =
            self.first == Some(ring) || self.second == Some(ring) || more.rings.contains(&ring);
        if !seen {
            sink.stage_and_publish(ring.queue, head, len);
            return more.rings.push(ring);
        }
        sink.stage(ring.queue, head, len);
        if !more.staged.iter().any(|(s, q)| RingId::of(s, *q) == ring) {
            more.staged.push((sink.clone(), ring.queue));
        }
    }

    /// Publish the completions staged since each ring's first, ring by ring, and start a new
    /// batch.
    #[inline]
    pub fn flush(&mut self) {
        if self.more.is_some() {
            self.flush_more();
        }
        self.first = None;
        self.second = None;
    }

    /// [`Notify::flush`] of the lists (kept for the next batch).
    #[inline(never)]
    fn flush_more(&mut self) {
        if let Some(more) = self.more.as_mut() {
            for (sink, queue) in more.staged.drain(..) {
                sink.publish(queue);
            }
            more.rings.clear();
        }
    }
}

impl Drop for Notify {
    /// One check where the batch ends (an out-of-line drop of the lists cost ≈20 per batch,
    /// nearly all of it the call).
    #[inline(always)]
    fn drop(&mut self) {
        if self.more.is_some() {
            self.drop_more();
        }
    }
}

impl Notify {
    #[cold]
    #[inline(never)]
    fn drop_more(&mut self) {
        self.flush_more();
        // SAFETY: called once, from `drop`: the field is not used after.
        unsafe { ManuallyDrop::drop(&mut self.more) };
    }
}

/// How to tear down a device's or endpoint's in-flight chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Teardown {
    /// EP_CLOSE, memory table change: the device's own chains complete `Canceled`.
    Cancel,
    /// Disconnect, RESET_DEVICE: its rings are gone, its chains are forgotten.
    Silent,
}

/// What a receive matches on.
#[derive(Clone, Copy, Debug)]
struct Meta {
    src: FabricAddr,
    tagged: bool,
    tag: u64,
    cq_data: Option<u64>,
    len: u64,
    /// Writedata notification: bytes the RMA wrote (reported as `len`, no bytes placed).
    rma_len: Option<u64>,
}

// Queued messages are few per endpoint; a held send is kept inline rather than boxed.
#[allow(clippy::large_enum_variant)]
enum Body {
    /// Copied into the device (counted against the destination's unexpected bytes).
    Eager(Vec<u8>),
    /// The sender's chain and port, completed when matched.
    Held(Req, Port),
    /// A message from another host held until matched (with its bytes, or only a stub of it
    /// past the held-bytes bound); its sender's REPLY waits for that.
    Remote(remote::HeldRemote),
}

impl Msg {
    /// A stub of a message from another host: its bytes are still at its sender.
    fn is_stub(&self) -> bool {
        matches!(&self.body, Body::Remote(h) if h.is_stub())
    }
}

struct Msg {
    meta: Meta,
    src_dev: usize,
    /// Cookie of the PEEK|CLAIM that reserved this message.
    claimed: Option<u64>,
    body: Body,
}

struct Endpoint {
    kind: u64,
    generation: u32,
    /// Posted receives, as compact records.
    posted: VecDeque<posted::Posted>,
    unexpected: VecDeque<Msg>,
    /// TX requests deferred by FENCE (spec §6.12.2), in arrival order.
    fenced: VecDeque<Req>,
    /// Deferred TX requests not yet started (those in `fenced` and one being started): a new
    /// TX request of this endpoint queues behind them.
    fence_pending: usize,
    /// The last source of a directed receive found open, its device, and that device's
    /// `ep_closes` then: while that count is unchanged the source is still open, so the next
    /// directed receive from it needs no look at the source device (a lock of another device).
    live_src: Option<(FabricAddr, usize, u64)>,
    /// Receives matched to stubs of messages from other hosts, waiting for their bytes.
    pulling: Vec<remote::Pulling>,
    /// Receives matched to messages from other hosts that the uplink is reading straight
    /// into their buffers; each leaves only once its read is over.
    direct: Vec<remote::DirectRecv>,
}

#[derive(Default)]
struct Slot {
    /// Generation of the last endpoint opened in this slot.
    generation: u32,
    ep: Option<Endpoint>,
    /// That endpoint was closed by its own driver (EP_CLOSE), not lost: a receive directed at
    /// it later still learns PEER_CLOSED.
    closed_in_order: bool,
}

/// The state of one device, behind its own lock.
pub(crate) struct Dev {
    /// Shared, so that taking it out of the lock costs one reference count.
    port: Option<Arc<Port>>,
    eps: Vec<Slot>,
    /// Eagerly buffered bytes queued at this device's endpoints, each message charged
    /// [`eager_cost`].
    unexpected_bytes: u64,
    /// Features the driver acked (updated on every batch of requests).
    acked: u64,
    /// Memory regions by key.
    mrs: HashMap<u64, Arc<rma::Mr>>,
    /// Posted MR_EVENT requests.
    mr_events: VecDeque<Req>,
    /// Remote-access events not yet reported, coalesced (spec §6.10.4).
    pending_events: rma::PendingEvents,
    /// Provider-key generator.
    keys: rma::KeyGen,
    /// Posted COMMIT_EVENT requests and commits waiting for this device's verdict (§6.17.3).
    commits: commit::Commits,
    /// The device left its RX notifications off (LAZY_RX, nothing held unexpected): receives
    /// may wait in its RX rings untaken, so a message queued unexpected must wake it. Written
    /// under this lock only; shared with [`DevCell::rx_quiet`], where the device's next
    /// decision reads it without the lock ([`Fabric::rx_needs_notify`]).
    rx_quiet: Arc<AtomicBool>,
    /// Woken for its RX rings and not back from the pass that takes them yet.
    rx_waking: bool,
}

impl Dev {
    fn new() -> Self {
        Self {
            port: None,
            eps: Vec::new(),
            unexpected_bytes: 0,
            acked: 0,
            mrs: HashMap::new(),
            mr_events: VecDeque::new(),
            pending_events: Default::default(),
            keys: rma::KeyGen::new(),
            commits: Default::default(),
            rx_quiet: Arc::new(AtomicBool::new(false)),
            rx_waking: false,
        }
    }

    /// A message was just queued unexpected at one of this device's endpoints, or a peer that
    /// directed receives may name is gone. If the device left its RX notifications off,
    /// receives its driver made available since may not be taken yet: wake the device, which
    /// takes them (one may match the message, or fail for the peer) and keeps its RX
    /// notifications on while it holds a message unexpected.
    fn look_at_rx(&mut self) {
        if self.rx_quiet.swap(false, Ordering::AcqRel) {
            if let Some(p) = &self.port {
                self.rx_waking = true;
                p.sink.wake_rx();
            }
        }
    }

    fn ep(&self, id: usize) -> Option<&Endpoint> {
        self.eps.get(id)?.ep.as_ref()
    }

    fn ep_mut(&mut self, id: usize) -> Option<&mut Endpoint> {
        self.eps.get_mut(id)?.ep.as_mut()
    }

    /// Endpoint `id` if it is open with generation `gen` on a connected device.
    fn live_ep(&self, id: usize, gen: u32) -> Option<&Endpoint> {
        self.port.as_ref()?;
        self.ep(id).filter(|e| e.generation == gen)
    }

    fn live_ep_mut(&mut self, id: usize, gen: u32) -> Option<&mut Endpoint> {
        self.port.as_ref()?;
        self.ep_mut(id).filter(|e| e.generation == gen)
    }
}

/// One device slot of the fabric.
struct DevCell {
    state: DevLock<Dev>,
    /// Held by the one thread that starts this device's deferred (fenced) requests.
    fence_runner: Mutex<()>,
    /// Deferred requests of this device may have become startable.
    fence_dirty: AtomicBool,
    /// Deferred requests waiting at this device's endpoints.
    fenced: AtomicUsize,
    /// Endpoints of this device closed so far (bumped under the device lock when one closes).
    ep_closes: AtomicU64,
    /// [`Dev::rx_quiet`], readable without the lock.
    rx_quiet: Arc<AtomicBool>,
    /// Per endpoint slot, the open endpoint's generation and kind ([`ep_word`]; 0: none),
    /// written under the device lock when one opens or closes, read without it
    /// ([`Fabric::ep_info`]): a request's own endpoint is looked up without the lock.
    ep_words: Box<[AtomicU64]>,
}

/// The [`DevCell::ep_words`] entry of an open endpoint: never 0 (generations start at 1).
fn ep_word(generation: u32, kind: u64) -> u64 {
    u64::from(generation) << 8 | (kind & 0xff)
}

/// Bytes charged per eagerly buffered message on top of its payload, so that even empty
/// messages are bounded by `max_unexpected_bytes`.
pub(crate) const EAGER_OVERHEAD: u64 = 64;

/// What an eager message of `len` bytes counts against `max_unexpected_bytes`.
pub(crate) const fn eager_cost(len: u64) -> u64 {
    len.saturating_add(EAGER_OVERHEAD)
}

#[inline]
fn recv_matches(r: &Request, m: &Meta) -> bool {
    let tagged = r.opcode == Opcode::TRecv;
    tagged == m.tagged
        && (!tagged || tag_matches(r.tag, r.ignore, m.tag))
        && (r.flags & vfabric_proto::flags::DIRECTED == 0 || r.peer == m.src)
}

#[inline]
fn recv_completion(r: &Request, m: &Meta, placed: u64) -> Completion {
    rx_completion(r.cookie, r.opcode == Opcode::TRecv, m, placed)
}

/// The completion of receive `cookie` (a TRECV if `tagged`) for message `m`, `placed` bytes of
/// it placed.
#[inline]
fn rx_completion(cookie: u64, tagged: bool, m: &Meta, placed: u64) -> Completion {
    let status = if placed < m.len {
        Status::Truncated
    } else {
        Status::Ok
    };
    let mut c = completion(status, cookie);
    let mut f = 0;
    if let Some(written) = m.rma_len {
        c.flags = (comp_flags::REMOTE_WRITE | comp_flags::REMOTE_CQ_DATA).into();
        c.data = m.cq_data.unwrap_or(0).into();
        c.len = written.into();
        c.src = m.src.to_wire();
        return c;
    }
    if tagged {
        f |= comp_flags::TAGGED;
    }
    if let Some(d) = m.cq_data {
        f |= comp_flags::REMOTE_CQ_DATA;
        c.data = d.into();
    }
    c.flags = f.into();
    c.len = placed.into();
    c.tag = m.tag.into();
    c.src = m.src.to_wire();
    c.olen = (m.len - placed).into();
    c
}

/// A completion as its eight 64-bit words (host order), for the hot writers that store it
/// straight into the completion area instead of building a [`Completion`] and copying it.
type CompWords = [u64; COMPLETION_LEN / 8];

// The word layout `msg_completion_words` and `CompWords` assume.
const _: () = {
    use std::mem::offset_of;
    assert!(COMPLETION_LEN == 64);
    assert!(offset_of!(Completion, status) == 0 && offset_of!(Completion, flags) == 4);
    assert!(offset_of!(Completion, cookie) == 8 && offset_of!(Completion, len) == 16);
    assert!(offset_of!(Completion, data) == 24 && offset_of!(Completion, tag) == 32);
    assert!(offset_of!(Completion, src) == 40 && offset_of!(Completion, olen) == 56);
};

/// [`rx_completion`] as words, for a message (not a writedata notification: `m.rma_len` is
/// `None`), with its raw status.
#[inline(always)]
fn msg_completion_words(cookie: u64, tagged: bool, m: &Meta, placed: u64) -> (CompWords, u32) {
    debug_assert!(m.rma_len.is_none());
    let status = if placed < m.len {
        Status::Truncated as u32
    } else {
        Status::Ok as u32
    };
    let mut f = if tagged { comp_flags::TAGGED } else { 0 };
    if m.cq_data.is_some() {
        f |= comp_flags::REMOTE_CQ_DATA;
    }
    let words = [
        u64::from(status) | u64::from(f) << 32,
        cookie,
        placed,
        m.cq_data.unwrap_or(0),
        m.tag,
        m.src.node,
        u64::from(m.src.ep) | u64::from(m.src.generation) << 32,
        m.len - placed,
    ];
    (words, status)
}

/// Store completion `w` at `at`, word by word (little-endian, as the wire struct).
///
/// # Safety
/// `at` must be valid for writes of `COMPLETION_LEN` bytes.
#[inline(always)]
unsafe fn store_completion(at: *mut u8, w: &CompWords) {
    for (i, x) in w.iter().enumerate() {
        // SAFETY: word `i` < 8 lies within the `COMPLETION_LEN` bytes at `at` (the caller's
        // contract); unaligned stores, as guest memory may be.
        unsafe { at.cast::<u64>().add(i).write_unaligned(x.to_le()) };
    }
}

/// Completion `w` as the bytes of the wire struct.
fn completion_bytes(w: &CompWords) -> [u8; COMPLETION_LEN] {
    let mut b = [0u8; COMPLETION_LEN];
    for (chunk, x) in b.chunks_exact_mut(8).zip(w) {
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    b
}

/// The used length of a chain whose completion was written (`wrote`) after `written` bytes of
/// its data area: 0 (a broken chain) if the completion could not be.
#[inline]
fn completion_used(wrote: Result<(), crate::chain::MemFault>, written: u64) -> u32 {
    match wrote {
        Ok(()) => written
            .saturating_add(COMPLETION_LEN as u64)
            .min(u64::from(u32::MAX)) as u32,
        Err(_) => 0,
    }
}

#[inline]
fn send_ok(r: &Request, len: u64) -> Completion {
    let mut c = completion(Status::Ok, r.cookie);
    c.len = len.into();
    c
}

/// The fabric shared by all devices of one daemon.
pub(crate) struct Fabric {
    limits: Limits,
    fabric_id: u32,
    host_id: u16,
    device_id: u32,
    vendor_attrs: Vec<VendorAttr>,
    counters: Vec<Arc<Counters>>,
    devs: Vec<DevCell>,
    /// Deferred (fenced) requests on all devices: the fast path skips fence work when 0.
    fenced_total: AtomicUsize,
    /// Locks of the atomics the CPU cannot do in one instruction.
    stripes: atomic::Stripes,
    /// Other hosts of the fabric as the uplink sees them (empty on one host).
    remote_hosts: Arc<crate::uplink::RemoteHosts>,
    /// Requests to and verdicts for other hosts, taken by the uplink thread.
    outbox: Arc<crate::uplink::remote::Outbox>,
    /// Bytes of messages from other hosts held in unexpected queues.
    remote_held_bytes: AtomicU64,
    /// Stubs (queued or being pulled) of messages from each other host; a leaf lock.
    remote_stubs: Mutex<HashMap<u16, usize>>,
    /// Next commit event id (fabric-wide: an id is never handed out twice).
    next_commit_id: AtomicU64,
    /// How long a handled commit waits for its target's verdict.
    commit_timeout: std::time::Duration,
    /// This host's service table (SVC_BIND / SVC_RESOLVE); a leaf lock.
    services: Mutex<service::Services>,
    /// IP addresses naming hosts of the fabric (QUERY_CAPS `HOST_ADDRS`): each host's uplink
    /// address, resolved at start (empty on one host).
    host_addrs: Vec<vfabric_proto::caps::HostAddrEntry>,
}

impl Fabric {
    pub fn new(config: &Config) -> Self {
        let n = config.sockets.len();
        Self {
            limits: config.limits.clone(),
            fabric_id: config.fabric_id,
            host_id: config.host_id,
            device_id: config.device_id,
            vendor_attrs: config.vendor_attrs.clone(),
            counters: (0..n).map(|_| Arc::new(Counters::default())).collect(),
            devs: (0..n)
                .map(|_| {
                    let dev = Dev::new();
                    DevCell {
                        rx_quiet: dev.rx_quiet.clone(),
                        ep_words: (0..config.limits.max_endpoints)
                            .map(|_| AtomicU64::new(0))
                            .collect(),
                        state: DevLock::new(dev),
                        fence_runner: Mutex::new(()),
                        fence_dirty: AtomicBool::new(false),
                        fenced: AtomicUsize::new(0),
                        ep_closes: AtomicU64::new(0),
                    }
                })
                .collect(),
            fenced_total: AtomicUsize::new(0),
            stripes: atomic::Stripes::new(),
            remote_hosts: crate::uplink::RemoteHosts::new(),
            outbox: Default::default(),
            remote_held_bytes: AtomicU64::new(0),
            remote_stubs: Mutex::new(HashMap::new()),
            next_commit_id: AtomicU64::new(1),
            commit_timeout: config.commit_timeout,
            services: Mutex::new(service::Services::default()),
            host_addrs: service::host_addrs(config),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn counters(&self, dev: usize) -> Option<&Arc<Counters>> {
        self.counters.get(dev)
    }

    pub fn num_devices(&self) -> usize {
        self.devs.len()
    }

    /// The table of other hosts the uplink keeps and QUERY_CAPS reports.
    pub fn remote_hosts(&self) -> Arc<crate::uplink::RemoteHosts> {
        self.remote_hosts.clone()
    }

    /// Where requests for other hosts go (the uplink thread takes them).
    /// See [`crate::uplink::remote::AssistScope`]: a device thread's pass over its rings
    /// posts the requests for other hosts it queued itself, at the end of the pass.
    pub(crate) fn assist_scope(&self) -> crate::uplink::remote::AssistScope<'_> {
        self.outbox.assist_scope()
    }

    pub fn outbox(&self) -> Arc<crate::uplink::remote::Outbox> {
        self.outbox.clone()
    }

    pub fn node_addr(&self, dev: usize) -> u64 {
        FabricAddr::node_of(self.fabric_id, self.host_id, dev as u16)
    }

    /// The lock of device `dev` (`dev` < `num_devices()`, checked by every caller: device
    /// indices come from the daemon or from [`Fabric::locate`]). It does not poison: the
    /// state is only mutated by code that does not panic. Hold at most one at a time.
    #[inline]
    fn dev(&self, dev: usize) -> DevGuard<'_, Dev> {
        self.devs[dev].state.lock()
    }

    /// Whether device `dev` (whose driver acked LAZY_RX) must keep its RX notifications on:
    /// only while a message waits unexpected at one of its endpoints, for a new receive may
    /// match it. Otherwise they may stay off, recorded so that the next message queued
    /// unexpected wakes the device ([`CompletionSink::wake_rx`]); decided under the device's
    /// lock, which every queueing holds, so no message slips between the two.
    /// With `idle` (the device found its RX rings empty on its last check) they go on as well.
    ///
    /// While the last decision's "off" stands (nothing queued unexpected since: every queueing
    /// takes `rx_quiet` back, under the lock, and wakes the device), it is repeated without the
    /// lock: a queueing that races with that read wakes the device as it would after a locked
    /// decision.
    #[inline]
    pub(crate) fn rx_needs_notify(&self, dev: usize, idle: bool) -> bool {
        let Some(slot) = self.devs.get(dev) else {
            return true;
        };
        if !idle && slot.rx_quiet.load(Ordering::Acquire) {
            return false;
        }
        Self::rx_decide(slot, idle)
    }

    /// [`Fabric::rx_needs_notify`] under the device's lock.
    #[inline(never)]
    fn rx_decide(slot: &DevCell, idle: bool) -> bool {
        let d = slot.state.lock();
        let on = idle
            || d.eps
                .iter()
                .any(|s| s.ep.as_ref().is_some_and(|e| !e.unexpected.is_empty()));
        d.rx_quiet.store(!on, Ordering::Release);
        on
    }

    /// Device `dev` has taken its RX rings after a [`CompletionSink::wake_rx`].
    pub(crate) fn rx_woken(&self, dev: usize) {
        if let Some(slot) = self.devs.get(dev) {
            slot.state.lock().rx_waking = false;
        }
    }

    /// `(device, endpoint)` an address names on this fabric, if the device exists. Whether the
    /// endpoint is open (and of that generation) is checked under the device's lock.
    fn locate(&self, a: FabricAddr) -> Option<(usize, usize)> {
        // An address of another fabric (or another host) names nothing here, however equal
        // its host, device and endpoint numbers are to one of ours.
        if a.fabric() != self.fabric_id || a.host() != self.host_id {
            return None;
        }
        let d = a.device() as usize;
        (d < self.devs.len()).then_some((d, a.ep as usize))
    }

    /// `(generation, kind)` of open endpoint `ep` of `dev`, without the device's lock: the
    /// answer the lock would give at some moment during the call (an endpoint may close right
    /// after either way).
    #[inline]
    fn ep_info(&self, dev: usize, ep: u32) -> Option<(u32, u64)> {
        let w = self
            .devs
            .get(dev)?
            .ep_words
            .get(ep as usize)?
            .load(Ordering::Acquire);
        (w != 0).then_some(((w >> 8) as u32, w & 0xff))
    }

    /// Record endpoint slot `ep` of `dev` as open (`Some((generation, kind))`) or closed, under
    /// the device's lock (for [`Fabric::ep_info`]).
    fn set_ep_word(&self, dev: usize, ep: usize, open: Option<(u32, u64)>) {
        if let Some(w) = self.devs.get(dev).and_then(|c| c.ep_words.get(ep)) {
            w.store(open.map_or(0, |(g, k)| ep_word(g, k)), Ordering::Release);
        }
    }

    /// Whether `a` is an open endpoint of a connected device.
    fn addr_live(&self, a: FabricAddr) -> bool {
        self.locate(a)
            .is_some_and(|(d, ep)| self.dev(d).live_ep(ep, a.generation).is_some())
    }

    /// Start handing chains of device `dev`, whose driver acked `acked`, to the fabric: the
    /// device's port, or `None` when it is not connected (its chains are dropped).
    pub fn begin(&self, dev: usize, acked: u64) -> Option<Arc<Port>> {
        let mut d = self.devs.get(dev)?.state.lock();
        d.acked = acked;
        d.port.clone()
    }

    /// Handle one chain of device `dev` (its port from [`Fabric::begin`]) parsed into `req`
    /// with verdict `v`; `mem` is the guest memory table it was parsed in. The request is lent:
    /// a handler that keeps it takes it ([`Req::take`]).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn handle_one(
        &self,
        dev: usize,
        port: &Port,
        mem: &GuestMemoryMmap,
        req: &mut Req,
        v: &Verdict,
        acked: u64,
        n: &mut Notify,
    ) {
        match *v {
            Verdict::Req => self.dispatch(dev, port, Some(mem), req, acked, n),
            Verdict::Recv(ref rx) => self.op_recv_plain(dev, port, req, rx, n),
            Verdict::Send(ref tx) => self.op_send_plain(dev, port, mem, req, tx, acked, n),
            Verdict::Reject { status, cookie } => {
                debug!(dev, req.queue, req.head, ?status, "request rejected");
                let c = completion(status, cookie);
                self.finish_in(dev, port, mem, req, &c, 0, n);
            }
            Verdict::Unusable(why) => {
                debug!(
                    dev,
                    req.queue, req.head, why, "chain returned with length 0"
                );
                if let Some(c) = self.counters.get(dev) {
                    Counters::inc(&c.bad_chains);
                }
                n.complete_at(port, req.queue, req.head, 0);
            }
        }
    }

    /// The chains of one batch have been handled: start deferred requests whose fence may be
    /// satisfied now.
    #[inline]
    pub fn end_batch(&self, n: &mut Notify) {
        // Not from inside a yield point: a request suspended mid-copy below us must complete
        // before its fenced successors start. The next batch anywhere runs them.
        if self.fenced_total.load(Ordering::Acquire) > 0 && !crate::poller::in_yield() {
            self.run_fenced(n);
        }
    }

    /// Process parsed chains of device `dev` whose driver acked `acked` as one batch, and
    /// publish their completions.
    #[cfg(test)]
    pub fn handle(&self, dev: usize, parsed: &mut Vec<Parsed>, acked: u64, n: &mut Notify) {
        let Some(port) = self.begin(dev, acked) else {
            parsed.clear();
            return;
        };
        let mem = port.mem.memory();
        for p in parsed.drain(..) {
            let (mut req, v) = p.split();
            self.handle_one(dev, &port, &mem, &mut req, &v, acked, n);
        }
        self.end_batch(n);
        n.flush();
    }

    /// Write completion `c` of request `r` of `dev` and put its chain in its used ring.
    #[inline]
    fn finish(
        &self,
        dev: usize,
        port: &Port,
        r: &Req,
        c: &Completion,
        written: u64,
        n: &mut Notify,
    ) {
        self.finish_in(dev, port, &port.mem.memory(), r, c, written, n);
    }

    /// [`Fabric::finish`] with `port`'s guest memory already loaded (`mem`): a caller that
    /// touched the guest's memory for the same request saves a second load.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn finish_in(
        &self,
        dev: usize,
        port: &Port,
        mem: &GuestMemoryMmap,
        r: &Req,
        c: &Completion,
        written: u64,
        n: &mut Notify,
    ) {
        self.write_completion(dev, port, mem, r, c, written, n);
    }

    /// [`Fabric::finish_in`] inlined, for the eager send's placement (`matching::place`), which
    /// completes two requests in a row.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn write_completion(
        &self,
        dev: usize,
        port: &Port,
        mem: &GuestMemoryMmap,
        r: &Req,
        c: &Completion,
        written: u64,
        n: &mut Notify,
    ) {
        let used = completion_used(r.write_comp(mem, c.as_slice()), written);
        self.completed(dev, port, r.queue, r.head, u32::from(c.status), used, n);
    }

    /// Chain `head` of virtqueue `queue` of `dev` is done: its completion (raw status
    /// `status`) written if `used` > 0 (see [`completion_used`]); counted and put in its used
    /// ring.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn completed(
        &self,
        dev: usize,
        port: &Port,
        queue: u16,
        head: u16,
        status: u32,
        used: u32,
        n: &mut Notify,
    ) {
        // `port` is `dev`'s (connected, or the port a held request kept of it).
        debug_assert!(self
            .counters
            .get(dev)
            .is_some_and(|c| Arc::ptr_eq(c, &port.counters)));
        let cn = &port.counters;
        cn.completion(status);
        if used == 0 || status == Status::BadChain as u32 {
            Counters::inc(&cn.bad_chains);
        }
        n.complete_at(port, queue, head, used);
    }

    #[inline]
    fn done(&self, dev: usize, port: &Port, r: &Req, c: &Completion, written: u64, n: &mut Notify) {
        self.finish(dev, port, r, c, written, n);
    }

    /// [`Fabric::done`] with `port`'s guest memory already loaded, if the caller has it.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn done_in(
        &self,
        dev: usize,
        port: &Port,
        mem: Option<&GuestMemoryMmap>,
        r: &Req,
        c: &Completion,
        written: u64,
        n: &mut Notify,
    ) {
        match mem {
            Some(mem) => {
                self.finish_in(dev, port, mem, r, c, written, n);
            }
            None => self.done(dev, port, r, c, written, n),
        }
    }

    fn fail(&self, dev: usize, port: &Port, r: &Req, status: Status, n: &mut Notify) {
        let c = completion(status, r.req.cookie);
        self.done(dev, port, r, &c, 0, n);
    }

    /// [`Fabric::fail`] for a posted receive.
    fn fail_posted(
        &self,
        dev: usize,
        port: &Port,
        r: &posted::Posted,
        status: Status,
        n: &mut Notify,
    ) {
        self.done_posted(dev, port, r, &completion(status, r.cookie), n);
    }

    /// Complete posted receive `r` of `dev` with `c` (no bytes placed).
    fn done_posted(
        &self,
        dev: usize,
        port: &Port,
        r: &posted::Posted,
        c: &Completion,
        n: &mut Notify,
    ) {
        self.write_posted(dev, port, &port.mem.memory(), r, c, 0, n);
    }

    /// [`Fabric::write_completion`] for a posted receive.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn write_posted(
        &self,
        dev: usize,
        port: &Port,
        mem: &GuestMemoryMmap,
        r: &posted::Posted,
        c: &Completion,
        written: u64,
        n: &mut Notify,
    ) {
        let used = completion_used(r.write_comp(mem, c.as_slice()), written);
        self.completed(dev, port, r.queue, r.head, u32::from(c.status), used, n);
    }

    #[inline(always)]
    /// `req` is lent from the pass's batch: a handler that keeps the request takes it
    /// ([`Req::take`]), the eager send path only reads it.
    fn dispatch(
        &self,
        dev: usize,
        port: &Port,
        smem: Option<&GuestMemoryMmap>,
        req: &mut Req,
        acked: u64,
        n: &mut Notify,
    ) {
        match req.req.opcode {
            Opcode::QueryCaps => self.op_query_caps(dev, port, req.take(), acked, n),
            Opcode::EpOpen => self.op_ep_open(dev, port, req.take(), n),
            Opcode::EpClose => self.op_ep_close(dev, port, req.take(), n),
            Opcode::Cancel => self.op_cancel(dev, port, req.take(), n),
            Opcode::AddrCheck if self.not_here(req.req.peer) == Status::Unsupported => {
                self.addr_check_remote(dev, port, req.take(), n)
            }
            Opcode::AddrCheck => {
                let s = if self.addr_live(req.req.peer) {
                    Status::Ok
                } else {
                    Status::AddrNotAvail
                };
                self.fail(dev, port, req, s, n);
            }
            Opcode::SvcBind => self.op_svc_bind(dev, port, req.take(), n),
            Opcode::SvcResolve => self.op_svc_resolve(dev, port, req.take(), n),
            Opcode::MrReg => self.op_mr_reg(dev, port, req.take(), n),
            Opcode::MrDereg => self.op_mr_dereg(dev, port, req.take(), n),
            Opcode::MrEvent => self.op_mr_event(dev, port, req.take(), n),
            Opcode::CommitEvent => self.op_commit_event(dev, port, req.take(), n),
            Opcode::CommitReply => self.op_commit_reply(dev, port, req.take(), n),
            Opcode::Recv | Opcode::TRecv => self.op_recv(dev, port, req, n),
            Opcode::Send | Opcode::TSend if self.starts_at_once(dev, req) => {
                self.op_send(dev, port, smem, req, n)
            }
            Opcode::Send
            | Opcode::TSend
            | Opcode::RmaWrite
            | Opcode::RmaRead
            | Opcode::Atomic
            | Opcode::FetchAtomic
            | Opcode::CompareAtomic
            | Opcode::Flush => self.op_tx(dev, port, smem, req, n),
        }
    }

    #[inline]
    fn start_tx(
        &self,
        dev: usize,
        port: &Port,
        smem: Option<&GuestMemoryMmap>,
        req: &mut Req,
        n: &mut Notify,
    ) {
        match req.req.opcode {
            Opcode::Send | Opcode::TSend => self.op_send(dev, port, smem, req, n),
            Opcode::RmaWrite | Opcode::RmaRead => self.op_rma(dev, port, req, n),
            Opcode::Flush => self.op_flush(dev, port, req.take(), n),
            _ => self.op_atomic(dev, port, req, n),
        }
    }

    fn op_query_caps(&self, dev: usize, port: &Port, req: Req, acked: u64, n: &mut Notify) {
        let caps = self.caps(dev, acked);
        let need = caps.len() as u64;
        let mut c = completion(Status::Ok, req.req.cookie);
        let mut written = 0;
        if req.data.len >= need {
            if req.data.write_at(&port.mem.memory(), 0, &caps).is_err() {
                return self.fail(dev, port, &req, Status::Fault, n);
            }
            c.len = need.into();
            written = need;
        } else {
            c.status = (Status::Truncated as u32).into();
            c.olen = need.into();
        }
        self.done(dev, port, &req, &c, written, n);
    }

    /// Eager bytes buffered at `dev` (tests).
    #[cfg(test)]
    pub fn unexpected_bytes(&self, dev: usize) -> u64 {
        self.dev(dev).unexpected_bytes
    }
}

#[cfg(test)]
mod tests;
