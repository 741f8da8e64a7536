"""Per-view attribution in one process: each borrow is counted under the view (route name or
``module.function``), task or ``borrow()`` block that made it, with its wait and hold, the
transactions it left open and its 503s; the published row and Prometheus stay bounded whatever
the number of views. (tests/test_views_fleet.py: the same through gunicorn and ``poolstats``.)"""

from __future__ import annotations

import threading

import pytest
from django.db import connection
from django.test import Client, RequestFactory
from django.test.utils import override_settings
from django.urls import resolve

from django_pooled_pg import borrow
from django_pooled_pg.middleware import PoolMiddleware
from django_pooled_pg.pooling.ledger import current_view, ledger
from django_pooled_pg.pooling.stats import BEFORE_VIEW, OTHER, process_label
from django_pooled_pg.telemetry import publisher, snapshot
from tests.app.models import Item

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(params=["request", "transaction"])
def release(request, pool_options):
    pool_options(min_size=1, max_size=4, timeout=5, release=request.param)
    return request.param


def views() -> dict:
    return {v.name: v for v in ledger.stats_for("default").named_views()}


def held(name: str) -> tuple[int, int]:
    """(holds, hold_us) of view ``name`` so far."""
    view = views().get(name)
    return (view.hold.count, view.hold.total_us) if view is not None else (0, 0)


def test_each_request_is_counted_under_its_view(release):
    """Unnamed routes are named ``module.function``, as Django's ResolverMatch does; the wait of
    every borrow and the hold of every return land in that view's entry, and the alias's totals
    are the sum of its views'."""
    before = {name: held(name) for name in ("tests.app.views.query", "tests.app.views.slow")}
    stats = ledger.stats_for("default")
    borrows_before = stats.borrows
    client = Client()
    for _ in range(3):
        assert client.get("/query/").status_code == 200
    assert client.get("/slow/?s=0.2").status_code == 200
    query = views()["tests.app.views.query"]
    slow = views()["tests.app.views.slow"]
    assert query.hold.count - before["tests.app.views.query"][0] == 3
    assert slow.hold.count - before["tests.app.views.slow"][0] == 1
    slow_us = slow.hold.total_us - before["tests.app.views.slow"][1]
    if release == "request":  # held through the sleep
        assert slow_us >= 200_000
    else:  # given back after its one statement, before the sleep
        assert slow_us < 200_000
    assert stats.borrows - borrows_before == 4
    every = stats.named_views()
    assert stats.wait.count == sum(v.wait.count for v in every)
    assert stats.hold.total_us == sum(v.hold.total_us for v in every)


def test_route_names_are_used_where_routes_have_them():
    """A named route is counted under its name with its namespace (the admin's login page is
    ``admin:login``), as Django's ``ResolverMatch.view_name`` spells it."""
    request = RequestFactory().get("/admin/login/")
    request.resolver_match = resolve("/admin/login/")
    token = current_view.set(request.path)
    try:
        PoolMiddleware(lambda r: None).process_view(request, request.resolver_match.func, (), {})
        assert current_view.get() == "admin:login"
    finally:
        current_view.reset(token)


def test_borrow_blocks_and_threads_outside_requests(release):
    """Outside requests: a ``borrow()`` block is counted under its name, or under the function
    that opened it; a bare thread under the process's label."""
    here = f"{__name__}.test_borrow_blocks_and_threads_outside_requests"
    before = held("nightly-report")[0], held(here)[0]
    with borrow(name="nightly-report"):
        Item.objects.count()
    with borrow():
        Item.objects.count()
    assert (held("nightly-report")[0], held(here)[0]) == (before[0] + 1, before[1] + 1)

    def bare():
        Item.objects.count()
        connection.close()

    before = held(process_label())[0]
    thread = threading.Thread(target=bare)
    thread.start()
    thread.join()
    assert held(process_label())[0] == before + 1


def test_rollbacks_and_503s_are_the_views(pool_options, caplog):
    pool_options(min_size=1, max_size=1, timeout=0.3)
    left_open = "tests.app.views.left_open"
    before = views()[left_open].rollbacks if left_open in views() else 0
    assert Client().get("/left-open/").status_code == 200
    assert views()[left_open].rollbacks == before + 1
    # A 503: every connection held by this thread's borrow() while a request wants one.
    errors = []

    def request_in_thread():
        errors.append(Client().get("/query/").status_code)

    with borrow():
        Item.objects.count()
        thread = threading.Thread(target=request_in_thread)
        thread.start()
        thread.join()
    assert errors == [503]
    assert views()["tests.app.views.query"].responses_503 >= 1
    stats = ledger.stats_for("default")
    assert stats.responses_503 == sum(v.responses_503 for v in stats.named_views())


