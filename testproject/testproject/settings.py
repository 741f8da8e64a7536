"""Settings of the demo site: the shop app on the django_pooled_pg ENGINE.

Environment:

* ``DATABASE_URL``: ``postgresql://USER:PASSWORD@HOST:PORT/NAME[?option=value...]``; query
  options (``sslmode=require`` ...) go to the connection's OPTIONS. ``testproject/demo.py`` sets
  it to the cluster it starts.
* ``DEBUG``: ``1``/``true``/``yes``/``on`` to turn debug on (off by default).
* ``DJANGO_SECRET_KEY``: the secret key (a fixed, insecure one by default: this is a demo).
* ``POOLED_PG_POOL``: a JSON object merged into ``OPTIONS["pool"]`` (for tests: e.g.
  ``{"max_size": 4, "fleet_max_size": 8, "release": "transaction"}``); unset, the demo's own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-demo-only-not-for-production")
DEBUG = os.environ.get("DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]


def pool_from_env() -> dict:
    """``POOLED_PG_POOL``'s JSON object, or {} when it is unset or empty."""
    raw = os.environ.get("POOLED_PG_POOL", "").strip()
    if not raw:
        return {}
    pool = json.loads(raw)
    if not isinstance(pool, dict):
        raise ValueError(f"POOLED_PG_POOL must hold a JSON object of pool options, not {raw!r}")
    return pool


def database_from_url(url: str) -> dict:
    """A DATABASES entry (ENGINE django_pooled_pg) for a ``postgresql://`` URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql", "pgsql"):
        raise ValueError(f"DATABASE_URL must start with postgresql://, not {parts.scheme}://")
    options: dict = dict(parse_qsl(parts.query))
    options["pool"] = {"min_size": 2, "max_size": 4, "timeout": 5, **pool_from_env()}
    return {
        "ENGINE": "django_pooled_pg",
        "NAME": unquote(parts.path.lstrip("/")) or "shop",
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "OPTIONS": options,
    }


DATABASES = {
    "default": database_from_url(os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/shop")),
}

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_pooled_pg",
    "shop",
]

MIDDLEWARE = [
    "django_pooled_pg.middleware.PoolMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# Pool statistics (manage.py poolstats). The environment overrides them for tests.
POOLED_PG = {
    "STATS_INTERVAL": float(os.environ.get("POOLED_PG_STATS_INTERVAL", "5")),
    "STALE_AFTER": float(os.environ["POOLED_PG_STALE_AFTER"]) if "POOLED_PG_STALE_AFTER" in os.environ else None,
    "PRUNE_AFTER": float(os.environ.get("POOLED_PG_PRUNE_AFTER", "300")),
    # The readiness view (/ready/): how often each process probes the server.
    "HEALTH_PROBE_INTERVAL": float(os.environ.get("POOLED_PG_HEALTH_PROBE_INTERVAL", "2")),
}

ROOT_URLCONF = "testproject.urls"
WSGI_APPLICATION = "testproject.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

AUTH_PASSWORD_VALIDATORS = []  # a demo: the admin password is generated anyway

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "[{asctime}] {levelname} {name} pid={process}: {message}", "style": "{"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "loggers": {
        "django_pooled_pg": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
