"""Poison rows: records the database refuses for their data, set aside so that the
rest of their batch commits and nothing is retried for ever.

``Sifting`` wraps the ledger store: a batch the store ``Rejected`` is split in halves,
each written on its own, down to the single records that are refused. Each of those is
appended to the dead-letter file with the reason, logged and counted
(``morngpt_usage_rejected_records_total``); every other record commits. A batch with
k bad records out of n costs at most about 2·k·log2(n) writes, once.

Dead letters: ``<spool_dir>/rejected/rejected-<pid>.jsonl``, one JSON object a line,
``{"reason": …, "record": [the record as in a spool line]}``, fsynced. The spool
replays only ``*.jsonl`` files directly in ``spool_dir``, never these. A database
that is unavailable meanwhile (``DatabaseUnavailable``) ends the sifting: the writer
spools the whole batch, and the halves already committed are skipped on replay (uid).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import msgspec

from ..ops.metrics import USAGE_REJECTED
from .record import Record
from .store import Rejected, Store

log = logging.getLogger("proxy.usage")


class DeadLetter(msgspec.Struct):
    reason: str
    record: Record


_encode = msgspec.json.Encoder().encode


class Sifting:
    """A ``Store`` that commits what it can of a refused batch (module docstring)."""

    def __init__(self, store: Store, spool_dir: str | Path) -> None:
        self.store = store
        self.path = Path(spool_dir) / "rejected" / f"rejected-{os.getpid()}.jsonl"
        self.rejected = 0

    async def write(self, batch: Sequence[Record]) -> None:
        try:
            await self.store.write(batch)
        except Rejected as exc:
            if len(batch) == 1:
                await self._set_aside(batch[0], exc.reason)
                return
            half = len(batch) // 2
            await self.write(batch[:half])
            await self.write(batch[half:])

    async def _set_aside(self, record: Record, reason: str) -> None:
        line = _encode(DeadLetter(reason, record)) + b"\n"
        await asyncio.to_thread(self._append, line)
        self.rejected += 1
        USAGE_REJECTED.inc()
        log.error(
            "usage ledger: the database refused record %s (%s); set aside in %s",
            record.uid,
            reason,
            self.path,
        )

    def _append(self, line: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as file:
            file.write(line)
            file.flush()
            os.fsync(file.fileno())
