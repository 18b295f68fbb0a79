"""vLLM's /tokenize and /detokenize: a prompt's or a chat's tokens (a chat's counted as the chat
endpoint will send them to the engine, image tokens included), and token ids back to text."""

from __future__ import annotations

import asyncio

from qwen_server import protocol as p
from qwen_server.engine.lifecycle import Engine
from qwen_server.errors import bad_request
from qwen_server.logs import RequestRecord
from qwen_server.service.chat import ChatService
from qwen_server.service.decode import decode, decode_tokenize
from qwen_server.service.generation import check_token_ids
from qwen_server.settings import Settings


class TokenService:
    def __init__(self, engine: Engine, chat: ChatService, settings: Settings) -> None:
        self.engine = engine
        self.chat = chat
        self.settings = settings

    def decode_tokenize(self, body: bytes) -> p.TokenizeRequest:
        return decode_tokenize(body, self.settings)

    def decode_detokenize(self, body: bytes) -> p.DetokenizeRequest:
        request: p.DetokenizeRequest = decode(p.detokenize_request_decoder, body, self.settings.max_json_depth)
        return request

    async def tokenize(self, req: p.TokenizeRequest, record: RequestRecord) -> p.TokenizeResponse:
        client = self.engine.require_client()
        self.chat.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("Send either prompt or messages.", "prompt" if req.prompt is None else "messages")
        if req.media_io_kwargs:
            raise bad_request(
                "media_io_kwargs is not supported by this server.", "media_io_kwargs", code="unsupported_field"
            )
        if req.messages is not None:
            if not req.messages:
                raise bad_request("messages must not be empty.", "messages")
            if req.continue_final_message and req.add_generation_prompt:
                raise bad_request(
                    "continue_final_message and add_generation_prompt cannot both be true.", "continue_final_message"
                )
            engine_input, _ = await self.chat.engine_input(client, req, record)
            tokens = list(engine_input["prompt_token_ids"])
        else:
            text = req.prompt or ""
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            self.chat.check_text_fits(text, "prompt")
            tokens = await asyncio.to_thread(self.engine.tokenizer.encode, text, add_special_tokens=add_special)
        record.prompt_tokens = len(tokens)
        strs = self.engine.tokenizer.convert_ids_to_tokens(tokens) if req.return_token_strs else None
        return p.TokenizeResponse(
            count=len(tokens), max_model_len=self.engine.max_model_len or 0, tokens=tokens, token_strs=strs
        )

    async def detokenize(self, req: p.DetokenizeRequest) -> p.DetokenizeResponse:
        self.engine.require_client()
        self.chat.check_model(req.model)
        ids = check_token_ids(req.tokens, self.engine.vocab_size, "tokens")
        return p.DetokenizeResponse(prompt=await asyncio.to_thread(self.engine.tokenizer.decode, ids))
