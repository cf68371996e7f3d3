// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Endpoints (`fid_ep`): the msg and tagged tables map one-to-one onto `vfabric::Endpoint`'s
//! `sendmsg`/`tsendmsg`/`recvmsg`/`trecvmsg`; the RMA and atomic tables are in `rma`.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex};

use vfabric::{fi, BindFlags, Endpoint, EpAttr, EpType, Iov, Msg, TaggedMsg, FI_ADDR_UNSPEC};

use crate::addr::{Addr, Format};
use crate::domain::{AvObj, CqObj, DomainObj};
use crate::fabric::ops_ptr;
use crate::sys;
use crate::util::{errno_of, guard, nosys, obj, ParentRef, Refs};

/// Default `FI_OPT_MIN_MULTI_RECV`.
const DEFAULT_MIN_MULTI_RECV: usize = 64;

/// `fid_ep` (RDM, DGRAM, and MSG over an RDM device endpoint).
#[repr(C)]
pub struct EpObj {
    pub fid: sys::fid_ep,
    _domain: ParentRef,
    pub domain: *const DomainObj,
    pub ep: Endpoint,
    pub ep_type: EpType,
    pub caps: u64,
    tx_flags: AtomicU64,
    rx_flags: AtomicU64,
    bound: Mutex<Vec<ParentRef>>,
    /// The CQ bound for FI_RECV (for entries the provider makes itself: multirecv.rs).
    rx_cq: Mutex<Option<std::sync::Arc<vfabric::CompletionQueue>>>,
    min_multi_recv: AtomicUsize,
    pub cm_data_size: AtomicUsize,
    /// Connection state of an FI_EP_MSG endpoint.
    pub conn: Option<crate::cm::Conn>,
    /// Address format of the `fi_info` the endpoint was created from.
    pub addr_format: Format,
    /// Its source address (a host format's: the service to bind, 0 for any).
    pub src: Option<Addr>,
    /// The service bound in the host's service table (0: none yet).
    pub service: AtomicU16,
    pub refs: Refs,
}

impl EpObj {
    /// Bind the endpoint's service if its format names services and it has none yet: its
    /// source service, or any free one. The service bound.
    pub fn ensure_service(&self) -> Result<u16, i32> {
        let have = self.service.load(Ordering::Acquire);
        if have != 0 || !self.addr_format.is_host() {
            return Ok(have);
        }
        let want = match self.src {
            Some(Addr::Host(s)) => s.port(),
            _ => 0,
        };
        let got = self
            .ep
            .bind_service(want)
            .map_err(|e| errno_of(&e, sys::fi_log_subsys_FI_LOG_EP_CTRL))?;
        self.service.store(got, Ordering::Release);
        Ok(got)
    }

    /// The endpoint's name in its address format (`fi_getname`).
    pub fn name_bytes(&self) -> Result<Vec<u8>, i32> {
        name_in(
            self.addr_format,
            self.src,
            self.ep.name(),
            self.ensure_service()?,
        )
    }
}

/// The name of an endpoint (device address `native`, bound to `service`) in `format`.
pub fn name_in(
    format: Format,
    src: Option<Addr>,
    native: vfabric::FabricAddr,
    service: u16,
) -> Result<Vec<u8>, i32> {
    let a = if format.is_host() {
        let like = match src {
            Some(Addr::Host(s)) => Some(s.ip()),
            _ if format == Format::In6 => {
                Some(std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED))
            }
            _ => None,
        };
        Addr::Host(crate::addr::name_of(like, native, service))
    } else {
        Addr::Native(native)
    };
    crate::addr::encode(format, &a).ok_or(fi::EINVAL)
}

static EP_FI_OPS: LazyLock<sys::fi_ops> = LazyLock::new(|| sys::fi_ops {
    size: std::mem::size_of::<sys::fi_ops>(),
    close: Some(ep_close),
    bind: Some(ep_bind),
    control: Some(ep_control),
    ops_open: Some(crate::pmem::ep_ops_open),
    tostr: nosys(),
    ops_set: nosys(),
});

static EP_OPS: LazyLock<sys::fi_ops_ep> = LazyLock::new(|| sys::fi_ops_ep {
    size: std::mem::size_of::<sys::fi_ops_ep>(),
    cancel: Some(ep_cancel),
    getopt: Some(ep_getopt),
    setopt: Some(ep_setopt),
    tx_ctx: nosys(),
    rx_ctx: nosys(),
    rx_size_left: nosys(),
    tx_size_left: nosys(),
});

static CM_OPS: LazyLock<sys::fi_ops_cm> = LazyLock::new(|| sys::fi_ops_cm {
    size: std::mem::size_of::<sys::fi_ops_cm>(),
    setname: Some(ep_setname),
    getname: Some(ep_getname),
    getpeer: Some(crate::cm::ep_getpeer),
    connect: Some(crate::cm::ep_connect),
    listen: nosys(),
    accept: Some(crate::cm::ep_accept),
    reject: nosys(),
    shutdown: Some(crate::cm::ep_shutdown),
    join: nosys(),
});

