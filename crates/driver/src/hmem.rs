// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Device memory (libfabric's FI_HMEM) through copy functions the application supplies
//! (issue 13 §1; the Rust face of `fi_set_ops(FI_SET_OPS_HMEM_OVERRIDE)`).
//!
//! The driver has no device runtime (CUDA, ROCr, Level Zero, ...): it never dereferences
//! device memory. An application installs an [`HmemCopy`] on its [`Domain`]
//! ([`Domain::set_hmem_copy`]); only then does [`Domain::register_hmem`] accept device memory,
//! and every byte between such a region and the fabric device goes through that trait:
//!
//! - Outgoing data (sends, tagged sends, inject, RMA write sources, atomic operands and compare
//!   values) is gathered into host memory with [`HmemCopy::copy_from`] while posting; the
//!   operation then proceeds as one from host bytes (copied at post time).
//! - Incoming data (receives, tagged receives, RMA read targets, fetched atomic results) lands
//!   in a host buffer; [`HmemCopy::copy_to`] moves it to the device memory when the
//!   application *reads the completion* ([`CompletionQueue::read`] and its siblings, or
//!   [`CompletionQueue::readerr`] for a truncated receive), in the reading thread — not during
//!   progress, which any thread may drive. An operation that produces no CQ entry (selective
//!   completion without `fi::COMPLETION`) has nothing to read: its bytes are copied when it
//!   completes, before its counters move (a failed copy counts in the error count).
//!
//! Device memory is named in operations with [`Iov::hmem`] (a range of an [`HmemRegion`]); the
//! atomics take their operands as iovs in [`Endpoint::atomicmsg_iov`],
//! [`Endpoint::fetch_atomicmsg_iov`] and [`Endpoint::compare_atomicmsg_iov`]. A region is local
//! only: the device cannot reach device memory, so it has no key for remote access.
//!
//! [`Domain`]: crate::Domain
//! [`Domain::set_hmem_copy`]: crate::Domain::set_hmem_copy
//! [`Domain::register_hmem`]: crate::Domain::register_hmem
//! [`CompletionQueue::read`]: crate::CompletionQueue::read
//! [`CompletionQueue::readerr`]: crate::CompletionQueue::readerr
//! [`Iov::hmem`]: crate::Iov::hmem
//! [`Endpoint::atomicmsg_iov`]: crate::Endpoint::atomicmsg_iov
//! [`Endpoint::fetch_atomicmsg_iov`]: crate::Endpoint::fetch_atomicmsg_iov
//! [`Endpoint::compare_atomicmsg_iov`]: crate::Endpoint::compare_atomicmsg_iov

use std::sync::Arc;

use crate::endpoint::{iov_bytes, Iov, IovKind};
use crate::memory::Allocation;
use crate::{Error, Result};

/// The memory interface of a buffer: `enum fi_hmem_iface` of libfabric 1.17 (same values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum HmemIface {
    /// `FI_HMEM_SYSTEM`: host memory (not device memory; never registered as such).
    System = 0,
    /// `FI_HMEM_CUDA`.
    Cuda = 1,
    /// `FI_HMEM_ROCR`.
    Rocr = 2,
    /// `FI_HMEM_ZE`.
    Ze = 3,
    /// `FI_HMEM_NEURON`.
    Neuron = 4,
    /// `FI_HMEM_SYNAPSEAI`.
    SynapseAi = 5,
}

impl HmemIface {
    /// The iface of a libfabric value (None: not one libfabric 1.17 defines).
    pub fn from_raw(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::System,
            1 => Self::Cuda,
            2 => Self::Rocr,
            3 => Self::Ze,
            4 => Self::Neuron,
            5 => Self::SynapseAi,
            _ => return None,
        })
    }

    /// The libfabric value (`FI_HMEM_*`).
    pub fn raw(self) -> u32 {
        self as u32
    }
}

/// Copies between host memory and device memory: what `struct fi_hmem_override_ops` gives a
/// provider (`copy_from_hmem_iov`/`copy_to_hmem_iov`), installed on a domain with
/// [`Domain::set_hmem_copy`](crate::Domain::set_hmem_copy).
///
/// The driver calls these for every byte of device memory an operation moves, with the
/// address, iface and device of a registered [`HmemRegion`], and never touches that memory
/// itself. A call must copy all bytes or fail; a failure fails the post (outgoing data) or
/// turns the completion being read into an error entry (`EIO`, incoming data).
pub trait HmemCopy: Send + Sync {
    /// Fill `dst` from device memory at `src` (`dst.len()` bytes) of `iface`/`device`.
    fn copy_from(
        &self,
        dst: &mut [u8],
        iface: HmemIface,
        device: u64,
        src: *const u8,
    ) -> Result<()>;
    /// Write `src` to device memory at `dst` (`src.len()` bytes) of `iface`/`device`.
    fn copy_to(&self, dst: *mut u8, iface: HmemIface, device: u64, src: &[u8]) -> Result<()>;
}

struct Region {
    iface: HmemIface,
    device: u64,
    addr: usize,
    len: usize,
    ops: Arc<dyn HmemCopy>,
}

/// Registered device memory ([`Domain::register_hmem`](crate::Domain::register_hmem)): its
/// iface, device, address and length, and the copy functions installed when it was
/// registered. Cheap to clone; name ranges of it in operations with
/// [`Iov::hmem`](crate::Iov::hmem).
#[derive(Clone)]
pub struct HmemRegion {
    r: Arc<Region>,
}

