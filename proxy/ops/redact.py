"""Log records that would repeat what a client sent, reduced before anything formats them.

aiohttp logs a request it cannot parse (a header line with a stray byte, a bad
request line, a line too long) on ``aiohttp.server`` at ERROR with the exception,
and the exception's message quotes the offending line: a client whose
``Authorization`` line is malformed would have its key written to the proxy's log.
A malformed request is the client's mistake, not a server error, so the record
becomes one INFO line naming the error class and nothing the client sent.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

_LOGGER = "aiohttp.server"


class MalformedRequests(logging.Filter):
    """Rewrites aiohttp's records about unparsable requests (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            args = record.args if isinstance(record.args, tuple) else ()
            remote = args[0] if args else "?"
            record.msg = "malformed HTTP request from %s (%s)"
            record.args = (remote, type(exc).__name__)
            record.exc_info = None
            record.exc_text = None
            record.levelno = logging.INFO
            record.levelname = "INFO"
        return True


_FILTER = MalformedRequests()


def install() -> None:
    """Filter aiohttp's server log in this process (idempotent)."""
    logging.getLogger(_LOGGER).addFilter(_FILTER)
