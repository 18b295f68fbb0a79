"""Chat completions: messages through the model's chat template, images through the media loader,
answers as chat messages or deltas."""

from __future__ import annotations

import asyncio
from typing import Any

from qwen_server import protocol as p
from qwen_server.engine.lifecycle import Engine
from qwen_server.errors import ServiceError, bad_request, clip
from qwen_server.logs import RequestRecord
from qwen_server.media.errors import MediaError
from qwen_server.media.image import MMKwargsError, check_request_mm_kwargs
from qwen_server.media.loader import LoadedImage, MediaLoader
from qwen_server.service.decode import decode_chat
from qwen_server.service.generation import Endpoint, Piece, PreparedRequest, Prompt
from qwen_server.service.sampling import check_common
from qwen_server.settings import Settings

# apply_chat_template arguments that change how the prompt is built, not what the template renders.
_RENDER_KEYS = frozenset(
    {
        "tokenize",
        "return_dict",
        "return_tensors",
        "return_assistant_tokens_mask",
        "padding",
        "truncation",
        "max_length",
        "conversation",
        "add_generation_prompt",
        "continue_final_message",
        "tokenizer_kwargs",
    }
)


def template_kwargs(kwargs: dict[str, Any] | None, template: str | None, *, trusted: bool) -> dict[str, Any]:
    """The client's chat_template_kwargs, without what would change how the prompt is built rather
    than what the template renders; a client's own template (the request's `chat_template`, or the
    same key in the kwargs) needs the operator's trust (`trusted`)."""
    given = kwargs or {}
    own = ["chat_template"] if template is not None else []
    own += ["chat_template_kwargs.chat_template"] if "chat_template" in given else []
    if own and not trusted:
        raise bad_request(f"{own[0]} is not accepted (--trust-request-chat-template allows it).", own[0])
    for key in given:
        if key in _RENDER_KEYS:
            raise bad_request(f"chat_template_kwargs.{key} is not accepted.", f"chat_template_kwargs.{key}")
    return {**given, **({"chat_template": template} if template is not None else {})}


