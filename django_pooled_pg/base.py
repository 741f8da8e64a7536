"""The ENGINE: Django's PostgreSQL ``DatabaseWrapper`` with connections borrowed from a pool.

A small diff against ``django.db.backends.postgresql.base``:

* :meth:`DatabaseWrapper.connect` borrows from the process-wide pool of the alias
  (:mod:`django_pooled_pg.pooling.registry`) and does only the per-borrow bookkeeping Django needs; the
  per-session work (time zone, role, ``connection_created``) was done once, when the pool opened
  the connection (:class:`SessionSetup`).
* :meth:`DatabaseWrapper._close` gives the connection back clean
  (:func:`django_pooled_pg.pooling.release.prepare_return`) and keeps it for the thread's next borrow
  while nobody else needs it (:meth:`DatabaseWrapper._keep`).
* With ``release="transaction"``, cursors note statements that change session state
  (:class:`SessionTrackingMixin`), which keep the connection until the request ends.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from asyncio import _get_running_loop
from collections.abc import Callable
from typing import Any

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.db.backends.base.base import NO_DB_ALIAS, RAN_DB_VERSION_CHECK
from django.db.backends.signals import connection_created
from django.db.backends.utils import CursorWrapper

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

import psycopg
from psycopg import Connection

from . import apm, signals
from .creation import DatabaseCreation
from .errors import DatabaseUnavailable, PoolError, PoolExhausted, pool_error
from .features import DatabaseFeatures
from .pooling.connection import PooledConnection
from .pooling.ledger import capture_frames, current_view, ledger
from .pooling.pool import RECENT, Pool, expire_at
from .pooling.registry import registry
from .pooling.release import prepare_return
from .pooling.session import BASELINE_QUERY, PINNING_TAGS, RESET_SQL, reset_statement, startup_options
from .settings import read_pool_settings
from .telemetry.publisher import publisher
from .telemetry.snapshot import application_name


class SessionTrackingMixin:
    """With ``release="transaction"``: marks the connection as pinned when a statement's command
    tag says it changed the session (see :mod:`.session`). Constant time: the statement's text
    is never read. (Whether to reset needs no cursor: every borrowed connection is reset when it
    goes back, see ``DatabaseWrapper._borrowed``.)"""

    connection: Any  # (psycopg's cursor attribute)

    def execute(
        self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: bool | None = None
    ) -> Any:
        # (psycopg's signature spelled out: a call through **kwargs costs more per statement)
        result = super().execute(query, params, prepare=prepare, binary=binary)  # type: ignore[misc]
        pgresult = self.pgresult  # type: ignore[attr-defined]
        if pgresult is not None and pgresult.command_status in PINNING_TAGS:
            self.connection._pooled_pg_changed = True
        return result


#: Cursor classes with the tracking of pinning statements, by the class they extend.
_tracking_classes: dict[type, type] = {}


def pooled_cursor_class(factory: Any, tracking: bool) -> type:
    """The cursor class of the pool's connections: ``factory`` (Django's class, or whatever a
    subclass of this backend put in ``get_connection_params()``, as django-prometheus does), with
    ``release="transaction"`` with the tracking of pinning statements
    (:class:`SessionTrackingMixin`) in front, made once per class."""
    checked_cursor_class(factory)
    if not tracking or issubclass(factory, SessionTrackingMixin):
        return factory
    mixed = _tracking_classes.get(factory)
    if mixed is None:
        mixed = type(factory.__name__, (SessionTrackingMixin, factory), {"__module__": __name__})
        _tracking_classes[factory] = mixed
    return mixed


def tracking_cursor_class(factory: Any) -> type:
    """The cursor class of the pool's connections with ``release="transaction"``."""
    return pooled_cursor_class(factory, tracking=True)


