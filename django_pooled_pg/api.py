"""Borrowing outside requests: management commands, task workers, scripts, long-lived threads.

Inside a request the middleware gives connections back. Elsewhere nothing does, so code that
runs outside requests borrows explicitly::

    from django_pooled_pg import borrow

    with borrow():                      # or borrow("replica")
        Order.objects.filter(...).update(...)
    # the connection is back in the pool here, rolled back if a transaction was left open

or calls :func:`release_connections` at the end of each unit of work (a task, a loop turn).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper

logger = logging.getLogger("django_pooled_pg")


@contextmanager
def borrow(alias: str = DEFAULT_DB_ALIAS) -> Iterator[BaseDatabaseWrapper]:
    """Borrow this thread's connection to ``alias`` for the block and give it back after.

    Yields Django's connection object (``connections[alias]``); queries through the ORM in the
    block use it. If the thread already held a connection when the block began, it is left
    alone, so blocks nest.
    """
    wrapper = connections[alias]
    held_before = wrapper.connection is not None
    wrapper.ensure_connection()
    try:
        yield wrapper
    finally:
        if not held_before:
            release_connection_of(wrapper)


@contextmanager
def pinned(alias: str = DEFAULT_DB_ALIAS) -> Iterator[BaseDatabaseWrapper]:
    """Keep this thread's connection to ``alias`` for the whole block.

    With ``release="transaction"`` a connection normally goes back after each statement; code
    that needs one session across statements outside ``atomic`` (reading
    ``connection.connection``, a raw psycopg cursor, ``pg_backend_pid()`` twice) pins it. With
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


def release_connections(view: str | None = None) -> int:
    """Give back every connection this thread borrowed; returns how many.

    A connection left inside a transaction (an open ``atomic`` block, ``set_autocommit(False)``)
    is rolled back, and that is logged as a WARNING naming ``view``.
    """
    released = 0
    for wrapper in connections.all(initialized_only=True):
        if getattr(wrapper, "_borrowed_from", None) is not None:
            release_connection_of(wrapper, view)
            released += 1
    return released


def release_connection_of(wrapper: BaseDatabaseWrapper, view: str | None = None) -> None:
    """Give back ``wrapper``'s connection and forget any transaction state, so the thread's next
    borrow starts clean even if an ``atomic`` block was never exited."""
    if wrapper.connection is None:
        if getattr(wrapper, "_parked", None) is not None:
            wrapper.close()  # parked between statements (release="transaction"): clean, goes back
        return
    in_transaction = wrapper.in_atomic_block or not wrapper.get_autocommit()
    if not in_transaction:
        status = wrapper.connection.pgconn.transaction_status
        in_transaction = status != 0  # not IDLE
    if in_transaction:
        logger.warning(
            "%s left a transaction open on database %r; it was rolled back",
            f"view {view}" if view else "code outside a request", wrapper.alias,
        )
    # Django refuses to close inside atomic (it marks the block instead); leave it first.
    wrapper.in_atomic_block = False
    wrapper.atomic_blocks = []
    wrapper.savepoint_ids = []
    wrapper.needs_rollback = False
    wrapper.closed_in_transaction = False
    wrapper._pins = 0
    wrapper.close()
    wrapper.autocommit = wrapper.settings_dict["AUTOCOMMIT"]
