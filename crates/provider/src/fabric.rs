// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fabric and event queue objects.

use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, Condvar, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use vfabric::fi;

use crate::sys;
use crate::util::{guard, nosys, obj, Refs, SendPtr};

/// `fid_fabric`.
#[repr(C)]
pub struct FabricObj {
    pub fid: sys::fid_fabric,
    pub refs: Refs,
}

static FABRIC_FI_OPS: LazyLock<sys::fi_ops> = LazyLock::new(|| sys::fi_ops {
    size: std::mem::size_of::<sys::fi_ops>(),
    close: Some(fabric_close),
    bind: nosys(),
    control: nosys(),
    ops_open: nosys(),
    tostr: nosys(),
    ops_set: nosys(),
});

static FABRIC_OPS: LazyLock<sys::fi_ops_fabric> = LazyLock::new(|| sys::fi_ops_fabric {
    size: std::mem::size_of::<sys::fi_ops_fabric>(),
    domain: Some(crate::domain::domain_open),
    passive_ep: Some(crate::cm::passive_ep_open),
    eq_open: Some(eq_open),
    wait_open: nosys(),
    trywait: Some(trywait),
    domain2: Some(crate::domain::domain_open2),
});

/// Pointer to a static op table (the core never writes through it).
pub fn ops_ptr<T>(t: &'static T) -> *mut T {
    (t as *const T).cast_mut()
}

/// `fi_fabric` (the provider's `fabric` entry).
pub unsafe extern "C" fn fabric_open(
    attr: *mut sys::fi_fabric_attr,
    fabric: *mut *mut sys::fid_fabric,
    context: *mut c_void,
) -> c_int {
    guard(|| {
        if attr.is_null() || fabric.is_null() {
            return -fi::EINVAL;
        }
        // SAFETY: non-NULL attribute from the consumer; `name` is NULL or a C string.
        let name = unsafe { crate::util::c_str((*attr).name) };
        if name.is_some_and(|n| n != vfabric::FABRIC_NAME) {
            return -fi::EINVAL;
        }
        let obj = Box::new(FabricObj {
            fid: sys::fid_fabric {
                fid: sys::fid {
                    fclass: sys::FI_CLASS_FABRIC as usize,
                    context,
                    ops: crate::fabric::ops_ptr(&*FABRIC_FI_OPS),
                },
                ops: ops_ptr(&*FABRIC_OPS),
                api_version: crate::FI_VERSION_1_17,
            },
            refs: Refs::default(),
        });
        // SAFETY: `fabric` is a valid out pointer; ownership of the box passes to the
        // consumer until fi_close.
        unsafe { *fabric = Box::into_raw(obj).cast() };
        0
    })
}

unsafe extern "C" fn fabric_close(fid: *mut sys::fid) -> c_int {
    guard(|| {
        // SAFETY: consumer passes the fid of a fabric we created.
        let f = match unsafe { obj::<FabricObj>(fid, sys::FI_CLASS_FABRIC) } {
            Ok(f) => f,
            Err(e) => return -e,
        };
        if f.refs.busy() {
            return -fi::EBUSY;
        }
        // SAFETY: created by Box::into_raw in fabric_open; no child references it.
        drop(unsafe { Box::from_raw(fid.cast::<FabricObj>()) });
        0
    })
}

unsafe extern "C" fn trywait(
    _f: *mut sys::fid_fabric,
    fids: *mut *mut sys::fid,
    n: c_int,
) -> c_int {
    guard(|| {
        if fids.is_null() && n > 0 {
            return -fi::EINVAL;
        }
        for k in 0..n.max(0) as usize {
            // SAFETY: `fids` holds `n` fid pointers.
            let f = unsafe { *fids.add(k) };
            if f.is_null() {
                return -fi::EINVAL;
            }
            // SAFETY: non-NULL consumer fid.
            let r = match unsafe { (*f).fclass } as u32 {
                sys::FI_CLASS_CQ => crate::domain::trywait_cq(f),
                _ => -fi::ENOSYS,
            };
            if r != 0 {
                return r;
            }
        }
        0
    })
}

// ---------------------------------------------------------------------------------------------
// Event queue
// ---------------------------------------------------------------------------------------------

/// Something that produces EQ events when progressed (connection management state).
pub trait EqSource: Send + Sync {
    fn progress(&self, eq: &EqObj);
}

