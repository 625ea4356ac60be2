"""API keys: format and hashing (``secret``), the record (``record``), the database
store (``store``), the cached lookup the request path uses (``lookup``) and the
``keys`` command line (``cli``).

Kept import-light on purpose: ``proxy.config`` imports ``proxy.keys.secret``.
"""
