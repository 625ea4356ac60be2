"""Retries never multiply (#14): for every kind of upstream error, one failing request
costs no more upstream calls through the proxy (the SDK's default retries on top)
than the SDK calling the upstream directly. The waits are measured by the benchmark
(``python -m bench.retries``, docs/routing.md), not asserted here."""

from __future__ import annotations

from bench.retries import table


async def test_proxy_plus_sdk_calls_the_upstream_no_more_than_the_sdk_alone() -> None:
    rows = await table(repeat=1, retry_after=0.2, sdk_timeout=0.4, together=True)
    assert len(rows) == 8
    for kind, [direct], [proxied] in rows:
        assert direct.calls == 3, kind.name  # the SDK's own: first try and 2 retries
        assert 1 <= proxied.calls <= direct.calls, (kind.name, proxied)
        if kind.refused or kind.headers.get("x-fake-status", "").startswith("5"):
            # The proxy retried at once; the SDK was told not to retry all of it again.
            assert proxied.status is not None, kind.name
            assert proxied.status >= 500, kind.name
