//! SQLite driver: the embedded default for one host (`sqlite://taskgate.db?mode=rwc`).
//!
//! WAL mode lets readers run beside the one writer, and a busy timeout makes several
//! worker processes on the same file queue for the write lock instead of failing. A
//! claim is one `UPDATE … WHERE id IN (SELECT … LIMIT n) RETURNING`: a writing statement
//! takes the write lock before it reads, so two processes can never claim the same row.
//! Batches (heartbeats, completions) are passed as one JSON array and joined with
//! `json_each`, one statement per batch.

use std::{str::FromStr, sync::Arc, time::Duration};

use async_trait::async_trait;
use serde_json::json;
use sqlx::{
    migrate::Migrator,
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
    },
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    compare_schema, now_ms, CancelOutcome, ClaimParams, ClaimedTask, CompleteParams, EnqueueParams,
    HeartbeatParams, Held, Reaped, StateCount, Store, StoreError, TaskRecord,
};

static MIGRATOR: Migrator = sqlx::migrate!("../migrations/sqlite");

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (and with `mode=rwc`, creates) the database file.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::from_str(url)?
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.clamp(1, 8))
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await?;
        Ok(Self { pool })
    }

    /// The underlying pool (tests use it to inspect rows).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn check_schema(&self) -> Result<(), StoreError> {
        let exists: Option<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_optional(&self.pool)
        .await?;
        if exists.is_none() {
            return Err(StoreError::SchemaBehind {
                detail: "no migrations applied".into(),
            });
        }
        let applied: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT version, checksum FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await?;
        compare_schema(&MIGRATOR, &applied)
    }

    async fn enqueue(&self, p: EnqueueParams) -> Result<Vec<i64>, StoreError> {
        let now = p.now.unwrap_or_else(now_ms);
        let mut tx = self.pool.begin().await?;
        let mut ids = Vec::with_capacity(p.tasks.len());
        for t in &p.tasks {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO tasks (queue, module, payload, priority, max_attempts, state, \
                 available_at, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6, ?7, ?7) RETURNING id",
            )
            .bind(&t.queue)
            .bind(&t.module)
            .bind(&t.payload)
            .bind(t.priority)
            .bind(t.max_attempts)
            .bind(t.run_at.unwrap_or(now))
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            ids.push(id);
        }
        tx.commit().await?;
        Ok(ids)
    }

    async fn claim(&self, p: ClaimParams) -> Result<Vec<ClaimedTask>, StoreError> {
        if p.limit == 0 || p.queues.is_empty() {
            return Ok(Vec::new());
        }
        let now = p.now.unwrap_or_else(now_ms);
        let queues =
            serde_json::to_string(&p.queues).map_err(|e| StoreError::Invalid(e.to_string()))?;
        // Same rules as the PostgreSQL claim; see there. One queue is compared as a scalar
        // so SQLite walks `tasks_claimable` in order instead of sorting every due row;
        // several are each walked that way (`limit` rows per queue) and merged.
        const CLAIMABLE: &str = "state IN ('queued', 'failed', 'running') \
            AND available_at <= ?2 AND NOT cancel_requested \
            AND NOT (state = 'running' AND attempt >= max_attempts)";
        const ORDER: &str = "ORDER BY priority DESC, available_at, id LIMIT ?5";
        let picked = (0..p.queues.len())
            .map(|i| {
                format!(
                    "SELECT * FROM (SELECT id, priority, available_at FROM tasks \
                     WHERE queue = ?4 ->> '$[{i}]' AND {CLAIMABLE} {ORDER})"
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let sql = format!(
            "UPDATE tasks SET state = 'running', attempt = attempt + 1, fence = fence + 1, \
                lease_owner = ?1, available_at = ?2 + ?3, started_at = ?2, updated_at = ?2 \
             WHERE id IN (SELECT id FROM ({picked}) {ORDER}) \
             RETURNING id, queue, module, payload, attempt, max_attempts, fence, priority"
        );
        let rows: Vec<ClaimedTask> = sqlx::query_as(&sql)
            .bind(&p.owner)
            .bind(now)
            .bind(p.lease_ttl.as_millis() as i64)
            .bind(queues)
            .bind(i64::from(p.limit))
            .fetch_all(&self.pool)
            .await?;
        Ok(super::claim_order(rows))
    }

    async fn heartbeat(&self, p: HeartbeatParams) -> Result<Vec<Held>, StoreError> {
        if p.leases.is_empty() {
            return Ok(Vec::new());
        }
        let now = p.now.unwrap_or_else(now_ms);
        let batch: Vec<_> = p
            .leases
            .iter()
            .map(|l| json!({"id": l.id, "fence": l.fence}))
            .collect();
        let rows: Vec<(i64, bool)> = sqlx::query_as(
            "UPDATE tasks SET available_at = ?1 + ?2, updated_at = ?1 \
             FROM (SELECT value ->> '$.id' AS id, value ->> '$.fence' AS fence FROM json_each(?3)) AS h \
             WHERE tasks.id = h.id AND tasks.fence = h.fence AND tasks.state = 'running' \
             RETURNING tasks.id, tasks.cancel_requested",
        )
        .bind(now)
        .bind(p.lease_ttl.as_millis() as i64)
        .bind(serde_json::Value::from(batch).to_string())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, cancel_requested)| Held {
                id,
                cancel_requested,
            })
            .collect())
    }

    async fn complete(&self, p: CompleteParams) -> Result<Vec<i64>, StoreError> {
        if p.completions.is_empty() {
            return Ok(Vec::new());
        }
        let now = p.now.unwrap_or_else(now_ms);
        let batch: Vec<_> = p
            .completions
            .iter()
            .map(|c| {
                let row = c.outcome.row();
                json!({
                    "id": c.lease.id,
                    "fence": c.lease.fence,
                    "state": row.state,
                    "error": row.error,
                    "delay": row.delay_ms,
                    "delta": row.attempt_delta,
                })
            })
            .collect();
        let applied: Vec<i64> = sqlx::query_scalar(
            "UPDATE tasks SET state = c.state, \
                last_error = CASE WHEN c.state = 'succeeded' THEN NULL ELSE COALESCE(c.error, tasks.last_error) END, \
                available_at = CASE WHEN c.delay IS NULL THEN tasks.available_at ELSE ?1 + c.delay END, \
                attempt = tasks.attempt + c.delta, lease_owner = NULL, updated_at = ?1, \
                finished_at = CASE WHEN c.state IN ('succeeded', 'dead', 'cancelled') THEN ?1 END \
             FROM (SELECT value ->> '$.id' AS id, value ->> '$.fence' AS fence, \
                          value ->> '$.state' AS state, value ->> '$.error' AS error, \
                          value ->> '$.delay' AS delay, value ->> '$.delta' AS delta \
                   FROM json_each(?2)) AS c \
             WHERE tasks.id = c.id AND tasks.fence = c.fence AND tasks.state = 'running' \
             RETURNING tasks.id",
        )
        .bind(now)
        .bind(serde_json::Value::from(batch).to_string())
        .fetch_all(&self.pool)
        .await?;
        Ok(applied)
    }

    async fn reap(&self, now: Option<i64>) -> Result<Vec<Reaped>, StoreError> {
        let now = now.unwrap_or_else(now_ms);
        let rows: Vec<Reaped> = sqlx::query_as(
            "UPDATE tasks SET \
                state = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'dead' END, \
                last_error = CASE WHEN cancel_requested THEN last_error \
                    ELSE 'lease expired on the final attempt (the worker stopped heartbeating)' END, \
                fence = fence + 1, lease_owner = NULL, updated_at = ?1, finished_at = ?1 \
             WHERE state = 'running' AND available_at <= ?1 \
               AND (attempt >= max_attempts OR cancel_requested) \
             RETURNING id, queue, module, state, attempt",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    async fn get(&self, id: i64) -> Result<Option<TaskRecord>, StoreError> {
        let row: Option<TaskRecord> = sqlx::query_as(
            "SELECT id, queue, module, state, priority, attempt, max_attempts, fence, available_at, \
             lease_owner, cancel_requested, last_error, length(payload) AS payload_bytes, \
             created_at, updated_at, started_at, finished_at FROM tasks WHERE id = ?1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    async fn cancel(&self, id: i64, now: Option<i64>) -> Result<CancelOutcome, StoreError> {
        let now = now.unwrap_or_else(now_ms);
        let state: Option<String> = sqlx::query_scalar(
            "UPDATE tasks SET \
                state = CASE WHEN state = 'running' THEN state ELSE 'cancelled' END, \
                cancel_requested = (state = 'running'), \
                fence = CASE WHEN state = 'running' THEN fence ELSE fence + 1 END, \
                finished_at = CASE WHEN state = 'running' THEN finished_at ELSE ?1 END, \
                updated_at = ?1 \
             WHERE id = ?2 AND state IN ('queued', 'failed', 'running') RETURNING state",
        )
        .bind(now)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match state.as_deref() {
            Some("running") => CancelOutcome::CancelRequested,
            Some(_) => CancelOutcome::Cancelled,
            None => {
                let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM tasks WHERE id = ?1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
                if exists.is_some() {
                    CancelOutcome::AlreadyFinished
                } else {
                    CancelOutcome::NotFound
                }
            }
        })
    }

    async fn outstanding(&self, queues: &[String], now: Option<i64>) -> Result<i64, StoreError> {
        let queues =
            serde_json::to_string(queues).map_err(|e| StoreError::Invalid(e.to_string()))?;
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM tasks WHERE queue IN (SELECT value FROM json_each(?1)) AND \
             (state IN ('running', 'failed') OR (state = 'queued' AND available_at <= ?2))",
        )
        .bind(queues)
        .bind(now.unwrap_or_else(now_ms))
        .fetch_one(&self.pool)
        .await?)
    }

    async fn count_by_state(&self) -> Result<Vec<StateCount>, StoreError> {
        let rows: Vec<StateCount> = sqlx::query_as(
            "SELECT queue, state, count(*) AS count FROM tasks GROUP BY queue, state",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn watch(&self, _notify: Arc<Notify>, _shutdown: CancellationToken) {
        // SQLite has no notification channel across processes; the claimer polls.
    }
}
