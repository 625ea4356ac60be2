-- A ledger that stays small at billions of rows (docs/usage-ledger.md, issue 18).
-- 1. usage_records becomes range-partitioned by day (UTC) on started_at: retention
--    drops whole partitions. The writers create partitions ahead of time
--    (usage/partitions.py). The unique key is (started_at, uid): a partitioned table's
--    unique keys must hold the partition column, and a replayed row has the same
--    started_at as the first copy, so it still makes every write idempotent. It also
--    serves time-range queries, so there is no separate (started_at) index.
-- 2. A leaner row: fixed-width columns first, widest first (no alignment padding),
--    smallint status, real (4-byte float) durations, no recorded_at, no request id
--    when the proxy made it, an index on the key alone.
-- 3. Rollups per hour and per day x key x model x deployment x outcome
--    (usage/rollup.py), filled here from the rows there are. Readers use these.
-- Every row is copied: on a large ledger this takes a while and holds a lock on it
-- (the writers spool meanwhile); see docs/usage-ledger.md.
ALTER TABLE usage_records RENAME TO usage_records_0004;
ALTER INDEX usage_records_pkey RENAME TO usage_records_0004_pkey;
ALTER INDEX usage_records_key_started RENAME TO usage_records_0004_key_started;
ALTER INDEX IF EXISTS usage_records_started RENAME TO usage_records_0004_started;

CREATE TABLE usage_records (
    started_at timestamptz NOT NULL,
    prompt_tokens integer NOT NULL,
    completion_tokens integer NOT NULL,
    total_tokens integer NOT NULL,
    cached_tokens integer NOT NULL,
    reasoning_tokens integer NOT NULL,
    duration_ms real NOT NULL,
    -- NULL (no first byte sent) costs nothing but a bit: after the fixed columns
    ttft_ms real,
    status smallint NOT NULL,
    estimated boolean NOT NULL,
    stream boolean NOT NULL,
    uid uuid NOT NULL,
    cost numeric NOT NULL DEFAULT 0,
    -- NULL when the proxy made it (req_ and the uid's 32 hex digits): 37 bytes a row.
    -- Read it as coalesce(request_id, 'req_' || replace(uid::text, '-', '')).
    request_id text,
    key_id text,
    endpoint text NOT NULL,
    model text NOT NULL,
    deployment text NOT NULL,
    error text,
    -- fillfactor 100: rows are never updated and arrive in time order, so pages are
    -- filled whole (the default 90 leaves 10 % of every leaf empty for nothing).
    PRIMARY KEY (started_at, uid) WITH (fillfactor = 100)
) PARTITION BY RANGE (started_at);
-- What one key did in a day: budget rebuilds whose period does not start on the hour
-- read the hour's fringe through it, and audits. On the key alone: B-tree
-- deduplication then stores each key once per leaf page with the row pointers after
-- it (a few bytes a row, where (key_id, started_at) took about 60); the day
-- partition bounds the time.
CREATE INDEX usage_records_key ON usage_records (key_id);

-- A partition for every day that has rows, and today and the next two.
DO $$
DECLARE
    day date;
BEGIN
    FOR day IN
        SELECT DISTINCT (started_at AT TIME ZONE 'UTC')::date FROM usage_records_0004
        UNION
        SELECT (now() AT TIME ZONE 'UTC')::date + i FROM generate_series(0, 2) AS i
    LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF usage_records FOR VALUES FROM (%L) TO (%L)',
            'usage_records_' || to_char(day, 'YYYYMMDD'),
            day::timestamp AT TIME ZONE 'UTC',
            (day + 1)::timestamp AT TIME ZONE 'UTC'
        );
    END LOOP;
END
$$;

INSERT INTO usage_records (
    started_at, prompt_tokens, completion_tokens, total_tokens, cached_tokens,
    reasoning_tokens, duration_ms, ttft_ms, status, estimated, stream, uid, cost,
    request_id, key_id, endpoint, model, deployment, error
)
SELECT
    started_at, prompt_tokens, completion_tokens, total_tokens, cached_tokens,
    reasoning_tokens, duration_ms, ttft_ms, status, estimated, stream, uid, cost,
    nullif(request_id, 'req_' || replace(uid::text, '-', '')),
    key_id, endpoint, model, deployment, error
FROM usage_records_0004;

CREATE TABLE usage_hourly (
    starts_at bigint NOT NULL,
    key_id text NOT NULL,
    model text NOT NULL,
    deployment text NOT NULL,
    outcome text NOT NULL,
    requests bigint NOT NULL,
    estimated bigint NOT NULL,
    prompt_tokens bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    cached_tokens bigint NOT NULL,
    reasoning_tokens bigint NOT NULL,
    cost bigint NOT NULL,
    ms_00 integer NOT NULL, ms_01 integer NOT NULL, ms_02 integer NOT NULL, ms_03 integer NOT NULL, ms_04 integer NOT NULL, ms_05 integer NOT NULL, ms_06 integer NOT NULL, ms_07 integer NOT NULL,
    ms_08 integer NOT NULL, ms_09 integer NOT NULL, ms_10 integer NOT NULL, ms_11 integer NOT NULL, ms_12 integer NOT NULL, ms_13 integer NOT NULL, ms_14 integer NOT NULL, ms_15 integer NOT NULL,
    ttft_00 integer NOT NULL, ttft_01 integer NOT NULL, ttft_02 integer NOT NULL, ttft_03 integer NOT NULL, ttft_04 integer NOT NULL, ttft_05 integer NOT NULL, ttft_06 integer NOT NULL, ttft_07 integer NOT NULL,
    ttft_08 integer NOT NULL, ttft_09 integer NOT NULL, ttft_10 integer NOT NULL, ttft_11 integer NOT NULL, ttft_12 integer NOT NULL, ttft_13 integer NOT NULL, ttft_14 integer NOT NULL, ttft_15 integer NOT NULL,
    PRIMARY KEY (starts_at, key_id, model, deployment, outcome)
);
CREATE INDEX usage_hourly_key ON usage_hourly (key_id, starts_at);

