// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! FI_MULTI_RECV emulation (the device answers Unsupported for MULTI_RECV).
//!
//! A multi-receive buffer is posted as one ordinary receive covering the whole buffer, under a
//! provider-owned context. When it completes (at `fi_cq_read`), the entry is rewritten to the
//! consumer's context with `buf` pointing at the message in the buffer, and a receive for the
//! rest of the buffer is posted; once less than `FI_OPT_MIN_MULTI_RECV` bytes remain (or on an
//! error) the buffer is released and that entry carries `FI_MULTI_RECV`. Messages therefore land
//! back to back as libfabric specifies; only one message is in flight per buffer (later ones
//! wait in the device's unexpected queue, which RDM endpoints hold without loss).
//!
//! Only the first buffer of an endpoint has a receive at the device; buffers posted after it
//! wait here and get theirs when it is released, so that messages fill one buffer before the
//! next (fi_msg(3)), rather than each buffer taking one message in turn.

use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::sync::Mutex;

use vfabric::{fi, CqEntry, CqErrEntry, Iov, Msg};

use crate::ep::EpObj;
use crate::util::SendPtr;

struct MultiRecv {
    ep: SendPtr<EpObj>,
    user_ctx: u64,
    base: usize,
    len: usize,
    offset: usize,
    min: usize,
    src: u64,
    flags: u64,
    /// Whether its receive is posted at the device (the endpoint's first buffer).
    posted: bool,
    /// Its address is the internal context (unique while the record lives).
    _key: Box<u8>,
}

impl MultiRecv {
    fn post(&self, key: u64) -> Result<(), vfabric::Error> {
        let rem = self.len - self.offset;
        // SAFETY: the consumer keeps the multi-receive buffer valid until it is released
        // (FI_MULTI_RECV contract); `base + offset .. base + len` lies inside it.
        let iov = [unsafe { Iov::raw((self.base + self.offset) as *mut u8, rem) }];
        // SAFETY: the endpoint is alive while its records are registered (fi_close removes
        // them under the registry lock before freeing the endpoint).
        let ep = unsafe { &*self.ep.0 };
        ep.ep.recvmsg(
            &Msg {
                iov: &iov,
                addr: self.src,
                context: key,
                data: 0,
            },
            self.flags & !fi::MULTI_RECV,
        )
    }
}

/// The multi-receive buffers of one domain.
#[derive(Default)]
struct Buffers {
    /// By internal context.
    all: HashMap<u64, MultiRecv>,
    /// Each endpoint's buffers in posting order (internal contexts); the first is posted.
    order: HashMap<usize, VecDeque<u64>>,
}

impl Buffers {
    /// Forget buffer `key` of `ep`; post the endpoint's next buffer if `key` was the posted
    /// one. Returns the error entries of buffers that could not be posted (released).
    fn release(&mut self, ep: usize, key: u64) -> Vec<(SendPtr<EpObj>, CqErrEntry)> {
        let was_posted = self.all.remove(&key).is_some_and(|r| r.posted);
        let mut failed = Vec::new();
        let Some(q) = self.order.get_mut(&ep) else {
            return failed;
        };
        q.retain(|k| *k != key);
        while was_posted && !q.is_empty() {
            let Some(&next) = q.front() else { break };
            let Some(r) = self.all.get_mut(&next) else {
                q.pop_front();
                continue;
            };
            match r.post(next) {
                Ok(()) => {
                    r.posted = true;
                    break;
                }
                Err(e) => {
                    q.pop_front();
                    if let Some(r) = self.all.remove(&next) {
                        failed.push((SendPtr(r.ep.0), released_entry(&r, e.errno())));
                    }
                }
            }
        }
        if q.is_empty() {
            self.order.remove(&ep);
        }
        failed
    }
}

/// The error entry of a buffer released without a message (cancel, failed post).
fn released_entry(r: &MultiRecv, err: i32) -> CqErrEntry {
    CqErrEntry {
        context: r.user_ctx,
        flags: fi::RECV | fi::MSG | fi::MULTI_RECV,
        len: 0,
        olen: 0,
        status: if err == fi::ECANCELED {
            vfabric::proto::Status::Canceled
        } else {
            vfabric::proto::Status::Invalid
        },
        err,
        prov_errno: 0,
        data: 0,
        tag: 0,
        src: None,
        buf: None,
    }
}

