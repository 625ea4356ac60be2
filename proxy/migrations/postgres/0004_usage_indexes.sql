-- Fewer indexes on the usage ledger: every index is written on every insert, and these
-- two served no query the proxy runs. Kept: (key_id, started_at) for budgets and
-- `keys show` (what a key spent in a period) and (started_at) for `proxy usage`
-- (every group of the report filters on started_at only).
-- (model, started_at): no query filters on model.
-- (request_id): no query either, and client-chosen ids are random, so each insert
-- dirtied a random page of it. To find a request, bound the search by time so that
-- the started_at index applies:
--   WHERE request_id = '...' AND started_at >= now() - interval '1 day'
DROP INDEX IF EXISTS usage_records_model_started;
DROP INDEX IF EXISTS usage_records_request_id;
