// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the driver's requests carry: the record kept per request in flight ([`PendingOp`]:
//! where its completion goes, the buffers it keeps alive, where received bytes are copied to)
//! and the bytes copied inline into a request ([`Payload`]). The virtqueue holds these as opaque
//! records (and [`crate::virtqueue::InlinePayload`]s); the ring layer knows nothing of endpoints
//! or completion queues.

use std::ptr::NonNull;
use std::sync::Arc;

use crate::av::FiAddr;
use crate::cq::CqShared;
use crate::domain::DomainInner;
use crate::endpoint::{iov_bytes, EpShared, Iov};
use crate::memory::{Allocation, Borrowers};
use crate::virtqueue::{Finished, InlinePayload, TxData, Virtqueue};

/// A transmit data area whose inline bytes are a [`Payload`].
pub(crate) type Tx<'a> = TxData<'a, Payload<'a>>;
/// A virtqueue of the driver: its records are [`PendingOp`]s.
pub(crate) type Queue = Virtqueue<PendingOp>;
/// A request of the driver's that the device returned.
pub(crate) type Done<'a> = Finished<'a, PendingOp>;

/// Bytes copied into the header descriptor after the request header.
#[derive(Clone, Copy)]
pub(crate) enum Payload<'a> {
    /// One contiguous piece (the common case).
    Bytes(&'a [u8]),
    /// `prefix` (e.g. an RMA scatter list), then the bytes of every iov, in order.
    Gather {
        prefix: &'a [u8],
        iov: &'a [Iov<'a>],
    },
}

impl InlinePayload for Payload<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        match self {
            Payload::Bytes(b) => b.len(),
            Payload::Gather { prefix, iov } => {
                prefix.len() + iov.iter().map(|v| v.len()).sum::<usize>()
            }
        }
    }
    /// Copy the pieces to `dst` (which has room for `self.len()` bytes).
    ///
    /// # Safety
    /// `dst` must be valid for writes of `self.len()` bytes.
    #[inline(always)]
    unsafe fn copy_to(&self, dst: *mut u8) {
        match self {
            // SAFETY: the caller guarantees room for the bytes.
            Payload::Bytes(b) => unsafe { copy_bytes(b, dst) },
            Payload::Gather { prefix, iov } => {
                // SAFETY: the caller guarantees room for every piece, in order.
                unsafe { copy_bytes(prefix, dst) };
                let mut at = prefix.len();
                for v in iov.iter() {
                    let p = iov_bytes(v);
                    // SAFETY: as above.
                    unsafe { copy_bytes(p, dst.add(at)) };
                    at += p.len();
                }
            }
        }
    }
}

/// Copy `src` to `dst`; small copies (the common inline payloads) without a `memcpy` call.
///
/// # Safety
/// `dst` must be valid for writes of `src.len()` bytes and not overlap `src`.
#[inline(always)]
unsafe fn copy_bytes(src: &[u8], dst: *mut u8) {
    let n = src.len();
    let s = src.as_ptr();
    // SAFETY: every access below stays inside `src[..n]` and `dst[..n]` (overlapping head and
    // tail words for lengths between one and two words).
    unsafe {
        if (8..=16).contains(&n) {
            let head = std::ptr::read_unaligned(s.cast::<u64>());
            let tail = std::ptr::read_unaligned(s.add(n - 8).cast::<u64>());
            std::ptr::write_unaligned(dst.cast::<u64>(), head);
            std::ptr::write_unaligned(dst.add(n - 8).cast::<u64>(), tail);
        } else if (4..8).contains(&n) {
            let head = std::ptr::read_unaligned(s.cast::<u32>());
            let tail = std::ptr::read_unaligned(s.add(n - 4).cast::<u32>());
            std::ptr::write_unaligned(dst.cast::<u32>(), head);
            std::ptr::write_unaligned(dst.add(n - 4).cast::<u32>(), tail);
        } else if n > 0 {
            std::ptr::copy_nonoverlapping(s, dst, n);
        }
    }
}

/// Destinations of a bounced receive, in order: one needs no allocation.
#[derive(Default)]
pub(crate) struct Targets {
    first: Option<(usize, usize)>,
    more: Vec<(usize, usize)>,
}

