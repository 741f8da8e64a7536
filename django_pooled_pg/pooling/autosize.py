"""``max_size="auto"``: a pool's maximum follows its measured queueing.

A fixed ``max_size`` is a guess: too small and borrowers queue, too large and a fleet of
processes holds connections the server could give to others. With ``"auto"`` the pool starts at
``min_size`` (at least 1) and :class:`AutoSize` looks, every :data:`LOOK_EVERY` seconds from the
pool's upkeep thread, at what happened since its last look:

* **grow** at once when a borrower finds every connection open and in use at ``max_size`` and
  is still waiting two mean holds later (at most :data:`SETTLE_MAX`): the pool wakes the sizer
  (:meth:`AutoSize.pressed`), which waits :meth:`AutoSize.settle` seconds and then adds a
  connection for each borrower still waiting (psycopg_pool opens them while they wait).
  Queueing costs every request in the queue, so growth does not wait for the next look; but a
  borrower that a returning connection serves within a hold needs none (opening one costs the
  server a backend start, on the cores the requests run on), and a grown pool stays grown for
  :data:`CALM_FOR` seconds.
* **grow** too when borrowers waited :data:`GROW_AT` or more of the time connections were held
  (total wait / total hold) since the last look, or a borrower was refused: to the fewest
  connections at which an M/M/c queue offered the load seen (arrivals per second x mean hold,
  :mod:`.queueing`) waits less than :data:`GROW_AT` of its holds, where this rule would stop
  growing; by one at least, up to the ceiling. (Not the model's 1% chance of waiting, which
  ``poolstats --advise`` sizes for once: a size past the one where this rule stops is a
  backend the load may not need.) The share is judged over
  :data:`LOOK_EVERY` / 2 at least: a look sooner than that after the last one (a woken look, or
  the regular one after it) leaves the share to the next (one short queue in a few holds is no
  trend); and it needs :data:`GROW_WAITS` borrowers that waited: at a size that suits the load,
  one unlucky arrival's wait among a look's few holds can reach :data:`GROW_AT` by itself. The
  window that starts at a growth is not judged: its waits are those of the borrowers that
  queued while the connections the growth asked for were being opened.
* **shrink** when, for :data:`CALM_FOR` seconds, nobody waited that much and nobody was refused:
  to the p99 of the connections in use over that time with :data:`HEADROOM` (the same rule as
  ``poolstats --advise``), by at most a quarter at a time, not below ``min_size``; then the calm
  time starts again. Growing fast and shrinking slowly is the hysteresis that keeps the size from
  flapping between looks.

The ceiling is ``max_size_limit``, or with a fleet budget this process's fair share of it
(:meth:`.budget.FleetBudget.fair`, as the budget's last look saw the fleet). Sizes change through
psycopg_pool's public ``resize()``; a shrink closes the idle connections above the new size at
once and the borrowed ones as they come back, so no borrowed connection is ever dropped. Each
resize is logged once with its reason, counted (``resizes``), and published as the pool's
``max_size`` (Prometheus, OpenTelemetry ``db.client.connection.max``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Protocol

from .budget import FleetBudget
from .demand import LEVELS, Demand, Sample, level_percentile, sample, waited_count
from .queueing import HEADROOM, size_for_wait_share
from .stats import AliasStats

logger = logging.getLogger("django_pooled_pg.pool")

#: Seconds between two looks.
LOOK_EVERY = 0.5
#: Seconds at least between two looks that borrowers queued at max_size asked for.
PRESSED_EVERY = 0.02
#: Seconds at most a woken sizer waits to see whether borrowers still queue (two mean holds,
#: when holds are shorter).
SETTLE_MAX = 0.1
#: Grow when the waits since the last look add up to this share of the holds, or more.
GROW_AT = 0.05
#: ... and at least this many borrowers waited (1 ms or more). In bench/sizing.py one wait of
#: 11 ms in half a second was 5% of the holds and grew a pool of 3 under 1 erlang, which suits
#: it, to 5.
GROW_WAITS = 2
#: Seconds without queueing before a shrink, and between two shrinks.
CALM_FOR = 30.0
#: A shrink takes away at most this share of the size.
SHRINK_BY = 0.25


class Pool(Protocol):
    """What the sizer uses of :class:`.pool.Pool` (a protocol: pool.py imports this module)."""

    alias: str
    stats: AliasStats
    demand: Demand
    budget: FleetBudget | None

    @property
    def min_size(self) -> int: ...

    @property
    def max_size(self) -> int: ...

    def get_stats(self) -> dict[str, Any]: ...

    def count_parked_holds(self) -> None: ...

    def resize_max(self, max_size: int) -> None: ...


class AutoSize:
    """The size controller of one pool with ``max_size="auto"`` (see the module)."""

    def __init__(self, pool: Pool, limit: int | None) -> None:
        self.pool = pool
        #: max_size_limit, or None: the fleet budget's fair share is the ceiling.
        self.limit = limit
        self.last = self._mark()
        #: The mark the calm time counts from (the last queueing, the last resize).
        self.calm = self.last
        #: The last resize's reason, for reports.
        self.reason = "started at min_size"
        #: A borrower found the pool at max_size since the last look (:meth:`pressed`).
        self.queued = False
        #: The mean hold seen by the last look that saw holds end (seconds): :meth:`settle`.
        self.mean_hold = SETTLE_MAX
        #: The mark of the look that last grew the pool (the window from there is not judged).
        self.grown: Sample | None = None

    def _mark(self) -> Sample:
        # (One sample: each of stats.hold and stats.wait sums every view's histograms; the holds
        # that ended at a park are counted first.)
        self.pool.count_parked_holds()
        return sample(self.pool.demand, self.pool.stats)

    @property
    def ceiling(self) -> int:
        """The most connections this process's pool may grow to now."""
        pool = self.pool
        if self.limit is not None:
            return max(self.limit, pool.min_size, 1)
        budget = pool.budget
        assert budget is not None  # (settings validation: "auto" needs a limit or a budget)
        processes = max(budget.seen[1], 1) if budget.seen else 1
        return max(budget.fair(processes), pool.min_size, 1)

    def pressed(self) -> bool:
        """A borrower found every connection in use at max_size (the pool calls this under its
        lock): True when the sizer should look now, because the pool may still grow."""
        self.queued = True
        return self.pool.max_size < self.ceiling

    def settle(self) -> float:
        """Seconds to wait, when :meth:`pressed` woke the sizer, before it looks: long enough
        for the connections in use to come back (two mean holds), so that it grows only for
        borrowers the returning connections do not serve: with Poisson arrivals, a borrower
        queued at a size that suits the load is served within a mean hold mostly, within two
        nearly always."""
        return min(2 * self.mean_hold, SETTLE_MAX)

    def look(self) -> int | None:
        """Compare the counters with the last look's and resize if they say so; the new
        max_size, or None when it stays."""
        pool, now = self.pool, self._mark()
        last, self.last = self.last, now
        size, ceiling = pool.max_size, self.ceiling
        waited = now.wait.total_us - last.wait.total_us
        held = now.hold.total_us - last.hold.total_us
        refused = now.failed - last.failed
        if size > ceiling:
            return self._resize(ceiling, f"the ceiling is now {ceiling}")
        pressed, self.queued = self.queued, False
        waiting = pool.get_stats().get("requests_waiting", 0)
        if pressed and waiting and size < ceiling:
            # Borrowers queue at max_size now: a connection each, at once (psycopg_pool opens
            # them one after another while they wait); the rule below sizes for the load.
            self.calm = now
            return self._resize(min(ceiling, size + waiting), f"{waiting} borrower(s) queued at max_size")
        holds = now.hold.count - last.hold.count
        mean_hold = held / holds / 1e6 if holds else 0.0
        if holds:
            self.mean_hold = mean_hold
        seconds = now.at - last.at
        if not refused and seconds < LOOK_EVERY / 2:
            # Soon after the last look (a woken one, or the one after it), and nobody queues at
            # max_size now: a window this short says nothing of the share; it goes into the
            # next look's.
            self.last = last
            return None
        # (With holds longer than a look, nothing finished: borrowers queued now say it.)
        queued = held == 0 and (waited > 0 or waiting > 0)
        waited_much = (
            held > 0 and waited >= GROW_AT * held and waited_count(now.wait) - waited_count(last.wait) >= GROW_WAITS
        )
        if refused or waited_much or queued:
            self.calm = now
            if size >= ceiling:
                return None
            if waited_much and not refused and last is self.grown:
                # The window began at a growth: borrowers queued while the connections it asked
                # for were being opened (in bench/sizing.py the look after a growth to 3 found 8%
                # and grew to 5, where 3 served the load); the next window judges the size grown to.
                return None
            seconds = max(seconds, 1e-3)
            # Arrivals since the last look (those still queued: one look late) x mean hold.
            load = (now.borrows - last.borrows + refused) / seconds * mean_hold
            target = min(ceiling, max(size + 1, size_for_wait_share(load, GROW_AT)))
            share = f"{waited / held:.0%} of" if held else "while nothing was"
            return self._resize(
                target,
                f"borrowers waited {waited / 1000:.0f} ms, {share} the {held / 1000:.0f} ms connections were held "
                f"over {seconds:.1f}s, {refused} refused; load {load:.2f} erlangs",
            )
        if now.at - self.calm.at < CALM_FOR:
            return None
        levels = {i: b - a for i, (a, b) in enumerate(zip(self.calm.levels, now.levels, strict=True)) if b - a > 0}
        p99 = level_percentile(levels, 99) if levels else 0
        want = max(pool.min_size, 1, math.ceil(p99 * HEADROOM - 1e-9))
        self.calm = now
        if want >= size:
            return None
        target = max(want, size - max(1, math.floor(size * SHRINK_BY)))
        return self._resize(
            target, f"calm for {CALM_FOR:g}s: p99 in use {min(p99, LEVELS)} x {HEADROOM:g} headroom -> {want}"
        )

    def _resize(self, size: int, reason: str) -> int:
        pool = self.pool
        old = pool.max_size
        pool.resize_max(size)
        if size > old:
            self.grown = self.last  # (the look's mark: see look())
        pool.stats.resizes += 1
        self.reason = reason
        logger.info("pool %r: max_size %d -> %d: %s", pool.alias, old, size, reason)
        return size
