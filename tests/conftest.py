from __future__ import annotations

import logging
import statistics
import time

import psycopg
import pytest
from django.db import connection, connections

from django_pooled_pg import eventlog
from django_pooled_pg.pooling.ledger import ledger
from django_pooled_pg.pooling.registry import registry
from tests import dbserver
from testsupport.waiting import wait_until


def pytest_addoption(parser):
    parser.addoption(
        "--soak-seconds",
        type=float,
        default=10.0,
        help="how long tests/test_soak.py keeps its load running (default 10)",
    )


@pytest.fixture
def server():
    """The cluster this run owns; tests that restart or reconfigure it need one."""
    cluster = dbserver.cluster()
    if cluster is None:
        pytest.skip("DATABASE_URL points at a server this test run does not own")
    return cluster


def plain_connection(dbname: str | None = None, **kwargs) -> psycopg.Connection:
    """A plain psycopg connection (autocommit) with the default alias's credentials, outside any
    pool: to its database, or to ``dbname``."""
    params = connections["default"].settings_dict
    return psycopg.connect(
        dbname=dbname or params["NAME"],
        user=params["USER"],
        password=params["PASSWORD"] or None,
        host=params["HOST"],
        port=params["PORT"],
        autocommit=True,
        **kwargs,
    )


@pytest.fixture
def superuser():
    """A plain psycopg connection as superuser to the test database, outside any pool."""
    conn = plain_connection()
    yield conn
    conn.close()


@pytest.fixture
def pool_options():
    """Give the default alias other pool options for one test; its next query makes a new pool.

    The settings dict is shared by every thread's connection object, so the new pool is the one
    all threads (and test clients) use.
    """
    wrapper = connections["default"]
    saved = wrapper.settings_dict["OPTIONS"]

    def apply(**pool):
        wrapper.close()
        wrapper.settings_dict["OPTIONS"] = {**saved, "pool": pool}

    yield apply
    wrapper.close()
    wrapper.settings_dict["OPTIONS"] = saved
    wrapper.close_pool()


@pytest.fixture
def default_settings():
    """Edit the default alias's connection settings (HOST, PORT, NAME, OPTIONS...) for one test;
    the next query makes a pool from them. Restored, and that pool closed, at the end."""
    wrapper = connections["default"]
    sd = wrapper.settings_dict
    saved = {key: sd[key] for key in ("NAME", "USER", "PASSWORD", "HOST", "PORT", "OPTIONS")}

    def apply(*, pool: dict, options: dict | None = None, **keys):
        wrapper.close()
        sd.update(keys)
        sd["OPTIONS"] = {**saved["OPTIONS"], **(options or {}), "pool": pool}

    yield apply
    wrapper.close()
    registry.close("default")
    sd.update(saved)


def pool_in_use(alias: str = "default", expect: int = 0, settle: float = 10.0) -> int:
    """Connections of ``alias``'s pool that are borrowed right now (0 if it has no pool).

    psycopg_pool counts a connection being opened in the background as part of the pool, so the
    count is taken again until it is ``expect`` (what the caller asserts) or ``settle`` seconds
    pass (generous: on a loaded machine a background connect can take a while); the last count
    is returned either way, for the caller to assert.
    """
    pool = registry.get(alias)
    if pool is None or pool.closed:
        return 0
    deadline = time.monotonic() + settle
    while True:
        stats = pool.get_stats()
        in_use = stats["pool_size"] - stats["pool_available"]
        if in_use == expect or time.monotonic() > deadline:
            return in_use
        time.sleep(0.02)


#: A statement whose answer shows whether a borrower's session setting reached the next one.
TIMEOUT = "SELECT current_setting('statement_timeout')"


def hold_session() -> None:
    """Set session state on purpose (a setting of its own), as code that needs its session does:
    the thread then holds its connection until ``connection.close()``, outside requests too
    (where it would otherwise go back after each statement)."""
    with connection.cursor() as cursor:
        cursor.execute("SET pooled_pg_tests.held = 'on'")


