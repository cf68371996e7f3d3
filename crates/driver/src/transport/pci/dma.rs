// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! DMA memory for the pci transport: locked (huge) pages whose guest-physical addresses come from
//! `/proc/self/pagemap`, each physically contiguous run a segment of the domain's region.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::memory::{DmaSegment, SharedMemory};
use crate::{Error, Result};

const PAGE_SIZE: usize = 4096;
const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Guest-physical address of every 4 KiB page of `[base, base+len)` from `/proc/self/pagemap`
/// (each must be present; PFNs are shown to CAP_SYS_ADMIN only).
fn physical_pages(base: *const u8, len: usize) -> Result<Vec<u64>> {
    let pages = len / PAGE_SIZE;
    let f = File::open("/proc/self/pagemap")?;
    let mut raw = vec![0u8; pages * 8];
    f.read_exact_at(&mut raw, (base as usize / PAGE_SIZE * 8) as u64)?;
    raw.chunks_exact(8)
        .enumerate()
        .map(|(i, c)| {
            let e = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            let present = e & (1 << 63) != 0;
            let pfn = e & ((1 << 55) - 1);
            if !present {
                return Err(Error::Transport(format!(
                    "DMA page {i} is not resident (pagemap {e:#x})"
                )));
            }
            if pfn == 0 {
                return Err(Error::Unsupported(
                    "physical addresses are hidden in /proc/self/pagemap: the pci transport \
                     needs root (CAP_SYS_ADMIN)"
                        .into(),
                ));
            }
            Ok(pfn * PAGE_SIZE as u64)
        })
        .collect()
}

/// Physically contiguous runs of pages (`phys[i]` is page `i`'s address) as region segments.
pub(crate) fn segments_of(phys: &[u64]) -> Vec<DmaSegment> {
    let mut out: Vec<DmaSegment> = Vec::new();
    for (i, &pa) in phys.iter().enumerate() {
        match out.last_mut() {
            Some(s) if s.device_addr + s.len as u64 == pa => s.len += PAGE_SIZE,
            _ => out.push(DmaSegment {
                offset: i * PAGE_SIZE,
                len: PAGE_SIZE,
                device_addr: pa,
            }),
        }
    }
    out
}

/// Locked, populated anonymous memory: huge pages if the system has enough, else 4 KiB pages.
/// Returns the mapping, its length and whether it is made of huge pages.
fn map_locked(len: usize) -> Result<(NonNull<u8>, usize, bool)> {
    let base_flags = libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_LOCKED | libc::MAP_POPULATE;
    for huge in [true, false] {
        let (flags, size) = if huge {
            (
                base_flags | libc::MAP_HUGETLB,
                len.next_multiple_of(HUGE_PAGE_SIZE),
            )
        } else {
            (base_flags, len.next_multiple_of(PAGE_SIZE))
        };
        // SAFETY: a fresh anonymous mapping; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            if huge {
                tracing::debug!(error = %e, "no huge pages for DMA memory; using 4 KiB pages");
                continue;
            }
            return Err(Error::Transport(format!(
                "locked DMA memory of {size} bytes: {e} (raise the memlock limit?)"
            )));
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| Error::Transport("mmap".into()))?;
        return Ok((base, size, huge));
    }
    unreachable!("the 4 KiB attempt returns")
}

/// The domain's region for a virtio-pci device: locked pages with their guest-physical
/// addresses as segments (see the module documentation).
pub(crate) fn dma_region(len: usize) -> Result<Arc<SharedMemory>> {
    let (base, size, huge) = map_locked(len.max(1 << 16))?;
    let unmap = || {
        // SAFETY: unmapping the mapping just made, which nothing else refers to.
        unsafe { libc::munmap(base.as_ptr().cast(), size) };
    };
    // Touch every page so it is resident even where MAP_POPULATE was partial.
    for off in (0..size).step_by(PAGE_SIZE) {
        // SAFETY: `off` < size: inside the fresh mapping.
        unsafe { base.as_ptr().add(off).write_volatile(0) };
    }
    let segments = match physical_pages(base.as_ptr(), size) {
        Ok(phys) => segments_of(&phys),
        Err(e) => {
            unmap();
            return Err(e);
        }
    };
    if !huge {
        tracing::warn!(
            size,
            largest_run = segments.iter().map(|s| s.len).max().unwrap_or(0),
            "DMA memory in 4 KiB pages (no huge pages reserved): no object larger than the \
             longest physically contiguous run fits"
        );
    }
    tracing::debug!(
        size,
        huge,
        segments = segments.len(),
        largest = segments.iter().map(|s| s.len).max().unwrap_or(0),
        "DMA memory mapped"
    );
    // SAFETY: the mapping is ours, locked (MAP_LOCKED; huge pages are not migrated by
    // compaction), and the segments come from its pagemap.
    match unsafe { SharedMemory::from_dma_mapping(base, size, segments) } {
        Ok(m) => Ok(m),
        Err(e) => {
            unmap();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_pages_merge_into_segments() {
        let p = PAGE_SIZE as u64;
        let phys = [10 * p, 11 * p, 12 * p, 40 * p, 7 * p, 8 * p];
        let s = segments_of(&phys);
        assert_eq!(
            s,
            vec![
                DmaSegment {
                    offset: 0,
                    len: 3 * PAGE_SIZE,
                    device_addr: 10 * p
                },
                DmaSegment {
                    offset: 3 * PAGE_SIZE,
                    len: PAGE_SIZE,
                    device_addr: 40 * p
                },
                DmaSegment {
                    offset: 4 * PAGE_SIZE,
                    len: 2 * PAGE_SIZE,
                    device_addr: 7 * p
                },
            ]
        );
    }

    /// With root (pagemap shows frame numbers), DMA memory translates through its pagemap.
    #[test]
    fn dma_region_translates_through_pagemap() {
        let mem = match dma_region(1 << 20) {
            Ok(m) => m,
            Err(Error::Unsupported(why)) => {
                eprintln!("skipped: {why}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let phys = physical_pages(mem.base(), mem.len()).unwrap();
        for (i, &pa) in phys.iter().enumerate() {
            // SAFETY: page `i` is inside the region.
            let p = unsafe { mem.base().add(i * PAGE_SIZE + 8) };
            assert_eq!(mem.device_addr(p, 8), Some(pa + 8));
        }
        // The region splits where it is not physically contiguous; an allocation as large as
        // the longest run fits in it and is one device range.
        let runs = mem.device_ranges(mem.base(), mem.len()).unwrap();
        assert_eq!(runs.iter().map(|r| r.1).sum::<usize>(), mem.len());
        let longest = runs.iter().map(|r| r.1).max().unwrap();
        let a = mem.alloc(longest, 64).unwrap();
        let r = mem.device_ranges(a.ptr(), a.capacity()).unwrap();
        assert_eq!(r, vec![(a.device_addr(), a.capacity())]);
    }
}
