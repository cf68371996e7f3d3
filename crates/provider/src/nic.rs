// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `fi_info->nic`: the device's description (`fi_info -v` prints it), with the vendor-specific
//! QUERY_CAPS entries summarized in `device_attr->firmware`. The core duplicates it through
//! `fi_control(FI_DUP)` and frees it with `fi_close`, both ours.

use std::ffi::{c_int, c_void, CString};
use vfabric::{fi, Info};

use crate::sys;
use crate::util::{ffi_fns, fid_object, FidObject};

/// Plain values of a NIC description.
#[derive(Clone)]
struct NicFields {
    name: String,
    device_id: String,
    device_version: String,
    vendor_id: String,
    driver: String,
    firmware: String,
    address: String,
    mtu: usize,
    network_type: String,
}

#[repr(C)]
struct NicObj {
    fid: sys::fid_nic,
    device: sys::fi_device_attr,
    bus: sys::fi_bus_attr,
    link: sys::fi_link_attr,
    fields: NicFields,
    _strings: Vec<CString>,
}

fid_object!(
    NicObj,
    FI_CLASS_NIC,
    fi_ops {
        control: nic_control
    }
);

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', " ")).unwrap_or_default()
}

fn nic_new(f: NicFields) -> *mut sys::fid_nic {
    let strings: Vec<CString> = [
        &f.name,
        &f.device_id,
        &f.device_version,
        &f.vendor_id,
        &f.driver,
        &f.firmware,
        &f.address,
        &f.network_type,
    ]
    .iter()
    .map(|s| cstring(s))
    .collect();
    let p = |i: usize| strings[i].as_ptr().cast_mut();
    let mut b = Box::new(NicObj {
        fid: sys::fid_nic {
            fid: NicObj::fid(std::ptr::null_mut()),
            device_attr: std::ptr::null_mut(),
            bus_attr: std::ptr::null_mut(),
            link_attr: std::ptr::null_mut(),
            prov_attr: std::ptr::null_mut(),
        },
        device: sys::fi_device_attr {
            name: p(0),
            device_id: p(1),
            device_version: p(2),
            vendor_id: p(3),
            driver: p(4),
            firmware: p(5),
        },
        bus: sys::fi_bus_attr {
            bus_type: sys::fi_bus_type_FI_BUS_UNKNOWN,
            // SAFETY: an all-zero bus attribute union is a valid "no PCI data" value.
            attr: unsafe { std::mem::zeroed() },
        },
        link: sys::fi_link_attr {
            address: p(6),
            mtu: f.mtu,
            speed: 0,
            state: sys::fi_link_state_FI_LINK_UP,
            network_type: p(7),
        },
        fields: f,
        _strings: Vec::new(),
    });
    b._strings = strings;
    b.fid.device_attr = &mut b.device;
    b.fid.bus_attr = &mut b.bus;
    b.fid.link_attr = &mut b.link;
    Box::into_raw(b).cast()
}

/// A NIC description of `dev`, owned by the `fi_info` it is attached to.
pub fn nic_of(dev: &Info) -> *mut sys::fid_nic {
    let vendor: Vec<String> = dev
        .vendor_attrs
        .iter()
        .map(|e| format!("{:#x}:{}={}", e.vendor, e.name, e.value))
        .collect();
    let node = vfabric::FabricAddr::new(dev.node_addr, 0, 0);
    nic_new(NicFields {
        name: dev.domain_name.clone(),
        device_id: match vfabric::announced_device_id(&dev.vendor_attrs) {
            Some(id) => format!("virtio-fabric ({id})"),
            None => "virtio-fabric".into(),
        },
        device_version: format!("features {}", dev.feature_names.join(",")),
        vendor_id: format!("{:#x}", dev.vendor_id),
        driver: "vfabric".into(),
        firmware: if vendor.is_empty() {
            "no vendor attributes".into()
        } else {
            vendor.join(" ")
        },
        address: format!(
            "vfab://{:x}.{:x}.{:x}",
            node.fabric(),
            node.host(),
            node.device()
        ),
        mtu: dev.limits.max_msg_size as usize,
        network_type: "virtio-fabric".into(),
    })
}

ffi_fns! {
    fn nic_control(fid: *mut sys::fid, cmd: c_int, arg: *mut c_void) -> c_int {
        // SAFETY: the core passes the nic of an fi_info we built (class checked).
        let n = unsafe { NicObj::from_fid(fid) }?;
        if cmd as u32 != sys::FI_DUP || arg.is_null() {
            return Err(fi::ENOSYS);
        }
        // SAFETY: for FI_DUP, `arg` is a `struct fid_nic **` receiving the copy.
        unsafe { *arg.cast::<*mut sys::fid_nic>() = nic_new(n.fields.clone()) };
        Ok(0)
    }
}