impl Targets {
    pub fn push(&mut self, addr: usize, len: usize) {
        match self.first {
            None => self.first = Some((addr, len)),
            Some(first) => {
                if self.more.is_empty() {
                    self.more.push(first);
                }
                self.more.push((addr, len));
            }
        }
    }
    /// The copy-out for these destinations.
    pub fn into_copy_out(self) -> CopyOut {
        match self.first {
            None => CopyOut::None,
            Some((addr, len)) if self.more.is_empty() => CopyOut::Raw(addr, len),
            Some(_) => CopyOut::Scatter(self.more),
        }
    }
}

/// Where received bytes go once the request completes (bounce copy-out).
pub(crate) enum CopyOut {
    /// Nothing to copy (zero-copy buffer, send, or no data).
    None,
    /// Into caller memory outside the region (`recv_raw`, one bounced iov): address, length.
    Raw(usize, usize),
    /// Into several caller buffers, in order (receive iovs).
    Scatter(Vec<(usize, usize)>),
    /// Into a fresh `Vec<u8>` handed back in the CQ entry (`recv_vec`).
    Vec,
}

/// Shared buffers a request keeps alive while the device may use them (one inline, more in
/// a vector, so the common case does not allocate; an absent vector is one word to write):
/// [`crate::SharedBuf`] allocations of buffers the post's caller holds ([`Keepalive::push`]:
/// a plain record borrows such a buffer instead), or allocations of the request's own
/// ([`Keepalive::hold`]: its record then is general, as it owns them).
#[derive(Default)]
pub(crate) struct Keepalive {
    first: Option<Arc<Allocation>>,
    rest: Option<Vec<Arc<Allocation>>>,
    /// Something was kept with [`Keepalive::hold`].
    owns: bool,
}

impl Keepalive {
    /// One buffer kept alive.
    #[inline(always)]
    pub fn one(a: Arc<Allocation>) -> Self {
        Self {
            first: Some(a),
            rest: None,
            owns: false,
        }
    }

    /// Keep an allocation of the request's own (nothing else refers to it) alive.
    pub fn hold(&mut self, a: Arc<Allocation>) {
        self.owns = true;
        self.push(a);
    }

    /// Keep a `SharedBuf`'s allocation ([`crate::SharedBuf::keepalive`]) alive.
    #[inline(always)]
    pub fn push(&mut self, a: Arc<Allocation>) {
        if self.first.is_none() {
            self.first = Some(a);
        } else {
            self.rest.get_or_insert_with(Vec::new).push(a);
        }
    }
}

/// What a data request completes into.
pub(crate) struct DataOp {
    /// The endpoint; its bindings name the CQ (transmit or receive side by `is_recv`).
    pub ep: Arc<EpShared>,
    pub context: u64,
    /// libfabric flags of the CQ entry (`fi::SEND | fi::MSG`, ...).
    pub fi_flags: u64,
    /// Receive capacity posted (bytes).
    pub rx_len: usize,
    /// A receive's source filter as posted (`FI_ADDR_UNSPEC`: any): the index its entry
    /// reports (see [`crate::av::AvShared::source_of`]).
    pub src_addr: FiAddr,
    pub copy_out: CopyOut,
    /// Bounce buffer holding the payload or the received bytes.
    pub bounce: Option<Allocation>,
    /// Keeps `SharedBuf`s alive while the device may use them.
    pub _keepalive: Keepalive,
    /// Device-memory destinations: the bytes staged in `CopyOut::Vec` go there when the
    /// completion is read (`hmem.rs`).
    pub hmem: Option<Box<crate::hmem::Scatter>>,
    pub is_recv: bool,
    /// TRECV PEEK: the entry reports the message length, no data moved.
    pub peek: bool,
    /// TRECV PEEK|CLAIM: remember the cookie for a later CLAIM with the same context.
    pub record_claim: bool,
    /// A success produces a CQ entry (not for inject, nor unselected operations of a
    /// selective-completion binding).
    pub report_success: bool,
    /// An error produces an error entry (inject errors are only logged).
    pub report_errors: bool,
}

