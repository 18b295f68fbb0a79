"""LoRA adapters on the real engine behind a real server: a start-time adapter (--lora-modules), and
adapters loaded and unloaded at run time from the allowed directory, behind the API key. The
adapters are random rank-4 q_proj/v_proj weights this module writes."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from qwen_server.demo.tiny_lora import write_adapter
from qwen_server.testing.servers import free_port
from tests.helpers.media import image_data_url
from tests.helpers.serverproc import ServerProcess
from tests.integration.conftest import SERVER_OPTIONS

KEY = "sk-lora-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    write_adapter(root / "static", tiny_model, seed=1)
    write_adapter(root / "runtime", tiny_model, seed=2)
    write_adapter(root / "too-big", tiny_model, seed=3, rank=16)  # over --max-lora-rank 8
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]})
    )
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00not a safetensors file" * 10)
    (root / "not-an-adapter").mkdir()
    return root


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, adapters: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess.launcher(
        free_port(),
        tmp_path_factory.mktemp("lora") / "server.log",
        "--model", str(tiny_model), *SERVER_OPTIONS,
        "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
        "--lora-modules", f"static={adapters / 'static'}",
        "--allow-runtime-lora-updating", "--allowed-lora-path", str(adapters),
        "--api-key", KEY,
    )  # fmt: skip
    try:
        srv.wait_ready()  # /health needs no key (without --protect-probes)
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, srv.log()[-3000:]
        assert srv.leftovers() == []


def complete(srv: ServerProcess, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": "Hello there", "max_tokens": 8, "temperature": 0, "ignore_eos": True, **extra}
    return httpx.post(srv.url + "/v1/completions", json=body, headers=AUTH, timeout=120)


def text_of(srv: ServerProcess, model: str) -> str:
    r = complete(srv, model)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return r.json()["choices"][0]["text"]


def post(srv: ServerProcess, path: str, body: dict[str, Any], headers: dict[str, str] = AUTH) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, headers=headers, timeout=120)


def test_an_adapter_changes_the_answer_and_a_concurrent_base_request_does_not_see_it(
    lora_server: ServerProcess,
) -> None:
    base = text_of(lora_server, "tiny")
    adapted = text_of(lora_server, "static")
    assert adapted != base
    assert text_of(lora_server, "static") == adapted  # stable
    results: dict[str, list[str]] = {"tiny": [], "static": []}

    def run(model: str) -> None:
        results[model].append(text_of(lora_server, model))

    threads = [threading.Thread(target=run, args=(m,)) for m in ("tiny", "static") * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == {"tiny": [base] * 4, "static": [adapted] * 4}


def test_chat_with_an_image_runs_on_the_adapter(lora_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key=KEY, max_retries=0)
    image = {"type": "image_url", "image_url": {"url": image_data_url()}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}]
    answers = {}
    for model in ("tiny", "static"):
        answers[model] = client.chat.completions.create(
            model=model, messages=messages, max_tokens=6, temperature=0,  # type: ignore[arg-type]
            extra_body={"ignore_eos": True},
        )  # fmt: skip
    assert answers["static"].model == "static"
    assert answers["static"].usage.prompt_tokens == answers["tiny"].usage.prompt_tokens
    assert answers["static"].choices[0].message.content != answers["tiny"].choices[0].message.content


def test_models_lists_the_adapters_with_their_parent(lora_server: ServerProcess, adapters: Path) -> None:
    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key=KEY, max_retries=0)
    cards = {card.id: card for card in client.models.list()}
    assert {"tiny", "tiny-alias", "static"} <= set(cards)
    assert cards["static"].model_extra["parent"] == "tiny"
    assert cards["static"].model_extra["root"] == str(adapters / "static")
    assert cards["tiny"].model_extra["parent"] is None
    assert client.models.retrieve("static").id == "static"


def test_an_unknown_model_is_a_404_naming_the_adapters(lora_server: ServerProcess) -> None:
    r = complete(lora_server, "nope")
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and "'static'" in error["message"], error


def test_an_adapter_loaded_at_run_time_serves_until_it_is_unloaded(lora_server: ServerProcess) -> None:
    r = post(lora_server, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": "runtime"})
    assert r.status_code == 200 and "added" in r.text, r.text
    late = text_of(lora_server, "late")
    assert late not in (text_of(lora_server, "tiny"), text_of(lora_server, "static"))
    listed = httpx.get(lora_server.url + "/v1/models", headers=AUTH).json()["data"]
    assert "late" in {card["id"] for card in listed}
    again = post(lora_server, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": "runtime"})
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"  # load_inplace not set
    r = post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "late"})
    assert r.status_code == 200 and "removed" in r.text, r.text
    assert complete(lora_server, "late").status_code == 404
    assert post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "late"}).status_code == 404
    # Loaded again, under the same name: the same weights give the same answer.
    assert post(lora_server, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": "runtime"}).status_code == 200
    assert text_of(lora_server, "late") == late
    assert post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "late"}).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"lora_name": "bad", "lora_path": "corrupt"}, 400, "lora_path", "invalid_lora_adapter"),
        ({"lora_name": "bad", "lora_path": "too-big"}, 400, "lora_path", "invalid_lora_adapter"),
        ({"lora_name": "bad", "lora_path": "not-an-adapter"}, 400, "lora_path", "invalid_lora_adapter"),
        ({"lora_name": "bad", "lora_path": "missing"}, 400, "lora_path", None),
        ({"lora_name": "bad", "lora_path": "/etc"}, 400, "lora_path", "forbidden_path"),
        ({"lora_name": "bad", "lora_path": "../../.."}, 400, "lora_path", "forbidden_path"),
        ({"lora_name": "tiny", "lora_path": "runtime"}, 400, "lora_name", None),  # the base model's name
        ({"lora_name": "static", "lora_path": "runtime", "load_inplace": True}, 400, "lora_name", None),
        ({"lora_name": "bad"}, 400, None, None),  # lora_path missing
        ({"lora_name": "bad", "lora_path": "runtime", "lora_int_id": 7}, 400, None, None),  # not honoured: refused
    ],
)
def test_a_bad_load_is_refused_and_the_server_serves_on(
    lora_server: ServerProcess, body: dict[str, Any], status: int, param: str | None, code: str | None
) -> None:
    r = post(lora_server, "/v1/load_lora_adapter", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert complete(lora_server, "bad").status_code == 404  # not listed
    assert complete(lora_server, "static").status_code == 200  # the engine is unharmed


def test_the_adapter_routes_need_the_api_key(lora_server: ServerProcess) -> None:
    body = {"lora_name": "late", "lora_path": "runtime"}
    assert post(lora_server, "/v1/load_lora_adapter", body, headers={}).status_code == 401
    assert post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "static"}, headers={}).status_code == 401
    r = post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "static"})
    assert r.status_code == 400, r.text  # named at start: not unloadable
