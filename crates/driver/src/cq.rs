// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Completion queues. Progress (driven by `read`/`sread`) drains the domain's used rings and
//! dispatches each finished request to the CQ its endpoint bound for that direction.
//!
//! `sread` follows "poll first, block adaptively": it spins for a budget of the order of a
//! cross-core wakeup, then arms EVENT_IDX notifications on the rings that feed the CQ (the
//! queues of the endpoints bound to it, in the directions bound) and blocks in `ppoll(2)` on
//! the call eventfd plus the CQ's own signal eventfd (another thread's progress may deliver
//! our entries), re-checking after arming so no wakeup is lost.

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfabric_proto::{comp_flags, FabricAddr, Status};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::av::{FiAddr, FI_ADDR_NOTAVAIL};
use crate::domain::{DomainInner, Stalled};
use crate::hmem::Scatter;
use crate::lock::SpinLock;
use crate::request::{CopyOut, DataOp, Done, PendingOp, PlainOp};
use crate::virtqueue::{drain_eventfd, signal_eventfd, DeviceCompletion, Dispatch, Finished};
use crate::{data_status_errno, fi, Error, Result};

/// Environment variable fixing the `sread` spin budget in microseconds (0: block at once).
pub const SPIN_ENV: &str = "VFABRIC_SPIN_US";
const SPIN_INITIAL_NS: u64 = 20_000;
const SPIN_MIN_NS: u64 = 1_000;
const SPIN_MAX_NS: u64 = 100_000;

/// Spin policy when `VFABRIC_SPIN_US` is not set. With more than two CPUs, spin adaptively
/// (start at 20 µs; grow when the wakeup came soon after we blocked, shrink when we slept
/// long). With two CPUs or fewer the guest threads and the device's poller already outnumber
/// the cores, and measurements show spinning only delays the party we wait for, so block at
/// once (budget 0).
fn default_spin() -> (u64, Option<u64>) {
    match std::env::var(SPIN_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        Some(us) => (us * 1000, Some(us * 1000)),
        None => {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            if cpus <= 2 {
                (0, Some(0))
            } else {
                (SPIN_INITIAL_NS, None)
            }
        }
    }
}
/// Progress polls between `sched_yield`s while spinning (lets a co-located device thread run).
/// A power of two.
const SPIN_POLLS_PER_YIELD: u32 = 256;

/// How a CQ waits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WaitMode {
    /// Polled only (`FI_WAIT_NONE`): `sread` is not available.
    #[default]
    None,
    /// `sread` spins for an adaptive budget, then blocks on the domain's call eventfds.
    Blocking,
}

/// CQ attributes (`fi_cq_attr`).
#[derive(Clone, Copy, Debug)]
pub struct CqAttr {
    /// Expected number of entries (a sizing hint: entries are never dropped).
    pub size: usize,
    pub wait: WaitMode,
}

impl Default for CqAttr {
    fn default() -> Self {
        Self {
            size: 1024,
            wait: WaitMode::None,
        }
    }
}

/// A successful completion (`fi_cq_tagged_entry` plus source and received bytes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CqEntry {
    /// The `ctx` the operation was posted with.
    pub context: u64,
    /// libfabric flags: `SEND`/`RECV`, `MSG`/`TAGGED`, `REMOTE_CQ_DATA`, `CLAIM`.
    pub flags: u64,
    /// Bytes received (receives; for PEEK the message length), bytes sent (sends).
    pub len: usize,
    /// Remote CQ data (with `fi::REMOTE_CQ_DATA`).
    pub data: u64,
    pub tag: u64,
    /// Source endpoint of a received message.
    pub src: Option<FabricAddr>,
    /// Source as an index of the endpoint's AV, or `FI_ADDR_NOTAVAIL` (`fi_cq_readfrom`).
    pub src_addr: FiAddr,
    /// Received bytes of a `recv_vec`/`trecv_vec`.
    pub buf: Option<Vec<u8>>,
}

/// An error completion (`fi_cq_err_entry`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CqErrEntry {
    pub context: u64,
    pub flags: u64,
    /// Bytes placed (truncation) or transferred before the error.
    pub len: usize,
    /// Bytes that did not fit (truncation).
    pub olen: usize,
    /// Device status.
    pub status: Status,
    /// libfabric errno (positive), e.g. `fi::ETRUNC` (spec §6.7; `EAGAIN` for NO_RESOURCES,
    /// `EIO` for a failed chain, `EOTHER` for a status this driver does not know).
    pub err: i32,
    /// Raw device status value (`prov_errno`).
    pub prov_errno: i32,
    pub data: u64,
    pub tag: u64,
    pub src: Option<FabricAddr>,
    /// Bytes placed by a truncated `recv_vec`.
    pub buf: Option<Vec<u8>>,
}

enum CqEvent {
    Entry(CqEntry),
    /// Boxed: errors are rare, and a small event keeps the queue compact.
    Error(Box<CqErrEntry>),
    /// A success entry whose bytes (staged in `buf`) go to device memory when it is read.
    Staged(Box<(CqEntry, Box<Scatter>)>),
    /// A truncated receive into device memory: its placed bytes go there when it is read.
    StagedError(Box<(CqErrEntry, Box<Scatter>)>),
}

/// Why a read returned no entry, as plain data (an [`Error`] is built only when a caller
/// outside this module sees it: nothing to drop on the empty polls of a wait).
#[derive(Clone, Copy, Debug)]
enum Empty {
    /// Nothing queued (`Error::Again`).
    Again,
    /// An error entry is at the head (`Error::Avail`).
    Avail,
    /// Progress stopped (the device went away or broke a ring).
    Stalled(Stalled),
}

impl From<Empty> for Error {
    #[cold]
    fn from(e: Empty) -> Self {
        match e {
            Empty::Again => Error::Again,
            Empty::Avail => Error::Avail,
            Empty::Stalled(s) => s.into(),
        }
    }
}

type ReadResult = std::result::Result<usize, Empty>;

/// A reader's buffer that progress fills directly: a success entry for the reader's CQ is
/// written into `out` instead of being queued, as long as the CQ has nothing queued (so every
/// entry queued before it, from the same virtqueue or not, has been read) and `out` has room.
/// Entries of one virtqueue are dispatched by one drainer at a time, in ring order, so the
/// order per virtqueue holds: once one of them is queued, the ones after it are queued too.
pub(crate) struct Direct<'a> {
    cq: *const CqShared,
    out: &'a mut [CqEntry],
    at: usize,
}