static MSG_OPS: LazyLock<sys::fi_ops_msg> = LazyLock::new(|| sys::fi_ops_msg {
    size: std::mem::size_of::<sys::fi_ops_msg>(),
    recv: Some(msg_recv),
    recvv: Some(msg_recvv),
    recvmsg: Some(msg_recvmsg),
    send: Some(msg_send),
    sendv: Some(msg_sendv),
    sendmsg: Some(msg_sendmsg),
    inject: Some(msg_inject),
    senddata: Some(msg_senddata),
    injectdata: Some(msg_injectdata),
});

static TAGGED_OPS: LazyLock<sys::fi_ops_tagged> = LazyLock::new(|| sys::fi_ops_tagged {
    size: std::mem::size_of::<sys::fi_ops_tagged>(),
    recv: Some(t_recv),
    recvv: Some(t_recvv),
    recvmsg: Some(t_recvmsg),
    send: Some(t_send),
    sendv: Some(t_sendv),
    sendmsg: Some(t_sendmsg),
    inject: Some(t_inject),
    senddata: Some(t_senddata),
    injectdata: Some(t_injectdata),
});

static COLLECTIVE_OPS: LazyLock<sys::fi_ops_collective> =
    LazyLock::new(|| sys::fi_ops_collective {
        size: std::mem::size_of::<sys::fi_ops_collective>(),
        barrier: nosys(),
        broadcast: nosys(),
        alltoall: nosys(),
        allreduce: nosys(),
        allgather: nosys(),
        reduce_scatter: nosys(),
        reduce: nosys(),
        scatter: nosys(),
        gather: nosys(),
        msg: nosys(),
        barrier2: nosys(),
    });

/// The `fid_ep` header every endpoint gets (fclass, op tables).
pub fn ep_fid(context: *mut c_void) -> sys::fid_ep {
    sys::fid_ep {
        fid: sys::fid {
            fclass: sys::FI_CLASS_EP as usize,
            context,
            ops: ops_ptr(&*EP_FI_OPS),
        },
        ops: ops_ptr(&*EP_OPS),
        cm: ops_ptr(&*CM_OPS),
        msg: ops_ptr(&*MSG_OPS),
        rma: ops_ptr(&*crate::rma::RMA_OPS),
        tagged: ops_ptr(&*TAGGED_OPS),
        atomic: ops_ptr(&*crate::rma::ATOMIC_OPS),
        collective: ops_ptr(&*COLLECTIVE_OPS),
    }
}

pub unsafe extern "C" fn endpoint_open2(
    domain: *mut sys::fid_domain,
    info: *mut sys::fi_info,
    ep: *mut *mut sys::fid_ep,
    flags: u64,
    context: *mut c_void,
) -> c_int {
    if flags != 0 {
        return -fi::EINVAL;
    }
    // SAFETY: same contract as fi_endpoint.
    unsafe { endpoint_open(domain, info, ep, context) }
}

/// `fi_endpoint`.
pub unsafe extern "C" fn endpoint_open(
    domain: *mut sys::fid_domain,
    info: *mut sys::fi_info,
    ep: *mut *mut sys::fid_ep,
    context: *mut c_void,
) -> c_int {
    guard(|| {
        if info.is_null() || ep.is_null() {
            return -fi::EINVAL;
        }
        // SAFETY: consumer passes its domain.
        let d = match unsafe { obj::<DomainObj>(domain.cast(), sys::FI_CLASS_DOMAIN) } {
            Ok(d) => d,
            Err(e) => return -e,
        };
        // SAFETY: non-NULL consumer fi_info; attribute pointers NULL or valid.
        let i = unsafe { &*info };
        if i.ep_attr.is_null() {
            return -fi::EINVAL;
        }
        // SAFETY: non-NULL attribute.
        let ep_type = match unsafe { (*i.ep_attr).type_ } {
            sys::fi_ep_type_FI_EP_RDM => EpType::Rdm,
            sys::fi_ep_type_FI_EP_DGRAM => EpType::Dgram,
            sys::fi_ep_type_FI_EP_MSG => EpType::Msg,
            _ => return -fi::EINVAL,
        };
        let caps = if i.caps == 0 {
            crate::info::caps_of(&d.info, ep_type)
        } else {
            i.caps
        };
        let tx_flags = if i.tx_attr.is_null() {
            0
        } else {
            // SAFETY: non-NULL attribute of the consumer's valid fi_info.
            unsafe { (*i.tx_attr).op_flags }
        };
        let rx_flags = if i.rx_attr.is_null() {
            0
        } else {
            // SAFETY: non-NULL attribute of the consumer's valid fi_info.
            unsafe { (*i.rx_attr).op_flags }
        };
        let dev_type = if ep_type == EpType::Msg {
            EpType::Rdm
        } else {
            ep_type
        };
        let handle = match d.dom.endpoint(EpAttr { ep_type: dev_type }) {
            Ok(e) => e,
            Err(e) => return -errno_of(&e, sys::fi_log_subsys_FI_LOG_EP_CTRL),
        };
        let conn = if ep_type == EpType::Msg {
            match crate::cm::Conn::new(d, &handle, i) {
                Ok(c) => Some(c),
                Err(e) => return -e,
            }
        } else {
            None
        };
        let addr_format = Format::from_fi(i.addr_format).unwrap_or(Format::Native);
        // SAFETY: fi_info's src_addr is valid for src_addrlen bytes.
        let src = (!i.src_addr.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(i.src_addr.cast::<u8>(), i.src_addrlen) })
            .and_then(|b| crate::addr::decode(addr_format, b))
            .map(|a| match a {
                // An endpoint accepting a connection request shares the listener's source
                // address; the service stays the listener's, the endpoint takes any other.
                Addr::Host(h) if !i.handle.is_null() => {
                    Addr::Host(std::net::SocketAddr::new(h.ip(), 0))
                }
                a => a,
            });
        let obj = Box::new(EpObj {
            fid: ep_fid(context),
            // SAFETY: the domain refuses to close while this count is held.
            _domain: unsafe { ParentRef::new(&d.refs) },
            domain: d,
            ep: handle,
            ep_type,
            caps,
            tx_flags: AtomicU64::new(tx_flags),
            rx_flags: AtomicU64::new(rx_flags),
            bound: Mutex::new(Vec::new()),
            rx_cq: Mutex::new(None),
            min_multi_recv: AtomicUsize::new(DEFAULT_MIN_MULTI_RECV),
            cm_data_size: AtomicUsize::new(crate::info::CM_DATA_SIZE),
            conn,
            addr_format,
            src,
            service: AtomicU16::new(0),
            refs: Refs::default(),
        });
        // SAFETY: valid out pointer; the consumer owns the box until fi_close.
        unsafe { *ep = Box::into_raw(obj).cast() };
        0
    })
}

