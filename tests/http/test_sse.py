"""The SSE scanner: tables of streams, then properties over every way to chunk them."""

from __future__ import annotations

import time
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.http.sse import Cutter, Event, Scanner, events_in
from tests.support.properties import examples

# ---------------------------------------------------------------------------------------
# Helpers


def feed_all(chunks: list[bytes]) -> tuple[list[Event], Scanner]:
    scanner = Scanner()
    events: list[Event] = []
    for chunk in chunks:
        events.extend(scanner.feed(chunk))
    return events, scanner


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in pairwise(bounds)]


def assert_accounts_for(stream: bytes, events: list[Event], scanner: Scanner) -> None:
    """Every byte is in exactly one event's raw, or still pending at the end."""
    done = b"".join(e.raw for e in events)
    assert done + stream[len(done) :] == stream
    assert stream.startswith(done)
    assert scanner.pending == len(stream) - len(done)


def summary(events: list[Event]) -> list[tuple[bytes, bytes | None]]:
    return [(e.name, e.data) for e in events]


# ---------------------------------------------------------------------------------------
# Table of streams fed whole: (stream, [(name, data), ...], pending bytes at the end)

D = b"data: "
CASES = [
    pytest.param(b'data: {"a":1}\n\n', [(b"", b'{"a":1}')], 0, id="one-data-event"),
    pytest.param(b"data: [DONE]\n\n", [(b"", b"[DONE]")], 0, id="done"),
    pytest.param(
        b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n",
        [(b"", b"1"), (b"", b"2"), (b"", b"[DONE]")],
        0,
        id="several-events",
    ),
    pytest.param(b"data: a\ndata: b\ndata: c\n\n", [(b"", b"a\nb\nc")], 0, id="multi-line"),
    pytest.param(b"data:x\n\n", [(b"", b"x")], 0, id="no-space-after-colon"),
    pytest.param(b"data:  x \n\n", [(b"", b" x ")], 0, id="only-one-space-stripped"),
    pytest.param(b"data\n\n", [(b"", b"")], 0, id="data-without-colon"),
    pytest.param(b"data:\n\n", [(b"", b"")], 0, id="empty-data"),
    pytest.param(b"data\ndata: x\n\n", [(b"", b"\nx")], 0, id="empty-then-data"),
    pytest.param(b"data: a:b: c\n\n", [(b"", b"a:b: c")], 0, id="colons-in-value"),
    pytest.param(
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta"}\n\n',
        [(b"response.output_text.delta", b'{"type":"response.output_text.delta"}')],
        0,
        id="responses-event-name",
    ),
    pytest.param(
        b"event: response.created\ndata: {}\n\nevent: response.completed\ndata: {}\n\n",
        [(b"response.created", b"{}"), (b"response.completed", b"{}")],
        0,
        id="name-does-not-leak-into-next-event",
    ),
    pytest.param(b"event: a\nevent: b\ndata: x\n\n", [(b"b", b"x")], 0, id="last-name-wins"),
    pytest.param(b"event:done\ndata: x\n\n", [(b"done", b"x")], 0, id="name-without-space"),
    pytest.param(b"event\ndata: x\n\n", [(b"", b"x")], 0, id="event-without-colon"),
    pytest.param(b"event: ping\n\n", [(b"ping", None)], 0, id="name-without-data"),
    pytest.param(b": keep-alive\n\n", [(b"", None)], 0, id="comment"),
    pytest.param(b":\n\n", [(b"", None)], 0, id="empty-comment"),
    pytest.param(
        b": keep-alive\n\ndata: x\n\n", [(b"", None), (b"", b"x")], 0, id="comment-then-data"
    ),
    pytest.param(
        b"data: a\n: between\ndata: b\n\n", [(b"", b"a\nb")], 0, id="comment-inside-event"
    ),
    pytest.param(b"id: 7\nretry: 3000\ndata: x\n\n", [(b"", b"x")], 0, id="id-and-retry-ignored"),
    pytest.param(b"id: 7\n\n", [(b"", None)], 0, id="id-alone"),
    pytest.param(b"x-custom: y\ndata: x\n\n", [(b"", b"x")], 0, id="unknown-field"),
    pytest.param(b"Data: x\n\n", [(b"", None)], 0, id="field-names-are-case-sensitive"),
    pytest.param(b"data : x\n\n", [(b"", None)], 0, id="space-before-colon-is-other-field"),
    pytest.param(b" data: x\n\n", [(b"", None)], 0, id="leading-space-is-other-field"),
    pytest.param(b"data: x\r\n\r\n", [(b"", b"x")], 0, id="crlf"),
    pytest.param(b"data: x\r\rdata: y\r\r\n", [(b"", b"x"), (b"", b"y")], 0, id="cr"),
    pytest.param(
        b"data: a\r\ndata: b\rdata: c\n\r\nevent: e\rdata: d\n\n",
        [(b"", b"a\nb\nc"), (b"e", b"d")],
        0,
        id="mixed-line-ends",
    ),
    pytest.param(b"data: x\r\r\n", [(b"", b"x")], 0, id="cr-then-crlf"),
    pytest.param(b"data: x\n\rdata: y\n\n", [(b"", b"x"), (b"", b"y")], 0, id="lf-then-cr"),
    pytest.param(
        b"\n\ndata: x\n\n\n",
        [(b"", None), (b"", None), (b"", b"x"), (b"", None)],
        0,
        id="stray-blank-lines",
    ),
    pytest.param(b"\r\n", [(b"", None)], 0, id="lone-crlf"),
    pytest.param(
        'data: {"c":"héllo 世界 🎉"}\n\n'.encode(),
        [(b"", '{"c":"héllo 世界 🎉"}'.encode())],
        0,
        id="utf8",
    ),
    pytest.param(
        "event: ünïcode\ndata: ✓\n\n".encode(),
        [("ünïcode".encode(), "✓".encode())],
        0,
        id="utf8-name",
    ),
    pytest.param(b"data: x\x00y\n\n", [(b"", b"x\x00y")], 0, id="nul-byte"),
    pytest.param(b"", [], 0, id="empty-stream"),
    pytest.param(b"data: x", [], 7, id="unfinished-line"),
    pytest.param(b"data: x\n", [], 8, id="unfinished-event"),
    pytest.param(b"data: x\n\ndata: y\n", [(b"", b"x")], 8, id="complete-then-unfinished"),
    # A \r at the very end may be the first half of \r\n: it is only decided later.
    pytest.param(b"data: x\r\r", [], 9, id="trailing-cr-held-back"),
    pytest.param(b"data: x\n\r", [], 9, id="trailing-cr-after-lf-held-back"),
]


