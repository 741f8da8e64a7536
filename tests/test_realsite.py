"""The ENGINE inside an ordinary project (tests/projects/realsite): the project's own test suite
under pytest-django and Django's runner, debug-toolbar, Sentry, django-prometheus, OpenTelemetry's
instrumentation, and a Celery worker loaded through DJANGO_SETTINGS_MODULE, in both release
modes, against real servers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connections

from testsupport.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "tests" / "projects" / "realsite"
ALL_TOOLS = "toolbar,sentry,prometheus,otel"

pytestmark = pytest.mark.slow  # (a sample project's suites in processes of their own, Celery workers)


@pytest.fixture
def site_env() -> dict[str, str]:
    """Environment for the sample project's processes: the test server, no settings of ours."""
    sd = connections["default"].settings_dict
    env = {
        **os.environ,
        "PGHOST": sd["HOST"],
        "PGPORT": str(sd["PORT"]),
        "PGUSER": sd["USER"],
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(SITE)]),
    }
    for name in ("DJANGO_SETTINGS_MODULE", "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER"):
        env.pop(name, None)
    return env


def run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=SITE, env=env, capture_output=True, text=True, timeout=timeout)


def passed(proc: subprocess.CompletedProcess[str]) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


# ----- The project's own test suite ---------------------------------------------------------------


@pytest.mark.parametrize("release", ["request", "transaction"])
def test_project_suite_under_pytest_django(site_env, release):
    """Plain django_db tests, transaction=True, serialized_rollback, TestCase and
    TransactionTestCase classes that call views, with every tool installed; then --reuse-db and
    pytest-xdist. Nothing the tests made is rolled back by a request, no warning is logged."""
    env = {
        **site_env,
        "REALSITE_RELEASE": release,
        "REALSITE_DB": f"realsite_{release}",
        "REALSITE_TOOLS": ALL_TOOLS,
        "REALSITE_POOL_MAX": "1",
    }
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-rs"]
    first = passed(run([*pytest_cmd, "--reuse-db", "--create-db"], env))
    assert " passed" in first and "failed" not in first and " skipped" not in first, first[-3000:]
    assert "rolled back" not in first and "left a transaction open" not in first, first[-3000:]
    # Again on the kept test database (the data migration's rows are gone after the first run's
    # flush, with Django's own backend as well: those tests are left out).
    again = passed(run([*pytest_cmd, "--reuse-db", "-k", "not migration_rows"], env))
    assert " passed" in again and "failed" not in again, again[-3000:]
    # Under xdist a worker may run another file's plain transactional tests before the
    # serialized ones (the content types collision above): those are covered by the runs above.
    xdist = passed(run([*pytest_cmd, "-n", "2", "--dist", "loadfile", "-k", "not serialized"], env))
    assert " passed" in xdist and "failed" not in xdist, xdist[-3000:]


@pytest.mark.parametrize("release", ["request", "transaction"])
def test_project_suite_under_manage_py_test(site_env, release):
    env = {**site_env, "REALSITE_RELEASE": release, "REALSITE_DB": f"realsite_{release}_runner"}
    output = passed(run([sys.executable, "manage.py", "test", "--noinput", "--parallel", "2", "-v", "2"], env))
    assert "OK" in output and "rolled back" not in output, output[-3000:]
    assert "smoketest ok" not in output  # (the command is run by the pytest suite)


def test_project_suite_passes_on_djangos_own_backend(site_env):
    """The control: the sample project's tests are right, Django's backend passes them."""
    env = {**site_env, "REALSITE_ENGINE": "stock", "REALSITE_DB": "realsite_stock", "REALSITE_TOOLS": "toolbar"}
    output = passed(run([sys.executable, "-m", "pytest", "-q"], env))
    assert " passed" in output and "failed" not in output, output[-3000:]


