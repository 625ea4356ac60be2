"""The access log: one JSON line per finished request on the logger ``proxy.access``
(the request path's part, the sink, is access_sink.py, compiled with the hot path).

Invariants:
- The request path only builds a small dict of plain values and hands a LogRecord to
  a queue; JSON encoding and the write to stderr happen in a writer thread, in
  batches: the first record of a batch wakes the thread, which waits ``GATHER``
  seconds before it writes everything queued by then in one write. (A wake-up, a
  write and a flush per record cost a busy worker ~30 µs per request: thread
  switches, GIL hand-offs and a syscall each; a batch costs the request path only
  the enqueue.) So a line reaches stderr at most ``GATHER`` after its request ended.
- While the writer's queue is the logger's only handler (and no filter is set), a
  line goes on the queue as its time and fields, without a ``LogRecord`` and the
  logging machinery (2.5 µs a request on the loop instead of 5-7); a handler anyone attaches to
  ``proxy.access`` (tests, operators) gets every record as a ``LogRecord`` again.
- A line carries the key *id*, never a key; no header or body content goes in it.
- One listener per process however many apps run in it (tests start several): the
  first app to start starts it, the last one to stop flushes and stops it. While it
  runs, ``proxy.access`` does not propagate, so a line is not printed twice by the
  root handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

LOGGER = "proxy.access"
# Seconds the writer thread gathers records after the first of a batch woke it.
GATHER = 0.05


class JsonFormatter(logging.Formatter):
    """Formats access records (a dict message) as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        if not isinstance(record.msg, dict):
            return super().format(record)
        return line(record.created, record.msg)


# The second last formatted and its text ("2026-12-07T03:31:05"): a batch's lines
# mostly share it, and formatting a datetime costs ~1.5 µs. Replaced whole, so that
# threads formatting lines at once read a consistent pair.
_second = (0, "1970-01-01T00:00:00")


def line(created: float, fields: dict[str, Any]) -> str:
    """One access line: the time (UTC, to the millisecond, truncated), then the fields,
    as one JSON object."""
    global _second
    whole = int(created)
    second, text = _second
    if whole != second:
        text = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second = (whole, text)
    time = f"{text}.{int((created - whole) * 1000):03d}+00:00"
    return orjson.dumps({"time": time, **fields}).decode()


# On the writer's queue: a record, a line's time and fields (see AccessLog.record), or
# None to stop.
_Item = logging.LogRecord | tuple[float, dict[str, Any]] | None


class _QueueHandler(logging.handlers.QueueHandler):
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The stock prepare() formats the message here, on the event loop; the
        # writer thread formats instead. Access records hold only plain values.
        return record


class _Writer:
    """The thread that formats queued records and writes them out in batches (see
    the module invariants); ``None`` in the queue stops it after what came before."""

    def __init__(self, records: queue.SimpleQueue[_Item], out: TextIO):
        self.records = records
        self.out = out
        self.thread = threading.Thread(target=self._run, name="access-log", daemon=True)

    def _run(self) -> None:
        formatter = JsonFormatter()
        while True:
            batch = [self.records.get()]
            time.sleep(GATHER)  # what the loop queues meanwhile costs it only a put
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self.records.get_nowait())
            lines = [
                (line(*item) if isinstance(item, tuple) else formatter.format(item)) + "\n"
                for item in batch
                if item
            ]
            with contextlib.suppress(OSError, ValueError):  # stderr gone: nowhere to write
                self.out.write("".join(lines))
                self.out.flush()
            if None in batch:
                return


class Output:
    """The process's one queue → writer thread → stderr pipeline, reference-counted."""

    users = 0
    writer: _Writer | None = None
    handler: _QueueHandler | None = None

    @classmethod
    def acquire(cls) -> None:
        cls.users += 1
        if cls.users > 1:
            return
        records: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        cls.writer = _Writer(records, sys.stderr)
        cls.handler = _QueueHandler(records)
        logger = logging.getLogger(LOGGER)
        logger.addHandler(cls.handler)
        logger.propagate = False
        cls.writer.thread.start()

    @classmethod
    async def release(cls) -> None:
        cls.users -= 1
        if cls.users > 0 or cls.writer is None or cls.handler is None:
            return
        logger = logging.getLogger(LOGGER)
        logger.removeHandler(cls.handler)
        logger.propagate = True
        writer, cls.writer, cls.handler = cls.writer, None, None
        writer.records.put(None)
        await asyncio.to_thread(writer.thread.join)  # writes out what is queued


@contextlib.asynccontextmanager
async def listener() -> AsyncIterator[None]:
    """The access log's writer thread runs inside."""
    Output.acquire()
    try:
        yield
    finally:
        await Output.release()
