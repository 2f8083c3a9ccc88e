#![no_main]
//! `gateway_config`: see taskgate_fuzz_bodies::gateway_config.

libfuzzer_sys::fuzz_target!(|data: &[u8]| taskgate_fuzz_bodies::gateway_config(data));
