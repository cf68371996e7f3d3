// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Counters (`fid_cntr`) over `vfabric::rma::Counter`.

use std::ffi::{c_int, c_void};
use std::time::Duration;

use vfabric::fi;

use crate::domain::DomainObj;
use crate::sys;
use crate::util::{
    errno_of, ffi_fns, fid_object, ops_ptr, ops_table, FidObject, OrErrno, ParentRef, Refs, Res,
};

/// `fid_cntr`.
#[repr(C)]
pub struct CntrObj {
    pub fid: sys::fid_cntr,
    _domain: ParentRef,
    pub cntr: vfabric::rma::Counter,
    wait: bool,
    pub refs: Refs,
}

fid_object!(CntrObj, FI_CLASS_CNTR, refs: refs);

ops_table!(CNTR_OPS: fi_ops_cntr [read, readerr, add, set, wait, adderr, seterr]);

/// `fi_cntr_open`.
pub unsafe extern "C" fn cntr_open(
    domain: *mut sys::fid_domain,
    attr: *mut sys::fi_cntr_attr,
    cntr: *mut *mut sys::fid_cntr,
    context: *mut c_void,
) -> c_int {
    crate::util::open(domain, attr, cntr, |d: &DomainObj, a| {
        if a.events != sys::fi_cntr_events_FI_CNTR_EVENTS_COMP {
            return Err(fi::ENOSYS);
        }
        let wait = match a.wait_obj {
            sys::fi_wait_obj_FI_WAIT_NONE => false,
            sys::fi_wait_obj_FI_WAIT_UNSPEC
            | sys::fi_wait_obj_FI_WAIT_MUTEX_COND
            | sys::fi_wait_obj_FI_WAIT_YIELD => true,
            _ => return Err(fi::ENOSYS),
        };
        Ok(CntrObj {
            fid: sys::fid_cntr {
                fid: CntrObj::fid(context),
                ops: ops_ptr(&CNTR_OPS),
            },
            cntr: d.dom.cntr_open().or_errno(sys::fi_log_subsys_FI_LOG_CNTR)?,
            // SAFETY: the domain refuses to close while this count is held.
            _domain: unsafe { ParentRef::new(&d.refs) },
            wait,
            refs: Refs::default(),
        })
    })
}

/// The counter behind a `fid_cntr` (`-FI_EINVAL` for a NULL or foreign fid).
fn cntr_of<'a>(c: *mut sys::fid_cntr) -> Res<&'a vfabric::rma::Counter> {
    // SAFETY: consumer passes one of our counters (class checked).
    unsafe { CntrObj::from_fid(c) }.map(|c| &c.cntr)
}

unsafe extern "C" fn read(c: *mut sys::fid_cntr) -> u64 {
    std::panic::catch_unwind(|| cntr_of(c).map_or(0, |c| c.read())).unwrap_or(0)
}

unsafe extern "C" fn readerr(c: *mut sys::fid_cntr) -> u64 {
    std::panic::catch_unwind(|| cntr_of(c).map_or(0, |c| c.readerr())).unwrap_or(0)
}

ffi_fns! {
    fn add(c: *mut sys::fid_cntr, v: u64) -> c_int { cntr_of(c).map(|c| c.add(v)).map(|()| 0) }
    fn set(c: *mut sys::fid_cntr, v: u64) -> c_int { cntr_of(c).map(|c| c.set(v)).map(|()| 0) }
    fn adderr(c: *mut sys::fid_cntr, v: u64) -> c_int { cntr_of(c).map(|c| c.adderr(v)).map(|()| 0) }
    fn seterr(c: *mut sys::fid_cntr, v: u64) -> c_int { cntr_of(c).map(|c| c.seterr(v)).map(|()| 0) }

    fn wait(c: *mut sys::fid_cntr, threshold: u64, timeout: c_int) -> c_int {
        // SAFETY: consumer passes one of our counters (class checked).
        let c = unsafe { CntrObj::from_fid(c) }?;
        if !c.wait {
            return Err(fi::ENOSYS);
        }
        let timeout = (timeout >= 0).then(|| Duration::from_millis(timeout as u64));
        match c.cntr.wait(threshold, timeout) {
            Ok(()) => Ok(0),
            Err(vfabric::Error::Timeout) => Err(fi::ETIMEDOUT),
            Err(e) => Err(errno_of(&e, sys::fi_log_subsys_FI_LOG_CNTR)),
        }
    }
}
