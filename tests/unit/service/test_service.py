"""Narrow unit tests of the services' SSE framing with a FAKE engine (a generator of made-up outputs;
no vLLM engine runs here); the real engine's streams are tested in test_api.py and test_reliability.py."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from qwen_server.engine.adapters import Adapters
from qwen_server.logs import RequestRecord
from qwen_server.service.chat import ChatService, template_kwargs
from qwen_server.service.completion import CompletionService
from qwen_server.service.generation import PreparedRequest, Prompt
from qwen_server.service.generation import frame as sse_frame
from qwen_server.settings import Settings


def _prepared() -> PreparedRequest:
    return PreparedRequest(
        request_id="chatcmpl-x",
        engine_request_id="x",
        record=RequestRecord("x"),
        model="tiny",
        prompts=[Prompt(None, 3)],
        sampling=None,
        n=1,
        stream=True,
        logprobs=None,
    )


def _output(text: str, finish: str | None = None) -> Any:
    return SimpleNamespace(
        outputs=[SimpleNamespace(index=0, text=text, token_ids=[1], finish_reason=finish, logprobs=None)],
        num_cached_tokens=None,
    )


def _events(service: ChatService) -> list[str]:
    async def collect() -> list[bytes]:
        return [frame async for frame in service.stream(_prepared())]

    return [event[6:].decode() for event in sse_events(asyncio.run(collect()))]


def sse_events(writes: list[bytes]) -> list[bytes]:
    """The events in what a stream yielded (each yield: one or more whole events, one server write)."""
    assert all(w.startswith(b"data: ") and w.endswith(b"\n\n") for w in writes)
    events = b"".join(writes).split(b"\n\n")[:-1]
    assert all(e.startswith(b"data: ") for e in events)
    return events


def _fake_engine(generate) -> Any:
    """A FAKE engine whose generate(engine_input, sampling, request_id) is `generate`."""
    return SimpleNamespace(generate=generate)


def _fake_service(generate) -> ChatService:
    return ChatService(
        engine=_fake_engine(lambda engine_input, sampling, request_id: generate(None)),
        media=None,  # type: ignore[arg-type]
        settings=Settings(),
    )


def test_a_stream_that_finishes_ends_with_done() -> None:
    async def generate(prep):
        yield _output("Hel")
        yield _output("lo", "stop")

    events = _events(_fake_service(generate))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:]] == ["Hel", "lo"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_the_opening_chunk_waits_for_the_engines_first_output() -> None:
    """Clients and load generators (vLLM's `bench serve` among them) take the first chunk for the first
    token: the role chunk goes out with the first output, as vLLM sends it, never before the engine answered."""
    asked = asyncio.Event()

    async def generate(prep):
        asked.set()
        await asyncio.sleep(0)
        yield _output("Hi", "stop")

    async def first_frame() -> tuple[bool, bytes]:
        frames = _fake_service(generate).stream(_prepared())
        first = await anext(frames)
        await frames.aclose()
        return asked.is_set(), first

    engine_asked, first = asyncio.run(first_frame())
    assert engine_asked, "the opening was sent before the engine was asked for anything"
    assert json.loads(sse_events([first])[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyError("k"), AssertionError()])
def test_an_unexpected_failure_mid_stream_becomes_an_error_event_not_a_silent_cut(
    failure: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    async def generate(prep):
        yield _output("Hel")
        raise failure

    events = _events(_fake_service(generate))
    assert events[-1] == "[DONE]"
    assert json.loads(events[1])["choices"][0]["delta"]["content"] == "Hel"  # what was sent stays sent
    error = json.loads(events[-2])["error"]
    assert error["code"] == "internal_error" and error["type"] and error["message"]
    assert "failed mid-stream" in caplog.text  # the traceback is logged for the operator


def test_cancellation_is_not_swallowed() -> None:
    """A client that left cancels the stream: that must propagate (it aborts the engine request)."""

    async def generate(prep):
        yield _output("Hel")
        await asyncio.sleep(3600)
        yield _output("never")

    async def run() -> list[bytes]:
        got: list[bytes] = []

        async def consume() -> None:
            async for frame in _fake_service(generate).stream(_prepared()):
                got.append(frame)

        task = asyncio.ensure_future(consume())
        while not got:  # the opening and "Hel", in one write
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return got

    got = asyncio.run(run())
    assert len(got) == 1 and len(sse_events(got)) == 2 and b"[DONE]" not in got[0]


def test_each_engine_output_is_one_write_and_the_last_goes_out_with_the_end() -> None:
    """One write per engine output (the openings go with the first, the usage chunk and [DONE] with
    the last), so a 16-token stream costs the server 16 sends, not 19; each event still stands alone."""

    async def generate(prep):
        yield _output("a")
        yield _output("b")
        yield _output("c", "length")

    service = _fake_service(generate)
    prep = _prepared()
    prep.stream_options = p.StreamOptions(include_usage=True)

    async def collect() -> list[bytes]:
        return [frame async for frame in service.stream(prep)]

    writes = asyncio.run(collect())
    per_write = [[e[6:] for e in sse_events([w])] for w in writes]
    assert [len(events) for events in per_write] == [2, 1, 3]
    opening, a = (json.loads(e) for e in per_write[0])
    assert opening["choices"][0]["delta"]["role"] == "assistant" and a["choices"][0]["delta"]["content"] == "a"
    c, usage, done = per_write[2]
    assert json.loads(c)["choices"][0]["finish_reason"] == "length"
    assert json.loads(usage)["choices"] == [] and json.loads(usage)["usage"]["completion_tokens"] == 3
    assert done == b"[DONE]"


# --- hostile input (issue #19): decoding depth, template options, limits, echoed input ---

from qwen_server import protocol as p  # noqa: E402
from qwen_server.errors import Kind, ServiceError, clip, envelope  # noqa: E402
from qwen_server.service.decode import decode_chat  # noqa: E402


def _chat_body(**extra: Any) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], **extra}).encode()


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize("field", ["unknown_field", "mm_processor_kwargs", "chat_template_kwargs", "whole_body"])
def test_json_nested_past_the_recursion_limit_is_a_400_naming_the_body(field: str) -> None:
    deep = "[" * 5000 + "]" * 5000  # was a RecursionError in msgspec, answered 500
    if field == "whole_body":
        body = b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001
    else:
        body = _chat_body()[:-1] + f', "{field}": {{"a": {deep}}}}}'.encode()
    with pytest.raises(ServiceError) as info:
        decode_chat(body, Settings())
    assert info.value.kind is Kind.INVALID and info.value.param == "body" and info.value.code == "too_deep"


def test_json_nested_too_deep_inside_a_message_is_a_400() -> None:
    body = (
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}]}"
    )
    with pytest.raises(ServiceError) as info:
        decode_chat(body, Settings())
    assert info.value.kind is Kind.INVALID and info.value.code == "too_deep"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"mm_processor_kwargs": _nested(65)}, "mm_processor_kwargs"),
        ({"chat_template_kwargs": {"x": [_nested(70)]}}, "chat_template_kwargs"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": _nested(65)}}},
            "response_format.json_schema.schema",
        ),
    ],
)
def test_free_form_fields_deeper_than_the_limit_are_refused(extra: dict, param: str) -> None:
    with pytest.raises(ServiceError) as info:
        decode_chat(_chat_body(**extra), Settings())
    assert info.value.param == param and info.value.code == "too_deep"
    decode_chat(_chat_body(mm_processor_kwargs=_nested(63)), Settings())  # within the default limit of 64


def _template_kwargs(kwargs: dict, trusted: bool = False) -> dict:
    return template_kwargs(kwargs, None, trusted=trusted)


@pytest.mark.parametrize("key", ["chat_template", "tokenize", "return_dict", "conversation", "add_generation_prompt"])
def test_template_kwargs_that_change_how_the_prompt_is_built_are_refused(key: str) -> None:
    with pytest.raises(ServiceError) as info:
        _template_kwargs({key: "x", "enable_thinking": False})
    assert info.value.kind is Kind.INVALID and info.value.param == f"chat_template_kwargs.{key}"
    assert _template_kwargs({"enable_thinking": False}) == {"enable_thinking": False}


def test_a_clients_own_template_needs_the_operators_trust() -> None:
    assert _template_kwargs({"chat_template": "{{ 1 }}"}, trusted=True) == {"chat_template": "{{ 1 }}"}
    with pytest.raises(ServiceError, match="--trust-request-chat-template"):
        _template_kwargs({"chat_template": "{{ 1 }}"})


def test_message_and_part_counts_are_bounded_before_the_messages_are_built() -> None:
    limits = Settings(max_messages=3, max_content_parts=2)
    message = {"role": "user", "content": "hi"}
    parts = {"role": "user", "content": [{"type": "text", "text": "a"}] * 3}
    assert len(decode_chat(json.dumps({"messages": [message] * 3}).encode(), limits).messages) == 3
    with pytest.raises(ServiceError) as info:
        decode_chat(json.dumps({"messages": [message] * 4}).encode(), limits)
    assert info.value.code == "too_many_messages" and info.value.param == "messages"
    with pytest.raises(ServiceError) as info:
        decode_chat(json.dumps({"messages": [message, parts]}).encode(), limits)
    assert info.value.code == "too_many_content_parts" and info.value.param == "messages[1].content"


def test_two_pass_decoding_names_fields_as_one_pass_did() -> None:
    cases = [
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]},
            "messages[0].content[0].image_url.url",
        ),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "x"}]}, "messages[1].role"),
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0].type"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "a"}], "temperature": "0.5"}, "temperature"),
    ]
    for body, param in cases:
        with pytest.raises(ServiceError) as info:
            decode_chat(json.dumps(body).encode(), Settings())
        assert info.value.param == param, (body, info.value.message)
    request = decode_chat(
        json.dumps(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "a"},
                            {"type": "image_url", "image_url": {"url": "data:,"}},
                        ],
                    }
                ],
                "n": 2,
            }
        ).encode(),
        Settings(),
    )
    assert isinstance(request, p.ChatCompletionRequest) and request.n == 2
    assert request.messages[0].content == [p.TextPart(text="a"), p.ImageURLPart(image_url=p.ImageURL(url="data:,"))]


def test_error_messages_quote_client_input_cut_short() -> None:
    assert clip("x" * 10) == "x" * 10
    assert clip("m" * 1_000_000) == "m" * 200 + "... (1000000 characters)"
    with pytest.raises(ServiceError) as info:
        settings = Settings(served_model_name=["tiny"])
        engine = SimpleNamespace(adapters=Adapters(settings))
        CompletionService(engine=engine, settings=settings).check_model("m" * 1_000_000)  # type: ignore[arg-type]
    assert info.value.kind is Kind.NOT_FOUND and len(info.value.message) < 400
    # Whatever a message quotes (vLLM's own validation errors list every bad id), the envelope is bounded.
    body = json.loads(envelope(Kind.INVALID, "token_id(s) " + str(list(range(100_000))), "p" * 5000))
    assert len(body["error"]["message"]) < 2100 and len(body["error"]["param"]) < 250


def test_batched_prompts_are_run_together_and_indexed_prompt_major() -> None:
    """A FAKE engine generator per prompt: choice i * n + j is prompt i's j-th, as in vLLM."""

    def out(index: int, text: str, finish: str | None = None) -> Any:
        return SimpleNamespace(
            outputs=[SimpleNamespace(index=index, text=text, token_ids=[1], finish_reason=finish, logprobs=None)],
            prompt_logprobs=None,
            num_cached_tokens=None,
        )

    async def generate(engine_input, sampling, request_id):  # engine_input: the prompt's index; sampling: n
        i = engine_input
        assert request_id == f"x-{i}"  # one engine request per prompt
        for step in range(3):
            await asyncio.sleep(0.001 * (2 - i))
            for j in range(sampling):
                yield out(j, f"p{i}c{j}s{step}", "length" if step == 2 else None)

    service = CompletionService(engine=_fake_engine(generate), settings=Settings())
    prep = PreparedRequest(
        request_id="cmpl-x",
        engine_request_id="x",
        record=RequestRecord("x"),
        model="tiny",
        prompts=[Prompt(0, 3), Prompt(1, 5)],
        sampling=2,
        n=2,
        stream=False,
        logprobs=None,
    )
    result = asyncio.run(service.complete(prep))
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert [c.text for c in result.choices] == [
        f"p{k // 2}c{k % 2}s0p{k // 2}c{k % 2}s1p{k // 2}c{k % 2}s2" for k in range(4)
    ]
    assert result.usage.prompt_tokens == 8 and result.usage.completion_tokens == 12

    prep.stream = True

    async def collect() -> list[bytes]:
        return [frame async for frame in service.stream(prep)]

    chunks = [json.loads(e[6:]) for e in sse_events(asyncio.run(collect()))[:-1]]
    assert all(len(c["choices"]) == 1 for c in chunks)
    assert sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]) == [0, 1, 2, 3]


def test_a_frame_stays_one_line_for_splitlines_readers() -> None:
    import msgspec
    from httpx._decoders import LineDecoder  # what httpx's aiter_lines splits with

    text = "a\u2028b\u2029c\x85d\u2013e\\\u2028"  # an en dash shares the first bytes; a backslash before one
    data = sse_frame(msgspec.json.encode({"t": text}))
    decoder = LineDecoder()
    lines = [line for line in [*decoder.decode(data.decode()), *decoder.flush()] if line]
    assert len(lines) == 1
    assert json.loads(lines[0].removeprefix("data: "))["t"] == text
    assert sse_frame(b'{"t":"plain"}') == b'data: {"t":"plain"}\n\n'
