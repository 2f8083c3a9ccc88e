-- taskgate task table (PostgreSQL). Times are milliseconds since the Unix epoch, taken
-- from the database clock unless a test injects one, so hosts with skewed clocks agree
-- on when a lease expires.
CREATE TABLE tasks (
    id               BIGSERIAL PRIMARY KEY,
    queue            TEXT    NOT NULL,
    module           TEXT    NOT NULL,
    payload          BYTEA   NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    state            TEXT    NOT NULL
        CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'dead', 'cancelled')),
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL CHECK (max_attempts >= 1),
    -- Fencing token: incremented by every claim; every write for a claim names it.
    fence            BIGINT  NOT NULL DEFAULT 0,
    -- When the task can next be claimed: its scheduled time while queued/failed, its
    -- lease expiry while running.
    available_at     BIGINT  NOT NULL,
    lease_owner      TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    last_error       TEXT,
    created_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT
);

-- Claims scan only claimable rows, in claim order.
CREATE INDEX tasks_claimable ON tasks (queue, priority DESC, available_at, id)
    WHERE state IN ('queued', 'failed', 'running');
