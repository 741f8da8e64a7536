from django.apps import AppConfig


class PooledPgConfig(AppConfig):
    name = "django_pooled_pg"
    verbose_name = "Connection pools"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
