// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Endpoints: posting sends and receives (untagged and tagged) as request chains.
//!
//! Data placement, per request:
//! * payload ≤ 224 B: copied into the header descriptor (one readable descriptor);
//! * [`SharedBuf`] ranges and raw pointers inside the shared region: zero-copy descriptors;
//! * anything else: a bounce buffer from the region (sends copy in at post time, receives
//!   copy out at completion time; receives ≤ 192 B use the request slot instead).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use vfabric_proto::{self as proto, flags as pflags, FabricAddr, Opcode, ReqHeader, ADDR_LEN};

use crate::av::{AddressVector, AvShared, FiAddr, FI_ADDR_NOTAVAIL, FI_ADDR_UNSPEC};
use crate::cq::{CompletionQueue, CqShared};
use crate::domain::DomainInner;
use crate::hmem::HmemRegion;
use crate::memory::SharedBuf;
use crate::request::{
    BufRef, CopyOut, CqRef, DataOp, EpRef, Keepalive, OwnBorrowedOnDrop, Payload, PendingOp,
    PlainOp, Queue, Targets, Tx as TxData,
};
use crate::virtqueue::{DescList, RxData, INLINE_RX_MAX, INLINE_TX_MAX, MAX_DATA_DESCS};
use crate::{fi, Error, Result};

mod rma_ops;
pub use rma_ops::{AtomicMsg, RmaIov, RmaMsg};

/// Endpoint type (`fi_ep_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EpType {
    /// Reliable unconnected (`FI_EP_RDM`).
    #[default]
    Rdm,
    /// Unreliable datagram (`FI_EP_DGRAM`).
    Dgram,
    /// Connected (`FI_EP_MSG`): not implemented by the driver.
    Msg,
}

impl EpType {
    pub fn name(self) -> &'static str {
        match self {
            EpType::Rdm => "FI_EP_RDM",
            EpType::Dgram => "FI_EP_DGRAM",
            EpType::Msg => "FI_EP_MSG",
        }
    }
}

/// Endpoint attributes.
#[derive(Clone, Copy, Debug, Default)]
pub struct EpAttr {
    pub ep_type: EpType,
}

/// `fi_ep_bind` flags for a CQ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindFlags {
    /// Completions of sends (`FI_TRANSMIT`).
    pub transmit: bool,
    /// Completions of receives (`FI_RECV`).
    pub recv: bool,
    /// Only operations posted with `fi::COMPLETION` produce success entries
    /// (`FI_SELECTIVE_COMPLETION`); errors are always reported.
    pub selective_completion: bool,
}

impl BindFlags {
    pub const TRANSMIT: Self = Self {
        transmit: true,
        recv: false,
        selective_completion: false,
    };
    pub const RECV: Self = Self {
        transmit: false,
        recv: true,
        selective_completion: false,
    };
    pub const BOTH: Self = Self {
        transmit: true,
        recv: true,
        selective_completion: false,
    };
    /// From libfabric bits (`FI_TRANSMIT | FI_RECV | FI_SELECTIVE_COMPLETION`).
    pub fn from_fi(flags: u64) -> Self {
        Self {
            transmit: flags & fi::TRANSMIT != 0,
            recv: flags & fi::RECV != 0,
            selective_completion: flags & fi::SELECTIVE_COMPLETION != 0,
        }
    }
}

/// One element of a message's scatter/gather list.
#[derive(Clone)]
pub struct Iov<'a> {
    pub(crate) kind: IovKind<'a>,
}

#[derive(Clone)]
pub(crate) enum IovKind<'a> {
    Shared(&'a SharedBuf, Range<usize>),
    Bytes(&'a [u8]),
    Raw(*mut u8, usize),
    /// Device memory: staged through host memory by the domain's copy functions (`hmem.rs`)
    /// before any other code of the data path sees the operation.
    Hmem(&'a HmemRegion, Range<usize>),
}

impl std::fmt::Debug for Iov<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            IovKind::Shared(b, r) => write!(f, "Iov::Shared({:#x}, {r:?})", b.addr()),
            IovKind::Bytes(b) => write!(f, "Iov::Bytes({} B)", b.len()),
            IovKind::Raw(p, l) => write!(f, "Iov::Raw({p:?}, {l})"),
            IovKind::Hmem(h, r) => write!(f, "Iov::Hmem({h:?}, {r:?})"),
        }
    }
}

impl<'a> Iov<'a> {
    /// A range of a shared buffer (zero-copy).
    pub fn shared(buf: &'a SharedBuf, range: Range<usize>) -> Self {
        Self {
            kind: IovKind::Shared(buf, range),
        }
    }
    /// Bytes to send (copied at post time). Not valid for receives.
    pub fn bytes(b: &'a [u8]) -> Self {
        Self {
            kind: IovKind::Bytes(b),
        }
    }
    /// Caller memory (what the C provider passes). Zero-copy if it lies inside the domain's
    /// shared region, otherwise bounced.
    ///
    /// # Safety
    /// `ptr` must be valid for `len` bytes — readable for sends (until the post returns, or
    /// until completion if inside the shared region), writable and not otherwise accessed for
    /// receives until the operation completes or its endpoint is closed.
    pub unsafe fn raw(ptr: *mut u8, len: usize) -> Self {
        Self {
            kind: IovKind::Raw(ptr, len),
        }
    }
    /// A range of registered device memory ([`crate::hmem`]): every byte goes through the
    /// domain's [`HmemCopy`](crate::HmemCopy), sources at post time, destinations when the
    /// completion is read. Valid for sends, receives, RMA and atomics (see their `_iov` forms).
    pub fn hmem(region: &'a HmemRegion, range: Range<usize>) -> Self {
        Self {
            kind: IovKind::Hmem(region, range),
        }
    }
    pub fn len(&self) -> usize {
        match &self.kind {
            IovKind::Shared(_, r) | IovKind::Hmem(_, r) => r.len(),
            IovKind::Bytes(b) => b.len(),
            IovKind::Raw(_, l) => *l,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `fi_msg`.
#[derive(Clone, Debug)]
pub struct Msg<'a> {
    pub iov: &'a [Iov<'a>],
    /// Destination (sends) or source filter (receives; `FI_ADDR_UNSPEC` = any).
    pub addr: FiAddr,
    pub context: u64,
    /// Remote CQ data (sent with `fi::REMOTE_CQ_DATA`).
    pub data: u64,
}

/// `fi_msg_tagged`.
#[derive(Clone, Debug)]
pub struct TaggedMsg<'a> {
    pub iov: &'a [Iov<'a>],
    pub addr: FiAddr,
    pub tag: u64,
    pub ignore: u64,
    pub context: u64,
    pub data: u64,
}

/// State a request needs at completion time.
pub(crate) struct EpShared {
    pub id: u32,
    pub addr: FabricAddr,
    /// [`EP_CLOSED`] and [`EP_HAS_CNTRS`]: one word, so a completion looks at both with one
    /// load.
    state: AtomicU8,
    /// PEEK|CLAIM context -> cookie of the claimed message.
    claims: Mutex<HashMap<u64, u64>>,
    /// Bindings frozen by `enable` (CQs and AV the requests complete into).
    active: OnceLock<Bindings>,
    /// Counters bound with `fi::SEND`/`RECV`/`READ`/`WRITE` (see [`Endpoint::bind_cntr`]).
    cntrs: Mutex<Vec<(u64, Arc<crate::rma::CounterShared>)>>,
}

/// [`EpShared::state`]: the endpoint is closed (its outstanding operations are discarded).
pub(crate) const EP_CLOSED: u8 = 1;
/// [`EpShared::state`]: counters are bound (`cntrs` is not empty).
pub(crate) const EP_HAS_CNTRS: u8 = 2;

