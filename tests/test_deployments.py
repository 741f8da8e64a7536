"""The deployment recipes of docs/deployment.rst that need servers of their own, run as the page
says against the test server: gunicorn with gevent workers, Django Channels under daphne, and a
django-q2 cluster with its ORM broker. Each serves the sample project tests/projects/deploysite
(a view, a WebSocket consumer and a task that report which process, thread and server session
ran their query) on a database of its own.

Each recipe has a control beside it that shows its assertions can fail: the same load on Django's
own backend, psycopg's blocking wait under gevent, ``--preload`` without patching first, ORM code
outside ``database_sync_to_async``, task bodies without ``borrow()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.db import connections
from psycopg import sql

from testsupport.gunicorn import Gunicorn, no_control_socket
from testsupport.ports import HOST, free_port
from testsupport.waiting import wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "tests" / "projects" / "deploysite"


# ----- The sample project on a database of its own -------------------------------------------------


class Site:
    """tests/projects/deploysite on a fresh database of the test server: the environment of its
    processes, ``manage.py``, and the server's view of their sessions."""

    def __init__(self) -> None:
        sd = connections["default"].settings_dict
        self.server = {
            "host": sd["HOST"],
            "port": sd["PORT"],
            "user": sd["USER"],
            "password": sd["PASSWORD"] or None,
        }
        self.dbname = f"dpp_deploy_{os.getpid()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PYTEST_", "DEPLOY_"))}
        self.env = {
            **env,
            "PGHOST": sd["HOST"],
            "PGPORT": str(sd["PORT"]),
            "PGUSER": sd["USER"],
            "PGPASSWORD": sd["PASSWORD"] or "",
            "DEPLOY_DB": self.dbname,
            # (ROOT: the servers import the package of this tree, not the one the venv installed)
            "PYTHONPATH": os.pathsep.join([str(SITE), str(ROOT)]),
            "PYTHONUNBUFFERED": "1",
        }

    def admin(self, query: Any, params: Any = None, dbname: str | None = None) -> list[tuple]:
        """``query`` on a connection of its own (outside any pool), to the site's database."""
        with psycopg.connect(dbname=dbname or self.dbname, autocommit=True, **self.server) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def manage(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=SITE,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"manage.py {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def create(self) -> None:
        self.admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.dbname)), dbname="postgres")
        self.manage("migrate", "--noinput", "-v", "0")

    def drop(self) -> None:
        self.admin(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.dbname)), dbname="postgres"
        )

    def pools(self) -> dict[int, dict]:
        """``poolstats --json``: the live processes of the default alias, by pid."""
        data = json.loads(self.manage("poolstats", "--json"))
        return {p["pid"]: p for p in data["aliases"]["default"]["processes"] if not p["stale"]}

    def sessions(self, application_name: str) -> list[tuple[int, str]]:
        """The server sessions on the site's database whose application_name matches (LIKE):
        (pid, state)."""
        return self.admin(
            "SELECT pid, state FROM pg_stat_activity WHERE datname = %s AND application_name LIKE %s",
            [self.dbname, application_name],
        )


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    site = Site()
    site.create()
    try:
        yield site
    finally:
        site.drop()


def pooled_name(pid: int) -> str:
    """The application_name pattern of the pooled sessions of process ``pid``."""
    return f"dpp default %:{pid}"


STOCK_NAME = "deploysite stock"  # (deploysite's settings give Django's own backend this name)


class PeakSessions:
    """The most server sessions matching ``application_name`` (LIKE) seen at once while the block
    runs, sampled every 20 ms from a thread of its own."""

    def __init__(self, site: Site, application_name: str) -> None:
        self.site = site
        self.application_name = application_name
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        with psycopg.connect(dbname=self.site.dbname, autocommit=True, **self.site.server) as conn:
            while not self._stop.is_set():
                (count,) = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name LIKE %s",
                    [self.site.dbname, self.application_name],
                ).fetchone()
                self.peak = max(self.peak, count)
                self._stop.wait(0.02)

    def __enter__(self) -> PeakSessions:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def max_overlap(results: list[dict]) -> int:
    """The most queries of ``results`` (each with the wall-clock ``started`` and ``ended`` of its
    query in the server process) that ran at the same time."""
    events = sorted([(r["started"], 1) for r in results] + [(r["ended"], -1) for r in results])
    running = peak = 0
    for _, step in events:  # (at equal times an end sorts first)
        running += step
        peak = max(peak, running)
    return peak


