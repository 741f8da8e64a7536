from django.urls import path
from jobs import views

urlpatterns = [
    path("health/", views.health),
    path("query/", views.query),
]
