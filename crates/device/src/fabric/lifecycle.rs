// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Connections and endpoints coming and going: connect, disconnect, reset, queue stop,
//! EP_OPEN/EP_CLOSE/CANCEL, and the peer-gone completions they cause.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::debug;
use vfabric_proto::{ep_open, flags, FabricAddr, Status, PEER_CLOSED};

use super::posted::Posted;
use super::{eager_cost, Body, Endpoint, Fabric, Msg, Notify, Port, Slot, Teardown};
use crate::chain::{completion, Req};

impl Fabric {
    /// Attach a frontend's memory and rings to device `dev`.
    pub fn connect(&self, dev: usize, mut port: Port) {
        let Some(counters) = self.counters.get(dev) else {
            return;
        };
        port.counters = counters.clone();
        let mut d = self.dev(dev);
        d.port = Some(Arc::new(port));
        d.rx_quiet.store(false, Ordering::Release);
        d.rx_waking = false;
        drop(d);
        if let Some(c) = self.counters.get(dev) {
            c.connected.store(true, Ordering::Relaxed);
        }
    }

    /// The frontend of `dev` is gone: close its endpoints, forget its chains, complete peers'
    /// held sends to it `PeerGone`. Eager data it sent stays deliverable.
    pub fn disconnect(&self, dev: usize, n: &mut Notify) {
        if dev >= self.devs.len() {
            return;
        }
        self.teardown(dev, Teardown::Silent, n);
        let mut d = self.dev(dev);
        d.port = None;
        d.rx_waking = false;
        drop(d);
        if let Some(c) = self.counters.get(dev) {
            c.connected.store(false, Ordering::Relaxed);
        }
    }

    /// Reset `dev` (RESET_DEVICE, memory table change) without detaching it.
    pub fn reset(&self, dev: usize, mode: Teardown, n: &mut Notify) {
        if dev >= self.devs.len() {
            return;
        }
        self.teardown(dev, mode, n);
    }

    fn teardown(&self, dev: usize, mode: Teardown, n: &mut Notify) {
        // First, so that commits this device waits for as initiator are dropped with its rings
        // (Silent) rather than completed into them by the endpoint closes below.
        self.commits_teardown(dev, mode == Teardown::Cancel, n);
        let eps = self.dev(dev).eps.len();
        for ep in 0..eps {
            self.close_ep(dev, ep, mode, n);
        }
        // Whatever else it still waits for from other hosts (FLUSHes, ADDR_CHECKs) goes too.
        self.withdraw_remote_of(dev, |_| true, mode == Teardown::Silent, n);
        // Every endpoint of the device is closed: one pass for peers' directed receives, here
        // and on other hosts.
        let node = self.node_addr(dev);
        self.fail_directed_at(|peer| peer.node == node, Some(dev), false, n);
        self.outbox
            .ep_gone(FabricAddr::new(node, 0, 0), true, false);
        self.release_services(|a| a.node == node);
        // The device's regions go with it: later accesses complete ACCESS at their initiator.
        let (mrs, events, port) = {
            let mut d = self.dev(dev);
            d.pending_events.clear();
            let mrs: Vec<_> = d.mrs.drain().map(|(_, mr)| mr).collect();
            let events: Vec<Req> = d.mr_events.drain(..).collect();
            (mrs, events, d.port.clone())
        };
        for mr in mrs {
            mr.retire();
        }
        if mode == Teardown::Cancel {
            if let Some(p) = port {
                for r in &events {
                    self.fail(dev, &p, r, Status::Canceled, n);
                }
            }
        }
    }

