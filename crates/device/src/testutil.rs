// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Test helpers: guests made of plain anonymous memory plus a recording completion sink, so the
//! fabric can be driven without vhost-user.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vfabric_proto::{
    bit, Completion, FabricAddr, Opcode, QueueClass, Request, Status, VIRTIO_FABRIC_F_MQ,
    VIRTIO_FABRIC_F_MSG, VIRTIO_FABRIC_F_REMOTE_CQ_DATA, VIRTIO_FABRIC_F_TAGGED,
    VIRTIO_FABRIC_F_VENDOR_CAPS, VIRTIO_F_VERSION_1,
};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use crate::chain::{GuestMemoryMmap, Parsed, Req, Seg, Segs, Verdict};
use crate::config::{Config, Limits};
use crate::fabric::{CompletionSink, Fabric, Notify, Port};

pub(crate) const ALL_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_FABRIC_F_MSG)
    | bit(VIRTIO_FABRIC_F_TAGGED)
    | bit(VIRTIO_FABRIC_F_MQ)
    | bit(VIRTIO_FABRIC_F_VENDOR_CAPS)
    | bit(VIRTIO_FABRIC_F_REMOTE_CQ_DATA);

pub(crate) const MEM_SIZE: u64 = 8 << 20;

/// Records used-ring entries instead of writing them.
#[derive(Default)]
pub(crate) struct RecSink {
    pub used: Mutex<Vec<(u16, u16, u32)>>,
    /// Completed, not yet published: (queue, head, len).
    pub staged: Mutex<Vec<(u16, u16, u32)>>,
    /// Publish calls (one per ring per flushed batch).
    pub publishes: std::sync::atomic::AtomicUsize,
}

impl RecSink {
    pub fn find(&self, queue: u16, head: u16) -> Option<u32> {
        let u = self.used.lock().unwrap();
        let hits: Vec<_> = u
            .iter()
            .filter(|(q, h, _)| *q == queue && *h == head)
            .collect();
        assert!(hits.len() <= 1, "chain {queue}/{head} completed twice");
        hits.first().map(|(_, _, l)| *l)
    }

    pub fn count(&self) -> usize {
        self.used.lock().unwrap().len()
    }
}

impl CompletionSink for RecSink {
    fn stage(&self, queue: u16, head: u16, len: u32) {
        self.staged.lock().unwrap().push((queue, head, len));
    }

    fn publish(&self, queue: u16) {
        let mut staged = self.staged.lock().unwrap();
        if !staged.iter().any(|(q, _, _)| *q == queue) {
            return;
        }
        self.publishes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut u = self.used.lock().unwrap();
        u.extend(staged.iter().filter(|(q, _, _)| *q == queue).copied());
        staged.retain(|(q, _, _)| *q != queue);
    }
}

pub(crate) struct Guest {
    pub mem: GuestMemoryMmap,
    pub atomic: GuestMemoryAtomic<GuestMemoryMmap>,
    pub sink: Arc<RecSink>,
    next: u64,
    next_head: u16,
}

impl Guest {
    pub fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        Self {
            atomic: GuestMemoryAtomic::new(mem.clone()),
            mem,
            sink: Arc::new(RecSink::default()),
            next: 0x1000,
            next_head: 0,
        }
    }

    pub fn port(&self) -> Port {
        Port::new(self.atomic.clone(), self.sink.clone(), None)
    }

    pub fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next;
        self.next = (self.next + len + 63) & !63;
        assert!(self.next < MEM_SIZE, "test guest out of memory");
        a
    }
}

/// A submitted request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct H {
    pub dev: usize,
    pub queue: u16,
    pub head: u16,
    pub comp: u64,
    pub data: u64,
}

/// Fabric id of every test `World` (addresses built by hand use it).
pub(crate) const TEST_FABRIC: u32 = 0xf00d;

pub(crate) struct World {
    pub fabric: Fabric,
    pub guests: Vec<Guest>,
    /// Requests are handed on with the host addresses of their streams resolved, as a ring's
    /// parse hands them (plain receives as `Verdict::Recv`); with `plain_sends`, sends of the
    /// plain shape as `Verdict::Send`.
    pub resolve: bool,
    pub plain_sends: bool,
}

impl World {
    pub fn new(n: usize, limits: Limits) -> Self {
        let mut c = Config::new((0..n).map(|i| PathBuf::from(format!("/t{i}"))).collect());
        c.limits = limits;
        c.fabric_id = TEST_FABRIC;
        let fabric = Fabric::new(&c);
        let guests: Vec<Guest> = (0..n).map(|_| Guest::new()).collect();
        for (i, g) in guests.iter().enumerate() {
            fabric.connect(i, g.port());
        }
        Self {
            fabric,
            guests,
            resolve: false,
            plain_sends: false,
        }
    }

