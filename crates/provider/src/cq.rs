// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Completion queues (`fid_cq`): every read variant goes through one body,
//! [`cq_read_common`].

use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use vfabric::proto::Status;
use vfabric::{fi, CompletionQueue, CqAttr, CqEntry, WaitMode};

use crate::domain::DomainObj;
use crate::sys;
use crate::util::{
    check, copy_str_out, errno_of, ffi_fns, fid_object, ops_ptr, ops_table, FidObject, OrErrno,
    ParentRef, Refs, Res, SendPtr,
};

/// FI_WAIT_FD state: the signal fd, the stop flag and handle of its progress thread.
type WaitFd = (
    c_int,
    Arc<AtomicBool>,
    Mutex<Option<std::thread::JoinHandle<()>>>,
);

/// `fid_cq`.
#[repr(C)]
pub struct CqObj {
    pub fid: sys::fid_cq,
    _domain: ParentRef,
    domain: *const DomainObj,
    pub cq: Arc<CompletionQueue>,
    format: u32,
    /// FI_WAIT_FD: the pollable signal fd and the progress thread that makes it fire.
    wait_fd: Option<WaitFd>,
    /// Gone peers of the domain this CQ has reported (crate::watch).
    peers_gone_seen: Arc<AtomicUsize>,
    pub refs: Refs,
}

fid_object!(CqObj, FI_CLASS_CQ, refs: refs, closing: CqObj::stop_progress, fi_ops {
    control: cq_control
});

impl CqObj {
    /// Stop the FI_WAIT_FD progress thread before the CQ goes.
    fn stop_progress(&self) {
        if let Some((_, stop, t)) = &self.wait_fd {
            stop.store(true, Ordering::Release);
            if let Some(t) = t.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = t.join();
            }
        }
    }
}

ops_table!(CQ_OPS: fi_ops_cq {
    read = cq_read,
    readfrom = cq_readfrom,
    readerr = cq_readerr,
    sread = cq_sread,
    sreadfrom = cq_sreadfrom,
    signal,
    strerror = cq_strerror,
});

/// `fi_cq_open`.
pub unsafe extern "C" fn cq_open(
    domain: *mut sys::fid_domain,
    attr: *mut sys::fi_cq_attr,
    cq: *mut *mut sys::fid_cq,
    context: *mut c_void,
) -> c_int {
    crate::util::open(domain, attr, cq, |d: &DomainObj, a| make_cq(d, a, context))
}

fn make_cq(d: &DomainObj, a: &sys::fi_cq_attr, context: *mut c_void) -> Res<CqObj> {
    let format = match a.format {
        sys::fi_cq_format_FI_CQ_FORMAT_UNSPEC => sys::fi_cq_format_FI_CQ_FORMAT_CONTEXT,
        f @ sys::fi_cq_format_FI_CQ_FORMAT_CONTEXT..=sys::fi_cq_format_FI_CQ_FORMAT_TAGGED => f,
        _ => return Err(fi::EINVAL),
    };
    let wait = match a.wait_obj {
        sys::fi_wait_obj_FI_WAIT_NONE => WaitMode::None,
        sys::fi_wait_obj_FI_WAIT_UNSPEC
        | sys::fi_wait_obj_FI_WAIT_MUTEX_COND
        | sys::fi_wait_obj_FI_WAIT_YIELD
        | sys::fi_wait_obj_FI_WAIT_FD => WaitMode::Blocking,
        // FI_WAIT_POLLFD / FI_WAIT_SET: not implemented.
        _ => return Err(fi::ENOSYS),
    };
    if a.wait_cond != sys::fi_cq_wait_cond_FI_CQ_COND_NONE {
        return Err(fi::ENOSYS);
    }
    let size = if a.size == 0 { 1024 } else { a.size };
    let handle = Arc::new(
        d.dom
            .cq_open(CqAttr { size, wait })
            .or_errno(sys::fi_log_subsys_FI_LOG_CQ)?,
    );
    // Peers gone before the CQ existed are not its news.
    let seen = Arc::new(AtomicUsize::new(
        d.watch
            .get()
            .and_then(Option::as_ref)
            .map_or(0, |w| w.gone_count()),
    ));
    let wait_fd = if a.wait_obj == sys::fi_wait_obj_FI_WAIT_FD {
        let fd = handle.signal_fd();
        let stop = Arc::new(AtomicBool::new(false));
        let (q, st) = (handle.clone(), stop.clone());
        let (dom, seen) = (SendPtr(std::ptr::from_ref(d).cast_mut()), seen.clone());
        // Progress thread: sleeps on the device's call eventfds and drives progress, so
        // entries arrive (and write the signal fd) while the consumer sleeps in poll(2).
        let t = std::thread::Builder::new()
            .name("vfabric-cq-progress".into())
            .spawn(move || {
                let dom = dom; // the whole wrapper, not its raw-pointer field
                while !st.load(Ordering::Acquire) {
                    if q.wait_device(Duration::from_millis(50)).is_err() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    // A gone peer's entry signals the fd too. SAFETY: the domain outlives
                    // this CQ, whose close joins this thread.
                    report_gone_peers(unsafe { &*dom.0 }, &seen, &q);
                }
            })
            .map_err(|_| fi::ENOMEM)?;
        Some((fd, stop, Mutex::new(Some(t))))
    } else {
        None
    };
    Ok(CqObj {
        fid: sys::fid_cq {
            fid: CqObj::fid(context),
            ops: ops_ptr(&CQ_OPS),
        },
        // SAFETY: the domain refuses to close while this count is held.
        _domain: unsafe { ParentRef::new(&d.refs) },
        domain: d,
        cq: handle,
        format,
        wait_fd,
        peers_gone_seen: seen,
        refs: Refs::default(),
    })
}

