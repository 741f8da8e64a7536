"""Pool settings advised from measured demand: what ``poolstats --advise`` prints.

Each process publishes its pool's demand over the last minute and the last 15 minutes
(:func:`~django_pooled_pg.telemetry.snapshot.demand_windows`): borrow attempts, holds, waits, and
the seconds it spent at each number of connections in use. :func:`advise` adds up the live
processes of one alias and works out, with the arithmetic shown:

* the demand, by Little's law: connections in use = arrival rate x mean hold, beside the
  time-weighted mean measured (the two agree when the figures are right);
* ``max_size``: the size that covers the p99 of the measured concurrency with headroom. When
  today's size capped what could be measured (refusals, the p99 at ``max_size``, borrowers
  waiting), it is raised to the size at which an M/M/c (Erlang C) queue offered the arrivals'
  load would make few borrowers wait; the model's prediction is shown beside the share of borrows
  that did wait;
* ``min_size``: the mean in use, so that the connections busy on average are never reopened;
* ``timeout``: long enough for a burst to be served, short enough to answer 503 rather than queue
  behind an undersized pool;
* ``fleet_max_size``: the processes' sum against what the server takes.

Too little data (few attempts or a short window) gives no numbers, and says so. Pure functions
of published data: nothing here touches a pool.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..pooling.demand import WAITED_US, in_use
from ..pooling.queueing import (
    HEADROOM,
    TARGET_WAIT,
    erlang_c,
    littles_law,
    size_for_concurrency,
    size_for_wait,
)
from .snapshot import WINDOWS, PoolSnapshot

#: The window advice rests on (the longest published); the others are shown beside it.
WINDOW = WINDOWS[-1][0]
#: Below these, no advice: attempts in the window, and seconds it covers.
MIN_ATTEMPTS = 100
MIN_SECONDS = 5.0
#: A timeout of this many p99 holds, at least MIN_TIMEOUT seconds.
TIMEOUT_HOLDS = 10
MIN_TIMEOUT = 1.0

_SUMMED = ("seconds", "attempts", "failed", "holds", "hold_us", "waits", "wait_us", "waited")


# ----- The arithmetic (the queueing models: pooling.queueing) ------------------------------------


def advised_timeout(hold_p99: float) -> float:
    """A borrower at the back of a queue waits about one hold per borrower ahead of it per
    connection: TIMEOUT_HOLDS p99 holds let a burst through; past that the pool is too small for
    the load, and a fast 503 is kinder than a queue. Rounded up to half seconds."""
    return max(MIN_TIMEOUT, math.ceil(TIMEOUT_HOLDS * hold_p99 * 2) / 2)


def confidence(attempts: int, seconds: float) -> str:
    """How far to trust the advice: none, low, medium or high, by attempts and window length."""
    if attempts < MIN_ATTEMPTS or seconds < MIN_SECONDS:
        return "none"
    if attempts < 1000 or seconds < 60:
        return "low"
    if attempts < 10000 or seconds < 600:
        return "medium"
    return "high"


def capped_by(current: int, p99: float, w: Merged) -> bool:
    """Whether today's ``max_size`` capped the measured concurrency: borrowers refused, the p99
    in use at the size, or more than TARGET_WAIT of borrows waiting for a connection. Then the
    concurrency measured is what the pool let through, and the Erlang C size for the arrivals
    (refused ones included) is the floor of the advice. Otherwise the measured p99 already holds
    the traffic's bursts as they are, and the model (Poisson arrivals, exponential holds, more
    bursty than most sites' traffic) would only add connections that sit idle."""
    return bool(w.failed) or bool(current and p99 >= current) or w.wait_share > TARGET_WAIT


# ----- One alias ----------------------------------------------------------------------------------


@dataclass
class Room:
    """What the server of an alias takes: its connections for clients, and what the other
    aliases' pools on it may open."""

    server: str
    available: int
    others: int


