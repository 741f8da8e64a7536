"""Faults the pool must absorb: idle connections killed by the server, a server restart (with
requests in flight), the server down at start, a silent network, recycling under load, and
max_connections taken by others. Nothing reaches the user but fast 503s."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback

import psycopg
import pytest
from django.db import connection
from django.test import Client

from django_pooled_pg import pinned
from django_pooled_pg.pooling.ledger import ledger
from django_pooled_pg.pooling.registry import registry
from tests.app.models import Item
from tests.conftest import borrowed, per_call, plain_connection, pool_in_use, wait_backends_gone
from tests.tcpproxy import SilentProxy
from testsupport.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def fill_pool(n: int) -> list[int]:
    """Make the pool hold ``n`` idle connections: borrow n at once from n threads, return them.
    Returns their backend pids."""
    barrier = threading.Barrier(n)
    pids = []

    def hold():
        with pinned():  # (n at once: outside a request it would go back after the statement)
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                pids.append(cursor.fetchone()[0])
            barrier.wait(timeout=10)
        connection.close()

    threads = [threading.Thread(target=hold) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = registry.get("default").get_stats()
    assert stats["pool_available"] >= n, stats
    return pids


def test_idle_connections_killed_by_the_server_are_replaced_unseen(pool_options, superuser):
    pool_options(min_size=4, max_size=4, timeout=5)
    pids = fill_pool(4)
    killed = superuser.execute(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid) AS t",
        [pids],
    ).fetchone()[0]
    assert killed == 4
    wait_backends_gone(superuser, pids)  # the terminations have reached the sockets
    time.sleep(0.1)  # and the connections went back longer ago than the pool trusts them unchecked
    lost = ledger.stats_for("default").lost
    client = Client()
    for _ in range(8):
        assert client.get("/query/").status_code == 200
    assert ledger.stats_for("default").lost >= lost + 1


#: The faults below with and without a fleet budget: the budget's counts run on the same server,
#: and must not make its failures worse (README, "A fleet-wide budget").
BUDGETS = pytest.mark.parametrize("budget", [{}, {"fleet_max_size": 50}], ids=["", "budget"])


@pytest.mark.slow  # (restarts the cluster)
@BUDGETS
def test_first_request_after_a_server_restart_succeeds_quickly(pool_options, server, budget):
    """psycopg_pool's check backs off between dead connections: with 8 of them the first request
    waited out a 30 s timeout. Here: 16 idle connections, and the first request succeeds."""
    pool_options(min_size=16, max_size=16, timeout=10, **budget)
    fill_pool(16)
    server.restart()
    started = time.monotonic()
    response = Client().get("/query/")
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.content
    # Not after psycopg_pool's back-off, nor the pool's timeout (10 s); generous for a busy machine.
    assert elapsed < 5.0, f"first request after the restart took {elapsed:.2f}s"
    figure("first request after a restart, 16 idle connections", elapsed)
    registry.close_all()  # other pools of this process hold connections the restart killed


def held_on_server(superuser: psycopg.Connection) -> int:
    """Connections of this process's ``default`` pool on the server (by application_name)."""
    name = f"dpp default %:{os.getpid()}"
    return superuser.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s", [name]).fetchone()[
        0
    ]


@pytest.mark.slow  # (stops the cluster for 4 s)
@BUDGETS
def test_a_full_pool_serves_at_once_after_an_outage_with_traffic(pool_options, server, budget):
    """min_size == max_size and requests during an outage: each slot's replacement attempt fails
    and backs off (psycopg_pool: 1, 2, 4 s...), so every slot is an attempt waiting its turn when
    the server comes back. The first request after it is back succeeds anyway (a borrower's own
    connection attempt takes a waiting attempt's slot), and the pool never holds more than
    max_size connections while the attempts catch up."""
    pool_options(min_size=4, max_size=4, timeout=10, **budget)
    fill_pool(4)
    pool = registry.get("default")
    client = Client(raise_request_exception=False)
    down = time.monotonic()
    server.stop()
    try:
        while time.monotonic() - down < 4:  # attempts at about 0, 1 and 3 s fail; the next ~7 s
            assert client.get("/query/").status_code == 503
            time.sleep(0.1)
    finally:
        server.start()
    up = time.monotonic()
    status, elapsed = timed_get(client, "/query/")
    assert status == 200, f"the first request after the outage: {status} after {elapsed:.2f}s"
    assert all(client.get("/query/").status_code == 200 for _ in range(5))
    figure("first request after an outage with traffic, min_size == max_size", elapsed)
    with plain_connection() as superuser:

        def at_most_max_size() -> tuple[int, int]:
            counts = pool.get_stats()["pool_size"], held_on_server(superuser)
            assert max(counts) <= 4, f"pool_size, connections held: {counts}"
            return counts

        # psycopg_pool doubles an attempt's delay after each failure (1, 2, 4 s, +-10%): every
        # attempt waiting when the server came back has its turn within about twice the outage.
        # Each connects then, but the one whose slot the probe took: never more than 4.
        settled = down + 2.2 * (up - down) + 1.0
        while time.monotonic() < settled:
            at_most_max_size()
            time.sleep(0.1)
        wait_until(lambda: at_most_max_size() == (4, 4), message="the pool whole again: 4 connections")
    registry.close_all()  # other pools of this process hold connections the outage killed


