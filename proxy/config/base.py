"""The building blocks of the config (package docstring: __init__.py): the
constrained number and span types, ``seconds``, ``Secret`` (a value that never shows
in a repr) and ``ConfigError``."""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

import msgspec

WILDCARD: Final = "*"

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
# A span of time such as 90s, 15m, 1h, 90d or 2w (``seconds`` reads it).
Span = Annotated[str, msgspec.Meta(pattern=r"^\s*\d+(\.\d+)?[smhdw]\s*$")]
_SPAN = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_SPAN_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def seconds(text: str) -> float:
    """Seconds in a span such as ``90s``, ``15m``, ``1h``, ``7d`` or ``2w``; raises
    ``ValueError`` for anything else."""
    match = _SPAN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected a duration like 30m, 1h or 7d, not {text!r}")
    return float(match[1]) * _SPAN_SECONDS[match[2]]


Share = Annotated[float, msgspec.Meta(ge=0, le=1)]


class Secret(str):
    """A string that never shows itself in a repr (and so never in a log line)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'" if self else "''"


class ConfigError(Exception):
    """A config that cannot be used; the message is one line for the operator."""


# A per-minute limit; at most 10**9 so bucket arithmetic stays exact (ratelimit/bucket.py).
Limit = Annotated[int, msgspec.Meta(gt=0, le=1_000_000_000)]


Role = Literal["admin", "viewer", "member"]


NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
