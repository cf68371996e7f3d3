// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Matching-engine tests, driven without vhost through `testutil::World`.

use vfabric_proto::{
    caps::key, comp_flags, ep_open, flags, CapValue, CapsParser, FabricAddr, Opcode, Request,
    Status, VENDOR_ID_VFABRIC,
};

use std::sync::Arc;

use super::{eager_cost, CompletionSink, Notify, Teardown, EAGER_OVERHEAD};
use crate::config::Limits;
use crate::testutil::{World, ALL_FEATURES, H, TEST_FABRIC};

const RDM: u64 = ep_open::TYPE_RDM;

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Room for exactly two eager 150-byte messages.
fn small_limits() -> Limits {
    Limits {
        eager_threshold: 200,
        max_unexpected_bytes: 2 * eager_cost(150),
        ..Limits::default()
    }
}

#[test]
fn eager_send_then_recv() {
    let mut w = World::new(2, Limits::default());
    let a = w.open(0, RDM);
    let b = w.open(1, RDM);
    let msg = pattern(100, 1);
    let s = w.send(0, a, b, None, 0, 11, &msg);
    // Eager: the send completes at once, the data waits in the device.
    let (c, used) = w.result(&s).unwrap();
    assert_eq!(w.status(&s), Some(Status::Ok));
    assert_eq!(u64::from(c.len), 100);
    assert_eq!(u64::from(c.cookie), 11);
    assert_eq!(used, 64);
    assert_eq!(w.fabric.unexpected_bytes(1), 100 + EAGER_OVERHEAD);

    let r = w.recv(1, b, None, 0, 22, 0, 200);
    let (c, used) = w.result(&r).unwrap();
    assert_eq!(w.status(&r), Some(Status::Ok));
    assert_eq!(u64::from(c.len), 100);
    assert_eq!(u64::from(c.cookie), 22);
    assert_eq!(FabricAddr::from_wire(&c.src), a);
    assert_eq!(used, 164);
    assert_eq!(w.data(&r, 100), msg);
    assert_eq!(w.fabric.unexpected_bytes(1), 0);
}

#[test]
fn posted_recv_gets_one_copy() {
    let mut w = World::new(2, Limits::default());
    let a = w.open(0, RDM);
    let b = w.open(1, RDM);
    let r = w.recv(1, b, None, 0, 1, 0, 100_000);
    assert!(w.result(&r).is_none(), "posted receive waits");
    let msg = pattern(70_000, 3);
    let s = w.send(0, a, b, None, 0, 2, &msg);
    assert_eq!(w.status(&s), Some(Status::Ok));
    assert_eq!(u64::from(w.comp(&r).len), 70_000);
    assert_eq!(w.data(&r, 70_000), msg);
    assert_eq!(w.fabric.unexpected_bytes(1), 0);
    let c = w.fabric.counters(1).unwrap();
    assert_eq!(
        c.bytes_copied.load(std::sync::atomic::Ordering::Relaxed),
        70_000
    );
}

#[test]
fn tag_matching_with_ignore_bits_and_untagged_separation() {
    let mut w = World::new(2, Limits::default());
    let a = w.open(0, RDM);
    let b = w.open(1, RDM);
    // Posted TRECV for tags 0x10..=0x1f.
    let r1 = w.recv(1, b, Some((0x10, 0x0f)), 0, 1, 0, 64);
    // Untagged and non-matching tagged sends do not take it.
    w.send(0, a, b, None, 0, 10, b"untagged");
    w.send(0, a, b, Some(0x20), 0, 11, b"tag20");
    assert!(w.result(&r1).is_none());
    w.send(0, a, b, Some(0x1f), 0, 12, b"tag1f");
    assert_eq!(w.status(&r1), Some(Status::Ok));
    let c = w.comp(&r1);
    assert_eq!(u64::from(c.tag), 0x1f);
    assert_ne!(u32::from(c.flags) & comp_flags::TAGGED, 0);
    assert_eq!(w.data(&r1, 5), b"tag1f");
    // An exact tag receive finds the earlier unexpected tag 0x20, skipping the untagged one.
    let r2 = w.recv(1, b, Some((0x20, 0)), 0, 2, 0, 64);
    assert_eq!(w.data(&r2, 5), b"tag20");
    // Untagged receive gets the untagged message.
    let r3 = w.recv(1, b, None, 0, 3, 0, 64);
    assert_eq!(w.data(&r3, 8), b"untagged");
    assert_eq!(u32::from(w.comp(&r3).flags) & comp_flags::TAGGED, 0);
}

#[test]
fn directed_receive_filters_by_source() {
    let mut w = World::new(3, Limits::default());
    let a1 = w.open(0, RDM);
    let a2 = w.open(2, RDM);
    let b = w.open(1, RDM);
    w.send(0, a1, b, Some(5), 0, 1, b"from-a1");
    w.send(2, a2, b, Some(5), 0, 2, b"from-a2");
    let mut r = Request::new(Opcode::TRecv);
    r.ep = b.ep;
    r.tag = 5;
    r.flags = flags::DIRECTED;
    r.peer = a2;
    let h = w.submit(1, r, &[], 64);
    assert_eq!(w.data(&h, 7), b"from-a2");
    assert_eq!(FabricAddr::from_wire(&w.comp(&h).src), a2);
    // A directed receive from an open endpoint that never sends stays posted.
    r.peer = w.open(2, RDM);
    let h2 = w.submit(1, r, &[], 64);
    assert!(w.result(&h2).is_none());
    let h3 = w.recv(1, b, Some((5, 0)), 0, 3, 0, 64);
    assert_eq!(w.data(&h3, 7), b"from-a1");
}

#[test]
fn order_per_pair_with_eager_and_held_mixed() {
    let mut w = World::new(2, small_limits());
    let a = w.open(0, RDM);
    let b = w.open(1, RDM);
    let m1 = pattern(50, 1);
    let m2 = pattern(1000, 2); // above eager_threshold: held
    let m3 = pattern(60, 3);
    let s1 = w.send(0, a, b, None, 0, 1, &m1);
    let s2 = w.send(0, a, b, None, 0, 2, &m2);
    let s3 = w.send(0, a, b, None, 0, 3, &m3);
    assert_eq!(w.status(&s1), Some(Status::Ok));
    assert!(w.result(&s2).is_none(), "large send is held");
    assert_eq!(w.status(&s3), Some(Status::Ok));
    let r1 = w.recv(1, b, None, 0, 11, 0, 2000);
    let r2 = w.recv(1, b, None, 0, 12, 0, 2000);
    let r3 = w.recv(1, b, None, 0, 13, 0, 2000);
    assert_eq!(w.data(&r1, 50), m1);
    assert_eq!(w.data(&r2, 1000), m2);
    assert_eq!(w.data(&r3, 60), m3);
    assert_eq!(
        w.status(&s2),
        Some(Status::Ok),
        "held send completes on match"
    );
    assert_eq!(u64::from(w.comp(&s2).len), 1000);
}

