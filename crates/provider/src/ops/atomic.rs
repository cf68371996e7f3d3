// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `fi_ops_atomic`: every call normalised into its `fi_msg_atomic` form, one body
//! ([`atomic_msg`]) over `vfabric::Endpoint`'s `atomicmsg`/`fetch_atomicmsg`/
//! `compare_atomicmsg`.

use std::ffi::{c_int, c_void};

use vfabric::proto::{atomic_op, datatype};
use vfabric::{fi, AtomicMsg, Iov};

use super::{ep_of, peer, raw_iov, Ctx, Desc, Descs, Ep, Flags};
use crate::sys;
use crate::util::{check, ffi_fns, ops_table, slice, OrErrno, Res};

ops_table!(pub ATOMIC_OPS: fi_ops_atomic [write, writev, writemsg, inject, readwrite, readwritev, readwritemsg, compwrite, compwritev, compwritemsg, writevalid, readwritevalid, compwritevalid]);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write,
    Fetch,
    Compare,
}

type Ioc = sys::fi_ioc;

/// `count` elements at `p` as an `fi_ioc`.
fn ioc(p: *const c_void, count: usize) -> Ioc {
    Ioc {
        addr: p.cast_mut(),
        count,
    }
}

/// The `fi_msg_atomic` of a plain or `v` call (one remote range of `count` elements).
#[allow(clippy::too_many_arguments)]
fn msg(
    iov: &[Ioc],
    dest: u64,
    rma: &sys::fi_rma_ioc,
    dt: sys::fi_datatype,
    op: sys::fi_op,
    ctx: Ctx,
) -> sys::fi_msg_atomic {
    sys::fi_msg_atomic {
        msg_iov: iov.as_ptr(),
        desc: std::ptr::null_mut(),
        iov_count: iov.len(),
        addr: dest,
        rma_iov: rma,
        rma_iov_count: 1,
        datatype: dt,
        op,
        context: ctx,
        data: 0,
    }
}

/// The remote range of a plain or `v` call.
fn remote(addr: u64, count: usize, key: u64) -> sys::fi_rma_ioc {
    sys::fi_rma_ioc { addr, count, key }
}

/// The concatenated elements of `iov`, and their count.
///
/// # Safety
/// Each entry is valid for reads of its elements.
unsafe fn ioc_bytes(iov: &[Ioc], size: usize) -> Res<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut count = 0;
    for v in iov {
        let n = v.count.checked_mul(size).ok_or(fi::EINVAL)?;
        // SAFETY: per this function's contract.
        out.extend_from_slice(unsafe { slice(v.addr.cast::<u8>(), n) }?);
        count += v.count;
    }
    Ok((out, count))
}

/// Result buffers of `iov`.
///
/// # Safety
/// Each entry is valid for writes of its elements until the operation completes.
unsafe fn ioc_results<'a>(iov: &[Ioc], size: usize) -> Res<Vec<Iov<'a>>> {
    iov.iter()
        .map(|v| {
            let len = v.count.checked_mul(size).ok_or(fi::EINVAL)?;
            check(!v.addr.is_null() || len == 0)?;
            // SAFETY: per this function's contract.
            Ok(unsafe { raw_iov(v.addr, len) })
        })
        .collect()
}

/// The one body of every atomic.
///
/// # Safety
/// `msg` is NULL or a valid `fi_msg_atomic`; its buffers, `compare` and `result` follow the
/// libfabric buffer contract.
unsafe fn atomic_msg(
    ep: Ep,
    kind: Kind,
    msg: *const sys::fi_msg_atomic,
    compare: &[Ioc],
    result: &[Ioc],
    flags: Flags,
) -> Res<isize> {
    // SAFETY: per this function's contract.
    let m = unsafe { msg.as_ref() }.ok_or(fi::EINVAL)?;
    let size = u8::try_from(m.datatype)
        .ok()
        .and_then(datatype::size)
        .ok_or(fi::EINVAL)?;
    // The device takes one remote range per atomic.
    check(!m.rma_iov.is_null() && m.rma_iov_count == 1)?;
    // SAFETY: one entry (checked above).
    let r = unsafe { *m.rma_iov };
    // SAFETY: per this function's contract.
    let (ops, count) = unsafe { ioc_bytes(slice(m.msg_iov, m.iov_count)?, size) }?;
    // SAFETY: as above.
    let (cmp, _) = unsafe { ioc_bytes(compare, size) }?;
    // SAFETY: as above.
    let res = unsafe { ioc_results(result, size) }?;
    let count = if count == 0 { r.count } else { count };
    let e = ep_of(ep)?;
    let flags = flags.resolve(e, true);
    if e.caps & fi::ATOMIC == 0 {
        return Err(sys::FI_EOPNOTSUPP as i32);
    }
    let dest = peer(e, m.addr)?;
    let (Ok(datatype), Ok(op)) = (u8::try_from(m.datatype), u8::try_from(m.op)) else {
        return Err(fi::EINVAL);
    };
    // FI_ATOMIC_READ takes no operands (libfabric ignores the buffer).
    let operands = if op == atomic_op::ATOMIC_READ {
        &[]
    } else {
        &ops[..]
    };
    let a = AtomicMsg {
        operands,
        addr: dest,
        remote_addr: r.addr,
        key: r.key,
        datatype,
        op,
        count,
        context: m.context as u64,
    };
    match kind {
        Kind::Write => e.ep.atomicmsg(&a, flags),
        Kind::Fetch => e.ep.fetch_atomicmsg(&a, &res, flags),
        Kind::Compare => e.ep.compare_atomicmsg(&a, &cmp, &res, flags),
    }
    .or_errno(sys::fi_log_subsys_FI_LOG_EP_DATA)?;
    Ok(0)
}

