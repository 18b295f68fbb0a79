"""The model list and cards (OpenAI's /v1/models), adapters included, and vLLM's routes that load and
unload LoRA adapters at run time (the API key's, never inference: no admission, no deadline)."""

from __future__ import annotations

from litestar import Response, get, post

from qwen_server import protocol as p
from qwen_server.errors import Kind, ServiceError, clip
from qwen_server.http.asgi import AnyRequest, AnyResponse
from qwen_server.http.common import adapters_of, json_response
from qwen_server.http.inference import read_body
from qwen_server.http.openapi import with_json_body


@get("/v1/models", summary="Models served; 503 until the engine is ready")
async def models(request: AnyRequest) -> AnyResponse:
    return json_response(p.ModelList(data=_model_cards(request)))


@get("/v1/models/{model_id:path}", summary="One served model's card; 404 model_not_found for others")
async def model(request: AnyRequest) -> AnyResponse:
    model_id = str(request.path_params["model_id"]).removeprefix("/")  # ids may hold a '/' (org/name)
    for card in _model_cards(request):
        if card.id == model_id:
            return json_response(card)
    raise ServiceError(
        Kind.NOT_FOUND, f"The model {clip(repr(model_id))} does not exist.", param="model", code="model_not_found"
    )


def _model_cards(request: AnyRequest) -> list[p.ModelCard]:
    return adapters_of(request).cards(int(request.app.state.started_at))


@post(
    "/v1/load_lora_adapter",
    status_code=200,
    summary="Load a LoRA adapter from --allowed-lora-path (vLLM's route; needs --allow-runtime-lora-updating)",
    operation_class=with_json_body(p.LoadLoRAAdapterRequest),
    opt={"auth": True},  # the API key, always (the setting refuses to start without one)
)
async def load_lora_adapter(request: AnyRequest) -> AnyResponse:
    return _text(await adapters_of(request).load(await read_body(request)))


@post(
    "/v1/unload_lora_adapter",
    status_code=200,
    summary="Unload a LoRA adapter loaded at run time (vLLM's route)",
    operation_class=with_json_body(p.UnloadLoRAAdapterRequest),
    opt={"auth": True},
)
async def unload_lora_adapter(request: AnyRequest) -> AnyResponse:
    return _text(await adapters_of(request).unload(await read_body(request)))


def _text(message: str) -> AnyResponse:
    """vLLM answers these routes with plain text."""
    return Response(content=message.encode(), status_code=200, media_type="text/plain")
