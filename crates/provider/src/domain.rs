// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Domain, address vector, memory region and completion queue objects.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use vfabric::{
    fi, AddressVector, CompletionQueue, CqAttr, CqEntry, DeviceLocator, Domain, DomainAttr,
    FabricAddr, Info, WaitMode,
};

use crate::fabric::{ops_ptr, FabricObj};
use crate::sys;
use crate::util::{copy_str_out, errno_of, guard, nosys, obj, ParentRef, Refs, SendPtr};

/// `fid_domain`.
#[repr(C)]
pub struct DomainObj {
    pub fid: sys::fid_domain,
    _fabric: ParentRef,
    pub dom: Domain,
    pub info: Info,
    pub av_type: u32,
    pub mr_mode: i32,
    /// Address format of the `fi_info` the domain was opened with: the format of the
    /// addresses its AVs take and give.
    pub addr_format: crate::addr::Format,
    /// Remote CQ data was granted (`cq_data_size` > 0 in the consumer's info).
    pub remote_cq_data: bool,
    /// The domain was opened with FI_RMA_EVENT in its caps: regions with remote access count
    /// remote accesses (a counter may be bound with `fi_mr_bind`).
    pub rma_event: bool,
    next_key: AtomicU64,
    /// FI_MULTI_RECV buffers posted on this domain's endpoints.
    pub multi: crate::multirecv::Registry,
    /// Remote peers of this domain's AVs, watched for disappearance (opened at the first
    /// insert; `None` if the private endpoint could not be opened).
    pub watch: std::sync::OnceLock<Option<crate::watch::PeerWatch>>,
    /// Peers are watched: not for a domain opened for DGRAM endpoints, whose peers come and go
    /// without a connection (a datagram peer's exit is no error).
    watch_peers: bool,
    /// The registration cache (crate::mr_cache) and its memory monitor.
    pub mr_cache: Arc<crate::mr_cache::MrCache>,
    pub refs: Refs,
}

impl DomainObj {
    fn watch(&self) -> Option<&crate::watch::PeerWatch> {
        self.watch
            .get_or_init(|| {
                if !self.watch_peers || crate::param_bool(c"peer_watch") == Some(false) {
                    return None;
                }
                crate::watch::PeerWatch::open(&self.dom).ok()
            })
            .as_ref()
    }
}

static DOMAIN_FI_OPS: LazyLock<sys::fi_ops> = LazyLock::new(|| sys::fi_ops {
    size: std::mem::size_of::<sys::fi_ops>(),
    close: Some(domain_close),
    bind: Some(crate::monitor::domain_bind),
    control: nosys(),
    ops_open: Some(crate::ext::domain_ops_open),
    tostr: nosys(),
    ops_set: nosys(),
});

static DOMAIN_OPS: LazyLock<sys::fi_ops_domain> = LazyLock::new(|| sys::fi_ops_domain {
    size: std::mem::size_of::<sys::fi_ops_domain>(),
    av_open: Some(av_open),
    cq_open: Some(cq_open),
    endpoint: Some(crate::ep::endpoint_open),
    scalable_ep: nosys(),
    cntr_open: Some(cntr_open),
    poll_open: nosys(),
    stx_ctx: nosys(),
    srx_ctx: nosys(),
    query_atomic: nosys(),
    query_collective: nosys(),
    endpoint2: Some(crate::ep::endpoint_open2),
});

static MR_OPS: LazyLock<sys::fi_ops_mr> = LazyLock::new(|| sys::fi_ops_mr {
    size: std::mem::size_of::<sys::fi_ops_mr>(),
    reg: Some(mr_reg),
    regv: Some(mr_regv),
    regattr: Some(mr_regattr),
});

pub unsafe extern "C" fn domain_open2(
    fabric: *mut sys::fid_fabric,
    info: *mut sys::fi_info,
    dom: *mut *mut sys::fid_domain,
    flags: u64,
    context: *mut c_void,
) -> c_int {
    if flags != 0 {
        return -fi::EINVAL;
    }
    // SAFETY: same contract as fi_domain.
    unsafe { domain_open(fabric, info, dom, context) }
}

/// `fi_domain`.
pub unsafe extern "C" fn domain_open(
    fabric: *mut sys::fid_fabric,
    info: *mut sys::fi_info,
    dom: *mut *mut sys::fid_domain,
    context: *mut c_void,
) -> c_int {
    guard(|| {
        if info.is_null() || dom.is_null() {
            return -fi::EINVAL;
        }
        // SAFETY: consumer passes its fabric.
        let f = match unsafe { obj::<FabricObj>(fabric.cast(), sys::FI_CLASS_FABRIC) } {
            Ok(f) => f,
            Err(e) => return -e,
        };
        // SAFETY: non-NULL fi_info from the consumer; attributes NULL or valid.
        let i = unsafe { &*info };
        if i.domain_attr.is_null() {
            return -fi::EINVAL;
        }
        // SAFETY: non-NULL domain attribute; `name` NULL or a C string.
        let da = unsafe { &*i.domain_attr };
        // SAFETY: `name` is NULL or a NUL-terminated string of the consumer's fi_info.
        let Some(name) = (unsafe { crate::util::c_str(da.name) }) else {
            return -fi::EINVAL;
        };
        let d = match open_device(&name) {
            Ok(d) => d,
            Err(e) => return -e,
        };
        let dev = d.info().clone();
        let obj = Box::new(DomainObj {
            fid: sys::fid_domain {
                fid: sys::fid {
                    fclass: sys::FI_CLASS_DOMAIN as usize,
                    context,
                    ops: ops_ptr(&*DOMAIN_FI_OPS),
                },
                ops: ops_ptr(&*DOMAIN_OPS),
                mr: ops_ptr(&*MR_OPS),
            },
            // SAFETY: the fabric refuses to close while this count is held.
            _fabric: unsafe { ParentRef::new(&f.refs) },
            dom: d.clone(),
            info: dev,
            av_type: da.av_type,
            mr_mode: da.mr_mode,
            addr_format: crate::addr::Format::from_fi(i.addr_format)
                .unwrap_or(crate::addr::Format::Native),
            remote_cq_data: da.cq_data_size > 0,
            rma_event: i.caps & fi::RMA_EVENT != 0,
            next_key: AtomicU64::new(1),
            multi: Default::default(),
            watch: Default::default(),
            // SAFETY: `ep_attr` is NULL or valid in the consumer's fi_info.
            watch_peers: unsafe { i.ep_attr.as_ref() }
                .is_none_or(|ep| ep.type_ != sys::fi_ep_type_FI_EP_DGRAM),
            mr_cache: crate::mr_cache::MrCache::new(d.clone()),
            refs: Refs::default(),
        });
        // SAFETY: valid out pointer; the consumer owns the box until fi_close.
        unsafe { *dom = Box::into_raw(obj).cast() };
        0
    })
}

unsafe extern "C" fn domain_close(fid: *mut sys::fid) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our domains.
        let d = match unsafe { obj::<DomainObj>(fid, sys::FI_CLASS_DOMAIN) } {
            Ok(d) => d,
            Err(e) => return -e,
        };
        if d.refs.busy() {
            return -fi::EBUSY;
        }
        // SAFETY: created by Box::into_raw in domain_open; no child references it.
        let b = unsafe { Box::from_raw(fid.cast::<DomainObj>()) };
        b.mr_cache.close();
        release(&b.info.device);
        0
    })
}

/// Device sessions of this process: a device serves one frontend at a time, so every
/// `fi_domain` and passive endpoint on the same device shares one `vfabric::Domain`.
static OPEN: Mutex<Option<HashMap<DeviceLocator, (Domain, usize)>>> = Mutex::new(None);

/// Fabric id of each device by domain name, as `fi_getinfo` found them: `fi_domain` falls back
/// only to devices of the same fabric.
static FABRIC_OF: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);

/// Remember the fabric of a probed device.
pub fn note_fabric(dev: &Info) {
    crate::addr::note_hosts(dev);
    let mut g = FABRIC_OF.lock().unwrap_or_else(|e| e.into_inner());
    g.get_or_insert_with(HashMap::new)
        .insert(dev.domain_name.clone(), dev.fabric_id);
}

