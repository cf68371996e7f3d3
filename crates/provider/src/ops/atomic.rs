// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `fi_ops_atomic`: every call normalised into its `fi_msg_atomic` form, one body
//! ([`atomic_msg`]) over `vfabric::Endpoint`'s `atomicmsg`/`fetch_atomicmsg`/
//! `compare_atomicmsg`.

use std::ffi::{c_int, c_void};

use vfabric::proto::{atomic_op, datatype};
use vfabric::{fi, AtomicMsg, Iov};

use super::{ep_of, peer, raw_iov, Ctx, Desc, Descs, Ep, Flags};
use crate::ep::EpObj;
use crate::hmem::{named, Held};
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
    desc: Descs,
    dest: u64,
    rma: &sys::fi_rma_ioc,
    dt: sys::fi_datatype,
    op: sys::fi_op,
    ctx: Ctx,
) -> sys::fi_msg_atomic {
    sys::fi_msg_atomic {
        msg_iov: iov.as_ptr(),
        desc,
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

/// Addresses and byte lengths of buffers, their descriptors, and the element count.
type Spans = (Vec<(*mut u8, usize)>, Vec<*mut c_void>, usize);

/// `fi_ioc` buffers with their descriptors (`desc` NULL: none).
#[derive(Clone, Copy)]
struct Bufs<'a> {
    iov: &'a [Ioc],
    desc: Descs,
}

const NONE: Bufs<'static> = Bufs {
    iov: &[],
    desc: std::ptr::null_mut(),
};

impl Bufs<'_> {
    /// Addresses and byte lengths, with the descriptors, and the element count.
    ///
    /// # Safety
    /// `desc` is NULL or holds an entry per buffer.
    unsafe fn spans(&self, size: usize) -> Res<Spans> {
        let spans = self
            .iov
            .iter()
            .map(|v| {
                Ok((
                    v.addr.cast::<u8>(),
                    v.count.checked_mul(size).ok_or(fi::EINVAL)?,
                ))
            })
            .collect::<Res<Vec<_>>>()?;
        let n = if self.desc.is_null() {
            0
        } else {
            self.iov.len()
        };
        // SAFETY: per this function's contract.
        let descs = unsafe { slice(self.desc, n) }?.to_vec();
        Ok((spans, descs, self.iov.iter().map(|v| v.count).sum()))
    }

    /// The buffers as driver iovs (host memory as raw iovs), the device memory under them,
    /// and the element count.
    ///
    /// # Safety
    /// Each buffer follows the libfabric buffer contract (readable while posting, writable
    /// until completion for results); `desc` as for [`Bufs::spans`].
    unsafe fn iovs(&self, e: &EpObj, size: usize) -> Res<(Vec<Iov<'static>>, Option<Held>, usize)> {
        // SAFETY: per this function's contract.
        let (spans, descs, count) = unsafe { self.spans(size) }?;
        let held = e.dom().hmem.held(&spans, &descs);
        let iov = spans
            .into_iter()
            .map(|(p, len)| {
                check(!p.is_null() || len == 0)?;
                // SAFETY: per this function's contract.
                Ok(unsafe { raw_iov(p.cast(), len) })
            })
            .collect::<Res<_>>()?;
        Ok((iov, held, count))
    }
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
    compare: Bufs<'_>,
    result: Bufs<'_>,
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
    let e = ep_of(ep)?;
    let operands = Bufs {
        // SAFETY: per this function's contract.
        iov: unsafe { slice(m.msg_iov, m.iov_count) }?,
        desc: m.desc,
    };
    // SAFETY: as above.
    let (ops, ops_held, count) = unsafe { operands.iovs(e, size) }?;
    // SAFETY: as above.
    let (cmp, cmp_held, _) = unsafe { compare.iovs(e, size) }?;
    // SAFETY: as above.
    let (res, res_held, _) = unsafe { result.iovs(e, size) }?;
    // Device memory: named as such; the driver stages it through the consumer's functions.
    let (ops, cmp, res) = (
        named(&ops, &ops_held),
        named(&cmp, &cmp_held),
        named(&res, &res_held),
    );
    let count = if count == 0 { r.count } else { count };
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
        operands: &[],
        addr: dest,
        remote_addr: r.addr,
        key: r.key,
        datatype,
        op,
        count,
        context: m.context as u64,
    };
    match kind {
        Kind::Write => e.ep.atomicmsg_iov(&a, operands, flags),
        Kind::Fetch => e.ep.fetch_atomicmsg_iov(&a, operands, &res, flags),
        Kind::Compare => e.ep.compare_atomicmsg_iov(&a, operands, &cmp, &res, flags),
    }
    .or_errno(sys::fi_log_subsys_FI_LOG_EP_DATA)?;
    Ok(0)
}

