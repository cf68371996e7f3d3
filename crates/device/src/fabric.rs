// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The shared local fabric: endpoints of every device of the daemon, matching, and the one copy
//! from a sender's guest memory into a receiver's.
//!
//! # Model
//!
//! Each destination endpoint has one queue of *unexpected* messages (arrival order; eager copies
//! and held sends alike) and one queue of *posted* receives (posting order). A send first looks
//! for a posted receive; otherwise it is buffered eagerly (≤ `eager_threshold`, no
//! DELIVERY_COMPLETE, and the destination device's eager bytes stay ≤ `max_unexpected_bytes`) and
//! completes at once, or it is *held*: the validated chain stays here and the data moves with one
//! copy when a receive matches. A receive first scans the unexpected queue, otherwise it is
//! posted. Because both sides always look at the other queue first, messages from one source
//! endpoint to one destination endpoint are received in arrival order.
//!
//! # Locking
//!
//! All matching state is under one mutex ([`Fabric::lock`]). Completions (guest memory writes and
//! `add_used`) happen under it, so a device cannot vanish half-way through one; guest
//! notifications ([`Notify::flush`]) happen after it is released. Lock order, never acquired in
//! the other direction:
//!
//! 1. the per-device processing lock (`FabricBackend::work`),
//! 2. the fabric lock,
//! 3. a sink's vring list (`VringSink::vrings`, read lock),
//! 4. one vring's state lock (`VringRwLock`), taken and released per `add_used` /
//!    `needs_notification`.
//!
//! A device thread pops chains under (1)+(4) without (2), parses them under (1) alone, then takes
//! (2). vhost-user-backend never calls into the backend while holding a vring lock, and the
//! memory of a device is a `GuestMemoryAtomic` (lock-free loads), so no cycle exists.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::debug;
use vfabric_proto::{
    bit, caps::key, comp_flags, ep_open, flags, tag_matches, CapValue, CapsBuilder, Completion,
    FabricAddr, FabricConfig, Opcode, Request, Status, COMPLETION_LEN, VENDOR_ID_VFABRIC,
    VIRTIO_FABRIC_F_ATOMIC, VIRTIO_FABRIC_F_MQ, VIRTIO_FABRIC_F_MSG,
    VIRTIO_FABRIC_F_REMOTE_CQ_DATA, VIRTIO_FABRIC_F_RMA, VIRTIO_FABRIC_F_TAGGED,
    VIRTIO_FABRIC_F_VENDOR_CAPS,
};
use vm_memory::{ByteValued, GuestAddressSpace, GuestMemoryAtomic};

use crate::chain::{completion, copy_stream, CopyFault, GuestMemoryMmap, Parsed, Req, Segs};
use crate::config::{Config, Limits, VendorAttr};
use crate::stats::Counters;

/// Where completions of one device go: its used rings.
pub(crate) trait CompletionSink: Send + Sync {
    /// Put chain `head` of virtqueue `queue` in the used ring with `len` bytes written.
    fn complete(&self, queue: u16, head: u16, len: u32);
    /// Signal the guest for queues completed since the last flush, as EVENT_IDX allows.
    fn flush(&self);
}

/// A connected device: its guest memory and its used rings.
#[derive(Clone)]
pub(crate) struct Port {
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    pub sink: Arc<dyn CompletionSink>,
}

/// Sinks that got completions and must be flushed once the fabric lock is released.
#[derive(Default)]
pub(crate) struct Notify {
    sinks: Vec<Arc<dyn CompletionSink>>,
}

impl Notify {
    pub fn touch(&mut self, s: &Arc<dyn CompletionSink>) {
        let p = Arc::as_ptr(s) as *const ();
        if !self
            .sinks
            .iter()
            .any(|x| std::ptr::eq(Arc::as_ptr(x) as *const (), p))
        {
            self.sinks.push(s.clone());
        }
    }

    pub fn flush(&mut self) {
        for s in self.sinks.drain(..) {
            s.flush();
        }
    }
}

impl Drop for Notify {
    fn drop(&mut self) {
        self.flush();
    }
}

/// How to tear down a device's or endpoint's in-flight chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Teardown {
    /// EP_CLOSE, memory table change: the device's own chains complete `Canceled`.
    Cancel,
    /// Disconnect, RESET_DEVICE: its rings are gone, its chains are forgotten.
    Silent,
}

/// What a receive matches on.
#[derive(Clone, Copy, Debug)]
struct Meta {
    src: FabricAddr,
    tagged: bool,
    tag: u64,
    cq_data: Option<u64>,
    len: u64,
    /// Writedata notification: bytes the RMA wrote (reported as `len`, no bytes placed).
    rma_len: Option<u64>,
}

enum Body {
    /// Copied into the device (counted against the destination's unexpected bytes).
    Eager(Vec<u8>),
    /// The sender's chain, completed when matched.
    Held(Req),
}

/// What is left of a transfer whose copy faulted on one side.
enum Survivor {
    None,
    /// The sender faulted: the receive is still to be matched.
    Recv(Req),
    /// The receiver faulted: the held send is still to be matched.
    Send(Req),
}

/// Outcome of delivering a queued message into a receive.
enum Delivered {
    Done,
    /// The receiver faulted: the message goes back into its queue.
    Requeue(Msg),
    /// The sender faulted: the receive is still to be matched.
    Rematch(Req),
}

struct Msg {
    meta: Meta,
    src_dev: usize,
    /// Cookie of the PEEK|CLAIM that reserved this message.
    claimed: Option<u64>,
    body: Body,
}

struct Endpoint {
    kind: u64,
    generation: u32,
    posted: VecDeque<Req>,
    unexpected: VecDeque<Msg>,
    /// TX requests deferred by FENCE (spec §6.12.2), in arrival order.
    fenced: VecDeque<Req>,
}

