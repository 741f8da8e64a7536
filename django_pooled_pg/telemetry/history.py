"""The last hour of each alias's pools, for the admin page's chart.

Design. The snapshot table keeps one row per process and alias, overwritten every interval, so it
has no past. The past lives in a second UNLOGGED table, ``django_pooled_pg_poolhistory``
(:class:`~django_pooled_pg.models.PoolHistory`, migration 0002), of small fixed-width points: each
publishing process appends one row per alias (in use, waiting, size, borrows and the p95 wait of
the borrows since its previous point) when it publishes, at most once every :data:`STEP`
seconds, in the publication's own transaction. Why this and not the alternatives:

* one row per process keeps writing contention-free: nobody updates a shared row (a per-alias
  "fleet point" upserted by every process would be a hot row under 200 writers), and a process
  that dies simply stops adding points;
* each point carries its ``span``, the seconds since the process's previous point, so the reader
  gets the fleet's time-weighted average per bucket in one pass, ``sum(in_use * span) / bucket``
  (no per-process layer: 360,000 points, 200 processes x 5 aliases, read in about 0.1 s); for
  the p95 wait, the worst process's per bucket. Only complete buckets are averaged (a bucket
  still filling would dip); the page ends the line with the fleet's live totals;
* it stays small and cheap: about 60 bytes a point, 360 points an hour per process and alias at
  most; pruning deletes points older than :data:`KEEP` seconds, at most :data:`PRUNE_BATCH` per
  publication with ``FOR UPDATE SKIP LOCKED``, so processes pruning at the same time never wait
  on each other; UNLOGGED, like the snapshots (worthless after a crash, no WAL);
* the insert runs inside a savepoint: a process running before ``migrate`` created this table
  (or after it was dropped) still publishes its snapshots, and only the chart is missing.

The p95 wait of a point is computed in the process from the difference between its wait
histogram now and at its previous point, so it describes those seconds, not the process's life.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from ..pooling.stats import Histogram
from ..settings import read_stats_settings
from .outside import connect, describe_error
from .snapshot import PoolSnapshot

TABLE = "django_pooled_pg_poolhistory"
#: Seconds between two points of one process and alias, at least.
STEP = 10.0
#: Seconds a point is kept.
KEEP = 3600.0
#: Points deleted per publication, at most.
PRUNE_BATCH = 2000

INSERT = f"""
INSERT INTO {TABLE} (taken_at, host, pid, alias, size, max_size, in_use, waiting, borrows, wait_p95, span)
VALUES (now(), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""
PRUNE = f"""
DELETE FROM {TABLE} WHERE id IN (
    SELECT id FROM {TABLE} WHERE taken_at < now() - make_interval(secs => %s)
    ORDER BY taken_at LIMIT {PRUNE_BATCH} FOR UPDATE SKIP LOCKED
)
"""
#: Per bucket and alias: each process's time-weighted averages over the part of the bucket its
#: points cover (a point stands for its span, at most a bucket), summed over the fleet; p95 wait:
#: the worst process's. Dividing by the whole bucket instead made a level such as max_size ramp
#: up from a third over a process's first bucket, and dip in the bucket being filled.
READ = f"""
SELECT alias, bucket, sum(in_use)::float8, sum(waiting)::float8, sum(max_size)::float8,
       max(wait_p95)::float8, sum(borrows)::bigint
FROM (
    SELECT alias, host, pid, floor(extract(epoch FROM taken_at) / %(step)s)::bigint AS bucket,
           coalesce(sum(in_use * least(span, %(step)s)) / nullif(sum(least(span, %(step)s)), 0), avg(in_use)) AS in_use,
           coalesce(sum(waiting * least(span, %(step)s)) / nullif(sum(least(span, %(step)s)), 0), avg(waiting)) AS waiting,
           coalesce(sum(max_size * least(span, %(step)s)) / nullif(sum(least(span, %(step)s)), 0), avg(max_size)) AS max_size,
           max(wait_p95) AS wait_p95, sum(borrows) AS borrows
    FROM {TABLE}
    WHERE taken_at > now() - make_interval(secs => %(window)s) {{where}}
    GROUP BY 1, 2, 3, 4
) AS per_process
GROUP BY 1, 2 ORDER BY 1, 2
"""


@dataclass
class _Previous:
    at: float
    borrows: int
    wait: list[int]


_previous: dict[str, _Previous] = {}
_pid = os.getpid()


def points(snapshots: list[PoolSnapshot], now: float | None = None) -> list[tuple[Any, ...]]:
    """The history rows to write with these snapshots: one per alias whose last point is at
    least STEP seconds old (the first point of a process is written at once)."""
    global _pid
    if _pid != os.getpid():  # a forked child: its own points, from its own counters
        _previous.clear()
        _pid = os.getpid()
    now = time.monotonic() if now is None else now
    rows = []
    for s in snapshots:
        before = _previous.get(s.alias)
        if before is not None and now - before.at < STEP - 0.05:
            continue
        wait = Histogram.from_dict(s.wait)
        borrows = s.counters.get("borrows", 0)
        delta = Histogram()
        if before is not None and borrows >= before.borrows:
            delta.counts = [max(0, a - b) for a, b in zip(wait.counts, before.wait, strict=True)]
            delta.count = sum(delta.counts)
            delta.max_us = wait.max_us  # an upper bound; percentile() only caps with it
            new_borrows = borrows - before.borrows
        else:  # first point (or counters reset): everything so far
            delta, new_borrows = wait, borrows
        span = STEP if before is None else now - before.at
        _previous[s.alias] = _Previous(now, borrows, list(wait.counts))
        rows.append((
            s.host, s.pid, s.alias, s.size, s.max_size, s.in_use, s.waiting, new_borrows,
            delta.percentile(95), round(span, 3),
        ))  # fmt: skip
    return rows


def write(conn: Any, rows: list[tuple[Any, ...]]) -> bool:
    """Append ``rows`` and prune, inside the caller's transaction, in a savepoint: a missing
    table costs the chart, not the publication. True when written."""
    import psycopg

    if not rows:
        return False
    try:
        with conn.transaction():
            with conn.cursor() as cursor:
                cursor.executemany(INSERT, rows)
            conn.execute(PRUNE, (KEEP,))
    except psycopg.errors.UndefinedTable:
        return False
    return True


@dataclass
class Series:
    """One alias's last hour, by complete bucket: parallel lists, bucket start times in epoch
    seconds; and the p95 wait and borrows of the bucket still filling, if it has points."""

    step: float
    start: float
    end: float
    at: list[float] = field(default_factory=list)
    in_use: list[float] = field(default_factory=list)
    waiting: list[float] = field(default_factory=list)
    max_size: list[float] = field(default_factory=list)
    wait_p95: list[float] = field(default_factory=list)
    borrows: list[int] = field(default_factory=list)
    current_wait_p95: float | None = None
    current_borrows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class History:
    aliases: dict[str, Series] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def read(alias: str | None = None, *, using: str | None = None, window: float = KEEP, step: float = 30.0) -> History:
    """Each alias's points of the last ``window`` seconds, in buckets of ``step`` seconds.

    Reads over a short-lived connection outside the pools, as :func:`~django_pooled_pg.telemetry.fleet.stats`
    does, and never raises for a missing table or an unreachable server (see ``errors``).
    """
    import psycopg

    using = using or read_stats_settings().database
    history = History()
    where, params = ("AND alias = %(alias)s", {"alias": alias}) if alias else ("", {})
    try:
        with connect(using) as conn:
            end = conn.execute("SELECT extract(epoch FROM now())::float8").fetchone()[0]
            rows = conn.execute(READ.format(where=where), {"step": step, "window": window, **params}).fetchall()
    except psycopg.errors.UndefinedTable:
        history.errors.append(f"no history table in database {using!r}: run `manage.py migrate django_pooled_pg`")
        return history
    except psycopg.Error as exc:
        history.errors.append(f"could not read the history from database {using!r}: {describe_error(exc)}")
        return history
    for name, bucket, in_use, waiting, max_size, wait_p95, borrows in rows:
        series = history.aliases.get(name)
        if series is None:
            series = history.aliases[name] = Series(step=step, start=end - window, end=end)
        if (bucket + 1) * step > end:  # still filling
            series.current_wait_p95, series.current_borrows = wait_p95, borrows
            continue
        series.at.append(bucket * step)
        series.in_use.append(in_use)
        series.waiting.append(waiting)
        series.max_size.append(max_size)
        series.wait_p95.append(wait_p95)
        series.borrows.append(borrows)
    return history
