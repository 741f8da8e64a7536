"""The fleet-wide connection budget (``OPTIONS["pool"]["fleet_max_size"]``, issue 16) against real
servers: the demo site under gunicorn scaled up and down, two gunicorn masters as two hosts, and a
burst of processes starting at once. Nothing is mocked: a :class:`Sampler` counts the server's
client backends of the fleet's database in ``pg_stat_activity`` every 50 ms, and that count must
never pass the budget.

The server is made tight for this module: the fleet connects as an ordinary role, and the
cluster's ``max_connections`` leaves that role only ``MAX_BUDGET + MARGIN`` slots, so a fleet that
ignores its budget meets "remaining connection slots are reserved" (or "too many clients"), the
errors the budget exists to prevent; the module puts ``max_connections`` back afterwards.

``POOLED_PG_TEST_NO_BUDGET=1`` runs the same scenarios with ``fleet_max_size`` left out of the
pool options (everything else equal), to show that they fail without a budget.

Select them with ``pytest tests/test_budget.py`` (or ``-k budget``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from django.db import connections
from psycopg import sql

from django_pooled_pg.pooling.registry import registry
from tests import dbserver
from tests.servers import PROJECT, Fleet, children, get, live, wait_for
from testsupport.gunicorn import Gunicorn
from testsupport.waiting import wait_until

pytestmark = [
    pytest.mark.slow,  # (gunicorn fleets and a burst of processes)
    pytest.mark.skipif(
        importlib.util.find_spec("gunicorn") is None,
        reason="gunicorn is not installed in this environment (pip install -e '.[test]')",
    ),
]

#: The ordinary role the fleets connect as (superusers may take the reserved slots).
ROLE = "dpp_budget"
#: The largest budget of these tests, and the slots above it the server leaves the role.
MAX_BUDGET = 10
MARGIN = 2
#: Superuser connections of the harness while a test runs: the sampler and one admin query.
HARNESS = 2
#: What a fleet must never log: the server refusing a connection for lack of slots.
SERVER_FULL = ("too many clients", "remaining connection slots")
RELEASE_MODES = ["request", "transaction"]
NO_BUDGET = os.environ.get("POOLED_PG_TEST_NO_BUDGET", "") not in ("", "0")
#: A view that holds its connection ``s`` seconds in either release mode, and quick ones.
HOLD = "/shop/slow/?s=0.5&tx=1"
QUICK = ["/shop/three/", "/shop/product/1/"]


def pool_options(release: str, budget: int, **more: object) -> dict:
    pool = {"min_size": 1, "max_size": 4, "timeout": 2, "release": release, "fleet_max_size": budget, **more}
    if NO_BUDGET:
        del pool["fleet_max_size"]
    return pool


# ----- The server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tight_server():
    """The test cluster with ``max_connections`` such that the fleets' role has ``MAX_BUDGET +
    MARGIN`` slots; restored at the end. The pytest process's own pools are closed first, so that
    none of its connections takes a slot (they come back lazily for later tests)."""
    cluster = dbserver.cluster()
    if cluster is None:
        pytest.skip("DATABASE_URL points at a server this test run does not own")
    close_own_pools()
    reserved = dict(
        cluster.execute(
            "SELECT name, setting::int FROM pg_settings "
            "WHERE name IN ('superuser_reserved_connections', 'reserved_connections')"
        )
    )
    before = cluster.max_connections
    tight = MAX_BUDGET + MARGIN + HARNESS + sum(reserved.values())
    with contextlib.suppress(psycopg.errors.DuplicateObject):
        cluster.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(ROLE)))
    cluster.set_max_connections(tight)
    try:
        yield cluster
    finally:
        close_own_pools()
        cluster.set_max_connections(before)


def close_own_pools() -> None:
    for conn in connections.all(initialized_only=True):
        conn.close()
    for alias in connections:
        registry.close(alias)


# ----- Measuring ---------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Counts the client backends of ``dbname`` every ``every`` seconds, from the ``postgres``
    database (so that its own connection is not counted), and keeps the time series."""

    QUERY = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'"

    #: Who the backends are, when a sample is over the budget (the host and pid are in the name).
    DETAIL = (
        "SELECT application_name, state, count(*) FROM pg_stat_activity WHERE datname = %s "
        "AND backend_type = 'client backend' GROUP BY 1, 2 ORDER BY 1, 2"
    )

    def __init__(self, server: dict, dbname: str, budget: int, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.budget = budget
        self.details: list[tuple[float, list[tuple]]] = []
        self.conn = psycopg.connect(
            dbname="postgres", autocommit=True, application_name="budget test sampler", **server
        )
        self.dbname, self.every = dbname, every
        self.t0 = time.monotonic()
        self.series: list[tuple[float, int]] = []
        self.phases: list[tuple[float, str]] = [(0.0, "start")]
        self.errors: list[str] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                n = self.conn.execute(self.QUERY, [self.dbname]).fetchone()[0]
                self.series.append((t := time.monotonic() - self.t0, int(n)))
                if n > self.budget and len(self.details) < 5:
                    self.details.append((round(t, 2), self.conn.execute(self.DETAIL, [self.dbname]).fetchall()))
            except psycopg.Error as exc:
                self.errors.append(str(exc))
            self._done.wait(self.every)

    def mark(self, phase: str) -> None:
        self.phases.append((time.monotonic() - self.t0, phase))

    def finish(self) -> None:
        self._done.set()
        self.join()
        self.conn.close()

    @property
    def peak(self) -> int:
        return max((n for _, n in self.series), default=0)

    def per_phase(self) -> dict[str, tuple[int, int]]:
        """{phase: (peak, samples)}."""
        out: dict[str, tuple[int, int]] = {}
        bounds = [*self.phases, (float("inf"), "")]
        for (start, name), (end, _) in zip(bounds, bounds[1:], strict=False):
            values = [n for t, n in self.series if start <= t < end]
            out[name] = (max(values, default=0), len(values))
        return out

    def over(self, limit: int) -> list[tuple[float, int]]:
        return [(round(t, 2), n) for t, n in self.series if n > limit]

    def report(self) -> str:
        phases = ", ".join(f"{name}: peak {peak} of {n} samples" for name, (peak, n) in self.per_phase().items())
        over = self.over(self.budget)
        return (
            f"sampled backends: peak {self.peak} against a budget of {self.budget} ({len(self.series)} samples; {phases})"
            + (f"; over the budget at (s, backends): {over[:20]}" if over else "")
            + "".join(f"\n  at {t} s: {rows}" for t, rows in self.details)
        )


class Load:
    """Client threads, each requesting its path again and again; every answer kept with its time,
    base and status (0: no HTTP answer, as when a worker is killed with the request)."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.answers: list[tuple[float, str, int]] = []
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []

    def add(self, base: str, path: str, threads: int) -> None:
        for _ in range(threads):
            thread = threading.Thread(target=self._run, args=(base, path), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, base: str, path: str) -> None:
        while not self._done.is_set():
            status = get(base + path, timeout=20)
            self.answers.append((time.monotonic() - self.t0, base, status))
            if status == 0:
                time.sleep(0.05)  # (a server going away: do not spin)

    def stop(self) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join(timeout=25)

    def statuses(self, base: str | None = None, since: float = 0.0) -> Counter[int]:
        return Counter(s for t, b, s in list(self.answers) if (base is None or b == base) and t >= since)


def server_full_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(words in line for words in SERVER_FULL)]


# ----- Fleets ------------------------------------------------------------------------------------


def can_unshare() -> bool:
    """Whether gunicorn can run in a UTS namespace of its own (a host name of its own): root,
    and util-linux's ``unshare``."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--uts", "true"], capture_output=True, check=False).returncode == 0


class HostGunicorn(Gunicorn):
    """gunicorn serving the demo, its output in ``logfile``; with ``hostname``, in a UTS namespace
    whose host name is that (``socket.gethostname()``, which the pools put in their
    ``application_name``), and :meth:`BudgetFleet.master` gives it a ``TMPDIR`` of its own (where
    the budget keeps its per-host lock): two such masters are two hosts."""

    def __init__(self, env: dict[str, str], logfile: Path, *, hostname: str | None = None, **kwargs) -> None:
        options = ["--timeout", "30", "--graceful-timeout", "5"]
        super().__init__(env, options=options, **kwargs)
        self.logfile, self.hostname = logfile, hostname

    def command(self) -> list[str]:
        command = super().command()
        if self.hostname is None:
            return command
        # exec: the master keeps the pid Popen gave, for signals and for stop().
        return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.hostname, *command]

    def start(self) -> None:  # type: ignore[override]
        with self.logfile.open("ab") as log:
            super().start(stdout=log)

    def ready(self) -> None:
        try:
            self.wait_ready("/shop/three/", timeout=40, request_timeout=5)
        except RuntimeError as exc:
            pytest.fail(f"{exc}\n--- {self.logfile.name} (tail) ---\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def worker_pids(self) -> set[int]:
        assert self.proc is not None
        return children(self.proc.pid)

    def scale_to(self, n: int) -> None:
        """TTIN or TTOU, one signal per worker added or removed (spaced, so that none merges
        with the one before), then wait until the master has ``n`` workers."""
        assert self.proc is not None
        have = len(self.worker_pids())
        sig = signal.SIGTTIN if n > have else signal.SIGTTOU
        for _ in range(abs(n - have)):
            self.proc.send_signal(sig)
            time.sleep(0.3)
        wait_for(f"{n} workers", lambda: len(self.worker_pids()) == n, timeout=25)


PREFLIGHT = """
import django
django.setup()
from django.db import connection
connection.ensure_connection()
connection.close()
"""


class BudgetFleet(Fleet):
    """The demo site on a fresh database owned by :data:`ROLE`, the fleets' connections made as
    that role with the pool options ``pool`` (``POOLED_PG_POOL``); migrated and seeded with the
    demo's own options, so that only the processes under test carry the budget."""

    def __init__(self, tmp_path: Path, pool: dict) -> None:
        super().__init__()
        self.dbname = f"dpp_budget_{os.getpid()}"
        self.tmp_path = tmp_path
        self.env["DATABASE_URL"] = f"postgresql://{ROLE}@{self.server['host']}:{self.server['port']}/{self.dbname}"
        self.setup_env = dict(self.env)
        self.env["POOLED_PG_POOL"] = json.dumps(pool)
        self.masters: list[HostGunicorn] = []

    def create(self) -> None:
        self.admin(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(self.dbname), sql.Identifier(ROLE)))
        for args in (["migrate", "--noinput"], ["seed_shop"]):
            self.manage(*args, env=self.setup_env, timeout=120)
        self.preflight()

    def preflight(self) -> None:
        """One connection with the pool options under test, so that options the package refuses
        fail here with its words (gunicorn would only answer 500)."""
        done = subprocess.run(
            [sys.executable, "-c", PREFLIGHT], cwd=PROJECT, env=self.env, capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            pytest.fail(
                f"the pool options {self.env['POOLED_PG_POOL']} do not work:\n{done.stdout}{done.stderr[-3000:]}"
            )

    def master(self, workers: int, *, threads: int = 8, hostname: str | None = None) -> HostGunicorn:
        name = f"gunicorn-{len(self.masters) + 1}{f'-{hostname}' if hostname else ''}.log"
        env = self.env
        if hostname is not None:  # a host of its own: its own temporary directory too
            (tmp := self.tmp_path / hostname).mkdir(exist_ok=True)
            env = {**env, "TMPDIR": str(tmp)}
        gunicorn = HostGunicorn(env, self.tmp_path / name, hostname=hostname, workers=workers, threads=threads)
        self.masters.append(gunicorn)
        gunicorn.start()
        gunicorn.ready()
        return gunicorn

    def drop(self) -> None:
        for gunicorn in self.masters:
            gunicorn.stop(timeout=15)
            print(f"--- {gunicorn.logfile.name} (tail) ---\n{gunicorn.log()[-3000:]}")
        self.admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.dbname)))


