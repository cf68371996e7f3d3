// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! RMA (`fi_read`, `fi_write`, `fi_writedata`, `fi_inject_write*`, `fi_readmsg`,
//! `fi_writemsg`) and atomics (`fi_atomic`, `fi_fetch_atomic`, `fi_compare_atomic`, their
//! `*msg` forms, `fi_atomicvalid`) on an endpoint.
//!
//! Chains (spec §6.10, §6.11): the payload is the remote scatter list (only for more than one
//! remote range) followed by the data (writes) or the operands (atomics); the data area is the
//! read destination or the fetched results. Local buffers in the shared region are described
//! in place; other memory goes through a bounce buffer, as for messages.

use std::ops::Range;
use std::sync::Arc;

use vfabric_proto::{
    self as proto, atomic_op, datatype, flags as pflags, ByteValued, Opcode, Request,
};

use super::{
    check_range, iov_bytes, iov_region, tx_reporting, Endpoint, Iov, IovKind, INJECT_CALL,
};
use crate::av::{FiAddr, FI_ADDR_UNSPEC};
use crate::memory::SharedBuf;
use crate::request::{CopyOut, DataOp, Keepalive, Payload, Targets, Tx as TxData};
use crate::virtqueue::{DescList, RxData, INLINE_RX_MAX, INLINE_TX_MAX};
use crate::{fi, Error, Result};

/// A remote range (`fi_rma_iov`): address in the target region's address space (its virtual
/// address, or an offset with offset addressing), length, key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RmaIov {
    pub addr: u64,
    pub len: u64,
    pub key: u64,
}

/// `fi_msg_rma`.
#[derive(Clone, Debug)]
pub struct RmaMsg<'a> {
    /// Local buffers (sources of a write, destinations of a read).
    pub iov: &'a [Iov<'a>],
    pub addr: FiAddr,
    pub rma_iov: &'a [RmaIov],
    pub context: u64,
    /// Remote CQ data (writes with `fi::REMOTE_CQ_DATA`).
    pub data: u64,
}

/// `fi_msg_atomic` with one remote range: `count` elements of `datatype` at `remote_addr` of
/// region `key` at `addr`; `operands` holds `count` elements (none for `FI_ATOMIC_READ`).
#[derive(Clone, Debug)]
pub struct AtomicMsg<'a> {
    pub operands: &'a [u8],
    pub addr: FiAddr,
    pub remote_addr: u64,
    pub key: u64,
    /// `enum fi_datatype` ([`vfabric_proto::datatype`]).
    pub datatype: u8,
    /// `enum fi_op` ([`vfabric_proto::atomic_op`]).
    pub op: u8,
    pub count: usize,
    pub context: u64,
}

/// Where a read's or fetch's bytes go.
enum Local<'a> {
    Iov(&'a [Iov<'a>]),
    /// A fresh `Vec<u8>` in the CQ entry's `buf`.
    Vec(usize),
}

fn remote_list(rma: &[RmaIov]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rma.len() * proto::RMA_IOV_LEN);
    for r in rma {
        let e = proto::RmaIov {
            addr: r.addr.into(),
            len: r.len.into(),
            key: r.key.into(),
        };
        out.extend_from_slice(e.as_slice());
    }
    out
}

/// Request flags of an RMA/atomic op from libfabric op flags.
fn op_flags(fi_flags: u64, allowed: u64, pmem: bool) -> Result<u64> {
    let map = [
        (fi::INJECT, pflags::INJECT),
        (fi::FENCE, pflags::FENCE),
        (fi::INJECT_COMPLETE, pflags::INJECT_COMPLETE),
        (fi::TRANSMIT_COMPLETE, pflags::TRANSMIT_COMPLETE),
        (fi::DELIVERY_COMPLETE, pflags::DELIVERY_COMPLETE),
        (fi::COMMIT_COMPLETE, pflags::COMMIT_COMPLETE),
        (fi::REMOTE_CQ_DATA, pflags::REMOTE_CQ_DATA),
    ];
    let mut f = 0;
    for (a, b) in map {
        if fi_flags & a != 0 {
            f |= b;
        }
    }
    if (f & pflags::COMPLETION_LEVELS).count_ones() > 1 {
        return Err(Error::InvalidArgument(
            "at most one completion level flag".into(),
        ));
    }
    if f & pflags::COMMIT_COMPLETE != 0 && !pmem {
        return Err(Error::Unsupported(
            "FI_COMMIT_COMPLETE (the device does not offer persistent memory, F_RMA_PMEM)".into(),
        ));
    }
    // Flags not meaningful for the operation are ignored (libfabric semantics for op flags),
    // except the completion levels above.
    Ok(f & allowed)
}

