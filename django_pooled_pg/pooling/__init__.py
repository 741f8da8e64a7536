"""The pooling core: pools, borrows and returns, session resets, counters. It never imports :mod:`django_pooled_pg.telemetry`."""
