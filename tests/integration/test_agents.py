"""Tools and reasoning on the real engine, through the openai SDK: the session server runs Qwen-VL's
tool calling (hermes); a Qwen3-VL tiny checkpoint with a thinking template runs the qwen3 reasoning
parser too. Random weights: forced calls are what the grammar makes of noise, so the checks are
the ones a grammar guarantees (the name, arguments that validate), and that both paths agree."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from qwen_server.demo import tiny_model as builder
from qwen_server.testing.servers import free_port
from tests.helpers.media import image_data_url
from tests.helpers.serverproc import ServerProcess, run_launcher
from tests.integration.conftest import SERVER_OPTIONS

CLICK = {
    "type": "object",
    "properties": {"button": {"type": "string", "enum": ["left", "right"]}},
    "required": ["button"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "click", "strict": True, "parameters": CLICK}},
    {
        "type": "function",
        "function": {
            "name": "scroll",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"down": {"type": "boolean"}},
                "required": ["down"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "Press the left button."}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def streamed(stream: Any) -> dict[str, Any]:
    """A stream put together from the SDK's own chunk types."""
    content, reasoning, finish = "", "", None
    calls: dict[int, dict[str, Any]] = {}
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += (delta.model_extra or {}).get("reasoning") or ""
            for call in delta.tool_calls or ():
                entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                if call.id:
                    assert entry["id"] is None and call.type == "function" and call.function.name
                    entry["id"], entry["name"] = call.id, call.function.name
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
            finish = choice.finish_reason or finish
    return {"content": content or None, "reasoning": reasoning or None, "calls": calls, "finish": finish}


def forced_call(tool_choice: Any, seed: int) -> dict[str, Any]:
    """A forced call's request: sampled (seeded), with room for the grammar's opening and arguments."""
    return {
        "model": "tiny", "messages": ASK, "tools": TOOLS, "tool_choice": tool_choice,
        "max_tokens": 160, "temperature": 1.0, "seed": seed,
    }  # fmt: skip


def forced(client: openai.OpenAI, tool_choice: Any, **extra: Any) -> tuple[Any, int]:
    """A forced call that the grammar let finish within the budget: the response and its seed. The
    random model wanders (whitespace is legal inside JSON), so a few seeds are tried."""
    for seed in range(8):
        r = client.chat.completions.create(**forced_call(tool_choice, seed), **extra)
        if r.choices[0].finish_reason != "length":
            return r, seed
    pytest.fail("no seed of 8 let the forced call finish within 160 tokens")


@pytest.mark.parametrize(
    ("tool_choice", "finish", "names"),
    [
        ({"type": "function", "function": {"name": "scroll"}}, "stop", {"scroll"}),
        ("required", "tool_calls", {"click", "scroll"}),
    ],
)
def test_a_forced_call_names_a_tool_validates_and_streams_the_same(
    client: openai.OpenAI, tool_choice: Any, finish: str, names: set[str]
) -> None:
    r, seed = forced(client, tool_choice)
    choice = r.choices[0]
    assert choice.finish_reason == finish  # vLLM's and OpenAI's: "stop" for a named call
    calls = choice.message.tool_calls
    assert calls and choice.message.content is None
    for call in calls:
        assert call.id and call.type == "function" and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    same = streamed(client.chat.completions.create(**forced_call(tool_choice, seed), stream=True))
    assert same["finish"] == finish and same["content"] is None
    assert [(c["name"], c["arguments"]) for c in same["calls"].values()] == [
        (c.function.name, c.function.arguments) for c in calls
    ]