/// Sum of the elements of `iov`.
fn elems(iov: &[Ioc]) -> usize {
    iov.iter().map(|v| v.count).sum()
}

/// One buffer with its descriptor, as the plain calls pass them.
fn one<'a>(ioc: &'a Ioc, desc: &'a mut Desc) -> Bufs<'a> {
    Bufs {
        iov: std::slice::from_ref(ioc),
        desc,
    }
}

// SAFETY (every call below): buffers and `fi_ioc` arrays follow the libfabric data-transfer
// contract (valid until completion; inject buffers during the call); descriptor arrays hold
// an entry per buffer.
ffi_fns! {
    fn writemsg(ep: Ep, msg: *const sys::fi_msg_atomic, flags: u64) -> isize {
        // SAFETY: see above.
        unsafe { atomic_msg(ep, Kind::Write, msg, NONE, NONE, Flags::Msg(flags)) }
    }

    fn readwritemsg(
        ep: Ep, msg: *const sys::fi_msg_atomic, resultv: *mut Ioc, result_desc: Descs,
        result_count: usize, flags: u64,
    ) -> isize {
        // SAFETY: see above.
        unsafe {
            let res = Bufs { iov: slice(resultv, result_count)?, desc: result_desc };
            atomic_msg(ep, Kind::Fetch, msg, NONE, res, Flags::Msg(flags))
        }
    }

    fn compwritemsg(
        ep: Ep, msg: *const sys::fi_msg_atomic, comparev: *const Ioc, compare_desc: Descs,
        compare_count: usize, resultv: *mut Ioc, result_desc: Descs, result_count: usize,
        flags: u64,
    ) -> isize {
        // SAFETY: see above.
        unsafe {
            let cmp = Bufs { iov: slice(comparev, compare_count)?, desc: compare_desc };
            let res = Bufs { iov: slice(resultv, result_count)?, desc: result_desc };
            atomic_msg(ep, Kind::Compare, msg, cmp, res, Flags::Msg(flags))
        }
    }

    fn write(
        ep: Ep, buf: *const c_void, count: usize, desc: Desc, dest: u64, addr: u64, key: u64,
        dt: sys::fi_datatype, op: sys::fi_op, ctx: Ctx,
    ) -> isize {
        let mut d = desc;
        let m = msg(&[ioc(buf, count)], &mut d, dest, &remote(addr, count, key), dt, op, ctx);
        // SAFETY: see above.
        unsafe { atomic_msg(ep, Kind::Write, &m, NONE, NONE, Flags::Op) }
    }

    fn inject(
        ep: Ep, buf: *const c_void, count: usize, dest: u64, addr: u64, key: u64,
        dt: sys::fi_datatype, op: sys::fi_op,
    ) -> isize {
        let (r, null) = (remote(addr, count, key), std::ptr::null_mut());
        let m = msg(&[ioc(buf, count)], std::ptr::null_mut(), dest, &r, dt, op, null);
        // SAFETY: see above.
        unsafe { atomic_msg(ep, Kind::Write, &m, NONE, NONE, Flags::Inject) }
    }

    fn writev(
        ep: Ep, iov: *const Ioc, desc: Descs, n: usize, dest: u64, addr: u64, key: u64,
        dt: sys::fi_datatype, op: sys::fi_op, ctx: Ctx,
    ) -> isize {
        // SAFETY: see above.
        let iov = unsafe { slice(iov, n) }?;
        let m = msg(iov, desc, dest, &remote(addr, elems(iov), key), dt, op, ctx);
        // SAFETY: see above.
        unsafe { atomic_msg(ep, Kind::Write, &m, NONE, NONE, Flags::Op) }
    }

    fn readwrite(
        ep: Ep, buf: *const c_void, count: usize, desc: Desc, result: *mut c_void,
        result_desc: Desc, dest: u64, addr: u64, key: u64, dt: sys::fi_datatype, op: sys::fi_op,
        ctx: Ctx,
    ) -> isize {
        check(!result.is_null() && count > 0)?;
        // A NULL `buf` is allowed for FI_ATOMIC_READ (no operands).
        let ops = ioc(buf, if buf.is_null() { 0 } else { count });
        let (mut d, mut rd, res) = (desc, result_desc, ioc(result, count));
        let m = msg(&[ops], &mut d, dest, &remote(addr, count, key), dt, op, ctx);
        // SAFETY: see above.
        unsafe { atomic_msg(ep, Kind::Fetch, &m, NONE, one(&res, &mut rd), Flags::Op) }
    }

    fn readwritev(
        ep: Ep, iov: *const Ioc, desc: Descs, n: usize, resultv: *mut Ioc, result_desc: Descs,
        result_count: usize, dest: u64, addr: u64, key: u64, dt: sys::fi_datatype, op: sys::fi_op,
        ctx: Ctx,
    ) -> isize {
        // SAFETY: see above.
        let (iov, res) = unsafe { (slice(iov, n)?, slice(resultv, result_count)?) };
        // Without operands (FI_ATOMIC_READ) the results give the count.
        let m = msg(iov, desc, dest, &remote(addr, elems(res), key), dt, op, ctx);
        let res = Bufs { iov: res, desc: result_desc };
        // SAFETY: see above.
        unsafe { atomic_msg(ep, Kind::Fetch, &m, NONE, res, Flags::Op) }
    }

    fn compwrite(
        ep: Ep, buf: *const c_void, count: usize, desc: Desc, compare: *const c_void,
        compare_desc: Desc, result: *mut c_void, result_desc: Desc, dest: u64, addr: u64,
        key: u64, dt: sys::fi_datatype, op: sys::fi_op, ctx: Ctx,
    ) -> isize {
        check(!result.is_null() && count > 0)?;
        let (mut d, mut cd, mut rd) = (desc, compare_desc, result_desc);
        let m = msg(&[ioc(buf, count)], &mut d, dest, &remote(addr, count, key), dt, op, ctx);
        let (cmp, res) = (ioc(compare, count), ioc(result, count));
        let (cmp, res) = (one(&cmp, &mut cd), one(&res, &mut rd));
        // SAFETY: see above.
        unsafe { atomic_msg(ep, Kind::Compare, &m, cmp, res, Flags::Op) }
    }

    fn compwritev(
        ep: Ep, iov: *const Ioc, desc: Descs, n: usize, comparev: *const Ioc,
        compare_desc: Descs, compare_count: usize, resultv: *mut Ioc, result_desc: Descs,
        result_count: usize, dest: u64, addr: u64, key: u64, dt: sys::fi_datatype, op: sys::fi_op,
        ctx: Ctx,
    ) -> isize {
        // SAFETY: see above.
        let (iov, cmp, res) = unsafe {
            (slice(iov, n)?, slice(comparev, compare_count)?, slice(resultv, result_count)?)
        };
        let m = msg(iov, desc, dest, &remote(addr, elems(iov), key), dt, op, ctx);
        let (cmp, res) = (Bufs { iov: cmp, desc: compare_desc }, Bufs { iov: res, desc: result_desc });
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
