"""The pools of every process, on every host, and the server's side: :func:`stats`.

Reads the rows the publishers write (:mod:`django_pooled_pg.telemetry.publisher`), the server's
``pg_stat_activity`` (each pooled connection's ``application_name`` is ``dpp ALIAS HOST:PID``)
and its connection limits, and puts them together per alias: one :class:`ProcessStats` per
process, totals with merged percentiles, the server's count of each process's connections by
state, and a :class:`Capacity` line per server. ``manage.py poolstats`` prints it; the admin page
shows it.

Reading uses short-lived connections of its own, outside any pool (named ``dpp-poolstats``), so
it works when the pools are saturated and takes nobody's slot. Staleness is measured on the
server's clock, so hosts whose clocks disagree still agree on which rows are stale.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..pooling.stats import COUNTER_NAMES, Histogram
from ..settings import pooled_aliases, read_stats_settings
from .advice import Advice, Room, advise, view_finding
from .outside import connect, describe_error
from .snapshot import WATCHED, PoolSnapshot, parse_application_name

STATES = ("active", "idle", "idle in transaction", "other")


@dataclass
class ServerView:
    """Connections the server reports, by state, and how long the oldest has been in it."""

    total: int = 0
    by_state: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    #: Seconds the longest-running connection of each state has been in it.
    longest: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STATES, 0.0))

    def add(self, state: str | None, seconds: float | None) -> None:
        if state in ("idle in transaction", "idle in transaction (aborted)"):
            key = "idle in transaction"
        elif state in ("active", "idle"):
            key = state
        else:
            key = "other"
        self.total += 1
        self.by_state[key] += 1
        self.longest[key] = max(self.longest[key], seconds or 0.0)


@dataclass
class ProcessStats:
    """One process's pool of one alias, as it last published it."""

    snapshot: PoolSnapshot
    #: Seconds since it was published (server clock) and whether that is past its stale_after.
    age: float
    stale: bool
    #: Its connections as the server sees them; None when they cannot be told apart (the user
    #: set their own application_name) or the server could not be asked.
    server: ServerView | None = None

    @property
    def host(self) -> str:
        return self.snapshot.host

    @property
    def pid(self) -> int:
        return self.snapshot.pid

    def since(self, counter: str) -> float | None:
        """Seconds since ``counter`` (one of WATCHED) was last seen to grow, or None."""
        at = self.snapshot.last_increase.get(counter, 0.0)
        if not at:
            return None
        return max(0.0, self.snapshot.taken_at - at) + self.age

    @property
    def saturated(self) -> bool:
        s = self.snapshot
        return s.waiting > 0 or s.in_use >= s.max_size

    def to_dict(self) -> dict[str, Any]:
        s = self.snapshot
        return {
            "host": s.host, "pid": s.pid, "started_at": s.started_at, "taken_at": s.taken_at,
            "age": round(self.age, 3), "stale": self.stale, "saturated": self.saturated,
            "application_name": s.application_name,
            "min_size": s.min_size, "max_size": s.max_size, "timeout": s.timeout,
            "size": s.size, "idle": s.idle, "in_use": s.in_use, "waiting": s.waiting,
            "leaked_now": s.leaked_now,
            "counters": {k: s.counters.get(k, 0) for k in COUNTER_NAMES},
            "last_increase": dict(s.last_increase),
            "wait": Histogram.from_dict(s.wait).summary(), "hold": Histogram.from_dict(s.hold).summary(),
            "server": asdict(self.server) if self.server is not None else None,
            "demand": s.demand,
        }  # fmt: skip


@dataclass
class ViewFleet:
    """One view's (or task's, or ``borrow()`` block's) use of one alias, summed over the live
    processes: borrows given back, connection-seconds, wait and hold times, rollbacks of
    transactions it left open, 503s; over the last minute and since each process started."""

    name: str
    wait: Histogram = field(default_factory=Histogram)
    hold: Histogram = field(default_factory=Histogram)
    #: Seconds of its holds in statements and open transactions (see ``ViewStats``).
    busy: float = 0.0
    rollbacks: int = 0
    responses_503: int = 0
    recent_borrows: int = 0
    recent_hold_us: int = 0

    @property
    def borrows(self) -> int:
        return self.hold.count

    @property
    def seconds(self) -> float:
        """Connection-seconds held since start."""
        return self.hold.total_us / 1_000_000

    @property
    def recent_seconds(self) -> float:
        return self.recent_hold_us / 1_000_000

    def add(self, data: dict[str, Any]) -> None:
        self.wait.merge(Histogram.from_dict(data.get("wait", {})))
        self.hold.merge(Histogram.from_dict(data.get("hold", {})))
        self.busy += data.get("busy", 0.0)
        self.rollbacks += data.get("rollbacks", 0)
        self.responses_503 += data.get("responses_503", 0)
        recent = data.get("recent") or (0, 0)
        self.recent_borrows += recent[0]
        self.recent_hold_us += recent[1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "view": self.name,
            "recent": {"borrows": self.recent_borrows, "seconds": round(self.recent_seconds, 6)},
            "total": {"borrows": self.borrows, "seconds": round(self.seconds, 6)},
            "wait": self.wait.summary(), "hold": self.hold.summary(),
            "rollbacks": self.rollbacks, "responses_503": self.responses_503,
        }  # fmt: skip