unsafe extern "C" fn ep_close(fid: *mut sys::fid) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our endpoints.
        let e = match unsafe { obj::<EpObj>(fid, sys::FI_CLASS_EP) } {
            Ok(e) => e,
            Err(e) => return -e,
        };
        if e.refs.busy() {
            return -fi::EBUSY;
        }
        if let Some(c) = &e.conn {
            c.close();
        }
        // SAFETY: the domain outlives its endpoints (ParentRef).
        unsafe { &(*e.domain).multi }.remove_ep(e);
        // SAFETY: created by Box::into_raw in endpoint_open; dropping it closes the device
        // endpoint and releases the bound CQ/AV/EQ counts.
        drop(unsafe { Box::from_raw(fid.cast::<EpObj>()) });
        0
    })
}

unsafe extern "C" fn ep_bind(fid: *mut sys::fid, bfid: *mut sys::fid, flags: u64) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our endpoints.
        let e = match unsafe { obj::<EpObj>(fid, sys::FI_CLASS_EP) } {
            Ok(e) => e,
            Err(e) => return -e,
        };
        if bfid.is_null() {
            return -fi::EINVAL;
        }
        // SAFETY: non-NULL fid from the consumer.
        let class = unsafe { (*bfid).fclass } as u32;
        let r = match class {
            sys::FI_CLASS_CQ => {
                // SAFETY: class checked; one of our CQs.
                let c = match unsafe { obj::<CqObj>(bfid, class) } {
                    Ok(c) => c,
                    Err(e) => return -e,
                };
                if flags & (fi::TRANSMIT | fi::RECV) == 0 {
                    return -fi::EBADFLAGS;
                }
                let r = e.ep.bind_cq(&c.cq, BindFlags::from_fi(flags));
                if r.is_ok() && flags & fi::RECV != 0 {
                    *e.rx_cq.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.cq.clone());
                }
                r.map(|_| &c.refs)
            }
            sys::FI_CLASS_AV => {
                if e.ep_type == EpType::Msg {
                    return -fi::EINVAL;
                }
                // SAFETY: class checked; one of our AVs.
                let a = match unsafe { obj::<AvObj>(bfid, class) } {
                    Ok(a) => a,
                    Err(e) => return -e,
                };
                e.ep.bind_av(&a.av).map(|_| &a.refs)
            }
            sys::FI_CLASS_EQ => {
                let Some(c) = &e.conn else {
                    // RDM/DGRAM endpoints report nothing on an EQ: accepted and unused.
                    return 0;
                };
                // SAFETY: class checked; one of our EQs.
                let q = match unsafe { obj::<crate::fabric::EqObj>(bfid, class) } {
                    Ok(q) => q,
                    Err(e) => return -e,
                };
                c.bind_eq(q, fid, e.fid.fid.context);
                Ok(&q.refs)
            }
            sys::FI_CLASS_CNTR => {
                // SAFETY: class checked; one of our counters.
                let c = match unsafe { obj::<crate::domain::CntrObj>(bfid, class) } {
                    Ok(c) => c,
                    Err(e) => return -e,
                };
                e.ep.bind_cntr(&c.cntr, flags).map(|_| &c.refs)
            }
            sys::FI_CLASS_MR => return -fi::ENOSYS,
            _ => return -fi::EINVAL,
        };
        match r {
            Ok(refs) => {
                // SAFETY: the bound object refuses to close while this count is held.
                let pr = unsafe { ParentRef::new(refs) };
                e.bound.lock().unwrap_or_else(|e| e.into_inner()).push(pr);
                0
            }
            Err(err) => -errno_of(&err, sys::fi_log_subsys_FI_LOG_EP_CTRL),
        }
    })
}

