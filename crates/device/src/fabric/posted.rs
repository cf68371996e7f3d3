// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Posted receives as compact records: what matching and placement need, not the parsed
//! request (≈280 bytes, moved into the queue and out of it once per message otherwise).

use std::sync::Arc;

use vfabric_proto::{flags, tag_matches, Completion, FabricAddr, Opcode, Request, COMPLETION_LEN};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard};

use super::{completion_bytes, rx_completion, store_completion, CompWords, Meta};
#[cfg(doc)]
use crate::chain::Verdict;
use crate::chain::{guest_copy, GuestMemoryMmap, MemFault, PlainRx, Req, Seg, Segs};

/// A receive waiting in its endpoint's posted queue: its chain, the header fields matching
/// and completion read, and where its bytes and completion go.
pub(super) struct Posted {
    pub queue: u16,
    pub head: u16,
    /// A TRECV (tag matching).
    pub tagged: bool,
    pub ep: u32,
    pub flags: u64,
    pub cookie: u64,
    /// The source of a DIRECTED receive.
    pub peer: FabricAddr,
    pub tag: u64,
    pub ignore: u64,
    area: Area,
}

/// Where a posted receive's bytes and completion go.
enum Area {
    /// The shape drivers post: a data area of at most one range and a completion area of
    /// one, with the host addresses the parse resolved (if it did) in `table`.
    One(OneRange),
    /// Any other shape: the request as parsed (boxed, so the common record stays small).
    Full(Box<Req>),
}

struct OneRange {
    data: Seg,
    /// Guest address of the completion area (`COMPLETION_LEN` bytes).
    comp: u64,
    /// The memory table the host addresses were resolved in (the one the chain was parsed
    /// in), held so its mappings stay alive.
    table: Option<Arc<GuestMemoryMmap>>,
    /// Host addresses of the data area's and the completion area's first bytes (0: none).
    data_at: usize,
    comp_at: usize,
}

impl OneRange {
    /// `at` if it was resolved in `mem` (the record's table).
    #[inline(always)]
    fn in_table(&self, mem: &GuestMemoryMmap, at: usize) -> Option<usize> {
        match &self.table {
            Some(t) if at != 0 && std::ptr::eq(Arc::as_ptr(t), mem) => Some(at),
            _ => None,
        }
    }
}

impl Posted {
    /// The record of receive `req` (lent from a batch): its host addresses and memory table
    /// are moved out of it, its streams copied (one range each) or, for another shape, the
    /// request itself taken.
    #[inline(always)]
    pub fn new(req: &mut Req) -> Posted {
        let r = req.req;
        let one = req.data.segs.len() <= 1
            && req.comp.segs.len() == 1
            && req.comp.len == COMPLETION_LEN as u64;
        let area = match one.then(|| req.take_rx_resolved()) {
            Some((table, data_at, comp_at)) => Area::One(OneRange {
                data: req
                    .data
                    .segs
                    .first()
                    .copied()
                    .unwrap_or(Seg { addr: 0, len: 0 }),
                comp: req.comp.segs[0].addr,
                table,
                data_at,
                comp_at,
            }),
            None => Area::Full(Box::new(req.take())),
        };
        Posted {
            queue: req.queue,
            head: req.head,
            tagged: r.opcode == Opcode::TRecv,
            ep: r.ep,
            flags: r.flags,
            cookie: r.cookie,
            peer: r.peer,
            tag: r.tag,
            ignore: r.ignore,
            area,
        }
    }

    /// The record of plain receive `req` (lent from a batch with its header and memory
    /// table, [`Verdict::Recv`]), whose bytes and completion go where `rx` says: what
    /// [`Posted::new`] makes of the request [`PlainRx::fill`] builds, without building it.
    #[inline(always)]
    pub fn plain(req: &mut Req, rx: &PlainRx) -> Posted {
        let r = &req.req;
        Posted {
            queue: req.queue,
            head: req.head,
            tagged: r.opcode == Opcode::TRecv,
            ep: r.ep,
            flags: r.flags,
            cookie: r.cookie,
            peer: r.peer,
            tag: r.tag,
            ignore: r.ignore,
            area: Area::One(OneRange {
                data: rx.data,
                comp: rx.comp,
                table: req.take_table(),
                data_at: rx.data_at,
                comp_at: rx.comp_at,
            }),
        }
    }

    /// The receive as a request again, for the paths that work on requests (large transfers,
    /// other hosts, teardown). A one-range record's host addresses are not carried over: its
    /// accesses look their regions up.
    pub fn into_req(self) -> Req {
        match self.area {
            Area::Full(req) => *req,
            Area::One(o) => {
                let mut req = Request::new(if self.tagged {
                    Opcode::TRecv
                } else {
                    Opcode::Recv
                });
                req.ep = self.ep;
                req.flags = self.flags;
                req.cookie = self.cookie;
                req.peer = self.peer;
                req.tag = self.tag;
                req.ignore = self.ignore;
                let mut r = Req::blank(self.queue, self.head);
                r.req = req;
                r.data = Segs::one(o.data);
                r.comp = Segs::one(Seg {
                    addr: o.comp,
                    len: COMPLETION_LEN as u32,
                });
                r
            }
        }
    }

    /// Drop the record field by field: the memory table (or the boxed request) is all it
    /// owns, so only that is read out of the queue slot (the record is not copied out first,
    /// as its drop glue would).
    #[inline(always)]
    pub fn discard(self) {
        match self.area {
            Area::One(o) => drop(o.table),
            Area::Full(r) => drop(r),
        }
    }

