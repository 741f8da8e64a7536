from django.apps import AppConfig
from django.db import connection

STARTED_ON = {}


class EarlyAppConfig(AppConfig):
    name = "earlyapp"

    def ready(self):
        # A query at start-up, as a gunicorn --preload app or a cache warm-up does.
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_database(), pg_backend_pid()")
            STARTED_ON["database"], STARTED_ON["backend"] = cursor.fetchone()
