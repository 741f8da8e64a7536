"""django.contrib.postgres with pooled sessions (found by ``make django-suite``, postgres_tests).

Its ``connection_created`` receiver registers hstore/citext adapters on each connection, with type
OIDs it reads through ``connections[alias]`` and caches per alias until CREATE EXTENSION. Each
case runs in a fresh process, since what matters is the pool opening its first sessions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
from django.db import connections

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import os, sys
    import django
    from django.conf import settings

    settings.configure(
        INSTALLED_APPS=["django.contrib.postgres", "django_pooled_pg"],
        DATABASES={"default": {
            "ENGINE": "django_pooled_pg", "NAME": os.environ["DBNAME"],
            "USER": os.environ["PGUSER"],
            "HOST": os.environ["PGHOST"], "PORT": os.environ["PGPORT"],
            "OPTIONS": {"pool": {"min_size": 2, "max_size": 4, "timeout": 5}},
        }},
    )
    django.setup()
    from django.contrib.postgres.operations import HStoreExtension
    from django.db import connection
    from django.db.migrations.state import ProjectState

    # 1. The pool opens sessions with the receiver connected: it must not borrow from itself.
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    connection.close()
    # 2. CREATE EXTENSION hstore in this process (an in-process migrate, as in a test run).
    with connection.schema_editor() as editor:
        HStoreExtension().database_forwards("app", editor, ProjectState(), ProjectState())
    connection.close()
    # 3. Every pooled session, also those opened before the extension, adapts dicts to hstore.
    for _ in range(6):
        with connection.cursor() as cursor:
            cursor.execute("SELECT %s::hstore -> 'a'", [{"a": "b"}])
            assert cursor.fetchone() == ("b",)
        connection.close()
    print("ok")
""")


def test_hstore_with_pooled_sessions():
    sd = connections["default"].settings_dict
    dbname = "pooled_pg_contrib_postgres"
    admin = dict(host=sd["HOST"], port=sd["PORT"], user=sd["USER"], dbname="postgres", autocommit=True)
    with psycopg.connect(**admin) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{dbname}"')
    try:
        env = {
            **os.environ,
            "PGHOST": sd["HOST"],
            "PGPORT": str(sd["PORT"]),
            "PGUSER": sd["USER"],
            "DBNAME": dbname,
            "PYTHONPATH": str(ROOT),
        }
        env.pop("DJANGO_SETTINGS_MODULE", None)
        res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "ok"
    finally:
        with psycopg.connect(**admin) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
