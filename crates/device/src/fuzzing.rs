// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Entry points of the device's fuzz targets (`crates/device/fuzz`, `scripts/fuzz.sh`), also run
//! on a bounded set of pseudo-random inputs by the unit tests so they cannot rot.
//!
//! Both drive the real backend (`FabricBackend` as vhost-user-backend drives it: the same trait
//! calls, the same `Vring`s), the chain walker, the request parser and the fabric; nothing
//! is mocked. Every input must leave the device without a panic, with used rings that only ever
//! advance by chains that were made available, and (when the guest broke a rule) with the guest
//! marked broken rather than anything else going wrong.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vfabric_proto::{bit, Opcode, Request, VIRTIO_FABRIC_F_MSG, VIRTIO_F_VERSION_1};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

use crate::backend::FabricBackend;
use crate::chain::GuestMemoryMmap;
use crate::config::{Config, Limits};
use crate::fabric::Fabric;
use crate::poller::Poller;
use crate::ring::Vring;
use crate::stats::DeviceStats;

/// Guest memory of the chain-image target (the input is copied to its start).
const IMAGE_BYTES: usize = 64 << 10;
/// Queue size used by both targets unless the session changes it.
const QSIZE: u16 = 16;
/// Queues of a one-queue-pair device: control, TX, RX.
const NQ: usize = 3;
/// Ring layout of the chain-image target: queue `q` at `q * RING_STRIDE` (descriptor table,
/// then the available ring at +0x100, the used ring at +0x200).
const RING_STRIDE: u64 = 0x1000;

/// Reads fuzz input as a stream of small integers (zeros once it runs out).
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes(&mut self, n: usize) -> &[u8] {
        let k = n.min(self.0.len());
        let (a, b) = self.0.split_at(k);
        self.0 = b;
        a
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | u16::from(self.u8()) << 8
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One device of a one-device fabric, without a socket: what the vhost-user handler would hold.
struct Device {
    backend: Arc<FabricBackend>,
    fabric: Arc<Fabric>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    vrings: Vec<Vring>,
}

impl Device {
    fn new(mem: GuestMemoryMmap) -> Self {
        let limits = Limits {
            num_queue_pairs: 1,
            max_queue_size: 256,
            ..Limits::default()
        };
        let mut c = Config::new(vec![PathBuf::from("/fuzz0")]);
        c.limits = limits;
        let fabric = Arc::new(Fabric::new(&c));
        let mem = GuestMemoryAtomic::new(mem);
        // No poller thread: every kick is served inline, as with `--poll-us 0`.
        let backend = FabricBackend::new(
            0,
            fabric.clone(),
            Poller::new(Duration::ZERO),
            mem.clone(),
            // No socket: process-memory registrations are refused (no peer process to reach).
            None,
        )
        .expect("backend");
        fabric.connect(0, backend.port());
        let vrings = (0..NQ)
            .map(|_| Vring::new(mem.clone(), 256).expect("vring"))
            .collect();
        Self {
            backend,
            fabric,
            mem,
            vrings,
        }
    }

    fn set_ring(&self, q: usize, size: u16, desc: u64, avail: u64, used: u64) {
        let v = &self.vrings[q];
        v.set_queue_size(size);
        // An address outside guest memory is refused here, as the handler refuses it.
        let _ = v.set_queue_info(desc, avail, used);
        v.set_queue_ready(true);
        v.set_enabled(true);
    }

    fn kick(&self, q: usize) {
        let _ = self
            .backend
            .handle_event(q as u16, EventSet::IN, &self.vrings, 0);
    }

    /// The 16-bit index at `ring + 2` of each ring (`idx` of an avail or used ring).
    fn ring_indices(&self, rings: impl Iterator<Item = u64>) -> Vec<u16> {
        rings
            .map(|r| {
                self.mem
                    .memory()
                    .read_obj::<u16>(GuestAddress(r + 2))
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Stop every ring, drop the guest; what the device counted on the way.
    fn teardown(self) -> DeviceStats {
        let stats = self
            .fabric
            .counters(0)
            .expect("device 0")
            .snapshot(PathBuf::new(), 0);
        for q in 0..NQ as u32 {
            let _ = self.backend.stop_vring(q);
        }
        self.backend.retire();
        let mut n = crate::fabric::Notify::default();
        self.fabric.disconnect(0, &mut n);
        n.flush();
        stats
    }
}

/// Chain-image target: the input is the guest's memory (descriptor tables, available rings,
/// request headers and data all at once), three queues at fixed places in it; the device is
/// kicked on every queue a few times. Exercises the chain walker (direct and indirect
/// descriptors, loops, lengths, addresses), the header parser and the fabric on whatever the
/// bytes say.
pub fn chain_image(data: &[u8]) -> DeviceStats {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), IMAGE_BYTES)]).expect("memory");
    let n = data.len().min(IMAGE_BYTES);
    mem.write_slice(&data[..n], GuestAddress(0)).expect("image");
    let d = Device::new(mem);
    let acked = bit(VIRTIO_F_VERSION_1) | d.backend.features();
    d.backend.acked_features(acked);
    for q in 0..NQ {
        let base = q as u64 * RING_STRIDE;
        d.set_ring(q, QSIZE, base, base + 0x100, base + 0x200);
    }
    let used_ring = |q: usize| q as u64 * RING_STRIDE + 0x200;
    let avail_before = d.ring_indices((0..NQ).map(|q| q as u64 * RING_STRIDE + 0x100));
    let used_before = d.ring_indices((0..NQ).map(used_ring));
    for _round in 0..3 {
        for q in 0..NQ {
            d.kick(q);
        }
    }
    // The device consumed at most what was made available (the guest may rewrite its avail
    // index, but only by the image, which is written once before the first kick).
    let used_after = d.ring_indices((0..NQ).map(used_ring));
    for (q, (after, before)) in used_after.iter().zip(&used_before).enumerate() {
        let advanced = after.wrapping_sub(*before);
        let offered = avail_before[q].wrapping_sub(*before);
        assert!(
            advanced <= offered || d.backend.is_broken(),
            "queue {q}: used advanced {advanced} of {offered} available"
        );
    }
    d.teardown()
}

