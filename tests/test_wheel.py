"""What a user installs: the sdist and the wheel, and a new Django project that follows the docs.

The wheel comes from ``DJANGO_POOLED_PG_DIST`` (the directory ``make test`` builds with
``python -m build``: the sdist, then the wheel from the sdist), else it is built here from the
checkout. The project is ``django-admin startproject`` in a brand-new venv outside the checkout
with nothing but the wheel and gunicorn installed, its settings and URLs changed by appending
``docs/examples/settings_snippet.py`` and ``docs/examples/urls_snippet.py``, the files the
Getting started page shows. Nothing of the checkout is on that project's path.

These tests are marked ``wheel``: ``make test`` runs them once, in its run against the installed
wheel.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests import dbserver
from tests.servers import children
from testsupport.ports import free_port
from testsupport.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.wheel]

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "examples"
DIST_ENV = "DJANGO_POOLED_PG_DIST"
PASSWORD = "a-long-test-password-1"


def run(*command: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, (
        f"{' '.join(map(str, command))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """A directory with one sdist and one wheel of this version."""
    given = os.environ.get(DIST_ENV)
    if given:
        return Path(given)
    if not (ROOT / "pyproject.toml").is_file():
        pytest.fail(f"no checkout to build from at {ROOT}: set {DIST_ENV} to the directory of a built wheel")
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, ROOT, cwd=ROOT)  # the sdist, then the wheel from it
    return out


def one(dist: Path, pattern: str) -> Path:
    [found] = dist.glob(pattern)
    return found


def package_files(names: list[str]) -> set[str]:
    """The files of the package (``django_pooled_pg/...``) among archive member names."""
    found = set()
    for name in names:
        if "/django_pooled_pg/" in f"/{name}" and "__pycache__" not in name and not name.endswith("/"):
            found.add(name[name.index("django_pooled_pg/") :])
    return found


def test_the_wheel_holds_the_whole_package(dist):
    with zipfile.ZipFile(one(dist, "*.whl")) as wheel:
        in_wheel = package_files(wheel.namelist())
    with tarfile.open(one(dist, "*.tar.gz")) as sdist:
        in_sdist = package_files([m.name for m in sdist.getmembers() if m.isfile()])
    # Every module and data file of the sdist, among them the two subpackages a hand-kept
    # list once left out, the templates and static files of the admin page, and py.typed.
    assert in_sdist - in_wheel == set()
    for needed in (
        "django_pooled_pg/pooling/pool.py",
        "django_pooled_pg/telemetry/fleet.py",
        "django_pooled_pg/templates/admin/django_pooled_pg/status.html",
        "django_pooled_pg/static/django_pooled_pg/status.js",
        "django_pooled_pg/static/django_pooled_pg/status.css",
        "django_pooled_pg/migrations/0001_initial.py",
        "django_pooled_pg/py.typed",
    ):
        assert needed in in_wheel, needed
    # And the sdist holds every file of the package in the checkout (when there is one).
    source = ROOT / "django_pooled_pg"
    if source.is_dir():
        tracked = run("git", "ls-files", "django_pooled_pg", cwd=ROOT).split()
        assert set(tracked) - in_sdist == set()


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Path:
    """A new venv with the wheel and gunicorn, and nothing of the checkout."""
    where = tmp_path_factory.mktemp("uservenv") / "venv"
    run(sys.executable, "-m", "venv", where)
    python = where / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", one(dist, "*.whl"), "gunicorn", timeout=900)
    return where


@pytest.fixture
def database():
    """A new database on the test server; its connection settings as libpq variables."""
    name = f"dpp_newsite_{os.getpid()}"
    settings = dbserver.database_settings(name)
    admin = {"host": settings["HOST"], "port": settings["PORT"], "user": settings["USER"]}
    if settings["PASSWORD"]:
        admin["password"] = settings["PASSWORD"]
    with psycopg.connect(dbname="postgres", autocommit=True, **admin) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield {
        "PGDATABASE": name,
        "PGUSER": settings["USER"],
        "PGPASSWORD": settings["PASSWORD"],
        "PGHOST": settings["HOST"],
        "PGPORT": str(settings["PORT"]),
    }
    with psycopg.connect(dbname="postgres", autocommit=True, **admin) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def new_project(venv: Path, where: Path, env: dict[str, str]) -> Path:
    """``django-admin startproject mysite``, changed as the Getting started page says."""
    run(venv / "bin" / "django-admin", "startproject", "mysite", where, env=env)
    settings = where / "mysite" / "settings.py"
    settings.write_text(
        settings.read_text()
        + "\n"
        + (DOCS / "settings_snippet.py").read_text()
        # The project's own: where collectstatic puts the files a web server serves.
        + '\nSTATIC_ROOT = BASE_DIR / "staticfiles"\n'
    )
    urls = where / "mysite" / "urls.py"
    urls.write_text(
        urls.read_text()
        + "\n"
        + (DOCS / "urls_snippet.py").read_text()
        # The project's own page that queries the database.
        + "\nfrom django.contrib.auth.models import User\n"
        + "from django.http import HttpResponse\n\n"
        + 'urlpatterns += [path("users/", lambda request: HttpResponse(f"users: {User.objects.count()}"))]\n'
    )
    return where


def test_a_new_project_that_follows_the_docs(venv, database, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH", "DATABASE_URL")}
    env.update(database, DJANGO_SUPERUSER_PASSWORD=PASSWORD, PYTHONDONTWRITEBYTECODE="1")
    python = venv / "bin" / "python"
    # The package the project imports is the wheel's, in the new venv.
    where = run(python, "-c", "import django_pooled_pg; print(django_pooled_pg.__file__)", cwd=tmp_path, env=env)
    assert where.startswith(str(venv)) and "site-packages" in where, where

    site = new_project(venv, tmp_path / "site", env)
    manage = [python, site / "manage.py"]
    run(*manage, "check", cwd=site, env=env)
    run(*manage, "migrate", "--noinput", cwd=site, env=env)
    run(
        *manage,
        "createsuperuser",
        "--noinput",
        "--username",
        "admin",
        "--email",
        "admin@example.com",
        cwd=site,
        env=env,
    )
    run(*manage, "collectstatic", "--noinput", cwd=site, env=env)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    gunicorn = subprocess.Popen(
        [venv / "bin" / "gunicorn", "mysite.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", "2", "--threads", "4"],
        cwd=site,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

        def fetch(path: str, data: dict[str, str] | None = None) -> tuple[int, str]:
            body = urllib.parse.urlencode(data).encode() if data is not None else None
            request = urllib.request.Request(base + path, data=body, headers={"Referer": base + path})
            try:
                with opener.open(request, timeout=15) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as error:
                return error.code, error.read().decode()
            except OSError:
                return 0, ""

        # A page that queries, served by gunicorn through the pool.
        assert wait_until(lambda: fetch("/users/") == (200, "users: 1"), timeout=60, message="/users/ to answer")
        assert fetch("/ready/")[0] == 200

        # poolstats --json lists the workers that served it (each publishes every 5 s).
        workers = children(gunicorn.pid)

        def published() -> set[int]:
            data = json.loads(run(*manage, "poolstats", "--json", cwd=site, env=env))
            return {p["pid"] for p in data["aliases"]["default"]["processes"] if not p["stale"]} & workers

        assert wait_until(published, timeout=60, interval=1, message="poolstats --json to list a gunicorn worker")

        # The admin status page, with the static files collectstatic gathered.
        status, page = fetch("/admin/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
        status, page = fetch(
            "/admin/login/?next=/admin/",
            {"csrfmiddlewaretoken": token, "username": "admin", "password": PASSWORD, "next": "/admin/"},
        )
        assert status == 200 and "Connection pools" in page, page[-2000:]
        status, page = fetch("/admin/django_pooled_pg/poolsnapshot/")
        assert status == 200, page[-2000:]
        for asset in ("django_pooled_pg/status.css", "django_pooled_pg/status.js"):
            assert f"/static/{asset}" in page
            assert (site / "staticfiles" / asset).is_file(), asset
        status, body = fetch("/admin/django_pooled_pg/poolsnapshot/status.json")
        assert status == 200 and json.loads(body), body[:500]
    finally:
        gunicorn.terminate()
        output = gunicorn.communicate(timeout=30)[0]
        print(output[-5000:])