/// `fi_trywait` on CQs: `-FI_EAGAIN` if one has entries queued (read them instead of
/// sleeping), else 0 (the consumer may block on the wait fds).
pub fn trywait_cq(fid: *mut sys::fid) -> Res {
    // SAFETY: consumer passes one of our CQs.
    let c = unsafe { CqObj::from_fid(fid) }?;
    if c.cq.queued() > 0 {
        return Err(fi::EAGAIN);
    }
    Ok(())
}

fn entry_size(format: u32) -> usize {
    match format {
        sys::fi_cq_format_FI_CQ_FORMAT_MSG => std::mem::size_of::<sys::fi_cq_msg_entry>(),
        sys::fi_cq_format_FI_CQ_FORMAT_DATA => std::mem::size_of::<sys::fi_cq_data_entry>(),
        sys::fi_cq_format_FI_CQ_FORMAT_TAGGED => std::mem::size_of::<sys::fi_cq_tagged_entry>(),
        _ => std::mem::size_of::<sys::fi_cq_entry>(),
    }
}

// Each CQ entry format is a prefix of the next (fi_cq(3)): an entry is the format's prefix of
// the tagged one.
const _: () = {
    use std::mem::offset_of;
    assert!(offset_of!(sys::fi_cq_msg_entry, len) == offset_of!(sys::fi_cq_tagged_entry, len));
    assert!(offset_of!(sys::fi_cq_data_entry, data) == offset_of!(sys::fi_cq_tagged_entry, data));
    assert!(offset_of!(sys::fi_cq_entry, op_context) == 0);
    assert!(offset_of!(sys::fi_cq_msg_entry, flags) == offset_of!(sys::fi_cq_data_entry, flags));
};

/// Write entry `k` of `buf` in the CQ's format.
///
/// # Safety
/// `buf` is writable for at least `k + 1` entries of the format.
unsafe fn write_entry(format: u32, buf: *mut c_void, k: usize, e: &CqEntry, at: *mut c_void) {
    let t = sys::fi_cq_tagged_entry {
        op_context: e.context as *mut c_void,
        flags: e.flags,
        len: e.len,
        buf: at,
        data: e.data,
        tag: e.tag,
    };
    let n = entry_size(format);
    // SAFETY: per the contract, slot `k` (`n` bytes) of the consumer's array is writable; `t`
    // is readable for `n` <= its size bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(
            std::ptr::from_ref(&t).cast::<u8>(),
            buf.cast::<u8>().add(k * n),
            n,
        )
    };
}

