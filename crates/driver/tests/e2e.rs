// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End to end: an embedded `vfabricd` (vfabric_device::start) and driver domains in this
//! process, talking over real vhost-user sockets and shared memfds. Every wait has a timeout.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfabric::{
    fi, getinfo, AddressVector, BindFlags, CompletionQueue, CqAttr, Domain, DomainAttr, Endpoint,
    EpAttr, EpType, Error, Fabric, FiAddr, Hints, Iov, Msg, Status, TaggedMsg, WaitMode,
    FI_ADDR_UNSPEC,
};

mod common;
use common::*;

/// A domain with one endpoint, separate TX and RX CQs and an AV.
struct Node {
    ep: Endpoint,
    tx: CompletionQueue,
    rx: CompletionQueue,
    av: AddressVector,
    domain: Domain,
}

fn small_attr() -> DomainAttr {
    DomainAttr {
        mem_bytes: 48 << 20,
        ..Default::default()
    }
}

fn node_with(path: &PathBuf, wait: WaitMode, ep_type: EpType, attr: DomainAttr) -> Node {
    let domain = Domain::open(path, attr).expect("open domain");
    let tx = domain.cq_open(CqAttr { size: 256, wait }).unwrap();
    let rx = domain.cq_open(CqAttr { size: 256, wait }).unwrap();
    let av = domain.av_open().unwrap();
    let ep = domain.endpoint(EpAttr { ep_type }).unwrap();
    ep.bind_cq(&tx, BindFlags::TRANSMIT).unwrap();
    ep.bind_cq(&rx, BindFlags::RECV).unwrap();
    ep.bind_av(&av).unwrap();
    ep.enable().unwrap();
    Node {
        ep,
        tx,
        rx,
        av,
        domain,
    }
}

fn node(path: &PathBuf) -> Node {
    node_with(path, WaitMode::None, EpType::Rdm, small_attr())
}

/// Retry a post while the ring is full, driving progress on `cq`.
fn post_retry(mut f: impl FnMut() -> vfabric::Result<()>, progress: &Domain) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match f() {
            Ok(()) => return,
            Err(Error::Again) => {
                progress.progress().unwrap();
                assert!(Instant::now() < deadline, "ring stayed full");
                std::thread::yield_now();
            }
            Err(e) => panic!("post: {e}"),
        }
    }
}

/// Two nodes on two devices, each knowing the other as fi_addr 0.
fn pair(r: &Rig) -> (Node, Node, FiAddr, FiAddr) {
    let a = node(&r.paths[0]);
    let b = node(&r.paths[1]);
    let b_at_a = a.av.insert(b.ep.name()).unwrap();
    let a_at_b = b.av.insert(a.ep.name()).unwrap();
    (a, b, b_at_a, a_at_b)
}

/// Two daemons that are separate fabrics hand out addresses that differ only in the fabric
/// id; an address of the other fabric is refused with a clear error instead of naming the
/// local endpoint that has the same host, device and endpoint numbers.
#[test]
fn addresses_of_another_fabric_are_refused() {
    let (r1, r2) = (rig(1), rig(1));
    let (a, b) = (node(&r1.paths[0]), node(&r2.paths[0]));
    let (na, nb) = (a.ep.name(), b.ep.name());
    assert_eq!(
        (na.host(), na.device(), na.ep, na.generation),
        (nb.host(), nb.device(), nb.ep, nb.generation)
    );
    assert_ne!(
        na.fabric(),
        nb.fabric(),
        "two daemons drew the same fabric id"
    );
    let info = b.domain.info();
    assert_eq!(info.fabric_id, nb.fabric());
    let refused = |r: vfabric::Result<FiAddr>, how: &str| match r {
        Err(e @ Error::ForeignFabric { .. }) => {
            assert_eq!(e.errno(), fi::EADDRNOTAVAIL);
            let text = e.to_string();
            assert!(
                text.contains(&format!("{:x}", na.fabric())),
                "{how}: {text}"
            );
        }
        other => panic!("{how}: A's address accepted on B's fabric: {other:?}"),
    };
    refused(b.av.insert(na), "insert");
    refused(b.av.insert_bytes(&na.to_bytes()), "insert_bytes");
    refused(b.av.insert_str(&na.to_string()), "insert_str");
    assert_eq!(b.av.count(), 0);
    // The own fabric's addresses still go in, and B reaches itself.
    let me = b.av.insert(nb).unwrap();
    b.ep.send(b"own", me, 1).unwrap();
}