/// One queued event: the serialized entry the consumer reads.
pub struct EqEvent {
    pub event: u32,
    pub bytes: Vec<u8>,
    /// Error entry (`fi_eq_err_entry` fields besides the serialized header).
    pub err: Option<(i32, i32, Vec<u8>)>,
    /// An `fi_info` owned by the event until read (freed if the EQ closes first).
    pub info: SendPtr<sys::fi_info>,
}

/// `fid_eq`.
#[repr(C)]
pub struct EqObj {
    pub fid: sys::fid_eq,
    _fabric: crate::util::ParentRef,
    wait: u32,
    q: Mutex<VecDeque<EqEvent>>,
    cv: Condvar,
    sources: Mutex<Vec<Weak<dyn EqSource>>>,
    last_err: Mutex<Vec<u8>>,
    pub refs: Refs,
}

impl EqObj {
    /// Queue a normal event (`fi_eq_entry` or `fi_eq_cm_entry` bytes).
    pub fn push(&self, ev: EqEvent) {
        self.q
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(ev);
        self.cv.notify_all();
    }

    pub fn add_source(&self, s: Weak<dyn EqSource>) {
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(s);
    }

    fn progress(&self) {
        let sources: Vec<Arc<dyn EqSource>> = {
            let mut g = self.sources.lock().unwrap_or_else(|e| e.into_inner());
            g.retain(|w| w.strong_count() > 0);
            g.iter().filter_map(|w| w.upgrade()).collect()
        };
        for s in sources {
            s.progress(self);
        }
    }
}

/// Serialize an `fi_eq_entry`.
pub fn eq_entry_bytes(fid: *mut sys::fid, context: *mut c_void, data: u64) -> Vec<u8> {
    let e = sys::fi_eq_entry { fid, context, data };
    // SAFETY: `e` is a plain repr(C) struct; viewing it as bytes is sound.
    unsafe {
        std::slice::from_raw_parts(
            (&e as *const sys::fi_eq_entry).cast::<u8>(),
            std::mem::size_of_val(&e),
        )
    }
    .to_vec()
}

/// Serialize an `fi_eq_cm_entry` followed by its private data.
pub fn eq_cm_bytes(fid: *mut sys::fid, info: *mut sys::fi_info, data: &[u8]) -> Vec<u8> {
    let e = sys::fi_eq_cm_entry {
        fid,
        info,
        data: Default::default(),
    };
    let hdr = std::mem::size_of::<sys::fi_eq_cm_entry>();
    // SAFETY: plain repr(C) struct viewed as bytes.
    let mut v =
        unsafe { std::slice::from_raw_parts((&e as *const sys::fi_eq_cm_entry).cast::<u8>(), hdr) }
            .to_vec();
    v.extend_from_slice(data);
    v
}

static EQ_FI_OPS: LazyLock<sys::fi_ops> = LazyLock::new(|| sys::fi_ops {
    size: std::mem::size_of::<sys::fi_ops>(),
    close: Some(eq_close),
    bind: nosys(),
    control: Some(eq_control),
    ops_open: nosys(),
    tostr: nosys(),
    ops_set: nosys(),
});

static EQ_OPS: LazyLock<sys::fi_ops_eq> = LazyLock::new(|| sys::fi_ops_eq {
    size: std::mem::size_of::<sys::fi_ops_eq>(),
    read: Some(eq_read),
    readerr: Some(eq_readerr),
    write: Some(eq_write),
    sread: Some(eq_sread),
    strerror: Some(eq_strerror),
});

