// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The target commit handler (spec §6.17.3): `Domain::set_commit_handler`, its verdict at the
//! initiator (success, refusal with the handler's value), the device's commit timeout when the
//! handler never returns, the target endpoint going away while a commit waits, and replies the
//! device must refuse (unknown id, replay, another device's event). An embedded `vfabricd`
//! and driver domains in this process; every wait is bounded.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vfabric::{fi, CommitEvent, Domain, RmaIov, Status};

mod common;
use common::*;

const RW: u64 = fi::REMOTE_READ | fi::REMOTE_WRITE;

fn rig_with_timeout(devices: u32, timeout: Duration) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let paths = vfabric_device::Config::socket_dir_paths(dir.path(), devices);
    let mut config = vfabric_device::Config::new(paths.clone());
    config.commit_timeout = timeout;
    let daemon = vfabric_device::start(config).expect("start embedded vfabricd");
    Rig {
        _dir: dir,
        daemon: Some(daemon),
        paths,
    }
}

fn pmem_file(r: &Rig, name: &str, len: u64) -> File {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(r._dir.path().join(name))
        .unwrap();
    f.set_len(len).unwrap();
    f
}

/// A 4 KiB persistent region of `db` on a fresh file `name`, and its first 8 bytes as a commit
/// range.
fn handled_range(r: &Rig, db: &Domain, name: &str) -> (vfabric::PmemRegion, [RmaIov; 1]) {
    let f = pmem_file(r, name, 4096);
    let region = db.register_pmem(&f, 0, 4096, RW).unwrap();
    let range = [RmaIov {
        addr: region.base(),
        len: 8,
        key: region.key(),
    }];
    (region, range)
}

/// Drive `d`'s progress on another thread (the target application's progress) until the
/// returned flag is set.
fn progress_thread<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    d: &'s Domain,
) -> (Arc<AtomicBool>, std::thread::ScopedJoinHandle<'s, ()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let h = s.spawn(move || {
        let until = Instant::now() + TIMEOUT;
        while !flag.load(Ordering::Acquire) && Instant::now() < until {
            let _ = d.progress();
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    (stop, h)
}

/// Install a handler that reports each event's id on the first channel and then blocks until the
/// test sends on the second (bounded, so a failing test cannot hang); its verdict is success.
fn install_blocking_handler(db: &Domain) -> (mpsc::Receiver<u64>, mpsc::Sender<()>) {
    let (entered_tx, entered) = mpsc::channel::<u64>();
    let (release, released) = mpsc::channel::<()>();
    let released = Mutex::new(released);
    let entered_tx = Mutex::new(entered_tx);
    db.set_commit_handler(Some(Arc::new(move |ev: &CommitEvent| {
        entered_tx.lock().unwrap().send(ev.id).unwrap();
        let _ = released
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(20));
        0
    })));
    (entered, release)
}

#[test]
fn handler_sees_the_commit_and_its_success_completes_the_initiator() {
    let r = rig(2);
    let p = rdm_pair(&r, 16, 64);
    let seen: Arc<Mutex<Vec<CommitEvent>>> = Arc::default();
    let log = seen.clone();
    p.db.set_commit_handler(Some(Arc::new(move |ev: &CommitEvent| {
        log.lock().unwrap().push(ev.clone());
        0
    })));
    let f = pmem_file(&r, "h0", 1 << 16);
    let region = p.db.register_pmem(&f, 0, 1 << 16, RW).unwrap();
    let ranges = [
        RmaIov {
            addr: region.base() + 100,
            len: 5000,
            key: region.key(),
        },
        RmaIov {
            addr: region.base() + 9000,
            len: 0,
            key: region.key(),
        },
    ];
    let before = p.db.device_counters().unwrap().persisted_ranges;
    std::thread::scope(|s| {
        let (stop, h) = progress_thread(s, &p.db);
        p.a.ep
            .write(&[7; 5000], p.b_addr, ranges[0].addr, region.key(), 1)
            .unwrap();
        next_ok(&p.a.tx);
        p.a.ep.commit(&ranges, p.b_addr, 0, 2).unwrap();
        let c = next_ok(&p.a.tx);
        assert_eq!(c.context, 2);
        // The handler ran before the initiator's completion.
        let evs = seen.lock().unwrap().clone();
        assert_eq!(evs.len(), 1, "one event per commit");
        let ev = &evs[0];
        assert_eq!(ev.initiator, p.a.ep.name());
        assert_eq!(ev.target_ep, p.b.ep.name().ep);
        assert_ne!(ev.flags & fi::COMMIT_COMPLETE, 0);
        assert_ne!(ev.flags & fi::SAVE, 0, "a commit is a save of the ranges");
        assert_eq!(ev.data, None);
        assert_eq!(ev.ranges.len(), 2);
        for (got, want) in ev.ranges.iter().zip(&ranges) {
            assert_eq!(
                (got.addr, got.len, got.key),
                (want.addr, want.len, want.key)
            );
        }
        // A save at COMMIT_COMPLETE is a commit too.
        p.a.ep
            .save(&ranges[..1], p.b_addr, fi::COMMIT_COMPLETE, None, 3)
            .unwrap();
        assert_eq!(next_ok(&p.a.tx).context, 3);
        assert_eq!(seen.lock().unwrap().len(), 2);
        // A visibility save does not involve the handler.
        p.a.ep
            .save(&ranges[..1], p.b_addr, fi::DELIVERY_COMPLETE, None, 4)
            .unwrap();
        assert_eq!(next_ok(&p.a.tx).context, 4);
        assert_eq!(seen.lock().unwrap().len(), 2);
        stop.store(true, Ordering::Release);
        h.join().unwrap();
    });
    // The ranges were persisted before the verdict (the device persists, then asks).
    let after = p.db.device_counters().unwrap().persisted_ranges;
    // The 5000-byte range, then the save's (the empty range has nothing to persist).
    assert_eq!(after - before, 2);
    drop(region);
}

