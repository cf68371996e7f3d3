// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `fi_getinfo`: hints → device probes (`vfabric::getinfo`) → `fi_info` lists.
//!
//! Each device is one domain; for each, one `fi_info` per endpoint type that fits the hints
//! (RDM, DGRAM, then MSG, which the provider builds over RDM endpoints). Nothing fitting is
//! `-FI_ENODATA`, so utility providers (ofi_rxm, ofi_rxd) do not stack on us.

use std::ffi::c_void;
use std::time::Duration;

use vfabric::{fi, proto, DeviceLocator, EpType, Hints, Info};

use crate::addr::{self, Addr, Format};

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
/// FI_HMEM: device memory through the consumer's copy functions (hmem.rs); offered only to
/// hints that ask for it, with FI_MR_HMEM.
pub const HMEM: u64 = sys::FI_HMEM;
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

fn devices_param() -> Option<Vec<DeviceLocator>> {
    let v = crate::param_str(c"devices")?;
    let list = vfabric::info::parse_device_list(&v);
    (!list.is_empty()).then_some(list)
}

/// Every device this process may use (FI_VFABRIC_DEVICES, VFABRIC_DEVICES, the default socket
/// directory and virtio-pci fabric devices).
pub fn all_devices() -> Vec<DeviceLocator> {
    vfabric::info::device_locators(&Hints {
        devices: devices_param(),
        ..Hints::default()
    })
}

/// How long a probed device may leave the connection unaccepted before it counts as busy (it
/// serves another guest): a free device accepts at once, however slow this process is.
const ACCEPT_DEADLINE: Duration = Duration::from_millis(500);

/// Probe `paths` in parallel, each reported busy if not accepted within `accept`.
fn probe_parallel(paths: &[&DeviceLocator], accept: Duration) -> Vec<vfabric::Result<Info>> {
    std::thread::scope(|s| {
        let probes: Vec<_> = paths
            .iter()
            .map(|p| s.spawn(move || Info::probe_within((*p).clone(), accept)))
            .collect();
        probes
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(vfabric::Error::Transport("probe panicked".into())))
            })
            .collect()
    })
}

/// One `Info` per reachable device matching the domain name. Devices are probed in parallel,
/// and one that does not accept within [`ACCEPT_DEADLINE`] (busy with another guest) is left
/// out, so busy devices cost at most that once, not the driver's probe deadline each. Only when
/// no device answered are the others probed again, one by one, with the full deadline.
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
    let wanted: Vec<&DeviceLocator> = paths
        .iter()
        .filter(|p| h.domain_name.as_ref().is_none_or(|d| *d == p.domain_name()))
        .collect();
    let mut found: Vec<Option<Info>> = wanted.iter().map(|p| crate::domain::open_info(p)).collect();
    let to_probe: Vec<&DeviceLocator> = wanted
        .iter()
        .zip(&found)
        .filter(|(_, f)| f.is_none())
        .map(|(p, _)| *p)
        .collect();
    let mut busy = Vec::new();
    let mut results = probe_parallel(&to_probe, ACCEPT_DEADLINE).into_iter();
    for (k, f) in found.iter_mut().enumerate() {
        if f.is_some() {
            continue;
        }
        match results.next() {
            Some(Ok(i)) => *f = Some(i),
            // Busy, or a set-up that failed under load: looked at again if nothing answered.
            Some(Err(e)) => {
                crate::util::log(
                    sys::fi_log_level_FI_LOG_DEBUG,
                    sys::fi_log_subsys_FI_LOG_CORE,
                    &format!("probe of {}: {e}", wanted[k]),
                );
                busy.push(k)
            }
            None => {}
        }
    }
    let none_free = found.iter().all(Option::is_none);
    for k in busy {
        if none_free {
            match Info::probe(wanted[k]) {
                Ok(i) => {
                    found[k] = Some(i);
                    continue;
                }
                Err(e) => warn(
                    sys::fi_log_subsys_FI_LOG_CORE,
                    &format!("probe of {} failed: {e}", wanted[k]),
                ),
            }
        } else {
            // Expected where processes share a fabric (one MPI rank per device).
            crate::util::log(
                sys::fi_log_level_FI_LOG_DEBUG,
                sys::fi_log_subsys_FI_LOG_CORE,
                &format!("{} is busy (it serves another guest): skipped", wanted[k]),
            );
        }
    }
    for i in found.iter().flatten() {
        crate::domain::note_fabric(i);
    }
    Ok(found.into_iter().flatten().collect())
}