/// Creates an anonymous memfd of `len` bytes, sealed against shrinking unless `unsealed`.
fn memfd(len: usize, unsealed: bool) -> Option<File> {
    // SAFETY: the name is a NUL-terminated literal; the fd returned is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"vfabric-fuzz".as_ptr(), libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len as u64).ok()?;
    if !unsealed {
        // SAFETY: fcntl on a descriptor we own; no memory is passed.
        unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    }
    Some(f)
}

/// Session target: the input is a sequence of the calls a vhost-user frontend's messages turn
/// into (feature negotiation, memory tables with any layout, ring sizes and addresses, enable,
/// kicks, GET_VRING_BASE stops, resets, config reads and writes), interleaved with guest writes
/// to its memory and with well-formed requests on the rings, so that the fuzzer reaches the
/// fabric with chains that parse as well as with ones that do not.
pub fn session(data: &[u8]) -> DeviceStats {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
    let d = Device::new(mem);
    // Per queue: (size, desc, avail, used, next avail index) as the fuzzed frontend set them.
    let mut rings: Vec<(u16, u64, u64, u64, u16)> = (0..NQ)
        .map(|q| {
            let base = q as u64 * RING_STRIDE;
            (QSIZE, base, base + 0x100, base + 0x200, 0)
        })
        .collect();
    d.backend
        .acked_features(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_FABRIC_F_MSG));
    for (q, r) in rings.iter().enumerate() {
        d.set_ring(q, r.0, r.1, r.2, r.3);
    }
    let mut input = Input(data);
    let mut steps = 0;
    while !input.is_empty() && steps < 256 {
        steps += 1;
        match input.u8() % 13 {
            0 => {
                let f = input.u64();
                d.backend.acked_features(f & d.backend.features());
            }
            1 => d.backend.set_event_idx(input.u8() & 1 == 1),
            2 => {
                // SET_MEM_TABLE: up to three regions anywhere, some file-backed (sealed or not).
                let count = 1 + usize::from(input.u8() % 3);
                let mut regions = Vec::new();
                for _ in 0..count {
                    let gpa = u64::from(input.u16()) << 12;
                    let len = (1 + usize::from(input.u8() % 64)) << 12;
                    let kind = input.u8() % 3;
                    let file = match kind {
                        0 => None,
                        k => memfd(len, k == 2).map(|f| FileOffset::new(f, 0)),
                    };
                    regions.push((GuestAddress(gpa), len, file));
                }
                // Overlapping tables are refused by vm-memory (and by the handler) before the
                // backend sees them.
                if let Ok(m) = GuestMemoryMmap::from_ranges_with_files(regions) {
                    d.mem.lock().expect("memory lock").replace(m);
                    let _ = d.backend.update_memory(d.mem.clone());
                }
            }
            3 => {
                let q = usize::from(input.u8()) % NQ;
                let size = 1u16 << (input.u8() % 9);
                let (desc, avail, used) = (
                    u64::from(input.u32()),
                    u64::from(input.u32()),
                    u64::from(input.u32()),
                );
                rings[q] = (size, desc, avail, used, 0);
                d.set_ring(q, size, desc, avail, used);
            }
            4 => {
                let q = usize::from(input.u8()) % NQ;
                d.vrings[q].set_enabled(input.u8() & 1 == 1);
            }
            5 => {
                let addr = u64::from(input.u32());
                let len = usize::from(input.u8() % 64);
                let bytes = input.bytes(len).to_vec();
                let _ = d.mem.memory().write_slice(&bytes, GuestAddress(addr));
            }
            6 | 7 => d.kick(usize::from(input.u8()) % NQ),
            8 => {
                let q = usize::from(input.u8()) % NQ;
                let _ = d.backend.stop_vring(q as u32);
                rings[q].4 = 0;
                let (size, desc, avail, used, _) = rings[q];
                d.vrings[q].set_queue_ready(false);
                d.set_ring(q, size, desc, avail, used);
            }
            9 => {
                d.backend.reset_device();
                d.backend
                    .acked_features(bit(VIRTIO_F_VERSION_1) | d.backend.features());
            }
            10 => {
                let (off, size) = (input.u32(), input.u32() % 512);
                let _ = d.backend.get_config(off, size);
                let buf = input.bytes(8).to_vec();
                let _ = d.backend.set_config(off, &buf);
            }
            _ => {
                let q = usize::from(input.u8()) % NQ;
                post_request(&d, &mut rings[q], &mut input);
                d.kick(q);
            }
        }
    }
    d.teardown()
}

