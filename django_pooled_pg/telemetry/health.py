"""Readiness: can every pool of this process serve? One verdict (:func:`readiness`), presented
by the view of :mod:`django_pooled_pg.health` and by the django-health-check backend
(:mod:`django_pooled_pg.contrib.health_check`).

An alias is *not ready* when

* its pool is **saturated**: borrowers wait while every connection up to ``max_size`` is in use
  (or the fleet budget refuses more), and have done so for longer than
  ``POOLED_PG["HEALTH_SATURATED_AFTER"]`` seconds, as far as the checks saw;
* its pool is **failing**: the pool's latest connection attempt failed (``Pool.health``) and a
  new attempt, made by the check at most once per probe interval, failed too;
* its server is **unreachable**: the probe could not open a TCP (or Unix socket) connection to
  it within ``HEALTH_PROBE_TIMEOUT``.

Why a socket probe, and nothing more. An idle pool does not notice a stopped server: nothing
tries its connections, and ``Pool.health`` only learns from connection attempts. So something
must reach the server even without traffic; the choices were:

* a session outside the pool (``telemetry/outside.py``): the most honest (it also sees a wrong
  password, "too many clients", a server starting up), but each one costs a backend start
  (3-8 ms to connect and close here, 12-30x the TCP probe, and a ``max_connections`` slot for
  that time), counts against the fleet budget, and may be *refused by the budget* exactly when
  the fleet is busy, which is not the database failing;
* a poll of the idle connections' sockets (``Pool.usable()``'s trick, 1 us each): free, but it
  sees nothing when no connection is idle, mistakes one killed session for a dead server, and
  never notices a host that went silent (no FIN);
* a bare TCP connect, closed at once without a byte: 200-280 us here (``FIGURE`` in
  ``tests/test_health.py``), no session, no slot, no budget; PostgreSQL forks a child that reads
  EOF and exits without logging (it only logs it with ``log_connections`` on). It sees a stopped
  server (refused), a dead host (timeout) and a stopped PgBouncer.

The probe is the TCP connect, cached per alias and run at most once per
``HEALTH_PROBE_INTERVAL`` per process (concurrent checks use the cached answer, never wait for a
running probe unless there is no answer yet). What it cannot see (a server that accepts TCP but
refuses sessions: a bad password, "too many clients", recovery) the pool's own attempts see, and
they are what borrowers meet: ``Pool.health.failing``. A failing pool gets one attempt from the
check per probe interval (``Pool.probe()``, the borrowers' own recovery, which adds the
connection to the pool when it works): without it, a process declared not ready gets no traffic,
so nothing would try again but psycopg_pool's retries, whose back-off doubles and which stop
after ``reconnect_timeout`` (5 minutes by default), and it would stay out.

Never a pool slot: nothing here borrows or waits in a pool's queue; ``Pool.get_stats()`` reads
counters without its lock. So the check answers at once from a pool whose every connection is
held, with borrowers waiting. Costs (``tests/test_health.py::test_cost_per_call``, medians on
the test machine, Django 5.2 and 6.1): :func:`readiness` with cached probes 21-42 us for three
aliases; the whole request through Django's test client and the test settings' middleware
200-410 us; a fresh probe 200-280 us (a TCP connect and close to a server on localhost), once
per interval.
"""

from __future__ import annotations

import math
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from django.db import connections

from ..pooling.pool import Pool
from ..pooling.registry import registry
from ..settings import HealthSettings, pooled_aliases, read_health_settings
from .outside import describe_error

#: The server's default Unix socket directories (libpq's, when HOST is empty).
SOCKET_DIRS = ("/var/run/postgresql", "/tmp")


@dataclass(frozen=True)
class AliasHealth:
    """Whether one alias can serve, and why not. Nothing secret: no DSN, host or password."""

    alias: str
    ready: bool
    #: "ok" (a pool serving), "no pool" (none in this process yet: only its server was probed),
    #: "saturated", "failing" or "unreachable".
    state: str
    reason: str = ""
    #: size, max_size, idle, in_use, waiting of this process's pool; None without one.
    pool: dict[str, int] | None = None
    #: Seconds the checks have seen the pool saturated without a break; None when it is not.
    saturated_for: float | None = None
    #: "reachable", "unreachable" or "not probed" (HEALTH_PROBE_INTERVAL None).
    server: str = "not probed"

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"ready": self.ready, "state": self.state, "server": self.server}
        if self.reason:
            data["reason"] = self.reason
        if self.pool is not None:
            data["pool"] = self.pool
        if self.saturated_for is not None:
            data["saturated_for"] = round(self.saturated_for, 3)
        return data