unsafe extern "C" fn ep_control(fid: *mut sys::fid, cmd: c_int, arg: *mut c_void) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our endpoints.
        let e = match unsafe { obj::<EpObj>(fid, sys::FI_CLASS_EP) } {
            Ok(e) => e,
            Err(e) => return -e,
        };
        match cmd as u32 {
            sys::FI_ENABLE => match e.ep.enable() {
                // An endpoint of a host format takes its service now (-FI_EADDRINUSE if
                // another endpoint holds it).
                Ok(()) => match e.ensure_service() {
                    Ok(_) => 0,
                    Err(err) => -err,
                },
                Err(err) => -errno_of(&err, sys::fi_log_subsys_FI_LOG_EP_CTRL),
            },
            sys::FI_GETOPSFLAG | sys::FI_SETOPSFLAG => {
                if arg.is_null() {
                    return -fi::EINVAL;
                }
                let p = arg.cast::<u64>();
                // SAFETY: for these commands `arg` is a `uint64_t *` (flags in/out).
                let f = unsafe { *p };
                let slot = if f & fi::TRANSMIT != 0 && f & fi::RECV == 0 {
                    &e.tx_flags
                } else if f & fi::RECV != 0 && f & fi::TRANSMIT == 0 {
                    &e.rx_flags
                } else {
                    return -fi::EINVAL;
                };
                if cmd as u32 == sys::FI_GETOPSFLAG {
                    // SAFETY: as above.
                    unsafe { *p = slot.load(Ordering::Relaxed) };
                } else {
                    slot.store(f & !(fi::TRANSMIT | fi::RECV), Ordering::Relaxed);
                }
                0
            }
            _ => -fi::ENOSYS,
        }
    })
}

impl EpObj {
    /// Queue an error entry made by the provider on the endpoint's receive CQ (dropped if none
    /// is bound: there is nobody to tell).
    pub fn push_rx_error(&self, e: vfabric::CqErrEntry) {
        if let Some(cq) = &*self.rx_cq.lock().unwrap_or_else(|p| p.into_inner()) {
            cq.push_error(e);
        }
    }
}

unsafe extern "C" fn ep_cancel(fid: *mut sys::fid, context: *mut c_void) -> isize {
    guard(|| {
        // SAFETY: consumer passes one of our endpoints.
        let e = match unsafe { obj::<EpObj>(fid, sys::FI_CLASS_EP) } {
            Ok(e) => e,
            Err(e) => return -(e as isize),
        };
        // SAFETY: the domain outlives its endpoints (ParentRef).
        let multi = unsafe { &(*e.domain).multi };
        if multi.cancel_waiting(e, context as u64) {
            return 0;
        }
        let ctx = multi
            .internal_ctx(e, context as u64)
            .unwrap_or(context as u64);
        match e.ep.cancel(ctx) {
            Ok(()) => 0,
            Err(vfabric::Error::NotFound(_)) => -(fi::ENOENT as isize),
            Err(err) => -(errno_of(&err, sys::fi_log_subsys_FI_LOG_EP_CTRL) as isize),
        }
    })
}

unsafe extern "C" fn ep_getopt(
    fid: *mut sys::fid,
    level: c_int,
    optname: c_int,
    optval: *mut c_void,
    optlen: *mut usize,
) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our endpoints.
        let e = match unsafe { obj::<EpObj>(fid, sys::FI_CLASS_EP) } {
            Ok(e) => e,
            Err(e) => return -e,
        };
        if optval.is_null() || optlen.is_null() {
            return -fi::EINVAL;
        }
        if level as u32 != sys::FI_OPT_ENDPOINT {
            return -(sys::FI_ENOPROTOOPT as i32);
        }
        let v = match optname as u32 {
            sys::FI_OPT_MIN_MULTI_RECV => e.min_multi_recv.load(Ordering::Relaxed),
            sys::FI_OPT_CM_DATA_SIZE => e.cm_data_size.load(Ordering::Relaxed),
            _ => return -(sys::FI_ENOPROTOOPT as i32),
        };
        // SAFETY: `optlen` valid; `optval` writable for *optlen bytes when large enough.
        unsafe {
            if *optlen < std::mem::size_of::<usize>() {
                *optlen = std::mem::size_of::<usize>();
                return -fi::ETOOSMALL;
            }
            optval.cast::<usize>().write_unaligned(v);
            *optlen = std::mem::size_of::<usize>();
        }
        0
    })
}

unsafe extern "C" fn ep_setopt(
    fid: *mut sys::fid,
    level: c_int,
    optname: c_int,
    optval: *const c_void,
    optlen: usize,
) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our endpoints.
        let e = match unsafe { obj::<EpObj>(fid, sys::FI_CLASS_EP) } {
            Ok(e) => e,
            Err(e) => return -e,
        };
        if optval.is_null() || optlen < std::mem::size_of::<usize>() {
            return -fi::EINVAL;
        }
        if level as u32 != sys::FI_OPT_ENDPOINT {
            return -(sys::FI_ENOPROTOOPT as i32);
        }
        // SAFETY: `optval` readable for `optlen` ≥ sizeof(size_t) bytes.
        let v = unsafe { optval.cast::<usize>().read_unaligned() };
        match optname as u32 {
            sys::FI_OPT_MIN_MULTI_RECV => e.min_multi_recv.store(v, Ordering::Relaxed),
            sys::FI_OPT_CM_DATA_SIZE => {
                if v > crate::info::CM_DATA_SIZE {
                    return -fi::EINVAL;
                }
                e.cm_data_size.store(v, Ordering::Relaxed)
            }
            _ => return -(sys::FI_ENOPROTOOPT as i32),
        }
        0
    })
}

