// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Memory registration (MR_REG/MR_DEREG), counters (`fid_cntr`) and remote-access events
//! (FI_RMA_EVENT, the MR_EVENT request of spec §6.10.4).
//!
//! Counters are driver-side objects: the completion of a request of an endpoint bound to a
//! counter adds one to it (or to its error count). Remote accesses are counted from MR_EVENT
//! completions, which the device produces only for regions registered with `fi::RMA_EVENT`:
//! the domain keeps [`EVENT_DEPTH`] MR_EVENT requests posted on its first RX queue while such a
//! region exists, and every report adds its access count to the counters bound to the region
//! and to the `fi::REMOTE_READ`/`fi::REMOTE_WRITE` counters of the targeted endpoint.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vfabric_proto::{comp_flags, mr_flags, ByteValued, MemSeg, Opcode, Request, Status};

use crate::domain::DomainInner;
use crate::memory::{Allocation, SharedBuf};
use crate::request::{Done, PendingOp, Tx as TxData};
use crate::virtqueue::RxData;
use crate::{fi, Error, Result};

/// Most segments of one registration (its MR_REG payload travels in the header descriptor).
pub const MAX_MR_SEGMENTS: usize = crate::virtqueue::INLINE_TX_MAX / std::mem::size_of::<MemSeg>();

/// MR_EVENT requests kept posted while a region with `fi::RMA_EVENT` exists.
pub(crate) const EVENT_DEPTH: usize = 8;

/// `fi_mr_attr` subset: what [`crate::Domain::register_with`] takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MrAttr {
    /// libfabric access flags: `fi::SEND`, `fi::RECV`, `fi::READ`, `fi::WRITE`,
    /// `fi::REMOTE_READ`, `fi::REMOTE_WRITE`.
    pub access: u64,
    /// Requested key (`requested_key`); `None` lets the device choose one (FI_MR_PROV_KEY).
    pub requested_key: Option<u64>,
    /// Offset-based addressing: remote addresses are offsets from the region's start instead
    /// of virtual addresses (FI_MR_VIRT_ADDR, the default).
    pub offset_addressing: bool,
    /// Count remote accesses to the region (`fi::RMA_EVENT`).
    pub rma_event: bool,
    /// A persistent region (`fi::RMA_PMEM`): the memory is a `MAP_SHARED` mapping of this
    /// file (see [`crate::Domain::register_pmem`]).
    pub pmem: Option<crate::pmem::PmemBacking>,
}

/// The access flags a registration accepts.
pub const MR_ACCESS_ALL: u64 =
    fi::SEND | fi::RECV | fi::READ | fi::WRITE | fi::REMOTE_READ | fi::REMOTE_WRITE;

/// A counter's shared state.
#[derive(Default)]
pub(crate) struct CounterShared {
    value: AtomicU64,
    errors: AtomicU64,
}

impl CounterShared {
    pub(crate) fn inc(&self, ok: bool) {
        if ok {
            self.value.fetch_add(1, Ordering::AcqRel);
        } else {
            self.errors.fetch_add(1, Ordering::AcqRel);
        }
    }
    fn add(&self, v: u64) {
        self.value.fetch_add(v, Ordering::AcqRel);
    }
}

/// A completion counter (`fid_cntr`). Counts completions of the operations of the endpoints it
/// is bound to ([`crate::Endpoint::bind_cntr`]) and remote accesses to regions registered with
/// `fi::RMA_EVENT` ([`MemoryRegion::bind_cntr`]).
pub struct Counter {
    domain: Arc<DomainInner>,
    pub(crate) shared: Arc<CounterShared>,
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counter")
            .field("value", &self.shared.value.load(Ordering::Relaxed))
            .field("errors", &self.shared.errors.load(Ordering::Relaxed))
            .finish()
    }
}

impl Counter {
    pub(crate) fn new(domain: Arc<DomainInner>) -> Self {
        Self {
            domain,
            shared: Arc::new(CounterShared::default()),
        }
    }

    /// `fi_cntr_read` (drives progress first).
    pub fn read(&self) -> u64 {
        let _ = self.domain.progress();
        self.shared.value.load(Ordering::Acquire)
    }
    /// `fi_cntr_readerr`.
    pub fn readerr(&self) -> u64 {
        let _ = self.domain.progress();
        self.shared.errors.load(Ordering::Acquire)
    }
    /// `fi_cntr_add`.
    pub fn add(&self, v: u64) {
        self.shared.add(v);
    }
    /// `fi_cntr_set`.
    pub fn set(&self, v: u64) {
        self.shared.value.store(v, Ordering::Release);
    }
    /// `fi_cntr_adderr`.
    pub fn adderr(&self, v: u64) {
        self.shared.errors.fetch_add(v, Ordering::AcqRel);
    }
    /// `fi_cntr_seterr`.
    pub fn seterr(&self, v: u64) {
        self.shared.errors.store(v, Ordering::Release);
    }