@pytest.mark.parametrize(("stream", "expected", "pending"), CASES)
def test_table_fed_whole(
    stream: bytes, expected: list[tuple[bytes, bytes | None]], pending: int
) -> None:
    events, scanner = feed_all([stream])
    assert summary(events) == expected
    assert scanner.pending == pending
    assert_accounts_for(stream, events, scanner)


@pytest.mark.parametrize(("stream", "expected", "pending"), CASES)
def test_table_fed_byte_by_byte(
    stream: bytes, expected: list[tuple[bytes, bytes | None]], pending: int
) -> None:
    whole, _ = feed_all([stream])
    events, scanner = feed_all([stream[i : i + 1] for i in range(len(stream))])
    assert events == whole
    assert summary(events) == expected
    assert scanner.pending == pending
    assert_accounts_for(stream, events, scanner)


def test_raw_keeps_exact_bytes_of_each_event() -> None:
    stream = b": ping\r\n\r\nevent: e\rid: 1\rdata: x\r\rdata: [DONE]\n\n"
    events, _ = feed_all([stream])
    assert [e.raw for e in events] == [
        b": ping\r\n\r\n",
        b"event: e\rid: 1\rdata: x\r\r",
        b"data: [DONE]\n\n",
    ]


def test_held_back_cr_is_decided_by_the_next_byte() -> None:
    scanner = Scanner()
    assert scanner.feed(b"data: x\r") == []
    assert scanner.feed(b"\r") == []  # could still be \r\r\n
    assert scanner.pending == 9
    [event] = scanner.feed(b"\n")
    assert (event.raw, event.data) == (b"data: x\r\r\n", b"x")
    assert scanner.pending == 0

    scanner = Scanner()
    assert scanner.feed(b"data: x\r\r") == []
    [event] = scanner.feed(b"data: y")  # not \n: the \r was a line end on its own
    assert (event.raw, event.data) == (b"data: x\r\r", b"x")
    assert scanner.pending == len(b"data: y")


