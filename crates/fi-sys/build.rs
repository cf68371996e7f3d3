// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Generate the libfabric 1.17 bindings from the installed headers (`libfabric-dev`).

use std::path::PathBuf;

const HEADERS: &[&str] = &[
    "rdma/fabric.h",
    "rdma/fi_errno.h",
    "rdma/fi_domain.h",
    "rdma/fi_endpoint.h",
    "rdma/fi_cm.h",
    "rdma/fi_eq.h",
    "rdma/fi_rma.h",
    "rdma/fi_atomic.h",
    "rdma/fi_tagged.h",
    "rdma/fi_collective.h",
    "rdma/providers/fi_prov.h",
    "rdma/providers/fi_log.h",
];

fn main() {
    let mut wrapper = String::new();
    for h in HEADERS {
        wrapper.push_str(&format!("#include <{h}>\n"));
        println!("cargo:rerun-if-changed=/usr/include/{h}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    let bindings = bindgen::Builder::default()
        .header_contents("vfabric_wrapper.h", &wrapper)
        .allowlist_type("fi_.*|fid.*|fid_.*")
        .allowlist_function("fi_log|fi_log_enabled|fi_log_ready|fi_param_define|fi_param_get|fi_dupinfo|fi_freeinfo|fi_strerror|fi_tostr|fi_version|fi_getinfo|fi_fabric")
        .allowlist_var("FI_.*")
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .generate()
        .expect("bindgen: libfabric headers (install libfabric-dev and libclang-dev)");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    bindings
        .write_to_file(out.join("fi_bindings.rs"))
        .expect("write bindings");
    println!("cargo:rustc-link-lib=fabric");
}
