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
    flags, mr_flags, ByteValued, FabricAddr, RmaIov, Status, RMA_IOV_LEN,
    VIRTIO_FABRIC_F_REMOTE_CQ_DATA,
};
use vm_memory::GuestAddressSpace;

use super::commit::CommitOrigin;
use super::rma::{MrAccess, Target, Targets};
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
            // Another host's endpoint: its daemon runs the same checks (remote.rs).
            Err(Status::Unsupported) => return self.flush_remote(dev, port, req, n),
            Err(s) => return self.fail(dev, port, &req, s, n),
        };
        let r = req.req;
        let mut ranges: SmallVec<[(u64, u64, u64); 2]> = SmallVec::new();
        if r.count == 0 {
            // The whole region.
            if r.remote_addr != 0 {
                return self.fail(dev, port, &req, Status::Invalid, n);
            }
            let Some(whole) = self.whole_region(ddev, r.remote_key) else {
                return self.fail(dev, port, &req, Status::Access, n);
            };
            ranges.push(whole);
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
        let commit = r.flags & flags::COMMIT_COMPLETE != 0;
        let cq_data = (r.flags & flags::REMOTE_CQ_DATA != 0).then_some(r.data);
        let at = FlushAt {
            src_dev: dev,
            src: me,
            ddev,
            dep,
            gen: r.peer.generation,
        };
        let targets = match self.flush_at(&at, &ranges, commit, cq_data, n) {
            Ok(t) => t,
            Err(s) => return self.fail(dev, port, &req, s, n),
        };
        // A region with a commit handler: the verdict is the target driver's (§6.17.3).
        if commit && targets.iter().any(|t| t.mr.commit_event) {
            let origin = CommitOrigin::Local {
                src_dev: dev,
                src_port: port.clone(),
                req: Box::new(req),
            };
            return self.start_commit(origin, &at, r.flags, cq_data, &targets, n);
        }
        self.done(dev, port, &req, &completion(Status::Ok, r.cookie), 0, n);
    }

    /// The range (address, length, key) of the whole region `key` of `ddev`.
    pub(super) fn whole_region(&self, ddev: usize, key: u64) -> Option<(u64, u64, u64)> {
        self.dev(ddev)
            .mrs
            .get(&key)
            .map(|m| (m.base(), m.len(), key))
    }

    /// The checks and work of a FLUSH at its target, for a local initiator or another host's
    /// (§6.17): resolve `ranges` with remote write access, refuse non-persistent regions at
    /// COMMIT_COMPLETE, persist, and notify the target of `cq_data`. Returns the targets (a
    /// caller hands a commit to handled regions on to [`Fabric::start_commit`]).
    pub(super) fn flush_at(
        &self,
        at: &FlushAt,
        ranges: &[(u64, u64, u64)],
        commit: bool,
        cq_data: Option<u64>,
        n: &mut Notify,
    ) -> Result<Targets, Status> {
        let FlushAt {
            src_dev,
            src,
            ddev,
            dep,
            gen,
        } = *at;
        let (targets, dport) = self
            .targets_of(ddev, dep, gen, ranges, mr_flags::REMOTE_WRITE)
            .inspect_err(|s| debug!(src_dev, ddev, ?s, "flush refused"))?;
        if commit && targets.iter().any(|t| t.mr.pmem.is_none()) {
            return Err(Status::Access);
        }
        // Every range must still be registered (a deregistered one fails the flush).
        let held: Option<SmallVec<[MrAccess; 2]>> = targets.iter().map(|t| t.mr.enter()).collect();
        if held.is_none() {
            return Err(Status::Access);
        }
        drop(held);
        let meta = Meta {
            src,
            tagged: false,
            tag: 0,
            cq_data,
            len: 0,
            rma_len: Some(0),
        };
        let mut notify = false;
        if cq_data.is_some() {
            let mut d = self.dev(ddev);
            if d.acked & vfabric_proto::bit(VIRTIO_FABRIC_F_REMOTE_CQ_DATA) != 0 {
                if !self.reserve_notification(&mut d, dep, &meta) {
                    return Err(Status::NoResources);
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
            return Err(status);
        }
        if notify {
            self.notify_write(src_dev, ddev, dep, &dport, meta, n);
        }
        Ok(targets)
    }
}

/// Where a FLUSH acts: its initiator (`src_dev` is a local device, or the marker of another
/// host's), the target device and endpoint, and the generation the initiator named.
#[derive(Clone, Copy)]
pub(super) struct FlushAt {
    pub src_dev: usize,
    pub src: FabricAddr,
    pub ddev: usize,
    pub dep: usize,
    pub gen: u32,
}
