"""Tool calls and reasoning out of canned model outputs (a CannedEngine, named as such: no model),
through the chat service's real loops and vLLM's real parsers on the tiny checkpoint's tokenizer:
every chunking of an output gives what the whole output gives. Here, not in tests/unit, because it
imports vLLM; no engine is started. And the chat options checked at start."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from qwen_server import protocol as p
from qwen_server.engine import vllm_compat
from qwen_server.errors import ServiceError
from qwen_server.logs import RequestRecord
from qwen_server.service.chat import ChatService
from qwen_server.settings import Settings
from tests.helpers.canned_engine import CannedEngine

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "click",
            "description": "Click at a point of the screen.",
            "parameters": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
            },
        },
    },
    {"type": "function", "function": {"name": "type_text", "parameters": {"type": "object"}}},
]
CALL = '<tool_call>\n{"name": "click", "arguments": {"x": 12, "y": 34}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def service(tokenizer: Any, **options: Any) -> tuple[ChatService, CannedEngine]:
    settings = Settings(**options)
    engine = CannedEngine(settings, tokenizer)
    return ChatService(engine, None, settings), engine  # type: ignore[arg-type]


def request(**fields: Any) -> p.ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "Click the button."}], **fields}
    return msgspec.convert(body, p.ChatCompletionRequest)


def run(
    svc: ChatService,
    engine: CannedEngine,
    req: p.ChatCompletionRequest,
    chunks: list[list[int]],
    finish: str = "stop",
    prompt: str = "<|im_start|>assistant\n",
    template_kwargs: dict[str, Any] | None = None,
) -> Any:
    """The whole response (stream false) or the stream's chunks decoded (stream true), for a prompt
    rendered as `prompt` with `template_kwargs`."""
    engine.answer(chunks, finish)
    prompt_ids = engine.tokenizer.encode(prompt)
    prep = svc.prepared(req, RequestRecord("r"), "tiny", {"prompt_token_ids": prompt_ids}, template_kwargs or {})
    if not req.stream:
        return msgspec.to_builtins(asyncio.run(svc.complete(prep)))

    async def frames() -> list[bytes]:
        return [frame async for frame in svc.stream(prep)]

    out = []
    for event in b"".join(asyncio.run(frames())).split(b"\n\n")[:-1]:  # a yield may hold several events
        assert event.startswith(b"data: ")
        data = event[6:].strip()
        if data != b"[DONE]":
            out.append(json.loads(data))
    return out


def gathered(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream's deltas put together the way OpenAI's SDK helpers do: content, reasoning, calls."""
    content, reasoning, finish = "", "", None
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        assert "error" not in chunk, chunk
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            reasoning += delta.get("reasoning") or ""
            assert delta.get("reasoning") == delta.get("reasoning_content")
            for call in delta.get("tool_calls") or ():
                entry = calls.setdefault(call["index"], {"id": None, "name": None, "arguments": ""})
                if call.get("id"):
                    assert entry["id"] is None, "an id is sent once, with the call's first fragment"
                    assert call["type"] == "function" and call["function"]["name"]
                    entry["id"] = call["id"]
                fn = call.get("function") or {}
                if fn.get("name"):
                    entry["name"] = fn["name"]
                entry["arguments"] += fn.get("arguments") or ""
            finish = choice["finish_reason"] or finish
    return {
        "content": content or None,
        "reasoning": reasoning or None,
        "calls": [calls[i] for i in sorted(calls)],
        "finish": finish,
    }


