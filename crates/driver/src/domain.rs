// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fabric and Domain: a domain is one transport session with one device (vhost-user or
//! virtio-pci), its shared memory, its virtqueues, and the progress engine that moves
//! completions from used rings to CQs.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vfabric_proto::{self as proto, FabricAddr, FabricConfig};
use vmm_sys_util::eventfd::EventFd;

use crate::av::AddressVector;
use crate::control::CtrlResult;
use crate::cq::{CompletionQueue, CqAttr};
use crate::endpoint::{Endpoint, EpAttr};
use crate::info::Info;
use crate::memory::{default_mem_bytes, SharedBuf, SharedMemory};
use crate::request::Queue;
use crate::transport::{DeviceLocator, Transport, WaitKind};
use crate::virtqueue::{DomainSignals, Virtqueue};
use crate::{Error, Result};

/// Default ring size of the data queues (capped by the device's `max_queue_size`).
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Ring size of the control queue.
const CONTROL_QUEUE_SIZE: u16 = 64;
/// Region size used by `getinfo` probes.
const PROBE_MEM_BYTES: usize = 1 << 20;

/// Domain parameters.
#[derive(Clone, Debug)]
pub struct DomainAttr {
    /// Size of the shared region (default: `VFABRIC_MEM_MB` or 64 MiB).
    pub mem_bytes: usize,
    /// Ring size of each data virtqueue (rounded down to a power of two, capped by the device).
    pub queue_size: u16,
    /// Queue pairs to use (default: all the device offers).
    pub queue_pairs: Option<u16>,
    /// Timeout of control-queue requests and of each vhost-user reply while connecting.
    pub control_timeout: Duration,
    /// How long a device may leave the connection unaccepted (it serves another guest) before
    /// it is reported `Error::Busy` (default: `control_timeout`).
    pub accept_timeout: Option<Duration>,
}

impl Default for DomainAttr {
    fn default() -> Self {
        Self {
            mem_bytes: default_mem_bytes(),
            queue_size: DEFAULT_QUEUE_SIZE,
            queue_pairs: None,
            control_timeout: Duration::from_secs(10),
            accept_timeout: None,
        }
    }
}

/// The fabric: all vfabric devices reachable from this host (they share one local fabric).
#[derive(Clone, Debug)]
pub struct Fabric {
    name: String,
}

