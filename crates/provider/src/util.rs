// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! FFI plumbing: return conventions, `-FI_ENOSYS` stubs for every op-table slot, panic guards,
//! logging through the core's `fi_log`, and small C string helpers.

use std::ffi::{c_char, c_int, c_void, CString};
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
    const ENOSYS: Self;
}

macro_rules! impl_enosys {
    () => {};
    ($a0:ident $(, $a:ident)*) => {
        impl<$a0, $($a,)* R: Ret> Enosys for unsafe extern "C" fn($a0, $($a),*) -> R {
            const ENOSYS: Self = {
                #[allow(non_snake_case)]
                unsafe extern "C" fn stub<$a0, $($a,)* R: Ret>(_: $a0, $(_: $a),*) -> R {
                    R::err(fi::ENOSYS)
                }
                stub::<$a0, $($a,)* R>
            };
        }
        impl_enosys!($($a),*);
    };
}

// Every arity of libfabric's op-table slots (up to 17 arguments).
impl_enosys!(A, B, C, D, E, F, G, H, I, J, K, L, M, N, O, P, Q);

/// `Some(stub)` for an op-table slot we do not implement.
pub const fn nosys<T: Enosys>() -> Option<T> {
    Some(T::ENOSYS)
}

/// A `const` libfabric op table: `size` filled in, listed slots implemented, slots listed
/// without a function `-FI_ENOSYS`; `[a, b]` implements each slot by the function of its name.
macro_rules! ops_table {
    ($vis:vis $name:ident: $ty:ident { $($slot:ident $(= $f:expr)?),* $(,)? }) => {
        $vis static $name: $crate::sys::$ty = $crate::sys::$ty {
            size: std::mem::size_of::<$crate::sys::$ty>(),
            $($slot: ops_table!(@slot $($f)?),)*
        };
    };
    ($vis:vis $name:ident: $ty:ident [$($slot:ident),* $(,)?]) => {
        ops_table!($vis $name: $ty { $($slot = $slot),* });
    };
    (@slot) => { $crate::util::nosys() };
    (@slot $f:expr) => { Some($f) };
}
pub(crate) use ops_table;

