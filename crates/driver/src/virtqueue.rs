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

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vfabric_proto::{ByteValued, Completion, ReqHeader, COMPLETION_LEN, REQ_HEADER_LEN};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::cq::CqShared;
use crate::endpoint::EpShared;
use crate::memory::{Allocation, SharedMemory};
use crate::ring::{BufferDesc, RingError, RingLayout, SplitRing};
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
const MAX_CHAIN: usize = 2 + 2 * MAX_DATA_DESCS;

/// Payload of a request (readable bytes after the header).
pub(crate) enum TxData<'a> {
    None,
    /// Copied into the slot right after the header (total ≤ [`INLINE_TX_MAX`]).
    Inline(&'a [&'a [u8]]),
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

/// Where received bytes go once the request completes (bounce copy-out).
pub(crate) enum CopyOut {
    /// Nothing to copy (zero-copy buffer, send, or no data).
    None,
    /// Into caller memory outside the region (`recv_raw`): (address, length).
    Raw(usize, usize),
    /// Into several caller buffers, in order (receive iovs).
    Scatter(Vec<(usize, usize)>),
    /// Into a fresh `Vec<u8>` handed back in the CQ entry (`recv_vec`).
    Vec,
}

/// Shared buffers a request keeps alive while the device may use them (one inline, more in
/// a vector, so the common case does not allocate).
#[derive(Default)]
pub(crate) struct Keepalive {
    first: Option<Arc<Allocation>>,
    rest: Vec<Arc<Allocation>>,
}

impl Keepalive {
    pub fn push(&mut self, a: Arc<Allocation>) {
        if self.first.is_none() {
            self.first = Some(a);
        } else {
            self.rest.push(a);
        }
    }
}

/// Fixed-capacity list of (address, length) data descriptors of one request.
pub(crate) struct DescList {
    items: [(u64, u32); MAX_DATA_DESCS],
    len: usize,
}

