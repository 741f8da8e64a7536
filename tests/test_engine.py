"""The ENGINE against a real server: borrowing, sharing, Django's settings, clean returns."""

from __future__ import annotations

import threading

import psycopg
import pytest
from django.db import connection, connections, transaction
from django.db.backends.signals import connection_created
from django.test.utils import override_settings

from django_pooled_pg.pooling.ledger import current_view
from django_pooled_pg.pooling.registry import registry
from tests.app.models import Item
from tests.conftest import pool_in_use

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])


def backend_pid(alias: str = "default") -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def one(sql: str, params=None, alias: str = "default"):
    with connections[alias].cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0]


@pytest.fixture
def single_connection_pool():
    """The default alias with a pool of exactly one connection, so every borrow gets the same one."""
    settings_dict = connection.settings_dict
    saved = settings_dict["OPTIONS"]
    connection.close()
    settings_dict["OPTIONS"] = {**saved, "pool": {"min_size": 1, "max_size": 1, "timeout": 5}}
    yield
    connection.close()
    settings_dict["OPTIONS"] = saved
    connection.close_pool()


def test_queries_borrow_and_close_returns():
    connection.close()
    assert connection.connection is None
    token = current_view.set("tests.task")  # (a request's or task's borrow: held until close)
    try:
        Item.objects.create(name="a")
        assert connection.connection is not None
        assert pool_in_use(expect=1) == 1
        connection.close()
        assert pool_in_use() == 0
    finally:
        current_view.reset(token)
    assert Item.objects.count() == 1


def test_one_pool_per_alias_shared_by_threads():
    pools = []

    def work():
        Item.objects.count()
        pools.append(connection.pool)
        connection.close()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(p) for p in pools}) == 1
    assert pools[0] is registry.get("default")
    assert connections["other"].pool is not pools[0]
    assert one("SELECT current_database()", alias="other").endswith("pooled_pg_other")


def test_physical_connection_is_reused(single_connection_pool):
    first = backend_pid()
    connection.close()
    assert backend_pid() == first


def test_left_transaction_is_rolled_back(single_connection_pool, superuser):
    connection.set_autocommit(False)
    Item.objects.create(name="uncommitted")
    connection.close()
    assert superuser.execute("SELECT count(*) FROM testapp_item").fetchone()[0] == 0
    assert connection.get_autocommit()
    assert one("SELECT count(*) FROM testapp_item") == 0


def test_close_inside_atomic_returns_rolled_back(single_connection_pool, superuser):
    with pytest.raises(Exception):  # noqa: B017 (whichever Django raises: what follows is checked)
        with transaction.atomic():
            Item.objects.create(name="x")
            connection.close()
            Item.objects.count()  # Django refuses: the connection was closed in the block
    assert superuser.execute("SELECT count(*) FROM testapp_item").fetchone()[0] == 0
    stuck = superuser.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%%'"
    ).fetchone()[0]
    assert stuck == 0


SESSION_CHANGES = {
    "SET": ("SET statement_timeout = '1234ms'", "SELECT current_setting('statement_timeout')", "0"),
    "set_config": ("SELECT set_config('work_mem', '7MB', false)", "SELECT current_setting('work_mem')", "4MB"),
    "temp table": (
        "CREATE TEMP TABLE scratch (id int)",
        "SELECT count(*)::text FROM pg_tables WHERE tablename = 'scratch'",
        "0",
    ),
    "advisory lock": (
        "SELECT pg_advisory_lock(4242)",
        "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        "0",
    ),
    "LISTEN": ("LISTEN pooled_channel", "SELECT count(*)::text FROM pg_listening_channels()", "0"),
    "PREPARE": ("PREPARE pooled_stmt AS SELECT 1", "SELECT count(*)::text FROM pg_prepared_statements", "0"),
}


@pytest.mark.parametrize("change", sorted(SESSION_CHANGES))
def test_session_changes_do_not_reach_next_borrower(single_connection_pool, change):
    statement, probe, clean = SESSION_CHANGES[change]
    pid = backend_pid()
    with connection.cursor() as cursor:
        cursor.execute(statement)
        cursor.execute(probe)
        assert cursor.fetchone()[0] != clean
    connection.close()
    assert backend_pid() == pid, "the same connection should have been reused"
    assert one(probe) == clean


def test_set_role_is_reset_and_assume_role_kept(superuser):
    superuser.execute("DROP ROLE IF EXISTS pooled_reader")
    superuser.execute("CREATE ROLE pooled_reader")
    settings_dict = connection.settings_dict
    saved = settings_dict["OPTIONS"]
    connection.close()
    settings_dict["OPTIONS"] = {
        **saved,
        "assume_role": "pooled_reader",
        "pool": {"min_size": 1, "max_size": 1},
    }
    try:
        assert one("SELECT current_user") == "pooled_reader"
        with connection.cursor() as cursor:
            cursor.execute("SET ROLE NONE")  # back to the login user for this borrower
            cursor.execute("SELECT current_user")
            assert cursor.fetchone()[0] == settings_dict["USER"]
        connection.close()
        assert one("SELECT current_user") == "pooled_reader"
    finally:
        connection.close()
        settings_dict["OPTIONS"] = saved
        connection.close_pool()


def test_abandoned_iterator_cursor_is_closed(single_connection_pool):
    Item.objects.bulk_create(Item(name=str(i)) for i in range(50))
    iterator = Item.objects.iterator(chunk_size=10)
    next(iterator)
    assert one("SELECT count(*) FROM pg_cursors WHERE name <> ''") == 1
    connection.close()
    assert one("SELECT count(*) FROM pg_cursors WHERE name <> ''") == 0
    del iterator  # closing the abandoned generator must not disturb the next borrower
    with transaction.atomic():
        assert Item.objects.count() == 50


