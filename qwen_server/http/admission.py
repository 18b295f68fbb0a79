"""Admission of inference requests: a bound on those in progress (429 past it), refusal while
draining (503), and a deadline for each admitted one.

Each admitted request runs under an `asyncio.timeout`: its deadline is the request timeout, and a
drain moves it to "now" for the requests still running at the end of the drain. Cancelling the
handler aborts the engine request (vLLM's generator is cancelled); the client then gets an error
response or, if its stream had started, an error event and [DONE].
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from qwen_server import metrics
from qwen_server.errors import Kind, envelope
from qwen_server.http.asgi import ASGIApp, Receive, Scope, Send
from qwen_server.http.errors import send_error
from qwen_server.logs import RequestRecord
from qwen_server.settings import Settings

log = logging.getLogger("qwen_server")


class Admission:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.admitted = 0
        self.draining = False
        self._limit: int | None = None
        self._max_num_seqs: Callable[[], int | None] = lambda: None
        self._running: dict[asyncio.Timeout, RequestRecord] = {}

    def size_by(self, max_num_seqs: Callable[[], int | None]) -> None:
        """Where the engine's max_num_seqs comes from, once it is loaded (it sizes the default limit)."""
        self._max_num_seqs = max_num_seqs

    @property
    def limit(self) -> int | None:
        if self._limit is None:
            self._limit = self.settings.admission_limit(self._max_num_seqs())
        return self._limit

    async def run(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send, record: RequestRecord) -> None:
        """`app` for this request if it is admitted, else the refusal."""
        if self.draining:
            await self._refuse(
                send,
                Kind.UNAVAILABLE,
                "The server is shutting down; retry on another instance.",
                "draining",
                {"Retry-After": str(self.settings.retry_after_seconds)},
            )
            return
        limit = self.limit
        if limit is not None and self.admitted >= limit:
            await self._refuse(
                send,
                Kind.OVERLOADED,
                f"The server is at its limit of {limit} requests in progress; retry shortly.",
                "overloaded",
                {"Retry-After": str(self.settings.overload_retry_after_seconds)},
            )
            return
        self.admitted += 1
        try:
            await self._run_admitted(app, scope, receive, send, record)
        finally:
            self.admitted -= 1

    async def drain(self, timeout: float) -> int:
        """Refuse new inference requests, let running ones finish for up to `timeout` seconds, then
        cut the rest. Returns how many were cut."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = 0
        now = asyncio.get_running_loop().time()
        for scope_timeout, record in list(self._running.items()):
            record.cut = "drain_abort"
            scope_timeout.reschedule(now)
            cut += 1
        while self._running:  # the cut requests send their error and finish
            await asyncio.sleep(0.02)
        return cut

    async def _refuse(self, send: Send, kind: Kind, message: str, code: str, headers: dict[str, str]) -> None:
        metrics.REJECTED.labels(code).inc()
        await send_error(send, kind, message, code, headers)

    async def _run_admitted(
        self, app: ASGIApp, scope: Scope, receive: Receive, send: Send, record: RequestRecord
    ) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.settings.request_timeout
        deadline = loop.time() + timeout if timeout else None
        try:
            async with asyncio.timeout_at(deadline) as scope_timeout:
                self._running[scope_timeout] = record
                try:
                    await app(scope, receive, send)
                finally:
                    self._running.pop(scope_timeout, None)
        except TimeoutError:
            if record.finished:
                return
            reason = record.cut or "timeout"
            record.cut = reason
            metrics.REJECTED.labels(reason).inc()
            if reason == "timeout":
                kind, text = Kind.TIMEOUT, f"The request took longer than the server's limit of {timeout:g} s."
            else:
                kind, text = Kind.UNAVAILABLE, "The server is shutting down and stopped this request."
            log.warning("request %s cut: %s", record.request_id, reason)
            if record.status is not None:  # a stream: an error event, then the end of the stream
                body = b"data: " + envelope(kind, text, None, reason) + b"\n\ndata: [DONE]\n\n"
                await send({"type": "http.response.body", "body": body, "more_body": False})
            else:
                await send_error(send, kind, text, reason, {"Retry-After": str(self.settings.retry_after_seconds)})
