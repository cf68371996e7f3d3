// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user frontend: connect to a device socket, negotiate features, share memory, read
//! config space, and hand rings plus eventfds to the device.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vfabric_proto::{self as proto, bit, ByteValued, FabricConfig};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    VHOST_USER_MAX_VRINGS,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DeviceLocator, Notifier, RingAddrs, Transport, WaitKind};
use crate::memory::SharedMemory;
use crate::{Error, Result};

/// Feature bits this driver implements (and therefore acknowledges when offered).
pub(crate) const DRIVER_FEATURES: u64 = bit(proto::VIRTIO_F_VERSION_1)
    | bit(proto::VIRTIO_FABRIC_F_MSG)
    | bit(proto::VIRTIO_FABRIC_F_TAGGED)
    | bit(proto::VIRTIO_FABRIC_F_MQ)
    | bit(proto::VIRTIO_FABRIC_F_VENDOR_CAPS)
    | bit(proto::VIRTIO_FABRIC_F_REMOTE_CQ_DATA)
    | bit(proto::VIRTIO_FABRIC_F_LAZY_RX)
    | bit(proto::VIRTIO_FABRIC_F_RMA)
    | bit(proto::VIRTIO_FABRIC_F_ATOMIC)
    | bit(proto::VIRTIO_FABRIC_F_RMA_PMEM)
    | bit(proto::VIRTIO_RING_F_EVENT_IDX)
    | bit(proto::VHOST_USER_F_PROTOCOL_FEATURES);

/// vhost-user protocol features the driver uses when offered.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// An established vhost-user session with one device.
pub(crate) struct VhostUserTransport {
    frontend: Mutex<Frontend>,
    path: PathBuf,
    locator: DeviceLocator,
    /// The device's error eventfd (one for every queue; polled by sleepers).
    err_fd: EventFd,
    /// The eventfd the device calls, one for every queue: a sleeper polls one fd and reads it
    /// once, whichever queues moved.
    call_fd: EventFd,
    /// Feature bits the device offered.
    pub device_features: u64,
    /// Feature bits negotiated.
    pub features: u64,
    /// Protocol features the device offered / we acknowledged.
    pub device_protocol_features: u64,
    pub protocol_features: u64,
    /// Queues the device supports (GET_QUEUE_NUM with MQ, else unknown = u16::MAX).
    pub max_queues: u64,
    /// Queues started with `setup_queue` (stopped on drop).
    started: Mutex<Vec<usize>>,
    watchdog: Option<Watchdog>,
}

/// Shuts a socket down unless disarmed within a timeout (unblocks a stalled handshake).
struct Watchdog {
    disarm: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<bool>,
}

impl Watchdog {
    fn arm(fd: BorrowedFd<'_>, timeout: Duration) -> Result<Self> {
        let sock = UnixStream::from(fd.try_clone_to_owned()?);
        let (disarm, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("vfabric-connect".into())
            .spawn(move || match rx.recv_timeout(timeout) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = sock.shutdown(std::net::Shutdown::Both);
                    true
                }
                _ => false,
            })?;
        Ok(Self { disarm, thread })
    }

    /// Stop the watchdog; true if it had fired.
    fn disarm(self) -> bool {
        let _ = self.disarm.send(());
        self.thread.join().unwrap_or(true)
    }
}

fn vhost_err(what: &str, e: vhost::Error) -> Error {
    Error::Transport(format!("{what}: {e}"))
}

/// Connect to a device socket, retrying briefly while the listener is not accepting yet.
fn connect_socket(path: &Path) -> Result<UnixStream> {
    let mut retries = 5;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && retries > 0 => {
                retries -= 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(Error::Transport(format!(
                    "connect {}: {e}: no vfabricd listens on it (a stale socket?)",
                    path.display()
                )))
            }
            Err(e) => return Err(Error::Transport(format!("connect {}: {e}", path.display()))),
        }
    }
}

