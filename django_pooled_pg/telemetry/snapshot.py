"""This process's pools, as plain data: what the publisher writes and ``poolstats`` reads.

A :class:`PoolSnapshot` is one row per process and alias: the pool's size right now (from
psycopg_pool's ``get_stats()``: size, idle, waiting; in use from the ledger), the counters this
package records on the borrow path (:class:`~django_pooled_pg.pooling.stats.AliasStats`), psycopg_pool's
count of connections its checks found dead (``connections_lost``), and the wait, hold and
connect histograms. Building one reads counters that the borrow path updates without a lock; a value may
be one borrow behind, which is fine for statistics, and the hot path pays nothing for it. The
pool's demand (connections in use over time, :mod:`~django_pooled_pg.pooling.demand`) is read
under its lock, and published over the last minute and 15 minutes (:func:`demand_windows`).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..pooling.demand import Demand, Sample, sample, window
from ..pooling.ledger import Borrow, ledger
from ..pooling.registry import registry
from ..pooling.stats import OTHER, AliasStats, ViewStats

#: When this process started, as the publisher sees it (reset in a forked child).
STARTED_AT = time.time()

#: Counters whose recent increase ``poolstats --check`` reports: the wall-clock time of the
#: snapshot in which each was last seen to grow, per alias.
WATCHED = ("exhausted", "unavailable", "responses_503", "leaks", "budget_refused")
_last_seen: dict[tuple[str, str], tuple[int, float]] = {}


def hostname() -> str:
    return socket.gethostname()


def application_name(alias: str, pid: int | None = None, host: str | None = None) -> str:
    """The ``application_name`` of this process's pooled connections to ``alias``: ``dpp ALIAS
    HOST:PID``, at most 63 bytes (the server's limit) with the host shortened first."""
    pid = os.getpid() if pid is None else pid
    host = hostname() if host is None else host
    head, tail = f"dpp {alias} ", f":{pid}"
    room = 63 - len(head.encode()) - len(tail.encode())
    short = host.encode()[: max(room, 0)].decode(errors="ignore")
    return (head + short + tail)[:63]


def parse_application_name(name: str | None) -> tuple[str, str, int] | None:
    """(alias, host, pid) from an :func:`application_name`, or None for any other name."""
    if not name or not name.startswith("dpp "):
        return None
    try:
        alias, rest = name[4:].split(" ", 1)
        host, pid = rest.rsplit(":", 1)
        return alias, host, int(pid)
    except ValueError:
        return None


@dataclass
class PoolSnapshot:
    """One alias's pool in one process at one moment. JSON-serialisable via :meth:`to_dict`."""

    host: str
    pid: int
    alias: str
    started_at: float  # epoch seconds
    taken_at: float  # epoch seconds (this process's clock; the table also keeps the server's)
    database: str  # NAME
    server: str  # HOST:PORT
    application_name: str  # of the pool's connections; "" when unknown
    own_application_name: bool  # the user set OPTIONS["application_name"]
    min_size: int
    max_size: int
    timeout: float
    size: int
    idle: int
    in_use: int
    waiting: int
    #: Borrows held now that were reported as leaks.
    leaked_now: int
    counters: dict[str, int] = field(default_factory=dict)
    #: The fleet budget (OPTIONS["pool"]["fleet_max_size"], "auto" resolved; 0: none or not read
    #: yet), and what this process last saw of it: connections of the fleet, processes, and
    #: newcomers waiting for a share. This process's share is its ``size``.
    fleet_max_size: int = 0
    fleet_seen: list[int] = field(default_factory=list)
    #: Epoch seconds when each of WATCHED last grew (0: never seen growing).
    last_increase: dict[str, float] = field(default_factory=dict)
    wait: dict[str, Any] = field(default_factory=dict)  # Histogram.to_dict()
    hold: dict[str, Any] = field(default_factory=dict)
    connect: dict[str, Any] = field(default_factory=dict)  # time to open each new connection
    #: Per view (route name, ``module.function``, task, ``borrow()`` block): ViewStats.to_dict()
    #: plus ``recent``: [borrows, hold_us] over the last ``recent_seconds`` (a minute, or since
    #: the process started). The top :data:`PUBLISHED_VIEWS` by hold over each span; the rest
    #: summed under "other", so that a row stays small whatever the number of views.
    views: dict[str, dict[str, Any]] = field(default_factory=dict)
    recent_seconds: float = 0.0
    #: Connections borrowed now, longest held first (at most :data:`PUBLISHED_HOLDERS`): thread,
    #: view, held (s, at ``taken_at``), session state, whether reported as a leak, and the
    #: borrower's stack when leak_timeout is set.
    holders: list[dict[str, Any]] = field(default_factory=list)
    #: The pool's demand over the last minute and the last 15 minutes ("1m", "15m"), or since
    #: the pool was made when that is shorter: :func:`~django_pooled_pg.pooling.demand.window`.
    demand: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: OPTIONS["pool"]["release"]: "request" or "transaction".
    release: str = "request"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PoolSnapshot:
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})


