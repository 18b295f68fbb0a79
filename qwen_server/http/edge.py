"""The HTTP edge in front of every route: request IDs, API keys, admission control, deadlines,
drain, metrics and the access log.

Policy is declared on each route, in Litestar's per-handler `opt`, and read from the route the
request matched (`scope["route_handler"]`); nothing here lists paths:

- `opt={"inference": True}`: admission (429 beyond the limit, 503 while draining) and a deadline;
- `opt={"auth": False}`: never asks for the API key;
- `opt={"probe": True}`: asks for the key only with `--protect-probes` (readiness, metrics);
- `opt={"quiet": True}`: its access line is logged at debug (probes and scrapes).

A route that declares nothing needs the key (when keys are configured), is not inference, and is
logged at info. A request that matched no route (404, 405) is held to that default: without a valid
key it gets 401, whatever the path, so a client without a key cannot tell which paths exist.

Litestar runs its middleware only inside a matched route, so the edge has two parts: `Edge.wrap`
goes around the whole app (request ID, metrics labelled by the route's path template or
"unmatched", access log: every response, 404/405 and CORS preflights included), and
`Edge.middleware`, Litestar middleware, applies the matched route's policy before its handler reads
the body, so a refused request costs no image fetch or decode. Each admitted inference request runs
under an `asyncio.timeout`: its deadline is the request timeout, and drain moves it to "now" for the
requests still running at the end of the drain. Cancelling the handler aborts the engine request
(vLLM's generator is cancelled); the client then gets an error response, or, if its stream had
started, an error event and [DONE].
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException

from qwen_server import logs, metrics
from qwen_server.errors import Kind, envelope
from qwen_server.http.errors import STATUS, handle_http_exception, json_response
from qwen_server.settings import Settings

log = logging.getLogger("qwen_server")

EXCHANGE = "qwen_server.exchange"  # ASGI scope key of the request's Exchange
UNMATCHED = "unmatched"  # the metrics route label of a request no route handler answered (404, 405)
_UNAUTHORIZED = "Missing or invalid API key: send Authorization: Bearer <key>."
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces


@dataclass(slots=True)
class Exchange:
    """One request as the access log and metrics see it; the service fills in the counts."""

    request_id: str
    images: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cut: str | None = None  # why the edge ended it early: "timeout" or "drain_abort"
    status: int | None = None  # the response's, once it has started
    finished: bool = False  # the response's last body message was sent


def exchange_of(scope: Any) -> Exchange | None:
    return scope.get(EXCHANGE)


def route_opt(scope: Any) -> dict[str, Any]:
    """The policy the matched route declares; {} (the default policy) when no route matched."""
    handler = scope.get("route_handler")
    return handler.opt if handler is not None else {}


def load_keys(settings: Settings) -> tuple[bytes, ...]:
    keys = list(settings.api_key or ())
    if settings.api_key_file:
        for line in Path(settings.api_key_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return tuple(k.encode() for k in keys)


class Edge:
    """Per-worker state of the edge: `wrap` goes around the whole app, `middleware` is what Litestar
    wraps around each route, `unmatched` answers the requests no route matched."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = load_keys(settings)
        self.limit = settings.max_pending_requests  # None until the engine's max_num_seqs is known
        self.admitted = 0
        self.draining = False
        self.engine: Any = None  # set by the app's lifespan; its max_num_seqs sizes the default limit
        self._running: dict[asyncio.Timeout, Exchange] = {}

    # --- drain ---

    async def drain(self, timeout: float) -> int:
        """Refuse new inference requests, let running ones finish for up to `timeout` seconds, then
        cut the rest. Returns how many were cut."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = 0
        now = asyncio.get_running_loop().time()
        for scope_timeout, exchange in list(self._running.items()):
            exchange.cut = "drain_abort"
            scope_timeout.reschedule(now)
            cut += 1
        while self._running:  # the cut requests send their error and finish
            await asyncio.sleep(0.02)
        return cut

    # --- around the whole app: every response ---

    def wrap(self, app: Any) -> Any:
        return _http_only(app, self._serve)

    async def _serve(self, app: Any, scope: Any, receive: Any, send: Any) -> None:
        t0 = time.perf_counter()
        path, method = scope["path"], scope["method"]  # as received: routing strips the root path
        exchange = Exchange(_request_id(scope))
        scope[EXCHANGE] = exchange
        rid_header = (b"x-request-id", exchange.request_id.encode())

        async def send_wrapper(message: Any) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), rid_header]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                exchange.finished = True
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
            status = exchange.status or 500  # nothing sent: the app failed before its response
            route = scope.get("path_template") if "route_handler" in scope else UNMATCHED
            metrics.HTTP_REQUESTS.labels(method, route, str(status)).inc()
            metrics.HTTP_LATENCY.labels(method, route).observe(elapsed)
            (logs.ACCESS.debug if route_opt(scope).get("quiet") else logs.ACCESS.info)(
                "%s %s %d", method, path, status,
                extra={"fields": {
                    "request_id": exchange.request_id,
                    "status": status,
                    "latency_ms": round(elapsed * 1000, 1),
                    "prompt_tokens": exchange.prompt_tokens,
                    "completion_tokens": exchange.completion_tokens,
                    "images": exchange.images,
                    "cut": exchange.cut,
                }},
            )

    async def _discard_body(self, receive: Any, done: Any) -> None:
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

    # --- around each route: its declared policy, before its handler reads the body ---

    def middleware(self, app: Any) -> Any:
        return _http_only(app, self._apply_policy)

    async def _apply_policy(self, app: Any, scope: Any, receive: Any, send: Any) -> None:
        opt = route_opt(scope)
        exchange = scope[EXCHANGE]

        async def refuse(kind: Kind, message: str, err: str, headers: dict[str, str]) -> None:
            metrics.REJECTED.labels(err).inc()
            await _send_error(send, kind, message, err, headers)

        if self._needs_key(opt, scope["method"]) and not self._authorized(scope):
            await refuse(Kind.UNAUTHORIZED, _UNAUTHORIZED, "unauthorized", {"WWW-Authenticate": "Bearer"})
            return
        if not opt.get("inference"):
            await app(scope, receive, send)
            return
        if self.draining:
            await refuse(Kind.UNAVAILABLE, "The server is shutting down; retry on another instance.", "draining",
                         {"Retry-After": str(self.settings.retry_after_seconds)})
            return
        limit = self._limit()
        if limit is not None and self.admitted >= limit:
            await refuse(Kind.OVERLOADED, f"The server is at its limit of {limit} requests in progress; retry shortly.",
                         "overloaded", {"Retry-After": "1"})
            return
        self.admitted += 1
        try:
            await self._run_admitted(app, scope, receive, send, exchange)
        finally:
            self.admitted -= 1

    # --- the requests no route matched ---

    def unmatched(self, request: Request, exc: HTTPException) -> Response:
        """Litestar's exception handler for 404 and 405: a request that matched no route is held to
        the default policy (the key, when keys are configured) before it learns the path is unknown."""
        scope = request.scope
        if "route_handler" not in scope and self._needs_key({}, scope["method"]) and not self._authorized(scope):
            metrics.REJECTED.labels("unauthorized").inc()
            return json_response(401, envelope(Kind.UNAUTHORIZED, _UNAUTHORIZED, None, "unauthorized"),
                                 {"WWW-Authenticate": "Bearer"})
        return handle_http_exception(request, exc)

    async def _run_admitted(self, app: Any, scope: Any, receive: Any, send: Any, exchange: Exchange) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout if self.settings.request_timeout else None
        try:
            async with asyncio.timeout_at(deadline) as scope_timeout:
                self._running[scope_timeout] = exchange
                try:
                    await app(scope, receive, send)
                finally:
                    self._running.pop(scope_timeout, None)
        except TimeoutError:
            if exchange.finished:
                return
            reason = exchange.cut or "timeout"
            exchange.cut = reason
            metrics.REJECTED.labels(reason).inc()
            if reason == "timeout":
                kind, text = Kind.TIMEOUT, f"The request took longer than the server's limit of {self.settings.request_timeout:g} s."
            else:
                kind, text = Kind.UNAVAILABLE, "The server is shutting down and stopped this request."
            log.warning("request %s cut: %s", exchange.request_id, reason)
            if exchange.status is not None:  # a stream: an error event, then the end of the stream
                body = b"data: " + envelope(kind, text, None, reason) + b"\n\ndata: [DONE]\n\n"
                await send({"type": "http.response.body", "body": body, "more_body": False})
            else:
                await _send_error(send, kind, text, reason, {"Retry-After": str(self.settings.retry_after_seconds)})

    def _limit(self) -> int | None:
        if self.limit is None and self.engine is not None and self.engine.max_num_seqs:
            self.limit = 4 * self.engine.max_num_seqs
        return self.limit

    def _needs_key(self, opt: dict[str, Any], method: str) -> bool:
        if not self.keys or method == "OPTIONS":  # CORS preflights carry no credentials
            return False
        if opt.get("probe"):
            return self.settings.protect_probes
        return opt.get("auth", True)

    def _authorized(self, scope: Any) -> bool:
        token = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    token = b""
                break
        token = token.strip()
        # Every key is compared, in constant time, whichever matches.
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(token, key)
        return matched



def _http_only(app: Any, serve: Any) -> Any:
    """An ASGI app that runs `serve(app, scope, receive, send)` for HTTP and passes the rest to `app`."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        await serve(app, scope, receive, send)

    return wrapped


_DISCARD_SECONDS = 10.0
_DISCARD_EXTRA_BYTES = 16 * 1024 * 1024


def _has_body(scope: Any) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False


def _request_id(scope: Any) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


async def _send_error(send: Any, kind: Kind, message: str, code: str, headers: dict[str, str] | None = None) -> None:
    status = STATUS[kind]
    body = envelope(kind, message, None, code)
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