    pub fn submit(&mut self, dev: usize, r: Request, payload: &[u8], cap: u64) -> H {
        let data = self.guests[dev].alloc(cap);
        self.submit_into(
            dev,
            r,
            payload,
            &[Seg {
                addr: data,
                len: cap as u32,
            }],
        )
    }

    /// [`World::submit`] with a data area of the ranges `data` (`H::data` is the first's).
    pub fn submit_into(&mut self, dev: usize, r: Request, payload: &[u8], data: &[Seg]) -> H {
        let g = &mut self.guests[dev];
        let queue = match r.opcode.queue_class() {
            QueueClass::Control => 0,
            QueueClass::Tx => 1,
            QueueClass::Rx => 2,
        };
        let head = g.next_head;
        g.next_head = g.next_head.wrapping_add(1);
        let pay = g.alloc(payload.len() as u64);
        g.mem.write_slice(payload, GuestAddress(pay)).unwrap();
        let comp = g.alloc(64);
        // Poison the completion so a missing write shows.
        g.mem.write_slice(&[0xee; 64], GuestAddress(comp)).unwrap();
        let req = Req {
            queue,
            head,
            req: r,
            payload: Segs::from_slice(&[Seg {
                addr: pay,
                len: payload.len() as u32,
            }]),
            data: Segs::from_slice(data),
            comp: Segs::from_slice(&[Seg {
                addr: comp,
                len: 64,
            }]),
            resolved: Default::default(),
        };
        let mut n = Notify::default();
        if self.resolve {
            self.handle_resolved(dev, req, &mut n);
        } else {
            self.fabric
                .handle(dev, &mut vec![Parsed::Req(req)], ALL_FEATURES, &mut n);
        }
        H {
            dev,
            queue,
            head,
            comp,
            data: data.first().map_or(0, |s| s.addr),
        }
    }

    /// [`Fabric::handle`] of `req` with its host addresses resolved ([`World::resolve`]).
    fn handle_resolved(&self, dev: usize, mut req: Req, n: &mut Notify) {
        let Some(port) = self.fabric.begin(dev, ALL_FEATURES) else {
            return;
        };
        let mem = port.mem.memory().into_inner();
        req.resolve_in(mem.clone());
        let (mut req, v) = Parsed::Req(req).split();
        let v = match req.plain_tx() {
            Some(tx) if self.plain_sends && v == Verdict::Req => Verdict::Send(tx),
            _ => v,
        };
        self.fabric
            .handle_one(dev, &port, &mem, &mut req, &v, ALL_FEATURES, n);
        self.fabric.end_batch(n);
        n.flush();
    }

    /// Completion and used length, if the chain was completed.
    pub fn result(&self, h: &H) -> Option<(Completion, u32)> {
        let g = &self.guests[h.dev];
        let used = g.sink.find(h.queue, h.head)?;
        let c: Completion = g.mem.read_obj(GuestAddress(h.comp)).unwrap();
        Some((c, used))
    }

    pub fn status(&self, h: &H) -> Option<Status> {
        self.result(h)
            .map(|(c, _)| Status::from_u32(c.status.into()).expect("valid status"))
    }

    pub fn comp(&self, h: &H) -> Completion {
        self.result(h).expect("request not completed").0
    }

    pub fn data(&self, h: &H, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.guests[h.dev]
            .mem
            .read_slice(&mut v, GuestAddress(h.data))
            .unwrap();
        v
    }

    pub fn open(&mut self, dev: usize, kind: u64) -> FabricAddr {
        let mut r = Request::new(Opcode::EpOpen);
        r.data = kind;
        let h = self.submit(dev, r, &[], 0);
        let c = self.comp(&h);
        assert_eq!(self.status(&h), Some(Status::Ok));
        FabricAddr::from_wire(&c.src)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &mut self,
        dev: usize,
        from: FabricAddr,
        to: FabricAddr,
        tag: Option<u64>,
        flags: u64,
        cookie: u64,
        payload: &[u8],
    ) -> H {
        let mut r = Request::new(if tag.is_some() {
            Opcode::TSend
        } else {
            Opcode::Send
        });
        r.ep = from.ep;
        r.peer = to;
        r.tag = tag.unwrap_or(0);
        r.flags = flags;
        r.cookie = cookie;
        self.submit(dev, r, payload, 0)
    }

    /// `tag` = (tag, ignore).
    #[allow(clippy::too_many_arguments)]
    pub fn recv(
        &mut self,
        dev: usize,
        ep: FabricAddr,
        tag: Option<(u64, u64)>,
        flags: u64,
        cookie: u64,
        data: u64,
        cap: u64,
    ) -> H {
        let mut r = Request::new(if tag.is_some() {
            Opcode::TRecv
        } else {
            Opcode::Recv
        });
        r.ep = ep.ep;
        if let Some((t, i)) = tag {
            r.tag = t;
            r.ignore = i;
        }
        r.flags = flags;
        r.cookie = cookie;
        r.data = data;
        self.submit(dev, r, &[], cap)
    }
}
