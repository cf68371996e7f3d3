// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end: `start()` a daemon with two devices and drive them with
//! `vhost::vhost_user::Frontend` over the sockets, like the driver does: memfd memory registered
//! with guest address = virtual address, split rings with EVENT_IDX, kick/call eventfds.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use vfabric_device::{start, Config, DaemonHandle};
use vfabric_proto::{
    bit, caps::key, ep_open, CapValue, CapsParser, Completion, FabricAddr, FabricConfig, Opcode,
    Request, Status, REQUIRED_FEATURES, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_FABRIC_F_MQ,
    VIRTIO_FABRIC_F_REMOTE_CQ_DATA, VIRTIO_FABRIC_F_TAGGED, VIRTIO_FABRIC_F_VENDOR_CAPS,
    VIRTIO_ID_FABRIC, VIRTIO_RING_F_EVENT_IDX,
};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const QSIZE: u16 = 16;
const MEM: u64 = 1 << 20;
const NQ: usize = 5;
const TIMEOUT: Duration = Duration::from_secs(10);
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn memfd(size: u64) -> File {
    // SAFETY: the name is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(c"vfabric-test".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    // vfabricd refuses memory that could shrink under its mapping.
    // SAFETY: fcntl(F_ADD_SEALS) on our own memfd; no memory of ours is involved.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    assert_eq!(r, 0, "seal the memfd");
    f
}

struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
    next_desc: u16,
    avail_idx: u16,
    seen_used: u16,
}

/// A minimal driver: one frontend, one memfd, five split rings.
struct Guest {
    fe: Frontend,
    mem: GuestMemoryMmap,
    _file: File,
    /// Virtual address of the mapping = guest address of its first byte.
    va: u64,
    rings: Vec<Ring>,
    next_buf: u64,
}

/// A request in flight.
struct Sub {
    queue: usize,
    head: u16,
    data: u64,
    comp: u64,
}

impl Guest {
    fn connect(path: &Path) -> Frontend {
        Frontend::connect(path, NQ as u64).unwrap()
    }

