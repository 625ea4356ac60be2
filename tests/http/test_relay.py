"""The relay's reading of a stream (``relay._Watch``): the per-read path over plain
events must come to what reading event by event comes to, however the stream is split
into reads — except that a plain event's JSON is not parsed (the tests at the end say
what is still caught). No sockets: the relay's loop over reads, with the same parts."""

from __future__ import annotations

import itertools
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import UpstreamProtocolError
from proxy.exchange import Exchange
from proxy.http import relay, scan
from proxy.http.relay import _Watch, _without_null_usage
from proxy.http.sse import Cutter, Scanner
from tests.support.properties import examples

Outcome = tuple[bytes, object, int, bool, str, bool]


def lone_data(rest: bytes) -> bytes | None:
    """What the C scan gives as ``data`` (proxy/http/_plain.c), said another way: the
    data of ``rest`` when the SSE parser finds it one event of one ``data: `` line
    (its bytes as they are), alone or before a last ``data: [DONE]``."""
    scanner = Scanner()
    events = scanner.feed(rest)
    if b"\r" in rest or scanner.pending:
        return None
    if len(events) == 2 and events[1].raw == DONE:
        events.pop()
    if len(events) != 1 or not events[0].raw.startswith(b"data: "):
        return None
    (event,) = events
    return event.data if event.raw == b"data: " + (event.data or b"") + b"\n\n" else None


def with_data(block: bytes, strip: bool) -> tuple[bytes, int, bytes, bytes | None]:
    """The Python scan, with the C scan's ``data`` (``lone_data``)."""
    head, count, rest, _ = scan.run_by_counts(block, strip)
    return head, count, rest, lone_data(rest)


def per_read(chunks: list[bytes], strip: bool) -> Outcome:
    """What the relay does: cut each read at event boundaries, take the block. The
    same with the Python scan giving ``data`` as the C scan does, so that the relay's
    reading of it is tested where the C scan is not built."""
    as_built = read_by_read(chunks, strip)
    with mock.patch.object(relay, "plain_run", with_data):
        assert read_by_read(chunks, strip) == as_built
    return as_built


def read_by_read(chunks: list[bytes], strip: bool) -> Outcome:
    watch = _Watch(Exchange("r", "chat/completions"), strip)
    cutter = Cutter()
    sent: list[bytes] = []
    try:
        for chunk in chunks:
            block = cutter.feed(chunk)
            if block:
                watch.take(block, sent)
    except UpstreamProtocolError:
        return outcome(sent, watch, failed=True)
    return outcome(sent, watch, failed=False)


def per_event(chunks: list[bytes], strip: bool) -> Outcome:
    """The reference: every event parsed and read on its own."""
    watch = _Watch(Exchange("r", "chat/completions"), strip)
    sent: list[bytes] = []
    try:
        for event in Scanner().feed(b"".join(chunks)):
            raw = watch.keep(event.raw, event.name, event.data)
            if raw is not None:
                sent.append(raw)
    except UpstreamProtocolError:
        return outcome(sent, watch, failed=True)
    return outcome(sent, watch, failed=False)


def outcome(sent: list[bytes], watch: _Watch, failed: bool) -> Outcome:
    exchange = watch.exchange
    return (
        b"".join(sent),
        exchange.usage,
        exchange.events,
        watch.finished,
        exchange.error_name,
        failed,
    )


def chunk(i: int, usage: str = ',"usage":null') -> bytes:
    return (
        b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,'
        b'"delta":{"content":"t%d"},"finish_reason":null}]%s}\n\n' % (i, usage.encode())
    )


USAGE_CHUNK = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}\n\n'
)
DONE = b"data: [DONE]\n\n"
SPACED_USAGE = b'data: {"choices":[],"usage": {"prompt_tokens":4,"completion_tokens":1}}\n\n'
CONTENT_USAGE = b'data: {"usage":{"prompt_tokens":1},"choices":[{"x":1}]}\n\n'
# Events a stream may hold: plain ones, and every kind the proxy must read or that is
# not plain (comments, names, no space after the colon, multi-line data, broken JSON).
EVENTS = [
    chunk(1),
    chunk(2),
    chunk(3, ', "usage": null'),
    chunk(4, ""),
    chunk(5, ',"usage":null,"x":"data: {\\"error\\"}"'),
    USAGE_CHUNK,
    DONE,
    b": keep-alive\n\n",
    b'data:{"no":"space"}\n\n',
    b'data: {"a":\ndata: 1}\n\n',
    b'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n',
    b"data: {not json\n\n",
    b"data: {\n\n",
    b"data: [1, 2}\n\n",
    CONTENT_USAGE,
    b'data: {"choices":[],"usage":{"prompt_tokens":2}}\r\n\r\n',
    SPACED_USAGE,
    b"event: response.completed\ndata: {}\n\n",
    b"\n",
    b'data: {"usage":null}\n\n',  # a null in no spelling that is stripped
    # The C scan finds a key by its 'g': g's in the content, a key among them
    b'data: {"choices":[{"delta":{"content":"big \\"usage\\" egg"}}],"usage":null}\n\n',
    b'data: {"g":"usagg","usage":{"prompt_tokens":3},"choices":[]}\n\n',
]


