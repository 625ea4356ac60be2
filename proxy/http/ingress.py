"""The edge where client bytes come in: what aiohttp's HTTP parser refuses, the framing
and coding of request bodies, CORS, the ``Server`` header and the forwarding headers.

Invariants:
- Every refusal is an OpenAI-shaped JSON error with the fitting status (400, 411, 413,
  414, 415, 431, 501) and a fixed message: none quotes the input (aiohttp's own
  answers are ``text/plain`` and echo the offending line).
- Request bodies reach the handler decoded: aiohttp decodes gzip, deflate and br (and
  zstd when its library is installed) as the bytes arrive, in bounded steps, and
  ``read_request_body`` stops at ``max_body_bytes`` of decoded bytes, so a zip bomb is a
  413. Upstreams get the decoded body without ``Content-Encoding``.
- ``X-Forwarded-For``, ``Forwarded``, ``X-Real-IP`` and ``Via`` from a client are kept
  only when it is one of ``server.trusted_proxies``; the peer's address is always
  appended to ``X-Forwarded-For``.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from aiohttp import web
from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD
from aiohttp.http_exceptions import (
    BadHttpMethod,
    ContentEncodingError,
    HttpProcessingError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from multidict import CIMultiDict, CIMultiDictProxy

from ..config.schema import Cors, Server
from ..errors import (
    BadRequest,
    BodyTooLarge,
    Forbidden,
    HeadersTooLarge,
    LengthRequired,
    NotImplementedByProxy,
    ProxyError,
    RequestTimeout,
    UnsupportedEncoding,
    UriTooLong,
    render,
)

# What the proxy says it is: no version (it only helps someone looking for a known bug).
SERVER = "morngpt"
_JSON = "application/json"

# Request codings aiohttp decodes itself (``identity`` means none).
DECODED = frozenset(
    ("gzip", "deflate", *(("br",) if HAS_BROTLI else ()), *(("zstd",) if HAS_ZSTD else ()))
)
_NOT_DECODABLE = "The request body does not decode under its Content-Encoding."

# Methods no route of the proxy can mean (RFC 9110 §9.1: 501 for a method it does not
# implement); any other method on an unknown path is a 404.
UNIMPLEMENTED_METHODS = frozenset(("CONNECT", "TRACE"))


# -- what the parser refuses ---------------------------------------------------------------

INVALID_HTTP = "invalid_http"  # the code of a 400 for bytes that are not HTTP/1.1


def parse_refusal(exc: HttpProcessingError) -> ProxyError:
    """The OpenAI-shaped error for a request aiohttp's parser refused."""
    if isinstance(exc, LineTooLong):
        # The C parser reports the request target from its bytearray buffer, header
        # lines as bytes. (aiohttp's pure-Python parser, used only without its C
        # extension, reports both as bytes: a long URL then reads as a 431.)
        if isinstance(exc.args[0], bytearray):
            return UriTooLong("The request URL is too long.")
        return HeadersTooLarge("A request header is too large.")
    text = exc.message if isinstance(exc.message, str) else ""
    if text.startswith("Too many headers"):
        return HeadersTooLarge("The request has too many headers.")
    if isinstance(exc, ContentEncodingError):
        return UnsupportedEncoding("The request's Content-Encoding is not supported.")
    if "Transfer-Encoding" in text and "Content-Length" not in text:
        return NotImplementedByProxy("The request's Transfer-Encoding is not supported.")
    if isinstance(exc, BadHttpMethod):
        return BadRequest("The request line is not valid HTTP.", code=INVALID_HTTP)
    return BadRequest("The request is not valid HTTP/1.1.", code=INVALID_HTTP)


