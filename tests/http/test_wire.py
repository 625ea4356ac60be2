"""Request decoding, byte-preserving rewrites and usage extraction on OpenAI wire bodies."""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import BadRequest, render
from proxy.http import reported, wire
from proxy.http.reported import find_usage
from proxy.http.request_body import decode_request, rewrite
from proxy.http.wire import Usage
from tests.support.properties import examples


def raw_fields(body: bytes) -> dict[str, bytes]:
    """Top-level values as their exact bytes."""
    decoded = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
    return {k: bytes(v) for k, v in decoded.items()}


def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate keys in {keys}"
    return dict(pairs)


def loads(body: bytes) -> Any:
    return json.loads(body, object_pairs_hook=no_duplicates)


# ---------------------------------------------------------------------------------------
# decode_request


def test_minimal_request() -> None:
    view = decode_request(b'{"model":"gpt-4o"}')
    assert view.model == "gpt-4o"
    assert view.stream is None
    assert view.stream_options is None
    assert view.max_tokens is None
    assert not view.wants_usage


def test_full_chat_request() -> None:
    body = b"""{
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Hi \\u00e9"}],
        "temperature": 0.70,
        "stream": true,
        "stream_options": {"include_usage": true, "include_obfuscation": false},
        "max_tokens": 256,
        "max_completion_tokens": 300,
        "n": 2,
        "tools": [], "user": "u-1", "metadata": {"k": "v"}
    }"""
    view = decode_request(body)
    assert view.model == "gpt-4o-mini"
    assert view.stream is True
    assert view.max_tokens == 256
    assert view.max_completion_tokens == 300
    assert view.n == 2
    assert view.wants_usage


def test_responses_api_request() -> None:
    view = decode_request(b'{"model":"o4-mini","input":"hi","max_output_tokens":64,"stream":false}')
    assert (view.model, view.max_output_tokens, view.stream) == ("o4-mini", 64, False)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","stream":null,"stream_options":null,"max_tokens":null,"n":null}',
        b'{"model":"m","stream":true,"stream_options":{}}',
        b'{"model":"m","stream":true,"stream_options":{"include_usage":false}}',
    ],
)
def test_no_usage_asked_for(body: bytes) -> None:
    assert not decode_request(body).wants_usage


def test_escaped_model_name_is_decoded() -> None:
    assert decode_request(b' \n{ "model" : "gpt-\\u00e9" } \n').model == "gpt-é"


BAD_BODIES = [
    pytest.param(b"", None, "empty", id="empty"),
    pytest.param(b"not json", None, "not valid JSON", id="not-json"),
    pytest.param(b'{"model": "m"', None, "not valid JSON", id="truncated"),
    pytest.param(b'{"model": "m"} {}', None, "not valid JSON", id="trailing-data"),
    pytest.param(b"\xff\xfe{}", None, "UTF-8", id="not-utf8"),
    # Invalid UTF-8 anywhere, also where the view skips without decoding (issue #23):
    pytest.param(b'{"model":"m\xff"}', None, "UTF-8", id="not-utf8-model"),
    pytest.param(b'{"model":"m","\xff":1}', None, "UTF-8", id="not-utf8-key"),
    pytest.param(b'{"model":"m","stream":true,"\xff":1}', None, "UTF-8", id="not-utf8-key-stream"),
    pytest.param(b'{"model":"m","x":"\xed\xa0\x80"}', None, "UTF-8", id="surrogate-value"),
    pytest.param(b'{"model":"m","x":["\xc3"]}', None, "UTF-8", id="truncated-seq-nested"),
    pytest.param(b'[{"model": "m"}]', None, "object", id="json-array"),
    pytest.param(b'"gpt-4o"', None, "object", id="json-string"),
    pytest.param(b"42", None, "object", id="json-number"),
    pytest.param(b"null", None, "object", id="json-null"),
    pytest.param(b"{}", "model", "model", id="missing-model"),
    pytest.param(b'{"messages": []}', "model", "model", id="missing-model-with-others"),
    pytest.param(b'{"model": 4}', "model", "str", id="model-number"),
    pytest.param(b'{"model": null}', "model", "str", id="model-null"),
    pytest.param(b'{"model": ["m"]}', "model", "str", id="model-array"),
    pytest.param(b'{"model": "m", "stream": "true"}', "stream", "bool", id="stream-string"),
    pytest.param(b'{"model": "m", "stream": 1}', "stream", "bool", id="stream-number"),
    pytest.param(
        b'{"model": "m", "stream_options": "yes"}',
        "stream_options",
        "object",
        id="stream-options-string",
    ),
    pytest.param(
        b'{"model": "m", "stream_options": [true]}',
        "stream_options",
        "object",
        id="stream-options-array",
    ),
    pytest.param(
        b'{"model": "m", "stream_options": {"include_usage": "yes"}}',
        "stream_options.include_usage",
        "bool",
        id="include-usage-string",
    ),
    pytest.param(b'{"model": "m", "max_tokens": "5"}', "max_tokens", "int", id="max-tokens-str"),
    pytest.param(b'{"model": "m", "max_tokens": 1.5}', "max_tokens", "int", id="max-tokens-float"),
    pytest.param(
        b'{"model": "m", "max_completion_tokens": true}',
        "max_completion_tokens",
        "int",
        id="max-completion-tokens-bool",
    ),
    pytest.param(
        b'{"model": "m", "max_output_tokens": {}}',
        "max_output_tokens",
        "int",
        id="max-output-tokens-object",
    ),
    pytest.param(b'{"model": "m", "n": "2"}', "n", "int", id="n-string"),
]


