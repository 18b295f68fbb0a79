"""HTTP only: decode the body, call the service, pick the response type, watch for disconnects.

Each route declares its edge policy in `opt` (see edge.py): inference, open, probe, quiet. A route
that declares nothing needs the API key and is logged at info."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from litestar import Request, Response, get, post
from litestar.exceptions import InternalServerException
from litestar.response import Stream

from qwen_server import __version__, metrics
from qwen_server.engine import vllm_compat
from qwen_server import protocol as p
from qwen_server.http.edge import Exchange, exchange_of
from qwen_server.engine.lifecycle import Engine
from qwen_server.errors import Kind, ServiceError, clip
from qwen_server.http.openapi import with_json_body
from qwen_server.service.chat_and_completion import Prepared, Service, decode, decode_chat

_JSON = "application/json"
_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")
_CLIENT_GONE = "client disconnected prematurely"  # Litestar's detail for an http.disconnect mid-body
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _service(request: Request) -> Service:
    return request.app.state.service


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _exchange(request: Request) -> Exchange:
    # Set by the edge for every request; a bare app without it (unit tests) gets a fresh one.
    return exchange_of(request.scope) or Exchange(uuid.uuid4().hex)


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(content=p.encoder.encode(obj), status_code=status, media_type=_JSON, headers=headers)


@post(
    "/v1/chat/completions",
    status_code=200,
    summary="Chat completion (OpenAI), images as image_url parts",
    operation_class=with_json_body(p.ChatCompletionRequest),
    opt={"inference": True},
)
async def chat_completions(request: Request) -> Response:
    service = _service(request)
    req = decode_chat(await _body(request), service.settings)
    return await _respond(request, service, await service.prepare_chat(req, _exchange(request)))


@post(
    "/v1/completions",
    status_code=200,
    summary="Text completion (OpenAI)",
    operation_class=with_json_body(p.CompletionRequest),
    opt={"inference": True},
)
async def completions(request: Request) -> Response:
    service = _service(request)
    req = decode(p.completion_request_decoder, await _body(request), service.settings.max_json_depth)
    return await _respond(request, service, await service.prepare_completion(req, _exchange(request)))


async def _body(request: Request) -> bytes:
    """The request body, which must be JSON (a form post is refused, as vLLM's server does); a body
    cut short (the client went away, or broken chunked framing, which Granian reports as a
    disconnect) is the client's error, not the server's."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type in _FORMS:
        raise ServiceError(Kind.UNSUPPORTED_MEDIA_TYPE, f"Content-Type {content_type} is not accepted: send application/json.",
                       param="Content-Type", code="unsupported_media_type")
    try:
        return await request.body()
    except InternalServerException as exc:
        if exc.detail != _CLIENT_GONE:
            raise
        raise ServiceError(Kind.INVALID, "The request body ended before it was complete.", param="body", code="incomplete_body") from None


async def _respond(request: Request, service: Service, prep: Prepared) -> Response:
    if prep.stream:
        # Litestar cancels the stream when the client disconnects; the cancellation reaches
        # vLLM's generator, which aborts the request in the engine.
        return Stream(service.stream(prep), media_type="text/event-stream", headers=_SSE_HEADERS)
    result = await _unless_disconnected(request, service.complete(prep))
    if result is None:
        return Response(content=b"", status_code=499)
    return _json(result)


async def _unless_disconnected(request: Request, work: Any) -> Any:
    """Run `work`, cancelling it (and so the engine request) if the client hangs up first.
    Litestar does not cancel non-streaming handlers on disconnect; this watches `receive()`."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
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


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@get("/v1/models", summary="Models served; 503 until the engine is ready")
async def models(request: Request) -> Response:
    return _json(p.ModelList(data=_model_cards(request)))


@get("/v1/models/{model_id:path}", summary="One served model's card; 404 model_not_found for others")
async def model(request: Request) -> Response:
    model_id = str(request.path_params["model_id"]).removeprefix("/")  # ids may hold a '/' (org/name)
    for card in _model_cards(request):
        if card.id == model_id:
            return _json(card)
    raise ServiceError(Kind.NOT_FOUND, f"The model {clip(repr(model_id))} does not exist.", param="model", code="model_not_found")


def _model_cards(request: Request) -> list[p.ModelCard]:
    engine = _engine(request)
    # 503 until the engine is ready, as for inference: clients commonly wait for this endpoint to answer
    # before sending work (vLLM's server does not listen until then), and max_model_len is unknown before.
    engine.ready_client()
    created = int(request.app.state.started_at)
    root = engine.model_path or engine.settings.model or ""
    return [
        p.ModelCard(id=name, created=created, max_model_len=engine.max_model_len, root=root)
        for name in engine.settings.model_names
    ]


@get("/live", summary="Liveness: 200 while the process serves HTTP", opt={"auth": False, "quiet": True})
async def live() -> Response:
    return _json({"status": "alive"})


@get("/health", summary="Readiness: 200 when the engine is ready, else 503 with the state",
     opt={"probe": True, "quiet": True})
async def health(request: Request) -> Response:
    engine = _engine(request)
    body = engine.status()
    if engine.ready:
        return _json(body)
    return _json(body, 503, {"Retry-After": str(engine.settings.retry_after_seconds)})


@get("/metrics", summary="Prometheus metrics (vLLM's engine metrics under their own names)",
     opt={"probe": True, "quiet": True})
async def metrics_endpoint() -> Response:
    body, content_type = await asyncio.to_thread(metrics.render)
    return Response(content=body, media_type=content_type)


@get("/version", summary="Server and engine versions", opt={"auth": False})
async def version() -> Response:
    return _json({"version": __version__, "vllm": vllm_compat.installed_version()})


route_handlers = [chat_completions, completions, models, model, live, health, metrics_endpoint, version]
