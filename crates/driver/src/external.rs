// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Registration of memory outside a domain's shared region ([`crate::Domain::register_external`]):
//! the pages of the range are moved, in place, onto a sealed memfd that is then handed to the
//! device with vhost-user ADD_MEM_REG (guest address = user address = the page address).
//!
//! A remapped range is recorded process-wide (the memfd stays open), so that another domain can
//! add the same pages without remapping them again; each domain records which of those ranges it
//! has added to its device.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use crate::{Error, Result};

/// One range remapped onto a memfd: `[start, start + len)`, page aligned.
#[derive(Debug)]
pub(crate) struct Remapped {
    pub start: usize,
    pub len: usize,
    pub file: File,
    /// Inode of the memfd (to recognise the mapping in `/proc/self/maps`).
    ino: u64,
}

impl Remapped {
    pub fn contains(&self, p: usize, l: usize) -> bool {
        p >= self.start && p.checked_add(l).is_some_and(|e| e <= self.start + self.len)
    }
}

/// Every range this process remapped, by start address.
static REMAPPED: Mutex<BTreeMap<usize, Arc<Remapped>>> = Mutex::new(BTreeMap::new());

pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no memory side effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p <= 0 {
        4096
    } else {
        p as usize
    }
}

/// `[ptr, ptr+len)` widened to whole pages.
pub(crate) fn page_range(ptr: usize, len: usize) -> Result<(usize, usize)> {
    let ps = page_size();
    let end = ptr
        .checked_add(len.max(1))
        .and_then(|e| e.checked_add(ps - 1))
        .ok_or_else(|| Error::InvalidArgument("range overflows the address space".into()))?
        & !(ps - 1);
    let start = ptr & !(ps - 1);
    Ok((start, end - start))
}

/// One line of `/proc/self/maps`.
#[derive(Debug)]
struct MapLine {
    start: usize,
    end: usize,
    perms: String,
    inode: u64,
    path: String,
}

fn read_maps() -> Result<Vec<MapLine>> {
    let text = std::fs::read_to_string("/proc/self/maps")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(range), Some(perms), Some(_off), Some(_dev), Some(inode)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let path = it.collect::<Vec<_>>().join(" ");
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(inode)) = (
            usize::from_str_radix(a, 16),
            usize::from_str_radix(b, 16),
            inode.parse::<u64>(),
        ) else {
            continue;
        };
        out.push(MapLine {
            start,
            end,
            perms: perms.to_string(),
            inode,
            path,
        });
    }
    Ok(out)
}

/// The mappings covering `[start, start+len)`, or an error if a hole is in it.
fn covering(maps: &[MapLine], start: usize, len: usize) -> Result<Vec<&MapLine>> {
    let end = start + len;
    let mut at = start;
    let mut out = Vec::new();
    for m in maps.iter().filter(|m| m.end > start && m.start < end) {
        if m.start > at {
            break;
        }
        out.push(m);
        at = m.end;
    }
    if at < end {
        return Err(Error::InvalidArgument(format!(
            "{:#x}..{:#x} is not entirely mapped",
            start, end
        )));
    }
    Ok(out)
}

/// Is `[start, start+len)` still mapped from the memfd of `r` (the application may have
/// unmapped it, e.g. `free` of a large allocation, and something else may live there now)?
fn still_mapped(r: &Remapped, start: usize, len: usize) -> Result<bool> {
    let maps = read_maps()?;
    Ok(covering(&maps, start, len).is_ok_and(|v| {
        v.iter()
            .all(|m| m.inode == r.ino && m.perms.starts_with("rw") && m.perms.ends_with('s'))
    }))
}

/// Does the union of `ranges` cover `[p, p+l)`?
pub(crate) fn covered(ranges: &[Arc<Remapped>], p: usize, l: usize) -> bool {
    let Some(end) = p.checked_add(l.max(1)) else {
        return false;
    };
    let mut v: Vec<(usize, usize)> = ranges
        .iter()
        .filter(|r| r.start < end && r.start + r.len > p)
        .map(|r| (r.start, r.start + r.len))
        .collect();
    v.sort_unstable();
    let mut at = p;
    for (s, e) in v {
        if s > at {
            return false;
        }
        at = at.max(e);
    }
    at >= end
}