#[test]
fn truncation_reports_placed_and_lost() {
    let mut w = World::new(2, small_limits());
    let a = w.open(0, RDM);
    let b = w.open(1, RDM);
    // Posted receive, held path (one copy).
    let r = w.recv(1, b, None, 0, 1, 0, 10);
    let msg = pattern(25, 9);
    let s = w.send(0, a, b, None, 0, 2, &msg);
    let (c, used) = w.result(&r).unwrap();
    assert_eq!(w.status(&r), Some(Status::Truncated));
    assert_eq!(u64::from(c.len), 10);
    assert_eq!(u64::from(c.olen), 15);
    assert_eq!(used, 74);
    assert_eq!(w.data(&r, 10), &msg[..10]);
    assert_eq!(w.status(&s), Some(Status::Ok));
    assert_eq!(u64::from(w.comp(&s).len), 25);
    // Eager path.
    w.send(0, a, b, None, 0, 3, &msg);
    let r = w.recv(1, b, None, 0, 4, 0, 7);
    assert_eq!(w.status(&r), Some(Status::Truncated));
    assert_eq!(u64::from(w.comp(&r).olen), 18);
    assert_eq!(w.data(&r, 7), &msg[..7]);
    assert_eq!(w.fabric.unexpected_bytes(1), 0);
}

#[test]
fn peek_claim_discard() {
    let mut w = World::new(2, small_limits());
    let a = w.open(0, RDM);
    let b = w.open(1, RDM);
    let all = u64::MAX;
    // Nothing to peek yet.
    let p = w.recv(1, b, Some((0, all)), flags::PEEK, 1, 0, 0);
    assert_eq!(w.status(&p), Some(Status::NoMessage));

    w.send(0, a, b, Some(1), 0, 0, b"first");
    let held = pattern(500, 4);
    let s2 = w.send(0, a, b, Some(2), 0, 0, &held); // held
                                                    // PEEK reports without consuming.
    let p = w.recv(1, b, Some((2, 0)), flags::PEEK, 2, 0, 0);
    let (c, used) = w.result(&p).unwrap();
    assert_eq!(w.status(&p), Some(Status::Ok));
    assert_eq!(u64::from(c.len), 500);
    assert_eq!(u64::from(c.tag), 2);
    assert_ne!(u32::from(c.flags) & comp_flags::CLAIMED, 0);
    assert_eq!(used, 64, "peek copies nothing");
    // PEEK|CLAIM reserves tag 1 for cookie 77.
    let pc = w.recv(1, b, Some((1, 0)), flags::PEEK | flags::CLAIM, 77, 0, 0);
    assert_eq!(w.status(&pc), Some(Status::Ok));
    // A wildcard receive skips the claimed message and gets the held one.
    let r = w.recv(1, b, Some((0, all)), 0, 3, 0, 1000);
    assert_eq!(w.data(&r, 500), held);
    assert_eq!(w.status(&s2), Some(Status::Ok));
    // CLAIM with the wrong cookie finds nothing; with the right one it receives.
    let bad = w.recv(1, b, Some((0, 0)), flags::CLAIM, 4, 78, 64);
    assert_eq!(w.status(&bad), Some(Status::NoMessage));
    let cl = w.recv(1, b, Some((0, 0)), flags::CLAIM, 5, 77, 64);
    assert_eq!(w.status(&cl), Some(Status::Ok));
    assert_eq!(w.data(&cl, 5), b"first");
    // PEEK|CLAIM then CLAIM|DISCARD drops a held message; its sender completes Ok.
    let s4 = w.send(0, a, b, Some(9), 0, 0, &held);
    assert!(w.result(&s4).is_none());
    w.recv(1, b, Some((9, 0)), flags::PEEK | flags::CLAIM, 88, 0, 0);
    let d = w.recv(1, b, Some((0, 0)), flags::CLAIM | flags::DISCARD, 6, 88, 64);
    let (c, used) = w.result(&d).unwrap();
    assert_eq!(w.status(&d), Some(Status::Ok));
    assert_eq!(u64::from(c.len), 0);
    assert_eq!(used, 64);
    assert_eq!(w.status(&s4), Some(Status::Ok));
    let p = w.recv(1, b, Some((0, all)), flags::PEEK, 7, 0, 0);
    assert_eq!(w.status(&p), Some(Status::NoMessage));
    assert_eq!(w.fabric.unexpected_bytes(1), 0);
}

#[test]
fn eager_bound_holds_sends_without_dropping() {
    let mut w = World::new(2, small_limits());
    let a = w.open(0, RDM);
    let b = w.open(1, RDM);
    let m: Vec<Vec<u8>> = (0..5).map(|i| pattern(150, i)).collect();
    let s0 = w.send(0, a, b, None, 0, 0, &m[0]);
    let s1 = w.send(0, a, b, None, 0, 1, &m[1]);
    let s2 = w.send(0, a, b, None, 0, 2, &m[2]); // over max_unexpected_bytes: held (backpressure)
    let s3 = w.send(0, a, b, None, flags::DELIVERY_COMPLETE, 3, &m[3]); // held
    assert_eq!(w.status(&s0), Some(Status::Ok));
    assert_eq!(w.status(&s1), Some(Status::Ok));
    assert!(w.result(&s2).is_none());
    assert!(w.result(&s3).is_none());
    assert_eq!(w.fabric.unexpected_bytes(1), 2 * eager_cost(150));
    for (i, expect) in m.iter().take(4).enumerate() {
        let r = w.recv(1, b, None, 0, 10 + i as u64, 0, 200);
        assert_eq!(&w.data(&r, 150), expect, "message {i} in order");
    }
    assert_eq!(w.status(&s2), Some(Status::Ok));
    assert_eq!(w.status(&s3), Some(Status::Ok));
    assert_eq!(w.fabric.unexpected_bytes(1), 0);
    // With the buffer drained eager sends flow again.
    let s4 = w.send(0, a, b, None, 0, 4, &m[4]);
    assert_eq!(w.status(&s4), Some(Status::Ok));
}