impl EpShared {
    /// An endpoint record with no bindings, for tests of what requests hold.
    #[cfg(test)]
    pub(crate) fn for_test() -> Arc<Self> {
        Arc::new(Self {
            id: 0,
            addr: FabricAddr::default(),
            state: AtomicU8::new(0),
            claims: Mutex::new(HashMap::new()),
            active: OnceLock::new(),
            cntrs: Mutex::new(Vec::new()),
        })
    }
    pub(crate) fn is_closed(&self) -> bool {
        self.state() & EP_CLOSED != 0
    }
    /// Mark the endpoint closed, as its drop does.
    #[cfg(test)]
    pub(crate) fn close_for_test(&self) {
        self.state.fetch_or(EP_CLOSED, Ordering::Release);
    }
    /// [`EP_CLOSED`] and [`EP_HAS_CNTRS`], as of one load.
    #[inline(always)]
    pub(crate) fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }
    /// Count a completion of an operation with libfabric flags `op_flags` in the bound
    /// counters.
    #[inline]
    pub(crate) fn count(&self, op_flags: u64, ok: bool) {
        if self.state() & EP_HAS_CNTRS != 0 {
            self.count_bound(op_flags, ok);
        }
    }
    /// [`EpShared::count`] once the state said counters are bound.
    pub(crate) fn count_bound(&self, op_flags: u64, ok: bool) {
        let kinds = fi::SEND | fi::RECV | fi::READ | fi::WRITE;
        for (f, c) in self.cntrs.lock().unwrap().iter() {
            if f & op_flags & kinds != 0 {
                c.inc(ok);
            }
        }
    }
    pub(crate) fn record_claim(&self, context: u64, cookie: u64) {
        self.claims.lock().unwrap().insert(context, cookie);
    }
    /// The AV index a completion reports for its source `addr`, of a request posted with the
    /// index `posted` (see [`AvShared::source_of`]).
    #[inline]
    pub(crate) fn source_addr(&self, posted: FiAddr, addr: &FabricAddr) -> FiAddr {
        match self.active.get().and_then(|b| b.av.as_ref()) {
            Some(av) => av.source_of(posted, addr),
            None => FI_ADDR_NOTAVAIL,
        }
    }
    /// The CQ bound for receives (`is_recv`) or transmits, once enabled.
    pub(crate) fn cq(&self, is_recv: bool) -> Option<&Arc<CqShared>> {
        let b = self.active.get()?;
        let dir = if is_recv { &b.rx } else { &b.tx };
        dir.as_ref().map(|(cq, _)| cq)
    }
}

#[derive(Clone, Default)]
pub(crate) struct Bindings {
    tx: Option<(Arc<CqShared>, bool)>,
    rx: Option<(Arc<CqShared>, bool)>,
    av: Option<Arc<AvShared>>,
}

/// An endpoint (`fid_ep`). `Send + Sync`; closed (EP_CLOSE) on drop, after which its pending
/// operations are discarded without completions.
pub struct Endpoint {
    domain: Arc<DomainInner>,
    shared: Arc<EpShared>,
    ep_type: EpType,
    tx_queue: usize,
    rx_queue: usize,
    binding: Mutex<Bindings>,
    limits: PostLimits,
}

/// Device limits every post checks, read once when the endpoint opens.
struct PostLimits {
    max_msg_size: u64,
    /// Longest message a post accepts: `max_msg_size`, and at most what a descriptor's
    /// 32-bit length holds (one comparison per post).
    max_msg_len: usize,
    inject_size: u64,
    /// Request flags the device reported (spec §5.1.4), or all but DIRECTED and MULTI_RECV.
    allowed_flags: u64,
    /// Capability classes the device reported (`None`: not reported).
    device_caps: Option<u64>,
    /// Data descriptors per chain and direction (`max_sge`, at most `MAX_DATA_DESCS`).
    max_data_descs: usize,
    /// Plain (flagless) SEND/RECV pass `check_request`: their class is reported (or no
    /// classes are).
    msg_ok: bool,
    /// Plain TSEND/TRECV pass `check_request`.
    tagged_ok: bool,
    /// A directed RECV (flag DIRECTED only) passes `check_request` (its answer, asked once).
    directed_recv_ok: bool,
    /// A plain receive must reach the device at once: under LAZY_RX the device takes plain
    /// receives only when a message needs one, and a DGRAM message finding none is dropped.
    plain_recv_urgent: bool,
    /// The device's `ATOMIC_OPS` and `ATOMIC_TYPES` capability masks (0 if not reported).
    atomic_ops: u64,
    atomic_types: u64,
}

impl PostLimits {
    /// Spec §3.2/§5.1.4/§6.9.9: may an endpoint of `ep_type` post `opcode` with `flags`?
    fn check_request(&self, opcode: Opcode, flags: u64, ep_type: EpType) -> Result<()> {
        let allowed = self.allowed_flags;
        if flags & !allowed != 0 {
            return Err(Error::Unsupported(format!(
                "request flags {:#x} are not reported by the device (FLAGS = {allowed:#x})",
                flags & !allowed
            )));
        }
        if let Some(caps) = self.device_caps {
            let class = opcode.required_feature();
            if caps & proto::bit(class) == 0 {
                return Err(Error::Unsupported(format!(
                    "{:?} needs capability class {class}, not reported by the device",
                    opcode
                )));
            }
            if flags & pflags::REMOTE_CQ_DATA != 0
                && caps & proto::bit(proto::VIRTIO_FABRIC_F_REMOTE_CQ_DATA) == 0
            {
                return Err(Error::Unsupported(
                    "remote CQ data not reported by the device".into(),
                ));
            }
        }
        if ep_type == EpType::Dgram
            && flags & (pflags::DELIVERY_COMPLETE | pflags::COMMIT_COMPLETE) != 0
        {
            return Err(Error::InvalidArgument(
                "DELIVERY_COMPLETE is defined for reliable endpoints only".into(),
            ));
        }
        Ok(())
    }
}

/// Standard (non-vendor) capability `key` as a number, 0 if the device did not report it.
fn std_cap(entries: &[proto::caps::CapEntry], key: u16) -> u64 {
    entries
        .iter()
        .find_map(|e| match (&e.value, e.vendor, e.key) {
            (proto::CapValue::U64(v), 0, k) if k == key => Some(*v),
            _ => None,
        })
        .unwrap_or(0)
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.shared.addr)
            .field("type", &self.ep_type)
            .field("enabled", &self.shared.active.get().is_some())
            .finish()
    }
}

/// Source of a send's payload.
enum SendSrc<'a> {
    Bytes(&'a [u8]),
    Shared(&'a SharedBuf, Range<usize>),
    Iov(&'a [Iov<'a>]),
}

/// Destination of a receive.
enum RecvDst<'a> {
    Shared(&'a SharedBuf, Range<usize>),
    Raw(*mut u8, usize),
    Vec(usize),
    Iov(&'a [Iov<'a>]),
}

struct SendArgs<'a> {
    tagged: bool,
    src: SendSrc<'a>,
    dest: FiAddr,
    tag: u64,
    data: Option<u64>,
    context: u64,
    flags: u64,
}

struct RecvArgs<'a> {
    tagged: bool,
    dst: RecvDst<'a>,
    src: FiAddr,
    tag: u64,
    ignore: u64,
    context: u64,
    flags: u64,
}

/// The header of a message request (SEND/TSEND/RECV/TRECV), built where it is written (the
/// request's slot): the fields a message uses, every other one zero.
#[inline(always)]
fn msg_header(
    opcode: Opcode,
    ep: u32,
    flags: u64,
    peer: FabricAddr,
    tag: u64,
    ignore: u64,
    data: u64,
) -> ReqHeader {
    ReqHeader {
        opcode: (opcode as u16).into(),
        ep: ep.into(),
        flags: flags.into(),
        peer: peer.to_wire(),
        tag: tag.into(),
        ignore: ignore.into(),
        data: data.into(),
        ..ReqHeader::default()
    }
}

#[inline]
fn check_range(buf: &SharedBuf, range: &Range<usize>) -> Result<()> {
    if range.start > range.end || range.end > buf.len() {
        return Err(range_outside(buf, range));
    }
    Ok(())
}

/// Out of line: the check is inlined into every post, the message never is.
#[cold]
fn range_outside(buf: &SharedBuf, range: &Range<usize>) -> Error {
    Error::InvalidArgument(format!(
        "range {range:?} outside a buffer of {} bytes",
        buf.len()
    ))
}

impl Endpoint {
    pub(crate) fn open(domain: Arc<DomainInner>, attr: EpAttr) -> Result<Self> {
        if domain.num_queue_pairs == 0 {
            return Err(Error::Unsupported("domain has no data queues".into()));
        }
        let code = crate::control::ep_type_code(attr.ep_type)?;
        let (id, addr) = domain.ep_open(code)?;
        let (tx_queue, rx_queue) = domain.queues_of_endpoint(id);
        // `tx_q`/`rx_q` rely on this (it holds: there is a queue pair for every `id % pairs`).
        if tx_queue.max(rx_queue) >= domain.queues.len() {
            let _ = domain.ep_close(id);
            return Err(Error::Transport(format!(
                "endpoint {id} maps to queues {tx_queue}/{rx_queue} of {}",
                domain.queues.len()
            )));
        }
        tracing::debug!(%addr, ?attr.ep_type, tx_queue, rx_queue, "endpoint open");
        let info = &domain.info().limits;
        let limits = PostLimits {
            max_msg_size: info.max_msg_size,
            max_msg_len: info.max_msg_size.min(u64::from(u32::MAX)) as usize,
            inject_size: info.inject_size,
            allowed_flags: info
                .request_flags
                .unwrap_or(pflags::ALL & !(pflags::DIRECTED | pflags::MULTI_RECV)),
            device_caps: info.device_caps,
            max_data_descs: (u32::from(domain.config.max_sge) as usize).clamp(1, MAX_DATA_DESCS),
            msg_ok: class_reported(info.device_caps, Opcode::Send),
            tagged_ok: class_reported(info.device_caps, Opcode::TSend),
            // Asked below, of these limits.
            directed_recv_ok: false,
            plain_recv_urgent: domain.has_feature(proto::VIRTIO_FABRIC_F_LAZY_RX)
                && attr.ep_type == EpType::Dgram,
            atomic_ops: std_cap(&domain.info().cap_entries, proto::caps::key::ATOMIC_OPS),
            atomic_types: std_cap(&domain.info().cap_entries, proto::caps::key::ATOMIC_TYPES),
        };
        let limits = PostLimits {
            directed_recv_ok: limits
                .check_request(Opcode::Recv, pflags::DIRECTED, attr.ep_type)
                .is_ok(),
            ..limits
        };
        Ok(Self {
            domain,
            shared: Arc::new(EpShared {
                id,
                addr,
                state: AtomicU8::new(0),
                claims: Mutex::new(HashMap::new()),
                active: OnceLock::new(),
                cntrs: Mutex::new(Vec::new()),
            }),
            ep_type: attr.ep_type,
            tx_queue,
            rx_queue,
            binding: Mutex::new(Bindings::default()),
            limits,
        })
    }