def test_events_are_returned_by_the_feed_that_completes_them() -> None:
    scanner = Scanner()
    assert scanner.feed(b"data: a\n") == []
    assert scanner.feed(b"data: b") == []
    first, second = scanner.feed(b"\n\ndata: c\n\n")
    assert (first.data, second.data) == (b"a\nb", b"c")
    assert scanner.feed(b"") == []
    assert scanner.pending == 0


def test_event_repr_and_equality() -> None:
    a = Event(b"data: x\n\n", b"", b"x")
    assert a == Event(b"data: x\n\n", b"", b"x")
    assert a != Event(b"data: x\r\n\r\n", b"", b"x")
    assert a != (b"data: x\n\n", b"", b"x")
    assert repr(a) == "Event(name=b'', data=b'x')"
    with pytest.raises(TypeError):
        hash(a)


# ---------------------------------------------------------------------------------------
# Every split point of a realistic OpenAI stream

CHAT_STREAM = (
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant"}}],"usage":null}\r\n'
    b"\r\n"
    b": keep-alive\r\n"
    b"\r\n"
    + 'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Héllo 世界"}}]}\r\n'.encode()
    + b"\r\n"
    b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3}}\r\n'
    b"\r\n"
    b"data: [DONE]\r\n"
    b"\r\n"
)


def test_chat_stream_is_realistic() -> None:
    events, scanner = feed_all([CHAT_STREAM])
    assert 250 <= len(CHAT_STREAM) <= 350
    assert [e.data for e in events][-1] == b"[DONE]"
    assert [e.data is None for e in events] == [False, True, False, False, False]
    assert "世界".encode() in events[2].data  # type: ignore[operator]
    assert scanner.pending == 0


def test_every_single_split_point() -> None:
    whole, _ = feed_all([CHAT_STREAM])
    for i in range(len(CHAT_STREAM) + 1):
        events, scanner = feed_all([CHAT_STREAM[:i], CHAT_STREAM[i:]])
        assert events == whole, i
        assert scanner.pending == 0


def test_every_pair_of_split_points() -> None:
    whole, _ = feed_all([CHAT_STREAM])
    n = len(CHAT_STREAM)
    for i in range(n + 1):
        head, rest = CHAT_STREAM[:i], CHAT_STREAM[i:]
        for j in range(i, n + 1):
            scanner = Scanner()
            events = scanner.feed(head)
            events += scanner.feed(rest[: j - i])
            events += scanner.feed(rest[j - i :])
            assert events == whole, (i, j)
            assert scanner.pending == 0


# ---------------------------------------------------------------------------------------
# Properties over random streams, built together with the events they must give

ENDINGS = [b"\r\n", b"\n", b"\r"]
line_text = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
    max_size=12,
).map(str.encode)


@st.composite
def field_lines(draw: st.DrawFn) -> tuple[bytes, str, bytes]:
    """A non-blank line and what it means: ("data" | "event" | "other", value)."""
    kind = draw(st.sampled_from(["data", "data", "event", "comment", "id", "retry", "other"]))
    value = draw(line_text)
    if kind in ("data", "event"):
        form = draw(st.sampled_from(["colon", "colon-space", "bare"]))
        if form == "bare":
            return kind.encode(), kind, b""
        sep = b": " if form == "colon-space" else b":"
        line = kind.encode() + sep + value
        value = line[len(kind) + 1 :]
        return line, kind, value[1:] if value[:1] == b" " else value
    if kind == "comment":
        return b":" + value, "other", b""
    if kind == "id":
        return b"id: " + value, "other", b""
    if kind == "retry":
        return b"retry: " + str(draw(st.integers(0, 10**6))).encode(), "other", b""
    return b"x-" + value.replace(b":", b""), "other", b""


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[tuple[bytes, bytes, bytes | None]]]:
    """A stream and its complete events as (raw, name, data); stray blank lines are
    events of their own, with no data."""
    out: list[tuple[bytes, bytes, bytes | None]] = []
    stream = b""
    for _ in range(draw(st.integers(0, 6))):
        lines = draw(st.lists(field_lines(), max_size=5))
        raw = b""
        name, data = b"", []
        for line, kind, value in lines:
            raw += line + draw(st.sampled_from(ENDINGS))
            if kind == "data":
                data.append(value)
            elif kind == "event":
                name = value
        end = draw(st.sampled_from(ENDINGS))
        if (stream + raw).endswith(b"\r") and end == b"\n":
            end = b"\r\n"  # a \r then a blank \n line would read as one \r\n line end
        raw += end
        stream += raw
        out.append((raw, name, b"\n".join(data) if data else None))
    tail = draw(st.sampled_from([b"", b"data: unfinished", b"data: x\n", b": c\r\n"]))
    return stream + tail, out


