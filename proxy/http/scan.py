"""What the relay learns of a read of complete stream events by byte scans, before it
parses any (``relay._Watch.take``): which events it must read, which it relays as
they are, and (where the proxy asked for usage itself) the read without the
``"usage":null`` members the upstream added. Bytes in, counts and offsets out.

``plain_run`` is what the relay calls: in C where it was built (proxy/http/_plain.c,
with the compiled hot path: one pass over the read, memchr and memmem, event by
event), else ``run_by_counts``, the scans below. Both come to what parsing every
event comes to (tests/http/test_relay.py); they may split a read differently: the C
scan stops at the first event that is not plain and leaves the rest to be parsed,
and takes an event with a null usage only where it ends the object (``,"usage":null}``
or ``, "usage": null}``: OpenAI, Azure, vLLM), parsing any other.

Invariants of the Python scans:
- Exact, never a guess: an event that may hold a usage (a ``"usage"`` key not
  followed by null), an error, or anything but a plain ``data: {...}`` line is among
  the events read; a false alarm costs a parse, never a missed usage.
- Each scan is a C-speed pass over the read (~0.3-0.45 ns a byte), and they are what
  a long read costs: as few as can be, and the short ones from the end of the read.
  Upstreams put ``"usage"`` last in each chunk (OpenAI, Azure, vLLM), so the null
  usages are counted where an event ends, together with the event boundaries there:
  one count for both (``unstripped``, and ``stripped``'s first split).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from .reported import null_after

# The null usage members an upstream adds to each chunk when asked for usage, each
# spelling with the comma that goes with it (stripped, the JSON stays valid).
NULL_USAGE: Final = (b',"usage":null', b', "usage": null', b'"usage":null,', b'"usage": null, ')
_KEY = b'"usage"'
_USAGE = (b'"usage":{', b'"usage": {')
_PLAIN_START = b"data: {"
_PLAIN_END = b"}\n\n"
_BETWEEN = b"}\n\ndata: {"
# A null usage last in an event that another plain event follows, and last in the last.
_NULL_BETWEEN = b'"usage":null' + _BETWEEN
_NULL_END = b'"usage":null' + _PLAIN_END
# The stream's last event (chat/completions), as upstreams send it.
DONE: Final = b"data: [DONE]\n\n"
_ERROR = b'data: {"error"'
# The same, stripped (with the comma), and either last or last before [DONE]: suffixes
# checked as they are, since a start or end argument costs each call more than a
# short read's scan (the arguments are parsed as a tuple).
_STRIP_BETWEEN = b"," + _NULL_BETWEEN
_STRIP_END = b"," + _NULL_END
_NULL_LAST = (_NULL_END, _NULL_END + DONE)
_STRIP_LAST = (_STRIP_END, _STRIP_END + DONE)


def run_by_counts(block: bytes, strip: bool) -> tuple[bytes, int, bytes, bytes | None]:
    """``plain_run`` in Python: the plain events of ``block`` as the client gets them,
    how many they are, and the bytes to read one by one; when they are not all plain
    up to the events the proxy must read, all of the read is to be read. (The C scan's
    ``data`` is left to the parser here: always None.)"""
    if block.find(b"\r") >= 0:  # \r line ends: every event parsed
        return b"", 0, block, None
    if strip:
        block, maybe, known = stripped(block)
        end = unread_end(block, maybe, stripped=True)
    else:
        end, known = unstripped(block)
    head, count = plain_events(block, end, known) if end else (block, 0)
    if not count:
        return b"", 0, block, None
    return head, count, block[end:] if end < len(block) else b"", None


PlainRun = Callable[[bytes, bool], tuple[bytes, int, bytes, bytes | None]]


def _fastest() -> PlainRun:
    """The C scan (proxy/http/_plain.c, built with the compiled hot path), else
    ``run_by_counts``."""
    try:
        from ._plain import plain_run as in_c
    except ImportError:
        return run_by_counts
    return in_c


# ``plain_run(block, strip) -> (head, count, rest, data)``: ``block``'s plain events as
# the client gets them (the ``"usage":null`` the proxy asked for stripped), how many,
# the bytes left to parse one by one (empty when none), and (C only, else None) the
# data of ``rest`` when it is one single-line ``data: `` event, alone or before the
# stream's ``data: [DONE]``: what the relay then reads without the SSE parser.
plain_run: PlainRun = _fastest()


def unstripped(block: bytes) -> tuple[int, int]:
    """``unread_end`` of a block the proxy does not strip, and how many event
    boundaries (``}\\n\\ndata: {``) it has at least, for ``plain_events``.

    The null usages counted are those that end an event, each with the boundary
    after it (one count for both): for upstreams that put usage last (all but one
    key then, or all), that is every null. Where it is not, the keys are counted
    again, each null spelling apart (``maybe_usages``)."""
    keys = block.count(_KEY)
    if not keys:
        return unread_end(block, 0, stripped=False), 0
    last = block.endswith(_NULL_LAST)
    # With the last key that null, there is no other to count (one event a read).
    known = block.count(_NULL_BETWEEN) if keys > last else 0
    maybe = keys - known - last
    end = unread_end(block, maybe, stripped=False) if maybe <= 1 else 0
    if not end and maybe:
        end = unread_end(block, maybe_usages(block, 0, len(block), False), stripped=False)
    return end, known


def stripped(block: bytes) -> tuple[bytes, int, int]:
    """``block`` without the null usage members of ``NULL_USAGE``, every occurrence
    of each spelling, as ``bytes.replace`` of each in turn makes it; how many
    ``"usage"`` keys it has left; and how many event boundaries it has at least.

    Those ending an event go first: the last event's, then those before a boundary,
    by splitting at them (split and joined, not replaced: ``replace`` scans the read
    once more to count before it copies). Then each spelling in turn. Each step only
    while a key is left that could be a null: not once none is, or the one left is
    the last and holds no null (the usage chunk's). The result is ``replace``'s: the
    nulls removed first are among those it removes, and removing one cannot make
    another (the bytes after it are a ``}``), nor touch a boundary."""
    if block.endswith(_STRIP_LAST):  # the last event's, where the read ends
        end = _body_end(block)
        block = block[: end - len(_STRIP_END)] + _PLAIN_END + block[end:]
    left = block.count(_KEY)
    joins = 0
    if not _just_the_last(block, left, 0, len(block)):
        parts = block.split(_STRIP_BETWEEN)
        joins = len(parts) - 1
        block = _BETWEEN.join(parts)
        left -= joins
    for pattern in NULL_USAGE:
        if _just_the_last(block, left, 0, len(block)):
            break
        shorter = b"".join(block.split(pattern))
        left -= (len(block) - len(shorter)) // len(pattern)  # one key in each
        block = shorter
    return block, left, joins


def unread_end(block: bytes, maybe: int, stripped: bool) -> int:
    """Where the events of ``block`` (``\\n`` line ends) that the proxy must read
    begin. Those are [DONE] (the stream's last), an error and a usage that is not null
    (in the chunk before [DONE]), found with byte scans (a false alarm costs a parse).
    ``maybe``: ``maybe_usages`` of the whole block, or more (0 is returned, when
    the events that may hold one are not all found together from the end)."""
    end = _body_end(block)
    at = block.find(_ERROR)  # never in the [DONE]
    if at >= 0:
        end = event_start(block, at)
    if maybe and end < len(block):  # those in the events read anyway
        maybe -= maybe_usages(block, end, len(block), stripped)
    if not maybe:
        return end
    # The usage chunk is the last before [DONE]: looked for from the end first, a few
    # hundred bytes back, not in scans of the whole read.
    start = event_start(block, block.rfind(_KEY, 0, end))
    if maybe_usages(block, start, end, stripped) == maybe:
        return start
    # A usage before it: parsed from the first (or, in some other form, all of it).
    firsts = [at for marker in _USAGE if (at := block.find(marker, 0, end)) >= 0]
    if not firsts:
        return 0
    start = event_start(block, min(firsts))
    return start if maybe_usages(block, start, end, stripped) == maybe else 0


def maybe_usages(block: bytes, start: int, end: int, stripped: bool) -> int:
    """How many ``"usage"`` keys of ``block[start:end]`` may hold a usage: those not
    null in the usual spellings (all of them once ``stripped``)."""
    keys = block.count(_KEY, start, end)
    if stripped or not keys:
        return keys
    keys -= block.count(b'"usage":null', start, end)
    if not _just_the_last(block, keys, start, end):
        keys -= block.count(b'"usage": null', start, end)
    return keys


def plain_events(block: bytes, end: int, known: int) -> tuple[bytes, int]:
    """``block[:end]``, and how many events it holds when they are all plain, else 0
    (they are parsed one by one). Plain events are what chat and completion streams
    are made of: one ``data: {...}`` line each, ``\\n`` line ends. Byte counts only;
    their JSON is not parsed (docs/performance.md, "What the relay checks").

    ``known``: how many event boundaries ``block`` has at least, found by an earlier
    scan. When those that lie in ``block[:end]`` account for every line end there,
    they are all its boundaries, and they are not counted again."""
    head = block if end == len(block) else block[:end]
    if not (head.startswith(_PLAIN_START) and head.endswith(_PLAIN_END)):
        return head, 0
    lines = head.count(b"\n")
    if known and end < len(block):  # less those not wholly before end
        known -= block.count(_BETWEEN, max(end - len(_BETWEEN) + 1, 0))
    # Each boundary holds two line ends and the last event's end two more, so there
    # are at most (lines - 2) / 2 boundaries, and ``known`` at most as many as there
    # are: when it is (lines - 2) / 2, it is all of them and no other line end is
    # left (each event one line, between boundaries). Otherwise they are counted.
    if lines != 2 * known + 2:
        known = head.count(_BETWEEN)
    return head, known + 1 if lines == 2 * known + 2 else 0


def event_start(block: bytes, at: int) -> int:
    """The start of the event holding ``block[at]`` (``\\n`` line ends)."""
    before = block.rfind(b"\n\n", 0, at)
    return before + 2 if before >= 0 else 0


def _body_end(block: bytes) -> int:
    """The end of ``block`` before its [DONE], if it ends with one."""
    return len(block) - len(DONE) if block.endswith(DONE) else len(block)


def _just_the_last(block: bytes, left: int, start: int, end: int) -> bool:
    """Whether the ``left`` keys of ``block[start:end]`` a count did not account for
    are none, or only its last, holding no null (the usage chunk's): then there is no
    other spelling of null to look for."""
    if left != 1:
        return left == 0
    return not null_after(block, block.rfind(_KEY, start, end) + len(_KEY))
