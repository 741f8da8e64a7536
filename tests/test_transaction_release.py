"""release="transaction": the connection goes back after each statement or outermost
transaction, unless something needs the same session."""

from __future__ import annotations

import random
import threading
import time

import psycopg
import pytest
from asgiref.sync import async_to_sync
from django.db import connection, connections, transaction
from django.db.models import F, Sum
from django.test import AsyncClient, Client
from django.test.utils import override_settings

from django_pooled_pg import pinned
from django_pooled_pg.pooling.ledger import ledger
from django_pooled_pg.pooling.registry import registry
from tests.app.models import Account, Item
from tests.conftest import held_borrows, is_kept, parked_conn, pool_in_use, wait_backends_gone
from testsupport.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def per_transaction(pool_options):
    pool_options(min_size=2, max_size=4, timeout=5, release="transaction")


def held() -> bool:
    return connection.connection is not None


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def active_borrows() -> list:
    """Connections of the default alias in use (the test databases' set-up may hold others)."""
    return [b for b in ledger.borrows.values() if not b.parked and b.alias == "default"]


def test_each_statement_gives_back():
    Item.objects.create(name="a")
    assert not held() and pool_in_use() == 0
    assert Item.objects.count() == 1
    assert not held() and not active_borrows()


def test_parked_connection_is_taken_back_by_the_next_statement():
    first = backend_pid()
    requests = connection.pool.get_stats().get("requests_num", 0)
    for _ in range(5):
        assert backend_pid() == first  # the same session, without a trip through the pool
        time.sleep(0.002)  # (past DIP: each a hold of its own, taken back as one)
    assert connection.pool.get_stats().get("requests_num", 0) == requests
    assert pool_in_use() == 0  # parked counts as idle: anyone may take it
    stats = ledger.stats_for("default")
    reused = stats.parked_reused
    backend_pid()
    assert stats.parked_reused == reused + 1


def test_a_borrow_goes_through_its_states_and_the_wrapper_holds_only_it():
    """One borrow object per borrow (pooling/borrow.py): parked between statements, taken back
    by the next one, kept at the end of the request, taken back by the next request as a new
    hold; the wrapper has no flags of its own beside it."""
    from django_pooled_pg.pooling.borrow import BORROWED, KEPT, PARKED

    backend_pid()
    borrow = connection._borrow
    assert borrow.state is PARKED and connection.connection is None
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert connection._borrow is borrow and borrow.state is BORROWED
    assert borrow.state is PARKED
    connection.close()
    assert connection._borrow is borrow and borrow.state is KEPT
    started = borrow.started
    backend_pid()
    assert connection._borrow is borrow and borrow.state is PARKED and borrow.started > started
    for flag in ("_parked", "_kept", "_borrowed_from", "_borrow_generation", "_owned", "_wait"):
        assert not hasattr(connection, flag), flag


def test_parked_connection_serves_another_thread(pool_options):
    """A thread that is busy elsewhere between statements does not keep its connection from
    others: with every connection parked, a borrower takes one instead of waiting."""
    pool_options(min_size=4, max_size=4, timeout=30, release="transaction")
    connection.pool.wait(timeout=5)
    pool_options_size = 4
    parked_by, ready, done = [], threading.Barrier(pool_options_size + 1), threading.Event()

    def park_and_wait():
        parked_by.append(backend_pid())  # borrow, query, park
        ready.wait()
        done.wait(5)
        backend_pid()  # its own connection may be gone: it borrows another
        connection.close()

    threads = [threading.Thread(target=park_and_wait) for _ in range(pool_options_size)]
    for t in threads:
        t.start()
    ready.wait()
    assert len(set(parked_by)) == pool_options_size  # every connection of the pool is parked
    taken = ledger.stats_for("default").parked_taken
    started = time.monotonic()
    pid = backend_pid()
    assert time.monotonic() - started < 10  # no waiting for the pool's timeout (30 s)
    assert pid in parked_by and ledger.stats_for("default").parked_taken == taken + 1
    connection.close()
    done.set()
    for t in threads:
        t.join()
    assert pool_in_use() == 0 and not active_borrows()


