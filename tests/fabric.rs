// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fabric-wide behaviour in one process (an embedded daemon, driver domains on its devices):
//! the unexpected-message bound and backpressure, and several devices with several endpoints.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vfabric::{
    BindFlags, CompletionQueue, CqAttr, CqEntry, Domain, DomainAttr, EpAttr, Error, FiAddr,
};
use vfabric_device::{Config, DaemonHandle, Limits};

const TIMEOUT: Duration = Duration::from_secs(20);

fn daemon(devices: u32, limits: Limits) -> (tempfile::TempDir, DaemonHandle, Vec<PathBuf>) {
    daemon_with_pollers(devices, limits, 1)
}

fn daemon_with_pollers(
    devices: u32,
    limits: Limits,
    pollers: usize,
) -> (tempfile::TempDir, DaemonHandle, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let paths = Config::socket_dir_paths(dir.path(), devices);
    let mut config = Config::new(paths.clone());
    config.limits = limits;
    config.pollers = pollers;
    let d = vfabric_device::start(config).expect("start vfabricd");
    (dir, d, paths)
}

fn domain(path: &PathBuf) -> Domain {
    Domain::open(
        path,
        DomainAttr {
            mem_bytes: 32 << 20,
            ..Default::default()
        },
    )
    .expect("open domain")
}

/// An enabled RDM endpoint of `dom` with its own CQ (both directions) and AV.
fn endpoint_on(dom: &Domain) -> (CompletionQueue, vfabric::AddressVector, vfabric::Endpoint) {
    let cq = dom.cq_open(CqAttr::default()).unwrap();
    let av = dom.av_open().unwrap();
    let ep = dom.endpoint(EpAttr::default()).unwrap();
    ep.bind_cq(&cq, BindFlags::BOTH).unwrap();
    ep.bind_av(&av).unwrap();
    ep.enable().unwrap();
    (cq, av, ep)
}

/// Poll until an entry arrives; an error entry fails the test.
fn next(cq: &CompletionQueue) -> CqEntry {
    let deadline = Instant::now() + TIMEOUT;
    let mut v = Vec::new();
    loop {
        match cq.read(&mut v, 1) {
            Ok(_) => return v.pop().unwrap(),
            Err(Error::Again) => {}
            Err(Error::Avail) => panic!("error completion: {:?}", cq.readerr()),
            Err(e) => panic!("cq read: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for a completion"
        );
        std::thread::yield_now();
    }
}

/// Drain whatever is there now (driving progress for `settle`).
fn drain_for(cq: &CompletionQueue, settle: Duration) -> Vec<CqEntry> {
    let until = Instant::now() + settle;
    let mut v = Vec::new();
    while Instant::now() < until {
        match cq.read(&mut v, 64) {
            Ok(_) | Err(Error::Again) => std::thread::sleep(Duration::from_millis(1)),
            Err(Error::Avail) => panic!("error completion: {:?}", cq.readerr()),
            Err(e) => panic!("cq read: {e}"),
        }
    }
    v
}

fn payload(seq: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seq as usize * 31 + i * 7) as u8)
        .collect()
}

