// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Memory regions (`fid_mr`). `fi_mr_reg` and `fi_mr_regv` are normalised into the
//! `fi_mr_regattr` form; [`regattr`] is the one registration body ([`mr_create`] builds the
//! object). Regions with remote access are device registrations; local ones are provider-side
//! records (messaging needs no device registration).

use std::ffi::{c_int, c_void};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use vfabric::fi;

use crate::cntr::CntrObj;
use crate::domain::DomainObj;
use crate::sys;
use crate::util::{
    check, ffi_fns, fid_object, ops_table, slice, FidObject, OrErrno, ParentRef, Res,
};

/// `fid_mr`.
#[repr(C)]
pub struct MrObj {
    pub fid: sys::fid_mr,
    _domain: ParentRef,
    pub addr: usize,
    pub len: usize,
    pub access: u64,
    /// The device registration of a region with remote access.
    pub region: Option<vfabric::MemoryRegion>,
    /// The registration from the domain's cache (crate::mr_cache) the MR stands on.
    cached: Option<crate::mr_cache::Handle>,
    /// Device memory (a non-system iface): reached only through the consumer's copy functions;
    /// the domain that knows its range.
    pub hmem: Option<vfabric::HmemRegion>,
    domain: *const DomainObj,
    /// Counters bound with `fi_mr_bind` (they refuse to close while bound). Declared after
    /// `region` so the registration goes first.
    bound: Mutex<Vec<ParentRef>>,
}

fid_object!(
    MrObj,
    FI_CLASS_MR,
    closing: MrObj::forget_hmem,
    fi_ops {
        bind: mr_bind,
        control: mr_control
    }
);

impl MrObj {
    /// Device memory is no longer known to the domain once its region closes.
    fn forget_hmem(&self) {
        if self.hmem.is_some() {
            // SAFETY: the domain outlives its regions (ParentRef).
            unsafe { &*self.domain }
                .hmem
                .remove_region(self as *const MrObj as usize);
        }
    }
}

ops_table!(pub MR_OPS: fi_ops_mr { reg = mr_reg, regv = mr_regv, regattr = mr_regattr });

