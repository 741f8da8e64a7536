"""Readiness (django_pooled_pg.health) and its django-health-check backend, against the real
server: it stops and comes back, a pool is held to saturation with borrowers waiting, a database
refuses sessions. The view must flip to 503 and back, and never take a pool slot."""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, connections, transaction
from django.test import Client, override_settings
from django.urls import resolve

from django_pooled_pg.checks import check_stats_settings
from django_pooled_pg.pooling.ledger import ledger
from django_pooled_pg.pooling.registry import registry
from django_pooled_pg.settings import HEALTH_DEFAULTS, find_stats_problems, read_health_settings
from django_pooled_pg.telemetry import health
from tests.conftest import per_call, plain_connection
from tests.servers import Fleet
from testsupport.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

MODES = pytest.mark.parametrize("release", ["request", "transaction"])
#: Short intervals, so that a test sees a stop within a fraction of a second.
FAST = {"STATS_INTERVAL": None, "HEALTH_PROBE_INTERVAL": 0.2, "HEALTH_PROBE_TIMEOUT": 0.5}


def figure(name: str, value: float, unit: str = "us") -> None:
    """A measured figure for the README (shown with ``pytest -s``)."""
    print(f"\nFIGURE {name}: {value:.4g} {unit}")


@pytest.fixture(autouse=True)
def fresh_health() -> Iterator[None]:
    """Each test starts without cached probes or saturation seen by an earlier one."""
    health._probes.clear()
    health._saturated_since.clear()
    with override_settings(POOLED_PG=FAST):
        yield
    health._probes.clear()
    health._saturated_since.clear()


def ready(path: str = "/ready/") -> tuple[int, dict]:
    response = Client(raise_request_exception=False).get(path)
    return response.status_code, json.loads(response.content)


def health_check() -> tuple[int, dict]:
    """django-health-check's view with our backend (tests/app/urls.py), as JSON."""
    pytest.importorskip("health_check")
    response = Client(raise_request_exception=False).get("/ht/", {"format": "json"})
    return response.status_code, json.loads(response.content)


def wait_status(get: Callable[[], tuple[int, dict]], status: int, within: float = 30) -> tuple[dict, float]:
    """Poll ``get`` until it answers ``status``: its body and the seconds it took (a figure, not
    asserted: ``within`` is a deadline generous enough for a loaded machine)."""
    started = time.monotonic()
    while True:
        got, body = get()
        if got == status:
            return body, time.monotonic() - started
        assert time.monotonic() - started < within, f"still {got} after {within}s: {body}"
        time.sleep(0.05)


def test_ready_names_each_alias_and_no_secret():
    status, body = ready()
    assert status == 200, body
    assert body["status"] == "ready"
    assert set(body["aliases"]) == {"default", "other", "replica"}
    # (another test of the session may have opened a pool of "other": then it reports that pool)
    other = body["aliases"]["other"]
    assert other["ready"] is True and other["server"] == "reachable", other
    assert other["state"] in ("no pool", "ok") and ("pool" in other) == (other["state"] == "ok"), other
    params = connections["default"].settings_dict
    text = json.dumps(body)
    for secret in (params["HOST"], params["PORT"], params["NAME"], params["USER"]):
        assert secret not in text
    print(json.dumps(body))


def test_the_view_is_marked_exempt():
    assert resolve("/ready/").func._pooled_pg_exempt is True


@pytest.mark.slow  # (stops and starts the cluster)
@MODES
def test_a_stopped_server_without_traffic_makes_it_503_and_back(pool_options, server, release):
    """An idle pool does not notice a stopped server: the probe does, without traffic."""
    pool_options(min_size=2, max_size=4, timeout=5, release=release)
    assert Client().get("/query/").status_code == 200
    connection.close()
    assert ready()[0] == 200
    server.stop()
    try:
        body, noticed = wait_status(ready, 503)
        figure("503 after the server stopped, no traffic", noticed, "s")
        assert body["status"] == "unavailable"
        default = body["aliases"]["default"]
        assert default["state"] == "unreachable" and not default["ready"], body
        assert "default: server unreachable (Connection refused)" in body["reason"].split("; "), body
        assert body["aliases"]["other"]["state"] == "unreachable"
        print(json.dumps(body))
    finally:
        server.start()
    body, back = wait_status(ready, 200)
    figure("200 after the server came back", back, "s")
    assert Client().get("/query/").status_code == 200
    registry.close_all()  # other pools of this process hold connections the stop killed


