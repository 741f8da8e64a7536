"""Bad pool settings: a clear ImproperlyConfigured at first use and an error at manage.py check."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.test.utils import override_settings

from django_pooled_pg.settings import DEFAULTS, read_pool_settings

ROOT = Path(__file__).resolve().parent.parent


def ignore_warnings():
    """override_settings(DATABASES=...) warns; the checks read settings.DATABASES, so it is right here."""
    return warnings.catch_warnings(action="ignore", category=UserWarning)


BAD = {
    "unknown key": ({"pool": {"max_sise": 5}}, {}, 'did you mean "max_size"'),
    "wrong type": ({"pool": {"max_size": "ten"}}, {}, '["max_size"]: must be an integer >= 1'),
    "negative": ({"pool": {"timeout": -1}}, {}, '["timeout"]: must be a number greater than 0'),
    "bool for int": ({"pool": {"min_size": True}}, {}, '["min_size"]: must be an integer >= 0'),
    "min above max": ({"pool": {"min_size": 5, "max_size": 2}}, {}, "larger than max_size 2"),
    "max below the default min": ({"pool": {"max_size": 1}}, {}, 'add "min_size": 1 (or 0)'),
    "not a dict": ({"pool": "yes"}, {}, "must be True, False or a dict"),
    "managed key": ({"pool": {"kwargs": {}}}, {}, "is set by django_pooled_pg itself"),
    "bad release": ({"pool": {"release": "statement"}}, {}, '["release"]: must be'),
    "session_reset not a bool": ({"pool": {"session_reset": "off"}}, {}, '["session_reset"]: must be True or False'),
    "auto without a ceiling": ({"pool": {"max_size": "auto"}}, {}, 'is "auto" with no ceiling'),
    "a limit without auto": ({"pool": {"max_size_limit": 8}}, {}, 'is the ceiling of max_size "auto"'),
    "min above the auto limit": (
        {"pool": {"min_size": 5, "max_size": "auto", "max_size_limit": 3}},
        {},
        "larger than max_size_limit 3",
    ),
    "limit not an integer": (
        {"pool": {"max_size": "auto", "max_size_limit": "8"}},
        {},
        '["max_size_limit"]: must be an integer >= 1',
    ),
    "persistent connections": ({}, {"CONN_MAX_AGE": 60}, '["CONN_MAX_AGE"]: is 60'),
    "persistent forever": ({}, {"CONN_MAX_AGE": None}, '["CONN_MAX_AGE"]: is None'),
}


def settings_dict(options, extra):
    return {
        "ENGINE": "django_pooled_pg",
        "NAME": "x",
        "USER": "",
        "PASSWORD": "",
        "HOST": "",
        "PORT": "",
        "OPTIONS": options,
        "CONN_MAX_AGE": 0,
        **extra,
    }


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_settings_raise_improperly_configured(case):
    options, extra, words = BAD[case]
    with pytest.raises(ImproperlyConfigured) as info:
        read_pool_settings("default", settings_dict(options, extra))
    assert words in str(info.value)
    assert 'DATABASES["default"]' in str(info.value) and "Fix:" in str(info.value)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_settings_fail_manage_py_check(case):
    options, extra, words = BAD[case]
    with ignore_warnings(), override_settings(DATABASES={"default": settings_dict(options, extra)}):
        errors = [e for e in run_checks() if e.id.startswith("django_pooled_pg.")]
    assert errors, "manage.py check should report the bad setting"
    assert any(words.split(": ")[-1] in f"{e.msg} {e.hint}" for e in errors)


def test_the_django_prometheus_engine_is_checked_like_ours():
    """``contrib.django_prometheus`` is this ENGINE too: its aliases' settings are checked."""
    bad = {**settings_dict({"pool": {"max_sise": 5}}, {}), "ENGINE": "django_pooled_pg.contrib.django_prometheus"}
    with ignore_warnings(), override_settings(DATABASES={"default": bad}):
        errors = [e for e in run_checks() if e.id.startswith("django_pooled_pg.")]
    assert errors and 'did you mean "max_size"' in errors[0].msg + (errors[0].hint or "")


def test_good_settings_pass_check_and_fill_defaults():
    with ignore_warnings(), override_settings(DATABASES={"default": settings_dict({"pool": {"max_size": 3}}, {})}):
        assert not [e for e in run_checks() if e.id.startswith("django_pooled_pg.")]
    parsed = read_pool_settings("default", settings_dict({}, {}))
    assert parsed.enabled and parsed.pool_kwargs["max_size"] == DEFAULTS["max_size"]
    assert read_pool_settings("default", settings_dict({"pool": True}, {})).pool_kwargs == parsed.pool_kwargs
    # As with Django's pool (psycopg_pool's rule), max_size follows a lone min_size.
    assert read_pool_settings("default", settings_dict({"pool": {"min_size": 4}}, {})).pool_kwargs["max_size"] == 4
    assert not read_pool_settings("default", settings_dict({"pool": False}, {})).enabled
    # max_size "auto" starts at min_size (at least 1), with its ceiling.
    auto = read_pool_settings("default", settings_dict({"pool": {"max_size": "auto", "max_size_limit": 8}}, {}))
    assert auto.auto_size and auto.max_size_limit == 8 and auto.pool_kwargs["max_size"] == DEFAULTS["min_size"]
    auto = read_pool_settings(
        "default", settings_dict({"pool": {"min_size": 0, "max_size": "auto", "fleet_max_size": 20}}, {})
    )
    assert auto.auto_size and auto.max_size_limit is None and auto.pool_kwargs["max_size"] == 1
    assert not read_pool_settings("default", settings_dict({}, {})).auto_size


@pytest.mark.django_db(transaction=True)
def test_bad_settings_stop_the_first_query():
    wrapper = connections["default"]
    saved = wrapper.settings_dict["OPTIONS"]
    wrapper.close()
    wrapper.settings_dict["OPTIONS"] = {**saved, "pool": {"max_size": 0}}
    try:
        with pytest.raises(ImproperlyConfigured, match=r'\["max_size"\]: must be an integer >= 1'):
            wrapper.ensure_connection()
    finally:
        wrapper.settings_dict["OPTIONS"] = saved


def test_psycopg2_only_gives_a_clear_error():
    """With psycopg 3 unimportable, loading the ENGINE says what to install."""
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "import django; from django.conf import settings\n"
        "settings.configure(DATABASES={'default': {'ENGINE': 'django_pooled_pg', 'NAME': 'x'}})\n"
        "django.setup()\n"
        "from django.db import connection\n"
        "try:\n"
        "    connection.vendor\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert "ImproperlyConfigured" in out.stdout, out.stderr
    assert "django_pooled_pg needs psycopg 3" in out.stdout
    assert "pip install 'psycopg[binary]'" in out.stdout