def test_borrows_before_the_view_are_not_counted_per_path(pool_options):
    """The middleware names a request by its path until the view is resolved; a borrow made
    then (by another middleware) counts under one entry for all paths, not one per path, and in
    request mode its hold is the view's once the view is known."""
    pool_options(min_size=1, max_size=4, timeout=5)
    token = current_view.set("/some/path/42/")
    try:
        Item.objects.count()
        assert connection._borrow.stats.name == BEFORE_VIEW
        ledger.name_view("tests.app.views.query")  # what process_view does
        assert connection._borrow.view == "tests.app.views.query"
    finally:
        current_view.reset(token)
        before = held("tests.app.views.query")[0]
        connection.close()
    assert held("tests.app.views.query")[0] == before + 1
    assert "/some/path/42/" not in views()


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_the_published_row_and_prometheus_stay_bounded():
    """500 distinct views: a process's row names at most 2 x PUBLISHED_VIEWS of them (the rest
    summed as "other"), and Prometheus exports TOP_VIEWS + 1 view labels. On the alias "other",
    so that the process's 500 views of "default" (MAX_VIEWS) stay free for the other tests."""
    for i in range(500):
        with borrow("other", name=f"generated-view-{i:03d}") as wrapper, wrapper.cursor() as cursor:
            cursor.execute("SELECT 1")
    row = snapshot.take("other")[0]
    assert len(row.views) <= 2 * snapshot.PUBLISHED_VIEWS + 1
    assert OTHER in row.views
    assert sum(v["hold"]["count"] for v in row.views.values()) == ledger.stats_for("other").hold.count
    with override_settings(POOLED_PG={"STATS_INTERVAL": None, "TOP_VIEWS": 7}):
        assert publisher.publish_now() >= 1
        from django_pooled_pg.prometheus import metrics

        text = metrics(None).content.decode()
    labels = {
        line.split('view="', 1)[1].split('"', 1)[0]
        for line in text.splitlines()
        if line.startswith("django_pooled_pg_view_borrows_total{") and 'alias="other"' in line
    }
    assert len(labels) == 7 + 1, sorted(labels)
    assert OTHER in labels


def test_top_views_setting_and_poolstats_options_are_checked():
    from django.core.management import CommandError, call_command

    from django_pooled_pg.settings import find_stats_problems

    problems = find_stats_problems({"TOP_VIEWS": 0}, {})
    assert [(p.id, p.setting) for p in problems] == [("django_pooled_pg.E012", 'POOLED_PG["TOP_VIEWS"]')]
    assert "an integer >= 1" in str(problems[0])
    assert find_stats_problems({"TOP_VIEWS": 3}, {}) == []
    with pytest.raises(CommandError, match="give one of them"):
        call_command("poolstats", "--views", "--holders")
    with pytest.raises(CommandError, match="at least 1"):
        call_command("poolstats", "--views", "--top", "0")


def test_the_readiness_view_is_not_in_the_view_statistics(pool_options):
    """Polled every second by every load balancer, it borrows nothing, so it never shows up."""
    pool_options(min_size=1, max_size=2, timeout=5)
    client = Client()
    assert client.get("/query/").status_code == 200
    for _ in range(20):
        assert client.get("/ready/").status_code == 200
    names = set(views())
    assert "tests.app.views.query" in names
    assert not [name for name in names if "ready" in name], names


def test_streaming_and_async_views_are_counted_under_their_names(release):
    """A streaming response queries as the server iterates it, after the middleware returned; an
    async view's ORM calls run in a worker thread: both are still the view's."""
    from asgiref.sync import async_to_sync
    from django.test import AsyncClient

    before = held("tests.app.views.stream")[0], held("tests.app.views.async_view")[0]
    response = Client().get("/stream/")
    assert b"".join(response.streaming_content) == b"0,0\n1,0\n2,0\n"
    response.close()
    assert async_to_sync(AsyncClient().get)("/async/").status_code == 200
    after = held("tests.app.views.stream")[0], held("tests.app.views.async_view")[0]
    assert after[0] > before[0] and after[1] > before[1], (before, after, sorted(views()))
    assert current_view.get() is None