# ----- The reliability suite --------------------------------------------------------------------


def figure(name: str, value: float, unit: str = "s") -> None:
    """A measured figure, for the README's Reliability section (shown with ``pytest -s``)."""
    print(f"\nFIGURE {name}: {value:.4g} {unit}")


def timed_get(client: Client, path: str) -> tuple[int, float]:
    started = time.monotonic()
    status = client.get(path).status_code
    return status, time.monotonic() - started


def first_success(path: str = "/query/", within: float = 10.0) -> float:
    """Seconds until ``path`` answers 200, polling; fails the test after ``within`` seconds."""
    client = Client(raise_request_exception=False)
    started = time.monotonic()
    statuses = []
    while time.monotonic() - started < within:
        status = client.get(path).status_code
        if status == 200:
            return time.monotonic() - started
        assert status == 503, f"a request failed with {status}, not 503"
        statuses.append(status)
        time.sleep(0.05)
    pytest.fail(f"no success within {within}s: {statuses}")


def concurrently(paths: list[str], join: float = 30.0) -> list[tuple[int, float]]:
    """Each path requested from its own thread at once: [(status, seconds)]; every thread must
    end within ``join`` seconds."""
    results: list[tuple[int, float] | None] = [None] * len(paths)

    def run(i: int) -> None:
        try:
            results[i] = timed_get(Client(raise_request_exception=False), paths[i])
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + join
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hanging = [t for t in threads if t.is_alive()]
    if hanging:
        frames = sys._current_frames()
        stacks = "\n".join("".join(traceback.format_stack(frames[t.ident])) for t in hanging)
        pytest.fail(f"{len(hanging)} request thread(s) hang:\n{stacks}")
    return results  # type: ignore[return-value]


@pytest.mark.slow  # (restarts the cluster)
def test_in_flight_requests_fail_with_503_during_a_restart(pool_options, server):
    """Requests holding a connection when the server restarts get 503 (not 500); the next
    request succeeds."""
    pool_options(min_size=4, max_size=4, timeout=5)
    fill_pool(4)
    results: list[tuple[int, float] | None] = []
    worker = threading.Thread(target=lambda: results.extend(concurrently(["/query-wait-query/?s=2"] * 4)))
    worker.start()
    # Every request has borrowed for its first query and is "calling another service" (2 s).
    wait_until(lambda: borrowed() == 4, message="every request holding a connection")
    server.restart()
    worker.join(30)
    assert not worker.is_alive()
    statuses = [status for status, _ in results]
    assert statuses == [503] * 4, statuses
    assert Client().get("/query/").status_code == 200
    registry.close_all()  # other pools of this process hold connections the restart killed


def test_liveness_check_costs_a_poll_not_a_round_trip(pool_options):
    """What ``Pool.usable()`` costs on a connection used within ``ping_after``: one poll() of
    its socket; against a round trip when it pings. Figures for the README."""
    pool_options(min_size=1, max_size=1, timeout=5)
    Item.objects.count()
    connection.close()
    pool = registry.get("default")
    conn = pool.getconn()
    try:

        def just_returned():  # given back < RECENT (50 ms) ago: not even a poll
            conn._pooled_pg_returned_at = time.monotonic()
            assert pool.usable(conn)

        def recent():  # given back 0.2 s ago, within ping_after: a poll() of the socket
            conn._pooled_pg_returned_at = time.monotonic() - 0.2
            assert pool.usable(conn)

        def stale():
            conn._pooled_pg_returned_at = time.monotonic() - 3600
            assert pool.usable(conn)

        skip = per_call(just_returned, 5000)
        poll = per_call(recent, 5000)
        ping = per_call(stale, 500)
        execute = per_call(lambda: conn.execute(""), 500)
    finally:
        pool.putconn(conn)
    figure("usable() given back < 50 ms ago", skip * 1e6, "us")
    figure("usable() with a poll", poll * 1e6, "us")
    figure("usable() with ping", ping * 1e6, "us")
    figure("conn.execute('')", execute * 1e6, "us")
    assert poll < ping / 3, (poll, ping)


