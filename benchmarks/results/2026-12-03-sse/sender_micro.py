"""CPU per streamed response of the body sender alone: Litestar's ASGIStreamingResponse against
qwen_server.http.sse.send_frames, 16 concurrent streams, a fake ASGI peer (send records nothing;
receive reports the disconnect once the body is complete, as Granian does), uvloop.

Run: .venv/bin/python benchmarks/results/2026-12-03-sse/sender_micro.py
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvloop
from litestar.response.streaming import ASGIStreamingResponse

from qwen_server.http.sse import send_frames

EVENT = b"data: " + b"x" * 200 + b"\n\n"
DONE = b"data: [DONE]\n\n"


async def frames(writes: list[bytes]) -> AsyncIterator[bytes]:
    for w in writes:
        await asyncio.sleep(0)  # a new engine output each time
        yield w


def peer() -> tuple[Callable[[], Awaitable[dict[str, Any]]], Callable[[dict[str, Any]], Awaitable[None]]]:
    complete = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await complete.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if not message.get("more_body"):
            complete.set()

    return receive, send


async def litestar(writes: list[bytes]) -> None:
    receive, send = peer()
    await ASGIStreamingResponse(iterator=frames(writes), media_type="text/event-stream").send_body(send, receive)  # type: ignore[arg-type]


async def ours(writes: list[bytes]) -> None:
    receive, send = peer()
    await send_frames(frames(writes), send, receive)


async def main() -> None:
    per_event = [EVENT] * 18 + [DONE]  # before: opening, 16 tokens, [DONE], and Litestar's empty end
    per_output = [EVENT * 2] + [EVENT] * 14 + [EVENT + DONE]  # now: one write per engine output
    n = 1600
    for _ in range(2):
        for name, sender, writes in [
            ("litestar Stream, a write per event", litestar, per_event),
            ("sse.send_frames, a write per event", ours, per_event),
            ("sse.send_frames, a write per output", ours, per_output),
        ]:
            t = time.process_time()
            for _ in range(n // 16):
                await asyncio.gather(*(sender(writes) for _ in range(16)))
            print(f"{name}: {(time.process_time() - t) / n * 1e6:.0f} us per stream")


if __name__ == "__main__":
    uvloop.run(main())