CREATE TABLE usage_daily (
    starts_at bigint NOT NULL,
    key_id text NOT NULL,
    model text NOT NULL,
    deployment text NOT NULL,
    outcome text NOT NULL,
    requests bigint NOT NULL,
    estimated bigint NOT NULL,
    prompt_tokens bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    cached_tokens bigint NOT NULL,
    reasoning_tokens bigint NOT NULL,
    cost bigint NOT NULL,
    ms_00 integer NOT NULL, ms_01 integer NOT NULL, ms_02 integer NOT NULL, ms_03 integer NOT NULL, ms_04 integer NOT NULL, ms_05 integer NOT NULL, ms_06 integer NOT NULL, ms_07 integer NOT NULL,
    ms_08 integer NOT NULL, ms_09 integer NOT NULL, ms_10 integer NOT NULL, ms_11 integer NOT NULL, ms_12 integer NOT NULL, ms_13 integer NOT NULL, ms_14 integer NOT NULL, ms_15 integer NOT NULL,
    ttft_00 integer NOT NULL, ttft_01 integer NOT NULL, ttft_02 integer NOT NULL, ttft_03 integer NOT NULL, ttft_04 integer NOT NULL, ttft_05 integer NOT NULL, ttft_06 integer NOT NULL, ttft_07 integer NOT NULL,
    ttft_08 integer NOT NULL, ttft_09 integer NOT NULL, ttft_10 integer NOT NULL, ttft_11 integer NOT NULL, ttft_12 integer NOT NULL, ttft_13 integer NOT NULL, ttft_14 integer NOT NULL, ttft_15 integer NOT NULL,
    PRIMARY KEY (starts_at, key_id, model, deployment, outcome)
);

INSERT INTO usage_hourly (starts_at, key_id, model, deployment, outcome, requests, estimated, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost, ms_00, ms_01, ms_02, ms_03, ms_04, ms_05, ms_06, ms_07, ms_08, ms_09, ms_10, ms_11, ms_12, ms_13, ms_14, ms_15, ttft_00, ttft_01, ttft_02, ttft_03, ttft_04, ttft_05, ttft_06, ttft_07, ttft_08, ttft_09, ttft_10, ttft_11, ttft_12, ttft_13, ttft_14, ttft_15)
SELECT
    floor(extract(epoch FROM started_at) / 3600)::bigint * 3600,
    coalesce(key_id, ''),
    model,
    deployment,
    coalesce(nullif(error, ''), CASE WHEN status >= 400 THEN 'status_' || status ELSE '' END),
    count(*),
    count(*) FILTER (WHERE estimated),
    sum(prompt_tokens),
    sum(completion_tokens),
    sum(cached_tokens),
    sum(reasoning_tokens),
    sum(ceil(cost * 1000000000))::bigint,
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
FROM usage_records_0004 GROUP BY 1, 2, 3, 4, 5;

INSERT INTO usage_daily (starts_at, key_id, model, deployment, outcome, requests, estimated, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost, ms_00, ms_01, ms_02, ms_03, ms_04, ms_05, ms_06, ms_07, ms_08, ms_09, ms_10, ms_11, ms_12, ms_13, ms_14, ms_15, ttft_00, ttft_01, ttft_02, ttft_03, ttft_04, ttft_05, ttft_06, ttft_07, ttft_08, ttft_09, ttft_10, ttft_11, ttft_12, ttft_13, ttft_14, ttft_15)
SELECT starts_at / 86400 * 86400, key_id, model, deployment, outcome,
    sum(requests), sum(estimated), sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens), sum(reasoning_tokens), sum(cost), sum(ms_00), sum(ms_01), sum(ms_02), sum(ms_03), sum(ms_04), sum(ms_05), sum(ms_06), sum(ms_07), sum(ms_08), sum(ms_09), sum(ms_10), sum(ms_11), sum(ms_12), sum(ms_13), sum(ms_14), sum(ms_15), sum(ttft_00), sum(ttft_01), sum(ttft_02), sum(ttft_03), sum(ttft_04), sum(ttft_05), sum(ttft_06), sum(ttft_07), sum(ttft_08), sum(ttft_09), sum(ttft_10), sum(ttft_11), sum(ttft_12), sum(ttft_13), sum(ttft_14), sum(ttft_15)
FROM usage_hourly GROUP BY 1, 2, 3, 4, 5;

DROP TABLE usage_records_0004;
