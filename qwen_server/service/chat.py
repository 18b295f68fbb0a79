"""Chat completions: messages through the model's chat template, images through the media loader,
answers as chat messages or deltas."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import msgspec

from qwen_server import protocol as p
from qwen_server.engine import vllm_compat
from qwen_server.engine.lifecycle import Engine
from qwen_server.errors import ServiceError, bad_request, clip
from qwen_server.logs import RequestRecord
from qwen_server.media.errors import MediaError
from qwen_server.media.image import MMKwargsError, check_request_mm_kwargs
from qwen_server.media.loader import LoadedImage, LoadedVideo, MediaLoader
from qwen_server.service import parsing
from qwen_server.service.decode import decode_chat
from qwen_server.service.generation import Endpoint, Piece, PreparedRequest, Prompt
from qwen_server.service.parsing import check_tool_request
from qwen_server.service.sampling import check_common, constraint_of
from qwen_server.settings import Settings

log = logging.getLogger("qwen_server")

# mm_processor_kwargs a client may set for its videos (within the server's caps): how they are sampled.
_VIDEO_KEYS = ("fps", "max_frames")
_MAX_FPS = 30  # vLLM's Qwen-VL samplers cap the rate there

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
        "tools",
        "documents",
        "add_generation_prompt",
        "continue_final_message",
        "tokenizer_kwargs",
    }
)


def template_kwargs(
    kwargs: dict[str, Any] | None,
    template: str | None,
    *,
    trusted: bool,
    defaults: dict[str, Any] | None = None,
    reasoning_effort: str | None = None,
) -> dict[str, Any]:
    """The template's variables: the server's defaults under the client's chat_template_kwargs,
    without what would change how the prompt is built rather than what the template renders. A
    client's own template (the request's `chat_template`, or the same key in the kwargs) needs the
    operator's trust (`trusted`); it comes back under "chat_template". `reasoning_effort` reaches the
    template as vLLM passes it (and turns thinking off at "none" unless the kwargs say otherwise)."""
    given = kwargs or {}
    own = ["chat_template"] if template is not None else []
    own += ["chat_template_kwargs.chat_template"] if "chat_template" in given else []
    if own and not trusted:
        raise bad_request(f"{own[0]} is not accepted (--trust-request-chat-template allows it).", own[0])
    for key in given:
        if key in _RENDER_KEYS:
            raise bad_request(f"chat_template_kwargs.{key} is not accepted.", f"chat_template_kwargs.{key}")
    merged = {**(defaults or {}), **given}
    if reasoning_effort is not None:
        merged["reasoning_effort"] = reasoning_effort
        if "enable_thinking" not in given:
            merged["enable_thinking"] = reasoning_effort != "none"
    if template is not None:
        merged["chat_template"] = template
    return merged


class ChatService(Endpoint):
    def __init__(self, engine: Engine, media: MediaLoader, settings: Settings) -> None:
        super().__init__(engine, settings)
        self.media = media
        self.max_images = (settings.limit_mm_per_prompt or {}).get("image")
        self.max_videos = (settings.limit_mm_per_prompt or {}).get("video")

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
        check_tool_request(req, self.settings)
        options = self.engine_options(req)
        engine_input, kwargs = await self.engine_input(client, req, record)
        return self.prepared(req, record, model, self.salted(engine_input, req), kwargs, options)

    def prepared(
        self,
        req: p.ChatCompletionRequest,
        record: RequestRecord,
        model: str,
        engine_input: Any,
        kwargs: dict[str, Any],
        options: dict[str, Any] | None = None,
    ) -> PreparedRequest:
        """The rendered request (`engine_input`, made with the template variables `kwargs`) with its
        sampling parameters and its output parse plan."""
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        prompt_len = len(engine_input["prompt_token_ids"])
        top = (req.top_logprobs or 0) if req.logprobs else None
        record.prompt_tokens = prompt_len
        kwargs.pop("chat_template", None)
        plan = parsing.plan(req, self.engine, kwargs)
        grammar: Any = None
        options = dict(options or {})
        if plan is not None:
            grammar = plan.tools_grammar()
            options |= plan.engine_options(list(engine_input["prompt_token_ids"]))
        max_tokens = self.max_tokens(prompt_len, requested, "messages")
        sampling = self.sampling.params(req, max_tokens, top, tools_grammar=grammar)
        return PreparedRequest(
            request_id=f"chatcmpl-{record.request_id}",
            engine_request_id=record.request_id,
            record=record,
            model=model,
            prompts=[Prompt(engine_input, prompt_len)],
            sampling=sampling,
            constraint=constraint_of(req, sampling),
            n=req.n,
            stream=req.stream,
            stream_options=req.stream_options,
            logprobs=top,
            parsing=_ChoiceParsing(plan, req.n) if plan is not None else None,
            engine_options=options,
        )

    async def engine_input(
        self, client: Any, req: p.ChatCompletionRequest | p.TokenizeRequest, record: RequestRecord
    ) -> tuple[Any, dict[str, Any]]:
        """The chat as the engine will see it (template, tokens, images loaded and expanded by the
        model's processor), and the template variables it was rendered with. Shared with /tokenize,
        so that its count is the prompt's."""
        kwargs = template_kwargs(
            req.chat_template_kwargs,
            req.chat_template,
            trusted=self.settings.trust_request_chat_template,
            defaults=self.settings.default_chat_template_kwargs,
            reasoning_effort=getattr(req, "reasoning_effort", None),
        )
        tools = self._template_tools(req)
        conversation, image_urls, video_urls = self._conversation(req.messages or [])
        record.images = len(image_urls)
        request_mm = dict(req.mm_processor_kwargs or {})
        sampling = {key: request_mm.pop(key) for key in _VIDEO_KEYS if key in request_mm}
        images = await self._load_images(image_urls, request_mm)
        videos = await self._load_videos(video_urls, sampling, request_mm)
        # vLLM's default: a chat's template carries its special tokens; the client may ask for more.
        add_special = bool(req.add_special_tokens)
        # The template and the tokenizer take time that grows with the request: off the event loop.
        token_ids = await asyncio.to_thread(
            self._render_chat,
            conversation,
            add_special,
            tools,
            add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            continue_final_message=req.continue_final_message,
            **kwargs,
        )
        prompt: dict[str, Any] = {"prompt_token_ids": token_ids}
        if images or videos:
            prompt["multi_modal_data"], prompt["multi_modal_uuids"] = {}, {}
        if images:
            prompt["multi_modal_data"]["image"] = [loaded.pixels for loaded in images]
            # Content hashes as item ids: vLLM's multimodal cache hits without hashing pixels.
            prompt["multi_modal_uuids"]["image"] = [loaded.uuid for loaded in images]
        if videos:
            prompt["multi_modal_data"]["video"] = [(video.frames, video.metadata) for video in videos]
            prompt["multi_modal_uuids"]["video"] = [video.uuid for video in videos]
        mm_kwargs = {**(self.settings.mm_processor_kwargs or {}), **request_mm}
        if videos and "fps" in sampling:  # the rate the frames were sampled at: Qwen2.5-VL's time ids
            mm_kwargs["fps"] = sampling["fps"]
        if mm_kwargs:
            prompt["mm_processor_kwargs"] = mm_kwargs
        return await self.render(client, prompt), kwargs

    def _template_tools(self, req: p.ChatCompletionRequest | p.TokenizeRequest) -> list[dict[str, Any]] | None:
        """The tools as the template renders them (OpenAI's shape), unless tool_choice "none" hides them."""
        if not req.tools:
            return None
        if (
            isinstance(req, p.ChatCompletionRequest)
            and req.tool_choice == "none"
            and self.settings.exclude_tools_when_tool_choice_none
        ):
            return None
        return [
            {
                "type": "function",
                "function": {k: v for k, v in msgspec.structs.asdict(tool.function).items() if v is not None},
            }
            for tool in req.tools
        ]

    def _conversation(
        self, messages: list[p.ChatMessage]
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str]], list[tuple[str, str]]]:
        """OpenAI messages to the chat template's form; image and video URLs with their request
        paths. Media may be in any message (a tool's screenshot too): the template places them, and a
        template that drops one is refused by the processor."""
        conversation: list[dict[str, Any]] = []
        image_urls: list[tuple[str, str]] = []
        video_urls: list[tuple[str, str]] = []
        for i, message in enumerate(messages):
            content = message.content
            if content is None:
                content = ""
            entry: dict[str, Any] = {"role": message.role}
            if isinstance(content, str):
                entry["content"] = content
            else:
                parts: list[dict[str, Any]] = []
                for j, part in enumerate(content):
                    if isinstance(part, p.TextPart):
                        parts.append({"type": "text", "text": part.text})
                    elif isinstance(part, p.VideoURLPart):
                        video_urls.append((part.video_url.url, f"messages[{i}].content[{j}].video_url"))
                        parts.append({"type": "video"})
                    else:
                        image_urls.append((part.image_url.url, f"messages[{i}].content[{j}].image_url"))
                        parts.append({"type": "image"})
                entry["content"] = parts
            if message.name is not None:
                entry["name"] = message.name
            if message.tool_calls:
                if message.role != "assistant":
                    raise bad_request("Only assistant messages carry tool_calls.", f"messages[{i}].tool_calls")
                entry["tool_calls"] = [
                    _template_call(call, f"messages[{i}].tool_calls[{k}]") for k, call in enumerate(message.tool_calls)
                ]
            if message.tool_call_id is not None:
                entry["tool_call_id"] = message.tool_call_id
            elif message.role == "tool":
                raise bad_request("A tool message needs the tool_call_id it answers.", f"messages[{i}].tool_call_id")
            reasoning = message.reasoning if message.reasoning is not None else message.reasoning_content
            if reasoning is not None:  # both names, as vLLM gives them to templates
                entry["reasoning"] = entry["reasoning_content"] = reasoning
            conversation.append(entry)
        for noun, urls, limit in (("images", image_urls, self.max_images), ("videos", video_urls, self.max_videos)):
            if limit is not None and len(urls) > limit:
                raise bad_request(
                    f"The request has {len(urls)} {noun}; at most {limit} are accepted per request.",
                    urls[limit][1],
                    code=f"too_many_{noun}",
                )
        return conversation, image_urls, video_urls

    def _render_chat(
        self,
        conversation: list[dict[str, Any]],
        add_special_tokens: bool,
        tools: list[dict[str, Any]] | None,
        **kwargs: Any,
    ) -> list[int]:
        """The chat template and the tokenizer (run in a thread): the prompt's token ids."""
        tokenizer = self.engine.tokenizer
        template = kwargs.pop("chat_template", None) or self.engine.chat_template
        try:
            text = vllm_compat.apply_chat_template(
                self.engine.model_config, tokenizer, conversation, tools=tools, chat_template=template, **kwargs
            )
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

    async def _load_videos(
        self, urls: list[tuple[str, str]], sampling: dict[str, Any], budget: dict[str, Any]
    ) -> list[LoadedVideo]:
        """The videos sampled at the model's rate (or the request's `fps`, at most `max_frames`),
        sized to the model's video budget or the request's `min_pixels`/`max_pixels` (checked with
        the images': the model's processor applies them to both)."""
        geometry = self.engine.video_geometry
        if geometry is not None and ("min_pixels" in budget or "max_pixels" in budget):
            high = budget.get("max_pixels", geometry.max_pixels)
            if not self.settings.trust_request_mm_kwargs:
                high = min(high, geometry.max_pixels)  # a client lowers the budget, never raises it
            geometry = dataclasses.replace(
                geometry, min_pixels=min(budget.get("min_pixels", geometry.min_pixels), high), max_pixels=high
            )
        fps = sampling.get("fps", geometry.fps if geometry else 2.0)
        if type(fps) not in (int, float) or not 0 < fps <= _MAX_FPS:
            raise bad_request(
                f"mm_processor_kwargs.fps must be a number in (0, {_MAX_FPS}].", "mm_processor_kwargs.fps"
            )
        cap = self.settings.max_video_frames
        max_frames = sampling.get("max_frames", cap)
        if type(max_frames) is not int or not 1 <= max_frames <= cap:
            raise bad_request(
                f"mm_processor_kwargs.max_frames must be an integer in [1, {cap}].", "mm_processor_kwargs.max_frames"
            )
        if not urls:
            return []
        if geometry is None:
            raise bad_request("This model does not take video.", urls[0][1], code="video_unsupported")
        try:
            return await self.media.load_videos(urls, geometry, fps=float(fps), max_frames=max_frames)
        except MediaError as exc:
            raise ServiceError(exc.kind, exc.message, param=exc.param, code=f"video_{exc.reason}") from None

    # --- shapes ---

    def opening(self, prep: PreparedRequest, index: int) -> Any | None:
        return p.ChunkChoice(index=index, delta=p.Delta(role="assistant", content=""))

    def choice(self, prep: PreparedRequest, index: int, piece: Piece, *, delta: bool) -> Any | None:
        lp, text, finish = piece.logprobs, piece.text, piece.finish
        logprobs = p.ChoiceLogprobs(content=lp) if lp is not None else None
        parsing: _ChoiceParsing | None = prep.parsing
        if delta:
            if parsing is None:
                return p.ChunkChoice(index=index, delta=p.Delta(content=text), logprobs=logprobs, finish_reason=finish)
            parsed, finish = parsing.splitter(index).feed(text, piece.token_ids, finish)
            if parsed is None and finish is None and logprobs is None:
                return None
            return p.ChunkChoice(index=index, delta=parsed or p.Delta(), logprobs=logprobs, finish_reason=finish)
        if parsing is None:
            message = p.ResponseMessage(role="assistant", content=text)
        else:
            whole = parsing.plan.whole(text, piece.token_ids, finish)
            if whole.parse_error is not None:
                log.warning(
                    "request %s: the output parser failed (%s); the text is returned as content",
                    prep.engine_request_id,
                    whole.parse_error,
                )
            parsing.reasoning_tokens[index] = whole.reasoning_tokens
            finish = whole.finish
            message = p.ResponseMessage(
                role="assistant",
                content=whole.content,
                tool_calls=whole.tool_calls,
                reasoning=whole.reasoning,
                reasoning_content=whole.reasoning,
            )
        return p.ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=finish)

    def usage(self, prep: PreparedRequest, completion_tokens: int) -> p.Usage:
        usage = super().usage(prep, completion_tokens)
        parsing: _ChoiceParsing | None = prep.parsing
        if parsing is not None and parsing.plan.reasoning:
            usage.completion_tokens_details = p.CompletionTokensDetails(parsing.total_reasoning_tokens())
        return usage

    def body(self, prep: PreparedRequest, choices: list[Any], usage: p.Usage | None, *, chunk: bool) -> Any:
        common: dict[str, Any] = {
            "id": prep.request_id,
            "created": prep.created,
            "model": prep.model,
            "choices": choices,
            "usage": usage,
        }
        return p.ChatCompletionChunk(**common) if chunk else p.ChatCompletion(**common)


