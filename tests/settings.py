from tests.dbserver import database_settings

SECRET_KEY = "tests"
USE_TZ = True
TIME_ZONE = "UTC"
DATABASES = {
    "default": database_settings("pooled_pg"),
    "other": database_settings("pooled_pg_other"),
    # A read replica of default (in tests, the same database: Django's TEST MIRROR).
    "replica": {**database_settings("pooled_pg"), "TEST": {"MIRROR": "default"}},
}
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django_pooled_pg",
    "tests.app",
]
MIDDLEWARE = [
    "django_pooled_pg.middleware.PoolMiddleware",
    "django.middleware.common.CommonMiddleware",
]
ROOT_URLCONF = "tests.app.urls"
ALLOWED_HOSTS = ["*"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Pool statistics: tests publish with django_pooled_pg.publish_now() when they need a row, so no
# background thread writes while other tests count connections and borrows.
POOLED_PG = {"STATS_INTERVAL": None}
