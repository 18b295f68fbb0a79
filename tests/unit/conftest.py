"""In-process tests of the real app (qwen_server.app.create_app) on a FakeEngine: no vLLM, no server.

`serve(settings, *extra_routes)` starts the app's lifespan under Litestar's AsyncTestClient and
yields the app and the client. The lifespan's drain arming is captured instead of installing a
process-wide SIGUSR1 handler (which also only works on the main thread, and the test client runs
the lifespan on another); `drain_signal()` delivers the captured one.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest
from litestar.testing import AsyncTestClient
from prometheus_client import REGISTRY

from qwen_server import drain, logs
from qwen_server.app import App, create_app
from qwen_server.settings import Settings
from tests.helpers.fake_engine import FakeEngine


class Served:
    def __init__(self, app: App, client: AsyncTestClient, on_drain: list[Callable[[], None]]) -> None:
        self.app = app
        self.client = client
        self._on_drain = on_drain

    def drain_signal(self) -> None:
        """What the launcher's SIGUSR1 does to this worker."""
        (handler,) = self._on_drain
        handler()


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch):
    on_drain: list[Callable[[], None]] = []
    monkeypatch.setattr(drain, "arm", lambda loop, handler: on_drain.append(handler))

    @asynccontextmanager
    async def serving(settings: Settings, *extra_routes, engine_factory=FakeEngine) -> AsyncIterator[Served]:
        app = create_app(settings, engine_factory=engine_factory)
        for route in extra_routes:
            app.register(route)
        async with AsyncTestClient(app) as client:
            yield Served(app, client, on_drain)

    return serving


class AccessLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def levels(self, line: str) -> list[str]:
        """The levels of the access lines whose message is `line` (e.g. "GET /live 200")."""
        return [r.levelname for r in self.records if r.getMessage() == line]


@pytest.fixture
def access_lines() -> Iterator[AccessLines]:
    handler = AccessLines()
    logs.ACCESS.addHandler(handler)
    try:
        yield handler
    finally:
        logs.ACCESS.removeHandler(handler)


def counted(method: str, route: str, status: int) -> float:
    """qwen_server_http_requests_total for these labels (metrics are process-wide: compare deltas)."""
    value = REGISTRY.get_sample_value(
        "qwen_server_http_requests_total", {"method": method, "route": route, "status": str(status)}
    )
    return value or 0.0
