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
use std::sync::{Arc, LazyLock, Mutex};

use vfabric::{
    fi, AddressVector, BindFlags, CompletionQueue, CqAttr, Domain, Endpoint, EpAttr, EpType,
    FabricAddr,
};

use crate::addr::{Addr, Format};
use crate::domain::DomainObj;
use crate::ep::EpObj;
use crate::fabric::{eq_cm_bytes, eq_entry_bytes, ops_ptr, EqEvent, EqObj, EqSource, FabricObj};
use crate::sys;
use crate::util::{errno_of, guard, nosys, obj, ParentRef, Refs, SendPtr};

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
    cm_addr: FabricAddr,
    service: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut v = Vec::with_capacity(HDR + payload.len());
    v.extend_from_slice(&kind.to_le_bytes());
    v.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    v.extend_from_slice(&service.to_le_bytes());
    v.extend_from_slice(&data_addr.to_bytes());
    v.extend_from_slice(&cm_addr.to_bytes());
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
            let r = unsafe { obj::<ConnReq>(info.handle, sys::FI_CLASS_CONNREQ) }?;
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
            let m = encode(
                KIND_SHUTDOWN,
                self.state.data_addr,
                self.state.cm.ep.name(),
                0,
                &[],
            );
            let _ = self.state.cm.send_to(cm, &m, CTX_SEND);
            // Let the send leave before the endpoint closes.
            let _ = self.state.cm.cq.read(&mut Vec::new(), 4);
        }
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
                eq.push(EqEvent {
                    event: sys::FI_CONNECTED,
                    bytes: eq_entry_bytes(fid, context, 0),
                    err: Some((sys::FI_ECONNREFUSED as i32, 0, Vec::new())),
                    info: SendPtr(std::ptr::null_mut()),
                });
            }
        }
        for m in msgs {
            match m.kind {
                KIND_ACCEPT if !g.connected && g.pending.is_none() => {
                    // A peer on another fabric cannot have sent this: ignore it.
                    let Ok(a) = self.data_av.insert(m.data_addr) else {
                        continue;
                    };
                    g.peer = Some((m.data_addr, m.cm_addr));
                    g.peer_service = m.service;
                    g.peer_fi_addr = Some(a);
                    g.connected = true;
                    self.cm.watch(m.cm_addr);
                    eq.push(EqEvent {
                        event: sys::FI_CONNECTED,
                        bytes: eq_cm_bytes(fid, std::ptr::null_mut(), &m.payload),
                        err: None,
                        info: SendPtr(std::ptr::null_mut()),
                    });
                }
                KIND_REJECT => {
                    eq.push(EqEvent {
                        event: sys::FI_CONNECTED,
                        bytes: eq_entry_bytes(fid, context, 0),
                        err: Some((sys::FI_ECONNREFUSED as i32, 0, m.payload)),
                        info: SendPtr(std::ptr::null_mut()),
                    });
                }
                KIND_SHUTDOWN if g.connected && g.peer.is_some_and(|(_, cm)| cm == m.cm_addr) => {
                    g.connected = false;
                    eq.push(EqEvent {
                        event: sys::FI_SHUTDOWN,
                        bytes: eq_entry_bytes(fid, context, 0),
                        err: None,
                        info: SendPtr(std::ptr::null_mut()),
                    });
                }
                _ => {}
            }
        }
        if peer_gone && g.connected {
            // The peer's endpoint or device went away without a SHUTDOWN message.
            g.connected = false;
            eq.push(EqEvent {
                event: sys::FI_SHUTDOWN,
                bytes: eq_entry_bytes(fid, context, 0),
                err: None,
                info: SendPtr(std::ptr::null_mut()),
            });
        }
    }
}

/// The `EpObj` of an MSG endpoint.
///
/// # Safety
/// `ep` is NULL or one of our endpoints.
unsafe fn msg_ep<'a>(ep: *mut sys::fid_ep) -> Result<(&'a EpObj, &'a Conn), i32> {
    // SAFETY: per the contract.
    let e = unsafe { obj::<EpObj>(ep.cast(), sys::FI_CLASS_EP) }?;
    match &e.conn {
        Some(c) => Ok((e, c)),
        None => Err(sys::FI_EOPNOTSUPP as i32),
    }
}

