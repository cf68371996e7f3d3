// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Persistent memory regions (spec §6.17): the file behind a region registered with
//! `mr_flags::PMEM`, mapped with libpmem2 so its persist function makes ranges durable.
//!
//! A persistent region is always process memory (`mr_flags::PROCESS_MEMORY`): the frontend
//! mapped the file `MAP_SHARED` and the device moves bytes with `process_vm_writev`/`readv`
//! into *that* mapping, never through a mapping of its own. A regular file cannot be sealed
//! against shrinking (guest memory must be, see `backend::check_backing`), and a load or store
//! through a mapping of a truncated file would kill the whole daemon with SIGBUS; the kernel
//! instead fails a cross-memory access to a truncated page with EFAULT (the request completes
//! FAULT). The device's own mapping of the file (from libpmem2) is only handed to pmem2's
//! persist function: on page-granular mappings (any file not on a DAX filesystem) that is
//! `msync(MS_SYNC)`, which writes back the file's dirty pages of the range without touching the
//! mapping, so a truncated file cannot hurt the device. On DAX mappings (byte or cache-line
//! granularity) pmem2 flushes the CPU cache lines of the range through the mapping; the device
//! checks the file still covers the range just before, and a truncation racing that check
//! remains a window (documented in `docs/design.md`).
//!
//! The file itself comes from the frontend by `pidfd_getfd(2)` (the same ptrace-read permission
//! as the cross-memory copies): MR_REG names the frontend's descriptor and the file offset of
//! the region's first byte.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::raw::{c_char, c_int, c_void};

/// libpmem2's store granularity of a mapping: the smallest unit a power failure can tear,
/// also the value of the `PMEM_GRANULARITY` capability and of a PMEM MR_REG completion's
/// `olen` (spec §6.17).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// Persistent on store (eADR): CPU caches are in the persistence domain.
    Byte = 0,
    /// Cache lines must be flushed (ADR pmem).
    CacheLine = 1,
    /// Pages must be written back (any file not on DAX): `msync`.
    Page = 2,
}

impl Granularity {
    pub fn name(self) -> &'static str {
        match self {
            Self::Byte => "byte",
            Self::CacheLine => "cache_line",
            Self::Page => "page",
        }
    }
}

mod ffi {
    use std::os::raw::{c_char, c_int, c_void};

    #[repr(C)]
    pub struct Pmem2Source {
        _private: [u8; 0],
    }
    #[repr(C)]
    pub struct Pmem2Config {
        _private: [u8; 0],
    }
    #[repr(C)]
    pub struct Pmem2Map {
        _private: [u8; 0],
    }

    /// `enum pmem2_granularity`.
    pub const GRANULARITY_BYTE: c_int = 0;
    pub const GRANULARITY_CACHE_LINE: c_int = 1;
    pub const GRANULARITY_PAGE: c_int = 2;

    pub type PersistFn = unsafe extern "C" fn(ptr: *const c_void, size: usize);

    #[link(name = "pmem2")]
    extern "C" {
        pub fn pmem2_source_from_fd(src: *mut *mut Pmem2Source, fd: c_int) -> c_int;
        pub fn pmem2_source_delete(src: *mut *mut Pmem2Source) -> c_int;
        pub fn pmem2_source_alignment(src: *const Pmem2Source, alignment: *mut usize) -> c_int;
        pub fn pmem2_config_new(cfg: *mut *mut Pmem2Config) -> c_int;
        pub fn pmem2_config_delete(cfg: *mut *mut Pmem2Config) -> c_int;
        pub fn pmem2_config_set_required_store_granularity(
            cfg: *mut Pmem2Config,
            g: c_int,
        ) -> c_int;
        pub fn pmem2_config_set_offset(cfg: *mut Pmem2Config, offset: usize) -> c_int;
        pub fn pmem2_config_set_length(cfg: *mut Pmem2Config, length: usize) -> c_int;
        pub fn pmem2_map_new(
            map: *mut *mut Pmem2Map,
            cfg: *const Pmem2Config,
            src: *const Pmem2Source,
        ) -> c_int;
        pub fn pmem2_map_delete(map: *mut *mut Pmem2Map) -> c_int;
        pub fn pmem2_map_get_address(map: *mut Pmem2Map) -> *mut c_void;
        pub fn pmem2_map_get_store_granularity(map: *mut Pmem2Map) -> c_int;
        pub fn pmem2_get_persist_fn(map: *mut Pmem2Map) -> Option<PersistFn>;
        pub fn pmem2_errormsg() -> *const c_char;
    }
}

