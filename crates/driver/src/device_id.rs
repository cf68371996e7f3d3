// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Which virtio device id is the fabric device's.
//!
//! The id is provisional ([`VIRTIO_ID_FABRIC`], 56) and QEMU's generic vhost-user device cannot
//! carry it (QEMU 8.2–11.1 abort on ids missing from their name table), so a guest behind QEMU
//! sees a stand-in ([`VIRTIO_ID_FABRIC_QEMU_STANDIN`], 38). A driver that binds by device id
//! (virtio-pci discovery: vendor 0x1af4, device `0x1040 + id`) takes it from
//! `VFABRIC_DEVICE_ID` ([`DEVICE_ID_ENV`]), never from a hard-coded number; the daemon announces
//! the id it was configured with (`vfabricd --device-id`) as its vendor attribute
//! `virtio_device_id`, read back by [`announced_device_id`].

use crate::proto::caps::vfabricd_key;
pub use crate::proto::{
    virtio_pci_device_id, DEVICE_ID_ENV, MAX_PCI_VIRTIO_ID, VIRTIO_ID_FABRIC,
    VIRTIO_ID_FABRIC_QEMU_STANDIN, VIRTIO_PCI_VENDOR_ID,
};
use crate::proto::{CapEntry, CapValue, VENDOR_ID_VFABRIC};
use crate::{Error, Result};

/// The device id this driver binds to: `VFABRIC_DEVICE_ID` (decimal or 0x-hex, 1..=63), else
/// [`VIRTIO_ID_FABRIC`]. An invalid value is an error naming the variable.
pub fn configured_device_id() -> Result<u32> {
    match std::env::var(DEVICE_ID_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(VIRTIO_ID_FABRIC),
        Err(std::env::VarError::NotUnicode(_)) => Err(Error::InvalidArgument(format!(
            "{DEVICE_ID_ENV} is not valid UTF-8"
        ))),
        Ok(v) => device_id_from(&v),
    }
}

/// Parse `value` as [`DEVICE_ID_ENV`] would be parsed.
pub fn device_id_from(value: &str) -> Result<u32> {
    crate::proto::parse_device_id(value)
        .map_err(|why| Error::InvalidArgument(format!("{DEVICE_ID_ENV}: {why}")))
}

/// The virtio device id a `vfabricd` device announces in QUERY_CAPS (its vendor attribute
/// `virtio_device_id`), if it announces one.
pub fn announced_device_id(vendor_attrs: &[CapEntry]) -> Option<u32> {
    vendor_attrs.iter().find_map(|e| match e.value {
        CapValue::U64(v)
            if e.vendor == VENDOR_ID_VFABRIC && e.key == vfabricd_key::VIRTIO_DEVICE_ID =>
        {
            u32::try_from(v).ok()
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_are_checked_and_named() {
        assert_eq!(device_id_from("38").unwrap(), VIRTIO_ID_FABRIC_QEMU_STANDIN);
        assert_eq!(device_id_from("0x38").unwrap(), VIRTIO_ID_FABRIC);
        for bad in ["0", "64", "fabric", ""] {
            let e = device_id_from(bad).unwrap_err().to_string();
            assert!(e.contains(DEVICE_ID_ENV), "{bad:?}: {e}");
        }
    }

    #[test]
    fn announced_id_is_the_vfabricd_vendor_attribute() {
        let attr = |vendor, key, value| CapEntry {
            vendor,
            key,
            name: "virtio_device_id".into(),
            value,
        };
        let vid = vfabricd_key::VIRTIO_DEVICE_ID;
        assert_eq!(announced_device_id(&[]), None);
        assert_eq!(
            announced_device_id(&[attr(VENDOR_ID_VFABRIC, vid, CapValue::U64(38))]),
            Some(38)
        );
        // Another vendor's key of the same number is not ours.
        assert_eq!(
            announced_device_id(&[attr(0x1234, vid, CapValue::U64(38))]),
            None
        );
    }
}
