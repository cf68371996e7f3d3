// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Memory monitors of the registration cache (`mr_cache`): what tells the cache that memory
//! behind a cached registration was unmapped.
//!
//! * The default monitor is the provider's own userfaultfd monitor (libfabric's `uffd`
//!   monitor is the anchor). Each cached range is registered with one process-wide
//!   userfaultfd in *write-protect* mode without ever write-protecting a page, so no page
//!   fault is ever delivered (missing mode, as libfabric uses, would stop every first touch of
//!   an unpopulated page — and the device's cross-memory reads of registered memory — until a
//!   handler resolved it), while `munmap`, `mremap` and `mmap(MAP_FIXED)` over the range raise
//!   `UFFD_EVENT_UNMAP`/`UFFD_EVENT_REMAP`. The kernel makes the unmapping thread wait until the
//!   event has been read, and events are read only under [`Uffd::drain`]'s lock, which also
//!   processes them; every cache lookup drains first. So a registration made after `munmap`
//!   returned never finds the stale entry. `UFFD_EVENT_REMOVE` (`madvise(MADV_DONTNEED)`) is not
//!   asked for: nothing here pins pages, so a page dropped and faulted in again is the same
//!   memory to the device (a shared memfd page keeps its contents; an anonymous page is read
//!   afresh by cross-memory attach). Intercepting `munmap` (libfabric's memhooks) was not
//!   chosen: a provider loaded with `dlopen(RTLD_LOCAL)` cannot interpose libc's symbols, and
//!   glibc's `free` calls its internal `munmap` anyway; memhooks patches libc's code instead.
//! * A consumer's monitor (`struct fid_mem_monitor` of libfabric 1.17's `fi_ext.h`) imported on
//!   a domain with `fi_import_fid(&domain->fid, &monitor->fid, 0)` replaces it for that domain:
//!   the cache calls its `subscribe`/`unsubscribe` once per cached entry, `valid` on each hit,
//!   `start` at the import and `stop` when the last domain using it closes; the provider fills
//!   `import_ops` so that the consumer's `notify(monitor, addr, len)` invalidates.

use std::ffi::{c_int, c_void};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, Weak};

use vfabric::fi;

use crate::mr_cache::MrCache;
use crate::sys;
use crate::util::{FidObject, SendPtr};

// ---------------------------------------------------------------------------------------------
// The consumer's monitor (fi_ext.h, libfabric 1.17)
// ---------------------------------------------------------------------------------------------

/// `struct fi_ops_mem_monitor`.
#[repr(C)]
pub struct FiOpsMemMonitor {
    pub size: usize,
    pub start: Option<unsafe extern "C" fn(*mut FidMemMonitor) -> c_int>,
    pub stop: Option<unsafe extern "C" fn(*mut FidMemMonitor)>,
    pub subscribe: Option<unsafe extern "C" fn(*mut FidMemMonitor, *const c_void, usize) -> c_int>,
    pub unsubscribe: Option<unsafe extern "C" fn(*mut FidMemMonitor, *const c_void, usize)>,
    pub valid: Option<unsafe extern "C" fn(*mut FidMemMonitor, *const c_void, usize) -> bool>,
}

/// `struct fi_ops_mem_notify`.
#[repr(C)]
pub struct FiOpsMemNotify {
    pub size: usize,
    pub notify: Option<unsafe extern "C" fn(*mut FidMemMonitor, *const c_void, usize)>,
}

/// `struct fid_mem_monitor`.
#[repr(C)]
pub struct FidMemMonitor {
    pub fid: sys::fid,
    pub export_ops: *mut FiOpsMemMonitor,
    pub import_ops: *mut FiOpsMemNotify,
}

static NOTIFY_OPS: FiOpsMemNotify = FiOpsMemNotify {
    size: std::mem::size_of::<FiOpsMemNotify>(),
    notify: Some(notify),
};

/// An imported monitor and the caches that use it (a monitor may serve several domains).
type Import = (SendPtr<FidMemMonitor>, Vec<Weak<MrCache>>);

static IMPORTS: Mutex<Vec<Import>> = Mutex::new(Vec::new());

/// A consumer's monitor as one cache uses it.
pub struct Imported(SendPtr<FidMemMonitor>);

