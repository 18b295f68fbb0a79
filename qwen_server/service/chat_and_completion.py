"""From an OpenAI request to engine calls and back: prompts, images, sampling, results, streams.

No HTTP here: routes hand in decoded requests and get a response struct or an async iterator of
SSE frames (bytes). Streams use the engine's DELTA mode (each step carries only the new tokens);
non-streaming requests its FINAL_ONLY mode (one output at the end).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from qwen_server import protocol as p
from qwen_server.engine import vllm_compat
from qwen_server.logs import RequestRecord
from qwen_server.engine.lifecycle import Engine
from qwen_server.errors import Kind, ServiceError, bad_request, clip, envelope, from_validation_error
from qwen_server.media.errors import MediaError
from qwen_server.media.image import MMKwargsError, check_request_mm_kwargs
from qwen_server.media.loader import LoadedImage, MediaLoader
from qwen_server.settings import Settings

_DONE = b"data: [DONE]\n\n"
log = logging.getLogger("qwen_server")


@dataclass(slots=True)
class Prepared:
    """A request ready for the engine: the rendered input and its sampling parameters."""

    request_id: str  # the response's id
    engine_request_id: str  # the client's X-Request-Id (or a generated one)
    record: RequestRecord
    model: str
    prompts: list[Prompt]  # several for a batched completion; choice i * n + j is prompt i's j-th
    sampling: Any
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # top-k to report; None: no logprobs
    chat: bool
    echo: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_len(self) -> int:
        return sum(prompt.length for prompt in self.prompts)


@dataclass(slots=True)
class Prompt:
    """One prompt for the engine: the rendered input, its token count, and its text for echo."""

    engine_input: Any
    length: int
    text: str = ""


class Service:
    def __init__(self, engine: Engine, media: MediaLoader, settings: Settings) -> None:
        self.engine = engine
        self.media = media
        self.settings = settings
        limits = settings.limit_mm_per_prompt or {}
        self.max_images = limits.get("image")
        self._defaults: dict[str, Any] | None = None

    # --- preparing requests ---

    def _check_model(self, model: str | None) -> str:
        names = self.settings.model_names
        if model is not None and model not in names:
            raise ServiceError(
                Kind.NOT_FOUND,
                f"The model {clip(repr(model))} does not exist; this server serves {', '.join(map(repr, names))}.",
                param="model",
                code="model_not_found",
            )
        return names[0]

    async def prepare_chat(self, req: p.ChatCompletionRequest, record: RequestRecord) -> Prepared:
        client = self.engine.ready_client()
        model = self._check_model(req.model)
        _check_common(req)
        if req.echo:
            raise bad_request("echo is not supported for chat completions by this server.", "echo",
                              code="unsupported_field")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
        template_kwargs = self._template_kwargs(req.chat_template_kwargs, req.chat_template)
        conversation, image_urls = self._conversation(req.messages)
        record.images = len(image_urls)
        images = await self._load_images(image_urls, req.mm_processor_kwargs)
        # The template and the tokenizer take time that grows with the request: off the event loop.
        token_ids = await asyncio.to_thread(
            self._render_chat,
            conversation,
            add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            continue_final_message=req.continue_final_message,
            **template_kwargs,
        )
        prompt: dict[str, Any] = {"prompt_token_ids": token_ids}
        if images:
            prompt["multi_modal_data"] = {"image": [loaded.pixels for loaded in images]}
            # Content hashes as item ids: vLLM's multimodal cache hits without hashing pixels.
            prompt["multi_modal_uuids"] = {"image": [loaded.uuid for loaded in images]}
        mm_kwargs = {**(self.settings.mm_processor_kwargs or {}), **(req.mm_processor_kwargs or {})}
        if mm_kwargs:
            prompt["mm_processor_kwargs"] = mm_kwargs
        engine_input = await self._render(client, prompt)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        prompt_len = len(engine_input["prompt_token_ids"])
        top = (req.top_logprobs or 0) if req.logprobs else None
        record.prompt_tokens = prompt_len
        return Prepared(
            request_id=f"chatcmpl-{record.request_id}",
            engine_request_id=record.request_id,
            record=record,
            model=model,
            prompts=[Prompt(engine_input, prompt_len)],
            sampling=self._sampling(req, self._max_tokens(prompt_len, max_tokens), top),
            n=req.n,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            logprobs=top,
            chat=True,
        )

    async def prepare_completion(self, req: p.CompletionRequest, record: RequestRecord) -> Prepared:
        client = self.engine.ready_client()
        model = self._check_model(req.model)
        _check_common(req)
        if req.suffix:
            raise bad_request("suffix is not supported.", "suffix")
        prompts = []
        for i, (text, token_ids, param) in enumerate(self._completion_prompts(req.prompt)):
            if token_ids is None:
                token_ids = await asyncio.to_thread(self._encode_prompt, text)
            else:
                self._check_prompt_fits(len(token_ids), param)
                if req.echo:
                    text = await asyncio.to_thread(self.engine.tokenizer.decode, token_ids)
            engine_input = await self._render(client, {"prompt_token_ids": token_ids})
            prompts.append(Prompt(engine_input, len(engine_input["prompt_token_ids"]), text if req.echo else ""))
        longest = max(prompt.length for prompt in prompts)
        max_tokens = req.max_tokens if req.max_tokens is not None else self.settings.completion_max_tokens
        # With echo, the prompt's own logprobs are reported too, as OpenAI and vLLM do.
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        prep = Prepared(
            request_id=f"cmpl-{record.request_id}",
            engine_request_id=record.request_id,
            record=record,
            model=model,
            prompts=prompts,
            sampling=self._sampling(req, self._max_tokens(longest, max_tokens), req.logprobs, prompt_logprobs),
            n=req.n,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            logprobs=req.logprobs,
            chat=False,
            echo=req.echo,
        )
        record.prompt_tokens = prep.prompt_len
        return prep

    def _completion_prompts(self, prompt: str | list) -> list[tuple[str, list[int] | None, str]]:
        """OpenAI's four prompt forms (a text, texts, token ids, lists of token ids) as
        (text, token ids or None, request path) per prompt; token ids are checked against the vocabulary."""
        if isinstance(prompt, str):
            return [(prompt, None, "prompt")]
        if not prompt:
            raise bad_request("prompt must not be empty.", "prompt")
        kinds = {type(item) for item in prompt}
        if kinds == {int}:
            return [("", self._token_ids(prompt, "prompt"), "prompt")]
        if len(kinds) != 1 or kinds - {str, list}:
            raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of "
                              "lists of token ids.", "prompt")
        if len(prompt) > self.settings.max_batch_prompts:
            raise bad_request(f"The request has {len(prompt)} prompts; at most {self.settings.max_batch_prompts} "
                              "are accepted.", "prompt", code="too_many_prompts")
        if kinds == {str}:
            return [(text, None, f"prompt[{i}]") for i, text in enumerate(prompt)]
        return [("", self._token_ids(ids, f"prompt[{i}]"), f"prompt[{i}]") for i, ids in enumerate(prompt)]

    def _token_ids(self, ids: list, param: str) -> list[int]:
        vocab = self.engine.vocab_size
        for j, token in enumerate(ids):
            if type(token) is not int or not 0 <= token < vocab:
                raise bad_request(f"Token id {clip(repr(token), 40)} is not in the vocabulary of {vocab} tokens.",
                                  f"{param}[{j}]", code="invalid_token_id")
        if not ids:
            raise bad_request("A prompt of token ids must not be empty.", param)
        return ids

    def _conversation(self, messages: list[p.ChatMessage]) -> tuple[list[dict], list[tuple[str, str]]]:
        """OpenAI messages to the chat template's form; image URLs with their request paths."""
        conversation: list[dict] = []
        image_urls: list[tuple[str, str]] = []
        for i, message in enumerate(messages):
            role = "system" if message.role == "developer" else message.role
            content = message.content
            if content is None:
                content = ""
            if isinstance(content, str):
                conversation.append({"role": role, "content": content})
                continue
            parts: list[dict] = []
            for j, part in enumerate(content):
                if isinstance(part, p.TextPart):
                    parts.append({"type": "text", "text": part.text})
                else:
                    if role != "user":
                        raise bad_request(
                            "Images are only accepted in user messages.", f"messages[{i}].content[{j}]"
                        )
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

    def _template_kwargs(self, kwargs: dict[str, Any] | None, template: str | None = None) -> dict[str, Any]:
        """The client's chat_template_kwargs, without what would change how the prompt is built
        rather than what the template renders; a client's own template (the request's `chat_template`,
        or the same key in the kwargs) needs the operator's trust."""
        own = [("chat_template", template)] if template is not None else []
        own += [(f"chat_template_kwargs.{key}", kwargs[key]) for key in kwargs or () if key == "chat_template"]
        if own and not self.settings.trust_request_chat_template:
            raise bad_request(f"{own[0][0]} is not accepted (--trust-request-chat-template allows it).", own[0][0])
        for key in kwargs or ():
            if key in _RENDER_KEYS:
                raise bad_request(f"chat_template_kwargs.{key} is not accepted.", f"chat_template_kwargs.{key}")
        return {**(kwargs or {}), **({"chat_template": template} if template is not None else {})}

    def _render_chat(self, conversation: list[dict], **kwargs: Any) -> list[int]:
        """The chat template and the tokenizer (run in a thread): the prompt's token ids."""
        tokenizer = self.engine.tokenizer
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
        except Exception as exc:  # the template is the model's (or the trusted client's): the input failed it
            raise bad_request(f"The chat template could not render these messages: {clip(str(exc))}", "messages") from None
        if not isinstance(text, str):
            raise bad_request("The chat template did not render text.", "chat_template_kwargs")
        self._check_text_fits(text, "messages")
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        self._check_prompt_fits(len(token_ids), "messages")
        return token_ids

    def _encode_prompt(self, text: str) -> list[int]:
        self._check_text_fits(text, "prompt")
        token_ids = self.engine.tokenizer.encode(text)
        self._check_prompt_fits(len(token_ids), "prompt")
        return token_ids

    def _check_text_fits(self, text: str, param: str) -> None:
        """A text too long for the context whatever its tokens is refused before it is tokenized
        (about 1 s per MB): each token covers at most `longest_token` bytes, each character one."""
        limit = (self.engine.max_model_len or 0) * self.engine.longest_token
        if len(text) > limit:
            raise bad_request(
                f"The prompt is {len(text)} characters long: more than the model's context of "
                f"{self.engine.max_model_len} tokens can hold.",
                param,
                code="context_length_exceeded",
            )

    def _check_prompt_fits(self, tokens: int, param: str) -> None:
        """Before the multimodal processor: images only add tokens."""
        limit = self.engine.max_model_len or 0
        if tokens >= limit:
            raise bad_request(
                f"The prompt is {tokens} tokens long, which leaves no room for output in the context of {limit} tokens.",
                param,
                code="context_length_exceeded",
            )

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

    async def _render(self, client: Any, prompt: dict[str, Any]) -> Any:
        """vLLM's renderer runs the model's multimodal processor (image tokens expanded) off the loop."""
        try:
            (engine_input,) = await vllm_compat.render_prompts(client, [prompt])
        except vllm_compat.client_error() as exc:
            raise bad_request(str(exc), getattr(exc, "parameter", None)) from None
        except Exception as exc:  # noqa: BLE001 - the model's processor failed on this request's input
            # ValueError/TypeError for options it cannot use, AssertionError when a template drops the
            # image placeholder, ...: each is about this input, none about the server.
            log.info("the multimodal processor refused a request: %s: %s", type(exc).__name__, clip(str(exc)))
            raise bad_request(f"The input could not be processed: {type(exc).__name__}: {clip(str(exc))}", None) from None
        return engine_input

    def _max_tokens(self, prompt_len: int, requested: int | None) -> int:
        limit = self.engine.max_model_len or 0
        self._check_prompt_fits(prompt_len, "messages")
        if requested is None:
            default = self._sampling_defaults().get("max_tokens")
            return min(limit - prompt_len, default) if default else limit - prompt_len
        if prompt_len + requested > limit:
            raise bad_request(
                f"The prompt ({prompt_len} tokens) plus max_tokens ({requested}) is {prompt_len + requested} "
                f"tokens, over the model's context of {limit} tokens.",
                "max_tokens",
                code="context_length_exceeded",
            )
        return requested

    def _sampling_defaults(self) -> dict[str, Any]:
        """The model's generation_config defaults, as vLLM's own server applies them."""
        if self._defaults is None:
            client = self.engine.client
            defaults = dict(client.model_config.get_diff_sampling_param()) if client else {}
            if "max_new_tokens" in defaults:
                defaults["max_tokens"] = defaults.pop("max_new_tokens")
            self._defaults = defaults
        return self._defaults

    def _sampling(self, req: p.SamplingFields, max_tokens: int, logprobs: int | None,
                  prompt_logprobs: int | None = None) -> Any:
        kwargs: dict[str, Any] = {
            k: v for k, v in self._sampling_defaults().items() if k != "max_tokens"
        }
        for name in (
            "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
            "repetition_penalty",
        ):
            value = getattr(req, name)
            if value is not None:
                kwargs[name] = value
        if req.logit_bias:
            try:
                kwargs["logit_bias"] = {int(k): v for k, v in req.logit_bias.items()}
            except ValueError:
                raise bad_request("logit_bias keys must be token ids.", "logit_bias") from None
        if req.response_format is not None and req.response_format.type != "text":
            fmt = req.response_format
            if fmt.type == "json_object":
                kwargs["structured_outputs"] = vllm_compat.structured_outputs(json_object=True)
            else:
                if fmt.json_schema is None or fmt.json_schema.schema is None:
                    raise bad_request("response_format json_schema needs json_schema.schema.", "response_format.json_schema")
                kwargs["structured_outputs"] = vllm_compat.structured_outputs(json=fmt.json_schema.schema)
        try:
            return vllm_compat.sampling_params(
                n=req.n,
                max_tokens=max_tokens,
                min_tokens=min(req.min_tokens, max_tokens),
                stop=req.stop,
                stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=req.skip_special_tokens,
                spaces_between_special_tokens=req.spaces_between_special_tokens,
                allowed_token_ids=req.allowed_token_ids,
                bad_words=req.bad_words,
                include_stop_str_in_output=req.include_stop_str_in_output,
                # Streams take each step's new tokens; a non-streaming request only its final output,
                # so this worker is not woken once per token for a result nobody reads until the end.
                output_kind=vllm_compat.output_kind(req.stream),
                **kwargs,
            )
        except (ValueError, vllm_compat.client_error()) as exc:  # vLLM's checks raise VLLMValidationError
            raise bad_request(f"Invalid sampling parameters: {exc}", getattr(exc, "parameter", None)) from None

    # --- running requests ---

    def _generate(self, prep: Prepared, i: int) -> AsyncIterator[Any]:
        request_id = prep.engine_request_id if len(prep.prompts) == 1 else f"{prep.engine_request_id}-{i}"
        return self.engine.generate(prep.prompts[i].engine_input, prep.sampling, request_id)

    async def complete(self, prep: Prepared) -> p.ChatCompletion | p.Completion:
        count = prep.n * len(prep.prompts)
        texts: list[list[str]] = [[] for _ in range(count)]
        logprobs: list[list[p.TokenLogprob]] = [[] for _ in range(count)]
        echoed: list[list[p.TokenLogprob]] = [[] for _ in prep.prompts]
        finish: list[str | None] = [None] * count
        completion_tokens = 0
        async for i, out in self._run(prep):
            if prep.echo and prep.logprobs is not None and out.prompt_logprobs:
                echoed[i] = self._prompt_logprobs(out, prep.logprobs)
            for o in out.outputs:
                k = i * prep.n + o.index
                texts[k].append(o.text)
                completion_tokens += len(o.token_ids)
                if prep.logprobs is not None and o.logprobs:
                    logprobs[k].extend(self._token_logprobs(o, prep.logprobs))
                if o.finish_reason is not None:
                    finish[k] = o.finish_reason
            prep.record.completion_tokens = completion_tokens
        choices = []
        for k in range(count):
            echo = prep.prompts[k // prep.n].text
            lp = echoed[k // prep.n] + logprobs[k] if prep.logprobs is not None else None
            choices.append(_choice(prep, k, echo + "".join(texts[k]), lp, finish[k], delta=False,
                                   offset=len(echo), echoed=len(echoed[k // prep.n])))
        return _body(prep, choices, _usage(prep, completion_tokens), chunk=False)

    async def stream(self, prep: Prepared) -> AsyncIterator[bytes]:
        """SSE frames: role first (chat), then deltas, an optional usage chunk, then [DONE].
        An engine failure mid-stream becomes an error event, so no stream ends silently cut."""
        encode = p.encoder.encode
        completion_tokens = 0
        count = prep.n * len(prep.prompts)
        # Characters sent so far per choice: completions' text_offset counts from the start of the text.
        sent = [len(prep.prompts[k // prep.n].text) for k in range(count)]
        echo_pending = prep.echo and prep.logprobs is not None
        try:
            # One choice per chunk, as vLLM and OpenAI send them: clients read choices[0].
            for k in range(count):
                if prep.chat:
                    first = p.ChunkChoice(index=k, delta=p.Delta(role="assistant", content=""))
                    yield _frame(encode(_body(prep, [first], None, chunk=True)))
                elif prep.echo and not echo_pending:
                    echo = _choice(prep, k, prep.prompts[k // prep.n].text, None, None, delta=True)
                    yield _frame(encode(_body(prep, [echo], None, chunk=True)))
            async for i, out in self._run(prep):
                if echo_pending and out.prompt_logprobs:  # the first output of prompt i carries them
                    echoed = self._prompt_logprobs(out, prep.logprobs)
                    for k in range(i * prep.n, (i + 1) * prep.n):
                        echo = _choice(prep, k, prep.prompts[i].text, echoed, None, delta=True, echoed=len(echoed))
                        yield _frame(encode(_body(prep, [echo], None, chunk=True)))
                for o in out.outputs:
                    k = i * prep.n + o.index
                    completion_tokens += len(o.token_ids)
                    prep.record.completion_tokens = completion_tokens
                    lp = self._token_logprobs(o, prep.logprobs) if prep.logprobs is not None and o.logprobs else None
                    if not o.text and o.finish_reason is None and not lp:
                        continue  # the detokenizer holds back a partial character; its logprobs are still sent
                    choice = _choice(prep, k, o.text, lp, o.finish_reason, delta=True, offset=sent[k])
                    sent[k] += len(o.text)
                    yield _frame(encode(_body(prep, [choice], None, chunk=True)))
            if prep.include_usage:
                yield _frame(encode(_body(prep, [], _usage(prep, completion_tokens), chunk=True)))
        except ServiceError as exc:
            yield _frame(envelope(exc.kind, exc.message, exc.param, exc.code))
        except Exception:  # a defect of ours or vLLM's: the 200 is sent, so it can only be an event now
            log.exception("request %s failed mid-stream", prep.engine_request_id)
            yield _frame(envelope(Kind.INTERNAL, "The server failed while streaming this response.", None, "internal_error"))
        yield _DONE

    async def _run(self, prep: Prepared) -> AsyncIterator[tuple[int, Any]]:
        """(prompt index, engine output) for every prompt, as they come; engine failures become
        ServiceErrors. Cancellation (a client that left) propagates into vLLM's generators, which abort
        their requests in the engine."""
        if len(prep.prompts) == 1:
            async for out in self._outputs(prep, 0):
                yield 0, out
            return
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        done = object()

        async def pump(i: int) -> None:
            try:
                async for out in self._outputs(prep, i):
                    queue.put_nowait((i, out))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                queue.put_nowait((i, exc))
            finally:
                queue.put_nowait((i, done))

        tasks = [asyncio.ensure_future(pump(i)) for i in range(len(prep.prompts))]
        try:
            running = len(tasks)
            while running:
                i, item = await queue.get()
                if item is done:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _outputs(self, prep: Prepared, i: int) -> AsyncIterator[Any]:
        try:
            async for out in self._generate(prep, i):
                yield out
        except vllm_compat.engine_dead_error():
            raise ServiceError(Kind.UNAVAILABLE, "The engine died while serving this request.", code="engine_dead") from None
        except vllm_compat.client_error() as exc:
            raise bad_request(str(exc), getattr(exc, "parameter", None)) from None

    # --- logprobs ---

    def _token_logprobs(self, output: Any, top: int) -> list[p.TokenLogprob]:
        return [item for token_id, entry in zip(output.token_ids, output.logprobs, strict=False)
                if (item := _logprob_entry(token_id, entry, top)) is not None]

    def _prompt_logprobs(self, output: Any, top: int) -> list[p.TokenLogprob]:
        """The prompt's tokens with their logprobs (the first token has none), for echo."""
        items = []
        for position, (token_id, entry) in enumerate(zip(output.prompt_token_ids, output.prompt_logprobs, strict=False)):
            item = _logprob_entry(token_id, entry, top) if entry else None
            if item is None:
                token = self.engine.tokenizer.decode([token_id]) if position == 0 else ""
                item = p.TokenLogprob(token=token, logprob=None, bytes=list(token.encode()), top_logprobs=[])
            items.append(item)
        return items


def _logprob_entry(token_id: int, entry: Any, top: int) -> p.TokenLogprob | None:
    """One token's logprob and its top alternatives from vLLM's {token id: Logprob} entry."""
    chosen = entry.get(token_id)
    if chosen is None:
        return None
    token = chosen.decoded_token or ""
    tops = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[:top] if top else []
    return p.TokenLogprob(
        token=token,
        logprob=max(chosen.logprob, -9999.0),
        bytes=list(token.encode()),
        top_logprobs=[
            p.TopLogprob(token=lp.decoded_token or "", logprob=max(lp.logprob, -9999.0),
                         bytes=list((lp.decoded_token or "").encode()))
            for _, lp in tops
        ],
    )


def _check_common(req: p.SamplingFields) -> None:
    """Fields not honoured are refused, not dropped; stream_options needs a stream (as in vLLM)."""
    for name, harmless in p.REFUSED_FIELDS.items():
        value = getattr(req, name)
        if value is msgspec.UNSET or value is None or any(value == ok and isinstance(value, bool) == isinstance(ok, bool) for ok in harmless):
            continue
        raise bad_request(f"{name} is not supported by this server (see the README's table of fields).", name,
                          code="unsupported_field")
    options = req.stream_options
    if options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true.", "stream_options")
    if options is not None and options.continuous_usage_stats:
        raise bad_request("stream_options.continuous_usage_stats is not supported by this server.",
                          "stream_options.continuous_usage_stats", code="unsupported_field")


def _usage(prep: Prepared, completion_tokens: int) -> p.Usage:
    return p.Usage(prep.prompt_len, completion_tokens, prep.prompt_len + completion_tokens)


def _choice(prep: Prepared, index: int, text: str, lp: list[p.TokenLogprob] | None, finish: str | None, *, delta: bool,
            offset: int = 0, echoed: int = 0):
    """One choice in the endpoint's shape: chat message, chat delta, or text completion (whose
    first `echoed` logprobs are the prompt's, offset from 0, and the rest start at `offset`, the
    characters before these tokens)."""
    if not prep.chat:
        logprobs = _completion_logprobs(lp, offset, echoed) if lp is not None else None
        return p.CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)
    logprobs = p.ChoiceLogprobs(content=lp) if lp is not None else None
    if delta:
        return p.ChunkChoice(index=index, delta=p.Delta(content=text), logprobs=logprobs, finish_reason=finish)
    return p.ChatChoice(index=index, message=p.ResponseMessage(role="assistant", content=text), logprobs=logprobs,
                        finish_reason=finish)


def _body(prep: Prepared, choices: list, usage: p.Usage | None, *, chunk: bool):
    """The response (or stream chunk) object around `choices` for the endpoint."""
    common = {"id": prep.request_id, "created": prep.created, "model": prep.model, "choices": choices, "usage": usage}
    if not prep.chat:
        return p.Completion(**common)
    return p.ChatCompletionChunk(**common) if chunk else p.ChatCompletion(**common)


def _completion_logprobs(items: list[p.TokenLogprob], start: int, echoed: int = 0) -> p.CompletionLogprobs:
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
        top_logprobs=[None if t.logprob is None else {t.token: t.logprob, **{tl.token: tl.logprob for tl in t.top_logprobs}}
                      for t in items],
        text_offset=offsets,
    )


def _frame(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def decode_chat(body: bytes, settings: Settings) -> p.ChatCompletionRequest:
    """A chat request in two passes (see protocol.py): the limits on messages and parts refuse a
    body before its objects are built."""
    outer = decode(p.chat_outer_decoder, body, settings.max_json_depth)
    if len(outer.messages) > settings.max_messages:
        raise bad_request(
            f"The request has {len(outer.messages)} messages; at most {settings.max_messages} are accepted.",
            "messages",
            code="too_many_messages",
        )
    messages = []
    for i, raw in enumerate(outer.messages):
        message = _decode_part(p.chat_message_outer_decoder, raw, f"messages[{i}]")
        content = message.content
        if isinstance(content, list):
            if len(content) > settings.max_content_parts:
                raise bad_request(
                    f"Message {i} has {len(content)} content parts; at most {settings.max_content_parts} are accepted.",
                    f"messages[{i}].content",
                    code="too_many_content_parts",
                )
            content = [_decode_part(p.content_part_decoder, part, f"messages[{i}].content[{j}]")
                       for j, part in enumerate(content)]
        messages.append(p.ChatMessage(role=message.role, content=content, name=message.name))
    fields = msgspec.structs.asdict(outer)
    fields["messages"] = messages
    return p.ChatCompletionRequest(**fields)


def _decode_part(decoder: msgspec.json.Decoder, data: bytes | msgspec.Raw, path: str) -> Any:
    """`data` (the body, or the part of it at `path`) decoded strictly; errors name the field."""
    try:
        return decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation_error(exc, path) from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply to decode.", path or "body", code="too_deep") from None


def decode(decoder: msgspec.json.Decoder, body: bytes, max_depth: int) -> Any:
    """Strict decoding of a request body; errors name the field. Free-form JSON fields (processor
    and template options, schemas) may nest at most `max_depth` levels: they reach code that recurses."""
    request = _decode_part(decoder, body, "")
    for name in _FREE_FORM:
        value = getattr(request, name, None)
        if value is not None and _depth_over(value, max_depth):
            raise bad_request(f"{name} is nested more than {max_depth} levels deep.", name, code="too_deep")
    format_ = getattr(request, "response_format", None)
    schema = format_.json_schema.schema if format_ is not None and format_.json_schema is not None else None
    if schema is not None and _depth_over(schema, max_depth):
        raise bad_request(
            f"response_format.json_schema.schema is nested more than {max_depth} levels deep.",
            "response_format.json_schema.schema",
            code="too_deep",
        )
    return request


_FREE_FORM = ("mm_processor_kwargs", "chat_template_kwargs")
# apply_chat_template arguments that change how the prompt is built, not what the template renders.
_RENDER_KEYS = frozenset({
    "tokenize", "return_dict", "return_tensors", "return_assistant_tokens_mask", "padding", "truncation",
    "max_length", "conversation", "add_generation_prompt", "continue_final_message", "tokenizer_kwargs",
})


def _depth_over(value: Any, limit: int) -> bool:
    """Whether containers nest deeper than `limit` in `value` (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False