#[test]
fn getinfo_probes_and_leaves_devices_free() {
    let r = rig(2);
    let hints = Hints {
        devices: Some(r.paths.iter().map(Into::into).collect()),
        ..Default::default()
    };
    let infos = getinfo(&hints).expect("getinfo");
    assert_eq!(infos.len(), 4, "two devices x (RDM, DGRAM)");
    let i0 = &infos[0];
    assert_eq!(i0.fabric_name, "vfabric");
    assert_eq!(i0.domain_name, "vfabric0");
    assert_eq!(infos[2].domain_name, "vfabric1");
    assert_eq!(i0.ep_type, EpType::Rdm);
    assert_eq!(infos[1].ep_type, EpType::Dgram);
    assert_ne!(i0.node_addr, infos[2].node_addr);
    assert!(i0.caps & fi::MSG != 0);
    assert!(i0.caps & fi::TAGGED != 0, "{:#x}", i0.caps);
    assert_eq!(i0.limits.max_msg_size, 16 << 20);
    assert!(i0.limits.inject_size > 0);
    assert!(!i0.cap_entries.is_empty());
    assert!(i0.feature_names.contains(&"MSG"));
    println!("{i0:#?}");

    // Filters.
    let tagged_dgram = getinfo(&Hints {
        devices: Some(r.paths.iter().map(Into::into).collect()),
        caps: fi::TAGGED,
        ep_type: Some(EpType::Dgram),
        domain_name: Some("vfabric1".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(tagged_dgram.len(), 1);
    assert_eq!(tagged_dgram[0].domain_name, "vfabric1");
    assert!(matches!(
        getinfo(&Hints {
            devices: Some(r.paths.iter().map(Into::into).collect()),
            min_max_msg_size: Some(1 << 40),
            ..Default::default()
        }),
        Err(Error::NoData)
    ));
    // Persistent memory is offered (spec §6.17).
    let pmem = getinfo(&Hints {
        devices: Some(r.paths.iter().map(Into::into).collect()),
        caps: fi::RMA_PMEM,
        ..Default::default()
    })
    .unwrap();
    assert!(!pmem.is_empty() && pmem.iter().all(|i| i.caps & fi::RMA_PMEM != 0));

    // Probing again and opening domains works: the probe disconnected cleanly.
    for _ in 0..3 {
        getinfo(&hints).unwrap();
    }
    let fabric = Fabric::open(i0).unwrap();
    let d = fabric.domain(i0).unwrap();
    assert_eq!(d.info().domain_name, "vfabric0");
    assert!(d.num_queue_pairs() >= 1);
}

#[test]
fn getinfo_reports_unreachable_device() {
    let dir = tempfile::tempdir().unwrap();
    let r = getinfo(&Hints {
        devices: Some(vec![dir.path().join("nothing.sock").into()]),
        ..Default::default()
    });
    assert!(matches!(r, Err(Error::Transport(_))), "{r:?}");
}

#[test]
fn send_recv_integrity_random_sizes() {
    let r = rig(2);
    let (a, b, to_b, to_a) = pair(&r);
    let mut rng = Xorshift(0x1234_5678_9abc_def1);
    let mut sizes: Vec<usize> = vec![
        0,
        1,
        7,
        191,
        192,
        193,
        224,
        225,
        256,
        4096,
        16 << 10,
        (16 << 10) + 1,
        1 << 20,
        4 << 20,
    ];
    for _ in 0..40 {
        let max = if rng.next() & 3 == 0 {
            4 << 20
        } else {
            64 << 10
        };
        sizes.push((rng.next() % max) as usize);
    }
    let mut shared_rx = b.domain.alloc_buffer(4 << 20).unwrap();
    let mut shared_tx = a.domain.alloc_buffer(4 << 20).unwrap();
    for (i, &size) in sizes.iter().enumerate() {
        let mut payload = vec![0u8; size];
        rng.fill(&mut payload);
        let sum = checksum(&payload);
        let ctx = 1000 + i as u64;
        let rx_mode = i % 3;
        let tx_mode = (i / 3) % 2;
        let mut raw_target = vec![0u8; size];
        // Receive first half the time, send first the other half (unexpected path).
        let recv_first = i % 2 == 0;
        let post_recv = |raw: &mut Vec<u8>| match rx_mode {
            0 => b.ep.recv_vec(size, ctx).unwrap(),
            // SAFETY: `raw` outlives the receive: we wait for its completion below.
            1 => unsafe { b.ep.recv_raw(raw.as_mut_ptr(), raw.len(), ctx).unwrap() },
            _ => b.ep.recv_buf(&shared_rx, 0..size, ctx).unwrap(),
        };
        if recv_first {
            post_recv(&mut raw_target);
        }
        if tx_mode == 0 {
            a.ep.send(&payload, to_b, ctx).unwrap();
        } else {
            // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
            (unsafe { shared_tx.as_mut_slice() })[..size].copy_from_slice(&payload);
            a.ep.send_buf(&shared_tx, 0..size, to_b, ctx).unwrap();
        }
        if !recv_first {
            // Give the send a head start so it is unexpected at the device.
            std::thread::sleep(Duration::from_millis(1));
            post_recv(&mut raw_target);
        }
        let got = next_ok(&b.rx);
        assert_eq!(got.context, ctx);
        assert_eq!(got.len, size, "size {size}");
        assert!(got.flags & fi::RECV != 0 && got.flags & fi::MSG != 0);
        assert_eq!(got.src, Some(a.ep.name()));
        assert_eq!(got.src_addr, to_a);
        let received: Vec<u8> = match rx_mode {
            0 => got.buf.clone().expect("recv_vec returns the bytes"),
            1 => raw_target.clone(),
            // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
            _ => (unsafe { shared_rx.as_slice() })[..size].to_vec(),
        };
        assert_eq!(
            checksum(&received),
            sum,
            "payload of {size} bytes (case {i})"
        );
        let sent = next_ok(&a.tx);
        assert_eq!(sent.context, ctx);
        assert!(sent.flags & fi::SEND != 0);
    }
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    (unsafe { shared_rx.as_mut_slice() })[0] = 0;
    // Nothing leaked: only rings and slots (plus cached bounce buffers) remain in use.
    assert_eq!(a.domain.requests_in_flight(), 0);
    assert_eq!(b.domain.requests_in_flight(), 0);
}

#[test]
fn inject_and_senddata() {
    let r = rig(2);
    let (a, b, to_b, _) = pair(&r);
    let inject = a.domain.info().limits.inject_size as usize;
    b.ep.recv_vec(64, 1).unwrap();
    a.ep.inject(b"injected", to_b).unwrap();
    let e = next_ok(&b.rx);
    assert_eq!(e.buf.as_deref(), Some(&b"injected"[..]));
    assert_quiet(&a.tx, Duration::from_millis(50));
    assert!(matches!(
        a.ep.inject(&vec![0u8; inject + 1], to_b),
        Err(Error::InvalidArgument(_))
    ));

    b.ep.recv_vec(64, 2).unwrap();
    a.ep.senddata(b"with data", 0xdead_beef, to_b, 3).unwrap();
    let e = next_ok(&b.rx);
    assert!(e.flags & fi::REMOTE_CQ_DATA != 0, "{e:?}");
    assert_eq!(e.data, 0xdead_beef);
    assert_eq!(next_ok(&a.tx).context, 3);

    // sendmsg with an iov mixing shared and private memory, and DELIVERY_COMPLETE.
    let mut sb = a.domain.alloc_buffer(300).unwrap();
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    unsafe { sb.as_mut_slice() }.fill(b's');
    let private = vec![b'p'; 5000];
    let iov = [Iov::shared(&sb, 0..300), Iov::bytes(&private)];
    b.ep.recv_vec(6000, 4).unwrap();
    a.ep.sendmsg(
        &Msg {
            iov: &iov,
            addr: to_b,
            context: 5,
            data: 77,
        },
        fi::DELIVERY_COMPLETE | fi::REMOTE_CQ_DATA,
    )
    .unwrap();
    let e = next_ok(&b.rx);
    let buf = e.buf.unwrap();
    assert_eq!(buf.len(), 5300);
    assert!(buf[..300].iter().all(|c| *c == b's') && buf[300..].iter().all(|c| *c == b'p'));
    assert_eq!(e.data, 77);
    assert_eq!(next_ok(&a.tx).context, 5);

    // FI_INJECT on sendmsg (fi_msg(3)): buffer free on return, completion as for any send;
    // only fi_inject itself completes silently.
    b.ep.recv_vec(64, 6).unwrap();
    let iov = [Iov::bytes(b"inject-msg")];
    a.ep.sendmsg(
        &Msg {
            iov: &iov,
            addr: to_b,
            context: 7,
            data: 0,
        },
        fi::INJECT,
    )
    .unwrap();
    assert_eq!(next_ok(&b.rx).buf.as_deref(), Some(&b"inject-msg"[..]));
    assert_eq!(next_ok(&a.tx).context, 7);
    b.ep.recv_vec(64, 8).unwrap();
    a.ep.inject(b"quiet", to_b).unwrap();
    assert_eq!(next_ok(&b.rx).buf.as_deref(), Some(&b"quiet"[..]));
    assert_quiet(&a.tx, Duration::from_millis(50));
}

#[test]
fn tagged_matching() {
    let r = rig(2);
    let (a, b, to_b, _) = pair(&r);

    // Exact tag: the receive for tag 2 skips the message with tag 1.
    b.ep.trecv_vec(64, 2, 0, 20).unwrap();
    b.ep.trecv_vec(64, 1, 0, 10).unwrap();
    a.ep.tsend(b"one", to_b, 1, 1).unwrap();
    a.ep.tsend(b"two", to_b, 2, 2).unwrap();
    let mut got = [next_ok(&b.rx), next_ok(&b.rx)];
    got.sort_by_key(|e| e.context);
    assert_eq!(
        (got[0].context, got[0].tag, got[0].buf.as_deref()),
        (10, 1, Some(&b"one"[..]))
    );
    assert_eq!(
        (got[1].context, got[1].tag, got[1].buf.as_deref()),
        (20, 2, Some(&b"two"[..]))
    );
    assert!(got[0].flags & fi::TAGGED != 0);
    next_ok(&a.tx);
    next_ok(&a.tx);

    // Ignore bits: tag 0xab00 with ignore 0xff matches 0xab42, not 0xac42.
    a.ep.tsend(b"miss", to_b, 0xac42, 3).unwrap();
    a.ep.tsend(b"hit", to_b, 0xab42, 4).unwrap();
    next_ok(&a.tx);
    next_ok(&a.tx);
    b.ep.trecv_vec(64, 0xab00, 0xff, 30).unwrap();
    let e = next_ok(&b.rx);
    assert_eq!((e.tag, e.buf.as_deref()), (0xab42, Some(&b"hit"[..])));
    // Untagged receive does not match a tagged message.
    b.ep.recv_vec(64, 31).unwrap();
    assert_quiet(&b.rx, Duration::from_millis(50));
    b.ep.cancel(31).unwrap();
    assert_eq!(next_err(&b.rx).err, fi::ECANCELED);
    // Collect the 0xac42 message.
    b.ep.trecv_vec(64, 0xac42, 0, 32).unwrap();
    assert_eq!(next_ok(&b.rx).buf.as_deref(), Some(&b"miss"[..]));

    // PEEK without a message: ENOMSG.
    let peek = |ctx: u64, tag: u64, flags: u64| {
        b.ep.trecvmsg(
            &TaggedMsg {
                iov: &[],
                addr: FI_ADDR_UNSPEC,
                tag,
                ignore: 0,
                context: ctx,
                data: 0,
            },
            flags,
        )
        .unwrap()
    };
    peek(40, 0x77, fi::PEEK);
    let e = next_err(&b.rx);
    assert_eq!(
        (e.status, e.err, e.context),
        (Status::NoMessage, fi::ENOMSG, 40)
    );

    // PEEK finds the message (length, tag, data) without consuming it.
    a.ep.tsenddata(b"peekaboo", 9, to_b, 0x77, 5).unwrap();
    next_ok(&a.tx);
    peek(41, 0x77, fi::PEEK);
    let e = next_ok(&b.rx);
    assert_eq!((e.context, e.len, e.tag, e.data), (41, 8, 0x77, 9));
    assert!(e.buf.is_none() || e.buf.as_deref() == Some(&[][..]));

    // PEEK|CLAIM reserves it; a normal receive no longer matches; CLAIM receives it.
    peek(42, 0x77, fi::PEEK | fi::CLAIM);
    let e = next_ok(&b.rx);
    assert_eq!((e.context, e.len), (42, 8));
    b.ep.trecv_vec(64, 0x77, 0, 43).unwrap();
    assert_quiet(&b.rx, Duration::from_millis(50));
    b.ep.cancel(43).unwrap();
    assert_eq!(next_err(&b.rx).context, 43);
    b.ep.trecvmsg_vec(64, FI_ADDR_UNSPEC, 0x77, 0, 42, fi::CLAIM)
        .unwrap();
    let e = next_ok(&b.rx);
    assert_eq!((e.context, e.buf.as_deref()), (42, Some(&b"peekaboo"[..])));

    // PEEK|CLAIM then CLAIM|DISCARD drops it.
    a.ep.tsend(b"drop me", to_b, 0x88, 6).unwrap();
    next_ok(&a.tx);
    peek(50, 0x88, fi::PEEK | fi::CLAIM);
    assert_eq!(next_ok(&b.rx).len, 7);
    peek(50, 0x88, fi::CLAIM | fi::DISCARD);
    let e = next_ok(&b.rx);
    assert_eq!((e.context, e.len), (50, 0));
    peek(51, 0x88, fi::PEEK);
    assert_eq!(next_err(&b.rx).err, fi::ENOMSG);

    // PEEK|DISCARD (fi_tagged(3)) reports the match as PEEK does and drops the message.
    a.ep.tsenddata(b"gone soon", 3, to_b, 0x99, 7).unwrap();
    next_ok(&a.tx);
    peek(52, 0x99, fi::PEEK | fi::DISCARD);
    let e = next_ok(&b.rx);
    assert_eq!((e.context, e.len, e.tag, e.data), (52, 9, 0x99, 3));
    peek(53, 0x99, fi::PEEK);
    assert_eq!(next_err(&b.rx).err, fi::ENOMSG);

    // CLAIM with an unknown context is refused locally.
    assert!(matches!(
        b.ep.trecvmsg_vec(8, FI_ADDR_UNSPEC, 0x88, 0, 999, fi::CLAIM),
        Err(Error::InvalidArgument(_))
    ));
}

/// A reader's own completions may skip the CQ's queue, but never overtake entries another
/// call's progress queued first: receives drained while reading the transmit CQ are read before
/// receives that complete later, whatever the reader's buffer size.
#[test]
fn entries_queued_by_other_progress_come_first() {
    let r = rig(2);
    let (a, b, to_b, _) = pair(&r);
    let rbuf = b.domain.alloc_buffer(4 * 64).unwrap();
    for i in 0..4usize {
        b.ep.recv_buf(&rbuf, i * 64..(i + 1) * 64, i as u64)
            .unwrap();
    }
    let send = |i: u8| {
        post_retry(|| a.ep.send(&[i; 16], to_b, u64::from(i)), &a.domain);
        next_ok(&a.tx);
    };
    send(0);
    send(1);
    // Progress from b's transmit CQ drains the two receives into b's receive CQ.
    let deadline = Instant::now() + TIMEOUT;
    while b.rx.queued() < 2 {
        assert!(matches!(b.tx.read_one(), Err(Error::Again)));
        assert!(Instant::now() < deadline, "receives not delivered");
        std::thread::yield_now();
    }
    send(2);
    send(3);
    // Let the device complete the last two receives before b reads: the first read then
    // drains them with entries 0 and 1 still queued.
    std::thread::sleep(Duration::from_millis(50));
    let mut one = [vfabric::CqEntry::default()];
    for want in 0..4u64 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match b.rx.read_into(&mut one) {
                Ok(1) => break,
                Ok(n) => panic!("read_into returned {n} entries for a slice of one"),
                Err(Error::Again) => assert!(Instant::now() < deadline, "receive {want} missing"),
                Err(e) => panic!("read_into: {e}"),
            }
        }
        assert_eq!(one[0].context, want, "receives complete in posting order");
        assert_eq!(one[0].len, 16);
    }
    assert!(matches!(b.rx.read_one(), Err(Error::Again)));
}

#[test]
fn ordering_per_pair() {
    let r = rig(2);
    let (a, b, to_b, _) = pair(&r);
    let n = 300u32;
    let mut rng = Xorshift(77);
    let sizes: Vec<usize> = (0..n)
        .map(|i| match i % 5 {
            0 => 4,
            1 => 100,
            2 => 1000,
            3 => (rng.next() % 40_000) as usize + 4,
            _ => 20_000,
        })
        .collect();
    // Sender runs ahead of the receiver: mixes eager, unexpected and held sends.
    let sender = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let mut done = 0;
            let mut v = Vec::new();
            for (i, &size) in sizes.iter().enumerate() {
                let mut m = vec![0u8; size];
                m[..4].copy_from_slice(&(i as u32).to_le_bytes());
                post_retry(|| a.ep.send(&m, to_b, i as u64), &a.domain);
                // Reap send completions as we go.
                if let Ok(k) = a.tx.read(&mut v, 64) {
                    done += k;
                }
            }
            let deadline = Instant::now() + TIMEOUT;
            while done < n as usize {
                match a.tx.read(&mut v, 64) {
                    Ok(k) => done += k,
                    Err(Error::Again) => std::thread::yield_now(),
                    Err(e) => panic!("{e}"),
                }
                assert!(Instant::now() < deadline);
            }
        });
        let mut expected = 0u32;
        let window = 16;
        let mut posted = 0u32;
        while expected < n {
            while posted < n && posted - expected < window {
                post_retry(|| b.ep.recv_vec(64 << 10, posted as u64), &b.domain);
                posted += 1;
            }
            let e = next_ok(&b.rx);
            let buf = e.buf.unwrap();
            let seq = u32::from_le_bytes(buf[..4].try_into().unwrap());
            assert_eq!(seq, expected, "messages of one pair arrive in order");
            assert_eq!(
                e.context, expected as u64,
                "receives complete in posting order"
            );
            assert_eq!(buf.len(), sizes[seq as usize]);
            expected += 1;
        }
        h.join()
    });
    sender.unwrap();
}

