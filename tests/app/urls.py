import importlib.util

from django.contrib import admin
from django.urls import include, path

from . import views

urlpatterns = [
    path("no-db/", views.no_db),
    path("query/", views.query),
    path("slow/", views.slow),
    path("stream/", views.stream),
    path("async/", views.async_view),
    path("left-open/", views.left_open),
    path("atomic-left-open/", views.atomic_left_open),
    path("fails/", views.fails),
    path("executor/", views.executor),
    path("executor-holding/", views.executor_holding),
    path("pool-state/", views.pool_state),
    path("query-wait-query/", views.query_wait_query),
    path("transfer/", views.transfer),  # the soak test
    path("order/", views.order),
    path("idle-in-transaction/", views.idle_in_transaction),
    path("timeout-then-lost/", views.timeout_then_lost),
    path("sleep-query/", views.sleep_query),
    path("admin/", admin.site.urls),  # the pool status page
    path("ready/", include("django_pooled_pg.health")),  # tests/test_health.py
]

if importlib.util.find_spec("prometheus_client"):  # the [prometheus] extra
    urlpatterns.append(path("metrics/", include("django_pooled_pg.prometheus")))

if importlib.util.find_spec("health_check"):  # the [healthcheck] extra
    from health_check.views import HealthCheckView

    urlpatterns.append(
        path("ht/", HealthCheckView.as_view(checks=["django_pooled_pg.contrib.health_check.PoolHealthCheck"]))
    )
