"""Append-only spool files: where usage records wait while the database cannot take them.

Layout, in the spool directory: ``spool-<pid>-<hex>.jsonl`` (being written, or left by
a writer that is gone) and ``replay-<pid>-<hex>.jsonl`` (claimed by a replayer). One
record per line, as a JSON array (``Record``).

Invariants:
- A file is appended to by one process only, which holds an exclusive ``flock`` on it
  from before its name appears until it closes it. A ``.jsonl`` file nobody holds a
  lock on is finished and may be claimed (locks die with their process, so a crashed
  writer's file is claimable at once).
- ``append`` writes a batch and fsyncs it before it returns: only then may the caller
  forget the records. A failed write closes the file, so a torn line can only ever be
  a file's last line.
- A torn last line (no newline: the writer died or failed mid-write, before fsync) is
  skipped: those records were never acknowledged as spooled.
- ``claim`` takes a file's lock, then renames it to ``replay-…``: two processes never
  replay one file. The file is deleted only after every record in it is committed; a
  replay cut short leaves it to be claimed again, and replay is idempotent (uid).
- All file I/O runs in a thread: the event loop never waits on a disk.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import msgspec

from .record import Record

log = logging.getLogger("proxy.usage")
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Record)
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC


class Spool:
    """This process's spool file, and the claiming of any finished spool file."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self._fd: int | None = None
        self._name = ""
        # Records appended to each file this process wrote and has not claimed back.
        self._own: dict[str, int] = {}
        # Records in spool files this process knows of, not committed yet (a gauge).
        self.records = 0
        self._lock = asyncio.Lock()  # one append or rotation at a time

    async def append(self, batch: Sequence[Record]) -> None:
        """Write ``batch`` durably (fsync) or raise ``OSError``."""
        data = _encoder.encode_lines(batch)
        async with self._lock:
            await asyncio.to_thread(self._append, data)
            self._own[self._name] += len(batch)
            self.records += len(batch)

    async def rotate(self) -> None:
        """Close the current file so that it can be claimed and replayed."""
        async with self._lock:
            self._close()

    async def close(self) -> None:
        await self.rotate()

    async def claim(self) -> Claimed | None:
        """Take one finished spool file for replay, or None when there is none."""
        claimed = await asyncio.to_thread(self._claim)
        if claimed is not None:
            own = self._own.pop(claimed.taken_from, None)
            if own is None:
                claimed.remaining = await asyncio.to_thread(claimed.count)
                self.records += claimed.remaining
            else:
                claimed.remaining = own
        return claimed

    def _append(self, data: bytes) -> None:
        if self._fd is None:
            self._create()
        assert self._fd is not None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError:
            self._close()  # whatever half-line was written stays the file's last line
            raise

    def _create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tag = f"{os.getpid()}-{os.urandom(6).hex()}"
        temp = self.dir / f".new-{tag}"
        fd = os.open(temp, _OPEN_FLAGS, 0o600)
        try:
            # Locked before the name that replayers look for exists (see invariants).
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            name = f"spool-{tag}.jsonl"
            os.rename(temp, self.dir / name)
            _sync_dir(self.dir)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._name = fd, name
        self._own[name] = 0

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _claim(self) -> Claimed | None:
        if not self.dir.is_dir():
            return None
        for path in sorted(self.dir.glob("*.jsonl")):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # another process claimed and finished it
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                target = self.dir / f"replay-{os.getpid()}-{os.urandom(6).hex()}.jsonl"
                os.rename(path, target)  # names are never reused: still the file we locked
            except (BlockingIOError, FileNotFoundError):  # in use, or claimed meanwhile
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            return Claimed(self, target, fd, path.name)
        return None


class Claimed:
    """A spool file this process holds for replay; ``finish`` or ``release`` it."""

    def __init__(self, spool: Spool, path: Path, fd: int, taken_from: str) -> None:
        self.spool = spool
        self.path = path
        self.taken_from = taken_from
        self.remaining = 0
        # Lines that did not decode (never written by this code: damage): lost records.
        self.unreadable = 0
        self._file: BinaryIO = os.fdopen(fd, "rb")

    async def read(self, limit: int) -> list[Record]:
        """The next records (at most ``limit``); an empty list at the end."""
        records, unreadable = await asyncio.to_thread(self._read, limit)
        self.unreadable += unreadable
        self.committed(unreadable)
        return records

    def committed(self, count: int) -> None:
        """``count`` records of this file are in the database (or were unreadable)."""
        self.remaining -= count
        self.spool.records -= count

    async def finish(self) -> None:
        """Every record is committed: delete the file."""
        await asyncio.to_thread(self._finish)

    async def release(self) -> None:
        """Give the file back (replay cut short); it will be claimed again."""
        self.spool.records -= self.remaining  # counted again by whoever claims it
        self.remaining = 0
        await asyncio.to_thread(self._file.close)

    def count(self) -> int:
        self._file.seek(0)
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: self._file.read(1 << 20), b""))
        self._file.seek(0)
        return lines

    def _read(self, limit: int) -> tuple[list[Record], int]:
        records: list[Record] = []
        unreadable = 0
        while len(records) < limit:
            line = self._file.readline()
            if not line:
                break
            if not line.endswith(b"\n"):
                log.info("usage spool %s: skipping a torn last line", self.path.name)
                break
            try:
                records.append(_decoder.decode(line))
            except msgspec.DecodeError:
                unreadable += 1
                log.error("usage spool %s: unreadable record skipped: %.200r", self.path, line)
        return records, unreadable

    def _finish(self) -> None:
        self.path.unlink(missing_ok=True)
        self._file.close()


def _sync_dir(directory: Path) -> None:
    """Make a new file's name durable (its records are fsynced with the file)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