/// Accept deadline of `fi_domain`'s first attempts: a free device accepts at once (the rest of
/// the set-up then has the driver's full deadline).
const QUICK_CONNECT: Duration = Duration::from_millis(500);

/// The device session for the domain named `name` (an `fi_info`'s `domain_attr->name`). A
/// device is one guest's at a time, and another process may have taken it since `fi_getinfo`:
/// then the first free device of the same fabric is opened instead (the info names the fabric
/// and its resources, not one socket). Only if none is free is the named device waited for
/// with the driver's full deadline.
pub fn open_device(name: &str) -> Result<Domain, i32> {
    let paths = crate::info::all_devices();
    let Some(named) = paths.iter().find(|p| p.domain_name() == name) else {
        crate::util::warn(
            sys::fi_log_subsys_FI_LOG_DOMAIN,
            &format!("no device for domain {name:?}"),
        );
        return Err(fi::ENODATA);
    };
    match acquire(named, Some(QUICK_CONNECT)) {
        Err(e) if e == fi::EBUSY => {}
        r => return r,
    }
    let fabric = FABRIC_OF
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|m| m.get(name).copied());
    if let Some(fabric) = fabric {
        for p in paths
            .iter()
            .filter(|p| *p != named && open_info(p).is_none())
        {
            let Ok(d) = acquire(p, Some(QUICK_CONNECT)) else {
                continue;
            };
            if d.info().fabric_id == fabric {
                crate::util::info(
                    sys::fi_log_subsys_FI_LOG_DOMAIN,
                    &format!(
                        "{name} is busy (another guest took it): opened {} of the same fabric",
                        d.info().domain_name
                    ),
                );
                return Ok(d);
            }
            drop(d);
            release(p);
        }
    }
    acquire(named, None)
}

/// Open (or share) the device session of the socket `path`, waiting at most `timeout` (the
/// driver's default if `None`) for a device that serves another guest to accept.
pub fn acquire(path: &DeviceLocator, timeout: Option<Duration>) -> Result<Domain, i32> {
    let mut g = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    let m = g.get_or_insert_with(HashMap::new);
    if let Some((d, n)) = m.get_mut(path) {
        *n += 1;
        return Ok(d.clone());
    }
    let mut attr = DomainAttr {
        accept_timeout: timeout,
        ..DomainAttr::default()
    };
    // Read as text, not with fi_param_get: "0", "abc" or an overflowing size must be reported,
    // not silently replaced by the default.
    match vfabric::memory::env_mem_bytes("FI_VFABRIC_MEM_MB") {
        Ok(Some(bytes)) => attr.mem_bytes = bytes,
        Ok(None) => {}
        Err(e) => {
            crate::util::warn(sys::fi_log_subsys_FI_LOG_DOMAIN, &e.to_string());
            return Err(fi::EINVAL);
        }
    }
    let mem_mb = attr.mem_bytes >> 20;
    match Domain::open(path, attr) {
        Ok(d) => {
            note_fabric(d.info());
            crate::util::info(
                sys::fi_log_subsys_FI_LOG_DOMAIN,
                &format!(
                    "domain open: {} on {} ({mem_mb} MiB shared memory)",
                    d.info().domain_name,
                    path
                ),
            );
            m.insert(path.clone(), (d.clone(), 1));
            Ok(d)
        }
        Err(e @ vfabric::Error::Busy { .. }) if timeout.is_some() => {
            crate::util::log(
                sys::fi_log_level_FI_LOG_DEBUG,
                sys::fi_log_subsys_FI_LOG_DOMAIN,
                &format!("device {}: {e}", path),
            );
            Err(fi::EBUSY)
        }
        Err(e) => {
            crate::util::warn(
                sys::fi_log_subsys_FI_LOG_DOMAIN,
                &format!("device {}: {e}", path),
            );
            Err(errno_of(&e, sys::fi_log_subsys_FI_LOG_DOMAIN).max(1))
        }
    }
}

/// Drop one user of a device session.
pub fn release(device: &DeviceLocator) {
    let mut g = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    let m = g.get_or_insert_with(HashMap::new);
    if let Some((_, n)) = m.get_mut(device) {
        *n -= 1;
        if *n == 0 {
            m.remove(device);
        }
    }
}

/// Description of a device this process holds open (it cannot be probed a second time).
pub fn open_info(device: &DeviceLocator) -> Option<Info> {
    let g = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    g.as_ref()?.get(device).map(|(d, _)| d.info().clone())
}

// ---------------------------------------------------------------------------------------------
// Address vector
// ---------------------------------------------------------------------------------------------

/// `fid_av`. `FI_AV_MAP` and `FI_AV_TABLE` both hand out table indices (valid `fi_addr_t`s
/// for either type).
#[repr(C)]
pub struct AvObj {
    pub fid: sys::fid_av,
    _domain: ParentRef,
    pub domain: *const DomainObj,
    pub av: AddressVector,
    pub av_type: u32,
    /// Names inserted in a host format, by `fi_addr` (what `fi_av_lookup` gives back).
    names: Mutex<std::collections::HashMap<u64, Vec<u8>>>,
    pub refs: Refs,
}

impl AvObj {
    fn dom(&self) -> &DomainObj {
        // SAFETY: the domain outlives its AVs (ParentRef).
        unsafe { &*self.domain }
    }

    /// Insert one address of the domain's format (a host format's through the device's
    /// service table).
    fn insert_one(&self, bytes: &[u8]) -> Result<u64, String> {
        let d = self.dom();
        if d.addr_format == crate::addr::Format::Native {
            return self.av.insert_bytes(bytes).map_err(|e| e.to_string());
        }
        let a = crate::addr::decode(d.addr_format, bytes)
            .ok_or_else(|| format!("not a {:?} address", d.addr_format))?;
        let n = crate::addr::resolve(&d.dom, &a).map_err(|e| resolve_error(&a, e))?;
        let x = self.av.insert(n).map_err(|e| e.to_string())?;
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(x, bytes.to_vec());
        Ok(x)
    }
}

static AV_FI_OPS: LazyLock<sys::fi_ops> = LazyLock::new(|| sys::fi_ops {
    size: std::mem::size_of::<sys::fi_ops>(),
    close: Some(av_close),
    bind: nosys(),
    control: nosys(),
    ops_open: nosys(),
    tostr: nosys(),
    ops_set: nosys(),
});

static AV_OPS: LazyLock<sys::fi_ops_av> = LazyLock::new(|| sys::fi_ops_av {
    size: std::mem::size_of::<sys::fi_ops_av>(),
    insert: Some(av_insert),
    insertsvc: Some(av_insertsvc),
    insertsym: nosys(),
    remove: Some(av_remove),
    lookup: Some(av_lookup),
    straddr: Some(av_straddr),
    av_set: nosys(),
});

unsafe extern "C" fn av_open(
    domain: *mut sys::fid_domain,
    attr: *mut sys::fi_av_attr,
    av: *mut *mut sys::fid_av,
    context: *mut c_void,
) -> c_int {
    guard(|| {
        if attr.is_null() || av.is_null() {
            return -fi::EINVAL;
        }
        // SAFETY: consumer passes its domain.
        let d = match unsafe { obj::<DomainObj>(domain.cast(), sys::FI_CLASS_DOMAIN) } {
            Ok(d) => d,
            Err(e) => return -e,
        };
        // SAFETY: non-NULL attribute.
        let a = unsafe { &*attr };
        let av_type = match a.type_ {
            sys::fi_av_type_FI_AV_UNSPEC => sys::fi_av_type_FI_AV_TABLE,
            t @ (sys::fi_av_type_FI_AV_MAP | sys::fi_av_type_FI_AV_TABLE) => t,
            _ => return -fi::EINVAL,
        };
        if !a.name.is_null() || a.flags & (EVENT_FLAG) != 0 {
            // Named/shared AVs and asynchronous inserts (FI_EVENT) are not supported.
            return -fi::ENOSYS;
        }
        let handle = match d.dom.av_open() {
            Ok(a) => a,
            Err(e) => return -errno_of(&e, sys::fi_log_subsys_FI_LOG_AV),
        };
        let obj = Box::new(AvObj {
            fid: sys::fid_av {
                fid: sys::fid {
                    fclass: sys::FI_CLASS_AV as usize,
                    context,
                    ops: ops_ptr(&*AV_FI_OPS),
                },
                ops: ops_ptr(&*AV_OPS),
            },
            // SAFETY: the domain refuses to close while this count is held.
            _domain: unsafe { ParentRef::new(&d.refs) },
            domain: d,
            av: handle,
            av_type,
            names: Mutex::new(Default::default()),
            refs: Refs::default(),
        });
        // SAFETY: valid out pointer.
        unsafe { *av = Box::into_raw(obj).cast() };
        0
    })
}

