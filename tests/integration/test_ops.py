"""Operations against a real two-worker server: API keys, request IDs, admission, deadlines, body
limit, CORS, metrics across workers, JSON access logs, and drain on SIGTERM (last: it stops the server).

Two workers, so each check also holds when the kernel hands requests to either worker.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import os
import re
import signal
import time
from collections import defaultdict
from pathlib import Path

import httpx
import openai
import pytest

from qwen_server import procs
from qwen_server.engine import cpushare
from qwen_server.testing.servers import free_port
from tests.helpers.media import chat_body, image_data_url
from tests.helpers.serverproc import ServerProcess

KEYS = ("key-one-0123456789", "key-two-abcdefghij")
LIMIT = 3  # admitted inference requests per worker
REQUEST_TIMEOUT = 4.0
# Well below the request timeout: the drain must cut its long streams before their deadline does.
DRAIN_TIMEOUT = 2.0
ORIGIN = "https://app.example.com"
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}


@pytest.fixture(scope="module")
def ops(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("ops")
    key_file = tmp / "keys"
    key_file.write_text(f"# operators' keys\n{KEYS[0]}\n\n{KEYS[1]}\n")
    srv = ServerProcess.launcher(
        free_port(),
        tmp / "server.log",
        "--model",
        str(tiny_model),
        "--served-model-name",
        "tiny",
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--max-num-seqs",
        "4",
        "--workers",
        "2",
        # One engine per worker (what plain `granian --workers 2` runs): per-worker engine gauges and CPU
        # shares are this module's subject. The shared engine's are test_shared_engine.py's.
        "--no-shared-engine",
        "--api-key-file",
        str(key_file),
        "--max-pending-requests",
        str(LIMIT),
        "--request-timeout",
        str(REQUEST_TIMEOUT),
        "--drain-timeout",
        str(DRAIN_TIMEOUT),
        "--max-request-body-bytes",
        "1000000",
        "--cors-allow-origins",
        ORIGIN,
        "--log-format",
        "json",
        "--root-path",
        "/qwen",
    )
    try:
        srv.wait_ready(timeout=400)
        _wait_all_workers_ready(srv)
        yield srv
    finally:
        srv.stop()
        assert srv.leftovers() == []
        assert srv.leaked_shm() == []  # one engine per worker here: each worker's resource tracker


def _wait_all_workers_ready(srv: ServerProcess, timeout: float = 200) -> None:
    """/health answers from either worker: wait until both engines report ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(_series(scrape(srv), "vllm:cache_config_info")) >= 2:
            # Both engines are built; readiness follows within moments.
            while time.monotonic() < deadline:
                if all(httpx.get(srv.url + "/health").status_code == 200 for _ in range(10)):
                    return
                time.sleep(0.5)
        time.sleep(0.5)
    raise AssertionError("both workers' engines did not become ready")