@dataclass
class Merged:
    """One window of an alias, added up over its live processes."""

    processes: int = 0
    #: Seconds the longest-covered process's window spans; the sum is ``seconds``.
    span: float = 0.0
    samples: int = 0
    seconds: float = 0.0
    attempts: int = 0
    failed: int = 0
    holds: int = 0
    hold_us: int = 0
    waits: int = 0
    wait_us: int = 0
    waited: int = 0
    hold_p99: float = 0.0
    wait_p99: float = 0.0
    levels: dict[int, float] = field(default_factory=dict)

    def add(self, data: dict[str, Any]) -> None:
        self.processes += 1
        self.span = max(self.span, data.get("seconds", 0.0))
        self.samples = min(self.samples, data.get("samples", 0)) if self.samples else data.get("samples", 0)
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + data.get(name, 0))
        self.hold_p99 = max(self.hold_p99, data.get("hold_p99", 0.0))
        self.wait_p99 = max(self.wait_p99, data.get("wait_p99", 0.0))
        for level, seconds in data.get("levels", {}).items():
            self.levels[int(level)] = self.levels.get(int(level), 0.0) + seconds

    @property
    def rate(self) -> float:
        """Attempts per second per process."""
        return self.attempts / self.seconds if self.seconds > 0 else 0.0

    @property
    def hold(self) -> float:
        return self.hold_us / self.holds / 1e6 if self.holds else 0.0

    @property
    def wait_share(self) -> float:
        return self.waited / self.waits if self.waits else 0.0

    def in_use(self) -> dict[str, float]:
        return in_use(self.levels)


def merge(snapshots: list[PoolSnapshot], window: str) -> Merged:
    merged = Merged()
    for snap in snapshots:
        data = snap.demand.get(window)
        if data:
            merged.add(data)
    return merged


@dataclass
class Advice:
    """The advice for one alias: today's settings, the advised ones (None without enough data),
    the figures they rest on, and the lines that show the arithmetic."""

    alias: str
    window: str
    confidence: str
    processes: int
    seconds: float
    samples: int
    attempts: int
    today: dict[str, Any] = field(default_factory=dict)
    max_size: int | None = None
    min_size: int | None = None
    timeout: float | None = None
    fleet_max_size: int | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    #: Findings beyond the sizes (the view that holds most of the connection-seconds).
    findings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def advise(alias: str, snapshots: list[PoolSnapshot], room: Room | None = None) -> Advice:
    """The advice for ``alias`` from its live processes' ``snapshots`` (see the module)."""
    w = merge(snapshots, WINDOW)
    first = snapshots[0] if snapshots else None
    today = {
        "max_size": first.max_size if first else None,
        "min_size": first.min_size if first else None,
        "timeout": first.timeout if first else None,
        "fleet_max_size": (first.fleet_max_size or None) if first else None,
    }
    advice = Advice(alias, WINDOW, confidence(w.attempts, w.span), w.processes, round(w.span, 1), w.samples,
                    w.attempts, today)  # fmt: skip
    where = (
        f"last {WINDOW} window: {w.processes} process(es), {w.span:.0f}s covered "
        f"({w.seconds:.0f} process-seconds), {w.samples} sample(s), {w.attempts} borrow attempts"
    )
    if advice.confidence == "none":
        if not w.processes:
            advice.lines.append("no live process publishes demand figures yet: no advice")
        else:
            advice.lines.append(
                f"too little data for advice ({where}; needs {MIN_ATTEMPTS} attempts over {MIN_SECONDS:g}s): "
                "run it again under typical traffic"
            )
        return advice
    load, measured = littles_law(w.rate, w.hold), w.in_use()
    p99_size, wait_size = size_for_concurrency(measured["p99"]), size_for_wait(load)
    current = int(today["max_size"] or 0)
    capped = capped_by(current, measured["p99"], w)
    size = max(p99_size, wait_size) if capped else p99_size
    advice.max_size = size
    advice.min_size = min(size, math.ceil(measured["mean"] - 1e-9))
    advice.timeout = advised_timeout(w.hold_p99)
    advice.figures = {
        "rate": w.rate, "hold_mean": w.hold, "hold_p99": w.hold_p99, "wait_p99": w.wait_p99,
        "littles_law": load, "in_use": measured, "wait_share": w.wait_share, "failed": w.failed,
        "size_p99": p99_size, "size_erlang": wait_size, "capped": capped,
        "erlang_c_advised": erlang_c(size, load), "erlang_c_today": erlang_c(current, load) if current else None,
    }  # fmt: skip
    lines = advice.lines
    lines.append(f"{where}; confidence {advice.confidence}")
    lines.append(
        f"demand (Little's law): {w.rate:.2f} attempts/s per process x {w.hold * 1000:.1f} ms mean hold = "
        f"{load:.2f} connections in use; measured (time-weighted): mean {measured['mean']:.2f}, "
        f"p95 {measured['p95']}, p99 {measured['p99']}, max {measured['max']}"
    )
    model = f"Erlang C (M/M/c, {load:.2f} erlangs) needs {wait_size} for P(wait) <= {TARGET_WAIT:.0%}"
    if capped:
        how = f"{model}; today's size capped the measure, so the larger: {size}"
    else:
        how = f"today's size did not cap it, so the measure carries the advice ({model})"
    lines.append(
        f"max_size: today {current}, advised {size}: p99 in use {measured['p99']} x {HEADROOM:g} headroom -> "
        f"{p99_size}; {how}"
    )
    lines.append(
        f"  waits: Erlang C predicts P(wait) {erlang_c(size, load):.1%} at {size}"
        + (f" and {erlang_c(current, load):.1%} at today's {current}" if current else "")
        + f"; measured at today's: {w.wait_share:.1%} of {w.waits} borrows waited {WAITED_US / 1000:.2f} ms or "
        f"more (p99 wait {w.wait_p99 * 1000:.1f} ms), {w.failed} refused"
    )
    if capped:
        lines.append(
            f"  today's max_size {current} capped what could be measured ({w.failed} refused, p99 in use "
            f"{measured['p99']}, {w.wait_share:.1%} waited): the arrivals, refused ones included, carry the advice"
        )
    lines.append(
        f"min_size: today {today['min_size']}, advised {advice.min_size}: the mean in use "
        f"{measured['mean']:.2f}, rounded up (connections busy on average are never reopened)"
    )
    lines.append(
        f"timeout: today {today['timeout']:g}s, advised {advice.timeout:g}s: {TIMEOUT_HOLDS} x p99 hold "
        f"{w.hold_p99 * 1000:.1f} ms, at least {MIN_TIMEOUT:g}s (longer only queues behind a pool too small)"
    )
    lines.append(fleet_line(advice, w.processes, room))
    return advice


