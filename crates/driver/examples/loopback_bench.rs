// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Rough single-process benchmark: embedded vfabricd with two devices, one domain on each,
//! ping-pong latency (polled and blocking) and streaming bandwidth.
//!
//! `cargo run --release -p vfabric --example loopback_bench [-- ITERS [polled|blocking|all]]`
//!
//! Environment: `DEVICE_POLL_US` (embedded daemon's poll budget), `VFABRIC_SPIN_US` (driver
//! `sread` spin budget), `YIELD_EVERY` (polled loop: polls between `sched_yield`s).

use std::time::{Duration, Instant};

use vfabric::{
    BindFlags, CompletionQueue, CqAttr, CqEntry, Domain, DomainAttr, Endpoint, EpAttr, Error,
    FiAddr, SharedBuf, WaitMode,
};

const TIMEOUT: Duration = Duration::from_secs(30);

struct Side {
    domain: Domain,
    ep: Endpoint,
    tx: CompletionQueue,
    rx: CompletionQueue,
    peer: FiAddr,
    _av: vfabric::AddressVector,
}

fn open(
    path: &std::path::Path,
    wait: WaitMode,
) -> (
    Domain,
    Endpoint,
    CompletionQueue,
    CompletionQueue,
    vfabric::AddressVector,
) {
    let attr = DomainAttr {
        mem_bytes: 256 << 20,
        ..Default::default()
    };
    let domain = Domain::open(path, attr).unwrap();
    let tx = domain.cq_open(CqAttr { size: 1024, wait }).unwrap();
    let rx = domain.cq_open(CqAttr { size: 1024, wait }).unwrap();
    let av = domain.av_open().unwrap();
    let ep = domain.endpoint(EpAttr::default()).unwrap();
    ep.bind_cq(&tx, BindFlags::TRANSMIT).unwrap();
    ep.bind_cq(&rx, BindFlags::RECV).unwrap();
    ep.bind_av(&av).unwrap();
    ep.enable().unwrap();
    (domain, ep, tx, rx, av)
}

fn pair(paths: &[std::path::PathBuf], wait: WaitMode) -> (Side, Side) {
    let (da, ea, ta, ra, ava) = open(&paths[0], wait);
    let (db, eb, tb, rb, avb) = open(&paths[1], wait);
    let pa = ava.insert(eb.name()).unwrap();
    let pb = avb.insert(ea.name()).unwrap();
    (
        Side {
            domain: da,
            ep: ea,
            tx: ta,
            rx: ra,
            peer: pa,
            _av: ava,
        },
        Side {
            domain: db,
            ep: eb,
            tx: tb,
            rx: rb,
            peer: pb,
            _av: avb,
        },
    )
}