@dataclass
class Holder:
    """A connection checked out right now (as of its process's last publication)."""

    host: str
    pid: int
    thread: str
    view: str
    #: Seconds held now: at the publication, plus the publication's age.
    held: float
    state: str
    leak: bool
    stack: str

    def borrowed_at(self, frames: int = 3) -> list[str]:
        """The innermost ``frames`` lines of the stack that are the project's own code: not
        Django's, this package's or another installed package's (all of them when none is)."""
        lines = [line.strip() for line in self.stack.splitlines() if line.strip().startswith("File ")]
        own = [line for line in lines if not any(part in line for part in LIBRARY_PATHS)]
        return (own or lines)[-frames:]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "borrowed_at": self.borrowed_at()}


#: Parts of the file names of frames that are not the project's code.
LIBRARY_PATHS = ("/site-packages/", "/dist-packages/", "/django_pooled_pg/", "/django/", "/lib/python3")


@dataclass
class AliasFleet:
    """Every process's pool of one alias, and their sum."""

    alias: str
    database: str
    server: str
    processes: list[ProcessStats] = field(default_factory=list)
    #: Sum over live (not stale) processes.
    size: int = 0
    idle: int = 0
    in_use: int = 0
    waiting: int = 0
    max_size: int = 0
    #: The fleet budget its processes report (0: none).
    fleet_max_size: int = 0
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTER_NAMES, 0))
    wait: Histogram = field(default_factory=Histogram)
    hold: Histogram = field(default_factory=Histogram)
    #: The server's view of every pooled connection of this alias, of live processes or not.
    server_view: ServerView | None = None
    #: Pooled connections of this alias whose process publishes no row (a process with
    #: publishing off, or one that has not published yet), by "host:pid".
    unpublished: dict[str, int] = field(default_factory=dict)
    #: False when the pools' connections carry the user's application_name: the server view is
    #: then per alias only.
    split_by_process: bool = True
    #: Per view, summed over the live processes (see :meth:`top_views`).
    views: dict[str, ViewFleet] = field(default_factory=dict)
    #: The span of the views' recent figures: the shortest any live process published.
    recent_seconds: float = 0.0
    #: Connections borrowed now, in every live process, longest held first.
    holders: list[Holder] = field(default_factory=list)
    #: Settings advised from the live processes' measured demand (``poolstats --advise``).
    advice: Advice | None = None

    def top_views(self, n: int | None = None, *, recent: bool = True) -> list[ViewFleet]:
        """The views holding the most connection-seconds, over the last minute (``recent``)
        or since start; views with nothing in the span are left out of the recent list."""
        views = list(self.views.values())
        if recent:
            views = [v for v in views if v.recent_borrows or v.recent_hold_us]
            views.sort(key=lambda v: (v.recent_hold_us, v.recent_borrows), reverse=True)
        else:
            views.sort(key=lambda v: (v.hold.total_us, v.hold.count), reverse=True)
        return views[:n] if n is not None else views

    @property
    def live(self) -> list[ProcessStats]:
        return [p for p in self.processes if not p.stale]

    def budget_text(self) -> str:
        """The fleet budget in words ("" without one): its size, what the live processes hold
        (each one's share), how often it held back a new connection and had one given back."""
        if not self.fleet_max_size:
            return ""
        shares = ", ".join(f"{p.snapshot.host}:{p.snapshot.pid} {p.snapshot.size}" for p in self.live)
        return (
            f"fleet budget: {self.size} of {self.fleet_max_size} connections held (fleet_max_size, one kept "
            f"free to count newcomers in); shares: {shares or 'none'}; refused "
            f"{self.counters.get('budget_refused', 0)}, given back {self.counters.get('budget_given_back', 0)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "alias": self.alias, "database": self.database, "server": self.server,
            "processes": [p.to_dict() for p in self.processes],
            "total": {
                "processes": len(self.live), "size": self.size, "idle": self.idle,
                "in_use": self.in_use, "waiting": self.waiting, "max_size": self.max_size,
                "fleet_max_size": self.fleet_max_size,
                "counters": dict(self.counters),
                "wait": self.wait.summary(), "hold": self.hold.summary(),
            },
            "server_view": asdict(self.server_view) if self.server_view is not None else None,
            "unpublished": dict(self.unpublished),
            "split_by_process": self.split_by_process,
            "views": {
                "recent_seconds": round(self.recent_seconds, 3),
                "by_recent": [v.to_dict() for v in self.top_views(recent=True)],
                "by_total": [v.to_dict() for v in self.top_views(recent=False)],
            },
            "holders": [h.to_dict() for h in self.holders],
            "advice": self.advice.to_dict() if self.advice is not None else None,
        }  # fmt: skip


