#![no_main]
//! `redact`: see taskgate_fuzz_bodies::redact.

libfuzzer_sys::fuzz_target!(|data: &[u8]| taskgate_fuzz_bodies::redact(data));