impl Fabric {
    /// `fi_fabric`: open the fabric an [`Info`] belongs to.
    pub fn open(info: &Info) -> Result<Fabric> {
        if info.fabric_name != crate::info::FABRIC_NAME {
            return Err(Error::InvalidArgument(format!(
                "unknown fabric {:?}",
                info.fabric_name
            )));
        }
        Ok(Fabric {
            name: info.fabric_name.clone(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `fi_domain`: connect to the device of `info` with default attributes.
    pub fn domain(&self, info: &Info) -> Result<Domain> {
        self.domain_with_attr(info, DomainAttr::default())
    }

    pub fn domain_with_attr(&self, info: &Info, attr: DomainAttr) -> Result<Domain> {
        Domain::open(&info.device, attr)
    }
}

/// A connection to one device. Cheap to clone (`Arc`); the device session closes when the
/// last handle and every object opened from it are dropped.
#[derive(Clone)]
pub struct Domain {
    pub(crate) inner: Arc<DomainInner>,
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain")
            .field("device", self.inner.transport.locator())
            .field("queue_pairs", &self.inner.num_queue_pairs)
            .finish()
    }
}

impl Domain {
    /// Connect to a device: a `vfabricd` socket path, or a virtio-pci device of this guest
    /// (`"pci:0000:00:04.0"`, a [`DeviceLocator`]).
    pub fn open(device: impl Into<DeviceLocator>, attr: DomainAttr) -> Result<Domain> {
        let inner = DomainInner::connect(&device.into(), &attr, false)?;
        Ok(Domain { inner })
    }

    /// The device this domain drives.
    pub fn device(&self) -> &DeviceLocator {
        self.inner.transport.locator()
    }

    /// Device description (config space + QUERY_CAPS) read when the domain opened.
    pub fn info(&self) -> &Info {
        self.inner.info()
    }

    /// Feature bits negotiated with the device.
    pub fn negotiated_features(&self) -> u64 {
        self.inner.features
    }

    pub fn num_queue_pairs(&self) -> u16 {
        self.inner.num_queue_pairs
    }

    /// Ring size of the data virtqueues.
    pub fn queue_size(&self) -> u16 {
        self.inner.queues.get(1).map_or(0, |q| q.size())
    }

    /// vhost-user protocol features: (offered by the device, acknowledged); (0, 0) over
    /// virtio-pci.
    pub fn vhost_protocol_features(&self) -> (u64, u64) {
        self.inner.transport.protocol_features()
    }

    /// Counters of the domain (requests, kicks, sleeps, calls).
    pub fn stats(&self) -> DomainStats {
        let mut st = DomainStats {
            sleeps: self.inner.sleeps.load(Ordering::Relaxed),
            calls: self.inner.calls.load(Ordering::Relaxed),
            ..Default::default()
        };
        for q in &self.inner.queues {
            let c = q.counters();
            st.posted += c.posted;
            st.completed += c.completed;
            st.kicks += c.kicks;
        }
        st
    }

    /// The device's vendor-specific attributes, read afresh (QUERY_CAPS entries whose vendor is
    /// not 0; values such as statistics are current). Needs VIRTIO_FABRIC_F_VENDOR_CAPS.
    pub fn vendor_attrs(&self) -> Result<Vec<proto::CapEntry>> {
        if self.inner.features & proto::bit(proto::VIRTIO_FABRIC_F_VENDOR_CAPS) == 0 {
            return Err(Error::Unsupported(
                "the device does not offer vendor attributes (VENDOR_CAPS)".into(),
            ));
        }
        Ok(self
            .inner
            .query_caps()?
            .into_iter()
            .filter(|e| e.vendor != 0)
            .collect())
    }

    /// The counters `vfabricd` keeps for this device (its vendor attributes
    /// `vfabricd_key::STAT_*`); `Unsupported` from a device that does not report them.
    pub fn device_counters(&self) -> Result<DeviceCounters> {
        use proto::caps::vfabricd_key as k;
        let attrs = self.vendor_attrs()?;
        let get = |key: u16| {
            attrs.iter().find_map(|e| match e.value {
                proto::CapValue::U64(v) if e.vendor == proto::VENDOR_ID_VFABRIC && e.key == key => {
                    Some(v)
                }
                _ => None,
            })
        };
        let missing = || Error::Unsupported("the device reports no vfabricd statistics".into());
        Ok(DeviceCounters {
            messages_sent: get(k::STAT_MESSAGES_SENT).ok_or_else(missing)?,
            messages_received: get(k::STAT_MESSAGES_RECEIVED).ok_or_else(missing)?,
            bytes_copied: get(k::STAT_BYTES_COPIED).ok_or_else(missing)?,
            disconnects: get(k::STAT_DISCONNECTS).ok_or_else(missing)?,
            bad_chains: get(k::STAT_BAD_CHAINS).ok_or_else(missing)?,
            ring_errors: get(k::STAT_RING_ERRORS).ok_or_else(missing)?,
            dgram_drops: get(k::STAT_DGRAM_DROPS).ok_or_else(missing)?,
            error_completions: get(k::STAT_ERROR_COMPLETIONS).ok_or_else(missing)?,
            persisted_ranges: get(k::STAT_PERSISTED_RANGES).ok_or_else(missing)?,
            persisted_bytes: get(k::STAT_PERSISTED_BYTES).ok_or_else(missing)?,
        })
    }

    /// Descriptor chains currently in flight on all virtqueues.
    pub fn requests_in_flight(&self) -> usize {
        self.inner.queues.iter().map(|q| q.in_flight()).sum()
    }

    /// Allocate a zero-copy buffer inside the shared region.
    pub fn alloc_buffer(&self, len: usize) -> Result<SharedBuf> {
        SharedBuf::new(&self.inner.mem, len)
    }

    /// Share the application memory `[ptr, ptr+len)` with the device so that sends from it
    /// and receives into it need no bounce buffer (the provider does this for local
    /// registrations of large buffers under FI_MR_LOCAL). The range is widened to whole pages,
    /// which are moved in place onto a sealed memfd and added to the device with vhost-user
    /// ADD_MEM_REG (guest address = user address; the device must offer CONFIGURE_MEM_SLOTS
    /// and has a limited number of slots, 509 with vhost-user-backend).
    ///
    /// The move loses no write of any thread: while the pages move, other threads touching
    /// them wait (userfaultfd; see `external`), so this needs userfaultfd with kernel-mode
    /// faults (CAP_SYS_PTRACE or `vm.unprivileged_userfaultfd = 1`), else it fails with
    /// `Unsupported` and the memory keeps working through bounce buffers.
    ///
    /// Caveats (page granularity):
    /// * Whole pages are shared with the device from then on, including other data on the
    ///   first and last page (neighbouring heap objects, allocator metadata), also after the
    ///   domain is gone; they stay memfd-backed for the life of the mapping. Remote access
    ///   never needs this: [`Domain::register_external`] exposes exactly the registered bytes.
    /// * Only ordinary private anonymous memory (heap, anonymous `mmap`) can be moved;
    ///   file-backed or shared mappings, read-only or partly unmapped ranges are refused
    ///   (checked against `/proc/self/maps`).
    /// * After `fork()` parent and child share these pages (no copy-on-write), including any
    ///   allocator metadata on them.
    /// * If the application unmaps the pages (e.g. `free` of a large allocation), the device
    ///   keeps its mapping of the old memfd: call [`Domain::unshare_raw`] first (the provider
    ///   does when the registration goes or its memory monitor reports the unmap), or a new
    ///   mapping at that address is served from the old pages. After that, a new mapping there
    ///   cannot be shared with this session (refused; it works through bounce buffers).
    pub fn share_raw(&self, ptr: *const u8, len: usize) -> Result<()> {
        self.inner.share_external(ptr as usize, len)
    }

    /// Stop using the pages of `[ptr, ptr+len)` for zero-copy: every range added by
    /// [`Domain::share_raw`] that overlaps them goes back to bounce buffers (the provider calls
    /// this when the last registration of the memory goes, or the memory is unmapped, so that
    /// a new mapping at the same address is never served from the device's view of the old
    /// pages). The device keeps its mapping (vhost-user REM_MEM_REG would make vfabricd reset
    /// the guest); sharing the same, still mapped pages again takes them back without a new
    /// ADD_MEM_REG, while a new mapping there stays bounced. Returns how many ranges were
    /// taken back.
    pub fn unshare_raw(&self, ptr: *const u8, len: usize) -> usize {
        let Ok((start, plen)) = crate::external::page_range(ptr as usize, len) else {
            return 0;
        };
        let mut ext = self.inner.external.lock().unwrap();
        let mut retired = self.inner.retired.lock().unwrap();
        let before = ext.len();
        ext.retain(|r| {
            let hit = r.start < start + plen && start < r.start + r.len;
            if hit {
                retired.push(r.clone());
            }
            !hit
        });
        before - ext.len()
    }

    /// Page ranges outside the shared region added to the device by [`Domain::share_raw`]:
    /// (address, length).
    pub fn external_regions(&self) -> Vec<(usize, usize)> {
        self.inner
            .external
            .lock()
            .unwrap()
            .iter()
            .map(|r| (r.start, r.len))
            .collect()
    }

    /// Is `ptr..ptr+len` inside the shared region (zero-copy eligible)?
    pub fn contains(&self, ptr: *const u8, len: usize) -> bool {
        self.inner.mem.contains(ptr, len)
    }

    pub fn cq_open(&self, attr: CqAttr) -> Result<CompletionQueue> {
        CompletionQueue::new(self.inner.clone(), attr)
    }

    pub fn av_open(&self) -> Result<AddressVector> {
        Ok(AddressVector::new(self.inner.clone()))
    }

    /// Open an endpoint on the device (EP_OPEN). It has its address at once; bind CQs and an
    /// AV, then `enable` it.
    pub fn endpoint(&self, attr: EpAttr) -> Result<Endpoint> {
        Endpoint::open(self.inner.clone(), attr)
    }

    /// Poll every used ring of the domain and deliver completions to their CQs. Returns how
    /// many requests completed.
    pub fn progress(&self) -> Result<usize> {
        self.inner.progress()
    }

    /// Install (`Some`) or remove (`None`) the target commit handler (spec §6.17.3; the
    /// `fi_eq_event_handler` of ofiwg/libfabric#5874). Persistent regions registered
    /// ([`Domain::register_pmem`]) while a handler is installed are *handled*: a commit or
    /// save at COMMIT_COMPLETE to one of them is persisted by the device and then waits for
    /// the handler, which runs from this domain's progress (CQ and counter reads, waits, or
    /// [`Domain::progress`]) on the thread that drives it, one event at a time. Its value
    /// decides the initiator's completion: 0 success, anything else an error completion with
    /// status [`crate::Status::CommitRefused`] and the value in `data`. A target that does not
    /// progress within the device's commit timeout (`vfabricd --commit-timeout-ms`) makes
    /// the initiator's commit complete [`crate::Status::TimedOut`]. Regions registered before the
    /// handler was installed are not handled; events of handled regions that arrive while
    /// no handler is installed are accepted.
    pub fn set_commit_handler(&self, handler: Option<crate::commit::CommitHandler>) {
        self.inner.commit.set_handler(handler);
    }

    /// Install (or with `None` remove) the application's copy functions for device memory
    /// (`fi_set_ops(FI_SET_OPS_HMEM_OVERRIDE)` in libfabric; see [`crate::hmem`]). Regions
    /// registered before keep the functions they were registered with.
    pub fn set_hmem_copy(&self, ops: Option<Arc<dyn crate::hmem::HmemCopy>>) {
        *self
            .inner
            .hmem_copy
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = ops;
    }

    /// Whether copy functions for device memory are installed.
    pub fn has_hmem_copy(&self) -> bool {
        self.inner
            .hmem_copy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Register `len` bytes of device memory at `addr` of `iface`/`device`
    /// (`fi_mr_regattr` with `iface != FI_HMEM_SYSTEM`) for local use in operations
    /// ([`crate::Iov::hmem`]). The driver never dereferences `addr`: every byte goes through
    /// the [`HmemCopy`](crate::HmemCopy) installed with [`Domain::set_hmem_copy`], and without
    /// one this fails with `Error::Unsupported` (the driver has no device runtime).
    /// `HmemIface::System` is refused (`InvalidArgument`: host memory is registered with
    /// [`Domain::register`]).
    pub fn register_hmem(
        &self,
        addr: *mut u8,
        len: usize,
        iface: crate::hmem::HmemIface,
        device: u64,
    ) -> Result<crate::hmem::HmemRegion> {
        self.inner.check_usable()?;
        let ops = self
            .inner
            .hmem_copy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "device memory ({iface:?}) without copy functions: install an HmemCopy \
                     with Domain::set_hmem_copy first"
                ))
            })?;
        crate::hmem::HmemRegion::new(ops, iface, device, addr as usize, len)
    }

