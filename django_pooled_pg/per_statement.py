"""Per-statement release: a borrow that gives its connection back (parks it) after each
statement or outermost transaction, and takes it back, if nobody took it meanwhile, at the next.

It applies with ``release="transaction"``, and in request mode to code outside any request,
task or ``borrow()`` block (:func:`releases_per_statement`): there nothing else would give the
connection back before ``connection.close()``, and an executor thread would hold an idle
connection for its whole life while others wait. A statement that changed the session
(:class:`~django_pooled_pg.cursors.SessionTrackingMixin`), an open cursor or transaction, or a
``pinned()`` block keeps the connection.

:class:`PerStatementRelease` is a mixin of the ENGINE's ``DatabaseWrapper``
(:mod:`django_pooled_pg.base`), which owns the borrow (``_borrow``, ``_close()``); the states
of a parked borrow are :class:`django_pooled_pg.pooling.borrow.Borrow`'s.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import signals
from .cursors import ReleasingCursorDebugWrapper, ReleasingCursorWrapper
from .pooling.demand import DIP
from .pooling.ledger import current_view
from .pooling.pool import RECENT, Pool, expire_at

if TYPE_CHECKING:
    from django.db.backends.postgresql.base import DatabaseWrapper as _Base

    from .pooling.borrow import Borrow
else:
    _Base = object


def releases_per_statement(pool: Pool) -> bool:
    """Whether a borrow gives its connection back (parks it) after each statement or outermost
    transaction: with ``release="transaction"``, and in request mode outside a request, task or
    ``borrow()`` block (``current_view`` unset), where nothing would give it back before
    ``connection.close()``: an executor thread would hold an idle connection for its whole life
    while others wait."""
    return pool.settings.release == "transaction" or current_view.get() is None


class PerStatementRelease(_Base):
    """The per-statement release of the ENGINE's ``DatabaseWrapper``."""

    #: The wrapper's connection and current borrow, and how it gives its connection back: from
    #: base.py.
    connection: Any
    _borrow: Borrow | None
    if TYPE_CHECKING:

        def _close(self, keep: bool = True, parked: bool = False) -> None: ...

        def _send_returned(self, held: float, rolled_back: bool) -> None: ...

    #: Give back after each statement / outermost transaction (:func:`releases_per_statement`).
    _per_statement: bool
    #: The psycopg cursors of the current borrow whose wrapper is not closed yet (a set made per
    #: borrow), and explicit pins (``pinned()``).
    _open_cursors: set[Any]
    _pins: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Instance attributes with no default on the class, as the wrapper's own: read per
        # statement, and CPython 3.12 does not specialize the read of an instance attribute
        # that the class also holds (see pooling.connection.PoolState).
        self._per_statement = False
        self._open_cursors = frozenset()  # type: ignore[assignment]  # (a set per borrow)
        self._pins = 0

    def _release_per_statement(self, pool: Pool, conn: Any) -> None:
        """Decide whether this borrow gives its connection back after each statement or outermost
        transaction (:func:`releases_per_statement`), and give the connection the cursor class
        that goes with it. In request mode a borrow held for its request times its statements
        (what ``release="transaction"`` would hold of it: ``poolstats --advise``); one given
        back per statement does not, for each of its holds is a statement or a transaction
        (``Borrow.park`` counts all of it busy), and the timing would cost every statement of
        code outside requests about 4.5k instructions. A class a tool put on the connection
        (OpenTelemetry's psycopg instrumentation wraps the one it was opened with) stays."""
        per_statement = self._per_statement = releases_per_statement(pool)
        classes = pool.cursor_classes
        if classes is not None:
            factory = conn.cursor_factory
            if factory is classes[0] or factory is classes[1]:
                conn.cursor_factory = classes[per_statement]

    def _take_back_parked(self, borrow: Borrow) -> bool:
        """Resume the parked connection for the next statement: True if it was still free and
        alive; False (and a normal borrow follows) if not. Taken back within
        :data:`~django_pooled_pg.pooling.demand.DIP` of its park, by the same view, the hold
        goes on (the thread's statements in a row are one hold, as they are one use in the
        demand: counting each cost about 9k instructions a statement); else the parked hold
        ended at the park, and a new one starts (:meth:`_new_hold`)."""
        now = time.monotonic()
        conn = borrow.take_back(id(self), now)
        if conn is None:
            self._borrow = None  # not ours (fork, copy), or taken meanwhile
            return False
        self.connection = conn
        if not (
            now - conn._pooled_pg_returned_at < DIP
            and expire_at(conn) > now
            and current_view.get() is borrow.view
            and borrow.pool._parked_holds.pop(borrow, 0) is None  # (not counted by a reader: Borrow.end_hold)
        ) and not self._new_hold(borrow, conn, now):
            return False
        borrow.started = now
        self._open_cursors.clear()  # (the set of this connect())
        if signals.connection_borrowed.receivers:
            signals.connection_borrowed.send(sender=type(self), alias=self.alias, connection=self, wait=0.0)
        return True

    def _new_hold(self, borrow: Borrow, conn: Any, now: float) -> bool:
        """The parked connection taken back, not in a row with its last statement, is a new hold
        of the same borrow from ``now``: False, and the connection goes back, if it is past
        ``max_lifetime`` or found dead after a pause."""
        borrow.end_hold()
        if expire_at(conn) <= now:
            self._close(keep=False, parked=True)  # past max_lifetime: the pool replaces it
            return False
        if now - conn._pooled_pg_returned_at >= RECENT and not borrow.pool.usable(conn):
            borrow.pool.lost(conn)  # dead after a pause, as an idle connection can be
            self._close(keep=False, parked=True)
            return False
        view = current_view.get()
        if view is not borrow.view:  # (the same string all through a request)
            borrow.view = view
            borrow.stats = borrow.pool.stats.views.get(view) or borrow.pool.stats.view(view)
            # Parked outside a request and taken back in one (a test client's request after a
            # query): the request holds it, as its own borrow would.
            self._release_per_statement(borrow.pool, conn)
        borrow.new_hold(now)
        return True

    def _return_parked(self, borrow: Borrow) -> None:
        """The request, or the thread's work, is over: give the connection parked between
        statements back (reset, and kept for this thread's next borrow: :meth:`_close`) unless
        another borrower took it."""
        conn = borrow.take_back(id(self), time.monotonic())
        if conn is None:
            self._borrow = None
            return
        borrow.end_hold()  # (its return time is the park's until _close())
        self.connection = conn
        self._close(parked=True)

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
        conn, borrow = self.connection, self._borrow
        if (
            conn is None
            or borrow is None
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
        # has. If a borrower is waiting, it goes back to the pool for real instead.
        if not borrow.park():
            return self._close(keep=False)
        self.connection = None
        if signals.connection_returned.receivers:
            self._send_returned(conn._pooled_pg_returned_at - borrow.started, False)

    def _cursors_open(self) -> bool:
        """Whether a cursor of this borrow is still open. One that something else closed (a
        wrapper that closes the psycopg cursor itself) no longer counts."""
        open_cursors = self._open_cursors
        for cursor in [c for c in open_cursors if c.closed]:
            open_cursors.discard(cursor)
        return bool(open_cursors)