fn wait(cq: &CompletionQueue, blocking: bool) -> CqEntry {
    let mut v = Vec::with_capacity(1);
    let deadline = Instant::now() + TIMEOUT;
    let mut polls = 0u32;
    loop {
        let r = if blocking {
            cq.sread(&mut v, 1, Some(TIMEOUT))
        } else {
            cq.read(&mut v, 1)
        };
        match r {
            Ok(_) => return v.pop().unwrap(),
            Err(Error::Again) => {
                polls = polls.wrapping_add(1);
                // Two cores, more busy threads than cores: yield now and then so the device
                // gets the CPU, without paying a syscall per poll.
                if polls & (yield_every() - 1) == 0 {
                    assert!(Instant::now() < deadline, "timeout");
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
            Err(Error::Avail) => panic!("error completion: {:?}", cq.readerr()),
            Err(e) => panic!("{e}"),
        }
    }
}

/// Polls between yields (power of two; `YIELD_EVERY` env overrides).
fn yield_every() -> u32 {
    static CELL: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CELL.get_or_init(|| {
        std::env::var("YIELD_EVERY")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .map(|v| v.next_power_of_two())
            .unwrap_or(256)
    })
}

fn post<F: FnMut() -> vfabric::Result<()>>(mut f: F, d: &Domain) {
    loop {
        match f() {
            Ok(()) => return,
            Err(Error::Again) => {
                d.progress().unwrap();
                std::thread::yield_now();
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Ping-pong with shared buffers; returns the one-way latency.
fn pingpong(a: &Side, b: &Side, size: usize, iters: usize, blocking: bool) -> Duration {
    let abuf = a.domain.alloc_buffer(size.max(1)).unwrap();
    let bbuf = b.domain.alloc_buffer(size.max(1)).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..iters as u64 {
                b.ep.recv_buf(&bbuf, 0..size, i).unwrap();
                wait(&b.rx, blocking);
                post(|| b.ep.send_buf(&bbuf, 0..size, b.peer, i), &b.domain);
                wait(&b.tx, blocking);
            }
        });
        let warm = iters / 10;
        let mut t0 = Instant::now();
        for i in 0..iters as u64 {
            if i as usize == warm {
                t0 = Instant::now();
            }
            a.ep.recv_buf(&abuf, 0..size, i).unwrap();
            post(|| a.ep.send_buf(&abuf, 0..size, a.peer, i), &a.domain);
            wait(&a.tx, blocking);
            wait(&a.rx, blocking);
        }
        t0.elapsed() / (2 * (iters - warm) as u32)
    })
}

/// Stream `count` messages of `size` with a window; returns bytes/s.
fn bandwidth(a: &Side, b: &Side, size: usize, count: usize, window: usize, zero_copy: bool) -> f64 {
    let bufs: Vec<SharedBuf> = (0..window)
        .map(|_| b.domain.alloc_buffer(size).unwrap())
        .collect();
    let src_shared = a.domain.alloc_buffer(size).unwrap();
    let src_vec = vec![7u8; size];
    let mut raw_rx: Vec<Vec<u8>> = (0..window).map(|_| vec![0u8; size]).collect();
    std::thread::scope(|s| {
        let bufs = &bufs;
        let raw_rx = &mut raw_rx;
        s.spawn(move || {
            let mut v = Vec::with_capacity(window);
            for i in 0..window.min(count) {
                if zero_copy {
                    b.ep.recv_buf(&bufs[i], 0..size, i as u64).unwrap();
                } else {
                    // SAFETY: raw_rx buffers outlive the receives (scope joins below).
                    unsafe {
                        b.ep.recv_raw(raw_rx[i].as_mut_ptr(), size, i as u64)
                            .unwrap()
                    };
                }
            }
            let mut got = 0;
            let mut posted = window.min(count);
            while got < count {
                v.clear();
                match b.rx.read(&mut v, window) {
                    Ok(_) => {}
                    Err(Error::Again) => {
                        std::thread::yield_now();
                        continue;
                    }
                    Err(e) => panic!("{e}: {:?}", b.rx.readerr()),
                }
                for e in &v {
                    got += 1;
                    if posted < count {
                        let slot = e.context as usize;
                        if zero_copy {
                            b.ep.recv_buf(&bufs[slot], 0..size, slot as u64).unwrap();
                        } else {
                            // SAFETY: as above.
                            unsafe {
                                b.ep.recv_raw(raw_rx[slot].as_mut_ptr(), size, slot as u64)
                                    .unwrap()
                            };
                        }
                        posted += 1;
                    }
                }
            }
        });
        let t0 = Instant::now();
        let mut sent = 0;
        let mut done = 0;
        let mut v = Vec::with_capacity(window);
        while done < count {
            while sent < count && sent - done < window {
                let r = if zero_copy {
                    a.ep.send_buf(&src_shared, 0..size, a.peer, sent as u64)
                } else {
                    a.ep.send(&src_vec, a.peer, sent as u64)
                };
                match r {
                    Ok(()) => sent += 1,
                    Err(Error::Again) => break,
                    Err(e) => panic!("{e}"),
                }
            }
            v.clear();
            match a.tx.read(&mut v, window) {
                Ok(n) => done += n,
                Err(Error::Again) => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        (count * size) as f64 / t0.elapsed().as_secs_f64()
    })
}

fn main() {
    let iters: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().unwrap();
    let paths = vfabric_device::Config::socket_dir_paths(dir.path(), 2);
    let mut config = vfabric_device::Config::new(paths.clone());
    if let Some(us) = std::env::var("DEVICE_POLL_US")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.poll_us = us;
    }
    // Placement for 2-vCPU machines: the device's poller alone on the last CPU, both guests
    // (this thread and the receiver threads it spawns inherit the mask) on CPU 0.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus >= 2 && std::env::var_os("NO_PIN").is_none() {
        config.poller_cpu = Some(cpus - 1);
    }
    let daemon = vfabric_device::start(config).unwrap();
    if cpus >= 2 && std::env::var_os("NO_PIN").is_none() {
        vfabric_device::pin_current_thread(0);
    }

    let mode = std::env::args().nth(2).unwrap_or_else(|| "all".into());
    if mode == "all" || mode == "polled" {
        let (a, b) = pair(&paths, WaitMode::None);
        for size in [8usize, 4096, 65536, 1 << 20] {
            let n = if size >= 65536 { iters / 20 } else { iters };
            let before = a.domain.stats();
            let lat = pingpong(&a, &b, size, n.max(50), false);
            let after = a.domain.stats();
            println!(
                "polled   pingpong {size:>8} B: {:>8.2} us one-way  (A: {} posted, {} kicks)",
                lat.as_secs_f64() * 1e6,
                after.posted - before.posted,
                after.kicks - before.kicks
            );
        }
        for (size, zc) in [
            (65536usize, true),
            (1 << 20, true),
            (65536, false),
            (1 << 20, false),
        ] {
            let count = ((2usize << 30) / size).clamp(64, 20_000);
            let bw = bandwidth(&a, &b, size, count, 64, zc);
            println!(
                "bandwidth {size:>8} B {}: {:>7.2} GB/s",
                if zc {
                    "shared buffers"
                } else {
                    "bounced       "
                },
                bw / 1e9
            );
        }
    }
    if mode == "rate" || mode == "all" || mode == "polled" {
        let (a, b) = pair(&paths, WaitMode::None);
        for size in [8usize, 64] {
            let count = iters * 10;
            let t = Instant::now();
            let bw = bandwidth(&a, &b, size, count, 64, false);
            println!(
                "message rate {size:>5} B (inline, window 64): {:>6.3} M msg/s ({:.2?} for {count})",
                bw / size as f64 / 1e6,
                t.elapsed()
            );
        }
    }
    if mode == "all" || mode == "blocking" {
        let (a, b) = pair(&paths, WaitMode::Blocking);
        for size in [8usize, 4096] {
            let before = a.domain.stats();
            let lat = pingpong(&a, &b, size, (iters / 10).max(50), true);
            let after = a.domain.stats();
            println!(
                "blocking pingpong {size:>7} B: {:>8.2} us one-way  (A: {} posted, {} kicks, {} sleeps, {} calls)",
                lat.as_secs_f64() * 1e6,
                after.posted - before.posted,
                after.kicks - before.kicks,
                after.sleeps - before.sleeps,
                after.calls - before.calls
            );
        }
    }
    daemon.shutdown();
}
