"""The [prometheus] extra: every statistic of the fleet, scraped from any one process."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test import Client

from django_pooled_pg import publish_now
from tests.app.models import Item
from tests.test_fork import run_in_child

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.django_db(transaction=True)


def scrape() -> dict:
    response = Client().get("/metrics/")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    return {family.name: family for family in text_string_to_metric_families(response.content.decode())}


def test_metrics_cover_every_process_with_conventional_names_and_types():
    Item.objects.count()
    connection.close()
    publish_now()

    def child():  # another process of the fleet, as a gunicorn worker is
        for _ in range(3):
            Item.objects.count()
            connection.close()
        return {"published": publish_now()}

    assert run_in_child(child)["published"] >= 1
    families = scrape()

    borrows = families["django_pooled_pg_borrows"]  # the parser strips the _total suffix
    assert borrows.type == "counter"
    default = [s for s in borrows.samples if s.labels["alias"] == "default" and s.name.endswith("_total")]
    assert len({s.labels["pid"] for s in default}) == 2, default
    assert all(s.value > 0 for s in default)

    for name in (
        "django_pooled_pg_pool_size",
        "django_pooled_pg_pool_in_use",
        "django_pooled_pg_pool_waiting",
        "django_pooled_pg_capacity_available_connections",
    ):
        assert families[name].type == "gauge", name
    for name in (
        "django_pooled_pg_exhausted",
        "django_pooled_pg_leaks",
        "django_pooled_pg_reclaimed",
        "django_pooled_pg_rollbacks",
        "django_pooled_pg_connections_opened",
        "django_pooled_pg_responses_503",
    ):
        assert families[name].type == "counter", name

    wait = families["django_pooled_pg_wait_seconds"]
    assert wait.type == "histogram"
    samples = [s for s in wait.samples if s.labels["alias"] == "default"]
    counts = [s for s in samples if s.name.endswith("_count")]
    buckets = [s for s in samples if s.name.endswith("_bucket")]
    assert len(counts) == 2 and all(c.value >= 1 for c in counts)
    inf = [b for b in buckets if b.labels["le"] == "+Inf"]
    assert sorted(b.value for b in inf) == sorted(c.value for c in counts)
    hold = families["django_pooled_pg_hold_seconds"]
    assert hold.type == "histogram"
    connect = families["django_pooled_pg_connect_seconds"]  # each process opened one at least
    assert connect.type == "histogram"
    opened = [s for s in connect.samples if s.labels["alias"] == "default" and s.name.endswith("_count")]
    assert len(opened) == 2 and all(c.value >= 1 for c in opened), opened


def test_histogram_buckets_are_cumulative_and_round_up():
    from django_pooled_pg.pooling.stats import Histogram
    from django_pooled_pg.prometheus import histogram_buckets

    histogram = Histogram()
    for seconds in (0.00005, 0.0003, 0.0003, 0.002, 0.7, 50.0):
        histogram.record(seconds)
    buckets, total = histogram_buckets(histogram.to_dict())
    by_le = dict(buckets)
    assert by_le["0.0001"] == 1 and by_le["0.0005"] == 3 and by_le["0.0025"] == 4
    assert by_le["1.0"] == 5 and by_le["30.0"] == 5 and by_le["+Inf"] == 6
    values = [n for _, n in buckets]
    assert values == sorted(values)
    assert total == pytest.approx(50.70265, rel=1e-3)


def test_every_counter_is_exported_the_parked_ones_too(pool_options):
    """Every counter of the one table (stats.COUNTERS) is a Prometheus counter with its help
    text, and what release="transaction" counts reaches it (parked_reused was counted in-process
    and published nowhere)."""
    from django_pooled_pg.pooling.stats import COUNTERS

    pool_options(release="transaction")
    with connection.cursor() as cursor:  # outside atomic: parked after each, taken back by the next
        cursor.execute("SELECT 1")
        cursor.execute("SELECT 2")
    connection.close()
    publish_now()
    families = scrape()
    for counter in COUNTERS:
        family = families[f"django_pooled_pg_{counter.metric}"]
        assert family.type == "counter" and family.documentation == counter.help, counter
    reused = [s for s in families["django_pooled_pg_parked_reused"].samples if s.name.endswith("_total")]
    assert sum(s.value for s in reused) >= 1, reused
