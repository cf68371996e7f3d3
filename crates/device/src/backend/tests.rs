// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Chain parsing and validation against hostile guests, on `virtio_queue::mock::MockSplitQueue`,
//! and the backend's queue processing on real `Vring`s (no socket).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use vfabric_proto::{
    bit, ep_open, flags, Completion, FabricConfig, Opcode, Request, Status, VIRTIO_FABRIC_F_MSG,
    VIRTIO_F_VERSION_1,
};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

use super::FabricBackend;
use crate::chain::{
    head_is_indirect, parse_chain, pop_chains, GuestMemoryMmap, Parsed, Req, RingError,
};
use crate::config::{Config, Limits};
use crate::fabric::{Fabric, Notify};
use crate::ring::Vring;
use crate::testutil::{Guest, ALL_FEATURES};

const QSIZE: u16 = 16;
const HDR: u64 = 0x10000;
const COMP: u64 = 0x20000;
const DATA: u64 = 0x30000;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

/// A guest, a one-device fabric, and the guest's memory.
struct Rig {
    guest: Guest,
    fabric: Fabric,
    limits: Limits,
}

impl Rig {
    fn new(limits: Limits) -> Self {
        let mut c = Config::new(vec![PathBuf::from("/t0")]);
        c.limits = limits.clone();
        let fabric = Fabric::new(&c);
        let guest = Guest::new();
        fabric.connect(0, guest.port());
        Self {
            guest,
            fabric,
            limits,
        }
    }

    fn mem(&self) -> &GuestMemoryMmap {
        &self.guest.mem
    }

    fn header(&self, r: Request) {
        self.mem()
            .write_obj(r.to_header(), GuestAddress(HDR))
            .unwrap();
    }

    /// Pop every chain of `vq` (virtqueue index `queue`), parse and process it.
    fn run(&self, vq: &MockSplitQueue<GuestMemoryMmap>, queue: u16, acked: u64) -> Vec<Parsed> {
        let mut q: Queue = vq.create_queue().unwrap();
        let chains = pop_chains(&mut q, self.mem(), 64).unwrap();
        let parsed: Vec<Parsed> = chains
            .into_iter()
            .map(|c| parse_chain(self.mem(), c, queue, &self.limits, acked, false))
            .collect();
        let mut n = Notify::default();
        self.fabric.handle(0, &mut parsed.clone(), acked, &mut n);
        parsed
    }

    fn used(&self, queue: u16, head: u16) -> Option<u32> {
        self.guest.sink.find(queue, head)
    }

    fn completion_at(&self, addr: u64) -> Completion {
        self.mem().read_obj(GuestAddress(addr)).unwrap()
    }

    fn status_at(&self, addr: u64) -> Status {
        Status::from_u32(self.completion_at(addr).status.into()).unwrap()
    }
}

/// Store a chain of `(addr, len, flags)` descriptors at table index `at`, linked in order.
fn chain(vq: &MockSplitQueue<GuestMemoryMmap>, at: u16, descs: &[(u64, u32, u16)]) {
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, (a, l, f))| {
            let last = i + 1 == descs.len();
            let f = if last {
                *f
            } else {
                *f | VRING_DESC_F_NEXT as u16
            };
            RawDescriptor::from(SplitDescriptor::new(*a, *l, f, at + i as u16 + 1))
        })
        .collect();
    vq.add_desc_chains(&raw, at).unwrap();
}

fn ep_open_req() -> Request {
    let mut r = Request::new(Opcode::EpOpen);
    r.data = ep_open::TYPE_RDM;
    r.cookie = 0x77;
    r
}

#[test]
fn valid_chain_with_split_header_and_completion() {
    let rig = Rig::new(Limits::default());
    let vq = MockSplitQueue::new(rig.mem(), QSIZE);
    rig.header(ep_open_req());
    chain(
        &vq,
        0,
        &[
            (HDR, 40, R),
            (HDR + 40, 40, R),
            (HDR + 80, 16, R),
            (COMP, 32, W),
            (COMP + 32, 32, W),
        ],
    );
    let p = rig.run(&vq, 0, ALL_FEATURES);
    assert!(matches!(p[0], Parsed::Req(_)));
    assert_eq!(rig.used(0, 0), Some(64));
    let c = rig.completion_at(COMP);
    assert_eq!(rig.status_at(COMP), Status::Ok);
    assert_eq!(u64::from(c.cookie), 0x77);
    assert_eq!(u64::from(c.data), 0);
}

#[test]
fn descriptor_outside_memory_is_fault() {
    let rig = Rig::new(Limits::default());
    let vq = MockSplitQueue::new(rig.mem(), QSIZE);
    chain(&vq, 0, &[(0x4000_0000, 96, R), (COMP, 64, W)]);
    rig.run(&vq, 0, ALL_FEATURES);
    assert_eq!(rig.status_at(COMP), Status::Fault);
    assert_eq!(rig.used(0, 0), Some(64));
}

#[test]
fn overflowing_lengths() {
    let rig = Rig::new(Limits::default());
    let vq = MockSplitQueue::new(rig.mem(), QSIZE);
    rig.header(ep_open_req());
    // Address + length wraps around u64.
    chain(&vq, 0, &[(u64::MAX - 50, 96, R), (COMP, 64, W)]);
    // Lengths whose sum overflows 32 bits: the chain cannot be walked; used length 0.
    chain(
        &vq,
        2,
        &[(HDR, 0xffff_fff0, R), (HDR, 0x100, R), (COMP + 64, 64, W)],
    );
    // A completion area wrapping around the address space: used length 0.
    chain(&vq, 5, &[(HDR, 96, R), (u64::MAX - 10, 64, W)]);
    let p = rig.run(&vq, 0, ALL_FEATURES);
    assert_eq!(p.len(), 3);
    assert_eq!(rig.status_at(COMP), Status::Fault);
    assert_eq!(rig.used(0, 2), Some(0));
    assert!(matches!(p[1], Parsed::Unusable { .. }));
    assert_eq!(rig.used(0, 5), Some(0));
}

#[test]
fn descriptor_loop_is_bounded_and_returned_empty() {
    let rig = Rig::new(Limits::default());
    let vq = MockSplitQueue::new(rig.mem(), QSIZE);
    rig.header(ep_open_req());
    // 0 → 1 → 0 → …
    let raw = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 96, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(SplitDescriptor::new(
            COMP,
            64,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            0,
        )),
    ];
    vq.add_desc_chains(&raw[..1], 0).unwrap();
    vq.desc_table().store(1, raw[1]).unwrap();
    // A next index out of range.
    let bad_next =
        RawDescriptor::from(SplitDescriptor::new(HDR, 96, VRING_DESC_F_NEXT as u16, 999));
    vq.add_desc_chains(&[bad_next], 2).unwrap();
    // A good chain after them still works.
    chain(&vq, 3, &[(HDR, 96, R), (COMP + 64, 64, W)]);
    let p = rig.run(&vq, 0, ALL_FEATURES);
    assert_eq!(p.len(), 3);
    assert_eq!(rig.used(0, 0), Some(0));
    assert_eq!(rig.used(0, 2), Some(0));
    assert_eq!(rig.used(0, 3), Some(64));
    assert_eq!(rig.status_at(COMP + 64), Status::Ok);
}