@pytest.mark.slow  # (stops the cluster for 10 s)
@BUDGETS
def test_server_down_when_the_app_starts(pool_options, server, budget):
    """A fresh pool while the server is down: fast 503s, and recovery by itself, without
    waiting out psycopg_pool's reconnection back-off (1, 2, 4, 8 s...)."""
    server.stop()
    try:
        registry.close_all()
        pool_options(min_size=2, max_size=4, timeout=10, **budget)
        client = Client(raise_request_exception=False)
        latencies = []
        down_since = time.monotonic()
        # psycopg_pool retries at about 0, 1, 3, 7 and 15 s: coming back at ~10.5 s, its next
        # attempt is ~4 s away.
        while time.monotonic() - down_since < 10:
            response = client.get("/query/")
            latencies.append(time.monotonic() - down_since - sum(latencies))
            assert response.status_code == 503
            assert response["Retry-After"] == "5"
        # Fast: not the pool's timeout (10 s); generous for a busy machine.
        assert max(latencies) < 5.0, latencies
        figure("503 latency, server down (max)", max(latencies))
    finally:
        server.start()
    recovered = first_success(within=5)
    figure("first success after the server came up", recovered)
    assert recovered < 2.5
    registry.close_all()


@pytest.mark.slow  # (waits out connect and pool timeouts: 6 s)
def test_silent_network(default_settings, server):
    """A proxy that stops forwarding (sockets stay open): new borrowers get 503 within the
    configured timeouts, no request thread is left hanging once the network is back, and the
    pool recovers."""
    proxy = SilentProxy(server.host, server.port)
    try:
        default_settings(
            HOST="127.0.0.1",
            PORT=str(proxy.port),
            options={"connect_timeout": 2},
            pool={"min_size": 2, "max_size": 4, "timeout": 3, "ping_after": 0.3},
        )
        fill_pool(2)
        # One request is between its two queries when the network goes silent (its second query
        # comes 1.5 s after its first: after the pause below, while the borrowers below wait).
        in_flight: list[tuple[int, float]] = []
        worker = threading.Thread(target=lambda: in_flight.extend(concurrently(["/query-wait-query/?s=1.5"])))
        worker.start()
        wait_until(lambda: borrowed() >= 1, message="the request's first borrow")
        proxy.pause()
        time.sleep(0.5)  # idle connections are now older than ping_after: a borrow pings them
        results = concurrently(["/query/"] * 4, join=20)
        statuses = [status for status, _ in results]
        slowest = max(elapsed for _, elapsed in results)
        assert statuses == [503] * 4, results
        # timeout 3 s; a ping and a connect attempt bounded by connect_timeout (2 s) each; and
        # slack for a busy machine.
        assert slowest < 3 + 2 * 2 + 3, results
        figure("503 latency, silent network (slowest of 4)", slowest)
        # Its second query was sent into the silence: it waits for an answer. libpq has no read
        # timeout; on a real network tcp_user_timeout ends it (README: recommended settings).
        assert worker.is_alive()
        proxy.resume()
        worker.join(10)
        assert not worker.is_alive(), "the in-flight request still hangs after the network came back"
        assert in_flight[0][0] in (200, 503), in_flight
        recovered = first_success(within=8)
        figure("first success after the network came back", recovered)
        assert recovered < 4
        assert pool_in_use("default") == 0
    finally:
        proxy.resume()
        connection.close()
        registry.close("default")
        proxy.close()


