"""Pool settings: the defaults, and the one place ``OPTIONS["pool"]`` is read and validated.

Everything a user can put in ``DATABASES[alias]["OPTIONS"]["pool"]`` is listed in
:data:`PSYCOPG_POOL_OPTIONS` (handed to :class:`psycopg_pool.ConnectionPool` as they are, so a
dict written for Django's own ``OPTIONS["pool"]`` keeps working) or :data:`OWN_OPTIONS` (read by
this package). Validation returns every problem at once, each naming the setting and the fix, so
``manage.py check`` can list them all and the first connection can refuse to start with the same
words.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings as django_settings

#: The ENGINE values that are this package (django-prometheus's subclass included: its aliases
#: are pools like any other, checked and published the same way).
ENGINES = {
    "django_pooled_pg",
    "django_pooled_pg.base",
    "django_pooled_pg.contrib.django_prometheus",
    "django_pooled_pg.contrib.django_prometheus.base",
}


def pooled_aliases() -> dict[str, dict[str, Any]]:
    """The aliases of ``settings.DATABASES`` that use this ENGINE."""
    return {
        alias: settings_dict
        for alias, settings_dict in django_settings.DATABASES.items()
        if settings_dict.get("ENGINE") in ENGINES
    }


#: Defaults for a pool when ``OPTIONS["pool"]`` is missing or ``True``. They favour failing fast
#: (a 10 s wait rather than psycopg_pool's 30 s) and recycling connections before the network
#: or the server drops them.
DEFAULTS: dict[str, Any] = {
    "min_size": 2,
    "max_size": 10,
    "timeout": 10.0,
    "max_waiting": 0,
    "max_lifetime": 30 * 60.0,
    "max_idle": 5 * 60.0,
    "reconnect_timeout": 5 * 60.0,
    "num_workers": 2,
    "release": "request",
    "leak_timeout": None,
    "ping_after": 1.0,
    "behind_pgbouncer": False,
    "fleet_max_size": None,
    "session_reset": True,
    "max_size_limit": None,
}

#: When a borrowed connection goes back: at the end of the request (or ``close()``), or after
#: each statement / outermost transaction unless something pins it (see ``base.py``).
RELEASE_MODES = ("request", "transaction")


@dataclass(frozen=True)
class OptionSpec:
    """What one option accepts, in words a user can act on."""

    check: Callable[[Any], bool]
    expected: str


def _number(minimum: float, *, strict: bool = True) -> OptionSpec:
    def check(value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return value > minimum if strict else value >= minimum

    word = "greater than" if strict else "at least"
    return OptionSpec(check, f"a number {word} {minimum:g} (seconds)")


def _integer(minimum: int) -> OptionSpec:
    def check(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

    return OptionSpec(check, f"an integer >= {minimum}")


def _callable_or_none() -> OptionSpec:
    return OptionSpec(lambda v: v is None or callable(v), "a callable taking a connection, or None")


def _connection_class(value: Any) -> bool:
    import psycopg

    return isinstance(value, type) and issubclass(value, psycopg.Connection)


PSYCOPG_POOL_OPTIONS: dict[str, OptionSpec] = {
    "min_size": _integer(0),
    "max_size": OptionSpec(
        lambda v: v == "auto" or _integer(1).check(v),
        'an integer >= 1, or "auto" (sized from measured queueing, up to max_size_limit or the fleet budget)',
    ),
    "timeout": _number(0),
    "max_waiting": _integer(0),
    "max_lifetime": _number(0),
    "max_idle": _number(0),
    "reconnect_timeout": _number(0),
    "num_workers": _integer(1),
    "name": OptionSpec(lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "check": _callable_or_none(),
    "configure": _callable_or_none(),
    "reset": _callable_or_none(),
    "reconnect_failed": _callable_or_none(),
    "connection_class": OptionSpec(_connection_class, "a subclass of psycopg.Connection"),
}

OWN_OPTIONS: dict[str, OptionSpec] = {
    "release": OptionSpec(lambda v: v in RELEASE_MODES, " or ".join(map(repr, RELEASE_MODES))),
    "behind_pgbouncer": OptionSpec(lambda v: isinstance(v, bool), "True or False"),
    "ping_after": OptionSpec(
        lambda v: v is None or _number(0, strict=False).check(v),
        "None or a number of seconds >= 0",
    ),
    "leak_timeout": OptionSpec(
        lambda v: v is None or (_number(0).check(v)), "None or a number greater than 0 (seconds)"
    ),
    "fleet_max_size": OptionSpec(
        lambda v: v is None or v == "auto" or _integer(3).check(v),
        'None, "auto", or an integer >= 3 (the connections all processes together may hold)',
    ),
    "session_reset": OptionSpec(lambda v: isinstance(v, bool), "True or False"),
    "max_size_limit": _integer(1),
}

#: Keys psycopg_pool takes that this package sets itself; naming them is a mistake.
MANAGED_BY_US = {
    "kwargs": "connection parameters come from NAME, USER, HOST, PORT and OPTIONS",
    "conninfo": "connection parameters come from NAME, USER, HOST, PORT and OPTIONS",
    "open": "pools open lazily, on the first query of each process",
    "close_returns": "connections go back through connection.close(), which this package handles",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a database's settings, with the setting it is in and the fix."""

    id: str
    setting: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.setting}: {self.message} Fix: {self.fix}"