def client(srv: ServerProcess, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def post(srv: ServerProcess, body: dict | bytes, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        srv.url + "/v1/chat/completions",
        content=content,
        timeout=timeout,
        headers={"content-type": "application/json", **AUTH, **(headers or {})},
    )


def scrape(srv: ServerProcess) -> str:
    r = httpx.get(srv.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def _series(text: str, name: str) -> dict[str, float]:
    """{label string: value} of one metric name in the exposition text."""
    found = {}
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            labels, _, value = line[len(name) :].rpartition(" ")
            found[labels] = float(value)
    return found


def total(text: str, name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for lab, v in _series(text, name).items() if all(w in lab for w in want))


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# --- API keys ---


def test_missing_or_wrong_key_is_401_in_the_envelope(ops: ServerProcess) -> None:
    body = json.dumps(chat_body(4)).encode()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEYS[0]}"}):
        r = httpx.post(ops.url + "/v1/chat/completions", content=body, headers=headers, timeout=30)
        assert error_of(r, 401)["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(ops.url + "/v1/models").status_code == 401


def test_every_configured_key_works_with_the_openai_sdk(ops: ServerProcess) -> None:
    def ask(key: str):
        body = chat_body(4)
        return client(ops, key).chat.completions.create(
            model=body["model"], messages=body["messages"], max_tokens=4, extra_body={"ignore_eos": True}
        )

    for key in KEYS:
        assert ask(key).usage.completion_tokens == 4
    with pytest.raises(openai.AuthenticationError):
        ask("wrong")


def test_probes_and_metrics_stay_open(ops: ServerProcess) -> None:
    assert httpx.get(ops.url + "/live").status_code == 200
    assert httpx.get(ops.url + "/health").status_code == 200
    assert httpx.get(ops.url + "/metrics").status_code == 200


def test_root_path_prefix_routes_like_the_bare_path_and_keeps_auth(ops: ServerProcess) -> None:
    # A proxy that forwards /qwen/... unchanged and one that strips the prefix both work.
    for path in ("/qwen/v1/models", "/v1/models"):
        assert httpx.get(ops.url + path, headers=AUTH).json()["data"][0]["id"] == "tiny"
        assert httpx.get(ops.url + path).status_code == 401
    assert httpx.get(ops.url + "/qwen/health").status_code == 200


# --- request IDs ---


def test_request_id_round_trips_and_names_the_response(ops: ServerProcess) -> None:
    r = post(ops, chat_body(4), {"X-Request-Id": "trace-42.a_b"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42.a_b"
    assert r.json()["id"] == "chatcmpl-trace-42.a_b"
    # Generated when absent or unusable; present on errors and on other routes too.
    for headers in ({}, {"X-Request-Id": "has space"}, {"X-Request-Id": "x" * 200}):
        generated = post(ops, chat_body(4), headers).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert "x-request-id" in httpx.post(ops.url + "/v1/chat/completions", content=b"{}").headers
    assert "x-request-id" in httpx.get(ops.url + "/live").headers


def test_same_request_id_twice_at_once_is_fine(ops: ServerProcess) -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: post(ops, chat_body(8), {"X-Request-Id": "dup"}), range(2)))
    assert [r.status_code for r in results] == [200, 200]


# --- limits ---


def test_body_over_the_configured_limit_is_413(ops: ServerProcess) -> None:
    big = json.dumps(chat_body(4, image="data:image/png;base64," + "A" * 1_200_000)).encode()
    assert error_of(post(ops, big), 413)["type"] == "invalid_request_error"


def test_overload_burst_gets_429_at_once_and_rejected_requests_decode_nothing(ops: ServerProcess) -> None:
    before = scrape(ops)
    burst = 16
    image = image_data_url(color=(9, 9, 9))

    def one(i: int) -> httpx.Response:
        return post(ops, chat_body(64, image), {"X-Request-Id": f"burst-{i}"})

    with concurrent.futures.ThreadPoolExecutor(burst) as pool:
        results = list(pool.map(one, range(burst)))
    statuses = [r.status_code for r in results]
    ok, refused = statuses.count(200), statuses.count(429)
    assert ok + refused == burst, statuses
    assert refused > 0 and ok > 0
    for r in results:
        if r.status_code == 429:
            assert error_of(r, 429)["code"] == "overloaded" and r.headers["retry-after"] == "1"
    after = scrape(ops)
    images = total(after, "qwen_server_images_total") - total(before, "qwen_server_images_total")
    assert images == ok  # one image per admitted request, none for the refused ones
    assert (
        total(after, "qwen_server_requests_rejected_total", reason="overloaded")
        - total(before, "qwen_server_requests_rejected_total", reason="overloaded")
        == refused
    )


def _tokens_per_second(ops: ServerProcess, n: int = 1) -> float:
    """Tokens per second of one sequence when `n` are generated together."""
    t0 = time.monotonic()
    assert post(ops, chat_body(200, n=n)).status_code == 200
    return 200 / (time.monotonic() - t0)


def test_request_timeout_aborts_the_engine_request(ops: ServerProcess) -> None:
    # The tiny model is fast: 8 sequences of up to 1900 tokens, enough for twice the timeout.
    n = 8
    rate = _tokens_per_second(ops, n)
    print(f"tiny model here: {rate:.0f} tokens/s per sequence with {n} together")
    max_tokens = int(min(1900, 2 * REQUEST_TIMEOUT * rate))
    if max_tokens / rate < 1.5 * REQUEST_TIMEOUT:
        pytest.skip(f"the tiny model ({rate:.0f} tokens/s) outruns a {REQUEST_TIMEOUT} s timeout within its context")
    t0 = time.monotonic()
    error = error_of(post(ops, chat_body(max_tokens, n=n)), 504)
    assert error["code"] == "timeout" and time.monotonic() - t0 < REQUEST_TIMEOUT + 3
    with httpx.stream(
        "POST", ops.url + "/v1/chat/completions", headers=AUTH, timeout=60, json=chat_body(max_tokens, n=n, stream=True)
    ) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-2][6:])["error"]["code"] == "timeout" and events[-1] == "data: [DONE]"
    assert _engine_idle(ops)