def wait_backends_gone(conn: psycopg.Connection, pids, timeout: float = 30.0) -> None:
    """Wait until the server processes ``pids`` have left ``pg_stat_activity`` (``conn``: any
    connection to the server, outside the pools). After ``pg_terminate_backend()``: a backend
    sends its "terminating connection" message before it leaves the view, so then the client's
    socket has it to read (the pool's check finds the session dead), whatever the machine's load."""
    pids = [int(pid) for pid in pids]
    wait_until(
        lambda: conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [pids]).fetchone()[0] == 0,
        timeout=timeout,
        message=f"backends {pids} to end",
    )


def wait_statement_running(conn: psycopg.Connection, text: str, timeout: float = 30.0) -> None:
    """Wait until a backend other than ``conn``'s runs a statement containing ``text``."""
    wait_until(
        lambda: conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid() "
            "AND strpos(query, %s) > 0",
            [text],
        ).fetchone()[0],
        timeout=timeout,
        message=f"a backend running {text!r}",
    )


def one(sql: str):
    """The first value of ``sql``'s first row, through Django's default connection."""
    with connections["default"].cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()[0]


def backend_pid() -> int:
    return one("SELECT pg_backend_pid()")


def warnings_from(caplog, words: str) -> list[str]:
    """This package's WARNING lines that contain ``words``."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "django_pooled_pg" and r.levelno == logging.WARNING and words in r.getMessage()
    ]


def borrowed(alias: str = "default") -> int:
    """Connections of ``alias`` borrowed right now, by the ledger: exact at once (psycopg_pool's
    counts include connections it is still opening, see :func:`pool_in_use`). A connection
    parked for its thread's next borrow (release="transaction") is not counted."""
    return sum(1 for b in list(ledger.borrows.values()) if b.alias == alias and not b.parked)


def parked_conn(wrapper=None):
    """The connection ``wrapper`` (default: ``connections["default"]``) parked between statements or kept
    for its thread's next borrow, or None."""
    borrow = (wrapper or connections["default"])._borrow
    return borrow.conn if borrow is not None and borrow.parked else None


def is_kept(wrapper=None) -> bool:
    """Whether ``wrapper`` (default: ``connections["default"]``) kept its connection at its last return."""
    from django_pooled_pg.pooling.borrow import KEPT

    borrow = (wrapper or connections["default"])._borrow
    return borrow is not None and borrow.state is KEPT


def held_borrows() -> list:
    """Borrows in the ledger that still hold a connection: in use, or kept (parked) by a thread
    that has ended. A connection a living thread keeps for its next borrow is free to take."""
    return [b for b in list(ledger.borrows.values()) if not b.parked or not b.thread.is_alive()]


@pytest.fixture(autouse=True)
def fresh_event_log():
    """Each test sees the first warning of its own events (see django_pooled_pg.eventlog)."""
    eventlog.reset()


@pytest.fixture(autouse=True)
def pool_is_whole_after(request):
    """After every database test: every connection returned, none left idle in transaction."""
    yield
    if not request.node.get_closest_marker("django_db"):
        return
    for conn in connections.all(initialized_only=True):
        conn.close()
    for alias in connections:
        assert pool_in_use(alias) == 0, f"pool {alias!r} has connections checked out"
    params = connections["default"].settings_dict
    with psycopg.connect(
        dbname="postgres", user=params["USER"], host=params["HOST"], port=params["PORT"], autocommit=True
    ) as conn:
        # A backend whose client just closed its connection (a test's own plain connection)
        # takes a moment to leave pg_stat_activity (longer on a loaded machine); one our pool
        # left behind stays.
        deadline = time.monotonic() + 10
        while True:
            stuck = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%%'"
            ).fetchone()[0]
            if stuck == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert stuck == 0, "a backend was left idle in transaction"


def per_call(fn, n: int) -> float:
    """Seconds per call of ``fn``: the median of 5 rounds of ``n`` calls (for the cost figures
    some tests print; wall clock, so never asserted tightly)."""
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - started) / n)
    return statistics.median(rounds)