#[test]
fn handler_refusal_reaches_the_initiator_with_its_value() {
    let r = rig(2);
    let p = rdm_pair(&r, 16, 64);
    let answer = Arc::new(AtomicUsize::new(42));
    let a2 = answer.clone();
    p.db.set_commit_handler(Some(Arc::new(move |_: &CommitEvent| {
        a2.load(Ordering::Acquire) as i32
    })));
    let f = pmem_file(&r, "h1", 4096);
    let region = p.db.register_pmem(&f, 0, 4096, RW).unwrap();
    let range = [RmaIov {
        addr: region.base(),
        len: 64,
        key: region.key(),
    }];
    std::thread::scope(|s| {
        let (stop, h) = progress_thread(s, &p.db);
        p.a.ep.commit(&range, p.b_addr, 0, 9).unwrap();
        let e = next_err(&p.a.tx);
        assert_eq!(e.context, 9);
        assert_eq!(e.status, Status::CommitRefused);
        assert_eq!(e.err, fi::EIO);
        assert_eq!(e.prov_errno, Status::CommitRefused as i32);
        assert_eq!(e.data as i64, 42, "the handler's value");
        // Negative values (an errno) come through sign-extended.
        answer.store((-5i32) as u32 as usize, Ordering::Release);
        p.a.ep.commit(&range, p.b_addr, 0, 10).unwrap();
        let e = next_err(&p.a.tx);
        assert_eq!(e.data as i64, -5);
        // And 0 again accepts.
        answer.store(0, Ordering::Release);
        p.a.ep.commit(&range, p.b_addr, 0, 11).unwrap();
        assert_eq!(next_ok(&p.a.tx).context, 11);
        stop.store(true, Ordering::Release);
        h.join().unwrap();
    });
    drop(region);
}

#[test]
fn a_handler_that_never_returns_times_the_commit_out() {
    let r = rig_with_timeout(2, Duration::from_millis(300));
    let p = rdm_pair(&r, 16, 64);
    let (entered, release) = install_blocking_handler(&p.db);
    let (region, range) = handled_range(&r, &p.db, "h2");
    std::thread::scope(|s| {
        let (stop, h) = progress_thread(s, &p.db);
        p.a.ep.commit(&range, p.b_addr, 0, 1).unwrap();
        let id = entered.recv_timeout(TIMEOUT).expect("the handler runs");
        let e = next_err(&p.a.tx);
        assert_eq!(e.status, Status::TimedOut);
        assert_eq!(e.err, fi::ETIMEDOUT);
        // The late verdict finds nothing; the device answers INVALID and goes on.
        release.send(()).unwrap();
        stop.store(true, Ordering::Release);
        h.join().unwrap();
        assert_eq!(p.db.commit_reply_raw(id, 0).unwrap(), Status::Invalid);
    });
    // The daemon still serves commits.
    p.db.set_commit_handler(Some(Arc::new(|_: &CommitEvent| 0)));
    std::thread::scope(|s| {
        let (stop, h) = progress_thread(s, &p.db);
        p.a.ep.commit(&range, p.b_addr, 0, 2).unwrap();
        assert_eq!(next_ok(&p.a.tx).context, 2);
        stop.store(true, Ordering::Release);
        h.join().unwrap();
    });
    drop(region);
}

