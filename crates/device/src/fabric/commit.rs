// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The target commit handler round trip (spec §6.17.3): a FLUSH at COMMIT_COMPLETE to a region
//! registered with `mr_flags::COMMIT_EVENT` is persisted as any other, then handed to the
//! target's driver as a commit event (the record is written into a posted COMMIT_EVENT
//! request) and waits, with a deadline, in the target device's table until that driver's
//! COMMIT_REPLY gives the verdict that completes the initiator's FLUSH.
//!
//! Every pending commit lives in the table of its *target* device, under that device's lock,
//! so a reply can only ever reach commits of the device that sends it. Event ids come from one
//! fabric-wide counter: an id is never handed out twice, so a reply naming an id that expired,
//! was already answered or belongs to another device finds nothing (INVALID).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Instant;

use tracing::debug;
use vfabric_proto::{commit_event_area_len, CommitEventMsg, FabricAddr, RmaIov, Status};
use vm_memory::GuestAddressSpace;

use super::pmem::FlushAt;
use super::rma::Target;
use super::{Dev, Fabric, Notify, Port};
use crate::chain::{completion, Req};
use crate::uplink::remote::Outbound;

/// Commits waiting for a verdict per target device: beyond it a handled commit completes
/// NO_RESOURCES (the data is durable already; the initiator may retry).
pub(crate) const MAX_PENDING_COMMITS: usize = 256;

/// Who waits for a commit's verdict.
pub(super) enum CommitOrigin {
    /// A FLUSH of a local device: completions go to its port (its rings of the time).
    Local {
        src_dev: usize,
        src_port: Port,
        req: Box<Req>,
    },
    /// A FLUSH from another host: the verdict goes back as the REPLY to its request.
    Remote { host: u16, req_id: u64 },
}

/// A commit waiting for its target driver's verdict.
pub(super) struct PendingCommit {
    origin: CommitOrigin,
    /// Initiator and target addresses (FENCE looks at them).
    src: FabricAddr,
    target_ep: usize,
    /// The event record the target driver receives.
    record: Vec<u8>,
    deadline: Instant,
    /// Written into a COMMIT_EVENT: a reply may name it now.
    delivered: bool,
}

impl PendingCommit {
    /// Whether the FLUSH waiting is local device `dev`'s (on TX queue `queue`, if given).
    fn waited_by_dev(&self, dev: usize, queue: Option<u16>) -> bool {
        matches!(&self.origin, CommitOrigin::Local { src_dev, req, .. }
            if *src_dev == dev && queue.is_none_or(|q| q == req.queue))
    }
}

/// A device's side of the round trip.
#[derive(Default)]
pub(super) struct Commits {
    /// Posted COMMIT_EVENT requests, in posting order.
    posted: VecDeque<Req>,
    /// Commits targeting this device's regions, by event id (ids grow: oldest first).
    pending: BTreeMap<u64, PendingCommit>,
}

impl Commits {
    /// Whether initiator `src` has a commit waiting here (a FENCE after it must wait).
    pub(super) fn waiting_from(&self, src: FabricAddr) -> bool {
        self.pending.values().any(|p| p.src == src)
    }
}

/// What a failed or answered commit completes with at its initiator.
struct Verdict {
    status: Status,
    value: u64,
}

impl Fabric {
    /// COMMIT_EVENT: keep the request until a commit event fills its data area.
    pub(super) fn op_commit_event(&self, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        if req.data.len < commit_event_area_len(self.limits.max_sge) {
            return self.fail(dev, port, &req, Status::BadChain, n);
        }
        let mut d = self.dev(dev);
        d.commits.posted.push_back(req);
        self.deliver_commits(dev, &mut d, n);
    }

    /// Write undelivered commit events of `dev` (locked as `d`) into its posted COMMIT_EVENT
    /// requests, oldest first.
    fn deliver_commits(&self, dev: usize, d: &mut Dev, n: &mut Notify) {
        let Some(port) = d.port.clone() else {
            return;
        };
        while !d.commits.posted.is_empty() {
            let Some((&id, p)) = d.commits.pending.iter_mut().find(|(_, p)| !p.delivered) else {
                break;
            };
            let Some(req) = d.commits.posted.pop_front() else {
                break;
            };
            if req.data.write_at(&port.mem.memory(), 0, &p.record).is_err() {
                // This request's area is bad, not the event: the next request gets it.
                self.fail(dev, &port, &req, Status::Fault, n);
                continue;
            }
            p.delivered = true;
            let mut c = completion(Status::Ok, req.req.cookie);
            c.data = id.into();
            c.len = (p.record.len() as u64).into();
            c.tag = (p.target_ep as u64).into();
            c.src = p.src.to_wire();
            self.done(dev, &port, &req, &c, p.record.len() as u64, n);
        }
    }

