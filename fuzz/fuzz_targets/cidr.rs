#![no_main]
//! `cidr`: see taskgate_fuzz_bodies::cidr.

libfuzzer_sys::fuzz_target!(|data: &[u8]| taskgate_fuzz_bodies::cidr(data));
