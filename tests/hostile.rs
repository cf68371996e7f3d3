// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Hostile frontends against an embedded `vfabricd`.
//!
//! The rule under test (docs/spec.md §6.14, §6.15): the device trusts nothing a guest sends.
//! Every descriptor, address, length, key and opcode is checked; a bad one gets a clear error
//! completion (or, for ring corruption, the offending guest alone is disconnected), and no other
//! guest loses data or service.
//!
//! Every test starts a daemon with three devices. Devices 0 and 1 carry two WELL-BEHAVED guests
//! (the `vfabric` driver, [`Pair`]); device 2 carries a HOSTILE guest ([`Hostile`]): a
//! hand-written vhost-user frontend that lays out split rings in a memfd with raw writes, so it
//! can post arbitrarily malformed chains. After each attack the test checks
//!
//! (a) the hostile request's outcome: the completion (the last 64 writable bytes of the chain)
//!     and the used-ring entry, or the disconnection of the hostile guest alone
//!     (`DaemonHandle::stats()`, its socket), and
//! (b) that the two well-behaved guests still exchange messages correctly (send/recv with
//!     checksums, eager and rendezvous sizes, both directions) and, where applicable, that the
//!     hostile guest can (re)connect and work normally.
//!
//! Guest addresses of the hostile frontend are the virtual addresses of its memfd mapping (as
//! the driver does), so "outside guest memory" addresses are well defined, and the buffers of
//! the well-behaved guests (mapped in this same process) are valid addresses of *their* devices
//! but outside the hostile device's memory.
//!
//! Every wait is bounded; every test body runs under a watchdog ([`bounded`]).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vfabric::{
    AddressVector, BindFlags, CompletionQueue, CqAttr, CqEntry, CqErrEntry, Domain, DomainAttr,
    Endpoint, EpAttr, Error as DrvError, FiAddr, SharedBuf, WaitMode,
};
use vfabric_device::{Config, DaemonHandle, DeviceStats};
use vfabric_proto::{
    bit, comp_flags, ep_open, flags, Completion, FabricAddr, Opcode, ReqHeader, Request, Status,
    COMPLETION_LEN, REQ_HEADER_LEN, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_FABRIC_F_MQ,
    VIRTIO_FABRIC_F_MSG, VIRTIO_FABRIC_F_REMOTE_CQ_DATA, VIRTIO_FABRIC_F_RMA_PMEM,
    VIRTIO_FABRIC_F_TAGGED, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

/// Bound of any single wait for a completion / state change.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Watchdog of a whole test body.
const TEST_LIMIT: Duration = Duration::from_secs(60);
/// How long "no answer" is observed.
const QUIET: Duration = Duration::from_millis(250);

/// The fabric id of the rig's daemon (addresses built by hand use it).
const FABRIC: u32 = 0x7e57;
/// Device index of the hostile guest (0 and 1 are the well-behaved ones).
const HOSTILE: usize = 2;
/// Virtqueues of a device (control + 2 queue pairs, the default `num_queue_pairs`).
const NQ: usize = 5;
const CTRL: usize = 0;
const TX: usize = 1;
const RX: usize = 2;
const TX1: usize = 3;
const RX1: usize = 4;

/// Ring size the hostile frontend uses.
const QSIZE: u16 = 64;
/// Size of the hostile guest's memory.
const HMEM: u64 = 4 << 20;
/// First byte (offset) of the hostile guest's buffer area (rings live below it).
const BUF_START: u64 = 0x10000;

/// Device limits of the rig.
const MAX_MSG: u64 = 1 << 20;
const MAX_SGE: u32 = 8;
const EAGER: u64 = 16 << 10;
const INJECT_SIZE: u32 = 256;

/// Shared buffers of each well-behaved guest.
const PEER_BUF: usize = 1 << 20;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Byte the hostile guest pre-fills completion areas with, to see whether the device wrote them.
const FILL: u8 = 0xEE;

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// Run `f` on its own thread and fail if it has not finished within `TEST_LIMIT` (a hang of the
/// device shows as a test failure, not a stuck test run).
fn bounded<F: FnOnce() + Send + 'static>(name: &str, f: F) {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            f();
            let _ = tx.send(());
        })
        .expect("spawn test thread");
    match rx.recv_timeout(TEST_LIMIT) {
        Ok(()) => handle.join().expect("test thread"),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(p) = handle.join() {
                std::panic::resume_unwind(p);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{name}: did not finish within {TEST_LIMIT:?} (device or test hang)")
        }
    }
}

/// Poll `cond` every few milliseconds for at most `TIMEOUT`.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Deterministic pattern (xorshift) so that any misplaced byte shows.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(&mut v, seed);
    v
}

fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// FNV-1a, 64-bit.
fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn status_of(c: &Completion) -> Result<Status, u32> {
    let raw = u32::from(c.status);
    Status::from_u32(raw).ok_or(raw)
}

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