@pytest.mark.slow  # (stops and starts the cluster)
@MODES
def test_a_failing_pool_recovers_without_traffic(pool_options, server, release):
    """Requests while the server is down leave the pool failing; once it is back, the checks
    alone (a process out of the load balancer gets no traffic) bring it back to 200. The outage
    outlasts reconnect_timeout, so psycopg_pool has stopped retrying (as after 5 minutes by
    default): only the check's attempt can bring the pool back."""
    server.stop()
    try:
        registry.close_all()
        pool_options(min_size=1, max_size=4, timeout=3, release=release, reconnect_timeout=0.5)
        assert Client(raise_request_exception=False).get("/query/").status_code == 503
        assert registry.get("default").health.failing
        # psycopg_pool gives up (reconnect_failed) after its first retry, 1 s or so later: it no
        # longer counts the connection it was trying to open.
        pool = registry.get("default")
        wait_until(
            lambda: pool.get_stats()["pool_size"] == 0, message=lambda: f"psycopg_pool to give up: {pool.get_stats()}"
        )
        body, _ = wait_status(ready, 503)
        assert body["aliases"]["default"]["state"] == "unreachable"
    finally:
        server.start()
    _, back = wait_status(ready, 200)
    figure("200 after the server came back, failing pool, no traffic", back, "s")
    assert not registry.get("default").health.failing
    assert Client().get("/query/").status_code == 200
    registry.close_all()


def test_a_database_refusing_sessions_is_failing(default_settings):
    """The server answers TCP but refuses the session (no such database): what the probe cannot
    see, the pool's attempts do."""
    default_settings(NAME="dpp_no_such_database", pool={"min_size": 1, "max_size": 2, "timeout": 2})
    assert Client(raise_request_exception=False).get("/query/").status_code == 503
    status, body = ready()
    assert status == 503, body
    default = body["aliases"]["default"]
    assert default["state"] == "failing" and default["server"] == "reachable", body
    assert "connection attempts failing" in default["reason"]
    assert "dpp_no_such_database" not in json.dumps(body)
    print(json.dumps(body))
    if "health_check" in sys.modules or _has_health_check():
        status, result = health_check()
        assert status == 500
        assert "default: connection attempts failing" in next(iter(result.values()))


def _has_health_check() -> bool:
    try:
        import health_check  # noqa: F401
    except ImportError:
        return False
    return True


class Held:
    """Every connection of the default pool held in atomic blocks by threads of their own, and
    ``waiters`` more threads waiting for one; :meth:`release` lets them all finish."""

    def __init__(self, holders: int, waiters: int) -> None:
        self.go = threading.Event()
        self.holding = threading.Barrier(holders + 1)
        self.threads = [threading.Thread(target=self.hold) for _ in range(holders)]
        self.waiters = [threading.Thread(target=self.wait) for _ in range(waiters)]
        for t in self.threads:
            t.start()
        self.holding.wait(timeout=10)
        for t in self.waiters:
            t.start()
        pool = registry.get("default")
        wait_until(
            lambda: pool.get_stats().get("requests_waiting", 0) >= waiters,
            interval=0.01,
            message=lambda: f"{waiters} borrowers waiting: {pool.get_stats()}",
        )

    def hold(self) -> None:
        try:
            with transaction.atomic():
                connection.cursor().execute("SELECT 1")
                self.holding.wait(timeout=10)
                self.go.wait(timeout=30)
        finally:
            connection.close()

    def wait(self) -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        finally:
            connection.close()

    def release(self) -> None:
        self.go.set()
        for t in self.threads + self.waiters:
            t.join(15)


