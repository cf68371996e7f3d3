// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The shared memory region of a domain. Everything the device touches (rings, request
//! headers, completions, bounce buffers, [`SharedBuf`]s) is carved out of it by a thread-safe
//! first-fit allocator; a size-class cache on top recycles bounce buffers.
//!
//! How the device reaches the region depends on the transport, and is kept in one place: the
//! region's *segments*, each a range that is contiguous for the device, with its device
//! address. [`SharedMemory::device_addr`] is the one hook that turns a process address into a
//! device address; rings, requests and endpoints all go through it.
//!
//! * vhost-user: one memfd mapped `MAP_SHARED` and registered with the device with device
//!   (guest) address == our virtual address: one segment, identity translation.
//! * virtio-pci in a guest: locked (preferably huge) pages whose guest-physical addresses come
//!   from `/proc/self/pagemap`; each physically contiguous run is a segment. The allocator
//!   never lets an allocation cross a segment boundary, so every object the device reads or
//!   writes (a ring, a request slot area, a bounce buffer, a shared buffer) is physically
//!   contiguous and needs one descriptor.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use crate::{Error, Result};

/// Default size of a domain's shared region.
pub const DEFAULT_MEM_BYTES: usize = 64 << 20;
/// Environment variable overriding the region size, in MiB.
pub const MEM_ENV: &str = "VFABRIC_MEM_MB";
/// Smallest allocation unit (one cache line).
pub const ALLOC_GRANULE: usize = 64;

/// Largest region size accepted from the environment, in MiB (1 TiB).
pub const MAX_MEM_MB: usize = 1 << 20;

/// Region size from `VFABRIC_MEM_MB`, else [`DEFAULT_MEM_BYTES`] (also when the variable is
/// invalid: [`check_mem_env`] reports that, and `Domain::open` calls it).
pub fn default_mem_bytes() -> usize {
    env_mem_bytes(MEM_ENV)
        .ok()
        .flatten()
        .unwrap_or(DEFAULT_MEM_BYTES)
}

/// Reject an invalid `VFABRIC_MEM_MB`, naming it.
pub fn check_mem_env() -> Result<()> {
    env_mem_bytes(MEM_ENV).map(|_| ())
}

/// Region size in bytes from the environment variable `var` (a number of MiB), `None` if it
/// is unset.
pub fn env_mem_bytes(var: &str) -> Result<Option<usize>> {
    match std::env::var(var) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(Error::InvalidArgument(format!("{var} is not valid UTF-8")))
        }
        Ok(v) => parse_mem_mb(var, &v).map(Some),
    }
}

/// Parse `value` of `var`: a whole number of MiB, 1..=[`MAX_MEM_MB`]; returns bytes.
pub fn parse_mem_mb(var: &str, value: &str) -> Result<usize> {
    let bad = |why: &str| {
        Error::InvalidArgument(format!(
            "{var}={value:?}: {why} (a shared region size in MiB, 1..={MAX_MEM_MB})"
        ))
    };
    let mb: usize = value
        .trim()
        .parse()
        .map_err(|_| bad("not a whole number"))?;
    if mb == 0 {
        return Err(bad("zero"));
    }
    if mb > MAX_MEM_MB {
        return Err(bad("too large"));
    }
    Ok(mb << 20)
}

fn round_up(v: usize, align: usize) -> usize {
    debug_assert!(align.is_power_of_two());
    (v + align - 1) & !(align - 1)
}

/// First-fit free list over `[0, len)` with coalescing. Offsets and sizes are multiples of
/// [`ALLOC_GRANULE`].
#[derive(Debug)]
pub(crate) struct FreeList {
    /// start offset -> length of each free range; ranges never touch (they are merged) unless
    /// a segment boundary lies between them.
    free: BTreeMap<usize, usize>,
    /// Starts of segments after the first: free ranges are never merged across them, so no
    /// allocation spans two segments.
    boundaries: Vec<usize>,
    total: usize,
    in_use: usize,
}

impl FreeList {
    pub(crate) fn new(total: usize) -> Self {
        Self::with_segments(&[(0, total)])
    }

    /// A free list over consecutive segments `(offset, len)` (sorted, adjacent, the first at
    /// 0, offsets and lengths multiples of [`ALLOC_GRANULE`]); no allocation crosses a
    /// segment boundary.
    pub(crate) fn with_segments(segments: &[(usize, usize)]) -> Self {
        let mut free = BTreeMap::new();
        let mut boundaries = Vec::new();
        let mut total = 0;
        for &(start, len) in segments {
            debug_assert_eq!(start, total, "segments must be adjacent");
            let len = len & !(ALLOC_GRANULE - 1);
            if len == 0 {
                continue;
            }
            if start > 0 {
                boundaries.push(start);
            }
            free.insert(start, len);
            total = start + len;
        }
        Self {
            free,
            boundaries,
            total,
            in_use: 0,
        }
    }

