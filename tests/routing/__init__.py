"""Tests of proxy/routing/: weighted routes, retries and failover, health and the board."""
