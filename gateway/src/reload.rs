//! Hot reload of the certificate, key, client CA and token file, on SIGHUP and when the
//! files change, without dropping connections (everything is swapped through
//! [`ArcSwap`]s that handshakes and requests read).
//!
//! Changes are found by polling each file's metadata (modification time, size, inode)
//! every `--reload-poll`. Polling, rather than inotify, also sees Kubernetes' secret
//! updates, which swap a symlink in the parent directory, and costs a handful of `stat`
//! calls per interval. A reload that fails keeps the old material and logs why; the next
//! change (or SIGHUP) tries again.
//!
//! The same background service tells systemd the gateway is ready (the listener is bound
//! and privileges are dropped before pingora starts any service) and feeds its watchdog.

use std::{
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::{server::ShutdownWatch, services::background::BackgroundService};
use taskgate_shared::tokens::TokenSet;
use tokio::signal::unix::{signal, SignalKind};

use crate::{metrics::Metrics, tls::TlsMaterial};

/// What the reloader looks after.
pub struct Reloader {
    /// TLS material, when TLS is on.
    pub tls: Option<Arc<TlsMaterial>>,
    /// The token file and the set it feeds, when tokens come from a file.
    pub token_file: Option<(PathBuf, Arc<ArcSwap<TokenSet>>)>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Poll interval.
    pub poll: Duration,
}

type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &PathBuf) -> Stamp {
    std::fs::metadata(path).ok().map(|m| {
        (
            m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            m.len(),
            m.ino(),
        )
    })
}

impl Reloader {
    fn files(&self) -> Vec<PathBuf> {
        let mut v = self.tls.as_ref().map(|t| t.files()).unwrap_or_default();
        v.extend(self.token_file.as_ref().map(|(p, _)| p.clone()));
        v
    }

    fn stamps(&self, files: &[PathBuf]) -> Vec<Stamp> {
        files.iter().map(stamp).collect()
    }

    /// Reloads everything once; `why` goes into the log lines.
    pub fn reload(&self, why: &str) {
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => {
                    self.metrics.reloads_ok.inc();
                    tracing::info!(trigger = why, "reloaded TLS certificate, key and client CA");
                }
                Err(e) => {
                    self.metrics.reloads_failed.inc();
                    tracing::error!(trigger = why, error = %e, "TLS reload failed; keeping the previous certificate, key and client CA");
                }
            }
        }
        if let Some((path, set)) = &self.token_file {
            match TokenSet::load_file("--auth-token-file", path) {
                Ok(tokens) => {
                    let n = tokens.len();
                    set.store(Arc::new(tokens));
                    self.metrics.reloads_ok.inc();
                    tracing::info!(trigger = why, tokens = n, "reloaded the token file");
                }
                Err(e) => {
                    self.metrics.reloads_failed.inc();
                    tracing::error!(trigger = why, error = %e, "token reload failed; keeping the previous tokens");
                }
            }
        }
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // First of all: SIGHUP's default action ends the process, so the handler must be
        // in place before anything else here can wait.
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload only on file change");
                None
            }
        };
        let files = self.files();
        let mut seen = self.stamps(&files);
        // Type=notify: the listener was bound and privileges dropped before pingora
        // started this service. Both calls are no-ops outside systemd.
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        let mut usec = 0;
        let watchdog = sd_notify::watchdog_enabled(false, &mut usec) && usec > 0;
        let mut dog = tokio::time::interval(Duration::from_micros(usec.max(2_000_000) / 2));
        let mut tick = tokio::time::interval(self.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    self.reload("SIGHUP");
                    seen = self.stamps(&files);
                }
                _ = tick.tick() => {
                    let now = self.stamps(&files);
                    if now != seen {
                        seen = now;
                        self.reload("file change");
                    }
                }
                _ = dog.tick(), if watchdog => {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                }
                _ = shutdown.changed() => break,
            }
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    }
}
