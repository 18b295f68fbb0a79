"""CannedEngine: a fake engine, named as such, that answers every request with canned token ids.

It stands in for qwen_server.engine.Engine under the chat service's output loops (whole and
streamed), so that what vLLM's output parsers make of a given model output can be tested at every
chunking of it: the chunks are the token ids given, their text the real tokenizer's decoding, as
vLLM's detokenizer gives them for ASCII. No model runs; the tokenizer is the tiny checkpoint's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from types import SimpleNamespace
from typing import Any

from qwen_server.engine import vllm_compat
from qwen_server.settings import Settings


class CannedEngine:
    def __init__(self, settings: Settings, tokenizer: Any) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.model_config: Any = None
        self.client: Any = None  # no vLLM client: grammars are not verified here
        self.chat_template: str | None = None
        self.output_parser = vllm_compat.output_parser_class(settings, tokenizer, "tiny")
        self.max_model_len = 4096
        self.sampling_defaults: dict[str, Any] = {}
        self.chunks: list[Sequence[int]] = []  # the next request's output, chunk by chunk
        self.finish = "stop"
        self.options: dict[str, Any] = {}  # what the last request passed to generate

    def answer(self, chunks: list[Sequence[int]], finish: str = "stop") -> None:
        self.chunks, self.finish = chunks, finish

    async def generate(self, prompt: Any, sampling: Any, request_id: str, **options: Any) -> AsyncIterator[Any]:
        self.options = options
        stream = sampling.output_kind == vllm_compat.output_kind(True)
        chunks = self.chunks if stream else [[t for chunk in self.chunks for t in chunk]]
        for i, ids in enumerate(chunks):
            last = i == len(chunks) - 1
            output = SimpleNamespace(
                index=0,
                text=self.tokenizer.decode(list(ids)),
                token_ids=list(ids),
                finish_reason=self.finish if last else None,
                logprobs=None,
            )
            yield SimpleNamespace(
                outputs=[output], prompt_token_ids=prompt["prompt_token_ids"], prompt_logprobs=None, num_cached_tokens=0
            )