@dataclass(frozen=True)
class Verdict:
    """The readiness of every alias of this process."""

    aliases: tuple[AliasHealth, ...]

    @property
    def ready(self) -> bool:
        return all(a.ready for a in self.aliases)

    @property
    def reason(self) -> str:
        """Why not ready, alias by alias; "" when ready."""
        return "; ".join(f"{a.alias}: {a.reason}" for a in self.aliases if not a.ready)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"status": "ready" if self.ready else "unavailable"}
        if not self.ready:
            data["reason"] = self.reason
        data["aliases"] = {a.alias: a.as_dict() for a in self.aliases}
        return data


def readiness() -> Verdict:
    """The verdict for this process's pools and the pooled aliases it has not opened yet."""
    settings = read_health_settings()
    pools = {alias: pool for alias, pool in registry.pools().items() if not pool.closed}
    names = [*pools, *(alias for alias in pooled_aliases() if alias not in pools)]
    return Verdict(tuple(alias_health(alias, pools.get(alias), settings) for alias in names))


def alias_health(alias: str, pool: Pool | None, settings: HealthSettings) -> AliasHealth:
    """One alias's readiness: its pool's state, then its server's."""
    if pool is None:
        reached = probe(alias, None, settings)
        if reached is not None:
            return AliasHealth(alias, False, "unreachable", f"server unreachable ({reached})", server="unreachable")
        return AliasHealth(alias, True, "no pool", server=server_word(settings))
    measures = pool_measures(pool)
    saturated_for = saturation(alias, pool, measures)
    reached = probe(alias, pool, settings)
    server = server_word(settings) if reached is None else "unreachable"
    if reached is not None:
        reason = f"server unreachable ({reached})"
        return AliasHealth(alias, False, "unreachable", reason, measures, saturated_for, server)
    if pool.health.failing:
        reason = f"connection attempts failing ({error_words(pool.health.last_error)})"
        return AliasHealth(alias, False, "failing", reason, measures, saturated_for, server)
    if saturated_for is not None and saturated_for > settings.saturated_after:
        reason = (
            f"saturated: {measures['in_use']} of {measures['max_size']} in use, {measures['waiting']} waiting, "
            f"for {saturated_for:.1f} s (HEALTH_SATURATED_AFTER {settings.saturated_after:g} s)"
        )
        return AliasHealth(alias, False, "saturated", reason, measures, saturated_for, server)
    return AliasHealth(alias, True, "ok", "", measures, saturated_for, server)


def server_word(settings: HealthSettings) -> str:
    return "not probed" if settings.probe_interval is None else "reachable"


def pool_measures(pool: Pool) -> dict[str, int]:
    """The pool's gauges, read without its lock (``get_stats()`` takes none)."""
    stats = pool.get_stats()
    size, idle = stats.get("pool_size", 0), stats.get("pool_available", 0)
    return {
        "size": size,
        "max_size": pool.max_size,
        "idle": idle,
        "in_use": size - idle,
        "waiting": stats.get("requests_waiting", 0),
    }


#: alias -> (the pool, since when the checks have seen it saturated without a break).
_saturated_since: dict[str, tuple[Pool, float]] = {}


def saturation(alias: str, pool: Pool, measures: dict[str, int]) -> float | None:
    """Seconds ``pool`` has been saturated as far as the checks saw, or None if it is not:
    borrowers wait and nothing is idle, with every connection up to ``max_size`` open or the
    fleet budget refusing more. Checks are the only clock: a pool saturated between two checks
    and free at each is not seen, and the duration counts from the first check that saw it."""
    budget_full = pool.budget is not None and pool.budget.refused_recently()
    full = measures["size"] >= measures["max_size"] or budget_full
    if not (measures["waiting"] and not measures["idle"] and full):
        _saturated_since.pop(alias, None)
        return None
    now = time.monotonic()
    seen = _saturated_since.get(alias)
    if seen is None or seen[0] is not pool:
        _saturated_since[alias] = seen = (pool, now)
    return now - seen[1]


