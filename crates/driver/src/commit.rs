// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The target commit handler (spec §6.17.3; the `fi_eq_event_handler` idea of
//! ofiwg/libfabric#5874): the application installs a handler on its domain
//! ([`crate::Domain::set_commit_handler`]); persistent regions registered while one is
//! installed are registered with `mr_flags::COMMIT_EVENT`. A commit (FLUSH at
//! COMMIT_COMPLETE: `fi_commit`, `FI_SAVE | FI_COMMIT_COMPLETE`) to such a region is persisted
//! by the device, which then hands the event to this driver in a COMMIT_EVENT request it keeps
//! posted on its first RX queue. Progress (any call that drives the domain: CQ reads, counter
//! reads, waits) runs the handler and answers with COMMIT_REPLY; the handler's value decides
//! the initiator's completion (0: success; anything else: an error completion with status
//! `CommitRefused` whose `data` is the value).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vfabric_proto::{flags, CommitEventMsg, FabricAddr, Opcode, Request, Status};

use crate::domain::DomainInner;
use crate::memory::Allocation;
use crate::request::{Done, PendingOp, Tx as TxData};
use crate::virtqueue::RxData;
use crate::{fi, Result, RmaIov};

/// COMMIT_EVENT requests kept posted while a handled region exists.
pub(crate) const COMMIT_EVENT_DEPTH: usize = 4;

/// One commit a handler decides on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitEvent {
    /// The device's id of the event (what the reply names).
    pub id: u64,
    /// The target endpoint (an endpoint of this domain) the initiator addressed.
    pub target_ep: u32,
    /// The initiator's address.
    pub initiator: FabricAddr,
    /// libfabric flags of the commit: `fi::COMMIT_COMPLETE`, and `fi::SAVE`,
    /// `fi::REMOTE_CQ_DATA`, `fi::FENCE` when the initiator set them.
    pub flags: u64,
    /// Remote CQ data the commit carried (with `fi::REMOTE_CQ_DATA`).
    pub data: Option<u64>,
    /// The committed ranges (remote address, length, key), already durable.
    pub ranges: Vec<RmaIov>,
}

/// A commit handler: 0 accepts the commit, any other value refuses it (the initiator's
/// completion fails with `Status::CommitRefused` and carries the value in `data`).
pub type CommitHandler = Arc<dyn Fn(&CommitEvent) -> i32 + Send + Sync>;

/// The commit-handler state of a domain.
#[derive(Default)]
pub(crate) struct CommitState {
    handler: Mutex<Option<CommitHandler>>,
    /// Regions registered with COMMIT_EVENT.
    handled_mrs: AtomicUsize,
    /// COMMIT_EVENT requests posted.
    posted: AtomicUsize,
    /// Events received, waiting for the handler.
    ready: Mutex<VecDeque<CommitEvent>>,
    /// Verdicts not yet posted (the control ring was full): (event id, value).
    unsent: Mutex<VecDeque<(u64, i64)>>,
    /// Entries of `ready` and `unsent` together, changed under their locks: progress checks
    /// it after every drain without taking either lock.
    queued: AtomicUsize,
    /// A thread is running handlers (they never run concurrently, nor nested in a handler's
    /// own progress calls).
    running: AtomicBool,
}

impl CommitState {
    pub(crate) fn set_handler(&self, h: Option<CommitHandler>) {
        *self.handler.lock().unwrap() = h;
    }
    pub(crate) fn has_handler(&self) -> bool {
        self.handler.lock().unwrap().is_some()
    }
    pub(crate) fn region_added(&self) {
        self.handled_mrs.fetch_add(1, Ordering::AcqRel);
    }
    pub(crate) fn region_removed(&self) {
        self.handled_mrs.fetch_sub(1, Ordering::AcqRel);
    }
    /// Fewer COMMIT_EVENT requests posted than handled regions need.
    #[inline]
    pub(crate) fn events_wanted(&self) -> bool {
        self.handled_mrs.load(Ordering::Acquire) > 0
            && self.posted.load(Ordering::Acquire) < COMMIT_EVENT_DEPTH
    }
    fn push_ready(&self, ev: CommitEvent) {
        let mut ready = self.ready.lock().unwrap();
        ready.push_back(ev);
        self.queued.fetch_add(1, Ordering::AcqRel);
    }
    fn pop_ready(&self) -> Option<CommitEvent> {
        let mut ready = self.ready.lock().unwrap();
        let ev = ready.pop_front()?;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        Some(ev)
    }
    fn push_unsent(&self, verdict: (u64, i64)) {
        let mut unsent = self.unsent.lock().unwrap();
        unsent.push_back(verdict);
        self.queued.fetch_add(1, Ordering::AcqRel);
    }
    fn push_unsent_front(&self, verdict: (u64, i64)) {
        let mut unsent = self.unsent.lock().unwrap();
        unsent.push_front(verdict);
        self.queued.fetch_add(1, Ordering::AcqRel);
    }
    fn pop_unsent(&self) -> Option<(u64, i64)> {
        let mut unsent = self.unsent.lock().unwrap();
        let v = unsent.pop_front()?;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        Some(v)
    }
    /// Events or verdicts waiting (one atomic load: called after every drain).
    #[inline]
    pub(crate) fn has_work(&self) -> bool {
        self.queued.load(Ordering::Acquire) > 0
    }
}

/// The libfabric flags of a commit event's wire flags.
fn fi_flags(wire: u64) -> u64 {
    let mut f = 0;
    for (w, l) in [
        (flags::COMMIT_COMPLETE, fi::COMMIT_COMPLETE),
        (flags::DELIVERY_COMPLETE, fi::DELIVERY_COMPLETE),
        (flags::SAVE, fi::SAVE),
        (flags::REMOTE_CQ_DATA, fi::REMOTE_CQ_DATA),
        (flags::FENCE, fi::FENCE),
    ] {
        if wire & w != 0 {
            f |= l;
        }
    }
    f
}