unsafe extern "C" fn eq_open(
    fabric: *mut sys::fid_fabric,
    attr: *mut sys::fi_eq_attr,
    eq: *mut *mut sys::fid_eq,
    context: *mut c_void,
) -> c_int {
    guard(|| {
        if attr.is_null() || eq.is_null() {
            return -fi::EINVAL;
        }
        // SAFETY: consumer passes its fabric.
        let f = match unsafe { obj::<FabricObj>(fabric.cast(), sys::FI_CLASS_FABRIC) } {
            Ok(f) => f,
            Err(e) => return -e,
        };
        // SAFETY: non-NULL attribute.
        let a = unsafe { &*attr };
        let wait = match a.wait_obj {
            sys::fi_wait_obj_FI_WAIT_NONE
            | sys::fi_wait_obj_FI_WAIT_UNSPEC
            | sys::fi_wait_obj_FI_WAIT_MUTEX_COND
            | sys::fi_wait_obj_FI_WAIT_YIELD => a.wait_obj,
            _ => return -fi::ENOSYS,
        };
        let obj = Box::new(EqObj {
            fid: sys::fid_eq {
                fid: sys::fid {
                    fclass: sys::FI_CLASS_EQ as usize,
                    context,
                    ops: ops_ptr(&*EQ_FI_OPS),
                },
                ops: ops_ptr(&*EQ_OPS),
            },
            // SAFETY: the fabric refuses to close while this count is held.
            _fabric: unsafe { crate::util::ParentRef::new(&f.refs) },
            wait,
            q: Mutex::new(VecDeque::new()),
            cv: Condvar::new(),
            sources: Mutex::new(Vec::new()),
            last_err: Mutex::new(Vec::new()),
            refs: Refs::default(),
        });
        // SAFETY: valid out pointer; the box is owned by the consumer until fi_close.
        unsafe { *eq = Box::into_raw(obj).cast() };
        0
    })
}

unsafe extern "C" fn eq_close(fid: *mut sys::fid) -> c_int {
    guard(|| {
        // SAFETY: consumer passes one of our EQs.
        let q = match unsafe { obj::<EqObj>(fid, sys::FI_CLASS_EQ) } {
            Ok(q) => q,
            Err(e) => return -e,
        };
        if q.refs.busy() {
            return -fi::EBUSY;
        }
        // SAFETY: created by Box::into_raw in eq_open; nothing references it any more.
        let b = unsafe { Box::from_raw(fid.cast::<EqObj>()) };
        for ev in b.q.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            if !ev.info.0.is_null() {
                // SAFETY: an unread CONNREQ's info, allocated by fi_dupinfo.
                unsafe { sys::fi_freeinfo(ev.info.0) };
            }
        }
        0
    })
}

unsafe extern "C" fn eq_control(_fid: *mut sys::fid, _cmd: c_int, _arg: *mut c_void) -> c_int {
    -fi::ENOSYS
}

/// Pop (or peek) the head event into `buf`.
fn eq_take(q: &EqObj, event: *mut u32, buf: *mut c_void, len: usize, flags: u64) -> isize {
    let mut g = q.q.lock().unwrap_or_else(|e| e.into_inner());
    let Some(head) = g.front() else {
        return -(fi::EAGAIN as isize);
    };
    if head.err.is_some() {
        return -(fi::EAVAIL as isize);
    }
    if head.bytes.len() > len {
        return -(fi::ETOOSMALL as isize);
    }
    // SAFETY: `event` non-NULL (checked by the caller); `buf` non-NULL and writable for `len`
    // bytes ≥ the entry size.
    unsafe {
        *event = head.event;
        std::ptr::copy_nonoverlapping(head.bytes.as_ptr(), buf.cast::<u8>(), head.bytes.len());
    }
    let n = head.bytes.len() as isize;
    if flags & fi::PEEK == 0 {
        g.pop_front();
    }
    n
}

unsafe extern "C" fn eq_read(
    eq: *mut sys::fid_eq,
    event: *mut u32,
    buf: *mut c_void,
    len: usize,
    flags: u64,
) -> isize {
    guard(|| {
        if event.is_null() || buf.is_null() {
            return -(fi::EINVAL as isize);
        }
        // SAFETY: consumer passes one of our EQs.
        let q = match unsafe { obj::<EqObj>(eq.cast(), sys::FI_CLASS_EQ) } {
            Ok(q) => q,
            Err(e) => return -(e as isize),
        };
        q.progress();
        eq_take(q, event, buf, len, flags)
    })
}

unsafe extern "C" fn eq_sread(
    eq: *mut sys::fid_eq,
    event: *mut u32,
    buf: *mut c_void,
    len: usize,
    timeout: c_int,
    flags: u64,
) -> isize {
    guard(|| {
        if event.is_null() || buf.is_null() {
            return -(fi::EINVAL as isize);
        }
        // SAFETY: consumer passes one of our EQs.
        let q = match unsafe { obj::<EqObj>(eq.cast(), sys::FI_CLASS_EQ) } {
            Ok(q) => q,
            Err(e) => return -(e as isize),
        };
        if q.wait == sys::fi_wait_obj_FI_WAIT_NONE {
            return -(fi::ENOSYS as isize);
        }
        let deadline =
            (timeout >= 0).then(|| Instant::now() + Duration::from_millis(timeout as u64));
        loop {
            q.progress();
            let r = eq_take(q, event, buf, len, flags);
            if r != -(fi::EAGAIN as isize) {
                return r;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return -(fi::EAGAIN as isize);
            }
            // Connection messages arrive through the device: poll every 200 µs, waking early
            // on locally queued events.
            let g = q.q.lock().unwrap_or_else(|e| e.into_inner());
            if g.is_empty() {
                let _ = q.cv.wait_timeout(g, Duration::from_micros(200));
            }
        }
    })
}