    /// Virtqueue `queue` of `dev` is being stopped (GET_VRING_BASE): its in-flight chains
    /// (posted receives, held sends) complete `Canceled` before the ring stops.
    pub fn stop_queue(&self, dev: usize, queue: u16, n: &mut Notify) {
        if dev >= self.devs.len() {
            return;
        }
        let mut victims = Vec::new();
        let mut direct = Vec::new();
        let port = {
            let mut d = self.dev(dev);
            let Some(port) = d.port.clone() else {
                return;
            };
            let mut unfenced = 0;
            for slot in d.eps.iter_mut() {
                if let Some(e) = slot.ep.as_mut() {
                    let (gone, keep): (VecDeque<Posted>, VecDeque<Posted>) =
                        e.posted.drain(..).partition(|r| r.queue == queue);
                    e.posted = keep;
                    victims.extend(gone.into_iter().map(Posted::into_req));
                    let (gone, keep): (VecDeque<Req>, VecDeque<Req>) =
                        e.fenced.drain(..).partition(|r| r.queue == queue);
                    e.fenced = keep;
                    e.fence_pending = e.fence_pending.saturating_sub(gone.len());
                    unfenced += gone.len();
                    victims.extend(gone);
                }
            }
            // A receive waiting for a pulled message goes; the message is a stub again,
            // at the front (it is older than what is queued), pulled again when matched.
            for slot in d.eps.iter_mut() {
                if let Some(e) = slot.ep.as_mut() {
                    let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut e.pulling)
                        .into_iter()
                        .partition(|p| p.queue() == queue);
                    e.pulling = keep;
                    for p in gone.into_iter().rev() {
                        let (m, r) = p.unpull();
                        e.unexpected.push_front(m);
                        victims.push(r);
                    }
                }
            }
            // This device's own queue is stopping: it arms its rings when it runs again, and
            // decides anew then (a message is unexpected again).
            d.rx_quiet.store(false, Ordering::Release);
            // A receive the uplink reads into goes once its read is over (below).
            for slot in d.eps.iter_mut() {
                if let Some(e) = slot.ep.as_mut() {
                    let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut e.direct)
                        .into_iter()
                        .partition(|r| r.queue() == queue);
                    e.direct = keep;
                    direct.extend(gone);
                }
            }
            let (gone, keep): (VecDeque<Req>, VecDeque<Req>) =
                d.mr_events.drain(..).partition(|r| r.queue == queue);
            d.mr_events = keep;
            victims.extend(gone);
            victims.extend(Self::commits_stop_queue(&mut d, queue));
            self.unfence(dev, unfenced);
            port
        };
        victims.extend(self.take_held_all(|m, r| m.src_dev == dev && r.queue == queue));
        // Its FLUSHes waiting for a target's verdict are in flight on this ring too, and so
        // are its requests waiting for another host's verdict.
        self.commits_queue_stopped(dev, queue, n);
        self.withdraw_remote_of(dev, |r| r.queue == queue, false, n);
        self.direct_closed(dev, Some(&port), direct, false, n);
        for r in victims {
            let c = completion(Status::Canceled, r.req.cookie);
            self.done(dev, &port, &r, &c, 0, n);
        }
    }

    /// `count` deferred requests of `dev` left its fence queues without being started.
    pub(super) fn unfence(&self, dev: usize, count: usize) {
        if count > 0 {
            self.devs[dev].fenced.fetch_sub(count, Ordering::AcqRel);
            self.fenced_total.fetch_sub(count, Ordering::AcqRel);
        }
    }

    /// Close endpoint `ep` of `dev`: its posted receives and its held sends leave the fabric
    /// (completing `Canceled` unless `Silent`), messages queued at it are dropped (held senders
    /// complete `PeerGone`).
    pub(super) fn close_ep(&self, dev: usize, ep: usize, mode: Teardown, n: &mut Notify) {
        let (mut e, port) = {
            let mut d = self.dev(dev);
            let Some(e) = d.eps.get_mut(ep).and_then(|s| s.ep.take()) else {
                return;
            };
            self.set_ep_word(dev, ep, None);
            // Under the lock: a directed receive's source found open before this is re-checked.
            self.devs[dev].ep_closes.fetch_add(1, Ordering::AcqRel);
            for m in &e.unexpected {
                if let Body::Eager(buf) = &m.body {
                    d.unexpected_bytes = d
                        .unexpected_bytes
                        .saturating_sub(eager_cost(buf.len() as u64));
                }
            }
            self.unfence(dev, e.fenced.len());
            (e, d.port.clone())
        };
        debug!(dev, ep, generation = e.generation, ?mode, "endpoint closed");
        if mode == Teardown::Cancel {
            if let Some(p) = &port {
                for r in &e.posted {
                    self.fail_posted(dev, p, r, Status::Canceled, n);
                }
                for r in &e.fenced {
                    self.fail(dev, p, r, Status::Canceled, n);
                }
            }
        }
        let pulling = std::mem::take(&mut e.pulling);
        self.pulling_closed(dev, port.as_deref(), pulling, mode == Teardown::Silent, n);
        let direct = std::mem::take(&mut e.direct);
        self.direct_closed(dev, port.as_deref(), direct, mode == Teardown::Silent, n);
        for m in e.unexpected {
            if m.src_dev == dev && mode == Teardown::Silent {
                continue;
            }
            self.release(m, Status::PeerGone, n);
        }
        // Commits waiting for this endpoint's verdict can never get it now.
        self.commits_target_closed(dev, ep, n);
        let generation = e.generation;
        let held = self.take_held_all(|m, _| {
            m.src_dev == dev && m.meta.src.ep as usize == ep && m.meta.src.generation == generation
        });
        if mode == Teardown::Cancel {
            if let Some(p) = &port {
                for r in held {
                    self.fail(dev, p, &r, Status::Canceled, n);
                }
            }
        }
        // Its requests waiting for another host's verdict are its held sends there. A FLUSH
        // stays: the initiator's EP_CLOSE leaves its commits pending (§6.17.3).
        self.withdraw_remote_of(
            dev,
            |r| r.req.ep as usize == ep && r.req.opcode != vfabric_proto::Opcode::Flush,
            mode == Teardown::Silent,
            n,
        );
    }

    /// Complete `PeerGone` every posted receive, on any device but `skip`, directed at an
    /// address `gone` says is closed: they can never match now.
    ///
    /// `closed`: the source's own driver closed it (EP_CLOSE): the completions carry
    /// `data` = [`PEER_CLOSED`], telling an orderly close from a lost peer (reset, disconnect, a
    /// lost host: `data` = 0).
    pub(super) fn fail_directed_at(
        &self,
        gone: impl Fn(FabricAddr) -> bool,
        skip: Option<usize>,
        closed: bool,
        n: &mut Notify,
    ) {
        for dev in (0..self.devs.len()).filter(|&d| Some(d) != skip) {
            let (victims, port) = {
                let mut d = self.dev(dev);
                let Some(port) = d.port.clone() else { continue };
                // Directed receives not taken yet (LAZY_RX) fail when the device takes them.
                d.look_at_rx();
                let mut victims = Vec::new();
                for slot in d.eps.iter_mut() {
                    let Some(e) = slot.ep.as_mut() else { continue };
                    let hit = |r: &Posted| r.flags & flags::DIRECTED != 0 && gone(r.peer);
                    if !e.posted.iter().any(hit) {
                        continue;
                    }
                    let (hit, keep): (VecDeque<Posted>, VecDeque<Posted>) =
                        e.posted.drain(..).partition(hit);
                    e.posted = keep;
                    victims.extend(hit);
                }
                (victims, port)
            };
            for r in &victims {
                let mut c = completion(Status::PeerGone, r.cookie);
                if closed {
                    c.data = PEER_CLOSED.into();
                }
                self.done_posted(dev, &port, r, &c, n);
            }
        }
    }

    /// A directed receive (`cookie`) was just queued on endpoint `ep` of `dev`: if its source
    /// is not open, take it back and complete it `PeerGone`. Checked after queueing, so a
    /// source closing concurrently is seen either here or by [`Fabric::fail_directed_at`].
    pub(super) fn check_directed_source(
        &self,
        dev: usize,
        port: &Port,
        ep: usize,
        src: FabricAddr,
        cookie: u64,
        n: &mut Notify,
    ) {
        let Some(located) = self.locate(src) else {
            // Another host's endpoint (a peer of the uplink that is up): the receive stays
            // posted, and that host is asked whether it is open unless that is known (a "gone"
            // answer, or its EP_GONE later, fails it). Anything else names nothing and fails
            // below.
            if self.not_here(src) == Status::Unsupported && self.outbox.watch(src) {
                return;
            }
            return self.fail_directed((dev, port, ep), src, cookie, false, n);
        };
        let (sdev, sep) = located;
        // Read before the look: a close after it bumps the count past what is remembered.
        let closes = self.devs[sdev].ep_closes.load(Ordering::Acquire);
        let (open, closed) = {
            let d = self.dev(sdev);
            let open = d.live_ep(sep, src.generation).map(|_| closes);
            // Closed by its own driver before this receive came: as orderly as a close after.
            let closed = d.eps.get(sep).is_some_and(|s| {
                s.ep.is_none() && s.closed_in_order && s.generation == src.generation
            });
            (open, closed)
        };
        if let Some(closes) = open {
            if let Some(e) = self.dev(dev).ep_mut(ep) {
                e.live_src = Some((src, sdev, closes));
            }
            return;
        }
        self.fail_directed((dev, port, ep), src, cookie, closed, n);
    }

    /// Fail `PeerGone` the receive `cookie` of `ep`, directed at `src`, if still posted
    /// (`data` = [`PEER_CLOSED`] when `closed`: `src` was closed by its own driver).
    fn fail_directed(
        &self,
        (dev, port, ep): (usize, &Port, usize),
        src: FabricAddr,
        cookie: u64,
        closed: bool,
        n: &mut Notify,
    ) {
        let taken = self.dev(dev).ep_mut(ep).and_then(|e| {
            let at = e
                .posted
                .iter()
                .rposition(|r| r.cookie == cookie && r.directed_at(src))?;
            e.posted.remove(at)
        });
        if let Some(r) = taken {
            let mut c = completion(Status::PeerGone, r.cookie);
            if closed {
                c.data = PEER_CLOSED.into();
            }
            self.done_posted(dev, port, &r, &c, n);
        }
    }

    /// Remove every held send matching `pred` from every endpoint's unexpected queue, one
    /// device lock at a time.
    pub(super) fn take_held_all(&self, pred: impl Fn(&Msg, &Req) -> bool) -> Vec<Req> {
        let mut out = Vec::new();
        for dev in 0..self.devs.len() {
            let mut d = self.dev(dev);
            for slot in d.eps.iter_mut() {
                let Some(e) = slot.ep.as_mut() else { continue };
                let mut i = 0;
                while i < e.unexpected.len() {
                    let m = &e.unexpected[i];
                    let hit = matches!(&m.body, Body::Held(r, _) if pred(m, r));
                    if !hit {
                        i += 1;
                        continue;
                    }
                    if let Some(Msg {
                        body: Body::Held(r, _),
                        ..
                    }) = e.unexpected.remove(i)
                    {
                        out.push(r);
                    }
                }
            }
        }
        out
    }

    pub(super) fn op_ep_open(&self, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        let kind = req.req.data;
        if !matches!(
            kind,
            ep_open::TYPE_RDM | ep_open::TYPE_DGRAM | ep_open::TYPE_MSG
        ) {
            return self.fail(dev, port, &req, Status::Invalid, n);
        }
        let node = self.node_addr(dev);
        let mut d = self.dev(dev);
        let eps = &mut d.eps;
        let id = match eps.iter().position(|s| s.ep.is_none()) {
            Some(id) => id,
            None if eps.len() < self.limits.max_endpoints as usize => {
                eps.push(Slot::default());
                eps.len() - 1
            }
            None => {
                drop(d);
                return self.fail(dev, port, &req, Status::NoResources, n);
            }
        };
        let slot = &mut eps[id];
        slot.generation = slot.generation.wrapping_add(1).max(1);
        slot.closed_in_order = false;
        slot.ep = Some(Endpoint {
            kind,
            generation: slot.generation,
            posted: VecDeque::new(),
            unexpected: VecDeque::new(),
            fenced: VecDeque::new(),
            fence_pending: 0,
            live_src: None,
            pulling: Vec::new(),
            direct: Vec::new(),
        });
        let addr = FabricAddr::new(node, id as u32, slot.generation);
        self.set_ep_word(dev, id, Some((slot.generation, kind)));
        drop(d);
        debug!(dev, %addr, kind, "endpoint opened");
        let mut c = completion(Status::Ok, req.req.cookie);
        c.data = (id as u64).into();
        c.src = addr.to_wire();
        self.done(dev, port, &req, &c, 0, n);
    }

    pub(super) fn op_ep_close(&self, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        if self.ep_info(dev, req.req.ep).is_none() {
            return self.fail(dev, port, &req, Status::BadEndpoint, n);
        }
        let generation = self.ep_info(dev, req.req.ep).map_or(0, |(g, _)| g);
        self.close_ep(dev, req.req.ep as usize, Teardown::Cancel, n);
        if let Some(slot) = self.dev(dev).eps.get_mut(req.req.ep as usize) {
            slot.closed_in_order = slot.ep.is_none() && slot.generation == generation;
        }
        let gone = FabricAddr::new(self.node_addr(dev), req.req.ep, generation);
        self.fail_directed_at(|peer| peer == gone, None, true, n);
        self.outbox.ep_gone(gone, false, true);
        self.release_services(|a| a == gone);
        self.fail(dev, port, &req, Status::Ok, n);
    }

    pub(super) fn op_cancel(&self, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        let ep = req.req.ep;
        let cookie = req.req.data;
        let victim = {
            let mut d = self.dev(dev);
            let Some(e) = d.ep_mut(ep as usize) else {
                drop(d);
                return self.fail(dev, port, &req, Status::BadEndpoint, n);
            };
            let generation = e.generation;
            let posted = e
                .posted
                .iter()
                .position(|r| r.cookie == cookie)
                .and_then(|i| e.posted.remove(i))
                .map(Posted::into_req);
            posted.ok_or(generation)
        };
        let victim = victim.or_else(|generation| {
            self.take_held_all(|m, r| {
                m.src_dev == dev
                    && m.meta.src.ep == ep
                    && m.meta.src.generation == generation
                    && r.req.cookie == cookie
            })
            .into_iter()
            .next()
            .ok_or(())
        });
        match victim {
            Ok(v) => {
                self.fail(dev, port, &v, Status::Canceled, n);
                self.fail(dev, port, &req, Status::Ok, n);
            }
            Err(()) => self.fail(dev, port, &req, Status::NoMessage, n),
        }
    }
}

impl Fabric {
    /// Whether `src` is known open without looking at its device: the receiving endpoint `e`
    /// found it open and no endpoint of its device closed since.
    pub(super) fn known_live(&self, e: &Endpoint, src: FabricAddr) -> bool {
        let Some((a, sdev, closes)) = e.live_src else {
            return false;
        };
        // `sdev` is where `a` was found (`locate`): no need to locate it again.
        a == src
            && self
                .devs
                .get(sdev)
                .is_some_and(|d| d.ep_closes.load(Ordering::Acquire) == closes)
    }
}
