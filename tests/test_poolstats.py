"""Pool statistics: snapshots, publishing, the fleet view and ``manage.py poolstats``, against the
real test server (the publishing thread itself runs under gunicorn in test_fleet_gunicorn.py)."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
import types

import pytest
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection, connections
from django.test.utils import override_settings

import django_pooled_pg
from django_pooled_pg import PoolExhausted, borrow, pinned
from django_pooled_pg.pooling.ledger import ledger
from django_pooled_pg.pooling.registry import registry
from django_pooled_pg.settings import find_stats_problems, read_stats_settings
from django_pooled_pg.telemetry import snapshot
from django_pooled_pg.telemetry.fleet import fleet_stats
from django_pooled_pg.telemetry.publisher import TABLE, publisher
from tests.app.models import Item
from tests.conftest import wait_backends_gone

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

ME = f"{snapshot.hostname()}:{os.getpid()}"


def poolstats(*args: str) -> tuple[int, str]:
    """(exit status, stdout) of ``manage.py poolstats ARGS`` in this process."""
    out = io.StringIO()
    try:
        call_command("poolstats", *args, stdout=out)
    except SystemExit as exc:
        return int(exc.code or 0), out.getvalue()
    return 0, out.getvalue()


def mine(fleet, alias: str = "default"):
    [process] = [p for p in fleet.aliases[alias].processes if (p.host, p.pid) == (snapshot.hostname(), os.getpid())]
    return process


def query(alias: str = "default") -> None:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1")
    connections[alias].close()


def hold(n: int, release: threading.Event, alias: str = "default") -> list[threading.Thread]:
    """``n`` threads that each borrow a connection and keep it until ``release`` is set."""
    got = threading.Barrier(n + 1)

    def run() -> None:
        with borrow(alias):
            Item.objects.using(alias).count()
            got.wait()
            release.wait(30)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    got.wait(10)
    return threads


# ----- application_name -------------------------------------------------------------------------


def test_pooled_connections_are_named_after_alias_host_and_pid(superuser):
    query()
    name = snapshot.application_name("default")
    assert name == f"dpp default {ME}"
    assert snapshot.parse_application_name(name) == ("default", snapshot.hostname(), os.getpid())
    assert snapshot.parse_application_name("psql") is None
    count = superuser.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [name]).fetchone()[0]
    assert count == registry.get("default").get_stats()["pool_size"] >= 1


def test_long_host_names_fit_in_63_bytes():
    name = snapshot.application_name("replica", pid=4194304, host="h" * 100)
    assert len(name.encode()) == 63 and name.endswith(":4194304")
    assert snapshot.parse_application_name(name) == ("replica", "h" * (63 - 12 - 8), 4194304)


def test_the_users_application_name_wins(superuser):
    wrapper = connections["default"]
    saved = wrapper.settings_dict["OPTIONS"]
    wrapper.close()
    wrapper.settings_dict["OPTIONS"] = {**saved, "application_name": "my shop"}
    try:
        query()
        assert (
            superuser.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'my shop'").fetchone()[0]
            >= 1
        )
        publisher.publish_now()
        fleet = fleet_stats("default")
        assert not fleet.aliases["default"].split_by_process
        assert mine(fleet).server is None
        assert fleet.aliases["default"].server_view.total >= 1  # still counted per alias
        status, out = poolstats("--database", "default")
        assert "cannot be split per process" in " ".join(out.split())  # (prose wraps at the width)
    finally:
        wrapper.close()
        wrapper.settings_dict["OPTIONS"] = saved
        wrapper.close_pool()


# ----- Snapshots and publishing -------------------------------------------------------------------


def test_snapshot_of_this_process():
    query()
    before = ledger.stats_for("default").borrows
    release = threading.Event()
    threads = hold(2, release)
    try:
        [snap] = snapshot.take("default")
        assert (snap.host, snap.pid, snap.alias) == (snapshot.hostname(), os.getpid(), "default")
        assert snap.in_use == 2 and snap.max_size == 4 and snap.size >= 2
        assert snap.counters["borrows"] == before + 2
        assert snap.wait["count"] == snap.counters["borrows"]
        assert snap.application_name == f"dpp default {ME}" and not snap.own_application_name
        json.dumps(snap.to_dict())  # JSON-serialisable as it is
    finally:
        release.set()
        for t in threads:
            t.join()
    assert snapshot.take("default")[0].in_use == 0


def test_publish_and_read_back(superuser):
    query()
    query("other")
    assert publisher.publish_now() >= 2
    borrows = ledger.stats_for("default").borrows
    publisher.publish_now()
    assert ledger.stats_for("default").borrows == borrows, "publishing is not a borrow"

    fleet = django_pooled_pg.fleet_stats()
    process = mine(fleet)
    assert not process.stale and process.age < 5
    assert process.snapshot.counters["borrows"] == borrows
    assert process.snapshot.wait["count"] == borrows
    # The server's view of this process's connections is what pg_stat_activity says.
    by_state = dict(
        superuser.execute(
            "SELECT state, count(*) FROM pg_stat_activity WHERE application_name = %s GROUP BY state",
            [snapshot.application_name("default")],
        ).fetchall()
    )
    assert process.server.total == sum(by_state.values())
    assert process.server.by_state["idle"] == by_state.get("idle", 0)
    total = fleet.aliases["default"]
    assert total.counters["borrows"] >= borrows and total.wait.count >= borrows
    assert {"default", "other"} <= set(fleet.aliases)
    [capacity] = fleet.capacity
    assert capacity.max_connections == 100 and capacity.fleet_max == 8 and not capacity.over


def test_stale_rows_are_marked_left_out_of_totals_and_pruned(superuser):
    query()
    publisher.publish_now()
    superuser.execute(
        f"INSERT INTO {TABLE} (host, pid, alias, started_at, published_at, stale_after, data) "
        "SELECT 'gone-host', 1, alias, started_at, now() - interval '60 seconds', stale_after, "
        "jsonb_set(jsonb_set(data, '{host}', '\"gone-host\"'), '{pid}', '1') "
        f"FROM {TABLE} WHERE pid = %s AND alias = 'default'",
        [os.getpid()],
    )
    fleet = fleet_stats("default")
    [gone] = [p for p in fleet.aliases["default"].processes if p.host == "gone-host"]
    assert gone.stale and gone.age >= 60
    assert fleet.aliases["default"].max_size == 4, "stale rows are not in the totals"
    status, out = poolstats("--database", "default")
    assert "gone-host:1 STALE" in out
    with override_settings(POOLED_PG={"STATS_INTERVAL": None, "PRUNE_AFTER": 30}):
        publisher.publish_now()
    assert not [p for p in fleet_stats("default").aliases["default"].processes if p.host == "gone-host"]


def test_one_table_of_counters_recorded_and_published():
    """AliasStats counts exactly the counters of stats.COUNTERS (the per-view ones, rollbacks and
    503s, as the sum of its views'), and a snapshot publishes each."""
    import dataclasses

    from django_pooled_pg.pooling.stats import COUNTER_NAMES, AliasStats, ViewStats

    per_view = [name for name in ViewStats.__slots__ if name in COUNTER_NAMES]
    assert per_view == ["rollbacks", "responses_503"]
    recorded = {f.name for f in dataclasses.fields(AliasStats) if f.type in (int, "int")}
    assert sorted(recorded | set(per_view)) == sorted(COUNTER_NAMES)
    assert all(isinstance(getattr(AliasStats, name), property) for name in per_view)
    query()
    assert list(snapshot.take("default")[0].counters) == list(COUNTER_NAMES)


def test_recording_recycled_and_lost(pool_options, superuser):
    pool_options(min_size=1, max_size=2, max_lifetime=0.2)
    query()
    time.sleep(0.3)
    query()  # the connection went back past its max_lifetime: closed and replaced
    assert ledger.stats_for("default").recycled >= 1
    before = snapshot.take("default")[0].counters
    kill = (
        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = %s AND pid <> pg_backend_pid()"
    )
    with pinned():  # (the same connection for both statements, outside a request)
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        # Only the borrowed connection's session: an idle sibling killed too would be found dead
        # by the pool's check after the discard, and be lost rightly.
        superuser.execute("SELECT pg_terminate_backend(%s)", [connection.connection.info.backend_pid])
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        except Exception:
            pass
        connection.close()
    after = snapshot.take("default")[0].counters
    # Broken in use: discarded when it goes back (and not counted again as lost: the published
    # "lost" added psycopg_pool's returns_bad, which counted this one twice).
    assert after["discarded"] > before["discarded"]
    assert after["lost"] == before["lost"]
    pool_options(min_size=1, max_size=2)  # (no max_lifetime: the connection below must not expire)
    query()  # a connection goes back idle (kept for this thread's next borrow)
    killed = [pid for pid, _ in superuser.execute(kill, [snapshot.application_name("default")]).fetchall()]
    wait_backends_gone(superuser, killed)  # the terminations have reached the sockets
    time.sleep(0.1)  # (past RECENT: the borrower looks before it hands it out)
    query()  # found dead when borrowed: lost, and replaced at once
    assert snapshot.take("default")[0].counters["lost"] > after["lost"]


# ----- The command ----------------------------------------------------------------------------


def test_table_output_never_shows_credentials():
    query()
    publisher.publish_now()
    status, out = poolstats()
    assert status == 0
    settings_dict = connections["default"].settings_dict
    assert f"default: database {settings_dict['NAME']} on {settings_dict['HOST']}:{settings_dict['PORT']}" in out
    assert f"{ME} " in out and "total (1 live)" in out and "capacity " in out
    assert "postgresql://" not in out and "user=" not in out and "password" not in out.lower()


def test_json_and_database_option():
    query()
    query("other")
    publisher.publish_now()
    status, out = poolstats("--json", "--database", "other")
    data = json.loads(out)
    assert list(data["aliases"]) == ["other"]
    [process] = data["aliases"]["other"]["processes"]
    assert process["pid"] == os.getpid() and process["counters"]["borrows"] >= 1
    assert set(process["wait"]) == {"count", "mean", "p50", "p95", "p99", "max"}
    assert data["capacity"][0]["available"] == 97


def test_check_is_zero_when_healthy_and_one_while_saturated(pool_options):
    # --window 0: timeouts and leaks of earlier tests in this process are not this test's.
    query()
    publisher.publish_now()
    status, out = poolstats("--check", "--window", "0")
    assert (status, out.split(":")[0]) == (0, "OK"), out

    release = threading.Event()
    threads = hold(4, release)  # every connection of the pool (max_size 4)
    try:
        assert publisher.publish_now() >= 1, "published from outside the saturated pool"
        status, out = poolstats("--check", "--window", "0")
        assert status == 1 and out.startswith("CRITICAL: pool 'default' of ") and "saturated: 4/4 in use" in out
        assert len(out.strip().splitlines()) == 1
    finally:
        release.set()
        for t in threads:
            t.join()
    publisher.publish_now()
    assert poolstats("--check", "--window", "0")[0] == 0


def test_check_fails_on_recent_timeouts(pool_options):
    pool_options(min_size=1, max_size=1, timeout=0.2)
    release = threading.Event()
    threads = hold(1, release)
    try:
        with pytest.raises(PoolExhausted):
            query()
    finally:
        release.set()
        for t in threads:
            t.join()
    publisher.publish_now()
    status, out = poolstats("--check")
    assert status == 1 and "borrowers timed out" in out, out
    time.sleep(1.1)
    assert poolstats("--check", "--window", "1")[0] == 0


@pytest.mark.slow  # (max_connections: restarts the cluster twice)
def test_capacity_warning_when_the_fleet_can_exceed_the_server(server):
    query()
    query("other")  # two pools of max_size 4 on this server: 8 connections at most
    publisher.publish_now()
    try:
        server.set_max_connections(10)  # 10 - 3 reserved for superusers = 7 < 8
        fleet = fleet_stats()
        [capacity] = fleet.capacity
        assert (capacity.fleet_max, capacity.available, capacity.over) == (8, 7, True)
        assert "WARNING: the fleet can exceed the server by 1" in capacity.describe()
        status, out = poolstats("--check")
        assert status == 1 and "over capacity on" in out and "may open 8 connections, the server takes 7" in out
    finally:
        server.set_max_connections(100)
        for alias in ("default", "other"):
            connections[alias].close()
            connections[alias].close_pool()


def test_missing_table_is_skipped_quietly(superuser, caplog):
    query()
    superuser.execute(f"ALTER TABLE {TABLE} RENAME TO poolsnapshot_away")
    try:
        publisher._logged.discard("no-table")
        with caplog.at_level(logging.INFO, logger="django_pooled_pg"):
            assert publisher.publish_now() == 0
            assert publisher.publish_now() == 0
        said = [r for r in caplog.records if "does not exist" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.INFO and said[0].exc_info is None
        assert publisher.last_outcome == "no-table"
        fleet = fleet_stats()
        assert fleet.errors and "migrate django_pooled_pg" in fleet.errors[0]
        status, out = poolstats("--check")
        assert status == 2 and out.startswith("UNKNOWN: no statistics table")
    finally:
        superuser.execute(f"ALTER TABLE poolsnapshot_away RENAME TO {TABLE}")
    assert publisher.publish_now() >= 1 and publisher.last_outcome == "ok"


def test_errors_make_a_non_zero_exit_status(superuser):
    superuser.execute(f"ALTER TABLE {TABLE} RENAME TO poolsnapshot_away")
    try:
        status, out = poolstats()
        assert status == 2 and "error: no statistics table" in out
        status, out = poolstats("--json")
        assert status == 2 and json.loads(out)["errors"]
    finally:
        superuser.execute(f"ALTER TABLE poolsnapshot_away RENAME TO {TABLE}")


def test_check_is_not_ok_when_no_process_publishes(superuser):
    superuser.execute(f"DELETE FROM {TABLE}")
    status, out = poolstats("--check")
    assert status == 2 and out.startswith("UNKNOWN: no process publishes statistics"), out
    status, out = poolstats()
    assert status == 0 and "no process publishes statistics" in out


def test_the_report_fits_the_width_it_has(monkeypatch):
    query()
    publisher.publish_now()
    monkeypatch.setenv("COLUMNS", "80")
    status, narrow = poolstats()
    assert status == 0 and max(len(line) for line in narrow.splitlines()) <= 80, narrow
    assert not any("waiting" in line and "idle in tx" in line for line in narrow.splitlines()), narrow
    monkeypatch.setenv("COLUMNS", "200")
    status, wide = poolstats()
    assert status == 0 and any("waiting" in line and "idle in tx" in line for line in wide.splitlines()), wide
    assert len(wide.splitlines()) < len(narrow.splitlines())


def test_watch_into_a_file_writes_plain_reports(monkeypatch):
    from django_pooled_pg.management.commands import poolstats as command

    query()
    publisher.publish_now()
    naps = []

    def nap(seconds):
        naps.append(seconds)
        if len(naps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(command, "time", types.SimpleNamespace(sleep=nap))  # (this module's only)
    status, out = poolstats("--watch", "0.5")
    assert status == 0 and "\x1b[" not in out and out.count("poolstats ") == 2 and "Ctrl-C" not in out


# ----- Settings -------------------------------------------------------------------------------


def test_stats_settings_defaults_and_validation(settings):
    settings.POOLED_PG = {}
    config = read_stats_settings()
    assert (config.interval, config.database, config.stale_after, config.prune_after) == (5.0, "default", 15.0, 300.0)
    settings.POOLED_PG = {"STATS_INTERVAL": 0}
    assert not read_stats_settings().enabled
    # Without STATS_DATABASE: "default" if it uses this ENGINE, else the first alias that does.
    settings.DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3"}, "pg": {"ENGINE": "django_pooled_pg"}}
    assert read_stats_settings().database == "pg"
    settings.DATABASES = connections.settings
    problems = find_stats_problems(
        {"STATS_INTERVL": 1, "PRUNE_AFTER": -1, "STATS_DATABASE": "nope"}, settings.DATABASES
    )
    assert [p.id for p in problems] == ["django_pooled_pg.E011", "django_pooled_pg.E012", "django_pooled_pg.E013"]
    assert 'did you mean "STATS_INTERVAL"' in problems[0].fix
    settings.POOLED_PG = {"STATS_INTERVAL": "often"}
    with pytest.raises(ImproperlyConfigured, match=r'POOLED_PG\["STATS_INTERVAL"\]: must be None or a number'):
        read_stats_settings()
    assert "django_pooled_pg.E012" in [e.id for e in run_checks()]
