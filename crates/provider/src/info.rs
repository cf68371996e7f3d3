// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `fi_getinfo`: hints → device probes (`vfabric::getinfo`) → `fi_info` lists.
//!
//! Each device is one domain; for each, one `fi_info` per endpoint type that fits the hints
//! (RDM, DGRAM, then MSG, which the provider builds over RDM endpoints). Nothing fitting is
//! `-FI_ENODATA`, so utility providers (ofi_rxm, ofi_rxd) do not stack on us.

use std::ffi::c_void;

use vfabric::{fi, proto, EpType, FabricAddr, Hints, Info};

use crate::sys;
use crate::util::{c_str, c_strdup, debug, warn};

/// Capabilities this provider implements (offered when the device has them; RMA and atomics
/// only where the device offers the RMA/ATOMIC features, FI_RMA_EVENT with RMA).
pub const PROVIDER_CAPS: u64 = fi::MSG
    | fi::TAGGED
    | fi::RMA
    | fi::ATOMIC
    | fi::READ
    | fi::WRITE
    | fi::REMOTE_READ
    | fi::REMOTE_WRITE
    | fi::RMA_EVENT
    | fi::RMA_PMEM
    | fi::SEND
    | fi::RECV
    | fi::SOURCE
    | fi::DIRECTED_RECV
    | fi::LOCAL_COMM
    | fi::REMOTE_COMM;
/// Capabilities of the MSG endpoint type (built by the provider).
pub const MSG_EP_CAPS: u64 = fi::MSG | fi::SEND | fi::RECV | fi::LOCAL_COMM | fi::REMOTE_COMM;
/// `OFI_CORE_PROV_ONLY` (libfabric-internal `getinfo` flag, bit 59): set when a utility
/// provider queries the cores it could stack on.
const OFI_CORE_PROV_ONLY: u64 = 1 << 59;
/// Size of the connection-management private data (`FI_OPT_CM_DATA_SIZE`).
pub const CM_DATA_SIZE: usize = 256;
/// Tag bits reserved by the provider: none (CM runs on separate internal endpoints), so
/// `mem_tag_format` is the device's.
pub const ADDR_LEN: usize = proto::ADDR_LEN;

/// Find the device of a domain name (for `fi_domain`).
pub fn device_info(domain_name: &str) -> Result<Info, i32> {
    let infos = probe_all(&Hints {
        domain_name: Some(domain_name.to_string()),
        ..Hints::default()
    })?;
    infos.into_iter().next().ok_or(fi::ENODATA)
}

fn devices_param() -> Option<Vec<vfabric::DeviceLocator>> {
    let v = crate::param_str(c"devices")?;
    let list = vfabric::info::parse_device_list(&v);
    (!list.is_empty()).then_some(list)
}

/// One `Info` per reachable device matching the domain name.
fn probe_all(hints: &Hints) -> Result<Vec<Info>, i32> {
    let mut h = hints.clone();
    h.devices = devices_param();
    let paths = vfabric::info::device_locators(&h);
    if paths.is_empty() {
        warn(
            sys::fi_log_subsys_FI_LOG_CORE,
            &format!(
                "no vfabric devices: FI_VFABRIC_DEVICES and {} are unset, {} holds no *.sock \
                 and no virtio-pci fabric device was found",
                vfabric::info::DEVICES_ENV,
                vfabric::info::DEFAULT_SOCKET_DIR
            ),
        );
    }
    let mut out = Vec::new();
    for p in paths {
        let name = p.domain_name();
        if h.domain_name.as_ref().is_some_and(|d| *d != name) {
            continue;
        }
        if let Some(i) = crate::domain::open_info(&p) {
            out.push(i);
            continue;
        }
        match Info::probe(&p) {
            Ok(i) => out.push(i),
            Err(e) => warn(
                sys::fi_log_subsys_FI_LOG_CORE,
                &format!("probe of {p} failed: {e}"),
            ),
        }
    }
    Ok(out)
}

/// The hints, read from C.
#[derive(Default, Debug)]
struct CHints {
    caps: u64,
    mode: u64,
    addr_format: u32,
    src: Option<FabricAddr>,
    dest: Option<Vec<u8>>,
    ep_type: u32,
    max_msg_size: usize,
    inject_size: usize,
    domain_name: Option<String>,
    fabric_name: Option<String>,
    mr_mode: i32,
    av_type: u32,
    threading: u32,
    data_progress: u32,
    control_progress: u32,
    tx_size: usize,
    rx_size: usize,
    tx_iov_limit: usize,
    rx_iov_limit: usize,
    cq_data_size: usize,
    bad: bool,
}