def _server(settings_dict: dict[str, Any]) -> str:
    host = settings_dict.get("HOST") or "localhost"
    port = settings_dict.get("PORT") or "5432"
    return f"{host}:{port}"


def take(alias: str | None = None) -> list[PoolSnapshot]:
    """Snapshots of this process's open pools (of ``alias`` only, if given)."""
    host, pid, now = hostname(), os.getpid(), time.time()
    held = list(ledger.borrows.values())
    snapshots = []
    for name, pool in sorted(registry.pools().items()):
        if (alias is not None and name != alias) or pool.closed:
            continue
        pool.count_parked_holds()  # (holds that ended at a park: counted before they are read)
        stats = ledger.stats_for(name)
        measures = pool.get_stats()
        counters = stats.counters()
        # Dead connections its own checks found, which no borrower saw. (Not its returns_bad:
        # those are the connections counted as lost or discarded when they went back.)
        counters["lost"] += measures.get("connections_lost", 0)
        last_increase = {}
        for key in WATCHED:
            value = counters.get(key, 0)
            previous, at = _last_seen.get((name, key), (0, 0.0))
            if value > previous:
                at = now
            _last_seen[(name, key)] = (value, at)
            last_increase[key] = at
        kwargs = getattr(pool, "kwargs", {}) or {}
        settings_dict = _settings_dict(name)
        app_name = str(kwargs.get("application_name") or "")
        in_alias = [b for b in held if b.alias == name and not b.parked]
        views, recent_seconds = published_views(name, stats, time.monotonic())
        snapshots.append(PoolSnapshot(
            host=host, pid=pid, alias=name, started_at=STARTED_AT, taken_at=now,
            database=str(settings_dict.get("NAME") or kwargs.get("dbname") or ""),
            server=_server(settings_dict),
            application_name=app_name,
            own_application_name=parse_application_name(app_name) is None,
            min_size=pool.min_size, max_size=pool.max_size, timeout=pool.timeout,
            size=measures.get("pool_size", 0), idle=measures.get("pool_available", 0),
            in_use=len(in_alias), waiting=measures.get("requests_waiting", 0),
            leaked_now=sum(1 for b in in_alias if b.reported),
            counters=counters, last_increase=last_increase,
            fleet_max_size=pool.budget.size or 0 if pool.budget else 0,
            fleet_seen=list(pool.budget.seen) if pool.budget else [],
            wait=stats.wait.to_dict(), hold=stats.hold.to_dict(), connect=stats.connect.to_dict(),
            views=views, recent_seconds=recent_seconds,
            holders=holders_of(in_alias, time.monotonic()),
            demand=demand_windows(name, pool.demand, stats), release=pool.settings.release,
        ))  # fmt: skip
    return snapshots


# ----- Per view -----------------------------------------------------------------------------------

#: Views a row publishes by name: the top ones by hold since start and over the last minute.
PUBLISHED_VIEWS = 25
#: The span of "recent" per-view figures, seconds.
RECENT = 60.0
#: Per alias, (monotonic time, {view: (holds, hold_us)}) at each of the last snapshots: what
#: "recent" is measured from. Taken by whoever takes a snapshot (the publisher's thread,
#: OpenTelemetry's reader, poolstats or the admin page in this process: hence the lock), never on
#: the borrow path.
_marks: dict[str, list[tuple[float, dict[str, tuple[int, int]]]]] = {}
_marks_lock = threading.Lock()