#[test]
fn writable_before_readable_is_bad_chain() {
    let rig = Rig::new(Limits::default());
    let vq = MockSplitQueue::new(rig.mem(), QSIZE);
    rig.header(ep_open_req());
    chain(&vq, 0, &[(COMP, 64, W), (HDR, 96, R)]);
    rig.run(&vq, 0, ALL_FEATURES);
    assert_eq!(rig.status_at(COMP), Status::BadChain);
    let c = rig.fabric.counters(0).unwrap();
    assert_eq!(c.bad_chains.load(Ordering::Relaxed), 1);
}

#[test]
fn short_header_and_missing_completion() {
    let rig = Rig::new(Limits::default());
    let vq = MockSplitQueue::new(rig.mem(), QSIZE);
    rig.header(ep_open_req());
    chain(&vq, 0, &[(HDR, 50, R), (COMP, 64, W)]);
    chain(&vq, 2, &[(HDR, 96, R), (COMP + 64, 32, W)]);
    chain(&vq, 4, &[(HDR, 96, R)]);
    rig.run(&vq, 0, ALL_FEATURES);
    assert_eq!(rig.status_at(COMP), Status::BadChain);
    assert_eq!(rig.used(0, 2), Some(0), "no room for a completion");
    assert_eq!(rig.used(0, 4), Some(0));
}

#[test]
fn unknown_opcode_wrong_queue_unknown_flags() {
    let rig = Rig::new(Limits::default());
    let mut h = ep_open_req().to_header();
    h.opcode = 0x7777.into();
    rig.mem().write_obj(h, GuestAddress(HDR)).unwrap();
    let mut send = Request::new(Opcode::Send);
    send.cookie = 5;
    rig.mem()
        .write_obj(send.to_header(), GuestAddress(HDR + 0x100))
        .unwrap();
    let mut fl = Request::new(Opcode::Recv);
    fl.flags = 1 << 40;
    rig.mem()
        .write_obj(fl.to_header(), GuestAddress(HDR + 0x200))
        .unwrap();
    let vq = MockSplitQueue::new(rig.mem(), QSIZE);
    chain(&vq, 0, &[(HDR, 96, R), (COMP, 64, W)]);
    chain(&vq, 2, &[(HDR + 0x100, 96, R), (COMP + 64, 64, W)]);
    rig.run(&vq, 0, ALL_FEATURES);
    assert_eq!(rig.status_at(COMP), Status::Unsupported);
    assert_eq!(u64::from(rig.completion_at(COMP).cookie), 0x77);
    assert_eq!(
        rig.status_at(COMP + 64),
        Status::Unsupported,
        "SEND on ctrl"
    );
    // RECV on a TX queue; a RECV with an undefined flag on its RX queue.
    let vq = MockSplitQueue::new(rig.mem(), QSIZE);
    chain(&vq, 0, &[(HDR + 0x200, 96, R), (COMP + 128, 64, W)]);
    rig.run(&vq, 1, ALL_FEATURES);
    assert_eq!(rig.status_at(COMP + 128), Status::Unsupported);
    let vq = MockSplitQueue::new(rig.mem(), QSIZE);
    chain(&vq, 0, &[(HDR + 0x200, 96, R), (COMP + 192, 64, W)]);
    rig.run(&vq, 2, ALL_FEATURES);
    assert_eq!(rig.status_at(COMP + 192), Status::Invalid);
}

#[test]
fn bad_endpoint_and_unimplemented_flags() {
    let rig = Rig::new(Limits::default());
    let mut r = Request::new(Opcode::Recv);
    r.ep = 3;
    rig.header(r);
    let mut m = Request::new(Opcode::Recv);
    m.flags = flags::MULTI_RECV;
    rig.mem()
        .write_obj(m.to_header(), GuestAddress(HDR + 0x100))
        .unwrap();
    let vq = MockSplitQueue::new(rig.mem(), QSIZE);
    chain(&vq, 0, &[(HDR, 96, R), (DATA, 128, W), (COMP, 64, W)]);
    chain(&vq, 3, &[(HDR + 0x100, 96, R), (COMP + 64, 64, W)]);
    rig.run(&vq, 2, ALL_FEATURES);
    assert_eq!(rig.status_at(COMP), Status::BadEndpoint);
    assert_eq!(rig.status_at(COMP + 64), Status::Unsupported, "MULTI_RECV");
}

#[test]
fn requests_before_feature_negotiation() {
    let rig = Rig::new(Limits::default());
    rig.header(ep_open_req());
    let mut t = Request::new(Opcode::TRecv);
    t.ep = 0;
    rig.mem()
        .write_obj(t.to_header(), GuestAddress(HDR + 0x100))
        .unwrap();
    let vq = MockSplitQueue::new(rig.mem(), QSIZE);
    chain(&vq, 0, &[(HDR, 96, R), (COMP, 64, W)]);
    rig.run(&vq, 0, 0);
    assert_eq!(rig.status_at(COMP), Status::Unsupported);
    // VERSION_1 + MSG but not TAGGED: TRECV is refused.
    let vq = MockSplitQueue::new(rig.mem(), QSIZE);
    chain(&vq, 0, &[(HDR + 0x100, 96, R), (COMP + 64, 64, W)]);
    rig.run(&vq, 2, bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_FABRIC_F_MSG));
    assert_eq!(rig.status_at(COMP + 64), Status::Unsupported);
    // Queue pair 1 without MQ.
    let vq = MockSplitQueue::new(rig.mem(), QSIZE);
    chain(&vq, 0, &[(HDR + 0x100, 96, R), (COMP + 128, 64, W)]);
    rig.run(&vq, 4, ALL_FEATURES & !(1 << 5));
    assert_eq!(rig.status_at(COMP + 128), Status::Unsupported);
}

#[test]
fn too_many_descriptors_payload_and_size_limits() {
    let limits = Limits {
        max_sge: 2,
        max_msg_size: 1000,
        eager_threshold: 500,
        ..Limits::default()
    };
    let rig = Rig::new(limits);
    rig.header(ep_open_req());
    let vq = MockSplitQueue::new(rig.mem(), QSIZE);
    chain(
        &vq,
        0,
        &[
            (HDR, 32, R),
            (HDR + 32, 64, R),
            (DATA, 8, R),
            (DATA + 8, 8, R),
            (DATA + 16, 8, R),
            (COMP, 32, W),
            (COMP + 32, 32, W),
        ],
    );
    // EP_OPEN carries no payload.
    chain(&vq, 7, &[(HDR, 96, R), (DATA, 8, R), (COMP + 64, 64, W)]);
    rig.run(&vq, 0, ALL_FEATURES);
    assert_eq!(rig.status_at(COMP), Status::BadChain);
    assert_eq!(rig.status_at(COMP + 64), Status::Invalid);
    // A send above max_msg_size.
    let mut s = Request::new(Opcode::Send);
    s.cookie = 3;
    rig.header(s);
    let vq = MockSplitQueue::new(rig.mem(), QSIZE);
    chain(
        &vq,
        0,
        &[(HDR, 96, R), (DATA, 1001, R), (COMP + 128, 64, W)],
    );
    rig.run(&vq, 1, ALL_FEATURES);
    assert_eq!(rig.status_at(COMP + 128), Status::TooLarge);
    // FLAG_INJECT with more than inject_size bytes.
    s.flags = flags::INJECT;
    rig.header(s);
    let vq = MockSplitQueue::new(rig.mem(), QSIZE);
    chain(&vq, 0, &[(HDR, 96, R), (DATA, 257, R), (COMP + 192, 64, W)]);
    rig.run(&vq, 1, ALL_FEATURES);
    assert_eq!(rig.status_at(COMP + 192), Status::Invalid);
}

