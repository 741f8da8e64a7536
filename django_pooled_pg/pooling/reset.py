"""The session reset on the wire: sent with the next borrower's first statement.

Every returned connection is reset (:mod:`.session` says why and with what). Sent on its own,
the reset is a round trip of its own, a wake-up of the server's process more per request:
measured under ``make bench`` (gunicorn, 2 workers x 16 threads, 2 cores, the single lookup) it
cost the server 48 us of CPU per request more than Django's pool, which resets nothing. Carried
by the first statement, 20 us.

So a returned connection is only *marked*: its reset is due (:func:`mark_reset_due`), nothing
is sent. The next borrower's first statement carries it, in one write and one answer, with
libpq's pipeline mode: ``DISCARD ALL``, the statement, one Sync (:func:`_pipelined_gen`). The
server does both in one wake-up; nothing waits for the reset alone.

That is the first statement through a cursor in autocommit mode, the ORM's usual first
statement (:class:`ResetWithFirstStatement`, mixed into the pool's cursor classes). Whatever
else comes first on the connection (a statement inside ``atomic``, ``QuerySet.iterator()``'s
named cursor, ``executemany``, ``copy``, ``stream``, a psycopg ``pipeline()`` or
``transaction()``) resets it first, in a round trip of its own: the cursor mixin's other
overrides, :class:`ResetOnFirstCommand` in the pool's connection class, and
:class:`ResetWithFirstDeclare` in its named cursor classes (``SessionSetup`` sets psycopg's
``server_cursor_factory``, ``DatabaseWrapper.chunked_cursor()`` resets before Django makes its
own). A statement after the first pays one Python call and an attribute read (1.2k
instructions). (Swapping the classes in only while a reset is due was tried: a type that
changes twice per request defeats Python 3.11's specialised attribute lookups wherever the
connection is touched, +33k instructions on a request of three statements, callgrind.)

Only what bypasses psycopg's classes runs before the reset: libpq itself, called directly on
``connection.connection.pgconn``, or a cursor class instantiated directly rather than through
the connection's factories; its own use is still reset for the next borrower.

Sessions with a baseline (``connection_created`` receivers, ``configure``) reset with several
statements, which the extended protocol of a pipeline does not take in one string: theirs is
sent when the connection goes back and read by its next taker (:func:`.release.send_reset`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psycopg import OperationalError, capabilities
from psycopg.generators import execute, send
from psycopg.pq import ExecStatus, Format
from psycopg.waiting import Wait

from .session import RESET_SQL

if TYPE_CHECKING:
    from .connection import PooledConnection

#: The reset that can travel in a pipeline (one statement).
PIPELINED_RESET = RESET_SQL.encode()

#: Whether this libpq has pipeline mode (libpq 14 and newer).
HAS_PIPELINE = capabilities.has_pipeline()

#: The statuses of a reset that worked.
RESET_OK = (ExecStatus.COMMAND_OK, ExecStatus.TUPLES_OK)
_LAST = (ExecStatus.PIPELINE_SYNC, ExecStatus.COPY_IN, ExecStatus.COPY_OUT, ExecStatus.COPY_BOTH)
#: SQLSTATE of "cannot insert multiple commands into a prepared statement" (and of any syntax
#: error): the first statement goes again alone through the simple protocol, see _pipelined_gen.
_SYNTAX_ERROR = b"42601"


def can_pipeline(conn: PooledConnection) -> bool:
    """Whether ``conn``'s reset can wait for its next borrower's first statement: a reset of one
    statement (no baseline), a libpq with pipeline mode, and no ``reset`` callback of the user's
    (which psycopg_pool runs on return: ``_pooled_pg_pipelined``)."""
    return HAS_PIPELINE and conn._pooled_pg_pipelined and conn._pooled_pg_reset == PIPELINED_RESET


def mark_reset_due(conn: PooledConnection) -> None:
    """The connection goes back: its next borrower's first statement resets it first."""
    conn._pooled_pg_reset_due = True
    conn._pooled_pg_used = False
    conn._pooled_pg_changed = False


def reset_done(conn: Any) -> None:
    """A reset ran (here, or sent at return and read by ``Pool.finish_reset``)."""
    conn._pooled_pg_reset_due = False
    if conn.prepare_threshold is not None:
        # The reset (DISCARD ALL, or a baseline's DEALLOCATE ALL) deallocated psycopg's
        # prepared statements behind its back (with prepare_threshold None, Django's default,
        # psycopg never prepares any).
        conn._prepared.clear()


