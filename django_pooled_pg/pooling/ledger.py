"""Who holds which connection: the record that makes release enforceable.

Every borrow is written here and crossed out when the connection goes back. The ledger is how
this package:

* gives back a connection whose thread ended without ``connection.close()``: a per-thread
  :class:`ThreadHolder` lives in the thread's local storage, so Python drops it the moment the
  thread ends, and its ``__del__`` queues the thread's borrows for a reaper thread to return
  (``SimpleQueue.put`` is safe in ``__del__``). Django's own pool loses such a slot forever;
* reports a connection held longer than ``leak_timeout``, once, with the stack that borrowed it
  (captured only when ``leak_timeout`` is set: about 5 us per borrow);
* knows, per alias, what is in use right now.
"""

from __future__ import annotations

import contextvars
import logging
import os
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

from .. import eventlog, signals
from .release import release_connection
from .stats import AliasStats, ViewStats

if TYPE_CHECKING:
    from ..settings import PoolSettings
    from .connection import PooledConnection
    from .demand import Demand


class Pool(Protocol):
    """What the ledger uses of a borrow's pool (:class:`.pool.Pool`, which imports the ledger)."""

    settings: PoolSettings
    stats: AliasStats
    demand: Demand

    def unpark(self, conn: PooledConnection, borrow: Borrow) -> bool: ...

    def putconn(self, conn: PooledConnection) -> None: ...


logger = logging.getLogger("django_pooled_pg")

#: The view of the request being served on this thread or task (its path until the middleware
#: has resolved it), the task a worker runs, or the name of a ``borrow()`` block: it names the
#: culprit in leak and rollback reports, and the borrow is counted under it (:class:`ViewStats`).
current_view: contextvars.ContextVar[str | None] = contextvars.ContextVar("current_view", default=None)


Frames = list[tuple[str, int, str]]


class Borrow(Protocol):
    """What the ledger uses of a borrow (:class:`.borrow.Borrow`, which imports the ledger)."""

    view: str | None
    stats: ViewStats
    reported: bool
    #: (written by :meth:`.pool.Pool.park`: the demand event of the park, :data:`.demand.DIP`)
    down: float

    @property
    def alias(self) -> str: ...

    @property
    def pool(self) -> Pool: ...

    @property
    def conn(self) -> PooledConnection: ...

    @property
    def thread(self) -> threading.Thread: ...

    @property
    def started(self) -> float: ...

    @property
    def since(self) -> float: ...

    @property
    def frames(self) -> Frames | None: ...

    @property
    def parked(self) -> bool: ...

    def stack(self) -> str: ...

    def taken(self) -> None: ...

    def end_hold(self) -> None: ...


def capture_frames(skip: int) -> Frames:
    """The caller's stack as (file, line, function), cheaply: no source lines are read."""
    frame: Any = sys._getframe(skip)
    frames: Frames = []
    while frame is not None and len(frames) < 40:
        code = frame.f_code
        frames.append((code.co_filename, frame.f_lineno, code.co_name))
        frame = frame.f_back
    return frames


class ThreadHolder:
    """What one thread holds; dropped by Python when the thread ends."""

    __slots__ = ("ledger", "borrows")

    def __init__(self, ledger: BorrowLedger) -> None:
        self.ledger = ledger
        self.borrows: list[Borrow] = []

    def __del__(self) -> None:
        held = self.ledger.borrows
        for borrow in self.borrows:
            if held.get(id(borrow.conn)) is borrow:
                self.ledger.orphans.put(borrow)