/// libpmem2's message for the last error of this thread.
fn pmem2_error(what: &str, rc: c_int) -> String {
    // SAFETY: pmem2_errormsg returns a thread-local NUL-terminated string (or NULL).
    let p: *const c_char = unsafe { ffi::pmem2_errormsg() };
    let msg = if p.is_null() {
        String::new()
    } else {
        // SAFETY: non-NULL, NUL-terminated, valid until the next pmem2 call of this thread.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    };
    format!("{what}: {msg} ({rc})")
}

/// Frees pmem2 objects on every exit path of [`PmemFile::open`].
struct Scratch {
    src: *mut ffi::Pmem2Source,
    cfg: *mut ffi::Pmem2Config,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: each pointer is NULL or an object pmem2 created for us; delete accepts both
        // and NULLs the pointer.
        unsafe {
            ffi::pmem2_config_delete(&mut self.cfg);
            ffi::pmem2_source_delete(&mut self.src);
        }
    }
}

/// The file of one persistent region, mapped by libpmem2 (never dereferenced by the device).
pub(crate) struct PmemFile {
    file: File,
    /// pmem2's mapping of the file's whole pages under the region (NULL when the region lies
    /// in the file's last, partial page: pmem2 maps whole pages of the file only).
    map: *mut ffi::Pmem2Map,
    /// Address of the region's first byte in the device's mapping.
    base: *mut u8,
    /// Bytes of the region (from its start) the mapping covers; the rest, in the file's last
    /// partial page, is persisted with `fdatasync`.
    mapped: u64,
    /// File offset of the region's first byte.
    file_offset: u64,
    len: u64,
    persist_fn: Option<ffi::PersistFn>,
    granularity: Granularity,
}

// SAFETY: the map is only read (persist) after construction, and pmem2's persist functions are
// thread-safe; the raw pointers are owned by this struct until drop.
unsafe impl Send for PmemFile {}
// SAFETY: as above: no interior mutation through `&PmemFile`.
unsafe impl Sync for PmemFile {}

impl std::fmt::Debug for PmemFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PmemFile")
            .field("fd", &self.file.as_raw_fd())
            .field("file_offset", &self.file_offset)
            .field("len", &self.len)
            .field("mapped", &self.mapped)
            .field("granularity", &self.granularity)
            .finish()
    }
}

