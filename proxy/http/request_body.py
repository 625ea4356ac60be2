"""The client's request body: the view the proxy acts on, decoded once
(``decode_request``), and, where a field must change for an upstream, the bytes it gets
(``rewrite``: only that field's bytes change; every other top-level value is carried
over verbatim as ``msgspec.Raw``). The structs are wire.py's, which mypyc cannot
compile (msgspec resolves their fields from the annotations); this module runs for
every request and is compiled with the hot path (setup.py).
"""

from __future__ import annotations

import json
from typing import Final

import msgspec

from ..errors import BadRequest
from .wire import RequestView

_view_decoder: Final = msgspec.json.Decoder(RequestView)
_raw_object_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
# ``stream_options`` may be ``null``, which the request view accepts too.
_raw_options_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw] | None)
_encoder = msgspec.json.Encoder()
_INCLUDE_USAGE = msgspec.Raw(b'{"include_usage":true}')
_TRUE = msgspec.Raw(b"true")


def decode_request(body: bytes) -> RequestView:
    """Decode the view, turning every decoding problem into a 400 naming the field."""
    if not body:
        raise BadRequest("The request body is empty; expected a JSON object.")
    if not body.isascii():  # C-speed; most bodies are ASCII and skip the decode below
        # JSON is UTF-8 (RFC 8259). msgspec checks only the strings it decodes, so bytes
        # in a skipped key or value would otherwise reach the upstream (or ``rewrite``).
        try:
            body.decode()
        except UnicodeDecodeError:
            raise BadRequest(_NOT_UTF8) from None
    try:
        view = _view_decoder.decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        raise BadRequest(f"Invalid request body: {message}", param=_param_of(message)) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(_TOO_DEEP) from None
    if "\x00" in view.model:  # no upstream has such a model; PostgreSQL text cannot hold it
        raise BadRequest("The model name contains a NUL character.", param="model")
    if _may_repeat_model(body) and _repeats_model(body):
        raise BadRequest("The request body names `model` more than once.", param="model")
    return view


def _may_repeat_model(body: bytes) -> bool:
    """Cheap test (two C-speed scans) for bodies that could hold a second top-level
    ``model``: the literal key twice, or a ``\\u00`` escape, the only way to spell a
    letter of "model" differently. JSON parsers disagree on which duplicate wins; the
    proxy checks permissions and prices on the last one (as msgspec reads it), so an
    upstream that took the first could serve a model nobody checked."""
    return body.count(b'"model"') > 1 or body.find(b"\\u00") >= 0


def _repeats_model(body: bytes) -> bool:
    """The exact check, for the few bodies ``_may_repeat_model`` lets through."""
    objects: list[list[tuple[str, object]]] = []

    def keep(pairs: list[tuple[str, object]]) -> object:
        objects.append(pairs)
        return pairs

    try:
        json.loads(body, object_pairs_hook=keep)
    except (ValueError, RecursionError):
        return False  # msgspec accepted it; nothing more to learn here
    return sum(key == "model" for key, _ in objects[-1]) > 1


# msgspec's nesting limit is Python's recursion limit, so it depends on the stack depth
# of the caller: a body ``decode_request`` just took may still be too deep for
# ``rewrite`` further down the stack. Both say the same 400.
_TOO_DEEP: Final = "The request body is nested too deeply."
_NOT_UTF8: Final = "The request body is not valid UTF-8."


def _param_of(message: str) -> str | None:
    """The dotted path of the field a msgspec validation message is about, if any."""
    path = message.rpartition("`$.")[2].rstrip("`") if "`$." in message else None
    # "Object missing required field `model`" names the field only in the text.
    _, found, rest = message.partition("missing required field `")
    if found:
        field = rest.partition("`")[0]
        return f"{path}.{field}" if path else field
    return path


def rewrite(body: bytes, *, model: str | None, include_usage: bool) -> bytes:
    """Replace the top-level ``model`` and/or switch on ``stream_options.include_usage``,
    keeping every other top-level value byte for byte. The body has passed
    ``decode_request`` (valid UTF-8 and JSON), so only its depth can still fail here."""
    if model is None and include_usage:
        appended = _usage_appended(body)
        if appended is not None:
            return appended
    try:
        fields = _raw_object_decoder.decode(body)
        current = fields.get("stream_options") if include_usage else None
        options = _raw_options_decoder.decode(current) if current is not None else None
    except RecursionError:
        raise BadRequest(_TOO_DEEP) from None
    if model is not None:
        fields["model"] = msgspec.Raw(_encoder.encode(model))
    if include_usage:
        if not options:  # absent, null or {}
            fields["stream_options"] = _INCLUDE_USAGE
        else:
            # The client's other options stay byte for byte, like the top-level values.
            options["include_usage"] = _TRUE
            fields["stream_options"] = msgspec.Raw(_encoder.encode(options))
    return _encoder.encode(fields)


# JSON's whitespace, and the member that asks for usage, last in the object.
_WS: Final = b" \t\r\n"
_USAGE_MEMBER: Final = b',"stream_options":{"include_usage":true}}'


def _usage_appended(body: bytes) -> bytes | None:
    """``body`` (a JSON object) with ``stream_options`` asking for usage as its last
    member, where its bytes show it has no such key of its own: no
    ``"stream_options"`` in it, and no ``\\u`` escape, by which a key could spell it
    otherwise. Else None. Decoding every member and encoding them again cost ~9,000
    instructions a stream whose usage the proxy asks for (callgrind, bench/RESULTS.md)."""
    if body.find(b'"stream_options"') >= 0 or body.find(b"\\u") >= 0:
        return None
    end = len(body.rstrip(_WS)) - 1  # the object's closing brace
    if end < 1 or body[end] != 0x7D or body[:end].rstrip(_WS).endswith(b"{"):
        return None  # not an object, or an empty one: no comma to write
    return body[:end] + _USAGE_MEMBER + body[end + 1 :]