    // `..Default::default()` covers the fields vhost adds with its `xen` feature.
    #[allow(clippy::needless_update)]
    fn setup(path: &Path) -> Self {
        let mut fe = Self::connect(path);
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        assert_eq!(features & REQUIRED_FEATURES, REQUIRED_FEATURES);
        fe.set_features(features).unwrap();
        let proto = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(proto).unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        assert_eq!(fe.get_queue_num().unwrap(), NQ as u64);

        let file = memfd(MEM);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM as usize,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let va = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: va,
            memory_size: MEM,
            userspace_addr: va,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
            ..Default::default()
        }])
        .unwrap();
        let mut rings = Vec::new();
        for q in 0..NQ {
            let base = va + 0x1000 * q as u64;
            let r = Ring {
                desc: base,
                avail: base + 0x100,
                used: base + 0x200,
                kick: EventFd::new(EFD_NONBLOCK).unwrap(),
                call: EventFd::new(EFD_NONBLOCK).unwrap(),
                next_desc: 0,
                avail_idx: 0,
                seen_used: 0,
            };
            fe.set_vring_num(q, QSIZE).unwrap();
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: r.desc,
                    used_ring_addr: r.used,
                    avail_ring_addr: r.avail,
                    log_addr: None,
                },
            )
            .unwrap();
            fe.set_vring_base(q, 0).unwrap();
            fe.set_vring_call(q, &r.call).unwrap();
            fe.set_vring_kick(q, &r.kick).unwrap();
            fe.set_vring_enable(q, true).unwrap();
            rings.push(r);
        }
        Self {
            fe,
            mem,
            _file: file,
            va,
            rings,
            next_buf: 0x10000,
        }
    }

    fn at(&self, gpa: u64) -> GuestAddress {
        GuestAddress(gpa - self.va)
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let a = self.va + self.next_buf;
        self.next_buf = (self.next_buf + len + 63) & !63;
        assert!(self.next_buf < MEM);
        a
    }

    fn write<T: ByteValued>(&self, gpa: u64, v: T) {
        self.mem.write_obj(v, self.at(gpa)).unwrap();
    }

    /// Post a chain of `(addr, len, writable)` on `queue` and kick.
    fn post(&mut self, queue: usize, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.rings[queue].next_desc;
        for (i, (a, l, w)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let mut flags = if *w { F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= F_NEXT;
            }
            let d = self.rings[queue].desc + 16 * u64::from(idx);
            self.write(d, *a);
            self.write(d + 8, *l);
            self.write(d + 12, flags);
            self.write(d + 14, (idx + 1) % QSIZE);
        }
        let r = &self.rings[queue];
        let (avail, used, slot) = (r.avail, r.used, r.avail_idx % QSIZE);
        self.write(avail + 4 + 2 * u64::from(slot), head);
        // used_event: signal us on the next used entry.
        let seen = self.rings[queue].seen_used;
        self.write(avail + 4 + 2 * u64::from(QSIZE), seen);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let r = &mut self.rings[queue];
        r.avail_idx = r.avail_idx.wrapping_add(1);
        r.next_desc = (head + descs.len() as u16) % QSIZE;
        let idx = r.avail_idx;
        let _ = used;
        self.write(avail + 2, idx);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.rings[queue].kick.write(1).unwrap();
        head
    }

    fn submit(&mut self, queue: usize, r: Request, payload: &[u8], cap: u32) -> Sub {
        let hdr = self.alloc(96);
        self.write(hdr, r.to_header());
        let mut descs = vec![(hdr, 96u32, false)];
        if !payload.is_empty() {
            let p = self.alloc(payload.len() as u64);
            self.mem.write_slice(payload, self.at(p)).unwrap();
            descs.push((p, payload.len() as u32, false));
        }
        let data = self.alloc(u64::from(cap));
        if cap > 0 {
            descs.push((data, cap, true));
        }
        let comp = self.alloc(64);
        descs.push((comp, 64, true));
        let head = self.post(queue, &descs);
        Sub {
            queue,
            head,
            data,
            comp,
        }
    }

    fn used_idx(&self, queue: usize) -> u16 {
        self.mem
            .read_obj::<u16>(self.at(self.rings[queue].used + 2))
            .unwrap()
    }

    /// Wait for the used entry of `s` (signalled through the call eventfd), return completion
    /// and used length.
    fn wait(&mut self, s: &Sub) -> (Completion, u32) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let used = self.used_idx(s.queue);
            let r = &self.rings[s.queue];
            if used != r.seen_used {
                let slot = r.seen_used % QSIZE;
                let e = r.used + 4 + 8 * u64::from(slot);
                let id: u32 = self.mem.read_obj(self.at(e)).unwrap();
                let len: u32 = self.mem.read_obj(self.at(e + 4)).unwrap();
                assert_eq!(id, u32::from(s.head), "completions in order on this queue");
                self.rings[s.queue].seen_used = r.seen_used.wrapping_add(1);
                let c: Completion = self.mem.read_obj(self.at(s.comp)).unwrap();
                return (c, len);
            }
            assert!(Instant::now() < deadline, "request not completed in time");
            let mut pfd = libc::pollfd {
                fd: r.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, 100 ms timeout.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            let _ = r.call.read();
        }
    }

    /// Assert that the device signals queue `queue`'s call eventfd (EVENT_IDX allowing).
    fn expect_call(&self, queue: usize) {
        let mut pfd = libc::pollfd {
            fd: self.rings[queue].call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, bounded timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, TIMEOUT.as_millis() as i32) };
        assert_eq!(n, 1, "no call on queue {queue}");
        self.rings[queue].call.read().unwrap();
    }

    fn status(c: &Completion) -> Status {
        Status::from_u32(c.status.into()).unwrap()
    }

    fn open(&mut self) -> FabricAddr {
        let mut r = Request::new(Opcode::EpOpen);
        r.data = ep_open::TYPE_RDM;
        let s = self.submit(0, r, &[], 0);
        let (c, _) = self.wait(&s);
        assert_eq!(Self::status(&c), Status::Ok);
        FabricAddr::from_wire(&c.src)
    }
}

/// Fabric id of the test daemon.
const FABRIC: u32 = 0xfab;

