"""The fleet budget (OPTIONS["pool"]["fleet_max_size"]) in one process against the suite's
server: other processes' connections are stood in for by plain connections to the same database,
which the budget counts like any other. (tests/test_budget.py runs whole gunicorn fleets.)"""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest
from django.db import connections, transaction
from django.test import RequestFactory

from django_pooled_pg.errors import BudgetExhausted, PoolExhausted
from django_pooled_pg.pooling import budget as budget_module
from django_pooled_pg.pooling.ledger import ledger
from django_pooled_pg.pooling.registry import registry
from django_pooled_pg.settings import find_problems
from django_pooled_pg.telemetry.snapshot import application_name
from tests.conftest import one, plain_connection
from testsupport.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

COUNT = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND datname = current_database()"


def backends(conn) -> int:
    return conn.execute(COUNT).fetchone()[0]


def fresh(conn) -> int:
    """The backends of the database once the default alias's earlier pool is closed (the
    budget of the next one counts them all)."""
    connections["default"].close()
    registry.close("default")
    # Sessions of the pool just closed, or of a test that just ended, may linger a moment (longer
    # on a loaded machine): wait until none of the default alias's pools' sessions is left.
    pooled = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'dpp default %%'"
    )
    wait_until(lambda: conn.execute(pooled).fetchone()[0] == 0, message="the earlier pools' sessions to end")
    seen = [backends(conn)]
    while len(seen) < 3 or len(set(seen[-3:])) > 1:  # (and any other session that is ending)
        time.sleep(0.1)
        seen.append(backends(conn))
    return seen[-1]


def plain(application_name: str = "test other process"):
    return plain_connection(application_name=application_name)


class Sampler:
    """The database's client backends every 10 ms, from a connection to another database."""

    def __init__(self) -> None:
        self.conn = plain_connection("postgres")
        self.name, self.peak, self.stop = connections["default"].settings_dict["NAME"], 0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        query = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND datname = %s"
        while not self.stop.is_set():
            self.peak = max(self.peak, self.conn.execute(query, [self.name]).fetchone()[0])
            time.sleep(0.01)

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        self.conn.close()
        return self.peak


def hold(n: int, release: threading.Event) -> list[threading.Thread]:
    """``n`` threads that each borrow a connection of the default alias and hold it."""
    started = threading.Barrier(n + 1)

    def run() -> None:
        try:
            with transaction.atomic():  # (held in both release modes)
                one("SELECT 1")
                started.wait()
                release.wait()
        finally:
            connections["default"].close()

    threads = [threading.Thread(target=run) for _ in range(n)]
    for thread in threads:
        thread.start()
    started.wait(timeout=20)
    return threads


@pytest.mark.parametrize(
    ("value", "problem"),
    [(2, "E005"), (0, "E005"), ("all", "E005"), (True, "E005"), (3, None), ("auto", None), (None, None)],
)
def test_fleet_max_size_is_validated(value, problem):
    settings = {"ENGINE": "django_pooled_pg", "OPTIONS": {"pool": {"fleet_max_size": value}}}
    found = [p.id.split(".")[1] for p in find_problems("default", settings)]
    assert found == ([problem] if problem else [])


def test_no_budget_behind_pgbouncer():
    settings = {
        "ENGINE": "django_pooled_pg",
        "DISABLE_SERVER_SIDE_CURSORS": True,
        "OPTIONS": {"pool": {"fleet_max_size": 10, "behind_pgbouncer": True}},
    }
    problems = find_problems("default", settings)
    assert [p.id for p in problems] == ["django_pooled_pg.E023"]
    assert "max_db_connections" in str(problems[0])


@pytest.mark.parametrize("release", ["request", "transaction"])
def test_a_process_without_a_share_gets_a_fast_503_and_the_budget_holds(pool_options, superuser, release):
    """Other processes hold the whole budget: this one's first borrow is refused at once, not
    after the pool's timeout, and the server never has more backends than the budget; when
    they go, the next borrow gets a connection."""
    others = [plain() for _ in range(2)]
    budget = fresh(superuser) + 1  # everything the others hold, and the door
    pool_options(min_size=0, max_size=4, timeout=10, fleet_max_size=budget, release=release)
    sampler = Sampler()
    started = time.monotonic()
    with pytest.raises(BudgetExhausted, match="fleet budget"):
        one("SELECT 1")
    waited = time.monotonic() - started
    assert waited < 5.0, waited  # at once: well within the pool's timeout of 10 s, even on a busy machine
    pool = registry.get("default")
    assert pool.stats.budget_refused >= 1
    for conn in others:
        conn.close()
    # The others' sessions gone from the server's count, and the back-off after the refusal over.
    wait_until(lambda: backends(superuser) <= budget - 3, message="the other processes' sessions to end")
    wait_until(lambda: not pool.budget.refused_recently(), message="the back-off after the refusal to end")
    assert one("SELECT 1") == 1
    connections["default"].close()
    assert sampler.close() <= budget


