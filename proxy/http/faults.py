"""Why an exchange with an upstream failed below HTTP: the exceptions ``h1`` raises.

They live apart from ``h1_conn`` because the compiled hot path (setup.py, ``HOT``)
cannot compile subclasses of ``OSError``; this module stays plain Python.
"""

from __future__ import annotations


class ConnectFailed(OSError):
    """No connection to the upstream could be made."""


class TLSFailed(ConnectFailed):
    """The TLS handshake with the upstream failed."""


class ConnectTimeout(ConnectFailed):
    """Connecting to the upstream took longer than allowed."""


class Disconnected(ConnectionError):
    """The upstream connection ended before the response did (or sent something that
    is not HTTP). ``answered``: some of the response had arrived."""

    def __init__(self, message: str, *, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered
