// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Provider extensions reached with `fi_open_ops` (declared in `include/fi_vfabric.h`): the
//! domain's vendor ops (the device's vendor attributes and counters). The structs here mirror
//! the header's field for field.

use std::ffi::{c_char, c_int, c_void, CStr};

use vfabric::{fi, CapValue};

use crate::domain::DomainObj;
use crate::sys;
use crate::util::{errno_of, guard, obj};

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

/// The body of an `fi_open_ops` entry point: `fid` must be one of our objects of class
/// `class` (type `T`), and `name` the one versioned name `want`; then `*ops` = `table`.
/// Another name is `-FI_ENOSYS` (fi_open_ops(3)).
///
/// # Safety
/// `fid` is NULL or a valid fid, `name` NULL or a NUL-terminated string, `ops` NULL or
/// writable for one pointer.
pub unsafe fn open_ops<T, O>(
    fid: *mut sys::fid,
    class: u32,
    name: *const c_char,
    ops: *mut *mut c_void,
    want: &CStr,
    table: &'static O,
) -> c_int {
    guard(|| {
        // SAFETY: the consumer passes one of our objects (checked by class).
        if let Err(e) = unsafe { obj::<T>(fid, class) } {
            return -e;
        }
        if name.is_null() || ops.is_null() {
            return -fi::EINVAL;
        }
        // SAFETY: a NUL-terminated name per the caller's contract.
        if unsafe { CStr::from_ptr(name) } != want {
            return -fi::ENOSYS;
        }
        // SAFETY: `ops` is writable (checked non-NULL); the table is static and never written.
        unsafe { *ops = (table as *const O).cast_mut().cast() };
        0
    })
}

/// `fi_open_ops` on a domain.
pub unsafe extern "C" fn domain_ops_open(
    fid: *mut sys::fid,
    name: *const c_char,
    _flags: u64,
    ops: *mut *mut c_void,
    _context: *mut c_void,
) -> c_int {
    // SAFETY: libfabric's fi_open_ops arguments, as `open_ops` requires.
    if let Some(r) = unsafe { crate::mr_cache::open_ops(fid, name, ops) } {
        return r;
    }
    // SAFETY: as above.
    unsafe {
        open_ops::<DomainObj, _>(
            fid,
            sys::FI_CLASS_DOMAIN,
            name,
            ops,
            DOMAIN_OPS_V1,
            &DOMAIN_OPS,
        )
    }
}

/// Copy `s` into a fixed C string field (truncated, always NUL-terminated).
fn fill(dst: &mut [c_char], s: &str) {
    let n = s.len().min(dst.len() - 1);
    for (d, b) in dst.iter_mut().zip(&s.as_bytes()[..n]) {
        *d = *b as c_char;
    }
    dst[n] = 0;
}

unsafe extern "C" fn vendor_attrs(
    domain: *mut sys::fid_domain,
    attrs: *mut VendorAttr,
    count: *mut usize,
) -> c_int {
    guard(|| {
        // SAFETY: the consumer passes one of our domains (checked by class).
        let d = match unsafe { obj::<DomainObj>(domain.cast(), sys::FI_CLASS_DOMAIN) } {
            Ok(d) => d,
            Err(e) => return -e,
        };
        if count.is_null() {
            return -fi::EINVAL;
        }
        let list = match d.dom.vendor_attrs() {
            Ok(l) => l,
            Err(e) => return -errno_of(&e, sys::fi_log_subsys_FI_LOG_DOMAIN),
        };
        // SAFETY: `count` is readable and writable (checked non-NULL).
        let room = unsafe { *count };
        // SAFETY: as above.
        unsafe { *count = list.len() };
        if list.len() > room || (attrs.is_null() && !list.is_empty()) {
            return -fi::ETOOSMALL;
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
                CapValue::Bool(b) => {
                    a.kind = 1;
                    a.value = u64::from(*b);
                }
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
        0
    })
}

unsafe extern "C" fn counters(domain: *mut sys::fid_domain, out: *mut Counters) -> c_int {
    guard(|| {
        // SAFETY: the consumer passes one of our domains (checked by class).
        let d = match unsafe { obj::<DomainObj>(domain.cast(), sys::FI_CLASS_DOMAIN) } {
            Ok(d) => d,
            Err(e) => return -e,
        };
        if out.is_null() {
            return -fi::EINVAL;
        }
        match d.dom.device_counters() {
            Ok(c) => {
                // SAFETY: `out` is writable for one struct (checked non-NULL).
                unsafe { out.write(c) };
                0
            }
            Err(e) => -errno_of(&e, sys::fi_log_subsys_FI_LOG_DOMAIN),
        }
    })
}
