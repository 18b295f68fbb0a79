"""Tool calls and reasoning: what a chat request asks of vLLM's output parsers, and the model's text
split by them into content, reasoning and calls, whole or delta by delta.

vLLM's parsers do the parsing (`--tool-call-parser`, `--reasoning-parser`); this module decides when
they run, turns a forced call (`tool_choice` "required" or named) into the grammar vLLM's parser
builds for it, and shapes what they return as OpenAI's messages and deltas. A request that needs
no parser (no tools, no reasoning parser) does not pay for one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from qwen_server import protocol as p
from qwen_server.engine import vllm_compat
from qwen_server.engine.lifecycle import Engine
from qwen_server.errors import bad_request, clip
from qwen_server.settings import Settings

log = logging.getLogger("qwen_server")


def effective_tool_choice(req: p.ChatCompletionRequest) -> str | p.NamedToolChoice:
    """OpenAI's default: "auto" when there are tools, "none" without."""
    if req.tool_choice is not None:
        return req.tool_choice
    return "auto" if req.tools else "none"


def check_tool_request(req: p.ChatCompletionRequest, settings: Settings) -> None:
    """tool_choice against the tools and the server's options, as vLLM's server checks it."""
    choice = effective_tool_choice(req)
    if choice == "none":
        return
    if not req.tools:
        raise bad_request("tool_choice needs tools.", "tool_choice")
    if isinstance(choice, p.NamedToolChoice):
        names = [tool.function.name for tool in req.tools]
        if choice.function.name not in names:
            raise bad_request(
                f"tool_choice names the function {clip(repr(choice.function.name))}, which is not in tools "
                f"({', '.join(map(repr, names))}).",
                "tool_choice.function.name",
            )
    if not settings.tool_call_parser:
        described = f'function "{choice.function.name}"' if isinstance(choice, p.NamedToolChoice) else f'"{choice}"'
        hint = "--enable-auto-tool-choice and --tool-call-parser" if choice == "auto" else "--tool-call-parser"
        raise bad_request(
            f"tool_choice {described} needs the server to be started with {hint} (e.g. hermes for Qwen-VL).",
            "tool_choice",
            code="tools_not_enabled",
        )
    if choice == "auto" and not settings.enable_auto_tool_choice:
        raise bad_request(
            'tool_choice "auto" (the default with tools) needs the server to be started with '
            '--enable-auto-tool-choice; or send tool_choice "required", "none" or a named function.',
            "tool_choice",
            code="tools_not_enabled",
        )


@dataclass(slots=True)
class ParsePlan:
    """How one chat request's output is parsed: vLLM's parser class and vLLM's view of the request
    (after the parser adjusted it: a forced call becomes a structural tag)."""

    parser_cls: type
    request: Any  # vLLM's ChatCompletionRequest
    tokenizer: Any
    model_config: Any
    template_kwargs: dict[str, Any]
    named: bool  # a named tool_choice: finish_reason stays "stop" (OpenAI's and vLLM's)
    single_call: bool  # parallel_tool_calls false
    reasoning: bool  # a reasoning parser is on: usage reports reasoning tokens
    prompt_token_ids: list[int] = field(default_factory=list)
    # The parser that adjusted the request: it answers is_reasoning_end (a pure function of the ids)
    # too, so the request does not build another before its output is parsed.
    probe: Any = None

    def new_parser(self) -> Any:
        """A parser for one choice (they keep state)."""
        parser = self.parser_cls(
            self.tokenizer,
            self.request.tools,
            chat_template_kwargs=self.template_kwargs,
            model_config=self.model_config,
        )
        parser.set_prompt_token_ids(self.prompt_token_ids)
        return parser

    def tools_grammar(self) -> Any:
        """The grammar vLLM's parser made for a forced call (tool_choice "required" or named, or
        tools constrained by --tool-strict-level), if any."""
        return getattr(self.request, "structured_outputs", None)

    def engine_options(self, prompt_token_ids: list[int]) -> dict[str, Any]:
        """AsyncLLM.generate's reasoning keywords: whether the prompt already ended the reasoning, so
        that structured output constrains only what follows it."""
        self.prompt_token_ids = prompt_token_ids
        parser = self.probe if self.probe is not None else self.new_parser()
        options: dict[str, Any] = {"reasoning_ended": self.request.resolve_reasoning_ended(parser, prompt_token_ids)}
        if parser.reasoning_parser is not None:
            options["reasoning_parser_kwargs"] = {"chat_template_kwargs": self.template_kwargs}
        return options

    def finish_reason(self, called: bool, finish: str | None) -> str | None:
        """vLLM's: "tool_calls" when the model stopped after calls, unless the call was named."""
        if called and finish == "stop" and not self.named:
            return "tool_calls"
        return finish

    def whole(self, text: str, token_ids: Sequence[int], finish: str | None) -> ParsedChoice:
        if self.request.tools:
            # With tools, the stream's parser: vLLM's whole-output parsers re-encode a call's arguments
            # (the stream sent the model's own text) and turn a call cut by max_tokens into content (the
            # stream already sent its name). A complete output is fed in one piece; a cut one token by
            # token, as a stream gets it, because vLLM's hermes parser finishes a call cut in its
            # arguments' whitespace differently by where the chunks end ("{}" or "").
            if finish == "length" and token_ids:
                pieces = vllm_compat.token_texts(self.tokenizer, list(token_ids))
                if "".join(pieces) == text:
                    return self.stream().whole_in_steps(pieces, token_ids, finish)
            return self.stream().whole(text, token_ids, finish)
        parser = self.new_parser()
        try:
            reasoning, content, calls = parser.parse(
                text, self.request, enable_auto_tools=True, model_output_token_ids=token_ids
            )
        except Exception as exc:  # noqa: BLE001 - vLLM's parser failed on this output: the text is kept
            return ParsedChoice(text, None, [], finish, 0, f"{type(exc).__name__}: {clip(str(exc))}")
        calls = list(calls or [])
        if self.single_call:
            calls = calls[:1]
        tool_calls = [
            p.ToolCall(
                id=call.id or vllm_compat.make_tool_call_id(), function=p.FunctionCall(call.name, call.arguments)
            )
            for call in calls
        ]
        if tool_calls and not (content or "").strip():
            content = None
        if not self.request.include_reasoning:
            reasoning = None
        tokens = parser.count_reasoning_tokens(token_ids) if self.reasoning else 0
        return ParsedChoice(content, reasoning, tool_calls, self.finish_reason(bool(tool_calls), finish), tokens)

    def stream(self) -> StreamSplitter:
        return StreamSplitter(self, self.new_parser())


