// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! FI_EP_MSG over a device without connected endpoints.
//!
//! Design: an MSG endpoint is a device RDM endpoint (the *data* endpoint, which the consumer's
//! CQs are bound to) whose provider-private AV holds exactly one peer once connected, plus a
//! second, provider-private RDM endpoint (the *CM* endpoint) with its own CQ and AV that
//! carries the connection handshake as small untagged messages. A passive endpoint is a CM
//! endpoint alone; its name (`fi_getname`) is that device endpoint's address.
//!
//! ```text
//! client CM ep ── CONNREQ{data addr, cm addr, private data} ──▶ pep      → FI_CONNREQ (info->handle)
//! server CM ep ◀─ ACCEPT {data addr, cm addr, private data} ── accept   → FI_CONNECTED (both)
//!                 REJECT {private data}                      ── reject   → error ECONNREFUSED
//!                 SHUTDOWN                                   ── shutdown → FI_SHUTDOWN at the peer
//! ```
//!
//! Progress of the handshake is driven by reading the EQ the endpoint is bound to. The passive
//! endpoint opens (or shares) the device session of its domain name, so the `fi_domain` the
//! server opens for the accepted endpoint shares it.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vfabric::{
    fi, AddressVector, BindFlags, CompletionQueue, CqAttr, Domain, Endpoint, EpAttr, EpType,
    FabricAddr,
};

use crate::addr::{Addr, Format};
use crate::domain::DomainObj;
use crate::ep::EpObj;
use crate::eq::{eq_cm_bytes, eq_entry_bytes, EqEvent, EqObj, EqSource};
use crate::fabric::FabricObj;
use crate::sys;
use crate::util::{
    check, ffi_fns, fid_object, ops_ptr, ops_table, FidObject, OrErrno, ParentRef, Refs, Res,
    SendPtr,
};

const KIND_CONNREQ: u32 = 1;
const KIND_ACCEPT: u32 = 2;
const KIND_REJECT: u32 = 3;
const KIND_SHUTDOWN: u32 = 4;
const HDR: usize = 8 + 16 + 16;
const MSG_MAX: usize = HDR + crate::info::CM_DATA_SIZE;
/// Receives kept posted on a CM endpoint.
const RECVS: usize = 8;
const CTX_RECV: u64 = 1;
const CTX_SEND: u64 = 2;
const CTX_CONNREQ: u64 = 3;
/// A CM receive directed at the connected peer's CM endpoint: it takes the peer's SHUTDOWN,
/// or completes PEER_GONE when the peer's endpoint or device goes away without one.
const CTX_WATCH: u64 = 4;

struct CmMsg {
    kind: u32,
    data_addr: FabricAddr,
    cm_addr: FabricAddr,
    /// The sender's data endpoint's service (0: none), for addresses of host formats.
    service: u16,
    payload: Vec<u8>,
}

/// Header: `le32 kind`, `le16 payload length`, `le16 service`, data address, CM address.
fn encode(
    kind: u32,
    data_addr: FabricAddr,
    cm: &CmEndpoint,
    service: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut v = Vec::with_capacity(HDR + payload.len());
    v.extend_from_slice(&kind.to_le_bytes());
    v.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    v.extend_from_slice(&service.to_le_bytes());
    v.extend_from_slice(&data_addr.to_bytes());
    v.extend_from_slice(&cm.ep.name().to_bytes());
    v.extend_from_slice(payload);
    v
}

fn decode(b: &[u8]) -> Option<CmMsg> {
    if b.len() < HDR {
        return None;
    }
    let kind = u32::from_le_bytes(b[0..4].try_into().ok()?);
    let len = u16::from_le_bytes(b[4..6].try_into().ok()?) as usize;
    let service = u16::from_le_bytes(b[6..8].try_into().ok()?);
    let data_addr = FabricAddr::from_bytes(&b[8..24]).ok()?;
    let cm_addr = FabricAddr::from_bytes(&b[24..40]).ok()?;
    let payload = b.get(HDR..HDR + len)?.to_vec();
    Some(CmMsg {
        kind,
        data_addr,
        cm_addr,
        service,
        payload,
    })
}

