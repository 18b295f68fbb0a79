"""Narrow unit tests of the service's SSE framing with a FAKE engine generator (no vLLM engine runs
here); the real engine's streams are tested in test_api.py and test_reliability.py."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from qwen_server.edge import Exchange
from qwen_server.service import Prepared, Service
from qwen_server.settings import Settings


def _prepared() -> Prepared:
    return Prepared(request_id="chatcmpl-x", engine_request_id="x", exchange=Exchange("x"), model="tiny",
                    engine_input=None, sampling=None, prompt_len=3, n=1, stream=True, include_usage=False,
                    logprobs=None, chat=True)


def _output(text: str, finish: str | None = None) -> Any:
    return SimpleNamespace(outputs=[SimpleNamespace(index=0, text=text, token_ids=[1], finish_reason=finish, logprobs=None)])


def _events(service: Service) -> list[str]:
    async def collect() -> list[bytes]:
        return [frame async for frame in service.stream(_prepared())]

    frames = asyncio.run(collect())
    assert all(f.startswith(b"data: ") and f.endswith(b"\n\n") for f in frames)
    return [f[6:-2].decode() for f in frames]


def _fake_service(generate) -> Service:
    service = Service(engine=None, media=None, settings=Settings())  # type: ignore[arg-type]
    service._generate = generate  # type: ignore[method-assign]
    return service


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


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyError("k"), AssertionError()])
def test_an_unexpected_failure_mid_stream_becomes_an_error_event_not_a_silent_cut(failure: Exception,
                                                                                 caplog: pytest.LogCaptureFixture) -> None:
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
        while len(got) < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return got

    got = asyncio.run(run())
    assert len(got) == 2 and b"[DONE]" not in b"".join(got)