/// Opcodes a well-formed request may carry (any queue: the device checks the queue class).
const OPCODES: &[Opcode] = &[
    Opcode::EpOpen,
    Opcode::EpClose,
    Opcode::QueryCaps,
    Opcode::AddrCheck,
    Opcode::SvcBind,
    Opcode::SvcResolve,
    Opcode::Cancel,
    Opcode::MrReg,
    Opcode::MrDereg,
    Opcode::Send,
    Opcode::TSend,
    Opcode::Recv,
    Opcode::TRecv,
    Opcode::RmaWrite,
    Opcode::RmaRead,
    Opcode::Atomic,
    Opcode::FetchAtomic,
    Opcode::CompareAtomic,
];

/// Put one request chain on a ring the way a driver would (header, optional payload, optional
/// data area, completion), with fuzzed fields, buffer places and descriptor flags.
fn post_request(d: &Device, ring: &mut (u16, u64, u64, u64, u16), input: &mut Input) {
    let (size, desc, avail, _used, next) = *ring;
    let mem = d.mem.memory();
    let mut r = Request::new(OPCODES[usize::from(input.u8()) % OPCODES.len()]);
    r.ep = u32::from(input.u8() % 4);
    r.flags = u64::from(input.u16());
    r.cookie = input.u64();
    r.tag = input.u64();
    r.data = input.u64();
    r.ignore = input.u64() & 0xff;
    r.remote_key = u64::from(input.u8() % 4);
    r.remote_addr = 0x8_0000 + u64::from(input.u16());
    r.atomic_op = input.u8() % 20;
    r.datatype = input.u8() % 16;
    r.count = u32::from(input.u8() % 8);
    // Peers: this device's own endpoints (the fabric id is random, so take the node from the
    // device) or garbage.
    let node = if input.u8() & 1 == 0 {
        d.fabric.node_addr(0)
    } else {
        input.u64()
    };
    r.peer = vfabric_proto::FabricAddr::new(node, u32::from(input.u8() % 4), 1);
    // Buffers in the second half of the first megabyte (rings live below it by default).
    let base = 0x8_0000 + (u64::from(input.u16()) << 3);
    let header = r.to_header();
    let _ = mem.write_obj(header, GuestAddress(base));
    let payload_len = u32::from(input.u8());
    let data_len = u32::from(input.u16() % 4096);
    let mut descs: Vec<(u64, u32, u16)> = vec![(base, 96, 0)];
    if payload_len > 0 {
        let p = input.bytes(payload_len as usize).to_vec();
        let _ = mem.write_slice(&p, GuestAddress(base + 0x100));
        descs.push((base + 0x100, payload_len, 0));
    }
    if data_len > 0 {
        descs.push((base + 0x1000, data_len, VRING_DESC_F_WRITE as u16));
    }
    descs.push((base + 0x3000, 64, VRING_DESC_F_WRITE as u16));
    // Now and then a flag is flipped, to mix shapes the device must refuse.
    let twist = input.u8();
    if twist & 0xf0 == 0xf0 {
        let i = usize::from(twist & 0x3) % descs.len();
        descs[i].2 ^= [
            VRING_DESC_F_WRITE as u16,
            VRING_DESC_F_INDIRECT as u16,
            VRING_DESC_F_NEXT as u16,
            0,
        ][usize::from(twist >> 2 & 3)];
    }
    if size == 0 {
        return;
    }
    // `next` is this ring's descriptor cursor; the avail index is read back from the ring.
    let head = next % size;
    for (i, (addr, len, flags)) in descs.iter().enumerate() {
        let idx = (head + i as u16) % size;
        let last = i + 1 == descs.len();
        let flags = if last {
            *flags
        } else {
            *flags | VRING_DESC_F_NEXT as u16
        };
        let next_idx = (idx + 1) % size;
        let at = desc.wrapping_add(16 * u64::from(idx));
        let _ = mem.write_obj(*addr, GuestAddress(at));
        let _ = mem.write_obj(*len, GuestAddress(at.wrapping_add(8)));
        let _ = mem.write_obj(flags, GuestAddress(at.wrapping_add(12)));
        let _ = mem.write_obj(next_idx, GuestAddress(at.wrapping_add(14)));
    }
    let Ok(idx) = mem.read_obj::<u16>(GuestAddress(avail.wrapping_add(2))) else {
        return;
    };
    let slot = avail.wrapping_add(4 + 2 * u64::from(idx % size));
    let _ = mem.write_obj(head, GuestAddress(slot));
    let _ = mem.write_obj(idx.wrapping_add(1), GuestAddress(avail.wrapping_add(2)));
    ring.4 = next.wrapping_add(descs.len() as u16);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator: the unit tests feed the fuzz entry points a bounded
    /// number of inputs so they are exercised (and kept compiling) on every CI run.
    fn inputs(seed: u64, count: usize, max_len: usize) -> impl Iterator<Item = Vec<u8>> {
        let mut x = seed | 1;
        (0..count).map(move |_| {
            let mut next = || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let len = (next() as usize) % max_len;
            (0..len).map(|_| next() as u8).collect()
        })
    }

    /// Totals over many runs: (error completions, messages sent, ring errors + bad chains).
    fn reached(stats: impl Iterator<Item = DeviceStats>) -> (u64, u64, u64) {
        stats.fold((0, 0, 0), |(e, m, r), s| {
            (
                e + s.error_completions.iter().map(|(_, n)| n).sum::<u64>(),
                m + s.messages_sent,
                r + s.ring_errors + s.bad_chains,
            )
        })
    }

    #[test]
    fn chain_images_never_break_the_device() {
        let (errors, _, broken) = reached(inputs(0x5eed, 300, 4096).map(|d| chain_image(&d)));
        // Random images mostly break ring rules; the walker must have seen them.
        assert!(broken > 0, "no chain image reached the walker");
        let _ = errors;
    }

    #[test]
    fn fuzzed_sessions_never_break_the_device() {
        let (errors, sent, broken) = reached(inputs(0xfab, 300, 2048).map(|d| session(&d)));
        // The generated requests reach the fabric: some complete in error, some send.
        assert!(errors > 0, "no fuzzed request reached the fabric");
        println!("error completions {errors}, messages sent {sent}, ring errors {broken}");
    }
}
