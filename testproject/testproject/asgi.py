"""ASGI entry point: ``uvicorn testproject.asgi:application --app-dir testproject``."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

application = get_asgi_application()
