// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `fi_ops_tagged`: every call normalised into a tagged [`Xfer`] and posted by [`post`].

use std::ffi::c_void;

use super::{post, Ctx, Desc, Descs, Ep, Flags, Xfer};
use crate::sys;
use crate::util::{ffi_fns, ops_table};

ops_table!(pub TAGGED_OPS: fi_ops_tagged [recv, recvv, recvmsg, send, sendv, sendmsg, inject, senddata, injectdata]);

// SAFETY (every call below): buffers and iovecs follow the libfabric data-transfer contract
// (valid until completion; inject buffers during the call).
ffi_fns! {
    fn recvmsg(ep: Ep, msg: *const sys::fi_msg_tagged, flags: u64) -> isize {
        // SAFETY: see above.
        post(ep, false, true, unsafe { Xfer::tagged_msg(msg) }?, Flags::Msg(flags))
    }

    fn recv(ep: Ep, buf: *mut c_void, len: usize, desc: Desc, src: u64, tag: u64, ignore: u64, ctx: Ctx) -> isize {
        // SAFETY: see above.
        let x = unsafe { Xfer::buf(buf, len, desc, src, ctx) }.with_tag(tag, ignore);
        post(ep, false, true, x, Flags::Op)
    }

    fn recvv(
        ep: Ep, iov: *const sys::iovec, desc: Descs, count: usize, src: u64, tag: u64,
        ignore: u64, ctx: Ctx,
    ) -> isize {
        // SAFETY: see above.
        let x = unsafe { Xfer::iov(iov, desc, count, src, ctx) }?.with_tag(tag, ignore);
        post(ep, false, true, x, Flags::Op)
    }

    fn sendmsg(ep: Ep, msg: *const sys::fi_msg_tagged, flags: u64) -> isize {
        // SAFETY: see above; a send's `ignore` is unused.
        let x = unsafe { Xfer::tagged_msg(msg) }?;
        let tag = x.tag;
        post(ep, true, true, x.with_tag(tag, 0), Flags::Msg(flags))
    }

    fn send(ep: Ep, buf: *const c_void, len: usize, desc: Desc, dest: u64, tag: u64, ctx: Ctx) -> isize {
        // SAFETY: see above.
        let x = unsafe { Xfer::buf(buf, len, desc, dest, ctx) }.with_tag(tag, 0);
        post(ep, true, true, x, Flags::Op)
    }

    fn sendv(ep: Ep, iov: *const sys::iovec, desc: Descs, count: usize, dest: u64, tag: u64, ctx: Ctx) -> isize {
        // SAFETY: see above.
        let x = unsafe { Xfer::iov(iov, desc, count, dest, ctx) }?.with_tag(tag, 0);
        post(ep, true, true, x, Flags::Op)
    }

    fn senddata(
        ep: Ep, buf: *const c_void, len: usize, desc: Desc, data: u64, dest: u64, tag: u64,
        ctx: Ctx,
    ) -> isize {
        // SAFETY: see above.
        let x = unsafe { Xfer::buf(buf, len, desc, dest, ctx) }.with_tag(tag, 0).with_data(data);
        post(ep, true, true, x, Flags::OpData)
    }

    fn inject(ep: Ep, buf: *const c_void, len: usize, dest: u64, tag: u64) -> isize {
        // SAFETY: see above.
        let x = unsafe { Xfer::buf(buf, len, std::ptr::null_mut(), dest, std::ptr::null_mut()) }.with_tag(tag, 0);
        post(ep, true, true, x, Flags::Inject)
    }

    fn injectdata(ep: Ep, buf: *const c_void, len: usize, data: u64, dest: u64, tag: u64) -> isize {
        // SAFETY: see above.
        let x = unsafe { Xfer::buf(buf, len, std::ptr::null_mut(), dest, std::ptr::null_mut()) }
            .with_tag(tag, 0)
            .with_data(data);
        post(ep, true, true, x, Flags::InjectData)
    }
}