impl PmemFile {
    /// Map `len` bytes of `file` from `file_offset` for persisting. Refuses anything that is
    /// not a regular file covering the range.
    pub fn open(file: File, file_offset: u64, len: u64) -> Result<Self, String> {
        let meta = file.metadata().map_err(|e| format!("fstat: {e}"))?;
        if !meta.file_type().is_file() {
            return Err("not a regular file".into());
        }
        let end = file_offset
            .checked_add(len)
            .ok_or("range overflows the file offset")?;
        if len == 0 || meta.len() < end {
            return Err(format!(
                "the file has {} bytes, the region needs {end}",
                meta.len()
            ));
        }
        let mut s = Scratch {
            src: std::ptr::null_mut(),
            cfg: std::ptr::null_mut(),
        };
        // SAFETY: pmem2 fills `s.src` from a descriptor we keep open for the map's lifetime.
        let rc = unsafe { ffi::pmem2_source_from_fd(&mut s.src, file.as_raw_fd()) };
        if rc != 0 {
            return Err(pmem2_error("pmem2_source_from_fd", rc));
        }
        let mut align = 0usize;
        // SAFETY: `s.src` is a valid source; `align` is a writable usize.
        let rc = unsafe { ffi::pmem2_source_alignment(s.src, &mut align) };
        if rc != 0 || align == 0 || !align.is_power_of_two() {
            return Err(pmem2_error("pmem2_source_alignment", rc));
        }
        let align = align as u64;
        let map_offset = file_offset & !(align - 1);
        // pmem2 maps whole pages that lie inside the file.
        let map_end = (end.checked_add(align - 1).ok_or("range overflows")? & !(align - 1))
            .min(meta.len() & !(align - 1));
        let mut pf = Self {
            file,
            map: std::ptr::null_mut(),
            base: std::ptr::null_mut(),
            mapped: 0,
            file_offset,
            len,
            persist_fn: None,
            granularity: Granularity::Page,
        };
        if map_end <= file_offset {
            return Ok(pf);
        }
        let map_len = usize::try_from(map_end - map_offset).map_err(|_| "region too large")?;
        let map_off = usize::try_from(map_offset).map_err(|_| "offset too large")?;
        // SAFETY: pmem2_config_new allocates a config into `s.cfg`.
        let rc = unsafe { ffi::pmem2_config_new(&mut s.cfg) };
        if rc != 0 {
            return Err(pmem2_error("pmem2_config_new", rc));
        }
        // SAFETY: `s.cfg` is a valid config; the setters only store values.
        let rc = unsafe {
            match ffi::pmem2_config_set_required_store_granularity(s.cfg, ffi::GRANULARITY_PAGE) {
                0 => match ffi::pmem2_config_set_offset(s.cfg, map_off) {
                    0 => ffi::pmem2_config_set_length(s.cfg, map_len),
                    e => e,
                },
                e => e,
            }
        };
        if rc != 0 {
            return Err(pmem2_error("pmem2_config", rc));
        }
        // SAFETY: valid config and source; pmem2 maps the file MAP_SHARED into `pf.map`,
        // which `Drop` deletes.
        let rc = unsafe { ffi::pmem2_map_new(&mut pf.map, s.cfg, s.src) };
        if rc != 0 {
            return Err(pmem2_error("pmem2_map_new", rc));
        }
        drop(s);
        // SAFETY: `pf.map` is the valid map just created; the getters read its fields.
        let (addr, g, persist) = unsafe {
            (
                ffi::pmem2_map_get_address(pf.map),
                ffi::pmem2_map_get_store_granularity(pf.map),
                ffi::pmem2_get_persist_fn(pf.map),
            )
        };
        pf.granularity = match g {
            ffi::GRANULARITY_BYTE => Granularity::Byte,
            ffi::GRANULARITY_CACHE_LINE => Granularity::CacheLine,
            ffi::GRANULARITY_PAGE => Granularity::Page,
            _ => return Err(format!("pmem2 map with unknown granularity {g}")),
        };
        if persist.is_none() || addr.is_null() {
            return Err("pmem2 map without an address or a persist function".into());
        }
        pf.persist_fn = persist;
        // The region starts `file_offset - map_offset` bytes into the mapping.
        pf.base = addr
            .cast::<u8>()
            .wrapping_add((file_offset - map_offset) as usize);
        pf.mapped = (map_end - file_offset).min(len);
        Ok(pf)
    }

    pub fn granularity(&self) -> Granularity {
        self.granularity
    }

    /// Make `len` bytes at offset `off` of the region durable: pmem2's persist function over
    /// the mapped part, `fdatasync` for a part in the file's last partial page. Fails (without
    /// touching the mapping) when the range is outside the region or the file no longer
    /// covers it.
    pub fn persist(&self, off: u64, len: u64) -> Result<(), String> {
        let end = off.checked_add(len).ok_or("range overflows")?;
        if end > self.len {
            return Err(format!(
                "range {off}+{len} outside the region of {}",
                self.len
            ));
        }
        if len == 0 {
            return Ok(());
        }
        let size = self
            .file
            .metadata()
            .map_err(|e| format!("fstat: {e}"))?
            .len();
        if size < self.file_offset + end {
            return Err(format!(
                "the file was truncated to {size} bytes under the region"
            ));
        }
        let in_map = end.min(self.mapped).saturating_sub(off);
        if let (Some(persist), true) = (self.persist_fn, in_map > 0) {
            // SAFETY: `base + off .. base + off + in_map` lies inside the mapping pmem2 made
            // (`off + in_map <= mapped`). On page granularity pmem2 only calls msync on the
            // range; on DAX it flushes the range's cache lines, which the size check above
            // keeps inside the file (module docs).
            unsafe {
                persist(
                    self.base.add(off as usize).cast::<c_void>(),
                    in_map as usize,
                )
            };
        }
        if end > self.mapped {
            self.file
                .sync_data()
                .map_err(|e| format!("fdatasync: {e}"))?;
        }
        Ok(())
    }
}

impl Drop for PmemFile {
    fn drop(&mut self) {
        if !self.map.is_null() {
            // SAFETY: `self.map` was made by pmem2_map_new and is deleted once, here.
            unsafe { ffi::pmem2_map_delete(&mut self.map) };
        }
    }
}

