-- Fewer indexes on the usage ledger, as in PostgreSQL (see its 0004 for why):
-- kept (key_id, started_at) for budgets and `keys show`, (started_at) for `proxy usage`.
-- To find a request, bound the search by time so the started_at index applies:
--   WHERE request_id = '...' AND started_at >= unixepoch() - 86400
-- Comments here must not contain a semicolon: the runner splits statements on it.
DROP INDEX IF EXISTS usage_records_model_started;
DROP INDEX IF EXISTS usage_records_request_id;