def span(results: list[dict]) -> float:
    """Seconds from the first query's start to the last query's end, as the server saw them."""
    return max(r["ended"] for r in results) - min(r["started"] for r in results)


def get(url: str, timeout: float = 60) -> tuple[int, dict[str, str], dict | None]:
    """(status, headers, JSON body or None)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), None


def get_all(
    urls: list[str], clients: int, timeout: float = 60, tolerant: bool = False
) -> list[tuple[int, dict[str, str], dict | None]]:
    """``urls`` requested by ``clients`` concurrent client threads. ``tolerant``: a request that
    gets no answer (the server dropped it, or ``timeout``) counts as status 0."""

    def one(url: str) -> tuple[int, dict[str, str], dict | None]:
        try:
            return get(url, timeout)
        except OSError:
            if not tolerant:
                raise
            return 0, {}, None

    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(one, urls))


@contextlib.contextmanager
def started(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[Any]]:
    """``command`` in the sample project, in a session of its own, its output in ``log``;
    SIGTERM at the end (if it still runs), then SIGKILL to whatever is left of its session."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, cwd=SITE, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            yield proc
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[Any], timeout: float = 30) -> int | None:
    """SIGTERM, ``timeout`` seconds to exit, then SIGKILL to its session; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    return code


def wait_http(base: str, proc: subprocess.Popen[Any], log: Path, timeout: float = 60) -> None:
    def answers() -> bool:
        assert proc.poll() is None, f"the server exited:\n{log.read_text()[-4000:]}"
        try:
            return get(base + "/health/", timeout=2)[0] == 200
        except OSError:
            return False

    wait_until(answers, timeout=timeout, interval=0.2, message=f"{base}/health/ to answer")


def problems(log: str, expected: tuple[str, ...] = ()) -> list[str]:
    """Lines of a server's log that tell of an error, but those with an ``expected`` text."""
    words = ("Traceback", "ERROR", "Internal Server Error", "too many clients", "WARNING django_pooled_pg")
    return [
        line
        for line in log.splitlines()
        if any(word in line for word in words) and not any(text in line for text in expected)
    ]


# ----- gunicorn with gevent workers -------------------------------------------------------------------

#: The gevent recipe's pool: fewer connections than the greenlets that query at once.
GEVENT_POOL = {"min_size": 1, "max_size": 4, "timeout": 3}
#: gunicorn's config file that patches before anything is imported (for --preload).
GEVENT_PRELOAD_CONF = SITE / "gunicorn_gevent_preload.py"


class GeventGunicorn(Gunicorn):
    """deploysite under ``gunicorn -k gevent``: one worker of 50 connections."""

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "gunicorn", "deploysite.wsgi:application", "--chdir", str(SITE),
            "--worker-class", "gevent", "--workers", "1", "--worker-connections", "50",
            "--bind", f"{HOST}:{self.port}", *self.options, *no_control_socket(),
        ]  # fmt: skip


@contextlib.contextmanager
def gevent_server(site: Site, tmp_path: Path, options: list[str], env: dict[str, str]) -> Iterator[GeventGunicorn]:
    server = GeventGunicorn({**site.env, **env}, options=options)
    log = tmp_path / "gunicorn.log"
    with open(log, "w") as out:
        server.start(stdout=out)
        try:
            server.wait_ready("/health/", timeout=60, request_timeout=5)
            yield server
        finally:
            server.stop(timeout=30)
            print(log.read_text()[-6000:])  # (shown by pytest when the test failed)


def worker_of(server: GeventGunicorn) -> int:
    """The pid of the gunicorn worker (the one process that serves)."""
    return get(server.base + "/health/")[2]["pid"]  # type: ignore[index]


