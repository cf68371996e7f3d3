// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A modern virtio-pci device inside a guest, driven from userspace (as DPDK's virtio PCI
//! driver does; virtio 1.x §4.1).
//!
//! * The device is found in sysfs (`/sys/bus/pci/devices/<bdf>`): vendor 0x1af4, device
//!   0x1040 + the fabric's virtio device id ([`configured_device_id`]).
//! * Its virtio capabilities are walked in PCI config space (`config`, which only root reads
//!   past byte 64); the common, notify, ISR and device-specific structures are found in BARs
//!   mapped through `resourceN`.
//! * DMA memory: the domain's region is locked, populated memory — 2 MiB huge pages when the
//!   guest has them (`/proc/sys/vm/nr_hugepages`), else 4 KiB pages — and its guest-physical
//!   addresses are read from `/proc/self/pagemap` (needs CAP_SYS_ADMIN). Physical contiguity
//!   across pages is not given: each physically contiguous run becomes a segment of the region
//!   and the allocator never places an object across two segments, so a ring, a slot area or
//!   a buffer is always one physical range (one descriptor). With huge pages every segment is
//!   at least 2 MiB; with 4 KiB pages an object larger than the longest run cannot be placed
//!   and the domain fails to open (or a large buffer fails with `OutOfMemory`).
//! * Kicks: a 16-bit MMIO write of the queue index to the queue's notify address.
//! * Calls: polled, and when the device is bound to `uio_pci_generic` the legacy interrupt
//!   through `/dev/uioN` (the ISR read acknowledges it). MSI-X is left disabled.
//! * The device keeps no memory of ours after a reset, which is how the transport closes.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vfabric_proto::{self as proto, bit, ByteValued, FabricConfig};

use super::{DeviceLocator, Notifier, RingAddrs, Transport, WaitKind};
use crate::memory::SharedMemory;
use crate::{Error, Result};

mod config;
mod dma;

pub use crate::device_id::{
    configured_device_id, DEVICE_ID_ENV, MAX_PCI_VIRTIO_ID, VIRTIO_PCI_VENDOR_ID,
};
pub(crate) use config::sysfs_device_dir;
pub use config::{
    discover, discover_in, parse_virtio_caps, CapLocation, PciAddress, VirtioPciCaps,
    SYSFS_PCI_DEVICES,
};
use config::{PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY};
pub(crate) use dma::dma_region;

// ---- BARs ------------------------------------------------------------------------------

/// One BAR mapped from sysfs `resourceN`.
pub(crate) struct BarMap {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this object for its life and only accessed with volatile
// reads and writes of device registers, which any thread may do.
unsafe impl Send for BarMap {}
// SAFETY: see `Send`.
unsafe impl Sync for BarMap {}

impl BarMap {
    fn map(path: &Path) -> Result<Arc<Self>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::Transport(format!("{}: {e}", path.display())))?;
        let len = file.metadata()?.len() as usize;
        if len == 0 {
            return Err(Error::Transport(format!(
                "{}: empty BAR (not a memory BAR?)",
                path.display()
            )));
        }
        // SAFETY: mapping a sysfs resource (or, in tests, a regular) file of `len` bytes; the
        // result is checked. The mapping outlives the file descriptor.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            return Err(Error::Transport(format!("mmap {}: {e}", path.display())));
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| Error::Transport("mmap".into()))?;
        Ok(Arc::new(Self { base, len }))
    }
}

impl Drop for BarMap {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `map`; every user holds an `Arc` to us.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// A register window inside a mapped BAR; accesses are volatile and bounds-checked.
#[derive(Clone)]
pub(crate) struct Mmio {
    bar: Arc<BarMap>,
    offset: usize,
    len: usize,
}

impl Mmio {
    fn new(bars: &[Option<Arc<BarMap>>; 6], at: &CapLocation, what: &str) -> Result<Self> {
        let bar = bars[usize::from(at.bar)]
            .clone()
            .ok_or_else(|| Error::Transport(format!("{what}: BAR {} not mapped", at.bar)))?;
        let (offset, len) = (at.offset as usize, at.length as usize);
        if offset.checked_add(len).is_none_or(|end| end > bar.len) {
            return Err(Error::Transport(format!(
                "{what}: {offset:#x}+{len:#x} outside BAR {} of {:#x} bytes",
                at.bar, bar.len
            )));
        }
        Ok(Self { bar, offset, len })
    }