/// An embedded daemon serving three device sockets in a temporary directory.
struct Rig {
    daemon: Option<DaemonHandle>,
    paths: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = Config::socket_dir_paths(dir.path(), 3);
        let mut c = Config::new(paths.clone());
        c.fabric_id = FABRIC;
        c.limits.max_msg_size = MAX_MSG;
        c.limits.max_sge = MAX_SGE;
        c.limits.eager_threshold = EAGER;
        c.limits.inject_size = INJECT_SIZE;
        let daemon = vfabric_device::start(c).expect("start the embedded vfabricd");
        Self {
            daemon: Some(daemon),
            paths,
            _dir: dir,
        }
    }

    fn stats(&self, dev: usize) -> DeviceStats {
        self.daemon.as_ref().expect("daemon").stats().devices[dev].clone()
    }

    /// Wait until device `dev` counted `n` disconnects in total and has no frontend.
    fn wait_disconnects(&self, dev: usize, n: u64) {
        wait_until(&format!("{n} disconnect(s) of device {dev}"), || {
            let s = self.stats(dev);
            s.disconnects >= n && !s.connected
        });
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.shutdown();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Well-behaved guests (the driver)
// ---------------------------------------------------------------------------------------------

/// A well-behaved guest: one domain, one endpoint, TX and RX CQs, an AV, two shared buffers.
struct Peer {
    ep: Endpoint,
    tx: CompletionQueue,
    rx: CompletionQueue,
    av: AddressVector,
    sbuf: SharedBuf,
    rbuf: SharedBuf,
    domain: Domain,
}

impl Peer {
    fn open(path: &Path) -> Self {
        let domain = Domain::open(
            path,
            DomainAttr {
                mem_bytes: 16 << 20,
                control_timeout: TIMEOUT,
                ..DomainAttr::default()
            },
        )
        .expect("well-behaved guest: open domain");
        let attr = CqAttr {
            size: 256,
            wait: WaitMode::None,
        };
        let tx = domain.cq_open(attr).unwrap();
        let rx = domain.cq_open(attr).unwrap();
        let av = domain.av_open().unwrap();
        let ep = domain.endpoint(EpAttr::default()).unwrap();
        ep.bind_cq(&tx, BindFlags::TRANSMIT).unwrap();
        ep.bind_cq(&rx, BindFlags::RECV).unwrap();
        ep.bind_av(&av).unwrap();
        ep.enable().unwrap();
        let sbuf = domain.alloc_buffer(PEER_BUF).unwrap();
        let rbuf = domain.alloc_buffer(PEER_BUF).unwrap();
        Self {
            ep,
            tx,
            rx,
            av,
            sbuf,
            rbuf,
            domain,
        }
    }

    /// Another endpoint on the same domain, bound to the same CQs and AV.
    fn extra_endpoint(&self) -> Endpoint {
        let ep = self.domain.endpoint(EpAttr::default()).unwrap();
        ep.bind_cq(&self.tx, BindFlags::TRANSMIT).unwrap();
        ep.bind_cq(&self.rx, BindFlags::RECV).unwrap();
        ep.bind_av(&self.av).unwrap();
        ep.enable().unwrap();
        ep
    }
}

/// Next entry of `cq` (Ok) or error entry (Err), polling for at most `TIMEOUT`.
fn next(cq: &CompletionQueue) -> Result<CqEntry, CqErrEntry> {
    let deadline = Instant::now() + TIMEOUT;
    let mut v = Vec::new();
    let mut polls = 0u32;
    loop {
        match cq.read(&mut v, 1) {
            Ok(_) => return Ok(v.pop().expect("one entry")),
            Err(DrvError::Again) => {}
            Err(DrvError::Avail) => return Err(cq.readerr().expect("error entry at the head")),
            Err(e) => panic!("cq read: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for a completion"
        );
        polls = polls.wrapping_add(1);
        if polls.is_multiple_of(64) {
            std::thread::sleep(Duration::from_micros(100));
        } else {
            std::thread::yield_now();
        }
    }
}

fn next_ok(cq: &CompletionQueue, what: &str) -> CqEntry {
    next(cq).unwrap_or_else(|e| panic!("{what}: unexpected error completion {e:?}"))
}

fn next_err(cq: &CompletionQueue, what: &str) -> CqErrEntry {
    match next(cq) {
        Ok(e) => panic!("{what}: expected an error completion, got {e:?}"),
        Err(e) => e,
    }
}

/// Nothing arrives on `cq` for `d`.
fn assert_quiet(cq: &CompletionQueue, d: Duration, what: &str) {
    let until = Instant::now() + d;
    let mut v = Vec::new();
    while Instant::now() < until {
        match cq.read(&mut v, 1) {
            Err(DrvError::Again) => std::thread::sleep(Duration::from_millis(1)),
            other => panic!("{what}: unexpected completion {other:?} {v:?}"),
        }
    }
}

/// Message sizes of a service check: inline, eager, just above the eager threshold (held),
/// large rendezvous.
const SIZES: &[usize] = &[1, 333, 4096, EAGER as usize + 1, 200_000];

/// The two well-behaved guests, each knowing the other.
struct Pair {
    a: Peer,
    b: Peer,
    a_to_b: FiAddr,
    b_to_a: FiAddr,
    round: u64,
}

impl Pair {
    fn open(rig: &Rig) -> Self {
        Self::open_paths(&rig.paths[0], &rig.paths[1])
    }

    fn open_paths(a: &Path, b: &Path) -> Self {
        let a = Peer::open(a);
        let b = Peer::open(b);
        let a_to_b = a.av.insert(b.ep.name()).unwrap();
        let b_to_a = b.av.insert(a.ep.name()).unwrap();
        Self {
            a,
            b,
            a_to_b,
            b_to_a,
            round: 0,
        }
    }

    /// One message `from` → `to`, verified byte for byte (checksum) with its source address.
    fn transfer(
        from: &mut Peer,
        to: &mut Peer,
        dest: FiAddr,
        size: usize,
        seed: u64,
        recv_first: bool,
    ) {
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        fill_pattern(&mut unsafe { from.sbuf.as_mut_slice() }[..size], seed);
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        let want = checksum(&unsafe { from.sbuf.as_slice() }[..size]);
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        (unsafe { to.rbuf.as_mut_slice() })[..size].fill(0);
        let ctx = seed;
        if recv_first {
            to.ep.recv_buf(&to.rbuf, 0..size, ctx).expect("post recv");
        }
        from.ep
            .send_buf(&from.sbuf, 0..size, dest, ctx)
            .expect("post send");
        if !recv_first {
            to.ep.recv_buf(&to.rbuf, 0..size, ctx).expect("post recv");
        }
        let what = format!("well-behaved message of {size} B (seed {seed:#x})");
        let s = next_ok(&from.tx, &what);
        assert_eq!((s.context, s.len), (ctx, size), "{what}: send completion");
        let r = next_ok(&to.rx, &what);
        assert_eq!(r.context, ctx, "{what}: receive context");
        assert_eq!(r.len, size, "{what}: received length");
        assert_eq!(r.src, Some(from.ep.name()), "{what}: source address");
        assert_eq!(
            // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
            checksum(&unsafe { to.rbuf.as_slice() }[..size]),
            want,
            "{what}: payload checksum"
        );
    }

    /// Both directions, every size, alternating "receive posted first" and "send first".
    fn exchange(&mut self) {
        self.round += 1;
        for (i, &size) in SIZES.iter().enumerate() {
            let seed = (self.round << 32) | ((i as u64) << 8);
            let first = i % 2 == 0;
            Self::transfer(&mut self.a, &mut self.b, self.a_to_b, size, seed | 1, first);
            Self::transfer(
                &mut self.b,
                &mut self.a,
                self.b_to_a,
                size,
                seed | 2,
                !first,
            );
        }
        assert_quiet(&self.a.rx, Duration::from_millis(5), "A after exchange");
        assert_quiet(&self.b.rx, Duration::from_millis(5), "B after exchange");
    }
}

/// The daemon and the two well-behaved guests. (Field order: guests are dropped first.)
struct World {
    pair: Pair,
    rig: Rig,
}

impl World {
    fn new() -> Self {
        let rig = Rig::new();
        let mut pair = Pair::open(&rig);
        pair.exchange();
        Self { pair, rig }
    }

    fn hostile_path(&self) -> PathBuf {
        self.rig.paths[HOSTILE].clone()
    }

    /// A fully set-up hostile guest on device 2.
    fn hostile(&self) -> Hostile {
        Hostile::new(&self.hostile_path())
    }

    /// (b): the well-behaved guests are unaffected and their devices saw no error.
    fn check_service(&mut self) {
        self.pair.exchange();
        for dev in 0..2 {
            let s = self.rig.stats(dev);
            assert!(s.connected, "device {dev} still connected: {s:?}");
            assert_eq!(s.disconnects, 0, "device {dev}: {s:?}");
            assert_eq!(s.ring_errors, 0, "device {dev}: {s:?}");
            assert_eq!(s.bad_chains, 0, "device {dev}: {s:?}");
        }
    }

    /// The hostile guest is disconnected, alone, counting `n` disconnects so far.
    fn expect_hostile_disconnected(&self, h: &Hostile, n: u64, ring_errors: u64) {
        self.rig.wait_disconnects(HOSTILE, n);
        let s = self.rig.stats(HOSTILE);
        assert_eq!(s.ring_errors, ring_errors, "hostile device: {s:?}");
        assert!(
            h.fe.get_features().is_err(),
            "the hostile guest's socket must be closed"
        );
    }

    /// The hostile guest's device is still serving it (not disconnected).
    fn expect_hostile_connected(&self) {
        let s = self.rig.stats(HOSTILE);
        assert!(s.connected, "hostile guest must stay connected: {s:?}");
        assert_eq!(s.ring_errors, 0, "{s:?}");
        assert_eq!(s.disconnects, 0, "{s:?}");
    }

    /// The hostile guest works normally: it opens an endpoint, receives a rendezvous message
    /// from A (receive posted first) and sends an eager one to A (send first), both verified.
    fn hostile_works(&mut self, h: &mut Hostile) {
        let me = h.open_ep();
        let a = &mut self.pair.a;
        let to_h = a.av.insert(me).unwrap();

        let size = 40_000;
        let r = h.request(RX, h.recv_hdr(me.ep, 0x5151), &[], 65536);
        let msg = pattern(size, 0x1234);
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        (unsafe { a.sbuf.as_mut_slice() })[..size].copy_from_slice(&msg);
        a.ep.send_buf(&a.sbuf, 0..size, to_h, 0xA1).unwrap();
        let e = next_ok(&a.tx, "A -> hostile");
        assert_eq!(e.len, size);
        let c = h.expect_ok(&r, (size + COMPLETION_LEN) as u32, "hostile receive from A");
        assert_eq!(u64::from(c.len), size as u64);
        assert_eq!(FabricAddr::from_wire(&c.src), a.ep.name());
        assert_eq!(checksum(&h.read(r.data, size)), checksum(&msg));

        let msg = pattern(3000, 0x4321);
        let s = h.request(TX, h.send_hdr(me.ep, a.ep.name(), 0x5252), &msg, 0);
        let c = h.expect_ok(&s, COMPLETION_LEN as u32, "hostile send to A");
        assert_eq!(u64::from(c.len), 3000);
        a.ep.recv_buf(&a.rbuf, 0..8192, 0xA2).unwrap();
        let e = next_ok(&a.rx, "hostile -> A");
        assert_eq!((e.context, e.len, e.src), (0xA2, 3000, Some(me)));
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        assert_eq!(
            checksum(&unsafe { a.rbuf.as_slice() }[..3000]),
            checksum(&msg)
        );
    }

    /// A new hostile frontend can connect (after `n` disconnects) and work normally.
    fn hostile_reconnects(&mut self, n: u64) {
        self.rig.wait_disconnects(HOSTILE, n);
        let mut h = self.hostile();
        self.hostile_works(&mut h);
        let s = self.rig.stats(HOSTILE);
        assert!(s.connected, "{s:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The hostile frontend
// ---------------------------------------------------------------------------------------------

/// One descriptor as written into the table.
#[derive(Clone, Copy, Debug)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// A byte range of a chain, device-readable or device-writable.
#[derive(Clone, Copy, Debug)]
struct Seg {
    addr: u64,
    len: u32,
    write: bool,
}

fn rd(addr: u64, len: u32) -> Seg {
    Seg {
        addr,
        len,
        write: false,
    }
}

fn wr(addr: u64, len: u32) -> Seg {
    Seg {
        addr,
        len,
        write: true,
    }
}

/// A chain made available, to be waited for.
#[derive(Clone, Debug)]
struct Sub {
    q: usize,
    head: u16,
    /// Where the completion is: the last 64 writable bytes of the chain.
    comp: Vec<(u64, u32)>,
    /// Start of the data area (first writable byte), 0 if none.
    data: u64,
}

/// Driver side of one split ring laid out by hand.
struct RawRing {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    kick: EventFd,
    call: EventFd,
    err: EventFd,
    avail_idx: u16,
    used_seen: u16,
    free: VecDeque<u16>,
    /// Descriptor indices of each chain in flight, by head.
    chains: HashMap<u16, Vec<u16>>,
    /// Used lengths seen, by used-element id.
    done: HashMap<u32, VecDeque<u32>>,
}

fn memfd(size: u64) -> File {
    let f = memfd_unsealed(size);
    // The device requires memory that cannot shrink under its mapping (F_SEAL_SHRINK).
    // SAFETY: fcntl(F_ADD_SEALS) on the memfd we own; it reads no memory of ours.
    let r = unsafe {
        libc::fcntl(
            f.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    assert_eq!(r, 0, "seal the memfd: {}", std::io::Error::last_os_error());
    f
}

fn memfd_unsealed(size: u64) -> File {
    // SAFETY: the name is a valid NUL-terminated string and the flags are valid; the call has no
    // memory effects on our side.
    let fd = unsafe { libc::memfd_create(c"vfabric-hostile".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).expect("size the memfd");
    f
}

/// Bound every vhost-user exchange of this socket: a daemon that never answers makes a call
/// fail instead of hanging the test.
fn socket_timeouts(fd: i32) {
    let tv = libc::timeval {
        tv_sec: TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: `tv` is a valid timeval that outlives the call and its size is passed;
        // setsockopt only reads it.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "setsockopt: {}", std::io::Error::last_os_error());
    }
}

/// How the hostile frontend negotiates.
#[derive(Clone, Copy, Debug)]
enum Features {
    /// Acknowledge everything the device offers.
    All,
    /// Acknowledge exactly these bits (whatever the device offers).
    Exactly(u64),
    /// Never send SET_FEATURES.
    Skip,
}

/// A hand-written vhost-user frontend with raw access to its rings.
struct Hostile {
    fe: Frontend,
    mem: GuestMemoryMmap<()>,
    file: File,
    /// Guest address of the first byte of its memory (= the mapping's virtual address).
    va: u64,
    size: u64,
    rings: Vec<Option<RawRing>>,
    /// Next free offset of the buffer area.
    bump: u64,
    /// Feature bits acknowledged (None: SET_FEATURES never sent).
    acked: Option<u64>,
    cookie: u64,
}

impl Hostile {
    /// Connect and map (but do not share) the memory. No vhost-user message is sent yet.
    fn connect(path: &Path) -> Self {
        let fe = Frontend::connect(path, NQ as u64).expect("connect the hostile frontend");
        socket_timeouts(fe.as_raw_fd());
        let file = memfd(HMEM);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            HMEM as usize,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .expect("map the hostile memory");
        let va = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        Self {
            fe,
            mem,
            file,
            va,
            size: HMEM,
            rings: (0..NQ).map(|_| None).collect(),
            bump: BUF_START,
            acked: None,
            cookie: 0x1000,
        }
    }

    /// SET_OWNER, feature negotiation, protocol features (REPLY_ACK only when it can work).
    fn negotiate(&mut self, f: Features) {
        self.fe.set_owner().expect("SET_OWNER");
        let offered = self.fe.get_features().expect("GET_FEATURES");
        let acked = match f {
            Features::All => offered,
            Features::Exactly(bits) => bits,
            Features::Skip => return,
        };
        self.fe.set_features(acked).expect("SET_FEATURES");
        self.acked = Some(acked);
        if acked & bit(VHOST_USER_F_PROTOCOL_FEATURES) != 0 {
            let p = self
                .fe
                .get_protocol_features()
                .expect("GET_PROTOCOL_FEATURES");
            let want = VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
            self.fe
                .set_protocol_features(p & want)
                .expect("SET_PROTOCOL_FEATURES");
            self.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            assert_eq!(self.fe.get_queue_num().unwrap(), NQ as u64);
        }
    }

    fn region(&self) -> VhostUserMemoryRegionInfo {
        // `..Default::default()` covers the fields vhost adds with its `xen` feature.
        #[allow(clippy::needless_update)]
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.va,
            memory_size: self.size,
            userspace_addr: self.va,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
            ..Default::default()
        }
    }

    fn share_memory(&mut self) {
        self.fe
            .set_mem_table(&[self.region()])
            .expect("SET_MEM_TABLE");
    }

    /// The standard ring layout: one 4 KiB page per queue.
    fn ring_layout(&self, q: usize) -> (u64, u64, u64) {
        let base = self.va + 0x1000 * q as u64;
        (base, base + 0x400, base + 0x800)
    }

    fn vring_config(size: u16, (desc, avail, used): (u64, u64, u64)) -> VringConfigData {
        VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: desc,
            used_ring_addr: used,
            avail_ring_addr: avail,
            log_addr: None,
        }
    }

    /// Hand ring `q` to the device at `addrs` and start it (and enable it when protocol
    /// features were negotiated). Panics if the device refuses.
    fn start_ring_at(&mut self, q: usize, addrs: (u64, u64, u64)) {
        self.try_start_ring_at(q, addrs)
            .unwrap_or_else(|e| panic!("start ring {q}: {e}"));
    }

    fn try_start_ring_at(&mut self, q: usize, addrs: (u64, u64, u64)) -> Result<(), String> {
        let ring = RawRing {
            desc: addrs.0,
            avail: addrs.1,
            used: addrs.2,
            size: QSIZE,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
            err: EventFd::new(EFD_NONBLOCK).unwrap(),
            avail_idx: 0,
            used_seen: 0,
            free: (0..QSIZE).collect(),
            chains: HashMap::new(),
            done: HashMap::new(),
        };
        let e = |what: &str, e: vhost::Error| format!("{what}({q}): {e}");
        self.fe
            .set_vring_num(q, QSIZE)
            .map_err(|x| e("SET_VRING_NUM", x))?;
        self.fe
            .set_vring_addr(q, &Self::vring_config(QSIZE, addrs))
            .map_err(|x| e("SET_VRING_ADDR", x))?;
        self.fe
            .set_vring_base(q, 0)
            .map_err(|x| e("SET_VRING_BASE", x))?;
        self.fe
            .set_vring_call(q, &ring.call)
            .map_err(|x| e("SET_VRING_CALL", x))?;
        self.fe
            .set_vring_err(q, &ring.err)
            .map_err(|x| e("SET_VRING_ERR", x))?;
        self.fe
            .set_vring_kick(q, &ring.kick)
            .map_err(|x| e("SET_VRING_KICK", x))?;
        if self
            .acked
            .is_some_and(|f| f & bit(VHOST_USER_F_PROTOCOL_FEATURES) != 0)
        {
            self.fe
                .set_vring_enable(q, true)
                .map_err(|x| e("SET_VRING_ENABLE", x))?;
        }
        self.rings[q] = Some(ring);
        Ok(())
    }

    fn start_all_rings(&mut self) {
        for q in 0..NQ {
            let l = self.ring_layout(q);
            self.start_ring_at(q, l);
        }
    }

    /// A complete, well-formed session with the given features.
    fn with_features(path: &Path, f: Features) -> Self {
        let mut h = Self::connect(path);
        h.negotiate(f);
        h.share_memory();
        h.start_all_rings();
        h
    }

    fn new(path: &Path) -> Self {
        Self::with_features(path, Features::All)
    }

    fn node(&self) -> u64 {
        FabricAddr::node_of(FABRIC, 1, HOSTILE as u16)
    }

    // ---- memory ----

    fn inside(&self, addr: u64, len: u64) -> bool {
        addr >= self.va
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.va + self.size)
    }

    fn at(&self, addr: u64, len: u64) -> GuestAddress {
        assert!(
            self.inside(addr, len),
            "test bug: {addr:#x}+{len} outside the hostile memory"
        );
        GuestAddress(addr - self.va)
    }

    fn write(&self, addr: u64, b: &[u8]) {
        self.mem
            .write_slice(b, self.at(addr, b.len() as u64))
            .unwrap();
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, self.at(addr, len as u64))
            .unwrap();
        v
    }

    fn put<T: ByteValued>(&self, addr: u64, v: T) {
        self.mem
            .write_obj(v, self.at(addr, std::mem::size_of::<T>() as u64))
            .unwrap();
    }

    fn get<T: ByteValued>(&self, addr: u64) -> T {
        self.mem
            .read_obj(self.at(addr, std::mem::size_of::<T>() as u64))
            .unwrap()
    }

    /// `len` bytes of the buffer area, 64-byte aligned, filled with [`FILL`].
    fn alloc(&mut self, len: u64) -> u64 {
        let len = len.max(1);
        if self.bump + len > self.size {
            self.bump = BUF_START;
        }
        assert!(
            self.bump + len <= self.size,
            "test bug: allocation too large"
        );
        let a = self.va + self.bump;
        self.bump = (self.bump + len + 63) & !63;
        a
    }

    fn alloc_filled(&mut self, len: u64) -> u64 {
        let a = self.alloc(len);
        self.write(a, &vec![FILL; len as usize]);
        a
    }

    /// Write `h` into fresh memory; returns its address.
    fn header_at(&mut self, h: &ReqHeader) -> u64 {
        let a = self.alloc(REQ_HEADER_LEN as u64);
        self.put(a, *h);
        a
    }

    /// First address past the end of guest memory.
    fn end(&self) -> u64 {
        self.va + self.size
    }

    // ---- headers ----

    fn next_cookie(&mut self) -> u64 {
        self.cookie += 1;
        0xC0C0_0000_0000 | self.cookie
    }

    fn hdr(&mut self, op: Opcode, ep: u32) -> ReqHeader {
        let mut r = Request::new(op);
        r.ep = ep;
        r.cookie = self.next_cookie();
        r.to_header()
    }

    /// A header with a raw (possibly undefined) opcode.
    fn raw_hdr(&mut self, opcode: u16, ep: u32) -> ReqHeader {
        let mut h = self.hdr(Opcode::Send, ep);
        h.opcode = opcode.into();
        h
    }

    fn send_hdr(&self, ep: u32, peer: FabricAddr, cookie: u64) -> ReqHeader {
        let mut r = Request::new(Opcode::Send);
        r.ep = ep;
        r.peer = peer;
        r.cookie = cookie;
        r.to_header()
    }

    fn recv_hdr(&self, ep: u32, cookie: u64) -> ReqHeader {
        let mut r = Request::new(Opcode::Recv);
        r.ep = ep;
        r.cookie = cookie;
        r.to_header()
    }

    // ---- rings ----

    fn ring(&mut self, q: usize) -> &mut RawRing {
        self.rings[q].as_mut().expect("ring not started")
    }

    fn alloc_descs(&mut self, q: usize, n: usize) -> Vec<u16> {
        let r = self.ring(q);
        assert!(r.free.len() >= n, "test bug: ring {q} out of descriptors");
        r.free.drain(..n).collect()
    }

    fn write_desc(&self, q: usize, idx: u16, d: RawDesc) {
        let base = self.rings[q].as_ref().unwrap().desc + 16 * u64::from(idx);
        self.put(base, d.addr);
        self.put(base + 8, d.len);
        self.put(base + 12, d.flags);
        self.put(base + 14, d.next);
    }

    /// Write the avail-ring slot and publish it, then kick.
    fn push_avail(&mut self, q: usize, head: u16) {
        let (avail, slot) = {
            let r = self.ring(q);
            (r.avail, r.avail_idx % r.size)
        };
        self.put(avail + 4 + 2 * u64::from(slot), head);
        fence(Ordering::SeqCst);
        let idx = {
            let r = self.ring(q);
            r.avail_idx = r.avail_idx.wrapping_add(1);
            r.avail_idx
        };
        self.put(avail + 2, idx);
        fence(Ordering::SeqCst);
        self.kick(q);
    }

    fn kick(&self, q: usize) {
        self.rings[q].as_ref().unwrap().kick.write(1).unwrap();
    }

    /// Where the last 64 writable bytes of `segs` are (fewer if the chain has fewer).
    fn comp_of(segs: &[Seg]) -> Vec<(u64, u32)> {
        let mut left = COMPLETION_LEN as u64;
        let mut out = Vec::new();
        for s in segs.iter().rev().filter(|s| s.write) {
            if left == 0 {
                break;
            }
            let take = left.min(u64::from(s.len));
            if take > 0 {
                out.push((s.addr.wrapping_add(u64::from(s.len) - take), take as u32));
            }
            left -= take;
        }
        out.reverse();
        out
    }

    /// Pre-fill the parts of a completion area that are inside guest memory.
    fn prefill(&self, comp: &[(u64, u32)]) {
        for &(a, l) in comp {
            if self.inside(a, u64::from(l)) {
                self.write(a, &vec![FILL; l as usize]);
            }
        }
    }

    /// Post `segs` as one chain of consecutive links, in the given order.
    fn post(&mut self, q: usize, segs: &[Seg]) -> Sub {
        let idx = self.alloc_descs(q, segs.len());
        for (i, s) in segs.iter().enumerate() {
            let mut f = if s.write { F_WRITE } else { 0 };
            let next = if i + 1 < segs.len() {
                f |= F_NEXT;
                idx[i + 1]
            } else {
                0
            };
            self.write_desc(
                q,
                idx[i],
                RawDesc {
                    addr: s.addr,
                    len: s.len,
                    flags: f,
                    next,
                },
            );
        }
        let comp = Self::comp_of(segs);
        self.prefill(&comp);
        let data = segs.iter().find(|s| s.write).map_or(0, |s| s.addr);
        self.publish(q, idx, comp, data)
    }

    /// Make the chain whose descriptors are `idx` (head first) available.
    fn publish(&mut self, q: usize, idx: Vec<u16>, comp: Vec<(u64, u32)>, data: u64) -> Sub {
        let head = idx[0];
        self.ring(q).chains.insert(head, idx);
        self.push_avail(q, head);
        Sub {
            q,
            head,
            comp,
            data,
        }
    }

    /// Post a well-formed request: header, payload, data area of `cap` bytes, completion.
    fn request(&mut self, q: usize, h: ReqHeader, payload: &[u8], cap: u32) -> Sub {
        let ha = self.header_at(&h);
        let mut segs = vec![rd(ha, REQ_HEADER_LEN as u32)];
        if !payload.is_empty() {
            let p = self.alloc(payload.len() as u64);
            self.write(p, payload);
            segs.push(rd(p, payload.len() as u32));
        }
        if cap > 0 {
            segs.push(wr(self.alloc_filled(u64::from(cap)), cap));
        }
        segs.push(wr(self.alloc(64), 64));
        self.post(q, &segs)
    }

    /// Collect the used elements of ring `q` the device published.
    fn reap(&mut self, q: usize) {
        let used = self.rings[q].as_ref().unwrap().used;
        let idx: u16 = self.get(used + 2);
        fence(Ordering::Acquire);
        loop {
            let (seen, size) = {
                let r = self.rings[q].as_ref().unwrap();
                (r.used_seen, r.size)
            };
            if seen == idx {
                break;
            }
            let e = used + 4 + 8 * u64::from(seen % size);
            let id: u32 = self.get(e);
            let len: u32 = self.get(e + 4);
            let r = self.ring(q);
            r.used_seen = seen.wrapping_add(1);
            r.done.entry(id).or_default().push_back(len);
            if let Some(ix) = u16::try_from(id).ok().and_then(|h| r.chains.remove(&h)) {
                r.free.extend(ix);
            }
        }
    }

    /// The used length of `s`, or None if the device did not use it within `d`.
    fn try_wait(&mut self, s: &Sub, d: Duration) -> Option<u32> {
        let deadline = Instant::now() + d;
        loop {
            self.reap(s.q);
            if let Some(len) = self
                .ring(s.q)
                .done
                .get_mut(&u32::from(s.head))
                .and_then(|v| v.pop_front())
            {
                return Some(len);
            }
            if Instant::now() >= deadline {
                return None;
            }
            let r = self.rings[s.q].as_ref().unwrap();
            let mut pfd = libc::pollfd {
                fd: r.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid, initialised pollfd that outlives the call; bounded timeout.
            unsafe { libc::poll(&mut pfd, 1, 2) };
            let _ = r.call.read();
        }
    }

    fn wait(&mut self, s: &Sub, what: &str) -> u32 {
        self.try_wait(s, TIMEOUT).unwrap_or_else(|| {
            panic!("{what}: the device did not use the chain within {TIMEOUT:?}")
        })
    }

    fn comp_bytes(&self, s: &Sub) -> Vec<u8> {
        let mut v = Vec::with_capacity(COMPLETION_LEN);
        for &(a, l) in &s.comp {
            v.extend(self.read(a, l as usize));
        }
        v
    }

    fn completion(&self, s: &Sub) -> Completion {
        let b = self.comp_bytes(s);
        *Completion::from_slice(&b).expect("64 completion bytes")
    }

    /// (a): used with length 64 and a completion with `want`, `cookie` echoed, every other field
    /// zero (§6.2.1).
    fn expect_status(&mut self, s: &Sub, want: Status, cookie: u64, what: &str) {
        let len = self.wait(s, what);
        assert_eq!(len, COMPLETION_LEN as u32, "{what}: used length");
        let c = self.completion(s);
        assert_eq!(status_of(&c), Ok(want), "{what}: completion {c:?}");
        assert_eq!(u64::from(c.cookie), cookie, "{what}: cookie");
        let expect = Completion {
            status: (want as u32).into(),
            cookie: cookie.into(),
            ..Default::default()
        };
        assert_eq!(
            c, expect,
            "{what}: fields other than status and cookie are zero"
        );
    }

    /// A request that must succeed; returns its completion.
    fn expect_ok(&mut self, s: &Sub, used: u32, what: &str) -> Completion {
        let len = self.wait(s, what);
        let c = self.completion(s);
        assert_eq!(status_of(&c), Ok(Status::Ok), "{what}: completion {c:?}");
        assert_eq!(len, used, "{what}: used length");
        c
    }

    /// (a) for chains without a usable completion: used length 0, completion area untouched.
    fn expect_unusable(&mut self, s: &Sub, what: &str) {
        let len = self.wait(s, what);
        assert_eq!(len, 0, "{what}: used length must be 0");
        for &(a, l) in &s.comp {
            if self.inside(a, u64::from(l)) {
                assert!(
                    self.read(a, l as usize).iter().all(|b| *b == FILL),
                    "{what}: the device wrote into a chain it returned with length 0"
                );
            }
        }
    }

    /// No used element for `s` within [`QUIET`].
    fn expect_no_answer(&mut self, s: &Sub, what: &str) {
        if let Some(len) = self.try_wait(s, QUIET) {
            panic!(
                "{what}: expected no answer, got used length {len}, completion {:?}",
                self.completion(s)
            );
        }
    }

    // ---- common requests ----

    fn open_ep(&mut self) -> FabricAddr {
        let mut h = self.hdr(Opcode::EpOpen, 0);
        h.data = ep_open::TYPE_RDM.into();
        let s = self.request(CTRL, h, &[], 0);
        let c = self.expect_ok(&s, COMPLETION_LEN as u32, "hostile EP_OPEN");
        let a = FabricAddr::from_wire(&c.src);
        assert_eq!(a.node, self.node());
        assert_eq!(u64::from(c.data), u64::from(a.ep));
        a
    }

    /// Wait until every chain made available on RX queue `q` before now has been processed
    /// (a queue is processed in order; there is no order across queues): a TRECV PEEK that
    /// matches nothing completes NO_MESSAGE once the device reached it.
    fn fence_rx(&mut self, q: usize, ep: u32) {
        let mut hd = self.hdr(Opcode::TRecv, ep);
        hd.tag = 0xFE9C_E000_0000_0000.into();
        hd.flags = flags::PEEK.into();
        let s = self.request(q, hd, &[], 0);
        self.expect_status(&s, Status::NoMessage, hd.cookie.into(), "fence (PEEK)");
    }

    fn close_ep(&mut self, ep: u32) -> Status {
        let h = self.hdr(Opcode::EpClose, ep);
        let s = self.request(CTRL, h, &[], 0);
        self.wait(&s, "EP_CLOSE");
        status_of(&self.completion(&s)).expect("known status")
    }
}

// ---------------------------------------------------------------------------------------------
// Attack classes
// ---------------------------------------------------------------------------------------------

/// Descriptor addresses outside the hostile guest's memory: header, payload, data area
/// (→ FAULT), completion (→ used length 0); and addresses that are valid in ANOTHER guest's
/// memory (the device must translate in the poster's memory only).
#[test]
fn descriptor_address_outside_guest_memory() {
    bounded("descriptor_address_outside_guest_memory", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let b = w.pair.b.ep.name();
        let outside = [h.end(), h.end() + 0x10_0000, h.va - 0x1000, 0x1000];
        for (i, &bad) in outside.iter().enumerate() {
            // Header descriptor outside: FAULT, cookie unknown (0).
            let comp = h.alloc(64);
            let s = h.post(TX, &[rd(bad, 96), wr(comp, 64)]);
            h.expect_status(&s, Status::Fault, 0, &format!("header at {bad:#x} ({i})"));

            // Payload descriptor outside.
            let hd = h.send_hdr(me.ep, b, 0x77);
            let ha = h.header_at(&hd);
            let comp = h.alloc(64);
            let s = h.post(TX, &[rd(ha, 96), rd(bad, 512), wr(comp, 64)]);
            h.expect_status(&s, Status::Fault, 0, &format!("payload at {bad:#x}"));

            // Second payload descriptor outside, first one fine.
            let ha = h.header_at(&hd);
            let p = h.alloc(128);
            let comp = h.alloc(64);
            let s = h.post(TX, &[rd(ha, 96), rd(p, 128), rd(bad, 8), wr(comp, 64)]);
            h.expect_status(&s, Status::Fault, 0, &format!("2nd payload at {bad:#x}"));

            // Receive data area outside.
            let hd = h.recv_hdr(me.ep, 0x78);
            let ha = h.header_at(&hd);
            let comp = h.alloc(64);
            let s = h.post(RX, &[rd(ha, 96), wr(bad, 4096), wr(comp, 64)]);
            h.expect_status(&s, Status::Fault, 0, &format!("data area at {bad:#x}"));

            // Completion descriptor outside: nothing to write to, used length 0.
            let ha = h.header_at(&hd);
            let s = h.post(RX, &[rd(ha, 96), wr(bad, 64)]);
            h.expect_unusable(&s, &format!("completion at {bad:#x}"));
        }
        // Completion straddling the end of guest memory.
        let hd = h.recv_hdr(me.ep, 0x79);
        let ha = h.header_at(&hd);
        let s = h.post(RX, &[rd(ha, 96), wr(h.end() - 32, 64)]);
        h.expect_unusable(&s, "completion straddling the end of memory");
        // Payload straddling the end of guest memory.
        let hd = h.send_hdr(me.ep, b, 0x7a);
        let ha = h.header_at(&hd);
        let comp = h.alloc(64);
        let s = h.post(TX, &[rd(ha, 96), rd(h.end() - 100, 200), wr(comp, 64)]);
        h.expect_status(&s, Status::Fault, 0, "payload straddling the end of memory");

        // Addresses valid in guest A's memory (A's buffers, mapped in this process) but not in
        // the hostile guest's: a send must not read them, a receive must not write them.
        let a_send = w.pair.a.sbuf.addr();
        let a_recv = w.pair.a.rbuf.addr();
        assert!(!h.inside(a_send, 4096) && !h.inside(a_recv, 4096));
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        fill_pattern(&mut unsafe { w.pair.a.sbuf.as_mut_slice() }[..4096], 0xAAAA);
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        (unsafe { w.pair.a.rbuf.as_mut_slice() })[..4096].fill(0x5A);
        let hd = h.send_hdr(me.ep, b, 0x7b);
        let ha = h.header_at(&hd);
        let comp = h.alloc(64);
        let s = h.post(TX, &[rd(ha, 96), rd(a_send, 4096), wr(comp, 64)]);
        h.expect_status(&s, Status::Fault, 0, "payload in another guest's memory");
        let hd = h.recv_hdr(me.ep, 0x7c);
        let ha = h.header_at(&hd);
        let comp = h.alloc(64);
        let s = h.post(RX, &[rd(ha, 96), wr(a_recv, 4096), wr(comp, 64)]);
        h.expect_status(&s, Status::Fault, 0, "data area in another guest's memory");
        // A's message to the hostile endpoint must not land in A's own buffer either.
        let to_h = w.pair.a.av.insert(me).unwrap();
        w.pair.a.ep.send(&pattern(100, 1), to_h, 0xA0).unwrap();
        next_ok(&w.pair.a.tx, "A -> hostile (unexpected)");
        assert!(
            // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
            unsafe { w.pair.a.rbuf.as_slice() }[..4096]
                .iter()
                .all(|b| *b == 0x5A),
            "another guest's memory was written"
        );
        let r = h.request(RX, h.recv_hdr(me.ep, 0x7d), &[], 256);
        let c = h.expect_ok(&r, 164, "hostile receives A's message normally");
        assert_eq!(u64::from(c.len), 100);
        assert_eq!(h.read(r.data, 100), pattern(100, 1));

        w.expect_hostile_connected();
        let st = w.rig.stats(HOSTILE);
        assert!(st.errors(Status::Fault) >= 4 * 4 + 1 + 2, "{st:?}");
        w.check_service();
        w.hostile_works(&mut h);
    });
}

/// Lengths that overflow: address + length wrapping the 64-bit space (header, payload, data,
/// completion), and lengths of 2 GiB and more starting inside guest memory.
#[test]
fn lengths_that_overflow() {
    bounded("lengths_that_overflow", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let b = w.pair.b.ep.name();
        let buf = h.alloc(4096);
        let wraps = [u64::MAX - 40, u64::MAX, u64::MAX - 95];

        for &a in &wraps {
            let comp = h.alloc(64);
            let s = h.post(TX, &[rd(a, 96), wr(comp, 64)]);
            h.expect_status(&s, Status::Fault, 0, &format!("header {a:#x}+96 wraps"));

            let hd = h.send_hdr(me.ep, b, 1);
            let ha = h.header_at(&hd);
            let comp = h.alloc(64);
            let s = h.post(TX, &[rd(ha, 96), rd(a, 4096), wr(comp, 64)]);
            h.expect_status(&s, Status::Fault, 0, &format!("payload {a:#x}+4096 wraps"));

            let hd = h.recv_hdr(me.ep, 2);
            let ha = h.header_at(&hd);
            let comp = h.alloc(64);
            let s = h.post(RX, &[rd(ha, 96), wr(a, 4096), wr(comp, 64)]);
            h.expect_status(&s, Status::Fault, 0, &format!("data {a:#x}+4096 wraps"));

            let ha = h.header_at(&hd);
            let s = h.post(RX, &[rd(ha, 96), wr(a, 64)]);
            h.expect_unusable(&s, &format!("completion {a:#x}+64 wraps"));
        }
        // Huge lengths starting inside guest memory (the chain's total stays below 4 GiB; see
        // `descriptor_lengths_totalling_4_gib_are_a_fault` for u32::MAX).
        for len in [0x8000_0000, 0xF000_0000, (HMEM as u32) + 1] {
            let hd = h.send_hdr(me.ep, b, 3);
            let ha = h.header_at(&hd);
            let comp = h.alloc(64);
            let s = h.post(TX, &[rd(ha, 96), rd(buf, len), wr(comp, 64)]);
            h.expect_status(&s, Status::Fault, 0, &format!("payload length {len:#x}"));

            let hd = h.recv_hdr(me.ep, 4);
            let ha = h.header_at(&hd);
            let comp = h.alloc(64);
            let s = h.post(RX, &[rd(ha, 96), wr(buf, len), wr(comp, 64)]);
            h.expect_status(&s, Status::Fault, 0, &format!("data length {len:#x}"));

            let ha = h.header_at(&hd);
            let s = h.post(RX, &[rd(ha, 96), wr(buf, len)]);
            h.expect_unusable(&s, &format!("completion in a {len:#x}-byte descriptor"));

            // The header descriptor itself is huge.
            let ha = h.header_at(&hd);
            let comp = h.alloc(64);
            let s = h.post(RX, &[rd(ha, len), wr(comp, 64)]);
            h.expect_status(&s, Status::Fault, 0, &format!("header length {len:#x}"));
        }
        w.expect_hostile_connected();
        w.check_service();
        w.hostile_works(&mut h);
    });
}

/// Descriptor lengths whose sum reaches 4 GiB: one payload or data descriptor of 4 GiB - 1
/// bytes ("len huge") after the 96-byte header, or two descriptors of 2 GiB. §6.14 check 2: a
/// chain whose total length does not fit in 32 bits cannot be walked → used length 0.
#[test]
fn descriptor_lengths_totalling_4_gib_cannot_be_walked() {
    bounded("descriptor_lengths_totalling_4_gib", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let b = w.pair.b.ep.name();
        let buf = h.alloc(4096);

        let hd = h.send_hdr(me.ep, b, 1);
        let ha = h.header_at(&hd);
        let comp = h.alloc(64);
        let s = h.post(TX, &[rd(ha, 96), rd(buf, u32::MAX), wr(comp, 64)]);
        h.expect_unusable(&s, "payload of 0xFFFF_FFFF bytes");

        let hd = h.recv_hdr(me.ep, 2);
        let ha = h.header_at(&hd);
        let comp = h.alloc(64);
        let s = h.post(RX, &[rd(ha, 96), wr(buf, u32::MAX), wr(comp, 64)]);
        h.expect_unusable(&s, "data area of 0xFFFF_FFFF bytes");

        let hd = h.send_hdr(me.ep, b, 3);
        let ha = h.header_at(&hd);
        let comp = h.alloc(64);
        let s = h.post(
            TX,
            &[
                rd(ha, 96),
                rd(buf, 0x8000_0000),
                rd(buf, 0x8000_0000),
                wr(comp, 64),
            ],
        );
        h.expect_unusable(&s, "readable bytes total 4 GiB + 96");
        w.expect_hostile_connected();
        w.check_service();
    });
}

/// Descriptor loops (self, two-element, through the whole ring) and `next` indices out of range:
/// the chain cannot be walked → used length 0; the queue keeps working.
#[test]
fn descriptor_loops_and_next_out_of_range() {
    bounded("descriptor_loops_and_next_out_of_range", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let b = w.pair.b.ep.name();

        // Each case: (name, q, number of descriptors, builder of the raw table entries).
        let hd = h.send_hdr(me.ep, b, 9);
        let ha = h.header_at(&hd);
        let comp = h.alloc_filled(64);
        let compseg = vec![(comp, 64u32)];
        let d = |addr, len, flags, next| RawDesc {
            addr,
            len,
            flags,
            next,
        };

        // Self loop on the completion descriptor.
        let ix = h.alloc_descs(TX, 2);
        h.write_desc(TX, ix[0], d(ha, 96, F_NEXT, ix[1]));
        h.write_desc(TX, ix[1], d(comp, 64, F_WRITE | F_NEXT, ix[1]));
        let s = h.publish(TX, ix, compseg.clone(), 0);
        h.expect_unusable(&s, "self loop");

        // Two-element loop: header -> completion -> header.
        let ix = h.alloc_descs(TX, 2);
        h.write_desc(TX, ix[0], d(ha, 96, F_NEXT, ix[1]));
        h.write_desc(TX, ix[1], d(comp, 64, F_WRITE | F_NEXT, ix[0]));
        let s = h.publish(TX, ix, compseg.clone(), 0);
        h.expect_unusable(&s, "two-element loop");

        // A loop through every descriptor of the ring: more descriptors than the queue size.
        let n = QSIZE as usize;
        let ix = h.alloc_descs(TX, n);
        let p = h.alloc(16);
        for i in 0..n {
            let next = ix[(i + 1) % n];
            let e = match i {
                0 => d(ha, 96, F_NEXT, next),
                _ if i == n - 1 => d(comp, 64, F_WRITE | F_NEXT, next),
                _ => d(p, 16, F_NEXT, next),
            };
            h.write_desc(TX, ix[i], e);
        }
        let s = h.publish(TX, ix, compseg.clone(), 0);
        h.expect_unusable(&s, "loop through the whole ring");

        // `next` out of range (QSIZE, QSIZE + 7, 0xffff).
        for bad in [QSIZE, QSIZE + 7, u16::MAX] {
            let ix = h.alloc_descs(TX, 2);
            h.write_desc(TX, ix[0], d(ha, 96, F_NEXT, ix[1]));
            h.write_desc(TX, ix[1], d(comp, 64, F_WRITE | F_NEXT, bad));
            let s = h.publish(TX, ix, compseg.clone(), 0);
            h.expect_unusable(&s, &format!("next = {bad}"));
            let ix = h.alloc_descs(TX, 1);
            h.write_desc(TX, ix[0], d(ha, 96, F_NEXT, bad));
            let s = h.publish(TX, ix, vec![], 0);
            h.expect_unusable(&s, &format!("header with next = {bad}"));
        }

        let st = w.rig.stats(HOSTILE);
        assert_eq!(st.bad_chains, 3 + 6, "{st:?}");
        // The ring is still usable: the same queue carries a valid send.
        let msg = pattern(700, 5);
        let s = h.request(TX, h.send_hdr(me.ep, b, 10), &msg, 0);
        h.expect_ok(&s, 64, "send after the loops");
        w.pair.b.ep.recv_buf(&w.pair.b.rbuf, 0..4096, 0xB0).unwrap();
        let e = next_ok(&w.pair.b.rx, "B receives the hostile guest's valid send");
        assert_eq!((e.len, e.src), (700, Some(me)));
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        assert_eq!(&unsafe { w.pair.b.rbuf.as_slice() }[..700], &msg[..]);

        w.expect_hostile_connected();
        w.check_service();
    });
}

/// More data descriptors than `max_sge` → BAD_CHAIN; exactly `max_sge` is accepted (and the
/// payload is gathered in order).
#[test]
fn chain_longer_than_max_sge() {
    bounded("chain_longer_than_max_sge", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let b = w.pair.b.ep.name();

        // max_sge + 1 payload descriptors.
        let hd = h.send_hdr(me.ep, b, 0x31);
        let ha = h.header_at(&hd);
        let mut segs = vec![rd(ha, 96)];
        for _ in 0..=MAX_SGE {
            segs.push(rd(h.alloc(100), 100));
        }
        segs.push(wr(h.alloc(64), 64));
        let s = h.post(TX, &segs);
        h.expect_status(&s, Status::BadChain, 0, "max_sge + 1 payload descriptors");

        // max_sge + 1 data-area descriptors of a receive.
        let hd = h.recv_hdr(me.ep, 0x32);
        let ha = h.header_at(&hd);
        let mut segs = vec![rd(ha, 96)];
        for _ in 0..=MAX_SGE {
            segs.push(wr(h.alloc(100), 100));
        }
        segs.push(wr(h.alloc(64), 64));
        let s = h.post(RX, &segs);
        h.expect_status(&s, Status::BadChain, 0, "max_sge + 1 data-area descriptors");

        // A whole ring's worth of descriptors (no loop).
        let hd = h.send_hdr(me.ep, b, 0x33);
        let ha = h.header_at(&hd);
        let p = h.alloc(8);
        let mut segs = vec![rd(ha, 96)];
        segs.extend((0..QSIZE - 2).map(|_| rd(p, 8)));
        segs.push(wr(h.alloc(64), 64));
        let s = h.post(TX, &segs);
        h.expect_status(&s, Status::BadChain, 0, "a chain as long as the ring");

        // Exactly max_sge payload descriptors: accepted, B gets the bytes in order.
        let msg = pattern(100 * MAX_SGE as usize, 0x99);
        let hd = h.send_hdr(me.ep, b, 0x34);
        let ha = h.header_at(&hd);
        let mut segs = vec![rd(ha, 96)];
        for part in msg.chunks(100) {
            let a = h.alloc(100);
            h.write(a, part);
            segs.push(rd(a, 100));
        }
        segs.push(wr(h.alloc(64), 64));
        let s = h.post(TX, &segs);
        h.expect_ok(&s, 64, "exactly max_sge payload descriptors");
        w.pair.b.ep.recv_buf(&w.pair.b.rbuf, 0..4096, 0xB1).unwrap();
        let e = next_ok(&w.pair.b.rx, "B receives the gathered message");
        assert_eq!((e.len, e.src), (msg.len(), Some(me)));
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        assert_eq!(&unsafe { w.pair.b.rbuf.as_slice() }[..msg.len()], &msg[..]);

        let st = w.rig.stats(HOSTILE);
        assert_eq!(st.errors(Status::BadChain), 3, "{st:?}");
        w.expect_hostile_connected();
        w.check_service();
    });
}