@dataclass(frozen=True)
class PoolSettings:
    """The validated pool settings of one alias."""

    enabled: bool
    #: Keyword arguments for :class:`psycopg_pool.ConnectionPool` (without kwargs/configure).
    pool_kwargs: dict[str, Any] = field(default_factory=dict)
    release: str = "request"
    #: Seconds after which a borrowed connection is reported as leaked; None: never.
    leak_timeout: float | None = None
    #: A connection idle longer than this many seconds is pinged before it is handed out.
    ping_after: float | None = 1.0
    #: Connections go through PgBouncer in transaction mode: no startup options.
    behind_pgbouncer: bool = False
    #: The most connections all processes together hold (an int, "auto"); None: no budget.
    fleet_max_size: int | str | None = None
    #: Whether every returned connection's session is reset (False: handed on as it is, as
    #: Django's pool and persistent connections do).
    session_reset: bool = True
    #: The ceiling of ``max_size="auto"`` without a fleet budget.
    max_size_limit: int | None = None
    #: max_size="auto": psycopg_pool's max_size (in pool_kwargs) is the starting size, and the
    #: pool's sizer (:mod:`.pooling.autosize`) changes it.
    auto_size: bool = False


def _pool_setting(alias: str, key: str | None = None) -> str:
    base = f'DATABASES["{alias}"]["OPTIONS"]["pool"]'
    return f'{base}["{key}"]' if key else base


def find_problems(alias: str, settings_dict: Mapping[str, Any]) -> list[Problem]:
    """Every problem in one alias's settings, for ``manage.py check`` and for the first connect."""
    problems: list[Problem] = []
    options = settings_dict.get("OPTIONS") or {}
    raw = options.get("pool", True)
    if raw is False:
        return problems

    max_age = settings_dict.get("CONN_MAX_AGE", 0)
    if max_age != 0:
        problems.append(
            Problem(
                "django_pooled_pg.E001",
                f'DATABASES["{alias}"]["CONN_MAX_AGE"]',
                f"is {max_age!r}, but the pool already keeps connections open between requests; "
                "a persistent connection would hold a pool slot for the life of each thread.",
                'remove CONN_MAX_AGE or set it to 0, and size the pool with OPTIONS["pool"]["max_size"].',
            )
        )

    if raw is True or raw is None:
        return problems
    if not isinstance(raw, Mapping):
        problems.append(
            Problem(
                "django_pooled_pg.E002",
                _pool_setting(alias),
                f"must be True, False or a dict of pool options, got {type(raw).__name__} {raw!r}.",
                'write e.g. "pool": {"min_size": 2, "max_size": 10, "timeout": 10}.',
            )
        )
        return problems

    known = {**PSYCOPG_POOL_OPTIONS, **OWN_OPTIONS}
    for key, value in raw.items():
        spec = known.get(key)
        if key in MANAGED_BY_US:
            problems.append(
                Problem(
                    "django_pooled_pg.E003",
                    _pool_setting(alias, key),
                    f"is set by django_pooled_pg itself: {MANAGED_BY_US[key]}.",
                    f'remove "{key}" from the pool options.',
                )
            )
        elif spec is None:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f'did you mean "{close[0]}"? ' if close else ""
            problems.append(
                Problem(
                    "django_pooled_pg.E004",
                    _pool_setting(alias, key),
                    "is not a pool option.",
                    f"{hint}Valid options: {', '.join(sorted(known))}.",
                )
            )
        elif not spec.check(value):
            problems.append(
                Problem(
                    "django_pooled_pg.E005",
                    _pool_setting(alias, key),
                    f"must be {spec.expected}, got {value!r}.",
                    f'give "{key}" {spec.expected}.',
                )
            )

    if raw.get("behind_pgbouncer") is True:
        problems += pgbouncer_problems(alias, settings_dict)

    min_size = raw.get("min_size", DEFAULTS["min_size"])
    max_size = raw.get("max_size")
    problems += auto_size_problems(alias, raw)
    bound = "max_size"
    if max_size == "auto":  # (min_size against the ceiling; a budget's share is checked at start)
        max_size, bound = raw.get("max_size_limit"), "max_size_limit"
    if (
        max_size is not None
        and PSYCOPG_POOL_OPTIONS["min_size"].check(min_size)
        and _integer(1).check(max_size)
        and min_size > max_size
    ):
        if "min_size" in raw:
            said, hint = f"is {min_size}, larger than {bound} {max_size}.", f"make min_size <= {bound}."
        else:  # (the user wrote max_size alone: say the default is what is too large)
            said = f"is not set, and its default {min_size} is larger than {bound} {max_size}."
            hint = f'add "min_size": {max_size} (or 0) beside "{bound}".'
        problems.append(Problem("django_pooled_pg.E006", _pool_setting(alias, "min_size"), said, hint))
    return problems


