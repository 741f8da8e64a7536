from django.apps import AppConfig


class PooledPgConfig(AppConfig):
    name = "django_pooled_pg"
    verbose_name = "Connection pools"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # (registers the system checks)
        from .settings import opentelemetry_wanted

        checks.log_middleware_warnings()
        if opentelemetry_wanted():  # POOLED_PG["OPENTELEMETRY"]
            from .opentelemetry import instrument

            instrument()
