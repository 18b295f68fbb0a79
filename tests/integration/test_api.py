"""The OpenAI API against the real engine, through a real Granian server, with the openai SDK."""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from qwen_server.media.image import Geometry
from tests.helpers.media import image_data_url
from tests.helpers.serverproc import ServerProcess


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def image_part(url: str | None = None) -> dict:
    return {"type": "image_url", "image_url": {"url": url or image_data_url()}}


def user(*parts: dict | str) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


def engine_requests(server: ServerProcess) -> int:
    """Requests the worker tracks plus those the engine's scheduler reports running or waiting."""
    body = httpx.get(server.url + "/health").json()
    return body["requests_in_engine"] + body["scheduler"]["running"] + body["scheduler"]["waiting"]


def wait_engine_idle(server: ServerProcess, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (count := engine_requests(server)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


# --- chat with images ---


def test_chat_with_image(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=[user(image_part(), "What is this?")], max_tokens=6, extra_body={"ignore_eos": True}
    )
    assert r.object == "chat.completion"
    assert r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    # 64 image tokens (224 px) plus the chat template's text.
    assert r.usage.prompt_tokens > 64
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_image_tokens_scale_with_images(client: openai.OpenAI) -> None:
    def prompt_tokens(*parts: dict | str) -> int:
        return client.chat.completions.create(model="tiny", messages=[user(*parts)], max_tokens=1).usage.prompt_tokens

    text_only = prompt_tokens("Describe.")
    one = prompt_tokens(image_part(), "Describe.")
    three = prompt_tokens(image_part(), image_part(image_data_url(color=(1, 2, 3))), image_part(), "Describe.")
    per_image = one - text_only
    assert per_image >= 64  # 64 pad tokens + vision start/end
    assert three - text_only == 3 * per_image


def test_images_from_urls_and_files_match_data_urls(client: openai.OpenAI, image_host: str, media_dir: Path) -> None:
    """The same picture as a data URL, a remote URL and a local file: same prompt, same output."""

    def answer(url: str) -> tuple[int, str]:
        r = client.chat.completions.create(
            model="tiny",
            messages=[user(image_part(url), "What?")],
            max_tokens=4,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return r.usage.prompt_tokens, r.choices[0].message.content

    data = "data:image/jpeg;base64," + base64.b64encode((media_dir / "red.jpg").read_bytes()).decode()
    expected = answer(data)
    assert answer(f"{image_host}/red.jpg") == expected
    assert answer(str(media_dir / "red.jpg")) == expected
    assert answer(f"file://{media_dir}/red.jpg") == expected


def test_large_images_are_sized_to_the_model_budget(client: openai.OpenAI, image_host: str) -> None:
    # 896x672 is over the tiny model's 224x224 budget: the server resizes it before the processor,
    # to the size the processor would have chosen (252x168: 9x6 merged 28 px patches = 54 tokens).
    width, height = Geometry(28, 56 * 56, 224 * 224).target(896, 672)
    small = client.chat.completions.create(model="tiny", messages=[user(image_part(), "x")], max_tokens=1)
    big = client.chat.completions.create(
        model="tiny", messages=[user(image_part(f"{image_host}/big.png"), "x")], max_tokens=1
    )
    assert big.usage.prompt_tokens == small.usage.prompt_tokens - 64 + (width // 28) * (height // 28)


def test_repeated_image_hits_the_engine_multimodal_cache(client: openai.OpenAI, server: ServerProcess) -> None:
    def mm_cache() -> dict:
        return httpx.get(server.url + "/health").json()["mm_cache"]

    url = image_data_url(color=(17, 99, 201))  # a picture no other test sends
    client.chat.completions.create(model="tiny", messages=[user(image_part(url), "a")], max_tokens=1)
    before = mm_cache()
    client.chat.completions.create(model="tiny", messages=[user(image_part(url), "b")], max_tokens=1)
    deadline = time.monotonic() + 5  # vLLM reports cache stats with the engine's step outputs
    while (after := mm_cache())["queries"] == before["queries"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert after["queries"] == before["queries"] + 1
    assert after["hits"] == before["hits"] + 1


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=[user(image_part(), "Stream it.")],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.id == chunks[0].id for c in chunks)


def test_streaming_text_matches_non_streaming(client: openai.OpenAI) -> None:
    messages = [user(image_part(), "Same answer?")]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == full.choices[0].message.content


def test_multi_turn_with_system(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny-alias",
        messages=[
            {"role": "system", "content": "You are terse."},
            user(image_part(), "What is it?"),
            {"role": "assistant", "content": "A square."},
            {"role": "user", "content": "Which colour?"},
        ],
        max_tokens=3,
    )
    assert r.model == "tiny"  # the first served name is the one reported
    assert r.choices[0].message.content is not None


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    args = {
        "model": "tiny",
        "messages": [user(image_part(), "Random?")],
        "max_tokens": 12,
        "temperature": 1.0,
        "top_p": 0.9,
        "extra_body": {"ignore_eos": True, "top_k": 50, "min_p": 0.01},
    }
    a = client.chat.completions.create(seed=7, **args).choices[0].message.content
    b = client.chat.completions.create(seed=7, **args).choices[0].message.content
    c = client.chat.completions.create(seed=8, **args).choices[0].message.content
    assert a == b
    assert a != c


def test_n_choices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=[user("Hi")], max_tokens=4, n=3, seed=1, extra_body={"ignore_eos": True}
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 12


def test_penalties_and_engine_extras(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny",
        messages=[user("Hi")],
        max_tokens=8,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        extra_body={"repetition_penalty": 1.2, "min_tokens": 8, "ignore_eos": False, "top_k": 5},
    )
    assert r.usage.completion_tokens == 8


def test_stop_strings_and_stop_token_ids(client: openai.OpenAI) -> None:
    base = (
        client.chat.completions.create(
            model="tiny", messages=[user("Go")], max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .message.content
    )
    assert len(base) > 2
    stop = base[len(base) // 2 :][:2]
    r = client.chat.completions.create(
        model="tiny", messages=[user("Go")], max_tokens=20, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].message.content


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny",
        messages=[user("Hi")],
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert item.logprob <= 0
        assert 1 <= len(item.top_logprobs) <= 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob


def test_streamed_logprobs_cover_every_token(client: openai.OpenAI) -> None:
    # The random-weight model emits many byte tokens whose text the detokenizer holds back (about a
    # third of 200 were); their chunks carry no text, but their logprobs must still be sent.
    chat = client.chat.completions.create(
        model="tiny",
        messages=[user("Hi")],
        max_tokens=64,
        logprobs=True,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(chat)
    assert chunks[-1].usage.completion_tokens == 64
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs) == 64
    text = client.completions.create(
        model="tiny",
        prompt="The cat",
        max_tokens=64,
        logprobs=1,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(text)
    assert chunks[-1].usage.completion_tokens == 64
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices and c.choices[0].logprobs) == 64


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny",
        messages=[user("yes or no?")],
        max_tokens=20,
        seed=3,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "string", "enum": ["yes", "no"]}},
        },
    )
    assert json.loads(r.choices[0].message.content) in ("yes", "no")


def test_json_object_response_format_starts_an_object(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=[user("json")], max_tokens=5, response_format={"type": "json_object"}
    )
    assert r.choices[0].message.content.lstrip().startswith("{")


def test_per_request_max_pixels(client: openai.OpenAI) -> None:
    big = image_part(image_data_url(size=(448, 448)))
    default = client.chat.completions.create(model="tiny", messages=[user(big)], max_tokens=1).usage.prompt_tokens
    small = client.chat.completions.create(
        model="tiny",
        messages=[user(big)],
        max_tokens=1,
        extra_body={"mm_processor_kwargs": {"max_pixels": 28 * 28 * 16}},
    ).usage.prompt_tokens
    assert small < default


def test_text_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="tiny", prompt="The cat", max_tokens=5, logprobs=2, echo=True, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion"
    assert r.choices[0].text.startswith("The cat")
    # With echo, the prompt's tokens come first (OpenAI's and vLLM's shape; #25), then the 5 generated.
    assert len(r.choices[0].logprobs.tokens) == r.usage.prompt_tokens + 5
    chunks = list(client.completions.create(model="tiny", prompt="The cat", max_tokens=4, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_models_and_version(client: openai.OpenAI, server: ServerProcess) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny", "tiny-alias"]
    version = httpx.get(server.url + "/version").json()
    assert version["version"] and version["vllm"]


def test_health_and_live(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/live").json() == {"status": "alive"}
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ready"


def test_openapi_docs(server: ServerProcess) -> None:
    schema = httpx.get(server.url + "/docs/openapi.json").json()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["messages"]
    assert body["properties"]["messages"]["minItems"] == 1
    assert (
        "prompt"
        in schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"][
            "properties"
        ]
    )


# --- errors: OpenAI envelope, right status, the field named ---


def post(server: ServerProcess, path: str, body: bytes | dict, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    kw.setdefault("timeout", 30)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, **kw)


def assert_error(r: httpx.Response, status: int, param: str | None = None, contains: str = "") -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert contains in error["message"]
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "0.5"}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "stream": "true"}, "stream"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 100}, "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": False, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"abc": 1}}, "logit_bias"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
        ),
    ],
)
def test_invalid_fields_are_400_naming_the_field(server: ServerProcess, body: dict, param: str) -> None:
    assert_error(post(server, "/v1/chat/completions", body), 400, param)


