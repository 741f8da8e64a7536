"""Settings for ``bench/run.py``: the demo site's settings with DATABASES from the environment.

``BENCH_DATABASE`` holds the JSON of ``DATABASES["default"]`` for the mode under test (ENGINE,
CONN_MAX_AGE, OPTIONS...). ``BENCH_LOG_ERRORS=1`` logs the errors behind 500s (``django.request``)
to the console, so that the autoscaling scenario can count what the server refused. ``PoolMiddleware`` stays first in MIDDLEWARE only for this package's
ENGINE, so the stock modes run the stock middleware stack. Needs ``testproject/`` on sys.path
(gunicorn's ``--chdir testproject`` does it) and ``bench/`` for this module.
"""

from __future__ import annotations

import json
import os

from testproject.settings import *  # noqa: F403
from testproject.settings import INSTALLED_APPS, LOGGING, MIDDLEWARE

DEBUG = False
DATABASES = {"default": json.loads(os.environ["BENCH_DATABASE"])}

_OURS = DATABASES["default"]["ENGINE"] == "django_pooled_pg"
POOL_MIDDLEWARE = "django_pooled_pg.middleware.PoolMiddleware"
if not _OURS:
    MIDDLEWARE = [m for m in MIDDLEWARE if m != POOL_MIDDLEWARE]
    if not os.environ.get("BENCH_KEEP_APP"):  # set to migrate its tables with a stock ENGINE
        INSTALLED_APPS = [a for a in INSTALLED_APPS if a != "django_pooled_pg"]

if os.environ.get("BENCH_LOG_ERRORS"):
    LOGGING = {
        **LOGGING,
        "loggers": {
            **LOGGING["loggers"],
            "django.request": {"handlers": ["console"], "level": "ERROR", "propagate": False},
        },
    }