fn private_data(e: &EpObj, param: *const c_void, len: usize) -> Result<Vec<u8>, i32> {
    if len > e.cm_data_size.load(Ordering::Relaxed) {
        return Err(fi::EINVAL);
    }
    if len == 0 {
        return Ok(Vec::new());
    }
    if param.is_null() {
        return Err(fi::EINVAL);
    }
    // SAFETY: `param` readable for `len` bytes (fi_connect/fi_accept contract).
    Ok(unsafe { std::slice::from_raw_parts(param.cast::<u8>(), len) }.to_vec())
}

/// `fi_connect`.
pub unsafe extern "C" fn ep_connect(
    ep: *mut sys::fid_ep,
    addr: *const c_void,
    param: *const c_void,
    paramlen: usize,
) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our endpoints.
        let (e, c) = match unsafe { msg_ep(ep) } {
            Ok(x) => x,
            Err(err) => return -err,
        };
        if addr.is_null() {
            return -fi::EINVAL;
        }
        if !c.state.bound.load(Ordering::Acquire) {
            return -(sys::FI_ENOEQ as i32);
        }
        // SAFETY: `addr` is an address of the endpoint's format (fi_connect contract).
        let b = unsafe {
            std::slice::from_raw_parts(addr.cast::<u8>(), crate::addr::len_at(e.addr_format, addr))
        };
        let Some(a) = crate::addr::decode(e.addr_format, b) else {
            return -fi::EINVAL;
        };
        // SAFETY: the domain outlives its endpoints (ParentRef).
        let dom = unsafe { &(*e.domain).dom };
        // A host and a service: the passive endpoint bound to it, through the device.
        let to = match crate::addr::resolve(dom, &a) {
            Ok(t) => t,
            Err(err) => return -err,
        };
        let service = match e.ensure_service() {
            Ok(s) => s,
            Err(err) => return -err,
        };
        let data = match private_data(e, param, paramlen) {
            Ok(d) => d,
            Err(err) => return -err,
        };
        {
            let g = c.lock();
            if g.connected || g.pending.is_some() {
                return -fi::EINVAL;
            }
        }
        let m = encode(
            KIND_CONNREQ,
            c.state.data_addr,
            c.state.cm.ep.name(),
            service,
            &data,
        );
        match c.state.cm.send_to(to, &m, CTX_CONNREQ) {
            Ok(()) => 0,
            Err(err) => -err,
        }
    })
}

/// `fi_accept`.
pub unsafe extern "C" fn ep_accept(
    ep: *mut sys::fid_ep,
    param: *const c_void,
    paramlen: usize,
) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our endpoints.
        let (e, c) = match unsafe { msg_ep(ep) } {
            Ok(x) => x,
            Err(err) => return -err,
        };
        if !c.state.bound.load(Ordering::Acquire) {
            return -(sys::FI_ENOEQ as i32);
        }
        let data = match private_data(e, param, paramlen) {
            Ok(d) => d,
            Err(err) => return -err,
        };
        let service = match e.ensure_service() {
            Ok(s) => s,
            Err(err) => return -err,
        };
        let mut g = c.lock();
        let Some((peer_data, peer_cm, peer_service)) = g.pending.take() else {
            return -fi::EINVAL;
        };
        let m = encode(
            KIND_ACCEPT,
            c.state.data_addr,
            c.state.cm.ep.name(),
            service,
            &data,
        );
        if let Err(err) = c.state.cm.send_to(peer_cm, &m, CTX_SEND) {
            g.pending = Some((peer_data, peer_cm, peer_service));
            return -err;
        }
        let a = match c.state.data_av.insert(peer_data) {
            Ok(a) => a,
            Err(e) => return -errno_of(&e, sys::fi_log_subsys_FI_LOG_EP_CTRL),
        };
        Conn::free_handle(&mut g);
        g.peer = Some((peer_data, peer_cm));
        g.peer_service = peer_service;
        g.peer_fi_addr = Some(a);
        g.connected = true;
        c.state.cm.watch(peer_cm);
        let bytes = eq_cm_bytes(g.fid.0, std::ptr::null_mut(), &[]);
        g.queued.push(EqEvent {
            event: sys::FI_CONNECTED,
            bytes,
            err: None,
            info: SendPtr(std::ptr::null_mut()),
        });
        0
    })
}

