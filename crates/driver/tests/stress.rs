// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Bounded concurrency stress (issue 7, section 5): one embedded `vfabricd` with four devices
//! (a small unexpected-bytes bound, so backpressure holds sends) and about twenty threads doing
//! everything at once.
//!
//! * **Ring lanes**: six endpoints on devices 0, 1, 2 (two per domain, each used by a sending
//!   and a receiving thread; polled and blocking CQs) form a ring. Each sends `LANE_MSGS`
//!   messages of 0 B to 256 KiB (inline, eager, around the eager threshold, held) downstream,
//!   untagged and tagged, from private memory, shared buffers and iovs, with remote CQ data,
//!   DELIVERY_COMPLETE or by inject, and receives its upstream's into vectors, shared buffers,
//!   raw memory and split iovs, sometimes with one receive posted so messages arrive
//!   unexpected. Every byte is checked (the pattern derives from lane and sequence number), as
//!   are length, tag, data, source, matching order and guard bytes around receive buffers.
//! * **RMA**: between sends, each lane writes its own slot of the downstream domain's region
//!   (by value, zero-copy, two-range `writemsg`, fenced behind held sends) and reads it back
//!   three ways.
//! * **Atomics**: every lane fetch-adds a 64-bit, a 32-bit (wrapping), a 128-bit (carrying) and
//!   a double counter on device 0, adds to a 64-bit sum without fetching, reads counters while
//!   they change, and increments a 64-bit and a 128-bit word with ATOMIC_READ + CSWAP loops.
//!   Totals are exact, every fetched old value is seen exactly once, no read is torn, and the
//!   canaries between the counters are untouched.
//! * **Registration churn**: regions on device 1 are registered, written, raced against their
//!   own deregistration, then used with their dead keys: every such access completes `Access`
//!   and changes nothing, nothing lands after the deregistration returned, and keys are never
//!   handed out twice.
//! * **Endpoint flapping**: an endpoint on device 2 is closed and reopened `FLAP_ROUNDS` times
//!   while two peers send to it and write RMA through it; their requests complete `Ok`,
//!   `AddrNotAvail` or `PeerGone`, never hang, and no message reaches a later incarnation.
//! * **Guest churn**: device 3's guest comes and goes: in-process rounds drop their domain in
//!   the middle of traffic, child-process rounds (this test binary re-run as
//!   `stress_child_guest`) are SIGKILLed. It sends to a sink on device 0, fetch-adds a counter
//!   there and receives from a sender on device 1. Survivors' data stay intact, their requests
//!   complete, a held send of a vanished guest is never delivered, and the guest's counter ends
//!   between its acknowledged and its posted increments.
//!
//! Every loop is bounded in count, every wait by `STALL`, new work stops after `SOFT_BUDGET`,
//! and the body runs under a watchdog that turns a deadlock into a failure listing what each
//! thread was doing. Nothing about timing is asserted.
//!
//! Found so far: with the data-plane poller the device could strand a request forever when a
//! kick raced the poller handing the device back (`lone_synchronous_requests_are_never_stranded`
//! at the end of the file, now fixed in the device and kept as a regression test).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use vfabric::proto::{atomic_op as op, datatype as dt};
use vfabric::{
    fi, AddressVector, AtomicMsg, BindFlags, CompletionQueue, Counter, CqAttr, CqEntry, CqErrEntry,
    Domain, DomainAttr, Endpoint, EpAttr, Error, FabricAddr, FiAddr, Iov, MemoryRegion, MrAttr,
    Msg, RmaIov, RmaMsg, SharedBuf, Status, TaggedMsg, WaitMode, FI_ADDR_UNSPEC,
};

mod common;
use common::Rig;

/// The whole body must finish within this, or the test fails listing every thread's state.
const WATCHDOG: Duration = Duration::from_secs(60);
/// A thread that sees nothing happen for this long while it waits reports a hang.
const STALL: Duration = Duration::from_secs(25);
/// After this, threads start no new work (the counts below normally end them much earlier).
const SOFT_BUDGET: Duration = Duration::from_secs(12);

const RW: u64 = fi::REMOTE_READ | fi::REMOTE_WRITE;
const MAX_MSG: usize = 256 << 10;
/// vfabricd's default eager threshold (sizes are chosen around it).
const EAGER: usize = 16 << 10;
/// Eagerly buffered bytes per destination device: small, so that backpressure holds sends.
const MAX_UNEXPECTED: u64 = 128 << 10;
/// Message header: magic, source, incarnation, sequence, length, destination (device, ep,
/// generation).
const HDR: usize = 32;
const MAGIC: u32 = 0x5354_5253;
/// Receive buffers: a maximal message plus room for guard bytes.
const RX_SLOT: usize = MAX_MSG + 256;
const GUARD_BYTE: u8 = 0xEE;

// Ring lanes.
const RING_DEVS: [usize; 6] = [0, 1, 2, 2, 1, 0];
const LANE_MSGS: u32 = 480;
const TX_WINDOW: usize = 6;
const RX_WINDOW: usize = 6;
const RING_SLOT: usize = 128 << 10;

// Layout of the atomic region on device 0.
const A_U64: u64 = 0;
const A_CANARY1: u64 = 8;
const A_U32: u64 = 16;
const A_CANARY2: u64 = 20;
const A_SUM: u64 = 24;
const A_U128: u64 = 32;
const A_F64: u64 = 48;
const A_CHURN: u64 = 56;
const A_CHILD: u64 = 64;
const A_CAS: u64 = 72;
const A_CANARY3: u64 = 80;
const A_CAS128: u64 = 96;
const A_CANARY4: u64 = 112;
const CANARY64: u64 = 0xC0FF_EE00_DEAD_BEEF;
const CANARY32: u32 = 0x5AFE_C0DE;
const U32_START: u32 = u32::MAX - 40;
const U128_START: u128 = (1u128 << 64) - 40;
const F64_START: f64 = 1000.0;
/// What the 128-bit CSWAP loop adds: both halves change together.
const CAS128_STEP: u128 = (1 << 64) | 1;
/// At most this many atomic rounds in all (one per lane every fourth message).
const MAX_ROUNDS: u128 = RING_DEVS.len() as u128 * (LANE_MSGS as u128 / 4 + 1);

// Endpoint flapping.
const FLAP_ROUNDS: u32 = 14;
const FLAP_SLOT: usize = 64 << 10;
const FLAP_TAG: u64 = 0xF1A9;
const FLAP_SRC: u32 = 10;

// Registration churn.
const MR_ITERS: u64 = 80;
const MR_GUARD: usize = 4096;

// Guest churn.
const GUEST_ROUNDS: u32 = 8;
const GUEST_SRC: u32 = 100;
const CHURN_SENDER_SRC: u32 = 50;
const CHURN_TAG: u64 = 0xC4;
const ORPHAN_TAG: u64 = 0x0FA7;
const ORPHAN_LEN: usize = 100 << 10;
const CHILD_ENV: &str = "VFABRIC_STRESS_CHILD";
const CHILD_READY: &str = "STRESS-CHILD-READY ";
const CHILD_MAX_ATOMICS: u64 = 4000;
const CHILD_LIFETIME: Duration = Duration::from_secs(15);

/// TX contexts with this bit are RMA or atomic operations, waited for one by one; the others
/// are sends, retired as they complete.
const OP: u64 = 1 << 63;

const ABORTED: &str = "stopped because another stress thread failed";

// ------------------------------------------------------------------------------------------
// Control: abort flag, status board, watchdog, thread crew
// ------------------------------------------------------------------------------------------

struct Ctl {
    abort: AtomicBool,
    board: Mutex<BTreeMap<String, String>>,
    soft_end: Instant,
}

impl Ctl {
    fn new() -> Arc<Ctl> {
        Arc::new(Ctl {
            abort: AtomicBool::new(false),
            board: Mutex::new(BTreeMap::new()),
            soft_end: Instant::now() + SOFT_BUDGET,
        })
    }
    /// Record what thread `who` is doing (shown if the watchdog fires).
    fn status(&self, who: &str, what: String) {
        if let Ok(mut b) = self.board.lock() {
            b.insert(who.to_owned(), what);
        }
    }
    /// Stop this thread if another one failed.
    fn check(&self) {
        if self.abort.load(SeqCst) {
            panic!("{ABORTED}");
        }
    }
    fn out_of_time(&self) -> bool {
        Instant::now() >= self.soft_end
    }
    fn dump(&self) -> String {
        match self.board.lock() {
            Ok(b) => b.iter().map(|(k, v)| format!("  {k}: {v}\n")).collect(),
            Err(_) => "  (status board poisoned)\n".into(),
        }
    }
}

/// Run `body` on its own thread; fail with every thread's last status if it has not finished
/// after `WATCHDOG` (the stuck threads are left behind; the test process exits anyway).
fn with_watchdog(name: &str, body: impl FnOnce(&Ctl) + Send + 'static) {
    let ctl = Ctl::new();
    let c = ctl.clone();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let h = std::thread::Builder::new()
        .name(format!("{name}-body"))
        .spawn(move || {
            let _done = done_tx; // dropped when the body returns or unwinds
            body(&c);
        })
        .unwrap();
    match done_rx.recv_timeout(WATCHDOG) {
        Err(mpsc::RecvTimeoutError::Timeout) => {
            ctl.abort.store(true, SeqCst);
            panic!(
                "{name}: not finished after {WATCHDOG:?} (deadlock or lost completion). \
                 Last status of each thread:\n{}",
                ctl.dump()
            );
        }
        _ => {
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p);
            }
        }
    }
}

/// Sets the abort flag (and marks its thread on the board) when its thread unwinds.
struct AbortOnPanic<'a>(&'a Ctl, &'a str);

impl Drop for AbortOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.abort.store(true, SeqCst);
            self.0
                .status(self.1, "FAILED (its panic message is above)".into());
        }
    }
}

type Job<'env> = (String, Box<dyn FnOnce() + Send + 'env>);

/// Run every job on its own scoped thread; a failure stops the others; report the failures
/// (the first real ones, not the threads stopped because of them).
fn run_crew<'env>(ctl: &'env Ctl, jobs: Vec<Job<'env>>) {
    let failures: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = jobs
            .into_iter()
            .map(|(name, f)| {
                let h = std::thread::Builder::new()
                    .name(name.clone())
                    .spawn_scoped(s, {
                        let name = name.clone();
                        move || {
                            let _g = AbortOnPanic(ctl, &name);
                            f();
                        }
                    })
                    .unwrap();
                (name, h)
            })
            .collect();
        hs.into_iter()
            .filter_map(|(name, h)| {
                h.join()
                    .err()
                    .map(|p| format!("{name}: {}", panic_text(&*p)))
            })
            .collect()
    });
    let real: Vec<&String> = failures.iter().filter(|m| !m.contains(ABORTED)).collect();
    if !real.is_empty() {
        let list: Vec<&str> = real.iter().map(|s| s.as_str()).collect();
        panic!("stress failed:\n{}", list.join("\n"));
    }
    assert!(
        failures.is_empty(),
        "stress failed:\n{}",
        failures.join("\n")
    );
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic)".into()
    }
}

/// Fails a wait that sees no progress for `STALL`.
struct Stall<'a> {
    ctl: &'a Ctl,
    who: &'a str,
    /// The domain whose state a failure reports.
    dom: Option<&'a Domain>,
    last: Instant,
}

