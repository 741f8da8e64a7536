from django.urls import path

from . import views

app_name = "shop"
urlpatterns = [
    path("product/<int:pk>/", views.product, name="product"),
    path("three/", views.three, name="three"),
    path("listings/", views.listings, name="listings"),
    path("slow/", views.slow, name="slow"),
    path("order/", views.order, name="order"),
    path("export.csv", views.export_csv, name="export"),
    path("async/", views.async_view, name="async"),
]
