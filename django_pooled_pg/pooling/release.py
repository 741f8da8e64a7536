"""Giving a connection back: the one place a borrowed connection returns to its pool.

The rule is that nothing is handed on dirty: a connection goes back rolled back, in autocommit,
with no cursor left open and its session reset, sent to the server as it goes back (without
reading what its borrower ran: :mod:`.session`, :mod:`.reset`); anything that cannot be cleaned
is closed, and the pool replaces it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple, Protocol

from psycopg.pq import ConnStatus, TransactionStatus

from .connection import PooledConnection
from .reset import reset

logger = logging.getLogger("django_pooled_pg")


class Pool(Protocol):
    """What a return needs of a pool: psycopg_pool's ``putconn()``."""

    def putconn(self, conn: Any) -> None: ...


class Outcome(NamedTuple):
    rolled_back: bool = False
    discarded: bool = False
    reset: bool = False


CLEAN = Outcome()
_OUTCOMES = {(r, s): Outcome(rolled_back=r, reset=s) for r in (False, True) for s in (False, True)}


def release_connection(pool: Pool, conn: PooledConnection) -> Outcome:
    """Return ``conn`` to ``pool`` clean, or closed if it cannot be cleaned."""
    outcome = prepare_return(pool, conn)
    pool.putconn(conn)
    return outcome


def prepare_return(pool: Pool, conn: PooledConnection) -> Outcome:
    """Make ``conn`` fit for its next borrower, or close it: everything
    :func:`release_connection` does short of handing it to the pool's queue (a borrower that
    keeps its connection for its next borrow, ``DatabaseWrapper._keep``, stops here).

    Roll back, close leftover cursors, autocommit back on, and the session reset for every
    connection that was borrowed, sent now and its answer read by the next borrower
    (:mod:`.reset`). One function, as it runs on every return."""
    if conn._pooled_pg_pending:
        return CLEAN  # already cleaned, its reset on the wire: nobody has used it since
    pgconn = conn.pgconn
    rolled_back = reset_sent = False
    try:
        status = pgconn.transaction_status
        if status == TransactionStatus.ACTIVE or status == TransactionStatus.UNKNOWN:
            # A command still running (COPY, a pipeline) or a lost connection: not worth saving.
            conn.close()
        else:
            if status != TransactionStatus.IDLE:
                rolled_back = True
                conn.rollback()
            if conn._pooled_pg_cursors:
                close_cursors(conn._pooled_pg_cursors)
            if not conn.autocommit:
                conn.autocommit = True
            # (changed but not used: a statement of the pool's own users, the statistics'
            # publisher's SET LOCAL, went through the tracking cursor; reset, or its next
            # borrower would find the connection marked as changed, and keep it to the end)
            if conn._pooled_pg_used or conn._pooled_pg_changed:
                if conn._pooled_pg_resets:
                    reset_sent = True
                    reset(conn)
                else:  # (OPTIONS["pool"]["session_reset"] False: handed on as it is)
                    conn._pooled_pg_used = conn._pooled_pg_changed = False
    except Exception as exc:
        logger.warning("discarding a connection that could not be cleaned: %s", exc)
        conn.close()
    conn._pooled_pg_returned_at = time.monotonic()
    if pgconn.status == ConnStatus.BAD:  # (conn.closed)
        check_soon = getattr(pool, "check_soon", None)
        if check_soon is not None:
            check_soon()  # its idle siblings may be as dead as it was
        return Outcome(rolled_back, discarded=True, reset=reset_sent)
    return _OUTCOMES[rolled_back, reset_sent]


def close_cursors(cursors: list[Any]) -> None:
    """Close what a borrower left open: an abandoned ``QuerySet.iterator()`` (its WITH HOLD
    cursor lives on the server until CLOSE)."""
    for cursor in cursors:
        if not cursor.closed:
            cursor.close()
    cursors.clear()