def _reset_gen(conn: Any) -> Any:
    """The reset alone, one round trip (psycopg's generator protocol: run by ``conn.wait()``).
    If it does not complete, the connection is closed: nobody gets that session again."""
    pgconn = conn.pgconn
    try:
        pgconn.send_query(PIPELINED_RESET)
        results = yield from execute(pgconn)
    except BaseException:
        conn.close()
        raise
    if not results or any(r.status not in RESET_OK for r in results):
        conn.close()
        raise OperationalError("the connection's session reset failed; it was closed")
    reset_done(conn)


def _reset_then(conn: Any, gen: Any) -> Any:
    yield from _reset_gen(conn)
    return (yield from gen)


def reset_now(conn: Any) -> None:
    """Make the due reset now, alone (a borrower that takes a connection to reset it itself,
    and the paths below that are not a cursor's plain ``execute()``)."""
    if conn._pooled_pg_reset_due:
        with conn.lock:
            conn.wait(_reset_gen(conn))


class ResetOnFirstCommand:
    """Mixed into the pool's connection class: while a reset is due, psycopg's own commands
    (the ``BEGIN`` of a statement inside ``atomic``, ``transaction()``, a named cursor's
    ``FETCH``) and its ``pipeline()`` reset first. Not on the path of a statement in autocommit
    mode, so a statement pays nothing for it."""

    _pooled_pg_reset_due: bool  # (declared in connection.PoolState)

    def _exec_command(self, command: Any, result_format: Any = Format.TEXT) -> Any:
        if self._pooled_pg_reset_due:
            return _reset_then(self, super()._exec_command(command, result_format))  # type: ignore[misc]
        return super()._exec_command(command, result_format)  # type: ignore[misc]

    def pipeline(self) -> Any:
        reset_now(self)
        return super().pipeline()  # type: ignore[misc]

    def _pipeline_nolock(self) -> Any:  # (executemany's; the caller holds the lock)
        if self._pooled_pg_reset_due:
            self.wait(_reset_gen(self))  # type: ignore[attr-defined]
        return super()._pipeline_nolock()  # type: ignore[misc]


class ResetWithFirstStatement:
    """Mixed into the pool's cursor classes: while the connection's reset is due, the first
    ``execute()`` in autocommit mode sends it with the statement (:func:`_pipelined_gen`); any
    other first use of the cursor (``executemany``, ``copy``, ``stream``) resets first. Per
    statement otherwise: one call and an attribute read. (Making the connection's cursors with
    this class only while a reset is due was tried: 27k instructions more on a request of three
    statements, callgrind; a cursor type that changes within a request defeats Python's
    specialised attribute lookups in psycopg's and Django's code that touches cursors.)"""

    __slots__ = ()

    def _execute_gen(
        self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: bool | None = None
    ) -> Any:
        conn = self._conn  # type: ignore[attr-defined]
        if conn._pooled_pg_reset_due:
            if conn.autocommit and conn._pipeline is None and not prepare and not binary:
                return _pipelined_gen(self, query, params, binary)
            return _reset_then(conn, super()._execute_gen(query, params, prepare=prepare, binary=binary))  # type: ignore[misc]
        return super()._execute_gen(query, params, prepare=prepare, binary=binary)  # type: ignore[misc]

    def executemany(self, *args: Any, **kwargs: Any) -> Any:
        reset_now(self._conn)  # type: ignore[attr-defined]
        return super().executemany(*args, **kwargs)  # type: ignore[misc]

    def copy(self, *args: Any, **kwargs: Any) -> Any:
        reset_now(self._conn)  # type: ignore[attr-defined]
        return super().copy(*args, **kwargs)  # type: ignore[misc]

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        reset_now(self._conn)  # type: ignore[attr-defined]
        return super().stream(*args, **kwargs)  # type: ignore[misc]


class ResetWithFirstDeclare:
    """Mixed into the pool's named (server-side) cursor classes: ``DECLARE`` resets first."""

    __slots__ = ()

    def _declare_gen(self, query: Any, params: Any = None, binary: bool | None = None) -> Any:
        conn = self._conn  # type: ignore[attr-defined]
        if conn._pooled_pg_reset_due:
            return _reset_then(conn, super()._declare_gen(query, params, binary))  # type: ignore[misc]
        return super()._declare_gen(query, params, binary)  # type: ignore[misc]