def test_a_waiting_borrower_gets_the_connection_instead_of_parking(pool_options):
    """While a borrower waits, a finished statement gives its connection back for real."""
    pool_options(min_size=2, max_size=2, timeout=5, release="transaction")
    pool = connection.pool
    pool.wait(timeout=5)
    release_other, got = threading.Event(), []

    def hold_in_atomic():
        with transaction.atomic():
            Item.objects.count()
            release_other.wait(5)
        connection.close()

    def wait_for_one():
        got.append(backend_pid())
        connection.close()

    holder = threading.Thread(target=hold_in_atomic)
    holder.start()
    with pinned():
        mine = backend_pid()  # both connections are in use now
        waiter = threading.Thread(target=wait_for_one)
        waiter.start()
        wait_until(lambda: pool.get_stats().get("requests_waiting", 0) >= 1, interval=0.01, message="the waiter")
        assert pool.get_stats().get("requests_waiting", 0) == 1
    # the end of pinned(): not parked, handed to the waiter
    waiter.join(5)
    assert parked_conn() is None and not held()
    assert got == [mine]
    release_other.set()
    holder.join()


def test_a_connection_parked_as_a_borrower_queues_is_handed_to_it(pool_options, monkeypatch):
    """Parking takes no lock (Pool.park): a borrower that found no connection and queues just
    after one was parked gets it from the queue's side at once (Pool._maybe_grow_pool), instead
    of waiting while it sits parked. The borrower is held between its look and its queueing,
    under the pool's lock, while the connection is parked."""
    pool_options(min_size=1, max_size=1, timeout=30, release="transaction")
    # A borrower's wait slice is one connect_timeout (Pool.borrow): a waiter the parked
    # connection is not handed to waits 20 s, until its next slice looks again.
    connection.settings_dict["OPTIONS"]["connect_timeout"] = 20
    pool = connection.pool
    pool.wait(timeout=5)
    looked, parked, got = threading.Event(), threading.Event(), []
    look = pool._get_ready_connection

    def look_then_hold(timeout):
        conn = look(timeout)
        if conn is None and threading.current_thread() is borrower:
            looked.set()
            parked.wait(2)  # (with a lock taken by park(), it is taken here: 2 s, then it queues)
        return conn

    def borrow_one():
        started = time.monotonic()
        got.append(backend_pid())
        got.append(time.monotonic() - started)
        connection.close()

    monkeypatch.setattr(pool, "_get_ready_connection", look_then_hold)
    borrower = threading.Thread(target=borrow_one)
    taken = ledger.stats_for("default").parked_taken
    with pinned():
        mine = backend_pid()  # the pool's one connection is in use
        borrower.start()
        assert looked.wait(5)
    parked.set()  # the end of pinned() parked it: nobody had queued yet
    borrower.join(30)
    assert got and got[0] == mine
    assert got[1] < 10  # handed over, not found by the next wait slice (20 s)
    assert ledger.stats_for("default").parked_taken == taken + 1  # parked, then handed over


def test_parked_connection_killed_meanwhile_is_replaced(superuser):
    pid = backend_pid()  # parked now
    lost = ledger.stats_for("default").lost
    superuser.execute("SELECT pg_terminate_backend(%s)", [pid])
    wait_backends_gone(superuser, [pid])  # the termination has reached the socket
    time.sleep(0.1)  # longer than a connection given back just now is trusted unchecked
    assert backend_pid() != pid  # no error: the dead session was noticed and another borrowed
    assert ledger.stats_for("default").lost == lost + 1
    assert pool_in_use() == 0


def test_parked_connection_past_max_lifetime_is_replaced(pool_options, superuser):
    pool_options(min_size=1, max_size=2, timeout=5, max_lifetime=0.5, release="transaction")
    pid = backend_pid()  # parked now
    time.sleep(0.6)
    assert backend_pid() != pid
    wait_backends_gone(superuser, [pid])  # the expired session was closed


