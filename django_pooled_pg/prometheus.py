"""Prometheus metrics for every process's pools: ``pip install django-pooled-pg[prometheus]``.

Include the URL where your scraper looks::

    urlpatterns += [path("metrics/", include("django_pooled_pg.prometheus"))]

Correct under gunicorn's many processes without ``prometheus_client``'s multiprocess mode: the
metrics come from the snapshots every process publishes (:func:`~django_pooled_pg.telemetry.fleet.fleet_stats`),
so whichever worker answers the scrape reports the whole fleet, one series per ``host`` and ``pid``
(stale processes are left out). Values are as fresh as ``POOLED_PG["STATS_INTERVAL"]``.

Wait, hold and connect times are histograms in seconds. They are rebuilt from the package's own
microsecond histograms (8 buckets per power of two): a duration is counted under the first
``le`` bound at or above the top of its bucket, so a bucket boundary is accurate to 12.5%.
Per view (``django_pooled_pg_view_*``, labels alias, view, host, pid): the ``TOP_VIEWS``
views (``settings.POOLED_PG``, 10 by default) holding the most connection-seconds over the fleet
since start, by name, and the rest of each process summed under ``view="other"``, so that the
number of series stays bounded whatever the number of views. A view entering the top list
leaves ``other`` (whose counter then drops: a counter reset to Prometheus).
The endpoint has no authentication of its own: expose it only where your scraper can reach it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.urls import path

try:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
except ImportError as exc:  # pragma: no cover - depends on the extra
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(
        "django_pooled_pg.prometheus needs prometheus_client: pip install 'django-pooled-pg[prometheus]'"
    ) from exc

from .pooling.stats import BUCKETS, COUNTERS, OTHER, SECONDS_BOUNDS, Histogram, bucket_floor
from .settings import read_stats_settings
from .telemetry.fleet import AliasFleet, FleetStats, fleet_stats

PREFIX = "django_pooled_pg"

#: Histogram bounds (seconds): 100 us to 30 s.
BOUNDS = SECONDS_BOUNDS

GAUGES = {
    "size": "Connections in the pool (idle, in use, being opened).",
    "idle": "Idle connections in the pool.",
    "in_use": "Connections borrowed right now.",
    "waiting": "Borrowers waiting for a connection.",
    "max_size": "The pool's max_size.",
    "min_size": "The pool's min_size.",
    "fleet_max_size": "The fleet budget all processes share (fleet_max_size; 0: none). This process's share is its size.",
}


def histogram_buckets(data: dict[str, Any]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative ``le`` buckets and the sum (seconds) of a published histogram."""
    histogram = Histogram.from_dict(data)
    per_bound = [0] * (len(BOUNDS) + 1)
    for index in range(BUCKETS):
        n = histogram.counts[index]
        if not n:
            continue
        top = bucket_floor(index + 1) / 1_000_000  # every value in the bucket is below this
        slot = next((i for i, bound in enumerate(BOUNDS) if top <= bound), len(BOUNDS))
        per_bound[slot] += n
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip((*map(str, BOUNDS), "+Inf"), per_bound, strict=True):
        running += n
        buckets.append((bound, running))
    return buckets, histogram.total_us / 1_000_000


