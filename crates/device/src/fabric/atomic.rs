// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Atomics (spec §6.11): the element ALU and the engine that applies it to guest memory.
//!
//! Aligned 1-, 2-, 4- and 8-byte elements (integers, FLOAT, DOUBLE) are updated with the CPU's
//! own atomic instructions on the guest mapping: a compare-and-swap loop around the ALU, or a
//! plain load when the operation changes nothing. Such updates are atomic with respect to every
//! other initiator on every device and queue pair, and to atomic instructions of the target's
//! own CPUs. Elements the CPU cannot update in one instruction (128-bit, unaligned, or split
//! across two guest ranges) are updated under one of [`STRIPES`] locks chosen by the element's
//! address: atomic with respect to every other initiator of this daemon, not to the target CPU.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};

use vfabric_proto::{atomic_op as aop, datatype as dt, flags, mr_flags, Opcode, Status};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use super::{Fabric, Notify, Port};
use crate::chain::{completion, GuestMemoryMmap, MemFault, Req, Segs};
use crate::xmem::PeerProcess;

/// Largest `count` of an atomic request (MAX_ATOMIC_COUNT).
pub(crate) const MAX_ATOMIC_COUNT: u32 = 4096;

/// ATOMIC_OPS: every libfabric operation MIN..MSWAP.
pub(crate) const ATOMIC_OPS: u64 = (1 << aop::COUNT) - 1;

/// ATOMIC_TYPES: the integer types (8 to 128 bits), FLOAT and DOUBLE. The complex and long
/// double types are not implemented.
pub(crate) const ATOMIC_TYPES: u64 = (1 << dt::INT8)
    | (1 << dt::UINT8)
    | (1 << dt::INT16)
    | (1 << dt::UINT16)
    | (1 << dt::INT32)
    | (1 << dt::UINT32)
    | (1 << dt::INT64)
    | (1 << dt::UINT64)
    | (1 << dt::FLOAT)
    | (1 << dt::DOUBLE)
    | (1 << dt::INT128)
    | (1 << dt::UINT128);

/// Number of locks for the elements the CPU cannot update atomically.
pub(crate) const STRIPES: usize = 64;

/// The striped locks of the slow path.
pub(crate) struct Stripes([Mutex<()>; STRIPES]);

impl Stripes {
    pub fn new() -> Self {
        Self(std::array::from_fn(|_| Mutex::new(())))
    }