/// Parse a node string as a vfabric address (`vfab://FABRIC.HOST.DEV/EP.GEN`).
fn parse_node(s: &str) -> Option<FabricAddr> {
    s.trim().parse().ok()
}

/// # Safety
/// `hints` is NULL or a valid `fi_info` whose attribute pointers are NULL or valid.
unsafe fn read_hints(hints: *const sys::fi_info) -> CHints {
    let mut h = CHints::default();
    if hints.is_null() {
        return h;
    }
    // SAFETY: non-NULL and valid per the caller's contract.
    let hi = unsafe { &*hints };
    h.caps = hi.caps;
    h.mode = hi.mode;
    h.addr_format = hi.addr_format;
    if !hi.src_addr.is_null() {
        if hi.src_addrlen != ADDR_LEN {
            h.bad = true;
        } else {
            // SAFETY: src_addr is valid for src_addrlen (= 16) bytes.
            let b = unsafe { std::slice::from_raw_parts(hi.src_addr.cast::<u8>(), ADDR_LEN) };
            match FabricAddr::from_bytes(b) {
                Ok(a) => h.src = Some(a),
                Err(_) => h.bad = true,
            }
        }
    }
    if !hi.dest_addr.is_null() {
        if hi.dest_addrlen != ADDR_LEN {
            h.bad = true;
        } else {
            // SAFETY: dest_addr is valid for dest_addrlen (= 16) bytes.
            let b = unsafe { std::slice::from_raw_parts(hi.dest_addr.cast::<u8>(), ADDR_LEN) };
            if FabricAddr::from_bytes(b).is_err() {
                h.bad = true;
            }
            h.dest = Some(b.to_vec());
        }
    }
    if !hi.ep_attr.is_null() {
        // SAFETY: non-NULL attribute of a valid fi_info.
        let ep = unsafe { &*hi.ep_attr };
        h.ep_type = ep.type_;
        h.max_msg_size = ep.max_msg_size;
    }
    if !hi.tx_attr.is_null() {
        // SAFETY: as above.
        let tx = unsafe { &*hi.tx_attr };
        h.caps |= tx.caps;
        h.inject_size = tx.inject_size;
        h.tx_size = tx.size;
        h.tx_iov_limit = tx.iov_limit;
    }
    if !hi.rx_attr.is_null() {
        // SAFETY: as above.
        let rx = unsafe { &*hi.rx_attr };
        h.caps |= rx.caps;
        h.rx_size = rx.size;
        h.rx_iov_limit = rx.iov_limit;
    }
    if !hi.domain_attr.is_null() {
        // SAFETY: as above; `name` is NULL or a C string.
        let d = unsafe { &*hi.domain_attr };
        // SAFETY: `name` is NULL or a NUL-terminated string of the consumer's hints.
        h.domain_name = unsafe { c_str(d.name) };
        h.mr_mode = d.mr_mode;
        h.av_type = d.av_type;
        h.threading = d.threading;
        h.data_progress = d.data_progress;
        h.control_progress = d.control_progress;
        h.cq_data_size = d.cq_data_size;
    }
    if !hi.fabric_attr.is_null() {
        // SAFETY: as above.
        let f = unsafe { &*hi.fabric_attr };
        // SAFETY: `name` is NULL or a NUL-terminated string of the consumer's hints.
        h.fabric_name = unsafe { c_str(f.name) };
    }
    h
}

/// Capabilities of `ep_type` on a device.
pub fn caps_of(info: &Info, ep_type: EpType) -> u64 {
    match ep_type {
        // FI_MULTI_RECV is emulated by the provider (multirecv.rs).
        EpType::Msg => (MSG_EP_CAPS & info.caps) | fi::MSG | fi::MULTI_RECV,
        _ => (info.caps & PROVIDER_CAPS) | fi::MULTI_RECV,
    }
}

fn ep_type_fi(t: EpType) -> u32 {
    match t {
        EpType::Rdm => sys::fi_ep_type_FI_EP_RDM,
        EpType::Dgram => sys::fi_ep_type_FI_EP_DGRAM,
        EpType::Msg => sys::fi_ep_type_FI_EP_MSG,
    }
}

