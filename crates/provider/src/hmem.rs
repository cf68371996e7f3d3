// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Device memory (FI_HMEM) through the consumer's copy functions (issue 13 §1).
//!
//! The provider has no device runtime: memory of an iface other than `FI_HMEM_SYSTEM` is only
//! accepted once the consumer installed `struct fi_hmem_override_ops` on the domain
//! (`fi_set_ops(FI_SET_OPS_HMEM_OVERRIDE)`, see `ext.rs`), and only registered with
//! `fi_mr_regattr` (FI_MR_HMEM: its descriptor names the iface and device). The provider never
//! dereferences such memory: every byte goes through the consumer's functions.
//!
//! - Outgoing data (sends, inject, RMA write sources, atomic operands and compare values) is
//!   gathered into a host buffer with `copy_from_hmem_iov` at post time; the driver copies it
//!   from there (inject and bounce semantics) before the call returns.
//! - Incoming data (receives, RMA read targets, atomic results) lands in a host bounce buffer
//!   posted under a provider context; when its completion is read (`fi_cq_read*`,
//!   `fi_cq_readerr` for a truncated receive) the bytes are scattered with
//!   `copy_to_hmem_iov` and the entry gets the consumer's context back — as `multirecv.rs`
//!   does for FI_MULTI_RECV.
//!
//! [`HmemCopy`] is the Rust face of the two functions.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vfabric::{fi, CqEntry, CqErrEntry, Iov};

use crate::ep::EpObj;
use crate::mr::MrObj;
use crate::sys;
use crate::util::{FidObject, Res, SendPtr};

/// Copies between host memory and device memory of an iface: the Rust form of
/// `struct fi_hmem_override_ops` (the C functions installed with `fi_set_ops` implement it).
pub trait HmemCopy: Send + Sync {
    /// Fill `dst` from device memory at `src` of `iface`/`device`.
    fn copy_from(&self, dst: &mut [u8], iface: u32, device: u64, src: *const u8) -> Res;
    /// Write `src` to device memory at `dst` of `iface`/`device`.
    fn copy_to(&self, dst: *mut u8, iface: u32, device: u64, src: &[u8]) -> Res;
}

/// The consumer's `fi_hmem_override_ops`.
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

/// A copy function's result: all `want` bytes, else `-FI_EIO` (or its own negative errno).
fn copied(n: isize, want: usize) -> Res {
    match n {
        n if n >= 0 && n as usize == want => Ok(()),
        n if n < 0 => Err(i32::try_from(-n).unwrap_or(fi::EIO)),
        _ => Err(fi::EIO),
    }
}

impl HmemCopy for COps {
    fn copy_from(&self, dst: &mut [u8], iface: u32, device: u64, src: *const u8) -> Res {
        let v = sys::iovec {
            iov_base: src.cast_mut().cast(),
            iov_len: dst.len(),
        };
        // SAFETY: the consumer's function, given a host buffer of `dst.len()` bytes and the
        // device range it registered (its contract with the provider).
        let n = unsafe { (self.from)(dst.as_mut_ptr().cast(), dst.len(), iface, device, &v, 1, 0) };
        copied(n, dst.len())
    }

    fn copy_to(&self, dst: *mut u8, iface: u32, device: u64, src: &[u8]) -> Res {
        let v = sys::iovec {
            iov_base: dst.cast(),
            iov_len: src.len(),
        };
        // SAFETY: as for `copy_from`, in the other direction.
        let n = unsafe { (self.to)(iface, device, &v, 1, 0, src.as_ptr().cast(), src.len()) };
        copied(n, src.len())
    }
}

/// The device memory of a registration: iface, device and the domain's copy functions.
#[derive(Clone)]
pub struct Hmem {
    pub iface: u32,
    pub device: u64,
    pub ops: Arc<dyn HmemCopy>,
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

/// One buffer of an operation: address, length and its device memory (None: host memory).
#[derive(Clone)]
pub struct Seg {
    pub ptr: *mut u8,
    pub len: usize,
    pub hmem: Option<Hmem>,
}

/// The device memory a descriptor names (None: NULL, host memory or not one of our regions).
pub fn of_desc(desc: *mut c_void) -> Option<Hmem> {
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

/// Gather `segs` into one host buffer (device memory through the consumer's functions).
pub fn gather(segs: &[Seg]) -> Res<Vec<u8>> {
    let mut out = vec![0u8; segs.iter().map(|s| s.len).sum()];
    let mut off = 0;
    for s in segs.iter().filter(|s| s.len > 0) {
        let dst = &mut out[off..off + s.len];
        match &s.hmem {
            Some(h) => h.ops.copy_from(dst, h.iface, h.device, s.ptr)?,
            // SAFETY: host memory of the operation, readable for its length (the libfabric
            // buffer contract).
            None => dst.copy_from_slice(unsafe { std::slice::from_raw_parts(s.ptr, s.len) }),
        }
        off += s.len;
    }
    Ok(out)
}

/// Scatter `src` over `segs` (device memory through the consumer's functions).
fn scatter(segs: &[Seg], mut src: &[u8]) -> Res {
    for s in segs {
        let n = s.len.min(src.len());
        if n == 0 {
            continue;
        }
        match &s.hmem {
            Some(h) => h.ops.copy_to(s.ptr, h.iface, h.device, &src[..n])?,
            // SAFETY: host memory of the operation, writable for its length until completion.
            None => unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), s.ptr, n) },
        }
        src = &src[n..];
    }
    Ok(())
}

