#![no_main]
//! `modules`: see taskgate_fuzz_bodies::modules.

libfuzzer_sys::fuzz_target!(|data: &[u8]| taskgate_fuzz_bodies::modules(data));
