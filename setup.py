"""The package build. Everything is declared in pyproject.toml; this file only adds the
compiled hot path when asked. With the dependencies and mypy (which carries mypyc)
installed, ``MORNGPT_COMPILE=1 pip install --no-build-isolation --no-deps .`` compiles
the modules in ``HOT`` with mypyc, and the relay's scan of plain stream events
(proxy/http/_plain.c, else scan.py's Python): C extensions beside their sources, the same
behaviour, 8-29 % less CPU per request in-process and not yet shown end to end
(docs/performance.md, "The compiled hot path").
mypyc type-checks what it compiles against the installed dependencies, hence no build
isolation; it also needs a C compiler and Python's headers. Without the variable the
package is plain Python, as before.

A module in ``HOT`` must keep to what mypyc compiles: no async generators, no
``continue`` inside ``try``, no subclass of an exception type other than ``Exception``
(the upstream client's are in http/faults.py), no msgspec ``Struct`` (decoders resolve
their fields from annotations mypyc rewrites; wire.py stays plain), and no class that
a plain module subclasses. ``bash scripts/compiled python -m pytest`` runs the suite on them.
"""

import os

from setuptools import Extension, setup

# The modules every proxied request runs through, in the order it meets them; then
# a governed request's (the gate, keys, limits) and the sinks' every request feeds.
HOT = [
    "proxy/http/front.py",
    "proxy/http/lean.py",
    "proxy/app.py",
    "proxy/http/request_body.py",
    "proxy/exchange.py",
    "proxy/routing/routes.py",
    "proxy/routing/health.py",
    "proxy/routing/failover.py",
    "proxy/http/upstream.py",
    "proxy/http/h1.py",
    "proxy/http/h1_conn.py",
    "proxy/http/relay.py",
    "proxy/http/reported.py",
    "proxy/http/scan.py",
    "proxy/http/sse.py",
    "proxy/governance/gate.py",
    "proxy/governance/keys/lookup.py",
    "proxy/governance/ratelimit/limiter.py",
    "proxy/governance/ratelimit/lease.py",
    "proxy/governance/periods.py",
    "proxy/ops/metrics_sink.py",
    "proxy/ops/access_sink.py",
    "proxy/usage/row.py",
    "proxy/usage/writer.py",
]


def extensions() -> list[object]:
    if os.environ.get("MORNGPT_COMPILE", "") in ("", "0"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        raise SystemExit(
            "MORNGPT_COMPILE=1 needs mypy (it carries mypyc) and the proxy's dependencies "
            "installed, and pip's --no-build-isolation (see this file's docstring)"
        ) from None
    # The relay's one-pass scan of plain events, in C (scan.py falls back to Python).
    plain = Extension("proxy.http._plain", ["proxy/http/_plain.c"], extra_compile_args=["-O2"])
    return [*mypycify(HOT, opt_level="3"), plain]


setup(ext_modules=extensions())