/// Why `info`/`ep_type` does not fit `h` (None: it fits).
fn mismatch(h: &CHints, info: &Info, ep_type: EpType) -> Option<String> {
    let caps = caps_of(info, ep_type);
    if h.caps & !caps != 0 {
        return Some(format!("caps {:#x} not offered", h.caps & !caps));
    }
    if h.addr_format != sys::FI_FORMAT_UNSPEC {
        return Some(format!(
            "addr_format {} (only FI_FORMAT_UNSPEC)",
            h.addr_format
        ));
    }
    if h.max_msg_size as u64 > info.limits.max_msg_size {
        return Some("max_msg_size".into());
    }
    if h.inject_size as u64 > info.limits.inject_size {
        return Some("inject_size".into());
    }
    let qmax = info.limits.max_queue_size.max(1) as usize;
    if h.tx_size > qmax || h.rx_size > qmax {
        return Some("queue size".into());
    }
    let sge = info.limits.max_sge.max(1) as usize;
    if h.tx_iov_limit > sge || h.rx_iov_limit > sge {
        return Some("iov_limit".into());
    }
    if h.data_progress == sys::fi_progress_FI_PROGRESS_AUTO
        || h.control_progress == sys::fi_progress_FI_PROGRESS_AUTO
    {
        return Some("FI_PROGRESS_AUTO".into());
    }
    if h.av_type > sys::fi_av_type_FI_AV_TABLE {
        return Some("av_type".into());
    }
    if h.cq_data_size > 8 {
        return Some("cq_data_size".into());
    }
    if h.fabric_name
        .as_ref()
        .is_some_and(|f| f != vfabric::FABRIC_NAME)
    {
        return Some("fabric name".into());
    }
    if let Some(src) = &h.src {
        if src.node != info.node_addr {
            return Some("src_addr on another device".into());
        }
    }
    None
}

/// `fi_getinfo` body.
///
/// # Safety
/// As for `fi_getinfo`: `node`/`service` NULL or C strings, `hints` NULL or valid, `info`
/// valid for a write.
pub unsafe fn getinfo(
    version: u32,
    node: *const std::ffi::c_char,
    service: *const std::ffi::c_char,
    flags: u64,
    hints: *const sys::fi_info,
    info: *mut *mut sys::fi_info,
) -> Result<(), i32> {
    if info.is_null() {
        return Err(fi::EINVAL);
    }
    // SAFETY: non-NULL out pointer.
    unsafe { *info = std::ptr::null_mut() };
    if flags & OFI_CORE_PROV_ONLY != 0 {
        // A utility provider (ofi_rxm, ofi_rxd) asking for a core to stack on: we implement
        // RDM natively, so decline.
        debug(
            sys::fi_log_subsys_FI_LOG_CORE,
            "declining to be the core of a utility provider",
        );
        return Err(fi::ENODATA);
    }
    if version > crate::FI_VERSION_1_17 {
        debug(
            sys::fi_log_subsys_FI_LOG_CORE,
            "requested version newer than 1.17",
        );
        return Err(fi::ENODATA);
    }
    // SAFETY: per the caller's contract.
    let mut h = unsafe { read_hints(hints) };
    if h.bad {
        debug(
            sys::fi_log_subsys_FI_LOG_CORE,
            "hints: address of unknown format",
        );
        return Err(fi::ENODATA);
    }
    // SAFETY: NULL or C strings.
    let (node, service) = unsafe { (c_str(node), c_str(service)) };
    if let Some(n) = &node {
        match parse_node(n) {
            Some(a) if flags & fi::SOURCE != 0 => h.src = Some(a),
            Some(a) => h.dest = Some(a.to_bytes().to_vec()),
            None => {
                debug(
                    sys::fi_log_subsys_FI_LOG_CORE,
                    &format!("node {n:?} is not a vfab:// address"),
                );
                return Err(fi::ENODATA);
            }
        }
    }
    if service.is_some() && node.is_none() && flags & fi::SOURCE == 0 {
        // A service alone names a local port: vfabric has no ports.
        debug(
            sys::fi_log_subsys_FI_LOG_CORE,
            "service without node ignored",
        );
    }
    let types: Vec<EpType> = match h.ep_type {
        sys::fi_ep_type_FI_EP_UNSPEC => vec![EpType::Rdm, EpType::Dgram, EpType::Msg],
        sys::fi_ep_type_FI_EP_RDM => vec![EpType::Rdm],
        sys::fi_ep_type_FI_EP_DGRAM => vec![EpType::Dgram],
        sys::fi_ep_type_FI_EP_MSG => vec![EpType::Msg],
        _ => return Err(fi::ENODATA),
    };
    let devices = probe_all(&Hints {
        domain_name: h.domain_name.clone(),
        ..Hints::default()
    })?;
    let mut head: *mut sys::fi_info = std::ptr::null_mut();
    let mut tail: *mut sys::fi_info = std::ptr::null_mut();
    for dev in &devices {
        for &t in &types {
            if let Some(why) = mismatch(&h, dev, t) {
                debug(
                    sys::fi_log_subsys_FI_LOG_CORE,
                    &format!("{} {}: {why}", dev.domain_name, t.name()),
                );
                continue;
            }
            let fi_info = build(dev, t, &h);
            if fi_info.is_null() {
                // SAFETY: `head` is NULL or a list we allocated with fi_dupinfo.
                unsafe { sys::fi_freeinfo(head) };
                return Err(fi::ENOMEM);
            }
            if head.is_null() {
                head = fi_info;
            } else {
                // SAFETY: `tail` is the last element of our list.
                unsafe { (*tail).next = fi_info };
            }
            tail = fi_info;
        }
    }
    if head.is_null() {
        if devices.is_empty() {
            warn(
                sys::fi_log_subsys_FI_LOG_CORE,
                "no vfabric device reachable (VFABRIC_DEVICES / FI_VFABRIC_DEVICES / /run/vfabric)",
            );
        }
        return Err(fi::ENODATA);
    }
    // SAFETY: `info` is a valid out pointer.
    unsafe { *info = head };
    Ok(())
}

