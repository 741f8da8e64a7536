"""A fleet-wide connection budget (``OPTIONS["pool"]["fleet_max_size"]``): the pools of every
process, on every host, together hold at most that many connections to the alias's database.

Why it works this way:

* **Admission is counted by the server, after the fact, by the newcomer.** A connection the pool
  opens counts the server's client backends of its database (``pg_stat_activity``, itself
  included) before the pool may use it, and closes again when the count is over the budget. The
  server's view includes every process of every host, the ones that died a moment ago excluded
  (a SIGKILLed process's sessions end with its sockets), so nothing has to be renewed, no clock
  is compared, and a share comes back by itself when its holder dies. A newcomer that counts
  last sees every newcomer before it, so two that count at once cannot both squeeze in.
* **The door.** A newcomer exists before it can count, so one connection of the budget is kept
  free for it (:data:`DOOR`): the pools use at most ``fleet_max_size - 1`` and a refused
  newcomer, counted in the last one, never takes the server over the budget. On a host, opening
  connections is serialized by a file lock (:meth:`FleetBudget.gate`, about 1 ms per
  connection), so one newcomer at a time stands in the door per host.
* **Demand is visible.** A newcomer that finds the budget full does not leave at once: it waits
  in the door for up to :data:`WAIT` seconds under the application name :data:`WANTING`, where
  every other process's periodic look (:meth:`FleetBudget.look`, every :data:`LOOK_EVERY`
  seconds on one idle connection) sees it; a process holding more than its fair share
  (the budget divided among the processes seen) closes idle connections until it does not. The
  newcomer joins as soon as its count fits, or goes and its borrowers get a 503
  (:class:`~django_pooled_pg.errors.BudgetExhausted`).
* **Nothing on the borrow path.** All of this runs when a connection is opened (psycopg_pool's
  background workers) and in the look; a borrow reads one attribute more to fail fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

C = TypeVar("C")

logger = logging.getLogger("django_pooled_pg")

#: Connections of the budget kept free for a newcomer counting itself in.
DOOR = 1
#: Seconds a newcomer waits in the door for other processes to give back idle connections.
WAIT = 1.5
#: Seconds after a refusal during which this process opens no new connection (its borrowers
#: that find none free get a 503 at once).
BACK_OFF = 1.0
#: Seconds between two looks of a process at the budget (one statement on an idle connection).
LOOK_EVERY = 0.5
#: Seconds a host's newcomer may wait for another one of the same host to finish counting.
GATE_TIMEOUT = WAIT + 1.0
#: The application name of a newcomer waiting in the door.
WANTING = "dpp-budget wanting"
#: For "auto": connections of the server's capacity left to others (psql, migrations, cron):
#: 10% of it, and at least this many.
AUTO_HEADROOM = 3

#: The client backends a budget counts: of the alias's database, or of the whole server (auto).
_COUNT = (
    "SELECT count(*), count(*) FILTER (WHERE application_name = '" + WANTING + "'), "
    "count(DISTINCT application_name) FILTER (WHERE application_name LIKE 'dpp %') "
    "FROM pg_stat_activity WHERE backend_type = 'client backend'"
)
COUNT_DATABASE = _COUNT + " AND datname = current_database()"
COUNT_SERVER = _COUNT
CAPACITY = (
    "SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int"
    " - coalesce(current_setting('reserved_connections', true)::int, 0)"
)


class BudgetRefused(BaseException):
    """A newcomer found the budget full and left (internal: the pool turns it into a 503).

    Not an ``Exception``: psycopg_pool catches those from a connection attempt and retries with
    a growing back-off, as for a failing server; a full budget is not a failure, and the pool
    (``Pool._add_connection``) gives the attempt up instead."""


def auto_size(capacity: int) -> int:
    """The budget ``"auto"`` derives from the server's ``capacity`` (max_connections minus the
    reserved connections): what is left after the headroom."""
    return max(DOOR + 1, capacity - max(AUTO_HEADROOM, capacity // 10))


def _query(conn: Any, sql: str) -> list[int]:
    """The first row of ``sql`` as ints, through libpq directly: no transaction is begun (the
    pool's connections are not in autocommit yet when they are admitted) and psycopg's state
    is left as it was."""
    result = conn.pgconn.exec_(sql.encode())
    if result.status != 2:  # TUPLES_OK
        message = result.error_message.decode(errors="replace").strip()
        raise RuntimeError(f"fleet budget query failed: {message}")
    return [int(result.get_value(0, col) or 0) for col in range(result.nfields)]


class FleetBudget:
    """The budget of one alias in this process."""

    @classmethod
    def for_params(cls, alias: str, size: int | str, params: dict[str, Any]) -> FleetBudget:
        """The budget of ``alias`` whose connections take the psycopg parameters ``params``:
        per database, or per server for "auto" (which is the server's capacity)."""
        server = f"{params.get('host') or ''}:{params.get('port') or ''}"
        return cls(alias, size, server if size == "auto" else f"{server}/{params.get('dbname') or ''}")

    def __init__(self, alias: str, size: int | str, server_key: str) -> None:
        self.alias = alias
        #: The configured value: an int, or "auto" (then :attr:`size` is read from the server).
        self.configured = size
        self.size: int | None = size if isinstance(size, int) else None
        self.count_sql = COUNT_SERVER if size == "auto" else COUNT_DATABASE
        digest = hashlib.sha1(f"{server_key}:{self.count_sql}".encode()).hexdigest()[:16]
        self.gate_path = os.path.join(tempfile.gettempdir(), f"django_pooled_pg-budget-{digest}.lock")
        #: When a newcomer of this process was last refused (``time.monotonic()``), 0.0: never;
        #: set by the pool, which counts the refusal.
        self.refused_at = 0.0
        #: What the last count or look saw: backends, newcomers wanting, processes.
        self.seen: tuple[int, int, int] = (0, 0, 0)
        self.seen_at = 0.0
        #: Idle connections this process gave back for others.
        self.given_back = 0

    def refused_recently(self) -> bool:
        """Whether a newcomer of this process was refused less than :data:`BACK_OFF` s ago."""
        return time.monotonic() - self.refused_at < BACK_OFF

    @property
    def usable(self) -> int:
        """Connections the pools may hold: the budget minus the door."""
        return (self.size or 0) - DOOR

    @contextlib.contextmanager
    def gate(self) -> Iterator[None]:
        """One newcomer at a time per host (a file lock that the kernel drops if the process dies
        holding it). Processes of one host that use different temporary directories are not
        serialized with each other; the door then admits one of them, not more."""
        fd = os.open(self.gate_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            deadline = time.monotonic() + GATE_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise BudgetRefused(
                            f"another process of this host kept the budget's gate {GATE_TIMEOUT:g} s"
                        ) from None
                    time.sleep(0.002)
            yield
        finally:
            os.close(fd)  # (releases the lock)

    def connect(self, connect: Callable[[], C], *, reader: bool = False) -> C:
        """``connect()``'s new connection, let in (or :class:`BudgetRefused`, closed): every
        connection this package opens to a budgeted database comes through here, the pool's
        (``connection.health_tracking``) and the statistics' alike.

        ``reader``: a short session of ``poolstats`` or the admin page, which must be able to
        read when the budget is full (that is when they are needed): it may stand in the door
        (the budget's last connection) instead of waiting for a share."""
        with self.gate():
            conn = connect()
            try:
                self.admit(conn, reader=reader)
            except BaseException:
                conn.close()  # type: ignore[attr-defined]
                raise
        return conn

    def admit(self, conn: Any, *, reader: bool = False) -> None:
        """Let the freshly opened ``conn`` in, or :class:`BudgetRefused` (the caller closes it).
        Call inside :meth:`gate`."""
        if self.size is None:
            self.size = auto_size(_query(conn, CAPACITY)[0])
        total, wanting, processes = self._count(conn)
        if total <= self.usable or (reader and total <= self.size):
            return
        deadline = time.monotonic() + WAIT
        conn.pgconn.exec_(f"SET application_name = '{WANTING}'".encode())
        try:
            while time.monotonic() < deadline and total <= self.usable + DOOR:
                time.sleep(0.05)
                total, wanting, processes = self._count(conn)
                if total <= self.usable:
                    return
        finally:
            conn.pgconn.exec_(b"RESET application_name")
        raise BudgetRefused(
            f"the fleet budget of database {self.alias!r} is used up: {total - 1} connections of "
            f"{self.size} (fleet_max_size, one kept free to count newcomers in) held by "
            f"{processes} processes"
        )

    def _count(self, conn: Any) -> tuple[int, int, int]:
        total, wanting, processes = _query(conn, self.count_sql)
        self.seen, self.seen_at = (total, wanting, processes), time.monotonic()
        return total, wanting, processes

    def excess(self, conn: Any, held: int, floor: int) -> int:
        """Look at the budget through the idle connection ``conn``: how many of the ``held``
        connections this process should give back, so that newcomers waiting in the door get
        in (none while nobody waits). A process keeps its fair share (the usable budget divided
        among the processes seen, waiting ones included) and at least ``floor``."""
        total, wanting, processes = self._count(conn)
        if not wanting or self.size is None:
            return 0
        fair = self.usable // max(1, processes + wanting)
        return max(0, held - max(fair, floor))
