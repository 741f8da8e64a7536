"""The pool's connection class: psycopg's (or ``OPTIONS["pool"]["connection_class"]``) with what
the pool keeps on each of its connections, declared once (:class:`PoolState`), and a
``connect()`` that reports to the pool's :class:`~.pool.ConnectionHealth`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from psycopg import Connection

from .session import RESET_SQL

#: The default reset, as ``send_query()`` takes it.
RESET_BYTES = RESET_SQL.encode()

if TYPE_CHECKING:
    from .attempts import ConnectionHealth
    from .budget import FleetBudget


class PoolState:
    """The per-connection state of the pool: a base of its connection class. The per-session
    values are set by ``session_setup.SessionSetup`` when the pool opens the connection; the
    defaults set here hold until then (a connection that was never set up is reset if used).

    Every one is an instance attribute, set in ``__init__``, and none has a default on the class:
    CPython 3.12 does not specialize reading or writing an instance attribute whose name the
    class also holds, so each such access took the generic lookup. The borrow path touches
    several per statement (about 2.7k instructions of a park and take-back's 18k).
    """

    #: Borrowed since its last reset: it goes back with one.
    _pooled_pg_used: bool
    #: A statement changed what the session's baseline set (release="transaction" pins then).
    _pooled_pg_changed: bool
    #: The reset: ``DISCARD ALL``, or the baseline's statements (bytes: what send_query() takes).
    _pooled_pg_reset: bytes
    #: Named cursors of the current borrow (a list once set up), closed when it goes back.
    _pooled_pg_cursors: Any
    #: The reset may be sent without waiting for its answer (:func:`.reset.can_send`): not with
    #: a ``reset`` callback of the user's, which psycopg_pool runs on return.
    _pooled_pg_sends_reset: bool
    #: Whether its session is reset when it goes back (OPTIONS["pool"]["session_reset"]).
    _pooled_pg_resets: bool
    #: A reset is on the wire, its answer not read yet (:func:`.reset.send_reset`).
    _pooled_pg_pending: bool
    #: When it last went back (``time.monotonic()``); 0.0 before its first borrow.
    _pooled_pg_returned_at: float
    #: When libpq opened it (``time.monotonic()``): since then a connection never borrowed yet
    #: has been idle.
    _pooled_pg_created_at: float
    #: The ``session_setup.SessionSetup`` that set the session up.
    _pooled_pg_setup: Any
    #: The type OIDs Django's backend registered on it (``session_setup.sync_postgres_types``).
    _pooled_pg_type_oids: Any
    #: Seconds of the current hold spent in statements and in transactions, which
    #: release="transaction" would hold too (``cursors.BusyTimingMixin`` adds them, in request mode): the rest
    #: of a hold is time it could give back (``poolstats --advise``).
    _pooled_pg_busy: float
    #: When the last statement ended leaving a transaction open (0.0: none open): until the
    #: next statement, the commit or the rollback the connection is busy in that transaction.
    _pooled_pg_tx_at: float

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # (psycopg's Connection: this class comes first)
        self._pooled_pg_used = True
        self._pooled_pg_changed = False
        self._pooled_pg_reset = RESET_BYTES
        self._pooled_pg_cursors = ()
        # (_pooled_pg_sends_reset and _pooled_pg_resets are the pool's: health_tracking's class
        # sets them.)
        self._pooled_pg_pending = False
        self._pooled_pg_returned_at = 0.0
        self._pooled_pg_created_at = 0.0
        self._pooled_pg_setup = None
        self._pooled_pg_type_oids = None
        self._pooled_pg_busy = 0.0
        self._pooled_pg_tx_at = 0.0

    def _pooled_pg_take_busy(self, now: float) -> float:
        """The busy seconds of the hold that ends at ``now`` (a transaction still open counts
        to ``now``), the count started again for the next. Read before the connection goes back
        to the pool: from then on the next borrower counts on it."""
        self._pooled_pg_tx_ended(now)
        busy, self._pooled_pg_busy = self._pooled_pg_busy, 0.0
        return busy

    def _pooled_pg_tx_ended(self, now: float | None = None) -> None:
        """The open transaction ended (a commit or rollback, or the hold ends at ``now``): the
        time since its last statement was busy."""
        if self._pooled_pg_tx_at:
            self._pooled_pg_busy += (time.monotonic() if now is None else now) - self._pooled_pg_tx_at
            self._pooled_pg_tx_at = 0.0


if TYPE_CHECKING:

    class PooledConnection(PoolState, Connection[Any]):
        """What the pool hands out, for the type checker (at run time: the class that
        :func:`health_tracking` makes)."""

else:
    PooledConnection = Connection


def health_tracking(
    base: type[Connection[Any]],
    health: ConnectionHealth,
    sends_reset: bool = True,
    budget: FleetBudget | None = None,
    resets: bool = True,
) -> type[Any]:
    """A subclass of ``base`` with the pool's state, whose ``connect()`` reports to ``health``
    (with the time libpq took to open the connection: the server's TCP/TLS handshake,
    authentication and start-up; not the budget's admission nor the session set-up after) and, with a fleet budget, lets the new connection in only if the budget has room for it
    (:meth:`.budget.FleetBudget.admit`: before the pool's ``configure`` and Django's
    ``connection_created`` run on it). psycopg_pool opens every connection through
    ``connection_class.connect``."""

    class HealthTrackingConnection(PoolState, base):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pooled_pg_sends_reset = sends_reset
            self._pooled_pg_resets = resets

        @classmethod
        def connect(cls, *args: Any, **kwargs: Any) -> Any:
            if budget is None:
                return cls._connect_tracked(*args, **kwargs)
            return budget.connect(lambda: cls._connect_tracked(*args, **kwargs))

        def commit(self) -> None:
            super().commit()
            self._pooled_pg_tx_ended()

        def rollback(self) -> None:
            super().rollback()
            self._pooled_pg_tx_ended()

        @classmethod
        def _connect_tracked(cls, *args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                conn = super().connect(*args, **kwargs)
            except Exception as exc:
                health.failed(exc)
                raise
            conn._pooled_pg_created_at = now = time.monotonic()
            health.succeeded(now - started)
            return conn

    HealthTrackingConnection.__qualname__ = f"HealthTracking{base.__name__}"
    return HealthTrackingConnection