impl Direct<'_> {
    /// The reader's next entry, to be filled in place with an entry bound for `cq`, or `None`
    /// if that entry must be queued.
    #[inline]
    fn slot_for(&mut self, cq: &CqShared) -> Option<&mut CqEntry> {
        if std::ptr::eq(cq, self.cq) && self.at < self.out.len() && cq.is_empty() {
            self.at += 1;
            Some(&mut self.out[self.at - 1])
        } else {
            None
        }
    }
}

/// Deliver the success entry `make` builds to `cq`: straight into the reader's next entry
/// when `direct` allows it (see [`Direct::slot_for`]), else queued. The entry is built where
/// it goes, once that is known (no temporary to copy).
#[inline(always)]
fn deliver(cq: &CqShared, direct: Option<&mut Direct<'_>>, make: impl FnOnce() -> CqEntry) {
    match direct.and_then(|d| d.slot_for(cq)) {
        Some(slot) => {
            // What the reader's entry owned goes first, so the new one is written in place.
            drop(slot.buf.take());
            // SAFETY: `slot` is a valid entry that owns nothing now: overwriting it drops
            // nothing.
            unsafe { std::ptr::write(slot, make()) };
        }
        None => cq.push_entry(make),
    }
}

/// Success entries a CQ keeps in its ring (a power of two).
const RING_ENTRIES: usize = 64;

/// A CQ's queued events, oldest first. Success entries go to a ring, where they are written
/// and read in place (one copy in, one out); every other event, and success entries while
/// anything is in `more` or the ring is full, go to `more`. So the ring only holds events
/// older than those in `more`, and the order is the ring's, then `more`'s.
struct Events {
    ring: Box<[MaybeUninit<CqEntry>; RING_ENTRIES]>,
    /// Oldest ring entry; `ring[head..head + len]` (wrapping) is initialised.
    head: usize,
    len: usize,
    more: VecDeque<CqEvent>,
}

impl Events {
    fn new(more_capacity: usize) -> Self {
        Self {
            ring: Box::new([const { MaybeUninit::uninit() }; RING_ENTRIES]),
            head: 0,
            len: 0,
            more: VecDeque::with_capacity(more_capacity),
        }
    }

    fn len(&self) -> usize {
        self.len + self.more.len()
    }

    /// Queue the success entry `make` builds (in place in the ring, usually).
    #[inline(always)]
    fn push_entry(&mut self, make: impl FnOnce() -> CqEntry) {
        if self.len < RING_ENTRIES && self.more.is_empty() {
            self.ring[(self.head + self.len) % RING_ENTRIES].write(make());
            self.len += 1;
        } else {
            self.more.push_back(CqEvent::Entry(make()));
        }
    }

    /// The oldest event, if it is a success entry in the ring.
    #[inline(always)]
    fn pop_ring(&mut self) -> Option<CqEntry> {
        if self.len == 0 {
            return None;
        }
        // SAFETY: `ring[head]` is the oldest initialised entry; it is read once, and no longer
        // counted afterwards.
        let e = unsafe { self.ring[self.head].assume_init_read() };
        self.head = (self.head + 1) % RING_ENTRIES;
        self.len -= 1;
        Some(e)
    }

    /// Move the oldest event, a success entry in the ring (`len > 0`), to `dst` in one copy
    /// (no temporary: `dst` owns nothing when it is overwritten).
    #[inline(always)]
    fn pop_ring_into(&mut self, dst: &mut CqEntry) {
        debug_assert!(self.len > 0);
        // What `dst` owned goes after the copy (a reader's buffer usually holds no bytes).
        let old = dst.buf.take();
        // SAFETY: `ring[head]` is the oldest initialised entry (`len > 0`); it is moved out
        // once and no longer counted afterwards. `dst` owns nothing now (its only owning
        // field was just taken), so overwriting it drops nothing.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ring[self.head].as_ptr(), dst, 1);
        }
        self.head = (self.head + 1) % RING_ENTRIES;
        self.len -= 1;
        drop(old);
    }

    /// The oldest event, if it is in `more` (the ring is empty).
    fn front_of_more(&self) -> Option<&CqEvent> {
        if self.len > 0 {
            return None;
        }
        self.more.front()
    }

    /// Put `ev` before every queued event.
    fn push_front(&mut self, ev: CqEvent) {
        // The ring's entries are older than those in `more`: they go to its front first,
        // youngest first.
        while self.len > 0 {
            self.len -= 1;
            // SAFETY: the youngest initialised entry, read once and no longer counted.
            let e = unsafe { self.ring[(self.head + self.len) % RING_ENTRIES].assume_init_read() };
            self.more.push_front(CqEvent::Entry(e));
        }
        self.more.push_front(ev);
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        while self.pop_ring().is_some() {}
    }
}

/// State shared between a CQ handle and the requests that complete into it.
pub(crate) struct CqShared {
    events: SpinLock<Events>,
    /// `events.len()`, kept under the lock, read without it (emptiness checks).
    queued: AtomicUsize,
    /// Written when an entry arrives while a thread blocks in `sread` (owned by `_signal`).
    signal_fd: RawFd,
    _signal: EventFd,
    waiters: AtomicUsize,
    /// Queues whose completions can come here (bit `i`: queue `i`, set by
    /// `Endpoint::bind_cq`): the only ones a sleeper on this CQ arms.
    pub(crate) feeders: AtomicU64,
}

impl CqShared {
    /// Queue an event other than a success entry.
    fn push(&self, ev: CqEvent) {
        {
            let mut events = self.events.lock();
            events.more.push_back(ev);
            // SeqCst: ordered before the waiter check below, as the waiter's count is before
            // its emptiness check (no lost wakeup).
            self.queued.store(events.len(), Ordering::SeqCst);
        }
        self.signal_waiters();
    }

    /// Queue the success entry `make` builds (in place in the ring, usually, under the lock).
    #[inline(always)]
    fn push_entry(&self, make: impl FnOnce() -> CqEntry) {
        {
            let mut events = self.events.lock();
            events.push_entry(make);
            // SeqCst: as in `push`.
            self.queued.store(events.len(), Ordering::SeqCst);
        }
        self.signal_waiters();
    }

    #[inline(always)]
    fn signal_waiters(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _ = signal_eventfd(self.signal_fd);
        }
    }
    #[inline]
    fn is_empty(&self) -> bool {
        self.queued.load(Ordering::SeqCst) == 0
    }
}

