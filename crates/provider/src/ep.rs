// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Endpoints (`fid_ep`): the object, its control operations and names. The data-path tables
//! (msg, tagged, RMA, atomic) are in `ops`; connection management in `cm`.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use vfabric::{fi, BindFlags, Endpoint, EpAttr, EpType};

use crate::addr::{Addr, Format};
use crate::av::AvObj;
use crate::cntr::CntrObj;
use crate::cq::CqObj;
use crate::domain::DomainObj;
use crate::eq::EqObj;
use crate::sys;
use crate::util::{
    check, ffi_fns, fid_object, ops_ptr, ops_table, FidObject, OrErrno, ParentRef, Refs, Res,
};

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
    pub min_multi_recv: AtomicUsize,
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

fid_object!(EpObj, FI_CLASS_EP, refs: refs, closing: EpObj::closing_conn, fi_ops {
    bind: ep_bind,
    control: ep_control,
    ops_open: crate::pmem::ep_ops_open,
});

impl EpObj {
    /// Before the object goes (dropping it closes the device endpoint and releases the bound
    /// CQ/AV/EQ counts): the connection and FI_MULTI_RECV buffers.
    fn closing_conn(&self) {
        if let Some(c) = &self.conn {
            c.close();
        }
        self.dom().multi.remove_ep(self);
    }

    pub fn dom(&self) -> &DomainObj {
        // SAFETY: the domain outlives its endpoints (ParentRef).
        unsafe { &*self.domain }
    }

    /// The transmit (`send`) or receive op_flags (`fi_control(FI_SETOPSFLAG)`, the info's).
    pub fn op_flags(&self, send: bool) -> u64 {
        if send { &self.tx_flags } else { &self.rx_flags }.load(Ordering::Relaxed)
    }

    /// Bind the endpoint's service if its format names services and it has none yet: its
    /// source service, or any free one. The service bound.
    pub fn ensure_service(&self) -> Res<u16> {
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
            .or_errno(sys::fi_log_subsys_FI_LOG_EP_CTRL)?;
        self.service.store(got, Ordering::Release);
        Ok(got)
    }

    /// The endpoint's name in its address format (`fi_getname`).
    pub fn name_bytes(&self) -> Res<Vec<u8>> {
        name_in(
            self.addr_format,
            self.src,
            self.ep.name(),
            self.ensure_service()?,
        )
    }

    /// Queue an error entry made by the provider on the endpoint's receive CQ (dropped if none
    /// is bound: there is nobody to tell).
    pub fn push_rx_error(&self, e: vfabric::CqErrEntry) {
        if let Some(cq) = &*self.rx_cq.lock().unwrap_or_else(|p| p.into_inner()) {
            cq.push_error(e);
        }
    }
}

/// The name of an endpoint (device address `native`, bound to `service`) in `format`.
pub fn name_in(
    format: Format,
    src: Option<Addr>,
    native: vfabric::FabricAddr,
    service: u16,
) -> Res<Vec<u8>> {
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

ops_table!(EP_OPS: fi_ops_ep {
    cancel = ep_cancel,
    getopt = ep_getopt,
    setopt = ep_setopt,
    tx_ctx,
    rx_ctx,
    rx_size_left,
    tx_size_left,
});

ops_table!(CM_OPS: fi_ops_cm {
    setname = ep_setname,
    getname = ep_getname,
    getpeer = crate::cm::ep_getpeer,
    connect = crate::cm::ep_connect,
    listen,
    accept = crate::cm::ep_accept,
    reject,
    shutdown = crate::cm::ep_shutdown,
    join,
});

ops_table!(COLLECTIVE_OPS: fi_ops_collective {
    barrier,
    broadcast,
    alltoall,
    allreduce,
    allgather,
    reduce_scatter,
    reduce,
    scatter,
    gather,
    msg,
    barrier2,
});

/// `fi_endpoint2`: no flags are defined.
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
    crate::util::open(domain, info, ep, |d: &DomainObj, i| make_ep(d, i, context))
}