/// Descriptors that carry only header or completion bytes are not data descriptors (§6.2): a
/// header split over several descriptors plus `max_sge` payload descriptors is valid.
#[test]
fn split_header_and_completion_descriptors_are_not_data_descriptors() {
    bounded("split_header_descriptors_are_not_data", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let b = w.pair.b.ep.name();

        // EP_OPEN whose header is split into 12 descriptors of 8 bytes: 0 data descriptors.
        let mut hd = h.hdr(Opcode::EpOpen, 0);
        hd.data = ep_open::TYPE_RDM.into();
        let ha = h.header_at(&hd);
        let mut segs: Vec<Seg> = (0..12).map(|i| rd(ha + 8 * i, 8)).collect();
        segs.push(wr(h.alloc(64), 64));
        let s = h.post(CTRL, &segs);
        let c = h.expect_ok(&s, 64, "EP_OPEN with the header in 12 descriptors");
        assert_eq!(u64::from(c.cookie), u64::from(hd.cookie));

        // SEND: header in 4 descriptors, max_sge payload descriptors, completion in 4.
        let msg = pattern(50 * MAX_SGE as usize, 0x42);
        let hd = h.send_hdr(me.ep, b, 0x35);
        let ha = h.header_at(&hd);
        let mut segs: Vec<Seg> = (0..4).map(|i| rd(ha + 24 * i, 24)).collect();
        for part in msg.chunks(50) {
            let a = h.alloc(50);
            h.write(a, part);
            segs.push(rd(a, 50));
        }
        let comp = h.alloc(64);
        segs.extend((0..4).map(|i| wr(comp + 16 * i, 16)));
        let s = h.post(TX, &segs);
        h.expect_ok(
            &s,
            64,
            "max_sge data descriptors, split header and completion",
        );
        w.pair.b.ep.recv_buf(&w.pair.b.rbuf, 0..4096, 0xB2).unwrap();
        let e = next_ok(&w.pair.b.rx, "B receives");
        assert_eq!(e.len, msg.len());
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        assert_eq!(&unsafe { w.pair.b.rbuf.as_slice() }[..msg.len()], &msg[..]);
        w.check_service();
    });
}

/// Writes an indirect descriptor table into the hostile guest's memory; returns its address.
fn put_table(h: &mut Hostile, entries: &[RawDesc]) -> u64 {
    let t = h.alloc(16 * entries.len().max(1) as u64);
    for (i, e) in entries.iter().enumerate() {
        let base = t + 16 * i as u64;
        h.put(base, e.addr);
        h.put(base + 8, e.len);
        h.put(base + 12, e.flags);
        h.put(base + 14, e.next);
    }
    t
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDesc {
    RawDesc {
        addr,
        len,
        flags,
        next,
    }
}

/// Post one ring descriptor referring to an indirect table at `table` of `len` bytes.
fn post_indirect(h: &mut Hostile, q: usize, table: u64, len: u32, comp: u64) -> Sub {
    h.write(comp, &[FILL; 64]);
    let ix = h.alloc_descs(q, 1);
    h.write_desc(q, ix[0], desc(table, len, F_INDIRECT, 0));
    h.publish(q, ix, vec![(comp, 64)], 0)
}

/// Indirect tables (VIRTIO_RING_F_INDIRECT_DESC negotiated): a good one works; broken ones
/// (length 0, not a multiple of 16, outside memory, wrapping, nested, looping, `next` out of
/// range) → used length 0; entries outside memory → FAULT; too many data descriptors →
/// BAD_CHAIN.
#[test]
fn indirect_tables_malformed() {
    bounded("indirect_tables_malformed", || {
        let mut w = World::new();
        let mut h = w.hostile();
        assert_ne!(
            h.acked.unwrap() & bit(VIRTIO_RING_F_INDIRECT_DESC),
            0,
            "INDIRECT_DESC negotiated"
        );
        let me = h.open_ep();
        let b = w.pair.b.ep.name();
        let hd = h.send_hdr(me.ep, b, 0x41);
        let ha = h.header_at(&hd);
        let pl = h.alloc(64);
        h.write(pl, b"through an indirect table");
        let comp = h.alloc(64);
        let good = [
            desc(ha, 96, F_NEXT, 1),
            desc(pl, 25, F_NEXT, 2),
            desc(comp, 64, F_WRITE, 0),
        ];

        // Positive control: a good table is executed and B gets the bytes.
        let t = put_table(&mut h, &good);
        let s = post_indirect(&mut h, TX, t, 48, comp);
        h.expect_ok(&s, 64, "good indirect table");
        w.pair.b.ep.recv_buf(&w.pair.b.rbuf, 0..64, 0xBB).unwrap();
        let e = next_ok(&w.pair.b.rx, "B receives through the indirect table");
        assert_eq!((e.len, e.src), (25, Some(me)));
        assert_eq!(
            // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
            &unsafe { w.pair.b.rbuf.as_slice() }[..25],
            b"through an indirect table"
        );

        let cases: Vec<(&str, u64, u32)> = vec![
            ("table of length 0", t, 0),
            ("table length 40 (not a multiple of 16)", t, 40),
            ("table outside memory", h.end() + 0x1000, 48),
            ("table straddling the end", h.end() - 16, 48),
            ("table address wraps", u64::MAX - 15, 48),
        ];
        for (what, addr, len) in cases {
            let s = post_indirect(&mut h, TX, addr, len, comp);
            h.expect_unusable(&s, what);
        }
        // Nested: an entry of the table is itself indirect.
        let inner = put_table(&mut h, &good);
        let outer = put_table(
            &mut h,
            &[desc(ha, 96, F_NEXT, 1), desc(inner, 48, F_INDIRECT, 0)],
        );
        let s = post_indirect(&mut h, TX, outer, 32, comp);
        h.expect_unusable(&s, "nested indirect table");
        // A loop inside the table, and a `next` beyond the table.
        let looped = put_table(
            &mut h,
            &[
                desc(ha, 96, F_NEXT, 1),
                desc(pl, 25, F_NEXT, 2),
                desc(comp, 64, F_WRITE | F_NEXT, 1),
            ],
        );
        let s = post_indirect(&mut h, TX, looped, 48, comp);
        h.expect_unusable(&s, "loop inside the indirect table");
        let beyond = put_table(
            &mut h,
            &[desc(ha, 96, F_NEXT, 1), desc(comp, 64, F_WRITE | F_NEXT, 2)],
        );
        let s = post_indirect(&mut h, TX, beyond, 32, comp);
        h.expect_unusable(&s, "next beyond the indirect table");
        // A direct header, then a broken indirect descriptor chained after it.
        let t2 = put_table(&mut h, &good[1..]);
        h.write(comp, &[FILL; 64]);
        let ix = h.alloc_descs(TX, 2);
        h.write_desc(TX, ix[0], desc(ha, 96, F_NEXT, ix[1]));
        h.write_desc(TX, ix[1], desc(t2, 40, F_INDIRECT, 0));
        let s = h.publish(TX, ix, vec![(comp, 64)], 0);
        h.expect_unusable(&s, "indirect table of length 40 after a direct header");

        // An entry outside guest memory: FAULT.
        let end = h.end();
        let bad = put_table(
            &mut h,
            &[
                desc(ha, 96, F_NEXT, 1),
                desc(end, 25, F_NEXT, 2),
                desc(comp, 64, F_WRITE, 0),
            ],
        );
        let s = post_indirect(&mut h, TX, bad, 48, comp);
        h.expect_status(&s, Status::Fault, 0, "indirect entry outside memory");
        // Each table entry counts as a descriptor: max_sge + 1 payload entries → BAD_CHAIN.
        let mut many = vec![desc(ha, 96, F_NEXT, 1)];
        for i in 0..=MAX_SGE as u16 {
            many.push(desc(pl, 2, F_NEXT, i + 2));
        }
        many.push(desc(comp, 64, F_WRITE, 0));
        let n = many.len() as u32;
        let tm = put_table(&mut h, &many);
        let s = post_indirect(&mut h, TX, tm, 16 * n, comp);
        h.expect_status(&s, Status::BadChain, 0, "max_sge + 1 entries in the table");

        w.expect_hostile_connected();
        // B got nothing else (the service check would see a stray message).
        w.check_service();
        w.hostile_works(&mut h);
    });
}

/// An indirect descriptor from a driver that did NOT negotiate VIRTIO_RING_F_INDIRECT_DESC
/// (virtio 1.x §2.7.5.3.1: the driver MUST NOT set VIRTQ_DESC_F_INDIRECT then): the device must
/// not execute the request (used length 0 or BAD_CHAIN), nothing may reach B.
#[test]
fn indirect_descriptor_when_not_negotiated() {
    bounded("indirect_descriptor_when_not_negotiated", || {
        let mut w = World::new();
        let offered = {
            let h = Hostile::connect(&w.hostile_path());
            h.fe.get_features().unwrap()
        };
        w.rig.wait_disconnects(HOSTILE, 1);
        let acked = offered & !bit(VIRTIO_RING_F_INDIRECT_DESC);
        let mut h = Hostile::with_features(&w.hostile_path(), Features::Exactly(acked));
        let me = h.open_ep();
        let b = w.pair.b.ep.name();
        let hd = h.send_hdr(me.ep, b, 0x41);
        let ha = h.header_at(&hd);
        let pl = h.alloc(64);
        h.write(pl, b"smuggled through an indirect table");
        let comp = h.alloc(64);
        let t = put_table(
            &mut h,
            &[
                desc(ha, 96, F_NEXT, 1),
                desc(pl, 34, F_NEXT, 2),
                desc(comp, 64, F_WRITE, 0),
            ],
        );
        let s = post_indirect(&mut h, TX, t, 48, comp);
        let len = h.wait(&s, "indirect table not negotiated");
        if len != 0 {
            let c = h.completion(&s);
            assert!(
                matches!(status_of(&c), Ok(Status::BadChain | Status::Unsupported)),
                "indirect descriptor without INDIRECT_DESC negotiated was executed: {c:?}"
            );
        }
        // B must not have received it (the service check would see a stray message).
        w.check_service();
    });
}

/// A chain of more descriptors than the queue size, built with an indirect table: an indirect
/// walk is bounded by the table's own length, and its entries are data descriptors, so §6.14
/// check 5 (more than `max_sge` data descriptors) rejects it with BAD_CHAIN.
#[test]
fn indirect_chain_longer_than_the_queue() {
    bounded("indirect_chain_longer_than_the_queue", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let hd = h.send_hdr(me.ep, w.pair.b.ep.name(), 0x43);
        let ha = h.header_at(&hd);
        let pl = h.alloc(64);
        let comp = h.alloc(64);
        let n = QSIZE as usize + 36;
        let mut entries = vec![desc(ha, 96, F_NEXT, 1)];
        for i in 1..n - 1 {
            entries.push(desc(pl, 1, F_NEXT, i as u16 + 1));
        }
        entries.push(desc(comp, 64, F_WRITE, 0));
        let t = put_table(&mut h, &entries);
        let s = post_indirect(&mut h, TX, t, 16 * n as u32, comp);
        h.expect_status(
            &s,
            Status::BadChain,
            0,
            "indirect chain of queue size + 36 descriptors",
        );
        w.check_service();
    });
}