@dataclass
class Capacity:
    """Can every live process open every connection its pools allow on this server?"""

    server: str
    max_connections: int
    superuser_reserved: int
    reserved: int
    #: Sum of max_size over every live process and alias using this server.
    fleet_max: int
    #: Client connections open on the server right now (every database and application), not
    #: counting the one reading this.
    connected: int

    @property
    def available(self) -> int:
        return self.max_connections - self.superuser_reserved - self.reserved

    @property
    def over(self) -> bool:
        return self.fleet_max > self.available

    def describe(self) -> str:
        reserved = self.superuser_reserved + self.reserved
        line = (
            f"capacity {self.server}: pools may open {self.fleet_max} of {self.available} "
            f"connections (max_connections {self.max_connections} - {reserved} reserved); "
            f"{self.connected} connected now"
        )
        if self.over:
            line += (
                f". WARNING: the fleet can exceed the server by {self.fleet_max - self.available}: "
                "lower max_size or the number of processes, or raise max_connections"
            )
        return line

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "available": self.available, "over": self.over, "message": self.describe()}


@dataclass(frozen=True)
class Verdict:
    """What ``poolstats --check`` says of one :class:`FleetStats`: the same reading the table and
    the JSON show, so a probe and the table beside it never disagree."""

    status: str  # "OK", "CRITICAL" or "UNKNOWN"
    exit_code: int  # 0, 1, 2: what monitoring plugins expect of those words
    message: str

    @property
    def line(self) -> str:
        return f"{self.status}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "exit_code": self.exit_code, "message": self.message}


@dataclass
class FleetStats:
    """What :func:`stats` returns."""

    taken_at: float
    stats_database: str
    aliases: dict[str, AliasFleet] = field(default_factory=dict)
    capacity: list[Capacity] = field(default_factory=list)
    #: Why something could not be read (missing table, unreachable server), in words.
    errors: list[str] = field(default_factory=list)

    def live_processes(self) -> set[tuple[str, int]]:
        """(host, pid) of every process whose row of some alias is not stale."""
        return {(p.host, p.pid) for a in self.aliases.values() for p in a.live}

    def verdict(self, window: float = 60.0) -> Verdict:
        """The health of the fleet in one line: CRITICAL on any of :meth:`problems`, UNKNOWN
        when nothing could be read or no process is live, else OK."""
        problems = self.problems(window)
        if problems:
            more = f" (+{len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
            return Verdict("CRITICAL", 1, problems[0] + more)
        if self.errors:
            return Verdict("UNKNOWN", 2, self.errors[0])
        live = self.live_processes()
        if not live:
            stale = {(p.host, p.pid) for a in self.aliases.values() for p in a.processes}
            if stale:
                why = f"{len(stale)} process(es) published, none within its STALE_AFTER: is the site running?"
            else:
                why = (
                    "no process publishes statistics (is the site running, with django_pooled_pg in "
                    "INSTALLED_APPS and POOLED_PG['STATS_INTERVAL'] not None?)"
                )
            return Verdict("UNKNOWN", 2, why)
        return Verdict(
            "OK",
            0,
            f"{len(live)} live process(es), {len(self.aliases)} alias(es); no pool saturated, "
            "timing out or leaking; within capacity",
        )

    def problems(self, window: float = 60.0) -> list[str]:
        """What ``poolstats --check`` fails on, one line each: a pool saturated now, borrowers
        that timed out (or found the database unavailable) or leaks reported within ``window``
        seconds, connections held past leak_timeout now, a fleet over the server's capacity."""
        found = []
        for alias in self.aliases.values():
            for p in alias.live:
                s, where = p.snapshot, f"pool {alias.alias!r} of {p.host}:{p.pid}"
                if p.saturated:
                    found.append(f"{where} is saturated: {s.in_use}/{s.max_size} in use, {s.waiting} waiting")
                for counter, words in (
                    ("exhausted", "borrowers timed out"),
                    ("unavailable", "borrowers found the database unavailable"),
                    ("budget_refused", f"the fleet budget ({s.fleet_max_size}) held back new connections"),
                ):
                    since = p.since(counter)
                    if since is not None and since <= window:
                        found.append(f"{where}: {words} {since:.0f}s ago ({s.counters.get(counter, 0)} in all)")
                since = p.since("leaks")
                if s.leaked_now or (since is not None and since <= window):
                    found.append(
                        f"{where} is leaking: {s.leaked_now} connection(s) held past leak_timeout now, "
                        f"{s.counters.get('leaks', 0)} reported in all"
                    )
        for capacity in self.capacity:
            if capacity.over:
                found.append(
                    f"over capacity on {capacity.server}: pools may open {capacity.fleet_max} "
                    f"connections, the server takes {capacity.available}"
                )
        return found

    def to_dict(self, window: float = 60.0) -> dict[str, Any]:
        return {
            "taken_at": self.taken_at,
            "stats_database": self.stats_database,
            "live_processes": len(self.live_processes()),
            "check": self.verdict(window).to_dict(),
            "aliases": {name: a.to_dict() for name, a in self.aliases.items()},
            "capacity": [c.to_dict() for c in self.capacity],
            "errors": list(self.errors),
        }


ROWS = """
SELECT host, pid, alias, extract(epoch FROM now() - published_at)::float8, stale_after, data
FROM django_pooled_pg_poolsnapshot {where} ORDER BY alias, host, pid
"""
ACTIVITY = """
SELECT application_name, datname, state, extract(epoch FROM now() - state_change)::float8
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
"""
LIMITS = """
SELECT current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       coalesce(current_setting('reserved_connections', true), '0')::int,
       (SELECT count(*) FROM pg_stat_activity
        WHERE backend_type = 'client backend' AND pid <> pg_backend_pid())::int
"""


def stats(alias: str | None = None, *, using: str | None = None) -> FleetStats:
    """Pool statistics of every process that publishes them, for ``alias`` or every alias.

    ``using``: the alias whose database holds the snapshot table (default:
    ``POOLED_PG["STATS_DATABASE"]``). Never raises for a missing table or an unreachable
    server: those are listed in :attr:`FleetStats.errors`.
    """
    import psycopg
    from django.db import connections

    using = using or read_stats_settings().database
    fleet = FleetStats(taken_at=time.time(), stats_database=using)
    configured = pooled_aliases()

    rows: list[tuple[Any, ...]] = []
    try:
        with connect(using) as conn:
            where, params = ("WHERE alias = %s", [alias]) if alias else ("", [])
            rows = conn.execute(ROWS.format(where=where), params).fetchall()
    except psycopg.errors.UndefinedTable:
        fleet.errors.append(f"no statistics table in database {using!r}: run `manage.py migrate django_pooled_pg`")
    except psycopg.Error as exc:
        fleet.errors.append(f"could not read statistics from database {using!r}: {describe_error(exc)}")

    for _host, _pid, name, age, stale_after, data in rows:
        snap = PoolSnapshot.from_dict(data)
        entry = fleet.aliases.get(name)
        if entry is None:
            entry = fleet.aliases[name] = AliasFleet(name, snap.database, snap.server)
        process = ProcessStats(snap, age=max(age, 0.0), stale=age > stale_after)
        entry.processes.append(process)
        if snap.own_application_name:
            entry.split_by_process = False
        if process.stale:
            continue
        entry.size += snap.size
        entry.idle += snap.idle
        entry.in_use += snap.in_use
        entry.waiting += snap.waiting
        entry.max_size += snap.max_size
        entry.fleet_max_size = max(entry.fleet_max_size, snap.fleet_max_size)
        for counter in COUNTER_NAMES:
            entry.counters[counter] += snap.counters.get(counter, 0)
        entry.wait.merge(Histogram.from_dict(snap.wait))
        entry.hold.merge(Histogram.from_dict(snap.hold))
        _add_views(entry, process)
    for entry in fleet.aliases.values():
        entry.holders.sort(key=lambda h: h.held, reverse=True)  # longest held first, fleet-wide

    # Aliases configured here but not (yet) published still get a server view.
    for name, settings_dict in configured.items():
        if (alias is None or name == alias) and name not in fleet.aliases:
            host, port = settings_dict.get("HOST") or "localhost", settings_dict.get("PORT") or "5432"
            fleet.aliases[name] = AliasFleet(name, str(settings_dict.get("NAME") or ""), f"{host}:{port}")

    # The server's side, once per server: asked through the first alias on it we can reach.
    limits: dict[str, tuple[int, int, int, int]] = {}
    asked: set[str] = set()
    for name, entry in sorted(fleet.aliases.items()):
        if name not in connections.settings or entry.server in asked:
            continue
        try:
            with connect(name) as conn:
                activity = conn.execute(ACTIVITY).fetchall()
                limits[entry.server] = conn.execute(LIMITS).fetchone()
        except psycopg.Error as exc:
            fleet.errors.append(f"could not ask the server of {name!r} ({entry.server}): {describe_error(exc)}")
            continue
        asked.add(entry.server)
        _assign_activity(fleet, entry.server, activity)

    for server, (max_conn, su_reserved, reserved, connected) in sorted(limits.items()):
        fleet_max = sum(_may_open(a) for a in fleet.aliases.values() if a.server == server)
        fleet.capacity.append(Capacity(server, max_conn, su_reserved, reserved, fleet_max, connected))
    _advise(fleet)
    return fleet