unsafe extern "C" fn av_close(fid: *mut sys::fid) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our AVs.
        let a = match unsafe { obj::<AvObj>(fid, sys::FI_CLASS_AV) } {
            Ok(a) => a,
            Err(e) => return -e,
        };
        if a.refs.busy() {
            return -fi::EBUSY;
        }
        // SAFETY: created by Box::into_raw in av_open; no endpoint is bound to it.
        drop(unsafe { Box::from_raw(fid.cast::<AvObj>()) });
        0
    })
}

unsafe extern "C" fn av_insert(
    av: *mut sys::fid_av,
    addr: *const c_void,
    count: usize,
    fi_addr: *mut u64,
    flags: u64,
    _context: *mut c_void,
) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our AVs.
        let a = match unsafe { obj::<AvObj>(av.cast(), sys::FI_CLASS_AV) } {
            Ok(a) => a,
            Err(e) => return -e,
        };
        if addr.is_null() && count > 0 {
            return -fi::EINVAL;
        }
        if flags & !(fi::MORE | SYNC_ERR) != 0 {
            return -fi::EBADFLAGS;
        }
        let format = a.dom().addr_format;
        let mut n = 0;
        let mut at = addr.cast::<u8>();
        for k in 0..count {
            // SAFETY: `addr` holds `count` addresses of the domain's format, one after the
            // other.
            let b = unsafe {
                let len = crate::addr::len_at(format, at.cast());
                let b = std::slice::from_raw_parts(at, len);
                at = at.add(len);
                b
            };
            let r = a.insert_one(b);
            match &r {
                // Say why: the count returned only says that some address was refused.
                Err(e) => crate::util::warn(
                    sys::fi_log_subsys_FI_LOG_AV,
                    &format!("fi_av_insert: address {k} refused: {e}"),
                ),
                Ok(x) => {
                    if let Ok(peer) = a.av.lookup(*x) {
                        if let Some(w) = a.dom().watch() {
                            w.watch(peer);
                        }
                    }
                }
            }
            if !fi_addr.is_null() {
                // SAFETY: `fi_addr` has room for `count` entries.
                unsafe { *fi_addr.add(k) = *r.as_ref().unwrap_or(&vfabric::FI_ADDR_NOTAVAIL) };
            }
            if r.is_ok() {
                n += 1;
            }
        }
        n
    })
}

unsafe extern "C" fn av_insertsvc(
    av: *mut sys::fid_av,
    node: *const c_char,
    service: *const c_char,
    fi_addr: *mut u64,
    _flags: u64,
    _context: *mut c_void,
) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our AVs.
        let a = match unsafe { obj::<AvObj>(av.cast(), sys::FI_CLASS_AV) } {
            Ok(a) => a,
            Err(e) => return -e,
        };
        // SAFETY: NULL or C strings.
        let (Some(node), service) =
            (unsafe { (crate::util::c_str(node), crate::util::c_str(service)) })
        else {
            return -fi::EINVAL;
        };
        let r = if service.is_none() && node.trim().starts_with("vfab://") {
            a.av.insert_str(&node).map_err(|e| e.to_string())
        } else {
            insertsvc_host(a, &node, service.as_deref())
        };
        match r {
            Ok(x) => {
                if !fi_addr.is_null() {
                    // SAFETY: room for one entry.
                    unsafe { *fi_addr = x };
                }
                1
            }
            Err(e) => {
                crate::util::warn(
                    sys::fi_log_subsys_FI_LOG_AV,
                    &format!("fi_av_insertsvc: {e}"),
                );
                if !fi_addr.is_null() {
                    // SAFETY: room for one entry.
                    unsafe { *fi_addr = vfabric::FI_ADDR_NOTAVAIL };
                }
                0
            }
        }
    })
}

/// Why a host address could not be resolved, for the log.
fn resolve_error(a: &crate::addr::Addr, errno: i32) -> String {
    let what = crate::addr::to_string(a);
    match errno {
        fi::EADDRNOTAVAIL => format!("{what}: no host of the fabric, or nothing bound to it"),
        fi::EHOSTUNREACH => format!(
            "{what}: a host of the fabric that is down or did not answer (its uplink peer \
             timeout)"
        ),
        e => format!("{what}: error {e}"),
    }
}

/// `fi_av_insertsvc` of a host and a service: the endpoint bound to the service, recorded
/// under the name of the domain's format.
fn insertsvc_host(a: &AvObj, node: &str, service: Option<&str>) -> Result<u64, String> {
    let service = service.ok_or("a host needs a service")?;
    let svc = crate::addr::parse_service(service).ok_or_else(|| format!("service {service:?}"))?;
    let host = crate::addr::lookup_host(node, svc)
        .into_iter()
        .next()
        .ok_or_else(|| format!("node {node:?} does not resolve"))?;
    let host = crate::addr::Addr::Host(host);
    let d = a.dom();
    let n = crate::addr::resolve(&d.dom, &host).map_err(|e| resolve_error(&host, e))?;
    let x = a.av.insert(n).map_err(|e| e.to_string())?;
    let format = if d.addr_format.is_host() {
        d.addr_format.concrete_for(&host)
    } else {
        crate::addr::Format::Native
    };
    if format.is_host() {
        if let Some(b) = crate::addr::encode(format, &host) {
            a.names
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(x, b);
        }
    }
    Ok(x)
}

unsafe extern "C" fn av_remove(
    av: *mut sys::fid_av,
    fi_addr: *mut u64,
    count: usize,
    _flags: u64,
) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our AVs.
        let a = match unsafe { obj::<AvObj>(av.cast(), sys::FI_CLASS_AV) } {
            Ok(a) => a,
            Err(e) => return -e,
        };
        if fi_addr.is_null() && count > 0 {
            return -fi::EINVAL;
        }
        let mut rc = 0;
        for k in 0..count {
            // SAFETY: `fi_addr` holds `count` entries.
            let x = unsafe { *fi_addr.add(k) };
            if let Err(e) = a.av.remove(x) {
                rc = -e.errno();
            }
            a.names.lock().unwrap_or_else(|e| e.into_inner()).remove(&x);
        }
        rc
    })
}

unsafe extern "C" fn av_lookup(
    av: *mut sys::fid_av,
    fi_addr: u64,
    addr: *mut c_void,
    addrlen: *mut usize,
) -> c_int {
    guard(|| {
        if addrlen.is_null() {
            return -fi::EINVAL;
        }
        // SAFETY: consumer passes one of our AVs.
        let a = match unsafe { obj::<AvObj>(av.cast(), sys::FI_CLASS_AV) } {
            Ok(a) => a,
            Err(e) => return -e,
        };
        let x = match a.av.lookup(fi_addr) {
            Ok(x) => x,
            Err(_) => return -fi::ENOENT,
        };
        let named = a
            .names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fi_addr)
            .cloned();
        let bytes = named.unwrap_or_else(|| x.to_bytes().to_vec());
        // SAFETY: `addrlen` valid; `addr` NULL or writable for *addrlen bytes.
        unsafe {
            let n = (*addrlen).min(bytes.len());
            if !addr.is_null() {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr.cast::<u8>(), n);
            }
            *addrlen = bytes.len();
        }
        0
    })
}

