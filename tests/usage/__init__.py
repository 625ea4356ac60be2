"""Tests of proxy/usage/: the ledger, its stores, spool, rollups and outages."""