#[test]
fn cancel_posted_recv_and_held_send() {
    let mut w = World::new(2, small_limits());
    let a = w.open(0, RDM);
    let b = w.open(1, RDM);
    let r = w.recv(1, b, None, 0, 5, 0, 64);
    let mut c = Request::new(Opcode::Cancel);
    c.ep = b.ep;
    c.data = 5;
    let h = w.submit(1, c, &[], 0);
    assert_eq!(w.status(&h), Some(Status::Ok));
    assert_eq!(w.status(&r), Some(Status::Canceled));
    assert_eq!(u64::from(w.comp(&r).cookie), 5);
    let h = w.submit(1, c, &[], 0);
    assert_eq!(w.status(&h), Some(Status::NoMessage));

    let s = w.send(0, a, b, None, 0, 9, &pattern(1000, 1)); // held
    let mut c = Request::new(Opcode::Cancel);
    c.ep = a.ep;
    c.data = 9;
    let h = w.submit(0, c, &[], 0);
    assert_eq!(w.status(&h), Some(Status::Ok));
    assert_eq!(w.status(&s), Some(Status::Canceled));
    // The cancelled message is gone: a receive stays posted.
    let r = w.recv(1, b, None, 0, 6, 0, 2000);
    assert!(w.result(&r).is_none());
    // Cancel on a closed endpoint.
    c.ep = 40;
    let h = w.submit(0, c, &[], 0);
    assert_eq!(w.status(&h), Some(Status::BadEndpoint));
}

#[test]
fn endpoint_limits_close_and_generations() {
    let limits = Limits {
        max_endpoints: 2,
        ..Limits::default()
    };
    let mut w = World::new(2, limits);
    let e0 = w.open(0, RDM);
    let e1 = w.open(0, RDM);
    assert_eq!((e0.ep, e1.ep), (0, 1));
    let mut o = Request::new(Opcode::EpOpen);
    o.data = ep_open::TYPE_RDM;
    let h = w.submit(0, o, &[], 0);
    assert_eq!(w.status(&h), Some(Status::NoResources));
    o.data = 42;
    let h = w.submit(0, o, &[], 0);
    assert_eq!(w.status(&h), Some(Status::Invalid));

    let r = w.recv(0, e0, None, 0, 3, 0, 64);
    let mut cl = Request::new(Opcode::EpClose);
    cl.ep = e0.ep;
    let h = w.submit(0, cl, &[], 0);
    assert_eq!(w.status(&h), Some(Status::Ok));
    assert_eq!(w.status(&r), Some(Status::Canceled));
    let h = w.submit(0, cl, &[], 0);
    assert_eq!(w.status(&h), Some(Status::BadEndpoint));

    let again = w.open(0, RDM);
    assert_eq!(again.ep, e0.ep);
    assert_ne!(again.generation, e0.generation);
    // The old address no longer names an endpoint.
    let x = w.open(1, RDM);
    let s = w.send(1, x, e0, None, 0, 1, b"stale");
    assert_eq!(w.status(&s), Some(Status::AddrNotAvail));
    let mut ac = Request::new(Opcode::AddrCheck);
    ac.peer = e0;
    let h = w.submit(1, ac, &[], 0);
    assert_eq!(w.status(&h), Some(Status::AddrNotAvail));
    ac.peer = again;
    let h = w.submit(1, ac, &[], 0);
    assert_eq!(w.status(&h), Some(Status::Ok));
    // Bad endpoints on the data path.
    let s = w.send(1, FabricAddr::new(x.node, 1, 1), again, None, 0, 1, b"x");
    assert_eq!(w.status(&s), Some(Status::BadEndpoint));
    let r = w.recv(1, FabricAddr::new(x.node, 1000, 1), None, 0, 1, 0, 8);
    assert_eq!(w.status(&r), Some(Status::BadEndpoint));
}

#[test]
fn dgram_without_receive_drops_and_counts() {
    let mut w = World::new(2, Limits::default());
    let a = w.open(0, ep_open::TYPE_DGRAM);
    let d = w.open(1, ep_open::TYPE_DGRAM);
    let s = w.send(0, a, d, None, 0, 1, b"lost");
    assert_eq!(w.status(&s), Some(Status::Ok));
    let c = w.fabric.counters(1).unwrap();
    assert_eq!(c.dgram_drops.load(std::sync::atomic::Ordering::Relaxed), 1);
    let r = w.recv(1, d, None, 0, 2, 0, 64);
    assert!(w.result(&r).is_none(), "dropped message is not queued");
    w.send(0, a, d, None, 0, 3, b"kept");
    assert_eq!(w.data(&r, 4), b"kept");
}

#[test]
fn reliable_and_datagram_endpoints_do_not_mix() {
    let mut w = World::new(2, Limits::default());
    let rdm = w.open(0, RDM);
    let dg = w.open(1, ep_open::TYPE_DGRAM);
    let s = w.send(0, rdm, dg, None, 0, 1, b"x");
    assert_eq!(w.status(&s), Some(Status::AddrNotAvail));
    let s = w.send(1, dg, rdm, None, 0, 2, b"y");
    assert_eq!(w.status(&s), Some(Status::AddrNotAvail));
    let mut r = Request::new(Opcode::Send);
    r.ep = dg.ep;
    r.peer = w.open(0, ep_open::TYPE_DGRAM);
    r.flags = flags::DELIVERY_COMPLETE;
    let s = w.submit(1, r, b"z", 0);
    assert_eq!(w.status(&s), Some(Status::Invalid));
}

#[test]
fn remote_cq_data_is_delivered() {
    let mut w = World::new(2, Limits::default());
    let a = w.open(0, RDM);
    let b = w.open(1, RDM);
    let mut s = Request::new(Opcode::Send);
    s.ep = a.ep;
    s.peer = b;
    s.flags = flags::REMOTE_CQ_DATA;
    s.data = 0xabcd;
    w.submit(0, s, b"x", 0);
    let r = w.recv(1, b, None, 0, 1, 0, 8);
    let c = w.comp(&r);
    assert_ne!(u32::from(c.flags) & comp_flags::REMOTE_CQ_DATA, 0);
    assert_eq!(u64::from(c.data), 0xabcd);
}