    fn ptr<T>(&self, at: usize) -> *mut T {
        assert!(
            at + std::mem::size_of::<T>() <= self.len,
            "register {at:#x} outside a {:#x}-byte window",
            self.len
        );
        // SAFETY: offset + at + size ≤ offset + len ≤ the BAR's length (checked in `new` and
        // above), so the pointer stays inside the mapping.
        unsafe { self.bar.base.as_ptr().add(self.offset + at).cast() }
    }

    fn read8(&self, at: usize) -> u8 {
        // SAFETY: `ptr` checked the bounds; device registers are read volatile.
        unsafe { self.ptr::<u8>(at).read_volatile() }
    }
    fn read16(&self, at: usize) -> u16 {
        // SAFETY: as in `read8`; virtio registers are naturally aligned.
        u16::from_le(unsafe { self.ptr::<u16>(at).read_volatile() })
    }
    fn read32(&self, at: usize) -> u32 {
        // SAFETY: as in `read16`.
        u32::from_le(unsafe { self.ptr::<u32>(at).read_volatile() })
    }
    fn write8(&self, at: usize, v: u8) {
        // SAFETY: as in `read8`.
        unsafe { self.ptr::<u8>(at).write_volatile(v) }
    }
    fn write16(&self, at: usize, v: u16) {
        // SAFETY: as in `read16`.
        unsafe { self.ptr::<u16>(at).write_volatile(v.to_le()) }
    }
    fn write32(&self, at: usize, v: u32) {
        // SAFETY: as in `read16`.
        unsafe { self.ptr::<u32>(at).write_volatile(v.to_le()) }
    }
    /// A 64-bit register as two 32-bit writes, low half first (virtio 1.x §4.1.3.1).
    fn write64(&self, at: usize, v: u64) {
        self.write32(at, v as u32);
        self.write32(at + 4, (v >> 32) as u32);
    }
}

/// `struct virtio_pci_common_cfg` offsets.
mod common {
    pub const DEVICE_FEATURE_SELECT: usize = 0x00;
    pub const DEVICE_FEATURE: usize = 0x04;
    pub const DRIVER_FEATURE_SELECT: usize = 0x08;
    pub const DRIVER_FEATURE: usize = 0x0c;
    pub const MSIX_CONFIG: usize = 0x10;
    pub const NUM_QUEUES: usize = 0x12;
    pub const DEVICE_STATUS: usize = 0x14;
    pub const CONFIG_GENERATION: usize = 0x15;
    pub const QUEUE_SELECT: usize = 0x16;
    pub const QUEUE_SIZE: usize = 0x18;
    pub const QUEUE_MSIX_VECTOR: usize = 0x1a;
    pub const QUEUE_ENABLE: usize = 0x1c;
    pub const QUEUE_NOTIFY_OFF: usize = 0x1e;
    pub const QUEUE_DESC: usize = 0x20;
    pub const QUEUE_DRIVER: usize = 0x28;
    pub const QUEUE_DEVICE: usize = 0x30;
}

/// Device status bits (virtio 1.x §2.1).
mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// No MSI-X vector: interrupts (if any) are the legacy INTx line with the ISR.
const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// The notify address of one queue.
pub(crate) struct NotifyAddr {
    window: Mmio,
    at: usize,
    value: u16,
}

impl NotifyAddr {
    #[inline]
    pub fn notify(&self) {
        self.window.write16(self.at, self.value);
    }
}

/// Feature bits this driver takes from a virtio-pci device: the vhost-user driver's set
/// without the vhost-user protocol bit (QEMU never shows it to a guest).
fn pci_driver_features() -> u64 {
    super::vhost_user::DRIVER_FEATURES & !bit(proto::VHOST_USER_F_PROTOCOL_FEATURES)
}

/// A modern virtio-pci fabric device driven from this process.
pub(crate) struct PciTransport {
    locator: DeviceLocator,
    dir: PathBuf,
    common: Mmio,
    notify: Mmio,
    notify_off_multiplier: u32,
    isr: Option<Mmio>,
    device_cfg: Mmio,
    /// The device's sysfs `config`, held open (and `flock`ed: one driving process per
    /// device) for the transport's life; INTx is re-enabled through its command register.
    config: File,
    /// `/dev/uioN` when the device is bound to `uio_pci_generic` and has an interrupt line.
    /// Held open until after the reset: closing it clears bus mastering, which makes QEMU
    /// drop DRIVER_OK.
    uio: Option<Mutex<File>>,
    uio_fd: Option<RawFd>,
    device_features: u64,
    features: u64,
    num_queues: u16,
    max_queue_size: u16,
    timeout: Duration,
    /// Set once DRIVER_OK was written: the device may use our memory until reset.
    started: bool,
}

impl PciTransport {
    /// Map the device in sysfs directory `dir`, reset it and negotiate features. The queues
    /// are set up afterwards; [`Transport::activate`] sets DRIVER_OK.
    pub fn open(dir: &Path, locator: DeviceLocator, timeout: Duration) -> Result<Self> {
        let cfg_path = dir.join("config");
        let cfg_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cfg_path)
            .map_err(|e| {
                Error::Transport(format!(
                    "{}: {e} (driving a PCI device from userspace needs root)",
                    cfg_path.display()
                ))
            })?;
        lock_device(&cfg_file, &locator, timeout)?;
        let mut config = Vec::with_capacity(256);
        (&cfg_file).take(256).read_to_end(&mut config)?;
        let caps = parse_virtio_caps(&config)?;
        // Open uio before enabling bus mastering: its release clears bus mastering.
        let (uio, uio_fd) = match open_uio(dir) {
            Some(f) => {
                let fd = f.as_raw_fd();
                (Some(Mutex::new(f)), Some(fd))
            }
            None => (None, None),
        };
        // Memory decoding and bus mastering (uio_pci_generic enables the device but not bus
        // mastering; QEMU stops a virtio device without it), INTx on when we take interrupts.
        let mut cmd = [0u8; 2];
        cfg_file.read_exact_at(&mut cmd, PCI_COMMAND)?;
        let mut want = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        if uio.is_some() {
            want &= !PCI_COMMAND_INTX_DISABLE;
        }
        cfg_file.write_all_at(&want.to_le_bytes(), PCI_COMMAND)?;

