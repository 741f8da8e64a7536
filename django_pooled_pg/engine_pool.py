"""An alias's pool, built from its Django settings: ``DatabaseWrapper.pool`` asks the registry
for the pool of the alias's :func:`pool_fingerprint`, which the registry builds with
:func:`build_pool` when the alias has none for those settings."""

from __future__ import annotations

import os
from typing import Any

from .cursors import tracking_cursor_class
from .pooling.pool import Pool
from .pooling.session import startup_options
from .session_setup import SessionSetup
from .settings import read_pool_settings
from .telemetry.snapshot import application_name


def build_pool(wrapper: Any) -> Pool:
    """The pool of ``wrapper``'s alias (a ``DatabaseWrapper``): its connections opened with the
    parameters Django would use, in autocommit, the time zone and role in the startup packet,
    set up once by :class:`SessionSetup`."""
    pool_settings = read_pool_settings(wrapper.alias, wrapper.settings_dict)
    wrapper.check_settings()
    options = wrapper.settings_dict["OPTIONS"]
    kwargs = wrapper.get_connection_params()
    kwargs["autocommit"] = True
    if not options.get("application_name"):
        # Lets poolstats tell this process's connections apart in pg_stat_activity.
        kwargs["application_name"] = application_name(wrapper.alias)
    # (tracking in request mode too: a thread outside a request gives back per statement. A
    # borrow held for its request times its statements, for what release="transaction" would
    # give back: poolstats --advise; each borrow picks its class, DatabaseWrapper._release_per_statement)
    factory = kwargs["cursor_factory"]
    untimed = tracking_cursor_class(factory)
    classes = None
    if pool_settings.release == "request":
        # (opened timed: a tool that wraps the class, as OpenTelemetry's psycopg
        # instrumentation does at connect, wraps the one that times)
        classes = (tracking_cursor_class(factory, timed=True), untimed)
    kwargs["cursor_factory"] = untimed if classes is None else classes[0]
    startup = {}
    if wrapper.timezone_name:
        startup["TimeZone"] = wrapper.timezone_name
    if options.get("assume_role"):
        startup["role"] = options["assume_role"]
    set_time_zone = None
    if pool_settings.behind_pgbouncer:
        # PgBouncer refuses startup options; it tracks TimeZone set in the session instead
        # and applies it to whichever server connection serves this client.
        set_time_zone = wrapper.timezone_name
    elif startup:
        kwargs["options"] = startup_options(kwargs.get("options"), startup)

    pool_kwargs = dict(pool_settings.pool_kwargs)
    configure = pool_kwargs.pop("configure", None)
    pool_kwargs.setdefault("name", f"django_pooled_pg:{wrapper.alias}:{os.getpid()}")
    connect_timeout = float(options.get("connect_timeout") or 0)
    pool = Pool(
        wrapper.alias,
        pool_settings,
        connect_timeout=connect_timeout,
        kwargs=kwargs,
        open=False,
        configure=SessionSetup(
            type(wrapper),
            dict(wrapper.settings_dict),
            wrapper.alias,
            configure,
            set_time_zone,
        ),
        **pool_kwargs,
    )
    pool.cursor_classes = classes
    return pool


def pool_fingerprint(wrapper: Any) -> tuple[Any, ...]:
    """What the pool's connections were made from; a change means a new pool. Compared by
    value against a copy the registry keeps (so in-place edits of OPTIONS are seen)."""
    sd = wrapper.settings_dict
    return (
        sd["NAME"],
        sd["USER"],
        sd["PASSWORD"],
        sd["HOST"],
        sd["PORT"],
        # (wrapper.timezone is None without USE_TZ: Django's cached property, cheaper to read
        # than settings.USE_TZ, dropped with timezone_name when either setting changes)
        sd["OPTIONS"],
        sd["CONN_HEALTH_CHECKS"],
        wrapper.timezone_name,
        wrapper.timezone is None,
    )
