//! Helpers for taskgate's end-to-end tests, so each test reads like a user's session.
//!
//! # Layout
//!
//! - [`eventually`]: poll a condition instead of sleeping.
//! - [`pg`]: a fresh PostgreSQL database per test, dropped afterwards.
//! - [`pki`]: a CA with server and client certificates for TLS tests.
#![deny(rust_2018_idioms)]

pub mod eventually;
pub mod pg;
pub mod pki;
