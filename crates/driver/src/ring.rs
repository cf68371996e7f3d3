// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Driver side of a virtio split ring (virtio 1.x, `split-ring.tex`) with EVENT_IDX.
//!
//! The ring lives in memory the device can write. The driver therefore keeps a private shadow
//! of everything it needs (descriptor links, chain lengths, writable sizes, indices) and only
//! *reads* two things from the device: the used ring (ids and lengths, validated against the
//! shadow) and `avail_event` (a hint for kick suppression, harmless if wrong).
//!
//! Layout of a ring of `size` entries inside one allocation:
//! descriptor table (16·size, at 0), avail ring (6 + 2·size, right after), used ring
//! (6 + 8·size, 64-byte aligned so device-written and driver-written lines do not share).

use std::num::Wrapping;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, Ordering};

pub(crate) const VRING_DESC_F_NEXT: u16 = 1;
pub(crate) const VRING_DESC_F_WRITE: u16 = 2;
pub(crate) const VRING_USED_F_NO_NOTIFY: u16 = 1;
pub(crate) const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Distance at which `used_event` is parked while no one waits for a call: the device will not
/// signal until the used index travels this far (in practice: never, the ring holds < 2^15).
const USED_EVENT_PARK: u16 = 0x8000;

/// Value of the call-suppression field that asks for a call at the next used entry after
/// `last_used` (little-endian, as stored).
pub(crate) fn arm_value(event_idx: bool, last_used: u16) -> u16 {
    if event_idx {
        last_used.to_le()
    } else {
        0
    }
}

/// Value of the call-suppression field that asks for no calls while we poll.
pub(crate) fn park_value(event_idx: bool, last_used: u16) -> u16 {
    if event_idx {
        last_used.wrapping_add(USED_EVENT_PARK).to_le()
    } else {
        VRING_AVAIL_F_NO_INTERRUPT.to_le()
    }
}

/// One split-ring descriptor as laid out in memory (little-endian fields).
#[cfg(test)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// Offsets of the three ring parts inside the ring allocation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RingLayout {
    pub size: u16,
    pub desc: usize,
    pub avail: usize,
    pub used: usize,
    pub total: usize,
}

impl RingLayout {
    pub fn new(size: u16) -> Self {
        let n = size as usize;
        let desc = 0;
        let avail = 16 * n;
        let avail_end = avail + 6 + 2 * n;
        let used = (avail_end + 63) & !63;
        let total = used + 6 + 8 * n;
        Self {
            size,
            desc,
            avail,
            used,
            total,
        }
    }
}

/// A buffer to put in a chain.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BufferDesc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A validated used-ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UsedElem {
    /// Head descriptor id of the chain (it was in flight).
    pub head: u16,
    /// Bytes the device claims it wrote, clamped to the chain's writable size.
    pub len: u32,
    /// False if the device claimed more bytes than the chain had writable.
    pub len_ok: bool,
}

#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RingError {
    #[error("ring full")]
    Full,
    #[error("bad chain: {0}")]
    BadChain(&'static str),
    #[error("device corrupted the used ring: {0}")]
    Corrupt(String),
}

/// Where the chain headed by a descriptor id is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChainState {
    /// Not the head of a chain in flight.
    Idle,
    /// Published; the device owns it.
    InFlight,
    /// The device returned it; its descriptors go back to the free list on `release`.
    Returned,
}

/// Our record of the chain headed by a descriptor id.
#[derive(Clone, Copy, Debug)]
struct ChainInfo {
    state: ChainState,
    /// Descriptors in the chain (bits 0..16) and how many of them are readable (bits 16..32:
    /// a request chain's header and TX buffers; `u16::MAX` for a chain not built by
    /// [`SplitRing::add_request`], which is never rewritten in place): see [`chain_shape`].
    shape: u32,
    /// Its last descriptor: `release` links it to the free list without walking the chain.
    tail: u16,
    /// Writable bytes of the chain.
    writable: u64,
}

/// [`ChainInfo::shape`] of a chain of `n` descriptors, `readable` of them readable: one word, so
/// a post compares a released chain's shape with one comparison.
#[inline(always)]
fn chain_shape(n: usize, readable: u16) -> u32 {
    n as u32 | u32::from(readable) << 16
}

impl ChainInfo {
    fn len(&self) -> u16 {
        self.shape as u16
    }
}

/// Writes the descriptors of one chain, following the free list.
struct ChainWriter {
    /// Descriptor the next buffer goes into.
    idx: u16,
    /// Writable bytes so far.
    writable: u64,
}

/// The driver's view of one split ring.
pub(crate) struct SplitRing {
    layout: RingLayout,
    base: NonNull<u8>,
    /// The parts the avail side writes or reads on every post, located once (all inside
    /// the allocation at `base`): the descriptor table, the avail ring's first entry, its
    /// index, and the device's kick suppression (`avail_event` with EVENT_IDX, the used
    /// ring's flags without).
    desc_table: NonNull<u64>,
    avail_ring: NonNull<u16>,
    avail_idx: NonNull<AtomicU16>,
    kick_control: NonNull<AtomicU16>,
    /// The used index, read by every drain (located once as well).
    used_idx: NonNull<AtomicU16>,
    /// `size - 1`: ring positions wrap with a mask (the size is a power of two).
    mask: u16,
    /// Free-list link of each descriptor (our private copy: the device may scribble on the
    /// table, never on this).
    links: Box<[u16]>,
    /// The chain headed by each id.
    chains: Box<[ChainInfo]>,
    free_head: u16,
    /// Head of the chain released last. While it is also `free_head`, no chain was published
    /// since (a post takes `free_head`): its descriptors are still linked as that chain, at
    /// the front of the free list, and hold what its post wrote (see
    /// [`SplitRing::add_request`]).
    released: u16,
    /// Chains `add_request` wrote onto the chain released before them (for tests).
    #[cfg(test)]
    rewrites: u32,
    num_free: u16,
    /// Chains published and not yet returned by the device.
    chains_in_flight: u16,
    next_avail: Wrapping<u16>,
    /// `next_avail` at the last kick decision.
    kicked_avail: Wrapping<u16>,
    last_used: Wrapping<u16>,
    event_idx: bool,
    broken: Option<String>,
}

// SAFETY: `base` (and the parts located from it) point into the domain's shared mapping, kept
// alive by the owner of the ring allocation (the `Virtqueue`); all mutation goes through
// `&mut self`, so moving the ring between threads is fine.
unsafe impl Send for SplitRing {}

