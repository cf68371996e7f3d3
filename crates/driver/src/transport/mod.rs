// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! How the driver reaches a device: the [`Transport`] trait and its two implementations.
//!
//! * [`vhost_user`]: a vhost-user frontend in a host process (as DPDK's virtio-user): one
//!   memfd shared with `vfabricd`, device address == process address, kicks and calls through
//!   eventfds.
//! * [`pci`]: a modern virtio-pci device inside a guest, driven from userspace (as DPDK's
//!   virtio PCI driver): BARs mapped through sysfs, DMA memory in locked (huge) pages whose
//!   guest-physical addresses come from `/proc/self/pagemap`, kicks by MMIO writes, calls by
//!   polling or the uio interrupt.
//!
//! Everything above (rings, request slots, endpoints) is written once against this trait and
//! against [`SharedMemory::device_addr`], the one process-to-device address hook.

use std::fmt;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use vfabric_proto::FabricConfig;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::SharedMemory;
use crate::{Error, Result};

pub mod pci;
pub(crate) mod vhost_user;

pub use pci::PciAddress;

/// Where a device is: the public, transport-neutral name of a device.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceLocator {
    /// A `vfabricd` vhost-user socket (the driver is a vhost-user frontend in this process).
    Socket(PathBuf),
    /// A virtio-pci device of this (guest) machine, driven from userspace.
    Pci(PciAddress),
}

impl DeviceLocator {
    /// The domain name `getinfo` reports: a socket's file stem, `pci-<bdf>` for a PCI device.
    pub fn domain_name(&self) -> String {
        match self {
            DeviceLocator::Socket(path) => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string()),
            DeviceLocator::Pci(bdf) => format!("pci-{bdf}"),
        }
    }

    /// The socket path, for a vhost-user device.
    pub fn socket_path(&self) -> Option<&Path> {
        match self {
            DeviceLocator::Socket(p) => Some(p),
            DeviceLocator::Pci(_) => None,
        }
    }
}

/// `pci:DDDD:BB:DD.F` (or a bare `DDDD:BB:DD.F`) for a PCI device, a socket path otherwise.
impl fmt::Display for DeviceLocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceLocator::Socket(p) => write!(f, "{}", p.display()),
            DeviceLocator::Pci(bdf) => write!(f, "pci:{bdf}"),
        }
    }
}

impl FromStr for DeviceLocator {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(bdf) = s.strip_prefix("pci:") {
            return Ok(DeviceLocator::Pci(bdf.parse()?));
        }
        if let Ok(bdf) = s.parse::<PciAddress>() {
            return Ok(DeviceLocator::Pci(bdf));
        }
        Ok(DeviceLocator::Socket(PathBuf::from(s)))
    }
}

impl From<&str> for DeviceLocator {
    /// Never fails: a string that is not a PCI address is a socket path.
    fn from(s: &str) -> Self {
        s.parse()
            .unwrap_or_else(|_| DeviceLocator::Socket(PathBuf::from(s)))
    }
}
impl From<String> for DeviceLocator {
    fn from(s: String) -> Self {
        DeviceLocator::from(s.as_str())
    }
}
impl From<&String> for DeviceLocator {
    fn from(s: &String) -> Self {
        DeviceLocator::from(s.as_str())
    }
}
impl From<PathBuf> for DeviceLocator {
    fn from(p: PathBuf) -> Self {
        DeviceLocator::Socket(p)
    }
}
impl From<&PathBuf> for DeviceLocator {
    fn from(p: &PathBuf) -> Self {
        DeviceLocator::Socket(p.clone())
    }
}
impl From<&Path> for DeviceLocator {
    fn from(p: &Path) -> Self {
        DeviceLocator::Socket(p.to_path_buf())
    }
}
impl From<PciAddress> for DeviceLocator {
    fn from(a: PciAddress) -> Self {
        DeviceLocator::Pci(a)
    }
}
impl From<&DeviceLocator> for DeviceLocator {
    fn from(l: &DeviceLocator) -> Self {
        l.clone()
    }
}

/// How the driver tells the device that a queue has new buffers.
pub(crate) enum Notifier {
    /// Not set up yet (a queue is built before the transport starts it).
    Unset,
    /// vhost-user: write 1 to the kick eventfd.
    EventFd(EventFd),
    /// virtio-pci: write the queue index (le16) to the queue's notify address in a BAR.
    Mmio(pci::NotifyAddr),
}

impl Notifier {
    #[inline]
    pub fn notify(&self) -> std::io::Result<()> {
        match self {
            Notifier::Unset => Ok(()),
            Notifier::EventFd(e) => {
                crate::virtqueue::signal_eventfd(std::os::fd::AsRawFd::as_raw_fd(e))
            }
            Notifier::Mmio(n) => {
                n.notify();
                Ok(())
            }
        }
    }
}

