#![no_main]
//! Fuzzes the device with a frontend's session: the backend calls vhost-user messages turn
//! into (features, memory tables, ring addresses, enables, kicks, stops, resets, config), guest
//! memory writes and requests on the rings.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vfabric_device::fuzzing::session(data);
});
