"""The [otel] extra: this process's pools through OpenTelemetry's metrics API, with the names,
units and attributes of the semantic conventions for connection pools, read by the SDK's
in-memory reader from a real pool in both release modes."""

from __future__ import annotations

import importlib
import sys
import threading

import pytest
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, transaction
from django.test.utils import override_settings

from django_pooled_pg import PoolExhausted
from django_pooled_pg.pooling.ledger import ledger
from django_pooled_pg.pooling.registry import registry
from django_pooled_pg.pooling.stats import SECONDS_BOUNDS, Histogram
from django_pooled_pg.settings import find_stats_problems, opentelemetry_wanted
from django_pooled_pg.telemetry import snapshot
from tests.app.models import Item
from tests.test_fork import run_in_child
from testsupport.waiting import wait_until

pytest.importorskip("opentelemetry.sdk.metrics")
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint  # noqa: E402

from django_pooled_pg import opentelemetry as otel  # noqa: E402

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

POOL = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
#: The convention's instruments: name -> (unit, kind). Kinds: "updown" (a non-monotonic sum),
#: "counter" (a monotonic sum), "histogram".
CONVENTION = {
    "db.client.connection.count": ("{connection}", "updown"),
    "db.client.connection.idle.max": ("{connection}", "updown"),
    "db.client.connection.idle.min": ("{connection}", "updown"),
    "db.client.connection.max": ("{connection}", "updown"),
    "db.client.connection.pending_requests": ("{request}", "updown"),
    "db.client.connection.timeouts": ("{timeout}", "counter"),
    "db.client.connection.create_time": ("s", "histogram"),
    "db.client.connection.wait_time": ("s", "histogram"),
    "db.client.connection.use_time": ("s", "histogram"),
}


@pytest.fixture
def reader():
    """An SDK MeterProvider with an in-memory reader, instrumented (explicitly, not global)."""
    memory = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[memory])
    assert otel.instrument(meter_provider=provider) is True
    assert otel.instrument(meter_provider=provider) is False  # idempotent
    yield memory
    provider.shutdown()


@pytest.fixture(params=["request", "transaction"])
def release(request, pool_options):
    """A fresh pool of the default alias (min 2, max 4) in each release mode."""
    pool_options(min_size=2, max_size=4, timeout=5, release=request.param)
    return request.param


def collect(reader: InMemoryMetricReader) -> dict:
    """{instrument name: the SDK's Metric} of one collection (our scope only)."""
    data = reader.get_metrics_data()
    found = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            if scope.scope.name == "django_pooled_pg":
                found.update({metric.name: metric for metric in scope.metrics})
    return found


def point(metrics: dict, name: str, alias: str = "default", state: str | None = None):
    """The data point of ``name`` for the pool ``alias`` (and connection ``state``), or None."""
    metric = metrics.get(name)
    wanted = {POOL: alias, **({STATE: state} if state else {})}
    matching = [p for p in (metric.data.data_points if metric else []) if dict(p.attributes) == wanted]
    assert len(matching) <= 1, matching
    return matching[0] if matching else None


def queries(n: int) -> None:
    """``n`` borrows, each one statement and given back."""
    for _ in range(n):
        Item.objects.count()
        connections["default"].close()


def hold(n: int, release: threading.Event) -> list[threading.Thread]:
    """``n`` threads that each hold a connection (in an atomic block: in use in both release
    modes) until ``release`` is set."""
    got = threading.Barrier(n + 1)

    def run() -> None:
        try:
            with transaction.atomic():
                Item.objects.count()
                got.wait()
                release.wait(30)
        finally:
            connections["default"].close()

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    got.wait(10)
    return threads


def settle(predicate, seconds: float = 30.0) -> None:
    """Wait until ``predicate()`` holds (the pool opens and closes connections in the background)."""
    wait_until(predicate, timeout=seconds, interval=0.02, message="the pool to settle")