/// Check that the frontend `pid` maps `len` bytes at `addr` `MAP_SHARED` from `file` at
/// `file_offset` (its `/proc/PID/maps`): the bytes the device writes by cross-memory attach
/// are then the file's own, and persisting the file's range persists them.
pub(crate) fn check_mapping(
    pid: libc::pid_t,
    addr: u64,
    len: u64,
    file: &File,
    file_offset: u64,
) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().map_err(|e| format!("fstat: {e}"))?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| format!("/proc/{pid}/maps: {e}"))?;
    let end = addr.checked_add(len).ok_or("range overflows")?;
    let mut at = addr;
    for line in maps.lines() {
        if at >= end {
            break;
        }
        let Some(vma) = Vma::parse(line) else {
            continue;
        };
        if vma.end <= at || vma.start > at {
            continue;
        }
        let want = file_offset + (at - addr);
        if !vma.shared
            || vma.dev != (libc::major(meta.dev()), libc::minor(meta.dev()))
            || vma.inode != meta.ino()
            || vma.offset + (at - vma.start) != want
        {
            return Err(format!(
                "{at:#x} is not a shared mapping of the registered file at offset {want}"
            ));
        }
        at = vma.end;
    }
    if at < end {
        return Err(format!("{at:#x} is not mapped"));
    }
    Ok(())
}

/// One line of `/proc/PID/maps`.
struct Vma {
    start: u64,
    end: u64,
    shared: bool,
    offset: u64,
    dev: (u32, u32),
    inode: u64,
}

impl Vma {
    fn parse(line: &str) -> Option<Self> {
        let mut f = line.split_ascii_whitespace();
        let (start, end) = f.next()?.split_once('-')?;
        let perms = f.next()?;
        let offset = f.next()?;
        let (major, minor) = f.next()?.split_once(':')?;
        let inode = f.next()?;
        Some(Self {
            start: u64::from_str_radix(start, 16).ok()?,
            end: u64::from_str_radix(end, 16).ok()?,
            shared: perms.as_bytes().get(3) == Some(&b's'),
            offset: u64::from_str_radix(offset, 16).ok()?,
            dev: (
                u32::from_str_radix(major, 16).ok()?,
                u32::from_str_radix(minor, 16).ok()?,
            ),
            inode: inode.parse().ok()?,
        })
    }
}

/// The store granularity this daemon reports in QUERY_CAPS: the coarsest its persistent
/// regions may have (a region on a regular file is page-granular; each PMEM MR_REG reports the
/// granularity of its own region).
pub(crate) const DEVICE_GRANULARITY: Granularity = Granularity::Page;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn maps_and_persists_a_regular_file() {
        let mut f = tempfile_in_tmp();
        f.write_all(&vec![7u8; 3 * 4096]).unwrap();
        let p = PmemFile::open(f.try_clone().unwrap(), 100, 8000).unwrap();
        assert_eq!(p.granularity(), Granularity::Page);
        assert_eq!(p.mapped, 8000);
        // A region ending in the file's last partial page: its tail is not mapped.
        let tail = PmemFile::open(f.try_clone().unwrap(), 4000, 3 * 4096 - 4000).unwrap();
        assert_eq!(tail.mapped, 3 * 4096 - 4000);
        f.set_len(3 * 4096 + 10).unwrap();
        let tail = PmemFile::open(f.try_clone().unwrap(), 4000, 3 * 4096 + 10 - 4000).unwrap();
        assert_eq!(tail.mapped, 3 * 4096 - 4000);
        tail.persist(0, tail.len).unwrap();
        let small = PmemFile::open(f.try_clone().unwrap(), 3 * 4096 + 2, 8).unwrap();
        assert_eq!(small.mapped, 0);
        small.persist(0, 8).unwrap();
        p.persist(0, 8000).unwrap();
        p.persist(4000, 200).unwrap();
        assert!(p.persist(7999, 2).is_err(), "past the region");
        f.set_len(4096).unwrap();
        let e = p.persist(5000, 10).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        p.persist(0, 10).unwrap();
    }

    #[test]
    fn refuses_short_files_and_non_files() {
        let mut f = tempfile_in_tmp();
        f.write_all(&[0u8; 100]).unwrap();
        assert!(PmemFile::open(f.try_clone().unwrap(), 0, 101).is_err());
        assert!(PmemFile::open(f, 0, 0).is_err());
        let dir = File::open("/tmp").unwrap();
        assert!(PmemFile::open(dir, 0, 1).is_err());
    }

    fn tempfile_in_tmp() -> File {
        let path = std::env::temp_dir().join(format!(
            "vfabric-pmem-unit-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }
}