#[test]
fn the_target_endpoint_closing_fails_waiting_commits_peer_gone() {
    let r = rig(2);
    let p = rdm_pair(&r, 16, 64);
    let (entered, release) = install_blocking_handler(&p.db);
    let (region, range) = handled_range(&r, &p.db, "h3");
    let Pair {
        da,
        db,
        a,
        b,
        b_addr,
    } = p;
    std::thread::scope(|s| {
        let (stop, h) = progress_thread(s, &db);
        a.ep.commit(&range, b_addr, 0, 1).unwrap();
        let id = entered.recv_timeout(TIMEOUT).expect("the handler runs");
        // The target application closes its endpoint while its handler is stuck.
        drop(b);
        let e = next_err(&a.tx);
        assert_eq!(e.status, Status::PeerGone);
        release.send(()).unwrap();
        stop.store(true, Ordering::Release);
        h.join().unwrap();
        assert_eq!(db.commit_reply_raw(id, 0).unwrap(), Status::Invalid);
    });
    drop(region);
    drop(db);
    // The daemon goes on: a new target on the same device takes commits.
    let db = open_domain_mb(&r.paths[1], 16);
    let b = rdm_endpoint(&db, 64);
    db.set_commit_handler(Some(Arc::new(|_: &CommitEvent| 0)));
    let f = pmem_file(&r, "h4", 4096);
    let region = db.register_pmem(&f, 0, 4096, RW).unwrap();
    let b_addr = a.av.insert(b.ep.name()).unwrap();
    let range = [RmaIov {
        addr: region.base(),
        len: 8,
        key: region.key(),
    }];
    std::thread::scope(|s| {
        let (stop, h) = progress_thread(s, &db);
        a.ep.commit(&range, b_addr, 0, 5).unwrap();
        assert_eq!(next_ok(&a.tx).context, 5);
        stop.store(true, Ordering::Release);
        h.join().unwrap();
    });
    drop(region);
    drop(da);
}

#[test]
fn replies_for_unknown_answered_or_foreign_events_are_invalid() {
    let r = rig(3);
    let p = rdm_pair(&r, 16, 64);
    let other = open_domain_mb(&r.paths[2], 4);
    let ids: Arc<Mutex<Vec<u64>>> = Arc::default();
    let foreign: Arc<Mutex<Vec<Status>>> = Arc::default();
    let (log, bad) = (ids.clone(), foreign.clone());
    let other = Arc::new(other);
    let o2 = other.clone();
    p.db.set_commit_handler(Some(Arc::new(move |ev: &CommitEvent| {
        log.lock().unwrap().push(ev.id);
        // Another device names this event while it waits: refused, and it stays pending.
        bad.lock()
            .unwrap()
            .push(o2.commit_reply_raw(ev.id, 0).unwrap());
        7
    })));
    let (region, range) = handled_range(&r, &p.db, "h5");
    // Never handed out.
    assert_eq!(p.db.commit_reply_raw(u64::MAX, 0).unwrap(), Status::Invalid);
    assert_eq!(p.db.commit_reply_raw(0, 0).unwrap(), Status::Invalid);
    std::thread::scope(|s| {
        let (stop, h) = progress_thread(s, &p.db);
        p.a.ep.commit(&range, p.b_addr, 0, 1).unwrap();
        let e = next_err(&p.a.tx);
        // The handler's verdict, not the foreign success, completed it.
        assert_eq!((e.status, e.data as i64), (Status::CommitRefused, 7));
        stop.store(true, Ordering::Release);
        h.join().unwrap();
    });
    assert_eq!(foreign.lock().unwrap().as_slice(), &[Status::Invalid]);
    let id = ids.lock().unwrap()[0];
    // Answered already: a replay is refused.
    assert_eq!(p.db.commit_reply_raw(id, 0).unwrap(), Status::Invalid);
    // The initiator's device has no such event either.
    assert_eq!(p.da.commit_reply_raw(id, 0).unwrap(), Status::Invalid);
    drop(region);
}

#[test]
fn regions_registered_without_a_handler_commit_without_one() {
    let r = rig(2);
    let p = rdm_pair(&r, 16, 64);
    let f = pmem_file(&r, "h6", 4096);
    // Registered before any handler: not handled; the commit needs no target progress.
    let region = p.db.register_pmem(&f, 0, 4096, RW).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    p.db.set_commit_handler(Some(Arc::new(move |_: &CommitEvent| {
        c2.fetch_add(1, Ordering::AcqRel);
        1
    })));
    let range = [RmaIov {
        addr: region.base(),
        len: 8,
        key: region.key(),
    }];
    p.a.ep.commit(&range, p.b_addr, 0, 1).unwrap();
    assert_eq!(next_ok(&p.a.tx).context, 1);
    p.db.progress().unwrap();
    assert_eq!(calls.load(Ordering::Acquire), 0);
    drop(region);
}

