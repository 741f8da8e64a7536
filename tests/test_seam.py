"""psycopg_pool's internals that django_pooled_pg/pooling/pool.py relies on are still there, with
the parameters it calls them with. A psycopg_pool release that renames or reshapes one fails
here, by name, before parking or recovery misbehave. (What each does for us is exercised by
the rest of the suite: tests/test_transaction_release.py, test_faults.py, test_keep.py.)"""

from __future__ import annotations

import inspect

import psycopg_pool
import pytest
from psycopg_pool import ConnectionPool

from django_pooled_pg.pooling.pool import CREATED_AT, EXPIRE_AT, PSYCOPG_POOL_INTERNALS, Pool, expire_at

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("name", sorted(PSYCOPG_POOL_INTERNALS))
def test_each_internal_is_there_with_its_parameters(name):
    expected = PSYCOPG_POOL_INTERNALS[name]
    if expected is None:  # an attribute of an open pool (some are made by open()): look at ours
        from django.db import connection

        connection.ensure_connection()
        assert hasattr(connection.pool, name), f"psycopg_pool {psycopg_pool.__version__} has no {name}"
        connection.close()
        return
    method = getattr(ConnectionPool, name, None)
    assert callable(method), f"psycopg_pool {psycopg_pool.__version__} has no {name}()"
    params = [p for p in inspect.signature(method).parameters if p != "self"]
    assert tuple(params[: len(expected)]) == expected, (name, params)
    assert all(
        p.default is not inspect.Parameter.empty
        for p in list(inspect.signature(method).parameters.values())[len(expected) + 1 :]
    ), (name, params)


def test_every_internal_used_in_pool_py_is_listed():
    """pool.py touches no other private name of psycopg_pool than those listed."""
    source = inspect.getsource(inspect.getmodule(Pool))
    ours = {n for n in vars(Pool) if n.startswith("_")} | {
        "_checking",
        "_probing",
        "_probed_at",
        "_claimed",
        "_parked",
        "_take_parked",
        "_clean",
        "_looking",
        "_shrink",
        "_keeps",
        "_ready",  # (Waiter's)
    }
    used = {
        word
        for word in set(__import__("re").findall(r"(?:self|super\(\))\.(_[a-z_]+)", source))
        if not word.startswith("__")
    }
    assert used - ours - set(PSYCOPG_POOL_INTERNALS) == set()


def test_connections_carry_their_expiry_and_birth(pool_options):
    from django.db import connection

    pool_options(max_lifetime=60)
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    conn = connection.connection
    assert isinstance(getattr(conn, EXPIRE_AT), float) and isinstance(getattr(conn, CREATED_AT), float)
    assert 0.0 < expire_at(conn) < float("inf")
    connection.close()