impl<'a> Stall<'a> {
    fn new(ctl: &'a Ctl, who: &'a str) -> Self {
        Self {
            ctl,
            who,
            dom: None,
            last: Instant::now(),
        }
    }
    fn on(ctl: &'a Ctl, who: &'a str, dom: &'a Domain) -> Self {
        Self {
            dom: Some(dom),
            ..Self::new(ctl, who)
        }
    }
    fn progress(&mut self) {
        self.last = Instant::now();
    }
    fn idle(&self, what: impl FnOnce() -> String) {
        self.ctl.check();
        if self.last.elapsed() > STALL {
            let dom = self.dom.map_or(String::new(), |d| {
                format!(
                    "; domain: {} requests in flight, {:?}",
                    d.requests_in_flight(),
                    d.stats()
                )
            });
            panic!(
                "{}: nothing happened for {STALL:?} while {}{dom}",
                self.who,
                what()
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// CQs, posting, objects
// ------------------------------------------------------------------------------------------

type Ev = Result<CqEntry, CqErrEntry>;

fn ev_context(e: &Ev) -> u64 {
    match e {
        Ok(c) => c.context,
        Err(c) => c.context,
    }
}

/// One bounded look at a CQ (a few milliseconds at most); appends what arrived.
fn poll(cq: &CompletionQueue, out: &mut Vec<Ev>) -> bool {
    let mut v = Vec::new();
    let blocking = cq.attr().wait == WaitMode::Blocking;
    let r = if blocking {
        cq.sread(&mut v, 32, Some(Duration::from_millis(5)))
    } else {
        cq.read(&mut v, 32)
    };
    let got = match r {
        Ok(_) => {
            out.extend(v.into_iter().map(Ok));
            true
        }
        Err(Error::Again) | Err(Error::Timeout) => false,
        Err(Error::Avail) => {
            out.push(Err(cq.readerr().expect("error entry at the CQ head")));
            true
        }
        Err(e) => panic!("CQ read failed: {e}"),
    };
    if !got && !blocking {
        std::thread::yield_now();
    }
    got
}

/// Post with `f`, retrying while the ring or the bounce memory is full.
fn post(
    ctl: &Ctl,
    dom: &Domain,
    what: impl Fn() -> String,
    mut f: impl FnMut() -> vfabric::Result<()>,
) {
    let start = Instant::now();
    loop {
        match f() {
            Ok(()) => return,
            Err(Error::Again) => {
                ctl.check();
                let _ = dom.progress();
                assert!(
                    start.elapsed() < STALL,
                    "{}: still EAGAIN after {STALL:?}",
                    what()
                );
                std::thread::yield_now();
            }
            Err(e) => panic!("{}: post failed: {e}", what()),
        }
    }
}

/// An endpoint with its own TX and RX CQs and AV.
struct Node {
    ep: Endpoint,
    tx: CompletionQueue,
    rx: CompletionQueue,
    av: AddressVector,
}

fn node(d: &Domain, wait: WaitMode) -> Node {
    let tx = d.cq_open(CqAttr { size: 256, wait }).unwrap();
    let rx = d.cq_open(CqAttr { size: 256, wait }).unwrap();
    let av = d.av_open().unwrap();
    let ep = d.endpoint(EpAttr::default()).unwrap();
    ep.bind_cq(&tx, BindFlags::TRANSMIT).unwrap();
    ep.bind_cq(&rx, BindFlags::RECV).unwrap();
    ep.bind_av(&av).unwrap();
    ep.enable().unwrap();
    Node { ep, tx, rx, av }
}

fn wait_mode(blocking: bool) -> WaitMode {
    if blocking {
        WaitMode::Blocking
    } else {
        WaitMode::None
    }
}

fn domain_attr() -> DomainAttr {
    DomainAttr {
        mem_bytes: 64 << 20,
        control_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

/// Connect to `path`, retrying while the device still serves a previous guest.
fn open_retry(ctl: Option<&Ctl>, path: &Path) -> Domain {
    let start = Instant::now();
    loop {
        if let Some(c) = ctl {
            c.check();
        }
        let attr = DomainAttr {
            mem_bytes: 32 << 20,
            control_timeout: Duration::from_secs(1),
            ..Default::default()
        };
        match Domain::open(path, attr) {
            Ok(d) => return d,
            Err(e) => {
                assert!(
                    start.elapsed() < STALL,
                    "{} still refuses a new guest after {STALL:?}: {e}",
                    path.display()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Data patterns and message identity
// ------------------------------------------------------------------------------------------

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fill_pattern(buf: &mut [u8], seed: u64) {
    for (k, chunk) in buf.chunks_mut(8).enumerate() {
        let w = mix(seed ^ (k as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
        chunk.copy_from_slice(&w.to_le_bytes()[..chunk.len()]);
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(&mut v, seed);
    v
}

/// (device, endpoint id, generation) of an address: what a message header records.
fn ep_key(a: FabricAddr) -> (u32, u32, u32) {
    (u32::from(a.device()), a.ep, a.generation)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MsgId {
    src: u32,
    inc: u32,
    seq: u32,
    len: u32,
    to: (u32, u32, u32),
}

impl MsgId {
    fn new(src: u32, inc: u32, seq: u32, len: usize, to: FabricAddr) -> Self {
        Self {
            src,
            inc,
            seq,
            len: len as u32,
            to: ep_key(to),
        }
    }
    fn seed(&self) -> u64 {
        mix(mix(mix(u64::from(self.src)) ^ u64::from(self.inc)) ^ u64::from(self.seq))
            ^ u64::from(self.len)
    }
    fn header(&self) -> [u8; HDR] {
        let mut h = [0u8; HDR];
        let f = [
            MAGIC, self.src, self.inc, self.seq, self.len, self.to.0, self.to.1, self.to.2,
        ];
        for (i, v) in f.iter().enumerate() {
            h[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        h
    }
    /// The message: the pattern of its seed, its header over the first bytes.
    fn bytes(&self) -> Vec<u8> {
        let mut b = pattern(self.len as usize, self.seed());
        let n = b.len().min(HDR);
        b[..n].copy_from_slice(&self.header()[..n]);
        b
    }
    fn parse(b: &[u8]) -> Option<MsgId> {
        if b.len() < HDR {
            return None;
        }
        let f = |i: usize| u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().unwrap());
        (f(0) == MAGIC).then(|| MsgId {
            src: f(1),
            inc: f(2),
            seq: f(3),
            len: f(4),
            to: (f(5), f(6), f(7)),
        })
    }
}

fn check_bytes(what: &dyn Fn() -> String, want: &[u8], got: &[u8]) {
    if want == got {
        return;
    }
    let first = want.iter().zip(got).position(|(a, b)| a != b);
    let differ = want.iter().zip(got).filter(|(a, b)| a != b).count();
    panic!(
        "{}: corrupted data: {} bytes expected, {} present, first difference at {first:?}, \
         {differ} bytes differ; header found: {:?}",
        what(),
        want.len(),
        got.len(),
        MsgId::parse(got)
    );
}

fn check_guard(what: &dyn Fn() -> String, bytes: &[u8]) {
    if let Some(i) = bytes.iter().position(|&b| b != GUARD_BYTE) {
        panic!(
            "{}: guard byte {i} after/between receive buffers was overwritten",
            what()
        );
    }
}

/// A message size between 0 B and `MAX_MSG`: inline (≤ 224), eager, around the eager
/// threshold, held.
fn msg_len(r: u64) -> usize {
    let v = (r >> 8) as usize;
    match r % 20 {
        0 => 0,
        1 => 1 + v % (HDR - 1),
        2..=5 => v % 225,
        6 => [223, 224, 225, 256, 257][v % 5],
        7..=9 => 225 + v % (EAGER - 225),
        10 => [EAGER - 1, EAGER, EAGER + 1][v % 3],
        11..=13 => EAGER + 1 + v % (64 << 10),
        14..=18 => (64 << 10) + v % (MAX_MSG - (64 << 10) + 1),
        _ => MAX_MSG,
    }
}

/// A size for messages whose receiver parses the header: at least `HDR`, up to `max`.
fn hdr_len(r: u64, max: usize) -> usize {
    let v = (r >> 8) as usize;
    match r % 4 {
        0 => HDR + v % 200,
        1 => HDR + v % EAGER,
        _ => HDR + v % (max - HDR + 1),
    }
}

// ------------------------------------------------------------------------------------------
// Ring lanes: messages, RMA and atomics
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum TxMode {
    Bytes,
    Shared,
    Data,
    Iov,
    Inject,
}

#[derive(Clone, Copy, Debug)]
enum RxMode {
    Vec,
    Shared,
    Raw,
    Iov,
}

/// What both ends of a lane know about message `seq`.
#[derive(Clone, Copy, Debug)]
struct Plan {
    len: usize,
    tagged: bool,
    tx: TxMode,
    rx: RxMode,
    /// Receive buffer length (≥ `len`).
    cap: usize,
}

fn plan(lane: u32, seq: u32, inject_max: usize) -> Plan {
    let r = mix((u64::from(lane) << 32) | u64::from(seq) | 0x5EED_0000_0000_0000);
    let len = msg_len(r);
    let r2 = mix(r);
    let tx = match r2 % 5 {
        0 => TxMode::Bytes,
        1 => TxMode::Shared,
        2 => TxMode::Data,
        3 => TxMode::Iov,
        _ if len <= inject_max => TxMode::Inject,
        _ => TxMode::Bytes,
    };
    let rx = match (r2 >> 8) % 4 {
        0 => RxMode::Vec,
        1 => RxMode::Shared,
        2 => RxMode::Raw,
        _ => RxMode::Iov,
    };
    Plan {
        len,
        tagged: (r2 >> 16) & 1 == 1,
        tx,
        rx,
        cap: len + [0, 1, 100][((r2 >> 24) % 3) as usize],
    }
}

fn ring_tag(lane: u32, seq: u32) -> u64 {
    (1 << 62) | (u64::from(lane) << 32) | u64::from(seq)
}

fn ring_data(lane: u32, seq: u32) -> u64 {
    0xDA7A_0000_0000_0000 | (u64::from(lane) << 32) | u64::from(seq)
}

/// Fetched old values and counts of one or more lanes.
#[derive(Default)]
struct AtomResults {
    u64s: Vec<u64>,
    u32s: Vec<u32>,
    u128s: Vec<u128>,
    f64s: Vec<f64>,
    sums: u64,
    cas: u64,
    cas128: u64,
    cas_retries: u64,
}

impl AtomResults {
    fn merge(&mut self, o: AtomResults) {
        self.u64s.extend(o.u64s);
        self.u32s.extend(o.u32s);
        self.u128s.extend(o.u128s);
        self.f64s.extend(o.f64s);
        self.sums += o.sums;
        self.cas += o.cas;
        self.cas128 += o.cas128;
        self.cas_retries += o.cas_retries;
    }
}

#[derive(Clone, Copy)]
struct AtomTarget {
    addr: FabricAddr,
    base: u64,
    key: u64,
    u128_ok: bool,
    u128_cas_ok: bool,
    f64_ok: bool,
}

/// AV indexes of a ring endpoint.
#[derive(Clone, Copy)]
struct Peers {
    down: FiAddr,
    up: FiAddr,
    atom: FiAddr,
}

/// The last RMA write of a lane: (offset in the target region, length, pattern seed).
type LastWrite = Option<(usize, usize, u64)>;

struct Ring<'a> {
    ctl: &'a Ctl,
    doms: &'a [Domain],
    nodes: &'a [Node],
    peers: &'a [Peers],
    totals: &'a [AtomicU32],
    regions: &'a [MemoryRegion],
    atom: AtomTarget,
    inject_max: usize,
    results: &'a Mutex<AtomResults>,
    last_write: &'a Mutex<Vec<LastWrite>>,
    received: &'a Mutex<Vec<(u32, u32)>>,
}

/// Completions of one TX CQ: sends retire as they come, other operations wait in `ops`.
struct Tx<'a> {
    who: &'a str,
    ctl: &'a Ctl,
    dom: &'a Domain,
    cq: &'a CompletionQueue,
    /// Sends in flight: context -> (send slot, length).
    sends: HashMap<u64, (usize, usize)>,
    free: Vec<usize>,
    ops: HashMap<u64, Ev>,
    /// Error statuses a send may complete with (its peer closing or vanishing).
    tolerated: &'a [Status],
    sent_ok: u64,
    sent_err: u64,
    evs: Vec<Ev>,
    next_op: u64,
}

impl<'a> Tx<'a> {
    /// A fresh operation context.
    fn op_ctx(&mut self) -> u64 {
        self.next_op += 1;
        OP | (7 << 40) | self.next_op
    }

    fn new(
        who: &'a str,
        ctl: &'a Ctl,
        dom: &'a Domain,
        cq: &'a CompletionQueue,
        slots: usize,
        tolerated: &'a [Status],
    ) -> Self {
        Self {
            who,
            ctl,
            dom,
            cq,
            sends: HashMap::new(),
            free: (0..slots).rev().collect(),
            ops: HashMap::new(),
            tolerated,
            sent_ok: 0,
            sent_err: 0,
            evs: Vec::new(),
            next_op: 0,
        }
    }

    fn pump(&mut self) -> bool {
        let got = poll(self.cq, &mut self.evs);
        for e in std::mem::take(&mut self.evs) {
            let ctx = ev_context(&e);
            if ctx & OP != 0 {
                let who = self.who;
                if let Some(prev) = self.ops.insert(ctx, e) {
                    panic!("{who}: two completions for operation {ctx:#x}: {prev:?}");
                }
                continue;
            }
            let Some((slot, len)) = self.sends.remove(&ctx) else {
                panic!(
                    "{}: completion for an unknown send {ctx:#x}: {e:?}",
                    self.who
                );
            };
            self.free.push(slot);
            match e {
                Ok(c) => {
                    assert!(c.flags & fi::SEND != 0, "{}: send flags {c:?}", self.who);
                    assert_eq!(c.len, len, "{}: send {ctx} length", self.who);
                    self.sent_ok += 1;
                }
                Err(c) if self.tolerated.contains(&c.status) => self.sent_err += 1,
                Err(c) => panic!("{}: send {ctx} failed: {c:?}", self.who),
            }
        }
        got
    }

    /// A free send slot (waits for a send to complete if all are in use).
    fn slot(&mut self) -> usize {
        let mut st = Stall::on(self.ctl, self.who, self.dom);
        loop {
            if let Some(s) = self.free.pop() {
                return s;
            }
            if self.pump() {
                st.progress();
            } else {
                let n = self.sends.len();
                let mut k: Vec<_> = self.sends.keys().copied().collect();
                k.sort_unstable();
                st.idle(|| format!("waiting for one of {n} sends to complete: {k:?}"));
            }
        }
    }

    fn wait(&mut self, ctx: u64) -> Ev {
        let mut st = Stall::on(self.ctl, self.who, self.dom);
        loop {
            if let Some(e) = self.ops.remove(&ctx) {
                return e;
            }
            if self.pump() {
                st.progress();
            } else {
                let n = self.sends.len();
                st.idle(|| format!("waiting for operation {ctx:#x} ({n} sends in flight)"));
            }
        }
    }

    fn drain(&mut self) {
        let mut st = Stall::on(self.ctl, self.who, self.dom);
        while !self.sends.is_empty() {
            if self.pump() {
                st.progress();
            } else {
                let mut k: Vec<_> = self.sends.keys().copied().collect();
                k.sort_unstable();
                st.idle(|| format!("waiting for the last sends {k:?}"));
            }
        }
    }
}

fn ring_tx(g: &Ring<'_>, w: usize) {
    let ctl = g.ctl;
    let who = format!("ring{w}-tx");
    let me = &g.nodes[w];
    let down = (w + 1) % RING_DEVS.len();
    let dom = &g.doms[RING_DEVS[w]];
    let p = g.peers[w];
    let to = g.nodes[down].ep.name();
    let lane = w as u32;
    let mut slots: Vec<SharedBuf> = (0..TX_WINDOW)
        .map(|_| dom.alloc_buffer(MAX_MSG).unwrap())
        .collect();
    let mut rma_src = dom.alloc_buffer(RING_SLOT).unwrap();
    let mut rma_dst = dom.alloc_buffer(RING_SLOT + 64).unwrap();
    let region = &g.regions[RING_DEVS[down]];
    let mut tx = Tx::new(&who, ctl, dom, &me.tx, TX_WINDOW, &[]);
    let mut res = AtomResults::default();
    let mut sent = 0;
    for seq in 0..LANE_MSGS {
        if ctl.out_of_time() {
            break;
        }
        ctl.check();
        let pl = plan(lane, seq, g.inject_max);
        ctl.status(&who, format!("sending {seq}: {pl:?}"));
        let bytes = MsgId::new(lane, 0, seq, pl.len, to).bytes();
        let tag = ring_tag(lane, seq);
        let data = ring_data(lane, seq);
        let what = || format!("{who}: send {seq} {pl:?}");
        if let TxMode::Inject = pl.tx {
            post(ctl, dom, what, || {
                if pl.tagged {
                    me.ep.tinject(&bytes, p.down, tag)
                } else {
                    me.ep.inject(&bytes, p.down)
                }
            });
        } else {
            let s = tx.slot();
            if matches!(pl.tx, TxMode::Shared | TxMode::Iov) {
                // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
                (unsafe { slots[s].as_mut_slice() })[..pl.len].copy_from_slice(&bytes);
            }
            let buf = &slots[s];
            let ctx = u64::from(seq);
            tx.sends.insert(ctx, (s, pl.len));
            let split = pl.len / 3;
            // DELIVERY_COMPLETE sends are held until matched, even small ones.
            let iov_flags = match seq % 4 {
                1 => fi::DELIVERY_COMPLETE,
                3 => fi::TRANSMIT_COMPLETE,
                _ => 0,
            };
            post(ctl, dom, what, || match (pl.tx, pl.tagged) {
                (TxMode::Bytes, false) => me.ep.send(&bytes, p.down, ctx),
                (TxMode::Bytes, true) => me.ep.tsend(&bytes, p.down, tag, ctx),
                (TxMode::Shared, false) => me.ep.send_buf(buf, 0..pl.len, p.down, ctx),
                (TxMode::Shared, true) => me.ep.tsend_buf(buf, 0..pl.len, p.down, tag, ctx),
                (TxMode::Data, false) => me.ep.senddata(&bytes, data, p.down, ctx),
                (TxMode::Data, true) => me.ep.tsenddata(&bytes, data, p.down, tag, ctx),
                (TxMode::Iov, tagged) => {
                    // Zero-copy pieces of a shared buffer, or a shared piece and private bytes.
                    let iov = if seq.is_multiple_of(2) {
                        [Iov::shared(buf, 0..split), Iov::shared(buf, split..pl.len)]
                    } else {
                        [Iov::shared(buf, 0..split), Iov::bytes(&bytes[split..])]
                    };
                    if tagged {
                        let m = TaggedMsg {
                            iov: &iov,
                            addr: p.down,
                            tag,
                            ignore: 0,
                            context: ctx,
                            data: 0,
                        };
                        me.ep.tsendmsg(&m, iov_flags)
                    } else {
                        let m = Msg {
                            iov: &iov,
                            addr: p.down,
                            context: ctx,
                            data: 0,
                        };
                        me.ep.sendmsg(&m, iov_flags)
                    }
                }
                (TxMode::Inject, _) => unreachable!(),
            });
        }
        sent = seq + 1;
        if seq % 3 == 1 {
            ctl.status(&who, format!("RMA after send {seq}"));
            ring_rma(g, w, &mut tx, seq, &mut rma_src, &mut rma_dst, region);
        }
        if seq % 4 == 2 {
            ctl.status(&who, format!("atomics after send {seq}"));
            ring_atomics(g, w, &mut tx, seq, &mut res);
        }
    }
    g.totals[w].store(sent, SeqCst);
    ctl.status(&who, format!("waiting for the last sends of {sent}"));
    tx.drain();
    ctl.status(&who, format!("done: {sent} messages"));
    g.results.lock().unwrap().merge(res);
}

fn ring_rma(
    g: &Ring<'_>,
    w: usize,
    tx: &mut Tx<'_>,
    n: u32,
    src: &mut SharedBuf,
    dst: &mut SharedBuf,
    region: &MemoryRegion,
) {
    let who = tx.who;
    let me = &g.nodes[w];
    let to = g.peers[w].down;
    let r = mix((w as u64) << 40 | u64::from(n) | 0xAA00_0000_0000);
    let v = (r >> 8) as usize;
    let len = match r % 4 {
        0 => v % 64,
        1 => v % 4096,
        _ => v % (RING_SLOT + 1),
    };
    let off = (r >> 32) as usize % (RING_SLOT - len + 1);
    let seed = mix(r);
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    fill_pattern(&mut unsafe { src.as_mut_slice() }[..len], seed);
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    let data = unsafe { src.as_slice() }[..len].to_vec();
    let remote = region.base() + (w * RING_SLOT + off) as u64;
    let key = region.key();
    let wctx = OP | (1 << 40) | u64::from(n);
    let (a, b) = (len / 3, len / 2);
    let what = || format!("{who}: RMA write {n} of {len} B at +{off}");
    post(g.ctl, &g.doms[RING_DEVS[w]], what, || match n % 4 {
        0 => me.ep.write(&data, to, remote, key, wctx),
        1 => me.ep.write_buf(src, 0..len, to, remote, key, wctx),
        m => {
            // Local and remote splits at different points; fenced behind held sends.
            let iov = [Iov::shared(src, 0..a), Iov::shared(src, a..len)];
            let rma = [
                RmaIov {
                    addr: remote,
                    len: b as u64,
                    key,
                },
                RmaIov {
                    addr: remote + b as u64,
                    len: (len - b) as u64,
                    key,
                },
            ];
            let msg = RmaMsg {
                iov: &iov,
                addr: to,
                rma_iov: &rma,
                context: wctx,
                data: 0,
            };
            let flags = if m == 2 {
                fi::DELIVERY_COMPLETE
            } else {
                fi::FENCE
            };
            me.ep.writemsg(&msg, flags)
        }
    });
    match tx.wait(wctx) {
        Ok(c) => assert_eq!(c.len, len, "{}: write length", what()),
        Err(e) => panic!("{}: failed: {e:?}", what()),
    }
    // Read it back.
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    unsafe { dst.as_mut_slice() }.fill(0xA5);
    let rctx = OP | (2 << 40) | u64::from(n);
    let c = len / 2;
    let what = || format!("{who}: RMA read {n} of {len} B at +{off}");
    post(g.ctl, &g.doms[RING_DEVS[w]], what, || match n % 3 {
        0 => me.ep.read_buf(dst, 0..len, to, remote, key, rctx),
        1 => me.ep.read_vec(len, to, remote, key, rctx),
        _ => {
            let iov = [Iov::shared(dst, 0..c), Iov::shared(dst, c + 64..len + 64)];
            let rma = [RmaIov {
                addr: remote,
                len: len as u64,
                key,
            }];
            let msg = RmaMsg {
                iov: &iov,
                addr: to,
                rma_iov: &rma,
                context: rctx,
                data: 0,
            };
            me.ep.readmsg(&msg, 0)
        }
    });
    let entry = match tx.wait(rctx) {
        Ok(e) => e,
        Err(e) => panic!("{}: failed: {e:?}", what()),
    };
    assert_eq!(entry.len, len, "{}: read length", what());
    let got = match n % 3 {
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        0 => (unsafe { dst.as_slice() })[..len].to_vec(),
        1 => entry.buf.clone().unwrap_or_default(),
        _ => {
            // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
            let d = unsafe { dst.as_slice() };
            assert!(
                d[c..c + 64].iter().all(|&x| x == 0xA5),
                "{}: read wrote between its iov pieces",
                what()
            );
            let mut v = d[..c].to_vec();
            v.extend_from_slice(&d[c + 64..len + 64]);
            v
        }
    };
    check_bytes(&what, &data, &got);
    g.last_write.lock().unwrap()[w] = Some((w * RING_SLOT + off, len, seed));
}

fn fetched<const N: usize>(who: &str, what: &str, e: Ev) -> [u8; N] {
    match e {
        Ok(c) => {
            let b = c
                .buf
                .unwrap_or_else(|| panic!("{who}: {what}: no fetched value"));
            b.as_slice()
                .try_into()
                .unwrap_or_else(|_| panic!("{who}: {what}: fetched {} bytes", b.len()))
        }
        Err(e) => panic!("{who}: {what} failed: {e:?}"),
    }
}

/// An unsigned little-endian value of `size` bytes.
fn fetched_uint(who: &str, what: &str, e: Ev, size: usize) -> u128 {
    let b: [u8; 16] = match e {
        Ok(c) => {
            let b = c.buf.unwrap_or_default();
            assert_eq!(b.len(), size, "{who}: {what}: fetched {} bytes", b.len());
            let mut x = [0u8; 16];
            x[..size].copy_from_slice(&b);
            x
        }
        Err(e) => panic!("{who}: {what} failed: {e:?}"),
    };
    u128::from_le_bytes(b)
}

/// Add `step` to the `size`-byte word at `off` with an ATOMIC_READ + CSWAP loop; returns the
/// number of failed attempts. Every value seen must be a multiple of `step` (a torn read or a
/// torn swap of a 128-bit word is not).
fn cas_increment(
    g: &Ring<'_>,
    w: usize,
    tx: &mut Tx<'_>,
    n: u32,
    word: (u64, u8, usize, u128),
) -> u64 {
    let (off, ty, size, step) = word;
    let who = tx.who;
    let ep = &g.nodes[w].ep;
    let dom = &g.doms[RING_DEVS[w]];
    let at = g.peers[w].atom;
    let what = || format!("{who}: CSWAP increment {n} of the {size}-byte word at +{off}");
    let enc = |v: u128| v.to_le_bytes()[..size].to_vec();
    let plausible = |v: u128| v.is_multiple_of(step) && v / step <= MAX_ROUNDS;
    for attempt in 0u64..2000 {
        let rctx = tx.op_ctx();
        let read = AtomicMsg {
            operands: &[],
            addr: at,
            remote_addr: g.atom.base + off,
            key: g.atom.key,
            datatype: ty,
            op: op::ATOMIC_READ,
            count: 1,
            context: rctx,
        };
        post(g.ctl, dom, what, || ep.fetch_atomic(&read, &[]));
        let v = fetched_uint(who, "atomic read", tx.wait(rctx), size);
        assert!(
            plausible(v),
            "{}: read a torn or impossible value {v:#x}",
            what()
        );
        let (next, cmp) = (enc(v + step), enc(v));
        let cctx = tx.op_ctx();
        let m = AtomicMsg {
            operands: &next,
            op: op::CSWAP,
            context: cctx,
            ..read
        };
        post(g.ctl, dom, what, || ep.compare_atomic(&m, &cmp, &[]));
        let old = fetched_uint(who, "cswap", tx.wait(cctx), size);
        assert!(
            plausible(old),
            "{}: CSWAP fetched a torn or impossible value {old:#x}",
            what()
        );
        if old == v {
            return attempt;
        }
        g.ctl.check();
    }
    panic!("{}: never succeeded in 2000 attempts", what());
}

fn ring_atomics(g: &Ring<'_>, w: usize, tx: &mut Tx<'_>, n: u32, res: &mut AtomResults) {
    let who = tx.who;
    let ep = &g.nodes[w].ep;
    let dom = &g.doms[RING_DEVS[w]];
    let a = g.atom;
    let at = g.peers[w].atom;
    let ctx = |k: u64| OP | (3 << 40) | (u64::from(n) << 8) | k;
    let msg = |off: u64, ty: u8, o: u8, operands: &'static [u8], k: u64| AtomicMsg {
        operands,
        addr: at,
        remote_addr: a.base + off,
        key: a.key,
        datatype: ty,
        op: o,
        count: 1,
        context: ctx(k),
    };
    const ONE64: [u8; 8] = 1u64.to_le_bytes();
    const THREE64: [u8; 8] = 3u64.to_le_bytes();
    const ONE32: [u8; 4] = 1u32.to_le_bytes();
    const ONE128: [u8; 16] = 1u128.to_le_bytes();
    const ONEF: [u8; 8] = 1.0f64.to_le_bytes();
    let what = || format!("{who}: atomics {n}");
    post(g.ctl, dom, what, || {
        ep.fetch_atomic(&msg(A_U64, dt::UINT64, op::SUM, &ONE64, 0), &[])
    });
    post(g.ctl, dom, what, || {
        ep.fetch_atomic(&msg(A_U32, dt::UINT32, op::SUM, &ONE32, 1), &[])
    });
    if a.u128_ok {
        post(g.ctl, dom, what, || {
            ep.fetch_atomic(&msg(A_U128, dt::UINT128, op::SUM, &ONE128, 2), &[])
        });
    }
    if a.f64_ok {
        post(g.ctl, dom, what, || {
            ep.fetch_atomic(&msg(A_F64, dt::DOUBLE, op::SUM, &ONEF, 3), &[])
        });
    }
    post(g.ctl, dom, what, || {
        ep.atomic(&msg(A_SUM, dt::UINT64, op::SUM, &THREE64, 4))
    });
    res.u64s.push(u64::from_le_bytes(fetched(
        who,
        "fetch-add u64",
        tx.wait(ctx(0)),
    )));
    res.u32s.push(u32::from_le_bytes(fetched(
        who,
        "fetch-add u32",
        tx.wait(ctx(1)),
    )));
    if a.u128_ok {
        res.u128s.push(u128::from_le_bytes(fetched(
            who,
            "fetch-add u128",
            tx.wait(ctx(2)),
        )));
    }
    if a.f64_ok {
        res.f64s.push(f64::from_le_bytes(fetched(
            who,
            "fetch-add double",
            tx.wait(ctx(3)),
        )));
    }
    match tx.wait(ctx(4)) {
        Ok(_) => res.sums += 1,
        Err(e) => panic!("{who}: atomic add failed: {e:?}"),
    }
    // Reads racing the adds: never a torn or impossible value.
    if a.u128_ok {
        let rctx = tx.op_ctx();
        let read = AtomicMsg {
            context: rctx,
            ..msg(A_U128, dt::UINT128, op::ATOMIC_READ, &[], 0)
        };
        post(g.ctl, dom, what, || ep.fetch_atomic(&read, &[]));
        let v = u128::from_le_bytes(fetched(who, "atomic read u128", tx.wait(rctx)));
        assert!(
            v >= U128_START && v - U128_START <= MAX_ROUNDS,
            "{who}: ATOMIC_READ of the 128-bit counter returned {v:#x}: torn or impossible"
        );
    }
    let rctx = tx.op_ctx();
    let read = AtomicMsg {
        context: rctx,
        ..msg(A_U32, dt::UINT32, op::ATOMIC_READ, &[], 0)
    };
    post(g.ctl, dom, what, || ep.fetch_atomic(&read, &[]));
    let v = u32::from_le_bytes(fetched(who, "atomic read u32", tx.wait(rctx)));
    assert!(
        u128::from(v.wrapping_sub(U32_START)) <= MAX_ROUNDS,
        "{who}: ATOMIC_READ of the 32-bit counter returned {v:#x}: impossible"
    );
    // Increments with compare-and-swap loops (bounded: the other lanes do few rounds each).
    res.cas_retries += cas_increment(g, w, tx, n, (A_CAS, dt::UINT64, 8, 1));
    res.cas += 1;
    if a.u128_cas_ok {
        res.cas_retries += cas_increment(g, w, tx, n, (A_CAS128, dt::UINT128, 16, CAS128_STEP));
        res.cas128 += 1;
    }
}

fn ring_rx(g: &Ring<'_>, w: usize) {
    let ctl = g.ctl;
    let who = format!("ring{w}-rx");
    let me = &g.nodes[w];
    let up = (w + RING_DEVS.len() - 1) % RING_DEVS.len();
    let lane = up as u32;
    let dom = &g.doms[RING_DEVS[w]];
    let up_name = g.nodes[up].ep.name();
    let my_name = me.ep.name();
    let up_fi = g.peers[w].up;
    let mut shared: Vec<SharedBuf> = (0..RX_WINDOW)
        .map(|_| dom.alloc_buffer(RX_SLOT).unwrap())
        .collect();
    let mut raw: Vec<Vec<u8>> = (0..RX_WINDOW).map(|_| vec![0u8; RX_SLOT]).collect();
    let mut free: Vec<usize> = (0..RX_WINDOW).rev().collect();
    let mut out: HashMap<u32, (usize, Plan)> = HashMap::new();
    let (mut next, mut received) = (0u32, 0u32);
    let mut evs = Vec::new();
    let mut st = Stall::on(ctl, &who, dom);
    loop {
        let total = g.totals[up].load(SeqCst);
        if received == total {
            break;
        }
        // Phases with a single receive posted let the sender run ahead: its messages arrive
        // unexpected (eagerly buffered, or held when large or under backpressure).
        let window = if (received / 24) % 3 == 1 {
            1
        } else {
            RX_WINDOW
        };
        while next < total && out.len() < window {
            let Some(s) = free.pop() else { break };
            let pl = plan(lane, next, g.inject_max);
            ctl.status(&who, format!("posting receive {next}: {pl:?}"));
            let ctx = u64::from(next);
            let tag = ring_tag(lane, next);
            let what = || format!("{who}: receive {next} {pl:?}");
            // Guard bytes after the receive buffer (and between iov pieces).
            let half = pl.cap / 2;
            match pl.rx {
                RxMode::Vec => {}
                // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
                RxMode::Shared => {
                    (unsafe { shared[s].as_mut_slice() })[pl.cap..pl.cap + 64].fill(GUARD_BYTE)
                }
                RxMode::Raw => raw[s][pl.cap..pl.cap + 64].fill(GUARD_BYTE),
                // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
                RxMode::Iov => {
                    (unsafe { shared[s].as_mut_slice() })[half..pl.cap + 128].fill(GUARD_BYTE)
                }
            }
            let sb = &shared[s];
            let rp = raw[s].as_mut_ptr();
            post(ctl, dom, what, || match (pl.rx, pl.tagged) {
                (RxMode::Vec, false) => me.ep.recv_vec(pl.cap, ctx),
                (RxMode::Vec, true) => me.ep.trecv_vec(pl.cap, tag, 0, ctx),
                (RxMode::Shared, false) => me.ep.recv_buf(sb, 0..pl.cap, ctx),
                (RxMode::Shared, true) => me.ep.trecv_buf(sb, 0..pl.cap, tag, 0, ctx),
                // SAFETY: `raw[s]` is neither touched nor freed until this receive completes
                // (the slot returns to `free` only then; cancelled ones are awaited below).
                (RxMode::Raw, false) => unsafe { me.ep.recv_raw(rp, pl.cap, ctx) },
                // SAFETY: as above.
                (RxMode::Raw, true) => unsafe { me.ep.trecv_raw(rp, pl.cap, tag, 0, ctx) },
                (RxMode::Iov, tagged) => {
                    let iov = [
                        Iov::shared(sb, 0..half),
                        Iov::shared(sb, half + 64..pl.cap + 64),
                    ];
                    if tagged {
                        let m = TaggedMsg {
                            iov: &iov,
                            addr: FI_ADDR_UNSPEC,
                            tag,
                            ignore: 0,
                            context: ctx,
                            data: 0,
                        };
                        me.ep.trecvmsg(&m, 0)
                    } else {
                        let m = Msg {
                            iov: &iov,
                            addr: FI_ADDR_UNSPEC,
                            context: ctx,
                            data: 0,
                        };
                        me.ep.recvmsg(&m, 0)
                    }
                }
            });
            out.insert(next, (s, pl));
            next += 1;
        }
        if poll(&me.rx, &mut evs) {
            st.progress();
        } else {
            let mut pending: Vec<_> = out.keys().copied().collect();
            pending.sort_unstable();
            st.idle(|| {
                format!(
                    "waiting for lane {lane}: {received} of {total} received, receives \
                     {pending:?} posted"
                )
            });
        }
        for e in evs.drain(..) {
            let seq = ev_context(&e) as u32;
            let Some((s, pl)) = out.remove(&seq) else {
                panic!("{who}: completion for a receive never posted: {e:?}");
            };
            let c = match e {
                Ok(c) => c,
                Err(c) => panic!("{who}: receive {seq} ({pl:?}) of lane {lane} failed: {c:?}"),
            };
            let what = || format!("{who}: message {seq} of lane {lane} ({pl:?})");
            assert_eq!(c.len, pl.len, "{}: length", what());
            assert!(c.flags & fi::RECV != 0, "{}: flags {c:?}", what());
            if pl.tagged {
                assert!(c.flags & fi::TAGGED != 0, "{}: flags {c:?}", what());
                assert_eq!(c.tag, ring_tag(lane, seq), "{}: tag", what());
            } else {
                assert!(c.flags & fi::MSG != 0, "{}: flags {c:?}", what());
            }
            if let TxMode::Data = pl.tx {
                assert!(
                    c.flags & fi::REMOTE_CQ_DATA != 0,
                    "{}: no data {c:?}",
                    what()
                );
                assert_eq!(c.data, ring_data(lane, seq), "{}: data", what());
            }
            assert_eq!(c.src, Some(up_name), "{}: source", what());
            assert_eq!(c.src_addr, up_fi, "{}: source AV index", what());
            let got = match pl.rx {
                RxMode::Vec => c.buf.clone().unwrap_or_default(),
                RxMode::Shared => {
                    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
                    let b = unsafe { shared[s].as_slice() };
                    check_guard(&what, &b[pl.cap..pl.cap + 64]);
                    b[..pl.len].to_vec()
                }
                RxMode::Raw => {
                    check_guard(&what, &raw[s][pl.cap..pl.cap + 64]);
                    raw[s][..pl.len].to_vec()
                }
                RxMode::Iov => {
                    let half = pl.cap / 2;
                    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
                    let b = unsafe { shared[s].as_slice() };
                    check_guard(&what, &b[half..half + 64]);
                    check_guard(&what, &b[pl.cap + 64..pl.cap + 128]);
                    let mut v = b[..half.min(pl.len)].to_vec();
                    if pl.len > half {
                        v.extend_from_slice(&b[half + 64..pl.len + 64]);
                    }
                    v
                }
            };
            let want = MsgId::new(lane, 0, seq, pl.len, my_name).bytes();
            check_bytes(&what, &want, &got);
            free.push(s);
            received += 1;
        }
    }
    // Receives posted beyond a sender that stopped early: cancel them.
    let mut canceled = 0;
    let left: Vec<u32> = out.keys().copied().collect();
    for seq in left {
        ctl.status(&who, format!("cancelling receive {seq}"));
        me.ep
            .cancel(u64::from(seq))
            .unwrap_or_else(|e| panic!("{who}: cancel of unmatched receive {seq}: {e}"));
    }
    while !out.is_empty() {
        if poll(&me.rx, &mut evs) {
            st.progress();
        } else {
            st.idle(|| "waiting for cancelled receives".into());
        }
        for e in evs.drain(..) {
            match e {
                Err(c) if c.status == Status::Canceled => {
                    out.remove(&(c.context as u32));
                    canceled += 1;
                }
                other => panic!("{who}: a receive beyond the last message completed: {other:?}"),
            }
        }
    }
    ctl.status(
        &who,
        format!("done: {received} received, {canceled} cancelled"),
    );
    g.received.lock().unwrap()[w] = (received, canceled);
}

// ------------------------------------------------------------------------------------------
// Endpoint flapping
// ------------------------------------------------------------------------------------------

struct Flap {
    target: Mutex<Option<(u32, FabricAddr)>>,
    done: AtomicBool,
    last_write: Mutex<[LastWrite; 2]>,
    delivered: AtomicU64,
    sent_ok: AtomicU64,
    sent_err: AtomicU64,
}

/// Per (source, incarnation, tagged) stream: the last sequence number seen.
type Streams = HashMap<(u32, u32, bool), u32>;

fn check_stream(who: &str, streams: &mut Streams, id: &MsgId, tagged: bool) {
    let k = (id.src, id.inc, tagged);
    if let Some(&last) = streams.get(&k) {
        assert!(
            id.seq > last,
            "{who}: message {} of source {} arrived after {last} (out of order or twice)",
            id.seq,
            id.src
        );
    }
    streams.insert(k, id.seq);
}

/// Check a message received into a `recv_vec`: header, every byte, destination, order.
fn check_headed(who: &str, c: &CqEntry, me: FabricAddr, streams: &mut Streams) -> MsgId {
    let b = c.buf.as_deref().unwrap_or_default();
    let id = MsgId::parse(b).unwrap_or_else(|| {
        panic!(
            "{who}: a message of {} bytes without a valid header: {:?}",
            c.len,
            &b[..b.len().min(HDR)]
        )
    });
    assert_eq!(c.len, id.len as usize, "{who}: length of {id:?}");
    assert_eq!(
        id.to,
        ep_key(me),
        "{who}: message {id:?} addressed to another endpoint was delivered to {me}"
    );
    check_bytes(&|| format!("{who}: {id:?}"), &id.bytes(), b);
    check_stream(who, streams, &id, c.flags & fi::TAGGED != 0);
    id
}

fn flap_target(ctl: &Ctl, dom: &Domain, f: &Flap) {
    let who = "flap-target";
    let mut ctx = 0u64;
    let mut evs = Vec::new();
    for inc in 0..FLAP_ROUNDS {
        if ctl.out_of_time() {
            break;
        }
        ctl.check();
        let n = node(dom, wait_mode(inc.is_multiple_of(2)));
        let me = n.ep.name();
        let mut streams = Streams::new();
        *f.target.lock().unwrap() = Some((inc, me));
        let mut posted = 0usize;
        let post_one = |ctx: &mut u64| {
            *ctx += 1;
            let c = *ctx;
            post(
                ctl,
                dom,
                || format!("{who}: receive"),
                || {
                    if c.is_multiple_of(2) {
                        n.ep.recv_vec(MAX_MSG, c)
                    } else {
                        n.ep.trecv_vec(MAX_MSG, FLAP_TAG, 0, c)
                    }
                },
            );
        };
        for _ in 0..6 {
            post_one(&mut ctx);
            posted += 1;
        }
        let until = Instant::now() + Duration::from_millis(60 + 40 * u64::from(inc % 3));
        let mut got = 0;
        let mut st = Stall::on(ctl, who, dom);
        while Instant::now() < until && got < 60 {
            ctl.status(who, format!("incarnation {inc} ({me}): {got} received"));
            if poll(&n.rx, &mut evs) {
                st.progress();
            } else {
                st.idle(|| "receiving".into());
            }
            for e in evs.drain(..) {
                match e {
                    Ok(c) => {
                        check_headed(who, &c, me, &mut streams);
                        got += 1;
                        f.delivered.fetch_add(1, SeqCst);
                        posted -= 1;
                        post_one(&mut ctx);
                        posted += 1;
                    }
                    Err(c) => panic!("{who}: receive failed while open: {c:?}"),
                }
            }
        }
        // Close while the peers are sending to it (and have sends held at it).
        ctl.status(
            who,
            format!("closing incarnation {inc} with {posted} receives posted"),
        );
        let Node { ep, tx, rx, av } = n;
        drop(ep);
        // What completed around the close: delivered messages must be intact, the rest
        // cancelled (or discarded by the driver).
        let mut quiet = 0;
        while quiet < 3 {
            if !poll(&rx, &mut evs) {
                quiet += 1;
            }
            for e in evs.drain(..) {
                match e {
                    Ok(c) => {
                        check_headed(who, &c, me, &mut streams);
                        f.delivered.fetch_add(1, SeqCst);
                    }
                    Err(c) => assert_eq!(c.status, Status::Canceled, "{who}: at close: {c:?}"),
                }
            }
        }
        drop((tx, rx, av));
        // The peers keep sending to the closed address for a while.
        std::thread::sleep(Duration::from_millis(10));
    }
    f.done.store(true, SeqCst);
    ctl.status(who, "done".into());
}

fn flap_sender(ctl: &Ctl, idx: usize, dom: &Domain, n: &Node, f: &Flap, region: &MemoryRegion) {
    let who = format!("flap-sender{idx}");
    let tolerated = [Status::AddrNotAvail, Status::PeerGone];
    let mut tx = Tx::new(&who, ctl, dom, &n.tx, 6, &tolerated);
    let mut cur: Option<(u32, FiAddr, FabricAddr)> = None;
    let mut src = dom.alloc_buffer(FLAP_SLOT).unwrap();
    let (mut seq, mut rma_n) = (0u32, 0u64);
    let mut last_err = 0;
    while !f.done.load(SeqCst) && seq < 3000 {
        ctl.check();
        let published = *f.target.lock().unwrap();
        if let Some((inc, addr)) = published {
            if cur.map(|c| c.0) != Some(inc) {
                cur = Some((inc, n.av.insert(addr).unwrap(), addr));
            }
        }
        let Some((inc, to, to_name)) = cur else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        let s = tx.slot();
        let r = mix((idx as u64) << 32 | u64::from(seq) | 0xF1A0_0000_0000_0000);
        let len = hdr_len(r, 160 << 10);
        let bytes = MsgId::new(FLAP_SRC + idx as u32, inc, seq, len, to_name).bytes();
        let ctx = u64::from(seq);
        tx.sends.insert(ctx, (s, len));
        ctl.status(&who, format!("send {seq} of {len} B to incarnation {inc}"));
        post(
            ctl,
            dom,
            || format!("{who}: send {seq}"),
            || {
                if seq % 2 == 1 {
                    n.ep.tsend(&bytes, to, FLAP_TAG, ctx)
                } else {
                    n.ep.send(&bytes, to, ctx)
                }
            },
        );
        seq += 1;
        if seq.is_multiple_of(8) {
            // An RMA write into this sender's slot, addressed at the flapping endpoint.
            rma_n += 1;
            let len = 1 + (r >> 20) as usize % (FLAP_SLOT - 1);
            let off = (r >> 40) as usize % (FLAP_SLOT - len + 1);
            let seed = mix(r ^ 0x77);
            // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
            fill_pattern(&mut unsafe { src.as_mut_slice() }[..len], seed);
            let at = (idx * FLAP_SLOT + off) as u64;
            let wctx = OP | rma_n;
            ctl.status(&who, format!("RMA write {rma_n} to incarnation {inc}"));
            post(
                ctl,
                dom,
                || format!("{who}: write"),
                || {
                    n.ep.write_buf(&src, 0..len, to, region.base() + at, region.key(), wctx)
                },
            );
            match tx.wait(wctx) {
                Ok(c) => {
                    assert_eq!(c.len, len, "{who}: write length");
                    f.last_write.lock().unwrap()[idx] = Some((at as usize, len, seed));
                }
                Err(c) if tolerated.contains(&c.status) => {}
                Err(c) => panic!("{who}: write to a flapping endpoint: {c:?}"),
            }
        }
        // Do not flood a closed address.
        if tx.sent_err > last_err {
            last_err = tx.sent_err;
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    ctl.status(&who, format!("waiting for the last of {seq} sends"));
    tx.drain();
    f.sent_ok.fetch_add(tx.sent_ok, SeqCst);
    f.sent_err.fetch_add(tx.sent_err, SeqCst);
    ctl.status(
        &who,
        format!("done: {} ok, {} failed", tx.sent_ok, tx.sent_err),
    );
}

// ------------------------------------------------------------------------------------------
// Registration churn
// ------------------------------------------------------------------------------------------

fn expect_access(who: &str, what: &str, e: Ev) {
    match e {
        Err(c) if c.status == Status::Access && c.err == fi::EACCES => {}
        other => panic!("{who}: {what}: expected an access error, got {other:?}"),
    }
}

fn mr_churn(ctl: &Ctl, owner: &Domain, cdom: &Domain, client: &Node, to: FiAddr) -> u64 {
    let who = "mr-churn";
    let mut tx = Tx::new(who, ctl, cdom, &client.tx, 0, &[]);
    let mut dead_keys: Vec<u64> = Vec::new();
    let mut n = 0u64;
    let mut ctx = || {
        n += 1;
        OP | n
    };
    let mut iters = 0;
    for it in 0..MR_ITERS {
        if ctl.out_of_time() {
            break;
        }
        ctl.check();
        iters += 1;
        let r = mix(it | 0x3E6_0000_0000);
        let len = 16 + (r >> 8) as usize % (48 << 10);
        let mut buf = owner.alloc_buffer(len + 2 * MR_GUARD).unwrap();
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        fill_pattern(unsafe { buf.as_mut_slice() }, mix(r));
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        let mut want = unsafe { buf.as_slice() }.to_vec();
        let range = MR_GUARD..MR_GUARD + len;
        let attr = MrAttr {
            access: RW,
            ..Default::default()
        };
        ctl.status(who, format!("iteration {it}: register {len} B"));
        let mr = owner.register_with(&buf, range.clone(), &attr).unwrap();
        let (base, key) = (mr.base(), mr.key());
        assert!(
            !dead_keys.contains(&key),
            "{who}: key {key:#x} handed out twice"
        );
        let what = |s: &str| format!("{who}: iteration {it}: {s}");
        // Dead keys stay dead, also aimed at a live region's addresses.
        for &k in dead_keys.iter().rev().take(3) {
            let c = ctx();
            post(
                ctl,
                cdom,
                || what("dead key"),
                || client.ep.write(&[1u8; 8], to, base, k, c),
            );
            expect_access(who, &what("write with a dead key"), tx.wait(c));
        }
        // A write and its read-back.
        let wlen = 1 + (r >> 24) as usize % len;
        let off = (r >> 40) as usize % (len - wlen + 1);
        let q = pattern(wlen, mix(r ^ 1));
        let c = ctx();
        post(
            ctl,
            cdom,
            || what("write"),
            || client.ep.write(&q, to, base + off as u64, key, c),
        );
        if let Err(e) = tx.wait(c) {
            panic!("{}: {e:?}", what("write to a live region"));
        }
        want[MR_GUARD + off..MR_GUARD + off + wlen].copy_from_slice(&q);
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        check_bytes(&|| what("after a write"), &want, unsafe { buf.as_slice() });
        let c = ctx();
        post(
            ctl,
            cdom,
            || what("read"),
            || client.ep.read_vec(wlen, to, base + off as u64, key, c),
        );
        match tx.wait(c) {
            Ok(e) => check_bytes(
                &|| what("read back"),
                &q,
                e.buf.as_deref().unwrap_or_default(),
            ),
            Err(e) => panic!("{}: {e:?}", what("read of a live region")),
        }
        // One byte past the end.
        let c = ctx();
        post(
            ctl,
            cdom,
            || what("overrun"),
            || {
                client
                    .ep
                    .write(&[7u8; 8], to, base + len as u64 - 7, key, c)
            },
        );
        expect_access(who, &what("write one byte past the end"), tx.wait(c));
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        check_bytes(&|| what("after a refused write"), &want, unsafe {
            buf.as_slice()
        });
        // Writes racing the deregistration: each completes Ok (applied whole) or Access.
        let q2 = pattern(wlen, mix(r ^ 2));
        let racing: Vec<u64> = (0..4).map(|_| ctx()).collect();
        for &c in &racing {
            post(
                ctl,
                cdom,
                || what("racing write"),
                || client.ep.write(&q2, to, base + off as u64, key, c),
            );
        }
        ctl.status(who, format!("iteration {it}: deregister under 4 writes"));
        if it.is_multiple_of(2) {
            mr.close().unwrap();
        } else {
            drop(mr);
        }
        // Deregistration waits for accesses in progress: nothing lands after it returned.
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        let at_dereg = unsafe { buf.as_slice() }.to_vec();
        let mut ok = 0;
        for &c in &racing {
            match tx.wait(c) {
                Ok(_) => ok += 1,
                e => expect_access(who, &what("write racing the deregistration"), e),
            }
        }
        check_bytes(
            &|| what("a write landed after the deregistration had completed"),
            &at_dereg,
            // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
            unsafe { buf.as_slice() },
        );
        if ok > 0 {
            want[MR_GUARD + off..MR_GUARD + off + wlen].copy_from_slice(&q2);
        }
        check_bytes(
            &|| what(&format!("after {ok} of 4 racing writes")),
            &want,
            // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
            unsafe { buf.as_slice() },
        );
        // Deregistered: every access is refused and changes nothing.
        let c = ctx();
        post(
            ctl,
            cdom,
            || what("write after dereg"),
            || client.ep.write(&q2, to, base + off as u64, key, c),
        );
        expect_access(who, &what("write after deregistration"), tx.wait(c));
        let c = ctx();
        post(
            ctl,
            cdom,
            || what("read after dereg"),
            || client.ep.read_vec(wlen, to, base + off as u64, key, c),
        );
        expect_access(who, &what("read after deregistration"), tx.wait(c));
        let c = ctx();
        let one = 1u64.to_le_bytes();
        let am = AtomicMsg {
            operands: &one,
            addr: to,
            remote_addr: base,
            key,
            datatype: dt::UINT64,
            op: op::SUM,
            count: 1,
            context: c,
        };
        post(
            ctl,
            cdom,
            || what("atomic after dereg"),
            || client.ep.fetch_atomic(&am, &[]),
        );
        expect_access(who, &what("fetch-add after deregistration"), tx.wait(c));
        check_bytes(
            &|| what("after accesses with a dead key"),
            &want,
            // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
            unsafe { buf.as_slice() },
        );
        // The same buffer registered again: a new key works, the old one stays dead.
        let mr2 = owner.register(&buf, RW, None).unwrap();
        assert_ne!(
            mr2.key(),
            key,
            "{who}: a deregistered key was handed out again"
        );
        assert!(
            !dead_keys.contains(&mr2.key()),
            "{who}: key handed out twice"
        );
        let c = ctx();
        post(
            ctl,
            cdom,
            || what("old key again"),
            || client.ep.write(&q, to, base + off as u64, key, c),
        );
        expect_access(who, &what("old key on a re-registered buffer"), tx.wait(c));
        let c = ctx();
        let at = mr2.base() + (MR_GUARD + off) as u64;
        post(
            ctl,
            cdom,
            || what("new key"),
            || client.ep.write(&q, to, at, mr2.key(), c),
        );
        if let Err(e) = tx.wait(c) {
            panic!("{}: {e:?}", what("write with the new key"));
        }
        want[MR_GUARD + off..MR_GUARD + off + wlen].copy_from_slice(&q);
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        check_bytes(&|| what("after the new key's write"), &want, unsafe {
            buf.as_slice()
        });
        dead_keys.push(key);
        dead_keys.push(mr2.key());
        drop(mr2);
    }
    ctl.status(who, format!("done: {iters} iterations"));
    iters
}

// ------------------------------------------------------------------------------------------
// Guest churn: a guest on device 3 that comes and goes, a sink and a sender that survive it
// ------------------------------------------------------------------------------------------

struct Churn {
    guest: Mutex<Option<(u32, FabricAddr)>>,
    done: AtomicBool,
    atom_posted: AtomicU64,
    atom_acked: AtomicU64,
    child_rounds: AtomicU32,
    sink_got: AtomicU64,
    guest_got: AtomicU64,
    sent_ok: AtomicU64,
    sent_err: AtomicU64,
}

/// Survivor on device 0: receives what the guests send, untagged and with `CHURN_TAG`.
fn sink(ctl: &Ctl, dom: &Domain, n: &Node, churn: &Churn) {
    let who = "sink";
    let me = n.ep.name();
    let mut posted: HashMap<u64, bool> = HashMap::new();
    let mut ctx = 0u64;
    let mut streams = Streams::new();
    let mut evs = Vec::new();
    let mut st = Stall::on(ctl, who, dom);
    let start = Instant::now();
    let mut top_up = |posted: &mut HashMap<u64, bool>| {
        while posted.len() < 8 {
            ctx += 1;
            let c = ctx;
            let tagged = c.is_multiple_of(2);
            post(
                ctl,
                dom,
                || format!("{who}: receive"),
                || {
                    if tagged {
                        n.ep.trecv_vec(MAX_MSG, CHURN_TAG, 0, c)
                    } else {
                        n.ep.recv_vec(MAX_MSG, c)
                    }
                },
            );
            posted.insert(c, tagged);
        }
    };
    let handle = |e: Ev, posted: &mut HashMap<u64, bool>, streams: &mut Streams| match e {
        Ok(c) => {
            posted
                .remove(&c.context)
                .expect("completion of a posted receive");
            let id = check_headed(who, &c, me, streams);
            assert!(
                (GUEST_SRC..GUEST_SRC + GUEST_ROUNDS).contains(&id.src),
                "{who}: message from an unknown source {id:?}"
            );
            churn.sink_got.fetch_add(1, SeqCst);
        }
        Err(c) if c.status == Status::Canceled => {
            posted
                .remove(&c.context)
                .expect("cancelled a posted receive");
        }
        Err(c) => panic!("{who}: receive failed: {c:?}"),
    };
    while !churn.done.load(SeqCst) {
        assert!(
            start.elapsed() < WATCHDOG,
            "{who}: the guest rounds never ended"
        );
        top_up(&mut posted);
        ctl.status(who, format!("{} messages", churn.sink_got.load(SeqCst)));
        if poll(&n.rx, &mut evs) {
            st.progress();
        } else {
            ctl.check();
        }
        for e in evs.drain(..) {
            handle(e, &mut posted, &mut streams);
        }
    }
    // Eager data of the vanished guests may still arrive; then cancel what is left.
    let ctxs: Vec<u64> = posted.keys().copied().collect();
    for c in ctxs {
        match n.ep.cancel(c) {
            Ok(()) | Err(Error::NotFound(_)) => {}
            Err(e) => panic!("{who}: cancel: {e}"),
        }
    }
    while !posted.is_empty() {
        if poll(&n.rx, &mut evs) {
            st.progress();
        } else {
            st.idle(|| format!("waiting for {} cancelled receives", posted.len()));
        }
        for e in evs.drain(..) {
            handle(e, &mut posted, &mut streams);
        }
    }
    // The guests' orphans were held sends (never matched): they left with their guests.
    ctl.status(who, "orphan check".into());
    let oc = 1 << 40;
    post(
        ctl,
        dom,
        || format!("{who}: orphan receive"),
        || n.ep.trecv_vec(MAX_MSG, ORPHAN_TAG, 0, oc),
    );
    let until = Instant::now() + Duration::from_millis(30);
    while Instant::now() < until {
        if poll(&n.rx, &mut evs) {
            panic!(
                "{who}: a held send of a guest that had closed its endpoint or disconnected \
                 was delivered: {:?}",
                evs
            );
        }
    }
    n.ep.cancel(oc)
        .unwrap_or_else(|e| panic!("{who}: cancel of the orphan receive: {e}"));
    loop {
        if poll(&n.rx, &mut evs) {
            break;
        }
        st.idle(|| "waiting for the cancelled orphan receive".into());
    }
    match evs.pop() {
        Some(Err(c)) if c.status == Status::Canceled && c.context == oc => {}
        other => panic!("{who}: orphan receive: {other:?}"),
    }
    ctl.status(who, "done".into());
}

/// Survivor on device 1: sends to whichever guest incarnation is published.
fn churn_sender(ctl: &Ctl, dom: &Domain, n: &Node, churn: &Churn) {
    let who = "churn-sender";
    let tolerated = [Status::AddrNotAvail, Status::PeerGone];
    let mut tx = Tx::new(who, ctl, dom, &n.tx, 4, &tolerated);
    let mut cur: Option<(u32, FiAddr, FabricAddr)> = None;
    let mut seq = 0u32;
    let mut last_err = 0;
    while !churn.done.load(SeqCst) && seq < 3000 {
        ctl.check();
        let published = *churn.guest.lock().unwrap();
        if let Some((inc, addr)) = published {
            if cur.map(|c| c.0) != Some(inc) {
                cur = Some((inc, n.av.insert(addr).unwrap(), addr));
            }
        }
        let Some((inc, to, to_name)) = cur else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        let s = tx.slot();
        let len = hdr_len(mix(u64::from(seq) | 0xC5_0000_0000), 128 << 10);
        let bytes = MsgId::new(CHURN_SENDER_SRC, inc, seq, len, to_name).bytes();
        let ctx = u64::from(seq);
        tx.sends.insert(ctx, (s, len));
        ctl.status(who, format!("send {seq} of {len} B to guest {inc}"));
        post(
            ctl,
            dom,
            || format!("{who}: send {seq}"),
            || n.ep.send(&bytes, to, ctx),
        );
        seq += 1;
        if tx.sent_err > last_err {
            last_err = tx.sent_err;
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    ctl.status(who, format!("waiting for the last of {seq} sends"));
    tx.drain();
    churn.sent_ok.fetch_add(tx.sent_ok, SeqCst);
    churn.sent_err.fetch_add(tx.sent_err, SeqCst);
    ctl.status(who, "done".into());
}

/// The addresses a guest needs (also passed to a child process).
#[derive(Clone, Copy)]
struct GuestArgs {
    sink: FabricAddr,
    atom: FabricAddr,
    base: u64,
    key: u64,
    round: u32,
    counter: u64,
}

/// One guest incarnation's traffic: sends to the sink (plus one orphan that no receive will
/// ever match), fetch-adds on its counter, receives from the churn sender (if `rx_from` is
/// set). Returns when `until` passes or after `max_iters`, without waiting for anything.
struct GuestTraffic<'a> {
    who: &'a str,
    ctl: Option<&'a Ctl>,
    dom: &'a Domain,
    n: &'a Node,
    args: GuestArgs,
    until: Instant,
    max_iters: u32,
    max_atomics: u64,
    receive: bool,
}

#[derive(Default)]
struct GuestStats {
    atom_posted: u64,
    atom_acked: u64,
    received: u64,
}

fn guest_traffic(t: &GuestTraffic<'_>) -> GuestStats {
    let n = t.n;
    let a = t.args;
    let me = n.ep.name();
    let sink = n.av.insert(a.sink).unwrap();
    let at = n.av.insert(a.atom).unwrap();
    let mut stats = GuestStats::default();
    let mut free: Vec<usize> = (0..6).collect();
    let mut sends: HashMap<u64, usize> = HashMap::new();
    let mut streams = Streams::new();
    let mut evs = Vec::new();
    let check = || {
        if let Some(c) = t.ctl {
            c.check();
        }
    };
    let retry = |f: &mut dyn FnMut() -> vfabric::Result<()>| loop {
        match f() {
            Ok(()) => return,
            Err(Error::Again) => {
                check();
                let _ = t.dom.progress();
                std::thread::yield_now();
            }
            Err(e) => panic!("{}: post: {e}", t.who),
        }
    };
    let src = GUEST_SRC + a.round;
    // The orphan: larger than the eager threshold, so held at the sink until we vanish.
    let orphan = MsgId::new(src, a.round, u32::MAX, ORPHAN_LEN, a.sink).bytes();
    retry(&mut || n.ep.tsend(&orphan, sink, ORPHAN_TAG, OP | 1));
    let mut rctx = 0u64;
    let mut posted = 0;
    let one = 1u64.to_le_bytes();
    let mut seq = 0u32;
    let mut it = 0;
    while Instant::now() < t.until && it < t.max_iters {
        check();
        it += 1;
        while t.receive && posted < 4 {
            rctx += 1;
            let c = rctx;
            retry(&mut || n.ep.recv_vec(MAX_MSG, c));
            posted += 1;
        }
        if let Some(s) = free.pop() {
            let len = hdr_len(mix(u64::from(seq) ^ u64::from(src) << 40), MAX_MSG);
            let bytes = MsgId::new(src, a.round, seq, len, a.sink).bytes();
            let c = u64::from(seq);
            if seq % 3 == 2 {
                retry(&mut || n.ep.tsend(&bytes, sink, CHURN_TAG, c));
            } else {
                retry(&mut || n.ep.send(&bytes, sink, c));
            }
            sends.insert(c, s);
            seq += 1;
        }
        if it.is_multiple_of(3) && stats.atom_posted < t.max_atomics {
            let m = AtomicMsg {
                operands: &one,
                addr: at,
                remote_addr: a.base + a.counter,
                key: a.key,
                datatype: dt::UINT64,
                op: op::SUM,
                count: 1,
                context: OP | (2 << 40) | stats.atom_posted,
            };
            stats.atom_posted += 1;
            retry(&mut || n.ep.fetch_atomic(&m, &[]));
        }
        poll(&n.tx, &mut evs);
        for e in evs.drain(..) {
            let c = ev_context(&e);
            match e {
                Ok(_) if c & OP != 0 && c >> 40 & 0xff == 2 => stats.atom_acked += 1,
                Ok(_) if c & OP == 0 => {
                    free.push(sends.remove(&c).expect("a posted send"));
                }
                other => panic!("{}: while alive: {other:?}", t.who),
            }
        }
        if t.receive {
            poll(&n.rx, &mut evs);
            for e in evs.drain(..) {
                match e {
                    Ok(c) => {
                        posted -= 1;
                        let id = check_headed(t.who, &c, me, &mut streams);
                        assert_eq!(id.src, CHURN_SENDER_SRC, "{}: source", t.who);
                        stats.received += 1;
                    }
                    Err(c) => panic!("{}: receive failed while alive: {c:?}", t.who),
                }
            }
        }
    }
    stats
}

/// Disconnections the device has finished processing (teardown included).
type Disconnects<'a> = &'a (dyn Fn() -> u64 + Sync);

/// A guest incarnation that is gone: its address and the device's disconnect count while it
/// was connected.
type Gone = (FabricAddr, u64);

fn guest_in_process(
    ctl: &Ctl,
    path: &Path,
    args: GuestArgs,
    churn: &Churn,
    disconnects: Disconnects<'_>,
) -> Gone {
    let who = "guest";
    let d = open_retry(Some(ctl), path);
    let connected_at = disconnects();
    let n = node(&d, WaitMode::None);
    let me = n.ep.name();
    *churn.guest.lock().unwrap() = Some((args.round, me));
    ctl.status(who, format!("round {} in process as {me}", args.round));
    // The atomics counted before they are posted: the counter ends between acked and posted.
    let t = GuestTraffic {
        who,
        ctl: Some(ctl),
        dom: &d,
        n: &n,
        args,
        until: Instant::now() + Duration::from_millis(150 + 50 * u64::from(args.round % 3)),
        max_iters: 400,
        max_atomics: u64::MAX,
        receive: true,
    };
    let s = guest_traffic(&t);
    churn.atom_posted.fetch_add(s.atom_posted, SeqCst);
    churn.atom_acked.fetch_add(s.atom_acked, SeqCst);
    churn.guest_got.fetch_add(s.received, SeqCst);
    ctl.status(
        who,
        format!("round {}: dropping the guest mid-traffic", args.round),
    );
    // Gone in the middle of traffic: sends, receives and atomics still in flight.
    if args.round.is_multiple_of(4) {
        drop(d);
        drop(n);
    } else {
        drop(n);
        drop(d);
    }
    (me, connected_at)
}

/// Kills the child on drop (also when the parent test fails).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A guest in a child process (this test binary, `stress_child_guest`), SIGKILLed mid-traffic.
/// `None` if no child process can be started here.
fn guest_child(
    ctl: &Ctl,
    path: &Path,
    args: GuestArgs,
    churn: &Churn,
    disconnects: Disconnects<'_>,
) -> Option<Gone> {
    let who = "guest";
    let exe = std::env::current_exe().ok()?;
    let spec = format!(
        "{}|{}|{}|{}|{}|{}",
        path.display(),
        args.sink,
        args.atom,
        args.base,
        args.key,
        args.round
    );
    let child = Command::new(exe)
        .args([
            "stress_child_guest",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, spec)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn();
    let mut child = match child {
        Ok(c) => ChildGuard(c),
        Err(e) => {
            println!(
                "stress: no child guest ({e}); round {} in process",
                args.round
            );
            return None;
        }
    };
    let out = child.0.stdout.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if lines_tx.send(l).is_err() {
                break;
            }
        }
    });
    ctl.status(
        who,
        format!("round {}: waiting for the child guest", args.round),
    );
    let start = Instant::now();
    let addr: FabricAddr = loop {
        ctl.check();
        match lines.recv_timeout(Duration::from_millis(50)) {
            Ok(l) => {
                // libtest may print "test stress_child_guest ... " in front of it.
                if let Some(i) = l.find(CHILD_READY) {
                    break l[i + CHILD_READY.len()..]
                        .trim()
                        .parse()
                        .expect("child guest address");
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(st)) = child.0.try_wait() {
                    panic!("{who}: the child guest exited before it was ready: {st}");
                }
                assert!(
                    start.elapsed() < STALL,
                    "{who}: child guest not ready after {STALL:?}"
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let st = child.0.wait();
                panic!("{who}: the child guest closed its output before it was ready: {st:?}");
            }
        }
    };
    let connected_at = disconnects();
    *churn.guest.lock().unwrap() = Some((args.round, addr));
    ctl.status(
        who,
        format!("round {}: child guest {addr} running", args.round),
    );
    std::thread::sleep(Duration::from_millis(150));
    // It runs until killed: an exit of its own is a failure (its panic message is above).
    if let Ok(Some(st)) = child.0.try_wait() {
        panic!(
            "{who}: the child guest of round {} exited by itself: {st}",
            args.round
        );
    }
    ctl.status(
        who,
        format!("round {}: SIGKILL to the child guest", args.round),
    );
    drop(child);
    churn.child_rounds.fetch_add(1, SeqCst);
    Some((addr, connected_at))
}

fn guest_churn(
    ctl: &Ctl,
    path: &Path,
    base: GuestArgs,
    survivor: &Domain,
    churn: &Churn,
    disconnects: Disconnects<'_>,
) {
    let who = "guest";
    let mut gone = Vec::new();
    for round in 0..GUEST_ROUNDS {
        if ctl.out_of_time() {
            break;
        }
        let args = GuestArgs { round, ..base };
        let child = if round % 2 == 1 {
            let args = GuestArgs {
                counter: A_CHILD,
                ..args
            };
            guest_child(ctl, path, args, churn, disconnects)
        } else {
            None
        };
        gone.push(match child {
            Some(g) => g,
            None => guest_in_process(ctl, path, args, churn, disconnects),
        });
    }
    // Every incarnation's endpoint is reported closed...
    let st = Stall::new(ctl, who);
    for &(a, _) in &gone {
        ctl.status(who, format!("waiting until {a} is closed"));
        while survivor.addr_check(&a).unwrap() {
            st.idle(|| format!("waiting for the device to notice that guest {a} is gone"));
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // ...and the device has finished tearing the last connection down (held sends dropped;
    // the earlier ones ended before the next connection was accepted) before the sink checks
    // that no orphan arrives.
    if let Some(&(a, at)) = gone.last() {
        while disconnects() <= at {
            st.idle(|| format!("waiting for the device to finish the disconnect of {a}"));
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    churn.done.store(true, SeqCst);
    ctl.status(who, "done".into());
}

/// Child side of `guest_child`: a no-op unless started by it.
#[test]
fn stress_child_guest() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let f: Vec<&str> = spec.split('|').collect();
    assert_eq!(f.len(), 6, "{CHILD_ENV}={spec}");
    let args = GuestArgs {
        sink: f[1].parse().unwrap(),
        atom: f[2].parse().unwrap(),
        base: f[3].parse().unwrap(),
        key: f[4].parse().unwrap(),
        round: f[5].parse().unwrap(),
        counter: A_CHILD,
    };
    let d = open_retry(None, Path::new(f[0]));
    let n = node(&d, WaitMode::None);
    println!("{CHILD_READY}{}", n.ep.name());
    std::io::stdout().flush().unwrap();
    // Runs until killed; ends by itself if the parent is gone.
    let t = GuestTraffic {
        who: "child-guest",
        ctl: None,
        dom: &d,
        n: &n,
        args,
        until: Instant::now() + CHILD_LIFETIME,
        max_iters: 1_000_000,
        max_atomics: CHILD_MAX_ATOMICS,
        receive: false,
    };
    guest_traffic(&t);
}

// ------------------------------------------------------------------------------------------
// The test
// ------------------------------------------------------------------------------------------

fn read_u64(b: &[u8], off: u64) -> u64 {
    u64::from_le_bytes(b[off as usize..off as usize + 8].try_into().unwrap())
}

/// The old values fetched by `+1` increments from `start`: exactly `0..n` offsets, once each.
fn assert_each_once(what: &str, mut offsets: Vec<u128>) {
    offsets.sort_unstable();
    for (i, &o) in offsets.iter().enumerate() {
        assert_eq!(
            o,
            i as u128,
            "{what}: fetched old values are not each increment exactly once \
             (position {i} holds offset {o}; {} values)",
            offsets.len()
        );
    }
}

/// An embedded daemon with `n` devices and a small unexpected-bytes bound; `poll_us` `None`
/// keeps the default (data-plane poller), `Some(0)` makes the devices serve kicks only.
fn stress_rig(n: u32, poll_us: Option<u64>) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let paths = vfabric_device::Config::socket_dir_paths(dir.path(), n);
    let mut config = vfabric_device::Config::new(paths.clone());
    config.limits.max_unexpected_bytes = MAX_UNEXPECTED;
    if let Some(us) = poll_us {
        config.poll_us = us;
    }
    let daemon = vfabric_device::start(config).expect("start embedded vfabricd");
    Rig {
        _dir: dir,
        daemon: Some(daemon),
        paths,
    }
}

fn everything(ctl: &Ctl, poll_us: Option<u64>) {
    let t0 = Instant::now();
    let r = stress_rig(4, poll_us);
    let doms: Vec<Domain> = (0..3)
        .map(|i| Domain::open(&r.paths[i], domain_attr()).expect("open domain"))
        .collect();
    let inject_max = doms[0].info().limits.inject_size as usize;

    // Atomic counters on device 0, with canaries between them.
    let mut abuf = doms[0].alloc_buffer(4096).unwrap();
    {
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        let b = unsafe { abuf.as_mut_slice() };
        b[A_CANARY1 as usize..][..8].copy_from_slice(&CANARY64.to_le_bytes());
        b[A_U32 as usize..][..4].copy_from_slice(&U32_START.to_le_bytes());
        b[A_CANARY2 as usize..][..4].copy_from_slice(&CANARY32.to_le_bytes());
        b[A_U128 as usize..][..16].copy_from_slice(&U128_START.to_le_bytes());
        b[A_F64 as usize..][..8].copy_from_slice(&F64_START.to_le_bytes());
        b[A_CANARY3 as usize..][..8].copy_from_slice(&CANARY64.to_le_bytes());
        b[A_CANARY4 as usize..][..8].copy_from_slice(&CANARY64.to_le_bytes());
    }
    let amr = doms[0].register(&abuf, RW, None).unwrap();
    let atarget = node(&doms[0], WaitMode::None);

    // Ring lanes.
    let nodes: Vec<Node> = RING_DEVS
        .iter()
        .enumerate()
        .map(|(w, &d)| node(&doms[d], wait_mode(w % 3 != 0)))
        .collect();
    let u128_ok = nodes[0].ep.fetch_atomic_valid(dt::UINT128, op::SUM).is_ok();
    let u128_cas_ok = nodes[0]
        .ep
        .compare_atomic_valid(dt::UINT128, op::CSWAP)
        .is_ok();
    let f64_ok = nodes[0].ep.fetch_atomic_valid(dt::DOUBLE, op::SUM).is_ok();
    let atom = AtomTarget {
        addr: atarget.ep.name(),
        base: amr.base(),
        key: amr.key(),
        u128_ok,
        u128_cas_ok,
        f64_ok,
    };
    let peers: Vec<Peers> = (0..nodes.len())
        .map(|w| {
            let k = nodes.len();
            let n = &nodes[w];
            Peers {
                down: n.av.insert(nodes[(w + 1) % k].ep.name()).unwrap(),
                up: n.av.insert(nodes[(w + k - 1) % k].ep.name()).unwrap(),
                atom: n.av.insert(atom.addr).unwrap(),
            }
        })
        .collect();
    let recv_cntrs: Vec<Counter> = nodes
        .iter()
        .enumerate()
        .map(|(w, n)| {
            let c = doms[RING_DEVS[w]].cntr_open().unwrap();
            n.ep.bind_cntr(&c, fi::RECV).unwrap();
            c
        })
        .collect();
    let region_bufs: Vec<SharedBuf> = doms
        .iter()
        .map(|d| d.alloc_buffer(RING_DEVS.len() * RING_SLOT).unwrap())
        .collect();
    let regions: Vec<MemoryRegion> = doms
        .iter()
        .zip(&region_bufs)
        .map(|(d, b)| d.register(b, RW, None).unwrap())
        .collect();
    let totals: Vec<AtomicU32> = RING_DEVS
        .iter()
        .map(|_| AtomicU32::new(LANE_MSGS))
        .collect();
    let results = Mutex::new(AtomResults::default());
    let last_write = Mutex::new(vec![None; RING_DEVS.len()]);
    let received = Mutex::new(vec![(0, 0); RING_DEVS.len()]);
    let ring = Ring {
        ctl,
        doms: &doms,
        nodes: &nodes,
        peers: &peers,
        totals: &totals,
        regions: &regions,
        atom,
        inject_max,
        results: &results,
        last_write: &last_write,
        received: &received,
    };

    // Endpoint flapping on device 2, senders on devices 0 and 1.
    let flap_buf = doms[2].alloc_buffer(2 * FLAP_SLOT).unwrap();
    let flap_mr = doms[2].register(&flap_buf, RW, None).unwrap();
    let flap = Flap {
        target: Mutex::new(None),
        done: AtomicBool::new(false),
        last_write: Mutex::new([None; 2]),
        delivered: AtomicU64::new(0),
        sent_ok: AtomicU64::new(0),
        sent_err: AtomicU64::new(0),
    };
    let flap_senders: Vec<Node> = (0..2).map(|i| node(&doms[i], wait_mode(i == 1))).collect();

    // Registration churn: regions on device 1, accessed from device 2.
    let mr_client = node(&doms[2], WaitMode::Blocking);
    let mr_target = node(&doms[1], WaitMode::None);
    let mr_to = mr_client.av.insert(mr_target.ep.name()).unwrap();

    // Guest churn on device 3; sink on device 0, sender on device 1.
    let sink_node = node(&doms[0], WaitMode::Blocking);
    let churn_node = node(&doms[1], WaitMode::Blocking);
    let churn = Churn {
        guest: Mutex::new(None),
        done: AtomicBool::new(false),
        atom_posted: AtomicU64::new(0),
        atom_acked: AtomicU64::new(0),
        child_rounds: AtomicU32::new(0),
        sink_got: AtomicU64::new(0),
        guest_got: AtomicU64::new(0),
        sent_ok: AtomicU64::new(0),
        sent_err: AtomicU64::new(0),
    };
    let guest_args = GuestArgs {
        sink: sink_node.ep.name(),
        atom: atom.addr,
        base: atom.base,
        key: atom.key,
        round: 0,
        counter: A_CHURN,
    };
    let mr_iters = AtomicU64::new(0);
    let setup = t0.elapsed();

    let mut jobs: Vec<Job<'_>> = Vec::new();
    for w in 0..RING_DEVS.len() {
        let g = &ring;
        jobs.push((format!("ring{w}-tx"), Box::new(move || ring_tx(g, w))));
        jobs.push((format!("ring{w}-rx"), Box::new(move || ring_rx(g, w))));
    }
    {
        let (flap, d2) = (&flap, &doms[2]);
        jobs.push((
            "flap-target".into(),
            Box::new(move || flap_target(ctl, d2, flap)),
        ));
    }
    for (i, n) in flap_senders.iter().enumerate() {
        let (flap, d, mr) = (&flap, &doms[i], &flap_mr);
        jobs.push((
            format!("flap-sender{i}"),
            Box::new(move || flap_sender(ctl, i, d, n, flap, mr)),
        ));
    }
    {
        let (d1, d2, client, iters) = (&doms[1], &doms[2], &mr_client, &mr_iters);
        jobs.push((
            "mr-churn".into(),
            Box::new(move || {
                iters.store(mr_churn(ctl, d1, d2, client, mr_to), SeqCst);
            }),
        ));
    }
    {
        let (d0, n, churn) = (&doms[0], &sink_node, &churn);
        jobs.push(("sink".into(), Box::new(move || sink(ctl, d0, n, churn))));
        let (d1, n) = (&doms[1], &churn_node);
        jobs.push((
            "churn-sender".into(),
            Box::new(move || churn_sender(ctl, d1, n, churn)),
        ));
        let path = r.paths[3].as_path();
        let daemon = r.daemon.as_ref().unwrap();
        let disconnects = move || daemon.stats().devices[3].disconnects;
        jobs.push((
            "guest".into(),
            Box::new(move || guest_churn(ctl, path, guest_args, d1, churn, &disconnects)),
        ));
    }
    run_crew(ctl, jobs);
    let ran = t0.elapsed();

    // ---- Final checks (everything joined, nothing in flight) ----
    let res = results.into_inner().unwrap();
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    let b = unsafe { abuf.as_slice() };
    let n64 = res.u64s.len() as u64;
    assert_eq!(read_u64(b, A_U64), n64, "64-bit fetch-add total");
    assert_each_once(
        "fetch-add u64",
        res.u64s.iter().map(|&v| u128::from(v)).collect(),
    );
    let n32 = res.u32s.len() as u32;
    let got32 = u32::from_le_bytes(b[A_U32 as usize..][..4].try_into().unwrap());
    assert_eq!(
        got32,
        U32_START.wrapping_add(n32),
        "32-bit fetch-add total (wrapping)"
    );
    assert_each_once(
        "fetch-add u32",
        res.u32s
            .iter()
            .map(|&v| u128::from(v.wrapping_sub(U32_START)))
            .collect(),
    );
    if u128_ok {
        let got = u128::from_le_bytes(b[A_U128 as usize..][..16].try_into().unwrap());
        assert_eq!(
            got,
            U128_START + res.u128s.len() as u128,
            "128-bit fetch-add total"
        );
        assert_each_once(
            "fetch-add u128",
            res.u128s.iter().map(|&v| v - U128_START).collect(),
        );
    }
    if f64_ok {
        let got = f64::from_le_bytes(b[A_F64 as usize..][..8].try_into().unwrap());
        assert_eq!(
            got,
            F64_START + res.f64s.len() as f64,
            "double fetch-add total"
        );
        assert_each_once(
            "fetch-add double",
            res.f64s.iter().map(|&v| (v - F64_START) as u128).collect(),
        );
    }
    assert_eq!(read_u64(b, A_SUM), 3 * res.sums, "non-fetching add total");
    assert_eq!(read_u64(b, A_CAS), res.cas, "CSWAP increments");
    assert_eq!(
        read_u64(b, A_CANARY1),
        CANARY64,
        "canary after the u64 counter"
    );
    assert_eq!(
        u32::from_le_bytes(b[A_CANARY2 as usize..][..4].try_into().unwrap()),
        CANARY32,
        "canary after the u32 counter"
    );
    assert_eq!(
        read_u64(b, A_CANARY3),
        CANARY64,
        "canary after the counters"
    );
    let cas128 = u128::from_le_bytes(b[A_CAS128 as usize..][..16].try_into().unwrap());
    assert_eq!(
        cas128,
        u128::from(res.cas128) * CAS128_STEP,
        "128-bit CSWAP increments"
    );
    assert_eq!(
        read_u64(b, A_CANARY4),
        CANARY64,
        "canary after the 128-bit CSWAP word"
    );
    let churn_v = read_u64(b, A_CHURN);
    let (posted, acked) = (
        churn.atom_posted.load(SeqCst),
        churn.atom_acked.load(SeqCst),
    );
    assert!(
        (acked..=posted).contains(&churn_v),
        "in-process guests' counter {churn_v} outside [acknowledged {acked}, posted {posted}]"
    );
    let child_rounds = u64::from(churn.child_rounds.load(SeqCst));
    let child_v = read_u64(b, A_CHILD);
    assert!(
        child_v <= child_rounds * CHILD_MAX_ATOMICS,
        "child guests' counter {child_v} exceeds what {child_rounds} children may post"
    );

    // Each lane's last RMA write is in place in its target region.
    for (w, lw) in last_write.into_inner().unwrap().into_iter().enumerate() {
        if let Some((off, len, seed)) = lw {
            let target = &region_bufs[RING_DEVS[(w + 1) % RING_DEVS.len()]];
            check_bytes(
                &|| format!("lane {w}: last RMA write in the target region"),
                &pattern(len, seed),
                // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
                &unsafe { target.as_slice() }[off..off + len],
            );
        }
    }
    for (i, lw) in flap.last_write.lock().unwrap().iter().enumerate() {
        if let Some((off, len, seed)) = *lw {
            check_bytes(
                &|| format!("flap sender {i}: last successful write"),
                &pattern(len, seed),
                // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
                &unsafe { flap_buf.as_slice() }[off..off + len],
            );
        }
    }
    let received = received.into_inner().unwrap();
    for (w, c) in recv_cntrs.iter().enumerate() {
        let (ok, canceled) = received[w];
        assert_eq!(c.read(), u64::from(ok), "ring{w}: RECV counter");
        assert_eq!(
            c.readerr(),
            u64::from(canceled),
            "ring{w}: RECV error counter"
        );
    }
    // Every request of the survivors came back.
    for (i, d) in doms.iter().enumerate() {
        let deadline = Instant::now() + STALL;
        while d.requests_in_flight() > 0 {
            d.progress().unwrap();
            assert!(
                Instant::now() < deadline,
                "domain {i}: {} requests still in flight after every thread finished",
                d.requests_in_flight()
            );
            std::thread::yield_now();
        }
    }
    let msgs: u32 = totals.iter().map(|t| t.load(SeqCst)).sum();
    println!(
        "stress: setup {setup:?}, traffic {:?}; ring: {msgs} messages, {} atomic rounds \
         ({} CSWAP retries), u128 {u128_ok}, u128 CSWAP {u128_cas_ok}, double {f64_ok}; flap: {} delivered, {} sends ok, \
         {} failed; mr churn: {} iterations; guests: {} child rounds, sink got {}, guests got \
         {}, churn sender {} ok / {} failed, guest atomics {acked}..{posted} -> {churn_v}, \
         child atomics {child_v}",
        ran - setup,
        res.u64s.len(),
        res.cas_retries,
        flap.delivered.load(SeqCst),
        flap.sent_ok.load(SeqCst),
        flap.sent_err.load(SeqCst),
        mr_iters.load(SeqCst),
        child_rounds,
        churn.sink_got.load(SeqCst),
        churn.guest_got.load(SeqCst),
        churn.sent_ok.load(SeqCst),
        churn.sent_err.load(SeqCst),
    );
    drop(amr);
}

/// Everything at once with the default configuration (the data-plane poller takes busy
/// devices over from their kicks and hands them back).
#[test]
fn stress_everything_at_once() {
    with_watchdog("stress-poller", |ctl| everything(ctl, None));
}

/// The same with the devices serving kicks only (`poll_us = 0`: each kick serves its queue and
/// re-arms it).
#[test]
fn stress_everything_at_once_kicks_only() {
    with_watchdog("stress", |ctl| everything(ctl, Some(0)));
}

/// Minimal reproducer of a device hang this stress test found (about one run in twenty of
/// `stress_everything_at_once` stalled in `ring3-tx`, the only endpoint on its queue pair,
/// once the rest of its device had gone quiet).
///
/// Since device commit 3b0dd50 ("polled state an atomic instead of a lock held across a
/// drain"), a request can stay in its avail ring forever. `FabricBackend::try_park` (poller
/// giving a device back to kicks) re-enables notifications (EVENT_IDX: `avail_event` = the
/// current `next_avail`), finds the rings empty, and only then stores `polled = false`. A kick
/// for a request posted in between reaches `FabricBackend::process` while `polled` still reads
/// `true`, which takes the "kick that raced with the poller" branch: it drains the request but
/// does not re-arm. The poller then stores `polled = false` and drops the device. Now
/// `avail_event` is one behind `next_avail`, so the driver's next request does not kick
/// (`vring_need_event` is false) and nobody polls: that request, and every later one on the
/// queue, waits until some other queue of the same device gets a kick (a pass drains all
/// queues), which for a lone guest never happens. Before that commit the `polled` mutex was
/// held across `try_park`, so the racing kick waited and then took the normal path (drain,
/// re-activate the poller or re-arm).
///
/// Here one synchronous requester per device (nothing else on its device to rescue a stranded
/// request) reads 8 bytes at a time from a region on device 0, pausing 0..160 µs between reads
/// so that requests often arrive while the poller parks the device. At 593b408, e159ce0 and
/// 03c2848 this runs its 12 s clean; at 3b0dd50 and 5843630 a read never completes, usually
/// within a few seconds (the driver still counts it in flight; no kick follows).
///
/// Fixed by taking the pass lock in `try_park` and re-arming after a racing drain once the
/// poller has let go (`FabricBackend::process`); without the fix this fails within seconds.
#[test]
fn lone_synchronous_requests_are_never_stranded() {
    with_watchdog("lone-requests", |ctl| {
        const REQUESTERS: usize = 6;
        const RUN: Duration = Duration::from_secs(5);
        const WAIT: Duration = Duration::from_secs(5);
        let r = common::rig(1 + REQUESTERS as u32);
        let doms: Vec<Domain> = r
            .paths
            .iter()
            .map(|p| Domain::open(p, domain_attr()).unwrap())
            .collect();
        let buf = doms[0].alloc_buffer(4096).unwrap();
        let mr = doms[0].register(&buf, RW, None).unwrap();
        let target = node(&doms[0], WaitMode::None);
        let (to, base, key) = (target.ep.name(), mr.base(), mr.key());
        let end = Instant::now() + RUN;
        let jobs: Vec<Job<'_>> = doms[1..]
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let who = format!("requester{}", i + 1);
                let job: Box<dyn FnOnce() + Send + '_> = Box::new(move || {
                    let n = node(d, WaitMode::None);
                    let at = n.av.insert(to).unwrap();
                    let mut evs = Vec::new();
                    let mut k = 0u64;
                    while Instant::now() < end {
                        ctl.check();
                        post(
                            ctl,
                            d,
                            || format!("read {k}"),
                            || n.ep.read_vec(8, at, base, key, k),
                        );
                        let posted = Instant::now();
                        while !poll(&n.tx, &mut evs) {
                            assert!(
                                posted.elapsed() < WAIT,
                                "device {}: read {k} not completed after {WAIT:?}; the driver \
                                 counts {} request(s) in flight, {:?}",
                                i + 1,
                                d.requests_in_flight(),
                                d.stats()
                            );
                        }
                        match evs.pop() {
                            Some(Ok(c)) if c.context == k && evs.is_empty() => {}
                            other => panic!("read {k}: {other:?} {evs:?}"),
                        }
                        // Pause 0..160 µs: the next request often lands while the poller
                        // (budget 50 µs) gives the idle device back to its kicks.
                        let pause = Duration::from_micros((k * 7 + i as u64 * 13) % 160);
                        let t = Instant::now();
                        while t.elapsed() < pause {
                            std::hint::spin_loop();
                        }
                        k += 1;
                    }
                    ctl.status(&format!("requester{}", i + 1), format!("{k} reads"));
                });
                (who, job)
            })
            .collect();
        run_crew(ctl, jobs);
    });
}

/// Large RMA writes move in chunks, and between chunks the device's poller serves its other
/// devices (no head-of-line blocking). That must never deadlock with deregistration: here one
/// guest writes 2 MiB at a time into a region of device 0 that device 0's guest deregisters
/// and registers again (same requested key) all the time, while a third guest keeps reading a
/// few bytes from another region of device 0 through the same poller. Every write completes
/// (Ok while registered, an error once the region is gone), every read completes Ok.
#[test]
fn bulk_writes_yield_to_other_devices_while_regions_come_and_go() {
    with_watchdog("bulk-yield", |ctl| {
        const RUN: Duration = Duration::from_secs(3);
        const WAIT: Duration = Duration::from_secs(10);
        const BIG: usize = 2 << 20;
        const KEY: u64 = 0xb16;
        let r = common::rig(3);
        let doms: Vec<Domain> = r
            .paths
            .iter()
            .map(|p| Domain::open(p, domain_attr()).unwrap())
            .collect();
        let target = node(&doms[0], WaitMode::None);
        let big = doms[0].alloc_buffer(BIG).unwrap();
        let small = doms[0].alloc_buffer(4096).unwrap();
        let small_mr = doms[0].register(&small, RW, None).unwrap();
        let first = doms[0].register(&big, RW, Some(KEY)).unwrap();
        let (to, big_base) = (target.ep.name(), first.base());
        let (small_base, small_key) = (small_mr.base(), small_mr.key());
        let end = Instant::now() + RUN;
        let (d0, d1, d2) = (&doms[0], &doms[1], &doms[2]);
        let big_ref = &big;
        let churn: Box<dyn FnOnce() + Send + '_> = Box::new(move || {
            let mut mr = Some(first);
            let mut rounds = 0u32;
            while Instant::now() < end {
                ctl.check();
                drop(mr.take());
                std::thread::sleep(Duration::from_micros(300));
                mr = Some(d0.register(big_ref, RW, Some(KEY)).unwrap());
                std::thread::sleep(Duration::from_micros(700));
                rounds += 1;
            }
            ctl.status("churn", format!("{rounds} deregistrations"));
        });
        let writer: Box<dyn FnOnce() + Send + '_> = Box::new(move || {
            let n = node(d1, WaitMode::None);
            let at = n.av.insert(to).unwrap();
            let src = d1.alloc_buffer(BIG).unwrap();
            let (mut evs, mut k, mut ok) = (Vec::new(), 0u64, 0u64);
            while Instant::now() < end {
                ctl.check();
                post(
                    ctl,
                    d1,
                    || format!("write {k}"),
                    || n.ep.write_buf(&src, 0..BIG, at, big_base, KEY, k),
                );
                let posted = Instant::now();
                while !poll(&n.tx, &mut evs) {
                    assert!(posted.elapsed() < WAIT, "write {k} not completed");
                }
                if matches!(evs.pop(), Some(Ok(_))) {
                    ok += 1;
                }
                k += 1;
            }
            ctl.status("writer", format!("{k} writes, {ok} ok"));
        });
        let reader: Box<dyn FnOnce() + Send + '_> = Box::new(move || {
            let n = node(d2, WaitMode::None);
            let at = n.av.insert(to).unwrap();
            let (mut evs, mut k) = (Vec::new(), 0u64);
            while Instant::now() < end {
                ctl.check();
                post(
                    ctl,
                    d2,
                    || format!("read {k}"),
                    || n.ep.read_vec(8, at, small_base, small_key, k),
                );
                let posted = Instant::now();
                while !poll(&n.tx, &mut evs) {
                    assert!(posted.elapsed() < WAIT, "read {k} not completed");
                }
                match evs.pop() {
                    Some(Ok(c)) if c.context == k => {}
                    other => panic!("read {k}: {other:?}"),
                }
                k += 1;
            }
            ctl.status("reader", format!("{k} reads"));
        });
        run_crew(
            ctl,
            vec![
                ("churn".to_string(), churn),
                ("writer".to_string(), writer),
                ("reader".to_string(), reader),
            ],
        );
        drop(small_mr);
    });
}