    /// `fi_getname`.
    pub fn name(&self) -> FabricAddr {
        self.shared.addr
    }

    /// `fi_getname` into a caller buffer: `Err(TooSmall { needed: 16 })` if `buf` is short.
    pub fn getname(&self, buf: &mut [u8]) -> Result<usize> {
        if buf.len() < ADDR_LEN {
            return Err(Error::TooSmall { needed: ADDR_LEN });
        }
        buf[..ADDR_LEN].copy_from_slice(&self.shared.addr.to_bytes());
        Ok(ADDR_LEN)
    }

    pub fn ep_type(&self) -> EpType {
        self.ep_type
    }

    /// Endpoint id on the device.
    pub fn id(&self) -> u32 {
        self.shared.id
    }

    /// SVC_BIND: bind `service` (0: any free one) of this host's service table to this
    /// endpoint until it closes; the service bound. `Err(Device(AddrInUse))` if another
    /// endpoint holds it (`-FI_EADDRINUSE`).
    pub fn bind_service(&self, service: u16) -> Result<u16> {
        self.domain.svc_bind(self.shared.id, service)
    }

    /// The endpoint's transmit queue.
    #[inline(always)]
    fn tx_q(&self) -> &Queue {
        // SAFETY: checked against the domain's queues at open; they never change.
        unsafe { self.domain.queues.get_unchecked(self.tx_queue) }
    }

    /// The endpoint's receive queue.
    #[inline(always)]
    fn rx_q(&self) -> &Queue {
        // SAFETY: as for `tx_q`.
        unsafe { self.domain.queues.get_unchecked(self.rx_queue) }
    }

    fn check_same_domain(&self, other: &Arc<DomainInner>) -> Result<()> {
        if !Arc::ptr_eq(&self.domain, other) {
            return Err(Error::InvalidArgument("object of another domain".into()));
        }
        Ok(())
    }