def test_smoketest_command_in_the_real_database(site_env):
    """`Client` inside a management command's own transaction, on the real database."""
    env = {**site_env, "REALSITE_DB": "realsite_command"}
    _fresh_database(env, "realsite_command")
    passed(run([sys.executable, "manage.py", "migrate", "-v", "0"], env))
    for release in ("request", "transaction"):
        output = passed(run([sys.executable, "manage.py", "smoketest"], {**env, "REALSITE_RELEASE": release}))
        assert "smoketest ok" in output and "rolled back" not in output, output


# ----- Celery -------------------------------------------------------------------------------------


def _fresh_database(env: dict[str, str], name: str) -> None:
    import psycopg

    with psycopg.connect(
        host=env["PGHOST"], port=env["PGPORT"], user=env["PGUSER"], dbname="postgres", autocommit=True
    ) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis server of this test run's own, as Celery's broker."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (.ci/run installs it: apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import socket

        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def celery_db(request) -> str:
    sd = connections["default"].settings_dict
    env = {
        **os.environ,
        "PGHOST": sd["HOST"],
        "PGPORT": str(sd["PORT"]),
        "PGUSER": sd["USER"],
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(SITE)]),
        "REALSITE_DB": "realsite_celery",
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    _fresh_database(env, "realsite_celery")
    passed(run([sys.executable, "manage.py", "migrate", "-v", "0"], env))
    return "realsite_celery"


SEND_TASKS = """
import json, sys
import django
django.setup()
from catalog.tasks import backend_pid, pool_state
n = int(sys.argv[1])
results = [backend_pid.delay() for _ in range(n)]
runs = [r.get(timeout=60) for r in results]
states = [pool_state.delay().get(timeout=60) for _ in range(6)]  # one at a time
print(json.dumps({"runs": runs, "states": states}))
"""


def _run_worker(env: dict[str, str], pool: str, concurrency: int, tasks: int) -> dict:
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "realsite",
            "worker",
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "--queues",
            env["REALSITE_QUEUE"],
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        cwd=SITE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        sent = run(
            [sys.executable, "-c", SEND_TASKS, str(tasks)],
            {**env, "DJANGO_SETTINGS_MODULE": "realsite.settings"},
            timeout=180,
        )
        result = json.loads(passed(sent).strip().splitlines()[-1]) if sent.returncode == 0 else None
    finally:
        worker.terminate()
        try:
            log, _ = worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            log, _ = worker.communicate()
    assert result is not None, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    return result


@pytest.mark.parametrize("release", ["request", "transaction"])
@pytest.mark.parametrize("pool", ["prefork", "threads", "gevent"])
def test_celery_worker_keeps_its_pool(site_env, redis_url, celery_db, pool, release):
    """60 tasks on a worker loaded the way projects load Celery: the fix-up runs around every
    task. Each worker process keeps its pool (a handful of server sessions, not one per task)
    and has given back every connection when a task ends."""
    env = {
        **site_env,
        "REALSITE_DB": celery_db,
        "REALSITE_BROKER": redis_url,
        "REALSITE_QUEUE": f"q-{pool}-{release}",
        "REALSITE_RELEASE": release,
        "DJANGO_SETTINGS_MODULE": "realsite.settings",
    }
    concurrency = 2 if pool == "prefork" else 4
    result = _run_worker(env, pool, concurrency, tasks=60)
    runs = result["runs"]
    assert len(runs) == 60
    backends = {r["backend"] for r in runs}
    workers = {r["worker"] for r in runs}
    print(
        f"celery {pool}/{release}: {len(runs)} tasks, {len(workers)} worker processes, {len(backends)} server sessions"
    )
    # Each worker process has one pool of at most max_size (4) connections, usually just 1-2.
    assert len(backends) <= 4 * len(workers), (len(backends), len(workers))
    assert len(backends) < 10, backends
    for state in result["states"]:
        assert state["in_use"] == 0, state
        assert state["counted_as"] == "catalog.tasks.pool_state", state
