"""One borrow of a pooled connection, from the pool's hand-out to its return, and its states.

A ``DatabaseWrapper`` holds at most one :class:`Borrow` (its ``_borrow``). The borrow's
:attr:`~Borrow.state` is one of BORROWED, PARKED, KEPT and RETURNED, and it changes only by
these transitions (each one that starts or ends a use of the connection counts it in the
pool's :class:`~.demand.Demand`)::

   from           method        to         when
   (none)         start()       BORROWED   the pool handed a connection out
   BORROWED       park()        PARKED     between statements (release="transaction")
   BORROWED       keep()        KEPT       the end of a borrow: kept for the thread's next one
   BORROWED       give_back()   RETURNED   the end of a borrow: back in the pool
   PARKED         take_back()   BORROWED   the next statement (the same hold goes on)
   KEPT           take_back()   BORROWED   the thread's next borrow (a new hold: renew())
   PARKED, KEPT   taken()       RETURNED   another borrower or the pool took the connection

PARKED and KEPT connections sit in their pool (:meth:`.pool.Pool.park`), free for any borrower
that finds no idle connection; their borrower takes them back with a dict pop. A PARKED
connection is taken back by the next statement (the same borrow goes on); a KEPT one by the
thread's next borrow (a new hold, counted as one).

Only the borrow's holder may take back or give back its connection: not the parent process
after a fork (another :attr:`.registry.PoolRegistry.generation`), nor a ``copy.copy()`` of the
wrapper that borrowed, which carries the same borrow (:meth:`Borrow.held_by`).
"""

from __future__ import annotations

import enum
import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .demand import DIP, FOLD_AT
from .ledger import Frames, capture_frames, current_view, ledger
from .registry import registry

if TYPE_CHECKING:
    from .connection import PooledConnection
    from .pool import Pool
    from .stats import ViewStats


class State(enum.Enum):
    BORROWED = "borrowed"
    PARKED = "parked"
    KEPT = "kept"
    RETURNED = "returned"


# (module names: a comparison with ``borrow.state is PARKED`` runs before every statement)
BORROWED, PARKED, KEPT, RETURNED = State.BORROWED, State.PARKED, State.KEPT, State.RETURNED