/// The device's vendor attributes and counters (`Domain::vendor_attrs`, `device_counters`):
/// read afresh, they move with traffic on this device and not on another.
#[test]
fn device_counters_follow_traffic() {
    let r = rig(3);
    let (a, b, to_b, _) = pair(&r);
    let idle = node(&r.paths[2]);
    let attrs = a.domain.vendor_attrs().unwrap();
    assert!(attrs.iter().any(|e| e.name == "implementation"));
    let (a0, b0, idle0) = (
        a.domain.device_counters().unwrap(),
        b.domain.device_counters().unwrap(),
        idle.domain.device_counters().unwrap(),
    );
    for i in 0..4u64 {
        b.ep.recv_vec(64, i).unwrap();
        a.ep.send(&[7u8; 40], to_b, i).unwrap();
        next_ok(&b.rx);
        next_ok(&a.tx);
    }
    let (a1, b1) = (
        a.domain.device_counters().unwrap(),
        b.domain.device_counters().unwrap(),
    );
    assert_eq!(a1.messages_sent, a0.messages_sent + 4);
    assert_eq!(b1.messages_received, b0.messages_received + 4);
    assert!(b1.bytes_copied >= b0.bytes_copied + 160 || a1.bytes_copied >= a0.bytes_copied + 160);
    assert_eq!(idle.domain.device_counters().unwrap(), idle0);
}

#[test]
fn truncation() {
    let r = rig(2);
    let (a, b, to_b, _) = pair(&r);
    for (msg, cap) in [(1000usize, 100usize), (100_000, 30_000), (300, 0)] {
        let payload: Vec<u8> = (0..msg).map(|i| i as u8).collect();
        b.ep.recv_vec(cap, 7).unwrap();
        a.ep.send(&payload, to_b, 8).unwrap();
        let e = next_err(&b.rx);
        assert_eq!(e.status, Status::Truncated);
        assert_eq!(e.err, fi::ETRUNC);
        assert_eq!((e.len, e.olen), (cap, msg - cap), "{msg} into {cap}");
        assert_eq!(e.context, 7);
        assert_eq!(e.buf.as_deref(), Some(&payload[..cap]));
        let s = next_ok(&a.tx);
        assert_eq!(s.context, 8, "the sender completes OK");
    }
    // A truncated raw receive got the bytes that fit.
    let mut small = vec![0u8; 10];
    // SAFETY: `small` outlives the receive (we wait for the completion).
    unsafe { b.ep.recv_raw(small.as_mut_ptr(), 10, 9).unwrap() };
    a.ep.send(b"0123456789abcdef", to_b, 10).unwrap();
    let e = next_err(&b.rx);
    assert_eq!((e.len, e.olen), (10, 6));
    assert_eq!(&small, b"0123456789");
    next_ok(&a.tx);
}

#[test]
fn cancel() {
    let r = rig(2);
    let (a, b, to_b, _) = pair(&r);
    b.ep.recv_vec(64, 77).unwrap();
    b.ep.recv_vec(64, 78).unwrap();
    b.ep.cancel(77).unwrap();
    let e = next_err(&b.rx);
    assert_eq!(
        (e.context, e.status, e.err),
        (77, Status::Canceled, fi::ECANCELED)
    );
    assert!(matches!(b.ep.cancel(77), Err(Error::NotFound(_))));
    assert!(matches!(b.ep.cancel(12345), Err(Error::NotFound(_))));
    // The other receive still works.
    a.ep.send(b"x", to_b, 1).unwrap();
    assert_eq!(next_ok(&b.rx).context, 78);
    next_ok(&a.tx);

    // A held (rendezvous) send can be cancelled by its sender.
    let big = vec![1u8; 1 << 20];
    a.ep.send(&big, to_b, 500).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    match a.ep.cancel(500) {
        Ok(()) => {
            let e = next_err(&a.tx);
            assert_eq!((e.context, e.status), (500, Status::Canceled));
        }
        Err(e) => panic!("cancel of a held send: {e}"),
    }
}

