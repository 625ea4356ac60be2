"""Leases: a worker takes a small share of a key's Redis buckets in one call and
admits the key's next requests from it without a round trip (limiter.py).

Why: a ``bucket.lua`` call is the largest part of what a limited request costs, in
the worker (~20 µs of CPU) and in Redis (~26 µs: docs/scaling.md). A key busy enough
to matter makes many calls a second; with a lease of n requests it makes one call
per n requests.

Invariants:
- A lease is taken from the shared buckets before any of it is used, so leases never
  let a key past its limit, however many workers and replicas hold one.
- A lease is at most ``limits.lease_share`` of the key's per-minute limits (and at
  most ``MOST`` requests), and is taken only while the key's buckets, as this worker
  last saw them, hold ``HEADROOM`` leases' worth. Near its limit every request goes
  to Redis, one call each, exactly as without leases: the last requests of a bucket
  are never parked in one worker while another is refused.
- What a lease has not used is given back (requests and tokens) by the flush every
  ``limits.flush_interval`` (a lease taken before the last one ran out, by a call made
  at the same time or for a request its tokens did not fit, joins it: ``keep``): a
  worker holds a key's units at most that long. What a worker holds and does not use
  is the only error, bounded by ``lease_share`` per worker and transient.
- Keys with ``max_parallel`` (a slot per request), a budget (a hold per request) or a
  limited team (one call for both scopes) never lease.
- The rate-limit headers of a leased admission are the lease's verdict plus what is
  left of it: exact for one worker, as stale as the lease for the others' traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..keys.record import Key
from ..keys.teams import Team
from .bucket import Verdict
from .ticket import Ask

# The most requests one lease holds, whatever the limit.
MOST = 256
# Lease only while the buckets last seen hold this many leases' worth.
HEADROOM = 4


@dataclass(slots=True)
class Lease:
    """What is left of a key's lease (or, when empty, its last verdict from Redis)."""

    rpm: int
    tpm: int
    requests: int
    tokens: int
    verdict: Verdict  # Redis's answer to the call that took it: its levels after it

    def take(self, cost: int) -> Verdict | None:
        """Admit one request of ``cost`` tokens from the lease (None: it does not fit);
        the verdict it answers with."""
        if self.requests <= 0 or (self.tpm and self.tokens < cost):
            return None
        self.requests -= 1
        self.tokens -= cost
        seen = self.verdict
        tokens = seen.tokens_remaining + self.tokens if self.tpm else 0  # 0: no token bucket
        # seen with these two levels: every field named (a NamedTuple's _replace is
        # interpreted: 9,816 instructions a call against 3,911, callgrind;
        # tests/governance/test_lease.py checks that every other field is carried over)
        return Verdict(
            seen.allowed,
            seen.kind,
            seen.requests_remaining + self.requests,
            seen.requests_reset_ms,
            tokens,
            seen.tokens_reset_ms,
            seen.retry_ms,
            seen.budget_left,
            seen.budget_held,
            seen.epoch,
            seen.scope,
        )


def may(key: Key, ask: Ask | None, team: Team | None) -> bool:
    """Whether a request of ``key`` may be admitted from a lease."""
    return not (ask or key.max_parallel or (team and team.is_limited))


def size(rpm: int, tpm: int, cost: int, share: float, seen: Lease | None) -> int:
    """How many requests of ``cost`` tokens the key's next call takes: a lease's worth,
    or 1 (no lease: a first call, near the limit, or limits too small to share)."""
    if seen is None:
        return 1
    most = MOST
    if rpm:
        most = min(most, int(rpm * share))
    if tpm and cost:
        most = min(most, int(tpm * share) // cost)
    if most < 2:
        return 1
    last = seen.verdict
    if rpm and last.requests_remaining + seen.requests < HEADROOM * most:
        return 1
    if tpm and last.tokens_remaining + seen.tokens < HEADROOM * most * cost:
        return 1
    return most


def keep(leases: dict[str, Lease], scope: str, taken: Lease) -> Lease:
    """Keep a key's newest lease, with what is left of the one it replaces (taken by
    a call made at the same time, or one whose tokens did not fit a request)."""
    if (left := leases.get(scope)) is not None:
        taken.requests += left.requests
        taken.tokens += left.tokens
    leases[scope] = taken
    return taken
