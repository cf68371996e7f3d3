// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The registration cache of a domain.
//!
//! What a registration costs at the driver level: a region with remote access is an MR_REG
//! round trip to the device (and MR_DEREG when it goes); a large local registration under
//! FI_MR_LOCAL shares the buffer's pages with the device (`Domain::share_raw`: the pages move
//! onto a memfd the device maps, the first time), which is what lets sends and receives on it
//! skip the bounce buffers. The cache keeps those registrations past `fi_close` of the MR, so
//! that an application registering the same buffers again and again pays once:
//!
//! * A local registration (no remote access) hits an entry with the same access flags whose
//!   range contains it. A registration with remote access (provider keys only: a cached
//!   application key would stay taken) hits only an entry of the same range and access: a
//!   larger region would let peers reach bytes the application did not register.
//! * Entries are reference counted (an `fi_mr_reg` hit and the MR it returns share one
//!   registration); unused entries are evicted least recently used first when an insertion
//!   would pass `FI_VFABRIC_MR_CACHE_MAX_COUNT` entries or `FI_VFABRIC_MR_CACHE_MAX_SIZE`
//!   bytes. When that cannot be met (every entry in use), the new registration is not cached.
//! * An entry lives only while a monitor (`monitor.rs`) watches its memory: the provider's
//!   userfaultfd monitor by default, or the consumer's imported `fid_mem_monitor`. Memory that
//!   cannot be watched is registered uncached. `FI_VFABRIC_MR_CACHE_MONITOR=disabled` (and a
//!   count or size of 0) turns the cache off unless the consumer imports a monitor.
//! * With or without the cache, a local share ends with its registration (evicted,
//!   invalidated, or closed uncached): the driver stops serving the pages zero-copy
//!   (`Domain::unshare_raw`), so a new mapping at the same address never reaches the device's
//!   view of the old pages.
//!
//! Counters are read through `fi_open_ops(&domain->fid, FI_VFABRIC_MR_CACHE_OPS_V1, ...)`
//! (`include/fi_vfabric.h`).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use vfabric::fi;

use crate::domain::DomainObj;
use crate::monitor::{Imported, Uffd};
use crate::sys;
use crate::util::{errno_of, guard, obj};

/// Local registrations (FI_MR_LOCAL) from this size up are shared with the device: below it a
/// bounce copy costs less than moving the pages.
pub const SHARE_LOCAL_MIN: usize = 64 << 10;

/// Default of `FI_VFABRIC_MR_CACHE_MAX_COUNT`.
const DEFAULT_MAX_COUNT: usize = 1024;
/// Default of `FI_VFABRIC_MR_CACHE_MAX_SIZE` (bytes).
const DEFAULT_MAX_SIZE: usize = 1 << 30;

/// One registration with the device.
pub struct Reg {
    pub addr: usize,
    pub len: usize,
    access: u64,
    requested: Option<u64>,
    /// The device registration of a region with remote access.
    pub region: Option<vfabric::MemoryRegion>,
    /// The session whose device was given the pages (local share), to take them back.
    share: Option<vfabric::Domain>,
}

impl Drop for Reg {
    fn drop(&mut self) {
        if let Some(d) = &self.share {
            d.unshare_raw(self.addr as *const u8, self.len);
        }
    }
}

/// The registration an MR stands on; given back to its cache when the MR closes.
pub struct Handle {
    reg: Arc<Reg>,
    cache: Weak<MrCache>,
}

impl Handle {
    /// The device key of a region with remote access.
    pub fn key(&self) -> Option<u64> {
        self.reg.region.as_ref().map(|r| r.key())
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Some(c) = self.cache.upgrade() {
            c.touch(&self.reg);
        }
    }
}

enum Mon {
    Uffd(Arc<Uffd>),
    Import(Imported),
}

impl Mon {
    fn subscribe(&self, addr: usize, len: usize) -> bool {
        match self {
            Mon::Uffd(u) => u.subscribe(addr, len),
            Mon::Import(m) => m.subscribe(addr, len),
        }
    }
    fn unsubscribe(&self, addr: usize, len: usize) {
        match self {
            Mon::Uffd(u) => u.unsubscribe(addr, len),
            Mon::Import(m) => m.unsubscribe(addr, len),
        }
    }
}

/// Which monitor the cache uses.
enum MonState {
    /// The default monitor, not started yet (started at the first cacheable registration).
    Default,
    /// No monitor: nothing is cached.
    Off,
    On(Arc<Mon>),
}

struct Entry {
    reg: Arc<Reg>,
    /// The monitor that watches it (unsubscribed there when the entry goes).
    mon: Arc<Mon>,
    last_use: u64,
}

#[derive(Default)]
struct State {
    entries: Vec<Entry>,
    bytes: usize,
    tick: u64,
}

