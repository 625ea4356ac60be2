"""Tests of deploy/, the Dockerfile and the wheel: manifests, chart, packaging, replicas."""
