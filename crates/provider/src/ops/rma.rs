// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `fi_ops_rma`: every call normalised into an [`Xfer`] and remote ranges, one body
//! ([`rma`]) over `vfabric::Endpoint`'s `writemsg`/`readmsg`.

use std::ffi::c_void;

use vfabric::{fi, RmaIov, RmaMsg};

use super::{ep_of, peer, Ctx, Desc, Descs, Ep, Flags, Xfer};
use crate::sys;
use crate::util::{ffi_fns, ops_table, slice, OrErrno, Res};

ops_table!(pub RMA_OPS: fi_ops_rma [read, readv, readmsg, write, writev, writemsg, inject, writedata, injectdata]);

/// The one body of every RMA read and write.
fn rma(ep: Ep, write: bool, x: Xfer<'_>, rma_iov: &[RmaIov], flags: Flags) -> Res<isize> {
    let e = ep_of(ep)?;
    let flags = flags.resolve(e, true);
    if e.caps & fi::RMA == 0 {
        return Err(sys::FI_EOPNOTSUPP as i32);
    }
    if write && flags & fi::REMOTE_CQ_DATA != 0 && !e.dom().remote_cq_data {
        // The consumer did not accept FI_RX_CQ_DATA, so its info granted no remote CQ data
        // (info.rs): the notification would take one of its receives.
        return Err(fi::EINVAL);
    }
    // Device memory: named as such; the driver stages it through the consumer's functions.
    let held = e.dom().hmem.held(&x.bufs, &x.descs);
    let named = crate::hmem::named(&x.iov, &held);
    let iov = &*named;
    let m = RmaMsg {
        iov,
        addr: peer(e, x.addr)?,
        rma_iov,
        context: x.context,
        data: x.data,
    };
    if write {
        e.ep.writemsg(&m, flags)
    } else {
        e.ep.readmsg(&m, flags)
    }
    .or_errno(sys::fi_log_subsys_FI_LOG_EP_DATA)?;
    Ok(0)
}

/// The one remote range of a plain or `v` call, as long as the local buffers.
fn to(x: Xfer<'_>, addr: u64, key: u64) -> (Xfer<'_>, [RmaIov; 1]) {
    let len = x.len() as u64;
    (x, [RmaIov { addr, len, key }])
}

/// The driver's form of `n` consumer `fi_rma_iov`s.
///
/// # Safety
/// `p` is NULL or holds `n` entries.
pub unsafe fn rma_iovs(p: *const sys::fi_rma_iov, n: usize) -> Res<Vec<RmaIov>> {
    // SAFETY: per this function's contract.
    let v = unsafe { slice(p, n) }?;
    let iov = |r: &sys::fi_rma_iov| RmaIov {
        addr: r.addr,
        len: r.len as u64,
        key: r.key,
    };
    Ok(v.iter().map(iov).collect())
}

/// An `fi_msg_rma` call.
///
/// # Safety
/// `msg` is NULL or a valid message following the libfabric buffer contract.
unsafe fn rma_msg(ep: Ep, write: bool, msg: *const sys::fi_msg_rma, flags: u64) -> Res<isize> {
    // SAFETY: per this function's contract.
    let m = unsafe { msg.as_ref() }.ok_or(fi::EINVAL)?;
    // SAFETY: as above.
    let x =
        unsafe { Xfer::iov(m.msg_iov, m.desc, m.iov_count, m.addr, m.context) }?.with_data(m.data);
    // SAFETY: as above.
    let r = unsafe { rma_iovs(m.rma_iov, m.rma_iov_count) }?;
    rma(ep, write, x, &r, Flags::Msg(flags))
}

// SAFETY (every call below): buffers and iovecs follow the libfabric data-transfer contract
// (valid until completion; inject buffers during the call).
ffi_fns! {
    fn readmsg(ep: Ep, msg: *const sys::fi_msg_rma, flags: u64) -> isize {
        // SAFETY: see above.
        unsafe { rma_msg(ep, false, msg, flags) }
    }

    fn writemsg(ep: Ep, msg: *const sys::fi_msg_rma, flags: u64) -> isize {
        // SAFETY: see above.
        unsafe { rma_msg(ep, true, msg, flags) }
    }

    fn read(ep: Ep, buf: *mut c_void, len: usize, desc: Desc, src: u64, addr: u64, key: u64, ctx: Ctx) -> isize {
        // SAFETY: see above.
        let (x, r) = to(unsafe { Xfer::buf(buf, len, desc, src, ctx) }, addr, key);
        rma(ep, false, x, &r, Flags::Op)
    }

    fn readv(
        ep: Ep, iov: *const sys::iovec, desc: Descs, count: usize, src: u64, addr: u64, key: u64,
        ctx: Ctx,
    ) -> isize {
        // SAFETY: see above.
        let (x, r) = to(unsafe { Xfer::iov(iov, desc, count, src, ctx) }?, addr, key);
        rma(ep, false, x, &r, Flags::Op)
    }

    fn write(ep: Ep, buf: *const c_void, len: usize, desc: Desc, dest: u64, addr: u64, key: u64, ctx: Ctx) -> isize {
        // SAFETY: see above.
        let (x, r) = to(unsafe { Xfer::buf(buf, len, desc, dest, ctx) }, addr, key);
        rma(ep, true, x, &r, Flags::Op)
    }

    fn writev(
        ep: Ep, iov: *const sys::iovec, desc: Descs, count: usize, dest: u64, addr: u64, key: u64,
        ctx: Ctx,
    ) -> isize {
        // SAFETY: see above.
        let (x, r) = to(unsafe { Xfer::iov(iov, desc, count, dest, ctx) }?, addr, key);
        rma(ep, true, x, &r, Flags::Op)
    }

    fn writedata(
        ep: Ep, buf: *const c_void, len: usize, desc: Desc, data: u64, dest: u64, addr: u64,
        key: u64, ctx: Ctx,
    ) -> isize {
        // SAFETY: see above.
        let x = unsafe { Xfer::buf(buf, len, desc, dest, ctx) }.with_data(data);
        let (x, r) = to(x, addr, key);
        rma(ep, true, x, &r, Flags::OpData)
    }

    fn inject(ep: Ep, buf: *const c_void, len: usize, dest: u64, addr: u64, key: u64) -> isize {
        // SAFETY: see above.
        let (x, r) = to(unsafe { Xfer::buf(buf, len, std::ptr::null_mut(), dest, std::ptr::null_mut()) }, addr, key);
        rma(ep, true, x, &r, Flags::Inject)
    }

    fn injectdata(ep: Ep, buf: *const c_void, len: usize, data: u64, dest: u64, addr: u64, key: u64) -> isize {
        // SAFETY: see above.
        let x = unsafe { Xfer::buf(buf, len, std::ptr::null_mut(), dest, std::ptr::null_mut()) }.with_data(data);
        let (x, r) = to(x, addr, key);
        rma(ep, true, x, &r, Flags::InjectData)
    }
}
