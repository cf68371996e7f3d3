// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Descriptor chains: popping them from a ring, validating them, and reading, writing and
//! copying the byte streams they describe.
//!
//! Every request chain is: readable bytes = `ReqHeader` (96 B) ++ payload; writable bytes = data
//! area ++ `Completion` (the last 64 writable bytes). The readable descriptors are one byte
//! stream, the writable ones another. [`parse_chain`] turns a chain into a [`Parsed`]: a valid
//! [`Req`], a chain to reject with an error completion, or a chain so broken that it is returned
//! with used length 0.
//!
//! Guest input is never trusted: every descriptor range is checked against guest memory, lengths
//! are summed with overflow checks, and a chain the iterator cannot walk to its end (loops, `next`
//! out of range, nested indirect tables, 4 GiB overflow) is detected by its last descriptor still
//! carrying `VIRTQ_DESC_F_NEXT`. Stored segments are re-checked on every access because the
//! guest's memory table may change in between.

#[cfg(test)]
use std::ops::Deref;
use std::sync::Arc;

use smallvec::SmallVec;

use vfabric_proto::{
    allowed_flags, bit, flags, queue_kind, Completion, OpInfo, Opcode, QueueClass, QueueKind,
    ReqHeader, Request, Status, COMPLETION_LEN, MEM_SEG_LEN, REQUEST_IS_WIRE_LAYOUT,
    REQ_HEADER_LEN, RMA_IOV_LEN, VIRTIO_FABRIC_F_MQ, VIRTIO_FABRIC_F_REMOTE_CQ_DATA,
    VIRTIO_FABRIC_F_RMA_PMEM, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::Error as QueueError;
#[cfg(test)]
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
    VolatileSlice,
};

use crate::config::Limits;

/// The guest memory type of every device.
pub(crate) type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// One guest-physical range of a byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seg {
    pub addr: u64,
    pub len: u32,
}

/// Segments a stream keeps inline: most requests have one or two per stream, and a request
/// must not cost a heap allocation.
const INLINE_SEGS: usize = 2;

/// A byte stream made of guest ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Segs {
    pub segs: SmallVec<[Seg; INLINE_SEGS]>,
    /// Total bytes.
    pub len: u64,
}

/// A guest memory access failed (range outside guest memory, or memory table changed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MemFault;

/// Which side of a copy faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CopyFault {
    Src,
    Dst,
}

impl Segs {
    #[cfg(test)]
    pub fn from_slice(segs: &[Seg]) -> Self {
        let mut s = Segs::default();
        for x in segs {
            s.push(*x);
        }
        s
    }

    /// The stream of one range (empty if `s` is).
    pub(crate) fn one(s: Seg) -> Self {
        if s.len == 0 {
            return Segs::default();
        }
        // Built in place: no capacity checks of a push, and the second inline slot left
        // unwritten.
        let mut buf = std::mem::MaybeUninit::<[Seg; INLINE_SEGS]>::uninit();
        // SAFETY: the first of the buffer's segments is written, and the vector's length is
        // 1 (at most INLINE_SEGS): only that segment is ever read.
        let segs = unsafe {
            buf.as_mut_ptr().cast::<Seg>().write(s);
            SmallVec::from_buf_and_len_unchecked(buf, 1)
        };
        Segs {
            segs,
            len: u64::from(s.len),
        }
    }

    #[inline]
    pub fn push(&mut self, s: Seg) {
        if s.len > 0 {
            self.segs.push(s);
            self.len += u64::from(s.len);
        }
    }

    /// Split the stream at byte `at` (clamped to its length): `(first at bytes, rest)`.
    #[inline]
    pub fn split_at(&self, at: u64) -> (Segs, Segs) {
        // One segment (most streams): no loop.
        if let [s] = self.segs.as_slice() {
            let l = u64::from(s.len);
            if at >= l {
                return (Segs::one(*s), Segs::default());
            }
            // at < l <= u32::MAX, so both casts are lossless.
            let head = Segs::one(Seg {
                addr: s.addr,
                len: at as u32,
            });
            let tail = Segs::one(Seg {
                addr: s.addr.wrapping_add(at),
                len: s.len - at as u32,
            });
            return (head, tail);
        }
        let mut head = Segs::default();
        let mut tail = Segs::default();
        let mut left = at;
        for s in &self.segs {
            let l = u64::from(s.len);
            if left >= l {
                head.push(*s);
                left -= l;
            } else if left == 0 {
                tail.push(*s);
            } else {
                // left < l <= u32::MAX, so both casts are lossless.
                head.push(Seg {
                    addr: s.addr,
                    len: left as u32,
                });
                tail.push(Seg {
                    addr: s.addr.wrapping_add(left),
                    len: s.len - left as u32,
                });
                left = 0;
            }
        }
        (head, tail)
    }

    /// The stream from byte `at` on (empty past its end): the second half of
    /// [`Segs::split_at`] without building the first.
    pub fn tail_from(&self, at: u64) -> Segs {
        if let [s] = self.segs.as_slice() {
            if at >= u64::from(s.len) {
                return Segs::default();
            }
            // at < len <= u32::MAX: lossless.
            return Segs::one(Seg {
                addr: s.addr.wrapping_add(at),
                len: s.len - at as u32,
            });
        }
        self.split_at(at).1
    }

    /// Cut the last `n` bytes (at most the stream's length, checked by the caller) off the
    /// stream and return them: in place when the last segment holds them (a request's
    /// completion has a descriptor of its own or ends the data area's).
    pub fn split_off_tail(&mut self, n: u64) -> Segs {
        if let Some(last) = self.segs.last_mut() {
            if u64::from(last.len) >= n {
                // n <= last.len <= u32::MAX: lossless.
                let keep = last.len - n as u32;
                let tail = Segs::one(Seg {
                    addr: last.addr.wrapping_add(u64::from(keep)),
                    len: n as u32,
                });
                if keep == 0 {
                    self.segs.pop();
                } else {
                    last.len = keep;
                }
                self.len -= n;
                return tail;
            }
        }
        let (head, tail) = self.split_at(self.len.saturating_sub(n));
        *self = head;
        tail
    }

    /// Drop the first `n` bytes of the stream (all of it if shorter): in place when the first
    /// segment holds them (a request's header has a descriptor of its own or starts the
    /// payload's).
    pub fn drop_front(&mut self, n: u64) {
        if let Some(first) = self.segs.first_mut() {
            if u64::from(first.len) > n {
                // n < first.len <= u32::MAX: lossless.
                first.addr = first.addr.wrapping_add(n);
                first.len -= n as u32;
                self.len -= n;
                return;
            }
            if u64::from(first.len) == n && self.segs.len() == 1 {
                *self = Segs::default();
                return;
            }
        }
        *self = self.tail_from(n);
    }

    /// Volatile slices covering the first `len` bytes of the stream.
    fn slices<'m>(
        &self,
        mem: &'m GuestMemoryMmap,
        len: u64,
    ) -> Result<SmallVec<[VolatileSlice<'m, ()>; INLINE_SEGS]>, MemFault> {
        let mut out = SmallVec::new();
        let mut left = len;
        for s in &self.segs {
            if left == 0 {
                break;
            }
            let n = left.min(u64::from(s.len));
            for sl in mem.get_slices(GuestAddress(s.addr), n as usize) {
                let sl = sl.map_err(|_| MemFault)?;
                if !sl.is_empty() {
                    out.push(sl);
                }
            }
            left -= n;
        }
        if left > 0 {
            return Err(MemFault);
        }
        Ok(out)
    }

    /// Walk `len` bytes of the stream from offset `off`, calling `f(guest_addr, pos, n)` for each
    /// piece (`pos` = offset into the caller's buffer). Fails if the stream is shorter.
    fn walk(
        &self,
        off: u64,
        len: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), MemFault>,
    ) -> Result<(), MemFault> {
        let mut skip = off;
        let mut pos = 0usize;
        for s in &self.segs {
            if pos == len {
                break;
            }
            let l = u64::from(s.len);
            if skip >= l {
                skip -= l;
                continue;
            }
            let n = ((l - skip) as usize).min(len - pos);
            f(
                GuestAddress(s.addr.checked_add(skip).ok_or(MemFault)?),
                pos,
                n,
            )?;
            pos += n;
            skip = 0;
        }
        if pos < len {
            return Err(MemFault);
        }
        Ok(())
    }

    /// The host address of `len` bytes at stream offset `off` when they lie in the first
    /// segment and one memory region: the common case of every small access.
    #[inline]
    fn first_seg_ptr(&self, mem: &GuestMemoryMmap, off: u64, len: usize) -> Option<*mut u8> {
        let s = self.segs.first()?;
        if off.checked_add(len as u64)? > u64::from(s.len) {
            return None;
        }
        host_ptr(mem, s.addr.checked_add(off)?, len)
    }

    /// Read `buf.len()` bytes starting at stream offset `off`.
    pub fn read_at(&self, mem: &GuestMemoryMmap, off: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        let len = buf.len();
        if let Some(p) = self.first_seg_ptr(mem, off, len) {
            // SAFETY: `p` is valid for `len` bytes of a mapping `mem` keeps alive; `buf` is our
            // own buffer of `len` bytes; they cannot overlap.
            unsafe { guest_copy(buf.as_mut_ptr(), p, len) };
            return Ok(());
        }
        self.walk(off, len, |addr, pos, n| {
            let to = &mut buf[pos..pos + n];
            match host_ptr(mem, addr.0, n) {
                // SAFETY: `p` is valid for `n` bytes of a mapping `mem` keeps alive (host_ptr
                // checked the range); `to` is our own buffer of `n` bytes; they cannot overlap.
                Some(p) => unsafe { guest_copy(to.as_mut_ptr(), p, n) },
                // Spans two regions: the general path.
                None => mem.read_slice(to, addr).map_err(|_| MemFault)?,
            }
            Ok(())
        })
    }

    /// Write `buf` starting at stream offset `off`.
    pub fn write_at(&self, mem: &GuestMemoryMmap, off: u64, buf: &[u8]) -> Result<(), MemFault> {
        if let Some(p) = self.first_seg_ptr(mem, off, buf.len()) {
            // SAFETY: as in `read_at`, with the roles of the two ranges swapped.
            unsafe { guest_copy(p, buf.as_ptr(), buf.len()) };
            return Ok(());
        }
        self.walk(off, buf.len(), |addr, pos, n| {
            let from = &buf[pos..pos + n];
            match host_ptr(mem, addr.0, n) {
                // SAFETY: as in `read_at`, with the roles of the two ranges swapped.
                Some(p) => unsafe { guest_copy(p, from.as_ptr(), n) },
                None => mem.write_slice(from, addr).map_err(|_| MemFault)?,
            }
            Ok(())
        })
    }
}

