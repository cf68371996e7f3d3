// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The domain object (`fid_domain`) and the process's device sessions it opens. Its children
//! are in `av`, `mr`, `cq`, `cntr` and `ep`.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vfabric::{fi, DeviceLocator, Domain, DomainAttr, Info};

use crate::fabric::FabricObj;
use crate::sys;
use crate::util::{errno_of, fid_object, ops_ptr, ops_table, FidObject, ParentRef, Refs};

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
    pub next_key: AtomicU64,
    /// FI_MULTI_RECV buffers posted on this domain's endpoints.
    pub multi: crate::multirecv::Registry,
    /// Registered device memory (the consumer's HMEM copy functions are installed on `dom`).
    pub hmem: crate::hmem::Registry,
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
    pub fn watch(&self) -> Option<&crate::watch::PeerWatch> {
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

fid_object!(DomainObj, FI_CLASS_DOMAIN, refs: refs, closing: DomainObj::closing_session,
fi_ops {
    bind: crate::monitor::domain_bind,
    ops_open: crate::ext::domain_ops_open,
    ops_set: crate::ext::domain_ops_set,
});

impl DomainObj {
    /// Before the domain goes: its registration cache, then its share of the device session.
    fn closing_session(&self) {
        self.mr_cache.close();
        release(&self.info.device);
    }
}

ops_table!(DOMAIN_OPS: fi_ops_domain {
    av_open = crate::av::av_open,
    cq_open = crate::cq::cq_open,
    endpoint = crate::ep::endpoint_open,
    scalable_ep,
    cntr_open = crate::cntr::cntr_open,
    poll_open,
    stx_ctx,
    srx_ctx,
    query_atomic,
    query_collective,
    endpoint2 = crate::ep::endpoint_open2,
});

/// `fi_domain2`: no flags are defined.
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
    crate::util::open(fabric, info, dom, |f: &FabricObj, i| {
        // SAFETY: the consumer's fi_info's attribute pointers are NULL or valid.
        let da = unsafe { i.domain_attr.as_ref() }.ok_or(fi::EINVAL)?;
        // SAFETY: `name` is NULL or a NUL-terminated string of the consumer's fi_info.
        let name = unsafe { crate::util::c_str(da.name) }.ok_or(fi::EINVAL)?;
        let d = open_device(&name)?;
        let dev = d.info().clone();
        Ok(DomainObj {
            fid: sys::fid_domain {
                fid: DomainObj::fid(context),
                ops: ops_ptr(&DOMAIN_OPS),
                mr: ops_ptr(&crate::mr::MR_OPS),
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
            hmem: Default::default(),
            watch: Default::default(),
            // SAFETY: `ep_attr` is NULL or valid in the consumer's fi_info.
            watch_peers: unsafe { i.ep_attr.as_ref() }
                .is_none_or(|ep| ep.type_ != sys::fi_ep_type_FI_EP_DGRAM),
            mr_cache: crate::mr_cache::MrCache::new(d.clone()),
            refs: Refs::default(),
        })
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
