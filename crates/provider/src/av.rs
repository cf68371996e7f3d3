// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Address vectors (`fid_av`). `FI_AV_MAP` and `FI_AV_TABLE` both hand out table indices
//! (valid `fi_addr_t`s for either type); addresses come in the domain's address format.

use std::ffi::{c_char, c_int, c_void};
use std::sync::Mutex;

use vfabric::{fi, AddressVector, FabricAddr};

use crate::addr::{Addr, Format};
use crate::domain::DomainObj;
use crate::sys;
use crate::util::{
    check, copy_str_out, ffi_fns, fid_object, ops_ptr, ops_table, slice, FidObject, OrErrno,
    ParentRef, Refs,
};

/// `FI_EVENT` (asynchronous AV inserts).
const EVENT_FLAG: u64 = sys::FI_EVENT as u64;

/// `fid_av`.
#[repr(C)]
pub struct AvObj {
    pub fid: sys::fid_av,
    _domain: ParentRef,
    pub domain: *const DomainObj,
    pub av: AddressVector,
    pub av_type: u32,
    /// Names inserted in a host format, by `fi_addr` (what `fi_av_lookup` gives back).
    names: Mutex<std::collections::HashMap<u64, Vec<u8>>>,
    pub refs: Refs,
}

fid_object!(AvObj, FI_CLASS_AV, refs: refs);

impl AvObj {
    fn dom(&self) -> &DomainObj {
        // SAFETY: the domain outlives its AVs (ParentRef).
        unsafe { &*self.domain }
    }

    fn name(&self, x: u64, bytes: Vec<u8>) {
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(x, bytes);
    }

    /// Insert one address of the domain's format (a host format's through the device's
    /// service table).
    fn insert_one(&self, bytes: &[u8]) -> Result<u64, String> {
        let d = self.dom();
        if d.addr_format == Format::Native {
            return self.av.insert_bytes(bytes).map_err(|e| e.to_string());
        }
        let a = crate::addr::decode(d.addr_format, bytes)
            .ok_or_else(|| format!("not a {:?} address", d.addr_format))?;
        let n = crate::addr::resolve(&d.dom, &a).map_err(|e| resolve_error(&a, e))?;
        let x = self.av.insert(n).map_err(|e| e.to_string())?;
        self.name(x, bytes.to_vec());
        Ok(x)
    }

    /// `fi_av_insertsvc` of a host and a service: the endpoint bound to the service, recorded
    /// under the name of the domain's format.
    fn insert_host(&self, node: &str, service: Option<&str>) -> Result<u64, String> {
        let service = service.ok_or("a host needs a service")?;
        let svc =
            crate::addr::parse_service(service).ok_or_else(|| format!("service {service:?}"))?;
        let host = crate::addr::lookup_host(node, svc)
            .into_iter()
            .next()
            .ok_or_else(|| format!("node {node:?} does not resolve"))?;
        let host = Addr::Host(host);
        let d = self.dom();
        let n = crate::addr::resolve(&d.dom, &host).map_err(|e| resolve_error(&host, e))?;
        let x = self.av.insert(n).map_err(|e| e.to_string())?;
        let format = if d.addr_format.is_host() {
            d.addr_format.concrete_for(&host)
        } else {
            Format::Native
        };
        if let Some(b) = format.is_host().then(|| crate::addr::encode(format, &host)) {
            b.into_iter().for_each(|b| self.name(x, b));
        }
        Ok(x)
    }
}

/// Why a host address could not be resolved, for the log.
fn resolve_error(a: &Addr, errno: i32) -> String {
    let what = crate::addr::to_string(a);
    match errno {
        fi::EADDRNOTAVAIL => format!("{what}: no host of the fabric, or nothing bound to it"),
        fi::EHOSTUNREACH => format!(
            "{what}: a host of the fabric that is down or did not answer (its uplink peer \
             timeout)"
        ),
        e => format!("{what}: error {e}"),
    }
}

