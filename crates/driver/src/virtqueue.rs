// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One virtqueue of a domain: the split ring, a request slot per descriptor id (header, inline
//! payload, completion), the table of in-flight requests, and how to kick the device.
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
use std::os::fd::RawFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use std::mem::offset_of;
use vfabric_proto::{Completion, Le32, Le64, ReqHeader, WireAddr, COMPLETION_LEN, REQ_HEADER_LEN};

use crate::lock::{SpinGuard, SpinLock};
use crate::memory::{Allocation, SharedMemory};
use crate::ring::{arm_value, park_value, RingLayout, SplitRing, UsedElem};
use crate::transport::{Notifier, RingAddrs};
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
/// One step of a cookie's sequence number (bits 24 and up; the queue index is in bits 16..24
/// and the head id in 0..16).
const COOKIE_SEQ_ONE: u64 = 1 << 24;
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
    #[inline]
    pub fn push(&mut self, addr: u64, len: u32) -> Result<()> {
        let Some(slot) = self.items.get_mut(self.len) else {
            return Err(too_many_descs());
        };
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

// The errors of posting are built out of line, so the posting path stays small enough to
// inline.
#[cold]
fn too_many_descs() -> Error {
    Error::InvalidArgument(format!("more than {MAX_DATA_DESCS} data buffers"))
}

#[cold]
fn too_big_for_a_chain() -> Error {
    Error::InvalidArgument("request does not fit a chain".into())
}

/// The driver's record of the request in flight on one head id, kept in place from post to
/// dispatch (no moves, no allocation). `op` (opaque to the queue) is initialised exactly while
/// `busy`: a post writes it, a dispatch drops it in place.
pub(crate) struct RequestSlot<R> {
    cookie: u64,
    /// Inline RX length posted (needed to find the data in the slot).
    inline_rx: u16,
    busy: bool,
    op: MaybeUninit<R>,
}

impl<R> RequestSlot<R> {
    const IDLE: Self = Self {
        cookie: 0,
        inline_rx: 0,
        busy: false,
        op: MaybeUninit::uninit(),
    };

    /// The request, if one is in flight on this head.
    fn op(&self) -> Option<&R> {
        // SAFETY: `op` is initialised while `busy`.
        self.busy.then(|| unsafe { self.op.assume_init_ref() })
    }
}

impl<R> Drop for RequestSlot<R> {
    fn drop(&mut self) {
        if self.busy {
            // SAFETY: initialised while `busy`; dropped once (the slot goes away).
            unsafe { self.op.assume_init_drop() };
        }
    }
}

/// Where a drain delivers the requests the device returned.
pub(crate) trait Dispatch<R> {
    /// The common case, called under the ring lock for a request whose completion is valid
    /// (its cookie, a used length that holds it) and that received nothing inline: deliver
    /// it completely and return true, or return false to have [`Dispatch::finished`] do it
    /// without the lock. Runs no application code and posts nothing (the ring lock is held).
    /// Returns true only for a record that owns nothing: the record is not dropped (its slot
    /// goes back to idle as is; a record that owned something would leak it).
    fn fast(&mut self, op: &R, completion: &DeviceCompletion) -> bool;
    /// Any other returned request, without the ring lock.
    fn finished(&mut self, f: Finished<'_, R>);
    /// The ring of queue `index` is broken (the device wrote an invalid used entry): called,
    /// under the ring lock, by every drain that finds it so.
    fn broken(&mut self, _index: u16) {}
}

/// The completion of a returned chain where the device wrote it (its slot), for
/// [`Dispatch::fast`]: each field is read from device memory with one volatile load per call,
/// so a caller that reads each field once (and checks what it reads) sees one value of it,
/// whatever the device writes meanwhile. No copy of the whole completion on the common path.
pub(crate) struct DeviceCompletion(*const Completion);

impl DeviceCompletion {
    /// The completion at `c` (a test's own, standing for a slot's).
    #[cfg(test)]
    pub(crate) fn at(c: *const Completion) -> Self {
        Self(c)
    }
    /// The field of type `T` at byte `offset` of the completion, read once.
    #[inline(always)]
    fn field<T>(&self, offset: usize) -> T {
        // SAFETY: `self.0` points to the 64-byte, 64-aligned completion of a slot the drainer
        // owns until the head is released (see `Virtqueue::take`); callers pass the offset of
        // a field of type `T`, inside it and aligned. A volatile read: the device may write
        // the bytes meanwhile, which are only copied.
        unsafe { std::ptr::read_volatile(self.0.byte_add(offset).cast::<T>()) }
    }
    #[inline(always)]
    pub fn status(&self) -> u32 {
        u32::from(self.field::<Le32>(offset_of!(Completion, status)))
    }
    #[inline(always)]
    pub fn flags(&self) -> u32 {
        u32::from(self.field::<Le32>(offset_of!(Completion, flags)))
    }
    #[inline(always)]
    pub fn cookie(&self) -> u64 {
        u64::from(self.field::<Le64>(offset_of!(Completion, cookie)))
    }
    #[inline(always)]
    pub fn len(&self) -> u64 {
        u64::from(self.field::<Le64>(offset_of!(Completion, len)))
    }
    #[inline(always)]
    pub fn data(&self) -> u64 {
        u64::from(self.field::<Le64>(offset_of!(Completion, data)))
    }
    #[inline(always)]
    pub fn tag(&self) -> u64 {
        u64::from(self.field::<Le64>(offset_of!(Completion, tag)))
    }
    #[inline(always)]
    pub fn src(&self) -> WireAddr {
        self.field::<WireAddr>(offset_of!(Completion, src))
    }
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
    /// Bit `i`: queue `i` (< 64) has requests in flight, or had until lately. Progress scans
    /// only these (and every queue from 64 on); a stale set bit only costs a look, and the
    /// look clears it ([`Virtqueue::leave_scan_if_idle`]). A post sets it again.
    pub busy: AtomicU64,
}

/// Per-queue event counters (for diagnostics). Posts and completions are worked out when asked
/// (the cookie sequence counts posts, the ring the chains still in flight); kicks are counted.
#[derive(Clone, Copy, Default)]
pub(crate) struct QueueCounters {
    pub posted: u64,
    pub completed: u64,
    pub kicks: u64,
}

struct QueueState {
    ring: SplitRing,
    /// The next request's cookie without its head id: sequence number `<< 24`, queue index
    /// `<< 16` (kept whole: a post only adds the head).
    cookie_base: u64,
    /// Kicks so far.
    kicks: u64,
    /// A drainer dispatches a returned request without this lock (see [`Virtqueue::drain`]):
    /// until it clears this, it owns that request's record and slot, and no other drainer
    /// takes entries (completions reach CQs in used-ring order).
    dispatching: bool,
}

/// Clears `dispatching` if a dispatch without the ring lock unwinds, so the queue can still
/// be drained.
struct EndDispatchOnUnwind<'a>(&'a SpinLock<QueueState>);

impl Drop for EndDispatchOnUnwind<'_> {
    fn drop(&mut self) {
        self.0.lock().dispatching = false;
    }
}