def test_a_forced_call_cut_by_max_tokens_is_the_same_on_both_paths(client: openai.OpenAI) -> None:
    # The grammar's opening, `<tool_call>\n{"name": "click", "arguments": `, is 27 tokens: 34 cut the arguments.
    kw: dict[str, Any] = {"model": "tiny", "messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 34}
    r = client.chat.completions.create(temperature=0, **kw)
    assert r.choices[0].finish_reason == "length"
    whole = [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls or ()]
    assert len(whole) == 1 and whole[0][0] in SCHEMAS  # the cut call, as the stream sends it
    same = streamed(client.chat.completions.create(temperature=0, stream=True, **kw))
    assert same["finish"] == "length"
    assert [(c["name"], c["arguments"]) for c in same["calls"].values()] == whole


def test_parallel_tool_calls_false_gives_one_call(client: openai.OpenAI) -> None:
    r, _ = forced(client, "required", parallel_tool_calls=False)
    assert len(r.choices[0].message.tool_calls) == 1


def test_auto_without_a_call_answers_text_and_no_tool_markup(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=8, temperature=0)
    message = r.choices[0].message
    assert message.tool_calls is None and isinstance(message.content, str)  # absent, as OpenAI's
    assert "<tool_call>" not in message.content


def test_a_tool_result_with_a_screenshot_is_rendered_and_answered(client: openai.OpenAI, server: ServerProcess) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "click", "arguments": '{"button": "left"}'}}

    def history(result: Any) -> list[dict[str, Any]]:
        return [
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": result},
        ]

    screenshot = [{"type": "text", "text": "clicked"}, {"type": "image_url", "image_url": {"url": image_data_url()}}]
    r = client.chat.completions.create(
        model="tiny",
        messages=history(screenshot),
        tools=TOOLS,
        tool_choice="none",
        max_tokens=4,  # type: ignore[arg-type]
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    text_only = client.chat.completions.create(
        model="tiny",
        messages=history("clicked"),
        tools=TOOLS,
        tool_choice="none",
        max_tokens=4,  # type: ignore[arg-type]
    )
    assert r.usage.prompt_tokens - text_only.usage.prompt_tokens >= (224 // 28) ** 2  # the image's tokens
    # The call in the history reached the template (as an object), and the tools too.
    rendered = httpx.post(
        server.url + "/tokenize", json={"messages": history("clicked"), "tools": TOOLS, "return_token_strs": True}
    ).json()
    text = httpx.post(server.url + "/detokenize", json={"tokens": rendered["tokens"]}).json()["prompt"]
    assert '<tool_call>\n{"name": "click", "arguments": {"button": "left"}}\n</tool_call>' in text
    assert "<tool_response>\nclicked\n</tool_response>" in text and '"name": "scroll"' in text
    assert rendered["count"] == text_only.usage.prompt_tokens


def test_a_history_call_whose_arguments_are_not_json_is_a_400_naming_them(server: ServerProcess) -> None:
    bad = {"id": "c", "type": "function", "function": {"name": "click", "arguments": "{button: left"}}
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": [*ASK, {"role": "assistant", "tool_calls": [bad]}], "max_tokens": 1},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].tool_calls[0].function.arguments"


# --- reasoning: a Qwen3-VL tiny checkpoint with a thinking template ---


@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """qwen3 reasoning + hermes tools on the Qwen3-VL tiny checkpoint, thinking off by default
    (--default-chat-template-kwargs), with its own template file (--chat-template). It also runs one
    sequence at a time under vLLM's priority scheduling, so that the order of waiting requests shows,
    and sends SSE keep-alive comments after 0.2 s of silence."""
    path = builder.build(tmp_path_factory.mktemp("qwen3_vl"), "qwen3_vl")
    template = tmp_path_factory.mktemp("template") / "agent.jinja"
    template.write_text(builder.THINKING_CHAT_TEMPLATE.replace("You are a helpful assistant.", "You are an agent."))
    srv = ServerProcess.launcher(
        free_port(),
        tmp_path_factory.mktemp("thinker") / "server.log",
        "--model", str(path), *SERVER_OPTIONS,  # hermes tools, as the session server
        "--reasoning-parser", "qwen3",
        "--chat-template", str(template),
        "--default-chat-template-kwargs", '{"enable_thinking": false}',
        "--max-num-seqs", "1", "--scheduling-policy", "priority", "--sse-keep-alive", "0.2",
    )  # fmt: skip
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, srv.log()[-3000:]
        assert srv.leftovers() == []


def chat(srv: ServerProcess, **body: Any) -> dict[str, Any]:
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 12, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_thinking_output_without_its_end_is_all_reasoning_and_counted(thinker: ServerProcess) -> None:
    body = chat(thinker, chat_template_kwargs={"enable_thinking": True}, temperature=0, ignore_eos=True)
    (choice,) = body["choices"]
    message = choice["message"]
    assert message["content"] is None and message["reasoning"] and message["reasoning_content"] == message["reasoning"]
    assert "tool_calls" not in message
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == body["usage"]["completion_tokens"] == 12
    # The same through the SDK's stream types: every delta is reasoning.
    stream = openai.OpenAI(base_url=thinker.url + "/v1", api_key="unused").chat.completions.create(
        model="tiny", messages=ASK, max_tokens=12, temperature=0, stream=True,  # type: ignore[arg-type]
        extra_body={"chat_template_kwargs": {"enable_thinking": True}, "ignore_eos": True},
    )  # fmt: skip
    got = streamed(stream)
    assert got["content"] is None and got["reasoning"] == message["reasoning"]


def test_the_servers_default_kwargs_turn_thinking_off_and_include_reasoning_false_hides_it(
    thinker: ServerProcess,
) -> None:
    body = chat(thinker, temperature=0, ignore_eos=True)  # --default-chat-template-kwargs: thinking off
    message = body["choices"][0]["message"]
    assert "reasoning" not in message and message["content"]
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    hidden = chat(thinker, chat_template_kwargs={"enable_thinking": True}, include_reasoning=False, ignore_eos=True)
    assert "reasoning" not in hidden["choices"][0]["message"]


def test_the_chat_template_option_wins_and_checkpoint_images_count(thinker: ServerProcess) -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url()}}]}]
    rendered = httpx.post(thinker.url + "/tokenize", json={"messages": messages}).json()
    text = httpx.post(thinker.url + "/detokenize", json={"tokens": rendered["tokens"]}).json()["prompt"]
    assert "You are an agent." in text  # --chat-template, not the checkpoint's own
    assert text.endswith("<think>\n\n</think>\n\n")  # the server's default kwargs reach the template
    assert text.count("<|image_pad|>") == (224 // 32) ** 2  # Qwen3-VL: patch 16, merged 2x2


def test_a_named_call_with_thinking_off_is_constrained_from_the_first_token(thinker: ServerProcess) -> None:
    for seed in range(8):
        body = chat(
            thinker,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "click"}},
            max_tokens=160,
            temperature=1.0,
            seed=seed,
        )
        if body["choices"][0]["finish_reason"] == "stop":
            break
    else:
        pytest.fail("no seed of 8 let the forced call finish within 160 tokens")
    (call,) = body["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "click"
    jsonschema.validate(json.loads(call["function"]["arguments"]), CLICK)


def test_an_unknown_parser_stops_the_launcher_before_the_engine_loads() -> None:
    done, took = run_launcher(free_port(), "--tool-call-parser", "no-such-parser", timeout=120)
    assert done.returncode != 0
    assert took < 60  # the model (about 45 s to load here) was never loaded
    assert "--tool-call-parser 'no-such-parser' is not one of vLLM's" in done.stdout + done.stderr
    assert "hermes" in done.stdout + done.stderr  # the known names are listed


BAD_SCHEMA = {"type": "object", "properties": {"a": {"type": "nonsense"}}}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": BAD_SCHEMA}}],
          "tool_choice": "required"}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": BAD_SCHEMA}}],
          "tool_choice": "required", "stream": True}, "tools"),  # a 400, not an error event in a 200 stream
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": json.loads('{"a":' * 80 + "1" + "}" * 80)}}]},
         "tools[0].function.parameters"),
        ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{}"}}]}]},
         "messages[0].tool_calls"),
        ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"chat_template_kwargs": {"tools": [1]}}, "chat_template_kwargs.tools"),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400s_naming_the_field(server: ServerProcess, extra: dict, param: str) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **extra}, timeout=60)
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == param