@contextlib.contextmanager
def budget_fleet(tmp_path: Path, pool: dict) -> Iterator[BudgetFleet]:
    fleet = BudgetFleet(tmp_path, pool)
    fleet.create()
    try:
        yield fleet
    finally:
        fleet.drop()


def check_clean(load: Load, logs: str, sampler: Sampler, budget: int) -> None:
    """What every scenario asks: within the budget, no 500, the server never full."""
    statuses = load.statuses()
    print(sampler.report())
    print(f"answers: {dict(sorted(statuses.items()))}")
    assert not sampler.errors, sampler.errors[:3]
    assert sampler.peak <= budget, sampler.report()
    assert statuses[500] == 0, f"{statuses[500]} answers were 500: {dict(statuses)}"
    assert not server_full_lines(logs), "\n".join(server_full_lines(logs)[:10])
    assert set(statuses) <= {0, 200, 503}, dict(statuses)


# ----- The scenarios -----------------------------------------------------------------------------


@pytest.mark.parametrize("release", RELEASE_MODES)
def test_budget_holds_while_gunicorn_scales_up_and_down(tight_server, tmp_path, release):
    """2 workers under load, 6 with TTIN, one SIGKILLed, 3 with TTOU: 6 x max_size 4 would be
    24 connections against a budget of 8; the backends never pass 8, nothing answers 500, the
    server is never full, and after scaling down the 3 workers use the budget again."""
    budget = 8
    with budget_fleet(tmp_path, pool_options(release, budget)) as fleet:
        gunicorn = fleet.master(workers=2)
        sampler = Sampler(fleet.server, fleet.dbname, budget)
        sampler.start()
        load = Load(sampler.t0)
        load.add(gunicorn.base, HOLD, 20)
        for path in QUICK:
            load.add(gunicorn.base, path, 2)
        try:
            sampler.mark("2 workers")
            time.sleep(4)
            sampler.mark("TTIN x4")
            gunicorn.scale_to(6)
            sampler.mark("6 workers")
            time.sleep(8)
            victim = min(gunicorn.worker_pids())
            os.kill(victim, signal.SIGKILL)
            sampler.mark("one SIGKILLed")
            wait_for("a worker in place of the killed one", lambda: len(gunicorn.worker_pids() - {victim}) == 6)
            sampler.mark("6 workers again")
            time.sleep(4)
            sampler.mark("TTOU x3")
            gunicorn.scale_to(3)
            sampler.mark("3 workers")
            scaled_down = time.monotonic() - sampler.t0

            def budget_used_again() -> bool:
                return sampler.per_phase()["3 workers"][0] >= budget - 2 and load.statuses(since=scaled_down)[200] > 0

            # Under load until the 3 workers have used the budget again (a few seconds when the
            # machine is idle), then 2 s more of it within the budget.
            wait_until(
                budget_used_again,
                timeout=60,
                interval=0.5,
                message=lambda: f"the budget used again: {sampler.report()}",
            )
            time.sleep(2)
        finally:
            load.stop()
            sampler.finish()
        logs = gunicorn.log()
        check_clean(load, logs, sampler, budget)
        after = load.statuses(since=scaled_down)
        assert after[200] > 0, f"nothing served after scaling down: {dict(after)}"
        peak_after, _ = sampler.per_phase()["3 workers"]
        assert peak_after >= budget - 2, (
            f"after scaling down to 3 workers (12 connections of max_size) the backends only reached "
            f"{peak_after} under load, not the budget of {budget} again: {sampler.report()}"
        )
        # The new counter is published by every process; refusals are logged as such.
        processes = live(fleet.poolstats())
        assert processes and all("budget_refused" in p["counters"] for p in processes.values()), processes
        if sum(p["counters"]["budget_refused"] for p in processes.values()):
            assert "fleet budget" in logs, "borrowers were refused for lack of budget, and no log line says so"


