// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One virtqueue of a domain: the split ring, a request slot per descriptor id (header, inline
//! payload, completion), the table of in-flight requests, and the kick/call eventfds.
//!
//! Slot layout (`SLOT_STRIDE` bytes per head id, so a slot is busy exactly while its chain is):
//!
//! ```text
//! 0    ReqHeader (96 B)                       readable
//! 96   inline TX payload (≤ 224 B)            readable, same descriptor as the header
//! 128  inline RX data (≤ 192 B, ends at 320)  writable, same descriptor as the completion
//! 320  Completion (64 B)                      writable: always the last 64 writable bytes
//! ```
//!
//! TX and RX use of bytes 128..320 never coexist: a TX request has no inline RX area and an RX
//! request no inline payload.

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use vfabric_proto::{ByteValued, Completion, ReqHeader, COMPLETION_LEN, REQ_HEADER_LEN};
use vmm_sys_util::eventfd::EventFd;

use crate::lock::{SpinGuard, SpinLock};
use crate::memory::{Allocation, SharedMemory};
use crate::ring::{arm_value, park_value, RingError, RingLayout, SplitRing, UsedElem};
use crate::transport::{Notifier, QueueHandles, RingAddrs};
use crate::{Error, Result};

pub(crate) const SLOT_STRIDE: usize = 384;
const SLOT_INLINE_TX: usize = REQ_HEADER_LEN;
const SLOT_COMPLETION: usize = 320;
/// Largest payload carried in the header descriptor.
pub(crate) const INLINE_TX_MAX: usize = SLOT_COMPLETION - SLOT_INLINE_TX; // 224
/// Largest receive placed in the slot (copied out at completion).
pub(crate) const INLINE_RX_MAX: usize = SLOT_COMPLETION - 128; // 192
/// Most data descriptors the driver puts in one chain (per direction).
pub(crate) const MAX_DATA_DESCS: usize = 16;
/// Used entries taken per lock hold while draining.
const DRAIN_BATCH: usize = 32;

/// Bytes a request carries inline, copied into its slot after the header.
pub(crate) trait InlinePayload {
    fn len(&self) -> usize;
    /// Copy the bytes to `dst`.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `self.len()` bytes.
    unsafe fn copy_to(&self, dst: *mut u8);
}

/// What the queue keeps per request in flight, opaque to it (the driver's request record).
pub(crate) trait Record {
    /// The record of a head with no request.
    const IDLE: Self;
    fn is_idle(&self) -> bool;
}

/// Payload of a request (readable bytes after the header).
pub(crate) enum TxData<'a, P> {
    None,
    /// Copied into the slot right after the header (total ≤ [`INLINE_TX_MAX`]).
    Inline(P),
    /// Buffers already in the shared region (address, length).
    Descs(&'a [(u64, u32)]),
}

/// Data area of a request (writable bytes before the completion).
pub(crate) enum RxData<'a> {
    None,
    /// Placed in the slot; `len` ≤ [`INLINE_RX_MAX`].
    Inline(usize),
    /// Buffers in the shared region (address, length).
    Descs(&'a [(u64, u32)]),
}

/// Fixed-capacity list of (address, length) data descriptors of one request.
pub(crate) struct DescList {
    /// Only `items[..len]` is initialised.
    items: [MaybeUninit<(u64, u32)>; MAX_DATA_DESCS],
    len: usize,
}

