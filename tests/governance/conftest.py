"""Fixtures of the governance tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fake_upstream import FakeUpstream
from tests.support.pair import Pair


@pytest.fixture
async def pair(tmp_path: Path, migrated_pg: str, redis_prefix: str, upstream: FakeUpstream) -> Pair:
    """Two ``serve`` processes' config: one Redis prefix, one database (tests/support/pair.py)."""
    return Pair.write(tmp_path, upstream.url, migrated_pg, redis_prefix)