    /// `fi_cntr_wait`: until the value reaches `threshold` (`Ok`), the error count grows
    /// (`Err(Avail)`), or `timeout` passes (`Err(Timeout)`; `None` waits forever).
    pub fn wait(&self, threshold: u64, timeout: Option<Duration>) -> Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let errors = self.shared.errors.load(Ordering::Acquire);
        let spin_until = Instant::now() + Duration::from_micros(50);
        loop {
            self.domain.progress()?;
            if self.shared.value.load(Ordering::Acquire) >= threshold {
                return Ok(());
            }
            if self.shared.errors.load(Ordering::Acquire) != errors {
                return Err(Error::Avail);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(Error::Timeout);
            }
            if now < spin_until {
                std::hint::spin_loop();
                continue;
            }
            let slice = now + Duration::from_millis(10);
            self.domain
                .block(Some(deadline.map_or(slice, |d| d.min(slice))), None)?;
        }
    }
}

/// A counter bound with libfabric flags.
type BoundCounter = (u64, Arc<CounterShared>);

/// Remote-event bookkeeping of a domain.
#[derive(Default)]
pub(crate) struct RmaState {
    /// Counters bound to regions (by key).
    mr_cntrs: Mutex<HashMap<u64, Vec<Arc<CounterShared>>>>,
    /// `fi::REMOTE_READ` / `fi::REMOTE_WRITE` counters of endpoints (by endpoint id).
    ep_cntrs: Mutex<HashMap<u32, Vec<BoundCounter>>>,
    /// Regions registered with RMA_EVENT.
    event_mrs: AtomicUsize,
    /// MR_EVENT requests posted.
    events_posted: AtomicUsize,
}

impl RmaState {
    /// Fewer MR_EVENT requests posted than RMA_EVENT regions need.
    #[inline]
    pub(crate) fn events_wanted(&self) -> bool {
        self.event_mrs.load(Ordering::Acquire) > 0
            && self.events_posted.load(Ordering::Acquire) < EVENT_DEPTH
    }
    pub(crate) fn bind_ep(&self, ep: u32, flags: u64, c: Arc<CounterShared>) {
        let f = flags & (fi::REMOTE_READ | fi::REMOTE_WRITE);
        if f != 0 {
            self.ep_cntrs
                .lock()
                .unwrap()
                .entry(ep)
                .or_default()
                .push((f, c));
        }
    }
    pub(crate) fn unbind_ep(&self, ep: u32) {
        self.ep_cntrs.lock().unwrap().remove(&ep);
    }
}

/// A registered memory region (`fid_mr`). Deregistered (MR_DEREG) on drop.
pub struct MemoryRegion {
    domain: Arc<DomainInner>,
    key: u64,
    desc: u64,
    base: u64,
    len: usize,
    remote: bool,
    rma_event: bool,
    /// Registered with COMMIT_EVENT (commits wait for the domain's commit handler).
    commit_event: bool,
    /// Store granularity of a persistent region (0 byte, 1 cache line, 2 page).
    pmem_granularity: Option<u8>,
    _keep: Option<Arc<Allocation>>,
}

impl std::fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("key", &format_args!("{:#x}", self.key))
            .field("base", &format_args!("{:#x}", self.base))
            .field("len", &self.len)
            .finish()
    }
}

