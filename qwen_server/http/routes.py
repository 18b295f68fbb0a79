"""Every route of the app. Each declares its policy in `opt` (see policy.py); one that declares nothing
needs the API key, is not inference, and is logged at info."""

from __future__ import annotations

from qwen_server.http.inference import chat_completions, completions
from qwen_server.http.models import load_lora_adapter, model, models, unload_lora_adapter
from qwen_server.http.probes import health, live, metrics_endpoint, version
from qwen_server.http.tokens import detokenize, tokenize

route_handlers = [
    chat_completions,
    completions,
    tokenize,
    detokenize,
    models,
    model,
    load_lora_adapter,
    unload_lora_adapter,
    live,
    health,
    metrics_endpoint,
    version,
]