#[test]
fn query_caps_lists_limits_and_vendor_attrs() {
    let mut w = World::new(2, Limits::default());
    let q = Request::new(Opcode::QueryCaps);
    let h = w.submit(1, q, &[], 4096);
    assert_eq!(w.status(&h), Some(Status::Ok));
    let len = u64::from(w.comp(&h).len) as usize;
    let caps = CapsParser::parse(&w.data(&h, len)).unwrap();
    let get = |v: u32, k: u16| caps.iter().find(|e| e.vendor == v && e.key == k).cloned();
    let l = Limits::default();
    assert_eq!(
        get(0, key::MAX_MSG_SIZE).unwrap().value,
        CapValue::U64(l.max_msg_size)
    );
    assert_eq!(
        get(0, key::NODE_ADDR).unwrap().value,
        CapValue::U64(FabricAddr::node_of(TEST_FABRIC, 1, 1))
    );
    for k in [
        key::INJECT_SIZE,
        key::MAX_ENDPOINTS,
        key::MAX_MRS,
        key::MAX_UNEXPECTED_BYTES,
        key::EAGER_THRESHOLD,
        key::MAX_QUEUE_SIZE,
        key::NUM_QUEUE_PAIRS,
        key::MAX_SGE,
        key::CAPS,
        key::FLAGS,
        key::MSG_ORDER,
        key::TAG_BITS,
        key::FABRIC_NAME,
        key::DOMAIN_NAME,
        key::MAX_CQ_DATA_SIZE,
        key::VENDOR_ID,
        key::DRIVER_VERSION,
    ] {
        assert!(get(0, k).is_some(), "standard key {k} missing");
    }
    assert_eq!(
        get(VENDOR_ID_VFABRIC, 1).unwrap().value,
        CapValue::Str("memcpy".into())
    );
    assert_eq!(
        get(VENDOR_ID_VFABRIC, 2).unwrap().value,
        CapValue::Bool(true)
    );
    assert_eq!(
        get(
            VENDOR_ID_VFABRIC,
            crate::config::VENDOR_KEY_VIRTIO_DEVICE_ID
        )
        .unwrap()
        .value,
        CapValue::U64(56)
    );
    // Too small a buffer: Truncated with the size needed.
    let h = w.submit(1, q, &[], 16);
    assert_eq!(w.status(&h), Some(Status::Truncated));
    assert_eq!(u64::from(w.comp(&h).olen) as usize, len);
    assert_eq!(w.result(&h).unwrap().1, 64);
    // Without VENDOR_CAPS negotiated no vendor entry appears.
    let bare = w.fabric.caps(0, ALL_FEATURES & !(1 << 6));
    let e = CapsParser::parse(&bare).unwrap();
    assert!(e.iter().all(|x| x.vendor == 0));
    // Persistence flags and the store granularity only with RMA_PMEM negotiated (spec §5.1.1).
    let flags_of = |caps: &[vfabric_proto::CapEntry]| match caps
        .iter()
        .find(|e| e.vendor == 0 && e.key == key::FLAGS)
        .map(|e| e.value.clone())
    {
        Some(CapValue::U64(f)) => f,
        other => panic!("FLAGS: {other:?}"),
    };
    let pmem_bits = vfabric_proto::flags::COMMIT_COMPLETE | vfabric_proto::flags::SAVE;
    assert_eq!(flags_of(&caps) & pmem_bits, 0, "RMA_PMEM not negotiated");
    assert!(get(0, key::PMEM_GRANULARITY).is_none());
    let with_pmem = CapsParser::parse(&w.fabric.caps(
        0,
        ALL_FEATURES | 1 << vfabric_proto::VIRTIO_FABRIC_F_RMA_PMEM,
    ))
    .unwrap();
    assert_eq!(flags_of(&with_pmem) & pmem_bits, pmem_bits);
    let granularity = with_pmem
        .iter()
        .find(|e| e.vendor == 0 && e.key == key::PMEM_GRANULARITY)
        .map(|e| e.value.clone());
    assert_eq!(granularity, Some(CapValue::U64(2)), "page granularity");
}

/// A receive on device `dev`'s endpoint `at` directed at `from`.
fn directed_recv(w: &mut World, dev: usize, at: FabricAddr, from: FabricAddr, cookie: u64) -> H {
    let mut r = Request::new(Opcode::Recv);
    r.ep = at.ep;
    r.flags = flags::DIRECTED;
    r.peer = from;
    r.cookie = cookie;
    w.submit(dev, r, &[], 64)
}

#[test]
fn directed_receives_fail_when_their_source_goes() {
    let mut w = World::new(3, small_limits());
    let a = w.open(0, RDM);
    let c = w.open(2, RDM);
    let b = w.open(1, RDM);
    let directed =
        |w: &mut World, from: FabricAddr, cookie: u64| directed_recv(w, 1, b, from, cookie);
    let from_a = directed(&mut w, a, 1);
    let from_c = directed(&mut w, c, 2);
    let any = w.recv(1, b, None, 0, 3, 0, 64);
    // A's device goes: the receive only A could satisfy fails; the others stay posted.
    let mut n = Notify::default();
    w.fabric.disconnect(0, &mut n);
    drop(n);
    assert_eq!(w.status(&from_a), Some(Status::PeerGone));
    // A lost source: `data` 0.
    assert_eq!(u64::from(w.comp(&from_a).data), 0);
    assert!(w.result(&from_c).is_none());
    assert!(w.result(&any).is_none());
    // A receive directed at an address that is already gone fails at once.
    let late = directed(&mut w, a, 4);
    assert_eq!(w.status(&late), Some(Status::PeerGone));
    assert_eq!(
        u64::from(w.comp(&late).data),
        0,
        "lost before the receive came"
    );
    // C closes its endpoint (EP_CLOSE): same.
    let mut cl = Request::new(Opcode::EpClose);
    cl.ep = c.ep;
    let h = w.submit(2, cl, &[], 0);
    assert_eq!(w.status(&h), Some(Status::Ok));
    assert_eq!(w.status(&from_c), Some(Status::PeerGone));
    // Closed by its own driver: an orderly close, told apart from a lost source.
    assert_eq!(u64::from(w.comp(&from_c).data), vfabric_proto::PEER_CLOSED);
    assert!(w.result(&any).is_none());
    // B last found C open (and remembers it): C's close must still be noticed at once.
    let late_c = directed(&mut w, c, 5);
    assert_eq!(w.status(&late_c), Some(Status::PeerGone));
    // Closed in order before this receive came (a watch posted late): still PEER_CLOSED.
    assert_eq!(u64::from(w.comp(&late_c).data), vfabric_proto::PEER_CLOSED);
    // The slot reused by a new endpoint: the old address is still closed, the new one open.
    let c2 = w.open(2, RDM);
    assert_eq!(c2.ep, c.ep);
    let late_c_again = directed(&mut w, c, 6);
    assert_eq!(w.status(&late_c_again), Some(Status::PeerGone));
    let from_c2 = directed(&mut w, c2, 7);
    assert!(w.result(&from_c2).is_none());
}

#[test]
fn a_remembered_live_source_is_rechecked_after_its_device_closes_an_endpoint() {
    let mut w = World::new(2, small_limits());
    let a = w.open(0, RDM);
    let a2 = w.open(0, RDM);
    let b = w.open(1, RDM);
    let directed =
        |w: &mut World, from: FabricAddr, cookie: u64| directed_recv(w, 1, b, from, cookie);
    // Two receives from A: the second is served by what the first found.
    let r1 = directed(&mut w, a, 1);
    let r2 = directed(&mut w, a, 2);
    assert!(w.result(&r1).is_none() && w.result(&r2).is_none());
    // Another endpoint of A's device closes: A is still open, and found so again.
    let mut cl = Request::new(Opcode::EpClose);
    cl.ep = a2.ep;
    let h = w.submit(0, cl, &[], 0);
    assert_eq!(w.status(&h), Some(Status::Ok));
    let r3 = directed(&mut w, a, 3);
    assert!(w.result(&r3).is_none());
    // A itself closes: everything directed at it fails, and so does a new one.
    let mut cl = Request::new(Opcode::EpClose);
    cl.ep = a.ep;
    let h = w.submit(0, cl, &[], 0);
    assert_eq!(w.status(&h), Some(Status::Ok));
    for r in [&r1, &r2, &r3] {
        assert_eq!(w.status(r), Some(Status::PeerGone));
    }
    let r4 = directed(&mut w, a, 4);
    assert_eq!(w.status(&r4), Some(Status::PeerGone));
}

