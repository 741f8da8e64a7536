"""A soak test (issue 8): two gunicorn servers, one per release mode, each with two workers,
take reads, writes and transfers between accounts inside atomic blocks from many threads while
the database server restarts once. Afterwards nothing is lost: the money is all there, every
committed order exists, no rolled-back one does, no backend is idle in transaction, and every
worker's pool is whole. Requests may fail only with 503, and only around the restart.

``pytest tests/test_soak.py --soak-seconds 300`` runs it longer (default 10 s of load).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter

import pytest

from django_pooled_pg.pooling.registry import registry
from tests.app.models import Account
from tests.test_servers import ROOT, free_port, get, server_env
from testsupport.waiting import wait_until

pytestmark = [
    pytest.mark.slow,  # (two gunicorn servers under load, and a restart)
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
]

ACCOUNTS, BALANCE = 10, 1000
WORKERS, THREADS_PER_WORKER, CLIENT_THREADS = 2, 4, 6


def start_gunicorn(release: str) -> tuple[subprocess.Popen, str]:
    pytest.importorskip("gunicorn")
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "tests.wsgi:application",
        "-k",
        "gthread",
        "--workers",
        str(WORKERS),
        "--threads",
        str(THREADS_PER_WORKER),
        "-b",
        f"127.0.0.1:{port}",
        "--graceful-timeout",
        "5",
    ]
    env = {**server_env(), "POOLED_PG_RELEASE": release}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, f"http://127.0.0.1:{port}"


def wait_until_up(process: subprocess.Popen, base: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if get(base + "/no-db/", timeout=1)[0] == 200:
                return
        except OSError:
            pass
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "gunicorn did not start"
        time.sleep(0.2)


class Load:
    """Client threads against one server; what they did and what they saw."""

    def __init__(self, base: str, account_ids: list[int]) -> None:
        self.base = base
        self.account_ids = account_ids
        self.stop = threading.Event()
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.failures: list[tuple[float, str, int, str]] = []
        self.committed: list[str] = []
        self.rolled_back: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(CLIENT_THREADS)]

    def request(self, kind: str, path: str) -> int:
        try:
            status, body = get(self.base + path, timeout=20)
        except OSError as exc:
            status, body = -1, str(exc).encode()
        with self.lock:
            self.statuses[(kind, status)] += 1
            if status != 200:
                self.failures.append((time.monotonic(), kind, status, body[:200].decode(errors="replace")))
        return status

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            kind = rng.choice(["read", "transfer", "transfer", "order", "rollback"])
            if kind == "read":
                self.request(kind, "/query/")
            elif kind == "transfer":
                a, b = rng.sample(self.account_ids, 2)
                self.request(kind, f"/transfer/?from={a}&to={b}&amount={rng.randint(1, 50)}")
            else:
                name = f"soak-{kind}-{uuid.uuid4().hex}"
                rollback = "1" if kind == "rollback" else "0"
                if self.request(kind, f"/order/?name={name}&rollback={rollback}") == 200:
                    with self.lock:
                        (self.rolled_back if rollback == "1" else self.committed).append(name)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads), "a client thread hangs"


def pools_of_every_worker(base: str) -> dict[int, dict]:
    """/pool-state/ of each worker process (requests land on workers at random)."""
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + 15
    while len(seen) < WORKERS and time.monotonic() < deadline:
        state = json.loads(get(base + "/pool-state/")[1])
        seen[state["pid"]] = state
    assert len(seen) == WORKERS, f"reached only workers {sorted(seen)}"
    return seen


def whole_pools(base: str, timeout: float = 30.0) -> dict[int, dict]:
    """:func:`pools_of_every_worker` once none has a connection in use (or at the deadline)."""
    seen: list[dict[int, dict]] = []

    def whole() -> bool:
        seen.append(pools_of_every_worker(base))
        return all(state["in_use"] == [] for state in seen[-1].values())

    try:
        wait_until(whole, timeout=timeout, interval=0.2)
    except AssertionError:
        pass  # (the caller's assertion says which pool)
    return seen[-1]


def test_soak_with_a_server_restart(server, superuser, request):
    seconds = request.config.getoption("--soak-seconds")
    Account.objects.bulk_create([Account(balance=BALANCE) for _ in range(ACCOUNTS)])
    account_ids = list(Account.objects.values_list("pk", flat=True))
    servers = {release: start_gunicorn(release) for release in ("request", "transaction")}
    loads: dict[str, Load] = {}
    try:
        for process, base in servers.values():
            wait_until_up(process, base)
        loads = {release: Load(base, account_ids) for release, (_, base) in servers.items()}
        for load in loads.values():
            load.start()
        time.sleep(seconds / 2)
        restart_started = time.monotonic()
        server.restart()
        restart_done = time.monotonic()
        time.sleep(seconds / 2)
        for load in loads.values():
            load.finish()
        # Every worker's pool whole, once what is still settling has (the reaper, background checks).
        for release, (_, base) in servers.items():
            for pid, state in whole_pools(base).items():
                assert state["in_use"] == [], (release, pid, state)
    finally:
        for load in loads.values():
            load.stop.set()
        for process, _ in servers.values():
            process.terminate()
        for process, _ in servers.values():
            try:
                output, _ = process.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                output, _ = process.communicate()
            print(output[-5000:])
        registry.close_all()  # this process's pools lost their connections in the restart

    # The superuser fixture's connection was killed by the restart: a new one.
    import psycopg
    from django.db import connections

    params = connections["default"].settings_dict
    with psycopg.connect(
        dbname=params["NAME"], user=params["USER"], host=params["HOST"], port=params["PORT"], autocommit=True
    ) as db:
        total, count = db.execute("SELECT sum(balance), count(*) FROM testapp_account").fetchone()
        assert (total, count) == (ACCOUNTS * BALANCE, ACCOUNTS), "money was created or lost"
        existing = {name for (name,) in db.execute("SELECT name FROM testapp_item WHERE name LIKE 'soak-%%'")}
        stuck = db.execute("SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%%'").fetchone()[
            0
        ]
    assert stuck == 0, "a backend is idle in transaction"
    for release, load in loads.items():
        ok = sum(n for (kind, status), n in load.statuses.items() if status == 200)
        print(f"\nSOAK {release}: {dict(load.statuses)}")
        missing = [name for name in load.committed if name not in existing]
        assert not missing, (release, "committed orders missing", missing[:5])
        present = [name for name in load.rolled_back if name in existing]
        assert not present, (release, "rolled-back orders exist", present[:5])
        assert load.committed and ok > 50, (release, dict(load.statuses))
        # Only 503s, and only around the restart (from just before it to 3 s after it ended).
        others = [f for f in load.failures if f[2] != 503]
        assert not others, (release, others[:5])
        late = [f for f in load.failures if not restart_started - 1 <= f[0] <= restart_done + 3]
        assert not late, (release, "failures away from the restart", late[:5])
        # And it recovered: requests succeeded after the restart.
        assert load.statuses, release
    assert superuser is not None