fn daemon(dir: &Path) -> DaemonHandle {
    let mut c = Config::new(Config::socket_dir_paths(dir, 2));
    c.fabric_id = FABRIC;
    c.limits.eager_threshold = 1024;
    start(c).unwrap()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn features_config_messages_disconnect_and_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path());
    let paths = d.socket_paths().to_vec();
    assert_eq!(paths.len(), 2);
    assert!(paths.iter().all(|p| p.exists()));

    // Features and config space, before any memory is set up.
    {
        let mut fe = Guest::connect(&paths[0]);
        let f = fe.get_features().unwrap();
        for b in [
            VIRTIO_RING_F_EVENT_IDX,
            VHOST_USER_F_PROTOCOL_FEATURES,
            VIRTIO_FABRIC_F_TAGGED,
            VIRTIO_FABRIC_F_MQ,
            VIRTIO_FABRIC_F_VENDOR_CAPS,
            VIRTIO_FABRIC_F_REMOTE_CQ_DATA,
        ] {
            assert_ne!(f & bit(b), 0, "feature {b} offered");
        }
        assert_eq!(f & 0b1_1100, 0b1_1100, "RMA, ATOMIC and RMA_PMEM offered");
        fe.set_features(f).unwrap();
        let p = fe.get_protocol_features().unwrap();
        let want = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        assert!(p.contains(want));
        fe.set_protocol_features(p).unwrap();
        let (_, cfg) = fe
            .get_config(0, 48, VhostUserConfigFlags::empty(), &[0u8; 48])
            .unwrap();
        let cfg = FabricConfig::from_slice(&cfg).copied().unwrap();
        assert_eq!(u32::from(cfg.num_queue_pairs), 2);
        assert_eq!(u32::from(cfg.max_endpoints), 64);
        assert_eq!(u64::from(cfg.max_msg_size), 16 << 20);
        assert_eq!(u64::from(cfg.node_addr), FabricAddr::node_of(FABRIC, 1, 0));
        assert_eq!(u32::from(cfg.fabric_id), FABRIC);
        let (_, part) = fe
            .get_config(40, 8, VhostUserConfigFlags::empty(), &[0u8; 8])
            .unwrap();
        assert_eq!(part, cfg.as_slice()[40..48].to_vec());
        assert!(fe.get_max_mem_slots().unwrap() > 0);
    }
    // That frontend went away: the device serves the next one.
    wait_until("first disconnect", || d.stats().devices[0].disconnects == 1);
    assert_eq!(VIRTIO_ID_FABRIC, 56);

    let mut a = Guest::setup(&paths[0]);
    let mut b = Guest::setup(&paths[1]);

    // QUERY_CAPS.
    let s = a.submit(0, Request::new(Opcode::QueryCaps), &[], 4096);
    let (c, used) = a.wait(&s);
    assert_eq!(Guest::status(&c), Status::Ok);
    let n = u64::from(c.len) as usize;
    assert_eq!(used as usize, n + 64);
    let mut buf = vec![0u8; n];
    a.mem.read_slice(&mut buf, a.at(s.data)).unwrap();
    let caps = CapsParser::parse(&buf).unwrap();
    let node = caps
        .iter()
        .find(|e| e.vendor == 0 && e.key == key::NODE_ADDR)
        .unwrap();
    assert_eq!(node.value, CapValue::U64(FabricAddr::node_of(FABRIC, 1, 0)));

    let ea = a.open();
    let eb = b.open();
    assert_eq!(eb.node, FabricAddr::node_of(FABRIC, 1, 1));

    // B posts a receive; A's large send lands in it with one copy.
    let mut r = Request::new(Opcode::Recv);
    r.ep = eb.ep;
    r.cookie = 1;
    let rb = b.submit(2, r, &[], 65536);
    let msg: Vec<u8> = (0..40000u32).map(|i| (i * 7) as u8).collect();
    let mut s = Request::new(Opcode::Send);
    s.ep = ea.ep;
    s.peer = eb;
    s.cookie = 2;
    let sa = a.submit(1, s, &msg, 0);
    // B is notified from A's device thread.
    b.expect_call(2);
    let (c, used) = a.wait(&sa);
    assert_eq!(Guest::status(&c), Status::Ok);
    assert_eq!(u64::from(c.len), 40000);
    assert_eq!(used, 64);
    let (c, used) = b.wait(&rb);
    assert_eq!(Guest::status(&c), Status::Ok);
    assert_eq!(u64::from(c.len), 40000);
    assert_eq!(used, 40064);
    assert_eq!(FabricAddr::from_wire(&c.src), ea);
    let mut got = vec![0u8; 40000];
    b.mem.read_slice(&mut got, b.at(rb.data)).unwrap();
    assert_eq!(got, msg);

    // Tagged eager message, received after it arrived.
    let mut s = Request::new(Opcode::TSend);
    s.ep = ea.ep;
    s.peer = eb;
    s.tag = 0x42;
    let sa = a.submit(1, s, b"tagged!", 0);
    assert_eq!(Guest::status(&a.wait(&sa).0), Status::Ok);
    let mut r = Request::new(Opcode::TRecv);
    r.ep = eb.ep;
    r.tag = 0x40;
    r.ignore = 0x0f;
    let rb = b.submit(2, r, &[], 64);
    let (c, _) = b.wait(&rb);
    assert_eq!(u64::from(c.tag), 0x42);
    let mut got = [0u8; 7];
    b.mem.read_slice(&mut got, b.at(rb.data)).unwrap();
    assert_eq!(&got, b"tagged!");

    // A hostile chain: writable before readable.
    let comp = a.alloc(64);
    let hdr = a.alloc(96);
    a.write(hdr, Request::new(Opcode::EpOpen).to_header());
    let head = a.post(0, &[(comp, 64, true), (hdr, 96, false)]);
    let bad = Sub {
        queue: 0,
        head,
        data: 0,
        comp,
    };
    assert_eq!(Guest::status(&a.wait(&bad).0), Status::BadChain);

    let st = d.stats();
    assert_eq!(st.devices[0].messages_sent, 2);
    assert_eq!(st.devices[1].messages_received, 2);
    assert_eq!(st.devices[1].bytes_copied, 40007);
    assert_eq!(st.devices[0].errors(Status::BadChain), 1);
    assert!(st.devices[0].connected && st.devices[1].connected);

    // B disconnects: its addresses become unavailable; a pending send to it gets PeerGone.
    let mut s = Request::new(Opcode::Send);
    s.ep = ea.ep;
    s.peer = eb;
    let big = vec![5u8; 5000]; // above eager_threshold: held
    let held = a.submit(1, s, &big, 0);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(a.used_idx(1), a.rings[1].seen_used, "held send waits");
    drop(b);
    wait_until("B's disconnect", || d.stats().devices[1].disconnects == 1);
    assert_eq!(Guest::status(&a.wait(&held).0), Status::PeerGone);
    let late = a.submit(1, s, b"late", 0);
    assert_eq!(Guest::status(&a.wait(&late).0), Status::AddrNotAvail);

    // A new frontend on B's socket gets a fresh device.
    let mut b2 = Guest::setup(&paths[1]);
    let eb2 = b2.open();
    assert_eq!(eb2.ep, eb.ep);
    assert_ne!(eb2.generation, eb.generation);
    let mut s = Request::new(Opcode::Send);
    s.ep = ea.ep;
    s.peer = eb2;
    let ok = a.submit(1, s, b"again", 0);
    assert_eq!(Guest::status(&a.wait(&ok).0), Status::Ok);

    // Stopping a ring cancels what is posted on it.
    let mut r = Request::new(Opcode::Recv);
    r.ep = eb2.ep;
    r.cookie = 5;
    let r1 = b2.submit(2, r, &[], 64);
    let r2 = b2.submit(2, r, &[], 64);
    assert_eq!(Guest::status(&b2.wait(&r1).0), Status::Ok, "gets \"again\"");
    std::thread::sleep(Duration::from_millis(20));
    b2.fe.get_vring_base(2).unwrap();
    assert_eq!(Guest::status(&b2.wait(&r2).0), Status::Canceled);

    drop(a);
    drop(b2);
    d.shutdown();
    assert!(paths.iter().all(|p| !p.exists()), "sockets removed");
}

