// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Provider extensions reached with `fi_open_ops` (declared in `include/fi_vfabric.h`): the
//! domain's vendor ops (the device's vendor attributes and counters). The structs here mirror
//! the header's field for field.

use std::ffi::{c_char, c_int, c_void, CStr};

use vfabric::{fi, CapValue};

use crate::domain::DomainObj;
use crate::sys;
use crate::util::{check, ffi_fns, FidObject, OrErrno, Res};

/// `FI_VFABRIC_DOMAIN_OPS_V1`.
const DOMAIN_OPS_V1: &CStr = c"fi_vfabric_domain_ops_v1";

/// `struct fi_vfabric_attr`.
#[repr(C)]
pub struct VendorAttr {
    vendor: u32,
    key: u16,
    kind: u16,
    name: [c_char; 32],
    value: u64,
    text: [c_char; 128],
}

/// `struct fi_vfabric_counters`: the driver's `DeviceCounters` has the same layout.
type Counters = vfabric::DeviceCounters;

/// `struct fi_vfabric_domain_ops_v1`.
#[repr(C)]
pub struct DomainOpsV1 {
    size: usize,
    vendor_attrs: unsafe extern "C" fn(*mut sys::fid_domain, *mut VendorAttr, *mut usize) -> c_int,
    counters: unsafe extern "C" fn(*mut sys::fid_domain, *mut Counters) -> c_int,
}

static DOMAIN_OPS: DomainOpsV1 = DomainOpsV1 {
    size: std::mem::size_of::<DomainOpsV1>(),
    vendor_attrs,
    counters,
};

/// The body of an `fi_open_ops` entry point: `fid` must be one of our objects of type `T`,
/// and `name` the one versioned name `want`; then `*ops` = `table`. Another name is
/// `-FI_ENOSYS` (fi_open_ops(3)).
///
/// # Safety
/// `fid` is NULL or a valid fid, `name` NULL or a NUL-terminated string, `ops` NULL or
/// writable for one pointer.
pub unsafe fn open_ops<T: FidObject, O>(
    fid: *mut sys::fid,
    name: *const c_char,
    ops: *mut *mut c_void,
    want: &CStr,
    table: &'static O,
) -> Res<c_int> {
    // SAFETY: the consumer passes one of our objects (checked by class).
    unsafe { T::from_fid(fid) }?;
    check(!name.is_null() && !ops.is_null())?;
    // SAFETY: a NUL-terminated name per the caller's contract.
    if unsafe { CStr::from_ptr(name) } != want {
        return Err(fi::ENOSYS);
    }
    // SAFETY: `ops` is writable (checked non-NULL); the table is static and never written.
    unsafe { *ops = (table as *const O).cast_mut().cast() };
    Ok(0)
}

/// Copy `s` into a fixed C string field (truncated, always NUL-terminated).
fn fill(dst: &mut [c_char], s: &str) {
    let n = s.len().min(dst.len() - 1);
    for (d, b) in dst.iter_mut().zip(&s.as_bytes()[..n]) {
        *d = *b as c_char;
    }
    dst[n] = 0;
}

ffi_fns! {
    /// `fi_open_ops` on a domain.
    pub fn domain_ops_open(
        fid: *mut sys::fid, name: *const c_char, _flags: u64, ops: *mut *mut c_void,
        _context: *mut c_void,
    ) -> c_int {
        // SAFETY: libfabric's fi_open_ops arguments, as `open_ops` requires.
        if let Some(r) = unsafe { crate::mr_cache::open_ops(fid, name, ops) } {
            return r;
        }
        // SAFETY: as above.
        unsafe { open_ops::<DomainObj, _>(fid, name, ops, DOMAIN_OPS_V1, &DOMAIN_OPS) }
    }

    fn vendor_attrs(domain: *mut sys::fid_domain, attrs: *mut VendorAttr, count: *mut usize) -> c_int {
        // SAFETY: the consumer passes one of our domains (checked by class).
        let d = unsafe { DomainObj::from_fid(domain) }?;
        check(!count.is_null())?;
        let list = d.dom.vendor_attrs().or_errno(sys::fi_log_subsys_FI_LOG_DOMAIN)?;
        // SAFETY: `count` is readable and writable (checked non-NULL).
        let room = unsafe { std::mem::replace(&mut *count, list.len()) };
        if list.len() > room || (attrs.is_null() && !list.is_empty()) {
            return Err(fi::ETOOSMALL);
        }
        for (i, e) in list.iter().enumerate() {
            let mut a = VendorAttr {
                vendor: e.vendor,
                key: e.key,
                kind: 0,
                name: [0; 32],
                value: 0,
                text: [0; 128],
            };
            fill(&mut a.name, &e.name);
            match &e.value {
                CapValue::U64(v) => a.value = *v,
                CapValue::Bool(b) => (a.kind, a.value) = (1, u64::from(*b)),
                CapValue::Str(s) => {
                    a.kind = 2;
                    fill(&mut a.text, s);
                }
                CapValue::Bytes(b) => {
                    a.kind = 3;
                    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
                    fill(&mut a.text, &hex);
                }
            }
            // SAFETY: `attrs` has room for `room` >= list.len() entries (the caller's count).
            unsafe { attrs.add(i).write(a) };
        }
        Ok(0)
    }

    fn counters(domain: *mut sys::fid_domain, out: *mut Counters) -> c_int {
        // SAFETY: the consumer passes one of our domains (checked by class).
        let d = unsafe { DomainObj::from_fid(domain) }?;
        check(!out.is_null())?;
        let c = d.dom.device_counters().or_errno(sys::fi_log_subsys_FI_LOG_DOMAIN)?;
        // SAFETY: `out` is writable for one struct (checked non-NULL).
        unsafe { out.write(c) };
        Ok(0)
    }
}

ffi_fns! {
    /// `fi_set_ops` on a domain: `FI_SET_OPS_HMEM_OVERRIDE` installs the consumer's HMEM copy
    /// functions (both required; `size` at least libfabric 1.17's struct), which memory
    /// registered afterwards with a non-system iface uses. Another name is `-FI_ENOSYS`.
    pub fn domain_ops_set(fid: *mut sys::fid, name: *const c_char, flags: u64, ops: *mut c_void, _context: *mut c_void) -> c_int {
        // SAFETY: the consumer passes one of our domains (checked by class).
        let d = unsafe { DomainObj::from_fid(fid) }?;
        check(!name.is_null())?;
        // SAFETY: a NUL-terminated name per fi_set_ops' contract.
        if unsafe { CStr::from_ptr(name) }.to_bytes_with_nul() != sys::FI_SET_OPS_HMEM_OVERRIDE {
            return Err(fi::ENOSYS);
        }
        if flags != 0 {
            return Err(fi::EBADFLAGS);
        }
        let o = ops.cast::<sys::fi_hmem_override_ops>();
        check(!o.is_null())?;
        // SAFETY: the table starts with its size; the rest is read only once the size says
        // the consumer's struct holds it.
        let size = unsafe { o.cast::<usize>().read_unaligned() };
        if size < std::mem::size_of::<sys::fi_hmem_override_ops>() {
            let want = std::mem::size_of::<sys::fi_hmem_override_ops>();
            crate::util::warn(
                sys::fi_log_subsys_FI_LOG_DOMAIN,
                &format!("fi_set_ops(hmem_override_ops): size {size}, want at least {want}"),
            );
            return Err(fi::EINVAL);
        }
        // SAFETY: as above (size checked).
        let c = crate::hmem::COps::new(unsafe { &o.read_unaligned() })?;
        d.dom.set_hmem_copy(Some(std::sync::Arc::new(c)));
        Ok(0)
    }
}
