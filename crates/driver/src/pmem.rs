// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Persistent memory regions (spec §6.17): a range of a file, mapped `MAP_SHARED` in this
//! process and registered with `mr_flags::PMEM`.
//!
//! The region is process memory (the device writes into this mapping by cross-memory attach);
//! MR_REG also names the file's descriptor and offset, and the device takes its own handle of
//! the file (`pidfd_getfd`) to persist ranges with libpmem2. The device checks that the range
//! really is a shared mapping of that file at that offset.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

use crate::rma::{MemoryRegion, MrAttr};
use crate::{Domain, Error, Result};

/// The file behind a persistent registration: a descriptor of this process (open while the
/// MR_REG is in flight; the device keeps its own duplicate) and the file offset of the
/// region's first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmemBacking {
    pub fd: RawFd,
    pub offset: u64,
}

/// A registered persistent region and the mapping it lives in ([`Domain::register_pmem`]).
/// Dropping it deregisters the region, then unmaps the file.
pub struct PmemRegion {
    /// Dropped first, in `drop`: the device stops touching the mapping before it goes away.
    mr: std::mem::ManuallyDrop<MemoryRegion>,
    map: *mut libc::c_void,
    map_len: usize,
    /// The region's first byte inside `map`.
    ptr: *mut u8,
    len: usize,
    _file: File,
}

// SAFETY: the mapping is owned by the region and accessed only through `&self` methods that
// copy bytes (the device writes concurrently, like any RMA target memory).
unsafe impl Send for PmemRegion {}
// SAFETY: as above.
unsafe impl Sync for PmemRegion {}

impl std::fmt::Debug for PmemRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PmemRegion")
            .field("mr", &self.mr)
            .field("len", &self.len)
            .finish()
    }
}

impl PmemRegion {
    pub fn mr(&self) -> &MemoryRegion {
        &self.mr
    }
    pub fn key(&self) -> u64 {
        self.mr.key()
    }
    /// Remote address of the region's first byte.
    pub fn base(&self) -> u64 {
        self.mr.base()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The region's first byte in this process.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Copy `buf.len()` bytes at `off` out of the mapping.
    pub fn read(&self, off: usize, buf: &mut [u8]) -> Result<()> {
        self.check(off, buf.len())?;
        // SAFETY: the range is inside the mapping (checked); bytes are copied, never
        // referenced, so concurrent device writes only make the copy stale.
        unsafe { std::ptr::copy(self.ptr.add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Store `data` at `off` (a local store: durable only after [`PmemRegion::msync`]).
    pub fn write(&self, off: usize, data: &[u8]) -> Result<()> {
        self.check(off, data.len())?;
        // SAFETY: as in `read`, in the other direction; the mapping is writable.
        unsafe { std::ptr::copy(data.as_ptr(), self.ptr.add(off), data.len()) };
        Ok(())
    }

    /// Local persistence of `len` bytes at `off`: `msync(MS_SYNC)` of the pages holding them.
    pub fn msync(&self, off: usize, len: usize) -> Result<()> {
        self.check(off, len)?;
        let page = page_size();
        let start = (self.ptr as usize + off) & !(page - 1);
        let end = self.ptr as usize + off + len;
        // SAFETY: msync on pages of our own mapping (the range is inside it); no memory is read.
        let rc = unsafe { libc::msync(start as *mut libc::c_void, end - start, libc::MS_SYNC) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    fn check(&self, off: usize, len: usize) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "{off}+{len} outside the persistent region of {} bytes",
                self.len
            ))),
        }
    }
}

impl Drop for PmemRegion {
    fn drop(&mut self) {
        // SAFETY: `mr` is dropped once, here, and not used afterwards: the region is
        // deregistered before the mapping goes away.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.mr) };
        // SAFETY: `map` is the mapping made in `register_pmem`, unmapped once, here.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf reads a constant.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

impl Domain {
    /// Register `len` bytes of `file` from `offset` as a persistent region (`FI_RMA_PMEM`):
    /// the file is mapped `MAP_SHARED` here and registered with `access` (`fi::REMOTE_WRITE`
    /// and/or `fi::REMOTE_READ`, local flags as for [`Domain::register`]); the device persists
    /// ranges of it with libpmem2 (RMA writes with `fi::COMMIT_COMPLETE`, [`Endpoint::save`],
    /// [`Endpoint::commit`]).
    ///
    /// [`Endpoint::save`]: crate::Endpoint::save
    /// [`Endpoint::commit`]: crate::Endpoint::commit
    pub fn register_pmem(
        &self,
        file: &File,
        offset: u64,
        len: usize,
        access: u64,
    ) -> Result<PmemRegion> {
        let meta = file.metadata()?;
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| Error::InvalidArgument("range overflows".into()))?;
        if !meta.file_type().is_file() || len == 0 || meta.len() < end {
            return Err(Error::InvalidArgument(format!(
                "a persistent region needs 1.. bytes of a regular file: {offset}+{len} of a \
                 file of {} bytes",
                meta.len()
            )));
        }
        let file = file.try_clone()?;
        let page = page_size() as u64;
        let map_off = offset & !(page - 1);
        let delta = (offset - map_off) as usize;
        let map_len = delta + len;
        let file_off = libc::off_t::try_from(map_off)
            .map_err(|_| Error::InvalidArgument("offset too large".into()))?;
        // SAFETY: a fresh shared mapping of our own descriptor; nothing of ours is replaced.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                file_off,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: `delta` < page size, inside the mapping.
        let ptr = unsafe { map.cast::<u8>().add(delta) };
        let attr = MrAttr {
            access,
            pmem: Some(PmemBacking {
                fd: file.as_raw_fd(),
                offset,
            }),
            ..Default::default()
        };
        // SAFETY: the mapping lives until the region is dropped (which deregisters first).
        let mr = match unsafe { self.register_raw(ptr, len, &attr) } {
            Ok(mr) => mr,
            Err(e) => {
                // SAFETY: the mapping made above, not registered.
                unsafe { libc::munmap(map, map_len) };
                return Err(e);
            }
        };
        Ok(PmemRegion {
            mr: std::mem::ManuallyDrop::new(mr),
            map,
            map_len,
            ptr,
            len,
            _file: file,
        })
    }
}