impl VhostUserTransport {
    /// Connect and negotiate; the session is owned (SET_OWNER) when this returns. A watchdog
    /// shuts the socket down if the handshake is not finished (`handshake_done`) within
    /// `timeout`: a device serving another frontend accepts the connection only later, and
    /// that must be reported rather than waited for forever.
    ///
    /// A device that has not accepted the connection (answered its first message) within
    /// `accept_timeout` is reported busy; once it has, the rest of the handshake gets `timeout`.
    /// A free device accepts at once, however slow the frontend, so a short `accept_timeout`
    /// tells busy devices from slow set-ups.
    pub fn connect_within(
        path: &Path,
        accept_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self> {
        let stream = connect_socket(path)?;
        let accept_watchdog = Watchdog::arm(stream.as_fd(), accept_timeout)?;
        let watch_fd = stream.try_clone()?;
        let frontend = Frontend::from_stream(stream, VHOST_USER_MAX_VRINGS);
        // The first reply comes once the device accepted us: while it serves another guest
        // this connection waits in the socket's backlog.
        let device_features = match frontend.get_features() {
            Ok(f) => f,
            Err(e) => {
                return Err(if accept_watchdog.disarm() {
                    Error::Busy {
                        path: path.to_path_buf(),
                        waited: accept_timeout,
                    }
                } else {
                    vhost_err("GET_FEATURES", e)
                })
            }
        };
        if accept_watchdog.disarm() {
            // It fired just as the answer came: the socket is shut down.
            return Err(Error::Busy {
                path: path.to_path_buf(),
                waited: accept_timeout,
            });
        }
        let watchdog = Watchdog::arm(watch_fd.as_fd(), timeout)?;
        drop(watch_fd);
        let result = Self::negotiate(path, frontend, device_features);
        match result {
            Ok(mut t) => {
                t.watchdog = Some(watchdog);
                Ok(t)
            }
            Err(e) if watchdog.disarm() => Err(Error::Transport(format!(
                "{}: vhost-user handshake did not finish within {timeout:?} (device busy \
                 with another frontend?): {e}",
                path.display()
            ))),
            Err(e) => Err(e),
        }
    }

    /// The setup is complete: stop the handshake watchdog. Fails if it already fired.
    pub fn handshake_done(&mut self) -> Result<()> {
        if let Some(w) = self.watchdog.take() {
            if w.disarm() {
                return Err(Error::Transport(format!(
                    "{}: vhost-user setup timed out",
                    self.path.display()
                )));
            }
        }
        Ok(())
    }

    fn negotiate(path: &Path, mut frontend: Frontend, device_features: u64) -> Result<Self> {
        if device_features & proto::REQUIRED_FEATURES != proto::REQUIRED_FEATURES {
            return Err(Error::Unsupported(format!(
                "device {} lacks required features (offers {:#x}, needs {:#x})",
                path.display(),
                device_features,
                proto::REQUIRED_FEATURES
            )));
        }
        if device_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(Error::Unsupported(format!(
                "device {} does not speak vhost-user protocol features (needed for CONFIG)",
                path.display()
            )));
        }
        let features = device_features & DRIVER_FEATURES;
        frontend
            .set_features(features)
            .map_err(|e| vhost_err("SET_FEATURES", e))?;

        let offered = frontend
            .get_protocol_features()
            .map_err(|e| vhost_err("GET_PROTOCOL_FEATURES", e))?;
        if !offered.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(Error::Unsupported(format!(
                "device {} does not offer the CONFIG protocol feature",
                path.display()
            )));
        }
        let acked = offered & wanted_protocol_features();
        frontend
            .set_protocol_features(acked)
            .map_err(|e| vhost_err("SET_PROTOCOL_FEATURES", e))?;
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let max_queues = if acked.contains(VhostUserProtocolFeatures::MQ) {
            frontend
                .get_queue_num()
                .map_err(|e| vhost_err("GET_QUEUE_NUM", e))?
        } else {
            u16::MAX as u64
        };
        frontend
            .set_owner()
            .map_err(|e| vhost_err("SET_OWNER", e))?;
        tracing::debug!(
            path = %path.display(),
            device_features = format_args!("{device_features:#x}"),
            features = format_args!("{features:#x}"),
            protocol = format_args!("{:#x}", acked.bits()),
            max_queues,
            "vhost-user session established"
        );
        Ok(Self {
            frontend: Mutex::new(frontend),
            path: path.to_path_buf(),
            locator: DeviceLocator::Socket(path.to_path_buf()),
            err_fd: EventFd::new(EFD_NONBLOCK)?,
            call_fd: EventFd::new(EFD_NONBLOCK)?,
            device_features,
            features,
            device_protocol_features: offered.bits(),
            protocol_features: acked.bits(),
            max_queues,
            started: Mutex::new(Vec::new()),
            watchdog: None,
        })
    }

    /// The vhost-user socket (polled for hang-up while blocking).
    fn socket_fd(&self) -> RawFd {
        self.frontend.lock().unwrap().as_raw_fd()
    }

    /// Register the region with guest address == our virtual address.
    fn set_mem_table(&self, mem: &SharedMemory) -> Result<()> {
        let file = mem
            .file()
            .ok_or_else(|| Error::Transport("vhost-user needs memfd-backed memory".into()))?;
        // `..Default::default()` covers the extra fields of vhost's `xen` feature.
        #[allow(clippy::needless_update)]
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: mem.guest_base(),
            memory_size: mem.len() as u64,
            userspace_addr: mem.guest_base(),
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
            ..Default::default()
        };
        self.frontend
            .lock()
            .unwrap()
            .set_mem_table(&[region])
            .map_err(|e| vhost_err("SET_MEM_TABLE", e))?;
        Ok(())
    }
}