    /// Send a COMMIT_REPLY for event `id` directly and return the device's status: `Ok` if
    /// the event was waiting for this domain's verdict, `Invalid` otherwise (unknown, already
    /// answered, expired, or another device's). For tests of the device's checks; an
    /// application answers through its handler.
    #[doc(hidden)]
    pub fn commit_reply_raw(&self, id: u64, value: i64) -> Result<crate::Status> {
        self.inner.commit_reply_sync(id, value)
    }

    /// SVC_RESOLVE: the endpoint bound to `service` on the host that node address `host`
    /// names (`Ok(None)`: no endpoint is bound to it; `Err(Device(Unsupported))`: the device
    /// does not resolve that host's services).
    pub fn resolve_service(&self, host: u64, service: u16) -> Result<Option<FabricAddr>> {
        self.inner.svc_resolve(host, service)
    }

    /// ADDR_CHECK: is `addr` an open endpoint on the fabric?
    pub fn addr_check(&self, addr: &FabricAddr) -> Result<bool> {
        self.inner.addr_check(addr)
    }

    /// `fi_mr_reg` of a whole shared buffer with virtual addressing: `access` is libfabric
    /// access flags (`fi::SEND`, `RECV`, `READ`, `WRITE`, `REMOTE_READ`, `REMOTE_WRITE`);
    /// `key_request` `None` lets the device choose the key (FI_MR_PROV_KEY), `Some(k)` asks for
    /// `k` (`Err(Device(KeyInUse))` if taken). The region is deregistered when dropped.
    pub fn register(
        &self,
        buf: &SharedBuf,
        access: u64,
        key_request: Option<u64>,
    ) -> Result<crate::rma::MemoryRegion> {
        let attr = crate::rma::MrAttr {
            access,
            requested_key: key_request,
            ..Default::default()
        };
        self.register_with(buf, 0..buf.len(), &attr)
    }

    /// `fi_mr_regattr` of a range of a shared buffer.
    pub fn register_with(
        &self,
        buf: &SharedBuf,
        range: std::ops::Range<usize>,
        attr: &crate::rma::MrAttr,
    ) -> Result<crate::rma::MemoryRegion> {
        let (ptr, len) = crate::rma::buf_range(buf, &range)?;
        self.inner
            .register(&[(ptr, len)], attr, Some(buf.keepalive()))
    }

