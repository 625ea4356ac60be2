"""Tests of proxy/governance/: keys, teams and JWTs, rate limits, budgets and prices."""
