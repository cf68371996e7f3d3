// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Noticing that a peer of an RDM endpoint disappeared.
//!
//! A receive posted for FI_ADDR_UNSPEC is not tied to one peer, so the device never fails it
//! when a peer's device disconnects, and a consumer waiting on it (`fi_pingpong`'s RDM
//! survivor does) would wait forever. The domain therefore watches the remote peers its AVs
//! name: a provider-private endpoint posts, per peer, a receive directed at that peer, which no
//! one ever sends to; the device completes it PEER_GONE when the peer's endpoint closes or its
//! device goes away. Each CQ of the domain then reports every gone peer once, as an error
//! entry not tied to an operation (`op_context` NULL, `err` FI_EHOSTUNREACH, `prov_errno`
//! PEER_GONE) — as rxm does when a connection to a peer fails. A peer that closed its endpoint
//! in order (the device marks that PEER_GONE with `data` = PEER_CLOSED) is not reported: an
//! orderly close is no error (Open MPI's ranks close theirs in `MPI_Finalize` while others
//! still poll). Peers on the domain's own device and peers beyond [`MAX_WATCHED`] are not
//! watched.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use vfabric::{
    AddressVector, BindFlags, CompletionQueue, CqAttr, CqErrEntry, Domain, Endpoint, EpAttr,
    EpType, FabricAddr, Status,
};

/// Peers watched per domain (each holds one receive on the private endpoint's ring).
pub const MAX_WATCHED: usize = 64;

/// The private endpoint and what it watches.
pub struct PeerWatch {
    ep: Endpoint,
    cq: CompletionQueue,
    av: AddressVector,
    /// Watched peers by the context of their receive.
    watched: Mutex<HashMap<u64, FabricAddr>>,
    next_ctx: AtomicUsize,
    /// Peers seen gone, in order; CQs report the ones past their own count.
    gone: Mutex<Vec<FabricAddr>>,
    gone_count: AtomicUsize,
}

impl PeerWatch {
    pub fn open(d: &Domain) -> vfabric::Result<Self> {
        let ep = d.endpoint(EpAttr {
            ep_type: EpType::Rdm,
        })?;
        let cq = d.cq_open(CqAttr::default())?;
        let av = d.av_open()?;
        ep.bind_cq(&cq, BindFlags::BOTH)?;
        ep.bind_av(&av)?;
        ep.enable()?;
        Ok(Self {
            ep,
            cq,
            av,
            watched: Mutex::new(HashMap::new()),
            next_ctx: AtomicUsize::new(1),
            gone: Mutex::new(Vec::new()),
            gone_count: AtomicUsize::new(0),
        })
    }

    /// Start watching `peer` (if remote, not yet watched and below the limit).
    pub fn watch(&self, peer: FabricAddr) {
        if peer.node == self.ep.name().node {
            return;
        }
        let mut w = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if w.len() >= MAX_WATCHED || w.values().any(|a| *a == peer) {
            return;
        }
        let ctx = self.next_ctx.fetch_add(1, Ordering::Relaxed) as u64;
        let a = match self.av.reverse_lookup(&peer) {
            Some(a) => a,
            None => match self.av.insert(peer) {
                Ok(a) => a,
                Err(_) => return,
            },
        };
        if self.ep.recv_vec_from(0, a, ctx).is_ok() {
            w.insert(ctx, peer);
        }
    }

    /// Collect completed watches (delivered by the progress the caller's CQ read drove);
    /// returns how many peers have gone so far.
    pub fn poll(&self) -> usize {
        let mut v = Vec::new();
        while self.cq.queued() > 0 {
            match self.cq.read(&mut v, 16) {
                Ok(_) => v.clear(),
                Err(vfabric::Error::Avail) => {
                    let Some(e) = self.cq.readerr() else { break };
                    let peer = self
                        .watched
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&e.context);
                    // A peer that closed its endpoint in order (EP_CLOSE) is no error, as a
                    // connection shut down in order is none for rxm: only lost peers are told.
                    let lost =
                        e.status == Status::PeerGone && e.data != vfabric::proto::PEER_CLOSED;
                    if let (Some(peer), true) = (peer, lost) {
                        self.gone
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(peer);
                        self.gone_count.fetch_add(1, Ordering::Release);
                    }
                }
                Err(_) => break,
            }
        }
        self.gone_count.load(Ordering::Acquire)
    }

    /// How many watched peers have gone so far.
    pub fn gone_count(&self) -> usize {
        self.gone_count.load(Ordering::Acquire)
    }

    /// Error entries for the peers gone after the first `from`.
    pub fn gone_since(&self, from: usize) -> Vec<CqErrEntry> {
        let g = self.gone.lock().unwrap_or_else(|e| e.into_inner());
        g.iter()
            .skip(from)
            .map(|peer| CqErrEntry {
                context: 0,
                flags: 0,
                len: 0,
                olen: 0,
                status: Status::PeerGone,
                err: vfabric::fi::EHOSTUNREACH,
                prov_errno: Status::PeerGone as i32,
                data: 0,
                tag: 0,
                src: Some(*peer),
                buf: None,
            })
            .collect()
    }
}