/// Build the region of `iov` (`(address, length)` pairs) registered on `d` (device memory if
/// `hmem`).
#[allow(clippy::too_many_arguments)]
pub fn mr_create(
    d: &DomainObj,
    iov: &[(usize, usize)],
    access: u64,
    requested_key: u64,
    flags: u64,
    context: *mut c_void,
    hmem: Option<vfabric::HmemRegion>,
) -> Res<MrObj> {
    if flags & !(fi::RMA_EVENT | fi::RMA_PMEM) != 0 {
        return Err(fi::EBADFLAGS);
    }
    let remote = access & (fi::REMOTE_READ | fi::REMOTE_WRITE) != 0;
    // FI_RMA_EVENT as a registration flag, or in the domain's caps for remote-access regions.
    let rma_event = flags & fi::RMA_EVENT != 0 || (d.rma_event && remote);
    if hmem.is_some() && (remote || flags != 0) {
        // Peers reach a region through the device, which cannot reach device memory.
        crate::util::warn(
            sys::fi_log_subsys_FI_LOG_MR,
            "device memory (FI_HMEM) is registered for local access only: no FI_REMOTE_READ, \
             FI_REMOTE_WRITE, FI_RMA_EVENT or FI_RMA_PMEM",
        );
        return Err(fi::EINVAL);
    }
    let prov_key = d.mr_mode & sys::FI_MR_PROV_KEY as i32 != 0
        || d.mr_mode == sys::fi_mr_mode_FI_MR_BASIC as i32;
    let (addr, len) = iov.first().copied().unwrap_or((0, 0));
    let (key, region, cached) = if remote || rma_event {
        check(!iov.iter().any(|&(p, l)| p == 0 && l > 0))?;
        // FI_RMA_PMEM: the buffer must be a shared mapping of a file, which the device
        // persists (held open until the device has its own handle).
        let backing = if flags & fi::RMA_PMEM != 0 {
            check(iov.len() == 1)?;
            let b = crate::pmem::backing_file(addr, len).map_err(|why| {
                crate::util::warn(
                    sys::fi_log_subsys_FI_LOG_MR,
                    &format!("fi_mr_reg(FI_RMA_PMEM) refused: {why}"),
                );
                fi::EINVAL
            })?;
            Some(b)
        } else {
            None
        };
        let attr = vfabric::MrAttr {
            access,
            requested_key: (!prov_key).then_some(requested_key),
            offset_addressing: d.mr_mode & sys::FI_MR_VIRT_ADDR as i32 == 0
                && d.mr_mode != sys::fi_mr_mode_FI_MR_BASIC as i32,
            rma_event,
            pmem: backing.as_ref().map(|(f, offset)| vfabric::PmemBacking {
                fd: std::os::fd::AsRawFd::as_raw_fd(f),
                offset: *offset,
            }),
        };
        // One plain range with a provider key (no counters, no persistence; a cached
        // application key would stay taken): through the registration cache.
        if iov.len() == 1 && !rma_event && attr.pmem.is_none() && attr.requested_key.is_none() {
            let h = d.mr_cache.register(addr, len, access, Some(attr))?;
            (h.key().unwrap_or(0), None, Some(h))
        } else {
            let segs: Vec<(*const u8, usize)> =
                iov.iter().map(|&(p, l)| (p as *const u8, l)).collect();
            // SAFETY: libfabric's registration contract: the buffers stay valid while
            // registered (the device reaches them by cross-memory attach, see
            // `Domain::register_external`).
            let r = unsafe { d.dom.register_raw_iov(&segs, &attr) }
                .or_errno(sys::fi_log_subsys_FI_LOG_MR)?;
            (r.key(), Some(r), None)
        }
    } else {
        check(iov.len() <= 1)?;
        let key = if prov_key {
            d.next_key.fetch_add(1, Ordering::Relaxed)
        } else {
            requested_key
        };
        // A large local registration under FI_MR_LOCAL: share the buffer with the device so
        // that sends and receives on it skip the bounce buffers (through the registration
        // cache, which also takes the pages back when the registration goes). Never device
        // memory (FI_HMEM).
        let cached = if hmem.is_none()
            && d.mr_mode & sys::FI_MR_LOCAL as i32 != 0
            && len >= crate::mr_cache::SHARE_LOCAL_MIN
            && addr != 0
        {
            Some(d.mr_cache.register(addr, len, access, None)?)
        } else {
            None
        };
        (key, None, cached)
    };
    Ok(MrObj {
        fid: sys::fid_mr {
            fid: MrObj::fid(context),
            mem_desc: std::ptr::null_mut(),
            key,
        },
        // SAFETY: the domain refuses to close while this count is held.
        _domain: unsafe { ParentRef::new(&d.refs) },
        addr,
        len,
        access,
        region,
        cached,
        hmem,
        domain: d,
        bound: Mutex::new(Vec::new()),
    })
}

/// The device memory of a registration with a non-system iface: `-FI_ENOSYS` unless the
/// consumer installed its copy functions (the provider has no device runtime).
fn device_memory(
    d: &DomainObj,
    a: &sys::fi_mr_attr,
    v: &[(usize, usize)],
) -> Res<vfabric::HmemRegion> {
    if !d.dom.has_hmem_copy() {
        crate::util::warn(
            sys::fi_log_subsys_FI_LOG_MR,
            &format!(
                "fi_mr_regattr: iface {} needs the consumer's copy functions \
                 (fi_set_ops(FI_SET_OPS_HMEM_OVERRIDE)): the provider has no device runtime",
                a.iface
            ),
        );
        return Err(fi::ENOSYS);
    }
    // One range (as every local registration).
    check(v.len() <= 1)?;
    let (addr, len) = v.first().copied().unwrap_or((0, 0));
    let iface = vfabric::HmemIface::from_raw(a.iface).ok_or(fi::EINVAL)?;
    d.dom
        .register_hmem(addr as *mut u8, len, iface, crate::hmem::device_of(a))
        .or_errno(sys::fi_log_subsys_FI_LOG_MR)
}