/// Host address of `len` bytes at guest address `addr`, if they lie inside one region: one
/// region lookup, no slice or bitmap machinery (the small accesses of every request).
#[inline]
pub(crate) fn host_ptr(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Option<*mut u8> {
    let r = mem.find_region(GuestAddress(addr))?;
    let off = addr - r.start_addr().0;
    if off.checked_add(len as u64)? > r.len() {
        return None;
    }
    r.get_host_address(MemoryRegionAddress(off)).ok()
}

/// The region a walk found its last descriptor in: `(guest start, length, host base)`. The
/// descriptors of one chain lie in one region almost always, so a walk looks the region up once.
#[derive(Clone, Copy)]
pub(crate) struct RegionHint {
    start: u64,
    len: u64,
    base: *mut u8,
}

impl RegionHint {
    /// The region of `mem` holding guest address `addr`.
    pub(crate) fn of(mem: &GuestMemoryMmap, addr: u64) -> Option<RegionHint> {
        let r = mem.find_region(GuestAddress(addr))?;
        Some(RegionHint {
            start: r.start_addr().0,
            len: r.len(),
            base: r.get_host_address(MemoryRegionAddress(0)).ok()?,
        })
    }
}

/// [`host_ptr`] trying `hint` (a region of the same `mem`) before the region lookup, and
/// remembering the region found.
#[inline]
pub(crate) fn host_ptr_hinted(
    mem: &GuestMemoryMmap,
    hint: &mut Option<RegionHint>,
    addr: u64,
    len: usize,
) -> Option<*mut u8> {
    // `addr` is in the region when its offset from the region's start (wrapped: an address
    // below the start has an offset far past any region's length) is below the length.
    let h = match *hint {
        Some(h) if addr.wrapping_sub(h.start) < h.len => h,
        _ => {
            let h = RegionHint::of(mem, addr)?;
            *hint = Some(h);
            h
        }
    };
    let off = addr.wrapping_sub(h.start);
    // off < the region's length: no overflow on either side.
    if len as u64 > h.len - off {
        return None;
    }
    // off + len <= the region's length: inside its mapping (no access is made here).
    Some(h.base.wrapping_add(off as usize))
}

/// Copy `n` bytes between guest memory and the daemon's own memory the way vm-memory's volatile
/// slices do (the guest may write the bytes at the same time: they are data, never references):
/// volatile byte accesses below a word, a plain copy from a word on (a word as one move of a
/// constant size, not a call of `memcpy`).
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `n` bytes, and the ranges must not
/// overlap.
#[inline(always)]
pub(crate) unsafe fn guest_copy(dst: *mut u8, src: *const u8, n: usize) {
    const WORD: usize = std::mem::size_of::<usize>();
    if n < WORD {
        for i in 0..n {
            // SAFETY: i < n, within both ranges (caller's contract).
            unsafe { std::ptr::write_volatile(dst.add(i), std::ptr::read_volatile(src.add(i))) };
        }
    } else if n == WORD {
        // SAFETY: the caller's contract, for n = WORD.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, WORD) };
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, n) };
    }
}

/// Copy `n` bytes (at most [`SMALL_MOVE`]) from guest memory at `src` to guest memory at
/// `dst`, the two ranges possibly overlapping (a loopback send placed into its own device's
/// receive, whose buffers the guest may make overlap): every byte is loaded before any is
/// stored, in at most four loads and four stores of a constant size (no call of `memmove`).
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `n` bytes, `n` <= [`SMALL_MOVE`].
#[inline(always)]
pub(crate) unsafe fn guest_move_small(dst: *mut u8, src: *const u8, n: usize) {
    debug_assert!(n <= SMALL_MOVE);
    // SAFETY: each load and store below lies within the first `n` bytes at `src` or `dst`
    // (the caller's contract): blocks at offset 0 and ending at `n`, of a size at most `n`;
    // unaligned accesses, as guest memory may be.
    unsafe {
        if n >= 32 {
            // [0, 32) and [n - 32, n) cover n <= 64.
            let a = src.cast::<u128>().read_unaligned();
            let b = src.add(16).cast::<u128>().read_unaligned();
            let c = src.add(n - 32).cast::<u128>().read_unaligned();
            let d = src.add(n - 16).cast::<u128>().read_unaligned();
            dst.cast::<u128>().write_unaligned(a);
            dst.add(16).cast::<u128>().write_unaligned(b);
            dst.add(n - 32).cast::<u128>().write_unaligned(c);
            dst.add(n - 16).cast::<u128>().write_unaligned(d);
        } else if n >= 16 {
            let a = src.cast::<u128>().read_unaligned();
            let b = src.add(n - 16).cast::<u128>().read_unaligned();
            dst.cast::<u128>().write_unaligned(a);
            dst.add(n - 16).cast::<u128>().write_unaligned(b);
        } else if n >= 8 {
            let a = src.cast::<u64>().read_unaligned();
            let b = src.add(n - 8).cast::<u64>().read_unaligned();
            dst.cast::<u64>().write_unaligned(a);
            dst.add(n - 8).cast::<u64>().write_unaligned(b);
        } else if n >= 4 {
            let a = src.cast::<u32>().read_unaligned();
            let b = src.add(n - 4).cast::<u32>().read_unaligned();
            dst.cast::<u32>().write_unaligned(a);
            dst.add(n - 4).cast::<u32>().write_unaligned(b);
        } else if n > 0 {
            // Bytes 0, n / 2 and n - 1 cover n <= 3.
            let (a, b, c) = (src.read(), src.add(n / 2).read(), src.add(n - 1).read());
            dst.write(a);
            dst.add(n / 2).write(b);
            dst.add(n - 1).write(c);
        }
    }
}

/// The most bytes [`guest_move_small`] copies.
pub(crate) const SMALL_MOVE: usize = 64;

/// Bytes a large transfer copies between two chances for a poller to serve its other devices
/// (a few microseconds of copying).
pub(crate) const COPY_CHUNK: u64 = 64 << 10;

/// Copy the first `len` bytes of `src` (in `src_mem`) to the start of `dst` (in `dst_mem`): the
/// one copy of the fabric, straight from one guest's memory into another's. The copy goes piece by
/// piece (each piece the overlap of a source and a destination segment, copied with `ptr::copy`,
/// i.e. a memmove within the piece), front to back. The two memories may be the same; ranges that
/// overlap across pieces (a guest sending to itself from and into the same bytes) get the result
/// of that forward piecewise copy, not of one memmove over the whole range: only that guest's own
/// data is affected.
pub(crate) fn copy_stream(
    src_mem: &GuestMemoryMmap,
    src: &Segs,
    dst_mem: &GuestMemoryMmap,
    dst: &Segs,
    len: u64,
) -> Result<(), CopyFault> {
    if len > src.len {
        return Err(CopyFault::Src);
    }
    if len > dst.len {
        return Err(CopyFault::Dst);
    }
    let s = src.slices(src_mem, len).map_err(|_| CopyFault::Src)?;
    let d = dst.slices(dst_mem, len).map_err(|_| CopyFault::Dst)?;
    let (mut i, mut io, mut j, mut jo) = (0usize, 0usize, 0usize, 0usize);
    let mut left = len as usize;
    while left > 0 {
        let (Some(a), Some(b)) = (s.get(i), d.get(j)) else {
            return Err(CopyFault::Src);
        };
        let n = (a.len() - io).min(b.len() - jo).min(left);
        if n == 0 {
            return Err(CopyFault::Src);
        }
        let from = a.subslice(io, n).map_err(|_| CopyFault::Src)?;
        let to = b.subslice(jo, n).map_err(|_| CopyFault::Dst)?;
        from.copy_to_volatile_slice(to);
        io += n;
        jo += n;
        left -= n;
        if io == a.len() {
            i += 1;
            io = 0;
        }
        if jo == b.len() {
            j += 1;
            jo = 0;
        }
    }
    Ok(())
}

/// [`copy_stream`] in chunks of [`COPY_CHUNK`] bytes with a [`crate::poller::yield_point`]
/// between them. The caller must hold no lock and no memory-region access (see `yield_point`).
pub(crate) fn copy_stream_yielding(
    src_mem: &GuestMemoryMmap,
    src: &Segs,
    dst_mem: &GuestMemoryMmap,
    dst: &Segs,
    len: u64,
) -> Result<(), CopyFault> {
    if len <= COPY_CHUNK {
        return copy_stream(src_mem, src, dst_mem, dst, len);
    }
    if len > src.len {
        return Err(CopyFault::Src);
    }
    if len > dst.len {
        return Err(CopyFault::Dst);
    }
    let mut done = 0u64;
    while done < len {
        let chunk = (len - done).min(COPY_CHUNK);
        let (_, from) = src.split_at(done);
        let (_, to) = dst.split_at(done);
        copy_stream(src_mem, &from, dst_mem, &to, chunk)?;
        done += chunk;
        if done < len {
            crate::poller::yield_point();
        }
    }
    Ok(())
}

/// A validated request: header, payload stream, data area stream, completion stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Req {
    /// Virtqueue the chain came from.
    pub queue: u16,
    /// Head descriptor index (what goes into the used ring).
    pub head: u16,
    pub req: Request,
    /// Readable bytes after the header.
    pub payload: Segs,
    /// Writable bytes before the completion.
    pub data: Segs,
    /// The last 64 writable bytes.
    pub comp: Segs,
    /// Host addresses the parse resolved, with the memory table they lie in.
    pub resolved: Resolved,
}

/// Host addresses of a request's payload start, data area start and completion area as the
/// ring's walk resolved them (0: not resolved), with the memory table they lie in, held (so
/// its mappings stay alive as long as the request). An access through that same table uses
/// them instead of a region lookup; through any other (the guest's table changed since) it
/// looks its region up as usual. They serve the commonest accesses: an eager send's payload
/// read, the placing of a message into a posted receive, and completions.
#[derive(Clone, Debug, Default)]
pub(crate) struct Resolved {
    table: Option<Arc<GuestMemoryMmap>>,
    payload: usize,
    data: usize,
    comp: usize,
}

impl Resolved {
    /// `at` (one of ours) if it was resolved in `mem`.
    #[inline]
    fn in_table(&self, mem: &GuestMemoryMmap, at: usize) -> Option<usize> {
        match &self.table {
            Some(t) if at != 0 && std::ptr::eq(Arc::as_ptr(t), mem) => Some(at),
            _ => None,
        }
    }
}

impl PartialEq for Resolved {
    /// Host addresses are a cache, not part of a request's value.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Resolved {}

impl Req {
    /// A request of chain `head` of virtqueue `queue` with no streams yet (the slot a chain is
    /// parsed into).
    pub fn blank(queue: u16, head: u16) -> Req {
        Req {
            queue,
            head,
            req: Request::new(Opcode::QueryCaps),
            payload: Segs::default(),
            data: Segs::default(),
            comp: Segs::default(),
            resolved: Resolved::default(),
        }
    }

    /// Whether every host address the parse resolved is that of its stream's first byte in
    /// the table it was resolved in, and how many of them an access through `mem` would use.
    #[cfg(test)]
    pub fn resolved_agree(&self, mem: &GuestMemoryMmap) -> (bool, usize) {
        let r = &self.resolved;
        let Some(table) = &r.table else {
            return (true, 0);
        };
        let mut agree = true;
        let mut usable = 0;
        for (at, s) in [
            (r.payload, &self.payload),
            (r.data, &self.data),
            (r.comp, &self.comp),
        ] {
            let first = s
                .segs
                .first()
                .and_then(|f| host_ptr(table, f.addr, f.len as usize));
            agree &= at == 0 || first == Some(at as *mut u8);
            usable += usize::from(r.in_table(mem, at).is_some());
        }
        (agree, usable)
    }