def releases_per_statement(pool: Pool) -> bool:
    """Whether a borrow gives its connection back (parks it) after each statement or outermost
    transaction: with ``release="transaction"``, and in request mode outside a request, task or
    ``borrow()`` block (``current_view`` unset), where nothing would give it back before
    ``connection.close()``: an executor thread would hold an idle connection for its whole life
    while others wait."""
    return pool.settings.release == "transaction" or current_view.get() is None


def checked_cursor_class(factory: Any) -> type:
    if not (isinstance(factory, type) and issubclass(factory, psycopg.Cursor)):
        raise ImproperlyConfigured(
            f"cursor_factory {factory!r} is not a psycopg.Cursor subclass; django_pooled_pg needs "
            "one to track what a borrower leaves in the session. Subclass Django's "
            "django.db.backends.postgresql.base.Cursor instead."
        )
    return factory


class ReleaseOnCloseMixin:
    """With ``release="transaction"``: closing the last cursor of a connection that nothing pins
    gives the connection back (see :meth:`DatabaseWrapper.release_if_unpinned`).

    The open cursors are counted by their psycopg cursor, not by this wrapper: tools that wrap
    cursors (django-debug-toolbar) build a wrapper of their own around ``wrapper.cursor``, from a
    subclass of this class and without calling our constructor, and drop ours unclosed. Closing
    theirs closes the same psycopg cursor, and that is what counts.
    """

    db: DatabaseWrapper
    cursor: Any

    def close(self) -> None:
        try:
            self.cursor.close()
        except Exception:
            with self.db.wrap_database_errors:  # (entered only on an error: it runs per statement)
                raise
        finally:
            self.db.release_if_unpinned(self.cursor)


class ReleasingCursorWrapper(ReleaseOnCloseMixin, CursorWrapper):
    pass


class ReleasingCursorDebugWrapper(ReleaseOnCloseMixin, postgresql.CursorDebugWrapper):
    pass


class SessionSetup:
    """Prepares a database session, once, when the pool opens a connection.

    Time zone and role arrive with the startup packet, so what is left is what other code wants:
    Django's ``connection_created`` signal (sent with a wrapper bound to the new connection, so
    receivers that run ``SET ...`` keep working) and the pool's ``configure`` option. What they
    set is the session's baseline, which every reset restores (:func:`.session.reset_statement`).
    """

    def __init__(
        self,
        wrapper_class: type[DatabaseWrapper],
        settings_dict: dict[str, Any],
        alias: str,
        configure: Callable[[Connection], None] | None,
        time_zone: str | None = None,
    ) -> None:
        self.wrapper_class = wrapper_class
        self.settings_dict = settings_dict
        self.alias = alias
        self.configure = configure
        #: Set with SET when it cannot travel in the startup packet (behind PgBouncer).
        self.time_zone = time_zone

    def __call__(self, conn: PooledConnection) -> None:
        conn._pooled_pg_setup = self
        conn._pooled_pg_cursors = []
        baseline = False  # whether anything below may have set a session setting
        if self.time_zone and conn.info.parameter_status("TimeZone") != self.time_zone:
            conn.execute("SELECT set_config('TimeZone', %s, false)", [self.time_zone])
            baseline = True
        if connection_created.has_listeners(self.wrapper_class):
            baseline = True
            wrapper = self.wrapper_class(self.settings_dict, self.alias)
            wrapper.connection = conn
            # Receivers that query through connections[alias] (django.contrib.postgres reads the
            # hstore/citext OIDs that way) must use this session: borrowing from the pool that is
            # opening it would wait on itself (PoolTimeout) and keep a slot in this thread.
            previous = getattr(connections._connections, self.alias, None)
            connections[self.alias] = wrapper
            try:
                connection_created.send(sender=self.wrapper_class, connection=wrapper)
            finally:
                wrapper.connection = None
                if previous is None:
                    del connections[self.alias]
                else:
                    connections[self.alias] = previous
            if not conn.autocommit:
                conn.commit()
                conn.autocommit = True
        if self.configure is not None:
            baseline = True
            self.configure(conn)
        if baseline:
            rows = conn.execute(BASELINE_QUERY).fetchall()
            conn._pooled_pg_reset = reset_statement(rows).encode()
        else:
            conn._pooled_pg_reset = RESET_SQL.encode()
        # What ran here is the session's baseline, not a borrower's change.
        conn._pooled_pg_changed = False
        conn._pooled_pg_used = False


