"""The HTTP edge in front of every route: request IDs, API keys, admission control, deadlines,
drain, metrics and the access log.

Admission is decided here, before the body is read, so a refused request costs no image fetch or
decode. Each admitted inference request runs under an `asyncio.timeout`: its deadline is the
request timeout, and drain moves it to "now" for the requests still running at the end of the
drain. Cancelling the handler aborts the engine request (vLLM's generator is cancelled); the
client then gets an error response, or, if its stream had started, an error event and [DONE].
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

from qwen_server import logs, metrics
from qwen_server.errors import envelope
from qwen_server.settings import Settings

log = logging.getLogger("qwen_server")

EXCHANGE = "qwen_server.exchange"  # ASGI scope key of the request's Exchange
INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_PROBES = frozenset({"/health", "/metrics"})
_QUIET = frozenset({"/live", "/health", "/metrics"})  # logged at debug: probes and scrapes
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces


@dataclass(slots=True)
class Exchange:
    """One request as the access log and metrics see it; the service fills in the counts."""

    request_id: str
    images: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cut: str | None = None  # why the edge ended it early: "timeout" or "drain_abort"


def exchange_of(scope: Any) -> Exchange | None:
    return scope.get(EXCHANGE)


def load_keys(settings: Settings) -> tuple[bytes, ...]:
    keys = list(settings.api_key or ())
    if settings.api_key_file:
        for line in Path(settings.api_key_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return tuple(k.encode() for k in keys)


class Edge:
    """Per-worker state of the edge; `middleware` is what Litestar wraps around the routes."""

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

    # --- the middleware ---

    def middleware(self, app: Any) -> Any:
        async def edge(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            await self._serve(app, scope, receive, send)

        return edge

    async def _serve(self, app: Any, scope: Any, receive: Any, send: Any) -> None:
        t0 = time.perf_counter()
        path, method = scope["path"], scope["method"]
        exchange = Exchange(_request_id(scope))
        scope[EXCHANGE] = exchange
        status = 500
        started = finished = False
        rid_header = (b"x-request-id", exchange.request_id.encode())

        async def send_wrapper(message: Any) -> None:
            nonlocal status, started, finished
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                message = {**message, "headers": [*message.get("headers", ()), rid_header]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        async def refuse(code: int, message: str, err: str, headers: dict[str, str] | None = None) -> None:
            metrics.REJECTED.labels(err).inc()
            await _send_error(send_wrapper, code, message, err, headers)

        metrics.HTTP_IN_FLIGHT.inc()
        admitted = False
        try:
            if self._needs_key(path, method) and not self._authorized(scope):
                await refuse(401, "Missing or invalid API key: send Authorization: Bearer <key>.", "unauthorized",
                             {"WWW-Authenticate": "Bearer"})
                return
            if path in INFERENCE_PATHS and method == "POST":
                retry = str(self.settings.retry_after_seconds)
                if self.draining:
                    await refuse(503, "The server is shutting down; retry on another instance.", "draining",
                                 {"Retry-After": retry})
                    return
                limit = self._limit()
                if limit is not None and self.admitted >= limit:
                    await refuse(429, f"The server is at its limit of {limit} requests in progress; retry shortly.",
                                 "overloaded", {"Retry-After": "1"})
                    return
                admitted = True
                self.admitted += 1
                await self._run_admitted(app, scope, receive, send_wrapper, exchange, lambda: (started, finished))
            else:
                await app(scope, receive, send_wrapper)
        finally:
            if admitted:
                self.admitted -= 1
            metrics.HTTP_IN_FLIGHT.dec()
            elapsed = time.perf_counter() - t0
            route = path if path in _ROUTES else "other"
            metrics.HTTP_REQUESTS.labels(method, route, str(status)).inc()
            metrics.HTTP_LATENCY.labels(method, route).observe(elapsed)
            (logs.ACCESS.debug if path in _QUIET else logs.ACCESS.info)(
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

    async def _run_admitted(self, app: Any, scope: Any, receive: Any, send: Any, exchange: Exchange,
                            progress: Any) -> None:
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
            started, finished = progress()
            if finished:
                return
            reason = exchange.cut or "timeout"
            exchange.cut = reason
            metrics.REJECTED.labels(reason).inc()
            if reason == "timeout":
                code, text = 504, f"The request took longer than the server's limit of {self.settings.request_timeout:g} s."
            else:
                code, text = 503, "The server is shutting down and stopped this request."
            log.warning("request %s cut: %s", exchange.request_id, reason)
            if started:  # a stream: an error event, then the end of the stream
                body = b"data: " + envelope(code, text, None, reason) + b"\n\ndata: [DONE]\n\n"
                await send({"type": "http.response.body", "body": body, "more_body": False})
            else:
                await _send_error(send, code, text, reason, {"Retry-After": str(self.settings.retry_after_seconds)})

    def _limit(self) -> int | None:
        if self.limit is None and self.engine is not None and self.engine.max_num_seqs:
            self.limit = 4 * self.engine.max_num_seqs
        return self.limit

    def _needs_key(self, path: str, method: str) -> bool:
        if not self.keys or method == "OPTIONS":  # CORS preflights carry no credentials
            return False
        return path.startswith("/v1/") or (self.settings.protect_probes and path in _PROBES)

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


_ROUTES = frozenset({*INFERENCE_PATHS, "/v1/models", "/live", "/health", "/version", "/metrics", "/docs"})


def _request_id(scope: Any) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


async def _send_error(send: Any, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
    body = envelope(status, message, None, code)
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