    fn bindings(&self) -> Result<std::sync::MutexGuard<'_, Bindings>> {
        if self.shared.active.get().is_some() {
            return Err(Error::BadState(
                "endpoint already enabled: bind before enable".into(),
            ));
        }
        Ok(self.binding.lock().unwrap())
    }

    /// `fi_ep_bind(cq, flags)`.
    pub fn bind_cq(&self, cq: &CompletionQueue, flags: BindFlags) -> Result<()> {
        self.check_same_domain(&cq.domain)?;
        if !flags.transmit && !flags.recv {
            return Err(Error::InvalidArgument(
                "bind_cq needs transmit and/or recv".into(),
            ));
        }
        let mut b = self.bindings()?;
        let entry = (cq.shared.clone(), flags.selective_completion);
        // Transmit operations complete on the TX queue, receives on the RX queue: a sleeper
        // on the CQ arms those. (A binding replaced later leaves its bit: an extra queue
        // armed costs a wakeup at most.)
        let mut feeders = 0;
        if flags.transmit {
            b.tx = Some(entry.clone());
            feeders |= crate::domain::queue_bit(self.tx_queue);
        }
        if flags.recv {
            b.rx = Some(entry);
            feeders |= crate::domain::queue_bit(self.rx_queue);
        }
        cq.shared.feeders.fetch_or(feeders, Ordering::Relaxed);
        Ok(())
    }

    /// `fi_ep_bind(av)`.
    /// `fi_ep_bind` of a counter. Flags: `fi::SEND`, `fi::RECV`, `fi::READ` (reads and
    /// fetching atomics), `fi::WRITE` (writes and atomics) count this endpoint's completions
    /// (errors in the error count); `fi::REMOTE_READ`, `fi::REMOTE_WRITE` count remote
    /// accesses targeting this endpoint to regions registered with `fi::RMA_EVENT`.
    pub fn bind_cntr(&self, cntr: &crate::rma::Counter, flags: u64) -> Result<()> {
        let all = fi::SEND | fi::RECV | fi::READ | fi::WRITE | fi::REMOTE_READ | fi::REMOTE_WRITE;
        if flags & !all != 0 || flags == 0 {
            return Err(Error::InvalidArgument(format!(
                "counter bind flags {flags:#x}"
            )));
        }
        let local = flags & (fi::SEND | fi::RECV | fi::READ | fi::WRITE);
        if local != 0 {
            self.shared
                .cntrs
                .lock()
                .unwrap()
                .push((local, cntr.shared.clone()));
            self.shared.state.fetch_or(EP_HAS_CNTRS, Ordering::Release);
        }
        self.domain
            .rma
            .bind_ep(self.shared.id, flags, cntr.shared.clone());
        Ok(())
    }

    pub fn bind_av(&self, av: &AddressVector) -> Result<()> {
        self.check_same_domain(&av.domain)?;
        self.bindings()?.av = Some(av.shared.clone());
        Ok(())
    }

    /// `fi_enable`: freeze the bindings; data operations are allowed from now on.
    pub fn enable(&self) -> Result<()> {
        let b = self.binding.lock().unwrap().clone();
        self.shared
            .active
            .set(b)
            .map_err(|_| Error::BadState("endpoint already enabled".into()))
    }

    fn active(&self) -> Result<&Bindings> {
        self.domain.check_usable()?;
        self.shared
            .active
            .get()
            .ok_or_else(|| Error::BadState("endpoint not enabled".into()))
    }

    fn resolve(b: &Bindings, fi_addr: FiAddr) -> Result<FabricAddr> {
        match &b.av {
            Some(av) => av.lookup(fi_addr),
            None => Err(Error::NoAv),
        }
    }

    // ------------------------------------------------------------------------------------
    // Sends
    // ------------------------------------------------------------------------------------

    /// `fi_send`: the bytes are copied at post time.
    pub fn send(&self, buf: &[u8], dest: FiAddr, context: u64) -> Result<()> {
        self.post_send(SendArgs {
            tagged: false,
            src: SendSrc::Bytes(buf),
            dest,
            tag: 0,
            data: None,
            context,
            flags: 0,
        })
    }

    /// `fi_send` from a shared buffer (zero-copy; keep the bytes unchanged until completion).
    pub fn send_buf(
        &self,
        buf: &SharedBuf,
        range: Range<usize>,
        dest: FiAddr,
        context: u64,
    ) -> Result<()> {
        let domain = &self.domain;
        let b = self.active()?;
        let (report_success, report_errors) = tx_reporting(b.tx.as_ref(), 0)?;
        let tx_cq = b.tx.as_ref().map(|(cq, _)| cq).filter(|_| report_success);
        let peer = Self::resolve(b, dest)?;
        check_range(buf, &range)?;
        let len = range.len();
        if len > INLINE_TX_MAX && !Arc::ptr_eq(buf.memory(), &domain.mem) {
            // Bounced: the general path.
            return self.post_send(SendArgs {
                tagged: false,
                src: SendSrc::Shared(buf, range),
                dest,
                tag: 0,
                data: None,
                context,
                flags: 0,
            });
        }
        // What `post_send_host` does for a plain send from a buffer of this domain (no flags,
        // no tag, no data), without the choices that cannot apply: the bytes are copied into
        // the header descriptor, or the buffer is the one data descriptor.
        let limits = &self.limits;
        if len > limits.max_msg_len {
            return Err(Error::TooLarge {
                len,
                max: limits.max_msg_size,
            });
        }
        self.check_request(Opcode::Send, 0)?;
        // Two posts, each of one shape known here (no choice between them made again inside).
        if len <= INLINE_TX_MAX {
            // SAFETY: as for `SendSrc::Shared` in `post_send_host`.
            let bytes = unsafe { &buf.as_slice()[range] };
            // The bytes are copied: nothing to keep alive.
            self.post_plain_send(
                peer,
                TxData::Inline(Payload::Bytes(bytes)),
                || None,
                context,
                (tx_cq, report_errors),
            )
        } else {
            let desc = [(buf.device_addr() + range.start as u64, len as u32)];
            // The device reads the buffer in place: it must outlive the request.
            self.post_plain_send(
                peer,
                TxData::Descs(&desc),
                // SAFETY: lent by `buf`, whose drop makes the record own it.
                || Some(unsafe { BufRef::new(buf.lend()) }),
                context,
                (tx_cq, report_errors),
            )
        }
    }

    /// Post a plain send (no flags, tag or data) of `tx`, checked by [`Endpoint::send_buf`].
    #[inline(always)]
    fn post_plain_send(
        &self,
        peer: FabricAddr,
        tx: TxData<'_>,
        keepalive: impl FnOnce() -> Option<BufRef>,
        context: u64,
        (cq, report_errors): (Option<&Arc<CqShared>>, bool),
    ) -> Result<()> {
        let ep = &self.shared;
        self.tx_q()
            .post(
                || msg_header(Opcode::Send, ep.id, 0, peer, 0, 0, 0),
                tx,
                RxData::None,
                false,
                false,
                #[inline(always)]
                || {
                    PendingOp::Plain(PlainOp {
                        // SAFETY: `Drop for Endpoint` makes the record own it first.
                        ep: unsafe { EpRef::new(ep) },
                        context,
                        fi_flags: fi::SEND | fi::MSG,
                        rx_len: 0,
                        src_addr: FI_ADDR_UNSPEC,
                        buf: keepalive(),
                        // SAFETY: a binding of the endpoint, frozen while it lives (as `ep`).
                        cq: cq.map(|cq| unsafe { CqRef::new(cq) }),
                        is_recv: false,
                        report_errors,
                    })
                },
            )
            .map(|_| ())
    }

    /// `fi_senddata`.
    pub fn senddata(&self, buf: &[u8], data: u64, dest: FiAddr, context: u64) -> Result<()> {
        self.post_send(SendArgs {
            tagged: false,
            src: SendSrc::Bytes(buf),
            dest,
            tag: 0,
            data: Some(data),
            context,
            flags: 0,
        })
    }

    /// `fi_inject`: copied now, no completion (≤ `inject_size` bytes).
    pub fn inject(&self, buf: &[u8], dest: FiAddr) -> Result<()> {
        self.post_send(SendArgs {
            tagged: false,
            src: SendSrc::Bytes(buf),
            dest,
            tag: 0,
            data: None,
            context: 0,
            flags: fi::INJECT | INJECT_CALL,
        })
    }

    /// `fi_injectdata`.
    pub fn injectdata(&self, buf: &[u8], data: u64, dest: FiAddr) -> Result<()> {
        self.post_send(SendArgs {
            tagged: false,
            src: SendSrc::Bytes(buf),
            dest,
            tag: 0,
            data: Some(data),
            context: 0,
            flags: fi::INJECT | INJECT_CALL,
        })
    }

    /// `fi_tsend`.
    pub fn tsend(&self, buf: &[u8], dest: FiAddr, tag: u64, context: u64) -> Result<()> {
        self.post_send(SendArgs {
            tagged: true,
            src: SendSrc::Bytes(buf),
            dest,
            tag,
            data: None,
            context,
            flags: 0,
        })
    }

    /// `fi_tsend` from a shared buffer (zero-copy).
    pub fn tsend_buf(
        &self,
        buf: &SharedBuf,
        range: Range<usize>,
        dest: FiAddr,
        tag: u64,
        context: u64,
    ) -> Result<()> {
        self.post_send(SendArgs {
            tagged: true,
            src: SendSrc::Shared(buf, range),
            dest,
            tag,
            data: None,
            context,
            flags: 0,
        })
    }

    /// `fi_tsenddata`.
    pub fn tsenddata(
        &self,
        buf: &[u8],
        data: u64,
        dest: FiAddr,
        tag: u64,
        context: u64,
    ) -> Result<()> {
        self.post_send(SendArgs {
            tagged: true,
            src: SendSrc::Bytes(buf),
            dest,
            tag,
            data: Some(data),
            context,
            flags: 0,
        })
    }

    /// `fi_tinject`.
    pub fn tinject(&self, buf: &[u8], dest: FiAddr, tag: u64) -> Result<()> {
        self.post_send(SendArgs {
            tagged: true,
            src: SendSrc::Bytes(buf),
            dest,
            tag,
            data: None,
            context: 0,
            flags: fi::INJECT | INJECT_CALL,
        })
    }

    /// `fi_tinjectdata`.
    pub fn tinjectdata(&self, buf: &[u8], data: u64, dest: FiAddr, tag: u64) -> Result<()> {
        self.post_send(SendArgs {
            tagged: true,
            src: SendSrc::Bytes(buf),
            dest,
            tag,
            data: Some(data),
            context: 0,
            flags: fi::INJECT | INJECT_CALL,
        })
    }

    /// `fi_sendmsg`. Flags: `fi::REMOTE_CQ_DATA` (send `msg.data`), `fi::INJECT`,
    /// `fi::INJECT_COMPLETE` | `fi::TRANSMIT_COMPLETE` | `fi::DELIVERY_COMPLETE`, `fi::FENCE`,
    /// `fi::COMPLETION`, `fi::MORE` (more posts follow: the device is not notified until a
    /// post without it).
    pub fn sendmsg(&self, msg: &Msg<'_>, flags: u64) -> Result<()> {
        self.post_send(SendArgs {
            tagged: false,
            src: SendSrc::Iov(msg.iov),
            dest: msg.addr,
            tag: 0,
            data: (flags & fi::REMOTE_CQ_DATA != 0).then_some(msg.data),
            context: msg.context,
            flags,
        })
    }

    /// `fi_tsendmsg` (flags as for [`Endpoint::sendmsg`]).
    pub fn tsendmsg(&self, msg: &TaggedMsg<'_>, flags: u64) -> Result<()> {
        self.post_send(SendArgs {
            tagged: true,
            src: SendSrc::Iov(msg.iov),
            dest: msg.addr,
            tag: msg.tag,
            data: (flags & fi::REMOTE_CQ_DATA != 0).then_some(msg.data),
            context: msg.context,
            flags,
        })
    }

    fn post_send(&self, a: SendArgs<'_>) -> Result<()> {
        // Device memory: gathered into host bytes through the domain's copy functions now,
        // then sent as bytes copied at post time (inject semantics hold).
        if let SendSrc::Iov(iov) = a.src {
            if crate::hmem::any(iov) {
                let staged = crate::hmem::gather(iov)?;
                return self.post_send_host(SendArgs {
                    src: SendSrc::Bytes(&staged),
                    ..a
                });
            }
        }
        self.post_send_host(a)
    }

    fn post_send_host(&self, a: SendArgs<'_>) -> Result<()> {
        let b = self.active()?;
        let domain = &self.domain;
        if a.tagged && !domain.has_feature(proto::VIRTIO_FABRIC_F_TAGGED) {
            return Err(Error::Unsupported("tagged messages (F_TAGGED)".into()));
        }
        if a.data.is_some() && !domain.has_feature(proto::VIRTIO_FABRIC_F_REMOTE_CQ_DATA) {
            return Err(Error::Unsupported(
                "remote CQ data (F_REMOTE_CQ_DATA)".into(),
            ));
        }
        let inject = a.flags & fi::INJECT != 0;
        let (report_success, report_errors) = tx_reporting(b.tx.as_ref(), a.flags)?;
        let peer = Self::resolve(b, a.dest)?;

        let len = match &a.src {
            SendSrc::Bytes(s) => s.len(),
            SendSrc::Shared(buf, r) => {
                check_range(buf, r)?;
                r.len()
            }
            SendSrc::Iov(iov) => {
                for v in iov.iter() {
                    if let IovKind::Shared(buf, r) = &v.kind {
                        check_range(buf, r)?;
                    }
                }
                iov.iter().map(|v| v.len()).sum()
            }
        };
        let limits = &self.limits;
        if len > limits.max_msg_len {
            return Err(Error::TooLarge {
                len,
                max: limits.max_msg_size,
            });
        }
        if inject && len as u64 > limits.inject_size {
            return Err(Error::InvalidArgument(format!(
                "inject of {len} bytes exceeds inject_size {}",
                limits.inject_size
            )));
        }

        let opcode = if a.tagged {
            Opcode::TSend
        } else {
            Opcode::Send
        };
        let mut flags = if a.flags & SEND_FLAG_MASK == 0 {
            0
        } else {
            send_flags(a.flags)?
        };
        let data = match a.data {
            Some(d) => {
                flags |= pflags::REMOTE_CQ_DATA;
                d
            }
            None => 0,
        };
        self.check_request(opcode, flags)?;

        let mem = &domain.mem;
        let mut keepalive = Keepalive::default();
        let mut bounce = None;
        let mut descs = DescList::new();
        let mut inline = Payload::Bytes(&[]);
        if len <= INLINE_TX_MAX {
            inline = match &a.src {
                SendSrc::Bytes(s) => Payload::Bytes(s),
                // SAFETY: read once while posting a send; the bytes of a buffer that is also
                // being written (received into) are undefined, as libfabric leaves them.
                SendSrc::Shared(buf, r) => Payload::Bytes(unsafe { &buf.as_slice()[r.clone()] }),
                SendSrc::Iov(iov) => Payload::Gather { prefix: &[], iov },
            };
        } else {
            match &a.src {
                SendSrc::Shared(buf, r) if Arc::ptr_eq(buf.memory(), mem) => {
                    descs.push(buf.device_addr() + r.start as u64, r.len() as u32)?;
                    keepalive.push(buf.keepalive());
                }
                SendSrc::Iov(iov)
                    if iov.len() <= limits.max_data_descs
                        && iov.iter().all(|v| self.zero_copy(v)) =>
                {
                    for v in iov.iter().filter(|v| !v.is_empty()) {
                        let (addr, l) = self.iov_device_region(v)?;
                        descs.push(addr, l as u32)?;
                        if let IovKind::Shared(buf, _) = &v.kind {
                            keepalive.push(buf.keepalive());
                        }
                    }
                }
                src => {
                    let bb = mem.alloc_bounce(len)?;
                    let mut off = 0;
                    let mut put = |s: &[u8]| {
                        bb.write_at(off, s);
                        off += s.len();
                    };
                    match src {
                        SendSrc::Bytes(s) => put(s),
                        // SAFETY: as for the inline case above.
                        SendSrc::Shared(buf, r) => put(unsafe { &buf.as_slice()[r.clone()] }),
                        SendSrc::Iov(iov) => iov.iter().for_each(|v| put(iov_bytes(v))),
                    }
                    descs.push(bb.device_addr(), len as u32)?;
                    bounce = Some(bb);
                }
            }
        }

        let tx = if len <= INLINE_TX_MAX {
            TxData::Inline(inline)
        } else {
            TxData::Descs(descs.as_slice())
        };
        let ep = &self.shared;
        self.tx_q()
            .post(
                || msg_header(opcode, ep.id, flags, peer, a.tag, 0, data),
                tx,
                RxData::None,
                a.flags & fi::MORE != 0,
                false,
                #[inline(always)]
                || {
                    DataOp {
                        ep: ep.clone(),
                        context: a.context,
                        fi_flags: fi::SEND | if a.tagged { fi::TAGGED } else { fi::MSG },
                        rx_len: 0,
                        src_addr: FI_ADDR_UNSPEC,
                        copy_out: CopyOut::None,
                        bounce,
                        _keepalive: keepalive,
                        hmem: None,
                        is_recv: false,
                        peek: false,
                        record_claim: false,
                        report_success,
                        report_errors,
                    }
                    .into_pending()
                },
            )
            .map(|_| ())
    }

    /// Spec §3.2/§5.1.4/§6.9.9: use only flags and operations the device reported.
    #[inline(always)]
    fn check_request(&self, opcode: Opcode, flags: u64) -> Result<()> {
        // A message request whose flags the device reports, and none of which needs a check
        // of its own (remote CQ data, completion levels), needs only its capability class:
        // precomputed. (The CLI's directed receives take this path.)
        const CHECKED_APART: u64 =
            pflags::REMOTE_CQ_DATA | pflags::DELIVERY_COMPLETE | pflags::COMMIT_COMPLETE;
        if flags & !self.limits.allowed_flags == 0 && flags & CHECKED_APART == 0 {
            let plain = match opcode {
                Opcode::Send | Opcode::Recv => Some(self.limits.msg_ok),
                Opcode::TSend | Opcode::TRecv => Some(self.limits.tagged_ok),
                _ => None,
            };
            if plain == Some(true) {
                return Ok(());
            }
        }
        self.check_request_full(opcode, flags)
    }

    fn check_request_full(&self, opcode: Opcode, flags: u64) -> Result<()> {
        self.limits.check_request(opcode, flags, self.ep_type)
    }

    fn max_data_descs(&self) -> usize {
        self.limits.max_data_descs
    }

    /// Device address and length of an iov the device reaches in place (see
    /// [`Endpoint::zero_copy`]).
    fn iov_device_region(&self, v: &Iov<'_>) -> Result<(u64, usize)> {
        match &v.kind {
            IovKind::Shared(buf, r) => Ok((buf.device_addr() + r.start as u64, r.len())),
            IovKind::Raw(p, l) => self
                .domain
                .device_addr(*p, *l)
                .map(|a| (a, *l))
                .ok_or_else(|| Error::InvalidArgument("buffer not reachable by the device".into())),
            IovKind::Bytes(_) => Err(Error::InvalidArgument(
                "Iov::bytes is never placed in place".into(),
            )),
            IovKind::Hmem(..) => Err(Error::InvalidArgument(
                "device memory is never reached by the device".into(),
            )),
        }
    }

    fn zero_copy(&self, v: &Iov<'_>) -> bool {
        match &v.kind {
            IovKind::Shared(buf, _) => Arc::ptr_eq(buf.memory(), &self.domain.mem),
            // In the shared region, or in application memory shared with the device earlier
            // (a local registration, `Domain::share_raw`): no bounce.
            IovKind::Raw(p, l) => self.domain.device_addr(*p, *l).is_some(),
            IovKind::Bytes(_) | IovKind::Hmem(..) => false,
        }
    }

    // ------------------------------------------------------------------------------------
    // Receives
    // ------------------------------------------------------------------------------------

    /// `fi_recv` into a shared buffer (zero-copy).
    pub fn recv_buf(&self, buf: &SharedBuf, range: Range<usize>, context: u64) -> Result<()> {
        self.recv_buf_from(buf, range, FI_ADDR_UNSPEC, context)
    }

    /// `fi_recv` into a shared buffer from `src` only (FI_DIRECTED_RECV; `FI_ADDR_UNSPEC` =
    /// any). Completes `PeerGone` if `src` closes or its device goes first.
    pub fn recv_buf_from(
        &self,
        buf: &SharedBuf,
        range: Range<usize>,
        src: FiAddr,
        context: u64,
    ) -> Result<()> {
        // What `post_recv` does for a plain receive (no flags, no tag) into a shared buffer,
        // with the same checks in the same order, without the choices that cannot apply.
        let b = self.active()?;
        let domain = &self.domain;
        let Some(rx_cq) = b.rx.as_ref() else {
            return Err(Error::NoCq);
        };
        let (flags, peer, passes) = if src != FI_ADDR_UNSPEC {
            let peer = Self::resolve(b, src)?;
            (pflags::DIRECTED, peer, self.limits.directed_recv_ok)
        } else {
            (0, FabricAddr::default(), self.limits.msg_ok)
        };
        // `check_request` with its answer for these two requests worked out at open.
        if !passes {
            self.check_request_full(Opcode::Recv, flags)?;
        }
        check_range(buf, &range)?;
        if !Arc::ptr_eq(buf.memory(), &domain.mem) {
            return Err(Error::InvalidArgument(
                "shared buffer of another domain".into(),
            ));
        }
        let rx_len = range.len();
        if rx_len > u32::MAX as usize {
            return Err(Error::InvalidArgument("receive buffer over 4 GiB".into()));
        }
        // Unless selective: a success is reported.
        let cq = (!rx_cq.1).then_some(&rx_cq.0);
        // Two posts, each of one shape known here (as for `send_buf`).
        if rx_len == 0 {
            let rx = RxData::None;
            self.post_plain_recv(buf, (flags, src, peer), rx, 0, context, cq)
        } else {
            let desc = [(buf.device_addr() + range.start as u64, rx_len as u32)];
            let rx = RxData::Descs(&desc);
            self.post_plain_recv(buf, (flags, src, peer), rx, rx_len, context, cq)
        }
    }

    /// Post a plain receive (no flags but DIRECTED, no tag) into `buf` from `src` (`peer` in
    /// the AV), checked by [`Endpoint::recv_buf_from`].
    #[inline(always)]
    fn post_plain_recv(
        &self,
        buf: &SharedBuf,
        (flags, src, peer): (u64, FiAddr, FabricAddr),
        rx: RxData<'_>,
        rx_len: usize,
        context: u64,
        cq: Option<&Arc<CqShared>>,
    ) -> Result<()> {
        let urgent = self.limits.plain_recv_urgent;
        let ep = &self.shared;
        self.rx_q()
            .post(
                || msg_header(Opcode::Recv, ep.id, flags, peer, 0, 0, 0),
                TxData::None,
                rx,
                false,
                urgent,
                #[inline(always)]
                || {
                    PendingOp::Plain(PlainOp {
                        // SAFETY: `Drop for Endpoint` makes the record own it first.
                        ep: unsafe { EpRef::new(ep) },
                        context,
                        fi_flags: fi::RECV | fi::MSG,
                        rx_len,
                        // The entry reports it (no look-up of the source at completion).
                        src_addr: src,
                        // SAFETY: lent by `buf`, whose drop makes the record own it.
                        buf: Some(unsafe { BufRef::new(buf.lend()) }),
                        // SAFETY: a binding of the endpoint, frozen while it lives (as `ep`).
                        cq: cq.map(|cq| unsafe { CqRef::new(cq) }),
                        is_recv: true,
                        report_errors: true,
                    })
                },
            )
            .map(|_| ())
    }

    /// `fi_recv` into caller memory: zero-copy if inside the shared region, otherwise bounced
    /// and copied out when the receive completes. This is what the C provider uses.
    ///
    /// # Safety
    /// `ptr` must stay valid for writes of `len` bytes, and not be accessed otherwise, until
    /// the receive completes (its CQ entry is read) or the endpoint is dropped.
    pub unsafe fn recv_raw(&self, ptr: *mut u8, len: usize, context: u64) -> Result<()> {
        self.post_recv(RecvArgs {
            tagged: false,
            dst: RecvDst::Raw(ptr, len),
            src: FI_ADDR_UNSPEC,
            tag: 0,
            ignore: 0,
            context,
            flags: 0,
        })
    }

    /// Receive up to `len` bytes; the CQ entry carries them in `buf`.
    pub fn recv_vec(&self, len: usize, context: u64) -> Result<()> {
        self.recv_vec_from(len, FI_ADDR_UNSPEC, context)
    }

    /// [`Endpoint::recv_vec`] from `src` only (see [`Endpoint::recv_buf_from`]).
    pub fn recv_vec_from(&self, len: usize, src: FiAddr, context: u64) -> Result<()> {
        self.post_recv(RecvArgs {
            tagged: false,
            dst: RecvDst::Vec(len),
            src,
            tag: 0,
            ignore: 0,
            context,
            flags: 0,
        })
    }

    /// `fi_trecv` into a shared buffer.
    pub fn trecv_buf(
        &self,
        buf: &SharedBuf,
        range: Range<usize>,
        tag: u64,
        ignore: u64,
        context: u64,
    ) -> Result<()> {
        self.post_recv(RecvArgs {
            tagged: true,
            dst: RecvDst::Shared(buf, range),
            src: FI_ADDR_UNSPEC,
            tag,
            ignore,
            context,
            flags: 0,
        })
    }

    /// `fi_trecv` into caller memory.
    ///
    /// # Safety
    /// As for [`Endpoint::recv_raw`].
    pub unsafe fn trecv_raw(
        &self,
        ptr: *mut u8,
        len: usize,
        tag: u64,
        ignore: u64,
        context: u64,
    ) -> Result<()> {
        self.post_recv(RecvArgs {
            tagged: true,
            dst: RecvDst::Raw(ptr, len),
            src: FI_ADDR_UNSPEC,
            tag,
            ignore,
            context,
            flags: 0,
        })
    }

    /// Tagged receive of up to `len` bytes returned in the CQ entry.
    pub fn trecv_vec(&self, len: usize, tag: u64, ignore: u64, context: u64) -> Result<()> {
        self.post_recv(RecvArgs {
            tagged: true,
            dst: RecvDst::Vec(len),
            src: FI_ADDR_UNSPEC,
            tag,
            ignore,
            context,
            flags: 0,
        })
    }

    /// `fi_recvmsg`. `msg.addr` other than `FI_ADDR_UNSPEC` receives only from that source
    /// (FI_DIRECTED_RECV). Flags: `fi::COMPLETION`, `fi::MORE`; `fi::MULTI_RECV` is not
    /// supported.
    pub fn recvmsg(&self, msg: &Msg<'_>, flags: u64) -> Result<()> {
        self.post_recv(RecvArgs {
            tagged: false,
            dst: RecvDst::Iov(msg.iov),
            src: msg.addr,
            tag: 0,
            ignore: 0,
            context: msg.context,
            flags,
        })
    }

    /// `fi_trecvmsg`. Flags: `fi::PEEK` (report a matching message without receiving it;
    /// `Status::NoMessage`/`ENOMSG` error entry if none), `fi::PEEK | fi::CLAIM` (also reserve
    /// it for this `context`), `fi::CLAIM` (receive the message claimed with this `context`),
    /// `fi::CLAIM | fi::DISCARD` (drop it), `fi::COMPLETION`.
    pub fn trecvmsg(&self, msg: &TaggedMsg<'_>, flags: u64) -> Result<()> {
        self.post_recv(RecvArgs {
            tagged: true,
            dst: RecvDst::Iov(msg.iov),
            src: msg.addr,
            tag: msg.tag,
            ignore: msg.ignore,
            context: msg.context,
            flags,
        })
    }

    /// Tagged receive with flags into a `Vec` (convenience for PEEK/CLAIM flows).
    pub fn trecvmsg_vec(
        &self,
        len: usize,
        src: FiAddr,
        tag: u64,
        ignore: u64,
        context: u64,
        flags: u64,
    ) -> Result<()> {
        self.post_recv(RecvArgs {
            tagged: true,
            dst: RecvDst::Vec(len),
            src,
            tag,
            ignore,
            context,
            flags,
        })
    }

    fn post_recv(&self, a: RecvArgs<'_>) -> Result<()> {
        let b = self.active()?;
        let domain = &self.domain;
        if a.tagged && !domain.has_feature(proto::VIRTIO_FABRIC_F_TAGGED) {
            return Err(Error::Unsupported("tagged messages (F_TAGGED)".into()));
        }
        let Some(rx_cq) = b.rx.as_ref() else {
            return Err(Error::NoCq);
        };
        if a.flags & fi::MULTI_RECV != 0 {
            return Err(Error::Unsupported("FI_MULTI_RECV".into()));
        }
        let peek = a.flags & fi::PEEK != 0;
        let claim = a.flags & fi::CLAIM != 0;
        let discard = a.flags & fi::DISCARD != 0;
        if !a.tagged && (peek || claim || discard) {
            return Err(Error::InvalidArgument(
                "PEEK/CLAIM/DISCARD need a tagged receive".into(),
            ));
        }
        if discard && !claim && !peek {
            return Err(Error::InvalidArgument("DISCARD needs CLAIM or PEEK".into()));
        }

        let opcode = if a.tagged {
            Opcode::TRecv
        } else {
            Opcode::Recv
        };
        let mut flags = 0;
        let mut peer = FabricAddr::default();
        if a.src != FI_ADDR_UNSPEC {
            peer = Self::resolve(b, a.src)?;
            flags |= pflags::DIRECTED;
        }
        if peek {
            flags |= pflags::PEEK;
        }
        if claim {
            flags |= pflags::CLAIM;
        }
        if discard {
            flags |= pflags::DISCARD;
        }
        let mut data = 0;
        if claim && !peek {
            let cookie = self
                .shared
                .claims
                .lock()
                .unwrap()
                .remove(&a.context)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "no message was claimed with context {:#x}",
                        a.context
                    ))
                })?;
            data = cookie;
        }

        self.check_request(opcode, flags)?;
        let no_data = peek || discard;
        let mut keepalive = Keepalive::default();
        let mut bounce = None;
        let mut copy_out = CopyOut::None;
        let mut descs = DescList::new();
        let mut inline_len = 0usize;
        let mut rx_len = 0usize;
        let mut hmem = None;
        if !no_data {
            let mem = &domain.mem;
            // Where the bytes must be copied to if they cannot be received in place.
            let mut needs_copy = None;
            match &a.dst {
                RecvDst::Shared(buf, r) => {
                    check_range(buf, r)?;
                    if !Arc::ptr_eq(buf.memory(), mem) {
                        return Err(Error::InvalidArgument(
                            "shared buffer of another domain".into(),
                        ));
                    }
                    if !r.is_empty() {
                        descs.push(buf.device_addr() + r.start as u64, r.len() as u32)?;
                    }
                    keepalive.push(buf.keepalive());
                    rx_len = r.len();
                }
                RecvDst::Raw(p, l) if domain.device_addr(*p, *l).is_some() => {
                    if let (Some(dev), true) = (domain.device_addr(*p, *l), *l > 0) {
                        descs.push(dev, *l as u32)?;
                    }
                    rx_len = *l;
                }
                RecvDst::Raw(p, l) => {
                    needs_copy = Some(CopyOut::Raw(*p as usize, *l));
                    rx_len = *l;
                }
                RecvDst::Vec(l) => {
                    needs_copy = Some(CopyOut::Vec);
                    rx_len = *l;
                }
                RecvDst::Iov(iov) if crate::hmem::any(iov) => {
                    // Device memory: received into host memory, moved by the copy
                    // functions when the completion is read (`hmem.rs`).
                    for v in iov.iter() {
                        if let IovKind::Shared(buf, r) = &v.kind {
                            check_range(buf, r)?;
                        }
                    }
                    rx_len = iov.iter().map(|v| v.len()).sum();
                    hmem = Some(Box::new(crate::hmem::Scatter::of(iov)?));
                    needs_copy = Some(CopyOut::Vec);
                }
                RecvDst::Iov(iov) => {
                    for v in iov.iter() {
                        match &v.kind {
                            IovKind::Bytes(_) => {
                                return Err(Error::InvalidArgument(
                                    "Iov::bytes is read-only; not valid for a receive".into(),
                                ))
                            }
                            IovKind::Shared(buf, r) => check_range(buf, r)?,
                            IovKind::Raw(..) | IovKind::Hmem(..) => {}
                        }
                    }
                    rx_len = iov.iter().map(|v| v.len()).sum();
                    let in_place =
                        iov.len() <= self.max_data_descs() && iov.iter().all(|v| self.zero_copy(v));
                    let mut targets = Targets::default();
                    for v in iov.iter().filter(|v| !v.is_empty()) {
                        let (addr, l) = iov_region(v);
                        if in_place {
                            descs.push(self.iov_device_region(v)?.0, l as u32)?;
                        } else {
                            targets.push(addr as usize, l);
                        }
                        // In place or copied into, a shared buffer must outlive the request.
                        if let IovKind::Shared(buf, _) = &v.kind {
                            keepalive.push(buf.keepalive());
                        }
                    }
                    if !in_place {
                        needs_copy = Some(targets.into_copy_out());
                    }
                }
            }
            if rx_len > u32::MAX as usize {
                return Err(Error::InvalidArgument("receive buffer over 4 GiB".into()));
            }
            if let Some(target) = needs_copy {
                if rx_len > 0 && rx_len <= INLINE_RX_MAX {
                    inline_len = rx_len;
                } else if rx_len > 0 {
                    let bb = mem.alloc_bounce(rx_len)?;
                    descs.push(bb.device_addr(), rx_len as u32)?;
                    bounce = Some(bb);
                }
                copy_out = target;
            }
        }

        let selective = rx_cq.1;
        let report_success = !selective || a.flags & fi::COMPLETION != 0;
        let rx = if inline_len > 0 {
            RxData::Inline(inline_len)
        } else if descs.is_empty() {
            RxData::None
        } else {
            RxData::Descs(descs.as_slice())
        };
        // Under LAZY_RX the device may take a plain receive only when a message needs it; one
        // that completes by itself (PEEK, CLAIM, DISCARD) or whose message would be dropped
        // unmatched (DGRAM) must reach it now.
        let urgent = self.limits.plain_recv_urgent
            || (domain.has_feature(proto::VIRTIO_FABRIC_F_LAZY_RX) && (peek || claim || discard));
        let ep = &self.shared;
        self.rx_q()
            .post(
                || msg_header(opcode, ep.id, flags, peer, a.tag, a.ignore, data),
                TxData::None,
                rx,
                a.flags & fi::MORE != 0,
                urgent,
                #[inline(always)]
                || {
                    DataOp {
                        ep: ep.clone(),
                        context: a.context,
                        fi_flags: fi::RECV | if a.tagged { fi::TAGGED } else { fi::MSG },
                        rx_len,
                        src_addr: a.src,
                        copy_out,
                        bounce,
                        _keepalive: keepalive,
                        hmem,
                        is_recv: true,
                        peek,
                        record_claim: peek && claim,
                        report_success,
                        report_errors: true,
                    }
                    .into_pending()
                },
            )
            .map(|_| ())
    }

    /// `fi_cancel`: cancel the oldest posted receive (or held send) with this context. It
    /// completes with a `Canceled` error entry (`ECANCELED`). `Err(NotFound)` if no such
    /// operation is pending (or it matched a message meanwhile).
    ///
    /// The device handles the control queue independently of the data queues, so a receive
    /// posted just before may not be visible to it yet: a `NoMessage` answer is retried for a
    /// short while as long as the request is still in flight.
    pub fn cancel(&self, context: u64) -> Result<()> {
        let me = &self.shared;
        let pred = |p: &PendingOp| {
            p.data_of()
                .is_some_and(|(ep, ctx)| ctx == context && std::ptr::eq(ep, &**me))
        };
        let find = || {
            self.rx_q()
                .find_cookie(pred)
                .or_else(|| self.tx_q().find_cookie(pred))
        };
        let deadline = std::time::Instant::now() + CANCEL_RETRY_WINDOW;
        let mut cookie = find()
            .ok_or_else(|| Error::NotFound(format!("no operation with context {context:#x}")))?;
        loop {
            if self.domain.cancel_request(me.id, cookie)? {
                return Ok(());
            }
            let _ = self.domain.progress();
            match find() {
                Some(c) if std::time::Instant::now() < deadline => {
                    cookie = c;
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                _ => {
                    return Err(Error::NotFound(format!(
                        "operation with context {context:#x} already matched"
                    )))
                }
            }
        }
    }
}

