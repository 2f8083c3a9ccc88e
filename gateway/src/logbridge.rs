//! pingora logs through the `log` crate, which the shared `tracing` set-up does not
//! capture. This bridge forwards pingora's warnings and errors to `tracing` (so they are
//! redacted and formatted like every other line), and turns its one report of a failed
//! TLS handshake into an audit line: pingora reports handshake failures only there, and
//! nowhere else is the remote address known together with the failure.

use std::sync::Arc;

use log::{Level, LevelFilter, Metadata, Record};

use crate::{
    audit::{self, Reason},
    metrics::Metrics,
};

const HANDSHAKE_ERROR: &str = "Downstream handshake error from ";
const HANDSHAKE_TIMEOUT: &str = "Downstream handshake timeout";

struct Bridge {
    metrics: Arc<Metrics>,
}

impl log::Log for Bridge {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= Level::Warn
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let msg = record.args().to_string();
        if let Some(rest) = msg.strip_prefix(HANDSHAKE_ERROR) {
            let (remote, detail) = rest.split_once(": ").unwrap_or((rest, ""));
            self.metrics.deny(Reason::Tls);
            audit::denied_connection(remote, Reason::Tls, detail);
            return;
        }
        if msg.starts_with(HANDSHAKE_TIMEOUT) {
            self.metrics.deny(Reason::Tls);
            audit::denied_connection("-", Reason::Tls, "handshake timeout");
            return;
        }
        if record.level() == Level::Error {
            tracing::error!(target: "pingora", module = record.target(), "{msg}");
        } else {
            tracing::warn!(target: "pingora", module = record.target(), "{msg}");
        }
    }

    fn flush(&self) {}
}

/// Installs the bridge as the process's `log` logger (once; later calls do nothing).
pub fn install(metrics: Arc<Metrics>) {
    if log::set_boxed_logger(Box::new(Bridge { metrics })).is_ok() {
        // Below warn, pingora's per-request debug lines would be formatted for nothing.
        log::set_max_level(LevelFilter::Warn);
    }
}