impl DomainInner {
    /// Keep [`COMMIT_EVENT_DEPTH`] COMMIT_EVENT requests posted while handled regions exist.
    pub(crate) fn post_commit_events(&self) {
        if self.num_queue_pairs == 0 || !self.has_feature(vfabric_proto::VIRTIO_FABRIC_F_RMA_PMEM) {
            return;
        }
        let q = vfabric_proto::rx_queue(0) as usize;
        let len =
            vfabric_proto::commit_event_area_len(u32::from(self.config.max_sge).max(1)) as usize;
        while self.commit.events_wanted() {
            let area = match self.mem.alloc(len, 64) {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(%e, "no memory for a COMMIT_EVENT area now");
                    break;
                }
            };
            let descs = [(area.addr(), len as u32)];
            match self.queues[q].post(
                || Request::new(Opcode::CommitEvent).to_header(),
                TxData::None,
                RxData::Descs(&descs),
                false,
                self.has_feature(vfabric_proto::VIRTIO_FABRIC_F_LAZY_RX),
                || PendingOp::CommitEvent { area: Some(area) },
            ) {
                Ok(_) => {
                    self.commit.posted.fetch_add(1, Ordering::AcqRel);
                }
                Err(e) => {
                    tracing::debug!(%e, "cannot post COMMIT_EVENT now");
                    break;
                }
            }
        }
    }

    /// Run the handler on the events received and post the verdicts. Called after every
    /// drain that completed something (and by [`crate::Domain::progress`]); one thread at a
    /// time, never from inside a handler.
    pub(crate) fn run_commit_handlers(&self) {
        let st = &self.commit;
        while st.has_work() {
            if st.running.swap(true, Ordering::AcqRel) {
                return;
            }
            // (`pop_*` release their lock before returning: none is held across the loop body.)
            while let Some(ev) = st.pop_ready() {
                let handler = st.handler.lock().unwrap().clone();
                // No handler any more (cleared after the region was registered): the ranges
                // are durable, which is all the commit asked for.
                let value = handler.map_or(0, |h| h(&ev));
                st.push_unsent((ev.id, i64::from(value)));
            }
            let mut stalled = false;
            while let Some((id, value)) = st.pop_unsent() {
                if let Err(e) = self.post_commit_reply(id, value) {
                    tracing::debug!(%e, id, "COMMIT_REPLY not posted now");
                    st.push_unsent_front((id, value));
                    stalled = true;
                    break;
                }
            }
            st.running.store(false, Ordering::Release);
            if stalled {
                // The next progress retries.
                return;
            }
        }
    }

    /// Post COMMIT_REPLY for event `id` with `value` without waiting for its completion.
    fn post_commit_reply(&self, id: u64, value: i64) -> Result<()> {
        self.check_usable()?;
        let mut req = Request::new(Opcode::CommitReply);
        req.data = id;
        req.tag = value as u64;
        self.queues[0].post(
            || req.to_header(),
            TxData::None,
            RxData::None,
            false,
            false,
            || PendingOp::CommitReply,
        )?;
        Ok(())
    }

    /// COMMIT_REPLY synchronously, returning the device's status (tests of the device's
    /// checks; applications answer through their handler).
    pub(crate) fn commit_reply_sync(&self, id: u64, value: i64) -> Result<Status> {
        let mut req = Request::new(Opcode::CommitReply);
        req.data = id;
        req.tag = value as u64;
        Ok(self.control(req, 0)?.status)
    }
}

/// A COMMIT_EVENT finished: queue its event for the handler. Progress posts the replacement.
pub(crate) fn complete_event(domain: &DomainInner, f: Done<'_>) {
    domain.commit.posted.fetch_sub(1, Ordering::AcqRel);
    let PendingOp::CommitEvent { area } = f.op else {
        return;
    };
    let Some(area) = area.take() else {
        return;
    };
    let Some(c) = f.completion.filter(|_| !f.device_fault) else {
        return;
    };
    if Status::from_u32(c.status.into()) != Some(Status::Ok) {
        return;
    }
    let n = (u64::from(c.len) as usize).min(area.capacity());
    let mut bytes = vec![0u8; n];
    area.read_at(0, &mut bytes);
    drop::<Allocation>(area);
    let msg = match CommitEventMsg::parse(&bytes) {
        Ok(m) if m.event_id == u64::from(c.data) => m,
        other => {
            tracing::warn!(?other, "device wrote a malformed commit event");
            // Refuse it rather than leave the initiator to the timeout.
            let refusal = (u64::from(c.data), -i64::from(fi::EIO));
            domain.commit.push_unsent(refusal);
            return;
        }
    };
    domain.commit.push_ready(CommitEvent {
        id: msg.event_id,
        target_ep: msg.ep,
        initiator: msg.initiator,
        flags: fi_flags(msg.flags),
        data: (msg.flags & flags::REMOTE_CQ_DATA != 0).then_some(msg.data),
        ranges: msg
            .ranges
            .iter()
            .map(|r| RmaIov {
                addr: r.addr.into(),
                len: r.len.into(),
                key: r.key.into(),
            })
            .collect(),
    });
}

/// A COMMIT_REPLY finished: nothing waits for it; a refusal means the event was gone (expired,
/// or its initiator left).
pub(crate) fn complete_reply(f: Done<'_>) {
    if let Some(c) = f.completion {
        let s = Status::from_u32(c.status.into());
        if s != Some(Status::Ok) {
            tracing::debug!(?s, "COMMIT_REPLY not taken (event expired or withdrawn)");
        }
    }
}