pub unsafe extern "C" fn ep_getname(
    fid: *mut sys::fid,
    addr: *mut c_void,
    addrlen: *mut usize,
) -> c_int {
    guard(|| {
        if addrlen.is_null() {
            return -fi::EINVAL;
        }
        // SAFETY: fid is an endpoint or passive endpoint of ours.
        let b = match unsafe { crate::cm::local_name(fid) } {
            Ok(n) => n,
            Err(e) => return -e,
        };
        // SAFETY: `addrlen` valid; `addr` writable for *addrlen bytes when large enough.
        unsafe { crate::addr::copy_out(&b, addr, addrlen) }
    })
}

/// `fi_setname`: device endpoint addresses are assigned by the device; setting the address
/// the endpoint already has succeeds, any other is `-FI_EINVAL`.
pub unsafe extern "C" fn ep_setname(
    fid: *mut sys::fid,
    addr: *mut c_void,
    addrlen: usize,
) -> c_int {
    guard(|| {
        if addr.is_null() || addrlen == 0 {
            return -fi::EINVAL;
        }
        // SAFETY: fid is an endpoint or passive endpoint of ours.
        let name = match unsafe { crate::cm::local_name(fid) } {
            Ok(n) => n,
            Err(e) => return -e,
        };
        // SAFETY: `addr` readable for `addrlen` bytes.
        let b = unsafe { std::slice::from_raw_parts(addr.cast::<u8>(), addrlen) };
        if b == name.as_slice() {
            0
        } else {
            -fi::EINVAL
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Data path
// ---------------------------------------------------------------------------------------------

/// One posting, as the tables pass it.
struct Post<'a> {
    /// The single buffer of a `*msg` call with one iov (for FI_MULTI_RECV).
    raw: Option<(*mut u8, usize)>,
    send: bool,
    tagged: bool,
    iov: &'a [Iov<'a>],
    addr: u64,
    tag: u64,
    ignore: u64,
    context: u64,
    data: u64,
    flags: u64,
}

fn post(ep: *mut sys::fid_ep, p: Post<'_>) -> isize {
    // SAFETY: consumer passes one of our endpoints.
    let e = match unsafe { obj::<EpObj>(ep.cast(), sys::FI_CLASS_EP) } {
        Ok(e) => e,
        Err(err) => return -(err as isize),
    };
    if p.tagged && e.caps & fi::TAGGED == 0 {
        return -(sys::FI_EOPNOTSUPP as isize);
    }
    let mut addr = p.addr;
    if let Some(c) = &e.conn {
        if p.send {
            match c.peer_fi_addr() {
                Some(a) => addr = a,
                None => return -(sys::FI_ENOTCONN as isize),
            }
        } else {
            // Receives take messages from the connected peer only, so they fail (PEER_GONE)
            // when it goes away; those posted before the connection completes take any.
            addr = c.peer_fi_addr().unwrap_or(FI_ADDR_UNSPEC);
        }
    } else if !p.send && e.caps & fi::DIRECTED_RECV == 0 {
        addr = FI_ADDR_UNSPEC;
    }
    if !p.send && p.flags & fi::MULTI_RECV != 0 {
        // Emulated (the device has no MULTI_RECV): one contiguous buffer, untagged.
        if p.tagged || p.iov.len() != 1 {
            return -(fi::EINVAL as isize);
        }
        let Some((base, len)) = p.raw else {
            return -(fi::EINVAL as isize);
        };
        // SAFETY: the domain outlives its endpoints (ParentRef).
        let d = unsafe { &*e.domain };
        let min = e.min_multi_recv.load(Ordering::Relaxed);
        return match d.multi.post(e, base, len, min, addr, p.context, p.flags) {
            Ok(()) => 0,
            Err(err) => -(err as isize),
        };
    }
    let r = if p.tagged {
        let m = TaggedMsg {
            iov: p.iov,
            addr,
            tag: p.tag,
            ignore: p.ignore,
            context: p.context,
            data: p.data,
        };
        if p.send {
            e.ep.tsendmsg(&m, p.flags)
        } else {
            e.ep.trecvmsg(&m, p.flags)
        }
    } else {
        let m = Msg {
            iov: p.iov,
            addr,
            context: p.context,
            data: p.data,
        };
        if p.send {
            e.ep.sendmsg(&m, p.flags)
        } else {
            e.ep.recvmsg(&m, p.flags)
        }
    };
    match r {
        Ok(()) => 0,
        Err(err) => -(errno_of(&err, sys::fi_log_subsys_FI_LOG_EP_DATA) as isize),
    }
}

pub(crate) fn op_flags(ep: *mut sys::fid_ep, send: bool) -> u64 {
    // SAFETY: consumer passes one of our endpoints (re-checked by `post`).
    match unsafe { obj::<EpObj>(ep.cast(), sys::FI_CLASS_EP) } {
        Ok(e) if send => e.tx_flags.load(Ordering::Relaxed),
        Ok(e) => e.rx_flags.load(Ordering::Relaxed),
        Err(_) => 0,
    }
}

/// An iov element from a C buffer.
///
/// # Safety
/// `buf` is NULL with `len == 0`, or valid for `len` bytes for the duration the operation
/// requires (the libfabric data-transfer contract).
pub(crate) unsafe fn raw_iov<'a>(buf: *const c_void, len: usize) -> Iov<'a> {
    if buf.is_null() || len == 0 {
        // Empty but writable: a zero-length receive is valid (`Iov::bytes` is send-only).
        // SAFETY: a dangling, aligned pointer is valid for zero bytes.
        unsafe { Iov::raw(std::ptr::NonNull::<u8>::dangling().as_ptr(), 0) }
    } else {
        // SAFETY: per the contract above (what `Iov::raw` requires).
        unsafe { Iov::raw(buf.cast_mut().cast(), len) }
    }
}

/// iov elements from a C `struct iovec` array.
///
/// # Safety
/// `iov` is NULL with `count == 0`, or holds `count` entries each satisfying `raw_iov`'s
/// contract.
pub(crate) unsafe fn iov_vec<'a>(
    iov: *const sys::iovec,
    count: usize,
) -> Result<Vec<Iov<'a>>, isize> {
    if iov.is_null() && count > 0 {
        return Err(-(fi::EINVAL as isize));
    }
    Ok((0..count)
        // SAFETY: `iov` holds `count` entries.
        .map(|k| unsafe {
            let v = &*iov.add(k);
            raw_iov(v.iov_base, v.iov_len)
        })
        .collect())
}

