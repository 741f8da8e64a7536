"""gunicorn's config file (``-c``) for gevent workers with ``--preload``: gunicorn reads it before
the master imports the application, so everything is imported patched (Django's connections are
per greenlet, psycopg picks a wait function that yields)."""

from gevent import monkey

monkey.patch_all()