#[test]
fn disconnect_cleans_up_and_peers_see_peer_gone() {
    let mut w = World::new(2, small_limits());
    let a = w.open(0, RDM);
    let a2 = w.open(0, RDM);
    let b = w.open(1, RDM);
    // A → B held (B will vanish): completes PeerGone.
    let s_ab = w.send(0, a, b, None, 0, 1, &pattern(1000, 1));
    // B → A eager: stays deliverable after B leaves.
    let eager = pattern(40, 2);
    w.send(1, b, a, None, 0, 2, &eager);
    // B → A2 held: leaves A2's queue with B.
    w.send(1, b, a2, None, 0, 3, &pattern(1000, 3));
    // B's posted receive: forgotten.
    let r_b = w.recv(1, b, Some((7, 0)), 0, 4, 0, 64);
    let b_used_before = w.guests[1].sink.count();

    let mut n = Notify::default();
    w.fabric.disconnect(1, &mut n);
    drop(n);
    assert_eq!(w.status(&s_ab), Some(Status::PeerGone));
    assert!(w.result(&r_b).is_none());
    assert_eq!(
        w.guests[1].sink.count(),
        b_used_before,
        "nothing is written to a disconnected guest"
    );
    let r = w.recv(0, a, None, 0, 5, 0, 64);
    assert_eq!(w.data(&r, 40), eager, "eager data survives its sender");
    let r2 = w.recv(0, a2, None, 0, 6, 0, 2000);
    assert!(w.result(&r2).is_none(), "held send left with its sender");
    let s = w.send(0, a, b, None, 0, 7, b"late");
    assert_eq!(w.status(&s), Some(Status::AddrNotAvail));
    assert_eq!(w.fabric.unexpected_bytes(1), 0);

    // The device comes back with a new frontend: old addresses stay invalid.
    let port = w.guests[1].port();
    w.fabric.connect(1, port);
    let b2 = w.open(1, RDM);
    assert_eq!(b2.ep, b.ep);
    assert_ne!(b2.generation, b.generation);
    let s = w.send(0, a, b, None, 0, 8, b"late");
    assert_eq!(w.status(&s), Some(Status::AddrNotAvail));
    let s = w.send(0, a, b2, None, 0, 9, b"fresh");
    assert_eq!(w.status(&s), Some(Status::Ok));
}

#[test]
fn reset_with_cancel_and_stop_queue() {
    let mut w = World::new(2, small_limits());
    let a = w.open(0, RDM);
    let b = w.open(1, RDM);
    let r = w.recv(1, b, None, 0, 1, 0, 64);
    let s = w.send(1, b, a, None, 0, 2, &pattern(1000, 1)); // held at A
    let mut n = Notify::default();
    w.fabric.stop_queue(1, 2, &mut n);
    n.flush();
    assert_eq!(w.status(&r), Some(Status::Canceled));
    assert!(w.result(&s).is_none(), "TX queue 1 not stopped");
    w.fabric.stop_queue(1, 1, &mut n);
    n.flush();
    assert_eq!(w.status(&s), Some(Status::Canceled));

    let s2 = w.send(0, a, b, None, 0, 3, &pattern(1000, 2)); // held at B
    let r2 = w.recv(1, b, Some((0, 0)), 0, 4, 0, 64);
    w.fabric.reset(1, Teardown::Cancel, &mut n);
    n.flush();
    assert_eq!(w.status(&r2), Some(Status::Canceled));
    assert_eq!(w.status(&s2), Some(Status::PeerGone));
    let s3 = w.send(0, a, b, None, 0, 5, b"x");
    assert_eq!(w.status(&s3), Some(Status::AddrNotAvail));
}

#[test]
fn self_send_on_one_device() {
    let mut w = World::new(1, Limits::default());
    let a = w.open(0, RDM);
    let b = w.open(0, RDM);
    let r = w.recv(0, b, None, 0, 1, 0, 64);
    let s = w.send(0, a, b, None, 0, 2, b"loop");
    assert_eq!(w.status(&s), Some(Status::Ok));
    assert_eq!(w.data(&r, 4), b"loop");
    // Sends to a device index that does not exist.
    let s = w.send(
        0,
        a,
        FabricAddr::new(FabricAddr::node_of(TEST_FABRIC, 1, 9), 0, 1),
        None,
        0,
        3,
        b"x",
    );
    assert_eq!(w.status(&s), Some(Status::AddrNotAvail));
    let s = w.send(
        0,
        a,
        FabricAddr::new(FabricAddr::node_of(TEST_FABRIC, 2, 0), 0, 1),
        None,
        0,
        3,
        b"x",
    );
    assert_eq!(w.status(&s), Some(Status::AddrNotAvail));
    // B's very address as another fabric numbers it: refused, and B receives nothing.
    let r = w.recv(0, b, None, 0, 4, 0, 8);
    let foreign = FabricAddr::node_of(TEST_FABRIC ^ 1, b.host(), b.device());
    let s = w.send(
        0,
        a,
        FabricAddr::new(foreign, b.ep, b.generation),
        None,
        0,
        5,
        b"x",
    );
    assert_eq!(w.status(&s), Some(Status::AddrNotAvail));
    assert_eq!(w.result(&r), None, "a foreign-fabric send reached B");
}

#[test]
fn empty_eager_messages_are_bounded_too() {
    let limits = Limits {
        max_unexpected_bytes: 10 * EAGER_OVERHEAD,
        ..Limits::default()
    };
    let mut w = World::new(2, limits);
    let a = w.open(0, RDM);
    let b = w.open(1, RDM);
    let sends: Vec<_> = (0..12).map(|i| w.send(0, a, b, None, 0, i, &[])).collect();
    let done = sends.iter().filter(|s| w.result(s).is_some()).count();
    assert_eq!(done, 10, "two empty sends are held for backpressure");
    for i in 0..12 {
        let r = w.recv(1, b, None, 0, 100 + i, 0, 8);
        let (c, used) = w.result(&r).unwrap();
        assert_eq!((u64::from(c.len), used), (0, 64));
    }
    assert!(sends.iter().all(|s| w.status(s) == Some(Status::Ok)));
    assert_eq!(w.fabric.unexpected_bytes(1), 0);
}

