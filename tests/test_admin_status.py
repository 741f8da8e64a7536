"""The connection pool status page in the admin (django_pooled_pg/admin.py), with Django's test
client: who may see it, what it shows, that hostile names stay text and query text never shows,
the history behind its chart, and that it stays fast with 200 processes x 5 aliases.

The page reads the published rows over connections of its own, so these tests commit
(``transaction=True``), as tests/test_poolstats.py does. The browser test is
tests/test_admin_browser.py."""

from __future__ import annotations

import json
import os
import time

import psycopg
import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection, connections
from django.test import Client
from django.test.utils import CaptureQueriesContext

from django_pooled_pg import publish_now
from django_pooled_pg.models import PoolSnapshot
from django_pooled_pg.telemetry import history, snapshot
from django_pooled_pg.telemetry.publisher import TABLE
from tests.app.models import Item

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

PAGE = "/admin/django_pooled_pg/poolsnapshot/"
JSON = PAGE + "status.json"


def query(alias: str = "default") -> None:
    Item.objects.using(alias).count()
    connections[alias].close()


def user(name: str, *, staff: bool = True, view: bool = False, superuser: bool = False) -> User:
    if superuser:
        made = User.objects.create_superuser(name, f"{name}@example.com", "pw")
    else:
        made = User.objects.create_user(name, f"{name}@example.com", "pw", is_staff=staff)
    if view:
        made.user_permissions.add(
            Permission.objects.get(codename="view_poolsnapshot", content_type__app_label="django_pooled_pg")
        )
    return made


def client_for(who: User | None) -> Client:
    client = Client()
    if who is not None:
        client.force_login(who)
    return client


def plain(superuser, application_name: str) -> psycopg.Connection:
    """A connection to the test database outside any pool, with this application_name."""
    info = superuser.info
    return psycopg.connect(
        dbname=info.dbname,
        user=info.user,
        host=info.host,
        port=info.port,
        password=info.password or None,
        application_name=application_name,
        autocommit=True,
    )


# ----- Who may see it -----------------------------------------------------------------------------


def test_permissions():
    query()
    publish_now()
    anonymous = client_for(None)
    for url in (PAGE, JSON):
        response = anonymous.get(url)
        assert response.status_code == 302 and "/admin/login/" in response["Location"]
    # Not staff, even with the permission: the admin's login redirect.
    response = client_for(user("customer", staff=False, view=True)).get(PAGE)
    assert response.status_code == 302 and "/admin/login/" in response["Location"]

    # Staff without the permission: 403, and 403 JSON from the endpoint; no entry on the index.
    clerk = client_for(user("clerk"))
    assert clerk.get(PAGE).status_code == 403
    response = clerk.get(JSON)
    assert response.status_code == 403 and response["Content-Type"] == "application/json"
    assert "permission" in response.json()["error"]
    assert PAGE not in clerk.get("/admin/").content.decode()

    # Staff with view_poolsnapshot, and superusers: the index lists it, the page and JSON open.
    for who in (user("ops", view=True), user("root", superuser=True)):
        client = client_for(who)
        index = client.get("/admin/").content.decode()
        assert f'href="{PAGE}"' in index and "Connection pools" in index
        assert client.get(PAGE).status_code == 200
        response = client.get(JSON)
        assert response.status_code == 200 and response["Content-Type"] == "application/json"

    # View only: no add, change or delete pages, no add link.
    ops = client_for(User.objects.get(username="root"))
    assert ops.get(PAGE + "add/").status_code == 404
    row = PoolSnapshot.objects.values_list("id", flat=True).first()
    for action in ("change", "delete", "history"):
        assert ops.get(f"{PAGE}{row}/{action}/").status_code == 404
    assert f'href="{PAGE}add/"' not in ops.get("/admin/").content.decode()


# ----- What it shows --------------------------------------------------------------------------