def auto_size_problems(alias: str, raw: Mapping[str, Any]) -> list[Problem]:
    """``max_size="auto"`` needs a ceiling, and ``max_size_limit`` is only that ceiling."""
    auto, limit = raw.get("max_size") == "auto", raw.get("max_size_limit")
    if auto and limit is None and raw.get("fleet_max_size") is None:
        return [
            Problem(
                "django_pooled_pg.E008",
                _pool_setting(alias, "max_size"),
                'is "auto" with no ceiling: the pool would grow as long as borrowers wait.',
                'add "max_size_limit": N (the most connections one process may open), or a fleet budget '
                '("fleet_max_size"), whose fair share is then the ceiling.',
            )
        ]
    if limit is not None and not auto:
        return [
            Problem(
                "django_pooled_pg.E009",
                _pool_setting(alias, "max_size_limit"),
                f'is the ceiling of max_size "auto", but max_size is {raw.get("max_size", DEFAULTS["max_size"])!r}.',
                'set "max_size": "auto", or remove max_size_limit.',
            )
        ]
    return []


def pgbouncer_problems(alias: str, settings_dict: Mapping[str, Any]) -> list[Problem]:
    """What PgBouncer's transaction mode cannot carry: each transaction may run on another server
    connection, so nothing may live in the session between transactions."""
    problems = []
    options = settings_dict.get("OPTIONS") or {}
    if not settings_dict.get("DISABLE_SERVER_SIDE_CURSORS"):
        problems.append(
            Problem(
                "django_pooled_pg.E020",
                f'DATABASES["{alias}"]["DISABLE_SERVER_SIDE_CURSORS"]',
                "must be True behind PgBouncer in transaction mode: QuerySet.iterator()'s server-side "
                "cursor outlives its transaction, and the next one may run on another server connection.",
                f'set DATABASES["{alias}"]["DISABLE_SERVER_SIDE_CURSORS"] = True.',
            )
        )
    if options.get("assume_role"):
        problems.append(
            Problem(
                "django_pooled_pg.E021",
                f'DATABASES["{alias}"]["OPTIONS"]["assume_role"]',
                "cannot be used behind PgBouncer in transaction mode: SET ROLE would stay on whichever "
                "server connection ran it, for other clients.",
                "connect as that role (USER), or set it in PgBouncer's database definition (user=).",
            )
        )
    pool = options.get("pool")
    if isinstance(pool, Mapping) and pool.get("fleet_max_size") is not None:
        problems.append(
            Problem(
                "django_pooled_pg.E023",
                _pool_setting(alias, "fleet_max_size"),
                "cannot be used behind PgBouncer: the budget counts the server's client backends, "
                "and behind PgBouncer those are PgBouncer's own server connections, not this fleet's.",
                "cap the fleet in PgBouncer (max_client_conn, max_db_connections) and remove fleet_max_size.",
            )
        )
    if options.get("prepare_threshold") is not None:
        problems.append(
            Problem(
                "django_pooled_pg.E022",
                f'DATABASES["{alias}"]["OPTIONS"]["prepare_threshold"]',
                "must be unset (None) behind PgBouncer in transaction mode: a statement prepared on "
                "one server connection does not exist on the next.",
                '"prepare_threshold": None, as Django\'s default.',
            )
        )
    return problems