@pytest.mark.parametrize("start", ["worker-patches", "preload-patched-config"])
def test_gunicorn_gevent_workers(site, tmp_path, start):
    """One gevent worker of 50 connections, a pool of 4 (timeout 3 s).

    * 40 clients send 200 requests whose query holds the connection 50 ms: every one is a 200,
      the worker never has more than 4 server sessions, and borrowers waited their turn;
    * 16 requests whose query sleeps 0.5 s in the server: 4 of them run at the same time in the
      one process (psycopg yields to the other greenlets while it waits for the server), and
      all 16 take far less than the 8 s they would take one after the other;
    * 16 requests that hold a connection 2.5 s: the pool is saturated (``poolstats`` sees 4 in
      use); those who wait past the timeout get 503 with Retry-After, never 500;
    * afterwards nothing is checked out and no session is left in a transaction.

    ``start``: the worker patches before it loads the app (no ``--preload``), or ``--preload``
    with a config file that patches first."""
    options = ["--preload", "-c", str(GEVENT_PRELOAD_CONF)] if start == "preload-patched-config" else []
    with gevent_server(site, tmp_path, options, {"DEPLOY_POOL": json.dumps(GEVENT_POOL)}) as server:
        worker = worker_of(server)

        # Load: more greenlets than connections.
        with PeakSessions(site, pooled_name(worker)) as peak:
            results = get_all([f"{server.base}/query/?hold=0.05"] * 200, clients=40)
        statuses = [status for status, _, _ in results]
        load = [body for _, _, body in results if body]
        assert statuses == [200] * 200, sorted(set(statuses))
        assert {r["pid"] for r in load} == {worker}
        backends = {r["backend"] for r in load}
        print(
            f"gevent load ({start}): 200 x 200, {len(backends)} sessions, peak {peak.peak} at once, "
            f"{max_overlap(load)} queries at once"
        )
        assert len(backends) <= 4 and 1 <= peak.peak <= 4, (backends, peak.peak)
        assert max_overlap(load) <= 4

        # psycopg yields: 4 queries run at once in one process.
        slow = get_all([f"{server.base}/query/?hold=0.5"] * 16, clients=16)
        assert [status for status, _, _ in slow] == [200] * 16
        slow_results = [body for _, _, body in slow]
        serial = 16 * 0.5
        print(
            f"gevent pg_sleep(0.5) x 16 ({start}): {max_overlap(slow_results)} at once, "
            f"{span(slow_results):.2f} s (serial: {serial:.0f} s)"
        )
        assert max_overlap(slow_results) == 4
        assert span(slow_results) < 0.5 * serial

        # Exhaustion: 503 after the pool's timeout, never 500. The first four hold their
        # connections 8 s, far past the 3 s timeout, so the pool stays full long enough for a
        # poolstats run (a whole manage.py process) to see it on a loaded machine.
        holds: list[Any] = []
        clients = threading.Thread(
            target=lambda: holds.extend(get_all([f"{server.base}/query/?hold=8"] * 16, clients=16)), daemon=True
        )
        clients.start()
        saturated = wait_until(
            lambda: (p := site.pools().get(worker)) and p["in_use"] == 4 and p,
            timeout=20,
            interval=0.1,
            message="poolstats to show the worker's 4 connections in use",
        )
        clients.join(60)
        assert not clients.is_alive()
        statuses = [status for status, _, _ in holds]
        print(f"gevent exhaustion ({start}): {statuses.count(200)} x 200, {statuses.count(503)} x 503")
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 4 and statuses.count(503) >= 1, statuses
        assert all(headers.get("Retry-After") for status, headers, _ in holds if status == 503)
        assert saturated["size"] == 4

        # At rest: everything given back, nothing left in a transaction.
        ok = len(load) + len(slow_results) + statuses.count(200)

        def at_rest() -> dict | None:
            p = site.pools().get(worker)
            return p if p and p["in_use"] == 0 and p["counters"]["borrows"] >= ok else None

        rest = wait_until(at_rest, timeout=30, interval=0.3, message="the worker's pool at rest in poolstats")
        counters = rest["counters"]
        assert counters["responses_503"] == statuses.count(503)
        assert counters["reclaimed"] == 0 and counters["rollbacks"] == 0, counters
        assert rest["wait"]["max"] > 0.05  # (borrowers did wait for a connection)
        assert rest["size"] <= 4 and counters["opened"] <= 4 + counters["lost"], rest

        # (Waited for, not read once: the statistics publisher borrows from the same pool every
        # interval, and between its statements its session is "idle in transaction" for a few
        # ms. A transaction a request left open would stay.)
        def sessions_at_rest() -> bool:
            sessions = site.sessions(pooled_name(worker))
            return len(sessions) <= 4 and all(state == "idle" for _, state in sessions)

        wait_until(
            sessions_at_rest,
            timeout=10,
            interval=0.2,
            message=lambda: f"sessions at rest: {site.sessions(pooled_name(worker))}",
        )
    # (The 503s are logged, once: the rest are counted.)
    log = (tmp_path / "gunicorn.log").read_text()
    assert problems(log, expected=("503 for GET /query/",)) == [], problems(log)


