-- taskgate task table (SQLite). Times are milliseconds since the Unix epoch.
CREATE TABLE tasks (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    queue            TEXT    NOT NULL,
    module           TEXT    NOT NULL,
    payload          BLOB    NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    state            TEXT    NOT NULL
        CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'dead', 'cancelled')),
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL CHECK (max_attempts >= 1),
    -- Fencing token: incremented by every claim; every write for a claim names it.
    fence            INTEGER NOT NULL DEFAULT 0,
    -- When the task can next be claimed: its scheduled time while queued/failed, its
    -- lease expiry while running.
    available_at     INTEGER NOT NULL,
    lease_owner      TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER
);

CREATE INDEX tasks_claimable ON tasks (queue, priority DESC, available_at, id)
    WHERE state IN ('queued', 'failed', 'running');