/// A writable descriptor before a readable one → BAD_CHAIN.
#[test]
fn writable_descriptor_before_readable() {
    bounded("writable_descriptor_before_readable", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let b = w.pair.b.ep.name();

        let mut hd = h.hdr(Opcode::EpOpen, 0);
        hd.data = ep_open::TYPE_RDM.into();
        let ha = h.header_at(&hd);
        let comp = h.alloc(64);
        let s = h.post(CTRL, &[wr(comp, 64), rd(ha, 96)]);
        h.expect_status(&s, Status::BadChain, 0, "completion before header");

        let hd = h.send_hdr(me.ep, b, 0x51);
        let ha = h.header_at(&hd);
        let p = h.alloc(100);
        let data = h.alloc(100);
        let comp = h.alloc(64);
        let s = h.post(TX, &[rd(ha, 96), wr(data, 100), rd(p, 100), wr(comp, 64)]);
        h.expect_status(
            &s,
            Status::BadChain,
            0,
            "payload after a writable descriptor",
        );

        // Header split around a writable descriptor.
        let ha = h.header_at(&hd);
        let comp = h.alloc(64);
        let s = h.post(
            TX,
            &[rd(ha, 48), wr(data, 16), rd(ha + 48, 48), wr(comp, 64)],
        );
        h.expect_status(
            &s,
            Status::BadChain,
            0,
            "header split by a writable descriptor",
        );

        // None of them opened an endpoint: the next one gets id 1.
        assert_eq!(h.open_ep().ep, me.ep + 1);
        w.expect_hostile_connected();
        w.check_service();
    });
}

/// Fewer than 96 readable bytes → BAD_CHAIN; a header split across descriptors is fine.
#[test]
fn header_shorter_than_96_bytes() {
    bounded("header_shorter_than_96_bytes", || {
        let mut w = World::new();
        let mut h = w.hostile();

        let mut hd = h.hdr(Opcode::EpOpen, 0);
        hd.data = ep_open::TYPE_RDM.into();
        for (what, segs) in [
            ("95-byte header", vec![(0u64, 95u32)]),
            ("48 + 47 bytes", vec![(0, 48), (48, 47)]),
            ("1-byte header", vec![(0, 1)]),
            ("zero readable bytes", vec![]),
            ("zero-length readable descriptor", vec![(0, 0)]),
        ] {
            let ha = h.header_at(&hd);
            let mut chain: Vec<Seg> = segs.iter().map(|&(o, l)| rd(ha + o, l)).collect();
            chain.push(wr(h.alloc(64), 64));
            let s = h.post(CTRL, &chain);
            h.expect_status(&s, Status::BadChain, 0, what);
        }
        // Positive control: 48 + 48 (the header may be split).
        let ha = h.header_at(&hd);
        let comp = h.alloc(64);
        let s = h.post(CTRL, &[rd(ha, 48), rd(ha + 48, 48), wr(comp, 64)]);
        let c = h.expect_ok(&s, 64, "header in two descriptors");
        assert_eq!(u64::from(c.cookie), u64::from(hd.cookie));
        assert_eq!(
            u64::from(c.data),
            0,
            "first endpoint: none of the short ones opened one"
        );

        let st = w.rig.stats(HOSTILE);
        assert_eq!(st.errors(Status::BadChain), 5, "{st:?}");
        w.expect_hostile_connected();
        w.check_service();
        w.hostile_works(&mut h);
    });
}

/// Fewer than 64 writable bytes: no room for a completion → used length 0, nothing written;
/// a completion split across descriptors is fine.
#[test]
fn no_room_for_a_completion() {
    bounded("no_room_for_a_completion", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();

        let mut hd = h.hdr(Opcode::EpOpen, 0);
        hd.data = ep_open::TYPE_RDM.into();
        for (what, q, ws) in [
            ("63 writable bytes", CTRL, vec![63u32]),
            ("no writable descriptor", CTRL, vec![]),
            ("32 + 31 writable bytes", CTRL, vec![32, 31]),
            ("zero-length writable descriptor", CTRL, vec![0]),
            ("receive with 63 writable bytes", RX, vec![63]),
        ] {
            let hdr = if q == RX { h.recv_hdr(me.ep, 7) } else { hd };
            let ha = h.header_at(&hdr);
            let mut chain = vec![rd(ha, 96)];
            for l in ws {
                chain.push(wr(h.alloc_filled(64), l));
            }
            let s = h.post(q, &chain);
            h.expect_unusable(&s, what);
        }
        // No endpoint was opened and no receive posted: the next EP_OPEN gets id 1, and a
        // message to the hostile endpoint waits for a real receive.
        assert_eq!(h.open_ep().ep, me.ep + 1);

        // Positive control: completion split 16 + 48 across two descriptors.
        let ha = h.header_at(&hd);
        let c1 = h.alloc(64);
        let c2 = h.alloc(64);
        let s = h.post(CTRL, &[rd(ha, 96), wr(c1, 16), wr(c2, 48)]);
        let c = h.expect_ok(&s, 64, "completion in two descriptors");
        assert_eq!(u64::from(c.cookie), u64::from(hd.cookie));

        let st = w.rig.stats(HOSTILE);
        assert_eq!(st.bad_chains, 5, "{st:?}");
        w.expect_hostile_connected();
        w.check_service();
        w.hostile_works(&mut h);
    });
}

/// Unknown opcodes → UNSUPPORTED (cookie echoed), on every kind of queue.
#[test]
fn unknown_opcodes() {
    bounded("unknown_opcodes", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let mut n = 0;
        for q in [CTRL, TX, RX, TX1, RX1] {
            for op in [
                0x0000u16, 0x000b, 0x00ff, 0x0103, 0x0180, 0x0185, 0x01ff, 0x7777, 0xffff,
            ] {
                let hd = h.raw_hdr(op, me.ep);
                let s = h.request(q, hd, &[], 0);
                h.expect_status(
                    &s,
                    Status::Unsupported,
                    hd.cookie.into(),
                    &format!("opcode {op:#06x} on queue {q}"),
                );
                n += 1;
            }
        }
        // (Defined opcodes of a feature not negotiated: `persistence_needs_rma_pmem`.)
        let st = w.rig.stats(HOSTILE);
        assert_eq!(st.errors(Status::Unsupported), n, "{st:?}");
        w.expect_hostile_connected();
        w.check_service();
        w.hostile_works(&mut h);
    });
}

/// FLUSH and COMMIT_COMPLETE from a driver that did not negotiate VIRTIO_FABRIC_F_RMA_PMEM:
/// UNSUPPORTED, before any other check.
#[test]
fn persistence_needs_rma_pmem() {
    bounded("persistence_needs_rma_pmem", || {
        let mut w = World::new();
        let offered = {
            let h = Hostile::connect(&w.hostile_path());
            h.fe.get_features().unwrap()
        };
        w.rig.wait_disconnects(HOSTILE, 1);
        assert_ne!(
            offered & bit(VIRTIO_FABRIC_F_RMA_PMEM),
            0,
            "RMA_PMEM offered"
        );
        let acked = offered & !bit(VIRTIO_FABRIC_F_RMA_PMEM);
        let mut h = Hostile::with_features(&w.hostile_path(), Features::Exactly(acked));
        let me = h.open_ep();
        let hd = h.hdr(Opcode::Flush, me.ep);
        let s = h.request(TX, hd, &[], 0);
        h.expect_status(&s, Status::Unsupported, hd.cookie.into(), "FLUSH");
        let mut hd = h.hdr(Opcode::RmaWrite, me.ep);
        hd.flags = flags::COMMIT_COMPLETE.into();
        let s = h.request(TX, hd, b"x", 0);
        h.expect_status(&s, Status::Unsupported, hd.cookie.into(), "COMMIT_COMPLETE");
        let hd = h.hdr(Opcode::CommitEvent, 0);
        let s = h.request(RX, hd, &[], 48 + 64 * 24);
        h.expect_status(&s, Status::Unsupported, hd.cookie.into(), "COMMIT_EVENT");
        let hd = h.hdr(Opcode::CommitReply, 0);
        let s = h.request(CTRL, hd, &[], 0);
        h.expect_status(&s, Status::Unsupported, hd.cookie.into(), "COMMIT_REPLY");
        let st = w.rig.stats(HOSTILE);
        assert!(st.connected && st.ring_errors == 0, "still served: {st:?}");
        assert_eq!(st.errors(Status::Unsupported), 4, "{st:?}");
        w.check_service();
    });
}

/// Malformed commit-handler requests (spec §6.17.3) fail alone: COMMIT_EVENT with a payload,
/// flags or an area too small for a record of `max_sge` ranges; COMMIT_REPLY with a payload or
/// a data area, or naming no event of this device (random, zero, all ones). The device goes on.
#[test]
fn malformed_commit_handler_requests() {
    bounded("malformed_commit_handler_requests", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let full = vfabric::proto::commit_event_area_len(MAX_SGE) as u32;
        /// Queue, header, payload, data area, expected status, what.
        type Case = (usize, ReqHeader, Vec<u8>, u32, Status, &'static str);
        let mut cases: Vec<Case> = Vec::new();
        let hd = h.hdr(Opcode::CommitEvent, 0);
        cases.push((
            RX,
            hd,
            b"payload".to_vec(),
            full,
            Status::Invalid,
            "event + payload",
        ));
        let mut hd = h.hdr(Opcode::CommitEvent, 0);
        hd.flags = flags::COMMIT_COMPLETE.into();
        cases.push((RX, hd, vec![], full, Status::Invalid, "event + flags"));
        let hd = h.hdr(Opcode::CommitEvent, 0);
        cases.push((
            RX,
            hd,
            vec![],
            full - 1,
            Status::BadChain,
            "event area short",
        ));
        let hd = h.hdr(Opcode::CommitEvent, 0);
        cases.push((RX, hd, vec![], 0, Status::BadChain, "event without area"));
        let hd = h.hdr(Opcode::CommitReply, 0);
        cases.push((
            CTRL,
            hd,
            b"x".to_vec(),
            0,
            Status::Invalid,
            "reply + payload",
        ));
        let hd = h.hdr(Opcode::CommitReply, 0);
        cases.push((CTRL, hd, vec![], 64, Status::BadChain, "reply + area"));
        for id in [0u64, 1, 0x1234_5678_9abc_def0, u64::MAX] {
            let mut hd = h.hdr(Opcode::CommitReply, 0);
            hd.data = id.into();
            hd.tag = 5u64.into();
            cases.push((CTRL, hd, vec![], 0, Status::Invalid, "reply for no event"));
        }
        for (q, hd, payload, cap, want, what) in cases {
            let s = h.request(q, hd, &payload, cap);
            h.expect_status(&s, want, hd.cookie.into(), what);
        }
        let st = w.rig.stats(HOSTILE);
        assert!(st.connected && st.ring_errors == 0, "still served: {st:?}");
        w.check_service();
        w.hostile_works(&mut h);
    });
}

/// Defined opcodes on the wrong kind of queue → UNSUPPORTED, and no side effect.
#[test]
fn opcode_on_the_wrong_queue() {
    bounded("opcode_on_the_wrong_queue", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let b = w.pair.b.ep.name();
        let cases = [
            (CTRL, Opcode::Send),
            (CTRL, Opcode::TSend),
            (CTRL, Opcode::Recv),
            (CTRL, Opcode::TRecv),
            (TX, Opcode::Recv),
            (TX, Opcode::TRecv),
            (TX, Opcode::EpOpen),
            (TX, Opcode::QueryCaps),
            (TX, Opcode::EpClose),
            (RX, Opcode::Send),
            (RX, Opcode::TSend),
            (RX, Opcode::EpOpen),
            (RX, Opcode::Cancel),
            (TX1, Opcode::AddrCheck),
            (RX1, Opcode::Send),
        ];
        for (q, op) in cases {
            let mut hd = h.hdr(op, me.ep);
            hd.peer = b.to_wire();
            let payload: &[u8] = if matches!(op, Opcode::Send | Opcode::TSend) {
                b"wrong queue"
            } else {
                &[]
            };
            let cap = if matches!(op, Opcode::Recv | Opcode::TRecv | Opcode::QueryCaps) {
                4096
            } else {
                0
            };
            let s = h.request(q, hd, payload, cap);
            h.expect_status(
                &s,
                Status::Unsupported,
                hd.cookie.into(),
                &format!("{op:?} on queue {q}"),
            );
        }
        // The EP_CLOSE on the TX queue did not close the endpoint, the EP_OPENs opened none.
        assert_eq!(h.open_ep().ep, me.ep + 1);
        w.expect_hostile_connected();
        // The SENDs on wrong queues delivered nothing to B (the service check would see it).
        w.check_service();
        w.hostile_works(&mut h);
    });
}

/// Unknown flags, reserved fields, bad flag combinations and opcode parameters → INVALID;
/// flags the device does not implement (FENCE, MULTI_RECV) → UNSUPPORTED. None of the rejected
/// requests has an effect.
#[test]
fn unknown_flags_reserved_fields_and_bad_parameters() {
    bounded("unknown_flags_reserved_fields", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let b = w.pair.b.ep.name();

        struct Case {
            what: &'static str,
            q: usize,
            op: Opcode,
            flags: u64,
            reserved0: u16,
            reserved1: u16,
            data: u64,
            payload: usize,
            want: Status,
        }
        let c = |what, q, op, flags, want| Case {
            what,
            q,
            op,
            flags,
            reserved0: 0,
            reserved1: 0,
            data: 0,
            payload: if matches!(op, Opcode::Send | Opcode::TSend) {
                16
            } else {
                0
            },
            want,
        };
        use Opcode::*;
        use Status::{Invalid, Unsupported};
        let mut cases = vec![
            c("flag bit 13", TX, Send, 1 << 13, Invalid),
            c("flag bit 63", TX, Send, 1 << 63, Invalid),
            c("all flag bits", TX, Send, u64::MAX, Invalid),
            c("unknown flag on RECV", RX, Recv, 1 << 20, Invalid),
            c("unknown flag on EP_OPEN", CTRL, EpOpen, 1 << 40, Invalid),
            c(
                "two completion levels",
                TX,
                Send,
                flags::TRANSMIT_COMPLETE | flags::DELIVERY_COMPLETE,
                Invalid,
            ),
            c("PEEK on SEND", TX, Send, flags::PEEK, Invalid),
            c("CLAIM on RECV", RX, Recv, flags::CLAIM, Invalid),
            c("DISCARD without CLAIM", RX, TRecv, flags::DISCARD, Invalid),
            c("INJECT on EP_OPEN", CTRL, EpOpen, flags::INJECT, Invalid),
            c("DIRECTED on SEND", TX, Send, flags::DIRECTED, Invalid),
            c(
                "COMMIT_COMPLETE on SEND",
                TX,
                Send,
                flags::COMMIT_COMPLETE,
                Invalid,
            ),
            c(
                "COMMIT_COMPLETE on RMA_WRITE (no such PMEM region)",
                TX,
                RmaWrite,
                flags::COMMIT_COMPLETE,
                Status::Access,
            ),
            c(
                "MULTI_RECV (not implemented)",
                RX,
                Recv,
                flags::MULTI_RECV,
                Unsupported,
            ),
        ];
        let mut r0 = c("reserved0 on SEND", TX, Send, 0, Invalid);
        r0.reserved0 = 1;
        let mut r1 = c("reserved1 on SEND", TX, Send, 0, Invalid);
        r1.reserved1 = 0x8000;
        let mut r2 = c("reserved0 on EP_OPEN", CTRL, EpOpen, 0, Invalid);
        r2.reserved0 = 0xffff;
        let mut r3 = c("reserved1 on RECV", RX, Recv, 0, Invalid);
        r3.reserved1 = 1;
        let mut t = c("EP_OPEN of an unknown type", CTRL, EpOpen, 0, Invalid);
        t.data = 3;
        let mut t2 = c("EP_OPEN of type u64::MAX", CTRL, EpOpen, 0, Invalid);
        t2.data = u64::MAX;
        let mut p = c("payload on EP_OPEN", CTRL, EpOpen, 0, Invalid);
        p.payload = 8;
        let mut p2 = c("payload on RECV", RX, Recv, 0, Invalid);
        p2.payload = 8;
        let mut p3 = c("payload on ADDR_CHECK", CTRL, AddrCheck, 0, Invalid);
        p3.payload = 1;
        let mut inj = c("INJECT above inject_size", TX, Send, flags::INJECT, Invalid);
        inj.payload = INJECT_SIZE as usize + 1;
        cases.extend([r0, r1, r2, r3, t, t2, p, p2, p3, inj]);

        for case in &cases {
            let mut hd = h.hdr(case.op, me.ep);
            hd.flags = case.flags.into();
            hd.reserved0 = case.reserved0.into();
            hd.reserved1 = case.reserved1.into();
            hd.peer = b.to_wire();
            hd.data = case.data.into();
            let cap = if matches!(case.op, Recv | TRecv) {
                4096
            } else {
                0
            };
            let payload = pattern(case.payload, 3);
            let s = h.request(case.q, hd, &payload, cap);
            h.expect_status(&s, case.want, hd.cookie.into(), case.what);
        }
        // Side effects: no endpoint opened, no receive posted, nothing sent to B.
        assert_eq!(
            h.open_ep().ep,
            me.ep + 1,
            "a rejected EP_OPEN opened an endpoint"
        );
        let to_h = w.pair.a.av.insert(me).unwrap();
        w.pair.a.ep.send(&pattern(64, 4), to_h, 0xA3).unwrap();
        next_ok(&w.pair.a.tx, "A -> hostile");
        let r = h.request(RX, h.recv_hdr(me.ep, 0x61), &[], 128);
        let c = h.expect_ok(&r, 128, "first valid receive gets A's message");
        assert_eq!(FabricAddr::from_wire(&c.src), w.pair.a.ep.name());
        assert_eq!(h.read(r.data, 64), pattern(64, 4));

        // INJECT within inject_size is fine (positive control of the INJECT case).
        let mut hd = h.send_hdr(me.ep, b, 0x62);
        hd.flags = flags::INJECT.into();
        let s = h.request(TX, hd, &pattern(INJECT_SIZE as usize, 8), 0);
        h.expect_ok(&s, 64, "INJECT of inject_size bytes");
        w.pair.b.ep.recv_buf(&w.pair.b.rbuf, 0..4096, 0xB3).unwrap();
        let e = next_ok(&w.pair.b.rx, "B receives the injected message");
        assert_eq!((e.len, e.src), (INJECT_SIZE as usize, Some(me)));

        w.expect_hostile_connected();
        w.check_service();
    });
}