@pytest.mark.parametrize(("body", "param", "words"), BAD_BODIES)
def test_bad_request(body: bytes, param: str | None, words: str) -> None:
    with pytest.raises(BadRequest) as info:
        decode_request(body)
    err = info.value
    assert err.status == 400
    assert err.type == "invalid_request_error"
    assert err.param == param
    assert words in err.message
    if param is not None:
        assert param in err.message
    rendered = json.loads(render(err))
    assert rendered["error"]["param"] == param
    assert rendered["error"]["message"] == err.message


# ---------------------------------------------------------------------------------------
# rewrite: random bodies, written the way clients write them

ws = st.sampled_from(["", " ", "  ", "\n", "\n  ", "\t", "\r\n"])


def _escape_char(c: str, as_unicode: bool) -> str:
    if c in '"\\' or ord(c) < 0x20:
        return f"\\u{ord(c):04x}"
    if as_unicode and ord(c) <= 0xFFFF:
        return f"\\u{ord(c):04x}"
    return c


@st.composite
def json_strings(draw: st.DrawFn, text: st.SearchStrategy[str] | None = None) -> str:
    """A JSON string literal with some characters written as \\uXXXX escapes."""
    chars = draw(text if text is not None else st.text(max_size=8))
    flags = draw(st.lists(st.booleans(), min_size=len(chars), max_size=len(chars)))
    return '"' + "".join(_escape_char(c, f) for c, f in zip(chars, flags, strict=True)) + '"'


json_numbers = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.from_regex(r"-?(0|[1-9][0-9]{0,4})\.[0-9]{0,3}0", fullmatch=True),  # 1.50
    st.from_regex(r"-?[1-9]\.[0-9]{1,3}[eE][+-]?[0-9]{1,2}", fullmatch=True),
    st.sampled_from(["0", "-0", "0.0", "-0.0", "1E2", "1e-7"]),
)
json_scalars = st.one_of(st.sampled_from(["null", "true", "false"]), json_numbers, json_strings())


def _array(items: list[str], pad: list[str]) -> str:
    return "[" + pad[0] + ("," + pad[1]).join(items) + pad[2] + "]"


def _object(pairs: list[tuple[str, str]], pad: list[str]) -> str:
    body = ("," + pad[1]).join(f"{k}{pad[2]}:{pad[3]}{v}" for k, v in pairs)
    return "{" + pad[0] + body + pad[4] + "}"