        let mut bars: [Option<Arc<BarMap>>; 6] = Default::default();
        let used = [
            Some(caps.common),
            Some(caps.notify),
            caps.isr,
            Some(caps.device),
        ];
        for c in used.iter().flatten() {
            let i = usize::from(c.bar);
            if bars[i].is_none() {
                bars[i] = Some(BarMap::map(&dir.join(format!("resource{i}")))?);
            }
        }
        let common = Mmio::new(&bars, &caps.common, "common configuration")?;
        let notify = Mmio::new(&bars, &caps.notify, "notification area")?;
        let isr = caps
            .isr
            .map(|c| Mmio::new(&bars, &c, "ISR status"))
            .transpose()?;
        let device_cfg = Mmio::new(&bars, &caps.device, "device configuration")?;
        let mut t = Self {
            locator,
            dir: dir.to_path_buf(),
            common,
            notify,
            notify_off_multiplier: caps.notify_off_multiplier,
            isr,
            device_cfg,
            config: cfg_file,
            uio,
            uio_fd,
            device_features: 0,
            features: 0,
            num_queues: 0,
            max_queue_size: 0,
            timeout,
            started: false,
        };
        t.negotiate()?;
        Ok(t)
    }

    fn status(&self) -> u8 {
        self.common.read8(common::DEVICE_STATUS)
    }

    fn set_status(&self, bits: u8) {
        let s = self.status();
        self.common.write8(common::DEVICE_STATUS, s | bits);
    }

