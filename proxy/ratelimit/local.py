"""The in-process limiter: ``check`` (bucket.py) on per-key state in a dict. Used when
no Redis is configured, and as the fallback while Redis is unreachable. Limits held
here are per worker process."""

from __future__ import annotations

from time import monotonic_ns

from .bucket import Call, KeyState, Verdict, check


def now_ms() -> int:
    """The in-process clock: monotonic, so a wall-clock jump refills nothing."""
    return monotonic_ns() // 1_000_000


class LocalBuckets:
    """One ``KeyState`` per API key id (bounded by the number of keys)."""

    def __init__(self) -> None:
        self.states: dict[str, KeyState] = {}

    def check(self, key_id: str, call: Call) -> Verdict:
        state = self.states.get(key_id)
        if state is None:
            state = self.states[key_id] = KeyState()
        return check(state, call)
