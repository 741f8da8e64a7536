"""Bad input (issue 8): every pool option given a wrong value or an unknown name is refused with
an error that names it; wrong password, unknown host and unknown database fail fast, say which,
and never show the password."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
import warnings

import psycopg
import pytest
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import override_settings

from django_pooled_pg.errors import DatabaseUnavailable
from django_pooled_pg.settings import OWN_OPTIONS, PSYCOPG_POOL_OPTIONS, read_pool_settings
from testsupport.waiting import wait_until

#: For every option: values it must refuse (wrong type, negative, out of range).
BAD_VALUES = {
    "min_size": ["2", -1, 1.5, True, None],
    "max_size": ["10", 0, -3, 2.5, "Auto"],
    "timeout": ["5", -1, 0, True],
    "max_waiting": ["0", -1, 0.5],
    "max_lifetime": ["1800", -1, 0],
    "max_idle": ["300", -5, 0],
    "reconnect_timeout": ["300", -1, 0],
    "num_workers": ["2", 0, 1.5],
    "name": [5, ""],
    "check": [5, "ping"],
    "configure": [5],
    "reset": ["DISCARD ALL"],
    "reconnect_failed": [1],
    "connection_class": ["psycopg.Connection", int],
    "release": ["statement", None, 1],
    "behind_pgbouncer": ["yes", 1, None],
    "session_reset": ["no", 0, None],
    "ping_after": [-1, "1", True],
    "leak_timeout": [0, -1, "30"],
    "fleet_max_size": [2, 0, "all", True, 7.5],
    "max_size_limit": [0, "8", 2.5, True],
}
UNKNOWN = ["max_sise", "pool_size", "TIMEOUT", "ping"]
CASES = [(key, value) for key, values in BAD_VALUES.items() for value in values]


def settings_dict(pool):
    return {
        "ENGINE": "django_pooled_pg",
        "NAME": "x",
        "USER": "",
        "PASSWORD": "",
        "HOST": "",
        "PORT": "",
        "OPTIONS": {"pool": pool},
        "CONN_MAX_AGE": 0,
    }


def test_every_option_has_bad_values_here():
    assert set(BAD_VALUES) == set(PSYCOPG_POOL_OPTIONS) | set(OWN_OPTIONS)


@pytest.mark.parametrize(("key", "value"), CASES, ids=[f"{k}={v!r}" for k, v in CASES])
def test_a_bad_value_is_refused_naming_the_option(key, value):
    with pytest.raises(ImproperlyConfigured) as info:
        read_pool_settings("default", settings_dict({key: value}))
    message = str(info.value)
    assert f'DATABASES["default"]["OPTIONS"]["pool"]["{key}"]: must be' in message, message
    assert "Fix:" in message
    with (
        warnings.catch_warnings(action="ignore", category=UserWarning),
        override_settings(DATABASES={"default": settings_dict({key: value})}),
    ):
        errors = [e for e in run_checks() if e.id.startswith("django_pooled_pg.")]
    assert any(f'["{key}"]' in e.msg for e in errors), errors


@pytest.mark.parametrize("key", UNKNOWN)
def test_an_unknown_option_is_refused_naming_it(key):
    with pytest.raises(ImproperlyConfigured, match=rf'\["{key}"\]: is not a pool option'):
        read_pool_settings("default", settings_dict({key: 1}))
    with (
        warnings.catch_warnings(action="ignore", category=UserWarning),
        override_settings(DATABASES={"default": settings_dict({key: 1})}),
    ):
        errors = [e for e in run_checks() if e.id == "django_pooled_pg.E004"]
    assert errors and f'["{key}"]' in errors[0].msg


# ----- Connection errors -------------------------------------------------------------------------

SECRET = f"Wr0ng-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def password_auth(server):
    """A role that must give a password (the cluster trusts everyone else)."""
    hba = server.datadir / "pg_hba.conf"
    saved = hba.read_text()
    server.execute("DROP ROLE IF EXISTS dpp_pw_user")
    server.execute("CREATE ROLE dpp_pw_user LOGIN SUPERUSER PASSWORD 'the-right-one'")
    hba.write_text("host all dpp_pw_user 127.0.0.1/32 scram-sha-256\n" + saved)
    server.execute("SELECT pg_reload_conf()")

    def refused() -> bool:  # the reload is asynchronous
        try:
            psycopg.connect(server.url().replace("postgres@", "dpp_pw_user@"), connect_timeout=3).close()
        except psycopg.OperationalError:
            return True
        return False

    wait_until(refused, message="the server to ask dpp_pw_user for a password")
    yield "dpp_pw_user"
    hba.write_text(saved)
    server.execute("SELECT pg_reload_conf()")
    server.execute("DROP ROLE IF EXISTS dpp_pw_user")


def fail_and_collect(caplog) -> tuple[DatabaseUnavailable, float, str]:
    """Borrow directly, then through a request: the error, how long the borrow took, and every
    text a user or operator would see (messages, causes, log lines, the 503 body)."""
    with caplog.at_level(logging.DEBUG):
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable) as info:
            connection.ensure_connection()
        elapsed = time.monotonic() - started
        response = Client(raise_request_exception=False).get("/query/")
    assert response.status_code == 503
    texts = [str(info.value), repr(info.value), response.content.decode(), caplog.text]
    cause = info.value.__cause__
    while cause is not None:
        texts += [str(cause), repr(cause)]
        cause = cause.__cause__
    return info.value, elapsed, "\n".join(texts)


pytestmark_db = pytest.mark.django_db(transaction=True)


@pytestmark_db
def test_wrong_password(default_settings, password_auth, caplog):
    # (timeout 20 s: the borrow fails fast, well within it, even on a loaded machine)
    default_settings(USER=password_auth, PASSWORD=SECRET, pool={"min_size": 1, "max_size": 2, "timeout": 20})
    error, elapsed, seen = fail_and_collect(caplog)
    assert "password authentication failed" in str(error), error
    assert elapsed < 10, elapsed
    assert SECRET not in seen
    # poolstats reads the statistics database, which is this one: it fails, and says so without
    # the password.
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(SystemExit) as exit_status:  # a script must see that it failed
        call_command("poolstats", "--json", stdout=out, stderr=err)
    assert exit_status.value.code == 2
    assert SECRET not in out.getvalue() + err.getvalue()
    assert "password authentication failed" in err.getvalue()
    assert json.loads(out.getvalue())["errors"]


@pytestmark_db
def test_unknown_database(default_settings, caplog):
    default_settings(NAME="dpp_no_such_db", PASSWORD=SECRET, pool={"min_size": 1, "max_size": 2, "timeout": 20})
    error, elapsed, seen = fail_and_collect(caplog)
    assert 'database "dpp_no_such_db" does not exist' in str(error), error
    assert elapsed < 10, elapsed
    assert SECRET not in seen


@pytestmark_db
def test_unknown_host(default_settings, caplog):
    default_settings(
        HOST="dpp-no-such-host.invalid",
        PASSWORD=SECRET,
        options={"connect_timeout": 2},
        pool={"min_size": 1, "max_size": 2, "timeout": 20},
    )
    error, elapsed, seen = fail_and_collect(caplog)
    assert "dpp-no-such-host.invalid" in str(error), error
    assert elapsed < 10, elapsed
    assert SECRET not in seen
