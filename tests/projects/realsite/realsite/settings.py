"""Settings of a small, ordinary Django project that switched its ENGINE to django_pooled_pg.

tests/test_realsite.py runs this project's own test suite (pytest-django and Django's test
runner), a Celery worker and the tools projects run beside us. The environment picks:

* ``REALSITE_ENGINE``: ``ours`` (default) or ``stock`` (Django's own backend, the control);
* ``REALSITE_RELEASE``: ``request`` (default) or ``transaction``;
* ``REALSITE_TOOLS``: a comma-separated list of ``toolbar``, ``sentry``, ``prometheus``, ``otel``;
* ``PGHOST``/``PGPORT``/``PGUSER``: the server; ``REALSITE_BROKER``: Celery's broker.
"""

import os

SECRET_KEY = "realsite-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "Europe/Paris"
TOOLS = {t for t in os.environ.get("REALSITE_TOOLS", "").split(",") if t}
ENGINE = os.environ.get("REALSITE_ENGINE", "ours")
RELEASE = os.environ.get("REALSITE_RELEASE", "request")
POOL_MAX_SIZE = int(os.environ.get("REALSITE_POOL_MAX", "4"))

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_pooled_pg",
    "catalog",
]
MIDDLEWARE = [
    "django_pooled_pg.middleware.PoolMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

if ENGINE == "ours":
    engine = "django_pooled_pg"
    options = {"pool": {"min_size": 1, "max_size": POOL_MAX_SIZE, "timeout": 5, "release": RELEASE}}
else:
    engine = "django.db.backends.postgresql"
    options = {}
if "prometheus" in TOOLS:
    # django-prometheus's database metrics, on top of our ENGINE (README: "Works with").
    engine = (
        "django_pooled_pg.contrib.django_prometheus" if ENGINE == "ours" else "django_prometheus.db.backends.postgresql"
    )
    INSTALLED_APPS.append("django_prometheus")
    MIDDLEWARE.insert(1, "django_prometheus.middleware.PrometheusBeforeMiddleware")
    MIDDLEWARE.append("django_prometheus.middleware.PrometheusAfterMiddleware")

DATABASES = {
    "default": {
        "ENGINE": engine,
        "NAME": os.environ.get("REALSITE_DB", "realsite"),
        "USER": os.environ.get("PGUSER", ""),
        "HOST": os.environ.get("PGHOST", ""),
        "PORT": os.environ.get("PGPORT", ""),
        "OPTIONS": options,
    }
}

if "toolbar" in TOOLS:
    INSTALLED_APPS.append("debug_toolbar")
    MIDDLEWARE.insert(1, "debug_toolbar.middleware.DebugToolbarMiddleware")
    INTERNAL_IPS = ["127.0.0.1"]
    DEBUG_TOOLBAR_CONFIG = {
        # Tests run with DEBUG off; the toolbar is shown anyway, with its panels in the page.
        "IS_RUNNING_TESTS": False,
        "SHOW_TOOLBAR_CALLBACK": lambda request: True,
        "RENDER_PANELS": True,
    }

if "sentry" in TOOLS:
    import sentry_sdk
    from catalog.sentry import CapturingTransport
    from sentry_sdk.integrations.django import DjangoIntegration

    sentry_sdk.init(
        dsn="http://public@127.0.0.1:9/1",  # nothing is sent: the transport keeps the envelopes
        transport=CapturingTransport,
        traces_sample_rate=1.0,
        integrations=[DjangoIntegration()],
        default_integrations=False,
    )

if "otel" in TOOLS:
    # OpenTelemetry's psycopg instrumentation, before any connection is opened; the Django
    # instrumentation is switched on in catalog.apps (it edits MIDDLEWARE, so not from here).
    from opentelemetry import trace
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    OTEL_SPANS = InMemorySpanExporter()
    _provider = TracerProvider()
    _provider.add_span_processor(SimpleSpanProcessor(OTEL_SPANS))
    trace.set_tracer_provider(_provider)
    PsycopgInstrumentor().instrument(enable_commenter=False)

CELERY_BROKER_URL = os.environ.get("REALSITE_BROKER", "redis://127.0.0.1:6379/15")
CELERY_RESULT_BACKEND = CELERY_BROKER_URL
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("REALSITE_QUEUE", "realsite")
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

ROOT_URLCONF = "realsite.urls"
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
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Pool statistics would start a background thread; the project's tests do not need it.
POOLED_PG = {"STATS_INTERVAL": None}
LOGGING = {
    "version": 1,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_pooled_pg": {"handlers": ["console"], "level": "WARNING"}},
}
