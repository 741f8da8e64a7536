"""The session reset on the wire: sent when a connection goes back, read when it is next taken.

Every returned connection is reset (:mod:`.session` says why and with what). The reset is sent
the moment the connection goes back (:func:`send_reset`), without waiting for its answer: the
server runs it at once, so whatever the borrower left on the server (a session advisory lock, a
temporary table, a ``LISTEN``) is gone within a round trip of the return, as with PgBouncer's
``server_reset_query``, and nobody waits for it. Whoever takes the connection next reads the
answer first (:func:`finish_reset`), by when it has long arrived; a reset that failed closes the
connection, and the pool replaces it.

Two kinds of connection reset in a round trip of their own at the return instead
(:func:`reset_session`): those with a ``reset`` callback of the user's, which psycopg_pool runs
on the return and which must find the session reset; and those on which psycopg prepares
statements (``prepare_threshold`` set): psycopg forgets its prepared statements when it sees the
``DISCARD ALL`` go through its own ``execute()``, and only then.

Only psycopg's public API: ``Connection.execute()``, ``Connection.lock`` and the ``pq`` calls.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from psycopg.pq import ExecStatus, TransactionStatus

from .wire import read_results, send

if TYPE_CHECKING:
    from .connection import PooledConnection

#: The statuses of a reset that worked.
RESET_OK = (ExecStatus.COMMAND_OK, ExecStatus.TUPLES_OK)
#: Seconds the socket may take to accept a reset (a few dozen bytes; only a silent network with
#: a full send buffer waits at all): then the connection is closed instead.
SEND_TIMEOUT = 1.0


def can_send(conn: PooledConnection) -> bool:
    """Whether ``conn``'s reset can go without waiting for its answer (see the module)."""
    return conn._pooled_pg_sends_reset and conn.prepare_threshold is None


def reset(conn: PooledConnection) -> None:
    """The reset of a connection that goes back: sent, or made, see the module. Raises if it
    could not be (the caller closes the connection)."""
    if can_send(conn):
        send_reset(conn)
    else:
        reset_session(conn)


def reset_session(conn: PooledConnection) -> None:
    """Bring the session back to its defaults and baseline (:func:`.session.reset_statement`),
    whatever its borrower did: one round trip, whose statement was made when the session was
    set up."""
    conn.execute(conn._pooled_pg_reset)
    conn._pooled_pg_used = False
    conn._pooled_pg_changed = False


def send_reset(conn: PooledConnection) -> None:
    """Send the reset and go: the server runs it now; the connection's next taker reads the
    answer (:func:`finish_reset`)."""
    with conn.lock:
        send(conn.pgconn, conn._pooled_pg_reset, time.monotonic() + SEND_TIMEOUT)
    conn._pooled_pg_pending = True
    conn._pooled_pg_used = False
    conn._pooled_pg_changed = False


def finish_reset(conn: PooledConnection, timeout: float) -> bool:
    """Read the answer of the reset sent when ``conn`` went back (normally there already: no
    wait). False, and the connection closed, if the reset failed or no answer came within
    ``timeout`` seconds."""
    conn._pooled_pg_pending = False
    pgconn = conn.pgconn
    try:
        with conn.lock:
            statuses = read_results(pgconn, time.monotonic() + timeout)
        ok = all(status in RESET_OK for status in statuses) and pgconn.transaction_status == TransactionStatus.IDLE
    except Exception:
        ok = False
    if not ok:
        conn.close()
    return ok