class Handler(RequestHandler):
    """aiohttp's connection handler with the proxy's error answers (see module doc)."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp logs it (redact.py turns a malformed request into one INFO line) and
        # raises if a response has begun; its text/plain answer is replaced.
        super().handle_error(request, status, exc, message)
        if isinstance(exc, HttpProcessingError):
            err = parse_refusal(exc)
        else:
            err = ProxyError("The proxy failed to handle this request.")
        response = web.Response(
            body=render(err),
            status=err.status,
            content_type=_JSON,
            headers={"Server": SERVER},
        )
        response.force_close()
        return response


# -- request bodies ------------------------------------------------------------------------


def check_framing(request: web.Request, server: Server) -> None:
    """Refuse, before reading anything, a body the proxy will not take: a coding it
    cannot decode (415), no length at all (411), a declared length over the limit
    (413, at once rather than after the body timeout)."""
    coding = request.headers.get("Content-Encoding")
    if coding is not None:
        coding = coding.strip().lower()
        if coding != "identity" and coding not in DECODED:
            raise UnsupportedEncoding(
                "The request's Content-Encoding is not supported; use "
                + ", ".join(sorted(DECODED))
                + " or none.",
            )
    length = request.content_length
    if length is None and "Transfer-Encoding" not in request.headers:
        raise LengthRequired("The request needs a Content-Length (or chunked encoding).")
    if length is not None and length > server.max_body_bytes and coding in (None, "identity"):
        raise BodyTooLarge(f"The request body is larger than {server.max_body_bytes} bytes.")


def late_body(timeout: float) -> RequestTimeout:
    """The 408 for a body that did not all arrive within ``timeout`` seconds."""
    return RequestTimeout(f"The request body did not arrive within {timeout:g}s.")


def body_refusal(exc: HttpProcessingError | RequestPayloadError) -> BadRequest:
    """The 400 for a body aiohttp could not take apart (coding, chunking, length)."""
    if isinstance(exc, ContentEncodingError) or isinstance(exc.__cause__, ContentEncodingError):
        return BadRequest(_NOT_DECODABLE)
    return BadRequest("The request body is not framed as its headers say.")


async def read_request_body(request: web.Request, server: Server) -> bytes:
    """The request body, decoded, within the size and time limits of ``server``."""
    size = sum(len(k) + len(v) for k, v in request.raw_headers)
    if size > server.max_header_bytes:
        raise HeadersTooLarge(
            f"Request headers are too large ({size} bytes; limit {server.max_header_bytes})."
        )
    check_framing(request, server)
    try:
        content = request.content
        if content.is_eof():  # all of it came with the headers: nothing to wait for
            body = content.read_nowait()  # what request.read() would join, at once
            if len(body) > server.max_body_bytes:
                raise BodyTooLarge(
                    f"The request body is larger than {server.max_body_bytes} bytes."
                )
            return body
        async with asyncio.timeout(server.body_timeout):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(
            f"The request body is larger than {server.max_body_bytes} bytes."
        ) from None
    except TimeoutError:
        raise late_body(server.body_timeout) from None
    except (HttpProcessingError, RequestPayloadError) as exc:
        raise body_refusal(exc) from None


# -- response headers: Server, CORS --------------------------------------------------------


class Cross:
    """CORS for browser apps: the headers on every answer to an allowed origin, and the
    preflight handler. Built once from ``server.cors``."""

    def __init__(self, cors: Cors) -> None:
        self.any_origin = "*" in cors.allow_origins
        self.origins = frozenset(cors.allow_origins)
        self.methods = ", ".join(m.upper() for m in cors.allow_methods)
        self.method_set = frozenset(m.upper() for m in cors.allow_methods)
        self.any_header = "*" in cors.allow_headers
        self.headers = ", ".join(cors.allow_headers)
        self.expose = ", ".join(cors.expose_headers)
        self.max_age = str(cors.max_age)

    def allows(self, origin: str | None) -> bool:
        return origin is not None and (self.any_origin or origin in self.origins)

    def lines(self, origin: str) -> list[str]:
        """``decorate``'s headers as head lines (lean.py writes heads itself)."""
        lines = [f"Access-Control-Allow-Origin: {origin}", "Vary: Origin"]
        if self.expose:
            lines.append(f"Access-Control-Expose-Headers: {self.expose}")
        return lines

    def decorate(self, origin: str, headers: CIMultiDict[str]) -> None:
        """The headers every answer to an allowed origin carries."""
        headers["Access-Control-Allow-Origin"] = origin
        headers.add("Vary", "Origin")
        if self.expose:
            headers["Access-Control-Expose-Headers"] = self.expose

    async def preflight(self, request: web.Request) -> web.Response:
        """OPTIONS: what a browser may send from an allowed origin (204), else 403."""
        origin = request.headers.get("Origin")
        method = request.headers.get("Access-Control-Request-Method", "").upper()
        if not self.allows(origin) or method not in self.method_set:
            err = Forbidden("This cross-origin request is not allowed.", code="cors_not_allowed")
            return web.Response(body=render(err), status=err.status, content_type=_JSON)
        asked = request.headers.get("Access-Control-Request-Headers", "")
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": self.methods,
                "Access-Control-Allow-Headers": asked if self.any_header else self.headers,
                "Access-Control-Max-Age": self.max_age,
            },
        )


class Decoration(NamedTuple):
    """What ``install`` adds to every response of an app (lean.py repeats it)."""

    prepare: Callable[[web.Request, web.StreamResponse], Awaitable[None]]
    cross: Cross | None


DECORATION = web.AppKey("decoration", Decoration)


def install(app: web.Application, server: Server) -> None:
    """The ``Server`` header (and, when configured, CORS) on every response of ``app``;
    preflights answered. Call before the catch-all route is added."""
    cross = Cross(server.cors) if server.cors is not None else None

    async def prepare(request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        headers["Server"] = SERVER
        if cross is not None:
            origin = request.headers.get("Origin")
            if cross.allows(origin):
                assert origin is not None
                cross.decorate(origin, headers)

    app.on_response_prepare.append(prepare)
    app[DECORATION] = Decoration(prepare, cross)
    if cross is not None:
        app.router.add_route("OPTIONS", "/{tail:.*}", cross.preflight)


# -- forwarding headers --------------------------------------------------------------------

_FORWARDING = ("X-Forwarded-For", "Forwarded", "X-Real-IP", "Via")
_VIA = "1.1 morngpt"


class Forwarding:
    """Which clients' forwarding headers are believed (``server.trusted_proxies``)."""

    def __init__(self, trusted: list[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in trusted]

    def is_trusted(self, peer: str | None) -> bool:
        if not self.networks or peer is None:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def headers(self, given: CIMultiDictProxy[str], peer: str | None) -> CIMultiDictProxy[str]:
        """The client's headers (``given``, from ``peer``) as they go upstream:
        forwarding headers believed only from a trusted proxy, the peer's address
        appended to ``X-Forwarded-For`` and the proxy to ``Via``."""
        out = CIMultiDict(given)
        prior = ""
        via = ""
        if self.is_trusted(peer):
            prior = ", ".join(given.getall("X-Forwarded-For", ()))
            via = ", ".join(given.getall("Via", ()))
        else:
            for name in _FORWARDING:
                out.popall(name, None)
        out.popall("X-Forwarded-For", None)
        out.popall("Via", None)
        if peer:
            out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        out["Via"] = f"{via}, {_VIA}" if via else _VIA
        return CIMultiDictProxy(out)