def whole(response: dict[str, Any]) -> dict[str, Any]:
    (choice,) = response["choices"]
    message = choice["message"]
    assert message.get("reasoning") == message.get("reasoning_content")
    assert "tool_calls" not in message or message["tool_calls"], "absent when there are none, as OpenAI sends it"
    return {
        "content": message["content"] or None,
        "reasoning": message.get("reasoning"),
        "calls": [
            {"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in message.get("tool_calls", ())
        ],
        "finish": choice["finish_reason"],
    }


def chunkings(ids: list[int]) -> list[list[list[int]]]:
    """Token by token, in one piece, and in two pieces split at every token boundary."""
    return [[[t] for t in ids], [ids]] + [[ids[:k], ids[k:]] for k in range(1, len(ids))]


def same_but_ids(a: dict[str, Any], b: dict[str, Any]) -> bool:
    strip = lambda r: {**r, "calls": [{**c, "id": bool(c["id"])} for c in r["calls"]]}  # noqa: E731
    return strip(a) == strip(b)


def test_auto_tool_call_is_the_same_whole_and_at_every_chunking(tokenizer: Any) -> None:
    svc, engine = service(tokenizer, enable_auto_tool_choice=True, tool_call_parser="hermes")
    ids = tokenizer.encode("Sure.\n" + CALL.replace(", ", ",\n  "))  # arguments as the model wrote them
    expected = whole(run(svc, engine, request(tools=TOOLS), [ids]))
    assert expected["calls"][0]["name"] == "click"
    assert expected["calls"][0]["arguments"] == '{"x": 12,\n  "y": 34}'  # the model's text, not re-encoded
    assert expected["calls"][0]["id"]
    assert expected["finish"] == "tool_calls"
    assert expected["content"].strip() == "Sure."
    for chunks in chunkings(ids):
        got = gathered(run(svc, engine, request(tools=TOOLS, stream=True), chunks))
        assert same_but_ids(got, expected), (chunks, got)
        assert "<tool_call>" not in (got["content"] or "")


def test_only_calls_give_null_content_and_two_calls_keep_their_order(tokenizer: Any) -> None:
    svc, engine = service(tokenizer, enable_auto_tool_choice=True, tool_call_parser="hermes")
    second = '<tool_call>\n{"name": "type_text", "arguments": {"text": "hi"}}\n</tool_call>'
    ids = tokenizer.encode(CALL + "\n" + second)
    expected = whole(run(svc, engine, request(tools=TOOLS), [ids]))
    assert expected["content"] is None
    assert [c["name"] for c in expected["calls"]] == ["click", "type_text"]
    for chunks in chunkings(ids)[:1] + chunkings(ids)[5::7]:
        got = gathered(run(svc, engine, request(tools=TOOLS, stream=True), chunks))
        assert same_but_ids(got, expected), (chunks, got)
    # parallel_tool_calls false: the first call only, on both paths
    single = whole(run(svc, engine, request(tools=TOOLS, parallel_tool_calls=False), [ids]))
    assert [c["name"] for c in single["calls"]] == ["click"]
    streamed = gathered(
        run(svc, engine, request(tools=TOOLS, parallel_tool_calls=False, stream=True), [[t] for t in ids])
    )
    assert [c["name"] for c in streamed["calls"]] == ["click"]


@pytest.mark.parametrize(
    "cut",
    [
        "Sure.\n" + CALL[:-22],  # inside the arguments
        '<tool_call>\n{"name": "click", "arguments": \n\n\n',  # in the whitespace before them
    ],
)
def test_a_call_cut_by_max_tokens_is_the_same_whole_and_streamed_token_by_token(tokenizer: Any, cut: str) -> None:
    """A stream gets one token a step (vLLM's engine makes one per step); vLLM's hermes parser ends a
    call cut before its arguments differently when its chunks are longer, so only the token-by-token
    stream is held to the whole answer for the second case."""
    svc, engine = service(tokenizer, enable_auto_tool_choice=True, tool_call_parser="hermes")
    ids = tokenizer.encode(cut)
    expected = whole(run(svc, engine, request(tools=TOOLS), [ids], finish="length"))
    assert expected["finish"] == "length" and [c["name"] for c in expected["calls"]] == ["click"]
    for chunks in chunkings(ids) if "Sure" in cut else chunkings(ids)[:1]:
        got = gathered(run(svc, engine, request(tools=TOOLS, stream=True), chunks, finish="length"))
        assert same_but_ids(got, expected), (chunks, got, expected)


def test_text_without_calls_passes_through_and_tool_choice_none_parses_none(tokenizer: Any) -> None:
    svc, engine = service(tokenizer, enable_auto_tool_choice=True, tool_call_parser="hermes")
    ids = tokenizer.encode("No call is needed.")
    assert whole(run(svc, engine, request(tools=TOOLS), [ids])) == {
        "content": "No call is needed.",
        "reasoning": None,
        "calls": [],
        "finish": "stop",
    }
    ids = tokenizer.encode(CALL)
    none = whole(run(svc, engine, request(tools=TOOLS, tool_choice="none"), [ids]))
    assert none["calls"] == [] and none["finish"] == "stop"


def test_reasoning_is_split_from_the_answer_at_every_chunking(tokenizer: Any) -> None:
    svc, engine = service(tokenizer, reasoning_parser="qwen3")
    ids = tokenizer.encode("The user wants a click.\n</think>\n\nDone.")
    expected = whole(run(svc, engine, request(), [ids], prompt="<|im_start|>assistant\n<think>\n"))
    assert expected["reasoning"].strip() == "The user wants a click."
    assert expected["content"].strip() == "Done."
    for chunks in chunkings(ids):
        got = gathered(run(svc, engine, request(stream=True), chunks, prompt="<|im_start|>assistant\n<think>\n"))
        assert got == expected, (chunks, got)


def test_reasoning_without_its_end_is_all_reasoning_and_a_closed_prompt_all_content(tokenizer: Any) -> None:
    svc, engine = service(tokenizer, reasoning_parser="qwen3")
    ids = tokenizer.encode("Still thinking about it")
    thinking = whole(run(svc, engine, request(), [ids], finish="length", prompt="<|im_start|>assistant\n<think>\n"))
    assert thinking["content"] is None and thinking["reasoning"] == "Still thinking about it"
    # enable_thinking false: the template closed the block in the prompt
    closed = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    off = {"enable_thinking": False}
    answer = whole(run(svc, engine, request(), [ids], finish="length", prompt=closed, template_kwargs=off))
    assert answer == {"content": "Still thinking about it", "reasoning": None, "calls": [], "finish": "length"}
    streamed = gathered(
        run(svc, engine, request(stream=True), [[t] for t in ids], finish="length", prompt=closed, template_kwargs=off)
    )
    assert streamed == answer
    # include_reasoning false drops it
    hidden = whole(
        run(
            svc,
            engine,
            request(include_reasoning=False),
            [ids],
            finish="length",
            prompt="<|im_start|>assistant\n<think>\n",
        )
    )
    assert hidden["reasoning"] is None


def test_usage_counts_reasoning_tokens_with_a_reasoning_parser(tokenizer: Any) -> None:
    svc, engine = service(tokenizer, reasoning_parser="qwen3")
    ids = tokenizer.encode("Hmm.\n</think>\n\nYes.")
    body = run(svc, engine, request(), [ids], prompt="<|im_start|>assistant\n<think>\n")
    reasoning_tokens = body["usage"]["completion_tokens_details"]["reasoning_tokens"]
    assert 0 < reasoning_tokens < len(ids)
    chunks = run(
        svc,
        engine,
        request(stream=True, stream_options={"include_usage": True}),
        [[t] for t in ids],
        prompt="<|im_start|>assistant\n<think>\n",
    )
    assert chunks[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == reasoning_tokens
    plain, plain_engine = service(tokenizer)
    assert "completion_tokens_details" not in run(plain, plain_engine, request(), [ids])["usage"]


def test_reasoning_and_tools_together(tokenizer: Any) -> None:
    svc, engine = service(tokenizer, reasoning_parser="qwen3", enable_auto_tool_choice=True, tool_call_parser="hermes")
    ids = tokenizer.encode("I should click.\n</think>\n\n" + CALL)
    prompt = "<|im_start|>assistant\n<think>\n"
    expected = whole(run(svc, engine, request(tools=TOOLS), [ids], prompt=prompt))
    assert expected["reasoning"].strip() == "I should click."
    assert [c["name"] for c in expected["calls"]] == ["click"] and expected["finish"] == "tool_calls"
    for chunks in chunkings(ids)[::3]:
        got = gathered(run(svc, engine, request(tools=TOOLS, stream=True), chunks, prompt=prompt))
        assert same_but_ids(got, expected), (chunks, got)


def test_forced_calls_become_a_grammar_and_reasoning_state_reaches_the_engine(tokenizer: Any) -> None:
    svc, _ = service(tokenizer, tool_call_parser="hermes", reasoning_parser="qwen3")
    named = request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "click"}})
    prep = svc.prepared(named, RequestRecord("r"), "tiny", {"prompt_token_ids": tokenizer.encode("<think>\n")}, {})
    begins = [tag["begin"] for tag in json.loads(prep.sampling.structured_outputs.structural_tag)["format"]["tags"]]
    assert begins and all('"name": "click"' in begin for begin in begins)
    assert prep.engine_options["reasoning_ended"] is False  # the grammar waits for the reasoning's end
    closed = tokenizer.encode("<think>\n\n</think>\n\n")
    prep = svc.prepared(
        request(tools=TOOLS, tool_choice="required"), RequestRecord("r"), "tiny", {"prompt_token_ids": closed}, {}
    )
    assert "type_text" in prep.sampling.structured_outputs.structural_tag
    assert prep.engine_options["reasoning_ended"] is True


