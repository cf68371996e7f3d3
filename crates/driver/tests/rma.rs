// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! RMA, atomics, memory registration and counters end to end: an embedded `vfabricd` and
//! driver domains in this process. Every wait has a timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vfabric::proto::{atomic_op as op, datatype as dt};
use vfabric::{
    fi, AtomicMsg, CqErrEntry, Domain, Endpoint, Error, FiAddr, Iov, MemoryRegion, MrAttr, RmaIov,
    RmaMsg, SharedBuf, Status,
};

mod common;
use common::*;

const RW: u64 = fi::REMOTE_READ | fi::REMOTE_WRITE;

fn open_domain(path: &std::path::Path) -> Domain {
    open_domain_mb(path, 48)
}

fn endpoint(domain: &Domain) -> Ep {
    rdm_endpoint(domain, 512)
}

fn pair(r: &Rig) -> Pair {
    rdm_pair(r, 48, 512)
}

fn region(d: &Domain, len: usize, access: u64) -> (SharedBuf, MemoryRegion) {
    let buf = d.alloc_buffer(len.max(1)).unwrap();
    let mr = d.register(&buf, access, None).unwrap();
    (buf, mr)
}

#[test]
fn caps_and_features_report_rma_and_atomics() {
    let r = rig(1);
    let d = open_domain(&r.paths[0]);
    let info = d.info();
    assert!(info.caps & fi::RMA != 0 && info.caps & fi::ATOMIC != 0);
    assert_eq!(info.limits.mr_key_size, Some(8));
    assert!(info.limits.max_rma_size.unwrap() >= 4 << 20);
    assert_eq!(info.limits.max_atomic_count, Some(4096));
    let e = endpoint(&d);
    assert_eq!(e.ep.atomic_valid(dt::UINT64, op::SUM).unwrap(), 4096);
    assert_eq!(
        e.ep.fetch_atomic_valid(dt::DOUBLE, op::ATOMIC_READ)
            .unwrap(),
        4096
    );
    assert_eq!(
        e.ep.compare_atomic_valid(dt::INT8, op::MSWAP).unwrap(),
        4096
    );
    assert!(matches!(
        e.ep.atomic_valid(dt::DOUBLE, op::BOR),
        Err(Error::Unsupported(_))
    ));
    assert!(matches!(
        e.ep.atomic_valid(dt::FLOAT_COMPLEX, op::SUM),
        Err(Error::Unsupported(_))
    ));
    assert!(matches!(
        e.ep.atomic_valid(dt::UINT64, op::CSWAP),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn registration_keys_and_addressing() {
    let r = rig(1);
    let d = open_domain(&r.paths[0]);
    let buf = d.alloc_buffer(4096).unwrap();
    let a = d.register(&buf, RW, None).unwrap();
    let b = d.register(&buf, RW, None).unwrap();
    assert_ne!(a.key(), b.key(), "provider keys are distinct");
    assert_eq!(a.base(), buf.addr());
    let c = d.register(&buf, fi::REMOTE_READ, Some(42)).unwrap();
    assert_eq!(c.key(), 42);
    match d.register(&buf, fi::REMOTE_READ, Some(42)) {
        Err(Error::Device(Status::KeyInUse)) => {}
        other => panic!("taken key accepted: {other:?}"),
    }
    drop(c);
    // Free again after deregistration.
    let c = d.register(&buf, fi::REMOTE_WRITE, Some(42)).unwrap();
    c.close().unwrap();
    // Local-only access needs no device registration.
    let l = d.register(&buf, fi::SEND | fi::RECV, None).unwrap();
    assert_eq!(l.desc(), buf.addr());
    let off = d
        .register_with(
            &buf,
            16..32,
            &MrAttr {
                access: RW,
                offset_addressing: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(off.base(), 0);
    assert_eq!(off.len(), 16);
}

#[test]
fn write_read_integrity_across_sizes() {
    let r = rig(2);
    let p = pair(&r);
    const MAX: usize = 4 << 20;
    let (tbuf, tmr) = region(&p.db, MAX + 128, RW);
    let mut src = p.da.alloc_buffer(MAX).unwrap();
    let back = p.da.alloc_buffer(MAX).unwrap();
    let mut rng = Xorshift(0x1234_5678);
    for (i, &n) in [
        0usize,
        1,
        7,
        64,
        223,
        224,
        225,
        4095,
        4096,
        65537,
        1 << 20,
        MAX,
    ]
    .iter()
    .enumerate()
    {
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        rng.fill(&mut unsafe { src.as_mut_slice() }[..n]);
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        let sum = checksum(&unsafe { src.as_slice() }[..n]);
        let off = (i * 8) as u64;
        // Small writes go by value (bounced/inline), larger ones zero-copy.
        if n <= 4096 {
            // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
            let bytes = unsafe { src.as_slice() }[..n].to_vec();
            p.a.ep
                .write(&bytes, p.b_addr, tmr.base() + off, tmr.key(), n as u64)
                .unwrap();
        } else {
            p.a.ep
                .write_buf(&src, 0..n, p.b_addr, tmr.base() + off, tmr.key(), n as u64)
                .unwrap();
        }
        let c = next_ok(&p.a.tx);
        assert_eq!((c.context, c.len), (n as u64, n));
        assert_eq!(c.flags & (fi::RMA | fi::WRITE), fi::RMA | fi::WRITE);
        let off_us = off as usize;
        assert_eq!(
            // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
            checksum(&unsafe { tbuf.as_slice() }[off_us..off_us + n]),
            sum,
            "write of {n}"
        );
        // Read it back, zero-copy and by value.
        p.a.ep
            .read_buf(&back, 0..n, p.b_addr, tmr.base() + off, tmr.key(), 1)
            .unwrap();
        let c = next_ok(&p.a.tx);
        assert_eq!(c.len, n);
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        assert_eq!(
            checksum(&unsafe { back.as_slice() }[..n]),
            sum,
            "read of {n}"
        );
        if n <= 65537 {
            p.a.ep
                .read_vec(n, p.b_addr, tmr.base() + off, tmr.key(), 2)
                .unwrap();
            let c = next_ok(&p.a.tx);
            assert_eq!(checksum(&c.buf.unwrap_or_default()), sum, "read_vec of {n}");
        }
    }
}

#[test]
fn scatter_gather_on_both_sides() {
    let r = rig(2);
    let p = pair(&r);
    let (tbuf, tmr) = region(&p.db, 1 << 20, RW);
    let (tbuf2, tmr2) = region(&p.db, 1 << 16, RW);
    let mut rng = Xorshift(99);
    for &(a, b, c) in &[
        (1usize, 2usize, 3usize),
        (100, 5000, 70000),
        (4096, 0, 4097),
    ] {
        let mut s1 = p.da.alloc_buffer(a).unwrap();
        let mut s2 = p.da.alloc_buffer(b.max(1)).unwrap();
        let mut s3 = vec![0u8; c];
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        rng.fill(unsafe { s1.as_mut_slice() });
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        rng.fill(&mut unsafe { s2.as_mut_slice() }[..b]);
        rng.fill(&mut s3);
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        let mut all = unsafe { s1.as_slice() }.to_vec();
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        all.extend_from_slice(&unsafe { s2.as_slice() }[..b]);
        all.extend_from_slice(&s3);
        let total = all.len();
        let split = total / 3;
        let iov = [
            Iov::shared(&s1, 0..a),
            Iov::shared(&s2, 0..b),
            Iov::bytes(&s3),
        ];
        let rma = [
            RmaIov {
                addr: tmr.base() + 10,
                len: split as u64,
                key: tmr.key(),
            },
            RmaIov {
                addr: tmr2.base() + 3,
                len: (total - split) as u64,
                key: tmr2.key(),
            },
        ];
        p.a.ep
            .writemsg(
                &RmaMsg {
                    iov: &iov,
                    addr: p.b_addr,
                    rma_iov: &rma,
                    context: 7,
                    data: 0,
                },
                fi::DELIVERY_COMPLETE,
            )
            .unwrap();
        assert_eq!(next_ok(&p.a.tx).len, total);
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        assert_eq!(&unsafe { tbuf.as_slice() }[10..10 + split], &all[..split]);
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        assert_eq!(
            &unsafe { tbuf2.as_slice() }[3..3 + total - split],
            &all[split..]
        );
        // Read back into three local pieces of other sizes (one outside the shared region).
        let d1 = p.da.alloc_buffer(total / 2 + 1).unwrap();
        let mut d2 = vec![0u8; total - total / 2 - 1];
        let diov = [
            Iov::shared(&d1, 0..total / 2 + 1),
            // SAFETY: d2 outlives the read, which completes before it is used.
            unsafe { Iov::raw(d2.as_mut_ptr(), d2.len()) },
        ];
        p.a.ep
            .readmsg(
                &RmaMsg {
                    iov: &diov,
                    addr: p.b_addr,
                    rma_iov: &rma,
                    context: 8,
                    data: 0,
                },
                0,
            )
            .unwrap();
        assert_eq!(next_ok(&p.a.tx).len, total);
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        let mut got = unsafe { d1.as_slice() }.to_vec();
        got.extend_from_slice(&d2);
        assert_eq!(got, all);
    }
}

#[test]
fn writedata_delivers_exactly_once() {
    let r = rig(2);
    let p = pair(&r);
    let (tbuf, tmr) = region(&p.db, 4096, fi::REMOTE_WRITE);
    p.b.ep.recv_vec(64, 1).unwrap();
    p.b.ep.recv_vec(64, 2).unwrap();
    p.a.ep
        .writedata(
            b"hello",
            0xdead_beef,
            p.b_addr,
            tmr.base() + 100,
            tmr.key(),
            3,
        )
        .unwrap();
    assert_eq!(next_ok(&p.a.tx).len, 5);
    let c = next_ok(&p.b.rx);
    assert_eq!(c.context, 1);
    assert_eq!(c.data, 0xdead_beef);
    assert_eq!(c.len, 5);
    assert_eq!(
        c.flags & (fi::REMOTE_CQ_DATA | fi::REMOTE_WRITE | fi::RMA),
        fi::REMOTE_CQ_DATA | fi::REMOTE_WRITE | fi::RMA
    );
    assert_eq!(c.src, Some(p.a.ep.name()));
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    assert_eq!(&unsafe { tbuf.as_slice() }[100..105], b"hello");
    assert_quiet(&p.b.rx, Duration::from_millis(50));
    // Before a receive is posted the notification waits for one; inject form.
    p.a.ep
        .inject_writedata(b"xy", 77, p.b_addr, tmr.base(), tmr.key())
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    while &unsafe { tbuf.as_slice() }[..2] != b"xy" {
        p.da.progress().unwrap();
        assert!(Instant::now() < deadline);
        std::thread::yield_now();
    }
    // Receive 2 takes it.
    let c = next_ok(&p.b.rx);
    assert_eq!((c.context, c.data, c.len), (2, 77, 2));
    p.b.ep.recv_vec(64, 4).unwrap();
    assert_quiet(&p.b.rx, Duration::from_millis(50));
    assert_quiet(&p.a.tx, Duration::from_millis(10));
}

/// Post `f`, expect an ACCESS error at the initiator and the target's bytes unchanged.
fn refused(p: &Pair, tbuf: &SharedBuf, what: &str, f: impl FnOnce(&Endpoint)) -> CqErrEntry {
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    let before = unsafe { tbuf.as_slice() }.to_vec();
    f(&p.a.ep);
    let e = next_err(&p.a.tx);
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    assert_eq!(
        unsafe { tbuf.as_slice() },
        &before[..],
        "{what}: target bytes changed"
    );
    assert_quiet(&p.b.rx, Duration::from_millis(1));
    e
}

#[test]
fn protection_matrix() {
    let r = rig(3);
    let p = pair(&r);
    let mut rng = Xorshift(5);
    let tbuf_r = p.db.alloc_buffer(256).unwrap();
    let tbuf_w = p.db.alloc_buffer(256).unwrap();
    let mut tbuf = p.db.alloc_buffer(256).unwrap();
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    rng.fill(unsafe { tbuf.as_mut_slice() });
    let ro = p.db.register(&tbuf_r, fi::REMOTE_READ, None).unwrap();
    let wo = p.db.register(&tbuf_w, fi::REMOTE_WRITE, None).unwrap();
    let rw = p.db.register(&tbuf, RW, None).unwrap();
    let b = p.b_addr;
    let acc = |e: CqErrEntry, what: &str| {
        assert_eq!(e.status, Status::Access, "{what}");
        assert_eq!(e.err, fi::EACCES, "{what}");
    };
    // Missing REMOTE_WRITE: write and atomics refused.
    acc(
        refused(&p, &tbuf_r, "write to read-only", |ep| {
            ep.write(b"x", b, ro.base(), ro.key(), 1).unwrap()
        }),
        "write to read-only",
    );
    let one = 1u64.to_le_bytes();
    let am = |base: u64, key: u64, o: u8| AtomicMsg {
        operands: if o == op::ATOMIC_READ { &[] } else { &one },
        addr: b,
        remote_addr: base,
        key,
        datatype: dt::UINT64,
        op: o,
        count: 1,
        context: 9,
    };
    acc(
        refused(&p, &tbuf_r, "atomic on read-only", |ep| {
            ep.atomic(&am(ro.base(), ro.key(), op::SUM)).unwrap()
        }),
        "atomic on read-only",
    );
    acc(
        refused(&p, &tbuf_r, "fetch-add on read-only", |ep| {
            ep.fetch_atomic(&am(ro.base(), ro.key(), op::SUM), &[])
                .unwrap()
        }),
        "fetch-add on read-only",
    );
    // Missing REMOTE_READ: read and fetching atomics refused.
    acc(
        refused(&p, &tbuf_w, "read of write-only", |ep| {
            ep.read_vec(8, b, wo.base(), wo.key(), 1).unwrap()
        }),
        "read of write-only",
    );
    acc(
        refused(&p, &tbuf_w, "atomic read of write-only", |ep| {
            ep.fetch_atomic(&am(wo.base(), wo.key(), op::ATOMIC_READ), &[])
                .unwrap()
        }),
        "atomic read of write-only",
    );
    acc(
        refused(&p, &tbuf_w, "cswap on write-only", |ep| {
            ep.compare_atomic(&am(wo.base(), wo.key(), op::CSWAP), &one, &[])
                .unwrap()
        }),
        "cswap on write-only",
    );
    // Wrong key.
    acc(
        refused(&p, &tbuf, "wrong key", |ep| {
            ep.write(b"x", b, rw.base(), rw.key() ^ 1, 1).unwrap()
        }),
        "wrong key",
    );
    // One past the end, write and read; below the start.
    acc(
        refused(&p, &tbuf, "one past the end", |ep| {
            ep.write(&[1u8; 8], b, rw.base() + 249, rw.key(), 1)
                .unwrap()
        }),
        "one past the end",
    );
    acc(
        refused(&p, &tbuf, "read one past the end", |ep| {
            ep.read_vec(8, b, rw.base() + 249, rw.key(), 1).unwrap()
        }),
        "read one past the end",
    );
    acc(
        refused(&p, &tbuf, "below the start", |ep| {
            ep.write(&[1u8; 8], b, rw.base() - 1, rw.key(), 1).unwrap()
        }),
        "below the start",
    );
    acc(
        refused(&p, &tbuf, "atomic past the end", |ep| {
            ep.atomic(&am(rw.base() + 252, rw.key(), op::SUM)).unwrap()
        }),
        "atomic past the end",
    );
    // Exactly at the end is fine.
    p.a.ep
        .write(&[7u8; 8], b, rw.base() + 248, rw.key(), 1)
        .unwrap();
    next_ok(&p.a.tx);
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    assert_eq!(&unsafe { tbuf.as_slice() }[248..], &[7u8; 8]);
    // Address + length overflow.
    acc(
        refused(&p, &tbuf, "overflow", |ep| {
            ep.write(&[1u8; 8], b, u64::MAX - 3, rw.key(), 1).unwrap()
        }),
        "overflow",
    );
    let huge = [
        RmaIov {
            addr: rw.base() + 8,
            len: u64::MAX - 4,
            key: rw.key(),
        },
        RmaIov {
            addr: rw.base(),
            len: 13,
            key: rw.key(),
        },
    ];
    let dst = p.da.alloc_buffer(8).unwrap();
    // The driver refuses a length sum that overflows before posting (the device's own check
    // is exercised by tests/hostile.rs).
    let iov = [Iov::shared(&dst, 0..8)];
    let res = p.a.ep.readmsg(
        &RmaMsg {
            iov: &iov,
            addr: b,
            rma_iov: &huge,
            context: 1,
            data: 0,
        },
        0,
    );
    assert!(matches!(res, Err(Error::InvalidArgument(_))), "{res:?}");
    // Another guest's region: key of device 2's region, aimed at device 1's endpoint.
    let dc = open_domain(&r.paths[2]);
    let cbuf = dc.alloc_buffer(256).unwrap();
    let cmr = dc.register(&cbuf, RW, None).unwrap();
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    let cbefore = unsafe { cbuf.as_slice() }.to_vec();
    if p.db.register(&tbuf, RW, Some(cmr.key())).is_err() {
        // Keys are per device; a collision is astronomically unlikely.
    }
    acc(
        refused(&p, &tbuf, "other guest's key", |ep| {
            ep.write(&[1u8; 8], b, cmr.base(), cmr.key(), 1).unwrap()
        }),
        "other guest's key",
    );
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    assert_eq!(unsafe { cbuf.as_slice() }, &cbefore[..]);
    // Deregistered region.
    let (base, key) = (rw.base(), rw.key());
    rw.close().unwrap();
    acc(
        refused(&p, &tbuf, "deregistered", |ep| {
            ep.write(&[1u8; 8], b, base, key, 1).unwrap()
        }),
        "deregistered",
    );
    acc(
        refused(&p, &tbuf, "read deregistered", |ep| {
            ep.read_vec(8, b, base, key, 1).unwrap()
        }),
        "read deregistered",
    );
    // The target is not disturbed: it still works normally.
    p.b.ep.recv_vec(16, 5).unwrap();
    p.a.ep.send(b"still fine", b, 6).unwrap();
    assert_eq!(next_ok(&p.b.rx).buf.unwrap(), b"still fine");
    next_ok(&p.a.tx);
}

#[test]
fn deregistration_races_with_writes() {
    let r = rig(2);
    let p = pair(&r);
    let buf = p.db.alloc_buffer(1 << 16).unwrap();
    let src = p.da.alloc_buffer(1 << 16).unwrap();
    for round in 0..20 {
        let mr = p.db.register(&buf, RW, None).unwrap();
        let (base, key) = (mr.base(), mr.key());
        for i in 0..8 {
            p.a.ep
                .write_buf(&src, 0..(1 << 16), p.b_addr, base, key, i)
                .unwrap();
        }
        if round % 2 == 0 {
            drop(mr);
        }
        let mut ok = 0;
        for _ in 0..8 {
            match next(&p.a.tx) {
                Ok(_) => ok += 1,
                Err(e) => assert_eq!(e.status, Status::Access),
            }
        }
        if round % 2 == 1 {
            assert_eq!(ok, 8);
        }
    }
}

fn fetch_u64(e: &Ep, target: FiAddr, base: u64, key: u64, o: u8, v: u64, cmp: Option<u64>) -> u64 {
    let operand = v.to_le_bytes();
    let m = AtomicMsg {
        operands: if o == op::ATOMIC_READ { &[] } else { &operand },
        addr: target,
        remote_addr: base,
        key,
        datatype: dt::UINT64,
        op: o,
        count: 1,
        context: 0,
    };
    let mut out = [0u8; 8];
    let res = [
        // SAFETY: `out` outlives the operation, which completes before this function returns.
        unsafe { Iov::raw(out.as_mut_ptr(), 8) },
    ];
    match cmp {
        Some(c) => e.ep.compare_atomic(&m, &c.to_le_bytes(), &res).unwrap(),
        None => e.ep.fetch_atomic(&m, &res).unwrap(),
    }
    next_ok(&e.tx);
    u64::from_le_bytes(out)
}

#[test]
fn concurrent_fetch_add_is_exact_and_cswap_locks() {
    let r = rig(2);
    let d0 = Arc::new(open_domain(&r.paths[0]));
    let d1 = Arc::new(open_domain(&r.paths[1]));
    let word = d0.alloc_buffer(64).unwrap();
    let mr = d0.register(&word, RW, None).unwrap();
    let owner = endpoint(&d0);
    let target = owner.ep.name();
    let (base, key) = (mr.base(), mr.key());
    const PER: u64 = 300;
    const THREADS: usize = 6;
    let fetched: Vec<Vec<u64>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|i| {
                let d = if i % 2 == 0 { d0.clone() } else { d1.clone() };
                s.spawn(move || {
                    let e = endpoint(&d);
                    let t = e.av.insert(target).unwrap();
                    (0..PER)
                        .map(|_| fetch_u64(&e, t, base, key, op::SUM, 1, None))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let total = PER * THREADS as u64;
    assert_eq!(
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        u64::from_le_bytes(unsafe { word.as_slice() }[..8].try_into().unwrap()),
        total
    );
    let mut all: Vec<u64> = fetched.into_iter().flatten().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..total).collect::<Vec<_>>(),
        "every old value seen once"
    );

    // A spin lock with CSWAP around a non-atomic read-modify-write done with RMA.
    const LOCK: u64 = 8;
    const DATA: u64 = 16;
    const ITERS: u64 = 100;
    std::thread::scope(|s| {
        for i in 0..4 {
            let d = if i % 2 == 0 { d0.clone() } else { d1.clone() };
            s.spawn(move || {
                let e = endpoint(&d);
                let t = e.av.insert(target).unwrap();
                for _ in 0..ITERS {
                    let deadline = Instant::now() + TIMEOUT;
                    while fetch_u64(&e, t, base + LOCK, key, op::CSWAP, 1, Some(0)) != 0 {
                        assert!(Instant::now() < deadline, "lock never acquired");
                        std::thread::yield_now();
                    }
                    e.ep.read_vec(8, t, base + DATA, key, 0).unwrap();
                    let v =
                        u64::from_le_bytes(next_ok(&e.tx).buf.unwrap()[..8].try_into().unwrap());
                    std::thread::yield_now();
                    e.ep.write(&(v + 1).to_le_bytes(), t, base + DATA, key, 0)
                        .unwrap();
                    next_ok(&e.tx);
                    assert_eq!(fetch_u64(&e, t, base + LOCK, key, op::CSWAP, 0, Some(1)), 1);
                }
            });
        }
    });
    assert_eq!(
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        u64::from_le_bytes(unsafe { word.as_slice() }[16..24].try_into().unwrap()),
        4 * ITERS
    );
}

/// Reference semantics for the op table test.
fn expect_u64(o: u8, t: u64, v: u64, c: u64) -> u64 {
    match o {
        op::MIN => t.min(v),
        op::MAX => t.max(v),
        op::SUM => t.wrapping_add(v),
        op::PROD => t.wrapping_mul(v),
        op::LOR => u64::from(t != 0 || v != 0),
        op::LAND => u64::from(t != 0 && v != 0),
        op::BOR => t | v,
        op::BAND => t & v,
        op::LXOR => u64::from((t != 0) != (v != 0)),
        op::BXOR => t ^ v,
        op::ATOMIC_READ => t,
        op::ATOMIC_WRITE => v,
        op::CSWAP => {
            if c == t {
                v
            } else {
                t
            }
        }
        op::CSWAP_NE => {
            if c != t {
                v
            } else {
                t
            }
        }
        op::CSWAP_LE => {
            if c <= t {
                v
            } else {
                t
            }
        }
        op::CSWAP_LT => {
            if c < t {
                v
            } else {
                t
            }
        }
        op::CSWAP_GE => {
            if c >= t {
                v
            } else {
                t
            }
        }
        op::CSWAP_GT => {
            if c > t {
                v
            } else {
                t
            }
        }
        op::MSWAP => (v & c) | (t & !c),
        _ => unreachable!(),
    }
}

#[test]
fn every_op_on_integers_and_floats() {
    let r = rig(2);
    let p = pair(&r);
    let mut tbuf = p.db.alloc_buffer(4096).unwrap();
    let mr = p.db.register(&tbuf, RW, None).unwrap();
    let mut rng = Xorshift(77);
    // Integer types, two elements per request (payload form), every op.
    for ty in [
        dt::INT8,
        dt::UINT8,
        dt::INT16,
        dt::UINT16,
        dt::INT32,
        dt::UINT32,
        dt::INT64,
        dt::UINT64,
    ] {
        let size = dt::size(ty).unwrap();
        let mask = if size == 8 {
            u64::MAX
        } else {
            (1u64 << (8 * size)) - 1
        };
        let signed = ty % 2 == 0;
        for o in 0..op::COUNT {
            for &small in &[false, true] {
                let gen = |rng: &mut Xorshift| {
                    let v = rng.next();
                    if small {
                        v % 3
                    } else {
                        v & mask
                    }
                };
                let t: Vec<u64> = (0..2).map(|_| gen(&mut rng)).collect();
                let v: Vec<u64> = (0..2).map(|_| gen(&mut rng)).collect();
                let c: Vec<u64> = (0..2)
                    .map(|i| if i == 0 { t[0] } else { gen(&mut rng) })
                    .collect();
                let enc = |xs: &[u64]| -> Vec<u8> {
                    xs.iter()
                        .flat_map(|x| x.to_le_bytes()[..size].to_vec())
                        .collect()
                };
                // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
                (unsafe { tbuf.as_mut_slice() })[..2 * size].copy_from_slice(&enc(&t));
                let operands = if o == op::ATOMIC_READ {
                    Vec::new()
                } else {
                    enc(&v)
                };
                let m = AtomicMsg {
                    operands: &operands,
                    addr: p.b_addr,
                    remote_addr: mr.base(),
                    key: mr.key(),
                    datatype: ty,
                    op: o,
                    count: 2,
                    context: 1,
                };
                let is_cmp = o >= op::CSWAP;
                let fetched = if is_cmp {
                    p.a.ep.compare_atomic(&m, &enc(&c), &[]).unwrap();
                    next_ok(&p.a.tx).buf.unwrap()
                } else if o == op::ATOMIC_READ || o % 2 == 0 {
                    p.a.ep.fetch_atomic(&m, &[]).unwrap();
                    next_ok(&p.a.tx).buf.unwrap()
                } else {
                    p.a.ep.atomic(&m).unwrap();
                    next_ok(&p.a.tx);
                    enc(&t)
                };
                assert_eq!(fetched, enc(&t), "fetched old values ty {ty} op {o}");
                for i in 0..2 {
                    let sx = |x: u64| -> i128 {
                        if signed {
                            let sh = 128 - 8 * size as u32;
                            ((x as i128) << sh) >> sh
                        } else {
                            x as i128
                        }
                    };
                    let want = match o {
                        op::MIN
                        | op::MAX
                        | op::CSWAP_LE
                        | op::CSWAP_LT
                        | op::CSWAP_GE
                        | op::CSWAP_GT
                            if signed =>
                        {
                            let (tt, vv, cc) = (sx(t[i]), sx(v[i]), sx(c[i]));
                            let r = match o {
                                op::MIN => tt.min(vv),
                                op::MAX => tt.max(vv),
                                op::CSWAP_LE => {
                                    if cc <= tt {
                                        vv
                                    } else {
                                        tt
                                    }
                                }
                                op::CSWAP_LT => {
                                    if cc < tt {
                                        vv
                                    } else {
                                        tt
                                    }
                                }
                                op::CSWAP_GE => {
                                    if cc >= tt {
                                        vv
                                    } else {
                                        tt
                                    }
                                }
                                _ => {
                                    if cc > tt {
                                        vv
                                    } else {
                                        tt
                                    }
                                }
                            };
                            (r as u64) & mask
                        }
                        _ => expect_u64(o, t[i], v[i], c[i]) & mask,
                    };
                    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
                    let got = unsafe { tbuf.as_slice() }[i * size..(i + 1) * size]
                        .iter()
                        .rev()
                        .fold(0u64, |a, &b| (a << 8) | u64::from(b));
                    assert_eq!(got, want, "ty {ty} op {o} elem {i} t {t:?} v {v:?} c {c:?}");
                }
            }
        }
    }
    // Doubles and floats: inline single element.
    fn dm_msg<'a>(p: &Pair, mr: &MemoryRegion, o: u8, v: &'a [u8], ty: u8) -> AtomicMsg<'a> {
        AtomicMsg {
            operands: v,
            addr: p.b_addr,
            remote_addr: mr.base(),
            key: mr.key(),
            datatype: ty,
            op: o,
            count: 1,
            context: 2,
        }
    }
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    (unsafe { tbuf.as_mut_slice() })[..8].copy_from_slice(&1.5f64.to_le_bytes());
    p.a.ep
        .atomic(&dm_msg(
            &p,
            &mr,
            op::SUM,
            &2.25f64.to_le_bytes(),
            dt::DOUBLE,
        ))
        .unwrap();
    next_ok(&p.a.tx);
    assert_eq!(
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        f64::from_le_bytes(unsafe { tbuf.as_slice() }[..8].try_into().unwrap()),
        3.75
    );
    p.a.ep
        .atomic(&dm_msg(
            &p,
            &mr,
            op::PROD,
            &2.0f64.to_le_bytes(),
            dt::DOUBLE,
        ))
        .unwrap();
    next_ok(&p.a.tx);
    assert_eq!(
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        f64::from_le_bytes(unsafe { tbuf.as_slice() }[..8].try_into().unwrap()),
        7.5
    );
    p.a.ep
        .compare_atomic(
            &dm_msg(&p, &mr, op::CSWAP, &1.0f64.to_le_bytes(), dt::DOUBLE),
            &7.5f64.to_le_bytes(),
            &[],
        )
        .unwrap();
    assert_eq!(next_ok(&p.a.tx).buf.unwrap(), 7.5f64.to_le_bytes());
    assert_eq!(
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        f64::from_le_bytes(unsafe { tbuf.as_slice() }[..8].try_into().unwrap()),
        1.0
    );
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    (unsafe { tbuf.as_mut_slice() })[..4].copy_from_slice(&3.0f32.to_le_bytes());
    p.a.ep
        .atomic(&dm_msg(
            &p,
            &mr,
            op::MIN,
            &(-1.0f32).to_le_bytes(),
            dt::FLOAT,
        ))
        .unwrap();
    next_ok(&p.a.tx);
    assert_eq!(
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        f32::from_le_bytes(unsafe { tbuf.as_slice() }[..4].try_into().unwrap()),
        -1.0
    );
    // 128-bit integers.
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    (unsafe { tbuf.as_mut_slice() })[..16].copy_from_slice(&u128::MAX.to_le_bytes());
    p.a.ep
        .atomic(&dm_msg(&p, &mr, op::SUM, &2u128.to_le_bytes(), dt::UINT128))
        .unwrap();
    next_ok(&p.a.tx);
    assert_eq!(
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        u128::from_le_bytes(unsafe { tbuf.as_slice() }[..16].try_into().unwrap()),
        1
    );
    // Unsupported combinations are refused by the driver before posting.
    assert!(matches!(
        p.a.ep
            .atomic(&dm_msg(&p, &mr, op::BOR, &1.0f64.to_le_bytes(), dt::DOUBLE)),
        Err(Error::Unsupported(_))
    ));
}

#[test]
fn counters_local_and_remote() {
    let r = rig(2);
    let p = pair(&r);
    let c = p.da.cntr_open().unwrap();
    let cerr = p.da.cntr_open().unwrap();
    p.a.ep.bind_cntr(&c, fi::READ | fi::WRITE).unwrap();
    let tbuf = p.db.alloc_buffer(4096).unwrap();
    let mr =
        p.db.register_with(
            &tbuf,
            0..4096,
            &MrAttr {
                access: RW,
                rma_event: true,
                ..Default::default()
            },
        )
        .unwrap();
    let mr_cntr = p.db.cntr_open().unwrap();
    mr.bind_cntr(&mr_cntr).unwrap();
    let ep_rw = p.db.cntr_open().unwrap();
    p.b.ep.bind_cntr(&ep_rw, fi::REMOTE_WRITE).unwrap();
    let ep_rr = p.db.cntr_open().unwrap();
    p.b.ep.bind_cntr(&ep_rr, fi::REMOTE_READ).unwrap();
    for i in 0..3 {
        p.a.ep
            .write(b"abcd", p.b_addr, mr.base() + i * 4, mr.key(), i)
            .unwrap();
    }
    for i in 0..2 {
        p.a.ep
            .read_vec(4, p.b_addr, mr.base(), mr.key(), i)
            .unwrap();
    }
    c.wait(5, Some(TIMEOUT)).unwrap();
    assert_eq!(c.read(), 5);
    mr_cntr.wait(5, Some(TIMEOUT)).unwrap();
    ep_rw.wait(3, Some(TIMEOUT)).unwrap();
    ep_rr.wait(2, Some(TIMEOUT)).unwrap();
    assert_eq!(ep_rw.read(), 3);
    // Errors go to the error count; wait reports them.
    p.a.ep.bind_cntr(&cerr, fi::WRITE).unwrap();
    p.a.ep
        .write(b"x", p.b_addr, mr.base(), mr.key() ^ 1, 9)
        .unwrap();
    assert!(matches!(cerr.wait(1, Some(TIMEOUT)), Err(Error::Avail)));
    assert_eq!(cerr.readerr(), 1);
    assert_eq!(c.readerr(), 1);
    // add / set / timeout.
    c.set(10);
    c.add(5);
    assert_eq!(c.read(), 15);
    assert!(matches!(
        c.wait(100, Some(Duration::from_millis(20))),
        Err(Error::Timeout)
    ));
    // Send/recv counters.
    let sc = p.da.cntr_open().unwrap();
    let rc = p.db.cntr_open().unwrap();
    p.a.ep.bind_cntr(&sc, fi::SEND).unwrap();
    p.b.ep.bind_cntr(&rc, fi::RECV).unwrap();
    p.b.ep.recv_vec(8, 1).unwrap();
    p.a.ep.send(b"hi", p.b_addr, 2).unwrap();
    sc.wait(1, Some(TIMEOUT)).unwrap();
    rc.wait(1, Some(TIMEOUT)).unwrap();
    // A region without RMA_EVENT refuses a counter.
    let plain = p.db.register(&tbuf, RW, None).unwrap();
    assert!(plain.bind_cntr(&mr_cntr).is_err());
}

#[test]
fn fence_waits_for_a_held_send() {
    let r = rig(2);
    let p = pair(&r);
    let tbuf = p.db.alloc_buffer(4096).unwrap();
    let mr = p.db.register(&tbuf, RW, None).unwrap();
    // Larger than the eager threshold: held until a receive is posted.
    let big = vec![3u8; 64 << 10];
    p.a.ep.send(&big, p.b_addr, 1).unwrap();
    let iov = [Iov::bytes(b"fenced")];
    let rma = [RmaIov {
        addr: mr.base(),
        len: 6,
        key: mr.key(),
    }];
    p.a.ep
        .writemsg(
            &RmaMsg {
                iov: &iov,
                addr: p.b_addr,
                rma_iov: &rma,
                context: 2,
                data: 0,
            },
            fi::FENCE,
        )
        .unwrap();
    // A later unfenced write waits behind the fenced one.
    p.a.ep
        .write(b"later", p.b_addr, mr.base() + 8, mr.key(), 3)
        .unwrap();
    assert_quiet(&p.a.tx, Duration::from_millis(50));
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    assert_eq!(&unsafe { tbuf.as_slice() }[..6], &[0u8; 6]);
    p.b.ep.recv_vec(64 << 10, 4).unwrap();
    let mut got: Vec<u64> = (0..3).map(|_| next_ok(&p.a.tx).context).collect();
    got.sort_unstable();
    assert_eq!(got, vec![1, 2, 3]);
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    assert_eq!(&unsafe { tbuf.as_slice() }[..6], b"fenced");
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    assert_eq!(&unsafe { tbuf.as_slice() }[8..13], b"later");
    assert_eq!(next_ok(&p.b.rx).len, 64 << 10);
}

#[test]
fn inject_and_completion_levels() {
    let r = rig(2);
    let p = pair(&r);
    let tbuf = p.db.alloc_buffer(4096).unwrap();
    let mr = p.db.register(&tbuf, RW, None).unwrap();
    p.a.ep
        .inject_write(b"inj", p.b_addr, mr.base(), mr.key())
        .unwrap();
    let too_big = vec![0u8; 4096];
    assert!(p
        .a
        .ep
        .inject_write(&too_big, p.b_addr, mr.base(), mr.key())
        .is_err());
    for (i, level) in [
        fi::TRANSMIT_COMPLETE,
        fi::DELIVERY_COMPLETE,
        fi::INJECT_COMPLETE,
    ]
    .into_iter()
    .enumerate()
    {
        let iov = [Iov::bytes(b"lvl")];
        let rma = [RmaIov {
            addr: mr.base() + 16,
            len: 3,
            key: mr.key(),
        }];
        p.a.ep
            .writemsg(
                &RmaMsg {
                    iov: &iov,
                    addr: p.b_addr,
                    rma_iov: &rma,
                    context: i as u64,
                    data: 0,
                },
                level,
            )
            .unwrap();
        assert_eq!(next_ok(&p.a.tx).context, i as u64);
    }
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    assert_eq!(&unsafe { tbuf.as_slice() }[..3], b"inj");
    let inj = 5u64.to_le_bytes();
    p.a.ep
        .inject_atomic(&AtomicMsg {
            operands: &inj,
            addr: p.b_addr,
            remote_addr: mr.base() + 32,
            key: mr.key(),
            datatype: dt::UINT64,
            op: op::SUM,
            count: 1,
            context: 0,
        })
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    while unsafe { tbuf.as_slice() }[32] != 5 {
        p.da.progress().unwrap();
        assert!(Instant::now() < deadline);
        std::thread::yield_now();
    }
    assert_quiet(&p.a.tx, Duration::from_millis(20));
}

#[test]
fn registration_limit_from_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let paths = vfabric_device::Config::socket_dir_paths(dir.path(), 1);
    let mut config = vfabric_device::Config::new(paths.clone());
    config.limits.max_mrs = 3;
    let daemon = vfabric_device::start(config).expect("start embedded vfabricd");
    let d = open_domain(&paths[0]);
    assert_eq!(d.info().limits.max_mrs, 3);
    let buf = d.alloc_buffer(64).unwrap();
    let mrs: Vec<_> = (0..3)
        .map(|_| d.register(&buf, RW, None).unwrap())
        .collect();
    match d.register(&buf, RW, None) {
        Err(Error::Device(Status::NoResources)) => {}
        other => panic!("fourth region accepted: {other:?}"),
    }
    // Local-only registrations do not count.
    d.register(&buf, fi::SEND, None).unwrap();
    drop(mrs);
    d.register(&buf, RW, None).unwrap();
    drop(d);
    daemon.shutdown();
}

#[test]
fn multi_segment_region_with_offset_addressing() {
    let r = rig(2);
    let p = pair(&r);
    let buf = p.db.alloc_buffer(8192).unwrap();
    let base = buf.as_ptr();
    // SAFETY: both pieces lie in `buf`, which outlives the region.
    let mr = unsafe {
        p.db.register_raw_iov(
            &[(base, 100), (base.add(4096), 50)],
            &MrAttr {
                access: RW,
                offset_addressing: true,
                ..Default::default()
            },
        )
    }
    .unwrap();
    assert_eq!((mr.base(), mr.len()), (0, 150));
    let data: Vec<u8> = (0..60).collect();
    p.a.ep.write(&data, p.b_addr, 80, mr.key(), 1).unwrap();
    next_ok(&p.a.tx);
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    assert_eq!(&unsafe { buf.as_slice() }[80..100], &data[..20]);
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    assert_eq!(&unsafe { buf.as_slice() }[4096..4136], &data[20..]);
    p.a.ep.read_vec(60, p.b_addr, 80, mr.key(), 2).unwrap();
    assert_eq!(next_ok(&p.a.tx).buf.unwrap(), data);
    // Past the end of the concatenation.
    p.a.ep.write(&data, p.b_addr, 91, mr.key(), 3).unwrap();
    assert_eq!(next_err(&p.a.tx).status, Status::Access);
}
