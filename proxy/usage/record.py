"""The ledger row: what one finished ``Exchange`` leaves in the usage ledger (made by
``usage/row.py``'s ``record_of``; its counts, exact or estimated, are explained there).

``cost`` is the exchange's price (``Exchange.cost``, nano-units, set by pricing.py
from the same counts) as an exact decimal: PostgreSQL ``numeric``; SQLite ``TEXT``
holding the decimal's string (Python's notation: ``0.00105``, ``1.50E-7``).
"""

from __future__ import annotations

from decimal import Decimal

import msgspec


class Record(msgspec.Struct, array_like=True, frozen=True):
    """One ledger row, fields in column order (``COLUMNS``). Encoded as a JSON array in
    spool files and for SQLite, as a tuple for PostgreSQL's COPY."""

    uid: str
    request_id: str
    key_id: str | None
    endpoint: str
    model: str
    deployment: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    estimated: bool
    status: int
    stream: bool
    error: str | None
    started_at: float  # Unix seconds
    duration_ms: float
    ttft_ms: float | None
    # Last, with a default: spool lines written before the column existed still decode.
    cost: Decimal = Decimal(0)
    # The team of the key (None: none); after cost for the same reason.
    team_id: str | None = None


COLUMNS: tuple[str, ...] = Record.__struct_fields__
