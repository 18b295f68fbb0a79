"""Route policy, declared on each route in Litestar's per-handler `opt` and applied before its handler
reads the body (so a refused request costs no image fetch or decode); nothing here lists paths:

- `opt={"inference": True}`: admission (429 beyond the limit, 503 while draining) and a deadline;
- `opt={"auth": False}`: never asks for the API key;
- `opt={"probe": True}`: asks for the key only with `--protect-probes` (readiness, metrics);
- `opt={"quiet": True}`: its access line is logged at debug (probes and scrapes).

A route that declares nothing needs the key (when keys are configured), is not inference, and is
logged at info. A request that matched no route (404, 405) is held to that default: without a valid
key it gets 401, whatever the path, so a client without a key cannot tell which paths exist.
"""

from __future__ import annotations

from litestar.exceptions import HTTPException

from qwen_server import metrics
from qwen_server.errors import Kind, envelope
from qwen_server.http.admission import Admission
from qwen_server.http.asgi import AnyRequest, AnyResponse, ASGIApp, Receive, Scope, Send, http_only
from qwen_server.http.auth import CHALLENGE, UNAUTHORIZED, ApiKeys
from qwen_server.http.errors import handle_http_exception, json_response, send_error
from qwen_server.http.request_log import record_of, route_opt


class RoutePolicy:
    """`middleware`: what Litestar wraps around each matched route; `unmatched`: Litestar's handler
    for the requests no route matched."""

    def __init__(self, keys: ApiKeys, admission: Admission) -> None:
        self.keys = keys
        self.admission = admission

    def middleware(self, app: ASGIApp) -> ASGIApp:
        return http_only(app, self._apply)

    async def _apply(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        opt = route_opt(scope)
        if self.keys.needs_key(opt, scope["method"]) and not self.keys.authorized(scope):
            metrics.REJECTED.labels("unauthorized").inc()
            await send_error(send, Kind.UNAUTHORIZED, UNAUTHORIZED, "unauthorized", CHALLENGE)
            return
        if not opt.get("inference"):
            await app(scope, receive, send)
            return
        await self.admission.run(app, scope, receive, send, record_of(scope))

    def unmatched(self, request: AnyRequest, exc: HTTPException) -> AnyResponse:
        """404 and 405: a request that matched no route is held to the default policy (the key, when
        keys are configured) before it learns the path is unknown."""
        scope = request.scope
        if (
            "route_handler" not in scope
            and self.keys.needs_key({}, scope["method"])
            and not self.keys.authorized(scope)
        ):
            metrics.REJECTED.labels("unauthorized").inc()
            return json_response(401, envelope(Kind.UNAUTHORIZED, UNAUTHORIZED, None, "unauthorized"), CHALLENGE)
        return handle_http_exception(request, exc)