@pytest.mark.parametrize("release", RELEASE_MODES)
def test_budget_is_shared_by_two_hosts(tight_server, tmp_path, release):
    """Two gunicorn masters, each 2 workers x max_size 4 (16 in all), with different host names,
    on one database with a budget of 8: both serve, the backends never pass 8."""
    budget = 8
    hosts = ["budget-host-a", "budget-host-b"] if can_unshare() else [None, None]
    with budget_fleet(tmp_path, pool_options(release, budget)) as fleet:
        masters = [fleet.master(workers=2, hostname=host) for host in hosts]
        sampler = Sampler(fleet.server, fleet.dbname, budget)
        sampler.start()
        load = Load(sampler.t0)
        for gunicorn in masters:
            load.add(gunicorn.base, HOLD, 12)
            load.add(gunicorn.base, QUICK[0], 2)
        names: set[str] = set()

        def both_serve() -> bool:
            """Each master has served, and (with host names) each host's connections were seen."""
            rows = fleet.admin("SELECT application_name FROM pg_stat_activity WHERE datname = %s", [fleet.dbname])
            names.update(row[0] for row in rows)
            seen = {host for host in hosts if host is not None and any(f" {host}:" in name for name in names)}
            return seen == {host for host in hosts if host is not None} and all(
                load.statuses(gunicorn.base)[200] > 0 for gunicorn in masters
            )

        try:
            sampler.mark("both under load")
            wait_until(both_serve, timeout=60, interval=0.5, message=lambda: f"both hosts serving: {sorted(names)}")
            # The load goes on for 12 s in all: the budget must hold throughout.
            time.sleep(max(0.0, 12 - (time.monotonic() - sampler.t0)))
        finally:
            load.stop()
            sampler.finish()
        logs = "\n".join(g.log() for g in masters)
        check_clean(load, logs, sampler, budget)
        for gunicorn in masters:
            served = load.statuses(gunicorn.base)
            assert served[200] > 0, f"{gunicorn.base} ({gunicorn.hostname}) served nothing: {dict(served)}"
        if hosts[0] is not None:
            seen = {host for host in hosts if any(f" {host}:" in name for name in names)}
            assert seen == set(hosts), f"the two hosts' connections: {sorted(names)}"