#[test]
fn commit_event_needs_a_full_record_area_and_is_cancelled_by_reset() {
    let limits = Limits::default();
    let full = vfabric_proto::commit_event_area_len(limits.max_sge);
    let mut w = World::new(1, limits);
    let r = Request::new(Opcode::CommitEvent);
    let short = w.submit(0, r, &[], full - 1);
    assert_eq!(w.status(&short), Some(Status::BadChain));
    let posted = w.submit(0, r, &[], full);
    assert!(w.result(&posted).is_none(), "waits for a commit event");
    let mut n = Notify::default();
    w.fabric.reset(0, Teardown::Cancel, &mut n);
    n.flush();
    assert_eq!(w.status(&posted), Some(Status::Canceled));
}

#[test]
fn commit_reply_for_no_waiting_event_is_invalid() {
    let mut w = World::new(2, Limits::default());
    for id in [0, 1, 2, u64::MAX] {
        let mut r = Request::new(Opcode::CommitReply);
        r.data = id;
        r.tag = 0;
        let h = w.submit(1, r, &[], 0);
        assert_eq!(w.status(&h), Some(Status::Invalid), "event {id}");
    }
    // Nothing waits, so the timer has nothing to expire.
    let mut n = Notify::default();
    assert_eq!(
        w.fabric.expire_commits(
            std::time::Instant::now() + std::time::Duration::from_secs(3600),
            &mut n
        ),
        0
    );
}

#[test]
fn commit_event_registration_flag_needs_pmem() {
    use vfabric_proto::mr_flags;
    let mut w = World::new(1, Limits::default());
    let mut r = Request::new(Opcode::MrReg);
    r.count = 1;
    r.compare = mr_flags::REMOTE_WRITE | mr_flags::PROV_KEY | mr_flags::COMMIT_EVENT;
    let seg = w.guests[0].alloc(64);
    let mut payload = seg.to_le_bytes().to_vec();
    payload.extend_from_slice(&64u64.to_le_bytes());
    let h = w.submit(0, r, &payload, 0);
    assert_eq!(w.status(&h), Some(Status::Invalid));
}

fn svc_bind(w: &mut World, dev: usize, ep: FabricAddr, svc: u64) -> (Status, u64) {
    let mut r = Request::new(Opcode::SvcBind);
    r.ep = ep.ep;
    r.data = svc;
    let h = w.submit(dev, r, &[], 0);
    (w.status(&h).unwrap(), u64::from(w.comp(&h).data))
}

fn svc_resolve(w: &mut World, dev: usize, host: u64, svc: u64) -> (Status, FabricAddr) {
    let mut r = Request::new(Opcode::SvcResolve);
    r.peer = FabricAddr::new(host, 0, 0);
    r.data = svc;
    let h = w.submit(dev, r, &[], 0);
    (
        w.status(&h).unwrap(),
        FabricAddr::from_wire(&w.comp(&h).src),
    )
}

#[test]
fn services_bind_resolve_and_release() {
    let mut w = World::new(2, Limits::default());
    let a = w.open(0, RDM);
    let b = w.open(1, RDM);
    let host = FabricAddr::node_of(TEST_FABRIC, a.host(), 0);
    assert_eq!(svc_bind(&mut w, 0, a, 9228), (Status::Ok, 9228));
    // Any device of the host resolves it, to the endpoint's full address.
    assert_eq!(svc_resolve(&mut w, 1, host, 9228), (Status::Ok, a));
    assert_eq!(svc_resolve(&mut w, 0, host | 7, 9228), (Status::Ok, a));
    // Taken by another endpoint; a second service for the same endpoint is refused.
    assert_eq!(svc_bind(&mut w, 1, b, 9228).0, Status::AddrInUse);
    assert_eq!(svc_bind(&mut w, 0, a, 9229).0, Status::Invalid);
    assert_eq!(svc_bind(&mut w, 0, a, 9228), (Status::Ok, 9228));
    // "Any service": an ephemeral one.
    let (s, eph) = svc_bind(&mut w, 1, b, 0);
    assert_eq!(s, Status::Ok);
    assert!(eph >= 49152, "{eph}");
    assert_eq!(svc_resolve(&mut w, 0, host, eph), (Status::Ok, b));
    // EP_CLOSE releases the service; another endpoint may take it.
    let mut cl = Request::new(Opcode::EpClose);
    cl.ep = a.ep;
    let h = w.submit(0, cl, &[], 0);
    assert_eq!(w.status(&h), Some(Status::Ok));
    assert_eq!(svc_resolve(&mut w, 1, host, 9228).0, Status::AddrNotAvail);
    let c = w.open(0, RDM);
    assert_eq!(svc_bind(&mut w, 0, c, 9228), (Status::Ok, 9228));
    // Device reset releases its endpoints' services.
    let mut n = Notify::default();
    w.fabric.reset(0, Teardown::Cancel, &mut n);
    drop(n);
    assert_eq!(svc_resolve(&mut w, 1, host, 9228).0, Status::AddrNotAvail);
    assert_eq!(svc_resolve(&mut w, 1, host, eph), (Status::Ok, b));
}

#[test]
fn services_refuse_bad_input() {
    let mut w = World::new(1, Limits::default());
    let a = w.open(0, RDM);
    let host = FabricAddr::node_of(TEST_FABRIC, a.host(), 0);
    // Service out of range, endpoint not open.
    assert_eq!(svc_bind(&mut w, 0, a, 65536).0, Status::Invalid);
    assert_eq!(svc_bind(&mut w, 0, a, u64::MAX).0, Status::Invalid);
    let ghost = FabricAddr::new(a.node, 77, 1);
    assert_eq!(svc_bind(&mut w, 0, ghost, 5).0, Status::BadEndpoint);
    // Resolve: service 0 or out of range, another fabric, another host that is no peer.
    assert_eq!(svc_resolve(&mut w, 0, host, 0).0, Status::Invalid);
    assert_eq!(svc_resolve(&mut w, 0, host, 70000).0, Status::Invalid);
    let other_fabric = FabricAddr::node_of(TEST_FABRIC + 1, a.host(), 0);
    assert_eq!(
        svc_resolve(&mut w, 0, other_fabric, 5).0,
        Status::AddrNotAvail
    );
    // Another host that is no uplink peer is no host of the fabric.
    let other_host = FabricAddr::node_of(TEST_FABRIC, a.host() + 2, 0);
    assert_eq!(
        svc_resolve(&mut w, 0, other_host, 5).0,
        Status::AddrNotAvail
    );
    assert_eq!(svc_resolve(&mut w, 0, host, 5).0, Status::AddrNotAvail);
}