@pytest.mark.parametrize(
    ("options", "fields", "param", "says"),
    [
        ({}, {"tools": TOOLS}, "tool_choice", "--enable-auto-tool-choice"),
        (
            {"tool_call_parser": "hermes"},
            {"tools": TOOLS, "tool_choice": "auto"},
            "tool_choice",
            "--enable-auto-tool-choice",
        ),
        ({}, {"tools": TOOLS, "tool_choice": "required"}, "tool_choice", "--tool-call-parser"),
        ({"tool_call_parser": "hermes"}, {"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tool_call_parser": "hermes"},
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "scroll"}}},
            "tool_choice.function.name",
            "'scroll'",
        ),
    ],
)
def test_tool_requests_the_server_cannot_serve_are_refused_with_what_to_enable(
    tokenizer: Any, options: dict[str, Any], fields: dict[str, Any], param: str, says: str
) -> None:
    from qwen_server.service.parsing import check_tool_request

    with pytest.raises(ServiceError) as err:
        check_tool_request(request(**fields), Settings(**options))
    assert err.value.param == param and says in err.value.message
    # tool_choice "none" with tools is served anywhere: the tools are shown, no call is parsed
    check_tool_request(request(tools=TOOLS, tool_choice="none"), Settings())


def test_chat_options_vllm_cannot_use_stop_the_start_naming_the_option(tokenizer: Any, tmp_path: Path) -> None:
    with pytest.raises(vllm_compat.ChatOptionsError, match=r"--reasoning-parser 'nope' is not one of vLLM's: .*qwen3"):
        vllm_compat.check_chat_options(Settings(reasoning_parser="nope"))
    with pytest.raises(vllm_compat.ChatOptionsError, match="--chat-template"):
        vllm_compat.check_chat_options(Settings(chat_template=str(tmp_path / "missing.jinja")))
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    assert (
        vllm_compat.check_chat_options(Settings(chat_template=str(tmp_path / "t.jinja")))
        == "{{ messages[0]['content'] }}"
    )
    assert vllm_compat.check_chat_options(Settings(chat_template="{{ 'literal' }}")) == "{{ 'literal' }}"
    # A parser whose markers the tokenizer lacks (Llama's <|python_tag|>) fails once the tokenizer is known.
    with pytest.raises(vllm_compat.ChatOptionsError, match="llama3_json cannot be used with the tokenizer"):
        vllm_compat.output_parser_class(Settings(tool_call_parser="llama3_json"), tokenizer, "tiny")