    /// Write 0 to the status and wait until the device reads back 0: it then no longer uses
    /// any memory we gave it.
    fn reset(&self) -> Result<()> {
        self.common.write8(common::DEVICE_STATUS, 0);
        let deadline = Instant::now() + self.timeout;
        while self.status() != 0 {
            if Instant::now() > deadline {
                return Err(Error::Transport(format!(
                    "device {} did not finish its reset within {:?}",
                    self.locator, self.timeout
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn negotiate(&mut self) -> Result<()> {
        self.reset()?;
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::DRIVER);
        let mut offered = 0u64;
        for half in 0..2u32 {
            self.common.write32(common::DEVICE_FEATURE_SELECT, half);
            offered |= u64::from(self.common.read32(common::DEVICE_FEATURE)) << (32 * half);
        }
        self.device_features = offered;
        if offered & proto::REQUIRED_FEATURES != proto::REQUIRED_FEATURES {
            self.set_status(status::FAILED);
            return Err(Error::Unsupported(format!(
                "device {} lacks required features (offers {offered:#x}, needs {:#x})",
                self.locator,
                proto::REQUIRED_FEATURES
            )));
        }
        let features = offered & pci_driver_features();
        for half in 0..2u32 {
            self.common.write32(common::DRIVER_FEATURE_SELECT, half);
            self.common
                .write32(common::DRIVER_FEATURE, (features >> (32 * half)) as u32);
        }
        self.set_status(status::FEATURES_OK);
        if self.status() & status::FEATURES_OK == 0 {
            self.set_status(status::FAILED);
            return Err(Error::Unsupported(format!(
                "device {} refused features {features:#x}",
                self.locator
            )));
        }
        self.features = features;
        self.common
            .write16(common::MSIX_CONFIG, VIRTIO_MSI_NO_VECTOR);
        self.num_queues = self.common.read16(common::NUM_QUEUES);
        // The smallest queue limit over all queues (QEMU: the same for all, 64 by default).
        let mut max = u16::MAX;
        for q in 0..self.num_queues {
            self.common.write16(common::QUEUE_SELECT, q);
            let n = self.common.read16(common::QUEUE_SIZE);
            if n != 0 {
                max = max.min(n);
            }
        }
        self.max_queue_size = if max == u16::MAX { 0 } else { max };
        tracing::debug!(
            device = %self.locator,
            offered = format_args!("{offered:#x}"),
            features = format_args!("{features:#x}"),
            num_queues = self.num_queues,
            max_queue_size = self.max_queue_size,
            interrupts = self.uio.is_some(),
            "virtio-pci device initialised"
        );
        Ok(())
    }
}

/// Take the device for this process: an exclusive `flock` on its config file, waited for up
/// to `timeout` (another process driving the device would otherwise be reset under its feet).
fn lock_device(config: &File, locator: &DeviceLocator, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        if unsafe { libc::flock(config.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return Err(Error::Transport(format!("device {locator}: flock: {e}")));
        }
        if Instant::now() > deadline {
            return Err(Error::Transport(format!(
                "device {locator} is busy: another process of this machine drives it (one \
                 driving process per device); waited {timeout:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `/dev/uioN` of a device bound to a uio driver that has an interrupt line. (uio_pci_generic
/// masks INTx after each interrupt; the transport unmasks it in the command register.)
fn open_uio(dir: &Path) -> Option<File> {
    let irq = std::fs::read_to_string(dir.join("irq")).ok()?;
    if irq.trim().parse::<u32>().ok()? == 0 {
        tracing::debug!("device has no interrupt line: completions are polled");
        return None;
    }
    let name = std::fs::read_dir(dir.join("uio"))
        .ok()?
        .flatten()
        .find_map(|e| e.file_name().to_str().map(str::to_owned))?;
    let dev = Path::new("/dev").join(&name);
    let f = OpenOptions::new().read(true).write(true).open(&dev).ok()?;
    tracing::debug!(uio = %dev.display(), irq = irq.trim(), "device interrupts through uio");
    Some(f)
}

impl Transport for PciTransport {
    fn locator(&self) -> &DeviceLocator {
        &self.locator
    }

    fn device_features(&self) -> u64 {
        self.device_features
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn max_queues(&self) -> u64 {
        u64::from(self.num_queues)
    }

    fn max_queue_size(&self) -> u16 {
        self.max_queue_size
    }

    fn map_memory(&mut self, len: usize) -> Result<Arc<SharedMemory>> {
        dma_region(len)
    }

    fn get_config(&self) -> Result<FabricConfig> {
        let size = std::mem::size_of::<FabricConfig>();
        if self.device_cfg.len < size {
            return Err(Error::Transport(format!(
                "device {}: configuration space of {} bytes (needs {size})",
                self.locator, self.device_cfg.len
            )));
        }
        // Re-read until the generation is stable (virtio 1.x §4.1.4.3.1).
        for _ in 0..100 {
            let before = self.common.read8(common::CONFIG_GENERATION);
            let mut cfg = FabricConfig::default();
            for (i, b) in cfg.as_mut_slice().iter_mut().enumerate() {
                *b = self.device_cfg.read8(i);
            }
            if self.common.read8(common::CONFIG_GENERATION) == before {
                return Ok(cfg);
            }
        }
        Err(Error::Transport(format!(
            "device {}: configuration keeps changing",
            self.locator
        )))
    }

    fn setup_queue(&self, index: u16, size: u16, rings: RingAddrs) -> Result<Notifier> {
        if index >= self.num_queues {
            return Err(Error::Unsupported(format!(
                "queue {index} beyond the device's {} queues",
                self.num_queues
            )));
        }
        let c = &self.common;
        c.write16(common::QUEUE_SELECT, index);
        let max = c.read16(common::QUEUE_SIZE);
        if max == 0 || size > max || !size.is_power_of_two() {
            return Err(Error::Unsupported(format!(
                "device {}: queue {index} of {size} entries (the device allows {max})",
                self.locator
            )));
        }
        c.write16(common::QUEUE_SIZE, size);
        c.write64(common::QUEUE_DESC, rings.desc);
        c.write64(common::QUEUE_DRIVER, rings.avail);
        c.write64(common::QUEUE_DEVICE, rings.used);
        c.write16(common::QUEUE_MSIX_VECTOR, VIRTIO_MSI_NO_VECTOR);
        let off = usize::from(c.read16(common::QUEUE_NOTIFY_OFF));
        let at = off
            .checked_mul(self.notify_off_multiplier as usize)
            .filter(|a| a.checked_add(2).is_some_and(|end| end <= self.notify.len))
            .ok_or_else(|| {
                Error::Transport(format!(
                    "device {}: notify offset {off} × {} outside the {}-byte notification area",
                    self.locator, self.notify_off_multiplier, self.notify.len
                ))
            })?;
        c.write16(common::QUEUE_ENABLE, 1);
        Ok(Notifier::Mmio(NotifyAddr {
            window: self.notify.clone(),
            at,
            value: index,
        }))
    }

    fn activate(&mut self) -> Result<()> {
        self.set_status(status::DRIVER_OK);
        self.started = true;
        let s = self.status();
        if s & (status::NEEDS_RESET | status::FAILED) != 0 || s & status::DRIVER_OK == 0 {
            return Err(Error::Transport(format!(
                "device {} did not start (status {s:#x})",
                self.locator
            )));
        }
        Ok(())
    }

    fn wait_sources(&self) -> Vec<(RawFd, i16, WaitKind)> {
        self.uio_fd
            .map(|fd| (fd, libc::POLLIN, WaitKind::Interrupt))
            .into_iter()
            .collect()
    }

    fn ack_interrupt(&self) {
        let Some(uio) = &self.uio else { return };
        let mut f = uio.lock().unwrap();
        let mut count = [0u8; 4];
        // Non-blocking: poll said it is readable; another waiter may have taken it already.
        let mut p = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        if unsafe { libc::poll(&mut p, 1, 0) } > 0 {
            let _ = f.read(&mut count);
        }
        // Reading the ISR lowers the interrupt line; then unmask INTx again (the uio handler
        // masked it), as DPDK does for uio_pci_generic.
        if let Some(isr) = &self.isr {
            isr.read8(0);
        }
        let mut cmd = [0u8; 2];
        if self.config.read_exact_at(&mut cmd, PCI_COMMAND).is_ok() {
            let v = u16::from_le_bytes(cmd) & !PCI_COMMAND_INTX_DISABLE;
            let _ = self.config.write_all_at(&v.to_le_bytes(), PCI_COMMAND);
        }
    }

    fn is_alive(&self) -> bool {
        let s = self.status();
        let alive = s & status::NEEDS_RESET == 0 && (!self.started || s & status::DRIVER_OK != 0);
        if !alive {
            tracing::warn!(device = %self.locator, status = format_args!("{s:#x}"), "device status: not running");
        }
        alive
    }
}

impl Drop for PciTransport {
    /// Reset the device: once it reads back 0 it uses none of our memory, which the domain
    /// frees after us.
    fn drop(&mut self) {
        if let Err(e) = self.reset() {
            tracing::warn!(device = %self.locator, dir = %self.dir.display(), error = %e, "reset on close");
        }
        tracing::debug!(device = %self.locator, "virtio-pci device reset");
    }
}

#[cfg(test)]
mod tests {
    use super::config::testutil::*;
    use super::*;

    /// A synthetic modern virtio-pci function: config space with the capability chain QEMU
    /// builds (MSI-X, then common/ISR/device/notify/pci-cfg), and BAR 4 as a file.
    struct FakeDevice {
        dir: tempfile::TempDir,
    }

    const BAR_LEN: usize = 0x4000;

    impl FakeDevice {
        fn new(cfg: &[u8]) -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("config"), cfg).unwrap();
            let mut bar = vec![0u8; BAR_LEN];
            // Common configuration: features VERSION_1 | MSG | TAGGED | EVENT_IDX in both
            // halves (a file cannot switch on the select register), 5 queues of 64.
            let f = bit(proto::VIRTIO_FABRIC_F_MSG)
                | bit(proto::VIRTIO_FABRIC_F_TAGGED)
                | bit(proto::VIRTIO_RING_F_EVENT_IDX);
            let word = (f as u32) | 1; // bit 0 of the high half: VERSION_1
            bar[common::DEVICE_FEATURE..common::DEVICE_FEATURE + 4]
                .copy_from_slice(&word.to_le_bytes());
            bar[common::NUM_QUEUES..common::NUM_QUEUES + 2].copy_from_slice(&5u16.to_le_bytes());
            bar[common::QUEUE_SIZE..common::QUEUE_SIZE + 2].copy_from_slice(&64u16.to_le_bytes());
            bar[common::QUEUE_NOTIFY_OFF..common::QUEUE_NOTIFY_OFF + 2]
                .copy_from_slice(&3u16.to_le_bytes());
            // Device configuration: a FabricConfig.
            let fc = FabricConfig {
                num_queue_pairs: 2u32.into(),
                max_queue_size: 64u32.into(),
                node_addr: 0x5eed_0000_0001u64.into(),
                fabric_id: 0x5eedu32.into(),
                ..Default::default()
            };
            bar[0x2000..0x2000 + 48].copy_from_slice(fc.as_slice());
            std::fs::write(dir.path().join("resource4"), &bar).unwrap();
            Self { dir }
        }
        fn bar(&self) -> Vec<u8> {
            std::fs::read(self.dir.path().join("resource4")).unwrap()
        }
    }

    #[test]
    fn synthetic_device_opens_reads_config_and_notifies() {
        let dev = FakeDevice::new(&qemu_like_config());
        let loc = DeviceLocator::Pci("0000:00:04.0".parse().unwrap());
        let mut t = PciTransport::open(dev.dir.path(), loc, Duration::from_secs(1)).unwrap();
        assert_ne!(t.device_features & bit(proto::VIRTIO_F_VERSION_1), 0);
        assert_ne!(t.features() & bit(proto::VIRTIO_FABRIC_F_TAGGED), 0);
        assert_eq!(t.features() & bit(proto::VHOST_USER_F_PROTOCOL_FEATURES), 0);
        assert_eq!(t.max_queues(), 5);
        assert_eq!(t.max_queue_size(), 64);
        let cfg = t.get_config().unwrap();
        assert_eq!(u32::from(cfg.fabric_id), 0x5eed);
        assert_eq!(u32::from(cfg.num_queue_pairs), 2);
        // Queue 2: addresses land in the common cfg, the kick at 0x3000 + 3 × 4.
        let rings = RingAddrs {
            desc: 0x1_2345_6000,
            avail: 0x1_2345_7000,
            used: 0x1_2345_8000,
        };
        let notifier = t.setup_queue(2, 64, rings).unwrap();
        notifier.notify().unwrap();
        let bar = dev.bar();
        let rd64 = |at: usize| u64::from_le_bytes(bar[at..at + 8].try_into().unwrap());
        assert_eq!(rd64(common::QUEUE_DESC), rings.desc);
        assert_eq!(rd64(common::QUEUE_DRIVER), rings.avail);
        assert_eq!(rd64(common::QUEUE_DEVICE), rings.used);
        assert_eq!(&bar[0x3000 + 12..0x3000 + 14], &2u16.to_le_bytes());
        // Bigger than the device allows, or beyond its queues: refused.
        assert!(t.setup_queue(1, 128, rings).is_err());
        assert!(t.setup_queue(5, 64, rings).is_err());
        t.activate().unwrap();
        assert!(t.is_alive());
        // A device asking for a reset is gone.
        t.common.write8(
            common::DEVICE_STATUS,
            status::DRIVER_OK | status::NEEDS_RESET,
        );
        assert!(!t.is_alive());
    }

    #[test]
    fn one_process_drives_a_device_at_a_time() {
        let dev = FakeDevice::new(&qemu_like_config());
        let loc = DeviceLocator::Pci("0000:00:04.0".parse().unwrap());
        let first =
            PciTransport::open(dev.dir.path(), loc.clone(), Duration::from_secs(1)).unwrap();
        let e = PciTransport::open(dev.dir.path(), loc.clone(), Duration::from_millis(50)).err();
        assert!(e.unwrap().to_string().contains("busy"));
        drop(first);
        PciTransport::open(dev.dir.path(), loc, Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn notify_offsets_outside_the_area_are_refused() {
        let dev = FakeDevice::new(&qemu_like_config());
        let mut bar = dev.bar();
        bar[common::QUEUE_NOTIFY_OFF..common::QUEUE_NOTIFY_OFF + 2]
            .copy_from_slice(&0x400u16.to_le_bytes());
        std::fs::write(dev.dir.path().join("resource4"), &bar).unwrap();
        let loc = DeviceLocator::Pci("0000:00:04.0".parse().unwrap());
        let t = PciTransport::open(dev.dir.path(), loc, Duration::from_secs(1)).unwrap();
        let rings = RingAddrs {
            desc: 0,
            avail: 0,
            used: 0,
        };
        assert!(t.setup_queue(0, 64, rings).is_err());
    }

    #[test]
    fn structures_outside_their_bar_are_refused() {
        let mut c = qemu_like_config();
        // Device cfg at 0x3f00 + 0x1000 runs past the 16 KiB BAR.
        c[0x60 + 8..0x60 + 12].copy_from_slice(&0x3f00u32.to_le_bytes());
        let dev = FakeDevice::new(&c);
        let loc = DeviceLocator::Pci("0000:00:04.0".parse().unwrap());
        let e = PciTransport::open(dev.dir.path(), loc, Duration::from_secs(1)).err();
        assert!(e.unwrap().to_string().contains("outside BAR"));
    }

    #[test]
    fn missing_required_features_fail() {
        let dev = FakeDevice::new(&qemu_like_config());
        let mut bar = dev.bar();
        bar[common::DEVICE_FEATURE..common::DEVICE_FEATURE + 4]
            .copy_from_slice(&0u32.to_le_bytes());
        std::fs::write(dev.dir.path().join("resource4"), &bar).unwrap();
        let loc = DeviceLocator::Pci("0000:00:04.0".parse().unwrap());
        let e = PciTransport::open(dev.dir.path(), loc, Duration::from_secs(1)).err();
        assert!(matches!(e, Some(Error::Unsupported(_))));
    }
}