    /// `fi_mr_reg` of caller memory. Memory inside the domain's shared region is registered
    /// as is; any other range is registered as process memory, as
    /// [`Domain::register_external`] describes.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid while the region is registered.
    pub unsafe fn register_raw(
        &self,
        ptr: *const u8,
        len: usize,
        attr: &crate::rma::MrAttr,
    ) -> Result<crate::rma::MemoryRegion> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.register_raw_iov(&[(ptr, len)], attr) }
    }

    /// `fi_mr_regv`: one region made of several pieces, concatenated in order (at most
    /// [`crate::rma::MAX_MR_SEGMENTS`]). With virtual addressing the region's remote address is
    /// the first piece's address. A region with any piece outside the shared region is
    /// registered as process memory ([`Domain::register_external`]).
    ///
    /// # Safety
    /// Every piece must stay valid while the region is registered.
    pub unsafe fn register_raw_iov(
        &self,
        iov: &[(*const u8, usize)],
        attr: &crate::rma::MrAttr,
    ) -> Result<crate::rma::MemoryRegion> {
        let segs: Vec<(u64, usize)> = iov.iter().map(|&(p, l)| (p as u64, l)).collect();
        self.inner.register(&segs, attr, None)
    }

    /// `fi_mr_reg` of memory outside the domain's shared region (e.g. a `Vec`, a `Box`, or a C
    /// application's `malloc` buffer), keeping its address.
    ///
    /// Nothing is copied or remapped: the region is registered as *process memory*
    /// (`mr_flags::PROCESS_MEMORY`, spec §6.8.4) and the device reaches exactly the registered
    /// bytes in this process with cross-memory attach (`process_vm_readv`/`process_vm_writev`,
    /// as libfabric's shm provider does), identifying the process by the credentials of the
    /// vhost-user socket. Threads of the application may keep using the buffer and its
    /// neighbours during and after the registration: no write is lost, and no byte outside the
    /// region is exposed to the device.
    ///
    /// Requirements and limits:
    /// * The device must run with ptrace-read access to this process (same uid or
    ///   CAP_SYS_PTRACE) and see this process as its frontend; otherwise MR_REG fails with
    ///   `Status::Unsupported`.
    /// * Remote atomics on such a region are atomic with respect to each other (the device
    ///   serialises them), not with respect to the application's own CPU accesses to the same
    ///   words at the same time.
    /// * Only remote access is affected: sends, receives and the local side of RMA from such
    ///   memory go through bounce buffers.
    /// * Access rights are the kernel's: a remote write to read-only or unmapped memory
    ///   completes with `Status::Fault`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be memory of this process that stays valid while the region is
    /// registered.
    pub unsafe fn register_external(
        &self,
        ptr: *const u8,
        len: usize,
        attr: &crate::rma::MrAttr,
    ) -> Result<crate::rma::MemoryRegion> {
        self.inner.register(&[(ptr as u64, len)], attr, None)
    }

    /// `fi_cntr_open`.
    pub fn cntr_open(&self) -> Result<crate::rma::Counter> {
        Ok(crate::rma::Counter::new(self.inner.clone()))
    }

    /// Bytes of the shared region in use (rings, slots, buffers, bounce cache).
    pub fn memory_in_use(&self) -> usize {
        self.inner.mem.in_use()
    }

    /// Size of the shared region.
    pub fn memory_size(&self) -> usize {
        self.inner.mem.len()
    }
}

/// An eventfd a sleeper watches besides the domain's own (a CQ's signal, a wait object).
#[derive(Clone, Copy)]
pub(crate) struct Extra {
    pub fd: RawFd,
    /// Reset it when it fires.
    pub reset: bool,
}

/// Driver-side counters of a domain. In steady-state polled operation `kicks` and `calls`
/// should grow much slower than `posted` (EVENT_IDX suppression).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomainStats {
    /// Requests posted on all virtqueues (control included).
    pub posted: u64,
    /// Requests the device returned.
    pub completed: u64,
    /// Kick eventfd writes (device notifications).
    pub kicks: u64,
    /// Times a thread slept in `ppoll` waiting for the device.
    pub sleeps: u64,
    /// Call eventfds found signalled after a sleep.
    pub calls: u64,
}

/// Device-side counters (`Domain::device_counters`): what `vfabricd` counted for this device
/// since it started (all guests that used it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct DeviceCounters {
    pub messages_sent: u64,
    pub messages_received: u64,
    pub bytes_copied: u64,
    pub disconnects: u64,
    pub bad_chains: u64,
    pub ring_errors: u64,
    pub dgram_drops: u64,
    pub error_completions: u64,
    /// Persistent-memory ranges the device made durable, and their bytes (spec §6.17).
    pub persisted_ranges: u64,
    pub persisted_bytes: u64,
}

pub(crate) struct DomainInner {
    /// First field: dropped first, so rings stop before anything else goes away.
    pub(crate) transport: Box<dyn Transport>,
    pub(crate) mem: Arc<SharedMemory>,
    pub(crate) queues: Vec<Queue>,
    pub(crate) num_queue_pairs: u16,
    pub(crate) features: u64,
    pub(crate) config: FabricConfig,
    info: OnceLock<Info>,
    pub(crate) ctrl_lock: Mutex<()>,
    pub(crate) ctrl_results: Mutex<HashMap<u64, CtrlResult>>,
    pub(crate) ctrl_abandoned: Mutex<HashSet<u64>>,
    pub(crate) ctrl_timeout: Duration,
    /// [`DOMAIN_CLOSED`] (the device socket hung up) and [`DOMAIN_FAILED`] (the device violated
    /// the ring protocol; no new requests are posted): one word, so a post checks both with
    /// one load.
    state: AtomicU8,
    sleeps: AtomicU64,
    calls: AtomicU64,
    idle_polls: AtomicU32,
    /// Sleepers and busy queues, shared with every queue.
    signals: Arc<DomainSignals>,
    /// Index of the first queue found broken (`u32::MAX`: none).
    broken_queue: AtomicU32,
    /// What `block` sleeps on: the transport's sources (vhost-user: the call eventfd all
    /// queues share, the error eventfd, the socket) in the first `poll_len` entries, the rest
    /// unused. None: nothing wakes a sleeper, it polls. A fixed array, so a sleep copies it
    /// without a `memcpy` call.
    poll_template: [libc::pollfd; MAX_WAIT_FDS],
    poll_len: usize,
    /// Meaning of the first `poll_len` entries of `poll_template`, in the same order.
    wait_kinds: Box<[WaitKind]>,
    /// The first wait source is the call eventfd (vhost-user): a wakeup by it alone, the
    /// common one, is handled without looking at the others.
    first_is_call: bool,
    /// Ranges outside `mem` added to the device with ADD_MEM_REG ([`Domain::share_raw`]).
    pub(crate) external: Mutex<Vec<Arc<crate::external::Remapped>>>,
    /// Ranges taken back with [`Domain::unshare_raw`]: still in the device's memory table (a
    /// removal would make the device reset the guest) but no longer used for zero-copy.
    pub(crate) retired: Mutex<Vec<Arc<crate::external::Remapped>>>,
    /// Counters and remote-event state (memory regions, FI_RMA_EVENT).
    pub(crate) rma: crate::rma::RmaState,
    /// The target commit handler and its COMMIT_EVENT requests (spec §6.17.3).
    pub(crate) commit: crate::commit::CommitState,
    /// The application's device-memory copy functions ([`Domain::set_hmem_copy`]).
    hmem_copy: Mutex<Option<Arc<dyn crate::hmem::HmemCopy>>>,
}

/// Why progress stopped: the device hung up, or broke a ring (converted to an [`Error`] only
/// when reported).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stalled {
    Closed,
    Broken(u16),
}

impl From<Stalled> for Error {
    fn from(s: Stalled) -> Self {
        match s {
            Stalled::Closed => Error::Closed,
            Stalled::Broken(index) => Error::Transport(format!(
                "virtqueue {index} is broken (device wrote an invalid used entry)"
            )),
        }
    }
}