ops_table!(AV_OPS: fi_ops_av {
    insert = av_insert,
    insertsvc = av_insertsvc,
    insertsym,
    remove = av_remove,
    lookup = av_lookup,
    straddr = av_straddr,
    av_set,
});

/// `fi_av_open`.
pub unsafe extern "C" fn av_open(
    domain: *mut sys::fid_domain,
    attr: *mut sys::fi_av_attr,
    av: *mut *mut sys::fid_av,
    context: *mut c_void,
) -> c_int {
    crate::util::open(domain, attr, av, |d: &DomainObj, a| {
        let av_type = match a.type_ {
            sys::fi_av_type_FI_AV_UNSPEC => sys::fi_av_type_FI_AV_TABLE,
            t @ (sys::fi_av_type_FI_AV_MAP | sys::fi_av_type_FI_AV_TABLE) => t,
            _ => return Err(fi::EINVAL),
        };
        if !a.name.is_null() || a.flags & EVENT_FLAG != 0 {
            // Named/shared AVs and asynchronous inserts (FI_EVENT) are not supported.
            return Err(fi::ENOSYS);
        }
        Ok(AvObj {
            fid: sys::fid_av {
                fid: AvObj::fid(context),
                ops: ops_ptr(&AV_OPS),
            },
            av: d.dom.av_open().or_errno(sys::fi_log_subsys_FI_LOG_AV)?,
            // SAFETY: the domain refuses to close while this count is held.
            _domain: unsafe { ParentRef::new(&d.refs) },
            domain: d,
            av_type,
            names: Mutex::new(Default::default()),
            refs: Refs::default(),
        })
    })
}

ffi_fns! {
    fn av_insert(
        av: *mut sys::fid_av, addr: *const c_void, count: usize, fi_addr: *mut u64, flags: u64,
        _context: *mut c_void,
    ) -> c_int {
        // SAFETY: consumer passes one of our AVs.
        let a = unsafe { AvObj::from_fid(av) }?;
        check(!addr.is_null() || count == 0)?;
        if flags & !(fi::MORE | sys::FI_SYNC_ERR) != 0 {
            return Err(fi::EBADFLAGS);
        }
        let format = a.dom().addr_format;
        let mut n = 0;
        let mut at = addr.cast::<u8>();
        for k in 0..count {
            // SAFETY: `addr` holds `count` addresses of the domain's format, one after the
            // other.
            let b = unsafe {
                let len = crate::addr::len_at(format, at.cast());
                let b = std::slice::from_raw_parts(at, len);
                at = at.add(len);
                b
            };
            let r = a.insert_one(b);
            match &r {
                // Say why: the count returned only says that some address was refused.
                Err(e) => crate::util::warn(
                    sys::fi_log_subsys_FI_LOG_AV,
                    &format!("fi_av_insert: address {k} refused: {e}"),
                ),
                Ok(x) => {
                    if let (Ok(peer), Some(w)) = (a.av.lookup(*x), a.dom().watch()) {
                        w.watch(peer);
                    }
                    n += 1;
                }
            }
            if !fi_addr.is_null() {
                // SAFETY: `fi_addr` has room for `count` entries.
                unsafe { *fi_addr.add(k) = r.unwrap_or(vfabric::FI_ADDR_NOTAVAIL) };
            }
        }
        Ok(n)
    }

    fn av_insertsvc(
        av: *mut sys::fid_av, node: *const c_char, service: *const c_char, fi_addr: *mut u64,
        _flags: u64, _context: *mut c_void,
    ) -> c_int {
        // SAFETY: consumer passes one of our AVs.
        let a = unsafe { AvObj::from_fid(av) }?;
        // SAFETY: NULL or C strings.
        let (node, service) = unsafe { (crate::util::c_str(node), crate::util::c_str(service)) };
        let node = node.ok_or(fi::EINVAL)?;
        let r = if service.is_none() && node.trim().starts_with("vfab://") {
            a.av.insert_str(&node).map_err(|e| e.to_string())
        } else {
            a.insert_host(&node, service.as_deref())
        };
        if let Err(e) = &r {
            crate::util::warn(sys::fi_log_subsys_FI_LOG_AV, &format!("fi_av_insertsvc: {e}"));
        }
        if !fi_addr.is_null() {
            // SAFETY: room for one entry.
            unsafe { *fi_addr = *r.as_ref().unwrap_or(&vfabric::FI_ADDR_NOTAVAIL) };
        }
        Ok(r.is_ok() as c_int)
    }

    fn av_remove(av: *mut sys::fid_av, fi_addr: *mut u64, count: usize, _flags: u64) -> c_int {
        // SAFETY: consumer passes one of our AVs.
        let a = unsafe { AvObj::from_fid(av) }?;
        let mut rc = 0;
        // SAFETY: `fi_addr` holds `count` entries.
        for &x in unsafe { slice(fi_addr, count) }? {
            if let Err(e) = a.av.remove(x) {
                rc = -e.errno();
            }
            a.names.lock().unwrap_or_else(|e| e.into_inner()).remove(&x);
        }
        Ok(rc)
    }

    fn av_lookup(av: *mut sys::fid_av, fi_addr: u64, addr: *mut c_void, addrlen: *mut usize) -> c_int {
        check(!addrlen.is_null())?;
        // SAFETY: consumer passes one of our AVs.
        let a = unsafe { AvObj::from_fid(av) }?;
        let x = a.av.lookup(fi_addr).map_err(|_| fi::ENOENT)?;
        let named = a
            .names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fi_addr)
            .cloned();
        let bytes = named.unwrap_or_else(|| x.to_bytes().to_vec());
        // SAFETY: `addrlen` valid; `addr` NULL or writable for *addrlen bytes.
        unsafe {
            let n = (*addrlen).min(bytes.len());
            if !addr.is_null() {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr.cast::<u8>(), n);
            }
            *addrlen = bytes.len();
        }
        Ok(0)
    }
}

