// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Persistent memory (spec §6.17): `Domain::register_pmem`, RMA writes with
//! `FI_COMMIT_COMPLETE`, `FI_SAVE`, `Endpoint::commit`, atomics with COMMIT_COMPLETE, and the
//! device's persistence counters checked against exactly what was committed. An embedded
//! `vfabricd` and driver domains in this process; every wait has a timeout. (Crash consistency,
//! with the target and the daemon SIGKILLed, is in the workspace's `tests/pmem.rs`.)

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use vfabric::proto::{atomic_op as op, datatype as dt};
use vfabric::{fi, AtomicMsg, Domain, Error, Iov, MrAttr, RmaIov, RmaMsg, Status};

mod common;
use common::*;

const RW: u64 = fi::REMOTE_READ | fi::REMOTE_WRITE;

fn pair(r: &Rig) -> Pair {
    rdm_pair(r, 16, 256)
}

/// A file of `len` zero bytes in the rig's directory.
fn pmem_file(r: &Rig, name: &str, len: u64) -> (File, PathBuf) {
    let path = r._dir.path().join(name);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(len).unwrap();
    (f, path)
}

fn file_bytes(path: &PathBuf, off: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact(&mut v).unwrap();
    v
}

/// Persistence counters of the target's device (ranges, bytes).
fn persisted(d: &Domain) -> (u64, u64) {
    let c = d.device_counters().unwrap();
    (c.persisted_ranges, c.persisted_bytes)
}

#[test]
fn commit_complete_writes_persist_exactly_the_written_ranges() {
    let r = rig(2);
    let p = pair(&r);
    let (f, path) = pmem_file(&r, "pmem0", 3 * 4096 + 100);
    // A region that starts inside a page of the file.
    let region = p.db.register_pmem(&f, 100, 3 * 4096, RW).unwrap();
    assert_eq!(
        region.mr().pmem_granularity(),
        Some(2),
        "a regular file: pages"
    );
    let before = persisted(&p.db);
    let mut rng = Xorshift(0x9e37);
    let mut expect_ranges = 0;
    let mut expect_bytes = 0u64;
    // Sizes and offsets, several straddling page boundaries of the file.
    for &(off, n) in &[
        (0usize, 1usize),
        (7, 64),
        (3996, 200),
        (4000, 4096),
        (8100, 4188),
    ] {
        let mut src = vec![0u8; n];
        rng.fill(&mut src);
        p.a.ep
            .writemsg(
                &RmaMsg {
                    iov: &[Iov::bytes(&src)],
                    addr: p.b_addr,
                    rma_iov: &[RmaIov {
                        addr: region.base() + off as u64,
                        len: n as u64,
                        key: region.key(),
                    }],
                    context: 5,
                    data: 0,
                },
                fi::COMMIT_COMPLETE,
            )
            .unwrap();
        let c = next_ok(&p.a.tx);
        assert_eq!(c.len, n);
        expect_ranges += 1;
        expect_bytes += n as u64;
        assert_eq!(file_bytes(&path, 100 + off as u64, n), src, "{off}+{n}");
        let (ranges, bytes) = persisted(&p.db);
        assert_eq!(
            (ranges - before.0, bytes - before.1),
            (expect_ranges, expect_bytes),
            "persisted exactly the committed ranges"
        );
    }
    // A write without COMMIT_COMPLETE persists nothing.
    p.a.ep
        .write(&[1, 2, 3], p.b_addr, region.base(), region.key(), 6)
        .unwrap();
    next_ok(&p.a.tx);
    let (ranges, bytes) = persisted(&p.db);
    assert_eq!(
        (ranges - before.0, bytes - before.1),
        (expect_ranges, expect_bytes)
    );
    drop(region);
    drop(p.da);
}

