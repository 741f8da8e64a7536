"""Settings of the project that tests/test_deployments.py serves the way docs/deployment.rst says:
under gunicorn with gevent workers, under Django Channels (daphne), and with a django-q2 cluster.
The environment picks:

* ``DEPLOY_DB``: the database; ``PGHOST``/``PGPORT``/``PGUSER``/``PGPASSWORD``: the server;
* ``DEPLOY_ENGINE``: ``ours`` (default) or ``stock`` (Django's own backend, no pool: the control);
* ``DEPLOY_POOL``: a JSON object of pool options, over ``{"min_size": 1, "max_size": 4, "timeout": 5}``;
* ``DEPLOY_WORKERS``, ``DEPLOY_RECYCLE``: django-q2's workers and tasks per worker process.
"""

import json
import os

SECRET_KEY = "deploysite-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
ENGINE = os.environ.get("DEPLOY_ENGINE", "ours")

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django_pooled_pg",
    "django_q",
    "jobs",
]
MIDDLEWARE = [
    "django_pooled_pg.middleware.PoolMiddleware",
]

if ENGINE == "ours":
    engine = "django_pooled_pg"
    options = {
        "pool": {"min_size": 1, "max_size": 4, "timeout": 5, **json.loads(os.environ.get("DEPLOY_POOL") or "{}")}
    }
else:
    engine = "django.db.backends.postgresql"
    options = {"application_name": "deploysite stock"}  # (the test counts its server sessions by it)

DATABASES = {
    "default": {
        "ENGINE": engine,
        "NAME": os.environ.get("DEPLOY_DB", "deploysite"),
        "USER": os.environ.get("PGUSER", ""),
        "PASSWORD": os.environ.get("PGPASSWORD", ""),
        "HOST": os.environ.get("PGHOST", ""),
        "PORT": os.environ.get("PGPORT", ""),
        "OPTIONS": options,
    }
}

# Pool statistics for `manage.py poolstats --json`, published often so that the test sees them soon.
POOLED_PG = {"STATS_INTERVAL": 0.3, "STALE_AFTER": 5.0, "PRUNE_AFTER": 30.0}

# django-q2 with its ORM broker: the queue is a table of this database.
Q_CLUSTER = {
    "name": "deploysite",
    "orm": "default",
    "workers": int(os.environ.get("DEPLOY_WORKERS", "2")),
    "recycle": int(os.environ.get("DEPLOY_RECYCLE", "500")),
    "timeout": 30,
    "retry": 60,
    "max_attempts": 1,
    "poll": 0.1,
    "bulk": 1,
    "catch_up": False,
    "save_limit": 0,
}

ROOT_URLCONF = "deploysite.urls"
WSGI_APPLICATION = "deploysite.wsgi.application"
ASGI_APPLICATION = "deploysite.asgi.application"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s pid=%(process)d: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"django_pooled_pg": {"handlers": ["console"], "level": "INFO", "propagate": False}},
}
