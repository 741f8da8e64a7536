"""PoolMiddleware and the borrow ledger: every request gives back, threads that end give back,
leaks are reported, exhaustion and a dead server answer 503 quickly."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from django.core.checks import run_checks
from django.db import OperationalError, connection, connections
from django.test import AsyncClient, Client
from django.test.utils import override_settings

from django_pooled_pg import PoolExhausted, borrow, pinned, signals
from django_pooled_pg.pooling.ledger import current_view, ledger
from django_pooled_pg.pooling.registry import registry
from tests.app.models import Item
from tests.conftest import borrowed, held_borrows, hold_session, pool_in_use, warnings_from
from testsupport.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def counters():
    return ledger.stats_for("default")


def test_view_without_queries_borrows_nothing():
    before = counters().borrows
    assert Client().get("/no-db/").status_code == 200
    assert counters().borrows == before


def test_request_gives_its_connection_back():
    # Django's test client disconnects Django's own end-of-request handler: only the
    # middleware can give the connection back here.
    response = Client().get("/query/")
    assert response.status_code == 200
    assert connection.connection is None
    assert pool_in_use() == 0 and not held_borrows()


def test_view_that_raises_gives_back():
    response = Client(raise_request_exception=False).get("/fails/")
    assert response.status_code == 500
    assert connection.connection is None and pool_in_use() == 0


def test_streaming_response_holds_until_closed():
    response = Client().get("/stream/")
    chunks = iter(response.streaming_content)
    assert next(chunks) == b"0,0\n"
    assert pool_in_use(expect=1) == 1, "the stream is still querying"
    rest = b"".join(chunks)
    assert rest == b"1,0\n2,0\n"
    response.close()
    assert pool_in_use() == 0 and not held_borrows()


def test_async_view_gives_back_on_the_thread_that_used_it():
    response = async_to_sync(AsyncClient().get)("/async/")
    assert response.status_code == 200
    assert not held_borrows(), [vars(b) for b in held_borrows()]
    assert pool_in_use() == 0
    assert Item.objects.filter(name="from async").count() == 1


def test_transaction_left_open_is_rolled_back_and_logged(caplog):
    rollbacks = counters().rollbacks
    assert Client().get("/left-open/").status_code == 200
    assert Item.objects.count() == 0
    assert counters().rollbacks == rollbacks + 1
    assert warnings_from(caplog, "view tests.app.views.left_open left a transaction open")


def test_atomic_left_open_is_rolled_back_and_the_thread_recovers(caplog):
    client = Client()
    assert client.get("/atomic-left-open/").status_code == 200
    assert warnings_from(caplog, "atomic_left_open left a transaction open")
    assert client.get("/query/").json() == {"count": 0}


def test_threads_that_end_without_closing_give_back(caplog, pool_options):
    """With Django's pool, max_size such threads exhaust it forever."""
    pool_options(min_size=1, max_size=2, timeout=10)
    reclaimed = counters().reclaimed

    def query_and_exit():
        hold_session()  # (else the connection goes back after each statement outside a request)
        Item.objects.count()  # and no connection.close()

    threads = [threading.Thread(target=query_and_exit, name=f"leaky-{i}") for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    started = time.monotonic()
    assert Client().get("/query/").status_code == 200
    assert time.monotonic() - started < 5.0  # not after the pool's timeout (10 s)
    wait_until(lambda: counters().reclaimed >= reclaimed + 6, interval=0.02, message="6 connections reclaimed")
    assert counters().reclaimed == reclaimed + 6
    assert warnings_from(caplog, "ended holding a connection")


def test_executor_threads_in_a_view_give_back(pool_options):
    pool_options(min_size=1, max_size=3, timeout=3)
    for _ in range(3):
        assert Client().get("/executor/").json() == {"counts": [0, 0, 0]}
    wait_until(lambda: not held_borrows(), interval=0.02, message="the executor threads' connections given back")
    assert not held_borrows() and pool_in_use() == 0


def hold_connection_too_long(reported: threading.Event):
    current_view.set("tests.leak_holder")  # (its own key in the event log: first report in full)
    Item.objects.count()
    # Held until the watchdog has reported it (checking every 0.05 s), and 0.5 s more: the
    # watchdog looks at it again several times, and must not report it twice.
    reported.wait(30)
    time.sleep(0.5)
    connection.close()


def test_leak_is_reported_once_with_the_borrowing_stack(caplog, pool_options):
    pool_options(min_size=1, max_size=2, leak_timeout=0.2)
    reports = []
    reported = threading.Event()

    def receiver(**kw):
        reports.append(kw)
        reported.set()

    signals.leak_reported.connect(receiver, weak=False, dispatch_uid="t")
    try:
        thread = threading.Thread(target=hold_connection_too_long, args=(reported,), name="holder")
        thread.start()
        thread.join()
    finally:
        signals.leak_reported.disconnect(dispatch_uid="t")
    leaks = warnings_from(caplog, "longer than leak_timeout=0.2s")
    assert len(leaks) == 1, leaks
    assert "hold_connection_too_long" in leaks[0] and "'holder'" in leaks[0]
    assert len(reports) == 1 and reports[0]["alias"] == "default" and reports[0]["held"] >= 0.2


def test_exhausted_pool_answers_503_within_the_timeout(caplog, pool_options):
    pool_options(min_size=2, max_size=2, timeout=0.5)
    results = {}

    def request(name):
        started = time.monotonic()
        response = Client().get("/slow/?s=3")
        results[name] = (response.status_code, time.monotonic() - started, response.get("Retry-After"))

    threads = [threading.Thread(target=request, args=(i,)) for i in range(3)]
    threads[0].start()
    threads[1].start()
    wait_until(lambda: borrowed() == 2, interval=0.01, message="both connections held")  # then the third
    threads[2].start()
    for t in threads:
        t.join()
    statuses = sorted(status for status, _, _ in results.values())
    assert statuses == [200, 200, 503], results
    status, elapsed, retry_after = results[2]
    # After the timeout (0.5 s), long before a holder gives its connection back (3 s).
    assert status == 503 and elapsed < 2.5 and retry_after == "1", results
    assert warnings_from(caplog, "503 for GET /slow/")
    assert "size 2/2" in warnings_from(caplog, "503 for GET /slow/")[0]


def test_full_waiting_queue_answers_503_at_once(pool_options):
    pool_options(min_size=1, max_size=1, timeout=10, max_waiting=1)
    results = []

    def request():
        started = time.monotonic()
        results.append((Client().get("/slow/?s=1").status_code, time.monotonic() - started))

    threads = [threading.Thread(target=request) for _ in range(3)]
    threads[0].start()
    wait_until(lambda: borrowed() == 1, interval=0.01, message="the connection held")
    threads[1].start()
    wait_until(
        lambda: registry.get("default").get_stats().get("requests_waiting", 0) == 1, interval=0.01, message="a waiter"
    )
    threads[2].start()
    for t in threads:
        t.join()
    assert sorted(s for s, _ in results) == [200, 200, 503]
    # At once: not after the pool's timeout (10 s), nor after the holder's 1 s.
    assert min(e for s, e in results if s == 503) < 1.0


@pytest.mark.slow  # (stops and starts the cluster)
def test_database_down_answers_503_fast_and_names_the_cause(caplog, server, pool_options):
    pool_options(min_size=1, max_size=2, timeout=10)
    client = Client()
    assert client.get("/query/").status_code == 200
    server.stop()
    try:
        for _ in range(3):  # a dead pooled connection first, then failing new connections
            started = time.monotonic()
            response = client.get("/query/")
            assert response.status_code == 503
            assert time.monotonic() - started < 5.0  # fast: not the pool's timeout (10 s)
            assert response["Retry-After"]
        assert any("Connection refused" in m or "connection" in m.lower() for m in warnings_from(caplog, "503"))
    finally:
        server.start()
    deadline = time.monotonic() + 30
    while client.get("/query/").status_code != 200:
        assert time.monotonic() < deadline, "the pool did not recover after the server came back"
        time.sleep(0.5)
    registry.close_all()  # the other alias's pool still holds connections the restart killed


def test_exhaustion_outside_requests_raises_pool_exhausted(pool_options):
    pool_options(min_size=1, max_size=1, timeout=0.3)
    errors = []

    def other():
        try:
            Item.objects.count()
        except Exception as exc:
            errors.append(exc)
        finally:
            connection.close()

    with pinned():
        Item.objects.count()  # this thread holds the only connection
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(errors) == 1 and isinstance(errors[0], PoolExhausted)
    assert isinstance(errors[0], OperationalError)
    assert "all 1 in use" in str(errors[0])


def test_borrow_context_manager():
    connection.close()
    with borrow() as wrapper:
        assert wrapper is connections["default"] and pool_in_use(expect=1) == 1
        with borrow():  # nested: still the same connection, still held after
            Item.objects.count()
        assert pool_in_use(expect=1) == 1
    assert pool_in_use() == 0 and connection.connection is None


def test_borrow_gives_back_a_left_transaction(caplog):
    with borrow():
        connection.set_autocommit(False)
        Item.objects.create(name="x")
    assert Item.objects.count() == 0
    assert warnings_from(caplog, "code outside a request left a transaction open")


@pytest.mark.parametrize("inside", ["autocommit", "atomic"])
def test_a_lost_connection_is_logged_as_lost_not_as_a_transaction_left_open(caplog, superuser, inside):
    """The server ends the session under a borrower (a restart, pg_terminate_backend): the log
    says the connection was lost, and rolls nothing back (on the code before: "left a
    transaction open ... it was rolled back" after a plain autocommit SELECT)."""
    from django.db import transaction

    from tests.conftest import backend_pid, wait_backends_gone

    stats = ledger.stats_for("default")
    rollbacks = stats.rollbacks
    connection.close()  # (borrow() gives back only what it borrowed)
    with borrow():
        with transaction.atomic() if inside == "atomic" else contextlib.nullcontext():
            pid = backend_pid()
            superuser.execute("SELECT pg_terminate_backend(%s)", [pid])
            wait_backends_gone(superuser, [pid])
            with pytest.raises(OperationalError):
                backend_pid()
            if inside == "atomic":
                transaction.set_rollback(True)
    assert not warnings_from(caplog, "left a transaction open"), caplog.text
    if inside == "autocommit":  # (in atomic, Django closes the connection when its rollback fails)
        assert warnings_from(caplog, "code outside a request lost its connection to database 'default'")
    assert stats.rollbacks == rollbacks
    assert Item.objects.count() == 0  # (the next borrow works)


def test_borrowed_and_returned_signals():
    events = []
    signals.connection_borrowed.connect(lambda **kw: events.append(("borrowed", kw)), weak=False, dispatch_uid="b")
    signals.connection_returned.connect(lambda **kw: events.append(("returned", kw)), weak=False, dispatch_uid="r")
    try:
        connection.close()
        Item.objects.count()
        connection.close()
    finally:
        signals.connection_borrowed.disconnect(dispatch_uid="b")
        signals.connection_returned.disconnect(dispatch_uid="r")
    assert [name for name, _ in events] == ["borrowed", "returned"]
    assert events[0][1]["alias"] == "default" and events[0][1]["wait"] >= 0
    assert events[1][1]["held"] >= 0 and events[1][1]["rolled_back"] is False


@pytest.mark.parametrize(
    "middleware, check_id",
    [
        (["django.middleware.common.CommonMiddleware"], "django_pooled_pg.W001"),
        (
            ["django.middleware.common.CommonMiddleware", "django_pooled_pg.middleware.PoolMiddleware"],
            "django_pooled_pg.W002",
        ),
        (["django_pooled_pg.middleware.PoolMiddleware", "django.middleware.common.CommonMiddleware"], None),
    ],
)
def test_middleware_system_check(middleware, check_id):
    with override_settings(MIDDLEWARE=middleware):
        ids = [m.id for m in run_checks() if m.id.startswith("django_pooled_pg.W")]
    assert ids == ([check_id] if check_id else [])


@pytest.mark.parametrize(
    "middleware, check_id",
    [
        (["django.middleware.common.CommonMiddleware"], "django_pooled_pg.W001"),
        (
            ["django.middleware.common.CommonMiddleware", "django_pooled_pg.middleware.PoolMiddleware"],
            "django_pooled_pg.W002",
        ),
    ],
)
def test_middleware_warnings_are_logged_when_a_process_starts(tmp_path, middleware, check_id):
    """A server process (gunicorn, uvicorn, a Celery worker) runs no system checks: the warning
    is logged once when Django sets up, as it is for any process."""
    (tmp_path / "startup_settings.py").write_text(f"from tests.settings import *\nMIDDLEWARE = {middleware!r}\n")
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "startup_settings",
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/nothing",  # (setting up connects to nothing)
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)]),
    }
    done = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(f"({check_id})") == 1, done.stderr


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_thread_connections_are_what_django_lists():
    """The middleware reads this thread's connection objects from asgiref's storage (a fraction of
    what ``connections.all()`` costs, see api.thread_connections); it must list the same objects,
    in a plain thread, in a thread that also ran an event loop, and inside one."""
    from django_pooled_pg.api import thread_connections

    def same() -> None:
        assert {id(w) for w in thread_connections()} == {id(w) for w in connections.all(initialized_only=True)}

    same()
    connection.ensure_connection()
    connections["other"].ensure_connection()
    same()
    assert {"default", "other"} <= {w.alias for w in thread_connections()}

    async def inside_a_loop() -> None:
        same()

    async_to_sync(inside_a_loop)()  # (asgiref keeps a "cvar" entry in the thread's storage)
    same()
    connection.close()
    connections["other"].close()

    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.append(len(list(thread_connections()))))
    worker.start()
    worker.join()
    assert seen == [0], "another thread's connections are its own"