#[test]
fn shutdown_with_connected_frontend_and_rebind() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path());
    let paths = d.socket_paths().to_vec();
    let g = Guest::setup(&paths[0]);
    let t = Instant::now();
    d.shutdown();
    assert!(t.elapsed() < TIMEOUT);
    assert!(!paths[0].exists());
    drop(g);
    // The same paths can be served again.
    let d = daemon(dir.path());
    let mut g = Guest::setup(&paths[1]);
    let e = g.open();
    assert_eq!(e.node, FabricAddr::node_of(FABRIC, 1, 1));
    drop(d);
}

#[test]
fn concurrent_bidirectional_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path());
    let paths = d.socket_paths().to_vec();
    let mut a = Guest::setup(&paths[0]);
    let mut b = Guest::setup(&paths[1]);
    let ea = a.open();
    let eb = b.open();
    const N: usize = 300;
    let run = move |mut g: Guest, me: FabricAddr, peer: FabricAddr, seed: u8| {
        std::thread::spawn(move || {
            let mark = g.next_buf;
            for i in 0..N {
                g.next_buf = mark;
                // Alternate eager (small) and held (above eager_threshold) messages.
                let len = if i % 2 == 0 { 100 } else { 5000 };
                let msg: Vec<u8> = (0..len).map(|k| (k as u8) ^ (i as u8) ^ seed).collect();
                let mut r = Request::new(Opcode::Recv);
                r.ep = me.ep;
                r.cookie = i as u64;
                let rs = g.submit(2, r, &[], 8192);
                let mut s = Request::new(Opcode::Send);
                s.ep = me.ep;
                s.peer = peer;
                s.cookie = i as u64;
                let ss = g.submit(1, s, &msg, 0);
                let (c, _) = g.wait(&ss);
                assert_eq!(Guest::status(&c), Status::Ok);
                let (c, used) = g.wait(&rs);
                assert_eq!(Guest::status(&c), Status::Ok);
                let n = u64::from(c.len) as usize;
                assert_eq!(used as usize, n + 64);
                let mut got = vec![0u8; n];
                g.mem.read_slice(&mut got, g.at(rs.data)).unwrap();
                let other = seed ^ 0xff;
                let expect: Vec<u8> = (0..n).map(|k| (k as u8) ^ (i as u8) ^ other).collect();
                assert_eq!(got, expect, "message {i} intact and in order");
            }
            g
        })
    };
    let ta = run(a, ea, eb, 0x00);
    let tb = run(b, eb, ea, 0xff);
    let a = ta.join().unwrap();
    let b = tb.join().unwrap();
    let st = d.stats();
    for dev in &st.devices {
        assert_eq!(dev.messages_sent, N as u64);
        assert_eq!(dev.messages_received, N as u64);
        assert_eq!(dev.bytes_copied, (N as u64 / 2) * 5100);
        assert!(
            dev.error_completions.is_empty(),
            "{:?}",
            dev.error_completions
        );
    }
    drop((a, b));
    d.shutdown();
}

