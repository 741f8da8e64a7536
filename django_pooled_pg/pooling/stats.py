"""Measurements of one alias's pool in this process, recorded on the borrow path, per view.

psycopg_pool's own ``*_ms`` counters add whole milliseconds per event (sub-millisecond waits add
0) and its ``usage_ms`` stays 0 under Django, which borrows with ``getconn``/``putconn``. So wait
and hold times (and the time to open a connection, off the borrow path) are measured here, in
microseconds, into :class:`Histogram`: log-linear buckets
(8 per power of two, so a percentile is within 12.5%) that cost an ``int.bit_length()`` and a
list increment to record, merge across processes by adding, and publish as a short sparse dict.

Every wait and hold is recorded once, in the :class:`ViewStats` of the view (or task, or
``borrow()`` block) that borrowed: the alias's own histograms, rollbacks and 503s are the sum of
its views' (:class:`AliasStats`), added up when a reporter asks. So attributing a borrow to its
view costs the borrow path one dict lookup (about 25 ns), not a second histogram (264 ns).
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass, field
from typing import Any

SUB_BITS = 3
SUB = 1 << SUB_BITS  # buckets per power of two
BUCKETS = 40 * SUB  # up to 2**40 us, about 12 days

#: The bounds (seconds, 100 us to 30 s) of the histograms the exporters rebuild from these
#: buckets: Prometheus's ``le`` bounds, and the bucket boundaries OpenTelemetry is advised to use.
SECONDS_BOUNDS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


def _bucket(us: int) -> int:
    """The bucket of ``us`` microseconds (see :meth:`Histogram.record`)."""
    if us < SUB:
        return max(us, 0)
    exponent = us.bit_length() - 1
    return (exponent - SUB_BITS + 1) * SUB + ((us >> (exponent - SUB_BITS)) - SUB)


#: The bucket of every duration below 4 ms, looked up instead of computed: most holds of a
#: statement and most waits are that short, and the lookup takes 65 ns off a record() of about
#: 210 ns (Python 3.11). 32 KB.
SMALL = 1 << 12
SMALL_BUCKETS = [_bucket(us) for us in range(SMALL)]


def bucket_floor(index: int) -> int:
    """The smallest value (us) that falls in bucket ``index`` (see :meth:`Histogram.record`)."""
    if index < SUB:
        return index
    exponent = index // SUB - 1 + SUB_BITS
    return (SUB + index % SUB) << (exponent - SUB_BITS)


class Histogram:
    """Counts of durations, with exact count, sum and max."""

    __slots__ = ("counts", "count", "total_us", "max_us")

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.count = 0
        self.total_us = 0
        self.max_us = 0

    def record(self, seconds: float) -> None:
        us = int(seconds * 1_000_000)
        # The bucket (values below 8 us have a bucket each): _bucket(us), looked up or computed
        # here rather than called: this runs twice per borrow. bucket_floor() is its inverse.
        if us < SMALL:
            index = SMALL_BUCKETS[us] if us > 0 else 0
        elif us < 1 << 40:
            exponent = us.bit_length() - 1
            index = (exponent - SUB_BITS + 1) * SUB + ((us >> (exponent - SUB_BITS)) - SUB)
        else:
            index = BUCKETS - 1
        self.counts[index] += 1
        self.count += 1
        self.total_us += us
        if us > self.max_us:
            self.max_us = us

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100) in seconds: the middle of the bucket holding it."""
        if not self.count:
            return 0.0
        rank = max(1, round(q / 100 * self.count))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                low, high = bucket_floor(index), bucket_floor(index + 1)
                return min((low + high) / 2, self.max_us) / 1_000_000
        return self.max_us / 1_000_000

    def summary(self) -> dict[str, float]:
        """count, mean, p50, p95, p99, max (seconds)."""
        mean = self.total_us / self.count / 1_000_000 if self.count else 0.0
        return {
            "count": self.count,
            "mean": mean,
            "p50": self.percentile(50),
            "p95": self.percentile(95),
            "p99": self.percentile(99),
            "max": self.max_us / 1_000_000,
        }

    def to_dict(self) -> dict[str, Any]:
        """A compact form for publishing: only the buckets in use."""
        return {
            "buckets": {str(i): n for i, n in enumerate(self.counts) if n},
            "count": self.count,
            "total_us": self.total_us,
            "max_us": self.max_us,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        histogram = cls()
        for index, n in data.get("buckets", {}).items():
            histogram.counts[int(index)] = n
        histogram.count = data.get("count", 0)
        histogram.total_us = data.get("total_us", 0)
        histogram.max_us = data.get("max_us", 0)
        return histogram

    def merge(self, other: Histogram) -> None:
        if other.count:
            self.counts = list(map(operator.add, self.counts, other.counts))  # (in C: 3 us)
        self.count += other.count
        self.total_us += other.total_us
        self.max_us = max(self.max_us, other.max_us)


@dataclass(frozen=True)
class Counter:
    """One counter of :class:`AliasStats`: what it counts, and how each reporter shows it."""

    #: The attribute of AliasStats, and the key under which snapshots publish it.
    name: str
    #: What it counts (Prometheus's help text; the docs' table says the same).
    help: str
    #: The Prometheus family, after the ``django_pooled_pg_`` prefix (the client adds ``_total``).
    metric: str
    #: Its column in ``manage.py poolstats`` ("": published and exported, not a column there).
    column: str = ""


#: Every counter, in display order: the one list that recording (AliasStats), publishing
#: (snapshot, fleet), ``poolstats``, the admin page and Prometheus read. Each is incremented in
#: one place (tests/test_layout.py checks): ``borrows`` and ``parked_reused`` in
#: :meth:`AliasStats.borrowed`, ``lost`` in ``Pool.lost`` (snapshot.take() adds psycopg_pool's own
#: count of connections its checks found dead); ``rollbacks`` and ``responses_503`` are counted
#: per view (:class:`ViewStats`) and summed: rollbacks in two places, the return path and the
#: reclaim of a thread that ended holding its connection.
COUNTERS: tuple[Counter, ...] = (
    Counter("borrows", "Connections borrowed from the pool.", "borrows", "borrows"),
    Counter("exhausted", "Borrowers that got PoolExhausted (timeout or max_waiting).", "exhausted", "timeouts"),
    Counter("unavailable", "Borrowers that got DatabaseUnavailable.", "unavailable"),
    Counter("responses_503", "HTTP 503 responses given by PoolMiddleware.", "responses_503", "503s"),
    Counter("leaks", "Connections reported as held longer than leak_timeout.", "leaks", "leaks"),
    Counter("reclaimed", "Connections returned for threads that ended holding them.", "reclaimed", "reclaimed"),
    Counter("rollbacks", "Connections rolled back when given back.", "rollbacks", "rollbacks"),
    Counter("resets", "Sessions reset (DISCARD ALL, or the baseline's reset) when given back.", "session_resets"),
    Counter("discarded", "Connections discarded when given back (broken or not cleanable).", "discarded"),
    Counter("opened", "Connections the pool opened.", "connections_opened", "opened"),
    Counter("failed", "Connection attempts that failed.", "connections_failed", "failed"),
    Counter("lost", "Connections found dead (and replaced): by a borrower, or by the pool's checks.",
            "connections_lost", "lost"),
    Counter("recycled", "Healthy connections closed for max_lifetime or max_idle, or drained.",
            "connections_recycled", "recycled"),
    Counter("parked_reused", 'release="transaction": statements that took back their own parked connection.',
            "parked_reused"),
    Counter("parked_taken", 'release="transaction": parked connections taken by another borrower (also borrows).',
            "parked_taken"),
    Counter("budget_refused", "New connections refused because the fleet budget (fleet_max_size) was used up.",
            "budget_refused", "refused"),
    Counter("budget_given_back", "Idle connections closed to give the fleet budget to waiting processes.",
            "budget_given_back"),
    Counter("resizes", 'max_size="auto": times the pool changed its max_size.', "resizes"),
)  # fmt: skip
COUNTER_NAMES = tuple(counter.name for counter in COUNTERS)


#: The names views are listed under when they have none of their own: borrows before the
#: middleware resolved the request's view (other middleware, a 404) and views past
#: :data:`MAX_VIEWS`. Outside requests a borrow is named by its ``borrow()`` block or task, else
#: by :func:`process_label`.
BEFORE_VIEW = "(before the view)"
OTHER = "other"
#: Views one alias keeps apart in one process (about 6 KB each); later ones are counted as
#: :data:`OTHER`. A site with more views than this ranks the first ones it served.
MAX_VIEWS = 500


def process_label() -> str:
    """What borrows outside requests, tasks and ``borrow(name=...)`` blocks are listed under:
    ``manage.py COMMAND`` in a management command, else ``(outside a view)``."""
    argv = sys.argv
    if len(argv) > 1 and argv[0].rsplit("/", 1)[-1] in ("manage.py", "django-admin"):
        return f"manage.py {argv[1]}"
    return "(outside a view)"


class ViewStats:
    """One view's use of one alias's pool in this process: its waits (one per borrow: the count
    is its borrows), its holds (the sum is its connection-seconds), the seconds of those holds
    spent in statements and open transactions (``busy``: what ``release="transaction"`` would
    hold too), the transactions it left open (rolled back when given back) and its 503s."""

    __slots__ = ("name", "wait", "hold", "busy", "rollbacks", "responses_503")

    def __init__(self, name: str) -> None:
        self.name = name
        self.wait = Histogram()
        self.hold = Histogram()
        self.busy = 0.0
        self.rollbacks = 0
        self.responses_503 = 0

    def held(self, seconds: float, busy: float) -> None:
        """A hold of ``seconds`` ended, ``busy`` of them in statements and transactions."""
        self.hold.record(seconds)
        self.busy += busy if busy < seconds else seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "wait": self.wait.to_dict(),
            "hold": self.hold.to_dict(),
            "busy": round(self.busy, 6),
            "rollbacks": self.rollbacks,
            "responses_503": self.responses_503,
        }