@pytest.mark.parametrize("control", ["blocking-wait", "djangos-backend", "preload-unpatched"])
def test_gunicorn_gevent_controls(site, tmp_path, control):
    """What the recipe's assertions catch.

    * ``blocking-wait``: psycopg's C wait function (what it uses when gevent has not patched
      ``select`` by the time psycopg is imported) blocks the whole worker: the 16 slow queries
      run one at a time.
    * ``djangos-backend``: Django's own backend, no pool, under the same load: a server session
      per greenlet, far more than 4 at once.
    * ``preload-unpatched``: ``--preload`` without patching first: Django's connections were
      made for the master's one thread, every greenlet shares them, and requests fail."""
    env = {"DEPLOY_POOL": json.dumps(GEVENT_POOL)}
    options: list[str] = []
    if control == "blocking-wait":
        env["PSYCOPG_WAIT_FUNC"] = "wait_c"
        # The queries run one after another (8 s): a borrower must not give up at the pool's
        # 3 s timeout meanwhile, or the control measures 503s instead of the serialisation.
        env["DEPLOY_POOL"] = json.dumps({**GEVENT_POOL, "timeout": 60})
    elif control == "djangos-backend":
        env["DEPLOY_ENGINE"] = "stock"
    else:
        options = ["--preload", "--timeout", "10", "--graceful-timeout", "5"]
    with gevent_server(site, tmp_path, options, env) as server:
        if control == "blocking-wait":
            slow = get_all([f"{server.base}/query/?hold=0.5"] * 16, clients=16, timeout=120)
            assert [status for status, _, _ in slow] == [200] * 16, slow
            slow_results = [body for _, _, body in slow]
            print(f"blocking wait: {max_overlap(slow_results)} at once, {span(slow_results):.2f} s")
            assert max_overlap(slow_results) == 1
            assert span(slow_results) >= 16 * 0.5
        elif control == "djangos-backend":
            with PeakSessions(site, STOCK_NAME) as peak:
                results = get_all([f"{server.base}/query/?hold=0.05"] * 200, clients=40)
            assert [status for status, _, _ in results] == [200] * 200
            backends = {body["backend"] for _, _, body in results}  # type: ignore[index]
            print(f"Django's backend: {len(backends)} sessions for 200 requests, peak {peak.peak} at once")
            assert peak.peak > 4 and len(backends) > 4
        else:
            # Django's connections are shared by every greenlet: requests fail (500, Django's
            # thread-sharing error) or the worker hangs (gunicorn kills it at --timeout).
            statuses = get_all([f"{server.base}/query/?hold=0.05"] * 20, clients=10, timeout=15, tolerant=True)
            print(f"--preload unpatched: {[status for status, _, _ in statuses]}")
            assert any(status != 200 for status, _, _ in statuses)
            wait_until(
                lambda: re.search(
                    r"can only be used in that same thread|WORKER TIMEOUT", (tmp_path / "gunicorn.log").read_text()
                ),
                timeout=30,
                message="Django's thread-sharing error, or a worker timeout, in the log",
            )


