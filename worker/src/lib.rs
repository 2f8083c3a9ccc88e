//! The taskgate worker: claims tasks from PostgreSQL or SQLite under a lease with a
//! fencing token and runs each as a subprocess of an allow-listed module.
//!
//! Data flows one way: [`config`] → [`daemon`] (listeners, signals) → [`runner`]
//! (claim, execute, heartbeat, complete) → [`store`].
//!
//! # Layout
//!
//! - [`cli`]: flags and env vars (clap).
//! - [`config`]: the one typed config built from flags, env and TOML.
//! - [`commands`]: `migrate`, `enqueue`, `status`, `cancel`.
//! - [`daemon`]: `worker run`: start-up checks, signals, wiring.
//! - [`runner`]: the claim/heartbeat/complete loop.
//! - [`executor`]: one subprocess per attempt; [`plan`]: its command and environment.
//! - [`modules`]: module names and the allow-list; [`retry`]: back-off.
//! - [`store`]: the store trait and its PostgreSQL and SQLite drivers.
//! - [`egress`]: the per-module egress allow-list: proxy, policy, network-namespace jail.
//! - [`http`]: `/metrics`, `/healthz`, `/events` on a Unix socket or loopback.
//! - [`metrics`], [`events`]: what the worker reports.
//! - [`privdrop`]: switching from root to the service user.
//! - `spawn` (starting executors without copying the worker) and `sys` (the other OS
//!   calls): the only modules with `unsafe`.
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod cli;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod egress;
pub mod events;
pub mod executor;
pub mod http;
pub mod metrics;
pub mod modules;
pub mod plan;
pub mod privdrop;
pub mod retry;
pub mod runner;
mod spawn;
pub mod store;
mod sys;

/// What a worker command can fail with; each maps to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad flag or argument (exit 64).
    #[error("{0}")]
    Usage(String),
    /// Bad input data, e.g. a malformed JSONL line (exit 65).
    #[error("{0}")]
    Data(String),
    /// The task does not exist (exit 1).
    #[error("{0}")]
    NotFound(String),
    /// The database could not be used (exit 1; 64 when the URL is unusable).
    #[error("{0}")]
    Store(store::StoreError),
    /// Anything else (exit 1).
    #[error("{0}")]
    Failed(String),
}

impl Error {
    fn store(e: store::StoreError) -> Self {
        Error::Store(e)
    }

    /// The process exit code for this error (sysexits.h where one fits).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => taskgate_shared::config::EX_USAGE,
            Error::Store(store::StoreError::UnsupportedUrl { .. }) => {
                taskgate_shared::config::EX_USAGE
            }
            Error::Data(_) => 65,
            Error::NotFound(_) | Error::Store(_) | Error::Failed(_) => 1,
        }
    }
}

/// Runs the parsed command with its configuration.
pub async fn run(cli: &cli::Cli, config: &config::Config) -> Result<(), Error> {
    let mut stdout = std::io::stdout().lock();
    match &cli.command {
        cli::Command::Migrate => commands::migrate(&config.common).await,
        cli::Command::Enqueue(args) => commands::enqueue(&config.common, args, &mut stdout).await,
        cli::Command::Status { id } => commands::status(&config.common, *id, &mut stdout).await,
        cli::Command::Cancel { id } => commands::cancel(&config.common, *id, &mut stdout).await,
        cli::Command::EgressJail { .. } => Err(Error::Failed(
            "internal: egress-jail is handled before start-up".into(),
        )),
        cli::Command::Healthcheck {
            metrics_listen,
            timeout,
        } => {
            drop(stdout);
            healthcheck(&config.common, metrics_listen.as_deref(), timeout).await
        }
        cli::Command::Run(_) => {
            drop(stdout);
            let run = config
                .run
                .as_ref()
                .ok_or_else(|| Error::Failed("internal: run settings missing".into()))?;
            daemon::run(&config.common, run).await
        }
    }
}

async fn healthcheck(
    common: &config::Common,
    flag: Option<&str>,
    timeout: &str,
) -> Result<(), Error> {
    let text = flag
        .or(common.file_metrics_listen.as_deref())
        .ok_or_else(|| {
            Error::Usage(
                "healthcheck needs --metrics-listen (or [listen] metrics in the config file)"
                    .into(),
            )
        })?;
    let addr = taskgate_shared::listen::Addr::parse_local_for("--metrics-listen", text)
        .map_err(|e| Error::Usage(e.to_string()))?;
    let timeout = taskgate_shared::config::parse_duration("--timeout", timeout)
        .map_err(|e| Error::Usage(e.to_string()))?;
    match http::probe(&addr, timeout).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::Failed(format!("{addr}: unhealthy"))),
        Err(e) => Err(Error::Failed(e)),
    }
}