/// Printable form of a 16-byte address (`vfab://FABRIC.HOST.DEV/EP.GEN`).
///
/// # Safety
/// `addr` is NULL or readable for 16 bytes.
pub unsafe fn addr_string(addr: *const c_void) -> String {
    if addr.is_null() {
        return "(null)".into();
    }
    // SAFETY: readable for ADDR_LEN bytes per the contract.
    let b = unsafe { std::slice::from_raw_parts(addr.cast::<u8>(), crate::info::ADDR_LEN) };
    match FabricAddr::from_bytes(b) {
        Ok(a) => a.to_string(),
        Err(_) => "(invalid vfabric address)".into(),
    }
}

unsafe extern "C" fn av_straddr(
    av: *mut sys::fid_av,
    addr: *const c_void,
    buf: *mut c_char,
    len: *mut usize,
) -> *const c_char {
    if len.is_null() {
        return std::ptr::null();
    }
    let r = std::panic::catch_unwind(|| {
        // SAFETY: consumer passes one of our AVs (NULL: the native format).
        let format = unsafe { AvObj::from_fid(av) }.map_or(Format::Native, |a| a.dom().addr_format);
        let text = if format == Format::Native || addr.is_null() {
            // SAFETY: `addr` is one of our addresses (16 bytes) per the fi_av_straddr
            // contract.
            unsafe { addr_string(addr) }
        } else {
            // SAFETY: `addr` is an address of the domain's format.
            let b = unsafe {
                std::slice::from_raw_parts(addr.cast::<u8>(), crate::addr::len_at(format, addr))
            };
            crate::addr::decode(format, b).map_or_else(
                || "(invalid address)".into(),
                |x| crate::addr::to_string(&x),
            )
        };
        // SAFETY: `buf` writable for *len bytes.
        unsafe { copy_str_out(&text, buf, len) };
    });
    if r.is_err() {
        return std::ptr::null();
    }
    buf
}