# ----- The server probe ------------------------------------------------------------------------


@dataclass
class Probe:
    """The cached answer of one alias's probe: None (reached) or why not."""

    checked_at: float = -math.inf
    error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


_probes: dict[str, Probe] = {}


def _forget() -> None:
    """In a forked child: no answer or lock of the parent's (a lock held by a parent's thread at
    the fork would never be released), and none of its pools' saturation."""
    _probes.clear()
    _saturated_since.clear()


os.register_at_fork(after_in_child=_forget)


def probe(alias: str, pool: Pool | None, settings: HealthSettings) -> str | None:
    """Why ``alias``'s server cannot be reached, or None; fresh at most once per
    ``HEALTH_PROBE_INTERVAL``. A check that finds another one probing uses the previous answer
    instead of waiting (it waits only when there is none yet)."""
    if settings.probe_interval is None:
        return None
    cached = _probes.setdefault(alias, Probe())
    if time.monotonic() - cached.checked_at < settings.probe_interval:
        return cached.error
    if not cached.lock.acquire(blocking=cached.checked_at == -math.inf):
        return cached.error
    try:
        if time.monotonic() - cached.checked_at >= settings.probe_interval:
            cached.error = reach(alias, pool, settings.probe_timeout)
            if cached.error is None and pool is not None and pool.health.failing:
                pool.probe()  # (the borrowers' recovery attempt: a connection for the pool)
            cached.checked_at = time.monotonic()
        return cached.error
    finally:
        cached.lock.release()


def reach(alias: str, pool: Pool | None, timeout: float) -> str | None:
    """Open and close a socket to the server (no byte sent: PostgreSQL logs nothing); None if
    one of its addresses answered, else the last error, in words without the address."""
    try:
        kwargs = pool.kwargs if pool is not None else None
        params = kwargs if isinstance(kwargs, dict) else connections[alias].get_connection_params()
        addresses = server_addresses(params)
    except Exception as exc:  # (settings Django refuses: NAME missing...)
        return f"settings: {type(exc).__name__}"
    error = "no server address"
    for family, address in addresses:
        try:
            if family == socket.AF_UNIX:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(timeout)
                    sock.connect(address)
            else:
                socket.create_connection(address, timeout=timeout).close()
            return None
        except TimeoutError:
            error = f"no answer within {timeout:g} s"
        except OSError as exc:
            error = exc.strerror or type(exc).__name__
    return error


def server_addresses(params: dict[str, Any]) -> list[tuple[int, Any]]:
    """The (family, address) pairs libpq would try for connection ``params``: each host of a
    comma-separated HOST (``hostaddr`` first if given), a Unix socket for a directory, the
    default socket directories for none."""
    hosts = str(params.get("hostaddr") or params.get("host") or "").split(",")
    ports = str(params.get("port") or "5432").split(",")
    if len(ports) == 1:
        ports *= len(hosts)
    addresses: list[tuple[int, Any]] = []
    for host, port in zip(hosts, ports, strict=False):
        host, number = host.strip(), int(port.strip() or 5432)
        if not host:
            addresses += [(socket.AF_UNIX, f"{d}/.s.PGSQL.{number}") for d in SOCKET_DIRS]
        elif host.startswith("/"):
            addresses.append((socket.AF_UNIX, f"{host}/.s.PGSQL.{number}"))
        elif host.startswith("@"):  # Linux's abstract namespace
            addresses.append((socket.AF_UNIX, f"\0{host[1:]}/.s.PGSQL.{number}"))
        else:
            addresses.append((socket.AF_INET, (host, number)))
    return addresses


def error_words(exc: BaseException | None) -> str:
    """What went wrong, without the server's address (a psycopg error's first line names it) or
    the names the server quotes (database, user): the SQLSTATE when the server sent one, else
    the end of the first line, e.g. ``database "..." does not exist``, ``Connection refused``."""
    if exc is None:
        return "unknown error"
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate:
        return f"{type(exc).__name__}, SQLSTATE {sqlstate}"
    words = describe_error(exc).rsplit("failed: ", 1)[-1].removeprefix("FATAL:").strip()
    return QUOTED.sub('"..."', words) or type(exc).__name__


#: A name in a server's message (``database "shop"``, ``user "app"``).
QUOTED = re.compile(r'"[^"]*"')
