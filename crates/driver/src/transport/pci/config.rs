// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! PCI side of the pci transport: device addresses, discovery by vendor and device id, and the
//! walk of the virtio capabilities in a function's config space.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

// The device id, its environment variable and the virtio-pci ids are proto's and
// crate::device_id's: one definition for the daemon, the driver and the CLI.
use crate::device_id::{configured_device_id, virtio_pci_device_id, VIRTIO_PCI_VENDOR_ID};
use crate::{Error, Result};

/// Where the kernel lists PCI devices.
pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// A PCI function address (`domain:bus:device.function`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = Error;
    /// `DDDD:BB:DD.F`, or `BB:DD.F` in domain 0 (hexadecimal, as `lspci` prints them).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidArgument(format!("{s:?} is not a PCI address DDDD:BB:DD.F"));
        let parts: Vec<&str> = s.split(':').collect();
        let (domain, bus, rest) = match parts.as_slice() {
            [d, b, r] if d.len() == 4 => (*d, *b, *r),
            [b, r] => ("0000", *b, *r),
            _ => return Err(bad()),
        };
        let (dev, func) = rest.split_once('.').ok_or_else(bad)?;
        let hex = |t: &str, max: u32, width: usize| {
            if t.is_empty() || t.len() > width {
                return None;
            }
            u32::from_str_radix(t, 16).ok().filter(|v| *v <= max)
        };
        Ok(PciAddress {
            domain: hex(domain, 0xffff, 4).ok_or_else(bad)? as u16,
            bus: hex(bus, 0xff, 2).ok_or_else(bad)? as u8,
            device: hex(dev, 0x1f, 2).ok_or_else(bad)? as u8,
            function: hex(func, 7, 1).ok_or_else(bad)? as u8,
        })
    }
}

/// The sysfs directory of a PCI function.
pub(crate) fn sysfs_device_dir(bdf: &PciAddress) -> PathBuf {
    Path::new(SYSFS_PCI_DEVICES).join(bdf.to_string())
}

fn read_hex_file(path: &Path) -> Option<u32> {
    let s = std::fs::read_to_string(path).ok()?;
    let t = s.trim();
    u32::from_str_radix(t.strip_prefix("0x").unwrap_or(t), 16).ok()
}

/// PCI functions under `root` (a `/sys/bus/pci/devices`-shaped directory) that are modern
/// virtio devices with virtio device id `device_id`, sorted.
pub fn discover_in(root: &Path, device_id: u32) -> Vec<PciAddress> {
    // An id virtio-pci cannot carry matches no function.
    let Some(want) = virtio_pci_device_id(device_id).map(u32::from) else {
        return Vec::new();
    };
    let mut found: Vec<PciAddress> = std::fs::read_dir(root)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let bdf: PciAddress = e.file_name().to_str()?.parse().ok()?;
                    let dir = e.path();
                    (read_hex_file(&dir.join("vendor"))? == u32::from(VIRTIO_PCI_VENDOR_ID)
                        && read_hex_file(&dir.join("device"))? == want)
                        .then_some(bdf)
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// Fabric devices of this machine (see [`discover_in`]), with the configured device id.
pub fn discover() -> Result<Vec<PciAddress>> {
    Ok(discover_in(
        Path::new(SYSFS_PCI_DEVICES),
        configured_device_id()?,
    ))
}

const PCI_STATUS: usize = 0x06;
const PCI_STATUS_CAP_LIST: u8 = 0x10;
pub(crate) const PCI_COMMAND: u64 = 0x04;
pub(crate) const PCI_COMMAND_MEMORY: u16 = 0x2;
pub(crate) const PCI_COMMAND_MASTER: u16 = 0x4;
pub(crate) const PCI_COMMAND_INTX_DISABLE: u16 = 0x400;
const PCI_CAPABILITY_LIST: usize = 0x34;
const PCI_CAP_ID_VNDR: u8 = 0x09;
/// Standard config header: capabilities live after it.
const PCI_HEADER_LEN: usize = 0x40;
/// More capabilities than fit in 256 bytes means a loop.
const MAX_CAPS: usize = 48;

pub(crate) const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
pub(crate) const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
pub(crate) const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
pub(crate) const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;

/// Size of `struct virtio_pci_common_cfg` up to and including `queue_device`.
const COMMON_CFG_MIN_LEN: u32 = 0x38;

/// Where one virtio structure is: BAR, offset and length inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapLocation {
    pub bar: u8,
    pub offset: u32,
    pub length: u32,
}

/// The virtio structures of a modern virtio-pci device (the first capability of each type,
/// as the spec tells drivers to use).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioPciCaps {
    pub common: CapLocation,
    pub notify: CapLocation,
    pub notify_off_multiplier: u32,
    pub isr: Option<CapLocation>,
    pub device: CapLocation,
}