/// Flags of a plain send (`fi_send`/`fi_senddata`): the endpoint's transmit op_flags.
fn send_flags(ep: *mut sys::fid_ep, data: bool) -> u64 {
    op_flags(ep, true) | if data { fi::REMOTE_CQ_DATA } else { 0 }
}

/// Flags of an `fi_inject*` call: no completion at all (an `fi_sendmsg` with FI_INJECT does
/// complete).
fn inject_flags(data: bool) -> u64 {
    fi::INJECT | vfabric::INJECT_CALL | if data { fi::REMOTE_CQ_DATA } else { 0 }
}

macro_rules! entry {
    ($body:expr) => {
        guard(|| -> isize { $body })
    };
}

unsafe extern "C" fn msg_recv(
    ep: *mut sys::fid_ep,
    buf: *mut c_void,
    len: usize,
    _desc: *mut c_void,
    src: u64,
    ctx: *mut c_void,
) -> isize {
    entry!({
        // SAFETY: libfabric receive-buffer contract (valid until completion).
        let iov = [unsafe { raw_iov(buf, len) }];
        post(
            ep,
            Post {
                raw: None,
                send: false,
                tagged: false,
                iov: &iov,
                addr: src,
                tag: 0,
                ignore: 0,
                context: ctx as u64,
                data: 0,
                flags: op_flags(ep, false),
            },
        )
    })
}

unsafe extern "C" fn msg_recvv(
    ep: *mut sys::fid_ep,
    iov: *const sys::iovec,
    _desc: *mut *mut c_void,
    count: usize,
    src: u64,
    ctx: *mut c_void,
) -> isize {
    entry!({
        // SAFETY: libfabric iov contract.
        let v = match unsafe { iov_vec(iov, count) } {
            Ok(v) => v,
            Err(e) => return e,
        };
        post(
            ep,
            Post {
                raw: None,
                send: false,
                tagged: false,
                iov: &v,
                addr: src,
                tag: 0,
                ignore: 0,
                context: ctx as u64,
                data: 0,
                flags: op_flags(ep, false),
            },
        )
    })
}

unsafe extern "C" fn msg_recvmsg(
    ep: *mut sys::fid_ep,
    msg: *const sys::fi_msg,
    flags: u64,
) -> isize {
    entry!({
        if msg.is_null() {
            return -(fi::EINVAL as isize);
        }
        // SAFETY: non-NULL consumer message.
        let m = unsafe { &*msg };
        // SAFETY: libfabric iov contract.
        let v = match unsafe { iov_vec(m.msg_iov, m.iov_count) } {
            Ok(v) => v,
            Err(e) => return e,
        };
        let raw = if m.iov_count == 1 && !m.msg_iov.is_null() {
            // SAFETY: one consumer iovec.
            let v0 = unsafe { &*m.msg_iov };
            Some((v0.iov_base.cast::<u8>(), v0.iov_len))
        } else {
            None
        };
        post(
            ep,
            Post {
                raw,
                send: false,
                tagged: false,
                iov: &v,
                addr: m.addr,
                tag: 0,
                ignore: 0,
                context: m.context as u64,
                data: 0,
                flags,
            },
        )
    })
}