    fn lock(&self, addr: u64) -> MutexGuard<'_, ()> {
        // 16-byte granules, mixed so that neighbouring granules use different stripes.
        let i = ((addr >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as usize % STRIPES;
        self.0[i].lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Apply `op` to `count` elements of `size` bytes of datatype `ty` in `target` (guest memory
/// `mem`), element `i` with `operands[i]` and `compares[i]`; the values found are written to
/// `old`. Each element is updated atomically (module docs); the elements together are not.
#[allow(clippy::too_many_arguments)]
pub(super) fn execute(
    stripes: &Stripes,
    mem: &GuestMemoryMmap,
    target: &Segs,
    ty: u8,
    op: u8,
    size: usize,
    operands: &[u8],
    compares: &[u8],
    old: &mut [u8],
) -> Result<(), MemFault> {
    let count = old.len() / size;
    let mut seg = 0usize;
    let mut seg_off = 0u64;
    for i in 0..count {
        let at = i * size..(i + 1) * size;
        let (o, c) = (&operands[at.clone()], &compares[at.clone()]);
        // The element's guest address, if it lies in one range of the region.
        while seg < target.segs.len() && seg_off >= u64::from(target.segs[seg].len) {
            seg_off -= u64::from(target.segs[seg].len);
            seg += 1;
        }
        let s = target.segs.get(seg).ok_or(MemFault)?;
        let whole = seg_off + size as u64 <= u64::from(s.len);
        let addr = s.addr.checked_add(seg_off).ok_or(MemFault)?;
        seg_off += size as u64;
        if whole {
            let slice = mem
                .get_slice(GuestAddress(addr), size)
                .map_err(|_| MemFault)?;
            let p = slice.ptr_guard_mut().as_ptr();
            if size <= 8 && (p as usize).is_multiple_of(size) {
                // SAFETY: `p` points to `size` bytes inside a guest memory mapping that the
                // snapshot `mem` keeps mapped for this call (get_slice checked the range), and it
                // is aligned to `size`. Guest memory is shared with other processes, so it is
                // only ever accessed through atomic (or volatile) operations here.
                unsafe { cpu_rmw(p, size, ty, op, o, c, &mut old[at]) };
                continue;
            }
            let _g = stripes.lock(p as u64);
            let mut cur = [0u8; 16];
            slice.copy_to(&mut cur[..size]);
            old[at].copy_from_slice(&cur[..size]);
            apply(ty, op, &mut cur[..size], o, c);
            if cur[..size] != old[i * size..(i + 1) * size] {
                slice.copy_from(&cur[..size]);
            }
        } else {
            // Split across two guest ranges: byte-wise under the stripe of its guest address.
            let off = (i * size) as u64;
            let _g = stripes.lock(addr);
            let mut cur = [0u8; 16];
            target.read_at(mem, off, &mut cur[..size])?;
            old[at].copy_from_slice(&cur[..size]);
            apply(ty, op, &mut cur[..size], o, c);
            target.write_at(mem, off, &cur[..size])?;
        }
    }
    Ok(())
}

/// [`execute`] on a process memory region (`crate::xmem`): each element is read and written
/// back with cross-memory attach under the process's atomics lock, so the device's atomics on
/// it are atomic with respect to each other, not to the application's own CPU accesses.
#[allow(clippy::too_many_arguments)]
pub(super) fn execute_in_process(
    process: &PeerProcess,
    target: &Segs,
    ty: u8,
    op: u8,
    size: usize,
    operands: &[u8],
    compares: &[u8],
    old: &mut [u8],
) -> Result<(), MemFault> {
    let _serial = process.atomics_lock();
    for i in 0..old.len() / size {
        let at = i * size..(i + 1) * size;
        let off = (i * size) as u64;
        let mut cur = [0u8; 16];
        process.read(target, off, &mut cur[..size])?;
        old[at.clone()].copy_from_slice(&cur[..size]);
        apply(
            ty,
            op,
            &mut cur[..size],
            &operands[at.clone()],
            &compares[at.clone()],
        );
        if cur[..size] != old[at] {
            process.write(target, off, &cur[..size])?;
        }
    }
    Ok(())
}

macro_rules! cas_loop {
    ($p:expr, $atomic:ty, $word:ty, $ty:expr, $op:expr, $o:expr, $c:expr, $old:expr) => {{
        // SAFETY: the caller guarantees `$p` is valid for atomic access of this width (see
        // `cpu_rmw`).
        let a = unsafe { &*($p as *const $atomic) };
        let mut cur = a.load(Ordering::Acquire);
        loop {
            // The element's bytes as they lie in guest memory (little-endian values).
            let mut bytes = cur.to_ne_bytes();
            apply($ty, $op, &mut bytes, $o, $c);
            let new = <$word>::from_ne_bytes(bytes);
            if new == cur {
                // Nothing to store (a read, a failed compare): the load is the operation.
                break;
            }
            match a.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(seen) => cur = seen,
            }
        }
        $old.copy_from_slice(&cur.to_ne_bytes());
    }};
}

/// One element of 1, 2, 4 or 8 bytes updated with the CPU's atomics.
///
/// # Safety
/// `p` must be aligned to `size` and valid for reads and writes of `size` bytes for the whole
/// call; `o`, `c` and `old` are `size` bytes long.
unsafe fn cpu_rmw(p: *mut u8, size: usize, ty: u8, op: u8, o: &[u8], c: &[u8], old: &mut [u8]) {
    match size {
        1 => cas_loop!(p, AtomicU8, u8, ty, op, o, c, old),
        2 => cas_loop!(p, AtomicU16, u16, ty, op, o, c, old),
        4 => cas_loop!(p, AtomicU32, u32, ty, op, o, c, old),
        _ => cas_loop!(p, AtomicU64, u64, ty, op, o, c, old),
    }
}

impl Fabric {
    /// Lent the request (as [`Fabric::op_send`]); taken only when it crosses hosts.
    pub(super) fn op_atomic(&self, dev: usize, port: &Port, req: &mut Req, n: &mut Notify) {
        let (me, ddev, dep) = match self.rma_peer(dev, req) {
            Ok(x) => x,
            // A peer host's address: the target's device executes it.
            Err(Status::Unsupported) => return self.atomic_remote(dev, port, req.take(), n),
            Err(s) => return self.fail(dev, port, req, s, n),
        };
        let r = req.req;
        let (op, ty) = (r.atomic_op, r.datatype);
        let Some(size) = dt::size(ty) else {
            return self.fail(dev, port, req, Status::Unsupported, n);
        };
        if op >= aop::COUNT || ATOMIC_TYPES & (1 << ty) == 0 || !op_supported_for(op, ty) {
            return self.fail(dev, port, req, Status::Unsupported, n);
        }
        if !aop::allowed(r.opcode, op) || r.count == 0 || r.count > MAX_ATOMIC_COUNT {
            return self.fail(dev, port, req, Status::Invalid, n);
        }
        let count = r.count as usize;
        let nbytes = count * size;
        let is_cmp = r.opcode == Opcode::CompareAtomic;
        let fetch = r.opcode != Opcode::Atomic;
        let mem = port.mem.memory();
        // Operands: inline in the header for one element of up to 8 bytes (no allocation).
        let mut inline = [0u8; 16];
        let mut heap = Vec::new();
        let (operands, compares): (&[u8], &[u8]) = if op == aop::ATOMIC_READ {
            if req.payload.len != 0 {
                return self.fail(dev, port, req, Status::Invalid, n);
            }
            heap.resize(nbytes, 0);
            (&heap, &heap)
        } else if req.payload.len == 0 && count == 1 && size <= 8 {
            inline[..size].copy_from_slice(&r.data.to_le_bytes()[..size]);
            inline[8..8 + size].copy_from_slice(&r.compare.to_le_bytes()[..size]);
            let (a, b) = inline.split_at(8);
            (&a[..size], &b[..size])
        } else if req.payload.len == (nbytes * if is_cmp { 2 } else { 1 }) as u64 {
            // Operands, then compare values (zeros when the operation has none).
            heap.resize(2 * nbytes, 0);
            let want = if is_cmp { 2 * nbytes } else { nbytes };
            if req.payload.read_at(&mem, 0, &mut heap[..want]).is_err() {
                return self.fail(dev, port, req, Status::Fault, n);
            }
            heap.split_at(nbytes)
        } else {
            return self.fail(dev, port, req, Status::Invalid, n);
        };
        if fetch && req.data.len != nbytes as u64 {
            return self.fail(dev, port, req, Status::BadChain, n);
        }
        let need = match (r.opcode, op) {
            (Opcode::Atomic, _) => mr_flags::REMOTE_WRITE,
            (Opcode::FetchAtomic, aop::ATOMIC_READ) => mr_flags::REMOTE_READ,
            _ => mr_flags::REMOTE_READ | mr_flags::REMOTE_WRITE,
        };
        let (t, dport) = match self.targets_of(
            ddev,
            dep,
            r.peer.generation,
            &[(r.remote_addr, nbytes as u64, r.remote_key)],
            need,
        ) {
            Ok((mut ts, p)) => (ts.pop(), p),
            Err(s) => return self.fail(dev, port, req, s, n),
        };
        let Some(t) = t else {
            return self.fail(dev, port, req, Status::Access, n);
        };
        if r.flags & flags::COMMIT_COMPLETE != 0 && t.mr.pmem.is_none() {
            return self.fail(dev, port, req, Status::Access, n);
        }
        let Some(access) = t.mr.enter() else {
            return self.fail(dev, port, req, Status::Access, n);
        };
        let mut old_inline = [0u8; 16];
        let mut old_heap = Vec::new();
        let old: &mut [u8] = if nbytes <= 16 {
            &mut old_inline[..nbytes]
        } else {
            old_heap.resize(nbytes, 0);
            &mut old_heap
        };
        let rmem = dport.mem.memory();
        let res = match &t.mr.process {
            Some(p) => execute_in_process(p, &t.segs, ty, op, size, operands, compares, old),
            None => execute(
                &self.stripes,
                &rmem,
                &t.segs,
                ty,
                op,
                size,
                operands,
                compares,
                old,
            ),
        };
        drop(access);
        if res.is_err() {
            return self.fail(dev, port, req, Status::Fault, n);
        }
        if r.flags & flags::COMMIT_COMPLETE != 0 {
            let s = self.persist_targets(ddev, std::slice::from_ref(&t));
            if s != Status::Ok {
                return self.fail(dev, port, req, s, n);
            }
        }
        if fetch && req.data.write_at(&mem, 0, old).is_err() {
            return self.fail(dev, port, req, Status::Fault, n);
        }
        drop((mem, rmem));
        let write = op != aop::ATOMIC_READ;
        self.record_events(ddev, dep, me, write, std::slice::from_ref(&t), n);
        let mut c = completion(Status::Ok, r.cookie);
        c.len = (nbytes as u64).into();
        self.done(dev, port, req, &c, if fetch { nbytes as u64 } else { 0 }, n);
    }
}

/// Whether operation `op` is implemented for datatype `ty`: bitwise operations and MSWAP are
/// defined for integers only (as in libfabric).
pub(crate) fn op_supported_for(op: u8, ty: u8) -> bool {
    !(dt::is_float(ty) && matches!(op, aop::BOR | aop::BAND | aop::BXOR | aop::MSWAP))
}

/// An element type of the atomic engine.
trait Elem: Copy + PartialOrd {
    fn load(b: &[u8]) -> Self;
    fn store(self, b: &mut [u8]);
    fn truth(self) -> bool;
    fn from_bool(v: bool) -> Self;
    fn sum(self, o: Self) -> Self;
    fn prod(self, o: Self) -> Self;
    /// BOR, BAND, BXOR and MSWAP (`None` for floating point).
    fn bits(self, op: u8, o: Self, c: Self) -> Option<Self>;
}

/// `Elem::load`/`store` of a type with `from_le_bytes`/`to_le_bytes`.
macro_rules! le_bytes {
    ($t:ty) => {
        fn load(b: &[u8]) -> Self {
            let mut a = [0u8; std::mem::size_of::<$t>()];
            a.copy_from_slice(&b[..std::mem::size_of::<$t>()]);
            <$t>::from_le_bytes(a)
        }
        fn store(self, b: &mut [u8]) {
            b[..std::mem::size_of::<$t>()].copy_from_slice(&self.to_le_bytes());
        }
    };
}

macro_rules! int_elem {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            le_bytes!($t);
            fn truth(self) -> bool {
                self != 0
            }
            fn from_bool(v: bool) -> Self {
                <$t>::from(v)
            }
            fn sum(self, o: Self) -> Self {
                self.wrapping_add(o)
            }
            fn prod(self, o: Self) -> Self {
                self.wrapping_mul(o)
            }
            fn bits(self, op: u8, o: Self, c: Self) -> Option<Self> {
                Some(match op {
                    aop::BOR => self | o,
                    aop::BAND => self & o,
                    aop::BXOR => self ^ o,
                    aop::MSWAP => (o & c) | (self & !c),
                    _ => return None,
                })
            }
        }
    )*};
}
int_elem!(i8, u8, i16, u16, i32, u32, i64, u64, i128, u128);