/// The remapped ranges covering `[start, start+len)`: pages moved earlier are reused and only
/// the missing pages are moved onto new memfds (so a range partly overlapping earlier ones is
/// served by several ranges, each its own memory slot of the device).
pub(crate) fn remap(start: usize, len: usize) -> Result<Vec<Arc<Remapped>>> {
    let mut all = REMAPPED.lock().unwrap();
    let end = start + len;
    let overlapping: Vec<Arc<Remapped>> = all
        .range(..end)
        .filter(|(_, r)| r.start + r.len > start)
        .map(|(_, r)| r.clone())
        .collect();
    let mut live = Vec::new();
    for r in overlapping {
        if still_mapped(&r, r.start, r.len)? {
            live.push(r);
        } else {
            // The application unmapped those pages since: forget them.
            all.remove(&r.start);
        }
    }
    if let Some(r) = live.iter().find(|r| r.contains(start, len)) {
        return Ok(vec![r.clone()]);
    }
    // `live` is sorted by start (BTreeMap order) and its ranges are disjoint.
    let mut gaps = Vec::new();
    let mut at = start;
    for r in &live {
        if r.start > at {
            gaps.push((at, r.start - at));
        }
        at = at.max(r.start + r.len);
    }
    if at < end {
        gaps.push((at, end - at));
    }
    let maps = read_maps()?;
    for &(gs, gl) in &gaps {
        for m in covering(&maps, gs, gl)? {
            let anon = m.inode == 0 && (m.path.is_empty() || m.path == "[heap]");
            if !anon || !m.perms.starts_with("rw") || !m.perms.ends_with('p') {
                return Err(Error::InvalidArgument(format!(
                    "{start:#x}..{end:#x} is not ordinary private anonymous memory (mapping \
                     {:#x}-{:#x} {} {})",
                    m.start, m.end, m.perms, m.path
                )));
            }
        }
    }
    for (gs, gl) in gaps {
        let r = Arc::new(move_onto_memfd(gs, gl)?);
        all.insert(gs, r.clone());
        live.push(r);
    }
    live.sort_by_key(|r| r.start);
    Ok(live)
}

/// Copy `[start, start+len)` into a fresh memfd and map that over the range (MAP_FIXED), so the
/// same addresses now show the same bytes, backed by shareable memory.
fn move_onto_memfd(start: usize, len: usize) -> Result<Remapped> {
    let name = CString::new("vfabric-ext").expect("no NUL");
    // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no other inputs.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len as u64)?;
    // SAFETY: fcntl(F_ADD_SEALS) on the memfd we own; it reads no memory of ours.
    if unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    } < 0
    {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: a new shared mapping of the correctly sized memfd at an address of the kernel's
    // choosing; checked below.
    let tmp = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if tmp == libc::MAP_FAILED {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: the source range is mapped readable (checked against /proc/self/maps by the
    // caller) and the destination is the fresh `len`-byte mapping; they cannot overlap.
    unsafe { std::ptr::copy_nonoverlapping(start as *const u8, tmp.cast::<u8>(), len) };
    // SAFETY: `tmp` is a mapping of `len` bytes we created above; moving it onto the caller's
    // range (which the caller vouches for) atomically replaces those pages with the memfd's,
    // which hold the same bytes.
    let moved = unsafe {
        libc::mremap(
            tmp,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            start as *mut libc::c_void,
        )
    };
    if moved == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        // SAFETY: unmapping the temporary mapping created above, still in place on failure.
        unsafe { libc::munmap(tmp, len) };
        return Err(Error::Io(io::Error::new(
            e.kind(),
            format!("mremap onto {start:#x}+{len:#x}: {e}"),
        )));
    }
    let ino = file.metadata()?.ino();
    tracing::debug!(
        start = format_args!("{start:#x}"),
        len,
        "external pages moved onto a memfd"
    );
    Ok(Remapped {
        start,
        len,
        file,
        ino,
    })
}