fn malloc_copy(bytes: &[u8]) -> *mut c_void {
    // SAFETY: malloc of a non-zero size; checked for NULL before the copy.
    let p = unsafe { libc::malloc(bytes.len().max(1)) };
    if !p.is_null() {
        // SAFETY: `p` is a fresh allocation of at least `bytes.len()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.cast::<u8>(), bytes.len()) };
    }
    p
}

/// Build one `fi_info` (allocated by the core's `fi_dupinfo`, so `fi_freeinfo` frees it).
fn build(dev: &Info, t: EpType, h: &CHints) -> *mut sys::fi_info {
    // SAFETY: fi_dupinfo(NULL) allocates a zeroed fi_info with every attribute structure.
    let p = unsafe { sys::fi_dupinfo(std::ptr::null()) };
    if p.is_null() {
        return p;
    }
    // SAFETY: `p` and its attribute pointers were just allocated by the core.
    let i = unsafe { &mut *p };
    if i.tx_attr.is_null()
        || i.rx_attr.is_null()
        || i.ep_attr.is_null()
        || i.domain_attr.is_null()
        || i.fabric_attr.is_null()
    {
        // SAFETY: `p` came from fi_dupinfo.
        unsafe { sys::fi_freeinfo(p) };
        return std::ptr::null_mut();
    }
    let l = &dev.limits;
    let caps = caps_of(dev, t);
    // Primary caps asked for plus all secondary ones we have.
    let primary = fi::MSG | fi::TAGGED | fi::RMA | fi::ATOMIC;
    let mut out_caps = if h.caps & primary != 0 {
        (h.caps & caps) | (caps & !primary & !(fi::SEND | fi::RECV))
    } else {
        caps
    };
    if h.caps & (fi::SEND | fi::RECV) != 0 {
        out_caps = (out_caps & !(fi::SEND | fi::RECV)) | (h.caps & (fi::SEND | fi::RECV));
    } else {
        out_caps |= caps & (fi::SEND | fi::RECV);
    }
    if h.caps & fi::SOURCE == 0 && h.caps != 0 {
        out_caps &= !fi::SOURCE;
    }
    if h.caps & fi::DIRECTED_RECV == 0 && h.caps != 0 {
        out_caps &= !fi::DIRECTED_RECV;
    }
    // FI_RMA_EVENT costs MR_EVENT traffic on every remote-access region of the domain: only
    // where asked for.
    if h.caps & fi::RMA_EVENT == 0 && h.caps != 0 {
        out_caps &= !fi::RMA_EVENT;
    }
    // FI_RMA_PMEM is a primary capability: only when asked for.
    if h.caps & fi::RMA_PMEM == 0 && h.caps != 0 {
        out_caps &= !fi::RMA_PMEM;
    }
    i.caps = out_caps;
    i.mode = 0;
    i.addr_format = sys::FI_FORMAT_UNSPEC;
    if let Some(src) = &h.src {
        i.src_addr = malloc_copy(&src.to_bytes());
        i.src_addrlen = if i.src_addr.is_null() { 0 } else { ADDR_LEN };
    }
    if let Some(d) = &h.dest {
        i.dest_addr = malloc_copy(d);
        i.dest_addrlen = if i.dest_addr.is_null() { 0 } else { d.len() };
    }
    let qsize = l.max_queue_size.clamp(1, 1 << 16) as usize;
    let sge = l.max_sge.max(1) as usize;
    let order = l.msg_order.map_or(
        fi::ORDER_SAS,
        |o| if o & 1 != 0 { fi::ORDER_SAS } else { 0 },
    );
    // SAFETY: checked non-NULL above; allocated by fi_dupinfo.
    unsafe {
        let tx = &mut *i.tx_attr;
        tx.caps = out_caps & !(fi::RECV | fi::DIRECTED_RECV | fi::MULTI_RECV);
        tx.mode = 0;
        tx.op_flags = 0;
        tx.msg_order = order;
        tx.comp_order = 0;
        tx.inject_size = l.inject_size as usize;
        tx.size = qsize;
        tx.iov_limit = sge;
        tx.rma_iov_limit = 0;
        let rx = &mut *i.rx_attr;
        rx.caps = out_caps & !fi::SEND;
        rx.mode = 0;
        rx.op_flags = 0;
        rx.msg_order = order;
        rx.comp_order = 0;
        rx.total_buffered_recv = l.max_unexpected_bytes.unwrap_or(0) as usize;
        rx.size = qsize;
        rx.iov_limit = sge;
        let ep = &mut *i.ep_attr;
        ep.type_ = ep_type_fi(t);
        ep.protocol = sys::FI_PROTO_UNSPEC;
        ep.protocol_version = 1;
        ep.max_msg_size = l.max_msg_size as usize;
        ep.msg_prefix_size = 0;
        ep.mem_tag_format = if caps & fi::TAGGED != 0 {
            match l.tag_bits {
                Some(b) if b < 64 => (1u64 << b) - 1,
                _ => u64::MAX,
            }
        } else {
            0
        };
        ep.tx_ctx_cnt = 1;
        ep.rx_ctx_cnt = 1;
        let d = &mut *i.domain_attr;
        d.name = c_strdup(&dev.domain_name);
        d.threading = sys::fi_threading_FI_THREAD_SAFE;
        d.control_progress = sys::fi_progress_FI_PROGRESS_MANUAL;
        d.data_progress = sys::fi_progress_FI_PROGRESS_MANUAL;
        d.resource_mgmt = sys::fi_resource_mgmt_FI_RM_ENABLED;
        d.av_type = if h.av_type == sys::fi_av_type_FI_AV_UNSPEC {
            sys::fi_av_type_FI_AV_UNSPEC
        } else {
            h.av_type
        };
        // No mode bit is required (messaging needs no registration; RMA regions may use
        // requested keys and offsets). FI_MR_PROV_KEY and FI_MR_VIRT_ADDR are honoured when
        // asked for (device-chosen keys, virtual addresses), so they are echoed, as are the
        // legacy BASIC/SCALABLE values; so is FI_MR_LOCAL (descriptors stay optional).
        d.mr_mode = if h.mr_mode == sys::fi_mr_mode_FI_MR_BASIC as i32
            || h.mr_mode == sys::fi_mr_mode_FI_MR_SCALABLE as i32
        {
            h.mr_mode
        } else if out_caps & (fi::RMA | fi::ATOMIC) != 0 {
            h.mr_mode & (sys::FI_MR_LOCAL | sys::FI_MR_PROV_KEY | sys::FI_MR_VIRT_ADDR) as i32
        } else {
            // FI_MR_LOCAL is echoed when offered: the consumer then registers its buffers,
            // and large registered buffers are shared with the device (no bounce copies).
            h.mr_mode & sys::FI_MR_LOCAL as i32
        };
        d.mr_key_size = 8;
        d.cq_data_size =
            if dev.device_features & proto::bit(proto::VIRTIO_FABRIC_F_REMOTE_CQ_DATA) != 0 {
                l.max_cq_data_size.unwrap_or(8).min(8) as usize
            } else {
                0
            };
        d.cq_cnt = 1024;
        d.ep_cnt = l.max_endpoints as usize;
        d.tx_ctx_cnt = l.max_endpoints as usize;
        d.rx_ctx_cnt = l.max_endpoints as usize;
        d.max_ep_tx_ctx = 1;
        d.max_ep_rx_ctx = 1;
        d.max_ep_stx_ctx = 0;
        d.max_ep_srx_ctx = 0;
        d.cntr_cnt = 1024;
        d.mr_iov_limit = 1;
        d.caps = fi::LOCAL_COMM | fi::REMOTE_COMM;
        d.mode = 0;
        d.max_err_data = 0;
        d.mr_cnt = l.max_mrs.max(1) as usize;
        let f = &mut *i.fabric_attr;
        f.name = c_strdup(vfabric::FABRIC_NAME);
        f.prov_name = std::ptr::null_mut();
        f.prov_version = crate::PROVIDER_VERSION;
        f.api_version = crate::FI_VERSION_1_17;
    }
    i.nic = crate::nic::nic_of(dev);
    p
}