/// What became of a used entry taken under the ring lock.
enum Taken {
    /// Delivered (or nothing to deliver): its head can go back to the ring.
    Done,
    /// For [`Dispatch::finished`], without the lock: whether the completion was copied out,
    /// and whether the device broke the rules with it.
    Slow {
        has_completion: bool,
        device_fault: bool,
    },
}

/// An 8-byte `read` or `write` (`nr`) on an eventfd: the kernel's return value (`-errno` on
/// failure), without libc's wrapper ([`crate::syscall::raw5`]): every kick and every reset of
/// a wakeup eventfd passes here.
///
/// # Safety
/// `buf` must be valid for reads and writes of 8 bytes.
#[inline(always)]
unsafe fn eventfd_rw(nr: libc::c_long, fd: RawFd, buf: *mut u64) -> isize {
    // SAFETY: the kernel reads or writes the 8 bytes at `buf` (the caller's guarantee).
    unsafe { crate::syscall::raw5(nr, [fd as usize, buf as usize, 8, 0, 0]) }
}

/// Write 1 to an eventfd.
#[inline(always)]
pub(crate) fn signal_eventfd(fd: RawFd) -> std::io::Result<()> {
    let mut one: u64 = 1;
    // SAFETY: 8 bytes of a live local.
    let rc = unsafe { eventfd_rw(libc::SYS_write, fd, &mut one) };
    if rc < 0 {
        return Err(std::io::Error::from_raw_os_error(-rc as i32));
    }
    Ok(())
}

/// Reset a non-blocking eventfd (a no-op if it is not signalled).
#[inline(always)]
pub(crate) fn drain_eventfd(fd: RawFd) {
    let mut value: u64 = 0;
    // SAFETY: 8 bytes of a live local.
    unsafe { eventfd_rw(libc::SYS_read, fd, &mut value) };
}

pub(crate) struct Virtqueue<R> {
    pub index: u16,
    /// The ring (avail side, free list, used-entry validation), the cookie sequence, and
    /// who drains: a drainer holds it while it takes entries and delivers the common ones,
    /// and marks it `dispatching` while it dispatches another one without it.
    state: SpinLock<QueueState>,
    /// One request record per head id; see the `Sync` impl for who may touch which.
    requests: Box<[UnsafeCell<RequestSlot<R>>]>,
    used_idx: *const AtomicU16,
    /// `used_event` (EVENT_IDX) or the avail flags: armed and parked without the state lock.
    call_control: *const AtomicU16,
    event_idx: bool,
    /// Used index up to which we have taken entries (mirror of the ring's, for lock-free
    /// peeks and arming).
    last_used: AtomicU16,
    /// Chains published and not yet taken back (the ring's count, stored under its lock): a
    /// sleeper arms only busy queues.
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
    size: u16,
    _ring_mem: Allocation,
    _slot_mem: Allocation,
}

