"""Fork safety: a child never uses or closes the parent's connections and gets a pool of its own."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import threading

import pytest
from django.db import connection

from django_pooled_pg.base import _forget_inherited_connections
from django_pooled_pg.pooling.registry import registry
from tests.app.models import Item

pytestmark = pytest.mark.django_db(transaction=True)


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def run_in_child(work) -> dict:
    """Fork, run ``work()`` in the child, and return what it reported (a JSON dict)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(read_end)
            report = work()
        except BaseException as exc:  # report anything, never return into pytest
            report, code = {"error": repr(exc)}, 1
        with os.fdopen(write_end, "w") as out:
            json.dump(report, out)
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as inp:
        report = json.load(inp)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, report
    return report


def test_the_registry_runs_the_fork_hooks_once_the_generation_is_the_childs():
    """What drops the parent's borrows by their generation runs after the registry has moved
    to the child's generation, whatever order the modules were imported in (no database: a
    registry of its own, not the process's)."""
    from django_pooled_pg.pooling.registry import PoolRegistry

    own = PoolRegistry()
    seen = []
    own.forked.append(lambda: seen.append(own.generation))
    own.after_fork_in_child()
    assert seen == [1]
    assert _forget_inherited_connections in registry.forked  # the ENGINE's connection objects


def test_child_gets_its_own_pool_and_parent_keeps_working():
    Item.objects.create(name="before fork")
    parent_pid = backend_pid()  # borrowed, and still held across the fork
    parent_pool = registry.get("default")

    def child():
        inherited_dropped = connection.connection is None and registry.get("default") is None
        child_pid = backend_pid()
        own_pool = registry.get("default")
        count = Item.objects.count()
        connection.close()
        # What an exiting child does: close its pools, collect garbage (inherited objects too).
        registry.close_all()
        gc.collect()
        return {
            "inherited_dropped": inherited_dropped,
            "child_backend": child_pid,
            "new_pool": own_pool is not None and own_pool is not parent_pool,
            "count": count,
        }

    report = run_in_child(child)
    assert report["inherited_dropped"]
    assert report["new_pool"]
    assert report["child_backend"] != parent_pid
    assert report["count"] == 1
    # The parent's borrowed connection and its idle pooled connections still work.
    assert backend_pid() == parent_pid
    connection.close()
    seen = set()

    def borrow():
        seen.add(backend_pid())
        connection.close()

    threads = [threading.Thread(target=borrow) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen and Item.objects.count() == 1


def test_child_closing_inherited_connection_does_not_touch_parent():
    parent_pid = backend_pid()

    def child():
        # Code that closes "its" connection right after fork, like Django's test runner does.
        connection.close()
        registry.close_all()
        return {"ok": True}

    assert run_in_child(child)["ok"]
    assert backend_pid() == parent_pid


def _count_items(_: int) -> int:
    from django.db import connection as conn

    try:
        return Item.objects.count()
    finally:
        conn.close()


def test_multiprocessing_fork_pool():
    Item.objects.bulk_create([Item(name="a"), Item(name="b")])
    parent_pid = backend_pid()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as workers:
        assert workers.map(_count_items, range(6)) == [2] * 6
    assert backend_pid() == parent_pid
    assert Item.objects.count() == 2
