"""The ASGI app, only DEFINED here: `granian --interface asgi qwen_server.app:app` (or the launcher) runs it.

Importing this module reads the settings from the environment and builds the Litestar app; it starts
no engine, binds no socket and imports neither torch nor vLLM. The engine starts in the lifespan.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Router
from litestar.config.cors import CORSConfig
from litestar.exceptions import MethodNotAllowedException, NotFoundException
from litestar.openapi import OpenAPIConfig

from qwen_server import __version__, drain, logs, metrics
from qwen_server import settings as settings_mod
from qwen_server.engine.lifecycle import Engine
from qwen_server.http.admission import Admission
from qwen_server.http.asgi import ASGIApp
from qwen_server.http.auth import ApiKeys
from qwen_server.http.errors import exception_handlers
from qwen_server.http.policy import RoutePolicy
from qwen_server.http.request_log import RequestLog
from qwen_server.http.routes import route_handlers
from qwen_server.media.loader import MediaLoader
from qwen_server.service.adapters import AdapterService
from qwen_server.service.chat import ChatService
from qwen_server.service.completion import CompletionService
from qwen_server.service.tokens import TokenService
from qwen_server.settings import Settings

log = logging.getLogger("qwen_server")


class App(Litestar):
    """Litestar with the request log in front of its router. Litestar runs middleware only inside a
    matched route; the log must also see what routing answers itself (404, 405, CORS preflights), so
    that every response carries X-Request-Id, is counted and gets its access line."""

    def __init__(self, request_log: RequestLog, admission: Admission, **config: Any) -> None:
        super().__init__(**config)
        self.admission = admission
        self._logged: ASGIApp = request_log.wrap(super().__call__)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._logged(scope, receive, send)


def create_app(settings: Settings | None = None, *, engine_factory: Callable[[Settings], Engine] = Engine) -> App:
    """Build the app for `settings` (default: from the QWEN_SERVER_* environment). `engine_factory`
    makes the engine in the lifespan: in-process tests hand in a fake one."""
    settings = settings or settings_mod.from_env()
    logs.configure(settings.log_level, settings.log_format)
    admission = Admission(settings)
    policy = RoutePolicy(ApiKeys(settings), admission)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        engine = engine_factory(settings)
        media = MediaLoader(settings)
        app.state.engine = engine
        admission.size_by(lambda: engine.max_num_seqs)
        app.state.chat = chat = ChatService(engine, media, settings)
        app.state.tokens = TokenService(engine, chat, settings)
        app.state.completion = CompletionService(engine, settings)
        app.state.adapters = AdapterService(engine, settings)
        app.state.started_at = time.time()
        engine.start()
        drain.arm(asyncio.get_running_loop(), lambda: _start_drain(admission, engine, settings))
        try:
            yield
        finally:
            await engine.stop()
            await media.aclose()
            metrics.worker_exited()

    return App(
        RequestLog(settings),
        admission,
        route_handlers=route_handlers,
        lifespan=[lifespan],
        middleware=[policy.middleware],
        exception_handlers={
            **exception_handlers,
            NotFoundException: policy.unmatched,
            MethodNotAllowedException: policy.unmatched,
        },
        request_max_body_size=settings.max_request_body_bytes,
        cors_config=CORSConfig(allow_origins=settings.cors_allow_origins) if settings.cors_allow_origins else None,
        # The documentation stays open (as before routes declared their policy) and out of its own schema.
        openapi_config=OpenAPIConfig(
            title="qwen_server",
            version=__version__,
            openapi_router=Router("/docs", route_handlers=[], opt={"auth": False}, include_in_schema=False),
        ),
        logging_config=None,
        debug=False,
    )


_drains: set[asyncio.Task] = set()


def _start_drain(admission: Admission, engine: Engine, settings: Settings) -> None:
    if admission.draining:
        return

    async def run() -> None:
        engine.begin_drain()
        log.info("draining: in-flight requests have %.0f s to finish", settings.drain_timeout)
        cut = await admission.drain(settings.drain_timeout)
        log.info("drained%s", f"; {cut} request(s) cut at the drain timeout" if cut else "")
        drain.report_drained()

    task = asyncio.ensure_future(run())
    _drains.add(task)  # keep a reference until it ends
    task.add_done_callback(_drains.discard)


def _app_or_exit() -> App:
    try:
        return create_app()
    except settings_mod.SettingsError as exc:
        # A worker that cannot read its settings must say so plainly, not with a traceback.
        print(f"qwen_server: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


app = _app_or_exit()
