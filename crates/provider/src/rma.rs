// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `fi_ops_rma` and `fi_ops_atomic` tables of endpoints, over `vfabric::Endpoint`'s
//! `writemsg`/`readmsg` and `atomicmsg`/`fetch_atomicmsg`/`compare_atomicmsg`.

use std::ffi::{c_int, c_void};
use std::sync::LazyLock;

use vfabric::proto::{atomic_op, datatype};
use vfabric::{fi, AtomicMsg, Iov, RmaIov, RmaMsg};

use crate::ep::{iov_vec, op_flags, raw_iov, EpObj};
use crate::sys;
use crate::util::{errno_of, guard, obj};

macro_rules! entry {
    ($body:expr) => {
        guard(|| -> isize { $body })
    };
}

pub static RMA_OPS: LazyLock<sys::fi_ops_rma> = LazyLock::new(|| sys::fi_ops_rma {
    size: std::mem::size_of::<sys::fi_ops_rma>(),
    read: Some(rma_read),
    readv: Some(rma_readv),
    readmsg: Some(rma_readmsg),
    write: Some(rma_write),
    writev: Some(rma_writev),
    writemsg: Some(rma_writemsg),
    inject: Some(rma_inject),
    writedata: Some(rma_writedata),
    injectdata: Some(rma_injectdata),
});

pub static ATOMIC_OPS: LazyLock<sys::fi_ops_atomic> = LazyLock::new(|| sys::fi_ops_atomic {
    size: std::mem::size_of::<sys::fi_ops_atomic>(),
    write: Some(at_write),
    writev: Some(at_writev),
    writemsg: Some(at_writemsg),
    inject: Some(at_inject),
    readwrite: Some(at_readwrite),
    readwritev: Some(at_readwritev),
    readwritemsg: Some(at_readwritemsg),
    compwrite: Some(at_compwrite),
    compwritev: Some(at_compwritev),
    compwritemsg: Some(at_compwritemsg),
    writevalid: Some(at_writevalid),
    readwritevalid: Some(at_readwritevalid),
    compwritevalid: Some(at_compwritevalid),
});

fn ep_of<'a>(ep: *mut sys::fid_ep) -> Result<&'a EpObj, isize> {
    // SAFETY: consumer passes one of our endpoints (fclass checked).
    unsafe { obj::<EpObj>(ep.cast(), sys::FI_CLASS_EP) }.map_err(|e| -(e as isize))
}

/// The peer of an operation: the connected peer of an FI_EP_MSG endpoint, else `addr`.
fn peer(e: &EpObj, addr: u64) -> Result<u64, isize> {
    match &e.conn {
        Some(c) => c.peer_fi_addr().ok_or(-(sys::FI_ENOTCONN as isize)),
        None => Ok(addr),
    }
}

fn status(r: vfabric::Result<()>) -> isize {
    match r {
        Ok(()) => 0,
        Err(err) => -(errno_of(&err, sys::fi_log_subsys_FI_LOG_EP_DATA) as isize),
    }
}

