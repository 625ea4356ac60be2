-- Budgets and cost (docs/budgets.md).
-- A key's budget is its spending limit per period, in the unit of the configured
-- prices (NULL: no budget). The period starts at local midnight in budget_tz.
ALTER TABLE api_keys
    ADD COLUMN budget numeric CHECK (budget > 0),
    ADD COLUMN budget_period text NOT NULL DEFAULT 'monthly'
        CHECK (budget_period IN ('daily', 'weekly', 'monthly', 'total')),
    ADD COLUMN budget_tz text NOT NULL DEFAULT 'UTC';

-- What each request cost, exact: its token counts at the price of the deployment that
-- served it, rounded up to 10^-9 of the unit. Rows written before this column: 0.
ALTER TABLE usage_records ADD COLUMN cost numeric NOT NULL DEFAULT 0;