impl MemoryRegion {
    /// `fi_mr_key`: the remote key initiators use.
    pub fn key(&self) -> u64 {
        self.key
    }
    /// `fi_mr_desc`: the local descriptor (the region's address in the shared memory).
    pub fn desc(&self) -> u64 {
        self.desc
    }
    /// The remote address of the region's first byte: its virtual address, or 0 with offset
    /// addressing.
    pub fn base(&self) -> u64 {
        self.base
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// For a persistent region, the store granularity the device reported for it (0 byte,
    /// 1 cache line, 2 page: the unit a crash may tear).
    pub fn pmem_granularity(&self) -> Option<u8> {
        self.pmem_granularity
    }

    /// `fi_mr_bind` of a counter: counts remote accesses to this region (needs
    /// [`MrAttr::rma_event`]).
    pub fn bind_cntr(&self, c: &Counter) -> Result<()> {
        if !self.rma_event {
            return Err(Error::InvalidArgument(
                "the region was not registered with RMA_EVENT".into(),
            ));
        }
        self.domain
            .rma
            .mr_cntrs
            .lock()
            .unwrap()
            .entry(self.key)
            .or_default()
            .push(c.shared.clone());
        Ok(())
    }

    /// `fi_close`: deregister now (dropping does the same, ignoring errors).
    pub fn close(mut self) -> Result<()> {
        let r = self.dereg();
        self.remote = false;
        r
    }

    fn dereg(&self) -> Result<()> {
        if !self.remote {
            return Ok(());
        }
        if self.rma_event {
            self.domain.rma.mr_cntrs.lock().unwrap().remove(&self.key);
            self.domain.rma.event_mrs.fetch_sub(1, Ordering::AcqRel);
        }
        if self.commit_event {
            self.domain.commit.region_removed();
        }
        let mut req = Request::new(Opcode::MrDereg);
        req.remote_key = self.key;
        let r = self.domain.control(req, 0)?;
        match r.status {
            Status::Ok => Ok(()),
            s => Err(Error::Device(s)),
        }
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        if self.remote {
            if let Err(e) = self.dereg() {
                tracing::debug!(key = self.key, %e, "MR_DEREG on drop failed");
            }
        }
    }
}

impl DomainInner {
    /// MR_REG of the concatenation of `segs` (address, length), each inside the shared region
    /// or an added external range.
    pub(crate) fn register(
        self: &Arc<Self>,
        segs: &[(u64, usize)],
        attr: &MrAttr,
        keep: Option<Arc<Allocation>>,
    ) -> Result<MemoryRegion> {
        let ptr = segs.first().map_or(0, |s| s.0);
        let len = segs
            .iter()
            .try_fold(0usize, |a, s| a.checked_add(s.1))
            .ok_or_else(|| Error::InvalidArgument("region length overflows".into()))?;
        if segs.is_empty() || segs.len() > MAX_MR_SEGMENTS {
            return Err(Error::InvalidArgument(format!(
                "1..={MAX_MR_SEGMENTS} segments per region, got {}",
                segs.len()
            )));
        }
        if attr.access & !MR_ACCESS_ALL != 0 {
            return Err(Error::InvalidArgument(format!(
                "unknown access flags {:#x}",
                attr.access & !MR_ACCESS_ALL
            )));
        }
        // Memory outside the shared region is process memory: the device reaches it by
        // cross-memory attach (`Domain::register_external`).
        let process_memory = segs.iter().any(|&(p, l)| !self.is_shared(p, l));
        let remote = attr.access & (fi::REMOTE_READ | fi::REMOTE_WRITE) != 0 || attr.rma_event;
        let base = if attr.offset_addressing { 0 } else { ptr };
        if !remote {
            // Local access only: nothing to tell the device (spec §6.8.4).
            return Ok(MemoryRegion {
                domain: self.clone(),
                key: attr.requested_key.unwrap_or(0),
                desc: ptr,
                base,
                len,
                remote: false,
                rma_event: false,
                commit_event: false,
                pmem_granularity: None,
                _keep: keep,
            });
        }
        if !self.has_feature(vfabric_proto::VIRTIO_FABRIC_F_RMA) {
            return Err(Error::Unsupported(
                "memory registration (F_RMA not negotiated)".into(),
            ));
        }
        if len == 0 {
            return Err(Error::InvalidArgument(
                "a region for remote access needs at least one byte".into(),
            ));
        }
        let mut flags = 0;
        if attr.access & fi::REMOTE_READ != 0 {
            flags |= mr_flags::REMOTE_READ;
        }
        if attr.access & fi::REMOTE_WRITE != 0 {
            flags |= mr_flags::REMOTE_WRITE;
        }
        if flags == 0 {
            return Err(Error::InvalidArgument(
                "RMA_EVENT needs FI_REMOTE_READ or FI_REMOTE_WRITE".into(),
            ));
        }
        if attr.rma_event {
            flags |= mr_flags::RMA_EVENT;
        }
        if process_memory {
            if !self.transport.reaches_process_memory() {
                return Err(Error::Unsupported(format!(
                    "device {}: remote access to memory outside the domain's shared region \
                     needs a vhost-user device on this host (register a SharedBuf instead)",
                    self.transport.locator()
                )));
            }
            flags |= mr_flags::PROCESS_MEMORY;
        }
        let mut req = Request::new(Opcode::MrReg);
        if let Some(b) = attr.pmem {
            if !self.has_feature(vfabric_proto::VIRTIO_FABRIC_F_RMA_PMEM) {
                return Err(Error::Unsupported(
                    "persistent memory (F_RMA_PMEM not negotiated)".into(),
                ));
            }
            if segs.len() != 1 || !process_memory {
                return Err(Error::InvalidArgument(
                    "a persistent region is one range of a file mapping".into(),
                ));
            }
            flags |= mr_flags::PMEM;
            if self.commit.has_handler() {
                flags |= mr_flags::COMMIT_EVENT;
            }
            req.tag = b.fd as u64;
            req.data = b.offset;
        }
        match attr.requested_key {
            Some(k) => req.remote_key = k,
            None => flags |= mr_flags::PROV_KEY,
        }
        req.compare = flags;
        req.remote_addr = base;
        // The device sees device addresses: shared memory is translated (and split where it
        // is not contiguous for the device); process memory keeps its process addresses.
        let mut device_segs = Vec::with_capacity(segs.len());
        for &(p, l) in segs {
            match self.mem.device_ranges(p as *const u8, l) {
                Some(ranges) if !process_memory => device_segs.extend(ranges),
                _ => device_segs.push((p, l)),
            }
        }
        if device_segs.len() > MAX_MR_SEGMENTS {
            return Err(Error::InvalidArgument(format!(
                "the region is {} pieces of device memory (at most {MAX_MR_SEGMENTS})",
                device_segs.len()
            )));
        }
        req.count = device_segs.len() as u32;
        let mut payload = Vec::with_capacity(device_segs.len() * std::mem::size_of::<MemSeg>());
        for &(p, l) in &device_segs {
            let seg = MemSeg {
                addr: p.into(),
                len: (l as u64).into(),
            };
            payload.extend_from_slice(seg.as_slice());
        }
        let r = self.control_with_payload(req, &payload, 0)?;
        match r.status {
            Status::Ok => {}
            s => return Err(Error::Device(s)),
        }
        let key = u64::from(r.completion.data);
        if attr.rma_event {
            self.rma.event_mrs.fetch_add(1, Ordering::AcqRel);
            self.post_events();
        }
        let commit_event = flags & mr_flags::COMMIT_EVENT != 0;
        if commit_event {
            self.commit.region_added();
            self.post_commit_events();
        }
        Ok(MemoryRegion {
            domain: self.clone(),
            key,
            desc: ptr,
            base,
            len,
            remote: true,
            rma_event: attr.rma_event,
            commit_event,
            pmem_granularity: attr.pmem.map(|_| u64::from(r.completion.olen).min(2) as u8),
            _keep: keep,
        })
    }

