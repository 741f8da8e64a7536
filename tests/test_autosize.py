"""``max_size="auto"`` against the real server: the pool grows under a step in load, never past
its ceiling (``max_size_limit``, or the fleet budget's fair share), shrinks after the load ends,
and loses no borrowed connection while it resizes; each resize is logged with its reason and
counted."""

from __future__ import annotations

import logging
import re
import threading
import time

import pytest
from django.db import connections

from django_pooled_pg import borrow
from django_pooled_pg.pooling import autosize
from django_pooled_pg.pooling.queueing import size_for_wait, size_for_wait_share
from django_pooled_pg.pooling.registry import registry
from testsupport.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def statement(sql: str = "SELECT 1") -> None:
    with connections["default"].cursor() as cursor:
        cursor.execute(sql)


class Load:
    """``threads`` threads borrowing for ``hold`` seconds each, back to back, until stopped;
    every error kept, and every borrow's connection checked to be open and answering."""

    def __init__(self, threads: int, hold: float) -> None:
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.done = 0
        self.hold = hold
        self.threads = [threading.Thread(target=self.work) for _ in range(threads)]

    def work(self) -> None:
        try:
            while not self.stop.is_set():
                self.work_once()
        except BaseException as error:  # noqa: BLE001 (kept for the test to show)
            self.errors.append(error)
        finally:
            connections["default"].close()

    def work_once(self) -> None:
        with borrow("default", name="autosize-load"):
            statement(f"SELECT pg_sleep({self.hold})")
            statement()  # (the same connection, still open after the sleep)
        self.done += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


@pytest.fixture
def quick_calm(monkeypatch):
    """Shrink after 1 s of calm instead of 30 (the rule is the same; the test is shorter)."""
    monkeypatch.setattr(autosize, "CALM_FOR", 1.0)


@pytest.mark.parametrize("release", ["request", "transaction"])
def test_auto_grows_under_load_up_to_its_ceiling_and_shrinks_after(pool_options, quick_calm, caplog, release):
    pool_options(min_size=1, max_size="auto", max_size_limit=5, timeout=20, release=release)
    statement()
    connections["default"].close()
    pool = registry.get("default")
    assert pool.sizer is not None and pool.max_size == 1
    resizes = pool.stats.resizes
    sizes: list[int] = []
    caplog.set_level(logging.INFO, logger="django_pooled_pg.pool")

    with Load(threads=8, hold=0.05) as load:
        # A step from nothing to 8 borrowers: the pool grows to its ceiling, and no further.
        wait_until(lambda: sizes.append(pool.max_size) or pool.max_size == 5, message="max_size to reach 5")
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # (it stays there while the load lasts)
            sizes.append(pool.max_size)
            assert pool.get_stats()["pool_size"] <= 5
            time.sleep(0.05)
    assert not load.errors, load.errors
    assert max(sizes) == 5 and sizes[-1] == 5
    grown = [r.getMessage() for r in caplog.records if "max_size 1 -> " in r.getMessage()]
    assert grown and ("queued at max_size" in grown[0] or "borrowers waited" in grown[0])

    # The load ended: after the calm time it shrinks, a quarter at a time, down to min_size, and
    # closes the connections above the new size.
    wait_until(lambda: pool.max_size == 1, timeout=60, message=lambda: f"max_size to fall to 1 (is {pool.max_size})")
    wait_until(lambda: pool.get_stats()["pool_size"] <= 1, message="the connections above max_size to close")
    assert any("calm for" in r.getMessage() for r in caplog.records)
    assert pool.stats.resizes - resizes >= 3  # 1 -> ... -> 5, 5 -> ... -> 1


