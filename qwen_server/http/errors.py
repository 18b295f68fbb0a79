"""The one mapping from domain errors to HTTP: each `Kind`'s status and headers, and the handlers
Litestar calls for a `ServiceError`, for its own exceptions and for anything unexpected."""

from __future__ import annotations

import logging

from litestar import Response
from litestar.exceptions import HTTPException

from qwen_server.errors import Kind, ServiceError, envelope
from qwen_server.http.asgi import AnyRequest, AnyResponse, Send

log = logging.getLogger("qwen_server")

STATUS = {
    Kind.INVALID: 400,
    Kind.UNAUTHORIZED: 401,
    Kind.NOT_FOUND: 404,
    Kind.NOT_ALLOWED: 405,
    Kind.TOO_LARGE: 413,
    Kind.UNSUPPORTED_MEDIA_TYPE: 415,
    Kind.OVERLOADED: 429,
    Kind.UNAVAILABLE: 503,
    Kind.TIMEOUT: 504,
    Kind.INTERNAL: 500,
}
_KINDS = {status: kind for kind, status in STATUS.items()}


def kind_of(status: int) -> Kind:
    """The kind of an error Litestar or Granian answered with a bare status."""
    return _KINDS.get(status, Kind.INTERNAL if status >= 500 else Kind.INVALID)


def headers_of(exc: ServiceError) -> dict[str, str]:
    return {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}


def json_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> AnyResponse:
    return Response(content=body, status_code=status, media_type="application/json", headers=headers)


def handle_service_error(_: AnyRequest, exc: ServiceError) -> AnyResponse:
    return json_response(STATUS[exc.kind], envelope(exc.kind, exc.message, exc.param, exc.code), headers_of(exc))


def handle_http_exception(_: AnyRequest, exc: HTTPException) -> AnyResponse:
    status = exc.status_code
    if status >= 500:
        log.error("internal error", exc_info=exc)
        return json_response(status, envelope(kind_of(status), "Internal server error."))
    message = exc.detail or "Error"
    if status == 413:
        message = f"Request body too large: {message}"
    return json_response(status, envelope(kind_of(status), message), dict(exc.headers or {}))


def handle_unexpected(_: AnyRequest, exc: Exception) -> AnyResponse:
    log.exception("unhandled error while serving a request", exc_info=exc)
    return json_response(500, envelope(Kind.INTERNAL, "Internal server error."))


exception_handlers = {
    ServiceError: handle_service_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}


async def send_error(send: Send, kind: Kind, message: str, code: str, headers: dict[str, str] | None = None) -> None:
    """The error as a whole ASGI response, for the layers that answer before Litestar's handlers run."""
    status = STATUS[kind]
    body = envelope(kind, message, None, code)
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
