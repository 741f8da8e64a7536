"""Publishing this process's pool snapshots where every other process can read them.

One daemon thread per process, started when the process builds its first pool, writes one row
per alias into the UNLOGGED table ``django_pooled_pg_poolsnapshot`` (this app's migration) of
``POOLED_PG["STATS_DATABASE"]`` every ``STATS_INTERVAL`` seconds, keyed by host, pid and alias,
and deletes rows nobody has refreshed for ``PRUNE_AFTER`` seconds. ``poolstats`` and
:func:`django_pooled_pg.pooling.stats` read them.

How a publication gets a connection, so that it never competes with the borrowers it reports on:

* when the pool of the stats database has an idle connection, it takes it with psycopg_pool's
  ``getconn()`` directly (not a Django borrow: it is neither in the ledger nor in the counters
  and histograms it publishes), for one short transaction with ``statement_timeout`` and
  ``lock_timeout`` of ``PUBLISH_TIMEOUT``, and gives it straight back;
* when the pool has no idle connection (saturated, exactly when the numbers matter), it does not
  wait in the pool's queue: it opens a short-lived connection of its own (``connect_timeout``
  ``PUBLISH_TIMEOUT``, rounded up to libpq's 2 s minimum), writes, and closes it; if the server
  refuses it (too many clients) the round is skipped.

A missing table (migrations not run) is logged once at INFO and retried every interval; other
failures are logged once per kind at WARNING, without tracebacks. After a fork the child starts
its own thread with its first pool; at a clean exit a process deletes its own rows.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

from .. import eventlog
from ..pooling.registry import registry
from ..pooling.release import release_connection
from ..settings import StatsSettings, read_stats_settings
from . import history, snapshot
from .outside import plain_connection_params, within_budget

logger = logging.getLogger("django_pooled_pg")

TABLE = "django_pooled_pg_poolsnapshot"

UPSERT = f"""
INSERT INTO {TABLE} (host, pid, alias, started_at, published_at, stale_after, data)
VALUES (%s, %s, %s, to_timestamp(%s), now(), %s, %s)
ON CONFLICT (host, pid, alias) DO UPDATE SET
    started_at = EXCLUDED.started_at, published_at = EXCLUDED.published_at,
    stale_after = EXCLUDED.stale_after, data = EXCLUDED.data