/// The hints, read from C.
#[derive(Default, Debug)]
struct CHints {
    caps: u64,
    mode: u64,
    addr_format: u32,
    /// Source and destination addresses as given (decoded once the format is known).
    src_raw: Option<Vec<u8>>,
    dest_raw: Option<Vec<u8>>,
    /// Decoded addresses (hints, then node/service).
    src: Option<Addr>,
    dest: Option<Addr>,
    ep_type: u32,
    protocol: u32,
    max_msg_size: usize,
    mem_tag_format: u64,
    ep_ctx_cnt: usize,
    max_order_size: usize,
    auth_key: bool,
    inject_size: usize,
    domain_name: Option<String>,
    fabric_name: Option<String>,
    mr_mode: i32,
    mr_key_size: usize,
    domain_caps: u64,
    av_type: u32,
    threading: u32,
    resource_mgmt: u32,
    data_progress: u32,
    control_progress: u32,
    tx_size: usize,
    rx_size: usize,
    tx_iov_limit: usize,
    rx_iov_limit: usize,
    tx_op_flags: u64,
    rx_op_flags: u64,
    cq_data_size: usize,
    msg_order: u64,
    comp_order: u64,
    /// The API version the consumer asked for.
    version: u32,
    /// The address format of the answer.
    format: Option<Format>,
    /// No hints at all: every mode bit is acceptable.
    no_hints: bool,
}

/// # Safety
/// `p` is NULL or readable for `len` bytes.
unsafe fn raw_addr(p: *const c_void, len: usize) -> Option<Vec<u8>> {
    if p.is_null() {
        return None;
    }
    // SAFETY: per the contract (a consumer's address of `len` bytes); bounded so a bogus
    // length cannot make us read far.
    Some(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len.min(4096)) }.to_vec())
}

/// # Safety
/// `hints` is NULL or a valid `fi_info` whose attribute pointers are NULL or valid.
unsafe fn read_hints(hints: *const sys::fi_info) -> CHints {
    let mut h = CHints::default();
    if hints.is_null() {
        h.no_hints = true;
        return h;
    }
    // SAFETY: non-NULL and valid per the caller's contract.
    let hi = unsafe { &*hints };
    h.caps = hi.caps;
    h.mode = hi.mode;
    h.addr_format = hi.addr_format;
    // SAFETY: fi_info's address pointers are valid for their lengths.
    unsafe {
        h.src_raw = raw_addr(hi.src_addr, hi.src_addrlen);
        h.dest_raw = raw_addr(hi.dest_addr, hi.dest_addrlen);
    }
    if !hi.ep_attr.is_null() {
        // SAFETY: non-NULL attribute of a valid fi_info.
        let ep = unsafe { &*hi.ep_attr };
        h.ep_type = ep.type_;
        h.protocol = ep.protocol;
        h.max_msg_size = ep.max_msg_size;
        h.mem_tag_format = ep.mem_tag_format;
        h.ep_ctx_cnt = ep.tx_ctx_cnt.max(ep.rx_ctx_cnt);
        h.max_order_size = ep
            .max_order_raw_size
            .max(ep.max_order_war_size)
            .max(ep.max_order_waw_size);
        h.auth_key = !ep.auth_key.is_null() || ep.auth_key_size > 0;
    }
    if !hi.tx_attr.is_null() {
        // SAFETY: as above.
        let tx = unsafe { &*hi.tx_attr };
        h.caps |= tx.caps;
        h.inject_size = tx.inject_size;
        h.tx_size = tx.size;
        h.tx_iov_limit = tx.iov_limit;
        h.msg_order |= tx.msg_order;
        h.comp_order |= tx.comp_order;
        h.tx_op_flags = tx.op_flags;
    }
    if !hi.rx_attr.is_null() {
        // SAFETY: as above.
        let rx = unsafe { &*hi.rx_attr };
        h.caps |= rx.caps;
        h.rx_size = rx.size;
        h.rx_iov_limit = rx.iov_limit;
        h.msg_order |= rx.msg_order;
        h.comp_order |= rx.comp_order;
        h.rx_op_flags = rx.op_flags;
    }
    if !hi.domain_attr.is_null() {
        // SAFETY: as above; `name` is NULL or a C string.
        let d = unsafe { &*hi.domain_attr };
        // SAFETY: `name` is NULL or a NUL-terminated string of the consumer's hints.
        h.domain_name = unsafe { c_str(d.name) };
        h.mr_mode = d.mr_mode;
        h.mr_key_size = d.mr_key_size;
        h.domain_caps = d.caps;
        h.av_type = d.av_type;
        h.threading = d.threading;
        h.resource_mgmt = d.resource_mgmt;
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
        EpType::Msg => (MSG_EP_CAPS & info.caps) | fi::MSG | fi::MULTI_RECV | HMEM,
        _ => (info.caps & PROVIDER_CAPS) | fi::MULTI_RECV | HMEM,
    }
}