class FleetCollector:
    """A prometheus_client collector over one :class:`FleetStats`."""

    def __init__(self, fleet: FleetStats) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Any]:
        labels = ["alias", "host", "pid"]
        gauges = {
            name: GaugeMetricFamily(f"{PREFIX}_pool_{name}", text, labels=labels) for name, text in GAUGES.items()
        }
        counters = {c.name: CounterMetricFamily(f"{PREFIX}_{c.metric}", c.help, labels=labels) for c in COUNTERS}
        wait = HistogramMetricFamily(f"{PREFIX}_wait_seconds", "Time borrowers waited for a connection.", labels=labels)
        hold = HistogramMetricFamily(f"{PREFIX}_hold_seconds", "Time borrowers held a connection.", labels=labels)
        connect = HistogramMetricFamily(
            f"{PREFIX}_connect_seconds", "Time the pool took to open each new connection.", labels=labels
        )
        server = GaugeMetricFamily(
            f"{PREFIX}_server_connections",
            "Pooled connections the server reports, by state.",
            labels=["alias", "state"],
        )
        for alias in self.fleet.aliases.values():
            self._alias(alias, gauges, counters, (wait, hold, connect), server)
        yield from self._views()
        capacity_max = GaugeMetricFamily(
            f"{PREFIX}_capacity_available_connections", "max_connections minus reserved slots.", labels=["server"]
        )
        capacity_fleet = GaugeMetricFamily(
            f"{PREFIX}_capacity_fleet_max_size", "Sum of max_size over live processes and aliases.", labels=["server"]
        )
        capacity_over = GaugeMetricFamily(
            f"{PREFIX}_capacity_over",
            "1 when the fleet can open more connections than the server takes.",
            labels=["server"],
        )
        for capacity in self.fleet.capacity:
            capacity_max.add_metric([capacity.server], capacity.available)
            capacity_fleet.add_metric([capacity.server], capacity.fleet_max)
            capacity_over.add_metric([capacity.server], int(capacity.over))
        yield from gauges.values()
        yield from counters.values()
        yield from (wait, hold, connect, server, capacity_max, capacity_fleet, capacity_over)

    def _views(self) -> Iterator[Any]:
        labels = ["alias", "view", "host", "pid"]
        families = {
            key: CounterMetricFamily(f"{PREFIX}_view_{name}", text, labels=labels)
            for key, (name, text) in VIEW_FAMILIES.items()
        }
        top = read_stats_settings().top_views
        for alias in self.fleet.aliases.values():
            named = set([v.name for v in alias.top_views(recent=False) if v.name != OTHER][:top])
            for process in alias.live:
                sums: dict[str, list[float]] = {}
                for name, data in process.snapshot.views.items():
                    key = name if name in named else OTHER
                    row = sums.setdefault(key, [0.0] * len(VIEW_FAMILIES))
                    for i, value in enumerate(_view_values(data)):
                        row[i] += value
                for name, row in sums.items():
                    values = [alias.alias, name, process.host, str(process.pid)]
                    for family, value in zip(families.values(), row, strict=True):
                        family.add_metric(values, value)
        yield from families.values()

    @staticmethod
    def _alias(alias: AliasFleet, gauges: dict, counters: dict, times: tuple[Any, Any, Any], server: Any) -> None:
        wait, hold, connect = times
        for process in alias.live:
            s = process.snapshot
            values = [alias.alias, s.host, str(s.pid)]
            for name, family in gauges.items():
                family.add_metric(values, getattr(s, name))
            for key, family in counters.items():
                family.add_metric(values, s.counters.get(key, 0))
            for family, data in ((wait, s.wait), (hold, s.hold), (connect, s.connect)):
                buckets, total = histogram_buckets(data)
                family.add_metric(values, buckets, total)
        if alias.server_view is not None:
            for state, count in alias.server_view.by_state.items():
                server.add_metric([alias.alias, state], count)


#: The per-view families: key -> (name after ``django_pooled_pg_view_``, help).
VIEW_FAMILIES = {
    "borrows": ("borrows", "Borrows given back, per view (route name or module.function, task, borrow() block)."),
    "hold": ("hold_seconds", "Connection-seconds held, per view."),
    "wait": ("wait_seconds", "Seconds spent waiting for a connection, per view."),
    "rollbacks": ("rollbacks", "Connections a view gave back inside a transaction (rolled back)."),
    "responses_503": ("responses_503", "HTTP 503 responses of PoolMiddleware, per view."),
}


def _view_values(data: dict[str, Any]) -> tuple[float, ...]:
    """A published view's values in VIEW_FAMILIES' order."""
    hold, wait = data.get("hold", {}), data.get("wait", {})
    return (
        hold.get("count", 0),
        hold.get("total_us", 0) / 1_000_000,
        wait.get("total_us", 0) / 1_000_000,
        data.get("rollbacks", 0),
        data.get("responses_503", 0),
    )


def metrics(request: HttpRequest) -> HttpResponse:
    """The Prometheus text format of :func:`fleet_stats`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet_stats()))
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


urlpatterns = [path("", metrics, name="django_pooled_pg_metrics")]
