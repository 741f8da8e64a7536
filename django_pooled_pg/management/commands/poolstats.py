"""``manage.py poolstats``: the pools of every process, on every host, and the server's view.

    manage.py poolstats                   # a table per alias: a row per process, a total line
    manage.py poolstats --database ALIAS  # one alias
    manage.py poolstats --json            # the same data for machines (django_pooled_pg.fleet_stats)
    manage.py poolstats --watch 2         # refresh every 2 s until Ctrl-C
    manage.py poolstats --check           # health probe: exit 1 with a one-line reason, else 0
    manage.py poolstats --views           # which views hold the connections: top views by connection-seconds
    manage.py poolstats --holders         # the connections checked out now: process, thread, view, for how long
    manage.py poolstats --advise          # max_size, min_size, timeout, fleet_max_size advised from measured demand

For scripts: the exit status is 2 whenever the statistics could not be read (an ``error:`` line,
also on stderr), ``--check`` says ``UNKNOWN`` (exit 2) when no process publishes statistics, the
tables fit the terminal's width (``COLUMNS``, 80 when not a terminal) by splitting their columns
into blocks, and ``--watch`` into a file or pipe writes one report after another, without the
screen-clearing codes.

It prints aliases, database names and HOST:PORT, never a user, a password or a connection
string. It reads through connections of its own outside the pool, so it never shows up as a
process of the fleet, and works while every pool is saturated.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import time
from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from django_pooled_pg.pooling.stats import COUNTERS, Histogram
from django_pooled_pg.settings import read_stats_settings
from django_pooled_pg.telemetry.fleet import AliasFleet, FleetStats, ServerView, fleet_stats

EXIT_UNKNOWN = 2  # (--check's exit codes are FleetStats.verdict()'s)
#: Frames of each holder's stack that ``--holders`` prints.
STACK_FRAMES = 6
#: The counters shown as columns, with their headers.
COUNTER_COLUMNS = [(c.name, c.column) for c in COUNTERS if c.column]


def ms(seconds: float) -> str:
    value = seconds * 1000
    if value == 0:
        return "0"
    if value < 1:
        return f"{value:.3f}"
    if value < 100:
        return f"{value:.1f}"
    return f"{value:.0f}"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def timing(h: dict[str, float]) -> list[str]:
    return [ms(h["mean"]), ms(h["p50"]), ms(h["p95"]), ms(h["p99"]), ms(h["max"])]


def table(headers: list[str], rows: list[list[str]], indent: str = "  ", width: int | None = None) -> list[str]:
    """Left-aligned first column, right-aligned others. When the table is wider than ``width``
    (the terminal's, see :func:`output_width`), its columns are split into blocks that fit, one
    under the other, each starting with the first column."""
    width = output_width() if width is None else width
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    blocks: list[list[int]] = [[]]
    used = len(indent) + widths[0]
    for i in range(1, len(headers)):
        if blocks[-1] and used + 2 + widths[i] > width:
            blocks.append([])
            used = len(indent) + widths[0]
        blocks[-1].append(i)
        used += 2 + widths[i]

    def line(cells: list[str], columns: list[int]) -> str:
        parts = [str(cells[0]).ljust(widths[0])]
        parts += [str(cells[i]).rjust(widths[i]) for i in columns]
        return (indent + "  ".join(parts)).rstrip()

    out: list[str] = []
    for columns in blocks:
        if out:
            out.append("")
        out += [line(headers, columns), *(line(r, columns) for r in rows)]
    return out


def output_width() -> int:
    """Columns to fit in: the terminal's, or ``COLUMNS``, or 80 (output to a file or pipe)."""
    return max(40, shutil.get_terminal_size((80, 24)).columns)


def server_cells(view: ServerView | None) -> list[str]:
    if view is None:
        return ["-", "-", "-", "-"]
    oldest = view.longest["idle in transaction"]
    return [
        str(view.total),
        str(view.by_state["active"]),
        str(view.by_state["idle"]),
        f"{view.by_state['idle in transaction']}" + (f" ({duration(oldest)})" if oldest else ""),
    ]


def render_alias(entry: AliasFleet) -> list[str]:
    out = [f"{entry.alias}: database {entry.database or '?'} on {entry.server}"]
    if not entry.processes:
        out.append("  no process has published statistics for this alias")
    else:
        pool_headers = [
            "process", "age", "size", "idle", "in use", "waiting", "max",
            "server: conns", "active", "idle", "idle in tx",
        ]  # fmt: skip
        count_headers = ["process", *(header for _, header in COUNTER_COLUMNS)]
        time_headers = [
            "process", "wait mean", "p50", "p95", "p99", "max", "hold mean", "p50", "p95", "p99", "max",
        ]  # fmt: skip
        pool_rows, count_rows, time_rows = [], [], []

        def counters(c: dict[str, int]) -> list[str]:
            return [str(c.get(k, 0)) for k, _ in COUNTER_COLUMNS]

        for p in entry.processes:
            s = p.snapshot
            label = f"{s.host}:{s.pid}"
            if p.stale:
                label += " STALE"
            elif p.saturated:
                label += " SATURATED"
            pool_rows.append([
                label, duration(p.age), str(s.size), str(s.idle), str(s.in_use), str(s.waiting),
                str(s.max_size), *server_cells(p.server),
            ])  # fmt: skip
            count_rows.append([label, *counters(s.counters)])
            time_rows.append(
                [
                    label,
                    *timing(Histogram.from_dict(s.wait).summary()),
                    *timing(Histogram.from_dict(s.hold).summary()),
                ]
            )
        total = f"total ({len(entry.live)} live)"
        pool_rows.append([
            total, "", str(entry.size), str(entry.idle), str(entry.in_use), str(entry.waiting),
            str(entry.max_size), *server_cells(entry.server_view),
        ])  # fmt: skip
        count_rows.append([total, *counters(entry.counters)])
        time_rows.append([total, *timing(entry.wait.summary()), *timing(entry.hold.summary())])
        out += table(pool_headers, pool_rows)
        out.append("")
        out += table(count_headers, count_rows)
        out.append("")
        out += table(time_headers, time_rows)
    view = entry.server_view
    if view is not None:
        longest = ", ".join(
            f"longest {state} {duration(view.longest[state])}"
            for state in ("active", "idle in transaction")
            if view.longest[state]
        )
        out.append(
            f"  server: {view.total} pooled connections: {view.by_state['active']} active, "
            f"{view.by_state['idle']} idle, {view.by_state['idle in transaction']} idle in transaction"
            + (f", {view.by_state['other']} other" if view.by_state["other"] else "")
            + (f" ({longest})" if longest else "")
        )
    if entry.fleet_max_size:
        out.append(f"  {entry.budget_text()}")
    if not entry.split_by_process:
        out.append(
            '  note: OPTIONS["application_name"] is set, so the server view cannot be split per '
            "process (only per alias)"
        )
    if entry.unpublished:
        listed = ", ".join(f"{k} ({n})" for k, n in sorted(entry.unpublished.items()))
        out.append(f"  pooled connections of processes that publish no statistics: {listed}")
    return out


def seconds(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def render_views(entry: AliasFleet, top: int) -> list[str]:
    """The views holding the most of ``entry``'s connections: over the last minute, and since
    each process started (with their wait and hold times and what went wrong)."""
    out = [f"{entry.alias}: database {entry.database or '?'} on {entry.server}; top {top} views by connection-seconds"]
    if not entry.views:
        return [*out, "  no view has given back a connection yet"]
    recent = entry.top_views(recent=True)
    recent_total = sum(v.recent_hold_us for v in recent) / 1_000_000
    rows = [[v.name, str(v.recent_borrows), seconds(v.recent_seconds), share(v.recent_seconds, recent_total)]
            for v in recent[:top]]  # fmt: skip
    out.append(f"  last {entry.recent_seconds:.0f}s:")
    out += table(["view", "borrows", "conn-s", "share"], rows, indent="    ") if rows else ["    none"]
    ranked = entry.top_views(recent=False)
    total = sum(v.seconds for v in ranked)
    rows = []
    for v in ranked[:top]:
        wait, hold = v.wait.summary(), v.hold.summary()
        rows.append([
            v.name, str(v.borrows), seconds(v.seconds), share(v.seconds, total), ms(wait["p50"]), ms(wait["p99"]),
            *timing(hold), str(v.rollbacks), str(v.responses_503),
        ])  # fmt: skip
    out.append("  since start:")
    headers = [
        "view", "borrows", "conn-s", "share", "wait p50", "p99", "hold mean", "p50", "p95", "p99", "max",
        "rollbacks", "503s",
    ]  # fmt: skip
    out += table(headers, rows, indent="    ")
    if len(ranked) > top:
        out.append(f"    ({len(ranked) - top} more views)")
    return out


def render_holders(entry: AliasFleet) -> list[str]:
    """The connections of ``entry`` borrowed now, fleet-wide, longest held first."""
    out = [f"{entry.alias}: {len(entry.holders)} connection(s) checked out (as each process last published)"]
    if not entry.holders:
        return out
    rows = [[f"{h.host}:{h.pid}", h.thread, h.view, duration(h.held), h.state + (" LEAK" if h.leak else "")]
            for h in entry.holders]  # fmt: skip
    out += table(["process", "thread", "view", "held", "session"], rows)
    for h in entry.holders:
        if h.stack:
            out.append(f"  {h.host}:{h.pid} {h.thread} ({h.view}) borrowed at:")
            out += ["    " + line for line in h.borrowed_at(STACK_FRAMES)]
    if any(h.stack for h in entry.holders):
        out.append("  (the project's innermost frames; --json has the whole stacks)")
    else:
        out.append("  (stacks are captured when OPTIONS['pool']['leak_timeout'] is set)")
    return out


def render_advice(entry: AliasFleet) -> list[str]:
    """The settings advised for ``entry`` from its measured demand, each with its arithmetic."""
    out = [f"{entry.alias}: database {entry.database or '?'} on {entry.server}; advice"]
    advice = entry.advice
    if advice is None:
        return [*out, "  no advice"]
    return out + ["  " + line for line in advice.lines]


def render(fleet: FleetStats, section: str = "pools", top: int = 10, window: float = 60.0) -> str:
    when = datetime.fromtimestamp(fleet.taken_at).strftime("%Y-%m-%d %H:%M:%S")
    out = [
        f"poolstats {when}: {len(fleet.live_processes())} live process(es), "
        f"statistics in database alias {fleet.stats_database!r}"
    ]
    for entry in fleet.aliases.values():
        out.append("")
        if section == "views":
            out += render_views(entry, top)
        elif section == "holders":
            out += render_holders(entry)
        elif section == "advise":
            out += render_advice(entry)
        else:
            out += render_alias(entry)
    if fleet.capacity:
        out.append("")
        out += [c.describe() for c in fleet.capacity]
    for error in fleet.errors:
        out.append(f"error: {error}")
    if not any(entry.processes for entry in fleet.aliases.values()) and not fleet.errors:
        out.append("no process publishes statistics: is the site running, with django_pooled_pg in INSTALLED_APPS?")
    out.append("")
    # What --check would say of this very reading (the probe and the table never disagree).
    out.append(f"check: {fleet.verdict(window).line}")
    if section == "views":
        out.append(
            "views: route names (or module.function), tasks, borrow() blocks; borrows given back; "
            "conn-s: connection-seconds held; times in ms; live processes only"
        )
    elif section == "advise":
        out.append(
            "advice from the live processes' demand: Little's law, the p99 of connections in use, the "
            "Erlang C (M/M/c) waiting probability; per process unless said otherwise"
        )
    elif section != "holders":
        out.append(
            "times in ms (wait: for a connection; hold: borrowed); counters since each process started; "
            "totals leave stale rows out"
        )
    width = output_width()
    return "\n".join(wrapped for line in out for wrapped in fit(line, width))


def fit(line: str, width: int) -> list[str]:
    """A line of prose wrapped to ``width``, continued one step further in (tables already fit)."""
    if len(line) <= width:
        return [line]
    indent = " " * (len(line) - len(line.lstrip()) + 2)
    return textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False) or [line]


class Command(BaseCommand):
    help = "Pool statistics of every process (every gunicorn/uvicorn worker, every host) and the server's view."
    requires_system_checks: Any = []  # a health probe must answer even when a check fails

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--database", metavar="ALIAS", help="only this alias")
        parser.add_argument("--json", action="store_true", help="print JSON (one document per refresh)")
        parser.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
        parser.add_argument(
            "--check",
            action="store_true",
            help="exit 1 with a one-line reason when a pool is saturated, timing out or leaking, or "
            "the fleet is over the server's capacity; 2 when statistics cannot be read; else 0",
        )
        parser.add_argument(
            "--views",
            action="store_true",
            help="the views (tasks, borrow() blocks) holding the most connection-seconds, over the last "
            "minute and since start",
        )
        parser.add_argument(
            "--holders",
            action="store_true",
            help="the connections checked out now, fleet-wide: process, thread, view, held for how long",
        )
        parser.add_argument(
            "--advise",
            action="store_true",
            help="max_size, min_size, timeout and fleet_max_size advised from the demand measured over the "
            "last 15 minutes, with the arithmetic (the JSON always has them, under aliases.ALIAS.advice)",
        )
        parser.add_argument(
            "--top",
            type=int,
            metavar="N",
            help='with --views: how many views to list (default POOLED_PG["TOP_VIEWS"], 10)',
        )
        parser.add_argument(
            "--window",
            type=float,
            default=60.0,
            metavar="SECONDS",
            help="how recent a timeout or leak report must be to fail the check (--check, and the check "
            "line of the table and JSON; default 60)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        alias = options["database"]
        if alias is not None:
            from django.db import connections

            if alias not in connections.settings:
                raise CommandError(f"no database alias {alias!r} in DATABASES")
        if options["check"]:
            sys.exit(self.check_fleet(alias, options["window"]))
        watch = options["watch"]
        if watch is not None and watch <= 0:
            raise CommandError("--watch takes a number of seconds greater than 0")
        if options["views"] + options["holders"] + options["advise"] > 1:
            raise CommandError("--views, --holders and --advise are three reports: give one of them")
        section = next((name for name in ("views", "holders", "advise") if options[name]), "pools")
        top = options["top"]
        if top is None:
            top = read_stats_settings().top_views
        elif top < 1:
            raise CommandError("--top takes a number of views of at least 1")
        terminal = self.stdout.isatty()
        try:
            while True:
                fleet = fleet_stats(alias)
                if options["json"]:
                    self.stdout.write(json.dumps(fleet.to_dict(options["window"]), indent=None if watch else 2))
                else:
                    if watch and terminal:
                        self.stdout.write("\x1b[H\x1b[2J", ending="")  # clear the screen, cursor home
                    self.stdout.write(render(fleet, section, top, options["window"]))
                    if watch and terminal:
                        self.stdout.write(f"\nrefreshing every {watch:g}s; Ctrl-C to stop")
                    elif watch:
                        self.stdout.write("")  # (a blank line between reports in a file)
                self.stdout.flush()
                if not watch:
                    break
                time.sleep(watch)
        except KeyboardInterrupt:
            self.stdout.write("")
            return
        if fleet.errors:
            for error in fleet.errors:
                self.stderr.write(f"poolstats: {error}")
            sys.exit(EXIT_UNKNOWN)

    def check_fleet(self, alias: str | None, window: float) -> int:
        verdict = fleet_stats(alias).verdict(window)
        self.stdout.write(verdict.line)
        return verdict.exit_code