def test_unknown_top_level_fields_are_tolerated(server: ServerProcess) -> None:
    r = post(
        server,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1,
            "parallel_tool_calls": False,
            "store": False,
            "metadata": {"a": 1},
        },
    )
    assert r.status_code == 200, r.text


def test_malformed_json_is_400(server: ServerProcess) -> None:
    assert_error(post(server, "/v1/chat/completions", b'{"messages": ['), 400, None, "not valid JSON")


def test_bad_image_names_the_part(server: ServerProcess) -> None:
    body = {"messages": [{"role": "user", "content": "x"}, user("look", image_part("data:image/png;base64,AAAA"))]}
    assert_error(post(server, "/v1/chat/completions", body), 400, "messages[1].content[1].image_url")
    body = {"messages": [user(image_part("data:image/png;base64,not base64!"))]}
    assert_error(post(server, "/v1/chat/completions", body), 400, "messages[0].content[0].image_url", "base64")


@pytest.mark.parametrize(
    ("url", "status", "code"),
    [
        ("http://127.0.0.2:{port}/red.jpg", 400, "image_forbidden_address"),
        ("http://[::1]:{port}/red.jpg", 400, "image_forbidden_address"),  # 127.0.0.1/32 only is allowed
        ("{host}/missing.jpg", 400, "image_fetch_failed"),
        ("{host}/huge.bin", 413, "image_too_large"),
        ("{media}/../outside.jpg", 400, "image_forbidden_path"),
        ("file:///etc/passwd", 400, "image_forbidden_path"),
        ("gopher://example.com/x", 400, "image_unsupported_url"),
    ],
)
def test_refused_image_sources_name_the_part(
    server: ServerProcess, image_host: str, media_dir: Path, url: str, status: int, code: str
) -> None:
    url = url.format(host=image_host, port=image_host.rsplit(":", 1)[1], media=media_dir)
    body = {"messages": [user("first", image_part()), user(image_part(url))], "max_tokens": 1}
    error = assert_error(post(server, "/v1/chat/completions", body), status, "messages[1].content[0].image_url")
    assert error["code"] == code