#[derive(Default)]
struct Slot {
    /// Generation of the last endpoint opened in this slot.
    generation: u32,
    ep: Option<Endpoint>,
}

struct Dev {
    port: Option<Port>,
    eps: Vec<Slot>,
    /// Eagerly buffered bytes queued at this device's endpoints, each message charged
    /// [`eager_cost`].
    unexpected_bytes: u64,
    /// Features the driver acked (updated on every batch of requests).
    acked: u64,
    /// Memory regions by key.
    mrs: HashMap<u64, rma::Mr>,
    /// Posted MR_EVENT requests.
    mr_events: VecDeque<Req>,
    /// Remote-access events not yet reported, coalesced (spec §6.10.4).
    pending_events: rma::PendingEvents,
}

/// Bytes charged per eagerly buffered message on top of its payload, so that even empty
/// messages are bounded by `max_unexpected_bytes`.
pub(crate) const EAGER_OVERHEAD: u64 = 64;

/// What an eager message of `len` bytes counts against `max_unexpected_bytes`.
pub(crate) const fn eager_cost(len: u64) -> u64 {
    len.saturating_add(EAGER_OVERHEAD)
}

struct Inner {
    devs: Vec<Dev>,
    /// Requests waiting in some endpoint's `fenced` queue.
    fenced_total: usize,
    /// Provider-key generator state.
    keys: rma::KeyGen,
}

/// Vendor attribute key (vendor `VENDOR_ID_VFABRIC`) carrying the configured virtio device id.
pub(crate) const VENDOR_KEY_VIRTIO_DEVICE_ID: u16 = 100;

/// Request flags this device honours (reported as `caps::key::FLAGS`).
pub(crate) const HONOURED_FLAGS: u64 = flags::REMOTE_CQ_DATA
    | flags::INJECT
    | flags::INJECT_COMPLETE
    | flags::TRANSMIT_COMPLETE
    | flags::DELIVERY_COMPLETE
    | flags::PEEK
    | flags::CLAIM
    | flags::DISCARD
    | flags::DIRECTED
    | flags::FENCE;

fn recv_matches(r: &Request, m: &Meta) -> bool {
    let tagged = r.opcode == Opcode::TRecv;
    tagged == m.tagged
        && (!tagged || tag_matches(r.tag, r.ignore, m.tag))
        && (r.flags & flags::DIRECTED == 0 || r.peer == m.src)
}

fn recv_completion(r: &Request, m: &Meta, placed: u64) -> Completion {
    let status = if placed < m.len {
        Status::Truncated
    } else {
        Status::Ok
    };
    let mut c = completion(status, r.cookie);
    let mut f = 0;
    if let Some(written) = m.rma_len {
        c.flags = (comp_flags::REMOTE_WRITE | comp_flags::REMOTE_CQ_DATA).into();
        c.data = m.cq_data.unwrap_or(0).into();
        c.len = written.into();
        c.src = m.src.to_wire();
        return c;
    }
    if r.opcode == Opcode::TRecv {
        f |= comp_flags::TAGGED;
    }
    if let Some(d) = m.cq_data {
        f |= comp_flags::REMOTE_CQ_DATA;
        c.data = d.into();
    }
    c.flags = f.into();
    c.len = placed.into();
    c.tag = m.tag.into();
    c.src = m.src.to_wire();
    c.olen = (m.len - placed).into();
    c
}

fn send_ok(r: &Request, len: u64) -> Completion {
    let mut c = completion(Status::Ok, r.cookie);
    c.len = len.into();
    c
}

/// The fabric shared by all devices of one daemon.
pub(crate) struct Fabric {
    limits: Limits,
    host_id: u32,
    device_id: u32,
    vendor_attrs: Vec<VendorAttr>,
    counters: Vec<Arc<Counters>>,
    inner: Mutex<Inner>,
}

