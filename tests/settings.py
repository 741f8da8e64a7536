import os

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
if os.environ.get("POOLED_PG_RELEASE"):  # a server started by tests/test_soak.py
    DATABASES["default"]["OPTIONS"]["pool"]["release"] = os.environ["POOLED_PG_RELEASE"]
INSTALLED_APPS = [
    "django.contrib.admin",  # the pool status page (tests/test_admin_status.py)
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django_pooled_pg",
    "tests.app",
]
MIDDLEWARE = [
    "django_pooled_pg.middleware.PoolMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "static/"
ROOT_URLCONF = "tests.app.urls"
ALLOWED_HOSTS = ["*"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Pool statistics: tests publish with django_pooled_pg.publish_now() when they need a row, so no
# background thread writes while other tests count connections and borrows.
POOLED_PG = {"STATS_INTERVAL": None}