def test_a_process_with_a_share_waits_for_its_own_connections(pool_options, superuser):
    """A process that holds connections and is refused more queues for its own, as without a
    budget, and its borrower that times out is told the budget held the pool back."""
    budget = fresh(superuser) + 3  # two for this process, and the door
    pool_options(min_size=0, max_size=4, timeout=3, fleet_max_size=budget)
    release = threading.Event()
    holders = hold(2, release)
    try:
        started = time.monotonic()
        with pytest.raises(BudgetExhausted):
            one("SELECT 1")
        assert time.monotonic() - started >= 2.5  # its timeout, not the fast 503
        assert isinstance(BudgetExhausted("x", alias="default"), PoolExhausted)
    finally:
        release.set()
        for thread in holders:
            thread.join()
    assert one("SELECT 1") == 1
    assert backends(superuser) <= budget


def test_a_newcomer_takes_the_reserve_and_idle_connections_above_the_fair_share_go_back(pool_options, superuser):
    """Another process's first connection takes the reserve: this process, now above its fair
    share, closes an idle connection within a look or two, and the reserve is free again."""
    budget = fresh(superuser) + 5  # three for this process, the newcomer's reserve, the door
    pool_options(min_size=0, max_size=4, timeout=10, fleet_max_size=budget)
    release = threading.Event()
    holders = hold(3, release)
    release.set()
    for thread in holders:
        thread.join()
    pool = registry.get("default")
    assert pool.get_stats()["pool_size"] == 3
    before = pool.stats.budget_given_back
    newcomer = plain(application_name("default", pid=1))  # (its pool's first connection)
    try:
        wait_until(lambda: pool.stats.budget_given_back != before, message="a connection given back")
        # fair share: (budget - 1) // 2 processes = 2
        assert pool.stats.budget_given_back == before + 1
        assert pool.get_stats()["pool_size"] == 2
        # the reserve and the door free again (once the closed session has left the server)
        wait_until(lambda: backends(superuser) <= budget - 2, message="the given-back session to end")
    finally:
        newcomer.close()
    assert one("SELECT 1") == 1


def test_auto_is_the_servers_capacity_less_the_headroom(pool_options, superuser):
    refused = ledger.stats_for("default").budget_refused
    pool_options(min_size=1, max_size=2, fleet_max_size="auto")
    assert one("SELECT 1") == 1
    max_connections, reserved = superuser.execute(
        "SELECT current_setting('max_connections')::int, current_setting('superuser_reserved_connections')::int"
        " + coalesce(current_setting('reserved_connections', true)::int, 0)"
    ).fetchone()
    pool = registry.get("default")
    assert pool.budget.size == budget_module.auto_size(max_connections - reserved)
    assert pool.budget.size <= max_connections - reserved - budget_module.AUTO_HEADROOM
    assert ledger.stats_for("default").budget_refused == refused


def test_the_budget_is_shown_by_poolstats_check_and_prometheus(pool_options, superuser):
    """After a refusal: the budget, this process's share and its refusals in ``poolstats``
    (table and --json), a warning from ``poolstats --check``, and the gauge in Prometheus."""
    from django_pooled_pg.telemetry.publisher import publisher
    from tests.test_poolstats import mine, poolstats

    budget = fresh(superuser) + 2  # one for this process, and the door
    pool_options(min_size=0, max_size=2, timeout=3, fleet_max_size=budget)
    release = threading.Event()
    holders = hold(1, release)
    try:
        with pytest.raises(BudgetExhausted):
            one("SELECT 1")
    finally:
        release.set()
        for thread in holders:
            thread.join()
    assert publisher.publish_now() >= 1
    status, out = poolstats("--json")
    data = json.loads(out)
    assert data["aliases"]["default"]["total"]["fleet_max_size"] == budget
    from django_pooled_pg.telemetry.fleet import fleet_stats

    process = mine(fleet_stats())
    assert process.snapshot.fleet_max_size == budget and process.snapshot.counters["budget_refused"] >= 1
    status, out = poolstats()
    assert f"fleet budget: 1 of {budget} connections held" in out, out
    status, out = poolstats("--check")
    assert status != 0 and "the fleet budget" in out, out
    from django_pooled_pg.prometheus import metrics

    exposition = metrics(RequestFactory().get("/metrics")).content.decode()
    assert 'django_pooled_pg_pool_fleet_max_size{alias="default"' in exposition
    assert "django_pooled_pg_budget_refused_total" in exposition


