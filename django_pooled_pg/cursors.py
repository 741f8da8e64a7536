"""The cursor classes of a pooled connection, for the give-back after each statement
(``release="transaction"``, and code outside requests: :mod:`.per_statement`).

* :class:`SessionTrackingMixin` (psycopg's cursor class, made by :func:`tracking_cursor_class`):
  notes a statement whose command tag says it changed session state, which pins the connection
  until the request ends.
* :class:`ReleaseOnCloseMixin` (Django's cursor wrapper): closing the last open cursor of a
  connection that nothing pins gives the connection back
  (``DatabaseWrapper.release_if_unpinned``).
"""

from __future__ import annotations

from time import monotonic
from typing import Any

import psycopg
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.postgresql.base import CursorDebugWrapper
from django.db.backends.utils import CursorWrapper

from .pooling.session import PINNING_TAGS


class SessionTrackingMixin:
    """Marks the connection as pinned when a statement's command tag says it changed the session
    (see :mod:`.pooling.session`). Constant time: the statement's text is never read. (Whether to
    reset needs no cursor: every borrowed connection is reset when it goes back.)"""

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


class BusyTimingMixin(SessionTrackingMixin):
    """With ``release="request"``: :class:`SessionTrackingMixin`, and the time the connection
    spends in statements and in open transactions added up (``PoolState._pooled_pg_busy``): the
    part of a hold that ``release="transaction"`` would hold too (``poolstats --advise`` says how
    much of the rest that mode would give back). Two clock readings per statement."""

    def execute(
        self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: bool | None = None
    ) -> Any:
        conn = self.connection
        started = monotonic()
        if conn._pooled_pg_tx_at:  # (since the transaction's last statement: busy in it)
            conn._pooled_pg_busy += started - conn._pooled_pg_tx_at
        try:
            # (SessionTrackingMixin.execute written out below: one call less per statement)
            result = super(SessionTrackingMixin, self).execute(query, params, prepare=prepare, binary=binary)  # type: ignore[misc]
        finally:
            ended = monotonic()
            conn._pooled_pg_busy += ended - started
            conn._pooled_pg_tx_at = ended if conn.pgconn.transaction_status else 0.0  # (not IDLE)
        pgresult = self.pgresult  # type: ignore[attr-defined]
        if pgresult is not None and pgresult.command_status in PINNING_TAGS:
            conn._pooled_pg_changed = True
        return result


#: Cursor classes with the tracking of pinning statements, by the class they extend and whether
#: they time statements.
_tracking_classes: dict[tuple[type, bool], type] = {}


def tracking_cursor_class(factory: Any, timed: bool = False) -> type:
    """The cursor class of the pool's connections: ``factory`` (Django's class, or whatever a
    subclass of the ENGINE put in ``get_connection_params()``, as django-prometheus does), with
    the tracking of pinning statements (:class:`SessionTrackingMixin`; with ``timed``,
    :class:`BusyTimingMixin`) in front, made once per class. Always, in both release modes:
    outside requests even request mode gives back per statement."""
    checked_cursor_class(factory)
    if issubclass(factory, SessionTrackingMixin):
        return factory
    mixed = _tracking_classes.get((factory, timed))
    if mixed is None:
        mixin = BusyTimingMixin if timed else SessionTrackingMixin
        mixed = type(factory.__name__, (mixin, factory), {"__module__": __name__})
        _tracking_classes[factory, timed] = mixed
    return mixed


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
    gives the connection back (see ``DatabaseWrapper.release_if_unpinned``).

    The open cursors are counted by their psycopg cursor, not by this wrapper: tools that wrap
    cursors (django-debug-toolbar) build a wrapper of their own around ``wrapper.cursor``, from a
    subclass of this class and without calling our constructor, and drop ours unclosed. Closing
    theirs closes the same psycopg cursor, and that is what counts.
    """

    db: Any  # (the ENGINE's DatabaseWrapper, which imports this module)
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


class ReleasingCursorDebugWrapper(ReleaseOnCloseMixin, CursorDebugWrapper):
    pass