class BorrowLedger:
    def __init__(self) -> None:
        #: id(psycopg connection) -> its current borrow.
        self.borrows: dict[int, Borrow] = {}
        #: Borrows of threads that ended; returned by :meth:`reclaim_orphans`.
        self.orphans: queue.SimpleQueue[Borrow] = queue.SimpleQueue()
        #: Measurements per alias since this process started.
        self.stats: dict[str, AliasStats] = {}
        self._local = threading.local()
        self._watchdog: threading.Thread | None = None
        self._reaper: threading.Thread | None = None
        self._watch_interval = 1.0

    def stats_for(self, alias: str) -> AliasStats:
        stats = self.stats.get(alias)
        if stats is None:
            stats = self.stats.setdefault(alias, AliasStats())
        return stats

    def add(self, borrow: Borrow, *, owned_by_thread: bool, leak_timeout: float | None) -> None:
        """Note a borrow (:meth:`.borrow.Borrow.start` makes and counts it). ``owned_by_thread``:
        the borrowing wrapper lives in this thread's local storage, so the connection is lost if
        the thread ends: return it then."""
        self.borrows[id(borrow.conn)] = borrow
        if owned_by_thread:
            thread_holder = self._local.__dict__.get("holder")
            if thread_holder is None:
                thread_holder = self._local.holder = ThreadHolder(self)
                if self._reaper is None:
                    self._start_reaper()
            thread_holder.borrows.append(borrow)
        if leak_timeout:
            self._ensure_watchdog(leak_timeout)

    def forget(self, conn: PooledConnection) -> Borrow | None:
        """Cross out the borrow of ``conn`` (it is being returned)."""
        borrow = self.borrows.pop(id(conn), None)
        holder = self._local.__dict__.get("holder")
        if borrow is not None and holder is not None:
            try:
                holder.borrows.remove(borrow)
            except ValueError:
                pass  # returned by another thread than the one that borrowed it
        return borrow

    def discard(self, borrow: Borrow) -> None:
        """Cross out ``borrow`` whose parked connection was taken by another borrower or the
        pool: nobody returns it under this record any more."""
        if self.borrows.get(id(borrow.conn)) is borrow:
            self.borrows.pop(id(borrow.conn), None)
        holder = self._local.__dict__.get("holder")
        if holder is not None:
            try:
                holder.borrows.remove(borrow)
            except ValueError:
                pass

    def name_view(self, view: str) -> None:
        """The middleware has resolved the request's view: this thread's borrows made before it
        (by other middleware, under the request's path) are the view's from now on, so that their
        hold is counted, and any leak reported, under its name."""
        holder = self._local.__dict__.get("holder")
        if holder is None:
            return
        for borrow in holder.borrows:
            if not borrow.parked and borrow.view is not None and borrow.view.startswith("/"):
                borrow.view = view
                borrow.stats = borrow.pool.stats.view(view)

    def in_use(self, alias: str) -> int:
        return sum(1 for b in list(self.borrows.values()) if b.alias == alias and not b.parked)

    # ----- Threads that ended holding a connection ----------------------------------------------

    def reclaim_orphans(self) -> int:
        """Return the connections of threads that ended without giving them back."""
        count = 0
        while True:
            try:
                borrow = self.orphans.get_nowait()
            except queue.Empty:
                return count
            count += self._reclaim(borrow)

    def _reclaim(self, borrow: Borrow) -> int:
        if self.borrows.get(id(borrow.conn)) is not borrow:
            return 0
        if borrow.parked:
            # Parked between statements: clean and not in use, so nothing to report. Return it
            # unless another borrower took it meanwhile.
            taken = borrow.pool.unpark(borrow.conn, borrow)
            borrow.taken()  # (first: once the pool has it, nobody holds it)
            if taken:
                borrow.end_hold()
                release_connection(borrow.pool, borrow.conn)
            return 0
        del self.borrows[id(borrow.conn)]
        now = time.monotonic()
        borrow.pool.demand.down(now)  # (still BORROWED: nobody gave it back)
        busy = borrow.conn._pooled_pg_take_busy(now)
        outcome = release_connection(borrow.pool, borrow.conn)
        self.stats_for(borrow.alias).reclaimed += 1
        borrow.stats.rollbacks += outcome.rolled_back
        borrow.stats.held(now - borrow.since, busy)
        eventlog.warn(
            "a thread ended holding a connection",
            borrow.alias,
            borrow.view,
            "thread %r ended holding a connection to database %r%s without closing it; it was returned to the pool%s",
            borrow.thread.name,
            borrow.alias,
            f" (view {borrow.view})" if borrow.view else "",
            " after a rollback" if outcome.rolled_back else "",
        )
        signals.connection_reclaimed.send(sender=self.__class__, alias=borrow.alias, thread=borrow.thread.name)
        return 1

    def _start_reaper(self) -> None:
        orphans = self.orphans

        def reap() -> None:
            while self.orphans is orphans:  # a new queue after fork: this reaper is the parent's
                borrow = orphans.get()
                try:
                    self._reclaim(borrow)
                except Exception:
                    logger.exception("could not return the connection of an ended thread")

        self._reaper = threading.Thread(target=reap, name="django_pooled_pg-reaper", daemon=True)
        self._reaper.start()

    # ----- Leak detection -----------------------------------------------------------------------

    def report_leaks(self, now: float | None = None) -> list[Borrow]:
        """Report, once each, borrows held longer than their pool's ``leak_timeout``."""
        now = time.monotonic() if now is None else now
        reported = []
        for borrow in list(self.borrows.values()):
            limit = borrow.pool.settings.leak_timeout
            if borrow.reported or borrow.parked or not limit or now - borrow.started < limit:
                continue
            borrow.reported = True
            reported.append(borrow)
            held = now - borrow.started
            self.stats_for(borrow.alias).leaks += 1
            stack = borrow.stack()
            eventlog.warn(
                "a connection held longer than leak_timeout",
                borrow.alias,
                borrow.view,
                "connection to database %r held for %.1fs by thread %r%s, longer than "
                "leak_timeout=%gs; it was borrowed at:\n%s",
                borrow.alias,
                held,
                borrow.thread.name,
                f" (view {borrow.view})" if borrow.view else "",
                limit,
                stack,
            )
            signals.leak_reported.send(
                sender=self.__class__,
                alias=borrow.alias,
                held=held,
                stack=stack,
                thread=borrow.thread.name,
                view=borrow.view,
            )
        return reported

    def _ensure_watchdog(self, leak_timeout: float) -> None:
        self._watch_interval = min(self._watch_interval, max(leak_timeout / 4, 0.05))
        if self._watchdog is not None and self._watchdog.is_alive():
            return
        self._watchdog = threading.Thread(target=self._watch, name="django_pooled_pg-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        me = threading.current_thread()
        while self._watchdog is me:
            time.sleep(self._watch_interval)
            try:
                self.reclaim_orphans()
                self.report_leaks()
            except Exception:  # the watchdog must outlive any one bad report
                logger.exception("django_pooled_pg watchdog error")

    def after_fork_in_child(self) -> None:
        """The parent's borrows are not this process's to return or report."""
        self.borrows = {}
        self.orphans = queue.SimpleQueue()
        self._reaper = None
        self.stats = {}
        self._local = threading.local()
        self._watchdog = None


ledger = BorrowLedger()
os.register_at_fork(after_in_child=ledger.after_fork_in_child)