def _containers(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    pads = st.lists(ws, min_size=5, max_size=5)
    arrays = st.builds(_array, st.lists(children, max_size=4), pads)
    keys = st.lists(st.text(max_size=5), max_size=4, unique=True).flatmap(
        lambda names: st.tuples(*[json_strings(st.just(n)) for n in names])
    )
    objects = st.builds(
        _object,
        keys.flatmap(
            lambda ks: st.tuples(*[st.tuples(st.just(k), children) for k in ks]).map(list)
        ),
        pads,
    )
    return st.one_of(arrays, objects)


json_values = st.recursive(json_scalars, _containers, max_leaves=12)


@st.composite
def request_bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A JSON object with a string ``model`` among other keys, and each value's text."""
    names = draw(
        st.lists(
            st.text(max_size=10).filter(lambda k: k not in ("model", "stream_options")),
            max_size=8,
            unique=True,
        )
    )
    values = {name: draw(json_values) for name in names}
    values["model"] = draw(json_strings())
    if draw(st.booleans()):
        values["stream_options"] = draw(json_values)
    order = draw(st.permutations(list(values)))
    pairs = [(draw(json_strings(st.just(k))), values[k]) for k in order]
    pad = draw(st.lists(ws, min_size=5, max_size=5))
    body = draw(ws) + _object(pairs, pad) + draw(ws)
    return body.encode(), values


@settings(max_examples=examples(150), deadline=None)
@given(built=request_bodies())
def test_rewrite_model_keeps_every_other_value_byte_for_byte(
    built: tuple[bytes, dict[str, str]],
) -> None:
    body, values = built
    out = rewrite(body, model="other", include_usage=False)
    assert loads(out) == {**loads(body), "model": "other"}
    raw = raw_fields(out)
    assert raw["model"] == b'"other"'
    for key, text in values.items():
        if key != "model":
            assert raw[key] == text.encode()
            assert text.encode() in out


@settings(max_examples=examples(50), deadline=None)
@given(built=request_bodies())
def test_rewrite_without_changes_keeps_values(built: tuple[bytes, dict[str, str]]) -> None:
    body, values = built
    out = rewrite(body, model=None, include_usage=False)
    assert loads(out) == loads(body)
    assert raw_fields(out) == {k: v.encode() for k, v in values.items()}


@settings(max_examples=examples(150), deadline=None)
@given(built=request_bodies())
def test_rewrite_asks_for_usage_keeping_every_other_value(
    built: tuple[bytes, dict[str, str]],
) -> None:
    body, values = built
    if "stream_options" in values:  # (theirs, decoded: test_rewrite_switches_on_include_usage)
        return
    out = rewrite(body, model=None, include_usage=True)
    assert loads(out) == {**loads(body), "stream_options": {"include_usage": True}}
    raw = raw_fields(out)
    assert raw.pop("stream_options") == b'{"include_usage":true}'
    assert raw == {k: v.encode() for k, v in values.items()}


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","messages":[{"role":"user","content":"stream_options"}]}',
        b'{"model":"m","stream_options":null}',
        b'{"model":"m", "stream\\u005foptions" : {"include_usage":false}}',
        b' {"model":"m"}\r\n ',
        b'{"model":"m","messages":[{"content":"\\\\u"}]}',
    ],
)
def test_rewrite_asks_for_usage_once(body: bytes) -> None:
    # A key of their own, however spelt, is switched on, never doubled (``loads``).
    out = rewrite(body, model=None, include_usage=True)
    assert loads(out) == {**loads(body), "stream_options": {"include_usage": True}}


def test_rewrite_model_with_characters_that_need_escaping() -> None:
    out = rewrite(b'{"model":"a"}', model='gpt "é" \\ 世界', include_usage=False)
    assert loads(out) == {"model": 'gpt "é" \\ 世界'}


def test_rewrite_adds_model_when_absent() -> None:
    assert loads(rewrite(b'{"input":"x"}', model="m", include_usage=False)) == {
        "input": "x",
        "model": "m",
    }


MESSAGES = b'[ {"role":"user","content":"h\\u00e9llo"} ]'
KEPT = b'"messages": ' + MESSAGES + b', "temperature": 1.50'


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param(None, {"include_usage": True}, id="absent"),
        pytest.param(b"null", {"include_usage": True}, id="null"),
        pytest.param(b"{}", {"include_usage": True}, id="empty"),
        pytest.param(b'{"include_usage": false}', {"include_usage": True}, id="false"),
        pytest.param(b'{"include_usage":true}', {"include_usage": True}, id="already-true"),
        pytest.param(
            b'{"include_obfuscation": false, "x": {"y": [1.50]}}',
            {"include_obfuscation": False, "x": {"y": [1.5]}, "include_usage": True},
            id="other-keys",
        ),
        pytest.param(
            b'{ "include_usage" : false , "include_obfuscation": true }',
            {"include_usage": True, "include_obfuscation": True},
            id="false-with-other-keys",
        ),
    ],
)
def test_rewrite_switches_on_include_usage(options: bytes | None, expected: dict[str, Any]) -> None:
    body = b'{"model": "gpt-4o", "stream": true, ' + KEPT
    if options is not None:
        body += b', "stream_options": ' + options
    body += b"}"
    for model in (None, "other"):
        out = rewrite(body, model=model, include_usage=True)
        decoded = loads(out)  # also: no key twice, in stream_options or at the top
        assert decoded["stream_options"] == expected
        assert decoded["model"] == (model or "gpt-4o")
        assert decoded["stream"] is True
        assert MESSAGES in out  # whitespace and escapes kept
        assert b'"temperature":1.50' in out
        assert decode_request(out).wants_usage