def test_page_shows_the_fleet_in_the_admins_look():
    query()
    query("other")
    publish_now()
    page = client_for(user("ops", view=True)).get(PAGE)
    html = page.content.decode()
    assert page.status_code == 200
    # The admin's own page: its base template (and dark mode stylesheet), breadcrumbs, our assets.
    assert "admin/css/base.css" in html and "admin/css/dark_mode.css" in html
    assert "breadcrumbs" in html and 'href="/admin/django_pooled_pg/"' in html
    assert "<h1>Connection pools</h1>" in html
    assert "django_pooled_pg/status.js" in html and "django_pooled_pg/status.css" in html
    assert f'data-json-url="{JSON}"' in html
    # Per alias: totals, times, capacity, a row for this process, the server's view, the chart.
    for alias in ("default", "other"):
        assert f'data-alias="{alias}"' in html
    host, pid = snapshot.hostname(), os.getpid()
    assert f'data-key="{host}:{pid}"' in html and f"<td>{pid}</td>" in html
    for words in (
        "In use",
        "Waiting",
        "Borrows",
        "Timeouts",
        "Leaks",
        "Server capacity",
        "p95 wait",
        "p95 hold",
        "Last seen",
        "The server's view",
        "Idle in transaction",
        "The last ",
    ):
        assert words in html, words

    model = client_for(User.objects.get(username="ops")).get(JSON).json()
    default = next(a for a in model["aliases"] if a["alias"] == "default")
    [row] = [r for r in default["processes"] if r["key"] == f"{host}:{pid}"]
    assert row["cells"][:2] == [host, str(pid)] and not row["stale"]
    assert int(default["totals"]["borrows"].replace(",", "")) >= 1
    assert default["capacity"]["available"] == "97" and not default["capacity"]["over"]
    assert default["server"]["rows"][0]["key"] == f"{host}:{pid}"
    assert "chart" not in default, "the chart comes with ?chart=1 only"
    charted = client_for(User.objects.get(username="ops")).get(JSON + "?chart=1").json()
    assert "chart" in charted["aliases"][0]


def test_stale_processes_are_greyed(superuser):
    query()
    publish_now()
    superuser.execute(
        f"INSERT INTO {TABLE} (host, pid, alias, started_at, published_at, stale_after, data) "
        "SELECT 'gone-host', 7, alias, started_at, now() - interval '60 seconds', stale_after, "
        "jsonb_set(jsonb_set(data, '{host}', '\"gone-host\"'), '{pid}', '7') "
        f"FROM {TABLE} WHERE pid = %s AND alias = 'default'",
        [os.getpid()],
    )
    html = client_for(user("ops", view=True)).get(PAGE).content.decode()
    assert '<tr class="dpp-stale" data-key="gone-host:7">' in html
    assert "ago (stale)" in html


def test_hostile_names_are_text_and_query_text_is_never_shown(superuser):
    """application_name and host names come from anyone who can connect: they must stay text.
    Query text can carry user data in its literals: the page never reads it."""
    query()
    publish_now()
    # A connection that names itself like a pooled one, with markup for a host: the server's view
    # lists it as a process that does not publish.
    evil = plain(superuser, "dpp default <img src=x onerror=alert(1)>:4242")
    script = plain(superuser, "<script>alert('app')</script>")
    try:
        evil.execute("BEGIN")
        evil.execute("SELECT 'SECRET-LITERAL-4242' AS card_number")  # now idle in transaction
        script.execute("SELECT 'SECRET-LITERAL-4243'")
        # And a published row whose host is markup.
        superuser.execute(
            f"INSERT INTO {TABLE} (host, pid, alias, started_at, published_at, stale_after, data) "
            "SELECT '<b>bold-host</b>', 9, alias, started_at, now(), stale_after, "
            "jsonb_set(jsonb_set(data, '{host}', '\"<b>bold-host</b>\"'), '{pid}', '9') "
            f"FROM {TABLE} WHERE pid = %s AND alias = 'default'",
            [os.getpid()],
        )
        ops = client_for(user("ops", view=True))
        html = ops.get(PAGE).content.decode()
        assert "&lt;img src=x onerror=alert(1)&gt;:4242 (not publishing)" in html
        assert "<img src=x" not in html
        assert "&lt;b&gt;bold-host&lt;/b&gt;" in html and "<b>bold-host" not in html
        assert "alert('app')" not in html and "<script>alert" not in html
        assert "SECRET-LITERAL" not in html

        response = ops.get(JSON + "?chart=1")
        assert response["Content-Type"] == "application/json"
        assert "SECRET-LITERAL" not in response.content.decode()
        default = next(a for a in response.json()["aliases"] if a["alias"] == "default")
        cells = [r["cells"][0] for r in default["server"]["rows"]]
        assert "<img src=x onerror=alert(1)>:4242 (not publishing)" in cells  # data, for textContent
        assert "<b>bold-host</b>" in [r["cells"][0] for r in default["processes"]]
        # The long idle in transaction shows as a duration, never as its query.
        # (it names itself as one of the alias's connections, so it is counted as one)
        assert default["server"]["idle_in_transaction"] == "1"
        assert default["server"]["longest_idle_in_transaction"].endswith("s")
    finally:
        evil.close()
        script.close()