impl DescList {
    pub fn new() -> Self {
        // Only `len` is written: a struct literal lets the compiler merge the uninitialised
        // items and `len` into one memset of the whole list.
        let mut list = MaybeUninit::<Self>::uninit();
        // SAFETY: `len` is written through a raw pointer to the field; `items` may stay
        // uninitialised (an array of MaybeUninit), so the whole value is initialised.
        unsafe {
            std::ptr::addr_of_mut!((*list.as_mut_ptr()).len).write(0);
            list.assume_init()
        }
    }
    pub fn push(&mut self, addr: u64, len: u32) -> Result<()> {
        let slot = self.items.get_mut(self.len).ok_or_else(|| {
            Error::InvalidArgument(format!("more than {MAX_DATA_DESCS} data buffers"))
        })?;
        slot.write((addr, len));
        self.len += 1;
        Ok(())
    }
    pub fn as_slice(&self) -> &[(u64, u32)] {
        // SAFETY: the first `len` items were written by `push`; MaybeUninit<T> has T's layout.
        unsafe { std::slice::from_raw_parts(self.items.as_ptr().cast(), self.len) }
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The driver's record of the request in flight on one head id, kept in place from post to
/// dispatch (no moves, no allocation).
pub(crate) struct RequestSlot<R> {
    pub cookie: u64,
    /// Inline RX length posted (needed to find the data in the slot).
    inline_rx: u16,
    pub op: R,
}

/// A request the device returned, handed to dispatch by reference to its slot.
pub(crate) struct Finished<'a, R> {
    pub cookie: u64,
    /// The request; dispatch may take parts of it, the rest is dropped afterwards.
    pub op: &'a mut R,
    /// `None` if the device returned the chain with used length 0 (failed request, no
    /// completion written), or wrote an unreadable one.
    pub completion: Option<&'a Completion>,
    /// The device reported more bytes than the chain could hold, or a mismatched cookie.
    pub device_fault: bool,
    /// Bytes received into the slot's inline area (the head is not reused until dispatch
    /// returns).
    pub inline_data: &'a [u8],
}

/// State a domain's queues share with it: who sleeps, and which queues have work.
#[derive(Default)]
pub(crate) struct DomainSignals {
    /// Threads sleeping for calls (drainers and posters keep rings armed for them).
    pub blockers: AtomicU32,
    /// Bit `i`: queue `i` (< 64) has requests in flight. Progress scans only these (and every
    /// queue from 64 on); a stale set bit only costs a look.
    pub busy: AtomicU64,
}

/// Per-queue event counters (relaxed; for diagnostics).
#[derive(Default)]
pub(crate) struct QueueCounters {
    pub posted: AtomicU64,
    pub completed: AtomicU64,
    pub kicks: AtomicU64,
}

struct QueueState {
    ring: SplitRing,
    seq: u64,
}

/// Write 1 to an eventfd. A raw system call: no libc cancellation-point bookkeeping on the
/// hot path.
pub(crate) fn signal_eventfd(fd: RawFd) -> std::io::Result<()> {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local to an fd; no memory of ours is retained.
    let rc = unsafe { libc::syscall(libc::SYS_write, fd, &one as *const u64, 8usize) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reset a non-blocking eventfd (a no-op if it is not signalled).
pub(crate) fn drain_eventfd(fd: RawFd) {
    let mut value: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live local from an fd.
    unsafe { libc::syscall(libc::SYS_read, fd, &mut value as *mut u64, 8usize) };
}

pub(crate) struct Virtqueue<R> {
    pub index: u16,
    /// The ring (avail side, free list, used-entry validation) and the cookie sequence.
    state: SpinLock<QueueState>,
    /// Serialises draining (take + dispatch + release) so completions reach CQs in used-ring
    /// order, and owns the request slots of returned chains while they are dispatched.
    progress: SpinLock<()>,
    /// One request record per head id; see the `Sync` impl for who may touch which.
    requests: Box<[UnsafeCell<RequestSlot<R>>]>,
    used_idx: *const AtomicU16,
    /// `used_event` (EVENT_IDX) or the avail flags: armed and parked without the state lock.
    call_control: *const AtomicU16,
    event_idx: bool,
    /// Used index up to which we have taken entries (mirror of the ring's, for lock-free
    /// peeks and arming).
    last_used: AtomicU16,
    /// Chains published and not yet taken back: a sleeper arms only busy queues.
    in_flight: AtomicU32,
    /// Shared with the domain (see [`Virtqueue::arm`] and [`DomainSignals::busy`]).
    signals: Arc<DomainSignals>,
    /// Our bit in `signals.busy` (0 from queue 64 on: those are always scanned).
    busy_bit: u64,
    broken: AtomicBool,
    slots: *mut u8,
    /// Device address of the slot area (contiguous for the device, as every allocation).
    slots_device_addr: u64,
    /// How to kick the device (set when the transport starts the queue).
    notifier: Notifier,
    /// The eventfd the device calls, where the transport has one per queue (vhost-user).
    call: Option<EventFd>,
    size: u16,
    pub(crate) counters: QueueCounters,
    _ring_mem: Allocation,
    _slot_mem: Allocation,
}

// SAFETY: the raw pointers point into the domain's shared mapping, kept alive by the two
// `Allocation`s we own; the ring fields behind them are only accessed atomically. Slot memory
// and the request record of head `i` belong to whoever owns head `i`: the poster (holding
// `state`) from the moment the ring hands it out until it is published, then the drainer
// (holding `progress`) from the moment the device returns it until `release` under `state`;
// `find_cookie`/`in_flight` read records only while holding both locks.
unsafe impl<R: Send> Send for Virtqueue<R> {}
// SAFETY: see `Send`.
unsafe impl<R: Send> Sync for Virtqueue<R> {}

impl<R: Record> Virtqueue<R> {
    pub fn new(
        mem: &Arc<SharedMemory>,
        index: u16,
        size: u16,
        event_idx: bool,
        signals: Arc<DomainSignals>,
    ) -> Result<Self> {
        let layout = RingLayout::new(size);
        let ring_mem = mem.alloc(layout.total, 4096)?;
        let slot_mem = mem.alloc(SLOT_STRIDE * size as usize, 4096)?;
        slot_mem.zero();
        // SAFETY: `ring_mem` is a fresh 4096-aligned allocation of `layout.total` bytes owned
        // by this virtqueue for as long as the ring exists.
        let ring = unsafe { SplitRing::new(ring_mem.ptr(), layout, event_idx) };
        let used_idx = ring.used_idx_ptr();
        let call_control = ring.call_control_ptr();
        Ok(Self {
            index,
            used_idx,
            call_control,
            event_idx,
            last_used: AtomicU16::new(0),
            in_flight: AtomicU32::new(0),
            signals,
            busy_bit: if index < 64 { 1 << index } else { 0 },
            broken: AtomicBool::new(false),
            slots: slot_mem.ptr(),
            slots_device_addr: slot_mem.device_addr(),
            notifier: Notifier::Unset,
            call: None,
            size,
            counters: QueueCounters::default(),
            state: SpinLock::new(QueueState { ring, seq: 1 }),
            progress: SpinLock::new(()),
            requests: (0..size)
                .map(|_| {
                    UnsafeCell::new(RequestSlot {
                        cookie: 0,
                        inline_rx: 0,
                        op: R::IDLE,
                    })
                })
                .collect(),
            _ring_mem: ring_mem,
            _slot_mem: slot_mem,
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Device addresses of the ring's parts (the ring allocation is contiguous for the
    /// device).
    pub fn ring_addrs(&self) -> RingAddrs {
        let layout = self.lock().ring.layout();
        let base = self._ring_mem.device_addr();
        RingAddrs {
            desc: base + layout.desc as u64,
            avail: base + layout.avail as u64,
            used: base + layout.used as u64,
        }
    }

    /// Take what the transport gave the queue when it started it.
    pub fn attach(&mut self, handles: QueueHandles) {
        self.notifier = handles.notifier;
        self.call = handles.call;
    }

    /// The eventfd the device calls, if the transport has one per queue.
    pub fn call_fd(&self) -> Option<RawFd> {
        self.call.as_ref().map(|c| c.as_raw_fd())
    }

    fn lock(&self) -> SpinGuard<'_, QueueState> {
        self.state.lock()
    }

    fn slot(&self, head: u16) -> *mut u8 {
        debug_assert!(head < self.size);
        // SAFETY: head < size and the slot area holds `size` slots.
        unsafe { self.slots.add(head as usize * SLOT_STRIDE) }
    }

    fn call_control(&self) -> &AtomicU16 {
        // SAFETY: points into the ring allocation we own; the field is 2-byte aligned.
        unsafe { &*self.call_control }
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// Post one request. `header.cookie` is assigned here. Returns the cookie.
    /// `Err(Error::Again)` if the ring has no room. With `more` (libfabric `FI_MORE`) the kick
    /// decision is left to a later post without it (or [`Virtqueue::flush`]), which covers
    /// every chain published since. `op` builds the request record, straight into its slot
    /// (not called if the post fails before).
    pub fn post<P: InlinePayload>(
        &self,
        header: &mut ReqHeader,
        tx: TxData<'_, P>,
        rx: RxData<'_>,
        more: bool,
        op: impl FnOnce() -> R,
    ) -> Result<u64> {
        let (inline_tx_len, tx_descs): (usize, &[(u64, u32)]) = match &tx {
            TxData::None => (0, &[]),
            TxData::Inline(p) => (p.len(), &[]),
            TxData::Descs(d) => (0, d),
        };
        let (inline_rx_len, rx_descs): (usize, &[(u64, u32)]) = match &rx {
            RxData::None => (0, &[]),
            RxData::Inline(n) => (*n, &[]),
            RxData::Descs(d) => (0, d),
        };
        if inline_tx_len > INLINE_TX_MAX
            || inline_rx_len > INLINE_RX_MAX
            || tx_descs.len() > MAX_DATA_DESCS
            || rx_descs.len() > MAX_DATA_DESCS
        {
            return Err(Error::InvalidArgument(
                "request does not fit a chain".into(),
            ));
        }
        let n = 2 + tx_descs.len() + rx_descs.len();

        let mut st = self.lock();
        if let Some(why) = st.ring.broken() {
            return Err(Error::Transport(format!("virtqueue {}: {why}", self.index)));
        }
        let Some(head) = st.ring.next_head(n) else {
            return Err(Error::Again);
        };
        let cookie = (st.seq << 24) | ((self.index as u64) << 16) | head as u64;
        st.seq += 1;
        header.cookie = cookie.into();
        let slot = self.slot(head);
        // SAFETY: the slot of a free head belongs to us until the chain is published; all
        // writes below stay inside the SLOT_STRIDE bytes of the slot (the payload is at most
        // INLINE_TX_MAX bytes, checked above). The completion area is not cleared: a stale
        // completion carries an older cookie and is rejected as a mismatch.
        unsafe {
            std::ptr::copy_nonoverlapping(header.as_slice().as_ptr(), slot, REQ_HEADER_LEN);
            if let TxData::Inline(p) = &tx {
                p.copy_to(slot.add(SLOT_INLINE_TX));
            }
        }
        // SAFETY: as above, the record of a free head is ours until the chain is published.
        let record = unsafe { &mut *self.requests[head as usize].get() };
        record.cookie = cookie;
        record.inline_rx = inline_rx_len as u16;
        debug_assert!(record.op.is_idle());
        // SAFETY: the record of a free head is idle (nothing to drop): write in place.
        unsafe { std::ptr::write(&mut record.op, op()) };
        let slot_addr = self.slots_device_addr + u64::from(head) * SLOT_STRIDE as u64;
        // Counted before the device can see it (a drainer subtracts what it takes).
        if self.in_flight.fetch_add(1, Ordering::SeqCst) == 0 {
            self.signals.busy.fetch_or(self.busy_bit, Ordering::SeqCst);
        }
        let added = st.ring.add_request(
            (slot_addr, (REQ_HEADER_LEN + inline_tx_len) as u32),
            tx_descs,
            rx_descs,
            (
                slot_addr + (SLOT_COMPLETION - inline_rx_len) as u64,
                (inline_rx_len + COMPLETION_LEN) as u32,
            ),
        );
        if let Err(e) = added {
            // Not published: the record goes back to idle (dropping the request's buffers).
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            record.op = R::IDLE;
            return Err(match e {
                RingError::Full => Error::Again,
                other => Error::Transport(other.to_string()),
            });
        }
        let kick = !more && st.ring.needs_kick();
        drop(st);
        self.counters.posted.fetch_add(1, Ordering::Relaxed);
        // A thread already asleep may not have armed this queue (it was idle): arm for it.
        if self.signals.blockers.load(Ordering::SeqCst) > 0 {
            self.arm();
        }
        if kick {
            self.notify();
        }
        Ok(cookie)
    }

    /// Kick the device for chains published with `more` and not yet covered by a kick
    /// decision (the doorbell of a batch).
    pub fn flush(&self) {
        let kick = self.lock().ring.needs_kick();
        if kick {
            self.notify();
        }
    }

    fn notify(&self) {
        self.counters.kicks.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.notifier.notify() {
            tracing::warn!(queue = self.index, error = %e, "kick failed");
        }
    }

    /// Lock-free check for used entries we have not consumed.
    #[inline]
    pub fn has_used(&self) -> bool {
        // SAFETY: `used_idx` points into the ring allocation we own.
        let idx = u16::from_le(unsafe { (*self.used_idx).load(Ordering::Acquire) });
        idx != self.last_used.load(Ordering::Relaxed)
    }

    /// Anything for [`Virtqueue::drain`] to do (used entries, or a broken ring to report)?
    #[inline]
    pub fn needs_drain(&self) -> bool {
        self.has_used() || self.is_broken()
    }

    /// Drain the used ring and hand every finished request to `dispatch`, in ring order.
    /// Returns how many were drained. If another thread is draining this queue, returns 0.
    pub fn drain(&self, mut dispatch: impl FnMut(Finished<'_, R>)) -> usize {
        let Some(_draining) = self.progress.try_lock() else {
            return 0;
        };
        // Uninitialised: only `batch[..taken]` is ever read.
        let mut batch = [MaybeUninit::<UsedElem>::uninit(); DRAIN_BATCH];
        let mut taken = 0;
        let mut total = 0;
        let mut broken = None;
        let mut st = self.lock();
        loop {
            // The chains dispatched last round go back to the free list; then take new ones.
            for u in &batch[..taken] {
                // SAFETY: the first `taken` entries were written below in the last round.
                st.ring.release(unsafe { u.assume_init_ref() }.head);
            }
            taken = 0;
            while taken < DRAIN_BATCH {
                let Some(u) = st.ring.take_used() else {
                    break;
                };
                batch[taken].write(u);
                taken += 1;
            }
            if let Some(why) = st.ring.broken() {
                broken = Some(why.to_owned());
            }
            if taken == 0 {
                break;
            }
            if self.in_flight.fetch_sub(taken as u32, Ordering::SeqCst) == taken as u32 {
                // Idle now: out of the scan, unless a post got in between (it sets the bit
                // after counting, so one of us leaves it set).
                self.signals
                    .busy
                    .fetch_and(!self.busy_bit, Ordering::SeqCst);
                if self.in_flight.load(Ordering::SeqCst) != 0 {
                    self.signals.busy.fetch_or(self.busy_bit, Ordering::SeqCst);
                }
            }
            self.after_take(st.ring.last_used());
            // Dispatch without the ring lock: posts (also from dispatch itself) proceed, and
            // the taken heads stay ours until released above.
            drop(st);
            for u in &batch[..taken] {
                // SAFETY: written above in this round.
                self.finish(unsafe { u.assume_init_ref() }, &mut dispatch);
            }
            total += taken;
            st = self.lock();
        }
        drop(st);
        if let Some(why) = broken {
            if !self.broken.swap(true, Ordering::Relaxed) {
                tracing::error!(queue = self.index, %why, "virtqueue broken");
            }
        }
        if total > 0 {
            self.counters
                .completed
                .fetch_add(total as u64, Ordering::Relaxed);
        }
        total
    }

    /// Publish the new consumption point and set the call suppression for it: armed if a
    /// thread of the domain sleeps for calls, parked otherwise. Pairs with [`Virtqueue::arm`]
    /// (all `SeqCst`): either the sleeper sees our `last_used` and arms at it, or we see the
    /// sleeper and arm for it.
    fn after_take(&self, last_used: u16) {
        let blockers = &self.signals.blockers;
        self.last_used.store(last_used, Ordering::SeqCst);
        if blockers.load(Ordering::SeqCst) == 0 {
            self.call_control()
                .store(park_value(self.event_idx, last_used), Ordering::SeqCst);
            // A sleeper that armed before our park store still needs its call.
            if blockers.load(Ordering::SeqCst) == 0 {
                return;
            }
        }
        self.call_control()
            .store(arm_value(self.event_idx, last_used), Ordering::SeqCst);
    }

    /// Read the completion of a taken chain and dispatch it; the record goes back to idle.
    fn finish(&self, u: &UsedElem, dispatch: &mut impl FnMut(Finished<'_, R>)) {
        // SAFETY: the device returned this head and it is not released yet, so no post can
        // reuse it; we hold `progress`, the only other way to reach a returned head's record.
        let record = unsafe { &mut *self.requests[u.head as usize].get() };
        if record.op.is_idle() {
            // Cannot happen (the ring only returns published heads); nothing to deliver.
            return;
        }
        let slot = self.slot(u.head);
        let mut device_fault = !u.len_ok;
        let completion = if u.len == 0 {
            None
        } else if (u.len as usize) < COMPLETION_LEN {
            device_fault = true;
            None
        } else {
            // SAFETY: the completion lies inside the slot of a chain the device returned; we
            // copy it out once and validate the copy, never re-reading device memory.
            let c: Completion =
                unsafe { std::ptr::read_unaligned(slot.add(SLOT_COMPLETION) as *const Completion) };
            if u64::from(c.cookie) != record.cookie {
                tracing::warn!(
                    queue = self.index,
                    expected = record.cookie,
                    got = u64::from(c.cookie),
                    "completion cookie mismatch"
                );
                device_fault = true;
            }
            Some(c)
        };
        let inline_rx = record.inline_rx as usize;
        let placed = match &completion {
            Some(c) if inline_rx > 0 => (u64::from(c.len) as usize).min(inline_rx),
            _ => 0,
        };
        // SAFETY: the inline area [320 - inline_rx, 320) is inside the slot and `placed` ≤
        // inline_rx; the head stays ours (not reposted) until dispatch returns. The device
        // is done with it; bytes a misbehaving device changes meanwhile are only copied.
        let inline_data =
            unsafe { std::slice::from_raw_parts(slot.add(SLOT_COMPLETION - inline_rx), placed) };
        dispatch(Finished {
            cookie: record.cookie,
            op: &mut record.op,
            completion: completion.as_ref(),
            device_fault,
            inline_data,
        });
        record.op = R::IDLE;
    }

    /// Arm (see [`Virtqueue::arm`]) if requests are in flight; returns whether it did. A queue
    /// with none has nothing to wake a sleeper for, and a post arms it if one sleeps then.
    pub fn arm_if_busy(&self) -> bool {
        if self.in_flight.load(Ordering::SeqCst) == 0 {
            return false;
        }
        self.arm();
        true
    }

    /// Ask the device for a call at the next used entry, without the ring lock. Called by a
    /// thread about to sleep, after it counted itself in the domain's `blockers` (it must then
    /// re-check [`Virtqueue::has_used`] after a `SeqCst` fence before sleeping), and by a post
    /// while someone sleeps.
    pub fn arm(&self) {
        loop {
            let seen = self.last_used.load(Ordering::SeqCst);
            self.call_control()
                .store(arm_value(self.event_idx, seen), Ordering::SeqCst);
            // A drainer moved on meanwhile: arm again at its position.
            if self.last_used.load(Ordering::SeqCst) == seen {
                return;
            }
        }
    }

    /// Record of the first in-flight request matching `pred`, in posting order: its cookie.
    pub fn find_cookie(&self, mut pred: impl FnMut(&RequestSlot<R>) -> bool) -> Option<u64> {
        let _draining = self.progress.lock();
        let _st = self.lock();
        self.requests
            .iter()
            // SAFETY: with both locks held no poster and no drainer touches any record.
            .map(|r| unsafe { &*r.get() })
            .filter(|r| !r.op.is_idle() && pred(r))
            .map(|r| r.cookie)
            .min_by_key(|c| c >> 24)
    }

    /// Requests in flight (for tests and diagnostics).
    pub fn in_flight(&self) -> usize {
        let _draining = self.progress.lock();
        let _st = self.lock();
        self.requests
            .iter()
            // SAFETY: with both locks held no poster and no drainer touches any record.
            .filter(|r| !unsafe { &(*r.get()).op }.is_idle())
            .count()
    }
}
