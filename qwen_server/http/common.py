"""What the route modules share: the worker's engine and services from the app's state, and JSON answers."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response

from qwen_server import protocol as p
from qwen_server.engine.lifecycle import Engine
from qwen_server.service.chat_and_completion import Service

JSON = "application/json"


def service_of(request: Request) -> Service:
    return request.app.state.service


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(content=p.encoder.encode(obj), status_code=status, media_type=JSON, headers=headers)