#[test]
fn save_and_commit_persist_the_named_ranges() {
    let r = rig(2);
    let p = pair(&r);
    let (f, path) = pmem_file(&r, "pmem1", 1 << 16);
    let region = p.db.register_pmem(&f, 0, 1 << 16, RW).unwrap();
    let before = persisted(&p.db);
    let range = |off: u64, len: u64| RmaIov {
        addr: region.base() + off,
        len,
        key: region.key(),
    };
    // Plain writes, then one save of both ranges (FI_SAVE | FI_COMMIT_COMPLETE).
    p.a.ep
        .write(
            &[0xaa; 5000],
            p.b_addr,
            region.base() + 3000,
            region.key(),
            1,
        )
        .unwrap();
    next_ok(&p.a.tx);
    p.a.ep
        .write(
            &[0xbb; 10],
            p.b_addr,
            region.base() + 60000,
            region.key(),
            2,
        )
        .unwrap();
    next_ok(&p.a.tx);
    assert_eq!(persisted(&p.db), before, "plain writes are not persisted");
    p.a.ep
        .writemsg(
            &RmaMsg {
                iov: &[],
                addr: p.b_addr,
                rma_iov: &[range(3000, 5000), range(60000, 10)],
                context: 3,
                data: 0,
            },
            fi::SAVE | fi::COMMIT_COMPLETE,
        )
        .unwrap();
    let c = next_ok(&p.a.tx);
    assert_eq!(c.context, 3);
    assert_eq!(c.len, 0);
    let after = persisted(&p.db);
    assert_eq!((after.0 - before.0, after.1 - before.1), (2, 5010));
    assert_eq!(file_bytes(&path, 3000, 5000), vec![0xaa; 5000]);
    // A zero-length save is valid and persists nothing.
    p.a.ep
        .save(&[range(100, 0)], p.b_addr, fi::COMMIT_COMPLETE, None, 4)
        .unwrap();
    next_ok(&p.a.tx);
    assert_eq!(persisted(&p.db), after);
    // A visibility save (FI_DELIVERY_COMPLETE) runs no persistence.
    p.a.ep
        .save(&[range(0, 16)], p.b_addr, fi::DELIVERY_COMPLETE, None, 5)
        .unwrap();
    next_ok(&p.a.tx);
    assert_eq!(persisted(&p.db), after);
    // The commit operation (PR #5875's shape).
    p.a.ep
        .write(&[0xcc; 64], p.b_addr, region.base() + 4090, region.key(), 6)
        .unwrap();
    next_ok(&p.a.tx);
    p.a.ep.commit(&[range(4090, 64)], p.b_addr, 0, 7).unwrap();
    let c = next_ok(&p.a.tx);
    assert_eq!(c.context, 7);
    let end = persisted(&p.db);
    assert_eq!((end.0 - after.0, end.1 - after.1), (1, 64));
    // Writedata with COMMIT_COMPLETE: persisted before the target's notification.
    p.b.ep.recv_vec(64, 10).unwrap();
    let before_wd = persisted(&p.db);
    p.a.ep
        .writemsg(
            &RmaMsg {
                iov: &[Iov::bytes(&[0xdd; 100])],
                addr: p.b_addr,
                rma_iov: &[range(5000, 100)],
                context: 12,
                data: 0x77,
            },
            fi::REMOTE_CQ_DATA | fi::COMMIT_COMPLETE,
        )
        .unwrap();
    next_ok(&p.a.tx);
    let t = next_ok(&p.b.rx);
    assert_eq!(t.data, 0x77);
    let after_wd = persisted(&p.db);
    assert_eq!(
        (after_wd.0 - before_wd.0, after_wd.1 - before_wd.1),
        (1, 100)
    );
    assert_eq!(file_bytes(&path, 5000, 100), vec![0xdd; 100]);
    // A save with remote CQ data notifies the target once the ranges are durable (it
    // consumes a posted receive, as writedata does).
    p.b.ep.recv_vec(64, 11).unwrap();
    p.a.ep
        .save(
            &[range(0, 8)],
            p.b_addr,
            fi::COMMIT_COMPLETE,
            Some(0x5157),
            8,
        )
        .unwrap();
    next_ok(&p.a.tx);
    let t = next_ok(&p.b.rx);
    assert_eq!(t.data, 0x5157);
    assert_ne!(t.flags & fi::REMOTE_CQ_DATA, 0);
}

