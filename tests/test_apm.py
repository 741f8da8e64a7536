"""Tools that wrap Django's connect() (APM: sentry-sdk and the like) and cursor classes of a
subclass's own (django-prometheus): the borrow shows through the one, the session reset survives
the other. The tools themselves run in tests/test_realsite.py."""

from __future__ import annotations

import functools
import threading
import time

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.postgresql.base import Cursor as DjangoCursor
from django.db.backends.signals import connection_created

from django_pooled_pg import apm, pinned
from django_pooled_pg.base import DatabaseWrapper
from django_pooled_pg.cursors import tracking_cursor_class

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def one_connection(pool_options):
    pool_options(min_size=1, max_size=1, timeout=5)


class Calls(list):
    """How long each wrapped connect() took; ``entered`` is set when one starts."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()


@pytest.fixture
def timed_connect():
    """Wrap BaseDatabaseWrapper.connect as an APM tool does, recording how long each call took."""
    original = BaseDatabaseWrapper.connect
    calls = Calls()

    @functools.wraps(original)
    def connect(self):
        started = time.monotonic()
        calls.entered.set()
        try:
            return original(self)
        finally:
            calls.append(time.monotonic() - started)

    BaseDatabaseWrapper.connect = connect
    yield calls
    BaseDatabaseWrapper.connect = original


def test_djangos_own_connect_is_not_taken_for_a_wrapper():
    assert not apm.connect_is_wrapped()


def test_a_wrapped_connect_times_the_wait_for_a_pool_connection(one_connection, timed_connect):
    connection.close()
    held = threading.Event()

    def hold():
        with pinned() as wrapper, wrapper.cursor() as cursor:
            cursor.execute("SELECT 1")
            timed_connect.entered.clear()  # (set by this thread's own connect)
            held.set()
            # Hold the only connection until the main thread's connect() has begun, and 0.5 s
            # more: that connect() waits at least that long, however late either thread runs.
            timed_connect.entered.wait(30)
            time.sleep(0.5)
        wrapper.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(30)
    timed_connect.clear()
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    thread.join()
    assert apm.connect_is_wrapped()
    assert len(timed_connect) == 1 and timed_connect[0] >= 0.5, timed_connect
    connection.close()


def test_a_wrapped_connect_sends_connection_created_once_per_session(one_connection, timed_connect):
    seen = []

    def receiver(sender, connection, **kwargs):
        seen.append(connection.alias)

    connection_created.connect(receiver)
    try:
        for _ in range(5):
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            connection.close()
    finally:
        connection_created.disconnect(receiver)
    assert len(timed_connect) == 5  # every borrow went through the wrapper
    assert seen == ["default"]  # the pool opened one session: one signal
    assert connection.autocommit is True and connection.connection is None


class CountingCursor(DjangoCursor):
    """A cursor class of a subclass's own, as django-prometheus makes one."""

    executed = 0

    def execute(self, *args, **kwargs):
        CountingCursor.executed += 1
        return super().execute(*args, **kwargs)


def test_a_cursor_class_of_ones_own_keeps_the_session_reset(one_connection):
    tracking = tracking_cursor_class(CountingCursor)
    assert issubclass(tracking, CountingCursor) and tracking_cursor_class(CountingCursor) is tracking
    connection.close()
    wrapper = DatabaseWrapper({**connection.settings_dict}, "default")
    wrapper.get_connection_params = lambda: {
        **DatabaseWrapper.get_connection_params(wrapper),
        "cursor_factory": CountingCursor,
    }
    wrapper.close_pool()
    try:
        with wrapper.cursor() as cursor:
            cursor.execute("SET statement_timeout = '4321ms'")
        wrapper.close()
        with wrapper.cursor() as cursor:
            cursor.execute("SHOW statement_timeout")
            assert cursor.fetchone()[0] == "0"
        assert CountingCursor.executed >= 2
    finally:
        wrapper.close()
        wrapper.close_pool()


def test_a_cursor_factory_that_is_not_a_cursor_class_is_refused():
    with pytest.raises(ImproperlyConfigured, match="cursor_factory .* psycopg.Cursor"):
        tracking_cursor_class(lambda *args: None)
