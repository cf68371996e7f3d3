// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Registration of memory outside the domain's shared region (`Domain::register_external`):
//! plain `Vec`/`Box` buffers registered as process memory, which the device reaches by
//! cross-memory attach (nothing is copied or remapped). An embedded `vfabricd` and driver domains in this process; every wait has a
//! timeout.

use vfabric::proto::{atomic_op as op, datatype as dt};
use vfabric::{fi, AtomicMsg, Domain, Iov, MrAttr, Status};

mod common;
use common::*;

const RW: u64 = fi::REMOTE_READ | fi::REMOTE_WRITE;

fn open_domain(path: &std::path::Path) -> Domain {
    open_domain_mb(path, 16)
}

fn endpoint(domain: &Domain) -> Ep {
    rdm_endpoint(domain, 256)
}

/// The application's view of bytes the device wrote behind the compiler's back.
fn view(p: *const u8, len: usize) -> Vec<u8> {
    // SAFETY: `p..p+len` is a live buffer of the test; volatile reads so the compiler does not
    // assume the bytes unchanged since the test last wrote them.
    (0..len)
        .map(|i| unsafe { std::ptr::read_volatile(p.add(i)) })
        .collect()
}

fn pair(r: &Rig) -> Pair {
    rdm_pair(r, 16, 256)
}

fn attr(access: u64) -> MrAttr {
    MrAttr {
        access,
        ..Default::default()
    }
}

#[test]
fn write_and_read_plain_buffers_across_sizes() {
    let r = rig(2);
    let p = pair(&r);
    const MAX: usize = 1 << 20;
    let mut target: Box<[u8]> = vec![0u8; MAX + 64].into_boxed_slice();
    let tptr = target.as_mut_ptr();
    // SAFETY: `target` lives until the end of the test, after the region is dropped, and no
    // other thread touches it.
    let tmr = unsafe { p.db.register_external(tptr, target.len(), &attr(RW)) }.unwrap();
    assert_eq!(tmr.base(), tptr as u64);
    let mut src = vec![0u8; MAX];
    let mut back = vec![0u8; MAX];
    let mut rng = Xorshift(0xfeed);
    for (i, &n) in [1usize, 7, 64, 225, 4095, 4096, 65537, MAX]
        .iter()
        .enumerate()
    {
        let off = i * 8;
        rng.fill(&mut src[..n]);
        let sum = checksum(&src[..n]);
        p.a.ep
            .write(&src[..n], p.b_addr, tmr.base() + off as u64, tmr.key(), 1)
            .unwrap();
        let c = next_ok(&p.a.tx);
        assert_eq!(c.len, n);
        // SAFETY: in bounds of `target`.
        assert_eq!(
            checksum(&view(unsafe { tptr.add(off) }, n)),
            sum,
            "application view after a write of {n}"
        );
        back[..n].fill(0);
        // SAFETY: `back` outlives the read, which completes before it is looked at.
        unsafe {
            p.a.ep.read_raw(
                back.as_mut_ptr(),
                n,
                p.b_addr,
                tmr.base() + off as u64,
                tmr.key(),
                2,
            )
        }
        .unwrap();
        let c = next_ok(&p.a.tx);
        assert_eq!(c.len, n);
        assert_eq!(checksum(&view(back.as_ptr(), n)), sum, "read of {n}");
    }
    // Bytes the application writes itself are what remote reads see.
    target[..4].copy_from_slice(b"abcd");
    p.a.ep
        .read_vec(4, p.b_addr, tmr.base(), tmr.key(), 3)
        .unwrap();
    assert_eq!(next_ok(&p.a.tx).buf.unwrap(), b"abcd");
    drop(tmr);
    drop(target);
}