# ----- Django Channels (daphne) ---------------------------------------------------------------------

#: Channels' recipe: the executor of daphne's event loop has more threads than the pool has
#: connections.
ASGI_THREADS = 8
CHANNELS_POOL = {"min_size": 1, "max_size": 3, "timeout": 5}


@contextlib.contextmanager
def daphne(site: Site, tmp_path: Path, env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[Any], Path]]:
    port = free_port()
    log = tmp_path / "daphne.log"
    command = [sys.executable, "-m", "daphne", "-v", "0", "-b", HOST, "-p", str(port), "deploysite.asgi:application"]
    with started(command, {**site.env, "ASGI_THREADS": str(ASGI_THREADS), **env}, log) as proc:
        try:
            wait_http(f"http://{HOST}:{port}", proc, log)
            yield f"{HOST}:{port}", proc, log
        finally:
            print(log.read_text()[-6000:])


def websocket_load(address: str, clients: int, messages: int, run: str, hold: float = 0.0) -> list[dict]:
    """``clients`` WebSocket clients at once, each sending ``messages`` messages, one at a
    time, and reading each answer; every answer, in one list."""
    import websockets

    async def client(c: int) -> list[dict]:
        answers = []
        async with websockets.connect(f"ws://{address}/ws/query/", open_timeout=30) as ws:
            for m in range(messages):
                await ws.send(json.dumps({"n": c * 1000 + m, "run": run, "hold": hold}))
                answers.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
        return answers

    async def everyone() -> list[list[dict]]:
        return await asyncio.gather(*(client(c) for c in range(clients)))

    return [answer for answers in asyncio.run(everyone()) for answer in answers]


def test_channels_consumers_under_daphne(site, tmp_path):
    """A WebSocket consumer querying in ``database_sync_to_async``, under daphne with
    ASGI_THREADS=8 and a pool of 3.

    * 30 clients x 20 messages with ``thread_sensitive=False``: all 600 answered, by 8 threads
      sharing at most 3 server sessions (never more than 3 at once), and each call began with
      no connection held (Channels' ``close_old_connections()`` gave the last one back);
    * 10 clients x 10 messages with Channels' default (thread-sensitive): all answered, by one
      thread of the process;
    * HTTP requests through Channels' router reach Django's middleware: 200;
    * afterwards: nothing checked out, at most 3 sessions ever opened, none left in a
      transaction, nothing in the log.

    Then the control: ORM code run with plain ``sync_to_async`` (not Channels' wrapper) that
    set session state keeps its connection checked out after the message is answered."""
    with daphne(site, tmp_path, {"DEPLOY_POOL": json.dumps(CHANNELS_POOL)}) as (address, proc, log):
        server = proc.pid
        with PeakSessions(site, pooled_name(server)) as peak:
            pooled = websocket_load(address, clients=30, messages=20, run="threads", hold=0.01)
        assert len(pooled) == 600 and {a["n"] for a in pooled} == {c * 1000 + m for c in range(30) for m in range(20)}
        threads = {a["thread"] for a in pooled}
        backends = {a["backend"] for a in pooled}
        print(
            f"channels, thread_sensitive=False: 600 messages, {len(threads)} threads, {len(backends)} sessions, "
            f"peak {peak.peak} at once, {max_overlap(pooled)} queries at once"
        )
        assert {a["pid"] for a in pooled} == {server}
        assert len(threads) > CHANNELS_POOL["max_size"], threads
        assert len(backends) <= 3 and peak.peak <= 3 and max_overlap(pooled) <= 3
        assert not any(a["held_before"] for a in pooled)

        sensitive = websocket_load(address, clients=10, messages=10, run="sensitive")
        assert len(sensitive) == 100 and not any(a["held_before"] for a in sensitive)
        print(
            f"channels, thread-sensitive: 100 messages, {len({a['thread'] for a in sensitive})} thread(s), "
            f"{len({a['backend'] for a in sensitive})} session(s)"
        )
        assert len({a["thread"] for a in sensitive}) == 1
        assert len(backends | {a["backend"] for a in sensitive}) <= 3

        http = get_all([f"http://{address}/query/"] * 20, clients=10)
        assert [status for status, _, _ in http] == [200] * 20

        total = len(pooled) + len(sensitive) + len(http)

        def at_rest() -> dict | None:
            p = site.pools().get(server)
            return p if p and p["in_use"] == 0 and p["counters"]["borrows"] >= total else None

        rest = wait_until(at_rest, timeout=30, interval=0.3, message="daphne's pool at rest in poolstats")
        counters = rest["counters"]
        print(f"channels pool at rest: {counters['borrows']} borrows, {counters['opened']} sessions opened")
        assert counters["opened"] <= 3 + counters["lost"] and counters["reclaimed"] == 0, counters
        assert rest["wait"]["max"] >= 0.005  # (threads waited for a connection, at least part of a query)

        # The last returns' resets were sent as the connections went back: on a busy machine the
        # server may still be running one (state "active") a moment after the pool is at rest.
        def all_idle() -> tuple[list, ...] | None:
            found = site.sessions(pooled_name(server))
            return (found,) if all(state == "idle" for _, state in found) else None

        (sessions,) = wait_until(
            all_idle,
            timeout=30,
            interval=0.1,
            message=lambda: f"daphne's sessions to be idle: {site.sessions(pooled_name(server))}",
        )
        assert len(sessions) <= 3, sessions
        assert problems(log.read_text()) == [], problems(log.read_text())

        # Control: plain sync_to_async after a SET; nothing gives the connection back.
        plain = websocket_load(address, clients=1, messages=3, run="plain-holding")
        assert len(plain) == 3
        held = wait_until(
            lambda: (p := site.pools().get(server)) and p["counters"]["borrows"] > counters["borrows"] and p,
            timeout=30,
            interval=0.3,
            message="daphne's pool after the plain sync_to_async messages",
        )
        print(f"channels, plain sync_to_async: {held['in_use']} connection(s) left checked out")
        assert held["in_use"] >= 1