/// Endpoint ids that are not open on the hostile device: never opened, closed, another guest's.
#[test]
fn bad_endpoint_ids() {
    bounded("bad_endpoint_ids", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let b = w.pair.b.ep.name();
        // A has endpoints 0, 1 and 2; the hostile guest only 0.
        let a1 = w.pair.a.extra_endpoint();
        let a2 = w.pair.a.extra_endpoint();
        assert_eq!(a2.id(), 2);
        assert_eq!(me.ep, 0);

        // A posts a receive on its endpoint 2 (context 4242).
        a2.recv_buf(&w.pair.a.rbuf, 0..4096, 4242).unwrap();
        // A control-queue round trip of A (its device drains every queue after a kick).
        assert!(w.pair.a.domain.addr_check(&a2.name()).unwrap());

        fn expect(h: &mut Hostile, q: usize, hd: ReqHeader, payload: &[u8], what: &str) {
            let cap = if q == RX { 4096 } else { 0 };
            let s = h.request(q, hd, payload, cap);
            h.expect_status(&s, Status::BadEndpoint, hd.cookie.into(), what);
        }
        for ep in [2u32, 5, 63, 64, 1000, u32::MAX] {
            let hd = h.send_hdr(ep, b, 0x71);
            expect(&mut h, TX, hd, b"spoofed", &format!("SEND from ep {ep}"));
            let mut hd = h.hdr(Opcode::TSend, ep);
            hd.peer = b.to_wire();
            expect(&mut h, TX, hd, b"spoofed", &format!("TSEND from ep {ep}"));
            let hd = h.recv_hdr(ep, 0x72);
            expect(&mut h, RX, hd, &[], &format!("RECV on ep {ep}"));
            let hd = h.hdr(Opcode::TRecv, ep);
            expect(&mut h, RX, hd, &[], &format!("TRECV on ep {ep}"));
            let mut hd = h.hdr(Opcode::Cancel, ep);
            hd.data = 4242.into();
            expect(&mut h, CTRL, hd, &[], &format!("CANCEL on ep {ep}"));
            let hd = h.hdr(Opcode::EpClose, ep);
            expect(&mut h, CTRL, hd, &[], &format!("EP_CLOSE of ep {ep}"));
        }

        // A closed endpoint: its posted receive is cancelled, then every use is BAD_ENDPOINT.
        let e1 = h.open_ep();
        let r = h.request(RX, h.recv_hdr(e1.ep, 0x73), &[], 4096);
        h.fence_rx(RX, e1.ep);
        assert_eq!(h.close_ep(e1.ep), Status::Ok);
        h.expect_status(&r, Status::Canceled, 0x73, "receive of the closed endpoint");
        let hd = h.send_hdr(e1.ep, b, 0x74);
        expect(&mut h, TX, hd, b"closed", "SEND from a closed endpoint");
        let hd = h.recv_hdr(e1.ep, 0x75);
        expect(&mut h, RX, hd, &[], "RECV on a closed endpoint");
        let hd = h.hdr(Opcode::EpClose, e1.ep);
        expect(&mut h, CTRL, hd, &[], "second EP_CLOSE");
        let mut hd = h.hdr(Opcode::Cancel, e1.ep);
        hd.data = 0x73.into();
        expect(&mut h, CTRL, hd, &[], "CANCEL on a closed endpoint");
        // Its old address is gone for the others.
        let to_e1 = w.pair.a.av.insert(e1).unwrap();
        w.pair
            .a
            .ep
            .send(b"to a closed endpoint", to_e1, 0xA4)
            .unwrap();
        let e = next_err(&w.pair.a.tx, "A sends to a closed hostile endpoint");
        assert_eq!(e.status, Status::AddrNotAvail);

        // A's endpoints survived: its receive on endpoint 2 is still posted and gets B's
        // message, endpoint 1 still receives.
        let to_a2 = w.pair.b.av.insert(a2.name()).unwrap();
        let to_a1 = w.pair.b.av.insert(a1.name()).unwrap();
        let msg = pattern(500, 77);
        w.pair.b.ep.send(&msg, to_a2, 0xB4).unwrap();
        next_ok(&w.pair.b.tx, "B -> A ep 2");
        let e = next_ok(&w.pair.a.rx, "A's endpoint 2 receive");
        assert_eq!((e.context, e.len, e.src), (4242, 500, Some(b)));
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        assert_eq!(&unsafe { w.pair.a.rbuf.as_slice() }[..500], &msg[..]);
        a1.recv_buf(&w.pair.a.rbuf, 0..4096, 4343).unwrap();
        w.pair.b.ep.send(&msg, to_a1, 0xB5).unwrap();
        next_ok(&w.pair.b.tx, "B -> A ep 1");
        let e = next_ok(&w.pair.a.rx, "A's endpoint 1 receive");
        assert_eq!((e.context, e.src), (4343, Some(b)));

        w.expect_hostile_connected();
        drop((a1, a2));
        w.check_service();
        w.hostile_works(&mut h);
    });
}

/// Sends to addresses that name no endpoint → ADDR_NOT_AVAIL (eager and rendezvous sizes);
/// ADDR_CHECK agrees.
#[test]
fn send_to_an_address_that_names_no_endpoint() {
    bounded("send_to_an_address_that_names_no_endpoint", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let a = w.pair.a.ep.name();
        let closed = {
            let e = w.pair.b.extra_endpoint();
            e.name()
        };
        let targets = [
            ("unspecified address", FabricAddr::default()),
            ("endpoint id never opened", FabricAddr::new(a.node, 60, 1)),
            (
                "endpoint id above max_endpoints",
                FabricAddr::new(a.node, 1 << 20, 1),
            ),
            (
                "stale generation",
                FabricAddr::new(a.node, a.ep, a.generation + 1),
            ),
            ("generation 0", FabricAddr::new(a.node, a.ep, 0)),
            ("closed endpoint", closed),
            (
                "no such device",
                FabricAddr::new(FabricAddr::node_of(FABRIC, 1, 3), 0, 1),
            ),
            (
                "device u16::MAX",
                FabricAddr::new(FabricAddr::node_of(FABRIC, 1, u16::MAX), 0, 1),
            ),
            (
                "other host",
                FabricAddr::new(FabricAddr::node_of(FABRIC, 2, 0), a.ep, a.generation),
            ),
            (
                // The very endpoint, as another fabric would number it: never delivered.
                "other fabric, same host, device and endpoint",
                FabricAddr::new(
                    FabricAddr::node_of(FABRIC ^ 0x1000, a.host(), a.device()),
                    a.ep,
                    a.generation,
                ),
            ),
            (
                "node u64::MAX",
                FabricAddr::new(u64::MAX, a.ep, a.generation),
            ),
            ("own device, unopened id", FabricAddr::new(me.node, 9, 1)),
        ];
        for (what, peer) in targets {
            for size in [16usize, EAGER as usize + 100] {
                let hd = h.send_hdr(me.ep, peer, 0x81);
                let s = h.request(TX, hd, &pattern(size, 1), 0);
                h.expect_status(&s, Status::AddrNotAvail, 0x81, &format!("SEND to {what}"));
            }
            let mut hd = h.hdr(Opcode::TSend, me.ep);
            hd.peer = peer.to_wire();
            let s = h.request(TX, hd, b"x", 0);
            h.expect_status(
                &s,
                Status::AddrNotAvail,
                hd.cookie.into(),
                &format!("TSEND {what}"),
            );
            let mut hd = h.hdr(Opcode::AddrCheck, 0);
            hd.peer = peer.to_wire();
            let s = h.request(CTRL, hd, &[], 0);
            h.expect_status(
                &s,
                Status::AddrNotAvail,
                hd.cookie.into(),
                &format!("check {what}"),
            );
        }
        // Positive control: A's address checks out.
        let mut hd = h.hdr(Opcode::AddrCheck, 0);
        hd.peer = a.to_wire();
        let s = h.request(CTRL, hd, &[], 0);
        h.expect_ok(&s, 64, "ADDR_CHECK of A");

        w.expect_hostile_connected();
        w.check_service();
        w.hostile_works(&mut h);
    });
}

/// Messages larger than `max_msg_size` → TOO_LARGE; exactly `max_msg_size` goes through.
#[test]
fn message_larger_than_max_msg_size() {
    bounded("message_larger_than_max_msg_size", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let b = w.pair.b.ep.name();
        let big = h.alloc(MAX_MSG + 4096);
        let msg = pattern(MAX_MSG as usize, 0xB16);
        h.write(big, &msg);

        let hd = h.send_hdr(me.ep, b, 0x91);
        let ha = h.header_at(&hd);
        let comp = h.alloc(64);
        let s = h.post(TX, &[rd(ha, 96), rd(big, MAX_MSG as u32 + 1), wr(comp, 64)]);
        h.expect_status(
            &s,
            Status::TooLarge,
            0x91,
            "max_msg_size + 1 in one descriptor",
        );

        // Split over descriptors that alias the same bytes.
        let half = (MAX_MSG / 2) as u32 + 1;
        let ha = h.header_at(&hd);
        let comp = h.alloc(64);
        let s = h.post(
            TX,
            &[rd(ha, 96), rd(big, half), rd(big, half), wr(comp, 64)],
        );
        h.expect_status(
            &s,
            Status::TooLarge,
            0x91,
            "max_msg_size + 2 in two descriptors",
        );

        let mut hd = h.hdr(Opcode::TSend, me.ep);
        hd.peer = b.to_wire();
        let ha = h.header_at(&hd);
        let comp = h.alloc(64);
        let s = h.post(TX, &[rd(ha, 96), rd(big, 3 * MAX_MSG as u32), wr(comp, 64)]);
        h.expect_status(&s, Status::TooLarge, hd.cookie.into(), "TSEND of 3 MiB");

        // Exactly max_msg_size: a rendezvous to B, delivered intact.
        let hd = h.send_hdr(me.ep, b, 0x92);
        let ha = h.header_at(&hd);
        let comp = h.alloc(64);
        let s = h.post(TX, &[rd(ha, 96), rd(big, MAX_MSG as u32), wr(comp, 64)]);
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        unsafe { w.pair.b.rbuf.as_mut_slice() }.fill(0);
        w.pair
            .b
            .ep
            .recv_buf(&w.pair.b.rbuf, 0..PEER_BUF, 0xB6)
            .unwrap();
        let e = next_ok(&w.pair.b.rx, "B receives max_msg_size bytes");
        assert_eq!((e.len, e.src), (MAX_MSG as usize, Some(me)));
        assert_eq!(
            // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
            checksum(&unsafe { w.pair.b.rbuf.as_slice() }[..MAX_MSG as usize]),
            checksum(&msg)
        );
        let c = h.expect_ok(&s, 64, "send of max_msg_size");
        assert_eq!(u64::from(c.len), MAX_MSG);

        w.expect_hostile_connected();
        w.check_service();
    });
}

/// §6.14: checks are made in order and the first failing one decides. Combinations whose
/// order the device gets right.
#[test]
fn error_precedence() {
    bounded("error_precedence", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let b = w.pair.b.ep.name();

        // 3 before 4: completion outside memory AND payload outside memory → used length 0.
        let hd = h.send_hdr(me.ep, b, 1);
        let ha = h.header_at(&hd);
        let s = h.post(TX, &[rd(ha, 96), rd(h.end(), 64), wr(h.end(), 64)]);
        h.expect_unusable(&s, "completion and payload outside");
        // 4 before 5: payload outside AND writable before readable → FAULT.
        let ha = h.header_at(&hd);
        let data = h.alloc(64);
        let comp = h.alloc(64);
        let s = h.post(
            TX,
            &[rd(ha, 96), wr(data, 64), rd(h.end(), 64), wr(comp, 64)],
        );
        h.expect_status(&s, Status::Fault, 0, "fault before bad chain");
        // 5 before 6: short header with an unknown opcode → BAD_CHAIN.
        let hd2 = h.raw_hdr(0x7777, me.ep);
        let ha = h.header_at(&hd2);
        let comp = h.alloc(64);
        let s = h.post(TX, &[rd(ha, 90), wr(comp, 64)]);
        h.expect_status(&s, Status::BadChain, 0, "short header before opcode");
        // 6 before 7/8: unknown opcode with reserved fields and unknown flags → UNSUPPORTED.
        let mut hd3 = h.raw_hdr(0x7777, me.ep);
        hd3.reserved0 = 1.into();
        hd3.flags = (1u64 << 50).into();
        let s = h.request(TX, hd3, &[], 0);
        h.expect_status(&s, Status::Unsupported, hd3.cookie.into(), "opcode first");
        // 6: wrong queue before reserved fields.
        let mut hd4 = h.send_hdr(me.ep, b, 5);
        hd4.reserved1 = 1.into();
        let s = h.request(RX, hd4, &[], 64);
        h.expect_status(&s, Status::Unsupported, 5, "wrong queue before reserved");
        // 7 before 11: reserved field with a bad endpoint → INVALID.
        let mut hd5 = h.send_hdr(77, b, 6);
        hd5.reserved0 = 2.into();
        let s = h.request(TX, hd5, b"x", 0);
        h.expect_status(&s, Status::Invalid, 6, "reserved before endpoint");
        // 10 before 11: a flag the device does not implement (MULTI_RECV) with a bad
        // endpoint → UNSUPPORTED.
        let mut hd6 = h.send_hdr(77, b, 7);
        hd6.opcode = (Opcode::Recv as u16).into();
        hd6.flags = flags::MULTI_RECV.into();
        let s = h.request(RX, hd6, &[], 64);
        h.expect_status(
            &s,
            Status::Unsupported,
            7,
            "unsupported flag before endpoint",
        );
        // 11 before 14: bad endpoint and bad destination → BAD_ENDPOINT.
        let hd7 = h.send_hdr(77, FabricAddr::default(), 8);
        let s = h.request(TX, hd7, b"x", 0);
        h.expect_status(&s, Status::BadEndpoint, 8, "endpoint before address");
        // 13 before 14: too large and bad destination → TOO_LARGE.
        let big = h.alloc(MAX_MSG + 1);
        let hd8 = h.send_hdr(me.ep, FabricAddr::default(), 9);
        let ha = h.header_at(&hd8);
        let comp = h.alloc(64);
        let s = h.post(TX, &[rd(ha, 96), rd(big, MAX_MSG as u32 + 1), wr(comp, 64)]);
        h.expect_status(&s, Status::TooLarge, 9, "size before address");

        w.expect_hostile_connected();
        w.check_service();
    });
}

/// §6.14 precedence: TOO_LARGE (check 11, found when the chain is parsed) comes before the
/// opcode-specific INVALID (check 12: an INJECT payload above `inject_size`), which comes before
/// BAD_ENDPOINT (check 13).
#[test]
fn error_precedence_size_then_parameters_then_endpoint() {
    bounded(
        "error_precedence_size_then_parameters_then_endpoint",
        || {
            let mut w = World::new();
            let mut h = w.hostile();
            let me = h.open_ep();
            let b = w.pair.b.ep.name();
            let big = h.alloc(MAX_MSG + 1);

            let hd = h.send_hdr(77, b, 1);
            let ha = h.header_at(&hd);
            let comp = h.alloc(64);
            let s = h.post(TX, &[rd(ha, 96), rd(big, MAX_MSG as u32 + 1), wr(comp, 64)]);
            h.expect_status(&s, Status::TooLarge, 1, "bad endpoint and too large");

            let mut hd = h.send_hdr(me.ep, b, 2);
            hd.flags = flags::INJECT.into();
            let ha = h.header_at(&hd);
            let comp = h.alloc(64);
            let s = h.post(TX, &[rd(ha, 96), rd(big, MAX_MSG as u32 + 1), wr(comp, 64)]);
            h.expect_status(
                &s,
                Status::TooLarge,
                2,
                "INJECT above inject_size and too large",
            );

            let mut hd = h.send_hdr(77, b, 3);
            hd.flags = flags::INJECT.into();
            let ha = h.header_at(&hd);
            let comp = h.alloc(64);
            let s = h.post(TX, &[rd(ha, 96), rd(big, 4096), wr(comp, 64)]);
            h.expect_status(
                &s,
                Status::Invalid,
                3,
                "bad endpoint and INJECT above inject_size",
            );
            w.check_service();
        },
    );
}

/// A ring started without SET_FEATURES: the device processes nothing (or answers
/// UNSUPPORTED); SET_FEATURES(0) (no VERSION_1): every request → UNSUPPORTED.
#[test]
fn requests_before_feature_negotiation() {
    bounded("requests_before_feature_negotiation", || {
        let mut w = World::new();

        // 1. SET_FEATURES never sent. Rings are started (kick, call) but cannot be enabled.
        {
            let mut h = Hostile::connect(&w.hostile_path());
            h.negotiate(Features::Skip);
            h.share_memory();
            h.start_all_rings();
            for (q, op, cap) in [
                (CTRL, Opcode::EpOpen, 0),
                (CTRL, Opcode::QueryCaps, 4096),
                (TX, Opcode::Send, 0),
                (RX, Opcode::Recv, 4096),
            ] {
                let hd = h.hdr(op, 0);
                let s = h.request(q, hd, &[], cap);
                if let Some(len) = h.try_wait(&s, QUIET) {
                    let c = h.completion(&s);
                    assert_eq!(len, 64, "{op:?} before SET_FEATURES");
                    assert_eq!(
                        status_of(&c),
                        Ok(Status::Unsupported),
                        "{op:?} before SET_FEATURES: {c:?}"
                    );
                }
            }
            let st = w.rig.stats(HOSTILE);
            assert_eq!(st.messages_sent + st.messages_received, 0, "{st:?}");
        }
        w.rig.wait_disconnects(HOSTILE, 1);
        w.check_service();

        // 2. SET_FEATURES(0): rings start enabled (no PROTOCOL_FEATURES), nothing negotiated.
        {
            let mut h = Hostile::with_features(&w.hostile_path(), Features::Exactly(0));
            for (q, op, cap) in [
                (CTRL, Opcode::EpOpen, 0),
                (CTRL, Opcode::QueryCaps, 4096),
                (TX, Opcode::Send, 0),
                (RX, Opcode::Recv, 4096),
            ] {
                let mut hd = h.hdr(op, 0);
                hd.peer = w.pair.b.ep.name().to_wire();
                let payload: &[u8] = if op == Opcode::Send { b"hello" } else { &[] };
                let s = h.request(q, hd, payload, cap);
                h.expect_status(
                    &s,
                    Status::Unsupported,
                    hd.cookie.into(),
                    &format!("{op:?} with no feature negotiated"),
                );
            }
        }
        w.rig.wait_disconnects(HOSTILE, 2);
        w.check_service();
        w.hostile_reconnects(2);
    });
}

