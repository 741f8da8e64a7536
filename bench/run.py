#!/usr/bin/env python
"""``make bench``: the demo shop under gunicorn (gthread) and wrk, in every connection mode.

One run on one machine measures, for each mode and endpoint, requests per second, p50/p99
latency, non-2xx responses and the peak number of server backends (``pg_stat_activity``, sampled
every 100 ms during the run); then an overload case (``max_connections=20``, 4 workers x 16
threads, 128 clients); then an autoscaling spike (``max_connections=20``, 2 -> 8 workers with
``TTIN`` under load: Django's pool with a static ``max_size`` against ours with a
``fleet_max_size``; ``--autoscale-only`` runs just that and writes ``AUTOSCALE.md``); then
``bench/micro.py`` (borrow + SELECT 1 + return, in-process) and ``bench/contended.py`` (16
threads on a pool of 4 in one process: CPU per request). It writes ``bench/results/RESULTS.md``, ``bench/results/chart.png`` and the raw figures under
``bench/results/raw/``.

Endpoints (``--endpoints``): ``product`` (one lookup by key), ``three`` (three small queries),
``listings`` (an ORM list: 50 rows of a 30-column model with two ``select_related`` joins, one
2 KB SELECT), ``admin`` (the admin change list of that model, logged in: session, user, counts,
filters and the page; the cookie comes from ``manage.py bench_login``), ``slow`` (a query, a
50 ms wait on "another service", a query) and ``order`` (a write in a transaction).

Modes:

* ``direct``: stock backend, ``CONN_MAX_AGE=0`` (a new connection per request);
* ``persistent``: stock backend, ``CONN_MAX_AGE=None`` (one connection per thread);
* ``django-pool``: stock backend, Django's ``OPTIONS["pool"]``;
* ``pooled-request`` / ``pooled-transaction``: this ENGINE, ``release="request"`` / ``"transaction"``;
* ``pooled-noreset``: this ENGINE, ``release="request"``, ``session_reset=False`` (the documented
  opt-out: sessions handed on as they are);
* ``pgbouncer``: stock backend, ``CONN_MAX_AGE=0``, through a local PgBouncer in transaction mode.

Every pool (ours, Django's, PgBouncer's) gets the same size per worker: ``--pool-size``
(min = max), so PgBouncer's ``default_pool_size`` is workers x pool size.

    python bench/run.py [--quick] [--modes a,b] [--endpoints product,slow] [--duration 8]
                        [--workers 2] [--threads 16] [--connections N] [--skip-overload] [--perf]
                        [--skip-autoscale | --autoscale-only] [--autoscale-budget auto|N] ...

Needs wrk and pgbouncer (installed with apt-get when missing and running as root), PostgreSQL
server binaries (see testsupport/pgcluster.py), and in this interpreter Django, this package,
gunicorn and matplotlib (``pip install -e '.[bench]'``; ``make bench`` makes the venv).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TESTPROJECT = ROOT / "testproject"
for p in (str(ROOT), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

import psycopg  # noqa: E402
from contended import TWEAKS  # noqa: E402

from testsupport.gunicorn import Gunicorn as ShopGunicorn  # noqa: E402
from testsupport.pgbouncer import PgBouncer  # noqa: E402
from testsupport.pgcluster import PgCluster  # noqa: E402

DB_NAME = "shop"
# The site connects as an ordinary role, so that PostgreSQL's superuser_reserved_connections keep
# room for the harness's own (superuser) monitoring connections when max_connections is reached.
DB_USER = "shop"
ALL_MODES = (
    "direct", "persistent", "django-pool", "pooled-request", "pooled-transaction", "pooled-noreset", "pgbouncer",
)  # fmt: skip
#: Experiments, not settings anyone should run: ``pooled-request`` with a part of the package
#: changed in every worker (``bench/contended.py``'s TWEAKS of the same names, applied by
#: ``bench/gunicorn_tweak.py`` once the worker has loaded Django). ``--modes`` takes them too;
#: ``make bench`` runs none. They say which part costs what under gunicorn, where the in-process
#: runs do not show the whole gap (README, "Benchmarks").
EXPERIMENTS = tuple(TWEAKS)
OURS = ("pooled-request", "pooled-transaction")
# name: (title, path; {pid} is the first product's id)
ENDPOINTS = {
    "product": ("Single lookup", "/shop/product/{pid}/"),
    "three": ("Three queries", "/shop/three/"),
    "listings": ("ORM list (50 rows, 30 columns, 2 joins)", "/shop/listings/"),
    "admin": ("Admin change list (logged in)", "/admin/shop/listing/"),
    "slow": ("The 50 ms wait", "/shop/slow/"),
    "order": ("The write (order in a transaction)", "/shop/order/"),
}
COLORS = {
    "direct": "#8c8c8c", "persistent": "#1f77b4", "django-pool": "#ff7f0e",
    "pooled-request": "#2ca02c", "pooled-transaction": "#17becf", "pooled-noreset": "#bcbd22",
    "pgbouncer": "#9467bd",
}  # fmt: skip
#: Why wrk reconnects now and then (``--reconnect-every``, default 10). With connections kept open
#: for the whole run, they stay with the gunicorn worker that accepted them first, and which one
#: that is is a race. Measured with ``ss`` during such runs of the 50 ms view (split of wrk's 32
#: connections between the two workers): persistent 525 req/s at 16/16, 430 at 8/24;
#: pooled-transaction 517 at 15/17, 305 at 1/31; pooled-request 142 at 10/22, 71 at 0/32. A
#: connection closed after every 10th request is accepted again by whichever worker gets to it
#: first, the less busy one, so the load evens out: pooled-request 134-141 req/s in every round.
RECONNECT_NOTE = (
    "wrk closes each connection after every {n}th request and opens another, as clients do: with "
    "connections kept open for the whole run, they stay with the gunicorn worker that accepted them "
    "first, splits of 32 as uneven as 0/32 were measured, and the run then measures the split, not "
    "the connection mode."
)
#: PgBouncer's settings for the pgbouncer mode (transaction pooling; see testsupport/pgbouncer.py):
#: exactly default_pool_size server connections, enough client slots for wrk, no reset query
#: (unused in transaction mode), quiet logs.
BOUNCER = {
    "min_pool_size": "0", "reserve_pool_size": "0", "max_client_conn": "2000",
    "server_reset_query": "", "log_connections": "0", "log_disconnections": "0",
}  # fmt: skip
#: The modes of the autoscaling scenario: Django's pool with a static max_size, ours with a budget.
AUTOSCALE_MODES = ("django-pool", "pooled-request", "pooled-transaction")
#: What the server says when it has no slot left for the site's role.
SERVER_FULL = ("too many clients", "remaining connection slots")
BACKENDS_SQL = (
    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND datname = %s"
    " AND pid <> pg_backend_pid()"
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] bench: {message}", flush=True)


# ----- Tools -------------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.is_file()), None
    )


def ensure_tools(need_pgbouncer: bool) -> dict[str, str]:
    """Paths of wrk (and pgbouncer); apt-get installs what is missing when we are root."""
    wanted = {"wrk": "wrk"} | ({"pgbouncer": "pgbouncer"} if need_pgbouncer else {})
    missing = [pkg for tool, pkg in wanted.items() if find_tool(tool) is None]
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise SystemExit(
                f"bench: missing {', '.join(missing)}; install them (apt-get install -y {' '.join(missing)})"
            )
        log(f"installing {' '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
    return {tool: find_tool(tool) or tool for tool in wanted}


# ----- Modes -------------------------------------------------------------------------------------


def database(mode: str, cluster: PgCluster, pool_size: int, pool_timeout: float, bouncer_port: int | None) -> dict:
    """DATABASES["default"] for a mode."""
    db: dict[str, Any] = {
        **cluster.django_settings(DB_NAME),
        "USER": DB_USER,
        "ENGINE": "django.db.backends.postgresql",
        "CONN_MAX_AGE": 0,
    }
    pool = {"min_size": pool_size, "max_size": pool_size, "timeout": pool_timeout}
    if mode == "persistent":
        db["CONN_MAX_AGE"] = None
    elif mode == "django-pool":
        db["OPTIONS"] = {"pool": pool}
    elif mode in OURS:
        db["ENGINE"] = "django_pooled_pg"
        db["OPTIONS"] = {"pool": {**pool, "release": mode.removeprefix("pooled-")}}
    elif mode == "pooled-noreset":
        db["ENGINE"] = "django_pooled_pg"
        db["OPTIONS"] = {"pool": {**pool, "release": "request", "session_reset": False}}
    elif mode in EXPERIMENTS:
        db["ENGINE"] = "django_pooled_pg"
        db["OPTIONS"] = {"pool": {**pool, "release": "request"}}
    elif mode == "pgbouncer":
        db["PORT"] = str(bouncer_port)
        db["DISABLE_SERVER_SIDE_CURSORS"] = True
    return db


def tweak_code(mode: str) -> str:
    """The code an experiment mode runs in every worker (empty for the real modes)."""
    if mode not in EXPERIMENTS:
        return ""
    base, code = TWEAKS[mode]
    assert base == "pooled"  # (release="request", as database() sets it)
    return code


def django_env(db: dict, mode: str = "") -> dict[str, str]:
    return {
        **os.environ,
        "BENCH_TWEAK": tweak_code(mode),
        "PYTHONPATH": os.pathsep.join([str(BENCH), str(TESTPROJECT), str(ROOT)]),
        "DJANGO_SETTINGS_MODULE": "bench_settings",
        "BENCH_DATABASE": json.dumps(db),
        "PYTHONUNBUFFERED": "1",
    }


PREFLIGHT = r"""
import sys
from django.core.exceptions import ImproperlyConfigured
try:
    import django
    django.setup()
    from django.db import connection
    connection.ensure_connection()
    connection.close()
