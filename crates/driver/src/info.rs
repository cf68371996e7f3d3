// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `getinfo`: find devices, probe them (config space + QUERY_CAPS), filter on hints.

use std::path::PathBuf;

use vfabric_proto::caps::key;
use vfabric_proto::{self as proto, bit, CapEntry, CapValue, FabricConfig};

use crate::domain::{DomainAttr, DomainInner};
use crate::endpoint::EpType;
use crate::transport::{pci, DeviceLocator};
use crate::{fi, Error, Result};

/// Where `vfabricd` puts its device sockets by default.
pub const DEFAULT_SOCKET_DIR: &str = "/run/vfabric";
/// Colon-separated list of devices (socket paths, `pci:DDDD:BB:DD.F`), overriding discovery.
/// (A PCI address contains colons: give it with its `pci:` prefix, e.g.
/// `VFABRIC_DEVICES=pci:0000:00:04.0`.)
pub const DEVICES_ENV: &str = "VFABRIC_DEVICES";
pub use crate::transport::pci::DEVICE_ID_ENV;
/// `fabric_attr->name`.
pub const FABRIC_NAME: &str = "vfabric";
/// How long `getinfo` waits for a device's answers.
pub const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Filter for [`getinfo`]. `Default` matches every device.
#[derive(Clone, Debug, Default)]
pub struct Hints {
    /// Devices to probe (else `VFABRIC_DEVICES`, else `*.sock` in [`DEFAULT_SOCKET_DIR`]
    /// and the virtio-pci fabric devices of this machine).
    pub devices: Option<Vec<DeviceLocator>>,
    /// libfabric capabilities needed (`fi::MSG | fi::TAGGED`, ...).
    pub caps: u64,
    /// virtio-fabric feature bits the device must offer (`proto::bit(F_*)`).
    pub features: u64,
    /// Endpoint type; `None` returns one `Info` per supported type (RDM, then DGRAM).
    pub ep_type: Option<EpType>,
    /// Domain name (socket file stem, e.g. `"vfabric0"`, or `"pci-0000:00:04.0"`).
    pub domain_name: Option<String>,
    /// Smallest acceptable `max_msg_size`.
    pub min_max_msg_size: Option<u64>,
}

/// Device limits, from QUERY_CAPS with config space as fallback.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_msg_size: u64,
    pub inject_size: u64,
    pub max_endpoints: u64,
    pub max_mrs: u64,
    pub max_queue_size: u64,
    pub num_queue_pairs: u64,
    pub max_sge: u64,
    pub max_unexpected_bytes: Option<u64>,
    pub eager_threshold: Option<u64>,
    pub tag_bits: Option<u64>,
    /// Ordering guarantees (bit 0: send-after-send per queue pair).
    pub msg_order: Option<u64>,
    /// Request flags the device honours (`proto::flags::*`).
    pub request_flags: Option<u64>,
    /// Capability classes implemented (`VIRTIO_FABRIC_F_*` bitmask).
    pub device_caps: Option<u64>,
    pub max_cq_data_size: Option<u64>,
    pub max_rma_size: Option<u64>,
    pub mr_key_size: Option<u64>,
    pub max_atomic_count: Option<u64>,
}

/// One device (and endpoint type) that matched the hints (`fi_info`).
#[derive(Clone, Debug)]
pub struct Info {
    /// `"vfabric"`.
    pub fabric_name: String,
    /// Socket file stem, e.g. `"vfabric0"`, or `pci-<bdf>`.
    pub domain_name: String,
    /// The device: a socket path or a PCI address.
    pub device: DeviceLocator,
    pub ep_type: EpType,
    /// libfabric capabilities usable through this driver on this device.
    pub caps: u64,
    /// Device node address (endpoint addresses extend it).
    pub node_addr: u64,
    /// The fabric the device belongs to: addresses of other fabrics are refused.
    pub fabric_id: u32,
    /// Other hosts of the fabric the device reaches (QUERY_CAPS `REMOTE_HOSTS`; empty on one
    /// host).
    pub remote_hosts: Vec<proto::caps::RemoteHostEntry>,
    /// IP addresses naming hosts of the fabric (QUERY_CAPS `HOST_ADDRS`: each host's uplink
    /// address; empty on one host).
    pub host_addrs: Vec<proto::caps::HostAddrEntry>,
    pub vendor_id: u32,
    /// Feature bits the device offers.
    pub device_features: u64,
    /// Names of `device_features`.
    pub feature_names: Vec<&'static str>,
    pub limits: Limits,
    /// Raw config space.
    pub config: FabricConfig,
    /// Every QUERY_CAPS entry.
    pub cap_entries: Vec<CapEntry>,
    /// Vendor-specific entries (vendor != 0), kept opaque.
    pub vendor_attrs: Vec<CapEntry>,
}

