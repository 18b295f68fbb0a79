"""The model list and cards (OpenAI's /v1/models)."""

from __future__ import annotations

from litestar import get

from qwen_server import protocol as p
from qwen_server.errors import Kind, ServiceError, clip
from qwen_server.http.asgi import AnyRequest, AnyResponse
from qwen_server.http.common import engine_of, json_response


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
    engine = engine_of(request)
    # 503 until the engine is ready, as for inference: clients commonly wait for this endpoint to answer
    # before sending work (vLLM's server does not listen until then), and max_model_len is unknown before.
    engine.require_client()
    created = int(request.app.state.started_at)
    root = engine.model_path or engine.settings.model or ""
    return [
        p.ModelCard(id=name, created=created, max_model_len=engine.max_model_len, root=root)
        for name in engine.settings.model_names
    ]