def read_pool_settings(alias: str, settings_dict: Mapping[str, Any]) -> PoolSettings:
    """The pool settings of ``alias``, or :class:`ImproperlyConfigured` listing every problem."""
    from django.core.exceptions import ImproperlyConfigured

    problems = find_problems(alias, settings_dict)
    if problems:
        raise ImproperlyConfigured("\n".join(str(p) for p in problems))

    raw = (settings_dict.get("OPTIONS") or {}).get("pool", True)
    if raw is False:
        return PoolSettings(enabled=False)
    given = {} if raw is True or raw is None else dict(raw)
    merged = {**DEFAULTS, **given}
    if "min_size" in given and "max_size" not in given:
        # psycopg_pool's rule (and so Django's): max_size defaults to min_size.
        merged["max_size"] = max(given["min_size"], 1)
    own: dict[str, Any] = {key: merged.pop(key) for key in OWN_OPTIONS}
    if merged["max_size"] == "auto":
        # psycopg_pool's max_size is where the pool starts; the sizer moves it (pooling.autosize).
        merged["max_size"] = max(merged["min_size"], 1)
        own["auto_size"] = True
    if settings_dict.get("CONN_HEALTH_CHECKS") and "ping_after" not in given:
        own["ping_after"] = 0.0  # Django's health checks test every new request's connection
    return PoolSettings(enabled=True, pool_kwargs=merged, **own)


# ----- Fleet statistics: settings.POOLED_PG ------------------------------------------------------

#: ``settings.POOLED_PG`` keys, their defaults and meaning. ``STALE_AFTER`` defaults to three
#: intervals. ``STATS_INTERVAL`` None or 0 turns publishing off (``poolstats`` still reads).
STATS_DEFAULTS: dict[str, Any] = {
    "STATS_INTERVAL": 5.0,  # seconds between two publications of this process's snapshot
    "STATS_DATABASE": "default",  # alias holding the table (or the first alias with this ENGINE)
    "STALE_AFTER": None,  # seconds without a publication before a row is shown stale
    "PRUNE_AFTER": 300.0,  # seconds without a publication before a row is deleted
    "PUBLISH_TIMEOUT": 0.5,  # seconds a publication may wait for a connection / run its SQL
    "TOP_VIEWS": 10,  # views listed by name (poolstats --views, admin page, Prometheus); the rest: "other"
    "OPENTELEMETRY": False,  # True: the app's ready() reports the pools to OpenTelemetry's global provider
}


#: ``settings.POOLED_PG`` keys of the readiness check (``django_pooled_pg.health``, the
#: django-health-check backend), their defaults and meaning. ``HEALTH_PROBE_INTERVAL`` None turns
#: the server probe off: only the pools' own connection attempts tell then.
HEALTH_DEFAULTS: dict[str, Any] = {
    "HEALTH_SATURATED_AFTER": 5.0,  # seconds a pool may have borrowers waiting at max_size and stay ready
    "HEALTH_PROBE_INTERVAL": 2.0,  # seconds between two probes of each alias's server, per process
    "HEALTH_PROBE_TIMEOUT": 1.0,  # seconds a probe may take to reach the server
}


@dataclass(frozen=True)
class HealthSettings:
    """The validated readiness settings of ``settings.POOLED_PG``."""

    saturated_after: float
    probe_interval: float | None
    probe_timeout: float


@dataclass(frozen=True)
class StatsSettings:
    """The validated ``settings.POOLED_PG``."""

    interval: float | None
    database: str
    stale_after: float
    prune_after: float
    publish_timeout: float
    top_views: int = 10

    @property
    def enabled(self) -> bool:
        return bool(self.interval)