def _engine_idle(ops: ServerProcess, within: float = 10) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        text = scrape(ops)
        if total(text, "vllm:num_requests_running") == 0 and total(text, "vllm:num_requests_waiting") == 0:
            return True
        time.sleep(0.2)
    return False


# --- CORS ---


def test_cors_preflight_and_response_headers(ops: ServerProcess) -> None:
    pre = httpx.options(
        ops.url + "/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert pre.status_code in (200, 204) and pre.headers["access-control-allow-origin"] == ORIGIN
    r = post(ops, chat_body(4), {"Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN
    other = post(ops, chat_body(4), {"Origin": "https://evil.example.com"})
    assert "access-control-allow-origin" not in other.headers


# --- metrics ---


def test_metrics_cover_http_engine_and_images_across_both_workers(ops: ServerProcess) -> None:
    before = scrape(ops)
    n = 6
    for i in range(n):
        # Colours far apart: JPEG's rounding makes near colours the same bytes (a cache hit).
        assert post(ops, chat_body(3, image_data_url(color=(40 * i, 50, 50)))).status_code == 200
    after = scrape(ops)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("qwen_server_http_requests_total", route="/v1/chat/completions", status="200") == n
    assert delta("qwen_server_http_request_duration_seconds_count", route="/v1/chat/completions") == n
    assert delta("vllm:request_success_total") == n
    assert delta("vllm:generation_tokens_total") == 3 * n
    assert delta("vllm:prompt_tokens_total") > 64 * n
    assert delta("vllm:e2e_request_latency_seconds_count") == n
    assert delta("vllm:time_to_first_token_seconds_count") == n
    assert delta("vllm:inter_token_latency_seconds_count") == 2 * n
    assert delta("qwen_server_images_total", result="decoded") == n
    assert delta("qwen_server_image_bytes_total", source="data") > 0
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        pids = {re.search(r'pid="(\d+)"', lab).group(1) for lab in _series(after, gauge)}
        assert len(pids) == 2, (gauge, _series(after, gauge))  # one series per worker


# --- placement ---


def test_each_workers_engine_binds_its_own_cpus_given_two_cores_each(ops: ServerProcess) -> None:
    # vLLM pins a CPU engine's model threads to cores of the process's affinity. With 2 cores or more
    # per worker, each worker claims a share first, so the engines do not pin the same cores; with
    # fewer (this 2-core machine), shares of one core would run 4x slower, so it says so and does not.
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list

    tree = procs.descendants(ops.proc.pid)
    workers = [pid for pid in tree if (i := procs.info(pid)) and re.search(r" worker-\d+$", i.cmdline)]
    assert len(workers) == 2
    pinned = [set().union(*(procs.pinned_cpus(pid) for pid in procs.descendants(w))) for w in workers]
    assert pinned[0] and pinned[1], pinned
    cores = len(cpushare.physical_cores(get_allowed_cpu_list()))
    if cores >= 4:
        assert not pinned[0] & pinned[1], pinned
        for w, cpus in zip(workers, pinned, strict=True):
            assert cpus <= os.sched_getaffinity(w)
        assert {m.group(1) for m in re.finditer(r"CPU share (\d) of 2", ops.log())} == {"1", "2"}
    else:
        assert "CPU share" not in ops.log()
        assert len(re.findall(rf"2 workers on {cores} physical cores: too few for a share", ops.log())) == 2


# --- logs ---


def test_access_log_is_one_json_line_per_request_without_image_data(ops: ServerProcess) -> None:
    image = image_data_url(color=(1, 2, 250))
    assert post(ops, chat_body(5, image), {"X-Request-Id": "log-check-1"}).status_code == 200
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        entries = [json.loads(line) for line in ops.log().splitlines() if line.startswith("{")]
        mine = [e for e in entries if e.get("request_id") == "log-check-1"]
        if mine:
            break
        time.sleep(0.1)
    assert len(mine) == 1, mine
    entry = mine[0]
    assert entry["logger"] == "qwen_server.access" and entry["status"] == 200
    assert entry["images"] == 1 and entry["completion_tokens"] == 5 and entry["prompt_tokens"] > 64
    assert entry["latency_ms"] > 0
    payload = image.split(",", 1)[1]
    assert payload[:40] not in ops.log() and base64.b64decode(payload)[:8].hex() not in ops.log()


# --- drain (stops the server: keep last) ---


def test_early_answers_to_big_bodies_reach_asyncio_clients(ops: ServerProcess) -> None:
    """401, 404 and 413 are answered before the body is read; the rest of a 5 MB body is read and
    dropped, so the connection is not reset under an asyncio client that is still sending (it used
    to see ReadError, 3 of 3 times, and retried blindly)."""
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 5_000_000}], "max_tokens": 1}

    async def run() -> dict[int, int]:
        seen: dict[int, int] = {}
        wrong = openai.AsyncOpenAI(base_url=ops.url + "/v1", api_key="wrong", max_retries=0, timeout=60)
        right = openai.AsyncOpenAI(base_url=ops.url + "/v1", api_key=KEYS[0], max_retries=0, timeout=60)
        try:
            for _ in range(10):
                for sdk, path in (
                    (wrong, "/chat/completions"),
                    (right, "/no-such-route"),
                    (right, "/chat/completions"),
                ):
                    try:
                        await sdk.post(path, cast_to=dict, body=big)
                    except openai.APIStatusError as exc:
                        assert set(exc.response.json()["error"]) == {"message", "type", "param", "code"}
                        seen[exc.status_code] = seen.get(exc.status_code, 0) + 1
        finally:
            await wrong.close()
            await right.close()
        return seen

    assert asyncio.run(run()) == {401: 10, 404: 10, 413: 10}

    # 429 (one worker's admission held full) is in test_reliability.py, whose server has one worker.