impl DataOp {
    /// A send, or a receive into memory the device writes in place (no copy-out, no device
    /// memory, no PEEK/CLAIM bookkeeping): its success needs only the CQ entry.
    fn is_plain(&self) -> bool {
        matches!(self.copy_out, CopyOut::None)
            && self.bounce.is_none()
            && self.hmem.is_none()
            && !self.peek
            && !self.record_claim
            && (self.is_recv || self.rx_len == 0)
            && self._keepalive.rest.is_none()
            && !self._keepalive.owns
    }

    /// The record of this request: the compact [`PlainOp`] when it is plain. Posts of an
    /// [`crate::Endpoint`] only: the plain record borrows the endpoint (see [`EpRef`]).
    #[inline(always)]
    pub fn into_pending(self) -> PendingOp {
        if !self.is_plain() {
            return PendingOp::Data(self);
        }
        let DataOp {
            ep,
            context,
            fi_flags,
            rx_len,
            src_addr,
            copy_out,
            bounce,
            _keepalive: Keepalive { first, rest, .. },
            hmem,
            is_recv,
            peek: _,
            record_claim: _,
            report_success,
            report_errors,
        } = self;
        // Empty, as `is_plain` found them: nothing to drop, and no calls into drop glue on
        // the post path.
        debug_assert!(rest.is_none() && bounce.is_none() && hmem.is_none());
        std::mem::forget((copy_out, bounce, rest, hmem));
        PendingOp::Plain(PlainOp {
            // SAFETY: the posting endpoint holds its own reference until `Endpoint::drop`,
            // which makes the record own one first (`own_borrowed`).
            ep: unsafe { EpRef::new(&ep) },
            context,
            fi_flags,
            rx_len,
            src_addr,
            // SAFETY: a kept-alive allocation is a `SharedBuf`'s, of the post's caller, which
            // counts it as lent (see `Keepalive`); the record's reference goes now.
            buf: first.map(|a| unsafe { BufRef::new(&a) }),
            // SAFETY: a binding of the endpoint, frozen while it lives (as `ep`).
            cq: ep
                .cq(is_recv)
                .filter(|_| report_success)
                .map(|cq| unsafe { CqRef::new(cq) }),
            is_recv,
            report_errors,
        })
    }
}

/// What a plain record borrows without a reference count (none moves per request): its
/// endpoint ([`EpRef`]), the CQ its success goes to ([`CqRef`], one of the endpoint's frozen
/// bindings) and the shared buffer the device uses in place ([`BufRef`]). Each stays valid
/// while the record is plain: its owner keeps a reference of its own until, before letting go
/// of it, it turns every plain record that borrows it into a general one holding references
/// ([`own_borrowed`]: `Endpoint::drop` for the endpoint and its CQs, the buffer's `Drop` for a
/// [`crate::SharedBuf`], which remembers that it lent its allocation and whose checked borrows
/// see borrowers as they see references, see [`Borrowers`]).
pub(crate) struct Lent<T>(NonNull<T>);

pub(crate) type EpRef = Lent<EpShared>;
pub(crate) type CqRef = Lent<CqShared>;
pub(crate) type BufRef = Lent<Allocation>;

impl<T> Clone for Lent<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Lent<T> {}

// SAFETY: a shared reference to a `T` that is `Sync` and outlives the record (see the type):
// it may go to and be used from any thread, as `&T` may.
unsafe impl<T: Sync + Send> Send for Lent<T> {}
// SAFETY: as for `Send`.
unsafe impl<T: Sync + Send> Sync for Lent<T> {}

impl<T> Lent<T> {
    /// Borrow `a` for a plain record.
    ///
    /// # Safety
    /// The owner of `a` keeps a reference until the record no longer borrows it: before it
    /// lets go, it calls [`own_borrowed`] for the records that may (see the type).
    #[inline(always)]
    pub unsafe fn new(a: &Arc<T>) -> Self {
        Self(NonNull::from(&**a))
    }

    /// A reference of its own, for the general record of the same request.
    pub fn to_arc(self) -> Arc<T> {
        // SAFETY: the pointer is `Arc::as_ptr` of the owner's `Arc`, alive while a plain
        // record borrows it (see the type): taking another strong reference is valid.
        unsafe {
            Arc::increment_strong_count(self.0.as_ptr());
            Arc::from_raw(self.0.as_ptr())
        }
    }

    pub fn is(self, a: &T) -> bool {
        std::ptr::eq(self.0.as_ptr(), a)
    }
}

