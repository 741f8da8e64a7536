"""``poolstats --check`` reads the fleet the table and the JSON read, and says what they show.

Each reading carries its own verdict (the table's ``check:`` line, the JSON's ``check``), computed
from the same :class:`~django_pooled_pg.telemetry.fleet.FleetStats` as the rows beside it; a
``--check`` run says OK exactly when a table shows live processes and nothing is wrong.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import threading

import pytest
from django.core.management import call_command
from django.db import connections

from django_pooled_pg.telemetry import snapshot
from django_pooled_pg.telemetry.publisher import TABLE, publisher
from tests.servers import WORKERS, live, running_fleet, traffic, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

LIVE = re.compile(r"^poolstats [^:]+:\d\d:\d\d: (\d+) live process\(es\)", re.M)


def poolstats(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    try:
        call_command("poolstats", *args, stdout=out)
    except SystemExit as exc:
        return int(exc.code or 0), out.getvalue()
    return 0, out.getvalue()


def readings() -> tuple[str, dict, tuple[int, str]]:
    """The table, the JSON and --check, one after the other."""
    table = poolstats("--window", "0")[1]
    data = json.loads(poolstats("--json", "--window", "0")[1])
    return table, data, poolstats("--check", "--window", "0")


def query() -> None:
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT 1")
    connections["default"].close()


def age_my_rows(superuser, seconds: float) -> None:
    superuser.execute(
        f"UPDATE {TABLE} SET published_at = now() - make_interval(secs => %s) WHERE host = %s AND pid = %s",
        [seconds, snapshot.hostname(), os.getpid()],
    )


def test_table_json_and_check_say_the_same(superuser):
    query()
    publisher.publish_now()
    table, data, (status, line) = readings()
    assert LIVE.search(table).group(1) == "1", table
    assert "check: OK: 1 live process(es)" in table, table
    assert data["live_processes"] == 1
    assert data["check"] == {"status": "OK", "exit_code": 0, "message": line.removeprefix("OK: ").strip()}
    assert status == 0 and line.startswith("OK: 1 live process(es)"), line

    # The row goes stale (its process stopped publishing): no reading counts it as live.
    age_my_rows(superuser, 3600)
    table, data, (status, line) = readings()
    assert LIVE.search(table).group(1) == "0", table
    assert "STALE" in table
    assert "check: UNKNOWN: 1 process(es) published, none within its STALE_AFTER" in table, table
    assert data["live_processes"] == 0 and data["check"]["status"] == "UNKNOWN"
    assert status == 2 and line.startswith("UNKNOWN: 1 process(es) published, none within its STALE_AFTER"), line

    # It publishes again: OK at once, everywhere.
    publisher.publish_now()
    table, data, (status, line) = readings()
    assert "check: OK: 1 live process(es)" in table and data["check"]["status"] == "OK" and status == 0, table


def test_nothing_published_is_unknown_in_every_reading():
    table, data, (status, line) = readings()
    assert "check: UNKNOWN: no process publishes statistics" in table, table
    assert data["check"]["exit_code"] == 2 and data["live_processes"] == 0
    assert status == 2 and line.startswith("UNKNOWN: no process publishes statistics"), line


@pytest.mark.slow
def test_check_agrees_with_the_table_of_a_gunicorn_fleet():
    """Three workers publishing; one killed (its row lingers until stale) and respawned. Every
    table's count of live processes is the count in its own check line, and --check run
    right after a table that shows live processes says OK."""
    with running_fleet() as fleet:
        stop = threading.Event()
        traffic(fleet.base, ["/shop/three/"], 2, stop)
        try:
            wait_for(f"{WORKERS} workers to publish", lambda: len(live(fleet.poolstats())) == WORKERS, timeout=60)
            victim = min(fleet.workers())
            os.kill(victim, signal.SIGKILL)
            seen_stale = False
            for _ in range(4):
                table = fleet.manage("poolstats").stdout
                shown = int(LIVE.search(table).group(1))
                check_line = next(x for x in table.splitlines() if x.startswith("check: "))
                assert check_line.startswith(f"check: OK: {shown} live process(es)"), table
                status, line = fleet.check()
                assert status == 0 and line.startswith("OK: "), (line, table)
                data = fleet.poolstats()
                assert data["check"]["status"] == "OK" and data["live_processes"] == len(live(data)), data
                seen_stale = seen_stale or "STALE" in table
            assert seen_stale or victim not in live(fleet.poolstats()), "the killed worker's row never went stale"
        finally:
            stop.set()