def test_sigterm_drains_finishes_short_requests_and_cuts_long_ones_cleanly(ops: ServerProcess) -> None:
    rate = _tokens_per_second(ops)
    long_tokens = int(min(1900, rate * (DRAIN_TIMEOUT + 6)))
    streams: dict[int, list[str]] = defaultdict(list)

    def stream(i: int) -> str:
        with httpx.stream(
            "POST",
            ops.url + "/v1/chat/completions",
            headers=AUTH,
            timeout=60,
            json=chat_body(long_tokens if i % 2 else 8, stream=True),
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    streams[i].append(line[6:])
        return _ending(streams[i])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        # LIMIT streams: even if the kernel hands them all to one worker, none is refused.
        futures = [pool.submit(stream, i) for i in range(LIMIT)]
        # All admitted and streaming, then SIGTERM at once: the drain's cut (DRAIN_TIMEOUT later) must come
        # before the streams' own deadline (REQUEST_TIMEOUT after they started), which once won the race.
        started = time.monotonic()
        while len(streams) < LIMIT and time.monotonic() - started < 1.0:
            time.sleep(0.02)
        t0 = time.monotonic()
        ops.proc.send_signal(signal.SIGTERM)
        health = _wait_health_draining(ops)
        streaming_then = sum(not f.done() for f in futures)
        refused = post(ops, chat_body(4))
        endings = [f.result(timeout=60) for f in futures]
    assert health is not None, "/health did not turn 503 draining"
    # Draining is announced at once, not when the work ends: the long streams were still running.
    assert streaming_then >= LIMIT // 2, f"/health turned draining after {health:.2f} s, {streaming_then} streaming"
    assert error_of(refused, 503)["code"] == "draining"
    # Every stream ended properly: with a finish reason, or with an error event; none cut silently.
    assert all(e in ("finished", "drain_abort") for e in endings), endings
    assert "finished" in endings
    assert ops.proc.wait(60) == 0
    assert time.monotonic() - t0 < DRAIN_TIMEOUT + 30


def _wait_health_draining(ops: ServerProcess, within: float = 5) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        r = httpx.get(ops.url + "/health", timeout=2)
        if r.status_code == 503 and r.json()["status"] == "draining":
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def _ending(events: list[str]) -> str:
    if not events or events[-1] != "[DONE]":
        return "cut"
    last = json.loads(events[-2])
    if "error" in last:
        return last["error"]["code"]
    return "finished" if last["choices"] and last["choices"][0]["finish_reason"] else "no-finish"