def _may_open(entry: AliasFleet) -> int:
    """Connections an alias's live processes may open: a fleet budget caps the sum of max_size."""
    return min(entry.max_size, entry.fleet_max_size) if entry.fleet_max_size else entry.max_size


def _advise(fleet: FleetStats) -> None:
    """Each alias's advice, its fleet's sum set against what its server leaves it."""
    capacity = {c.server: c for c in fleet.capacity}
    for entry in fleet.aliases.values():
        server = capacity.get(entry.server)
        room = None
        if server is not None:
            others = server.fleet_max - _may_open(entry)
            room = Room(entry.server, server.available, others)
        snapshots = [p.snapshot for p in entry.live]
        entry.advice = advice = advise(entry.alias, snapshots, room)
        if advice.max_size is not None:
            views = {v.name: (v.seconds, v.hold.percentile(50), v.busy) for v in entry.views.values()}
            view_finding(advice, views, snapshots[0].release)


def _add_views(entry: AliasFleet, process: ProcessStats) -> None:
    """A live process's views and holders into its alias's (the holders are sorted after)."""
    snap = process.snapshot
    for name, data in snap.views.items():
        view = entry.views.get(name)
        if view is None:
            view = entry.views[name] = ViewFleet(name)
        view.add(data)
    if snap.views:
        span = snap.recent_seconds
        entry.recent_seconds = min(entry.recent_seconds, span) if entry.recent_seconds else span
    for h in snap.holders:
        entry.holders.append(Holder(
            snap.host, snap.pid, h.get("thread", ""), h.get("view", ""), h.get("held", 0.0) + process.age,
            h.get("state", ""), bool(h.get("leak")), h.get("stack", ""),
        ))  # fmt: skip


def _assign_activity(fleet: FleetStats, server: str, activity: list[tuple[Any, ...]]) -> None:
    """Count the server's connections per alias and process (for aliases on ``server``)."""
    on_server = {name: a for name, a in fleet.aliases.items() if a.server == server}
    for entry in on_server.values():
        entry.server_view = ServerView()
        for process in entry.processes:
            process.server = ServerView() if entry.split_by_process else None
    user_names = {
        p.snapshot.application_name: entry
        for entry in on_server.values()
        if not entry.split_by_process
        for p in entry.processes
    }
    # (alias, host, pid) -> process: one lookup per connection, not a scan (200 processes x 800
    # connections per alias on the admin page).
    by_key = {(name, p.host, p.pid): p for name, entry in on_server.items() for p in entry.processes}
    for app_name, datname, state, seconds in activity:
        parsed = parse_application_name(app_name)
        if parsed is not None:
            name, host, pid = parsed
            on_alias = on_server.get(name)
            if on_alias is None or (on_alias.database and datname != on_alias.database):
                continue
            on_alias.server_view.add(state, seconds)  # type: ignore[union-attr]
            publisher_of = by_key.get((name, host, pid))
            if publisher_of is not None and publisher_of.server is not None:
                publisher_of.server.add(state, seconds)
            elif publisher_of is None:
                key = f"{host}:{pid}"
                on_alias.unpublished[key] = on_alias.unpublished.get(key, 0) + 1
        elif app_name in user_names and datname == user_names[app_name].database:
            user_names[app_name].server_view.add(state, seconds)  # type: ignore[union-attr]


#: The public name (``django_pooled_pg.fleet_stats``): ``django_pooled_pg.pooling.stats`` is a module.
fleet_stats = stats

__all__ = [
    "stats", "fleet_stats", "FleetStats", "AliasFleet", "ViewFleet", "Holder", "ProcessStats", "ServerView",
    "Capacity", "WATCHED",
]  # fmt: skip