class ChatService(Endpoint):
    def __init__(self, engine: Engine, media: MediaLoader, settings: Settings) -> None:
        super().__init__(engine, settings)
        self.media = media
        self.max_images = (settings.limit_mm_per_prompt or {}).get("image")

    def decode(self, body: bytes) -> p.ChatCompletionRequest:
        return decode_chat(body, self.settings)

    async def prepare(self, req: p.ChatCompletionRequest, record: RequestRecord) -> PreparedRequest:
        client = self.engine.require_client()
        model = self.check_model(req.model)
        check_common(req)
        if req.echo:
            raise bad_request(
                "echo is not supported for chat completions by this server.", "echo", code="unsupported_field"
            )
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
        engine_input = await self.engine_input(client, req, record)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        prompt_len = len(engine_input["prompt_token_ids"])
        top = (req.top_logprobs or 0) if req.logprobs else None
        record.prompt_tokens = prompt_len
        return PreparedRequest(
            request_id=f"chatcmpl-{record.request_id}",
            engine_request_id=record.request_id,
            record=record,
            model=model,
            prompts=[Prompt(engine_input, prompt_len)],
            sampling=self.sampling.params(req, self.max_tokens(prompt_len, requested, "messages"), top),
            n=req.n,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            logprobs=top,
        )

    async def engine_input(
        self, client: Any, req: p.ChatCompletionRequest | p.TokenizeRequest, record: RequestRecord
    ) -> Any:
        """The chat as the engine will see it: template, tokens, images loaded and expanded by the
        model's processor. Shared with /tokenize, so that its count is the prompt's."""
        kwargs = template_kwargs(
            req.chat_template_kwargs, req.chat_template, trusted=self.settings.trust_request_chat_template
        )
        conversation, image_urls = self._conversation(req.messages or [])
        record.images = len(image_urls)
        images = await self._load_images(image_urls, req.mm_processor_kwargs)
        # vLLM's defaults: a chat's template carries its special tokens; /tokenize may ask for more.
        add_special = isinstance(req, p.TokenizeRequest) and bool(req.add_special_tokens)
        # The template and the tokenizer take time that grows with the request: off the event loop.
        token_ids = await asyncio.to_thread(
            self._render_chat,
            conversation,
            add_special,
            add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            continue_final_message=req.continue_final_message,
            **kwargs,
        )
        prompt: dict[str, Any] = {"prompt_token_ids": token_ids}
        if images:
            prompt["multi_modal_data"] = {"image": [loaded.pixels for loaded in images]}
            # Content hashes as item ids: vLLM's multimodal cache hits without hashing pixels.
            prompt["multi_modal_uuids"] = {"image": [loaded.uuid for loaded in images]}
        mm_kwargs = {**(self.settings.mm_processor_kwargs or {}), **(req.mm_processor_kwargs or {})}
        if mm_kwargs:
            prompt["mm_processor_kwargs"] = mm_kwargs
        return await self.render(client, prompt)

    def _conversation(self, messages: list[p.ChatMessage]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """OpenAI messages to the chat template's form; image URLs with their request paths."""
        conversation: list[dict[str, Any]] = []
        image_urls: list[tuple[str, str]] = []
        for i, message in enumerate(messages):
            role = "system" if message.role == "developer" else message.role
            content = message.content
            if content is None:
                content = ""
            if isinstance(content, str):
                conversation.append({"role": role, "content": content})
                continue
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(content):
                if isinstance(part, p.TextPart):
                    parts.append({"type": "text", "text": part.text})
                else:
                    if role != "user":
                        raise bad_request("Images are only accepted in user messages.", f"messages[{i}].content[{j}]")
                    image_urls.append((part.image_url.url, f"messages[{i}].content[{j}].image_url"))
                    parts.append({"type": "image"})
            conversation.append({"role": role, "content": parts})
        if self.max_images is not None and len(image_urls) > self.max_images:
            raise bad_request(
                f"The request has {len(image_urls)} images; at most {self.max_images} are accepted per request.",
                image_urls[self.max_images][1],
                code="too_many_images",
            )
        return conversation, image_urls

    def _render_chat(self, conversation: list[dict[str, Any]], add_special_tokens: bool, **kwargs: Any) -> list[int]:
        """The chat template and the tokenizer (run in a thread): the prompt's token ids."""
        tokenizer = self.engine.tokenizer
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the template is the model's (or a trusted client's): the input failed it
            raise bad_request(
                f"The chat template could not render these messages: {clip(str(exc))}", "messages"
            ) from None
        if not isinstance(text, str):
            raise bad_request("The chat template did not render text.", "chat_template_kwargs")
        self.check_text_fits(text, "messages")
        token_ids: list[int] = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        self.check_prompt_fits(len(token_ids), "messages")
        return token_ids

    async def _load_images(self, urls: list[tuple[str, str]], mm_kwargs: dict[str, Any] | None) -> list[LoadedImage]:
        geometry = self.engine.image_geometry
        trusted = self.settings.trust_request_mm_kwargs
        try:
            if geometry is not None:
                geometry = geometry.with_request_kwargs(
                    mm_kwargs, trusted=trusted, pixel_cap=self.settings.max_image_pixels
                )
            else:
                check_request_mm_kwargs(mm_kwargs, None, trusted=trusted)
        except MMKwargsError as exc:
            raise bad_request(exc.message, f"mm_processor_kwargs.{exc.key}") from None
        if not urls:
            return []
        try:
            return await self.media.load_all(urls, geometry)
        except MediaError as exc:
            raise ServiceError(exc.kind, exc.message, param=exc.param, code=f"image_{exc.reason}") from None

    # --- shapes ---

    def opening(self, prep: PreparedRequest, index: int) -> Any | None:
        return p.ChunkChoice(index=index, delta=p.Delta(role="assistant", content=""))

    def choice(self, prep: PreparedRequest, index: int, piece: Piece, *, delta: bool) -> Any:
        lp, text, finish = piece.logprobs, piece.text, piece.finish
        logprobs = p.ChoiceLogprobs(content=lp) if lp is not None else None
        if delta:
            return p.ChunkChoice(index=index, delta=p.Delta(content=text), logprobs=logprobs, finish_reason=finish)
        return p.ChatChoice(
            index=index,
            message=p.ResponseMessage(role="assistant", content=text),
            logprobs=logprobs,
            finish_reason=finish,
        )

    def body(self, prep: PreparedRequest, choices: list[Any], usage: p.Usage | None, *, chunk: bool) -> Any:
        common: dict[str, Any] = {
            "id": prep.request_id,
            "created": prep.created,
            "model": prep.model,
            "choices": choices,
            "usage": usage,
        }
        return p.ChatCompletionChunk(**common) if chunk else p.ChatCompletion(**common)