unsafe extern "C" fn msg_send(
    ep: *mut sys::fid_ep,
    buf: *const c_void,
    len: usize,
    _desc: *mut c_void,
    dest: u64,
    ctx: *mut c_void,
) -> isize {
    entry!({
        // SAFETY: libfabric send-buffer contract.
        let iov = [unsafe { raw_iov(buf, len) }];
        post(
            ep,
            Post {
                raw: None,
                send: true,
                tagged: false,
                iov: &iov,
                addr: dest,
                tag: 0,
                ignore: 0,
                context: ctx as u64,
                data: 0,
                flags: send_flags(ep, false),
            },
        )
    })
}

unsafe extern "C" fn msg_sendv(
    ep: *mut sys::fid_ep,
    iov: *const sys::iovec,
    _desc: *mut *mut c_void,
    count: usize,
    dest: u64,
    ctx: *mut c_void,
) -> isize {
    entry!({
        // SAFETY: libfabric iov contract.
        let v = match unsafe { iov_vec(iov, count) } {
            Ok(v) => v,
            Err(e) => return e,
        };
        post(
            ep,
            Post {
                raw: None,
                send: true,
                tagged: false,
                iov: &v,
                addr: dest,
                tag: 0,
                ignore: 0,
                context: ctx as u64,
                data: 0,
                flags: send_flags(ep, false),
            },
        )
    })
}

unsafe extern "C" fn msg_sendmsg(
    ep: *mut sys::fid_ep,
    msg: *const sys::fi_msg,
    flags: u64,
) -> isize {
    // A consumer's flags never carry the driver's inject-call bit.
    let flags = flags & !vfabric::INJECT_CALL;
    entry!({
        if msg.is_null() {
            return -(fi::EINVAL as isize);
        }
        // SAFETY: non-NULL consumer message.
        let m = unsafe { &*msg };
        // SAFETY: libfabric iov contract.
        let v = match unsafe { iov_vec(m.msg_iov, m.iov_count) } {
            Ok(v) => v,
            Err(e) => return e,
        };
        post(
            ep,
            Post {
                raw: None,
                send: true,
                tagged: false,
                iov: &v,
                addr: m.addr,
                tag: 0,
                ignore: 0,
                context: m.context as u64,
                data: m.data,
                flags,
            },
        )
    })
}

unsafe extern "C" fn msg_inject(
    ep: *mut sys::fid_ep,
    buf: *const c_void,
    len: usize,
    dest: u64,
) -> isize {
    entry!({
        // SAFETY: inject buffers are read during the call only.
        let iov = [unsafe { raw_iov(buf, len) }];
        post(
            ep,
            Post {
                raw: None,
                send: true,
                tagged: false,
                iov: &iov,
                addr: dest,
                tag: 0,
                ignore: 0,
                context: 0,
                data: 0,
                flags: inject_flags(false),
            },
        )
    })
}

unsafe extern "C" fn msg_senddata(
    ep: *mut sys::fid_ep,
    buf: *const c_void,
    len: usize,
    _desc: *mut c_void,
    data: u64,
    dest: u64,
    ctx: *mut c_void,
) -> isize {
    entry!({
        // SAFETY: libfabric send-buffer contract.
        let iov = [unsafe { raw_iov(buf, len) }];
        post(
            ep,
            Post {
                raw: None,
                send: true,
                tagged: false,
                iov: &iov,
                addr: dest,
                tag: 0,
                ignore: 0,
                context: ctx as u64,
                data,
                flags: send_flags(ep, true),
            },
        )
    })
}

