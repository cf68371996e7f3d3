// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Device memory (FI_HMEM) through the consumer's copy functions (issue 13 §1).
//!
//! The provider has no device runtime: memory of an iface other than `FI_HMEM_SYSTEM` is only
//! accepted once the consumer installed `struct fi_hmem_override_ops` on the domain
//! (`fi_set_ops(FI_SET_OPS_HMEM_OVERRIDE)`, see `ext.rs`), and only registered with
//! `fi_mr_regattr` (FI_MR_HMEM: its descriptor names the iface and device). The provider never
//! dereferences such memory, nor does the driver: the consumer's functions are installed on
//! the driver's domain as its [`vfabric::HmemCopy`], a registration is a
//! [`vfabric::HmemRegion`], and operations name device memory with [`Iov::hmem`] — the
//! driver's `hmem` module does the rest:
//!
//! - Outgoing data (sends, inject, RMA write sources, atomic operands and compare values) is
//!   gathered into host memory with `copy_from_hmem_iov` at post time.
//! - Incoming data (receives, RMA read targets, atomic results) lands in host memory and is
//!   scattered with `copy_to_hmem_iov` when the completion is read (`fi_cq_read*`, or
//!   `fi_cq_readerr` for a truncated receive), by the driver's CQ read under ours.
//!
//! What stays here: the C table as a [`HmemCopy`], and which of an operation's buffers are
//! device memory (by descriptor, or by registered range for calls without one: `fi_inject*`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use vfabric::{fi, HmemCopy, HmemIface, HmemRegion, Iov};

use crate::mr::MrObj;
use crate::sys;
use crate::util::{FidObject, Res};

/// The consumer's `fi_hmem_override_ops`: the driver's [`HmemCopy`] over its C functions.
pub struct COps {
    from: unsafe extern "C" fn(
        *mut c_void,
        usize,
        sys::fi_hmem_iface,
        u64,
        *const sys::iovec,
        usize,
        u64,
    ) -> isize,
    to: unsafe extern "C" fn(
        sys::fi_hmem_iface,
        u64,
        *const sys::iovec,
        usize,
        u64,
        *const c_void,
        usize,
    ) -> isize,
}

impl COps {
    /// Both functions of the consumer's table (`-FI_EINVAL` if either is missing).
    pub fn new(o: &sys::fi_hmem_override_ops) -> Res<Self> {
        match (o.copy_from_hmem_iov, o.copy_to_hmem_iov) {
            (Some(from), Some(to)) => Ok(COps { from, to }),
            _ => Err(fi::EINVAL),
        }
    }
}

/// A copy function's result: all `want` bytes, else `-FI_EIO` (or its own negative errno),
/// carried as the driver error whose `errno()` it is.
fn copied(n: isize, want: usize) -> vfabric::Result<()> {
    let errno = match n {
        n if n >= 0 && n as usize == want => return Ok(()),
        n if n < 0 => i32::try_from(-n).unwrap_or(fi::EIO),
        _ => fi::EIO,
    };
    Err(vfabric::Error::Io(std::io::Error::from_raw_os_error(errno)))
}

impl HmemCopy for COps {
    fn copy_from(
        &self,
        dst: &mut [u8],
        iface: HmemIface,
        device: u64,
        src: *const u8,
    ) -> vfabric::Result<()> {
        let v = sys::iovec {
            iov_base: src.cast_mut().cast(),
            iov_len: dst.len(),
        };
        // SAFETY: the consumer's function, given a host buffer of `dst.len()` bytes and the
        // device range it registered (its contract with the provider).
        let n = unsafe {
            (self.from)(
                dst.as_mut_ptr().cast(),
                dst.len(),
                iface.raw(),
                device,
                &v,
                1,
                0,
            )
        };
        copied(n, dst.len())
    }

    fn copy_to(
        &self,
        dst: *mut u8,
        iface: HmemIface,
        device: u64,
        src: &[u8],
    ) -> vfabric::Result<()> {
        let v = sys::iovec {
            iov_base: dst.cast(),
            iov_len: src.len(),
        };
        // SAFETY: as for `copy_from`, in the other direction.
        let n = unsafe {
            (self.to)(
                iface.raw(),
                device,
                &v,
                1,
                0,
                src.as_ptr().cast(),
                src.len(),
            )
        };
        copied(n, src.len())
    }
}