#[test]
fn unexpected_messages_past_the_bound_hold_senders_and_lose_nothing() {
    // Fewer than fit in the TX ring (each posted send holds ring slots while it waits), yet
    // four times what the device may buffer.
    const MSGS: u32 = 60;
    const LEN: usize = 4096;
    let limits = Limits {
        max_unexpected_bytes: 64 << 10,
        eager_threshold: 16 << 10,
        ..Limits::default()
    };
    let (_dir, d, paths) = daemon(2, limits);
    let (da, db) = (domain(&paths[0]), domain(&paths[1]));
    let (atx, arx) = (
        da.cq_open(CqAttr::default()).unwrap(),
        da.cq_open(CqAttr::default()).unwrap(),
    );
    let (btx, brx) = (
        db.cq_open(CqAttr::default()).unwrap(),
        db.cq_open(CqAttr::default()).unwrap(),
    );
    let (ava, avb) = (da.av_open().unwrap(), db.av_open().unwrap());
    let a = da.endpoint(EpAttr::default()).unwrap();
    let b = db.endpoint(EpAttr::default()).unwrap();
    for (ep, tx, rx, av) in [(&a, &atx, &arx, &ava), (&b, &btx, &brx, &avb)] {
        ep.bind_cq(tx, BindFlags::TRANSMIT).unwrap();
        ep.bind_cq(rx, BindFlags::RECV).unwrap();
        ep.bind_av(av).unwrap();
        ep.enable().unwrap();
    }
    let to_b: FiAddr = ava.insert(b.name()).unwrap();

    // A sends far more than the device may hold for B, which has posted nothing.
    let t0 = Instant::now();
    for seq in 0..MSGS {
        loop {
            match a.send(&payload(seq, LEN), to_b, seq as u64) {
                Ok(()) => break,
                Err(Error::Again) => {
                    da.progress().unwrap();
                    assert!(t0.elapsed() < TIMEOUT, "send {seq} stuck in Again");
                    std::thread::yield_now();
                }
                Err(e) => panic!("send {seq}: {e}"),
            }
        }
    }
    let early = drain_for(&atx, Duration::from_millis(300));
    let bound_msgs = (64 << 10) / (LEN + 64);
    assert!(
        !early.is_empty() && early.len() <= bound_msgs,
        "{} sends completed before any receive; the bound allows {bound_msgs}",
        early.len()
    );
    // The ones that completed are the first ones, in order (FIFO per pair).
    for (i, e) in early.iter().enumerate() {
        assert_eq!(e.context, i as u64);
    }

    // B now receives everything: in order, intact, nothing lost.
    for seq in 0..MSGS {
        loop {
            match b.recv_vec(LEN, 1000 + seq as u64) {
                Ok(()) => break,
                Err(Error::Again) => {
                    db.progress().unwrap();
                    assert!(t0.elapsed() < TIMEOUT, "recv {seq} stuck in Again");
                    std::thread::yield_now();
                }
                Err(e) => panic!("recv {seq}: {e}"),
            }
        }
    }
    for seq in 0..MSGS {
        let e = next(&brx);
        assert_eq!(e.context, 1000 + seq as u64);
        assert_eq!(e.len, LEN);
        assert_eq!(
            e.buf.as_deref(),
            Some(payload(seq, LEN).as_slice()),
            "message {seq}"
        );
    }
    let mut done: Vec<u64> = early.iter().map(|e| e.context).collect();
    while done.len() < MSGS as usize {
        done.push(next(&atx).context);
    }
    assert_eq!(done, (0..MSGS as u64).collect::<Vec<_>>());
    let st = d.stats();
    assert_eq!(st.devices[1].messages_received, MSGS as u64);
    assert_eq!(st.devices[0].messages_sent, MSGS as u64);
}

#[test]
fn several_devices_with_several_endpoints_each() {
    const DEVICES: usize = 3;
    const EPS: usize = 4;
    // Two pollers: devices 0 and 2 share one, device 1 has the other, and traffic crosses.
    let (_dir, d, paths) = daemon_with_pollers(DEVICES as u32, Limits::default(), 2);
    struct Ep {
        ep: vfabric::Endpoint,
        cq: CompletionQueue,
        av: vfabric::AddressVector,
    }
    let domains: Vec<Domain> = paths.iter().map(domain).collect();
    let mut eps: Vec<(usize, Ep)> = Vec::new();
    for (di, dom) in domains.iter().enumerate() {
        for _ in 0..EPS {
            let (cq, av, ep) = endpoint_on(dom);
            eps.push((di, Ep { ep, cq, av }));
        }
    }
    let n = eps.len();
    let names: Vec<_> = eps.iter().map(|(_, e)| e.ep.name()).collect();
    assert_eq!(
        names.iter().collect::<HashSet<_>>().len(),
        n,
        "addresses are unique"
    );
    // Every endpoint posts a tagged receive for each other endpoint (tag = source index) ...
    for (i, (_, e)) in eps.iter().enumerate() {
        for j in 0..n {
            if j != i {
                e.ep.trecv_vec(64, j as u64, 0, (i * 1000 + j) as u64)
                    .unwrap();
            }
        }
    }
    // ... and sends one to each: tag = own index, payload names both ends.
    for (i, (_, e)) in eps.iter().enumerate() {
        for (j, name) in names.iter().enumerate() {
            if j == i {
                continue;
            }
            let dest = e.av.insert(*name).unwrap();
            let msg = format!("{i}->{j}");
            e.ep.tsend(msg.as_bytes(), dest, i as u64, (100_000 + j) as u64)
                .unwrap();
        }
    }
    for (i, (di, e)) in eps.iter().enumerate() {
        let mut got = HashSet::new();
        let mut sent = 0;
        while got.len() < n - 1 || sent < n - 1 {
            let c = next(&e.cq);
            if c.context >= 100_000 {
                sent += 1;
                continue;
            }
            let j = (c.context % 1000) as usize;
            assert_eq!(c.tag, j as u64);
            let text = String::from_utf8(c.buf.clone().unwrap()).unwrap();
            assert_eq!(text, format!("{j}->{i}"), "endpoint {i} on device {di}");
            assert_eq!(c.src, Some(names[j]));
            assert!(got.insert(j), "endpoint {i} got {j} twice");
        }
    }
    let st = d.stats();
    let total: u64 = st.devices.iter().map(|s| s.messages_received).sum();
    assert_eq!(total, (n * (n - 1)) as u64);
}