/// The multi-receive buffers of one domain.
#[derive(Default)]
pub struct Registry(Mutex<Buffers>);

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Buffers> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue error entries on the receive CQs of their endpoints. Called with the registry
    /// locked (`_held`): `fi_close` of an endpoint forgets its buffers under that lock before
    /// freeing it, so the endpoints are alive here.
    fn report(_held: &Buffers, failed: Vec<(SendPtr<EpObj>, CqErrEntry)>) {
        for (ep, e) in failed {
            // SAFETY: see above; the records came from the registry under this lock.
            unsafe { &*ep.0 }.push_rx_error(e);
        }
    }

    /// Post a multi-receive buffer for `ep`.
    #[allow(clippy::too_many_arguments)]
    pub fn post(
        &self,
        ep: &EpObj,
        base: *mut u8,
        len: usize,
        min: usize,
        src: u64,
        user_ctx: u64,
        flags: u64,
    ) -> Result<(), i32> {
        if base.is_null() || len == 0 {
            return Err(fi::EINVAL);
        }
        let key_box = Box::new(0u8);
        let key = &*key_box as *const u8 as u64;
        let r = MultiRecv {
            ep: SendPtr((ep as *const EpObj).cast_mut()),
            user_ctx,
            base: base as usize,
            len,
            offset: 0,
            min: min.max(1),
            src,
            flags,
            posted: false,
            _key: key_box,
        };
        let ep_id = ep as *const EpObj as usize;
        let mut g = self.lock();
        let first = g.order.get(&ep_id).is_none_or(VecDeque::is_empty);
        if first {
            r.post(key).map_err(|e| e.errno())?;
        }
        g.all.insert(key, MultiRecv { posted: first, ..r });
        g.order.entry(ep_id).or_default().push_back(key);
        Ok(())
    }

    /// Rewrite a success entry of a multi-receive sub-receive; returns the message's address
    /// in the buffer (`buf` of the CQ entry), or NULL for other entries.
    pub fn complete(&self, e: &mut CqEntry) -> *mut c_void {
        let mut g = self.lock();
        let Some(r) = g.all.get_mut(&e.context) else {
            return std::ptr::null_mut();
        };
        let key = e.context;
        let at = (r.base + r.offset) as *mut c_void;
        r.offset += e.len;
        e.context = r.user_ctx;
        let release = r.len - r.offset < r.min || r.post(key).is_err();
        let mut failed = Vec::new();
        if release {
            e.flags |= fi::MULTI_RECV;
            let ep = r.ep.0 as usize;
            failed = g.release(ep, key);
        }
        Self::report(&g, failed);
        at
    }

    /// Rewrite an error entry of a sub-receive: the buffer is released.
    pub fn complete_err(&self, e: &mut CqErrEntry) {
        let mut g = self.lock();
        let Some(r) = g.all.get(&e.context) else {
            return;
        };
        let (ep, key) = (r.ep.0 as usize, e.context);
        e.context = r.user_ctx;
        e.flags |= fi::MULTI_RECV;
        let failed = g.release(ep, key);
        Self::report(&g, failed);
    }

    /// The internal context of `ep`'s buffer posted with `user_ctx` (for `fi_cancel`).
    pub fn internal_ctx(&self, ep: *const EpObj, user_ctx: u64) -> Option<u64> {
        self.lock()
            .all
            .iter()
            .find(|(_, r)| r.ep.0.cast_const() == ep && r.user_ctx == user_ctx && r.posted)
            .map(|(k, _)| *k)
    }

    /// `fi_cancel` of a buffer that waits behind the posted one (it has no receive at the
    /// device): released here with an FI_ECANCELED entry. Whether there was one.
    pub fn cancel_waiting(&self, ep: *const EpObj, user_ctx: u64) -> bool {
        let mut g = self.lock();
        let Some(key) = g
            .all
            .iter()
            .find(|(_, r)| r.ep.0.cast_const() == ep && r.user_ctx == user_ctx && !r.posted)
            .map(|(k, _)| *k)
        else {
            return false;
        };
        let entry = g.all.get(&key).map(|r| released_entry(r, fi::ECANCELED));
        let failed = g.release(ep as usize, key);
        if let Some(entry) = entry {
            Self::report(&g, vec![(SendPtr(ep.cast_mut()), entry)]);
        }
        Self::report(&g, failed);
        true
    }

    /// Forget an endpoint's buffers (fi_close).
    pub fn remove_ep(&self, ep: *const EpObj) {
        let mut g = self.lock();
        g.all.retain(|_, r| r.ep.0.cast_const() != ep);
        g.order.remove(&(ep as usize));
    }
}