#[allow(clippy::too_many_arguments)]
fn rma(
    ep: *mut sys::fid_ep,
    write: bool,
    iov: &[Iov<'_>],
    addr: u64,
    rma_iov: &[RmaIov],
    context: u64,
    data: u64,
    flags: u64,
) -> isize {
    let e = match ep_of(ep) {
        Ok(e) => e,
        Err(x) => return x,
    };
    if e.caps & fi::RMA == 0 {
        return -(sys::FI_EOPNOTSUPP as isize);
    }
    // SAFETY: the domain outlives its endpoints (ParentRef).
    if write && flags & fi::REMOTE_CQ_DATA != 0 && !unsafe { &*e.domain }.remote_cq_data {
        // The consumer did not accept FI_RX_CQ_DATA, so its info granted no remote CQ data
        // (info.rs): the notification would take one of its receives.
        return -(fi::EINVAL as isize);
    }
    let addr = match peer(e, addr) {
        Ok(a) => a,
        Err(x) => return x,
    };
    let m = RmaMsg {
        iov,
        addr,
        rma_iov,
        context,
        data,
    };
    status(if write {
        e.ep.writemsg(&m, flags)
    } else {
        e.ep.readmsg(&m, flags)
    })
}

fn one(addr: u64, len: usize, key: u64) -> [RmaIov; 1] {
    [RmaIov {
        addr,
        len: len as u64,
        key,
    }]
}

fn total(iov: &[Iov<'_>]) -> usize {
    iov.iter().map(|v| v.len()).sum()
}

/// `fi_rma_iov` entries of a message.
///
/// # Safety
/// `p` is NULL with `n == 0`, or holds `n` entries.
unsafe fn rma_iovs(p: *const sys::fi_rma_iov, n: usize) -> Result<Vec<RmaIov>, isize> {
    if p.is_null() && n > 0 {
        return Err(-(fi::EINVAL as isize));
    }
    Ok((0..n)
        .map(|k| {
            // SAFETY: `p` holds `n` entries.
            let r = unsafe { &*p.add(k) };
            RmaIov {
                addr: r.addr,
                len: r.len as u64,
                key: r.key,
            }
        })
        .collect())
}

unsafe extern "C" fn rma_read(
    ep: *mut sys::fid_ep,
    buf: *mut c_void,
    len: usize,
    _desc: *mut c_void,
    src: u64,
    addr: u64,
    key: u64,
    ctx: *mut c_void,
) -> isize {
    entry!({
        // SAFETY: libfabric buffer contract (valid until completion).
        let iov = [unsafe { raw_iov(buf, len) }];
        let flags = op_flags(ep, true);
        rma(
            ep,
            false,
            &iov,
            src,
            &one(addr, len, key),
            ctx as u64,
            0,
            flags,
        )
    })
}

unsafe extern "C" fn rma_readv(
    ep: *mut sys::fid_ep,
    iov: *const sys::iovec,
    _desc: *mut *mut c_void,
    count: usize,
    src: u64,
    addr: u64,
    key: u64,
    ctx: *mut c_void,
) -> isize {
    entry!({
        // SAFETY: libfabric buffer contract.
        let v = match unsafe { iov_vec(iov, count) } {
            Ok(v) => v,
            Err(e) => return e,
        };
        let n = total(&v);
        let flags = op_flags(ep, true);
        rma(ep, false, &v, src, &one(addr, n, key), ctx as u64, 0, flags)
    })
}

/// Shared by `readmsg`/`writemsg`.
///
/// # Safety
/// `msg` is NULL or a valid `fi_msg_rma` satisfying the libfabric buffer contract.
unsafe fn rma_msg(
    ep: *mut sys::fid_ep,
    msg: *const sys::fi_msg_rma,
    flags: u64,
    write: bool,
) -> isize {
    if msg.is_null() {
        return -(fi::EINVAL as isize);
    }
    // SAFETY: non-NULL consumer message.
    let m = unsafe { &*msg };
    // SAFETY: per this function's contract.
    let v = match unsafe { iov_vec(m.msg_iov, m.iov_count) } {
        Ok(v) => v,
        Err(e) => return e,
    };
    // SAFETY: per this function's contract.
    let r = match unsafe { rma_iovs(m.rma_iov, m.rma_iov_count) } {
        Ok(r) => r,
        Err(e) => return e,
    };
    rma(ep, write, &v, m.addr, &r, m.context as u64, m.data, flags)
}

unsafe extern "C" fn rma_readmsg(
    ep: *mut sys::fid_ep,
    msg: *const sys::fi_msg_rma,
    flags: u64,
) -> isize {
    let flags = flags & !vfabric::INJECT_CALL;
    // SAFETY: consumer message (NULL-checked inside).
    entry!(unsafe { rma_msg(ep, msg, flags, false) })
}

unsafe extern "C" fn rma_writemsg(
    ep: *mut sys::fid_ep,
    msg: *const sys::fi_msg_rma,
    flags: u64,
) -> isize {
    let flags = flags & !vfabric::INJECT_CALL;
    // SAFETY: consumer message (NULL-checked inside).
    entry!(unsafe { rma_msg(ep, msg, flags, true) })
}

unsafe extern "C" fn rma_write(
    ep: *mut sys::fid_ep,
    buf: *const c_void,
    len: usize,
    _desc: *mut c_void,
    dest: u64,
    addr: u64,
    key: u64,
    ctx: *mut c_void,
) -> isize {
    entry!({
        // SAFETY: libfabric buffer contract.
        let iov = [unsafe { raw_iov(buf, len) }];
        let flags = op_flags(ep, true);
        rma(
            ep,
            true,
            &iov,
            dest,
            &one(addr, len, key),
            ctx as u64,
            0,
            flags,
        )
    })
}

unsafe extern "C" fn rma_writev(
    ep: *mut sys::fid_ep,
    iov: *const sys::iovec,
    _desc: *mut *mut c_void,
    count: usize,
    dest: u64,
    addr: u64,
    key: u64,
    ctx: *mut c_void,
) -> isize {
    entry!({
        // SAFETY: libfabric buffer contract.
        let v = match unsafe { iov_vec(iov, count) } {
            Ok(v) => v,
            Err(e) => return e,
        };
        let n = total(&v);
        let flags = op_flags(ep, true);
        rma(ep, true, &v, dest, &one(addr, n, key), ctx as u64, 0, flags)
    })
}

unsafe extern "C" fn rma_inject(
    ep: *mut sys::fid_ep,
    buf: *const c_void,
    len: usize,
    dest: u64,
    addr: u64,
    key: u64,
) -> isize {
    entry!({
        // SAFETY: libfabric buffer contract (copied at post time with FI_INJECT).
        let iov = [unsafe { raw_iov(buf, len) }];
        rma(
            ep,
            true,
            &iov,
            dest,
            &one(addr, len, key),
            0,
            0,
            fi::INJECT | vfabric::INJECT_CALL,
        )
    })
}

unsafe extern "C" fn rma_writedata(
    ep: *mut sys::fid_ep,
    buf: *const c_void,
    len: usize,
    _desc: *mut c_void,
    data: u64,
    dest: u64,
    addr: u64,
    key: u64,
    ctx: *mut c_void,
) -> isize {
    entry!({
        // SAFETY: libfabric buffer contract.
        let iov = [unsafe { raw_iov(buf, len) }];
        let flags = op_flags(ep, true) | fi::REMOTE_CQ_DATA;
        rma(
            ep,
            true,
            &iov,
            dest,
            &one(addr, len, key),
            ctx as u64,
            data,
            flags,
        )
    })
}

unsafe extern "C" fn rma_injectdata(
    ep: *mut sys::fid_ep,
    buf: *const c_void,
    len: usize,
    data: u64,
    dest: u64,
    addr: u64,
    key: u64,
) -> isize {
    entry!({
        // SAFETY: libfabric buffer contract (copied at post time with FI_INJECT).
        let iov = [unsafe { raw_iov(buf, len) }];
        let flags = fi::INJECT | vfabric::INJECT_CALL | fi::REMOTE_CQ_DATA;
        rma(ep, true, &iov, dest, &one(addr, len, key), 0, data, flags)
    })
}

// ---------------------------------------------------------------------------------------------
// Atomics
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write,
    Fetch,
    Compare,
}

fn dt_size(dt: u32) -> Result<usize, isize> {
    u8::try_from(dt)
        .ok()
        .and_then(datatype::size)
        .ok_or(-(fi::EINVAL as isize))
}

/// Bytes of `count` elements at `p` (NULL with `count == 0` gives none).
///
/// # Safety
/// `p` is valid for reads of `count * size` bytes.
unsafe fn elems<'a>(p: *const c_void, count: usize, size: usize) -> Result<&'a [u8], isize> {
    let n = count.checked_mul(size).ok_or(-(fi::EINVAL as isize))?;
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(-(fi::EINVAL as isize));
    }
    // SAFETY: per this function's contract.
    Ok(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), n) })
}