// SAFETY: the raw pointers point into the domain's shared mapping, kept alive by the two
// `Allocation`s we own; the ring fields behind them are only accessed atomically. Slot memory
// and the request record of head `i` belong to whoever owns head `i`: the poster (holding
// `state`) from the moment the ring hands it out until it is published, then the drainer
// (holding `state`, or having marked it `dispatching` while it dispatches a request without
// it) from the moment the device returns it until `release` under `state`;
// `find_cookie`/`in_flight` read records only while holding `state` with no dispatch going on.
unsafe impl<R: Send> Send for Virtqueue<R> {}
// SAFETY: see `Send`.
unsafe impl<R: Send> Sync for Virtqueue<R> {}

impl<R> Virtqueue<R> {
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
            size,
            state: SpinLock::new(QueueState {
                ring,
                cookie_base: COOKIE_SEQ_ONE | (u64::from(index) << 16),
                kicks: 0,
                dispatching: false,
            }),
            requests: (0..size)
                .map(|_| UnsafeCell::new(RequestSlot::IDLE))
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

    /// Take the transport's way to kick the queue once it started it.
    pub fn attach(&mut self, notifier: Notifier) {
        self.notifier = notifier;
    }

    #[inline(always)]
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

    /// Post one request. `header` builds the request header straight into the slot once the
    /// ring has room; its cookie is assigned here. Returns the cookie.
    /// `Err(Error::Again)` if the ring has no room. With `more` (libfabric `FI_MORE`) the kick
    /// decision is left to a later post without it (or [`Virtqueue::flush`]), which covers
    /// every chain published since. With `urgent` the kick happens at once, with `more` too,
    /// even if the device suppressed notifications (it may leave an RX ring's off under
    /// LAZY_RX, taking plain receives when it needs them; other RX requests must not wait). `op` builds the request
    /// record, straight into its slot (not called if the post fails before).
    ///
    /// One ring-lock hold: the header and descriptors are written, the avail index is stored
    /// once (release), and a single full fence orders it (and the in-flight count) before the
    /// two reads that follow it, the device's kick suppression and the domain's sleepers.
    /// Inlined into each of its few callers: their closures and known data shapes fold in.
    #[inline(always)]
    pub fn post<P: InlinePayload>(
        &self,
        header: impl FnOnce() -> ReqHeader,
        tx: TxData<'_, P>,
        rx: RxData<'_>,
        more: bool,
        urgent: bool,
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
        // The slot writes below rely on these bounds.
        if inline_tx_len > INLINE_TX_MAX
            || inline_rx_len > INLINE_RX_MAX
            || tx_descs.len() > MAX_DATA_DESCS
            || rx_descs.len() > MAX_DATA_DESCS
        {
            return Err(too_big_for_a_chain());
        }
        let n = 2 + tx_descs.len() + rx_descs.len();

        let mut st = self.lock();
        let head = match st.ring.next_head(n) {
            Some(head) => head,
            None => {
                drop(st);
                st = self.reclaim_for(n)?;
                match st.ring.next_head(n) {
                    Some(head) => head,
                    None => return Err(Error::Again),
                }
            }
        };
        let cookie = st.cookie_base | u64::from(head);
        st.cookie_base = st.cookie_base.wrapping_add(COOKIE_SEQ_ONE);
        let slot = self.slot(head);
        // SAFETY: the slot of a free head belongs to us until the chain is published; all
        // writes below stay inside the SLOT_STRIDE bytes of the slot (the header is at its
        // start, which is 128-aligned; the payload is at most INLINE_TX_MAX bytes, checked
        // above). The completion area is not cleared: a stale completion carries an older
        // cookie and is rejected as a mismatch.
        unsafe {
            let h = slot.cast::<ReqHeader>();
            h.write(header());
            (*h).cookie = cookie.into();
            if let TxData::Inline(p) = &tx {
                p.copy_to(slot.add(SLOT_INLINE_TX));
            }
        }
        // SAFETY: as above, the record of a free head is ours until the chain is published.
        // A head is < size, the number of records.
        let record = unsafe { &mut *self.requests.get_unchecked(head as usize).get() };
        debug_assert!(!record.busy);
        record.cookie = cookie;
        record.inline_rx = inline_rx_len as u16;
        // The record of a free head is idle (nothing to drop): written in place.
        record.op.write(op());
        record.busy = true;
        let slot_addr = self.slots_device_addr + u64::from(head) * SLOT_STRIDE as u64;
        st.ring.add_request(
            head,
            (slot_addr, (REQ_HEADER_LEN + inline_tx_len) as u32),
            tx_descs,
            rx_descs,
            (
                slot_addr + (SLOT_COMPLETION - inline_rx_len) as u64,
                (inline_rx_len + COMPLETION_LEN) as u32,
            ),
        );
        let in_flight = st.ring.chains_in_flight();
        self.in_flight
            .store(u32::from(in_flight), Ordering::Relaxed);
        if in_flight == 1 && self.signals.busy.load(Ordering::Relaxed) & self.busy_bit == 0 {
            // Busy again: back into the progress scan (a drainer clears the bit under the
            // same lock when the queue goes idle, so no update is lost).
            self.signals.busy.fetch_or(self.busy_bit, Ordering::Relaxed);
        }
        // The avail index and the in-flight count before the reads below.
        fence(Ordering::SeqCst);
        // An urgent request is kicked for at once, `more` or not (the hint only defers a kick
        // the device asks for), covering every chain published before it: no urgency to
        // remember for a later post.
        let kick = if urgent {
            st.ring.mark_kicked();
            true
        } else {
            !more && st.ring.needs_kick_fenced()
        };
        st.kicks += u64::from(kick);
        drop(st);
        // A thread already asleep may not have armed this queue (it was idle): arm for it.
        if self.signals.blockers.load(Ordering::Relaxed) > 0 {
            self.arm();
        }
        if kick {
            self.notify();
        }
        Ok(cookie)
    }

