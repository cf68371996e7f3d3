// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `libvfabric-fi.so`: the libfabric 1.17 provider `vfabric`, a thin C face over the
//! [`vfabric`] driver crate (no second data path).
//!
//! libfabric loads it from a directory in `FI_PROVIDER_PATH` by the file name
//! `libvfabric-fi.so`; cargo builds `libvfabric_provider.so`, and `scripts/provider-link.sh`
//! places the correctly named link in `target/<profile>/prov/` (scripts/test.sh runs it).
//!
//! Organised as libfabric's own providers are: one file per object. Objects are `#[repr(C)]`
//! structs whose first field is the libfabric `fid_*` structure and implement
//! [`util::FidObject`], which gives every class the same class-checked cast, open, install
//! and close. Entry points are written with [`util::ffi_fns`]: their bodies return
//! `Result<_, errno>` and run inside [`util::guard`] (no panic crosses into C). Op tables are
//! `const` ([`util::ops_table`]): unimplemented slots are `-FI_ENOSYS` stubs.
//!
//! Module map: `info` (`fi_getinfo`), `nic` (`fi_info->nic`), `fabric`, `eq`, `domain`
//! (and the process's device sessions), `av`, `mr`, `cq`, `cntr`, `ep` (endpoint object and
//! control), `cm` (FI_EP_MSG: passive endpoints and the connection handshake), `ops/`
//! (data path: `msg`, `tagged`, `rma`, `atomic`, each call normalised into its `*msg`
//! form), `multirecv` (FI_MULTI_RECV emulation), `hmem` (device memory through the
//! consumer's copy functions), `mr_cache` (the registration cache), `monitor` (its memory
//! monitors: userfaultfd, or the consumer's imported `fid_mem_monitor`), `pmem`, `ext` (`fi_open_ops`/`fi_set_ops` extensions
//! of `include/fi_vfabric.h`), `util` (the FFI plumbing), `consts` (compile-time checks of
//! the driver's libfabric constants against bindgen's).

#![deny(clippy::undocumented_unsafe_blocks)]

mod addr;
mod av;
mod cm;
mod cntr;
mod cq;
mod domain;
mod ep;
mod eq;
mod ext;
mod fabric;
mod hmem;
mod info;
mod monitor;
mod mr;
mod mr_cache;
mod multirecv;
mod nic;
mod ops;
mod pmem;
/// The copies between host and device memory (FI_HMEM): the driver's trait, the Rust form of
/// `struct fi_hmem_override_ops`, which the consumer's C functions implement (`hmem.rs`).
pub use vfabric::HmemCopy;
/// The libfabric bindings (bindgen, shared with the daemon's uplink).
pub use vfabric_fi_sys as sys;
mod consts;
mod util;
mod watch;

use std::ffi::{c_char, c_int, CStr};

use util::Static;

/// `FI_VERSION(1, 17)`.
pub const FI_VERSION_1_17: u32 = (1 << 16) | 17;
/// Provider version (`FI_VERSION(0, 1)`, the crate version).
pub const PROVIDER_VERSION: u32 = 1;

static PROVIDER: Static<sys::fi_provider> = Static(std::cell::UnsafeCell::new(sys::fi_provider {
    version: PROVIDER_VERSION,
    fi_version: FI_VERSION_1_17,
    context: sys::fi_context {
        internal: [std::ptr::null_mut(); 4],
    },
    name: c"vfabric".as_ptr(),
    getinfo: Some(prov_getinfo),
    fabric: Some(fabric::fabric_open),
    cleanup: Some(prov_cleanup),
}));

/// Our provider structure (for `fi_log`/`fi_param_*`).
pub fn provider_ptr() -> *mut sys::fi_provider {
    PROVIDER.0.get()
}

/// The entry point libfabric looks up with `dlsym`.
#[no_mangle]
pub extern "C" fn fi_prov_ini() -> *mut sys::fi_provider {
    let p = PROVIDER.0.get();
    // Parameters (listed by `fi_info -e`, read from FI_VFABRIC_*).
    let params: [(&CStr, sys::fi_param_type, &CStr); 6] = [
        (
            c"devices",
            sys::fi_param_type_FI_PARAM_STRING,
            c"Colon-separated vfabric device sockets to use (default: VFABRIC_DEVICES, else /run/vfabric/*.sock)",
        ),
        (
            c"mem_mb",
            sys::fi_param_type_FI_PARAM_SIZE_T,
            c"Shared memory region per domain in MiB (default: VFABRIC_MEM_MB, else 64)",
        ),
        (
            c"peer_watch",
            sys::fi_param_type_FI_PARAM_BOOL,
            c"Report each remote peer of an RDM domain that goes away as a CQ error entry with a NULL op_context (default: 1; 0 for consumers that dereference every entry's context, as Open MPI's OFI MTL does)",
        ),
        (
            c"mr_cache_max_count",
            sys::fi_param_type_FI_PARAM_SIZE_T,
            c"Registrations a domain's registration cache keeps (default: 1024; 0 turns the cache off); unused ones are evicted least recently used first",
        ),
        (
            c"mr_cache_max_size",
            sys::fi_param_type_FI_PARAM_SIZE_T,
            c"Bytes of registered memory a domain's registration cache keeps (default: 1073741824; 0 turns the cache off)",
        ),
        (
            c"mr_cache_monitor",
            sys::fi_param_type_FI_PARAM_STRING,
            c"Memory monitor of the registration cache: userfaultfd (default) or disabled (no cache unless the application imports a monitor with fi_import_fid)",
        ),
    ];
    for (name, ty, help) in params {
        // SAFETY: `p` is our static provider; the strings are NUL-terminated statics; the help
        // string is passed as the "%s" argument so it is never parsed as a format.
        unsafe {
            sys::fi_param_define(p, name.as_ptr(), ty, c"%s".as_ptr(), help.as_ptr());
        }
    }
    p
}

/// `fi_param_get` of a parameter whose value the core stores as a `T`.
fn param_get<T>(name: &CStr, mut v: T) -> Option<T> {
    // SAFETY: `name` is NUL-terminated; the core writes one value of the parameter's type
    // (`char *`, `int`, `size_t`), which the callers below match.
    let r = unsafe { sys::fi_param_get(provider_ptr(), name.as_ptr(), (&mut v as *mut T).cast()) };
    (r == 0).then_some(v)
}

/// `fi_param_get` of a string parameter.
pub fn param_str(name: &CStr) -> Option<String> {
    let v = param_get::<*mut c_char>(name, std::ptr::null_mut())?;
    // SAFETY: NULL or the core's NUL-terminated environment string (not to be freed).
    unsafe { util::c_str(v) }
}

/// `fi_param_get` of a boolean parameter.
pub fn param_bool(name: &CStr) -> Option<bool> {
    param_get::<c_int>(name, 0).map(|v| v != 0)
}

/// `fi_param_get` of a size parameter.
pub fn param_size(name: &CStr) -> Option<usize> {
    param_get::<usize>(name, 0)
}

unsafe extern "C" fn prov_getinfo(
    version: u32,
    node: *const c_char,
    service: *const c_char,
    flags: u64,
    hints: *const sys::fi_info,
    info: *mut *mut sys::fi_info,
) -> c_int {
    // SAFETY: arguments as passed by the core's fi_getinfo (NULL-checked inside).
    util::ffi(|| unsafe { info::getinfo(version, node, service, flags, hints, info) }.map(|()| 0))
}

unsafe extern "C" fn prov_cleanup() {}
