"""How many of a pool's connections are in use, integrated over time, for sizing the pool.

A pool's size is right when it covers the connections its borrowers use at once, most of the
time. That number changes only when a borrow starts or ends, so it is measured exactly, with no
sampling thread, by integrating it at those moments: :class:`Demand` keeps the current level (the
connections borrowed and not parked or kept), when it last changed, and the seconds spent so
far at each level. The borrow's transitions (:mod:`.borrow`) call :meth:`Demand.up` and
:meth:`Demand.down`; a reader takes cumulative :class:`Sample` s and subtracts two of them to get
any window (:func:`window`): the time-weighted mean, percentiles and maximum of the level.

Exact under threads, and cheap on the borrow path. A change appends its moment to a deque (one
atomic operation; negated for a down), taken from a clock reading the transition makes anyway
(the borrow's start, the park's return time), so a change costs an append, not a clock call. A
reader (or a change that finds the deque long) folds the events into the level and the seconds
per level under a lock. The deque's order is the order in which the changes happened, for a
connection goes out of use only after it came into use, so the level never goes wrong. A moment
may be a little older than one appended before it (a thread switched out between its clock
reading and its append): it then counts from the later one, which moves at most that switch's
delay (microseconds, a few milliseconds on a starved machine) from one level to the next.

A lock taken on every change cost about 4.6k instructions per change (Python 3.12's ``Lock``
parses its arguments on every acquire): 5-7% of a statement's with ``release="transaction"``,
which changes the count twice per statement; the appends and the fold cost about 0.5k per
change (``bench/results/instructions/``).

A thread's own statements (or requests) in a row count as one use: a dip shorter than
:data:`DIP` between them, with nothing else counted meanwhile, is not counted (a mean in use
higher by at most those dips' share of the time).

How many borrowers arrived comes from counters that exist already: borrows (every hold that
started, a statement's take-back of its parked connection included) plus borrowers that got
``PoolExhausted`` or ``DatabaseUnavailable``. Counting the failures is what keeps the demand of
an undersized pool from looking capped by its size.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .stats import Histogram, _bucket, bucket_floor

if TYPE_CHECKING:
    from .stats import AliasStats

#: Levels kept apart; a level of LEVELS connections or more is counted as LEVELS.
LEVELS = 256
#: Events an ``up()`` lets pile up before it folds them (when no reader does: publishing off).
FOLD_AT = 4096
#: Seconds: a connection its own thread gave back (parked between statements, or kept after a
#: borrow) and takes back within this time, with no other change counted in between, was in use
#: all along: the take-back removes the park's event instead of adding its own
#: (:meth:`.borrow.Borrow.take_back`). Such a dip is the thread's own Python between two of its
#: statements, too short for another borrower to use the connection; counting it cost two
#: events per statement (about 3k instructions, 2.3% of three statements run outside requests).
#: A dip that anything else interleaves with, or a reader folds, is counted as it happened.
DIP = 0.001
#: A borrow "waited" when its wait reached this bucket of the wait histogram (about 1 ms): below
#: it, the time to hand out an idle connection.
WAITED_BUCKET = _bucket(1000)
WAITED_US = bucket_floor(WAITED_BUCKET)


@dataclass(frozen=True)
class Sample:
    """Everything :func:`window` needs, cumulative since the pool was made, at ``at``
    (``time.monotonic()``)."""

    at: float
    #: Seconds spent at each level, 0 to LEVELS.
    levels: list[float]
    borrows: int
    #: Borrowers refused: PoolExhausted (BudgetExhausted included) and DatabaseUnavailable.
    failed: int
    hold: Histogram
    wait: Histogram


class Demand:
    """The level of one pool's connections in use, integrated over time (see the module)."""

    __slots__ = ("_lock", "events", "level", "changed", "seconds", "first")

    def __init__(self, stats: AliasStats | None = None) -> None:
        self._lock = threading.Lock()
        #: Changes not folded yet: ``t`` a connection came into use at ``t``, ``-t`` one went
        #: out (``time.monotonic()``). The per-statement transitions append to it directly.
        self.events: deque[float] = deque()
        #: Connections in use at ``changed`` (as folded).
        self.level = 0
        #: The moment folded up to.
        self.changed = time.monotonic()
        #: Seconds spent at each level until ``changed``.
        self.seconds = [0.0] * (LEVELS + 1)
        #: The sample every window of this pool starts from at the latest: the moment it was
        #: made, with the alias's counters then (they are the alias's, across its pools).
        self.first = sample(self, stats) if stats is not None else None

    def up(self, at: float) -> None:
        """One more connection in use since ``at``: a borrow started, or a parked or kept one
        was taken back."""
        events = self.events
        events.append(at)
        if len(events) > FOLD_AT:  # (nobody reads: the statistics publisher is off)
            self.fold()

    def down(self, at: float) -> None:
        """One connection fewer in use since ``at``: given back, parked or kept."""
        self.events.append(-at)

    def fold(self) -> None:
        with self._lock:
            self._fold_locked()

    def _fold_locked(self) -> None:
        # Written for speed: it runs for every change (~0.4k instructions each, 3.12).
        events, seconds = self.events, self.seconds
        level, changed, pop = self.level, self.changed, events.popleft
        for _ in range(len(events)):  # (others may append meanwhile: the next fold's)
            at = pop()
            if at > 0.0:
                if at > changed:
                    seconds[level if level < LEVELS else LEVELS] += at - changed
                    changed = at
                level += 1
            else:
                at = -at
                if at > changed:
                    seconds[level if level < LEVELS else LEVELS] += at - changed
                    changed = at
                level -= 1
        self.level, self.changed = level, changed

    def read(self) -> tuple[float, list[float], int]:
        """(now, seconds at each level until now, the level now), consistent with each other."""
        with self._lock:
            self._fold_locked()
            now = max(time.monotonic(), self.changed)
            seconds = list(self.seconds)
            level = self.level
            seconds[min(level, LEVELS)] += now - self.changed
        return now, seconds, level


