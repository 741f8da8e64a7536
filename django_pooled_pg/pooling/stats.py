"""Measurements of one alias's pool in this process, recorded on the borrow path.

psycopg_pool's own ``*_ms`` counters add whole milliseconds per event (sub-millisecond waits add
0) and its ``usage_ms`` stays 0 under Django, which borrows with ``getconn``/``putconn``. So wait
and hold times (and the time to open a connection, off the borrow path) are measured here, in
microseconds, into :class:`Histogram`: log-linear buckets
(8 per power of two, so a percentile is within 12.5%) that cost an ``int.bit_length()`` and a
list increment to record, merge across processes by adding, and publish as a short sparse dict.
"""

from __future__ import annotations

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
        # The bucket (values below 8 us have a bucket each), computed here rather than in a
        # function of its own: this runs twice per borrow. bucket_floor() is its inverse.
        if us < SUB:
            index = max(us, 0)
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
        for index, n in enumerate(other.counts):
            if n:
                self.counts[index] += n
        self.count += other.count
        self.total_us += other.total_us
        self.max_us = max(self.max_us, other.max_us)


@dataclass(frozen=True)
class Counter:
    """One counter of :class:`AliasStats`: what it counts, and how each reporter shows it."""

    #: The attribute of AliasStats, and the key under which snapshots publish it.
    name: str
    #: What it counts (Prometheus's help text; the README's table says the same).
    help: str
    #: The Prometheus family, after the ``django_pooled_pg_`` prefix (the client adds ``_total``).
    metric: str
    #: Its column in ``manage.py poolstats`` ("": published and exported, not a column there).
    column: str = ""


#: Every counter, in display order: the one list that recording (AliasStats), publishing
#: (snapshot, fleet), ``poolstats``, the admin page and Prometheus read. Each is incremented in
#: one place (tests/test_layout.py checks): ``borrows`` and ``parked_reused`` in
#: :meth:`AliasStats.borrowed`, ``lost`` in ``Pool.lost`` (snapshot.take() adds psycopg_pool's own
#: count of connections its checks found dead); only ``rollbacks`` has two, the return path and
#: the reclaim of a thread that ended holding its connection.
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
)  # fmt: skip
COUNTER_NAMES = tuple(counter.name for counter in COUNTERS)


@dataclass
class AliasStats:
    """Everything measured for one alias in this process since it started: the counters of
    :data:`COUNTERS` (what each means is said there) and the wait, hold and connect histograms
    (``connect``: how long opening each new connection took, recorded in one place,
    ``pool.ConnectionHealth.succeeded``, by the thread that opened it)."""

    borrows: int = 0
    exhausted: int = 0
    unavailable: int = 0
    responses_503: int = 0
    leaks: int = 0
    reclaimed: int = 0
    rollbacks: int = 0
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
    wait: Histogram = field(default_factory=Histogram)
    hold: Histogram = field(default_factory=Histogram)
    connect: Histogram = field(default_factory=Histogram)

    def borrowed(self, wait: float | None) -> None:
        """Count a borrow that waited ``wait`` seconds; ``None``: a borrower took back the
        connection it had parked or kept (``parked_reused``), without waiting.

        The one place ``borrows`` and ``parked_reused`` are counted. It runs on every borrow and,
        with release="transaction", before every statement: the zero wait is recorded here
        rather than through :meth:`Histogram.record` (the same bucket, without the arithmetic
        or a second call)."""
        self.borrows += 1
        if wait is None:
            self.parked_reused += 1
            histogram = self.wait
            histogram.counts[0] += 1
            histogram.count += 1
        else:
            self.wait.record(wait)

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTER_NAMES}