unsafe extern "C" fn msg_injectdata(
    ep: *mut sys::fid_ep,
    buf: *const c_void,
    len: usize,
    data: u64,
    dest: u64,
) -> isize {
    entry!({
        // SAFETY: inject buffers are read during the call only.
        let iov = [unsafe { raw_iov(buf, len) }];
        post(
            ep,
            Post {
                raw: None,
                send: true,
                tagged: false,
                iov: &iov,
                addr: dest,
                tag: 0,
                ignore: 0,
                context: 0,
                data,
                flags: inject_flags(true),
            },
        )
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn t_recv(
    ep: *mut sys::fid_ep,
    buf: *mut c_void,
    len: usize,
    _desc: *mut c_void,
    src: u64,
    tag: u64,
    ignore: u64,
    ctx: *mut c_void,
) -> isize {
    entry!({
        // SAFETY: libfabric receive-buffer contract.
        let iov = [unsafe { raw_iov(buf, len) }];
        post(
            ep,
            Post {
                raw: None,
                send: false,
                tagged: true,
                iov: &iov,
                addr: src,
                tag,
                ignore,
                context: ctx as u64,
                data: 0,
                flags: op_flags(ep, false),
            },
        )
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn t_recvv(
    ep: *mut sys::fid_ep,
    iov: *const sys::iovec,
    _desc: *mut *mut c_void,
    count: usize,
    src: u64,
    tag: u64,
    ignore: u64,
    ctx: *mut c_void,
) -> isize {
    entry!({
        // SAFETY: libfabric iov contract.
        let v = match unsafe { iov_vec(iov, count) } {
            Ok(v) => v,
            Err(e) => return e,
        };
        post(
            ep,
            Post {
                raw: None,
                send: false,
                tagged: true,
                iov: &v,
                addr: src,
                tag,
                ignore,
                context: ctx as u64,
                data: 0,
                flags: op_flags(ep, false),
            },
        )
    })
}

unsafe extern "C" fn t_recvmsg(
    ep: *mut sys::fid_ep,
    msg: *const sys::fi_msg_tagged,
    flags: u64,
) -> isize {
    entry!({
        if msg.is_null() {
            return -(fi::EINVAL as isize);
        }
        // SAFETY: non-NULL consumer message.
        let m = unsafe { &*msg };
        // SAFETY: libfabric iov contract.
        let v = match unsafe { iov_vec(m.msg_iov, m.iov_count) } {
            Ok(v) => v,
            Err(e) => return e,
        };
        post(
            ep,
            Post {
                raw: None,
                send: false,
                tagged: true,
                iov: &v,
                addr: m.addr,
                tag: m.tag,
                ignore: m.ignore,
                context: m.context as u64,
                data: 0,
                flags,
            },
        )
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn t_send(
    ep: *mut sys::fid_ep,
    buf: *const c_void,
    len: usize,
    _desc: *mut c_void,
    dest: u64,
    tag: u64,
    ctx: *mut c_void,
) -> isize {
    entry!({
        // SAFETY: libfabric send-buffer contract.
        let iov = [unsafe { raw_iov(buf, len) }];
        post(
            ep,
            Post {
                raw: None,
                send: true,
                tagged: true,
                iov: &iov,
                addr: dest,
                tag,
                ignore: 0,
                context: ctx as u64,
                data: 0,
                flags: send_flags(ep, false),
            },
        )
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn t_sendv(
    ep: *mut sys::fid_ep,
    iov: *const sys::iovec,
    _desc: *mut *mut c_void,
    count: usize,
    dest: u64,
    tag: u64,
    ctx: *mut c_void,
) -> isize {
    entry!({
        // SAFETY: libfabric iov contract.
        let v = match unsafe { iov_vec(iov, count) } {
            Ok(v) => v,
            Err(e) => return e,
        };
        post(
            ep,
            Post {
                raw: None,
                send: true,
                tagged: true,
                iov: &v,
                addr: dest,
                tag,
                ignore: 0,
                context: ctx as u64,
                data: 0,
                flags: send_flags(ep, false),
            },
        )
    })
}

unsafe extern "C" fn t_sendmsg(
    ep: *mut sys::fid_ep,
    msg: *const sys::fi_msg_tagged,
    flags: u64,
) -> isize {
    // A consumer's flags never carry the driver's inject-call bit.
    let flags = flags & !vfabric::INJECT_CALL;
    entry!({
        if msg.is_null() {
            return -(fi::EINVAL as isize);
        }
        // SAFETY: non-NULL consumer message.
        let m = unsafe { &*msg };
        // SAFETY: libfabric iov contract.
        let v = match unsafe { iov_vec(m.msg_iov, m.iov_count) } {
            Ok(v) => v,
            Err(e) => return e,
        };
        post(
            ep,
            Post {
                raw: None,
                send: true,
                tagged: true,
                iov: &v,
                addr: m.addr,
                tag: m.tag,
                ignore: 0,
                context: m.context as u64,
                data: m.data,
                flags,
            },
        )
    })
}

unsafe extern "C" fn t_inject(
    ep: *mut sys::fid_ep,
    buf: *const c_void,
    len: usize,
    dest: u64,
    tag: u64,
) -> isize {
    entry!({
        // SAFETY: inject buffers are read during the call only.
        let iov = [unsafe { raw_iov(buf, len) }];
        post(
            ep,
            Post {
                raw: None,
                send: true,
                tagged: true,
                iov: &iov,
                addr: dest,
                tag,
                ignore: 0,
                context: 0,
                data: 0,
                flags: inject_flags(false),
            },
        )
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn t_senddata(
    ep: *mut sys::fid_ep,
    buf: *const c_void,
    len: usize,
    _desc: *mut c_void,
    data: u64,
    dest: u64,
    tag: u64,
    ctx: *mut c_void,
) -> isize {
    entry!({
        // SAFETY: libfabric send-buffer contract.
        let iov = [unsafe { raw_iov(buf, len) }];
        post(
            ep,
            Post {
                raw: None,
                send: true,
                tagged: true,
                iov: &iov,
                addr: dest,
                tag,
                ignore: 0,
                context: ctx as u64,
                data,
                flags: send_flags(ep, true),
            },
        )
    })
}

unsafe extern "C" fn t_injectdata(
    ep: *mut sys::fid_ep,
    buf: *const c_void,
    len: usize,
    data: u64,
    dest: u64,
    tag: u64,
) -> isize {
    entry!({
        // SAFETY: inject buffers are read during the call only.
        let iov = [unsafe { raw_iov(buf, len) }];
        post(
            ep,
            Post {
                raw: None,
                send: true,
                tagged: true,
                iov: &iov,
                addr: dest,
                tag,
                ignore: 0,
                context: 0,
                data,
                flags: inject_flags(true),
            },
        )
    })
}