/// Feature sets without VERSION_1 or MSG → UNSUPPORTED for everything; opcodes and flags of
/// features not negotiated (TAGGED, REMOTE_CQ_DATA, MQ) → UNSUPPORTED although the same
/// requests succeed once the features are negotiated.
#[test]
fn requests_without_the_needed_features() {
    bounded("requests_without_the_needed_features", || {
        let mut w = World::new();
        let offered = {
            let h = Hostile::connect(&w.hostile_path());
            h.fe.get_features().unwrap()
        };
        w.rig.wait_disconnects(HOSTILE, 1);
        let b = w.pair.b.ep.name();
        let mut disconnects = 1;

        for (what, acked) in [
            ("no VERSION_1", offered & !bit(VIRTIO_F_VERSION_1)),
            ("no MSG", offered & !bit(VIRTIO_FABRIC_F_MSG)),
        ] {
            let mut h = Hostile::with_features(&w.hostile_path(), Features::Exactly(acked));
            for (q, op, cap) in [
                (CTRL, Opcode::EpOpen, 0),
                (CTRL, Opcode::QueryCaps, 4096),
                (TX, Opcode::Send, 0),
                (RX, Opcode::Recv, 4096),
            ] {
                let mut hd = h.hdr(op, 0);
                hd.peer = b.to_wire();
                let payload: &[u8] = if op == Opcode::Send { b"hello" } else { &[] };
                let s = h.request(q, hd, payload, cap);
                h.expect_status(
                    &s,
                    Status::Unsupported,
                    hd.cookie.into(),
                    &format!("{op:?} with {what}"),
                );
            }
            drop(h);
            disconnects += 1;
            w.rig.wait_disconnects(HOSTILE, disconnects);
            w.check_service();
        }

        // Without TAGGED, REMOTE_CQ_DATA and MQ. Each request is valid otherwise (open endpoint,
        // open destination), as the run with every feature shows.
        let limited = offered
            & !(bit(VIRTIO_FABRIC_F_TAGGED)
                | bit(VIRTIO_FABRIC_F_REMOTE_CQ_DATA)
                | bit(VIRTIO_FABRIC_F_MQ));
        for (feat, want) in [(limited, Status::Unsupported), (offered, Status::Ok)] {
            let mut h = Hostile::with_features(&w.hostile_path(), Features::Exactly(feat));
            let me = h.open_ep();
            let mut reqs = Vec::new();
            let mut hd = h.hdr(Opcode::TSend, me.ep);
            hd.peer = b.to_wire();
            hd.tag = 0x11.into();
            reqs.push(("TSEND", h.request(TX, hd, b"tagged", 0), hd.cookie));
            let mut hd = h.send_hdr(me.ep, b, 0x101);
            hd.flags = flags::REMOTE_CQ_DATA.into();
            hd.data = 0xDA7A.into();
            reqs.push((
                "SEND with REMOTE_CQ_DATA",
                h.request(TX, hd, b"data", 0),
                hd.cookie,
            ));
            let hd = h.send_hdr(me.ep, b, 0x102);
            reqs.push((
                "SEND on queue pair 1",
                h.request(TX1, hd, b"qp1", 0),
                hd.cookie,
            ));
            let mut hd = h.hdr(Opcode::TRecv, me.ep);
            hd.tag = 0x22.into();
            reqs.push(("TRECV", h.request(RX, hd, &[], 64), hd.cookie));
            for (what, s, cookie) in &reqs {
                if want == Status::Ok {
                    if *what == "TRECV" {
                        // Stays posted (nothing matches): no answer.
                        h.expect_no_answer(s, what);
                    } else {
                        h.expect_ok(s, 64, what);
                    }
                } else {
                    h.expect_status(
                        s,
                        want,
                        u64::from(*cookie),
                        &format!("{what} not negotiated"),
                    );
                }
            }
            if want == Status::Ok {
                // B takes the three messages (tagged one with a tagged receive).
                let bb = &w.pair.b;
                bb.ep.trecv_buf(&bb.rbuf, 0..64, 0x11, 0, 0xB7).unwrap();
                let e = next_ok(&bb.rx, "B TRECV");
                assert_eq!((e.tag, e.len), (0x11, 6));
                for ctx in [0xB8, 0xB9] {
                    bb.ep.recv_buf(&bb.rbuf, 0..64, ctx).unwrap();
                    let e = next_ok(&bb.rx, "B RECV");
                    assert_eq!(e.src, Some(me));
                }
            }
            drop(h);
            disconnects += 1;
            w.rig.wait_disconnects(HOSTILE, disconnects);
            w.check_service();
        }

        // SET_FEATURES with bits the device never offered: the session is refused.
        for extra in [bit(4), 1 << 50] {
            let h = Hostile::connect(&w.hostile_path());
            h.fe.set_owner().unwrap();
            let _ = h.fe.set_features(offered | extra);
            disconnects += 1;
            w.rig.wait_disconnects(HOSTILE, disconnects);
            assert!(
                h.fe.get_features().is_err(),
                "feature bits {extra:#x} accepted"
            );
        }
        let st = w.rig.stats(HOSTILE);
        assert_eq!(st.ring_errors, 0, "{st:?}");
        w.check_service();
        w.hostile_reconnects(disconnects);
    });
}

/// The available index jumps more than the queue size ahead → ring corruption: the hostile
/// guest alone is disconnected, and can come back.
#[test]
fn avail_index_jumps_more_than_queue_size() {
    bounded("avail_index_jumps_more_than_queue_size", || {
        let mut w = World::new();
        for (i, (q, jump)) in [(TX, QSIZE + 1), (CTRL, 3 * QSIZE), (RX, u16::MAX)]
            .into_iter()
            .enumerate()
        {
            let mut h = w.hostile();
            let me = h.open_ep();
            // Something in flight on another queue when the ring breaks.
            let r = h.request(RX1, h.recv_hdr(me.ep, 1), &[], 4096);
            let avail = h.rings[q].as_ref().unwrap().avail;
            h.put(avail + 2, jump);
            h.kick(q);
            let n = i as u64 + 1;
            w.expect_hostile_disconnected(&h, n, n);
            assert_eq!(h.try_wait(&r, Duration::ZERO), None);
            // A's message to the dead endpoint fails cleanly.
            let to_h = w.pair.a.av.insert(me).unwrap();
            w.pair.a.ep.send(b"anyone?", to_h, 0xA5).unwrap();
            let e = next_err(&w.pair.a.tx, "A sends to the disconnected guest");
            assert_eq!(e.status, Status::AddrNotAvail);
            w.check_service();
        }
        w.hostile_reconnects(3);
    });
}

/// A head index ≥ queue size in the available ring → ring corruption: disconnect.
#[test]
fn descriptor_head_index_out_of_range() {
    bounded("descriptor_head_index_out_of_range", || {
        let mut w = World::new();
        for (i, (q, head)) in [(TX, QSIZE), (CTRL, u16::MAX), (RX, QSIZE + 1)]
            .into_iter()
            .enumerate()
        {
            let mut h = w.hostile();
            h.open_ep();
            h.push_avail(q, head);
            let n = i as u64 + 1;
            w.expect_hostile_disconnected(&h, n, n);
            w.check_service();
        }
        w.hostile_reconnects(3);
    });
}

/// SET_VRING_ADDR with rings outside guest memory (refused: the session ends), partly outside
/// (the ring is corrupt on first use: the session ends), or misaligned.
#[test]
fn ring_addresses_outside_memory_in_set_vring_addr() {
    bounded("ring_addresses_outside_memory", || {
        let mut w = World::new();
        let mut disconnects = 0;
        let mut ring_errors = 0;
        // (what, builder of (desc, avail, used) from the standard layout and the memory end,
        //  refused by SET_VRING_ADDR itself?)
        type Layout = fn((u64, u64, u64), u64) -> (u64, u64, u64);
        let cases: [(&str, Layout, bool); 9] = [
            (
                "descriptor table outside",
                |(_, a, u), end| (end + 0x1000, a, u),
                true,
            ),
            (
                "avail ring outside",
                |(d, _, u), end| (d, end + 0x1000, u),
                true,
            ),
            (
                "used ring outside",
                |(d, a, _), end| (d, a, end + 0x1000),
                true,
            ),
            ("descriptor table at 0", |(_, a, u), _| (0, a, u), true),
            (
                "used ring at u64::MAX - 7",
                |(d, a, _), _| (d, a, u64::MAX - 7),
                true,
            ),
            (
                "descriptor table straddles the end",
                |(_, a, u), end| (end - 256, a, u),
                false,
            ),
            (
                "avail ring straddles the end",
                |(d, _, u), end| (d, end - 64, u),
                false,
            ),
            (
                "used ring straddles the end",
                |(d, a, _), end| (d, a, end - 256),
                false,
            ),
            (
                "misaligned descriptor table",
                |(d, a, u), _| (d + 8, a, u),
                true,
            ),
        ];
        for (what, layout, refused) in cases {
            let mut h = Hostile::connect(&w.hostile_path());
            h.negotiate(Features::All);
            h.share_memory();
            for q in 0..NQ {
                if q != TX {
                    let l = h.ring_layout(q);
                    h.start_ring_at(q, l);
                }
            }
            let me = h.open_ep();
            let addrs = layout(h.ring_layout(TX), h.end());
            let res = h.try_start_ring_at(TX, addrs);
            disconnects += 1;
            if refused {
                assert!(res.is_err(), "{what}: SET_VRING_ADDR accepted {addrs:x?}");
            } else {
                // The vhost-user layer takes it; the device must find the ring corrupt when it
                // uses it (it cannot be read or written without leaving guest memory). That may
                // already happen while the ring is being enabled (the poller re-arms
                // notifications of an active device, writing `avail_event` into the used ring),
                // in which case the session ends during SET_VRING_ENABLE.
                ring_errors += 1;
                if let Err(e) = res {
                    eprintln!("{what}: session ended while starting the ring: {e}");
                    w.rig.wait_disconnects(HOSTILE, disconnects);
                    let st = w.rig.stats(HOSTILE);
                    assert_eq!(st.ring_errors, ring_errors, "{what}: {st:?}");
                    w.check_service();
                    continue;
                }
                let hd = h.send_hdr(me.ep, w.pair.b.ep.name(), 1);
                // Raw publish without touching the out-of-memory parts ourselves.
                let ha = h.header_at(&hd);
                let comp = h.alloc(64);
                if h.inside(addrs.0, 16 * u64::from(QSIZE)) {
                    let ix = h.alloc_descs(TX, 2);
                    h.write_desc(TX, ix[0], desc(ha, 96, F_NEXT, ix[1]));
                    h.write_desc(TX, ix[1], desc(comp, 64, F_WRITE, 0));
                }
                if h.inside(addrs.1, 6) {
                    h.put(addrs.1 + 4, 0u16);
                    h.put(addrs.1 + 2, 1u16);
                }
                h.kick(TX);
            }
            w.rig.wait_disconnects(HOSTILE, disconnects);
            let st = w.rig.stats(HOSTILE);
            assert_eq!(st.ring_errors, ring_errors, "{what}: {st:?}");
            assert!(h.fe.get_features().is_err(), "{what}: socket still open");
            w.check_service();
        }
        w.hostile_reconnects(disconnects);
    });
}

/// A guest killed (socket closed, rings never stopped) with receives posted and a peer's
/// rendezvous send held for it: the peer's send completes PEER_GONE (driver CQ error entry),
/// later sends to its address ADDR_NOT_AVAIL, and the daemon keeps serving everyone.
#[test]
fn killed_guest_with_posted_receives_fails_held_send_with_peer_gone() {
    bounded("killed_guest_peer_gone", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        // Receives posted that do not match A's tagged send.
        let r1 = h.request(RX, h.recv_hdr(me.ep, 0xE1), &[], 65536);
        let mut hd = h.hdr(Opcode::TRecv, me.ep);
        hd.tag = 0x55.into();
        let r2 = h.request(RX, hd, &[], 65536);
        h.expect_no_answer(&r1, "posted receive");
        h.expect_no_answer(&r2, "posted tagged receive");

        // A's rendezvous send (256 KiB > eager threshold), tag 0x77: held at the device.
        let a = &mut w.pair.a;
        let to_h = a.av.insert(me).unwrap();
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        fill_pattern(&mut unsafe { a.sbuf.as_mut_slice() }[..256 << 10], 0x77);
        a.ep.tsend_buf(&a.sbuf, 0..256 << 10, to_h, 0x77, 0xDEAD)
            .unwrap();
        // Wait until the device holds it: PEEK for tag 0x77 finds a 256 KiB message.
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let mut hd = h.hdr(Opcode::TRecv, me.ep);
            hd.tag = 0x77.into();
            hd.flags = flags::PEEK.into();
            let cookie = u64::from(hd.cookie);
            let p = h.request(RX, hd, &[], 64);
            h.wait(&p, "PEEK");
            let c = h.completion(&p);
            if status_of(&c) == Ok(Status::Ok) {
                assert_eq!(u64::from(c.len), 256 << 10);
                assert_eq!(u64::from(c.cookie), cookie);
                assert_ne!(u32::from(c.flags) & comp_flags::CLAIMED, 0);
                break;
            }
            assert_eq!(status_of(&c), Ok(Status::NoMessage));
            assert!(
                Instant::now() < deadline,
                "A's send never reached the device"
            );
            let _ = a.tx.read(&mut Vec::new(), 1);
        }
        assert_quiet(&a.tx, Duration::from_millis(20), "held send must wait");

        // Kill the hostile guest: drop its frontend (socket closes; no GET_VRING_BASE).
        drop(h);
        let e = next_err(&w.pair.a.tx, "A's held send to the killed guest");
        assert_eq!(e.status, Status::PeerGone, "{e:?}");
        assert_eq!(e.context, 0xDEAD);
        w.rig.wait_disconnects(HOSTILE, 1);
        let a = &mut w.pair.a;
        a.ep.send(b"late", to_h, 0xDEAE).unwrap();
        let e = next_err(&a.tx, "send to the killed guest's address");
        assert_eq!(e.status, Status::AddrNotAvail);

        let st = w.rig.stats(HOSTILE);
        assert_eq!(st.ring_errors, 0, "{st:?}");
        w.check_service();
        w.hostile_reconnects(1);
    });
}

/// A hostile sender killed while its rendezvous send is held at a peer's endpoint: the send
/// is withdrawn (never delivered, no stale bytes), the peer's later receive gets the next
/// genuine message.
#[test]
fn killed_sender_held_send_is_never_delivered() {
    bounded("killed_sender_held_send", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let a = w.pair.a.ep.name();
        let junk = vec![0x66u8; 100_000];
        let s = h.request(TX, h.send_hdr(me.ep, a, 0xF1), &junk, 0);
        h.expect_no_answer(&s, "held send");
        // An eager one too: that one is delivered (§6.15 rule 3), before anything else.
        let s2 = h.request(TX, h.send_hdr(me.ep, a, 0xF2), b"eager bytes", 0);
        h.expect_ok(&s2, 64, "eager send");
        drop(h);
        w.rig.wait_disconnects(HOSTILE, 1);

        let p = &mut w.pair;
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        (unsafe { p.a.rbuf.as_mut_slice() })[..PEER_BUF].fill(0);
        p.a.ep.recv_buf(&p.a.rbuf, 0..PEER_BUF, 0xA6).unwrap();
        let e = next_ok(&p.a.rx, "A receives the buffered eager message");
        assert_eq!((e.len, e.src), (11, Some(me)));
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        assert_eq!(&unsafe { p.a.rbuf.as_slice() }[..11], b"eager bytes");
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        (unsafe { p.a.rbuf.as_mut_slice() })[..PEER_BUF].fill(0);
        p.a.ep.recv_buf(&p.a.rbuf, 0..PEER_BUF, 0xA7).unwrap();
        let msg = pattern(5000, 0xF3);
        p.b.ep.send(&msg, p.b_to_a, 0xB9).unwrap();
        next_ok(&p.b.tx, "B -> A");
        let e = next_ok(
            &p.a.rx,
            "A's receive gets B's message, not the dead guest's",
        );
        assert_eq!((e.context, e.len, e.src), (0xA7, 5000, Some(p.b.ep.name())));
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        assert_eq!(&unsafe { p.a.rbuf.as_slice() }[..5000], &msg[..]);
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        assert!(unsafe { p.a.rbuf.as_slice() }[5000..]
            .iter()
            .all(|b| *b == 0));
        w.check_service();
        w.hostile_reconnects(1);
    });
}

/// The same head made available twice, a completion area that overlaps the guest's own rings,
/// and avail-ring garbage after the published index: the device must not crash, hang or
/// disturb anyone else.
#[test]
fn self_inflicted_ring_damage_stays_local() {
    bounded("self_inflicted_ring_damage", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let b = w.pair.b.ep.name();

        // Duplicate head: an EP_OPEN made available twice runs twice.
        let mut hd = h.hdr(Opcode::EpOpen, 0);
        hd.data = ep_open::TYPE_RDM.into();
        let s = h.request(CTRL, hd, &[], 0);
        h.push_avail(CTRL, s.head);
        h.expect_ok(&s, 64, "first use of the head");
        h.expect_ok(&s, 64, "second use of the head");
        assert_eq!(h.open_ep().ep, me.ep + 3);

        // Garbage in avail slots beyond the published index is never looked at.
        let avail = h.rings[TX].as_ref().unwrap().avail;
        let idx = h.rings[TX].as_ref().unwrap().avail_idx;
        for k in 1..8u16 {
            h.put(avail + 4 + 2 * u64::from((idx + k) % QSIZE), 0xffffu16);
        }
        let s = h.request(TX, h.send_hdr(me.ep, b, 0x21), b"after garbage", 0);
        h.expect_ok(&s, 64, "send with garbage after the index");
        w.pair.b.ep.recv_buf(&w.pair.b.rbuf, 0..64, 0xBA).unwrap();
        next_ok(&w.pair.b.rx, "B gets it");

        // The completion of a request written over the guest's own used ring of another queue.
        let used_rx1 = h.rings[RX1].as_ref().unwrap().used;
        let hd = h.send_hdr(me.ep, FabricAddr::default(), 0x22);
        let ha = h.header_at(&hd);
        let ix = h.alloc_descs(TX, 2);
        let d0 = RawDesc {
            addr: ha,
            len: 96,
            flags: F_NEXT,
            next: ix[1],
        };
        let d1 = RawDesc {
            addr: used_rx1,
            len: 64,
            flags: F_WRITE,
            next: 0,
        };
        h.write_desc(TX, ix[0], d0);
        h.write_desc(TX, ix[1], d1);
        let s = h.publish(TX, ix, vec![(used_rx1, 64)], 0);
        let len = h.wait(&s, "completion over its own used ring");
        assert_eq!(len, 64);
        // Whatever the guest does with its broken RX1 ring now, only it is affected.
        let s = w.rig.stats(HOSTILE);
        assert_eq!(s.ring_errors, 0, "{s:?}");
        w.check_service();
    });
}

/// A storm of malformed chains from the hostile guest while the well-behaved guests run
/// traffic: their traffic sees no error and no corruption.
#[test]
fn hostile_storm_during_peer_traffic() {
    bounded("hostile_storm_during_peer_traffic", || {
        let World { mut pair, rig } = World::new();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let traffic = std::thread::spawn(move || {
            let mut rounds = 0u32;
            while !stop2.load(Ordering::Relaxed) || rounds < 3 {
                pair.exchange();
                rounds += 1;
            }
            (pair, rounds)
        });

        let mut h = Hostile::new(&rig.paths[HOSTILE]);
        let me = h.open_ep();
        let b = FabricAddr::new(FabricAddr::node_of(FABRIC, 1, 1), 0, 1);
        let mut expected_bad = 0u64;
        for round in 0..20u64 {
            // Fault, bad chain, unusable, unsupported, invalid, bad endpoint, addr-not-avail.
            let hd = h.send_hdr(me.ep, b, round);
            let ha = h.header_at(&hd);
            let comp = h.alloc(64);
            let s = h.post(TX, &[rd(ha, 96), rd(h.end() + round, 300), wr(comp, 64)]);
            h.expect_status(&s, Status::Fault, 0, "storm fault");
            let comp = h.alloc(64);
            let s = h.post(TX, &[wr(comp, 64), rd(ha, 96)]);
            h.expect_status(&s, Status::BadChain, 0, "storm bad chain");
            let short = h.alloc_filled(64);
            let s = h.post(TX, &[rd(ha, 96), wr(short, 10)]);
            h.expect_unusable(&s, "storm no completion");
            expected_bad += 2;
            let hd = h.raw_hdr(0x4242, me.ep);
            let s = h.request(RX, hd, &[], 64);
            h.expect_status(&s, Status::Unsupported, hd.cookie.into(), "storm opcode");
            let mut hd = h.send_hdr(me.ep, b, round);
            hd.flags = (1u64 << 33).into();
            let s = h.request(TX, hd, b"x", 0);
            h.expect_status(&s, Status::Invalid, round, "storm flags");
            let hd = h.send_hdr(999, b, round);
            let s = h.request(TX, hd, b"x", 0);
            h.expect_status(&s, Status::BadEndpoint, round, "storm endpoint");
            let hd = h.send_hdr(me.ep, FabricAddr::new(b.node, 50, 1), round);
            let s = h.request(TX, hd, &[0u8; 20_000], 0);
            h.expect_status(&s, Status::AddrNotAvail, round, "storm address");
        }
        stop.store(true, Ordering::Relaxed);
        let (mut pair, rounds) = traffic.join().expect("traffic thread");
        assert!(rounds >= 3);
        let st = rig.stats(HOSTILE);
        assert_eq!(st.bad_chains, expected_bad, "{st:?}");
        assert!(st.connected && st.ring_errors == 0, "{st:?}");
        for dev in 0..2 {
            let s = rig.stats(dev);
            assert!(s.error_completions.is_empty(), "device {dev}: {s:?}");
        }
        pair.exchange();
        drop(h);
        drop(pair);
        drop(rig);
    });
}