/// Sum of the elements of `iov`.
fn elems(iov: &[Ioc]) -> usize {
    iov.iter().map(|v| v.count).sum()
}

// SAFETY (every call below): buffers and `fi_ioc` arrays follow the libfabric data-transfer
// contract (valid until completion; inject buffers during the call).
ffi_fns! {
    fn writemsg(ep: Ep, msg: *const sys::fi_msg_atomic, flags: u64) -> isize {
        // SAFETY: see above.
        unsafe { atomic_msg(ep, Kind::Write, msg, &[], &[], Flags::Msg(flags)) }
    }

    fn readwritemsg(
        ep: Ep, msg: *const sys::fi_msg_atomic, resultv: *mut Ioc, _result_desc: Descs,
        result_count: usize, flags: u64,
    ) -> isize {
        // SAFETY: see above.
        unsafe {
            let res = slice(resultv, result_count)?;
            atomic_msg(ep, Kind::Fetch, msg, &[], res, Flags::Msg(flags))
        }
    }

    fn compwritemsg(
        ep: Ep, msg: *const sys::fi_msg_atomic, comparev: *const Ioc, _compare_desc: Descs,
        compare_count: usize, resultv: *mut Ioc, _result_desc: Descs, result_count: usize,
        flags: u64,
    ) -> isize {
        // SAFETY: see above.
        unsafe {
            let (cmp, res) = (slice(comparev, compare_count)?, slice(resultv, result_count)?);
            atomic_msg(ep, Kind::Compare, msg, cmp, res, Flags::Msg(flags))
        }
    }

    fn write(
        ep: Ep, buf: *const c_void, count: usize, _desc: Desc, dest: u64, addr: u64, key: u64,
        dt: sys::fi_datatype, op: sys::fi_op, ctx: Ctx,
    ) -> isize {
        let m = msg(&[ioc(buf, count)], dest, &remote(addr, count, key), dt, op, ctx);
        // SAFETY: see above.
        unsafe { atomic_msg(ep, Kind::Write, &m, &[], &[], Flags::Op) }
    }

    fn inject(
        ep: Ep, buf: *const c_void, count: usize, dest: u64, addr: u64, key: u64,
        dt: sys::fi_datatype, op: sys::fi_op,
    ) -> isize {
        let m = msg(&[ioc(buf, count)], dest, &remote(addr, count, key), dt, op, std::ptr::null_mut());
        // SAFETY: see above.
        unsafe { atomic_msg(ep, Kind::Write, &m, &[], &[], Flags::Inject) }
    }

    fn writev(
        ep: Ep, iov: *const Ioc, _desc: Descs, n: usize, dest: u64, addr: u64, key: u64,
        dt: sys::fi_datatype, op: sys::fi_op, ctx: Ctx,
    ) -> isize {
        // SAFETY: see above.
        let iov = unsafe { slice(iov, n) }?;
        let m = msg(iov, dest, &remote(addr, elems(iov), key), dt, op, ctx);
        // SAFETY: see above.
        unsafe { atomic_msg(ep, Kind::Write, &m, &[], &[], Flags::Op) }
    }

    fn readwrite(
        ep: Ep, buf: *const c_void, count: usize, _desc: Desc, result: *mut c_void,
        _result_desc: Desc, dest: u64, addr: u64, key: u64, dt: sys::fi_datatype, op: sys::fi_op,
        ctx: Ctx,
    ) -> isize {
        check(!result.is_null() && count > 0)?;
        // A NULL `buf` is allowed for FI_ATOMIC_READ (no operands).
        let ops = ioc(buf, if buf.is_null() { 0 } else { count });
        let m = msg(&[ops], dest, &remote(addr, count, key), dt, op, ctx);
        // SAFETY: see above.
        unsafe { atomic_msg(ep, Kind::Fetch, &m, &[], &[ioc(result, count)], Flags::Op) }
    }

    fn readwritev(
        ep: Ep, iov: *const Ioc, _desc: Descs, n: usize, resultv: *mut Ioc, _result_desc: Descs,
        result_count: usize, dest: u64, addr: u64, key: u64, dt: sys::fi_datatype, op: sys::fi_op,
        ctx: Ctx,
    ) -> isize {
        // SAFETY: see above.
        let (iov, res) = unsafe { (slice(iov, n)?, slice(resultv, result_count)?) };
        // Without operands (FI_ATOMIC_READ) the results give the count.
        let m = msg(iov, dest, &remote(addr, elems(res), key), dt, op, ctx);
        // SAFETY: see above.
        unsafe { atomic_msg(ep, Kind::Fetch, &m, &[], res, Flags::Op) }
    }

    fn compwrite(
        ep: Ep, buf: *const c_void, count: usize, _desc: Desc, compare: *const c_void,
        _compare_desc: Desc, result: *mut c_void, _result_desc: Desc, dest: u64, addr: u64,
        key: u64, dt: sys::fi_datatype, op: sys::fi_op, ctx: Ctx,
    ) -> isize {
        check(!result.is_null() && count > 0)?;
        let m = msg(&[ioc(buf, count)], dest, &remote(addr, count, key), dt, op, ctx);
        let (cmp, res) = ([ioc(compare, count)], [ioc(result, count)]);
        // SAFETY: see above.
        unsafe { atomic_msg(ep, Kind::Compare, &m, &cmp, &res, Flags::Op) }
    }

    fn compwritev(
        ep: Ep, iov: *const Ioc, _desc: Descs, n: usize, comparev: *const Ioc,
        _compare_desc: Descs, compare_count: usize, resultv: *mut Ioc, _result_desc: Descs,
        result_count: usize, dest: u64, addr: u64, key: u64, dt: sys::fi_datatype, op: sys::fi_op,
        ctx: Ctx,
    ) -> isize {
        // SAFETY: see above.
        let (iov, cmp, res) = unsafe {
            (slice(iov, n)?, slice(comparev, compare_count)?, slice(resultv, result_count)?)
        };
        let m = msg(iov, dest, &remote(addr, elems(iov), key), dt, op, ctx);
        // SAFETY: see above.
        unsafe { atomic_msg(ep, Kind::Compare, &m, cmp, res, Flags::Op) }
    }
}