#[test]
fn commits_waiting_at_one_device_are_bounded() {
    // vfabricd keeps at most 256 handled commits waiting per target device.
    const LIMIT: usize = 256;
    let r = rig_with_timeout(2, Duration::from_secs(2));
    let attr = vfabric::DomainAttr {
        mem_bytes: 16 << 20,
        queue_size: 1024,
        ..Default::default()
    };
    let da = Domain::open(&r.paths[0], attr.clone()).unwrap();
    let db = open_domain_mb(&r.paths[1], 16);
    let a = rdm_endpoint(&da, 2048);
    let b = rdm_endpoint(&db, 64);
    let b_addr = a.av.insert(b.ep.name()).unwrap();
    // The target never progresses: its handler never runs.
    db.set_commit_handler(Some(Arc::new(|_: &CommitEvent| 0)));
    let f = pmem_file(&r, "h7", 4096);
    let region = db.register_pmem(&f, 0, 4096, RW).unwrap();
    // Empty ranges: no msync each, so all of them are in before the first deadline.
    let range = [RmaIov {
        addr: region.base(),
        len: 0,
        key: region.key(),
    }];
    for i in 0..=LIMIT {
        a.ep.commit(&range, b_addr, 0, i as u64).unwrap();
    }
    // The one beyond the bound is refused at once; the others time out.
    let mut refused = 0;
    let mut timed_out = 0;
    for _ in 0..=LIMIT {
        let e = next_err(&a.tx);
        match e.status {
            Status::NoResources => {
                refused += 1;
                assert_eq!(e.context, LIMIT as u64);
                assert_eq!(e.err, fi::EAGAIN);
            }
            Status::TimedOut => timed_out += 1,
            s => panic!("unexpected {s:?}"),
        }
    }
    assert_eq!((refused, timed_out), (1, LIMIT));
    drop(region);
}

#[test]
fn a_fenced_request_waits_for_an_earlier_commit_verdict() {
    let r = rig(2);
    let p = rdm_pair(&r, 16, 64);
    p.db.set_commit_handler(Some(Arc::new(|_: &CommitEvent| 0)));
    let (region, range) = handled_range(&r, &p.db, "h8");
    p.a.ep.commit(&range, p.b_addr, 0, 1).unwrap();
    let src = [9u8; 16];
    p.a.ep
        .writemsg(
            &vfabric::RmaMsg {
                iov: &[vfabric::Iov::bytes(&src)],
                addr: p.b_addr,
                rma_iov: &[RmaIov {
                    addr: region.base() + 64,
                    len: 16,
                    key: region.key(),
                }],
                context: 2,
                data: 0,
            },
            fi::FENCE,
        )
        .unwrap();
    // The target has not progressed: neither the commit nor the write behind its fence is done.
    assert_quiet(&p.a.tx, Duration::from_millis(200));
    std::thread::scope(|s| {
        let (stop, h) = progress_thread(s, &p.db);
        assert_eq!(next_ok(&p.a.tx).context, 1);
        assert_eq!(next_ok(&p.a.tx).context, 2);
        stop.store(true, Ordering::Release);
        h.join().unwrap();
    });
    drop(region);
}

#[test]
fn an_initiator_going_away_withdraws_its_waiting_commits() {
    let r = rig(2);
    let p = rdm_pair(&r, 16, 64);
    let (entered, release) = install_blocking_handler(&p.db);
    let (region, range) = handled_range(&r, &p.db, "h9");
    let Pair {
        da,
        db,
        a,
        b,
        b_addr,
    } = p;
    std::thread::scope(|s| {
        let (stop, h) = progress_thread(s, &db);
        a.ep.commit(&range, b_addr, 0, 1).unwrap();
        let id = entered.recv_timeout(TIMEOUT).expect("the handler runs");
        // The initiator's process leaves (its device disconnects) while the verdict is awaited.
        drop(a);
        drop(da);
        // Once the daemon has torn the initiator's device down, its commit is withdrawn: a
        // verdict has nothing left to complete.
        let deadline = Instant::now() + TIMEOUT;
        while r.daemon.as_ref().unwrap().stats().devices[0].connected {
            assert!(
                Instant::now() < deadline,
                "the initiator's device stays connected"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(db.commit_reply_raw(id, 0).unwrap(), Status::Invalid);
        release.send(()).unwrap();
        stop.store(true, Ordering::Release);
        h.join().unwrap();
    });
    // The target goes on with a new initiator.
    let da = open_domain_mb(&r.paths[0], 16);
    let a = rdm_endpoint(&da, 64);
    let b_addr = a.av.insert(b.ep.name()).unwrap();
    db.set_commit_handler(Some(Arc::new(|_: &CommitEvent| 0)));
    std::thread::scope(|s| {
        let (stop, h) = progress_thread(s, &db);
        a.ep.commit(&range, b_addr, 0, 2).unwrap();
        assert_eq!(next_ok(&a.tx).context, 2);
        stop.store(true, Ordering::Release);
        h.join().unwrap();
    });
    drop(region);
}