/// A provider-private endpoint carrying CM messages.
struct CmEndpoint {
    ep: Endpoint,
    cq: CompletionQueue,
    av: AddressVector,
}

impl CmEndpoint {
    fn open(d: &Domain) -> Result<Self, i32> {
        let err = |e: vfabric::Error| e.errno();
        let ep = d
            .endpoint(EpAttr {
                ep_type: EpType::Rdm,
            })
            .map_err(err)?;
        let cq = d.cq_open(CqAttr::default()).map_err(err)?;
        let av = d.av_open().map_err(err)?;
        ep.bind_cq(&cq, BindFlags::BOTH).map_err(err)?;
        ep.bind_av(&av).map_err(err)?;
        ep.enable().map_err(err)?;
        for _ in 0..RECVS {
            ep.recv_vec(MSG_MAX, CTX_RECV).map_err(err)?;
        }
        Ok(Self { ep, cq, av })
    }

    fn send_to(&self, to: FabricAddr, msg: &[u8], ctx: u64) -> Result<(), i32> {
        let a = match self.av.reverse_lookup(&to) {
            Some(a) => a,
            None => self.av.insert(to).map_err(|e| e.errno())?,
        };
        self.ep.send(msg, a, ctx).map_err(|e| e.errno())
    }

    /// Post the receive that watches the connected peer's CM endpoint `peer`.
    fn watch(&self, peer: FabricAddr) {
        let a = match self.av.reverse_lookup(&peer) {
            Some(a) => a,
            // Another fabric's address cannot be a connected peer: nothing to watch.
            None => match self.av.insert(peer) {
                Ok(a) => a,
                Err(_) => return,
            },
        };
        let _ = self.ep.recv_vec_from(MSG_MAX, a, CTX_WATCH);
    }

    /// Drain completions: received CM messages, contexts of failed sends, and whether the
    /// watched peer went away.
    fn poll(&self) -> (Vec<CmMsg>, Vec<u64>, bool) {
        let mut msgs = Vec::new();
        let mut failed = Vec::new();
        let mut peer_gone = false;
        let mut v = Vec::new();
        loop {
            v.clear();
            match self.cq.read(&mut v, 16) {
                Ok(_) => {
                    for e in v.drain(..) {
                        if e.context == CTX_RECV || e.context == CTX_WATCH {
                            if let Some(m) = e.buf.as_deref().and_then(decode) {
                                msgs.push(m);
                            }
                        }
                        if e.context == CTX_RECV {
                            let _ = self.ep.recv_vec(MSG_MAX, CTX_RECV);
                        }
                    }
                }
                Err(vfabric::Error::Avail) => {
                    if let Some(e) = self.cq.readerr() {
                        if e.context == CTX_RECV {
                            let _ = self.ep.recv_vec(MSG_MAX, CTX_RECV);
                        } else if e.context == CTX_WATCH {
                            peer_gone |= e.status == vfabric::Status::PeerGone;
                        } else {
                            failed.push(e.context);
                        }
                    }
                }
                Err(_) => break,
            }
        }
        (msgs, failed, peer_gone)
    }
}

// ---------------------------------------------------------------------------------------------
// Active side
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct ConnInner {
    /// Peer's data and CM endpoints once known.
    peer: Option<(FabricAddr, FabricAddr)>,
    peer_fi_addr: Option<u64>,
    /// The peer's service (host formats' `fi_getpeer`).
    peer_service: u16,
    /// Server side: the request being accepted (peer data and CM addresses, service).
    pending: Option<(FabricAddr, FabricAddr, u16)>,
    /// The CONNREQ handle this endpoint was opened with; freed by accept or close.
    handle: SendPtr<ConnReq>,
    connected: bool,
    /// Events produced outside progress (accept), delivered on the next EQ read.
    queued: Vec<EqEvent>,
    fid: SendPtr<sys::fid>,
    context: SendPtr<c_void>,
}

/// Connection state of an FI_EP_MSG endpoint.
pub struct Conn {
    state: Arc<ConnState>,
}

struct ConnState {
    cm: CmEndpoint,
    data_addr: FabricAddr,
    data_av: AddressVector,
    inner: Mutex<ConnInner>,
    bound: AtomicBool,
}