    /// The host address of the payload's first `len` bytes, if the parse resolved it in `mem`
    /// and the payload's first segment holds them (in `mem`'s mappings while it is borrowed).
    #[inline(always)]
    pub fn payload_at(&self, mem: &GuestMemoryMmap, len: usize) -> Option<*const u8> {
        first_seg_at(
            &self.resolved,
            mem,
            self.resolved.payload,
            &self.payload,
            len,
        )
        .map(|at| at as *const u8)
    }

    /// Read the first `buf.len()` bytes of the payload.
    #[inline]
    pub fn read_payload(&self, mem: &GuestMemoryMmap, buf: &mut [u8]) -> Result<(), MemFault> {
        if let Some(at) = first_seg_at(
            &self.resolved,
            mem,
            self.resolved.payload,
            &self.payload,
            buf.len(),
        ) {
            // SAFETY: `at` is the host address of the payload's first segment in `mem` (the
            // table it was resolved in, which `mem` keeps mapped), and that segment holds
            // `buf.len()` bytes; `buf` is our own.
            unsafe { guest_copy(buf.as_mut_ptr(), at as *const u8, buf.len()) };
            return Ok(());
        }
        self.payload.read_at(mem, 0, buf)
    }

    /// Write `bytes` at the start of the data area.
    #[inline]
    pub fn write_data(&self, mem: &GuestMemoryMmap, bytes: &[u8]) -> Result<(), MemFault> {
        if let Some(at) = first_seg_at(
            &self.resolved,
            mem,
            self.resolved.data,
            &self.data,
            bytes.len(),
        ) {
            // SAFETY: as in `read_payload`, for the data area's first segment; `bytes` is ours.
            unsafe { guest_copy(at as *mut u8, bytes.as_ptr(), bytes.len()) };
            return Ok(());
        }
        self.data.write_at(mem, 0, bytes)
    }

    /// Host address of the whole completion area, if the parse resolved it in `mem`: a hot
    /// writer stores a completion there directly (`fabric::store_completion`).
    #[inline(always)]
    pub fn comp_at(&self, mem: &GuestMemoryMmap) -> Option<*mut u8> {
        first_seg_at(
            &self.resolved,
            mem,
            self.resolved.comp,
            &self.comp,
            COMPLETION_LEN,
        )
        .map(|at| at as *mut u8)
    }

    /// Write `c` (a completion) into the completion area.
    #[inline]
    pub fn write_comp(&self, mem: &GuestMemoryMmap, c: &[u8]) -> Result<(), MemFault> {
        if let Some(at) = first_seg_at(&self.resolved, mem, self.resolved.comp, &self.comp, c.len())
        {
            // SAFETY: as in `read_payload`, for the completion area; `c` is ours.
            unsafe { guest_copy(at as *mut u8, c.as_ptr(), c.len()) };
            return Ok(());
        }
        self.comp.write_at(mem, 0, c)
    }

    /// The memory table the request's host addresses were resolved in (the one its chain was
    /// parsed in), if any.
    #[inline]
    pub fn table(&self) -> Option<&GuestMemoryMmap> {
        self.resolved.table.as_deref()
    }

    /// Move out the memory table the parse resolved host addresses in, with the host addresses
    /// of the data area's and the completion area's first bytes (0: not resolved): a posted
    /// receive keeps these instead of the whole request (`fabric::posted`).
    #[inline]
    pub fn take_rx_resolved(&mut self) -> (Option<Arc<GuestMemoryMmap>>, usize, usize) {
        let r = std::mem::take(&mut self.resolved);
        (r.table, r.data, r.comp)
    }

    /// Where a valid request's bytes and completion go if it is a plain receive (RECV or
    /// TRECV, a flag at most DIRECTED, no payload, a data area of at most one range, the
    /// completion area one): what [`take_plain_recv`] hands on for it.
    #[cfg(test)]
    pub fn plain_rx(&self) -> Option<PlainRx> {
        let r = &self.req;
        let comp = match self.comp.segs.as_slice() {
            [c] if c.len as usize == COMPLETION_LEN => c.addr,
            _ => return None,
        };
        let data = match self.data.segs.as_slice() {
            [] => Seg { addr: 0, len: 0 },
            [d] => *d,
            _ => return None,
        };
        let plain = matches!(r.opcode, Opcode::Recv | Opcode::TRecv)
            && r.flags & !flags::DIRECTED == 0
            && self.payload.len == 0;
        plain.then_some(PlainRx {
            data,
            comp,
            data_at: if data.len > 0 { self.resolved.data } else { 0 },
            comp_at: self.resolved.comp,
        })
    }

    /// Resolve the host addresses of the streams' first bytes in `mem`, as a ring's parse does
    /// (a request built by hand, as if parsed from a ring).
    #[cfg(test)]
    pub fn resolve_in(&mut self, mem: Arc<GuestMemoryMmap>) {
        let at = |s: &Segs| {
            s.segs
                .first()
                .filter(|g| g.len > 0)
                .and_then(|g| mem.get_host_address(GuestAddress(g.addr)).ok())
                .map_or(0, |p| p as usize)
        };
        self.resolved.payload = at(&self.payload);
        self.resolved.data = at(&self.data);
        self.resolved.comp = at(&self.comp);
        self.resolved.table = Some(mem);
    }

    /// Where a send's payload and completion are if it has a plain send's streams (SEND or
    /// TSEND, a payload of at most one range, no data area, the completion area one range):
    /// what [`take_plain_send`] hands on for such a chain (whatever its flags: the handler
    /// must decide any header as the general path does).
    #[cfg(test)]
    pub fn plain_tx(&self) -> Option<PlainTx> {
        let comp = match self.comp.segs.as_slice() {
            [c] if c.len as usize == COMPLETION_LEN => c.addr,
            _ => return None,
        };
        let payload = match self.payload.segs.as_slice() {
            [] => Seg { addr: 0, len: 0 },
            [p] => *p,
            _ => return None,
        };
        let plain = matches!(self.req.opcode, Opcode::Send | Opcode::TSend) && self.data.len == 0;
        plain.then_some(PlainTx {
            payload,
            comp,
            payload_at: if payload.len > 0 {
                self.resolved.payload
            } else {
                0
            },
            comp_at: self.resolved.comp,
        })
    }

    /// Move out the memory table the parse resolved host addresses in: a plain receive's
    /// record keeps it ([`Verdict::Recv`]).
    #[inline(always)]
    pub fn take_table(&mut self) -> Option<Arc<GuestMemoryMmap>> {
        self.resolved.table.take()
    }

    /// Move the request out of `self`, leaving its header and no streams behind: a handler
    /// lent a request from a batch takes it this way when it keeps it.
    pub fn take(&mut self) -> Req {
        let rest = Req {
            queue: self.queue,
            head: self.head,
            req: self.req,
            payload: Segs::default(),
            data: Segs::default(),
            comp: Segs::default(),
            resolved: Resolved::default(),
        };
        std::mem::replace(self, rest)
    }
}

/// Resolved address `at` of stream `s` if it was resolved in `mem` and `s`'s first segment
/// holds `len` bytes.
#[inline]
fn first_seg_at(
    r: &Resolved,
    mem: &GuestMemoryMmap,
    at: usize,
    s: &Segs,
    len: usize,
) -> Option<usize> {
    let first = s.segs.first()?;
    if len as u64 > u64::from(first.len) {
        return None;
    }
    r.in_table(mem, at)
}

/// What parsing made of a chain. Its streams (and, for a request, the header) are in the
/// [`Req`] it was parsed into: the chain is parsed in place, not moved around.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A valid request.
    Req,
    /// A valid plain receive ([`take_plain_recv`]): its header is in the [`Req`], its streams are not
    /// built (they are the previous chain's): `PlainRx` says where its bytes and completion
    /// go, and [`PlainRx::fill`] builds the streams the general parse gives it.
    Recv(PlainRx),
    /// A valid plain send ([`take_plain_send`]): its header is in the [`Req`], its streams are
    /// not built (they are the previous chain's): `PlainTx` says where its payload and
    /// completion are, and [`PlainTx::fill`] builds the streams the general parse gives it.
    Send(PlainTx),
    /// Malformed or refused request with room for a completion (the `Req`'s `comp`): complete
    /// it with `status`.
    Reject { status: Status, cookie: u64 },
    /// No usable completion area (or a chain that cannot be walked): used length 0.
    Unusable(&'static str),
}

#[cfg(test)]
impl Verdict {
    /// The verdict with a plain receive's streams built into `out` ([`PlainRx::fill`]), as
    /// the general parse gives them.
    pub fn general(self, out: &mut Req) -> Verdict {
        match self {
            Verdict::Recv(rx) => {
                rx.fill(out);
                Verdict::Req
            }
            Verdict::Send(tx) => {
                tx.fill(out);
                Verdict::Req
            }
            v => v,
        }
    }
}

#[cfg(test)]
/// Result of parsing one chain, by value (tests compare parsers with it).
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    Req(Req),
    Reject {
        queue: u16,
        head: u16,
        comp: Segs,
        status: Status,
        cookie: u64,
    },
    Unusable {
        queue: u16,
        head: u16,
        why: &'static str,
    },
}

#[cfg(test)]
impl Parsed {
    /// The request `r` parsed into with verdict `v`.
    pub fn new(mut r: Req, v: Verdict) -> Self {
        match v {
            Verdict::Req => Parsed::Req(r),
            Verdict::Recv(rx) => {
                rx.fill(&mut r);
                Parsed::Req(r)
            }
            Verdict::Send(tx) => {
                tx.fill(&mut r);
                Parsed::Req(r)
            }
            Verdict::Reject { status, cookie } => Parsed::Reject {
                queue: r.queue,
                head: r.head,
                comp: r.comp,
                status,
                cookie,
            },
            Verdict::Unusable(why) => Parsed::Unusable {
                queue: r.queue,
                head: r.head,
                why,
            },
        }
    }

    /// Back into a request and its verdict: a plain receive as the data path hands it on
    /// ([`Verdict::Recv`], [`Req::plain_rx`]).
    pub fn split(self) -> (Req, Verdict) {
        match self {
            Parsed::Req(r) => match r.plain_rx() {
                Some(rx) => (r, Verdict::Recv(rx)),
                None => (r, Verdict::Req),
            },
            Parsed::Reject {
                queue,
                head,
                comp,
                status,
                cookie,
            } => {
                let mut r = Req::blank(queue, head);
                r.comp = comp;
                (r, Verdict::Reject { status, cookie })
            }
            Parsed::Unusable { queue, head, why } => {
                (Req::blank(queue, head), Verdict::Unusable(why))
            }
        }
    }
}

/// The ring itself is corrupt: the guest is disconnected.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RingError {
    #[error("ring addresses are not inside guest memory")]
    Invalid,
    #[error("available ring: {0}")]
    Avail(QueueError),
    #[error("head descriptor index {head} out of range (queue size {size})")]
    BadHead { head: u16, size: u16 },
}