def test_too_many_images(server: ServerProcess) -> None:
    body = {"messages": [user(*[image_part() for _ in range(5)])]}
    error = assert_error(post(server, "/v1/chat/completions", body), 400, "messages[0].content[4].image_url")
    assert error["code"] == "too_many_images"


def test_context_length_exceeded_gives_both_numbers(server: ServerProcess) -> None:
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2040})
    error = assert_error(r, 400, "max_tokens", "2040")
    assert "2048" in error["message"] and error["code"] == "context_length_exceeded"


def test_unknown_model_is_404(server: ServerProcess) -> None:
    r = post(server, "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})
    assert assert_error(r, 404, "model")["code"] == "model_not_found"


def test_wrong_method_and_path(server: ServerProcess) -> None:
    assert_error(httpx.get(server.url + "/v1/chat/completions"), 405)
    assert_error(httpx.get(server.url + "/v1/nothing"), 404)


def test_body_over_limit_is_413(server: ServerProcess) -> None:
    huge = b'{"messages": [{"role": "user", "content": "' + b"a" * (65 * 1024 * 1024) + b'"}]}'
    assert_error(post(server, "/v1/chat/completions", huge), 413)


def test_openai_sdk_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[user("hi")])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[user(image_part("data:image/png;base64,AAAA"))])
    assert info.value.body["param"] == "messages[0].content[0].image_url"


