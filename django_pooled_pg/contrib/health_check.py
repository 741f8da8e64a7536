"""A django-health-check (4.x) backend: the readiness verdict of ``django_pooled_pg.health``.
``pip install 'django-pooled-pg[healthcheck]'`` and name it among the checks of the view::

    from health_check.views import HealthCheckView

    urlpatterns += [
        path("ht/", HealthCheckView.as_view(checks=[
            "health_check.checks.Cache",
            "django_pooled_pg.contrib.health_check.PoolHealthCheck",
        ])),
    ]

django-health-check 4 has no plugin registry and no apps to install (3.x's ``plugin_dir`` and
``health_check.db`` are gone): a check is a dataclass the view instantiates. This one does not
replace ``health_check.checks.Database``, whose ``SELECT 1`` takes a pool slot (and waits for one
when the pool is saturated): it reports the same verdict as the readiness view, without a slot.
"""

from __future__ import annotations

import dataclasses

try:
    from health_check.base import HealthCheck
    from health_check.exceptions import ServiceUnavailable
except ImportError as exc:  # pragma: no cover - depends on the extra
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(
        "django_pooled_pg.contrib.health_check needs django-health-check 4: pip install 'django-pooled-pg[healthcheck]'"
    ) from exc

from ..telemetry.health import readiness


@dataclasses.dataclass
class PoolHealthCheck(HealthCheck):
    """The pools of the process that answers: unavailable when one is saturated, failing or
    cannot reach its server (the reason names the alias, never a host or a password).

    ``alias``: check that alias only; None (the default): every alias, as the readiness view."""

    alias: str | None = None

    def run(self) -> None:
        verdict = readiness()
        bad = [a for a in verdict.aliases if not a.ready and self.alias in (None, a.alias)]
        if bad:
            raise ServiceUnavailable("; ".join(f"{a.alias}: {a.reason}" for a in bad))
