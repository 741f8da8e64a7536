"""The tests' WSGI application, served by gunicorn in tests/test_servers.py.

With ``PRELOAD_QUERY=1`` it queries while being imported, as an app preloaded by gunicorn's
master (``--preload``) does: the workers forked afterwards must not share that connection.
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()

if os.environ.get("PRELOAD_QUERY") == "1":
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