/// Walk the capability list of a PCI config space image and find the virtio structures.
/// Nothing in `config` is trusted: every pointer and length is checked, loops end.
pub fn parse_virtio_caps(config: &[u8]) -> Result<VirtioPciCaps> {
    let bad = |why: String| Error::Transport(format!("PCI config space: {why}"));
    if config.len() < PCI_HEADER_LEN + 4 {
        return Err(bad(format!(
            "{} bytes readable: capabilities need more (reading past byte 64 of a sysfs \
             config file needs root)",
            config.len()
        )));
    }
    if config[PCI_STATUS] & PCI_STATUS_CAP_LIST == 0 {
        return Err(bad("no capability list".into()));
    }
    let le32 = |at: usize| {
        u32::from_le_bytes([config[at], config[at + 1], config[at + 2], config[at + 3]])
    };
    let (mut common, mut notify, mut isr, mut device) = (None, None, None, None);
    let mut ptr = usize::from(config[PCI_CAPABILITY_LIST] & 0xfc);
    let mut seen = 0;
    while ptr != 0 {
        seen += 1;
        if seen > MAX_CAPS {
            return Err(bad("capability list loops".into()));
        }
        if ptr < PCI_HEADER_LEN || ptr + 2 > config.len() {
            return Err(bad(format!("capability pointer {ptr:#x} out of range")));
        }
        let id = config[ptr];
        let next = usize::from(config[ptr + 1] & 0xfc);
        if id == PCI_CAP_ID_VNDR && ptr + 16 <= config.len() {
            let cap_len = usize::from(config[ptr + 2]);
            let cfg_type = config[ptr + 3];
            let location = CapLocation {
                bar: config[ptr + 4],
                offset: le32(ptr + 8),
                length: le32(ptr + 12),
            };
            // BARs 0..=5 only; a capability too short for its fields is skipped.
            let usable = cap_len >= 16 && location.bar <= 5;
            match cfg_type {
                VIRTIO_PCI_CAP_COMMON_CFG if usable && common.is_none() => common = Some(location),
                VIRTIO_PCI_CAP_NOTIFY_CFG
                    if usable && cap_len >= 20 && ptr + 20 <= config.len() && notify.is_none() =>
                {
                    notify = Some((location, le32(ptr + 16)))
                }
                VIRTIO_PCI_CAP_ISR_CFG if usable && isr.is_none() => isr = Some(location),
                VIRTIO_PCI_CAP_DEVICE_CFG if usable && device.is_none() => device = Some(location),
                _ => {}
            }
        }
        ptr = next;
    }
    let common = common.ok_or_else(|| bad("no virtio common configuration capability".into()))?;
    if common.length < COMMON_CFG_MIN_LEN {
        return Err(bad(format!(
            "common configuration of {} bytes (needs {COMMON_CFG_MIN_LEN})",
            common.length
        )));
    }
    let (notify, notify_off_multiplier) =
        notify.ok_or_else(|| bad("no virtio notification capability".into()))?;
    let device = device.ok_or_else(|| bad("no virtio device configuration capability".into()))?;
    Ok(VirtioPciCaps {
        common,
        notify,
        notify_off_multiplier,
        isr,
        device,
    })
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    pub(crate) fn vndr_cap(
        cfg: &mut [u8],
        at: usize,
        next: u8,
        cfg_type: u8,
        bar: u8,
        off: u32,
        len: u32,
    ) {
        cfg[at] = PCI_CAP_ID_VNDR;
        cfg[at + 1] = next;
        cfg[at + 2] = if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG {
            20
        } else {
            16
        };
        cfg[at + 3] = cfg_type;
        cfg[at + 4] = bar;
        cfg[at + 8..at + 12].copy_from_slice(&off.to_le_bytes());
        cfg[at + 12..at + 16].copy_from_slice(&len.to_le_bytes());
    }

    pub(crate) fn qemu_like_config() -> Vec<u8> {
        let mut cfg = vec![0u8; 256];
        cfg[0..2].copy_from_slice(&VIRTIO_PCI_VENDOR_ID.to_le_bytes());
        cfg[2..4].copy_from_slice(&0x1066u16.to_le_bytes());
        cfg[PCI_STATUS] = PCI_STATUS_CAP_LIST;
        cfg[PCI_CAPABILITY_LIST] = 0x98;
        // MSI-X (id 0x11) first, as QEMU puts it.
        cfg[0x98] = 0x11;
        cfg[0x99] = 0x84;
        vndr_cap(&mut cfg, 0x84, 0x70, 5, 0, 0, 0); // PCI cfg access: ignored
        vndr_cap(
            &mut cfg,
            0x70,
            0x60,
            VIRTIO_PCI_CAP_NOTIFY_CFG,
            4,
            0x3000,
            0x1000,
        );
        cfg[0x70 + 16..0x70 + 20].copy_from_slice(&4u32.to_le_bytes());
        vndr_cap(
            &mut cfg,
            0x60,
            0x50,
            VIRTIO_PCI_CAP_DEVICE_CFG,
            4,
            0x2000,
            0x1000,
        );
        vndr_cap(
            &mut cfg,
            0x50,
            0x40,
            VIRTIO_PCI_CAP_ISR_CFG,
            4,
            0x1000,
            0x1000,
        );
        vndr_cap(
            &mut cfg,
            0x40,
            0x00,
            VIRTIO_PCI_CAP_COMMON_CFG,
            4,
            0x0000,
            0x1000,
        );
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn capability_walk_finds_the_virtio_structures() {
        let caps = parse_virtio_caps(&qemu_like_config()).unwrap();
        assert_eq!(
            caps.common,
            CapLocation {
                bar: 4,
                offset: 0,
                length: 0x1000
            }
        );
        assert_eq!(caps.isr.unwrap().offset, 0x1000);
        assert_eq!(caps.device.offset, 0x2000);
        assert_eq!(caps.notify.offset, 0x3000);
        assert_eq!(caps.notify_off_multiplier, 4);
    }

    #[test]
    fn capability_walk_rejects_bad_config_spaces() {
        // Only 64 bytes readable (a non-root reader of sysfs `config`).
        let short = &qemu_like_config()[..64];
        assert!(parse_virtio_caps(short)
            .unwrap_err()
            .to_string()
            .contains("root"));
        // No capability list.
        let mut c = qemu_like_config();
        c[PCI_STATUS] = 0;
        assert!(parse_virtio_caps(&c).is_err());
        // A loop: the last capability points back at the first.
        let mut c = qemu_like_config();
        c[0x41] = 0x98;
        c[0x40 + 3] = 0x7f; // and no common cfg is ever found
        assert!(parse_virtio_caps(&c)
            .unwrap_err()
            .to_string()
            .contains("loops"));
        // A pointer into the header or past the end.
        let mut c = qemu_like_config();
        c[PCI_CAPABILITY_LIST] = 0x10;
        assert!(parse_virtio_caps(&c).is_err());
        let mut c = qemu_like_config();
        c[0x99] = 0xfc;
        assert!(parse_virtio_caps(&c).is_err());
        // A BAR number beyond 5 makes the capability unusable: no common cfg.
        let mut c = qemu_like_config();
        c[0x40 + 4] = 6;
        assert!(parse_virtio_caps(&c)
            .unwrap_err()
            .to_string()
            .contains("common"));
        // A common cfg too short for the queue registers.
        let mut c = qemu_like_config();
        c[0x40 + 12..0x40 + 16].copy_from_slice(&0x20u32.to_le_bytes());
        assert!(parse_virtio_caps(&c).is_err());
        // A notify capability without its multiplier is skipped: no notify structure.
        let mut c = qemu_like_config();
        c[0x70 + 2] = 16;
        assert!(parse_virtio_caps(&c)
            .unwrap_err()
            .to_string()
            .contains("notification"));
        // Random bytes never panic.
        let mut x = 0x1234_5678u32;
        for _ in 0..2000 {
            let mut c = qemu_like_config();
            for _ in 0..8 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                c[(x as usize) % 256] = (x >> 8) as u8;
            }
            let _ = parse_virtio_caps(&c);
        }
    }

    #[test]
    fn discovery_matches_vendor_and_device_id() {
        let root = tempfile::tempdir().unwrap();
        let add = |name: &str, vendor: &str, device: &str| {
            let d = root.path().join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("vendor"), vendor).unwrap();
            std::fs::write(d.join("device"), device).unwrap();
        };
        add("0000:00:05.0", "0x1af4\n", "0x1066\n"); // id 38
        add("0000:00:03.0", "0x1af4\n", "0x1066\n");
        add("0000:00:04.0", "0x1af4\n", "0x1078\n"); // id 56
        add("0000:00:06.0", "0x8086\n", "0x1066\n"); // other vendor
        add("not-a-bdf", "0x1af4\n", "0x1066\n");
        let found = discover_in(root.path(), 38);
        let names: Vec<String> = found.iter().map(|a| a.to_string()).collect();
        assert_eq!(names, ["0000:00:03.0", "0000:00:05.0"]);
        assert_eq!(discover_in(root.path(), 56).len(), 1);
        assert!(discover_in(Path::new("/nonexistent"), 56).is_empty());
        // Ids virtio-pci cannot carry match nothing (0x1040 + 0 is no modern device).
        add("0000:00:07.0", "0x1af4\n", "0x1040\n");
        assert!(discover_in(root.path(), 0).is_empty());
        assert!(discover_in(root.path(), 64).is_empty());
    }

    #[test]
    fn pci_addresses_parse() {
        let a: PciAddress = "00:03.0".parse().unwrap();
        assert_eq!(a.to_string(), "0000:00:03.0");
        for bad in [
            "0000:00:03",
            "0000:00:03.",
            "00000:00:03.0",
            "0000:100:03.0",
            "x",
        ] {
            assert!(bad.parse::<PciAddress>().is_err(), "{bad:?}");
        }
    }
}