@dataclass
class AliasStats:
    """Everything measured for one alias in this process since it started: the counters of
    :data:`COUNTERS` (what each means is said there), per view the wait and hold histograms,
    rollbacks and 503s, whose sums are the alias's, and the connect histogram (how long opening
    each new connection took, recorded in one place, ``pool.ConnectionHealth.succeeded``, by the
    thread that opened it)."""

    borrows: int = 0
    exhausted: int = 0
    unavailable: int = 0
    leaks: int = 0
    reclaimed: int = 0
    resets: int = 0
    discarded: int = 0
    opened: int = 0
    failed: int = 0
    lost: int = 0
    recycled: int = 0
    parked_reused: int = 0
    parked_taken: int = 0
    budget_refused: int = 0
    budget_given_back: int = 0
    resizes: int = 0
    #: View name (None: outside requests) -> its measurements; see :meth:`view`.
    views: dict[str | None, ViewStats] = field(default_factory=dict)
    connect: Histogram = field(default_factory=Histogram)

    def view(self, name: str | None) -> ViewStats:
        """The measurements of view ``name``, made at its first borrow. The borrow path asks
        ``views.get(name)`` first and comes here on a miss. A path (the middleware names a
        request by its path until its view is resolved) is never a key: every path would be one."""
        found = self.views.get(name)
        if found is not None:
            return found
        if name is None:
            label = process_label()
        elif name.startswith("/"):
            label = BEFORE_VIEW
        elif len(self.views) >= MAX_VIEWS:
            label = OTHER
        else:
            return self.views.setdefault(name, ViewStats(name))
        found = self.views.get(label)
        if found is None:
            found = self.views.setdefault(label, ViewStats(label))
        if name is None:
            self.views[None] = found
        return found

    def borrowed(self, wait: float | None, view: ViewStats) -> None:
        """Count a borrow by ``view`` that waited ``wait`` seconds; ``None``: a borrower took back
        the connection it had parked or kept (``parked_reused``), without waiting.

        The one place ``borrows`` and ``parked_reused`` are counted. It runs on every borrow and,
        with release="transaction", before every statement: the zero wait is recorded here
        rather than through :meth:`Histogram.record` (the same bucket, without the arithmetic
        or a second call)."""
        self.borrows += 1
        histogram = view.wait
        if wait is None:
            self.parked_reused += 1
            histogram.counts[0] += 1
            histogram.count += 1
        else:
            histogram.record(wait)

    def named_views(self) -> list[ViewStats]:
        """Each view once (the ``None`` key is an alias of a label)."""
        return [view for name, view in list(self.views.items()) if name is not None]

    @property
    def wait(self) -> Histogram:
        """Every view's waits together."""
        return self._sum("wait")

    @property
    def hold(self) -> Histogram:
        """Every view's holds together."""
        return self._sum("hold")

    @property
    def rollbacks(self) -> int:
        return sum(view.rollbacks for view in self.named_views())

    @property
    def responses_503(self) -> int:
        return sum(view.responses_503 for view in self.named_views())

    def _sum(self, which: str) -> Histogram:
        total = Histogram()
        for view in self.named_views():
            total.merge(getattr(view, which))
        return total

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTER_NAMES}