#[test]
fn fetch_add_on_a_boxed_u64() {
    let r = rig(2);
    let p = pair(&r);
    let mut cell = Box::new(40u64);
    let ptr: *mut u64 = &mut *cell;
    // SAFETY: `cell` outlives the region; nothing else writes it during the call.
    let mr = unsafe { p.db.register_external(ptr.cast::<u8>(), 8, &attr(RW)) }.unwrap();
    for i in 0..5u64 {
        let operand = 2u64.to_le_bytes();
        let m = AtomicMsg {
            operands: &operand,
            addr: p.b_addr,
            remote_addr: mr.base(),
            key: mr.key(),
            datatype: dt::UINT64,
            op: op::SUM,
            count: 1,
            context: i,
        };
        let mut out = [0u8; 8];
        // SAFETY: `out` outlives the operation, which completes before it is read.
        let res = [unsafe { Iov::raw(out.as_mut_ptr(), 8) }];
        p.a.ep.fetch_atomic(&m, &res).unwrap();
        next_ok(&p.a.tx);
        assert_eq!(u64::from_le_bytes(out), 40 + 2 * i);
    }
    // SAFETY: `ptr` points to the live box.
    assert_eq!(unsafe { std::ptr::read_volatile(ptr) }, 50);
    drop(mr);
    assert_eq!(*cell, 50);
}

#[test]
fn nested_registrations_reuse_the_region_and_rights_hold() {
    let r = rig(2);
    let p = pair(&r);
    let mut buf: Box<[u8]> = vec![7u8; 3 * 4096].into_boxed_slice();
    let base = buf.as_mut_ptr();
    // SAFETY: `buf` outlives every region below.
    let whole = unsafe { p.db.register_external(base, buf.len(), &attr(RW)) }.unwrap();
    // SAFETY: inside `buf`.
    let ro = unsafe {
        p.db.register_external(base.add(100), 200, &attr(fi::REMOTE_READ))
    }
    .unwrap();
    // SAFETY: inside `buf`.
    let wo = unsafe {
        p.db.register_raw(base.add(1000), 16, &attr(fi::REMOTE_WRITE))
    }
    .unwrap();
    assert_ne!(whole.key(), ro.key());

    p.a.ep
        .write(b"hello", p.b_addr, wo.base(), wo.key(), 1)
        .unwrap();
    next_ok(&p.a.tx);
    // SAFETY: in bounds.
    assert_eq!(view(unsafe { base.add(1000) }, 5), b"hello");

    // No REMOTE_WRITE: the write is refused and the bytes stay.
    p.a.ep
        .write(b"xx", p.b_addr, ro.base(), ro.key(), 2)
        .unwrap();
    let e = next(&p.a.tx).expect_err("write to a read-only region");
    assert_eq!(e.status, Status::Access);
    assert_eq!(e.err, fi::EACCES);
    // SAFETY: in bounds.
    assert_eq!(view(unsafe { base.add(100) }, 2), [7, 7]);
    // Reads of it work; the write-only one refuses them.
    p.a.ep
        .read_vec(3, p.b_addr, ro.base(), ro.key(), 3)
        .unwrap();
    assert_eq!(next_ok(&p.a.tx).buf.unwrap(), [7, 7, 7]);
    p.a.ep
        .read_vec(3, p.b_addr, wo.base(), wo.key(), 4)
        .unwrap();
    assert_eq!(
        next(&p.a.tx).expect_err("read of write-only").status,
        Status::Access
    );
    // Beyond the registered bytes (though inside the shared pages): refused.
    p.a.ep
        .write(b"y", p.b_addr, wo.base() + 16, wo.key(), 5)
        .unwrap();
    assert_eq!(
        next(&p.a.tx).expect_err("out of range").status,
        Status::Access
    );

    // Another domain of the process registers the same bytes.
    // SAFETY: inside `buf`.
    let local = unsafe { p.da.register_external(base, 64, &attr(RW)) }.unwrap();
    drop((whole, ro, wo, local));
    assert_eq!(buf[1000..1005], *b"hello");
}