fn std_u64(entries: &[CapEntry], k: u16) -> Option<u64> {
    entries
        .iter()
        .find_map(|e| match (&e.value, e.vendor, e.key) {
            (CapValue::U64(v), 0, kk) if kk == k => Some(*v),
            _ => None,
        })
}

impl Info {
    pub(crate) fn build(
        device: &DeviceLocator,
        config: &FabricConfig,
        device_features: u64,
        cap_entries: Vec<CapEntry>,
    ) -> Info {
        let e = &cap_entries;
        let cfg = |v: proto::Le32| u32::from(v) as u64;
        let limits = Limits {
            max_msg_size: std_u64(e, key::MAX_MSG_SIZE).unwrap_or(config.max_msg_size.into()),
            inject_size: std_u64(e, key::INJECT_SIZE).unwrap_or(cfg(config.inject_size)),
            max_endpoints: std_u64(e, key::MAX_ENDPOINTS).unwrap_or(cfg(config.max_endpoints)),
            max_mrs: std_u64(e, key::MAX_MRS).unwrap_or(cfg(config.max_mrs)),
            max_queue_size: std_u64(e, key::MAX_QUEUE_SIZE).unwrap_or(cfg(config.max_queue_size)),
            num_queue_pairs: std_u64(e, key::NUM_QUEUE_PAIRS)
                .unwrap_or(cfg(config.num_queue_pairs)),
            max_sge: std_u64(e, key::MAX_SGE).unwrap_or(cfg(config.max_sge)),
            max_unexpected_bytes: std_u64(e, key::MAX_UNEXPECTED_BYTES),
            eager_threshold: std_u64(e, key::EAGER_THRESHOLD),
            tag_bits: std_u64(e, key::TAG_BITS),
            msg_order: std_u64(e, key::MSG_ORDER),
            request_flags: std_u64(e, key::FLAGS),
            device_caps: std_u64(e, key::CAPS),
            max_cq_data_size: std_u64(e, key::MAX_CQ_DATA_SIZE),
            max_rma_size: std_u64(e, key::MAX_RMA_SIZE),
            mr_key_size: std_u64(e, key::MR_KEY_SIZE),
            max_atomic_count: std_u64(e, key::MAX_ATOMIC_COUNT),
        };
        let mut caps = fi::MSG
            | fi::SEND
            | fi::RECV
            | fi::SOURCE
            | fi::DIRECTED_RECV
            | fi::LOCAL_COMM
            | fi::REMOTE_COMM;
        if limits.request_flags.is_none() {
            // Without FLAGS only the base flags may be used (spec §6.9.9).
            caps &= !fi::DIRECTED_RECV;
        }
        // A capability needs the feature bit offered and, when the device reports CAPS, the
        // class listed there (spec §5.1.4).
        let class_ok = |b: u32| {
            device_features & bit(b) != 0
                && !matches!(limits.device_caps, Some(c) if c & bit(b) == 0)
        };
        if class_ok(proto::VIRTIO_FABRIC_F_TAGGED) {
            caps |= fi::TAGGED;
        }
        if class_ok(proto::VIRTIO_FABRIC_F_RMA) {
            caps |=
                fi::RMA | fi::READ | fi::WRITE | fi::REMOTE_READ | fi::REMOTE_WRITE | fi::RMA_EVENT;
        }
        if class_ok(proto::VIRTIO_FABRIC_F_RMA) && class_ok(proto::VIRTIO_FABRIC_F_RMA_PMEM) {
            caps |= fi::RMA_PMEM;
        }
        if class_ok(proto::VIRTIO_FABRIC_F_ATOMIC) {
            caps |= fi::ATOMIC | fi::READ | fi::WRITE | fi::REMOTE_READ | fi::REMOTE_WRITE;
        }
        if limits
            .request_flags
            .is_some_and(|f| f & proto::flags::DIRECTED == 0)
        {
            caps &= !fi::DIRECTED_RECV;
        }
        let vendor_attrs = cap_entries
            .iter()
            .filter(|e| e.vendor != 0)
            .cloned()
            .collect();
        Info {
            fabric_name: FABRIC_NAME.to_string(),
            domain_name: device.domain_name(),
            device: device.clone(),
            ep_type: EpType::Rdm,
            caps,
            node_addr: config.node_addr.into(),
            fabric_id: config.fabric_id.into(),
            remote_hosts: e
                .iter()
                .find_map(|c| match (&c.value, c.vendor, c.key) {
                    (CapValue::Bytes(b), 0, key::REMOTE_HOSTS) => {
                        proto::caps::RemoteHostEntry::decode_all(b)
                    }
                    _ => None,
                })
                .unwrap_or_default(),
            host_addrs: e
                .iter()
                .find_map(|c| match (&c.value, c.vendor, c.key) {
                    (CapValue::Bytes(b), 0, key::HOST_ADDRS) => {
                        proto::caps::HostAddrEntry::decode_all(b)
                    }
                    _ => None,
                })
                .unwrap_or_default(),
            vendor_id: config.vendor_id.into(),
            device_features,
            feature_names: proto::feature_names(device_features),
            limits,
            config: *config,
            cap_entries,
            vendor_attrs,
        }
    }

