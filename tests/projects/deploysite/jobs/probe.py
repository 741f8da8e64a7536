"""What a view, a consumer or a task reports about the connection it queried on."""

import os
import threading
import time

from django.db import connections

from .models import Item


def probe(hold: float = 0.0) -> dict:
    """Query (holding the connection ``hold`` seconds in the server: ``pg_sleep``) and say on
    which process, thread and server session; ``held_before``: whether this thread still held a
    connection when it began (nothing gave back the last one)."""
    wrapper = connections["default"]
    held_before = wrapper.connection is not None
    with wrapper.cursor() as cursor:
        started = time.time()
        cursor.execute("SELECT pg_backend_pid(), current_setting('application_name'), pg_sleep(%s)", [hold])
        backend, application_name, _ = cursor.fetchone()
        ended = time.time()
    items = Item.objects.count()
    return {
        "pid": os.getpid(),
        "thread": threading.get_ident(),
        "backend": backend,
        "application_name": application_name,
        "held_before": held_before,
        "items": items,
        # When this process's query began and ended (wall clock): the test finds overlaps.
        "started": started,
        "ended": ended,
    }


def probe_holding(hold: float = 0.0) -> dict:
    """:func:`probe` after setting session state: the thread keeps its connection until
    ``connection.close()``, even outside a request."""
    with connections["default"].cursor() as cursor:
        cursor.execute("SET deploysite.probe = 'on'")
    return probe(hold)
