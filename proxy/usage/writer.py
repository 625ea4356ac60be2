"""The usage writer: a bounded in-memory queue, a background flusher, a spool.

The request path calls ``record`` (a ``Sink``): it appends one row to ``pending`` and
returns; it never awaits. Two tasks drain ``pending``:

- the flusher commits one batch at a time: as soon as a batch is full (rows or bytes)
  or every ``flush_interval``. While the database is failing it spools each batch
  instead (so no record waits in memory longer than ``flush_interval``) and tries the
  database again after a jittered exponential backoff. When the database answers, it
  replays the spool files (its own and any a dead process left), interleaved with
  live batches, and once more at close when memory is empty (within the shutdown
  deadline), so a SIGTERM after a slow spell leaves no spool behind;
- the spiller moves the oldest records to the spool whenever ``pending`` passes the
  high-water mark (the database is up but slower than the traffic).

Invariants (the ledger's promise: nothing lost, nothing doubled):
- A record leaves memory only once it is committed or fsynced in a spool file.
  Whoever takes records out of ``pending`` owns them until then, and puts them back
  at the front when neither happened (failure, cancellation).
- Every write is idempotent on the record's ``uid``: a batch retried, spooled after a
  commit whose acknowledgement was lost, or replayed twice lands exactly once.
- ``dropped`` counts only records still in memory when ``close`` gave up (database and
  disk both failing past the shutdown timeout) and spool lines that did not decode.
- Loss window: a SIGKILL loses the records in ``pending`` and in flight, i.e. at most
  ``flush_interval`` of traffic plus one batch's deadline (docs/usage-ledger.md): a
  batch not committed ``flush_interval`` after it was taken is spooled, even when the
  database hangs. Its write goes on in the background (the *straggler*, bounded by
  ``database.timeout``, after which the store terminates its connection); while it
  runs nothing else is sent to the database and its outcome says whether the database
  is up (a commit after the spool is harmless: writes are idempotent).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import deque

from ..config.schema import Ledger
from ..errors import DatabaseUnavailable
from ..exchange import Exchange
from ..ops.metrics import USAGE_DROPPED, USAGE_QUEUE_DEPTH, USAGE_SPOOLED, USAGE_WRITTEN
from .record import Record
from .row import record_of, size
from .spool import Claimed, Spool
from .store import Store

log = logging.getLogger("proxy.usage")

BACKOFF_BASE = 0.5  # seconds before the first retry of a failed database
BACKOFF_MAX = 30.0
RESCAN = 30.0  # seconds between looks for spool files that other processes left
SPOOL_GRACE = 5.0  # what close() allows for spooling, after shutdown_timeout
PAUSE = 1.0  # after a spool (disk) failure, before trying again


def failure_backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` consecutive failures: exponential, capped,
    with jitter so that workers and replicas do not retry in step."""
    ceiling = min(BACKOFF_MAX, BACKOFF_BASE * 2.0 ** min(failures - 1, 16))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class Writer:
    """The worker's usage ledger writer (a ``Sink``); see the module docstring."""

    def __init__(self, settings: Ledger, store: Store, spool: Spool) -> None:
        self.settings = settings
        self.store = store
        self.spool = spool
        self.pending: deque[Record] = deque()
        self.pending_bytes = 0
        # Totals since start, also exported as metrics.
        self.written = 0
        self.spooled = 0
        self.dropped = 0
        self._rows = settings.batch_rows
        self._bytes = settings.batch_bytes
        self._high_water = settings.high_water
        self._full = asyncio.Event()  # a batch is full, or close() was called
        self._over = asyncio.Event()  # pending passed high_water, or close() was called
        self._closing = False
        self._deadline = math.inf  # loop time after which close() stops trying the database
        self._retry_at = 0.0  # loop time before which the database is not tried
        self._failures = 0
        self._replay_at = 0.0  # loop time of the next replay pass (0: as soon as possible)
        self._flushed_at = 0.0
        self._spilling = False
        self._tasks: list[asyncio.Task[None]] = []
        self._straggler: asyncio.Future[None] | None = None  # a write past its deadline

    # -- the request path -------------------------------------------------------------

    def record(self, exchange: Exchange) -> None:
        """Queue the exchange's ledger row. Never blocks, never awaits."""
        row = record_of(exchange)
        pending = self.pending
        pending.append(row)
        self.pending_bytes += size(row)
        if len(pending) >= self._rows or self.pending_bytes >= self._bytes:
            self._full.set()
        if len(pending) > self._high_water:
            self._over.set()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="usage-flusher"),
            asyncio.create_task(self._spill_loop(), name="usage-spiller"),
        ]

    async def close(self) -> None:
        """Commit what is queued within ``shutdown_timeout``, spool the rest, stop."""
        self._closing = True
        self._deadline = asyncio.get_running_loop().time() + self.settings.shutdown_timeout
        self._retry_at = 0.0  # one more try even while backing off: it may be back
        self._full.set()
        self._over.set()
        try:
            async with asyncio.timeout(self.settings.shutdown_timeout + SPOOL_GRACE):
                await asyncio.wait(self._tasks)
        except TimeoutError:
            log.error("usage ledger: could not commit or spool every record in time")
        tasks = [*self._tasks, *([self._straggler] if self._straggler else [])]
        for task in tasks:
            task.cancel()  # a straggler's connection is terminated, not waited on
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.spool.close()
        if self.pending:
            self._drop(len(self.pending), "could be neither committed nor spooled")
            self.pending.clear()
        self._report()
        log.info(
            "usage ledger closed: %d records written, %d spooled, %d dropped",
            self.written,
            self.spooled,
            self.dropped,
        )

    # -- the flusher --------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while not (self._closing and not self.pending):
            await self._wait()
            try:
                if self.pending:
                    await self._flush(self._take())
                if self._replay_is_due():
                    await self._replay()
            except Exception:  # a bug must not stop the ledger: say so, go on
                log.exception("usage ledger: unexpected error in the flusher")
                await asyncio.sleep(PAUSE)
            self._report()
        await self._drain_spool()

    async def _drain_spool(self) -> None:
        """Closing, with nothing left in memory: what this process spooled while the
        database was slow (a late write) or away goes in now, if the database takes it
        within the shutdown deadline; else it stays on disk for the next process."""
        if not self.spooled:
            return
        loop = asyncio.get_running_loop()
        if self._straggler is not None:  # its outcome says whether the database is up
            await asyncio.wait((self._straggler,), timeout=max(0.0, self._deadline - loop.time()))
            await asyncio.sleep(0)  # its done-callback (``_straggled``) runs first
        if self._straggler is None and not self._failures and loop.time() < self._deadline:
            await self._replay()

    async def _wait(self) -> None:
        """Until a batch is full or ``flush_interval`` has passed (at once when closing)."""
        if self._closing or self._is_full():
            return
        try:
            async with asyncio.timeout(self.settings.flush_interval):
                await self._full.wait()
        except TimeoutError:
            pass
        self._full.clear()

    async def _flush(self, batch: list[Record]) -> None:
        """Commit ``batch``, or spool it while the database is failing."""
        self._flushed_at = asyncio.get_running_loop().time()
        try:
            if not await self._commit(batch):
                await self._spool(batch)
        except OSError as exc:
            self._give_back(batch)
            log.error("usage ledger: cannot spool (%s); keeping the records in memory", exc)
            await asyncio.sleep(PAUSE)
        except BaseException:
            self._give_back(batch)
            raise

    async def _commit(self, batch: list[Record]) -> bool:
        """Write ``batch`` to the database unless it is failing; True when committed by
        the batch's deadline (see the module docstring)."""
        now = asyncio.get_running_loop().time()
        if now < self._retry_at or now >= self._deadline or self._straggler is not None:
            return False
        write = asyncio.ensure_future(self.store.write(batch))
        try:
            # A live batch gets flush_interval (the loss window); the last replay at close,
            # with nothing left in memory to protect, the rest of the shutdown deadline.
            step = self.settings.flush_interval if not self._closing or self.pending else math.inf
            limit = min(self._deadline, now + step)
            done, _ = await asyncio.wait((write,), timeout=limit - now)
        except BaseException:
            write.cancel()
            raise
        if not done:
            log.warning("usage ledger: a write is late; spooling until it ends")
            self._straggler = write
            write.add_done_callback(self._straggled)
            return False
        try:
            write.result()
        except (DatabaseUnavailable, TimeoutError) as exc:
            self._failed(exc)
            return False
        self._answered()
        self.written += len(batch)
        USAGE_WRITTEN.inc(len(batch))
        return True

    def _straggled(self, write: asyncio.Future[None]) -> None:
        """A late write ended: its batch is spooled already; its outcome says whether
        the database may be tried again."""
        self._straggler = None
        if write.cancelled():
            return
        exc = write.exception()
        if exc is None:
            self._answered()
        elif isinstance(exc, (DatabaseUnavailable, TimeoutError)):
            self._failed(exc)
        else:
            log.error("usage ledger: unexpected error in a write", exc_info=exc)
            self._failed(exc)

    def _answered(self) -> None:
        if self._failures:
            log.info("usage ledger: the database is back; replaying the spool")
            self._failures = 0
            self._replay_at = 0.0

    def _failed(self, exc: BaseException) -> None:
        self._failures += 1
        delay = failure_backoff(self._failures)
        self._retry_at = asyncio.get_running_loop().time() + delay
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        log.log(
            level,
            "usage ledger: database unavailable (%s); spooling, next try in %.1fs",
            exc or type(exc).__name__,
            delay,
        )

    async def _spool(self, batch: list[Record]) -> None:
        await self.spool.append(batch)
        self.spooled += len(batch)
        self._replay_at = 0.0  # as soon as the database answers

    # -- replay -------------------------------------------------------------------------

    def _replay_is_due(self) -> bool:
        # Live batches go first: no replay while a full batch is waiting.
        now = asyncio.get_running_loop().time()
        return (
            not self._closing
            and self._straggler is None
            and now >= self._retry_at
            and now >= self._replay_at
            and not self._is_full()
        )

    def _live_first(self) -> bool:
        return self._closing and bool(self.pending)

    async def _replay(self) -> None:
        """Commit every finished spool file; stop at the first database failure."""
        spooled = self.spooled
        await self.spool.rotate()  # this process's own file becomes claimable too
        while (claimed := await self.spool.claim()) is not None:
            if not await self._replay_file(claimed):
                self._replay_at = 0.0  # again as soon as the database answers
                return
        if self.spooled == spooled:  # else rows spooled meanwhile wait in a new file
            self._replay_at = asyncio.get_running_loop().time() + RESCAN

    async def _replay_file(self, claimed: Claimed) -> bool:
        interval = self.settings.flush_interval
        try:
            # Closing, live records go first; the replay resumes once they are in.
            while not self._live_first() and (batch := await claimed.read(self._rows)):
                if not await self._commit(batch):
                    await claimed.release()
                    return False
                claimed.committed(len(batch))
                since = asyncio.get_running_loop().time() - self._flushed_at
                if self.pending and (self._is_full() or since >= interval):
                    await self._flush(self._take())  # live records keep their loss window
            if self._live_first():
                await claimed.release()
                return False
        except BaseException:
            await claimed.release()
            raise
        if claimed.unreadable:
            self._drop(claimed.unreadable, f"were unreadable in {claimed.path}")
        await claimed.finish()
        return True

    # -- the spiller --------------------------------------------------------------------

    async def _spill_loop(self) -> None:
        while True:
            await self._over.wait()
            self._over.clear()
            while len(self.pending) > self._high_water:
                if not self._spilling:
                    log.warning(
                        "usage ledger: %d records waiting (high-water mark %d); spooling",
                        len(self.pending),
                        self._high_water,
                    )
                    self._spilling = True
                batch = self._take()
                try:
                    await self._spool(batch)
                except OSError as exc:
                    self._give_back(batch)
                    log.error("usage ledger: cannot spool (%s)", exc)
                    await asyncio.sleep(PAUSE)
                except BaseException:
                    self._give_back(batch)
                    raise
            self._spilling = False
            if self._closing:
                return

    # -- the queue ----------------------------------------------------------------------

    def _is_full(self) -> bool:
        return len(self.pending) >= self._rows or self.pending_bytes >= self._bytes

    def _take(self) -> list[Record]:
        """The oldest records, up to one batch, taken out of ``pending``; the caller owns
        them until they are committed or spooled (or given back)."""
        batch: list[Record] = []
        taken = 0
        pending = self.pending
        while pending and len(batch) < self._rows and taken < self._bytes:
            row = pending.popleft()
            batch.append(row)
            taken += size(row)
        self.pending_bytes -= taken
        return batch

    def _give_back(self, batch: list[Record]) -> None:
        self.pending.extendleft(reversed(batch))
        self.pending_bytes += sum(size(row) for row in batch)

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        USAGE_DROPPED.inc(count)
        log.error("usage ledger: %d records lost: they %s", count, why)

    def _report(self) -> None:
        USAGE_QUEUE_DEPTH.set(len(self.pending))
        USAGE_SPOOLED.set(self.spool.records)