#[test]
fn corrupt_rings_are_detected() {
    let rig = Rig::new(Limits::default());
    // Avail index more than a queue size ahead.
    let vq = MockSplitQueue::new(rig.mem(), QSIZE);
    vq.avail().idx().store(QSIZE + 1);
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(matches!(
        pop_chains(&mut q, rig.mem(), 64),
        Err(RingError::Avail(_))
    ));
    // Head index out of range.
    let vq = MockSplitQueue::new(rig.mem(), QSIZE);
    vq.avail().ring().ref_at(0).unwrap().store(QSIZE + 3);
    vq.avail().idx().store(1);
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(matches!(
        pop_chains(&mut q, rig.mem(), 64),
        Err(RingError::BadHead { head: 19, .. })
    ));
    // Rings outside guest memory.
    let vq = MockSplitQueue::new(rig.mem(), QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    q.try_set_avail_ring_address(GuestAddress(0x4000_0000))
        .unwrap();
    assert!(matches!(
        pop_chains(&mut q, rig.mem(), 64),
        Err(RingError::Invalid)
    ));
}

// ---------------------------------------------------------------------------------------------
// The backend on real vrings
// ---------------------------------------------------------------------------------------------

struct Dev {
    backend: Arc<FabricBackend>,
    vrings: Vec<Vring>,
    mem: GuestMemoryMmap,
    fabric: Arc<Fabric>,
}

const QBASE: [u64; 3] = [0x0, 0x1000, 0x2000];

fn dev() -> Dev {
    let limits = Limits {
        num_queue_pairs: 1,
        ..Limits::default()
    };
    let mut c = Config::new(vec![PathBuf::from("/t0")]);
    c.limits = limits;
    c.fabric_id = crate::testutil::TEST_FABRIC;
    let fabric = Arc::new(Fabric::new(&c));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    // No poller thread here: kicks are processed inline and notifications re-enabled.
    let backend = FabricBackend::new(
        0,
        fabric.clone(),
        crate::poller::Poller::new(Duration::ZERO),
        atomic.clone(),
        None,
    )
    .unwrap();
    fabric.connect(0, backend.port());
    let vrings: Vec<Vring> = QBASE
        .iter()
        .map(|base| {
            let vq = MockSplitQueue::create(&mem, GuestAddress(*base), QSIZE);
            let v = Vring::new(atomic.clone(), QSIZE).unwrap();
            v.set_queue_size(QSIZE);
            v.set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
                .unwrap();
            v.set_queue_event_idx(true);
            v.set_queue_ready(true);
            v.set_enabled(true);
            v
        })
        .collect();
    backend.acked_features(ALL_FEATURES);
    Dev {
        backend,
        vrings,
        mem,
        fabric,
    }
}

#[test]
fn backend_processes_all_queues_after_a_kick() {
    let d = dev();
    let vq0 = MockSplitQueue::create(&d.mem, GuestAddress(QBASE[0]), QSIZE);
    let vq2 = MockSplitQueue::create(&d.mem, GuestAddress(QBASE[2]), QSIZE);
    d.mem
        .write_obj(ep_open_req().to_header(), GuestAddress(HDR))
        .unwrap();
    chain(&vq0, 0, &[(HDR, 96, R), (COMP, 64, W)]);
    // Open the endpoint first: a driver learns the id from EP_OPEN's completion.
    d.backend
        .handle_event(0, EventSet::IN, &d.vrings, 0)
        .unwrap();
    // A receive on ep 0 on the RX queue, and a no-op control request (ADDR_CHECK of nothing)
    // behind it: the kick on the control queue drains every queue, data queues first.
    d.mem
        .write_obj(
            Request::new(Opcode::AddrCheck).to_header(),
            GuestAddress(HDR + 0x200),
        )
        .unwrap();
    chain(&vq0, 2, &[(HDR + 0x200, 96, R), (COMP + 128, 64, W)]);
    let mut r = Request::new(Opcode::Recv);
    r.cookie = 9;
    d.mem
        .write_obj(r.to_header(), GuestAddress(HDR + 0x100))
        .unwrap();
    chain(
        &vq2,
        0,
        &[(HDR + 0x100, 96, R), (DATA, 64, W), (COMP + 64, 64, W)],
    );
    // A kick on the control queue drains every queue.
    d.backend
        .handle_event(0, EventSet::IN, &d.vrings, 0)
        .unwrap();
    assert_eq!(vq0.used().idx().load(), 2);
    let e = vq0.used().ring().ref_at(0).unwrap().load();
    assert_eq!((e.id(), e.len()), (0, 64));
    let c: Completion = d.mem.read_obj(GuestAddress(COMP)).unwrap();
    assert_eq!(u32::from(c.status), Status::Ok as u32);
    // The receive is posted (not completed) and is cancelled when its queue stops.
    assert_eq!(vq2.used().idx().load(), 0);
    d.backend.stop_vring(2).unwrap();
    assert_eq!(vq2.used().idx().load(), 1);
    let c: Completion = d.mem.read_obj(GuestAddress(COMP + 64)).unwrap();
    assert_eq!(u32::from(c.status), Status::Canceled as u32);
    assert_eq!(u64::from(c.cookie), 9);
    // GET_VRING_BASE reads the avail index from the Queue after stopping the ring: the index
    // the data path kept in its own state must be back there.
    d.backend.stop_vring(0).unwrap();
    assert_eq!(d.vrings[0].queue_next_avail(), 2);
    assert_eq!(d.vrings[2].queue_next_avail(), 1);
}

/// Ring `q`'s kick: a non-blocking eventfd set on the ring, and a second fd to kick through.
fn set_kick(vr: &Vring) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: plain system calls; each fd returned is checked and then owned by one `File`.
    unsafe {
        let fd = libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
        assert!(fd >= 0);
        let kicker = libc::dup(fd);
        assert!(kicker >= 0);
        vr.set_kick(Some(std::fs::File::from_raw_fd(fd)));
        std::fs::File::from_raw_fd(kicker)
    }
}

/// The event ids `epfd` reports now (level-triggered: pending ones, not consumed).
fn ready_events(epfd: &std::os::fd::OwnedFd) -> Vec<u64> {
    use std::os::fd::AsRawFd;
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
    // SAFETY: `evs` holds 8 events; the epoll fd is open.
    let n = unsafe { libc::epoll_wait(epfd.as_raw_fd(), evs.as_mut_ptr(), 8, 0) };
    assert!(n >= 0);
    evs[..n as usize].iter().map(|e| e.u64).collect()
}