def test_a_shrink_under_load_loses_no_borrowed_connection(pool_options, quick_calm):
    """Shrinking from 6 while 2 borrowers hold connections for 0.2 s at a time: every borrow
    completes on an open connection, and the pool closes the extra ones as they come back."""
    pool_options(min_size=1, max_size="auto", max_size_limit=6, timeout=20)
    statement()
    connections["default"].close()
    pool = registry.get("default")
    with Load(threads=10, hold=0.05) as load:
        wait_until(lambda: pool.max_size == 6, message="max_size to reach 6")
    assert not load.errors, load.errors
    with Load(threads=2, hold=0.2) as load:  # (some connections borrowed at every shrink)
        wait_until(lambda: pool.max_size <= 3, timeout=60, message=lambda: f"max_size to fall (is {pool.max_size})")
        done = load.done
        wait_until(lambda: load.done >= done + 4, message="the borrowers to go on after the shrink")
    assert not load.errors, load.errors
    wait_until(lambda: pool.get_stats()["pool_size"] <= pool.max_size, message="the pool to close what is above")


def test_the_fleet_budgets_fair_share_is_the_ceiling(pool_options):
    """With a fleet budget and no max_size_limit, one process grows to its fair share of the
    budget, not beyond."""
    pool_options(min_size=1, max_size="auto", fleet_max_size=6, timeout=20)
    statement()
    connections["default"].close()
    pool = registry.get("default")
    ceiling = pool.sizer.ceiling
    assert 1 <= ceiling <= 6
    with Load(threads=10, hold=0.05) as load:
        wait_until(lambda: pool.max_size == ceiling, message=f"max_size to reach the fair share {ceiling}")
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert pool.max_size <= ceiling and pool.get_stats()["pool_size"] <= ceiling
            time.sleep(0.05)
    assert not load.errors, load.errors


def borrowed_three(pool_options):
    """A pool of max_size 4 with 3 connections borrowed straight from it (none idle)."""
    pool_options(min_size=1, max_size=4, timeout=20)
    statement()
    connections["default"].close()
    pool = registry.get("default")
    conns = [pool.getconn() for _ in range(3)]
    # On a busy machine psycopg_pool's growth, run in the background while the borrowers
    # queued, may have opened a fourth: take it and close it, so that the 3 borrowed are all.
    while pool.get_stats()["pool_size"] > 3:
        extra = pool.getconn()
        extra.close()
        pool.putconn(extra)
    assert pool.get_stats()["pool_size"] == 3
    return pool, conns


def test_the_budget_and_a_smaller_size_together_close_what_the_larger_asked(pool_options):
    """The fleet budget asks 2 connections back while all 3 are borrowed, then a smaller
    max_size wants 1 closed: both count from the same connections, so 2 close as they come back
    (not 1: a later ask does not overwrite an earlier one's), both given back to the budget."""
    pool, conns = borrowed_three(pool_options)
    given = pool.stats.budget_given_back
    assert pool._shed(2, budget=True) == 0  # (nothing idle: they close as they come back)
    pool.resize_max(2)  # (3 connections against 2)
    for conn in conns:
        pool.putconn(conn)
    assert sum(conn.closed for conn in conns) == 2
    assert pool.stats.budget_given_back - given == 2
    assert pool.get_stats()["pool_size"] == 1


def test_growing_again_calls_off_the_closes_a_smaller_size_asked(pool_options):
    """max_size falls to 1 while 3 connections are borrowed, then grows back to 4 before they
    return: none of them is closed."""
    pool, conns = borrowed_three(pool_options)
    pool.resize_max(1)
    pool.resize_max(4)
    for conn in conns:
        pool.putconn(conn)
    assert not any(conn.closed for conn in conns)
    assert pool.get_stats()["pool_size"] == 3


