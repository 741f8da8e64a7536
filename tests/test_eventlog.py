"""Repeated warnings do not flood the log: the first per kind, view and database in full, then a
summary with the count; the counters stay exact."""

from __future__ import annotations

import logging

import pytest
from django.test import Client

from django_pooled_pg import eventlog
from django_pooled_pg.pooling.ledger import ledger
from tests.conftest import held_borrows, warnings_from
from testsupport.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def test_threads_ending_with_a_connection_are_logged_once_then_summed_up(caplog, pool_options, monkeypatch):
    """A view that queries in fresh threads (each ends holding its connection): one warning with
    the details, one summary line with the count of the others, every one counted."""
    pool_options(min_size=1, max_size=3, timeout=5)
    stats = ledger.stats_for("default")
    reclaimed = stats.reclaimed
    client = Client()
    with caplog.at_level(logging.WARNING, logger="django_pooled_pg"):
        for _ in range(20):
            assert client.get("/executor-holding/").json() == {"counts": [0, 0, 0]}  # 3 threads each
        wait_until(lambda: not held_borrows(), message="the executor threads' connections given back")
        ended = stats.reclaimed - reclaimed  # (an executor thread may run two of a request's queries)
        assert not held_borrows() and ended >= 20, ended
        details = warnings_from(caplog, "ended holding a connection to database 'default'")
        assert len(details) == 1  # (an executor's thread has no view: contextvars stay behind)
        monkeypatch.setattr(eventlog, "SUMMARY_INTERVAL", 0.0)
        assert eventlog.flush() == 1
        [summary] = warnings_from(caplog, "a thread ended holding a connection: ")
        assert f"{ended - 1} more time(s)" in summary and "on database 'default'" in summary
        assert eventlog.flush() == 0, "nothing new to sum up"


def test_each_view_gets_its_first_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="django_pooled_pg"):
        for _ in range(5):
            assert Client().get("/left-open/").status_code == 200
            assert Client().get("/atomic-left-open/").status_code == 200
    assert len(warnings_from(caplog, "view tests.app.views.left_open left a transaction open")) == 1
    assert len(warnings_from(caplog, "view tests.app.views.atomic_left_open left")) == 1


def test_unbounded_view_names_share_one_key(monkeypatch, caplog):
    monkeypatch.setattr(eventlog, "MAX_KEYS", 3)
    with caplog.at_level(logging.WARNING, logger="django_pooled_pg"):
        for i in range(10):
            eventlog.warn("a 503", "default", f"/path/{i}", "503 for GET /path/%d", i)
    assert len(warnings_from(caplog, "503 for GET /path/")) == 4  # 3 keys, then "other views" once
    assert len(eventlog._seen) == 4