unsafe extern "C" fn eq_readerr(
    eq: *mut sys::fid_eq,
    buf: *mut sys::fi_eq_err_entry,
    flags: u64,
) -> isize {
    guard(|| {
        if buf.is_null() {
            return -(fi::EINVAL as isize);
        }
        // SAFETY: consumer passes one of our EQs.
        let q = match unsafe { obj::<EqObj>(eq.cast(), sys::FI_CLASS_EQ) } {
            Ok(q) => q,
            Err(e) => return -(e as isize),
        };
        q.progress();
        let mut g = q.q.lock().unwrap_or_else(|e| e.into_inner());
        let Some(EqEvent { err: Some(_), .. }) = g.front() else {
            return -(fi::EAGAIN as isize);
        };
        let ev = if flags & fi::PEEK != 0 {
            let h = g.front().expect("checked");
            EqEvent {
                event: h.event,
                bytes: h.bytes.clone(),
                err: h.err.clone(),
                info: SendPtr(std::ptr::null_mut()),
            }
        } else {
            g.pop_front().expect("checked")
        };
        drop(g);
        let (err, prov_errno, data) = ev.err.unwrap_or_default();
        // SAFETY: `bytes` holds a serialized fi_eq_entry (fid, context, data).
        let hdr: sys::fi_eq_entry = unsafe { std::ptr::read_unaligned(ev.bytes.as_ptr().cast()) };
        // SAFETY: `buf` non-NULL, a consumer fi_eq_err_entry.
        let out = unsafe { &mut *buf };
        let user_buf = out.err_data_size > 0 && !out.err_data.is_null();
        out.fid = hdr.fid;
        out.context = hdr.context;
        out.data = hdr.data;
        out.err = err;
        out.prov_errno = prov_errno;
        if user_buf {
            let n = data.len().min(out.err_data_size);
            // SAFETY: the consumer's err_data buffer is writable for err_data_size bytes.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), out.err_data.cast::<u8>(), n) };
            out.err_data_size = n;
        } else {
            let mut keep = q.last_err.lock().unwrap_or_else(|e| e.into_inner());
            *keep = data;
            out.err_data = if keep.is_empty() {
                std::ptr::null_mut()
            } else {
                keep.as_mut_ptr().cast()
            };
            out.err_data_size = keep.len();
        }
        1
    })
}

unsafe extern "C" fn eq_write(
    eq: *mut sys::fid_eq,
    event: u32,
    buf: *const c_void,
    len: usize,
    _flags: u64,
) -> isize {
    guard(|| {
        if buf.is_null() {
            return -(fi::EINVAL as isize);
        }
        // SAFETY: consumer passes one of our EQs.
        let q = match unsafe { obj::<EqObj>(eq.cast(), sys::FI_CLASS_EQ) } {
            Ok(q) => q,
            Err(e) => return -(e as isize),
        };
        // SAFETY: `buf` readable for `len` bytes.
        let bytes = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) }.to_vec();
        q.push(EqEvent {
            event,
            bytes,
            err: None,
            info: SendPtr(std::ptr::null_mut()),
        });
        len as isize
    })
}

unsafe extern "C" fn eq_strerror(
    _eq: *mut sys::fid_eq,
    prov_errno: c_int,
    _err_data: *const c_void,
    buf: *mut c_char,
    len: usize,
) -> *const c_char {
    // SAFETY: fi_strerror returns a static string for any value.
    let s = unsafe { sys::fi_strerror(prov_errno.abs()) };
    if !buf.is_null() && len > 0 {
        // SAFETY: `buf` writable for `len` bytes; strncpy stops at len - 1 and we terminate.
        unsafe {
            libc::strncpy(buf, s, len - 1);
            *buf.add(len - 1) = 0;
        }
    }
    s
}