/// Printable form of a 16-byte address (`vfab://FABRIC.HOST.DEV/EP.GEN`).
///
/// # Safety
/// `addr` is NULL or readable for 16 bytes.
pub unsafe fn addr_string(addr: *const c_void) -> String {
    if addr.is_null() {
        return "(null)".into();
    }
    // SAFETY: readable for ADDR_LEN bytes per the contract.
    let b = unsafe { std::slice::from_raw_parts(addr.cast::<u8>(), crate::info::ADDR_LEN) };
    match FabricAddr::from_bytes(b) {
        Ok(a) => a.to_string(),
        Err(_) => "(invalid vfabric address)".into(),
    }
}

unsafe extern "C" fn av_straddr(
    av: *mut sys::fid_av,
    addr: *const c_void,
    buf: *mut c_char,
    len: *mut usize,
) -> *const c_char {
    if len.is_null() {
        return std::ptr::null();
    }
    let r = std::panic::catch_unwind(|| {
        // SAFETY: consumer passes one of our AVs (NULL: the native format).
        let format = unsafe { obj::<AvObj>(av.cast(), sys::FI_CLASS_AV) }
            .map_or(crate::addr::Format::Native, |a| a.dom().addr_format);
        let text = if format == crate::addr::Format::Native || addr.is_null() {
            // SAFETY: `addr` is one of our addresses (16 bytes) per the fi_av_straddr
            // contract.
            unsafe { addr_string(addr) }
        } else {
            // SAFETY: `addr` is an address of the domain's format.
            let b = unsafe {
                std::slice::from_raw_parts(addr.cast::<u8>(), crate::addr::len_at(format, addr))
            };
            crate::addr::decode(format, b).map_or_else(
                || "(invalid address)".into(),
                |x| crate::addr::to_string(&x),
            )
        };
        // SAFETY: `buf` writable for *len bytes.
        unsafe { copy_str_out(&text, buf, len) };
    });
    if r.is_err() {
        return std::ptr::null();
    }
    buf
}

// ---------------------------------------------------------------------------------------------
// Memory regions (provider-side records: messaging needs no device registration)
// ---------------------------------------------------------------------------------------------

/// `fid_mr`.
#[repr(C)]
pub struct MrObj {
    pub fid: sys::fid_mr,
    _domain: ParentRef,
    pub addr: usize,
    pub len: usize,
    pub access: u64,
    /// The device registration of a region with remote access.
    pub region: Option<vfabric::MemoryRegion>,
    /// The registration from the domain's cache (crate::mr_cache) the MR stands on.
    cached: Option<crate::mr_cache::Handle>,
    /// Counters bound with `fi_mr_bind` (they refuse to close while bound). Declared after
    /// `region` so the registration goes first.
    bound: Mutex<Vec<ParentRef>>,
}

static MR_FI_OPS: LazyLock<sys::fi_ops> = LazyLock::new(|| sys::fi_ops {
    size: std::mem::size_of::<sys::fi_ops>(),
    close: Some(mr_close),
    bind: Some(mr_bind),
    control: Some(mr_control),
    ops_open: nosys(),
    tostr: nosys(),
    ops_set: nosys(),
});

fn mr_create(
    domain: *mut sys::fid_domain,
    iov: &[(usize, usize)],
    access: u64,
    requested_key: u64,
    flags: u64,
    mr: *mut *mut sys::fid_mr,
    context: *mut c_void,
) -> c_int {
    if mr.is_null() {
        return -fi::EINVAL;
    }
    // SAFETY: consumer passes its domain.
    let d = match unsafe { obj::<DomainObj>(domain.cast(), sys::FI_CLASS_DOMAIN) } {
        Ok(d) => d,
        Err(e) => return -e,
    };
    if flags & !(fi::RMA_EVENT | fi::RMA_PMEM) != 0 {
        return -fi::EBADFLAGS;
    }
    let remote = access & (fi::REMOTE_READ | fi::REMOTE_WRITE) != 0;
    // FI_RMA_EVENT as a registration flag, or in the domain's caps for remote-access regions.
    let rma_event = flags & fi::RMA_EVENT != 0 || (d.rma_event && remote);
    let prov_key = d.mr_mode & sys::FI_MR_PROV_KEY as i32 != 0
        || d.mr_mode == sys::fi_mr_mode_FI_MR_BASIC as i32;
    let (addr, len) = iov.first().copied().unwrap_or((0, 0));
    let (key, region) = if remote || rma_event {
        if iov.iter().any(|&(p, l)| p == 0 && l > 0) {
            return -fi::EINVAL;
        }
        // FI_RMA_PMEM: the buffer must be a shared mapping of a file, which the device
        // persists (held open until the device has its own handle).
        let backing = if flags & fi::RMA_PMEM != 0 {
            if iov.len() != 1 {
                return -fi::EINVAL;
            }
            match crate::pmem::backing_file(addr, len) {
                Ok(b) => Some(b),
                Err(why) => {
                    crate::util::warn(
                        sys::fi_log_subsys_FI_LOG_MR,
                        &format!("fi_mr_reg(FI_RMA_PMEM) refused: {why}"),
                    );
                    return -fi::EINVAL;
                }
            }
        } else {
            None
        };
        let attr = vfabric::MrAttr {
            access,
            requested_key: (!prov_key).then_some(requested_key),
            offset_addressing: d.mr_mode & sys::FI_MR_VIRT_ADDR as i32 == 0
                && d.mr_mode != sys::fi_mr_mode_FI_MR_BASIC as i32,
            rma_event,
            pmem: backing.as_ref().map(|(f, offset)| vfabric::PmemBacking {
                fd: std::os::fd::AsRawFd::as_raw_fd(f),
                offset: *offset,
            }),
        };
        // One plain range with a provider key (no counters, no persistence; a cached
        // application key would stay taken): through the registration cache.
        if iov.len() == 1 && !rma_event && attr.pmem.is_none() && attr.requested_key.is_none() {
            return match d.mr_cache.register(addr, len, access, Some(attr)) {
                Ok(h) => new_mr(
                    d,
                    h.key().unwrap_or(0),
                    addr,
                    len,
                    access,
                    None,
                    Some(h),
                    mr,
                    context,
                ),
                Err(e) => -e,
            };
        }
        let segs: Vec<(*const u8, usize)> = iov.iter().map(|&(p, l)| (p as *const u8, l)).collect();
        // SAFETY: libfabric's registration contract: the buffers stay valid while registered
        // (the device reaches them by cross-memory attach, see `Domain::register_external`).
        match unsafe { d.dom.register_raw_iov(&segs, &attr) } {
            Ok(r) => (r.key(), Some(r)),
            Err(e) => return -errno_of(&e, sys::fi_log_subsys_FI_LOG_MR),
        }
    } else {
        if iov.len() > 1 {
            return -fi::EINVAL;
        }
        let key = if prov_key {
            d.next_key.fetch_add(1, Ordering::Relaxed)
        } else {
            requested_key
        };
        // A large local registration under FI_MR_LOCAL: share the buffer with the device so
        // that sends and receives on it skip the bounce buffers (through the registration
        // cache, which also takes the pages back when the registration goes).
        if d.mr_mode & sys::FI_MR_LOCAL as i32 != 0
            && len >= crate::mr_cache::SHARE_LOCAL_MIN
            && addr != 0
        {
            return match d.mr_cache.register(addr, len, access, None) {
                Ok(h) => new_mr(d, key, addr, len, access, None, Some(h), mr, context),
                Err(e) => -e,
            };
        }
        (key, None)
    };
    new_mr(d, key, addr, len, access, region, None, mr, context)
}

