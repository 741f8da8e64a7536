"""django-pooled-pg: a PostgreSQL ENGINE for Django with a fork-safe, process-wide pool.

Use ``"ENGINE": "django_pooled_pg"`` in ``DATABASES``, add ``"django_pooled_pg"`` to
``INSTALLED_APPS`` (system checks) and ``"django_pooled_pg.middleware.PoolMiddleware"`` first in
``MIDDLEWARE``. The names below are the public API; they are imported on first use, so importing
this package never touches Django's database layer.
"""

from __future__ import annotations

from typing import Any

__version__ = "1.0.0rc1"

_EXPORTS = {
    "borrow": "api",
    "release_connections": "api",
    "pinned": "api",
    "PoolError": "errors",
    "PoolExhausted": "errors",
    "BudgetExhausted": "errors",
    "DatabaseUnavailable": "errors",
    "signals": "signals",
    # Not "stats": django_pooled_pg.pooling.stats is the module of the per-process counters.
    "fleet_stats": "telemetry.fleet",
    "FleetStats": "telemetry.fleet",
    "publish_now": "telemetry.publisher",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'django_pooled_pg' has no attribute {name!r}")
    from importlib import import_module

    loaded = import_module(f"django_pooled_pg.{module}")
    return loaded if name == module else getattr(loaded, name)