/// `fi_shutdown`.
pub unsafe extern "C" fn ep_shutdown(ep: *mut sys::fid_ep, _flags: u64) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our endpoints.
        let (_, c) = match unsafe { msg_ep(ep) } {
            Ok(x) => x,
            Err(err) => return -err,
        };
        if c.lock().peer.is_none() {
            return -(sys::FI_ENOTCONN as i32);
        }
        c.close();
        0
    })
}

/// `fi_getpeer`.
pub unsafe extern "C" fn ep_getpeer(
    ep: *mut sys::fid_ep,
    addr: *mut c_void,
    addrlen: *mut usize,
) -> c_int {
    guard(|| {
        if addrlen.is_null() {
            return -fi::EINVAL;
        }
        // SAFETY: consumer passes one of our endpoints.
        let (e, c) = match unsafe { msg_ep(ep) } {
            Ok(x) => x,
            Err(err) => return -err,
        };
        let (peer, service) = {
            let g = c.lock();
            let Some((peer, _)) = g.peer else {
                return -(sys::FI_ENOTCONN as i32);
            };
            (peer, g.peer_service)
        };
        let b = match crate::ep::name_in(e.addr_format, e.src, peer, service) {
            Ok(b) => b,
            Err(err) => return -err,
        };
        // SAFETY: `addrlen` valid; `addr` writable for *addrlen bytes when large enough.
        unsafe { crate::addr::copy_out(&b, addr, addrlen) }
    })
}