# ----- The history behind the chart ---------------------------------------------------------------


def test_publishing_appends_history_points_and_the_page_charts_them(superuser, monkeypatch):
    monkeypatch.setattr(history, "_previous", {})
    query()
    publish_now()
    query()
    query()
    publish_now()  # within STEP of the first point: no second point yet
    points = superuser.execute(
        "SELECT alias, in_use, size, max_size, borrows FROM django_pooled_pg_poolhistory "
        "WHERE pid = %s AND alias = 'default'",
        [os.getpid()],
    ).fetchall()
    assert [p[0] for p in points] == ["default"] and points[0][3] == 4 and points[0][4] >= 1
    monkeypatch.setattr(history, "STEP", 0.0)
    publish_now()
    borrows = [
        b
        for (b,) in superuser.execute(
            "SELECT borrows FROM django_pooled_pg_poolhistory WHERE pid = %s AND alias = 'default' ORDER BY id",
            [os.getpid()],
        )
    ]
    assert len(borrows) == 2 and borrows[1] == 2, "the second point counts the borrows since the first"

    read = history.read()
    assert not read.errors
    # The reader sums the borrows of the bucket still filling apart from the complete ones. Which
    # one holds our points depends on the wall clock (a 30 s boundary may pass during the test,
    # the more likely the busier the machine), so look where the server's clock puts them.
    series = read.aliases["default"]
    [(filling,)] = superuser.execute(
        "SELECT bool_and(floor(extract(epoch FROM taken_at) / 30) = floor(%s / 30)) "
        "FROM django_pooled_pg_poolhistory WHERE pid = %s AND alias = 'default'",
        [series.end, os.getpid()],
    ).fetchall()
    if filling:
        assert series.current_borrows >= 2 and not series.at, series  # the bucket filling now
    else:
        assert sum(series.borrows) + series.current_borrows >= 2 and series.at, series
    # Our points have been checked: without them the complete buckets below are the inserted
    # ones alone, whichever 30 s boundaries the clock crosses from here on.
    superuser.execute("DELETE FROM django_pooled_pg_poolhistory WHERE pid = %s", [os.getpid()])
    # Complete buckets are time-weighted fleet averages: two processes of max_size 4, each point
    # standing for 10 s, three points each in a 30 s bucket -> 8.
    superuser.execute(
        "INSERT INTO django_pooled_pg_poolhistory (taken_at, host, pid, alias, size, max_size, in_use, "
        "waiting, borrows, wait_p95, span) "
        "SELECT to_timestamp((floor(extract(epoch FROM now()) / 30) - 1) * 30 + s * 10 + 1), 'h', p, "
        "'default', 4, 4, p, 0, 5, 0.002, 10 FROM generate_series(0, 2) AS s, generate_series(1, 2) AS p"
    )
    series = history.read().aliases["default"]
    assert series.max_size == [8.0] and series.in_use == [3.0] and series.wait_p95 == [0.002]
    model = client_for(user("ops", view=True)).get(JSON + "?chart=1").json()
    chart = next(a for a in model["aliases"] if a["alias"] == "default")["chart"]
    # The complete bucket, then the live totals (this process alone, max_size 4) now.
    assert chart["points"] == 2 and chart["max_size"].startswith("M") and chart["max_size"].count("L") == 1
    assert chart["conn_top"] == "10" and chart["last_in_use"] == "0"


def test_a_process_that_covers_part_of_a_bucket_shows_its_level_not_a_ramp(superuser):
    """A process whose points cover only the last 10 s of a 30 s bucket (it had just started):
    its max_size counts at its value, not at a third of it."""
    superuser.execute(
        "INSERT INTO django_pooled_pg_poolhistory (taken_at, host, pid, alias, size, max_size, in_use, "
        "waiting, borrows, wait_p95, span) "
        "SELECT to_timestamp((floor(extract(epoch FROM now()) / 30) - 1) * 30 + 25), 'young', 77, "
        "'default', 10, 10, 2, 0, 5, 0.001, 10"
    )
    series = history.read().aliases["default"]
    assert series.max_size[-1] == 10.0 and series.in_use[-1] == 2.0, (series.max_size, series.in_use)


def test_history_is_pruned_after_an_hour(superuser, monkeypatch):
    superuser.execute(
        "INSERT INTO django_pooled_pg_poolhistory (taken_at, host, pid, alias, size, max_size, in_use, "
        "waiting, borrows, wait_p95, span) SELECT now() - interval '2 hours', 'old', 1, 'default', 1, 1, 0, 0, 0, 0, 10 "
        "FROM generate_series(1, 10)"
    )
    monkeypatch.setattr(history, "_previous", {})
    query()
    publish_now()
    left = superuser.execute("SELECT count(*) FROM django_pooled_pg_poolhistory WHERE host = 'old'").fetchone()[0]
    assert left == 0


