-- Teams and roles (docs/teams-and-sso.md, issue 19).
-- A team has its own limits, budget and allowed models; a key belongs to at most one
-- team (team_id, NULL: none) and admits a request only when both allow it. A key's
-- role (admin, viewer or member) is what it may do on the admin API.
-- The ledger rows and the rollups carry the team of the key that made them ('' in
-- the rollups: none), so usage reports by team need no join and survive a key moving.
CREATE TABLE teams (
    id text PRIMARY KEY,
    name text NOT NULL UNIQUE,
    rpm integer CHECK (rpm > 0),
    tpm bigint CHECK (tpm > 0),
    max_parallel integer CHECK (max_parallel > 0),
    models jsonb NOT NULL DEFAULT '[]',
    budget numeric CHECK (budget > 0),
    budget_period text NOT NULL DEFAULT 'monthly'
        CHECK (budget_period IN ('daily', 'weekly', 'monthly', 'total')),
    budget_tz text NOT NULL DEFAULT 'UTC',
    metadata jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE api_keys
    ADD COLUMN team_id text REFERENCES teams (id) ON DELETE RESTRICT,
    ADD COLUMN role text NOT NULL DEFAULT 'member'
        CHECK (role IN ('admin', 'viewer', 'member'));
CREATE INDEX api_keys_team ON api_keys (team_id) WHERE team_id IS NOT NULL;

ALTER TABLE usage_records ADD COLUMN team_id text;
ALTER TABLE usage_hourly ADD COLUMN team_id text NOT NULL DEFAULT '';
ALTER TABLE usage_daily ADD COLUMN team_id text NOT NULL DEFAULT '';
CREATE INDEX usage_daily_team ON usage_daily (team_id, starts_at) WHERE team_id <> '';