/// A queue mask naming every queue of the domain (those from 64 on too).
pub(crate) const ALL_QUEUES: u64 = u64::MAX;

/// Queue-mask bit of queue `index` ([`ALL_QUEUES`] from 64 on: masks have 64 bits).
pub(crate) fn queue_bit(index: usize) -> u64 {
    if index < 64 {
        1 << index
    } else {
        ALL_QUEUES
    }
}

/// Empty progress passes between two liveness checks of the device (power of two).
const LIVENESS_CHECK_EVERY: u32 = 4096;

/// [`DomainInner::state`]: the device went away.
const DOMAIN_CLOSED: u8 = 1;
/// [`DomainInner::state`]: the device broke a ring.
const DOMAIN_FAILED: u8 = 2;

/// Why a domain whose state is not 0 takes no new requests (a hang-up first).
#[cold]
fn unusable(state: u8) -> Error {
    if state & DOMAIN_CLOSED != 0 {
        Error::Closed
    } else {
        Error::Transport("the device violated the ring protocol; domain unusable".into())
    }
}
/// How long a sleeper naps between looks at the rings when nothing can wake it.
const POLL_SLEEP_US: u64 = 200;
/// Most file descriptors a sleeper polls: the transport's wait sources (vhost-user: 3) and
/// the CQ's own signal eventfd.
const MAX_WAIT_FDS: usize = 4;

/// A queue that does not fit DMA memory made of short physical runs (4 KiB pages, no huge
/// pages reserved) says what to do about it.
fn no_room_for_queue(device: &DeviceLocator, mem: &SharedMemory, e: Error) -> Error {
    match e {
        Error::OutOfMemory { requested } if mem.file().is_none() => Error::Unsupported(format!(
            "device {device}: a queue needs {requested} physically contiguous bytes and the DMA \
             memory's longest run is {} bytes: reserve huge pages (echo 64 > \
             /proc/sys/vm/nr_hugepages)",
            mem.largest_segment()
        )),
        e => e,
    }
}