def test_request_end_resets_the_parked_connection_and_keeps_it_for_the_thread():
    response = Client().get("/query/")
    assert response.status_code == 200
    assert is_kept() and connection.connection is None and not active_borrows()
    kept = parked_conn()
    assert connection.pool._parked == {connection._borrow: kept}
    assert kept._pooled_pg_pending, "given back with its reset sent (its answer read when taken back)"
    assert Client().get("/query/").status_code == 200
    assert parked_conn() is kept, "the thread's next request took it back"


def test_async_view_and_stream_give_back_their_parked_connection():
    # The ORM of both runs on this thread (thread-sensitive), so its connection object is ours.
    response = async_to_sync(AsyncClient().get)("/async/")
    assert response.status_code == 200
    assert connection.connection is None and is_kept() and not active_borrows()
    response = Client().get("/stream/")
    chunks = iter(response.streaming_content)
    assert next(chunks) == b"0,1\n"
    assert parked_conn() is not None, "the stream parks between its statements"
    assert b"".join(chunks) == b"1,1\n2,1\n"  # the last chunk closes the response
    assert is_kept() and not parked_conn()._pooled_pg_used
    assert not held_borrows() and pool_in_use() == 0


def test_thread_that_ends_with_a_parked_connection_gives_it_back():
    pool = connection.pool
    reclaimed = ledger.stats_for("default").reclaimed
    thread_conn = None

    def count_and_end():
        nonlocal thread_conn
        Item.objects.count()  # queries, parks, ends without close()
        thread_conn = parked_conn()

    thread = threading.Thread(target=count_and_end)
    thread.start()
    thread.join()
    wait_until(lambda: not held_borrows(), interval=0.02, message="the ended thread's connection given back")
    assert not held_borrows() and pool.parked_under(thread_conn) is None
    assert ledger.stats_for("default").reclaimed == reclaimed  # nothing was held: no warning


def test_time_zone_override_between_statements_gets_a_new_pool():
    """Django closes the pool when the time zone changes; that takes back parked connections."""
    assert one_value("SELECT current_setting('TimeZone')") == "UTC"  # parked now
    old_pool = connection.pool
    assert parked_conn() is not None
    with override_settings(USE_TZ=False, TIME_ZONE="Asia/Tokyo"):
        connection.__dict__.pop("timezone_name", None)
        try:
            assert one_value("SELECT current_setting('TimeZone')") == "Asia/Tokyo"
            assert connection.pool is not old_pool
        finally:
            connection.close()
            connection.__dict__.pop("timezone_name", None)
    assert one_value("SELECT current_setting('TimeZone')") == "UTC"


def one_value(sql: str):
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()[0]


def test_the_pool_takes_back_connections_parked_for_long():
    backend_pid()
    pool, conn, borrow = connection.pool, parked_conn(), connection._borrow
    assert pool.parked_under(conn) is borrow
    pool.release_parked(older_than=60)
    assert pool.parked_under(conn) is borrow
    assert pool.release_parked(older_than=0) >= 1
    assert pool.parked_under(conn) is None and ledger.borrows.get(id(conn)) is not borrow
    assert backend_pid()  # the next statement borrows normally


def test_the_upkeep_thread_takes_back_a_connection_parked_past_max_idle(pool_options):
    """A borrower that stopped querying without giving back (a long-lived thread between jobs):
    every max_idle, the pool's upkeep thread gives its connection back to the pool."""
    pool_options(min_size=2, max_size=4, timeout=5, release="transaction", max_idle=0.5)
    backend_pid()
    pool, conn = connection.pool, parked_conn()
    assert pool.parked_under(conn) is not None
    wait_until(lambda: pool.parked_under(conn) is None, timeout=10, message="the parked connection given back")
    assert backend_pid()  # the next statement borrows normally