#[test]
fn kicks_are_taken_as_the_device_s_own_events() {
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let d = dev();
    let mut kicker = set_kick(&d.vrings[0]);
    // The vring worker's epoll, with the kick registered under the ring's index as
    // vhost-user-backend registers it.
    // SAFETY: plain system calls on fds this test owns.
    let epfd = unsafe { OwnedFd::from_raw_fd(libc::epoll_create1(libc::EPOLL_CLOEXEC)) };
    let kick_fd = d.vrings[0]
        .get_ref()
        .get_kick()
        .as_ref()
        .unwrap()
        .as_raw_fd();
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: 0,
    };
    // SAFETY: both fds are open; `ev` is a valid event.
    let r = unsafe { libc::epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, kick_fd, &mut ev) };
    assert_eq!(r, 0);
    d.backend.set_worker_epoll(epfd.as_raw_fd());

    let vq0 = MockSplitQueue::create(&d.mem, GuestAddress(QBASE[0]), QSIZE);
    d.mem
        .write_obj(ep_open_req().to_header(), GuestAddress(HDR))
        .unwrap();
    chain(&vq0, 0, &[(HDR, 96, R), (COMP, 64, W)]);
    // The first kick comes as vhost-user-backend's (which consumed it): the kick is then
    // re-registered as the device's own event.
    kicker.write_all(&1u64.to_le_bytes()).unwrap();
    assert_eq!(ready_events(&epfd), [0]);
    let mut count = [0u8; 8];
    kicker.read_exact(&mut count).unwrap();
    d.backend
        .handle_event(0, EventSet::IN, &d.vrings, 0)
        .unwrap();
    assert_eq!(vq0.used().idx().load(), 1);
    let own = d.backend.kick_event(0);
    assert!(own > d.backend.wake_event() + 1);
    kicker.write_all(&1u64.to_le_bytes()).unwrap();
    assert_eq!(ready_events(&epfd), [own]);
    // Edge-triggered: reported once, though nobody read the count.
    assert_eq!(ready_events(&epfd), [] as [u64; 0]);

    // The next kick, as the device's own event: its ring served, the kick not read (the
    // count stays in the eventfd) and not reported again.
    d.mem
        .write_obj(
            Request::new(Opcode::AddrCheck).to_header(),
            GuestAddress(HDR + 0x200),
        )
        .unwrap();
    chain(&vq0, 2, &[(HDR + 0x200, 96, R), (COMP + 128, 64, W)]);
    d.backend
        .handle_event(own as u16, EventSet::IN, &d.vrings, 0)
        .unwrap();
    assert_eq!(vq0.used().idx().load(), 2);
    assert_eq!(ready_events(&epfd), [] as [u64; 0]);
    // Every later kick is reported once more, whatever the count holds.
    kicker.write_all(&1u64.to_le_bytes()).unwrap();
    assert_eq!(ready_events(&epfd), [own]);
    kicker.write_all(&1u64.to_le_bytes()).unwrap();
    assert_eq!(ready_events(&epfd), [own]);
    kicker.read_exact(&mut count).unwrap();
    assert_eq!(u64::from_le_bytes(count), 3);
    // A kick of a disabled ring: the ring is not served.
    d.vrings[0].set_enabled(false);
    chain(&vq0, 4, &[(HDR + 0x200, 96, R), (COMP + 192, 64, W)]);
    kicker.write_all(&1u64.to_le_bytes()).unwrap();
    assert_eq!(ready_events(&epfd), [own]);
    d.backend
        .handle_event(own as u16, EventSet::IN, &d.vrings, 0)
        .unwrap();
    assert_eq!(vq0.used().idx().load(), 2);
    // vhost-user-backend takes the fd back (it stops the ring, then registers the kick again
    // under the ring's index, level-triggered): the count the device left in it reports at
    // once there, and the ring's first event hands the kick back to the device.
    // SAFETY: both fds are open; `ev` is a valid event (ignored by EPOLL_CTL_DEL).
    let r = unsafe { libc::epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_DEL, kick_fd, &mut ev) };
    assert_eq!(r, 0);
    // SAFETY: as above.
    let r = unsafe { libc::epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, kick_fd, &mut ev) };
    assert_eq!(r, 0);
    assert_eq!(ready_events(&epfd), [0]);
    kicker.read_exact(&mut count).unwrap();
    d.vrings[0].set_enabled(true);
    d.backend
        .handle_event(0, EventSet::IN, &d.vrings, 0)
        .unwrap();
    assert_eq!(vq0.used().idx().load(), 3);
    kicker.write_all(&1u64.to_le_bytes()).unwrap();
    assert_eq!(ready_events(&epfd), [own]);
}

#[test]
fn backend_reset_device_takes_the_new_ring_indices() {
    let d = dev();
    let vq0 = MockSplitQueue::create(&d.mem, GuestAddress(QBASE[0]), QSIZE);
    d.mem
        .write_obj(ep_open_req().to_header(), GuestAddress(HDR))
        .unwrap();
    chain(&vq0, 0, &[(HDR, 96, R), (COMP, 64, W)]);
    d.backend
        .handle_event(0, EventSet::IN, &d.vrings, 0)
        .unwrap();
    assert_eq!(vq0.used().idx().load(), 1);
    // RESET_DEVICE, then the driver sets the same ring up again from index 0 (SET_VRING_ADDR
    // reads the used index, SET_VRING_BASE sets the avail index) and negotiates again.
    d.backend.reset_device();
    vq0.avail().idx().store(0);
    vq0.used().idx().store(0);
    d.vrings[0].set_queue_next_used(0);
    d.vrings[0].set_queue_next_avail(0);
    d.backend.acked_features(ALL_FEATURES);
    d.mem
        .write_obj(Completion::default(), GuestAddress(COMP))
        .unwrap();
    chain(&vq0, 0, &[(HDR, 96, R), (COMP, 64, W)]);
    d.backend
        .handle_event(0, EventSet::IN, &d.vrings, 0)
        .unwrap();
    assert_eq!(vq0.used().idx().load(), 1);
    let c: Completion = d.mem.read_obj(GuestAddress(COMP)).unwrap();
    assert_eq!(u32::from(c.status), Status::Ok as u32);
}

/// The parse context a device keeps between passes follows the features the driver acks: a
/// flag whose feature is no longer acked is refused (the combined checks' parse context is
/// worked out again, not kept from the first negotiation).
#[test]
fn backend_parses_against_the_features_acked_last() {
    let d = dev();
    let vq1 = MockSplitQueue::create(&d.mem, GuestAddress(QBASE[1]), QSIZE);
    let mut send = Request::new(Opcode::Send);
    send.flags = flags::REMOTE_CQ_DATA;
    send.cookie = 0x99;
    d.mem
        .write_obj(send.to_header(), GuestAddress(HDR))
        .unwrap();
    let status = || {
        let c: Completion = d.mem.read_obj(GuestAddress(COMP)).unwrap();
        u32::from(c.status)
    };
    // With REMOTE_CQ_DATA acked the send is taken (and fails later: no endpoint is open).
    chain(&vq1, 0, &[(HDR, 104, R), (COMP, 64, W)]);
    d.backend
        .handle_event(1, EventSet::IN, &d.vrings, 0)
        .unwrap();
    assert_eq!(vq1.used().idx().load(), 1);
    assert_ne!(status(), Status::Unsupported as u32);
    d.backend
        .acked_features(ALL_FEATURES & !bit(vfabric_proto::VIRTIO_FABRIC_F_REMOTE_CQ_DATA));
    chain(&vq1, 2, &[(HDR, 104, R), (COMP, 64, W)]);
    d.backend
        .handle_event(1, EventSet::IN, &d.vrings, 0)
        .unwrap();
    assert_eq!(vq1.used().idx().load(), 2);
    assert_eq!(status(), Status::Unsupported as u32);
}

#[test]
fn backend_drops_a_guest_with_a_corrupt_ring() {
    let d = dev();
    let vq1 = MockSplitQueue::create(&d.mem, GuestAddress(QBASE[1]), QSIZE);
    vq1.avail().idx().store(QSIZE * 3);
    d.backend
        .handle_event(1, EventSet::IN, &d.vrings, 0)
        .unwrap();
    let c = d.fabric.counters(0).unwrap();
    assert_eq!(c.ring_errors.load(Ordering::Relaxed), 1);
    assert!(d.backend.is_broken());
    // Later kicks are ignored, without panicking.
    let vq0 = MockSplitQueue::create(&d.mem, GuestAddress(QBASE[0]), QSIZE);
    d.mem
        .write_obj(ep_open_req().to_header(), GuestAddress(HDR))
        .unwrap();
    chain(&vq0, 0, &[(HDR, 96, R), (COMP, 64, W)]);
    d.backend
        .handle_event(0, EventSet::IN, &d.vrings, 0)
        .unwrap();
    assert_eq!(vq0.used().idx().load(), 0);
}

