// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Compile-time checks: the driver's copies of libfabric's constants (`vfabric::fi`, which the
//! provider passes through unchanged) equal bindgen's values from the installed headers.

use vfabric::fi;

use crate::sys;

/// `const` assertions that each `fi::NAME` equals `sys::FI_NAME` (compared as `i128`: bindgen
/// types them `u32`, `u64` or its enum type).
macro_rules! same {
    ($($name:ident = $sys:ident),* $(,)?) => {
        $(const _: () = assert!(fi::$name as i128 == sys::$sys as i128, stringify!($name));)*
    };
}

same! {
    MSG = FI_MSG,
    RMA = FI_RMA,
    TAGGED = FI_TAGGED,
    ATOMIC = FI_ATOMIC,
    READ = FI_READ,
    WRITE = FI_WRITE,
    RECV = FI_RECV,
    SEND = FI_SEND,
    TRANSMIT = FI_TRANSMIT,
    REMOTE_READ = FI_REMOTE_READ,
    REMOTE_WRITE = FI_REMOTE_WRITE,
    MULTI_RECV = FI_MULTI_RECV,
    REMOTE_CQ_DATA = FI_REMOTE_CQ_DATA,
    MORE = FI_MORE,
    PEEK = FI_PEEK,
    TRIGGER = FI_TRIGGER,
    FENCE = FI_FENCE,
    COMPLETION = FI_COMPLETION,
    INJECT = FI_INJECT,
    INJECT_COMPLETE = FI_INJECT_COMPLETE,
    TRANSMIT_COMPLETE = FI_TRANSMIT_COMPLETE,
    DELIVERY_COMPLETE = FI_DELIVERY_COMPLETE,
    COMMIT_COMPLETE = FI_COMMIT_COMPLETE,
    MATCH_COMPLETE = FI_MATCH_COMPLETE,
    RMA_EVENT = FI_RMA_EVENT,
    RMA_PMEM = FI_RMA_PMEM,
    LOCAL_COMM = FI_LOCAL_COMM,
    REMOTE_COMM = FI_REMOTE_COMM,
    SOURCE = FI_SOURCE,
    DIRECTED_RECV = FI_DIRECTED_RECV,
    CLAIM = FI_CLAIM,
    DISCARD = FI_DISCARD,
    SELECTIVE_COMPLETION = FI_SELECTIVE_COMPLETION,
    ORDER_SAS = FI_ORDER_SAS,
    ENOENT = FI_ENOENT,
    EIO = FI_EIO,
    EBADF = FI_EBADF,
    EAGAIN = FI_EAGAIN,
    ENOMEM = FI_ENOMEM,
    EACCES = FI_EACCES,
    EFAULT = FI_EFAULT,
    EBUSY = FI_EBUSY,
    EINVAL = FI_EINVAL,
    ENOSYS = FI_ENOSYS,
    ENOMSG = FI_ENOMSG,
    ENODATA = FI_ENODATA,
    EMSGSIZE = FI_EMSGSIZE,
    EADDRINUSE = FI_EADDRINUSE,
    EADDRNOTAVAIL = FI_EADDRNOTAVAIL,
    ESHUTDOWN = FI_ESHUTDOWN,
    ETIMEDOUT = FI_ETIMEDOUT,
    EHOSTUNREACH = FI_EHOSTUNREACH,
    ECANCELED = FI_ECANCELED,
    EOTHER = FI_EOTHER,
    ETOOSMALL = FI_ETOOSMALL,
    EOPBADSTATE = FI_EOPBADSTATE,
    EAVAIL = FI_EAVAIL,
    EBADFLAGS = FI_EBADFLAGS,
    ENOCQ = FI_ENOCQ,
    ETRUNC = FI_ETRUNC,
    ENOKEY = FI_ENOKEY,
    ENOAV = FI_ENOAV,
}

// Not in libfabric 1.17: the proposed FI_SAVE (ofiwg/libfabric#5874) must stay clear of every
// operation flag the header defines.
const _: () = assert!(fi::SAVE == 1 << 32);
