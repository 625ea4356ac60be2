-- The usage ledger: one row per proxied request (docs/usage-ledger.md). The same
-- columns as the PostgreSQL table, in SQLite types: uid is 32 hex digits, booleans
-- are 0/1, started_at and recorded_at are Unix seconds.
-- Comments here must not contain a semicolon: the runner splits statements on it.
CREATE TABLE usage_records (
    uid TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    key_id TEXT,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    deployment TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    estimated INTEGER NOT NULL,
    status INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    error TEXT,
    started_at REAL NOT NULL,
    duration_ms REAL NOT NULL,
    ttft_ms REAL,
    recorded_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
);

CREATE INDEX usage_records_key_started ON usage_records (key_id, started_at);
CREATE INDEX usage_records_model_started ON usage_records (model, started_at);
CREATE INDEX usage_records_started ON usage_records (started_at);
CREATE INDEX usage_records_request_id ON usage_records (request_id);