#[test]
fn backend_config_space_and_features() {
    let d = dev();
    let cfg = d.fabric.config_space(0);
    let full = d.backend.get_config(0, 48);
    assert_eq!(FabricConfig::from_slice(&full).copied(), Some(cfg));
    assert_eq!(u32::from(cfg.num_queue_pairs), 1);
    // Fabric id in bits 63..32, host 1 in bits 31..16, device 0.
    let fabric = u64::from(crate::testutil::TEST_FABRIC);
    assert_eq!(u64::from(cfg.node_addr), fabric << 32 | 1 << 16);
    assert_eq!(u32::from(cfg.fabric_id), crate::testutil::TEST_FABRIC);
    // Reads past the structure are zero-filled; nothing panics.
    let tail = d.backend.get_config(40, 16);
    assert_eq!(&tail[..8], &full[40..48]);
    assert_eq!(&tail[8..], &[0u8; 8]);
    assert_eq!(d.backend.get_config(4000, 8), vec![0u8; 8]);
    assert_eq!(d.backend.get_config(u32::MAX, 8), vec![0u8; 8]);
    assert!(d.backend.get_config(0, 0x2000).is_empty());
    assert!(d.backend.set_config(0, &[1]).is_err());
    let f = d.backend.features();
    assert_ne!(f & bit(VIRTIO_F_VERSION_1), 0);
    assert_ne!(f & (1 << 29), 0, "EVENT_IDX");
    assert_ne!(f & (1 << 30), 0, "PROTOCOL_FEATURES");
    assert_eq!(f & (1 << 5), 0, "no MQ with one queue pair");
    assert_eq!(f & 0b1_1100, 0b1_1100, "RMA, ATOMIC and RMA_PMEM");
    assert_eq!(d.backend.num_queues(), 3);
}

#[test]
fn backend_memory_replacement_resets_endpoints() {
    let d = dev();
    let vq0 = MockSplitQueue::create(&d.mem, GuestAddress(QBASE[0]), QSIZE);
    d.mem
        .write_obj(ep_open_req().to_header(), GuestAddress(HDR))
        .unwrap();
    chain(&vq0, 0, &[(HDR, 96, R), (COMP, 64, W)]);
    d.backend.update_memory(d.backend.mem.clone()).unwrap();
    d.backend
        .handle_event(0, EventSet::IN, &d.vrings, 0)
        .unwrap();
    let c: Completion = d.mem.read_obj(GuestAddress(COMP)).unwrap();
    assert_eq!(u32::from(c.status), Status::Ok as u32);
    // Same memory again: nothing changes; the endpoint stays open.
    d.backend.update_memory(d.backend.mem.clone()).unwrap();
    let node = d.fabric.node_addr(0);
    let addr = vfabric_proto::FabricAddr::from_wire(&c.src);
    assert_eq!(addr.node, node);
    let mut check = Request::new(Opcode::AddrCheck);
    check.peer = addr;
    d.mem
        .write_obj(check.to_header(), GuestAddress(HDR))
        .unwrap();
    chain(&vq0, 2, &[(HDR, 96, R), (COMP, 64, W)]);
    d.backend
        .handle_event(0, EventSet::IN, &d.vrings, 0)
        .unwrap();
    let c: Completion = d.mem.read_obj(GuestAddress(COMP)).unwrap();
    assert_eq!(u32::from(c.status), Status::Ok as u32);
    // A replaced memory table closes the guest's endpoints.
    let other = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let replaced = GuestMemoryAtomic::new(other);
    d.backend.update_memory(replaced).unwrap();
    chain(&vq0, 4, &[(HDR, 96, R), (COMP, 64, W)]);
    d.backend
        .handle_event(0, EventSet::IN, &d.vrings, 0)
        .unwrap();
    let c: Completion = d.mem.read_obj(GuestAddress(COMP)).unwrap();
    assert_eq!(u32::from(c.status), Status::AddrNotAvail as u32);
}

/// A small send whose payload the parse resolved is moved straight from the sender's guest
/// memory into the receive (no bounce through the device's stack): a loopback send may name a
/// payload that overlaps the receive's data area, and the receive must get the payload as it
/// was. A resolved payload that has to wait (no receive posted) is read into the device then.
#[test]
fn a_small_loopback_send_overlapping_its_receive_arrives_whole() {
    use vfabric_proto::FabricAddr;
    let d = dev();
    let vq0 = MockSplitQueue::create(&d.mem, GuestAddress(QBASE[0]), QSIZE);
    let vq1 = MockSplitQueue::create(&d.mem, GuestAddress(QBASE[1]), QSIZE);
    let vq2 = MockSplitQueue::create(&d.mem, GuestAddress(QBASE[2]), QSIZE);
    // Two endpoints, A and B.
    for (i, at) in [0u64, 1].into_iter().enumerate() {
        d.mem
            .write_obj(ep_open_req().to_header(), GuestAddress(HDR + at * 0x100))
            .unwrap();
        chain(
            &vq0,
            2 * i as u16,
            &[(HDR + at * 0x100, 96, R), (COMP + at * 64, 64, W)],
        );
    }
    d.backend
        .handle_event(0, EventSet::IN, &d.vrings, 0)
        .unwrap();
    let addr = |comp: u64| {
        let c: Completion = d.mem.read_obj(GuestAddress(comp)).unwrap();
        assert_eq!(u32::from(c.status), Status::Ok as u32);
        FabricAddr::from_wire(&c.src)
    };
    let (a, b) = (addr(COMP), addr(COMP + 64));
    let pattern: Vec<u8> = (0..40u8).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
    let recv = |head: u16, hdr: u64, data: u64, comp: u64| {
        let mut r = Request::new(Opcode::Recv);
        r.ep = b.ep;
        r.cookie = 0x200 + u64::from(head);
        d.mem.write_obj(r.to_header(), GuestAddress(hdr)).unwrap();
        chain(&vq2, head, &[(hdr, 96, R), (data, 64, W), (comp, 64, W)]);
        d.backend
            .handle_event(2, EventSet::IN, &d.vrings, 0)
            .unwrap();
    };
    let send = |head: u16, hdr: u64, payload: u64, len: u32, comp: u64| {
        let mut r = Request::new(Opcode::Send);
        r.ep = a.ep;
        r.peer = b;
        r.cookie = 0x100 + u64::from(head);
        d.mem.write_obj(r.to_header(), GuestAddress(hdr)).unwrap();
        chain(
            &vq1,
            head,
            &[(hdr, 96, R), (payload, len, R), (comp, 64, W)],
        );
        d.backend
            .handle_event(1, EventSet::IN, &d.vrings, 0)
            .unwrap();
    };
    let check = |comp: u64, len: u64| {
        let c: Completion = d.mem.read_obj(GuestAddress(comp)).unwrap();
        assert_eq!(u32::from(c.status), Status::Ok as u32);
        assert_eq!(u64::from(c.len), len);
    };
    // The receive's data area at DATA, the payload 5 bytes into it (and past its end the
    // other way round: the payload starting before the data area).
    for (round, (data, payload)) in [(DATA, DATA + 5), (DATA + 0x105, DATA + 0x100)]
        .into_iter()
        .enumerate()
    {
        let head = 3 * round as u16;
        d.mem.write_slice(&pattern, GuestAddress(payload)).unwrap();
        recv(head, HDR + 0x200, data, COMP + 0x100);
        send(head, HDR + 0x300, payload, 40, COMP + 0x140);
        check(COMP + 0x140, 40);
        check(COMP + 0x100, 40);
        let mut got = vec![0u8; 40];
        d.mem.read_slice(&mut got, GuestAddress(data)).unwrap();
        assert_eq!(got, pattern, "round {round}");
    }
    // No receive posted: the resolved payload waits in the device (read as it was sent), and
    // the guest's later writes to the payload do not change the message.
    d.mem
        .write_slice(&pattern, GuestAddress(DATA + 0x200))
        .unwrap();
    send(6, HDR + 0x300, DATA + 0x200, 40, COMP + 0x140);
    check(COMP + 0x140, 40);
    d.mem
        .write_slice(&[0u8; 40], GuestAddress(DATA + 0x200))
        .unwrap();
    recv(6, HDR + 0x200, DATA + 0x300, COMP + 0x100);
    check(COMP + 0x100, 40);
    let mut got = vec![0u8; 40];
    d.mem
        .read_slice(&mut got, GuestAddress(DATA + 0x300))
        .unwrap();
    assert_eq!(got, pattern);
}