#[allow(clippy::too_many_arguments)]
fn new_mr(
    d: &DomainObj,
    key: u64,
    addr: usize,
    len: usize,
    access: u64,
    region: Option<vfabric::MemoryRegion>,
    cached: Option<crate::mr_cache::Handle>,
    mr: *mut *mut sys::fid_mr,
    context: *mut c_void,
) -> c_int {
    let obj = Box::new(MrObj {
        fid: sys::fid_mr {
            fid: sys::fid {
                fclass: sys::FI_CLASS_MR as usize,
                context,
                ops: ops_ptr(&*MR_FI_OPS),
            },
            mem_desc: std::ptr::null_mut(),
            key,
        },
        // SAFETY: the domain refuses to close while this count is held.
        _domain: unsafe { ParentRef::new(&d.refs) },
        addr,
        len,
        access,
        region,
        cached,
        bound: Mutex::new(Vec::new()),
    });
    let p = Box::into_raw(obj);
    // SAFETY: `p` is the fresh allocation; mem_desc points at the MR itself.
    unsafe {
        (*p).fid.mem_desc = p.cast();
        *mr = p.cast();
    }
    0
}

unsafe extern "C" fn mr_reg(
    domain: *mut sys::fid,
    buf: *const c_void,
    len: usize,
    access: u64,
    _offset: u64,
    requested_key: u64,
    flags: u64,
    mr: *mut *mut sys::fid_mr,
    context: *mut c_void,
) -> c_int {
    guard(|| {
        mr_create(
            domain.cast(),
            &[(buf as usize, len)],
            access,
            requested_key,
            flags,
            mr,
            context,
        )
    })
}

unsafe extern "C" fn mr_regv(
    domain: *mut sys::fid,
    iov: *const sys::iovec,
    count: usize,
    access: u64,
    _offset: u64,
    requested_key: u64,
    flags: u64,
    mr: *mut *mut sys::fid_mr,
    context: *mut c_void,
) -> c_int {
    guard(|| {
        if iov.is_null() && count > 0 {
            return -fi::EINVAL;
        }
        let v: Vec<(usize, usize)> = (0..count)
            // SAFETY: `iov` holds `count` entries.
            .map(|k| unsafe { ((*iov.add(k)).iov_base as usize, (*iov.add(k)).iov_len) })
            .collect();
        mr_create(domain.cast(), &v, access, requested_key, flags, mr, context)
    })
}

unsafe extern "C" fn mr_regattr(
    domain: *mut sys::fid,
    attr: *const sys::fi_mr_attr,
    flags: u64,
    mr: *mut *mut sys::fid_mr,
) -> c_int {
    guard(|| {
        if attr.is_null() {
            return -fi::EINVAL;
        }
        // SAFETY: non-NULL consumer attribute.
        let a = unsafe { &*attr };
        if a.iface != sys::fi_hmem_iface_FI_HMEM_SYSTEM {
            return -fi::ENOSYS;
        }
        if a.mr_iov.is_null() && a.iov_count > 0 {
            return -fi::EINVAL;
        }
        let v: Vec<(usize, usize)> = (0..a.iov_count)
            // SAFETY: `mr_iov` holds `iov_count` entries.
            .map(|k| unsafe {
                (
                    (*a.mr_iov.add(k)).iov_base as usize,
                    (*a.mr_iov.add(k)).iov_len,
                )
            })
            .collect();
        mr_create(
            domain.cast(),
            &v,
            a.access,
            a.requested_key,
            flags,
            mr,
            a.context,
        )
    })
}

unsafe extern "C" fn mr_close(fid: *mut sys::fid) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our MRs.
        if let Err(e) = unsafe { obj::<MrObj>(fid, sys::FI_CLASS_MR) } {
            return -e;
        }
        // SAFETY: created by Box::into_raw in mr_create.
        drop(unsafe { Box::from_raw(fid.cast::<MrObj>()) });
        0
    })
}

/// `fi_mr_bind`: a counter counting remote accesses to a region registered with FI_RMA_EVENT
/// (flags FI_REMOTE_WRITE and/or FI_REMOTE_READ; the device counts both kinds of access).
unsafe extern "C" fn mr_bind(fid: *mut sys::fid, bfid: *mut sys::fid, flags: u64) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our MRs.
        let m = match unsafe { obj::<MrObj>(fid, sys::FI_CLASS_MR) } {
            Ok(m) => m,
            Err(e) => return -e,
        };
        if bfid.is_null() {
            return -fi::EINVAL;
        }
        // SAFETY: non-NULL fid of the consumer; only its class is read.
        let class = unsafe { (*bfid).fclass } as u32;
        if class != sys::FI_CLASS_CNTR {
            return -fi::EINVAL;
        }
        if flags & !(fi::REMOTE_READ | fi::REMOTE_WRITE) != 0 {
            return -fi::EBADFLAGS;
        }
        // SAFETY: class checked; one of our counters.
        let c = match unsafe { obj::<CntrObj>(bfid, sys::FI_CLASS_CNTR) } {
            Ok(c) => c,
            Err(e) => return -e,
        };
        let Some(region) = m.region.as_ref() else {
            return -fi::EINVAL;
        };
        if let Err(e) = region.bind_cntr(&c.cntr) {
            return -errno_of(&e, sys::fi_log_subsys_FI_LOG_MR);
        }
        // SAFETY: the counter refuses to close while this count is held.
        let pr = unsafe { ParentRef::new(&c.refs) };
        m.bound.lock().unwrap_or_else(|e| e.into_inner()).push(pr);
        0
    })
}

unsafe extern "C" fn mr_control(_fid: *mut sys::fid, cmd: c_int, _arg: *mut c_void) -> c_int {
    if cmd == sys::FI_ENABLE as c_int {
        0
    } else {
        -fi::ENOSYS
    }
}

// ---------------------------------------------------------------------------------------------
// Completion queue
// ---------------------------------------------------------------------------------------------

/// FI_WAIT_FD state: the signal fd, the stop flag and handle of its progress thread.
type WaitFd = (
    c_int,
    Arc<AtomicBool>,
    Mutex<Option<std::thread::JoinHandle<()>>>,
);

/// `fid_cq`.
#[repr(C)]
pub struct CqObj {
    pub fid: sys::fid_cq,
    _domain: ParentRef,
    domain: *const DomainObj,
    pub cq: Arc<CompletionQueue>,
    format: u32,
    /// FI_WAIT_FD: the pollable signal fd and the progress thread that makes it fire.
    wait_fd: Option<WaitFd>,
    /// Gone peers of the domain this CQ has reported (crate::watch).
    peers_gone_seen: Arc<AtomicUsize>,
    pub refs: Refs,
}

static CQ_FI_OPS: LazyLock<sys::fi_ops> = LazyLock::new(|| sys::fi_ops {
    size: std::mem::size_of::<sys::fi_ops>(),
    close: Some(cq_close),
    bind: nosys(),
    control: Some(cq_control),
    ops_open: nosys(),
    tostr: nosys(),
    ops_set: nosys(),
});

static CQ_OPS: LazyLock<sys::fi_ops_cq> = LazyLock::new(|| sys::fi_ops_cq {
    size: std::mem::size_of::<sys::fi_ops_cq>(),
    read: Some(cq_read),
    readfrom: Some(cq_readfrom),
    readerr: Some(cq_readerr),
    sread: Some(cq_sread),
    sreadfrom: Some(cq_sreadfrom),
    signal: nosys(),
    strerror: Some(cq_strerror),
});