def test_qwen3_vl_takes_a_video_sampled_at_the_requested_rate(thinker: ServerProcess, tmp_path: Path) -> None:
    """Qwen3-VL's video path: its sampler, its budget over the whole clip, its frame timestamps."""
    from tests.integration.test_video import data_url, video_part, write_clip

    part = video_part(data_url(write_clip(tmp_path / "clip.avi", frames=80)))
    messages = [{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}]

    def video_tokens(fps: float) -> int:
        r = httpx.post(thinker.url + "/tokenize", json={"messages": messages, "mm_processor_kwargs": {"fps": fps}})
        assert r.status_code == 200, r.text[:300]
        text = httpx.post(thinker.url + "/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
        return text.count("<|video_pad|>")

    assert video_tokens(2) > video_tokens(1) > 0
    body = chat(thinker, messages=messages, temperature=0)
    assert body["usage"]["prompt_tokens"] > video_tokens(2)


def test_priority_orders_the_requests_that_wait(thinker: ServerProcess) -> None:
    """Behind a long request (one sequence at a time), a request with a lower priority value sent
    after one with a higher value runs first."""
    finished: list[str] = []

    def run(name: str, priority: int, max_tokens: int) -> None:
        body = {"messages": ASK, "max_tokens": max_tokens, "ignore_eos": True, "priority": priority}
        r = httpx.post(thinker.url + "/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        finished.append(name)

    def scheduler() -> dict[str, int]:
        return httpx.get(thinker.url + "/health").json()["scheduler"]

    def wait_for(check: Any) -> None:
        deadline = time.monotonic() + 60
        while not check(scheduler()):
            assert time.monotonic() < deadline, scheduler()
            time.sleep(0.02)

    # The blocker outranks both: vLLM's priority scheduler preempts a running request for a waiting one
    # of a better (lower) priority, and this test is about the order of the waiting ones.
    threads = [threading.Thread(target=run, args=("blocker", -20, 1500))]
    threads[0].start()
    wait_for(lambda s: s["running"] == 1)
    for name, priority in (("late", 10), ("urgent", -10)):
        threads.append(threading.Thread(target=run, args=(name, priority, 2)))
        threads[-1].start()
        waiting = len(threads) - 1
        wait_for(lambda s, waiting=waiting: s["waiting"] == waiting)
    assert not finished, "the long request ended before both others were queued: the order shows nothing"
    for thread in threads:
        thread.join(timeout=300)
    assert finished == ["blocker", "urgent", "late"]


def busy(srv: ServerProcess, max_tokens: int = 400) -> threading.Thread:
    """A long request holding the thinker's one sequence slot, once the engine runs it."""
    body = {"messages": ASK, "max_tokens": max_tokens, "ignore_eos": True}
    thread = threading.Thread(
        target=httpx.post, args=(srv.url + "/v1/chat/completions",), kwargs={"json": body, "timeout": 300}
    )
    thread.start()
    deadline = time.monotonic() + 60
    while httpx.get(srv.url + "/health").json()["scheduler"]["running"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return thread


def test_a_stream_waiting_for_the_engine_gets_keep_alive_comments(thinker: ServerProcess) -> None:
    """Queued behind a long request, a stream sends comments until its first token; the openai
    SDK reads such a stream as if they were not there."""
    blocker = busy(thinker)
    body = {"messages": ASK, "max_tokens": 3, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", thinker.url + "/v1/chat/completions", json=body, timeout=300) as r:
        lines = [line for line in r.iter_lines() if line]
    blocker.join(timeout=300)
    assert lines.count(": keep-alive") >= 1, lines[:5]
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert all(line == ": keep-alive" for line in lines[:first_data]), lines[:first_data]
    assert lines[-1] == "data: [DONE]"
    blocker = busy(thinker)
    sdk = openai.OpenAI(base_url=thinker.url + "/v1", api_key="unused")
    stream = sdk.chat.completions.create(
        model="tiny",
        messages=ASK,
        max_tokens=3,
        stream=True,
        extra_body={"ignore_eos": True},  # type: ignore[arg-type]
    )
    chunks = list(stream)
    blocker.join(timeout=300)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content is not None) >= 3