impl Transport for VhostUserTransport {
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
        self.max_queues
    }

    fn max_queue_size(&self) -> u16 {
        32768
    }

    fn protocol_features(&self) -> (u64, u64) {
        (self.device_protocol_features, self.protocol_features)
    }

    fn map_memory(&mut self, len: usize) -> Result<Arc<SharedMemory>> {
        let mem = SharedMemory::new("vfabric", len)?;
        self.set_mem_table(&mem)?;
        Ok(mem)
    }

    fn reaches_process_memory(&self) -> bool {
        true
    }

    fn activate(&mut self) -> Result<()> {
        self.handshake_done()
    }

    fn wait_sources(&self) -> Vec<(RawFd, i16, WaitKind)> {
        vec![
            (self.call_fd.as_raw_fd(), libc::POLLIN, WaitKind::Call),
            (self.err_fd.as_raw_fd(), libc::POLLIN, WaitKind::RingError),
            (self.socket_fd(), libc::POLLRDHUP, WaitKind::Hangup),
        ]
    }

    fn is_alive(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.socket_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let rc = unsafe { libc::poll(&mut p, 1, 0) };
        !(rc > 0 && p.revents != 0)
    }

    /// ADD_MEM_REG: share one more memfd-backed range with the device (guest address = our
    /// virtual address). Needs the CONFIGURE_MEM_SLOTS protocol feature.
    fn add_external_memory(&self, addr: u64, len: u64, file: &std::fs::File) -> Result<()> {
        if self.protocol_features & VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS.bits() == 0 {
            return Err(Error::Unsupported(format!(
                "device {} does not offer CONFIGURE_MEM_SLOTS (needed to share memory outside \
                 the domain's region)",
                self.path.display()
            )));
        }
        // `..Default::default()` covers the extra fields of vhost's `xen` feature.
        #[allow(clippy::needless_update)]
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: addr,
            memory_size: len,
            userspace_addr: addr,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
            ..Default::default()
        };
        self.frontend
            .lock()
            .unwrap()
            .add_mem_region(&region)
            .map_err(|e| vhost_err("ADD_MEM_REG", e))?;
        Ok(())
    }

    /// Read the device configuration space.
    fn get_config(&self) -> Result<FabricConfig> {
        let size = std::mem::size_of::<FabricConfig>();
        let buf = vec![0u8; size];
        let (_, data) = self
            .frontend
            .lock()
            .unwrap()
            .get_config(0, size as u32, VhostUserConfigFlags::empty(), &buf)
            .map_err(|e| vhost_err("GET_CONFIG", e))?;
        FabricConfig::from_slice(&data)
            .copied()
            .ok_or_else(|| Error::Transport(format!("config space of {} bytes", data.len())))
    }

    /// Hand one ring to the device and enable it.
    fn setup_queue(&self, index: u16, size: u16, rings: RingAddrs) -> Result<Notifier> {
        let index = usize::from(index);
        let kick = EventFd::new(EFD_NONBLOCK)?;
        let err = &self.err_fd;
        if index as u64 >= self.max_queues {
            return Err(Error::Unsupported(format!(
                "queue {index} beyond the device's {} queues",
                self.max_queues
            )));
        }
        let mut fe = self.frontend.lock().unwrap();
        let q = |what: &str, e| vhost_err(&format!("{what}({index})"), e);
        fe.set_vring_num(index, size)
            .map_err(|e| q("SET_VRING_NUM", e))?;
        fe.set_vring_addr(
            index,
            &VringConfigData {
                queue_max_size: size,
                queue_size: size,
                flags: 0,
                desc_table_addr: rings.desc,
                used_ring_addr: rings.used,
                avail_ring_addr: rings.avail,
                log_addr: None,
            },
        )
        .map_err(|e| q("SET_VRING_ADDR", e))?;
        fe.set_vring_base(index, 0)
            .map_err(|e| q("SET_VRING_BASE", e))?;
        fe.set_vring_call(index, &self.call_fd)
            .map_err(|e| q("SET_VRING_CALL", e))?;
        fe.set_vring_kick(index, &kick)
            .map_err(|e| q("SET_VRING_KICK", e))?;
        fe.set_vring_err(index, err)
            .map_err(|e| q("SET_VRING_ERR", e))?;
        fe.set_vring_enable(index, true)
            .map_err(|e| q("SET_VRING_ENABLE", e))?;
        self.started.lock().unwrap().push(index);
        Ok(Notifier::EventFd(kick))
    }
}

impl Drop for VhostUserTransport {
    /// Stop every ring (GET_VRING_BASE) before the socket closes, so the device stops touching
    /// our memory in an orderly way and is free for the next frontend.
    fn drop(&mut self) {
        let fe = self.frontend.lock().unwrap();
        let raw = fe.as_raw_fd();
        // SAFETY: `raw` is the frontend's socket, open for the duration of this function.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        let watchdog = Watchdog::arm(fd, TEARDOWN_TIMEOUT).ok();
        for &index in self.started.lock().unwrap().iter() {
            if let Err(e) = fe.get_vring_base(index) {
                tracing::debug!(index, error = %e, "GET_VRING_BASE on close");
                break;
            }
        }
        if watchdog.is_some_and(|w| w.disarm()) {
            tracing::warn!(path = %self.path.display(), "device did not stop its rings in time");
        }
        tracing::debug!(path = %self.path.display(), "vhost-user session closed");
    }
}

/// Bound on the orderly ring stop when a domain closes.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(2);
