"""Database features: Django's, plus the tests of Django's own suite that assert stock behaviour
this backend changes on purpose (see ``make django-suite`` and "Django's own test suite" in
docs/development.rst)."""

from __future__ import annotations

import django
from django.db.backends.postgresql import features as postgresql
from django.utils.functional import cached_property

#: Django test suite labels skipped with a pool, by the reason: what this backend does differently.
POOLED_TEST_SKIPS: dict[str, set[str]] = {
    "CONN_MAX_AGE must be 0 with django_pooled_pg: a borrowed connection goes back to the pool "
    "at request end, and the pool checks connections (CONN_HEALTH_CHECKS); these tests set "
    "CONN_MAX_AGE=None and expect Django to keep the connection across requests and "
    "health-check it itself.": {
        "backends.base.test_base.ConnectionHealthChecksTests.test_health_checks_disabled",
        "backends.base.test_base.ConnectionHealthChecksTests.test_health_checks_enabled",
        "backends.base.test_base.ConnectionHealthChecksTests.test_health_checks_enabled_errors_occurred",
        "backends.base.test_base.ConnectionHealthChecksTests.test_set_autocommit_health_checks_enabled",
    },
    "A pool with CONN_MAX_AGE != 0 is refused with django_pooled_pg.E001's message (which names "
    "the setting and the fix), not Django's 'Pooling doesn't support persistent connections.'": {
        "backends.postgresql.tests.Tests.test_pooling_not_support_persistent_connections",
    },
    "connection_created is sent once per database session (when the pool opens a connection, "
    "and after a session reset), not on every connect(): a receiver connected later does not "
    "see sessions already in the pool.": {
        "backends.tests.ConnectionCreatedSignalTest.test_signal",
    },
    "A borrower facing an exhausted pool gets django_pooled_pg.PoolExhausted (a "
    "django.db.OperationalError naming the pool's state), not psycopg_pool.PoolTimeout; through "
    "the ORM, Django's pool also surfaces a django.db.OperationalError. This test calls "
    "connect() directly and expects the raw PoolTimeout.": {
        "backends.postgresql.tests.Tests.test_connect_pool",
    },
    "CONN_HEALTH_CHECKS=True makes the pool ping every borrowed connection in its own liveness "
    "check (ping_after=0), which replaces a dead connection at once; it does not set "
    "psycopg_pool's check callback, whose retries back off between dead connections. This "
    "test inspects the psycopg_pool callback.": {
        "backends.postgresql.tests.Tests.test_pooling_health_checks",
    },
}


#: Skipped as well from Django 6.1, whose suite has the test.
CHECK_TEST_SKIPS: dict[str, set[str]] = {
    "A check callback (OPTIONS['pool']['check']) is run by the pool after the answer of the "
    "session reset the connection went back with is read, not passed to psycopg_pool, which "
    "would run it before. This test inspects psycopg_pool's private _check attribute.": {
        "backends.postgresql.tests.Tests.test_pool_check_can_be_overridden",
    },
}
#: Skipped as well: Django's suite runs outside requests, where a borrow gives back per statement
#: in both release modes (``.per_statement``).
PER_STATEMENT_TEST_SKIPS: dict[str, set[str]] = {
    "Outside a request (and always with release='transaction') the connection goes back to the "
    "pool after each statement outside atomic, so connection.connection is None between "
    "statements; this test reads it after a statement. Code that needs one session across "
    "statements uses django_pooled_pg.pinned().": {
        "backends.tests.ThreadTests.test_default_connection_thread_local",
    },
}
#: Skipped as well with ``release="transaction"``.
TRANSACTION_TEST_SKIPS: dict[str, set[str]] = {
    'With release="transaction" the connection goes back to the pool after each statement '
    "outside atomic; this test opens a cursor from a mocked ensure_connection across "
    "statements.": {
        "test_utils.tests.AssertNumQueriesUponConnectionTests.test_ignores_connection_configuration_queries",
    },
}


class DatabaseFeatures(postgresql.DatabaseFeatures):
    @cached_property
    def django_test_skips(self) -> dict[str, set[str]]:
        skips = super().django_test_skips
        if self.connection.settings_dict["OPTIONS"].get("pool") is False:
            return skips
        skips = {**skips}
        pooled = {**POOLED_TEST_SKIPS, **PER_STATEMENT_TEST_SKIPS}
        if django.VERSION >= (6, 1):
            pooled.update(CHECK_TEST_SKIPS)
        pool_options = self.connection.settings_dict["OPTIONS"].get("pool")
        if isinstance(pool_options, dict) and pool_options.get("release") == "transaction":
            pooled.update(TRANSACTION_TEST_SKIPS)
        for reason, tests in pooled.items():
            skips.setdefault(reason, set()).update(tests)
        return skips