    fn is_boundary(&self, offset: usize) -> bool {
        self.boundaries.binary_search(&offset).is_ok()
    }

    /// Allocate `size` bytes aligned to `align` (a power of two). Returns the offset and the
    /// rounded size actually reserved.
    pub(crate) fn alloc(&mut self, size: usize, align: usize) -> Option<(usize, usize)> {
        let align = align.max(ALLOC_GRANULE);
        if !align.is_power_of_two() || size > self.total {
            return None;
        }
        let size = round_up(size.max(1), ALLOC_GRANULE);
        let (start, len, at) = self.free.iter().find_map(|(&start, &len)| {
            let at = round_up(start, align);
            (at + size <= start + len).then_some((start, len, at))
        })?;
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - start);
        }
        let end = at + size;
        if end < start + len {
            self.free.insert(end, start + len - end);
        }
        self.in_use += size;
        Some((at, size))
    }

    /// Return a range obtained from [`FreeList::alloc`].
    pub(crate) fn free(&mut self, offset: usize, size: usize) {
        let mut start = offset;
        let mut len = size;
        debug_assert!(offset + size <= self.total);
        if let Some((&prev_start, &prev_len)) = self.free.range(..offset).next_back() {
            debug_assert!(
                prev_start + prev_len <= offset,
                "double free at {offset:#x}"
            );
            if prev_start + prev_len == offset && !self.is_boundary(offset) {
                self.free.remove(&prev_start);
                start = prev_start;
                len += prev_len;
            }
        }
        if let Some(&next_len) = self.free.get(&(offset + size)) {
            if !self.is_boundary(offset + size) {
                self.free.remove(&(offset + size));
                len += next_len;
            }
        }
        self.free.insert(start, len);
        self.in_use -= size;
    }

    pub(crate) fn in_use(&self) -> usize {
        self.in_use
    }

    #[cfg(test)]
    fn ranges(&self) -> Vec<(usize, usize)> {
        self.free.iter().map(|(a, b)| (*a, *b)).collect()
    }
}

/// Bytes a bounce buffer for `len` bytes occupies (its size class, or `len` rounded to the
/// allocation granule beyond the largest class).
fn bounce_size(len: usize) -> usize {
    let size = len.max(1).next_power_of_two().max(1 << POOL_MIN_SHIFT);
    if size > 1 << POOL_MAX_SHIFT {
        round_up(len, ALLOC_GRANULE)
    } else {
        size
    }
}

/// Bounce buffers are recycled per power-of-two size class from 256 B to 4 MiB.
const POOL_MIN_SHIFT: u32 = 8;
const POOL_MAX_SHIFT: u32 = 22;
const POOL_CLASSES: usize = (POOL_MAX_SHIFT - POOL_MIN_SHIFT + 1) as usize;
/// Bytes of idle buffers a class keeps before giving them back to the allocator.
const POOL_CLASS_CACHE_BYTES: usize = 8 << 20;

/// A range of the region that is contiguous for the device: region offset, length, and the
/// device address of its first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DmaSegment {
    pub offset: usize,
    pub len: usize,
    pub device_addr: u64,
}

/// The domain's region: mapped into this process and reachable by the device.
pub(crate) struct SharedMemory {
    /// The memfd shared with a vhost-user device (`None` for guest DMA memory).
    file: Option<File>,
    base: NonNull<u8>,
    len: usize,
    /// Device-contiguous pieces, sorted by offset, covering `[0, len)`.
    segments: Box<[DmaSegment]>,
    /// Device address == process address (vhost-user): translation is a bounds check.
    identity: bool,
    allocator: Mutex<FreeList>,
    pool: [Mutex<Vec<usize>>; POOL_CLASSES],
    /// Bytes of bounce buffers lent to operations in flight: they come back, so a shortage
    /// they cause is transient.
    bounce_lent: AtomicUsize,
    /// Whether the "region too small" warning was logged (once per region).
    warned_too_small: AtomicBool,
    /// The requests of the domain that may borrow [`SharedBuf`]s of this region (set once the
    /// domain exists).
    borrowers: OnceLock<Weak<dyn Borrowers>>,
}

/// Where requests in flight may borrow a [`SharedBuf`]'s allocation without holding a
/// reference to it (the domain's plain requests, see `crate::request::BufRef`).
pub(crate) trait Borrowers: Send + Sync {
    /// Does a request in flight borrow `buf`?
    fn borrow(&self, buf: &Allocation) -> bool;
    /// Every request in flight that borrows `buf` takes a reference of its own.
    fn own_borrowed(&self, buf: &Arc<Allocation>);
}