#: (apps.app_configs, whether django.contrib.postgres is in it), see _sync_postgres_types.
_contrib_postgres_installed: tuple[Any, bool] = (None, False)


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


class DatabaseWrapper(postgresql.DatabaseWrapper):
    #: Django's attribute (untyped there): the borrowed connection, or None.
    connection: Any
    creation_class = DatabaseCreation
    features_class = DatabaseFeatures

    #: The pool the current connection was borrowed from; None when not borrowed.
    _borrowed_from: Pool | None = None
    #: :attr:`registry.generation` at borrow time: differs in a forked child.
    _borrow_generation: int = -1
    #: release="transaction": give back after each statement / outermost transaction.
    _per_statement: bool = False
    #: The psycopg cursors of the current borrow whose wrapper is not closed yet (a set made per
    #: borrow), and explicit pins (``pinned()``).
    _open_cursors: set[Any] = frozenset()  # type: ignore[assignment]
    _pins: int = 0
    #: The connection parked after the last statement (release="transaction") or kept after the
    #: last borrow (``Pool.park``); ``connection`` is None meanwhile, ``_borrowed_from`` its pool.
    _parked: PooledConnection | None = None
    #: ``_parked`` was kept at the end of a borrow (:meth:`_keep`), not parked between
    #: statements: taking it back is a new borrow.
    _kept: bool = False
    #: The current borrow's wrapper lives in its thread's local storage (see get_new_connection).
    _owned: bool = False
    #: How long the current borrow waited for its connection.
    _wait: float = 0.0

    # ----- The pool ---------------------------------------------------------------------------

    @property
    def pooled(self) -> bool:
        return self.alias != NO_DB_ALIAS and self.settings_dict["OPTIONS"].get("pool") is not False

    @property
    def pool(self) -> Pool | None:
        """This alias's pool in this process (Django's backend has the same property)."""
        fingerprint = self.pool_fingerprint()
        pool = registry.current(self.alias, fingerprint)  # (an alias with a pool is pooled)
        if pool is not None:
            return pool
        if not self.pooled:
            return None
        return registry.pool_for(self.alias, fingerprint, self._build_pool)

    def pool_fingerprint(self) -> tuple[Any, ...]:
        """What the pool's connections were made from; a change means a new pool. Compared by
        value against a copy the registry keeps (so in-place edits of OPTIONS are seen)."""
        sd = self.settings_dict
        return (
            sd["NAME"],
            sd["USER"],
            sd["PASSWORD"],
            sd["HOST"],
            sd["PORT"],
            # (self.timezone is None without USE_TZ: Django's cached property, cheaper to read
            # than settings.USE_TZ, dropped with timezone_name when either setting changes)
            sd["OPTIONS"],
            sd["CONN_HEALTH_CHECKS"],
            self.timezone_name,
            self.timezone is None,
        )

    def _build_pool(self) -> Pool:
        pool_settings = read_pool_settings(self.alias, self.settings_dict)
        self.check_settings()
        options = self.settings_dict["OPTIONS"]
        if "isolation_level" in options:
            self._isolation_level()  # raises ImproperlyConfigured now rather than per borrow
        kwargs = self.get_connection_params()
        kwargs["autocommit"] = True
        if not options.get("application_name"):
            # Lets poolstats tell this process's connections apart in pg_stat_activity.
            kwargs["application_name"] = application_name(self.alias)
        # (tracking in request mode too: a thread outside a request gives back per statement)
        kwargs["cursor_factory"] = pooled_cursor_class(kwargs["cursor_factory"], tracking=True)
        startup = {}
        if self.timezone_name:
            startup["TimeZone"] = self.timezone_name
        if options.get("assume_role"):
            startup["role"] = options["assume_role"]
        set_time_zone = None
        if pool_settings.behind_pgbouncer:
            # PgBouncer refuses startup options; it tracks TimeZone set in the session instead
            # and applies it to whichever server connection serves this client.
            set_time_zone = self.timezone_name
        elif startup:
            kwargs["options"] = startup_options(kwargs.get("options"), startup)

        pool_kwargs = dict(pool_settings.pool_kwargs)
        configure = pool_kwargs.pop("configure", None)
        pool_kwargs.setdefault("name", f"django_pooled_pg:{self.alias}:{os.getpid()}")
        connect_timeout = float(options.get("connect_timeout") or 0)
        return Pool(
            self.alias,
            pool_settings,
            connect_timeout=connect_timeout,
            kwargs=kwargs,
            open=False,
            configure=SessionSetup(
                type(self),
                dict(self.settings_dict),
                self.alias,
                configure,
                set_time_zone,
            ),
            **pool_kwargs,
        )

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

    def _isolation_level(self) -> IsolationLevel:
        value = self.settings_dict["OPTIONS"].get("isolation_level")
        if value is None:
            return IsolationLevel.READ_COMMITTED
        try:
            return IsolationLevel(value)
        except ValueError:
            raise ImproperlyConfigured(
                f"Invalid transaction isolation level {value} specified. Use one of the psycopg.IsolationLevel values."
            ) from None

    # ----- Borrow and return --------------------------------------------------------------------

    def _cursor(self, name: str | None = None) -> Any:
        """Django's, with a short way for the statements after the first with
        ``release="transaction"``: the connection parked after the last statement is taken back
        here, so that ``ensure_connection()`` finds it and skips Django's error wrapper and
        ``connect()``. Here and not in an override of ``ensure_connection()``: Django's own tests
        patch ``BaseDatabaseWrapper.ensure_connection`` and call the instance's method from the
        patch, which an override would make recursive.
        (Its callers, ``cursor()`` and ``chunked_cursor()``, made Django's async_unsafe check.)"""
        if self.connection is None and self._parked is not None and not self._kept:
            self._take_back_parked()  # (if it was taken meanwhile, ensure_connection() borrows)
        return super()._cursor(name)

    def connect(self) -> None:
        """Borrow a connection: Django's ``connect()`` minus the per-session work.

        The borrow itself is :meth:`get_new_connection` and the per-borrow state
        :meth:`init_connection_state`, as in Django. When an APM tool has wrapped Django's
        ``BaseDatabaseWrapper.connect`` to time it (sentry-sdk does), the borrow goes through
        that wrapper, so the tool sees the wait for a pool connection (:mod:`.apm`).
        """
        if self._parked is not None and not self._kept and self._take_back_parked():
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
        reset cannot be fooled by what a borrower ran (see :mod:`.session`), and is sent
        without waiting for its answer (:mod:`.pooling.reset`)."""
        pool = self.pool
        assert pool is not None  # (connect() borrows only when pooled)
        if self._kept:
            conn = self._take_back_kept(pool)
            if conn is not None:
                return conn
        if not ledger.orphans.empty():
            ledger.reclaim_orphans()  # slots of threads that ended without closing
        started = time.monotonic()
        try:
            conn = pool.borrow()
        except PoolError as error:
            self._pool_failed(error)
            raise
        # A connection object that lives in this thread's local storage is lost when the
        # thread ends; one shared across threads (inc_thread_sharing) is not.
        owned = self._owned = self._thread_ident == threading.get_ident() and not self.allow_thread_sharing
        self._borrow = ledger.record(self.alias, pool, conn, owned_by_thread=owned, holder=id(self))
        conn._pooled_pg_used = True
        self._wait = self._borrow.started - started
        pool.stats.borrowed(self._wait, self._borrow.stats)
        self._borrowed_from = pool
        self._borrow_generation = registry.generation
        self._per_statement = False  # set by init_connection_state: its own queries keep it
        self._open_cursors = set()
        return conn

    def init_connection_state(self) -> None:
        """Per-borrow state; the per-session work (time zone, role, ``connection_created``) was
        done once, when the pool opened the connection (:class:`SessionSetup`)."""
        if self._borrowed_from is None:
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
        if self.alias not in RAN_DB_VERSION_CHECK:
            self.check_database_version_supported()
            RAN_DB_VERSION_CHECK.add(self.alias)
        self.run_on_commit: list[Any] = []
        self._sync_postgres_types(conn)
        self._per_statement = releases_per_statement(self._borrowed_from)
        if signals.connection_borrowed.receivers:
            signals.connection_borrowed.send(sender=type(self), alias=self.alias, connection=self, wait=self._wait)

    def _pool_failed(self, error: PoolError) -> None:
        stats = ledger.stats_for(self.alias)
        if isinstance(error, PoolExhausted):
            stats.exhausted += 1
        else:
            stats.unavailable += 1
        pool_error.set(error)
        signals.pool_exhausted.send(sender=type(self), alias=self.alias, error=error)

    def _sync_postgres_types(self, conn: PooledConnection) -> None:
        """Register django.contrib.postgres's hstore/citext adapters again when they are stale.

        Its ``connection_created`` receiver registers them per connection with type OIDs it
        caches per alias and forgets at CREATE EXTENSION (an in-process ``migrate``, as in a test
        run); Django sends the signal on every connect, a pooled session got it once. So compare
        the OIDs this session was set up with, which costs a dict lookup when nothing changed.
        """
        global _contrib_postgres_installed
        signals = sys.modules.get("django.contrib.postgres.signals")
        if signals is None or not apps.apps_ready or self.alias not in connections.settings:
            return  # (its OID lookups go through connections[alias]: a copy's alias has none)
        configs = apps.app_configs  # a new dict whenever INSTALLED_APPS changes (tests)
        if _contrib_postgres_installed[0] is not configs:
            _contrib_postgres_installed = (configs, apps.is_installed("django.contrib.postgres"))
        if not _contrib_postgres_installed[1]:
            return
        oids = (signals.get_hstore_oids(self.alias), signals.get_citext_oids(self.alias))
        if conn._pooled_pg_type_oids != oids:
            signals.register_type_handlers(self)
            conn._pooled_pg_type_oids = oids

    def _close(self, keep: bool = True) -> None:
        """Give the connection back to its pool, clean, or discard it.

        With ``keep`` a clean connection stays with this wrapper, free for any borrower to take,
        and this thread's next borrow takes it back without psycopg_pool's queue (:meth:`_keep`).
        """
        pool = self._borrowed_from
        if pool is None:
            return super()._close()
        conn, self.connection, self._borrowed_from = self.connection, None, None
        if conn is None or self._borrow_generation != registry.generation:
            return  # borrowed by the parent process before a fork: not ours to return
        borrow = ledger.borrows.get(id(conn))
        if borrow is None or borrow.holder != id(self):
            # Already given back for a thread that ended (never return twice), or this is a copy
            # (copy.copy(), as Django's own tests make) of the wrapper that holds it.
            self._parked = None
            return
        was_parked = borrow.parked  # (a parked connection's hold was recorded when it was parked)
        with self.wrap_database_errors:
            outcome = prepare_return(pool, conn)
            if not (keep and self._keep(pool, conn, borrow)):
                ledger.forget(conn)
                pool.putconn(conn)
        if conn.closed and pool_error.get() is None:
            # Lost mid-request: Django's atomic closes a connection whose rollback failed, and
            # may borrow another before the error reaches the middleware, which answers 503.
            pool_error.set(DatabaseUnavailable(f"lost the connection to database {self.alias!r}", alias=self.alias))
        stats = pool.stats
        borrow.stats.rollbacks += outcome.rolled_back
        stats.resets += outcome.reset
        stats.discarded += outcome.discarded
        if not was_parked:
            self._returned(borrow, conn._pooled_pg_returned_at, outcome.rolled_back)

    def _keep(self, pool: Pool, conn: PooledConnection, borrow: Any) -> bool:
        """Keep a clean, returned connection for this thread's next borrow (HikariCP keeps a
        thread's last connections the same way): parked in its pool, where any borrower that
        finds no idle connection takes it (:meth:`Pool.park`), and taken back by
        :meth:`_take_back_kept` with a lock and a dict pop instead of psycopg_pool's
        ``getconn()`` + ``putconn()``. Only a wrapper of this thread's own, and never while
        someone waits for a connection."""
        if not (self._owned and pool.can_keep) or conn.closed or not pool.park(conn, borrow):
            return False
        borrow.parked = True
        self._parked = conn
        self._kept = True
        self._borrowed_from = pool
        return True

    def _take_back_kept(self, pool: Pool) -> PooledConnection | None:
        """The connection this thread kept at its last return, for a new borrow; None if another
        borrower or the pool took it meanwhile, or it is no longer fit (then it goes back)."""
        kept_in = self._borrowed_from
        conn = self._unpark()
        if conn is None:
            return None
        if kept_in is not pool:  # the alias has a new pool (its settings changed): back to the old
            ledger.forget(conn)
            assert kept_in is not None  # (_unpark() found the connection kept in it)
            kept_in.putconn(conn)
            return None
        if conn._pooled_pg_pending:
            pool.finish_reset(conn)  # the reset it went back with; closed if that failed
        now = time.monotonic()
        if expire_at(conn) > now:  # (past max_lifetime, putconn() below recycles it)
            if (
                not conn.closed
                and (now - conn._pooled_pg_returned_at < RECENT or pool.usable(conn))
                and pool.user_check(conn)
            ):
                return self._borrowed_again(pool, conn, now)
            pool.lost(conn)  # dead after a pause, as an idle connection can be
        ledger.forget(conn)
        pool.putconn(conn)
        return None

    def _borrowed_again(self, pool: Pool, conn: PooledConnection, now: float) -> PooledConnection:
        """The bookkeeping of get_new_connection for a connection taken back by its borrower."""
        borrow = self._borrow
        borrow.parked = False
        borrow.started = now
        borrow.reported = False
        view = borrow.view = current_view.get()
        stats = borrow.stats = pool.stats.views.get(view) or pool.stats.view(view)
        if pool.settings.leak_timeout:
            borrow.frames = capture_frames(4)
        pool.stats.borrowed(None, stats)
        conn._pooled_pg_used = True
        self._wait = 0.0
        self._per_statement = False
        self._open_cursors = set()
        return conn

    def _returned(self, borrow: Any, now: float, rolled_back: bool) -> None:
        """The end of a hold: recorded in its view's histogram (and, for the give-back between
        statements, in :meth:`release_if_unpinned` the same way)."""
        held = now - borrow.started
        borrow.stats.hold.record(held)
        if signals.connection_returned.receivers:
            self._send_returned(held, rolled_back)

    def _send_returned(self, held: float, rolled_back: bool) -> None:
        signals.connection_returned.send(
            sender=type(self), alias=self.alias, connection=self, held=held, rolled_back=rolled_back
        )

    def close(self) -> None:
        # (Django's close() makes the async_unsafe check: ours would double it, so the parked
        # connection is returned only where Django's check will pass (_sync_allowed); where it
        # raises, the parked connection stays for the pool to take back.)
        if self._parked is not None and not self._kept and _sync_allowed():
            self.validate_thread_sharing()
            self._return_parked()  # parked between statements: reset, and kept for next time
        super().close()

    def close_if_unusable_or_obsolete(self) -> None:
        if self._parked is not None and not self._kept:
            self._return_parked()  # the end of a request: the same
        super().close_if_unusable_or_obsolete()

    # ----- Parking between statements (release="transaction") -----------------------------------

    def _unpark(self) -> PooledConnection | None:
        """The parked connection, taken back from the pool; None if another borrower or the pool
        took it meanwhile (or it is the parent's, inherited over fork)."""
        conn, pool = self._parked, self._borrowed_from
        self._parked = None
        self._kept = False
        if (
            pool is None
            or conn is None
            or self._borrow_generation != registry.generation
            or self._borrow.holder != id(self)
        ):
            self._borrowed_from = None  # not ours to touch: the parent's (fork), or a copy's original's
            return None
        if pool._parked.pop(self._borrow, None) is not conn:  # (Pool.unpark, without a call per statement)
            ledger.discard(self._borrow)
            self._borrowed_from = None
            return None
        return conn

    def _take_back_parked(self) -> bool:
        """Resume the parked connection for the next statement: True if it was still free and
        alive; False (and a normal borrow follows) if not."""
        # _unpark(), written out: this runs before every statement, and a call is ~0.4k
        # instructions of the ~8k a statement's give-back and take-back cost (callgrind).
        conn, pool, borrow = self._parked, self._borrowed_from, self._borrow
        self._parked = None  # (and _kept is False: the callers checked)
        if pool is None or conn is None or self._borrow_generation != registry.generation or borrow.holder != id(self):
            self._borrowed_from = None  # not ours to touch: the parent's (fork), or a copy's original's
            return False
        if pool._parked.pop(borrow, None) is not conn:  # (Pool.unpark) taken by someone meanwhile
            ledger.discard(borrow)
            self._borrowed_from = None
            return False
        self.connection = conn
        now = time.monotonic()
        if expire_at(conn) <= now:
            self._close(keep=False)  # past max_lifetime: the pool replaces it
            return False
        if now - conn._pooled_pg_returned_at >= RECENT and not pool.usable(conn):
            pool.lost(conn)  # dead after a pause, as an idle connection can be
            self._close(keep=False)
            return False
        borrow.parked = False
        borrow.started = now
        view = current_view.get()
        if view is not borrow.view:  # (the same string all through a request)
            borrow.view = view
            borrow.stats = pool.stats.views.get(view) or pool.stats.view(view)
            # Parked outside a request and taken back in one (a test client's request after a
            # query): the request holds it, as its own borrow would.
            self._per_statement = releases_per_statement(pool)
        pool.stats.borrowed(None, borrow.stats)
        self._open_cursors.clear()  # (the set of this connect())
        if signals.connection_borrowed.receivers:
            signals.connection_borrowed.send(sender=type(self), alias=self.alias, connection=self, wait=0.0)
        return True

    def _return_parked(self) -> None:
        """The request, or the thread's work, is over: give the connection parked between
        statements back (reset, and kept for this thread's next borrow: :meth:`_close`) unless
        another borrower took it."""
        conn = self._unpark()
        if conn is not None:
            self.connection = conn
            self._close()

    # ----- release="transaction" ---------------------------------------------------------------

    def make_cursor(self, cursor: Any) -> Any:
        if not self._per_statement:
            return super().make_cursor(cursor)
        self._open_cursors.add(cursor)
        return ReleasingCursorWrapper(cursor, self)

    def make_debug_cursor(self, cursor: Any) -> Any:
        if not self._per_statement:
            return super().make_debug_cursor(cursor)
        self._open_cursors.add(cursor)
        return ReleasingCursorDebugWrapper(cursor, self)

    def set_autocommit(self, autocommit: bool, force_begin_transaction_with_broken_autocommit: bool = False) -> None:
        super().set_autocommit(autocommit, force_begin_transaction_with_broken_autocommit)
        if autocommit and self._per_statement:
            self.release_if_unpinned()  # the outermost atomic block has ended

    def release_if_unpinned(self, closed: Any = None) -> None:
        """Give the connection back now (park it) unless something still needs this session: an
        open cursor or transaction, an atomic block, autocommit turned off, an open
        ``QuerySet.iterator()`` cursor, a ``pinned()`` block, or a statement that changed
        session state (which pins the connection until the request ends).

        ``closed`` is the psycopg cursor whose wrapper was just closed (ReleaseOnCloseMixin); a
        cursor of an earlier borrow, closed late, or a second close, counts nothing."""
        if closed is not None:
            if closed not in self._open_cursors:
                return
            self._open_cursors.discard(closed)
        conn = self.connection
        if (
            conn is None
            or self._borrowed_from is None
            or (self._open_cursors and self._cursors_open())
            or self._pins > 0
            or self.in_atomic_block
            or not self.autocommit
            or conn._pooled_pg_changed
            or conn.pgconn.transaction_status  # not IDLE
            or (conn._pooled_pg_cursors and any(not cursor.closed for cursor in conn._pooled_pg_cursors))
        ):
            return
        # Park it: free for any borrower to take, and taken back at the next statement if nobody
        # has (Pool.park). If a borrower is waiting, it goes back to the pool for real instead.
        pool, borrow = self._borrowed_from, self._borrow
        if not pool.park(conn, borrow):
            return self._close(keep=False)
        now = time.monotonic()
        conn._pooled_pg_returned_at = now
        conn._pooled_pg_cursors.clear()  # every one closed (checked above)
        borrow.parked = True
        self.connection = None
        self._parked = conn
        # _returned(), written out for the same reason as _unpark() in _take_back_parked().
        borrow.stats.hold.record(now - borrow.started)
        if signals.connection_returned.receivers:
            self._send_returned(now - borrow.started, False)

    def _cursors_open(self) -> bool:
        """Whether a cursor of this borrow is still open. One that something else closed (a
        wrapper that closes the psycopg cursor itself) no longer counts."""
        open_cursors = self._open_cursors
        for cursor in [c for c in open_cursors if c.closed]:
            open_cursors.discard(cursor)
        return bool(open_cursors)

    def forget_inherited_connection(self) -> None:
        """In a forked child: drop, without closing, a connection the parent borrowed."""
        if self._borrowed_from is not None and self._borrow_generation != registry.generation:
            self.connection = None
            self._parked = None
            self._kept = False
            self._borrowed_from = None

    def close_if_health_check_failed(self) -> None:
        if self.connection is None or self._borrowed_from is not None:
            return  # nothing borrowed yet, or a pooled connection: the pool checks those
        super().close_if_health_check_failed()

    def chunked_cursor(self) -> Any:
        wrapper = super().chunked_cursor()
        if self._borrowed_from is not None:
            # QuerySet.iterator() cursors (named: WITH HOLD in autocommit) are closed at release
            # if their iterator was abandoned. (Here rather than in create_cursor(), which every
            # statement goes through.)
            self.connection._pooled_pg_cursors.append(wrapper.cursor)
        return wrapper


def _forget_inherited_connections() -> None:
    """In a forked child: Django's connection objects of the thread that forked may hold a
    connection the parent borrowed; they drop it without closing it (after the registry's own
    fork handler, registered first, which marks the parent's borrows as another generation)."""
    try:
        wrappers = connections.all(initialized_only=True)
    except Exception:  # Django not configured in this process: nothing borrowed
        return
    for wrapper in wrappers:
        forget = getattr(wrapper, "forget_inherited_connection", None)
        if forget is not None:
            forget()


os.register_at_fork(after_in_child=_forget_inherited_connections)
# The statistics publisher starts with this process's first pool (a no-op once running): the
# pooling core knows nothing of the telemetry above it.
registry.pool_created.append(lambda alias: publisher.ensure_started())
