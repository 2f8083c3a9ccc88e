//! The task store: one trait, two drivers (PostgreSQL for many hosts, SQLite for one).
//!
//! Every operation takes a params struct with an optional `now` (milliseconds since the
//! epoch) that tests inject; without it PostgreSQL uses the database clock (so hosts with
//! skewed clocks agree on lease expiry) and SQLite the host clock.
//!
//! Fencing: each claim increments a task's `fence`. Heartbeats and completions carry the
//! fence of the claim they belong to and only touch a row that is still `running` with
//! that fence, so a worker whose lease expired and whose task was claimed again — even by
//! itself — changes nothing. Those rejected writes are reported back to the caller, which
//! logs and counts them.

mod postgres;
mod sqlite;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Task states as stored.
pub mod state {
    /// Waiting to be claimed.
    pub const QUEUED: &str = "queued";
    /// Claimed under a lease.
    pub const RUNNING: &str = "running";
    /// Finished with exit status 0.
    pub const SUCCEEDED: &str = "succeeded";
    /// Failed; will be retried at `available_at`.
    pub const FAILED: &str = "failed";
    /// Failed on its last attempt (or was not allowed to run); kept with its last error.
    pub const DEAD: &str = "dead";
    /// Cancelled by an operator.
    pub const CANCELLED: &str = "cancelled";
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names no supported backend.
    #[error("unsupported database URL scheme in {url:?}; use sqlite://PATH or postgres://…")]
    UnsupportedUrl {
        /// The URL with any password removed.
        url: String,
    },
    /// The schema has not been created or is behind this binary.
    #[error("the database schema is not up to date ({detail}); run `worker migrate` first")]
    SchemaBehind {
        /// What is missing.
        detail: String,
    },
    /// The schema is newer than this binary.
    #[error("the database schema has migration {version}, which this worker does not know; upgrade the worker (or point it at the right database)")]
    SchemaNewer {
        /// The unknown migration.
        version: i64,
    },
    /// A migration's recorded checksum differs from this binary's.
    #[error("migration {version} was changed after it was applied; the database and this worker disagree on the schema")]
    SchemaModified {
        /// The migration.
        version: i64,
    },
    /// Applying migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database answered with an error or could not be reached.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// A batch had a bad row.
    #[error("{0}")]
    Invalid(String),
}

/// A task to insert.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// Queue name.
    pub queue: String,
    /// Module (already checked against the allow-list by the caller).
    pub module: String,
    /// Opaque payload bytes; never logged.
    pub payload: Vec<u8>,
    /// Higher runs first.
    pub priority: i32,
    /// Attempts before the task goes `dead`.
    pub max_attempts: i32,
    /// Earliest start (ms since epoch); `None` = now.
    pub run_at: Option<i64>,
}

/// Inserts tasks, all or none.
#[derive(Debug, Clone, Default)]
pub struct EnqueueParams {
    /// The tasks, in order.
    pub tasks: Vec<NewTask>,
    /// Injected clock.
    pub now: Option<i64>,
}

/// Claims up to `limit` tasks.
#[derive(Debug, Clone)]
pub struct ClaimParams {
    /// Queues to take from.
    pub queues: Vec<String>,
    /// At most this many.
    pub limit: u32,
    /// The claiming worker's id (for operators; fencing does not rely on it).
    pub owner: String,
    /// Lease length.
    pub lease_ttl: Duration,
    /// Injected clock.
    pub now: Option<i64>,
}

/// A claimed task, with the fence its writes must carry.
#[derive(Clone, sqlx::FromRow)]
pub struct ClaimedTask {
    /// Task id.
    pub id: i64,
    /// Queue.
    pub queue: String,
    /// Module.
    pub module: String,
    /// Payload; never logged (see the `Debug` impl).
    pub payload: Vec<u8>,
    /// This attempt's number, from 1.
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// Fencing token of this claim.
    pub fence: i64,
    /// Priority (claims come back highest first).
    pub priority: i32,
}

impl std::fmt::Debug for ClaimedTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimedTask")
            .field("id", &self.id)
            .field("queue", &self.queue)
            .field("module", &self.module)
            .field("payload_len", &self.payload.len())
            .field("attempt", &self.attempt)
            .field("fence", &self.fence)
            .finish()
    }
}

impl ClaimedTask {
    /// The lease this claim holds.
    pub fn lease(&self) -> Lease {
        Lease {
            id: self.id,
            fence: self.fence,
        }
    }
}