impl SplitRing {
    /// Build a ring over `layout.total` bytes at `base`.
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `layout.total` bytes, 16-byte aligned, and
    /// stay valid (and not used for anything else by this process) for the ring's lifetime.
    pub unsafe fn new(base: *mut u8, layout: RingLayout, event_idx: bool) -> Self {
        assert!(layout.size.is_power_of_two() && layout.size > 0);
        assert_eq!(base as usize % 16, 0);
        // SAFETY: the caller guarantees `base` covers `layout.total` writable bytes.
        unsafe { std::ptr::write_bytes(base, 0, layout.total) };
        let n = layout.size as usize;
        let base = NonNull::new(base).expect("ring base");
        let kick_control = if event_idx {
            layout.used + 4 + 8 * n
        } else {
            layout.used
        };
        // SAFETY: every offset is inside the `layout.total` bytes at `base` (see `RingLayout`)
        // and suitably aligned (`base` is 16-aligned, the parts' offsets even, the table's 0).
        let (desc_table, avail_ring, avail_idx, kick_control, used_idx) = unsafe {
            (
                base.add(layout.desc).cast(),
                base.add(layout.avail + 4).cast(),
                base.add(layout.avail + 2).cast(),
                base.add(kick_control).cast(),
                base.add(layout.used + 2).cast(),
            )
        };
        let ring = Self {
            layout,
            base,
            desc_table,
            avail_ring,
            avail_idx,
            kick_control,
            used_idx,
            mask: layout.size - 1,
            links: (0..n).map(|i| ((i + 1) % n) as u16).collect(),
            chains: vec![
                ChainInfo {
                    state: ChainState::Idle,
                    shape: chain_shape(0, u16::MAX),
                    tail: 0,
                    writable: 0,
                };
                n
            ]
            .into_boxed_slice(),
            free_head: 0,
            // No descriptor id: nothing released yet.
            released: u16::MAX,
            #[cfg(test)]
            rewrites: 0,
            num_free: layout.size,
            chains_in_flight: 0,
            next_avail: Wrapping(0),
            kicked_avail: Wrapping(0),
            last_used: Wrapping(0),
            event_idx,
            broken: None,
        };
        ring.disarm();
        ring
    }

