"""The ledger at scale (issue 18), on both backends: rollups that always agree with the
rows, 0005 converting a populated ledger, day partitions made ahead, retention, poison
rows set aside, and budgets' spend read from rollups plus a period's fringe."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import time
from decimal import Decimal
from pathlib import Path

import asyncpg
import msgspec
import orjson
import pytest

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.base import ConfigError
from proxy.config.load import resolve
from proxy.config.upstreams import Deployment, Model
from proxy.db import Db, migrate, migrations
from proxy.errors import DatabaseUnavailable
from proxy.ops.metrics import USAGE_REJECTED
from proxy.usage import report, rollup
from proxy.usage.partitions import DAY, LOCK, name
from proxy.usage.poison import Sifting
from proxy.usage.record import Record
from proxy.usage.retention import prune, upkeep
from proxy.usage.spend import spent
from proxy.usage.spool import Spool
from proxy.usage.store import store_for
from tests.support.env import PYTHON
from tests.support.inproc import MakeProxy
from tests.support.ledger import ledger_config, ledger_rows
from tests.support.wait import until

HOUR = 3600
# A fixed instant: 2026-11-03 00:00 UTC, plus 40 minutes.
T0 = 1_793_664_000 + 2400


def record(n: int, started_at: float, **changes: object) -> Record:
    base = Record(
        uid=f"{n:032x}",
        # Every other one as the proxy makes them (PostgreSQL stores those as NULL).
        request_id=f"req_{n:032x}" if n % 2 else f"client-{n}",
        key_id=f"key_{n % 3}" if n % 7 else None,
        endpoint="chat/completions",
        model=f"m{n % 2}",
        deployment=f"d{n % 2}",
        prompt_tokens=n,
        completion_tokens=2 * n,
        total_tokens=3 * n,
        cached_tokens=n % 4,
        reasoning_tokens=n % 5,
        estimated=n % 6 == 0,
        status=429 if n % 11 == 0 else 200,
        stream=bool(n % 2),
        error="UpstreamTimeout" if n % 13 == 0 else None,
        started_at=started_at,
        duration_ms=float(n * 37 % 9000),
        ttft_ms=None if n % 4 == 0 else float(n * 7 % 4000),
        cost=Decimal(n) * Decimal("0.000000123"),
    )
    return msgspec.structs.replace(base, **changes) if changes else base


def spread(count: int, start: float = T0, step: float = 97.0) -> list[Record]:
    """``count`` records over several hours and days."""
    return [record(n, start + n * step) for n in range(count)]


async def rollups(db: Db, width: int) -> set[tuple[object, ...]]:
    table = rollup.TABLES[width]
    rows = await db.fetch(f"SELECT {', '.join(rollup.COLUMNS)} FROM {table}")
    return {tuple(int(v) if isinstance(v, Decimal) else v for v in row) for row in rows}


async def test_rollups_always_agree_with_the_rows(db: Db) -> None:
    """Batches, a batch written again, a replay of part of one, overlapping batches:
    the rollups are exactly the rollups of the rows there are."""
    records = spread(400, step=613.0)  # about three days
    store = store_for(db)
    await store.write(records[:150])
    await store.write(records[:150])
    await store.write(records[100:300])
    await store.write(records[250:])
    assert len(await ledger_rows(db.config)) == 400
    for width in (HOUR, DAY):
        assert await rollups(db, width) == set(rollup.deltas(records, width))


def test_a_days_rollup_is_its_records_summed_as_one_hour() -> None:
    """The days are added up from the hours (rollup.changes): the same as the hours of
    the same records each moved to the start of its day, team (the last record's) and
    all, with a key that changes team within a day."""
    records = [msgspec.structs.replace(r, team_id=f"t{n // 90}") for n, r in enumerate(spread(400))]
    at_day_start = [
        msgspec.structs.replace(r, started_at=r.started_at // rollup.DAY * rollup.DAY)
        for r in records
    ]
    days = rollup.changes(records)[rollup.DAY]
    assert len(days) < len(rollup.changes(records)[HOUR])
    assert sorted(days) == sorted(rollup.changes(at_day_start)[HOUR])


async def test_poison_rows_are_set_aside_and_the_rest_commits(db: Db, tmp_path: Path) -> None:
    records = spread(40)
    bad = {
        7: msgspec.structs.replace(records[7], model=None),  # NOT NULL
        23: msgspec.structs.replace(records[23], duration_ms=float("inf")),  # no bucket
    }
    if db.is_postgres:
        bad[31] = msgspec.structs.replace(records[31], uid="not-a-uuid")
        bad[35] = msgspec.structs.replace(records[35], status=70000)  # smallint
    batch = [bad.get(i, r) for i, r in enumerate(records)]
    before = USAGE_REJECTED._value.get()
    sifting = Sifting(store_for(db), tmp_path / "spool")
    await sifting.write(batch)
    good = [r for i, r in enumerate(records) if i not in bad]
    assert sorted(row["uid"] for row in await ledger_rows(db.config)) == [r.uid for r in good]
    assert await rollups(db, HOUR) == set(rollup.deltas(good, HOUR))
    lines = [orjson.loads(line) for line in sifting.path.read_bytes().splitlines()]
    assert sorted(line["record"][0] for line in lines) == sorted(r.uid for r in bad.values())
    assert all(line["reason"] for line in lines)
    assert sifting.rejected == len(bad)
    assert USAGE_REJECTED._value.get() - before == len(bad)
    # The spool never replays dead letters: they are not in the spool directory itself.
    assert list((tmp_path / "spool").glob("*.jsonl")) == []


async def test_spend_is_exact_for_periods_on_and_off_the_hour(db: Db) -> None:
    records = spread(300, start=T0 - 2400, step=181.0)  # from midnight, about 15 hours
    await store_for(db).write(records)
    for start, end in (
        (T0 - 2400, None),  # on the hour, no end
        (T0 - 2400 + 1800, T0 + 10 * HOUR + 900),  # half an hour off: both fringes
        (T0 + 120, T0 + 3000),  # inside one hour
        (T0 + 5 * HOUR, T0 + 6 * HOUR),
    ):
        for key in ("key_1", "key_2"):
            expected = sum(
                (
                    r.cost
                    for r in records
                    if r.key_id == key
                    and r.started_at >= start
                    and (end is None or r.started_at < end)
                ),
                Decimal(0),
            )
            assert await spent(db, key, start, end) == expected, (start, end, key)


async def test_sqlite_retention_deletes_in_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("proxy.usage.retention._SQLITE_STEP", _small_step())
    database = cfg.Database(sqlite_path=str(tmp_path / "ledger.db"))
    db = await Db.open(database)
    try:
        old = spread(50, start=T0 - 60 * DAY, step=60.0)
        new = spread(50, start=T0, step=60.0)
        new = [msgspec.structs.replace(r, uid=f"{1000 + i:032x}") for i, r in enumerate(new)]
        await store_for(db).write(old + new)
        settings = cfg.Ledger(retention="40d", rollup_retention="50d")
        assert await prune(db, settings, T0 + DAY, None) == 50 + len(
            rollup.deltas(old, HOUR)
        ) + len(rollup.deltas(old, DAY))
        assert sorted(r["uid"] for r in await ledger_rows(database)) == [r.uid for r in new]
        assert await rollups(db, HOUR) == set(rollup.deltas(new, HOUR))
        assert await rollups(db, DAY) == set(rollup.deltas(new, DAY))
    finally:
        await db.close()


def _small_step() -> str:
    return (
        "DELETE FROM usage_records WHERE rowid IN "
        "(SELECT rowid FROM usage_records WHERE started_at < $1 LIMIT 7)"
    )


async def test_postgres_partitions_ahead_and_retention_drops_whole_days(migrated_pg: str) -> None:
    db = await Db.open(cfg.Database(url=migrated_pg))
    try:
        first = int(T0 // DAY)
        old = spread(30, start=T0 - 45 * DAY, step=3000.0)  # a day and a bit, 45 days ago
        new = [msgspec.structs.replace(r, uid=f"{1000 + i:032x}") for i, r in enumerate(spread(30))]
        store = store_for(db)
        await store.write(old + new)
        tables = {row[0] for row in await db.fetch("SELECT tablename FROM pg_tables")}
        for day in (first, first + 1, first + 2):  # made ahead by the writer
            assert name(day) in tables
        assert name(first - 45) in tables
        assert name(first - 44) in tables
        # Another replica holds the lock: this one leaves the work to it.
        other = await asyncpg.connect(migrated_pg)
        settings = cfg.Ledger(retention="40d")
        try:
            await other.execute("SELECT pg_advisory_lock($1)", LOCK)
            assert await prune(db, settings, T0, store.partitions) == 0
        finally:
            await other.close()
        assert await prune(db, settings, T0, store.partitions) == 2
        tables = {row[0] for row in await db.fetch("SELECT tablename FROM pg_tables")}
        assert name(first - 45) not in tables
        assert name(first) in tables
        assert sorted(r["uid"] for r in await ledger_rows(db.config)) == [r.uid for r in new]
        # Rollups outlive the rows: the report and budgets still see those days.
        assert await rollups(db, DAY) == set(rollup.deltas(old + new, DAY))
    finally:
        await db.close()


async def test_0005_converts_a_populated_ledger_without_losing_a_row(
    unmigrated: cfg.Database, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    database = unmigrated
    shipped = migrations("postgres" if database.is_postgres else "sqlite")
    monkeypatch.setattr("proxy.db.migrations", lambda _: shipped[:4])
    await migrate(database)
    # Rows written by the 0004 schema, over five days, through 0004's own columns.
    records = spread(500, start=T0 - 4 * DAY, step=800.0)
    old_fields = Record.__struct_fields__[:-1]  # team_id came with 0006
    columns = ", ".join(old_fields)
    values = [msgspec.structs.astuple(r)[:-1] for r in records]
    if database.is_postgres:
        conn = await asyncpg.connect(database.url)
        try:
            marks = ", ".join(
                f"to_timestamp(${i})" if c == "started_at" else f"${i}"
                for i, c in enumerate(old_fields, start=1)
            )
            await conn.executemany(
                f"INSERT INTO usage_records ({columns}) VALUES ({marks})", values
            )
        finally:
            await conn.close()
    else:
        with sqlite3.connect(database.sqlite_path) as lite:
            marks = ", ".join("?" * len(old_fields))
            rows = [(*v[:-1], str(v[-1])) for v in values]
            lite.executemany(f"INSERT INTO usage_records ({columns}) VALUES ({marks})", rows)
    monkeypatch.undo()
    # The command operators run, in a process of its own.
    config = tmp_path / "proxy.json"
    config.write_bytes(
        orjson.dumps(
            {"database": {"url": database.url, "sqlite_path": database.sqlite_path},
             "models": [{"name": "a", "deployments": [{"base_url": "http://x"}]}]}
        )
    )  # fmt: skip
    done = await asyncio.to_thread(
        subprocess.run,
        [PYTHON, "-m", "proxy", "migrate", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("applied 0005_ledger_partitions, 0006_teams")
    found = {row["uid"]: row for row in await ledger_rows(database)}
    assert len(found) == len(records)
    for r in records:
        row = found[r.uid]
        expected = msgspec.structs.asdict(r)
        assert row.pop("started_at") == pytest.approx(expected.pop("started_at"), abs=1e-6)
        assert Decimal(row.pop("cost")) == expected.pop("cost")
        assert row == expected
    db = await Db.open(database)
    try:
        for width in (HOUR, DAY):
            assert await rollups(db, width) == set(rollup.deltas(records, width))
        # New batches add to what the migration summed.
        more = [record(n, T0 + n) for n in range(1000, 1010)]
        await store_for(db).write(more)
        assert await rollups(db, DAY) == set(rollup.deltas(records + more, DAY))
    finally:
        await db.close()


def test_retention_settings_are_checked() -> None:
    def config(**usage: str) -> cfg.Config:
        return resolve(
            cfg.Config(
                models=[Model(name="a", deployments=[Deployment(base_url="http://x")])],
                usage=cfg.Ledger(**usage),  # type: ignore[arg-type]
            )
        )

    with pytest.raises(ConfigError, match="at least 32d"):
        config(retention="7d")
    with pytest.raises(ConfigError, match="shorter than retention"):
        config(retention="90d", rollup_retention="60d")
    assert config(retention="90d", rollup_retention="400d").usage.rollup_retention == "400d"


def test_histogram_percentiles_merge_and_interpolate() -> None:
    assert [rollup.bucket(ms) for ms in (0, 5, 5.01, 10)] == [0, 0, 1, 1]
    assert rollup.bucket(10**9) == rollup.BUCKETS - 1
    assert rollup.percentile([0] * rollup.BUCKETS, 0.5) == 0.0
    counts = [0] * rollup.BUCKETS
    counts[rollup.bucket(150)] = 4  # 100 < ms <= 200
    assert rollup.percentile(counts, 0.5) == 150.0
    assert rollup.percentile(counts, 1.0) == 200.0


@pytest.mark.parametrize(
    ("cost", "nanos"),
    [("0", 0), ("0.00105", 1_050_000), ("1.50E-7", 150), ("1E-12", 1),
     ("1.0000000001", 1_000_000_001), ("123456789.123456789123", 123_456_789_123_456_790),
     ("-1E-10", 0)],
)  # fmt: skip
def test_costs_are_rounded_up_to_whole_nano_units(cost: str, nanos: int) -> None:
    assert rollup.nano(Decimal(cost)) == nanos


def test_a_cost_that_is_no_number_is_refused() -> None:
    for bad in ("NaN", "Infinity"):
        with pytest.raises(ArithmeticError if bad == "Infinity" else ValueError):
            rollup.nano(Decimal(bad))


async def test_a_spooled_record_the_database_refuses_is_set_aside_not_replayed_for_ever(
    make_proxy: MakeProxy, upstream: FakeUpstream, migrated_pg: str, tmp_path: Path
) -> None:
    """A spool line whose uid is not a UUID (a damaged or foreign file): before, every
    replay failed on it and spooled it again; now it goes to the dead-letter file and
    the rest of the file is committed and the file finished."""
    spool_dir = tmp_path / "spool"
    good = spread(20, start=time.time() - 60, step=1.0)
    bad = msgspec.structs.replace(good[5], uid="not-a-uuid")
    spool = Spool(spool_dir)
    await spool.append([*good[:5], bad, *good[5:]])
    await spool.close()
    database = cfg.Database(url=migrated_pg)
    proxy = await make_proxy(ledger_config(upstream.url, database, spool_dir))

    async def replayed() -> bool:
        # The file is finished, not kept for another replay. (On a busy machine a
        # replay batch can outlast its deadline and be read again later: writes are
        # idempotent, so wait for the file to go rather than expect it gone at once.)
        finished = not list(spool_dir.glob("*.jsonl"))
        return finished and len(await ledger_rows(database)) == len(good)

    await until(replayed)
    await proxy.runner.cleanup()
    letters = [orjson.loads(line) for f in (spool_dir / "rejected").glob("*.jsonl")
               for line in f.read_bytes().splitlines()]  # fmt: skip
    assert {line["record"][0] for line in letters} == {"not-a-uuid"}
    assert "UUID" in letters[0]["reason"]


async def test_a_day_dropped_behind_a_writers_back_is_made_again(migrated_pg: str) -> None:
    """Another process's retention dropped a partition this writer had made: the batch
    is not refused for it (its rows are fine); the next try makes the day again."""
    db = await Db.open(cfg.Database(url=migrated_pg))
    try:
        store = store_for(db)
        records = spread(10)
        await store.write(records[:5])
        await db.execute(f"DROP TABLE {name(int(T0 // DAY))}")
        with pytest.raises(DatabaseUnavailable):
            await store.write(records[5:])
        await store.write(records[5:])
        assert sorted(r["uid"] for r in await ledger_rows(db.config)) == [
            r.uid for r in records[5:]
        ]
    finally:
        await db.close()


async def test_the_upkeep_task_makes_days_ahead_and_applies_retention(
    migrated_pg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("proxy.usage.retention.EVERY", 0.05)
    db = await Db.open(cfg.Database(url=migrated_pg))
    try:
        store = store_for(db)
        now = time.time()
        old = spread(5, start=now - 50 * DAY)
        await store.write(old)
        assert store.partitions is not None
        task = asyncio.create_task(upkeep(db, cfg.Ledger(retention="40d"), store.partitions))

        async def tended() -> bool:
            tables = {row[0] for row in await db.fetch("SELECT tablename FROM pg_tables")}
            today = int(now // DAY)
            return name(today + 2) in tables and name(int(old[0].started_at // DAY)) not in tables

        try:
            await until(tended)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert await ledger_rows(db.config) == []
    finally:
        await db.close()


async def test_the_report_counts_errors_by_class(database: cfg.Database) -> None:
    now = time.time()
    records = spread(60, start=now - 600, step=5.0)
    db = await Db.open(database)
    try:
        await store_for(db).write(records)
    finally:
        await db.close()
    found = await asyncio.to_thread(report.fetch, database, now - 3600, "outcome")
    expected: dict[str, int] = {}
    for r in records:
        name_ = rollup.outcome(r.status, r.error) or "-"
        expected[name_] = expected.get(name_, 0) + 1
    assert {row.name: row.requests for row in found} == expected
    assert {row.name: row.errors for row in found} == {
        name_: 0 if name_ == "-" else count for name_, count in expected.items()
    }
    assert set(expected) == {"-", "status_429", "UpstreamTimeout"}
