// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! FFI plumbing: return conventions, `-FI_ENOSYS` stubs for every op-table slot, panic guards,
//! logging through the core's `fi_log`, and small C string helpers.

use std::ffi::{c_char, c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use vfabric::fi;

use crate::sys;

/// A C return type that can carry a negative libfabric errno.
pub trait Ret: Sized {
    fn err(errno: i32) -> Self;
}

impl Ret for c_int {
    fn err(errno: i32) -> Self {
        -errno
    }
}

impl Ret for isize {
    fn err(errno: i32) -> Self {
        -(errno as isize)
    }
}

/// A function-pointer type with a `-FI_ENOSYS` implementation (for the slots we do not
/// implement: a consumer calling them gets an error, never a NULL call).
pub trait Enosys: Sized {
    fn enosys() -> Self;
}

macro_rules! impl_enosys {
    ($($a:ident),*) => {
        impl<$($a,)* R: Ret> Enosys for unsafe extern "C" fn($($a),*) -> R {
            fn enosys() -> Self {
                #[allow(non_snake_case)]
                unsafe extern "C" fn stub<$($a,)* R: Ret>($(_: $a),*) -> R {
                    R::err(fi::ENOSYS)
                }
                stub::<$($a,)* R>
            }
        }
    };
}

impl_enosys!(A);
impl_enosys!(A, B);
impl_enosys!(A, B, C);
impl_enosys!(A, B, C, D);
impl_enosys!(A, B, C, D, E);
impl_enosys!(A, B, C, D, E, F);
impl_enosys!(A, B, C, D, E, F, G);
impl_enosys!(A, B, C, D, E, F, G, H);
impl_enosys!(A, B, C, D, E, F, G, H, I);
impl_enosys!(A, B, C, D, E, F, G, H, I, J);
impl_enosys!(A, B, C, D, E, F, G, H, I, J, K);
impl_enosys!(A, B, C, D, E, F, G, H, I, J, K, L);
impl_enosys!(A, B, C, D, E, F, G, H, I, J, K, L, M);
impl_enosys!(A, B, C, D, E, F, G, H, I, J, K, L, M, N);
impl_enosys!(A, B, C, D, E, F, G, H, I, J, K, L, M, N, O);
impl_enosys!(A, B, C, D, E, F, G, H, I, J, K, L, M, N, O, P);
impl_enosys!(A, B, C, D, E, F, G, H, I, J, K, L, M, N, O, P, Q);

/// `Some(stub)` for an op-table slot we do not implement.
pub fn nosys<T: Enosys>() -> Option<T> {
    Some(T::enosys())
}

/// Run an entry point's body; a panic becomes `-FI_EOTHER` instead of unwinding into C.
pub fn guard<R: Ret>(f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => {
            log(
                sys::fi_log_level_FI_LOG_WARN,
                sys::fi_log_subsys_FI_LOG_CORE,
                "internal panic caught at the FFI boundary",
            );
            R::err(fi::EOTHER)
        }
    }
}

/// Driver error → errno, logged at debug level.
#[track_caller]
pub fn errno_of(e: &vfabric::Error, subsys: sys::fi_log_subsys) -> i32 {
    let n = e.errno();
    if let vfabric::Error::OutOfMemory { requested } = e {
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            warn(
                subsys,
                &format!(
                    "the domain's shared memory region cannot hold {requested} bytes for this \
                     request (-FI_ENOMEM): raise FI_VFABRIC_MEM_MB (MiB, default 64) or use \
                     registered buffers"
                ),
            );
        }
    }
    if n != fi::EAGAIN && n != fi::EAVAIL {
        log(
            sys::fi_log_level_FI_LOG_DEBUG,
            subsys,
            &format!("{e} (errno {n})"),
        );
    }
    n
}

/// Log through the core (`FI_LOG_LEVEL`, `FI_LOG_PROV`, `FI_LOG_SUBSYS` apply; a logger the
/// consumer imported with `fi_import_log` receives it). The "function" is the provider module
/// of the caller (the Rust file, e.g. `domain`) and the line is the caller's line there.
#[track_caller]
pub fn log(level: sys::fi_log_level, subsys: sys::fi_log_subsys, msg: &str) {
    let at = std::panic::Location::caller();
    let prov = crate::provider_ptr();
    // SAFETY: `prov` points at our static provider; fi_log_enabled only reads it and the
    // core's log settings.
    if unsafe { sys::fi_log_enabled(prov, level, subsys) } == 0 {
        return;
    }
    let Ok(m) = CString::new(msg.replace('\0', " ")) else {
        return;
    };
    let module = std::path::Path::new(at.file())
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("vfabric");
    let Ok(func) = CString::new(module) else {
        return;
    };
    // SAFETY: all strings are NUL-terminated and live across the call; the format "%s\n"
    // consumes exactly the one `char *` vararg passed.
    unsafe {
        sys::fi_log(
            prov,
            level,
            subsys,
            func.as_ptr(),
            at.line() as i32,
            c"%s\n".as_ptr(),
            m.as_ptr(),
        )
    };
}