impl Conn {
    /// Set up the CM side of a new MSG endpoint (`info->handle` is a connection request for
    /// the server side).
    pub fn new(d: &DomainObj, data: &Endpoint, info: &sys::fi_info) -> Result<Conn, i32> {
        let cm = CmEndpoint::open(&d.dom)?;
        let data_av = d.dom.av_open().map_err(|e| e.errno())?;
        data.bind_av(&data_av).map_err(|e| e.errno())?;
        let mut inner = ConnInner::default();
        if !info.handle.is_null() {
            // SAFETY: a non-NULL handle of an fi_info for FI_EP_MSG is the connreq fid we
            // created in pep progress (class checked).
            let r = unsafe { ConnReq::from_fid(info.handle) }?;
            inner.pending = Some((r.data_addr, r.cm_addr, r.service));
            inner.handle = SendPtr(info.handle.cast());
        }
        Ok(Conn {
            state: Arc::new(ConnState {
                cm,
                data_addr: data.name(),
                data_av,
                inner: Mutex::new(inner),
                bound: AtomicBool::new(false),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnInner> {
        self.state.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn peer_fi_addr(&self) -> Option<u64> {
        let g = self.lock();
        if g.connected {
            g.peer_fi_addr
        } else {
            None
        }
    }

    pub fn bind_eq(&self, q: &EqObj, fid: *mut sys::fid, context: *mut c_void) {
        {
            let mut g = self.lock();
            g.fid = SendPtr(fid);
            g.context = SendPtr(context);
        }
        self.state.bound.store(true, Ordering::Release);
        let s: Arc<dyn EqSource> = self.state.clone();
        q.add_source(Arc::downgrade(&s));
    }

    /// Free the CONNREQ handle once accepted (or the endpoint closes unaccepted).
    fn free_handle(g: &mut ConnInner) {
        let h = std::mem::take(&mut g.handle);
        if !h.0.is_null() {
            // SAFETY: created by Box::into_raw in pep progress; handed to this endpoint by
            // fi_endpoint(info->handle) and released exactly once here.
            drop(unsafe { Box::from_raw(h.0) });
        }
    }

    /// On fi_close: tell a connected peer.
    pub fn close(&self) {
        let peer = {
            let mut g = self.lock();
            Self::free_handle(&mut g);
            let p = if g.connected { g.peer } else { None };
            g.connected = false;
            p
        };
        if let Some((_, cm)) = peer {
            let m = encode(KIND_SHUTDOWN, self.state.data_addr, &self.state.cm, 0, &[]);
            let _ = self.state.cm.send_to(cm, &m, CTX_SEND);
            // Let the send leave before the endpoint closes.
            let _ = self.state.cm.cq.read(&mut Vec::new(), 4);
        }
    }
}

impl ConnState {
    /// The connection is up: the peer's data and CM endpoints, its service and `fi_addr`.
    fn connected(&self, g: &mut ConnInner, data: FabricAddr, cm: FabricAddr, svc: u16, a: u64) {
        g.peer = Some((data, cm));
        g.peer_service = svc;
        g.peer_fi_addr = Some(a);
        g.connected = true;
        self.cm.watch(cm);
    }
}

impl EqSource for ConnState {
    fn progress(&self, eq: &EqObj) {
        let (msgs, failed, peer_gone) = self.cm.poll();
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for ev in g.queued.drain(..) {
            eq.push(ev);
        }
        let fid = g.fid.0;
        let context = g.context.0;
        for ctx in failed {
            if ctx == CTX_CONNREQ {
                eq.push(EqEvent::with_err(
                    sys::FI_CONNECTED,
                    eq_entry_bytes(fid, context, 0),
                    Some((sys::FI_ECONNREFUSED as i32, 0, Vec::new())),
                ));
            }
        }
        for m in msgs {
            match m.kind {
                KIND_ACCEPT if !g.connected && g.pending.is_none() => {
                    // A peer on another fabric cannot have sent this: ignore it.
                    let Ok(a) = self.data_av.insert(m.data_addr) else {
                        continue;
                    };
                    self.connected(&mut g, m.data_addr, m.cm_addr, m.service, a);
                    eq.push(EqEvent::new(
                        sys::FI_CONNECTED,
                        eq_cm_bytes(fid, std::ptr::null_mut(), &m.payload),
                    ));
                }
                KIND_REJECT => {
                    eq.push(EqEvent::with_err(
                        sys::FI_CONNECTED,
                        eq_entry_bytes(fid, context, 0),
                        Some((sys::FI_ECONNREFUSED as i32, 0, m.payload)),
                    ));
                }
                KIND_SHUTDOWN if g.connected && g.peer.is_some_and(|(_, cm)| cm == m.cm_addr) => {
                    g.connected = false;
                    eq.push(EqEvent::new(
                        sys::FI_SHUTDOWN,
                        eq_entry_bytes(fid, context, 0),
                    ));
                }
                _ => {}
            }
        }
        if peer_gone && g.connected {
            // The peer's endpoint or device went away without a SHUTDOWN message.
            g.connected = false;
            eq.push(EqEvent::new(
                sys::FI_SHUTDOWN,
                eq_entry_bytes(fid, context, 0),
            ));
        }
    }
}

/// The `EpObj` of an MSG endpoint.
fn msg_ep<'a>(ep: *mut sys::fid_ep) -> Res<(&'a EpObj, &'a Conn)> {
    // SAFETY: consumer passes one of our endpoints (class checked).
    let e = unsafe { EpObj::from_fid(ep) }?;
    let c = e.conn.as_ref().ok_or(sys::FI_EOPNOTSUPP as i32)?;
    Ok((e, c))
}

/// A connected MSG endpoint bound to an EQ.
fn bound_msg_ep<'a>(ep: *mut sys::fid_ep) -> Res<(&'a EpObj, &'a Conn)> {
    let (e, c) = msg_ep(ep)?;
    if !c.state.bound.load(Ordering::Acquire) {
        return Err(sys::FI_ENOEQ as i32);
    }
    Ok((e, c))
}

/// The consumer's connection data (at most `max` bytes).
fn private_data(max: usize, param: *const c_void, len: usize) -> Res<Vec<u8>> {
    check(len <= max)?;
    // SAFETY: `param` readable for `len` bytes (fi_connect/fi_accept/fi_reject contract).
    Ok(unsafe { crate::util::slice(param.cast::<u8>(), len) }?.to_vec())
}

ffi_fns! {
    /// `fi_connect`.
    pub fn ep_connect(ep: *mut sys::fid_ep, addr: *const c_void, param: *const c_void, paramlen: usize) -> c_int {
        let (e, c) = msg_ep(ep)?;
        check(!addr.is_null())?;
        if !c.state.bound.load(Ordering::Acquire) {
            return Err(sys::FI_ENOEQ as i32);
        }
        // SAFETY: `addr` is an address of the endpoint's format (fi_connect contract).
        let b = unsafe {
            std::slice::from_raw_parts(addr.cast::<u8>(), crate::addr::len_at(e.addr_format, addr))
        };
        let a = crate::addr::decode(e.addr_format, b).ok_or(fi::EINVAL)?;
        // A host and a service: the passive endpoint bound to it, through the device.
        let to = crate::addr::resolve(&e.dom().dom, &a)?;
        let service = e.ensure_service()?;
        let data = private_data(e.cm_data_size.load(Ordering::Relaxed), param, paramlen)?;
        {
            let g = c.lock();
            check(!g.connected && g.pending.is_none())?;
        }
        let m = encode(KIND_CONNREQ, c.state.data_addr, &c.state.cm, service, &data);
        c.state.cm.send_to(to, &m, CTX_CONNREQ)?;
        Ok(0)
    }

    /// `fi_accept`.
    pub fn ep_accept(ep: *mut sys::fid_ep, param: *const c_void, paramlen: usize) -> c_int {
        let (e, c) = bound_msg_ep(ep)?;
        let data = private_data(e.cm_data_size.load(Ordering::Relaxed), param, paramlen)?;
        let service = e.ensure_service()?;
        let mut g = c.lock();
        let (peer_data, peer_cm, peer_service) = g.pending.take().ok_or(fi::EINVAL)?;
        let m = encode(KIND_ACCEPT, c.state.data_addr, &c.state.cm, service, &data);
        if let Err(err) = c.state.cm.send_to(peer_cm, &m, CTX_SEND) {
            g.pending = Some((peer_data, peer_cm, peer_service));
            return Err(err);
        }
        let a = c
            .state
            .data_av
            .insert(peer_data)
            .or_errno(sys::fi_log_subsys_FI_LOG_EP_CTRL)?;
        Conn::free_handle(&mut g);
        c.state.connected(&mut g, peer_data, peer_cm, peer_service, a);
        let bytes = eq_cm_bytes(g.fid.0, std::ptr::null_mut(), &[]);
        g.queued.push(EqEvent {
            event: sys::FI_CONNECTED,
            bytes,
            err: None,
            info: SendPtr(std::ptr::null_mut()),
        });
        Ok(0)
    }

    /// `fi_shutdown`.
    pub fn ep_shutdown(ep: *mut sys::fid_ep, _flags: u64) -> c_int {
        let (_, c) = msg_ep(ep)?;
        if c.lock().peer.is_none() {
            return Err(sys::FI_ENOTCONN as i32);
        }
        c.close();
        Ok(0)
    }

    /// `fi_getpeer`.
    pub fn ep_getpeer(ep: *mut sys::fid_ep, addr: *mut c_void, addrlen: *mut usize) -> c_int {
        check(!addrlen.is_null())?;
        let (e, c) = msg_ep(ep)?;
        let (peer, service) = {
            let g = c.lock();
            let (peer, _) = g.peer.ok_or(sys::FI_ENOTCONN as i32)?;
            (peer, g.peer_service)
        };
        let b = crate::ep::name_in(e.addr_format, e.src, peer, service)?;
        // SAFETY: `addrlen` valid; `addr` writable for *addrlen bytes when large enough.
        Ok(unsafe { crate::addr::copy_out(&b, addr, addrlen) })
    }
}

/// Local address of an endpoint or passive endpoint (`fi_getname`), in its address format.
///
/// # Safety
/// `fid` is NULL or one of our endpoints / passive endpoints.
pub unsafe fn local_name(fid: *mut sys::fid) -> Res<Vec<u8>> {
    check(!fid.is_null())?;
    // SAFETY: non-NULL fid.
    match unsafe { (*fid).fclass } as u32 {
        // SAFETY: class checked.
        sys::FI_CLASS_EP => unsafe { EpObj::from_fid(fid) }?.name_bytes(),
        sys::FI_CLASS_PEP => {
            // SAFETY: class checked.
            let p = unsafe { PepObj::from_fid(fid) }?;
            let st = &p.state;
            crate::ep::name_in(st.format, st.src, st.cm.ep.name(), st.service)
        }
        _ => Err(fi::EINVAL),
    }
}

// ---------------------------------------------------------------------------------------------
// Passive side
// ---------------------------------------------------------------------------------------------

/// The `info->handle` of an FI_CONNREQ event (class `FI_CLASS_CONNREQ`).
#[repr(C)]
pub struct ConnReq {
    fid: sys::fid,
    data_addr: FabricAddr,
    cm_addr: FabricAddr,
    service: u16,
}

fid_object!(ConnReq, FI_CLASS_CONNREQ);

struct PepState {
    cm: CmEndpoint,
    /// Address format and source address of the info it was opened with, and the service its
    /// CM endpoint is bound to (0: none, native format).
    format: Format,
    src: Option<Addr>,
    service: u16,
    device: vfabric::DeviceLocator,
    /// Template for CONNREQ infos (fi_dupinfo'd at open; freed with the pep).
    info: SendPtr<sys::fi_info>,
    listening: AtomicBool,
    fid: Mutex<SendPtr<sys::fid>>,
}

impl Drop for PepState {
    fn drop(&mut self) {
        // SAFETY: our fi_dupinfo copy.
        unsafe { sys::fi_freeinfo(self.info.0) };
        crate::domain::release(&self.device);
    }
}

impl EqSource for PepState {
    fn progress(&self, eq: &EqObj) {
        let (msgs, _, _) = self.cm.poll();
        if !self.listening.load(Ordering::Acquire) {
            return;
        }
        let fid = self.fid.lock().unwrap_or_else(|e| e.into_inner()).0;
        for m in msgs {
            if m.kind != KIND_CONNREQ {
                continue;
            }
            // SAFETY: duplicating our own valid template.
            let info = unsafe { sys::fi_dupinfo(self.info.0) };
            if info.is_null() {
                continue;
            }
            let req = Box::into_raw(Box::new(ConnReq {
                fid: ConnReq::fid(std::ptr::null_mut()),
                data_addr: m.data_addr,
                cm_addr: m.cm_addr,
                service: m.service,
            }));
            // The client's address in the listener's format (`info->dest_addr`).
            let dest = crate::ep::name_in(self.format, self.src, m.data_addr, m.service)
                .unwrap_or_else(|_| m.data_addr.to_bytes().to_vec());
            // SAFETY: `info` is a fresh fi_dupinfo copy we own; dest_addr is replaced by a
            // malloc'd copy (fi_freeinfo frees it).
            unsafe {
                libc::free((*info).dest_addr);
                let p = libc::malloc(dest.len());
                if !p.is_null() {
                    std::ptr::copy_nonoverlapping(dest.as_ptr(), p.cast::<u8>(), dest.len());
                    (*info).dest_addrlen = dest.len();
                } else {
                    (*info).dest_addrlen = 0;
                }
                (*info).dest_addr = p;
                (*info).handle = req.cast();
            }
            eq.push(EqEvent {
                event: sys::FI_CONNREQ,
                bytes: eq_cm_bytes(fid, info, &m.payload),
                err: None,
                info: SendPtr(info),
            });
        }
    }
}

/// `fid_pep`.
#[repr(C)]
pub struct PepObj {
    pub fid: sys::fid_pep,
    _fabric: ParentRef,
    state: Arc<PepState>,
    bound: Mutex<Option<ParentRef>>,
    pub refs: Refs,
}

fid_object!(PepObj, FI_CLASS_PEP, fi_ops { bind: pep_bind });

ops_table!(PEP_EP_OPS: fi_ops_ep {
    cancel,
    getopt,
    setopt,
    tx_ctx,
    rx_ctx,
    rx_size_left,
    tx_size_left,
});

ops_table!(PEP_CM_OPS: fi_ops_cm {
    setname = crate::ep::ep_setname,
    getname = crate::ep::ep_getname,
    getpeer,
    connect,
    listen = pep_listen,
    accept,
    reject = pep_reject,
    shutdown,
    join,
});

/// `fi_passive_ep`.
pub unsafe extern "C" fn passive_ep_open(
    fabric: *mut sys::fid_fabric,
    info: *mut sys::fi_info,
    pep: *mut *mut sys::fid_pep,
    context: *mut c_void,
) -> c_int {
    crate::util::ffi(|| {
        check(!info.is_null() && !pep.is_null())?;
        // SAFETY: consumer passes its fabric.
        let f = unsafe { FabricObj::from_fid(fabric) }?;
        // SAFETY: non-NULL consumer info; attributes NULL or valid.
        let i = unsafe { &*info };
        // SAFETY: as above.
        let (da, ep) = unsafe { (i.domain_attr.as_ref(), i.ep_attr.as_ref()) };
        let (da, ep) = da.zip(ep).ok_or(fi::EINVAL)?;
        check(ep.type_ == sys::fi_ep_type_FI_EP_MSG)?;
        // SAFETY: NULL or a C string.
        let name = unsafe { crate::util::c_str(da.name) }.ok_or(fi::EINVAL)?;
        let d = crate::domain::open_device(&name)?;
        let device = d.info().device.clone();
        // The device session is released with the state (PepState's Drop) or here on failure.
        let state = pep_state(&d, i, info, device.clone()).inspect_err(|_| {
            crate::domain::release(&device);
        })?;
        let p = PepObj {
            fid: sys::fid_pep {
                fid: PepObj::fid(context),
                ops: ops_ptr(&PEP_EP_OPS),
                cm: ops_ptr(&PEP_CM_OPS),
            },
            // SAFETY: the fabric refuses to close while this count is held.
            _fabric: unsafe { ParentRef::new(&f.refs) },
            state: Arc::new(state),
            bound: Mutex::new(None),
            refs: Refs::default(),
        }
        .install(pep)?;
        // SAFETY: `p` is the object just installed.
        let obj = unsafe { &*p };
        *obj.state.fid.lock().unwrap_or_else(|e| e.into_inner()) = SendPtr(p.cast());
        Ok(0)
    })
}

/// The listening state of a passive endpoint on device session `d`.
fn pep_state(
    d: &Domain,
    i: &sys::fi_info,
    info: *mut sys::fi_info,
    device: vfabric::DeviceLocator,
) -> Res<PepState> {
    let cm = CmEndpoint::open(d)?;
    let format = Format::from_fi(i.addr_format).unwrap_or(Format::Native);
    // SAFETY: fi_info's src_addr is valid for src_addrlen bytes.
    let src = (!i.src_addr.is_null())
        .then(|| unsafe { std::slice::from_raw_parts(i.src_addr.cast::<u8>(), i.src_addrlen) })
        .and_then(|b| crate::addr::decode(format, b));
    // A listener of a host format takes its service now, so that its name is known at
    // once and a taken service fails here (-FI_EADDRINUSE).
    let service = if format.is_host() {
        let want = match src {
            Some(Addr::Host(s)) => s.port(),
            _ => 0,
        };
        cm.ep
            .bind_service(want)
            .or_errno(sys::fi_log_subsys_FI_LOG_EP_CTRL)?
    } else {
        0
    };
    // SAFETY: valid consumer info.
    let tmpl = unsafe { sys::fi_dupinfo(info) };
    if tmpl.is_null() {
        return Err(fi::ENOMEM);
    }
    Ok(PepState {
        cm,
        format,
        src,
        service,
        device,
        info: SendPtr(tmpl),
        listening: AtomicBool::new(false),
        fid: Mutex::new(SendPtr(std::ptr::null_mut())),
    })
}

ffi_fns! {
    fn pep_bind(fid: *mut sys::fid, bfid: *mut sys::fid, _flags: u64) -> c_int {
        // SAFETY: consumer passes one of our passive endpoints.
        let p = unsafe { PepObj::from_fid(fid) }?;
        // SAFETY: consumer passes one of our EQs.
        let q = unsafe { EqObj::from_fid(bfid) }?;
        let mut b = p.bound.lock().unwrap_or_else(|e| e.into_inner());
        check(b.is_none())?;
        // SAFETY: the EQ refuses to close while this count is held.
        *b = Some(unsafe { ParentRef::new(&q.refs) });
        let s: Arc<dyn EqSource> = p.state.clone();
        q.add_source(Arc::downgrade(&s));
        Ok(0)
    }

    fn pep_listen(pep: *mut sys::fid_pep) -> c_int {
        // SAFETY: consumer passes one of our passive endpoints.
        let p = unsafe { PepObj::from_fid(pep) }?;
        if p.bound.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
            return Err(sys::FI_ENOEQ as i32);
        }
        p.state.listening.store(true, Ordering::Release);
        Ok(0)
    }

    fn pep_reject(pep: *mut sys::fid_pep, handle: *mut sys::fid, param: *const c_void, paramlen: usize) -> c_int {
        // SAFETY: consumer passes one of our passive endpoints.
        let p = unsafe { PepObj::from_fid(pep) }?;
        // SAFETY: consumer passes the handle of a CONNREQ event.
        let r = unsafe { ConnReq::from_fid(handle) }?;
        let data = private_data(crate::info::CM_DATA_SIZE, param, paramlen)?;
        let m = encode(KIND_REJECT, FabricAddr::default(), &p.state.cm, 0, &data);
        let rc = p.state.cm.send_to(r.cm_addr, &m, CTX_SEND);
        // SAFETY: the handle is consumed by fi_reject (created by Box::into_raw).
        drop(unsafe { Box::from_raw(handle.cast::<ConnReq>()) });
        rc.map(|()| 0)
    }
}