// SAFETY: `base` points to a MAP_SHARED mapping owned by this object for its whole life; the
// allocator hands out disjoint ranges and is protected by a mutex, so the raw pointer may be
// shared and sent between threads.
unsafe impl Send for SharedMemory {}
// SAFETY: see `Send`; no method gives out references that alias mutably.
unsafe impl Sync for SharedMemory {}

impl std::fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMemory")
            .field("base", &self.base)
            .field("len", &self.len)
            .finish()
    }
}

impl SharedMemory {
    /// Create a memfd of `len` bytes (rounded up to the page size) and map it shared.
    pub fn new(name: &str, len: usize) -> Result<Arc<Self>> {
        let len = round_up(len.max(1 << 16), 4096);
        let cname = CString::new(name).map_err(|_| Error::InvalidArgument("memfd name".into()))?;
        // SAFETY: `cname` is a valid NUL-terminated string; memfd_create has no other inputs.
        let fd = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        // The device refuses memory that could shrink under its mapping (a truncated memfd
        // would fault the daemon); seal the size for good.
        // SAFETY: fcntl(F_ADD_SEALS) on the memfd we own; it reads no memory of ours.
        let sealed = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
        if sealed < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: mapping a fresh, correctly sized memfd; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error().into());
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(Error::Io(io::Error::other("mmap")))?;
        tracing::debug!(len, base = ?base, "shared memory mapped");
        Ok(Arc::new(Self {
            file: Some(file),
            base,
            len,
            segments: Box::new([DmaSegment {
                offset: 0,
                len,
                device_addr: base.as_ptr() as u64,
            }]),
            identity: true,
            allocator: Mutex::new(FreeList::new(len)),
            pool: std::array::from_fn(|_| Mutex::new(Vec::new())),
            bounce_lent: AtomicUsize::new(0),
            warned_too_small: AtomicBool::new(false),
            borrowers: OnceLock::new(),
        }))
    }

    /// Take over a mapping of `len` bytes at `base` whose device addresses are given by
    /// `segments` (sorted, adjacent, covering `[0, len)`, page-aligned); it is unmapped when
    /// the region is dropped.
    ///
    /// # Safety
    /// `base..base+len` must be a mapping made with `mmap` that nothing else uses or unmaps,
    /// and stays resident at the given device addresses (locked, not migrated).
    pub unsafe fn from_dma_mapping(
        base: NonNull<u8>,
        len: usize,
        segments: Vec<DmaSegment>,
    ) -> Result<Arc<Self>> {
        let mut at = 0;
        for s in &segments {
            if s.offset != at || s.len == 0 || s.len % ALLOC_GRANULE != 0 {
                return Err(Error::InvalidArgument(format!(
                    "DMA segments must be adjacent granule multiples (at {at:#x}: {s:?})"
                )));
            }
            at += s.len;
        }
        if at != len {
            return Err(Error::InvalidArgument(format!(
                "DMA segments cover {at:#x} of {len:#x} bytes"
            )));
        }
        let ranges: Vec<(usize, usize)> = segments.iter().map(|s| (s.offset, s.len)).collect();
        Ok(Arc::new(Self {
            file: None,
            base,
            len,
            segments: segments.into_boxed_slice(),
            identity: false,
            allocator: Mutex::new(FreeList::with_segments(&ranges)),
            pool: std::array::from_fn(|_| Mutex::new(Vec::new())),
            bounce_lent: AtomicUsize::new(0),
            warned_too_small: AtomicBool::new(false),
            borrowers: OnceLock::new(),
        }))
    }

    /// The memfd behind the region (vhost-user), `None` for guest DMA memory.
    pub fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    /// Device address of `[ptr, ptr+len)` if it lies inside the region and is contiguous for
    /// the device (inside one segment); `None` otherwise. The one translation hook from
    /// process to device addresses.
    #[inline]
    pub fn device_addr(&self, ptr: *const u8, len: usize) -> Option<u64> {
        let offset = (ptr as usize).checked_sub(self.base.as_ptr() as usize)?;
        if offset.checked_add(len)? > self.len {
            return None;
        }
        if self.identity {
            return Some(ptr as u64);
        }
        let s = self.segment_of(offset);
        (offset + len <= s.offset + s.len).then(|| s.device_addr + (offset - s.offset) as u64)
    }

    /// Device address of the byte at `offset` (< len).
    #[inline]
    fn device_addr_of_offset(&self, offset: usize) -> u64 {
        if self.identity {
            return self.base.as_ptr() as u64 + offset as u64;
        }
        let s = self.segment_of(offset);
        s.device_addr + (offset - s.offset) as u64
    }

    fn segment_of(&self, offset: usize) -> &DmaSegment {
        let i = self
            .segments
            .partition_point(|s| s.offset <= offset)
            .saturating_sub(1);
        &self.segments[i]
    }

    /// Length of the longest device-contiguous piece: the largest object the region can hold.
    pub fn largest_segment(&self) -> usize {
        self.segments.iter().map(|s| s.len).max().unwrap_or(0)
    }

    /// `[ptr, ptr+len)` as device ranges (address, length), split where the region stops being
    /// contiguous for the device; `None` if the range is not inside the region.
    pub fn device_ranges(&self, ptr: *const u8, len: usize) -> Option<Vec<(u64, usize)>> {
        let mut offset = (ptr as usize).checked_sub(self.base.as_ptr() as usize)?;
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        let mut out = Vec::new();
        while offset < end {
            let s = self.segment_of(offset);
            let n = (s.offset + s.len).min(end) - offset;
            let dev = s.device_addr + (offset - s.offset) as u64;
            match out.last_mut() {
                Some((a, l)) if *a + *l as u64 == dev => *l += n,
                _ => out.push((dev, n)),
            }
            offset += n;
        }
        Some(out)
    }
    #[allow(clippy::len_without_is_empty)] // a region is never empty
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }
    /// Process address of the region start.
    pub fn guest_base(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    /// Does `[ptr, ptr+len)` lie inside the region?
    pub fn contains(&self, ptr: *const u8, len: usize) -> bool {
        let start = self.base.as_ptr() as usize;
        let p = ptr as usize;
        p >= start
            && p.checked_add(len)
                .is_some_and(|end| end <= start + self.len)
    }

    /// Bytes currently allocated (bounce cache included).
    pub fn in_use(&self) -> usize {
        self.allocator.lock().unwrap().in_use()
    }

    /// Name the requests that may borrow this region's [`SharedBuf`]s (the domain's, once).
    pub fn set_borrowers(&self, borrowers: Weak<dyn Borrowers>) {
        let _ = self.borrowers.set(borrowers);
    }

    fn borrowers(&self) -> Option<Arc<dyn Borrowers>> {
        self.borrowers.get()?.upgrade()
    }

    /// Allocate `len` bytes aligned to `align` from the region. When the region is full,
    /// idle bounce buffers are given back and the allocation retried once.
    pub fn alloc(self: &Arc<Self>, len: usize, align: usize) -> Result<Allocation> {
        let mut got = self.allocator.lock().unwrap().alloc(len, align);
        if got.is_none() && self.flush_bounce_cache() > 0 {
            got = self.allocator.lock().unwrap().alloc(len, align);
        }
        let Some((offset, cap)) = got else {
            return Err(Error::OutOfMemory { requested: len });
        };
        Ok(Allocation {
            mem: self.clone(),
            offset,
            cap,
            class: None,
            lent: false,
        })
    }

    /// Allocate a bounce buffer of at least `len` bytes. A shortage that operations in flight
    /// will relieve (their bounce buffers come back) is [`Error::Again`]; one that cannot end
    /// that way — the buffer is larger than the region could hold even with every lent bounce
    /// buffer returned — is [`Error::OutOfMemory`], logged once with the setting to raise.
    pub fn alloc_bounce(self: &Arc<Self>, len: usize) -> Result<Allocation> {
        match self.alloc_bounce_once(len) {
            Ok(mut a) => {
                a.lent = true;
                self.bounce_lent.fetch_add(a.cap, Ordering::Relaxed);
                Ok(a)
            }
            Err(_) => {
                let need = bounce_size(len);
                let (total, in_use) = {
                    let a = self.allocator.lock().unwrap();
                    (a.total, a.in_use)
                };
                let reclaimable = self.bounce_lent.load(Ordering::Relaxed);
                let free_at_best = total.saturating_sub(in_use.saturating_sub(reclaimable));
                if need <= free_at_best {
                    return Err(Error::Again);
                }
                if !self.warned_too_small.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "a {len}-byte transfer needs a {need}-byte bounce buffer but the shared \
                         region ({} MiB, {} bytes free at best) can never hold it: raise \
                         {MEM_ENV} (provider: FI_VFABRIC_MEM_MB) or use buffers inside the region",
                        self.len >> 20,
                        free_at_best
                    );
                }
                Err(Error::OutOfMemory { requested: len })
            }
        }
    }

    fn alloc_bounce_once(self: &Arc<Self>, len: usize) -> Result<Allocation> {
        let shift = len
            .max(1)
            .next_power_of_two()
            .trailing_zeros()
            .max(POOL_MIN_SHIFT);
        if shift > POOL_MAX_SHIFT {
            return self.alloc(len, 4096);
        }
        let class = (shift - POOL_MIN_SHIFT) as usize;
        if let Some(offset) = self.pool[class].lock().unwrap().pop() {
            return Ok(Allocation {
                mem: self.clone(),
                offset,
                cap: 1 << shift,
                class: Some(class as u8),
                lent: false,
            });
        }
        let align = if shift >= 12 { 4096 } else { ALLOC_GRANULE };
        let mut a = self.alloc(1 << shift, align)?;
        a.class = Some(class as u8);
        Ok(a)
    }

    /// Return every idle bounce buffer to the allocator. Returns how many were released.
    pub fn flush_bounce_cache(&self) -> usize {
        let mut n = 0;
        for (class, cache) in self.pool.iter().enumerate() {
            let idle: Vec<usize> = std::mem::take(&mut *cache.lock().unwrap());
            let size = 1usize << (class as u32 + POOL_MIN_SHIFT);
            let mut a = self.allocator.lock().unwrap();
            for off in idle {
                a.free(off, size);
                n += 1;
            }
        }
        n
    }

    fn release(&self, offset: usize, cap: usize, class: Option<u8>) {
        if let Some(class) = class {
            let mut cache = self.pool[class as usize].lock().unwrap();
            if (cache.len() + 1) * cap <= POOL_CLASS_CACHE_BYTES.max(4 * cap) {
                cache.push(offset);
                return;
            }
        }
        self.allocator.lock().unwrap().free(offset, cap);
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` describe the mapping created in `new`; every `Allocation` holds an
        // `Arc` to us, so nothing refers into the mapping any more.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// An owned range of the shared region; returned to the allocator (or bounce cache) on drop.
pub(crate) struct Allocation {
    mem: Arc<SharedMemory>,
    offset: usize,
    cap: usize,
    class: Option<u8>,
    /// A bounce buffer counted in `SharedMemory::bounce_lent`.
    lent: bool,
}

impl std::fmt::Debug for Allocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocation")
            .field("offset", &self.offset)
            .field("cap", &self.cap)
            .finish()
    }
}

impl Allocation {
    pub fn ptr(&self) -> *mut u8 {
        // SAFETY: offset < mem.len by construction of the allocator.
        unsafe { self.mem.base().add(self.offset) }
    }
    /// Process address of the allocation.
    pub fn addr(&self) -> u64 {
        self.ptr() as u64
    }
    /// Device address of the allocation (it is contiguous for the device: allocations never
    /// cross a segment boundary).
    #[inline]
    pub fn device_addr(&self) -> u64 {
        self.mem.device_addr_of_offset(self.offset)
    }
    /// Usable bytes (the request rounded up).
    pub fn capacity(&self) -> usize {
        self.cap
    }
    pub fn memory(&self) -> &Arc<SharedMemory> {
        &self.mem
    }
    /// Zero the whole allocation.
    pub fn zero(&self) {
        // SAFETY: the allocation exclusively owns `cap` bytes at `ptr()`.
        unsafe { std::ptr::write_bytes(self.ptr(), 0, self.cap) }
    }
    /// Copy `src` into the allocation at `offset`.
    pub fn write_at(&self, offset: usize, src: &[u8]) {
        assert!(offset + src.len() <= self.cap, "write past allocation");
        // SAFETY: bounds checked above; `src` cannot overlap memory we exclusively own unless
        // the caller derived it from this allocation, in which case copy semantics still hold
        // for the non-overlapping call sites we use.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr().add(offset), src.len()) }
    }
    /// Copy `dst.len()` bytes out of the allocation from `offset`.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) {
        assert!(offset + dst.len() <= self.cap, "read past allocation");
        // SAFETY: bounds checked above.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr().add(offset), dst.as_mut_ptr(), dst.len())
        }
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        if self.lent {
            self.mem.bounce_lent.fetch_sub(self.cap, Ordering::Relaxed);
        }
        self.mem.release(self.offset, self.cap, self.class);
    }
}

/// A buffer inside the domain's shared region. Operations on it are zero-copy in the driver:
/// the device reads or writes it directly. While an operation on the buffer is in flight, or
/// while it is registered for remote access, the device may write it at any time (as in
/// libfabric), so Rust references to its bytes are handed out only by the checked
/// [`SharedBuf::get`]/[`SharedBuf::get_mut`] (which see every in-flight operation and
/// registration, since each holds a clone of the allocation) or by the `unsafe`
/// [`SharedBuf::as_slice`]/[`SharedBuf::as_mut_slice`], whose caller vouches for it.
///
/// ```compile_fail
/// fn peek(buf: &vfabric::SharedBuf) -> u8 {
///     buf.as_slice()[0] // the device may be writing it: only `unsafe` code may say it is not
/// }
/// ```
pub struct SharedBuf {
    alloc: Arc<Allocation>,
    len: usize,
    /// A request may borrow the allocation (set by [`SharedBuf::lend`]; cleared by a look that
    /// finds none does).
    lent: AtomicBool,
}

impl std::fmt::Debug for SharedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBuf")
            .field("addr", &format_args!("{:#x}", self.alloc.addr()))
            .field("len", &self.len)
            .finish()
    }
}