impl std::fmt::Debug for HmemRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HmemRegion")
            .field("iface", &self.r.iface)
            .field("device", &self.r.device)
            .field("addr", &format_args!("{:#x}", self.r.addr))
            .field("len", &self.r.len)
            .finish()
    }
}

impl HmemRegion {
    pub(crate) fn new(
        ops: Arc<dyn HmemCopy>,
        iface: HmemIface,
        device: u64,
        addr: usize,
        len: usize,
    ) -> Result<Self> {
        if iface == HmemIface::System {
            return Err(Error::InvalidArgument(
                "FI_HMEM_SYSTEM is host memory: use Iov::raw or Domain::register".into(),
            ));
        }
        if addr.checked_add(len).is_none() {
            return Err(Error::InvalidArgument(
                "device memory range wraps the address space".into(),
            ));
        }
        Ok(Self {
            r: Arc::new(Region {
                iface,
                device,
                addr,
                len,
                ops,
            }),
        })
    }
    pub fn iface(&self) -> HmemIface {
        self.r.iface
    }
    pub fn device(&self) -> u64 {
        self.r.device
    }
    /// Start address (in the device runtime's address space).
    pub fn addr(&self) -> usize {
        self.r.addr
    }
    pub fn len(&self) -> usize {
        self.r.len
    }
    pub fn is_empty(&self) -> bool {
        self.r.len == 0
    }

    /// Fill `dst` from the region at `off` through the copy functions.
    pub fn read(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        let a = self.at(off, dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        self.r.ops.copy_from(dst, self.r.iface, self.r.device, a)
    }

    /// Write `src` to the region at `off` through the copy functions.
    pub fn write(&self, off: usize, src: &[u8]) -> Result<()> {
        let a = self.at(off, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        self.r
            .ops
            .copy_to(a.cast_mut(), self.r.iface, self.r.device, src)
    }

    /// The address of `off..off + len` (checked against the region, never dereferenced).
    fn at(&self, off: usize, len: usize) -> Result<*const u8> {
        match off.checked_add(len) {
            Some(end) if end <= self.r.len => Ok((self.r.addr + off) as *const u8),
            _ => Err(Error::InvalidArgument(format!(
                "range {off}+{len} outside device memory of {} bytes",
                self.r.len
            ))),
        }
    }
}

/// Whether any iov names device memory.
pub(crate) fn any(iov: &[Iov<'_>]) -> bool {
    iov.iter().any(|v| matches!(v.kind, IovKind::Hmem(..)))
}

/// The bytes of `iov` in one host buffer: device memory through its copy functions, host
/// memory copied directly (under the contract of the iov's constructor).
pub(crate) fn gather(iov: &[Iov<'_>]) -> Result<Vec<u8>> {
    let mut out = vec![0u8; iov.iter().map(|v| v.len()).sum()];
    let mut off = 0;
    for v in iov {
        let n = v.len();
        let dst = &mut out[off..off + n];
        match &v.kind {
            IovKind::Hmem(h, r) => h.read(r.start, dst)?,
            _ => dst.copy_from_slice(iov_bytes(v)),
        }
        off += n;
    }
    Ok(out)
}

/// One destination of incoming bytes.
enum Target {
    /// Caller host memory (a raw iov, or a shared buffer whose allocation is kept alive here:
    /// the request that held it is gone before the completion is read).
    Host {
        addr: usize,
        len: usize,
        _keep: Option<Arc<Allocation>>,
    },
    Device(HmemRegion, usize, usize),
}

/// Where the host-staged bytes of an incoming operation go when its completion is read.
pub(crate) struct Scatter {
    targets: Vec<Target>,
}

impl Scatter {
    /// The destinations of `iov` in order (valid ranges checked by the caller).
    pub(crate) fn of(iov: &[Iov<'_>]) -> Result<Self> {
        let mut targets = Vec::with_capacity(iov.len());
        for v in iov.iter().filter(|v| !v.is_empty()) {
            targets.push(match &v.kind {
                IovKind::Hmem(h, r) => {
                    h.at(r.start, r.len())?;
                    Target::Device((*h).clone(), r.start, r.len())
                }
                IovKind::Shared(buf, r) => Target::Host {
                    addr: buf.addr() as usize + r.start,
                    len: r.len(),
                    _keep: Some(buf.keepalive()),
                },
                IovKind::Raw(p, l) => Target::Host {
                    addr: *p as usize,
                    len: *l,
                    _keep: None,
                },
                IovKind::Bytes(_) => {
                    return Err(Error::InvalidArgument(
                        "Iov::bytes is read-only; not valid as a destination".into(),
                    ))
                }
            });
        }
        Ok(Self { targets })
    }

    /// Move `src` to the destinations in order (fewer bytes than room: the first ones).
    pub(crate) fn run(&self, mut src: &[u8]) -> Result<()> {
        for t in &self.targets {
            if src.is_empty() {
                break;
            }
            let room = match t {
                Target::Host { len, .. } | Target::Device(_, _, len) => *len,
            };
            let (now, rest) = src.split_at(room.min(src.len()));
            match t {
                Target::Device(h, off, _) => h.write(*off, now)?,
                // SAFETY: caller memory the receive was posted with: writable and not
                // otherwise accessed until its completion is read (the `Iov::raw` contract;
                // a shared buffer's allocation is held by the target itself).
                Target::Host { addr, .. } => unsafe {
                    std::ptr::copy_nonoverlapping(now.as_ptr(), *addr as *mut u8, now.len())
                },
            }
            src = rest;
        }
        Ok(())
    }
}
