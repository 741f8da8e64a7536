"""WSGI entry point: ``gunicorn testproject.wsgi:application`` (run from testproject/)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

application = get_wsgi_application()