impl Imported {
    fn ops(&self) -> &FiOpsMemMonitor {
        // SAFETY: checked non-NULL at the import; the consumer keeps the monitor (and its ops)
        // alive until the domains it was imported on are closed (fi_import_fid contract).
        unsafe { &*(*self.0 .0).export_ops }
    }
    pub fn subscribe(&self, addr: usize, len: usize) -> bool {
        let f = self.ops().subscribe.expect("checked at import");
        // SAFETY: the consumer's callback with its own monitor.
        unsafe { f(self.0 .0, addr as *const c_void, len) == 0 }
    }
    pub fn unsubscribe(&self, addr: usize, len: usize) {
        let f = self.ops().unsubscribe.expect("checked at import");
        // SAFETY: as above.
        unsafe { f(self.0 .0, addr as *const c_void, len) }
    }
    pub fn valid(&self, addr: usize, len: usize) -> bool {
        let f = self.ops().valid.expect("checked at import");
        // SAFETY: as above.
        unsafe { f(self.0 .0, addr as *const c_void, len) }
    }
    /// The cache is closing: forget it; the last cache of the monitor stops it.
    pub fn release(&self, cache: &MrCache) {
        let mut g = IMPORTS.lock().unwrap_or_else(|e| e.into_inner());
        let Some(k) = g.iter().position(|(m, _)| m.0 == self.0 .0) else {
            return;
        };
        g[k].1
            .retain(|w| w.upgrade().is_some_and(|c| !std::ptr::eq(&*c, cache)));
        if g[k].1.is_empty() {
            g.swap_remove(k);
            drop(g);
            if let Some(stop) = self.ops().stop {
                // SAFETY: the consumer's callback with its own monitor.
                unsafe { stop(self.0 .0) };
            }
        }
    }
}

/// `import_ops->notify`: the consumer says `[addr, addr+len)` was unmapped or freed.
unsafe extern "C" fn notify(monitor: *mut FidMemMonitor, addr: *const c_void, len: usize) {
    // No panic may cross into C: a failure here only loses this notification.
    let _ = std::panic::catch_unwind(|| {
        let caches: Vec<Arc<MrCache>> = {
            let g = IMPORTS.lock().unwrap_or_else(|e| e.into_inner());
            g.iter()
                .filter(|(m, _)| m.0 == monitor)
                .flat_map(|(_, v)| v.iter().filter_map(Weak::upgrade))
                .collect()
        };
        for c in caches {
            c.invalidate(addr as usize, len);
        }
    });
}

/// `fi_import_fid(&domain->fid, &monitor->fid, 0)` (the domain's `fi_ops.bind`): a
/// `fid_mem_monitor` becomes the monitor of the domain's registration cache. `-FI_EBUSY` if the
/// domain already imported one or holds registrations in use; `-FI_EINVAL` for a short or
/// incomplete `export_ops`; other classes are `-FI_ENOSYS`.
pub unsafe extern "C" fn domain_bind(fid: *mut sys::fid, bfid: *mut sys::fid, flags: u64) -> c_int {
    crate::util::ffi(|| {
        // SAFETY: the consumer passes one of our domains (checked by class).
        let d = unsafe { crate::domain::DomainObj::from_fid(fid) }?;
        crate::util::check(!bfid.is_null())?;
        // SAFETY: a non-NULL fid of the consumer; its class says what it is.
        if unsafe { (*bfid).fclass } != sys::FI_CLASS_MEM_MONITOR as usize {
            return Err(fi::ENOSYS);
        }
        if flags != 0 {
            return Err(fi::EBADFLAGS);
        }
        let m = bfid.cast::<FidMemMonitor>();
        // SAFETY: class FI_CLASS_MEM_MONITOR: a `struct fid_mem_monitor` of the consumer.
        let ops = unsafe { (*m).export_ops };
        crate::util::check(!ops.is_null())?;
        // SAFETY: non-NULL; `size` says how much of it the consumer filled.
        let o = unsafe { &*ops };
        if o.size < std::mem::size_of::<FiOpsMemMonitor>()
            || o.subscribe.is_none()
            || o.unsubscribe.is_none()
            || o.valid.is_none()
        {
            return Err(fi::EINVAL);
        }
        let cache = &d.mr_cache;
        // No lock is held across the consumer's callbacks (they may call notify).
        let first = !IMPORTS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(p, _)| p.0 == m);
        if first {
            if let Some(start) = o.start {
                // SAFETY: the consumer's callback with its own monitor.
                let r = unsafe { start(m) };
                if r != 0 {
                    return Err(r.abs());
                }
            }
        }
        if let Err(e) = cache.import(Imported(SendPtr(m))) {
            if first {
                if let Some(stop) = o.stop {
                    // SAFETY: as above: undo the start.
                    unsafe { stop(m) };
                }
            }
            return Err(e);
        }
        // SAFETY: the provider fills `import_ops` (fi_ext.h); the consumer reads it afterwards.
        unsafe { (*m).import_ops = (&NOTIFY_OPS as *const FiOpsMemNotify).cast_mut() };
        let mut g = IMPORTS.lock().unwrap_or_else(|e| e.into_inner());
        match g.iter_mut().find(|(p, _)| p.0 == m) {
            Some((_, v)) => v.push(Arc::downgrade(cache)),
            None => g.push((SendPtr(m), vec![Arc::downgrade(cache)])),
        }
        Ok(0)
    })
}

