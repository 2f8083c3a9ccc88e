#![no_main]
//! `worker_config`: see taskgate_fuzz_bodies::worker_config.

libfuzzer_sys::fuzz_target!(|data: &[u8]| taskgate_fuzz_bodies::worker_config(data));
