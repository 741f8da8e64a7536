"""psycopg_pool's internals that django_pooled_pg/pooling/pool.py relies on are still there, with
the parameters it calls them with. A psycopg_pool release that renames or reshapes one fails
here, by name, before parking or recovery misbehave. (What each does for us is exercised by
the rest of the suite: tests/test_transaction_release.py, test_faults.py, test_keep.py.)"""

from __future__ import annotations

import inspect
import re
import time
from pathlib import Path

import psycopg_pool
import pytest
from psycopg_pool import ConnectionPool

import django_pooled_pg
from django_pooled_pg.pooling.pool import EXPIRE_AT, PSYCOPG_POOL_INTERNALS, Pool, expire_at

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


#: A private attribute read or set on anything (self, super(), a connection, a waiter), in any
#: case: psycopg_pool's counters are upper-case class constants (_REQUESTS_NUM).
PRIVATE_ACCESS = re.compile(r"(?:\w|\))\.(_[A-Za-z]\w*)")


def private_names_used(source: str) -> set[str]:
    return {n for n in PRIVATE_ACCESS.findall(source) if not n.startswith(("__", "_pooled_pg_"))}


#: Private names pool.py gives Pool's own attributes (its methods are in ``vars(Pool)``).
OWN_ATTRIBUTES = {
    "_checking",
    "_probing",
    "_probed_at",
    "_claimed",
    "_made",
    "_attempting",
    "_parked",
    "_parked_holds",
    "_take_parked",
    "_clean",
    "_upkeeping",
    "_closing",
    "_shut",
    "_timed_out",
    "_looker",
    "_shed_budget",
    "_shed_size",
    "_wake",
    "_released_at",
    "_shrink",
    "_keeps",
    "_keep",  # (DatabaseWrapper's, in a comment)
    "_user_check",
    "_user_reset",
}


def own_names() -> set[str]:
    return {n for n in vars(Pool) if n.startswith("_") and not n.startswith("__")} | OWN_ATTRIBUTES


def test_every_internal_used_in_pool_py_is_listed():
    """pool.py touches no other private name of psycopg_pool than those listed."""
    source = inspect.getsource(inspect.getmodule(Pool))
    assert private_names_used(source) - own_names() - set(PSYCOPG_POOL_INTERNALS) == set()


def test_pool_py_names_of_its_own_are_not_psycopg_pools():
    """An attribute or method of Pool's own that psycopg_pool also defines would overwrite
    psycopg_pool's state (``_opened``, psycopg_pool's "was opened" flag, was once taken for a set
    of connections): the only shared names are the internals listed, which Pool overrides or
    uses on purpose."""
    shared = (own_names() - set(PSYCOPG_POOL_INTERNALS)) & names_defined_in(psycopg_pool)
    assert shared == set()


def names_defined_in(package: object) -> set[str]:
    """The private names a package's modules define: functions, methods, attributes set on
    ``self`` and class constants."""
    found: set[str] = set()
    for path in Path(package.__file__).parent.rglob("*.py"):  # type: ignore[attr-defined]
        text = path.read_text()
        found |= set(re.findall(r"def (_[A-Za-z]\w*)", text))
        found |= set(re.findall(r"self\.(_[A-Za-z]\w*)\s*(?::[^=]*)?=", text))
        found |= set(re.findall(r"^\s+(_[A-Z][A-Z_0-9]*)\s*=", text, re.M))
    return {n for n in found if not n.startswith("__")}


def test_no_module_but_pool_py_touches_a_private_name_of_psycopg_or_psycopg_pool():
    """Outside the seam no module reads or sets a private name that psycopg or psycopg_pool
    defines (a name on ``self`` is the module's own class's; ``Pool._x`` and
    ``DatabaseWrapper._x`` in docstrings are ours)."""
    import psycopg

    theirs = names_defined_in(psycopg) | names_defined_in(psycopg_pool)
    seam = Path(inspect.getsourcefile(Pool))
    offenders = {}
    for path in Path(django_pooled_pg.__file__).parent.rglob("*.py"):
        if path == seam:
            continue
        source = path.read_text()
        foreign = {
            m
            for m in re.findall(r"(?<!self)(?<!cls)(?<!super\(\))(?<!Pool)(?<!DatabaseWrapper)\.(_[A-Za-z]\w*)", source)
        }
        used = (foreign - {n for n in foreign if n.startswith("_pooled_pg_")}) & theirs
        if used:
            offenders[str(path.relative_to(seam.parents[2]))] = sorted(used)
    assert offenders == {}


def test_no_private_psycopg_module_is_imported():
    for path in Path(django_pooled_pg.__file__).parent.rglob("*.py"):
        source = path.read_text()
        assert not re.search(r"^\s*(from|import) psycopg(_pool)?\.(_|generators|waiting)", source, re.M), path


def test_connections_carry_their_expiry_and_birth(pool_options):
    from django.db import connection

    from django_pooled_pg import pinned

    pool_options(max_lifetime=60)
    with pinned():  # (connection.connection between statements)
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        conn = connection.connection
        assert isinstance(getattr(conn, EXPIRE_AT), float)
        assert 0.0 < expire_at(conn) < float("inf")
        assert 0.0 < conn._pooled_pg_created_at <= time.monotonic()  # (ours)
        connection.close()


def test_a_timed_out_waiter_is_told_by_its_error():
    """Pool._leave_queue() takes the waiters of psycopg_pool's queue whose wait timed out: those
    with their ``error`` set (not a private name, but psycopg_pool's waiter's contract)."""
    from psycopg_pool.pool import WaitingClient

    waiter = WaitingClient()
    assert waiter.error is None
    with pytest.raises(psycopg_pool.PoolTimeout):
        waiter.wait(0.01)
    assert isinstance(waiter.error, psycopg_pool.PoolTimeout)
    assert waiter.set(object()) is False  # (never handed anything again)


def test_the_seam_stays_narrow():
    """Issue 31: fewer than 12 private names of psycopg_pool (the connection attribute
    :data:`EXPIRE_AT` counts)."""
    assert len(set(PSYCOPG_POOL_INTERNALS) | {EXPIRE_AT}) <= 11
