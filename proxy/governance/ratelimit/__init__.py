"""Per-key rate limits: token buckets for requests and tokens per minute, and
parallel-request slots.

- ``bucket``: the pure algorithm (``take``) and ``check``, the Python twin of
  ``bucket.lua`` (the same algorithm, atomic inside Redis).
- ``shared``: the Redis client (``open_redis``) and the script, one EVALSHA per call.
- ``local``: the in-process buckets (no Redis configured, or Redis unreachable).
- ``limiter``: what the gate calls; chooses Redis or in-process, falls back and comes
  back by itself, carries token reconciliations to Redis.
"""