/// How many bytes of the bounce buffer a success completion carries.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A receive: the entry's `len`.
    Recv,
    /// An RMA read or a fetching atomic: the whole buffer.
    Whole,
}

/// An incoming operation into device memory, waiting for its completion.
struct Pending {
    ep: SendPtr<EpObj>,
    user_ctx: u64,
    kind: Kind,
    segs: Vec<Seg>,
    bounce: Vec<u8>,
    /// Its address is the internal context (unique while the record lives).
    _key: Box<u8>,
}

// SAFETY: the raw pointers are the consumer's buffers of an operation in flight, handed back
// only to the copy functions or written under the libfabric buffer contract.
unsafe impl Send for Pending {}

/// The device-memory regions of one domain and its incoming operations into them.
#[derive(Default)]
pub struct Registry {
    all: Mutex<HashMap<u64, Pending>>,
    /// `all.len()`, read without the lock on every completion.
    n: AtomicUsize,
    /// Registered device memory by region id: start, length, memory (for buffers passed
    /// without a descriptor: `fi_inject*` has none).
    regions: Mutex<HashMap<usize, (usize, usize, Hmem)>>,
    /// `regions.len()`: 0 keeps the data path free of any look-up.
    nregions: AtomicUsize,
}

/// A bounce buffer posted in place of device memory: the internal context to post with and
/// the host buffer to receive into. Dropped without [`Staged::posted`], it is forgotten.
pub struct Staged<'r> {
    reg: &'r Registry,
    pub key: u64,
    pub iov: Iov<'static>,
    posted: bool,
}

impl Staged<'_> {
    /// The operation was accepted: its completion will scatter the bounce buffer.
    pub fn posted(mut self) {
        self.posted = true;
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if !self.posted {
            self.reg.take(self.key);
        }
    }
}

impl Registry {
    /// Remember registered device memory (`id`: the region object).
    pub fn add_region(&self, id: usize, addr: usize, len: usize, h: Hmem) {
        let mut g = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        g.insert(id, (addr, len, h));
        self.nregions.store(g.len(), Ordering::Release);
    }

    /// Forget a region (`fi_close` of its MR).
    pub fn remove_region(&self, id: usize) {
        let mut g = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        g.remove(&id);
        self.nregions.store(g.len(), Ordering::Release);
    }

    /// The buffers of an operation with their device memory, if any of them is device memory
    /// (by its descriptor, else by the registered range holding it); None: all host memory.
    pub fn segs(&self, bufs: &[(*mut u8, usize)], descs: &[*mut c_void]) -> Option<Vec<Seg>> {
        if self.nregions.load(Ordering::Acquire) == 0 {
            return None;
        }
        let g = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        let at = |p: *mut u8, len: usize| {
            let (p, end) = (p as usize, (p as usize).saturating_add(len));
            g.values()
                .find(|(a, l, _)| p >= *a && p < a + l.max(&1) && end <= a + l)
                .map(|(_, _, h)| h.clone())
        };
        let segs: Vec<Seg> = bufs
            .iter()
            .enumerate()
            .map(|(k, &(ptr, len))| Seg {
                ptr,
                len,
                hmem: descs
                    .get(k)
                    .and_then(|&d| of_desc(d))
                    .or_else(|| at(ptr, len)),
            })
            .collect();
        segs.iter().any(|s| s.hmem.is_some()).then_some(segs)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.all.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, key: u64) -> Option<Pending> {
        let p = self.lock().remove(&key);
        if p.is_some() {
            self.n.fetch_sub(1, Ordering::AcqRel);
        }
        p
    }

