// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Persistent memory on the fabric (spec §6.17): persistent registrations, persisting the
//! targets of COMMIT_COMPLETE writes and atomics, and FLUSH (FI_SAVE, the commit operation).
//!
//! The device places every RMA write and atomic before completing it, so data is globally
//! visible once its request completes: a FLUSH at DELIVERY_COMPLETE has nothing left to do but
//! its checks. Durability is pmem2's persist function over the named ranges of the region's
//! file ([`crate::pmem::PmemFile::persist`]); it writes back whatever the file holds in the
//! range, so persisting a range covers this endpoint's earlier writes (SAVE) and everybody
//! else's (no SAVE) alike.

use smallvec::SmallVec;
use tracing::debug;
use vfabric_proto::{
    flags, mr_flags, ByteValued, RmaIov, Status, RMA_IOV_LEN, VIRTIO_FABRIC_F_REMOTE_CQ_DATA,
};
use vm_memory::GuestAddressSpace;

use super::rma::{MrAccess, Target};
use super::{eager_cost, Fabric, Meta, Notify, Port};
use crate::chain::{completion, Req, Segs};
use crate::pmem::PmemFile;
use crate::xmem::PeerProcess;

/// Persistent regions per device: each holds a descriptor (and a mapping) of the daemon, so a
/// guest must not be able to exhaust the daemon's descriptors with them (`max_mrs` is larger).
pub(super) const MAX_PMEM_REGIONS: usize = 64;

/// Persistent regions of the locked device `d`.
pub(super) fn pmem_regions(d: &super::Dev) -> usize {
    d.mrs.values().filter(|m| m.pmem.is_some()).count()
}

/// The file of a persistent registration of `segs` (one segment of frontend addresses): the
/// frontend's descriptor `fd`, which must map the segment `MAP_SHARED` from `file_offset`.
pub(super) fn open_region(
    process: &PeerProcess,
    segs: &Segs,
    fd: u64,
    file_offset: u64,
) -> Result<PmemFile, String> {
    let pid = process.pid()?;
    let file = process.file_of(fd)?;
    let (Some(first), Some(last)) = (segs.segs.first(), segs.segs.last()) else {
        return Err("no segment".into());
    };
    // The registration is one contiguous range (split into pieces of at most 1 GiB).
    let addr = first.addr;
    if last.addr + u64::from(last.len) - addr != segs.len {
        return Err("not one contiguous range".into());
    }
    crate::pmem::check_mapping(pid, addr, segs.len, &file, file_offset)?;
    PmemFile::open(file, file_offset, segs.len)
}

impl Fabric {
    /// Persist every target of device `ddev` (all persistent: checked by the caller), counting
    /// the ranges persisted in `ddev`'s statistics. `Fault` when a file no longer covers its range.
    pub(super) fn persist_targets(&self, ddev: usize, targets: &[Target]) -> Status {
        for t in targets {
            let Some(p) = &t.mr.pmem else {
                return Status::Access;
            };
            let Some(_access) = t.mr.enter() else {
                return Status::Access;
            };
            if t.len == 0 {
                continue;
            }
            if let Err(why) = p.persist(t.off, t.len) {
                debug!(ddev, key = t.key, %why, "persist failed");
                return Status::Fault;
            }
            if let Some(c) = self.counters.get(ddev) {
                crate::stats::Counters::inc(&c.persisted_ranges);
                crate::stats::Counters::add(&c.persisted_bytes, t.len);
            }
        }
        Status::Ok
    }

    /// FLUSH: bring remote ranges to the request's completion level (§6.17).
    pub(super) fn op_flush(&self, dev: usize, port: &Port, req: Req, n: &mut Notify) {
        let (me, ddev, dep) = match self.rma_peer(dev, &req) {
            Ok(x) => x,
            Err(s) => return self.fail(dev, port, &req, s, n),
        };
        let r = req.req;
        let mut ranges: SmallVec<[(u64, u64, u64); 2]> = SmallVec::new();
        if r.count == 0 {
            // The whole region.
            if r.remote_addr != 0 {
                return self.fail(dev, port, &req, Status::Invalid, n);
            }
            let whole = self
                .dev(ddev)
                .mrs
                .get(&r.remote_key)
                .map(|m| (m.base(), m.len()));
            let Some((base, len)) = whole else {
                return self.fail(dev, port, &req, Status::Access, n);
            };
            ranges.push((base, len, r.remote_key));
        } else {
            let mem = port.mem.memory();
            for i in 0..u64::from(r.count) {
                let mut e = RmaIov::default();
                if req
                    .payload
                    .read_at(&mem, i * RMA_IOV_LEN as u64, e.as_mut_slice())
                    .is_err()
                {
                    return self.fail(dev, port, &req, Status::Fault, n);
                }
                ranges.push((e.addr.into(), e.len.into(), e.key.into()));
            }
        }
        let (targets, dport) = match self.targets_of(
            ddev,
            dep,
            r.peer.generation,
            &ranges,
            mr_flags::REMOTE_WRITE,
        ) {
            Ok(x) => x,
            Err(s) => {
                debug!(dev, ddev, ?s, "flush refused");
                return self.fail(dev, port, &req, s, n);
            }
        };
        let commit = r.flags & flags::COMMIT_COMPLETE != 0;
        if commit && targets.iter().any(|t| t.mr.pmem.is_none()) {
            return self.fail(dev, port, &req, Status::Access, n);
        }
        // Every range must still be registered (a deregistered one fails the flush).
        let held: Option<SmallVec<[MrAccess; 2]>> = targets.iter().map(|t| t.mr.enter()).collect();
        if held.is_none() {
            return self.fail(dev, port, &req, Status::Access, n);
        }
        drop(held);
        let meta = Meta {
            src: me,
            tagged: false,
            tag: 0,
            cq_data: Some(r.data),
            len: 0,
            rma_len: Some(0),
        };
        let mut notify = false;
        if r.flags & flags::REMOTE_CQ_DATA != 0 {
            let mut d = self.dev(ddev);
            if d.acked & vfabric_proto::bit(VIRTIO_FABRIC_F_REMOTE_CQ_DATA) != 0 {
                if !self.reserve_notification(&mut d, dep, &meta) {
                    drop(d);
                    return self.fail(dev, port, &req, Status::NoResources, n);
                }
                notify = true;
            }
        }
        let status = if commit {
            self.persist_targets(ddev, &targets)
        } else {
            Status::Ok
        };
        if status != Status::Ok {
            if notify {
                self.dev(ddev).unexpected_bytes -= eager_cost(0);
            }
            return self.fail(dev, port, &req, status, n);
        }
        if notify {
            self.notify_write(dev, ddev, dep, &dport, meta, n);
        }
        // A region with a commit handler: the verdict is the target driver's (§6.17.3).
        if commit && targets.iter().any(|t| t.mr.commit_event) {
            return self.start_commit(dev, port, req, me, ddev, dep, &targets, n);
        }
        self.done(dev, port, &req, &completion(Status::Ok, r.cookie), 0, n);
    }
}