def test_every_stream_frame_is_one_line_to_splitlines_readers(server: ServerProcess) -> None:
    # httpx's iter_lines (and the clients built on it) splits lines as str.splitlines does: U+2028,
    # U+2029 and U+0085, which JSON may carry raw, would cut a frame in two. The echoed prompt puts
    # them in a frame. A random-weight model also emits them at random, which once cut a long stream.
    prompt = "a\u2028b\u2029c\x85d"
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "echo": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]  # each line parses whole
    assert events[0]["choices"][0]["text"] == prompt


# --- disconnects abort the engine request ---


def test_streaming_disconnect_aborts_engine_request(server: ServerProcess) -> None:
    body = {"messages": [user("long")], "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert engine_requests(server) >= 1
    assert wait_engine_idle(server) == 0


def test_non_streaming_disconnect_aborts_engine_request(server: ServerProcess) -> None:
    body = {"messages": [user("long")], "max_tokens": 1500, "ignore_eos": True}
    seen = []

    def watch() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not seen:
            if engine_requests(server):
                seen.append(True)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/chat/completions", body, timeout=httpx.Timeout(30, read=1.5))
    watcher.join()
    assert seen, "the request never reached the engine"
    assert wait_engine_idle(server) == 0


def test_server_still_serves_after_errors(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=[user(image_part(), "ok?")], max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")


# --- conformance with OpenAI's and vLLM's servers (issue #25) ---


def test_a_stream_with_several_choices_sends_one_choice_per_chunk(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model="tiny", messages=[user("Hi")], max_tokens=12, n=3, stream=True, extra_body={"ignore_eos": True}
    )
    text = client.completions.create(
        model="tiny", prompt="The cat", max_tokens=12, n=3, stream=True, extra_body={"ignore_eos": True}
    )
    for chunks in (list(chat), list(text)):
        assert chunks and all(len(c.choices) == 1 for c in chunks), [len(c.choices) for c in chunks]
        finished = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
        assert sorted(finished) == [0, 1, 2]  # each choice finishes exactly once


def test_echo_text_offsets_start_after_the_prompt(client: openai.OpenAI) -> None:
    prompt = "Hello, my name is"
    r = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=4, echo=True, logprobs=0, extra_body={"ignore_eos": True}
    )
    choice = r.choices[0]
    assert choice.text.startswith(prompt)
    # The prompt's own tokens come first (echo with logprobs); the generated ones start after the prompt.
    skip = r.usage.prompt_tokens
    offsets, tokens = choice.logprobs.text_offset[skip:], choice.logprobs.tokens[skip:]
    assert offsets[0] == len(prompt)  # was 0: counted from the generated text
    assert [b - a for a, b in itertools.pairwise(offsets)] == [len(t) for t in tokens[:-1]]
    stream = list(
        client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=4,
            echo=True,
            logprobs=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert stream[0].choices[0].text == prompt  # the echo comes first, as vLLM streams it
    streamed = [o for c in stream[1:] if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert streamed[0] == len(prompt) and streamed == sorted(streamed)


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions", {"use_beam_search": True, "n": 2}, "use_beam_search"),
        ("/v1/chat/completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
        ("/v1/chat/completions", {"return_token_ids": True}, "return_token_ids"),
        ("/v1/chat/completions", {"return_tokens_as_token_ids": True}, "return_tokens_as_token_ids"),
        ("/v1/chat/completions", {"echo": True}, "echo"),
        (
            "/v1/chat/completions",
            {"stream": True, "stream_options": {"continuous_usage_stats": True}},  # needs include_usage
            "stream_options.continuous_usage_stats",
        ),
        ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {"priority": -5}, "priority"),  # this server schedules fcfs
        ("/v1/chat/completions", {"chat_template": "{{ 'x' }}"}, "chat_template"),
        ("/v1/completions", {"use_beam_search": True}, "use_beam_search"),
        ("/v1/completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
        ("/v1/completions", {"best_of": 2}, "best_of"),
        ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_fields_not_honoured_are_refused_naming_the_field(
    server: ServerProcess, path: str, extra: dict, param: str
) -> None:
    base = {"model": "tiny", "max_tokens": 2}
    base |= {"messages": [user("Hi")]} if path.endswith("chat/completions") else {"prompt": "Hi"}
    r = post(server, path, {**base, **extra})
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == param, r.json()


def test_defaults_of_fields_not_honoured_are_accepted(client: openai.OpenAI) -> None:
    # What client libraries send when nothing is asked for: never a 400.
    r = client.chat.completions.create(
        model="tiny",
        messages=[user("Hi")],
        max_tokens=2,
        tool_choice="none",
        store=False,
        metadata={"a": "b"},
        user="u",
        extra_body={
            "use_beam_search": False,
            "priority": 0,
            "tools": [],
            "length_penalty": 1,
            "return_token_ids": False,
            "spaces_between_special_tokens": True,
        },
    )
    assert r.choices[0].message.role == "assistant"


def test_allowed_token_ids_are_honoured(client: openai.OpenAI) -> None:
    seen = []
    for allowed in (40, 41):
        r = client.completions.create(
            model="tiny",
            prompt="Hi",
            max_tokens=8,
            logprobs=0,
            extra_body={"allowed_token_ids": [allowed], "ignore_eos": True},
        )
        tokens = r.choices[0].logprobs.tokens
        assert len(tokens) == 8 and len(set(tokens)) == 1, tokens  # the one allowed token, every time
        seen.append(tokens[0])
    assert seen[0] != seen[1]


def test_model_card_by_id(client: openai.OpenAI) -> None:
    card = client.models.retrieve("tiny-alias")
    assert card.id == "tiny-alias" and card.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.response.json()["error"]["code"] == "model_not_found"


def test_token_id_and_batched_prompts_answer_one_choice_per_prompt(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    ids = client.completions.create(model="tiny", prompt=[40, 41, 42], max_tokens=3, extra_body={"ignore_eos": True})
    assert len(ids.choices) == 1 and ids.usage.prompt_tokens == 3
    texts = client.completions.create(
        model="tiny", prompt=["The cat", "A dog sat"], max_tokens=3, n=2, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in texts.choices] == [0, 1, 2, 3] and texts.usage.completion_tokens == 12
    lists = client.completions.create(
        model="tiny", prompt=[[40, 41], [42, 43, 44]], max_tokens=2, echo=True, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in lists.choices] == [0, 1] and lists.usage.prompt_tokens == 5
    # Greedy: a batched prompt answers as it does alone.
    alone = client.completions.create(
        model="tiny", prompt="A dog sat", max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    batched = client.completions.create(
        model="tiny", prompt=["The cat", "A dog sat"], max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert batched.choices[1].text == alone.choices[0].text
    streamed = list(
        client.completions.create(
            model="tiny", prompt=["The cat", "A dog sat"], max_tokens=3, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert sorted(c.choices[0].index for c in streamed if c.choices[0].finish_reason) == [0, 1]
    for prompt, param in (
        ([40, 10**6], "prompt[1]"),
        ([[40], [-1]], "prompt[1][0]"),
        ([40, "x"], "prompt"),
        ([], "prompt"),
    ):
        r = post(server, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (prompt, r.text[:300])


def test_echo_with_logprobs_reports_the_prompts_tokens(client: openai.OpenAI) -> None:
    prompt = "Hello, my name is"
    r = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=1, extra_body={"ignore_eos": True}
    )
    lp = r.choices[0].logprobs
    prompt_tokens = r.usage.prompt_tokens
    assert len(lp.tokens) == prompt_tokens + 3
    assert lp.token_logprobs[0] is None and all(x is not None for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens[:prompt_tokens]) == prompt
    assert lp.text_offset[0] == 0 and lp.text_offset[prompt_tokens] == len(prompt)
    # logprobs: 0 still reports the chosen token's own logprob.
    zero = client.completions.create(
        model="tiny", prompt="Hi", max_tokens=3, logprobs=0, extra_body={"ignore_eos": True}
    )
    tops = zero.choices[0].logprobs.top_logprobs
    assert len(tops) == 3 and all(len(t) == 1 for t in tops), tops
    stream = list(
        client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=3,
            echo=True,
            logprobs=1,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    first = stream[0].choices[0]
    assert first.text == prompt and first.logprobs.token_logprobs[0] is None


# --- /tokenize and /detokenize (vLLM's paths and shapes) ---


def test_tokenize_counts_a_chat_with_an_image_as_the_chat_endpoint_sends_it(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    messages = [user(image_part(image_data_url((448, 448))), "What is this?")]
    r = post(server, "/tokenize", {"model": "tiny", "messages": messages, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"])
    text_only = post(server, "/tokenize", {"messages": [user("What is this?")]}).json()["count"]
    assert body["count"] > text_only + 16  # the image's tokens, expanded by the model's processor
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    assert chat.usage.prompt_tokens == body["count"]
    models = client.models.list().data
    assert body["max_model_len"] == models[0].model_extra["max_model_len"]


def test_tokenize_a_prompt_and_detokenize_it_back(server: ServerProcess, client: openai.OpenAI) -> None:
    prompt = "Hello, my name is"
    r = post(server, "/tokenize", {"prompt": prompt})
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    assert (
        r.json()["count"]
        == len(tokens)
        == client.completions.create(model="tiny", prompt=prompt, max_tokens=1).usage.prompt_tokens
    )
    back = post(server, "/detokenize", {"model": "tiny", "tokens": tokens})
    assert back.status_code == 200, back.text
    assert back.json() == {"prompt": prompt}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, "messages"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "model": "other"}, 404, "model"),
        ("/tokenize", {"prompt": "a", "tools": [{"type": "function"}]}, 400, "tools[0]"),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
            400,
            "messages[0].content[0].type",
        ),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens[0]"),
        ("/detokenize", {"tokens": []}, 400, "tokens"),
        ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
    ],
)
def test_tokenizer_routes_refuse_bad_input_naming_the_field(
    server: ServerProcess, path: str, body: dict, status: int, param: str
) -> None:
    assert_error(post(server, path, body), status, param)