/// A send on an endpoint the guest never opened: completed (with an error) at once.
fn stray_send(mem: &GuestMemoryMmap) {
    mem.write_obj(Request::new(Opcode::Send).to_header(), GuestAddress(HDR))
        .unwrap();
}

/// A kick of TX ring 1.
fn kick_tx(d: &Dev) {
    d.backend
        .handle_event(1, EventSet::IN, &d.vrings, 0)
        .unwrap();
}

/// A pass pops through the view of the ring it kept from the last pass: every change the
/// frontend makes to a running ring (here SET_VRING_ENABLE and SET_VRING_ADDR) must reach the
/// next pass.
#[test]
fn a_running_ring_s_changes_reach_the_next_pass() {
    let d = dev();
    let vq1 = MockSplitQueue::create(&d.mem, GuestAddress(QBASE[1]), QSIZE);
    stray_send(&d.mem);
    chain(&vq1, 0, &[(HDR, 96, R), (COMP, 64, W)]);
    kick_tx(&d);
    assert_eq!(vq1.used().idx().load(), 1);
    // Disabled: not served until enabled again.
    d.vrings[1].set_enabled(false);
    chain(&vq1, 2, &[(HDR, 96, R), (COMP, 64, W)]);
    kick_tx(&d);
    assert_eq!(vq1.used().idx().load(), 1, "a disabled ring was served");
    d.vrings[1].set_enabled(true);
    kick_tx(&d);
    assert_eq!(vq1.used().idx().load(), 2);
    // Moved elsewhere (SET_VRING_ADDR alone: the ring's `Queue` still holds indices 0, which
    // a moved ring starts from).
    let moved = MockSplitQueue::create(&d.mem, GuestAddress(0x4000), QSIZE);
    d.vrings[1]
        .set_queue_info(
            moved.desc_table_addr().0,
            moved.avail_addr().0,
            moved.used_addr().0,
        )
        .unwrap();
    chain(&moved, 0, &[(HDR, 96, R), (COMP, 64, W)]);
    kick_tx(&d);
    assert_eq!(moved.used().idx().load(), 1, "the moved ring was not read");
    assert_eq!(vq1.used().idx().load(), 2);
}

/// A new memory table (the same guest memory in new mappings, as vhost-user-backend installs
/// it before telling the backend) is the one the next pass reads the rings in.
#[test]
fn a_new_memory_table_reaches_the_next_pass() {
    let d = dev();
    let vq1 = MockSplitQueue::create(&d.mem, GuestAddress(QBASE[1]), QSIZE);
    stray_send(&d.mem);
    chain(&vq1, 0, &[(HDR, 96, R), (COMP, 64, W)]);
    kick_tx(&d);
    assert_eq!(vq1.used().idx().load(), 1);
    let copy = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let moved = MockSplitQueue::create(&copy, GuestAddress(QBASE[1]), QSIZE);
    let mut bytes = vec![0u8; 1 << 20];
    d.mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
    copy.write_slice(&bytes, GuestAddress(0)).unwrap();
    d.backend.mem.lock().unwrap().replace(copy.clone());
    d.backend.update_memory(d.backend.mem.clone()).unwrap();
    // The guest goes on in the new mappings only.
    chain(&moved, 2, &[(HDR, 96, R), (COMP, 64, W)]);
    kick_tx(&d);
    assert_eq!(
        moved.used().idx().load(),
        2,
        "the rings were read in the old table"
    );
}

/// An eventfd set as ring 1's call, and a second fd to read it through.
fn set_call(vr: &Vring) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: plain system calls; each fd returned is checked and then owned by one `File`.
    unsafe {
        let fd = libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
        assert!(fd >= 0);
        let reader = libc::dup(fd);
        assert!(reader >= 0);
        vr.set_call(Some(std::fs::File::from_raw_fd(fd)));
        std::fs::File::from_raw_fd(reader)
    }
}

/// Whether `call` was signalled since the last look.
fn signalled(call: &mut std::fs::File) -> bool {
    use std::io::Read;
    let mut count = [0u8; 8];
    call.read(&mut count).is_ok()
}

/// Completions signal through the view's own copy of the call eventfd: a new one (SET_VRING_CALL
/// while the ring runs, as a frontend masking an interrupt sends) takes over at once.
#[test]
fn completions_signal_the_call_eventfd_set_last() {
    let d = dev();
    // Every completion signals.
    d.vrings[1].set_queue_event_idx(false);
    let vq1 = MockSplitQueue::create(&d.mem, GuestAddress(QBASE[1]), QSIZE);
    stray_send(&d.mem);
    let mut first = set_call(&d.vrings[1]);
    chain(&vq1, 0, &[(HDR, 96, R), (COMP, 64, W)]);
    kick_tx(&d);
    assert_eq!(vq1.used().idx().load(), 1);
    assert!(signalled(&mut first));
    let mut second = set_call(&d.vrings[1]);
    chain(&vq1, 2, &[(HDR, 96, R), (COMP, 64, W)]);
    kick_tx(&d);
    assert_eq!(vq1.used().idx().load(), 2);
    assert!(
        signalled(&mut second),
        "the new call eventfd was not signalled"
    );
    assert!(!signalled(&mut first), "the old call eventfd was signalled");
}

/// SVC_BIND / SVC_RESOLVE through the rings: a payload or a flag makes them invalid before
/// they reach the service table; a well-formed pair binds and resolves.
#[test]
fn backend_service_requests_are_checked() {
    let d = dev();
    let vq0 = MockSplitQueue::create(&d.mem, GuestAddress(QBASE[0]), QSIZE);
    let mut at = 0u16;
    let mut run = |req: Request, payload: Option<u32>| -> Completion {
        d.mem.write_obj(req.to_header(), GuestAddress(HDR)).unwrap();
        match payload {
            Some(n) => chain(&vq0, at, &[(HDR, 96, R), (DATA, n, R), (COMP, 64, W)]),
            None => chain(&vq0, at, &[(HDR, 96, R), (COMP, 64, W)]),
        }
        at += 2;
        d.backend
            .handle_event(0, EventSet::IN, &d.vrings, 0)
            .unwrap();
        d.mem.read_obj(GuestAddress(COMP)).unwrap()
    };
    let c = run(ep_open_req(), None);
    assert_eq!(u32::from(c.status), Status::Ok as u32);
    let me = vfabric_proto::FabricAddr::from_wire(&c.src);
    let mut bind = Request::new(Opcode::SvcBind);
    bind.ep = me.ep;
    bind.data = 4242;
    let c = run(bind, Some(8));
    assert_eq!(u32::from(c.status), Status::Invalid as u32, "payload");
    let mut flagged = bind;
    flagged.flags = vfabric_proto::flags::FENCE;
    let c = run(flagged, None);
    assert_eq!(u32::from(c.status), Status::Invalid as u32, "flags");
    let c = run(bind, None);
    assert_eq!(u32::from(c.status), Status::Ok as u32);
    assert_eq!(u64::from(c.data), 4242);
    let mut resolve = Request::new(Opcode::SvcResolve);
    resolve.peer = vfabric_proto::FabricAddr::new(me.node, 0, 0);
    resolve.data = 4242;
    let c = run(resolve, None);
    assert_eq!(u32::from(c.status), Status::Ok as u32);
    assert_eq!(vfabric_proto::FabricAddr::from_wire(&c.src), me);
}