def test_a_parser_that_fails_mid_stream_leaves_the_rest_as_content(tokenizer: Any) -> None:
    svc, engine = service(tokenizer, enable_auto_tool_choice=True, tool_call_parser="hermes")
    real = engine.output_parser
    assert real is not None

    class Failing(real):  # type: ignore[misc, valid-type]
        calls = 0

        def parse_delta(self, *args: Any, **kwargs: Any) -> Any:
            Failing.calls += 1
            if Failing.calls == 3:
                raise RuntimeError("parser bug")
            return super().parse_delta(*args, **kwargs)

    engine.output_parser = Failing
    ids = tokenizer.encode("Hello there, no call.")
    got = gathered(run(svc, engine, request(tools=TOOLS, stream=True), [[t] for t in ids]))
    assert got["finish"] == "stop" and got["calls"] == []
    assert got["content"].endswith(tokenizer.decode(ids[3:]))  # from the failure on, the text as it came


def test_tools_reach_the_template_unless_excluded_for_tool_choice_none(tokenizer: Any) -> None:
    shown, _ = service(tokenizer)
    hidden, _ = service(tokenizer, exclude_tools_when_tool_choice_none=True)
    none = request(tools=TOOLS, tool_choice="none")
    rendered = shown._template_tools(none)
    assert rendered is not None and [t["function"]["name"] for t in rendered] == ["click", "type_text"]
    assert "strict" not in rendered[1]["function"]  # unset fields are not rendered as nulls
    assert hidden._template_tools(none) is None
    assert hidden._template_tools(request(tools=TOOLS, tool_choice="required")) is not None
    assert shown._template_tools(request(tools=[])) is None  # [] is no tools
