"""OpenTelemetry metrics for this process's pools: ``pip install 'django-pooled-pg[otel]'``.

Turn it on once per process, anywhere (settings, ``wsgi.py``, an ``AppConfig.ready``)::

    from django_pooled_pg.opentelemetry import instrument
    instrument()  # the global MeterProvider; or instrument(meter_provider=provider)

or with ``POOLED_PG = {"OPENTELEMETRY": True}`` (the app's ``ready()`` calls :func:`instrument`).
Only ``opentelemetry-api`` is needed here; the SDK and exporter are the application's.

The instruments are the semantic conventions' for database client connection pools
(``db.client.connection.*``, semconv 1.28 to 1.44, where they are still "development"), every
measurement with ``db.client.connection.pool.name`` = the Django alias (unique within the
application, as the convention asks; psycopg_pool's own ``name`` option is not used):

* ``count`` (``state`` = ``idle`` / ``used``), ``idle.max``, ``idle.min``, ``max`` and
  ``pending_requests``: observable up-down counters, and ``timeouts``: an observable counter,
  read from :func:`~django_pooled_pg.telemetry.snapshot.take` when the SDK collects (one
  snapshot per collection). Nothing is added to the borrow path.
* ``create_time``, ``wait_time``, ``use_time``: histograms in seconds. The API has no
  observable histogram, so they are filled at collection from the package's own microsecond
  histograms (:class:`~django_pooled_pg.pooling.stats.Histogram`, 8 buckets per power of two):
  the increase of each bucket since the last collection is recorded that many times at the
  bucket's midpoint. Counts are exact; each value is within 6.25% of the truth (half a bucket of
  12.5%; 0.5 us below 8 us), so a boundary of the exported histogram is right to 12.5% and its
  sum within 6.25%. Recording costs the collecting thread 6-8 us per duration (measured: see
  :meth:`PoolMetrics._record`), never the borrower.

Each process reports its own pools (not the fleet table the Prometheus endpoint reads): under
gunicorn every worker's SDK exports its own. :func:`instrument` may run in the master before the
fork (``--preload``): the callbacks read the pools of whichever process collects, and a forked
child starts its histograms' increases afresh. The SDK's own state is copied by the fork like
any other; set the MeterProvider up in each worker (gunicorn's ``post_fork``), as OpenTelemetry
advises for forking servers.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
except ImportError as exc:  # pragma: no cover - depends on the extra
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(
        "django_pooled_pg.opentelemetry needs opentelemetry-api: pip install 'django-pooled-pg[otel]'"
    ) from exc

from . import __version__
from .pooling.stats import SECONDS_BOUNDS, bucket_floor
from .telemetry import snapshot
from .telemetry.snapshot import PoolSnapshot

#: The semantic conventions these names, units and attributes follow (unchanged up to 1.44).
SCHEMA_URL = "https://opentelemetry.io/schemas/1.28.0"
POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"

#: A snapshot serves every callback of one collection; an older one is taken again.
SNAPSHOT_MAX_AGE = 1.0


@dataclass(frozen=True)
class Level:
    """An observable up-down counter of the convention: one value per pool."""

    name: str
    unit: str
    description: str
    read: Callable[[PoolSnapshot], int]


#: The levels besides ``db.client.connection.count``. psycopg_pool has no cap on idle
#: connections of its own: all ``max_size`` may be idle (until ``max_idle`` closes those above
#: ``min_size``), and it keeps ``min_size`` open, idle when nobody borrows.
LEVELS = (
    Level("db.client.connection.idle.max", "{connection}", "The maximum number of idle open connections allowed.",
          lambda s: s.max_size),
    Level("db.client.connection.idle.min", "{connection}", "The minimum number of idle open connections allowed.",
          lambda s: s.min_size),
    Level("db.client.connection.max", "{connection}", "The maximum number of open connections allowed.",
          lambda s: s.max_size),
    Level("db.client.connection.pending_requests", "{request}",
          "The number of current pending requests for an open connection.", lambda s: s.waiting),
)  # fmt: skip

#: The histograms: the convention's name and description, the snapshot's field.
HISTOGRAMS = (
    ("db.client.connection.create_time", "The time it took to create a new connection.", "connect"),
    ("db.client.connection.wait_time", "The time it took to obtain an open connection from the pool.", "wait"),
    ("db.client.connection.use_time", "The time between borrowing a connection and returning it to the pool.", "hold"),
)

#: Histogram boundaries advised to the SDK: the Prometheus histograms' ``le`` bounds.
BOUNDS = list(SECONDS_BOUNDS)


def midpoint(index: int, max_us: int) -> float:
    """The value (seconds) recorded for a duration of bucket ``index``: its middle, or the
    largest duration seen if that is lower (the top bucket in use)."""
    return min((bucket_floor(index) + bucket_floor(index + 1)) / 2, max_us) / 1_000_000


class PoolMetrics:
    """The instruments of one MeterProvider, and what its histograms have recorded so far."""

    def __init__(self, meter: Meter) -> None:
        self._lock = threading.Lock()
        self._options: CallbackOptions | None = None
        self._taken = 0.0
        self._snapshots: list[PoolSnapshot] = []
        #: (alias, snapshot field) -> {bucket index: count recorded}.
        self._recorded: dict[tuple[str, str], dict[int, int]] = {}
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            callbacks=[self._count],
            unit="{connection}",
            description="The number of connections that are currently in state described by the `state` attribute.",
        )
        for level in LEVELS:
            meter.create_observable_up_down_counter(
                level.name, callbacks=[self._level(level.read)], unit=level.unit, description=level.description
            )
        meter.create_observable_counter(
            "db.client.connection.timeouts",
            callbacks=[self._timeouts],
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to obtain a connection from the pool.",
        )
        self._histograms = [
            (
                field,
                meter.create_histogram(name, unit="s", description=text, explicit_bucket_boundaries_advisory=BOUNDS),
            )
            for name, text, field in HISTOGRAMS
        ]

    # ----- The callbacks --------------------------------------------------------------------------

    def _count(self, options: CallbackOptions) -> Iterable[Observation]:
        for s in self.snapshots(options):
            yield Observation(s.idle, {POOL_NAME: s.alias, STATE: "idle"})
            yield Observation(s.in_use, {POOL_NAME: s.alias, STATE: "used"})

    def _level(self, read: Callable[[PoolSnapshot], int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(read(s), {POOL_NAME: s.alias}) for s in self.snapshots(options)]

        return callback

    def _timeouts(self, options: CallbackOptions) -> Iterable[Observation]:
        # PoolExhausted: the timeout, max_waiting's refusal, or the fleet budget's.
        return [Observation(s.counters.get("exhausted", 0), {POOL_NAME: s.alias}) for s in self.snapshots(options)]

    # ----- One snapshot per collection ------------------------------------------------------------

    def snapshots(self, options: CallbackOptions | None = None) -> list[PoolSnapshot]:
        """This process's pools, taken once per collection: the SDK hands every callback of one
        collection the same ``options`` object (a new snapshot is taken anyway after
        :data:`SNAPSHOT_MAX_AGE`, in case an SDK does not). A new snapshot also records the
        histograms' increases, so the collection that took it exports them."""
        with self._lock:
            now = time.monotonic()
            if options is None or options is not self._options or now - self._taken > SNAPSHOT_MAX_AGE:
                self._snapshots = snapshot.take()
                self._options, self._taken = options, now
                for s in self._snapshots:
                    self._record(s)
            return self._snapshots

    def _record(self, s: PoolSnapshot) -> None:
        """Record what each histogram of ``s`` counted since the last call, at bucket midpoints.

        One ``Histogram.record()`` per duration: the API takes no count. Measured with SDK 1.45
        (``python bench/otel_cost.py``: 60k borrows, a wait and a hold each, replayed through
        this method): 5.7-8.2 us per duration over runs on a 2-CPU VM, Python 3.11 and 3.12; so
        1000 borrows a second cost the exporting thread 0.7-1 s per 60 s collection (1.2-1.6%
        of a CPU), shared with request threads at the interpreter's switch interval."""
        attributes = {POOL_NAME: s.alias}
        for field, histogram in self._histograms:
            data: dict[str, Any] = getattr(s, field) or {}
            recorded = self._recorded.setdefault((s.alias, field), {})
            record, max_us = histogram.record, data.get("max_us", 0)
            for key, n in data.get("buckets", {}).items():
                index = int(key)
                new = n - recorded.get(index, 0)
                if new > 0:
                    value = midpoint(index, max_us)
                    for _ in range(new):
                        record(value, attributes)
                    recorded[index] = n

    def after_fork_in_child(self) -> None:
        """The child's statistics start at zero: so does what its histograms recorded."""
        self._lock = threading.Lock()
        self._recorded = {}
        self._options, self._taken, self._snapshots = None, 0.0, []


_instrumented: list[tuple[MeterProvider | None, PoolMetrics]] = []
_instrumenting = threading.Lock()


def instrument(meter_provider: MeterProvider | None = None) -> bool:
    """Report this process's pools to ``meter_provider`` (None: the global one, also when it is
    set later: the API binds the instruments then). Idempotent per provider: False when
    already done."""
    with _instrumenting:
        if any(provider is meter_provider for provider, _ in _instrumented):
            return False
        meter = metrics.get_meter("django_pooled_pg", __version__, meter_provider=meter_provider, schema_url=SCHEMA_URL)
        _instrumented.append((meter_provider, PoolMetrics(meter)))
        return True


def _after_fork_in_child() -> None:
    global _instrumenting
    _instrumenting = threading.Lock()
    for _, pool_metrics in _instrumented:
        pool_metrics.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
