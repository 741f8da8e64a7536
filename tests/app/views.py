"""Views the middleware tests request: each exercises one way a request can hold a connection."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from django.db import connection, transaction
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse

from django_pooled_pg.pooling.ledger import ledger

from .models import Account, Item


def no_db(request):
    return HttpResponse("no database here")


def query(request):
    return JsonResponse({"count": Item.objects.count()})


def slow(request):
    Item.objects.count()  # borrow, then hold the connection while "calling another service"
    time.sleep(float(request.GET.get("s", "1")))
    return JsonResponse({"ok": True})


def stream(request):
    def rows():
        for i in range(3):
            yield f"{i},{Item.objects.count()}\n"

    return StreamingHttpResponse(rows(), content_type="text/csv")


async def async_view(request):
    count = await Item.objects.acount()
    await Item.objects.acreate(name="from async")
    return JsonResponse({"count": count})


def left_open(request):
    connection.set_autocommit(False)
    Item.objects.create(name="never committed")
    return HttpResponse("left a transaction open")


def atomic_left_open(request):
    transaction.atomic().__enter__()  # entered, never exited: a bug in the view
    Item.objects.create(name="never committed either")
    return HttpResponse("left an atomic block open")


def fails(request):
    Item.objects.count()
    raise ValueError("the view failed")


def executor(request):
    """Queries in worker threads that end without closing their connections."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        counts = list(pool.map(lambda _: Item.objects.count(), range(3)))
    return JsonResponse({"counts": counts})


def executor_holding(request):
    """Queries in worker threads that set session state (so hold their connections on purpose)
    and end without closing them."""

    def count(_: int) -> int:
        with connection.cursor() as cursor:
            cursor.execute("SET pooled_pg_tests.held = 'on'")
        return Item.objects.count()

    with ThreadPoolExecutor(max_workers=3) as pool:
        counts = list(pool.map(count, range(3)))
    return JsonResponse({"counts": counts})


def pool_state(request):
    """What this process's ledger holds right now (for tests against a server process)."""
    in_use = [
        {"alias": b.alias, "thread": b.thread.name, "view": b.view}
        for b in list(ledger.borrows.values())
        if not b.parked or not b.thread.is_alive()  # (a living thread's kept one is free to take)
    ]
    counters = {alias: stats.counters() for alias, stats in ledger.stats.items()}
    return JsonResponse(
        {
            "in_use": in_use,
            "counters": counters,
            "threads": threading.active_count(),
            "pid": os.getpid(),
        }
    )


def query_wait_query(request):
    """A query, a wait on "another service", another query: what release="transaction" is for."""
    first = Item.objects.count()
    time.sleep(float(request.GET.get("s", "0.3")))
    return JsonResponse({"first": first, "second": Item.objects.count()})


def transfer(request):
    """Move ``amount`` from one Account to another in one transaction (the soak test)."""
    source, target, amount = (int(request.GET[k]) for k in ("from", "to", "amount"))
    with transaction.atomic():
        accounts = {a.pk: a for a in Account.objects.select_for_update().filter(pk__in=[source, target]).order_by("pk")}
        accounts[source].balance -= amount
        accounts[target].balance += amount
        for account in accounts.values():
            account.save(update_fields=["balance"])
    return JsonResponse({"ok": True})


class _RolledBack(Exception):
    pass


def order(request):
    """Create an Item named ``name`` in a transaction; with ``rollback=1`` the transaction is
    rolled back after the insert (the soak test checks it never exists)."""
    try:
        with transaction.atomic():
            Item.objects.create(name=request.GET["name"], value=1)
            if request.GET.get("rollback") == "1":
                raise _RolledBack
    except _RolledBack:
        return JsonResponse({"rolled_back": True})
    return JsonResponse({"created": True})


# ----- Sessions the server ends mid-request (tests/test_lost_sessions.py) -------------------------


def idle_in_transaction(request):
    """A transaction that waits longer than idle_in_transaction_session_timeout: the server ends
    the session, and the next statement fails with InternalError (SQLSTATE 25P03)."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL idle_in_transaction_session_timeout = '100ms'")
        Item.objects.count()
        time.sleep(0.5)
        Item.objects.count()
    return JsonResponse({"ok": True})


def timeout_then_lost(request):
    """A statement cancelled by statement_timeout (the session lives on), then the session dies."""
    from django.db import OperationalError

    with connection.cursor() as cursor:
        cursor.execute("SET statement_timeout = '100ms'")
        try:
            cursor.execute("SELECT pg_sleep(1)")
        except OperationalError:
            pass  # QueryCanceled: the view carries on
        cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    return JsonResponse({"ok": True})


def sleep_query(request):
    """One statement that runs ?s= seconds on the server."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [float(request.GET.get("s", "1"))])
    return JsonResponse({"ok": True})
