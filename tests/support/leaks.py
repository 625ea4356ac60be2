"""The key-leak scan over the whole run: every key a test hands out is in ``SECRETS``,
and none may ever appear in a log (the ``_no_key_in_logs`` fixture in tests/conftest.py
captures every log record and scans at the end of the session)."""

from __future__ import annotations

import logging

from .env import CLIENT_KEY, UPSTREAM_KEY

# Every key a test hands out. Tests that issue keys add them here.
SECRETS: set[str] = {UPSTREAM_KEY, CLIENT_KEY}

# Formatted log records of the whole test run, and the stderr lines of proxy
# subprocesses (``watch_output``), scanned for SECRETS when the session ends.
CAPTURED: list[str] = []
_OUTPUTS: list[list[str]] = []
# The test's own clients log what they send (the SDK logs request options, headers
# included, at debug level): holding a key is their job, not a leak by the proxy.
_CLIENT_LOGGERS = ("openai", "httpx", "httpcore")


def watch_output(lines: list[str]) -> list[str]:
    """Register a subprocess's collected output lines for the end-of-run key scan."""
    _OUTPUTS.append(lines)
    return lines


class Capture(logging.Handler):
    """Keeps every formatted record except the test clients' own in ``CAPTURED``."""

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(_CLIENT_LOGGERS):
            CAPTURED.append(self.format(record))


def leaks() -> list[str]:
    """The captured lines (the first 300 characters of each) that hold a known key."""
    texts = CAPTURED + [line for lines in _OUTPUTS for line in lines]
    return [text[:300] for text in texts if any(key in text for key in SECRETS)]
