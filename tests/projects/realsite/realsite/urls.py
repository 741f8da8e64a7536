from catalog import views
from django.conf import settings
from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("products/", views.products, name="products"),
    path("products/async/", views.products_async, name="products-async"),
    path("state/", views.state, name="state"),
    path("session/set/", views.set_session, name="session-set"),
    path("session/show/", views.show_session, name="session-show"),
    path("pid/", views.backend_pid, name="pid"),
]
if "debug_toolbar" in settings.INSTALLED_APPS:
    # Not debug_toolbar_urls(): it adds nothing unless DEBUG is on, and tests run with DEBUG off.
    urlpatterns.append(path("__debug__/", include("debug_toolbar.urls")))
if "django_prometheus" in settings.INSTALLED_APPS:
    urlpatterns.append(path("", include("django_prometheus.urls")))
