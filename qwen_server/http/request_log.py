"""Around the whole app, for every response (404, 405 and CORS preflights included): the request ID,
the HTTP metrics labelled by the matched route's path template (or "unmatched") and the access line.

Litestar runs its middleware only inside a matched route, so this wraps the app itself (`App` in
app.py). It also reads what is left of a body the app answered without reading, so that the client
gets the answer rather than a reset.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from qwen_server import logs, metrics
from qwen_server.http.asgi import ASGIApp, Receive, Scope, Send, http_only
from qwen_server.logs import RequestRecord
from qwen_server.settings import Settings

RECORD = "qwen_server.request"  # ASGI scope key of the request's RequestRecord
UNMATCHED = "unmatched"  # the metrics route label of a request no route handler answered (404, 405)
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces
_DISCARD_SECONDS = 10.0
_DISCARD_EXTRA_BYTES = 16 * 1024 * 1024


def record_of(scope: Scope) -> RequestRecord:
    """The request's record; made here if the app runs without `RequestLog` around it (tests)."""
    record: RequestRecord | None = scope.get(RECORD)
    if record is None:
        record = scope[RECORD] = RequestRecord(_request_id(scope))
    return record


def route_opt(scope: Scope) -> dict[str, Any]:
    """The policy the matched route declares; {} (the default policy) when no route matched."""
    handler = scope.get("route_handler")
    return handler.opt if handler is not None else {}


class RequestLog:
    """`wrap(app)`: the app with a request ID, metrics and an access line for every HTTP request."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def wrap(self, app: ASGIApp) -> ASGIApp:
        return http_only(app, self._serve)

    async def _serve(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        path, method = scope["path"], scope["method"]  # as received: routing strips the root path
        record = RequestRecord(_request_id(scope))
        scope[RECORD] = record
        rid_header = (b"x-request-id", record.request_id.encode())

        async def send_wrapper(message: Any) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), rid_header]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record.finished = True
            await send(message)

        body_read = not _has_body(scope)

        async def receive_wrapper() -> Any:
            nonlocal body_read
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_read = True
            return message

        metrics.HTTP_IN_FLIGHT.inc()
        try:
            await app(scope, receive_wrapper, send_wrapper)
            if not body_read:
                await self._discard_body(receive_wrapper, lambda: body_read)
        finally:
            metrics.HTTP_IN_FLIGHT.dec()
            elapsed = time.perf_counter() - t0
            fields = record.fields(elapsed)
            route = scope.get("path_template") if "route_handler" in scope else UNMATCHED
            metrics.HTTP_REQUESTS.labels(method, route, str(fields["status"])).inc()
            metrics.HTTP_LATENCY.labels(method, route).observe(elapsed)
            log = logs.ACCESS.debug if route_opt(scope).get("quiet") else logs.ACCESS.info
            log("%s %s %d", method, path, fields["status"], extra={"fields": fields})

    async def _discard_body(self, receive: Receive, done: Callable[[], bool]) -> None:
        """Read what is left of a body the app answered without reading (401, 404, 413, 429): a
        connection closed with unread bytes is reset, and asyncio clients then lose the answer to a
        ReadError. Bounded in bytes and time; past either, the connection closes as before."""
        limit = self.settings.max_request_body_bytes + _DISCARD_EXTRA_BYTES
        seen = 0
        try:
            async with asyncio.timeout(_DISCARD_SECONDS):
                while not done() and seen <= limit:
                    message = await receive()
                    seen += len(message.get("body", b""))
        except TimeoutError:
            pass


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex
