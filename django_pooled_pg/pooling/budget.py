"""A fleet-wide connection budget (``OPTIONS["pool"]["fleet_max_size"]``): the pools of every
process, on every host, together hold at most that many connections to the alias's database.

Why it works this way:

* **Admission is counted by the server, by the newcomer.** A connection the pool opens counts
  the server's client backends of its database (``pg_stat_activity``, itself included) before
  the pool may use it, and closes again when there is no room for it. The server's view includes
  every process of every host and none that died (a SIGKILLed process's sessions end with its
  sockets), so nothing is renewed, no clock is compared, and a share comes back by itself when
  its holder dies. Of two newcomers that count at once, the later sees the earlier.
* **The door.** A newcomer exists before it can count, so one connection of the budget per host
  is kept for newcomers (:attr:`FleetBudget.door`; the hosts are those the server shows, by the
  application names): on a host newcomers count one at a time (:meth:`FleetBudget.gate`, a file
  lock), so however many hosts open connections at the same moment, a refused newcomer, which
  stands in the door for the few milliseconds it takes to count and close, never takes the
  server over the budget. (Only a host the server has not seen yet, whose first newcomer comes
  in the same millisecond as one of every other host, can be one over, for that millisecond.)
* **The reserve: how a new process gets in without anyone waiting.** Of the usable budget, one
  connection (:data:`RESERVE`) is only for a process below its fair share (the usable budget
  divided among the processes the server shows, by their ``dpp ALIAS HOST:PID`` application
  names). A new process holds nothing, so its first connection takes the reserve; it then shows
  in ``pg_stat_activity``, every fair share shrinks, and each process's look (every
  :data:`LOOK_EVERY` s, on one of its connections) gives back what it holds above its new fair
  share until the reserve is free again (the idle connections at once, the others as they come
  back). A process at or above its fair share grows only while the reserve stays free. When
  there are more processes than usable connections, the ones without a share get a 503
  (:class:`~django_pooled_pg.errors.BudgetExhausted`) at once.
* **Nothing on the borrow path.** All of this runs when a connection is opened (psycopg_pool's
  background workers) and in the look; a borrow reads one attribute more to fail fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

C = TypeVar("C")

logger = logging.getLogger("django_pooled_pg")

#: Connections of the budget kept free for newcomers counting themselves in, per host.
DOOR = 1
#: Connections of the usable budget only a process below its fair share may take.
RESERVE = 1
#: Seconds after a refusal during which this process opens no new connection (its borrowers
#: that find none free get a 503 at once).
BACK_OFF = 1.0
#: Seconds between two looks of a process at the budget (one statement on one connection).
LOOK_EVERY = 0.5
#: Seconds a host's newcomer may wait for another one of the same host to finish counting.
GATE_TIMEOUT = 2.0
#: For "auto": connections of the server's capacity left to others (psql, migrations, cron):
#: 10% of it, and at least this many.
AUTO_HEADROOM = 3

#: The client backends a budget counts (of the alias's database, or of the whole server for
#: "auto"), and the processes among them (their pools' connections' application names).
_COUNT = (
    "SELECT count(*), count(DISTINCT application_name) FILTER (WHERE application_name LIKE 'dpp %'), "
    r"count(DISTINCT substring(application_name FROM '^dpp \S+ (.*):[0-9]+$')) "
    "FROM pg_stat_activity WHERE backend_type = 'client backend'"
)
COUNT_DATABASE = _COUNT + " AND datname = current_database()"
COUNT_SERVER = _COUNT
CAPACITY = (
    "SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int"
    " - coalesce(current_setting('reserved_connections', true)::int, 0)"
)


def close_and_wait(conn: Any, timeout: float = 0.5) -> None:
    """Close ``conn`` and wait until its server process has gone (the server closes the socket
    when the process exits, after it left ``pg_stat_activity``). A refused newcomer leaves so
    before the host's next newcomer may connect: a session whose client has closed stays in
    ``pg_stat_activity`` for the milliseconds its process takes to exit, and two newcomers
    would stand in the door together (the two-worker-scaling test caught 9 of 8 so)."""
    try:
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    except Exception:
        conn.close()
        return
    try:
        conn.close()  # (libpq's Terminate message; our duplicate keeps the socket open)
        sock.settimeout(timeout)
        while sock.recv(65536):
            pass
    except OSError:
        pass
    finally:
        sock.close()


class BudgetRefused(BaseException):
    """A newcomer found the budget full and left (internal: the pool turns it into a 503).

    Not an ``Exception``: psycopg_pool catches those from a connection attempt and retries with
    a growing back-off, as for a failing server; a full budget is not a failure, and the pool
    (``Pool._add_connection``) gives the attempt up instead."""


def auto_size(capacity: int) -> int:
    """The budget ``"auto"`` derives from the server's ``capacity`` (max_connections minus the
    reserved connections): what is left after the headroom."""
    return max(DOOR + RESERVE + 1, capacity - max(AUTO_HEADROOM, capacity // 10))


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
        #: What the last count or look saw: the fleet's connections, and its processes.
        self.seen: tuple[int, int] = (0, 0)
        #: Connections kept for newcomers: one per host seen (at least one).
        self.door = DOOR
        self.seen_at = 0.0
        #: How many connections this process holds (the pool sets it: its psycopg_pool count).
        self.held: Callable[[], int] = lambda: 0

    def refused_recently(self) -> bool:
        """Whether a newcomer of this process was refused less than :data:`BACK_OFF` s ago."""
        return time.monotonic() - self.refused_at < BACK_OFF

    @property
    def usable(self) -> int:
        """Connections the pools may hold: the budget minus the door."""
        return (self.size or 0) - self.door

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
                close_and_wait(conn)
                raise
        return conn

    def admit(self, conn: Any, *, reader: bool = False) -> None:
        """Let the freshly opened ``conn`` in, or :class:`BudgetRefused` (the caller closes it).
        Call inside :meth:`gate`.

        The count includes ``conn``. A process below its fair share may take the budget's
        last usable connection (the reserve: that is how a new process gets in); one at or
        above it may not, so the reserve stays for newcomers. A reader may stand in the door."""
        if self.size is None:
            self.size = auto_size(_query(conn, CAPACITY)[0])
        total, processes = self._count(conn)
        held = self.held() - 1  # (the pool counts this connection already)
        limit = self.usable if held < self.fair(processes) else self.usable - RESERVE
        if total <= limit or (reader and total <= self.size):
            return
        raise BudgetRefused(
            f"the fleet budget of database {self.alias!r} is used up: {total - 1} connections of "
            f"{self.size} (fleet_max_size; one kept to count newcomers in, one for processes "
            f"below their fair share) held by {processes} processes, {max(held, 0)} by this one"
        )

    def fair(self, processes: int) -> int:
        """A process's fair share of the usable budget among ``processes`` (at least 1)."""
        return max(1, self.usable // max(1, processes))

    def tight(self) -> bool:
        """Whether a new connection of this process would be refused, by what this process saw
        less than a second ago: then the pool does not try (each try costs the server a
        backend start)."""
        if time.monotonic() - self.seen_at > 1.0:
            return False
        total, processes = self.seen
        return self.held() >= self.fair(processes) and total >= self.usable - RESERVE

    def _count(self, conn: Any) -> tuple[int, int]:
        total, processes, hosts = _query(conn, self.count_sql)
        # (at most half the budget: a budget smaller than twice the hosts still lets each in)
        self.door = max(DOOR, min(DOOR * hosts, (self.size or 0) // 2))
        self.seen, self.seen_at = (total, processes), time.monotonic()
        return total, processes

    def excess(self, conn: Any) -> int:
        """Look at the budget through ``conn``: how many of its connections this process should
        give back. None while the reserve is free; otherwise those above its fair share, as
        many as it takes to free the reserve (another process's newcomer took it: the fair
        shares have just shrunk)."""
        total, processes = self._count(conn)
        over = total - (self.usable - RESERVE)
        if over <= 0 or self.size is None:
            return 0
        return max(0, min(over, self.held() - self.fair(processes)))
