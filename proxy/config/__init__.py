"""Typed configuration, validated once at start with msgspec: ``base`` (spans, secrets,
``ConfigError``), ``upstreams`` (deployments, models, prices, routing policy),
``schema`` (the rest of ``Config``) and ``load`` (reading, checking and deriving:
``load``, ``resolve``, ``quick_start``, ``worker_count``)."""
