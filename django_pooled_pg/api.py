"""Borrowing outside requests: management commands, task workers, scripts, long-lived threads.

Inside a request the middleware gives connections back. Elsewhere a connection goes back after
each statement, as with ``release="transaction"``, unless something keeps it (a ``SET``,
:func:`pinned`); code that runs outside requests and wants one connection for a unit of work
borrows explicitly::

    from django_pooled_pg import borrow

    with borrow():                      # or borrow("replica")
        Order.objects.filter(...).update(...)
    # the connection is back in the pool here, rolled back if a transaction was left open

or calls :func:`release_connections` at the end of each unit of work (a task, a loop turn).
"""

from __future__ import annotations

import sys
from asyncio import _get_running_loop
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import Token
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.transaction import TransactionManagementError
from psycopg.pq import TransactionStatus

from . import eventlog
from .base import reset_connect_state
from .pooling.borrow import KEPT, PARKED
from .pooling.ledger import current_view


@contextmanager
def borrow(alias: str = DEFAULT_DB_ALIAS, name: str | None = None) -> Iterator[BaseDatabaseWrapper]:
    """Borrow this thread's connection to ``alias`` for the block and give it back after.

    Yields Django's connection object (``connections[alias]``); queries through the ORM in the
    block use it. If the thread already held a connection when the block began, it is left
    alone, so blocks nest.

    ``name``: what the per-view statistics (``poolstats --views``) and leak reports call the
    block; by default the view or task it runs in, or else the ``module.function`` that opened it.
    """
    if name is None and current_view.get() is None:
        caller = sys._getframe(2)  # (the generator's frame, contextlib's __enter__, the caller)
        name = f"{caller.f_globals.get('__name__', '?')}.{caller.f_code.co_qualname}"
    token = current_view.set(name) if name is not None else None
    try:
        wrapper = connections[alias]
        held_before = wrapper.connection is not None
        wrapper.ensure_connection()
        try:
            yield wrapper
        finally:
            if not held_before:
                release_connection_of(wrapper)
    finally:
        if token is not None:
            current_view.reset(token)


@contextmanager
def pinned(alias: str = DEFAULT_DB_ALIAS) -> Iterator[BaseDatabaseWrapper]:
    """Keep this thread's connection to ``alias`` for the whole block.

    With ``release="transaction"``, and outside a request, task or :func:`borrow` block with
    either setting, a connection normally goes back after each statement; code that needs one
    session across statements outside ``atomic`` (reading ``connection.connection``, a raw
    psycopg cursor, ``pg_backend_pid()`` twice) pins it. Inside a request with
    ``release="request"`` it only borrows, like :func:`borrow` without giving back.
    """
    wrapper = connections[alias]
    wrapper.ensure_connection()
    wrapper._pins += 1
    try:
        yield wrapper
    finally:
        wrapper._pins -= 1
        if wrapper._pins == 0 and getattr(wrapper, "_per_statement", False):
            wrapper.release_if_unpinned()


def thread_connections() -> Iterable[BaseDatabaseWrapper]:
    """The connection objects this thread has made: what ``connections.all(initialized_only=True)``
    returns (in any order), at a fraction of its cost.

    Django keeps them in an asgiref ``Local(thread_critical=True)``, which in a thread without an
    event loop stores them in a ``threading.local`` (``_storage``, asgiref 3.8 to 3.13). Asking
    through the ``Local`` costs an ``asyncio.get_running_loop()`` that raises and catches an
    exception, twice per alias: ``connections.all(initialized_only=True)`` counted 25.9k
    instructions with one alias (callgrind), reading the ``threading.local`` under 1k. The
    middleware asks twice per request. In an event loop, or if asgiref stores them elsewhere,
    this is ``connections.all(initialized_only=True)`` (``tests/test_middleware.py`` checks both
    agree)."""
    if _get_running_loop() is None:
        storage = getattr(connections._connections, "_storage", None)
        values = getattr(storage, "__dict__", None)
        if values is not None:
            return [w for w in values.values() if isinstance(w, BaseDatabaseWrapper)]
    return connections.all(initialized_only=True)


#: What a request found held when it began: alias -> (depth of the atomic blocks around it,
#: autocommit). See :func:`held_connections`.
Held = dict[str, tuple[int, bool]]


def held_connections() -> Held | None:
    """The connections this thread already holds as a request begins, and the transaction state
    around them; None when it holds none (every request a server handles: Django's
    ``request_started`` closes what an earlier request left).

    They belong to the code around the request, not to it: a test case's transaction, a
    ``borrow()`` block or ``atomic`` around a test-client call, a management command using
    ``Client``. The request gives back only what it borrowed and undoes only what it opened.
    """
    held = None
    for wrapper in thread_connections():
        if wrapper.connection is not None and getattr(wrapper, "_borrow", None) is not None:
            if held is None:
                held = {}
            held[wrapper.alias] = (len(wrapper.atomic_blocks), wrapper.autocommit)
    return held