def test_pool_settings_stay_after_reset(single_connection_pool):
    with connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'Asia/Tokyo'")
    connection.close()
    assert one("SELECT current_setting('TimeZone')") == "UTC"


def test_broken_connection_is_discarded(single_connection_pool, superuser):
    pid = backend_pid()
    superuser.execute("SELECT pg_terminate_backend(%s)", [pid])
    with pytest.raises(Exception):  # noqa: B017 (whichever the lost session gives: what follows is checked)
        one("SELECT 1")
    connection.close()
    assert backend_pid() != pid


def test_connection_created_once_per_session(single_connection_pool):
    sessions = []

    def receiver(sender, connection, **kwargs):
        sessions.append(1)
        with connection.cursor() as cursor:
            cursor.execute("SET application_name = 'from_receiver'")

    connection_created.connect(receiver)
    try:
        connection.close_pool()
        for _ in range(5):
            assert one("SELECT current_setting('application_name')") == "from_receiver"
            connection.close()
        assert len(sessions) == 1, "sent once for the session, not on every borrow"
        with connection.cursor() as cursor:
            cursor.execute("SET search_path = nowhere")
        connection.close()
        # The reset wiped the borrower's setting and kept the receiver's (the session's
        # baseline), without running the receiver again.
        assert one("SELECT current_setting('application_name')") == "from_receiver"
        assert one("SELECT current_setting('search_path')") != "nowhere"
        assert len(sessions) == 1
    finally:
        connection_created.disconnect(receiver)


def test_isolation_level_option():
    settings_dict = connection.settings_dict
    saved = settings_dict["OPTIONS"]
    connection.close()
    settings_dict["OPTIONS"] = {**saved, "isolation_level": psycopg.IsolationLevel.SERIALIZABLE}
    try:
        with transaction.atomic():
            assert one("SHOW transaction_isolation") == "serializable"
    finally:
        connection.close()
        settings_dict["OPTIONS"] = saved
        connection.close_pool()
    with transaction.atomic():
        assert one("SHOW transaction_isolation") == "read committed"


def test_server_side_binding_and_disabled_server_side_cursors():
    settings_dict = connection.settings_dict
    saved_options = settings_dict["OPTIONS"]
    connection.close()
    settings_dict["OPTIONS"] = {**saved_options, "server_side_binding": True}
    settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = True
    try:
        Item.objects.create(name="bound", value=3)
        assert list(Item.objects.filter(value=3).values_list("name", flat=True)) == ["bound"]
        assert [i.name for i in Item.objects.iterator()] == ["bound"]
        assert one("SELECT count(*) FROM pg_cursors WHERE name <> ''") == 0
    finally:
        connection.close()
        settings_dict["OPTIONS"] = saved_options
        settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = False
        connection.close_pool()


def test_time_zone_setting_applies_to_sessions():
    settings_dict = connection.settings_dict
    connection.close()
    with override_settings(USE_TZ=True):
        settings_dict["TIME_ZONE"] = "Europe/Paris"
        for attr in ("timezone", "timezone_name"):
            connection.__dict__.pop(attr, None)
        try:
            assert one("SELECT current_setting('TimeZone')") == "Europe/Paris"
        finally:
            connection.close()
            settings_dict["TIME_ZONE"] = None
            for attr in ("timezone", "timezone_name"):
                connection.__dict__.pop(attr, None)
    assert one("SELECT current_setting('TimeZone')") == "UTC"


def test_health_checks_and_custom_check_option(single_connection_pool, superuser):
    checked = []

    def check(conn):
        checked.append(conn)
        conn.execute("SELECT 1")

    settings_dict = connection.settings_dict
    saved = settings_dict["OPTIONS"]
    connection.close()
    settings_dict["OPTIONS"] = {**saved, "pool": {"min_size": 1, "max_size": 1, "check": check}}
    try:
        pid = backend_pid()
        connection.close()
        superuser.execute("SELECT pg_terminate_backend(%s)", [pid])
        # The check finds the dead connection, the pool replaces it, the query succeeds.
        assert backend_pid() != pid
        assert checked
    finally:
        connection.close()
        settings_dict["OPTIONS"] = saved
        connection.close_pool()


def test_close_pool_and_new_pool_on_settings_change():
    Item.objects.count()
    pool = connection.pool
    connection.close()
    connection.close_pool()
    assert pool.closed
    Item.objects.count()
    assert connection.pool is not pool and not connection.pool.closed


def test_a_borrow_resets_what_djangos_connect_resets():
    """Every attribute Django's BaseDatabaseWrapper.connect() sets is reset by a borrow
    (base.CONNECT_STATE) or set by the borrow its own way (CONNECT_STATE_ELSEWHERE): a Django
    release that adds one to connect() fails here, before a borrow leaves it stale."""
    import ast
    import inspect
    import textwrap

    from django.db.backends.base.base import BaseDatabaseWrapper

    from django_pooled_pg.base import CONNECT_STATE, CONNECT_STATE_ELSEWHERE, reset_connect_state

    tree = ast.parse(textwrap.dedent(inspect.getsource(BaseDatabaseWrapper.connect)))
    django_sets = {
        target.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Attribute) and getattr(target.value, "id", "") == "self"
    }
    assert django_sets == set(CONNECT_STATE) | set(CONNECT_STATE_ELSEWHERE)

    class Wrapper:
        pass

    wrapper = Wrapper()
    reset_connect_state(wrapper)
    assert set(vars(wrapper)) == set(CONNECT_STATE)
