import sys

from django.apps import AppConfig


class PooledPgConfig(AppConfig):
    name = "django_pooled_pg"
    verbose_name = "Connection pools"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # (registers the system checks)
        from .settings import opentelemetry_wanted

        checks.log_middleware_warnings()
        if "celery" in sys.modules:  # a worker: its tasks' borrows are counted under their names
            from .api import name_celery_tasks

            name_celery_tasks()
        if opentelemetry_wanted():  # POOLED_PG["OPENTELEMETRY"]
            from .opentelemetry import instrument

            instrument()