except ImproperlyConfigured as exc:
    print(exc)
    sys.exit(3)
"""


def preflight(env: dict[str, str]) -> str | None:
    """None when the mode's settings work; the ImproperlyConfigured message when they don't."""
    res = subprocess.run([sys.executable, "-c", PREFLIGHT], env=env, capture_output=True, text=True, cwd=TESTPROJECT)
    if res.returncode == 3:
        return res.stdout.strip() or "ImproperlyConfigured"
    if res.returncode != 0:
        raise RuntimeError(f"preflight failed:\n{res.stdout}{res.stderr}")
    return None


class Gunicorn(ShopGunicorn):
    """The shop under gunicorn (testsupport/gunicorn.py), its output appended to ``logfile``."""

    def __init__(self, env: dict[str, str], workers: int, threads: int, logfile: Path) -> None:
        options = ["--log-level", "warning", "--timeout", "60", "--graceful-timeout", "5"]
        if env.get("BENCH_TWEAK"):  # an experiment mode: its tweak runs in every worker
            options += ["--config", str(BENCH / "gunicorn_tweak.py")]
        super().__init__(env, workers=workers, threads=threads, options=options)
        self.logfile = logfile

    def start(self) -> None:
        self._log = self.logfile.open("ab")
        super().start(stdout=self._log)

    def wait_ready(self, path: str, cookie: str | None = None, timeout: float = 60) -> None:
        try:
            super().wait_ready(path, cookie=cookie, timeout=timeout, request_timeout=10)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc} (log: {self.logfile})") from None

    def stop(self) -> None:
        if self.proc is not None:
            super().stop(timeout=15)
            self._log.close()


# ----- Measuring ---------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Counts the client backends on the benchmark database every ``interval`` seconds."""

    def __init__(self, cluster: PgCluster, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg.connect(cluster.url("postgres"), autocommit=True, connect_timeout=10)
        self.interval = interval
        self.samples: list[int] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                self.samples.append(int(self.conn.execute(BACKENDS_SQL, [DB_NAME]).fetchone()[0]))
            except psycopg.Error:
                pass
            self._done.wait(self.interval)

    def finish(self) -> dict[str, float]:
        self._done.set()
        self.join()
        self.conn.close()
        s = self.samples or [0]
        return {"peak_backends": max(s), "mean_backends": round(statistics.fmean(s), 1), "samples": len(self.samples)}


def run_wrk(
    wrk: str,
    url: str,
    duration: float,
    connections: int,
    threads: int,
    timeout: float,
    reconnect_every: int = 0,
    cookie: str | None = None,
) -> dict[str, Any]:
    headers = ["-H", f"Cookie: {cookie}"] if cookie else []
    cmd = [wrk, f"-t{min(threads, connections)}", f"-c{connections}", f"-d{max(1, round(duration))}s",
           f"--timeout={timeout:g}s", "--latency", *headers, "-s", str(BENCH / "report.lua"), url, "--",
           str(reconnect_every)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if res.returncode != 0 or line is None:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    seconds = data["duration_us"] / 1e6
    statuses = {int(k): v for k, v in data["statuses"].items()}
    lat = data["latency_us"]
    return {
        "rps": data["requests"] / seconds if seconds else 0.0,
        "requests": data["requests"],
        "seconds": seconds,
        "p50_ms": lat["p50"] / 1000,
        "p90_ms": lat["p90"] / 1000,
        "p99_ms": lat["p99"] / 1000,
        "max_ms": lat["max"] / 1000,
        "mean_ms": lat["mean"] / 1000,
        "statuses": statuses,
        "non2xx": sum(n for code, n in statuses.items() if not 200 <= code < 400),
        "socket_errors": {k: v for k, v in data["errors"].items() if k != "status"},
        "errors": sum(v for k, v in data["errors"].items() if k != "status"),
        "command": shlex.join(cmd),
        "wrk_output": res.stdout,
    }


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from the 3rd (state) on


def cpu_seconds(server_group: int, postmaster: int) -> dict[str, float]:
    """CPU time (user + system) used so far by the gunicorn processes (its process group) and by
    the PostgreSQL server's processes (the postmaster's children), from /proc. Differences over a
    run, divided by its requests, give the CPU each side spends per request: on 2 shared cores
    throughput follows the sum, so this shows where a mode's requests cost more."""
    totals = {"gunicorn": 0.0, "postgres": 0.0}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # (fields[1] ppid, fields[2] pgrp, fields[11] utime, fields[12] stime)
        side = "gunicorn" if int(fields[2]) == server_group else "postgres" if int(fields[1]) == postmaster else None
        if side is not None:
            totals[side] += (int(fields[11]) + int(fields[12])) / _TICK
    return totals


#: Context switches, and the system calls a thread makes with the GIL released (each a chance
#: for another thread to take it): lock waits (futex), socket sends, receives and polls, sleeps.
PERF_EVENTS = ("context-switches",) + tuple(
    f"syscalls:sys_enter_{call}" for call in ("futex", "sendto", "recvfrom", "poll", "ppoll", "clock_nanosleep")
)


def start_perf(server_group: int) -> subprocess.Popen[str] | None:
    """``perf stat`` on the gunicorn processes (``--perf``): context switches and system calls.

    On 2 shared cores a mode whose threads hand the GIL (or a lock) to each other more often
    spends CPU in the scheduler that no instruction count of one thread shows; these counts, per
    request, show it (software events, which work where the hardware counters are not offered).
    """
    perf = find_tool("perf")
    pids = [
        pid for pid in os.listdir("/proc") if pid.isdigit() and (f := _stat_fields(pid)) and int(f[2]) == server_group
    ]
    if perf is None or not pids:
        return None
    return subprocess.Popen(
        [perf, "stat", "-x,", "-e", ",".join(PERF_EVENTS), "-p", ",".join(pids)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_perf(proc: subprocess.Popen[str] | None) -> dict[str, float]:
    if proc is None:
        return {}
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    counts = {}
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2] in PERF_EVENTS and fields[0].replace(".", "").isdigit():
            counts[fields[2].removeprefix("syscalls:sys_enter_")] = float(fields[0])
    return counts


def postmaster_pid(cluster: PgCluster) -> int:
    return int((cluster.datadir / "postmaster.pid").read_text().split()[0])


def backends(cluster: PgCluster) -> int:
    return int(cluster.execute(BACKENDS_SQL, [DB_NAME])[0][0])


def wait_no_backends(cluster: PgCluster, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while (n := backends(cluster)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if n:
        log(f"{n} backends still open after {timeout:g} s: terminating them")
        cluster.terminate_backends(DB_NAME)


def reset_data(cluster: PgCluster, last_seeded_order: int) -> None:
    """Drop the orders earlier runs wrote, so that every mode counts the same rows."""
    cluster.execute("DELETE FROM shop_orderline WHERE order_id > %s", [last_seeded_order], dbname=DB_NAME)
    cluster.execute("DELETE FROM shop_order WHERE id > %s", [last_seeded_order], dbname=DB_NAME)
    cluster.execute("VACUUM ANALYZE shop_order, shop_orderline, shop_product", dbname=DB_NAME)


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        cluster: PgCluster,
        tools: dict[str, str],
        rawdir: Path,
        cookie: str | None = None,
    ) -> None:
        self.args, self.cluster, self.tools, self.rawdir = args, cluster, tools, rawdir
        #: The session cookie of a logged-in superuser, for the admin endpoint (bench_login).
        self.cookie = cookie
        self.pid = int(cluster.execute("SELECT min(id) FROM shop_product", dbname=DB_NAME)[0][0])
        self.last_seeded_order = int(
            cluster.execute("SELECT coalesce(max(id), 0) FROM shop_order", dbname=DB_NAME)[0][0]
        )

    def path(self, endpoint: str) -> str:
        return ENDPOINTS[endpoint][1].format(pid=self.pid)

    def cookie_for(self, endpoint: str) -> str | None:
        return self.cookie if endpoint == "admin" else None

    def run_mode(
        self, scenario: str, mode: str, endpoints: list[str], workers: int, threads: int, connections: int
    ) -> dict[str, Any]:
        """{endpoint: result} for one mode, or {"unavailable": reason} / {"failed": reason}."""
        a = self.args
        reset_data(self.cluster, self.last_seeded_order)
        wait_no_backends(self.cluster)
        bouncer = None
        server = None
        out: dict[str, Any] = {}
        try:
            if mode == "pgbouncer":
                bouncer = PgBouncer(
                    self.cluster,
                    pool_size=workers * a.pool_size,
                    logdir=self.rawdir,
                    settings=BOUNCER,
                    users=(DB_USER,),
                )
                bouncer.start(dbname=DB_NAME, user=DB_USER)
            db = database(mode, self.cluster, a.pool_size, a.pool_timeout, bouncer.port if bouncer else None)
            env = django_env(db, mode)
            if "OPTIONS" in db:  # the pool modes: settings validation may refuse them
                if (reason := preflight(env)) is not None:
                    log(f"{scenario}/{mode}: not available: {reason.splitlines()[0]}")
                    return {"unavailable": reason}
                wait_no_backends(self.cluster)
            postmaster = postmaster_pid(self.cluster)
            server = Gunicorn(env, workers, threads, self.rawdir / f"gunicorn-{scenario}-{mode}.log")
            server.start()
            server.wait_ready(self.path(endpoints[0]), self.cookie_for(endpoints[0]))
            for endpoint in endpoints:
                url, cookie = server.base + self.path(endpoint), self.cookie_for(endpoint)
                if a.warmup > 0:
                    run_wrk(self.tools["wrk"], url, a.warmup, connections, a.wrk_threads, a.wrk_timeout, a.reconnect_every,
                            cookie)  # fmt: skip
                sampler = Sampler(self.cluster)
                sampler.start()
                cpu_before, wrk_before = (
                    cpu_seconds(server.proc.pid, postmaster),
                    resource.getrusage(resource.RUSAGE_CHILDREN),
                )
                perf = start_perf(server.proc.pid) if a.perf else None
                try:
                    result = run_wrk(self.tools["wrk"], url, a.duration, connections, a.wrk_threads, a.wrk_timeout,
                                     a.reconnect_every, cookie)  # fmt: skip
                finally:
                    result_backends = sampler.finish()
                    perf_counts = finish_perf(perf)
                cpu_after, wrk_after = (
                    cpu_seconds(server.proc.pid, postmaster),
                    resource.getrusage(resource.RUSAGE_CHILDREN),
                )
                result.update(result_backends)
                cpu = {side: cpu_after[side] - cpu_before[side] for side in cpu_after}
                cpu["wrk"] = (wrk_after.ru_utime + wrk_after.ru_stime) - (wrk_before.ru_utime + wrk_before.ru_stime)
                result["cpu_us_per_request"] = {
                    k: round(v / max(1, result["requests"]) * 1e6, 1) for k, v in cpu.items()
                }
                if perf_counts:
                    result["gunicorn_per_request"] = {
                        k: round(v / max(1, result["requests"]), 2) for k, v in perf_counts.items()
                    }
                out[endpoint] = result
                log(
                    f"{scenario}/{mode}/{endpoint}: {result['rps']:.0f} req/s, p50 {result['p50_ms']:.1f} ms, "
                    f"p99 {result['p99_ms']:.1f} ms, non-2xx {result['non2xx']}, errors {result['errors']}, "
                    f"peak backends {result['peak_backends']}, CPU us/request "
                    + ", ".join(f"{k} {v:.0f}" for k, v in result["cpu_us_per_request"].items())
                    + "".join(f", {k}/request {v:.1f}" for k, v in result.get("gunicorn_per_request", {}).items())
                )
        except RuntimeError as exc:
            log(f"{scenario}/{mode}: FAILED: {exc}")
            out["failed"] = str(exc)
        finally:
            if server is not None:
                server.stop()
            if bouncer is not None:
                bouncer.stop()
            wait_no_backends(self.cluster)
        return out

    def run_autoscale(self, mode: str) -> dict[str, Any]:
        """The autoscaling spike for one mode: wrk's load on ``--autoscale-endpoint`` against
        ``--autoscale-start-workers`` workers, then one TTIN a second up to ``--autoscale-end-workers``
        while the load goes on. Every pool has min_size 1 and max_size ``--pool-size`` per worker, so
        the end workers' sizes do not fit the server's ``--autoscale-max-connections``; ours also
        has ``fleet_max_size`` ``--autoscale-budget``. Counts the answers by status, the log lines
        where the server refused a connection, and the peak of backends (every 50 ms)."""
        a = self.args
        reset_data(self.cluster, self.last_seeded_order)
        wait_no_backends(self.cluster)
        db = database(mode, self.cluster, a.pool_size, a.pool_timeout, None)
        db["OPTIONS"]["pool"]["min_size"] = 1
        if mode in OURS:
            db["OPTIONS"]["pool"]["fleet_max_size"] = a.autoscale_budget
        env = django_env(db) | {"BENCH_LOG_ERRORS": "1"}
        if (reason := preflight(env)) is not None:
            log(f"autoscale/{mode}: not available: {reason.splitlines()[0]}")
            return {"unavailable": reason}
        wait_no_backends(self.cluster)
        logfile = self.rawdir / f"gunicorn-autoscale-{mode}.log"
        offset = logfile.stat().st_size if logfile.exists() else 0
        server = Gunicorn(env, a.autoscale_start_workers, a.autoscale_threads, logfile)
        out: dict[str, Any] = {"pool": db["OPTIONS"]["pool"]}
        try:
            server.start()
            path = self.path(a.autoscale_endpoint)
            server.wait_ready(path)
            assert server.proc is not None
            sampler = Sampler(self.cluster, interval=0.05)
            sampler.start()
            holder: dict[str, Any] = {}

            def spike() -> None:
                try:
                    holder["wrk"] = run_wrk(self.tools["wrk"], server.base + path, a.autoscale_duration,
                                            a.autoscale_connections, a.wrk_threads, a.wrk_timeout, a.reconnect_every)  # fmt: skip
                except RuntimeError as exc:
                    holder["error"] = str(exc)

            load = threading.Thread(target=spike, daemon=True)
            started = time.monotonic()
            load.start()
            time.sleep(a.autoscale_ramp_after)
            signals = []
            for _ in range(a.autoscale_end_workers - a.autoscale_start_workers):
                server.proc.send_signal(signal.SIGTTIN)
                signals.append(round(time.monotonic() - started, 1))
                time.sleep(1.0)
            load.join()
            workers = len([pid for pid in os.listdir("/proc") if pid.isdigit() and (f := _stat_fields(pid))
                           and int(f[1]) == server.proc.pid])  # fmt: skip
            out.update(sampler.finish())
            if "error" in holder:
                raise RuntimeError(holder["error"])
            result = holder["wrk"]
        except RuntimeError as exc:
            log(f"autoscale/{mode}: FAILED: {exc}")
            return {"failed": str(exc), **out}
        finally:
            server.stop()
            wait_no_backends(self.cluster)
        with logfile.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        statuses = result["statuses"]
        out.update(
            {
                key: result[key]
                for key in ("rps", "requests", "p50_ms", "p99_ms", "statuses", "non2xx", "errors", "command")
            }
        )
        out.update(
            {
                "ttin_at_s": signals,
                "workers_at_end": workers,
                "responses_500": statuses.get(500, 0),
                "responses_503": statuses.get(503, 0),
                "responses_2xx": sum(n for code, n in statuses.items() if 200 <= code < 300),
                "server_full_lines": sum(1 for ln in text.splitlines() if any(w in ln for w in SERVER_FULL)),
                "budget_lines": sum(1 for ln in text.splitlines() if "fleet budget" in ln),
            }
        )
        log(
            f"autoscale/{mode}: {out['rps']:.0f} req/s, 2xx {out['responses_2xx']}, 500 {out['responses_500']}, "
            f"503 {out['responses_503']}, other non-2xx {out['non2xx'] - out['responses_500'] - out['responses_503']}, "
            f"socket errors {out['errors']}, 'too many clients'/'remaining connection slots' log lines "
            f"{out['server_full_lines']}, peak backends {out['peak_backends']}, workers {workers}"
        )
        return out


# ----- Report ------------------------------------------------------------------------------------


def autoscale_section(data: dict[str, Any]) -> list[str]:
    """The autoscaling scenario's table (empty when it did not run)."""
    results, o = data.get("autoscale"), data.get("autoscale_setup")
    if not results or not o:
        return []
    lines = [
        f"## Autoscaling: max_connections={o['max_connections']}, {o['start_workers']} -> {o['end_workers']} "
        f"workers (TTIN) under load",
        "",
        f"`GET {ENDPOINTS[o['endpoint']][1]}` with wrk, {o['connections']} clients for {o['duration']:g} s; "
        f"{o['start_workers']} gunicorn workers x {o['threads']} threads at first, one `TTIN` a second from "
        f"{o['ramp_after']:g} s on until {o['end_workers']}. Every pool: min_size 1, max_size {o['pool_size']} per "
        f"worker, so {o['end_workers']} workers may open {o['end_workers'] * o['pool_size']} connections, against "
        f"max_connections {o['max_connections']} (the site's role, not a superuser, gets that less "
        f"superuser_reserved_connections). Ours also has `fleet_max_size: {o['budget']!r}`. Server full: lines of the "
        'gunicorn log with "too many clients" or "remaining connection slots". Peak backends: client backends '
        "of the database, from `pg_stat_activity` every 50 ms.",
        "",
        "| mode | pool | req/s | 2xx | 500 | 503 | other non-2xx | socket errors | server full (log lines) "
        "| peak backends | workers at end |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, r in results.items():
        if "rps" not in r:
            why = "not available" if "unavailable" in r else "failed"
            first = (r.get("unavailable") or r.get("failed") or "").strip().splitlines()[:1]
            lines.append(f"| {mode} | {why}: {first[0][:120] if first else ''} | | | | | | | | | |")
            continue
        pool = r["pool"]
        size = f"max {pool['max_size']}" + (f", budget {pool['fleet_max_size']}" if "fleet_max_size" in pool else "")
        other = r["non2xx"] - r["responses_500"] - r["responses_503"]
        lines.append(
            f"| {mode} | {size} | {r['rps']:.0f} | {r['responses_2xx']} | {r['responses_500']} | {r['responses_503']} "
            f"| {other} | {r['errors']} | {r['server_full_lines']} | {r['peak_backends']} | {r['workers_at_end']} |"
        )
    return [*lines, ""]


def median_run(runs: list[dict]) -> dict:
    """Of several rounds, the run with the median requests per second."""
    if len(runs) == 1:
        return runs[0]
    ordered = sorted(runs, key=lambda r: r["rps"])
    return ordered[(len(ordered) - 1) // 2]


def collapse(rounds: list[dict[str, dict]], modes: list[str], endpoints: list[str]) -> dict[str, dict]:
    """{mode: {endpoint: result | {"unavailable"/"failed": ...}}} from every round."""
    out: dict[str, dict] = {}
    for mode in modes:
        per_mode = [r[mode] for r in rounds if mode in r]
        entry: dict[str, Any] = {}
        for flag in ("unavailable", "failed"):
            if any(flag in r for r in per_mode):
                entry[flag] = next(r[flag] for r in per_mode if flag in r)
        for endpoint in endpoints:
            runs = [r[endpoint] for r in per_mode if endpoint in r]
            if runs:
                entry[endpoint] = median_run(runs) | {"rounds_rps": [round(r["rps"], 1) for r in runs]}
        out[mode] = entry
    return out


def fmt_statuses(statuses: dict) -> str:
    odd = {k: v for k, v in sorted(statuses.items(), key=lambda kv: int(kv[0])) if not 200 <= int(k) < 400}
    return ", ".join(f"{k}: {v}" for k, v in odd.items()) or "-"


def endpoint_table(results: dict[str, dict], endpoint: str, statuses: bool = False) -> list[str]:
    base = results.get("persistent", {}).get(endpoint)
    head = (
        "| mode | req/s (range of rounds) | vs persistent | p50 ms | p99 ms | non-2xx | socket errors | peak backends "
        "| CPU µs/request: gunicorn + PostgreSQL |"
    )
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if statuses:
        head += " non-2xx statuses |"
        sep += "---|"
    lines = [head, sep]
    for mode, entry in results.items():
        r = entry.get(endpoint)
        if r is None:
            why = "not available" if "unavailable" in entry else "failed" if "failed" in entry else "not run"
            lines.append(f"| {mode} | {why} | | | | | | | |" + (" |" if statuses else ""))
            continue
        ratio = f"{r['rps'] / base['rps']:.2f}x" if base and base["rps"] else "-"
        rounds = r.get("rounds_rps", [])
        spread = f" ({min(rounds):.0f}-{max(rounds):.0f})" if len(rounds) > 1 else ""
        cpu = r.get("cpu_us_per_request")
        cpu_text = f"{cpu['gunicorn']:.0f} + {cpu['postgres']:.0f}" if cpu else "-"
        row = (
            f"| {mode} | {r['rps']:.0f}{spread} | {ratio} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['non2xx']} | "
            f"{r['errors']} | {r['peak_backends']} | {cpu_text} |"
        )
        if statuses:
            row += f" {fmt_statuses(r['statuses'])} |"
        lines.append(row)
    return lines


def targets(main: dict[str, dict], overload: dict[str, dict] | None) -> list[str]:
    def get(res: dict | None, mode: str, endpoint: str) -> dict | None:
        return (res or {}).get(mode, {}).get(endpoint)

    rows = ["| target | measured | met |", "|---|---|---|"]

    def add(target: str, measured: str, ok: bool | None) -> None:
        rows.append(f"| {target} | {measured} | {'yes' if ok else 'no' if ok is not None else 'n/a'} |")

    for endpoint, (title, _) in ENDPOINTS.items():
        pr, dp = get(main, "pooled-request", endpoint), get(main, "django-pool", endpoint)
        if pr and dp:
            ratio = pr["rps"] / dp["rps"]
            add(
                f"{title}: `pooled-request` >= `django-pool`",
                f"{pr['rps']:.0f} vs {dp['rps']:.0f} req/s ({ratio:.2f}x)",
                ratio >= 1.0,
            )
    for endpoint in ("product", "listings"):
        title = ENDPOINTS[endpoint][0]
        pr, pe = get(main, "pooled-request", endpoint), get(main, "persistent", endpoint)
        if pr and pe:
            ratio = pr["rps"] / pe["rps"]
            add(f"{title}: `pooled-request` >= 0.97x `persistent`", f"{ratio:.2f}x", ratio >= 0.97)
            add(
                f"{title}: `pooled-request` uses <= 1/4 of `persistent`'s backends",
                f"{pr['peak_backends']} vs {pe['peak_backends']}",
                pr["peak_backends"] * 4 <= pe["peak_backends"],
            )
    pt, ps = get(main, "pooled-transaction", "slow"), get(main, "persistent", "slow")
    if pt and ps:
        ratio = pt["rps"] / ps["rps"]
        add("50 ms wait: `pooled-transaction` >= 1.0x `persistent`", f"{ratio:.2f}x", ratio >= 1.0)
    else:
        why = "not available" if "unavailable" in (main or {}).get("pooled-transaction", {}) else "not measured"
        add("50 ms wait: `pooled-transaction` >= 1.0x `persistent`", why, None)
    for endpoint in ("three", "listings"):
        tt, tr = get(main, "pooled-transaction", endpoint), get(main, "pooled-request", endpoint)
        if tt and tr:
            ratio = tt["rps"] / tr["rps"]
            add(f"{ENDPOINTS[endpoint][0]}: `pooled-transaction` vs `pooled-request`", f"{ratio:.2f}x", None)
    if overload:
        for mode in OURS:
            entry = overload.get(mode, {})
            runs = [v for k, v in entry.items() if k in ENDPOINTS]
            if runs:
                bad = sum(r["non2xx"] + r["errors"] for r in runs)
                add(
                    f"overload: zero non-2xx for `{mode}`",
                    f"{bad} non-2xx/errors over {len(runs)} endpoint(s)",
                    bad == 0,
                )
            else:
                add(
                    f"overload: zero non-2xx for `{mode}`",
                    "not available" if "unavailable" in entry else "not measured",
                    None,
                )
    return rows


def chart(path: Path, scenarios: list[tuple[str, dict[str, dict], str]]) -> None:
    """Req/s (top) and peak backends (bottom) per mode, one column per endpoint and scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = [(title, res, ep) for title, res, ep in scenarios]
    fig, axes = plt.subplots(2, len(cols), figsize=(3.3 * len(cols) + 0.8, 6.6), squeeze=False)
    for i, (title, res, endpoint) in enumerate(cols):
        modes = list(res)
        for row, (key, label) in enumerate((("rps", "requests/s"), ("peak_backends", "peak backends"))):
            ax = axes[row][i]
            values = [res[m].get(endpoint, {}).get(key) for m in modes]
            bars = ax.bar(range(len(modes)), [v or 0 for v in values], color=[COLORS.get(m, "#333") for m in modes])
            for bar, v in zip(bars, values, strict=True):
                ax.annotate(
                    "n/a" if v is None else f"{v:.0f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
            ax.set_xticks(range(len(modes)))
            ax.set_xticklabels(modes if row == 1 else [], rotation=45, ha="right", fontsize=8)
            if i == 0:
                ax.set_ylabel(label)
            if row == 0:
                ax.set_title(title, fontsize=9)
            ax.margins(y=0.15)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict[str, str]:
    info = {"cores": str(os.cpu_count()), "os": platform.platform()}
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("model name")), "?")
        mem = Path("/proc/meminfo").read_text().split()
        info["memory"] = f"{int(mem[mem.index('MemTotal:') + 1]) / 1024 / 1024:.1f} GiB"
        info["os"] = next(
            ln.split("=", 1)[1].strip('"')
            for ln in Path("/etc/os-release").read_text().splitlines()
            if ln.startswith("PRETTY_NAME=")
        )
    except (OSError, StopIteration, ValueError):
        pass
    info["kernel"] = platform.release()
    return info


def versions(cluster: PgCluster, tools: dict[str, str]) -> dict[str, str]:
    import django
    import gunicorn
    import psycopg_pool

    out = {
        "Python": platform.python_version(),
        "Django": django.get_version(),
        "psycopg": f"{psycopg.__version__} (libpq {psycopg.pq.version()})",
        "psycopg_pool": psycopg_pool.__version__,
        "gunicorn": gunicorn.__version__,
        "PostgreSQL": str(cluster.execute("SHOW server_version")[0][0]),
    }
    try:
        import django_pooled_pg

        out["django-pooled-pg"] = django_pooled_pg.__version__
    except (ImportError, AttributeError):
        pass
    for tool in ("pgbouncer", "wrk"):
        if tool in tools:
            res = subprocess.run([tools[tool], "--version"], capture_output=True, text=True, check=False)
            out[tool] = ((res.stdout or res.stderr).splitlines() or ["?"])[0].strip()
    return out


def write_report(path: Path, data: dict[str, Any]) -> None:
    a = data["args"]
    lines = ["# Benchmark results", ""]
    lines.append(
        f"`{data['command']}` on {data['date']} ({data['elapsed_min']:.1f} min). "
        f"Load average before / after: {data['load_before']} / {data['load_after']}."
    )
    lines.append("")
    lines.append(
        f"gunicorn gthread, {a['workers']} workers x {a['threads']} threads; wrk `-t{a['wrk_threads']} -c{data['connections']}`, "
        f"{a['duration']:g} s per endpoint and mode after {a['warmup']:g} s of warm-up"
        + (f", median of {a['rounds']} rounds" if a["rounds"] > 1 else "")
        + f". Every pool holds {a['pool_size']} connections per worker (min_size = max_size = {a['pool_size']}, "
        f"timeout {a['pool_timeout']:g} s); PgBouncer (transaction mode) gets default_pool_size = workers x "
        f"{a['pool_size']}. PostgreSQL runs on the same machine (max_connections {a['max_connections']}, "
        "fsync off; the site connects as an ordinary role, so superuser_reserved_connections keep room for "
        "the harness's monitoring). Peak backends: client backends on the database, from `pg_stat_activity` every 100 ms. "
        "Orders written by earlier runs are deleted before each mode. CPU µs/request: user + system time of the "
        "gunicorn processes and of PostgreSQL's processes over the measured run (from /proc, per request served; "
        "on 2 shared cores throughput follows their sum; backends that exit during the run, as in `direct` "
        "and `pgbouncer`, are not counted). "
        + (
            RECONNECT_NOTE.format(n=a["reconnect_every"])
            if a.get("reconnect_every")
            else "wrk keeps its connections open for the whole run (`--reconnect-every 0`)."
        )
    )
    lines += ["", "## Targets", "", *targets(data["main"], data.get("overload")), ""]
    for endpoint in a["endpoints"]:
        title, path_ = ENDPOINTS[endpoint]
        lines += [f"## {title}: `GET {path_.format(pid=data['pid'])}`", "", *endpoint_table(data["main"], endpoint), ""]
    if data.get("overload"):
        o = data["overload_setup"]
        lines += [
            f"## Overload: max_connections={o['max_connections']}, {o['workers']} workers x {o['threads']} "
            f"threads, {o['connections']} clients",
            "",
        ]
        for endpoint in o["endpoints"]:
            title, path_ = ENDPOINTS[endpoint]
            lines += [
                f"### {title}: `GET {path_.format(pid=data['pid'])}`",
                "",
                *endpoint_table(data["overload"], endpoint, statuses=True),
                "",
            ]
    lines += autoscale_section(data)
    notes = []
    for scenario in ("main", "overload"):
        for mode, entry in (data.get(scenario) or {}).items():
            for flag in ("unavailable", "failed"):
                if flag in entry:
                    first = entry[flag].strip().splitlines()[0] if entry[flag].strip() else flag
                    notes.append(
                        f"* {scenario} `{mode}`: {'not available' if flag == 'unavailable' else 'failed'}: {first}"
                    )
    if notes:
        lines += ["Modes that did not run:", "", *notes, ""]
    if data.get("micro"):
        m = data["micro"]
        lines += [
            f"## Micro-benchmark (`bench/micro.py`, in-process, median of {m['rounds']} rounds x {m['n']})",
            "",
            "| mode | borrow + return (µs) | borrow + SELECT 1 + return (µs) | 3 x SELECT 1 + return (µs) |",
            "|---|---:|---:|---:|",
        ]
        for mode, ops in m["results"].items():
            lines.append(f"| {mode} | {ops['borrow']:.2f} | {ops['select']:.2f} | {ops.get('three', 0):.2f} |")
        req, tx = m["results"].get("pooled"), m["results"].get("pooled-transaction")
        if req and tx and "three" in req and "three" in tx:
            lines += [
                "",
                f"Per-statement release costs {(tx['three'] - req['three']) / 3:.1f} µs per statement over "
                '`release="request"` (the `three` column\'s difference, over three).',
            ]
        lines.append("")
    if data.get("contended"):
        c = data["contended"]
        import contended

        lines += [
            f"## Contended, in-process (`bench/contended.py`: {contended.THREADS} threads on a pool of "
            f"{contended.SIZE}, `SELECT 1` per request; "
            f"median and range of {c['rounds']} rounds of {c['seconds']:g} s)",
            "",
            "| mode | " + " | ".join(title for _, title, _ in contended.FIGURES) + " |",
            "|---|" + "---:|" * len(contended.FIGURES),
        ]
        for mode, runs in c["results"].items():
            lines.append(f"| {mode} | " + " | ".join(contended.cells(runs)) + " |")
        lines.append("")
    lines += ["## Machine and versions", ""]
    lines += [f"* {k}: {v}" for k, v in data["machine"].items()]
    lines += [f"* {k} {v}" for k, v in data["versions"].items()]
    lines += ["", "![requests per second and peak backends per mode](chart.png)", ""]
    path.write_text("\n".join(lines))


# ----- Main --------------------------------------------------------------------------------------


def csv_list(value: str, allowed: tuple[str, ...] | list[str]) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def run_micro(cluster: PgCluster, rounds: int, n: int) -> dict[str, Any]:
    import micro

    results = micro.measure(cluster.django_settings("postgres"), rounds, n)
    med = {mode: {op: statistics.median(v) for op, v in ops.items()} for mode, ops in results.items()}
    print(micro.table(med), flush=True)
    return {"rounds": rounds, "n": n, "results": med, "all": results}


def run_contended(cluster: PgCluster, rounds: int, seconds: float) -> dict[str, Any]:
    """``bench/contended.py`` at its defaults (a gthread worker's shape), each mode alternating."""
    import contended

    results = contended.measure(cluster.django_settings("postgres"), contended.DEFAULT_MODES, rounds, seconds=seconds)
    print(contended.table(results), flush=True)
    return {"rounds": rounds, "seconds": seconds, "results": results}


def run_autoscale(args: argparse.Namespace, bench: Bench, cluster: PgCluster) -> tuple[dict, dict[str, dict]]:
    """The autoscaling scenario in each of :data:`AUTOSCALE_MODES` that ``--modes`` has: its
    setup (for the report) and {mode: result}."""
    cluster.set_max_connections(args.autoscale_max_connections)
    setup = {
        "max_connections": args.autoscale_max_connections,
        "start_workers": args.autoscale_start_workers,
        "end_workers": args.autoscale_end_workers,
        "threads": args.autoscale_threads,
        "connections": args.autoscale_connections,
        "duration": args.autoscale_duration,
        "ramp_after": args.autoscale_ramp_after,
        "endpoint": args.autoscale_endpoint,
        "pool_size": args.pool_size,
        "budget": args.autoscale_budget,
    }
    out = {}
    for mode in [m for m in AUTOSCALE_MODES if m in args.modes]:
        log(f"autoscale: {mode}")
        out[mode] = bench.run_autoscale(mode)
    return setup, out


def write_autoscale_only(outdir: Path, rawdir: Path, data: dict[str, Any], started: float) -> int:
    """``--autoscale-only``: AUTOSCALE.md and the raw figures (RESULTS.md is left alone)."""
    data["elapsed_min"] = (time.monotonic() - started) / 60
    raw = rawdir / f"autoscale-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    raw.write_text(json.dumps(data, indent=1, default=str))
    lines = [
        "# Benchmark results: autoscaling",
        "",
        f"`{data['command']}` on {data['date']} ({data['elapsed_min']:.1f} min). "
        + RECONNECT_NOTE.format(n=data["args"]["reconnect_every"]),
        "",
        *autoscale_section(data),
        "## Machine and versions",
        "",
        *[f"* {k}: {v}" for k, v in data["machine"].items()],
        *[f"* {k} {v}" for k, v in data["versions"].items()],
        "",
    ]
    (outdir / "AUTOSCALE.md").write_text("\n".join(lines))
    log(f"wrote {outdir / 'AUTOSCALE.md'} and {raw}")
    print((outdir / "AUTOSCALE.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--modes",
        type=lambda v: csv_list(v, ALL_MODES + EXPERIMENTS),
        default=list(ALL_MODES),
        help=f"of {', '.join(ALL_MODES)}; experiments: {', '.join(EXPERIMENTS)}",
    )
    parser.add_argument("--endpoints", type=lambda v: csv_list(v, list(ENDPOINTS)), default=list(ENDPOINTS))
    parser.add_argument("--duration", type=float, default=8, help="seconds of measured load per endpoint and mode")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of load before each measurement")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--connections", type=int, help="wrk connections (default: workers x threads)")
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument(
        "--wrk-timeout", type=float, default=10, help="seconds before wrk counts a request as timed out"
    )
    parser.add_argument(
        "--reconnect-every",
        type=int,
        default=10,
        help="wrk closes a connection after every Nth request and opens another (0: never; see RECONNECT_NOTE)",
    )
    parser.add_argument("--pool-size", type=int, default=4, help="connections per worker for every pool")
    parser.add_argument("--pool-timeout", type=float, default=5)
    parser.add_argument("--max-connections", type=int, default=100, help="PostgreSQL max_connections (main runs)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every mode; report the median run")
    parser.add_argument("--skip-overload", action="store_true")
    parser.add_argument(
        "--overload-endpoints", type=lambda v: csv_list(v, list(ENDPOINTS)), default=["product", "slow"]
    )
    parser.add_argument("--overload-max-connections", type=int, default=20)
    parser.add_argument("--overload-workers", type=int, default=4)
    parser.add_argument("--overload-threads", type=int, default=16)
    parser.add_argument("--overload-connections", type=int, default=128)
    parser.add_argument("--skip-autoscale", action="store_true")
    parser.add_argument(
        "--autoscale-only",
        action="store_true",
        help="run only the autoscaling scenario (no micro, main or overload); writes AUTOSCALE.md",
    )
    parser.add_argument("--autoscale-max-connections", type=int, default=20)
    parser.add_argument("--autoscale-start-workers", type=int, default=2)
    parser.add_argument("--autoscale-end-workers", type=int, default=8)
    parser.add_argument("--autoscale-threads", type=int, default=16)
    parser.add_argument("--autoscale-connections", type=int, default=128)
    parser.add_argument("--autoscale-duration", type=float, default=20, help="seconds of the spike")
    parser.add_argument("--autoscale-ramp-after", type=float, default=3, help="seconds of spike before the first TTIN")
    parser.add_argument("--autoscale-endpoint", choices=list(ENDPOINTS), default="slow")
    parser.add_argument(
        "--autoscale-budget",
        type=lambda v: v if v == "auto" else int(v),
        default="auto",
        help='fleet_max_size for our modes: a number or "auto" (default)',
    )
    parser.add_argument(
        "--perf",
        action="store_true",
        help="count the workers' context switches and GIL-releasing system calls (perf stat)",
    )
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--micro-rounds", type=int, default=3)
    parser.add_argument("--micro-n", type=int, default=10000)
    parser.add_argument("--skip-contended", action="store_true", help="leave out bench/contended.py")
    parser.add_argument("--contended-rounds", type=int, default=3)
    parser.add_argument("--contended-seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s runs, 1 s warm-up, small micro")
    parser.add_argument("--output", default=str(BENCH / "results"), help="where RESULTS.md, chart.png, raw/ go")
    parser.add_argument("--report", metavar="RAW_JSON", help="only write RESULTS.md again from a raw result file")
    args = parser.parse_args(argv)
    if args.report:
        data = json.loads(Path(args.report).read_text())
        write_report(Path(args.output) / "RESULTS.md", data)
        print((Path(args.output) / "RESULTS.md").read_text())
        return 0
    if args.quick:
        args.duration, args.warmup = min(args.duration, 2), min(args.warmup, 1)
        args.micro_rounds, args.micro_n = 1, 2000
        args.contended_rounds, args.contended_seconds = 1, 1.0
        args.overload_endpoints = args.overload_endpoints[:1]
    connections = args.connections or args.workers * args.threads
    command = "python bench/run.py" + (
        ""
        if not (argv if argv is not None else sys.argv[1:])
        else " " + shlex.join(argv if argv is not None else sys.argv[1:])
    )

    outdir = Path(args.output).absolute()
    rawdir = outdir / "raw"
    rawdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    tools = ensure_tools("pgbouncer" in args.modes and not args.autoscale_only)

    data: dict[str, Any] = {
        "command": command,
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "args": {k: v for k, v in vars(args).items()},
        "connections": connections,
        "load_before": load_before,
    }
    log("starting PostgreSQL")
    cluster = PgCluster(max_connections=args.max_connections, settings={"timezone": "UTC"})
    interrupted = False
    try:
        cluster.start()
        cluster.execute(f"CREATE ROLE {DB_USER} LOGIN")
        cluster.execute(f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}")
        # Migrate with this package's app installed (its own tables too), on our ENGINE when it
        # can run at all, else on the stock one.
        for mode in ("pooled-request", "direct"):
            env = django_env(database(mode, cluster, args.pool_size, args.pool_timeout, None))
            if mode == "direct":
                env["BENCH_KEEP_APP"] = "1"
            res = subprocess.run(
                [sys.executable, str(TESTPROJECT / "manage.py"), "migrate", "--noinput", "-v", "0"],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            if res.returncode == 0:
                break
            log(f"migrate with {mode} settings failed:\n{res.stdout}{res.stderr}")
        else:
            raise RuntimeError("manage.py migrate failed")
        subprocess.run([sys.executable, str(TESTPROJECT / "manage.py"), "seed_shop"], env=env, check=True, cwd=ROOT)
        cookie = subprocess.run(
            [sys.executable, str(TESTPROJECT / "manage.py"), "bench_login"],
            env=env,
            check=True,
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        data["machine"] = machine()
        data["versions"] = versions(cluster, tools)
        bench = Bench(args, cluster, tools, rawdir, cookie)
        data["pid"] = bench.pid

        if args.autoscale_only:
            data["autoscale_setup"], data["autoscale"] = run_autoscale(args, bench, cluster)
            return write_autoscale_only(outdir, rawdir, data, started)

        if not args.skip_micro:
            log(f"micro-benchmark: {args.micro_rounds} rounds x {args.micro_n}")
            data["micro"] = run_micro(cluster, args.micro_rounds, args.micro_n)
        if not args.skip_contended:
            log(f"contended, in-process: {args.contended_rounds} rounds x {args.contended_seconds:g} s")
            data["contended"] = run_contended(cluster, args.contended_rounds, args.contended_seconds)

        rounds = []
        for i in range(args.rounds):
            round_: dict[str, dict] = {}
            for mode in args.modes:
                log(f"main{f' round {i + 1}' if args.rounds > 1 else ''}: {mode}")
                round_[mode] = bench.run_mode("main", mode, args.endpoints, args.workers, args.threads, connections)
            rounds.append(round_)
        data["main"] = collapse(rounds, args.modes, args.endpoints)

        if not args.skip_overload:
            cluster.set_max_connections(args.overload_max_connections)
            o = {
                "max_connections": args.overload_max_connections,
                "workers": args.overload_workers,
                "threads": args.overload_threads,
                "connections": args.overload_connections,
                "endpoints": args.overload_endpoints,
            }
            data["overload_setup"] = o
            overload = {}
            for mode in args.modes:
                log(f"overload: {mode}")
                overload[mode] = bench.run_mode(
                    "overload", mode, o["endpoints"], o["workers"], o["threads"], o["connections"]
                )
            data["overload"] = collapse([overload], args.modes, o["endpoints"])

        if not args.skip_autoscale:
            data["autoscale_setup"], data["autoscale"] = run_autoscale(args, bench, cluster)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted")
    finally:
        cluster.cleanup()

    if interrupted or "main" not in data:
        return 1
    data["elapsed_min"] = (time.monotonic() - started) / 60
    data["load_after"] = (
        " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    )
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    raw = rawdir / f"bench-{stamp}.json"
    raw.write_text(json.dumps(data, indent=1, default=str))
    scenarios = [
        (f"{ENDPOINTS[e][0]}\n{args.workers}x{args.threads}, {connections} clients", data["main"], e)
        for e in args.endpoints
    ]
    if data.get("overload"):
        o = data["overload_setup"]
        scenarios += [
            (
                f"Overload: {ENDPOINTS[e][0]}\nmax_conn {o['max_connections']}, {o['workers']}x{o['threads']}, "
                f"{o['connections']} clients",
                data["overload"],
                e,
            )
            for e in o["endpoints"]
        ]
    chart(outdir / "chart.png", scenarios)
    write_report(outdir / "RESULTS.md", data)
    log(f"wrote {outdir / 'RESULTS.md'}, {outdir / 'chart.png'}, {raw} in {data['elapsed_min']:.1f} min")
    print((outdir / "RESULTS.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
