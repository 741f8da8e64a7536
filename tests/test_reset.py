"""The session reset does not read SQL: whatever a borrower left in its session never reaches the
next borrower of that server session, in both release modes, and the baseline the pool set up
(time zone, connection_created receivers' settings) stays."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection
from django.db.backends.signals import connection_created

from django_pooled_pg import pinned
from tests.conftest import TIMEOUT, backend_pid, one, parked_conn
from testsupport.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(params=["request", "transaction"])
def one_connection(request, pool_options, superuser):
    """A pool of one connection, so the next borrower gets the same server session."""
    superuser.execute(
        "CREATE OR REPLACE FUNCTION pooled_sneaky() RETURNS text LANGUAGE sql AS "
        "$$ SELECT set_config('statement_timeout', '1234ms', false) $$"
    )
    pool_options(min_size=1, max_size=1, timeout=5, release=request.param)
    return request.param


def leave(kind: str) -> None:
    """What a careless borrower does, the way the reset used to miss it."""
    with pinned():
        with connection.cursor() as cursor:
            if kind == "comment before SET":
                cursor.execute("/* tuning */ SET statement_timeout = '1234ms'")
            elif kind == "line comment before SET":
                cursor.execute("-- tuning\nSET statement_timeout = '1234ms'")
            elif kind == "SET after another statement":
                cursor.execute("SELECT 1; /* x */ SET statement_timeout = '1234ms'")
            elif kind == "callproc set_config":
                cursor.callproc("set_config", ["statement_timeout", "1234ms", False])
            elif kind == "DO block":
                cursor.execute("DO $$ BEGIN EXECUTE 'SET statement_timeout = ''1234ms'''; END $$")
            elif kind == "function":
                cursor.execute("SELECT pooled_sneaky()")
            elif kind == "raw psycopg":
                connection.connection.execute("SET statement_timeout = '1234ms'")
            else:
                raise AssertionError(kind)
        assert one(TIMEOUT) == "1234ms"


@pytest.mark.parametrize(
    "kind",
    [
        "comment before SET",
        "line comment before SET",
        "SET after another statement",
        "callproc set_config",
        "DO block",
        "function",
        "raw psycopg",
    ],
)
def test_hidden_session_settings_do_not_reach_the_next_borrower(one_connection, kind):
    pid = backend_pid()
    connection.close()
    leave(kind)
    connection.close()  # the end of the request
    assert backend_pid() == pid, "the same server session serves the next borrower"
    assert one(TIMEOUT) == "0"


STATE = {
    "temp table": (
        "CREATE TEMP TABLE scratch (id int)",
        "SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()",
    ),
    "advisory lock": (
        "SELECT pg_advisory_lock(4242)",
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
    ),
    "LISTEN": ("LISTEN pooled_channel", "SELECT count(*) FROM pg_listening_channels()"),
    "prepared statement": (
        "PREPARE pooled_stmt AS SELECT 1",
        "SELECT count(*) FROM pg_prepared_statements WHERE name = 'pooled_stmt'",
    ),
    "WITH HOLD cursor": (
        "DECLARE pooled_held CURSOR WITH HOLD FOR SELECT 1",
        "SELECT count(*) FROM pg_cursors WHERE name = 'pooled_held'",
    ),
    "role": ("SET ROLE pg_read_all_data", "SELECT (current_user = 'pg_read_all_data')::int"),
}


@pytest.mark.parametrize("kind", sorted(STATE))
def test_session_objects_do_not_reach_the_next_borrower(one_connection, kind):
    statement, probe = STATE[kind]
    with pinned(), connection.cursor() as cursor:
        cursor.execute(statement)
        cursor.execute(probe)
        assert cursor.fetchone()[0] == 1
    connection.close()
    assert one(probe) == 0


def test_the_baseline_stays(one_connection):
    """A receiver's SET and the pool's time zone survive the reset; the receiver runs once."""
    calls = []

    def receiver(sender, connection, **kwargs):
        calls.append(1)
        with connection.cursor() as cursor:
            cursor.execute("SET application_name = 'from_receiver'")

    connection_created.connect(receiver)
    try:
        connection.close_pool()
        with pinned(), connection.cursor() as cursor:
            cursor.execute("SET application_name = 'dirty'; SET TIME ZONE 'Asia/Tokyo'")
            cursor.execute("SELECT pooled_sneaky()")
        connection.close()
        assert one("SELECT current_setting('application_name')") == "from_receiver"
        assert one("SELECT current_setting('TimeZone')") == "UTC"
        assert one(TIMEOUT) == "0"
        assert len(calls) == 1
    finally:
        connection_created.disconnect(receiver)
        connection.close()
        connection.close_pool()


def test_every_borrow_is_reset_even_one_that_ran_nothing(one_connection):
    """The rule has no exceptions to get wrong: whatever a borrower did, through whichever
    path (a cursor, a raw psycopg connection, none), its connection is reset when it goes back."""
    one("SELECT 1")
    connection.close()
    stats = connection.pool.stats
    resets = stats.resets
    for _ in range(5):
        connection.ensure_connection()
        connection.close()
    assert stats.resets == resets + 5
    connection.ensure_connection()
    connection.connection.pgconn.exec_(b"SET statement_timeout = '4321ms'")  # libpq itself
    connection.close()
    assert one(TIMEOUT) == "0"


def test_a_parked_connection_taken_by_another_borrower_is_reset_first(pool_options):
    """release="transaction": a statement's session state without a pinning tag (set_config in
    a SELECT) stays with its thread while it keeps the connection; another thread that takes the
    parked connection gets it reset."""
    pool_options(min_size=1, max_size=1, timeout=5, release="transaction")
    one("SELECT set_config('statement_timeout', '1234ms', false)")
    assert connection.connection is None  # parked: no tag pins it
    assert one(TIMEOUT) == "1234ms"  # the thread took its own connection back
    seen = []

    def other():
        seen.append((one(TIMEOUT), backend_pid()))
        connection.close()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen and seen[0][0] == "0"
    assert one(TIMEOUT) == "0"  # the thread's connection was taken: it has a reset one now
    connection.close()


# ----- The reset is sent as the connection goes back (django_pooled_pg/pooling/reset.py) ----------

DIRTY = "SELECT set_config('statement_timeout', '4321ms', false)"


def dirty_and_given_back():
    """A borrower leaves a setting and gives back: the thread keeps the connection, its reset
    sent (its answer not read yet)."""
    assert one(DIRTY) == "4321ms"
    connection.close()
    kept = parked_conn()
    assert kept is not None and kept._pooled_pg_pending, "kept, its reset sent"
    return kept


#: What a borrower leaves on the server that other sessions wait on or see, and how another
#: session sees it (the borrower's backend pid as the parameter).
SEEN_FROM_OUTSIDE = {
    "advisory lock": (
        "SELECT pg_advisory_lock(4242)",
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND pid = %s",
    ),
    "temp table": (
        "CREATE TEMP TABLE pooled_scratch (id int)",
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = 'pooled_scratch' AND n.nspname LIKE 'pg_temp%%' AND %s IS NOT NULL",
    ),
    "LISTEN": (
        "LISTEN pooled_channel",
        # (a session's LISTENs are its own to see; its last statement shows the reset ran)
        "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND query <> 'DISCARD ALL'",
    ),
}


@pytest.mark.parametrize("kind", sorted(SEEN_FROM_OUTSIDE))
def test_what_a_borrower_left_is_gone_from_the_server_when_it_gives_back(one_connection, superuser, kind):
    """Nothing a borrower left waits for the next borrower: another session sees the lock free
    and the temporary table gone right after the return, with the connection idle in the pool
    (on the code before, the reset went with the next borrower's first statement: the lock
    stayed held while nobody borrowed)."""
    statement, seen = SEEN_FROM_OUTSIDE[kind]
    with pinned(), connection.cursor() as cursor:
        cursor.execute(statement)
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    assert superuser.execute(seen, [pid]).fetchone()[0] == 1
    connection.close()  # the end of the request
    started = time.monotonic()
    wait_until(
        lambda: superuser.execute(seen, [pid]).fetchone()[0] == 0,
        timeout=10,
        message=f"the {kind} gone on the server with the connection idle in the pool",
    )
    print(f"\nFIGURE {kind} gone after the return: {(time.monotonic() - started) * 1000:.1f} ms")
    assert superuser.execute("SELECT state, query FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone() == (
        "idle",
        "DISCARD ALL",
    )
    assert backend_pid() == pid, "the next borrower: the same session"


def first_through(path: str) -> str:
    """The statement_timeout the next borrower sees when its first statement goes ``path``."""
    from django.db import transaction

    from django_pooled_pg import pinned

    if path == "atomic":
        with transaction.atomic():
            return one(TIMEOUT)
    with pinned():
        conn = connection.connection
        if path == "raw psycopg execute":
            return conn.execute(TIMEOUT).fetchone()[0]
        if path == "psycopg transaction()":
            with conn.transaction():
                return conn.execute(TIMEOUT).fetchone()[0]
        if path == "psycopg pipeline()":
            with conn.pipeline():
                cursor = conn.execute(TIMEOUT)
            return cursor.fetchone()[0]
        if path == "named cursor":
            with conn.cursor(name="pooled_first", withhold=True) as cursor:
                cursor.execute(TIMEOUT)
                return cursor.fetchone()[0]
        if path == "executemany":
            with conn.cursor() as cursor:
                cursor.executemany(TIMEOUT + " || %s", [("",)], returning=True)
                return cursor.fetchone()[0]
        if path == "copy":
            with conn.cursor() as cursor:
                with cursor.copy(f"COPY ({TIMEOUT}) TO STDOUT") as copy:
                    return b"".join(bytes(chunk) for chunk in copy).decode().strip()
        if path == "stream":
            with conn.cursor() as cursor:
                return next(cursor.stream(TIMEOUT))[0]
        if path == "two statements in one string":
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1; " + TIMEOUT)
                assert cursor.nextset()
                return cursor.fetchone()[0]
        if path == "a large answer":
            # The server sends what does not fit its 8 KB buffer before the Sync: the answers
            # come in several reads (reset.py's _answers waits for each).
            with connection.cursor() as cursor:
                cursor.execute(f"SELECT ({TIMEOUT}), repeat('x', 1000) FROM generate_series(1, 3000)")
                rows = cursor.fetchall()
            assert len(rows) == 3000 and rows[-1][1] == "x" * 1000
            return rows[0][0]
        if path == "a statement larger than the socket takes at once":
            with connection.cursor() as cursor:
                cursor.execute(f"SELECT length(%s), ({TIMEOUT})", ["x" * 16_000_000])
                length, timeout = cursor.fetchone()
            assert length == 16_000_000
            return timeout
        if path == "VACUUM":
            with connection.cursor() as cursor:
                cursor.execute("VACUUM testapp_item")  # (not in a transaction block: the reset was apart)
            return one(TIMEOUT)
        if path == "a syntax error":
            with pytest.raises(Exception, match="syntax"):
                with connection.cursor() as cursor:
                    cursor.execute("SELEC 1")
            return one(TIMEOUT)
        if path == "a bad parameter":
            with pytest.raises(Exception, match="placeholder"):
                with connection.cursor() as cursor:
                    cursor.execute("SELECT %s, %s", [1])  # (refused before anything is sent)
            return one(TIMEOUT)
        if path == "an error":
            with pytest.raises(Exception, match="division by zero"):
                with connection.cursor() as cursor:
                    cursor.execute("SELECT 1 / 0")
            return one(TIMEOUT)
    raise AssertionError(path)


@pytest.mark.parametrize(
    "path",
    [
        "atomic",
        "raw psycopg execute",
        "psycopg transaction()",
        "psycopg pipeline()",
        "named cursor",
        "executemany",
        "copy",
        "stream",
        "two statements in one string",
        "VACUUM",
        "a syntax error",
        "a bad parameter",
        "an error",
        "a large answer",
        "a statement larger than the socket takes at once",
    ],
)
def test_whichever_way_the_first_statement_goes_the_session_is_reset_first(one_connection, path):
    pid = backend_pid()
    connection.close()
    dirty_and_given_back()
    assert first_through(path) == "0"
    assert backend_pid() == pid, "the same server session"
    connection.close()
    assert one(TIMEOUT) == "0"


def test_an_error_at_the_implicit_commit_of_the_first_statement_is_its_own(one_connection, superuser):
    """A deferred foreign key fails when the statement's implicit transaction commits, after the
    statement's own results: the error is the statement's, the connection stays usable (it
    was "cannot exit pipeline mode while busy" and a closed connection, in Django's own suite)."""
    from django.db import IntegrityError

    superuser.execute(
        "DROP TABLE IF EXISTS pooled_child, pooled_parent; CREATE TABLE pooled_parent (id int PRIMARY KEY); "
        "CREATE TABLE pooled_child (p int REFERENCES pooled_parent DEFERRABLE INITIALLY DEFERRED)"
    )
    try:
        pid = backend_pid()
        connection.close()
        dirty_and_given_back()
        with pytest.raises(IntegrityError, match="foreign key"):
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO pooled_child VALUES (42) RETURNING p")
        assert one(TIMEOUT) == "0" and backend_pid() == pid, "reset, and the same session"
    finally:
        connection.close()
        superuser.execute("DROP TABLE pooled_child, pooled_parent")


def test_the_first_statement_of_a_borrow_is_a_transaction_of_its_own(one_connection):
    """now() is the start of the statement's own transaction: on the code before, the reset and
    the first statement shared one implicit transaction, and now() was the reset's time."""
    one(DIRTY)
    connection.close()
    assert one("SELECT now() = statement_timestamp()") is True
    connection.close()


def test_statements_psycopg_prepared_still_run_after_the_reset(default_settings):
    """With prepare_threshold set, psycopg prepares statements on the server: the reset
    (DEALLOCATE ALL within DISCARD ALL) goes through psycopg's execute() at the return, so psycopg
    forgets them too; sent behind its back, its next borrower's statement would name one the
    server no longer has."""
    default_settings(
        pool={"min_size": 1, "max_size": 1, "timeout": 5},
        options={"server_side_binding": True, "prepare_threshold": 0},
    )
    pids = set()
    for n in range(3):
        with connection.cursor() as cursor:
            cursor.execute("SELECT %s::int + 1, pg_backend_pid()", [n])
            value, pid = cursor.fetchone()
            assert value == n + 1
            pids.add(pid)
            cursor.execute("SELECT count(*) FROM pg_prepared_statements")
            assert cursor.fetchone()[0] >= 1, "psycopg prepared it"
        connection.close()
    assert len(pids) == 1, "the same session each time"


@pytest.mark.parametrize("release", ["request", "transaction"])
def test_session_reset_false_hands_sessions_on_as_they_are(pool_options, release):
    """The documented opt-out: no reset, as Django's pool and persistent connections behave. What
    a borrower set reaches the next borrower of the session, and no reset is counted."""
    pool_options(min_size=1, max_size=1, timeout=5, release=release, session_reset=False)
    resets = connection.pool.stats.resets if connection.pool else 0
    with pinned():
        assert one(DIRTY) == "4321ms"
        pid = backend_pid()
    connection.close()
    assert backend_pid() == pid and one(TIMEOUT) == "4321ms", "the session as its last borrower left it"
    connection.close()
    assert connection.pool.stats.resets == resets
