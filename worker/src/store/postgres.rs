//! PostgreSQL driver: for several worker hosts sharing one queue.
//!
//! Claims lock candidate rows with `FOR UPDATE SKIP LOCKED` inside a CTE with a `LIMIT`,
//! so concurrent claimers never wait on each other and a claim never updates more rows
//! than it asked for. Heartbeats and completions are batched into one statement each
//! (`unnest` of parallel arrays), which is what lets one worker keep up with its own
//! executors: a statement per task caps PostgreSQL at under a thousand tasks/s on a
//! small host.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use sqlx::{
    migrate::Migrator,
    postgres::{PgListener, PgPool, PgPoolOptions},
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    compare_schema, CancelOutcome, ClaimParams, ClaimedTask, CompleteParams, EnqueueParams,
    HeartbeatParams, Held, Reaped, StateCount, Store, StoreError, TaskRecord,
};

static MIGRATOR: Migrator = sqlx::migrate!("../migrations/postgres");

/// NOTIFY channel that tells workers new tasks were enqueued.
const CHANNEL: &str = "taskgate_tasks";

/// `now` in ms: the injected clock ($1) or the database clock.
const CLOCK: &str = "clock AS (SELECT COALESCE($1::bigint, \
     (extract(epoch FROM clock_timestamp()) * 1000)::bigint) AS now)";