/// The device id of a registration (`fi_mr_attr.device`: an `int` for CUDA, ZE, Neuron and
/// SynapseAI, the 64-bit `reserved` otherwise).
pub fn device_of(a: &sys::fi_mr_attr) -> u64 {
    // SAFETY: every member of the union is plain data; the iface says which one was written.
    unsafe {
        match a.iface {
            sys::fi_hmem_iface_FI_HMEM_CUDA => a.device.cuda as u64,
            sys::fi_hmem_iface_FI_HMEM_ZE => a.device.ze as u64,
            sys::fi_hmem_iface_FI_HMEM_NEURON => a.device.neuron as u64,
            sys::fi_hmem_iface_FI_HMEM_SYNAPSEAI => a.device.synapseai as u64,
            _ => a.device.reserved,
        }
    }
}

/// The device memory a descriptor names (None: NULL, host memory or not one of our regions).
fn of_desc(desc: *mut c_void) -> Option<HmemRegion> {
    if desc.is_null() {
        return None;
    }
    // SAFETY: a descriptor is `fi_mr_desc` of one of our regions (the fid itself), class
    // checked; anything else is treated as host memory, as before FI_HMEM.
    unsafe { MrObj::from_fid(desc.cast::<sys::fid>()) }
        .ok()?
        .hmem
        .clone()
}

/// Per buffer of an operation: the device memory holding it and its offset there (None: host
/// memory).
pub type Held = Vec<Option<(HmemRegion, usize)>>;

/// The registered device memory of one domain.
#[derive(Default)]
pub struct Registry {
    /// Registered device memory by region id (for buffers passed without a descriptor:
    /// `fi_inject*` has none).
    regions: Mutex<HashMap<usize, HmemRegion>>,
    /// `regions.len()`: 0 keeps the data path free of any look-up.
    nregions: AtomicUsize,
}

impl Registry {
    /// Remember registered device memory (`id`: the region object).
    pub fn add_region(&self, id: usize, h: HmemRegion) {
        let mut g = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        g.insert(id, h);
        self.nregions.store(g.len(), Ordering::Release);
    }

    /// Forget a region (`fi_close` of its MR).
    pub fn remove_region(&self, id: usize) {
        let mut g = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        g.remove(&id);
        self.nregions.store(g.len(), Ordering::Release);
    }

    /// The device memory under each buffer of an operation (by its descriptor, else by the
    /// registered range holding it); None: all host memory.
    pub fn held(&self, bufs: &[(*mut u8, usize)], descs: &[*mut c_void]) -> Option<Held> {
        if self.nregions.load(Ordering::Acquire) == 0 {
            return None;
        }
        let g = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        let at = |p: usize, len: usize| {
            let end = p.saturating_add(len);
            g.values()
                .find(|h| {
                    let (a, l) = (h.addr(), h.len());
                    p >= a && p < a + l.max(1) && end <= a + l
                })
                .cloned()
        };
        let held: Held = bufs
            .iter()
            .enumerate()
            .map(|(k, &(ptr, len))| {
                let p = ptr as usize;
                descs
                    .get(k)
                    .and_then(|&d| of_desc(d))
                    .or_else(|| at(p, len))
                    .map(|h| {
                        let off = p.wrapping_sub(h.addr());
                        (h, off)
                    })
            })
            .collect();
        held.iter().any(Option::is_some).then_some(held)
    }
}

/// `iov` with its device-memory buffers (`held`, one per iov) named as such for the driver;
/// borrowed unchanged when all of it is host memory.
pub fn named<'h>(iov: &'h [Iov<'h>], held: &'h Option<Held>) -> Cow<'h, [Iov<'h>]> {
    let Some(held) = held else {
        return Cow::Borrowed(iov);
    };
    iov.iter()
        .zip(held)
        .map(|(v, h)| match h {
            Some((r, off)) => Iov::hmem(r, *off..off.saturating_add(v.len())),
            None => v.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_or_failed_copies_are_errors() {
        let errno = |r: vfabric::Result<()>| r.map_err(|e| e.errno());
        assert_eq!(errno(copied(8, 8)), Ok(()));
        assert_eq!(errno(copied(4, 8)), Err(fi::EIO));
        assert_eq!(errno(copied(-(fi::EFAULT as isize), 8)), Err(fi::EFAULT));
    }
}