unsafe extern "C" fn cq_open(
    domain: *mut sys::fid_domain,
    attr: *mut sys::fi_cq_attr,
    cq: *mut *mut sys::fid_cq,
    context: *mut c_void,
) -> c_int {
    guard(|| {
        if attr.is_null() || cq.is_null() {
            return -fi::EINVAL;
        }
        // SAFETY: consumer passes its domain.
        let d = match unsafe { obj::<DomainObj>(domain.cast(), sys::FI_CLASS_DOMAIN) } {
            Ok(d) => d,
            Err(e) => return -e,
        };
        // SAFETY: non-NULL attribute.
        let a = unsafe { &*attr };
        let format = match a.format {
            sys::fi_cq_format_FI_CQ_FORMAT_UNSPEC => sys::fi_cq_format_FI_CQ_FORMAT_CONTEXT,
            f @ sys::fi_cq_format_FI_CQ_FORMAT_CONTEXT..=sys::fi_cq_format_FI_CQ_FORMAT_TAGGED => f,
            _ => return -fi::EINVAL,
        };
        let wait = match a.wait_obj {
            sys::fi_wait_obj_FI_WAIT_NONE => WaitMode::None,
            sys::fi_wait_obj_FI_WAIT_UNSPEC
            | sys::fi_wait_obj_FI_WAIT_MUTEX_COND
            | sys::fi_wait_obj_FI_WAIT_YIELD
            | sys::fi_wait_obj_FI_WAIT_FD => WaitMode::Blocking,
            // FI_WAIT_POLLFD / FI_WAIT_SET: not implemented.
            _ => return -fi::ENOSYS,
        };
        if a.wait_cond != sys::fi_cq_wait_cond_FI_CQ_COND_NONE {
            return -fi::ENOSYS;
        }
        let handle = match d.dom.cq_open(CqAttr {
            size: if a.size == 0 { 1024 } else { a.size },
            wait,
        }) {
            Ok(c) => c,
            Err(e) => return -errno_of(&e, sys::fi_log_subsys_FI_LOG_CQ),
        };
        let handle = Arc::new(handle);
        // Peers gone before the CQ existed are not its news.
        let seen = Arc::new(AtomicUsize::new(
            d.watch
                .get()
                .and_then(Option::as_ref)
                .map_or(0, |w| w.gone_count()),
        ));
        let wait_fd = if a.wait_obj == sys::fi_wait_obj_FI_WAIT_FD {
            let fd = handle.signal_fd();
            let stop = Arc::new(AtomicBool::new(false));
            let (q, st) = (handle.clone(), stop.clone());
            let (dom, seen) = (SendPtr(std::ptr::from_ref(d).cast_mut()), seen.clone());
            // Progress thread: sleeps on the device's call eventfds and drives progress, so
            // entries arrive (and write the signal fd) while the consumer sleeps in poll(2).
            let t = std::thread::Builder::new()
                .name("vfabric-cq-progress".into())
                .spawn(move || {
                    let dom = dom; // the whole wrapper, not its raw-pointer field
                    while !st.load(Ordering::Acquire) {
                        if q.wait_device(Duration::from_millis(50)).is_err() {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        // A gone peer's entry signals the fd too. SAFETY: the domain outlives
                        // this CQ, whose close joins this thread.
                        report_gone_peers(unsafe { &*dom.0 }, &seen, &q);
                    }
                });
            match t {
                Ok(t) => Some((fd, stop, Mutex::new(Some(t)))),
                Err(_) => return -fi::ENOMEM,
            }
        } else {
            None
        };
        let obj = Box::new(CqObj {
            fid: sys::fid_cq {
                fid: sys::fid {
                    fclass: sys::FI_CLASS_CQ as usize,
                    context,
                    ops: ops_ptr(&*CQ_FI_OPS),
                },
                ops: ops_ptr(&*CQ_OPS),
            },
            // SAFETY: the domain refuses to close while this count is held.
            _domain: unsafe { ParentRef::new(&d.refs) },
            domain: d,
            cq: handle,
            format,
            wait_fd,
            peers_gone_seen: seen,
            refs: Refs::default(),
        });
        // SAFETY: valid out pointer.
        unsafe { *cq = Box::into_raw(obj).cast() };
        0
    })
}

unsafe extern "C" fn cq_close(fid: *mut sys::fid) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our CQs.
        let c = match unsafe { obj::<CqObj>(fid, sys::FI_CLASS_CQ) } {
            Ok(c) => c,
            Err(e) => return -e,
        };
        if c.refs.busy() {
            return -fi::EBUSY;
        }
        if let Some((_, stop, t)) = &c.wait_fd {
            stop.store(true, Ordering::Release);
            if let Some(t) = t.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = t.join();
            }
        }
        // SAFETY: created by Box::into_raw in cq_open; no endpoint is bound to it and its
        // progress thread has exited.
        drop(unsafe { Box::from_raw(fid.cast::<CqObj>()) });
        0
    })
}

unsafe extern "C" fn cq_control(fid: *mut sys::fid, cmd: c_int, arg: *mut c_void) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our CQs.
        let c = match unsafe { obj::<CqObj>(fid, sys::FI_CLASS_CQ) } {
            Ok(c) => c,
            Err(e) => return -e,
        };
        if arg.is_null() {
            return -fi::EINVAL;
        }
        match (cmd as u32, &c.wait_fd) {
            // SAFETY: for FI_GETWAIT with FI_WAIT_FD, `arg` is an `int *`.
            (sys::FI_GETWAIT, Some((fd, _, _))) => unsafe { *arg.cast::<c_int>() = *fd },
            // SAFETY: for FI_GETWAITOBJ, `arg` is an `enum fi_wait_obj *`.
            (sys::FI_GETWAITOBJ, Some(_)) => unsafe {
                *arg.cast::<u32>() = sys::fi_wait_obj_FI_WAIT_FD
            },
            _ => return -fi::ENOSYS,
        }
        0
    })
}

/// `fi_trywait` on CQs: `-FI_EAGAIN` if one has entries queued (read them instead of
/// sleeping), else 0 (the consumer may block on the wait fds).
pub fn trywait_cq(fid: *mut sys::fid) -> c_int {
    // SAFETY: consumer passes one of our CQs.
    match unsafe { obj::<CqObj>(fid, sys::FI_CLASS_CQ) } {
        Ok(c) if c.cq.queued() > 0 => -fi::EAGAIN,
        Ok(_) => 0,
        Err(e) => -e,
    }
}

fn entry_size(format: u32) -> usize {
    match format {
        sys::fi_cq_format_FI_CQ_FORMAT_MSG => std::mem::size_of::<sys::fi_cq_msg_entry>(),
        sys::fi_cq_format_FI_CQ_FORMAT_DATA => std::mem::size_of::<sys::fi_cq_data_entry>(),
        sys::fi_cq_format_FI_CQ_FORMAT_TAGGED => std::mem::size_of::<sys::fi_cq_tagged_entry>(),
        _ => std::mem::size_of::<sys::fi_cq_entry>(),
    }
}

/// Write entry `k` of `buf` in the CQ's format.
///
/// # Safety
/// `buf` is writable for at least `k + 1` entries of the format.
unsafe fn write_entry(format: u32, buf: *mut c_void, k: usize, e: &CqEntry, at: *mut c_void) {
    let ctx = e.context as *mut c_void;
    let flags = e.flags;
    // SAFETY: per the contract, slot `k` of the consumer's array of this format is writable.
    unsafe {
        let p = buf.cast::<u8>().add(k * entry_size(format));
        match format {
            sys::fi_cq_format_FI_CQ_FORMAT_MSG => {
                p.cast::<sys::fi_cq_msg_entry>()
                    .write_unaligned(sys::fi_cq_msg_entry {
                        op_context: ctx,
                        flags,
                        len: e.len,
                    })
            }
            sys::fi_cq_format_FI_CQ_FORMAT_DATA => p
                .cast::<sys::fi_cq_data_entry>()
                .write_unaligned(sys::fi_cq_data_entry {
                    op_context: ctx,
                    flags,
                    len: e.len,
                    buf: at,
                    data: e.data,
                }),
            sys::fi_cq_format_FI_CQ_FORMAT_TAGGED => p
                .cast::<sys::fi_cq_tagged_entry>()
                .write_unaligned(sys::fi_cq_tagged_entry {
                    op_context: ctx,
                    flags,
                    len: e.len,
                    buf: at,
                    data: e.data,
                    tag: e.tag,
                }),
            _ => p
                .cast::<sys::fi_cq_entry>()
                .write_unaligned(sys::fi_cq_entry { op_context: ctx }),
        }
    }
}

