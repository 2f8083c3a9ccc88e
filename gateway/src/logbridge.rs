//! pingora logs through the `log` crate, which the shared `tracing` set-up does not
//! capture. This bridge forwards pingora's warnings and errors to `tracing`, so they are
//! redacted and formatted like every other line.
//!
//! rustls also logs through `log`, a warning for every alert it sends. A failed handshake
//! already has its audit line (written where the handshake fails, with the remote
//! address), so rustls's lines are dropped: a flood of bad handshakes must not double
//! the log volume.

use log::{Level, LevelFilter, Metadata, Record};

struct Bridge;

impl log::Log for Bridge {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= Level::Warn && !metadata.target().starts_with("rustls")
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let msg = record.args().to_string();
        if record.level() == Level::Error {
            tracing::error!(target: "pingora", module = record.target(), "{msg}");
        } else {
            tracing::warn!(target: "pingora", module = record.target(), "{msg}");
        }
    }

    fn flush(&self) {}
}

/// Installs the bridge as the process's `log` logger (once; later calls do nothing).
pub fn install() {
    if log::set_boxed_logger(Box::new(Bridge)).is_ok() {
        // Below warn, debug lines would be formatted for nothing.
        log::set_max_level(LevelFilter::Warn);
    }
}