@dataclass(slots=True)
class ParsedChoice:
    content: str | None
    reasoning: str | None
    tool_calls: list[p.ToolCall]
    finish: str | None
    reasoning_tokens: int
    parse_error: str | None = None


class StreamSplitter:
    """One streamed choice through its parser: each step's text and tokens to a delta (or None
    while the parser holds text back, e.g. a marker not yet complete)."""

    def __init__(self, plan: ParsePlan, parser: Any) -> None:
        self.plan = plan
        self.parser = parser
        self.token_ids: list[int] = []
        self.called = False
        self._ids: dict[int, str] = {}  # call index -> its id
        # With tools, whitespace-only content is held back until text follows it: a whole answer
        # whose only other output is calls has null content (vLLM's), and a stream must not have
        # sent the newlines between the reasoning and the calls meanwhile.
        self._held = "" if plan.request.tools else None
        self._sent_text = False
        self.failed = False  # the parser raised: what follows passes through as content

    def feed(self, text: str, token_ids: Sequence[int], finish: str | None) -> tuple[p.Delta | None, str | None]:
        """The delta for this step and the choice's finish_reason (None until it finishes)."""
        self.token_ids.extend(token_ids)
        if self.failed:
            delta: p.Delta | None = p.Delta(content=text) if text else None
        else:
            try:
                message = self.parser.parse_delta(
                    text, list(token_ids), self.plan.request, self.plan.prompt_token_ids, finished=finish is not None
                )
            except Exception as exc:  # noqa: BLE001 - vLLM's parser failed on this output: the rest is text
                log.warning(
                    "the output parser failed mid-stream (%s: %s); the rest is sent as content",
                    type(exc).__name__,
                    clip(str(exc)),
                )
                self.failed = True
                message = None
                delta = p.Delta(content=text) if text else None
            else:
                delta = self._delta(message) if message is not None else None
        if self._held is not None:
            delta = self._hold_whitespace(delta, finished=finish is not None)
        return delta, (self.plan.finish_reason(self.called, finish) if finish is not None else None)

    def _hold_whitespace(self, delta: p.Delta | None, *, finished: bool) -> p.Delta | None:
        held = self._held or ""
        content = held + (delta.content or "") if delta is not None else held
        if content.strip() or (finished and (self._sent_text or not self.called)):
            self._held = ""
            self._sent_text = self._sent_text or bool(content.strip())
        else:
            self._held, content = content, ""
        if delta is None:
            return p.Delta(content=content) if content else None
        delta.content = content or None
        return None if delta.content is None and delta.reasoning is None and delta.tool_calls is None else delta

    def reasoning_tokens(self) -> int:
        return self.parser.count_reasoning_tokens(self.token_ids) if self.plan.reasoning else 0

    def whole(self, text: str, token_ids: Sequence[int], finish: str | None) -> ParsedChoice:
        """The output fed in one piece, shaped as a whole message."""
        return self.whole_in_steps([text], [token_ids], finish)

    def whole_in_steps(self, texts: list[str], token_ids: Sequence[Any], finish: str | None) -> ParsedChoice:
        """The output fed step by step (`texts[i]` is step i's text; `token_ids[i]` its token, or
        its tokens), the deltas put together as a whole message."""
        content, reasoning = "", ""
        calls: dict[int, p.ToolCall] = {}
        for i, text in enumerate(texts):
            ids = token_ids[i]
            step = [ids] if isinstance(ids, int) else list(ids)
            delta, _ = self.feed(text, step, finish if i == len(texts) - 1 else None)
            if delta is None:
                continue
            content += delta.content or ""
            reasoning += delta.reasoning or ""
            for call in delta.tool_calls or ():
                function = call.function or p.DeltaFunction()
                if call.id is not None:
                    calls[call.index] = p.ToolCall(id=call.id, function=p.FunctionCall(function.name or "", ""))
                if call.index in calls:
                    calls[call.index].function.arguments += function.arguments or ""
        finish_reason = self.plan.finish_reason(self.called, finish)
        return ParsedChoice(
            content or None,
            reasoning or None,
            [calls[i] for i in sorted(calls)],
            finish_reason,
            self.reasoning_tokens(),
        )

    def _delta(self, message: Any) -> p.Delta | None:
        calls = []
        for call in message.tool_calls or ():
            index = call.index
            if self.plan.single_call and index > 0:
                continue
            self.called = True
            function = call.function
            name = function.name if function is not None else None
            call_id = call.id
            if index not in self._ids and (call_id or name):
                call_id = self._ids[index] = call_id or vllm_compat.make_tool_call_id()
            elif call_id is not None:
                call_id = None  # the id goes with a call's first fragment only
            calls.append(
                p.DeltaToolCall(
                    index=index,
                    id=call_id,
                    type="function" if call_id is not None else None,
                    function=p.DeltaFunction(name=name, arguments=function.arguments if function else None)
                    if function is not None
                    else None,
                )
            )
        reasoning = message.reasoning if self.plan.request.include_reasoning else None
        if not message.content and not reasoning and not calls:
            return None
        return p.Delta(
            content=message.content or None,
            reasoning=reasoning or None,
            reasoning_content=reasoning or None,
            tool_calls=calls or None,
        )


