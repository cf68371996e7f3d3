// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The little of the host's libfabric the uplink uses, as owned Rust objects: one RDM endpoint
//! with a completion queue and a table address vector, untagged send and receive. The header's
//! `static inline` calls are made here through the objects' op tables, exactly as the header
//! makes them; every object is closed on drop, in reverse order of opening.

use std::ffi::{c_void, CStr, CString};
use std::ptr;

use vfabric_fi_sys as sys;

/// `FI_VERSION(1, 17)`.
const API_VERSION: u32 = (1 << 16) | 17;

/// A libfabric error: the call that failed and its (positive) error number.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {} (-{errno})", strerror(*errno))]
pub struct FiError {
    pub call: &'static str,
    pub errno: i32,
}

impl FiError {
    /// The provider has no room now: try again after progress.
    pub fn is_again(&self) -> bool {
        self.errno == sys::FI_EAGAIN as i32
    }
}

fn strerror(errno: i32) -> String {
    // SAFETY: fi_strerror returns a pointer to a static NUL-terminated string.
    unsafe { CStr::from_ptr(sys::fi_strerror(errno)) }
        .to_string_lossy()
        .into_owned()
}

fn check(call: &'static str, rc: i64) -> Result<(), FiError> {
    if rc < 0 {
        Err(FiError {
            call,
            errno: (-rc) as i32,
        })
    } else {
        Ok(())
    }
}

/// Calls the op-table slot `$table->$slot` of a libfabric object (a missing slot is -FI_ENOSYS).
macro_rules! op {
    ($table:expr, $slot:ident ( $($arg:expr),* )) => {{
        // SAFETY (for the callers): `$table` points at the object's op table, which lives as
        // long as the object; the arguments are valid for the call as each caller states.
        let t = &*$table;
        match t.$slot {
            Some(f) => f($($arg),*) as i64,
            None => -(sys::FI_ENOSYS as i64),
        }
    }};
}

/// An `fi_info` list from `fi_getinfo` (freed on drop). Only its first entry is used.
pub struct Info(*mut sys::fi_info);

impl Info {
    /// `fi_getinfo` for an RDM endpoint with untagged messages of provider `prov` at
    /// `node:service` (`source`: our own address to bind, with FI_SOURCE; else a destination).
    pub fn rdm(prov: &str, node: &str, service: &str, source: bool) -> Result<Self, FiError> {
        let (node, service) = (cstring(node)?, cstring(service)?);
        let prov = cstring(prov)?;
        // SAFETY: fi_dupinfo(NULL) allocates an empty fi_info with all attribute structs (what
        // the header's fi_allocinfo does); we only write fields of those structs and strings
        // from strdup, which fi_freeinfo frees.
        unsafe {
            let hints = sys::fi_dupinfo(ptr::null());
            if hints.is_null() {
                return Err(FiError {
                    call: "fi_allocinfo",
                    errno: sys::FI_ENOMEM as i32,
                });
            }
            (*hints).caps = u64::from(sys::FI_MSG) | sys::FI_SOURCE;
            (*(*hints).ep_attr).type_ = sys::fi_ep_type_FI_EP_RDM;
            // Messages between two hosts arrive in the order they were sent: the chunks of
            // one guest message, and guest messages of one pair.
            (*(*hints).tx_attr).msg_order = u64::from(sys::FI_ORDER_SAS);
            (*(*hints).rx_attr).msg_order = u64::from(sys::FI_ORDER_SAS);
            (*(*hints).fabric_attr).prov_name = libc::strdup(prov.as_ptr());
            (*(*hints).domain_attr).mr_mode =
                (sys::FI_MR_VIRT_ADDR | sys::FI_MR_ALLOCATED | sys::FI_MR_PROV_KEY) as i32;
            (*(*hints).domain_attr).threading = sys::fi_threading_FI_THREAD_DOMAIN;
            let mut info = ptr::null_mut();
            let rc = sys::fi_getinfo(
                API_VERSION,
                node.as_ptr(),
                service.as_ptr(),
                if source { sys::FI_SOURCE } else { 0 },
                hints,
                &mut info,
            );
            sys::fi_freeinfo(hints);
            check("fi_getinfo", rc.into())?;
            if info.is_null() {
                return Err(FiError {
                    call: "fi_getinfo",
                    errno: sys::FI_ENODATA as i32,
                });
            }
            Ok(Self(info))
        }
    }

    /// The destination address `fi_getinfo` resolved (in the provider's address format).
    pub fn dest_addr(&self) -> Option<Vec<u8>> {
        // SAFETY: `self.0` is a valid fi_info; dest_addr is NULL or `dest_addrlen` bytes.
        unsafe {
            let i = &*self.0;
            (!i.dest_addr.is_null()).then(|| {
                std::slice::from_raw_parts(i.dest_addr.cast::<u8>(), i.dest_addrlen).to_vec()
            })
        }
    }

