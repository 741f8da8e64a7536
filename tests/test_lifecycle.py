"""Start-up queries, the test database, Django's parallel test runner, and shutdown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from django.db import connections

ROOT = Path(__file__).resolve().parent.parent
EARLY = ROOT / "tests" / "projects" / "earlyquery"


@pytest.fixture
def pg_env():
    """Environment naming the test server, for subprocesses."""
    sd = connections["default"].settings_dict
    env = {
        **os.environ,
        "PGHOST": sd["HOST"],
        "PGPORT": str(sd["PORT"]),
        "PGUSER": sd["USER"],
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(EARLY)]),
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return env


def admin(env, sql: str):
    with psycopg.connect(
        host=env["PGHOST"], port=env["PGPORT"], user=env["PGUSER"], dbname="postgres", autocommit=True
    ) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else None


def fresh_database(env, name: str) -> None:
    admin(env, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin(env, f'DROP DATABASE IF EXISTS "test_{name}" WITH (FORCE)')
    admin(env, f'CREATE DATABASE "{name}"')


def tables_in(env, name: str) -> list[str]:
    with psycopg.connect(
        host=env["PGHOST"], port=env["PGPORT"], user=env["PGUSER"], dbname=name, autocommit=True
    ) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return sorted(r[0] for r in rows)


def test_startup_query_does_not_send_the_test_run_to_the_real_database(pg_env):
    """A pool made in ready() points at the real database; tests must use the test database,
    in the parent and in every worker of --parallel 2, and leave the real database untouched."""
    fresh_database(pg_env, "early_real")
    env = {**pg_env, "EARLY_DB": "early_real"}
    run = subprocess.run(
        [sys.executable, "manage.py", "test", "--noinput", "--parallel", "2", "-v", "2"],
        cwd=EARLY,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "Ran 3 tests" in output and "OK" in output, output
    assert "Cloning test database" in output, "the run should have used parallel workers"
    assert tables_in(pg_env, "early_real") == [], "the test run migrated the real database"
    leftover = admin(pg_env, "SELECT datname FROM pg_database WHERE datname LIKE 'test_early_real%'")
    assert leftover == [], "test databases were not destroyed (a pool kept them open?)"


def test_pools_close_at_interpreter_exit(pg_env):
    fresh_database(pg_env, "exit_check")
    code = (
        """
import atexit, django
from django.conf import settings
settings.configure(DATABASES={"default": {
    "ENGINE": "django_pooled_pg", "NAME": "exit_check", "USER": "%(PGUSER)s",
    "HOST": "%(PGHOST)s", "PORT": "%(PGPORT)s", "OPTIONS": {"pool": {"min_size": 3, "max_size": 3}}}})
django.setup()
from django.db import connection
from django_pooled_pg.pooling.registry import registry
pool = connection.pool
pool.wait()
with connection.cursor() as cursor:
    cursor.execute("SELECT 1")
# Registered after the package's own handler, so it runs before it: reports the pool's state
# before and (via a handler registered first, below) after.
def report():
    print("CLOSED_AT_EXIT", pool.closed, flush=True)
import django_pooled_pg.pooling.registry as r
atexit.unregister(r.registry.close_all)
atexit.register(report)
atexit.register(r.registry.close_all)
"""
        % pg_env
    )
    run = subprocess.run([sys.executable, "-c", code], env=pg_env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "CLOSED_AT_EXIT True" in run.stdout, run.stdout + run.stderr
    assert run.stderr == "", run.stderr