/// Posts sharing one device notification (a doorbell batch): every post through the batch is
/// published at once, but the device is kicked only by [`Batch::flush`] (or when the batch is
/// dropped), once for all of them — like posting with `fi::MORE` and ending with a post
/// without it. A post that finds the ring full (`Err(Again)`) flushes first, so the device
/// sees what is queued and a retry after progress can succeed.
///
/// ```no_run
/// # fn f(ep: &vfabric::Endpoint, buf: &vfabric::SharedBuf, peer: vfabric::FiAddr) -> vfabric::Result<()> {
/// let mut batch = ep.batch();
/// for i in 0..16 {
///     batch.send_buf(buf, 0..64, peer, i)?;
/// }
/// batch.flush(); // one kick for the sixteen sends
/// # Ok(())
/// # }
/// ```
pub struct Batch<'a> {
    ep: &'a Endpoint,
    tx_pending: bool,
    rx_pending: bool,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("ep", &self.ep.shared.addr)
            .field("tx_pending", &self.tx_pending)
            .field("rx_pending", &self.rx_pending)
            .finish()
    }
}

impl Endpoint {
    /// Start a doorbell batch on this endpoint (see [`Batch`]).
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            ep: self,
            tx_pending: false,
            rx_pending: false,
        }
    }
}