    /// Whether a message `m` matches this receive.
    #[inline(always)]
    pub fn matches(&self, m: &Meta) -> bool {
        self.tagged == m.tagged
            && (!self.tagged || tag_matches(self.tag, self.ignore, m.tag))
            && (self.flags & flags::DIRECTED == 0 || self.peer == m.src)
    }

    /// Whether this is a receive directed at `src`.
    pub fn directed_at(&self, src: FabricAddr) -> bool {
        self.flags & flags::DIRECTED != 0 && self.peer == src
    }

    /// The completion of message `m`, `placed` bytes of it placed here.
    #[inline(always)]
    pub fn completion(&self, m: &Meta, placed: u64) -> Completion {
        rx_completion(self.cookie, self.tagged, m, placed)
    }

    /// Bytes the data area holds.
    #[inline(always)]
    pub fn data_len(&self) -> u64 {
        match &self.area {
            Area::One(o) => u64::from(o.data.len),
            Area::Full(r) => r.data.len,
        }
    }

    /// The data area as a stream.
    pub fn data(&self) -> Segs {
        match &self.area {
            Area::One(o) => Segs::one(o.data),
            Area::Full(r) => r.data.clone(),
        }
    }

    /// Where a one-range record's bytes go, if its parse resolved both areas: the host
    /// addresses of the data area's first byte and of the completion area (`COMPLETION_LEN`
    /// bytes), and the data area's length. Both lie in the memory table the record holds (so
    /// they stay mapped while it lives), the table a placement uses for it
    /// ([`Posted::placement_table`]).
    #[inline(always)]
    pub fn resolved(&self) -> Option<(*mut u8, u64, *mut u8)> {
        match &self.area {
            Area::One(o) if o.table.is_some() && o.data_at != 0 && o.comp_at != 0 => Some((
                o.data_at as *mut u8,
                u64::from(o.data.len),
                o.comp_at as *mut u8,
            )),
            _ => None,
        }
    }

    /// The memory table the receive's host addresses were resolved in, if any.
    #[inline(always)]
    pub fn table(&self) -> Option<&GuestMemoryMmap> {
        match &self.area {
            Area::One(o) => o.table.as_deref(),
            Area::Full(r) => r.table(),
        }
    }

    /// The memory table a message is placed through: the one the receive was parsed in (it
    /// holds it; a table that replaced regions since has cancelled the receives posted in the
    /// old one, `update_memory`), else `receiver`'s current one, loaded into `loaded`. That
    /// saves loading the receiver's table per message.
    #[inline(always)]
    pub fn placement_table<'a>(
        &'a self,
        receiver: &GuestMemoryAtomic<GuestMemoryMmap>,
        loaded: &'a mut Option<GuestMemoryLoadGuard<GuestMemoryMmap>>,
    ) -> &'a GuestMemoryMmap {
        match self.table() {
            Some(t) => t,
            None => loaded.insert(receiver.memory()),
        }
    }

    /// Write `bytes` at the start of the data area.
    #[inline(always)]
    pub fn write_data(&self, mem: &GuestMemoryMmap, bytes: &[u8]) -> Result<(), MemFault> {
        match &self.area {
            Area::One(o) => {
                if bytes.len() as u64 <= u64::from(o.data.len) {
                    if let Some(at) = o.in_table(mem, o.data_at) {
                        // SAFETY: `at` is the host address of the data area's one range in
                        // `mem` (the table it was resolved in, which the record keeps mapped),
                        // and that range holds `bytes.len()` bytes; `bytes` is ours.
                        unsafe { guest_copy(at as *mut u8, bytes.as_ptr(), bytes.len()) };
                        return Ok(());
                    }
                }
                Segs::one(o.data).write_at(mem, 0, bytes)
            }
            Area::Full(r) => r.write_data(mem, bytes),
        }
    }

    /// Write completion `w` into the completion area: stored straight into it through the
    /// host address the parse resolved, if it is in `mem`.
    #[inline(always)]
    pub fn write_comp_words(&self, mem: &GuestMemoryMmap, w: &CompWords) -> Result<(), MemFault> {
        if let Area::One(o) = &self.area {
            if let Some(at) = o.in_table(mem, o.comp_at) {
                // SAFETY: `at` is the host address of the completion area (COMPLETION_LEN bytes)
                // in `mem`, the table it was resolved in, which the record keeps mapped.
                unsafe { store_completion(at as *mut u8, w) };
                return Ok(());
            }
        }
        self.write_comp(mem, &completion_bytes(w))
    }

    /// Write `c` (a completion) into the completion area.
    #[inline(always)]
    pub fn write_comp(&self, mem: &GuestMemoryMmap, c: &[u8]) -> Result<(), MemFault> {
        match &self.area {
            Area::One(o) => {
                if c.len() <= COMPLETION_LEN {
                    if let Some(at) = o.in_table(mem, o.comp_at) {
                        // SAFETY: as in `write_data`, for the completion area (COMPLETION_LEN
                        // bytes at `at`); `c` is ours.
                        unsafe { guest_copy(at as *mut u8, c.as_ptr(), c.len()) };
                        return Ok(());
                    }
                }
                let comp = Seg {
                    addr: o.comp,
                    len: COMPLETION_LEN as u32,
                };
                Segs::one(comp).write_at(mem, 0, c)
            }
            Area::Full(r) => r.write_comp(mem, c),
        }
    }
}
