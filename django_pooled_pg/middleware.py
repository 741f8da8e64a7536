"""``PoolMiddleware``: every request gives its connections back, and a pool that cannot serve
answers HTTP 503 quickly instead of a 500 after a long wait.

Put it first in ``MIDDLEWARE`` so that it runs after every other middleware is done::

    MIDDLEWARE = ["django_pooled_pg.middleware.PoolMiddleware", *MIDDLEWARE]

It works for sync and async views, under WSGI and ASGI. Connections are given back on the thread
that used them: after the response for plain responses, when the response is closed for
streaming ones (``StreamingHttpResponse``, ``FileResponse``), which Django does on the thread or
sync context that iterated it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.db import connections
from django.db.utils import Error as DjangoDatabaseError
from django.http import HttpRequest, HttpResponse, HttpResponseBase

from . import eventlog
from .api import held_connections, release_connections
from .errors import DatabaseUnavailable, PoolError, pool_error
from .pooling.ledger import current_view, ledger


def service_unavailable(error: PoolError) -> HttpResponse:
    response = HttpResponse(
        "Service temporarily unavailable: the database is busy or unreachable. Try again shortly.\n",
        status=503,
        content_type="text/plain; charset=utf-8",
    )
    response["Retry-After"] = str(error.retry_after)
    return response


def lost_connection_error(exc: BaseException) -> DatabaseUnavailable | None:
    """A DatabaseUnavailable for ``exc`` if it came from a connection that is now broken (the
    server restarted, failed over or went away mid-request, or ended the session itself), else
    None.

    Any database error counts when a connection of the request is now closed: the server says
    why it ended a session with an error of its own, not always an OperationalError
    (``idle_in_transaction_session_timeout`` arrives as InternalError, SQLSTATE 25P03)."""
    if not isinstance(exc, (DjangoDatabaseError, psycopg.Error)):
        return None
    for wrapper in connections.all(initialized_only=True):
        conn = wrapper.connection
        if getattr(wrapper, "_borrow", None) is not None and conn is not None and conn.closed:
            error = DatabaseUnavailable(
                f"lost the connection to database {wrapper.alias!r}: {exc}", alias=wrapper.alias
            )
            error.__cause__ = exc
            return error
    lost = pool_error.get()  # a connection of this request was lost and already given back
    if isinstance(lost, DatabaseUnavailable):
        error = DatabaseUnavailable(f"{lost}: {exc}", alias=lost.alias)
        error.__cause__ = exc
        return error
    return None


def _view_name(view_func: Any) -> str:
    """``module.qualname`` of a view, for a ``process_view`` called without Django's handler
    (which sets ``request.resolver_match`` first)."""
    name = getattr(view_func, "__qualname__", None) or type(view_func).__qualname__
    return f"{getattr(view_func, '__module__', '')}.{name}"


class PoolMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        if pool_error.get() is not None:
            pool_error.set(None)  # (one left by an earlier request of this thread)
        view_token = current_view.set(request.path)
        held = held_connections()  # None unless code around the request holds one (tests)
        try:
            response = self.get_response(request)
            error = pool_error.get()
            if error is not None:
                response = self.finish(request, response, error)
                pool_error.set(None)
        finally:
            current_view.reset(view_token)
        if getattr(response, "streaming", False):
            # Given back when the server closes the response, after the last chunk; what the
            # server's iteration borrows is the view's (see _streamed).
            response._resource_closers.append(lambda: release_connections(self.view_name(request), held))
            self._streamed(request, response)
        else:
            release_connections(self.view_name(request), held)
        return response

    def _streamed(self, request: HttpRequest, response: HttpResponseBase) -> None:
        """A streaming response's content runs its queries as the server iterates it, after this
        middleware returned, in this thread's (or task's) context: name the view there until the
        response is closed, so that those borrows are counted under it."""
        current_view.set(self.view_name(request))
        response._resource_closers.append(lambda: current_view.set(None))

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        token = pool_error.set(None)
        view_token = current_view.set(request.path)
        held = held_connections()
        try:
            response = await self.get_response(request)
            response = self.finish(request, response, pool_error.get())
        finally:
            current_view.reset(view_token)
            pool_error.reset(token)
        view = self.view_name(request)
        if getattr(response, "streaming", False):
            response._resource_closers.append(lambda: release_connections(view, held))
            self._streamed(request, response)
        else:
            # The ORM ran on this request's thread-sensitive executor thread: give back there.
            await sync_to_async(release_connections, thread_sensitive=True)(view, held)
        return response

    def process_view(self, request: HttpRequest, view_func: Any, view_args: Any, view_kwargs: Any) -> None:
        """Name the request by its view from here on: the route's name (``namespace:name``) or,
        for a route without one, the view's ``module.function``, as Django's ``ResolverMatch``
        spells it; the statistics count each view's borrows under it (paths would make one
        entry per URL)."""
        match = getattr(request, "resolver_match", None)
        if match is not None:
            view = match.view_name
        else:
            view = _view_name(view_func)
        request._pooled_pg_view = view
        current_view.set(view)
        ledger.name_view(view)  # what middleware borrowed before (request mode) is the view's
        return None

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        error = exception if isinstance(exception, PoolError) else lost_connection_error(exception)
        if error is None:
            return None
        self.log(request, error)
        return service_unavailable(error)

    def finish(self, request: HttpRequest, response: HttpResponseBase, error: PoolError | None) -> HttpResponseBase:
        """A 500 caused by a pool error raised outside the view (in another middleware) becomes
        a 503 as well."""
        if error is not None and response.status_code == 500:
            self.log(request, error)
            return service_unavailable(error)
        return response

    @staticmethod
    def view_name(request: HttpRequest) -> str:
        return getattr(request, "_pooled_pg_view", None) or request.path

    def log(self, request: HttpRequest, error: PoolError) -> None:
        ledger.stats_for(error.alias).view(self.view_name(request)).responses_503 += 1
        cause = f" (cause: {error.__cause__})" if error.__cause__ is not None else ""
        eventlog.warn(
            "a 503",
            error.alias,
            self.view_name(request),
            "503 for %s %s: %s%s",
            request.method,
            request.path,
            error,
            cause,
        )
