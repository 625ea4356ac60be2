"""Incremental Server-Sent Events scanning: bytes in, complete events out, no I/O.

Two scanners with one notion of where an event ends:

- ``Cutter.feed(chunk)`` returns the bytes of every event the chunk completed, in one
  piece, without parsing a field: what the relay writes, once per upstream read. On a
  stream with ``\n`` line ends (what upstreams send) that is one C-speed ``rfind`` for
  the last blank line; once a ``\r`` shows up it hands over to a ``Scanner``.
- ``Scanner.feed(chunk)`` returns the events completed by that chunk, parsed
  (``events_in`` parses a run of complete events, as ``Cutter`` returns them): what
  the relay reads the few events it must read with.

Invariants:
- Every byte fed belongs to exactly one event's ``raw`` once that event completes;
  concatenating the ``raw`` of all events reproduces the stream up to the last
  complete event. Bytes of an unfinished event stay buffered.
- The result does not depend on how the stream was split into chunks: line ends may be
  ``\\r\\n``, ``\\n`` or ``\\r``, and a ``\\r`` at the end of a chunk is only decided when
  the next byte arrives (it may be the first half of ``\\r\\n``).
- Bytes already searched are never searched again (``_pos`` remembers where to go on).
- ``Cutter``'s pieces, joined, are the ``raw`` of ``Scanner``'s events, joined, and its
  ``pending`` is the same, however either was fed.

Field parsing follows the WHATWG SSE rules for ``data`` and ``event``; other fields
and comments are kept in ``raw`` (the relay passes them through) but not parsed.
"""

from __future__ import annotations

import re

_LINE_END = re.compile(rb"\r\n|\r|\n")


class Event:
    """One complete event: its exact bytes, its ``event:`` name and its joined data."""

    __slots__ = ("data", "name", "raw")

    def __init__(self, raw: bytes, name: bytes, data: bytes | None) -> None:
        self.raw = raw
        self.name = name
        # None when the event had no data field (a comment or keep-alive block).
        self.data = data

    def __repr__(self) -> str:
        return f"Event(name={self.name!r}, data={self.data!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and (self.raw, self.name, self.data) == (
            other.raw,
            other.name,
            other.data,
        )

    __hash__ = None  # type: ignore[assignment]


class Scanner:
    """Feeds on arbitrary chunks of an SSE stream and yields complete events."""

    __slots__ = ("_buf", "_data", "_line", "_name", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._line = 0  # start of the first line not yet parsed
        self._pos = 0  # where the search for that line's end goes on
        self._name = b""
        self._data: list[bytes] = []

    @property
    def pending(self) -> int:
        """Bytes held back because their event is not complete yet."""
        return len(self._buf)

    def feed(self, chunk: bytes, final: bool = False) -> list[Event]:
        """The events ``chunk`` completed. ``final``: the stream ends after it, so a
        ``\r`` at its very end is a line end (nothing can follow to make it ``\r\n``)."""
        if not self._buf:  # nothing pending, so no field or held-back \r either
            simple = _simple_events(chunk)
            if simple is not None:
                return simple
        buf = self._buf
        buf += chunk
        events: list[Event] = []
        start = 0  # start of the current event in buf
        line = self._line
        pos = self._pos
        end = len(buf)
        while True:
            m = _LINE_END.search(buf, pos)
            if m is None:
                pos = end  # a long line arriving in small chunks must not be rescanned
                break
            eol = m.end()
            if eol == end and buf[eol - 1] == 0x0D and not final:
                pos = m.start()  # a lone \r at the end may be half of \r\n: wait for more
                break
            text = bytes(buf[line : m.start()])
            line = pos = eol
            if text:
                self._field(text)
                continue
            # A blank line ends the event (or a run of stray blank lines).
            data = b"\n".join(self._data) if self._data else None
            events.append(Event(bytes(buf[start:pos]), self._name, data))
            start = pos
            self._name = b""
            self._data = []
        if start:
            del buf[:start]
            line -= start
            pos -= start
        self._line = line
        self._pos = pos
        return events

    def _field(self, line: bytes) -> None:
        if line[0] == 0x3A:  # ":" starts a comment
            return
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._name = value


def events_in(block: bytes) -> list[Event]:
    """The events of ``block``, a run of complete events (as ``Cutter.feed`` returns)."""
    return Scanner().feed(block, final=True)


class Cutter:
    """Feeds on arbitrary chunks of an SSE stream and returns the bytes of the events
    each chunk completed, in one piece (``b""`` when none)."""

    __slots__ = ("_buf", "_scanner")

    def __init__(self) -> None:
        self._buf = bytearray()  # the unfinished event, while no \r has been seen
        self._scanner: Scanner | None = None  # does the cutting once one has

    @property
    def pending(self) -> int:
        """Bytes held back because their event is not complete yet."""
        return self._scanner.pending if self._scanner is not None else len(self._buf)

    def feed(self, chunk: bytes) -> bytes:
        if self._scanner is None and chunk.find(b"\r") < 0:
            # Only \n line ends: an event ends at a blank line, so at a "\n\n" (or at a
            # "\n" that starts the unfinished part: a stray blank line).
            buf = self._buf
            if buf:
                start = len(buf) - 1  # a boundary can only be where the new bytes are
                buf += chunk
                cut = buf.rfind(b"\n\n", start) + 2
                if cut < 2:
                    return b""
                done = bytes(buf[:cut])
                del buf[:cut]
                return done
            if chunk.endswith(b"\n\n"):  # the common chunk: whole events only
                return chunk
            cut = chunk.rfind(b"\n\n") + 2
            if cut < 2:
                cut = 1 if chunk[:1] == b"\n" else 0
            buf += chunk[cut:]
            return chunk[:cut]
        if self._scanner is None:
            # A \r may be a line end of its own or half of \r\n: the full scanner
            # decides, from the unfinished event on (it has no \r in it).
            self._scanner = Scanner()
            chunk = bytes(self._buf) + chunk
            self._buf.clear()
        return b"".join([event.raw for event in self._scanner.feed(chunk)])


def _simple_events(chunk: bytes) -> list[Event] | None:
    """The events of a chunk made only of whole single-line ``data:`` events, or None
    when it holds anything else. This is what streaming upstreams send (one event per
    token), and splitting it is several times cheaper than the general scan, with the
    same result. When it fails, ``feed`` scans the chunk again: one extra pass over new
    bytes, never over buffered ones."""
    if not chunk.endswith(b"\n\n") or chunk.find(b"\r") >= 0:
        return None
    events = []
    for part in chunk[:-2].split(b"\n\n"):
        if not part.startswith(b"data:") or part.find(b"\n") >= 0:
            return None
        value = part[5:]
        events.append(Event(part + b"\n\n", b"", value[1:] if value[:1] == b" " else value))
    return events