impl DescList {
    pub fn new() -> Self {
        Self {
            items: [(0, 0); MAX_DATA_DESCS],
            len: 0,
        }
    }
    pub fn push(&mut self, addr: u64, len: u32) -> Result<()> {
        let slot = self.items.get_mut(self.len).ok_or_else(|| {
            Error::InvalidArgument(format!("more than {MAX_DATA_DESCS} data buffers"))
        })?;
        *slot = (addr, len);
        self.len += 1;
        Ok(())
    }
    pub fn as_slice(&self) -> &[(u64, u32)] {
        &self.items[..self.len]
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Bytes received into a request slot's inline area (copied out under the queue lock).
pub(crate) struct InlineData {
    bytes: [u8; INLINE_RX_MAX],
    len: usize,
}

impl InlineData {
    const fn empty() -> Self {
        Self {
            bytes: [0; INLINE_RX_MAX],
            len: 0,
        }
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// What a data request completes into.
pub(crate) struct DataOp {
    pub ep: Arc<EpShared>,
    pub context: u64,
    /// CQ for a successful completion (`None`: suppressed, e.g. inject or selective).
    pub cq: Option<Arc<CqShared>>,
    /// CQ for an error completion (`None`: only logged, e.g. inject).
    pub err_cq: Option<Arc<CqShared>>,
    /// libfabric flags of the CQ entry (`fi::SEND | fi::MSG`, ...).
    pub fi_flags: u64,
    pub is_recv: bool,
    /// TRECV PEEK: the entry reports the message length, no data moved.
    pub peek: bool,
    /// TRECV PEEK|CLAIM: remember the cookie for a later CLAIM with the same context.
    pub record_claim: bool,
    /// Receive capacity posted (bytes).
    pub rx_len: usize,
    pub copy_out: CopyOut,
    /// Bounce buffer holding the payload or the received bytes.
    pub bounce: Option<Allocation>,
    /// Keeps `SharedBuf`s alive while the device may use them.
    pub _keepalive: Keepalive,
}

pub(crate) enum PendingOp {
    Control {
        /// Data area of the control request (e.g. the QUERY_CAPS answer).
        data: Option<Allocation>,
    },
    Data(DataOp),
    /// A posted MR_EVENT (remote-access report, no buffers).
    MrEvent,
}

pub(crate) struct Pending {
    pub cookie: u64,
    pub op: PendingOp,
}

/// A request the device returned.
pub(crate) struct Finished {
    pub pending: Pending,
    /// `None` if the device returned the chain with used length 0 (failed request, no
    /// completion written), or wrote an unreadable one.
    pub completion: Option<Completion>,
    /// The device reported more bytes than the chain could hold, or a mismatched cookie.
    pub device_fault: bool,
    /// Bytes received into the slot's inline area.
    pub inline_data: InlineData,
}

thread_local! {
    /// Batch of finished requests, reused across polls of this thread.
    static POLL_BATCH: std::cell::RefCell<Vec<Finished>> = const { std::cell::RefCell::new(Vec::new()) };
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
    pending: Vec<Option<Pending>>,
    /// Inline RX length posted per head (needed to find the data in the slot).
    inline_rx: Vec<u16>,
    /// Threads blocked waiting for a call on this queue.
    waiters: u32,
    seq: u64,
}

pub(crate) struct Virtqueue {
    pub index: u16,
    state: Mutex<QueueState>,
    /// Serialises draining (pop + dispatch) so completions reach CQs in used-ring order.
    progress: Mutex<()>,
    used_idx: *const AtomicU16,
    last_used: AtomicU16,
    broken: AtomicBool,
    slots: *mut u8,
    pub kick: EventFd,
    pub call: EventFd,
    size: u16,
    pub(crate) counters: QueueCounters,
    _ring_mem: Allocation,
    _slot_mem: Allocation,
}

// SAFETY: the raw pointers point into the domain's shared mapping, kept alive by the two
// `Allocation`s we own. Slot `i` is written only by the thread holding `state` while posting
// chain `i` and read only while popping it under the same lock; `used_idx` is only read
// atomically.
unsafe impl Send for Virtqueue {}
// SAFETY: see `Send`.
unsafe impl Sync for Virtqueue {}

impl Virtqueue {
    pub fn new(mem: &Arc<SharedMemory>, index: u16, size: u16, event_idx: bool) -> Result<Self> {
        let layout = RingLayout::new(size);
        let ring_mem = mem.alloc(layout.total, 4096)?;
        let slot_mem = mem.alloc(SLOT_STRIDE * size as usize, 4096)?;
        slot_mem.zero();
        // SAFETY: `ring_mem` is a fresh 4096-aligned allocation of `layout.total` bytes owned
        // by this virtqueue for as long as the ring exists.
        let ring = unsafe { SplitRing::new(ring_mem.ptr(), layout, event_idx) };
        let used_idx = ring.used_idx_ptr();
        Ok(Self {
            index,
            used_idx,
            last_used: AtomicU16::new(0),
            broken: AtomicBool::new(false),
            slots: slot_mem.ptr(),
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            size,
            counters: QueueCounters::default(),
            state: Mutex::new(QueueState {
                ring,
                pending: (0..size).map(|_| None).collect(),
                inline_rx: vec![0; size as usize],
                waiters: 0,
                seq: 1,
            }),
            progress: Mutex::new(()),
            _ring_mem: ring_mem,
            _slot_mem: slot_mem,
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Ring addresses for SET_VRING_ADDR: (descriptor table, avail ring, used ring).
    pub fn ring_addrs(&self) -> (u64, u64, u64) {
        let st = self.lock();
        (
            st.ring.desc_addr(),
            st.ring.avail_addr(),
            st.ring.used_addr(),
        )
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap()
    }

    fn slot(&self, head: u16) -> *mut u8 {
        debug_assert!(head < self.size);
        // SAFETY: head < size and the slot area holds `size` slots.
        unsafe { self.slots.add(head as usize * SLOT_STRIDE) }
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// Post one request. `header.cookie` is assigned here. Returns the cookie.
    /// `Err(Error::Again)` if the ring has no room. With `more` (libfabric `FI_MORE`) the kick
    /// decision is left to the next post without it, which covers every chain published since.
    pub fn post(
        &self,
        header: &mut ReqHeader,
        tx: TxData<'_>,
        rx: RxData<'_>,
        op: PendingOp,
        more: bool,
    ) -> Result<u64> {
        let (inline_tx_len, tx_descs): (usize, &[(u64, u32)]) = match &tx {
            TxData::None => (0, &[]),
            TxData::Inline(parts) => (parts.iter().map(|p| p.len()).sum(), &[]),
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
        let head = st.ring.next_head(n).ok_or(Error::Again)?;
        let cookie = (st.seq << 24) | ((self.index as u64) << 16) | head as u64;
        st.seq += 1;
        header.cookie = cookie.into();
        let slot = self.slot(head);
        // SAFETY: the slot of a free head belongs to us until the chain is published; all
        // writes below stay inside the SLOT_STRIDE bytes of the slot.
        unsafe {
            std::ptr::copy_nonoverlapping(header.as_slice().as_ptr(), slot, REQ_HEADER_LEN);
            if let TxData::Inline(parts) = &tx {
                let mut at = SLOT_INLINE_TX;
                for p in parts.iter() {
                    std::ptr::copy_nonoverlapping(p.as_ptr(), slot.add(at), p.len());
                    at += p.len();
                }
            }
            std::ptr::write_bytes(slot.add(SLOT_COMPLETION), 0, COMPLETION_LEN);
        }
        let slot_addr = slot as u64;
        let mut chain = [BufferDesc {
            addr: 0,
            len: 0,
            writable: false,
        }; MAX_CHAIN];
        let mut c = 0;
        chain[c] = BufferDesc {
            addr: slot_addr,
            len: (REQ_HEADER_LEN + inline_tx_len) as u32,
            writable: false,
        };
        c += 1;
        for &(addr, len) in tx_descs {
            chain[c] = BufferDesc {
                addr,
                len,
                writable: false,
            };
            c += 1;
        }
        for &(addr, len) in rx_descs {
            chain[c] = BufferDesc {
                addr,
                len,
                writable: true,
            };
            c += 1;
        }
        chain[c] = BufferDesc {
            addr: slot_addr + (SLOT_COMPLETION - inline_rx_len) as u64,
            len: (inline_rx_len + COMPLETION_LEN) as u32,
            writable: true,
        };
        c += 1;
        let got = st.ring.add(&chain[..c]).map_err(|e| match e {
            RingError::Full => Error::Again,
            other => Error::Transport(other.to_string()),
        })?;
        debug_assert_eq!(got, head);
        st.pending[head as usize] = Some(Pending { cookie, op });
        st.inline_rx[head as usize] = inline_rx_len as u16;
        let kick = !more && st.ring.needs_kick();
        drop(st);
        self.counters.posted.fetch_add(1, Ordering::Relaxed);
        if kick {
            self.counters.kicks.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.kick.write(1) {
                tracing::warn!(queue = self.index, error = %e, "kick failed");
            }
        }
        Ok(cookie)
    }

    /// Lock-free check for used entries we have not consumed.
    pub fn has_used(&self) -> bool {
        // SAFETY: `used_idx` points into the ring allocation we own.
        let idx = u16::from_le(unsafe { (*self.used_idx).load(Ordering::Acquire) });
        idx != self.last_used.load(Ordering::Relaxed)
    }

    /// Drain the used ring and hand every finished request to `dispatch`, in ring order.
    /// Returns how many were drained. If another thread is draining this queue, returns 0.
    pub fn poll(&self, mut dispatch: impl FnMut(Finished)) -> Result<usize> {
        if !self.has_used() && !self.is_broken() {
            return Ok(0);
        }
        let Ok(_draining) = self.progress.try_lock() else {
            return Ok(0);
        };
        // Reuse this thread's batch vector: no allocation per poll.
        let mut done = POLL_BATCH.with(|b| std::mem::take(&mut *b.borrow_mut()));
        let mut broken = None;
        {
            let mut st = self.lock();
            loop {
                match st.ring.pop_used() {
                    Ok(Some(u)) => {
                        let head = u.head as usize;
                        let Some(pending) = st.pending[head].take() else {
                            broken = Some(format!("head {head} completed without a request"));
                            break;
                        };
                        let inline_rx = st.inline_rx[head] as usize;
                        done.push(self.read_finished(u, pending, inline_rx));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        broken = Some(e.to_string());
                        break;
                    }
                }
            }
            if st.waiters > 0 {
                st.ring.arm();
            } else if !done.is_empty() {
                st.ring.disarm();
            }
            self.last_used.store(st.ring.last_used(), Ordering::Relaxed);
        }
        if let Some(why) = broken {
            if !self.broken.swap(true, Ordering::Relaxed) {
                tracing::error!(queue = self.index, %why, "virtqueue broken");
            }
        }
        let n = done.len();
        self.counters
            .completed
            .fetch_add(n as u64, Ordering::Relaxed);
        for f in done.drain(..) {
            dispatch(f);
        }
        POLL_BATCH.with(|b| *b.borrow_mut() = done);
        Ok(n)
    }

    fn read_finished(
        &self,
        u: crate::ring::UsedElem,
        pending: Pending,
        inline_rx: usize,
    ) -> Finished {
        let slot = self.slot(u.head);
        let mut device_fault = !u.len_ok;
        let completion = if u.len == 0 {
            None
        } else if (u.len as usize) < COMPLETION_LEN {
            device_fault = true;
            None
        } else {
            let mut c = Completion::default();
            // SAFETY: the completion lies inside the slot of a chain the device returned; we
            // copy it out once and validate the copy, never re-reading device memory.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    slot.add(SLOT_COMPLETION),
                    c.as_mut_slice().as_mut_ptr(),
                    COMPLETION_LEN,
                )
            };
            if u64::from(c.cookie) != pending.cookie {
                tracing::warn!(
                    queue = self.index,
                    expected = pending.cookie,
                    got = u64::from(c.cookie),
                    "completion cookie mismatch"
                );
                device_fault = true;
            }
            Some(c)
        };
        let mut inline_data = InlineData::empty();
        if inline_rx > 0 {
            if let Some(c) = &completion {
                let placed = (u64::from(c.len) as usize).min(inline_rx);
                // SAFETY: the inline area [320 - inline_rx, 320) is inside the slot; `placed`
                // is clamped to it and to the destination array (inline_rx ≤ INLINE_RX_MAX).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        slot.add(SLOT_COMPLETION - inline_rx),
                        inline_data.bytes.as_mut_ptr(),
                        placed,
                    )
                };
                inline_data.len = placed;
            }
        }
        Finished {
            pending,
            completion,
            device_fault,
            inline_data,
        }
    }

    /// Announce a waiter and ask the device for a call at the next used entry. Returns true
    /// if used entries are already pending.
    pub fn arm(&self) -> bool {
        let mut st = self.lock();
        st.waiters += 1;
        st.ring.arm()
    }

    /// Undo one [`Virtqueue::arm`].
    pub fn disarm(&self) {
        let mut st = self.lock();
        st.waiters = st.waiters.saturating_sub(1);
        if st.waiters == 0 {
            st.ring.disarm();
        }
    }

    /// Cookie of the first in-flight request matching `pred`, in posting order.
    pub fn find_cookie(&self, mut pred: impl FnMut(&Pending) -> bool) -> Option<u64> {
        let st = self.lock();
        st.pending
            .iter()
            .flatten()
            .filter(|p| pred(p))
            .map(|p| p.cookie)
            .min_by_key(|c| c >> 24)
    }

    /// Requests in flight (for tests and diagnostics).
    pub fn in_flight(&self) -> usize {
        self.lock().pending.iter().flatten().count()
    }
}