#: A view holding at least this share of an alias's connection-seconds is named in the advice.
VIEW_SHARE = 0.5


def view_finding(advice: Advice, views: dict[str, tuple[float, float, float]], release: str) -> None:
    """Name the view (or task, or ``borrow()`` block) that holds most of the alias's
    connection-seconds when it holds VIEW_SHARE or more: ``views`` maps each to its
    connection-seconds since its processes started, its median hold in seconds, and the seconds
    of its holds spent in statements and open transactions. With ``release="request"`` its
    connections are held for its whole requests; ``release="transaction"`` would hold them only
    for those statements and transactions, and give back the rest: the finding says how much."""
    total = sum(seconds for seconds, _, _ in views.values())
    if total <= 0 or not views:
        return
    name, (seconds, median, busy) = max(views.items(), key=lambda item: item[1][0])
    share = seconds / total
    if share < VIEW_SHARE:
        return
    line = (
        f"view {name} holds {share:.0%} of the connection-seconds ({seconds:,.1f} s since its processes started; "
        f"median hold {median * 1000:.1f} ms): the size above is mostly its demand"
    )
    if release == "request":
        idle = max(seconds - busy, 0.0)
        cut = idle / seconds
        in_use = advice.figures.get("in_use", {}).get("mean", 0.0) * share * cut
        line += (
            f'; with release="request" it holds a connection for its whole request, {1 - cut:.0%} of that in its '
            f'statements and transactions: release="transaction" gives the connection back between them and would '
            f"cut its demand by about {cut:.0%} ({idle:,.1f} s of its {seconds:,.1f} s; about {in_use:.2f} "
            "connections in use per process)"
        )
        advice.figures["view_cut"] = {"view": name, "share": share, "cut": cut, "connections": in_use}
    advice.findings.append(line)
    advice.lines.append(line)


def fleet_line(advice: Advice, processes: int, room: Room | None) -> str:
    """The fleet's sum of advised sizes against the server's capacity; sets ``fleet_max_size``."""
    size = advice.max_size or 0
    need = processes * size
    today = advice.today["fleet_max_size"]
    head = f"fleet_max_size: today {today or 'none'}, advised"
    if room is None:
        advice.fleet_max_size = need
        return f"{head} {need}: {processes} process(es) x {size} (the server's capacity could not be read)"
    free = room.available - room.others
    arithmetic = (
        f"{processes} process(es) x {size} = {need}; the server {room.server} takes {room.available} "
        f"client connections, {room.others} of them for other pools: {free} left"
    )
    if need <= free:
        advice.fleet_max_size = need
        return f"{head} {need}: {arithmetic}"
    advice.fleet_max_size = max(free, 0)
    return (
        f"{head} {advice.fleet_max_size}: {arithmetic}. The fleet's demand needs more than max_connections "
        f"allows: set the budget to what is left, or fewer processes, or raise max_connections"
    )