    /// `provider (fabric name)` of the first entry, for logs.
    pub fn describe(&self) -> String {
        // SAFETY: a valid fi_info from fi_getinfo has valid fabric_attr strings (or NULL).
        unsafe {
            let f = &*(*self.0).fabric_attr;
            let s = |p: *mut std::ffi::c_char| {
                if p.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(p).to_string_lossy().into_owned()
                }
            };
            format!("{} ({})", s(f.prov_name), s(f.name))
        }
    }
}

impl Drop for Info {
    fn drop(&mut self) {
        // SAFETY: allocated by fi_getinfo, freed once.
        unsafe { sys::fi_freeinfo(self.0) };
    }
}

fn cstring(s: &str) -> Result<CString, FiError> {
    CString::new(s).map_err(|_| FiError {
        call: "address",
        errno: sys::FI_EINVAL as i32,
    })
}

/// One RDM endpoint with its fabric, domain, CQ and AV. Single-threaded use (FI_THREAD_DOMAIN):
/// the uplink thread owns it.
pub struct RdmEndpoint {
    fabric: *mut sys::fid_fabric,
    domain: *mut sys::fid_domain,
    cq: *mut sys::fid_cq,
    av: *mut sys::fid_av,
    ep: *mut sys::fid_ep,
}

// SAFETY: the objects are used by one thread at a time (the endpoint is moved into the uplink
// thread and never shared); libfabric objects are not tied to the thread that opened them.
unsafe impl Send for RdmEndpoint {}

/// A completion: the context the operation was posted with, its length and, for receives,
/// the sender's `fi_addr` (FI_ADDR_NOTAVAIL when the sender is not in the AV).
pub struct Completion {
    pub context: u64,
    pub len: usize,
    pub src: u64,
}

/// Not in the AV (`FI_ADDR_NOTAVAIL`).
pub const ADDR_NOTAVAIL: u64 = u64::MAX;

impl RdmEndpoint {
    /// Open fabric, domain, CQ, AV and endpoint for `info` and enable the endpoint.
    pub fn open(info: &Info) -> Result<Self, FiError> {
        let mut me = Self {
            fabric: ptr::null_mut(),
            domain: ptr::null_mut(),
            cq: ptr::null_mut(),
            av: ptr::null_mut(),
            ep: ptr::null_mut(),
        };
        // SAFETY: each call gets objects opened just before (non-NULL on success) and the
        // fi_info from fi_getinfo; on an error, Drop closes what was opened.
        unsafe {
            let i = info.0;
            check(
                "fi_fabric",
                sys::fi_fabric((*i).fabric_attr, &mut me.fabric, ptr::null_mut()).into(),
            )?;
            check(
                "fi_domain",
                op!(
                    (*me.fabric).ops,
                    domain(me.fabric, i, &mut me.domain, ptr::null_mut())
                ),
            )?;
            let mut cq_attr = sys::fi_cq_attr {
                size: 1024,
                format: sys::fi_cq_format_FI_CQ_FORMAT_MSG,
                wait_obj: sys::fi_wait_obj_FI_WAIT_NONE,
                ..Default::default()
            };
            check(
                "fi_cq_open",
                op!(
                    (*me.domain).ops,
                    cq_open(me.domain, &mut cq_attr, &mut me.cq, ptr::null_mut())
                ),
            )?;
            let mut av_attr = sys::fi_av_attr {
                type_: sys::fi_av_type_FI_AV_TABLE,
                ..Default::default()
            };
            check(
                "fi_av_open",
                op!(
                    (*me.domain).ops,
                    av_open(me.domain, &mut av_attr, &mut me.av, ptr::null_mut())
                ),
            )?;
            check(
                "fi_endpoint",
                op!(
                    (*me.domain).ops,
                    endpoint(me.domain, i, &mut me.ep, ptr::null_mut())
                ),
            )?;
            let ep_fid = &mut (*me.ep).fid as *mut sys::fid;
            let cq_fid = &mut (*me.cq).fid as *mut sys::fid;
            let av_fid = &mut (*me.av).fid as *mut sys::fid;
            check(
                "fi_ep_bind(cq)",
                op!(
                    (*ep_fid).ops,
                    bind(ep_fid, cq_fid, u64::from(sys::FI_TRANSMIT | sys::FI_RECV))
                ),
            )?;
            check(
                "fi_ep_bind(av)",
                op!((*ep_fid).ops, bind(ep_fid, av_fid, 0)),
            )?;
            check(
                "fi_enable",
                op!(
                    (*ep_fid).ops,
                    control(ep_fid, sys::FI_ENABLE as i32, ptr::null_mut())
                ),
            )?;
        }
        Ok(me)
    }