#[test]
fn corrupt_ring_drops_only_that_guest() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path());
    let paths = d.socket_paths().to_vec();
    let mut a = Guest::setup(&paths[0]);
    let mut b = Guest::setup(&paths[1]);
    let _ea = a.open();
    let eb = b.open();
    // A's avail index jumps by more than the queue size.
    let avail = a.rings[1].avail;
    a.write(avail + 2, 3 * QSIZE);
    a.rings[1].kick.write(1).unwrap();
    wait_until("A's disconnect", || {
        let s = d.stats();
        s.devices[0].ring_errors == 1 && s.devices[0].disconnects == 1
    });
    // The connection is gone for A…
    assert!(a.fe.get_features().is_err());
    // …while B and the daemon carry on.
    let mut r = Request::new(Opcode::Recv);
    r.ep = eb.ep;
    let rb = b.submit(2, r, &[], 64);
    let mut s = Request::new(Opcode::Send);
    s.ep = eb.ep;
    s.peer = eb;
    let sb = b.submit(1, s, b"still here", 0);
    assert_eq!(Guest::status(&b.wait(&sb).0), Status::Ok);
    assert_eq!(Guest::status(&b.wait(&rb).0), Status::Ok);
    // A can come back.
    let mut a2 = Guest::setup(&paths[0]);
    a2.open();
    d.shutdown();
}

#[test]
fn handle_is_send_and_sync_and_config_errors_are_reported() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<DaemonHandle>();
    send_sync::<vfabric_device::Stats>();
    let dir = tempfile::tempdir().unwrap();
    // Invalid limits and a socket in a missing directory are errors, not panics.
    let mut c = Config::new(vec![dir.path().join("a.sock")]);
    c.limits.max_queue_size = 1000;
    assert!(matches!(start(c), Err(vfabric_device::Error::Config(_))));
    let c = Config::new(vec![dir.path().join("missing/a.sock")]);
    assert!(matches!(
        start(c),
        Err(vfabric_device::Error::Socket { .. })
    ));
    assert!(vfabric_device::capabilities_json().contains("\"type\": \"fabric\""));
}

#[test]
fn handshake_deadline_drops_only_connections_without_a_running_ring() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config::new(Config::socket_dir_paths(dir.path(), 2));
    c.handshake_timeout = Duration::from_millis(100);
    let d = start(c).unwrap();
    let paths = d.socket_paths().to_vec();
    // A guest with running rings on device 1, accepted before the silent client below.
    let mut g1 = Guest::setup(&paths[1]);
    // A client that connects to device 0 and says nothing is dropped at its deadline.
    let mut silent = std::os::unix::net::UnixStream::connect(&paths[0]).unwrap();
    wait_until("the silent client dropped", || {
        let s = &d.stats().devices[0];
        s.handshake_timeouts == 1 && s.disconnects == 1 && !s.connected
    });
    silent.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(
        std::io::Read::read(&mut silent, &mut b),
        Ok(0) | Err(_)
    ));
    // Device 1's guest is past its own deadline (it was accepted earlier) and keeps its device.
    let s1 = &d.stats().devices[1];
    assert_eq!((s1.handshake_timeouts, s1.disconnects), (0, 0), "{s1:?}");
    assert!(s1.connected);
    g1.open();
    // Device 0 is free for a real guest.
    let mut g0 = Guest::setup(&paths[0]);
    g0.open();
    drop((g0, g1));
    d.shutdown();
}
