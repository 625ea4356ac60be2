"""The proxy's own error hierarchy and the one place that turns an error into a response.

Third-party exceptions (aiohttp, redis, asyncpg) are mapped to these where they enter
the proxy; handlers only ever raise ``ProxyError`` subclasses. ``error_body`` is the
single source of the OpenAI error shape, used both for HTTP responses and for the SSE
error event that ends a broken stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import orjson


class ProxyError(Exception):
    """An error with an OpenAI-shaped rendering: status, type, code, param."""

    status = 500
    type = "server_error"
    code: str | None = "server_error"
    # The request's outcome as the access log, the usage ledger and traces write it:
    # the class's name unless a class says otherwise (set for each subclass).
    outcome: ClassVar[str] = "ProxyError"
    # Its kind in ``morngpt_upstream_errors_total``; None: not the upstream's failure.
    upstream_kind: ClassVar[str | None] = None

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        if "outcome" not in cls.__dict__:
            cls.outcome = cls.__name__

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers: Mapping[str, str] = headers or {}


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = None


class Unauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class BodyTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(ProxyError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class LengthRequired(ProxyError):
    status = 411
    type = "invalid_request_error"
    code = "length_required"


class UriTooLong(ProxyError):
    status = 414
    type = "invalid_request_error"
    code = "uri_too_long"


class UnsupportedEncoding(ProxyError):
    """A request ``Content-Encoding`` the proxy cannot decode (RFC 7694: 415)."""

    status = 415
    type = "invalid_request_error"
    code = "unsupported_content_encoding"


class HeadersTooLarge(ProxyError):
    status = 431
    type = "invalid_request_error"
    code = "request_headers_too_large"


class NotImplementedByProxy(ProxyError):
    """A method or transfer coding the proxy does not implement (RFC 9110: 501)."""

    status = 501
    type = "invalid_request_error"
    code = "not_implemented"


class RateLimited(ProxyError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class TokensRateLimited(RateLimited):
    """Refused by the key's (or team's) tokens-per-minute limit: OpenAI's type for it."""

    type = "tokens"
    outcome = RateLimited.outcome


class QuotaExceeded(RateLimited):
    """The key's budget cannot take this request's worst case (what OpenAI sends when
    an account's quota is spent; the SDK raises ``RateLimitError``)."""

    type = "insufficient_quota"
    code = "insufficient_quota"


class UpstreamError(ProxyError):
    """The upstream could not give a usable answer. ``retryable`` guides routing."""

    status = 502
    type = "server_error"
    code = "upstream_error"
    retryable = True
    upstream_kind = "broken"


class UpstreamUnavailable(UpstreamError):
    """Connection refused/reset before any byte of a response arrived."""

    upstream_kind = "unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    upstream_kind = "timeout"


class UpstreamProtocolError(UpstreamError):
    """The upstream answered with something that is not what the protocol promises."""

    retryable = False
    upstream_kind = "protocol"


class UpstreamStreamError(ProxyError):
    """Not raised: the outcome of a stream the upstream ended with its own error event
    (the client got that event as it came; the deployment is not judged broken)."""

    upstream_kind = "stream_error"


class ClientDisconnected(Exception):
    """Not raised: the outcome of a request whose client went away."""

    outcome = "client_disconnected"


class ServiceUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class Overloaded(ServiceUnavailable):
    """The worker already serves ``server.max_inflight`` requests: shed, not queued."""


class DatabaseUnavailable(ServiceUnavailable):
    """The database refused, failed or did not answer in time (asyncpg/sqlite3 errors
    are mapped to this where they enter)."""


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> bytes:
    """The OpenAI error object as JSON bytes."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def render(err: ProxyError) -> bytes:
    return error_body(err.message, err.type, err.code, err.param)


def outcome_of(error: type[BaseException]) -> str:
    """The name written for an ``Exchange.error``: the class's ``outcome`` (the proxy's
    own errors), else its name (an unexpected exception)."""
    outcome = getattr(error, "outcome", None)
    return outcome if isinstance(outcome, str) else error.__name__