fn ep_type_fi(t: EpType) -> u32 {
    match t {
        EpType::Rdm => sys::fi_ep_type_FI_EP_RDM,
        EpType::Dgram => sys::fi_ep_type_FI_EP_DGRAM,
        EpType::Msg => sys::fi_ep_type_FI_EP_MSG,
    }
}

/// `FI_VERSION(1, 5)`: from this version on `mr_mode` is a bit mask (before, an enum).
const FI_VERSION_1_5: u32 = (1 << 16) | 5;
/// Operation flags a consumer may make the default of an endpoint's transmit / receive side.
const TX_OP_FLAGS: u64 = fi::COMPLETION
    | fi::INJECT
    | fi::INJECT_COMPLETE
    | fi::TRANSMIT_COMPLETE
    | fi::DELIVERY_COMPLETE
    | fi::COMMIT_COMPLETE
    | fi::FENCE;
const RX_OP_FLAGS: u64 = fi::COMPLETION | fi::MULTI_RECV;
/// The legacy `mr_mode` values (an enum before 1.5, still accepted alone afterwards).
const MR_BASIC: i32 = sys::fi_mr_mode_FI_MR_BASIC as i32;
const MR_SCALABLE: i32 = sys::fi_mr_mode_FI_MR_SCALABLE as i32;

/// Message ordering the device gives (`msg_order`).
fn msg_order_of(info: &Info) -> u64 {
    info.limits.msg_order.map_or(
        fi::ORDER_SAS,
        |o| if o & 1 != 0 { fi::ORDER_SAS } else { 0 },
    )
}

/// The `mr_mode` of an answer to hints `h` (`None`: the hints' value cannot be honoured).
fn mr_mode_of(h: &CHints, caps: u64) -> Option<i32> {
    let m = h.mr_mode;
    if h.version < FI_VERSION_1_5 {
        // An enum: FI_MR_UNSPEC lets the provider choose. Requested keys and offsets work, so
        // the scalable model needs nothing of the consumer.
        return match m {
            0 => Some(MR_SCALABLE),
            MR_BASIC | MR_SCALABLE => Some(m),
            _ => None,
        };
    }
    if m == MR_BASIC || m == MR_SCALABLE {
        return Some(m);
    }
    if m & (MR_BASIC | MR_SCALABLE) != 0 {
        // The legacy values do not combine with the bit mask.
        return None;
    }
    // No mode bit is required (messaging needs no registration; RMA regions may use requested
    // keys and offsets). FI_MR_PROV_KEY and FI_MR_VIRT_ADDR are honoured when the consumer
    // offers them (device-chosen keys, virtual addresses), so they are echoed; so is
    // FI_MR_LOCAL (descriptors stay optional, large registered buffers avoid bounce copies).
    let hmem = if caps & HMEM != 0 {
        m & sys::FI_MR_HMEM as i32
    } else {
        0
    };
    Some(
        hmem | if caps & (fi::RMA | fi::ATOMIC) != 0 {
            m & (sys::FI_MR_LOCAL | sys::FI_MR_PROV_KEY | sys::FI_MR_VIRT_ADDR) as i32
        } else {
            m & sys::FI_MR_LOCAL as i32
        },
    )
}

