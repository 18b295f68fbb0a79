"""Liveness, readiness, metrics and version: the routes an orchestrator and a scraper call."""

from __future__ import annotations

import asyncio

from litestar import Response, get

from qwen_server import __version__, metrics
from qwen_server.engine import vllm_compat
from qwen_server.http.asgi import AnyRequest, AnyResponse
from qwen_server.http.common import engine_of, json_response


@get("/live", summary="Liveness: 200 while the process serves HTTP", opt={"auth": False, "quiet": True})
async def live() -> AnyResponse:
    return json_response({"status": "alive"})


@get(
    "/health",
    summary="Readiness: 200 when the engine is ready, else 503 with the state",
    opt={"probe": True, "quiet": True},
)
async def health(request: AnyRequest) -> AnyResponse:
    engine = engine_of(request)
    body = engine.status()
    if engine.ready:
        return json_response(body)
    return json_response(body, 503, {"Retry-After": str(engine.settings.retry_after_seconds)})


@get(
    "/metrics",
    summary="Prometheus metrics (vLLM's engine metrics under their own names)",
    opt={"probe": True, "quiet": True},
)
async def metrics_endpoint() -> AnyResponse:
    body, content_type = await asyncio.to_thread(metrics.render)
    return Response(content=body, media_type=content_type)


@get("/version", summary="Server and engine versions", opt={"auth": False})
async def version() -> AnyResponse:
    return json_response({"version": __version__, "vllm": vllm_compat.installed_version()})
