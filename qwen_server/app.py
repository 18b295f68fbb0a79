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
from qwen_server.http.edge import Edge
from qwen_server.engine.lifecycle import Engine
from qwen_server.http.errors import exception_handlers
from qwen_server.media.loader import MediaLoader
from qwen_server.http.routes import route_handlers
from qwen_server.service.chat_and_completion import Service
from qwen_server.settings import Settings

log = logging.getLogger("qwen_server")


class App(Litestar):
    """Litestar with the edge in front of its router. Litestar runs middleware only inside a matched
    route; the edge must also see what routing answers itself (404, 405, CORS preflights), so that
    every response carries X-Request-Id, is counted and gets its access line."""

    def __init__(self, edge: Edge, **config: Any) -> None:
        super().__init__(**config)
        self.edge = edge
        self._edged = edge.wrap(super().__call__)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._edged(scope, receive, send)


def create_app(settings: Settings | None = None, *, engine_factory: Callable[[Settings], Engine] = Engine) -> App:
    """Build the app for `settings` (default: from the QWEN_SERVER_* environment). `engine_factory`
    makes the engine in the lifespan: in-process tests hand in a fake one."""
    settings = settings or settings_mod.from_env()
    logs.configure(settings.log_level, settings.log_format)
    edge = Edge(settings)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        engine = engine_factory(settings)
        media = MediaLoader(settings)
        app.state.engine = engine
        edge.engine = engine
        app.state.service = Service(engine, media, settings)
        app.state.started_at = time.time()
        engine.start()
        drain.arm(asyncio.get_running_loop(), lambda: _start_drain(edge, engine, settings))
        try:
            yield
        finally:
            await engine.stop()
            await media.aclose()
            metrics.worker_exited()

    return App(
        edge,
        route_handlers=route_handlers,
        lifespan=[lifespan],
        middleware=[edge.middleware],
        exception_handlers={
            **exception_handlers, NotFoundException: edge.unmatched, MethodNotAllowedException: edge.unmatched,
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


def _start_drain(edge: Edge, engine: Engine, settings: Settings) -> None:
    if edge.draining:
        return

    async def run() -> None:
        engine.begin_drain()
        log.info("draining: in-flight requests have %.0f s to finish", settings.drain_timeout)
        cut = await edge.drain(settings.drain_timeout)
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
