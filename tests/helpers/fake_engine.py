"""FakeEngine: stands in for qwen_server.engine.Engine in in-process tests of the HTTP layer.

No vLLM, no model, no processes: it is ready as soon as the lifespan starts it (or stays loading
when told to), so the app's routes, edge and error envelope can be tested in milliseconds. It
serves no inference: what needs the engine's tokens is tested against the real one elsewhere.
"""

from __future__ import annotations

from typing import Any

from qwen_server.engine.adapters import Adapters
from qwen_server.engine.lifecycle import EngineState
from qwen_server.errors import Kind, ServiceError
from qwen_server.settings import Settings


class FakeEngine:
    """The parts of Engine the app, the edge and the routes use, with fixed answers."""

    ready_on_start = True  # set to False on a subclass for an engine that stays loading

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = EngineState.LOADING
        self.stage = "waiting to start"
        self.client: Any = None
        self.tokenizer: Any = None
        self.max_model_len: int | None = 2048
        self.sampling_defaults: dict[str, Any] = {}
        self.max_num_seqs: int | None = 4
        self.model_path: str | None = "fake-model"
        self.image_geometry: Any = None
        self.video_geometry: Any = None
        self.model_config: Any = None
        self.chat_template: str | None = None
        self.output_parser: type | None = None
        self.adapters = Adapters(settings)  # the real registry: none unless the settings name some
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True
        if self.ready_on_start:
            self.state = EngineState.READY

    async def stop(self) -> None:
        self.begin_drain()
        self.stopped = True

    def begin_drain(self) -> None:
        self.state = EngineState.DRAINING

    @property
    def ready(self) -> bool:
        return self.state is EngineState.READY

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.state.value}
        if self.state is EngineState.LOADING:
            body["stage"] = self.stage
        return body

    def require_client(self) -> Any:
        if self.ready:
            return self
        raise ServiceError(
            Kind.UNAVAILABLE,
            f"The model is loading ({self.stage}); retry shortly.",
            code="loading",
            retry_after=self.settings.retry_after_seconds,
        )
