"""A WebSocket consumer that answers each message with a query, as Channels' documentation
writes one: the ORM runs in ``database_sync_to_async``."""

import json

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from .probe import probe, probe_holding

#: How a message's query runs, by its "run" key:
RUNNERS = {
    # Channels' default: thread-sensitive, so one thread per process runs every consumer's ORM.
    "sensitive": database_sync_to_async(probe),
    # In the event loop's executor (daphne: ASGI_THREADS threads).
    "threads": database_sync_to_async(probe, thread_sensitive=False),
    # Not Channels' wrapper: nothing calls close_old_connections(); outside a request each
    # statement gives the connection back.
    "plain": sync_to_async(probe, thread_sensitive=False),
    # The same, after a SET: the thread keeps its connection (the control).
    "plain-holding": sync_to_async(probe_holding, thread_sensitive=False),
}


class QueryConsumer(AsyncWebsocketConsumer):
    async def receive(self, text_data=None, bytes_data=None):
        message = json.loads(text_data)
        result = await RUNNERS[message.get("run", "sensitive")](float(message.get("hold", 0)))
        await self.send(text_data=json.dumps({**result, "n": message.get("n")}))