@settings(max_examples=examples(150), deadline=None)
@given(built=streams())
def test_whole_stream_gives_the_built_events(
    built: tuple[bytes, list[tuple[bytes, bytes, bytes | None]]],
) -> None:
    stream, expected = built
    events, scanner = feed_all([stream])
    got = [(e.raw, e.name, e.data) for e in events]
    if stream.endswith(b"\r"):
        # The last line end could still turn into \r\n: its event is held back.
        assert got == expected[:-1]
    else:
        assert got == expected
    assert_accounts_for(stream, events, scanner)


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(built=streams(), data=st.data())
def test_any_split_gives_the_same_events(
    built: tuple[bytes, list[tuple[bytes, bytes, bytes | None]]], data: st.DataObject
) -> None:
    stream, _ = built
    whole, whole_scanner = feed_all([stream])
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts")
    events, scanner = feed_all(split_at(stream, cuts))
    assert events == whole
    assert scanner.pending == whole_scanner.pending
    assert_accounts_for(stream, events, scanner)


@settings(max_examples=examples(60), deadline=None)
@given(built=streams())
def test_byte_by_byte_gives_the_same_events(
    built: tuple[bytes, list[tuple[bytes, bytes, bytes | None]]],
) -> None:
    stream, _ = built
    whole, _ = feed_all([stream])
    events, scanner = feed_all([stream[i : i + 1] for i in range(len(stream))])
    assert events == whole
    assert_accounts_for(stream, events, scanner)


@settings(max_examples=examples(100), deadline=None)
@given(stream=st.binary(max_size=200), data=st.data())
def test_arbitrary_bytes_split_anywhere(stream: bytes, data: st.DataObject) -> None:
    """Not even SSE: chunking still never changes the result or loses a byte."""
    whole, _ = feed_all([stream])
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8), label="cuts")
    events, scanner = feed_all(split_at(stream, cuts))
    assert events == whole
    assert_accounts_for(stream, events, scanner)


# ---------------------------------------------------------------------------------------
# Complexity: bytes already searched are not searched again


def test_large_event_fed_one_byte_at_a_time_is_linear() -> None:
    payload = b"x" * 200_000
    stream = b"event: big\r\ndata: " + payload + b"\r\n\r\n"
    scanner = Scanner()
    events: list[Event] = []
    started = time.perf_counter()
    for i in range(len(stream)):
        events += scanner.feed(stream[i : i + 1])
    elapsed = time.perf_counter() - started
    # Linear work takes well under a second; rescanning the line on every byte would
    # take minutes. The bound is only there to tell those two apart.
    assert elapsed < 10, f"{elapsed:.1f}s: the scanner rescans what it already searched"
    assert [(e.name, e.data) for e in events] == [(b"big", payload)]
    assert events[0].raw == stream
    assert scanner.pending == 0


# ---------------------------------------------------------------------------------------
# The Cutter: the same boundaries as the Scanner, in one piece per feed


def cut_all(chunks: list[bytes]) -> tuple[list[bytes], Cutter]:
    cutter = Cutter()
    return [cutter.feed(chunk) for chunk in chunks], cutter


