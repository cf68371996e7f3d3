// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `FabricBackend`: the `VhostUserBackend` of one device connection.
//!
//! One backend exists per frontend connection (the serving loop re-creates it, like
//! vhost-device-template's `start_backend`). Its single vring worker thread drains every queue of
//! the device after a kick, spins for a bounded budget while work keeps arriving, then re-enables
//! notifications (EVENT_IDX) and returns to epoll. Requests are parsed outside the fabric lock
//! and handed to the shared [`Fabric`] in batches.

use std::fmt::Display;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};

use tracing::{debug, error, info, warn};
use vfabric_proto::{
    bit, feature_names, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VHOST_USER_CONFIG_SIZE};
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{
    ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::chain::{
    has_pending, head_is_indirect, parse_chain, pop_chains, GuestMemoryMmap, Parsed,
};
use crate::fabric::{CompletionSink, Fabric, Notify, Port, Teardown};
use crate::poller::Poller;
use crate::stats::Counters;

/// Chains popped from one queue before they are handed to the fabric.
const BATCH: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The used rings of one connection: where the fabric puts completions.
pub(crate) struct VringSink {
    vrings: RwLock<Vec<VringRwLock>>,
    /// Bit q: queue q got used entries since the last flush.
    pending: AtomicU64,
    /// `add_used` failed: the used ring is corrupt.
    broken: AtomicBool,
}

impl VringSink {
    fn new() -> Self {
        Self {
            vrings: RwLock::new(Vec::new()),
            pending: AtomicU64::new(0),
            broken: AtomicBool::new(false),
        }
    }

    fn set_vrings(&self, vrings: &[VringRwLock]) {
        let known = !self
            .vrings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        if !known {
            let mut w = self.vrings.write().unwrap_or_else(|p| p.into_inner());
            if w.is_empty() {
                *w = vrings.to_vec();
            }
        }
    }
}

impl CompletionSink for VringSink {
    fn complete(&self, queue: u16, head: u16, len: u32) {
        let v = self.vrings.read().unwrap_or_else(|p| p.into_inner());
        let Some(vr) = v.get(queue as usize) else {
            warn!(queue, "completion for an unknown queue dropped");
            return;
        };
        match vr.add_used(head, len) {
            Ok(()) => {
                self.pending.fetch_or(1u64 << queue, Ordering::AcqRel);
            }
            Err(e) => {
                warn!(queue, head, "add_used failed: {e}");
                self.broken.store(true, Ordering::Release);
            }
        }
    }

    fn flush(&self) {
        let bits = self.pending.swap(0, Ordering::AcqRel);
        if bits == 0 {
            return;
        }
        let v = self.vrings.read().unwrap_or_else(|p| p.into_inner());
        for (q, vr) in v.iter().enumerate() {
            if bits & (1u64 << q) == 0 {
                continue;
            }
            // A used_event we cannot read is treated as "notify".
            if vr.needs_notification().unwrap_or(true) {
                if let Err(e) = vr.signal_used_queue() {
                    debug!(q, "cannot signal the guest: {e}");
                }
            }
        }
    }
}

/// Identity of the guest memory regions, to tell additions from replacements.
type RegionKey = (u64, u64, usize);

fn region_keys(mem: &GuestMemoryMmap) -> Vec<RegionKey> {
    mem.iter()
        .map(|r| {
            let host = r
                .get_host_address(MemoryRegionAddress(0))
                .map_or(0, |p| p as usize);
            (r.start_addr().0, r.len(), host)
        })
        .collect()
}

/// Every region must be backed by a file that covers it and cannot shrink (`F_SEAL_SHRINK`, as
/// QEMU's `memory-backend-memfd` and the `vfabric` driver set): a guest that truncated its memfd
/// under a mapping would make the daemon's next access to those pages raise SIGBUS.
fn check_backing(mem: &GuestMemoryMmap) -> Result<(), String> {
    for r in mem.iter() {
        let start = r.start_addr().0;
        // Anonymous memory (embedded tests) cannot shrink under us.
        let Some(fo) = r.file_offset() else {
            continue;
        };
        let need = fo
            .start()
            .checked_add(r.len())
            .ok_or("region end overflows")?;
        let have = fo
            .file()
            .metadata()
            .map_err(|e| format!("cannot stat the file of region {start:#x}: {e}"))?
            .len();
        if have < need {
            return Err(format!(
                "region at {start:#x} needs {need} bytes of its file, which has {have}"
            ));
        }
        // SAFETY: fcntl(F_GET_SEALS) on a descriptor we hold open; it reads no memory of ours.
        let seals = unsafe { libc::fcntl(fo.file().as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(format!(
                "the file of region {start:#x} can shrink (no F_SEAL_SHRINK seal)"
            ));
        }
    }
    Ok(())
}

/// The vhost-user backend of one device connection.
pub(crate) struct FabricBackend {
    dev: usize,
    fabric: Arc<Fabric>,
    counters: Arc<Counters>,
    num_queues: usize,
    /// The daemon's data-plane poller (takes over the rings while the guest is busy).
    poller: Arc<Poller>,
    /// This backend, for handing it to the poller.
    me: Mutex<Weak<FabricBackend>>,
    /// The poller owns this device's rings (notifications stay disabled until it lets go).
    polled: Mutex<bool>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    sink: Arc<VringSink>,
    acked: AtomicU64,
    /// Held during one pass over the queues (chains popped in a pass are handed to the fabric
    /// before it is released), and by control-path changes (stop, reset, memory table) that must
    /// not interleave with a pass. Lock order: first (see `fabric` module docs).
    work: Mutex<()>,
    /// Control operations waiting for `work`: the worker yields to them between passes.
    control_waiting: AtomicUsize,
    regions: Mutex<Vec<RegionKey>>,
    exit_event: Mutex<Option<(EventConsumer, EventNotifier)>>,
    /// Raw fd of the exit consumer handed to vhost-user-backend (it leaks it; we close it).
    exit_fd: Mutex<Option<RawFd>>,
    shutdown: Mutex<Option<ShutdownHandle>>,
    broken: AtomicBool,
}

impl FabricBackend {
    pub fn new(
        dev: usize,
        fabric: Arc<Fabric>,
        poller: Arc<Poller>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> io::Result<Arc<Self>> {
        let counters = fabric
            .counters(dev)
            .cloned()
            .ok_or_else(|| io::Error::other("device index out of range"))?;
        let exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        let backend = Arc::new(Self {
            dev,
            num_queues: fabric.limits().num_queues(),
            fabric,
            counters,
            poller,
            me: Mutex::new(Weak::new()),
            polled: Mutex::new(false),
            mem,
            sink: Arc::new(VringSink::new()),
            acked: AtomicU64::new(0),
            work: Mutex::new(()),
            control_waiting: AtomicUsize::new(0),
            regions: Mutex::new(Vec::new()),
            exit_event: Mutex::new(Some(exit)),
            exit_fd: Mutex::new(None),
            shutdown: Mutex::new(None),
            broken: AtomicBool::new(false),
        });
        *lock(&backend.me) = Arc::downgrade(&backend);
        Ok(backend)
    }

    /// The connection is over: no pass may hand chains to the fabric any more (the poller may
    /// still hold this backend for a moment). Waits for a pass in progress to finish.
    pub fn retire(&self) {
        self.broken.store(true, Ordering::Release);
        drop(self.control_lock());
    }

    /// The fabric port of this connection.
    pub fn port(&self) -> Port {
        Port {
            mem: self.mem.clone(),
            sink: self.sink.clone(),
        }
    }

    /// Give the backend the means to drop its frontend (on a corrupt ring).
    pub fn set_shutdown(&self, h: ShutdownHandle) {
        if self.broken.load(Ordering::Acquire) {
            h.shutdown();
        }
        *lock(&self.shutdown) = Some(h);
    }

    /// Close the exit eventfd vhost-user-backend leaked. Call only after the daemon (and so its
    /// vring worker and epoll) has been dropped.
    pub fn close_exit_fd(&self) {
        if let Some(fd) = lock(&self.exit_fd).take() {
            // SAFETY: vhost-user-backend 0.24 turned our EventConsumer into this raw fd with
            // `into_raw_fd()` and registered it in its epoll; it never closes it. Its worker has
            // been joined and its epoll fd closed when the daemon was dropped, so nothing uses
            // the fd any more and we own it: close it exactly once (the Option was taken).
            unsafe {
                libc::close(fd);
            }
        }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// A ring of this guest is corrupt: stop serving it and drop the connection.
    fn ring_error(&self, queue: usize, e: &dyn Display) {
        if self.broken.swap(true, Ordering::AcqRel) {
            return;
        }
        error!(
            dev = self.dev,
            queue, "corrupt virtqueue: {e}; disconnecting this guest"
        );
        Counters::inc(&self.counters.ring_errors);
        if let Some(h) = lock(&self.shutdown).as_ref() {
            h.shutdown();
        }
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Take the processing lock for one pass, letting a waiting control operation go first.
    fn work_lock(&self) -> MutexGuard<'_, ()> {
        while self.control_waiting.load(Ordering::Acquire) > 0 {
            std::thread::yield_now();
        }
        lock(&self.work)
    }

    /// Take the processing lock for a control-path change (stop, reset, memory table).
    fn control_lock(&self) -> MutexGuard<'_, ()> {
        self.control_waiting.fetch_add(1, Ordering::AcqRel);
        let g = lock(&self.work);
        self.control_waiting.fetch_sub(1, Ordering::AcqRel);
        g
    }

    /// One pass over every queue: pop a batch from each, parse it, hand it to the fabric.
    /// Returns whether any chain was found.
    ///
    /// The data queues go first and the control queue only once they are empty, so a control
    /// request never overtakes data requests posted before it (spec: EP_CLOSE and CANCEL act on
    /// everything the driver made available earlier, and a reopened endpoint id never inherits
    /// an old receive).
    fn pass(&self, vrings: &[VringRwLock], n: &mut Notify) -> bool {
        let _work = self.work_lock();
        let mut progressed = false;
        let order = (1..vrings.len()).chain(std::iter::once(0));
        for q in order {
            let Some(vr) = vrings.get(q) else {
                continue;
            };
            if self.is_broken() {
                return progressed;
            }
            if q == 0 && self.any_pending(vrings.get(1..).unwrap_or_default()) {
                // Data requests are still waiting: the next pass takes them first.
                progressed = true;
                continue;
            }
            let mem = self.mem.memory();
            let (popped, desc_table) = {
                let mut st = vr.get_mut();
                if !st.is_enabled() || !st.get_queue().ready() {
                    continue;
                }
                // The cheap look at the avail index first: validating a ring (in pop_chains)
                // costs more than the rest of a small request.
                if !has_pending(st.get_queue(), &mem) {
                    continue;
                }
                let desc_table = st.get_queue().desc_table();
                (pop_chains(st.get_queue_mut(), &mem, BATCH), desc_table)
            };
            let chains = match popped {
                Ok(c) => c,
                Err(e) => {
                    self.ring_error(q, &e);
                    return progressed;
                }
            };
            if chains.is_empty() {
                continue;
            }
            progressed = true;
            let acked = self.acked();
            let limits = self.fabric.limits();
            let parsed: Vec<Parsed> = chains
                .into_iter()
                .map(|c| {
                    let indirect = head_is_indirect(&mem, desc_table, c.head_index());
                    parse_chain(&mem, c, q as u16, limits, acked, indirect)
                })
                .collect();
            self.fabric.handle(self.dev, parsed, acked, n);
        }
        progressed
    }

    /// Pass over the queues until they are all empty. Returns whether any chain was found.
    fn drain(&self, vrings: &[VringRwLock], n: &mut Notify) -> bool {
        let mut found = false;
        loop {
            let progressed = self.pass(vrings, n);
            n.flush();
            if self.sink.broken.load(Ordering::Acquire) {
                self.ring_error(0, &"used ring not writable");
            }
            if !progressed || self.is_broken() {
                return found;
            }
            found = true;
        }
    }

    fn any_pending(&self, vrings: &[VringRwLock]) -> bool {
        let mem = self.mem.memory();
        vrings.iter().any(|vr| {
            let st = vr.get_ref();
            st.is_enabled() && st.get_queue().ready() && has_pending(st.get_queue(), &mem)
        })
    }

    /// Poller: drain the rings if anything is pending. Returns whether work was found.
    pub(crate) fn poll_once(&self, vrings: &[VringRwLock]) -> bool {
        if !self.any_pending(vrings) {
            return false;
        }
        let mut n = Notify::default();
        self.drain(vrings, &mut n);
        true
    }

    /// Poller: re-enable notifications and give the rings back to the kicks. Returns `false`
    /// (keeping them polled) if requests arrived meanwhile.
    pub(crate) fn try_park(&self, vrings: &[VringRwLock]) -> bool {
        let mut polled = lock(&self.polled);
        match self.set_notifications(vrings, true) {
            Ok(true) if !self.is_broken() => {
                if self.set_notifications(vrings, false).is_ok() {
                    return false;
                }
                *polled = false;
                true
            }
            _ => {
                *polled = false;
                true
            }
        }
    }

    /// Poller: forget a broken device.
    pub(crate) fn release_polled(&self) {
        *lock(&self.polled) = false;
    }

    fn set_notifications(&self, vrings: &[VringRwLock], enable: bool) -> Result<bool, ()> {
        let mut more = false;
        for (q, vr) in vrings.iter().enumerate() {
            {
                let st = vr.get_ref();
                if !st.is_enabled() || !st.get_queue().ready() {
                    continue;
                }
            }
            if enable {
                match vr.enable_notification() {
                    Ok(m) => more |= m,
                    Err(e) => {
                        self.ring_error(q, &e);
                        return Err(());
                    }
                }
            } else if let Err(e) = vr.disable_notification() {
                self.ring_error(q, &e);
                return Err(());
            }
        }
        Ok(more)
    }

    /// The fast path after a kick: drain, then hand the rings to the poller (notifications
    /// stay off while the guest is busy) or, without polling, re-enable notifications and
    /// re-check before sleeping.
    fn process(&self, vrings: &[VringRwLock]) {
        let mut n = Notify::default();
        if self.is_broken() {
            return;
        }
        let mut polled = lock(&self.polled);
        if *polled {
            // A kick that raced with the poller taking over: drain, leave notifications alone.
            drop(polled);
            self.drain(vrings, &mut n);
            return;
        }
        if self.set_notifications(vrings, false).is_err() {
            return;
        }
        loop {
            let found = self.drain(vrings, &mut n);
            if self.is_broken() {
                return;
            }
            if found && self.poller.enabled() {
                *polled = true;
                self.poller.activate(lock(&self.me).clone(), vrings);
                return;
            }
            match self.set_notifications(vrings, true) {
                Ok(false) | Err(()) => return,
                Ok(true) => {
                    if self.set_notifications(vrings, false).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

impl VhostUserBackend for FabricBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.fabric.limits().max_queue_size as usize
    }

    fn features(&self) -> u64 {
        // Indirect tables are walked (and bounded) by virtio-queue's chain iterator.
        bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VHOST_USER_F_PROTOCOL_FEATURES)
            | self.fabric.fabric_features()
    }

    fn acked_features(&self, features: u64) {
        info!(
            dev = self.dev,
            "features acked: {:?}",
            feature_names(features)
        );
        self.acked.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        let _work = self.control_lock();
        info!(dev = self.dev, "device reset");
        self.acked.store(0, Ordering::Release);
        let mut n = Notify::default();
        self.fabric.reset(self.dev, Teardown::Silent, &mut n);
    }

    fn set_event_idx(&self, enabled: bool) {
        debug!(dev = self.dev, enabled, "event idx");
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        if size > VHOST_USER_CONFIG_SIZE {
            return Vec::new();
        }
        let cfg = self.fabric.config_space(self.dev);
        let bytes = cfg.as_slice();
        let mut out = vec![0u8; size as usize];
        let off = offset as usize;
        if let Some(src) = bytes.get(off..) {
            let k = src.len().min(out.len());
            out[..k].copy_from_slice(&src[..k]);
        }
        out
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "virtio-fabric config space is read-only",
        ))
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        let _work = self.control_lock();
        if let Err(why) = check_backing(&mem.memory()) {
            // Touching a page past the end of a region's file would kill the whole daemon with
            // SIGBUS: refuse the table and drop this guest before anything uses it.
            warn!(dev = self.dev, "refusing guest memory: {why}");
            let mut n = Notify::default();
            self.fabric.reset(self.dev, Teardown::Silent, &mut n);
            n.flush();
            self.ring_error(0, &why);
            return Err(io::Error::new(io::ErrorKind::InvalidInput, why));
        }
        let new = region_keys(&mem.memory());
        let mut old = lock(&self.regions);
        let replaced = old.iter().any(|r| !new.contains(r));
        if replaced {
            warn!(
                dev = self.dev,
                "guest memory table changed: closing its endpoints and cancelling its requests"
            );
            let mut n = Notify::default();
            self.fabric.reset(self.dev, Teardown::Cancel, &mut n);
        }
        *old = new;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker for all queues of the device: it drains them all after any kick.
        vec![(1u64 << self.num_queues) - 1]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let ev = lock(&self.exit_event).take()?;
        *lock(&self.exit_fd) = Some(ev.0.as_raw_fd());
        Some(ev)
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let _work = self.control_lock();
        let mut n = Notify::default();
        if let Ok(q) = u16::try_from(queue_index) {
            self.fabric.stop_queue(self.dev, q, &mut n);
        }
        n.flush();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if device_event as usize >= self.num_queues {
            return Ok(());
        }
        self.sink.set_vrings(vrings);
        self.process(vrings);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