def sample(demand: Demand, stats: AliasStats) -> Sample:
    """A cumulative sample of ``demand`` and the alias's counters, now. Off the borrow path (a
    snapshot takes it): it sums every view's histograms."""
    now, levels, _ = demand.read()
    return Sample(now, levels, stats.borrows, stats.exhausted + stats.unavailable, stats.hold, stats.wait)


# ----- Windows ------------------------------------------------------------------------------------


def level_percentile(levels: dict[int, float], q: float) -> int:
    """The level in use at or below which the pool spent ``q`` percent of the time."""
    total = sum(levels.values())
    if total <= 0:
        return 0
    target, seen = q / 100 * total, 0.0
    for level in sorted(levels):
        seen += levels[level]
        if seen >= target * (1 - 1e-9):
            return level
    return max(levels)


def in_use(levels: dict[int, float]) -> dict[str, float]:
    """Time-weighted mean, p95, p99 and max of the connections in use, from seconds per level."""
    total = sum(levels.values())
    mean = sum(level * s for level, s in levels.items()) / total if total > 0 else 0.0
    return {
        "mean": mean,
        "p95": level_percentile(levels, 95),
        "p99": level_percentile(levels, 99),
        "max": max((level for level, s in levels.items() if s > 0), default=0),
    }


def waited_count(wait: Histogram) -> int:
    """How many of the borrows ``wait`` counts waited: reached :data:`WAITED_BUCKET` (about 1 ms)."""
    return sum(wait.counts[WAITED_BUCKET:])


def _delta(new: Histogram, old: Histogram) -> Histogram:
    out = Histogram()
    out.counts = [a - b for a, b in zip(new.counts, old.counts, strict=True)]
    out.count = new.count - old.count
    out.total_us = new.total_us - old.total_us
    out.max_us = new.max_us  # (an upper bound: percentile() only caps with it)
    return out


def window(old: Sample, new: Sample, samples: int) -> dict[str, Any]:
    """What happened between two samples of one pool, as a snapshot publishes it: the seconds
    covered and the ``samples`` it rests on, borrow attempts and their rate, holds, waits (and
    how many reached about 1 ms: ``waited``), the seconds spent at each level in use (sparse, so
    that processes add up) and their mean, p95, p99 and max."""
    seconds = max(new.at - old.at, 0.0)
    levels = {i: round(b - a, 6) for i, (a, b) in enumerate(zip(old.levels, new.levels, strict=True)) if b - a > 0}
    hold, wait = _delta(new.hold, old.hold), _delta(new.wait, old.wait)
    waited = waited_count(wait)
    attempts = (new.borrows - old.borrows) + (new.failed - old.failed)
    return {
        "seconds": round(seconds, 3),
        "samples": samples,
        "attempts": attempts,
        "failed": new.failed - old.failed,
        "rate": attempts / seconds if seconds > 0 else 0.0,
        "holds": hold.count,
        "hold_us": hold.total_us,
        "hold_mean": hold.total_us / hold.count / 1e6 if hold.count else 0.0,
        "hold_p99": hold.percentile(99),
        "waits": wait.count,
        "wait_us": wait.total_us,
        "waited": waited,
        "wait_share": waited / wait.count if wait.count else 0.0,
        "wait_p99": wait.percentile(99),
        "levels": {str(level): s for level, s in levels.items()},
        "in_use": in_use(levels),
    }
