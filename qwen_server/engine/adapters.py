"""The LoRA adapters this worker serves on the engine's base model: the ones named at start
(--lora-modules), and those loaded at run time (/v1/load_lora_adapter). Each is a vLLM LoRARequest
that a request naming it in `model` carries to the engine.

vLLM's engine caches adapters by their integer id, across every client it has: an id must never
name two adapters in the engine's life. Start-time adapters get 1..N in the order given (the same
in every worker and after a reload); run-time ones a random id above those (a reloaded worker
cannot know which ids the engine has seen).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from dataclasses import dataclass
from typing import Any

from qwen_server.engine import vllm_compat
from qwen_server.errors import Kind, ServiceError, bad_request, clip
from qwen_server.settings import Settings

log = logging.getLogger("qwen_server")

_RUNTIME_IDS = 1 << 20  # run-time ids are drawn above this, start-time ones are below


@dataclass(slots=True, frozen=True)
class Adapter:
    name: str
    path: str
    parent: str  # the served base model name it runs on
    request: Any  # vLLM's LoRARequest
    runtime: bool


class Adapters:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._by_name: dict[str, Adapter] = {}
        self._lock = asyncio.Lock()
        root = settings.allowed_lora_path
        self._root = os.path.realpath(root) if root else None
        base = settings.model_names[0]
        for lora_id, spec in enumerate(settings.static_adapters(), start=1):
            parent = spec.base_model_name or base
            request = vllm_compat.lora_request(spec.name, lora_id, spec.path, parent)
            self._by_name[spec.name] = Adapter(spec.name, spec.path, parent, request, runtime=False)

    def __len__(self) -> int:
        return len(self._by_name)

    def all(self) -> list[Adapter]:
        return list(self._by_name.values())

    def get(self, name: str) -> Adapter | None:
        return self._by_name.get(name)

    async def preload(self, client: Any) -> None:
        """The start-time adapters loaded into the engine: a bad one stops the start, with its name."""
        for adapter in self.all():
            try:
                await vllm_compat.add_lora(client, adapter.request)
            except Exception as exc:
                raise RuntimeError(
                    f"the LoRA adapter {adapter.name!r} ({adapter.path}) could not be loaded: {clip(str(exc), 300)}"
                ) from exc

    def _require_runtime(self, doing: str) -> str:
        """The allowed adapter directory, when run-time updating is on (the settings require both)."""
        if not self.settings.allow_runtime_lora_updating or self._root is None:
            raise ServiceError(
                Kind.NOT_FOUND,
                f"{doing} adapters at run time is not enabled on this server (--allow-runtime-lora-updating).",
                code="not_enabled",
            )
        return self._root

    async def load(self, client: Any, name: str, path: str, inplace: bool) -> Adapter:
        """A run-time adapter from the allowed directory, loaded into the engine before it is listed.
        `inplace`: a run-time adapter of that name is replaced (with a new engine id: fresh weights)."""
        root = self._require_runtime("Loading")
        if name in self.settings.model_names:
            raise bad_request(f"The name {clip(repr(name))} is the base model's.", "lora_name")
        real = os.path.realpath(os.path.join(root, path))  # an absolute path replaces the root
        if os.path.commonpath([real, root]) != root:
            raise bad_request("lora_path is outside the allowed adapter directory.", "lora_path", code="forbidden_path")
        if not os.path.isdir(real):
            raise bad_request("lora_path is not a directory of the allowed adapter directory.", "lora_path")
        async with self._lock:
            current = self._by_name.get(name)
            if current is not None and not inplace:
                raise bad_request(
                    f"The adapter {clip(repr(name))} is already loaded; send load_inplace: true to replace it.",
                    "lora_name",
                )
            if current is not None and not current.runtime:
                raise bad_request(
                    f"The adapter {clip(repr(name))} was named at start; it cannot be replaced.", "lora_name"
                )
            parent = self.settings.model_names[0]
            request = vllm_compat.lora_request(name, _RUNTIME_IDS + secrets.randbelow(1 << 30), real, parent)
            try:
                await vllm_compat.add_lora(client, request)
            except Exception as exc:  # noqa: BLE001 - vLLM's loader refused these files: the client's input
                log.info("LoRA adapter %r refused: %s: %s", name, type(exc).__name__, clip(str(exc), 300))
                raise bad_request(
                    f"The adapter could not be loaded: {clip(str(exc), 300)}", "lora_path", code="invalid_lora_adapter"
                ) from None
            adapter = Adapter(name, real, parent, request, runtime=True)
            self._by_name[name] = adapter
            log.info("LoRA adapter %r loaded from %s", name, real)
            return adapter

    async def unload(self, name: str) -> None:
        """A run-time adapter off the list (the engine evicts its weights when it needs the slot, as vLLM's server)."""
        self._require_runtime("Unloading")
        async with self._lock:
            adapter = self._by_name.get(name)
            if adapter is None:
                raise ServiceError(
                    Kind.NOT_FOUND,
                    f"No adapter {clip(repr(name))} is loaded.",
                    param="lora_name",
                    code="model_not_found",
                )
            if not adapter.runtime:
                raise bad_request(
                    f"The adapter {clip(repr(name))} was named at start; it cannot be unloaded.", "lora_name"
                )
            del self._by_name[name]
            log.info("LoRA adapter %r unloaded", name)