/// A task id with the fencing token of one claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    /// Task id.
    pub id: i64,
    /// Fencing token.
    pub fence: i64,
}

/// Extends leases.
#[derive(Debug, Clone)]
pub struct HeartbeatParams {
    /// Leases to extend.
    pub leases: Vec<Lease>,
    /// New lease length from now.
    pub lease_ttl: Duration,
    /// Injected clock.
    pub now: Option<i64>,
}

/// A lease still held after a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Task id.
    pub id: i64,
    /// An operator asked to cancel the task.
    pub cancel_requested: bool,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exit status 0.
    Succeeded,
    /// Failed; run again after `delay` (measured on the store's clock).
    Retry {
        /// Redacted, truncated error.
        error: String,
        /// Back-off before the next attempt.
        delay: Duration,
    },
    /// Failed for the last time, or may never run.
    Dead {
        /// Redacted, truncated error.
        error: String,
    },
    /// Stopped because an operator cancelled it.
    Cancelled,
    /// Given back unfinished (worker shutting down): claimable again at once, and the
    /// attempt does not count.
    Released,
}

/// One fenced completion.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The claim this completes.
    pub lease: Lease,
    /// What happened.
    pub outcome: Outcome,
}

/// Writes a batch of completions in one statement.
#[derive(Debug, Clone, Default)]
pub struct CompleteParams {
    /// The completions.
    pub completions: Vec<Completion>,
    /// Injected clock.
    pub now: Option<i64>,
}

/// A running task whose lease expired and that nobody may claim again.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Reaped {
    /// Task id.
    pub id: i64,
    /// Queue.
    pub queue: String,
    /// Module.
    pub module: String,
    /// New state: `dead` (lease expired on the final attempt) or `cancelled`.
    pub state: String,
    /// Attempt number.
    pub attempt: i32,
}

/// What `worker cancel` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelOutcome {
    /// The task was waiting and is now cancelled.
    Cancelled,
    /// The task is running; its worker will stop it at its next heartbeat.
    CancelRequested,
    /// The task had already finished (its state is unchanged).
    AlreadyFinished,
    /// No such task.
    NotFound,
}

/// A task as `worker status` shows it: everything but the payload.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, sqlx::FromRow)]
pub struct TaskRecord {
    /// Task id.
    pub id: i64,
    /// Queue.
    pub queue: String,
    /// Module.
    pub module: String,
    /// State.
    pub state: String,
    /// Priority.
    pub priority: i32,
    /// Attempts made so far.
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// Current fencing token.
    pub fence: i64,
    /// Next claimable time / lease expiry (ms since epoch).
    pub available_at: i64,
    /// Worker holding the lease.
    pub lease_owner: Option<String>,
    /// Cancel requested while running.
    pub cancel_requested: bool,
    /// Last error (redacted, truncated).
    pub last_error: Option<String>,
    /// Payload size in bytes (never the payload).
    pub payload_bytes: i64,
    /// Created (ms since epoch).
    pub created_at: i64,
    /// Last change (ms since epoch).
    pub updated_at: i64,
    /// Last claim (ms since epoch).
    pub started_at: Option<i64>,
    /// Finished (ms since epoch).
    pub finished_at: Option<i64>,
}

/// Number of tasks per queue and state (for the queue-depth gauge).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StateCount {
    /// Queue.
    pub queue: String,
    /// State.
    pub state: String,
    /// How many.
    pub count: i64,
}

