from django.contrib import admin
from django.contrib.staticfiles.views import serve as serve_static
from django.urls import include, path, re_path
from shop import views

urlpatterns = [
    path("", views.index, name="index"),
    path("shop/", include("shop.urls")),
    path("admin/", admin.site.urls),
    path("ready/", include("django_pooled_pg.health")),  # readiness, for load balancers
    # The demo runs gunicorn with DEBUG off and no web server in front, so the admin's CSS and
    # JS come from the staticfiles finders here. Never do this in production.
    re_path(r"^static/(?P<path>.*)$", serve_static, {"insecure": True}),
]
