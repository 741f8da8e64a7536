"""Faults the pool must absorb without the user seeing an error: idle connections killed by the
server, a server restart, (more in issue 8's reliability suite)."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection
from django.test import Client

from django_pooled_pg.ledger import ledger
from django_pooled_pg.registry import registry
from tests.app.models import Item

pytestmark = pytest.mark.django_db(transaction=True)


def fill_pool(n: int) -> list[int]:
    """Make the pool hold ``n`` idle connections: borrow n at once from n threads, return them.
    Returns their backend pids."""
    barrier = threading.Barrier(n)
    pids = []

    def hold():
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
    time.sleep(0.2)  # let the terminations reach the sockets
    lost = ledger.stats_for("default").lost
    client = Client()
    for _ in range(8):
        assert client.get("/query/").status_code == 200
    assert ledger.stats_for("default").lost >= lost + 1


def test_first_request_after_a_server_restart_succeeds_quickly(pool_options, server):
    """psycopg_pool's check backs off between dead connections: with 8 of them the first request
    waited out a 30 s timeout. Here: 16 idle connections, and the first request succeeds."""
    pool_options(min_size=16, max_size=16, timeout=10)
    fill_pool(16)
    server.restart()
    started = time.monotonic()
    response = Client().get("/query/")
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.content
    assert elapsed < 2.0, f"first request after the restart took {elapsed:.2f}s"
    registry.close_all()  # other pools of this process hold connections the restart killed