"""
PRUNE = f"DELETE FROM {TABLE} WHERE published_at < now() - make_interval(secs => %s)"
GONE = f"DELETE FROM {TABLE} WHERE host = %s AND pid = %s AND NOT (alias = ANY(%s))"


class Publisher:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pid = os.getpid()
        self._logged: set[str] = set()
        self._atexit = False
        #: Rounds published and skipped in this process (for tests and curiosity).
        self.published = 0
        self.skipped = 0
        #: The last publication's outcome: "ok", "no-table", "refused", "error: ..."
        self.last_outcome = ""

    # ----- The thread ---------------------------------------------------------------------------

    def ensure_started(self) -> None:
        """Start the publishing thread if publishing is on and it is not running. Cheap when it
        is; raises ImproperlyConfigured for a bad ``settings.POOLED_PG``."""
        if self._thread is not None and self._pid == os.getpid():
            return
        config = read_stats_settings()
        if not config.enabled:
            return
        with self._lock:
            if self._thread is not None and self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(self._stop,), name="django_pooled_pg-publisher", daemon=True
            )
            self._thread.start()
            if not self._atexit:
                atexit.register(self.retire)
                self._atexit = True

    def _run(self, stop: threading.Event) -> None:
        while True:
            try:
                config = read_stats_settings()
            except Exception as exc:  # settings changed under us (tests): keep the thread alive
                self._log_once("settings", logging.WARNING, "pool statistics not published: %s", exc)
                config = None
            interval = (config.interval if config else None) or 5.0
            if stop.wait(interval):
                return
            eventlog.flush()  # summaries of repeated warnings whose events stopped coming
            if config is None or not config.enabled:
                continue
            try:
                self.publish_now(config)
            except Exception as exc:  # the thread must outlive any one failure
                self._log_once(type(exc).__name__, logging.WARNING, "pool statistics not published: %s", exc)

    def stop(self) -> None:
        """Stop the thread (it finishes a publication in progress)."""
        self._stop.set()
        self._thread = None

    def after_fork_in_child(self) -> None:
        """The parent's thread did not survive the fork: the child's first pool starts one."""
        self._lock = threading.Lock()
        self._thread = None
        self._stop = threading.Event()
        self._pid = os.getpid()
        self._logged = set()

    def _log_once(self, key: str, level: int, message: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.log(level, message, *args)

    # ----- One publication ----------------------------------------------------------------------

    def publish_now(self, config: StatsSettings | None = None) -> int:
        """Write this process's snapshots now; the number of rows written (0: skipped)."""
        config = config or read_stats_settings()
        snapshots = snapshot.take()  # before taking a connection: it must not see our own
        rows = [(s.host, s.pid, s.alias, s.started_at, config.stale_after, s.to_dict()) for s in snapshots]
        host, pid = snapshot.hostname(), os.getpid()
        points = history.points(snapshots)  # the admin chart's, at most one per history.STEP
        return self._write(config, rows, host, pid, [s.alias for s in snapshots], points=points)

    def retire(self) -> None:
        """At a clean exit: delete this process's rows (quickly, or not at all)."""
        if self._thread is None or self._pid != os.getpid():
            return
        self.stop()
        try:
            config = read_stats_settings()
            self._write(config, [], snapshot.hostname(), os.getpid(), [], prune=False, idle_only=True)
        except Exception:
            pass

    def _write(
        self,
        config: StatsSettings,
        rows: list[tuple[Any, ...]],
        host: str,
        pid: int,
        aliases: list[str],
        *,
        prune: bool = True,
        idle_only: bool = False,
        points: list[tuple[Any, ...]] | None = None,
    ) -> int:
        import psycopg
        from psycopg.types.json import Jsonb

        def run(conn: Any) -> None:
            ms = max(1, int(config.publish_timeout * 1000))
            with conn.transaction():
                conn.execute(f"SET LOCAL statement_timeout = {ms}")
                conn.execute(f"SET LOCAL lock_timeout = {ms}")
                if rows:
                    with conn.cursor() as cursor:
                        cursor.executemany(UPSERT, [(*row[:5], Jsonb(row[5])) for row in rows])
                conn.execute(GONE, (host, pid, aliases))
                if prune:
                    conn.execute(PRUNE, (config.prune_after,))
                if points:
                    history.write(conn, points)  # in a savepoint: its table may be missing

        pool = registry.get(config.database)
        if pool is None or pool.closed:
            from django.db import connections

            pool = connections[config.database].pool  # builds this process's pool of it
        try:
            # A connection of the pool, waiting for one like any borrower: one more server
            # session per process for the statistics, under load, took the server past what the
            # pool's size promises (make bench: 9 backends for 2 pools of 4). Outside the pool
            # only when it cannot serve within PUBLISH_TIMEOUT (saturated, stuck, failing),
            # which is when the statistics matter most.
            failing = getattr(getattr(pool, "health", None), "failing", False)
            if (
                pool is not None
                and not pool.closed
                and not failing
                and (not idle_only or pool.get_stats().get("pool_available", 0) > 0)
            ):
                try:
                    conn = pool.getconn(timeout=0.01 if idle_only else config.publish_timeout)
                except Exception:  # every connection in use the whole time: go outside the pool
                    conn = None
                if conn is not None:
                    try:
                        run(conn)
                    finally:
                        release_connection(pool, conn)
                    return self._done(len(rows))
            if idle_only:
                return 0
            params = plain_connection_params(config.database, f"dpp-publish {host}:{pid}"[:63], config.publish_timeout)
            try:
                conn = within_budget(config.database, params, lambda: psycopg.connect(**params))
            except psycopg.OperationalError as exc:
                self.skipped += 1
                self.last_outcome = "refused"
                self._log_once("refused", logging.INFO, "pool statistics skipped: no connection (%s)", exc)
                return 0
            with conn:
                run(conn)
            return self._done(len(rows))
        except psycopg.errors.UndefinedTable:
            self.skipped += 1
            self.last_outcome = "no-table"
            self._log_once(
                "no-table",
                logging.INFO,
                "pool statistics not published: table %s does not exist in database %r yet; run "
                "`manage.py migrate django_pooled_pg` (retrying every interval)",
                TABLE,
                config.database,
            )
            return 0
        except psycopg.Error as exc:
            self.skipped += 1
            self.last_outcome = f"error: {exc}"
            self._log_once(type(exc).__name__, logging.WARNING, "pool statistics not published: %s", exc)
            return 0

    def _done(self, count: int) -> int:
        self.published += 1
        self.last_outcome = "ok"
        self._logged.discard("no-table")
        return count


publisher = Publisher()
os.register_at_fork(after_in_child=publisher.after_fork_in_child)


def publish_now() -> int:
    """Publish this process's snapshots now (whatever ``STATS_INTERVAL`` is); rows written."""
    return publisher.publish_now()