#[test]
fn overlapping_regions_and_file_backed_and_read_only_memory() {
    let r = rig(1);
    let d = open_domain(&r.paths[0]);
    let page = 4096;
    // SAFETY: a fresh private anonymous mapping of four pages, unmapped at the end.
    let m = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4 * page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(m, libc::MAP_FAILED);
    let m = m.cast::<u8>();
    // SAFETY: inside the mapping above.
    unsafe {
        m.write_bytes(0x5a, 4 * page);
        let first = d.register_external(m, 2 * page, &attr(RW)).unwrap();
        // Partly overlapping regions are independent.
        let second = d
            .register_external(m.add(page), 2 * page, &attr(RW))
            .unwrap();
        let third = d
            .register_external(m.add(100), 3 * page - 200, &attr(RW))
            .unwrap();
        assert_eq!(view(m, 4 * page), vec![0x5a; 4 * page]);
        // Remote access across a page boundary.
        let e = endpoint(&d);
        let me = e.av.insert(e.ep.name()).unwrap();
        let data: Vec<u8> = (0..256u32).map(|i| i as u8).collect();
        let at = third.base() + 2 * page as u64 - 100 - 128;
        e.ep.write(&data, me, at, third.key(), 1).unwrap();
        next_ok(&e.tx);
        assert_eq!(view(m.add(2 * page - 128), 256), data);
        e.ep.read_vec(256, me, at, third.key(), 2).unwrap();
        assert_eq!(next_ok(&e.tx).buf.unwrap(), data);
        drop((first, second, third, e));
        libc::munmap(m.cast(), 4 * page);
    }

    let e = endpoint(&d);
    let me = e.av.insert(e.ep.name()).unwrap();
    // File-backed memory works like any other.
    let mut f = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut f, &[1u8; 4096]).unwrap();
    // SAFETY: a private mapping of one page of a file we own, unmapped below.
    let fm = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    assert_ne!(fm, libc::MAP_FAILED);
    // SAFETY: the mapping is live until the munmap below, after the region is dropped.
    let r1 = unsafe { d.register_external(fm.cast(), 100, &attr(RW)) }.unwrap();
    e.ep.write(b"file", me, r1.base() + 10, r1.key(), 3)
        .unwrap();
    next_ok(&e.tx);
    // SAFETY: inside the mapping.
    assert_eq!(view(unsafe { fm.cast::<u8>().add(10) }, 4), b"file");
    drop(r1);
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(fm, page) };

    // Read-only memory: the kernel refuses the device's writes, reads work.
    // SAFETY: a fresh read-only anonymous page, unmapped below.
    let ro = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(ro, libc::MAP_FAILED);
    // SAFETY: the mapping is live until the munmap below, after the region is dropped.
    let r2 = unsafe { d.register_external(ro.cast(), 64, &attr(RW)) }.unwrap();
    e.ep.write(b"no", me, r2.base(), r2.key(), 4).unwrap();
    assert_eq!(
        next(&e.tx).expect_err("write to read-only memory").status,
        Status::Fault
    );
    e.ep.read_vec(8, me, r2.base(), r2.key(), 5).unwrap();
    assert_eq!(next_ok(&e.tx).buf.unwrap(), [0u8; 8]);
    drop((r2, e));
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(ro, page) };
}

/// Writer threads hammer words before, inside and after a heap buffer while it is registered
/// and remotely written and read. Before each write a writer checks that its previous write is
/// still there, so a registration that loses a concurrent write (as copying the pages and
/// remapping them did) fails. Neighbours of the registered bytes are never written by the
/// device.
#[test]
fn registration_loses_no_concurrent_write() {
    no_concurrent_write_lost(false);
}

/// As above, with the pages first shared with the device (`Domain::share_raw`, which moves
/// them onto a memfd): the move must not lose a write either.
#[test]
fn sharing_pages_loses_no_concurrent_write() {
    no_concurrent_write_lost(true);
}