#[cfg(test)]
/// Pop up to `max` chains. Fails when the ring is corrupt: rings outside guest memory, avail
/// index more than a queue size ahead, a head index out of range.
pub(crate) fn pop_chains<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    max: usize,
) -> Result<Vec<DescriptorChain<&'m GuestMemoryMmap>>, RingError> {
    if !queue.is_valid(mem) {
        return Err(RingError::Invalid);
    }
    let size = queue.size();
    let iter = queue.iter(mem).map_err(RingError::Avail)?;
    let mut out = Vec::new();
    for chain in iter.take(max) {
        if chain.head_index() >= size {
            return Err(RingError::BadHead {
                head: chain.head_index(),
                size,
            });
        }
        out.push(chain);
    }
    Ok(out)
}

/// Opcodes this device implements (others answer `Unsupported`).
pub(crate) fn implemented(op: Opcode) -> bool {
    use Opcode::*;
    matches!(
        op,
        QueryCaps
            | EpOpen
            | EpClose
            | Cancel
            | AddrCheck
            | SvcBind
            | SvcResolve
            | Send
            | TSend
            | Recv
            | TRecv
            | MrReg
            | MrDereg
            | MrEvent
            | CommitEvent
            | CommitReply
            | RmaWrite
            | RmaRead
            | Atomic
            | FetchAtomic
            | CompareAtomic
            | Flush
    )
}

/// Descriptors that carry payload or data-area bytes: those lying wholly inside the 96-byte
/// header or the 64-byte completion do not count against `max_sge`.
fn data_descriptors(count: usize, readable: &Segs, writable: &Segs) -> usize {
    let mut off = 0u64;
    let mut control = 0usize;
    for seg in readable.segs.as_slice() {
        off += u64::from(seg.len);
        if seg.len > 0 && off <= REQ_HEADER_LEN as u64 {
            control += 1;
        }
    }
    let comp_start = writable.len.saturating_sub(COMPLETION_LEN as u64);
    let mut off = 0u64;
    for seg in writable.segs.as_slice() {
        if seg.len > 0 && off >= comp_start {
            control += 1;
        }
        off += u64::from(seg.len);
    }
    count.saturating_sub(control)
}

#[cfg(test)]
/// Whether the descriptor at the head of a chain is an indirect one (checked against the
/// negotiated features: virtio-queue follows indirect tables unconditionally).
pub(crate) fn head_is_indirect(mem: &GuestMemoryMmap, desc_table: u64, head: u16) -> bool {
    let flags_at = desc_table
        .checked_add(16 * u64::from(head))
        .and_then(|a| a.checked_add(12));
    flags_at
        .and_then(|a| mem.read_obj::<u16>(GuestAddress(a)).ok())
        .is_some_and(|f| u16::from_le(f) & VIRTQ_DESC_F_INDIRECT != 0)
}

#[cfg(test)]
/// `VIRTQ_DESC_F_INDIRECT`.
const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// The descriptors of one chain, sorted into its two byte streams.
#[derive(Default)]
pub(crate) struct Walked {
    pub readable: Segs,
    pub writable: Segs,
    /// Descriptors seen (an indirect descriptor itself is not counted, its table's are).
    pub count: usize,
    /// The last descriptor seen still has `VIRTQ_DESC_F_NEXT`: the walk stopped early.
    pub last_has_next: bool,
    /// A descriptor lies (partly) outside guest memory.
    pub fault: bool,
    /// A readable descriptor follows a writable one.
    pub write_before_read: bool,
    /// Host address of the first readable descriptor when it lies in one region of the
    /// memory table at the second address (where the walk found it): the header is read
    /// from there without a second lookup.
    first_read: Option<(*const u8, *const GuestMemoryMmap)>,
    /// The region of the last descriptor (of the `mem` the walk is given).
    hint: Option<RegionHint>,
}

impl Walked {
    /// Add one descriptor.
    // Inlined into the ring's walk (its only caller on the data path): a call per descriptor
    // cost more than the work.
    #[inline]
    pub fn add(&mut self, mem: &GuestMemoryMmap, addr: u64, len: u32, write: bool, next: bool) {
        self.count += 1;
        self.last_has_next = next;
        let seg = Seg { addr, len };
        // One region lookup in the common case (a descriptor inside one region); one spanning
        // regions takes the general check.
        let host = if len == 0 {
            None
        } else {
            host_ptr_hinted(mem, &mut self.hint, addr, len as usize)
        };
        let inside = len == 0
            || host.is_some()
            || GuestMemoryBackend::check_range(mem, GuestAddress(addr), len as usize);
        if !inside {
            self.fault = true;
        }
        if write {
            self.writable.push(seg);
        } else {
            if !self.writable.segs.is_empty() {
                self.write_before_read = true;
            }
            if self.readable.segs.is_empty() {
                self.first_read = host.map(|p| (p as *const u8, mem as *const GuestMemoryMmap));
            }
            self.readable.push(seg);
        }
    }

    /// Read the first `buf.len()` readable bytes through the host address the walk found, if
    /// the first readable descriptor holds them and `mem` is the table it was found in.
    fn read_head(&self, mem: &GuestMemoryMmap, buf: &mut [u8]) -> Option<()> {
        let (p, table) = self.first_read?;
        let first = self.readable.segs.first()?;
        if !std::ptr::eq(table, mem) || (first.len as usize) < buf.len() {
            return None;
        }
        // SAFETY: `host_ptr` found the whole first descriptor (at least `buf.len()` bytes) at
        // `p` inside one region of `mem`, which the caller's borrow keeps mapped (the same
        // table: checked above). `buf` is our own buffer; guest memory is only copied from
        // (bytewise-volatile or memcpy), never referenced.
        unsafe { guest_copy(buf.as_mut_ptr(), p, buf.len()) };
        Some(())
    }
}

#[cfg(test)]
/// Parse and validate one chain popped from virtqueue `queue` by virtio-queue's iterator.
pub(crate) fn parse_chain<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    queue: u16,
    limits: &Limits,
    acked: u64,
    head_indirect: bool,
) -> Parsed
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let head = chain.head_index();
    let mut w = Walked::default();
    for desc in chain {
        w.add(
            mem,
            desc.addr().0,
            desc.len(),
            desc.is_write_only(),
            desc.has_next(),
        );
    }
    let mut r = Req::blank(queue, head);
    let v = parse_walked(mem, &mut w, limits, acked, head_indirect, &mut r);
    Parsed::new(r, v)
}

/// Validate a walked chain and parse its request into `out` (whose `queue` and `head` name the
/// chain). The chain's streams are moved out of `w` (split in place into header/payload and
/// data/completion: no stream is rebuilt for the common shapes).
pub(crate) fn parse_walked(
    mem: &GuestMemoryMmap,
    w: &mut Walked,
    limits: &Limits,
    acked: u64,
    head_indirect: bool,
    out: &mut Req,
) -> Verdict {
    // Read straight into the header: a byte array on the stack need not be aligned for
    // `ReqHeader::from_slice` (which then refused a good header when the layout moved).
    let mut hdr = ReqHeader::default();
    let head_read = w.read_head(mem, hdr.as_mut_slice()).is_some();
    let (count, last_has_next, fault, write_before_read) =
        (w.count, w.last_has_next, w.fault, w.write_before_read);
    if count == 0 {
        return Verdict::Unusable("empty chain");
    }
    if last_has_next {
        return Verdict::Unusable("chain cannot be walked to its end (loop, bad next, overflow)");
    }
    if w.writable.len < COMPLETION_LEN as u64 {
        return Verdict::Unusable("no room for a completion");
    }
    // Only header and completion descriptors are exempt, so a chain of at most `max_sge`
    // descriptors passes without counting them (counted on the whole streams, before the split).
    let too_many_sge = count > limits.max_sge as usize
        && data_descriptors(count, &w.readable, &w.writable) > limits.max_sge as usize;
    out.data = std::mem::take(&mut w.writable);
    out.comp = out.data.split_off_tail(COMPLETION_LEN as u64);
    // Without a fault every descriptor, so every part of one, lies inside guest memory.
    let comp_ok =
        !fault
            || out.comp.segs.iter().all(|c| {
                GuestMemoryBackend::check_range(mem, GuestAddress(c.addr), c.len as usize)
            });
    if !comp_ok {
        return Verdict::Unusable("completion area outside guest memory");
    }
    let reject = |status| Verdict::Reject { status, cookie: 0 };
    if fault {
        return reject(Status::Fault);
    }
    if write_before_read
        || (head_indirect && acked & bit(VIRTIO_RING_F_INDIRECT_DESC) == 0)
        || too_many_sge
        || w.readable.len < REQ_HEADER_LEN as u64
    {
        return reject(Status::BadChain);
    }
    if !head_read && w.readable.read_at(mem, 0, hdr.as_mut_slice()).is_err() {
        return reject(Status::Fault);
    }
    out.payload = std::mem::take(&mut w.readable);
    out.payload.drop_front(REQ_HEADER_LEN as u64);
    parse_header(&hdr, limits, acked, out)
}

/// Where the bytes and the completion of a plain receive go ([`Verdict::Recv`]):
/// a data area of one range and the completion area, with their host addresses in the memory
/// table the request's `resolved` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PlainRx {
    /// The data area (`{0, 0}`: none).
    pub data: Seg,
    /// Guest address of the completion area ([`COMPLETION_LEN`] bytes).
    pub comp: u64,
    /// Host addresses of the data area's first byte (0: none) and of the completion area.
    pub data_at: usize,
    pub comp_at: usize,
}

impl PlainRx {
    /// Build `out`'s streams and host addresses as [`parse_simple`] does for the same chain:
    /// the receive as a general request (`out` holds its header and memory table).
    pub fn fill(self, out: &mut Req) {
        out.payload = Segs::default();
        out.data = Segs::one(self.data);
        out.comp = Segs::one(Seg {
            addr: self.comp,
            len: COMPLETION_LEN as u32,
        });
        out.resolved.payload = 0;
        out.resolved.data = self.data_at;
        out.resolved.comp = self.comp_at;
    }
}

/// Copy the request header at `src` into `out.req` and take it as a plain receive if it is
/// one: RECV or TRECV with a flag at most DIRECTED, on an RX ring of a queue pair the driver
/// may use ([`ParseCtx::plain`], the caller's to check), whose chain has no payload and a
/// data area of one range (the caller's shape, [`crate::ring::RingView::pop`]). Three compares
/// on the copy, against words worked out when the acked features last changed; the memory table
/// the chain lies in goes into `out`'s `resolved` (its streams are not built: [`Verdict::Recv`]).
/// `false`: not such a receive (`out.req` holds no request then), for the general parse to
/// decide. The check accepts only what the general parse accepts
/// (`plain_receive_check_accepts_only_what_parse_header_does`).
///
/// # Safety
/// `src` must be valid for reads of [`REQ_HEADER_LEN`] bytes of `mem` (guest memory: the
/// guest may write them meanwhile).
#[inline(always)]
pub(crate) unsafe fn take_plain_recv(
    mem: &Arc<GuestMemoryMmap>,
    src: *const u8,
    ctx: &ParseCtx,
    out: &mut Req,
) -> bool {
    if !REQUEST_IS_WIRE_LAYOUT {
        return false;
    }
    let dst = (&mut out.req as *mut Request).cast::<u8>();
    // The guest's bytes are read once, into our own copy; the checks look at the copy.
    // SAFETY: `src` is valid for REQ_HEADER_LEN bytes (the caller's contract); `dst` is
    // `out.req`, REQ_HEADER_LEN bytes (`Request` is laid out as `ReqHeader`) of our own.
    unsafe { guest_copy(dst, src, REQ_HEADER_LEN) };
    // SAFETY: every byte of `out.req` was just written, `Request` has `ReqHeader`'s size and
    // alignment, and any bytes are a valid `ReqHeader`. `out.req` is not used while `h` lives.
    let h: &ReqHeader = unsafe { &*(dst as *const ReqHeader) };
    let word = u64::from(u16::from(h.opcode)) | u64::from(u16::from(h.reserved0)) << 16;
    if (word != ctx.recv_words[0] && word != ctx.recv_words[1])
        || u64::from(h.flags) & !flags::DIRECTED != 0
        || u16::from(h.reserved1) != 0
    {
        // The copy's opcode may be no `Opcode`: a valid one until a parse sets the request.
        out.req.opcode = Opcode::QueryCaps;
        return false;
    }
    // The opcode bytes are RECV's or TRECV's: the request is valid as copied.
    if !out
        .resolved
        .table
        .as_ref()
        .is_some_and(|t| Arc::ptr_eq(t, mem))
    {
        out.resolved.table = Some(mem.clone());
    }
    true
}

// `parse_simple` reads the header as one `ReqHeader`.
const _: () = assert!(std::mem::size_of::<ReqHeader>() == REQ_HEADER_LEN);

/// What a chain is parsed against: the device's limits and the features its driver acked,
/// with what [`take_header`]'s combined checks need of them worked out once (a device keeps
/// one while its driver's features stay the same).
#[derive(Clone)]
pub(crate) struct ParseCtx {
    pub limits: Limits,
    pub acked: u64,
    /// `acked`, or nothing without VIRTIO_F_VERSION_1 (which every request needs).
    usable_features: u64,
    /// Flags a request may carry without a rule beyond its opcode's allowed set: not a
    /// completion level (at most one), not DISCARD (needs PEEK or CLAIM), not MULTI_RECV (not
    /// implemented), none whose feature was not acked.
    plain_flags: u64,
    /// Queue pairs a request may name: past the first only with VIRTIO_FABRIC_F_MQ.
    usable_pairs: u16,
    /// The largest payload of a send, with and without INJECT.
    max_send: u64,
    max_inject: u64,
    /// The first header word (opcode and `reserved0`) of a RECV and of a TRECV
    /// [`take_plain_recv`] passes, or `u64::MAX` (no header word) where the opcode's feature (or
    /// VIRTIO_F_VERSION_1) was not acked, or `max_sge` is below the three descriptors such a
    /// chain may have.
    recv_words: [u64; 2],
    /// The same for a SEND and a TSEND ([`take_header`] on a TX ring), with the flags a plain
    /// one may carry: `plain_flags` of those a send accepts.
    send_words: [u64; 2],
    send_flags: u64,
    /// [`ParseCtx::plain`] of queues 0..64 as bits (bit `q`: queue `q`), worked out once.
    tx_lanes: u64,
    rx_lanes: u64,
}

impl ParseCtx {
    pub fn new(limits: Limits, acked: u64) -> Self {
        let has = |feature: u32| acked & bit(feature) != 0;
        let mut plain_flags =
            flags::ALL & !(flags::COMPLETION_LEVELS | flags::DISCARD | flags::MULTI_RECV);
        if !has(VIRTIO_FABRIC_F_REMOTE_CQ_DATA) {
            plain_flags &= !flags::REMOTE_CQ_DATA;
        }
        let mut ctx = ParseCtx {
            usable_features: if has(VIRTIO_F_VERSION_1) { acked } else { 0 },
            plain_flags,
            usable_pairs: if has(VIRTIO_FABRIC_F_MQ) {
                limits.num_queue_pairs
            } else {
                limits.num_queue_pairs.min(1)
            },
            max_send: limits.max_msg_size,
            max_inject: limits.max_msg_size.min(u64::from(limits.inject_size)),
            recv_words: [Opcode::Recv, Opcode::TRecv].map(|op| {
                let feature = op.required_feature();
                if has(VIRTIO_F_VERSION_1) && has(feature) && limits.max_sge >= 3 {
                    u64::from(op as u16)
                } else {
                    u64::MAX
                }
            }),
            send_words: [Opcode::Send, Opcode::TSend].map(|op| {
                if has(VIRTIO_F_VERSION_1) && has(op.required_feature()) {
                    u64::from(op as u16)
                } else {
                    u64::MAX
                }
            }),
            // SEND's and TSEND's are the same.
            send_flags: plain_flags & allowed_flags(Opcode::Send) & allowed_flags(Opcode::TSend),
            limits,
            acked,
            tx_lanes: 0,
            rx_lanes: 0,
        };
        for q in 0..u64::BITS as u16 {
            let (tx, rx) = ctx.plain_by_kind(q);
            ctx.tx_lanes |= u64::from(tx) << q;
            ctx.rx_lanes |= u64::from(rx) << q;
        }
        ctx
    }

    /// Whether chains of virtqueue `queue` may be plain sends ([`parse_send`], [`take_header`]:
    /// a TX ring of a queue pair the driver may use, on a device whose `max_sge` refuses no
    /// chain of three descriptors) and whether they may be plain receives
    /// ([`take_plain_recv`]: an RX ring of such a pair): two bits of words worked out once
    /// (asked once per ring visit), past them worked out at once.
    #[inline(always)]
    pub fn plain(&self, queue: u16) -> (bool, bool) {
        if u32::from(queue) < u64::BITS {
            return (
                self.tx_lanes >> queue & 1 != 0,
                self.rx_lanes >> queue & 1 != 0,
            );
        }
        self.plain_by_kind(queue)
    }

    /// [`ParseCtx::plain`] worked out from the queue's kind.
    fn plain_by_kind(&self, queue: u16) -> (bool, bool) {
        match queue_kind(queue) {
            QueueKind::Tx(qp) => (qp < self.usable_pairs && self.limits.max_sge >= 3, false),
            QueueKind::Rx(qp) => (false, qp < self.usable_pairs),
            QueueKind::Control => (false, false),
        }
    }
}

/// One descriptor of a [`SimpleChain`] and its host address (`len` 0: no such descriptor).
#[derive(Clone, Copy)]
pub(crate) struct HostSeg {
    pub seg: Seg,
    pub host: *mut u8,
}

impl HostSeg {
    /// No descriptor.
    pub const NONE: HostSeg = HostSeg {
        seg: Seg { addr: 0, len: 0 },
        host: std::ptr::null_mut(),
    };
}

/// A chain of the shape drivers post, as the ring's walk found it
/// ([`crate::ring::RingView::pop`]): a readable header descriptor of at least 96 bytes, at most
/// one more descriptor before the last, which is writable and holds the whole completion; no
/// indirect table; each descriptor inside one memory region, none empty. [`parse_simple`]
/// splits it into its streams.
#[derive(Clone, Copy)]
pub(crate) struct SimpleChain {
    /// The first descriptor: the header (its first 96 bytes), then payload.
    pub header: HostSeg,
    /// A second readable descriptor (payload), or none.
    pub payload: HostSeg,
    /// A writable descriptor before the last (data area), or none.
    pub data: HostSeg,
    /// The last descriptor: data area, then the completion (its last 64 bytes).
    pub comp: HostSeg,
}

/// A chain of the shape drivers post on a TX ring, as the ring's walk found it
/// ([`crate::ring::RingView::pop`]): a readable header descriptor of at least 96 bytes, then
/// a readable payload descriptor (if the header's is exactly 96) or a writable data descriptor
/// or neither, then a writable completion descriptor of exactly 64 bytes: one range of payload
/// (or none), one of data area (or none), the completion. No indirect table; each descriptor
/// inside one memory region, none empty.
#[derive(Clone, Copy)]
pub(crate) struct SendChain {
    /// The header (its first 96 bytes), then payload.
    pub header: HostSeg,
    /// The payload descriptor, or none (then the payload is the header's rest, if any).
    pub payload: HostSeg,
    /// The data area's descriptor, or none.
    pub data: HostSeg,
    /// The completion.
    pub comp: HostSeg,
}

/// Parse a chain of the TX ring's shape ([`SendChain`]) into `out` as [`parse_simple`] does
/// (the same streams and host addresses, the same header check on a TX ring), with the streams
/// built for that shape only: each one range (or none).
#[inline(always)]
pub(crate) fn parse_send(
    mem: &Arc<GuestMemoryMmap>,
    c: &SendChain,
    ctx: &ParseCtx,
    out: &mut Req,
) -> Verdict {
    out.comp = Segs::one(c.comp.seg);
    // Mostly no data area, and none in the slot from the previous chain: nothing to write.
    if c.data.seg.len != 0 || out.data.len != 0 {
        out.data = Segs::one(c.data.seg);
    }
    let hdr = c.header;
    let rest = hdr.seg.len - REQ_HEADER_LEN as u32;
    let (payload, payload_at) = if rest > 0 {
        (
            Seg {
                addr: hdr.seg.addr.wrapping_add(REQ_HEADER_LEN as u64),
                len: rest,
            },
            hdr.host as usize + REQ_HEADER_LEN,
        )
    } else {
        (c.payload.seg, c.payload.host as usize)
    };
    out.payload = Segs::one(payload);
    if !out
        .resolved
        .table
        .as_ref()
        .is_some_and(|t| Arc::ptr_eq(t, mem))
    {
        out.resolved.table = Some(mem.clone());
    }
    out.resolved.payload = payload_at;
    out.resolved.data = c.data.host as usize;
    out.resolved.comp = c.comp.host as usize;
    // SAFETY: the walk found the whole header descriptor (at least REQ_HEADER_LEN bytes) at
    // `hdr.host` inside one region of `mem`, which the caller's borrow keeps mapped.
    unsafe { take_header(hdr.host, ctx, true, out) }
}

/// Where the payload and the completion of a plain send are ([`Verdict::Send`]): a payload of
/// one range (or none) and the completion area, with their host addresses in the memory table
/// the request's `resolved` holds; no data area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PlainTx {
    /// The payload (`{0, 0}`: none).
    pub payload: Seg,
    /// Guest address of the completion area ([`COMPLETION_LEN`] bytes).
    pub comp: u64,
    /// Host addresses of the payload's first byte (0: none) and of the completion area.
    pub payload_at: usize,
    pub comp_at: usize,
}

impl PlainTx {
    /// Build `out`'s streams and host addresses as [`parse_send`] does for the same chain: the
    /// send as a general request (`out` holds its header and memory table).
    pub fn fill(self, out: &mut Req) {
        out.comp = Segs::one(Seg {
            addr: self.comp,
            len: COMPLETION_LEN as u32,
        });
        if out.data.len != 0 {
            out.data = Segs::one(Seg { addr: 0, len: 0 });
        }
        out.payload = Segs::one(self.payload);
        out.resolved.payload = self.payload_at;
        out.resolved.data = 0;
        out.resolved.comp = self.comp_at;
    }
}

