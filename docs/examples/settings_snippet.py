# ruff: noqa: F821 (appended to the end of a settings.py that defines DATABASES, INSTALLED_APPS, MIDDLEWARE)
# --- django-pooled-pg: add to the end of settings.py ---
import os

DATABASES["default"] = {
    "ENGINE": "django_pooled_pg",  # was: "django.db.backends.postgresql"
    "NAME": os.environ.get("PGDATABASE", "mysite"),
    "USER": os.environ.get("PGUSER", "mysite"),
    "PASSWORD": os.environ.get("PGPASSWORD", ""),
    "HOST": os.environ.get("PGHOST", "127.0.0.1"),
    "PORT": os.environ.get("PGPORT", "5432"),
    "OPTIONS": {
        "pool": {"min_size": 2, "max_size": 10, "timeout": 5},
    },
}

# The app runs the system checks of the pool settings and provides the admin status page,
# `manage.py poolstats` and the statistics tables (`manage.py migrate`).
INSTALLED_APPS += ["django_pooled_pg"]

# First, so that it runs around every other middleware: it gives each request's connections
# back and answers 503 when the pool cannot serve.
MIDDLEWARE.insert(0, "django_pooled_pg.middleware.PoolMiddleware")