fn no_concurrent_write_lost(share: bool) {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
    use std::time::{Duration, Instant};

    const WORDS: usize = (4 << 20) / 8;
    const WRITERS: usize = 3;
    /// Words a writer owns: in the first page (outside the region), in the middle (inside), and
    /// in the last page (outside).
    fn slots(w: usize) -> [usize; 3] {
        [w, WORDS / 2 + w, WORDS - 1 - w]
    }
    /// The region: words 16..WORDS-16; the device writes words 64..128 of it (no slot there).
    const REG: std::ops::Range<usize> = 16..WORDS - 16;
    const DEV: std::ops::Range<usize> = 64..128;
    let r = rig(2);
    let p = pair(&r);
    let deadline = Instant::now() + Duration::from_secs(60);
    let wait_for = |progress: &AtomicUsize, at_least: usize| {
        while progress.load(Relaxed) < at_least {
            assert!(Instant::now() < deadline, "writers made no progress");
            std::thread::yield_now();
        }
    };
    for round in 0..30u64 {
        // A fresh allocation each round: pages nobody registered before.
        let buf: Box<[AtomicU64]> = (0..WORDS).map(|_| AtomicU64::new(0)).collect();
        let stop = AtomicBool::new(false);
        let lost = AtomicUsize::new(0);
        let progress = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for w in 0..WRITERS {
                let (buf, stop, lost, progress) = (&buf, &stop, &lost, &progress);
                s.spawn(move || {
                    let mut v = 0u64;
                    while !stop.load(Relaxed) && v < 50_000_000 {
                        for i in slots(w) {
                            if buf[i].load(Relaxed) != v {
                                lost.fetch_add(1, Relaxed);
                            }
                            buf[i].store(v + 1, Relaxed);
                        }
                        v += 1;
                        progress.fetch_add(1, Relaxed);
                    }
                });
            }
            wait_for(&progress, 10_000);
            let base = buf.as_ptr().cast::<u8>();
            if share {
                // SAFETY: inside `buf`.
                let at = unsafe { base.add(REG.start * 8) };
                p.db.share_raw(at, REG.len() * 8).unwrap();
                assert!(!p.db.external_regions().is_empty());
            }
            // SAFETY: `buf` outlives the region (dropped at the end of this scope).
            let mr = unsafe {
                p.db.register_external(base.add(REG.start * 8), REG.len() * 8, &attr(RW))
            }
            .unwrap();
            let before = progress.load(Relaxed);
            let pattern: Vec<u8> = (0..DEV.len() * 8)
                .map(|i| (i as u64 * 31 + round) as u8)
                .collect();
            let at = mr.base() + ((DEV.start - REG.start) * 8) as u64;
            p.a.ep.write(&pattern, p.b_addr, at, mr.key(), 1).unwrap();
            next_ok(&p.a.tx);
            p.a.ep
                .read_vec(pattern.len(), p.b_addr, at, mr.key(), 2)
                .unwrap();
            assert_eq!(next_ok(&p.a.tx).buf.unwrap(), pattern, "round {round}");
            wait_for(&progress, before + 10_000);
            stop.store(true, Relaxed);
            drop(mr);
        });
        assert_eq!(lost.load(Relaxed), 0, "round {round}: writes were lost");
        for w in 0..WRITERS {
            let s = slots(w);
            let v = buf[s[0]].load(Relaxed);
            assert!(s.iter().all(|&i| buf[i].load(Relaxed) == v));
        }
        let dev: Vec<u8> = buf[DEV]
            .iter()
            .flat_map(|x| x.load(Relaxed).to_le_bytes())
            .collect();
        let want: Vec<u8> = (0..DEV.len() * 8)
            .map(|i| (i as u64 * 31 + round) as u8)
            .collect();
        assert_eq!(dev, want);
    }
}

