#![no_main]
//! Fuzzes the QUERY_CAPS answer parser the driver runs on what a device returns.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vfabric_proto::CapsParser::parse(data);
});