def test_every_instrument_has_the_conventions_name_unit_kind_and_pool_name(reader, release):
    queries(2)
    metrics = collect(reader)
    assert set(CONVENTION) <= set(metrics), sorted(set(CONVENTION) - set(metrics))
    for name, (unit, kind) in CONVENTION.items():
        metric = metrics[name]
        assert metric.unit == unit, name
        assert metric.description, name
        points = metric.data.data_points
        assert points and all(POOL in p.attributes for p in points), name
        if kind == "histogram":
            assert all(isinstance(p, HistogramDataPoint) for p in points), name
            assert all(list(p.explicit_bounds) == list(SECONDS_BOUNDS) for p in points), name
        else:
            assert all(isinstance(p, NumberDataPoint) for p in points), name
            assert metric.data.is_monotonic is (kind == "counter"), name
    states = {p.attributes[STATE] for p in metrics["db.client.connection.count"].data.data_points}
    assert states == {"idle", "used"}
    assert point(metrics, "db.client.connection.max").value == 4
    assert point(metrics, "db.client.connection.idle.max").value == 4
    assert point(metrics, "db.client.connection.idle.min").value == 2
    # The pool is named after its alias: one series per alias in use.
    Item.objects.using("other").count()
    connections["other"].close()
    assert point(collect(reader), "db.client.connection.max", alias="other").value == 4


def settled_size() -> int:
    """The default pool's size once every connection it is opening is open (and idle)."""
    pool = registry.get("default")

    def opened() -> bool:
        stats = pool.get_stats()
        return stats["pool_size"] == stats["pool_available"] >= pool.min_size

    settle(opened)
    return pool.get_stats()["pool_size"]


def test_connections_in_use_and_idle(reader, release):
    queries(1)
    size = settled_size()  # min_size 2, or 3: the first borrower waited, and the pool grew
    done = threading.Event()
    threads = hold(2, done)
    try:
        metrics = collect(reader)
        assert point(metrics, "db.client.connection.count", state="used").value == 2
        assert point(metrics, "db.client.connection.count", state="idle").value == size - 2
        assert point(metrics, "db.client.connection.pending_requests").value == 0
    finally:
        done.set()
        for t in threads:
            t.join()
    metrics = collect(reader)
    assert point(metrics, "db.client.connection.count", state="used").value == 0
    assert point(metrics, "db.client.connection.count", state="idle").value == size


def test_waiting_borrower_and_a_real_timeout(reader, pool_options):
    pool_options(min_size=1, max_size=1, timeout=0.5)
    before = point(collect(reader), "db.client.connection.timeouts")
    before = before.value if before else 0
    done = threading.Event()
    threads = hold(1, done)
    failed: list[BaseException] = []

    def wait_in_vain() -> None:
        try:
            Item.objects.count()
        except BaseException as exc:
            failed.append(exc)
        finally:
            connections["default"].close()

    waiter = threading.Thread(target=wait_in_vain)
    try:
        waiter.start()
        settle(lambda: registry.get("default").get_stats().get("requests_waiting", 0) == 1)
        assert point(collect(reader), "db.client.connection.pending_requests").value == 1
        waiter.join(5)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert len(failed) == 1 and isinstance(failed[0], PoolExhausted), failed
    metrics = collect(reader)
    assert point(metrics, "db.client.connection.timeouts").value == before + 1
    assert point(metrics, "db.client.connection.pending_requests").value == 0


def test_wait_and_use_time_count_every_borrow(reader, release):
    stats = ledger.stats_for("default")
    queries(1)
    first = collect(reader)
    wait0 = point(first, "db.client.connection.wait_time")
    use0 = point(first, "db.client.connection.use_time")
    assert wait0.count == stats.wait.count and use0.count == stats.hold.count
    borrows0 = stats.borrows
    queries(5)
    with transaction.atomic():  # one borrow of three statements
        Item.objects.count()
        Item.objects.count()
        Item.objects.count()
    connections["default"].close()
    metrics = collect(reader)
    wait, use = point(metrics, "db.client.connection.wait_time"), point(metrics, "db.client.connection.use_time")
    assert stats.borrows - borrows0 == 6
    assert wait.count - wait0.count == 6 and use.count - use0.count == 6
    assert wait.count == stats.wait.count and use.count == stats.hold.count
    # Each duration is recorded at its bucket's middle: within half a bucket (6.25%) of the truth.
    assert use.sum == pytest.approx(stats.hold.total_us / 1e6, rel=0.07)
    assert sum(use.bucket_counts) == use.count


