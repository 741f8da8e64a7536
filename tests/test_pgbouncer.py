"""Our ENGINE in front of a real PgBouncer in transaction mode (Debian's package)."""

from __future__ import annotations

import random
import threading

import pytest
from django.core.checks import run_checks
from django.test.utils import override_settings

from django_pooled_pg.base import DatabaseWrapper
from django_pooled_pg.errors import DatabaseUnavailable
from testsupport.pgbouncer import PgBouncer, find_pgbouncer

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(find_pgbouncer() is None, reason="pgbouncer is not installed (apt-get install -y pgbouncer)"),
]


@pytest.fixture
def bouncer(server):
    with PgBouncer(server, pool_size=3) as bouncer:
        yield bouncer


def through(bouncer, *, behind_pgbouncer=True, **extra):
    """A connection object for the test database through PgBouncer (alias "bouncer")."""
    from django.db import connections

    settings_dict = {
        **connections["default"].settings_dict,
        "HOST": bouncer.host,
        "PORT": str(bouncer.port),
        "DISABLE_SERVER_SIDE_CURSORS": True,
        "TIME_ZONE": "Asia/Tokyo",
        "OPTIONS": {"pool": {"min_size": 1, "max_size": 6, "timeout": 5, "behind_pgbouncer": behind_pgbouncer}},
        **extra,
    }
    return DatabaseWrapper(settings_dict, alias="bouncer")


def query(wrapper, sql, params=None):
    with wrapper.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0]


def test_queries_transactions_and_time_zone_through_pgbouncer(bouncer):
    wrapper = through(bouncer)
    try:
        wrapper.inc_thread_sharing()
        results = []

        def work(seed):
            conn = wrapper.copy()  # same alias, same pool; one wrapper per thread
            rng = random.Random(seed)
            for _ in range(30):
                # Each statement may run on another server connection: the time zone must hold.
                results.append(query(conn, "SELECT current_setting('TimeZone')"))
                with _atomic(conn):
                    query(conn, "SELECT pg_backend_pid()")
                    query(conn, "SELECT %s::int", [rng.randint(1, 9)])
                conn.close()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 180 and set(results) == {"Asia/Tokyo"}
    finally:
        wrapper.dec_thread_sharing()
        wrapper.close()
        wrapper.close_pool()


class _atomic:
    """A transaction on a wrapper that is not in django.db.connections."""

    def __init__(self, wrapper):
        self.wrapper = wrapper

    def __enter__(self):
        self.wrapper.set_autocommit(False)

    def __exit__(self, exc_type, *rest):
        if exc_type is None:
            self.wrapper.commit()
        else:
            self.wrapper.rollback()
        self.wrapper.set_autocommit(True)


def test_without_the_option_the_error_says_what_to_set(bouncer):
    wrapper = through(bouncer, behind_pgbouncer=False)
    try:
        with pytest.raises(DatabaseUnavailable, match="behind_pgbouncer"):
            wrapper.ensure_connection()
    finally:
        wrapper.close_pool()


@pytest.mark.parametrize(
    "change, check_id",
    [
        ({"DISABLE_SERVER_SIDE_CURSORS": False}, "django_pooled_pg.E020"),
        ({"OPTIONS": {"assume_role": "x", "pool": {"behind_pgbouncer": True}}}, "django_pooled_pg.E021"),
        ({"OPTIONS": {"prepare_threshold": 5, "pool": {"behind_pgbouncer": True}}}, "django_pooled_pg.E022"),
    ],
)
def test_system_checks_for_pgbouncer(change, check_id):
    settings_dict = {
        "ENGINE": "django_pooled_pg",
        "NAME": "x",
        "DISABLE_SERVER_SIDE_CURSORS": True,
        "OPTIONS": {"pool": {"behind_pgbouncer": True}},
        **change,
    }
    import warnings

    with warnings.catch_warnings(action="ignore", category=UserWarning):
        with override_settings(DATABASES={"default": settings_dict}):
            ids = [e.id for e in run_checks() if e.id.startswith("django_pooled_pg.E")]
    assert ids == [check_id]