#[test]
fn atomics_with_commit_complete_persist_their_result() {
    let r = rig(2);
    let p = pair(&r);
    let (f, path) = pmem_file(&r, "pmem2", 4096);
    let region = p.db.register_pmem(&f, 0, 4096, RW).unwrap();
    let before = persisted(&p.db);
    let operand = 41u64.to_le_bytes();
    p.a.ep
        .atomicmsg(
            &AtomicMsg {
                operands: &operand,
                addr: p.b_addr,
                remote_addr: region.base() + 64,
                key: region.key(),
                datatype: dt::UINT64,
                op: op::SUM,
                count: 1,
                context: 9,
            },
            fi::COMMIT_COMPLETE,
        )
        .unwrap();
    next_ok(&p.a.tx);
    let after = persisted(&p.db);
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 8));
    assert_eq!(file_bytes(&path, 64, 8), 41u64.to_le_bytes());
}

#[test]
fn bad_input_is_refused() {
    let r = rig(2);
    let p = pair(&r);
    let (f, path) = pmem_file(&r, "pmem3", 8192);
    let region = p.db.register_pmem(&f, 0, 8192, RW).unwrap();
    let ro = p.db.register_pmem(&f, 0, 4096, fi::REMOTE_READ).unwrap();
    let plain_buf = p.db.alloc_buffer(4096).unwrap();
    let plain = p.db.register(&plain_buf, RW, None).unwrap();
    let before = persisted(&p.db);
    let access = |res: Result<(), Error>| {
        res.unwrap();
        let e = next_err(&p.a.tx);
        assert_eq!(e.status, Status::Access, "{e:?}");
    };
    let one = |addr, len, key| [RmaIov { addr, len, key }];
    // COMMIT_COMPLETE on a non-persistent region.
    access(p.a.ep.writemsg(
        &RmaMsg {
            iov: &[Iov::bytes(&[1u8; 8])],
            addr: p.b_addr,
            rma_iov: &one(plain.base(), 8, plain.key()),
            context: 1,
            data: 0,
        },
        fi::COMMIT_COMPLETE,
    ));
    // Commit to a region without FI_RMA_PMEM.
    access(
        p.a.ep
            .commit(&one(plain.base(), 8, plain.key()), p.b_addr, 0, 2),
    );
    // Commit to a region without remote write access.
    access(p.a.ep.commit(&one(ro.base(), 8, ro.key()), p.b_addr, 0, 3));
    // Out of range, and a wrong key.
    access(p.a.ep.commit(
        &one(region.base() + 8000, 200, region.key()),
        p.b_addr,
        0,
        4,
    ));
    access(p.a.ep.commit(
        &one(region.base(), 8, region.key() ^ 0x5a5a),
        p.b_addr,
        0,
        5,
    ));
    // A visibility save to a non-persistent region works.
    p.a.ep
        .save(
            &one(plain.base(), 8, plain.key()),
            p.b_addr,
            fi::DELIVERY_COMPLETE,
            None,
            6,
        )
        .unwrap();
    next_ok(&p.a.tx);
    // FI_SAVE carries no data.
    assert!(matches!(
        p.a.ep.writemsg(
            &RmaMsg {
                iov: &[Iov::bytes(&[1u8; 8])],
                addr: p.b_addr,
                rma_iov: &one(region.base(), 8, region.key()),
                context: 7,
                data: 0,
            },
            fi::SAVE,
        ),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(persisted(&p.db), before, "nothing was persisted");

    // The file truncated under the region: writes fault, commits fail, the device lives on.
    f.set_len(4096).unwrap();
    p.a.ep
        .write(&[7u8; 16], p.b_addr, region.base() + 6000, region.key(), 8)
        .unwrap();
    assert_eq!(next_err(&p.a.tx).status, Status::Fault);
    p.a.ep
        .commit(&one(region.base() + 6000, 16, region.key()), p.b_addr, 0, 9)
        .unwrap();
    assert_eq!(next_err(&p.a.tx).status, Status::Fault);
    // The part still inside the file keeps working.
    p.a.ep
        .writemsg(
            &RmaMsg {
                iov: &[Iov::bytes(&[9u8; 16])],
                addr: p.b_addr,
                rma_iov: &one(region.base() + 16, 16, region.key()),
                context: 10,
                data: 0,
            },
            fi::COMMIT_COMPLETE,
        )
        .unwrap();
    next_ok(&p.a.tx);
    assert_eq!(file_bytes(&path, 16, 16), vec![9u8; 16]);
    drop((region, ro, plain));
    let _ = &p.da;
}

#[test]
fn registrations_that_cannot_be_persistent_are_refused() {
    let r = rig(2);
    let p = pair(&r);
    let (f, _) = pmem_file(&r, "pmem4", 4096);
    // Past the end of the file.
    assert!(matches!(
        p.db.register_pmem(&f, 0, 8192, RW),
        Err(Error::InvalidArgument(_))
    ));
    // Anonymous memory claimed to be a mapping of the file: the device checks the mapping.
    let mut anon = vec![0u8; 4096];
    let attr = MrAttr {
        access: RW,
        pmem: Some(vfabric::PmemBacking {
            fd: std::os::fd::AsRawFd::as_raw_fd(&f),
            offset: 0,
        }),
        ..Default::default()
    };
    // SAFETY: `anon` outlives the (failed) registration.
    let e = unsafe { p.db.register_raw(anon.as_mut_ptr(), anon.len(), &attr) }.unwrap_err();
    assert!(matches!(e, Error::Device(Status::Access)), "{e:?}");
    // A descriptor that is not a regular file.
    let (rd, _wr) = std::os::unix::net::UnixStream::pair().unwrap();
    let attr = MrAttr {
        pmem: Some(vfabric::PmemBacking {
            fd: std::os::fd::AsRawFd::as_raw_fd(&rd),
            offset: 0,
        }),
        ..attr
    };
    // SAFETY: as above.
    let e = unsafe { p.db.register_raw(anon.as_mut_ptr(), anon.len(), &attr) }.unwrap_err();
    assert!(matches!(e, Error::Device(Status::Access)), "{e:?}");
    // Memory in the domain's shared region cannot be persistent.
    let buf = p.db.alloc_buffer(4096).unwrap();
    let attr = MrAttr {
        access: RW,
        pmem: Some(vfabric::PmemBacking {
            fd: std::os::fd::AsRawFd::as_raw_fd(&f),
            offset: 0,
        }),
        ..Default::default()
    };
    assert!(p.db.register_with(&buf, 0..4096, &attr).is_err());
    let mut w = f;
    w.write_all(b"x").unwrap();
    let _ = &p.da;
}

#[test]
fn persistent_regions_per_device_are_bounded() {
    let r = rig(2);
    let p = pair(&r);
    let (f, _) = pmem_file(&r, "pmem5", 4096);
    // Each region holds a descriptor of the daemon: at most 64 per device.
    let regions: Vec<_> = (0..64)
        .map(|_| p.db.register_pmem(&f, 0, 4096, RW).unwrap())
        .collect();
    let e = p.db.register_pmem(&f, 0, 4096, RW).unwrap_err();
    assert!(matches!(e, Error::Device(Status::NoResources)), "{e:?}");
    // Plain regions are not affected, and a freed slot is reusable.
    let buf = p.db.alloc_buffer(64).unwrap();
    p.db.register(&buf, RW, None).unwrap();
    drop(regions);
    p.db.register_pmem(&f, 0, 4096, RW).unwrap();
    let _ = &p.da;
}
