"""A thread keeps the connection it gave back for its next borrow (taken back without psycopg_pool's
queue), while any other borrower that finds no idle connection takes it, reset; a waiting
borrower always gets a returned connection at once."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection, connections

from django_pooled_pg import pinned
from tests.conftest import (
    TIMEOUT,
    backend_pid,
    held_borrows,
    is_kept,
    one,
    parked_conn,
    pool_in_use,
    wait_backends_gone,
)
from testsupport.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def in_thread(fn):
    """Run ``fn`` in a new thread that closes its connection after; its result."""
    out = []

    def run():
        try:
            out.append(fn())
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert out, "the thread failed"
    return out[0]


@pytest.fixture
def one_connection(pool_options):
    pool_options(min_size=1, max_size=1, timeout=5)
    connection.pool.wait(timeout=5)


def test_the_next_borrow_takes_the_kept_connection_without_the_queue(one_connection):
    pool, stats = connection.pool, connection.pool.stats
    pid = backend_pid()
    connection.close()
    assert is_kept() and connection.connection is None and pool_in_use() == 0
    requests, reused, borrows = pool.get_stats().get("requests_num", 0), stats.parked_reused, stats.borrows
    for _ in range(3):
        assert backend_pid() == pid
        connection.close()
    assert pool.get_stats().get("requests_num", 0) == requests, "no trip through psycopg_pool's queue"
    assert stats.parked_reused == reused + 3 and stats.borrows == borrows + 3


def test_a_kept_connection_is_reset_before_its_own_thread_uses_it_again(one_connection):
    pid = backend_pid()
    one("SELECT set_config('statement_timeout', '4321ms', false)")
    connection.close()
    assert parked_conn()._pooled_pg_pending, "kept with its reset sent (its answer read when taken back)"
    assert backend_pid() == pid and one(TIMEOUT) == "0"


def test_another_thread_takes_a_kept_connection_reset(pool_options):
    pool_options(min_size=1, max_size=1, timeout=30)  # (a long timeout: "at once" is far below it)
    connection.pool.wait(timeout=5)
    stats = connection.pool.stats
    one("SELECT set_config('statement_timeout', '4321ms', false)")
    pid = backend_pid()
    connection.close()  # kept by this thread: the pool's only connection
    taken = stats.parked_taken
    started = time.monotonic()
    assert in_thread(lambda: (backend_pid(), one(TIMEOUT))) == (pid, "0")
    assert time.monotonic() - started < 10, "taken at once, not after the pool's timeout (30 s)"
    assert stats.parked_taken == taken + 1
    assert backend_pid() == pid  # and back: this thread's own keep was taken, so it borrows
    connection.close()
    assert not held_borrows() and pool_in_use() == 0


def test_a_waiting_borrower_gets_the_returned_connection(one_connection):
    got = []
    waiter = threading.Thread(target=lambda: (got.append(backend_pid()), connection.close()))
    with pinned():
        pid = backend_pid()  # the only connection, held
        waiter.start()
        pool = connection.pool
        wait_until(lambda: pool.get_stats().get("requests_waiting", 0) >= 1, interval=0.01, message="the waiter")
        connection.close()
    assert not is_kept(), "a connection someone waits for is not kept"
    waiter.join(5)
    assert got == [pid]


def test_a_kept_connection_killed_meanwhile_is_replaced(one_connection, superuser):
    stats = connection.pool.stats
    pid = backend_pid()
    connection.close()
    lost = stats.lost
    superuser.execute("SELECT pg_terminate_backend(%s)", [pid])
    wait_backends_gone(superuser, [pid])  # the termination has reached the socket
    time.sleep(0.1)  # longer than a connection given back just now is trusted unchecked
    assert backend_pid() != pid  # no error: the dead session was noticed and another borrowed
    assert stats.lost == lost + 1
    connection.close()


def test_a_kept_connection_past_max_lifetime_is_recycled(pool_options, superuser):
    pool_options(min_size=1, max_size=1, timeout=5, max_lifetime=0.5)
    pid = backend_pid()
    connection.close()
    time.sleep(0.6)
    assert backend_pid() != pid
    connection.close()
    wait_backends_gone(superuser, [pid])  # the expired session was closed


def test_a_thread_that_ends_with_a_kept_connection_gives_it_back(one_connection):
    pool, stats = connection.pool, connection.pool.stats
    reclaimed = stats.reclaimed
    pid = in_thread(backend_pid)  # closes, keeps, ends
    wait_until(lambda: not held_borrows(), interval=0.02, message="the ended thread's connection given back")
    assert not held_borrows() and not pool._parked and len(pool._pool) == 1
    assert stats.reclaimed == reclaimed, "it was given back: nothing to warn about"
    assert backend_pid() == pid


def test_new_settings_drop_the_kept_connection(pool_options):
    pool_options(min_size=1, max_size=1, timeout=5)
    old_pool = connection.pool
    backend_pid()
    connection.close()
    kept = parked_conn()
    pool_options(min_size=1, max_size=2, timeout=5)  # (closes the wrapper: it stays kept)
    assert backend_pid() and connection.pool is not old_pool
    assert kept.closed and old_pool.closed


def test_a_parked_connection_parked_again_by_another_borrower_stays_theirs(pool_options):
    """release="transaction": a connection another borrower took from this thread's parking and
    parked again under its own borrow is not taken back as this thread's: its session is the
    other borrower's."""
    pool_options(min_size=1, max_size=1, timeout=5, release="transaction")
    one("SELECT set_config('statement_timeout', '1111ms', false)")  # parked, set_config does not pin
    parked, ready = threading.Event(), threading.Event()

    def other():
        one("SELECT set_config('statement_timeout', '2222ms', false)")  # takes it, parks it
        parked.set()
        ready.wait(5)
        connection.close()

    thread = threading.Thread(target=other)
    thread.start()
    assert parked.wait(5)
    try:
        assert one(TIMEOUT) == "0", "another borrower's session state"
    finally:
        ready.set()
        thread.join(5)
        connection.close()


def test_a_copy_of_the_connection_object_never_gives_back_or_takes_what_the_original_holds(one_connection):
    """copy.copy() of a wrapper (Django's own test suite makes them) shares its state: the copy
    must neither return the original's connection nor take its kept one back."""
    import copy

    with pinned():
        pid = backend_pid()  # held by the original
        duplicate = copy.copy(connections["default"])
        duplicate.close()  # not the copy's to give back
        assert pool_in_use(expect=1) == 1 and backend_pid() == pid  # the original still has it, working
    connection.close()  # kept by the original
    duplicate, stats = copy.copy(connections["default"]), connection.pool.stats
    taken = stats.parked_taken
    duplicate.ensure_connection()  # the copy borrows: it takes the kept one as any borrower would
    assert duplicate.connection.info.backend_pid == pid and stats.parked_taken == taken + 1
    duplicate.close()
    assert backend_pid() == pid  # and the original borrows it back in turn