/// A shared buffer registered for remote access may be written by the device at any time: the
/// checked accessors refuse it until the registration is gone.
#[test]
fn shared_buffer_is_borrowed_only_when_the_device_cannot_write_it() {
    let r = rig(2);
    let p = pair(&r);
    let mut buf = p.db.alloc_buffer(256).unwrap();
    buf.get_mut().expect("idle buffer")[..4].copy_from_slice(b"idle");
    let mr = p.db.register(&buf, RW, None).unwrap();
    assert!(buf.get_mut().is_none(), "registered for remote write");
    assert!(buf.get().is_none());
    p.a.ep
        .write(b"peer", p.b_addr, mr.base(), mr.key(), 1)
        .unwrap();
    next_ok(&p.a.tx);
    drop(mr);
    assert_eq!(&buf.get().expect("registration dropped")[..4], b"peer");
}

/// `Domain::unshare_raw`: shared pages go back to bounce buffers; the same pages, still mapped,
/// can be shared again, but a new mapping at the same address is never served from the
/// device's view of the old pages (the data sent from it is the new mapping's).
#[test]
fn unshared_pages_are_never_served_from_a_stale_mapping() {
    const LEN: usize = 256 << 10;
    let r = rig(2);
    let p = pair(&r);
    let anon = |hint: *mut libc::c_void, flags: i32| {
        // SAFETY: a fresh anonymous mapping; with MAP_FIXED_NOREPLACE it never replaces one.
        let m = unsafe {
            libc::mmap(
                hint,
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
                -1,
                0,
            )
        };
        assert_ne!(m, libc::MAP_FAILED);
        m.cast::<u8>()
    };
    let send_from = |at: *const u8, seed: u8| {
        // SAFETY: `at..at+LEN` is this test's live mapping; nothing else writes it meanwhile.
        let s = unsafe { std::slice::from_raw_parts_mut(at.cast_mut(), LEN) };
        for (i, b) in s.iter_mut().enumerate() {
            *b = seed.wrapping_add((i * 7) as u8);
        }
        p.b.ep.recv_vec(LEN, 2).unwrap();
        // From the application's memory, as the provider posts it (zero-copy when shared).
        // SAFETY: `s` stays valid and unwritten until the send completes below.
        let iov = [unsafe { vfabric::Iov::raw(s.as_mut_ptr(), LEN) }];
        let msg = vfabric::Msg {
            iov: &iov,
            addr: p.b_addr,
            context: 1,
            data: 0,
        };
        p.a.ep.sendmsg(&msg, 0).unwrap();
        next_ok(&p.a.tx);
        assert!(next_ok(&p.b.rx).buf.unwrap() == *s, "seed {seed}");
    };
    let at = anon(std::ptr::null_mut(), 0);
    p.da.share_raw(at, LEN).unwrap();
    assert_eq!(p.da.external_regions().len(), 1);
    send_from(at, 1);
    assert_eq!(p.da.unshare_raw(at, LEN), 1);
    assert!(p.da.external_regions().is_empty());
    send_from(at, 2);
    // The same pages again: taken back (no new device slot).
    p.da.share_raw(at, LEN).unwrap();
    assert_eq!(p.da.external_regions().len(), 1);
    send_from(at, 3);
    assert_eq!(p.da.unshare_raw(at, LEN), 1);
    // SAFETY: the test's own mapping, no longer shared or used.
    assert_eq!(unsafe { libc::munmap(at.cast(), LEN) }, 0);
    let again = anon(at.cast(), libc::MAP_FIXED_NOREPLACE);
    assert_eq!(again, at);
    // The device still maps the old pages there: refused, so the new ones stay bounced.
    assert!(p.da.share_raw(at, LEN).is_err());
    assert!(p.da.external_regions().is_empty());
    send_from(at, 4);
    // SAFETY: as above.
    unsafe { libc::munmap(at.cast(), LEN) };
}
