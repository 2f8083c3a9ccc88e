//! Logging set-up for both binaries: `tracing` to stderr (JSON lines, or human-readable
//! on a terminal) and optionally to daily rolling files, every line passing through
//! [`crate::redact`] on its way out.
//!
//! Redacting the formatted line in the writer (rather than field by field) is what makes
//! it "one place": whatever a log statement, a dependency or a `Debug` impl puts in a line,
//! the line is redacted before it reaches a file descriptor.

use std::{
    cell::RefCell,
    io::{self, IsTerminal, Write},
    path::PathBuf,
    str::FromStr,
    sync::OnceLock,
    time::{SystemTime, UNIX_EPOCH},
};

use tracing_appender::rolling;
use tracing_subscriber::{fmt::MakeWriter, layer::SubscriberExt, EnvFilter, Layer, Registry};

use crate::logwriter::{batch_writer, BatchGuard, BatchWriter};
use crate::redact::redact;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object a line (for journald, Kubernetes, log shippers).
    Json,
    /// Human-readable lines.
    Human,
}

impl LogFormat {
    /// JSON unless stderr is a terminal.
    pub fn auto() -> Self {
        if io::stderr().is_terminal() {
            LogFormat::Human
        } else {
            LogFormat::Json
        }
    }
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(LogFormat::Json),
            "human" | "text" => Ok(LogFormat::Human),
            "auto" => Ok(LogFormat::auto()),
            other => Err(format!(
                "{other:?} is not a log format; use json, human or auto"
            )),
        }
    }
}

/// Where and how to log.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Line format on stderr. Files are always JSON.
    pub format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `info,taskgate_worker=debug`.
    pub filter: String,
    /// Also write daily rolling files here.
    pub dir: Option<PathBuf>,
    /// File name prefix for rolling files (`worker` → `worker.2026-12-04.log`).
    pub file_prefix: String,
    /// How many rolling files to keep.
    pub max_files: usize,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The filter directive did not parse.
    #[error("log filter {filter:?} is invalid: {reason}")]
    Filter {
        /// The directive given.
        filter: String,
        /// Why it failed.
        reason: String,
    },
    /// The log directory could not be used.
    #[error("cannot write logs in {dir}: {reason}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// The thread that writes log lines could not be started.
    #[error("cannot start the log writer thread: {0}")]
    Thread(io::Error),
    /// A global subscriber was already installed.
    #[error("logging was already initialised")]
    AlreadySet,
}

/// Keeps the background log writers alive; drop it last, at exit, to flush.
#[must_use = "dropping the guard stops file logging"]
pub struct TelemetryGuard {
    _guards: Vec<BatchGuard>,
}

/// Installs the global subscriber.
pub fn init(opts: &LogOptions) -> Result<TelemetryGuard, TelemetryError> {
    let filter = |f: &str| {
        EnvFilter::try_new(f).map_err(|e| TelemetryError::Filter {
            filter: f.to_string(),
            reason: e.to_string(),
        })
    };
    let mut guards = Vec::new();
    let (stderr, g) = batch_writer("log-stderr", io::stderr()).map_err(TelemetryError::Thread)?;
    guards.push(g);
    if opts.format == LogFormat::Json && opts.dir.is_none() {
        // A second init (tests) keeps the first writer; its lines still reach stderr.
        let _ = DIRECT_JSON.set(stderr.clone());
    }
    let stderr = Redacting(stderr);
    let console: Box<dyn Layer<Registry> + Send + Sync> = match opts.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(stderr)
            .with_filter(filter(&opts.filter)?)
            .boxed(),
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_ansi(io::stderr().is_terminal())
            .with_writer(stderr)
            .with_filter(filter(&opts.filter)?)
            .boxed(),
    };
    let file = match &opts.dir {
        None => None,
        Some(dir) => {
            let appender = rolling::Builder::new()
                .rotation(rolling::Rotation::DAILY)
                .filename_prefix(&opts.file_prefix)
                .filename_suffix("log")
                .max_log_files(opts.max_files.max(1))
                .build(dir)
                .map_err(|e| TelemetryError::Dir {
                    dir: dir.clone(),
                    reason: e.to_string(),
                })?;
            let (w, g) = batch_writer("log-files", appender).map_err(TelemetryError::Thread)?;
            guards.push(g);
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(Redacting(w))
                    .with_filter(filter(&opts.filter)?),
            )
        }
    };
    let subscriber = Registry::default().with(console).with(file);
    tracing::subscriber::set_global_default(subscriber).map_err(|_| TelemetryError::AlreadySet)?;
    Ok(TelemetryGuard { _guards: guards })
}

