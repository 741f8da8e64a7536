"""The pool of one alias: psycopg_pool's ``ConnectionPool`` plus what a borrower needs to fail
well, which psycopg_pool alone cannot tell.

When every connection is busy, psycopg_pool waits out the whole ``timeout`` and raises
``PoolTimeout``. When the *server* is down it does the same, and the reason (connection refused,
bad password) only reaches its log. :class:`Pool` remembers the outcome of its last connection
attempt (:class:`ConnectionHealth`), so a borrower facing a failing server gives up within a
connect attempt's time with :class:`~django_pooled_pg.errors.DatabaseUnavailable` naming the
cause, and a borrower facing a busy pool gets
:class:`~django_pooled_pg.errors.PoolExhausted` with the pool's state.

A borrow is psycopg_pool's public ``getconn()`` and its own queue, a return its public
``putconn()``. This module is the seam to psycopg_pool: the few internals the package uses for
what the public API cannot do (parking, the reset on the wire, probing, the fleet budget) are
used here and nowhere else, and listed with their reasons in :data:`PSYCOPG_POOL_INTERNALS`,
which ``tests/test_seam.py`` compares with the installed psycopg_pool (and the rest of the
suite exercises). ``pyproject.toml`` pins the psycopg_pool releases that were tested.
"""

from __future__ import annotations

import logging
import operator
import select
import threading
import time
import weakref
from typing import Any

from psycopg import Connection, OperationalError
from psycopg.pq import ExecStatus, TransactionStatus
from psycopg_pool import ConnectionPool, PoolTimeout, TooManyRequests

from ..errors import BudgetExhausted, DatabaseUnavailable, PoolError, PoolExhausted
from ..settings import PoolSettings
from .attempts import ConnectionHealth
from .autosize import LOOK_EVERY as SIZE_EVERY
from .autosize import PRESSED_EVERY, AutoSize
from .budget import LOOK_EVERY, BudgetRefused, FleetBudget
from .connection import PooledConnection, health_tracking
from .demand import DIP, Demand
from .ledger import Borrow, ledger
from .release import release_connection
from .reset import finish_reset as read_reset
from .reset import reset
from .wire import read_results, send

logger = logging.getLogger("django_pooled_pg")

#: A connection given back less than this many seconds ago is handed out unchecked.
RECENT = 0.05
#: While the server is failing, a process's borrowers try a connection of their own at most this
#: often (:meth:`Pool.probe`).
PROBE_EVERY = 0.5

#: psycopg_pool's internals this module relies on, with the parameters it calls them with
#: (methods) or None (attributes), and why: each gives a capability its public API
#: (``getconn()``, ``putconn()``, ``get_stats()``, ``check()``, ``connection_class``...) lacks.
#: Borrows and returns go through the public ``getconn()``/``putconn()`` and psycopg_pool's own
#: queue; a rewrite of the queue that skipped its wrappers saved 2.5% of a request's
#: instructions, under the 5% a private name must buy.
PSYCOPG_POOL_INTERNALS: dict[str, tuple[str, ...] | None] = {
    # Parking (release="transaction"): a connection is never parked while someone waits (park()
    # reads the queue, and a borrower that queues looks for a parked connection, under the lock
    # where it decides to wait), and a taker takes a parked connection rather than wait. No
    # public hook is called there. (A waiter is handed a connection with its public set().)
    "_lock": None,
    "_waiting": None,  # (also: the waiters of timed-out wait slices taken out of the queue)
    "_get_ready_connection": ("timeout",),
    # A connection goes back with its session reset on the wire (.reset), read by its next
    # taker: psycopg_pool's putconn() would close it as busy (ACTIVE).
    "_reset_connection": ("conn",),
    # The pool's size, which probe(), the fleet budget and look() change by hand (a connection
    # opened by a probe, or given back to the fleet, counts against max_size).
    "_nconns": None,
    # probe(): one bounded connection attempt made the way psycopg_pool makes them (configure
    # callback, expiry, the mark putconn() checks) while its own attempts are in back-off.
    "_connect": ("timeout",),
    # The fleet budget (OPTIONS["pool"]["fleet_max_size"]): a refused attempt is given up (not
    # retried with back-off), and none is started while the budget refuses.
    "_add_connection": ("attempt", "growing"),
    "_maybe_grow_pool": (),
    "_growing": None,
    # A healthy connection that psycopg_pool closes while open (max_lifetime, max_idle, drain)
    # was recycled; psycopg_pool counts no such thing.
    "_close_connection": ("conn",),
}
#: The attribute psycopg_pool sets on each connection it opens: when its ``max_lifetime`` ends
#: (``time.monotonic()``). It is set after the ``configure`` callback and the connection
#: class's ``connect()`` ran, so no hook of ours can copy it, and it is read on every borrow
#: (the 11th private name, with the 10 above).
EXPIRE_AT = "_expire_at"
#: ``expire_at(conn)``: when ``conn``'s ``max_lifetime`` ends (``time.monotonic()``); past it,
#: ``putconn()`` replaces it. (A C accessor: a borrow and, with release="transaction", every
#: statement ask, and a method call cost 1.5k instructions more per request of three.)
expire_at = operator.attrgetter(EXPIRE_AT)
#: The measure of psycopg_pool's ``get_stats()`` that parked connections are added to: free to
#: take, for every reader (psycopg_pool's documented statistics).
POOL_AVAILABLE = "pool_available"


