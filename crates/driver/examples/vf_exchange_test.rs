// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Two processes on any two devices of one fabric (two VMs over virtio-pci, a VM and a host
//! process over vhost-user, or two host processes) exchange messages, tagged messages and RMA
//! reads and writes, verifying every byte. Used by the VM test (scripts/vm/guest-checks.sh).
//!
//! ```text
//! vf_exchange_test server DEVICE ADDR_FILE   # writes "ADDRESS KEY REGION_ADDR" to ADDR_FILE
//! vf_exchange_test client DEVICE ADDR_FILE   # reads it, then runs the exchange
//! ```
//! DEVICE is a socket path or `pci:DDDD:BB:DD.F`. Exit status 0 only if every check passed;
//! every wait is bounded ([`TIMEOUT`]).

use std::time::{Duration, Instant};

use vfabric::{
    fi, BindFlags, CompletionQueue, CqAttr, CqEntry, Domain, DomainAttr, EpAttr, FiAddr, WaitMode,
};

const TIMEOUT: Duration = Duration::from_secs(90);
const REGION_LEN: usize = 1 << 20;
const WRITE_LEN: usize = 256 << 10;
const MSG_LEN: usize = 100_000;
const TAGGED_LEN: usize = 5000;
const SMALL_TAGGED_LEN: usize = 100;
const TAG: u64 = 0x77;
const TAG_SMALL: u64 = 0x78;

/// Byte `i` of the pattern `seed`.
fn pattern(seed: u8, i: usize) -> u8 {
    (i as u32)
        .wrapping_mul(2_654_435_761)
        .rotate_left(seed as u32 * 3) as u8
        ^ seed
}

fn fill(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| pattern(seed, i)).collect()
}

fn check(what: &str, seed: u8, got: &[u8], len: usize) -> Result<(), String> {
    if got.len() != len {
        return Err(format!("{what}: {} bytes, expected {len}", got.len()));
    }
    match (0..len).find(|&i| got[i] != pattern(seed, i)) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: byte {i} is {:#x}, expected {:#x}",
            got[i],
            pattern(seed, i)
        )),
    }
}

/// Wait for `n` completions on `cq` (an error completion fails).
fn wait(cq: &CompletionQueue, n: usize, what: &str) -> Result<Vec<CqEntry>, String> {
    let deadline = Instant::now() + TIMEOUT;
    let mut out = Vec::new();
    while out.len() < n {
        let want = n - out.len();
        match cq.read(&mut out, want) {
            Ok(_) | Err(vfabric::Error::Again) => {}
            Err(vfabric::Error::Avail) => {
                return Err(format!("{what}: error completion {:?}", cq.readerr()));
            }
            Err(e) => return Err(format!("{what}: {e}")),
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{what}: {} of {n} completions in {TIMEOUT:?}",
                out.len()
            ));
        }
        std::thread::yield_now();
    }
    Ok(out)
}

struct Side {
    domain: Domain,
    ep: vfabric::Endpoint,
    cq: CompletionQueue,
    av: vfabric::AddressVector,
}

fn open(device: &str) -> Result<Side, String> {
    let attr = DomainAttr {
        mem_bytes: 16 << 20,
        ..DomainAttr::default()
    };
    let domain = Domain::open(device, attr).map_err(|e| format!("open {device}: {e}"))?;
    let cq = domain
        .cq_open(CqAttr {
            size: 64,
            wait: WaitMode::None,
        })
        .map_err(|e| e.to_string())?;
    let av = domain.av_open().map_err(|e| e.to_string())?;
    let ep = domain
        .endpoint(EpAttr::default())
        .map_err(|e| e.to_string())?;
    ep.bind_cq(&cq, BindFlags::BOTH)
        .map_err(|e| e.to_string())?;
    ep.bind_av(&av).map_err(|e| e.to_string())?;
    ep.enable().map_err(|e| e.to_string())?;
    Ok(Side { domain, ep, cq, av })
}