fn valid(
    ep: Ep,
    kind: Kind,
    dt: sys::fi_datatype,
    op: sys::fi_op,
    count: *mut usize,
) -> Res<c_int> {
    check(!count.is_null())?;
    let e = ep_of(ep)?;
    let (Ok(dt), Ok(op), true) = (u8::try_from(dt), u8::try_from(op), e.caps & fi::ATOMIC != 0)
    else {
        return Err(sys::FI_EOPNOTSUPP as i32);
    };
    let n = match kind {
        Kind::Write => e.ep.atomic_valid(dt, op),
        Kind::Fetch => e.ep.fetch_atomic_valid(dt, op),
        Kind::Compare => e.ep.compare_atomic_valid(dt, op),
    }
    .or_errno(sys::fi_log_subsys_FI_LOG_EP_DATA)?;
    // SAFETY: non-NULL consumer out-parameter.
    unsafe { *count = n };
    Ok(0)
}

ffi_fns! {
    fn writevalid(ep: Ep, dt: sys::fi_datatype, op: sys::fi_op, count: *mut usize) -> c_int {
        valid(ep, Kind::Write, dt, op, count)
    }

    fn readwritevalid(ep: Ep, dt: sys::fi_datatype, op: sys::fi_op, count: *mut usize) -> c_int {
        valid(ep, Kind::Fetch, dt, op, count)
    }

    fn compwritevalid(ep: Ep, dt: sys::fi_datatype, op: sys::fi_op, count: *mut usize) -> c_int {
        valid(ep, Kind::Compare, dt, op, count)
    }
}
