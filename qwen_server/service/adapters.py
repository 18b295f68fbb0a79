"""LoRA adapters for clients: the model cards of the base and its adapters (/v1/models), and vLLM's
run-time load and unload routes (answered with vLLM's texts)."""

from __future__ import annotations

from qwen_server import protocol as p
from qwen_server.engine.lifecycle import Engine
from qwen_server.service.decode import decode
from qwen_server.settings import Settings


class AdapterService:
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings

    def cards(self, created: int) -> list[p.ModelCard]:
        """The base model under each of its names, then each adapter with its parent. 503 until the
        engine is ready, as for inference (clients wait for this list before sending work)."""
        engine = self.engine
        engine.require_client()
        root = engine.model_path or self.settings.model or ""
        cards = [
            p.ModelCard(id=name, created=created, max_model_len=engine.max_model_len, root=root)
            for name in self.settings.model_names
        ]
        cards += [
            p.ModelCard(id=a.name, created=created, max_model_len=engine.max_model_len, root=a.path, parent=a.parent)
            for a in engine.adapters.all()
        ]
        return cards

    async def load(self, body: bytes) -> str:
        req: p.LoadLoRAAdapterRequest = decode(p.load_lora_decoder, body, self.settings.max_json_depth)
        client = self.engine.require_client()
        adapter = await self.engine.adapters.load(client, req.lora_name, req.lora_path, req.load_inplace)
        return f"Success: LoRA adapter '{adapter.name}' added successfully."

    async def unload(self, body: bytes) -> str:
        req: p.UnloadLoRAAdapterRequest = decode(p.unload_lora_decoder, body, self.settings.max_json_depth)
        await self.engine.adapters.unload(req.lora_name)
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."