/// The concatenated elements of an `fi_ioc` array, and their count.
///
/// # Safety
/// `iov` is NULL with `n == 0`, or holds `n` entries each valid for its elements.
unsafe fn ioc_bytes(
    iov: *const sys::fi_ioc,
    n: usize,
    size: usize,
) -> Result<(Vec<u8>, usize), isize> {
    if iov.is_null() && n > 0 {
        return Err(-(fi::EINVAL as isize));
    }
    let mut out = Vec::new();
    let mut count = 0;
    for k in 0..n {
        // SAFETY: `iov` holds `n` entries.
        let v = unsafe { &*iov.add(k) };
        // SAFETY: per this function's contract.
        out.extend_from_slice(unsafe { elems(v.addr, v.count, size) }?);
        count += v.count;
    }
    Ok((out, count))
}

/// Result buffers of an `fi_ioc` array.
///
/// # Safety
/// As `ioc_bytes`, for writes until the operation completes.
unsafe fn ioc_results<'a>(
    iov: *const sys::fi_ioc,
    n: usize,
    size: usize,
) -> Result<Vec<Iov<'a>>, isize> {
    if iov.is_null() && n > 0 {
        return Err(-(fi::EINVAL as isize));
    }
    (0..n)
        .map(|k| {
            // SAFETY: `iov` holds `n` entries.
            let v = unsafe { &*iov.add(k) };
            let len = v.count.checked_mul(size).ok_or(-(fi::EINVAL as isize))?;
            if v.addr.is_null() && len > 0 {
                return Err(-(fi::EINVAL as isize));
            }
            // SAFETY: per this function's contract.
            Ok(unsafe { raw_iov(v.addr, len) })
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn atomic(
    ep: *mut sys::fid_ep,
    kind: Kind,
    operands: &[u8],
    count: usize,
    compare: &[u8],
    result: &[Iov<'_>],
    dest: u64,
    addr: u64,
    key: u64,
    dt: u32,
    op: u32,
    context: u64,
    flags: u64,
) -> isize {
    let e = match ep_of(ep) {
        Ok(e) => e,
        Err(x) => return x,
    };
    if e.caps & fi::ATOMIC == 0 {
        return -(sys::FI_EOPNOTSUPP as isize);
    }
    let dest = match peer(e, dest) {
        Ok(a) => a,
        Err(x) => return x,
    };
    let (Ok(datatype), Ok(op)) = (u8::try_from(dt), u8::try_from(op)) else {
        return -(fi::EINVAL as isize);
    };
    // FI_ATOMIC_READ takes no operands (libfabric ignores the buffer).
    let operands = if op == atomic_op::ATOMIC_READ {
        &[]
    } else {
        operands
    };
    let m = AtomicMsg {
        operands,
        addr: dest,
        remote_addr: addr,
        key,
        datatype,
        op,
        count,
        context,
    };
    status(match kind {
        Kind::Write => e.ep.atomicmsg(&m, flags),
        Kind::Fetch => e.ep.fetch_atomicmsg(&m, result, flags),
        Kind::Compare => e.ep.compare_atomicmsg(&m, compare, result, flags),
    })
}

unsafe extern "C" fn at_write(
    ep: *mut sys::fid_ep,
    buf: *const c_void,
    count: usize,
    _desc: *mut c_void,
    dest: u64,
    addr: u64,
    key: u64,
    dt: sys::fi_datatype,
    op: sys::fi_op,
    ctx: *mut c_void,
) -> isize {
    entry!({
        let size = match dt_size(dt) {
            Ok(s) => s,
            Err(e) => return e,
        };
        // SAFETY: libfabric buffer contract (`count` elements).
        let ops = match unsafe { elems(buf, count, size) } {
            Ok(b) => b,
            Err(e) => return e,
        };
        let flags = op_flags(ep, true);
        atomic(
            ep,
            Kind::Write,
            ops,
            count,
            &[],
            &[],
            dest,
            addr,
            key,
            dt,
            op,
            ctx as u64,
            flags,
        )
    })
}

unsafe extern "C" fn at_writev(
    ep: *mut sys::fid_ep,
    iov: *const sys::fi_ioc,
    _desc: *mut *mut c_void,
    n: usize,
    dest: u64,
    addr: u64,
    key: u64,
    dt: sys::fi_datatype,
    op: sys::fi_op,
    ctx: *mut c_void,
) -> isize {
    entry!({
        let size = match dt_size(dt) {
            Ok(s) => s,
            Err(e) => return e,
        };
        // SAFETY: libfabric buffer contract.
        let (ops, count) = match unsafe { ioc_bytes(iov, n, size) } {
            Ok(b) => b,
            Err(e) => return e,
        };
        let flags = op_flags(ep, true);
        atomic(
            ep,
            Kind::Write,
            &ops,
            count,
            &[],
            &[],
            dest,
            addr,
            key,
            dt,
            op,
            ctx as u64,
            flags,
        )
    })
}

/// Shared by the `*msg` atomic calls.
///
/// # Safety
/// `msg` is NULL or a valid `fi_msg_atomic`; `compare`/`result` as for `ioc_bytes` /
/// `ioc_results`.
#[allow(clippy::too_many_arguments)]
unsafe fn atomic_msg(
    ep: *mut sys::fid_ep,
    kind: Kind,
    msg: *const sys::fi_msg_atomic,
    compare: *const sys::fi_ioc,
    compare_count: usize,
    result: *const sys::fi_ioc,
    result_count: usize,
    flags: u64,
) -> isize {
    if msg.is_null() {
        return -(fi::EINVAL as isize);
    }
    // SAFETY: non-NULL consumer message.
    let m = unsafe { &*msg };
    let size = match dt_size(m.datatype) {
        Ok(s) => s,
        Err(e) => return e,
    };
    if m.rma_iov.is_null() || m.rma_iov_count != 1 {
        // The device takes one remote range per atomic.
        return -(fi::EINVAL as isize);
    }
    // SAFETY: one entry (checked above).
    let r = unsafe { *m.rma_iov };
    // SAFETY: per this function's contract.
    let (ops, count) = match unsafe { ioc_bytes(m.msg_iov, m.iov_count, size) } {
        Ok(b) => b,
        Err(e) => return e,
    };
    // SAFETY: per this function's contract.
    let (cmp, _) = match unsafe { ioc_bytes(compare, compare_count, size) } {
        Ok(b) => b,
        Err(e) => return e,
    };
    // SAFETY: per this function's contract.
    let res = match unsafe { ioc_results(result, result_count, size) } {
        Ok(b) => b,
        Err(e) => return e,
    };
    let count = if count == 0 { r.count } else { count };
    atomic(
        ep,
        kind,
        &ops,
        count,
        &cmp,
        &res,
        m.addr,
        r.addr,
        r.key,
        m.datatype,
        m.op,
        m.context as u64,
        flags,
    )
}

unsafe extern "C" fn at_writemsg(
    ep: *mut sys::fid_ep,
    msg: *const sys::fi_msg_atomic,
    flags: u64,
) -> isize {
    let flags = flags & !vfabric::INJECT_CALL;
    // SAFETY: consumer message (NULL-checked inside).
    entry!(unsafe {
        atomic_msg(
            ep,
            Kind::Write,
            msg,
            std::ptr::null(),
            0,
            std::ptr::null(),
            0,
            flags,
        )
    })
}

unsafe extern "C" fn at_inject(
    ep: *mut sys::fid_ep,
    buf: *const c_void,
    count: usize,
    dest: u64,
    addr: u64,
    key: u64,
    dt: sys::fi_datatype,
    op: sys::fi_op,
) -> isize {
    entry!({
        let size = match dt_size(dt) {
            Ok(s) => s,
            Err(e) => return e,
        };
        // SAFETY: libfabric buffer contract (copied at post time).
        let ops = match unsafe { elems(buf, count, size) } {
            Ok(b) => b,
            Err(e) => return e,
        };
        atomic(
            ep,
            Kind::Write,
            ops,
            count,
            &[],
            &[],
            dest,
            addr,
            key,
            dt,
            op,
            0,
            fi::INJECT | vfabric::INJECT_CALL,
        )
    })
}

unsafe extern "C" fn at_readwrite(
    ep: *mut sys::fid_ep,
    buf: *const c_void,
    count: usize,
    _desc: *mut c_void,
    result: *mut c_void,
    _result_desc: *mut c_void,
    dest: u64,
    addr: u64,
    key: u64,
    dt: sys::fi_datatype,
    op: sys::fi_op,
    ctx: *mut c_void,
) -> isize {
    entry!({
        let size = match dt_size(dt) {
            Ok(s) => s,
            Err(e) => return e,
        };
        // SAFETY: libfabric buffer contract (NULL `buf` allowed for FI_ATOMIC_READ).
        let ops = match unsafe { elems(buf, if buf.is_null() { 0 } else { count }, size) } {
            Ok(b) => b,
            Err(e) => return e,
        };
        if result.is_null() || count == 0 {
            return -(fi::EINVAL as isize);
        }
        // SAFETY: the result buffer holds `count` elements until completion.
        let res = [unsafe { raw_iov(result, count * size) }];
        let flags = op_flags(ep, true);
        atomic(
            ep,
            Kind::Fetch,
            ops,
            count,
            &[],
            &res,
            dest,
            addr,
            key,
            dt,
            op,
            ctx as u64,
            flags,
        )
    })
}

unsafe extern "C" fn at_readwritev(
    ep: *mut sys::fid_ep,
    iov: *const sys::fi_ioc,
    _desc: *mut *mut c_void,
    n: usize,
    resultv: *mut sys::fi_ioc,
    _result_desc: *mut *mut c_void,
    result_count: usize,
    dest: u64,
    addr: u64,
    key: u64,
    dt: sys::fi_datatype,
    op: sys::fi_op,
    ctx: *mut c_void,
) -> isize {
    entry!({
        let size = match dt_size(dt) {
            Ok(s) => s,
            Err(e) => return e,
        };
        // SAFETY: libfabric buffer contract.
        let (ops, mut count) = match unsafe { ioc_bytes(iov, n, size) } {
            Ok(b) => b,
            Err(e) => return e,
        };
        // SAFETY: libfabric buffer contract.
        let res = match unsafe { ioc_results(resultv, result_count, size) } {
            Ok(b) => b,
            Err(e) => return e,
        };
        if count == 0 {
            count = total(&res) / size;
        }
        let flags = op_flags(ep, true);
        atomic(
            ep,
            Kind::Fetch,
            &ops,
            count,
            &[],
            &res,
            dest,
            addr,
            key,
            dt,
            op,
            ctx as u64,
            flags,
        )
    })
}

unsafe extern "C" fn at_readwritemsg(
    ep: *mut sys::fid_ep,
    msg: *const sys::fi_msg_atomic,
    resultv: *mut sys::fi_ioc,
    _result_desc: *mut *mut c_void,
    result_count: usize,
    flags: u64,
) -> isize {
    let flags = flags & !vfabric::INJECT_CALL;
    // SAFETY: consumer message and buffers (NULL-checked inside).
    entry!(unsafe {
        atomic_msg(
            ep,
            Kind::Fetch,
            msg,
            std::ptr::null(),
            0,
            resultv,
            result_count,
            flags,
        )
    })
}

unsafe extern "C" fn at_compwrite(
    ep: *mut sys::fid_ep,
    buf: *const c_void,
    count: usize,
    _desc: *mut c_void,
    compare: *const c_void,
    _compare_desc: *mut c_void,
    result: *mut c_void,
    _result_desc: *mut c_void,
    dest: u64,
    addr: u64,
    key: u64,
    dt: sys::fi_datatype,
    op: sys::fi_op,
    ctx: *mut c_void,
) -> isize {
    entry!({
        let size = match dt_size(dt) {
            Ok(s) => s,
            Err(e) => return e,
        };
        // SAFETY: libfabric buffer contract (`count` elements each).
        let (ops, cmp) = match unsafe { (elems(buf, count, size), elems(compare, count, size)) } {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return e,
        };
        if result.is_null() || count == 0 {
            return -(fi::EINVAL as isize);
        }
        // SAFETY: the result buffer holds `count` elements until completion.
        let res = [unsafe { raw_iov(result, count * size) }];
        let flags = op_flags(ep, true);
        atomic(
            ep,
            Kind::Compare,
            ops,
            count,
            cmp,
            &res,
            dest,
            addr,
            key,
            dt,
            op,
            ctx as u64,
            flags,
        )
    })
}

unsafe extern "C" fn at_compwritev(
    ep: *mut sys::fid_ep,
    iov: *const sys::fi_ioc,
    _desc: *mut *mut c_void,
    n: usize,
    comparev: *const sys::fi_ioc,
    _compare_desc: *mut *mut c_void,
    compare_count: usize,
    resultv: *mut sys::fi_ioc,
    _result_desc: *mut *mut c_void,
    result_count: usize,
    dest: u64,
    addr: u64,
    key: u64,
    dt: sys::fi_datatype,
    op: sys::fi_op,
    ctx: *mut c_void,
) -> isize {
    entry!({
        let size = match dt_size(dt) {
            Ok(s) => s,
            Err(e) => return e,
        };
        // SAFETY: libfabric buffer contract.
        let (ops, count) = match unsafe { ioc_bytes(iov, n, size) } {
            Ok(b) => b,
            Err(e) => return e,
        };
        // SAFETY: libfabric buffer contract.
        let (cmp, _) = match unsafe { ioc_bytes(comparev, compare_count, size) } {
            Ok(b) => b,
            Err(e) => return e,
        };
        // SAFETY: libfabric buffer contract.
        let res = match unsafe { ioc_results(resultv, result_count, size) } {
            Ok(b) => b,
            Err(e) => return e,
        };
        let flags = op_flags(ep, true);
        atomic(
            ep,
            Kind::Compare,
            &ops,
            count,
            &cmp,
            &res,
            dest,
            addr,
            key,
            dt,
            op,
            ctx as u64,
            flags,
        )
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn at_compwritemsg(
    ep: *mut sys::fid_ep,
    msg: *const sys::fi_msg_atomic,
    comparev: *const sys::fi_ioc,
    _compare_desc: *mut *mut c_void,
    compare_count: usize,
    resultv: *mut sys::fi_ioc,
    _result_desc: *mut *mut c_void,
    result_count: usize,
    flags: u64,
) -> isize {
    let flags = flags & !vfabric::INJECT_CALL;
    // SAFETY: consumer message and buffers (NULL-checked inside).
    entry!(unsafe {
        atomic_msg(
            ep,
            Kind::Compare,
            msg,
            comparev,
            compare_count,
            resultv,
            result_count,
            flags,
        )
    })
}

fn valid(
    ep: *mut sys::fid_ep,
    kind: Kind,
    dt: sys::fi_datatype,
    op: sys::fi_op,
    count: *mut usize,
) -> c_int {
    guard(|| {
        if count.is_null() {
            return -fi::EINVAL;
        }
        let e = match ep_of(ep) {
            Ok(e) => e,
            Err(x) => return x as c_int,
        };
        if e.caps & fi::ATOMIC == 0 {
            return -(sys::FI_EOPNOTSUPP as c_int);
        }
        let (Ok(dt), Ok(op)) = (u8::try_from(dt), u8::try_from(op)) else {
            return -(sys::FI_EOPNOTSUPP as c_int);
        };
        let r = match kind {
            Kind::Write => e.ep.atomic_valid(dt, op),
            Kind::Fetch => e.ep.fetch_atomic_valid(dt, op),
            Kind::Compare => e.ep.compare_atomic_valid(dt, op),
        };
        match r {
            Ok(n) => {
                // SAFETY: non-NULL consumer out-parameter.
                unsafe { *count = n };
                0
            }
            Err(err) => -errno_of(&err, sys::fi_log_subsys_FI_LOG_EP_DATA),
        }
    })
}

unsafe extern "C" fn at_writevalid(
    ep: *mut sys::fid_ep,
    dt: sys::fi_datatype,
    op: sys::fi_op,
    count: *mut usize,
) -> c_int {
    valid(ep, Kind::Write, dt, op, count)
}

unsafe extern "C" fn at_readwritevalid(
    ep: *mut sys::fid_ep,
    dt: sys::fi_datatype,
    op: sys::fi_op,
    count: *mut usize,
) -> c_int {
    valid(ep, Kind::Fetch, dt, op, count)
}

unsafe extern "C" fn at_compwritevalid(
    ep: *mut sys::fid_ep,
    dt: sys::fi_datatype,
    op: sys::fi_op,
    count: *mut usize,
) -> c_int {
    valid(ep, Kind::Compare, dt, op, count)
}
