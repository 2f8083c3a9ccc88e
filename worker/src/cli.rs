//! Command-line interface: every flag also readable from an environment variable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[cfg(feature = "prod")]
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (prod build: --payload-mode inline is refused)"
);
#[cfg(not(feature = "prod"))]
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (development build: --payload-mode inline is allowed)"
);

/// taskgate worker: claims tasks under fenced leases and runs them as allow-listed
/// subprocesses.
#[derive(Debug, Parser)]
#[command(name = "worker", version = VERSION, about)]
pub struct Cli {
    /// TOML config file (flags and env override it).
    #[arg(long, global = true, env = "TASKGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Database URL: sqlite://PATH?mode=rwc (default sqlite://taskgate.db?mode=rwc) or postgres://…
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Modules tasks may name: exact names or `prefix.*`, comma-separated.
    #[arg(
        long,
        global = true,
        env = "ALLOWED_TASK_MODULES",
        value_delimiter = ','
    )]
    pub allowed_modules: Option<Vec<String>>,
    /// Log format: json, human or auto (human on a terminal).
    #[arg(long, global = true, env = "TASKGATE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Log filter, e.g. info or debug,sqlx=warn.
    #[arg(long, global = true, env = "TASKGATE_LOG")]
    pub log_level: Option<String>,
    /// Also write daily rolling JSON log files here.
    #[arg(long, global = true, env = "TASKGATE_LOG_DIR")]
    pub log_dir: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply database migrations.
    Migrate,
    /// Add tasks; prints each new task id on its own line.
    Enqueue(EnqueueArgs),
    /// Print a task as one JSON object (never its payload).
    Status {
        /// Task id.
        id: i64,
    },
    /// Cancel a waiting task, or stop a running one.
    Cancel {
        /// Task id.
        id: i64,
    },
    /// Run the worker daemon.
    Run(Box<RunArgs>),
    /// Internal: runs a task inside its private network namespace (egress enforcement).
    #[command(name = "egress-jail", hide = true)]
    EgressJail {
        /// The worker's egress proxy socket.
        #[arg(long)]
        socket: PathBuf,
        /// Port to listen on inside the namespace.
        #[arg(long)]
        port: u16,
        /// The task's command.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Query the worker's /healthz on its local listener; exit 0 when healthy, 1 if not
    /// (for kubelet and systemd exec probes).
    Healthcheck {
        /// The worker's listener (default: [listen] metrics from the config file).
        #[arg(long, env = "TASKGATE_METRICS_LISTEN")]
        metrics_listen: Option<String>,
        /// How long to wait for an answer.
        #[arg(long, default_value = "3s")]
        timeout: String,
    },
}

/// `worker enqueue`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("payload").args(["payload_file", "payload_stdin", "payloads_jsonl"])))]
pub struct EnqueueArgs {
    /// Module to run (must be allowed).
    #[arg(long)]
    pub module: String,
    /// Read the payload from this file.
    #[arg(long)]
    pub payload_file: Option<PathBuf>,
    /// Read the payload from stdin.
    #[arg(long)]
    pub payload_stdin: bool,
    /// One task per line of JSON (`-` for stdin), all in one transaction.
    #[arg(long)]
    pub payloads_jsonl: Option<PathBuf>,
    /// Queue.
    #[arg(long, default_value = "default")]
    pub queue: String,
    /// Priority; higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Attempts before the task is dead.
    #[arg(long, default_value_t = 5)]
    pub max_attempts: i32,
    /// Do not start before this time (RFC 3339).
    #[arg(long, conflicts_with = "delay")]
    pub run_at: Option<String>,
    /// Do not start before this much time has passed (e.g. 30s, 10m).
    #[arg(long)]
    pub delay: Option<String>,
}

/// `worker run`.
#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// Queue to take tasks from (repeatable).
    #[arg(long = "queue", env = "TASKGATE_QUEUES", value_delimiter = ',')]
    pub queues: Vec<String>,
    /// Executors running at once.
    #[arg(long, env = "TASKGATE_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Lease length (e.g. 30s); renewed every third of it.
    #[arg(long, env = "TASKGATE_LEASE_TTL")]
    pub lease_ttl: Option<String>,
    /// Process until no task is left, then exit 0.
    #[arg(long)]
    pub drain: bool,
    /// Where to serve /metrics, /healthz, /events: unix:/path or 127.0.0.1:PORT / [::1]:PORT.
    #[arg(long, env = "TASKGATE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Mode of the Unix socket (octal, default 0660).
    #[arg(long, env = "TASKGATE_SOCKET_MODE")]
    pub socket_mode: Option<String>,
    /// Group of the Unix socket.
    #[arg(long, env = "TASKGATE_SOCKET_GROUP")]
    pub socket_group: Option<String>,
    /// Drop to this user after binding.
    #[arg(long, env = "TASKGATE_USER")]
    pub user: Option<String>,
    /// Drop to this group after binding (default: the user's).
    #[arg(long, env = "TASKGATE_GROUP")]
    pub group: Option<String>,
    /// Allow running tasks as root (not recommended).
    #[arg(long, env = "TASKGATE_ALLOW_ROOT")]
    pub allow_root: bool,
    /// How the payload reaches the executor: stdin, file or inline.
    #[arg(long, env = "PAYLOAD_MODE")]
    pub payload_mode: Option<String>,
    /// Executor command template (default `python3 -m {module}`).
    #[arg(long, env = "TASKGATE_MODULE_RUNNER")]
    pub module_runner: Option<String>,
    /// Attempt timeout (e.g. 15m).
    #[arg(long, env = "TASKGATE_TASK_TIMEOUT")]
    pub task_timeout: Option<String>,
    /// Extra environment variable names passed to executors (repeatable).
    #[arg(long = "env-allow", env = "TASKGATE_ENV_ALLOW", value_delimiter = ',')]
    pub env_allow: Vec<String>,
    /// Idle poll interval (e.g. 1s).
    #[arg(long, env = "TASKGATE_POLL_INTERVAL")]
    pub poll_interval: Option<String>,
    /// Time running tasks get to finish on shutdown (e.g. 30s).
    #[arg(long, env = "TASKGATE_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<String>,
    /// Time between SIGTERM and SIGKILL when stopping an executor (e.g. 10s).
    #[arg(long, env = "TASKGATE_KILL_GRACE")]
    pub kill_grace: Option<String>,
    /// First retry delay ceiling (e.g. 1s); doubles per attempt.
    #[arg(long, env = "TASKGATE_RETRY_BACKOFF")]
    pub retry_backoff: Option<String>,
    /// Largest retry delay (e.g. 1h).
    #[arg(long, env = "TASKGATE_RETRY_BACKOFF_MAX")]
    pub retry_backoff_max: Option<String>,
    /// Egress policy mode, overriding `[egress] mode`: enforce, report or off.
    #[arg(long, env = "TASKGATE_EGRESS_MODE")]
    pub egress_mode: Option<String>,
    /// Start in enforce mode even where executors cannot be given their own network
    /// namespace (egress is then advisory: proxy environment only).
    #[arg(long, env = "TASKGATE_EGRESS_ADVISORY_OK")]
    pub egress_advisory_ok: bool,
    /// Directory for the worker's private payload files (default: the system temp dir).
    #[arg(long, env = "TASKGATE_PAYLOAD_DIR")]
    pub payload_dir: Option<PathBuf>,
}
