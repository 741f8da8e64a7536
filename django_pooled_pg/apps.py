from django.apps import AppConfig


class PooledPgConfig(AppConfig):
    name = "django_pooled_pg"
    verbose_name = "Connection pools"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # (registers the system checks)

        checks.log_middleware_warnings()
