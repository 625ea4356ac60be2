"""Who may ask for what, and at what cost: ``identity`` (credentials → a principal),
``tokens`` (JWTs from configured issuers), ``keys`` (API keys and teams), the ``gate``
(admission: model permission, rate limits, budgets), ``ratelimit``, ``budgets``,
``pricing`` and ``periods``."""