def test_rewrite_keeps_other_stream_options_bytes() -> None:
    body = b'{"model":"m","stream_options":{"x": 1.50, "y":"\\u00e9"}}'
    out = rewrite(body, model=None, include_usage=True)
    options = raw_fields(raw_fields(out)["stream_options"])
    assert options == {"x": b"1.50", "y": b'"\\u00e9"', "include_usage": b"true"}


def test_rewrite_output_is_accepted_by_decode_request() -> None:
    body = b'{"model":"a","stream":true,"stream_options":null,"max_tokens":5}'
    view = decode_request(rewrite(body, model="b", include_usage=True))
    assert (view.model, view.max_tokens, view.wants_usage) == ("b", 5, True)


# ---------------------------------------------------------------------------------------
# find_usage

CHAT_BODY = b"""{
  "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
  "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
               "finish_reason": "stop"}],
  "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}}
}"""
CHUNK = (
    b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
    b'"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]'
)
USAGE_CHUNK = (
    b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21,'
    b'"prompt_tokens_details":{"cached_tokens":4},'
    b'"completion_tokens_details":{"reasoning_tokens":6}}}'
)
EMBEDDINGS = (
    b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2]}],'
    b'"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}'
)
RESPONSE_CREATED = (
    b'{"type":"response.created","sequence_number":0,"response":{"id":"resp_1",'
    b'"object":"response","status":"in_progress","output":[],"usage":null}}'
)
RESPONSE_COMPLETED = (
    b'{"type":"response.completed","sequence_number":9,"response":{"id":"resp_1",'
    b'"object":"response","status":"completed","output":[{"type":"message","content":'
    b'[{"type":"output_text","text":"Hi"}]}],"usage":{"input_tokens":36,'
    b'"input_tokens_details":{"cached_tokens":12},"output_tokens":87,'
    b'"output_tokens_details":{"reasoning_tokens":40},"total_tokens":123}}}'
)