/// `extern "C"` entry points whose bodies return [`Res`]: `?` propagates errnos, a panic
/// becomes `-FI_EOTHER` (see [`ffi`]).
macro_rules! ffi_fns {
    ($($(#[$m:meta])* $vis:vis fn $name:ident($($a:tt: $t:ty),* $(,)?) -> $r:ty $body:block)*) => {$(
        $(#[$m])*
        #[allow(clippy::too_many_arguments, clippy::missing_safety_doc)]
        $vis unsafe extern "C" fn $name($($a: $t),*) -> $r {
            $crate::util::ffi(|| -> $crate::util::Res<$r> { $body })
        }
    )*};
}
pub(crate) use ffi_fns;

/// A positive libfabric errno on failure.
pub type Res<T = ()> = Result<T, i32>;

/// An entry point's body: `Err(errno)` becomes `-errno`, a panic `-FI_EOTHER`.
pub fn ffi<R: Ret>(f: impl FnOnce() -> Res<R>) -> R {
    guard(|| f().unwrap_or_else(R::err))
}

/// Driver results to errnos (logged as [`errno_of`] does).
pub trait OrErrno<T> {
    fn or_errno(self, subsys: sys::fi_log_subsys) -> Res<T>;
}

impl<T> OrErrno<T> for vfabric::Result<T> {
    #[track_caller]
    fn or_errno(self, subsys: sys::fi_log_subsys) -> Res<T> {
        self.map_err(|e| errno_of(&e, subsys))
    }
}

/// `Err(EINVAL)` unless `ok`.
pub fn check(ok: bool) -> Res {
    if ok {
        Ok(())
    } else {
        Err(fi::EINVAL)
    }
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

/// Pointer to a static op table (the core never writes through it).
pub const fn ops_ptr<T>(t: &'static T) -> *mut T {
    (t as *const T).cast_mut()
}

/// A provider object handed to the consumer as a `struct fid_*`: one generic open, install
/// and close for every class.
///
/// # Safety
/// Implementors are `#[repr(C)]` with their `fid_*` structure (which starts with `struct fid`)
/// as the first field, and are created with `fclass == CLASS` (through [`FidObject::fid`]).
pub unsafe trait FidObject: Sized {
    const CLASS: u32;
    /// The class's `fi_ops` (close, bind, control, ...).
    const FI_OPS: &'static sys::fi_ops;

    /// Objects opened under or bound to this one: closing while any is open is `-FI_EBUSY`.
    fn refs(&self) -> Option<&Refs> {
        None
    }

    /// Work before `fi_close` frees the object.
    fn closing(&self) {}

    /// The `struct fid` header of a new object.
    fn fid(context: *mut c_void) -> sys::fid {
        sys::fid {
            fclass: Self::CLASS as usize,
            context,
            ops: ops_ptr(Self::FI_OPS),
        }
    }

    /// Our object behind a consumer's fid pointer (class checked).
    ///
    /// # Safety
    /// `fid` is NULL or a live fid (the consumer contract of every libfabric call); the
    /// reference must not outlive the object.
    unsafe fn from_fid<'a, F>(fid: *const F) -> Res<&'a Self> {
        // SAFETY: per this function's contract.
        unsafe { obj(fid.cast(), Self::CLASS) }
    }

    /// Hand the object to the consumer (`*out`, owned until `fi_close`).
    fn install<F>(self, out: *mut *mut F) -> Res<*mut Self> {
        check(!out.is_null())?;
        let p = Box::into_raw(Box::new(self));
        // SAFETY: `out` is the consumer's non-NULL out pointer.
        unsafe { *out = p.cast() };
        Ok(p)
    }
}

/// An `fi_ops` whose `close` is [`close::<T>`] and every other slot `-FI_ENOSYS` (override
/// slots with struct update syntax).
pub const fn fi_ops<T: FidObject>() -> sys::fi_ops {
    sys::fi_ops {
        size: std::mem::size_of::<sys::fi_ops>(),
        close: Some(close::<T>),
        bind: nosys(),
        control: nosys(),
        ops_open: nosys(),
        tostr: nosys(),
        ops_set: nosys(),
    }
}

/// `unsafe impl FidObject` for a `#[repr(C)]` object whose first field is its `fid_*`:
/// `fid_object!(Type, FI_CLASS_X [, refs: field] [, closing: fn(&Type)] [, fi_ops { slot: f, .. }])`.
macro_rules! fid_object {
    ($t:ident, $class:ident $(, refs: $refs:ident)? $(, closing: $closing:expr)?
     $(, fi_ops { $($slot:ident: $f:expr),* $(,)? })?) => {
        // SAFETY: `$t` is repr(C) with its `fid_*` structure first, and is created through
        // `FidObject::fid`.
        unsafe impl $crate::util::FidObject for $t {
            const CLASS: u32 = $crate::sys::$class;
            const FI_OPS: &'static $crate::sys::fi_ops = &$crate::sys::fi_ops {
                $($($slot: Some($f),)*)?
                ..$crate::util::fi_ops::<$t>()
            };
            $(fn refs(&self) -> Option<&$crate::util::Refs> {
                Some(&self.$refs)
            })?
            $(fn closing(&self) {
                ($closing)(self)
            })?
        }
    };
}
pub(crate) use fid_object;

/// The generic opener: check the out pointer, find the parent (class checked) and the
/// attributes, build the object and install it. `parent`, `attr` and `out` are the
/// consumer's (NULL, or a live fid, valid attributes and a writable pointer: the contract of
/// every libfabric open call); a NULL is `-FI_EINVAL`.
pub fn open<P: FidObject, A, T: FidObject, F, G>(
    parent: *mut G,
    attr: *const A,
    out: *mut *mut F,
    make: impl FnOnce(&P, &A) -> Res<T>,
) -> c_int {
    ffi(|| {
        check(!out.is_null())?;
        // SAFETY: the consumer's parent fid and attributes (see above).
        let (p, a) = unsafe { (P::from_fid(parent)?, attr.as_ref().ok_or(fi::EINVAL)?) };
        make(p, a)?.install(out)?;
        Ok(0)
    })
}

/// `fi_close` of any of our classes: refused while children are open, else the object is
/// freed (its `Drop` releases what it holds).
pub unsafe extern "C" fn close<T: FidObject>(fid: *mut sys::fid) -> c_int {
    ffi(|| {
        // SAFETY: consumer passes one of our objects (class checked).
        let o = unsafe { T::from_fid(fid) }?;
        if o.refs().is_some_and(Refs::busy) {
            return Err(fi::EBUSY);
        }
        o.closing();
        // SAFETY: created by `install` (Box::into_raw); nothing references it any more.
        drop(unsafe { Box::from_raw(fid.cast::<T>()) });
        Ok(0)
    })
}

/// A consumer's C array as a slice (NULL with `n == 0` is empty).
///
/// # Safety
/// `p` is NULL or valid for reads of `n` elements for `'a`.
pub unsafe fn slice<'a, T>(p: *const T, n: usize) -> Res<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    check(!p.is_null())?;
    // SAFETY: per this function's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}