/// Local address of an endpoint or passive endpoint (`fi_getname`), in its address format.
///
/// # Safety
/// `fid` is NULL or one of our endpoints / passive endpoints.
pub unsafe fn local_name(fid: *mut sys::fid) -> Result<Vec<u8>, i32> {
    if fid.is_null() {
        return Err(fi::EINVAL);
    }
    // SAFETY: non-NULL fid.
    match unsafe { (*fid).fclass } as u32 {
        // SAFETY: class checked.
        sys::FI_CLASS_EP => unsafe { obj::<EpObj>(fid, sys::FI_CLASS_EP) }?.name_bytes(),
        sys::FI_CLASS_PEP => {
            // SAFETY: class checked.
            let p = unsafe { obj::<PepObj>(fid, sys::FI_CLASS_PEP) }?;
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

static CONNREQ_FI_OPS: LazyLock<sys::fi_ops> = LazyLock::new(|| sys::fi_ops {
    size: std::mem::size_of::<sys::fi_ops>(),
    close: Some(connreq_close),
    bind: nosys(),
    control: nosys(),
    ops_open: nosys(),
    tostr: nosys(),
    ops_set: nosys(),
});

unsafe extern "C" fn connreq_close(fid: *mut sys::fid) -> c_int {
    guard(|| {
        // SAFETY: consumer passes a connreq handle of ours.
        if let Err(e) = unsafe { obj::<ConnReq>(fid, sys::FI_CLASS_CONNREQ) } {
            return -e;
        }
        // SAFETY: created by Box::into_raw in pep progress.
        drop(unsafe { Box::from_raw(fid.cast::<ConnReq>()) });
        0
    })
}

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
                fid: sys::fid {
                    fclass: sys::FI_CLASS_CONNREQ as usize,
                    context: std::ptr::null_mut(),
                    ops: ops_ptr(&*CONNREQ_FI_OPS),
                },
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

static PEP_FI_OPS: LazyLock<sys::fi_ops> = LazyLock::new(|| sys::fi_ops {
    size: std::mem::size_of::<sys::fi_ops>(),
    close: Some(pep_close),
    bind: Some(pep_bind),
    control: nosys(),
    ops_open: nosys(),
    tostr: nosys(),
    ops_set: nosys(),
});

static PEP_EP_OPS: LazyLock<sys::fi_ops_ep> = LazyLock::new(|| sys::fi_ops_ep {
    size: std::mem::size_of::<sys::fi_ops_ep>(),
    cancel: nosys(),
    getopt: nosys(),
    setopt: nosys(),
    tx_ctx: nosys(),
    rx_ctx: nosys(),
    rx_size_left: nosys(),
    tx_size_left: nosys(),
});

static PEP_CM_OPS: LazyLock<sys::fi_ops_cm> = LazyLock::new(|| sys::fi_ops_cm {
    size: std::mem::size_of::<sys::fi_ops_cm>(),
    setname: Some(crate::ep::ep_setname),
    getname: Some(pep_getname),
    getpeer: nosys(),
    connect: nosys(),
    listen: Some(pep_listen),
    accept: nosys(),
    reject: Some(pep_reject),
    shutdown: nosys(),
    join: nosys(),
});

/// `fi_passive_ep`.
pub unsafe extern "C" fn passive_ep_open(
    fabric: *mut sys::fid_fabric,
    info: *mut sys::fi_info,
    pep: *mut *mut sys::fid_pep,
    context: *mut c_void,
) -> c_int {
    guard(|| {
        if info.is_null() || pep.is_null() {
            return -fi::EINVAL;
        }
        // SAFETY: consumer passes its fabric.
        let f = match unsafe { obj::<FabricObj>(fabric.cast(), sys::FI_CLASS_FABRIC) } {
            Ok(f) => f,
            Err(e) => return -e,
        };
        // SAFETY: non-NULL consumer info; attributes NULL or valid.
        let i = unsafe { &*info };
        if i.domain_attr.is_null() || i.ep_attr.is_null() {
            return -fi::EINVAL;
        }
        // SAFETY: non-NULL attribute.
        if unsafe { (*i.ep_attr).type_ } != sys::fi_ep_type_FI_EP_MSG {
            return -fi::EINVAL;
        }
        // SAFETY: NULL or a C string.
        let Some(name) = (unsafe { crate::util::c_str((*i.domain_attr).name) }) else {
            return -fi::EINVAL;
        };
        let d = match crate::domain::open_device(&name) {
            Ok(d) => d,
            Err(e) => return -e,
        };
        let dev = d.info().clone();
        let cm = match CmEndpoint::open(&d) {
            Ok(c) => c,
            Err(e) => {
                crate::domain::release(&dev.device);
                return -e;
            }
        };
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
            match cm.ep.bind_service(want) {
                Ok(s) => s,
                Err(e) => {
                    drop(cm);
                    crate::domain::release(&dev.device);
                    return -errno_of(&e, sys::fi_log_subsys_FI_LOG_EP_CTRL);
                }
            }
        } else {
            0
        };
        // SAFETY: valid consumer info.
        let tmpl = unsafe { sys::fi_dupinfo(info) };
        if tmpl.is_null() {
            drop(cm);
            crate::domain::release(&dev.device);
            return -fi::ENOMEM;
        }
        let state = Arc::new(PepState {
            cm,
            format,
            src,
            service,
            device: dev.device.clone(),
            info: SendPtr(tmpl),
            listening: AtomicBool::new(false),
            fid: Mutex::new(SendPtr(std::ptr::null_mut())),
        });
        let p = Box::into_raw(Box::new(PepObj {
            fid: sys::fid_pep {
                fid: sys::fid {
                    fclass: sys::FI_CLASS_PEP as usize,
                    context,
                    ops: ops_ptr(&*PEP_FI_OPS),
                },
                ops: ops_ptr(&*PEP_EP_OPS),
                cm: ops_ptr(&*PEP_CM_OPS),
            },
            // SAFETY: the fabric refuses to close while this count is held.
            _fabric: unsafe { ParentRef::new(&f.refs) },
            state,
            bound: Mutex::new(None),
            refs: Refs::default(),
        }));
        // SAFETY: `p` is our fresh allocation; `pep` a valid out pointer.
        unsafe {
            let obj = &*p;
            *obj.state.fid.lock().unwrap_or_else(|e| e.into_inner()) = SendPtr(p.cast());
            *pep = p.cast();
        }
        0
    })
}

unsafe extern "C" fn pep_close(fid: *mut sys::fid) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our passive endpoints.
        if let Err(e) = unsafe { obj::<PepObj>(fid, sys::FI_CLASS_PEP) } {
            return -e;
        }
        // SAFETY: created by Box::into_raw in passive_ep_open.
        drop(unsafe { Box::from_raw(fid.cast::<PepObj>()) });
        0
    })
}