def release_connections(view: str | None = None, held: Held | None = None) -> int:
    """Give back every connection this thread borrowed; returns how many.

    A connection left inside a transaction (an open ``atomic`` block, ``set_autocommit(False)``)
    is rolled back, and that is logged as a WARNING naming ``view``. Connections in ``held``
    (from :func:`held_connections` at the start of a request) stay with their holder; only the
    transactions the request opened on them are undone.
    """
    released = 0
    for wrapper in thread_connections():
        borrow = getattr(wrapper, "_borrow", None)
        if borrow is None or borrow.state is KEPT:
            continue  # nothing borrowed, or given back already (kept for the thread's next borrow)
        if held and wrapper.alias in held and wrapper.connection is not None:
            undo_request_transactions(wrapper, *held[wrapper.alias], view)
            continue
        release_connection_of(wrapper, view)
        released += 1
    return released


def undo_request_transactions(wrapper: BaseDatabaseWrapper, depth: int, autocommit: bool, view: str | None) -> None:
    """Roll back what a request left open on a connection it did not borrow: the atomic blocks
    it entered and never left (each exited as on an exception, so Django rolls back to its
    savepoint), or a transaction it began with ``set_autocommit(False)``. The holder's own
    transaction and blocks stay as they were."""
    if len(wrapper.atomic_blocks) > depth:
        eventlog.warn(
            "a transaction left open",
            wrapper.alias,
            view,
            "%s left %d atomic block(s) open on database %r; rolled back to where the request began",
            f"view {view}" if view else "a request",
            len(wrapper.atomic_blocks) - depth,
            wrapper.alias,
        )
        error = TransactionManagementError("atomic block left open by a request")
        while len(wrapper.atomic_blocks) > depth:
            wrapper.atomic_blocks[-1].__exit__(TransactionManagementError, error, None)
    elif autocommit and not wrapper.in_atomic_block and not wrapper.autocommit:
        eventlog.warn(
            "a transaction left open",
            wrapper.alias,
            view,
            "%s left a transaction open on database %r; it was rolled back",
            f"view {view}" if view else "a request",
            wrapper.alias,
        )
        wrapper.rollback()
        wrapper.set_autocommit(True)


def release_connection_of(wrapper: BaseDatabaseWrapper, view: str | None = None) -> None:
    """Give back ``wrapper``'s connection and forget any transaction state, so the thread's next
    borrow starts clean even if an ``atomic`` block was never exited."""
    if wrapper.connection is None:
        borrow = getattr(wrapper, "_borrow", None)
        if borrow is not None and borrow.state is PARKED:
            wrapper.close()  # parked between statements (release="transaction"): clean, goes back
        return
    status = wrapper.connection.pgconn.transaction_status
    in_transaction = wrapper.in_atomic_block or not wrapper.get_autocommit() or status != TransactionStatus.IDLE
    if status == TransactionStatus.UNKNOWN:  # the session is gone: nothing was left open on it
        eventlog.warn(
            "a lost connection",
            wrapper.alias,
            view,
            "%s lost its connection to database %r (the server ended the session, or the network "
            "failed)%s; it was discarded",
            f"view {view}" if view else "code outside a request",
            wrapper.alias,
            ", inside a transaction, which the server rolled back" if in_transaction else "",
        )
    elif in_transaction:
        eventlog.warn(
            "a transaction left open",
            wrapper.alias,
            view,
            "%s left a transaction open on database %r; it was rolled back",
            f"view {view}" if view else "code outside a request",
            wrapper.alias,
        )
    # Django refuses to close inside atomic (it marks the block instead); leave it first.
    reset_connect_state(wrapper)
    wrapper._pins = 0
    wrapper.close()
    wrapper.autocommit = wrapper.settings_dict["AUTOCOMMIT"]


# ----- Task workers ---------------------------------------------------------------------------

_task_tokens: dict[str, Token[str | None]] = {}


def name_celery_tasks() -> None:
    """Count a Celery task's borrows under the task's name (``poolstats --views``, leak
    reports): connected to Celery's ``task_prerun`` / ``task_postrun`` when the process runs
    Celery (a worker imports it before Django starts)."""
    from celery import signals as celery_signals

    celery_signals.task_prerun.connect(_task_started, weak=False, dispatch_uid="django_pooled_pg")
    celery_signals.task_postrun.connect(_task_ended, weak=False, dispatch_uid="django_pooled_pg")


def _task_started(sender: Any = None, task_id: str | None = None, task: Any = None, **kwargs: Any) -> None:
    if task_id is not None:
        _task_tokens[task_id] = current_view.set(getattr(task, "name", None) or getattr(sender, "name", None))


def _task_ended(sender: Any = None, task_id: str | None = None, **kwargs: Any) -> None:
    token = _task_tokens.pop(task_id, None) if task_id is not None else None
    if token is not None:
        try:
            current_view.reset(token)
        except ValueError:  # (ended in another context than it started: leave the name)
            pass
