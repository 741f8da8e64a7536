"""The PostgreSQL server the tests talk to: a throwaway cluster this test run owns.

Started when the settings are first read (before pytest-django creates the test database) and
stopped at exit. ``DATABASE_URL`` points the tests at an existing server instead; tests that
restart the server or change ``max_connections`` are skipped then.
"""

from __future__ import annotations

import os
from functools import cache
from urllib.parse import urlparse

from testsupport.pgcluster import PgCluster


@cache
def cluster() -> PgCluster | None:
    """The cluster owned by this test run, or None when DATABASE_URL names a server."""
    if os.environ.get("DATABASE_URL"):
        return None
    return PgCluster(max_connections=100).start()


def database_settings(name: str) -> dict:
    """A DATABASES entry for database ``name`` on the test server, with this ENGINE."""
    # A server process started by a test serves the test database the test run created.
    name = os.environ.get(f"POOLED_PG_DB_{name.upper()}", name)
    url = os.environ.get("DATABASE_URL")
    if url:
        parts = urlparse(url)
        base = {
            "NAME": name,
            "USER": parts.username or "",
            "PASSWORD": parts.password or "",
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
        }
    else:
        base = cluster().django_settings(name)
    return {**base, "ENGINE": "django_pooled_pg", "OPTIONS": {"pool": {"min_size": 1, "max_size": 4, "timeout": 5}}}
