"""API keys: which requests need one (from the route's declared policy) and whether it was sent."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

from qwen_server.http.asgi import Scope
from qwen_server.settings import Settings

UNAUTHORIZED = "Missing or invalid API key: send Authorization: Bearer <key>."
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def load_keys(settings: Settings) -> tuple[bytes, ...]:
    keys = list(settings.api_key or ())
    if settings.api_key_file:
        for line in Path(settings.api_key_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return tuple(k.encode() for k in keys)


class ApiKeys:
    def __init__(self, settings: Settings) -> None:
        self.keys = load_keys(settings)
        self.protect_probes = settings.protect_probes

    def needs_key(self, opt: dict[str, Any], method: str) -> bool:
        """A route that declares nothing needs the key: a new endpoint cannot fail open."""
        if not self.keys or method == "OPTIONS":  # CORS preflights carry no credentials
            return False
        if opt.get("probe"):
            return self.protect_probes
        return bool(opt.get("auth", True))

    def authorized(self, scope: Scope) -> bool:
        token = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    token = b""
                break
        token = token.strip()
        # Every key is compared, in constant time, whichever matches.
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(token, key)
        return matched
