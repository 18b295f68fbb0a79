"""vLLM's `structured_outputs` (choice, regex, json, grammar) on the real engine, through the openai
SDK (its `extra_body`, as users send it) and httpx; bad constraints are 400s naming the field,
streamed or not, and the engine serves the next request."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import openai
import pytest

from tests.helpers.serverproc import ServerProcess


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


ASK = [{"role": "user", "content": "Classify the sentiment."}]


def post(server: ServerProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": "tiny", "max_tokens": 8, **body}, timeout=60)


def error_of(r: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_choice_answers_are_always_one_of_the_choices(client: openai.OpenAI) -> None:
    labels = ["positive", "negative", "neutral"]
    answers = []
    for seed in (1, 2):  # 20 sampled answers, n at most 16 per request
        r = client.chat.completions.create(
            model="tiny", messages=ASK, max_tokens=8, n=10, temperature=1.0, seed=seed,  # type: ignore[arg-type]
            extra_body={"structured_outputs": {"choice": labels}},
        )  # fmt: skip
        answers += [c.message.content for c in r.choices]
    assert len(answers) == 20 and set(answers) <= set(labels), answers
    assert len(set(answers)) > 1, answers  # sampled, not one greedy answer repeated: the constraint did the work


def test_regex_answers_match_streamed_and_not(client: openai.OpenAI) -> None:
    pattern = r"[a-z]{3}-[0-9]{2}"
    whole = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=12, n=4, temperature=1.0, seed=5,  # type: ignore[arg-type]
        extra_body={"structured_outputs": {"regex": pattern}},
    )  # fmt: skip
    for choice in whole.choices:
        assert re.fullmatch(pattern, choice.message.content or ""), choice.message.content
        assert choice.finish_reason == "stop"  # the grammar ended the answer, not max_tokens
    stream = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=12, temperature=1.0, seed=5, stream=True,  # type: ignore[arg-type]
        extra_body={"structured_outputs": {"regex": pattern}},
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert re.fullmatch(pattern, text), text


def test_json_schema_and_grammar_constrain_the_answer(server: ServerProcess) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    body = {"messages": ASK, "max_tokens": 40, "seed": 3, "temperature": 1.0}
    r = post(server, "/v1/chat/completions", {**body, "structured_outputs": {"json": schema}})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    if r.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(content)["ok"], bool), content
    else:  # random weights may spend the budget on whitespace: still a prefix of the grammar
        assert content.lstrip().startswith("{"), content
    grammar = 'root ::= "yes" | "no"'
    r = post(server, "/v1/chat/completions", {**body, "structured_outputs": {"grammar": grammar}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] in ("yes", "no"), r.text


def test_completions_take_structured_outputs_too(server: ServerProcess) -> None:
    r = post(server, "/v1/completions", {"prompt": "Answer:", "structured_outputs": {"choice": ["A", "B"]}, "n": 3})
    assert r.status_code == 200, r.text
    assert {c["text"] for c in r.json()["choices"]} <= {"A", "B"}, r.text


def test_response_format_gives_the_constraint_and_structured_outputs_the_options(server: ServerProcess) -> None:
    """vLLM's merge: response_format's constraint over structured_outputs', whose options stay."""
    body = {"messages": ASK, "max_tokens": 5, "response_format": {"type": "json_object"}}
    r = post(server, "/v1/chat/completions", {**body, "structured_outputs": {"disable_any_whitespace": False}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].lstrip().startswith("{"), r.text
    both = {**body, "structured_outputs": {"choice": ["a"]}}  # two constraints once merged, as in vLLM
    assert error_of(post(server, "/v1/chat/completions", both))["param"] == "response_format"


@pytest.mark.parametrize(
    ("option", "value"),
    [("disable_any_whitespace", True), ("disable_additional_properties", True), ("whitespace_pattern", " ?")],
)
def test_options_the_engine_would_not_apply_are_refused(server: ServerProcess, option: str, value: Any) -> None:
    """vLLM 0.32's grammar backends take these from the engine's config, never from the request
    (and none reads whitespace_pattern): vLLM's server accepts them and does not apply them."""
    structured = {"json_object": True, option: value}
    error = error_of(post(server, "/v1/chat/completions", {"messages": ASK, "structured_outputs": structured}))
    assert error["param"] == f"structured_outputs.{option}" and error["code"] == "unsupported_field", error


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("structured", "contains"),
    [
        ({"regex": "(unclosed"}, "regex"),
        ({"grammar": "root ::= ("}, "grammar"),
        ({"json": {"type": "no-such-type"}}, ""),
        ({"choice": ["a"], "regex": "a"}, "one kind"),  # two constraints
        ({"disable_any_whitespace": False}, "one kind"),  # no constraint
        ({"choice": []}, ""),
        ({"chioce": ["a"]}, "chioce"),  # misspelt: refused, not silently unconstrained
        ({"structural_tag": "{not json"}, ""),
    ],
)
def test_bad_constraints_are_400s_naming_the_field(
    server: ServerProcess, structured: dict[str, Any], contains: str, stream: bool
) -> None:
    r = post(server, "/v1/chat/completions", {"messages": ASK, "structured_outputs": structured, "stream": stream})
    error = error_of(r)
    assert error["param"].startswith("structured_outputs"), error
    assert contains.lower() in error["message"].lower(), error
    # The engine was left with nothing stuck: the next request is answered.
    assert post(server, "/v1/chat/completions", {"messages": ASK, "max_tokens": 2}).status_code == 200


