// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Link settings of the provider cdylib (the libfabric bindings are in `vfabric-fi-sys`).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Never unloaded (libfabric dlcloses providers in fi_fini): Rust statics (the domain table,
    // the driver's remap table), thread-local destructors and helper threads are not
    // unload-safe, and an unmapped .so turns the heap its statics own into "definite leaks"
    // under valgrind (tests/provider.rs runs the C suites under memcheck).
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
}