/// Why `info`/`ep_type` does not fit `h` (None: it fits).
fn mismatch(h: &CHints, info: &Info, ep_type: EpType) -> Option<String> {
    let caps = caps_of(info, ep_type);
    if h.caps & !caps != 0 {
        return Some(format!("caps {:#x} not offered", h.caps & !caps));
    }
    if h.domain_caps & !(fi::LOCAL_COMM | fi::REMOTE_COMM) != 0 {
        return Some("domain caps".into());
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
    let cq_data = if info.device_features & proto::bit(proto::VIRTIO_FABRIC_F_REMOTE_CQ_DATA) != 0 {
        info.limits.max_cq_data_size.unwrap_or(8).min(8) as usize
    } else {
        0
    };
    if h.cq_data_size > cq_data {
        return Some("cq_data_size".into());
    }
    if h.msg_order & !msg_order_of(info) != 0 {
        return Some(format!(
            "msg_order {:#x} not given",
            h.msg_order & !msg_order_of(info)
        ));
    }
    if h.comp_order != 0 {
        return Some("comp_order (completions are unordered: FI_ORDER_NONE)".into());
    }
    if h.tx_op_flags & !TX_OP_FLAGS != 0 || h.rx_op_flags & !RX_OP_FLAGS != 0 {
        return Some("op_flags".into());
    }
    if h.tx_op_flags & fi::COMMIT_COMPLETE != 0 && caps & fi::RMA_PMEM == 0 {
        return Some("FI_COMMIT_COMPLETE without FI_RMA_PMEM".into());
    }
    if mr_mode_of(h, caps).is_none() {
        return Some(format!("mr_mode {:#x}", h.mr_mode));
    }
    if h.caps & HMEM != 0 && (h.version < FI_VERSION_1_5 || h.mr_mode & sys::FI_MR_HMEM as i32 == 0)
    {
        // Device memory is known by its registration (the descriptor names iface and device).
        return Some("FI_HMEM without FI_MR_HMEM in mr_mode".into());
    }
    if h.mr_key_size > 8 {
        return Some("mr_key_size".into());
    }
    if h.protocol != sys::FI_PROTO_UNSPEC {
        return Some("protocol".into());
    }
    if h.mem_tag_format & !tag_format_of(info, caps) != 0 {
        return Some("mem_tag_format".into());
    }
    if h.ep_ctx_cnt > 1 {
        return Some("several or shared tx/rx contexts".into());
    }
    if h.max_order_size > 0 {
        return Some("max_order_*_size".into());
    }
    if h.auth_key {
        return Some("auth_key".into());
    }
    if h.fabric_name
        .as_ref()
        .is_some_and(|f| f != vfabric::FABRIC_NAME)
    {
        return Some("fabric name".into());
    }
    if let Some(Addr::Native(src)) = &h.src {
        if src.node != info.node_addr {
            return Some("src_addr on another device".into());
        }
    }
    let this_host = (info.node_addr >> 16) as u16;
    if let Some(Addr::Host(s)) = &h.src {
        if addr::host_of(info, s.ip()) != Some(this_host) {
            return Some(format!("source host {} is not this host", s.ip()));
        }
    }
    if let Some(Addr::Host(d)) = &h.dest {
        if addr::host_of(info, d.ip()).is_none() {
            return Some(format!(
                "host {} is neither this machine nor an uplink address of the fabric",
                d.ip()
            ));
        }
    }
    None
}

/// The tag bits of a device (`mem_tag_format`).
fn tag_format_of(info: &Info, caps: u64) -> u64 {
    if caps & fi::TAGGED == 0 {
        return 0;
    }
    match info.limits.tag_bits {
        Some(b) if b < 64 => (1u64 << b) - 1,
        _ => u64::MAX,
    }
}

/// Decode the hints' addresses and apply `node`/`service`: fills `h.src`, `h.dest` and
/// `h.format`. `Err` with the reason when the request cannot be answered (-FI_ENODATA).
fn resolve_addresses(
    h: &mut CHints,
    node: Option<&str>,
    service: Option<&str>,
    flags: u64,
) -> Result<(), String> {
    let asked = Format::from_fi(h.addr_format)
        .ok_or_else(|| format!("addr_format {} not supported", h.addr_format))?;
    let decode = |raw: &Option<Vec<u8>>, what: &str| -> Result<Option<Addr>, String> {
        match raw {
            None => Ok(None),
            Some(b) => addr::decode(asked, b)
                .map(Some)
                .ok_or_else(|| format!("{what} is not a {asked:?} address")),
        }
    };
    h.src = decode(&h.src_raw, "hints->src_addr")?;
    h.dest = decode(&h.dest_raw, "hints->dest_addr")?;
    let svc = match service {
        Some(s) => Some(addr::parse_service(s).ok_or_else(|| format!("service {s:?}"))?),
        None => None,
    };
    // The family a host name resolves to: the one the format asks for, else IPv4 first.
    let want_v6 = asked == Format::In6;
    let want_v4 = asked == Format::In;
    if let Some(n) = node {
        let numeric = n.trim().trim_start_matches('[').trim_end_matches(']');
        if flags & sys::FI_NUMERICHOST != 0
            && numeric.parse::<std::net::IpAddr>().is_err()
            && !n.trim().starts_with("vfab://")
            && !n.trim().starts_with("fi_")
        {
            return Err(format!("FI_NUMERICHOST with node {n:?}"));
        }
        let a = if n.trim().starts_with("vfab://") || n.trim().starts_with("fi_") {
            match addr::parse_str(n) {
                Some(Addr::Host(s)) => {
                    Addr::Host(std::net::SocketAddr::new(s.ip(), svc.unwrap_or(s.port())))
                }
                Some(a) => a,
                None => return Err(format!("node {n:?} is no address")),
            }
        } else {
            let all = addr::lookup_host(n, svc.unwrap_or(0));
            let pick = all
                .iter()
                .find(|a| (!want_v6 || a.is_ipv6()) && (!want_v4 || a.is_ipv4()))
                .or_else(|| all.iter().find(|a| want_v6 && a.is_ipv4()))
                .copied()
                .ok_or_else(|| format!("node {n:?} has no address of the format asked for"))?;
            Addr::Host(pick)
        };
        if flags & fi::SOURCE != 0 {
            h.src = Some(a);
        } else {
            h.dest = Some(a);
        }
    } else if let Some(s) = svc {
        // A service alone names a local service: the source, as for FI_SOURCE.
        let like = if want_v6 {
            Some(std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED))
        } else {
            None
        };
        h.src = Some(Addr::Host(addr::local_name(like, s)));
    }
    // The answer's format: the one asked for, or the one the addresses came in.
    let host = [&h.src, &h.dest]
        .into_iter()
        .flatten()
        .find(|a| matches!(a, Addr::Host(_)))
        .copied();
    let format = match (asked, host) {
        (Format::Native, Some(a)) => asked.concrete_for(&a),
        (f, _) => f,
    };
    for a in [&h.src, &h.dest].into_iter().flatten() {
        if addr::encode(format, a).is_none() {
            return Err(format!("{a:?} cannot be given as {format:?}"));
        }
    }
    if format.is_host() && h.src.is_none() {
        // A source address of the format: this host, any service (bound when enabled).
        let like = match h.dest {
            Some(Addr::Host(d)) => Some(if d.is_ipv6() {
                std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            } else {
                std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
            }),
            _ if format == Format::In6 => {
                Some(std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED))
            }
            _ => None,
        };
        h.src = Some(Addr::Host(addr::local_name(like, 0)));
    }
    h.format = Some(format);
    Ok(())
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
    h.version = version;
    // SAFETY: NULL or C strings.
    let (node, service) = unsafe { (c_str(node), c_str(service)) };
    if let Err(why) = resolve_addresses(&mut h, node.as_deref(), service.as_deref(), flags) {
        debug(sys::fi_log_subsys_FI_LOG_CORE, &why);
        return Err(fi::ENODATA);
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
    // The RMA/atomic modifiers (primary modifiers, fi_getinfo(3)) go with RMA or atomics
    // only: the ones asked for, else both directions of both.
    let rma_mods = fi::READ | fi::WRITE | fi::REMOTE_READ | fi::REMOTE_WRITE;
    if out_caps & (fi::RMA | fi::ATOMIC) == 0 {
        out_caps &= !(rma_mods | fi::RMA_EVENT | fi::RMA_PMEM);
    } else if h.caps & rma_mods != 0 {
        out_caps = (out_caps & !rma_mods) | (h.caps & rma_mods);
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
    if h.caps & HMEM == 0 {
        out_caps &= !HMEM;
    }
    i.caps = out_caps;
    i.mode = 0;
    let format = h.format.unwrap_or(Format::Native);
    i.addr_format = format.to_fi();
    // Addresses were checked to be expressible in `format` (resolve_addresses).
    if let Some(b) = h.src.as_ref().and_then(|a| addr::encode(format, a)) {
        i.src_addr = malloc_copy(&b);
        i.src_addrlen = if i.src_addr.is_null() { 0 } else { b.len() };
    }
    if let Some(b) = h.dest.as_ref().and_then(|a| addr::encode(format, a)) {
        i.dest_addr = malloc_copy(&b);
        i.dest_addrlen = if i.dest_addr.is_null() { 0 } else { b.len() };
    }
    let qsize = l.max_queue_size.clamp(1, 1 << 16) as usize;
    let sge = l.max_sge.max(1) as usize;
    let order = msg_order_of(dev);
    // SAFETY: checked non-NULL above; allocated by fi_dupinfo.
    unsafe {
        let tx = &mut *i.tx_attr;
        tx.caps = out_caps & !(fi::RECV | fi::DIRECTED_RECV | fi::MULTI_RECV);
        tx.mode = 0;
        // The hints' default operation flags become the endpoint's (fi_getinfo(3)): Open MPI
        // binds its CQ with FI_SELECTIVE_COMPLETION and asks for FI_COMPLETION here.
        tx.op_flags = h.tx_op_flags & TX_OP_FLAGS;
        tx.msg_order = order;
        tx.comp_order = 0;
        tx.inject_size = l.inject_size as usize;
        tx.size = qsize;
        tx.iov_limit = sge;
        tx.rma_iov_limit = 0;
        let rx = &mut *i.rx_attr;
        rx.caps = out_caps & !fi::SEND;
        rx.mode = 0;
        rx.op_flags = h.rx_op_flags & RX_OP_FLAGS;
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
        // The consumer's tag format when it asked for one (checked to fit the device's).
        ep.mem_tag_format = if h.mem_tag_format != 0 {
            h.mem_tag_format
        } else {
            tag_format_of(dev, caps)
        };
        ep.tx_ctx_cnt = 1;
        ep.rx_ctx_cnt = 1;
        let d = &mut *i.domain_attr;
        d.name = c_strdup(&dev.domain_name);
        // Every object is thread safe, which meets any level the consumer asks for.
        d.threading = if h.threading != sys::fi_threading_FI_THREAD_UNSPEC {
            h.threading
        } else {
            sys::fi_threading_FI_THREAD_SAFE
        };
        d.control_progress = sys::fi_progress_FI_PROGRESS_MANUAL;
        d.data_progress = sys::fi_progress_FI_PROGRESS_MANUAL;
        d.resource_mgmt = if h.resource_mgmt != sys::fi_resource_mgmt_FI_RM_UNSPEC {
            h.resource_mgmt
        } else {
            sys::fi_resource_mgmt_FI_RM_ENABLED
        };
        d.av_type = if h.av_type == sys::fi_av_type_FI_AV_UNSPEC {
            sys::fi_av_type_FI_AV_UNSPEC
        } else {
            h.av_type
        };
        d.mr_mode = mr_mode_of(h, out_caps).unwrap_or(0);
        d.mr_key_size = 8;
        // Remote CQ data of an RMA write consumes a posted receive at the target (spec
        // §6.10.3): that is FI_RX_CQ_DATA mode. A consumer that does not accept the mode gets
        // no remote CQ data with RMA (cq_data_size 0, writedata refused) rather than writes
        // that take the receives meant for its messages (its replies then never match).
        let rma_cq_data = out_caps & (fi::RMA | fi::WRITE | fi::REMOTE_WRITE) != 0;
        let rx_cq_data_ok = h.no_hints || h.mode & sys::FI_RX_CQ_DATA != 0;
        d.cq_data_size = if dev.device_features & proto::bit(proto::VIRTIO_FABRIC_F_REMOTE_CQ_DATA)
            == 0
            || (rma_cq_data && !rx_cq_data_ok)
        {
            0
        } else {
            l.max_cq_data_size.unwrap_or(8).min(8) as usize
        };
        if rma_cq_data && d.cq_data_size > 0 {
            i.mode |= sys::FI_RX_CQ_DATA;
            rx.mode |= sys::FI_RX_CQ_DATA;
        }
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
        // fi_getinfo(3): the version the consumer asked for.
        f.api_version = if h.version != 0 {
            h.version
        } else {
            crate::FI_VERSION_1_17
        };
    }
    i.nic = crate::nic::nic_of(dev);
    p
}