@st.composite
def split_streams(draw: st.DrawFn) -> list[bytes]:
    plain = st.sampled_from(EVENTS[:5])
    events = draw(st.lists(st.one_of(plain, plain, plain, st.sampled_from(EVENTS)), max_size=14))
    stream = b"".join(events) + draw(st.sampled_from([b"", b"data: {", b"data: {}\n"]))
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=split_streams(), strip=st.booleans())
def test_reading_per_read_comes_to_reading_per_event(chunks: list[bytes], strip: bool) -> None:
    assert per_read(chunks, strip) == per_event(chunks, strip)


@pytest.mark.parametrize("strip", [False, True])
def test_a_whole_stream_in_one_read(strip: bool) -> None:
    stream = b"".join([chunk(i) for i in range(60)]) + USAGE_CHUNK + DONE
    sent, usage, events, finished, error, failed = per_read([stream], strip)
    assert (usage is not None, events, finished, error, failed) == (True, 61, True, "", False)
    if strip:  # the client gets exactly the stream it asked for
        assert sent == b"".join([chunk(i, "") for i in range(60)]) + DONE
    else:
        assert sent == stream


@pytest.mark.parametrize("strip", [False, True])
def test_boundaries_counted_with_nulls_past_the_plain_events_are_not_theirs(strip: bool) -> None:
    """The event boundaries counted together with the null usage before each
    (scan.py) may lie among the events read, here after a malformed one: the plain
    events before it are not taken to have them (the wide search found this)."""
    stream = chunk(1) + b"data: [1, 2}\n\n" + USAGE_CHUNK + chunk(1) + chunk(1)
    assert per_read([stream], strip) == per_event([stream], strip)
    assert per_read([stream], strip)[-1] is True  # the malformed event is caught


@pytest.mark.parametrize(
    "strip_and_tail",
    [(False, b""), (True, b""), (False, DONE), (True, DONE)],
    ids=["mid-stream", "mid-stream-stripped", "last", "last-stripped"],
)
def test_nulls_in_the_middle_of_each_event(strip_and_tail: tuple[bool, bytes]) -> None:
    """Upstreams that do not put usage last: the nulls are counted apart (Python's
    scan) or the events parsed (the C scan), and either comes to reading per event."""
    strip, tail = strip_and_tail
    odd = [chunk(i, "").replace(b'"choices"', b'"usage":null,"choices"') for i in range(9)]
    for reads in ([b"".join(odd) + tail], [*odd, tail], [odd[0] + USAGE_CHUNK + tail]):
        assert per_read(reads, strip) == per_event(reads, strip)


@pytest.mark.parametrize("strip", [False, True])
@pytest.mark.parametrize("null", [b',"usage":null', b', "usage": null'])
def test_events_with_the_null_usage_last_are_plain(strip: bool, null: bytes) -> None:
    """Relayed as plain events by either scan, one read of them or many: unparsed, as
    such a malformed one shows (what_a_plain_event_may_hide), the null stripped."""
    hidden = b'data: {"a":1,%b}\n\n' % null
    sent = hidden.replace(null, b"") if strip else hidden
    for count in (1, 3):
        assert per_read([hidden * count], strip) == (sent * count, None, count, False, "", False)
    then_usage = per_read([hidden * 2 + USAGE_CHUNK], strip)
    assert then_usage[0] == sent * 2 + (b"" if strip else USAGE_CHUNK)
    assert then_usage[1:] == (per_event([USAGE_CHUNK], strip)[1], 3, False, "", False)


@pytest.mark.parametrize(
    "usages",
    [
        [USAGE_CHUNK],
        [SPACED_USAGE],
        [CONTENT_USAGE, USAGE_CHUNK],  # the last is found first; parsed from the first
        [SPACED_USAGE, USAGE_CHUNK],
        [USAGE_CHUNK, SPACED_USAGE],
        [CONTENT_USAGE, chunk(9), chunk(10, ', "usage": null'), USAGE_CHUNK],
    ],
    ids=["last", "spaced", "two", "spaced-first", "spaced-last", "far-apart"],
)
@pytest.mark.parametrize("strip", [False, True])
def test_usage_found_from_the_end_of_a_read(usages: list[bytes], strip: bool) -> None:
    """The usage chunk is looked for from the end of a read; a usage before it (of
    either form) moves the parsing back to the first, as reading per event does."""
    stream = b"".join([chunk(i) for i in range(8)]) + b"".join(usages) + DONE
    assert per_read([stream], strip) == per_event([stream], strip)
    assert per_read([stream], strip)[1] is not None