    /// Keep [`EVENT_DEPTH`] MR_EVENT requests posted while RMA_EVENT regions exist.
    pub(crate) fn post_events(&self) {
        if self.num_queue_pairs == 0 || !self.has_feature(vfabric_proto::VIRTIO_FABRIC_F_RMA) {
            return;
        }
        let q = vfabric_proto::rx_queue(0) as usize;
        while self.rma.event_mrs.load(Ordering::Acquire) > 0
            && self.rma.events_posted.load(Ordering::Acquire) < EVENT_DEPTH
        {
            let header = || Request::new(Opcode::MrEvent).to_header();
            let urgent = self.has_feature(vfabric_proto::VIRTIO_FABRIC_F_LAZY_RX);
            match self.queues[q].post(header, TxData::None, RxData::None, false, urgent, || {
                PendingOp::MrEvent
            }) {
                Ok(_) => {
                    self.rma.events_posted.fetch_add(1, Ordering::AcqRel);
                }
                Err(e) => {
                    tracing::debug!(%e, "cannot post MR_EVENT now");
                    break;
                }
            }
        }
    }
}

/// An MR_EVENT request finished: feed the counters. Progress posts the replacement once the
/// drain has freed the chain ([`RmaState::events_wanted`]).
pub(crate) fn complete_event(domain: &DomainInner, f: Done<'_>) {
    domain.rma.events_posted.fetch_sub(1, Ordering::AcqRel);
    let Some(c) = f.completion.filter(|_| !f.device_fault) else {
        return;
    };
    if Status::from_u32(c.status.into()) != Some(Status::Ok) {
        return;
    }
    let count = u64::from(c.olen);
    let key = u64::from(c.data);
    let ep = u64::from(c.tag) as u32;
    let cf = u32::from(c.flags);
    let kind = if cf & comp_flags::REMOTE_WRITE != 0 {
        fi::REMOTE_WRITE
    } else {
        fi::REMOTE_READ
    };
    if let Some(v) = domain.rma.mr_cntrs.lock().unwrap().get(&key) {
        v.iter().for_each(|c| c.add(count));
    }
    if let Some(v) = domain.rma.ep_cntrs.lock().unwrap().get(&ep) {
        v.iter()
            .filter(|(f, _)| f & kind != 0)
            .for_each(|(_, c)| c.add(count));
    }
}

/// Validate a range of a shared buffer for registration.
pub(crate) fn buf_range(buf: &SharedBuf, range: &Range<usize>) -> Result<(u64, usize)> {
    if range.start > range.end || range.end > buf.len() {
        return Err(Error::InvalidArgument(format!(
            "range {range:?} outside a buffer of {} bytes",
            buf.len()
        )));
    }
    Ok((buf.addr() + range.start as u64, range.len()))
}
