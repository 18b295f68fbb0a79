"""Text completions: OpenAI's four prompt forms (a text, texts, token ids, lists of token ids), a batch
run as one engine request per prompt, echo with the prompt's logprobs."""

from __future__ import annotations

import asyncio
from typing import Any

from qwen_server import protocol as p
from qwen_server.errors import bad_request
from qwen_server.logs import RequestRecord
from qwen_server.service.decode import decode
from qwen_server.service.generation import Endpoint, Piece, PreparedRequest, Prompt, check_token_ids
from qwen_server.service.sampling import check_common, constraint_of


class CompletionService(Endpoint):
    def decode(self, body: bytes) -> p.CompletionRequest:
        request: p.CompletionRequest = decode(p.completion_request_decoder, body, self.settings.max_json_depth)
        return request

    async def prepare(self, req: p.CompletionRequest, record: RequestRecord) -> PreparedRequest:
        client = self.engine.require_client()
        model = self.check_model(req.model)
        check_common(req)
        if req.suffix:
            raise bad_request("suffix is not supported.", "suffix")
        options = self.engine_options(req)
        prompts = []
        for text, token_ids, param in self._prompts(req.prompt):
            if token_ids is None:
                token_ids = await asyncio.to_thread(self._encode, text, req.add_special_tokens is not False)
            else:
                self.check_prompt_fits(len(token_ids), param)
                if req.echo:
                    text = await asyncio.to_thread(self.engine.tokenizer.decode, token_ids)
            engine_input = self.salted(await self.render(client, {"prompt_token_ids": token_ids}), req)
            prompts.append(Prompt(engine_input, len(engine_input["prompt_token_ids"]), text if req.echo else ""))
        longest = max(prompt.length for prompt in prompts)
        requested = req.max_tokens if req.max_tokens is not None else self.settings.completion_max_tokens
        # With echo, the prompt's own logprobs are reported too, as OpenAI and vLLM do.
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        prep = PreparedRequest(
            request_id=f"cmpl-{record.request_id}",
            engine_request_id=record.request_id,
            record=record,
            model=model,
            prompts=prompts,
            sampling=self.sampling.params(
                req, self.max_tokens(longest, requested, "prompt"), req.logprobs, prompt_logprobs
            ),
            n=req.n,
            stream=req.stream,
            stream_options=req.stream_options,
            logprobs=req.logprobs,
            echo=req.echo,
            engine_options=options,
        )
        prep.constraint = constraint_of(req, prep.sampling)
        record.prompt_tokens = prep.prompt_len
        return prep

    def _prompts(self, prompt: str | list[Any]) -> list[tuple[str, list[int] | None, str]]:
        """The prompt forms as (text, token ids or None, request path) per prompt; token ids are
        checked against the vocabulary."""
        if isinstance(prompt, str):
            return [(prompt, None, "prompt")]
        if not prompt:
            raise bad_request("prompt must not be empty.", "prompt")
        kinds = {type(item) for item in prompt}
        if kinds == {int}:
            return [("", check_token_ids(prompt, self.engine.vocab_size, "prompt"), "prompt")]
        if len(kinds) != 1 or kinds - {str, list}:
            raise bad_request(
                "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids.",
                "prompt",
            )
        if len(prompt) > self.settings.max_batch_prompts:
            raise bad_request(
                f"The request has {len(prompt)} prompts; at most {self.settings.max_batch_prompts} are accepted.",
                "prompt",
                code="too_many_prompts",
            )
        if kinds == {str}:
            return [(text, None, f"prompt[{i}]") for i, text in enumerate(prompt)]
        return [
            ("", check_token_ids(ids, self.engine.vocab_size, f"prompt[{i}]"), f"prompt[{i}]")
            for i, ids in enumerate(prompt)
        ]

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        self.check_text_fits(text, "prompt")
        token_ids: list[int] = self.engine.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        self.check_prompt_fits(len(token_ids), "prompt")
        return token_ids

    # --- shapes ---

    def opening(self, prep: PreparedRequest, index: int) -> Any | None:
        """The echoed prompt, unless its logprobs are wanted: then it comes with the engine's first output."""
        if prep.echo and prep.logprobs is None:
            return self.choice(prep, index, Piece(prep.prompts[index // prep.n].text), delta=True)
        return None

    def choice(self, prep: PreparedRequest, index: int, piece: Piece, *, delta: bool) -> Any:
        lp = piece.logprobs
        logprobs = _logprobs(lp, piece.offset, piece.echoed) if lp is not None else None
        return p.CompletionChoice(index=index, text=piece.text, logprobs=logprobs, finish_reason=piece.finish)

    def body(self, prep: PreparedRequest, choices: list[Any], usage: p.Usage | None, *, chunk: bool) -> Any:
        return p.Completion(id=prep.request_id, created=prep.created, model=prep.model, choices=choices, usage=usage)


def _logprobs(items: list[p.TokenLogprob], start: int, echoed: int = 0) -> p.CompletionLogprobs:
    """OpenAI's legacy logprobs: the first `echoed` items are the prompt's, offset from 0; the rest
    start at `start`, the characters before these tokens."""
    offsets, pos = [], 0
    for i, item in enumerate(items):
        if i == echoed:
            pos = start
        offsets.append(pos)
        pos += len(item.token)
    return p.CompletionLogprobs(
        tokens=[t.token for t in items],
        token_logprobs=[t.logprob for t in items],
        # The chosen token is always among them (logprobs: 0 asks for it alone), as in OpenAI's and vLLM's.
        top_logprobs=[
            None if t.logprob is None else {t.token: t.logprob, **{tl.token: tl.logprob for tl in t.top_logprobs}}
            for t in items
        ],
        text_offset=offsets,
    )