def test_channels_plain_sync_to_async_in_request_mode(site, tmp_path):
    """A consumer whose ORM code runs in plain ``sync_to_async(..., thread_sensitive=False)``
    (not Channels' wrapper: nothing gives connections back), ASGI_THREADS=8 and a pool of 4 in
    request mode: 50 clients x 20 messages, every one answered. Outside a request each statement
    gives the connection back, so no executor thread keeps one idle. (Before: 4 threads kept a
    connection each for their whole life, the other threads' messages failed with
    PoolExhausted, 960 of 1000 answered.)"""
    pool = {"min_size": 1, "max_size": 4, "timeout": 5, "release": "request"}
    with daphne(site, tmp_path, {"DEPLOY_POOL": json.dumps(pool)}) as (address, proc, log):
        server = proc.pid
        answers = websocket_load(address, clients=50, messages=20, run="plain", hold=0.002)
        assert {a["n"] for a in answers} == {c * 1000 + m for c in range(50) for m in range(20)}
        threads = {a["thread"] for a in answers}
        backends = {a["backend"] for a in answers}
        print(f"channels, plain sync_to_async: 1000 messages, {len(threads)} threads, {len(backends)} sessions")
        assert len(threads) > pool["max_size"], threads
        assert len(backends) <= 4 and not any(a["held_before"] for a in answers)

        def at_rest() -> dict | None:
            p = site.pools().get(server)
            return p if p and p["in_use"] == 0 and p["counters"]["borrows"] >= len(answers) else None

        rest = wait_until(at_rest, timeout=30, interval=0.3, message="daphne's pool at rest in poolstats")
        assert rest["counters"]["exhausted"] == 0 and rest["counters"]["reclaimed"] == 0, rest["counters"]
        assert problems(log.read_text()) == [], problems(log.read_text())