macro_rules! float_elem {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            le_bytes!($t);
            fn truth(self) -> bool {
                self != 0.0
            }
            fn from_bool(v: bool) -> Self {
                if v { 1.0 } else { 0.0 }
            }
            fn sum(self, o: Self) -> Self {
                self + o
            }
            fn prod(self, o: Self) -> Self {
                self * o
            }
            fn bits(self, _op: u8, _o: Self, _c: Self) -> Option<Self> {
                None
            }
        }
    )*};
}
float_elem!(f32, f64);

/// libfabric semantics of `op` on one element: `t` is the target, `o` the operand, `c` the
/// compare value. Returns the new target value.
fn compute<T: Elem>(op: u8, t: T, o: T, c: T) -> T {
    let store_if = |cond: bool| if cond { o } else { t };
    match op {
        aop::MIN => {
            if o < t {
                o
            } else {
                t
            }
        }
        aop::MAX => {
            if o > t {
                o
            } else {
                t
            }
        }
        aop::SUM => t.sum(o),
        aop::PROD => t.prod(o),
        aop::LOR => T::from_bool(t.truth() || o.truth()),
        aop::LAND => T::from_bool(t.truth() && o.truth()),
        aop::LXOR => T::from_bool(t.truth() != o.truth()),
        aop::ATOMIC_READ => t,
        aop::ATOMIC_WRITE => o,
        aop::CSWAP => store_if(c == t),
        aop::CSWAP_NE => store_if(c != t),
        aop::CSWAP_LE => store_if(c <= t),
        aop::CSWAP_LT => store_if(c < t),
        aop::CSWAP_GE => store_if(c >= t),
        aop::CSWAP_GT => store_if(c > t),
        _ => t.bits(op, o, c).unwrap_or(t),
    }
}