fn server(device: &str, addr_file: &str) -> Result<(), String> {
    let s = open(device)?;
    let e = |e: vfabric::Error| e.to_string();
    let mut region = s.domain.alloc_buffer(REGION_LEN).map_err(e)?;
    region
        .get_mut()
        .expect("fresh buffer")
        .copy_from_slice(&fill(1, REGION_LEN));
    let mr = s
        .domain
        .register(&region, fi::REMOTE_READ | fi::REMOTE_WRITE, None)
        .map_err(e)?;
    let msg_buf = s.domain.alloc_buffer(128 << 10).map_err(e)?;
    let tag_buf = s.domain.alloc_buffer(8192).map_err(e)?;
    s.ep.recv_buf(&msg_buf, 0..msg_buf.len(), 1).map_err(e)?;
    s.ep.trecv_buf(&tag_buf, 0..tag_buf.len(), TAG, 0, 2)
        .map_err(e)?;
    s.ep.trecv_vec(256, TAG_SMALL, 0, 3).map_err(e)?;
    s.ep.recv_vec(64, 4).map_err(e)?;
    let line = format!("{} {} {}", s.ep.name(), mr.key(), region.addr());
    let tmp = format!("{addr_file}.tmp");
    std::fs::write(&tmp, &line).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, addr_file).map_err(|e| e.to_string())?;
    println!("server: {line}");

    let mut got = wait(&s.cq, 4, "server receives")?;
    got.sort_by_key(|c| c.context);
    let mut verdict = Ok(());
    let mut note = |r: Result<(), String>| {
        if verdict.is_ok() {
            verdict = r;
        }
    };
    // SAFETY: the receive completed: the device no longer writes the buffer.
    note(check(
        "message",
        2,
        unsafe { &msg_buf.as_slice()[..got[0].len] },
        MSG_LEN,
    ));
    if got[1].tag != TAG {
        note(Err(format!("tagged: tag {:#x}", got[1].tag)));
    }
    // SAFETY: as above.
    note(check(
        "tagged",
        3,
        unsafe { &tag_buf.as_slice()[..got[1].len] },
        TAGGED_LEN,
    ));
    let small = got[2].buf.clone().unwrap_or_default();
    note(check("small tagged", 5, &small, SMALL_TAGGED_LEN));
    let written = got[3].buf.clone().unwrap_or_default();
    if written != b"written" {
        note(Err(format!("expected the note 'written', got {written:?}")));
    }
    // The client wrote the first WRITE_LEN bytes; the rest is as we left it.
    drop(mr);
    let bytes = region.get().expect("deregistered, nothing in flight");
    note(check(
        "RMA-written range",
        4,
        &bytes[..WRITE_LEN],
        WRITE_LEN,
    ));
    let rest: Vec<u8> = (WRITE_LEN..REGION_LEN).map(|i| pattern(1, i)).collect();
    if bytes[WRITE_LEN..] != rest[..] {
        note(Err("RMA write touched bytes past its range".into()));
    }
    let client = got[3]
        .src
        .ok_or("the note came without its source address")?;
    let peer = s.av.insert(client).map_err(e)?;
    let answer = match &verdict {
        Ok(()) => "ok".to_string(),
        Err(why) => format!("bad: {why}"),
    };
    s.ep.send(answer.as_bytes(), peer, 5).map_err(e)?;
    wait(&s.cq, 1, "server verdict send")?;
    verdict
}

fn client(device: &str, addr_file: &str) -> Result<(), String> {
    let deadline = Instant::now() + TIMEOUT;
    let line = loop {
        match std::fs::read_to_string(addr_file) {
            Ok(l) if !l.trim().is_empty() => break l,
            _ if Instant::now() > deadline => return Err(format!("no address in {addr_file}")),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let f: Vec<&str> = line.split_whitespace().collect();
    let [addr, key, raddr] = f[..] else {
        return Err(format!("bad address line {line:?}"));
    };
    let key: u64 = key.parse().map_err(|_| format!("bad key {key:?}"))?;
    let raddr: u64 = raddr
        .parse()
        .map_err(|_| format!("bad address {raddr:?}"))?;
    let s = open(device)?;
    let e = |e: vfabric::Error| e.to_string();
    let peer: FiAddr = s.av.insert_str(addr).map_err(e)?;
    s.ep.recv_vec(256, 9).map_err(e)?;

    // A message from process memory (bounce buffer), a tagged message from a shared buffer
    // (in place) and a small tagged one (inline in the request).
    s.ep.send(&fill(2, MSG_LEN), peer, 1).map_err(e)?;
    let mut tbuf = s.domain.alloc_buffer(TAGGED_LEN).map_err(e)?;
    tbuf.get_mut()
        .expect("fresh")
        .copy_from_slice(&fill(3, TAGGED_LEN));
    s.ep.tsend_buf(&tbuf, 0..TAGGED_LEN, peer, TAG, 2)
        .map_err(e)?;
    s.ep.tsend(&fill(5, SMALL_TAGGED_LEN), peer, TAG_SMALL, 3)
        .map_err(e)?;
    wait(&s.cq, 3, "client sends")?;

    // RMA read of the whole region, then RMA write of its first part.
    let mut rbuf = s.domain.alloc_buffer(REGION_LEN).map_err(e)?;
    s.ep.read_buf(&rbuf, 0..REGION_LEN, peer, raddr, key, 4)
        .map_err(e)?;
    wait(&s.cq, 1, "RMA read")?;
    check("RMA read", 1, rbuf.get().expect("read done"), REGION_LEN)?;
    let mut wbuf = s.domain.alloc_buffer(WRITE_LEN).map_err(e)?;
    wbuf.get_mut()
        .expect("fresh")
        .copy_from_slice(&fill(4, WRITE_LEN));
    s.ep.write_buf(&wbuf, 0..WRITE_LEN, peer, raddr, key, 5)
        .map_err(e)?;
    wait(&s.cq, 1, "RMA write")?;
    s.ep.send(b"written", peer, 6).map_err(e)?;
    let mut got = wait(&s.cq, 2, "note and verdict")?;
    got.retain(|c| c.context == 9);
    let verdict = got
        .first()
        .and_then(|c| c.buf.clone())
        .ok_or("no verdict from the server")?;
    match verdict.as_slice() {
        b"ok" => Ok(()),
        v => Err(format!("server: {}", String::from_utf8_lossy(v))),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let r = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [_, "server", device, file] => server(device, file),
        [_, "client", device, file] => client(device, file),
        _ => {
            eprintln!("usage: vf_exchange_test server|client DEVICE ADDR_FILE");
            std::process::exit(2);
        }
    };
    match r {
        Ok(()) => println!(
            "{}: messages, tagged messages, RMA read and write verified",
            args[1]
        ),
        Err(why) => {
            eprintln!("{}: FAILED: {why}", args[1]);
            std::process::exit(1);
        }
    }
}