def test_a_missing_history_table_costs_the_chart_not_the_publication(superuser, monkeypatch):
    monkeypatch.setattr(history, "_previous", {})
    query()
    superuser.execute("ALTER TABLE django_pooled_pg_poolhistory RENAME TO poolhistory_away")
    try:
        assert publish_now() >= 1
        read = history.read()
        assert not read.aliases and "migrate django_pooled_pg" in read.errors[0]
        html = client_for(user("ops", view=True)).get(PAGE).content.decode()
        assert "no history table" in html and f'data-key="{snapshot.hostname()}:{os.getpid()}"' in html
    finally:
        superuser.execute("ALTER TABLE poolhistory_away RENAME TO django_pooled_pg_poolhistory")


# ----- 200 processes x 5 aliases -------------------------------------------------------------------


@pytest.mark.slow  # (360,000 history rows: about 12 s)
def test_a_big_fleet_renders_fast_with_a_bounded_number_of_queries(superuser):
    query()
    publish_now()
    ops = client_for(user("ops", view=True))

    def render() -> tuple[int, float, int]:
        with CaptureQueriesContext(connection) as queries:
            started = time.perf_counter()
            response = ops.get(PAGE)
            elapsed = time.perf_counter() - started
        assert response.status_code == 200
        return len(queries), elapsed, len(response.content)

    few_queries, _, _ = render()

    # 200 processes x 5 aliases, from this process's real row (real histograms), and an hour of
    # history for each (360 points: one per 10 s).
    superuser.execute(
        f"INSERT INTO {TABLE} (host, pid, alias, started_at, published_at, stale_after, data) "
        "SELECT 'host-' || (n %% 10), 10000 + n, a, started_at, now(), 3600, "
        "jsonb_set(jsonb_set(jsonb_set(data, '{host}', to_jsonb('host-' || (n %% 10))), '{pid}', to_jsonb(10000 + n)), "
        "'{alias}', to_jsonb(a)) "
        f"FROM {TABLE}, generate_series(1, 200) AS n, unnest(ARRAY['default', 'other', 'replica', 'a1', 'a2']) AS a "
        "WHERE pid = %s AND alias = 'default'",
        [os.getpid()],
    )
    superuser.execute(
        "INSERT INTO django_pooled_pg_poolhistory (taken_at, host, pid, alias, size, max_size, in_use, "
        "waiting, borrows, wait_p95, span) "
        "SELECT now() - make_interval(secs => s * 10), 'host-' || (n % 10), 10000 + n, a, 4, 4, n % 5, "
        "n % 2, 10, 0.001 * (n % 7), 10 FROM generate_series(1, 200) AS n, generate_series(0, 359) AS s, "
        "unnest(ARRAY['default', 'other', 'replica', 'a1', 'a2']) AS a"
    )
    superuser.execute("ANALYZE django_pooled_pg_poolhistory")
    render()  # warm
    timings = []
    for _ in range(3):
        queries, elapsed, size = render()
        timings.append(elapsed)
        assert queries == few_queries, "no queries per process, alias or row"
    best = min(timings)
    started = time.perf_counter()
    response = ops.get(JSON)
    json_elapsed = time.perf_counter() - started
    model = response.json()
    assert len(model["aliases"]) == 5 and all(len(a["processes"]) >= 200 for a in model["aliases"])
    started = time.perf_counter()
    ops.get(JSON + "?chart=1")
    chart_elapsed = time.perf_counter() - started
    print(
        f"\nstatus page, 1000 process rows x 5 aliases + 360,000 history points: "
        f"{few_queries} Django queries; page {best * 1000:.0f} ms (best of 3: "
        f"{', '.join(f'{t * 1000:.0f}' for t in timings)} ms), {size // 1024} KiB; "
        f"JSON {json_elapsed * 1000:.0f} ms ({len(response.content) // 1024} KiB); "
        f"JSON with chart {chart_elapsed * 1000:.0f} ms"
    )
    assert few_queries <= 6
    # Wall clock, so generous: about 1.6 s on an idle 2-core machine, 4.7 s with two CPU-bound
    # processes beside it. Queries per row would show in the count above; a render that grows
    # with the square of the rows would take far longer than this.
    assert best < 10.0, f"the page took {best:.2f}s"
    json.dumps(model)