/// Common body of read/readfrom/sread/sreadfrom.
fn cq_read_common(
    cq: *mut sys::fid_cq,
    buf: *mut c_void,
    count: usize,
    src: *mut u64,
    timeout: Option<Option<Duration>>,
) -> Res<isize> {
    check(!buf.is_null() || count == 0)?;
    // SAFETY: consumer passes one of our CQs.
    let c = unsafe { CqObj::from_fid(cq) }?;
    if count == 0 {
        return Ok(0);
    }
    // Per thread, not per CQ: a lock held across a blocking sread would block other threads'
    // non-blocking reads of the CQ (FI_THREAD_SAFE).
    thread_local!(static SCRATCH: std::cell::Cell<Vec<CqEntry>> = const { std::cell::Cell::new(Vec::new()) });
    let mut v = SCRATCH.with(|s| s.take());
    v.clear();
    if c.wait_fd.is_some() {
        c.cq.drain_signal();
    }
    let r = match timeout {
        None => c.cq.read(&mut v, count),
        Some(t) => sread_watching(c, &mut v, count, t),
    };
    if c.wait_fd.is_some() {
        c.cq.resignal_if_queued();
    }
    let ret = match r {
        Ok(n) => {
            // SAFETY: the domain outlives its CQs (ParentRef).
            let d = unsafe { &*c.domain };
            let multi = &d.multi;
            for (k, e) in v.iter_mut().enumerate() {
                let at = if e.flags & fi::RECV != 0 {
                    multi.complete(e)
                } else {
                    std::ptr::null_mut()
                };
                // SAFETY: `buf` holds `count` ≥ n entries of the CQ's format; `src` NULL or
                // `count` addresses.
                unsafe {
                    write_entry(c.format, buf, k, e, at);
                    if !src.is_null() {
                        *src.add(k) = e.src_addr;
                    }
                }
            }
            Ok(n as isize)
        }
        Err(vfabric::Error::Timeout) => Err(peers_gone(c).unwrap_or(fi::EAGAIN)),
        Err(vfabric::Error::Again) => Err(peers_gone(c).unwrap_or_else(|| {
            empty_poll();
            fi::EAGAIN
        })),
        Err(e) => Err(errno_of(&e, sys::fi_log_subsys_FI_LOG_CQ)),
    };
    SCRATCH.with(|s| s.set(v));
    ret
}

/// Longest slice of a blocking read while the domain watches peers: a gone peer's watch
/// completes on another CQ, so a waiter looks between slices.
const WATCH_SLICE: Duration = Duration::from_millis(100);

/// `sread` that, when the domain watches peers, waits in slices and ends with `Timeout` as soon
/// as a watched peer has gone (the caller then reports it).
fn sread_watching(
    c: &CqObj,
    v: &mut Vec<CqEntry>,
    count: usize,
    timeout: Option<Duration>,
) -> vfabric::Result<usize> {
    // SAFETY: the domain outlives its CQs (ParentRef).
    let Some(w) = unsafe { &*c.domain }.watch.get().and_then(Option::as_ref) else {
        return c.cq.sread(v, count, timeout);
    };
    let end = timeout.map(|t| std::time::Instant::now() + t);
    loop {
        if w.poll() > c.peers_gone_seen.load(Ordering::Acquire) {
            return Err(vfabric::Error::Timeout);
        }
        let left = end.map(|e| e.saturating_duration_since(std::time::Instant::now()));
        let slice = left.map_or(WATCH_SLICE, |l| l.min(WATCH_SLICE));
        match c.cq.sread(v, count, Some(slice)) {
            Err(vfabric::Error::Timeout) if left.is_none_or(|l| l > slice) => {}
            r => return r,
        }
    }
}

/// An empty CQ reports peers of the domain that went away since it last looked, one error
/// entry each (see crate::watch): `Some(FI_EAVAIL)` if there are any.
fn peers_gone(c: &CqObj) -> Option<i32> {
    // SAFETY: the domain outlives its CQs (ParentRef).
    report_gone_peers(unsafe { &*c.domain }, &c.peers_gone_seen, &c.cq).then_some(fi::EAVAIL)
}

