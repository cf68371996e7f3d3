// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `FabricBackend`: the `VhostUserBackend` of one device connection.
//!
//! One backend exists per frontend connection (the serving loop re-creates it, like
//! vhost-device-template's `start_backend`). Its single vring worker thread wakes on a kick. With
//! polling it drains every queue and hands the device to its poller (notifications stay off
//! while the guest is busy; the poller re-arms them when it lets go). Without polling it serves
//! the kicked data queue alone and re-arms it in the same visit. Rings are read and written
//! through [`RingView`]s (`ring.rs`); parsed requests go to the shared [`Fabric`] in batches.

use parking_lot::{Mutex, MutexGuard};
use std::fmt::Display;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use tracing::{debug, error, info, warn};
use vfabric_proto::{
    bit, feature_names, queue_kind, QueueKind, VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_FABRIC_F_LAZY_RX, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VHOST_USER_CONFIG_SIZE};
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VringT};
use virtio_queue::QueueT;
use vm_memory::{
    ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::timerfd::TimerFd;

use crate::chain::{GuestMemoryMmap, ParseCtx, Req, RingError};
use crate::fabric::{CompletionSink, Fabric, Notify, Port, Teardown};
use crate::poller::{Polled, Poller};
use crate::ring::{avail_index, eventfd_signal, Ring, RingState, RingView, Vring};
use crate::stats::Counters;
use crate::xmem::PeerProcess;

/// Chains popped from one queue before they are handed to the fabric.
const BATCH: usize = 64;
/// How long RX rings stay quiet (LAZY_RX) before the device looks at them again.
const RX_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Virtqueue `q` is an RX queue.
fn is_rx(q: usize) -> bool {
    matches!(queue_kind(q as u16), QueueKind::Rx(_))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock()
}

/// The used rings of one connection: where the fabric puts completions.
pub(crate) struct VringSink {
    /// The rings vhost-user-backend handed over with the first event (the same for the whole
    /// connection): set once, read without a lock.
    /// Each with its fast-path state ([`Vring::ring`]; lock order: after the ring's
    /// `VringRwLock`).
    vrings: OnceLock<Vec<Vring>>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// A ring could not be written: it is corrupt.
    broken: AtomicBool,
    /// Wakes the device's vring worker to look at its RX rings ([`CompletionSink::wake_rx`]).
    wake: EventNotifier,
}

impl VringSink {
    fn new(mem: GuestMemoryAtomic<GuestMemoryMmap>, wake: EventNotifier) -> Self {
        Self {
            vrings: OnceLock::new(),
            mem,
            broken: AtomicBool::new(false),
            wake,
        }
    }

    #[inline]
    fn set_vrings(&self, vrings: &[Vring]) {
        if self.vrings.get().is_none() {
            self.keep_vrings(vrings);
        }
    }

    /// Once per connection: out of [`VringSink::set_vrings`]'s inlined check.
    #[cold]
    #[inline(never)]
    fn keep_vrings(&self, vrings: &[Vring]) {
        let _ = self.vrings.set(vrings.to_vec());
    }

    /// The rings (empty before the first event).
    fn rings_list(&self) -> &[Vring] {
        self.vrings.get().map_or(&[], Vec::as_slice)
    }

    /// Ring `q`'s state (none before the first event: no chain was popped, so no completion
    /// comes for it).
    #[inline]
    fn ring(&self, q: usize) -> Option<&Ring> {
        self.vrings.get()?.get(q).map(Vring::ring)
    }

    /// The memory table or the notification scheme changed: every ring's view is rebuilt.
    fn all_changed(&self) {
        for vr in self.rings_list() {
            vr.ring().changed();
        }
    }

    /// Run `f` on ring `q`'s next avail index and view, under the ring's `VringRwLock` (read)
    /// and its state's lock; `None` if the ring is not running.
    fn with_ring<R>(
        &self,
        vr: &Vring,
        mem: Option<&Arc<GuestMemoryMmap>>,
        f: impl FnOnce(u16, &RingView) -> R,
    ) -> Result<Option<R>, RingError> {
        let ring = vr.ring();
        let generation = ring.config();
        let st = vr.get_ref();
        if !st.is_enabled() || !st.get_queue().ready() {
            return Ok(None);
        }
        let mut rs = lock(&ring.state);
        let view = rs.view(ring, generation, &st, || {
            mem.cloned()
                .unwrap_or_else(|| self.mem.memory().into_inner())
        })?;
        // Read after the view: building it may have taken the index from the ring's `Queue`.
        Ok(Some(f(avail_index(ring.avail()), view)))
    }

    /// Ring `vr`'s avail word (index and epoch, see [`Ring::avail`]) for a pass, with `kept`
    /// holding the view to pop through: the view an earlier pass kept, while the ring's epoch
    /// and its configuration's generation ([`Ring::config`]: the frontend changed nothing of
    /// the ring nor the memory table) are unchanged, which takes no lock at all; else the
    /// ring's current view, read under its `VringRwLock` and its state's lock. `None` if the
    /// ring is not running.
    #[inline(always)]
    fn pass_view(
        &self,
        vr: &Vring,
        mem: &Arc<GuestMemoryMmap>,
        kept: &mut Option<KeptView>,
    ) -> Result<Option<u32>, RingError> {
        let ring = vr.ring();
        let generation = ring.config();
        let seen = ring.avail();
        if kept
            .as_ref()
            .is_some_and(|k| k.epoch == seen >> 16 && k.generation == generation)
        {
            return Ok(Some(seen));
        }
        self.pass_view_rebuilt(vr, generation, mem, kept)
    }

    /// [`Self::pass_view`] of a ring whose kept view is missing or stale.
    #[cold]
    #[inline(never)]
    fn pass_view_rebuilt(
        &self,
        vr: &Vring,
        generation: u64,
        mem: &Arc<GuestMemoryMmap>,
        kept: &mut Option<KeptView>,
    ) -> Result<Option<u32>, RingError> {
        *kept = None;
        let ring = vr.ring();
        let st = vr.get_ref();
        if !st.is_enabled() || !st.get_queue().ready() {
            return Ok(None);
        }
        let view = lock(&ring.state)
            .view(ring, generation, &st, || mem.clone())?
            .clone();
        let seen = ring.avail();
        *kept = Some(KeptView {
            view,
            epoch: seen >> 16,
            generation,
        });
        Ok(Some(seen))
    }

    /// The device was reset: every ring's next use re-reads its configuration and indices.
    fn forget_rings(&self) {
        for vr in self.rings_list() {
            let ring = vr.ring();
            ring.changed();
            lock(&ring.state).forget(ring);
        }
    }

    /// Ring `q` is stopping (GET_VRING_BASE): its configuration may change before it runs
    /// again, so the next use re-reads it.
    fn stop_ring(&self, q: usize) {
        if let Some(vr) = self.rings_list().get(q) {
            let ring = vr.ring();
            let mut st = vr.get_mut();
            lock(&ring.state).reset(ring, st.get_queue_mut());
        }
    }
}

impl VringSink {
    /// Signal the guest for ring `q` through its `VringRwLock` (the view's own eventfd could
    /// not be made).
    #[cold]
    #[inline(never)]
    fn signal_shared(&self, q: usize) {
        if let Some(vr) = self.rings_list().get(q) {
            if let Err(e) = signal_call(vr) {
                signal_failed(q, &e);
            }
        }
    }

    /// Signal the guest for ring `q` whose state `st` is, under its lock: a new call eventfd
    /// waits for that lock ([`Vring::set_call`]).
    #[inline(always)]
    fn signal(&self, q: usize, st: MutexGuard<'_, RingState>) {
        match st.signal() {
            Ok(true) => {}
            Ok(false) => {
                drop(st);
                self.signal_shared(q);
            }
            Err(e) => signal_failed(q, &e),
        }
    }

    /// [`CompletionSink::publish`] of ring `q` without a view of its current generation: the
    /// first completion after a (re)configuration builds it under the ring's `VringRwLock` (the
    /// completions stay staged meanwhile, ahead of any staged later). A change racing with
    /// the rebuild is retried; a ring whose configuration keeps changing under its
    /// completions, or cannot be read, has its completions dropped and breaks.
    #[cold]
    #[inline(never)]
    fn publish_rebuilt(&self, q: usize) {
        let Some(vr) = self.rings_list().get(q) else {
            return;
        };
        let ring = vr.ring();
        for _ in 0..4 {
            let generation = ring.config();
            let built = {
                let st = vr.get_ref();
                lock(&ring.state)
                    .view(ring, generation, &st, || self.mem.memory().into_inner())
                    .map(|_| ())
            };
            if let Err(e) = built {
                warn!(q, "used ring not writable: {e}");
                break;
            }
            let mut st = lock(&ring.state);
            match st.publish_staged(ring.config()) {
                Some(false) => return,
                Some(true) => return self.signal(q, st),
                None => continue,
            }
        }
        lock(&ring.state).drop_staged();
        self.broken.store(true, Ordering::Release)
    }

    /// After ring `q`'s staged completions were published (`notify`: whether to signal the
    /// guest), or could not be for want of a view of the current generation (`None`).
    #[inline(always)]
    fn published(&self, q: usize, st: MutexGuard<'_, RingState>, notify: Option<bool>) {
        match notify {
            Some(false) => {}
            Some(true) => self.signal(q, st),
            None => {
                drop(st);
                self.publish_rebuilt(q)
            }
        }
    }
}

impl VringSink {
    /// [`CompletionSink::stage_and_publish`] of ring `q` whose state's lock another thread
    /// holds.
    #[cold]
    #[inline(never)]
    fn stage_and_publish_waiting(&self, q: usize, head: u16, len: u32) {
        if let Some(ring) = self.ring(q) {
            let st = lock(&ring.state);
            self.stage_and_publish_locked(q, st, head, len);
        }
    }

    /// [`VringSink::signal`] of a view without a call eventfd of its own, or whose write
    /// failed (once more, then reported).
    #[cold]
    #[inline(never)]
    fn signal_other(&self, q: usize, st: MutexGuard<'_, RingState>) {
        self.signal(q, st)
    }

    /// [`CompletionSink::stage_and_publish`] of ring `q` under its state's lock (`st`), when
    /// it cannot be published alone.
    #[inline(never)]
    fn stage_and_publish_locked(
        &self,
        q: usize,
        mut st: MutexGuard<'_, RingState>,
        head: u16,
        len: u32,
    ) {
        let Some(ring) = self.ring(q) else {
            return;
        };
        let notify = st.stage_and_publish(head, len, ring.config());
        self.published(q, st, notify);
    }
}

impl CompletionSink for VringSink {
    #[inline]
    fn stage(&self, queue: u16, head: u16, len: u32) {
        match self.ring(usize::from(queue)) {
            Some(ring) => lock(&ring.state).stage(head, len),
            None => unknown_queue(queue),
        }
    }

    #[inline]
    fn publish(&self, queue: u16) {
        let q = usize::from(queue);
        let Some(ring) = self.ring(q) else {
            return;
        };
        // The fast path takes only the ring's state lock, and reads the generation under it
        // (see `Vring::set_call`).
        let mut st = lock(&ring.state);
        let notify = st.publish_staged(ring.config());
        self.published(q, st, notify);
    }

    /// The common case (the ring's lock free, nothing else staged, a view of the current
    /// generation, a call eventfd of the view's own) straight through, every call of a slower
    /// case in tail position: so the common case saves and restores few registers.
    #[inline]
    fn stage_and_publish(&self, queue: u16, head: u16, len: u32) {
        let q = usize::from(queue);
        let Some(ring) = self.ring(q) else {
            return unknown_queue(queue);
        };
        let Some(mut st) = ring.state.try_lock() else {
            return self.stage_and_publish_waiting(q, head, len);
        };
        match st.publish_alone(head, len, ring.config()) {
            Some(false) => {}
            Some(true) if st.signal_own() => {}
            Some(true) => self.signal_other(q, st),
            None => self.stage_and_publish_locked(q, st, head, len),
        }
    }

    fn wake_rx(&self) {
        // A full counter (EAGAIN) is a wake-up already pending.
        if let Err(e) = self.wake.notify() {
            if e.kind() != io::ErrorKind::WouldBlock {
                warn!("cannot wake the device for its RX rings: {e}");
            }
        }
    }
}

/// Out of the inlined [`VringSink::signal`], for the same reason as [`unknown_queue`].
#[cold]
#[inline(never)]
fn signal_failed(q: usize, e: &io::Error) {
    debug!(q, "cannot signal the guest: {e}");
}

/// A completion for a queue the device does not have: out of the inlined [`VringSink::stage`]
/// (whose frame it would otherwise widen).
#[cold]
#[inline(never)]
fn unknown_queue(queue: u16) {
    warn!(queue, "a completion for an unknown queue dropped");
}

/// `signal_used_queue` through [`eventfd_signal`].
fn signal_call(vr: &Vring) -> io::Result<()> {
    let st = vr.get_ref();
    match st.get_call() {
        // The eventfd stays open while we hold the ring's read lock (vhost-user-backend
        // replaces it under the write lock).
        Some(call) => eventfd_signal(call.as_raw_fd()),
        None => Ok(()),
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

/// What a pass keeps between passes, under the pass lock.
struct PassState {
    /// The guest memory table the last pass used, so passes skip the `GuestMemoryAtomic` load.
    /// vhost-user-backend swaps the table and then calls `update_memory`, which takes the pass
    /// lock and clears this; a pass in between still uses the table it had, as ring views do
    /// until their generation moves on (its mappings stay alive through the `Arc`).
    mem: Option<Arc<GuestMemoryMmap>>,
    /// This device's fabric port and the features it was last handed with ([`Fabric::begin`]
    /// runs again when they change). The port is the connection's for the backend's whole life
    /// (connected before the first ring runs, disconnected after the backend is retired).
    port: Option<(Arc<Port>, u64)>,
    /// The request each chain is parsed into and handed to the fabric from.
    slot: Req,
    /// What chains are parsed against, for the features the driver acked last (worked out
    /// again when they change).
    parse: Option<ParseCtx>,
    /// Per queue, the ring view the last pass popped through, so the next one takes no lock of
    /// the ring's state while it still applies ([`VringSink::pass_view`]). Dropped with `mem`
    /// on control-path changes, so no old table is kept mapped through it.
    views: Vec<Option<KeptView>>,
}

/// A ring view a pass keeps for the next pass over that ring.
struct KeptView {
    view: Arc<RingView>,
    /// The epoch of the ring's avail word it was taken under ([`Ring::avail`]).
    epoch: u32,
    /// The ring's configuration generation it was taken under ([`Ring::config`]).
    generation: u64,
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
    /// The poller owns this device's rings (notifications stay disabled until it lets go). An
    /// atomic, not a lock held across a drain: a kick that races with the poller just drains.
    polled: AtomicBool,
    /// A yield point of the poller found work on this device (see `Polled::take_nested_work`).
    nested_work: AtomicBool,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    sink: Arc<VringSink>,
    /// The frontend process (regions of its own memory); `None` without a socket path.
    process: Option<Arc<PeerProcess>>,
    acked: AtomicU64,
    /// Held during one pass over the queues (chains popped in a pass are handed to the fabric
    /// before it is released), and by control-path changes (stop, reset, memory table) that must
    /// not interleave with a pass. Lock order: first (see `fabric` module docs).
    work: Mutex<PassState>,
    /// Control operations waiting for `work`: the worker yields to them between passes.
    control_waiting: AtomicUsize,
    regions: Mutex<Vec<RegionKey>>,
    exit_event: Mutex<Option<(EventConsumer, EventNotifier)>>,
    /// The wake-up [`CompletionSink::wake_rx`] sends (registered with the vring worker's epoll
    /// as event [`FabricBackend::wake_event`]).
    wake: EventConsumer,
    /// Fires [`RX_CHECK`] after the RX rings went quiet (event `wake_event() + 1`).
    rx_check: Mutex<TimerFd>,
    rx_check_armed: AtomicBool,
    /// Raw fd of the exit consumer handed to vhost-user-backend (it leaks it; we close it).
    exit_fd: Mutex<Option<RawFd>>,
    /// The vring worker's epoll fd (-1 until the daemon hands it over), where a ring's kick is
    /// re-registered as one of our own events ([`FabricBackend::redirect_kick`]).
    worker_epoll: AtomicI32,
    shutdown: Mutex<Option<ShutdownHandle>>,
    broken: AtomicBool,
    /// Called once, when the first ring runs (see [`FabricBackend::on_ring_started`]).
    ring_started: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    any_ring_started: AtomicBool,
}

impl FabricBackend {
    pub fn new(
        dev: usize,
        fabric: Arc<Fabric>,
        poller: Arc<Poller>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        socket: Option<PathBuf>,
    ) -> io::Result<Arc<Self>> {
        let counters = fabric
            .counters(dev)
            .cloned()
            .ok_or_else(|| io::Error::other("device index out of range"))?;
        let exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        let (wake, wake_notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        let num_queues = fabric.limits().num_queues();
        let backend = Arc::new(Self {
            dev,
            num_queues,
            fabric,
            counters,
            poller,
            me: Mutex::new(Weak::new()),
            polled: AtomicBool::new(false),
            nested_work: AtomicBool::new(false),
            sink: Arc::new(VringSink::new(mem.clone(), wake_notifier)),
            wake,
            rx_check: Mutex::new(TimerFd::new()?),
            rx_check_armed: AtomicBool::new(false),
            process: socket.map(|s| Arc::new(PeerProcess::new(s, mem.clone()))),
            mem,
            acked: AtomicU64::new(0),
            work: Mutex::new(PassState {
                mem: None,
                port: None,
                slot: Req::blank(0, 0),
                parse: None,
                views: (0..num_queues).map(|_| None).collect(),
            }),
            control_waiting: AtomicUsize::new(0),
            regions: Mutex::new(Vec::new()),
            exit_event: Mutex::new(Some(exit)),
            exit_fd: Mutex::new(None),
            worker_epoll: AtomicI32::new(-1),
            shutdown: Mutex::new(None),
            broken: AtomicBool::new(false),
            ring_started: Mutex::new(None),
            any_ring_started: AtomicBool::new(false),
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
        Port::new(self.mem.clone(), self.sink.clone(), self.process.clone())
    }

    /// Run `f` once the frontend has a ring running (started and enabled: vhost-user-backend
    /// hands a ring to `handle_event` when SET_VRING_ENABLE, or the kick fd without protocol
    /// features, makes it run, and on every kick after). The daemon's handshake deadline ends
    /// there.
    pub fn on_ring_started(&self, f: Box<dyn FnOnce() + Send>) {
        *lock(&self.ring_started) = Some(f);
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

    /// The driver acked LAZY_RX: its plain receives may be taken without a notification.
    fn lazy_rx(&self) -> bool {
        self.acked() & bit(VIRTIO_FABRIC_F_LAZY_RX) != 0
    }

    /// Whether the RX rings get their notifications on now ([`Fabric::rx_needs_notify`]).
    /// Quiet rings are looked at again after [`RX_CHECK`]: a receive that completes by itself
    /// without the driver knowing (one directed at a source already closed) is not left
    /// untaken for good, and rings found empty then get their notifications back, so an idle
    /// device costs no periodic wake-ups.
    #[inline]
    fn rx_notify_decision(&self) -> bool {
        let on = self.fabric.rx_needs_notify(self.dev, false);
        if !on && !self.rx_check_armed.swap(true, Ordering::AcqRel) {
            return self.arm_rx_check();
        }
        on
    }

    /// Arm the RX check timer for rings just left quiet; returns the decision that then
    /// stands (on if the timer cannot be armed: without it the rings cannot stay quiet).
    #[cold]
    #[inline(never)]
    fn arm_rx_check(&self) -> bool {
        if let Err(e) = lock(&self.rx_check).reset(RX_CHECK, None) {
            warn!(dev = self.dev, "cannot arm the RX check timer: {e}");
            self.rx_check_armed.store(false, Ordering::Release);
            return self.fabric.rx_needs_notify(self.dev, true);
        }
        false
    }

    /// The RX check timer fired: take whatever the RX rings hold, or, if they hold nothing,
    /// turn their notifications back on (the device is idle on the receive side).
    fn rx_check(&self, vrings: &[Vring]) {
        let _ = lock(&self.rx_check).wait();
        self.rx_check_armed.store(false, Ordering::Release);
        let mem = self.mem.memory().into_inner();
        let rx_pending = vrings.iter().enumerate().any(|(q, vr)| {
            is_rx(q)
                && matches!(
                    self.sink.with_ring(vr, Some(&mem), |next_avail, view| {
                        view.avail_idx() != next_avail
                    }),
                    Ok(Some(true))
                )
        });
        if rx_pending {
            return self.process(vrings);
        }
        // Idle on the receive side: notifications back on (recorded first, so that nothing
        // queued unexpected meanwhile waits for a wake-up that is not sent).
        self.fabric.rx_needs_notify(self.dev, true);
        if self.set_notifications_by(vrings, |q| is_rx(q).then_some(true)) == Ok(true) {
            self.process(vrings);
        }
    }

    /// The fd of the RX wake-up, for the vring worker's epoll (event [`Self::wake_event`]).
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// The fd of the RX check timer, for the vring worker's epoll (event `wake_event() + 1`).
    pub fn rx_check_fd(&self) -> RawFd {
        lock(&self.rx_check).as_raw_fd()
    }

    /// The epoll event id of the RX wake-up: past the queues and the exit event.
    pub fn wake_event(&self) -> u64 {
        self.num_queues as u64 + 1
    }

    /// Hand over the vring worker's epoll fd (its only thread's: [`Self::queues_per_thread`]),
    /// so that kicks can be taken as our own events ([`Self::redirect_kick`]).
    pub fn set_worker_epoll(&self, fd: RawFd) {
        self.worker_epoll.store(fd, Ordering::Release);
    }

    /// The epoll event id ring `q`'s kick is re-registered under: past the RX wake-up and the
    /// RX check timer.
    fn kick_event(&self, q: usize) -> u64 {
        self.wake_event() + 2 + q as u64
    }

    /// The ring whose kick event `device_event` is, if it is one ([`Self::kick_event`]).
    fn kicked_ring(&self, device_event: u16) -> Option<usize> {
        let q = u64::from(device_event).checked_sub(self.kick_event(0))?;
        (q < self.num_queues as u64).then_some(q as usize)
    }

    /// Re-register ring `q`'s kick fd in the worker's epoll under [`Self::kick_event`] instead
    /// of the ring's index, edge-triggered. vhost-user-backend's worker registers each ring's
    /// kick level-triggered under the ring's index and, for such an event, consumes the kick (a
    /// read lock of the ring, then libc's cancellable `read` through `EventConsumer`) before
    /// calling `handle_event`; an event past its reserved range goes to `handle_event` as is.
    /// Edge-triggered, the kick needs no read at all: every write to an eventfd wakes its
    /// waiters, so each kick after the previous report is reported once more, whatever the
    /// counter holds (which no guest can overflow: 2^64 - 2 kicks). vhost-user-backend removes
    /// the fd by fd (`EPOLL_CTL_DEL`, whatever its event id) when it stops the ring or the
    /// frontend replaces the kick (closing the old fd removes it too), and registers the new one
    /// under the ring's index again, level-triggered: a count left in the fd then reports at
    /// once, is consumed by vhost-user-backend and comes back here. Best effort: if the fd is
    /// not registered (any more), the kick stays vhost-user-backend's.
    #[cold]
    fn redirect_kick(&self, vr: &Vring, q: usize) {
        let epfd = self.worker_epoll.load(Ordering::Acquire);
        if epfd < 0 {
            return;
        }
        // Under the ring's read lock: the fd cannot be replaced (and closed) meanwhile.
        let st = vr.get_ref();
        let Some(kick) = st.get_kick() else {
            return;
        };
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: self.kick_event(q),
        };
        // SAFETY: `epfd` is the worker's epoll (this runs on the worker, inside its loop, so it
        // is open) and `kick`'s fd is open while the read lock is held; `ev` is a valid event.
        let r = unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_MOD, kick.as_raw_fd(), &mut ev) };
        if r != 0 {
            debug!(
                dev = self.dev,
                q,
                "kick not re-registered: {}",
                io::Error::last_os_error()
            );
        }
    }

    /// EVENT_IDX is in use: disabling notifications is implicit (the driver kicks only when it
    /// passes `avail_event`), so the fast path never writes to disable them.
    fn event_idx(&self) -> bool {
        self.acked() & bit(VIRTIO_RING_F_EVENT_IDX) != 0
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
    fn work_lock(&self) -> MutexGuard<'_, PassState> {
        while self.control_waiting.load(Ordering::Acquire) > 0 {
            std::thread::yield_now();
        }
        lock(&self.work)
    }

    /// Take the processing lock for a control-path change (stop, reset, memory table).
    fn control_lock(&self) -> MutexGuard<'_, PassState> {
        self.control_waiting.fetch_add(1, Ordering::AcqRel);
        let g = lock(&self.work);
        self.control_waiting.fetch_sub(1, Ordering::AcqRel);
        g
    }

    /// One pass over every queue: pop a batch from each, parse it, hand it to the fabric.
    /// Returns `(found, more)`: whether any chain was found, and whether a queue may still hold
    /// some (a full batch, or control requests deferred behind data).
    ///
    /// The data queues go first and the control queue only once they are empty, so a control
    /// request never overtakes data requests posted before it (spec: EP_CLOSE and CANCEL act on
    /// everything the driver made available earlier, and a reopened endpoint id never inherits
    /// an old receive). The control queue's avail index is read before the data queues are
    /// checked, and only the chains it announced are popped: a data request the driver made
    /// available before a control request is seen before it.
    fn pass(&self, vrings: &[Vring], n: &mut Notify) -> (bool, bool) {
        self.pass_some(vrings, None, n)
    }

    /// [`Self::pass`] over every queue (`only` = `None`) or over data queue `only`, which is
    /// then also re-armed in the same visit once empty (the blocking fast path: notification
    /// on, re-checked, so `more` says whether requests arrived meanwhile).
    #[inline]
    fn pass_some(&self, vrings: &[Vring], only: Option<usize>, n: &mut Notify) -> (bool, bool) {
        let mut work = self.work_lock();
        self.pass_locked(&mut work, vrings, only, n)
    }

    /// [`Self::pass_some`] with the pass lock already held by the caller.
    fn pass_locked(
        &self,
        work: &mut PassState,
        vrings: &[Vring],
        only: Option<usize>,
        n: &mut Notify,
    ) -> (bool, bool) {
        match only {
            Some(q) => {
                // With LAZY_RX a kicked TX ring's pass takes its RX ring's receives first: the
                // guest's receives posted before its sends are then in place for the answers.
                // Without one, `usize::MAX` names no ring and is skipped as any index past the
                // rings is (an array steps more cheaply than a chain of two iterators).
                let rx = if self.lazy_rx() && matches!(queue_kind(q as u16), QueueKind::Tx(_)) {
                    q + 1
                } else {
                    usize::MAX
                };
                self.pass_rings(work, vrings, [rx, q].into_iter(), true, n)
            }
            // Data queues 1.. first, then the control queue.
            None => {
                let rings = (1..vrings.len()).chain(std::iter::once(0));
                self.pass_rings(work, vrings, rings, false, n)
            }
        }
    }

    /// [`Self::pass_locked`] over `rings` (queue indices, in order), re-arming each once empty
    /// if `rearm`. Monomorphic per order of rings, so that stepping through them costs next to
    /// nothing.
    fn pass_rings(
        &self,
        work: &mut PassState,
        vrings: &[Vring],
        rings: impl Iterator<Item = usize>,
        rearm: bool,
        n: &mut Notify,
    ) -> (bool, bool) {
        let (mut found, mut more) = (false, false);
        let PassState {
            mem,
            port,
            slot,
            parse,
            views,
        } = work;
        let mem: &Arc<GuestMemoryMmap> = mem.get_or_insert_with(|| self.mem.memory().into_inner());
        let acked = self.acked();
        let ctx = match parse {
            Some(ctx) if ctx.acked == acked => ctx,
            _ => parse.insert(ParseCtx::new(self.fabric.limits().clone(), acked)),
        };
        let lazy = self.lazy_rx();
        // Whether RX rings re-armed in this pass get their notifications on (asked once).
        let mut rx_on: Option<bool> = None;
        for q in rings {
            let (Some(vr), Some(kept)) = (vrings.get(q), views.get_mut(q)) else {
                continue;
            };
            let ring = vr.ring();
            if self.is_broken() {
                return (found, false);
            }
            let mut max = BATCH;
            if q == 0 {
                let announced = self.sink.with_ring(vr, Some(mem), |next_avail, view| {
                    view.avail_idx().wrapping_sub(next_avail)
                });
                let announced = match announced {
                    Ok(Some(k)) if k > 0 => k,
                    _ => continue,
                };
                if self.any_pending_in(vrings.get(1..).unwrap_or_default(), mem) {
                    // Data requests are still waiting: the next pass takes them first.
                    more = true;
                    continue;
                }
                max = max.min(usize::from(announced));
            }
            let seen = match self.sink.pass_view(vr, mem, kept) {
                Ok(Some(seen)) => seen,
                Ok(None) => continue,
                Err(e) => {
                    self.ring_error(q, &e);
                    return (found, false);
                }
            };
            let Some(KeptView { view, .. }) = kept.as_ref() else {
                continue;
            };
            let mut next_avail = avail_index(seen);
            // Each chain is parsed into the slot and handed to the fabric at once, without the
            // ring's lock (its completions take it): nothing is moved or batched per request.
            slot.queue = q as u16;
            let popped = view.pop(&mut next_avail, mem, max, ctx, slot, |slot, v| {
                if port.as_ref().is_none_or(|(_, a)| *a != acked) {
                    *port = self.fabric.begin(self.dev, acked).map(|p| (p, acked));
                }
                // Not connected (yet): the chain is dropped.
                if let Some((port, _)) = port {
                    self.fabric
                        .handle_one(self.dev, port, mem, slot, v, acked, n);
                }
            });
            let k = match popped {
                Ok(k) => k,
                Err(e) => {
                    self.ring_error(q, &e);
                    return (found, false);
                }
            };
            if k > 0 {
                self.fabric.end_batch(n);
            }
            ring.set_next_avail(seen, next_avail);
            let mut arm = rearm && k < max;
            if arm && lazy && is_rx(q) {
                arm = *rx_on.get_or_insert_with(|| self.rx_notify_decision());
            }
            let arrived = arm && view.set_notification(next_avail, true);
            more |= k == BATCH || arrived;
            found |= k > 0;
        }
        (found, more)
    }

    /// Pass over the queues until none may hold more. Returns whether any chain was found.
    /// Requests that arrive after a queue's turn are found by the caller's re-check (the
    /// notification re-arm in `process`, the next sweep of the poller).
    fn drain(&self, vrings: &[Vring], n: &mut Notify) -> bool {
        let mut found_any = false;
        loop {
            let (found, more) = self.pass(vrings, n);
            n.flush();
            found_any |= found;
            if self.sink.broken.load(Ordering::Acquire) {
                self.ring_error(0, &"used ring not writable");
            }
            if !more || self.is_broken() {
                return found_any;
            }
        }
    }

    /// Whether any of `vrings` has requests not popped yet. A ring that cannot be read counts
    /// as empty here; the pass that pops it reports it.
    fn any_pending_in(&self, vrings: &[Vring], mem: &Arc<GuestMemoryMmap>) -> bool {
        vrings.iter().any(|vr| {
            matches!(
                self.sink.with_ring(vr, Some(mem), |next_avail, view| {
                    view.avail_idx() != next_avail
                }),
                Ok(Some(true))
            )
        })
    }

    /// Turn every ring's notifications on, except the RX rings' while the device may take
    /// receives lazily (LAZY_RX, nothing held unexpected: [`Fabric::rx_needs_notify`]; the
    /// fabric wakes the device if that changes). Returns whether requests arrived meanwhile.
    fn arm(&self, vrings: &[Vring]) -> Result<bool, ()> {
        let quiet_rx = self.lazy_rx() && !self.rx_notify_decision();
        self.set_notifications_by(vrings, |q| Some(!(quiet_rx && is_rx(q))))
    }

    fn set_notifications(&self, vrings: &[Vring], enable: bool) -> Result<bool, ()> {
        self.set_notifications_by(vrings, |_| Some(enable))
    }

    /// Turn each ring's notifications on or off as `which(queue)` says (`None`: leave it).
    /// Returns whether requests arrived on a ring turned on; a ring that cannot be read breaks
    /// the connection (`Err`).
    fn set_notifications_by(
        &self,
        vrings: &[Vring],
        which: impl Fn(usize) -> Option<bool>,
    ) -> Result<bool, ()> {
        let mut more = false;
        for (q, vr) in vrings.iter().enumerate() {
            let Some(enable) = which(q) else {
                continue;
            };
            match self.sink.with_ring(vr, None, |next_avail, view| {
                view.set_notification(next_avail, enable)
            }) {
                Ok(m) => more |= m.unwrap_or(false),
                Err(e) => {
                    self.ring_error(q, &e);
                    return Err(());
                }
            }
        }
        Ok(more)
    }

    /// The fast path after a kick: drain, then hand the rings to the poller (notifications
    /// stay off while the guest is busy) or, without polling, re-enable notifications and
    /// re-check before sleeping.
    fn process(&self, vrings: &[Vring]) {
        // Requests for other hosts leave from this thread when the pass is over (no lock held).
        let _assist = self.fabric.assist_scope();
        let mut n = Notify::default();
        if self.is_broken() {
            return;
        }
        if self.polled.load(Ordering::Acquire) {
            // A kick that raced with the poller: drain, and leave notifications to the poller
            // if it still owns the device. If it parked the device meanwhile, its re-arm may
            // predate this drain (avail_event behind the requests just taken, so the guest's
            // next request would not kick): re-arm below, as for an ordinary kick.
            self.drain(vrings, &mut n);
            if self.polled.load(Ordering::Acquire) {
                return;
            }
        }
        if !self.event_idx() && self.set_notifications(vrings, false).is_err() {
            return;
        }
        loop {
            let found = self.drain(vrings, &mut n);
            if self.is_broken() {
                return;
            }
            if found && self.poller.enabled() {
                if self
                    .polled
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    let me: Weak<dyn Polled> = lock(&self.me).clone();
                    self.poller.activate(me);
                }
                return;
            }
            match self.arm(vrings) {
                Ok(false) | Err(()) => return,
                Ok(true) => {
                    if !self.event_idx() && self.set_notifications(vrings, false).is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Blocking mode (no poller), after a kick of data queue `q`: serve that queue alone and
    /// re-arm it in the same visit. Every queue has its own kick, so the other queues stay
    /// armed and report their own requests; the control queue (whose requests must not overtake
    /// earlier data requests) takes the all-queue path of [`Self::process`].
    fn process_queue(&self, vrings: &[Vring], q: usize) {
        let _assist = self.fabric.assist_scope();
        let mut n = Notify::default();
        loop {
            if self.is_broken() {
                return;
            }
            let (_, more) = self.pass_some(vrings, Some(q), &mut n);
            n.flush();
            if self.sink.broken.load(Ordering::Acquire) {
                self.ring_error(q, &"used ring not writable");
            }
            if !more {
                return;
            }
        }
    }

    /// The rings the vring worker handed us (empty before the first kick).
    fn vrings(&self) -> &[Vring] {
        self.sink.rings_list()
    }
}

impl Polled for FabricBackend {
    fn poll_once(&self) -> bool {
        // Dropped last: requests for other hosts leave once the pass is over.
        let _assist = self.fabric.assist_scope();
        let v = self.sink.rings_list();
        let mut n = Notify::default();
        self.drain(v, &mut n)
    }

    fn try_park(&self) -> bool {
        // Under the pass lock, so that a drain of a racing kick is wholly before the re-arm
        // (which then covers it) or wholly after `polled` is cleared (and re-arms itself).
        let _work = self.work_lock();
        let vrings = self.vrings();
        match self.arm(vrings) {
            Ok(true) if !self.is_broken() => {
                if self.event_idx() || self.set_notifications(vrings, false).is_ok() {
                    return false;
                }
                self.polled.store(false, Ordering::Release);
                true
            }
            _ => {
                self.polled.store(false, Ordering::Release);
                true
            }
        }
    }

    fn is_broken(&self) -> bool {
        FabricBackend::is_broken(self)
    }

    fn release_polled(&self) {
        self.polled.store(false, Ordering::Release);
    }

    fn poll_nested(&self) -> bool {
        if self.is_broken()
            || !self.polled.load(Ordering::Acquire)
            || self.control_waiting.load(Ordering::Acquire) > 0
        {
            return false;
        }
        // Never wait for the pass lock here: its holder may be waiting for the copy suspended
        // below us (an MR_DEREG waiting for an access to finish).
        let mut work = match self.work.try_lock() {
            Some(g) => g,
            None => return false,
        };
        let v = self.sink.rings_list();
        let mut n = Notify::default();
        let (found, _) = self.pass_locked(&mut work, v, None, &mut n);
        if found {
            self.nested_work.store(true, Ordering::Release);
        }
        found
    }

    fn take_nested_work(&self) -> bool {
        self.nested_work.swap(false, Ordering::AcqRel)
    }
}

impl VhostUserBackend for FabricBackend {
    type Bitmap = ();
    type Vring = Vring;

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
        let mut work = self.control_lock();
        work.views.fill_with(|| None);
        info!(dev = self.dev, "device reset");
        self.acked.store(0, Ordering::Release);
        let mut n = Notify::default();
        self.fabric.reset(self.dev, Teardown::Silent, &mut n);
        n.flush();
        // The rings are set up again (SET_VRING_ADDR, SET_VRING_BASE) before they run: the
        // indices the data path kept are stale.
        self.sink.forget_rings();
    }

    fn set_event_idx(&self, enabled: bool) {
        debug!(dev = self.dev, enabled, "event idx");
        // Ring views carry the notification scheme: rebuild them.
        self.sink.all_changed();
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
        let mut work = self.control_lock();
        // The next pass loads the new table (and the ring views of it).
        work.mem = None;
        work.views.fill_with(|| None);
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
        // Ring views of the old table are rebuilt on their next use.
        self.sink.all_changed();
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
        let mut work = self.control_lock();
        if let Some(kept) = work.views.get_mut(queue_index as usize) {
            *kept = None;
        }
        let mut n = Notify::default();
        if let Ok(q) = u16::try_from(queue_index) {
            self.fabric.stop_queue(self.dev, q, &mut n);
        }
        n.flush();
        self.sink.stop_ring(queue_index as usize);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        let q = if (device_event as usize) < self.num_queues {
            // A kick vhost-user-backend consumed (or a ring enabled): the next ones are ours.
            let q = usize::from(device_event);
            if let Some(vr) = vrings.get(q) {
                self.redirect_kick(vr, q);
            }
            q
        } else if let Some(q) = self.kicked_ring(device_event) {
            // A kick taken as our own event, edge-triggered: nothing to read. A disabled ring
            // is left alone by the pass (disabling it moved its generation on, and a view is
            // rebuilt only for an enabled ring).
            q
        } else {
            self.device_event(device_event, vrings);
            return Ok(());
        };
        if !self.any_ring_started.load(Ordering::Relaxed)
            && !self.any_ring_started.swap(true, Ordering::AcqRel)
        {
            if let Some(f) = lock(&self.ring_started).take() {
                f();
            }
        }
        self.sink.set_vrings(vrings);
        if q == 0 || self.poller.enabled() || self.polled.load(Ordering::Acquire) {
            self.process(vrings);
        } else {
            self.process_queue(vrings, q);
        }
        Ok(())
    }
}

impl FabricBackend {
    /// An event of the device's own other than a kick: the RX wake-up or the RX check timer.
    #[cold]
    fn device_event(&self, device_event: u16, vrings: &[Vring]) {
        if u64::from(device_event) == self.wake_event() {
            // The fabric queued a message unexpected while the RX rings were quiet.
            let _ = self.wake.consume();
            if self.any_ring_started.load(Ordering::Acquire) {
                self.sink.set_vrings(vrings);
                self.process(vrings);
            }
            self.fabric.rx_woken(self.dev);
        } else if u64::from(device_event) == self.wake_event() + 1 {
            // Armed only by a pass, so the rings have started.
            self.sink.set_vrings(vrings);
            self.rx_check(vrings);
        }
    }
}

#[cfg(test)]
mod tests;
