"""W3C Trace Context (https://www.w3.org/TR/trace-context/) at the proxy's edge.

A client's ``traceparent`` and ``tracestate`` are forwarded upstream unchanged, like
any other end-to-end header. With ``server.tracing`` on, a request that arrives
without a ``traceparent`` gets a new one (a new trace, sampled), so the upstream's
spans for it join one trace.
"""

from __future__ import annotations

import os

from multidict import CIMultiDict, CIMultiDictProxy

HEADER = "traceparent"


def new_traceparent() -> str:
    """A fresh ``traceparent``: version 00, random trace and parent ids, sampled."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


def ensure_traceparent(headers: CIMultiDictProxy[str]) -> CIMultiDictProxy[str]:
    """``headers`` as they are when they carry a ``traceparent``, else a copy with a new
    one (``tracestate`` without a ``traceparent`` is meaningless, so it goes too)."""
    if HEADER in headers:
        return headers
    fresh = CIMultiDict(headers)
    fresh.popall("tracestate", None)
    fresh[HEADER] = new_traceparent()
    return CIMultiDictProxy(fresh)