impl SharedBuf {
    pub(crate) fn new(mem: &Arc<SharedMemory>, len: usize) -> Result<Self> {
        let align = if len >= 4096 { 4096 } else { ALLOC_GRANULE };
        let alloc = mem.alloc(len, align)?;
        alloc.zero();
        Ok(Self {
            alloc: Arc::new(alloc),
            len,
            lent: AtomicBool::new(false),
        })
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_ptr(&self) -> *const u8 {
        self.alloc.ptr()
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.alloc.ptr()
    }
    /// Process (virtual) address of the first byte: the address to use for the buffer in
    /// RMA with virtual addressing.
    pub fn addr(&self) -> u64 {
        self.alloc.addr()
    }
    /// Device address of the first byte (the buffer is contiguous for the device).
    #[inline]
    pub(crate) fn device_addr(&self) -> u64 {
        self.alloc.device_addr()
    }
    /// The buffer's bytes, if no operation on it is in flight and it is not registered
    /// (nothing but this handle refers to the memory, and `&mut self` keeps new operations
    /// from being posted while the borrow lives).
    pub fn get(&mut self) -> Option<&[u8]> {
        self.get_mut().map(|b| &*b)
    }

    /// The buffer's bytes for writing, under the same condition as [`SharedBuf::get`].
    pub fn get_mut(&mut self) -> Option<&mut [u8]> {
        Arc::get_mut(&mut self.alloc)?;
        if *self.lent.get_mut() {
            if self
                .alloc
                .mem
                .borrowers()
                .is_some_and(|b| b.borrow(&self.alloc))
            {
                return None;
            }
            // None borrows it now, and `&mut self` excludes a new borrower.
            *self.lent.get_mut() = false;
        }
        let alloc = Arc::get_mut(&mut self.alloc)?;
        // SAFETY: the allocation owns at least `len` bytes, no clone of it exists and no
        // request borrows it: no operation the device may serve and no registration refers to
        // it, and `&mut self` excludes posting one until the borrow ends.
        Some(unsafe { std::slice::from_raw_parts_mut(alloc.ptr(), self.len) })
    }

    /// The buffer's bytes.
    ///
    /// # Safety
    /// While the slice lives, the device must not write the buffer: no receive, RMA read or
    /// fetching atomic into it may be in flight, and it must not be registered for remote
    /// write (the device writes such memory whenever a peer asks). Use [`SharedBuf::get`] for
    /// a checked borrow.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the allocation owns at least `len` bytes; the caller excludes device writes.
        unsafe { std::slice::from_raw_parts(self.alloc.ptr(), self.len) }
    }

