"""What `usage` reports and what keys the prefix cache, on the real engine: prompt_tokens_details
(the session server runs with --enable-prompt-tokens-details), stream_options.continuous_usage_stats,
and cache_salt (a tenant's cached prefix is not another's)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.helpers.media import image_data_url
from tests.helpers.serverproc import ServerProcess


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def long_chat(tag: str) -> list[dict[str, Any]]:
    """A prompt of several prefix-cache blocks, distinct per tag (so tests do not share blocks)."""
    return [{"role": "user", "content": f"{tag}: " + " ".join(f"word{i}" for i in range(150))}]


def chat(server: ServerProcess, **body: Any) -> dict[str, Any]:
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_cached_tokens_rise_on_a_repeated_prompt(server: ServerProcess) -> None:
    messages = long_chat("repeat")
    first = chat(server, messages=messages)["usage"]
    second = chat(server, messages=messages)["usage"]
    assert first["prompt_tokens"] == second["prompt_tokens"] > 300
    details = first["prompt_tokens_details"]
    assert details["cached_tokens"] == 0 and details["multimodal_tokens"] is None, details
    # vLLM's count of the prompt tokens this request wrote to the prefix cache: its full blocks (of
    # 128 tokens on the CPU backend).
    assert first["prompt_tokens"] - 128 < details["created_cache_tokens"] <= first["prompt_tokens"], details
    # Those blocks serve the second request, which writes none.
    assert second["prompt_tokens_details"]["cached_tokens"] == details["created_cache_tokens"], second
    assert second["prompt_tokens_details"]["created_cache_tokens"] == 0, second


def test_media_tokens_are_counted_by_modality(client: openai.OpenAI, server: ServerProcess) -> None:
    image = {"type": "image_url", "image_url": {"url": image_data_url(size=(448, 448))}}
    messages = [{"role": "user", "content": [image, image, {"type": "text", "text": "Compare."}]}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)  # type: ignore[arg-type]
    details = r.usage.prompt_tokens_details
    assert details is not None
    rendered = httpx.post(server.url + "/tokenize", json={"messages": messages}, timeout=30).json()["tokens"]
    text = httpx.post(server.url + "/detokenize", json={"tokens": rendered}, timeout=30).json()["prompt"]
    image_tokens = details.model_extra["multimodal_tokens"]["image"]  # vLLM's field, outside OpenAI's type
    assert image_tokens == text.count("<|image_pad|>") > 0, details
    assert r.usage.prompt_tokens > image_tokens


def test_continuous_usage_counts_every_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny", messages=long_chat("stream")[:1], max_tokens=6, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    *deltas, final = chunks
    assert final.choices == [] and final.usage.completion_tokens == 6
    counts = [c.usage.completion_tokens for c in deltas]
    assert all(c.usage is not None and c.usage.prompt_tokens == final.usage.prompt_tokens for c in deltas)
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] == 6, counts


def test_cache_salt_keeps_tenants_prefixes_apart(server: ServerProcess) -> None:
    messages = long_chat("salted")
    chat(server, messages=messages, cache_salt="tenant-a")
    same = chat(server, messages=messages, cache_salt="tenant-a")["usage"]["prompt_tokens_details"]
    other = chat(server, messages=messages, cache_salt="tenant-b")["usage"]["prompt_tokens_details"]
    unsalted = chat(server, messages=messages)["usage"]["prompt_tokens_details"]
    assert same["cached_tokens"] > 0, same
    assert other["cached_tokens"] == 0 and unsalted["cached_tokens"] == 0, (other, unsalted)


def test_completions_report_the_same_details(server: ServerProcess) -> None:
    prompt = "completion: " + " ".join(f"w{i}" for i in range(150))
    bodies = [
        httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=60).json()
        for _ in range(2)
    ]
    assert bodies[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, bodies[1]


@pytest.mark.parametrize("salt", ["", "a/b", "a@b", "x" * 129])
def test_a_bad_cache_salt_is_a_400(server: ServerProcess, salt: str) -> None:
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=json.dumps({"messages": long_chat("x"), "cache_salt": salt}),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt", r.text
