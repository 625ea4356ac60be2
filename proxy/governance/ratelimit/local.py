"""The in-process limiter: ``check`` (bucket.py) on per-key state in a dict. Used when
no Redis is configured, and as the fallback while Redis is unreachable. Limits held
here are per worker process."""

from __future__ import annotations

from time import monotonic_ns

from .bucket import Call, KeyState, Verdict, check_all


def now_ms() -> int:
    """The in-process clock: monotonic, so a wall-clock jump refills nothing."""
    return monotonic_ns() // 1_000_000


class LocalBuckets:
    """One ``KeyState`` per API key id (bounded by the number of keys)."""

    def __init__(self) -> None:
        self.states: dict[str, KeyState] = {}

    def check(self, key_id: str, call: Call) -> Verdict:
        return self.check_all([key_id], [call])[0]

    def check_all(self, scopes: list[str], calls: list[Call]) -> list[Verdict]:
        """``check_all`` on the states of ``scopes`` (a key's, and its team's)."""
        states = [self.states.get(scope) or self.states.setdefault(scope, KeyState())
                  for scope in scopes]  # fmt: skip
        return check_all(states, calls)
