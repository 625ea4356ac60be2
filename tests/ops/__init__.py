"""Tests of proxy/ops/: metrics, tracing, and the observability assets in deploy/."""
