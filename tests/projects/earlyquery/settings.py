"""A project whose app queries the database while Django starts (in AppConfig.ready()).

Used by tests/test_lifecycle.py through `manage.py test --parallel 2`: the pool made at start-up
points at the real database, and the test run must not use it for the test database.
"""

import os

SECRET_KEY = "earlyquery"
USE_TZ = True
DATABASES = {
    "default": {
        "ENGINE": os.environ.get("EARLY_ENGINE", "django_pooled_pg"),
        "NAME": os.environ["EARLY_DB"],
        "USER": os.environ["PGUSER"],
        "HOST": os.environ["PGHOST"],
        "PORT": os.environ["PGPORT"],
        "OPTIONS": {"pool": {"min_size": 2, "max_size": 4}},
    }
}
INSTALLED_APPS = ["django.contrib.contenttypes", "django_pooled_pg", "earlyapp"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