/// Queue on `cq` an error entry per peer of `d` gone since `seen`; whether there were any.
fn report_gone_peers(d: &DomainObj, seen: &AtomicUsize, cq: &CompletionQueue) -> bool {
    let Some(w) = d.watch.get().and_then(Option::as_ref) else {
        return false;
    };
    let now = w.poll();
    let before = seen.load(Ordering::Acquire);
    // One reporter per batch (the consumer's read or a FI_WAIT_FD progress thread).
    if now <= before
        || seen
            .compare_exchange(before, now, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
    {
        return false;
    }
    for e in w.gone_since(before).into_iter().take(now - before) {
        cq.push_error(e);
    }
    true
}

/// Empty polls between `sched_yield`s (a power of two).
const POLLS_PER_YIELD: u32 = 32;

/// A consumer spinning on `fi_cq_read` (as `fi_pingpong` does) would keep the device's
/// thread off a CPU it shares; yield every few empty polls so the device makes progress.
fn empty_poll() {
    thread_local!(static EMPTY: std::cell::Cell<u32> = const { std::cell::Cell::new(0) });
    EMPTY.with(|c| {
        let n = c.get().wrapping_add(1);
        c.set(n);
        if n % POLLS_PER_YIELD == 0 {
            std::thread::yield_now();
        }
    });
}

fn timeout_of(ms: c_int) -> Option<Duration> {
    (ms >= 0).then(|| Duration::from_millis(ms as u64))
}

ffi_fns! {
    fn cq_control(fid: *mut sys::fid, cmd: c_int, arg: *mut c_void) -> c_int {
        // SAFETY: consumer passes one of our CQs.
        let c = unsafe { CqObj::from_fid(fid) }?;
        check(!arg.is_null())?;
        match (cmd as u32, &c.wait_fd) {
            // SAFETY: for FI_GETWAIT with FI_WAIT_FD, `arg` is an `int *`.
            (sys::FI_GETWAIT, Some((fd, _, _))) => unsafe { *arg.cast::<c_int>() = *fd },
            // SAFETY: for FI_GETWAITOBJ, `arg` is an `enum fi_wait_obj *`.
            (sys::FI_GETWAITOBJ, Some(_)) => unsafe {
                *arg.cast::<u32>() = sys::fi_wait_obj_FI_WAIT_FD
            },
            _ => return Err(fi::ENOSYS),
        }
        Ok(0)
    }

    fn cq_read(cq: *mut sys::fid_cq, buf: *mut c_void, count: usize) -> isize {
        cq_read_common(cq, buf, count, std::ptr::null_mut(), None)
    }

    fn cq_readfrom(cq: *mut sys::fid_cq, buf: *mut c_void, count: usize, src: *mut u64) -> isize {
        cq_read_common(cq, buf, count, src, None)
    }

    fn cq_sread(cq: *mut sys::fid_cq, buf: *mut c_void, count: usize, _cond: *const c_void, timeout: c_int) -> isize {
        cq_read_common(cq, buf, count, std::ptr::null_mut(), Some(timeout_of(timeout)))
    }

    fn cq_sreadfrom(
        cq: *mut sys::fid_cq, buf: *mut c_void, count: usize, src: *mut u64, _cond: *const c_void,
        timeout: c_int,
    ) -> isize {
        cq_read_common(cq, buf, count, src, Some(timeout_of(timeout)))
    }

    fn cq_readerr(cq: *mut sys::fid_cq, buf: *mut sys::fi_cq_err_entry, _flags: u64) -> isize {
        check(!buf.is_null())?;
        // SAFETY: consumer passes one of our CQs.
        let c = unsafe { CqObj::from_fid(cq) }?;
        let mut e = c.cq.readerr().ok_or(fi::EAGAIN)?;
        // SAFETY: the domain outlives its CQs (ParentRef).
        let d = unsafe { &*c.domain };
        d.multi.complete_err(&mut e);
        // SAFETY: non-NULL consumer entry.
        let out = unsafe { &mut *buf };
        out.op_context = e.context as *mut c_void;
        out.flags = e.flags;
        out.len = e.len;
        out.buf = std::ptr::null_mut();
        out.data = e.data;
        out.tag = e.tag;
        out.olen = e.olen;
        out.err = e.err;
        out.prov_errno = e.prov_errno;
        // No provider error data (a consumer-supplied buffer is left untouched).
        out.err_data_size = 0;
        Ok(1)
    }
}

/// Text of a device status (`prov_errno` of an error completion), from the protocol crate's
/// names and descriptions: `vfabric: <description> (<NAME>)`.
pub fn status_text(prov_errno: i32) -> &'static std::ffi::CStr {
    static TEXT: LazyLock<Vec<CString>> = LazyLock::new(|| {
        (0..)
            .map_while(Status::from_u32)
            .map(|s| {
                CString::new(format!("vfabric: {} ({})", s.describe(), s.name()))
                    .expect("no NUL in the protocol's texts")
            })
            .collect()
    });
    usize::try_from(prov_errno)
        .ok()
        .and_then(|k| TEXT.get(k))
        .map_or(c"vfabric: unknown device status", |s| s.as_c_str())
}

unsafe extern "C" fn cq_strerror(
    _cq: *mut sys::fid_cq,
    prov_errno: c_int,
    _err_data: *const c_void,
    buf: *mut c_char,
    len: usize,
) -> *const c_char {
    let s = status_text(prov_errno);
    if !buf.is_null() && len > 0 {
        let mut l = len;
        // SAFETY: `buf` writable for `len` bytes.
        unsafe { copy_str_out(&s.to_string_lossy(), buf, &mut l) };
    }
    s.as_ptr()
}