def test_a_borrower_a_returning_connection_serves_before_the_sizer_looks_grows_nothing(pool_options, monkeypatch):
    """A borrower queued at max_size wakes the sizer, which waits (two mean holds; 2 s here)
    before it looks: a holder gives back meanwhile, the borrower is served, and the pool keeps
    its size. A sizer that looked at once grew it for a borrower one return served (each
    connection opened costs the server a backend start)."""
    monkeypatch.setattr(autosize.AutoSize, "settle", lambda self: 2.0)
    pool_options(min_size=1, max_size="auto", max_size_limit=5, timeout=20)
    statement()
    connections["default"].close()
    pool = registry.get("default")
    # (The first look may grow it for the first borrower's wait, the first connection's opening.)
    first = pool.sizer.last
    wait_until(lambda: pool.sizer.last is not first, message="the sizer's first look")
    resizes, size = pool.stats.resizes, pool.max_size
    held = [pool.getconn() for _ in range(size)]
    served: list[object] = []

    def borrower() -> None:
        conn = pool.getconn()
        served.append(conn)
        pool.putconn(conn)

    thread = threading.Thread(target=borrower)
    thread.start()
    wait_until(lambda: served or pool.get_stats().get("requests_waiting"), message="the borrower to queue at max_size")
    pool.putconn(held[0])
    thread.join(30)
    assert served
    wait_until(lambda: not pool.sizer.queued, message="the sizer to look")
    assert pool.max_size == size and pool.stats.resizes == resizes, pool.sizer.reason
    for conn in held[1:]:
        pool.putconn(conn)


def pool_of_one(pool_options):
    """A real pool of fixed size 1 for the default alias, opened, with no sizer of its own: the
    tests below make theirs, so that no upkeep thread looks in between."""
    pool_options(min_size=1, max_size=1, timeout=20)
    statement()
    connections["default"].close()
    return registry.get("default")


def queue_behind_a_holder(pool, before_the_queue=lambda: None) -> None:
    """A thread holds the pool's one connection 0.2 s, and this thread borrows meanwhile: one
    borrower that waited about 0.2 s. ``before_the_queue`` runs once the holder holds it."""

    def hold_once() -> None:
        Load(1, 0.2).work_once()
        connections["default"].close()

    holders = pool.stats.view("autosize-load").wait
    held = holders.count
    hold = threading.Thread(target=hold_once)
    hold.start()
    # (its borrow counted, wait included: under load the reset of the connection it took can
    # pass 1 ms, a wait that must not fall in the window of a sizer made next)
    wait_until(
        lambda: holders.count > held and pool.get_stats().get("pool_available", 1) == 0,
        message="the holder to borrow",
    )
    before_the_queue()
    with borrow("default", name="queued"):  # (waits for the holder's 0.2 s)
        statement()
    connections["default"].close()
    hold.join(30)


def test_a_look_soon_after_the_last_leaves_the_waits_to_the_next(pool_options, monkeypatch):
    """A look less than half a look's interval after the last one judges nothing: borrowers
    that queued for one hold in it (waits far above GROW_AT of the holds) do not grow the pool
    until a look over a long enough window. (The regular look 0.1 s after a woken one grew
    pools on such windows in bench/sizing.py.) A sizer of the test's own, on a real pool of
    fixed size, so that no upkeep thread looks in between."""
    pool = pool_of_one(pool_options)
    assert pool.sizer is None
    sizer = autosize.AutoSize(pool, limit=4)
    monkeypatch.setattr(autosize, "LOOK_EVERY", 600.0)  # (every window here is "short")
    first = sizer.last
    for _ in range(autosize.GROW_WAITS):
        queue_behind_a_holder(pool)
    assert pool.stats.wait.total_us > 0.05 * pool.stats.hold.total_us  # (the share rule would grow)
    assert sizer.look() is None and sizer.last is first and pool.max_size == 1
    monkeypatch.setattr(autosize, "LOOK_EVERY", 0.0)
    assert sizer.look() is not None and pool.max_size > 1, sizer.reason