/// One guest: domain, CQ, AV and an enabled RDM endpoint on device `path`.
struct LazyGuest {
    dom: Domain,
    cq: CompletionQueue,
    av: vfabric::AddressVector,
    ep: vfabric::Endpoint,
}

fn lazy_guest(path: &PathBuf) -> LazyGuest {
    let dom = domain(path);
    let (cq, av, ep) = endpoint_on(&dom);
    LazyGuest { dom, cq, av, ep }
}

/// The next entry, which must be an error entry; panics after [`TIMEOUT`].
fn next_err(cq: &CompletionQueue) -> vfabric::CqErrEntry {
    let deadline = Instant::now() + TIMEOUT;
    let mut v = Vec::new();
    loop {
        match cq.read(&mut v, 1) {
            Ok(_) => panic!("expected an error entry, got {:?}", v.pop()),
            Err(Error::Again) => {}
            Err(Error::Avail) => return cq.readerr().expect("error entry"),
            Err(e) => panic!("cq read: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for an error entry"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// LAZY_RX, with a blocking device (no poller) and with a poller: plain receives are posted
/// without a kick (the device leaves its RX notifications off while it holds nothing
/// unexpected) and taken when a message needs them — a message that finds them untaken wakes
/// the device, which takes them and matches it, in order. Receives that complete by
/// themselves still reach the device: a PEEK with no message answers NoMessage at once, a
/// directed receive whose source closes fails (the close wakes the device to take it), and so
/// does one posted after its source closed (the device looks at quiet RX rings again soon).
#[test]
fn plain_receives_need_no_kick_and_are_taken_when_a_message_needs_them() {
    for poll_us in [0, 50] {
        let dir = tempfile::tempdir().unwrap();
        let paths = Config::socket_dir_paths(dir.path(), 2);
        let mut config = Config::new(paths.clone());
        config.poll_us = poll_us;
        let _d = vfabric_device::start(config).expect("start vfabricd");
        let (a, b) = (lazy_guest(&paths[0]), lazy_guest(&paths[1]));
        assert!(
            b.dom.negotiated_features()
                & vfabric_proto::bit(vfabric_proto::VIRTIO_FABRIC_F_LAZY_RX)
                != 0,
            "LAZY_RX negotiated"
        );
        let to_b = a.av.insert(b.ep.name()).unwrap();
        let to_a = b.av.insert(a.ep.name()).unwrap();
        // Round one: the rings start (the first receive may kick once).
        b.ep.recv_vec(64, 1).unwrap();
        a.ep.send(b"first", to_b, 100).unwrap();
        assert_eq!(next(&b.cq).buf.as_deref(), Some(&b"first"[..]));
        next(&a.cq);
        // Four receives, a pause after each (time for a device to take a receive and re-arm
        // its ring, after which, without LAZY_RX, the next receive would kick): no kick for
        // them (one at most, if the device's RX check found its ring idle just before and
        // turned its notifications back on).
        let kicks = b.dom.stats().kicks;
        for i in 0..4 {
            b.ep.recv_vec(64, 10 + i).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(
            b.dom.stats().kicks <= kicks + 1,
            "poll_us={poll_us}: plain receives kicked the device"
        );
        // Their messages find them (taken on the first message's wake-up), in order.
        for i in 0..4u64 {
            a.ep.send(format!("m{i}").as_bytes(), to_b, 200 + i)
                .unwrap();
        }
        for i in 0..4u64 {
            let c = next(&b.cq);
            assert_eq!(c.context, 10 + i, "poll_us={poll_us}: in order");
            assert_eq!(c.buf.as_deref(), Some(format!("m{i}").as_bytes()));
        }
        for _ in 0..4 {
            next(&a.cq);
        }
        // A message sent before its receive is posted waits unexpected: the receive kicks
        // (the device keeps RX notifications on while it holds the message) and gets it.
        a.ep.send(b"early", to_b, 300).unwrap();
        next(&a.cq);
        std::thread::sleep(Duration::from_millis(20));
        b.ep.recv_vec(64, 30).unwrap();
        let c = next(&b.cq);
        assert_eq!((c.context, c.buf.as_deref()), (30, Some(&b"early"[..])));
        // A PEEK with nothing to find answers at once.
        b.ep.trecvmsg_vec(64, vfabric::FI_ADDR_UNSPEC, 7, 0, 40, vfabric::fi::PEEK)
            .unwrap();
        let e = next_err(&b.cq);
        assert_eq!(
            (e.context, e.status),
            (40, vfabric::Status::NoMessage),
            "poll_us={poll_us}"
        );
        // B answers A once (its device takes its RX ring), then posts a receive directed at
        // A's endpoint and leaves it; A closes that endpoint: the receive fails.
        b.ep.recv_vec_from(64, to_a, 50).unwrap();
        let a_name = a.ep.name();
        drop(a);
        let e = next_err(&b.cq);
        assert_eq!(
            (e.context, e.status),
            (50, vfabric::Status::PeerGone),
            "poll_us={poll_us}: the directed receive names {a_name:?}"
        );
        // A receive directed at the source already closed completes by itself, though nothing
        // else happens: the device looks at its quiet RX ring again after a few milliseconds.
        std::thread::sleep(Duration::from_millis(50));
        b.ep.recv_vec_from(64, to_a, 60).unwrap();
        let e = next_err(&b.cq);
        assert_eq!(
            (e.context, e.status),
            (60, vfabric::Status::PeerGone),
            "poll_us={poll_us}: a receive directed at a closed source"
        );
    }
}

/// A thread sleeping in `sread` on a CQ whose entry another thread's progress delivered (the
/// CQ's signal eventfd woke it) sleeps for real the next time: the signal is reset when it
/// wakes a sleeper, so a later `sread` with nothing to come does not return from every sleep
/// at once and spin until its timeout.
#[test]
fn a_cq_signal_that_woke_a_sleeper_does_not_end_its_later_sleeps() {
    let (_dir, _d, paths) = daemon(2, Limits::default());
    let a = domain(&paths[0]);
    let b = lazy_guest(&paths[1]);
    let tx_cq = a
        .cq_open(CqAttr {
            wait: vfabric::WaitMode::Blocking,
            ..Default::default()
        })
        .unwrap();
    let rx_cq = a.cq_open(CqAttr::default()).unwrap();
    let av = a.av_open().unwrap();
    let ep = a.endpoint(EpAttr::default()).unwrap();
    ep.bind_cq(&tx_cq, BindFlags::TRANSMIT).unwrap();
    ep.bind_cq(&rx_cq, BindFlags::RECV).unwrap();
    ep.bind_av(&av).unwrap();
    ep.enable().unwrap();
    let to_b = av.insert(b.ep.name()).unwrap();
    // Another thread keeps driving the domain's progress through the RX CQ, so the sends'
    // completions often reach the TX CQ through its queue and signal, not its own drain.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinner = {
        let (stop, rx_cq) = (stop.clone(), rx_cq);
        std::thread::spawn(move || {
            let mut v = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = rx_cq.read(&mut v, 16);
                std::thread::yield_now();
            }
        })
    };
    let mut worst = 0;
    for i in 0..20u64 {
        b.ep.recv_vec(64, i).unwrap();
        ep.send(b"ping", to_b, i).unwrap();
        let mut v = Vec::new();
        tx_cq
            .sread(&mut v, 1, Some(TIMEOUT))
            .expect("the send's completion");
        next(&b.cq);
        // Nothing more comes: 50 ms of sleep, in a few sleeps at most.
        let before = a.stats().sleeps;
        let r = tx_cq.sread(&mut v, 1, Some(Duration::from_millis(50)));
        assert!(matches!(r, Err(Error::Timeout)), "{r:?}");
        worst = worst.max(a.stats().sleeps - before);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    spinner.join().unwrap();
    assert!(
        worst <= 5,
        "a 50 ms sread slept {worst} times (its signal eventfd stayed readable)"
    );
}
