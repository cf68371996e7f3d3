// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Registration of memory outside the domain's shared region (`Domain::register_external`):
//! plain `Vec`/`Box` buffers remapped in place onto a memfd and added to the device with
//! ADD_MEM_REG. An embedded `vfabricd` and driver domains in this process; every wait has a
//! timeout.

use std::path::PathBuf;

use vfabric::proto::{atomic_op as op, datatype as dt};
use vfabric::{
    fi, AddressVector, AtomicMsg, BindFlags, CompletionQueue, CqAttr, Domain, DomainAttr, Endpoint,
    EpAttr, Error, FiAddr, Iov, MrAttr, Status, WaitMode,
};

mod common;
use common::*;

const RW: u64 = fi::REMOTE_READ | fi::REMOTE_WRITE;

struct Ep {
    ep: Endpoint,
    tx: CompletionQueue,
    _rx: CompletionQueue,
    av: AddressVector,
}

fn open_domain(path: &PathBuf) -> Domain {
    Domain::open(
        path,
        DomainAttr {
            mem_bytes: 16 << 20,
            ..Default::default()
        },
    )
    .expect("open domain")
}

fn endpoint(domain: &Domain) -> Ep {
    let cq = || {
        domain
            .cq_open(CqAttr {
                size: 256,
                wait: WaitMode::None,
            })
            .unwrap()
    };
    let (tx, rx) = (cq(), cq());
    let av = domain.av_open().unwrap();
    let ep = domain.endpoint(EpAttr::default()).unwrap();
    ep.bind_cq(&tx, BindFlags::TRANSMIT).unwrap();
    ep.bind_cq(&rx, BindFlags::RECV).unwrap();
    ep.bind_av(&av).unwrap();
    ep.enable().unwrap();
    Ep {
        ep,
        tx,
        _rx: rx,
        av,
    }
}

/// The application's view of bytes the device wrote behind the compiler's back.
fn view(p: *const u8, len: usize) -> Vec<u8> {
    // SAFETY: `p..p+len` is a live buffer of the test; volatile reads so the compiler does not
    // assume the bytes unchanged since the test last wrote them.
    (0..len)
        .map(|i| unsafe { std::ptr::read_volatile(p.add(i)) })
        .collect()
}

struct Pair {
    da: Domain,
    db: Domain,
    a: Ep,
    b_addr: FiAddr,
    _b: Ep,
}

fn pair(r: &Rig) -> Pair {
    let da = open_domain(&r.paths[0]);
    let db = open_domain(&r.paths[1]);
    let a = endpoint(&da);
    let b = endpoint(&db);
    let b_addr = a.av.insert(b.ep.name()).unwrap();
    Pair {
        da,
        db,
        a,
        b_addr,
        _b: b,
    }
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
    assert!(!p.db.external_regions().is_empty());
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
    let regions = p.db.external_regions();
    // SAFETY: inside `buf`.
    let ro = unsafe {
        p.db.register_external(base.add(100), 200, &attr(fi::REMOTE_READ))
    }
    .unwrap();
    // SAFETY: inside `buf`; the fallback of register_raw finds the added range.
    let wo = unsafe {
        p.db.register_raw(base.add(1000), 16, &attr(fi::REMOTE_WRITE))
    }
    .unwrap();
    assert_eq!(p.db.external_regions(), regions, "no new ADD_MEM_REG");
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

    // Another domain of the process adds the same pages without remapping them.
    // SAFETY: inside `buf`.
    let local = unsafe { p.da.register_external(base, 64, &attr(RW)) }.unwrap();
    assert_eq!(p.da.external_regions(), regions);
    drop((whole, ro, wo, local));
    assert_eq!(buf[1000..1005], *b"hello");
}

#[test]
fn partial_overlap_extends_and_unsuitable_memory_is_refused() {
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
        assert_eq!(d.external_regions(), vec![(m as usize, 2 * page)]);
        // Partly overlapping: only the missing page is moved and added.
        let second = d
            .register_external(m.add(page), 2 * page, &attr(RW))
            .unwrap();
        assert_eq!(
            d.external_regions(),
            vec![(m as usize, 2 * page), (m as usize + 2 * page, page)]
        );
        // Inside the union of both: nothing new.
        let third = d
            .register_external(m.add(100), 3 * page - 200, &attr(RW))
            .unwrap();
        assert_eq!(d.external_regions().len(), 2);
        assert_eq!(view(m, 4 * page), vec![0x5a; 4 * page]);
        // Remote access across the boundary of the two device regions.
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

    // File-backed memory is refused.
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
    // SAFETY: the mapping is live.
    let r1 = unsafe { d.register_external(fm.cast(), 100, &attr(RW)) };
    assert!(matches!(r1, Err(Error::InvalidArgument(_))), "{r1:?}");
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(fm, page) };

    // So is read-only memory.
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
    // SAFETY: the mapping is live; the call is refused before touching it.
    let r2 = unsafe { d.register_external(ro.cast(), 64, &attr(RW)) };
    assert!(matches!(r2, Err(Error::InvalidArgument(_))), "{r2:?}");
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(ro, page) };
}