unsafe extern "C" fn pep_bind(fid: *mut sys::fid, bfid: *mut sys::fid, _flags: u64) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our passive endpoints.
        let p = match unsafe { obj::<PepObj>(fid, sys::FI_CLASS_PEP) } {
            Ok(p) => p,
            Err(e) => return -e,
        };
        // SAFETY: consumer passes one of our EQs.
        let q = match unsafe { obj::<EqObj>(bfid, sys::FI_CLASS_EQ) } {
            Ok(q) => q,
            Err(e) => return -e,
        };
        let mut b = p.bound.lock().unwrap_or_else(|e| e.into_inner());
        if b.is_some() {
            return -fi::EINVAL;
        }
        // SAFETY: the EQ refuses to close while this count is held.
        *b = Some(unsafe { ParentRef::new(&q.refs) });
        let s: Arc<dyn EqSource> = p.state.clone();
        q.add_source(Arc::downgrade(&s));
        0
    })
}

unsafe extern "C" fn pep_listen(pep: *mut sys::fid_pep) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our passive endpoints.
        let p = match unsafe { obj::<PepObj>(pep.cast(), sys::FI_CLASS_PEP) } {
            Ok(p) => p,
            Err(e) => return -e,
        };
        if p.bound.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
            return -(sys::FI_ENOEQ as i32);
        }
        p.state.listening.store(true, Ordering::Release);
        0
    })
}

unsafe extern "C" fn pep_getname(
    fid: *mut sys::fid,
    addr: *mut c_void,
    addrlen: *mut usize,
) -> c_int {
    // SAFETY: same contract as the endpoint's fi_getname (it handles both classes).
    unsafe { crate::ep::ep_getname(fid, addr, addrlen) }
}

unsafe extern "C" fn pep_reject(
    pep: *mut sys::fid_pep,
    handle: *mut sys::fid,
    param: *const c_void,
    paramlen: usize,
) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our passive endpoints.
        let p = match unsafe { obj::<PepObj>(pep.cast(), sys::FI_CLASS_PEP) } {
            Ok(p) => p,
            Err(e) => return -e,
        };
        // SAFETY: consumer passes the handle of a CONNREQ event.
        let r = match unsafe { obj::<ConnReq>(handle, sys::FI_CLASS_CONNREQ) } {
            Ok(r) => r,
            Err(e) => return -e,
        };
        if paramlen > crate::info::CM_DATA_SIZE || (paramlen > 0 && param.is_null()) {
            return -fi::EINVAL;
        }
        let data = if paramlen == 0 {
            Vec::new()
        } else {
            // SAFETY: `param` readable for `paramlen` bytes.
            unsafe { std::slice::from_raw_parts(param.cast::<u8>(), paramlen) }.to_vec()
        };
        let m = encode(
            KIND_REJECT,
            FabricAddr::default(),
            p.state.cm.ep.name(),
            0,
            &data,
        );
        let rc = match p.state.cm.send_to(r.cm_addr, &m, CTX_SEND) {
            Ok(()) => 0,
            Err(e) => -e,
        };
        // SAFETY: the handle is consumed by fi_reject (created by Box::into_raw).
        drop(unsafe { Box::from_raw(handle.cast::<ConnReq>()) });
        rc
    })
}