/// `fi_mr_regattr`, the one registration body.
///
/// # Safety
/// `domain` is NULL or a live fid, `attr` NULL or valid, `mr` NULL or writable.
pub unsafe fn regattr(
    domain: *mut sys::fid,
    attr: *const sys::fi_mr_attr,
    flags: u64,
    mr: *mut *mut sys::fid_mr,
) -> Res<c_int> {
    // SAFETY: NULL or the consumer's attribute.
    let a = unsafe { attr.as_ref() }.ok_or(fi::EINVAL)?;
    // SAFETY: `mr_iov` holds `iov_count` entries.
    let v: Vec<(usize, usize)> = unsafe { slice(a.mr_iov, a.iov_count) }?
        .iter()
        .map(|v| (v.iov_base as usize, v.iov_len))
        .collect();
    check(!mr.is_null())?;
    // SAFETY: consumer passes its domain.
    let d = unsafe { DomainObj::from_fid(domain) }?;
    let hmem = if a.iface == sys::fi_hmem_iface_FI_HMEM_SYSTEM {
        None
    } else {
        Some(device_memory(d, a, &v)?)
    };
    let m = mr_create(d, &v, a.access, a.requested_key, flags, a.context, hmem)?;
    let p = m.install(mr)?;
    // SAFETY: `p` is the object just installed; mem_desc points at the MR itself.
    let m = unsafe {
        (*p).fid.mem_desc = p.cast();
        &*p
    };
    if let Some(h) = &m.hmem {
        d.hmem.add_region(p as usize, h.clone());
    }
    Ok(0)
}

ffi_fns! {
    fn mr_regattr(domain: *mut sys::fid, attr: *const sys::fi_mr_attr, flags: u64, mr: *mut *mut sys::fid_mr) -> c_int {
        // SAFETY: the consumer's arguments, per regattr's contract.
        unsafe { regattr(domain, attr, flags, mr) }
    }

    fn mr_regv(
        domain: *mut sys::fid, iov: *const sys::iovec, count: usize, access: u64, offset: u64,
        requested_key: u64, flags: u64, mr: *mut *mut sys::fid_mr, context: *mut c_void,
    ) -> c_int {
        let attr = sys::fi_mr_attr {
            mr_iov: iov,
            iov_count: count,
            access,
            offset,
            requested_key,
            context,
            iface: sys::fi_hmem_iface_FI_HMEM_SYSTEM,
            ..Default::default()
        };
        // SAFETY: the consumer's arguments, per regattr's contract.
        unsafe { regattr(domain, &attr, flags, mr) }
    }

    fn mr_reg(
        domain: *mut sys::fid, buf: *const c_void, len: usize, access: u64, offset: u64,
        requested_key: u64, flags: u64, mr: *mut *mut sys::fid_mr, context: *mut c_void,
    ) -> c_int {
        let iov = sys::iovec { iov_base: buf.cast_mut(), iov_len: len };
        // SAFETY: one entry; the rest per regattr's contract.
        Ok(unsafe { mr_regv(domain, &iov, 1, access, offset, requested_key, flags, mr, context) })
    }

    /// `fi_mr_bind`: a counter counting remote accesses to a region registered with
    /// FI_RMA_EVENT (flags FI_REMOTE_WRITE and/or FI_REMOTE_READ; the device counts both kinds
    /// of access).
    fn mr_bind(fid: *mut sys::fid, bfid: *mut sys::fid, flags: u64) -> c_int {
        // SAFETY: consumer passes one of our MRs.
        let m = unsafe { MrObj::from_fid(fid) }?;
        check(!bfid.is_null())?;
        // SAFETY: non-NULL fid of the consumer; only its class is read.
        check(unsafe { (*bfid).fclass } as u32 == sys::FI_CLASS_CNTR)?;
        if flags & !(fi::REMOTE_READ | fi::REMOTE_WRITE) != 0 {
            return Err(fi::EBADFLAGS);
        }
        // SAFETY: class checked; one of our counters.
        let c = unsafe { CntrObj::from_fid(bfid) }?;
        let region = m.region.as_ref().ok_or(fi::EINVAL)?;
        region.bind_cntr(&c.cntr).or_errno(sys::fi_log_subsys_FI_LOG_MR)?;
        // SAFETY: the counter refuses to close while this count is held.
        let pr = unsafe { ParentRef::new(&c.refs) };
        m.bound.lock().unwrap_or_else(|e| e.into_inner()).push(pr);
        Ok(0)
    }
}

unsafe extern "C" fn mr_control(_fid: *mut sys::fid, cmd: c_int, _arg: *mut c_void) -> c_int {
    if cmd == sys::FI_ENABLE as c_int {
        0
    } else {
        -fi::ENOSYS
    }
}