#: A process of the burst: Django set up, "READY", then on a line on stdin it borrows a connection,
#: runs a query, holds it ~1 s (in a transaction, so that either release mode keeps it), and says
#: how it went on a "RESULT" line.
CHILD = r"""
import sys, time
import django
django.setup()
from django.db import connection, transaction
from django_pooled_pg import errors
budget_exhausted = getattr(errors, "BudgetExhausted", ())
print("READY", flush=True)
sys.stdin.readline()
started = time.monotonic()
try:
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pid = cursor.fetchone()[0]
            time.sleep(1.0)
            cursor.execute("SELECT 1")
    print(f"RESULT ok backend {pid} after {time.monotonic() - started:.2f} s", flush=True)
except Exception as exc:
    kind = "refused" if budget_exhausted and isinstance(exc, budget_exhausted) else "error"
    text = " ".join(str(exc).split())
    print(f"RESULT {kind} {type(exc).__name__} after {time.monotonic() - started:.2f} s: {text}", flush=True)
finally:
    connection.close()
"""


@pytest.mark.parametrize("release", RELEASE_MODES)
def test_budget_holds_for_a_burst_of_processes(tight_server, tmp_path, release):
    """20 processes borrow a connection at the same moment against a budget of 10: the backends
    never pass 10; each process either ran its query or got BudgetExhausted; the server is never
    full."""
    budget, n = 10, 20
    with budget_fleet(tmp_path, pool_options(release, budget, timeout=5)) as fleet:
        sampler = Sampler(fleet.server, fleet.dbname, budget)
        sampler.start()
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CHILD],
                cwd=PROJECT,
                env=fleet.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(n)
        ]
        outputs = ["" for _ in procs]
        try:
            for i, proc in enumerate(procs):  # everyone set up before anyone connects
                assert proc.stdout is not None
                while (line := proc.stdout.readline()) and line.strip() != "READY":
                    outputs[i] += line
                assert line, f"child {i} exited before it was ready:\n{outputs[i]}"
            sampler.mark("burst")
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            for i, proc in enumerate(procs):
                out, _ = proc.communicate(timeout=60)
                outputs[i] += out
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            sampler.finish()
        results = []
        for i, out in enumerate(outputs):
            line = next(
                (ln for ln in out.splitlines() if ln.startswith("RESULT ")), f"RESULT none (exit {procs[i].returncode})"
            )
            results.append(line.removeprefix("RESULT "))
            print(f"child {i:2}: {results[-1]}")
        kinds = Counter(r.split()[0] for r in results)
        print(f"children: {dict(kinds)}; {sampler.report()}")
        everything = "\n".join(outputs)
        assert sampler.peak <= budget, sampler.report()
        assert not server_full_lines(everything), "\n".join(server_full_lines(everything)[:5])
        assert set(kinds) <= {"ok", "refused"}, "\n".join(
            sorted(
                {
                    r.split(" after ")[0] + ": " + r.split(": ", 1)[-1][:200]
                    for r in results
                    if r.split()[0] not in ("ok", "refused")
                }
            )
        )
        assert kinds["ok"] >= 1, results
