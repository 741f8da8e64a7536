"""What the admin status page shows, as plain data: :func:`page` turns one :func:`fleet_stats`
call (and, for the chart, one :func:`history.read`) into display strings and chart geometry.

The page's template renders this model and its script (``static/django_pooled_pg/status.js``)
re-renders the same model from the JSON endpoint, so both show the same text, formatted once, in
Python. Every value here is data: the template escapes it and the script sets it with
``textContent``; the only values put into attributes are numbers (bar widths, SVG path data).
Nothing from ``pg_stat_activity`` other than counts, states and durations is read, so query
text, which can carry user data in literals, is never shown.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

from ..pooling.stats import bucket_floor
from ..settings import read_stats_settings
from .fleet import AliasFleet, Capacity, FleetStats, ProcessStats, ServerView
from .history import History, Series

PROCESS_COLUMNS = (
    "Host", "PID", "Up", "Size", "In use", "Waiting", "Borrows", "p95 wait", "p95 hold", "Last seen",
)  # fmt: skip
SERVER_COLUMNS = ("Process", "Connections", "Active", "Idle", "Idle in transaction", "Longest idle in tx")
TIME_COLUMNS = ("", "Count", "Mean", "p50", "p95", "p99", "Max")
VIEW_COLUMNS = (
    "View", "Borrows, last min", "Conn-s, last min", "Borrows", "Conn-s", "p99 wait", "p50 hold", "p95 hold",
    "p99 hold", "Rollbacks", "503s",
)  # fmt: skip
HOLDER_COLUMNS = ("Process", "Thread", "View", "Held", "Session", "Borrowed at")
#: Frames of a holder's stack the page shows (the innermost: where it borrowed).
HOLDER_FRAMES = 3
#: Chart size in SVG user units (the SVG scales to the page's width).
CHART_WIDTH, CHART_HEIGHT, P95_HEIGHT = 720.0, 130.0, 70.0


def number(n: float | int) -> str:
    return f"{int(n):,}"


def duration(seconds: float | None) -> str:
    """A wait or hold time: ``0.05 ms``, ``3.4 ms``, ``120 ms``, ``2.5 s``."""
    if seconds is None:
        return "–"
    ms = seconds * 1000
    if ms == 0:
        return "0"
    if ms < 1:
        return f"{ms:.2f} ms"
    if ms < 10:
        return f"{ms:.1f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    return f"{seconds:.1f} s" if seconds < 100 else f"{seconds:.0f} s"


def age(seconds: float) -> str:
    """An age: ``0.3s``, ``42s``, ``5m 12s``, ``3h 02m``, ``2d 4h``."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    return f"{hours // 24}d {hours % 24}h"


def _times(summary: dict[str, float]) -> list[str]:
    return [number(summary["count"]), *(duration(summary[k]) for k in ("mean", "p50", "p95", "p99", "max"))]


def percentile(data: dict[str, Any], q: float) -> float:
    """``Histogram.from_dict(data).percentile(q)``, from the sparse published form directly (a
    page of 1000 rows would otherwise walk 2000 full bucket lists)."""
    count = data.get("count", 0)
    if not count:
        return 0.0
    rank, seen = max(1, round(q / 100 * count)), 0
    max_us = data.get("max_us", 0)
    for index, n in sorted((int(i), n) for i, n in data.get("buckets", {}).items()):
        seen += n
        if seen >= rank:
            return min((bucket_floor(index) + bucket_floor(index + 1)) / 2, max_us) / 1_000_000
    return max_us / 1_000_000


def _process_row(p: ProcessStats) -> dict[str, Any]:
    s = p.snapshot
    up = max(0.0, s.taken_at - s.started_at) + p.age
    return {
        "key": f"{s.host}:{s.pid}",
        "stale": p.stale,
        "saturated": p.saturated and not p.stale,
        "cells": [
            s.host, str(s.pid), age(up), f"{s.size} / {s.max_size}", str(s.in_use), str(s.waiting),
            number(s.counters.get("borrows", 0)),
            duration(percentile(s.wait, 95)), duration(percentile(s.hold, 95)),
            f"{age(p.age)} ago" + (" (stale)" if p.stale else ""),
        ],
    }  # fmt: skip


def _server_cells(name: str, view: ServerView) -> list[str]:
    return [
        name, str(view.total), str(view.by_state["active"]), str(view.by_state["idle"]),
        str(view.by_state["idle in transaction"]),
        age(view.longest["idle in transaction"]) if view.by_state["idle in transaction"] else "–",
    ]  # fmt: skip


def _server(entry: AliasFleet) -> dict[str, Any] | None:
    view = entry.server_view
    if view is None:
        return None
    rows = []
    for p in entry.processes:
        if p.server is not None:
            rows.append(
                {
                    "key": f"{p.host}:{p.pid}",
                    "stale": p.stale,
                    "saturated": False,
                    "cells": _server_cells(f"{p.host}:{p.pid}" + (" (stale)" if p.stale else ""), p.server),
                }
            )
    for key, count in sorted(entry.unpublished.items()):
        rows.append(
            {
                "key": key,
                "stale": True,
                "saturated": False,
                "cells": [f"{key} (not publishing)", str(count), "–", "–", "–", "–"],
            }
        )
    idle_in_tx = view.by_state["idle in transaction"]
    return {
        "total": str(view.total),
        "active": str(view.by_state["active"]),
        "idle": str(view.by_state["idle"]),
        "idle_in_transaction": str(idle_in_tx),
        "other": str(view.by_state["other"]),
        "longest_idle_in_transaction": age(view.longest["idle in transaction"]) if idle_in_tx else "–",
        "split_by_process": entry.split_by_process,
        "rows": rows,
    }


def _capacity(capacity: Capacity | None) -> dict[str, Any] | None:
    if capacity is None:
        return None
    available = max(capacity.available, 1)
    return {
        "text": capacity.describe(),
        "over": capacity.over,
        # Bar widths in percent of the connections the server takes.
        "connected_pct": round(min(100.0, 100.0 * capacity.connected / available), 1),
        "fleet_pct": round(min(100.0, 100.0 * capacity.fleet_max / available), 1),
        "connected": str(capacity.connected),
        "fleet_max": str(capacity.fleet_max),
        "available": str(capacity.available),
    }


def conn_seconds(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:,.1f}" if seconds < 1000 else f"{seconds:,.0f}"


def _views(entry: AliasFleet, top: int) -> list[dict[str, Any]]:
    """The views holding the most connection-seconds over the last minute, then since start."""
    ranked = sorted(entry.views.values(), key=lambda v: (v.recent_hold_us, v.hold.total_us), reverse=True)
    rows = []
    for v in ranked[:top]:
        rows.append({"key": v.name, "stale": False, "saturated": False, "cells": [
            v.name, number(v.recent_borrows), conn_seconds(v.recent_seconds), number(v.borrows),
            conn_seconds(v.seconds), duration(v.wait.percentile(99)), duration(v.hold.percentile(50)),
            duration(v.hold.percentile(95)), duration(v.hold.percentile(99)), number(v.rollbacks),
            number(v.responses_503),
        ]})  # fmt: skip
    return rows


def _holders(entry: AliasFleet) -> list[dict[str, Any]]:
    rows = []
    for h in entry.holders:
        frames = h.borrowed_at(HOLDER_FRAMES)
        rows.append({"key": f"{h.host}:{h.pid}:{h.thread}", "stale": False, "saturated": h.leak, "cells": [
            f"{h.host}:{h.pid}", h.thread, h.view, age(h.held), h.state + (" (leak)" if h.leak else ""),
            "\n".join(frames) if frames else "–",
        ]})  # fmt: skip
    return rows


def _row(key: str, *cells: str) -> dict[str, Any]:
    return {"key": key, "stale": False, "saturated": False, "cells": list(cells)}


def _advice(entry: AliasFleet) -> dict[str, Any]:
    """The settings advised from measured demand (``poolstats --advise``): today's beside the
    advised, and the arithmetic, a line per row."""
    advice = entry.advice
    if advice is None:
        return {"confidence": "none", "rows": [], "lines": [_row("0", "no advice")]}
    advised = {"max_size": advice.max_size, "min_size": advice.min_size, "timeout": advice.timeout,
               "fleet_max_size": advice.fleet_max_size}  # fmt: skip
    rows = [
        _row(name, name, "–" if advice.today[name] is None else f"{advice.today[name]:g}",
             "–" if value is None else f"{value:g}")
        for name, value in advised.items()
    ]  # fmt: skip
    lines = [_row(str(i), line) for i, line in enumerate(advice.lines)]
    return {"confidence": advice.confidence, "rows": rows, "lines": lines}


def _alias(entry: AliasFleet, fleet: FleetStats, top: int = 10) -> dict[str, Any]:
    capacity = next((c for c in fleet.capacity if c.server == entry.server), None)
    live = entry.live
    c = entry.counters
    return {
        "alias": entry.alias,
        "database": entry.database,
        "server_address": entry.server,
        "totals": {
            "processes": str(len(live)),
            "stale": str(len(entry.processes) - len(live)),
            "size": str(entry.size), "idle": str(entry.idle), "in_use": str(entry.in_use),
            "waiting": str(entry.waiting), "max_size": str(entry.max_size),
            "borrows": number(c["borrows"]), "timeouts": number(c["exhausted"]),
            "unavailable": number(c["unavailable"]), "responses_503": number(c["responses_503"]),
            "leaks": number(c["leaks"]), "leaked_now": str(sum(p.snapshot.leaked_now for p in live)),
            "reclaimed": number(c["reclaimed"]), "rollbacks": number(c["rollbacks"]),
        },
        "times": [["wait", *_times(entry.wait.summary())], ["hold", *_times(entry.hold.summary())]],
        "capacity": _capacity(capacity),
        "budget": entry.budget_text(),
        "processes": [_process_row(p) for p in entry.processes],
        "server": _server(entry),
        "views": _views(entry, top),
        "views_more": str(max(len(entry.views) - top, 0)),
        "holders": _holders(entry),
        "advice": _advice(entry),
    }  # fmt: skip


def _nice(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is >= value (> 0)."""
    value = max(value, 1e-9)
    power = 10 ** math.floor(math.log10(value))
    for factor in (1, 2, 5, 10):
        if factor * power >= value * 0.999:
            return factor * power
    return 10 * power


def _path(xs: list[float], ys: list[float], gaps: list[bool]) -> str:
    """SVG path data through the points, lifting the pen where ``gaps`` says a bucket is missing;
    a lone point becomes a dot (a tiny segment with round caps)."""
    parts: list[str] = []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if i == 0 or gaps[i]:
            alone = i + 1 >= len(xs) or gaps[i + 1]
            parts.append(f"M{x:.1f} {y:.1f}" + ("h0.1" if alone else ""))
        else:
            parts.append(f"L{x:.1f} {y:.1f}")
    return "".join(parts)


def _gaps(times: list[float], step: float) -> list[bool]:
    return [i > 0 and times[i] - times[i - 1] > step * 2 for i in range(len(times))]


def chart(
    series: Series | None, window: float, live: AliasFleet | None = None, now: float | None = None
) -> dict[str, Any]:
    """Geometry of one alias's two charts, as SVG path data in a fixed coordinate system:
    connections (in use, waiting, the pools' max size: 30-second averages over the fleet, ending
    with the ``live`` totals now) and the p95 wait (the worst process's per bucket)."""
    step = series.step if series is not None else 30.0
    end = series.end if series is not None else (now or 0.0)
    times, in_use, waiting, max_size = [], [], [], []
    p95_times, p95 = [], []
    if series is not None:
        mids = [t + step / 2 for t in series.at]
        times, in_use, waiting, max_size = list(mids), list(series.in_use), list(series.waiting), list(series.max_size)
        p95_times, p95 = list(mids), list(series.wait_p95)
        if series.current_wait_p95 is not None:
            p95_times.append(end)
            p95.append(series.current_wait_p95)
    if live is not None and (live.processes or live.max_size):
        times.append(end)
        in_use.append(float(live.in_use))
        waiting.append(float(live.waiting))
        max_size.append(float(live.max_size))
    # A young fleet's chart spans its life (5 minutes at least), not an hour of nothing.
    first = min([*times, *p95_times], default=end)
    shown = min(window, max(300.0, math.ceil((end - first + step) / 300) * 300.0))
    start = end - shown
    window = shown
    result = {
        "in_use": "",
        "waiting": "",
        "max_size": "",
        "wait_p95": "",
        "conn_top": "1",
        "p95_top": "1 ms",
        "points": len(times),
        "last_in_use": "–",
        "last_waiting": "–",
        "last_p95": "–",
        "span_label": f"{shown / 60:.0f} min ago",
        "span_title": "The last hour" if shown >= 3600 else f"The last {shown / 60:.0f} minutes",
    }
    if times:
        top = _nice(max([*max_size, *in_use, *waiting, 1.0]))
        xs = [max(0.0, min(CHART_WIDTH, (t - start) / window * CHART_WIDTH)) for t in times]
        gaps = _gaps(times, step)

        def conn_y(values: list[float]) -> list[float]:
            return [CHART_HEIGHT - v / top * CHART_HEIGHT for v in values]

        result.update(
            {
                "in_use": _path(xs, conn_y(in_use), gaps),
                "waiting": _path(xs, conn_y(waiting), gaps),
                "max_size": _path(xs, conn_y(max_size), gaps),
                "conn_top": f"{top:g}",
                "last_in_use": f"{in_use[-1]:g}",
                "last_waiting": f"{waiting[-1]:g}",
            }
        )
    if p95_times:
        p95_ms = [v * 1000 for v in p95]
        p95_top = _nice(max([*p95_ms, 1.0]))
        xs = [max(0.0, min(CHART_WIDTH, (t - start) / window * CHART_WIDTH)) for t in p95_times]
        result["wait_p95"] = _path(xs, [P95_HEIGHT - v / p95_top * P95_HEIGHT for v in p95_ms], _gaps(p95_times, step))
        result["p95_top"] = f"{p95_top:g} ms"
        result["last_p95"] = duration(p95[-1])
    return result


def _clock(epoch: float) -> str:
    from django.conf import settings
    from django.utils import timezone

    moment = datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC)
    if settings.USE_TZ:
        moment = timezone.localtime(moment)
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def page(fleet: FleetStats, history: History | None = None, *, window: float = 3600.0) -> dict[str, Any]:
    """The page's model. Without ``history`` there is no ``chart`` key per alias (the script
    keeps the chart it has)."""
    aliases = []
    top = read_stats_settings().top_views
    for name in sorted(fleet.aliases):
        entry = _alias(fleet.aliases[name], fleet, top)
        if history is not None:
            entry["chart"] = chart(history.aliases.get(name), window, fleet.aliases[name], fleet.taken_at)
        aliases.append(entry)
    errors = list(fleet.errors) + (list(history.errors) if history is not None else [])
    return {
        "taken_at": _clock(fleet.taken_at),
        "stats_database": fleet.stats_database,
        "errors": errors,
        "problems": fleet.problems(),
        "aliases": aliases,
        "process_columns": list(PROCESS_COLUMNS),
        "server_columns": list(SERVER_COLUMNS),
        "time_columns": list(TIME_COLUMNS),
        "view_columns": list(VIEW_COLUMNS),
        "holder_columns": list(HOLDER_COLUMNS),
    }