/// What both drivers implement. The conformance suite in `worker/tests/store.rs` runs
/// the same behaviour tests against each.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `postgres` or `sqlite`.
    fn backend(&self) -> &'static str;
    /// Applies pending migrations.
    async fn migrate(&self) -> Result<(), StoreError>;
    /// Fails unless the schema is exactly what this binary knows.
    async fn check_schema(&self) -> Result<(), StoreError>;
    /// Inserts tasks in one transaction and returns their ids in order.
    async fn enqueue(&self, p: EnqueueParams) -> Result<Vec<i64>, StoreError>;
    /// Claims up to `limit` claimable tasks (queued/failed and due, or running with an
    /// expired lease), highest priority first, incrementing each one's fence.
    async fn claim(&self, p: ClaimParams) -> Result<Vec<ClaimedTask>, StoreError>;
    /// Extends the leases still held (same fence, still running); returns those.
    async fn heartbeat(&self, p: HeartbeatParams) -> Result<Vec<Held>, StoreError>;
    /// Applies completions whose fence still matches; returns the ids that were applied.
    async fn complete(&self, p: CompleteParams) -> Result<Vec<i64>, StoreError>;
    /// Ends running tasks whose lease expired and that must not run again (final
    /// attempt used, or cancel requested).
    async fn reap(&self, now: Option<i64>) -> Result<Vec<Reaped>, StoreError>;
    /// One task without its payload.
    async fn get(&self, id: i64) -> Result<Option<TaskRecord>, StoreError>;
    /// Cancels a waiting task, or asks the worker running it to stop.
    async fn cancel(&self, id: i64, now: Option<i64>) -> Result<CancelOutcome, StoreError>;
    /// How many tasks in `queues` a drain still has to wait for: running anywhere,
    /// failed and awaiting a retry, or queued and due.
    async fn outstanding(&self, queues: &[String], now: Option<i64>) -> Result<i64, StoreError>;
    /// Task counts by queue and state.
    async fn count_by_state(&self) -> Result<Vec<StateCount>, StoreError>;
    /// A cheap round trip, for health checks.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Wakes `notify` when new tasks may be claimable (PostgreSQL LISTEN/NOTIFY). A hint
    /// only: the claimer also polls. Returns at once where the backend has no such hint.
    async fn watch(&self, notify: Arc<Notify>, shutdown: CancellationToken);
}

/// Opens the store a URL names (`sqlite://…` or `postgres://…`).
pub async fn connect(url: &str, max_connections: u32) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url, max_connections).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::connect(url, max_connections).await?))
    } else {
        Err(StoreError::UnsupportedUrl {
            url: redact_url(url),
        })
    }
}

/// Removes the password from a database URL so it can be shown.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:[REDACTED]{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// The host clock in milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Orders claimed rows as the claim picked them (`UPDATE … RETURNING` does not keep the
/// subquery's order).
fn claim_order(mut tasks: Vec<ClaimedTask>) -> Vec<ClaimedTask> {
    tasks.sort_by_key(|t| (std::cmp::Reverse(t.priority), t.id));
    tasks
}

/// Checks applied migrations against the ones compiled in.
fn compare_schema(
    migrator: &sqlx::migrate::Migrator,
    applied: &[(i64, Vec<u8>)],
) -> Result<(), StoreError> {
    for (version, checksum) in applied {
        match migrator.iter().find(|m| m.version == *version) {
            None => return Err(StoreError::SchemaNewer { version: *version }),
            Some(m) if m.checksum.as_ref() != checksum.as_slice() => {
                return Err(StoreError::SchemaModified { version: *version })
            }
            Some(_) => {}
        }
    }
    let missing: Vec<String> = migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .filter(|m| !applied.iter().any(|(v, _)| *v == m.version))
        .map(|m| m.version.to_string())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(StoreError::SchemaBehind {
            detail: format!("migrations not applied: {}", missing.join(", ")),
        })
    }
}

/// One completion as the batch SQL applies it: the new state, the error to keep, the
/// delay until the task is claimable again (`None` keeps `available_at`), and what to add
/// to `attempt` (a released attempt does not count).
struct CompletionRow<'a> {
    state: &'static str,
    error: Option<&'a str>,
    delay_ms: Option<i64>,
    attempt_delta: i32,
}

impl Outcome {
    fn row(&self) -> CompletionRow<'_> {
        let (state, error, delay_ms, attempt_delta) = match self {
            Outcome::Succeeded => (state::SUCCEEDED, None, None, 0),
            Outcome::Retry { error, delay } => (
                state::FAILED,
                Some(error.as_str()),
                Some(delay.as_millis().min(i64::MAX as u128) as i64),
                0,
            ),
            Outcome::Dead { error } => (state::DEAD, Some(error.as_str()), None, 0),
            Outcome::Cancelled => (state::CANCELLED, None, None, 0),
            Outcome::Released => (state::QUEUED, None, Some(0), -1),
        };
        CompletionRow {
            state,
            error,
            delay_ms,
            attempt_delta,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_password_is_hidden() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/tasks"),
            "postgres://app:[REDACTED]@db:5432/tasks"
        );
        assert_eq!(redact_url("sqlite://taskgate.db"), "sqlite://taskgate.db");
    }
}