def test_atomic_holds_until_the_outermost_block_ends():
    with transaction.atomic():
        Item.objects.create(name="a")
        assert held()
        with transaction.atomic():  # a savepoint
            Item.objects.create(name="b")
            assert held()
        assert held()
    assert not held() and pool_in_use() == 0
    assert Item.objects.count() == 2


def test_rolled_back_atomic_gives_back_nothing_committed():
    with pytest.raises(ValueError):
        with transaction.atomic():
            Item.objects.create(name="a")
            raise ValueError
    assert not held() and Item.objects.count() == 0


def test_savepoint_rollback_keeps_the_outer_transaction():
    with transaction.atomic():
        Item.objects.create(name="kept")
        try:
            with transaction.atomic():
                Item.objects.create(name="rolled back")
                raise ValueError
        except ValueError:
            pass
        assert held()
    assert list(Item.objects.values_list("name", flat=True)) == ["kept"]


def test_durable_atomic():
    with transaction.atomic(durable=True):
        Item.objects.create(name="durable")
    assert not held() and Item.objects.count() == 1


def test_on_commit_hooks_run_after_commit_and_may_query():
    seen = []
    with transaction.atomic():
        Item.objects.create(name="a")
        transaction.on_commit(lambda: seen.append(Item.objects.count()))
        transaction.on_commit(lambda: Item.objects.create(name="from hook"))
        assert seen == []
    assert seen == [1]
    assert Item.objects.count() == 2
    assert not held() and pool_in_use() == 0


def test_select_for_update_holds_the_lock_until_commit(superuser):
    account = Account.objects.create(balance=10)
    with transaction.atomic():
        Account.objects.select_for_update().get(pk=account.pk)
        with pytest.raises(psycopg.errors.LockNotAvailable):
            superuser.execute("SELECT * FROM testapp_account WHERE id = %s FOR UPDATE NOWAIT", [account.pk])
    superuser.execute("SELECT * FROM testapp_account WHERE id = %s FOR UPDATE NOWAIT", [account.pk])


def test_iterator_pins_until_exhausted():
    Item.objects.bulk_create(Item(name=str(i)) for i in range(30))
    names = []
    for item in Item.objects.iterator(chunk_size=5):
        assert held(), "the server-side cursor needs its session"
        names.append(item.name)
    assert len(names) == 30
    assert not held() and pool_in_use() == 0


def test_abandoned_iterator_is_closed_when_the_connection_goes_back():
    Item.objects.bulk_create(Item(name=str(i)) for i in range(30))
    iterator = Item.objects.iterator(chunk_size=5)
    next(iterator)
    assert held()
    connection.close()  # what the end of the request does
    assert pool_in_use() == 0
    del iterator
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_cursors WHERE name <> ''")
        assert cursor.fetchone()[0] == 0


PINNING = {
    "SET": "SET work_mem = '7MB'",
    "temp table": "CREATE TEMP TABLE pinned_scratch (id int)",
    "DO block": "DO $$ BEGIN PERFORM pg_advisory_lock(99); END $$",
    "WITH HOLD cursor": "DECLARE pinned_held CURSOR WITH HOLD FOR SELECT 1",
    "LISTEN": "LISTEN pinned_channel",
    "PREPARE": "PREPARE pinned_stmt AS SELECT 1",
}


@pytest.mark.parametrize("change", sorted(PINNING))
def test_session_changes_pin_until_the_request_ends(change):
    assert not held()
    with connection.cursor() as cursor:
        cursor.execute(PINNING[change])
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    assert held(), f"{change} must keep its session"
    assert backend_pid() == pid
    Item.objects.count()
    assert held() and backend_pid() == pid
    connection.close()
    assert pool_in_use() == 0
    with pinned():
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT current_setting('work_mem'), (SELECT count(*) FROM pg_listening_channels()),"
                " (SELECT count(*) FROM pg_prepared_statements),"
                " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory')"
            )
            assert cursor.fetchone() == ("4MB", 0, 0, 0)


