//! Logging set-up for both binaries: `tracing` to stderr (JSON lines, or human-readable
//! on a terminal) and optionally to daily rolling files, every line passing through
//! [`crate::redact`] on its way out.
//!
//! Redacting the formatted line in the writer (rather than field by field) is what makes
//! it "one place": whatever a log statement, a dependency or a `Debug` impl puts in a line,
//! the line is redacted before it reaches a file descriptor.

use std::{
    io::{self, IsTerminal, Write},
    path::PathBuf,
    str::FromStr,
    sync::{
        mpsc::{self, SyncSender, TryRecvError},
        OnceLock,
    },
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use tracing_appender::rolling;
use tracing_subscriber::{fmt::MakeWriter, layer::SubscriberExt, EnvFilter, Layer, Registry};

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

/// Now, as the subscriber's JSON lines write it (RFC 3339, UTC, microseconds).
pub fn json_timestamp() -> impl std::fmt::Display {
    humantime::format_rfc3339_micros(SystemTime::now())
}

/// How long the writer thread gathers lines after the first of a burst before it writes
/// them: the bound on how long a line waits, and what turns a burst into one write(2).
pub const GATHER: Duration = Duration::from_millis(1);

/// The handle through which formatted lines reach a writer thread (see [`batch_writer`]).
#[derive(Debug, Clone)]
pub struct BatchWriter {
    tx: SyncSender<Option<Vec<u8>>>,
}

impl Write for &BatchWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx
            .send(Some(buf.to_vec()))
            .map_err(|_| io::Error::other("the log writer thread has stopped"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = &'a BatchWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

/// Stops the writer thread at drop, after it has written every line it was given.
#[derive(Debug)]
pub struct BatchGuard {
    tx: SyncSender<Option<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for BatchGuard {
    fn drop(&mut self) {
        let _ = self.tx.send(None);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts a thread that writes the lines sent to the returned [`BatchWriter`] to `out`.
///
/// Lines are never dropped (a full queue of 64k lines makes the sender wait). When idle,
/// the thread sleeps in `recv`; the first line of a burst wakes it, it waits [`GATHER`],
/// then writes everything queued meanwhile in one buffered write, and goes on while lines
/// keep coming. So under a flood of audit lines the producers rarely have to wake it and
/// it makes about one write(2) per millisecond, and no line waits more than about a
/// millisecond for the ones after it. (Writing as soon as the queue was momentarily empty
/// meant a wake-up and a write(2) every few lines at 60k lines/s.)
pub fn batch_writer<W: Write + Send + 'static>(
    name: &str,
    out: W,
) -> io::Result<(BatchWriter, BatchGuard)> {
    let (tx, rx) = mpsc::sync_channel::<Option<Vec<u8>>>(64 * 1024);
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let mut out = io::BufWriter::with_capacity(64 * 1024, out);
            // Errors writing a log line have nowhere better to go; the line is lost,
            // the next one is tried.
            'idle: while let Ok(Some(line)) = rx.recv() {
                let _ = out.write_all(&line);
                loop {
                    std::thread::sleep(GATHER);
                    let mut taken = 0;
                    loop {
                        match rx.try_recv() {
                            Ok(Some(line)) => {
                                let _ = out.write_all(&line);
                                taken += 1;
                            }
                            Ok(None) | Err(TryRecvError::Disconnected) => break 'idle,
                            Err(TryRecvError::Empty) => break,
                        }
                    }
                    let _ = out.flush();
                    if taken == 0 {
                        continue 'idle;
                    }
                }
            }
            let _ = out.flush();
        })?;
    Ok((
        BatchWriter { tx: tx.clone() },
        BatchGuard {
            tx,
            thread: Some(thread),
        },
    ))
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
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
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
