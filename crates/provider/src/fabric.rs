// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The fabric object (`fid_fabric`); event queues are in `eq`.

use std::ffi::{c_int, c_void};

use vfabric::fi;

use crate::sys;
use crate::util::{check, ffi_fns, fid_object, ops_ptr, ops_table, slice, FidObject, Refs};

/// `fid_fabric`.
#[repr(C)]
pub struct FabricObj {
    pub fid: sys::fid_fabric,
    pub refs: Refs,
}

fid_object!(FabricObj, FI_CLASS_FABRIC, refs: refs);

ops_table!(FABRIC_OPS: fi_ops_fabric {
    domain = crate::domain::domain_open,
    passive_ep = crate::cm::passive_ep_open,
    eq_open = crate::eq::eq_open,
    wait_open,
    trywait = trywait,
    domain2 = crate::domain::domain_open2,
});

ffi_fns! {
    /// `fi_fabric` (the provider's `fabric` entry).
    pub fn fabric_open(
        attr: *mut sys::fi_fabric_attr, fabric: *mut *mut sys::fid_fabric, context: *mut c_void,
    ) -> c_int {
        check(!attr.is_null())?;
        // SAFETY: non-NULL attribute from the consumer; `name` is NULL or a C string.
        let name = unsafe { crate::util::c_str((*attr).name) };
        check(name.is_none_or(|n| n == vfabric::FABRIC_NAME))?;
        let obj = FabricObj {
            fid: sys::fid_fabric {
                fid: FabricObj::fid(context),
                ops: ops_ptr(&FABRIC_OPS),
                api_version: crate::FI_VERSION_1_17,
            },
            refs: Refs::default(),
        };
        obj.install(fabric)?;
        Ok(0)
    }

    fn trywait(_f: *mut sys::fid_fabric, fids: *mut *mut sys::fid, n: c_int) -> c_int {
        // SAFETY: `fids` holds `n` fid pointers.
        for &f in unsafe { slice(fids, n.max(0) as usize) }? {
            check(!f.is_null())?;
            // SAFETY: non-NULL consumer fid.
            match unsafe { (*f).fclass } as u32 {
                sys::FI_CLASS_CQ => crate::cq::trywait_cq(f)?,
                _ => return Err(fi::ENOSYS),
            }
        }
        Ok(0)
    }
}