/// Take a chain of the TX ring's shape ([`SendChain`]) as a plain send if it is one: no data
/// area, and a header that passes [`take_header`]'s four compares for a plain SEND or TSEND
/// (on a TX ring of a queue pair the driver may use, the caller's to check). Its streams are
/// not built ([`Verdict::Send`]); the memory table goes into `out`'s `resolved`. Any other
/// chain is [`parse_send`]'s to decide, from a copy of its own. What it takes is what
/// `parse_send` accepts, the same request and streams
/// (`plain_send_check_accepts_only_what_parse_send_does`).
#[inline(always)]
pub(crate) fn take_plain_send(
    mem: &Arc<GuestMemoryMmap>,
    c: &SendChain,
    ctx: &ParseCtx,
    out: &mut Req,
) -> Verdict {
    if c.data.seg.len != 0 || !REQUEST_IS_WIRE_LAYOUT {
        return parse_send(mem, c, ctx, out);
    }
    let hdr = c.header;
    let rest = hdr.seg.len - REQ_HEADER_LEN as u32;
    let (payload, payload_at) = if rest > 0 {
        (
            Seg {
                addr: hdr.seg.addr.wrapping_add(REQ_HEADER_LEN as u64),
                len: rest,
            },
            hdr.host as usize + REQ_HEADER_LEN,
        )
    } else {
        (c.payload.seg, c.payload.host as usize)
    };
    let dst = (&mut out.req as *mut Request).cast::<u8>();
    // The guest's bytes are read once, into our own copy; the checks look at the copy.
    // SAFETY: the walk found the whole header descriptor (at least REQ_HEADER_LEN bytes) at
    // `hdr.host` inside one region of `mem`, which the caller's borrow keeps mapped; `dst` is
    // `out.req`, REQ_HEADER_LEN bytes (`Request` is laid out as `ReqHeader`) of our own.
    unsafe { guest_copy(dst, hdr.host, REQ_HEADER_LEN) };
    // SAFETY: every byte of `out.req` was just written, `Request` has `ReqHeader`'s size and
    // alignment, and any bytes are a valid `ReqHeader`. `out.req` is not used while `h` lives.
    let h: &ReqHeader = unsafe { &*(dst as *const ReqHeader) };
    let fl = u64::from(h.flags);
    let word = u64::from(u16::from(h.opcode)) | u64::from(u16::from(h.reserved0)) << 16;
    let max_payload = if fl & flags::INJECT != 0 {
        ctx.max_inject
    } else {
        ctx.max_send
    };
    if (word != ctx.send_words[0] && word != ctx.send_words[1])
        || fl & !ctx.send_flags != 0
        || u16::from(h.reserved1) != 0
        || u64::from(payload.len) > max_payload
    {
        // The copy's opcode may be no `Opcode`: a valid one until a parse sets the request.
        out.req.opcode = Opcode::QueryCaps;
        return parse_send(mem, c, ctx, out);
    }
    // The opcode bytes are SEND's or TSEND's: the request is valid as copied.
    if !out
        .resolved
        .table
        .as_ref()
        .is_some_and(|t| Arc::ptr_eq(t, mem))
    {
        out.resolved.table = Some(mem.clone());
    }
    Verdict::Send(PlainTx {
        payload,
        comp: c.comp.seg.addr,
        payload_at,
        comp_at: c.comp.host as usize,
    })
}

/// Parse a chain of the common shape into `out`: every check of [`parse_walked`] before the
/// header holds for it by construction, so only the header is read and checked. `mem` is the
/// memory table the walk found the host addresses in (alive while it is borrowed); `tx`: the
/// chain is from a TX ring of a queue pair the driver may use ([`ParseCtx::plain`]).
#[inline(always)]
pub(crate) fn parse_simple(
    mem: &Arc<GuestMemoryMmap>,
    c: &SimpleChain,
    ctx: &ParseCtx,
    tx: bool,
    out: &mut Req,
) -> Verdict {
    let last = c.comp.seg;
    let keep = last.len - COMPLETION_LEN as u32;
    out.comp = Segs::one(Seg {
        addr: last.addr.wrapping_add(u64::from(keep)),
        len: COMPLETION_LEN as u32,
    });
    // Mostly the previous chain's table (a request kept is taken with its own): kept then,
    // without a reference count round trip.
    if !out
        .resolved
        .table
        .as_ref()
        .is_some_and(|t| Arc::ptr_eq(t, mem))
    {
        out.resolved.table = Some(mem.clone());
    }
    out.resolved.comp = c.comp.host as usize + keep as usize;
    // Only header and completion descriptors are exempt from `max_sge` (as in `parse_walked`):
    // the header's when it is exactly 96 bytes, the completion's when exactly 64.
    // Such a chain has three descriptors at most: only a `max_sge` below that can refuse it.
    let max_sge = ctx.limits.max_sge as usize;
    if max_sge < 3 {
        let count = 2 + usize::from(c.payload.seg.len > 0) + usize::from(c.data.seg.len > 0);
        let control =
            usize::from(c.header.seg.len as usize == REQ_HEADER_LEN) + usize::from(keep == 0);
        if count > max_sge && count - control > max_sge {
            // Only the completion area is this chain's.
            out.resolved.payload = 0;
            out.resolved.data = 0;
            return Verdict::Reject {
                status: Status::BadChain,
                cookie: 0,
            };
        }
    }
    let hdr = c.header;
    let rest = hdr.seg.len - REQ_HEADER_LEN as u32;
    if rest > 0 {
        out.payload = Segs::one(Seg {
            addr: hdr.seg.addr.wrapping_add(REQ_HEADER_LEN as u64),
            len: rest,
        });
        out.payload.push(c.payload.seg);
        out.resolved.payload = hdr.host as usize + REQ_HEADER_LEN;
    } else {
        // Empty (and host address 0) without a payload descriptor.
        out.payload = Segs::one(c.payload.seg);
        out.resolved.payload = c.payload.host as usize;
    }
    let tail = Seg {
        addr: last.addr,
        len: keep,
    };
    if c.data.seg.len > 0 {
        out.data = Segs::one(c.data.seg);
        out.data.push(tail);
        out.resolved.data = c.data.host as usize;
    } else {
        out.data = Segs::one(tail);
        out.resolved.data = if keep > 0 { c.comp.host as usize } else { 0 };
    }
    // SAFETY: the walk found the whole first descriptor (at least REQ_HEADER_LEN bytes) at
    // `hdr.host` inside one region of `mem`, which the caller's borrow keeps mapped.
    unsafe { take_header(hdr.host, ctx, tx, out) }
}

/// Copy the request header at `src` into `out.req` and check it (`out`'s streams are set):
/// on a TX ring of a queue pair the driver may use (`tx`), a plain SEND or TSEND passes four
/// compares; the common requests pass a few combined checks; any other header, or one that
/// fails them,
/// is checked by [`parse_header`], which decides exactly as it always did (the combined checks
/// accept only what it accepts: `combined_checks_accept_only_what_parse_header_does`).
///
/// # Safety
/// `src` must be valid for reads of [`REQ_HEADER_LEN`] bytes (guest memory: the guest may
/// write them meanwhile).
#[inline(always)]
unsafe fn take_header(src: *const u8, ctx: &ParseCtx, tx: bool, out: &mut Req) -> Verdict {
    if !REQUEST_IS_WIRE_LAYOUT {
        // SAFETY: the caller's contract; the bytes are copied, and any bytes are a valid
        // `ReqHeader` (plain integers).
        let h: ReqHeader = unsafe { std::ptr::read_unaligned(src as *const ReqHeader) };
        return parse_header(&h, &ctx.limits, ctx.acked, out);
    }
    let dst = (&mut out.req as *mut Request).cast::<u8>();
    // The guest's bytes are read once, into our own copy; everything below looks at the copy.
    // SAFETY: `src` is valid for REQ_HEADER_LEN bytes (the caller's contract); `dst` is
    // `out.req`, REQ_HEADER_LEN bytes (`Request` is laid out as `ReqHeader`) of our own.
    unsafe { guest_copy(dst, src, REQ_HEADER_LEN) };
    // SAFETY: every byte of `out.req` was just written, `Request` has `ReqHeader`'s size and
    // alignment, and any bytes are a valid `ReqHeader`. `out.req` is not used while `h` lives.
    let h: &ReqHeader = unsafe { &*(dst as *const ReqHeader) };
    let fl = u64::from(h.flags);
    let payload = out.payload.len;
    if tx {
        // A plain SEND or TSEND: its opcode and `reserved0` one word, its flags within the
        // plain ones, its payload within its limit.
        let word = u64::from(u16::from(h.opcode)) | u64::from(u16::from(h.reserved0)) << 16;
        let max_payload = if fl & flags::INJECT != 0 {
            ctx.max_inject
        } else {
            ctx.max_send
        };
        if (word == ctx.send_words[0] || word == ctx.send_words[1])
            && fl & !ctx.send_flags == 0
            && u16::from(h.reserved1) == 0
            && payload <= max_payload
        {
            // The opcode bytes are SEND's or TSEND's: the request is valid as copied.
            return Verdict::Req;
        }
    }
    let q = out.queue;
    // The queue's class as `QueueClass` numbers it, and its pair.
    let (class, qp) = match queue_kind(q) {
        QueueKind::Control => (QueueClass::Control, 0),
        QueueKind::Tx(qp) => (QueueClass::Tx, qp),
        QueueKind::Rx(qp) => (QueueClass::Rx, qp),
    };
    if let Some(info) = OpInfo::of(h.opcode.into()) {
        let max_payload = match info.opcode {
            Opcode::Send | Opcode::TSend if fl & flags::INJECT != 0 => ctx.max_inject,
            Opcode::Send | Opcode::TSend => ctx.max_send,
            Opcode::Recv | Opcode::TRecv => 0,
            // Other opcodes have rules of their own.
            _ => u64::MAX,
        };
        let odd = (fl & !(info.allowed & ctx.plain_flags))
            | u64::from(u16::from(h.reserved0) | u16::from(h.reserved1));
        if odd == 0
            && info.class == class
            && qp < ctx.usable_pairs
            && ctx.usable_features & info.features == info.features
            && payload <= max_payload
            && max_payload != u64::MAX
        {
            // The header's opcode bytes are `info.opcode`'s (`OpInfo::of`): the request is
            // valid as copied.
            out.req.opcode = info.opcode;
            return Verdict::Req;
        }
    }
    let h = *h;
    // The opcode may be no `Opcode`: a valid one until `parse_header` sets the request.
    out.req.opcode = Opcode::QueryCaps;
    parse_header(&h, &ctx.limits, ctx.acked, out)
}

/// Parse a chain the general walk took (walked in `mem`) into `out`, whose `queue` and `head`
/// name the chain; `head_indirect`: its head descriptor is an indirect one.
pub(crate) fn parse_general(
    mem: &GuestMemoryMmap,
    w: &mut Walked,
    head_indirect: bool,
    ctx: &ParseCtx,
    out: &mut Req,
) -> Verdict {
    // Host addresses of the previous chain are not this one's (nor is its table kept).
    out.resolved = Resolved::default();
    parse_walked(mem, w, &ctx.limits, ctx.acked, head_indirect, out)
}