// ---------------------------------------------------------------------------------------------
// The default monitor: userfaultfd
// ---------------------------------------------------------------------------------------------

// userfaultfd ABI (linux/userfaultfd.h): the part the driver also needs is in `vfabric::uffd`.
use vfabric::uffd::{
    UffdioApi, UffdioRange, UffdioRegister, UFFDIO_API, UFFDIO_REGISTER, UFFDIO_REGISTER_MODE_WP,
    UFFDIO_UNREGISTER, UFFD_API,
};
const UFFD_USER_MODE_ONLY: c_int = 1;
const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// Lets shmem (the memfd pages `Domain::share_raw` moved buffers onto) be registered in
/// write-protect mode.
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_EVENT_UNMAP: u8 = 0x16;
/// `sizeof(struct uffd_msg)`.
const MSG_LEN: usize = 32;

/// A userfaultfd with the API handshake done for `features` (0: ask which are supported).
fn uffd_open(features: u64) -> std::io::Result<(File, u64)> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // User-mode-only works without privilege (vm.unprivileged_userfaultfd = 0); events are
    // delivered either way, and no fault is ever wanted.
    // SAFETY: userfaultfd(2) takes flags only and returns a new fd or -1.
    let mut fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY) };
    if fd < 0 {
        // SAFETY: as above (kernels before 5.11 do not know UFFD_USER_MODE_ONLY).
        fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    }
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by userfaultfd and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd as c_int) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes the `uffdio_api` struct we pass.
    if unsafe { libc::ioctl(file.as_raw_fd(), UFFDIO_API, &mut api) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((file, api.features))
}

/// Page-aligned `[start, end)` around `[addr, addr+len)`.
fn pages(addr: usize, len: usize) -> (usize, usize) {
    // SAFETY: sysconf has no memory side effects.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let start = addr & !(ps - 1);
    let end = addr.saturating_add(len.max(1)).saturating_add(ps - 1) & !(ps - 1);
    (start, end)
}

/// The process-wide userfaultfd monitor (running while some cache uses it).
pub struct Uffd {
    file: File,
    /// Held while events are read and processed (see the module docs).
    drain: Mutex<()>,
    /// Subscribed page ranges `[start, end)`, one per cached entry (repeats allowed): a range
    /// is unregistered only where no other subscription covers it.
    subs: Mutex<Vec<(usize, usize)>>,
    /// Caches fed by this monitor.
    caches: Mutex<Vec<Weak<MrCache>>>,
    /// Wakes the thread to stop.
    stop: OwnedFd,
}

