"""The usage ledger: one row per proxied request, in PostgreSQL or the embedded SQLite.

``record`` builds the row from a finished ``Exchange``; ``writer`` queues rows off the
request path and commits them in batches (``store``), spilling to append-only files
(``spool``) while the database cannot take them; ``report`` is the ``usage`` command.
See docs/usage-ledger.md.
"""