    /// The buffer's bytes for writing.
    ///
    /// # Safety
    /// While the slice lives, the device must not access the buffer: no operation on it may
    /// be in flight and it must not be registered for remote access. Use
    /// [`SharedBuf::get_mut`] for a checked borrow.
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` excludes other Rust references to the bytes.
        unsafe { std::slice::from_raw_parts_mut(self.alloc.ptr(), self.len) }
    }
    /// Keeps the memory alive while the device uses it. A request may turn it into a borrow
    /// (see [`SharedBuf::lend`]), so the buffer counts it as lent.
    #[inline]
    pub(crate) fn keepalive(&self) -> Arc<Allocation> {
        self.lend().clone()
    }

    /// The allocation, for a request to borrow while the device uses it, without a reference
    /// count: the buffer remembers that it lent it (a store, the first time), and before it
    /// goes ([`Drop`]) the requests still borrowing it take a reference of their own.
    #[inline(always)]
    pub(crate) fn lend(&self) -> &Arc<Allocation> {
        if !self.lent.load(Ordering::Relaxed) {
            self.lent.store(true, Ordering::Relaxed);
        }
        &self.alloc
    }
    #[inline]
    pub(crate) fn memory(&self) -> &Arc<SharedMemory> {
        self.alloc.memory()
    }
}

impl Drop for SharedBuf {
    fn drop(&mut self) {
        if *self.lent.get_mut() {
            if let Some(b) = self.alloc.mem.borrowers() {
                b.own_borrowed(&self.alloc);
            }
        }
    }
}

/// Memory standing in for DMA memory in tests: a fresh private mapping of `len` bytes, cut into
/// `segs` with made-up device addresses, owned (and unmapped) by the region.
#[cfg(test)]
pub(crate) fn test_dma_memory(len: usize, segs: Vec<DmaSegment>) -> Arc<SharedMemory> {
    // SAFETY: a fresh anonymous mapping, handed to the region which unmaps it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let base = std::ptr::NonNull::new(p.cast::<u8>()).unwrap();
    // SAFETY: the mapping above, owned by nothing else.
    unsafe { SharedMemory::from_dma_mapping(base, len, segs) }.unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn mem_mb_values_are_checked_and_named() {
        assert_eq!(parse_mem_mb("VFABRIC_MEM_MB", "64").unwrap(), 64 << 20);
        assert_eq!(parse_mem_mb("VFABRIC_MEM_MB", " 1 ").unwrap(), 1 << 20);
        let huge = ((1u128 << 44) + 1).to_string();
        for bad in ["0", "abc", "-5", "", "1.5", huge.as_str()] {
            let e = parse_mem_mb("VFABRIC_MEM_MB", bad).unwrap_err().to_string();
            assert!(e.contains("VFABRIC_MEM_MB"), "{bad:?}: {e}");
        }
        // 2^44+1 MiB used to wrap to 1 MiB.
        assert!(parse_mem_mb("X", &((1usize << 44) + 1).to_string()).is_err());
        assert!(parse_mem_mb("X", &MAX_MEM_MB.to_string()).is_ok());
    }

    #[test]
    fn freelist_alloc_free_coalesce() {
        let mut fl = FreeList::new(4096);
        let (a, sa) = fl.alloc(100, 64).unwrap();
        let (b, sb) = fl.alloc(1000, 512).unwrap();
        let (c, sc) = fl.alloc(64, 64).unwrap();
        assert_eq!(a, 0);
        assert_eq!(sa, 128);
        assert_eq!(b % 512, 0);
        assert!(c >= 128);
        fl.free(b, sb);
        fl.free(a, sa);
        fl.free(c, sc);
        assert_eq!(fl.ranges(), vec![(0, 4096)]);
        assert_eq!(fl.in_use(), 0);
        assert!(fl.alloc(8192, 64).is_none());
    }

    #[test]
    fn freelist_never_crosses_segments() {
        let segs = [(0, 4096), (4096, 8192), (12288, 4096)];
        let mut fl = FreeList::with_segments(&segs);
        // Larger than every segment: no room, although 16 KiB are free in total.
        assert!(fl.alloc(8192 + 64, 64).is_none());
        let (a, sa) = fl.alloc(6000, 64).unwrap();
        assert_eq!(a, 4096, "only the middle segment holds 6000 bytes");
        let (b, sb) = fl.alloc(4096, 4096).unwrap();
        assert!(b == 0 || b == 12288);
        fl.free(a, sa);
        fl.free(b, sb);
        // Freed ranges coalesce within a segment, never across its boundaries.
        assert_eq!(fl.ranges(), segs.to_vec());
        assert_eq!(fl.in_use(), 0);
    }

    #[test]
    fn dma_segments_translate_per_segment() {
        // A private mapping standing in for DMA memory, with made-up device addresses.
        let len = 4 * 4096;
        let segs = vec![
            DmaSegment {
                offset: 0,
                len: 8192,
                device_addr: 0x10_0000,
            },
            DmaSegment {
                offset: 8192,
                len: 8192,
                device_addr: 0x5000,
            },
        ];
        let mem = test_dma_memory(len, segs);
        let b = mem.base();
        // SAFETY: offsets below are inside the mapping.
        let at = |o: usize| unsafe { b.add(o) } as *const u8;
        assert_eq!(mem.device_addr(at(100), 10), Some(0x10_0000 + 100));
        assert_eq!(mem.device_addr(at(8192 + 8), 8), Some(0x5008));
        // Across the boundary: not one device range; split by device_ranges.
        assert_eq!(mem.device_addr(at(8000), 400), None);
        assert_eq!(
            mem.device_ranges(at(8000), 400).unwrap(),
            vec![(0x10_0000 + 8000, 192), (0x5000, 208)]
        );
        assert_eq!(mem.device_addr(at(0), len + 1), None);
        assert_eq!(mem.device_addr(std::ptr::null(), 1), None);
        assert!(mem.file().is_none());
        // Allocations stay inside one segment and carry its device address.
        let a = mem.alloc(6000, 64).unwrap();
        let c = mem.alloc(6000, 64).unwrap();
        for x in [&a, &c] {
            assert_eq!(
                mem.device_ranges(x.ptr(), x.capacity()).unwrap(),
                vec![(x.device_addr(), x.capacity())]
            );
        }
        assert!(mem.alloc(8192 + 64, 64).is_err());
        // Segments must tile the mapping.
        let bad = vec![DmaSegment {
            offset: 0,
            len: 4096,
            device_addr: 0,
        }];
        let base = NonNull::new(mem.base()).unwrap();
        // SAFETY: rejected before taking ownership (the Err path never unmaps).
        assert!(unsafe { SharedMemory::from_dma_mapping(base, len, bad) }.is_err());
    }

    #[test]
    fn region_is_shared_and_contains() {
        let mem = SharedMemory::new("vfabric-test", 1 << 20).unwrap();
        let a = mem.alloc(4096, 4096).unwrap();
        assert!(mem.contains(a.ptr(), 4096));
        assert!(!mem.contains(a.ptr(), mem.len() + 1));
        a.write_at(10, b"hello");
        let mut out = [0u8; 5];
        a.read_at(10, &mut out);
        assert_eq!(&out, b"hello");
        // The memfd really is shared: a second mapping sees the bytes.
        // SAFETY: mapping the same memfd read-only at a new address, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mem.len(),
                libc::PROT_READ,
                libc::MAP_SHARED,
                mem.file().unwrap().as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let off = a.ptr() as usize - mem.base() as usize;
        // SAFETY: `p` maps the whole memfd; `off + 15 < len`.
        let seen = unsafe { std::slice::from_raw_parts((p as *const u8).add(off + 10), 5) };
        assert_eq!(seen, b"hello");
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(p, mem.len()) };
    }

    #[test]
    fn region_size_is_sealed() {
        // vfabricd refuses guest memory whose file could shrink under its mapping.
        let mem = SharedMemory::new("vfabric-test", 1 << 20).unwrap();
        // SAFETY: fcntl(F_GET_SEALS) on the memfd the region owns.
        let seals = unsafe { libc::fcntl(mem.file().unwrap().as_raw_fd(), libc::F_GET_SEALS) };
        assert!(seals >= 0);
        assert_ne!(seals & libc::F_SEAL_SHRINK, 0);
        assert_ne!(seals & libc::F_SEAL_GROW, 0);
        assert!(
            mem.file().unwrap().set_len(4096).is_err(),
            "shrinking must fail"
        );
    }

    #[test]
    fn bounce_pool_recycles() {
        let mem = SharedMemory::new("vfabric-test", 2 << 20).unwrap();
        let a = mem.alloc_bounce(3000).unwrap();
        assert_eq!(a.capacity(), 4096);
        let addr = a.addr();
        drop(a);
        let b = mem.alloc_bounce(4000).unwrap();
        assert_eq!(b.addr(), addr, "bounce buffer of the same class is reused");
        drop(b);
        // The region is too small for a 1 MiB class buffer unless the cache gives back.
        let big = mem.alloc_bounce(600 << 10).unwrap();
        assert_eq!(big.capacity(), 1 << 20);
        drop(big);
        let whole = mem.alloc(mem.len() - 4096, 64).unwrap();
        drop(whole);
    }

    #[test]
    fn exhaustion_is_reported() {
        let mem = SharedMemory::new("vfabric-test", 1 << 16).unwrap();
        let _a = mem.alloc(1 << 15, 64).unwrap();
        assert!(matches!(
            mem.alloc(1 << 16, 64),
            Err(Error::OutOfMemory { .. })
        ));
    }

    #[test]
    fn allocator_is_thread_safe() {
        let mem = SharedMemory::new("vfabric-test", 8 << 20).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mem = mem.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        let a = mem.alloc_bounce(64 + (i * 37 + t * 11) % 20000).unwrap();
                        a.write_at(0, &[t as u8; 64]);
                        let mut b = [0u8; 64];
                        a.read_at(0, &mut b);
                        assert!(b.iter().all(|x| *x == t as u8));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    proptest! {
        /// Random alloc/free sequences never hand out overlapping ranges and always coalesce
        /// back to one free range.
        #[test]
        fn freelist_never_overlaps(ops in proptest::collection::vec((1usize..5000, 0u32..4, any::<bool>()), 1..200)) {
            let total = 1 << 18;
            let mut fl = FreeList::new(total);
            let mut live: Vec<(usize, usize)> = Vec::new();
            for (size, align_shift, free_one) in ops {
                if free_one && !live.is_empty() {
                    let (o, s) = live.swap_remove(size % live.len());
                    fl.free(o, s);
                } else if let Some((o, s)) = fl.alloc(size, 64 << align_shift) {
                    prop_assert_eq!(o % (64 << align_shift), 0);
                    prop_assert!(s >= size && o + s <= total);
                    for &(lo, ls) in &live {
                        prop_assert!(o + s <= lo || lo + ls <= o, "overlap");
                    }
                    live.push((o, s));
                }
            }
            for (o, s) in live.drain(..) {
                fl.free(o, s);
            }
            prop_assert_eq!(fl.ranges(), vec![(0, total)]);
        }
    }
}
