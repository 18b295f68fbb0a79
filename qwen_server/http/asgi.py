"""The types the HTTP layer shares, the helper that keeps an ASGI wrapper to HTTP, and the wait for a client's hang-up."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Request, Response

# Litestar's generics: a request with any user, auth and state; a response with any content.
AnyRequest = Request[Any, Any, Any]
AnyResponse = Response[Any]

# ASGI as the wrappers see it. The scope stays Any: Litestar types it as TypedDicts, which admit
# neither the keys its router adds (route_handler, path_template) nor ours (the request record).
Scope = Any
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Serve = Callable[[ASGIApp, Scope, Receive, Send], Awaitable[None]]


async def disconnected(receive: Receive) -> None:
    """Return once the client has hung up (the server's `http.disconnect`); other messages are skipped."""
    while (await receive())["type"] != "http.disconnect":
        pass


def http_only(app: ASGIApp, serve: Serve) -> ASGIApp:
    """An ASGI app that runs `serve(app, scope, receive, send)` for HTTP and passes the rest to `app`."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        await serve(app, scope, receive, send)

    return wrapped
