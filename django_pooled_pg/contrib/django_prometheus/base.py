"""``"ENGINE": "django_pooled_pg.contrib.django_prometheus"``: our ENGINE with django-prometheus's
database metrics (``django_db_execute_total``, ``django_db_query_duration_seconds``,
``django_db_errors_total``, ``django_db_new_connections_total``...).

django-prometheus counts database work in an ENGINE of its own, built the same way as this one:
its ``DatabaseWrapperMixin`` over a backend's ``DatabaseWrapper``. Here the backend is ours:

* its cursor class counts statements; the session reset does not depend on the cursor class,
  and with ``release="transaction"`` the pool adds the tracking of pinning statements on top
  of it, as for any cursor class (``cursors.tracking_cursor_class``);
* ``django_db_new_connections_total`` counts borrows, as it does over Django's own pool: with a
  pool, ``get_new_connection()`` is where a connection is taken, not opened. The connections the
  pool opened are in ``poolstats`` and our Prometheus metrics.
"""

from __future__ import annotations

from typing import Any

from django_prometheus.db.common import DatabaseWrapperMixin, ExportingCursorWrapper

from django_pooled_pg import base


class DatabaseWrapper(DatabaseWrapperMixin, base.DatabaseWrapper):
    def get_connection_params(self) -> dict[str, Any]:
        params = super().get_connection_params()
        params["cursor_factory"] = ExportingCursorWrapper(params["cursor_factory"], self.alias, self.vendor)
        return params

    def create_cursor(self, name: str | None = None) -> Any:
        # The counting class is the connections' cursor_factory already; the mixin's own
        # create_cursor (a factory per cursor) does not work with psycopg 3.
        return base.DatabaseWrapper.create_cursor(self, name)
