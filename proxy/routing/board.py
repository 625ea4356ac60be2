"""Per-deployment times that every worker of one host reads and writes: until when a
deployment is out of rotation, and until when it asked for no requests (a 429).

Invariants:
- Values are ``time.monotonic()`` seconds (on Linux one clock for every process of the
  host), 0 meaning "not out" / "not throttled"; slot ``i`` holds two of them.
- Every worker builds its routes from the same config, so slot ``i`` names the same
  deployment in each.
- With several workers (``serve`` gives them a fresh ``PROMETHEUS_MULTIPROC_DIR``) the
  table is a file in that directory mapped into each worker: a read is a memory read, a
  write is seen by every worker at once. A lone worker keeps it in its own memory.
- A value is one aligned 8-byte store, so a reader sees the old or the new value, never
  a mix. ``exclusive`` serialises a check-then-write across workers (an ejection).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import Iterator
from typing import Final

EJECTED: Final = 0
THROTTLED: Final = 1
_FIELDS = 2
_SIZE = 8  # a double
FILE_NAME = "deployment-health"


class Board:
    """The table of ``slots`` deployments; in ``directory`` when workers share it."""

    __slots__ = ("_fd", "_map", "values")

    def __init__(self, slots: int, directory: str | None = None) -> None:
        length = max(1, slots) * _FIELDS
        self._fd = -1
        self._map: mmap.mmap | None = None
        if directory is None:
            self.values: memoryview[float] = memoryview(bytearray(length * _SIZE)).cast("d")
            return
        fd = os.open(os.path.join(directory, FILE_NAME), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < length * _SIZE:  # the first worker makes it (zeros)
                os.ftruncate(fd, length * _SIZE)
            self._map = mmap.mmap(fd, length * _SIZE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.values = memoryview(self._map).cast("d")

    def offset(self, slot: int) -> int:
        """Where slot ``slot``'s fields start in ``values`` (``values[offset + field]``)."""
        return slot * _FIELDS

    def get(self, slot: int, field: int) -> float:
        value: float = self.values[slot * _FIELDS + field]
        return value

    def set(self, slot: int, field: int, value: float) -> None:
        self.values[slot * _FIELDS + field] = value

    @contextlib.contextmanager
    def exclusive(self, slot: int) -> Iterator[None]:
        """Hold slot ``slot`` against other workers (a no-op for a lone worker, whose
        event loop already runs one thing at a time)."""
        if self._fd < 0:
            yield
            return
        offset, length = slot * _FIELDS * _SIZE, _FIELDS * _SIZE
        fcntl.lockf(self._fd, fcntl.LOCK_EX, length, offset)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, length, offset)

    def close(self) -> None:
        """Unmap the shared table (idempotent); the local one is left to the GC."""
        if self._map is not None:
            self.values.release()
            self._map.close()
            self._map = None
            os.close(self._fd)
            self._fd = -1