    /// The ring had no room for `n` descriptors: the ring's error if it is broken, else
    /// `Again` (drains give heads back as they deliver them), unless a drain gave some back
    /// meanwhile (the ring is returned locked then).
    #[cold]
    fn reclaim_for(&self, n: usize) -> Result<SpinGuard<'_, QueueState>> {
        let st = self.lock();
        if let Some(why) = st.ring.broken() {
            return Err(Error::Transport(format!("virtqueue {}: {why}", self.index)));
        }
        if st.ring.next_head(n).is_none() {
            return Err(Error::Again);
        }
        Ok(st)
    }

    /// Kick the device for chains published with `more` and not yet covered by a kick
    /// decision (the doorbell of a batch).
    pub fn flush(&self) {
        let mut st = self.lock();
        let kick = st.ring.needs_kick();
        st.kicks += u64::from(kick);
        drop(st);
        if kick {
            self.notify();
        }
    }

    /// Kick the device. The vhost-user kick (an eventfd write) is inlined into the post; a
    /// failure is only logged, out of line.
    #[inline(always)]
    fn notify(&self) {
        let r = match &self.notifier {
            Notifier::EventFd(e) => signal_eventfd(std::os::fd::AsRawFd::as_raw_fd(e)),
            other => other.notify(),
        };
        if let Err(e) = r {
            self.kick_failed(e);
        }
    }

    #[cold]
    fn kick_failed(&self, e: std::io::Error) {
        tracing::warn!(queue = self.index, error = %e, "kick failed");
    }

    /// Posts, completions and kicks so far.
    pub fn counters(&self) -> QueueCounters {
        let st = self.lock();
        // The first post's cookie has sequence number 1.
        let posted = st.cookie_base / COOKIE_SEQ_ONE - 1;
        QueueCounters {
            posted,
            completed: posted - u64::from(st.ring.chains_in_flight()),
            kicks: st.kicks,
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

    /// Drain the used ring and hand every finished request to `to`, in ring order. Returns
    /// how many were drained. If another thread is dispatching a request of this queue, returns
    /// 0 (that thread drains the rest).
    ///
    /// One ring-lock hold per batch: it takes the used entries, delivers the common ones
    /// ([`Dispatch::fast`]) and gives their heads back at once, and updates the in-flight state.
    /// Any other request is dispatched without the ring lock (posts, also from dispatch
    /// itself, proceed; other drainers see `dispatching` and leave), and its head given back
    /// after it. The ring lock is the only lock of a drain: a plain completion is taken,
    /// checked, delivered and its head given back in one hold.
    #[inline(always)]
    pub fn drain(&self, to: &mut impl Dispatch<R>) -> usize {
        let mut st = self.lock();
        if st.dispatching {
            return 0;
        }
        // Written by `take` for a request dispatched without the lock: the completion copied
        // out of the slot once.
        let mut completion = MaybeUninit::<Completion>::uninit();
        let mut total = 0;
        loop {
            // One read of the used index per batch: entries the device publishes after it
            // are left for the next batch or drain (see the end of the loop).
            let ready = st.ring.used_ready().min(DRAIN_BATCH as u16);
            let mut taken = 0;
            let mut slow = None;
            while taken < ready {
                let Some(u) = st.ring.take_published() else {
                    break;
                };
                taken += 1;
                match self.take(&u, &mut completion, to) {
                    // SAFETY: the head `take_published` just returned.
                    Taken::Done => unsafe { st.ring.release_taken(u.head) },
                    Taken::Slow {
                        has_completion,
                        device_fault,
                    } => {
                        slow = Some((u, has_completion, device_fault));
                        break;
                    }
                }
            }
            let mut rearmed = false;
            if taken > 0 {
                // An idle queue stays in the busy mask (usually it is busy again at once): the
                // progress scan takes it out when it finds it idle (`leave_scan_if_idle`).
                self.in_flight
                    .store(u32::from(st.ring.chains_in_flight()), Ordering::Relaxed);
                rearmed = self.after_take(st.ring.last_used());
            }
            let broken = st.ring.broken().is_some();
            if broken {
                self.mark_broken(&st);
                to.broken(self.index);
            }
            total += usize::from(taken);
            if let Some((u, has_completion, device_fault)) = slow {
                st.dispatching = true;
                drop(st);
                // SAFETY: `take` copied the completion out when `has_completion`.
                let c = has_completion.then(|| unsafe { completion.assume_init_ref() });
                let unwinding = EndDispatchOnUnwind(&self.state);
                self.finish(&u, c, device_fault, to);
                std::mem::forget(unwinding);
                st = self.lock();
                st.dispatching = false;
                st.ring.release(u.head);
                if !broken {
                    // The entries after it, in a new batch.
                    continue;
                }
            }
            // Armed for a sleeper: entries published before the arming raise no call of their
            // own, so they are taken now (the sleeper may be asleep already).
            if broken || (usize::from(taken) < DRAIN_BATCH && !(rearmed && self.has_used())) {
                return total;
            }
            if usize::from(taken) == DRAIN_BATCH {
                // Posts get the ring between batches (and a drainer that takes it meanwhile
                // keeps the order: it delivers under the lock or marks its dispatch).
                drop(st);
                st = self.lock();
                if st.dispatching {
                    return total;
                }
            }
        }
    }

    /// The ring lock with no drainer dispatching a request without it: every record is then
    /// still (no poster, no drainer touches one).
    fn lock_quiet(&self) -> SpinGuard<'_, QueueState> {
        loop {
            let st = self.lock();
            if !st.dispatching {
                return st;
            }
            drop(st);
            std::thread::yield_now();
        }
    }

    /// Take the queue out of the domain's busy mask if it has nothing in flight (drains leave
    /// it in: a queue is usually busy again at once). Under the ring lock, as a post puts it
    /// back in, so no update is lost.
    #[inline]
    pub fn leave_scan_if_idle(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0 && self.busy_bit != 0 {
            self.leave_scan();
        }
    }

    #[cold]
    fn leave_scan(&self) {
        let st = self.lock();
        if st.ring.chains_in_flight() == 0 {
            self.signals
                .busy
                .fetch_and(!self.busy_bit, Ordering::Relaxed);
        }
    }

    #[cold]
    fn mark_broken(&self, st: &QueueState) {
        if !self.broken.swap(true, Ordering::Relaxed) {
            tracing::error!(queue = self.index, why = ?st.ring.broken(), "virtqueue broken");
        }
    }

    /// Publish the new consumption point and set the call suppression for it: armed if a
    /// thread of the domain sleeps for calls, parked otherwise. Pairs with [`Virtqueue::arm`]
    /// (a sleeper counts itself, fences, reads `last_used` and arms there, then re-reads it):
    /// either the sleeper sees our `last_used` and arms at it, or our fenced read of
    /// `blockers` sees the sleeper and we arm for it. Returns whether we armed for a sleeper:
    /// the caller must then take the entries the device published before the arming (it
    /// calls only for entries after it, and the sleeper's call may have gone to a thread that
    /// woke with it).
    ///
    /// With EVENT_IDX nothing needs parking: a sleeper armed `used_event` at a position the
    /// drain has now taken, and the device calls only when its used index passes
    /// `used_event` again (the whole 2^16 range later; a parked value is passed after half
    /// of it). Without it, the avail flags' NO_INTERRUPT is set again.
    #[inline]
    fn after_take(&self, last_used: u16) -> bool {
        self.last_used.store(last_used, Ordering::Relaxed);
        if !self.event_idx {
            self.call_control()
                .store(park_value(false, last_used), Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        if self.signals.blockers.load(Ordering::Relaxed) > 0 {
            self.call_control()
                .store(arm_value(self.event_idx, last_used), Ordering::SeqCst);
            return true;
        }
        false
    }

    /// A chain just taken, under the ring lock: deliver the common case (its cookie, a used
    /// length that holds it, nothing received inline) through [`Dispatch::fast`], reading the
    /// completion where the device wrote it, the record going back to idle. Anything else is
    /// validated on a copy of the completion (copied out into `completion` once, never re-read
    /// from device memory) and left for [`Dispatch::finished`].
    #[inline(always)]
    fn take(
        &self,
        u: &UsedElem,
        completion: &mut MaybeUninit<Completion>,
        to: &mut impl Dispatch<R>,
    ) -> Taken {
        // SAFETY: the device returned this head and it is not released yet, so no post can
        // reuse it; we are the queue's only drainer (holding `state`). The ring checked the
        // head (< size, the number of records).
        let record = unsafe { &mut *self.requests.get_unchecked(u.head as usize).get() };
        // The ring returns only heads it published, and a head's record is busy exactly while
        // its chain is published.
        debug_assert!(record.busy);
        if (u.len as usize) < COMPLETION_LEN {
            // Length 0: the device failed the chain without a completion; anything else
            // shorter than a completion is a fault.
            return Taken::Slow {
                has_completion: false,
                device_fault: u.len != 0 || !u.len_ok,
            };
        }
        let at = self.slot(u.head).wrapping_add(SLOT_COMPLETION) as *const Completion;
        let device = DeviceCompletion(at);
        if u.len_ok
            && record.inline_rx == 0
            && device.cookie() == record.cookie
            // SAFETY: initialised while `busy`.
            && to.fast(unsafe { record.op.assume_init_ref() }, &device)
        {
            // Owns nothing (see `Dispatch::fast`): back to idle without a drop.
            record.busy = false;
            return Taken::Done;
        }
        // SAFETY: the completion lies inside the slot of a chain the device returned (64
        // bytes at a 64-aligned offset); we copy it out once and validate the copy.
        let c = unsafe {
            std::ptr::copy_nonoverlapping(at, completion.as_mut_ptr(), 1);
            completion.assume_init_ref()
        };
        let mismatch = u64::from(c.cookie) != record.cookie;
        if mismatch {
            self.cookie_mismatch(record.cookie, u64::from(c.cookie));
        }
        Taken::Slow {
            has_completion: true,
            device_fault: mismatch || !u.len_ok,
        }
    }

    /// Dispatch a taken chain that [`Virtqueue::take`] left for [`Dispatch::finished`] (its
    /// completion, as copied out), without the ring lock; the record goes back to idle.
    #[cold]
    fn finish(
        &self,
        u: &UsedElem,
        completion: Option<&Completion>,
        device_fault: bool,
        to: &mut impl Dispatch<R>,
    ) {
        // SAFETY: as in `take`: the head is not released yet and we are marked `dispatching`.
        let record = unsafe { &mut *self.requests[u.head as usize].get() };
        let inline_rx = record.inline_rx as usize;
        let inline_data: &[u8] = match completion {
            Some(c) if inline_rx > 0 => {
                let placed = (u64::from(c.len) as usize).min(inline_rx);
                // SAFETY: the inline area [320 - inline_rx, 320) is inside the slot and
                // `placed` ≤ inline_rx; the head stays ours (not reposted) until it is
                // released after dispatch. The device is done with it; bytes a misbehaving
                // device changes meanwhile are only copied.
                unsafe {
                    std::slice::from_raw_parts(
                        self.slot(u.head).add(SLOT_COMPLETION - inline_rx),
                        placed,
                    )
                }
            }
            _ => &[],
        };
        to.finished(Finished {
            cookie: record.cookie,
            // SAFETY: initialised while `busy` (`take` leaves only busy records here).
            op: unsafe { record.op.assume_init_mut() },
            completion,
            device_fault,
            inline_data,
        });
        record.busy = false;
        // SAFETY: initialised until now; `busy` is already cleared, so it is dropped once.
        unsafe { record.op.assume_init_drop() };
    }

    #[cold]
    fn cookie_mismatch(&self, expected: u64, got: u64) {
        tracing::warn!(
            queue = self.index,
            expected,
            got,
            "completion cookie mismatch"
        );
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
    pub fn find_cookie(&self, mut pred: impl FnMut(&R) -> bool) -> Option<u64> {
        let _st = self.lock_quiet();
        self.requests
            .iter()
            // SAFETY: with `state` held and no dispatch going on, no poster and no drainer
            // touches any record.
            .map(|r| unsafe { &*r.get() })
            .filter(|r| r.op().is_some_and(&mut pred))
            .map(|r| r.cookie)
            .min_by_key(|c| c >> 24)
    }

    /// Change the record of every request in flight with `f`, with the ring lock held and no
    /// dispatch going on (rare: an endpoint going away).
    pub fn update_in_flight(&self, mut f: impl FnMut(&mut R)) {
        let _st = self.lock_quiet();
        for r in self.requests.iter() {
            // SAFETY: with `state` held and no dispatch going on, no poster and no drainer
            // touches any record.
            let r = unsafe { &mut *r.get() };
            if r.busy {
                // SAFETY: initialised while `busy`.
                f(unsafe { r.op.assume_init_mut() });
            }
        }
    }

    /// Requests in flight (for tests and diagnostics).
    pub fn in_flight(&self) -> usize {
        let _st = self.lock_quiet();
        self.requests
            .iter()
            // SAFETY: with `state` held and no dispatch going on, no poster and no drainer
            // touches any record.
            .filter(|r| unsafe { &*r.get() }.busy)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Payload;
    use vfabric_proto::Status;

    /// A request record that is just a number.
    struct Op(u64);

    fn queue(signals: &Arc<DomainSignals>) -> (Arc<SharedMemory>, Virtqueue<Op>) {
        let mem = SharedMemory::new("vfabric-test", 1 << 20).unwrap();
        let vq = Virtqueue::new(&mem, 1, 8, true, signals.clone()).unwrap();
        (mem, vq)
    }

    fn post(vq: &Virtqueue<Op>, n: u64) -> u64 {
        vq.post(
            ReqHeader::default,
            TxData::<Payload<'_>>::None,
            RxData::None,
            false,
            false,
            || Op(n),
        )
        .unwrap()
    }

    /// Play the device: write the completion of the request `cookie` with `status` and
    /// publish its chain in the used ring.
    fn complete(vq: &Virtqueue<Op>, cookie: u64, status: Status) {
        let head = cookie as u16;
        let c = Completion {
            status: (status as u32).into(),
            cookie: cookie.into(),
            ..Completion::default()
        };
        let layout = vq.lock().ring.layout();
        let base = vq._ring_mem.ptr();
        // SAFETY: the slot of a published head and the used ring are inside the queue's two
        // allocations; the driver reads them only after the used index below is published.
        unsafe {
            (vq.slot(head).add(SLOT_COMPLETION) as *mut Completion).write(c);
            let used_idx = &*(base.add(layout.used + 2) as *const AtomicU16);
            let idx = used_idx.load(Ordering::Relaxed);
            let elem = base.add(layout.used + 4 + 8 * usize::from(idx & (layout.size - 1)));
            (elem as *mut u32).write(u32::from(head));
            (elem.add(4) as *mut u32).write(COMPLETION_LEN as u32);
            used_idx.store(idx.wrapping_add(1), Ordering::Release);
        }
    }

    /// Records the numbers of the requests delivered, successes on the fast path.
    #[derive(Default)]
    struct Collect {
        delivered: Vec<u64>,
    }

    impl Dispatch<Op> for Collect {
        fn fast(&mut self, op: &Op, c: &DeviceCompletion) -> bool {
            if c.status() != Status::Ok as u32 {
                return false;
            }
            self.delivered.push(op.0);
            true
        }
        fn finished(&mut self, f: Finished<'_, Op>) {
            self.delivered.push(f.op.0);
        }
    }

    #[test]
    fn an_idle_queue_leaves_the_busy_mask_when_a_scan_finds_it_idle() {
        let signals = Arc::new(DomainSignals::default());
        let (_mem, vq) = queue(&signals);
        let in_mask = || signals.busy.load(Ordering::Relaxed) & (1 << 1) != 0;
        let cookie = post(&vq, 7);
        assert!(in_mask(), "a post puts its queue in the mask");
        complete(&vq, cookie, Status::Ok);
        let mut to = Collect::default();
        assert_eq!(vq.drain(&mut to), 1);
        assert_eq!(to.delivered, [7]);
        assert_eq!(vq.in_flight(), 0);
        // Idle now, but the drain left it in: a queue is usually busy again at once.
        assert!(in_mask());
        // Busy again: a scan leaves it in.
        let cookie = post(&vq, 8);
        vq.leave_scan_if_idle();
        assert!(in_mask());
        complete(&vq, cookie, Status::Ok);
        assert_eq!(vq.drain(&mut to), 1);
        // A scan that finds it idle (nothing to drain, nothing in flight) takes it out...
        assert!(!vq.needs_drain());
        vq.leave_scan_if_idle();
        assert!(!in_mask());
        // ... and the next post puts it back.
        post(&vq, 9);
        assert!(in_mask());
        assert_eq!(to.delivered, [7, 8]);
    }

    /// Dispatches the requests it does not take on the fast path without the ring lock, and
    /// meanwhile lets another thread drain and post.
    struct Meanwhile<'a> {
        vq: &'a Virtqueue<Op>,
        delivered: Vec<u64>,
        /// What another thread's drain and post did during the dispatch.
        during: Vec<(usize, Vec<u64>, u64)>,
    }

    impl Dispatch<Op> for Meanwhile<'_> {
        fn fast(&mut self, op: &Op, c: &DeviceCompletion) -> bool {
            Collect::default().fast(op, c) && {
                self.delivered.push(op.0);
                true
            }
        }
        fn finished(&mut self, f: Finished<'_, Op>) {
            let vq = self.vq;
            let during = std::thread::scope(|s| {
                s.spawn(move || {
                    let mut other = Collect::default();
                    let drained = vq.drain(&mut other);
                    (drained, other.delivered, post(vq, 30))
                })
                .join()
                .unwrap()
            });
            self.during.push(during);
            self.delivered.push(f.op.0);
        }
    }

    #[test]
    fn a_dispatch_without_the_ring_lock_keeps_other_drainers_out_and_lets_posts_in() {
        let signals = Arc::new(DomainSignals::default());
        let (_mem, vq) = queue(&signals);
        let first = post(&vq, 1);
        let second = post(&vq, 2);
        // The first fails (dispatched without the lock), the second succeeds.
        complete(&vq, first, Status::Fault);
        complete(&vq, second, Status::Ok);
        let mut to = Meanwhile {
            vq: &vq,
            delivered: Vec::new(),
            during: Vec::new(),
        };
        assert_eq!(vq.drain(&mut to), 2);
        // In ring order: the other drainer took nothing while the first was dispatched (it
        // would have delivered the second before it), and its post went through.
        assert_eq!(to.delivered, [1, 2]);
        assert_eq!(to.during.len(), 1);
        let (drained, delivered, posted) = &to.during[0];
        assert_eq!((*drained, delivered.len()), (0, 0));
        assert_eq!(vq.in_flight(), 1);
        complete(&vq, *posted, Status::Ok);
        let mut after = Collect::default();
        assert_eq!(vq.drain(&mut after), 1);
        assert_eq!(after.delivered, [30]);
    }

    /// Records how each request was delivered: on the fast path, or by `finished` with its
    /// device-fault verdict and the status of the completion it was handed.
    #[derive(Default)]
    struct Verdicts {
        fast: Vec<u64>,
        finished: Vec<(u64, bool, Option<u32>)>,
        broken: Vec<u16>,
    }

    impl Dispatch<Op> for Verdicts {
        fn broken(&mut self, index: u16) {
            self.broken.push(index);
        }
        fn fast(&mut self, op: &Op, c: &DeviceCompletion) -> bool {
            if c.status() != Status::Ok as u32 {
                return false;
            }
            self.fast.push(op.0);
            true
        }
        fn finished(&mut self, f: Finished<'_, Op>) {
            let status = f.completion.map(|c| u32::from(c.status));
            self.finished.push((f.op.0, f.device_fault, status));
        }
    }

    #[test]
    fn a_completion_with_another_cookie_is_a_device_fault_never_the_fast_path() {
        let signals = Arc::new(DomainSignals::default());
        let (_mem, vq) = queue(&signals);
        let first = post(&vq, 1);
        let second = post(&vq, 2);
        // The first's completion carries a stale cookie (an older request's on its head), a
        // success otherwise; the second's is right.
        let stale = first.wrapping_sub(COOKIE_SEQ_ONE);
        complete(&vq, first, Status::Ok);
        // SAFETY: the slot of a published head; the driver reads it after the drain starts.
        unsafe {
            let c = vq.slot(first as u16).add(SLOT_COMPLETION) as *mut Completion;
            (*c).cookie = stale.into();
        }
        complete(&vq, second, Status::Ok);
        let mut to = Verdicts::default();
        assert_eq!(vq.drain(&mut to), 2);
        assert_eq!(to.fast, [2]);
        assert_eq!(to.finished, [(1, true, Some(Status::Ok as u32))]);
    }

    #[test]
    fn counters_count_posts_completions_and_kicks() {
        let signals = Arc::new(DomainSignals::default());
        let (_mem, vq) = queue(&signals);
        let cookies: Vec<u64> = (0..3).map(|n| post(&vq, n)).collect();
        complete(&vq, cookies[0], Status::Ok);
        complete(&vq, cookies[1], Status::Fault);
        let mut to = Collect::default();
        assert_eq!(vq.drain(&mut to), 2);
        let c = vq.counters();
        // The device asked for a kick at avail index 0 only (its initial avail_event): the
        // first post kicked, the two after it did not.
        assert_eq!((c.posted, c.completed, c.kicks), (3, 2, 1));
        complete(&vq, cookies[2], Status::Ok);
        assert_eq!(vq.drain(&mut to), 1);
        post(&vq, 3);
        let c = vq.counters();
        assert_eq!((c.posted, c.completed), (4, 3));
    }

    #[test]
    fn an_urgent_post_kicks_at_once_even_with_more() {
        let signals = Arc::new(DomainSignals::default());
        let (_mem, vq) = queue(&signals);
        let post_with = |more, urgent| {
            vq.post(
                ReqHeader::default,
                TxData::<Payload<'_>>::None,
                RxData::None,
                more,
                urgent,
                || Op(0),
            )
            .unwrap()
        };
        // The first post kicks (the device's initial avail_event asks for index 0).
        post_with(false, false);
        assert_eq!(vq.counters().kicks, 1);
        // Suppressed from now on: a plain post does not kick, a `more` one leaves it to later.
        post_with(false, false);
        post_with(true, false);
        assert_eq!(vq.counters().kicks, 1);
        // An urgent one kicks at once, `more` or not, and covers the chains before it.
        post_with(true, true);
        assert_eq!(vq.counters().kicks, 2);
        vq.flush();
        assert_eq!(vq.counters().kicks, 2);
    }

    #[test]
    fn a_drain_that_finds_the_ring_broken_tells_its_dispatch() {
        let signals = Arc::new(DomainSignals::default());
        let (_mem, vq) = queue(&signals);
        let first = post(&vq, 1);
        post(&vq, 2);
        complete(&vq, first, Status::Ok);
        // The device returns a head that is not in flight (in place of the second).
        let layout = vq.lock().ring.layout();
        let base = vq._ring_mem.ptr();
        // SAFETY: the used ring is inside the queue's ring allocation.
        unsafe {
            let used_idx = &*(base.add(layout.used + 2) as *const AtomicU16);
            let idx = used_idx.load(Ordering::Relaxed);
            let elem = base.add(layout.used + 4 + 8 * usize::from(idx & (layout.size - 1)));
            (elem as *mut u32).write(5);
            (elem.add(4) as *mut u32).write(COMPLETION_LEN as u32);
            used_idx.store(idx.wrapping_add(1), Ordering::Release);
        }
        let mut to = Verdicts::default();
        // The entry before the bad one is delivered; the ring breaks at the bad one.
        assert_eq!(vq.drain(&mut to), 1);
        assert_eq!(to.fast, [1]);
        assert_eq!(to.broken, [1]);
        assert!(vq.is_broken());
        // Every drain that finds it broken says so (the domain's stop is idempotent).
        vq.drain(&mut to);
        assert_eq!(to.broken, [1, 1]);
    }
}