/// The stderr writer, when every line goes there as JSON (no log files).
static DIRECT_JSON: OnceLock<BatchWriter> = OnceLock::new();

/// Writes one complete JSON line (ending in a newline) straight to the log writer thread,
/// skipping the subscriber's formatter and the whole-line redaction: for a hot path whose
/// lines have a fixed shape (the gateway's per-request audit line), where formatting
/// through `tracing` cost more than answering the request. The caller checks the level
/// is enabled, formats the line as the subscriber would ([`json_timestamp`]), and redacts
/// every free-text value itself.
///
/// Returns false, and writes nothing, unless logs are JSON on stderr only; the caller then
/// logs through `tracing`.
pub fn write_json_line(line: &[u8]) -> bool {
    match DIRECT_JSON.get() {
        Some(w) => {
            let mut w: &BatchWriter = w;
            w.write_all(line).is_ok()
        }
        None => false,
    }
}

/// True when [`write_json_line`] writes: logs are JSON on stderr only.
pub fn direct_json() -> bool {
    DIRECT_JSON.get().is_some()
}

/// Appends now, as the subscriber's JSON lines write it (RFC 3339, UTC, microseconds), to
/// `out`. The date and time up to the second are formatted once a second per thread; the
/// microseconds are appended by hand.
pub fn push_json_timestamp(out: &mut Vec<u8>) {
    thread_local! {
        /// (whole seconds since the epoch, "YYYY-MM-DDTHH:MM:SS." for them)
        static SECOND: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
    }
    let now = SystemTime::now();
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (secs, micros) = (since.as_secs(), since.subsec_micros());
    let cached = SECOND.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.0 != secs {
            s.1.clear();
            // "2026-12-04T22:48:27.000000Z" without the last 8 bytes ("000000Z").
            let full =
                humantime::format_rfc3339_micros(UNIX_EPOCH + std::time::Duration::from_secs(secs))
                    .to_string();
            s.1.extend_from_slice(&full.as_bytes()[..full.len() - 7]);
            s.0 = secs;
        }
        out.extend_from_slice(&s.1);
    });
    if cached.is_err() {
        let _ = write!(out, "{}", humantime::format_rfc3339_micros(now));
        return;
    }
    let mut digits = [b'0'; 6];
    let mut m = micros;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (m % 10) as u8;
        m /= 10;
    }
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

/// A `MakeWriter` whose writers redact every line before passing it on.
#[derive(Debug, Clone)]
pub struct Redacting<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Redacting<M> {
    type Writer = RedactingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter(self.0.make_writer())
    }
}

/// The writer made by [`Redacting`]. `tracing-subscriber` hands it one whole formatted
/// event per `write`, so each call redacts one complete line.
#[derive(Debug)]
pub struct RedactingWriter<W>(W);

impl<W: Write> Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.0.write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logwriter::tests::Capture;

    #[test]
    fn the_cached_timestamp_is_the_formatters() {
        for _ in 0..3 {
            let mut mine = Vec::new();
            push_json_timestamp(&mut mine);
            let theirs = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
            let mine = String::from_utf8(mine).unwrap();
            assert_eq!(mine.len(), theirs.len(), "{mine} vs {theirs}");
            // Same second (or the next one, if the second turned in between).
            assert!(theirs[..19] >= mine[..19], "{mine} vs {theirs}");
            assert!(mine.ends_with('Z') && mine.as_bytes()[19] == b'.', "{mine}");
            humantime::parse_rfc3339(&mine).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(400));
        }
    }

    #[test]
    fn every_line_is_redacted_in_json() {
        let cap = Capture::default();
        let c2 = cap.clone();
        let sub = tracing_subscriber::fmt()
            .json()
            .with_writer(Redacting(move || c2.clone()))
            .finish();
        tracing::subscriber::with_default(sub, || {
            let out = "{\"api_key\": \"sk-canary\"} password=hunter2";
            tracing::info!(
                output = out,
                token = "tok-canary",
                "executor said Authorization: Bearer abc123"
            );
        });
        let text = String::from_utf8(cap.0.lock().unwrap().clone()).unwrap();
        for secret in ["sk-canary", "hunter2", "tok-canary", "abc123"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        serde_json::from_str::<serde_json::Value>(text.trim()).unwrap();
    }
}
