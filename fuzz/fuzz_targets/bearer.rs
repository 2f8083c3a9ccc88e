#![no_main]
//! `bearer`: see taskgate_fuzz_bodies::bearer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| taskgate_fuzz_bodies::bearer(data));
