// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Device memory (issue 13 §1) through the application's `HmemCopy`, against an embedded
//! `vfabricd`. The "device memory" is a `PROT_NONE` mapping that only the test's own copy
//! functions open (mprotect) for the length of one copy, counting their calls: any access by
//! the driver or the device crashes the test. Every wait has a timeout.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vfabric::proto::{atomic_op as op, datatype as dt};
use vfabric::{
    fi, AtomicMsg, Domain, Error, HmemCopy, HmemIface, HmemRegion, Iov, Msg, RmaIov, RmaMsg,
    TaggedMsg, INJECT_CALL,
};

mod common;
use common::*;

const DEVICE: u64 = 7;
const IFACE: HmemIface = HmemIface::Cuda;

/// A `PROT_NONE` mapping standing in for a GPU's memory, and the copy functions that alone
/// may open it.
struct Dev {
    base: usize,
    len: usize,
    from: AtomicUsize,
    to: AtomicUsize,
    /// Make `copy_to` fail (EFAULT), as a device runtime might.
    fail_to: AtomicBool,
    /// One opening at a time (each closes the mapping again).
    open: Mutex<()>,
}

impl Dev {
    fn new(len: usize) -> Arc<Dev> {
        // SAFETY: a fresh anonymous mapping, owned by the returned value (unmapped on drop).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        Arc::new(Dev {
            base: p as usize,
            len,
            from: AtomicUsize::new(0),
            to: AtomicUsize::new(0),
            fail_to: AtomicBool::new(false),
            open: Mutex::new(()),
        })
    }

    fn ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }

    /// Run `f` on the mapping opened read-write, then close it again.
    fn with<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let _g = self.open.lock().unwrap();
        let prot = |p| {
            // SAFETY: our own mapping, whole.
            let rc = unsafe { libc::mprotect(self.base as *mut libc::c_void, self.len, p) };
            assert_eq!(rc, 0, "mprotect");
        };
        prot(libc::PROT_READ | libc::PROT_WRITE);
        // SAFETY: the mapping is readable and writable until `prot(PROT_NONE)` below, and only
        // this function (serialized by `open`) touches it.
        let r = f(unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.len) });
        prot(libc::PROT_NONE);
        r
    }

    /// The test's own look at device memory (not a counted copy).
    fn peek(&self, off: usize, len: usize) -> Vec<u8> {
        self.with(|m| m[off..off + len].to_vec())
    }
    fn fill(&self, off: usize, b: &[u8]) {
        self.with(|m| m[off..off + b.len()].copy_from_slice(b));
    }

    fn offset(&self, p: usize, n: usize, iface: HmemIface, device: u64) -> usize {
        assert_eq!(
            (iface, device),
            (IFACE, DEVICE),
            "iface/device of the region"
        );
        assert!(
            p >= self.base && p + n <= self.base + self.len,
            "copy outside the device memory"
        );
        p - self.base
    }

    fn calls(&self) -> (usize, usize) {
        (
            self.from.load(Ordering::SeqCst),
            self.to.load(Ordering::SeqCst),
        )
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        // SAFETY: our mapping; no region of it is used after the test.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

impl HmemCopy for Dev {
    fn copy_from(
        &self,
        dst: &mut [u8],
        iface: HmemIface,
        device: u64,
        src: *const u8,
    ) -> vfabric::Result<()> {
        let off = self.offset(src as usize, dst.len(), iface, device);
        self.with(|m| dst.copy_from_slice(&m[off..off + dst.len()]));
        self.from.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn copy_to(
        &self,
        dst: *mut u8,
        iface: HmemIface,
        device: u64,
        src: &[u8],
    ) -> vfabric::Result<()> {
        let off = self.offset(dst as usize, src.len(), iface, device);
        self.to.fetch_add(1, Ordering::SeqCst);
        if self.fail_to.load(Ordering::SeqCst) {
            return Err(Error::Io(std::io::Error::from_raw_os_error(libc::EFAULT)));
        }
        self.with(|m| m[off..off + src.len()].copy_from_slice(src));
        Ok(())
    }
}

/// Device memory of `len` bytes on domain `d`, with `dev` installed as its copy functions.
fn device_memory(d: &Domain, dev: &Arc<Dev>) -> HmemRegion {
    d.set_hmem_copy(Some(dev.clone()));
    d.register_hmem(dev.ptr(), dev.len, IFACE, DEVICE).unwrap()
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

/// Drive `d`'s progress until `cq` holds an entry, without reading it.
fn until_queued(d: &Domain, cq: &vfabric::CompletionQueue) {
    let deadline = Instant::now() + TIMEOUT;
    while cq.queued() == 0 {
        d.progress().unwrap();
        assert!(Instant::now() < deadline, "timed out waiting for an entry");
        std::thread::yield_now();
    }
}

#[test]
fn registration_needs_installed_copy_functions() {
    let r = rig(1);
    let d = open_domain_mb(&r.paths[0], 16);
    let dev = Dev::new(4096);
    assert!(!d.has_hmem_copy());
    let e = d.register_hmem(dev.ptr(), 4096, IFACE, DEVICE).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    assert_eq!(e.errno(), fi::ENOSYS);
    d.set_hmem_copy(Some(dev.clone()));
    let h = d.register_hmem(dev.ptr(), 4096, IFACE, DEVICE).unwrap();
    assert_eq!(
        (h.iface(), h.device(), h.addr(), h.len()),
        (IFACE, DEVICE, dev.base, 4096)
    );
    assert!(matches!(
        d.register_hmem(dev.ptr(), 4096, HmemIface::System, 0),
        Err(Error::InvalidArgument(_))
    ));
    // Taken away again: registering fails, an existing region keeps its functions.
    d.set_hmem_copy(None);
    assert!(matches!(
        d.register_hmem(dev.ptr(), 4096, HmemIface::Ze, 0),
        Err(Error::Unsupported(_))
    ));
    h.write(8, b"kept").unwrap();
    assert_eq!(dev.peek(8, 4), b"kept");
    assert_eq!(dev.calls(), (0, 1));
    // The iface values are libfabric's.
    for (i, v) in [
        (HmemIface::System, 0),
        (HmemIface::Cuda, 1),
        (HmemIface::Rocr, 2),
        (HmemIface::Ze, 3),
        (HmemIface::Neuron, 4),
        (HmemIface::SynapseAi, 5),
    ] {
        assert_eq!(i.raw(), v);
        assert_eq!(HmemIface::from_raw(v), Some(i));
    }
    assert_eq!(HmemIface::from_raw(6), None);
}

/// Send from device memory of A into device memory of B, `n` bytes (inline and bounced
/// sizes), plain and tagged: one copy out at post time, one copy in when B reads the entry.
#[test]
fn send_and_receive_through_copy_functions() {
    let r = rig(2);
    let p = rdm_pair(&r, 32, 64);
    let (deva, devb) = (Dev::new(64 << 10), Dev::new(64 << 10));
    let (ha, hb) = (device_memory(&p.da, &deva), device_memory(&p.db, &devb));
    let mut calls = ((0, 0), (0, 0));
    let any = vfabric::FI_ADDR_UNSPEC;
    for (k, n) in [16usize, 20_000].into_iter().enumerate() {
        for tagged in [false, true] {
            let data = pattern(n, k as u8 + 3 * tagged as u8);
            deva.fill(0, &data);
            let dst = [Iov::hmem(&hb, 100..100 + n)];
            let src = [Iov::hmem(&ha, 0..n)];
            if tagged {
                let m = |iov, addr, ctx| TaggedMsg {
                    iov,
                    addr,
                    tag: 0x55,
                    ignore: 0,
                    context: ctx,
                    data: 0,
                };
                p.b.ep.trecvmsg(&m(&dst, any, 2), 0).unwrap();
                p.a.ep.tsendmsg(&m(&src, p.b_addr, 1), 0).unwrap();
            } else {
                let m = |iov, addr, ctx| Msg {
                    iov,
                    addr,
                    context: ctx,
                    data: 0,
                };
                p.b.ep.recvmsg(&m(&dst, any, 2), 0).unwrap();
                p.a.ep.sendmsg(&m(&src, p.b_addr, 1), 0).unwrap();
            }
            calls.0 .0 += 1;
            assert_eq!(deva.calls(), calls.0, "one copy out at post time");
            assert_eq!(next_ok(&p.a.tx).context, 1);
            until_queued(&p.db, &p.b.rx);
            assert_eq!(devb.calls(), calls.1, "nothing copied before the read");
            let e = next_ok(&p.b.rx);
            calls.1 .1 += 1;
            assert_eq!((e.context, e.len, e.buf), (2, n, None));
            assert_eq!(devb.calls(), calls.1, "one copy in at the read");
            assert_eq!(devb.peek(100, n), data, "n={n} tagged={tagged}");
        }
    }
}

/// Inject from device memory, and a receive split over host and device memory.
#[test]
fn inject_and_mixed_receive() {
    let r = rig(2);
    let p = rdm_pair(&r, 32, 64);
    let (deva, devb) = (Dev::new(4096), Dev::new(4096));
    let (ha, hb) = (device_memory(&p.da, &deva), device_memory(&p.db, &devb));
    deva.fill(10, b"0123456789abcdef");
    let mut host = vec![0u8; 6];
    // SAFETY: `host` outlives the receive, which is read below.
    let dst = [
        unsafe { Iov::raw(host.as_mut_ptr(), 6) },
        Iov::hmem(&hb, 0..64),
    ];
    p.b.ep
        .recvmsg(
            &Msg {
                iov: &dst,
                addr: vfabric::FI_ADDR_UNSPEC,
                context: 4,
                data: 0,
            },
            0,
        )
        .unwrap();
    let src = [Iov::hmem(&ha, 10..26)];
    let m = Msg {
        iov: &src,
        addr: p.b_addr,
        context: 0,
        data: 0,
    };
    p.a.ep.sendmsg(&m, fi::INJECT | INJECT_CALL).unwrap();
    assert_eq!(deva.calls(), (1, 0));
    let e = next_ok(&p.b.rx);
    assert_eq!((e.context, e.len), (4, 16));
    assert_eq!(&host, b"012345");
    assert_eq!(devb.peek(0, 10), b"6789abcdef");
    assert_eq!(devb.calls(), (0, 1));
    assert_quiet(&p.a.tx, std::time::Duration::from_millis(20));
}

/// RMA: a write from device memory, a read into device memory (copied when read).
#[test]
fn rma_through_copy_functions() {
    let r = rig(2);
    let p = rdm_pair(&r, 32, 64);
    let deva = Dev::new(64 << 10);
    let ha = device_memory(&p.da, &deva);
    let tbuf = p.db.alloc_buffer(32 << 10).unwrap();
    let mr =
        p.db.register(&tbuf, fi::REMOTE_READ | fi::REMOTE_WRITE, None)
            .unwrap();
    let n = 24_000;
    let data = pattern(n, 9);
    deva.fill(0, &data);
    let src = [Iov::hmem(&ha, 0..n)];
    let rma = [RmaIov {
        addr: mr.base() + 100,
        len: n as u64,
        key: mr.key(),
    }];
    let m = |iov, ctx| RmaMsg {
        iov,
        addr: p.b_addr,
        rma_iov: &rma,
        context: ctx,
        data: 0,
    };
    p.a.ep.writemsg(&m(&src, 1), 0).unwrap();
    assert_eq!(deva.calls(), (1, 0));
    assert_eq!(next_ok(&p.a.tx).context, 1);
    // SAFETY: the write completed; nothing else uses the buffer.
    assert_eq!(unsafe { &tbuf.as_slice()[100..100 + n] }, &data[..]);

    // Read it back into another part of device memory.
    let dst = [Iov::hmem(&ha, 30_000..30_000 + n)];
    p.a.ep.readmsg(&m(&dst, 2), 0).unwrap();
    until_queued(&p.da, &p.a.tx);
    assert_eq!(deva.calls(), (1, 0), "nothing copied before the read");
    let e = next_ok(&p.a.tx);
    assert_eq!((e.context, e.buf), (2, None));
    assert_eq!(deva.calls(), (1, 1));
    assert_eq!(deva.peek(30_000, n), data);
}

/// Atomics: operands and compare values from device memory, results into it.
#[test]
fn atomics_through_copy_functions() {
    let r = rig(2);
    let p = rdm_pair(&r, 32, 64);
    let deva = Dev::new(4096);
    let ha = device_memory(&p.da, &deva);
    let tbuf = p.db.alloc_buffer(64).unwrap();
    let mr =
        p.db.register(&tbuf, fi::REMOTE_READ | fi::REMOTE_WRITE, None)
            .unwrap();
    let target = || -> u64 {
        // SAFETY: the operations on it completed.
        u64::from_ne_bytes(unsafe { tbuf.as_slice()[0..8].try_into().unwrap() })
    };
    let am = |o: u8, ctx: u64| AtomicMsg {
        operands: &[],
        addr: p.b_addr,
        remote_addr: mr.base(),
        key: mr.key(),
        datatype: dt::UINT64,
        op: o,
        count: 1,
        context: ctx,
    };
    deva.fill(0, &5u64.to_ne_bytes());
    deva.fill(8, &7u64.to_ne_bytes());
    deva.fill(16, &12u64.to_ne_bytes());

    // atomic SUM 5 (operand in device memory).
    p.a.ep
        .atomicmsg_iov(&am(op::SUM, 1), &[Iov::hmem(&ha, 0..8)], 0)
        .unwrap();
    assert_eq!(next_ok(&p.a.tx).context, 1);
    assert_eq!(target(), 5);
    assert_eq!(deva.calls(), (1, 0));

    // fetch SUM 7: result (5) into device memory at 64, copied when read.
    p.a.ep
        .fetch_atomicmsg_iov(
            &am(op::SUM, 2),
            &[Iov::hmem(&ha, 8..16)],
            &[Iov::hmem(&ha, 64..72)],
            0,
        )
        .unwrap();
    assert_eq!(deva.calls(), (2, 0));
    until_queued(&p.da, &p.a.tx);
    assert_eq!(deva.calls(), (2, 0));
    assert_eq!(next_ok(&p.a.tx).context, 2);
    assert_eq!(deva.calls(), (2, 1));
    assert_eq!(deva.peek(64, 8), 5u64.to_ne_bytes());
    assert_eq!(target(), 12);

    // CSWAP: compare 12 (device), swap in 7 (device); result 12 into device memory at 72.
    p.a.ep
        .compare_atomicmsg_iov(
            &am(op::CSWAP, 3),
            &[Iov::hmem(&ha, 8..16)],
            &[Iov::hmem(&ha, 16..24)],
            &[Iov::hmem(&ha, 72..80)],
            0,
        )
        .unwrap();
    assert_eq!(deva.calls(), (4, 1));
    assert_eq!(next_ok(&p.a.tx).context, 3);
    assert_eq!(deva.calls(), (4, 2));
    assert_eq!(deva.peek(72, 8), 12u64.to_ne_bytes());
    assert_eq!(target(), 7);

    // inject_atomic from device memory: no completion.
    p.a.ep
        .atomicmsg_iov(
            &am(op::SUM, 0),
            &[Iov::hmem(&ha, 0..8)],
            fi::INJECT | INJECT_CALL,
        )
        .unwrap();
    assert_eq!(deva.calls(), (5, 2));
    let deadline = Instant::now() + TIMEOUT;
    while target() != 12 {
        p.da.progress().unwrap();
        assert!(Instant::now() < deadline, "inject_atomic never landed");
        std::thread::yield_now();
    }
    // Operands given both ways are refused.
    let mut both = am(op::SUM, 4);
    let one = 1u64.to_ne_bytes();
    both.operands = &one;
    assert!(matches!(
        p.a.ep.atomicmsg_iov(&both, &[Iov::hmem(&ha, 0..8)], 0),
        Err(Error::InvalidArgument(_))
    ));
}

/// A truncated receive delivers the placed bytes when its error entry is read; a failing
/// copy function turns a success entry into an error entry.
#[test]
fn truncation_and_copy_failure() {
    let r = rig(2);
    let p = rdm_pair(&r, 32, 64);
    let devb = Dev::new(4096);
    let hb = device_memory(&p.db, &devb);
    let dst = [Iov::hmem(&hb, 0..64)];
    let rm = |ctx| Msg {
        iov: &dst,
        addr: vfabric::FI_ADDR_UNSPEC,
        context: ctx,
        data: 0,
    };
    p.b.ep.recvmsg(&rm(1), 0).unwrap();
    let data = pattern(100, 1);
    p.a.ep.send(&data, p.b_addr, 9).unwrap();
    assert_eq!(next_ok(&p.a.tx).context, 9);
    let e = next_err(&p.b.rx);
    assert_eq!((e.context, e.err, e.len, e.buf), (1, fi::ETRUNC, 64, None));
    assert_eq!(devb.calls(), (0, 1));
    assert_eq!(devb.peek(0, 64), &data[..64]);

    devb.fail_to.store(true, Ordering::SeqCst);
    p.b.ep.recvmsg(&rm(2), 0).unwrap();
    p.a.ep.send(b"lost", p.b_addr, 10).unwrap();
    assert_eq!(next_ok(&p.a.tx).context, 10);
    let e = next_err(&p.b.rx);
    assert_eq!((e.context, e.err), (2, libc::EFAULT));
    assert_eq!(devb.calls(), (0, 2));
    assert_ne!(devb.peek(0, 4), b"lost");
}

/// A receive into device memory whose success entry is suppressed (selective completion
/// without `fi::COMPLETION`) has no read to wait for: its bytes are copied when it completes,
/// before its counter moves.
#[test]
fn unreported_receive_is_copied_before_its_counter() {
    let r = rig(2);
    let da = open_domain_mb(&r.paths[0], 16);
    let db = open_domain_mb(&r.paths[1], 16);
    let a = rdm_endpoint(&da, 64);
    let devb = Dev::new(4096);
    let hb = device_memory(&db, &devb);
    let cq = db
        .cq_open(vfabric::CqAttr {
            size: 64,
            wait: vfabric::WaitMode::None,
        })
        .unwrap();
    let cntr = db.cntr_open().unwrap();
    let ep = db.endpoint(vfabric::EpAttr::default()).unwrap();
    ep.bind_cq(
        &cq,
        vfabric::BindFlags {
            transmit: true,
            recv: true,
            selective_completion: true,
        },
    )
    .unwrap();
    ep.bind_cntr(&cntr, fi::RECV).unwrap();
    ep.bind_av(&db.av_open().unwrap()).unwrap();
    ep.enable().unwrap();
    let dst = [Iov::hmem(&hb, 0..64)];
    ep.recvmsg(
        &Msg {
            iov: &dst,
            addr: vfabric::FI_ADDR_UNSPEC,
            context: 1,
            data: 0,
        },
        0,
    )
    .unwrap();
    let to = a.av.insert(ep.name()).unwrap();
    a.ep.send(b"selective", to, 2).unwrap();
    assert_eq!(next_ok(&a.tx).context, 2);
    cntr.wait(1, Some(TIMEOUT)).unwrap();
    assert_eq!(devb.calls(), (0, 1));
    assert_eq!(devb.peek(0, 9), b"selective");
    // A failing copy has no entry to fail: the counter's error count moves instead.
    devb.fail_to.store(true, Ordering::SeqCst);
    ep.recvmsg(
        &Msg {
            iov: &dst,
            addr: vfabric::FI_ADDR_UNSPEC,
            context: 3,
            data: 0,
        },
        0,
    )
    .unwrap();
    a.ep.send(b"lost", to, 4).unwrap();
    assert_eq!(next_ok(&a.tx).context, 4);
    assert!(matches!(cntr.wait(2, Some(TIMEOUT)), Err(Error::Avail)));
    assert_eq!((cntr.read(), cntr.readerr()), (1, 1));
    assert_eq!(devb.calls(), (0, 2));
    assert_quiet(&cq, std::time::Duration::from_millis(20));
}

/// Ranges outside a region are refused at post time, and a cancelled receive into device
/// memory completes `ECANCELED` with nothing copied.
#[test]
fn bad_ranges_and_cancel() {
    let r = rig(2);
    let p = rdm_pair(&r, 32, 64);
    let (deva, devb) = (Dev::new(4096), Dev::new(4096));
    let (ha, hb) = (device_memory(&p.da, &deva), device_memory(&p.db, &devb));
    let m = |iov, addr, ctx| Msg {
        iov,
        addr,
        context: ctx,
        data: 0,
    };
    let out = [Iov::hmem(&ha, 4000..4100)];
    assert!(matches!(
        p.a.ep.sendmsg(&m(&out, p.b_addr, 1), 0),
        Err(Error::InvalidArgument(_))
    ));
    let into = [Iov::hmem(&hb, 4090..4097)];
    assert!(matches!(
        p.b.ep.recvmsg(&m(&into, vfabric::FI_ADDR_UNSPEC, 2), 0),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!((deva.calls(), devb.calls()), ((0, 0), (0, 0)));

    let into = [Iov::hmem(&hb, 0..64)];
    p.b.ep
        .recvmsg(&m(&into, vfabric::FI_ADDR_UNSPEC, 3), 0)
        .unwrap();
    p.b.ep.cancel(3).unwrap();
    let e = next_err(&p.b.rx);
    assert_eq!((e.context, e.err), (3, fi::ECANCELED));
    assert_eq!(devb.calls(), (0, 0));
}
