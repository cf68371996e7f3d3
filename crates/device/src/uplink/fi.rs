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
    ///
    /// With `rma` the endpoint is asked for RMA reads and writes too (rendezvous), and for
    /// sends ordered after writes (an RDV_REPLY follows the bytes it announces); a provider
    /// without them answers FI_ENODATA and the caller asks again without.
    pub fn rdm(
        prov: &str,
        node: &str,
        service: &str,
        source: bool,
        rma: bool,
    ) -> Result<Self, FiError> {
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
            let mut order = u64::from(sys::FI_ORDER_SAS);
            if rma {
                (*hints).caps |= u64::from(
                    sys::FI_RMA
                        | sys::FI_READ
                        | sys::FI_WRITE
                        | sys::FI_REMOTE_READ
                        | sys::FI_REMOTE_WRITE,
                );
                order |= u64::from(sys::FI_ORDER_SAW);
            }
            (*(*hints).ep_attr).type_ = sys::fi_ep_type_FI_EP_RDM;
            // Messages between two hosts arrive in the order they were sent: the chunks of
            // one guest message, and guest messages of one pair.
            (*(*hints).tx_attr).msg_order = order;
            (*(*hints).rx_attr).msg_order = order;
            (*(*hints).fabric_attr).prov_name = libc::strdup(prov.as_ptr());
            // The registration modes the uplink handles (see `RdmEndpoint::register`).
            (*(*hints).domain_attr).mr_mode = (sys::FI_MR_VIRT_ADDR
                | sys::FI_MR_ALLOCATED
                | sys::FI_MR_PROV_KEY
                | sys::FI_MR_LOCAL) as i32;
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

    /// Whether the first entry grants RMA reads and writes, and its registration mode.
    fn rma_and_mr_mode(&self) -> (bool, u32) {
        let want = u64::from(sys::FI_RMA | sys::FI_READ | sys::FI_REMOTE_READ | sys::FI_WRITE);
        // SAFETY: `self.0` is a valid fi_info with a domain_attr.
        unsafe {
            let i = &*self.0;
            (i.caps & want == want, (*i.domain_attr).mr_mode as u32)
        }
    }

    /// The provider's name (`tcp;ofi_rxm`, `verbs;ofi_rxm`, ...) of the first entry.
    fn prov_name(&self) -> String {
        // SAFETY: a valid fi_info from fi_getinfo has a valid fabric_attr; its prov_name is a
        // C string or NULL.
        unsafe {
            let p = (*(*self.0).fabric_attr).prov_name;
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        }
    }

    /// Local buffers one operation may name at most (the first entry's `tx_attr->iov_limit`).
    fn iov_limit(&self) -> usize {
        // SAFETY: `self.0` is a valid fi_info with a tx_attr.
        unsafe { (*(*self.0).tx_attr).iov_limit }
    }

    /// Remote buffers one RMA operation may name at most (`tx_attr->rma_iov_limit`).
    fn rma_iov_limit(&self) -> usize {
        // SAFETY: `self.0` is a valid fi_info with a tx_attr.
        unsafe { (*(*self.0).tx_attr).rma_iov_limit }
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

/// Whether provider `name` (a layered name like `tcp;ofi_rxm`: the core provider comes first)
/// writes received data with the CPU through our page tables, so that remapping a destination
/// stops late writes into it.
fn revocable_provider(name: &str) -> bool {
    matches!(name.split(';').next(), Some("tcp" | "sockets"))
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
    /// The CQ's wait fd (`FI_WAIT_FD`): readable when the provider has progress to make.
    /// `None` when the provider offers no wait object (the caller then polls).
    wait_fd: Option<i32>,
    /// RMA granted (rendezvous possible).
    rma: bool,
    /// The domain's FI_MR_* mode bits.
    mr_mode: u32,
    /// Whether a mapping that the provider writes through can be cut under it (see
    /// [`RdmEndpoint::writes_revocable`]).
    writes_revocable: bool,
    /// Local buffers one operation may name at most (`tx_attr->iov_limit`, at least 1).
    iov_limit: usize,
    /// Remote buffers one RMA operation may name at most (`tx_attr->rma_iov_limit`, at
    /// least 1).
    rma_iov_limit: usize,
    /// Source of requested keys (FI_MR_PROV_KEY unset): unguessable by peers.
    key_seed: u64,
    next_key: std::cell::Cell<u64>,
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

/// `fi_rma_iov`s of (address, key, length) triples.
fn rma_iovs(rma: &[(u64, u64, u64)]) -> Vec<sys::fi_rma_iov> {
    rma.iter()
        .map(|&(addr, key, len)| sys::fi_rma_iov {
            addr,
            // Past the address space: a length the provider refuses, never a shorter one.
            len: usize::try_from(len).unwrap_or(usize::MAX),
            key,
        })
        .collect()
}

/// Not in the AV (`FI_ADDR_NOTAVAIL`).
pub const ADDR_NOTAVAIL: u64 = u64::MAX;

impl RdmEndpoint {
    /// Open fabric, domain, CQ, AV and endpoint for `info` and enable the endpoint.
    pub fn open(info: &Info) -> Result<Self, FiError> {
        let (rma, mr_mode) = info.rma_and_mr_mode();
        let mut me = Self {
            wait_fd: None,
            rma,
            mr_mode,
            writes_revocable: revocable_provider(&info.prov_name()),
            iov_limit: info.iov_limit().max(1),
            rma_iov_limit: info.rma_iov_limit().max(1),
            key_seed: random_u64(),
            next_key: std::cell::Cell::new(1),
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
            // A CQ with a wait fd lets the uplink thread sleep in the kernel until data
            // arrives instead of spinning (on a host with few cores a spinning thread takes
            // the core the guests need); a provider without one is polled.
            for wait_obj in [sys::fi_wait_obj_FI_WAIT_FD, sys::fi_wait_obj_FI_WAIT_NONE] {
                let mut cq_attr = sys::fi_cq_attr {
                    size: 1024,
                    format: sys::fi_cq_format_FI_CQ_FORMAT_MSG,
                    wait_obj,
                    ..Default::default()
                };
                let rc = op!(
                    (*me.domain).ops,
                    cq_open(me.domain, &mut cq_attr, &mut me.cq, ptr::null_mut())
                );
                if rc == 0 || wait_obj == sys::fi_wait_obj_FI_WAIT_NONE {
                    check("fi_cq_open", rc)?;
                    break;
                }
            }
            let cq_fid = &mut (*me.cq).fid as *mut sys::fid;
            let mut fd: i32 = -1;
            let rc = op!(
                (*cq_fid).ops,
                control(cq_fid, sys::FI_GETWAIT as i32, (&mut fd as *mut i32).cast())
            );
            me.wait_fd = (rc == 0 && fd >= 0).then_some(fd);
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

    /// Whether the endpoint does RMA (rendezvous).
    pub fn rma(&self) -> bool {
        self.rma
    }

    /// Whether data the provider is still writing into our memory can be cut off by mapping
    /// other pages over the destination: true for providers that write with the CPU through
    /// this process's page tables (`tcp`, `sockets`). A NIC that pinned the pages at
    /// registration (`verbs`, `efa`, ...) would go on writing the guest's pages, so reads into
    /// guest memory stay off there.
    pub fn writes_revocable(&self) -> bool {
        self.writes_revocable
    }

    /// `fi_mr_reg` of `buf` with `access` (FI_READ, FI_WRITE, FI_REMOTE_READ,
    /// FI_REMOTE_WRITE). Keys are the provider's (FI_MR_PROV_KEY) or drawn from a per-start
    /// random sequence, so a peer cannot guess another peer's key.
    ///
    /// # Safety
    /// `buf` stays allocated and unmoved until the returned [`Mr`] is dropped, and the `Mr`
    /// is dropped before this endpoint.
    pub unsafe fn register(&self, buf: &[u8], access: u64) -> Result<Mr, FiError> {
        // SAFETY: the caller's contract.
        unsafe { self.register_raw(buf.as_ptr(), buf.len(), access) }
    }

    /// [`RdmEndpoint::register`] of `len` bytes at `ptr` that are not a Rust slice (guest
    /// memory, which the guest may write at any time).
    ///
    /// # Safety
    /// The `len` bytes at `ptr` stay mapped until the returned [`Mr`] is dropped, and the
    /// `Mr` is dropped before this endpoint.
    pub unsafe fn register_raw(
        &self,
        ptr: *const u8,
        len: usize,
        access: u64,
    ) -> Result<Mr, FiError> {
        let n = self.next_key.get();
        self.next_key.set(n.wrapping_add(1));
        let requested = splitmix64(self.key_seed.wrapping_add(n));
        let mut mr: *mut sys::fid_mr = ptr::null_mut();
        let dom = &mut (*self.domain).fid as *mut sys::fid;
        // SAFETY: the domain is open; the bytes are mapped per the caller's contract.
        let rc = unsafe {
            op!(
                (*self.domain).mr,
                reg(
                    dom,
                    ptr.cast(),
                    len,
                    access,
                    0,
                    requested,
                    0,
                    &mut mr,
                    ptr::null_mut()
                )
            )
        };
        check("fi_mr_reg", rc)?;
        // SAFETY: fi_mr_reg succeeded: `mr` is a valid fid_mr.
        let (key, desc) = unsafe { ((*mr).key, (*mr).mem_desc) };
        let addr = if self.mr_mode & sys::FI_MR_VIRT_ADDR != 0 {
            ptr as u64
        } else {
            0
        };
        Ok(Mr {
            mr,
            key,
            desc,
            addr,
        })
    }

    /// Local buffers one operation may name at most (see [`RdmEndpoint::read_raw_iov`]).
    pub fn iov_limit(&self) -> usize {
        self.iov_limit
    }

    /// Remote buffers one RMA operation may name at most (see
    /// [`RdmEndpoint::read_raw_iov`]).
    pub fn rma_iov_limit(&self) -> usize {
        self.rma_iov_limit
    }

    /// `fi_readmsg` of the remote buffers `rma` (address, key, length) of `src`, in order,
    /// into the buffers `dst`, in order, each registered as the `Mr` beside it: at most
    /// [`RdmEndpoint::iov_limit`] of those and [`RdmEndpoint::rma_iov_limit`] of these, as
    /// many bytes on each side.
    ///
    /// # Safety
    /// Each `ptr..ptr + len` of `dst` stays mapped and is written by nobody else, and each `Mr`
    /// lives, until a completion with `context` is read or the connection to `src` is closed.
    pub unsafe fn read_raw_iov(
        &self,
        dst: &[(*mut u8, usize, &Mr)],
        src: u64,
        rma: &[(u64, u64, u64)],
        context: u64,
    ) -> Result<(), FiError> {
        let iov: Vec<sys::iovec> = dst
            .iter()
            .map(|&(p, len, _)| sys::iovec {
                iov_base: p.cast(),
                iov_len: len,
            })
            .collect();
        let mut desc: Vec<*mut c_void> = dst.iter().map(|(_, _, mr)| mr.desc).collect();
        let rma_iov = rma_iovs(rma);
        let msg = sys::fi_msg_rma {
            msg_iov: iov.as_ptr(),
            desc: desc.as_mut_ptr(),
            iov_count: iov.len(),
            addr: src,
            rma_iov: rma_iov.as_ptr(),
            rma_iov_count: rma_iov.len(),
            context: context as *mut c_void,
            data: 0,
        };
        // SAFETY: per the caller's contract; `msg` and the arrays it points at live for the
        // call (the provider copies what it keeps); the endpoint is open.
        let rc = unsafe {
            op!(
                (*self.ep).rma,
                readmsg(self.ep, &msg, u64::from(sys::FI_COMPLETION))
            )
        };
        check("fi_readmsg", rc)
    }

    /// `fi_writemsg` of the `len` bytes at `src` (registered as `mr`; not a Rust slice: guest
    /// memory, which its guest may write meanwhile) to the remote buffers `rma` (address,
    /// key, length) of `dest`, in order: at most [`RdmEndpoint::rma_iov_limit`] of them,
    /// `len` bytes in all.
    ///
    /// # Safety
    /// `src..src + len` stays mapped, and `mr` lives, until a completion with `context` is
    /// read or the connection to `dest` is closed.
    pub unsafe fn write_raw(
        &self,
        src: *const u8,
        len: usize,
        mr: &Mr,
        dest: u64,
        rma: &[(u64, u64, u64)],
        context: u64,
    ) -> Result<(), FiError> {
        let iov = sys::iovec {
            iov_base: src.cast_mut().cast(),
            iov_len: len,
        };
        let mut desc = mr.desc;
        let rma_iov = rma_iovs(rma);
        let msg = sys::fi_msg_rma {
            msg_iov: &iov,
            desc: &mut desc,
            iov_count: 1,
            addr: dest,
            rma_iov: rma_iov.as_ptr(),
            rma_iov_count: rma_iov.len(),
            context: context as *mut c_void,
            data: 0,
        };
        // SAFETY: per the caller's contract; `msg` and what it points at live for the call
        // (the provider copies what it keeps); the endpoint is open.
        let rc = unsafe {
            op!(
                (*self.ep).rma,
                writemsg(self.ep, &msg, u64::from(sys::FI_COMPLETION))
            )
        };
        check("fi_writemsg", rc)
    }

    /// The CQ's wait fd, if the provider gave one.
    pub fn wait_fd(&self) -> Option<i32> {
        self.wait_fd
    }

    /// `fi_trywait` on the CQ: whether blocking on [`RdmEndpoint::wait_fd`] now is safe (no
    /// completion or progress is pending that the fd would not signal).
    pub fn try_wait(&self) -> bool {
        if self.wait_fd.is_none() {
            return false;
        }
        let mut fid = self.cq.cast::<sys::fid>();
        // SAFETY: the fabric and CQ are open; `fid` is an array of one CQ fid for the call.
        let rc = unsafe { op!((*self.fabric).ops, trywait(self.fabric, &mut fid, 1)) };
        rc == 0
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

/// A memory registration with the uplink domain (closed on drop; drop it before the
/// endpoint).
pub struct Mr {
    mr: *mut sys::fid_mr,
    /// The key a peer names it by.
    pub key: u64,
    desc: *mut c_void,
    /// The address a peer names its first byte by (virtual or 0, per FI_MR_VIRT_ADDR).
    pub addr: u64,
}

// SAFETY: like the endpoint, a registration is used by the uplink thread only.
unsafe impl Send for Mr {}

impl Drop for Mr {
    fn drop(&mut self) {
        let fid = self.mr.cast::<sys::fid>();
        // SAFETY: a registration from fi_mr_reg, closed once.
        unsafe {
            let _ = op!((*fid).ops, close(fid));
        }
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64 random bits from the kernel (a time-derived value if it has none to give).
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into a live buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    if n == 8 {
        u64::from_ne_bytes(b)
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::revocable_provider;

    #[test]
    fn only_providers_writing_through_our_page_tables_are_revocable() {
        assert!(revocable_provider("tcp;ofi_rxm"));
        assert!(revocable_provider("tcp"));
        assert!(revocable_provider("sockets"));
        assert!(!revocable_provider("verbs;ofi_rxm"));
        assert!(!revocable_provider("efa"));
        assert!(!revocable_provider("ofi_rxm;tcp"));
        assert!(!revocable_provider(""));
    }
}
