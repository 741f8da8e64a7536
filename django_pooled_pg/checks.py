"""System checks: the pool settings of every alias using this ENGINE, at ``manage.py check``
(with ``django_pooled_pg`` in ``INSTALLED_APPS``: Django runs the checks of installed apps).

They read ``settings.DATABASES`` only and never connect, so they also run where the database is
unreachable (a CI build step, a container image build).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register

from .settings import find_problems, find_stats_problems, pooled_aliases

MIDDLEWARE = "django_pooled_pg.middleware.PoolMiddleware"

logger = logging.getLogger("django_pooled_pg")


@register()
def check_pool_settings(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    errors: list[Error] = []
    aliases = pooled_aliases()
    if aliases and importlib.util.find_spec("psycopg") is None:
        errors.append(
            Error(
                "django_pooled_pg needs psycopg 3, which is not installed.",
                hint="pip install 'psycopg[binary]' psycopg-pool",
                id="django_pooled_pg.E007",
            )
        )
    for alias, settings_dict in aliases.items():
        for problem in find_problems(alias, settings_dict):
            errors.append(Error(f"{problem.setting} {problem.message}", hint=problem.fix, id=problem.id))
    return errors


@register()
def check_stats_settings(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """``settings.POOLED_PG``: how often and where pool statistics are published."""
    if not pooled_aliases() and getattr(settings, "POOLED_PG", None) is None:
        return []
    return [
        Error(f"{p.setting} {p.message}", hint=p.fix, id=p.id)
        for p in find_stats_problems(getattr(settings, "POOLED_PG", None), settings.DATABASES)
    ]


@register()
def check_middleware(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The middleware gives connections back and turns pool errors into 503s; it must run
    around everything else, so that no other middleware queries after it has given back."""
    middleware = list(getattr(settings, "MIDDLEWARE", None) or [])
    if not pooled_aliases() or not middleware:
        return []
    if MIDDLEWARE not in middleware:
        return [
            Warning(
                f"{MIDDLEWARE} is not in MIDDLEWARE: connections are given back only by Django's "
                "end-of-request handler, and pool exhaustion shows as HTTP 500.",
                hint=f'Put "{MIDDLEWARE}" first in MIDDLEWARE.',
                id="django_pooled_pg.W001",
            )
        ]
    if middleware[0] != MIDDLEWARE:
        return [
            Warning(
                f"{MIDDLEWARE} is not the first entry of MIDDLEWARE: middleware listed before it "
                f"({middleware[0]}) runs after the connection was given back and borrows again.",
                hint=f'Move "{MIDDLEWARE}" to the top of MIDDLEWARE.',
                id="django_pooled_pg.W002",
            )
        ]
    return []


def log_middleware_warnings() -> None:
    """W001/W002 at start-up, once per process: servers (gunicorn, uvicorn, a Celery worker) run
    no system checks, so without this a misplaced middleware is seen only by ``manage.py check``."""
    for message in check_middleware():
        logger.warning("%s %s (%s)", message.msg, message.hint, message.id)