class Pool(ConnectionPool[PooledConnection]):
    """A ``ConnectionPool`` for one alias, with its settings and connection health."""

    def __init__(self, alias: str, settings: PoolSettings, *, connect_timeout: float, **kwargs: Any):
        self.alias = alias
        self.settings = settings
        self.stats = ledger.stats_for(alias)
        #: Connections in use over time (counted by the borrows' transitions), for sizing.
        self.demand = Demand(self.stats)
        self.health = ConnectionHealth(self.stats)
        #: How long a borrower waits while the server is failing: one connect attempt.
        self.fail_fast_timeout = max(1.0, connect_timeout)
        self._checking = threading.Lock()
        self._probing = threading.Lock()
        self._probed_at = 0.0
        #: Slots whose connection a probe opened while every slot was one of psycopg_pool's
        #: attempts: that many attempts open nothing when their turn comes (_add_connection).
        self._claimed = 0
        #: Connections this pool opened (_connect) and psycopg_pool attempts running now: what
        #: tells a probe whether a slot waits for an attempt that has yet to start (probe()).
        self._made: weakref.WeakSet[PooledConnection] = weakref.WeakSet()
        self._attempting = 0
        #: Connections parked between statements or kept for their borrower's next borrow, by the
        #: borrow record they were parked under, oldest first. Keyed by the record, not the
        #: connection: a connection another borrower took and parked again is under that
        #: borrower's record, so the first one's :meth:`unpark` cannot find it.
        self._parked: dict[Borrow, PooledConnection] = {}
        #: Borrows parked between statements whose hold is not counted yet: it ended at the park
        #: unless their thread's next statement takes the connection back within DIP (then it
        #: goes on). Whoever takes a borrow out of here counts its hold (Borrow.end_hold): the
        #: value is None, so ``pop(borrow, 0) is None`` says whether this pop took it.
        self._parked_holds: dict[Borrow, None] = {}
        #: Whether a borrower may keep its connection for its next borrow (DatabaseWrapper._keep):
        #: not with a ``reset`` callback of the user's, which psycopg_pool runs in ``putconn()``.
        self.can_keep = self._keeps = kwargs.get("reset") is None
        #: The ``check`` callback of OPTIONS["pool"], or None: run by our getconn(), after the
        #: reset a connection went back with is read (psycopg_pool would run it before), so it
        #: is not passed on. The ``reset`` callback is psycopg_pool's to run in putconn().
        self._user_check = kwargs.pop("check", None)
        self._user_reset = kwargs.get("reset")
        #: Connections to close as they come back, per reason: the fleet budget's last look
        #: asked them back, or max_size="auto" made max_size smaller. Each is what its reason's
        #: last decision found above its size; both count from the same connections, so one
        #: closed serves both, and ``_shrink``, the larger (read on every return), is how many
        #: still to close.
        self._shed_budget = self._shed_size = self._shrink = 0
        #: The fleet's connection budget (OPTIONS["pool"]["fleet_max_size"]), or None.
        size = settings.fleet_max_size
        self.budget = None if size is None else FleetBudget.for_params(alias, size, kwargs.get("kwargs") or {})
        if self.budget is not None:
            self.budget.held = lambda: self._nconns
        #: The pool's upkeep thread (:meth:`_upkeep`), and what stops it when the pool closes.
        self._upkeeping: threading.Thread | None = None
        #: A getconn() timed out since the queue was last cleared of such waiters (_leave_queue).
        self._timed_out = False
        #: The thread ident of the fleet budget's look while it takes a connection (look()),
        #: which must never queue; 0 otherwise.
        self._looker = 0
        self._closing = threading.Event()
        #: Set first thing in close(): park() reads it (psycopg_pool's ``closed`` is a property,
        #: a call read twice per statement given back).
        self._shut = False
        #: Wakes the upkeep thread before its time: the pool closes, or a borrower queued at
        #: max_size with max_size="auto" (the sizer looks at once: AutoSize.pressed).
        self._wake = threading.Event()
        self._released_at = time.monotonic()
        #: The connections' cursor classes for a borrow held for its request and for one given
        #: back per statement, in that order, when they differ (request mode: the first times
        #: statements); None: the class the connections were opened with serves both.
        self.cursor_classes: tuple[type, type] | None = None
        #: max_size="auto": what resizes the pool from its measured queueing, else None.
        self.sizer = AutoSize(self, settings.max_size_limit) if settings.auto_size else None
        kwargs["connection_class"] = health_tracking(
            kwargs.get("connection_class", Connection),
            self.health,
            sends_reset=self.can_keep,
            budget=self.budget,
            resets=settings.session_reset,
        )
        super().__init__(**kwargs)

    # ----- Resets sent on return (.reset) --------------------------------------------------------

    def finish_reset(self, conn: PooledConnection) -> bool:
        """Read the answer of the reset ``conn`` went back with; False, and the connection
        closed, if it failed or took longer than ``fail_fast_timeout``."""
        return read_reset(conn, self.fail_fast_timeout)

    def user_check(self, conn: PooledConnection) -> bool:
        """Whether ``conn`` passes the ``check`` callback of OPTIONS["pool"], if there is one
        (psycopg_pool runs it in ``getconn()``; a connection taken back without it, here)."""
        if self._user_check is None:
            return True
        try:
            self._user_check(conn)
        except Exception:
            return False
        return True

    def _reset_connection(self, conn: PooledConnection) -> None:
        if conn._pooled_pg_pending:
            return  # clean, with its reset on the wire: psycopg_pool would close it as busy
        super()._reset_connection(conn)

    def borrow(self) -> PooledConnection:
        """A connection, or :class:`PoolExhausted` / :class:`DatabaseUnavailable`."""
        # Wait in slices of one connect attempt, so that a server that starts failing while we
        # wait (a fresh pool, a restart) fails this borrower now rather than at the timeout.
        deadline = time.monotonic() + self.timeout
        budget = self.budget
        # With a budget, wait in short slices: a process refused its share answers 503 at once.
        wait_slice = self.fail_fast_timeout if budget is None else LOOK_EVERY
        try:
            while True:
                remaining = deadline - time.monotonic()
                if self.health.failing and self.probe():
                    continue  # the server is back: the probe's connection is in the pool
                try:
                    conn = self.getconn(min(remaining, wait_slice))
                except PoolTimeout:
                    # A process without a share fails at once; one that timed out below its
                    # max_size was held back by the budget (it grows whenever borrowers wait).
                    if (
                        budget is not None
                        and not self.health.failing
                        and (
                            (not self._nconns and budget.refused_recently())
                            or (remaining <= wait_slice and self._nconns < self.max_size)
                        )
                    ):
                        self._leave_queue()
                        raise self.budget_error() from None
                    if self.health.failing or remaining <= wait_slice:
                        self._leave_queue()
                        raise
                    continue
                if self.usable(conn) and self._clean(conn):
                    return conn
                # Dead (a server restart, pg_terminate_backend): drop it and take the next one
                # at once. psycopg_pool's own check backs off between failures, which is how 8
                # dead idle connections made a borrower wait out a 30 s timeout.
                self.lost(conn)
                self.putconn(conn)
        except TooManyRequests as exc:
            raise PoolExhausted(
                f"pool of database {self.alias!r} is exhausted: {self.max_waiting} borrowers "
                f"already waiting (max_waiting). {self.describe()}",
                alias=self.alias,
                state=self.describe(),
            ) from exc
        except PoolTimeout as exc:
            raise self.timeout_error(self.timeout - max(0.0, deadline - time.monotonic())) from exc

    def getconn(self, timeout: float | None = None) -> PooledConnection:
        """psycopg_pool's ``getconn()``, then: the answer of the reset the connection went back
        with is read, and the ``check`` callback of OPTIONS["pool"] runs on it (psycopg_pool
        would run the check before: on a connection whose reset answer is still unread). A
        connection that fails the check is dropped and the next one taken at once, as
        :meth:`borrow` drops a dead one. A wait that times out leaves the queue at the next
        getconn() (:meth:`_leave_queue`)."""
        if timeout is None:
            timeout = self.timeout
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = super().getconn(deadline - time.monotonic())
            except PoolTimeout:
                if self._looker != threading.get_ident():  # (the look queued no waiter)
                    self._timed_out = True  # (its waiter leaves the queue: _leave_queue())
                raise
            if conn._pooled_pg_pending:
                self.finish_reset(conn)  # closed if the reset failed: the check or usable() drop it
            if self._user_check is None or self.user_check(conn):
                return conn
            self.lost(conn)
            self.putconn(conn)

    def _leave_queue(self) -> None:
        """Take the waiters whose wait timed out out of psycopg_pool's queue: under the lock, at
        the next getconn() (:meth:`_get_ready_connection`, just before it may queue a waiter
        anew) or when :meth:`borrow` gives up.

        psycopg_pool leaves a timed-out waiter in the queue until a connection comes back and
        skips it then. :meth:`borrow` waits in slices, each queueing a waiter: without this, one
        waiting thread counted as two, three... against ``requests_waiting`` and
        ``max_waiting``, and borrowers were refused ("N requests waiting") while nobody else
        waited. A waiter whose wait timed out has its ``error`` set (under the pool's lock,
        where connections are handed over) and is never handed anything again; it is set
        before ``_timed_out``, which is cleared here before the queue is read."""
        with self._lock:
            self._timed_out = False
            gone = [waiter for waiter in self._waiting if waiter.error is not None]
            for waiter in gone:
                self._waiting.remove(waiter)

    def _clean(self, conn: PooledConnection) -> bool:
        """A connection taken from a parked borrower (release="transaction") carries that
        borrower's session: reset it before anyone else uses it (one round trip, bounded by
        ``fail_fast_timeout``). Connections from the pool's queue had their reset sent when they
        went back, and pass at the cost of an attribute read."""
        if not conn._pooled_pg_used or not conn._pooled_pg_resets:
            return True
        try:
            reset(conn)  # (sent, or made at once: .reset.can_send)
        except Exception:
            return False  # dropped below, like a dead one
        return not conn._pooled_pg_pending or self.finish_reset(conn)

    def usable(self, conn: PooledConnection) -> bool:
        """Whether an idle connection still works, without a round trip when possible.

        An idle connection has nothing to read, so a readable socket means the server ended the
        session (a restart or ``pg_terminate_backend`` send a message first) or dropped the
        socket: a non-blocking ``poll()`` (about 1 us) tells. A round trip (``ping_after``) is
        made only for a connection idle longer than ``ping_after`` seconds, which catches a
        network that silently dropped it; under load connections are never idle that long.
        """
        if conn.closed:
            return False
        returned_at = conn._pooled_pg_returned_at
        if time.monotonic() - returned_at < RECENT:
            return True  # under load: it worked a moment ago, skip even the poll
        readable = False
        try:
            poller = select.poll()
            poller.register(conn.pgconn.socket, select.POLLIN)
            readable = bool(poller.poll(0))
        except (OSError, ValueError):
            readable = True
        ping_after = self.settings.ping_after
        if not readable:
            # A connection never borrowed yet has been idle since it was opened.
            used_at = returned_at or conn._pooled_pg_created_at
            if ping_after is None or time.monotonic() - used_at < ping_after:
                return True
        return self.ping(conn)

    def ping(self, conn: PooledConnection) -> bool:
        """One round trip on an idle connection, bounded by ``fail_fast_timeout``; closes it
        and returns False when it fails or gets no answer in time.

        ``conn.execute("")`` would wait forever on a silent network (libpq has no read timeout),
        in a borrower or in the pool's background check.
        """
        pgconn = conn.pgconn
        deadline = time.monotonic() + self.fail_fast_timeout
        try:
            with conn.lock:
                if pgconn.transaction_status != TransactionStatus.IDLE:
                    return False
                send(pgconn, b"", deadline)
                if all(status == ExecStatus.EMPTY_QUERY for status in read_results(pgconn, deadline)):
                    return True
        except Exception:
            pass
        conn.close()
        return False

    def check_connection(self, conn: PooledConnection) -> None:  # type: ignore[override]
        """Used by psycopg_pool's ``check()`` (our ``check_soon()``): the bounded ping."""
        if conn._pooled_pg_pending and not self.finish_reset(conn):
            raise OperationalError("the connection's session reset failed")
        if not self.ping(conn):
            raise OperationalError("the connection did not answer a ping")

    def probe(self) -> bool:
        """While the server is failing, a borrower tries one connection itself, at most one per
        process every :data:`PROBE_EVERY` seconds, and adds it to the pool if it works.

        psycopg_pool retries a failing server with a growing back-off (1, 2, 4, 8... s), so a
        server down for 10 s was noticed back up to 8 s late; with this, by the first request
        after it is back. When the pool is at ``max_size`` (with ``min_size == max_size`` and
        traffic during an outage, every slot is an attempt in back-off), the probe's connection
        takes the slot of the next attempt, which then opens nothing: the pool never holds more
        than ``max_size`` connections. With every slot holding a connection or a running
        attempt (the failure was stale), the probe's connection is closed.
        """
        now = time.monotonic()
        if self.closed or now - self._probed_at < PROBE_EVERY or not self._probing.acquire(blocking=False):
            return False
        try:
            self._probed_at = now
            try:
                conn = self._connect(timeout=self.fail_fast_timeout)
            except (Exception, BudgetRefused):
                return False
            with self._lock:
                if self._nconns < self.max_size:
                    self._nconns += 1
                    added = True
                else:
                    added = self._slots_awaiting_attempts(conn) > self._claimed
                    self._claimed += added
            if not added:
                conn.close()
                return False
            # psycopg_pool's _connect() marked it as the pool's: it joins the idle connections,
            # or goes to the first waiter, as a returned one does.
            self.putconn(conn)
            return True
        finally:
            self._probing.release()

    def _slots_awaiting_attempts(self, probed: PooledConnection) -> int:
        """Slots of the pool (under ``self._lock``) whose connection is to come from an attempt
        of psycopg_pool's that has not started: one in back-off after a failure, or queued to
        replace a connection closed or found broken. Each will call :meth:`_add_connection`, so
        each can take a probe's connection instead. Neither a running attempt (it may succeed)
        nor a stale failure (every slot holds a connection) can: a claim then would leave the
        pool one connection above ``max_size``, for good.

        A slot holds an open connection, or a closed one that goes back for a replacement, or an
        attempt: started (counted in :meth:`_add_connection`) or to come. A connection closed
        and not yet back is counted as to come: its return queues that attempt."""
        return self._nconns - self._open_made(probed) - self._attempting

    def _open_made(self, probed: PooledConnection | None = None) -> int:
        """Open connections this pool made (under ``self._lock``), ``probed`` left out."""
        return sum(1 for conn in list(self._made) if conn is not probed and not conn.closed)

    def _connect(self, timeout: float | None = None) -> PooledConnection:
        conn = super()._connect(timeout)
        self._made.add(conn)
        return conn

    # ----- Parking (release="transaction") ----------------------------------------------------

    def park(self, conn: PooledConnection, borrow: Borrow, now: float) -> bool:
        """Keep a clean connection out of the pool but free for anyone to take, instead of
        giving it back after a statement; False when it must go back now (a borrower is waiting,
        the pool shrinks or is closed).

        Parking is what makes per-statement release cheap. A borrower that runs statement after
        statement takes its own connection back with :meth:`unpark` (a dict pop, not a
        ``getconn()`` + ``putconn()`` and Django's per-borrow set-up); a borrower that finds no
        idle connection takes the longest-parked one (:meth:`_get_ready_connection`), so a
        connection whose borrower is busy elsewhere (waiting on another service) still serves
        others.

        A connection is never parked while someone waits for one, without the pool's lock (the
        lock cost about 5k instructions per statement: Python 3.12's ``RLock`` parses its
        arguments on every acquire). The connection is put in ``_parked`` first, and the queue
        read after: a borrower that queued before that read is seen by it, and the connection
        goes back to the pool for it; one that queues after it looks in ``_parked`` again once
        queued (:meth:`_maybe_grow_pool`) and takes it. Of the two, a ``dict.pop`` decides
        which one has it.
        """
        if self._waiting or self._shrink or self._shut:
            return False
        # Out of use (the demand's count) before anyone may take it, which a taker counts after
        # it took it: the count never exceeds the connections in use. (Demand.down(now), written
        # out: for every statement; the borrow keeps the event for a take-back that finds it
        # last: demand.DIP)
        borrow.down = down = -now
        self.demand.events.append(down)
        parked = self._parked
        parked[borrow] = conn
        if self._waiting or self._shrink or self._shut:  # (since the first read: see above)
            if parked.pop(borrow, None) is conn:
                self.demand.events.append(now)  # in use again: the caller gives it back
                return False
            # (taken meanwhile, by the borrower that queued or by close(): parked and taken)
        return True

    def unpark(self, conn: PooledConnection, borrow: Borrow) -> bool:
        """Take back a connection parked by :meth:`park` under ``borrow``; False if someone else
        has taken it (and perhaps parked it again since, under a borrow of theirs).

        No lock: a ``dict.pop`` is atomic, so of the borrower and a taker
        (:meth:`_get_ready_connection`, :meth:`release_parked`, :meth:`close`) exactly one gets
        the connection. This runs before every statement with ``release="transaction"``, and the
        lock is the one getconn() and putconn() take too."""
        return self._parked.pop(borrow, None) is conn

    def parked_under(self, conn: PooledConnection) -> Borrow | None:
        """The borrow record ``conn`` is parked under, if it is parked (for tests and reports)."""
        return next((borrow for borrow, parked in list(self._parked.items()) if parked is conn), None)

    def _take_parked(self, borrow: Borrow) -> PooledConnection | None:
        conn = self._parked.pop(borrow, None)  # None: its borrower took it back first
        if conn is not None:
            borrow.end_hold()  # (nobody goes on with it now)
        return conn

    def count_parked_holds(self) -> None:
        """For a reader of the statistics: count the holds of the connections parked DIP or more
        ago, which ended at their park (their holder's next statement starts a new one), so that
        a connection parked by a thread that stopped querying is not counted as a hold going on."""
        now = time.monotonic()
        for borrow in list(self._parked_holds):
            if now - borrow.conn._pooled_pg_returned_at >= DIP:
                borrow.end_hold()

    def release_parked(self, older_than: float = 0.0) -> int:
        """Give connections parked longer than ``older_than`` seconds back to the pool, where
        psycopg_pool's upkeep (``max_idle``, ``max_lifetime``, checks) reaches them again."""
        now = time.monotonic()
        with self._lock:
            old = [b for b, c in list(self._parked.items()) if now - c._pooled_pg_returned_at >= older_than]
        released = 0
        for borrow in old:
            conn = self._take_parked(borrow)
            if conn is not None:
                ledger.discard(borrow)
                release_connection(self, conn)
                released += 1
        return released

    def _get_ready_connection(self, timeout: float | None) -> PooledConnection | None:
        # Called by getconn() under self._lock, where it decides whether the borrower waits:
        # an idle connection first (a parked one's borrower is likely to want it back), else the
        # longest-parked one (its borrower is most likely busy elsewhere) rather than wait, or
        # be refused for max_waiting, which psycopg_pool checks before it finds no idle one.
        if self._timed_out:
            self._leave_queue()  # (a borrower's next wait slice takes its old place)
        if self._parked and self.max_waiting and len(self._waiting) >= self.max_waiting:
            conn = self._take_longest_parked()
            if conn is not None:
                return conn
        conn = super()._get_ready_connection(timeout)
        if conn is None and self._parked:
            conn = self._take_longest_parked()
        if conn is None and self._looker == threading.get_ident():
            raise PoolTimeout("every connection is in use: the fleet budget's look skips its turn")
        return conn

    def _take_longest_parked(self) -> PooledConnection | None:
        while self._parked:
            try:
                conn = self._take_parked(next(iter(self._parked)))
            except (StopIteration, RuntimeError):  # emptied or changed by a borrower meanwhile
                continue
            if conn is not None:
                self.stats.parked_taken += 1
                return conn
        return None

    def _hand_parked(self) -> bool:
        """Under the lock, with borrowers queued: give the longest-parked connection to the first
        of them that still waits (the one that just queued does); False if none was parked."""
        conn = self._take_longest_parked()
        if conn is None:
            return False
        while self._waiting:
            if self._waiting.popleft().set(conn):
                return True
        # (Every waiter's wait ended: called by resize_max() or check(), not by a getconn()
        # that just queued one.) Back to the pool, outside this lock.
        threading.Thread(target=release_connection, args=(self, conn), daemon=True).start()
        return True

    def get_stats(self) -> dict[str, int]:
        return self._with_parked(super().get_stats())

    def pop_stats(self) -> dict[str, int]:
        return self._with_parked(super().pop_stats())

    def _with_parked(self, stats: dict[str, int]) -> dict[str, int]:
        # Parked connections are free to take: available, for every reader of the statistics.
        stats[POOL_AVAILABLE] = stats.get(POOL_AVAILABLE, 0) + len(self._parked)
        return stats

    def close(self, timeout: float = 5.0) -> None:
        self._shut = True  # (no park from now on: park())
        self._closing.set()
        self._wake.set()
        super().close(timeout)
        with self._lock:
            parked, self._parked = self._parked, {}
        for borrow in list(parked):
            conn = parked.pop(borrow, None)
            if conn is not None:
                borrow.end_hold()
                self._close_connection(conn)

    def budget_error(self) -> BudgetExhausted:
        assert self.budget is not None
        size, (total, processes) = self.budget.size, self.budget.seen
        return BudgetExhausted(
            f"no connection for database {self.alias!r}: the fleet budget (fleet_max_size={size}) is "
            f"used up ({total} connections of {processes} processes seen) and this process holds "
            f"{self._nconns}. {self.describe()}",
            alias=self.alias,
            state=self.describe(),
        )

    def timeout_error(self, waited: float) -> PoolError:
        state = self.describe()
        if self.health.failing:
            cause = self.health.last_error
            hint = ""
            if "unsupported startup parameter" in str(cause):
                hint = ' (behind PgBouncer? set OPTIONS["pool"]["behind_pgbouncer"] = True: see the docs, Deployment, PgBouncer)'
            error: PoolError = DatabaseUnavailable(
                f"database {self.alias!r} is unavailable: {str(cause).strip()}{hint}",
                alias=self.alias,
                state=state,
            )
            error.__cause__ = cause
            return error
        return PoolExhausted(
            f"no connection to database {self.alias!r} within {waited:g}s: all {self.max_size} in use. {state}",
            alias=self.alias,
            state=state,
        )

    def describe(self) -> str:
        """The pool's state in one line, for logs and errors."""
        stats = self.get_stats()
        size, idle = stats.get("pool_size", 0), stats.get("pool_available", 0)
        return (
            f"pool {self.alias!r}: size {size}/{self.max_size}, idle {idle}, in use {size - idle}, "
            f"waiting {stats.get('requests_waiting', 0)}, timeout {self.timeout:g}s"
        )

    # ----- The fleet budget (OPTIONS["pool"]["fleet_max_size"], see .budget) ---------------------

    def _add_connection(self, attempt: Any = None, growing: bool = False) -> None:
        # psycopg_pool's attempt to open a connection (a maintenance task): a refusal by the
        # budget gives the attempt up (no retry: the next borrower that finds no connection
        # tries again, after the budget's back-off) and frees its place in max_size.
        with self._lock:
            if self._claimed > 0:
                self._claimed -= 1  # a probe opened this slot's connection (probe())
                if growing:
                    self._growing = False
                return
            self._attempting += 1
        try:
            super()._add_connection(attempt, growing=growing)
        except BudgetRefused as refused:
            with self._lock:
                self._nconns -= 1
                if growing:
                    self._growing = False
            assert self.budget is not None
            self.budget.refused_at = time.monotonic()
            self.stats.budget_refused += 1
            logger.warning("pool %r: %s; its borrowers get 503 until a share frees", self.alias, refused)
        finally:
            with self._lock:
                self._attempting -= 1

    def _maybe_grow_pool(self) -> None:
        # Called under the lock by getconn() when no connection is free, once the borrower has
        # queued: first, a connection parked since it looked (park() takes no lock) is handed
        # to the queue. No new attempt while the budget refused one a moment ago, or would (each
        # costs the server a backend start). With max_size="auto", a borrower that finds every
        # connection of the pool's size open and in use wakes the sizer (not one that waits for
        # a connection being opened).
        if self._parked and self._waiting and self._hand_parked():
            return
        if (
            self.sizer is not None
            and self._nconns >= self.max_size
            and self._open_made() >= self._nconns
            and self.sizer.pressed()
        ):
            self._wake.set()
        if self.budget is not None and (self.budget.refused_recently() or self.budget.tight()):
            return
        super()._maybe_grow_pool()

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        super().open(wait, timeout)
        if self._upkeeping is None and not self.closed:
            # (A weak reference, as psycopg_pool's workers hold: a pool dropped unclosed is
            # collected, and its thread ends.)
            self._upkeeping = threading.Thread(
                target=_upkeep_loop,
                args=(weakref.ref(self), self._closing, self._wake),
                name=f"pool-upkeep-{self.alias}",
                daemon=True,
            )
            self._upkeeping.start()

    @property
    def upkeep_every(self) -> float:
        """How often :meth:`upkeep` runs (seconds)."""
        every = self.max_idle if self.budget is None else min(LOOK_EVERY, self.max_idle)
        return every if self.sizer is None else min(every, SIZE_EVERY)

    def look_at_size(self) -> None:
        """With ``max_size="auto"``, let the sizer look (:meth:`.autosize.AutoSize.look`)."""
        if self.sizer is not None:
            try:
                self.sizer.look()
            except Exception:  # (a bug here must not stop the upkeep thread)
                logger.exception("pool %r: max_size auto failed to look", self.alias)

    def upkeep(self) -> None:
        """Every ``max_idle`` seconds (when psycopg_pool's own upkeep shrinks the pool), take
        back the connections parked for a second or more: their borrower stopped querying
        without giving back (a long-lived thread between jobs), and psycopg_pool's upkeep
        (``max_idle``, ``max_lifetime``, checks) reaches them again. With a fleet budget, look
        at it every :data:`LOOK_EVERY` seconds too (:meth:`look`); with ``max_size="auto"``,
        let the sizer look every :data:`.autosize.LOOK_EVERY` seconds. Run by the pool's upkeep
        thread."""
        now = time.monotonic()
        if self.upkeep_every == self.max_idle or now - self._released_at >= self.max_idle:
            self._released_at = now
            self.release_parked(older_than=1.0)
        self.look_at_size()
        if self.budget is None:
            return
        try:
            self.look()
        except Exception as exc:  # (the server is failing: the pool's own checks report it)
            logger.debug("pool %r: fleet budget look failed: %s", self.alias, exc)

    def look(self) -> int:
        """Look at the fleet budget through one of this process's connections, and give back
        the connections above its fair share while other processes wait for one
        (:meth:`.budget.FleetBudget.excess`): the idle ones now, the others as they come back
        (:meth:`putconn`; nothing is kept or parked meanwhile). The number given back now.

        The look borrows like anyone (a kept or parked connection too: under load connections
        are seldom idle in the queue), but never waits: when every connection is in use it
        skips its turn (:meth:`_get_ready_connection`). Queued, it would count as a borrower
        waiting: returning connections would go to it rather than be kept or parked, and with
        ``max_size="auto"`` the pool would grow for it."""
        budget = self.budget
        assert budget is not None
        self._looker = threading.get_ident()
        try:
            conn = self.getconn(timeout=LOOK_EVERY)
        except PoolTimeout:
            return 0
        finally:
            self._looker = 0
        try:
            excess = budget.excess(conn)
        finally:
            release_connection(self, conn)
        given = self._shed(excess, budget=True)
        self._given_back(given)
        return given

    def resize_max(self, max_size: int) -> None:
        """Change max_size (``max_size="auto"``, :mod:`.autosize`) through psycopg_pool's
        ``resize()``; connections above a smaller size are closed, the idle ones now and the
        borrowed ones as they come back (:meth:`_shed`)."""
        self.resize(min(self.min_size, max_size), max_size)
        with self._lock:
            excess = self._nconns - max_size
            if excess < 0 and self._waiting:
                # resize() opens nothing for borrowers already waiting (psycopg_pool grows when
                # a borrower arrives to find none free): start the growth that serves them.
                self._maybe_grow_pool()
        self._shed(max(excess, 0), budget=False)  # (0: an earlier, smaller size's closes are off)

    def _shed(self, excess: int, *, budget: bool) -> int:
        """Close ``excess`` connections: the idle ones now (how many is returned), the rest as
        they come back (:meth:`putconn`; nothing is kept or parked meanwhile). ``budget``: the
        fleet budget asks them back (counted as given back to it)."""
        with self._lock:
            if budget:
                self._shed_budget = excess
            else:
                self._shed_size = excess
            idle = self._take_idle(excess)
            self._shed_closed(len(idle))  # (which serve the other reason too)
        self.can_keep = self._keeps and not self._shrink
        for conn in idle:
            conn.close()
        return len(idle)

    def _shed_closed(self, n: int) -> None:
        """``n`` connections the pool had are being closed (under ``self._lock``): out of its
        count, and out of what each reason still asks."""
        self._nconns -= n
        self._shed_budget = max(self._shed_budget - n, 0)
        self._shed_size = max(self._shed_size - n, 0)
        self._shrink = max(self._shed_budget, self._shed_size)

    def _take_idle(self, n: int) -> list[PooledConnection]:
        """Up to ``n`` idle connections out of psycopg_pool's queue (under ``self._lock``): what
        its getconn() takes without waiting (no timeout check; none when borrowers wait)."""
        idle: list[PooledConnection] = []
        if self._waiting:
            return idle  # (a returned connection goes to a waiter: none is idle)
        while len(idle) < n and (conn := super()._get_ready_connection(None)) is not None:
            idle.append(conn)
        return idle

    def putconn(self, conn: PooledConnection) -> None:
        if self._shrink and not conn.closed:  # (a budget's look or a smaller max_size wants it closed)
            with self._lock:
                give = self._shrink > 0
                if give:
                    for_budget = self._shed_budget > 0
                    self._shed_closed(1)
            if give:
                self.can_keep = self._keeps and not self._shrink
                conn.close()
                if for_budget:
                    self._given_back(1)
                return
        super().putconn(conn)

    def _given_back(self, n: int) -> None:
        if n:
            self.stats.budget_given_back += n
            logger.info("pool %r: gave %d connections back to the fleet budget", self.alias, n)

    def _close_connection(self, conn: Any) -> None:
        # psycopg_pool closes connections here; a healthy one closed while the pool is open was
        # recycled (max_lifetime, max_idle, drain), which psycopg_pool does not count.
        if not self.closed and not conn.closed and not conn.broken:
            self.stats.recycled += 1
        super()._close_connection(conn)

    def lost(self, conn: PooledConnection) -> None:
        """A connection a borrower found dead: counted (the one place ``lost`` is; the pool's
        own checks count theirs, added in snapshots), closed, and its idle siblings checked
        soon, as they may be as dead as it was."""
        self.stats.lost += 1
        conn.close()
        self.check_soon()

    def check_soon(self) -> None:
        """Check the idle connections in the background, once at a time: called when a
        borrowed connection turned out broken, as its idle siblings probably are too."""
        if self.closed or not self._checking.acquire(blocking=False):
            return

        def run() -> None:
            try:
                self.check()
            except Exception:
                pass
            finally:
                self._checking.release()

        threading.Thread(target=run, name=f"pool-check-{self.alias}", daemon=True).start()


