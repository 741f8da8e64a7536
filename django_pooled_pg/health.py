"""A readiness endpoint for load balancers and orchestrators (a Kubernetes ``readinessProbe``).

Include it where they look::

    urlpatterns += [path("ready/", include("django_pooled_pg.health"))]

It answers 200 when every pool of the process that serves the request can serve, and 503 with
the alias and the reason (saturated, failing, unreachable) when one cannot, each with a small
JSON body; :mod:`django_pooled_pg.telemetry.health` explains what is checked and why. The view
never borrows a connection, so it answers at once from a saturated pool and never shows in the
per-view statistics; it is marked ``_pooled_pg_exempt`` for middleware that should skip it. The
body names no host, database or user; like the Prometheus endpoint, it has no authentication of
its own.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path

from .telemetry.health import readiness

#: Retry-After of a 503: the load balancer asks again anyway; a client that honours it waits this.
RETRY_AFTER = "5"


def ready(request: HttpRequest) -> HttpResponse:
    """200 and each alias's state when this process's pools can serve; 503 and why not."""
    verdict = readiness()
    response = JsonResponse(verdict.as_dict(), status=200 if verdict.ready else 503)
    response["Cache-Control"] = "no-store"  # (a cached 200 would hide an outage)
    if not verdict.ready:
        response["Retry-After"] = RETRY_AFTER
        # Django logs every 5xx as an ERROR of django.request: one line per poll of each load
        # balancer for as long as an outage lasts, burying the pool's own warnings (which say
        # it once). Django's own flag for "logged already" (django.utils.log.log_response).
        response._has_been_logged = True
    return response


#: PoolMiddleware and per-view statistics skip views with this mark (the view borrows nothing).
ready._pooled_pg_exempt = True  # type: ignore[attr-defined]

urlpatterns = [path("", ready, name="django_pooled_pg_ready")]