@dataclass(eq=False, slots=True)
class Borrow:
    alias: str
    pool: Pool
    conn: PooledConnection
    thread: threading.Thread
    #: When the borrow, or its last take-back, began (``time.monotonic()``).
    started: float
    view: str | None
    #: Where its waits and holds are counted: the ViewStats of ``view``.
    stats: ViewStats
    frames: Frames | None = None
    reported: bool = False
    state: State = BORROWED
    #: ``id()`` of the connection object (DatabaseWrapper) that borrowed.
    holder: int = 0
    #: :attr:`registry.generation <.registry.PoolRegistry.generation>` at the borrow: another
    #: one in a forked child, where the borrow is the parent's.
    generation: int = 0
    #: The holder lives in its thread's local storage, so the connection is lost when the thread
    #: ends (then the ledger returns it); only such a holder keeps its connection (:meth:`keep`).
    owned: bool = False
    #: How long the borrow waited for its connection.
    wait: float = 0.0
    #: The demand event its last :meth:`park` appended (the negated moment), for the take-back
    #: that finds it last in the queue (:data:`.demand.DIP`).
    down: float = 0.0
    #: When the hold being counted began: ``started``, or earlier when the thread's statements
    #: ran in a row (each taken back within :data:`.demand.DIP` of its park), which are one hold.
    since: float = 0.0

    @classmethod
    def start(cls, alias: str, pool: Pool, conn: PooledConnection, asked_at: float, holder: int, owned: bool) -> Borrow:
        """BORROWED: ``conn``, asked for at ``asked_at``, was handed out to ``holder``; written in
        the ledger and counted."""
        view = current_view.get()
        leak_timeout = pool.settings.leak_timeout
        borrow = cls(
            alias,
            pool,
            conn,
            threading.current_thread(),
            time.monotonic(),
            view,
            pool.stats.views.get(view) or pool.stats.view(view),
            capture_frames(3) if leak_timeout else None,  # (from the holder's connect())
            holder=holder,
            generation=registry.generation,
            owned=owned,
        )
        borrow.since = borrow.started
        borrow.wait = borrow.started - asked_at
        conn._pooled_pg_busy = 0.0  # (the session set-up's statements are nobody's hold)
        ledger.add(borrow, owned_by_thread=owned, leak_timeout=leak_timeout)
        pool.stats.borrowed(borrow.wait, borrow.stats)
        pool.demand.up(borrow.started)
        return borrow

    @property
    def parked(self) -> bool:
        """Not in use: parked between statements or kept for the next borrow."""
        return self.state is PARKED or self.state is KEPT

    def held_by(self, holder: int) -> bool:
        """Whether ``holder`` may take back or give back this borrow's connection: not in a forked
        child (the parent's borrow), nor for a copy of the wrapper that borrowed."""
        return self.generation == registry.generation and self.holder == holder

    # ----- Transitions --------------------------------------------------------------------------

    def park(self) -> bool:
        """BORROWED -> PARKED, between statements; False (still BORROWED) when the connection
        must go back now: someone waits for one (:meth:`.pool.Pool.park`). Its hold is counted
        once it is known to have ended here (:meth:`end_hold`): not when the thread's next
        statement takes it back within :data:`.demand.DIP`, and the hold goes on."""
        conn, pool, now = self.conn, self.pool, time.monotonic()
        conn._pooled_pg_returned_at = now
        conn._pooled_pg_cursors.clear()  # (every one closed: the caller checked)
        # (the hold's end: the next one counts its own busy time, when a class a tool wrapped
        # timed this one's)
        conn._pooled_pg_busy = 0.0
        self.state = PARKED
        pool._parked_holds[self] = None  # (before the pool publishes it: a taker counts the hold)
        if pool.park(conn, self, now):  # (which counts it out of use in the pool's demand)
            return True
        self.state = BORROWED
        if pool._parked_holds.pop(self, 0) is not None:
            # A reader counted the hold to the park (this thread was switched out for DIP or
            # more just now): the rest is a new one, as after a pause.
            self.new_hold(now)
        return False

    def end_hold(self) -> None:
        """Count the hold that ended when the connection was parked, unless someone has: of the
        holder taking it back DIP or more later (or to give it back), a borrower or the pool
        taking the connection, and a reader of the statistics (:meth:`.pool.Pool.count_parked_holds`),
        the one that takes the borrow out of the pool's ``_parked_holds`` counts it. (A KEPT
        borrow's hold was counted at its return: it is not in there.)"""
        if self.pool._parked_holds.pop(self, 0) is None:
            held = self.conn._pooled_pg_returned_at - self.since
            self.stats.held(held, held)  # (a hold that ends at its statement's end is all busy)

    def new_hold(self, now: float) -> None:
        """A new hold of this borrow from ``now``, after the last one ended at a park (counted by
        :meth:`end_hold`): counted as a borrow that did not wait, under the current ``stats``."""
        self.since = now
        self.pool.stats.borrowed(None, self.stats)

    def keep(self) -> bool:
        """BORROWED -> KEPT: a clean, returned connection stays parked for the holder's thread's
        next borrow (HikariCP keeps a thread's last connections the same way); False (still
        BORROWED) when it cannot: a holder shared across threads, a closed connection, a
        ``reset`` callback of the user's or the fleet budget asking connections back
        (``can_keep``), or someone waiting."""
        conn = self.conn  # (prepare_return() set its return time)
        if (
            not (self.owned and self.pool.can_keep)
            or conn.closed
            or not self.pool.park(conn, self, conn._pooled_pg_returned_at)
        ):
            return False
        self.state = KEPT
        return True

    def take_back(self, holder: int, now: float) -> PooledConnection | None:
        """PARKED or KEPT -> BORROWED, by ``holder`` at ``now``: its connection, out of the pool; None if it
        is not ``holder``'s (:meth:`held_by`) or another borrower or the pool took it meanwhile
        (then RETURNED: :meth:`taken`). The caller checks that the connection is still fit, and
        starts the new hold (:meth:`renew`; for a PARKED one, the wrapper's ``_take_back_parked``) or
        gives it back."""
        # held_by(), written out: this runs before every statement with release="transaction",
        # and a call is ~0.4k instructions of the ~8k a statement's give-back and take-back cost.
        if self.generation != registry.generation or self.holder != holder:
            return None
        conn, pool = self.conn, self.pool
        if pool._parked.pop(self, None) is not conn:  # (Pool.unpark, without a call per statement)
            self.taken()
            return None
        self.state = BORROWED
        demand = pool.demand  # (Demand.up(now), written out: a call is ~0.6k instructions)
        events, down = demand.events, self.down
        try:
            if events and events[-1] is down and now + down < DIP:
                # Parked (or kept) and taken back by its own thread within DIP, nothing else
                # counted between: no dip, as if never parked (its event comes off: demand.DIP).
                last = events.pop()
                if last is down:
                    return conn
                events.append(last)  # another's, appended meanwhile: it stays
        except IndexError:  # (a reader folded the deque meanwhile: the park's event with it)
            pass
        events.append(now)
        if len(events) > FOLD_AT:
            demand.fold()
        return conn

    def renew(self, now: float) -> None:
        """A KEPT connection taken back is a new hold (a borrow that did not wait), from ``now``."""
        pool = self.pool
        self.started = self.since = now
        self.reported = False
        self.wait = 0.0
        view = self.view = current_view.get()
        stats = self.stats = pool.stats.views.get(view) or pool.stats.view(view)
        if pool.settings.leak_timeout:
            self.frames = capture_frames(4)  # (from the holder's connect())
        pool.stats.borrowed(None, stats)

    def taken(self) -> None:
        """PARKED or KEPT -> RETURNED: another borrower or the pool took the connection; nobody
        returns it under this borrow any more."""
        self.state = RETURNED
        ledger.discard(self)

    def give_back(self) -> None:
        """BORROWED -> RETURNED: the connection goes back to its pool (prepared for it by
        :func:`.release.prepare_return`)."""
        self.state = RETURNED
        ledger.forget(self.conn)
        self.pool.demand.down(time.monotonic())  # (before it is anyone else's to count up)
        self.pool.putconn(self.conn)

    # ----- Reports ------------------------------------------------------------------------------

    def stack(self) -> str:
        if not self.frames:
            return "(stack not captured: set OPTIONS['pool']['leak_timeout'])"
        summary = traceback.StackSummary.from_list(
            [traceback.FrameSummary(f, n, name) for f, n, name in reversed(self.frames)]
        )
        return "".join(summary.format())