impl Batch<'_> {
    fn tx(&mut self, r: Result<()>) -> Result<()> {
        self.tx_pending = true;
        self.flush_on_full(r)
    }
    fn rx(&mut self, r: Result<()>) -> Result<()> {
        self.rx_pending = true;
        self.flush_on_full(r)
    }
    fn flush_on_full(&mut self, r: Result<()>) -> Result<()> {
        if matches!(r, Err(Error::Again)) {
            self.flush();
        }
        r
    }

    /// [`Endpoint::send`] in the batch.
    pub fn send(&mut self, buf: &[u8], dest: FiAddr, context: u64) -> Result<()> {
        let r = self.ep.post_send(SendArgs {
            tagged: false,
            src: SendSrc::Bytes(buf),
            dest,
            tag: 0,
            data: None,
            context,
            flags: fi::MORE,
        });
        self.tx(r)
    }

    /// [`Endpoint::send_buf`] in the batch.
    pub fn send_buf(
        &mut self,
        buf: &SharedBuf,
        range: Range<usize>,
        dest: FiAddr,
        context: u64,
    ) -> Result<()> {
        let r = self.ep.post_send(SendArgs {
            tagged: false,
            src: SendSrc::Shared(buf, range),
            dest,
            tag: 0,
            data: None,
            context,
            flags: fi::MORE,
        });
        self.tx(r)
    }

    /// [`Endpoint::tsend_buf`] in the batch.
    pub fn tsend_buf(
        &mut self,
        buf: &SharedBuf,
        range: Range<usize>,
        dest: FiAddr,
        tag: u64,
        context: u64,
    ) -> Result<()> {
        let r = self.ep.post_send(SendArgs {
            tagged: true,
            src: SendSrc::Shared(buf, range),
            dest,
            tag,
            data: None,
            context,
            flags: fi::MORE,
        });
        self.tx(r)
    }

    /// [`Endpoint::sendmsg`] in the batch.
    pub fn sendmsg(&mut self, msg: &Msg<'_>, flags: u64) -> Result<()> {
        let r = self.ep.sendmsg(msg, flags | fi::MORE);
        self.tx(r)
    }

    /// [`Endpoint::tsendmsg`] in the batch.
    pub fn tsendmsg(&mut self, msg: &TaggedMsg<'_>, flags: u64) -> Result<()> {
        let r = self.ep.tsendmsg(msg, flags | fi::MORE);
        self.tx(r)
    }

    /// [`Endpoint::recv_buf`] in the batch.
    pub fn recv_buf(&mut self, buf: &SharedBuf, range: Range<usize>, context: u64) -> Result<()> {
        self.recv_buf_from(buf, range, FI_ADDR_UNSPEC, context)
    }

    /// [`Endpoint::recv_buf_from`] in the batch.
    pub fn recv_buf_from(
        &mut self,
        buf: &SharedBuf,
        range: Range<usize>,
        src: FiAddr,
        context: u64,
    ) -> Result<()> {
        let r = self.ep.post_recv(RecvArgs {
            tagged: false,
            dst: RecvDst::Shared(buf, range),
            src,
            tag: 0,
            ignore: 0,
            context,
            flags: fi::MORE,
        });
        self.rx(r)
    }

    /// [`Endpoint::trecv_buf`] in the batch.
    pub fn trecv_buf(
        &mut self,
        buf: &SharedBuf,
        range: Range<usize>,
        tag: u64,
        ignore: u64,
        context: u64,
    ) -> Result<()> {
        let r = self.ep.post_recv(RecvArgs {
            tagged: true,
            dst: RecvDst::Shared(buf, range),
            src: FI_ADDR_UNSPEC,
            tag,
            ignore,
            context,
            flags: fi::MORE,
        });
        self.rx(r)
    }

    /// [`Endpoint::recvmsg`] in the batch.
    pub fn recvmsg(&mut self, msg: &Msg<'_>, flags: u64) -> Result<()> {
        let r = self.ep.recvmsg(msg, flags | fi::MORE);
        self.rx(r)
    }

    /// [`Endpoint::write_buf`] in the batch.
    pub fn write_buf(
        &mut self,
        buf: &SharedBuf,
        range: Range<usize>,
        dest: FiAddr,
        addr: u64,
        key: u64,
        context: u64,
    ) -> Result<()> {
        let r = self
            .ep
            .write_buf_flags(buf, range, dest, addr, key, context, fi::MORE);
        self.tx(r)
    }

    /// [`Endpoint::read_buf`] in the batch.
    pub fn read_buf(
        &mut self,
        buf: &SharedBuf,
        range: Range<usize>,
        dest: FiAddr,
        addr: u64,
        key: u64,
        context: u64,
    ) -> Result<()> {
        let r = self
            .ep
            .read_buf_flags(buf, range, dest, addr, key, context, fi::MORE);
        self.tx(r)
    }

    /// Kick the device once for everything posted through the batch so far.
    pub fn flush(&mut self) {
        let domain = &self.ep.domain;
        if std::mem::take(&mut self.tx_pending) {
            domain.queues[self.ep.tx_queue].flush();
        }
        if std::mem::take(&mut self.rx_pending) {
            domain.queues[self.ep.rx_queue].flush();
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// How long `cancel` retries a `NoMessage` answer while the request is still in flight.
const CANCEL_RETRY_WINDOW: std::time::Duration = std::time::Duration::from_millis(50);

impl Drop for Endpoint {
    /// EP_CLOSE, then wait (bounded) until the device has returned every request of the
    /// endpoint. The device fetches every data request made available before EP_CLOSE first
    /// (spec §6.8.3, §6.8.8: it reads the control queue's avail index, drains the data queues,
    /// then takes the control requests), and completes the endpoint's held requests before
    /// EP_CLOSE; the wait collects those completions, so no slot of this endpoint is still
    /// outstanding when a later endpoint reuses the id.
    fn drop(&mut self) {
        // However this ends: the requests that still borrow the endpoint own it first.
        let _own = OwnBorrowedOnDrop(&self.domain.queues, &self.shared);
        self.shared.state.fetch_or(EP_CLOSED, Ordering::Release);
        self.domain.rma.unbind_ep(self.shared.id);
        if self.domain.check_usable().is_err() {
            return;
        }
        if let Err(e) = self.domain.ep_close(self.shared.id) {
            tracing::warn!(addr = %self.shared.addr, error = %e, "EP_CLOSE failed");
            return;
        }
        let me = &self.shared;
        let mine = |p: &PendingOp| p.data_of().is_some_and(|(ep, _)| std::ptr::eq(ep, &**me));
        let deadline = std::time::Instant::now() + self.domain.ctrl_timeout;
        loop {
            let _ = self.domain.progress();
            let outstanding =
                self.rx_q().find_cookie(mine).is_some() || self.tx_q().find_cookie(mine).is_some();
            if !outstanding {
                break;
            }
            let now = std::time::Instant::now();
            if now >= deadline || self.domain.check_usable().is_err() {
                tracing::warn!(
                    addr = %me.addr,
                    "device still holds requests of a closed endpoint"
                );
                break;
            }
            let slice = now + std::time::Duration::from_millis(1);
            if self.domain.block(Some(slice.min(deadline)), None).is_err() {
                break;
            }
        }
    }
}

/// Does the device report the capability class of `op` (or no classes at all)?
fn class_reported(device_caps: Option<u64>, op: Opcode) -> bool {
    device_caps.is_none_or(|caps| caps & proto::bit(op.required_feature()) != 0)
}

/// Op flag of this driver: the operation is an `fi_inject*` call, which generates no completion
/// at all (fi_msg(3)). `FI_INJECT` alone, given to a `*msg` call, only means the buffer is free
/// on return: that operation completes like any other. The `inject*` methods set it; a bit
/// libfabric 1.17 leaves unused (below FI_PROV_SPECIFIC), so a C consumer's flags must have it
/// cleared before they reach a `*msg` call (the provider does).
pub const INJECT_CALL: u64 = 1 << 62;

/// How a transmit operation reports to its consumer: `(success, errors)`. An `fi_inject*` call
/// ([`INJECT_CALL`]) reports nothing; under FI_SELECTIVE_COMPLETION (the CQ's `bool`) success
/// is reported only with FI_COMPLETION. `NoCq` when it must report and no CQ is bound.
pub(crate) fn tx_reporting<T>(tx_cq: Option<&(T, bool)>, flags: u64) -> Result<(bool, bool)> {
    if flags & INJECT_CALL != 0 {
        return Ok((false, false));
    }
    // Not `ok_or`: that builds (and drops) an `Error` on every send.
    let Some((_, selective)) = tx_cq else {
        return Err(Error::NoCq);
    };
    Ok((!selective || flags & fi::COMPLETION != 0, true))
}

/// libfabric op flags that change a send's request flags (or are refused).
const SEND_FLAG_MASK: u64 = fi::INJECT
    | fi::FENCE
    | fi::COMMIT_COMPLETE
    | fi::INJECT_COMPLETE
    | fi::TRANSMIT_COMPLETE
    | fi::DELIVERY_COMPLETE;

/// Request flags for a send from libfabric op flags.
fn send_flags(fi_flags: u64) -> Result<u64> {
    let mut f = 0;
    if fi_flags & fi::INJECT != 0 {
        f |= pflags::INJECT;
    }
    if fi_flags & fi::FENCE != 0 {
        f |= pflags::FENCE;
    }
    if fi_flags & fi::COMMIT_COMPLETE != 0 {
        return Err(Error::Unsupported("FI_COMMIT_COMPLETE on messages".into()));
    }
    let levels = [
        (fi::INJECT_COMPLETE, pflags::INJECT_COMPLETE),
        (fi::TRANSMIT_COMPLETE, pflags::TRANSMIT_COMPLETE),
        (fi::DELIVERY_COMPLETE, pflags::DELIVERY_COMPLETE),
    ];
    let mut chosen = 0;
    for (l, p) in levels {
        if fi_flags & l != 0 {
            if chosen != 0 {
                return Err(Error::InvalidArgument(
                    "at most one completion level flag".into(),
                ));
            }
            chosen = p;
        }
    }
    Ok(f | chosen)
}

pub(crate) fn iov_bytes<'a>(v: &'a Iov<'a>) -> &'a [u8] {
    match &v.kind {
        // SAFETY: read while posting a send (as for `SendSrc::Shared`).
        IovKind::Shared(buf, r) => unsafe { &buf.as_slice()[r.clone()] },
        IovKind::Bytes(b) => b,
        IovKind::Raw(p, l) if *l == 0 || p.is_null() => &[],
        // SAFETY: `Iov::raw`'s contract makes `p` readable for `l` bytes while posting.
        IovKind::Raw(p, l) => unsafe { std::slice::from_raw_parts(*p, *l) },
        // Never reached: device memory is gathered into host bytes (`hmem::gather`) before
        // an operation is built; nothing here may read it.
        IovKind::Hmem(..) => &[],
    }
}

fn iov_region(v: &Iov<'_>) -> (u64, usize) {
    match &v.kind {
        IovKind::Shared(buf, r) => (buf.addr() + r.start as u64, r.len()),
        IovKind::Bytes(b) => (b.as_ptr() as u64, b.len()),
        IovKind::Raw(p, l) => (*p as u64, *l),
        IovKind::Hmem(h, r) => ((h.addr() + r.start) as u64, r.len()),
    }
}