/// The PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects a pool of at most `max_connections`.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        Ok(Self { pool })
    }

    /// The underlying pool (tests use it to inspect rows).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn check_schema(&self) -> Result<(), StoreError> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&self.pool)
            .await?;
        if !exists {
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
        let mut tx = self.pool.begin().await?;
        let mut ids = Vec::with_capacity(p.tasks.len());
        let sql = format!(
            "WITH {CLOCK} INSERT INTO tasks \
             (queue, module, payload, priority, max_attempts, state, available_at, created_at, updated_at) \
             SELECT $2, $3, $4, $5, $6, 'queued', COALESCE($7, clock.now), clock.now, clock.now FROM clock \
             RETURNING id"
        );
        for t in &p.tasks {
            let id: i64 = sqlx::query_scalar(&sql)
                .bind(p.now)
                .bind(&t.queue)
                .bind(&t.module)
                .bind(&t.payload)
                .bind(t.priority)
                .bind(t.max_attempts)
                .bind(t.run_at)
                .fetch_one(&mut *tx)
                .await?;
            ids.push(id);
        }
        // Delivered at commit: a hint that wakes idle workers at once.
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(CHANNEL)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(ids)
    }

    async fn claim(&self, p: ClaimParams) -> Result<Vec<ClaimedTask>, StoreError> {
        if p.limit == 0 || p.queues.is_empty() {
            return Ok(Vec::new());
        }
        // A running task whose lease expired is claimable again (that is how a dead
        // worker's task is recovered), unless its final attempt is used up or it was
        // cancelled: `reap` ends those instead.
        //
        // The planner walks `tasks_claimable` in claim order (skipping locked rows) only
        // when the queue and the clock are scalars; `queue = ANY(…)` or a joined clock
        // makes it read and sort every claimable row, which grows with the backlog. So one
        // queue is compared as a scalar, and several are each walked through the index
        // (a LATERAL per queue, `limit` rows each) and merged. Rows a queue locked beyond
        // the merged `limit` are unlocked when this one-statement transaction ends.
        const CLAIMABLE: &str = "state IN ('queued', 'failed', 'running') \
            AND available_at <= (SELECT now FROM clock) AND NOT cancel_requested \
            AND NOT (state = 'running' AND attempt >= max_attempts)";
        const ORDER: &str = "ORDER BY priority DESC, available_at, id LIMIT $3";
        let picked = if p.queues.len() == 1 {
            format!(
                "SELECT id FROM tasks WHERE queue = ($2::text[])[1] AND {CLAIMABLE} \
                 {ORDER} FOR UPDATE SKIP LOCKED"
            )
        } else {
            format!(
                "SELECT c.id FROM unnest($2::text[]) AS q(name) CROSS JOIN LATERAL ( \
                    SELECT id, priority, available_at FROM tasks \
                    WHERE queue = q.name AND {CLAIMABLE} {ORDER} FOR UPDATE SKIP LOCKED) c \
                 ORDER BY c.priority DESC, c.available_at, c.id LIMIT $3"
            )
        };
        let sql = format!(
            "WITH {CLOCK}, picked AS ({picked}) \
             UPDATE tasks t SET state = 'running', attempt = t.attempt + 1, fence = t.fence + 1, \
                lease_owner = $4, available_at = clock.now + $5, started_at = clock.now, \
                updated_at = clock.now \
             FROM picked, clock WHERE t.id = picked.id \
             RETURNING t.id, t.queue, t.module, t.payload, t.attempt, t.max_attempts, t.fence, t.priority"
        );
        let rows: Vec<ClaimedTask> = sqlx::query_as(&sql)
            .bind(p.now)
            .bind(&p.queues)
            .bind(i64::from(p.limit))
            .bind(&p.owner)
            .bind(p.lease_ttl.as_millis() as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok(super::claim_order(rows))
    }

    async fn heartbeat(&self, p: HeartbeatParams) -> Result<Vec<Held>, StoreError> {
        if p.leases.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, fences): (Vec<i64>, Vec<i64>) = p.leases.iter().map(|l| (l.id, l.fence)).unzip();
        let sql = format!(
            "WITH {CLOCK} UPDATE tasks t SET available_at = clock.now + $2, updated_at = clock.now \
             FROM clock, unnest($3::bigint[], $4::bigint[]) AS h(id, fence) \
             WHERE t.id = h.id AND t.fence = h.fence AND t.state = 'running' \
             RETURNING t.id, t.cancel_requested"
        );
        let rows: Vec<(i64, bool)> = sqlx::query_as(&sql)
            .bind(p.now)
            .bind(p.lease_ttl.as_millis() as i64)
            .bind(&ids)
            .bind(&fences)
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
        let n = p.completions.len();
        let (mut ids, mut fences, mut states, mut errors, mut delays, mut deltas) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for c in &p.completions {
            let row = c.outcome.row();
            ids.push(c.lease.id);
            fences.push(c.lease.fence);
            states.push(row.state);
            errors.push(row.error);
            delays.push(row.delay_ms);
            deltas.push(row.attempt_delta);
        }
        // Only rows still running under the same fence change: a stale completion from a
        // worker whose lease was taken over matches nothing and is reported as rejected.
        let sql = format!(
            "WITH {CLOCK} UPDATE tasks t SET state = c.state, \
                last_error = CASE WHEN c.state = 'succeeded' THEN NULL ELSE COALESCE(c.error, t.last_error) END, \
                available_at = COALESCE(clock.now + c.delay, t.available_at), \
                attempt = t.attempt + c.delta, lease_owner = NULL, updated_at = clock.now, \
                finished_at = CASE WHEN c.state IN ('succeeded', 'dead', 'cancelled') THEN clock.now END \
             FROM clock, unnest($2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::bigint[], $7::int[]) \
                AS c(id, fence, state, error, delay, delta) \
             WHERE t.id = c.id AND t.fence = c.fence AND t.state = 'running' \
             RETURNING t.id"
        );
        let applied: Vec<i64> = sqlx::query_scalar(&sql)
            .bind(p.now)
            .bind(&ids)
            .bind(&fences)
            .bind(&states)
            .bind(&errors)
            .bind(&delays)
            .bind(&deltas)
            .fetch_all(&self.pool)
            .await?;
        Ok(applied)
    }

    async fn reap(&self, now: Option<i64>) -> Result<Vec<Reaped>, StoreError> {
        let sql = format!(
            "WITH {CLOCK} UPDATE tasks SET \
                state = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'dead' END, \
                last_error = CASE WHEN cancel_requested THEN last_error \
                    ELSE 'lease expired on the final attempt (the worker stopped heartbeating)' END, \
                fence = fence + 1, lease_owner = NULL, updated_at = clock.now, finished_at = clock.now \
             FROM clock \
             WHERE state = 'running' AND available_at <= clock.now \
               AND (attempt >= max_attempts OR cancel_requested) \
             RETURNING id, queue, module, state, attempt"
        );
        let rows: Vec<Reaped> = sqlx::query_as(&sql).bind(now).fetch_all(&self.pool).await?;
        Ok(rows)
    }

    async fn get(&self, id: i64) -> Result<Option<TaskRecord>, StoreError> {
        let row: Option<TaskRecord> = sqlx::query_as(
            "SELECT id, queue, module, state, priority, attempt, max_attempts, fence, available_at, \
             lease_owner, cancel_requested, last_error, length(payload)::bigint AS payload_bytes, \
             created_at, updated_at, started_at, finished_at FROM tasks WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    async fn cancel(&self, id: i64, now: Option<i64>) -> Result<CancelOutcome, StoreError> {
        let sql = format!(
            "WITH {CLOCK} UPDATE tasks SET \
                state = CASE WHEN state = 'running' THEN state ELSE 'cancelled' END, \
                cancel_requested = (state = 'running'), \
                fence = CASE WHEN state = 'running' THEN fence ELSE fence + 1 END, \
                finished_at = CASE WHEN state = 'running' THEN finished_at ELSE clock.now END, \
                updated_at = clock.now \
             FROM clock WHERE id = $2 AND state IN ('queued', 'failed', 'running') \
             RETURNING state"
        );
        let state: Option<String> = sqlx::query_scalar(&sql)
            .bind(now)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match state.as_deref() {
            Some("running") => CancelOutcome::CancelRequested,
            Some(_) => CancelOutcome::Cancelled,
            None => {
                let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM tasks WHERE id = $1")
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
        let sql = format!(
            "WITH {CLOCK} SELECT count(*) FROM tasks, clock WHERE queue = ANY($2) AND \
             (state IN ('running', 'failed') OR (state = 'queued' AND available_at <= clock.now))"
        );
        Ok(sqlx::query_scalar(&sql)
            .bind(now)
            .bind(queues)
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

    async fn watch(&self, notify: Arc<Notify>, shutdown: CancellationToken) {
        loop {
            match PgListener::connect_with(&self.pool).await {
                Ok(mut listener) => match listener.listen(CHANNEL).await {
                    Ok(()) => loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            msg = listener.recv() => match msg {
                                Ok(_) => notify.notify_one(),
                                Err(e) => {
                                    tracing::warn!(error = %e, "task notification listener lost its connection; polling until it is back");
                                    break;
                                }
                            }
                        }
                    },
                    Err(e) => tracing::warn!(error = %e, "LISTEN failed; polling only"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the task notification listener; polling only")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }
}