def test_a_probe_after_a_stale_failure_adds_no_connection_beyond_max_size(default_settings, server):
    """The pool is full of working connections, but its latest connection attempt failed (a
    probe into a silent network; in the CI run that found this, an attempt that timed out after
    the network came back). The next probe connects: with no attempt of psycopg_pool's waiting
    for a slot, its connection is closed, not added as a slot's stand-in. Before, it was added
    and the pool held max_size + 1 connections, one more available than its size (``in use``
    -1) for good."""
    proxy = SilentProxy(server.host, server.port)
    try:
        default_settings(
            HOST="127.0.0.1",
            PORT=str(proxy.port),
            options={"connect_timeout": 1},
            pool={"min_size": 2, "max_size": 2, "timeout": 3},
        )
        fill_pool(2)
        pool = registry.get("default")
        proxy.pause()
        wait_until(lambda: pool.probe() or pool.health.failing, message="a probe into the silent network")
        assert pool.health.failing and pool.get_stats()["pool_size"] == 2
        proxy.resume()
        wait_until(lambda: pool.probe() or not pool.health.failing, message="a probe that connects")
        stats = pool.get_stats()
        assert (stats["pool_size"], stats["pool_available"]) == (2, 2), stats
        with plain_connection() as superuser:
            # (The probe that timed out in the silence left its startup packet in the proxy,
            # which forwards it on resume: that backend lives until it finds the socket closed.)
            wait_until(
                lambda: held_on_server(superuser) == 2,
                timeout=10,
                message="the pool's 2 connections alone on the server",
            )
    finally:
        proxy.resume()
        connection.close()
        registry.close("default")
        proxy.close()


def test_max_lifetime_and_max_idle_recycle_without_failures(pool_options):
    pool_options(min_size=2, max_size=4, timeout=5, max_lifetime=0.6, max_idle=0.4)
    stats = ledger.stats_for("default")
    recycled, opened = stats.recycled, stats.opened
    # Steady load from 4 threads for 2.5 s: every connection reaches max_lifetime several times.
    stop = time.monotonic() + 2.5
    statuses: list[int] = []

    def load():
        client = Client(raise_request_exception=False)
        while time.monotonic() < stop:
            statuses.append(client.get("/query/").status_code)
        connection.close()

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert stats.recycled - recycled >= 4, (stats.recycled, recycled)
    assert stats.opened - opened >= 4
    # Light load: the connections above min_size are closed after max_idle.
    pool = registry.get("default")
    client = Client()

    def shrunk() -> bool:
        assert client.get("/query/").status_code == 200
        return pool.get_stats()["pool_size"] <= 2

    wait_until(shrunk, message=lambda: f"the pool to shrink to min_size: {pool.get_stats()}")
    assert pool.get_stats()["pool_size"] == 2, pool.get_stats()


@pytest.mark.slow  # (restarts the cluster twice)
def test_max_connections_taken_by_others(pool_options, server, caplog):
    """Every server slot taken by other clients: fast 503s with a log line naming the cause,
    never a hang; recovery when the slots free up."""
    others: list[psycopg.Connection] = []
    server.set_max_connections(12)
    try:
        registry.close_all()  # the restart killed every pool's connections
        for _ in range(30):
            try:
                others.append(psycopg.connect(server.url(), connect_timeout=5))
            except psycopg.OperationalError as exc:
                assert "too many clients" in str(exc)
                break
        else:
            pytest.fail("max_connections was never reached")
        pool_options(min_size=1, max_size=4, timeout=10)
        client = Client(raise_request_exception=False)
        with caplog.at_level(logging.WARNING, logger="django_pooled_pg"):
            for _ in range(3):
                status, elapsed = timed_get(client, "/query/")
                assert status == 503
                assert elapsed < 5.0, elapsed  # fast: not the pool's timeout (10 s)
        assert "too many clients" in caplog.text, caplog.text
        figure("503 latency, max_connections taken", elapsed)
        for conn in others:
            conn.close()
        others.clear()
        recovered = first_success(within=5)
        figure("first success after slots freed", recovered)
        assert recovered < 2.5
    finally:
        for conn in others:
            conn.close()
        connection.close()
        registry.close_all()
        server.set_max_connections(100)
        registry.close_all()


@pytest.mark.slow  # (restarts the cluster)
def test_atomic_writes_during_a_restart_fail_with_503(pool_options, server):
    """Six threads creating orders in atomic blocks while the server restarts: each request
    commits (200) or gets 503, never 500. (Django's atomic closes a connection whose rollback
    failed and borrows a new one to restore autocommit, before the error reaches the middleware:
    that was a 500.)"""
    pool_options(min_size=4, max_size=4, timeout=5)
    stop = threading.Event()
    statuses: list[int] = []

    def run():
        client = Client(raise_request_exception=False)
        while not stop.is_set():
            statuses.append(client.get(f"/order/?name=atomic-{threading.get_ident()}-{len(statuses)}").status_code)
        connection.close()

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: statuses.count(200) > 10, message="orders committed before the restart")
        server.restart()
        time.sleep(1.0)  # writes go on after the restart
    finally:
        stop.set()
    for t in threads:
        t.join(20)
    registry.close_all()
    counts = {s: statuses.count(s) for s in set(statuses)}
    assert set(counts) <= {200, 503}, counts
    assert counts.get(200, 0) > 10, counts