/// Device addresses of one split ring's parts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// What a file descriptor a sleeping thread waits on means when it fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WaitKind {
    /// The device used a ring (vhost-user: the call eventfd every queue of the session
    /// shares).
    Call,
    /// The device signalled a ring error (vhost-user error eventfd).
    RingError,
    /// The connection to the device ended (vhost-user socket hang-up).
    Hangup,
    /// A device interrupt (uio); acknowledge with [`Transport::ack_interrupt`].
    Interrupt,
}

/// One connection to one device: everything the domain needs that differs by transport.
pub(crate) trait Transport: Send + Sync {
    /// The device this transport drives.
    fn locator(&self) -> &DeviceLocator;
    /// Feature bits the device offered.
    fn device_features(&self) -> u64;
    /// Feature bits negotiated.
    fn features(&self) -> u64;
    /// Queues the device supports.
    fn max_queues(&self) -> u64;
    /// Largest ring the transport can give a queue.
    fn max_queue_size(&self) -> u16;
    /// vhost-user protocol features (offered, acknowledged); (0, 0) for other transports.
    fn protocol_features(&self) -> (u64, u64) {
        (0, 0)
    }
    /// Create the domain's region of `len` bytes and make it reachable by the device; its
    /// segments give the device address of every byte.
    fn map_memory(&mut self, len: usize) -> Result<Arc<SharedMemory>>;
    /// Share process memory outside the region (`Domain::share_raw`): pages moved onto a
    /// memfd at `addr`. Only vhost-user can.
    fn add_external_memory(&self, addr: u64, len: u64, file: &std::fs::File) -> Result<()> {
        let _ = (addr, len, file);
        Err(Error::Unsupported(format!(
            "device {}: sharing memory outside the domain's region needs the vhost-user \
             transport (the data goes through bounce buffers instead)",
            self.locator()
        )))
    }
    /// Whether the device can reach this process's memory by itself (cross-memory attach
    /// for memory registered as process memory). Only a vhost-user device in the same host.
    fn reaches_process_memory(&self) -> bool {
        false
    }
    /// Read the device configuration space.
    fn get_config(&self) -> Result<FabricConfig>;
    /// Give ring `index` of `size` entries to the device and enable it.
    fn setup_queue(&self, index: u16, size: u16, rings: RingAddrs) -> Result<Notifier>;
    /// Every queue is set up: the device may start (DRIVER_OK; vhost-user: the connect
    /// watchdog stops). Fails if the device refused or went away meanwhile.
    fn activate(&mut self) -> Result<()>;
    /// File descriptors a sleeping thread waits on (the device's calls, errors, hang-up).
    /// Empty: the transport has no way to wake a sleeper, which then polls.
    fn wait_sources(&self) -> Vec<(RawFd, i16, WaitKind)>;
    /// Acknowledge a [`WaitKind::Interrupt`] so the next one can arrive.
    fn ack_interrupt(&self) {}
    /// Cheap check that the device is still there (vhost-user: the socket did not hang up;
    /// PCI: the device did not ask for a reset).
    fn is_alive(&self) -> bool;
}

/// Open the transport of `locator`; `timeout` bounds the handshake. A vhost-user device that
/// has not accepted the connection within `accept_timeout` is reported busy (it serves another
/// frontend); a PCI device is held by one process at a time and answers at once.
pub(crate) fn open(
    locator: &DeviceLocator,
    accept_timeout: std::time::Duration,
    timeout: std::time::Duration,
) -> Result<Box<dyn Transport>> {
    match locator {
        DeviceLocator::Socket(path) => Ok(Box::new(
            vhost_user::VhostUserTransport::connect_within(path, accept_timeout, timeout)?,
        )),
        DeviceLocator::Pci(bdf) => Ok(Box::new(pci::PciTransport::open(
            &pci::sysfs_device_dir(bdf),
            locator.clone(),
            timeout,
        )?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locators_parse_and_print() {
        let l: DeviceLocator = "pci:0000:00:03.0".parse().unwrap();
        assert!(matches!(l, DeviceLocator::Pci(_)));
        assert_eq!(l.to_string(), "pci:0000:00:03.0");
        assert_eq!(l.domain_name(), "pci-0000:00:03.0");
        assert_eq!(
            DeviceLocator::from("0000:01:1f.7").to_string(),
            "pci:0000:01:1f.7"
        );
        let s = DeviceLocator::from("/run/vfabric/vfabric0.sock");
        assert_eq!(
            s.socket_path(),
            Some(Path::new("/run/vfabric/vfabric0.sock"))
        );
        assert_eq!(s.domain_name(), "vfabric0");
        assert_eq!(s.to_string(), "/run/vfabric/vfabric0.sock");
        // A malformed PCI address after the prefix is an error, not a socket path.
        assert!("pci:0000:00:03".parse::<DeviceLocator>().is_err());
        assert!("pci:zz00:00:03.0".parse::<DeviceLocator>().is_err());
        assert!("pci:0000:00:20.0".parse::<DeviceLocator>().is_err());
        assert!("pci:0000:00:03.8".parse::<DeviceLocator>().is_err());
    }
}
