"""The SSE response of the inference routes: Litestar's `Stream` with a lighter body sender.

Litestar's streaming response runs the frames in an anyio task group beside a disconnect listener,
and after the last frame waits for the server's `http.disconnect` before it returns; it also ends
every stream with an empty body event of its own. Here the frames are sent from the handler's own
task, a plain asyncio task watches `receive()` and cancels that task when the client hangs up (the
cancellation reaches vLLM's generator, which aborts the request in the engine), and the frame that
ends the stream goes out as the last body event. About a third of the sender's cost per stream
(benchmarks/results/2026-12-03-sse/sender_micro.py). Status, headers and cookies stay Litestar's.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable
from typing import Any

from litestar import Response
from litestar.response.base import ASGIResponse

from qwen_server.http.asgi import Receive, Send, disconnected
from qwen_server.service.generation import DONE

MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStream(Response[bytes]):
    """A 200 `text/event-stream` of `frames` (bytes, each one or more whole SSE events); a frame
    that ends with `data: [DONE]` ends the stream."""

    def __init__(self, frames: AsyncIterator[bytes]) -> None:
        super().__init__(content=b"", media_type=MEDIA_TYPE, headers=HEADERS)
        self.frames = frames

    def to_asgi_response(
        self,
        app: Any,
        request: Any,
        *,
        background: Any = None,
        cookies: Iterable[Any] | None = None,
        encoded_headers: Iterable[tuple[bytes, bytes]] | None = None,
        headers: dict[str, str] | None = None,
        is_head_response: bool = False,
        media_type: Any = None,
        status_code: int | None = None,
        type_encoders: Any = None,
    ) -> ASGIResponse:
        return _Sender(
            self.frames,
            background=self.background or background,
            cookies=self.cookies if cookies is None else itertools.chain(self.cookies, cookies),
            encoded_headers=encoded_headers,
            headers={**headers, **self.headers} if headers is not None else self.headers,
            is_head_response=is_head_response,
            media_type=MEDIA_TYPE,
            status_code=self.status_code or status_code,
        )


class _Sender(ASGIResponse):
    __slots__ = ("frames",)
    _should_set_content_length = False

    def __init__(self, frames: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.frames = frames

    async def send_body(self, send: Send, receive: Receive) -> None:
        await send_frames(self.frames, send, receive)


async def send_frames(frames: AsyncIterator[bytes], send: Send, receive: Receive) -> None:
    """Send `frames` as the response body until they end or the client leaves. A client that leaves
    cancels the frames (the engine request with them) and this returns; a cancellation from outside
    (the request's deadline, a drain) goes on up."""
    task = asyncio.current_task()
    assert task is not None
    left = False

    async def watch() -> None:
        nonlocal left
        await disconnected(receive)
        left = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    ended = False
    try:
        async for frame in frames:
            if ended:  # nothing goes out after the end
                continue
            ended = frame.endswith(DONE)
            await send({"type": "http.response.body", "body": frame, "more_body": not ended})
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if left and task.uncancel() == 0:  # only the client's leaving: nothing more to send
            return
        raise
    finally:
        watcher.cancel()