impl Fabric {
    pub fn new(config: &Config) -> Self {
        let n = config.sockets.len();
        let devs = (0..n)
            .map(|_| Dev {
                port: None,
                eps: Vec::new(),
                unexpected_bytes: 0,
                acked: 0,
                mrs: HashMap::new(),
                mr_events: VecDeque::new(),
                pending_events: Default::default(),
            })
            .collect();
        Self {
            limits: config.limits.clone(),
            host_id: config.host_id,
            device_id: config.device_id,
            vendor_attrs: config.vendor_attrs.clone(),
            counters: (0..n).map(|_| Arc::new(Counters::default())).collect(),
            inner: Mutex::new(Inner {
                devs,
                fenced_total: 0,
                keys: rma::KeyGen::new(),
            }),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn counters(&self, dev: usize) -> Option<&Arc<Counters>> {
        self.counters.get(dev)
    }

    pub fn num_devices(&self) -> usize {
        self.counters.len()
    }

    pub fn node_addr(&self, dev: usize) -> u64 {
        FabricAddr::node_of(self.host_id, dev as u32)
    }

    /// Feature bits the device offers beyond the transport ones.
    pub fn fabric_features(&self) -> u64 {
        let mut f = bit(VIRTIO_FABRIC_F_MSG)
            | bit(VIRTIO_FABRIC_F_TAGGED)
            | bit(VIRTIO_FABRIC_F_VENDOR_CAPS)
            | bit(VIRTIO_FABRIC_F_REMOTE_CQ_DATA)
            | bit(VIRTIO_FABRIC_F_RMA)
            | bit(VIRTIO_FABRIC_F_ATOMIC);
        if self.limits.num_queue_pairs > 1 {
            f |= bit(VIRTIO_FABRIC_F_MQ);
        }
        f
    }

    /// Config space of device `dev`.
    pub fn config_space(&self, dev: usize) -> FabricConfig {
        let l = &self.limits;
        FabricConfig {
            num_queue_pairs: u32::from(l.num_queue_pairs).into(),
            max_endpoints: l.max_endpoints.into(),
            max_mrs: l.max_mrs.into(),
            max_queue_size: u32::from(l.max_queue_size).into(),
            max_msg_size: l.max_msg_size.into(),
            inject_size: l.inject_size.into(),
            vendor_id: VENDOR_ID_VFABRIC.into(),
            node_addr: self.node_addr(dev).into(),
            max_sge: l.max_sge.into(),
            reserved: 0.into(),
        }
    }

    /// QUERY_CAPS answer of device `dev` for a driver that acked `acked`.
    pub fn caps(&self, dev: usize, acked: u64) -> Vec<u8> {
        let l = &self.limits;
        let mut b = CapsBuilder::new();
        b.std_u64(key::MAX_MSG_SIZE, "max_msg_size", l.max_msg_size)
            .std_u64(key::INJECT_SIZE, "inject_size", l.inject_size.into())
            .std_u64(key::MAX_ENDPOINTS, "max_endpoints", l.max_endpoints.into())
            .std_u64(key::MAX_MRS, "max_mrs", l.max_mrs.into())
            .std_u64(
                key::MAX_UNEXPECTED_BYTES,
                "max_unexpected_bytes",
                l.max_unexpected_bytes,
            )
            .std_u64(key::EAGER_THRESHOLD, "eager_threshold", l.eager_threshold)
            .std_u64(
                key::MAX_QUEUE_SIZE,
                "max_queue_size",
                l.max_queue_size.into(),
            )
            .std_u64(
                key::NUM_QUEUE_PAIRS,
                "num_queue_pairs",
                l.num_queue_pairs.into(),
            )
            .std_u64(key::MAX_SGE, "max_sge", l.max_sge.into())
            .std_u64(key::CAPS, "caps", self.fabric_features())
            .std_u64(key::FLAGS, "flags", HONOURED_FLAGS)
            .std_u64(key::MSG_ORDER, "msg_order", 1)
            .std_u64(
                key::TAG_BITS,
                "tag_bits",
                if acked & bit(VIRTIO_FABRIC_F_TAGGED) != 0 {
                    64
                } else {
                    0
                },
            )
            .std_u64(
                key::MAX_RMA_SIZE,
                "max_rma_size",
                if acked & bit(VIRTIO_FABRIC_F_RMA) != 0 {
                    self.max_rma_size()
                } else {
                    0
                },
            )
            .std_u64(
                key::MR_KEY_SIZE,
                "mr_key_size",
                if acked & bit(VIRTIO_FABRIC_F_RMA) != 0 {
                    8
                } else {
                    0
                },
            )
            .std_u64(
                key::ATOMIC_OPS,
                "atomic_ops",
                if acked & bit(VIRTIO_FABRIC_F_ATOMIC) != 0 {
                    rma::ATOMIC_OPS
                } else {
                    0
                },
            )
            .std_u64(
                key::ATOMIC_TYPES,
                "atomic_types",
                if acked & bit(VIRTIO_FABRIC_F_ATOMIC) != 0 {
                    rma::ATOMIC_TYPES
                } else {
                    0
                },
            )
            .std_u64(
                key::MAX_ATOMIC_COUNT,
                "max_atomic_count",
                if acked & bit(VIRTIO_FABRIC_F_ATOMIC) != 0 {
                    rma::MAX_ATOMIC_COUNT.into()
                } else {
                    0
                },
            )
            .push(
                0,
                key::FABRIC_NAME,
                "fabric_name",
                CapValue::Str("vfabric".into()),
            )
            .push(
                0,
                key::DOMAIN_NAME,
                "domain_name",
                CapValue::Str(format!("vfabric{dev}")),
            )
            .std_u64(key::NODE_ADDR, "node_addr", self.node_addr(dev))
            .std_u64(
                key::MAX_CQ_DATA_SIZE,
                "max_cq_data_size",
                if acked & bit(VIRTIO_FABRIC_F_REMOTE_CQ_DATA) != 0 {
                    8
                } else {
                    0
                },
            )
            .std_u64(key::VENDOR_ID, "vendor_id", VENDOR_ID_VFABRIC.into())
            .push(
                0,
                key::DRIVER_VERSION,
                "driver_version",
                CapValue::Str(env!("CARGO_PKG_VERSION").into()),
            );
        if acked & bit(VIRTIO_FABRIC_F_VENDOR_CAPS) != 0 {
            for a in &self.vendor_attrs {
                b.push(a.vendor, a.key, &a.name, a.value.clone());
            }
            b.push(
                VENDOR_ID_VFABRIC,
                VENDOR_KEY_VIRTIO_DEVICE_ID,
                "virtio_device_id",
                CapValue::U64(self.device_id.into()),
            );
        }
        b.encode()
    }

    /// The fabric lock (see the module documentation for the lock order). Poisoning is ignored:
    /// the state is only mutated by code that does not panic.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attach a frontend's memory and rings to device `dev`.
    pub fn connect(&self, dev: usize, port: Port) {
        let mut g = self.lock();
        if let Some(d) = g.devs.get_mut(dev) {
            d.port = Some(port);
        }
        if let Some(c) = self.counters.get(dev) {
            c.connected
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The frontend of `dev` is gone: close its endpoints, forget its chains, complete peers'
    /// held sends to it `PeerGone`. Eager data it sent stays deliverable.
    pub fn disconnect(&self, dev: usize, n: &mut Notify) {
        let mut g = self.lock();
        let inner = &mut *g;
        if dev >= inner.devs.len() {
            return;
        }
        self.teardown(inner, dev, Teardown::Silent, n);
        inner.devs[dev].port = None;
        if let Some(c) = self.counters.get(dev) {
            c.connected
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Reset `dev` (RESET_DEVICE, memory table change) without detaching it.
    pub fn reset(&self, dev: usize, mode: Teardown, n: &mut Notify) {
        let mut g = self.lock();
        let inner = &mut *g;
        if dev >= inner.devs.len() {
            return;
        }
        self.teardown(inner, dev, mode, n);
    }

    fn teardown(&self, inner: &mut Inner, dev: usize, mode: Teardown, n: &mut Notify) {
        for ep in 0..inner.devs[dev].eps.len() {
            self.close_ep(inner, dev, ep, mode, n);
        }
        // The device's regions go with it: later accesses complete ACCESS at their initiator.
        let d = &mut inner.devs[dev];
        d.mrs.clear();
        d.pending_events.clear();
        let events: Vec<Req> = d.mr_events.drain(..).collect();
        if mode == Teardown::Cancel {
            if let Some(p) = d.port.clone() {
                for r in &events {
                    self.fail(dev, &p, r, Status::Canceled, n);
                }
            }
        }
    }

    /// Virtqueue `queue` of `dev` is being stopped (GET_VRING_BASE): its in-flight chains
    /// (posted receives, held sends) complete `Canceled` before the ring stops.
    pub fn stop_queue(&self, dev: usize, queue: u16, n: &mut Notify) {
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(port) = inner.devs.get(dev).and_then(|d| d.port.clone()) else {
            return;
        };
        let mut victims = Vec::new();
        for slot in inner.devs[dev].eps.iter_mut() {
            if let Some(e) = slot.ep.as_mut() {
                let (gone, keep): (VecDeque<Req>, VecDeque<Req>) =
                    e.posted.drain(..).partition(|r| r.queue == queue);
                e.posted = keep;
                victims.extend(gone);
                let (gone, keep): (VecDeque<Req>, VecDeque<Req>) =
                    e.fenced.drain(..).partition(|r| r.queue == queue);
                e.fenced = keep;
                inner.fenced_total = inner.fenced_total.saturating_sub(gone.len());
                victims.extend(gone);
            }
        }
        let d = &mut inner.devs[dev];
        let (gone, keep): (VecDeque<Req>, VecDeque<Req>) =
            d.mr_events.drain(..).partition(|r| r.queue == queue);
        d.mr_events = keep;
        victims.extend(gone);
        victims.extend(Self::take_held_all(inner, |m, r| {
            m.src_dev == dev && r.queue == queue
        }));
        for r in victims {
            let c = completion(Status::Canceled, r.req.cookie);
            self.done(dev, &port, &r, &c, 0, n);
        }
    }

    /// Process parsed chains of device `dev` whose driver acked `acked`.
    pub fn handle(&self, dev: usize, parsed: Vec<Parsed>, acked: u64, n: &mut Notify) {
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(port) = inner.devs.get(dev).and_then(|d| d.port.clone()) else {
            return;
        };
        inner.devs[dev].acked = acked;
        for p in parsed {
            match p {
                Parsed::Unusable { queue, head, why } => {
                    debug!(dev, queue, head, why, "chain returned with length 0");
                    if let Some(c) = self.counters.get(dev) {
                        Counters::inc(&c.bad_chains);
                    }
                    port.sink.complete(queue, head, 0);
                    n.touch(&port.sink);
                }
                Parsed::Reject {
                    queue,
                    head,
                    comp,
                    status,
                    cookie,
                } => {
                    debug!(dev, queue, head, ?status, "request rejected");
                    let c = completion(status, cookie);
                    self.finish(dev, &port, queue, head, &comp, &c, 0, n);
                }
                Parsed::Req(req) => self.dispatch(inner, dev, &port, req, acked, n),
            }
        }
        if inner.fenced_total > 0 {
            self.run_fenced(inner, n);
        }
    }

    /// Write completion `c` of a chain of `dev` and put the chain in its used ring.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        dev: usize,
        port: &Port,
        queue: u16,
        head: u16,
        comp: &Segs,
        c: &Completion,
        written: u64,
        n: &mut Notify,
    ) {
        let counters = self.counters.get(dev);
        let status = u32::from(c.status);
        let used = {
            let mem = port.mem.memory();
            match comp.write_at(&mem, 0, c.as_slice()) {
                Ok(()) => written
                    .saturating_add(COMPLETION_LEN as u64)
                    .min(u64::from(u32::MAX)) as u32,
                Err(_) => 0,
            }
        };
        if let Some(cn) = counters {
            cn.completion(status);
            if used == 0 || status == Status::BadChain as u32 {
                Counters::inc(&cn.bad_chains);
            }
        }
        port.sink.complete(queue, head, used);
        n.touch(&port.sink);
    }

    fn done(&self, dev: usize, port: &Port, r: &Req, c: &Completion, written: u64, n: &mut Notify) {
        self.finish(dev, port, r.queue, r.head, &r.comp, c, written, n);
    }

    fn fail(&self, dev: usize, port: &Port, r: &Req, status: Status, n: &mut Notify) {
        let c = completion(status, r.req.cookie);
        self.done(dev, port, r, &c, 0, n);
    }

    fn dispatch(
        &self,
        inner: &mut Inner,
        dev: usize,
        port: &Port,
        req: Req,
        acked: u64,
        n: &mut Notify,
    ) {
        match req.req.opcode {
            Opcode::QueryCaps => self.op_query_caps(dev, port, req, acked, n),
            Opcode::EpOpen => self.op_ep_open(inner, dev, port, req, n),
            Opcode::EpClose => self.op_ep_close(inner, dev, port, req, n),
            Opcode::Cancel => self.op_cancel(inner, dev, port, req, n),
            Opcode::AddrCheck => {
                let s = if self.lookup(inner, req.req.peer).is_some() {
                    Status::Ok
                } else {
                    Status::AddrNotAvail
                };
                self.fail(dev, port, &req, s, n);
            }
            Opcode::MrReg => self.op_mr_reg(inner, dev, port, req, n),
            Opcode::MrDereg => self.op_mr_dereg(inner, dev, port, req, n),
            Opcode::MrEvent => self.op_mr_event(inner, dev, port, req, n),
            Opcode::Recv | Opcode::TRecv => self.op_recv(inner, dev, port, req, n),
            Opcode::Send
            | Opcode::TSend
            | Opcode::RmaWrite
            | Opcode::RmaRead
            | Opcode::Atomic
            | Opcode::FetchAtomic
            | Opcode::CompareAtomic => self.op_tx(inner, dev, port, req, n),
            Opcode::Flush => self.fail(dev, port, &req, Status::Unsupported, n),
        }
    }

    /// A TX request: deferred if its endpoint has fenced requests waiting or it is itself
    /// fenced behind unfinished earlier requests (spec §6.12.2), otherwise started.
    fn op_tx(&self, inner: &mut Inner, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        let ep = req.req.ep;
        let waiting = inner
            .devs
            .get(dev)
            .and_then(|d| d.eps.get(ep as usize))
            .and_then(|s| s.ep.as_ref())
            .map(|e| !e.fenced.is_empty());
        let Some(waiting) = waiting else {
            return self.fail(dev, port, &req, Status::BadEndpoint, n);
        };
        if waiting || (req.req.flags & flags::FENCE != 0 && self.fence_blocked(inner, dev, &req)) {
            if let Some(e) = inner.devs[dev].eps[ep as usize].ep.as_mut() {
                e.fenced.push_back(req);
                inner.fenced_total += 1;
            }
            return;
        }
        self.start_tx(inner, dev, port, req, n);
    }

    fn start_tx(&self, inner: &mut Inner, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        match req.req.opcode {
            Opcode::Send | Opcode::TSend => self.op_send(inner, dev, port, req, n),
            Opcode::RmaWrite | Opcode::RmaRead => self.op_rma(inner, dev, port, req, n),
            _ => self.op_atomic(inner, dev, port, req, n),
        }
    }

    /// Whether a FENCE request of `dev` must wait: an earlier send of its endpoint to the same
    /// peer is still held, or (for DELIVERY_COMPLETE) still buffered unreceived at the peer.
    /// RMA and atomics complete synchronously, so only sends can be outstanding.
    fn fence_blocked(&self, inner: &Inner, dev: usize, req: &Req) -> bool {
        let r = &req.req;
        let Some(gen) = Self::ep_gen(inner, dev, r.ep) else {
            return false;
        };
        let me = FabricAddr::new(self.node_addr(dev), r.ep, gen);
        let Some((ddev, dep)) = self.lookup(inner, r.peer) else {
            return false;
        };
        let strong = r.flags & (flags::DELIVERY_COMPLETE | flags::COMMIT_COMPLETE) != 0;
        inner.devs[ddev].eps[dep].ep.as_ref().is_some_and(|e| {
            e.unexpected.iter().any(|m| {
                m.src_dev == dev && m.meta.src == me && (strong || matches!(m.body, Body::Held(_)))
            })
        })
    }

    /// Start deferred requests whose fence is satisfied now.
    fn run_fenced(&self, inner: &mut Inner, n: &mut Notify) {
        loop {
            let mut progressed = false;
            for dev in 0..inner.devs.len() {
                let Some(port) = inner.devs[dev].port.clone() else {
                    continue;
                };
                for ep in 0..inner.devs[dev].eps.len() {
                    loop {
                        let front = inner.devs[dev].eps[ep]
                            .ep
                            .as_ref()
                            .and_then(|e| e.fenced.front());
                        let Some(front) = front else { break };
                        if front.req.flags & flags::FENCE != 0
                            && self.fence_blocked(inner, dev, front)
                        {
                            break;
                        }
                        let Some(req) = inner.devs[dev].eps[ep]
                            .ep
                            .as_mut()
                            .and_then(|e| e.fenced.pop_front())
                        else {
                            break;
                        };
                        inner.fenced_total = inner.fenced_total.saturating_sub(1);
                        progressed = true;
                        self.start_tx(inner, dev, &port, req, n);
                    }
                }
            }
            if !progressed || inner.fenced_total == 0 {
                break;
            }
        }
    }

    fn op_query_caps(&self, dev: usize, port: &Port, req: Req, acked: u64, n: &mut Notify) {
        let caps = self.caps(dev, acked);
        let need = caps.len() as u64;
        let mut c = completion(Status::Ok, req.req.cookie);
        let mut written = 0;
        if req.data.len >= need {
            if req.data.write_at(&port.mem.memory(), 0, &caps).is_err() {
                return self.fail(dev, port, &req, Status::Fault, n);
            }
            c.len = need.into();
            written = need;
        } else {
            c.status = (Status::Truncated as u32).into();
            c.olen = need.into();
        }
        self.done(dev, port, &req, &c, written, n);
    }

    fn op_ep_open(&self, inner: &mut Inner, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        let kind = req.req.data;
        if !matches!(
            kind,
            ep_open::TYPE_RDM | ep_open::TYPE_DGRAM | ep_open::TYPE_MSG
        ) {
            return self.fail(dev, port, &req, Status::Invalid, n);
        }
        let node = self.node_addr(dev);
        let eps = &mut inner.devs[dev].eps;
        let id = match eps.iter().position(|s| s.ep.is_none()) {
            Some(id) => id,
            None if eps.len() < self.limits.max_endpoints as usize => {
                eps.push(Slot::default());
                eps.len() - 1
            }
            None => return self.fail(dev, port, &req, Status::NoResources, n),
        };
        let Some(slot) = eps.get_mut(id) else {
            return self.fail(dev, port, &req, Status::NoResources, n);
        };
        slot.generation = slot.generation.wrapping_add(1).max(1);
        slot.ep = Some(Endpoint {
            kind,
            generation: slot.generation,
            posted: VecDeque::new(),
            unexpected: VecDeque::new(),
            fenced: VecDeque::new(),
        });
        let addr = FabricAddr::new(node, id as u32, slot.generation);
        debug!(dev, %addr, kind, "endpoint opened");
        let mut c = completion(Status::Ok, req.req.cookie);
        c.data = (id as u64).into();
        c.src = addr.to_wire();
        self.done(dev, port, &req, &c, 0, n);
    }

    fn op_ep_close(&self, inner: &mut Inner, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        if Self::ep_gen(inner, dev, req.req.ep).is_none() {
            return self.fail(dev, port, &req, Status::BadEndpoint, n);
        }
        self.close_ep(inner, dev, req.req.ep as usize, Teardown::Cancel, n);
        self.fail(dev, port, &req, Status::Ok, n);
    }

    fn op_cancel(&self, inner: &mut Inner, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        let ep = req.req.ep;
        let cookie = req.req.data;
        let Some(generation) = Self::ep_gen(inner, dev, ep) else {
            return self.fail(dev, port, &req, Status::BadEndpoint, n);
        };
        let victim = inner.devs[dev].eps[ep as usize].ep.as_mut().and_then(|e| {
            let i = e.posted.iter().position(|r| r.req.cookie == cookie)?;
            e.posted.remove(i)
        });
        let victim = victim.or_else(|| {
            Self::take_held_all(inner, |m, r| {
                m.src_dev == dev
                    && m.meta.src.ep == ep
                    && m.meta.src.generation == generation
                    && r.req.cookie == cookie
            })
            .into_iter()
            .next()
        });
        match victim {
            Some(v) => {
                self.fail(dev, port, &v, Status::Canceled, n);
                self.fail(dev, port, &req, Status::Ok, n);
            }
            None => self.fail(dev, port, &req, Status::NoMessage, n),
        }
    }

    fn op_send(&self, inner: &mut Inner, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        let r = req.req;
        let Some(sgen) = Self::ep_gen(inner, dev, r.ep) else {
            return self.fail(dev, port, &req, Status::BadEndpoint, n);
        };
        let Some((ddev, dep)) = self.lookup(inner, r.peer) else {
            return self.fail(dev, port, &req, Status::AddrNotAvail, n);
        };
        let Some(dport) = inner.devs[ddev].port.clone() else {
            return self.fail(dev, port, &req, Status::AddrNotAvail, n);
        };
        let meta = Meta {
            src: FabricAddr::new(self.node_addr(dev), r.ep, sgen),
            tagged: r.opcode == Opcode::TSend,
            tag: r.tag,
            cq_data: (r.flags & flags::REMOTE_CQ_DATA != 0).then_some(r.data),
            len: req.payload.len,
            rma_len: None,
        };

        let skind = inner.devs[dev].eps[r.ep as usize]
            .ep
            .as_ref()
            .map_or(ep_open::TYPE_RDM, |e| e.kind);
        if skind == ep_open::TYPE_DGRAM && r.flags & flags::DELIVERY_COMPLETE != 0 {
            // A datagram is never "delivered" in the reliable sense (spec: DGRAM endpoints).
            return self.fail(dev, port, &req, Status::Invalid, n);
        }
        let Some(dst) = inner.devs[ddev].eps[dep].ep.as_mut() else {
            return self.fail(dev, port, &req, Status::AddrNotAvail, n);
        };
        if dst.kind != skind {
            // Reliable and datagram endpoints do not talk to each other.
            return self.fail(dev, port, &req, Status::AddrNotAvail, n);
        }
        let posted = dst
            .posted
            .iter()
            .position(|x| recv_matches(&x.req, &meta))
            .and_then(|i| Some((i, dst.posted.remove(i)?)));
        if let Some((at, rv)) = posted {
            match self.transfer(dev, port, req, &meta, ddev, &dport, rv, n) {
                Survivor::None => {}
                // Our memory faulted: the receive goes back where it was.
                Survivor::Recv(rv) => {
                    if let Some(dst) = inner.devs[ddev].eps[dep].ep.as_mut() {
                        dst.posted.insert(at.min(dst.posted.len()), rv);
                    }
                }
                // The receiver's memory faulted (its receive failed): match the next one.
                Survivor::Send(req) => self.op_send(inner, dev, port, req, n),
            }
            return;
        }
        if dst.kind == ep_open::TYPE_DGRAM {
            if let Some(c) = self.counters.get(ddev) {
                Counters::inc(&c.dgram_drops);
            }
            return self.sent(dev, port, &req, meta.len, n);
        }
        let eager = meta.len <= self.limits.eager_threshold
            && r.flags & flags::DELIVERY_COMPLETE == 0
            && inner.devs[ddev]
                .unexpected_bytes
                .saturating_add(eager_cost(meta.len))
                <= self.limits.max_unexpected_bytes;
        if !eager {
            let msg = Msg {
                meta,
                src_dev: dev,
                claimed: None,
                body: Body::Held(req),
            };
            if let Some(dst) = inner.devs[ddev].eps[dep].ep.as_mut() {
                dst.unexpected.push_back(msg);
            }
            return;
        }
        // len <= eager_threshold <= max_msg_size <= 1 GiB: fits in usize.
        let mut buf = vec![0u8; meta.len as usize];
        if req
            .payload
            .read_at(&port.mem.memory(), 0, &mut buf)
            .is_err()
        {
            return self.fail(dev, port, &req, Status::Fault, n);
        }
        inner.devs[ddev].unexpected_bytes += eager_cost(meta.len);
        let msg = Msg {
            meta,
            src_dev: dev,
            claimed: None,
            body: Body::Eager(buf),
        };
        if let Some(dst) = inner.devs[ddev].eps[dep].ep.as_mut() {
            dst.unexpected.push_back(msg);
        }
        self.sent(dev, port, &req, meta.len, n);
    }

    fn sent(&self, dev: usize, port: &Port, req: &Req, len: u64, n: &mut Notify) {
        if let Some(c) = self.counters.get(dev) {
            Counters::inc(&c.messages_sent);
        }
        self.done(dev, port, req, &send_ok(&req.req, len), 0, n);
    }

    /// Receive completion for a message placed in `rreq`'s buffer.
    fn received(
        &self,
        rdev: usize,
        rport: &Port,
        rreq: &Req,
        meta: &Meta,
        placed: u64,
        n: &mut Notify,
    ) {
        if let Some(c) = self.counters.get(rdev) {
            Counters::inc(&c.messages_received);
            Counters::add(&c.bytes_copied, placed);
        }
        let c = recv_completion(&rreq.req, meta, placed);
        self.done(rdev, rport, rreq, &c, placed, n);
    }

    /// The one copy: held send `sreq` of `sdev` into receive `rreq` of `rdev`; both complete.
    ///
    /// Guest ranges are resolved before any byte moves, so a fault copies nothing. Only the side
    /// whose memory faulted fails (with `Fault`); the other request is handed back so the caller
    /// can match it again: one guest's bad (or just replaced) memory table must never cost a
    /// well-behaved peer its request.
    #[allow(clippy::too_many_arguments)]
    fn transfer(
        &self,
        sdev: usize,
        sport: &Port,
        sreq: Req,
        meta: &Meta,
        rdev: usize,
        rport: &Port,
        rreq: Req,
        n: &mut Notify,
    ) -> Survivor {
        let placed = meta.len.min(rreq.data.len);
        let res = copy_stream(
            &sport.mem.memory(),
            &sreq.payload,
            &rport.mem.memory(),
            &rreq.data,
            placed,
        );
        match res {
            Ok(()) => {
                self.received(rdev, rport, &rreq, meta, placed, n);
                self.sent(sdev, sport, &sreq, meta.len, n);
                Survivor::None
            }
            Err(CopyFault::Src) => {
                debug!(sdev, rdev, "copy faulted in the sender's memory");
                self.fail(sdev, sport, &sreq, Status::Fault, n);
                Survivor::Recv(rreq)
            }
            Err(CopyFault::Dst) => {
                debug!(sdev, rdev, "copy faulted in the receiver's memory");
                self.fail(rdev, rport, &rreq, Status::Fault, n);
                Survivor::Send(sreq)
            }
        }
    }

    /// Deliver unexpected message `m` (queued at `rdev`) into receive `rreq`. On a copy fault
    /// the request of the side that did not fault comes back (see [`Fabric::transfer`]).
    fn deliver(
        &self,
        inner: &mut Inner,
        rdev: usize,
        rport: &Port,
        rreq: Req,
        m: Msg,
        n: &mut Notify,
    ) -> Delivered {
        match m.body {
            Body::Eager(buf) => {
                let placed = m.meta.len.min(rreq.data.len);
                let bytes = buf.get(..placed as usize).unwrap_or(&buf);
                if rreq.data.write_at(&rport.mem.memory(), 0, bytes).is_err() {
                    // The receiver's memory faulted: the message stays queued for the next one.
                    self.fail(rdev, rport, &rreq, Status::Fault, n);
                    return Delivered::Requeue(Msg {
                        body: Body::Eager(buf),
                        ..m
                    });
                }
                let d = &mut inner.devs[rdev];
                d.unexpected_bytes = d
                    .unexpected_bytes
                    .saturating_sub(eager_cost(buf.len() as u64));
                self.received(rdev, rport, &rreq, &m.meta, placed, n);
                Delivered::Done
            }
            Body::Held(sreq) => {
                let Some(sport) = inner.devs.get(m.src_dev).and_then(|d| d.port.clone()) else {
                    self.fail(rdev, rport, &rreq, Status::PeerGone, n);
                    return Delivered::Done;
                };
                match self.transfer(m.src_dev, &sport, sreq, &m.meta, rdev, rport, rreq, n) {
                    Survivor::None => Delivered::Done,
                    Survivor::Recv(rreq) => Delivered::Rematch(rreq),
                    Survivor::Send(sreq) => Delivered::Requeue(Msg {
                        body: Body::Held(sreq),
                        ..m
                    }),
                }
            }
        }
    }

    /// Drop message `m` queued at `qdev`; a held sender completes with `status`.
    fn release(&self, inner: &mut Inner, qdev: usize, m: Msg, status: Status, n: &mut Notify) {
        match m.body {
            Body::Eager(buf) => {
                let d = &mut inner.devs[qdev];
                d.unexpected_bytes = d
                    .unexpected_bytes
                    .saturating_sub(eager_cost(buf.len() as u64));
            }
            Body::Held(sreq) => {
                if let Some(sport) = inner.devs.get(m.src_dev).and_then(|d| d.port.clone()) {
                    if status == Status::Ok {
                        self.sent(m.src_dev, &sport, &sreq, m.meta.len, n);
                    } else {
                        self.fail(m.src_dev, &sport, &sreq, status, n);
                    }
                }
            }
        }
    }

    fn op_recv(&self, inner: &mut Inner, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        let r = req.req;
        if Self::ep_gen(inner, dev, r.ep).is_none() {
            return self.fail(dev, port, &req, Status::BadEndpoint, n);
        }
        let Some(ep) = inner.devs[dev].eps[r.ep as usize].ep.as_mut() else {
            return self.fail(dev, port, &req, Status::BadEndpoint, n);
        };

        if r.flags & flags::PEEK != 0 {
            let found = ep
                .unexpected
                .iter_mut()
                .find(|m| m.claimed.is_none() && recv_matches(&r, &m.meta));
            let Some(m) = found else {
                return self.fail(dev, port, &req, Status::NoMessage, n);
            };
            if r.flags & flags::CLAIM != 0 {
                m.claimed = Some(r.cookie);
            }
            let mut c = recv_completion(&r, &m.meta, m.meta.len);
            c.flags = (u32::from(c.flags) | comp_flags::CLAIMED).into();
            return self.done(dev, port, &req, &c, 0, n);
        }

        if r.flags & flags::CLAIM != 0 {
            let found = ep
                .unexpected
                .iter()
                .position(|m| m.claimed == Some(r.data))
                .and_then(|i| Some((i, ep.unexpected.remove(i)?)));
            let Some((at, m)) = found else {
                return self.fail(dev, port, &req, Status::NoMessage, n);
            };
            if r.flags & flags::DISCARD != 0 {
                let meta = m.meta;
                self.release(inner, dev, m, Status::Ok, n);
                let mut c = recv_completion(&r, &meta, 0);
                c.status = (Status::Ok as u32).into();
                c.olen = 0.into();
                c.flags = (u32::from(c.flags) | comp_flags::CLAIMED).into();
                return self.done(dev, port, &req, &c, 0, n);
            }
            match self.deliver(inner, dev, port, req, m, n) {
                Delivered::Done => {}
                Delivered::Requeue(m) => Self::requeue(inner, dev, r.ep, at, m),
                // The claimed message's sender faulted (and failed): nothing left to claim.
                Delivered::Rematch(req) => self.fail(dev, port, &req, Status::NoMessage, n),
            }
            return;
        }

        let found = ep
            .unexpected
            .iter()
            .position(|m| m.claimed.is_none() && recv_matches(&r, &m.meta))
            .and_then(|i| Some((i, ep.unexpected.remove(i)?)));
        match found {
            Some((at, m)) => match self.deliver(inner, dev, port, req, m, n) {
                Delivered::Done => {}
                Delivered::Requeue(m) => Self::requeue(inner, dev, r.ep, at, m),
                // The sender's memory faulted (its send failed): try the next message.
                Delivered::Rematch(req) => self.op_recv(inner, dev, port, req, n),
            },
            None => ep.posted.push_back(req),
        }
    }

    /// Put message `m` back at position `at` of endpoint `ep`'s unexpected queue.
    fn requeue(inner: &mut Inner, dev: usize, ep: u32, at: usize, m: Msg) {
        if let Some(e) = inner
            .devs
            .get_mut(dev)
            .and_then(|d| d.eps.get_mut(ep as usize))
            .and_then(|s| s.ep.as_mut())
        {
            e.unexpected.insert(at.min(e.unexpected.len()), m);
        }
    }

    /// Close endpoint `ep` of `dev`: its posted receives and its held sends leave the fabric
    /// (completing `Canceled` unless `Silent`), messages queued at it are dropped (held senders
    /// complete `PeerGone`).
    fn close_ep(&self, inner: &mut Inner, dev: usize, ep: usize, mode: Teardown, n: &mut Notify) {
        let Some(e) = inner.devs[dev].eps.get_mut(ep).and_then(|s| s.ep.take()) else {
            return;
        };
        debug!(dev, ep, generation = e.generation, ?mode, "endpoint closed");
        let port = inner.devs[dev].port.clone();
        inner.fenced_total = inner.fenced_total.saturating_sub(e.fenced.len());
        if mode == Teardown::Cancel {
            if let Some(p) = &port {
                for r in e.posted.iter().chain(e.fenced.iter()) {
                    self.fail(dev, p, r, Status::Canceled, n);
                }
            }
        }
        for m in e.unexpected {
            if m.src_dev == dev && mode == Teardown::Silent {
                if let Body::Eager(buf) = &m.body {
                    let d = &mut inner.devs[dev];
                    d.unexpected_bytes = d
                        .unexpected_bytes
                        .saturating_sub(eager_cost(buf.len() as u64));
                }
                continue;
            }
            self.release(inner, dev, m, Status::PeerGone, n);
        }
        let generation = e.generation;
        let held = Self::take_held_all(inner, |m, _| {
            m.src_dev == dev && m.meta.src.ep as usize == ep && m.meta.src.generation == generation
        });
        if mode == Teardown::Cancel {
            if let Some(p) = &port {
                for r in held {
                    self.fail(dev, p, &r, Status::Canceled, n);
                }
            }
        }
    }

    /// Remove every held send matching `pred` from every endpoint's unexpected queue.
    fn take_held_all(inner: &mut Inner, pred: impl Fn(&Msg, &Req) -> bool) -> Vec<Req> {
        let mut out = Vec::new();
        for d in inner.devs.iter_mut() {
            for slot in d.eps.iter_mut() {
                let Some(e) = slot.ep.as_mut() else { continue };
                let mut i = 0;
                while i < e.unexpected.len() {
                    let hit =
                        matches!(&e.unexpected[i].body, Body::Held(r) if pred(&e.unexpected[i], r));
                    if hit {
                        if let Some(Msg {
                            body: Body::Held(r),
                            ..
                        }) = e.unexpected.remove(i)
                        {
                            out.push(r);
                        }
                    } else {
                        i += 1;
                    }
                }
            }
        }
        out
    }

    fn ep_gen(inner: &Inner, dev: usize, ep: u32) -> Option<u32> {
        inner
            .devs
            .get(dev)?
            .eps
            .get(ep as usize)?
            .ep
            .as_ref()
            .map(|e| e.generation)
    }

    /// `(device, endpoint)` of an open endpoint address of a connected device.
    fn lookup(&self, inner: &Inner, a: FabricAddr) -> Option<(usize, usize)> {
        if a.host() != self.host_id {
            return None;
        }
        let d = a.device() as usize;
        let dv = inner.devs.get(d)?;
        dv.port.as_ref()?;
        let gen = Self::ep_gen(inner, d, a.ep)?;
        (gen == a.generation).then_some((d, a.ep as usize))
    }

    /// Eager bytes buffered at `dev` (tests).
    #[cfg(test)]
    pub fn unexpected_bytes(&self, dev: usize) -> u64 {
        self.lock().devs[dev].unexpected_bytes
    }
}

mod rma;
#[cfg(test)]
mod tests;
