-- API keys (docs/keys-and-limits.md). The same columns as the PostgreSQL table, in
-- SQLite types: models and metadata are JSON text, revoked is 0/1, expires_at,
-- created_at and updated_at are Unix seconds.
-- Comments here must not contain a semicolon: the runner splits statements on it.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    rpm INTEGER CHECK (rpm > 0),
    tpm INTEGER CHECK (tpm > 0),
    max_parallel INTEGER CHECK (max_parallel > 0),
    models TEXT NOT NULL DEFAULT '[]',
    expires_at REAL,
    revoked INTEGER NOT NULL DEFAULT 0,
    metadata TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