fn make_ep(d: &DomainObj, i: &sys::fi_info, context: *mut c_void) -> Res<EpObj> {
    // SAFETY: the consumer's fi_info's attribute pointers are NULL or valid.
    let ep_type = match unsafe { i.ep_attr.as_ref() }.ok_or(fi::EINVAL)?.type_ {
        sys::fi_ep_type_FI_EP_RDM => EpType::Rdm,
        sys::fi_ep_type_FI_EP_DGRAM => EpType::Dgram,
        sys::fi_ep_type_FI_EP_MSG => EpType::Msg,
        _ => return Err(fi::EINVAL),
    };
    let caps = if i.caps == 0 {
        crate::info::caps_of(&d.info, ep_type)
    } else {
        i.caps
    };
    // SAFETY: NULL or attributes of the consumer's valid fi_info.
    let (tx, rx) = unsafe { (i.tx_attr.as_ref(), i.rx_attr.as_ref()) };
    let dev_type = if ep_type == EpType::Msg {
        EpType::Rdm
    } else {
        ep_type
    };
    let handle = d
        .dom
        .endpoint(EpAttr { ep_type: dev_type })
        .or_errno(sys::fi_log_subsys_FI_LOG_EP_CTRL)?;
    let conn = if ep_type == EpType::Msg {
        Some(crate::cm::Conn::new(d, &handle, i)?)
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
    Ok(EpObj {
        fid: sys::fid_ep {
            fid: EpObj::fid(context),
            ops: ops_ptr(&EP_OPS),
            cm: ops_ptr(&CM_OPS),
            msg: ops_ptr(&crate::ops::msg::MSG_OPS),
            rma: ops_ptr(&crate::ops::rma::RMA_OPS),
            tagged: ops_ptr(&crate::ops::tagged::TAGGED_OPS),
            atomic: ops_ptr(&crate::ops::atomic::ATOMIC_OPS),
            collective: ops_ptr(&COLLECTIVE_OPS),
        },
        // SAFETY: the domain refuses to close while this count is held.
        _domain: unsafe { ParentRef::new(&d.refs) },
        domain: d,
        ep: handle,
        ep_type,
        caps,
        tx_flags: AtomicU64::new(tx.map_or(0, |a| a.op_flags)),
        rx_flags: AtomicU64::new(rx.map_or(0, |a| a.op_flags)),
        bound: Mutex::new(Vec::new()),
        rx_cq: Mutex::new(None),
        min_multi_recv: AtomicUsize::new(DEFAULT_MIN_MULTI_RECV),
        cm_data_size: AtomicUsize::new(crate::info::CM_DATA_SIZE),
        conn,
        addr_format,
        src,
        service: AtomicU16::new(0),
        refs: Refs::default(),
    })
}

ffi_fns! {
    fn ep_bind(fid: *mut sys::fid, bfid: *mut sys::fid, flags: u64) -> c_int {
        // SAFETY: consumer passes one of our endpoints.
        let e = unsafe { EpObj::from_fid(fid) }?;
        check(!bfid.is_null())?;
        // SAFETY: non-NULL fid from the consumer (each class checked by from_fid).
        let refs = match unsafe { (*bfid).fclass } as u32 {
            sys::FI_CLASS_CQ => {
                // SAFETY: as above.
                let c = unsafe { CqObj::from_fid(bfid) }?;
                if flags & (fi::TRANSMIT | fi::RECV) == 0 {
                    return Err(fi::EBADFLAGS);
                }
                e.ep.bind_cq(&c.cq, BindFlags::from_fi(flags)).or_errno(sys::fi_log_subsys_FI_LOG_EP_CTRL)?;
                if flags & fi::RECV != 0 {
                    *e.rx_cq.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.cq.clone());
                }
                &c.refs
            }
            sys::FI_CLASS_AV => {
                check(e.ep_type != EpType::Msg)?;
                // SAFETY: as above.
                let a = unsafe { AvObj::from_fid(bfid) }?;
                e.ep.bind_av(&a.av).or_errno(sys::fi_log_subsys_FI_LOG_EP_CTRL)?;
                &a.refs
            }
            sys::FI_CLASS_EQ => {
                let Some(c) = &e.conn else {
                    // RDM/DGRAM endpoints report nothing on an EQ: accepted and unused.
                    return Ok(0);
                };
                // SAFETY: as above.
                let q = unsafe { EqObj::from_fid(bfid) }?;
                c.bind_eq(q, fid, e.fid.fid.context);
                &q.refs
            }
            sys::FI_CLASS_CNTR => {
                // SAFETY: as above.
                let c = unsafe { CntrObj::from_fid(bfid) }?;
                e.ep.bind_cntr(&c.cntr, flags).or_errno(sys::fi_log_subsys_FI_LOG_EP_CTRL)?;
                &c.refs
            }
            sys::FI_CLASS_MR => return Err(fi::ENOSYS),
            _ => return Err(fi::EINVAL),
        };
        // SAFETY: the bound object refuses to close while this count is held.
        let pr = unsafe { ParentRef::new(refs) };
        e.bound.lock().unwrap_or_else(|e| e.into_inner()).push(pr);
        Ok(0)
    }

    fn ep_control(fid: *mut sys::fid, cmd: c_int, arg: *mut c_void) -> c_int {
        // SAFETY: consumer passes one of our endpoints.
        let e = unsafe { EpObj::from_fid(fid) }?;
        match cmd as u32 {
            sys::FI_ENABLE => {
                e.ep.enable().or_errno(sys::fi_log_subsys_FI_LOG_EP_CTRL)?;
                // An endpoint of a host format takes its service now (-FI_EADDRINUSE if
                // another endpoint holds it).
                e.ensure_service()?;
            }
            sys::FI_GETOPSFLAG | sys::FI_SETOPSFLAG => {
                check(!arg.is_null())?;
                let p = arg.cast::<u64>();
                // SAFETY: for these commands `arg` is a `uint64_t *` (flags in/out).
                let f = unsafe { *p };
                let slot = match (f & fi::TRANSMIT != 0, f & fi::RECV != 0) {
                    (true, false) => &e.tx_flags,
                    (false, true) => &e.rx_flags,
                    _ => return Err(fi::EINVAL),
                };
                if cmd as u32 == sys::FI_GETOPSFLAG {
                    // SAFETY: as above.
                    unsafe { *p = slot.load(Ordering::Relaxed) };
                } else {
                    slot.store(f & !(fi::TRANSMIT | fi::RECV), Ordering::Relaxed);
                }
            }
            _ => return Err(fi::ENOSYS),
        }
        Ok(0)
    }

    fn ep_cancel(fid: *mut sys::fid, context: *mut c_void) -> isize {
        // SAFETY: consumer passes one of our endpoints.
        let e = unsafe { EpObj::from_fid(fid) }?;
        let multi = &e.dom().multi;
        if multi.cancel_waiting(e, context as u64) {
            return Ok(0);
        }
        let ctx = multi
            .internal_ctx(e, context as u64)
            .unwrap_or(context as u64);
        match e.ep.cancel(ctx) {
            Ok(()) => Ok(0),
            Err(vfabric::Error::NotFound(_)) => Err(fi::ENOENT),
            r => r.or_errno(sys::fi_log_subsys_FI_LOG_EP_CTRL).map(|_| 0),
        }
    }

    fn ep_getopt(fid: *mut sys::fid, level: c_int, optname: c_int, optval: *mut c_void, optlen: *mut usize) -> c_int {
        // SAFETY: consumer passes one of our endpoints.
        let e = unsafe { EpObj::from_fid(fid) }?;
        check(!optval.is_null() && !optlen.is_null())?;
        if level as u32 != sys::FI_OPT_ENDPOINT {
            return Err(sys::FI_ENOPROTOOPT as i32);
        }
        let v = match optname as u32 {
            sys::FI_OPT_MIN_MULTI_RECV => e.min_multi_recv.load(Ordering::Relaxed),
            sys::FI_OPT_CM_DATA_SIZE => e.cm_data_size.load(Ordering::Relaxed),
            _ => return Err(sys::FI_ENOPROTOOPT as i32),
        };
        // SAFETY: `optlen` valid; `optval` writable for *optlen bytes when large enough.
        unsafe {
            let short = *optlen < std::mem::size_of::<usize>();
            *optlen = std::mem::size_of::<usize>();
            if short {
                return Err(fi::ETOOSMALL);
            }
            optval.cast::<usize>().write_unaligned(v);
        }
        Ok(0)
    }

    fn ep_setopt(fid: *mut sys::fid, level: c_int, optname: c_int, optval: *const c_void, optlen: usize) -> c_int {
        // SAFETY: consumer passes one of our endpoints.
        let e = unsafe { EpObj::from_fid(fid) }?;
        check(!optval.is_null() && optlen >= std::mem::size_of::<usize>())?;
        if level as u32 != sys::FI_OPT_ENDPOINT {
            return Err(sys::FI_ENOPROTOOPT as i32);
        }
        // SAFETY: `optval` readable for `optlen` ≥ sizeof(size_t) bytes.
        let v = unsafe { optval.cast::<usize>().read_unaligned() };
        match optname as u32 {
            sys::FI_OPT_MIN_MULTI_RECV => e.min_multi_recv.store(v, Ordering::Relaxed),
            sys::FI_OPT_CM_DATA_SIZE => {
                check(v <= crate::info::CM_DATA_SIZE)?;
                e.cm_data_size.store(v, Ordering::Relaxed)
            }
            _ => return Err(sys::FI_ENOPROTOOPT as i32),
        }
        Ok(0)
    }

    /// `fi_getname` of an endpoint or passive endpoint.
    pub fn ep_getname(fid: *mut sys::fid, addr: *mut c_void, addrlen: *mut usize) -> c_int {
        check(!addrlen.is_null())?;
        // SAFETY: fid is an endpoint or passive endpoint of ours.
        let b = unsafe { crate::cm::local_name(fid) }?;
        // SAFETY: `addrlen` valid; `addr` writable for *addrlen bytes when large enough.
        Ok(unsafe { crate::addr::copy_out(&b, addr, addrlen) })
    }

    /// `fi_setname`: device endpoint addresses are assigned by the device; setting the address
    /// the endpoint already has succeeds, any other is `-FI_EINVAL`.
    pub fn ep_setname(fid: *mut sys::fid, addr: *mut c_void, addrlen: usize) -> c_int {
        check(!addr.is_null() && addrlen > 0)?;
        // SAFETY: fid is an endpoint or passive endpoint of ours.
        let name = unsafe { crate::cm::local_name(fid) }?;
        // SAFETY: `addr` readable for `addrlen` bytes.
        let b = unsafe { std::slice::from_raw_parts(addr.cast::<u8>(), addrlen) };
        check(b == name.as_slice())?;
        Ok(0)
    }
}
