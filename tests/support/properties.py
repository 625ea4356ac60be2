"""Property tests are derandomized by default: every run of the suite tries the same
examples, so CI never passes or fails by chance (no example database either). Each
failure one of them ever found stays as an explicit ``@example``. The wide random
search is ``tests/test_wide_search.py`` (``-m slow``): it runs them all again with
MORNGPT_HYPOTHESIS=wide, random seeds and ``examples(n)`` twenty times larger."""

from __future__ import annotations

import os

from hypothesis import settings

WIDE = os.environ.get("MORNGPT_HYPOTHESIS") == "wide"


def load_profile() -> None:
    """Register the two profiles and load the one this run uses (tests/conftest.py
    does, before any test module is imported)."""
    settings.register_profile("fixed", derandomize=True, database=None, print_blob=True)
    settings.register_profile("wide", derandomize=False, database=None, print_blob=True)
    settings.load_profile("wide" if WIDE else "fixed")


def examples(n: int) -> int:
    """How many examples a property test tries: ``n``, or twenty times that in the wide search."""
    return n * 20 if WIDE else n