@pytest.mark.parametrize("strip", [False, True])
@pytest.mark.parametrize(
    "content", ["g", "gg", "usage", "usag", '\\"usage\\"', 'g\\"usage\\"g', "egg" * 30]
)
def test_a_usage_key_among_gs(strip: bool, content: str) -> None:
    """The C scan looks for a "usage" key at each 'g' of an event: a token's g's, or
    the word in the text, neither hide the key nor make one."""
    text = content.encode()
    plain = chunk(1).replace(b'"t1"', b'"%b"' % text)
    usage = plain.replace(b'"usage":null', b'"usage":{"prompt_tokens":2}')
    for stream in (plain * 3 + DONE, plain + usage + plain + DONE, usage + plain):
        assert per_read([stream], strip) == per_event([stream], strip)
    assert per_read([plain + usage], strip)[1] is not None
    assert per_read([plain * 2], strip)[2] == 2


@pytest.mark.parametrize("strip", [False, True])
def test_a_null_of_another_spelling_last_is_no_usage(strip: bool) -> None:
    """One key left after counting (or stripping) the usual null, the last: it is a
    null too, not the usage chunk's, and the client does not get it when stripped."""
    stream = b"".join([chunk(i) for i in range(8)]) + chunk(8, ', "usage": null') + DONE
    assert per_read([stream], strip) == per_event([stream], strip)
    sent, usage, *_ = per_read([stream], strip)
    assert usage is None
    assert (b'"usage"' in sent) is not strip


def test_an_event_read_is_checked_as_the_client_gets_it() -> None:
    """With the usage stripped, the check is on the bytes the client gets: the same
    event is valid stripped and malformed as it came."""
    odd = b'data: {,"usage":null}\n\n'  # read: it comes after the usage chunk
    stream = chunk(1) + USAGE_CHUNK + odd + DONE
    for strip in (False, True):
        assert per_read([stream], strip) == per_event([stream], strip)
    sent, *_, failed = per_read([stream], strip=True)
    assert not failed
    assert sent == chunk(1, "") + b"data: {}\n\n" + DONE
    assert per_read([stream], strip=False)[-1] is True


def test_events_before_a_malformed_one_in_the_same_read_are_kept() -> None:
    stream = chunk(1) + chunk(2) + b"data: {not json\n\n" + chunk(3)
    sent, _, events, _, _, failed = per_read([stream], strip=False)
    assert failed
    assert sent == chunk(1) + chunk(2)
    assert events == 2


@pytest.mark.parametrize(
    "bad",
    [
        b"data: {not json\n\n",  # text that is no object
        b'data: {"id":"c1","choices":[{"delta":{"content":"x\n\n',  # cut short
        b"data: {\n\n",
        b"data: <html>\n\n",
        b'data: {"a":1}\ndata: {"b":2}\n\n',  # two values in one event
        b'data: {"choices":[],"usage":{"prompt_tokens":1}} x\n\n',  # the events read
        b'data: {"error":{"message":"x"}\n\n',
    ],
)
def test_malformed_events_that_are_caught(bad: bytes) -> None:
    """Any event that does not end with ``}`` on its one line, and any event the proxy
    reads (usage, errors, anything but plain ``data: {...}`` lines) is checked."""
    for before, after in [(b"", b""), (chunk(1), b""), (b"", chunk(2)), (chunk(1), chunk(2))]:
        sent, *_, failed = per_read([before + bad + after], strip=False)
        assert failed, (before, bad, after)
        assert sent == before


def test_what_a_plain_event_may_hide() -> None:
    """A plain event's JSON is not parsed (that is what makes the relay cost per read
    rather than per event): one that starts with ``{`` and ends with ``}`` on its one
    line goes to the client as the upstream sent it."""
    odd = b'data: {"a":1,}\n\n'
    sent, *_, failed = per_read([chunk(1) + odd + chunk(2)], strip=False)
    assert (sent, failed) == (chunk(1) + odd + chunk(2), False)


@st.composite
def blocks(draw: st.DrawFn) -> bytes:
    """Events of every kind and stray bytes, mostly ``\\n``-heavy."""
    part = st.one_of(
        st.sampled_from(EVENTS),
        st.sampled_from([b"\n", b"\n\n", b"}", b"data: {", b'"usage"', b"null}", b"\r"]),
        st.binary(max_size=12),
    )
    return b"".join(draw(st.lists(part, max_size=12)))


@settings(max_examples=examples(500), deadline=None)
@given(block=blocks(), strip=st.booleans())
def test_a_plain_run_is_a_prefix_of_the_read(block: bytes, strip: bool) -> None:
    """Whatever the bytes (the C scan reads them by pointer): the plain events and
    the rest are the read, the head less its stripped nulls; each plain event one
    ``data: {...}`` line. (Python's scan may strip the rest too; keep strips it
    again, to the same bytes.)"""
    strip_if = _without_null_usage if strip else bytes
    for plain_run in (scan.plain_run, scan.run_by_counts):
        head, count, rest, data = plain_run(block, strip)
        assert data == (lone_data(rest) if plain_run is not scan.run_by_counts else None)
        assert strip_if(head + rest) == strip_if(block)
        assert head == strip_if(head)
        if plain_run is not scan.run_by_counts:  # the C scan's rest is the read's
            assert block.endswith(rest)
        if count:
            assert head.count(b"\n\n") == count == head.count(b"\ndata: {") + 1
        else:
            assert head == b""