    /// A FLUSH at COMMIT_COMPLETE reached regions of which one has a commit handler: its
    /// ranges are durable; queue the event for the target driver and keep the FLUSH pending
    /// (its initiator a local device's request or another host's).
    pub(super) fn start_commit(
        &self,
        origin: CommitOrigin,
        at: &FlushAt,
        flush_flags: u64,
        cq_data: Option<u64>,
        targets: &[Target],
        n: &mut Notify,
    ) {
        let (ddev, dep) = (at.ddev, at.dep);
        let msg = CommitEventMsg {
            event_id: self.next_commit_id.fetch_add(1, Ordering::Relaxed),
            flags: flush_flags,
            initiator: at.src,
            ep: dep as u32,
            data: cq_data.unwrap_or(0),
            ranges: targets
                .iter()
                .map(|t| RmaIov {
                    addr: (t.mr.base().wrapping_add(t.off)).into(),
                    len: t.len.into(),
                    key: t.key.into(),
                })
                .collect(),
        };
        let mut d = self.dev(ddev);
        let refused = if d.live_ep(dep, at.gen).is_none() {
            Some(Status::PeerGone)
        } else if d.commits.pending.len() >= MAX_PENDING_COMMITS {
            debug!(ddev, "commit table full");
            Some(Status::NoResources)
        } else {
            None
        };
        if let Some(status) = refused {
            drop(d);
            return self.finish_commit(origin, Verdict { status, value: 0 }, n);
        }
        debug!(
            ddev,
            id = msg.event_id,
            ranges = msg.ranges.len(),
            "commit waits for the target's handler"
        );
        d.commits.pending.insert(
            msg.event_id,
            PendingCommit {
                origin,
                src: at.src,
                target_ep: dep,
                record: msg.to_bytes(),
                deadline: Instant::now() + self.commit_timeout,
                delivered: false,
            },
        );
        self.deliver_commits(ddev, &mut d, n);
    }

    /// COMMIT_REPLY: the target driver's verdict on event `data`; `tag` is its handler's value
    /// (0 success; anything else refuses the commit and reaches the initiator).
    pub(super) fn op_commit_reply(&self, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        if req.data.len != 0 {
            return self.fail(dev, port, &req, Status::BadChain, n);
        }
        let id = req.req.data;
        let taken = {
            let mut d = self.dev(dev);
            match d.commits.pending.get(&id) {
                Some(p) if p.delivered => d.commits.pending.remove(&id),
                _ => None,
            }
        };
        let Some(p) = taken else {
            debug!(dev, id, "reply for no commit event of this device");
            return self.fail(dev, port, &req, Status::Invalid, n);
        };
        let value = req.req.tag;
        let verdict = if value == 0 {
            Verdict {
                status: Status::Ok,
                value: 0,
            }
        } else {
            Verdict {
                status: Status::CommitRefused,
                value,
            }
        };
        self.finish_commit(p.origin, verdict, n);
        self.fail(dev, port, &req, Status::Ok, n);
    }

    /// Complete the FLUSH of `origin` with verdict `v`: a local request's completion carries
    /// the handler's value in `data`; another host's REPLY carries it as 8 bytes (only with
    /// COMMIT_REFUSED, the one status that has a value).
    fn finish_commit(&self, origin: CommitOrigin, v: Verdict, n: &mut Notify) {
        match origin {
            CommitOrigin::Local {
                src_dev,
                src_port,
                req,
            } => {
                let mut c = completion(v.status, req.req.cookie);
                c.data = v.value.into();
                self.done(src_dev, &src_port, &req, &c, 0, n);
            }
            CommitOrigin::Remote { host, req_id } => {
                let bytes = if v.status == Status::CommitRefused {
                    v.value.to_le_bytes().to_vec()
                } else {
                    Vec::new()
                };
                self.outbox.push(Outbound::Reply {
                    host,
                    req_id,
                    status: v.status,
                    bytes,
                });
            }
        }
    }

    /// `host` is lost: commits it waits for are forgotten (nobody is left to answer).
    pub(super) fn commits_host_lost(&self, host: u16, n: &mut Notify) {
        self.take_commits(
            0..self.devs.len(),
            |p| matches!(p.origin, CommitOrigin::Remote { host: h, .. } if h == host),
            None,
            n,
        );
    }

