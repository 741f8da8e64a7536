"""Request mode outside requests: a thread with no request, task or ``borrow()`` block around it
(an executor's thread, a management command) gives its connection back after each statement, so
that it never holds an idle one while others wait; a session it changed on purpose stays its own.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection

from django_pooled_pg import pinned, publish_now
from django_pooled_pg.cursors import BusyTimingMixin
from django_pooled_pg.pooling.ledger import current_view, ledger
from django_pooled_pg.pooling.registry import registry
from tests.app.models import Item
from tests.conftest import backend_pid, held_borrows, one
from testsupport.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def test_executor_threads_share_a_pool_smaller_than_the_executor(pool_options):
    """A management command's ThreadPoolExecutor(16) on a pool of 4: every task's queries are
    served, though its threads never call ``connection.close()``. (Before: 4 threads kept a
    connection each for their whole life, and the tasks of the 12 others failed with
    PoolExhausted after the timeout.)"""
    pool_options(min_size=1, max_size=4, timeout=3)
    reclaimed = ledger.stats_for("default").reclaimed

    def task(n: int) -> int:
        Item.objects.filter(name=f"task-{n}").exists()
        Item.objects.create(name=f"task-{n}")
        return Item.objects.filter(name=f"task-{n}").count()

    with ThreadPoolExecutor(max_workers=16) as executor:
        futures = [executor.submit(task, n) for n in range(64)]
        outcomes = [future.exception() or future.result() for future in futures]
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert not failures, f"{len(failures)} of 64 tasks failed: {failures[0]!r}"
    assert outcomes == [1] * 64 and Item.objects.count() == 64
    # The threads have ended: what they left parked goes back without a "thread ended holding
    # a connection" (nothing was held).
    wait_until(lambda: not held_borrows(), message="the executor threads' connections back")
    assert ledger.stats_for("default").reclaimed == reclaimed


def other_thread_borrows() -> str:
    """Whether another thread gets a connection now (within the pool's timeout)."""
    outcome = []

    def query() -> None:
        try:
            outcome.append(f"got {backend_pid()}")
        except Exception as exc:
            outcome.append(type(exc).__name__)
        finally:
            connection.close()

    thread = threading.Thread(target=query)
    thread.start()
    thread.join(30)
    return outcome[0]


@pytest.fixture
def one_connection(pool_options):
    pool_options(min_size=1, max_size=1, timeout=0.5)
    connection.pool.wait(timeout=5)


def test_a_set_outside_a_request_keeps_the_session(one_connection):
    pid = backend_pid()
    assert other_thread_borrows() == f"got {pid}"  # between statements, free for others
    with connection.cursor() as cursor:
        cursor.execute("SET pooled_pg_tests.tenant = 'acme'")
    assert other_thread_borrows() == "PoolExhausted"  # the session is this thread's now
    assert one("SELECT current_setting('pooled_pg_tests.tenant', true)") == "acme"
    assert backend_pid() == pid
    connection.close()
    assert other_thread_borrows() == f"got {pid}"  # given back (and reset) at close()


def test_a_temporary_table_outside_a_request_keeps_the_session(one_connection):
    backend_pid()
    assert other_thread_borrows().startswith("got ")
    with connection.cursor() as cursor:
        cursor.execute("CREATE TEMPORARY TABLE scratch (n int)")
        cursor.execute("INSERT INTO scratch VALUES (1), (2)")
    assert other_thread_borrows() == "PoolExhausted"
    assert one("SELECT count(*) FROM scratch") == 2
    connection.close()


def test_pinned_outside_a_request_keeps_one_session(one_connection):
    with pinned():
        pid = backend_pid()
        assert other_thread_borrows() == "PoolExhausted"
        assert backend_pid() == pid and one("SELECT pg_backend_pid()") == pid
        assert connection.connection is not None
    assert other_thread_borrows() == f"got {pid}"  # after the block, back between statements


def test_a_connection_parked_outside_a_request_is_held_by_a_request_that_takes_it(one_connection):
    """Parked by code outside a request (a test's query before a test-client call), then taken
    back in a request (or task) of the same thread: held to its end, as its own borrow would be."""
    pid = backend_pid()
    assert connection.connection is None  # parked
    token = current_view.set("tests.view")
    try:
        assert backend_pid() == pid
        assert connection.connection is not None  # held for the request
        assert other_thread_borrows() == "PoolExhausted"
        connection.close()
    finally:
        current_view.reset(token)


def test_holds_given_back_per_statement_are_busy_and_not_timed(pool_options):
    """Outside a request each hold is a statement (or the thread's statements in a row), all of it busy for ``poolstats --advise``
    (``release="transaction"`` would hold it too: nothing to give back), and its cursors do not
    time statements, which would cost each about 4.5k instructions; a request's borrow of the
    same connection times them again, a connection parked outside and taken back in a request
    included."""
    pool_options(min_size=1, max_size=1)
    connection.close()
    view = registry.get("default").stats.view(None)
    held, busy = view.hold.total_us, view.busy
    for _ in range(2):
        with connection.cursor() as cursor:
            assert not isinstance(cursor.cursor, BusyTimingMixin)
            cursor.execute("SELECT pg_sleep(0.02)")
        time.sleep(0.05)  # (between statements: not held)
    assert connection.connection is None  # parked
    registry.get("default").count_parked_holds()  # (as a reader does: the second hold ended at its park)
    holds = (view.hold.total_us - held) / 1e6
    assert 0.04 <= holds < 0.09 and view.busy - busy == pytest.approx(holds, abs=1e-5)
    token = current_view.set("tests.view")
    try:
        with connection.cursor() as cursor:  # (the parked connection, taken back by the request)
            assert isinstance(cursor.cursor, BusyTimingMixin)
        connection.close()
        with connection.cursor() as cursor:  # (a new borrow in a request)
            assert isinstance(cursor.cursor, BusyTimingMixin)
        connection.close()
    finally:
        current_view.reset(token)
    with connection.cursor() as cursor:
        assert not isinstance(cursor.cursor, BusyTimingMixin)
    connection.close()


def test_a_cursor_class_a_tool_put_on_the_connection_stays(pool_options):
    """A tool that wraps the connection's cursor class (OpenTelemetry's psycopg instrumentation
    does it at connect, with a subclass) keeps its class through borrows inside and outside
    requests: the per-borrow choice of timed or untimed cursors leaves such a class alone.
    (Missed at first: the choice replaced it, and OpenTelemetry's query spans were lost.)"""
    pool_options(min_size=1, max_size=1)
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        conn = cursor.cursor.connection
        traced = type("Traced", (conn.cursor_factory,), {})
        conn.cursor_factory = traced
    connection.close()
    for view in (None, "tests.view", None):
        token = current_view.set(view)
        try:
            for _ in range(2):
                with connection.cursor() as cursor:
                    assert type(cursor.cursor) is traced, view
                    cursor.execute("SELECT 1")
            connection.close()
        finally:
            current_view.reset(token)


def test_a_request_that_takes_back_a_parked_connection_counts_only_its_own_busy_time(pool_options):
    """With a timed class a tool wrapped (kept: see above), statements outside a request are
    timed too; the hold a request starts by taking back the connection they parked counts only
    its own statements as busy, not theirs."""
    pool_options(min_size=1, max_size=1)
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        conn = cursor.cursor.connection
        # (as OpenTelemetry wraps it at connect: the class the connection was opened with)
        conn.cursor_factory = type("Traced", (registry.get("default").cursor_classes[0],), {})
    connection.close()
    for _ in range(3):  # (outside a request: parked after each)
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(0.03)")
    token = current_view.set("tests.busy-view")
    try:
        with connection.cursor() as cursor:  # (taken back by the request)
            cursor.execute("SELECT 1")
        time.sleep(0.12)  # (the view's own work: held, not busy)
        connection.close()
    finally:
        current_view.reset(token)
    view = registry.get("default").stats.views["tests.busy-view"]
    assert view.hold.total_us >= 120_000 and view.busy < 0.03, view.busy


def test_a_connection_the_statistics_publisher_used_goes_back_between_statements(one_connection):
    """The publisher writes its rows on a pool connection, in a transaction with ``SET LOCAL``
    (nothing of it outlives the transaction); its next borrower outside a request must still
    give it back after each statement. (Before the fix the connection went back to the pool
    marked as changed by a SET, and its next borrower kept it as if it had run the SET.)"""
    publish_now()
    pid = backend_pid()
    assert other_thread_borrows() == f"got {pid}"
