// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Sharing memory outside a domain's shared region ([`crate::Domain::share_raw`]): the pages of
//! the range are moved, in place, onto a sealed memfd that is then handed to the device with
//! vhost-user ADD_MEM_REG (guest address = user address = the page address).
//!
//! The move loses no write. Copying the pages and mapping the copy over them (as this once did)
//! loses every write another thread makes in between, and `mremap` cannot make the two one
//! step. Instead the range is first registered with a userfaultfd (missing-page mode), then
//! its pages are moved away with `mremap(MREMAP_DONTUNMAP)`: the range stays mapped but
//! empty, so any thread touching it now waits in the kernel. With the pages out of anyone
//! else's reach they are copied into the memfd, the memfd is mapped over the range
//! (`MAP_FIXED`, one step) and the waiting threads are woken: they retry their access on the
//! memfd, which holds every byte written before the move.
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
        let pieces: Vec<(usize, usize)> = covering(&maps, gs, gl)?
            .iter()
            .map(|m| (m.start.max(gs), m.end.min(gs + gl)))
            .collect();
        let r = Arc::new(move_onto_memfd(gs, gl, &pieces)?);
        all.insert(gs, r.clone());
        live.push(r);
    }
    live.sort_by_key(|r| r.start);
    Ok(live)
}

/// Mappings a moved range may span (kept on the stack while the pages are away).
const MAX_PIECES: usize = 16;

use crate::uffd::{
    UffdioApi, UffdioRange, UffdioRegister, UFFDIO_API, UFFDIO_REGISTER,
    UFFDIO_REGISTER_MODE_MISSING, UFFDIO_WAKE, UFFD_API,
};

fn os_err(what: &str) -> Error {
    let e = io::Error::last_os_error();
    Error::Io(io::Error::new(e.kind(), format!("{what}: {e}")))
}

/// A userfaultfd that also catches faults from kernel mode (a `read(2)` into the range must
/// wait like a CPU store does, not fail with EFAULT).
fn userfaultfd() -> Result<File> {
    // SAFETY: userfaultfd(2) takes flags only and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(Error::Unsupported(format!(
            "userfaultfd (needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1): {e}"
        )));
    }
    // SAFETY: `fd` was just returned by userfaultfd and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd as i32) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes the `uffdio_api` struct we pass.
    if unsafe { libc::ioctl(file.as_raw_fd(), UFFDIO_API, &mut api) } < 0 {
        return Err(os_err("UFFDIO_API"));
    }
    Ok(file)
}

/// Move `[start, start+len)` (made of the mappings `pieces`, in order) onto a fresh memfd
/// mapped at the same addresses, so the same addresses show the same bytes, backed by
/// shareable memory; no concurrent access is lost (module docs).
fn move_onto_memfd(start: usize, len: usize, pieces: &[(usize, usize)]) -> Result<Remapped> {
    // Between the move and the wake-up this thread must touch no heap memory: the heap bytes
    // it needs could lie in the moved pages (it would wait for itself), and another thread
    // waiting on them may hold the allocator's lock (no allocation either). So the mappings are
    // copied to the stack, and errors are only recorded (as errno values) until the wake-up.
    let mut stack_pieces = [(0usize, 0usize); MAX_PIECES];
    if pieces.len() > MAX_PIECES {
        return Err(Error::InvalidArgument(format!(
            "{start:#x}+{len:#x} spans more than {MAX_PIECES} mappings"
        )));
    }
    stack_pieces[..pieces.len()].copy_from_slice(pieces);
    let pieces = &stack_pieces[..pieces.len()];
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
    let uffd = userfaultfd()?;
    // A second view of the memfd to fill it, and room for the moved pages.
    let fill = Mapping::new(
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
        file.as_raw_fd(),
    )?;
    let parked = Mapping::new(
        len,
        libc::PROT_NONE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
    )?;
    let range = UffdioRange {
        start: start as u64,
        len: len as u64,
    };
    let mut reg = UffdioRegister {
        range,
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes the struct we pass; it changes how faults in
    // the range are served (they wait for us), not the memory.
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } < 0 {
        return Err(os_err("UFFDIO_REGISTER"));
    }
    // Move every mapping's pages to `parked`; the range stays mapped, empty and registered, so
    // from here on nobody else can read or write those bytes: they wait.
    let mut moved = 0;
    let mut failure: Option<(&'static str, io::Error)> = None;
    for &(ps, pe) in pieces {
        // SAFETY: `[ps, pe)` is one mapping of the range (from /proc/self/maps, checked by the
        // caller), moved to the same offset of `parked`, our own reservation. DONTUNMAP keeps
        // the source mapped, so no other mapping can take its place.
        let r = unsafe {
            libc::mremap(
                ps as *mut libc::c_void,
                pe - ps,
                pe - ps,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP,
                parked.ptr.add(ps - start).cast::<libc::c_void>(),
            )
        };
        if r == libc::MAP_FAILED {
            failure = Some(("mremap(MREMAP_DONTUNMAP)", io::Error::last_os_error()));
            break;
        }
        moved += 1;
    }
    let target = if failure.is_none() {
        // SAFETY: nobody else can reach the bytes now (module docs); `parked` holds them and
        // `fill` is a distinct `len`-byte mapping of the memfd.
        unsafe { std::ptr::copy_nonoverlapping(parked.ptr, fill.ptr, len) };
        // SAFETY: replaces the (empty, waited-on) range with the memfd holding its bytes, in
        // one step.
        let m = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                file.as_raw_fd(),
                0,
            )
        };
        if m == libc::MAP_FAILED {
            failure = Some(("mmap(MAP_FIXED) of the memfd", io::Error::last_os_error()));
        }
        failure.is_none()
    } else {
        false
    };
    let mut lost = None;
    if !target {
        // Put the moved pages back where they were (replacing the empty source mappings).
        for &(ps, pe) in &pieces[..moved] {
            // SAFETY: moves our parked pages back over their (empty) original addresses.
            let r = unsafe {
                libc::mremap(
                    parked.ptr.add(ps - start).cast::<libc::c_void>(),
                    pe - ps,
                    pe - ps,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    ps as *mut libc::c_void,
                )
            };
            if r == libc::MAP_FAILED && lost.is_none() {
                lost = Some((ps, io::Error::last_os_error()));
            }
        }
    }
    // Wake the waiters: they retry on whatever is mapped now (the memfd, or the pages put
    // back). Closing the userfaultfd (on return) wakes any that came later.
    let mut wake = range;
    // SAFETY: UFFDIO_WAKE only reads the range we pass.
    unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_WAKE, &mut wake) };
    drop(uffd);
    if let Some((at, e)) = lost {
        tracing::error!("cannot move pages back to {at:#x}: {e}");
    }
    if let Some((what, e)) = failure {
        return Err(Error::Io(io::Error::new(
            e.kind(),
            format!("{what} at {start:#x}+{len:#x}: {e}"),
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

/// A temporary mapping of this module, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize, prot: i32, flags: i32, fd: i32) -> Result<Self> {
        // SAFETY: a new mapping at an address of the kernel's choosing; checked below.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(os_err("mmap"));
        }
        Ok(Self { ptr: p.cast(), len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping a mapping this object created (pages moved into it go with it).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
