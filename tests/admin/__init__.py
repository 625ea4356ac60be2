"""Tests of proxy/admin/: the admin API, the console and its single sign-on."""