/// Common body of read/readfrom/sread/sreadfrom.
fn cq_read_common(
    cq: *mut sys::fid_cq,
    buf: *mut c_void,
    count: usize,
    src: *mut u64,
    timeout: Option<Option<Duration>>,
) -> isize {
    if buf.is_null() && count > 0 {
        return -(fi::EINVAL as isize);
    }
    // SAFETY: consumer passes one of our CQs.
    let c = match unsafe { obj::<CqObj>(cq.cast(), sys::FI_CLASS_CQ) } {
        Ok(c) => c,
        Err(e) => return -(e as isize),
    };
    if count == 0 {
        return 0;
    }
    // Per thread, not per CQ: a lock held across a blocking sread would block other threads'
    // non-blocking reads of the CQ (FI_THREAD_SAFE).
    thread_local!(static SCRATCH: std::cell::Cell<Vec<CqEntry>> = const { std::cell::Cell::new(Vec::new()) });
    let mut v = SCRATCH.with(|s| s.take());
    v.clear();
    if c.wait_fd.is_some() {
        c.cq.drain_signal();
    }
    let r = match timeout {
        None => c.cq.read(&mut v, count),
        Some(t) => sread_watching(c, &mut v, count, t),
    };
    if c.wait_fd.is_some() {
        c.cq.resignal_if_queued();
    }
    let ret = match r {
        Ok(n) => {
            // SAFETY: the domain outlives its CQs (ParentRef).
            let multi = unsafe { &(*c.domain).multi };
            for (k, e) in v.iter_mut().enumerate() {
                let at = if e.flags & fi::RECV != 0 {
                    multi.complete(e)
                } else {
                    std::ptr::null_mut()
                };
                // SAFETY: `buf` holds `count` ≥ n entries of the CQ's format; `src` NULL or
                // `count` addresses.
                unsafe {
                    write_entry(c.format, buf, k, e, at);
                    if !src.is_null() {
                        *src.add(k) = e.src_addr;
                    }
                }
            }
            n as isize
        }
        Err(vfabric::Error::Timeout) => peers_gone(c).unwrap_or(-(fi::EAGAIN as isize)),
        Err(vfabric::Error::Again) => peers_gone(c).unwrap_or_else(|| {
            empty_poll();
            -(fi::EAGAIN as isize)
        }),
        Err(e) => -(errno_of(&e, sys::fi_log_subsys_FI_LOG_CQ) as isize),
    };
    SCRATCH.with(|s| s.set(v));
    ret
}

/// Longest slice of a blocking read while the domain watches peers: a gone peer's watch
/// completes on another CQ, so a waiter looks between slices.
const WATCH_SLICE: Duration = Duration::from_millis(100);

/// `sread` that, when the domain watches peers, waits in slices and ends with `Timeout` as soon
/// as a watched peer has gone (the caller then reports it).
fn sread_watching(
    c: &CqObj,
    v: &mut Vec<CqEntry>,
    count: usize,
    timeout: Option<Duration>,
) -> vfabric::Result<usize> {
    // SAFETY: the domain outlives its CQs (ParentRef).
    let Some(w) = unsafe { &*c.domain }.watch.get().and_then(Option::as_ref) else {
        return c.cq.sread(v, count, timeout);
    };
    let end = timeout.map(|t| std::time::Instant::now() + t);
    loop {
        if w.poll() > c.peers_gone_seen.load(Ordering::Acquire) {
            return Err(vfabric::Error::Timeout);
        }
        let left = end.map(|e| e.saturating_duration_since(std::time::Instant::now()));
        let slice = left.map_or(WATCH_SLICE, |l| l.min(WATCH_SLICE));
        match c.cq.sread(v, count, Some(slice)) {
            Err(vfabric::Error::Timeout) if left.is_none_or(|l| l > slice) => {}
            r => return r,
        }
    }
}

/// An empty CQ reports peers of the domain that went away since it last looked, one error
/// entry each (see crate::watch): `Some(-FI_EAVAIL)` if there are any.
fn peers_gone(c: &CqObj) -> Option<isize> {
    // SAFETY: the domain outlives its CQs (ParentRef).
    report_gone_peers(unsafe { &*c.domain }, &c.peers_gone_seen, &c.cq)
        .then_some(-(fi::EAVAIL as isize))
}

/// Queue on `cq` an error entry per peer of `d` gone since `seen`; whether there were any.
fn report_gone_peers(d: &DomainObj, seen: &AtomicUsize, cq: &CompletionQueue) -> bool {
    let Some(w) = d.watch.get().and_then(Option::as_ref) else {
        return false;
    };
    let now = w.poll();
    let before = seen.load(Ordering::Acquire);
    // One reporter per batch (the consumer's read or a FI_WAIT_FD progress thread).
    if now <= before
        || seen
            .compare_exchange(before, now, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
    {
        return false;
    }
    for e in w.gone_since(before).into_iter().take(now - before) {
        cq.push_error(e);
    }
    true
}

/// Empty polls between `sched_yield`s (a power of two).
const POLLS_PER_YIELD: u32 = 32;

/// A consumer spinning on `fi_cq_read` (as `fi_pingpong` does) would keep the device's
/// thread off a CPU it shares; yield every few empty polls so the device makes progress.
fn empty_poll() {
    thread_local!(static EMPTY: std::cell::Cell<u32> = const { std::cell::Cell::new(0) });
    EMPTY.with(|c| {
        let n = c.get().wrapping_add(1);
        c.set(n);
        if n % POLLS_PER_YIELD == 0 {
            std::thread::yield_now();
        }
    });
}

unsafe extern "C" fn cq_read(cq: *mut sys::fid_cq, buf: *mut c_void, count: usize) -> isize {
    guard(|| cq_read_common(cq, buf, count, std::ptr::null_mut(), None))
}

unsafe extern "C" fn cq_readfrom(
    cq: *mut sys::fid_cq,
    buf: *mut c_void,
    count: usize,
    src: *mut u64,
) -> isize {
    guard(|| cq_read_common(cq, buf, count, src, None))
}

fn timeout_of(ms: c_int) -> Option<Duration> {
    (ms >= 0).then(|| Duration::from_millis(ms as u64))
}

unsafe extern "C" fn cq_sread(
    cq: *mut sys::fid_cq,
    buf: *mut c_void,
    count: usize,
    _cond: *const c_void,
    timeout: c_int,
) -> isize {
    guard(|| {
        cq_read_common(
            cq,
            buf,
            count,
            std::ptr::null_mut(),
            Some(timeout_of(timeout)),
        )
    })
}

unsafe extern "C" fn cq_sreadfrom(
    cq: *mut sys::fid_cq,
    buf: *mut c_void,
    count: usize,
    src: *mut u64,
    _cond: *const c_void,
    timeout: c_int,
) -> isize {
    guard(|| cq_read_common(cq, buf, count, src, Some(timeout_of(timeout))))
}

unsafe extern "C" fn cq_readerr(
    cq: *mut sys::fid_cq,
    buf: *mut sys::fi_cq_err_entry,
    _flags: u64,
) -> isize {
    guard(|| {
        if buf.is_null() {
            return -(fi::EINVAL as isize);
        }
        // SAFETY: consumer passes one of our CQs.
        let c = match unsafe { obj::<CqObj>(cq.cast(), sys::FI_CLASS_CQ) } {
            Ok(c) => c,
            Err(e) => return -(e as isize),
        };
        let Some(mut e) = c.cq.readerr() else {
            return -(fi::EAGAIN as isize);
        };
        // SAFETY: the domain outlives its CQs (ParentRef).
        unsafe { &(*c.domain).multi }.complete_err(&mut e);
        // SAFETY: non-NULL consumer entry.
        let out = unsafe { &mut *buf };
        out.op_context = e.context as *mut c_void;
        out.flags = e.flags;
        out.len = e.len;
        out.buf = std::ptr::null_mut();
        out.data = e.data;
        out.tag = e.tag;
        out.olen = e.olen;
        out.err = e.err;
        out.prov_errno = e.prov_errno;
        // No provider error data (a consumer-supplied buffer is left untouched).
        out.err_data_size = 0;
        1
    })
}

/// Text of a device status (`prov_errno` of an error completion).
pub fn status_text(prov_errno: i32) -> &'static std::ffi::CStr {
    match prov_errno {
        0 => c"vfabric: success",
        1 => c"vfabric: malformed request (INVALID)",
        2 => c"vfabric: operation not supported by the device (UNSUPPORTED)",
        3 => c"vfabric: endpoint not open on the device (BAD_ENDPOINT)",
        4 => c"vfabric: destination address names no open endpoint (ADDR_NOT_AVAIL)",
        5 => c"vfabric: receive buffer shorter than the message (TRUNCATED)",
        6 => c"vfabric: operation canceled (CANCELED)",
        7 => c"vfabric: protection error: key, range or access (ACCESS)",
        8 => c"vfabric: device resource limit reached (NO_RESOURCES)",
        9 => c"vfabric: descriptor outside guest memory (FAULT)",
        10 => c"vfabric: peer disconnected with the operation in flight (PEER_GONE)",
        11 => c"vfabric: no matching message (NO_MESSAGE)",
        12 => c"vfabric: message larger than max_msg_size (TOO_LARGE)",
        13 => c"vfabric: requested key in use (KEY_IN_USE)",
        14 => c"vfabric: malformed descriptor chain (BAD_CHAIN)",
        15 => c"vfabric: the destination's host is unreachable (HOST_UNREACH)",
        16 => c"vfabric: the target's commit handler refused the commit; its value is in data (COMMIT_REFUSED)",
        17 => c"vfabric: the target did not answer the commit in time (TIMED_OUT)",
        _ => c"vfabric: unknown device status",
    }
}

