"""A bare ASGI app: 16 SSE-sized chunks per request, GAP seconds apart (tokens at c1)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

GAP = float(os.environ.get("GAP", "0.004"))
CHUNK = b"data: " + b"x" * 200 + b"\n\n"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for i in range(16):
        if GAP:
            await asyncio.sleep(GAP)
        await send({"type": "http.response.body", "body": CHUNK, "more_body": i < 15})