def _upkeep_loop(pool_ref: weakref.ref[Pool], closing: threading.Event, wake: threading.Event) -> None:
    """The pool's upkeep thread: :meth:`Pool.upkeep` every :attr:`Pool.upkeep_every` seconds,
    and the sizer's look (:meth:`Pool.look_at_size`) whenever a borrower queued at max_size
    wakes it, at most every :data:`.autosize.PRESSED_EVERY` seconds; until the pool closes or is
    collected."""
    pool = pool_ref()
    if pool is None:
        return
    every = pool.upkeep_every
    del pool
    due = time.monotonic() + every
    while True:
        wake.wait(max(0.0, due - time.monotonic()))
        wake.clear()
        if closing.is_set():
            return
        pool = pool_ref()
        if pool is None:
            return
        if time.monotonic() >= due:
            due = time.monotonic() + every
            pool.upkeep()
        else:
            # (Woken by a borrower queued at max_size: wait a hold's time, and look whether
            # borrowers still queue: AutoSize.settle.)
            settle = pool.sizer.settle() if pool.sizer is not None else 0.0
            if settle and closing.wait(settle):
                return
            pool.look_at_size()
            del pool
            closing.wait(PRESSED_EVERY)  # (a queue under a load at the ceiling wakes it often)
            continue
        del pool