unsafe extern "C" fn cq_strerror(
    _cq: *mut sys::fid_cq,
    prov_errno: c_int,
    _err_data: *const c_void,
    buf: *mut c_char,
    len: usize,
) -> *const c_char {
    let s = status_text(prov_errno);
    if !buf.is_null() && len > 0 {
        let mut l = len;
        // SAFETY: `buf` writable for `len` bytes.
        unsafe { copy_str_out(&s.to_string_lossy(), buf, &mut l) };
    }
    s.as_ptr()
}

/// `FI_EVENT` (asynchronous AV inserts).
const EVENT_FLAG: u64 = sys::FI_EVENT as u64;
/// `FI_SYNC_ERR`.
const SYNC_ERR: u64 = sys::FI_SYNC_ERR;

// ---------------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------------

/// `fid_cntr` over `vfabric::rma::Counter`.
#[repr(C)]
pub struct CntrObj {
    pub fid: sys::fid_cntr,
    _domain: ParentRef,
    pub cntr: vfabric::rma::Counter,
    wait: bool,
    pub refs: Refs,
}

static CNTR_FI_OPS: LazyLock<sys::fi_ops> = LazyLock::new(|| sys::fi_ops {
    size: std::mem::size_of::<sys::fi_ops>(),
    close: Some(cntr_close),
    bind: nosys(),
    control: nosys(),
    ops_open: nosys(),
    tostr: nosys(),
    ops_set: nosys(),
});

static CNTR_OPS: LazyLock<sys::fi_ops_cntr> = LazyLock::new(|| sys::fi_ops_cntr {
    size: std::mem::size_of::<sys::fi_ops_cntr>(),
    read: Some(cntr_read),
    readerr: Some(cntr_readerr),
    add: Some(cntr_add),
    set: Some(cntr_set),
    wait: Some(cntr_wait),
    adderr: Some(cntr_adderr),
    seterr: Some(cntr_seterr),
});

unsafe extern "C" fn cntr_open(
    domain: *mut sys::fid_domain,
    attr: *mut sys::fi_cntr_attr,
    cntr: *mut *mut sys::fid_cntr,
    context: *mut c_void,
) -> c_int {
    guard(|| {
        if attr.is_null() || cntr.is_null() {
            return -fi::EINVAL;
        }
        // SAFETY: consumer passes its domain.
        let d = match unsafe { obj::<DomainObj>(domain.cast(), sys::FI_CLASS_DOMAIN) } {
            Ok(d) => d,
            Err(e) => return -e,
        };
        // SAFETY: non-NULL attribute.
        let a = unsafe { &*attr };
        if a.events != sys::fi_cntr_events_FI_CNTR_EVENTS_COMP {
            return -fi::ENOSYS;
        }
        let wait = match a.wait_obj {
            sys::fi_wait_obj_FI_WAIT_NONE => false,
            sys::fi_wait_obj_FI_WAIT_UNSPEC
            | sys::fi_wait_obj_FI_WAIT_MUTEX_COND
            | sys::fi_wait_obj_FI_WAIT_YIELD => true,
            _ => return -fi::ENOSYS,
        };
        let c = match d.dom.cntr_open() {
            Ok(c) => c,
            Err(e) => return -errno_of(&e, sys::fi_log_subsys_FI_LOG_CNTR),
        };
        let obj = Box::new(CntrObj {
            fid: sys::fid_cntr {
                fid: sys::fid {
                    fclass: sys::FI_CLASS_CNTR as usize,
                    context,
                    ops: ops_ptr(&*CNTR_FI_OPS),
                },
                ops: ops_ptr(&*CNTR_OPS),
            },
            // SAFETY: the domain refuses to close while this count is held.
            _domain: unsafe { ParentRef::new(&d.refs) },
            cntr: c,
            wait,
            refs: Refs::default(),
        });
        // SAFETY: valid out pointer.
        unsafe { *cntr = Box::into_raw(obj).cast() };
        0
    })
}

unsafe extern "C" fn cntr_close(fid: *mut sys::fid) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our counters.
        let c = match unsafe { obj::<CntrObj>(fid, sys::FI_CLASS_CNTR) } {
            Ok(c) => c,
            Err(e) => return -e,
        };
        if c.refs.busy() {
            return -fi::EBUSY;
        }
        // SAFETY: created by Box::into_raw in cntr_open; no endpoint is bound to it.
        drop(unsafe { Box::from_raw(fid.cast::<CntrObj>()) });
        0
    })
}

/// The counter behind a `fid_cntr` (None for a NULL or foreign fid).
fn cntr_of<'a>(c: *mut sys::fid_cntr) -> Option<&'a CntrObj> {
    // SAFETY: consumer passes one of our counters (class checked).
    unsafe { obj::<CntrObj>(c.cast(), sys::FI_CLASS_CNTR) }.ok()
}

unsafe extern "C" fn cntr_read(c: *mut sys::fid_cntr) -> u64 {
    std::panic::catch_unwind(|| cntr_of(c).map_or(0, |c| c.cntr.read())).unwrap_or(0)
}

unsafe extern "C" fn cntr_readerr(c: *mut sys::fid_cntr) -> u64 {
    std::panic::catch_unwind(|| cntr_of(c).map_or(0, |c| c.cntr.readerr())).unwrap_or(0)
}

unsafe extern "C" fn cntr_add(c: *mut sys::fid_cntr, v: u64) -> c_int {
    guard(|| {
        cntr_of(c).map_or(-fi::EINVAL, |c| {
            c.cntr.add(v);
            0
        })
    })
}

unsafe extern "C" fn cntr_set(c: *mut sys::fid_cntr, v: u64) -> c_int {
    guard(|| {
        cntr_of(c).map_or(-fi::EINVAL, |c| {
            c.cntr.set(v);
            0
        })
    })
}

unsafe extern "C" fn cntr_adderr(c: *mut sys::fid_cntr, v: u64) -> c_int {
    guard(|| {
        cntr_of(c).map_or(-fi::EINVAL, |c| {
            c.cntr.adderr(v);
            0
        })
    })
}

unsafe extern "C" fn cntr_seterr(c: *mut sys::fid_cntr, v: u64) -> c_int {
    guard(|| {
        cntr_of(c).map_or(-fi::EINVAL, |c| {
            c.cntr.seterr(v);
            0
        })
    })
}

unsafe extern "C" fn cntr_wait(c: *mut sys::fid_cntr, threshold: u64, timeout: c_int) -> c_int {
    guard(|| {
        let Some(c) = cntr_of(c) else {
            return -fi::EINVAL;
        };
        if !c.wait {
            return -fi::ENOSYS;
        }
        match c.cntr.wait(threshold, timeout_of(timeout)) {
            Ok(()) => 0,
            Err(vfabric::Error::Timeout) => -fi::ETIMEDOUT,
            Err(e) => -errno_of(&e, sys::fi_log_subsys_FI_LOG_CNTR),
        }
    })
}
