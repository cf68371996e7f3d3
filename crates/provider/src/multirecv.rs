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

use std::collections::HashMap;
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

/// The multi-receive buffers of one domain, by internal context.
#[derive(Default)]
pub struct Registry(Mutex<HashMap<u64, MultiRecv>>);

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, MultiRecv>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
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
            _key: key_box,
        };
        let mut g = self.lock();
        let posted = r.post(key);
        match posted {
            Ok(()) => {
                g.insert(key, r);
                Ok(())
            }
            Err(e) => Err(e.errno()),
        }
    }

    /// Rewrite a success entry of a multi-receive sub-receive; returns the message's address
    /// in the buffer (`buf` of the CQ entry), or NULL for other entries.
    pub fn complete(&self, e: &mut CqEntry) -> *mut c_void {
        let mut g = self.lock();
        let Some(r) = g.get_mut(&e.context) else {
            return std::ptr::null_mut();
        };
        let key = e.context;
        let at = (r.base + r.offset) as *mut c_void;
        r.offset += e.len;
        e.context = r.user_ctx;
        let release = r.len - r.offset < r.min || r.post(key).is_err();
        if release {
            e.flags |= fi::MULTI_RECV;
            g.remove(&key);
        }
        at
    }

    /// Rewrite an error entry of a sub-receive: the buffer is released.
    pub fn complete_err(&self, e: &mut CqErrEntry) {
        if let Some(r) = self.lock().remove(&e.context) {
            e.context = r.user_ctx;
            e.flags |= fi::MULTI_RECV;
        }
    }

    /// The internal context of `ep`'s buffer posted with `user_ctx` (for `fi_cancel`).
    pub fn internal_ctx(&self, ep: *const EpObj, user_ctx: u64) -> Option<u64> {
        self.lock()
            .iter()
            .find(|(_, r)| r.ep.0.cast_const() == ep && r.user_ctx == user_ctx)
            .map(|(k, _)| *k)
    }

    /// Forget an endpoint's buffers (fi_close).
    pub fn remove_ep(&self, ep: *const EpObj) {
        self.lock().retain(|_, r| r.ep.0.cast_const() != ep);
    }
}