@pytest.mark.parametrize("release", ["request", "transaction"])
def test_connections_in_use_above_the_fair_share_go_back_when_returned(pool_options, superuser, release):
    """A busy process gives back what it holds above its fair share as its borrowers return
    connections, not only the idle ones (and keeps nothing meanwhile)."""
    budget = fresh(superuser) + 6  # four for this process, the reserve, the door
    pool_options(min_size=0, max_size=4, timeout=10, fleet_max_size=budget, release=release)
    busy, idle = threading.Event(), threading.Event()
    holders = hold(3, busy)
    holders += hold(1, idle)
    pool = registry.get("default")
    assert pool.get_stats()["pool_size"] == 4
    idle.set()
    holders[-1].join()
    before = pool.stats.budget_given_back
    # Two more processes: the fair share is (budget - 1) // 3 = 2, and the server is one over
    # the usable budget (as if the second had come through the door at the same moment).
    newcomers = [plain(application_name("default", pid=pid)) for pid in (1, 2)]
    try:
        wait_until(lambda: pool.stats.budget_given_back != before, message="the idle connection given back")
        assert pool.stats.budget_given_back == before + 1  # the idle one, at once
        busy.set()
        for thread in holders:
            thread.join()
        assert pool.stats.budget_given_back == before + 2  # the first to come back
        assert pool.get_stats()["pool_size"] == 2
    finally:
        busy.set()
        for conn in newcomers:
            conn.close()
    assert one("SELECT 1") == 1


def test_the_door_is_one_connection_per_host(pool_options, superuser):
    """Newcomers of different hosts may count in at the same moment (each host's one at a
    time), so the budget keeps one connection per host the server shows for them."""
    budget = fresh(superuser) + 4
    pool_options(min_size=0, max_size=4, timeout=1, fleet_max_size=budget)
    other_host = plain("dpp default elsewhere:1")
    release = threading.Event()
    try:
        # Usable: the budget less two doors (this host and "elsewhere"): the superuser, the
        # other host's connection and one of this process's (the reserve is for it: it holds
        # none yet, below its fair share). The second is refused.
        holders = hold(1, release)
        pool = registry.get("default")
        assert pool.budget.door == 2
        with pytest.raises(BudgetExhausted):
            one("SELECT 1")
        assert backends(superuser) <= budget - 2
    finally:
        release.set()
        other_host.close()
    for thread in holders:
        thread.join()


def in_call(thread: threading.Thread, *names: str) -> bool:
    """Whether ``thread`` is now inside calls of each of these functions."""
    frame, seen = sys._current_frames().get(thread.ident), set()
    while frame is not None:
        seen.add(frame.f_code.co_name)
        frame = frame.f_back
    return set(names) <= seen


def test_the_look_skips_its_turn_rather_than_wait_for_a_connection(pool_options, superuser):
    """The look (every 0.5 s on the pool's upkeep thread) takes a connection to count the fleet
    with. When none is free it skips its turn at once: queued, it would be a borrower waiting
    (connections coming back would go to it rather than be kept or parked, and
    ``max_size="auto"`` would grow the pool for it). Made to happen here: the pool's only
    connection is idle when the look asks for it and taken just before the look gets the pool's
    lock. (Before, the look queued and waited for it up to 0.5 s.)"""
    budget = fresh(superuser) + 5
    pool_options(min_size=1, max_size=1, timeout=10, fleet_max_size=budget)
    assert one("SELECT 1") == 1
    connections["default"].close()
    pool = registry.get("default")
    wait_until(lambda: pool.get_stats()["pool_available"] == 1, message="the connection idle in the pool")
    queued = pool.get_stats().get("requests_queued", 0)
    upkeep = pool._upkeeping
    with pool._lock:  # (the lock psycopg_pool hands connections out under)
        wait_until(lambda: in_call(upkeep, "look", "getconn"), message="the look to ask for a connection")
        conn = pool.getconn()  # (the lock is re-entrant: taken first, by this thread)
    try:
        wait_until(lambda: not in_call(upkeep, "look"), timeout=10, message="the look to end")
        assert pool.get_stats().get("requests_queued", 0) == queued
    finally:
        pool.putconn(conn)
    assert one("SELECT 1") == 1
