-- Budgets and cost (docs/budgets.md). The same columns as in PostgreSQL, in SQLite
-- types: budget and cost are TEXT holding the exact decimal (SQLite has no decimal
-- type, and REAL would drift), summed in Python with decimal.Decimal.
-- Comments here must not contain a semicolon: the runner splits statements on it.
ALTER TABLE api_keys ADD COLUMN budget TEXT;
ALTER TABLE api_keys ADD COLUMN budget_period TEXT NOT NULL DEFAULT 'monthly'
    CHECK (budget_period IN ('daily', 'weekly', 'monthly', 'total'));
ALTER TABLE api_keys ADD COLUMN budget_tz TEXT NOT NULL DEFAULT 'UTC';
ALTER TABLE usage_records ADD COLUMN cost TEXT NOT NULL DEFAULT '0';