def test_channels_control_djangos_backend(site, tmp_path):
    """The control: Django's own backend under the same consumer opens a server session for
    every message (``close_old_connections()`` closes it), where the pool's recipe used 3."""
    with daphne(site, tmp_path, {"DEPLOY_ENGINE": "stock"}) as (address, _proc, log):
        answers = websocket_load(address, clients=30, messages=5, run="threads", hold=0.01)
        assert len(answers) == 150
        backends = {a["backend"] for a in answers}
        print(f"channels on Django's backend: {len(backends)} sessions for 150 messages")
        assert len(backends) > 3


# ----- django-q2 --------------------------------------------------------------------------------------

PARENT = re.compile(r"parent session (before|after): (.*)")


def parent_sessions(log: str) -> dict[str, str]:
    return {when: what.strip() for when, what in PARENT.findall(log)}


def runs(site: Site, kind: str) -> list[dict]:
    rows = site.admin(
        "SELECT n, worker, backend, application_name, pool_name, held_before FROM jobs_run WHERE kind = %s ORDER BY n",
        [kind],
    )
    keys = ("n", "worker", "backend", "application_name", "pool_name", "held_before")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def tasks_done(site: Site, count: int) -> Callable[[], bool]:
    def done() -> bool:
        (saved, failed) = site.admin("SELECT count(*), count(*) FILTER (WHERE NOT success) FROM django_q_task")[0]
        assert failed == 0, site.admin("SELECT name, result FROM django_q_task WHERE NOT success")
        return saved >= count

    return done


def clear_queue(site: Site) -> None:
    site.admin("TRUNCATE jobs_run, django_q_task, django_q_ormq")


def start_cluster(site: Site, tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen[Any], Path]:
    """``manage.py qcluster_after_query`` in a session of its own, its output in a file; returned
    once the cluster runs and its workers are ready."""
    log = tmp_path / "qcluster.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "qcluster_after_query"],
            cwd=SITE, env={**site.env, **env}, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def running() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"the cluster exited:\n{log.read_text()[-4000:]}")
        output = log.read_text()
        return "running." in output and output.count("ready for work at") >= int(env["DEPLOY_WORKERS"])

    try:
        wait_until(running, timeout=60, interval=0.2, message="the cluster to run")
    except BaseException:
        stop(proc)
        raise
    return proc, log