/// Check a request header read from chain `out` names and, if it is valid, put it in `out`
/// (whose streams are set).
#[inline(always)]
fn parse_header(hdr: &ReqHeader, limits: &Limits, acked: u64, out: &mut Req) -> Verdict {
    let cookie = u64::from(hdr.cookie);
    let reject = |status| Verdict::Reject { status, cookie };

    if acked & bit(VIRTIO_F_VERSION_1) == 0 {
        return reject(Status::Unsupported);
    }
    let (class, qp) = match queue_kind(out.queue) {
        QueueKind::Control => (QueueClass::Control, 0),
        QueueKind::Tx(qp) => (QueueClass::Tx, qp),
        QueueKind::Rx(qp) => (QueueClass::Rx, qp),
    };
    if qp >= limits.num_queue_pairs {
        return reject(Status::Unsupported);
    }
    let info = match out.req.parse_op(hdr, class) {
        Ok(info) => info,
        Err(e) => return reject(e.status()),
    };
    let req = &out.req;
    let payload = out.payload.len;
    // Every feature the request needs (its opcode's, a queue pair past the first's, its
    // flags'), checked at once.
    let need = |on: bool, feature: u32| if on { bit(feature) } else { 0 };
    let needed = info.features
        | need(qp > 0, VIRTIO_FABRIC_F_MQ)
        | need(
            req.flags & flags::REMOTE_CQ_DATA != 0,
            VIRTIO_FABRIC_F_REMOTE_CQ_DATA,
        )
        | need(
            req.flags & flags::COMMIT_COMPLETE != 0,
            VIRTIO_FABRIC_F_RMA_PMEM,
        );
    // MULTI_RECV: specified but not implemented by this device yet.
    if acked & needed != needed || !implemented(req.opcode) || req.flags & flags::MULTI_RECV != 0 {
        return reject(Status::Unsupported);
    }

    match req.opcode {
        Opcode::Send | Opcode::TSend => {
            if payload > limits.max_msg_size {
                return reject(Status::TooLarge);
            }
            if req.flags & flags::INJECT != 0 && payload > u64::from(limits.inject_size) {
                return reject(Status::Invalid);
            }
        }
        Opcode::MrReg => {
            if req.count == 0
                || req.count > limits.max_sge
                || payload != u64::from(req.count) * MEM_SEG_LEN as u64
            {
                return reject(Status::Invalid);
            }
        }
        Opcode::RmaWrite | Opcode::RmaRead => {
            let list = u64::from(req.count) * RMA_IOV_LEN as u64;
            let write = req.opcode == Opcode::RmaWrite;
            if req.count > limits.max_sge || payload < list || (!write && payload != list) {
                return reject(Status::Invalid);
            }
            let local = if write { payload - list } else { out.data.len };
            if local > limits.max_msg_size {
                return reject(Status::TooLarge);
            }
            if req.flags & flags::INJECT != 0 && local > u64::from(limits.inject_size) {
                return reject(Status::Invalid);
            }
        }
        Opcode::Flush => {
            if req.count > limits.max_sge || payload != u64::from(req.count) * RMA_IOV_LEN as u64 {
                return reject(Status::Invalid);
            }
        }
        Opcode::Atomic | Opcode::FetchAtomic | Opcode::CompareAtomic => {
            // Operands (and compare values) of at most MAX_ATOMIC_COUNT 16-byte elements; the
            // exact length is checked against the datatype by the fabric.
            if payload > 2 * 16 * 4096 {
                return reject(Status::Invalid);
            }
            if req.flags & flags::INJECT != 0 && payload > u64::from(limits.inject_size) {
                return reject(Status::Invalid);
            }
        }
        _ => {
            if payload != 0 {
                return reject(Status::Invalid);
            }
        }
    }
    Verdict::Req
}