    /// Free descriptors.
    #[cfg(test)]
    pub fn num_free(&self) -> u16 {
        self.num_free
    }
    #[cfg(test)]
    fn base_addr(&self) -> u64 {
        self.base.as_ptr() as u64
    }
    pub fn layout(&self) -> RingLayout {
        self.layout
    }
    #[cfg(test)]
    pub fn desc_addr(&self) -> u64 {
        self.base_addr() + self.layout.desc as u64
    }
    #[cfg(test)]
    pub fn avail_addr(&self) -> u64 {
        self.base_addr() + self.layout.avail as u64
    }
    #[cfg(test)]
    pub fn used_addr(&self) -> u64 {
        self.base_addr() + self.layout.used as u64
    }
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }
    pub fn last_used(&self) -> u16 {
        self.last_used.0
    }
    /// Head id the next chain of `n` (> 0) descriptors will get, if it fits and the ring is not
    /// broken.
    #[inline]
    pub fn next_head(&self, n: usize) -> Option<u16> {
        (n <= self.num_free as usize && self.broken.is_none()).then_some(self.free_head)
    }
    /// Chains published and not yet taken back with [`SplitRing::take_published`].
    pub fn chains_in_flight(&self) -> u16 {
        self.chains_in_flight
    }

    fn ptr_at(&self, off: usize) -> *mut u8 {
        debug_assert!(off < self.layout.total);
        // SAFETY: `off` is inside the ring allocation (see `new`).
        unsafe { self.base.as_ptr().add(off) }
    }

    fn atomic_u16(&self, off: usize) -> &AtomicU16 {
        // SAFETY: every u16 field of the ring is 2-byte aligned inside the allocation, which
        // lives as long as `self`; AtomicU16 has the layout of u16.
        unsafe { &*(self.ptr_at(off) as *const AtomicU16) }
    }

    fn avail_flags_field(&self) -> &AtomicU16 {
        self.atomic_u16(self.layout.avail)
    }
    fn used_event_field(&self) -> &AtomicU16 {
        self.atomic_u16(self.layout.avail + 4 + 2 * self.layout.size as usize)
    }
    fn used_idx_field(&self) -> &AtomicU16 {
        self.atomic_u16(self.layout.used + 2)
    }

    /// Raw pointer to the used index, for lock-free "anything new?" peeks.
    pub fn used_idx_ptr(&self) -> *const AtomicU16 {
        self.used_idx_field() as *const AtomicU16
    }

    /// Raw pointer to the driver's call-suppression field: `used_event` with EVENT_IDX, the
    /// avail ring's flags without. The virtqueue arms and parks it without the ring lock.
    pub fn call_control_ptr(&self) -> *const AtomicU16 {
        self.call_control() as *const AtomicU16
    }

    /// Add a chain and publish it in the avail ring. Readable buffers must precede writable
    /// ones. Returns the head id.
    #[cfg(test)]
    pub fn add(&mut self, bufs: &[BufferDesc]) -> Result<u16, RingError> {
        if let Some(b) = &self.broken {
            return Err(RingError::Corrupt(b.clone()));
        }
        if bufs.is_empty() {
            return Err(RingError::BadChain("empty chain"));
        }
        if bufs.windows(2).any(|w| w[0].writable && !w[1].writable) {
            return Err(RingError::BadChain("readable buffer after a writable one"));
        }
        if bufs.len() > self.num_free as usize {
            return Err(RingError::Full);
        }
        let head = self.free_head;
        let mut w = ChainWriter {
            idx: head,
            writable: 0,
        };
        for (i, b) in bufs.iter().enumerate() {
            self.put(&mut w, b.addr, b.len, b.writable, i + 1 == bufs.len());
        }
        self.record(head, w.idx, bufs.len(), u16::MAX, w.writable);
        self.publish(head);
        Ok(head)
    }

    /// Add a request chain: `header` (readable), `tx` (readable), `rx` (writable), `tail`
    /// (writable), and publish it. The caller got `head` from [`SplitRing::next_head`] for
    /// exactly these `2 + tx.len() + rx.len()` descriptors (so the ring has room and is not
    /// broken), and the shape is right by construction: nothing is checked again.
    ///
    /// A chain of the same shape as the one released last from the same head (the steady
    /// state of one request after another) takes exactly that chain's descriptors again, whose
    /// flags and links already say what this one's would: only the buffers' addresses and
    /// lengths are written ([`SplitRing::rewrite_request`]).
    #[inline(always)]
    pub fn add_request(
        &mut self,
        head: u16,
        header: (u64, u32),
        tx: &[(u64, u32)],
        rx: &[(u64, u32)],
        tail: (u64, u32),
    ) {
        let n = 2 + tx.len() + rx.len();
        debug_assert!(head == self.free_head && n <= self.num_free as usize);
        debug_assert!(head < self.layout.size);
        // SAFETY: a head is a descriptor id, < size, the length of `chains`.
        let last = unsafe { self.chains.get_unchecked(head as usize) };
        if head == self.released && last.shape == chain_shape(n, 1 + tx.len() as u16) {
            let tail_id = last.tail;
            self.rewrite_request(head, tail_id, header, tx, rx, tail);
            return;
        }
        let mut w = ChainWriter {
            idx: head,
            writable: 0,
        };
        self.put(&mut w, header.0, header.1, false, false);
        // One data buffer (the common shape) without the loop's bookkeeping.
        match tx {
            [] => {}
            &[(addr, len)] => self.put(&mut w, addr, len, false, false),
            _ => {
                for &(addr, len) in tx {
                    self.put(&mut w, addr, len, false, false);
                }
            }
        }
        match rx {
            [] => {}
            &[(addr, len)] => self.put(&mut w, addr, len, true, false),
            _ => {
                for &(addr, len) in rx {
                    self.put(&mut w, addr, len, true, false);
                }
            }
        }
        self.put(&mut w, tail.0, tail.1, true, true);
        self.record(head, w.idx, n, (1 + tx.len()) as u16, w.writable);
        self.publish(head);
    }

    /// [`SplitRing::add_request`] onto the chain released last from `head` (ending at
    /// `tail_id`), of the same shape: the descriptors keep their flags and links, each gets
    /// its buffer's address and length.
    #[inline(always)]
    fn rewrite_request(
        &mut self,
        head: u16,
        tail_id: u16,
        header: (u64, u32),
        tx: &[(u64, u32)],
        rx: &[(u64, u32)],
        tail: (u64, u32),
    ) {
        #[cfg(test)]
        {
            self.rewrites += 1;
        }
        self.set_buffer(head, header);
        let mut idx = head;
        for &buf in tx {
            idx = self.link(idx);
            self.set_buffer(idx, buf);
        }
        let mut writable = u64::from(tail.1);
        for &buf in rx {
            idx = self.link(idx);
            self.set_buffer(idx, buf);
            writable += u64::from(buf.1);
        }
        self.set_buffer(tail_id, tail);
        // The tail's link is where the free list went on when the chain was released.
        self.free_head = self.link(tail_id);
        self.num_free -= (2 + tx.len() + rx.len()) as u16;
        // SAFETY: a head is < size, the length of `chains`.
        let chain = unsafe { self.chains.get_unchecked_mut(head as usize) };
        chain.state = ChainState::InFlight;
        chain.writable = writable;
        self.publish(head);
    }

    /// The free-list link of descriptor `idx` (< size).
    #[inline(always)]
    fn link(&self, idx: u16) -> u16 {
        debug_assert!(idx < self.layout.size);
        // SAFETY: descriptor ids are < size, the length of `links`.
        unsafe { *self.links.get_unchecked(idx as usize) }
    }

    /// Set the address and length of descriptor `idx` (< size), leaving its flags and link.
    #[inline(always)]
    fn set_buffer(&mut self, idx: u16, (addr, len): (u64, u32)) {
        debug_assert!(idx < self.layout.size);
        // SAFETY: idx < size, so the 16-byte, 16-aligned descriptor is inside the table; its
        // length is the u32 at byte 8.
        unsafe {
            let desc = self.desc_table.as_ptr().add(2 * idx as usize);
            std::ptr::write_volatile(desc, addr.to_le());
            std::ptr::write_volatile(desc.add(1).cast::<u32>(), len.to_le());
        }
    }

    /// Write one descriptor of a chain at `w.idx` and move `w` along the free list.
    #[inline(always)]
    fn put(&mut self, w: &mut ChainWriter, addr: u64, len: u32, writable: bool, last: bool) {
        let idx = w.idx;
        debug_assert!(idx < self.layout.size);
        // SAFETY: descriptor ids (the free list's links and its head) are all < size, the
        // length of `links`.
        let link = unsafe { *self.links.get_unchecked(idx as usize) };
        let flags = if last { 0 } else { VRING_DESC_F_NEXT }
            | if writable { VRING_DESC_F_WRITE } else { 0 };
        // The last descriptor keeps its free-list link in `links` only.
        let next = if last { 0 } else { link };
        // Bytes 8..16 of a descriptor: len, flags, next (little-endian), as one store.
        let tail = u64::from(len) | u64::from(flags) << 32 | u64::from(next) << 48;
        // SAFETY: idx < size (as above), so the 16-byte, 16-aligned descriptor is inside the
        // table.
        unsafe {
            let desc = self.desc_table.as_ptr().add(2 * idx as usize);
            std::ptr::write_volatile(desc, addr.to_le());
            std::ptr::write_volatile(desc.add(1), tail.to_le());
        }
        if writable {
            w.writable += len as u64;
        }
        if last {
            self.free_head = link;
        } else {
            w.idx = link;
        }
    }

    /// Record a written chain of `n` descriptors (`readable` of them readable) from `head` to
    /// `tail`, taken off the free list.
    #[inline(always)]
    fn record(&mut self, head: u16, tail: u16, n: usize, readable: u16, writable: u64) {
        self.num_free -= n as u16;
        debug_assert!(head < self.layout.size);
        // SAFETY: a head is a descriptor id, < size, the length of `chains`.
        *unsafe { self.chains.get_unchecked_mut(head as usize) } = ChainInfo {
            state: ChainState::InFlight,
            shape: chain_shape(n, readable),
            tail,
            writable,
        };
    }

    /// Make the recorded chain at `head` visible to the device.
    #[inline(always)]
    fn publish(&mut self, head: u16) {
        let slot = (self.next_avail.0 & self.mask) as usize;
        // SAFETY: slot < size; the avail ring entry is a u16 inside the allocation.
        unsafe { std::ptr::write_volatile(self.avail_ring.as_ptr().add(slot), head.to_le()) };
        self.next_avail += Wrapping(1);
        self.chains_in_flight += 1;
        // Descriptors and the ring entry must be visible before the index.
        // SAFETY: the avail index field, inside the allocation (see `new`).
        unsafe { self.avail_idx.as_ref() }.store(self.next_avail.0.to_le(), Ordering::Release);
    }

    /// Decide whether the device must be kicked for the chains published since the last call.
    pub fn needs_kick(&mut self) -> bool {
        if self.next_avail == self.kicked_avail {
            // Nothing published since the last decision: no fence, no device read.
            return false;
        }
        // Our avail index store must be ordered before reading the device's suppression state.
        fence(Ordering::SeqCst);
        self.needs_kick_fenced()
    }

    /// [`SplitRing::needs_kick`] for a caller that published since the last decision and
    /// fenced (`SeqCst`) after it (a post: there is something to decide, no early way out).
    #[inline(always)]
    pub fn needs_kick_fenced(&mut self) -> bool {
        let new = self.next_avail;
        let old = self.kicked_avail;
        self.kicked_avail = new;
        // SAFETY: `avail_event` or the used flags, inside the allocation (see `new`).
        let control = u16::from_le(unsafe { self.kick_control.as_ref() }.load(Ordering::Relaxed));
        if self.event_idx {
            // vring_need_event(event, new, old)
            (new - Wrapping(control) - Wrapping(1)) < (new - old)
        } else {
            control & VRING_USED_F_NO_NOTIFY == 0
        }
    }

    /// Record a kick of every chain published so far, made whatever the device's suppression
    /// says.
    #[inline(always)]
    pub fn mark_kicked(&mut self) {
        self.kicked_avail = self.next_avail;
    }

    /// Is there a used entry we have not consumed?
    #[cfg(test)]
    pub fn has_used(&self) -> bool {
        u16::from_le(self.used_idx_field().load(Ordering::Acquire)) != self.last_used.0
    }

    /// Take the next used entry (see [`SplitRing::take_used_into`]).
    #[cfg(test)]
    pub fn take_used(&mut self) -> Option<UsedElem> {
        let mut one = [std::mem::MaybeUninit::uninit()];
        // SAFETY: `take_used_into` initialised the first `n` entries.
        (self.take_used_into(&mut one) == 1).then(|| unsafe { one[0].assume_init() })
    }

    /// Take the used entries the device published (as of one read of the used index), up to
    /// `out.len()`, validated against our own state, without freeing their descriptors: each
    /// chain stays ours (its request slot untouched by new posts) until
    /// [`SplitRing::release`]. Returns how many were written to the start of `out`: 0 when
    /// there is nothing new or the ring is broken (see [`SplitRing::broken`]; an invalid entry
    /// breaks it, and the entries before it are returned).
    #[cfg(test)]
    pub fn take_used_into(&mut self, out: &mut [std::mem::MaybeUninit<UsedElem>]) -> usize {
        let n = out.len().min(usize::from(self.used_ready()));
        for (i, slot) in out[..n].iter_mut().enumerate() {
            match self.take_published() {
                Some(u) => {
                    slot.write(u);
                }
                None => return i,
            }
        }
        n
    }

    /// How many used entries the device published and we have not taken, as of one read of
    /// the used index: each can then be taken with [`SplitRing::take_published`]. 0 when there
    /// is nothing new or the ring is broken; a count the ring cannot hold breaks it.
    #[inline]
    pub fn used_ready(&mut self) -> u16 {
        // SAFETY: `used_idx` points into the allocation (see `new`), alive as long as `self`.
        let used_idx = unsafe { self.used_idx.as_ref() };
        let used_idx = Wrapping(u16::from_le(used_idx.load(Ordering::Acquire)));
        if used_idx == self.last_used || self.broken.is_some() {
            return 0;
        }
        let new_entries = (used_idx - self.last_used).0;
        if new_entries > self.chains_in_flight {
            self.corrupt(format!(
                "used index {} is {} ahead of {} with only {} chains in flight",
                used_idx.0, new_entries, self.last_used.0, self.chains_in_flight
            ));
            return 0;
        }
        new_entries
    }

    /// Take the used entry at `last_used`, which the device has published (one of the
    /// [`SplitRing::used_ready`] ones), without freeing its descriptors: the chain stays ours
    /// (its request slot untouched by new posts) until [`SplitRing::release`]. `None` if the
    /// entry is invalid: the ring is broken then (see [`SplitRing::broken`]).
    #[inline(always)]
    pub fn take_published(&mut self) -> Option<UsedElem> {
        let slot = (self.last_used.0 & self.mask) as usize;
        let off = self.layout.used + 4 + 8 * slot;
        // SAFETY: the used element at `slot` is 8 bytes inside the allocation; read once.
        let (id, len) = unsafe {
            let p = self.ptr_at(off);
            (
                u32::from_le(std::ptr::read_volatile(p as *const u32)),
                u32::from_le(std::ptr::read_volatile(p.add(4) as *const u32)),
            )
        };
        let chain = match self.chains.get_mut(id as usize) {
            Some(c) if c.state == ChainState::InFlight => c,
            _ => {
                self.corrupt(format!("used id {id} is not a chain in flight"));
                return None;
            }
        };
        chain.state = ChainState::Returned;
        let writable = chain.writable;
        let len_ok = len as u64 <= writable;
        let len = if len_ok { len } else { writable as u32 };
        self.last_used += Wrapping(1);
        self.chains_in_flight -= 1;
        Some(UsedElem {
            head: id as u16,
            len,
            len_ok,
        })
    }

    /// Give the descriptors of a chain returned by [`SplitRing::take_published`] back to the free
    /// list. Ignores a head that is not returned (nothing to free).
    pub fn release(&mut self, head: u16) {
        let Some(chain) = self.chains.get_mut(head as usize) else {
            return;
        };
        if chain.state != ChainState::Returned {
            debug_assert!(false, "release of head {head} in state {:?}", chain.state);
            return;
        }
        // The rest of the record stays: the chain's descriptors go back linked as they are,
        // for `add_request` to take again.
        chain.state = ChainState::Idle;
        let (n, tail) = (chain.len(), chain.tail);
        self.links[tail as usize] = self.free_head;
        self.free_head = head;
        self.released = head;
        self.num_free += n;
    }

    /// [`SplitRing::release`] of the head [`SplitRing::take_published`] just returned (no
    /// other call on the ring between them): that head is known in range and returned, so
    /// nothing is re-checked.
    ///
    /// # Safety
    /// `head` must be the head of the entry `take_published` returned last, not released yet.
    #[inline(always)]
    pub unsafe fn release_taken(&mut self, head: u16) {
        // SAFETY: `take_published` found `head` in `chains` (so < size) in flight and marked it
        // returned (the caller's guarantee).
        let chain = unsafe { self.chains.get_unchecked_mut(head as usize) };
        debug_assert_eq!(chain.state, ChainState::Returned);
        // As in `release`: the rest of the record stays.
        chain.state = ChainState::Idle;
        let (n, tail) = (chain.len(), chain.tail);
        debug_assert!(tail < self.layout.size);
        // SAFETY: a chain's tail is a descriptor id `record` recorded, < size, the length of
        // `links`.
        *unsafe { self.links.get_unchecked_mut(tail as usize) } = self.free_head;
        self.free_head = head;
        self.released = head;
        self.num_free += n;
    }

    /// Take the next used entry and free its descriptors at once.
    #[cfg(test)]
    pub fn pop_used(&mut self) -> Result<Option<UsedElem>, RingError> {
        let u = self.take_used();
        if let Some(why) = &self.broken {
            return Err(RingError::Corrupt(why.clone()));
        }
        if let Some(u) = u {
            self.release(u.head);
        }
        Ok(u)
    }

    #[cold]
    fn corrupt(&mut self, why: String) {
        tracing::error!(%why, "virtqueue marked broken");
        self.broken = Some(why);
    }

    /// Ask the device for a call at the next used entry. Returns whether used entries are
    /// already pending (then the caller must not sleep).
    #[cfg(test)]
    pub fn arm(&self) -> bool {
        self.call_control().store(
            arm_value(self.event_idx, self.last_used.0),
            Ordering::Relaxed,
        );
        // The event store must be visible before we re-check the used index.
        fence(Ordering::SeqCst);
        self.has_used()
    }

    /// Tell the device we do not want calls (we poll).
    pub fn disarm(&self) {
        self.call_control().store(
            park_value(self.event_idx, self.last_used.0),
            Ordering::Relaxed,
        );
    }

    fn call_control(&self) -> &AtomicU16 {
        if self.event_idx {
            self.used_event_field()
        } else {
            self.avail_flags_field()
        }
    }

    /// Descriptor as it sits in the table (for tests).
    #[cfg(test)]
    pub fn table_entry(&self, id: u16) -> Descriptor {
        assert!(id < self.layout.size);
        // SAFETY: id < size, so the entry is inside the table.
        unsafe {
            std::ptr::read_volatile(
                self.ptr_at(self.layout.desc + 16 * id as usize) as *const Descriptor
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Arc;

    use proptest::prelude::*;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::memory::{Allocation, SharedMemory};

    /// The driver ring plus virtio-queue's device-side `Queue` on the same memfd, mapped a
    /// second time at another address (as the daemon would), with guest address = driver VA.
    struct Harness {
        mem: Arc<SharedMemory>,
        _ring_mem: Allocation,
        ring: SplitRing,
        dev_mem: GuestMemoryMmap,
        queue: Queue,
    }

    fn harness(size: u16, event_idx: bool) -> Harness {
        let mem = SharedMemory::new("ring-test", 4 << 20).unwrap();
        let layout = RingLayout::new(size);
        let ring_mem = mem.alloc(layout.total, 4096).unwrap();
        // SAFETY: `ring_mem` is a fresh allocation of `layout.total` bytes, kept in the harness.
        let ring = unsafe { SplitRing::new(ring_mem.ptr(), layout, event_idx) };
        let file = mem.file().unwrap().try_clone().unwrap();
        let dev_mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(mem.guest_base()),
            mem.len(),
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        let mut queue = Queue::new(size).unwrap();
        queue.set_size(size);
        queue
            .try_set_desc_table_address(GuestAddress(ring.desc_addr()))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(ring.avail_addr()))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(ring.used_addr()))
            .unwrap();
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        assert!(queue.is_valid(&dev_mem));
        Harness {
            mem,
            _ring_mem: ring_mem,
            ring,
            dev_mem,
            queue,
        }
    }

    fn rd(a: &Allocation, len: usize) -> BufferDesc {
        BufferDesc {
            addr: a.addr(),
            len: len as u32,
            writable: false,
        }
    }
    fn wr(a: &Allocation, len: usize) -> BufferDesc {
        BufferDesc {
            addr: a.addr(),
            len: len as u32,
            writable: true,
        }
    }

    #[test]
    fn chain_roundtrip_through_device_queue() {
        let mut h = harness(16, true);
        let hdr = h.mem.alloc(96, 64).unwrap();
        let payload = h.mem.alloc(1000, 64).unwrap();
        let data = h.mem.alloc(500, 64).unwrap();
        let comp = h.mem.alloc(64, 64).unwrap();
        hdr.write_at(0, &[0xaa; 96]);
        payload.write_at(0, &[0x55; 1000]);
        let head = h
            .ring
            .add(&[
                rd(&hdr, 96),
                rd(&payload, 1000),
                wr(&data, 500),
                wr(&comp, 64),
            ])
            .unwrap();
        assert_eq!(h.ring.num_free(), 12);
        assert!(h.ring.needs_kick(), "first chain must kick");

        // Device side.
        let chain = h.queue.pop_descriptor_chain(&h.dev_mem).unwrap();
        assert_eq!(chain.head_index(), head);
        let mut reader = chain.clone().reader(&h.dev_mem).unwrap();
        assert_eq!(reader.available_bytes(), 1096);
        let mut bytes = vec![0u8; 1096];
        reader.read_exact(&mut bytes).unwrap();
        assert!(bytes[..96].iter().all(|b| *b == 0xaa));
        assert!(bytes[96..].iter().all(|b| *b == 0x55));
        let mut writer = chain.writer(&h.dev_mem).unwrap();
        assert_eq!(writer.available_bytes(), 564);
        writer.write_all(&[7u8; 500]).unwrap();
        writer.write_all(&[9u8; 64]).unwrap();
        h.queue.add_used(&h.dev_mem, head, 564).unwrap();

        // Driver side.
        assert!(h.ring.has_used());
        let u = h.ring.pop_used().unwrap().unwrap();
        assert_eq!(
            u,
            UsedElem {
                head,
                len: 564,
                len_ok: true
            }
        );
        assert_eq!(h.ring.num_free(), 16);
        let mut out = [0u8; 500];
        data.read_at(0, &mut out);
        assert!(out.iter().all(|b| *b == 7));
        assert_eq!(h.ring.pop_used().unwrap(), None);
    }

    #[test]
    fn full_ring_and_wraparound() {
        let mut h = harness(4, false);
        let buf = h.mem.alloc(64, 64).unwrap();
        for round in 0..40_000u32 {
            let a = h.ring.add(&[rd(&buf, 8), wr(&buf, 64)]).unwrap();
            let b = h.ring.add(&[rd(&buf, 8), wr(&buf, 64)]).unwrap();
            assert_eq!(
                h.ring.add(&[rd(&buf, 8), wr(&buf, 64)]),
                Err(RingError::Full)
            );
            // Complete in reverse order.
            let c1 = h.queue.pop_descriptor_chain(&h.dev_mem).unwrap();
            let c2 = h.queue.pop_descriptor_chain(&h.dev_mem).unwrap();
            assert_eq!((c1.head_index(), c2.head_index()), (a, b));
            h.queue.add_used(&h.dev_mem, b, 64).unwrap();
            h.queue.add_used(&h.dev_mem, a, round % 65).unwrap();
            assert_eq!(h.ring.pop_used().unwrap().unwrap().head, b);
            assert_eq!(h.ring.pop_used().unwrap().unwrap().len, round % 65);
            assert_eq!(h.ring.num_free(), 4);
        }
    }

    #[test]
    fn event_idx_kick_suppression() {
        let mut h = harness(8, true);
        let buf = h.mem.alloc(64, 64).unwrap();
        let chain = [rd(&buf, 8), wr(&buf, 64)];
        h.ring.add(&chain).unwrap();
        assert!(h.ring.needs_kick());
        assert!(!h.ring.needs_kick(), "nothing new published");
        // Device drains and stays in polling mode (notifications left disabled).
        h.queue.disable_notification(&h.dev_mem).unwrap();
        let c = h.queue.pop_descriptor_chain(&h.dev_mem).unwrap();
        h.queue.add_used(&h.dev_mem, c.head_index(), 64).unwrap();
        h.ring.pop_used().unwrap().unwrap();
        // enable_notification sets avail_event = next_avail (1): the next chain (idx 1 -> 2)
        // crosses it, so it kicks...
        assert!(!h.queue.enable_notification(&h.dev_mem).unwrap());
        h.ring.add(&chain).unwrap();
        assert!(h.ring.needs_kick());
        // ...but while the device has not re-enabled, further chains do not.
        h.ring.add(&chain).unwrap();
        assert!(!h.ring.needs_kick());
        h.ring.add(&chain).unwrap();
        assert!(!h.ring.needs_kick());
        // The device re-enables at its position (it consumed everything) -> next one kicks.
        while let Some(c) = h.queue.pop_descriptor_chain(&h.dev_mem) {
            h.queue.add_used(&h.dev_mem, c.head_index(), 64).unwrap();
        }
        assert!(!h.queue.enable_notification(&h.dev_mem).unwrap());
        h.ring.add(&chain).unwrap();
        assert!(h.ring.needs_kick());
    }

    #[test]
    fn event_idx_call_suppression() {
        let mut h = harness(8, true);
        let buf = h.mem.alloc(64, 64).unwrap();
        let chain = [rd(&buf, 8), wr(&buf, 64)];
        // Parked used_event: the device must not call.
        h.ring.add(&chain).unwrap();
        let c = h.queue.pop_descriptor_chain(&h.dev_mem).unwrap();
        h.queue.add_used(&h.dev_mem, c.head_index(), 64).unwrap();
        assert!(!h.queue.needs_notification(&h.dev_mem).unwrap());
        // Armed with the entry pending: arm() reports it so we do not sleep.
        assert!(h.ring.arm());
        h.ring.pop_used().unwrap().unwrap();
        // Armed and empty: the next used entry must produce a call.
        assert!(!h.ring.arm());
        h.ring.add(&chain).unwrap();
        let c = h.queue.pop_descriptor_chain(&h.dev_mem).unwrap();
        h.queue.add_used(&h.dev_mem, c.head_index(), 64).unwrap();
        assert!(h.queue.needs_notification(&h.dev_mem).unwrap());
        h.ring.pop_used().unwrap().unwrap();
        h.ring.disarm();
        h.ring.add(&chain).unwrap();
        let c = h.queue.pop_descriptor_chain(&h.dev_mem).unwrap();
        h.queue.add_used(&h.dev_mem, c.head_index(), 64).unwrap();
        assert!(!h.queue.needs_notification(&h.dev_mem).unwrap());
    }

    #[test]
    fn no_event_idx_uses_flags() {
        let mut h = harness(8, false);
        let buf = h.mem.alloc(64, 64).unwrap();
        let chain = [rd(&buf, 8), wr(&buf, 64)];
        h.ring.add(&chain).unwrap();
        assert!(h.ring.needs_kick());
        h.queue.disable_notification(&h.dev_mem).unwrap();
        h.ring.add(&chain).unwrap();
        assert!(!h.ring.needs_kick(), "device set NO_NOTIFY");
        h.queue.enable_notification(&h.dev_mem).unwrap();
        h.ring.add(&chain).unwrap();
        assert!(h.ring.needs_kick());
    }

    #[test]
    fn hostile_used_entries_are_rejected() {
        // Unknown id.
        let mut h = harness(8, true);
        let buf = h.mem.alloc(64, 64).unwrap();
        let chain = [rd(&buf, 8), wr(&buf, 64)];
        let head = h.ring.add(&chain).unwrap();
        let c = h.queue.pop_descriptor_chain(&h.dev_mem).unwrap();
        assert_eq!(c.head_index(), head);
        h.queue.add_used(&h.dev_mem, 5, 64).unwrap();
        assert!(matches!(h.ring.pop_used(), Err(RingError::Corrupt(_))));
        assert!(h.ring.broken().is_some());
        assert!(matches!(h.ring.add(&chain), Err(RingError::Corrupt(_))));

        // Length larger than the writable part: clamped and flagged.
        let mut h = harness(8, true);
        let buf = h.mem.alloc(64, 64).unwrap();
        let head = h.ring.add(&[rd(&buf, 8), wr(&buf, 64)]).unwrap();
        h.queue.pop_descriptor_chain(&h.dev_mem).unwrap();
        h.queue.add_used(&h.dev_mem, head, 1 << 20).unwrap();
        let u = h.ring.pop_used().unwrap().unwrap();
        assert_eq!((u.len, u.len_ok), (64, false));

        // Used index jumping ahead of what is in flight.
        let mut h = harness(8, true);
        let buf = h.mem.alloc(64, 64).unwrap();
        h.ring.add(&[rd(&buf, 8), wr(&buf, 64)]).unwrap();
        h.ring.used_idx_field().store(7, Ordering::Release);
        assert!(matches!(h.ring.pop_used(), Err(RingError::Corrupt(_))));

        // Same head completed twice.
        let mut h = harness(8, true);
        let buf = h.mem.alloc(64, 64).unwrap();
        let head = h.ring.add(&[rd(&buf, 8), wr(&buf, 64)]).unwrap();
        h.ring.add(&[rd(&buf, 8), wr(&buf, 64)]).unwrap();
        h.queue.add_used(&h.dev_mem, head, 64).unwrap();
        h.queue.add_used(&h.dev_mem, head, 64).unwrap();
        assert!(h.ring.pop_used().unwrap().is_some());
        assert!(matches!(h.ring.pop_used(), Err(RingError::Corrupt(_))));
    }

    #[test]
    fn used_entries_are_taken_in_batches_up_to_an_invalid_one() {
        let mut h = harness(8, true);
        let buf = h.mem.alloc(64, 64).unwrap();
        let heads: Vec<u16> = (0..3)
            .map(|_| h.ring.add(&[rd(&buf, 8), wr(&buf, 64)]).unwrap())
            .collect();
        for &head in &heads {
            h.queue.pop_descriptor_chain(&h.dev_mem).unwrap();
            h.queue.add_used(&h.dev_mem, head, 64).unwrap();
        }
        // Three published, room for two: the first two, in ring order, then the third.
        let mut out = [std::mem::MaybeUninit::uninit(); 2];
        assert_eq!(h.ring.take_used_into(&mut out), 2);
        // SAFETY: the first two were written.
        let taken: Vec<u16> = out
            .iter()
            .map(|u| unsafe { u.assume_init() }.head)
            .collect();
        assert_eq!(taken, heads[..2]);
        assert_eq!(h.ring.take_used_into(&mut out), 1);
        // SAFETY: the first was written.
        assert_eq!(unsafe { out[0].assume_init() }.head, heads[2]);
        assert_eq!(h.ring.take_used_into(&mut out), 0);
        assert_eq!(h.ring.chains_in_flight(), 0);

        // A batch stops at an invalid entry: the ones before it are taken, the ring breaks.
        let mut h = harness(8, true);
        let buf = h.mem.alloc(64, 64).unwrap();
        let a = h.ring.add(&[rd(&buf, 8), wr(&buf, 64)]).unwrap();
        let b = h.ring.add(&[rd(&buf, 8), wr(&buf, 64)]).unwrap();
        // A third chain in flight: three used entries are not too many by count.
        h.ring.add(&[rd(&buf, 8), wr(&buf, 64)]).unwrap();
        h.queue.add_used(&h.dev_mem, a, 64).unwrap();
        h.queue.add_used(&h.dev_mem, a, 64).unwrap();
        h.queue.add_used(&h.dev_mem, b, 64).unwrap();
        let mut out = [std::mem::MaybeUninit::uninit(); 4];
        assert_eq!(h.ring.take_used_into(&mut out), 1);
        // SAFETY: the first was written.
        assert_eq!(unsafe { out[0].assume_init() }.head, a);
        assert!(h.ring.broken().is_some());
        assert_eq!(h.ring.take_used_into(&mut out), 0);
    }

    #[test]
    fn device_scribbling_on_descriptors_does_not_confuse_free_list() {
        let mut h = harness(8, true);
        let buf = h.mem.alloc(64, 64).unwrap();
        let head = h
            .ring
            .add(&[rd(&buf, 8), rd(&buf, 8), wr(&buf, 64)])
            .unwrap();
        // The device overwrites the table with garbage.
        // SAFETY: the descriptor table is 16*8 bytes at desc_addr inside the shared region.
        unsafe { std::ptr::write_bytes(h.ring.desc_addr() as *mut u8, 0xff, 16 * 8) };
        h.queue.add_used(&h.dev_mem, head, 64).unwrap();
        h.ring.pop_used().unwrap().unwrap();
        assert_eq!(h.ring.num_free(), 8);
        // All eight descriptors are usable again and distinct.
        let mut heads = Vec::new();
        for _ in 0..8 {
            heads.push(h.ring.add(&[wr(&buf, 64)]).unwrap());
        }
        heads.sort();
        assert_eq!(heads, (0..8).collect::<Vec<u16>>());
        assert_eq!(h.ring.table_entry(heads[0]).len, 64);
    }

    #[test]
    fn bad_chain_shapes() {
        let mut h = harness(8, true);
        let buf = h.mem.alloc(64, 64).unwrap();
        assert_eq!(h.ring.add(&[]), Err(RingError::BadChain("empty chain")));
        assert!(matches!(
            h.ring.add(&[wr(&buf, 64), rd(&buf, 8)]),
            Err(RingError::BadChain(_))
        ));
        assert_eq!(h.ring.num_free(), 8);
    }

    /// What the device reads of a chain: (address, length, writable) per descriptor.
    fn device_view(
        chain: &virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> Vec<(u64, u32, bool)> {
        chain
            .clone()
            .map(|d| (d.addr().0, d.len(), d.is_write_only()))
            .collect()
    }

    /// `add_request` of (header, tx, rx, tail) with the buffers' expected device view.
    fn request(
        h: &mut Harness,
        header: (u64, u32),
        tx: &[(u64, u32)],
        rx: &[(u64, u32)],
        tail: (u64, u32),
    ) -> (u16, Vec<(u64, u32, bool)>) {
        let n = 2 + tx.len() + rx.len();
        let head = h.ring.next_head(n).expect("room");
        h.ring.add_request(head, header, tx, rx, tail);
        let mut want = vec![(header.0, header.1, false)];
        want.extend(tx.iter().map(|&(a, l)| (a, l, false)));
        want.extend(rx.iter().map(|&(a, l)| (a, l, true)));
        want.push((tail.0, tail.1, true));
        (head, want)
    }

    #[test]
    fn same_shape_request_rewrites_the_released_chain() {
        let mut h = harness(16, true);
        let base = h.mem.alloc(4096, 64).unwrap().addr();
        let hdr = (base, 104);
        let tail = (base + 320, 64);
        // A send with one data buffer, completed and released.
        let (head, want) = request(&mut h, hdr, &[(base + 1024, 100)], &[], tail);
        let chain = h.queue.pop_descriptor_chain(&h.dev_mem).unwrap();
        assert_eq!(device_view(&chain), want);
        h.queue.add_used(&h.dev_mem, head, 64).unwrap();
        h.ring.pop_used().unwrap().unwrap();
        assert_eq!(h.ring.rewrites, 0);
        // The same shape with other buffers: the same descriptors, only addresses and lengths
        // written.
        let (again, want) = request(&mut h, (base, 96), &[(base + 2048, 7)], &[], tail);
        assert_eq!((again, h.ring.rewrites), (head, 1));
        assert_eq!(h.ring.num_free(), 13);
        let chain = h.queue.pop_descriptor_chain(&h.dev_mem).unwrap();
        assert_eq!(device_view(&chain), want);
        h.queue.add_used(&h.dev_mem, again, 64).unwrap();
        let u = h.ring.pop_used().unwrap().unwrap();
        assert_eq!((u.len, u.len_ok), (64, true));
        // Another shape of the same length (a receive's data buffer instead of a send's): built
        // anew, its writable size counted again.
        let (recv, want) = request(
            &mut h,
            (base, 96),
            &[],
            &[(base + 3000, 50)],
            (base + 320, 64),
        );
        assert_eq!((recv, h.ring.rewrites), (head, 1));
        let chain = h.queue.pop_descriptor_chain(&h.dev_mem).unwrap();
        assert_eq!(device_view(&chain), want);
        h.queue.add_used(&h.dev_mem, recv, 115).unwrap();
        let u = h.ring.pop_used().unwrap().unwrap();
        assert_eq!((u.len, u.len_ok), (114, false));
        // Its repost is rewritten, with the new writable size.
        let (recv2, want) = request(
            &mut h,
            (base, 96),
            &[],
            &[(base + 3000, 60)],
            (base + 320, 64),
        );
        assert_eq!((recv2, h.ring.rewrites), (head, 2));
        let chain = h.queue.pop_descriptor_chain(&h.dev_mem).unwrap();
        assert_eq!(device_view(&chain), want);
        h.queue.add_used(&h.dev_mem, recv2, 124).unwrap();
        let u = h.ring.pop_used().unwrap().unwrap();
        assert_eq!((u.len, u.len_ok), (124, true));
        assert_eq!(h.ring.num_free(), 16);
    }

    #[test]
    fn a_chain_released_before_another_is_not_rewritten() {
        let mut h = harness(16, true);
        let base = h.mem.alloc(4096, 64).unwrap().addr();
        let (a, _) = request(&mut h, (base, 96), &[], &[], (base + 320, 64));
        let (b, _) = request(&mut h, (base + 384, 96), &[], &[], (base + 704, 64));
        let ca = h.queue.pop_descriptor_chain(&h.dev_mem).unwrap();
        let cb = h.queue.pop_descriptor_chain(&h.dev_mem).unwrap();
        h.queue.add_used(&h.dev_mem, ca.head_index(), 64).unwrap();
        h.queue.add_used(&h.dev_mem, cb.head_index(), 64).unwrap();
        h.ring.pop_used().unwrap().unwrap();
        h.ring.pop_used().unwrap().unwrap();
        // `b` went back last: a chain of three takes b's two descriptors and one of a's, and
        // writes all three.
        let (c, want) = request(
            &mut h,
            (base, 96),
            &[(base + 1024, 8)],
            &[],
            (base + 320, 64),
        );
        assert_eq!((c, h.ring.rewrites), (b, 0));
        let chain = h.queue.pop_descriptor_chain(&h.dev_mem).unwrap();
        assert_eq!(device_view(&chain), want);
        // What is left of a's chain heads the free list, but it is not the chain released
        // last: a chain of its old shape is built anew.
        let (d, want) = request(&mut h, (base + 384, 96), &[], &[], (base + 704, 64));
        assert_ne!(d, a);
        assert_eq!(h.ring.rewrites, 0);
        let chain = h.queue.pop_descriptor_chain(&h.dev_mem).unwrap();
        assert_eq!(device_view(&chain), want);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Random request chains (0-2 TX and RX buffers each), completed by the device in a
        /// random order: the device reads every chain exactly as posted, whether it was built
        /// anew or rewritten onto the chain released before it, and every head comes back with
        /// its writable size.
        #[test]
        fn random_requests_reach_the_device_as_posted(
            ops in proptest::collection::vec((0usize..3, 0usize..3, 1u32..300, 0u8..3), 1..200),
            seed in any::<u64>(),
        ) {
            let mut h = harness(16, true);
            let base = h.mem.alloc(1 << 16, 64).unwrap().addr();
            let mut rng = seed;
            let mut next = move || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
            let mut in_flight: std::collections::HashMap<u16, u32> = Default::default();
            let mut device_chains = Vec::new();
            for (ntx, nrx, len, completions) in ops {
                let n = 2 + ntx + nrx;
                if h.ring.num_free() as usize >= n {
                    let mut bufs = (0..ntx + nrx + 2).map(|_| (base + next() % 60_000, 1 + (next() % u64::from(len)) as u32));
                    let header = bufs.next().unwrap();
                    let tx: Vec<_> = (0..ntx).map(|_| bufs.next().unwrap()).collect();
                    let rx: Vec<_> = (0..nrx).map(|_| bufs.next().unwrap()).collect();
                    let tail = bufs.next().unwrap();
                    let (head, want) = request(&mut h, header, &tx, &rx, tail);
                    prop_assert!(!in_flight.contains_key(&head));
                    let writable = want.iter().filter(|d| d.2).map(|d| d.1).sum();
                    in_flight.insert(head, writable);
                    let c = h.queue.pop_descriptor_chain(&h.dev_mem).unwrap();
                    prop_assert_eq!(c.head_index(), head);
                    prop_assert_eq!(device_view(&c), want);
                    device_chains.push(head);
                }
                for _ in 0..completions {
                    if device_chains.is_empty() {
                        break;
                    }
                    let i = (next() as usize) % device_chains.len();
                    let c = device_chains.swap_remove(i);
                    let writable = in_flight[&c];
                    h.queue.add_used(&h.dev_mem, c, writable).unwrap();
                    let u = h.ring.pop_used().unwrap().unwrap();
                    prop_assert_eq!(in_flight.remove(&u.head), Some(writable));
                    prop_assert!(u.len_ok && u.len == writable);
                }
            }
            for c in device_chains.drain(..) {
                h.queue.add_used(&h.dev_mem, c, 0).unwrap();
            }
            while let Some(u) = h.ring.pop_used().unwrap() {
                prop_assert!(in_flight.remove(&u.head).is_some());
            }
            prop_assert!(in_flight.is_empty());
            prop_assert_eq!(h.ring.num_free(), 16);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Random chains, completed by the device in a random order with random lengths: the
        /// driver gets every head back exactly once with the right length, the data written by
        /// the device lands in the right buffer, and the free count returns to the ring size.
        #[test]
        fn random_chains_complete_correctly(
            ops in proptest::collection::vec((1usize..4, 0usize..3, 1usize..300, any::<u8>()), 1..120),
            seed in any::<u64>(),
        ) {
            let mut h = harness(32, true);
            let mut rng = seed;
            let mut next = move || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
            let mut in_flight: std::collections::HashMap<u16, (Allocation, usize, u8)> = Default::default();
            let mut device_chains = Vec::new();
            for (nr, nw, wlen, fill) in ops {
                let n = nr + nw;
                if h.ring.num_free() as usize >= n {
                    let rbuf = h.mem.alloc(64, 64).unwrap();
                    let wbuf = h.mem.alloc(wlen * nw.max(1), 64).unwrap();
                    let mut bufs = vec![rd(&rbuf, 16); nr];
                    for i in 0..nw {
                        bufs.push(BufferDesc { addr: wbuf.addr() + (i * wlen) as u64, len: wlen as u32, writable: true });
                    }
                    let head = h.ring.add(&bufs).unwrap();
                    prop_assert!(!in_flight.contains_key(&head));
                    in_flight.insert(head, (wbuf, wlen * nw, fill));
                    while let Some(c) = h.queue.pop_descriptor_chain(&h.dev_mem) {
                        device_chains.push(c);
                    }
                }
                // Device completes a random subset.
                while !device_chains.is_empty() && next() % 3 != 0 {
                    let i = (next() as usize) % device_chains.len();
                    let c = device_chains.swap_remove(i);
                    let head = c.head_index();
                    let (_, wtotal, fill) = &in_flight[&head];
                    let mut w = c.writer(&h.dev_mem).unwrap();
                    prop_assert_eq!(w.available_bytes(), *wtotal);
                    let n = (next() as usize) % (wtotal + 1);
                    w.write_all(&vec![*fill; n]).unwrap();
                    h.queue.add_used(&h.dev_mem, head, n as u32).unwrap();
                }
                while let Some(u) = h.ring.pop_used().unwrap() {
                    let (wbuf, _, fill) = in_flight.remove(&u.head).expect("head in flight");
                    prop_assert!(u.len_ok);
                    let mut got = vec![0u8; u.len as usize];
                    wbuf.read_at(0, &mut got);
                    prop_assert!(got.iter().all(|b| *b == fill));
                }
            }
            for c in device_chains.drain(..) {
                h.queue.add_used(&h.dev_mem, c.head_index(), 0).unwrap();
            }
            while let Some(u) = h.ring.pop_used().unwrap() {
                prop_assert!(in_flight.remove(&u.head).is_some());
            }
            prop_assert!(in_flight.is_empty());
            prop_assert_eq!(h.ring.num_free(), 32);
        }
    }
}
