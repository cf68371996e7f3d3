#![no_main]
//! Fuzzes the request-header parser the device runs on every chain a guest posts.
use libfuzzer_sys::fuzz_target;
use vfabric_proto::{QueueClass, Request};

fuzz_target!(|data: &[u8]| {
    for q in [QueueClass::Control, QueueClass::Tx, QueueClass::Rx] {
        if let Ok(req) = Request::parse_bytes(data, q) {
            // A request that parses re-encodes to a header that parses to the same request.
            let again = Request::parse(&req.to_header(), q).expect("re-encoded header parses");
            assert_eq!(again, req);
        }
    }
});
