"""The pool's queue (psycopg_pool's own, through its public ``getconn()``/``putconn()``):
borrowers that find every connection in use wait in order and each gets a returned connection;
one whose wait times out leaves the queue and takes nothing with it."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection

from django_pooled_pg import pinned
from django_pooled_pg.errors import PoolExhausted
from tests.conftest import backend_pid, held_borrows, one, pool_in_use
from testsupport.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def test_many_threads_on_few_connections_all_finish_and_nothing_is_lost(pool_options):
    pool_options(min_size=2, max_size=2, timeout=20)
    pool = connection.pool
    pool.wait(timeout=5)
    queued = pool.get_stats().get("requests_queued", 0)
    errors, done = [], []

    def work():
        try:
            for i in range(40):
                assert one(f"SELECT {i}") == i
                connection.close()
            done.append(1)
        except Exception as exc:  # (reported below, with the others)
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(done) == 8
    assert pool.get_stats().get("requests_queued", 0) > queued, "borrowers waited in the queue"
    assert pool.get_stats()["pool_size"] == 2 and not pool._waiting
    # A thread that ended keeping its connection has it given back by the reaper, at once but
    # on the reaper's thread (tests/test_keep.py).
    wait_until(lambda: not held_borrows(), message="the ended threads' connections given back")
    assert pool_in_use() == 0 and not held_borrows()


def test_a_borrower_that_times_out_leaves_the_queue_and_takes_nothing(pool_options):
    pool_options(min_size=1, max_size=1, timeout=0.5)
    pool = connection.pool
    pool.wait(timeout=5)
    failures = []

    def borrow():
        try:
            backend_pid()
        except PoolExhausted as exc:
            failures.append(exc)
        finally:
            connection.close()

    with pinned():
        pid = backend_pid()  # the only connection, held by this thread
        thread = threading.Thread(target=borrow)
        started = time.monotonic()
        thread.start()
        thread.join(10)
        assert failures and time.monotonic() - started < 5
        connection.close()  # the connection goes back: nobody waits for it any more
    assert pool.get_stats()["pool_available"] == 1 and pool_in_use() == 0
    assert pool.get_stats()["requests_waiting"] == 0
    got = []
    other = threading.Thread(target=lambda: (got.append(backend_pid()), connection.close()))
    other.start()
    other.join(10)
    assert got == [pid], "the next borrower gets it at once"


def test_closing_the_pool_fails_its_waiters_at_once(pool_options):
    pool_options(min_size=1, max_size=1, timeout=20)
    pool = connection.pool
    pool.wait(timeout=5)
    outcome = []

    def borrow():
        try:
            pool.borrow()
            outcome.append("got one")
        except Exception as exc:
            outcome.append(type(exc).__name__)

    with pinned():
        backend_pid()  # the only connection, held
        thread = threading.Thread(target=borrow)
        thread.start()
        wait_until(lambda: pool._waiting, interval=0.01, message="the borrower in the queue")
        started = time.monotonic()
        pool.close(timeout=1)
        thread.join(10)
        assert outcome == ["PoolClosed"] and time.monotonic() - started < 5, outcome
        connection.close()  # (into a closed pool: closed)
