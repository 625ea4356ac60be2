-- Rollups per hour and per day x key x model x deployment x outcome, as in PostgreSQL
-- (see its 0005 and usage/rollup.py), filled here from the rows there are. SQLite
-- keeps its rows table as it is (no partitions: retention deletes in small steps).
-- Costs are summed as REAL here (SQLite has no decimal type): exact for costs below
-- a million units a request. The writer adds exact nano-units from then on.
-- Comments here must not contain a semicolon: the runner splits statements on it.
CREATE TABLE usage_hourly (
    starts_at INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    deployment TEXT NOT NULL,
    outcome TEXT NOT NULL,
    requests INTEGER NOT NULL,
    estimated INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cost INTEGER NOT NULL,
    ms_00 INTEGER NOT NULL, ms_01 INTEGER NOT NULL, ms_02 INTEGER NOT NULL, ms_03 INTEGER NOT NULL, ms_04 INTEGER NOT NULL, ms_05 INTEGER NOT NULL, ms_06 INTEGER NOT NULL, ms_07 INTEGER NOT NULL,
    ms_08 INTEGER NOT NULL, ms_09 INTEGER NOT NULL, ms_10 INTEGER NOT NULL, ms_11 INTEGER NOT NULL, ms_12 INTEGER NOT NULL, ms_13 INTEGER NOT NULL, ms_14 INTEGER NOT NULL, ms_15 INTEGER NOT NULL,
    ttft_00 INTEGER NOT NULL, ttft_01 INTEGER NOT NULL, ttft_02 INTEGER NOT NULL, ttft_03 INTEGER NOT NULL, ttft_04 INTEGER NOT NULL, ttft_05 INTEGER NOT NULL, ttft_06 INTEGER NOT NULL, ttft_07 INTEGER NOT NULL,
    ttft_08 INTEGER NOT NULL, ttft_09 INTEGER NOT NULL, ttft_10 INTEGER NOT NULL, ttft_11 INTEGER NOT NULL, ttft_12 INTEGER NOT NULL, ttft_13 INTEGER NOT NULL, ttft_14 INTEGER NOT NULL, ttft_15 INTEGER NOT NULL,
    PRIMARY KEY (starts_at, key_id, model, deployment, outcome)
);
CREATE INDEX usage_hourly_key ON usage_hourly (key_id, starts_at);

CREATE TABLE usage_daily (
    starts_at INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    deployment TEXT NOT NULL,
    outcome TEXT NOT NULL,
    requests INTEGER NOT NULL,
    estimated INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cost INTEGER NOT NULL,
    ms_00 INTEGER NOT NULL, ms_01 INTEGER NOT NULL, ms_02 INTEGER NOT NULL, ms_03 INTEGER NOT NULL, ms_04 INTEGER NOT NULL, ms_05 INTEGER NOT NULL, ms_06 INTEGER NOT NULL, ms_07 INTEGER NOT NULL,
    ms_08 INTEGER NOT NULL, ms_09 INTEGER NOT NULL, ms_10 INTEGER NOT NULL, ms_11 INTEGER NOT NULL, ms_12 INTEGER NOT NULL, ms_13 INTEGER NOT NULL, ms_14 INTEGER NOT NULL, ms_15 INTEGER NOT NULL,
    ttft_00 INTEGER NOT NULL, ttft_01 INTEGER NOT NULL, ttft_02 INTEGER NOT NULL, ttft_03 INTEGER NOT NULL, ttft_04 INTEGER NOT NULL, ttft_05 INTEGER NOT NULL, ttft_06 INTEGER NOT NULL, ttft_07 INTEGER NOT NULL,
    ttft_08 INTEGER NOT NULL, ttft_09 INTEGER NOT NULL, ttft_10 INTEGER NOT NULL, ttft_11 INTEGER NOT NULL, ttft_12 INTEGER NOT NULL, ttft_13 INTEGER NOT NULL, ttft_14 INTEGER NOT NULL, ttft_15 INTEGER NOT NULL,
    PRIMARY KEY (starts_at, key_id, model, deployment, outcome)
);

