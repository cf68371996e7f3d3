#![no_main]
//! Fuzzes the device with a guest memory image: descriptor tables, available rings, request
//! headers and data as the input says, every queue kicked (chain walker, parser, fabric).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vfabric_device::fuzzing::chain_image(data);
});
