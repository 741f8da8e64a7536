from tests.dbserver import database_settings

SECRET_KEY = "tests"
USE_TZ = True
TIME_ZONE = "UTC"
DATABASES = {
    "default": database_settings("pooled_pg"),
    "other": database_settings("pooled_pg_other"),
}
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django_pooled_pg",
    "tests.app",
]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGGING_CONFIG = None
