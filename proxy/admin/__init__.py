"""The admin API (``/admin/v1``) and the console that uses it (``/console``)."""