/// The ring walk's fast path (chains of the shape drivers post) parses every chain exactly as
/// virtio-queue's iterator and the general parser do, and is taken for those shapes only: the
/// edges of the shape (header or completion exactly filling its descriptor, a payload or data
/// descriptor of its own, one descriptor too many, a chain longer than the ring, `max_sge`
/// counting, descriptors outside memory, empty or indirect ones) are all here.
#[test]
fn simple_chains_parse_as_the_general_walk() {
    use crate::chain::ParseCtx;
    use crate::testutil::MEM_SIZE;
    const R: u16 = 0;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const IND: u16 = 4;
    let (comp, data, pay) = (0x20000u64, 0x21000u64, 0x30000u64);
    // (descriptors as (address, length, flags), ring size, max_sge, fast path expected)
    #[allow(clippy::type_complexity)]
    let cases: Vec<(Vec<(u64, u32, u16)>, u16, u32, bool)> = vec![
        (vec![(HDR, 96, R), (comp, 64, W)], 16, 8, true),
        (vec![(HDR, 104, R), (comp, 72, W)], 16, 8, true),
        (vec![(HDR, 96, R), (pay, 8, R), (comp, 64, W)], 16, 8, true),
        (
            vec![(HDR, 100, R), (pay, 8, R), (comp, 100, W)],
            16,
            8,
            true,
        ),
        (vec![(HDR, 96, R), (data, 8, W), (comp, 64, W)], 16, 8, true),
        (vec![(HDR, 96, R), (data, 8, W), (comp, 80, W)], 16, 8, true),
        // max_sge: header and completion descriptors do not count, the others do.
        (vec![(HDR, 96, R), (comp, 64, W)], 16, 1, true),
        (vec![(HDR, 104, R), (comp, 72, W)], 16, 1, true),
        (vec![(HDR, 96, R), (data, 8, W), (comp, 64, W)], 16, 1, true),
        (vec![(HDR, 96, R), (pay, 8, R), (data, 8, W)], 16, 1, false),
        (
            vec![(HDR, 104, R), (data, 8, W), (comp, 72, W)],
            16,
            2,
            true,
        ),
        // Not the shape: the general walk.
        (
            vec![(HDR, 100, R), (pay, 8, R), (data, 8, W), (comp, 64, W)],
            16,
            8,
            false,
        ),
        (
            vec![(HDR, 96, R), (pay, 8, R), (pay, 8, R), (comp, 64, W)],
            16,
            8,
            false,
        ),
        (vec![(HDR, 95, R), (pay, 8, R), (comp, 64, W)], 16, 8, false),
        (vec![(HDR, 96, R), (comp, 63, W)], 16, 8, false),
        (
            vec![(HDR, 96, R), (data, 8, W), (comp, 63, W)],
            16,
            8,
            false,
        ),
        (vec![(HDR, 96, W), (comp, 64, W)], 16, 8, false),
        // No writable descriptor, the last readable one large enough for a completion.
        (vec![(HDR, 96, R), (comp, 64, R)], 16, 8, false),
        (vec![(HDR, 96, R), (pay, 8, R), (comp, 64, R)], 16, 8, false),
        (vec![(HDR, 96, R), (comp, 64, W), (pay, 8, R)], 16, 8, false),
        (
            vec![(HDR, 96, R), (data, 0, W), (comp, 64, W)],
            16,
            8,
            false,
        ),
        (vec![(HDR, 96, R), (comp, 64, W | IND)], 16, 8, false),
        (vec![(HDR, 96, R | IND), (comp, 64, W)], 16, 8, false),
        (vec![(HDR, 96, R), (MEM_SIZE - 32, 64, W)], 16, 8, false),
        (vec![(HDR, 96, R), (u64::MAX - 7, 64, W)], 16, 8, false),
        (vec![(MEM_SIZE - 64, 96, R), (comp, 64, W)], 16, 8, false),
        // Three descriptors on a ring of two (the third is the head again): cut short.
        (vec![(HDR, 96, R), (data, 8, W), (comp, 64, W)], 2, 8, false),
        (vec![(HDR, 96, R), (comp, 64, W)], 2, 8, true),
    ];
    for (queue, op) in [(1u16, Opcode::Send), (2, Opcode::Recv)] {
        for (i, (descs, size, max_sge, simple)) in cases.iter().enumerate() {
            let rig = Rig::new(Limits {
                max_sge: *max_sge,
                ..Limits::default()
            });
            let mut r = Request::new(op);
            r.cookie = 7;
            rig.header(r);
            let vq = MockSplitQueue::new(rig.mem(), *size);
            // On a ring smaller than the chain, the last `next` wraps to the head: a loop.
            for (k, (a, l, f)) in descs.iter().enumerate().take(usize::from(*size)) {
                let (flags, next) = if k + 1 < descs.len() {
                    (*f | VRING_DESC_F_NEXT as u16, (k as u16 + 1) % *size)
                } else {
                    (*f, 0)
                };
                vq.desc_table()
                    .store(
                        k as u16,
                        RawDescriptor::from(SplitDescriptor::new(*a, *l, flags, next)),
                    )
                    .unwrap();
            }
            vq.avail().ring().ref_at(0).unwrap().store(0);
            vq.avail().idx().store(1);
            let q: Queue = vq.create_queue().unwrap();
            let mem = Arc::new(rig.mem().clone());
            let view = crate::ring::RingView::build(mem.clone(), 0, &q).unwrap();
            let mut next = q.next_avail();
            let mut fast = Vec::new();
            let mut took_simple = Vec::new();
            // One slot for every chain, as the data path parses them.
            let mut slot = Req::blank(queue, 0);
            let ctx = ParseCtx::new(rig.limits.clone(), ALL_FEATURES);
            view.pop(&mut next, &mem, 64, &ctx, &mut slot, |slot, v| {
                // A plain receive's streams as the general parse gives them.
                let v = (*v).general(slot);
                // Host addresses the walk resolved are those of the streams' first bytes (the
                // completion's at least, on the fast path, and none on the general walk), used
                // through that table only.
                let (agree, usable) = slot.resolved_agree(&mem);
                assert!(agree, "case {i}: resolved host addresses");
                took_simple.push(usable > 0);
                let other = Arc::new(rig.mem().clone());
                assert_eq!(
                    slot.resolved_agree(&other),
                    (true, 0),
                    "case {i}: other table"
                );
                let kept = slot.take();
                assert_eq!(kept.resolved_agree(&mem), (true, usable), "case {i}: taken");
                assert_eq!(slot.resolved_agree(&mem).1, 0, "case {i}: slot after take");
                fast.push(Parsed::new(kept, v));
            })
            .unwrap();
            let mut slow_q: Queue = vq.create_queue().unwrap();
            let desc_table = slow_q.desc_table();
            let slow: Vec<Parsed> = pop_chains(&mut slow_q, rig.mem(), 64)
                .unwrap()
                .into_iter()
                .map(|c| {
                    let indirect = head_is_indirect(rig.mem(), desc_table, c.head_index());
                    parse_chain(rig.mem(), c, queue, &rig.limits, ALL_FEATURES, indirect)
                })
                .collect();
            assert_eq!(fast, slow, "case {i} ({op:?}): {descs:?}");
            assert_eq!(took_simple, [*simple], "case {i} ({op:?}): {descs:?}");
        }
    }
}