@pytest.mark.parametrize(
    ("payload", "usage", "usage_only"),
    [
        pytest.param(CHAT_BODY, Usage(9, 12, 21, 0, 0, "gpt-4o"), False, id="chat-completion"),
        pytest.param(CHUNK + b"}", None, False, id="chunk-without-usage"),
        pytest.param(CHUNK + b',"usage":null}', None, False, id="chunk-usage-null"),
        pytest.param(CHUNK + b',"usage": null}', None, False, id="chunk-usage-space-null"),
        pytest.param(CHUNK + b',"usage" :\n null}', None, False, id="chunk-usage-ws-null"),
        pytest.param(USAGE_CHUNK, Usage(9, 12, 21, 4, 6, "gpt-4o"), True, id="usage-only-chunk"),
        pytest.param(
            EMBEDDINGS, Usage(8, 0, 8, model="text-embedding-3-small"), False, id="embeddings"
        ),
        pytest.param(RESPONSE_CREATED, None, False, id="responses-created"),
        pytest.param(RESPONSE_COMPLETED, Usage(36, 87, 123, 12, 40), False, id="responses-done"),
        pytest.param(
            b'{"usage":{"prompt_tokens":3,"completion_tokens":4}}',
            Usage(3, 4, 7),
            False,
            id="total-computed-when-missing",
        ),
        pytest.param(
            b'{"usage":{"input_tokens":3,"output_tokens":4,"total_tokens":7}}',
            Usage(3, 4, 7),
            False,
            id="responses-shape-at-top",
        ),
        pytest.param(b'{"usage":{}}', Usage(), False, id="empty-usage"),
        pytest.param(
            b'{"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3,'
            b'"prompt_tokens_details":null,"completion_tokens_details":null}}',
            Usage(1, 2, 3),
            False,
            id="null-details",
        ),
        pytest.param(
            b'{"type":"usage","usage":{"prompt_tokens":1,"total_tokens":1}}',
            Usage(1, 0, 1),
            False,
            id="usage-as-a-string-value-first",
        ),
        pytest.param(
            b'{"metadata":{"usage":"low"},"usage":null}',
            None,
            False,
            id="nested-usage-key-top-level-null",
        ),
        pytest.param(
            b'{"type":"response.completed","response":{"tools":[{"parameters":{"usage":null}}],'
            b'"usage":{"input_tokens":1,"output_tokens":2,"total_tokens":3}}}',
            Usage(1, 2, 3),
            False,
            id="nested-null-before-the-real-usage",
        ),
        pytest.param(
            b'{"type":"response.completed","response":{"model":"gpt-4o-2024-08-06",'
            b'"usage":{"input_tokens":1,"output_tokens":2,"total_tokens":3}}}',
            Usage(1, 2, 3, model="gpt-4o-2024-08-06"),
            False,
            id="responses-model-nested",
        ),
        pytest.param(
            b'{"model":"' + b"m" * 300 + b'","usage":{"prompt_tokens":1,"total_tokens":1}}',
            Usage(1, 0, 1, model="m" * 256),
            False,
            id="model-name-bounded",
        ),
        pytest.param(b'{"usage": {"prompt_tokens": 5', None, False, id="malformed"),
        pytest.param(b'{"usage": {"prompt_tokens": "5"}}', None, False, id="wrong-type"),
        pytest.param(b'{"usage": 5}', None, False, id="usage-not-an-object"),
        pytest.param(b'["usage"]', None, False, id="not-an-object"),
        pytest.param(b"data: [DONE]", None, False, id="done-marker"),
        pytest.param(b"", None, False, id="empty"),
        pytest.param(
            CHUNK[:-1] + b',"delta":{"content":"the \\"usage\\": {\\"prompt_tokens\\": 1}"}]}',
            None,
            False,
            id="escaped-usage-in-content",
        ),
        pytest.param(
            b'{"choices":[{"delta":{"content":"\\"usage\\""}}],"usage":null}',
            None,
            False,
            id="escaped-usage-then-null",
        ),
    ],
)
def test_find_usage(payload: bytes, usage: Usage | None, usage_only: bool) -> None:
    assert find_usage(payload)[:2] == (usage, usage_only)


RAW = msgspec.json.Decoder(msgspec.Raw)


def well_formed(payload: bytes) -> bool:
    try:
        RAW.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


USAGE = b'"usage":{"prompt_tokens":1}'


@pytest.mark.parametrize(
    "payload",
    [
        CHAT_BODY,
        USAGE_CHUNK,
        RESPONSE_COMPLETED,
        b'{"usage":{"prompt_tokens":"5"}}',
        b'{"usage":5}',
        b'["usage"]',
        b'{"a":[1,2,,3],' + USAGE + b"}",
        b'{"a":"\\q",' + USAGE + b"}",
        b'{"a":"\\ud800",' + USAGE + b"}",
        b'{"a":"x\x01",' + USAGE + b"}",
        b'{"a":"\xff",' + USAGE + b"}",
        b'{"a":01,' + USAGE + b"}",
        b'{"a":tru,' + USAGE + b"}",
        b'{"a":1e,' + USAGE + b"}",
        b'{"a":1,"a":2,' + USAGE + b"}",
        b"{" + USAGE + b',"usage":5}',
        b"{" + USAGE + b"} x",
        b'{"choices":' + b"[" * 5000 + b"]" * 5000 + b"," + USAGE + b"}",
    ],
)
def test_find_usage_says_decoded_only_of_well_formed_json(payload: bytes) -> None:
    """The relay checks an answer or event for well-formed JSON only where
    ``find_usage`` did not decode it whole (relay._usage_of): a decode it says went
    through must be one the raw validation passes."""
    usage, _, parsed = find_usage(payload)
    if parsed:
        assert well_formed(payload)
    else:
        assert usage is None


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=examples(300), deadline=None)
@given(value=JSON, at=st.integers(0, 10**6), byte=st.integers(0, 255), spoil=st.booleans())
def test_find_usage_decodes_whole_only_what_is_well_formed(
    value: Any, at: int, byte: int, spoil: bool
) -> None:
    """An answer with a usage, one byte of it maybe replaced: where ``find_usage``
    says it decoded it, it is well-formed JSON."""
    payload = json.dumps({"x": value, "usage": {"prompt_tokens": 1}}).encode()
    if spoil:
        at %= len(payload)
        payload = payload[:at] + bytes([byte]) + payload[at + 1 :]
    if find_usage(payload)[2]:
        assert well_formed(payload)