def test_create_time_counts_the_connections_opened(reader, release):
    stats = ledger.stats_for("default")
    queries(1)
    size = settled_size()
    assert size < 4  # (max_size: room for one more)
    first = point(collect(reader), "db.client.connection.create_time")
    assert first.count == stats.opened == stats.connect.count
    opened = stats.opened
    done = threading.Event()
    threads = hold(size + 1, done)  # one more than the pool has: it opens one
    done.set()
    for t in threads:
        t.join()
    create = point(collect(reader), "db.client.connection.create_time")
    assert stats.opened > opened
    assert create.count - first.count == stats.opened - opened
    assert 0 < create.sum < create.count * 5.0  # seconds, not microseconds
    # The same histogram is in the snapshot (and so in the fleet table and Prometheus).
    [mine] = snapshot.take("default")
    assert Histogram.from_dict(mine.connect).count == stats.opened


def test_instrumented_before_fork_a_child_reports_its_own_borrows(reader, release):
    """instrument() in a gunicorn master before the fork: the child's callbacks read its own
    pools, and its histograms record its own borrows (the parent's were recorded already)."""
    queries(3)
    before = point(collect(reader), "db.client.connection.wait_time").count

    def child():
        queries(2)
        metrics = collect(reader)
        return {
            "wait": point(metrics, "db.client.connection.wait_time").count,
            "borrows": ledger.stats_for("default").borrows,
            "used": point(metrics, "db.client.connection.count", state="used").value,
        }

    report = run_in_child(child)
    assert report["borrows"] == 2 and report["used"] == 0
    # The SDK's storage came over the fork with the parent's count; the child adds its own 2.
    assert report["wait"] == before + 2


def test_the_collecting_thread_records_not_the_borrower(reader, release):
    """Nothing reaches the SDK between collections: borrowing records into the package's own
    histograms only, and the collection records the increase."""
    queries(1)
    collect(reader)
    otel_metrics = otel._instrumented[-1][1]
    recorded = sum(otel_metrics._recorded[("default", "wait")].values())
    queries(4)
    assert sum(otel_metrics._recorded[("default", "wait")].values()) == recorded
    collect(reader)
    assert sum(otel_metrics._recorded[("default", "wait")].values()) == recorded + 4


def test_midpoint_stays_in_its_bucket():
    histogram = Histogram()
    for seconds in (0.0, 0.000003, 0.00042, 0.0123, 1.7):
        histogram.record(seconds)
        index = max(i for i, n in enumerate(histogram.counts) if n)
        value = otel.midpoint(index, histogram.max_us)
        single = Histogram()
        single.record(value)
        assert single.counts[index] == 1, (seconds, value)


def test_setting_turns_it_on_and_is_checked():
    assert [p.id for p in find_stats_problems({"OPENTELEMETRY": "yes"}, {})] == ["django_pooled_pg.E015"]
    assert find_stats_problems({"OPENTELEMETRY": True}, {}) == []
    with override_settings(POOLED_PG={"OPENTELEMETRY": 1}):
        assert not opentelemetry_wanted()  # not True: the check reports it instead
        assert "django_pooled_pg.E015" in [e.id for e in run_checks()]
    with override_settings(POOLED_PG={"STATS_INTERVAL": None, "OPENTELEMETRY": True}):
        assert opentelemetry_wanted()
        from django.apps import apps

        apps.get_app_config("django_pooled_pg").ready()
        assert any(provider is None for provider, _ in otel._instrumented)  # the global provider
        assert otel.instrument() is False


def test_missing_api_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "django_pooled_pg.opentelemetry")
    with pytest.raises(ImproperlyConfigured, match=r"pip install 'django-pooled-pg\[otel\]'"):
        importlib.import_module("django_pooled_pg.opentelemetry")
