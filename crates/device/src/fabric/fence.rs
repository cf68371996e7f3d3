// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! FENCE (spec §6.12.2): a fenced TX request waits until the earlier sends of its endpoint to
//! the same peer are done; later TX requests of that endpoint queue behind it.
//!
//! A fence is released by another device's thread (the receiver that takes the held send), so
//! any thread may start a device's deferred requests; one at a time does, in order
//! ([`DevCell::fence_runner`](super::DevCell)), and a thread that finds the runner busy leaves
//! a mark ([`DevCell::fence_dirty`](super::DevCell)) the runner checks before it lets go.

use std::sync::atomic::Ordering;

use vfabric_proto::{flags, FabricAddr};

use super::{Body, Fabric, Notify, Port};
use crate::chain::{GuestMemoryMmap, Req};

impl Fabric {
    /// A TX request: deferred if its endpoint has deferred requests not yet started or it is
    /// itself fenced behind unfinished earlier requests, otherwise started.
    #[inline]
    pub(super) fn op_tx(
        &self,
        dev: usize,
        port: &Port,
        smem: Option<&GuestMemoryMmap>,
        req: &mut Req,
        n: &mut Notify,
    ) {
        if self.starts_at_once(dev, req) {
            return self.start_tx(dev, port, smem, req, n);
        }
        let ep = req.req.ep as usize;
        let waiting = self.dev(dev).ep(ep).map(|e| e.fence_pending > 0);
        let Some(waiting) = waiting else {
            return self.fail(dev, port, req, vfabric_proto::Status::BadEndpoint, n);
        };
        if waiting || (req.req.flags & flags::FENCE != 0 && self.fence_blocked(dev, req)) {
            let mut d = self.dev(dev);
            if let Some(e) = d.ep_mut(ep) {
                e.fenced.push_back(req.take());
                e.fence_pending += 1;
                self.devs[dev].fenced.fetch_add(1, Ordering::AcqRel);
                self.fenced_total.fetch_add(1, Ordering::AcqRel);
            }
            return;
        }
        self.start_tx(dev, port, smem, req, n);
    }

    /// Whether TX request `req` of `dev` starts at once: nothing is deferred on this device
    /// (only this device's own thread defers its requests) and no fence is asked, so its
    /// endpoint's queue need not be looked at. Inlined where requests are dispatched, so that
    /// a send goes straight to [`Fabric::op_send`].
    #[inline(always)]
    pub(super) fn starts_at_once(&self, dev: usize, req: &Req) -> bool {
        req.req.flags & flags::FENCE == 0 && self.devs[dev].fenced.load(Ordering::Acquire) == 0
    }

    /// Whether a FENCE request of `dev` must wait: an earlier send of its endpoint to the same
    /// peer is still held, or (for DELIVERY_COMPLETE) still buffered unreceived at the peer.
    /// RMA and atomics complete synchronously on one host, so only sends can be outstanding;
    /// towards another host any request waiting for its verdict blocks.
    fn fence_blocked(&self, dev: usize, req: &Req) -> bool {
        let r = &req.req;
        let Some((gen, _)) = self.ep_info(dev, r.ep) else {
            return false;
        };
        let me = FabricAddr::new(self.node_addr(dev), r.ep, gen);
        let Some((ddev, dep)) = self.locate(r.peer) else {
            return self.remote_fence_blocked(dev, r.ep, r.peer);
        };
        let strong = r.flags & (flags::DELIVERY_COMPLETE | flags::COMMIT_COMPLETE) != 0;
        let d = self.dev(ddev);
        // A commit of this endpoint waiting for the target's verdict has not completed either.
        d.commits.waiting_from(me)
            || d.live_ep(dep, r.peer.generation).is_some_and(|e| {
                e.unexpected.iter().any(|m| {
                    m.src_dev == dev
                        && m.meta.src == me
                        && (strong || matches!(m.body, Body::Held(..)))
                })
            })
    }

    /// Start deferred requests whose fence is satisfied now, on every device that has some.
    pub(super) fn run_fenced(&self, n: &mut Notify) {
        for dev in 0..self.devs.len() {
            if self.devs[dev].fenced.load(Ordering::Acquire) > 0 {
                self.run_fenced_dev(dev, n);
            }
        }
    }

    fn run_fenced_dev(&self, dev: usize, n: &mut Notify) {
        let cell = &self.devs[dev];
        cell.fence_dirty.store(true, Ordering::Release);
        loop {
            let Ok(runner) = cell.fence_runner.try_lock() else {
                // The runner sees the mark before it lets go.
                return;
            };
            while cell.fence_dirty.swap(false, Ordering::AcqRel) {
                self.start_deferred(dev, n);
            }
            drop(runner);
            if !cell.fence_dirty.load(Ordering::Acquire) {
                return;
            }
        }
    }

    /// Start, in order, the deferred requests of `dev` that may go now. Only the fence runner
    /// of `dev` calls this.
    fn start_deferred(&self, dev: usize, n: &mut Notify) {
        let (port, eps) = {
            let d = self.dev(dev);
            let Some(port) = d.port.clone() else {
                return;
            };
            (port, d.eps.len())
        };
        for ep in 0..eps {
            loop {
                let front = self
                    .dev(dev)
                    .ep(ep)
                    .and_then(|e| e.fenced.front().map(|r| (r.req, e.generation)));
                let Some((front, gen)) = front else { break };
                if front.flags & flags::FENCE != 0 {
                    let probe = Req {
                        queue: 0,
                        head: 0,
                        req: front,
                        payload: Default::default(),
                        data: Default::default(),
                        comp: Default::default(),
                        resolved: Default::default(),
                    };
                    if self.fence_blocked(dev, &probe) {
                        break;
                    }
                }
                let req = {
                    let mut d = self.dev(dev);
                    match d.ep_mut(ep) {
                        Some(e) if e.generation == gen => e.fenced.pop_front(),
                        _ => None,
                    }
                };
                let Some(mut req) = req else { break };
                self.start_tx(dev, &port, None, &mut req, n);
                let mut d = self.dev(dev);
                if let Some(e) = d.ep_mut(ep).filter(|e| e.generation == gen) {
                    e.fence_pending = e.fence_pending.saturating_sub(1);
                }
                drop(d);
                self.unfence(dev, 1);
            }
        }
    }
}
