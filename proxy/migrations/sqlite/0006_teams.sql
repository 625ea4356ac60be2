-- Teams and roles, as in PostgreSQL (see its 0006). models and metadata are JSON
-- text, created_at and updated_at Unix seconds.
-- Comments here must not contain a semicolon: the runner splits statements on it.
CREATE TABLE teams (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    rpm INTEGER CHECK (rpm > 0),
    tpm INTEGER CHECK (tpm > 0),
    max_parallel INTEGER CHECK (max_parallel > 0),
    models TEXT NOT NULL DEFAULT '[]',
    budget TEXT,
    budget_period TEXT NOT NULL DEFAULT 'monthly'
        CHECK (budget_period IN ('daily', 'weekly', 'monthly', 'total')),
    budget_tz TEXT NOT NULL DEFAULT 'UTC',
    metadata TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);

ALTER TABLE api_keys ADD COLUMN team_id TEXT REFERENCES teams (id);
ALTER TABLE api_keys ADD COLUMN role TEXT NOT NULL DEFAULT 'member'
    CHECK (role IN ('admin', 'viewer', 'member'));
CREATE INDEX api_keys_team ON api_keys (team_id) WHERE team_id IS NOT NULL;

ALTER TABLE usage_records ADD COLUMN team_id TEXT;
ALTER TABLE usage_hourly ADD COLUMN team_id TEXT NOT NULL DEFAULT '';
ALTER TABLE usage_daily ADD COLUMN team_id TEXT NOT NULL DEFAULT '';
CREATE INDEX usage_daily_team ON usage_daily (team_id, starts_at) WHERE team_id <> '';