struct Running {
    uffd: Arc<Uffd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

static UFFD: Mutex<Option<Running>> = Mutex::new(None);

impl Uffd {
    /// Start using the monitor for `cache` (starting it if it does not run).
    pub fn attach(cache: &Arc<MrCache>) -> std::io::Result<Arc<Uffd>> {
        let mut g = UFFD.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = g.as_ref() {
            r.uffd.caches.lock().unwrap().push(Arc::downgrade(cache));
            return Ok(r.uffd.clone());
        }
        let (_, supported) = uffd_open(0)?;
        let want = UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP;
        if supported & want != want {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "userfaultfd without UNMAP/REMAP events",
            ));
        }
        let (file, _) = uffd_open(want | (supported & UFFD_FEATURE_WP_HUGETLBFS_SHMEM))?;
        // SAFETY: eventfd(2) takes flags only and returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let uffd = Arc::new(Uffd {
            file,
            drain: Mutex::new(()),
            subs: Mutex::new(Vec::new()),
            caches: Mutex::new(vec![Arc::downgrade(cache)]),
            // SAFETY: `efd` was just returned by eventfd and is owned by nobody else.
            stop: unsafe { OwnedFd::from_raw_fd(efd) },
        });
        let u = uffd.clone();
        let thread = std::thread::Builder::new()
            .name("vfabric-uffd".into())
            .spawn(move || u.run())?;
        *g = Some(Running {
            uffd: uffd.clone(),
            thread: Some(thread),
        });
        Ok(uffd)
    }

    /// `cache` stops using the monitor; the last user stops it (closing the userfaultfd drops
    /// every registration).
    pub fn detach(cache: &MrCache) {
        let mut g = UFFD.lock().unwrap_or_else(|e| e.into_inner());
        let Some(r) = g.as_mut() else { return };
        let empty = {
            let mut c = r.uffd.caches.lock().unwrap();
            c.retain(|w| w.upgrade().is_some_and(|x| !std::ptr::eq(&*x, cache)));
            c.is_empty()
        };
        if !empty {
            return;
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one` to our eventfd.
        unsafe { libc::write(r.uffd.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if let Some(t) = r.thread.take() {
            let _ = t.join();
        }
        *g = None;
    }

    fn run(&self) {
        loop {
            let mut p = [
                libc::pollfd {
                    fd: self.file.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `p` holds two valid pollfds.
            let n = unsafe { libc::poll(p.as_mut_ptr(), 2, -1) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if p[1].revents != 0 {
                // Events may still be queued: read them so no unmapping thread stays blocked.
                self.drain();
                return;
            }
            if p[0].revents != 0 {
                self.drain();
            }
        }
    }

    /// Read and process every queued event (under the drain lock, see the module docs).
    pub fn drain(&self) {
        let _g = self.drain.lock().unwrap_or_else(|e| e.into_inner());
        let mut gone = Vec::new();
        let mut buf = [0u8; MSG_LEN * 16];
        loop {
            let n = match (&self.file).read(&mut buf) {
                Ok(n) if n >= MSG_LEN => n,
                _ => break,
            };
            for m in buf[..n].chunks_exact(MSG_LEN) {
                let word =
                    |k: usize| u64::from_ne_bytes(m[8 + 8 * k..16 + 8 * k].try_into().unwrap());
                match m[0] {
                    // arg.remove: start, end.
                    UFFD_EVENT_UNMAP => gone.push((word(0) as usize, word(1) as usize)),
                    // arg.remap: from, to, len; the old range is gone.
                    UFFD_EVENT_REMAP => {
                        gone.push((word(0) as usize, word(0).saturating_add(word(2)) as usize))
                    }
                    _ => {}
                }
            }
        }
        if gone.is_empty() {
            return;
        }
        let caches: Vec<Arc<MrCache>> = self
            .caches
            .lock()
            .unwrap()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for (s, e) in gone {
            // Each invalidated entry unsubscribes (the kernel dropped the unmapped part).
            for c in &caches {
                c.invalidate(s, e.saturating_sub(s));
            }
        }
    }

    /// Watch `[addr, addr+len)`; false if the memory cannot be watched (then it is not cached).
    pub fn subscribe(&self, addr: usize, len: usize) -> bool {
        let (start, end) = pages(addr, len);
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: (end - start) as u64,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        let mut subs = self.subs.lock().unwrap();
        // SAFETY: UFFDIO_REGISTER reads and writes the struct we pass; it changes no memory.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } < 0 {
            crate::util::log(
                sys::fi_log_level_FI_LOG_DEBUG,
                sys::fi_log_subsys_FI_LOG_MR,
                &format!(
                    "userfaultfd cannot watch {start:#x}..{end:#x} ({}): not cached",
                    std::io::Error::last_os_error()
                ),
            );
            return false;
        }
        subs.push((start, end));
        true
    }

    /// Stop watching `[addr, addr+len)` where no other subscription covers it.
    pub fn unsubscribe(&self, addr: usize, len: usize) {
        let (start, end) = pages(addr, len);
        let mut subs = self.subs.lock().unwrap();
        if let Some(k) = subs.iter().position(|&r| r == (start, end)) {
            subs.swap_remove(k);
        }
        // The parts of [start, end) no remaining subscription covers.
        let mut others: Vec<(usize, usize)> = subs
            .iter()
            .filter(|&&(a, b)| a < end && b > start)
            .copied()
            .collect();
        others.sort_unstable();
        let mut at = start;
        let mut gaps = Vec::new();
        for (a, b) in others {
            if a > at {
                gaps.push((at, a));
            }
            at = at.max(b);
        }
        if at < end {
            gaps.push((at, end));
        }
        for (a, b) in gaps {
            let mut r = UffdioRange {
                start: a as u64,
                len: (b - a) as u64,
            };
            // SAFETY: UFFDIO_UNREGISTER reads the range we pass; unmapped parts just fail.
            unsafe { libc::ioctl(self.file.as_raw_fd(), UFFDIO_UNREGISTER, &mut r) };
        }
    }
}