def test_django_q2_cluster(site, tmp_path):
    """``manage.py qcluster`` (2 workers, ORM broker), started by a process that has queried
    and keeps its connection, so its processes are forked from one with a pool.

    * 10 tasks, as django-q2 runs them, then 10 whose body is wrapped in ``borrow()``: all
      succeed; every task ran on its worker's own pool (named after the worker's pid) and own
      server sessions, never on the parent's, and began with no connection held (django-q2's
      ``close_old_connections()`` before each task gave the last one back);
    * between tasks nothing is checked out: after a plain task (outside a request its connection
      went back after each statement, though django-q2 closes connections only before the next
      task), and after a ``borrow()`` task;
    * SIGTERM: the cluster stops, exit status 0, every session of its processes ends, and the
      parent's session, shared with every child by fork, still answers afterwards."""
    clear_queue(site)
    proc, log = start_cluster(site, tmp_path, {"DEPLOY_WORKERS": "2"})
    try:
        parent = int(parent_sessions(log.read_text())["before"])
        site.manage("enqueue_jobs", "10", "plain", "--hold", "0.2")
        wait_until(tasks_done(site, 10), timeout=60, interval=0.2, message="10 plain tasks")
        plain = runs(site, "plain")
        workers = {r["worker"] for r in plain}
        assert len(plain) == 10 and len(workers) == 2, plain

        # Between tasks a worker holds nothing (before the rule for code outside requests, it held
        # its last plain task's connection until its next task).
        held = wait_until(
            lambda: (p := site.pools()) and all(w in p and p[w]["counters"]["borrows"] >= 1 for w in workers) and p,
            timeout=30,
            interval=0.3,
            message="both workers in poolstats",
        )
        print(f"django-q2 after plain tasks: in use per worker {[held[w]['in_use'] for w in workers]}")
        assert all(held[w]["in_use"] == 0 for w in workers)

        site.manage("enqueue_jobs", "10", "borrow", "--first", "10", "--hold", "0.2")
        wait_until(tasks_done(site, 20), timeout=60, interval=0.2, message="10 borrow() tasks")
        borrowed = runs(site, "borrow")
        assert len(borrowed) == 10
        again = {r["worker"] for r in borrowed}

        def given_back() -> dict | None:
            p = site.pools()
            ok = all(w in p and p[w]["in_use"] == 0 and p[w]["counters"]["borrows"] >= 2 for w in again)
            return p if ok else None

        rest = wait_until(given_back, timeout=30, interval=0.3, message="the workers' pools at rest")
        print(
            "django-q2 after borrow() tasks: "
            + ", ".join(f"worker {w}: in use {rest[w]['in_use']}, {rest[w]['counters']}" for w in again)
        )
        for w in again:
            counters = rest[w]["counters"]
            assert counters["reclaimed"] == 0 and counters["rollbacks"] == 0, counters
            assert rest[w]["size"] <= 4
        # The pusher and the monitor query too (the ORM broker), each on a pool of its own.
        helpers = {int(pid) for pid in re.findall(r"(?:pushing tasks|monitoring) at (\d+)", log.read_text())}
        assert len(helpers) == 2 and not helpers & (workers | again)
        print(
            "django-q2 pusher and monitor: "
            + ", ".join(
                f"{pid}: in use {rest[pid]['in_use']}, size {rest[pid]['size']}" for pid in helpers if pid in rest
            )
        )
        assert all(pid in rest and rest[pid]["size"] <= 4 and rest[pid]["in_use"] <= 1 for pid in helpers), rest

        everything = plain + borrowed
        assert not any(r["held_before"] for r in everything)
        for r in everything:
            assert r["pool_name"] == f"django_pooled_pg:default:{r['worker']}", r
            assert r["application_name"].endswith(f":{r['worker']}"), r
        by_worker: dict[int, set[int]] = {}
        for r in everything:
            by_worker.setdefault(r["worker"], set()).add(r["backend"])
        print(f"django-q2 sessions per worker: {by_worker}; parent's session: {parent}")
        sessions = [b for backends in by_worker.values() for b in backends]
        assert len(sessions) == len(set(sessions)), "two workers used one server session"
        assert parent not in sessions
        assert all(len(backends) <= 4 for backends in by_worker.values())
    finally:
        code = stop(proc, timeout=60)
    output = log.read_text()
    print(output[-6000:])
    assert code == 0, output[-4000:]
    assert "has stopped" in output and problems(output) == [], problems(output)
    assert parent_sessions(output) == {"before": str(parent), "after": str(parent)}
    wait_until(
        lambda: site.sessions("dpp default %") == [],
        timeout=30,
        interval=0.2,
        message=lambda: f"the cluster's sessions to end: {site.sessions('dpp default %')}",
    )


def test_django_q2_control_djangos_backend(site, tmp_path):
    """The control: with Django's own backend the cluster's first fork closes the parent's
    connection (django-q2 calls ``connections.close_all()`` in the sentinel, which closes the
    session it inherited), and every task opens a server session of its own."""
    clear_queue(site)
    proc, log = start_cluster(site, tmp_path, {"DEPLOY_WORKERS": "2", "DEPLOY_ENGINE": "stock"})
    try:
        site.manage("enqueue_jobs", "6", "plain", env={"DEPLOY_ENGINE": "stock"})
        wait_until(tasks_done(site, 6), timeout=60, interval=0.2, message="6 tasks")
        backends = {r["backend"] for r in runs(site, "plain")}
    finally:
        code = stop(proc, timeout=60)
    output = log.read_text()
    print(output[-4000:])
    assert code == 0
    print(f"django-q2 on Django's backend: {len(backends)} sessions for 6 tasks; {parent_sessions(output)}")
    assert len(backends) == 6
    assert parent_sessions(output)["after"].startswith("failed: OperationalError")