def plan(req: p.ChatCompletionRequest, engine: Engine, template_kwargs: dict[str, Any]) -> ParsePlan | None:
    """The request's parse plan, or None when no parser applies (no tools, no reasoning parser)."""
    settings: Settings = engine.settings
    parser_cls = engine.output_parser
    if parser_cls is None or not (req.tools or settings.reasoning_parser):
        return None
    choice = effective_tool_choice(req)
    fields: dict[str, Any] = {
        # The parsers read no message but the count of earlier calls (for Kimi's call ids).
        "messages": [
            {
                "role": m.role,
                "content": "",
                **({"tool_calls": msgspec.to_builtins(m.tool_calls)} if m.tool_calls else {}),
            }
            for m in req.messages
        ],
        "tool_choice": msgspec.to_builtins(choice),
        "include_reasoning": req.include_reasoning,
        "stream": req.stream,
        "chat_template_kwargs": template_kwargs,
    }
    if req.tools:
        fields["tools"] = msgspec.to_builtins(req.tools)
    if req.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = req.parallel_tool_calls
    try:
        request = vllm_compat.parser_request(fields)
    except vllm_compat.request_validation_errors() as exc:
        raise bad_request(f"Invalid tools or tool_choice: {clip(str(exc))}", "tools") from None
    result = ParsePlan(
        parser_cls=parser_cls,
        request=request,
        tokenizer=engine.tokenizer,
        model_config=engine.model_config,
        template_kwargs=template_kwargs,
        named=isinstance(choice, p.NamedToolChoice),
        single_call=req.parallel_tool_calls is False,
        reasoning=bool(settings.reasoning_parser),
    )
    parser = result.probe = result.new_parser()
    try:
        result.request = parser.adjust_request(request)
    except vllm_compat.request_validation_errors() as exc:
        raise bad_request(f"The tools cannot be used: {clip(str(exc))}", "tools") from None
    return result
