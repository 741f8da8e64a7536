"""The Celery app, set up the way Celery's Django guide says (DJANGO_SETTINGS_MODULE, so
Celery's Django fix-up runs around every task)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "realsite.settings")

app = Celery("realsite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
