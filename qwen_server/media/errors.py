"""The one error of the media package: what was refused, the request field it came from, a short reason."""

from __future__ import annotations

from qwen_server.errors import Kind


class MediaError(ValueError):
    """An image the server will not use: the request field it came from and a short reason."""

    def __init__(self, message: str, param: str, reason: str, kind: Kind = Kind.INVALID) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.reason = reason
        self.kind = kind
