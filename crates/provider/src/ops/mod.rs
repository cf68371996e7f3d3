// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Data-path op tables of endpoints: `msg`, `tagged`, `rma`, `atomic`. Every plain and `v`
//! call is normalised into its `*msg` form ([`Xfer`] for messages and RMA, `fi_msg_atomic`
//! for atomics) and each operation has one body.

pub mod atomic;
pub mod msg;
pub mod rma;
pub mod tagged;

use std::ffi::c_void;
use std::sync::atomic::Ordering;

use vfabric::{fi, Iov, Msg, TaggedMsg, FI_ADDR_UNSPEC};

use crate::ep::EpObj;
use crate::sys;
use crate::util::{check, slice, FidObject, OrErrno, Res};

pub type Ep = *mut sys::fid_ep;
pub type Ctx = *mut c_void;
pub type Desc = *mut c_void;
pub type Descs = *mut *mut c_void;

/// The endpoint of a data-path call (class checked).
pub fn ep_of<'a>(ep: Ep) -> Res<&'a EpObj> {
    // SAFETY: consumer passes one of our endpoints (NULL or foreign: -FI_EINVAL).
    unsafe { EpObj::from_fid(ep) }
}

/// The peer of an operation: the connected peer of an FI_EP_MSG endpoint, else `addr`.
pub fn peer(e: &EpObj, addr: u64) -> Res<u64> {
    match &e.conn {
        Some(c) => c.peer_fi_addr().ok_or(sys::FI_ENOTCONN as i32),
        None => Ok(addr),
    }
}

/// Where a call's operation flags come from.
#[derive(Clone, Copy)]
pub enum Flags {
    /// A plain or `v` call: the endpoint's op_flags (transmit or receive).
    Op,
    /// `*data`: the op_flags and FI_REMOTE_CQ_DATA.
    OpData,
    /// `fi_inject*`: no completion at all (an `*msg` call with FI_INJECT does complete).
    Inject,
    InjectData,
    /// A `*msg` call's own flags (never the driver's inject-call bit).
    Msg(u64),
}

impl Flags {
    fn resolve(self, e: &EpObj, send: bool) -> u64 {
        let inject = fi::INJECT | vfabric::INJECT_CALL;
        match self {
            Flags::Op => e.op_flags(send),
            Flags::OpData => e.op_flags(send) | fi::REMOTE_CQ_DATA,
            Flags::Inject => inject,
            Flags::InjectData => inject | fi::REMOTE_CQ_DATA,
            Flags::Msg(f) => f & !vfabric::INJECT_CALL,
        }
    }
}

/// An iov element from a C buffer.
///
/// # Safety
/// `buf` is NULL with `len == 0`, or valid for `len` bytes for the duration the operation
/// requires (the libfabric data-transfer contract).
pub unsafe fn raw_iov<'a>(buf: *const c_void, len: usize) -> Iov<'a> {
    if buf.is_null() || len == 0 {
        // Empty but writable: a zero-length receive is valid (`Iov::bytes` is send-only).
        // SAFETY: a dangling, aligned pointer is valid for zero bytes.
        unsafe { Iov::raw(std::ptr::NonNull::<u8>::dangling().as_ptr(), 0) }
    } else {
        // SAFETY: per the contract above (what `Iov::raw` requires).
        unsafe { Iov::raw(buf.cast_mut().cast(), len) }
    }
}

/// A message or RMA transfer in its normalised (`*msg`) form.
pub struct Xfer<'a> {
    pub iov: Vec<Iov<'a>>,
    /// The consumer's buffers and their descriptors (none if it passed no descriptor array).
    pub bufs: Vec<(*mut u8, usize)>,
    pub descs: Vec<*mut c_void>,
    pub addr: u64,
    pub tag: u64,
    pub ignore: u64,
    pub context: u64,
    pub data: u64,
}

impl<'a> Xfer<'a> {
    /// A transfer of `count` C iovecs with their descriptors (`desc` NULL: none).
    ///
    /// # Safety
    /// `iov` is NULL with `count == 0`, or holds `count` entries each satisfying
    /// [`raw_iov`]'s contract; `desc` is NULL or holds `count` entries.
    pub unsafe fn iov(
        iov: *const sys::iovec,
        desc: Descs,
        count: usize,
        addr: u64,
        ctx: Ctx,
    ) -> Res<Self> {
        // SAFETY: per this function's contract.
        let v = unsafe { slice(iov, count) }?;
        Ok(Xfer {
            // SAFETY: as above.
            iov: v
                .iter()
                .map(|v| unsafe { raw_iov(v.iov_base, v.iov_len) })
                .collect(),
            bufs: v.iter().map(|v| (v.iov_base.cast(), v.iov_len)).collect(),
            // SAFETY: as above.
            descs: unsafe { slice(desc, if desc.is_null() { 0 } else { count }) }?.to_vec(),
            addr,
            tag: 0,
            ignore: 0,
            context: ctx as u64,
            data: 0,
        })
    }