#[track_caller]
pub fn warn(subsys: sys::fi_log_subsys, msg: &str) {
    log(sys::fi_log_level_FI_LOG_WARN, subsys, msg)
}

#[track_caller]
pub fn info(subsys: sys::fi_log_subsys, msg: &str) {
    log(sys::fi_log_level_FI_LOG_INFO, subsys, msg)
}

#[track_caller]
pub fn debug(subsys: sys::fi_log_subsys, msg: &str) {
    log(sys::fi_log_level_FI_LOG_DEBUG, subsys, msg)
}

/// `strdup` into malloc'd memory (the core frees `fi_info` strings with `free`).
pub fn c_strdup(s: &str) -> *mut c_char {
    let Ok(c) = CString::new(s.replace('\0', " ")) else {
        return std::ptr::null_mut();
    };
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    unsafe { libc::strdup(c.as_ptr()) }
}

/// Read a C string argument (NULL → None; invalid UTF-8 is replaced).
///
/// # Safety
/// `p` is NULL or a NUL-terminated string valid for reads.
pub unsafe fn c_str(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-NULL and NUL-terminated per the caller's contract.
    Some(
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Copy `s` with a NUL into `buf[..*len]` (truncating), set `*len` to the length needed
/// (NUL included), as `fi_av_straddr`/`fi_tostr`-style calls do.
///
/// # Safety
/// `buf` is NULL or writable for `*len` bytes; `len` is a valid pointer.
pub unsafe fn copy_str_out(s: &str, buf: *mut c_char, len: *mut usize) {
    let bytes = s.as_bytes();
    // SAFETY: `len` is valid per the caller's contract.
    let cap = unsafe { *len };
    if !buf.is_null() && cap > 0 {
        let n = bytes.len().min(cap - 1);
        // SAFETY: `buf` is writable for `cap` bytes and `n + 1 <= cap`.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), n);
            *buf.add(n) = 0;
        }
    }
    // SAFETY: as above.
    unsafe { *len = bytes.len() + 1 };
}

/// A `Sync` cell for the static provider structure and op tables the core reads.
pub struct Static<T>(pub std::cell::UnsafeCell<T>);

// SAFETY: the op tables are written once before any pointer to them is handed out (and never
// again); the provider structure is written only by the core under its own init lock.
unsafe impl<T> Sync for Static<T> {}

/// Cast a `fid` to our object type after checking its class.
///
/// # Safety
/// `fid` is NULL or points at a live object of class `class` created by this provider (the
/// consumer contract of every libfabric call); the returned reference must not outlive it.
pub unsafe fn obj<'a, T>(fid: *const sys::fid, class: u32) -> Result<&'a T, i32> {
    if fid.is_null() {
        return Err(fi::EINVAL);
    }
    // SAFETY: non-NULL and, per the caller's contract, a valid fid.
    if unsafe { (*fid).fclass } != class as usize {
        return Err(fi::EINVAL);
    }
    // SAFETY: our objects of this class are `#[repr(C)]` with the fid structure first, so the
    // fid address is the object address.
    Ok(unsafe { &*fid.cast::<T>() })
}

/// Reference count of an object's children (closing with children open is `-FI_EBUSY`).
#[derive(Default)]
pub struct Refs(pub std::sync::atomic::AtomicUsize);

impl Refs {
    pub fn get(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
    pub fn put(&self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
    pub fn busy(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire) > 0
    }
}

/// A parent's [`Refs`], held by a child until it closes.
pub struct ParentRef(*const Refs);

impl ParentRef {
    /// # Safety
    /// `r` must stay valid until this `ParentRef` is dropped (guaranteed because the parent
    /// refuses to close while its count is non-zero).
    pub unsafe fn new(r: &Refs) -> Self {
        r.get();
        Self(r)
    }
}

impl Drop for ParentRef {
    fn drop(&mut self) {
        // SAFETY: the parent is alive while this reference is counted (see `new`).
        unsafe { (*self.0).put() }
    }
}

// SAFETY: `Refs` is atomic; the pointer is only dereferenced for atomic updates.
unsafe impl Send for ParentRef {}
// SAFETY: as above.
unsafe impl Sync for ParentRef {}

/// A raw pointer that may be stored in `Send + Sync` state (the pointee is a provider object
/// kept alive by a [`ParentRef`]-style count, or a consumer pointer only handed back to C).
#[derive(Clone, Copy, Debug)]
pub struct SendPtr<T>(pub *mut T);
// SAFETY: only handed back to C or dereferenced under the invariants documented at each use.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> Default for SendPtr<T> {
    fn default() -> Self {
        Self(std::ptr::null_mut())
    }
}
