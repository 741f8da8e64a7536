"""django-q2 tasks (enqueued by ``manage.py enqueue_jobs``)."""

import os

from django.db import connections

from django_pooled_pg import borrow

from .models import Run
from .probe import probe


def report(n: int, kind: str, hold: float = 0.0) -> int:
    """Record which worker process, server session and pool ran task ``n``. ``kind``:
    ``plain`` (the body as it is) or ``borrow`` (wrapped in ``borrow()``, as the docs advise);
    ``hold``: seconds the task holds its connection in the server. ``held_before``: whether the
    worker still held a connection as the task began."""
    wrapper = connections["default"]
    held_before = wrapper.connection is not None
    if kind == "borrow":
        with borrow(name="jobs.tasks.report"):
            return _record(n, kind, hold, wrapper, held_before)
    return _record(n, kind, hold, wrapper, held_before)


def _record(n, kind, hold, wrapper, held_before):
    result = probe(hold)
    pool = wrapper.pool
    Run.objects.create(
        n=n,
        kind=kind,
        worker=os.getpid(),
        backend=result["backend"],
        application_name=result["application_name"],
        pool_name=getattr(pool, "name", "") or "",
        held_before=held_before,
    )
    return n
