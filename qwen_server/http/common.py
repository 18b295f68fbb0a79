"""What the route modules share: the worker's engine and endpoint services from the app's state, and JSON answers."""

from __future__ import annotations

from typing import Any, cast

import msgspec
from litestar import Response, post
from litestar.handlers import HTTPRouteHandler

from qwen_server import protocol as p
from qwen_server.engine.lifecycle import Engine
from qwen_server.http.asgi import AnyRequest, AnyResponse
from qwen_server.http.openapi import with_json_body
from qwen_server.service.adapters import AdapterService
from qwen_server.service.chat import ChatService
from qwen_server.service.completion import CompletionService
from qwen_server.service.tokens import TokenService

JSON = "application/json"


def inference_post(path: str, summary: str, body: type[msgspec.Struct]) -> HTTPRouteHandler:
    """An inference route: a JSON POST of `body` (as documented), under the inference policy
    (admission, deadline, API key)."""
    return post(path, status_code=200, summary=summary, operation_class=with_json_body(body), opt={"inference": True})


def chat_of(request: AnyRequest) -> ChatService:
    return cast(ChatService, request.app.state.chat)


def completion_of(request: AnyRequest) -> CompletionService:
    return cast(CompletionService, request.app.state.completion)


def tokens_of(request: AnyRequest) -> TokenService:
    return cast(TokenService, request.app.state.tokens)


def adapters_of(request: AnyRequest) -> AdapterService:
    return cast(AdapterService, request.app.state.adapters)


def engine_of(request: AnyRequest) -> Engine:
    return cast(Engine, request.app.state.engine)


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> AnyResponse:
    return Response(content=p.encoder.encode(obj), status_code=status, media_type=JSON, headers=headers)