/// A guest that keeps all of its rings full of cheap bad requests — re-publishing one chain per
/// queue as fast as the device consumes it, never more than a queue size ahead (legal ring
/// use) — must not starve the other guests: the daemon's data-plane poller is shared by every
/// device, so it must not stay in one device's drain loop while that device has work.
#[test]
fn flooding_guest_does_not_starve_the_others() {
    bounded("flooding_guest_does_not_starve_the_others", || {
        let World { mut pair, rig } = World::new();
        // Baseline: three exchanges without the flood.
        let t = Instant::now();
        for _ in 0..3 {
            pair.exchange();
        }
        let quiet = t.elapsed();

        let path = rig.paths[HOSTILE].clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let flood = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut h = Hostile::new(&path);
                let mut heads = Vec::new();
                for q in 0..NQ {
                    let hd = h.raw_hdr(0x7777, 0);
                    let s = h.request(q, hd, &[], 0);
                    h.expect_status(&s, Status::Unsupported, hd.cookie.into(), "first");
                    let r = h.rings[q].as_ref().unwrap();
                    heads.push((q, s.head, r.avail, r.used));
                }
                let _ = ready_tx.send(());
                let mut published = 0u64;
                let until = Instant::now() + TIMEOUT;
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    for &(q, head, avail, used) in &heads {
                        let done: u16 = h.get(used + 2);
                        let idx = h.rings[q].as_ref().unwrap().avail_idx;
                        let room = QSIZE - idx.wrapping_sub(done);
                        if room == 0 {
                            continue;
                        }
                        for k in 0..room {
                            let slot = idx.wrapping_add(k) % QSIZE;
                            h.put(avail + 4 + 2 * u64::from(slot), head);
                        }
                        fence(Ordering::SeqCst);
                        let idx = idx.wrapping_add(room);
                        h.rings[q].as_mut().unwrap().avail_idx = idx;
                        h.put(avail + 2, idx);
                        published += u64::from(room);
                        h.kick(q);
                    }
                }
                (h, published)
            })
        };
        ready_rx.recv_timeout(TIMEOUT).expect("flood started");
        // Meanwhile A and B must get their work done, with the usual per-wait bound.
        let t = Instant::now();
        for _ in 0..3 {
            pair.exchange();
        }
        let flooded = t.elapsed();
        stop.store(true, Ordering::Relaxed);
        let (h, published) = flood.join().expect("flood thread");
        assert!(
            published > 1000,
            "the flood did happen ({published} requests)"
        );
        let st = rig.stats(HOSTILE);
        assert!(st.connected && st.ring_errors == 0, "{st:?}");
        assert!(st.errors(Status::Unsupported) > 1000, "{st:?}");
        eprintln!(
            "3 exchanges: {quiet:?} alone, {flooded:?} during a flood of {published} requests"
        );
        drop(h);
        pair.exchange();
    });
}

/// Post QUERY_CAPS with its header and completion at the start of the buffer area and its data
/// area (the caps answer, 4 KiB) at `data`.
fn query_caps_into(h: &mut Hostile, data: u64) -> Sub {
    let hd = h.hdr(Opcode::QueryCaps, 0);
    let ha = h.header_at(&hd);
    let comp = h.alloc(64);
    h.post(CTRL, &[rd(ha, 96), wr(data, 4096), wr(comp, 64)])
}

/// Bytes of the short memfd: the rings (one page per queue) and a few KiB more.
const SHRUNK: u64 = 0x8000;

/// The hostile guest offers `file` as the backing of its whole declared region. The device must
/// refuse it (a region whose file is shorter than the region, or can be made shorter, would let
/// the guest kill the daemon with SIGBUS), drop that guest alone, and keep serving the others.
/// Runs against a `vfabricd` child process: were the daemon to fault, only it would die.
fn refused_backing(file: File) {
    let mut d = virtio_fabric_tests::DaemonProcess::start(3, &[]);
    let mut pair = Pair::open_paths(&d.sockets[0], &d.sockets[1]);
    pair.exchange();

    let mut h = Hostile::connect(&d.sockets[2]);
    h.negotiate(Features::All);
    h.file = file;
    let refused = h.fe.set_mem_table(&[h.region()]).is_err();
    // Refused either by an error reply or by closing the connection: any further request fails.
    let gone = refused
        || virtio_fabric_tests::wait_for(Duration::from_secs(5), || h.fe.get_features().is_err());
    assert!(gone, "the device accepted memory it cannot safely map");
    std::thread::sleep(Duration::from_millis(100));
    assert!(d.alive(), "vfabricd died");
    drop(h);
    pair.exchange();
    // The device is free again for a well-behaved guest.
    let mut h = Hostile::connect(&d.sockets[2]);
    h.negotiate(Features::All);
    h.share_memory();
    h.start_all_rings();
    let answer = h.alloc(4096);
    let s = query_caps_into(&mut h, answer);
    h.wait(&s, "QUERY_CAPS");
    assert_eq!(status_of(&h.completion(&s)), Ok(Status::Ok));
}

/// SET_MEM_TABLE names a region larger than its (sealed) memfd.
#[test]
fn memfd_shorter_than_the_declared_region_is_refused() {
    bounded("memfd_shorter_than_the_declared_region_is_refused", || {
        refused_backing(memfd(SHRUNK));
    });
}

/// SET_MEM_TABLE with a memfd the guest could still ftruncate under the device's mapping.
#[test]
fn memfd_without_a_shrink_seal_is_refused() {
    bounded("memfd_without_a_shrink_seal_is_refused", || {
        refused_backing(memfd_unsealed(HMEM));
    });
}

/// What the seal buys: a registered (sealed) memfd cannot be shrunk at all.
#[test]
fn sealed_memfd_cannot_be_shrunk() {
    let f = memfd(HMEM);
    assert!(f.set_len(SHRUNK).is_err());
}

/// The hostile guest replaces its memory table (SET_MEM_TABLE with another memfd) while a
/// rendezvous send of it is held at A's endpoint and a receive of it is posted: A must never
/// get bytes from either memory (the held send is withdrawn), A's sends to it fail cleanly,
/// and A's next receive gets the next genuine message intact.
#[test]
fn memory_table_swap_with_requests_in_flight() {
    bounded("memory_table_swap_with_requests_in_flight", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let a = w.pair.a.ep.name();
        let s = h.request(TX, h.send_hdr(me.ep, a, 0xF1), &vec![0x66u8; 100_000], 0);
        let r = h.request(RX, h.recv_hdr(me.ep, 0xF2), &[], 4096);
        h.fence_rx(RX, me.ep);
        h.expect_no_answer(&s, "held send");

        // Swap: a new memfd at new guest addresses (the old rings are no longer in memory).
        let file2 = memfd(HMEM);
        let mem2 = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            HMEM as usize,
            Some(FileOffset::new(file2.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let va2 = mem2.get_host_address(GuestAddress(0)).unwrap() as u64;
        #[allow(clippy::needless_update)]
        let region2 = VhostUserMemoryRegionInfo {
            guest_phys_addr: va2,
            memory_size: HMEM,
            userspace_addr: va2,
            mmap_offset: 0,
            mmap_handle: file2.as_raw_fd(),
            ..Default::default()
        };
        let swapped = h.fe.set_mem_table(&[region2]);
        eprintln!("SET_MEM_TABLE swap: {swapped:?}");

        // A's receive must not get the hostile guest's bytes; B's message comes through.
        let p = &mut w.pair;
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        unsafe { p.a.rbuf.as_mut_slice() }.fill(0);
        p.a.ep.recv_buf(&p.a.rbuf, 0..PEER_BUF, 0xA8).unwrap();
        let to_h = p.a.av.insert(me).unwrap();
        p.a.ep.send(b"to the swapped guest", to_h, 0xA9).unwrap();
        let e = next_err(&p.a.tx, "A sends to the swapped guest's endpoint");
        assert!(
            matches!(e.status, Status::AddrNotAvail | Status::PeerGone),
            "{e:?}"
        );
        let msg = pattern(7000, 0xF4);
        p.b.ep.send(&msg, p.b_to_a, 0xBC).unwrap();
        next_ok(&p.b.tx, "B -> A");
        let e = next_ok(&p.a.rx, "A receives B's message");
        assert_eq!((e.context, e.len, e.src), (0xA8, 7000, Some(p.b.ep.name())));
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        assert_eq!(&unsafe { p.a.rbuf.as_slice() }[..7000], &msg[..]);
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        assert!(unsafe { p.a.rbuf.as_slice() }[7000..]
            .iter()
            .all(|b| *b == 0));
        // The hostile guest's own chains: whatever it gets, only it is affected.
        let _ = h.try_wait(&r, Duration::ZERO);
        drop(h);
        drop((mem2, file2));
        w.check_service();
        w.hostile_reconnects(1);
    });
}

/// Race of the previous attack: the hostile guest swaps its memory table while A is consuming
/// its held rendezvous sends. Whatever the interleaving, A's receives may only complete with a
/// message or stay posted; a FAULT caused by the sender's memory would be a cross-guest failure.
/// Up to 40 rounds with the swap at varying moments; stops at the first violation.
#[test]
fn memory_table_swap_races_with_peer_receives() {
    bounded("memory_table_swap_races_with_peer_receives", || {
        let mut w = World::new();
        let n = 30u64;
        let payload = vec![0x66u8; 20_000];
        for round in 0..40u64 {
            let target = w.pair.a.extra_endpoint();
            let mut h = w.hostile();
            let me = h.open_ep();
            // n held sends (header and payload in one descriptor) on queue pair 1.
            for i in 0..n {
                let hd = h.send_hdr(me.ep, target.name(), i);
                let ha = h.alloc(96 + payload.len() as u64);
                h.put(ha, hd);
                h.write(ha + 96, &payload);
                let comp = h.alloc(64);
                let ix = h.alloc_descs(TX1, 2);
                h.write_desc(
                    TX1,
                    ix[0],
                    desc(ha, 96 + payload.len() as u32, F_NEXT, ix[1]),
                );
                h.write_desc(TX1, ix[1], desc(comp, 64, F_WRITE, 0));
                h.publish(TX1, ix, vec![(comp, 64)], 0);
            }
            std::thread::sleep(Duration::from_millis(10));
            let file2 = memfd(HMEM);
            let mem2 = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
                GuestAddress(0),
                HMEM as usize,
                Some(FileOffset::new(file2.try_clone().unwrap(), 0)),
            )])
            .unwrap();
            let va2 = mem2.get_host_address(GuestAddress(0)).unwrap() as u64;
            #[allow(clippy::needless_update)]
            let region2 = VhostUserMemoryRegionInfo {
                guest_phys_addr: va2,
                memory_size: HMEM,
                userspace_addr: va2,
                mmap_offset: 0,
                mmap_handle: file2.as_raw_fd(),
                ..Default::default()
            };
            let rx = &w.pair.a.rx;
            let mut outcomes = Vec::new();
            std::thread::scope(|sc| {
                let swap = sc.spawn(|| {
                    std::thread::sleep(Duration::from_micros((round % 10) * 100));
                    let _ = h.fe.set_mem_table(&[region2]);
                });
                for i in 0..n {
                    target.recv_vec(payload.len(), i).unwrap();
                }
                let mut last = Instant::now();
                let mut v = Vec::new();
                while last.elapsed() < Duration::from_millis(100) {
                    match rx.read(&mut v, 1) {
                        Ok(_) => {
                            let e = v.pop().unwrap();
                            assert_eq!(e.buf.as_deref(), Some(&payload[..]));
                            outcomes.push(Status::Ok);
                            last = Instant::now();
                        }
                        Err(DrvError::Avail) => {
                            outcomes.push(rx.readerr().unwrap().status);
                            last = Instant::now();
                        }
                        _ => std::thread::yield_now(),
                    }
                }
                swap.join().unwrap();
            });
            let faults = outcomes.iter().filter(|s| **s == Status::Fault).count();
            assert_eq!(
                faults, 0,
                "round {round}: {faults} of A's receives completed FAULT because the sender \
                 swapped its memory table: {outcomes:?}"
            );
            assert!(outcomes.iter().all(|s| *s == Status::Ok), "{outcomes:?}");
            drop(h);
            drop((mem2, file2));
            // Closing the endpoint discards the receives that stayed posted (the driver
            // reports no completion for them).
            drop(target);
            wait_until("A's receives returned", || {
                w.pair.a.domain.progress().unwrap();
                w.pair.a.domain.requests_in_flight() == 0
            });
            assert_quiet(&w.pair.a.rx, Duration::from_millis(20), "A after the round");
            w.rig.wait_disconnects(HOSTILE, round + 1);
        }
        w.check_service();
    });
}

/// Mirror of the previous race: the hostile guest has receives posted and swaps its memory
/// table while A's sends are matched against them. A's sends may complete Ok (delivered or
/// buffered), ADDR_NOT_AVAIL or PEER_GONE — never FAULT (A's own buffers are fine).
#[test]
fn memory_table_swap_races_with_peer_sends() {
    bounded("memory_table_swap_races_with_peer_sends", || {
        let mut w = World::new();
        let n = 30u64;
        let msg = pattern(2000, 0x5E);
        for round in 0..40u64 {
            let mut h = w.hostile();
            let me = h.open_ep();
            for i in 0..n {
                let hd = h.recv_hdr(me.ep, i);
                let ha = h.header_at(&hd);
                let data = h.alloc(4096 + 64);
                let ix = h.alloc_descs(RX1, 2);
                h.write_desc(RX1, ix[0], desc(ha, 96, F_NEXT, ix[1]));
                h.write_desc(RX1, ix[1], desc(data, 4096 + 64, F_WRITE, 0));
                h.publish(RX1, ix, vec![(data + 4096, 64)], data);
            }
            h.fence_rx(RX1, me.ep);
            let to_h = w.pair.a.av.insert(me).unwrap();
            let file2 = memfd(HMEM);
            let mem2 = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
                GuestAddress(0),
                HMEM as usize,
                Some(FileOffset::new(file2.try_clone().unwrap(), 0)),
            )])
            .unwrap();
            let va2 = mem2.get_host_address(GuestAddress(0)).unwrap() as u64;
            #[allow(clippy::needless_update)]
            let region2 = VhostUserMemoryRegionInfo {
                guest_phys_addr: va2,
                memory_size: HMEM,
                userspace_addr: va2,
                mmap_offset: 0,
                mmap_handle: file2.as_raw_fd(),
                ..Default::default()
            };
            let a = &w.pair.a;
            let mut outcomes = Vec::new();
            std::thread::scope(|sc| {
                let swap = sc.spawn(|| {
                    std::thread::sleep(Duration::from_micros((round % 10) * 100));
                    let _ = h.fe.set_mem_table(&[region2]);
                });
                for i in 0..n {
                    a.ep.send(&msg, to_h, i).unwrap();
                }
                for _ in 0..n {
                    outcomes.push(next(&a.tx).map_or_else(|e| e.status, |_| Status::Ok));
                }
                swap.join().unwrap();
            });
            let faults = outcomes.iter().filter(|s| **s == Status::Fault).count();
            assert_eq!(
                faults, 0,
                "round {round}: {faults} of A's sends completed FAULT because the receiver \
                 swapped its memory table: {outcomes:?}"
            );
            assert!(
                outcomes
                    .iter()
                    .all(|s| matches!(s, Status::Ok | Status::AddrNotAvail | Status::PeerGone)),
                "{outcomes:?}"
            );
            drop(h);
            drop((mem2, file2));
            w.rig.wait_disconnects(HOSTILE, round + 1);
        }
        w.check_service();
    });
}

// ---------------------------------------------------------------------------------------------
// Memory registration, RMA and atomics
// ---------------------------------------------------------------------------------------------

/// Post `hd` with `payload` and a data area of `cap` bytes; expect `want` (every other
/// completion field zero).
fn expect_req(
    h: &mut Hostile,
    q: usize,
    hd: ReqHeader,
    payload: &[u8],
    cap: u32,
    want: Status,
    what: &str,
) {
    let s = h.request(q, hd, payload, cap);
    h.expect_status(&s, want, hd.cookie.into(), what);
}

fn mem_seg(addr: u64, len: u64) -> Vec<u8> {
    let mut v = addr.to_le_bytes().to_vec();
    v.extend_from_slice(&len.to_le_bytes());
    v
}

fn rma_iov(addr: u64, len: u64, key: u64) -> Vec<u8> {
    let mut v = addr.to_le_bytes().to_vec();
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&key.to_le_bytes());
    v
}

/// MR_REG / MR_DEREG with bad counts, flags, keys and segments (→ INVALID, FAULT,
/// UNSUPPORTED, KEY_IN_USE), and a good registration that a well-behaved guest can then use.
#[test]
fn hostile_memory_registration() {
    bounded("hostile_memory_registration", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let buf = h.alloc_filled(4096);
        let rw = vfabric_proto::mr_flags::REMOTE_READ | vfabric_proto::mr_flags::REMOTE_WRITE;
        let reg = |h: &mut Hostile, count: u32, fl: u64, key: u64| {
            let mut hd = h.hdr(Opcode::MrReg, 0);
            hd.count = count.into();
            hd.compare = fl.into();
            hd.remote_key = key.into();
            hd.remote_addr = buf.into();
            hd
        };
        use vfabric_proto::mr_flags as mf;
        let one = mem_seg(buf, 4096);
        let cases: Vec<(&str, ReqHeader, Vec<u8>, Status)> = vec![
            ("count 0", reg(&mut h, 0, rw, 1), vec![], Status::Invalid),
            (
                "count > max_sge",
                reg(&mut h, MAX_SGE + 1, rw, 1),
                one.repeat(MAX_SGE as usize + 1),
                Status::Invalid,
            ),
            (
                "payload shorter than count",
                reg(&mut h, 2, rw, 1),
                one.clone(),
                Status::Invalid,
            ),
            (
                "no remote access",
                reg(&mut h, 1, 0, 1),
                one.clone(),
                Status::Invalid,
            ),
            (
                "reserved flag",
                reg(&mut h, 1, rw | 1 << 20, 1),
                one.clone(),
                Status::Invalid,
            ),
            (
                "PROV_KEY with a key",
                reg(&mut h, 1, rw | mf::PROV_KEY, 5),
                one.clone(),
                Status::Invalid,
            ),
            (
                "PMEM of guest memory (not durable: vfabricd takes process memory only)",
                reg(&mut h, 1, rw | mf::PMEM, 1),
                one.clone(),
                Status::Access,
            ),
            (
                "segment outside memory",
                reg(&mut h, 1, rw, 1),
                mem_seg(h.end(), 16),
                Status::Fault,
            ),
            (
                "segment in another guest",
                reg(&mut h, 1, rw, 1),
                mem_seg(w.pair.b.rbuf.addr(), 16),
                Status::Fault,
            ),
            (
                "segment overflows",
                reg(&mut h, 1, rw, 1),
                mem_seg(u64::MAX - 7, 16),
                Status::Fault,
            ),
            (
                "zero length",
                reg(&mut h, 1, rw, 1),
                mem_seg(buf, 0),
                Status::Invalid,
            ),
        ];
        for (what, hd, payload, want) in cases {
            expect_req(&mut h, CTRL, hd, &payload, 0, want, what);
        }
        // A good registration with a requested key, then the same key again.
        let hd = reg(&mut h, 2, rw, 0x77);
        let mut two = mem_seg(buf, 100);
        two.extend(mem_seg(buf + 1000, 28));
        let s = h.request(CTRL, hd, &two, 0);
        let c = h.expect_ok(&s, 64, "MR_REG of two segments");
        assert_eq!((u64::from(c.data), u64::from(c.len)), (0x77, 128));
        let hd = reg(&mut h, 1, rw, 0x77);
        expect_req(&mut h, CTRL, hd, &one, 0, Status::KeyInUse, "key in use");
        // The well-behaved guest A writes across the segment boundary of the hostile region.
        let a = &w.pair.a;
        let to_h = a.av.insert(me).unwrap();
        let data = pattern(58, 7);
        a.ep.write(&data, to_h, buf + 70, 0x77, 1).unwrap();
        next_ok(&a.tx, "A writes into the hostile region");
        assert_eq!(h.read(buf + 70, 30), &data[..30]);
        assert_eq!(h.read(buf + 1000, 28), &data[30..]);
        // A process-memory region naming unmapped addresses of the frontend registers (the
        // device cannot know), but every access to it faults, for the initiator only.
        let hd = reg(&mut h, 1, rw | mf::PROCESS_MEMORY, 0x79);
        let s = h.request(CTRL, hd, &mem_seg(8, 64), 0);
        h.expect_ok(&s, 64, "MR_REG of process memory");
        a.ep.write(&data, to_h, buf, 0x79, 2).unwrap();
        assert_eq!(
            next_err(&a.tx, "write to unmapped process memory").status,
            Status::Fault
        );
        // MR_DEREG of an unknown key, then of the real one; A's next write is refused.
        let mut hd = h.hdr(Opcode::MrDereg, 0);
        hd.remote_key = 0x78.into();
        expect_req(
            &mut h,
            CTRL,
            hd,
            &[],
            0,
            Status::Invalid,
            "MR_DEREG unknown key",
        );
        let mut hd = h.hdr(Opcode::MrDereg, 0);
        hd.remote_key = 0x77.into();
        expect_req(&mut h, CTRL, hd, &[], 0, Status::Ok, "MR_DEREG");
        a.ep.write(&data, to_h, buf + 70, 0x77, 2).unwrap();
        assert_eq!(next_err(&a.tx, "write after dereg").status, Status::Access);
        // MR_EVENT with a data area is a bad chain; a payload is invalid.
        let hd = h.hdr(Opcode::MrEvent, 0);
        expect_req(
            &mut h,
            RX,
            hd,
            &[],
            64,
            Status::BadChain,
            "MR_EVENT with a data area",
        );
        let hd = h.hdr(Opcode::MrEvent, 0);
        expect_req(
            &mut h,
            RX,
            hd,
            b"x",
            0,
            Status::Invalid,
            "MR_EVENT with a payload",
        );
        w.expect_hostile_connected();
        w.check_service();
        w.hostile_works(&mut h);
    });
}