def test_one_borrower_that_waited_is_no_reason_to_grow(pool_options, monkeypatch):
    """The waits' share of the holds grows the pool only when two borrowers or more waited: one
    wait of 11 ms in half a second was 5% of the holds in bench/sizing.py, and grew a pool of 3
    that suited its load (1 erlang) to 5, past the backends a large pool opened. One borrower
    queued for a whole hold (a share far above GROW_AT) grows nothing; a window with a second
    one does. A sizer of the test's own, on a real pool of fixed size, so that no upkeep thread
    looks in between; made once the holder holds, so that the holder's own borrow is not in its
    window."""
    pool = pool_of_one(pool_options)
    monkeypatch.setattr(autosize, "LOOK_EVERY", 0.0)  # (no window is too short to judge)
    sizers: list[autosize.AutoSize] = []
    queue_behind_a_holder(pool, lambda: sizers.append(autosize.AutoSize(pool, limit=4)))
    sizer = sizers[0]
    first = sizer.last
    assert pool.stats.wait.total_us - first.wait.total_us > 0.05 * (pool.stats.hold.total_us - first.hold.total_us)
    assert sizer.look() is None and pool.max_size == 1, sizer.reason
    queue_behind_a_holder(pool)
    sizer.last = first  # (a window with both waits)
    assert sizer.look() is not None and pool.max_size > 1, sizer.reason


def test_a_share_growth_grows_to_where_the_share_rule_would_stop(pool_options, monkeypatch):
    """The waits' share grows the pool to the fewest connections at which an M/M/c queue
    offered the load the look saw waits less than GROW_AT of its holds on average, by one at
    least: about 3 for the 1 erlang here. The rule before (a 1% chance of waiting, as
    ``--advise`` sizes, and half again) gave 5 for it, and grew bench/sizing.py's pools to 5
    where 3 served. Two borrowers queued behind a holder on a real pool of size 1; a sizer of
    the test's own with a ceiling that does not bind."""
    pool = pool_of_one(pool_options)
    monkeypatch.setattr(autosize, "LOOK_EVERY", 0.0)  # (no window is too short to judge)
    sizer = autosize.AutoSize(pool, limit=16)
    for _ in range(autosize.GROW_WAITS):
        queue_behind_a_holder(pool)
    grown = sizer.look()
    match = re.search(r"load ([0-9.]+) erlangs", sizer.reason)
    assert grown is not None and match, sizer.reason
    load = float(match.group(1))  # (as the reason rounds it)
    sizes = {max(2, size_for_wait_share(load + d, autosize.GROW_AT)) for d in (-0.005, 0.0, 0.005)}
    assert grown in sizes, sizer.reason
    assert grown < size_for_wait(load), sizer.reason  # (what --advise's rule gives)


def test_the_window_that_starts_at_a_growth_is_not_judged(pool_options, monkeypatch):
    """The look after a growth does not grow the pool again on the waits' share: its window
    holds the borrowers that queued while the connections the growth asked for were being
    opened (in bench/sizing.py the look after a growth to 3 found 8% and grew to 5, where 3
    served the load, and the fleet peaked one backend above the large pool). The window after
    that one is judged. A sizer of the test's own on a real pool; the test keeps the pool's
    connections in use but one, so that the queued borrowers wait at each size."""
    pool = pool_of_one(pool_options)
    monkeypatch.setattr(autosize, "LOOK_EVERY", 0.0)  # (no window is too short to judge)
    sizer = autosize.AutoSize(pool, limit=16)
    held: list[object] = []

    def queue_twice() -> None:
        held.extend(pool.getconn() for _ in range(pool.max_size - 1 - len(held)))
        for _ in range(autosize.GROW_WAITS):
            queue_behind_a_holder(pool)

    queue_twice()
    grown = sizer.look()
    assert grown is not None and grown > 1, sizer.reason
    queue_twice()
    assert sizer.look() is None and pool.max_size == grown, sizer.reason
    queue_twice()
    assert sizer.look() is not None and pool.max_size > grown, sizer.reason
    for conn in held:
        pool.putconn(conn)
