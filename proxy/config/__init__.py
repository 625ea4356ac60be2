"""Typed configuration, validated once at start with msgspec: ``base`` (spans, secrets,
``ConfigError``), ``upstreams`` (deployments, models, prices, routing policy),
``schema`` (the rest of ``Config``) and ``load`` (reading, checking and deriving:
``load``, ``resolve``, ``quick_start``, ``worker_count``).

A config file (YAML or JSON) decodes into ``Config``; the quick-start flags
(``--upstream URL --upstream-key KEY``) build the same structure with one wildcard
model. Everything the request path needs per model (URLs, header templates) is
derived once, at start, not per request.

Invariant: a ``Config`` that ``load`` returned is valid; ``ConfigError`` carries one
line naming the field and what was wrong.
"""
