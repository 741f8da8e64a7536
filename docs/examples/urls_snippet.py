# ruff: noqa: F821 (appended to the end of a urls.py that defines urlpatterns and imports path)
# --- django-pooled-pg: add to the end of urls.py (optional) ---
from django.urls import include

# The readiness endpoint for load balancers and Kubernetes: 200, or 503 and the reason.
urlpatterns += [path("ready/", include("django_pooled_pg.health"))]