    /// A transfer of one buffer with its descriptor.
    ///
    /// # Safety
    /// As [`raw_iov`].
    pub unsafe fn buf(buf: *const c_void, len: usize, desc: Desc, addr: u64, ctx: Ctx) -> Self {
        let v = sys::iovec {
            iov_base: buf.cast_mut(),
            iov_len: len,
        };
        let mut d = desc;
        // SAFETY: one entry, per this function's contract.
        unsafe { Self::iov(&v, &mut d, 1, addr, ctx) }.expect("one entry")
    }

    /// An `fi_msg`.
    ///
    /// # Safety
    /// `m` is NULL or a valid message whose iovecs satisfy [`raw_iov`]'s contract.
    pub unsafe fn msg(m: *const sys::fi_msg) -> Res<Self> {
        // SAFETY: per this function's contract.
        let m = unsafe { m.as_ref() }.ok_or(fi::EINVAL)?;
        // SAFETY: as above.
        let x = unsafe { Self::iov(m.msg_iov, m.desc, m.iov_count, m.addr, m.context) }?;
        Ok(x.with_data(m.data))
    }

    /// An `fi_msg_tagged`.
    ///
    /// # Safety
    /// As [`Xfer::msg`].
    pub unsafe fn tagged_msg(m: *const sys::fi_msg_tagged) -> Res<Self> {
        // SAFETY: per this function's contract.
        let m = unsafe { m.as_ref() }.ok_or(fi::EINVAL)?;
        // SAFETY: as above.
        let x = unsafe { Self::iov(m.msg_iov, m.desc, m.iov_count, m.addr, m.context) }?;
        Ok(x.with_data(m.data).with_tag(m.tag, m.ignore))
    }

    pub fn with_data(mut self, data: u64) -> Self {
        self.data = data;
        self
    }

    pub fn with_tag(mut self, tag: u64, ignore: u64) -> Self {
        self.tag = tag;
        self.ignore = ignore;
        self
    }

    /// Bytes in the local buffers.
    pub fn len(&self) -> usize {
        self.iov.iter().map(|v| v.len()).sum()
    }
}

/// The one body of every send and receive, tagged or not.
pub fn post(ep: Ep, send: bool, tagged: bool, x: Xfer<'_>, flags: Flags) -> Res<isize> {
    let e = ep_of(ep)?;
    let flags = flags.resolve(e, send);
    if tagged && e.caps & fi::TAGGED == 0 {
        return Err(sys::FI_EOPNOTSUPP as i32);
    }
    let mut addr = x.addr;
    if let Some(c) = &e.conn {
        addr = if send {
            c.peer_fi_addr().ok_or(sys::FI_ENOTCONN as i32)?
        } else {
            // Receives take messages from the connected peer only, so they fail (PEER_GONE)
            // when it goes away; those posted before the connection completes take any.
            c.peer_fi_addr().unwrap_or(FI_ADDR_UNSPEC)
        };
    } else if !send && e.caps & fi::DIRECTED_RECV == 0 {
        addr = FI_ADDR_UNSPEC;
    }
    if !send && flags & fi::MULTI_RECV != 0 {
        // Emulated (the device has no MULTI_RECV): one contiguous buffer, untagged, in host
        // memory.
        check(!tagged && x.bufs.len() == 1)?;
        check(e.dom().hmem.held(&x.bufs, &x.descs).is_none())?;
        let (base, len) = x.bufs[0];
        let min = e.min_multi_recv.load(Ordering::Relaxed);
        e.dom()
            .multi
            .post(e, base, len, min, addr, x.context, flags)?;
        return Ok(0);
    }
    // Device memory: named as such; the driver stages it through the consumer's functions.
    let held = e.dom().hmem.held(&x.bufs, &x.descs);
    let named = crate::hmem::named(&x.iov, &held);
    let iov = &*named;
    // A receive's data is the sender's, not the consumer's.
    let data = if send { x.data } else { 0 };
    let r = if tagged {
        let m = TaggedMsg {
            iov,
            addr,
            tag: x.tag,
            ignore: x.ignore,
            context: x.context,
            data,
        };
        if send {
            e.ep.tsendmsg(&m, flags)
        } else {
            e.ep.trecvmsg(&m, flags)
        }
    } else {
        let m = Msg {
            iov,
            addr,
            context: x.context,
            data,
        };
        if send {
            e.ep.sendmsg(&m, flags)
        } else {
            e.ep.recvmsg(&m, flags)
        }
    };
    r.or_errno(sys::fi_log_subsys_FI_LOG_EP_DATA)?;
    Ok(0)
}
