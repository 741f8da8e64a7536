"""The ENGINE: Django's PostgreSQL ``DatabaseWrapper`` with connections borrowed from a pool.

A small diff against ``django.db.backends.postgresql.base``:

* :meth:`DatabaseWrapper.connect` borrows from the process-wide pool of the alias
  (:mod:`django_pooled_pg.pooling.registry`) and does only the per-borrow bookkeeping Django
  needs; the per-session work (time zone, role, ``connection_created``) was done once, when the
  pool opened the connection (:class:`~django_pooled_pg.session_setup.SessionSetup`).
* :meth:`DatabaseWrapper._close` gives the connection back clean
  (:func:`django_pooled_pg.pooling.release.prepare_return`) and keeps it for the thread's next
  borrow while nobody else needs it.
* With ``release="transaction"``, and outside requests, the connection is parked between
  statements and taken back by the next one (:mod:`django_pooled_pg.per_statement`,
  :meth:`DatabaseWrapper._cursor`).

What a borrow is, and its states (borrowed, parked, kept, returned), is
:class:`django_pooled_pg.pooling.borrow.Borrow`: the wrapper holds one, as ``_borrow``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from asyncio import _get_running_loop
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.db.backends.base.base import NO_DB_ALIAS, BaseDatabaseWrapper

try:
    from django.db.backends.postgresql import base as postgresql
    from django.db.backends.postgresql.psycopg_any import IsolationLevel, is_psycopg3
except ImproperlyConfigured as exc:
    raise ImproperlyConfigured(
        "django_pooled_pg needs psycopg 3 and could not load it "
        f"({exc}). Install it with: pip install 'psycopg[binary]' psycopg-pool"
    ) from exc
if not is_psycopg3:
    raise ImproperlyConfigured(
        "django_pooled_pg needs psycopg 3, but only psycopg2 is installed. "
        "Install it with: pip install 'psycopg[binary]' psycopg-pool "
        "(psycopg2 can stay installed; psycopg 3 is preferred when both are present)."
    )

from . import apm, signals
from .creation import DatabaseCreation
from .engine_pool import build_pool, pool_fingerprint
from .errors import DatabaseUnavailable, PoolError, PoolExhausted, pool_error
from .features import DatabaseFeatures
from .per_statement import PerStatementRelease
from .pooling.borrow import KEPT, PARKED, Borrow
from .pooling.connection import PooledConnection
from .pooling.ledger import ledger
from .pooling.pool import RECENT, Pool, expire_at
from .pooling.registry import registry
from .pooling.release import prepare_return
from .session_setup import sync_postgres_types
from .telemetry.publisher import publisher


def _sync_allowed() -> bool:
    """Django's ``async_unsafe`` test without its cost: ``asyncio._get_running_loop()`` returns
    None where Django's ``get_running_loop()`` raises an exception and catches it (timeit here:
    0.08 us against 1.1 us for an ``async_unsafe`` call)."""
    return _get_running_loop() is None or bool(os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE"))


def _called_from(module: str) -> bool:
    """Whether the caller of the function calling this is code of ``module``."""
    return sys._getframe(2).f_globals.get("__name__") == module


#: What Django's ``BaseDatabaseWrapper.connect()`` resets for a new connection and a borrow
#: resets too (the rest of what it sets, the borrow sets its own way: ``connection``, and the
#: health-check, ``close_at`` and ``run_on_commit`` state in ``init_connection_state()``).
#: ``tests/test_engine.py`` compares both lists with Django's source, so a Django release that
#: adds one fails there.
CONNECT_STATE = (
    "in_atomic_block",
    "savepoint_ids",
    "atomic_blocks",
    "needs_rollback",
    "closed_in_transaction",
    "errors_occurred",
)
#: Set by Django's ``connect()`` and by the borrow its own way (see CONNECT_STATE).
CONNECT_STATE_ELSEWHERE = ("connection", "health_check_enabled", "close_at", "health_check_done", "run_on_commit")


def reset_connect_state(wrapper: Any) -> None:
    """The transaction bookkeeping Django's ``connect()`` resets (:data:`CONNECT_STATE`): before
    a borrow, and when a connection is given back from inside an ``atomic`` block."""
    wrapper.in_atomic_block = False
    wrapper.savepoint_ids = []
    wrapper.atomic_blocks = []
    wrapper.needs_rollback = False
    wrapper.closed_in_transaction = False
    wrapper.errors_occurred = False


class DatabaseWrapper(PerStatementRelease, postgresql.DatabaseWrapper):
    #: Django's attribute (untyped there): the borrowed connection, or None.
    connection: Any
    creation_class = DatabaseCreation
    features_class = DatabaseFeatures

    #: The current borrow (borrowed, parked between statements or kept for this thread's next
    #: borrow: its ``state``); None when nothing is borrowed. (Set in ``__init__``, not on the
    #: class: see ``PerStatementRelease.__init__``.)
    _borrow: Borrow | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._borrow = None

    # ----- The pool ---------------------------------------------------------------------------

    @property
    def pooled(self) -> bool:
        return self.alias != NO_DB_ALIAS and self.settings_dict["OPTIONS"].get("pool") is not False

    @property
    def pool(self) -> Pool | None:
        """This alias's pool in this process. (Not Django's property through ``super()``: its
        pool is a psycopg_pool ``ConnectionPool`` per alias per class, kept when the settings
        change and inherited, open, by a forked child; ours is the registry's.)"""
        fingerprint = pool_fingerprint(self)
        pool = registry.current(self.alias, fingerprint)  # (an alias with a pool is pooled)
        if pool is not None:
            return pool
        if not self.pooled:
            return None
        return registry.pool_for(self.alias, fingerprint, self._build_pool)

    def _build_pool(self) -> Pool:
        if "isolation_level" in self.settings_dict["OPTIONS"]:
            self._isolation_level()  # raises ImproperlyConfigured now rather than per borrow
        return build_pool(self)

    def close_pool(self) -> None:
        """Close this alias's pool in this process (Django's backend has the same method).

        Not when Celery's Django fix-up asks, after every task of a prefork worker: it does so
        because Django's own pool is not fork-safe. Ours is (each child process has its own), and
        the fix-up's ``close()`` just before gave the task's connection back; closing the pool
        as well would open a new server session for every task.
        """
        if _called_from("celery.fixups.django"):
            return
        registry.close(self.alias)

    # ----- Borrow and return --------------------------------------------------------------------

    def _cursor(self, name: str | None = None) -> Any:
        """Django's, with a short way for the statements after the first with
        ``release="transaction"``: the connection parked after the last statement is taken back
        here, so that ``ensure_connection()`` finds it and skips Django's error wrapper and
        ``connect()``. Here and not in an override of ``ensure_connection()``: Django's own tests
        patch ``BaseDatabaseWrapper.ensure_connection`` and call the instance's method from the
        patch, which an override would make recursive.
        (Its callers, ``cursor()`` and ``chunked_cursor()``, made Django's async_unsafe check.)"""
        if self.connection is None:
            borrow = self._borrow
            if borrow is not None and borrow.state is PARKED:
                self._take_back_parked(borrow)  # (if it was taken meanwhile, ensure_connection() borrows)
        return super()._cursor(name)

    def connect(self) -> None:
        """Borrow a connection: Django's ``connect()`` minus the per-session work.

        Not Django's ``connect()`` through ``super()``: that reads ``get_connection_params()`` and
        sends ``connection_created`` on every connect, which a pooled session got once
        (:class:`~django_pooled_pg.session_setup.SessionSetup`). What it resets, a borrow resets
        too (:data:`CONNECT_STATE`). The borrow itself is :meth:`get_new_connection` and the
        per-borrow state :meth:`init_connection_state`, as in Django. When an APM tool has wrapped Django's
        ``BaseDatabaseWrapper.connect`` to time it (sentry-sdk does), the borrow goes through
        that wrapper, so the tool sees the wait for a pool connection (:mod:`.apm`).
        """
        borrow = self._borrow
        if borrow is not None and borrow.state is PARKED and self._take_back_parked(borrow):
            return  # mid-request (release="transaction"): Django's bookkeeping still holds
        if not self.pooled:
            return super().connect()
        if apm.connect_is_wrapped():
            return apm.connect_through_wrapper(self)
        reset_connect_state(self)
        self.connection = self._borrowed()
        self.init_connection_state()

    def get_new_connection(self, conn_params: Any) -> PooledConnection:
        """A connection borrowed from the pool (the pool opened it with this alias's settings,
        so ``conn_params`` is not needed); Django's new connection when not pooled."""
        if not self.pooled:
            return super().get_new_connection(conn_params)
        return self._borrowed()

    def _borrowed(self) -> PooledConnection:
        """Borrow: the connection this thread kept at its last return if it is still free
        (:meth:`_take_back_kept`), else one from the pool.

        Every borrowed connection is marked used, so that it is reset when it goes back: the
        reset cannot be fooled by what a borrower ran (see :mod:`.pooling.session`), and is sent
        without waiting for its answer (:mod:`.pooling.reset`)."""
        pool = self.pool
        assert pool is not None  # (connect() borrows only when pooled)
        kept = self._borrow
        conn = self._take_back_kept(pool, kept) if kept is not None and kept.state is KEPT else None
        if conn is None:
            if not ledger.orphans.empty():
                ledger.reclaim_orphans()  # slots of threads that ended without closing
            asked_at = time.monotonic()
            try:
                conn = pool.borrow()
            except PoolError as error:
                self._pool_failed(error)
                raise
            # A connection object that lives in this thread's local storage is lost when the
            # thread ends; one shared across threads (inc_thread_sharing) is not.
            owned = self._thread_ident == threading.get_ident() and not self.allow_thread_sharing
            self._borrow = Borrow.start(self.alias, pool, conn, asked_at, id(self), owned)
        conn._pooled_pg_used = True
        self._per_statement = False  # set by init_connection_state: its own queries keep it
        self._open_cursors = set()
        return conn

    def _take_back_kept(self, pool: Pool, borrow: Borrow) -> PooledConnection | None:
        """The connection this thread kept at its last return, for a new borrow; None if another
        borrower or the pool took it meanwhile, or it is no longer fit (then it goes back)."""
        self._borrow = None  # (again borrow's if taken back)
        now = time.monotonic()
        conn = borrow.take_back(id(self), now)
        if conn is None:
            return None
        if borrow.pool is not pool:  # the alias has a new pool (its settings changed): back to the old
            borrow.give_back()
            return None
        if conn._pooled_pg_pending:
            pool.finish_reset(conn)  # the reset it went back with; closed if that failed
        if expire_at(conn) > now:  # (past max_lifetime, putconn() recycles it)
            if (
                not conn.closed
                and (now - conn._pooled_pg_returned_at < RECENT or pool.usable(conn))
                and pool.user_check(conn)
            ):
                borrow.renew(now)
                self._borrow = borrow
                return conn
            pool.lost(conn)  # dead after a pause, as an idle connection can be
        borrow.give_back()
        return None

    def init_connection_state(self) -> None:
        """Per-borrow state; the per-session work (time zone, role, ``connection_created``) was
        done once, when the pool opened the connection (see :meth:`connect`)."""
        borrow = self._borrow
        if borrow is None:
            return super().init_connection_state()
        conn = self.connection
        self.health_check_enabled = False  # the pool checks connections, not Django
        self.health_check_done = True
        self.close_at = 0  # CONN_MAX_AGE = 0: request_finished gives the connection back
        if "isolation_level" in self.settings_dict["OPTIONS"]:
            level = self.isolation_level = self._isolation_level()
            if conn.isolation_level != level:
                conn.isolation_level = level
        else:
            self.isolation_level = IsolationLevel.READ_COMMITTED
        if self.settings_dict["AUTOCOMMIT"]:
            self.autocommit = True  # pooled connections are kept in autocommit
        else:
            self.set_autocommit(False)
        # Django's version check (once per alias). Not PostgreSQL's init_connection_state():
        # what it adds configures a session Django opened, which SessionSetup did for the pool's,
        # and its test (`not self.pool`) would read the pool's fingerprint on every borrow.
        BaseDatabaseWrapper.init_connection_state(self)
        self.run_on_commit: list[Any] = []
        sync_postgres_types(self, conn)
        # Whether this borrow gives its connection back after each statement or outermost
        # transaction (parking it) rather than at the end of the request: decided here, for a
        # new borrow and a kept connection taken back alike (both connect()).
        self._release_per_statement(borrow.pool, conn)
        if signals.connection_borrowed.receivers:
            signals.connection_borrowed.send(sender=type(self), alias=self.alias, connection=self, wait=borrow.wait)

    def _isolation_level(self) -> IsolationLevel:
        """``OPTIONS["isolation_level"]`` (Django's backend reads it inline in its
        ``get_new_connection()``, which a borrow does not run)."""
        value = self.settings_dict["OPTIONS"].get("isolation_level")
        if value is None:
            return IsolationLevel.READ_COMMITTED
        try:
            return IsolationLevel(value)
        except ValueError:
            raise ImproperlyConfigured(
                f"Invalid transaction isolation level {value} specified. Use one of the psycopg.IsolationLevel values."
            ) from None

    def _pool_failed(self, error: PoolError) -> None:
        stats = ledger.stats_for(self.alias)
        if isinstance(error, PoolExhausted):
            stats.exhausted += 1
        else:
            stats.unavailable += 1
        pool_error.set(error)
        signals.pool_exhausted.send(sender=type(self), alias=self.alias, error=error)

    def _close(self, keep: bool = True, parked: bool = False) -> None:
        """Give the connection back to its pool, clean, or discard it.

        With ``keep`` a clean connection stays with this wrapper, free for any borrower to take,
        and this thread's next borrow takes it back without psycopg_pool's queue
        (:meth:`Borrow.keep <django_pooled_pg.pooling.borrow.Borrow.keep>`). ``parked``: its hold
        ended when it was parked, and the caller counted it (``Borrow.end_hold``): it was
        taken back only to go back, or found unfit.
        """
        borrow = self._borrow
        if borrow is None:
            return super()._close()
        conn, self.connection, self._borrow = self.connection, None, None
        if conn is None or not borrow.held_by(id(self)) or ledger.borrows.get(id(conn)) is not borrow:
            # Borrowed by the parent process before a fork, already given back for a thread that
            # ended (never return twice), or this is a copy (copy.copy(), as Django's own tests
            # make) of the wrapper that holds it: not ours to return.
            return
        pool = borrow.pool
        with self.wrap_database_errors:
            outcome = prepare_return(pool, conn)
            busy = conn._pooled_pg_take_busy(conn._pooled_pg_returned_at)  # (before it goes back)
            if keep and borrow.keep():
                self._borrow = borrow
            else:
                borrow.give_back()
        if conn.closed and pool_error.get() is None:
            # Lost mid-request: Django's atomic closes a connection whose rollback failed, and
            # may borrow another before the error reaches the middleware, which answers 503.
            pool_error.set(DatabaseUnavailable(f"lost the connection to database {self.alias!r}", alias=self.alias))
        stats = pool.stats
        borrow.stats.rollbacks += outcome.rolled_back
        stats.resets += outcome.reset
        stats.discarded += outcome.discarded
        if not parked:
            self._returned(borrow, conn._pooled_pg_returned_at, outcome.rolled_back, busy)

    def _returned(self, borrow: Borrow, now: float, rolled_back: bool, busy: float) -> None:
        """The end of a hold: recorded in its view's histogram (a parked one's by
        :meth:`Borrow.end_hold <django_pooled_pg.pooling.borrow.Borrow.end_hold>`).
        The signal's ``held`` is since the last take-back, as each give-back's."""
        held = now - borrow.since
        # (a hold given back per statement is all statement or transaction: its cursors are
        # not timed, see _release_per_statement)
        borrow.stats.held(held, held if self._per_statement else busy)
        if signals.connection_returned.receivers:
            self._send_returned(now - borrow.started, rolled_back)

    def _send_returned(self, held: float, rolled_back: bool) -> None:
        signals.connection_returned.send(
            sender=type(self), alias=self.alias, connection=self, held=held, rolled_back=rolled_back
        )

    def close(self) -> None:
        # (Django's close() makes the async_unsafe check: ours would double it, so the parked
        # connection is returned only where Django's check will pass (_sync_allowed); where it
        # raises, the parked connection stays for the pool to take back.)
        borrow = self._borrow
        if borrow is not None and borrow.state is PARKED and _sync_allowed():
            self.validate_thread_sharing()
            self._return_parked(borrow)  # parked between statements: reset, and kept for next time
        super().close()

    def close_if_unusable_or_obsolete(self) -> None:
        borrow = self._borrow
        if borrow is not None and borrow.state is PARKED:
            self._return_parked(borrow)  # the end of a request: the same
        super().close_if_unusable_or_obsolete()

    def forget_inherited_connection(self) -> None:
        """In a forked child: drop, without closing, a connection the parent borrowed."""
        borrow = self._borrow
        if borrow is not None and borrow.generation != registry.generation:
            self.connection = None
            self._borrow = None

    def close_if_health_check_failed(self) -> None:
        if self.connection is None or self._borrow is not None:
            return  # nothing borrowed yet, or a pooled connection: the pool checks those
        super().close_if_health_check_failed()

    def chunked_cursor(self) -> Any:
        wrapper = super().chunked_cursor()
        if self._borrow is not None:
            # QuerySet.iterator() cursors (named: WITH HOLD in autocommit) are closed at release
            # if their iterator was abandoned. (Here rather than in create_cursor(), which every
            # statement goes through.)
            self.connection._pooled_pg_cursors.append(wrapper.cursor)
        return wrapper


def _forget_inherited_connections() -> None:
    """In a forked child: Django's connection objects of the thread that forked may hold a
    connection the parent borrowed; they drop it without closing it (called by the registry's
    fork handler once the generation is the child's)."""
    try:
        wrappers = connections.all(initialized_only=True)
    except Exception:  # Django not configured in this process: nothing borrowed
        return
    for wrapper in wrappers:
        forget = getattr(wrapper, "forget_inherited_connection", None)
        if forget is not None:
            forget()


registry.forked.append(_forget_inherited_connections)
# The statistics publisher starts with this process's first pool (a no-op once running): the
# pooling core knows nothing of the telemetry above it.
registry.pool_created.append(lambda alias: publisher.ensure_started())