    /// Take the commits of every device that `pred` selects and complete them with `status`
    /// (`None`: forget them, their initiator's rings are gone).
    fn take_commits(
        &self,
        devs: impl Iterator<Item = usize>,
        pred: impl Fn(&PendingCommit) -> bool,
        status: Option<Status>,
        n: &mut Notify,
    ) {
        for dev in devs {
            let gone: Vec<PendingCommit> = {
                let mut d = self.dev(dev);
                if d.commits.pending.is_empty() {
                    continue;
                }
                let ids: Vec<u64> = d
                    .commits
                    .pending
                    .iter()
                    .filter(|(_, p)| pred(p))
                    .map(|(&id, _)| id)
                    .collect();
                ids.iter()
                    .filter_map(|id| d.commits.pending.remove(id))
                    .collect()
            };
            if let Some(status) = status {
                for p in gone {
                    self.finish_commit(p.origin, Verdict { status, value: 0 }, n);
                }
            }
        }
    }

    /// Commits whose deadline passed complete TIMED_OUT; returns how many. Called by the
    /// daemon's commit timer.
    pub fn expire_commits(&self, now: Instant, n: &mut Notify) -> usize {
        let mut expired = 0;
        for dev in 0..self.devs.len() {
            let gone: Vec<PendingCommit> = {
                let mut d = self.dev(dev);
                let ids: Vec<u64> = d
                    .commits
                    .pending
                    .iter()
                    .filter(|(_, p)| p.deadline <= now)
                    .map(|(&id, _)| id)
                    .collect();
                ids.iter()
                    .filter_map(|id| d.commits.pending.remove(id))
                    .collect()
            };
            for p in gone {
                debug!(dev, src = %p.src, "commit timed out at the target");
                expired += 1;
                self.finish_commit(
                    p.origin,
                    Verdict {
                        status: Status::TimedOut,
                        value: 0,
                    },
                    n,
                );
            }
        }
        if expired > 0 && self.fenced_total.load(Ordering::Acquire) > 0 {
            self.run_fenced(n);
        }
        expired
    }

    /// Target endpoint `ep` of `dev` closed: its commits complete PEER_GONE.
    pub(super) fn commits_target_closed(&self, dev: usize, ep: usize, n: &mut Notify) {
        self.take_commits(
            std::iter::once(dev),
            |p| p.target_ep == ep,
            Some(Status::PeerGone),
            n,
        );
    }

    /// Device `dev` is torn down: commits it waits for as initiator are completed CANCELED
    /// (`cancel`) or forgotten (its rings are gone); its posted COMMIT_EVENT requests go the
    /// same way. (Its endpoints' closes already failed the commits targeting it.)
    pub(super) fn commits_teardown(&self, dev: usize, cancel: bool, n: &mut Notify) {
        self.take_commits(
            0..self.devs.len(),
            |p| p.waited_by_dev(dev, None),
            cancel.then_some(Status::Canceled),
            n,
        );
        let (posted, port) = {
            let mut d = self.dev(dev);
            let posted: Vec<Req> = d.commits.posted.drain(..).collect();
            // Whatever still targets the device (endpoints are closed: nothing should).
            let rest: Vec<PendingCommit> = std::mem::take(&mut d.commits.pending)
                .into_values()
                .collect();
            let port = d.port.clone();
            drop(d);
            for p in rest {
                self.finish_commit(
                    p.origin,
                    Verdict {
                        status: Status::PeerGone,
                        value: 0,
                    },
                    n,
                );
            }
            (posted, port)
        };
        if let (true, Some(p)) = (cancel, port) {
            for r in &posted {
                self.fail(dev, &p, r, Status::Canceled, n);
            }
        }
    }

    /// TX queue `queue` of `dev` stops: its FLUSHes waiting for a verdict complete CANCELED
    /// before the ring does.
    pub(super) fn commits_queue_stopped(&self, dev: usize, queue: u16, n: &mut Notify) {
        self.take_commits(
            0..self.devs.len(),
            |p| p.waited_by_dev(dev, Some(queue)),
            Some(Status::Canceled),
            n,
        );
    }

    /// Queue `queue` of `dev` stops: its posted COMMIT_EVENT requests leave (the caller
    /// completes them CANCELED). Events already delivered stay answerable.
    pub(super) fn commits_stop_queue(d: &mut Dev, queue: u16) -> Vec<Req> {
        let (gone, keep): (VecDeque<Req>, VecDeque<Req>) =
            d.commits.posted.drain(..).partition(|r| r.queue == queue);
        d.commits.posted = keep;
        gone.into_iter().collect()
    }
}