class _ChoiceParsing:
    """A request's parse plan and its choices' state: a stream's splitters, the reasoning counts."""

    def __init__(self, plan: parsing.ParsePlan, n: int) -> None:
        self.plan = plan
        self._splitters: dict[int, parsing.StreamSplitter] = {}
        self.reasoning_tokens = [0] * n

    def splitter(self, index: int) -> parsing.StreamSplitter:
        if (splitter := self._splitters.get(index)) is None:
            splitter = self._splitters[index] = self.plan.stream()
        return splitter

    def total_reasoning_tokens(self) -> int:
        if self._splitters:
            return sum(splitter.reasoning_tokens() for splitter in self._splitters.values())
        return sum(self.reasoning_tokens)


def _template_call(call: p.ToolCallIn, param: str) -> dict[str, Any]:
    """An assistant's call as templates read it: the arguments as an object, not JSON text."""
    text = call.function.arguments
    try:
        arguments = msgspec.json.decode(text) if text.strip() else {}
    except msgspec.DecodeError:
        raise bad_request(
            "The arguments of this tool call are not JSON.", f"{param}.function.arguments", code="invalid_tool_call"
        ) from None
    if not isinstance(arguments, dict):
        raise bad_request(
            "The arguments of this tool call must be a JSON object.",
            f"{param}.function.arguments",
            code="invalid_tool_call",
        )
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}