/// `struct fi_vfabric_mr_cache_stats`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct Stats {
    pub hits: u64,
    pub misses: u64,
    pub entries: u64,
    pub bytes: u64,
    pub in_use: u64,
    pub evictions: u64,
    pub invalidations: u64,
    pub uncached: u64,
    pub max_count: u64,
    pub max_size: u64,
}

/// A domain's registration cache.
pub struct MrCache {
    dom: vfabric::Domain,
    max_count: usize,
    max_size: usize,
    state: Mutex<State>,
    mon: RwLock<MonState>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    invalidations: AtomicU64,
    uncached: AtomicU64,
}

impl MrCache {
    /// The cache of a domain on `dom`, configured from the `FI_VFABRIC_MR_CACHE_*` variables.
    pub fn new(dom: vfabric::Domain) -> Arc<Self> {
        let max_count = crate::param_size(c"mr_cache_max_count").unwrap_or(DEFAULT_MAX_COUNT);
        let max_size = crate::param_size(c"mr_cache_max_size").unwrap_or(DEFAULT_MAX_SIZE);
        let mon = match crate::param_str(c"mr_cache_monitor").as_deref() {
            None | Some("userfaultfd") => MonState::Default,
            Some("disabled") => MonState::Off,
            Some(other) => {
                crate::util::warn(
                    sys::fi_log_subsys_FI_LOG_MR,
                    &format!(
                        "FI_VFABRIC_MR_CACHE_MONITOR={other}: not userfaultfd or disabled; \
                         the cache is off"
                    ),
                );
                MonState::Off
            }
        };
        Arc::new(Self {
            dom,
            max_count,
            max_size,
            state: Mutex::new(State::default()),
            mon: RwLock::new(mon),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            uncached: AtomicU64::new(0),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The monitor to cache with, starting the default one if need be; `None`: do not cache.
    fn monitor(self: &Arc<Self>) -> Option<Arc<Mon>> {
        if self.max_count == 0 || self.max_size == 0 {
            return None;
        }
        {
            let g = self.mon.read().unwrap_or_else(|e| e.into_inner());
            match &*g {
                MonState::On(m) => return Some(m.clone()),
                MonState::Off => return None,
                MonState::Default => {}
            }
        }
        let mut g = self.mon.write().unwrap_or_else(|e| e.into_inner());
        if let MonState::Default = &*g {
            *g = match Uffd::attach(self) {
                Ok(u) => MonState::On(Arc::new(Mon::Uffd(u))),
                Err(e) => {
                    crate::util::warn(
                        sys::fi_log_subsys_FI_LOG_MR,
                        &format!(
                            "registration cache off: its userfaultfd monitor cannot start \
                             ({e}); import a monitor with fi_import_fid to enable it"
                        ),
                    );
                    MonState::Off
                }
            };
        }
        match &*g {
            MonState::On(m) => Some(m.clone()),
            _ => None,
        }
    }

    /// Process the default monitor's pending events (see `monitor.rs`).
    fn drain(&self) {
        let g = self.mon.read().unwrap_or_else(|e| e.into_inner());
        if let MonState::On(m) = &*g {
            if let Mon::Uffd(u) = &**m {
                u.drain();
            }
        }
    }

    /// Register `[addr, addr+len)` with `access`: remote access when `remote` carries the
    /// device attributes, else a local share. Reuses a cached registration when one fits.
    pub fn register(
        self: &Arc<Self>,
        addr: usize,
        len: usize,
        access: u64,
        remote: Option<vfabric::MrAttr>,
    ) -> Result<Handle, c_int> {
        let requested = remote.as_ref().and_then(|a| a.requested_key);
        let is_remote = remote.is_some();
        self.drain();
        loop {
            let found = {
                let mut st = self.state();
                st.tick += 1;
                let tick = st.tick;
                let hit = st.entries.iter_mut().find(|e| {
                    let r = &e.reg;
                    r.access == access
                        && if is_remote {
                            r.region.is_some()
                                && r.addr == addr
                                && r.len == len
                                && r.requested == requested
                        } else {
                            r.region.is_none() && addr >= r.addr && addr + len <= r.addr + r.len
                        }
                });
                hit.map(|e| {
                    e.last_use = tick;
                    (e.reg.clone(), e.mon.clone())
                })
            };
            let Some((reg, mon)) = found else { break };
            let valid = match &*mon {
                Mon::Import(m) => m.valid(reg.addr, reg.len),
                Mon::Uffd(_) => true,
            };
            if valid {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Handle {
                    reg,
                    cache: Arc::downgrade(self),
                });
            }
            // The consumer's monitor says the memory changed: drop the entry, look again.
            let n = self.remove_where(|r| Arc::ptr_eq(r, &reg), true);
            self.invalidations.fetch_add(n as u64, Ordering::Relaxed);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let reg = Arc::new(self.do_register(addr, len, access, requested, remote)?);
        let handle = Handle {
            reg: reg.clone(),
            cache: Arc::downgrade(self),
        };
        let Some(mon) = self.monitor() else {
            self.uncached.fetch_add(1, Ordering::Relaxed);
            return Ok(handle);
        };
        if !mon.subscribe(addr, len) {
            self.uncached.fetch_add(1, Ordering::Relaxed);
            return Ok(handle);
        }
        let (inserted, evicted) = {
            let mut st = self.state();
            let mut evicted = Vec::new();
            while st.entries.len() + 1 > self.max_count || st.bytes + len > self.max_size {
                // The least recently used entry no MR holds.
                let Some(k) = st
                    .entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| Arc::strong_count(&e.reg) == 1)
                    .min_by_key(|(_, e)| e.last_use)
                    .map(|(k, _)| k)
                else {
                    break;
                };
                let e = st.entries.swap_remove(k);
                st.bytes -= e.reg.len;
                evicted.push(e);
            }
            let fits = st.entries.len() < self.max_count && st.bytes + len <= self.max_size;
            if fits {
                st.tick += 1;
                let last_use = st.tick;
                st.bytes += len;
                st.entries.push(Entry {
                    reg,
                    mon: mon.clone(),
                    last_use,
                });
            }
            (fits, evicted)
        };
        self.evictions
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
        for e in evicted {
            e.mon.unsubscribe(e.reg.addr, e.reg.len);
        }
        if !inserted {
            mon.unsubscribe(addr, len);
            self.uncached.fetch_add(1, Ordering::Relaxed);
        }
        Ok(handle)
    }

    fn do_register(
        &self,
        addr: usize,
        len: usize,
        access: u64,
        requested: Option<u64>,
        remote: Option<vfabric::MrAttr>,
    ) -> Result<Reg, c_int> {
        let mut reg = Reg {
            addr,
            len,
            access,
            requested,
            region: None,
            share: None,
        };
        match remote {
            Some(attr) => {
                // SAFETY: libfabric's registration contract: the buffer stays valid while
                // registered (the device reaches it by cross-memory attach); a cached region
                // outlives the MR only while its monitor watches the memory.
                match unsafe {
                    self.dom
                        .register_raw_iov(&[(addr as *const u8, len)], &attr)
                } {
                    Ok(r) => reg.region = Some(r),
                    Err(e) => return Err(errno_of(&e, sys::fi_log_subsys_FI_LOG_MR)),
                }
            }
            None => match self.dom.share_raw(addr as *const u8, len) {
                Ok(()) => reg.share = Some(self.dom.clone()),
                // Memory that cannot be shared (file-backed, stack, ...) keeps working through
                // the bounce buffers.
                Err(e) => crate::util::log(
                    sys::fi_log_level_FI_LOG_DEBUG,
                    sys::fi_log_subsys_FI_LOG_MR,
                    &format!("local registration stays bounced: {e}"),
                ),
            },
        }
        Ok(reg)
    }

    /// An MR of `reg` closed: it is the most recently used.
    fn touch(&self, reg: &Arc<Reg>) {
        let mut st = self.state();
        st.tick += 1;
        let tick = st.tick;
        if let Some(e) = st.entries.iter_mut().find(|e| Arc::ptr_eq(&e.reg, reg)) {
            e.last_use = tick;
        }
    }

    /// Take entries matching `pred` out of the cache (only unused ones unless `in_use`); they
    /// are unsubscribed, and their registrations go with their last MR. Returns how many.
    fn remove_where(&self, pred: impl Fn(&Arc<Reg>) -> bool, in_use: bool) -> usize {
        let gone: Vec<Entry> = {
            let mut st = self.state();
            let mut gone = Vec::new();
            let mut k = 0;
            while k < st.entries.len() {
                let e = &st.entries[k];
                if pred(&e.reg) && (in_use || Arc::strong_count(&e.reg) == 1) {
                    let e = st.entries.swap_remove(k);
                    st.bytes -= e.reg.len;
                    gone.push(e);
                } else {
                    k += 1;
                }
            }
            gone
        };
        for e in &gone {
            e.mon.unsubscribe(e.reg.addr, e.reg.len);
        }
        gone.len()
    }

    /// The memory `[addr, addr+len)` was unmapped or freed: drop every entry overlapping it.
    pub fn invalidate(&self, addr: usize, len: usize) {
        let end = addr.saturating_add(len);
        let n = self.remove_where(|r| r.addr < end && addr < r.addr + r.len, true);
        self.invalidations.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Drop every unused entry.
    pub fn flush(&self) -> usize {
        self.remove_where(|_| true, false)
    }

    /// Use the consumer's monitor from now on (`monitor::domain_bind`); `FI_EBUSY` if one was
    /// imported already or registrations of the current monitor are in use.
    pub fn import(&self, m: Imported) -> Result<(), c_int> {
        let mut g = self.mon.write().unwrap_or_else(|e| e.into_inner());
        if let MonState::On(cur) = &*g {
            if let Mon::Import(_) = &**cur {
                return Err(fi::EBUSY);
            }
        }
        self.flush();
        if !self.state().entries.is_empty() {
            return Err(fi::EBUSY);
        }
        if let MonState::On(cur) = &*g {
            if let Mon::Uffd(_) = &**cur {
                Uffd::detach(self);
            }
        }
        *g = MonState::On(Arc::new(Mon::Import(m)));
        Ok(())
    }

    /// The domain closes: drop every entry and let go of the monitor.
    pub fn close(&self) {
        self.remove_where(|_| true, true);
        let mut g = self.mon.write().unwrap_or_else(|e| e.into_inner());
        if let MonState::On(m) = std::mem::replace(&mut *g, MonState::Off) {
            match &*m {
                Mon::Uffd(_) => Uffd::detach(self),
                Mon::Import(i) => i.release(self),
            }
        }
    }

    pub fn stats(&self) -> Stats {
        let st = self.state();
        Stats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: st.entries.len() as u64,
            bytes: st.bytes as u64,
            in_use: st
                .entries
                .iter()
                .filter(|e| Arc::strong_count(&e.reg) > 1)
                .count() as u64,
            evictions: self.evictions.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            uncached: self.uncached.load(Ordering::Relaxed),
            max_count: self.max_count as u64,
            max_size: self.max_size as u64,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// fi_open_ops(FI_VFABRIC_MR_CACHE_OPS_V1)
// ---------------------------------------------------------------------------------------------

/// `FI_VFABRIC_MR_CACHE_OPS_V1`.
pub const MR_CACHE_OPS_V1: &CStr = c"fi_vfabric_mr_cache_ops_v1";

/// `struct fi_vfabric_mr_cache_ops_v1`.
#[repr(C)]
pub struct MrCacheOpsV1 {
    size: usize,
    stats: unsafe extern "C" fn(*mut sys::fid_domain, *mut Stats) -> c_int,
    flush: unsafe extern "C" fn(*mut sys::fid_domain) -> isize,
}

static MR_CACHE_OPS: MrCacheOpsV1 = MrCacheOpsV1 {
    size: std::mem::size_of::<MrCacheOpsV1>(),
    stats: ops_stats,
    flush: ops_flush,
};

/// `fi_open_ops` on a domain with `FI_VFABRIC_MR_CACHE_OPS_V1`: `None` for other names.
///
/// # Safety
/// As `crate::ext::open_ops`.
pub unsafe fn open_ops(
    fid: *mut sys::fid,
    name: *const c_char,
    ops: *mut *mut c_void,
) -> Option<c_int> {
    // SAFETY: `name` NULL or NUL-terminated, per the caller's contract.
    if name.is_null() || unsafe { CStr::from_ptr(name) } != MR_CACHE_OPS_V1 {
        return None;
    }
    // SAFETY: as the caller's contract.
    Some(unsafe {
        crate::ext::open_ops::<DomainObj, _>(
            fid,
            sys::FI_CLASS_DOMAIN,
            name,
            ops,
            MR_CACHE_OPS_V1,
            &MR_CACHE_OPS,
        )
    })
}

unsafe extern "C" fn ops_stats(domain: *mut sys::fid_domain, out: *mut Stats) -> c_int {
    guard(|| {
        // SAFETY: the consumer passes one of our domains (checked by class).
        let d = match unsafe { obj::<DomainObj>(domain.cast(), sys::FI_CLASS_DOMAIN) } {
            Ok(d) => d,
            Err(e) => return -e,
        };
        if out.is_null() {
            return -fi::EINVAL;
        }
        d.mr_cache.drain();
        // SAFETY: `out` is writable for one struct (checked non-NULL).
        unsafe { out.write(d.mr_cache.stats()) };
        0
    })
}

unsafe extern "C" fn ops_flush(domain: *mut sys::fid_domain) -> isize {
    guard(|| {
        // SAFETY: the consumer passes one of our domains (checked by class).
        match unsafe { obj::<DomainObj>(domain.cast(), sys::FI_CLASS_DOMAIN) } {
            Ok(d) => {
                d.mr_cache.drain();
                d.mr_cache.flush() as isize
            }
            Err(e) => -(e as isize),
        }
    })
}
