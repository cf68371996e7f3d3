// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Persistent memory in the provider (spec §6.17): `fi_mr_reg(FI_RMA_PMEM)` of a buffer the
//! application mapped `MAP_SHARED` from a file (the backing file is found in
//! `/proc/self/maps`), and the endpoint extension `FI_VFABRIC_EP_OPS_V1` with the commit
//! operation of ofiwg/libfabric PR #5875 (`include/fi_vfabric.h`). `FI_SAVE` (`1ULL << 32`) on
//! `fi_writemsg` and `FI_COMMIT_COMPLETE` pass through to the driver.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::fs::File;
use std::os::unix::fs::MetadataExt;

use vfabric::fi;

use crate::ep::EpObj;
use crate::sys;
use crate::util::{check, ffi_fns, OrErrno};

/// The file behind `len` bytes at `addr` of this process and the file offset of `addr`: the
/// range must lie in shared mappings of one regular file at consecutive offsets.
pub fn backing_file(addr: usize, len: usize) -> Result<(File, u64), String> {
    let maps =
        std::fs::read_to_string("/proc/self/maps").map_err(|e| format!("/proc/self/maps: {e}"))?;
    let end = addr.checked_add(len).ok_or("range overflows")?;
    let mut at = addr;
    // Path, inode and file offset of the first mapping.
    let mut found: Option<(String, u64, u64)> = None;
    // `/proc/self/map_files` name of the first mapping (for a file deleted since mapped).
    let mut first_vma = String::new();
    for line in maps.lines() {
        if at >= end {
            break;
        }
        let mut f = line.split_ascii_whitespace();
        let (Some(range), Some(perms), Some(off), Some(_dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let path = f.collect::<Vec<_>>().join(" ");
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)) else {
            continue;
        };
        if e <= at || s > at {
            continue;
        }
        let inode: u64 = inode.parse().unwrap_or(0);
        let off = u64::from_str_radix(off, 16).unwrap_or(0) + (at - s) as u64;
        if inode == 0 || !path.starts_with('/') {
            return Err(format!(
                "{at:#x} is anonymous memory, not a file mapping (FI_RMA_PMEM needs a buffer \
                 mmap'ed MAP_SHARED from a file)"
            ));
        }
        if perms.as_bytes().get(3) != Some(&b's') {
            return Err(format!(
                "{at:#x} is a private mapping of {path} (FI_RMA_PMEM needs MAP_SHARED)"
            ));
        }
        match &found {
            None => {
                first_vma = range.to_string();
                found = Some((path, inode, off));
            }
            Some((p, i, first)) => {
                if *p != path || *i != inode || *first + (at - addr) as u64 != off {
                    return Err(format!("{addr:#x}+{len} spans more than one file mapping"));
                }
            }
        }
        at = e;
    }
    if at < end {
        return Err(format!("{at:#x} is not mapped"));
    }
    let (path, inode, offset) = found.ok_or("empty range")?;
    let open = |p: &str| std::fs::OpenOptions::new().read(true).write(true).open(p);
    let file = match open(&path) {
        Ok(f) => f,
        // Deleted or renamed since mapped: the mapping's own link (needs CAP_SYS_ADMIN on
        // some kernels).
        Err(e) => open(&format!("/proc/self/map_files/{first_vma}"))
            .map_err(|e2| format!("open {path}: {e}; map_files: {e2}"))?,
    };
    // The path may name another file by now (renamed or replaced): check it is the mapped one.
    let meta = file.metadata().map_err(|e| format!("fstat {path}: {e}"))?;
    if meta.ino() != inode {
        return Err(format!("{path} is no longer the mapped file"));
    }
    Ok((file, offset))
}

/// `FI_VFABRIC_EP_OPS_V1`.
const EP_OPS_V1: &CStr = c"fi_vfabric_ep_ops_v1";

/// The `commit` operation of `fi_vfabric_ep_ops_v1`/`_v2` (ofiwg/libfabric PR #5875).
type CommitFn = unsafe extern "C" fn(
    *mut sys::fid_ep,
    *const sys::fi_rma_iov,
    usize,
    u64,
    u64,
    *mut c_void,
) -> isize;

/// `struct fi_vfabric_ep_ops_v1`.
#[repr(C)]
pub struct EpOpsV1 {
    size: usize,
    commit: CommitFn,
}

static EP_OPS: EpOpsV1 = EpOpsV1 {
    size: std::mem::size_of::<EpOpsV1>(),
    commit,
};

/// `FI_VFABRIC_EP_OPS_V2`.
const EP_OPS_V2: &CStr = c"fi_vfabric_ep_ops_v2";

