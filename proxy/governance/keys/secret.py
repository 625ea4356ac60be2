"""Key format and hashing. A key is ``sk-morn-`` + 43 URL-safe characters (256 random
bits); only its SHA-256 and a short display prefix are ever stored."""

from __future__ import annotations

import hashlib
import secrets

PREFIX = "sk-morn-"
_RANDOM_BYTES = 32
_LENGTH = len(PREFIX) + 43  # token_urlsafe(32) is 43 characters
# Characters of the key shown in listings: the prefix and four random ones.
_DISPLAY = len(PREFIX) + 4
# A master key must be at least this long and have this many distinct characters.
MASTER_MIN_LENGTH = 32
MASTER_MIN_DISTINCT = 8


def generate() -> str:
    """A new random key (shown once, never stored)."""
    return PREFIX + secrets.token_urlsafe(_RANDOM_BYTES)


def new_id() -> str:
    """A key id: not secret, safe in logs, metrics labels and Redis key names."""
    return "key_" + secrets.token_hex(8)


def digest(secret: str) -> str:
    """The SHA-256 (hex) under which a key is stored and looked up."""
    # surrogateescape: aiohttp decodes header bytes that are not UTF-8 that way, so a
    # key sent with such bytes hashes to what was sent (and matches nothing), not a 500.
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def display_prefix(secret: str) -> str:
    """What listings show of a key, e.g. ``sk-morn-Ab3x``."""
    return secret[:_DISPLAY]


def looks_issued(secret: str) -> bool:
    """Whether ``secret`` has the shape of a key this proxy issues (cheap pre-check
    before a database lookup)."""
    return len(secret) == _LENGTH and secret.startswith(PREFIX)


def is_weak(secret: str) -> bool:
    """Whether a master key is too easy to guess."""
    return len(secret) < MASTER_MIN_LENGTH or len(set(secret)) < MASTER_MIN_DISTINCT