fn duration_of(t: &libc::timespec) -> Duration {
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

impl DomainInner {
    /// The fabric the device belongs to (config space; also bits 63..32 of its node address).
    pub(crate) fn fabric_id(&self) -> u32 {
        self.config.fabric_id.into()
    }

    /// Connect, share memory, read config, start the rings. A probe only starts the control
    /// queue (enough for QUERY_CAPS).
    pub(crate) fn connect(
        device: &DeviceLocator,
        attr: &DomainAttr,
        probe: bool,
    ) -> Result<Arc<Self>> {
        crate::memory::check_mem_env()?;
        let mut transport = crate::transport::open(
            device,
            attr.accept_timeout.unwrap_or(attr.control_timeout),
            attr.control_timeout,
        )?;
        let mem_bytes = if probe {
            PROBE_MEM_BYTES
        } else {
            attr.mem_bytes
        };
        let mem = transport.map_memory(mem_bytes)?;
        let config = transport.get_config()?;
        let features = transport.features();
        let has_feature = |b: u32| features & proto::bit(b) != 0;

        let device_qp = if has_feature(proto::VIRTIO_FABRIC_F_MQ) {
            u32::from(config.num_queue_pairs).max(1)
        } else {
            1
        };
        let transport_qp = ((transport.max_queues().saturating_sub(1)) / 2).max(1);
        let mut qp = device_qp.min(transport_qp as u32).min(u16::MAX as u32 / 2) as u16;
        if let Some(want) = attr.queue_pairs {
            qp = qp.min(want.max(1));
        }
        if probe {
            qp = 0;
        }
        let max_size = match u32::from(config.max_queue_size) {
            0 => 32768,
            n => n.min(32768),
        }
        .min(u32::from(transport.max_queue_size()));
        let pow2_floor = |v: u32| {
            if v == 0 {
                0
            } else {
                1u32 << (31 - v.leading_zeros())
            }
        };
        let data_size = pow2_floor(u32::from(attr.queue_size).min(max_size)) as u16;
        let ctrl_size = pow2_floor(u32::from(CONTROL_QUEUE_SIZE).min(max_size)) as u16;
        if ctrl_size < 4 || (!probe && data_size < 4) {
            return Err(Error::Unsupported(format!(
                "device max_queue_size {max_size} is too small (need >= 4)"
            )));
        }
        let event_idx = has_feature(proto::VIRTIO_RING_F_EVENT_IDX);
        let signals = Arc::new(DomainSignals::default());
        let mut queues = Vec::with_capacity(1 + 2 * qp as usize);
        for index in 0..(1 + 2 * qp) {
            let size = if index == proto::CONTROL_QUEUE {
                ctrl_size
            } else {
                data_size
            };
            let mut vq = Virtqueue::new(&mem, index, size, event_idx, signals.clone())
                .map_err(|e| no_room_for_queue(device, &mem, e))?;
            vq.attach(transport.setup_queue(index, size, vq.ring_addrs())?);
            queues.push(vq);
        }
        transport.activate()?;
        let sources = transport.wait_sources();
        // One entry stays free for the sleeper's own eventfd (`block_for`'s `extra`).
        if sources.len() >= MAX_WAIT_FDS {
            return Err(Error::Unsupported(format!(
                "transport of {device} has {} wait sources (at most {})",
                sources.len(),
                MAX_WAIT_FDS - 1
            )));
        }
        let mut poll_template = [libc::pollfd {
            fd: -1,
            events: 0,
            revents: 0,
        }; MAX_WAIT_FDS];
        for (p, &(fd, events, _)) in poll_template.iter_mut().zip(&sources) {
            *p = libc::pollfd {
                fd,
                events,
                revents: 0,
            };
        }
        let poll_len = sources.len();
        let wait_kinds = sources.iter().map(|s| s.2).collect();
        let first_is_call = sources.first().is_some_and(|s| s.2 == WaitKind::Call);
        let inner = Arc::new(DomainInner {
            transport,
            mem,
            queues,
            num_queue_pairs: qp,
            features,
            config,
            info: OnceLock::new(),
            ctrl_lock: Mutex::new(()),
            ctrl_results: Mutex::new(HashMap::new()),
            ctrl_abandoned: Mutex::new(HashSet::new()),
            ctrl_timeout: attr.control_timeout,
            state: AtomicU8::new(0),
            sleeps: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            idle_polls: AtomicU32::new(0),
            signals,
            broken_queue: AtomicU32::new(u32::MAX),
            poll_template,
            poll_len,
            wait_kinds,
            first_is_call,
            rma: Default::default(),
            commit: Default::default(),
            hmem_copy: Mutex::new(None),
            external: Mutex::new(Vec::new()),
            retired: Mutex::new(Vec::new()),
        });
        // Plain requests borrow the region's shared buffers (`request::BufRef`).
        let borrowers: std::sync::Weak<dyn crate::memory::Borrowers> = Arc::downgrade(&inner) as _;
        inner.mem.set_borrowers(borrowers);
        let caps = inner.query_caps()?;
        let info = Info::build(
            device,
            &inner.config,
            inner.transport.device_features(),
            caps,
        );
        let _ = inner.info.set(info);
        tracing::info!(
            device = %device,
            queue_pairs = qp,
            queue_size = data_size,
            mem = inner.mem.len(),
            event_idx,
            "domain open"
        );
        Ok(inner)
    }

    /// Is `[p, p+l)` memory the device can reach (the shared region or an added range)?
    pub(crate) fn is_shared(&self, p: u64, l: usize) -> bool {
        self.mem.contains(p as *const u8, l)
            || crate::external::covered(&self.external.lock().unwrap(), p as usize, l)
    }

    /// Device address of `[p, p+l)` if the device reaches it as one contiguous range (inside
    /// one segment of the shared region, or an added range: those are vhost-user memory with
    /// device address == process address).
    #[inline]
    pub(crate) fn device_addr(&self, p: *const u8, l: usize) -> Option<u64> {
        self.mem.device_addr(p, l).or_else(|| {
            crate::external::covered(&self.external.lock().unwrap(), p as usize, l)
                .then_some(p as u64)
        })
    }

    /// Move the pages of `[ptr, ptr+len)` onto a memfd (or find them moved already) and add
    /// them to the device (ADD_MEM_REG) unless this domain did already.
    pub(crate) fn share_external(&self, ptr: usize, len: usize) -> Result<()> {
        self.check_usable()?;
        let (start, plen) = crate::external::page_range(ptr, len)?;
        if self.mem.contains(start as *const u8, plen)
            || (start < self.mem.guest_base() as usize + self.mem.len()
                && start + plen > self.mem.guest_base() as usize)
        {
            return Err(Error::InvalidArgument(format!(
                "{ptr:#x}+{len:#x} straddles the domain's shared region"
            )));
        }
        let mut added = self.external.lock().unwrap();
        if crate::external::covered(&added, start, plen) {
            return Ok(());
        }
        let mut retired = self.retired.lock().unwrap();
        for r in crate::external::remap(start, plen)? {
            if added.iter().any(|o| Arc::ptr_eq(o, &r)) {
                continue;
            }
            // The same pages, taken back earlier and still mapped: the device still has them.
            if let Some(k) = retired.iter().position(|o| Arc::ptr_eq(o, &r)) {
                added.push(retired.swap_remove(k));
                continue;
            }
            if let Some(o) = added
                .iter()
                .chain(retired.iter())
                .find(|o| o.start < r.start + r.len && r.start < o.start + o.len)
            {
                return Err(Error::InvalidArgument(format!(
                    "{:#x}..{:#x} overlaps pages {:#x}..{:#x} this domain already shared and \
                     which were unmapped since",
                    r.start,
                    r.start + r.len,
                    o.start,
                    o.start + o.len
                )));
            }
            self.transport
                .add_external_memory(r.start as u64, r.len as u64, &r.file)?;
            tracing::debug!(
                start = format_args!("{:#x}", r.start),
                len = r.len,
                "external memory added to the device"
            );
            added.push(r);
        }
        Ok(())
    }

    pub(crate) fn info(&self) -> &Info {
        self.info.get().expect("info is set when the domain opens")
    }

    pub(crate) fn has_feature(&self, b: u32) -> bool {
        self.features & proto::bit(b) != 0
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state.load(Ordering::Relaxed) & DOMAIN_CLOSED != 0
    }

    /// Mark the device gone: whether it was not already.
    fn close_once(&self) -> bool {
        self.state.fetch_or(DOMAIN_CLOSED, Ordering::Relaxed) & DOMAIN_CLOSED == 0
    }

    /// Ready for new requests: `Closed` if the device hung up, `Transport` if it violated the
    /// ring protocol.
    pub(crate) fn check_usable(&self) -> Result<()> {
        let state = self.state.load(Ordering::Relaxed);
        if state != 0 {
            return Err(unusable(state));
        }
        Ok(())
    }

    /// TX and RX virtqueue indices carrying endpoint `ep`.
    pub(crate) fn queues_of_endpoint(&self, ep: u32) -> (usize, usize) {
        let qp = (ep % self.num_queue_pairs.max(1) as u32) as u16;
        (proto::tx_queue(qp) as usize, proto::rx_queue(qp) as usize)
    }

    /// Drain every used ring and dispatch completions.
    pub(crate) fn progress(&self) -> Result<usize> {
        self.progress_fast().map_err(Error::from)
    }

    /// [`DomainInner::progress`] with a plain error (nothing to drop on the hot path).
    pub(crate) fn progress_fast(&self) -> std::result::Result<usize, Stalled> {
        self.progress_into(None)
    }

    /// [`DomainInner::progress_fast`] for a CQ reader: success entries for the reader's CQ go
    /// straight into its buffer while that CQ has nothing queued (see [`crate::cq::Direct`]).
    #[inline(always)]
    pub(crate) fn progress_into(
        &self,
        direct: Option<&mut crate::cq::Direct<'_>>,
    ) -> std::result::Result<usize, Stalled> {
        let n = self.drain_busy(direct);
        if n > 0 {
            self.after_completions();
        }
        let broken = self.broken_queue.load(Ordering::Relaxed);
        if broken != u32::MAX {
            return Err(Stalled::Broken(broken as u16));
        }
        if n == 0 {
            // Now and then, look whether the device went away (a polled CQ never sleeps in
            // `block`, where hang-ups are otherwise noticed).
            let idle = self.idle_polls.fetch_add(1, Ordering::Relaxed);
            if idle & (LIVENESS_CHECK_EVERY - 1) == LIVENESS_CHECK_EVERY - 1 {
                self.check_alive();
            }
            if self.is_closed() {
                return Err(Stalled::Closed);
            }
        }
        Ok(n)
    }

    /// Has progress stopped (a queue broke, or the device went away)? Progress then returns the
    /// reason instead of draining.
    #[inline]
    pub(crate) fn is_stalled(&self) -> bool {
        self.broken_queue.load(Ordering::Relaxed) != u32::MAX || self.is_closed()
    }

    /// Drain the queues with requests in flight (the busy mask, plus every queue from 64 on)
    /// and dispatch their completions. A queue found broken stops the domain (spec §6.14.2).
    /// Inline: a CQ read is mostly this loop around one queue's drain.
    #[inline(always)]
    fn drain_busy(&self, mut direct: Option<&mut crate::cq::Direct<'_>>) -> usize {
        let mut n = 0;
        let mut busy = self.signals.busy.load(Ordering::Relaxed);
        while busy != 0 {
            let i = busy.trailing_zeros() as usize;
            busy &= busy - 1;
            if let Some(q) = self.queues.get(i) {
                n += self.drain_queue(q, direct.as_deref_mut());
            }
        }
        if self.queues.len() > 64 {
            n += self.drain_high(direct);
        }
        n
    }

    /// The queues from 64 on (outside the busy mask): scanned on every pass, out of line.
    #[inline(never)]
    fn drain_high(&self, mut direct: Option<&mut crate::cq::Direct<'_>>) -> usize {
        let mut n = 0;
        for q in &self.queues[64..] {
            n += self.drain_queue(q, direct.as_deref_mut());
        }
        n
    }

    #[inline(always)]
    fn drain_queue(&self, q: &Queue, direct: Option<&mut crate::cq::Direct<'_>>) -> usize {
        if !q.needs_drain() {
            q.leave_scan_if_idle();
            return 0;
        }
        // A broken ring stops the domain (`Deliver` tells `queue_broke`).
        q.drain(&mut crate::cq::Deliver {
            domain: self,
            direct,
        })
    }

    #[cold]
    pub(crate) fn queue_broke(&self, index: u16) {
        if self.state.fetch_or(DOMAIN_FAILED, Ordering::Relaxed) & DOMAIN_FAILED == 0 {
            self.broken_queue.store(u32::from(index), Ordering::Relaxed);
            tracing::error!(
                device = %self.transport.locator(),
                queue = index,
                "device wrote an invalid used entry: the domain stops using it"
            );
        }
    }

    /// Progress for control waiters: errors of data queues are reported to their users, not
    /// to the control caller.
    pub(crate) fn progress_quiet(&self) {
        if self.drain_busy(None) > 0 {
            self.after_completions();
        }
    }

    /// Work that completions leave for after the drain, when their chains are free again:
    /// replacing consumed MR_EVENT requests. Inline: after nearly every drain it is three
    /// atomic loads.
    #[inline]
    fn after_completions(&self) {
        if self.rma.events_wanted() {
            self.post_events();
        }
        if self.commit.events_wanted() {
            self.post_commit_events();
        }
        if self.commit.has_work() {
            self.run_commit_handlers();
        }
    }

    /// Non-blocking check that the device is still there (vhost-user: the socket did not
    /// hang up; PCI: the device did not ask for a reset).
    fn check_alive(&self) {
        if !self.transport.is_alive() && self.close_once() {
            tracing::warn!(device = %self.transport.locator(), "device went away");
        }
    }

    /// Sleep until a call eventfd of the domain (or `extra`) fires, `deadline` passes, or a
    /// used entry is already pending. Notifications are armed for the duration (EVENT_IDX
    /// `used_event`), and the rings are re-checked after arming so no wakeup is lost.
    pub(crate) fn block(&self, deadline: Option<Instant>, extra: Option<&EventFd>) -> Result<()> {
        let mut left =
            deadline.map(|d| crate::cq::timespec_of(d.saturating_duration_since(Instant::now())));
        let extra = extra.map(|e| Extra {
            fd: e.as_raw_fd(),
            reset: false,
        });
        self.block_for(left.as_mut(), extra, ALL_QUEUES).map(|_| ())
    }

    /// [`DomainInner::block`] with a relative timeout, which the kernel decreases by the time
    /// slept (`ppoll` semantics), so a caller looping over wakeups needs no clock. Returns
    /// whether it slept (false: something was pending already).
    ///
    /// Only the queues in `queues` (bit `i`: queue `i`; [`ALL_QUEUES`]: every queue) are armed
    /// and re-checked: a CQ reader passes the queues that feed its CQ, so completions of other
    /// queues (which go to other CQs) do not wake it. Entries that another thread's progress
    /// queues for the caller reach it through `extra` (the CQ's signal eventfd).
    #[inline(always)]
    pub(crate) fn block_for(
        &self,
        timeout: Option<&mut libc::timespec>,
        extra: Option<Extra>,
        queues: u64,
    ) -> Result<bool> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        // Count ourselves before arming: a drainer that moves a ring on then re-arms it, and a
        // post to a queue we leave idle arms it.
        self.signals.blockers.fetch_add(1, Ordering::SeqCst);
        // Only queues with requests in flight can be called. A post to a queue outside the
        // busy mask sets its bit after counting the request and then sees our `blockers`
        // count (all SeqCst) and arms it itself.
        let busy = self.signals.busy.load(Ordering::SeqCst) & queues;
        let high = queues == ALL_QUEUES && self.queues.len() > 64;
        let one = busy.trailing_zeros() as usize;
        let ready = if busy.is_power_of_two() && !high && one < self.queues.len() {
            // One busy queue feeds the sleeper (a CQ bound for one direction of one endpoint):
            // arm it, fence, re-check it.
            let q = &self.queues[one];
            q.arm_if_busy() && {
                fence(Ordering::SeqCst);
                q.has_used()
            }
        } else {
            self.arm_and_check(busy, high)
        };
        let result = if ready {
            Ok(false)
        } else {
            self.poll_fds(timeout, extra).map(|_| true)
        };
        // Rings stay armed: the next drain parks them (or re-arms them for other sleepers).
        self.signals.blockers.fetch_sub(1, Ordering::SeqCst);
        result
    }

    /// [`DomainInner::block_for`]'s arming of the busy queues in `busy` (and of every queue
    /// from 64 on with `high`) and re-check of their used indices after one fence: whether
    /// one has used entries already.
    #[inline(never)]
    fn arm_and_check(&self, mut busy: u64, high: bool) -> bool {
        let mut armed = 0u64;
        let lower = self.queues.len().min(64);
        while busy != 0 {
            let i = busy.trailing_zeros() as usize;
            busy &= busy - 1;
            if i < lower && self.queues[i].arm_if_busy() {
                armed |= 1 << i;
            }
        }
        if high {
            for q in &self.queues[64..] {
                q.arm_if_busy();
            }
        }
        // The arming stores must be visible before we re-check the used indices.
        fence(Ordering::SeqCst);
        let mut ready = false;
        while armed != 0 && !ready {
            let i = armed.trailing_zeros() as usize;
            armed &= armed - 1;
            ready = self.queues[i].has_used();
        }
        ready || (high && self.queues[64..].iter().any(|q| q.has_used()))
    }

    #[inline(always)]
    fn poll_fds(&self, timeout: Option<&mut libc::timespec>, extra: Option<Extra>) -> Result<()> {
        let mut fds = self.poll_template;
        let mut total = self.poll_len;
        if let Some(Extra { fd, .. }) = extra {
            fds[total] = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            total += 1;
        }
        let fds = &mut fds[..total];
        self.sleeps.fetch_add(1, Ordering::Relaxed);
        // Nothing of the device's can wake us (a PCI device without a uio binding): nap a
        // short while and let the caller look at the rings again.
        let polling = self.poll_len == 0;
        let mut timeout = timeout;
        let mut nap = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let mut nap_len = Duration::ZERO;
        let tp = if polling {
            nap_len = Duration::from_micros(POLL_SLEEP_US);
            if let Some(t) = &timeout {
                nap_len = nap_len.min(duration_of(t));
            }
            nap = crate::cq::timespec_of(nap_len);
            &mut nap as *mut libc::timespec
        } else {
            timeout
                .as_deref_mut()
                .map_or(std::ptr::null_mut(), |t| t as *mut libc::timespec)
        };
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds; `tp` is null or points to a
        // live timespec, which the raw system call (unlike libc's wrapper) updates with the
        // time left; no signal mask is passed.
        let rc = unsafe { ppoll_raw(fds, tp) };
        if polling {
            if let Some(t) = timeout {
                let slept = nap_len.saturating_sub(duration_of(&nap));
                *t = crate::cq::timespec_of(duration_of(t).saturating_sub(slept));
            }
            self.check_alive();
        }
        if rc < 0 {
            let e = std::io::Error::from_raw_os_error(-rc as i32);
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(e.into());
        }
        if rc == 0 {
            return Ok(());
        }
        if rc == 1 && self.first_is_call && fds[0].revents != 0 {
            // The call eventfd alone (so not `extra`): count and reset it, as the loop below.
            self.calls.fetch_add(1, Ordering::Relaxed);
            crate::virtqueue::drain_eventfd(fds[0].fd);
            return Ok(());
        }
        // The extra eventfd is reset when its owner asks (a CQ's signal with no FI_WAIT_FD
        // consumer): left readable, it would end every later sleep at once.
        if let Some(Extra { fd, reset: true }) = extra {
            if fds.get(self.poll_len).is_some_and(|p| p.revents != 0) {
                crate::virtqueue::drain_eventfd(fd);
            }
        }
        let mut pending = rc;
        for (i, p) in fds.iter().enumerate() {
            if pending == 0 {
                break;
            }
            if p.revents == 0 {
                continue;
            }
            pending -= 1;
            match self.wait_kinds.get(i) {
                Some(WaitKind::Call) => {
                    self.calls.fetch_add(1, Ordering::Relaxed);
                    // Reset the eventfd (non-blocking; nothing to read if another waiter got
                    // it).
                    crate::virtqueue::drain_eventfd(p.fd);
                }
                Some(WaitKind::Hangup) if self.close_once() => {
                    tracing::warn!(
                        device = %self.transport.locator(),
                        "device closed the vhost-user connection"
                    );
                }
                Some(WaitKind::Hangup) => {}
                Some(WaitKind::RingError) => {
                    tracing::error!("device signalled a virtqueue error");
                    crate::virtqueue::drain_eventfd(p.fd);
                }
                Some(WaitKind::Interrupt) => {
                    self.calls.fetch_add(1, Ordering::Relaxed);
                    self.transport.ack_interrupt();
                }
                None => {}
            }
        }
        Ok(())
    }
}