fn apply_as<T: Elem>(op: u8, target: &mut [u8], operand: &[u8], cmp: &[u8]) {
    let v = compute(op, T::load(target), T::load(operand), T::load(cmp));
    v.store(target);
}

/// Apply `op` on one element of datatype `ty` (checked supported by the caller; slices are
/// exactly one element long).
fn apply(ty: u8, op: u8, target: &mut [u8], operand: &[u8], cmp: &[u8]) {
    match ty {
        dt::INT8 => apply_as::<i8>(op, target, operand, cmp),
        dt::UINT8 => apply_as::<u8>(op, target, operand, cmp),
        dt::INT16 => apply_as::<i16>(op, target, operand, cmp),
        dt::UINT16 => apply_as::<u16>(op, target, operand, cmp),
        dt::INT32 => apply_as::<i32>(op, target, operand, cmp),
        dt::UINT32 => apply_as::<u32>(op, target, operand, cmp),
        dt::INT64 => apply_as::<i64>(op, target, operand, cmp),
        dt::UINT64 => apply_as::<u64>(op, target, operand, cmp),
        dt::FLOAT => apply_as::<f32>(op, target, operand, cmp),
        dt::DOUBLE => apply_as::<f64>(op, target, operand, cmp),
        dt::INT128 => apply_as::<i128>(op, target, operand, cmp),
        dt::UINT128 => apply_as::<u128>(op, target, operand, cmp),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::Seg;
    use vm_memory::Bytes;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap()
    }

    fn sum(stripes: &Stripes, m: &GuestMemoryMmap, t: &Segs, ty: u8, size: usize, add: u64) {
        let mut o = [0u8; 16];
        o[..8].copy_from_slice(&add.to_le_bytes());
        let mut old = [0u8; 16];
        execute(
            stripes,
            m,
            t,
            ty,
            aop::SUM,
            size,
            &o[..size],
            &[0u8; 16][..size],
            &mut old[..size],
        )
        .unwrap();
    }

    /// Each path of the engine (CPU word, striped lock, unaligned, split across two ranges)
    /// stays exact under concurrent initiators.
    #[test]
    fn concurrent_sums_are_exact_on_every_path() {
        let m = mem();
        let stripes = Stripes::new();
        let word = Segs::from_slice(&[Seg {
            addr: 0x100,
            len: 8,
        }]);
        let wide = Segs::from_slice(&[Seg {
            addr: 0x200,
            len: 16,
        }]);
        let odd = Segs::from_slice(&[Seg {
            addr: 0x301,
            len: 4,
        }]);
        // Bytes 0x4fe..0x500 then 0x600..0x606: one u64 split over two ranges.
        let split = Segs::from_slice(&[
            Seg {
                addr: 0x4fe,
                len: 2,
            },
            Seg {
                addr: 0x600,
                len: 6,
            },
        ]);
        let (threads, iters) = (4u64, 2000u64);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    for _ in 0..iters {
                        sum(&stripes, &m, &word, dt::UINT64, 8, 1);
                        sum(&stripes, &m, &wide, dt::UINT128, 16, 3);
                        sum(&stripes, &m, &odd, dt::UINT32, 4, 5);
                        sum(&stripes, &m, &split, dt::UINT64, 8, 7);
                    }
                });
            }
        });
        let n = threads * iters;
        assert_eq!(m.read_obj::<u64>(GuestAddress(0x100)).unwrap(), n);
        assert_eq!(
            m.read_obj::<u128>(GuestAddress(0x200)).unwrap(),
            3 * u128::from(n)
        );
        let mut b = [0u8; 4];
        m.read_slice(&mut b, GuestAddress(0x301)).unwrap();
        assert_eq!(u32::from_le_bytes(b), (5 * n) as u32);
        let mut b = [0u8; 8];
        split.read_at(&m, 0, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 7 * n);
    }

    #[test]
    fn fetch_returns_old_values_and_float_cas_is_exact() {
        let m = mem();
        let stripes = Stripes::new();
        let t = Segs::from_slice(&[Seg {
            addr: 0x800,
            len: 8,
        }]);
        m.write_obj(1.5f64.to_bits(), GuestAddress(0x800)).unwrap();
        let mut old = [0u8; 8];
        let o = 2.25f64.to_le_bytes();
        execute(
            &stripes,
            &m,
            &t,
            dt::DOUBLE,
            aop::SUM,
            8,
            &o,
            &[0; 8],
            &mut old,
        )
        .unwrap();
        assert_eq!(f64::from_le_bytes(old), 1.5);
        assert_eq!(
            f64::from_bits(m.read_obj::<u64>(GuestAddress(0x800)).unwrap()),
            3.75
        );
        // A failed compare leaves the target alone and reports it.
        let cmp = 9.0f64.to_le_bytes();
        execute(
            &stripes,
            &m,
            &t,
            dt::DOUBLE,
            aop::CSWAP,
            8,
            &o,
            &cmp,
            &mut old,
        )
        .unwrap();
        assert_eq!(f64::from_le_bytes(old), 3.75);
        assert_eq!(
            f64::from_bits(m.read_obj::<u64>(GuestAddress(0x800)).unwrap()),
            3.75
        );
        // Outside guest memory: a fault, nothing written.
        let bad = Segs::from_slice(&[Seg {
            addr: 0x1_0000,
            len: 8,
        }]);
        assert!(execute(
            &stripes,
            &m,
            &bad,
            dt::UINT64,
            aop::SUM,
            8,
            &o,
            &[0; 8],
            &mut old
        )
        .is_err());
    }

    fn one<T: Elem>(op: u8, t: T, o: T, c: T) -> T {
        compute(op, t, o, c)
    }

    #[test]
    fn integer_ops() {
        assert_eq!(one::<i32>(aop::MIN, 5, -3, 0), -3);
        assert_eq!(one::<u8>(aop::MAX, 5, 3, 0), 5);
        assert_eq!(one::<u8>(aop::SUM, 250, 10, 0), 4);
        assert_eq!(one::<i64>(aop::PROD, -3, 7, 0), -21);
        assert_eq!(one::<u16>(aop::LOR, 0, 9, 0), 1);
        assert_eq!(one::<u16>(aop::LAND, 2, 0, 0), 0);
        assert_eq!(one::<u16>(aop::LXOR, 2, 3, 0), 0);
        assert_eq!(one::<u16>(aop::LXOR, 0, 3, 0), 1);
        assert_eq!(one::<u32>(aop::BOR, 0b1010, 0b0101, 0), 0b1111);
        assert_eq!(one::<u32>(aop::BAND, 0b1010, 0b0110, 0), 0b0010);
        assert_eq!(one::<u32>(aop::BXOR, 0b1010, 0b0110, 0), 0b1100);
        assert_eq!(one::<u64>(aop::ATOMIC_READ, 7, 9, 0), 7);
        assert_eq!(one::<u64>(aop::ATOMIC_WRITE, 7, 9, 0), 9);
        assert_eq!(one::<u64>(aop::CSWAP, 7, 9, 7), 9);
        assert_eq!(one::<u64>(aop::CSWAP, 7, 9, 8), 7);
        assert_eq!(one::<u64>(aop::CSWAP_NE, 7, 9, 8), 9);
        assert_eq!(one::<i8>(aop::CSWAP_LE, 7, 9, 7), 9);
        assert_eq!(one::<i8>(aop::CSWAP_LT, 7, 9, 7), 7);
        assert_eq!(one::<i8>(aop::CSWAP_GE, 7, 9, 8), 9);
        assert_eq!(one::<i8>(aop::CSWAP_GT, 7, 9, 7), 7);
        assert_eq!(one::<u8>(aop::MSWAP, 0xf0, 0x0f, 0x3c), 0xcc);
        assert_eq!(one::<u128>(aop::SUM, u128::MAX, 2, 0), 1);
    }

    #[test]
    fn float_ops() {
        assert_eq!(one::<f64>(aop::SUM, 1.5, 2.25, 0.0), 3.75);
        assert_eq!(one::<f32>(aop::MIN, 1.5, -2.0, 0.0), -2.0);
        assert_eq!(one::<f32>(aop::CSWAP, 1.5, 4.0, 1.5), 4.0);
        assert!(!op_supported_for(aop::BOR, dt::DOUBLE));
        assert!(op_supported_for(aop::BOR, dt::UINT8));
    }
}