impl<T> std::ops::Deref for Lent<T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        // SAFETY: alive while the record borrows it (see the type).
        unsafe { self.0.as_ref() }
    }
}

/// Calls [`own_borrowed`] for an endpoint when dropped (at the end of `Endpoint::drop`,
/// however it returns).
pub(crate) struct OwnBorrowedOnDrop<'a>(pub &'a [Queue], pub &'a EpShared);

impl Drop for OwnBorrowedOnDrop<'_> {
    fn drop(&mut self) {
        own_borrowed(self.0, |p| p.ep.is(self.1));
    }
}

/// Before an endpoint or a shared buffer lets go of its reference: every plain record in
/// `queues` that borrows it (`borrows`) becomes its general record, owning references
/// (dropped when the device returns the request, as for any general record). Waits for
/// dispatches in progress (each queue's records are then still).
pub(crate) fn own_borrowed(queues: &[Queue], borrows: impl Fn(&PlainOp) -> bool) {
    for q in queues {
        q.update_in_flight(|op| {
            if matches!(op, PendingOp::Plain(p) if borrows(p)) {
                if let PendingOp::Plain(p) = std::mem::replace(op, PendingOp::CommitReply) {
                    *op = PendingOp::Data(p.into_data());
                }
            }
        });
    }
}

/// Does a plain record in `queues` borrow `buf`?
fn borrows_buf(queues: &[Queue], buf: &Allocation) -> bool {
    let borrows =
        |op: &PendingOp| matches!(op, PendingOp::Plain(p) if p.buf.is_some_and(|b| b.is(buf)));
    queues.iter().any(|q| q.find_cookie(borrows).is_some())
}

impl Borrowers for DomainInner {
    fn borrow(&self, buf: &Allocation) -> bool {
        borrows_buf(&self.queues, buf)
    }

    fn own_borrowed(&self, buf: &Arc<Allocation>) {
        own_borrowed(&self.queues, |p| p.buf.is_some_and(|b| b.is(buf)));
    }
}

/// What a plain data request (a send, or a receive into memory the device writes in place:
/// no copy-out, bounce buffer, device memory or PEEK/CLAIM bookkeeping) completes into: only
/// what its CQ entry needs, a few words written at post. Its plain success is delivered from
/// this and the completion; anything else goes through [`PlainOp::into_data`].
pub(crate) struct PlainOp {
    pub ep: EpRef,
    /// Where a success entry goes (`None`: not reported, or no CQ bound).
    pub cq: Option<CqRef>,
    pub context: u64,
    pub fi_flags: u64,
    /// Receive capacity posted (bytes; 0 for a send).
    pub rx_len: usize,
    /// As [`DataOp::src_addr`]: a directed receive's source.
    pub src_addr: FiAddr,
    /// The shared buffer the device uses in place, if any.
    pub buf: Option<BufRef>,
    pub is_recv: bool,
    pub report_errors: bool,
}

// A delivered plain record is not dropped (see `Dispatch::fast`): it must own nothing.
const _: () = assert!(!std::mem::needs_drop::<PlainOp>());

impl PlainOp {
    /// The general record of the same request (errors, device faults).
    pub fn into_data(self) -> DataOp {
        DataOp {
            ep: self.ep.to_arc(),
            context: self.context,
            fi_flags: self.fi_flags,
            rx_len: self.rx_len,
            src_addr: self.src_addr,
            copy_out: CopyOut::None,
            bounce: None,
            _keepalive: match self.buf {
                Some(b) => Keepalive::one(b.to_arc()),
                None => Keepalive::default(),
            },
            hmem: None,
            is_recv: self.is_recv,
            peek: false,
            record_claim: false,
            report_success: self.cq.is_some(),
            report_errors: self.report_errors,
        }
    }
}

pub(crate) enum PendingOp {
    Control {
        /// Data area of the control request (e.g. the QUERY_CAPS answer).
        data: Option<Allocation>,
    },
    Data(DataOp),
    /// A plain send or receive (see [`PlainOp`]).
    Plain(PlainOp),
    /// A posted MR_EVENT (remote-access report, no buffers).
    MrEvent,
    /// A posted COMMIT_EVENT and the data area the device writes the event into.
    CommitEvent {
        area: Option<Allocation>,
    },
    /// A COMMIT_REPLY nobody waits for.
    CommitReply,
}

