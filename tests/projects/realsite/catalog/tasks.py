"""Celery tasks of the sample project (found by app.autodiscover_tasks())."""

import os
import time

from celery import shared_task
from django.db import connection

from .models import Product


@shared_task
def backend_pid():
    """Which server session ran this task, in which worker process and thread."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    return {"backend": pid, "worker": os.getpid(), "products": Product.objects.count()}


@shared_task
def pool_state():
    """Connections checked out of this process's pool as the task starts, before it queries:
    none, if every earlier task's connection went back when it ended."""
    pool = getattr(connection, "pool", None)
    # The previous task's result reaches the client before Celery's task_postrun, where its
    # connection goes back (Django's own fix-up closes there too): with the threads pool this
    # task may start in another thread within that gap. A leak stays; the gap ends in
    # milliseconds: so the count is read until it is 0, for at most 10 s.
    deadline = time.monotonic() + 10
    while True:
        stats = pool.get_stats() if pool is not None else {}
        if stats.get("pool_size", 0) == stats.get("pool_available", 0) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    Product.objects.exists()
    borrow = getattr(connection, "_borrow", None)  # (our ENGINE's record of this borrow)
    return {
        "worker": os.getpid(),
        "in_use": stats.get("pool_size", 0) - stats.get("pool_available", 0),
        # What the per-view statistics count this task's borrow under: the task's name.
        "counted_as": borrow.stats.name if borrow is not None else None,
    }