/// A completion queue (`fid_cq`). `Send + Sync`; entries are delivered in the order the
/// device completed them on each virtqueue.
pub struct CompletionQueue {
    pub(crate) domain: Arc<DomainInner>,
    pub(crate) shared: Arc<CqShared>,
    attr: CqAttr,
    spin_ns: AtomicU64,
    fixed_spin_ns: Option<u64>,
    /// `signal_fd` was taken: every entry writes the signal.
    always_signal: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("attr", &self.attr)
            .field("queued", &self.queued())
            .finish()
    }
}

/// Longest single wait passed to the kernel (a `time_t` that cannot overflow).
const MAX_WAIT_SECS: u64 = 1 << 32;

/// A wait's remaining time in the form `ppoll` takes and writes back.
pub(crate) fn timespec_of(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs().min(MAX_WAIT_SECS) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

fn duration_of(t: &libc::timespec) -> Duration {
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

fn is_elapsed(t: &libc::timespec) -> bool {
    t.tv_sec <= 0 && t.tv_nsec <= 0
}

/// A blocking pass of `sread` returned without sleeping (entries pending for another
/// consumer): the kernel did not count time then, so the clock does (from the first such
/// pass, `awake_since`), and the thread yields before the next pass.
#[cold]
fn count_awake(left: Option<&mut libc::timespec>, awake_since: &mut Option<(Instant, Duration)>) {
    if let Some(l) = left {
        match *awake_since {
            None => *awake_since = Some((Instant::now(), duration_of(l))),
            Some((since, at_start)) => {
                *l = timespec_of(at_start.saturating_sub(since.elapsed()));
            }
        }
    }
    std::thread::yield_now();
}

/// Polls between clock reads while spinning in `sread`.
const SPIN_POLLS_PER_CLOCK: u32 = 16;

impl CompletionQueue {
    pub(crate) fn new(domain: Arc<DomainInner>, attr: CqAttr) -> Result<Self> {
        let (initial_spin_ns, fixed_spin_ns) = default_spin();
        let signal = EventFd::new(EFD_NONBLOCK)?;
        Ok(Self {
            domain,
            shared: Arc::new(CqShared {
                events: SpinLock::new(Events::new(
                    attr.size.saturating_sub(RING_ENTRIES).min(1 << 16),
                )),
                queued: AtomicUsize::new(0),
                signal_fd: signal.as_raw_fd(),
                _signal: signal,
                waiters: AtomicUsize::new(0),
                feeders: AtomicU64::new(0),
            }),
            attr,
            spin_ns: AtomicU64::new(initial_spin_ns),
            fixed_spin_ns,
            always_signal: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn attr(&self) -> CqAttr {
        self.attr
    }

    /// `fi_cq_read`: drive progress, then move up to `max` entries to `out`. `Err(Again)` if
    /// none, `Err(Avail)` if an error entry is at the head (call [`CompletionQueue::readerr`]).
    pub fn read(&self, out: &mut Vec<CqEntry>, max: usize) -> Result<usize> {
        self.try_read(out, max).map_err(Error::from)
    }

    fn try_read(&self, out: &mut Vec<CqEntry>, max: usize) -> ReadResult {
        let progressed = self.domain.progress_fast();
        match self.take(max, |e| out.push(e)) {
            // Entries already delivered are returned before a transport error.
            Err(Empty::Again) => Err(progressed.map_or_else(Empty::Stalled, |_| Empty::Again)),
            r => r,
        }
    }

    /// `fi_cq_read` into a slice: fills `out[..n]`, returns `n` (errors as for `read`).
    /// Allocates nothing.
    /// Inline: a read of an entry already queued is the lock and the copy, in the caller.
    #[inline(always)]
    pub fn read_into(&self, out: &mut [CqEntry]) -> Result<usize> {
        self.try_read_into(out).map_err(Error::from)
    }

    #[inline(always)]
    fn try_read_into(&self, out: &mut [CqEntry]) -> ReadResult {
        match self.take_into(out) {
            Err(Empty::Again) => self.progress_read_into(out),
            r => r,
        }
    }

    /// Entries queued already (by an earlier pass, e.g. a send's completion found while
    /// waiting for a receive), into `out`: they come before anything a pass would find, so
    /// they are returned without one. A stopped domain's error follows once they are read.
    /// `Again` (without a lock) if none are queued. Success entries in the ring (the common
    /// case) go straight from it to `out`, one copy each.
    #[inline(always)]
    fn take_into(&self, out: &mut [CqEntry]) -> ReadResult {
        if out.is_empty() || self.shared.queued.load(Ordering::Relaxed) == 0 {
            return Err(Empty::Again);
        }
        let mut events = self.shared.events.lock();
        if !events.more.is_empty() {
            drop(events);
            let mut n = 0;
            return self.take_queued(out.len(), |e| {
                out[n] = e;
                n += 1;
            });
        }
        let mut n = 0;
        while n < out.len() && events.len > 0 {
            events.pop_ring_into(&mut out[n]);
            n += 1;
        }
        self.shared.queued.store(events.len, Ordering::SeqCst);
        if n == 0 {
            Err(Empty::Again)
        } else {
            Ok(n)
        }
    }

    /// [`CompletionQueue::try_read_into`] with nothing queued: a progress pass that writes the
    /// reader's entries in place.
    #[inline(never)]
    fn progress_read_into(&self, out: &mut [CqEntry]) -> ReadResult {
        self.pass_into(out)
    }

    /// The progress pass of a read into `out` (see [`CompletionQueue::progress_read_into`]),
    /// inline: the wait of `sread_into` runs it in its own frame after every wakeup.
    #[inline(always)]
    fn pass_into(&self, out: &mut [CqEntry]) -> ReadResult {
        let mut direct = Direct {
            cq: Arc::as_ptr(&self.shared),
            out,
            at: 0,
        };
        let progressed = self.domain.progress_into(Some(&mut direct));
        let Direct { out, at, .. } = direct;
        match self.take_into(&mut out[at..]) {
            Ok(k) => Ok(at + k),
            // Entries delivered directly come before an error entry queued after them.
            Err(Empty::Again | Empty::Avail) if at > 0 => Ok(at),
            Err(Empty::Again) => Err(progressed.map_or_else(Empty::Stalled, |_| Empty::Again)),
            r => r,
        }
    }

    /// Read one entry (errors as for `read`). Allocates nothing.
    pub fn read_one(&self) -> Result<CqEntry> {
        let mut one = [CqEntry::default()];
        self.read_into(&mut one)?;
        let [e] = one;
        Ok(e)
    }

    /// Move up to `max` queued entries to `put`, stopping at an error entry.
    #[inline(always)]
    fn take(&self, max: usize, mut put: impl FnMut(CqEntry)) -> ReadResult {
        if max == 0 || self.shared.queued.load(Ordering::Relaxed) == 0 {
            // Nothing queued as of our own progress: no lock.
            return Err(Empty::Again);
        }
        let mut events = self.shared.events.lock();
        if !events.more.is_empty() {
            drop(events);
            return self.take_queued(max, put);
        }
        // Only success entries, all in the ring: nothing to stop at.
        let mut n = 0;
        while n < max {
            let Some(e) = events.pop_ring() else {
                break;
            };
            put(e);
            n += 1;
        }
        self.shared.queued.store(events.len(), Ordering::SeqCst);
        if n == 0 {
            Err(Empty::Again)
        } else {
            Ok(n)
        }
    }

    /// [`CompletionQueue::take`] when events other than success entries are queued: out of
    /// line, so the common read carries none of it.
    #[inline(never)]
    fn take_queued(&self, max: usize, mut put: impl FnMut(CqEntry)) -> ReadResult {
        let mut events = self.shared.events.lock();
        let mut n = 0;
        // The ring's success entries first, each copied once, straight to `put`.
        while n < max {
            match events.pop_ring() {
                Some(e) => {
                    put(e);
                    n += 1;
                }
                None => break,
            }
        }
        // Then `more` (the ring is empty now, or `max` reached).
        while n < max {
            // Popped and matched once: the entry moves straight to `put`.
            match events.more.pop_front() {
                Some(CqEvent::Entry(e)) => {
                    put(e);
                    n += 1;
                }
                Some(CqEvent::Staged(st)) => {
                    self.shared.queued.store(events.len(), Ordering::SeqCst);
                    // The application's copy functions run outside the CQ lock (they may be
                    // slow, or call into this driver).
                    drop(events);
                    return self.deliver_staged(*st, n, put);
                }
                Some(error) => {
                    // Error entries stay at the head for `readerr` (the deque keeps the room
                    // the pop freed: no allocation; the ring is empty).
                    events.more.push_front(error);
                    if n == 0 {
                        return Err(Empty::Avail);
                    }
                    break;
                }
                None => break,
            }
        }
        self.shared.queued.store(events.len(), Ordering::SeqCst);
        if n == 0 {
            Err(Empty::Again)
        } else {
            Ok(n)
        }
    }

    /// Move the staged bytes of `e` to their device memory, then hand `e` to `put` (the
    /// `n + 1`-th entry of this read). A failed copy turns it into an error entry at the head
    /// (the copy function's errno, status `Fault`): the application learns its data is not
    /// there.
    fn deliver_staged(
        &self,
        (mut e, scatter): (CqEntry, Box<Scatter>),
        n: usize,
        mut put: impl FnMut(CqEntry),
    ) -> ReadResult {
        let bytes = e.buf.take().unwrap_or_default();
        match scatter.run(&bytes) {
            Ok(()) => {
                put(e);
                Ok(n + 1)
            }
            Err(err) => {
                tracing::warn!(context = e.context, %err, "device-memory copy of a completion failed");
                let mut events = self.shared.events.lock();
                events.push_front(CqEvent::Error(Box::new(CqErrEntry {
                    context: e.context,
                    flags: e.flags,
                    len: 0,
                    olen: 0,
                    status: Status::Fault,
                    err: err.errno(),
                    prov_errno: Status::Fault as i32,
                    data: e.data,
                    tag: e.tag,
                    src: e.src,
                    buf: None,
                })));
                self.shared.queued.store(events.len(), Ordering::SeqCst);
                if n == 0 {
                    Err(Empty::Avail)
                } else {
                    Ok(n)
                }
            }
        }
    }

    /// `fi_cq_readerr`: pop the error entry at the head, if any.
    pub fn readerr(&self) -> Option<CqErrEntry> {
        let mut events = self.shared.events.lock();
        if let Some(CqEvent::StagedError(_)) = events.front_of_more() {
            let Some(CqEvent::StagedError(st)) = events.more.pop_front() else {
                unreachable!()
            };
            self.shared.queued.store(events.len(), Ordering::SeqCst);
            drop(events);
            let (mut e, scatter) = *st;
            // A truncated receive delivers what was placed (outside the lock, as above).
            let bytes = e.buf.take().unwrap_or_default();
            if let Err(err) = scatter.run(&bytes) {
                tracing::warn!(context = e.context, %err, "device-memory copy of a truncated receive failed");
            }
            return Some(e);
        }
        if let Some(CqEvent::Error(_)) = events.front_of_more() {
            let Some(CqEvent::Error(e)) = events.more.pop_front() else {
                unreachable!()
            };
            self.shared.queued.store(events.len(), Ordering::SeqCst);
            return Some(*e);
        }
        None
    }

    /// Queue an error entry produced above the device (e.g. a provider noticing that a peer
    /// went away); readers see it as any other error entry.
    pub fn push_error(&self, e: CqErrEntry) {
        self.shared.push(CqEvent::Error(Box::new(e)));
    }

    /// Entries (success and error) queued, without driving progress.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::SeqCst)
    }

    /// `fi_cq_sread`: like `read`, but waits up to `timeout` (forever if `None`) for at least
    /// one entry. Spins for a budget, then blocks. The budget is `VFABRIC_SPIN_US` if set;
    /// otherwise adaptive (1–100 µs) on machines with more than two CPUs and 0 (block at once)
    /// on smaller ones. Returns `Err(Timeout)` on timeout (libfabric reports that as
    /// `-FI_EAGAIN`).
    pub fn sread(
        &self,
        out: &mut Vec<CqEntry>,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<usize> {
        self.wait_for(timeout, |cq| cq.try_read(out, max))
    }

    /// `fi_cq_sread` into a slice (as [`CompletionQueue::read_into`]; waits as
    /// [`CompletionQueue::sread`]). Allocates nothing.
    pub fn sread_into(&self, out: &mut [CqEntry], timeout: Option<Duration>) -> Result<usize> {
        self.wait_for(
            timeout,
            #[inline(always)]
            |cq| match cq.take_into(out) {
                Err(Empty::Again) => cq.pass_into(out),
                r => r,
            },
        )
    }

    /// Repeat `attempt` until it returns something other than `Again`: spin for the budget,
    /// then sleep on the domain's call eventfds. The clock is read only while spinning (every
    /// few polls) and, in adaptive mode, around sleeps; the timeout itself is kept by the
    /// kernel, which writes the time left back into `left` after every sleep.
    fn wait_for(
        &self,
        timeout: Option<Duration>,
        mut attempt: impl FnMut(&Self) -> ReadResult,
    ) -> Result<usize> {
        if self.attr.wait != WaitMode::Blocking {
            return Err(Error::Unsupported(
                "sread on a CQ opened with WaitMode::None".into(),
            ));
        }
        let feeders = self.shared.feeders.load(Ordering::Relaxed);
        let budget = self
            .fixed_spin_ns
            .unwrap_or_else(|| self.spin_ns.load(Ordering::Relaxed));
        // A read before the phases below only for entries already queued or a stopped domain
        // (whose error it returns): polling starts with a read anyway, and a wait usually
        // starts before its completion exists — the blocking path arms the rings and then
        // re-checks them, so a completion already there costs no sleep, only the arming.
        if !self.shared.is_empty() || self.domain.is_stalled() {
            match attempt(self) {
                Err(Empty::Again) => {}
                r => return r.map_err(Error::from),
            }
        }
        let mut left = timeout.map(timespec_of);
        // Phase 1: poll.
        if budget > 0 {
            if let Some(r) = self.spin(budget, timeout, &mut left, &mut attempt) {
                return r;
            }
        }
        // Phase 2: block.
        let adaptive = self.fixed_spin_ns.is_none();
        // Set when a pass returned without sleeping (entries pending for another consumer):
        // the kernel then did not count time, so the clock does.
        let mut awake_since: Option<(Instant, Duration)> = None;
        loop {
            if left.as_ref().is_some_and(is_elapsed) {
                return Err(Error::Timeout);
            }
            self.shared.waiters.fetch_add(1, Ordering::SeqCst);
            let blocked_at = adaptive.then(Instant::now);
            let r = if self.shared.is_empty() {
                self.domain
                    .block_for(left.as_mut(), Some(self.signal_extra()), feeders)
            } else {
                Ok(false)
            };
            self.shared.waiters.fetch_sub(1, Ordering::SeqCst);
            let slept = r?;
            match attempt(self) {
                Err(Empty::Again) => {}
                r => {
                    if let Some(b) = blocked_at {
                        self.adapt_spin(b.elapsed());
                    }
                    return r.map_err(Error::from);
                }
            }
            if slept {
                awake_since = None;
            } else {
                count_awake(left.as_mut(), &mut awake_since);
            }
        }
    }

    /// Phase 1 of [`CompletionQueue::wait_for`]: repeat `attempt` for `budget` ns (or up to
    /// `timeout`), reading the clock every few polls; `None` once the budget is spent, with
    /// `left` set to the time that remains. Out of line: with no budget (two CPUs or fewer) it
    /// is never run.
    #[inline(never)]
    fn spin(
        &self,
        budget: u64,
        timeout: Option<Duration>,
        left: &mut Option<libc::timespec>,
        attempt: &mut impl FnMut(&Self) -> ReadResult,
    ) -> Option<Result<usize>> {
        let start = Instant::now();
        let spin = Duration::from_nanos(budget);
        let spin = timeout.map_or(spin, |t| t.min(spin));
        let mut polls = 0u32;
        loop {
            match attempt(self) {
                Err(Empty::Again) => {}
                r => return Some(r.map_err(Error::from)),
            }
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(SPIN_POLLS_PER_CLOCK) && start.elapsed() >= spin {
                break;
            }
            if polls & (SPIN_POLLS_PER_YIELD - 1) == 0 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        if let Some(t) = timeout {
            *left = Some(timespec_of(t.saturating_sub(start.elapsed())));
        }
        None
    }

    /// Grow the spin budget when the event arrived soon after we blocked (spinning a little
    /// longer would have caught it), shrink it when we slept long (spinning was wasted).
    fn adapt_spin(&self, slept: Duration) {
        if self.fixed_spin_ns.is_some() {
            return;
        }
        let cur = self.spin_ns.load(Ordering::Relaxed);
        let slept = slept.as_nanos() as u64;
        let next = if slept < SPIN_MAX_NS {
            (cur * 2).min(SPIN_MAX_NS)
        } else if slept > 4 * SPIN_MAX_NS {
            (cur / 2).max(SPIN_MIN_NS)
        } else {
            cur
        };
        self.spin_ns.store(next, Ordering::Relaxed);
    }

    /// The CQ's signal eventfd, made pollable for an `FI_WAIT_FD` consumer: from this call on,
    /// every entry that arrives writes it (the C provider's `fi_control(FI_GETWAIT)`). Pair
    /// with [`CompletionQueue::drain_signal`] before reading and
    /// [`CompletionQueue::wait_device`] in a progress thread.
    pub fn signal_fd(&self) -> RawFd {
        if !self
            .always_signal
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            // One permanent waiter: `push` writes the eventfd for every entry.
            self.shared.waiters.fetch_add(1, Ordering::SeqCst);
        }
        self.shared.signal_fd
    }

    /// The signal eventfd for a sleeper: reset when it wakes it, unless an `FI_WAIT_FD`
    /// consumer owns it (it resets it itself, and wants it readable while entries wait).
    fn signal_extra(&self) -> crate::domain::Extra {
        crate::domain::Extra {
            fd: self.shared.signal_fd,
            reset: !self.always_signal.load(Ordering::Relaxed),
        }
    }

    /// Consume pending signal writes (call before `read`; re-signals if entries remain queued
    /// after it, see [`CompletionQueue::resignal_if_queued`]).
    pub fn drain_signal(&self) {
        drain_eventfd(self.shared.signal_fd);
    }

    /// Write the signal if entries are still queued (keeps a polled fd readable).
    pub fn resignal_if_queued(&self) {
        if !self.shared.is_empty() {
            let _ = signal_eventfd(self.shared.signal_fd);
        }
    }

    /// Block until the device completes something on this CQ's domain or `timeout` passes,
    /// then drive progress (for a provider progress thread behind `FI_WAIT_FD`).
    pub fn wait_device(&self, timeout: Duration) -> Result<()> {
        let mut left = timespec_of(timeout);
        self.domain
            .block_for(Some(&mut left), None, crate::domain::ALL_QUEUES)?;
        self.domain.progress().map(|_| ())
    }

    /// Current `sread` spin budget.
    pub fn spin_budget(&self) -> Duration {
        Duration::from_nanos(
            self.fixed_spin_ns
                .unwrap_or_else(|| self.spin_ns.load(Ordering::Relaxed)),
        )
    }
}

/// How progress delivers the requests of a drained queue to their CQs (in used-ring order per
/// queue): success entries for the reader's CQ straight into its buffer when `direct` allows.
pub(crate) struct Deliver<'a, 'b> {
    pub domain: &'a DomainInner,
    pub direct: Option<&'a mut Direct<'b>>,
}

impl Dispatch<PendingOp> for Deliver<'_, '_> {
    /// A plain send or receive that succeeded (see [`DataOp::plain`]): its entry is all there
    /// is to deliver. Inlined into the drain loop: the request's fields are read where the
    /// drain has them.
    #[inline(always)]
    fn fast(&mut self, op: &PendingOp, c: &DeviceCompletion) -> bool {
        // Only a plain record, which owns nothing, is delivered here (see `Dispatch::fast`).
        let PendingOp::Plain(op) = op else {
            return false;
        };
        // Each field is read once (and what is read is what is checked and reported).
        let (cflags, len) = (c.flags(), c.len());
        if !is_plain_success(op, c.status(), cflags, len) {
            return false;
        }
        complete_plain(op, c, (cflags, len), self.direct.as_deref_mut());
        true
    }

    #[cold]
    fn broken(&mut self, index: u16) {
        self.domain.queue_broke(index);
    }

    fn finished(&mut self, f: Done<'_>) {
        match f.op {
            PendingOp::Data(_) | PendingOp::Plain(_) => {
                complete_data_general(f, self.direct.as_deref_mut())
            }
            _ => complete_other(self.domain, f),
        }
    }
}

/// Control, MR_EVENT and commit requests: rare, kept out of the drain loop.
#[cold]
#[inline(never)]
fn complete_other(domain: &DomainInner, f: Done<'_>) {
    match f.op {
        PendingOp::Data(_) | PendingOp::Plain(_) => {}
        PendingOp::Control { .. } => crate::control::complete_control(domain, f),
        PendingOp::MrEvent => crate::rma::complete_event(domain, f),
        PendingOp::CommitEvent { .. } => crate::commit::complete_event(domain, f),
        PendingOp::CommitReply => crate::commit::complete_reply(f),
    }
}

/// Does `c` complete the plain request `op` (see [`DataOp::plain`]) successfully, with
/// nothing to copy, check or remember beyond the CQ entry itself?
#[inline(always)]
fn is_plain_success(op: &PlainOp, status: u32, cflags: u32, len: u64) -> bool {
    status == Status::Ok as u32
        && cflags & comp_flags::REMOTE_WRITE == 0
        && (!op.is_recv || len as usize <= op.rx_len)
}

/// A plain success on an endpoint whose state (`state`, not 0) is closed or has counters:
/// whether its entry is still delivered (not if closed); the bound counters count it.
#[cold]
#[inline(never)]
fn plain_state_allows(op: &PlainOp, state: u8) -> bool {
    if state & crate::endpoint::EP_CLOSED != 0 {
        return false;
    }
    op.ep.count_bound(op.fi_flags, true);
    true
}

/// The `fi_cq_tagged_entry` flags a completion's `comp_flags` add to its operation's own.
#[inline(always)]
fn entry_flags(cflags: u32) -> u64 {
    if cflags & (comp_flags::REMOTE_CQ_DATA | comp_flags::TAGGED | comp_flags::CLAIMED) == 0 {
        return 0;
    }
    let mut flags = 0;
    if cflags & comp_flags::REMOTE_CQ_DATA != 0 {
        flags |= fi::REMOTE_CQ_DATA;
    }
    if cflags & comp_flags::TAGGED != 0 {
        flags |= fi::TAGGED;
    }
    if cflags & comp_flags::CLAIMED != 0 {
        flags |= fi::CLAIM;
    }
    flags
}

/// The common completion: a plain send or receive that succeeded. Same entry as
/// [`complete_data_general`] gives for it, with none of the checks that cannot apply.
#[inline(always)]
fn complete_plain(
    op: &PlainOp,
    c: &DeviceCompletion,
    (cflags, len): (u32, u64),
    direct: Option<&mut Direct<'_>>,
) {
    // One load for both rare cases: a closed endpoint (fi_close semantics: its outstanding
    // operations are discarded) and bound counters.
    let state = op.ep.state();
    if state != 0 && !plain_state_allows(op, state) {
        return;
    }
    let Some(cq) = op.cq else {
        return;
    };
    let cq: &CqShared = &cq;
    // The source's AV index first: its look-up may take the AV's lock, never under the CQ's.
    let (src, src_addr) = if op.is_recv {
        let s = FabricAddr::from_wire(&c.src());
        (Some(s), op.ep.source_addr(op.src_addr, &s))
    } else {
        (None, FI_ADDR_NOTAVAIL)
    };
    // The rest is built once its place is known (the reader's slice or the CQ's ring), in
    // place.
    deliver(cq, direct, || {
        let flags = op.fi_flags | entry_flags(cflags);
        let data = if cflags & comp_flags::REMOTE_CQ_DATA != 0 {
            c.data()
        } else {
            0
        };
        CqEntry {
            context: op.context,
            flags,
            len: len as usize,
            data,
            tag: c.tag(),
            src,
            src_addr,
            buf: None,
        }
    });
}

/// Any data completion but the plain success of [`Deliver::fast`]: errors, device faults,
/// copy-outs, device memory, claims.
#[cold]
#[inline(never)]
fn complete_data_general(f: Done<'_>, direct: Option<&mut Direct<'_>>) {
    let Finished {
        cookie,
        op,
        completion,
        device_fault,
        inline_data,
    } = f;
    if let PendingOp::Plain(_) = op {
        // Not a plain success: handled by the general record of the same request.
        if let PendingOp::Plain(p) = std::mem::replace(op, PendingOp::CommitReply) {
            *op = PendingOp::Data(p.into_data());
        }
    }
    let PendingOp::Data(op) = op else {
        return;
    };
    if op.ep.is_closed() {
        // fi_close semantics: the endpoint's outstanding operations are discarded, and its
        // buffers may already be gone, so nothing is copied out.
        return;
    }
    let none;
    let c = match completion {
        Some(c) => c,
        None => {
            none = vfabric_proto::Completion::default();
            &none
        }
    };
    let raw_status = u32::from(c.status);
    // A used element of length 0 (no completion) is a failed request: FI_EIO like BAD_CHAIN.
    let known = Status::from_u32(raw_status);
    let mut status = if completion.is_none() {
        Status::BadChain
    } else {
        known.unwrap_or(Status::Invalid)
    };
    if device_fault {
        status = Status::Fault;
    }
    // A status this driver does not know is an error reported as FI_EOTHER (spec §6.7).
    let unknown_status = completion.is_some() && known.is_none() && !device_fault;
    let dev_len = u64::from(c.len) as usize;
    let mut len = dev_len;
    let cflags = u32::from(c.flags);
    // A writedata notification consumed the receive: `len` is the bytes the RMA wrote into
    // the target region, none were placed in the receive buffer.
    let remote_write = op.is_recv && cflags & comp_flags::REMOTE_WRITE != 0;
    if op.is_recv
        && !remote_write
        && !op.peek
        && matches!(status, Status::Ok | Status::Truncated)
        && dev_len > op.rx_len
    {
        tracing::warn!(
            dev_len,
            posted = op.rx_len,
            "device placed more bytes than posted"
        );
        status = Status::Fault;
        len = 0;
    }
    let olen = u64::from(c.olen) as usize;
    let mut flags = op.fi_flags;
    if remote_write {
        flags = fi::RMA | fi::REMOTE_WRITE;
    }
    if !op.is_recv && op.rx_len > 0 && status == Status::Ok && len > op.rx_len {
        tracing::warn!(
            len,
            posted = op.rx_len,
            "device returned more bytes than asked"
        );
        status = Status::Fault;
    }
    flags |= entry_flags(cflags);
    // A refused commit carries the target handler's value (spec §6.17.3); a gone peer of a
    // directed receive says whether it was closed in order (`proto::PEER_CLOSED`, §6.9.1).
    let data = if cflags & comp_flags::REMOTE_CQ_DATA != 0
        || matches!(status, Status::CommitRefused | Status::PeerGone)
    {
        c.data.into()
    } else {
        0
    };
    let tag = u64::from(c.tag);

    let mut buf = None;
    let (src, src_addr) = if op.is_recv && matches!(status, Status::Ok | Status::Truncated) {
        let placed = if op.peek || remote_write {
            0
        } else {
            len.min(op.rx_len)
        };
        copy_out(op, placed, inline_data, &mut buf);
        let s = FabricAddr::from_wire(&c.src);
        (Some(s), op.ep.source_addr(op.src_addr, &s))
    } else if !op.is_recv && op.rx_len > 0 && status == Status::Ok {
        // RMA_READ / fetching atomics: results come back like received bytes.
        copy_out(op, len.min(op.rx_len), inline_data, &mut buf);
        (None, FI_ADDR_NOTAVAIL)
    } else {
        (None, FI_ADDR_NOTAVAIL)
    };
    if op.record_claim && status == Status::Ok {
        op.ep.record_claim(op.context, cookie);
    }
    let cq = op.ep.cq(op.is_recv);
    // Device-memory destinations: the bytes go there when the entry is read; with no entry
    // to read (unselected under selective completion) now, before counters move.
    let mut hmem = op.hmem.take();
    let mut copied = true;
    let reported = if status == Status::Ok {
        cq.is_some() && op.report_success
    } else {
        cq.is_some() && op.report_errors
    };
    if let Some(sc) = hmem.as_ref().filter(|_| !reported && status == Status::Ok) {
        if let Err(err) = sc.run(buf.as_deref().unwrap_or_default()) {
            // No entry to turn into an error: the counter's error count says it.
            tracing::warn!(context = op.context, %err, "device-memory copy failed");
            copied = false;
        }
        hmem = None;
    }
    op.ep.count(op.fi_flags, status == Status::Ok && copied);

    if status == Status::Ok {
        if let (Some(cq), Some(sc)) = (cq.filter(|_| op.report_success), hmem) {
            cq.push(CqEvent::Staged(Box::new((
                CqEntry {
                    context: op.context,
                    flags,
                    len,
                    data,
                    tag,
                    src,
                    src_addr,
                    buf,
                },
                sc,
            ))));
        } else if let Some(cq) = cq.filter(|_| op.report_success) {
            deliver(cq, direct, || CqEntry {
                context: op.context,
                flags,
                len,
                data,
                tag,
                src,
                src_addr,
                buf,
            });
        }
    } else if let Some(cq) = cq.filter(|_| op.report_errors) {
        let e = CqErrEntry {
            context: op.context,
            flags,
            len: if status == Status::Truncated { len } else { 0 },
            olen: if status == Status::Truncated { olen } else { 0 },
            status,
            err: if unknown_status {
                fi::EOTHER
            } else {
                data_status_errno(status)
            },
            prov_errno: if unknown_status {
                raw_status as i32
            } else {
                status as i32
            },
            data,
            tag,
            src,
            buf,
        };
        match hmem {
            // A truncated receive into device memory delivers what was placed when read.
            Some(sc) if status == Status::Truncated && op.is_recv => {
                cq.push(CqEvent::StagedError(Box::new((e, sc))))
            }
            _ => cq.push(CqEvent::Error(Box::new(e))),
        }
    } else {
        tracing::warn!(
            ?status,
            context = op.context,
            "operation without a CQ failed"
        );
    }
}

/// Copy received bytes from the inline slot copy or the bounce buffer to their destination.
#[inline]
fn copy_out(op: &DataOp, placed: usize, inline: &[u8], buf: &mut Option<Vec<u8>>) {
    // Zero-copy receives (the common case) have nothing to move.
    if !matches!(op.copy_out, CopyOut::None) {
        copy_out_to(op, placed, inline, buf);
    }
}

fn copy_out_to(op: &DataOp, placed: usize, inline: &[u8], buf: &mut Option<Vec<u8>>) {
    let src: &[u8] = if let Some(b) = &op.bounce {
        // SAFETY: the bounce allocation holds at least `rx_len` ≥ `placed` bytes, the device
        // finished writing them (the chain is back in the used ring), and we own it.
        unsafe { std::slice::from_raw_parts(b.ptr(), placed.min(b.capacity())) }
    } else {
        &inline[..placed.min(inline.len())]
    };
    match &op.copy_out {
        CopyOut::None => {}
        CopyOut::Vec => *buf = Some(src.to_vec()),
        CopyOut::Raw(ptr, len) => scatter(src, &[(*ptr, *len)]),
        CopyOut::Scatter(targets) => scatter(src, targets.as_slice()),
    }
}

/// Copy `src` across `targets` in order.
fn scatter(src: &[u8], targets: &[(usize, usize)]) {
    let mut off = 0;
    for &(ptr, len) in targets {
        if off >= src.len() {
            break;
        }
        let n = len.min(src.len() - off);
        // SAFETY: the caller of recv_raw/recvmsg guaranteed `ptr..ptr+len` stays valid and
        // unaliased until the operation completes; the endpoint is not closed (checked by the
        // caller), and shared-buffer targets are kept alive by the request.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(off), ptr as *mut u8, n) };
        off += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(context: u64) -> CqEntry {
        CqEntry {
            context,
            buf: Some(vec![context as u8]),
            ..CqEntry::default()
        }
    }

    fn error(context: u64) -> CqEvent {
        CqEvent::Error(Box::new(CqErrEntry {
            context,
            flags: 0,
            len: 0,
            olen: 0,
            status: Status::Fault,
            err: fi::EIO,
            prov_errno: 0,
            data: 0,
            tag: 0,
            src: None,
            buf: None,
        }))
    }

    /// Contexts in the order a reader gets them: success entries as they are, an error as its
    /// context plus 1000.
    fn drain(ev: &mut Events) -> Vec<u64> {
        let mut got = Vec::new();
        loop {
            if let Some(e) = ev.pop_ring() {
                got.push(e.context);
                continue;
            }
            match ev.more.pop_front() {
                Some(CqEvent::Entry(e)) => got.push(e.context),
                Some(CqEvent::Error(e)) => got.push(e.context + 1000),
                Some(_) => unreachable!(),
                None => return got,
            }
        }
    }

    #[test]
    fn queued_entries_move_into_the_readers_slice_in_place() {
        let mut ev = Events::new(0);
        ev.push_entry(|| entry(1));
        ev.push_entry(|| entry(2));
        // The reader's first entry still owns bytes: they go (Miri/ASan-visible), not leak.
        let mut out = [entry(100), CqEntry::default()];
        for dst in &mut out {
            ev.pop_ring_into(dst);
        }
        let got: Vec<_> = out.iter().map(|e| (e.context, e.buf.clone())).collect();
        assert_eq!(got, vec![(1, Some(vec![1])), (2, Some(vec![2]))]);
        assert_eq!(ev.len(), 0);
        // Around the ring, oldest first.
        for i in 0..2 * RING_ENTRIES as u64 {
            ev.push_entry(|| entry(i));
            ev.push_entry(|| entry(i + 1000));
            ev.pop_ring_into(&mut out[0]);
            ev.pop_ring_into(&mut out[1]);
            assert_eq!((out[0].context, out[1].context), (i, i + 1000));
        }
        assert_eq!(ev.len(), 0);
    }

    #[test]
    fn events_keep_their_order_across_the_ring_and_the_deque() {
        let mut ev = Events::new(0);
        // Past the ring's capacity: the rest waits in the deque, behind the ring.
        for i in 0..RING_ENTRIES as u64 + 3 {
            ev.push_entry(|| entry(i));
        }
        assert_eq!(ev.len(), RING_ENTRIES + 3);
        assert_eq!(
            drain(&mut ev),
            (0..RING_ENTRIES as u64 + 3).collect::<Vec<_>>()
        );
        assert_eq!(ev.len(), 0);

        // An error queued after entries: entries behind it queue behind it too, also once the
        // ring has room again.
        ev.push_entry(|| entry(1));
        ev.more.push_back(error(2));
        ev.push_entry(|| entry(3));
        assert!(
            ev.front_of_more().is_none(),
            "an entry is ahead of the error"
        );
        assert_eq!(ev.pop_ring().map(|e| e.context), Some(1));
        assert!(matches!(ev.front_of_more(), Some(CqEvent::Error(_))));
        ev.push_entry(|| entry(4));
        assert_eq!(drain(&mut ev), vec![1002, 3, 4]);

        // An event put in front (a failed device-memory copy) goes ahead of the ring's.
        ev.push_entry(|| entry(5));
        ev.push_entry(|| entry(6));
        ev.more.push_back(error(7));
        ev.push_front(error(8));
        assert_eq!(ev.len(), 4);
        assert_eq!(drain(&mut ev), vec![1008, 5, 6, 1007]);

        // Entries left in the ring are dropped with it (their buffers too: Miri/ASan-visible).
        ev.push_entry(|| entry(9));
        drop(ev);
    }

    /// A CQ of its own, with nothing queued.
    fn cq_shared() -> (Arc<CqShared>, EventFd) {
        let signal = EventFd::new(EFD_NONBLOCK).unwrap();
        let cq = Arc::new(CqShared {
            events: SpinLock::new(Events::new(0)),
            queued: AtomicUsize::new(0),
            signal_fd: signal.as_raw_fd(),
            _signal: signal.try_clone().unwrap(),
            waiters: AtomicUsize::new(0),
            feeders: AtomicU64::new(0),
        });
        (cq, signal)
    }

    #[test]
    fn a_plain_success_of_a_closed_endpoint_is_discarded() {
        let (cq, _signal) = cq_shared();
        let ep = crate::endpoint::EpShared::for_test();
        let c = vfabric_proto::Completion {
            len: 5u64.into(),
            ..Default::default()
        };
        let device = DeviceCompletion::at(&c);
        let op = |context| PlainOp {
            // SAFETY: `ep` and `cq` outlive the record.
            ep: unsafe { crate::request::EpRef::new(&ep) },
            // SAFETY: as above.
            cq: Some(unsafe { crate::request::CqRef::new(&cq) }),
            context,
            fi_flags: fi::SEND | fi::MSG,
            rx_len: 0,
            src_addr: crate::av::FI_ADDR_UNSPEC,
            buf: None,
            is_recv: false,
            report_errors: true,
        };
        complete_plain(&op(1), &device, (0, 5), None);
        assert_eq!(cq.queued.load(Ordering::Relaxed), 1);
        ep.close_for_test();
        complete_plain(&op(2), &device, (0, 5), None);
        assert_eq!(
            cq.queued.load(Ordering::Relaxed),
            1,
            "an entry of a closed endpoint"
        );
        let mut events = cq.events.lock();
        assert_eq!(events.pop_ring().map(|e| (e.context, e.len)), Some((1, 5)));
    }
}