/// A completion with `status` for a request with `cookie`.
pub(crate) fn completion(status: Status, cookie: u64) -> Completion {
    Completion {
        status: (status as u32).into(),
        cookie: cookie.into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `take_header`'s combined checks against `parse_header` (the checks one by one, the
    /// general walk's): the same verdict and the same request for every header, queue, set of
    /// acked features, limits and payload length tried, the common requests and every kind of
    /// refusal among them.
    #[test]
    fn combined_checks_accept_only_what_parse_header_does() {
        use vfabric_proto::*;
        let ops: Vec<u16> = (0..=0x500u16)
            .filter(|&r| Opcode::from_u16(r).is_some())
            .chain([0, 0x7777, 0x0100, 0x0180, 0x0185, 0x0403])
            .collect();
        let features = [
            VIRTIO_F_VERSION_1,
            VIRTIO_FABRIC_F_MSG,
            VIRTIO_FABRIC_F_TAGGED,
            VIRTIO_FABRIC_F_RMA,
            VIRTIO_FABRIC_F_ATOMIC,
            VIRTIO_FABRIC_F_RMA_PMEM,
            VIRTIO_FABRIC_F_MQ,
            VIRTIO_FABRIC_F_REMOTE_CQ_DATA,
        ];
        let all = features.iter().fold(0, |a, f| a | bit(*f));
        // Everything, and everything but one feature at a time.
        let mut ackeds = vec![all];
        ackeds.extend(features.iter().skip(1).map(|f| all & !bit(*f)));
        ackeds.push(all & !bit(VIRTIO_F_VERSION_1));
        let mut flag_sets: Vec<u64> = vec![0, flags::ALL, 1 << 13, 1 << 63];
        flag_sets.extend((0..13).map(|b| 1u64 << b));
        flag_sets.extend((0..13).map(|b| flags::INJECT | (1u64 << b)));
        flag_sets.extend((0..13).map(|b| flags::DIRECTED | (1u64 << b)));
        flag_sets.push(flags::PEEK | flags::DISCARD);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..16 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            flag_sets.push(seed & flags::ALL);
        }
        let limits = [
            Limits::default(),
            Limits {
                num_queue_pairs: 1,
                inject_size: 4096,
                max_msg_size: 1000,
                ..Limits::default()
            },
            Limits {
                num_queue_pairs: 0,
                ..Limits::default()
            },
        ];
        let mut checked = [0usize; 2];
        for lim in &limits {
            let payloads = [
                0,
                1,
                u64::from(lim.inject_size),
                u64::from(lim.inject_size) + 1,
                lim.max_msg_size,
                lim.max_msg_size + 1,
            ];
            for &acked in &ackeds {
                let ctx = ParseCtx::new(lim.clone(), acked);
                for queue in 0..6u16 {
                    for &op in &ops {
                        for &fl in &flag_sets {
                            for reserved in [(0u16, 0u16), (1, 0), (0, 0x8000)] {
                                for &payload in &payloads {
                                    let mut h = Request::new(Opcode::Send).to_header();
                                    h.opcode = op.into();
                                    h.flags = fl.into();
                                    h.reserved0 = reserved.0.into();
                                    h.reserved1 = reserved.1.into();
                                    h.ep = 3.into();
                                    h.cookie = 0x1234.into();
                                    h.tag = 0x55.into();
                                    h.peer = FabricAddr::new(9, 8, 7).to_wire();
                                    let mut fast = Req::blank(queue, 1);
                                    fast.payload = Segs::one(Seg {
                                        addr: 0x1000,
                                        len: payload as u32,
                                    });
                                    fast.payload.len = payload;
                                    let mut slow = fast.clone();
                                    // SAFETY: `h` is a whole header of our own.
                                    let vf = unsafe {
                                        take_header(
                                            (&h as *const ReqHeader).cast(),
                                            &ctx,
                                            ctx.plain(queue).0,
                                            &mut fast,
                                        )
                                    };
                                    let vs = parse_header(&h, lim, acked, &mut slow);
                                    assert_eq!(
                                        vf, vs,
                                        "op {op:#x} flags {fl:#x} queue {queue} acked {acked:#x} \
                                         payload {payload} reserved {reserved:?}"
                                    );
                                    if vs == Verdict::Req {
                                        assert_eq!(fast.req, slow.req);
                                    }
                                    checked[usize::from(vs == Verdict::Req)] += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(checked[0] > 0 && checked[1] > 0, "{checked:?}");
    }

    /// The opcodes the plain checks' tests try: every defined one and some that are not.
    fn plain_check_opcodes() -> Vec<u16> {
        (0..=0x500u16)
            .filter(|&r| Opcode::from_u16(r).is_some())
            .chain([0, 0x7777, 0x0100, 0x0180, 0x0185, 0x0403, 0x8181, 0x4181])
            .collect()
    }

    /// The acked feature sets the plain checks' tests try: everything they depend on, and
    /// everything but one of those at a time.
    fn plain_check_ackeds() -> Vec<u64> {
        use vfabric_proto::*;
        let features = [
            VIRTIO_F_VERSION_1,
            VIRTIO_FABRIC_F_MSG,
            VIRTIO_FABRIC_F_TAGGED,
            VIRTIO_FABRIC_F_RMA,
            VIRTIO_FABRIC_F_MQ,
            VIRTIO_FABRIC_F_REMOTE_CQ_DATA,
        ];
        let all = features.iter().fold(0, |a, f| a | bit(*f));
        std::iter::once(all)
            .chain(features.iter().map(|f| all & !bit(*f)))
            .collect()
    }

    /// The flag sets the plain checks' tests try: none, all, stray bits, each flag alone and
    /// each flag with `with` (the one flag the check under test lets through).
    fn plain_check_flag_sets(with: u64) -> Vec<u64> {
        let mut sets: Vec<u64> = vec![0, flags::ALL, 1 << 13, 1 << 63];
        sets.extend((0..13).map(|b| 1u64 << b));
        sets.extend((0..13).map(|b| with | (1u64 << b)));
        sets
    }

    /// `take_plain_recv`'s three compares against `parse_header` (the general parse of the
    /// same header, for a chain without payload): whatever it takes is a request the general
    /// parse accepts, the same request, on every queue it is used for, for every header, set of
    /// acked features and limits tried; it takes plain RECVs and TRECVs, and nothing on a
    /// device whose `max_sge` could refuse such a chain.
    #[test]
    fn plain_receive_check_accepts_only_what_parse_header_does() {
        use vfabric_proto::*;
        let (ops, ackeds) = (plain_check_opcodes(), plain_check_ackeds());
        let flag_sets = plain_check_flag_sets(flags::DIRECTED);
        let limits = [
            Limits::default(),
            Limits {
                num_queue_pairs: 1,
                ..Limits::default()
            },
            Limits {
                num_queue_pairs: 0,
                ..Limits::default()
            },
            Limits {
                max_sge: 3,
                ..Limits::default()
            },
            Limits {
                max_sge: 2,
                ..Limits::default()
            },
        ];
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap());
        let mut taken = [0usize; 2];
        for lim in &limits {
            for &acked in &ackeds {
                let ctx = ParseCtx::new(lim.clone(), acked);
                for queue in 0..8u16 {
                    if !ctx.plain(queue).1 {
                        continue;
                    }
                    for &op in &ops {
                        for &fl in &flag_sets {
                            for reserved in [(0u16, 0u16), (1, 0), (0, 0x8000)] {
                                let mut h = Request::new(Opcode::Recv).to_header();
                                h.opcode = op.into();
                                h.flags = fl.into();
                                h.reserved0 = reserved.0.into();
                                h.reserved1 = reserved.1.into();
                                h.ep = 3.into();
                                h.cookie = 0x1234.into();
                                h.tag = 0x55.into();
                                h.ignore = 0x0f.into();
                                h.data = 0x99.into();
                                h.peer = FabricAddr::new(9, 8, 7).to_wire();
                                let mut fast = Req::blank(queue, 1);
                                // SAFETY: `h` is a whole header of our own.
                                let took = unsafe {
                                    take_plain_recv(
                                        &mem,
                                        (&h as *const ReqHeader).cast(),
                                        &ctx,
                                        &mut fast,
                                    )
                                };
                                if !took {
                                    continue;
                                }
                                let mut slow = Req::blank(queue, 1);
                                let v = parse_header(&h, lim, acked, &mut slow);
                                let what = format!(
                                    "op {op:#x} flags {fl:#x} queue {queue} acked {acked:#x} \
                                     reserved {reserved:?} max_sge {}",
                                    lim.max_sge
                                );
                                assert_eq!(v, Verdict::Req, "{what}");
                                assert_eq!(fast.req, slow.req, "{what}");
                                assert!(lim.max_sge >= 3, "{what}");
                                assert!(fast.table().is_some_and(|t| std::ptr::eq(t, &*mem)));
                                taken[usize::from(op == Opcode::TRecv as u16)] += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(taken[0] > 0 && taken[1] > 0, "{taken:?}");
    }

    /// `take_plain_send` against `parse_send` (the parse of the TX ring's shape it stands in
    /// for): for every header, payload length and shape, set of acked features and limits
    /// tried, on every TX queue, a plain send it takes is a request `parse_send` accepts, the
    /// same request with the same streams and host addresses once filled; whatever it does not
    /// take gets `parse_send`'s verdict. It takes plain SENDs and TSENDs, with and without a
    /// payload of their own descriptor.
    #[test]
    fn plain_send_check_accepts_only_what_parse_send_does() {
        use vfabric_proto::*;
        let (ops, ackeds) = (plain_check_opcodes(), plain_check_ackeds());
        let flag_sets = plain_check_flag_sets(flags::INJECT);
        let limits = [
            Limits::default(),
            Limits {
                num_queue_pairs: 1,
                ..Limits::default()
            },
            Limits {
                max_msg_size: 8,
                inject_size: 4,
                ..Limits::default()
            },
            Limits {
                max_sge: 3,
                ..Limits::default()
            },
        ];
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap());
        let host = |a: u64, len: u32| HostSeg {
            seg: Seg { addr: a, len },
            host: mem.get_host_address(GuestAddress(a)).unwrap(),
        };
        // (header descriptor length, payload descriptor length, data descriptor length)
        let shapes = [
            (96u32, 8u32, 0u32),
            (96, 0, 0),
            (104, 0, 0),
            (96, 9, 0),
            (96, 0, 8),
        ];
        let mut taken = [0usize; 2];
        for lim in &limits {
            for &acked in &ackeds {
                let ctx = ParseCtx::new(lim.clone(), acked);
                for queue in 0..8u16 {
                    if !ctx.plain(queue).0 {
                        continue;
                    }
                    for &(hlen, plen, dlen) in &shapes {
                        let c = SendChain {
                            header: host(0, hlen),
                            payload: if plen > 0 {
                                host(0x100, plen)
                            } else {
                                HostSeg::NONE
                            },
                            data: if dlen > 0 {
                                host(0x200, dlen)
                            } else {
                                HostSeg::NONE
                            },
                            comp: host(0x300, COMPLETION_LEN as u32),
                        };
                        for &op in &ops {
                            for &fl in &flag_sets {
                                for reserved in [(0u16, 0u16), (1, 0), (0, 0x8000)] {
                                    let mut h = Request::new(Opcode::Send).to_header();
                                    h.opcode = op.into();
                                    h.flags = fl.into();
                                    h.reserved0 = reserved.0.into();
                                    h.reserved1 = reserved.1.into();
                                    h.ep = 3.into();
                                    h.cookie = 0x1234.into();
                                    h.tag = 0x55.into();
                                    h.data = 0x99.into();
                                    h.peer = FabricAddr::new(9, 8, 7).to_wire();
                                    mem.write_obj(h, GuestAddress(0)).unwrap();
                                    let mut fast = Req::blank(queue, 1);
                                    let vf = take_plain_send(&mem, &c, &ctx, &mut fast);
                                    let mut slow = Req::blank(queue, 1);
                                    let vs = parse_send(&mem, &c, &ctx, &mut slow);
                                    let what = format!(
                                        "op {op:#x} flags {fl:#x} queue {queue} acked {acked:#x} \
                                         reserved {reserved:?} shape {hlen}/{plen}/{dlen} \
                                         limits {lim:?}"
                                    );
                                    if let Verdict::Send(tx) = vf {
                                        assert_eq!(vs, Verdict::Req, "{what}");
                                        assert_eq!(dlen, 0, "{what}");
                                        tx.fill(&mut fast);
                                        taken[usize::from(op == Opcode::TSend as u16)] += 1;
                                    } else {
                                        assert_eq!(vf, vs, "{what}");
                                    }
                                    assert_eq!(fast, slow, "{what}");
                                    let agree = fast.resolved_agree(&mem);
                                    assert!(agree.0, "{what}");
                                    assert_eq!(agree, slow.resolved_agree(&mem), "{what}");
                                    for (a, b) in [
                                        (fast.payload_at(&mem, 1), slow.payload_at(&mem, 1)),
                                        (
                                            fast.comp_at(&mem).map(|p| p as *const u8),
                                            slow.comp_at(&mem).map(|p| p as *const u8),
                                        ),
                                    ] {
                                        assert_eq!(a, b, "{what}");
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(taken[0] > 0 && taken[1] > 0, "{taken:?}");
    }

    #[test]
    fn plain_lanes_are_the_queue_kinds_rule() {
        use crate::testutil::ALL_FEATURES;
        use vfabric_proto::{bit, VIRTIO_FABRIC_F_MQ};
        for (pairs, max_sge) in [(1u16, 3u32), (4, 3), (40, 4), (1000, 2), (3, 1)] {
            for acked in [ALL_FEATURES, ALL_FEATURES & !bit(VIRTIO_FABRIC_F_MQ)] {
                let limits = Limits {
                    num_queue_pairs: pairs,
                    max_sge,
                    ..Limits::default()
                };
                let ctx = ParseCtx::new(limits, acked);
                for q in 0..=2100u16 {
                    assert_eq!(ctx.plain(q), ctx.plain_by_kind(q), "queue {q}");
                }
                assert_eq!(ctx.plain(1), (max_sge >= 3, false));
                assert_eq!(ctx.plain(2), (false, true));
                assert_eq!(ctx.plain(0), (false, false));
            }
        }
    }

    #[test]
    fn guest_move_small_copies_overlapping_ranges_as_memmove_does() {
        for n in 0..=SMALL_MOVE {
            for shift in -9isize..=9 {
                let src_off = 20usize;
                let dst_off = (20 + shift) as usize;
                let mut buf: Vec<u8> = (0..128u8).map(|i| i.wrapping_mul(7) ^ 0x5a).collect();
                let mut want = buf.clone();
                want.copy_within(src_off..src_off + n, dst_off);
                let p = buf.as_mut_ptr();
                // SAFETY: both ranges lie within `buf` (20 + 9 + 64 < 128).
                unsafe { guest_move_small(p.add(dst_off), p.add(src_off), n) };
                assert_eq!(buf, want, "n {n} shift {shift}");
            }
        }
    }

    #[test]
    fn guest_copy_copies_exactly_n_bytes_at_odd_offsets() {
        for n in 0..=20 {
            for off in 0..3 {
                let src: Vec<u8> = (1..=32).collect();
                let mut dst = vec![0xeeu8; 32];
                // SAFETY: `n + off` <= 23 bytes of both 32-byte buffers, which do not overlap.
                unsafe { guest_copy(dst.as_mut_ptr().add(off), src.as_ptr().add(off), n) };
                for (i, b) in dst.iter().enumerate() {
                    let want = if (off..off + n).contains(&i) {
                        src[i]
                    } else {
                        0xee
                    };
                    assert_eq!(*b, want, "n {n}, offset {off}, byte {i}");
                }
            }
        }
    }

    #[test]
    fn split_at_boundaries() {
        let s = Segs::from_slice(&[
            Seg { addr: 0, len: 10 },
            Seg { addr: 100, len: 0 },
            Seg { addr: 200, len: 20 },
        ]);
        assert_eq!(s.len, 30);
        let (a, b) = s.split_at(15);
        assert_eq!(
            &a.segs[..],
            [Seg { addr: 0, len: 10 }, Seg { addr: 200, len: 5 }]
        );
        assert_eq!(&b.segs[..], [Seg { addr: 205, len: 15 }]);
        let (a, b) = s.split_at(10);
        assert_eq!(a.len, 10);
        assert_eq!(&b.segs[..], [Seg { addr: 200, len: 20 }]);
        let (a, b) = s.split_at(99);
        assert_eq!(a.len, 30);
        assert_eq!(b.len, 0);
    }

    #[test]
    fn tail_from_is_split_at_rest() {
        let one = Segs::from_slice(&[Seg { addr: 50, len: 100 }]);
        let many = Segs::from_slice(&[
            Seg { addr: 0, len: 10 },
            Seg { addr: 100, len: 0 },
            Seg { addr: 200, len: 20 },
        ]);
        for s in [&one, &many, &Segs::default()] {
            for at in [0, 1, 9, 10, 11, 29, 30, 31, 96, 99, 100, 101, u64::MAX] {
                assert_eq!(s.tail_from(at), s.split_at(at).1, "at {at} of {s:?}");
            }
        }
        assert_eq!(&one.tail_from(96).segs[..], [Seg { addr: 146, len: 4 }]);
    }

    #[test]
    fn copy_between_memories_and_faults() {
        let a = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let b = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let data: Vec<u8> = (0..200u8).collect();
        a.write_slice(&data, GuestAddress(0x100)).unwrap();
        let src = Segs::from_slice(&[
            Seg {
                addr: 0x100,
                len: 50,
            },
            Seg {
                addr: 0x132,
                len: 150,
            },
        ]);
        // Destination spans the boundary of two regions and three descriptors.
        let dst = Segs::from_slice(&[
            Seg {
                addr: 0xfc0,
                len: 100,
            },
            Seg {
                addr: 0x1800,
                len: 7,
            },
            Seg {
                addr: 0x1900,
                len: 200,
            },
        ]);
        copy_stream(&a, &src, &b, &dst, 200).unwrap();
        let mut out = vec![0u8; 200];
        dst.read_at(&b, 0, &mut out).unwrap();
        assert_eq!(out, data);
        let mut part = [0u8; 10];
        dst.read_at(&b, 101, &mut part).unwrap();
        assert_eq!(&part[..], &data[101..111]);

        let outside = Segs::from_slice(&[Seg {
            addr: 0x10_0000,
            len: 8,
        }]);
        assert_eq!(copy_stream(&a, &outside, &b, &dst, 8), Err(CopyFault::Src));
        assert_eq!(copy_stream(&a, &src, &b, &outside, 8), Err(CopyFault::Dst));
        assert_eq!(outside.write_at(&a, 0, &[1]), Err(MemFault));
        let wrap = Segs::from_slice(&[Seg {
            addr: u64::MAX - 2,
            len: 8,
        }]);
        assert_eq!(wrap.read_at(&a, 0, &mut [0u8; 8]), Err(MemFault));
    }
}