/// RMA requests with bad keys, ranges, counts, lengths and scatter lists against a region of a
/// well-behaved guest: each refused with its status, the target's bytes unchanged.
#[test]
fn hostile_rma_requests() {
    bounded("hostile_rma_requests", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let b = w.pair.b.ep.name();
        let tbuf = w.pair.b.domain.alloc_buffer(4096).unwrap();
        let mr = w
            .pair
            .b
            .domain
            .register(
                &tbuf,
                vfabric::fi::REMOTE_READ | vfabric::fi::REMOTE_WRITE,
                None,
            )
            .unwrap();
        let ro = w
            .pair
            .b
            .domain
            .register(&tbuf, vfabric::fi::REMOTE_READ, None)
            .unwrap();
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        let before = unsafe { tbuf.as_slice() }.to_vec();
        let (base, key) = (mr.base(), mr.key());
        let rma = |h: &mut Hostile, op: Opcode, addr: u64, key: u64, count: u32, fl: u64| {
            let mut hd = h.hdr(op, me.ep);
            hd.peer = b.to_wire();
            hd.remote_addr = addr.into();
            hd.remote_key = key.into();
            hd.count = count.into();
            hd.flags = fl.into();
            hd
        };
        use Opcode::{RmaRead, RmaWrite};
        use Status::*;
        let d16 = [0xAAu8; 16];
        let mut list2 = rma_iov(base, 8, key);
        list2.extend(rma_iov(base + 100, 8, key));
        let mut overflow_list = rma_iov(base, u64::MAX, key);
        overflow_list.extend(rma_iov(base, 2, key));
        let mut with_data = list2.clone();
        with_data.extend_from_slice(&d16[..15]);
        let mut list_then_data = list2.clone();
        list_then_data.extend_from_slice(&d16);
        let cases: Vec<(&str, ReqHeader, Vec<u8>, u32, Status)> = vec![
            (
                "wrong key",
                rma(&mut h, RmaWrite, base, key ^ 0x10, 0, 0),
                d16.to_vec(),
                0,
                Access,
            ),
            (
                "write to read-only",
                rma(&mut h, RmaWrite, ro.base(), ro.key(), 0, 0),
                d16.to_vec(),
                0,
                Access,
            ),
            (
                "one past the end",
                rma(&mut h, RmaWrite, base + 4081, key, 0, 0),
                d16.to_vec(),
                0,
                Access,
            ),
            (
                "below the start",
                rma(&mut h, RmaWrite, base - 1, key, 0, 0),
                d16.to_vec(),
                0,
                Access,
            ),
            (
                "address overflow",
                rma(&mut h, RmaWrite, u64::MAX - 7, key, 0, 0),
                d16.to_vec(),
                0,
                Access,
            ),
            (
                "read past the end",
                rma(&mut h, RmaRead, base + 4090, key, 0, 0),
                vec![],
                16,
                Access,
            ),
            (
                "read address overflow",
                rma(&mut h, RmaRead, u64::MAX, key, 0, 0),
                vec![],
                16,
                Access,
            ),
            (
                "count > max_sge",
                rma(&mut h, RmaWrite, 0, 0, MAX_SGE + 1, 0),
                list_then_data.clone(),
                0,
                Invalid,
            ),
            (
                "payload shorter than the list",
                rma(&mut h, RmaWrite, 0, 0, 3, 0),
                list2.clone(),
                0,
                Invalid,
            ),
            (
                "list sum != data",
                rma(&mut h, RmaWrite, 0, 0, 2, 0),
                with_data,
                0,
                Invalid,
            ),
            (
                "list sum overflows",
                rma(&mut h, RmaRead, 0, 0, 2, 0),
                overflow_list,
                16,
                Invalid,
            ),
            (
                "read list sum > data area",
                rma(&mut h, RmaRead, 0, 0, 2, 0),
                list2.clone(),
                8,
                Invalid,
            ),
            (
                "read with data after the list",
                rma(&mut h, RmaRead, 0, 0, 2, 0),
                list_then_data.clone(),
                16,
                Invalid,
            ),
            (
                "INJECT above inject_size",
                rma(&mut h, RmaWrite, base, key, 0, flags::INJECT),
                vec![1; INJECT_SIZE as usize + 1],
                0,
                Invalid,
            ),
            (
                "COMMIT_COMPLETE to a region that is not PMEM",
                rma(&mut h, RmaWrite, base, key, 0, flags::COMMIT_COMPLETE),
                d16.to_vec(),
                0,
                Access,
            ),
            (
                "bad endpoint",
                {
                    let mut x = rma(&mut h, RmaWrite, base, key, 0, 0);
                    x.ep = 99.into();
                    x
                },
                d16.to_vec(),
                0,
                BadEndpoint,
            ),
            (
                "no such peer",
                {
                    let mut x = rma(&mut h, RmaWrite, base, key, 0, 0);
                    x.peer = FabricAddr::new(b.node, 77, 1).to_wire();
                    x
                },
                d16.to_vec(),
                0,
                AddrNotAvail,
            ),
        ];
        for (what, hd, payload, cap, want) in cases {
            expect_req(&mut h, TX, hd, &payload, cap, want, what);
            // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
            assert_eq!(
                unsafe { tbuf.as_slice() },
                &before[..],
                "{what}: target bytes changed"
            );
        }
        // Larger than MAX_RMA_SIZE (= max_msg_size).
        let big = h.alloc(MAX_MSG + 1);
        let hd = rma(&mut h, RmaWrite, base, key, 0, 0);
        let ha = h.header_at(&hd);
        let comp = h.alloc(64);
        let s = h.post(TX, &[rd(ha, 96), rd(big, MAX_MSG as u32 + 1), wr(comp, 64)]);
        h.expect_status(&s, TooLarge, hd.cookie.into(), "write above max_rma_size");
        // A read whose data area lies outside the hostile guest's memory.
        let hd = rma(&mut h, RmaRead, base, key, 0, 0);
        let ha = h.header_at(&hd);
        let comp = h.alloc(64);
        let s = h.post(TX, &[rd(ha, 96), wr(h.end() + 4096, 16), wr(comp, 64)]);
        h.expect_status(
            &s,
            Fault,
            0, // descriptor checks come first: the cookie is not read
            "read into memory outside the guest",
        );
        // A DGRAM endpoint cannot do RMA.
        let mut hd = h.hdr(Opcode::EpOpen, 0);
        hd.data = ep_open::TYPE_DGRAM.into();
        let s = h.request(CTRL, hd, &[], 0);
        let dg = FabricAddr::from_wire(&h.expect_ok(&s, 64, "open DGRAM").src);
        let mut hd = rma(&mut h, RmaWrite, base, key, 0, 0);
        hd.ep = dg.ep.into();
        expect_req(&mut h, TX, hd, &d16, 0, Invalid, "RMA on a DGRAM endpoint");
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        assert_eq!(unsafe { tbuf.as_slice() }, &before[..]);
        // Well-formed requests work: a two-range write and a one-range read.
        let hd = rma(&mut h, RmaWrite, 0, 0, 2, 0);
        let s = h.request(TX, hd, &list_then_data, 0);
        assert_eq!(u64::from(h.expect_ok(&s, 64, "good write").len), 16);
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        assert_eq!(&unsafe { tbuf.as_slice() }[..8], &[0xAA; 8]);
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        assert_eq!(&unsafe { tbuf.as_slice() }[100..108], &[0xAA; 8]);
        let hd = rma(&mut h, RmaRead, base + 96, key, 0, 0);
        let s = h.request(TX, hd, &[], 16);
        h.expect_ok(&s, 80, "good read");
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        assert_eq!(h.read(s.data, 16), &unsafe { tbuf.as_slice() }[96..112]);
        w.expect_hostile_connected();
        w.check_service();
        w.hostile_works(&mut h);
    });
}

/// Atomic requests with bad datatypes, ops, counts, operand lengths and result areas.
#[test]
fn hostile_atomic_requests() {
    bounded("hostile_atomic_requests", || {
        let mut w = World::new();
        let mut h = w.hostile();
        let me = h.open_ep();
        let b = w.pair.b.ep.name();
        let tbuf = w.pair.b.domain.alloc_buffer(4096).unwrap();
        let mr = w
            .pair
            .b
            .domain
            .register(
                &tbuf,
                vfabric::fi::REMOTE_READ | vfabric::fi::REMOTE_WRITE,
                None,
            )
            .unwrap();
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        let before = unsafe { tbuf.as_slice() }.to_vec();
        let (base, key) = (mr.base(), mr.key());
        use vfabric_proto::{atomic_op as aop, datatype as dt};
        let at = |h: &mut Hostile, op: Opcode, o: u8, ty: u8, count: u32| {
            let mut hd = h.hdr(op, me.ep);
            hd.peer = b.to_wire();
            hd.remote_addr = base.into();
            hd.remote_key = key.into();
            hd.atomic_op = o;
            hd.datatype = ty;
            hd.count = count.into();
            hd
        };
        use Opcode::{Atomic, CompareAtomic, FetchAtomic};
        use Status::*;
        let e8 = [1u8; 8];
        let mut cases: Vec<(String, ReqHeader, Vec<u8>, u32, Status)> = Vec::new();
        for ty in [
            dt::FLOAT_COMPLEX,
            dt::DOUBLE_COMPLEX,
            dt::LONG_DOUBLE,
            dt::LONG_DOUBLE_COMPLEX,
            16,
            200,
            255,
        ] {
            cases.push((
                format!("datatype {ty}"),
                at(&mut h, Atomic, aop::SUM, ty, 1),
                vec![],
                0,
                Unsupported,
            ));
        }
        for o in [19u8, 100, 255] {
            cases.push((
                format!("op {o}"),
                at(&mut h, Atomic, o, dt::UINT64, 1),
                vec![],
                0,
                Unsupported,
            ));
        }
        for (what, hd, payload, cap, want) in [
            (
                "BOR on DOUBLE",
                at(&mut h, Atomic, aop::BOR, dt::DOUBLE, 1),
                vec![],
                0,
                Unsupported,
            ),
            (
                "MSWAP on FLOAT",
                at(&mut h, CompareAtomic, aop::MSWAP, dt::FLOAT, 1),
                vec![],
                4,
                Unsupported,
            ),
            (
                "CSWAP on ATOMIC",
                at(&mut h, Atomic, aop::CSWAP, dt::UINT64, 1),
                vec![],
                0,
                Invalid,
            ),
            (
                "ATOMIC_READ on ATOMIC",
                at(&mut h, Atomic, aop::ATOMIC_READ, dt::UINT64, 1),
                vec![],
                0,
                Invalid,
            ),
            (
                "SUM on COMPARE_ATOMIC",
                at(&mut h, CompareAtomic, aop::SUM, dt::UINT64, 1),
                vec![],
                8,
                Invalid,
            ),
            (
                "count 0",
                at(&mut h, Atomic, aop::SUM, dt::UINT64, 0),
                vec![],
                0,
                Invalid,
            ),
            (
                "count above MAX_ATOMIC_COUNT",
                at(&mut h, Atomic, aop::SUM, dt::UINT8, 4097),
                vec![0; 4097],
                0,
                Invalid,
            ),
            (
                "operands too short",
                at(&mut h, Atomic, aop::SUM, dt::UINT64, 2),
                e8.to_vec(),
                0,
                Invalid,
            ),
            (
                "operands too long",
                at(&mut h, Atomic, aop::SUM, dt::UINT64, 1),
                vec![1; 9],
                0,
                Invalid,
            ),
            (
                "inline form with count 2",
                at(&mut h, Atomic, aop::SUM, dt::UINT64, 2),
                vec![],
                0,
                Invalid,
            ),
            (
                "inline form of a 16-byte type",
                at(&mut h, Atomic, aop::SUM, dt::UINT128, 1),
                vec![],
                0,
                Invalid,
            ),
            (
                "compare values missing",
                at(&mut h, CompareAtomic, aop::CSWAP, dt::UINT64, 2),
                vec![1; 16],
                16,
                Invalid,
            ),
            (
                "ATOMIC_READ with operands",
                at(&mut h, FetchAtomic, aop::ATOMIC_READ, dt::UINT64, 1),
                e8.to_vec(),
                8,
                Invalid,
            ),
            (
                "result area too small",
                at(&mut h, FetchAtomic, aop::SUM, dt::UINT64, 1),
                e8.to_vec(),
                4,
                BadChain,
            ),
            (
                "result area too large",
                at(&mut h, FetchAtomic, aop::SUM, dt::UINT64, 1),
                e8.to_vec(),
                16,
                BadChain,
            ),
            (
                "no result area",
                at(&mut h, FetchAtomic, aop::SUM, dt::UINT64, 1),
                e8.to_vec(),
                0,
                BadChain,
            ),
            (
                "past the end",
                {
                    let mut x = at(&mut h, Atomic, aop::SUM, dt::UINT64, 1);
                    x.remote_addr = (base + 4089).into();
                    x
                },
                e8.to_vec(),
                0,
                Access,
            ),
            (
                "address overflow",
                {
                    let mut x = at(&mut h, Atomic, aop::SUM, dt::UINT64, 2);
                    x.remote_addr = (u64::MAX - 8).into();
                    x
                },
                vec![1; 16],
                0,
                Access,
            ),
            (
                "wrong key",
                {
                    let mut x = at(&mut h, Atomic, aop::SUM, dt::UINT64, 1);
                    x.remote_key = (key ^ 4).into();
                    x
                },
                e8.to_vec(),
                0,
                Access,
            ),
            (
                "INJECT above inject_size",
                {
                    let mut x = at(&mut h, Atomic, aop::SUM, dt::UINT8, 300);
                    x.flags = flags::INJECT.into();
                    x
                },
                vec![1; 300],
                0,
                Invalid,
            ),
        ] {
            cases.push((what.to_string(), hd, payload, cap, want));
        }
        for (what, hd, payload, cap, want) in cases {
            expect_req(&mut h, TX, hd, &payload, cap, want, &what);
            // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
            assert_eq!(
                unsafe { tbuf.as_slice() },
                &before[..],
                "{what}: target bytes changed"
            );
        }
        // Well-formed: inline fetch-add, then a payload-form compare-swap of two elements.
        let mut hd = at(&mut h, FetchAtomic, aop::SUM, dt::UINT64, 1);
        hd.data = 5.into();
        let s = h.request(TX, hd, &[], 8);
        assert_eq!(u64::from(h.expect_ok(&s, 72, "inline fetch-add").len), 8);
        assert_eq!(h.read(s.data, 8), before[..8].to_vec());
        let old = u64::from_le_bytes(before[..8].try_into().unwrap());
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        let now = u64::from_le_bytes(unsafe { tbuf.as_slice() }[..8].try_into().unwrap());
        assert_eq!(now, old.wrapping_add(5));
        let hd = at(&mut h, CompareAtomic, aop::CSWAP, dt::UINT32, 2);
        let mut payload = vec![9u8, 0, 0, 0, 8, 0, 0, 0];
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        payload.extend_from_slice(&unsafe { tbuf.as_slice() }[..4]);
        payload.extend_from_slice(&[0xFF; 4]);
        let s = h.request(TX, hd, &payload, 8);
        h.expect_ok(&s, 72, "compare-swap of two elements");
        assert_eq!(
            // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
            &unsafe { tbuf.as_slice() }[..4],
            &[9, 0, 0, 0],
            "first element matched"
        );
        assert_eq!(
            // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
            &unsafe { tbuf.as_slice() }[4..8],
            &now.to_le_bytes()[4..8],
            "second did not"
        );
        w.expect_hostile_connected();
        w.check_service();
        w.hostile_works(&mut h);
    });
}

/// Without VIRTIO_FABRIC_F_RMA / F_ATOMIC negotiated, their opcodes answer UNSUPPORTED and a
/// well-behaved guest's region is untouched.
#[test]
fn rma_and_atomics_without_the_features() {
    bounded("rma_and_atomics_without_the_features", || {
        let mut w = World::new();
        let offered = {
            let h = Hostile::connect(&w.hostile_path());
            h.fe.get_features().unwrap()
        };
        w.rig.wait_disconnects(HOSTILE, 1);
        let rma = bit(vfabric_proto::VIRTIO_FABRIC_F_RMA);
        let atomic = bit(vfabric_proto::VIRTIO_FABRIC_F_ATOMIC);
        assert_eq!(
            offered & (rma | atomic),
            rma | atomic,
            "RMA and ATOMIC offered"
        );
        let b = w.pair.b.ep.name();
        let tbuf = w.pair.b.domain.alloc_buffer(64).unwrap();
        let mr = w
            .pair
            .b
            .domain
            .register(
                &tbuf,
                vfabric::fi::REMOTE_READ | vfabric::fi::REMOTE_WRITE,
                None,
            )
            .unwrap();
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        let before = unsafe { tbuf.as_slice() }.to_vec();
        let mut h = Hostile::with_features(
            &w.hostile_path(),
            Features::Exactly(offered & !(rma | atomic)),
        );
        let me = h.open_ep();
        let mut reqs = Vec::new();
        for (q, op, payload, cap) in [
            (TX, Opcode::RmaWrite, vec![1u8; 8], 0u32),
            (TX, Opcode::RmaRead, vec![], 8),
            (TX, Opcode::Atomic, vec![1u8; 8], 0),
            (TX, Opcode::FetchAtomic, vec![1u8; 8], 8),
            (TX, Opcode::CompareAtomic, vec![1u8; 16], 8),
            (CTRL, Opcode::MrReg, vec![], 0),
            (CTRL, Opcode::MrDereg, vec![], 0),
            (RX, Opcode::MrEvent, vec![], 0),
        ] {
            let mut hd = h.hdr(op, me.ep);
            hd.peer = b.to_wire();
            hd.remote_addr = mr.base().into();
            hd.remote_key = mr.key().into();
            hd.count = u32::from(op != Opcode::RmaWrite && op != Opcode::RmaRead).into();
            hd.datatype = vfabric_proto::datatype::UINT64;
            hd.atomic_op = if op == Opcode::CompareAtomic {
                vfabric_proto::atomic_op::CSWAP
            } else {
                vfabric_proto::atomic_op::SUM
            };
            reqs.push((op, hd.cookie, h.request(q, hd, &payload, cap)));
        }
        for (op, cookie, s) in reqs {
            h.expect_status(&s, Status::Unsupported, cookie.into(), &format!("{op:?}"));
        }
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        assert_eq!(unsafe { tbuf.as_slice() }, &before[..]);
        let st = w.rig.stats(HOSTILE);
        assert!(st.connected && st.ring_errors == 0, "{st:?}");
        w.check_service();
        w.hostile_works(&mut h);
    });
}
