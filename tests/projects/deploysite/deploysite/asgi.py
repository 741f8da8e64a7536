"""Django Channels' routing, as its tutorial writes it: HTTP to Django (through the middleware),
WebSockets to a consumer."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deploysite.settings")
django_asgi_app = get_asgi_application()  # (before importing code that imports models)

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402
from jobs.consumers import QueryConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter([path("ws/query/", QueryConsumer.as_asgi())]),
    }
)