#[test]
fn blocking_sread() {
    let r = rig(2);
    let a = node_with(&r.paths[0], WaitMode::Blocking, EpType::Rdm, small_attr());
    let b = node_with(&r.paths[1], WaitMode::Blocking, EpType::Rdm, small_attr());
    let to_b = a.av.insert(b.ep.name()).unwrap();

    // Timeout with nothing to read.
    let mut v = Vec::new();
    let t0 = Instant::now();
    assert!(matches!(
        b.rx.sread(&mut v, 1, Some(Duration::from_millis(100))),
        Err(Error::Timeout)
    ));
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(100) && waited < Duration::from_secs(5),
        "{waited:?}"
    );

    // A completion arriving while blocked wakes the reader.
    b.ep.recv_vec(64, 1).unwrap();
    let b_rx = &b.rx;
    std::thread::scope(|s| {
        let reader = s.spawn(move || {
            let mut v = Vec::new();
            let t = Instant::now();
            let n = b_rx.sread(&mut v, 4, Some(TIMEOUT)).unwrap();
            (n, v, t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(200));
        a.ep.send(b"wake up", to_b, 2).unwrap();
        let (n, v, took) = reader.join().unwrap();
        assert_eq!(n, 1);
        assert_eq!(v[0].buf.as_deref(), Some(&b"wake up"[..]));
        assert!(took >= Duration::from_millis(150), "{took:?}");
    });
    let mut v = Vec::new();
    a.tx.sread(&mut v, 1, Some(TIMEOUT)).unwrap();

    // Many round trips in blocking mode (ping-pong between two threads).
    let rounds = 500;
    let b_ref = &b;
    let to_a = b.av.insert(a.ep.name()).unwrap();
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut v = Vec::new();
            for i in 0..rounds {
                b_ref.ep.recv_vec(64, i).unwrap();
                v.clear();
                b_ref.rx.sread(&mut v, 1, Some(TIMEOUT)).unwrap();
                b_ref.ep.send(&v[0].buf.clone().unwrap(), to_a, i).unwrap();
                v.clear();
                b_ref.tx.sread(&mut v, 1, Some(TIMEOUT)).unwrap();
            }
        });
        let mut v = Vec::new();
        let t = Instant::now();
        for i in 0..rounds {
            a.ep.recv_vec(64, i).unwrap();
            a.ep.send(&i.to_le_bytes(), to_b, i).unwrap();
            v.clear();
            a.tx.sread(&mut v, 1, Some(TIMEOUT)).unwrap();
            v.clear();
            a.rx.sread(&mut v, 1, Some(TIMEOUT)).unwrap();
            assert_eq!(v[0].buf.as_deref(), Some(&i.to_le_bytes()[..]));
        }
        let rtt = t.elapsed() / rounds as u32;
        println!("blocking ping-pong: {rtt:?} per round trip");
    });

    // sread on a polled CQ is refused.
    let polled = a.domain.cq_open(CqAttr::default()).unwrap();
    assert!(matches!(
        polled.sread(&mut v, 1, Some(Duration::from_millis(1))),
        Err(Error::Unsupported(_))
    ));
}

/// A thread sleeping on the RX CQ arms only the queue that feeds it: a send completing on the
/// TX queue meanwhile does not wake it (before, every busy queue was armed and the sleeper
/// woke, found nothing for its CQ and slept again).
#[test]
fn a_receive_sleeper_is_not_woken_by_send_completions() {
    let r = rig(2);
    let a = node_with(&r.paths[0], WaitMode::Blocking, EpType::Rdm, small_attr());
    let b = node_with(&r.paths[1], WaitMode::Blocking, EpType::Rdm, small_attr());
    let to_b = a.av.insert(b.ep.name()).unwrap();
    let to_a = b.av.insert(a.ep.name()).unwrap();
    let mut v = Vec::new();
    // A first exchange each way, so both of A's queues have been drained (parked) once.
    b.ep.recv_vec(64, 1).unwrap();
    a.ep.send(b"warm", to_b, 1).unwrap();
    a.tx.sread(&mut v, 1, Some(TIMEOUT)).unwrap();
    b.rx.sread(&mut v, 1, Some(TIMEOUT)).unwrap();
    a.ep.recv_vec(64, 2).unwrap();
    b.ep.send(b"warm", to_a, 2).unwrap();
    b.tx.sread(&mut v, 1, Some(TIMEOUT)).unwrap();
    a.rx.sread(&mut v, 1, Some(TIMEOUT)).unwrap();

    // A held send (above the eager threshold, no receive at B yet) and a receive in flight.
    let len = 256 << 10;
    let sbuf = a.domain.alloc_buffer(len).unwrap();
    let rbuf = b.domain.alloc_buffer(len).unwrap();
    a.ep.recv_vec(64, 3).unwrap();
    a.ep.send_buf(&sbuf, 0..len, to_b, 3).unwrap();
    let sleeps_before = a.domain.stats().sleeps;
    let calls_before = a.domain.stats().calls;
    let a_rx = &a.rx;
    std::thread::scope(|s| {
        let reader = s.spawn(move || {
            let mut v = Vec::new();
            a_rx.sread(&mut v, 1, Some(TIMEOUT)).unwrap();
            v
        });
        std::thread::sleep(Duration::from_millis(200));
        // The send completes at A while its reader sleeps on the RX CQ.
        b.ep.recv_buf(&rbuf, 0..len, 4).unwrap();
        b.rx.sread(&mut Vec::new(), 1, Some(TIMEOUT)).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        b.ep.send(b"reply", to_a, 5).unwrap();
        let got = reader.join().unwrap();
        assert_eq!(got[0].buf.as_deref(), Some(&b"reply"[..]));
    });
    assert_eq!(
        a.domain.stats().sleeps - sleeps_before,
        1,
        "the receive sleeper woke for the send completion"
    );
    assert!(
        a.domain.stats().calls > calls_before,
        "the call that woke it was counted"
    );
    a.tx.sread(&mut v, 1, Some(TIMEOUT)).unwrap();
    assert_eq!(v.last().unwrap().context, 3);
}

#[test]
fn directed_receive_and_addr_check() {
    let r = rig(3);
    let a = node(&r.paths[0]);
    let b = node(&r.paths[1]);
    let c = node(&r.paths[2]);
    let b_at_a = a.av.insert(b.ep.name()).unwrap();
    let b_at_c = c.av.insert(b.ep.name()).unwrap();
    let _a_at_b = b.av.insert(a.ep.name()).unwrap();
    let c_at_b = b.av.insert(c.ep.name()).unwrap();
    let mut into = [0u8; 16];
    let rx_iov;
    // SAFETY: `into` outlives the receive; we wait for its completion below.
    unsafe {
        rx_iov = [Iov::raw(into.as_mut_ptr(), into.len())];
    }
    b.ep.recvmsg(
        &Msg {
            iov: &rx_iov,
            addr: c_at_b,
            context: 1,
            data: 0,
        },
        0,
    )
    .unwrap();
    a.ep.send(b"from a", b_at_a, 1).unwrap();
    next_ok(&a.tx);
    assert_quiet(&b.rx, Duration::from_millis(50));
    c.ep.send(b"from c", b_at_c, 1).unwrap();
    let e = next_ok(&b.rx);
    assert_eq!((e.context, e.len, e.src), (1, 6, Some(c.ep.name())));
    assert_eq!(e.src_addr, c_at_b);
    assert_eq!(&into[..6], b"from c");
    next_ok(&c.tx);
    // A's message is still there for an undirected receive.
    b.ep.recv_vec(16, 2).unwrap();
    assert_eq!(next_ok(&b.rx).buf.as_deref(), Some(&b"from a"[..]));

    assert!(a.domain.addr_check(&b.ep.name()).unwrap());
    assert!(a.av.check(b_at_a).unwrap());
    let mut bogus = b.ep.name();
    bogus.ep += 1000;
    assert!(!a.domain.addr_check(&bogus).unwrap());
    // Sending to a closed endpoint fails with AddrNotAvail.
    let gone = bogus;
    let gone_at_a = a.av.insert(gone).unwrap();
    a.ep.send(b"nobody", gone_at_a, 99).unwrap();
    let e = next_err(&a.tx);
    assert_eq!((e.status, e.err), (Status::AddrNotAvail, fi::EADDRNOTAVAIL));
}