def assert_cuts_like_the_scanner(stream: bytes, chunks: list[bytes]) -> None:
    """The cutter's pieces, joined, are the scanner's events, joined; every piece is a
    run of whole events (``events_in`` finds exactly them); the same bytes wait."""
    events, scanner = feed_all([stream])
    pieces, cutter = cut_all(chunks)
    assert b"".join(pieces) == b"".join(e.raw for e in events)
    assert cutter.pending == scanner.pending
    for piece in pieces:
        assert b"".join(e.raw for e in events_in(piece)) == piece


@pytest.mark.parametrize(("stream", "expected", "pending"), CASES)
def test_cutter_table_whole_and_byte_by_byte(
    stream: bytes, expected: list[tuple[bytes, bytes | None]], pending: int
) -> None:
    assert_cuts_like_the_scanner(stream, [stream])
    assert_cuts_like_the_scanner(stream, [stream[i : i + 1] for i in range(len(stream))])


@pytest.mark.parametrize(("stream", "expected", "pending"), CASES)
def test_events_in_a_cut_piece_are_the_scanners(
    stream: bytes, expected: list[tuple[bytes, bytes | None]], pending: int
) -> None:
    [piece], _ = cut_all([stream])
    events, _ = feed_all([stream])
    assert events_in(piece) == events


def test_events_in_decides_a_final_cr() -> None:
    # The scanner holds a trailing \r back; a cut piece is complete, so it is not.
    assert feed_all([b"data: x\r\r"])[0] == []
    [event] = events_in(b"data: x\r\r")
    assert (event.raw, event.data) == (b"data: x\r\r", b"x")


def test_cutter_returns_whole_chunks_unchanged() -> None:
    chunk = b'data: {"a":1}\n\ndata: {"b":2}\n\n'
    cutter = Cutter()
    assert cutter.feed(chunk) is chunk  # the common case copies nothing
    assert cutter.feed(b'data: {"c"') == b""
    assert cutter.feed(b':3}\n\ndata: {"d"') == b'data: {"c":3}\n\n'
    assert cutter.pending == len(b'data: {"d"')


LF_STREAM = CHAT_STREAM.replace(b"\r\n", b"\n")


@pytest.mark.parametrize("stream", [CHAT_STREAM, LF_STREAM], ids=["crlf", "lf"])
def test_cutter_every_pair_of_split_points(stream: bytes) -> None:
    n = len(stream)
    for i in range(n + 1):
        for j in range(i, n + 1, 3):
            assert_cuts_like_the_scanner(stream, [stream[:i], stream[i:j], stream[j:]])


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(built=streams(), data=st.data())
def test_cutter_any_split_cuts_like_the_scanner(
    built: tuple[bytes, list[tuple[bytes, bytes, bytes | None]]], data: st.DataObject
) -> None:
    stream, _ = built
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts")
    assert_cuts_like_the_scanner(stream, split_at(stream, cuts))


@settings(max_examples=examples(200), deadline=None)
@given(built=streams(), data=st.data())
def test_cutter_any_split_of_an_lf_stream(
    built: tuple[bytes, list[tuple[bytes, bytes, bytes | None]]], data: st.DataObject
) -> None:
    """The same on streams with \\n line ends only: the cutter's own fast path."""
    stream = built[0].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts")
    assert_cuts_like_the_scanner(stream, split_at(stream, cuts))


@settings(max_examples=examples(100), deadline=None)
@given(stream=st.binary(max_size=200), data=st.data())
def test_cutter_arbitrary_bytes_split_anywhere(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8), label="cuts")
    assert_cuts_like_the_scanner(stream, split_at(stream, cuts))


def test_cutter_large_event_fed_one_byte_at_a_time_is_linear() -> None:
    payload = b"x" * 200_000
    stream = b"event: big\ndata: " + payload + b"\n\n"
    cutter = Cutter()
    started = time.perf_counter()
    pieces = [cutter.feed(stream[i : i + 1]) for i in range(len(stream))]
    elapsed = time.perf_counter() - started
    # Linear work takes well under a second; searching the held bytes again on every
    # byte would take minutes. The bound is only there to tell those two apart.
    assert elapsed < 10, f"{elapsed:.1f}s: the cutter rescans what it already searched"
    assert b"".join(pieces) == stream
    assert cutter.pending == 0