/// `struct fi_vfabric_commit_event`.
#[repr(C)]
pub struct CommitEventC {
    flags: u64,
    data: u64,
    count: usize,
    rma_iov: *const sys::fi_rma_iov,
    src_addr: [u8; vfabric::proto::ADDR_LEN],
    src_addrlen: usize,
    event_id: u64,
}

/// `fi_vfabric_commit_handler`.
type CommitHandlerC = unsafe extern "C" fn(*const CommitEventC, *mut c_void) -> c_int;

/// `struct fi_vfabric_ep_ops_v2`: version 1's fields, then the commit handler.
#[repr(C)]
pub struct EpOpsV2 {
    size: usize,
    commit: CommitFn,
    set_commit_handler:
        unsafe extern "C" fn(*mut sys::fid_ep, Option<CommitHandlerC>, *mut c_void) -> c_int,
}

static EP_OPS2: EpOpsV2 = EpOpsV2 {
    size: std::mem::size_of::<EpOpsV2>(),
    commit,
    set_commit_handler,
};

/// The consumer's handler and context, called from the domain's progress.
struct CHandler {
    f: CommitHandlerC,
    context: usize,
}

ffi_fns! {
    /// `fi_open_ops` on an endpoint: version 2, or version 1 (unchanged) for older consumers.
    pub fn ep_ops_open(
        fid: *mut sys::fid, name: *const c_char, _flags: u64, ops: *mut *mut c_void,
        _context: *mut c_void,
    ) -> c_int {
        // SAFETY: a NUL-terminated name per fi_open_ops' contract (NULL is refused by open_ops).
        let v2 = !name.is_null() && unsafe { CStr::from_ptr(name) } == EP_OPS_V2;
        // SAFETY: libfabric's fi_open_ops arguments, as `open_ops` requires.
        unsafe {
            if v2 {
                crate::ext::open_ops::<EpObj, _>(fid, name, ops, EP_OPS_V2, &EP_OPS2)
            } else {
                crate::ext::open_ops::<EpObj, _>(fid, name, ops, EP_OPS_V1, &EP_OPS)
            }
        }
    }

    /// `set_commit_handler` of `FI_VFABRIC_EP_OPS_V2`: install (or, with NULL, remove) the
    /// commit handler of the endpoint's domain. Persistent regions registered afterwards are
    /// handled.
    fn set_commit_handler(ep: *mut sys::fid_ep, handler: Option<CommitHandlerC>, context: *mut c_void) -> c_int {
        let e = crate::ops::ep_of(ep)?;
        if e.caps & fi::RMA_PMEM == 0 {
            return Err(sys::FI_EOPNOTSUPP as i32);
        }
        let dom = &e.dom().dom;
        let Some(f) = handler else {
            dom.set_commit_handler(None);
            return Ok(0);
        };
        let h = CHandler {
            f,
            context: context as usize,
        };
        dom.set_commit_handler(Some(std::sync::Arc::new(
            move |ev: &vfabric::CommitEvent| -> i32 {
                let iov: Vec<sys::fi_rma_iov> = ev
                    .ranges
                    .iter()
                    .map(|r| sys::fi_rma_iov {
                        addr: r.addr,
                        len: r.len as usize,
                        key: r.key,
                    })
                    .collect();
                let c = CommitEventC {
                    flags: ev.flags,
                    data: ev.data.unwrap_or(0),
                    count: iov.len(),
                    rma_iov: iov.as_ptr(),
                    src_addr: ev.initiator.to_bytes(),
                    src_addrlen: vfabric::proto::ADDR_LEN,
                    event_id: ev.id,
                };
                // SAFETY: the consumer's handler, with an event valid for the call and the
                // context it registered (its lifetime is the consumer's contract).
                unsafe { (h.f)(&c, h.context as *mut c_void) }
            },
        )));
        Ok(0)
    }

    fn commit(
        ep: *mut sys::fid_ep, rma_iov: *const sys::fi_rma_iov, count: usize, dest: u64, flags: u64,
        context: *mut c_void,
    ) -> isize {
        let e = crate::ops::ep_of(ep)?;
        if e.caps & fi::RMA == 0 {
            return Err(sys::FI_EOPNOTSUPP as i32);
        }
        check(count > 0)?;
        // SAFETY: `rma_iov` holds `count` entries (the caller's contract).
        let ranges = unsafe { crate::ops::rma::rma_iovs(rma_iov, count) }?;
        let dest = crate::ops::peer(e, dest)?;
        e.ep
            .commit(&ranges, dest, flags, context as u64)
            .or_errno(sys::fi_log_subsys_FI_LOG_EP_DATA)?;
        Ok(0)
    }
}