    /// `fi_getname`: our address in the provider's format.
    pub fn name(&self) -> Result<Vec<u8>, FiError> {
        let mut buf = vec![0u8; 256];
        let mut len = buf.len();
        // SAFETY: the endpoint is open; `buf` is writable for `len` bytes.
        let rc = unsafe {
            let fid = &mut (*self.ep).fid as *mut sys::fid;
            op!(
                (*self.ep).cm,
                getname(fid, buf.as_mut_ptr().cast(), &mut len)
            )
        };
        check("fi_getname", rc)?;
        buf.truncate(len);
        Ok(buf)
    }

    /// `fi_av_insert` of one address; its `fi_addr`.
    pub fn insert(&self, addr: &[u8]) -> Result<u64, FiError> {
        let mut out = ADDR_NOTAVAIL;
        // SAFETY: the AV is open; `addr` is one address of the provider's format (from
        // fi_getinfo's dest_addr), `out` room for one fi_addr.
        let rc = unsafe {
            op!(
                (*self.av).ops,
                insert(
                    self.av,
                    addr.as_ptr().cast(),
                    1,
                    &mut out,
                    0,
                    ptr::null_mut()
                )
            )
        };
        if rc != 1 {
            return Err(FiError {
                call: "fi_av_insert",
                errno: if rc < 0 {
                    (-rc) as i32
                } else {
                    sys::FI_EINVAL as i32
                },
            });
        }
        Ok(out)
    }

    /// `fi_recv` into `buf` (which must stay valid and untouched until its completion).
    ///
    /// # Safety
    /// `buf` lives, unmoved and unaliased, until a completion with `context` is read.
    pub unsafe fn post_recv(&self, buf: &mut [u8], context: u64) -> Result<(), FiError> {
        // SAFETY: per the caller's contract; the endpoint is open.
        let rc = unsafe {
            op!(
                (*self.ep).msg,
                recv(
                    self.ep,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    ptr::null_mut(),
                    ADDR_NOTAVAIL, // FI_ADDR_UNSPEC (the same value): from anyone
                    context as *mut c_void
                )
            )
        };
        check("fi_recv", rc)
    }

    /// `fi_send` of `buf` to `dest`.
    ///
    /// # Safety
    /// `buf` lives, unmoved and unmodified, until a completion with `context` is read.
    pub unsafe fn send(&self, buf: &[u8], dest: u64, context: u64) -> Result<(), FiError> {
        // SAFETY: per the caller's contract; the endpoint is open.
        let rc = unsafe {
            op!(
                (*self.ep).msg,
                send(
                    self.ep,
                    buf.as_ptr().cast(),
                    buf.len(),
                    ptr::null_mut(),
                    dest,
                    context as *mut c_void
                )
            )
        };
        check("fi_send", rc)
    }

    /// Reads at most one completion (`fi_cq_readfrom`); an error completion comes back as
    /// `Err` with its context.
    pub fn poll(&self) -> Result<Option<Completion>, (u64, FiError)> {
        let mut e = sys::fi_cq_msg_entry::default();
        let mut src = ADDR_NOTAVAIL;
        // SAFETY: the CQ is open with FI_CQ_FORMAT_MSG; room for one entry and one address.
        let n = unsafe {
            op!(
                (*self.cq).ops,
                readfrom(
                    self.cq,
                    (&mut e as *mut sys::fi_cq_msg_entry).cast(),
                    1,
                    &mut src
                )
            )
        };
        if n == 1 {
            return Ok(Some(Completion {
                context: e.op_context as u64,
                len: e.len,
                src,
            }));
        }
        if n == -(sys::FI_EAGAIN as i64) || n == 0 {
            return Ok(None);
        }
        if n == -(sys::FI_EAVAIL as i64) {
            let mut err = sys::fi_cq_err_entry::default();
            // SAFETY: room for one error entry; no err_data buffer offered.
            let _ = unsafe { op!((*self.cq).ops, readerr(self.cq, &mut err, 0)) };
            return Err((
                err.op_context as u64,
                FiError {
                    call: "completion",
                    errno: err.err,
                },
            ));
        }
        Err((
            0,
            FiError {
                call: "fi_cq_readfrom",
                errno: (-n) as i32,
            },
        ))
    }
}

impl Drop for RdmEndpoint {
    fn drop(&mut self) {
        // SAFETY: every non-NULL object was opened by `open` and is closed once, endpoint
        // first (it is bound to the CQ and AV), fabric last.
        unsafe {
            for fid in [
                self.ep.cast::<sys::fid>(),
                self.av.cast(),
                self.cq.cast(),
                self.domain.cast(),
                self.fabric.cast(),
            ] {
                if !fid.is_null() {
                    let _ = op!((*fid).ops, close(fid));
                }
            }
        }
    }
}