def find_stats_problems(raw: Any, databases: Mapping[str, Any]) -> list[Problem]:
    """Every problem in ``settings.POOLED_PG`` (``raw``), for ``manage.py check`` and for use."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        return [
            Problem(
                "django_pooled_pg.E010",
                "POOLED_PG",
                f"must be a dict, got {type(raw).__name__} {raw!r}.",
                'write e.g. POOLED_PG = {"STATS_INTERVAL": 5}.',
            )
        ]
    problems: list[Problem] = []
    known = {**STATS_DEFAULTS, **HEALTH_DEFAULTS}
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f'did you mean "{close[0]}"? ' if close else ""
            problems.append(
                Problem(
                    "django_pooled_pg.E011",
                    f'POOLED_PG["{key}"]',
                    "is not a POOLED_PG setting.",
                    f"{hint}Valid settings: {', '.join(known)}.",
                )
            )
    numbers = {
        "STATS_INTERVAL": (_number(0, strict=False), True),
        "STALE_AFTER": (_number(0), True),
        "PRUNE_AFTER": (_number(0), False),
        "PUBLISH_TIMEOUT": (_number(0), False),
        "TOP_VIEWS": (_integer(1), False),
        "HEALTH_SATURATED_AFTER": (_number(0, strict=False), False),
        "HEALTH_PROBE_INTERVAL": (_number(0), True),
        "HEALTH_PROBE_TIMEOUT": (_number(0), False),
    }
    for key, (spec, none_ok) in numbers.items():
        if key in raw and not ((none_ok and raw[key] is None) or spec.check(raw[key])):
            expected = f"None or {spec.expected}" if none_ok else spec.expected
            problems.append(
                Problem(
                    "django_pooled_pg.E012",
                    f'POOLED_PG["{key}"]',
                    f"must be {expected}, got {raw[key]!r}.",
                    f'give "{key}" {expected}.',
                )
            )
    if not isinstance(raw.get("OPENTELEMETRY", False), bool):
        problems.append(
            Problem(
                "django_pooled_pg.E015",
                'POOLED_PG["OPENTELEMETRY"]',
                f"must be True or False, got {raw['OPENTELEMETRY']!r}.",
                'give "OPENTELEMETRY" True (report the pools to OpenTelemetry) or False.',
            )
        )
    if "STATS_DATABASE" not in raw:
        return problems  # the default picks a suitable alias (default_stats_database)
    alias = raw["STATS_DATABASE"]
    if not isinstance(alias, str) or alias not in databases:
        problems.append(
            Problem(
                "django_pooled_pg.E013",
                'POOLED_PG["STATS_DATABASE"]',
                f"is {alias!r}, which is not an alias of DATABASES.",
                f"use one of: {', '.join(map(repr, databases))}.",
            )
        )
    elif databases[alias].get("ENGINE") not in ENGINES:
        problems.append(
            Problem(
                "django_pooled_pg.E014",
                'POOLED_PG["STATS_DATABASE"]',
                f"is {alias!r}, whose ENGINE is not django_pooled_pg.",
                'name an alias with "ENGINE": "django_pooled_pg" (where this app is migrated).',
            )
        )
    return problems


def default_stats_database(databases: Mapping[str, Any]) -> str:
    """``"default"`` if it uses this ENGINE, else the first alias that does."""
    ours = [a for a, d in databases.items() if d.get("ENGINE") in ENGINES]
    return "default" if "default" in ours or not ours else ours[0]


def _checked_pooled_pg() -> Mapping[str, Any]:
    """``settings.POOLED_PG`` ({} when unset), or :class:`ImproperlyConfigured` listing every
    problem (the same words as ``manage.py check``)."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    raw = getattr(settings, "POOLED_PG", None)
    problems = find_stats_problems(raw, settings.DATABASES)
    if problems:
        raise ImproperlyConfigured("\n".join(str(p) for p in problems))
    return raw or {}


def read_stats_settings() -> StatsSettings:
    """``settings.POOLED_PG`` validated, or :class:`ImproperlyConfigured` listing every problem."""
    from django.conf import settings

    raw = _checked_pooled_pg()
    merged = {**STATS_DEFAULTS, **raw}
    interval = float(merged["STATS_INTERVAL"]) if merged["STATS_INTERVAL"] else None
    stale = merged["STALE_AFTER"]
    if stale is None:
        stale = 3 * (interval or STATS_DEFAULTS["STATS_INTERVAL"])
    return StatsSettings(
        interval=interval,
        database=merged["STATS_DATABASE"] if "STATS_DATABASE" in raw else default_stats_database(settings.DATABASES),
        stale_after=float(stale),
        prune_after=float(merged["PRUNE_AFTER"]),
        publish_timeout=float(merged["PUBLISH_TIMEOUT"]),
        top_views=int(merged["TOP_VIEWS"]),
    )


def opentelemetry_wanted() -> bool:
    """``POOLED_PG["OPENTELEMETRY"]`` is True, read leniently: the app's ``ready()`` asks, and a
    wrong value is the system checks' to report (E015), not a crash before they run."""
    from django.conf import settings

    raw = getattr(settings, "POOLED_PG", None)
    return isinstance(raw, Mapping) and raw.get("OPENTELEMETRY") is True


def read_health_settings() -> HealthSettings:
    """The readiness settings of ``settings.POOLED_PG``, or :class:`ImproperlyConfigured` listing
    every problem of ``POOLED_PG``."""
    merged = {**HEALTH_DEFAULTS, **_checked_pooled_pg()}
    interval = merged["HEALTH_PROBE_INTERVAL"]
    return HealthSettings(
        saturated_after=float(merged["HEALTH_SATURATED_AFTER"]),
        probe_interval=None if interval is None else float(interval),
        probe_timeout=float(merged["HEALTH_PROBE_TIMEOUT"]),
    )
