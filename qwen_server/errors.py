"""Every error leaves the server in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from qwen_server.protocol import ErrorBody, ErrorResponse, encoder

log = logging.getLogger("qwen_server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error the client is told about, with the status and the field it concerns."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


_MESSAGE_LIMIT = 2000  # characters of an error message; longer ones quote client input at length
_PARAM_LIMIT = 200


def clip(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters, saying how long it was: error messages that quote client
    input must not send it back whole (a 1 MB model name came back in its 404)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def envelope(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    error_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    message = clip(message, _MESSAGE_LIMIT)
    param = clip(param, _PARAM_LIMIT) if param is not None else None
    return encoder.encode(ErrorResponse(ErrorBody(message=message, type=error_type, param=param, code=code)))


def _response(status: int, body: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(content=body, status_code=status, media_type="application/json", headers=headers)


def from_validation_error(exc: msgspec.ValidationError | msgspec.DecodeError, prefix: str = "") -> APIError:
    """Turn msgspec's `... - at `$.messages[0].content`` into a message and a param path; `prefix`
    is the path of the part of the body that was decoded (e.g. `messages[3]`)."""
    text = str(exc)
    message, _, where = text.partition(" - at `")
    where = where.rstrip("`").removeprefix("$")  # ".content[0].text", or "" for the value itself
    param = (prefix + where if prefix else where.removeprefix(".")) or None
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return bad_request(f"Request body is not valid JSON: {text}")
    return bad_request(f"{message} (at {param})" if param else message, param=param)


def handle_api_error(_: Request, exc: APIError) -> Response:
    return _response(exc.status, envelope(exc.status, exc.message, exc.param, exc.code), exc.headers)


def handle_http_exception(_: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    if status >= 500:
        log.error("internal error", exc_info=exc)
        return _response(status, envelope(status, "Internal server error."))
    headers = dict(exc.headers or {})
    message = exc.detail or "Error"
    if status == 413:
        message = f"Request body too large: {message}"
    return _response(status, envelope(status, message), headers)


def handle_unexpected(_: Request, exc: Exception) -> Response:
    log.exception("unhandled error while serving a request", exc_info=exc)
    return _response(500, envelope(500, "Internal server error."))


exception_handlers = {
    APIError: handle_api_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