#[test]
fn dgram_endpoints() {
    let r = rig(2);
    let a = node_with(&r.paths[0], WaitMode::None, EpType::Dgram, small_attr());
    let b = node_with(&r.paths[1], WaitMode::None, EpType::Dgram, small_attr());
    let to_b = a.av.insert(b.ep.name()).unwrap();
    b.ep.recv_vec(128, 1).unwrap();
    // Unreliable: a datagram that reaches the device before B's receive is dropped, so
    // retransmit until one lands (as a datagram application would).
    let deadline = Instant::now() + TIMEOUT;
    let mut v = Vec::new();
    let got = loop {
        a.ep.send(b"datagram", to_b, 1).unwrap();
        next_ok(&a.tx);
        let until = Instant::now() + Duration::from_millis(20);
        let mut got = None;
        while got.is_none() && Instant::now() < until {
            match b.rx.read(&mut v, 1) {
                Ok(_) => got = v.pop(),
                Err(Error::Again) => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        if let Some(e) = got {
            break e;
        }
        assert!(Instant::now() < deadline, "no datagram arrived");
    };
    assert_eq!(got.buf.as_deref(), Some(&b"datagram"[..]));
}

/// The shared-buffer posts (`send_buf`, `recv_buf_from`) leave out the general path's choices,
/// not its checks: a send without a transmit CQ, a message over `max_msg_size` and a post to a
/// full ring are refused as the general path refuses them.
#[test]
fn shared_buffer_posts_refuse_what_the_general_path_refuses() {
    let r = rig(2);
    let attr = DomainAttr {
        queue_size: 16,
        ..small_attr()
    };
    let a = node_with(&r.paths[0], WaitMode::None, EpType::Rdm, attr);
    let b = node(&r.paths[1]);
    let to_b = a.av.insert(b.ep.name()).unwrap();
    let buf = a.domain.alloc_buffer(4096).unwrap();

    let max = a.domain.info().limits.max_msg_size as usize;
    let big = a.domain.alloc_buffer(max + 1).unwrap();
    assert!(matches!(
        a.ep.send_buf(&big, 0..max + 1, to_b, 1),
        Err(Error::TooLarge { len, .. }) if len == max + 1
    ));
    drop(big);

    let rx_only = a.domain.endpoint(EpAttr::default()).unwrap();
    rx_only.bind_cq(&a.rx, BindFlags::RECV).unwrap();
    rx_only.bind_av(&a.av).unwrap();
    rx_only.enable().unwrap();
    assert!(matches!(
        rx_only.send_buf(&buf, 0..8, to_b, 2),
        Err(Error::NoCq)
    ));
    drop(rx_only);

    // Nothing drains A's rings: inline sends (two descriptors) and receives into the buffer
    // (three) fill their 16-entry rings, then `Again`.
    let fill = |post: &dyn Fn(u64) -> vfabric::Result<()>| {
        let mut posted = 0;
        loop {
            match post(posted) {
                Ok(()) => posted += 1,
                Err(Error::Again) => return posted,
                Err(e) => panic!("{e}"),
            }
            assert!(posted < 100, "ring never filled");
        }
    };
    assert_eq!(fill(&|i| a.ep.send_buf(&buf, 0..8, to_b, 10 + i)), 8);
    assert_eq!(
        fill(&|i| a.ep.recv_buf_from(&buf, 64..128, to_b, 20 + i)),
        5
    );
}

#[test]
fn ring_full_returns_again_and_close_discards() {
    let r = rig(2);
    let attr = DomainAttr {
        queue_size: 16,
        mem_bytes: 16 << 20,
        ..Default::default()
    };
    let b = node_with(&r.paths[1], WaitMode::None, EpType::Rdm, attr);
    let mut posted = 0;
    loop {
        match b.ep.recv_vec(64, posted) {
            Ok(()) => posted += 1,
            Err(Error::Again) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(posted < 100, "ring never filled");
    }
    assert!(
        posted >= 8,
        "a 16-entry ring takes 8 two-descriptor receives, got {posted}"
    );
    assert_eq!(b.domain.requests_in_flight(), posted as usize);
    // Closing the endpoint discards its receives (no completions, slots freed).
    let Node { ep, rx, domain, .. } = b;
    drop(ep);
    let deadline = Instant::now() + TIMEOUT;
    while domain.requests_in_flight() > 0 {
        domain.progress().unwrap();
        assert!(
            Instant::now() < deadline,
            "receives not returned after EP_CLOSE"
        );
        std::thread::yield_now();
    }
    assert_eq!(rx.queued(), 0);
}

/// A drain keeps the heads it dispatched until the next drain; a post that finds the ring full
/// takes them back itself, so a ring emptied by completions is whole again at once.
#[test]
fn a_full_ring_takes_back_the_heads_its_last_drain_kept() {
    let r = rig(2);
    let attr = DomainAttr {
        queue_size: 16,
        mem_bytes: 16 << 20,
        ..Default::default()
    };
    let a = node(&r.paths[0]);
    let b = node_with(&r.paths[1], WaitMode::None, EpType::Rdm, attr);
    let b_addr = a.av.insert(b.ep.name()).unwrap();
    for round in 0..3u64 {
        // Eight two-descriptor receives fill the 16-entry ring, right after the drain of the
        // round before.
        for i in 0..8 {
            b.ep.recv_vec(64, round * 8 + i)
                .unwrap_or_else(|e| panic!("round {round}, receive {i}: {e}"));
        }
        assert!(matches!(b.ep.recv_vec(64, 99), Err(Error::Again)));
        for i in 0..8u64 {
            post_retry(|| a.ep.send(&[i as u8; 8], b_addr, i), &a.domain);
        }
        for i in 0..8u64 {
            let e = next_ok(&b.rx);
            assert_eq!(e.context, round * 8 + i);
            assert_eq!(e.buf.as_deref(), Some(&[i as u8; 8][..]));
        }
        for _ in 0..8 {
            next_ok(&a.tx);
        }
    }
}

#[test]
fn selective_completion_and_errors_without_av() {
    let r = rig(2);
    let a_dom = Domain::open(&r.paths[0], small_attr()).unwrap();
    let b = node(&r.paths[1]);
    let tx = a_dom.cq_open(CqAttr::default()).unwrap();
    let ep = a_dom.endpoint(EpAttr::default()).unwrap();
    ep.bind_cq(
        &tx,
        BindFlags {
            transmit: true,
            recv: false,
            selective_completion: true,
        },
    )
    .unwrap();
    // Posting before enable is refused (FI_EOPBADSTATE); so is sending without an AV
    // (FI_ENOAV), receiving without a receive CQ (FI_ENOCQ) and binding after enable.
    let e = ep.send(b"x", 0, 1).unwrap_err();
    assert!(matches!(e, Error::BadState(_)), "{e:?}");
    assert_eq!(e.errno(), fi::EOPBADSTATE);
    ep.enable().unwrap();
    assert!(matches!(ep.send(b"x", 0, 1), Err(Error::NoAv)));
    assert!(matches!(ep.recv_vec(8, 1), Err(Error::NoCq)));
    assert!(matches!(
        ep.bind_cq(&tx, BindFlags::RECV),
        Err(Error::BadState(_))
    ));
    let ep2 = a_dom.endpoint(EpAttr::default()).unwrap();
    let av = a_dom.av_open().unwrap();
    let to_b = av.insert_str(&b.ep.name().to_string()).unwrap();
    ep2.bind_cq(
        &tx,
        BindFlags {
            transmit: true,
            recv: false,
            selective_completion: true,
        },
    )
    .unwrap();
    ep2.bind_av(&av).unwrap();
    ep2.enable().unwrap();
    b.ep.recv_vec(8, 1).unwrap();
    b.ep.recv_vec(8, 2).unwrap();
    ep2.send(b"silent", to_b, 10).unwrap();
    let iov = [Iov::bytes(b"loud")];
    ep2.sendmsg(
        &Msg {
            iov: &iov,
            addr: to_b,
            context: 11,
            data: 0,
        },
        fi::COMPLETION,
    )
    .unwrap();
    next_ok(&b.rx);
    next_ok(&b.rx);
    let e = next_ok(&tx);
    assert_eq!(e.context, 11, "only the FI_COMPLETION send reports success");
    assert_quiet(&tx, Duration::from_millis(30));
    // getname
    let mut small = [0u8; 4];
    assert!(matches!(
        ep2.getname(&mut small),
        Err(Error::TooSmall { needed: 16 })
    ));
    let mut name = [0u8; 16];
    assert_eq!(ep2.getname(&mut name).unwrap(), 16);
    assert_eq!(av.insert_bytes(&name).unwrap(), 1);
    assert_eq!(av.lookup(1).unwrap(), ep2.name());
    av.remove(1).unwrap();
    assert!(av.lookup(1).is_err());
}

/// `send_buf` and `recv_buf(_from)` post through a path of their own (the ping-pong's) that
/// keeps every rule of the general one: under FI_SELECTIVE_COMPLETION neither reports success
/// (their counters move); a directed receive reports its source; a zero-length receive takes a
/// zero-length message; a send from a buffer of another domain is copied; bad ranges, a
/// receive buffer of another domain and posts before enable or without a receive CQ are
/// refused.
#[test]
fn shared_buffer_posts_keep_the_general_rules() {
    let r = rig(2);
    let a = node(&r.paths[0]);
    let db = Domain::open(&r.paths[1], small_attr()).unwrap();
    let cq = db.cq_open(CqAttr::default()).unwrap();
    let (rx_cntr, tx_cntr) = (db.cntr_open().unwrap(), db.cntr_open().unwrap());
    let ep = db.endpoint(EpAttr::default()).unwrap();
    let b_av = db.av_open().unwrap();
    ep.bind_cq(
        &cq,
        BindFlags {
            transmit: true,
            recv: true,
            selective_completion: true,
        },
    )
    .unwrap();
    ep.bind_cntr(&rx_cntr, fi::RECV).unwrap();
    ep.bind_cntr(&tx_cntr, fi::SEND).unwrap();
    ep.bind_av(&b_av).unwrap();
    let mut abuf = a.domain.alloc_buffer(512).unwrap();
    let mut bbuf = db.alloc_buffer(512).unwrap();
    assert!(matches!(
        ep.send_buf(&bbuf, 0..1, 0, 1),
        Err(Error::BadState(_))
    ));
    ep.enable().unwrap();
    let to_b = a.av.insert(ep.name()).unwrap();
    let to_a = b_av.insert(a.ep.name()).unwrap();
    // SAFETY: no operation on either buffer is in flight.
    unsafe {
        abuf.as_mut_slice()[..5].copy_from_slice(b"hello");
        bbuf.as_mut_slice()[128..133].copy_from_slice(b"world");
    }

    // Selective completion: B's receive and send move their counters and report nothing.
    ep.recv_buf_from(&bbuf, 0..64, to_a, 1).unwrap();
    a.ep.send_buf(&abuf, 0..5, to_b, 2).unwrap();
    let e = next_ok(&a.tx);
    assert_eq!((e.context, e.len, e.flags), (2, 5, fi::SEND | fi::MSG));
    rx_cntr.wait(1, Some(TIMEOUT)).unwrap();
    // SAFETY: the receive completed.
    assert_eq!(&unsafe { bbuf.as_slice() }[..5], b"hello");
    // A directed receive reports where the message came from.
    a.ep.recv_buf_from(&abuf, 64..128, to_b, 3).unwrap();
    ep.send_buf(&bbuf, 128..133, to_a, 4).unwrap();
    let e = next_ok(&a.rx);
    assert_eq!(
        (e.context, e.len, e.flags, e.src_addr),
        (3, 5, fi::RECV | fi::MSG, to_b)
    );
    // SAFETY: the receive completed.
    assert_eq!(&unsafe { abuf.as_slice() }[64..69], b"world");
    tx_cntr.wait(1, Some(TIMEOUT)).unwrap();
    assert_quiet(&cq, Duration::from_millis(30));

    // A zero-length receive, and a send (longer than the inline limit) from a buffer of the
    // other domain, which is copied.
    a.ep.recv_buf(&abuf, 0..0, 5).unwrap();
    ep.send_buf(&bbuf, 0..0, to_a, 6).unwrap();
    assert_eq!(next_ok(&a.rx).context, 5);
    let foreign = a.domain.alloc_buffer(300).unwrap();
    a.ep.recv_buf(&abuf, 0..512, 7).unwrap();
    ep.send_buf(&foreign, 0..300, to_a, 8).unwrap();
    let e = next_ok(&a.rx);
    assert_eq!((e.context, e.len), (7, 300));
    tx_cntr.wait(3, Some(TIMEOUT)).unwrap();

    // Refused.
    assert!(matches!(
        a.ep.send_buf(&abuf, 500..513, to_b, 9),
        Err(Error::InvalidArgument(_))
    ));
    #[allow(clippy::reversed_empty_ranges)]
    let backwards = 10..5;
    assert!(matches!(
        a.ep.recv_buf(&abuf, backwards, 10),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        a.ep.recv_buf(&bbuf, 0..8, 11),
        Err(Error::InvalidArgument(_))
    ));
    let tx_only = a.domain.endpoint(EpAttr::default()).unwrap();
    tx_only.bind_cq(&a.tx, BindFlags::TRANSMIT).unwrap();
    tx_only.bind_av(&a.av).unwrap();
    tx_only.enable().unwrap();
    assert!(matches!(
        tx_only.recv_buf(&abuf, 0..8, 12),
        Err(Error::NoCq)
    ));
    assert_quiet(&a.rx, Duration::from_millis(10));
    assert_quiet(&cq, Duration::from_millis(10));
}

#[test]
fn concurrent_threads_share_a_domain() {
    let r = rig(2);
    let a = Arc::new(node(&r.paths[0]));
    let b = Arc::new(node(&r.paths[1]));
    let to_b = a.av.insert(b.ep.name()).unwrap();
    let n = 2000u64;
    let reaped = std::sync::atomic::AtomicU64::new(0);
    let reaped = &reaped;
    std::thread::scope(|s| {
        let bb = b.clone();
        s.spawn(move || {
            let mut got = 0;
            let mut posted = 0;
            let mut sum = 0u64;
            while got < n {
                while posted < n && posted - got < 32 {
                    post_retry(|| bb.ep.recv_vec(256, posted), &bb.domain);
                    posted += 1;
                }
                let e = next_ok(&bb.rx);
                sum += u64::from_le_bytes(e.buf.unwrap()[..8].try_into().unwrap());
                got += 1;
            }
            assert_eq!(sum, n * (n - 1) / 2);
        });
        // Two sender threads on the same endpoint, a third thread reaping completions.
        for t in 0..2u64 {
            let a = a.clone();
            s.spawn(move || {
                for i in (t..n).step_by(2) {
                    let mut m = [0u8; 100];
                    m[..8].copy_from_slice(&i.to_le_bytes());
                    post_retry(|| a.ep.send(&m, to_b, i), &a.domain);
                }
            });
        }
        let a = a.clone();
        s.spawn(move || {
            let deadline = Instant::now() + TIMEOUT;
            let mut v = Vec::new();
            while reaped.load(std::sync::atomic::Ordering::Relaxed) < n {
                if let Ok(k) = a.tx.read(&mut v, 64) {
                    reaped.fetch_add(k as u64, std::sync::atomic::Ordering::Relaxed);
                }
                assert!(Instant::now() < deadline);
                std::thread::yield_now();
            }
        });
    });
}

#[test]
fn peer_disconnect_fails_held_sends() {
    let r = rig(2);
    let a = node(&r.paths[0]);
    let to_b;
    {
        let b = node(&r.paths[1]);
        to_b = a.av.insert(b.ep.name()).unwrap();
        // A rendezvous send to B is held (no receive posted)...
        a.ep.send(&vec![3u8; 1 << 20], to_b, 1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        // ...and B's domain goes away.
    }
    let e = next_err(&a.tx);
    assert!(
        matches!(e.status, Status::PeerGone | Status::AddrNotAvail),
        "{e:?}"
    );
    a.ep.send(b"late", to_b, 2).unwrap();
    let e = next_err(&a.tx);
    assert_eq!(e.status, Status::AddrNotAvail);
    // The device accepts a new frontend on B's socket.
    let b2 = node(&r.paths[1]);
    assert_ne!(b2.ep.name(), a.av.lookup(to_b).unwrap());
}

#[test]
fn busy_device_is_reported_not_waited_for() {
    let r = rig(1);
    let _held = Domain::open(&r.paths[0], small_attr()).unwrap();
    let t = Instant::now();
    let second = Domain::open(
        &r.paths[0],
        DomainAttr {
            control_timeout: Duration::from_millis(300),
            ..small_attr()
        },
    );
    assert!(matches!(second, Err(Error::Busy { .. })), "{second:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Once the first frontend leaves, the device serves the next one.
    drop(_held);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match Domain::open(&r.paths[0], small_attr()) {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "device stayed busy: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn device_shutdown_is_noticed() {
    let mut r = rig(2);
    let a = node(&r.paths[0]);
    let b = node_with(&r.paths[1], WaitMode::Blocking, EpType::Rdm, small_attr());
    let buf = a.domain.alloc_buffer(64).unwrap();
    a.ep.recv_vec(64, 1).unwrap();
    b.ep.recv_vec(64, 1).unwrap();
    r.daemon.take().unwrap().shutdown();
    // Polled: read notices the hang-up after a bounded number of empty polls.
    let deadline = Instant::now() + TIMEOUT;
    let mut v = Vec::new();
    loop {
        match a.rx.read(&mut v, 1) {
            Err(Error::Closed) => break,
            Err(Error::Again) => {}
            Err(Error::Avail) => {
                // Receives canceled by the device on its way out are fine too.
                a.rx.readerr().unwrap();
            }
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "closed device not noticed");
    }
    // Blocking: sread returns instead of sleeping forever.
    let t = Instant::now();
    loop {
        match b.rx.sread(&mut v, 1, Some(TIMEOUT)) {
            Err(Error::Closed) => break,
            Err(Error::Avail) => {
                b.rx.readerr().unwrap();
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(matches!(
        a.ep.send(b"x", 0, 1),
        Err(Error::Closed) | Err(Error::InvalidArgument(_))
    ));
    // The shared-buffer posts check the domain first too.
    let to_b = a.av.insert(b.ep.name()).unwrap();
    assert!(matches!(
        a.ep.send_buf(&buf, 0..8, to_b, 2),
        Err(Error::Closed)
    ));
    assert!(matches!(
        a.ep.recv_buf_from(&buf, 0..8, to_b, 3),
        Err(Error::Closed)
    ));
}

#[test]
fn query_caps_grows_its_buffer_and_env_device_list() {
    let dir = tempfile::tempdir().unwrap();
    let paths = vfabric_device::Config::socket_dir_paths(dir.path(), 1);
    let mut config = vfabric_device::Config::new(paths.clone());
    // ~300 vendor attributes with long names: the answer is far over the first 4 KiB buffer.
    for i in 0..300u16 {
        config.vendor_attrs.push(vfabric_device::VendorAttr::new(
            0x1234,
            100 + i,
            &format!("attribute_with_a_rather_long_name_{i:04}"),
            vfabric::CapValue::U64(i as u64),
        ));
    }
    let daemon = vfabric_device::start(config).unwrap();
    // Device discovery through VFABRIC_DEVICES (the only test that sets it; the others pass
    // `Hints::devices`, which takes precedence).
    std::env::set_var(
        "VFABRIC_DEVICES",
        format!(
            "{}:{}",
            paths[0].display(),
            dir.path().join("absent.sock").display()
        ),
    );
    let infos = getinfo(&Hints {
        ep_type: Some(EpType::Rdm),
        ..Default::default()
    });
    std::env::remove_var("VFABRIC_DEVICES");
    let infos = infos.unwrap();
    assert_eq!(infos.len(), 1, "the absent socket is skipped");
    let info = &infos[0];
    let vendor: Vec<_> = info
        .vendor_attrs
        .iter()
        .filter(|e| e.vendor == 0x1234)
        .collect();
    assert_eq!(vendor.len(), 300);
    assert_eq!(vendor[299].name, "attribute_with_a_rather_long_name_0299");
    assert_eq!(vendor[299].value, vfabric::CapValue::U64(299));
    assert!(info.cap_entries.len() > 300);
    assert!(info
        .cap_entries
        .iter()
        .all(|e| e.vendor != 0 || e.key < 100));
    daemon.shutdown();
}

#[test]
fn iov_scatter_gather_and_foreign_buffers() {
    let r = rig(2);
    let (a, b, to_b, _) = pair(&r);
    let mut rng = Xorshift(99);
    let mut msg = vec![0u8; 100_000];
    rng.fill(&mut msg);

    // Zero-copy gather from three shared buffers into a zero-copy scatter over two.
    let mut parts: Vec<vfabric::SharedBuf> = [30_000usize, 50_000, 20_000]
        .iter()
        .map(|&n| a.domain.alloc_buffer(n).unwrap())
        .collect();
    let mut off = 0;
    for p in parts.iter_mut() {
        let n = p.len();
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        unsafe { p.as_mut_slice() }.copy_from_slice(&msg[off..off + n]);
        off += n;
    }
    let rx1 = b.domain.alloc_buffer(60_000).unwrap();
    let rx2 = b.domain.alloc_buffer(40_000).unwrap();
    let rx_iov = [Iov::shared(&rx1, 0..60_000), Iov::shared(&rx2, 0..40_000)];
    b.ep.recvmsg(
        &Msg {
            iov: &rx_iov,
            addr: FI_ADDR_UNSPEC,
            context: 1,
            data: 0,
        },
        0,
    )
    .unwrap();
    let tx_iov: Vec<Iov> = parts.iter().map(|p| Iov::shared(p, 0..p.len())).collect();
    a.ep.sendmsg(
        &Msg {
            iov: &tx_iov,
            addr: to_b,
            context: 2,
            data: 0,
        },
        0,
    )
    .unwrap();
    assert_eq!(next_ok(&b.rx).len, 100_000);
    next_ok(&a.tx);
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    let mut got = unsafe { rx1.as_slice() }.to_vec();
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    got.extend_from_slice(unsafe { rx2.as_slice() });
    assert_eq!(got, msg);

    // Mixed receive iov (shared + private memory): bounced and scattered at completion.
    let mut private = vec![0u8; 70_000];
    let rx3 = b.domain.alloc_buffer(30_000).unwrap();
    // SAFETY: `private` outlives the receive (we wait for the completion below).
    let mixed = [Iov::shared(&rx3, 0..30_000), unsafe {
        Iov::raw(private.as_mut_ptr(), private.len())
    }];
    b.ep.recvmsg(
        &Msg {
            iov: &mixed,
            addr: FI_ADDR_UNSPEC,
            context: 3,
            data: 0,
        },
        0,
    )
    .unwrap();
    // A buffer of another domain (B's) used for a send by A is copied, not passed zero-copy.
    let mut foreign = b.domain.alloc_buffer(100_000).unwrap();
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    unsafe { foreign.as_mut_slice() }.copy_from_slice(&msg);
    a.ep.send_buf(&foreign, 0..100_000, to_b, 4).unwrap();
    assert_eq!(next_ok(&b.rx).len, 100_000);
    next_ok(&a.tx);
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    assert_eq!(unsafe { rx3.as_slice() }, &msg[..30_000]);
    assert_eq!(&private[..], &msg[30_000..]);

    // Small messages through a raw pointer inside the shared region (zero-copy path).
    let mut inside = b.domain.alloc_buffer(64).unwrap();
    // SAFETY: `inside` outlives the receive.
    unsafe { b.ep.recv_raw(inside.as_mut_ptr(), 64, 5).unwrap() };
    a.ep.send(b"inside the region", to_b, 6).unwrap();
    assert_eq!(next_ok(&b.rx).len, 17);
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    assert_eq!(&unsafe { inside.as_slice() }[..17], b"inside the region");
    next_ok(&a.tx);
}

#[test]
fn fi_more_batches_kicks() {
    let r = rig(2);
    let (a, b, to_b, _) = pair(&r);
    for i in 0..20u64 {
        b.ep.recv_vec(16, i).unwrap();
    }
    let before = a.domain.stats();
    for i in 0..20u64 {
        let bytes = i.to_le_bytes();
        let iov = [Iov::bytes(&bytes)];
        let flags = if i < 19 { fi::MORE } else { 0 };
        a.ep.sendmsg(
            &Msg {
                iov: &iov,
                addr: to_b,
                context: i,
                data: 0,
            },
            flags,
        )
        .unwrap();
    }
    let after = a.domain.stats();
    assert_eq!(after.posted - before.posted, 20);
    assert!(after.kicks - before.kicks <= 1, "{before:?} -> {after:?}");
    for i in 0..20u64 {
        let e = next_ok(&b.rx);
        assert_eq!(e.context, i);
        assert_eq!(e.buf.as_deref(), Some(&i.to_le_bytes()[..]));
        assert_eq!(next_ok(&a.tx).context, i);
    }
}

#[test]
fn batch_posts_ring_the_doorbell_once() {
    let r = rig(2);
    let (a, b, to_b, _) = pair(&r);
    let rbuf = b.domain.alloc_buffer(32 * 64).unwrap();
    let mut sbuf = a.domain.alloc_buffer(32 * 64).unwrap();
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    for (i, chunk) in unsafe { sbuf.as_mut_slice() }.chunks_mut(64).enumerate() {
        chunk.fill(i as u8);
    }
    {
        let mut batch = b.ep.batch();
        for i in 0..32usize {
            batch
                .recv_buf(&rbuf, i * 64..(i + 1) * 64, i as u64)
                .unwrap();
        }
        // Dropping the batch rings the doorbell.
    }
    let before = a.domain.stats();
    let mut batch = a.ep.batch();
    for i in 0..32usize {
        batch
            .send_buf(&sbuf, i * 64..(i + 1) * 64, to_b, 100 + i as u64)
            .unwrap();
    }
    assert_eq!(
        a.domain.stats().kicks,
        before.kicks,
        "no kick before the flush"
    );
    batch.flush();
    let after = a.domain.stats();
    assert_eq!(after.posted - before.posted, 32);
    assert!(after.kicks - before.kicks <= 1, "{before:?} -> {after:?}");
    drop(batch);
    // Completions read into caller slices: no Vec anywhere.
    let mut entries = [vfabric::CqEntry::default(), vfabric::CqEntry::default()];
    let mut got = 0;
    let deadline = Instant::now() + TIMEOUT;
    while got < 32 {
        match b.rx.read_into(&mut entries) {
            Ok(n) => {
                for e in &entries[..n] {
                    assert_eq!(e.context, got as u64, "in order");
                    assert_eq!(e.len, 64);
                    got += 1;
                }
            }
            Err(Error::Again) => assert!(Instant::now() < deadline, "receives missing"),
            Err(e) => panic!("read_into: {e}"),
        }
    }
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    for (i, chunk) in unsafe { rbuf.as_slice() }.chunks(64).enumerate() {
        assert!(chunk.iter().all(|&x| x == i as u8), "message {i}");
    }
    for i in 0..32u64 {
        assert_eq!(next_ok(&a.tx).context, 100 + i);
    }
    assert!(matches!(a.tx.read_one(), Err(Error::Again)));
    assert!(matches!(b.rx.read_into(&mut []), Err(Error::Again)));
}

#[test]
fn sread_into_waits_and_times_out() {
    let r = rig(2);
    let a = node_with(&r.paths[0], WaitMode::Blocking, EpType::Rdm, small_attr());
    let b = node_with(&r.paths[1], WaitMode::Blocking, EpType::Rdm, small_attr());
    let to_b = a.av.insert(b.ep.name()).unwrap();
    let mut one = [vfabric::CqEntry::default()];
    // Nothing posted: the timeout is kept across wakeups and reported.
    let t0 = Instant::now();
    assert!(matches!(
        b.rx.sread_into(&mut one, Some(Duration::from_millis(30))),
        Err(Error::Timeout)
    ));
    assert!(
        t0.elapsed() >= Duration::from_millis(25),
        "{:?}",
        t0.elapsed()
    );
    b.ep.recv_vec(16, 7).unwrap();
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        a.ep.send(b"late", to_b, 8).unwrap();
        let mut one = [vfabric::CqEntry::default()];
        assert_eq!(a.tx.sread_into(&mut one, Some(TIMEOUT)).unwrap(), 1);
        assert_eq!(one[0].context, 8);
        a
    });
    assert_eq!(b.rx.sread_into(&mut one, Some(TIMEOUT)).unwrap(), 1);
    assert_eq!(one[0].context, 7);
    assert_eq!(one[0].buf.as_deref(), Some(&b"late"[..]));
    drop(sender.join().unwrap());
}

/// Spec §6.8.3 step 1 and §6.8.8: the device fetches every request made available before an
/// EP_CLOSE first (vfabricd reads the control queue's avail index, drains the data queues, then
/// takes the control requests that index announced), so a receive posted just before closing is
/// cancelled with its endpoint and never attributed to a later endpoint with the same id; the
/// driver also waits in `Endpoint::drop` until the device returned every request of the closed
/// endpoint.
#[test]
fn receive_posted_before_close_never_reaches_a_reopened_id() {
    let r = rig(2);
    let a = node(&r.paths[0]);
    let b_dom = Domain::open(&r.paths[1], small_attr()).unwrap();
    let rx = b_dom.cq_open(CqAttr::default()).unwrap();
    let mut stolen = 0;
    let mut reused = 0;
    for round in 0..50u64 {
        let old = b_dom.endpoint(EpAttr::default()).unwrap();
        old.bind_cq(&rx, BindFlags::BOTH).unwrap();
        old.enable().unwrap();
        let old_id = old.id();
        // More receives than the device fetches from one queue per pass (64), so that some
        // are still unfetched when the EP_CLOSE and the following EP_OPEN are handled.
        for i in 0..120 {
            old.recv_vec(64, 1000 + i).unwrap();
        }
        drop(old); // EP_CLOSE right behind the receives
        let new = b_dom.endpoint(EpAttr::default()).unwrap();
        new.bind_cq(&rx, BindFlags::BOTH).unwrap();
        new.enable().unwrap();
        if new.id() != old_id {
            continue;
        }
        reused += 1;
        let to_new = a.av.insert(new.name()).unwrap();
        a.ep.send(&round.to_le_bytes(), to_new, round).unwrap();
        next_ok(&a.tx);
        new.recv_vec(64, 2).unwrap();
        let deadline = Instant::now() + Duration::from_millis(200);
        let mut v = Vec::new();
        let mut got = false;
        while Instant::now() < deadline {
            match rx.read(&mut v, 1) {
                Ok(_) => {
                    got = true;
                    break;
                }
                Err(Error::Again) => std::thread::yield_now(),
                Err(Error::Avail) => {
                    rx.readerr();
                }
                Err(e) => panic!("{e}"),
            }
        }
        if !got {
            stolen += 1;
            new.cancel(2).ok();
        }
    }
    println!("{reused} rounds reused the endpoint id, {stolen} messages swallowed");
    assert!(
        reused > 0,
        "the device never reused an endpoint id: nothing was tested"
    );
    assert_eq!(
        stolen, 0,
        "messages swallowed by a receive of a closed endpoint"
    );
}

/// A transfer whose bounce buffer can never fit in the shared region fails at once with
/// `OutOfMemory` (-FI_ENOMEM) instead of `Again` forever; a transient shortage (bounce buffers
/// lent to operations in flight) still answers `Again`.
#[test]
fn transfer_larger_than_the_region_fails_at_once() {
    let r = rig(2);
    let tiny = DomainAttr {
        mem_bytes: 1 << 20,
        ..Default::default()
    };
    let a = node_with(&r.paths[0], WaitMode::None, EpType::Rdm, tiny.clone());
    let b = node_with(&r.paths[1], WaitMode::None, EpType::Rdm, tiny);
    let to_b = a.av.insert(b.ep.name()).unwrap();
    let big = vec![7u8; 1 << 20];
    for (what, res) in [
        ("send", a.ep.send(&big, to_b, 1)),
        ("recv", a.ep.recv_vec(1 << 20, 2)),
        ("write", a.ep.write(&big, to_b, 0, 1, 3)),
        ("read", a.ep.read_vec(1 << 20, to_b, 0, 1, 4)),
    ] {
        assert!(
            matches!(res, Err(Error::OutOfMemory { .. })),
            "{what}: {res:?}"
        );
        assert_eq!(res.unwrap_err().errno(), fi::ENOMEM, "{what}");
    }
    // 300 KiB receives (512 KiB bounce buffers) held by the device: the second cannot get a
    // buffer now, but can once the first completes, so it is a transient shortage.
    b.ep.recv_vec(300 << 10, 5).unwrap();
    assert!(matches!(b.ep.recv_vec(300 << 10, 6), Err(Error::Again)));
}

/// A plain receive borrows its shared buffer without a reference count: the buffer's checked
/// borrow still sees it in flight, and a buffer dropped with the receive in flight keeps its
/// memory until the receive completes, so a buffer allocated meanwhile never gets it (the
/// message lands in the dropped buffer's memory, not in the new one).
#[test]
fn a_buffer_dropped_with_a_receive_in_flight_keeps_its_memory_until_it_completes() {
    let r = rig(2);
    let (a, b, to_b, _) = pair(&r);
    let mut rbuf = b.domain.alloc_buffer(256).unwrap();
    let old = rbuf.addr();
    b.ep.recv_buf(&rbuf, 0..256, 7).unwrap();
    assert!(rbuf.get_mut().is_none(), "the device may write the buffer");
    drop(rbuf);
    let mut fresh = b.domain.alloc_buffer(256).unwrap();
    assert_ne!(
        fresh.addr(),
        old,
        "memory of a receive in flight was reused"
    );
    fresh.get_mut().unwrap().fill(0x5a);
    post_retry(|| a.ep.send(&[0xa5; 200], to_b, 1), &a.domain);
    next_ok(&a.tx);
    let e = next_ok(&b.rx);
    assert_eq!((e.context, e.len), (7, 200));
    assert!(fresh.get().unwrap().iter().all(|&x| x == 0x5a));
    // A receive into `fresh`, completed: its checked borrow is back.
    b.ep.recv_buf(&fresh, 0..256, 8).unwrap();
    assert!(fresh.get().is_none());
    post_retry(|| a.ep.send(&[0xa5; 20], to_b, 2), &a.domain);
    next_ok(&a.tx);
    assert_eq!(next_ok(&b.rx).context, 8);
    assert_eq!(fresh.get().unwrap()[..20], [0xa5; 20]);
}

/// A directed receive's entry reports the AV index it was posted with (no look-up of the
/// source), unless an AV entry was removed meanwhile: then the index the AV has for the source
/// when the entry is built (here the address's second index).
#[test]
fn a_directed_receive_reports_its_posted_source_unless_the_av_changed() {
    let r = rig(2);
    let (a, b, to_b, a_at_b) = pair(&r);
    // A second index of the same address: a look-up would name the first.
    let again = b.av.insert(a.ep.name()).unwrap();
    let rbuf = b.domain.alloc_buffer(64).unwrap();
    let round = |from: FiAddr, ctx: u64, remove: Option<FiAddr>| {
        b.ep.recv_buf_from(&rbuf, 0..64, from, ctx).unwrap();
        if let Some(i) = remove {
            b.av.remove(i).unwrap();
        }
        post_retry(|| a.ep.send(&[1; 8], to_b, ctx), &a.domain);
        next_ok(&a.tx);
        let e = next_ok(&b.rx);
        assert_eq!(e.context, ctx);
        e.src_addr
    };
    assert_eq!(round(again, 1, None), again);
    assert_eq!(round(a_at_b, 2, None), a_at_b);
    // Posted from the first index, which goes before the message arrives: the second.
    assert_eq!(round(a_at_b, 3, Some(a_at_b)), again);
}