mod hostile {
    use proptest::prelude::*;

    use super::*;

    fn opcode() -> impl Strategy<Value = Opcode> {
        prop::sample::select(vec![
            Opcode::QueryCaps,
            Opcode::EpOpen,
            Opcode::EpClose,
            Opcode::Cancel,
            Opcode::AddrCheck,
            Opcode::SvcBind,
            Opcode::SvcResolve,
            Opcode::Send,
            Opcode::TSend,
            Opcode::Recv,
            Opcode::TRecv,
            Opcode::MrReg,
            Opcode::RmaWrite,
        ])
    }

    /// No flag and DIRECTED alone (plain receives and sends) as often as any others.
    fn header_flags() -> impl Strategy<Value = u64> {
        prop_oneof![Just(0), Just(vfabric_proto::flags::DIRECTED), any::<u64>()]
    }

    fn addr() -> impl Strategy<Value = u64> {
        prop_oneof![
            (0u64..0x40).prop_map(|i| HDR + i * 32),
            0u64..(16 << 20),
            Just(u64::MAX - 7),
        ]
    }

    fn len() -> impl Strategy<Value = u32> {
        prop_oneof![
            0u32..200,
            Just(96),
            Just(64),
            Just(u32::MAX),
            0u32..0x2_0000
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn hostile_chains_never_panic(
            descs in proptest::collection::vec((addr(), len(), 0u16..8, 0u16..20), 1..16),
            heads in proptest::collection::vec(0u16..18, 1..12),
            reqs in proptest::collection::vec((opcode(), 0u32..3, header_flags(), 0u64..3), 1..8),
            queue in 0u16..5,
            acked in prop_oneof![Just(ALL_FEATURES), any::<u64>()],
        ) {
            let rig = Rig::new(Limits { eager_threshold: 64, max_sge: 8, ..Limits::default() });
            for (i, (op, ep, fl, data)) in reqs.iter().enumerate() {
                let mut r = Request::new(*op);
                r.ep = *ep;
                r.flags = fl & 0x1fff;
                r.data = *data;
                r.peer = vfabric_proto::FabricAddr::new(1 << 32, *ep, 1);
                rig.mem()
                    .write_obj(r.to_header(), GuestAddress(HDR + 0x100 * i as u64))
                    .unwrap();
            }
            let vq = MockSplitQueue::new(rig.mem(), QSIZE);
            for (i, (a, l, f, n)) in descs.iter().enumerate() {
                vq.desc_table()
                    .store(i as u16, RawDescriptor::from(SplitDescriptor::new(*a, *l, *f, *n)))
                    .unwrap();
            }
            for (i, h) in heads.iter().enumerate() {
                vq.avail().ring().ref_at(i).unwrap().store(*h);
            }
            vq.avail().idx().store(heads.len() as u16);
            // The data path's walker (host-pointer ring view) against virtio-queue's iterator:
            // the same chains must parse to the same requests.
            let mut fast_q: Queue = vq.create_queue().unwrap();
            let mem = Arc::new(rig.mem().clone());
            let view = crate::ring::RingView::build(mem.clone(), 0, &fast_q).unwrap();
            let mut fast = Vec::new();
            let mut fast_next = fast_q.next_avail();
            let mut slot = Req::blank(queue, 0);
            let ctx = crate::chain::ParseCtx::new(rig.limits.clone(), acked);
            let fast_res = view.pop(&mut fast_next, &mem, 64, &ctx, &mut slot, |slot, v| {
                let v = (*v).general(slot);
                // Resolved host addresses are those of the streams' first bytes.
                assert!(slot.resolved_agree(&mem).0);
                fast.push(Parsed::new(slot.clone(), v));
            });
            fast_q.set_next_avail(fast_next);
            let mut q: Queue = vq.create_queue().unwrap();
            let desc_table = q.desc_table();
            let Ok(chains) = pop_chains(&mut q, rig.mem(), 64) else {
                // A head out of range: the ring is corrupt, the guest would be dropped.
                prop_assert!(heads.iter().any(|h| *h >= QSIZE));
                prop_assert!(fast_res.is_err());
                return Ok(());
            };
            let mut parsed: Vec<Parsed> = chains
                .into_iter()
                .map(|c| {
                    let indirect = head_is_indirect(rig.mem(), desc_table, c.head_index());
                    parse_chain(rig.mem(), c, queue, &rig.limits, acked, indirect)
                })
                .collect();
            prop_assert!(fast_res.is_ok());
            prop_assert_eq!(&fast, &parsed);
            prop_assert_eq!(fast_q.next_avail(), q.next_avail());
            let mut n = Notify::default();
            rig.fabric.handle(0, &mut parsed, acked, &mut n);
            // Every entry returned is either empty (unusable chain) or carries a completion.
            let used = rig.guest.sink.used.lock().unwrap().clone();
            prop_assert!(used.len() <= heads.len());
            for (_, _, l) in used {
                prop_assert!(l == 0 || l >= 64);
            }
        }
    }
}

#[test]
fn a_completion_waits_for_its_ring_s_lock_and_is_published_after_it() {
    use crate::fabric::CompletionSink;
    let d = dev();
    let vq0 = MockSplitQueue::create(&d.mem, GuestAddress(QBASE[0]), QSIZE);
    d.mem
        .write_obj(ep_open_req().to_header(), GuestAddress(HDR))
        .unwrap();
    chain(&vq0, 0, &[(HDR, 96, R), (COMP, 64, W)]);
    d.backend
        .handle_event(0, EventSet::IN, &d.vrings, 0)
        .unwrap();
    assert_eq!(vq0.used().idx().load(), 1);
    // Another thread holds ring 0's state: the completion neither skips the lock nor is lost.
    let held = d.vrings[0].ring().state.lock();
    let sink = d.backend.sink.clone();
    let t = std::thread::spawn(move || sink.stage_and_publish(0, 5, 64));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vq0.used().idx().load(), 1);
    drop(held);
    t.join().unwrap();
    assert_eq!(vq0.used().idx().load(), 2);
    let e = vq0.used().ring().ref_at(1).unwrap().load();
    assert_eq!((e.id(), e.len()), (5, 64));
    // With a completion already staged, the next goes out behind it, both with one update.
    d.vrings[0].ring().state.lock().stage(6, 64);
    d.backend.sink.stage_and_publish(0, 7, 72);
    assert_eq!(vq0.used().idx().load(), 4);
    let ids: Vec<(u32, u32)> = (2..4)
        .map(|i| {
            let e = vq0.used().ring().ref_at(i).unwrap().load();
            (e.id(), e.len())
        })
        .collect();
    assert_eq!(ids, [(6, 64), (7, 72)]);
}
