"""Domain errors: what went wrong and which request field it concerns, in words a client can act on.

Nothing here knows HTTP: `http/errors.py` maps each `Kind` to a status code and headers, in one place.
The wire form, OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`, is built here
because streams carry it too, as an event.
"""

from __future__ import annotations

import enum

import msgspec

from qwen_server.protocol import ErrorBody, ErrorResponse, encoder


class Kind(enum.Enum):
    """Why a request was not served."""

    INVALID = enum.auto()  # the request cannot be served as sent
    UNAUTHORIZED = enum.auto()  # no key, or a wrong one
    NOT_FOUND = enum.auto()  # a model, path or file that does not exist
    NOT_ALLOWED = enum.auto()  # a method the path does not take
    TOO_LARGE = enum.auto()  # a body or medium over its limit
    UNSUPPORTED_MEDIA_TYPE = enum.auto()  # a body that is not JSON
    OVERLOADED = enum.auto()  # at the admission limit: retry shortly
    UNAVAILABLE = enum.auto()  # loading, restarting, draining or dead: retry later
    TIMEOUT = enum.auto()  # over the server's time limit for a request
    INTERNAL = enum.auto()  # the server failed


# OpenAI's `type` for each kind.
_TYPES = {
    Kind.INVALID: "invalid_request_error",
    Kind.UNAUTHORIZED: "authentication_error",
    Kind.NOT_FOUND: "invalid_request_error",
    Kind.NOT_ALLOWED: "invalid_request_error",
    Kind.TOO_LARGE: "invalid_request_error",
    Kind.UNSUPPORTED_MEDIA_TYPE: "invalid_request_error",
    Kind.OVERLOADED: "rate_limit_error",
    Kind.UNAVAILABLE: "service_unavailable",
    Kind.TIMEOUT: "server_error",
    Kind.INTERNAL: "server_error",
}


class ServiceError(Exception):
    """An error the client is told about: its kind, the field it concerns, a machine-readable code and,
    for the kinds that pass, how many seconds to wait before retrying."""

    def __init__(
        self,
        kind: Kind,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after


_MESSAGE_LIMIT = 2000  # characters of an error message; longer ones quote client input at length
_PARAM_LIMIT = 200


def clip(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters, saying how long it was: error messages that quote client
    input must not send it back whole."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ServiceError:
    return ServiceError(Kind.INVALID, message, param=param, code=code)


def envelope(kind: Kind, message: str, param: str | None = None, code: str | None = None) -> bytes:
    """The error as OpenAI's JSON envelope, message and param cut to their limits."""
    message = clip(message, _MESSAGE_LIMIT)
    param = clip(param, _PARAM_LIMIT) if param is not None else None
    return encoder.encode(ErrorResponse(ErrorBody(message=message, type=_TYPES[kind], param=param, code=code)))


def from_validation_error(exc: msgspec.ValidationError | msgspec.DecodeError, prefix: str = "") -> ServiceError:
    """Turn msgspec's `... - at `$.messages[0].content`` into a message and a param path; `prefix`
    is the path of the part of the body that was decoded (e.g. `messages[3]`)."""
    text = str(exc)
    message, _, where = text.partition(" - at `")
    where = where.rstrip("`").removeprefix("$")  # ".content[0].text", or "" for the value itself
    param = (prefix + where if prefix else where.removeprefix(".")) or None
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return bad_request(f"Request body is not valid JSON: {text}")
    return bad_request(f"{message} (at {param})" if param else message, param=param)
