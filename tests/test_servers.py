"""The middleware under real servers: gunicorn (gthread, --preload) and uvicorn (ASGI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.db import connections

from testsupport.ports import free_port
from testsupport.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,  # (gunicorn and uvicorn)
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
]


def get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def server_env() -> dict[str, str]:
    default, other = connections["default"].settings_dict, connections["other"].settings_dict
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": f"postgresql://{default['USER']}@{default['HOST']}:{default['PORT']}/postgres",
        "POOLED_PG_DB_POOLED_PG": default["NAME"],
        "POOLED_PG_DB_POOLED_PG_OTHER": other["NAME"],
    }


@pytest.fixture(params=["gunicorn", "uvicorn"])
def served(request):
    pytest.importorskip(request.param)
    port = free_port()
    if request.param == "gunicorn":
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "tests.wsgi:application",
            "--preload",
            "-k",
            "gthread",
            "--workers",
            "1",
            "--threads",
            "8",
            "-b",
            f"127.0.0.1:{port}",
        ]
        env = {**server_env(), "PRELOAD_QUERY": "1"}
    else:
        command = [sys.executable, "-m", "uvicorn", "tests.asgi:application", "--port", str(port)]
        env = server_env()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if get(base + "/no-db/", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        yield request.param, base
    finally:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        print(output)  # shown by pytest when the test failed


def test_every_request_gives_back_under_a_real_server(served, superuser):
    kind, base = served
    paths = ["/query/", "/async/", "/stream/", "/left-open/", "/executor/", "/fails/"] * 6
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda p: (p, get(base + p)[0]), paths))
    for path, status in results:
        assert status == (500 if path == "/fails/" else 200), (kind, path, status)
    # The reaper gives back the executor view's connections (its threads end) on its own thread:
    # ask the server until it has.
    states: list[dict] = []

    def given_back() -> bool:
        states.append(json.loads(get(base + "/pool-state/")[1]))
        return not states[-1]["in_use"]

    wait_until(given_back, interval=0.1, message=lambda: f"every connection given back: {states[-1]}")
    state = states[-1]
    assert state["in_use"] == [], (kind, state)
    counters = state["counters"]["default"]
    assert counters["borrows"] >= len(paths)
    assert counters["rollbacks"] >= 6, "every /left-open/ request was rolled back"
    stuck = superuser.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%%'"
    ).fetchone()[0]
    assert stuck == 0
    assert superuser.execute("SELECT count(*) FROM testapp_item WHERE name LIKE 'never%%'").fetchone()[0] == 0
