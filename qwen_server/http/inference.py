"""The inference routes: decode the body, call the service, answer in JSON or SSE, and stop the
engine's work when the client hangs up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from litestar import Response
from litestar.exceptions import InternalServerException

from qwen_server import protocol as p
from qwen_server.errors import Kind, ServiceError
from qwen_server.http.asgi import AnyRequest, AnyResponse, disconnected
from qwen_server.http.common import chat_of, completion_of, inference_post, json_response
from qwen_server.http.request_log import record_of
from qwen_server.http.sse import EventStream
from qwen_server.service.generation import Endpoint, PreparedRequest

_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")
_CLIENT_GONE = "client disconnected prematurely"  # Litestar's detail for an http.disconnect mid-body


@inference_post("/v1/chat/completions", "Chat completion (OpenAI), images as image_url parts", p.ChatCompletionRequest)
async def chat_completions(request: AnyRequest) -> AnyResponse:
    return await _serve(request, chat_of(request))


@inference_post("/v1/completions", "Text completion (OpenAI)", p.CompletionRequest)
async def completions(request: AnyRequest) -> AnyResponse:
    return await _serve(request, completion_of(request))


async def _serve(request: AnyRequest, service: Endpoint) -> AnyResponse:
    prep = await service.prepare(service.decode(await read_body(request)), record_of(request.scope))
    return await _respond(request, service, prep)


async def read_body(request: AnyRequest) -> bytes:
    """The request body, which must be JSON (a form post is refused, as vLLM's server does); a body
    cut short (the client went away, or broken chunked framing, which Granian reports as a
    disconnect) is the client's error, not the server's."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type in _FORMS:
        raise ServiceError(
            Kind.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type {content_type} is not accepted: send application/json.",
            param="Content-Type",
            code="unsupported_media_type",
        )
    try:
        return await request.body()
    except InternalServerException as exc:
        if exc.detail != _CLIENT_GONE:
            raise
        raise ServiceError(
            Kind.INVALID, "The request body ended before it was complete.", param="body", code="incomplete_body"
        ) from None


async def _respond(request: AnyRequest, service: Endpoint, prep: PreparedRequest) -> AnyResponse:
    if prep.stream:
        # The stream is cancelled when the client disconnects (sse.py); the cancellation reaches
        # vLLM's generator, which aborts the request in the engine.
        frames = service.stream(prep)
        if (every := service.settings.sse_keep_alive) is not None:
            frames = keep_alive(frames, every)
        return EventStream(frames)
    result = await _unless_disconnected(request, service.complete(prep))
    if result is None:
        return Response(content=b"", status_code=499)
    return json_response(result)


KEEP_ALIVE = b": keep-alive\n\n"  # an SSE comment: clients skip it, proxies see bytes


async def keep_alive(frames: AsyncIterator[bytes], every: float) -> AsyncIterator[bytes]:
    """`frames`, with a comment frame whenever `every` seconds pass without one (a request waiting
    for the engine, a long prefill), so that proxies with idle timeouts keep the stream open. The
    frames are made by one task of their own; cancelling this generator (the client left) cancels
    it, and so the engine request."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1)  # the engine waits for a slow reader

    async def pump() -> None:
        async for frame in frames:
            await queue.put(frame)
        await queue.put(None)

    task = asyncio.ensure_future(pump())
    try:
        while True:
            try:
                async with asyncio.timeout(every):
                    frame = await queue.get()
            except TimeoutError:
                if task.done() and queue.empty():  # it failed (the stream sends its own errors as events)
                    await task
                    break
                yield KEEP_ALIVE
                continue
            if frame is None:
                break
            yield frame
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _unless_disconnected(request: AnyRequest, work: Any) -> Any:
    """Run `work`, cancelling it (and so the engine request) if the client hangs up first.
    Litestar does not cancel non-streaming handlers on disconnect; this watches `receive()`."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Cancelled ourselves (deadline, drain): the cancellation goes on after the work is stopped.
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():  # the client left first
        return None
    return task.result()
