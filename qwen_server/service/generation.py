"""What the chat and completion endpoints share: the prepared request, the context window's limits,
vLLM's renderer, and running the engine for a whole response or a stream of SSE frames.

Streams use the engine's DELTA mode (each step carries only the new tokens); non-streaming requests
its FINAL_ONLY mode (one output at the end). Each endpoint (chat.py, completion.py) prepares its
requests and says how its choices and bodies look; the loops here are the same for both.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from qwen_server import protocol as p
from qwen_server.engine import vllm_compat
from qwen_server.engine.lifecycle import Engine
from qwen_server.errors import Kind, ServiceError, bad_request, clip, envelope
from qwen_server.logs import RequestRecord
from qwen_server.service.sampling import Sampling
from qwen_server.settings import Settings

DONE = b"data: [DONE]\n\n"
log = logging.getLogger("qwen_server")


@dataclass(slots=True)
class Prompt:
    """One prompt for the engine: the rendered input, its token count, and its text for echo."""

    engine_input: Any
    length: int
    text: str = ""
    cached: int = 0  # of its tokens, how many the prefix cache served (the engine says, with its outputs)
    cache_created: int | None = None


@dataclass(slots=True)
class PreparedRequest:
    """A request ready for the engine: the rendered prompts and their sampling parameters."""

    request_id: str  # the response's id
    engine_request_id: str  # the client's X-Request-Id (or a generated one)
    record: RequestRecord
    model: str
    prompts: list[Prompt]  # several for a batched completion; choice i * n + j is prompt i's j-th
    sampling: Any
    n: int
    stream: bool
    logprobs: int | None  # top-k to report; None: no logprobs
    echo: bool = False
    # The endpoint's own per-request state for shaping output (chat: the tool and reasoning parse plan).
    parsing: Any = None
    # AsyncLLM.generate's extra keywords for every prompt (priority; chat: where structured output starts).
    engine_options: dict[str, Any] = field(default_factory=dict)
    stream_options: p.StreamOptions | None = None  # checked by sampling.check_common
    # The field a grammar came from (response_format, structured_outputs, tools), if the engine gets one.
    constraint: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def include_usage(self) -> bool:
        """stream_options.include_usage: a usage chunk before [DONE]."""
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """stream_options.continuous_usage_stats: usage in every chunk."""
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    @property
    def prompt_len(self) -> int:
        return sum(prompt.length for prompt in self.prompts)


@dataclass(slots=True)
class Piece:
    """The text of one choice (whole, or one stream step's) and what describes it."""

    text: str
    logprobs: list[p.TokenLogprob] | None = None
    finish: str | None = None
    offset: int = 0  # characters of the choice's text before this piece (completions' text_offset)
    echoed: int = 0  # how many of `logprobs` are the prompt's (completions' echo)
    token_ids: Sequence[int] = ()  # the tokens of `text` (what output parsers read besides the text)


def check_token_ids(ids: list[Any], vocab: int, param: str) -> list[int]:
    """`ids`, if each is a token of the vocabulary and there is at least one; else a 400 naming the first bad one."""
    for j, token in enumerate(ids):
        if type(token) is not int or not 0 <= token < vocab:
            raise bad_request(
                f"Token id {clip(repr(token), 40)} is not in the vocabulary of {vocab} tokens.",
                f"{param}[{j}]",
                code="invalid_token_id",
            )
    if not ids:
        raise bad_request("A prompt of token ids must not be empty.", param)
    return ids


# Characters JSON may carry raw that line readers built on str.splitlines (httpx's aiter_lines, and
# the clients written with it) take for line ends, cutting an SSE frame in two: escaped, so every
# frame is one line to every reader. A random-weight or misbehaving model does emit them. In UTF-8,
# these bytes can only be these characters, and they can only occur inside JSON strings.
_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def frame(data: bytes) -> bytes:
    """One SSE event carrying the JSON `data`, on one line for any line reader."""
    if b"\xe2\x80" in data or b"\xc2\x85" in data:
        for raw, escaped in _LINE_BREAKS:
            data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


class Endpoint(abc.ABC):
    """One OpenAI endpoint's service. Subclasses prepare requests and shape choices and bodies."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.sampling = Sampling(engine)

    # --- the endpoint's own steps ---

    @abc.abstractmethod
    def decode(self, body: bytes) -> Any:
        """The request body as this endpoint's request struct, strictly and within the limits."""

    @abc.abstractmethod
    async def prepare(self, req: Any, record: RequestRecord) -> PreparedRequest:
        """The decoded request checked, rendered and ready for the engine; `record` gets its counts."""

    @abc.abstractmethod
    def choice(self, prep: PreparedRequest, index: int, piece: Piece, *, delta: bool) -> Any | None:
        """Choice `index` made of `piece`: whole (`delta` false) or a stream chunk's (None: this step
        has nothing to send, e.g. an output parser holds its text back)."""

    @abc.abstractmethod
    def body(self, prep: PreparedRequest, choices: list[Any], usage: p.Usage | None, *, chunk: bool) -> Any:
        """The response (or stream chunk) around `choices`."""

    @abc.abstractmethod
    def opening(self, prep: PreparedRequest, index: int) -> Any | None:
        """The choice a stream opens with for choice `index`, if any."""

    def usage(self, prep: PreparedRequest, completion_tokens: int) -> p.Usage:
        usage = p.Usage(prep.prompt_len, completion_tokens, prep.prompt_len + completion_tokens)
        if self.settings.enable_prompt_tokens_details:
            usage.prompt_tokens_details = prompt_tokens_details(prep.prompts)
        return usage

    # --- preparing: what both endpoints take from a request ---

    def engine_options(self, req: p.SamplingFields) -> dict[str, Any]:
        """AsyncLLM.generate's keywords both endpoints take from the request: its LoRA adapter (the
        `model` it names, checked by check_model) and its priority."""
        options: dict[str, Any] = {}
        if req.model is not None and req.model not in self.settings.model_names:
            adapter = self.engine.adapters.get(req.model)
            if adapter is None:  # unloaded since check_model: never run on the base model instead
                self.check_model(req.model)
                raise AssertionError("check_model accepts only served names")
            options["lora_request"] = adapter.request
        if req.priority:
            if self.settings.scheduling_policy != "priority":
                raise bad_request(
                    "priority needs the server to be started with --scheduling-policy priority.",
                    "priority",
                    code="unsupported_field",
                )
            options["priority"] = req.priority
        return options

    @staticmethod
    def salted(engine_input: Any, req: p.SamplingFields) -> Any:
        """The rendered prompt with the request's cache_salt: its prefix-cache blocks are keyed by
        it, so tenants with different salts never share (or time each other's) cached prefixes."""
        if req.cache_salt is not None:
            engine_input["cache_salt"] = req.cache_salt
        return engine_input

    # --- preparing: checks both endpoints make ---

    def check_model(self, model: str | None) -> str:
        """The name the answer reports: the base model's first name, or the LoRA adapter's."""
        names = self.settings.model_names
        if model is None or model in names:
            return names[0]
        if self.engine.adapters.get(model) is not None:
            return model
        served = [*names, *(a.name for a in self.engine.adapters.all())]
        raise ServiceError(
            Kind.NOT_FOUND,
            f"The model {clip(repr(model))} does not exist; this server serves {', '.join(map(repr, served))}.",
            param="model",
            code="model_not_found",
        )

    def check_text_fits(self, text: str, param: str) -> None:
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

    def check_prompt_fits(self, tokens: int, param: str) -> None:
        """Before the multimodal processor: images only add tokens."""
        limit = self.engine.max_model_len or 0
        if tokens >= limit:
            raise bad_request(
                f"The prompt is {tokens} tokens long, which leaves no room for output in the context of {limit} tokens.",
                param,
                code="context_length_exceeded",
            )

    def max_tokens(self, prompt_len: int, requested: int | None, param: str) -> int:
        """The output budget: what the client asked for if it fits, else what the context leaves
        (capped by the model's own default)."""
        limit = self.engine.max_model_len or 0
        self.check_prompt_fits(prompt_len, param)
        if requested is None:
            default = self.sampling.defaults().get("max_tokens")
            return min(limit - prompt_len, default) if default else limit - prompt_len
        if prompt_len + requested > limit:
            raise bad_request(
                f"The prompt ({prompt_len} tokens) plus max_tokens ({requested}) is {prompt_len + requested} "
                f"tokens, over the model's context of {limit} tokens.",
                "max_tokens",
                code="context_length_exceeded",
            )
        return requested

    async def render(self, client: Any, prompt: dict[str, Any]) -> Any:
        """vLLM's renderer runs the model's multimodal processor (image tokens expanded) off the loop."""
        try:
            (engine_input,) = await vllm_compat.render_prompts(client, [prompt])
        except vllm_compat.client_error() as exc:
            raise bad_request(str(exc), getattr(exc, "parameter", None)) from None
        except Exception as exc:  # noqa: BLE001 - the model's processor failed on this request's input
            # ValueError/TypeError for options it cannot use, AssertionError when a template drops the
            # image placeholder, ...: each is about this input, none about the server.
            log.info("the multimodal processor refused a request: %s: %s", type(exc).__name__, clip(str(exc)))
            raise bad_request(
                f"The input could not be processed: {type(exc).__name__}: {clip(str(exc))}", None
            ) from None
        return engine_input

    # --- running ---

    async def complete(self, prep: PreparedRequest) -> Any:
        count = prep.n * len(prep.prompts)
        texts: list[list[str]] = [[] for _ in range(count)]
        token_ids: list[list[int]] = [[] for _ in range(count)]
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
                token_ids[k].extend(o.token_ids)
                completion_tokens += len(o.token_ids)
                if prep.logprobs is not None and o.logprobs:
                    logprobs[k].extend(self._token_logprobs(o, prep.logprobs))
                if o.finish_reason is not None:
                    finish[k] = failed(prep, o, len(token_ids[k]))
            prep.record.completion_tokens = completion_tokens
        choices = []
        for k in range(count):
            echo = prep.prompts[k // prep.n].text
            lp = echoed[k // prep.n] + logprobs[k] if prep.logprobs is not None else None
            piece = Piece(
                echo + "".join(texts[k]),
                lp,
                finish[k],
                offset=len(echo),
                echoed=len(echoed[k // prep.n]),
                token_ids=token_ids[k],
            )
            choices.append(self.choice(prep, k, piece, delta=False))
        return self.body(prep, choices, self.usage(prep, completion_tokens), chunk=False)

    async def stream(self, prep: PreparedRequest) -> AsyncIterator[bytes]:
        """SSE frames: each choice's opening, then deltas, an optional usage chunk, then [DONE].
        An engine failure mid-stream becomes an error event, so no stream ends silently cut.

        Each yield is what one engine output makes (one or more events, one write for the server),
        and the last output's events go out with the end of the stream ([DONE] included)."""
        encode = p.encoder.encode
        completion_tokens = 0
        count = prep.n * len(prep.prompts)
        # Characters sent so far per choice: completions' text_offset counts from the start of the text.
        sent = [len(prep.prompts[k // prep.n].text) for k in range(count)]
        echo_pending = prep.echo and prep.logprobs is not None
        generated = [0] * count  # completion tokens per choice, for continuous usage
        unfinished = count  # choices without their finish reason yet
        pending: list[bytes] = []  # events not yet handed to the server
        try:
            # One choice per chunk, as vLLM and OpenAI send them: clients read choices[0]. The openings go
            # out with the engine's first output, as vLLM's do: clients and load generators (vLLM's own)
            # take the first chunk for the first token, so sending them sooner would fake a shorter TTFT.
            openings = []
            for k in range(count):
                if (first := self.opening(prep, k)) is not None:
                    usage = self._running_usage(prep, k, 0) if prep.continuous_usage else None
                    openings.append(frame(encode(self.body(prep, [first], usage, chunk=True))))
            async for i, out in self._run(prep):
                if openings:
                    pending += openings
                    openings = []
                if echo_pending and out.prompt_logprobs:  # the first output of prompt i carries them
                    echoed = self._prompt_logprobs(out, prep.logprobs or 0)
                    for k in range(i * prep.n, (i + 1) * prep.n):
                        piece = Piece(prep.prompts[i].text, echoed, echoed=len(echoed))
                        echo = self.choice(prep, k, piece, delta=True)
                        pending.append(frame(encode(self.body(prep, [echo], None, chunk=True))))
                for o in out.outputs:
                    k = i * prep.n + o.index
                    completion_tokens += len(o.token_ids)
                    generated[k] += len(o.token_ids)
                    prep.record.completion_tokens = completion_tokens
                    if o.finish_reason is not None:
                        unfinished -= 1
                        failed(prep, o, generated[k])
                    lp = self._token_logprobs(o, prep.logprobs) if prep.logprobs is not None and o.logprobs else None
                    if not o.text and o.finish_reason is None and not lp and prep.parsing is None:
                        continue  # the detokenizer holds back a partial character; its logprobs are still sent
                    piece = Piece(o.text, lp, o.finish_reason, offset=sent[k], token_ids=o.token_ids)
                    sent[k] += len(o.text)
                    if (choice := self.choice(prep, k, piece, delta=True)) is not None:  # None: nothing to send yet
                        usage = self._running_usage(prep, k, generated[k]) if prep.continuous_usage else None
                        pending.append(frame(encode(self.body(prep, [choice], usage, chunk=True))))
                if pending and unfinished > 0:  # the last output's events wait for the end, which follows at once
                    events = b"".join(pending)
                    pending.clear()
                    yield events
            pending += openings  # the engine gave nothing (an empty prompt's echo, say): still well-formed
            if prep.include_usage:
                pending.append(frame(encode(self.body(prep, [], self.usage(prep, completion_tokens), chunk=True))))
        except ServiceError as exc:
            pending.append(frame(envelope(exc.kind, exc.message, exc.param, exc.code)))
        except Exception:  # a defect of ours or vLLM's: the 200 is sent, so it can only be an event now
            log.exception("request %s failed mid-stream", prep.engine_request_id)
            pending.append(
                frame(
                    envelope(Kind.INTERNAL, "The server failed while streaming this response.", None, "internal_error")
                )
            )
        pending.append(DONE)
        yield b"".join(pending)

    def _running_usage(self, prep: PreparedRequest, k: int, generated: int) -> p.Usage:
        """Choice k's usage so far (continuous_usage_stats): its prompt's tokens and its own, as vLLM counts."""
        prompt_len = prep.prompts[k // prep.n].length
        return p.Usage(prompt_len, generated, prompt_len + generated)

    async def _run(self, prep: PreparedRequest) -> AsyncIterator[tuple[int, Any]]:
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

    async def _outputs(self, prep: PreparedRequest, i: int) -> AsyncIterator[Any]:
        request_id = prep.engine_request_id if len(prep.prompts) == 1 else f"{prep.engine_request_id}-{i}"
        try:
            prompt = prep.prompts[i]
            async for out in self.engine.generate(
                prompt.engine_input, prep.sampling, request_id, **prep.engine_options
            ):
                if out.num_cached_tokens is not None:
                    prompt.cached = out.num_cached_tokens
                prompt.cache_created = getattr(out, "num_cache_creation_tokens", None)
                yield out
        except vllm_compat.engine_dead_error():
            raise ServiceError(
                Kind.UNAVAILABLE, "The engine died while serving this request.", code="engine_dead"
            ) from None
        except vllm_compat.client_error() as exc:
            raise bad_request(str(exc), getattr(exc, "parameter", None)) from None

    # --- logprobs ---

    def _token_logprobs(self, output: Any, top: int) -> list[p.TokenLogprob]:
        return [
            item
            for token_id, entry in zip(output.token_ids, output.logprobs, strict=False)
            if (item := _logprob_entry(token_id, entry, top)) is not None
        ]

    def _prompt_logprobs(self, output: Any, top: int) -> list[p.TokenLogprob]:
        """The prompt's tokens with their logprobs (the first token has none), for echo."""
        items = []
        for position, (token_id, entry) in enumerate(
            zip(output.prompt_token_ids, output.prompt_logprobs, strict=False)
        ):
            item = _logprob_entry(token_id, entry, top) if entry else None
            if item is None:
                token = self.engine.tokenizer.decode([token_id]) if position == 0 else ""
                item = p.TokenLogprob(token=token, logprob=None, bytes=list(token.encode()), top_logprobs=[])
            items.append(item)
        return items


def failed(prep: PreparedRequest, output: Any, produced: int) -> str:
    """`output`'s finish reason, unless it is vLLM's "error" (the engine ended the request itself):
    then the error it stands for. With a grammar, the grammar is why: the engine could not compile
    it (vLLM's front-end check passes some it cannot, e.g. a regex ending in a backslash), or it
    rejected the tokens it had allowed (a schema that refers to itself): the request's input, a 400.
    Without one (a KV transfer or encoder cache failure), the engine's: a 500."""
    if output.finish_reason != "error":
        return str(output.finish_reason)
    if prep.constraint is not None:
        stage = "compile" if not produced else f"apply (after {produced} tokens)"
        raise bad_request(
            f"The engine could not {stage} the grammar of {prep.constraint}.", prep.constraint, code="invalid_grammar"
        )
    raise ServiceError(Kind.INTERNAL, "The engine ended this request with an error.", code="engine_error")


def prompt_tokens_details(prompts: Sequence[Prompt]) -> p.PromptTokensDetails:
    """The prompts' cached tokens and media placeholder tokens (vLLM's counts: each placeholder
    range's length, by modality)."""
    media: dict[str, int] = {}
    created: int | None = None
    for prompt in prompts:
        for modality, ranges in (prompt.engine_input.get("mm_placeholders") or {}).items():
            if ranges:
                media[modality] = media.get(modality, 0) + sum(r.length for r in ranges)
        if prompt.cache_created is not None:
            created = (created or 0) + prompt.cache_created
    return p.PromptTokensDetails(sum(prompt.cached for prompt in prompts), created, media or None)


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
            p.TopLogprob(
                token=lp.decoded_token or "",
                logprob=max(lp.logprob, -9999.0),
                bytes=list((lp.decoded_token or "").encode()),
            )
            for _, lp in tops
        ],
    )
