"""The ASGI types the HTTP layer's wrappers share, and the one helper that keeps them to HTTP."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Serve = Callable[[ASGIApp, Scope, Receive, Send], Awaitable[None]]


def http_only(app: ASGIApp, serve: Serve) -> ASGIApp:
    """An ASGI app that runs `serve(app, scope, receive, send)` for HTTP and passes the rest to `app`."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        await serve(app, scope, receive, send)

    return wrapped