/// A service of an uplink peer is asked of that peer: the request waits in the outbox for the
/// uplink (which completes it with the peer's answer), nothing completes it here.
#[test]
fn services_of_a_peer_host_go_to_the_uplink() {
    let mut w = World::new(1, Limits::default());
    let a = w.open(0, RDM);
    let peer = a.host() + 2;
    w.fabric.outbox.set_hosts([(peer, true)].into_iter());
    let mut r = Request::new(Opcode::SvcResolve);
    r.peer = FabricAddr::new(FabricAddr::node_of(TEST_FABRIC, peer, 0), 0, 0);
    r.data = 9228;
    let h = w.submit(0, r, &[], 0);
    assert_eq!(w.status(&h), None, "waits for the peer's answer");
    let out = w.fabric.outbox.take();
    assert_eq!(out.len(), 1);
    let Some(crate::uplink::remote::Outbound::SvcResolve(q)) = out.into_iter().next() else {
        panic!("not a service query");
    };
    assert_eq!((q.host, q.service, q.dev), (peer, 9228, 0));
    // The uplink's verdict completes it as a local lookup would.
    let found = FabricAddr::new(FabricAddr::node_of(TEST_FABRIC, peer, 1), 4, 2);
    let mut n = Notify::default();
    w.fabric
        .complete_svc_resolve(q.dev, &q.port, &q.req, Ok((found, RDM)), &mut n);
    drop(n);
    assert_eq!(w.status(&h), Some(Status::Ok));
    assert_eq!(FabricAddr::from_wire(&w.comp(&h).src), found);
}