impl PendingOp {
    /// The endpoint and context of a data request.
    pub fn data_of(&self) -> Option<(&EpShared, u64)> {
        match self {
            PendingOp::Data(d) => Some((&d.ep, d.context)),
            PendingOp::Plain(p) => Some((&p.ep, p.context)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::SharedMemory;
    use crate::virtqueue::{DomainSignals, RxData};
    use vfabric_proto::ReqHeader;

    /// A queue of eight heads with one request in flight, built by `op`.
    fn queue_with(mem: &Arc<SharedMemory>, op: impl FnOnce() -> PendingOp) -> Queue {
        let signals = Arc::new(DomainSignals::default());
        let q = Queue::new(mem, 1, 8, true, signals).unwrap();
        let none = Tx::None;
        q.post(ReqHeader::default, none, RxData::None, false, false, op)
            .unwrap();
        q
    }

    fn data_op(ep: &Arc<EpShared>, keepalive: Keepalive) -> DataOp {
        DataOp {
            ep: ep.clone(),
            context: 7,
            fi_flags: 0,
            rx_len: 8,
            src_addr: 3,
            copy_out: CopyOut::None,
            bounce: None,
            _keepalive: keepalive,
            hmem: None,
            is_recv: true,
            peek: false,
            record_claim: false,
            report_success: true,
            report_errors: true,
        }
    }

    #[test]
    fn records_release_everything_they_hold() {
        let mem = SharedMemory::new("vfabric-test", 1 << 16).unwrap();
        let ep = EpShared::for_test();
        let bufs: Vec<Arc<Allocation>> = (0..3)
            .map(|_| Arc::new(mem.alloc(64, 64).unwrap()))
            .collect();
        // A record keeping one shared buffer alive is plain: it borrows the buffer instead
        // (the buffer's `Arc` stands in for the `SharedBuf` here) and owns nothing.
        let op = data_op(&ep, Keepalive::one(bufs[0].clone())).into_pending();
        assert!(matches!(op, PendingOp::Plain(PlainOp { buf: Some(_), .. })));
        assert_eq!(Arc::strong_count(&bufs[0]), 1);
        drop(op);
        assert_eq!(Arc::strong_count(&bufs[0]), 1);
        // With three (one inline, two in the vector) it is general, and releases them all.
        let mut keepalive = Keepalive::default();
        for b in &bufs {
            keepalive.push(b.clone());
        }
        let op = data_op(&ep, keepalive).into_pending();
        assert!(matches!(op, PendingOp::Data(_)));
        drop(op);
        assert_eq!(Arc::strong_count(&ep), 1);
        assert!(bufs.iter().all(|b| Arc::strong_count(b) == 1));
        // An allocation of the request's own (an RMA scatter list, say) is not borrowed: its
        // record is general and keeps it until it goes.
        let before = mem.in_use();
        let mut keepalive = Keepalive::default();
        keepalive.hold(Arc::new(mem.alloc(4096, 64).unwrap()));
        let op = data_op(&ep, keepalive).into_pending();
        assert!(matches!(op, PendingOp::Data(_)));
        assert!(mem.in_use() > before);
        drop(op);
        assert_eq!(mem.in_use(), before);
        // A record with a bounce buffer is not plain and takes the drop glue: the buffer goes
        // back too.
        let before = mem.in_use();
        let mut op = data_op(&ep, Keepalive::default());
        op.bounce = Some(mem.alloc(4096, 64).unwrap());
        let op = op.into_pending();
        assert!(matches!(op, PendingOp::Data(_)));
        assert!(mem.in_use() > before);
        drop(op);
        assert_eq!(mem.in_use(), before);
        assert_eq!(Arc::strong_count(&ep), 1);
    }

    /// A plain record moves no reference count of its endpoint; before the endpoint lets go
    /// of its own (`Endpoint::drop`), the record becomes a general one that keeps the endpoint
    /// alive until the request is done.
    #[test]
    fn a_plain_record_borrows_its_endpoint_until_the_endpoint_lets_go() {
        let mem = SharedMemory::new("vfabric-test", 1 << 20).unwrap();
        let ep = EpShared::for_test();
        let other = EpShared::for_test();
        let gone = Arc::downgrade(&ep);
        let q = queue_with(&mem, || data_op(&ep, Keepalive::default()).into_pending());
        assert_eq!(Arc::strong_count(&ep), 1);
        // Another endpoint going away leaves the record alone.
        own_borrowed(std::slice::from_ref(&q), |p| p.ep.is(&other));
        assert_eq!(Arc::strong_count(&ep), 1);
        own_borrowed(std::slice::from_ref(&q), |p| p.ep.is(&ep));
        drop(ep);
        let ep = gone
            .upgrade()
            .expect("the request in flight keeps its endpoint");
        let owned = |op: &PendingOp| matches!(op, PendingOp::Data(d) if Arc::ptr_eq(&d.ep, &ep));
        assert!(q.find_cookie(owned).is_some());
        drop(ep);
        // The request done (here: its queue gone), the endpoint goes.
        drop(q);
        assert!(gone.upgrade().is_none());
    }

    /// The queues of a test as a domain's: they may borrow shared buffers.
    struct TestQueues(Queue);

    impl Borrowers for TestQueues {
        fn borrow(&self, buf: &Allocation) -> bool {
            borrows_buf(std::slice::from_ref(&self.0), buf)
        }
        fn own_borrowed(&self, buf: &Arc<Allocation>) {
            own_borrowed(std::slice::from_ref(&self.0), |p| {
                p.buf.is_some_and(|b| b.is(buf))
            });
        }
    }

    /// A plain record moves no reference count of its shared buffer; the buffer's checked
    /// borrow sees the request, and a buffer dropped with it in flight leaves its memory to
    /// the request until it is done.
    #[test]
    fn a_plain_record_borrows_its_buffer_until_the_buffer_lets_go() {
        let mem = SharedMemory::new("vfabric-test", 1 << 20).unwrap();
        let ep = EpShared::for_test();
        let mut buf = crate::SharedBuf::new(&mem, 256).unwrap();
        let q = Arc::new(TestQueues(queue_with(&mem, || {
            let mut op = data_op(&ep, Keepalive::default()).into_pending();
            if let PendingOp::Plain(p) = &mut op {
                // SAFETY: lent by `buf`, whose drop makes the record own it.
                p.buf = Some(unsafe { BufRef::new(buf.lend()) });
            }
            op
        })));
        let borrowers: std::sync::Weak<dyn Borrowers> = Arc::downgrade(&q) as _;
        mem.set_borrowers(borrowers);
        assert_eq!(Arc::strong_count(&buf.keepalive()), 2);
        assert!(buf.get_mut().is_none(), "a request in flight borrows it");
        let in_use = mem.in_use();
        drop(buf);
        assert_eq!(mem.in_use(), in_use, "the request keeps the memory");
        assert!(q
            .0
            .find_cookie(|op| matches!(op, PendingOp::Data(_)))
            .is_some());
        // The request done (here: its queue gone), the memory goes back.
        drop(q);
        assert!(mem.in_use() < in_use);
        // Once no request borrows it, the checked borrow is back.
        let mem = SharedMemory::new("vfabric-test", 1 << 20).unwrap();
        let mut buf = crate::SharedBuf::new(&mem, 256).unwrap();
        let q = Arc::new(TestQueues(queue_with(&mem, || PendingOp::MrEvent)));
        let borrowers: std::sync::Weak<dyn Borrowers> = Arc::downgrade(&q) as _;
        mem.set_borrowers(borrowers);
        let _ = buf.lend();
        assert!(buf.get_mut().is_some());
    }

    #[test]
    fn a_plain_record_converts_back_to_its_general_record() {
        let ep = EpShared::for_test();
        let PendingOp::Plain(plain) = data_op(&ep, Keepalive::default()).into_pending() else {
            panic!("a receive into region memory is plain");
        };
        let d = plain.into_data();
        assert!(d.is_plain());
        // The general record holds a reference of its own.
        assert_eq!(Arc::strong_count(&ep), 2);
        assert_eq!(
            (d.context, d.rx_len, d.src_addr, d.is_recv),
            (7, 8, 3, true)
        );
        // No CQ bound (to borrow): no success to report.
        assert!(!d.report_success && d.report_errors);
    }
}
