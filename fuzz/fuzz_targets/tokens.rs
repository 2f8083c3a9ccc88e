#![no_main]
//! `tokens`: see taskgate_fuzz_bodies::tokens.

libfuzzer_sys::fuzz_target!(|data: &[u8]| taskgate_fuzz_bodies::tokens(data));