    /// Probe one device (a device busy with another frontend fails after
    /// [`PROBE_TIMEOUT`]).
    pub fn probe(device: impl Into<DeviceLocator>) -> Result<Info> {
        Self::probe_within(device, PROBE_TIMEOUT)
    }

    /// Probe one device, reporting it busy (`Error::Busy`) if it has not accepted the
    /// connection within `accept_timeout` (it serves another frontend); a device that accepted
    /// gets [`PROBE_TIMEOUT`] for the rest.
    pub fn probe_within(
        device: impl Into<DeviceLocator>,
        accept_timeout: std::time::Duration,
    ) -> Result<Info> {
        let attr = DomainAttr {
            control_timeout: PROBE_TIMEOUT,
            accept_timeout: Some(accept_timeout),
            ..DomainAttr::default()
        };
        let inner = DomainInner::connect(&device.into(), &attr, true)?;
        let info = inner.info().clone();
        drop(inner);
        Ok(info)
    }

    /// Does this info satisfy `hints` (ep type aside)?
    fn matches(&self, hints: &Hints) -> bool {
        if self.caps & hints.caps != hints.caps {
            return false;
        }
        if self.device_features & hints.features != hints.features {
            return false;
        }
        if hints
            .domain_name
            .as_ref()
            .is_some_and(|d| *d != self.domain_name)
        {
            return false;
        }
        if hints
            .min_max_msg_size
            .is_some_and(|m| self.limits.max_msg_size < m)
        {
            return false;
        }
        true
    }
}

/// Parse a `VFABRIC_DEVICES` list: entries separated by `:`, where `pci:` starts a PCI address
/// (which itself contains two colons).
pub fn parse_device_list(list: &str) -> Vec<DeviceLocator> {
    let mut out = Vec::new();
    let mut parts = list.split(':').map(str::trim).peekable();
    while let Some(p) = parts.next() {
        if p.is_empty() {
            continue;
        }
        if p == "pci" {
            // pci:DDDD:BB:DD.F or pci:BB:DD.F
            let mut bdf: Vec<&str> = Vec::new();
            while let Some(next) = parts.peek() {
                bdf.push(next);
                parts.next();
                if bdf.last().is_some_and(|s| s.contains('.')) {
                    break;
                }
            }
            match bdf.join(":").parse::<pci::PciAddress>() {
                Ok(a) => out.push(DeviceLocator::Pci(a)),
                Err(e) => tracing::warn!(error = %e, "{DEVICES_ENV}: entry ignored"),
            }
            continue;
        }
        out.push(DeviceLocator::Socket(PathBuf::from(p)));
    }
    out
}

/// Devices to probe, per the hints / environment / discovery: `*.sock` in the default
/// directory, then the virtio-pci fabric devices of this machine (vendor 0x1af4, device
/// 0x1040 + [`pci::configured_device_id`]).
pub fn device_locators(hints: &Hints) -> Vec<DeviceLocator> {
    if let Some(d) = &hints.devices {
        return d.clone();
    }
    if let Ok(list) = std::env::var(DEVICES_ENV) {
        let v = parse_device_list(&list);
        if !v.is_empty() {
            return v;
        }
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(DEFAULT_SOCKET_DIR)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    let mut out: Vec<DeviceLocator> = v.into_iter().map(DeviceLocator::Socket).collect();
    match pci::discover() {
        Ok(found) => out.extend(found.into_iter().map(DeviceLocator::Pci)),
        Err(e) => tracing::warn!(error = %e, "PCI discovery skipped"),
    }
    out
}

/// `fi_getinfo`: probe every device and return one [`Info`] per match (per endpoint type).
/// `Err(NoData)` if nothing matched; if nothing matched and a device failed to probe, that
/// error is returned instead.
pub fn getinfo(hints: &Hints) -> Result<Vec<Info>> {
    let types: Vec<EpType> = match hints.ep_type {
        Some(EpType::Msg) => return Err(Error::NoData),
        Some(t) => vec![t],
        None => vec![EpType::Rdm, EpType::Dgram],
    };
    let mut out = Vec::new();
    let mut first_err = None;
    for device in device_locators(hints) {
        if hints
            .domain_name
            .as_ref()
            .is_some_and(|d| *d != device.domain_name())
        {
            continue;
        }
        match Info::probe(&device) {
            Ok(info) => {
                if info.matches(hints) {
                    for t in &types {
                        let mut i = info.clone();
                        i.ep_type = *t;
                        out.push(i);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(device = %device, error = %e, "probe failed");
                first_err.get_or_insert(e);
            }
        }
    }
    if out.is_empty() {
        return Err(first_err.unwrap_or(Error::NoData));
    }
    Ok(out)
}