@settings(max_examples=examples(200), deadline=None)
@given(
    before=st.binary(max_size=40),
    after=st.binary(max_size=40),
    key=st.sampled_from([b'"usage"', b'"usage":', b'"usage":null', b'"usage":{']),
)
def test_find_usage_never_raises(before: bytes, after: bytes, key: bytes) -> None:
    usage, usage_only, parsed = find_usage(before + key + after)
    assert usage is None or isinstance(usage, Usage)
    assert isinstance(usage_only, bool)
    assert isinstance(parsed, bool)


@settings(max_examples=examples(100), deadline=None)
@given(
    counts=st.tuples(*[st.integers(0, 10**9)] * 4),
    responses=st.booleans(),
    spaced=st.booleans(),
)
def test_find_usage_reads_the_counts(
    counts: tuple[int, int, int, int], responses: bool, spaced: bool
) -> None:
    prompt, completion, cached, reasoning = counts
    total = prompt + completion
    if responses:
        wire = {
            "input_tokens": prompt,
            "output_tokens": completion,
            "total_tokens": total,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens_details": {"reasoning_tokens": reasoning},
        }
        payload: dict[str, Any] = {"type": "response.completed", "response": {"usage": wire}}
    else:
        wire = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": total,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }
        payload = {"choices": [], "usage": wire}
    text = json.dumps(payload, indent=1 if spaced else None).encode()
    expected = Usage(prompt, completion, total, cached, reasoning)
    assert find_usage(text) == (expected, not responses, True)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "allowed", "model": "other"}',
        b'{"model": "allowed", "m\\u006fdel": "other"}',
        b'{"mod\\u0065l": "other", "messages": [], "model": "allowed"}',
    ],
)
def test_a_second_top_level_model_is_refused(body: bytes) -> None:
    # Parsers disagree on which duplicate wins: the proxy must not check one model
    # and forward a body an upstream could read as another.
    with pytest.raises(BadRequest) as caught:
        decode_request(body)
    assert caught.value.param == "model"


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "a", "tools": [{"parameters": {"model": 1}}, {"model": 2}]}',
        b'{"model": "a", "messages": [{"content": "caf\\u00e9 \\u00fc"}]}',
    ],
)
def test_nested_models_and_escapes_are_fine(body: bytes) -> None:
    assert decode_request(body).model == "a"


@pytest.mark.parametrize(
    ("given", "kept"),
    [(None, 0), (-5, 0), (0, 0), (7, 7), (wire.MAX_COUNT, wire.MAX_COUNT), (2**60, wire.MAX_COUNT)],
)
def test_an_upstream_count_is_kept_within_bounds(given: int | None, kept: int) -> None:
    assert reported._count(given) == kept


@settings(max_examples=examples(300), deadline=None)
@given(
    payload=st.lists(
        st.sampled_from([b":", b" ", b"\t", b"\r", b"\n", b"null", b"nul", b"n", b"{", b"x"]),
        max_size=8,
    ).map(b"".join),
    at=st.integers(0, 12),
)
def test_null_after_is_a_colon_and_spaces_then_null(payload: bytes, at: int) -> None:
    """``null_after`` (byte tests) says what its regular expression would."""
    spec = re.compile(rb"[ \t\r\n:]*null")
    assert reported.null_after(payload, at) is (spec.match(payload, at) is not None)


@pytest.mark.parametrize(
    ("payload", "null"),
    [
        (b'"usage":null}', True),
        (b'"usage": null}', True),
        (b'"usage" :\n\tnull', True),
        (b'"usage":nul', False),  # cut short
        (b'"usage":{"prompt_tokens":1}', False),
        (b'"usage":"null"', False),
        (b'"usage"', False),
    ],
)
def test_null_after(payload: bytes, null: bool) -> None:
    assert reported.null_after(payload, len(b'"usage"')) is null
