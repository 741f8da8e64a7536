"""The set-up of a new database session, once, when the pool opens the connection
(:class:`SessionSetup`), and what of it a borrow checks again (:func:`sync_postgres_types`)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from django.apps import apps
from django.db import connections
from django.db.backends.signals import connection_created
from psycopg import Connection

from .pooling.connection import PooledConnection
from .pooling.session import BASELINE_QUERY, RESET_SQL, reset_statement


class SessionSetup:
    """Prepares a database session, once, when the pool opens a connection.

    Time zone and role arrive with the startup packet, so what is left is what other code wants:
    Django's ``connection_created`` signal (sent with a wrapper bound to the new connection, so
    receivers that run ``SET ...`` keep working) and the pool's ``configure`` option. What they
    set is the session's baseline, which every reset restores (:func:`.pooling.session.reset_statement`).
    """

    def __init__(
        self,
        wrapper_class: type[Any],
        settings_dict: dict[str, Any],
        alias: str,
        configure: Callable[[Connection], None] | None,
        time_zone: str | None = None,
    ) -> None:
        #: The ENGINE's DatabaseWrapper class (the sender of ``connection_created``).
        self.wrapper_class = wrapper_class
        self.settings_dict = settings_dict
        self.alias = alias
        self.configure = configure
        #: Set with SET when it cannot travel in the startup packet (behind PgBouncer).
        self.time_zone = time_zone

    def __call__(self, conn: PooledConnection) -> None:
        conn._pooled_pg_setup = self
        conn._pooled_pg_cursors = []
        baseline = False  # whether anything below may have set a session setting
        if self.time_zone and conn.info.parameter_status("TimeZone") != self.time_zone:
            conn.execute("SELECT set_config('TimeZone', %s, false)", [self.time_zone])
            baseline = True
        if connection_created.has_listeners(self.wrapper_class):
            baseline = True
            self._send_connection_created(conn)
        if self.configure is not None:
            baseline = True
            self.configure(conn)
        if baseline:
            rows = conn.execute(BASELINE_QUERY).fetchall()
            conn._pooled_pg_reset = reset_statement(rows).encode()
        else:
            conn._pooled_pg_reset = RESET_SQL.encode()
        # What ran here is the session's baseline, not a borrower's change.
        conn._pooled_pg_changed = False
        conn._pooled_pg_used = False

    def _send_connection_created(self, conn: PooledConnection) -> None:
        wrapper = self.wrapper_class(self.settings_dict, self.alias)
        wrapper.connection = conn
        # Receivers that query through connections[alias] (django.contrib.postgres reads the
        # hstore/citext OIDs that way) must use this session: borrowing from the pool that is
        # opening it would wait on itself (PoolTimeout) and keep a slot in this thread.
        previous = getattr(connections._connections, self.alias, None)
        connections[self.alias] = wrapper
        try:
            connection_created.send(sender=self.wrapper_class, connection=wrapper)
        finally:
            wrapper.connection = None
            if previous is None:
                del connections[self.alias]
            else:
                connections[self.alias] = previous
        if not conn.autocommit:
            conn.commit()
            conn.autocommit = True


#: (apps.app_configs, whether django.contrib.postgres is in it), see sync_postgres_types.
_contrib_postgres_installed: tuple[Any, bool] = (None, False)


def sync_postgres_types(wrapper: Any, conn: PooledConnection) -> None:
    """Register django.contrib.postgres's hstore/citext adapters again when they are stale.

    Its ``connection_created`` receiver registers them per connection with type OIDs it
    caches per alias and forgets at CREATE EXTENSION (an in-process ``migrate``, as in a test
    run); Django sends the signal on every connect, a pooled session got it once. So compare
    the OIDs this session was set up with, which costs a dict lookup when nothing changed.
    """
    global _contrib_postgres_installed
    signals = sys.modules.get("django.contrib.postgres.signals")
    if signals is None or not apps.apps_ready or wrapper.alias not in connections.settings:
        return  # (its OID lookups go through connections[alias]: a copy's alias has none)
    configs = apps.app_configs  # a new dict whenever INSTALLED_APPS changes (tests)
    if _contrib_postgres_installed[0] is not configs:
        _contrib_postgres_installed = (configs, apps.is_installed("django.contrib.postgres"))
    if not _contrib_postgres_installed[1]:
        return
    oids = (signals.get_hstore_oids(wrapper.alias), signals.get_citext_oids(wrapper.alias))
    if conn._pooled_pg_type_oids != oids:
        signals.register_type_handlers(wrapper)
        conn._pooled_pg_type_oids = oids