def test_pinned_keeps_one_session():
    with pinned():
        first = backend_pid()
        Item.objects.count()
        assert held() and backend_pid() == first
    assert not held() and pool_in_use() == 0


def test_autocommit_off_pins():
    connection.set_autocommit(False)
    Item.objects.create(name="a")
    assert held()
    connection.commit()
    connection.set_autocommit(True)
    assert not held()
    assert Item.objects.count() == 1


def test_request_does_not_hold_a_connection_while_waiting():
    """A view that queries, waits, and queries holds no connection during the wait."""
    stats = ledger.stats_for("default")
    borrows, returns = stats.borrows, stats.hold.count
    during_wait: list[tuple[int, list, bool]] = []
    finished = threading.Event()

    def ended() -> bool:
        # Every borrow of the request so far has ended (its hold counted, as a reader counts a
        # parked one's: Pool.count_parked_holds), and there was one: the view waits 1 s then.
        registry.get("default").count_parked_holds()
        return stats.borrows > borrows and stats.hold.count - returns == stats.borrows - borrows

    def watch():
        wait_until(ended, interval=0.005, message="the first statement's return")
        during_wait.append((pool_in_use(), active_borrows(), finished.is_set()))

    watcher = threading.Thread(target=watch)
    watcher.start()
    response = Client().get("/query-wait-query/?s=1")
    finished.set()
    watcher.join()
    assert response.status_code == 200
    [(in_use, active, after_response)] = during_wait
    assert not after_response, "looked during the view's wait"
    assert in_use == 0 and active == []


def test_concurrent_transfers_keep_the_total():
    accounts = Account.objects.bulk_create(Account(balance=1000) for _ in range(10))
    ids = [a.pk for a in accounts]
    errors = []

    def transfer_many(seed):
        rng = random.Random(seed)
        try:
            for _ in range(40):
                a, b = sorted(rng.sample(ids, 2))  # lock in id order: no deadlocks
                amount = rng.randint(1, 50)
                with transaction.atomic():
                    rows = {x.pk: x for x in Account.objects.select_for_update().filter(pk__in=[a, b]).order_by("pk")}
                    if rows[a].balance < amount:
                        continue
                    Account.objects.filter(pk=a).update(balance=F("balance") - amount)
                    Account.objects.filter(pk=b).update(balance=F("balance") + amount)
                    if rng.random() < 0.1:
                        transaction.set_rollback(True)
                Item.objects.count()  # autocommit statements in between
                time.sleep(0.001)  # busy elsewhere: the parked connection serves other threads
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    taken = ledger.stats_for("default").parked_taken
    threads = [threading.Thread(target=transfer_many, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert ledger.stats_for("default").parked_taken > taken  # parked connections changed hands
    assert Account.objects.aggregate(total=Sum("balance"))["total"] == 10 * 1000
    assert min(Account.objects.values_list("balance", flat=True)) >= 0
    assert pool_in_use() == 0


def test_in_an_event_loop_a_parked_connection_is_not_touched():
    """The take-back before Django's ensure_connection() (in _cursor()) and close() without a
    second async_unsafe check still raise SynchronousOnlyOperation in an event loop, and leave
    the parked connection where it is."""
    import asyncio

    from django.core.exceptions import SynchronousOnlyOperation

    backend_pid()
    wrapper = connections["default"]  # (in the loop's context, `connection` would be another)
    parked, borrow = parked_conn(wrapper), wrapper._borrow
    assert parked is not None and wrapper.pool.parked_under(parked) is borrow

    async def calls() -> list[str]:
        raised = []
        for name in ("ensure_connection", "cursor", "close"):
            try:
                getattr(wrapper, name)()
            except SynchronousOnlyOperation:
                raised.append(name)
        return raised

    assert asyncio.run(calls()) == ["ensure_connection", "cursor", "close"]
    assert parked_conn() is parked and connection.pool.parked_under(parked) is borrow
    assert backend_pid() == parked.info.backend_pid  # taken back as usual outside the loop
