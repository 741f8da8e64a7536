"""The tools projects run beside the ENGINE, each switched on by REALSITE_TOOLS (see settings)."""

import html
import re

import pytest
from django.conf import settings
from django.db import connection

from catalog.models import Product

needs = {
    tool: pytest.mark.skipif(tool not in settings.TOOLS, reason=f"REALSITE_TOOLS has no {tool}")
    for tool in ("toolbar", "sentry", "prometheus", "otel")
}


def sql_panel_forms(page: str) -> list[str]:
    """The signed query data behind the SQL panel's "Sel" and "Expl" buttons."""
    return [html.unescape(v) for v in re.findall(r'name="signed" value="([^"]+)"', page)]


@needs["toolbar"]
@pytest.mark.django_db(transaction=True)
def test_toolbar_pages_that_query(client):
    Product.objects.create(name="lamp")
    response = client.get("/products/")
    assert response.status_code == 200, response.content[:2000]
    assert response.json()["names"] == ["lamp"]
    page = client.get("/admin/login/").content.decode()  # an HTML page: the toolbar is in it
    assert "djDebug" in page


@needs["toolbar"]
@pytest.mark.django_db(transaction=True)
def test_toolbar_select_and_explain_buttons(client, django_user_model):
    django_user_model.objects.create_superuser("admin", "a@example.com", "pw")
    client.login(username="admin", password="pw")
    Product.objects.create(name="lamp")
    page = client.get("/admin/catalog/product/").content.decode()
    forms = sql_panel_forms(page)
    assert forms, "the SQL panel lists no queries"
    for button in ("sql_select", "sql_explain"):
        response = client.post(f"/__debug__/{button}/", {"signed": forms[-1]})
        assert response.status_code == 200, response.content[:2000]
        assert "content" in response.json()


@needs["toolbar"]
@pytest.mark.django_db(transaction=True)
def test_toolbar_wrapped_cursors_do_not_pin_the_connection(client):
    """With release="transaction" the connection goes back after each statement, also when the
    toolbar wraps the cursor."""
    state = client.get("/state/").json()
    assert state["held"] is (settings.RELEASE != "transaction")


@needs["prometheus"]
@pytest.mark.django_db(transaction=True)
def test_django_prometheus_database_metrics(client):
    Product.objects.create(name="lamp")
    assert client.get("/products/").status_code == 200
    metrics = client.get("/metrics").content.decode()
    executes = re.search(r'^django_db_execute_total\{alias="default",vendor="postgresql"\} (\S+)$', metrics, re.M)
    assert executes and float(executes.group(1)) >= 2, metrics[:3000]
    assert re.search(r'^django_db_query_duration_seconds_count\{alias="default",vendor="postgresql"\}', metrics, re.M)


@needs["prometheus"]
@pytest.mark.django_db(transaction=True)
def test_django_prometheus_keeps_the_session_reset(client):
    """Its cursor class must not switch off the reset: a SET made by one request is gone for
    the next borrower of the same server session."""
    first = client.post("/session/set/", data=b'{"timeout": "4321ms"}', content_type="application/json").json()
    shown = client.get("/session/show/").json()
    assert shown["pid"] == first["pid"]  # REALSITE_POOL_MAX=1: the same server session
    assert shown["statement_timeout"] == "0"


@needs["sentry"]
@pytest.mark.django_db(transaction=True)
def test_sentry_sees_the_wait_for_a_connection(client):
    """A request that waits for the pool's only connection: Sentry's "connect" span covers the
    wait (its Django integration times BaseDatabaseWrapper.connect)."""
    import threading
    import time

    import sentry_sdk

    from catalog.sentry import ENVELOPES

    connection.close()  # as a server's request thread, hold nothing before the request
    held = threading.Event()
    done = threading.Event()

    def hold():
        with connection.cursor() as cursor, _pinned():
            cursor.execute("SELECT 1")
            held.set()
            # Until the request waits for the connection, however late it runs on a busy
            # machine, and 0.6 s more: its "connect" span covers that much at least.
            deadline = time.monotonic() + 30
            while connection.pool.get_stats().get("requests_waiting", 0) < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(0.6)
        connection.close()
        done.set()

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(5)
    ENVELOPES.clear()
    with sentry_sdk.start_transaction(name="waits", op="test"):
        assert client.get("/pid/").status_code == 200
    thread.join()
    sentry_sdk.flush()
    spans = [
        span
        for env in ENVELOPES
        for item in env.items
        if item.type == "transaction"
        for span in item.payload.json["spans"]
    ]
    connects = [s for s in spans if s["op"] == "db" and s["description"] == "connect"]
    assert connects, [(s["op"], s["description"]) for s in spans]
    assert max(_seconds(s["timestamp"]) - _seconds(s["start_timestamp"]) for s in connects) >= 0.4


def _seconds(stamp):
    from datetime import datetime

    return stamp if isinstance(stamp, (int, float)) else datetime.fromisoformat(stamp).timestamp()


def _pinned():
    from contextlib import nullcontext

    from django_pooled_pg import pinned

    return pinned() if settings.ENGINE == "ours" else nullcontext()


@needs["sentry"]
@pytest.mark.django_db(transaction=True)
def test_sentry_borrows_do_not_resend_connection_created(client):
    """Going through Django's connect for Sentry's sake must not send connection_created per
    borrow: the session had it once, when the pool opened it."""
    from django.db.backends.signals import connection_created

    calls = []

    def receiver(sender, connection, **kwargs):
        calls.append(connection.alias)

    connection_created.connect(receiver)
    try:
        client.get("/pid/")  # the pool is open now
        calls.clear()
        pids = {client.get("/pid/").json()["pid"] for _ in range(5)}
    finally:
        connection_created.disconnect(receiver)
    if settings.ENGINE == "ours":
        assert len(calls) <= len(pids) - 1 or calls == [], (calls, pids)


@needs["otel"]
@pytest.mark.django_db(transaction=True)
def test_opentelemetry_query_spans(client):
    """OpenTelemetry's psycopg and Django instrumentation: a server span for the request and a
    span with db.statement for each of its queries, in both release modes."""
    exporter = settings.OTEL_SPANS
    exporter.clear()
    Product.objects.create(name="lamp")
    assert client.get("/products/").json()["names"] == ["lamp"]
    spans = exporter.get_finished_spans()
    statements = [s.attributes.get("db.statement") or s.attributes.get("db.query.text") or "" for s in spans]
    assert any("catalog_product" in text and text.lstrip().upper().startswith("SELECT") for text in statements), (
        statements
    )
    assert any("INSERT" in text for text in statements), statements
    assert any(s.kind.name == "SERVER" for s in spans), [(s.name, s.kind) for s in spans]
