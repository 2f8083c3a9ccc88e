//! Pieces both taskgate binaries need: reading TOML config files strictly, redacting
//! secrets from text, parsing listen addresses and CIDR lists, loading bearer-token
//! files, and setting up logging so that every line passes through the redactor.
//!
//! # Layout
//!
//! - [`config`]: strict TOML loading (`deny_unknown_fields` errors that name the key) and
//!   the exit code for a bad configuration.
//! - [`redact`]: the one redactor every log line, stored error and captured output uses.
//! - [`listen`]: `unix:/path` / `IP:PORT` listen and upstream addresses.
//! - [`cidr`]: CIDR allow-lists (IPv4 and IPv6).
//! - [`privdrop`]: the privilege drop after binding (groups, gid, uid, no_new_privs, check).
//! - [`tokens`]: bearer-token sets loaded from files or values, compared in constant time.
//! - [`telemetry`]: `tracing` set-up (JSON or human lines, rolling files) behind the redactor.
//! - [`logwriter`]: the log writer threads and the per-thread line buffers they drain.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod cidr;
pub mod config;
pub mod listen;
pub mod logwriter;
pub mod privdrop;
pub mod redact;
pub mod telemetry;
pub mod tokens;
