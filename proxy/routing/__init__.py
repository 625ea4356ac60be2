"""Where a request goes: ``routes`` (model name → deployments, and which one takes the
next request), ``failover`` (attempts, retries, fallbacks), ``health`` (each
deployment's live state and the one judge of its health) and ``board`` (the times every
worker of one host shares)."""
