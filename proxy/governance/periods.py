"""Budget periods: when the current day, week, month (or the whole life of a key)
began and ends, in the key's own time zone.

Pure functions of the time passed in (``when``, Unix seconds); nothing here reads a
clock, so tests name any instant, DST changes included.

- ``daily``: from local midnight to the next local midnight (23 or 25 hours long on
  the days the clocks change);
- ``weekly``: from Monday's local midnight (ISO weeks);
- ``monthly``: from local midnight of the 1st;
- ``total``: one period for ever (start 0, no end).

A local midnight that does not exist (a zone whose clocks jump forward at 00:00) is
the first instant of that day: zoneinfo reads the missing wall time with the offset
before the jump (PEP 495, ``fold=0``), which lands just after it.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

PERIODS = ("daily", "weekly", "monthly", "total")


class Period(NamedTuple):
    """One budget period: ``[start, end)`` in Unix seconds; ``end`` None: no end."""

    start: float
    end: float | None

    @property
    def id(self) -> int:
        """Names the period in Redis keys: its start, in whole Unix seconds."""
        return int(self.start)

    def contains(self, when: float) -> bool:
        return self.start <= when and (self.end is None or when < self.end)


TOTAL = Period(0.0, None)


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name`` (e.g. ``Europe/Berlin``); ``ValueError`` if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:  # ValueError: a malformed name
        raise ValueError(f"unknown time zone {name!r}") from exc


def period_of(kind: str, tz: ZoneInfo, when: float) -> Period:
    """The ``kind`` period (one of ``PERIODS``) that contains ``when``."""
    if kind == "total":
        return TOTAL
    day = datetime.fromtimestamp(when, tz).date()
    if kind == "daily":
        first, following = day, day + timedelta(days=1)
    elif kind == "weekly":
        first = day - timedelta(days=day.weekday())
        following = first + timedelta(days=7)
    elif kind == "monthly":
        first = day.replace(day=1)
        following = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    else:
        raise ValueError(f"unknown budget period {kind!r}")
    return Period(_midnight(first, tz), _midnight(following, tz))


def _midnight(day: date, tz: ZoneInfo) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()


def go_duration(ms: int) -> str:
    """A duration the way OpenAI (Go) writes it: ``12ms``, ``1s``, ``1.5s``, ``6m0s``."""
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest // 1000}" if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"