    /// A bounce buffer for incoming data to `segs` (of which some are device memory).
    pub fn stage(&self, ep: &EpObj, user_ctx: u64, kind: Kind, segs: Vec<Seg>) -> Staged<'_> {
        let key_box = Box::new(0u8);
        let key = &*key_box as *const u8 as u64;
        let mut bounce = vec![0u8; segs.iter().map(|s| s.len).sum()];
        // SAFETY: the bounce buffer is owned by the record until its completion is read (or the
        // endpoint closes, which ends the operation); its heap storage never moves.
        let iov = unsafe { Iov::raw(bounce.as_mut_ptr(), bounce.len()) };
        let p = Pending {
            ep: SendPtr(std::ptr::from_ref(ep).cast_mut()),
            user_ctx,
            kind,
            segs,
            bounce,
            _key: key_box,
        };
        self.lock().insert(key, p);
        self.n.fetch_add(1, Ordering::AcqRel);
        Staged {
            reg: self,
            key,
            iov,
            posted: false,
        }
    }

    /// The staged operation of a completion's context, which becomes the consumer's again.
    fn finish(&self, context: &mut u64) -> Option<Pending> {
        if self.n.load(Ordering::Acquire) == 0 {
            return None;
        }
        let p = self.take(*context)?;
        *context = p.user_ctx;
        Some(p)
    }

    /// A success entry of a staged operation: scatter its bytes, restore the consumer's
    /// context. A copy function's failure is logged; the entry still completes (it cannot
    /// become an error entry once read).
    pub fn complete(&self, e: &mut CqEntry) {
        let Some(p) = self.finish(&mut e.context) else {
            return;
        };
        let n = match p.kind {
            Kind::Recv => e.len.min(p.bounce.len()),
            Kind::Whole => p.bounce.len(),
        };
        if let Err(err) = scatter(&p.segs, &p.bounce[..n]) {
            crate::util::warn(
                sys::fi_log_subsys_FI_LOG_EP_DATA,
                &format!("copy_to_hmem_iov failed ({err}): {n} bytes not delivered"),
            );
        }
    }

    /// An error entry of a staged operation: a truncated receive delivers what was placed.
    pub fn complete_err(&self, e: &mut CqErrEntry) {
        let Some(p) = self.finish(&mut e.context) else {
            return;
        };
        if e.err == fi::ETRUNC && p.kind == Kind::Recv {
            let n = e.len.min(p.bounce.len());
            let _ = scatter(&p.segs, &p.bounce[..n]);
        }
    }

    /// The internal context of `ep`'s operation posted with `user_ctx` (for `fi_cancel`).
    pub fn internal_ctx(&self, ep: *const EpObj, user_ctx: u64) -> Option<u64> {
        if self.n.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.lock()
            .iter()
            .find(|(_, p)| p.ep.0.cast_const() == ep && p.user_ctx == user_ctx)
            .map(|(k, _)| *k)
    }

    /// Forget an endpoint's operations (fi_close: the device endpoint goes with them).
    pub fn remove_ep(&self, ep: *const EpObj) {
        let mut g = self.lock();
        g.retain(|_, p| p.ep.0.cast_const() != ep);
        self.n.store(g.len(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// "Device memory" at a fake address: a host vector behind the trait, calls counted.
    struct Fake {
        mem: Mutex<Vec<u8>>,
        base: usize,
        calls: AtomicUsize,
    }

    impl HmemCopy for Fake {
        fn copy_from(&self, dst: &mut [u8], _: u32, _: u64, src: *const u8) -> Res {
            let off = src as usize - self.base;
            dst.copy_from_slice(&self.mem.lock().unwrap()[off..off + dst.len()]);
            self.calls.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn copy_to(&self, dst: *mut u8, _: u32, _: u64, src: &[u8]) -> Res {
            let off = dst as usize - self.base;
            self.mem.lock().unwrap()[off..off + src.len()].copy_from_slice(src);
            self.calls.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    #[test]
    fn gather_and_scatter_go_through_the_copy_functions() {
        // Never dereferenced: only the fake's offsets are taken from it.
        let base = 0x1000_0000usize;
        let fake = Arc::new(Fake {
            mem: Mutex::new((0..64u8).collect()),
            base,
            calls: AtomicUsize::new(0),
        });
        let h = Hmem {
            iface: sys::fi_hmem_iface_FI_HMEM_CUDA,
            device: 3,
            ops: fake.clone(),
        };
        let mut host = *b"abcd";
        let segs = vec![
            Seg {
                ptr: host.as_mut_ptr(),
                len: 4,
                hmem: None,
            },
            Seg {
                ptr: (base + 8) as *mut u8,
                len: 4,
                hmem: Some(h),
            },
        ];
        assert_eq!(gather(&segs).unwrap(), b"abcd\x08\x09\x0a\x0b");
        assert_eq!(fake.calls.load(Ordering::Relaxed), 1);
        // A short source fills the host segment first, then part of the device one.
        scatter(&segs, b"wxyz12").unwrap();
        assert_eq!(&host, b"wxyz");
        assert_eq!(&fake.mem.lock().unwrap()[8..12], b"12\x0a\x0b");
        assert_eq!(fake.calls.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn short_or_failed_copies_are_errors() {
        assert_eq!(copied(8, 8), Ok(()));
        assert_eq!(copied(4, 8), Err(fi::EIO));
        assert_eq!(copied(-(fi::EFAULT as isize), 8), Err(fi::EFAULT));
    }
}