impl Endpoint {
    // ------------------------------------------------------------------------------------
    // RMA
    // ------------------------------------------------------------------------------------

    /// `fi_write`: `buf` (copied at post time) to `addr` of region `key` at `dest`.
    pub fn write(&self, buf: &[u8], dest: FiAddr, addr: u64, key: u64, context: u64) -> Result<()> {
        let iov = [Iov::bytes(buf)];
        self.rma_write(&iov, dest, &[one(addr, buf.len(), key)], None, context, 0)
    }

    /// `fi_write` from a shared buffer (zero-copy).
    pub fn write_buf(
        &self,
        buf: &SharedBuf,
        range: Range<usize>,
        dest: FiAddr,
        addr: u64,
        key: u64,
        context: u64,
    ) -> Result<()> {
        self.write_buf_flags(buf, range, dest, addr, key, context, 0)
    }

    /// [`Endpoint::write_buf`] with op flags (`fi::MORE` from a batch).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write_buf_flags(
        &self,
        buf: &SharedBuf,
        range: Range<usize>,
        dest: FiAddr,
        addr: u64,
        key: u64,
        context: u64,
        flags: u64,
    ) -> Result<()> {
        check_range(buf, &range)?;
        let len = range.len();
        let iov = [Iov::shared(buf, range)];
        self.rma_write(&iov, dest, &[one(addr, len, key)], None, context, flags)
    }

    /// `fi_writedata`: a write that also completes a posted receive at the target with
    /// `fi::REMOTE_CQ_DATA | fi::REMOTE_WRITE` and `data`.
    pub fn writedata(
        &self,
        buf: &[u8],
        data: u64,
        dest: FiAddr,
        addr: u64,
        key: u64,
        context: u64,
    ) -> Result<()> {
        let iov = [Iov::bytes(buf)];
        self.rma_write(
            &iov,
            dest,
            &[one(addr, buf.len(), key)],
            Some(data),
            context,
            0,
        )
    }

    /// `fi_inject_write`: no completion; `buf.len()` ≤ `inject_size`.
    pub fn inject_write(&self, buf: &[u8], dest: FiAddr, addr: u64, key: u64) -> Result<()> {
        let iov = [Iov::bytes(buf)];
        self.rma_write(
            &iov,
            dest,
            &[one(addr, buf.len(), key)],
            None,
            0,
            fi::INJECT | INJECT_CALL,
        )
    }

    /// `fi_inject_writedata`.
    pub fn inject_writedata(
        &self,
        buf: &[u8],
        data: u64,
        dest: FiAddr,
        addr: u64,
        key: u64,
    ) -> Result<()> {
        let iov = [Iov::bytes(buf)];
        let r = [one(addr, buf.len(), key)];
        self.rma_write(&iov, dest, &r, Some(data), 0, fi::INJECT | INJECT_CALL)
    }

    /// `fi_writemsg`. Flags: `fi::REMOTE_CQ_DATA` (send `msg.data`), `fi::INJECT`,
    /// `fi::INJECT_COMPLETE` | `fi::TRANSMIT_COMPLETE` | `fi::DELIVERY_COMPLETE`, `fi::FENCE`,
    /// `fi::COMPLETION`, `fi::MORE`.
    /// With `fi::SAVE` the write moves no data (`msg.iov` must be empty) and is a FLUSH of
    /// `msg.rma_iov` ([`Endpoint::save`]).
    pub fn writemsg(&self, msg: &RmaMsg<'_>, flags: u64) -> Result<()> {
        if flags & fi::SAVE != 0 {
            if msg.iov.iter().any(|v| !v.is_empty()) {
                return Err(Error::InvalidArgument(
                    "FI_SAVE moves no data: the local iov must be empty".into(),
                ));
            }
            let data = (flags & fi::REMOTE_CQ_DATA != 0).then_some(msg.data);
            return self.save(msg.rma_iov, msg.addr, flags, data, msg.context);
        }
        let data = (flags & fi::REMOTE_CQ_DATA != 0).then_some(msg.data);
        self.rma_write(msg.iov, msg.addr, msg.rma_iov, data, msg.context, flags)
    }

    /// `fi_read` into a shared buffer (zero-copy).
    pub fn read_buf(
        &self,
        buf: &SharedBuf,
        range: Range<usize>,
        dest: FiAddr,
        addr: u64,
        key: u64,
        context: u64,
    ) -> Result<()> {
        self.read_buf_flags(buf, range, dest, addr, key, context, 0)
    }

    /// [`Endpoint::read_buf`] with op flags (`fi::MORE` from a batch).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn read_buf_flags(
        &self,
        buf: &SharedBuf,
        range: Range<usize>,
        dest: FiAddr,
        addr: u64,
        key: u64,
        context: u64,
        flags: u64,
    ) -> Result<()> {
        check_range(buf, &range)?;
        let len = range.len();
        let iov = [Iov::shared(buf, range)];
        self.rma_read(
            Local::Iov(&iov),
            dest,
            &[one(addr, len, key)],
            context,
            flags,
        )
    }

    /// `fi_read` into caller memory (bounced unless inside the shared region).
    ///
    /// # Safety
    /// `ptr` must stay valid for writes of `len` bytes, and not be accessed otherwise, until
    /// the read completes or the endpoint is dropped.
    pub unsafe fn read_raw(
        &self,
        ptr: *mut u8,
        len: usize,
        dest: FiAddr,
        addr: u64,
        key: u64,
        context: u64,
    ) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        let iov = [unsafe { Iov::raw(ptr, len) }];
        self.rma_read(Local::Iov(&iov), dest, &[one(addr, len, key)], context, 0)
    }

    /// `fi_read` of `len` bytes returned in the CQ entry's `buf`.
    pub fn read_vec(
        &self,
        len: usize,
        dest: FiAddr,
        addr: u64,
        key: u64,
        context: u64,
    ) -> Result<()> {
        self.rma_read(Local::Vec(len), dest, &[one(addr, len, key)], context, 0)
    }

    /// `fi_readmsg`. Flags: `fi::FENCE`, `fi::DELIVERY_COMPLETE`, `fi::COMPLETION`, `fi::MORE`.
    pub fn readmsg(&self, msg: &RmaMsg<'_>, flags: u64) -> Result<()> {
        self.rma_read(
            Local::Iov(msg.iov),
            msg.addr,
            msg.rma_iov,
            msg.context,
            flags,
        )
    }

    // ------------------------------------------------------------------------------------
    // Persistent memory (spec §6.17)
    // ------------------------------------------------------------------------------------

    /// FI_SAVE (`fi_writemsg(FI_SAVE | level)`, proposed in ofiwg/libfabric#5874): bring
    /// `rma` (zero-length ranges allowed) at `dest` to the completion level in `flags` —
    /// `fi::COMMIT_COMPLETE`: durable (every region must be persistent, else
    /// `Device(Access)`); `fi::DELIVERY_COMPLETE` or none: globally visible. With `data` the
    /// target gets a writedata-style completion once the ranges reached the level. Moves no
    /// data; completes on the TX CQ like a write (`fi::RMA | fi::WRITE`).
    pub fn save(
        &self,
        rma: &[RmaIov],
        dest: FiAddr,
        flags: u64,
        data: Option<u64>,
        context: u64,
    ) -> Result<()> {
        self.flush(rma, dest, flags & !fi::INJECT, data, context)
    }

    /// The commit operation of ofiwg/libfabric PR #5875 (`fi_commit(ep, rma_iov, count,
    /// dest_addr, flags, context)`): persist `rma` at `dest`. The level is COMMIT_COMPLETE
    /// unless `flags` names `fi::DELIVERY_COMPLETE` (a visibility commit).
    pub fn commit(&self, rma: &[RmaIov], dest: FiAddr, flags: u64, context: u64) -> Result<()> {
        let level = if flags & fi::DELIVERY_COMPLETE != 0 {
            fi::DELIVERY_COMPLETE
        } else {
            fi::COMMIT_COMPLETE
        };
        let rest = flags & (fi::FENCE | fi::COMPLETION | fi::MORE);
        self.flush(rma, dest, level | rest, None, context)
    }

    fn flush(
        &self,
        rma: &[RmaIov],
        dest: FiAddr,
        flags: u64,
        data: Option<u64>,
        context: u64,
    ) -> Result<()> {
        self.check_rma()?;
        if !self.pmem_ok() {
            return Err(Error::Unsupported(
                "FI_SAVE / commit (the device does not offer F_RMA_PMEM)".into(),
            ));
        }
        let max = self.domain.info().limits.max_sge.max(1) as usize;
        if rma.is_empty() || rma.len() > max {
            return Err(Error::InvalidArgument(format!(
                "1..={max} remote ranges, got {}",
                rma.len()
            )));
        }
        if data.is_some()
            && !self
                .domain
                .has_feature(proto::VIRTIO_FABRIC_F_REMOTE_CQ_DATA)
        {
            return Err(Error::Unsupported(
                "remote CQ data (F_REMOTE_CQ_DATA)".into(),
            ));
        }
        let mut req = Request::new(Opcode::Flush);
        req.flags = op_flags(flags, proto::allowed_flags(Opcode::Flush), true)?
            & !(pflags::REMOTE_CQ_DATA | pflags::TRANSMIT_COMPLETE | pflags::INJECT_COMPLETE);
        req.flags |= pflags::SAVE;
        if let Some(d) = data {
            req.flags |= pflags::REMOTE_CQ_DATA;
            req.data = d;
        }
        // Always a scatter list: `count` = 0 would name a whole region (§6.17).
        req.count = rma.len() as u32;
        let list = remote_list(rma);
        self.post_tx_op(
            req,
            &list,
            Src::None,
            Local::Iov(&[]),
            dest,
            context,
            flags,
            fi::RMA | fi::WRITE,
        )
    }

    /// Persistent memory was negotiated (FI_RMA_PMEM).
    pub(crate) fn pmem_ok(&self) -> bool {
        self.domain.has_feature(proto::VIRTIO_FABRIC_F_RMA_PMEM)
    }

    fn check_rma(&self) -> Result<()> {
        if !self.domain.has_feature(proto::VIRTIO_FABRIC_F_RMA) {
            return Err(Error::Unsupported("RMA (F_RMA not negotiated)".into()));
        }
        if self.ep_type == super::EpType::Dgram {
            return Err(Error::InvalidArgument(
                "RMA needs a reliable endpoint".into(),
            ));
        }
        Ok(())
    }

    /// The header fields naming the remote ranges and the scatter list to put in the payload.
    fn remote(&self, req: &mut Request, rma: &[RmaIov]) -> Result<Vec<u8>> {
        let max = self.domain.info().limits.max_sge.max(1) as usize;
        match rma {
            [] => Err(Error::InvalidArgument("no remote range".into())),
            [r] => {
                req.remote_addr = r.addr;
                req.remote_key = r.key;
                Ok(Vec::new())
            }
            list if list.len() > max => Err(Error::InvalidArgument(format!(
                "{} remote ranges exceed max_sge {max}",
                list.len()
            ))),
            list => {
                req.count = list.len() as u32;
                Ok(remote_list(list))
            }
        }
    }

    fn rma_write(
        &self,
        iov: &[Iov<'_>],
        dest: FiAddr,
        rma: &[RmaIov],
        data: Option<u64>,
        context: u64,
        flags: u64,
    ) -> Result<()> {
        self.check_rma()?;
        let len: usize = iov.iter().map(|v| v.len()).sum();
        for v in iov {
            if let IovKind::Shared(buf, r) = &v.kind {
                check_range(buf, r)?;
            }
        }
        let remote_len = rma.iter().fold(0u64, |a, r| a.saturating_add(r.len));
        if rma.len() == 1 && remote_len != len as u64 {
            return Err(Error::InvalidArgument(format!(
                "remote range of {remote_len} bytes for {len} local bytes"
            )));
        }
        let limits = &self.domain.info().limits;
        let max = limits.max_rma_size.unwrap_or(limits.max_msg_size);
        if len as u64 > max || len > u32::MAX as usize {
            return Err(Error::TooLarge { len, max });
        }
        let inject = flags & fi::INJECT != 0;
        if inject && len as u64 > limits.inject_size {
            return Err(Error::InvalidArgument(format!(
                "inject of {len} bytes exceeds inject_size {}",
                limits.inject_size
            )));
        }
        if data.is_some()
            && !self
                .domain
                .has_feature(proto::VIRTIO_FABRIC_F_REMOTE_CQ_DATA)
        {
            return Err(Error::Unsupported(
                "remote CQ data (F_REMOTE_CQ_DATA)".into(),
            ));
        }
        let mut req = Request::new(Opcode::RmaWrite);
        req.flags = op_flags(
            flags,
            proto::allowed_flags(Opcode::RmaWrite),
            self.pmem_ok(),
        )? & !pflags::REMOTE_CQ_DATA;
        if let Some(d) = data {
            req.flags |= pflags::REMOTE_CQ_DATA;
            req.data = d;
        }
        let list = self.remote(&mut req, rma)?;
        self.post_tx_op(
            req,
            &list,
            Src::Iov(iov, len),
            Local::Iov(&[]),
            dest,
            context,
            flags,
            fi::RMA | fi::WRITE,
        )
    }

    fn rma_read(
        &self,
        local: Local<'_>,
        dest: FiAddr,
        rma: &[RmaIov],
        context: u64,
        flags: u64,
    ) -> Result<()> {
        self.check_rma()?;
        let len = local_len(&local)?;
        let remote_len = rma.iter().fold(0u64, |a, r| a.saturating_add(r.len));
        if remote_len > len as u64 || (rma.len() == 1 && remote_len != len as u64) {
            return Err(Error::InvalidArgument(format!(
                "remote ranges of {remote_len} bytes for {len} local bytes"
            )));
        }
        let limits = &self.domain.info().limits;
        let max = limits.max_rma_size.unwrap_or(limits.max_msg_size);
        if len as u64 > max || len > u32::MAX as usize {
            return Err(Error::TooLarge { len, max });
        }
        let mut req = Request::new(Opcode::RmaRead);
        req.flags = op_flags(flags, proto::allowed_flags(Opcode::RmaRead), self.pmem_ok())?;
        let list = self.remote(&mut req, rma)?;
        // The data area must be exactly what the remote ranges fill.
        let local = match local {
            Local::Vec(_) => Local::Vec(remote_len as usize),
            l => l,
        };
        self.post_tx_op(
            req,
            &list,
            Src::None,
            local,
            dest,
            context,
            flags,
            fi::RMA | fi::READ,
        )
    }

    // ------------------------------------------------------------------------------------
    // Atomics
    // ------------------------------------------------------------------------------------

    /// `fi_atomicvalid`: the largest `count` for `op` on `datatype` with `fi_atomic`.
    pub fn atomic_valid(&self, datatype: u8, op: u8) -> Result<usize> {
        self.atomic_check(Opcode::Atomic, datatype, op)
    }
    /// `fi_fetch_atomicvalid`.
    pub fn fetch_atomic_valid(&self, datatype: u8, op: u8) -> Result<usize> {
        self.atomic_check(Opcode::FetchAtomic, datatype, op)
    }
    /// `fi_compare_atomicvalid`.
    pub fn compare_atomic_valid(&self, datatype: u8, op: u8) -> Result<usize> {
        self.atomic_check(Opcode::CompareAtomic, datatype, op)
    }

    fn atomic_check(&self, opcode: Opcode, dt: u8, op: u8) -> Result<usize> {
        if !self.domain.has_feature(proto::VIRTIO_FABRIC_F_ATOMIC) {
            return Err(Error::Unsupported(
                "atomics (F_ATOMIC not negotiated)".into(),
            ));
        }
        let info = self.domain.info();
        // Read from the capabilities once, when the endpoint opened.
        let (ops, types) = (self.limits.atomic_ops, self.limits.atomic_types);
        if op >= atomic_op::COUNT || ops & (1 << op) == 0 {
            return Err(Error::Unsupported(format!("atomic op {op}")));
        }
        if dt >= datatype::COUNT || types & (1 << dt) == 0 {
            return Err(Error::Unsupported(format!("atomic datatype {dt}")));
        }
        if datatype::is_float(dt)
            && matches!(
                op,
                atomic_op::BOR | atomic_op::BAND | atomic_op::BXOR | atomic_op::MSWAP
            )
        {
            return Err(Error::Unsupported(format!(
                "atomic op {op} on a floating-point type"
            )));
        }
        if !atomic_op::allowed(opcode, op) {
            return Err(Error::InvalidArgument(format!(
                "atomic op {op} is not valid for {opcode:?}"
            )));
        }
        let max = info.limits.max_atomic_count.unwrap_or(0) as usize;
        if max == 0 {
            return Err(Error::Unsupported("device reports no atomic count".into()));
        }
        Ok(max)
    }

    /// `fi_atomic`.
    pub fn atomic(&self, msg: &AtomicMsg<'_>) -> Result<()> {
        self.atomicmsg(msg, 0)
    }
    /// `fi_inject_atomic`: no completion.
    pub fn inject_atomic(&self, msg: &AtomicMsg<'_>) -> Result<()> {
        self.post_atomic(
            Opcode::Atomic,
            msg,
            &[],
            Local::Iov(&[]),
            fi::INJECT | INJECT_CALL,
        )
    }
    /// `fi_atomicmsg`. Flags: `fi::INJECT`, completion levels, `fi::FENCE`,
    /// `fi::COMPLETION`, `fi::MORE`.
    pub fn atomicmsg(&self, msg: &AtomicMsg<'_>, flags: u64) -> Result<()> {
        self.post_atomic(Opcode::Atomic, msg, &[], Local::Iov(&[]), flags)
    }

    /// `fi_fetch_atomic`: the original target values go to `result` (shared buffers or raw
    /// memory, `count` elements), or, if `result` is empty, to the CQ entry's `buf`.
    pub fn fetch_atomic(&self, msg: &AtomicMsg<'_>, result: &[Iov<'_>]) -> Result<()> {
        self.fetch_atomicmsg(msg, result, 0)
    }
    /// `fi_fetch_atomicmsg`. Flags: `fi::FENCE`, `fi::DELIVERY_COMPLETE`, `fi::COMPLETION`.
    pub fn fetch_atomicmsg(
        &self,
        msg: &AtomicMsg<'_>,
        result: &[Iov<'_>],
        flags: u64,
    ) -> Result<()> {
        self.post_atomic(Opcode::FetchAtomic, msg, &[], result_dst(result), flags)
    }

    /// `fi_compare_atomic`: `compare` holds `count` compare values; results as for
    /// [`Endpoint::fetch_atomic`].
    pub fn compare_atomic(
        &self,
        msg: &AtomicMsg<'_>,
        compare: &[u8],
        result: &[Iov<'_>],
    ) -> Result<()> {
        self.compare_atomicmsg(msg, compare, result, 0)
    }
    /// `fi_compare_atomicmsg`.
    pub fn compare_atomicmsg(
        &self,
        msg: &AtomicMsg<'_>,
        compare: &[u8],
        result: &[Iov<'_>],
        flags: u64,
    ) -> Result<()> {
        self.post_atomic(
            Opcode::CompareAtomic,
            msg,
            compare,
            result_dst(result),
            flags,
        )
    }

    /// [`Endpoint::atomicmsg`] with the operands in `operands` (device memory with
    /// [`Iov::hmem`], or host memory), gathered at post time; `msg.operands` must be empty.
    /// Flags as for [`Endpoint::atomicmsg`]; `fi::INJECT | INJECT_CALL` is `fi_inject_atomic`.
    pub fn atomicmsg_iov(
        &self,
        msg: &AtomicMsg<'_>,
        operands: &[Iov<'_>],
        flags: u64,
    ) -> Result<()> {
        let ops = operand_bytes(msg, operands)?;
        let m = AtomicMsg {
            operands: &ops,
            ..msg.clone()
        };
        self.post_atomic(Opcode::Atomic, &m, &[], Local::Iov(&[]), flags)
    }

    /// [`Endpoint::fetch_atomicmsg`] with the operands in `operands` (as for
    /// [`Endpoint::atomicmsg_iov`]); `result` may name device memory, written when the
    /// completion is read.
    pub fn fetch_atomicmsg_iov(
        &self,
        msg: &AtomicMsg<'_>,
        operands: &[Iov<'_>],
        result: &[Iov<'_>],
        flags: u64,
    ) -> Result<()> {
        let ops = operand_bytes(msg, operands)?;
        let m = AtomicMsg {
            operands: &ops,
            ..msg.clone()
        };
        self.post_atomic(Opcode::FetchAtomic, &m, &[], result_dst(result), flags)
    }

    /// [`Endpoint::compare_atomicmsg`] with operands and compare values in iovs (device or
    /// host memory, gathered at post time); results as for [`Endpoint::fetch_atomicmsg_iov`].
    pub fn compare_atomicmsg_iov(
        &self,
        msg: &AtomicMsg<'_>,
        operands: &[Iov<'_>],
        compare: &[Iov<'_>],
        result: &[Iov<'_>],
        flags: u64,
    ) -> Result<()> {
        let ops = operand_bytes(msg, operands)?;
        let cmp = crate::hmem::gather(compare)?;
        let m = AtomicMsg {
            operands: &ops,
            ..msg.clone()
        };
        self.post_atomic(Opcode::CompareAtomic, &m, &cmp, result_dst(result), flags)
    }

    fn post_atomic(
        &self,
        opcode: Opcode,
        m: &AtomicMsg<'_>,
        compare: &[u8],
        result: Local<'_>,
        flags: u64,
    ) -> Result<()> {
        let max = self.atomic_check(opcode, m.datatype, m.op)?;
        if self.ep_type == super::EpType::Dgram {
            return Err(Error::InvalidArgument(
                "atomics need a reliable endpoint".into(),
            ));
        }
        let size = datatype::size(m.datatype).unwrap_or(0);
        if m.count == 0 || m.count > max {
            return Err(Error::InvalidArgument(format!(
                "atomic count {} (1..={max})",
                m.count
            )));
        }
        let nbytes = m.count * size;
        let operand_len = if m.op == atomic_op::ATOMIC_READ {
            0
        } else {
            nbytes
        };
        if m.operands.len() != operand_len {
            return Err(Error::InvalidArgument(format!(
                "{} operand bytes for {} elements of {size} bytes",
                m.operands.len(),
                m.count
            )));
        }
        let is_cmp = opcode == Opcode::CompareAtomic;
        if is_cmp && compare.len() != nbytes {
            return Err(Error::InvalidArgument(format!(
                "{} compare bytes for {nbytes} operand bytes",
                compare.len()
            )));
        }
        let inject = flags & fi::INJECT != 0;
        if inject && (operand_len as u64) > self.domain.info().limits.inject_size {
            return Err(Error::InvalidArgument("atomic inject too large".into()));
        }
        let result = match result {
            Local::Vec(_) => Local::Vec(nbytes),
            Local::Iov(r) if opcode != Opcode::Atomic => {
                let l: usize = r.iter().map(|v| v.len()).sum();
                if l != nbytes {
                    return Err(Error::InvalidArgument(format!(
                        "result buffers of {l} bytes for {nbytes} result bytes"
                    )));
                }
                Local::Iov(r)
            }
            l => l,
        };
        let mut req = Request::new(opcode);
        req.flags = op_flags(flags, proto::allowed_flags(opcode), self.pmem_ok())?;
        req.remote_addr = m.remote_addr;
        req.remote_key = m.key;
        req.atomic_op = m.op;
        req.datatype = m.datatype;
        req.count = m.count as u32;
        let cmp_part: &[u8] = if is_cmp { compare } else { &[] };
        let payload_len = m.operands.len() + cmp_part.len();
        let iov = [Iov::bytes(m.operands), Iov::bytes(cmp_part)];
        let fi_flags = fi::ATOMIC
            | if opcode == Opcode::Atomic {
                fi::WRITE
            } else {
                fi::READ
            };
        self.post_tx_op(
            req,
            &[],
            Src::Iov(&iov, payload_len),
            result,
            m.addr,
            m.context,
            flags,
            fi_flags,
        )
    }

    // ------------------------------------------------------------------------------------
    // Chain building
    // ------------------------------------------------------------------------------------

    /// Post a TX request: payload = `list` ++ `src`; data area = `local`.
    #[allow(clippy::too_many_arguments)]
    fn post_tx_op(
        &self,
        mut req: Request,
        list: &[u8],
        src: Src<'_>,
        local: Local<'_>,
        dest: FiAddr,
        context: u64,
        flags: u64,
        fi_flags: u64,
    ) -> Result<()> {
        let b = self.active()?;
        let domain = &self.domain;
        let (report_success, report_errors) = tx_reporting(b.tx.as_ref(), flags)?;
        req.ep = self.shared.id;
        req.peer = Self::resolve(b, dest)?;
        self.check_request(req.opcode, req.flags)?;

        let mem = &domain.mem;
        let mut keepalive = Keepalive::default();
        let mut bounce = None;
        let (src_iov, src_len) = match src {
            Src::None => (&[][..], 0),
            Src::Iov(i, l) => (i, l),
        };
        // Device memory: gathered into host bytes through the domain's copy functions now.
        let staged;
        let staged_iov;
        let src_iov = if crate::hmem::any(src_iov) {
            staged = crate::hmem::gather(src_iov)?;
            staged_iov = [Iov::bytes(&staged)];
            &staged_iov[..]
        } else {
            src_iov
        };
        let total = list.len() + src_len;
        let inline = Payload::Gather {
            prefix: list,
            iov: src_iov,
        };
        let mut tx_descs = DescList::new();
        if total <= INLINE_TX_MAX {
        } else {
            if !list.is_empty() {
                let lb = mem.alloc_bounce(list.len())?;
                lb.write_at(0, list);
                tx_descs.push(lb.device_addr(), list.len() as u32)?;
                keepalive.hold(Arc::new(lb));
            }
            let room = self
                .max_data_descs()
                .saturating_sub(tx_descs.as_slice().len());
            let nonempty = src_iov.iter().filter(|v| !v.is_empty()).count();
            if nonempty <= room && src_iov.iter().all(|v| v.is_empty() || self.zero_copy(v)) {
                for v in src_iov.iter().filter(|v| !v.is_empty()) {
                    let (addr, l) = self.iov_device_region(v)?;
                    tx_descs.push(addr, l as u32)?;
                    if let IovKind::Shared(buf, _) = &v.kind {
                        keepalive.push(buf.keepalive());
                    }
                }
            } else if src_len > 0 {
                let bb = mem.alloc_bounce(src_len)?;
                let mut off = 0;
                for v in src_iov {
                    let p = iov_bytes(v);
                    bb.write_at(off, p);
                    off += p.len();
                }
                tx_descs.push(bb.device_addr(), src_len as u32)?;
                keepalive.hold(Arc::new(bb));
            }
        }

        // Data area (reads, fetches).
        let mut rx_descs = DescList::new();
        let mut inline_len = 0usize;
        let mut copy_out = CopyOut::None;
        let rx_len = local_len(&local)?;
        let mut needs_copy = None;
        let mut hmem = None;
        match &local {
            Local::Vec(_) => needs_copy = Some(CopyOut::Vec),
            // Device memory: results land in host memory, moved by the copy functions when
            // the completion is read (`hmem.rs`).
            Local::Iov(iov) if crate::hmem::any(iov) => {
                for v in iov.iter() {
                    if let IovKind::Shared(buf, r) = &v.kind {
                        check_range(buf, r)?;
                    }
                }
                hmem = Some(Box::new(crate::hmem::Scatter::of(iov)?));
                needs_copy = Some(CopyOut::Vec);
            }
            Local::Iov(iov) => {
                for v in iov.iter() {
                    match &v.kind {
                        IovKind::Bytes(_) => {
                            return Err(Error::InvalidArgument(
                                "Iov::bytes is read-only; not valid as a destination".into(),
                            ))
                        }
                        IovKind::Shared(buf, r) => check_range(buf, r)?,
                        IovKind::Raw(..) | IovKind::Hmem(..) => {}
                    }
                }
                let in_place =
                    iov.len() <= self.max_data_descs() && iov.iter().all(|v| self.zero_copy(v));
                let mut targets = Targets::default();
                for v in iov.iter().filter(|v| !v.is_empty()) {
                    let (addr, l) = iov_region(v);
                    if in_place {
                        rx_descs.push(self.iov_device_region(v)?.0, l as u32)?;
                    } else {
                        targets.push(addr as usize, l);
                    }
                    if let IovKind::Shared(buf, _) = &v.kind {
                        keepalive.push(buf.keepalive());
                    }
                }
                if !in_place {
                    needs_copy = Some(targets.into_copy_out());
                }
            }
        }
        if let Some(target) = needs_copy {
            if rx_len > 0 && rx_len <= INLINE_RX_MAX {
                inline_len = rx_len;
            } else if rx_len > 0 {
                let bb = mem.alloc_bounce(rx_len)?;
                rx_descs.push(bb.device_addr(), rx_len as u32)?;
                bounce = Some(bb);
            }
            copy_out = target;
        }

        let tx = if total == 0 {
            TxData::None
        } else if total <= INLINE_TX_MAX {
            TxData::Inline(inline)
        } else {
            TxData::Descs(tx_descs.as_slice())
        };
        let rx = if inline_len > 0 {
            RxData::Inline(inline_len)
        } else if rx_descs.is_empty() {
            RxData::None
        } else {
            RxData::Descs(rx_descs.as_slice())
        };
        let ep = &self.shared;
        self.tx_q()
            .post(
                || req.to_header(),
                tx,
                rx,
                flags & fi::MORE != 0,
                false,
                #[inline(always)]
                || {
                    DataOp {
                        ep: ep.clone(),
                        context,
                        fi_flags,
                        rx_len,
                        src_addr: FI_ADDR_UNSPEC,
                        copy_out,
                        bounce,
                        _keepalive: keepalive,
                        hmem,
                        is_recv: false,
                        peek: false,
                        record_claim: false,
                        report_success,
                        report_errors,
                    }
                    .into_pending()
                },
            )
            .map(|_| ())
    }
}

/// Source of a TX op's payload after the scatter list: the iovs and their total length.
enum Src<'a> {
    None,
    Iov(&'a [Iov<'a>], usize),
}

fn one(addr: u64, len: usize, key: u64) -> RmaIov {
    RmaIov {
        addr,
        len: len as u64,
        key,
    }
}

/// The operands of an `_iov` atomic in host bytes (device memory through the copy functions).
fn operand_bytes(msg: &AtomicMsg<'_>, operands: &[Iov<'_>]) -> Result<Vec<u8>> {
    if !msg.operands.is_empty() {
        return Err(Error::InvalidArgument(
            "operands are given as iovs: msg.operands must be empty".into(),
        ));
    }
    crate::hmem::gather(operands)
}

fn result_dst<'a>(result: &'a [Iov<'a>]) -> Local<'a> {
    if result.is_empty() {
        Local::Vec(0)
    } else {
        Local::Iov(result)
    }
}

fn local_len(l: &Local<'_>) -> Result<usize> {
    let n = match l {
        Local::Vec(n) => *n,
        Local::Iov(iov) => iov.iter().map(|v| v.len()).sum(),
    };
    if n > u32::MAX as usize {
        return Err(Error::InvalidArgument("local buffers over 4 GiB".into()));
    }
    Ok(n)
}