def test_a_constraint_with_a_forced_tool_call_is_refused(server: ServerProcess) -> None:
    """vLLM replaces the request's constraint by the call's grammar without a word; here it is a 400."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for extra, param in (
        ({"structured_outputs": {"choice": ["a", "b"]}}, "structured_outputs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ):
        r = post(server, "/v1/chat/completions", {"messages": ASK, "tools": tools, "tool_choice": "required", **extra})
        assert error_of(r)["param"] == param
    # With tool_choice "auto" the constraint applies to the whole answer, as in vLLM.
    r = post(
        server,
        "/v1/chat/completions",
        {"messages": ASK, "tools": tools, "structured_outputs": {"choice": ["a", "b"]}},
    )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] in ("a", "b"), r.text


def test_structured_outputs_json_is_depth_limited(server: ServerProcess) -> None:
    nested: dict[str, Any] = {"type": "object"}
    for _ in range(80):
        nested = {"type": "object", "properties": {"x": nested}}
    error = error_of(post(server, "/v1/chat/completions", {"messages": ASK, "structured_outputs": {"json": nested}}))
    assert error["param"] == "structured_outputs.json" and error["code"] == "too_deep", error


def test_a_grammar_the_engine_cannot_compile_is_the_clients_error_not_an_empty_200(server: ServerProcess) -> None:
    """vLLM's front-end check passes this regex (a trailing backslash), its engine cannot compile it
    and ends the request with finish_reason "error": vLLM's server answers that as a 200 with empty
    content. Found by fuzzing structured_outputs (400 random constraints, no 500)."""
    body = {"messages": ASK, "structured_outputs": {"regex": 'ab"c\\'}}
    error = error_of(post(server, "/v1/chat/completions", body))
    assert error["param"] == "structured_outputs" and error["code"] == "invalid_grammar", error
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json={"model": "tiny", **body, "stream": True}, timeout=60
    ) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"  # the 200 went out before the engine tried
    last = json.loads(events[-2])
    assert last["error"]["code"] == "invalid_grammar", events
    assert not any('"finish_reason":"error"' in e.replace(" ", "") for e in events), events
    assert post(server, "/v1/chat/completions", {"messages": ASK, "max_tokens": 2}).status_code == 200
