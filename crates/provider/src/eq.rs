// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Event queues (`fid_eq`): connection-management events of MSG endpoints and consumer writes.

use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use vfabric::fi;

use crate::fabric::FabricObj;
use crate::sys;
use crate::util::{
    check, ffi_fns, fid_object, ops_ptr, ops_table, FidObject, ParentRef, Refs, Res, SendPtr,
};

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

impl EqEvent {
    /// A normal event.
    pub fn new(event: u32, bytes: Vec<u8>) -> Self {
        Self::with_err(event, bytes, None)
    }

    /// An event, or an error entry with `(err, prov_errno, err_data)`.
    pub fn with_err(event: u32, bytes: Vec<u8>, err: Option<(i32, i32, Vec<u8>)>) -> Self {
        EqEvent {
            event,
            bytes,
            err,
            info: SendPtr(std::ptr::null_mut()),
        }
    }
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

fid_object!(EqObj, FI_CLASS_EQ, refs: refs);

impl Drop for EqObj {
    fn drop(&mut self) {
        for ev in self
            .q
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            if !ev.info.0.is_null() {
                // SAFETY: an unread CONNREQ's info, allocated by fi_dupinfo.
                unsafe { sys::fi_freeinfo(ev.info.0) };
            }
        }
    }
}

ops_table!(EQ_OPS: fi_ops_eq [read, readerr, write, sread, strerror]);

/// `fi_eq_open`.
pub unsafe extern "C" fn eq_open(
    fabric: *mut sys::fid_fabric,
    attr: *mut sys::fi_eq_attr,
    eq: *mut *mut sys::fid_eq,
    context: *mut c_void,
) -> c_int {
    crate::util::open(fabric, attr, eq, |f: &FabricObj, a| {
        let wait = match a.wait_obj {
            sys::fi_wait_obj_FI_WAIT_NONE
            | sys::fi_wait_obj_FI_WAIT_UNSPEC
            | sys::fi_wait_obj_FI_WAIT_MUTEX_COND
            | sys::fi_wait_obj_FI_WAIT_YIELD => a.wait_obj,
            _ => return Err(fi::ENOSYS),
        };
        Ok(EqObj {
            fid: sys::fid_eq {
                fid: EqObj::fid(context),
                ops: ops_ptr(&EQ_OPS),
            },
            // SAFETY: the fabric refuses to close while this count is held.
            _fabric: unsafe { ParentRef::new(&f.refs) },
            wait,
            q: Mutex::new(VecDeque::new()),
            cv: Condvar::new(),
            sources: Mutex::new(Vec::new()),
            last_err: Mutex::new(Vec::new()),
            refs: Refs::default(),
        })
    })
}

/// Pop (or peek) the head event into `buf`.
fn eq_take(q: &EqObj, event: *mut u32, buf: *mut c_void, len: usize, flags: u64) -> Res<isize> {
    let mut g = q.q.lock().unwrap_or_else(|e| e.into_inner());
    let head = g.front().ok_or(fi::EAGAIN)?;
    if head.err.is_some() {
        return Err(fi::EAVAIL);
    }
    if head.bytes.len() > len {
        return Err(fi::ETOOSMALL);
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
    Ok(n)
}

ffi_fns! {
    fn read(eq: *mut sys::fid_eq, event: *mut u32, buf: *mut c_void, len: usize, flags: u64) -> isize {
        check(!event.is_null() && !buf.is_null())?;
        // SAFETY: consumer passes one of our EQs.
        let q = unsafe { EqObj::from_fid(eq) }?;
        q.progress();
        eq_take(q, event, buf, len, flags)
    }

    fn sread(
        eq: *mut sys::fid_eq, event: *mut u32, buf: *mut c_void, len: usize, timeout: c_int,
        flags: u64,
    ) -> isize {
        check(!event.is_null() && !buf.is_null())?;
        // SAFETY: consumer passes one of our EQs.
        let q = unsafe { EqObj::from_fid(eq) }?;
        if q.wait == sys::fi_wait_obj_FI_WAIT_NONE {
            return Err(fi::ENOSYS);
        }
        let deadline =
            (timeout >= 0).then(|| Instant::now() + Duration::from_millis(timeout as u64));
        loop {
            q.progress();
            match eq_take(q, event, buf, len, flags) {
                Err(fi::EAGAIN) => {}
                r => return r,
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(fi::EAGAIN);
            }
            // Connection messages arrive through the device: poll every 200 µs, waking early
            // on locally queued events.
            let g = q.q.lock().unwrap_or_else(|e| e.into_inner());
            if g.is_empty() {
                let _ = q.cv.wait_timeout(g, Duration::from_micros(200));
            }
        }
    }

    fn readerr(eq: *mut sys::fid_eq, buf: *mut sys::fi_eq_err_entry, flags: u64) -> isize {
        check(!buf.is_null())?;
        // SAFETY: consumer passes one of our EQs.
        let q = unsafe { EqObj::from_fid(eq) }?;
        q.progress();
        let mut g = q.q.lock().unwrap_or_else(|e| e.into_inner());
        let Some(EqEvent { err: Some(_), .. }) = g.front() else {
            return Err(fi::EAGAIN);
        };
        let ev = if flags & fi::PEEK != 0 {
            let h = g.front().expect("checked");
            EqEvent::with_err(h.event, h.bytes.clone(), h.err.clone())
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
        Ok(1)
    }

    fn write(eq: *mut sys::fid_eq, event: u32, buf: *const c_void, len: usize, _flags: u64) -> isize {
        check(!buf.is_null())?;
        // SAFETY: consumer passes one of our EQs.
        let q = unsafe { EqObj::from_fid(eq) }?;
        // SAFETY: `buf` readable for `len` bytes.
        let bytes = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) }.to_vec();
        q.push(EqEvent::new(event, bytes));
        Ok(len as isize)
    }
}

unsafe extern "C" fn strerror(
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