#: Classes made by with_mixins(), by (class, mixins).
_mixed_classes: dict[tuple[type, tuple[type, ...]], type] = {}


def with_mixins(cls: type, *mixins: type) -> type:
    """``cls`` with the ``mixins`` it lacks in front, made once per combination (the pool's
    cursor classes: :class:`ResetWithFirstStatement`, the tracking of ``release="transaction"``;
    its named cursor classes: :class:`ResetWithFirstDeclare`)."""
    mixed = _mixed_classes.get((cls, mixins))
    if mixed is None:
        bases = tuple(m for m in mixins if not issubclass(cls, m)) + (cls,)
        mixed = cls if len(bases) == 1 else type(cls.__name__, bases, {"__module__": mixins[0].__module__})
        _mixed_classes[(cls, mixins)] = mixed
    return mixed


def _answers(pgconn: Any) -> Any:
    """The results of the next query of a pipeline, up to the None that ends them; a Sync alone.

    psycopg's ``fetch_many()`` does this too, but lets go of the GIL around every libpq call
    (``PQisBusy``, ``PQconsumeInput``, ``PQnotifies``, ``PQgetResult``): three to four times per
    result, and a pipeline of three queries has five. Each time, under load, another thread of
    the worker may take the GIL and this one waits to get it back: ``make bench``'s single
    lookup counted 36 futex calls per request in the workers, 29.5 with Django's pool, whose
    statement has two results (``perf record -e syscalls:sys_enter_futex``). Here only
    ``PQisBusy`` lets go, once per query: libpq returns the None after a query's result
    without reading (its state is then ``PGASYNC_PIPELINE_IDLE``), and ``PQgetResult`` runs only
    when ``PQisBusy`` said it would not block. Notifications that came in stay queued in libpq
    and psycopg hands them on at its next read, as it does for those that arrive between
    statements.
    """
    results: list[Any] = []
    while True:
        while pgconn.is_busy():
            while not (yield Wait.R):
                continue
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            return results
        results.append(result)
        if result.status in _LAST:
            return results  # (a Sync is not followed by a None; COPY would never end)
        end = pgconn.get_result()  # (the None: not busy after a result in a pipeline)
        if end is None:
            return results
        results.append(end)


def _pipelined_gen(cur: Any, query: Any, params: Any, binary: bool | None) -> Any:
    """``Cursor._execute_gen()`` for the first statement of a borrow, in autocommit mode:
    ``DISCARD ALL``, the statement, one Sync, in one write; both answers in one read."""
    conn = cur._conn
    yield from cur._start_query(query)  # (in autocommit mode: no command of its own)
    pgq = cur._convert_query(query, params)  # (a bad parameter raises here: nothing sent, still due)
    pgconn = cur._pgconn
    pgconn.enter_pipeline_mode()
    try:
        pgconn.send_query_params(PIPELINED_RESET, None)
        cur._execute_send(pgq, force_extended=True, binary=binary)
        pgconn.pipeline_sync()
        if pgconn.flush():
            yield from send(pgconn)  # (the rest once the socket takes it)
        while not (yield Wait.R):  # (the server answers a pipeline at its Sync, all at once)
            continue
        pgconn.consume_input()
        reset = yield from _answers(pgconn)
        results = yield from _answers(pgconn)
        while not results or results[-1].status != ExecStatus.PIPELINE_SYNC:
            # Up to the Sync: an error of the implicit transaction's commit (a deferred foreign
            # key) comes after the statement's results, as in one simple query; it is the
            # statement's to raise.
            results += yield from _answers(pgconn)
        results.pop()  # (the Sync)
        pgconn.exit_pipeline_mode()
    except BaseException:
        conn.close()  # the reset may not have run: nobody gets this session again
        raise
    if not reset or reset[0].status not in RESET_OK:
        conn.close()
        raise OperationalError("the connection's session reset failed; it was closed")
    reset_done(conn)
    if (
        results
        and results[0].status == ExecStatus.FATAL_ERROR
        and results[0].error_field(
            0x43  # PG_DIAG_SQLSTATE ('C')
        )
        == _SYNTAX_ERROR
    ):
        # Several statements in one string, which only the simple protocol takes (or a syntax
        # error): nothing ran. The session is reset; the statement goes again the usual way.
        return (yield from cur._execute_gen(query, params, binary=binary))
    cur._check_results(results)
    cur._set_results(results)
    cur._last_query = query
    return None