/// A ring's first completion of a batch is published at once (staged and published in one
/// step); the ones after it are staged and published together by the flush.
#[test]
fn a_batch_publishes_a_rings_first_completion_at_once_and_the_rest_on_flush() {
    let w = World::new(2, Limits::default());
    let (a, b): (Arc<dyn CompletionSink>, Arc<dyn CompletionSink>) =
        (w.guests[0].sink.clone(), w.guests[1].sink.clone());
    let publishes = |g: usize| {
        w.guests[g]
            .sink
            .publishes
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let mut n = Notify::default();
    n.complete(&a, 1, 10, 64);
    n.complete(&b, 2, 20, 72);
    n.complete(&a, 1, 11, 0);
    n.complete(&a, 2, 12, 64);
    n.complete(&b, 2, 21, 64);
    n.complete(&a, 1, 13, 64);
    // Guest 0: the first of ring 1 and of ring 2; guest 1: the first of ring 2.
    assert_eq!((publishes(0), publishes(1)), (2, 1));
    assert_eq!(
        *w.guests[0].sink.used.lock().unwrap(),
        vec![(1, 10, 64), (2, 12, 64)]
    );
    assert_eq!(*w.guests[1].sink.used.lock().unwrap(), vec![(2, 20, 72)]);
    n.flush();
    // Ring 1 of guest 0 and ring 2 of guest 1 had more: one publish each.
    assert_eq!((publishes(0), publishes(1)), (3, 2));
    assert_eq!(
        *w.guests[0].sink.used.lock().unwrap(),
        vec![(1, 10, 64), (2, 12, 64), (1, 11, 0), (1, 13, 64)]
    );
    assert_eq!(
        *w.guests[1].sink.used.lock().unwrap(),
        vec![(2, 20, 72), (2, 21, 64)]
    );
    n.flush();
    assert_eq!(
        (publishes(0), publishes(1)),
        (3, 2),
        "nothing left to publish"
    );
    // A new batch publishes a ring's first completion at once again.
    n.complete(&a, 1, 14, 64);
    assert_eq!(publishes(0), 4);
}

/// Two threads' batches complete chains of one ring: the sender's pass places a message into
/// a posted receive (batch `a`), then the receiver's own pass matches the next message, which
/// had arrived unexpected, to its next receive (batch `b`), and `b` ends first. The ring must
/// still get them in completion order (a receive's CQ order is its used ring's order): before
/// completions were staged in their ring, `b` published its receive ahead of `a`'s (the
/// ordering tests of the driver saw message 16 before 15 now and then).
#[test]
fn completions_of_one_ring_from_two_batches_are_published_in_completion_order() {
    let w = World::new(1, Limits::default());
    let sink: Arc<dyn CompletionSink> = w.guests[0].sink.clone();
    let (mut a, mut b) = (Notify::default(), Notify::default());
    // Batch `a`'s first completion of the ring is published at once; 15 waits for its flush.
    a.complete(&sink, 2, 14, 64);
    a.complete(&sink, 2, 15, 64);
    b.complete(&sink, 2, 16, 64);
    b.complete(&sink, 2, 17, 64);
    b.flush();
    a.flush();
    assert_eq!(
        *w.guests[0].sink.used.lock().unwrap(),
        vec![(2, 14, 64), (2, 15, 64), (2, 16, 64), (2, 17, 64)]
    );
}

/// A message's path moves its receive into the posted queue and out of it: the queue holds
/// compact records (two cache lines at most, moved without a call of `memcpy`), not the
/// ≈280-byte parsed request.
#[test]
fn posted_queue_holds_compact_records() {
    fn element_size<T>(_: fn(&super::Endpoint) -> &std::collections::VecDeque<T>) -> usize {
        std::mem::size_of::<T>()
    }
    let size = element_size(|e| &e.posted);
    assert!(size <= 128, "a posted receive takes {size} bytes");
}

/// The completion the straight send stores word by word is the one `rx_completion` builds,
/// byte for byte: tagged or not, with and without remote CQ data, whole and truncated.
#[test]
fn message_completion_words_match_the_built_completion() {
    use super::{completion_bytes, msg_completion_words, rx_completion, Meta};
    use vfabric_proto::FabricAddr;
    use vm_memory::ByteValued;
    for tagged in [false, true] {
        for cq_data in [None, Some(0x0102_0304_0506_0708)] {
            for (len, placed) in [(8, 8), (64, 5), (0, 0)] {
                let m = Meta {
                    src: FabricAddr::new(0xaabb_ccdd_0011_2233, 0x4455_6677, 0x8899_aabb),
                    tagged,
                    tag: 0xfeed_f00d_1234_5678,
                    cq_data,
                    len,
                    rma_len: None,
                };
                let built = rx_completion(0xc00c_1e00_dead_beef, tagged, &m, placed);
                let (words, status) =
                    msg_completion_words(0xc00c_1e00_dead_beef, tagged, &m, placed);
                assert_eq!(
                    &completion_bytes(&words)[..],
                    built.as_slice(),
                    "{m:?} {placed}"
                );
                assert_eq!(status, u32::from(built.status));
            }
        }
    }
}

/// A plain send handed on as `Verdict::Send` (`op_send_plain`: the straight placement, else the
/// general path with the streams built) ends exactly as the same send handed on as a general
/// request: the same completions and used lengths of both chains, the same bytes placed, the
/// same counters and unexpected bytes, in every case the straight placement must leave to the
/// general path (no receive, one that does not match, a gone peer or source, a fence,
/// DELIVERY_COMPLETE, datagrams, a payload past the early read, none) and those it takes (a
/// receive at the front that matches, truncated, tagged, directed, with CQ data, a loopback).
#[test]
fn plain_sends_end_as_general_sends() {
    type Case = fn(&mut World) -> Vec<H>;
    fn pair(w: &mut World, kind: u64) -> (FabricAddr, FabricAddr) {
        (w.open(0, kind), w.open(1, kind))
    }
    let cases: Vec<(&str, Case)> = vec![
        ("straight", |w| {
            let (a, b) = pair(w, RDM);
            let r = w.recv(1, b, None, 0, 1, 0, 64);
            vec![r, w.send(0, a, b, None, 0, 2, b"8 bytes!")]
        }),
        ("tagged", |w| {
            let (a, b) = pair(w, RDM);
            let r = w.recv(1, b, Some((5, 0)), 0, 1, 0, 64);
            vec![r, w.send(0, a, b, Some(5), 0, 2, b"tagged")]
        }),
        ("truncated", |w| {
            let (a, b) = pair(w, RDM);
            let r = w.recv(1, b, None, 0, 1, 0, 4);
            vec![r, w.send(0, a, b, None, 0, 2, b"8 bytes!")]
        }),
        ("no room", |w| {
            let (a, b) = pair(w, RDM);
            let r = w.recv(1, b, None, 0, 1, 0, 0);
            vec![r, w.send(0, a, b, None, 0, 2, b"8 bytes!")]
        }),
        ("unexpected", |w| {
            let (a, b) = pair(w, RDM);
            let s = w.send(0, a, b, None, 0, 2, b"8 bytes!");
            vec![s, w.recv(1, b, None, 0, 1, 0, 64)]
        }),
        ("not matching", |w| {
            let (a, b) = pair(w, RDM);
            let r = w.recv(1, b, Some((6, 0)), 0, 1, 0, 64);
            let s = w.send(0, a, b, Some(5), 0, 2, b"tag5");
            vec![r, s, w.recv(1, b, Some((5, 0)), 0, 3, 0, 64)]
        }),
        ("directed elsewhere", |w| {
            let (a, b) = pair(w, RDM);
            let c = w.open(2, RDM);
            let r = directed_recv(w, 1, b, c, 1);
            let s = w.send(0, a, b, None, 0, 2, b"from a");
            vec![r, s, directed_recv(w, 1, b, a, 3)]
        }),
        ("directed here", |w| {
            let (a, b) = pair(w, RDM);
            let r = directed_recv(w, 1, b, a, 1);
            vec![r, w.send(0, a, b, None, 0, 2, b"from a")]
        }),
        ("peer gone", |w| {
            let (a, b) = pair(w, RDM);
            let r = w.recv(1, b, None, 0, 1, 0, 64);
            let gone = FabricAddr::new(b.node, b.ep, b.generation.wrapping_add(1));
            vec![r, w.send(0, a, gone, None, 0, 2, b"8 bytes!")]
        }),
        ("no such peer endpoint", |w| {
            let (a, b) = pair(w, RDM);
            let none = FabricAddr::new(b.node, 40, b.generation);
            vec![w.send(0, a, none, None, 0, 2, b"8 bytes!")]
        }),
        ("source not open", |w| {
            let (_, b) = pair(w, RDM);
            let r = w.recv(1, b, None, 0, 1, 0, 64);
            let not_open = FabricAddr::new(b.node, 40, 1);
            vec![r, w.send(0, not_open, b, None, 0, 2, b"8 bytes!")]
        }),
        ("fence", |w| {
            let (a, b) = pair(w, RDM);
            let r = w.recv(1, b, None, 0, 1, 0, 64);
            vec![r, w.send(0, a, b, None, flags::FENCE, 2, b"8 bytes!")]
        }),
        ("delivery complete", |w| {
            let (a, b) = pair(w, RDM);
            let r = w.recv(1, b, None, 0, 1, 0, 64);
            let dc = flags::DELIVERY_COMPLETE;
            vec![r, w.send(0, a, b, None, dc, 2, b"8 bytes!")]
        }),
        ("remote cq data", |w| {
            let (a, b) = pair(w, RDM);
            let r = w.recv(1, b, None, 0, 1, 0, 64);
            let mut s = Request::new(Opcode::Send);
            s.ep = a.ep;
            s.peer = b;
            s.flags = flags::REMOTE_CQ_DATA;
            s.data = 0xdada;
            s.cookie = 2;
            vec![r, w.submit(0, s, b"cq data", 0)]
        }),
        ("dgram", |w| {
            let (a, b) = pair(w, ep_open::TYPE_DGRAM);
            let r = w.recv(1, b, None, 0, 1, 0, 64);
            vec![r, w.send(0, a, b, None, 0, 2, b"8 bytes!")]
        }),
        ("dgram without receive", |w| {
            let (a, b) = pair(w, ep_open::TYPE_DGRAM);
            vec![w.send(0, a, b, None, 0, 2, b"8 bytes!")]
        }),
        ("kinds differ", |w| {
            let a = w.open(0, RDM);
            let b = w.open(1, ep_open::TYPE_DGRAM);
            let r = w.recv(1, b, None, 0, 1, 0, 64);
            vec![r, w.send(0, a, b, None, 0, 2, b"8 bytes!")]
        }),
        ("past the early read", |w| {
            let (a, b) = pair(w, RDM);
            let r = w.recv(1, b, None, 0, 1, 0, 200);
            vec![r, w.send(0, a, b, None, 0, 2, &pattern(100, 4))]
        }),
        ("empty", |w| {
            let (a, b) = pair(w, RDM);
            let r = w.recv(1, b, None, 0, 1, 0, 64);
            vec![r, w.send(0, a, b, None, 0, 2, b"")]
        }),
        ("loopback", |w| {
            let a = w.open(0, RDM);
            let b = w.open(0, RDM);
            let r = w.recv(0, b, None, 0, 1, 0, 64);
            vec![r, w.send(0, a, b, None, 0, 2, b"8 bytes!")]
        }),
    ];
    for (name, case) in cases {
        let mut ends = Vec::new();
        for plain in [false, true] {
            let mut w = World::new(3, Limits::default());
            w.resolve = true;
            w.plain_sends = plain;
            let hs = case(&mut w);
            let chains: Vec<_> = hs.iter().map(|h| (w.result(h), w.data(h, 64))).collect();
            let counters: Vec<_> = (0..3)
                .map(|d| {
                    let c = w.fabric.counters(d).unwrap();
                    let get = |a: &std::sync::atomic::AtomicU64| {
                        a.load(std::sync::atomic::Ordering::Relaxed)
                    };
                    (
                        get(&c.messages_sent),
                        get(&c.messages_received),
                        get(&c.bytes_copied),
                        get(&c.dgram_drops),
                        w.fabric.unexpected_bytes(d),
                    )
                })
                .collect();
            ends.push((chains, counters));
        }
        assert_eq!(ends[0], ends[1], "{name}");
    }
}