@MODES
def test_saturation_beyond_the_threshold_is_503_and_polling_takes_no_slot(pool_options, release):
    pool_options(min_size=2, max_size=2, timeout=20, release=release)
    with override_settings(POOLED_PG={**FAST, "HEALTH_SATURATED_AFTER": 0.5}):
        assert Client().get("/query/").status_code == 200
        connection.close()
        stats = ledger.stats_for("default")
        held = Held(holders=2, waiters=2)
        try:
            status, body = ready()  # saturated, but not for 0.5 s yet
            assert status == 200, body
            assert body["aliases"]["default"]["saturated_for"] < 0.5
            body, _ = wait_status(ready, 503)
            default = body["aliases"]["default"]
            assert default["state"] == "saturated", body
            assert default["pool"] == {"size": 2, "max_size": 2, "idle": 0, "in_use": 2, "waiting": 2}
            assert "saturated: 2 of 2 in use, 2 waiting, for" in body["reason"]
            print(json.dumps(body))
            # 50 polls while every connection is held: each answers at once, and the pool's
            # size, borrowers and waiters do not move.
            pool = registry.get("default")
            borrows = stats.borrows
            times = []
            for _ in range(50):
                started = time.perf_counter()
                assert ready()[0] == 503
                times.append(time.perf_counter() - started)
            # A poll that waited for a slot would take the pool's timeout (20 s) and fail; a
            # bound of 2 s tells the two apart on a shared machine, where a single poll has
            # taken 110 ms when another process held the CPU (median 0.4 ms).
            assert max(times) < 2.0, max(times)
            figure("readiness request while saturated (median)", statistics.median(times) * 1e6)
            measures = pool.get_stats()
            assert (measures["pool_size"], measures["pool_available"], measures["requests_waiting"]) == (2, 0, 2)
            assert stats.borrows == borrows
            if _has_health_check():
                status, result = health_check()
                assert status == 500
                assert "default: saturated" in next(iter(result.values()))
        finally:
            held.release()
        _, _ = wait_status(ready, 200)
        if _has_health_check():
            assert health_check() == (200, {"PoolHealthCheck(alias=None)": "OK"})


@pytest.mark.slow  # (stops and starts the cluster)
@MODES
def test_django_health_check_backend_follows_the_server(pool_options, server, release):
    pytest.importorskip("health_check")
    pool_options(min_size=1, max_size=4, timeout=5, release=release)
    assert Client().get("/query/").status_code == 200
    connection.close()
    assert health_check() == (200, {"PoolHealthCheck(alias=None)": "OK"})
    server.stop()
    try:
        result, _ = wait_status(health_check, 500)
        message = result["PoolHealthCheck(alias=None)"]
        assert message.startswith("Unavailable: default: server unreachable (Connection refused)"), message
    finally:
        server.start()
    wait_status(health_check, 200)
    registry.close_all()


def test_the_backend_without_django_health_check_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "health_check", None)
    monkeypatch.setitem(sys.modules, "health_check.base", None)
    monkeypatch.delitem(sys.modules, "django_pooled_pg.contrib.health_check", raising=False)
    with pytest.raises(ImproperlyConfigured, match=r"django-pooled-pg\[healthcheck\]"):
        import django_pooled_pg.contrib.health_check  # noqa: F401
    monkeypatch.delitem(sys.modules, "django_pooled_pg.contrib.health_check", raising=False)


# ----- Through a real server: gunicorn -------------------------------------------------------------


