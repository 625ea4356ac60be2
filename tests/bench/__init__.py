"""Tests of bench/: the fake upstream, the benchmarks, the locust run."""
