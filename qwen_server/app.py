"""The ASGI app, only DEFINED here: `granian --interface asgi qwen_server.app:app` (or the launcher) runs it.

Importing this module reads the settings from the environment and builds the Litestar app; it starts
no engine, binds no socket and imports neither torch nor vLLM. The engine starts in the lifespan.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.openapi import OpenAPIConfig

from qwen_server import __version__
from qwen_server import settings as settings_mod
from qwen_server.engine import Engine
from qwen_server.errors import exception_handlers
from qwen_server.media import MediaLoader
from qwen_server.routes import route_handlers
from qwen_server.service import Service
from qwen_server.settings import Settings

log = logging.getLogger("qwen_server")


def _configure_logging(level: str) -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [qwen_server] %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level.upper())


def create_app(settings: Settings | None = None) -> Litestar:
    """Build the app for `settings` (default: from the QWEN_SERVER_* environment)."""
    settings = settings or settings_mod.from_env()
    _configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        engine = Engine(settings)
        app.state.engine = engine
        media = MediaLoader(settings)
        app.state.service = Service(engine, media, settings)
        app.state.started_at = time.time()
        engine.start()
        try:
            yield
        finally:
            await engine.stop()
            await media.aclose()

    return Litestar(
        route_handlers=route_handlers,
        lifespan=[lifespan],
        exception_handlers=exception_handlers,
        request_max_body_size=settings.max_request_body_bytes,
        openapi_config=OpenAPIConfig(title="qwen_server", version=__version__, path="/docs"),
        logging_config=None,
        debug=False,
    )


def _app_or_exit() -> Litestar:
    try:
        return create_app()
    except settings_mod.SettingsError as exc:
        # A worker that cannot read its settings must say so plainly, not with a traceback.
        print(f"qwen_server: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


app = _app_or_exit()