def http_ready(base: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(base + "/ready/", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def all_workers(base: str, n: int = 12) -> tuple[int, dict]:
    """200 if ``n`` requests in a row answer 200 (3 workers: each is asked), else the first other."""
    for _ in range(n):
        status, body = http_ready(base)
        if status != 200:
            return status, body
    return 200, {}


@pytest.mark.slow  # (a fleet under gunicorn; stops and starts the cluster)
@MODES
def test_ready_under_gunicorn_follows_the_server(server, release):
    """The demo site under gunicorn (3 workers): every worker answers 503 soon after the server
    stops, with no other traffic, and 200 once it is back."""
    fleet = Fleet()
    fleet.env["POOLED_PG_POOL"] = json.dumps({"release": release})
    fleet.env["POOLED_PG_HEALTH_PROBE_INTERVAL"] = "0.5"
    output = ""
    try:
        fleet.start()
        status, body = http_ready(fleet.base)
        assert status == 200, body
        server.stop()
        try:
            _, noticed = wait_status(lambda: http_ready(fleet.base), 503)
            figure(f"gunicorn: 503 after the server stopped ({release})", noticed, "s")
            # The first 503 may come from a connection attempt that reached the server as it shut
            # down ("failing", the probe before it still saying "reachable"); the worker's next
            # probe, within an interval, finds nothing listening.
            wait_until(
                lambda: http_ready(fleet.base)[1]["aliases"]["default"]["state"] == "unreachable",
                interval=0.1,
                message="the state to say the server is unreachable",
            )
            # Every worker notices (within a probe interval, 0.5 s, on an idle machine).
            wait_until(
                lambda: {http_ready(fleet.base)[0] for _ in range(12)} == {503},
                interval=0.1,
                message="every worker to answer 503",
            )
        finally:
            server.start()
        _, back = wait_status(lambda: http_ready(fleet.base), 200)
        figure(f"gunicorn: 200 after the server came back ({release})", back, "s")
        # Each worker recovers on its own: one whose publisher met the outage has a failing pool
        # until an attempt works again (its publisher's, or its check's within a second).
        _, every = wait_status(lambda: all_workers(fleet.base), 200)
        figure(f"gunicorn: 200 from every worker ({release})", back + every, "s")
    finally:
        output = fleet.stop()
        registry.close_all()
    assert "Traceback" not in output, output


# ----- Settings and cost -----------------------------------------------------------------------------


def test_health_settings_are_validated():
    problems = find_stats_problems(
        {"HEALTH_PROBE_INTERVAL": 0, "HEALTH_SATURATED_AFTER": -1, "HEALTH_PROBE_TIMEOT": 1}, {}
    )
    words = [str(p) for p in problems]
    assert any('POOLED_PG["HEALTH_PROBE_TIMEOT"]' in w and 'did you mean "HEALTH_PROBE_TIMEOUT"' in w for w in words)
    assert any('POOLED_PG["HEALTH_PROBE_INTERVAL"]: must be None or a number greater than 0' in w for w in words)
    assert any('POOLED_PG["HEALTH_SATURATED_AFTER"]: must be a number at least 0' in w for w in words)
    assert {p.id for p in problems} == {"django_pooled_pg.E011", "django_pooled_pg.E012"}
    with override_settings(POOLED_PG={"HEALTH_PROBE_TIMEOUT": "1"}):
        assert [e.id for e in check_stats_settings()] == ["django_pooled_pg.E012"]
        with pytest.raises(ImproperlyConfigured, match="HEALTH_PROBE_TIMEOUT"):
            read_health_settings()
    with override_settings(POOLED_PG={"HEALTH_PROBE_INTERVAL": None}):
        assert read_health_settings().probe_interval is None
        assert ready()[1]["aliases"]["other"]["server"] == "not probed"
    with override_settings(POOLED_PG=None):
        defaults = read_health_settings()
    assert (defaults.saturated_after, defaults.probe_interval, defaults.probe_timeout) == tuple(
        HEALTH_DEFAULTS.values()
    )


def test_cost_per_call(pool_options):
    """What a poll costs this process: the verdict with a cached probe, the whole request
    through Django's test client (middleware included), and a fresh probe. Figures for the
    README (``pytest -s``), not asserted: a time depends on how busy the machine is. What keeps
    a poll cheap is asserted instead: between fresh probes it neither probes nor borrows."""
    pool_options(min_size=1, max_size=4, timeout=5)
    assert Client().get("/query/").status_code == 200
    connection.close()
    pool = registry.get("default")
    with override_settings(POOLED_PG={**FAST, "HEALTH_PROBE_INTERVAL": 60}):
        health.readiness()
        probed_at = {alias: cached.checked_at for alias, cached in health._probes.items()}
        borrows = pool.get_stats().get("requests_num", 0)
        verdict = per_call(health.readiness, 2000)
        client = Client()
        request = per_call(lambda: client.get("/ready/"), 500)
        assert {alias: cached.checked_at for alias, cached in health._probes.items()} == probed_at
        assert pool.get_stats().get("requests_num", 0) == borrows
    settings = read_health_settings()
    fresh = []
    for _ in range(20):  # one at a time, as the checks probe (a burst queues in the server's backlog)
        started = time.perf_counter()
        assert health.reach("default", registry.get("default"), settings.probe_timeout) is None
        fresh.append(time.perf_counter() - started)
        time.sleep(0.05)
    sessions = []
    for _ in range(10):  # what the probe would cost as a session outside the pool instead
        started = time.perf_counter()
        plain_connection().close()
        sessions.append(time.perf_counter() - started)
        time.sleep(0.05)
    figure("a session outside the pool (connect + close, median)", statistics.median(sessions) * 1e6)
    figure("readiness() with a cached probe, 3 aliases", verdict * 1e6)
    figure("GET /ready/ through the test client", request * 1e6)
    figure("a fresh probe (TCP connect + close, median)", statistics.median(fresh) * 1e6)
