"""A borrower that waits is one waiter, however long it waits.

``Pool.borrow()`` waits in slices (one connect attempt long, so a server that starts failing
fails the waiter at once); each slice queues a waiter in psycopg_pool's queue. A slice that
times out must leave the queue, or one waiting thread counts as two, three... in
``requests_waiting`` (what ``poolstats`` shows and ``max_waiting`` is checked against), and
borrowers are refused "N already waiting" although nobody else waits.
"""

from __future__ import annotations

import threading
import time

import pytest

from django_pooled_pg import borrow
from django_pooled_pg.errors import PoolExhausted
from django_pooled_pg.pooling.registry import registry
from tests.app.models import Item
from tests.conftest import borrowed
from testsupport.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def waiting() -> int:
    return registry.get("default").get_stats().get("requests_waiting", 0)


def user_check(conn) -> None:
    conn.execute("SELECT 1")


@pytest.mark.parametrize("check", [None, user_check], ids=["", "user-check"])
def test_a_waiting_borrower_is_counted_once_across_its_wait_slices(pool_options, check):
    """(With a ``check`` callback of the user's, psycopg_pool's own getconn() runs the wait.)"""
    pool_options(min_size=1, max_size=1, timeout=30, max_waiting=2, **({"check": check} if check else {}))
    release = threading.Event()
    outcomes: dict[str, str] = {}

    def holder() -> None:
        with borrow():
            Item.objects.count()
            release.wait(60)

    def waiter(name: str) -> None:
        try:
            with borrow():
                Item.objects.count()
            outcomes[name] = "served"
        except Exception as exc:  # (the assertion below shows which)
            outcomes[name] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    try:
        wait_until(lambda: borrowed() == 1, message="the holder's borrow")
        threads.append(threading.Thread(target=waiter, args=("first",)))
        threads[-1].start()
        wait_until(lambda: waiting() >= 1, message="the first waiter in the queue")

        # Watch the count while the first waiter's wait spans more than two of its slices.
        pool = registry.get("default")
        until = time.monotonic() + 2.5 * pool.fail_fast_timeout
        seen = set()
        while time.monotonic() < until:
            seen.add(waiting())
            time.sleep(0.02)
        assert seen == {1}, f"one thread waiting, counted as {sorted(seen)}"

        # max_waiting 2: a second borrower may wait too, rather than being refused at once.
        threads.append(threading.Thread(target=waiter, args=("second",)))
        threads[-1].start()
        wait_until(lambda: waiting() == 2 or "second" in outcomes, message="the second waiter")
        assert "second" not in outcomes, outcomes
    finally:
        release.set()
        for t in threads:
            t.join(60)
    assert outcomes == {"first": "served", "second": "served"}
    assert waiting() == 0


def test_borrowers_one_after_another_each_wait_out_the_timeout(pool_options):
    """Both connections held; three borrowers, one after another, each wait the whole timeout
    (three wait slices) and get "no connection within 3s", never "already waiting
    (max_waiting)": ``max_waiting`` counts borrowers, not the slices they waited."""
    pool_options(min_size=2, max_size=2, timeout=3, max_waiting=2)
    release = threading.Event()

    def holder() -> None:
        with borrow():
            Item.objects.count()
            release.wait(60)

    holders = [threading.Thread(target=holder) for _ in range(2)]
    for t in holders:
        t.start()
    try:
        wait_until(lambda: borrowed() == 2, message="the two holders' borrows")
        pool = registry.get("default")
        assert 3 >= 2 * pool.fail_fast_timeout, "the timeout spans several wait slices"
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(PoolExhausted) as refused:
                with borrow():
                    Item.objects.count()
            assert "max_waiting" not in str(refused.value), str(refused.value)
            assert time.monotonic() - started >= 2.9, "it waited the whole timeout"
            assert waiting() == 0, "a borrower that gave up left no waiter behind"
    finally:
        release.set()
        for t in holders:
            t.join(60)