/// The `ppoll` system call on `fds` with timeout `tp` (null: none) and no signal mask: the
/// number of ready entries, or `-errno`, without libc's wrapper ([`crate::syscall::raw5`]).
///
/// # Safety
/// `tp` must be null or point to a live timespec (the kernel writes the time left into it).
#[inline(always)]
unsafe fn ppoll_raw(fds: &mut [libc::pollfd], tp: *mut libc::timespec) -> isize {
    // SAFETY: the kernel writes the `revents` of the live slice `fds` and the timespec at `tp`
    // (the caller's guarantee); the signal mask is null, so its size is not read.
    unsafe {
        crate::syscall::raw5(
            libc::SYS_ppoll,
            [
                fds.as_mut_ptr() as usize,
                fds.len(),
                tp as usize,
                0,
                std::mem::size_of::<libc::sigset_t>(),
            ],
        )
    }
}

impl Drop for DomainInner {
    fn drop(&mut self) {
        let in_flight: usize = self.queues.iter().map(|q| q.in_flight()).sum();
        tracing::debug!(
            device = %self.transport.locator(),
            in_flight,
            "domain closing"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::DmaSegment;

    #[test]
    fn queue_too_large_for_short_physical_runs_names_huge_pages() {
        // DMA memory of four 4 KiB runs: a 64-entry queue's 24 KiB slot area cannot be placed.
        let len = 4 * 4096;
        let segs = (0..4)
            .map(|i| DmaSegment {
                offset: i * 4096,
                len: 4096,
                device_addr: 0x10_0000 * (4 - i as u64),
            })
            .collect();
        let mem = crate::memory::test_dma_memory(len, segs);
        let device: DeviceLocator = "pci:0000:00:01.0".parse().unwrap();
        let e = Virtqueue::<crate::request::PendingOp>::new(
            &mem,
            1,
            64,
            true,
            Arc::new(DomainSignals::default()),
        )
        .err()
        .map(|e| no_room_for_queue(&device, &mem, e))
        .unwrap();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        assert!(e.to_string().contains("huge pages"), "{e}");
        // Under vhost-user (memfd) the error stays what it was.
        let shared = SharedMemory::new("vfabric-test", 1 << 16).unwrap();
        let e = no_room_for_queue(&device, &shared, Error::OutOfMemory { requested: 1 });
        assert!(matches!(e, Error::OutOfMemory { .. }));
    }
}
