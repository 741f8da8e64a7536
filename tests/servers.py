"""Servers the tests start: the demo site (testproject/) under gunicorn on a fresh database of
the test server (:class:`Fleet`), traffic for it, and small helpers to wait on them. Shared by
tests/test_fleet_gunicorn.py and tests/test_admin_browser.py."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
from django.db import connections
from psycopg import sql

from testsupport.gunicorn import Gunicorn
from testsupport.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ROOT / "testproject"
WORKERS = 3


def get(url: str, timeout: float = 15) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry))
    return found


class Fleet:
    """The demo site on a fresh database of the test server, under gunicorn."""

    def __init__(self) -> None:
        params = connections["default"].settings_dict
        self.server = {
            "host": params["HOST"],
            "port": params["PORT"],
            "user": params["USER"],
            "password": params["PASSWORD"] or None,
        }
        self.dbname = f"dpp_fleet_{os.getpid()}"
        auth = params["USER"] + (f":{params['PASSWORD']}" if params["PASSWORD"] else "")
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"},
            "DJANGO_SETTINGS_MODULE": "testproject.settings",
            "DATABASE_URL": f"postgresql://{auth}@{params['HOST']}:{params['PORT']}/{self.dbname}",
            "POOLED_PG_STATS_INTERVAL": "0.5",
            "POOLED_PG_STALE_AFTER": "1.5",
            "POOLED_PG_PRUNE_AFTER": "4",
            "PYTHONUNBUFFERED": "1",
        }
        self.gunicorn = Gunicorn(self.env, workers=WORKERS, threads=8)
        self.base = self.gunicorn.base

    def admin(self, query: str, params: object = None, dbname: str = "postgres") -> list[tuple]:
        with psycopg.connect(dbname=dbname, autocommit=True, **self.server) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def manage(
        self, *args: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(PROJECT / "manage.py"), *args],
            cwd=PROJECT,
            env=self.env if env is None else env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def start(self) -> None:
        self.admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.dbname)))
        self.manage("migrate", "--noinput")
        self.manage("seed_shop")
        self.gunicorn.start(stdout=subprocess.PIPE)  # (its output: printed by running_fleet)
        self.gunicorn.wait_ready("/shop/three/", timeout=30, request_timeout=2)

    def workers(self) -> set[int]:
        assert self.gunicorn.proc is not None
        return children(self.gunicorn.proc.pid)

    def poolstats(self) -> dict:
        return json.loads(self.manage("poolstats", "--json").stdout)

    def check(self, *args: str) -> tuple[int, str]:
        done = self.manage("poolstats", "--check", *args, check=False)
        return done.returncode, done.stdout.strip()

    def stop(self) -> str:
        output = self.gunicorn.stop(timeout=15)
        self.admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.dbname)))
        return output


@contextlib.contextmanager
def running_fleet(env: dict[str, str] | None = None) -> Iterator[Fleet]:
    """A started :class:`Fleet` (with ``env`` added to its environment), stopped at the end (its
    gunicorn log printed, so pytest shows it when the test failed)."""
    fleet = Fleet()
    fleet.env.update(env or {})
    try:
        fleet.start()
        yield fleet
    finally:
        print(fleet.stop())


def live(data: dict) -> dict[int, dict]:
    """The live processes of the default alias in ``poolstats --json`` data, by pid."""
    return {p["pid"]: p for p in data["aliases"]["default"]["processes"] if not p["stale"]}


def traffic(base: str, paths: list[str], threads: int, stop: threading.Event) -> list[threading.Thread]:
    """``threads`` client threads requesting ``paths`` in turn until ``stop`` is set; returned, so
    that a test can wait for them to finish their last requests (:func:`join`)."""

    def run(n: int) -> None:
        i = n
        while not stop.is_set():
            get(base + paths[i % len(paths)])
            i += 1

    workers = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(threads)]
    for w in workers:
        w.start()
    return workers


def join(threads: list[threading.Thread], timeout: float = 60.0) -> None:
    """Wait until ``threads`` have ended (the traffic's last requests answered)."""
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"client threads still running after {timeout:g} s"


def wait_for(what: str, test, timeout: float = 30.0, every: float = 0.2):
    """``test()``'s first truthy value, polled every ``every`` seconds; fails after ``timeout``."""
    return wait_until(test, timeout=timeout, interval=every, message=what)