INSERT INTO usage_hourly (starts_at, key_id, model, deployment, outcome, requests, estimated, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost, ms_00, ms_01, ms_02, ms_03, ms_04, ms_05, ms_06, ms_07, ms_08, ms_09, ms_10, ms_11, ms_12, ms_13, ms_14, ms_15, ttft_00, ttft_01, ttft_02, ttft_03, ttft_04, ttft_05, ttft_06, ttft_07, ttft_08, ttft_09, ttft_10, ttft_11, ttft_12, ttft_13, ttft_14, ttft_15)
SELECT
    CAST(started_at / 3600 AS INTEGER) * 3600,
    coalesce(key_id, ''),
    model,
    deployment,
    coalesce(nullif(error, ''), CASE WHEN status >= 400 THEN 'status_' || status ELSE '' END),
    count(*),
    sum(estimated),
    sum(prompt_tokens),
    sum(completion_tokens),
    sum(cached_tokens),
    sum(reasoning_tokens),
    sum(CAST(round(CAST(cost AS REAL) * 1000000000) AS INTEGER)),
    count(*) FILTER (WHERE duration_ms <= 5),
    count(*) FILTER (WHERE duration_ms > 5 AND duration_ms <= 10),
    count(*) FILTER (WHERE duration_ms > 10 AND duration_ms <= 20),
    count(*) FILTER (WHERE duration_ms > 20 AND duration_ms <= 50),
    count(*) FILTER (WHERE duration_ms > 50 AND duration_ms <= 100),
    count(*) FILTER (WHERE duration_ms > 100 AND duration_ms <= 200),
    count(*) FILTER (WHERE duration_ms > 200 AND duration_ms <= 500),
    count(*) FILTER (WHERE duration_ms > 500 AND duration_ms <= 1000),
    count(*) FILTER (WHERE duration_ms > 1000 AND duration_ms <= 2000),
    count(*) FILTER (WHERE duration_ms > 2000 AND duration_ms <= 5000),
    count(*) FILTER (WHERE duration_ms > 5000 AND duration_ms <= 10000),
    count(*) FILTER (WHERE duration_ms > 10000 AND duration_ms <= 20000),
    count(*) FILTER (WHERE duration_ms > 20000 AND duration_ms <= 50000),
    count(*) FILTER (WHERE duration_ms > 50000 AND duration_ms <= 100000),
    count(*) FILTER (WHERE duration_ms > 100000 AND duration_ms <= 300000),
    count(*) FILTER (WHERE duration_ms > 300000),
    count(*) FILTER (WHERE ttft_ms <= 5),
    count(*) FILTER (WHERE ttft_ms > 5 AND ttft_ms <= 10),
    count(*) FILTER (WHERE ttft_ms > 10 AND ttft_ms <= 20),
    count(*) FILTER (WHERE ttft_ms > 20 AND ttft_ms <= 50),
    count(*) FILTER (WHERE ttft_ms > 50 AND ttft_ms <= 100),
    count(*) FILTER (WHERE ttft_ms > 100 AND ttft_ms <= 200),
    count(*) FILTER (WHERE ttft_ms > 200 AND ttft_ms <= 500),
    count(*) FILTER (WHERE ttft_ms > 500 AND ttft_ms <= 1000),
    count(*) FILTER (WHERE ttft_ms > 1000 AND ttft_ms <= 2000),
    count(*) FILTER (WHERE ttft_ms > 2000 AND ttft_ms <= 5000),
    count(*) FILTER (WHERE ttft_ms > 5000 AND ttft_ms <= 10000),
    count(*) FILTER (WHERE ttft_ms > 10000 AND ttft_ms <= 20000),
    count(*) FILTER (WHERE ttft_ms > 20000 AND ttft_ms <= 50000),
    count(*) FILTER (WHERE ttft_ms > 50000 AND ttft_ms <= 100000),
    count(*) FILTER (WHERE ttft_ms > 100000 AND ttft_ms <= 300000),
    count(*) FILTER (WHERE ttft_ms > 300000)
FROM usage_records GROUP BY 1, 2, 3, 4, 5;

INSERT INTO usage_daily (starts_at, key_id, model, deployment, outcome, requests, estimated, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost, ms_00, ms_01, ms_02, ms_03, ms_04, ms_05, ms_06, ms_07, ms_08, ms_09, ms_10, ms_11, ms_12, ms_13, ms_14, ms_15, ttft_00, ttft_01, ttft_02, ttft_03, ttft_04, ttft_05, ttft_06, ttft_07, ttft_08, ttft_09, ttft_10, ttft_11, ttft_12, ttft_13, ttft_14, ttft_15)
SELECT starts_at / 86400 * 86400, key_id, model, deployment, outcome,
    sum(requests), sum(estimated), sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens), sum(reasoning_tokens), sum(cost), sum(ms_00), sum(ms_01), sum(ms_02), sum(ms_03), sum(ms_04), sum(ms_05), sum(ms_06), sum(ms_07), sum(ms_08), sum(ms_09), sum(ms_10), sum(ms_11), sum(ms_12), sum(ms_13), sum(ms_14), sum(ms_15), sum(ttft_00), sum(ttft_01), sum(ttft_02), sum(ttft_03), sum(ttft_04), sum(ttft_05), sum(ttft_06), sum(ttft_07), sum(ttft_08), sum(ttft_09), sum(ttft_10), sum(ttft_11), sum(ttft_12), sum(ttft_13), sum(ttft_14), sum(ttft_15)
FROM usage_hourly GROUP BY 1, 2, 3, 4, 5;