def published_views(alias: str, stats: AliasStats, now: float) -> tuple[dict[str, dict[str, Any]], float]:
    """The views of one alias as a row publishes them, and the span (s) of their ``recent``."""
    current = {view.name: view for view in stats.named_views()}
    totals = {name: (view.hold.count, view.hold.total_us) for name, view in current.items()}
    with _marks_lock:
        marks = _marks.get(alias)
        if marks is None:  # the first snapshot: recent = since the process started (up to RECENT)
            marks = _marks[alias] = [(now - min(RECENT, max(time.time() - STARTED_AT, 0.0)), {})]
        marks.append((now, totals))
        while marks[1][0] <= now - RECENT:
            del marks[0]  # keep the newest mark at least RECENT old as the baseline
        since, base = marks[0]
    recent = {name: (n - base.get(name, (0, 0))[0], us - base.get(name, (0, 0))[1]) for name, (n, us) in totals.items()}
    by_total = sorted(current, key=lambda name: totals[name][1], reverse=True)[:PUBLISHED_VIEWS]
    by_recent = sorted(current, key=lambda name: recent[name][1], reverse=True)[:PUBLISHED_VIEWS]
    named = set(by_total) | {name for name in by_recent if recent[name][0]}
    out: dict[str, dict[str, Any]] = {}
    other = ViewStats(OTHER)
    other_recent = [0, 0]
    for name, view in current.items():
        if name in named and name != OTHER:
            out[name] = {**view.to_dict(), "recent": list(recent[name])}
        else:
            other.wait.merge(view.wait)
            other.hold.merge(view.hold)
            other.busy += view.busy
            other.rollbacks += view.rollbacks
            other.responses_503 += view.responses_503
            other_recent[0] += recent[name][0]
            other_recent[1] += recent[name][1]
    if other.wait.count or other.hold.count:
        out[OTHER] = {**other.to_dict(), "recent": other_recent}
    return out, now - since


# ----- Demand -------------------------------------------------------------------------------------

#: The windows a row publishes the pool's demand over: name, seconds.
WINDOWS = (("1m", 60.0), ("15m", 900.0))
#: Seconds between two samples kept for the windows, at least (a snapshot taken sooner, by
#: ``poolstats`` or the admin page in this process, reads the windows without keeping a sample).
SAMPLE_STEP = 10.0
#: Per alias: the pool's Demand the samples are of (a new pool starts again), and cumulative
#: samples, oldest first: the newest one at least the longest window old, and those after it.
_rings: dict[str, tuple[Demand, list[Sample]]] = {}
_rings_lock = threading.Lock()


def demand_windows(alias: str, demand: Demand, stats: AliasStats) -> dict[str, dict[str, Any]]:
    """The demand on ``alias``'s pool over each of :data:`WINDOWS`: from the newest sample at
    least the window old (so a window covers it whole, and up to SAMPLE_STEP more), or from the
    pool's making when it is younger; the covered seconds are published with it."""
    with _rings_lock:  # (the publisher, OpenTelemetry's reader and poolstats may take snapshots at once)
        ring = _rings.get(alias)
        if ring is None or ring[0] is not demand:
            ring = _rings[alias] = (demand, [demand.first] if demand.first is not None else [])
        samples = ring[1]
        now = sample(demand, stats)
        if not samples or now.at - samples[-1].at >= SAMPLE_STEP:
            samples.append(now)
        longest = WINDOWS[-1][1]
        while len(samples) > 2 and samples[1].at <= now.at - longest:
            del samples[0]
        samples = list(samples)
    out = {}
    for name, span in WINDOWS:
        start = 0
        for i, s in enumerate(samples):
            if s.at <= now.at - span:
                start = i
        used = [s for s in samples[start:] if s is not now]
        out[name] = window(samples[start], now, len(used) + 1)
    return out


# ----- Holders ------------------------------------------------------------------------------------

#: Holders a row lists (longest held first), and the characters of each one's stack.
PUBLISHED_HOLDERS = 50
STACK_CHARS = 4000
_STATES = {0: "idle", 1: "active", 2: "idle in transaction", 3: "in failed transaction"}


def holders_of(borrows: list[Borrow], now: float) -> list[dict[str, Any]]:
    """The connections borrowed now from one alias, as a row publishes them."""
    out = []
    for borrow in sorted(borrows, key=lambda b: b.started)[:PUBLISHED_HOLDERS]:
        try:  # (a libpq field read; the connection may be closing under us)
            state = _STATES.get(int(borrow.conn.pgconn.transaction_status), "unknown")
        except Exception:
            state = "unknown"
        out.append({
            "thread": borrow.thread.name,
            "view": borrow.view or borrow.stats.name,
            "held": round(max(now - borrow.started, 0.0), 6),
            "state": state,
            "leak": borrow.reported,
            "stack": borrow.stack()[-STACK_CHARS:] if borrow.frames else "",
        })  # fmt: skip
    return out


def _settings_dict(alias: str) -> dict[str, Any]:
    try:
        from django.db import connections

        return connections.settings[alias]
    except Exception:  # an alias gone from settings (override_settings ended)
        return {}


def after_fork_in_child() -> None:
    global STARTED_AT, _rings_lock, _marks_lock
    STARTED_AT = time.time()
    _rings_lock = threading.Lock()  # (a thread of the parent's may have held them at the fork)
    _marks_lock = threading.Lock()
    _last_seen.clear()
    _marks.clear()
    _rings.clear()


os.register_at_fork(after_in_child=after_fork_in_child)
