"""The shared engine (the launcher's default): one launcher with two workers attached to ONE engine on the tiny model.

The tests run in file order on one server: both workers answer, one EngineCore and one set of engine
gauges; a worker SIGKILLed mid-stream has its requests aborted by the engine, is respawned and
re-attaches while the other worker's streams go on; a SIGKILLed EngineCore fails the streams in flight
with engine_dead, the workers say `dead`, and the launcher restarts the engine on its own; SIGTERM
leaves nothing behind. Figures are printed (run with -s), never asserted.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from qwen_server import procs
from qwen_server.testing.servers import free_port
from tests.helpers.media import image_data_url
from tests.helpers.serverproc import ServerProcess, wait_port_free

OPTIONS = (
    "--shared-engine",
    "--workers",
    "2",
    "--respawn-failed-workers",
    "--max-model-len",
    "4096",
    "--enforce-eager",
    "--max-num-seqs",
    "8",
)
# Long enough (thousands of tokens) that a stream is still decoding when its worker or engine is killed.
LONG_STREAM = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000, "ignore_eos": True, "stream": True}
MAX_TRIES = 200  # connections tried before concluding a worker never answers
# A respawned worker answers /health 503 until it has attached to the engine: wait for that by the clock,
# not by a count of tries (a 503 takes milliseconds, so 200 of them can pass before it attaches).
ANSWER_DEADLINE_S = 90


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("shared") / "server.log"
    t0 = time.monotonic()
    srv = ServerProcess.launcher(free_port(), log, "--model", str(tiny_model), *OPTIONS)
    try:
        srv.first_health = _first_health_answer(srv)  # type: ignore[attr-defined]
        srv.wait_ready()
        _wait_workers(srv, 2)
        print(f"\nshared engine: launch -> first /health 200 in {time.monotonic() - t0:.1f} s")
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.stop(signal.SIGKILL)
            procs.terminate(srv.leftovers(), grace=1.0)


def _first_health_answer(srv: ServerProcess) -> tuple[int, dict]:
    """/health's first answer after the launch (the launcher holds the port from the start; Granian's
    workers answer once the launcher has started the engine, before the model is loaded)."""
    for _ in range(600):
        if srv.proc.poll() is not None:
            raise AssertionError(srv.log()[-3000:])
        try:
            r = httpx.get(srv.url + "/health", timeout=2)
            return r.status_code, r.json()
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("/health never answered:\n" + srv.log()[-3000:])


def test_health_says_loading_while_the_launcher_loads_the_engine(server: ServerProcess) -> None:
    code, body = server.first_health  # type: ignore[attr-defined]
    assert code == 503, body
    assert body["status"] == "loading" and body["stage"], body  # the worker's stage: importing, waiting...
    print(f"\nfirst /health during the load: {code} {body}")


def _workers(srv: ServerProcess) -> list[int]:
    return [p for p in procs.children(srv.proc.pid) if (i := procs.info(p)) and " worker-" in i.cmdline]


def _engine_cores(srv: ServerProcess) -> list[int]:
    return [
        p for p in procs.descendants(srv.proc.pid) if (i := procs.info(p)) and i.cmdline.startswith("VLLM::EngineCore")
    ]


def _wait_workers(srv: ServerProcess, n: int, exclude: frozenset[int] = frozenset()) -> list[int]:
    for _ in range(600):
        workers = [p for p in _workers(srv) if p not in exclude]
        if len(workers) >= n:
            return workers
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} workers: {_workers(srv)}\n{srv.log()[-3000:]}")


def _chat_on_one_connection(srv: ServerProcess) -> tuple[int, str, int]:
    """(worker pid, engine mode, status) of an image chat: /health then the chat on ONE keep-alive
    connection, which one worker serves."""
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url()}},
                    {"type": "text", "text": "hi"},
                ],
            }
        ],
        "max_tokens": 3,
    }
    with httpx.Client(base_url=srv.url, limits=httpx.Limits(max_connections=1), timeout=60) as client:
        health = client.get("/health")
        if health.status_code != 200:
            return health.json().get("worker_pid", -1), health.json().get("status", "?"), health.status_code
        r = client.post("/v1/chat/completions", json=body)
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] >= 1
        return health.json()["worker_pid"], health.json()["engine_mode"], r.status_code


def _until_answered_by(srv: ServerProcess, wanted: set[int]) -> dict[int, str]:
    """Image chats on new connections until every pid of `wanted` answered one (200), within
    ANSWER_DEADLINE_S; what answered otherwise (health status, worker) is in the failure."""
    answered: dict[int, str] = {}
    refused: collections.Counter[tuple[int, str, int]] = collections.Counter()
    deadline = time.monotonic() + ANSWER_DEADLINE_S
    while time.monotonic() < deadline:
        pid, mode, status = _chat_on_one_connection(srv)
        if status == 200:
            answered[pid] = mode
        else:
            refused[(pid, mode, status)] += 1
            time.sleep(0.05)
        if wanted <= set(answered):
            return answered
    raise AssertionError(
        f"not every worker of {wanted} answered in {ANSWER_DEADLINE_S} s: {answered}; refused: {refused}"
    )


def test_both_workers_answer_image_chats_from_one_engine(server: ServerProcess) -> None:
    workers = set(_wait_workers(server, 2))
    answered = _until_answered_by(server, workers)
    assert len(answered) == 2
    assert all(mode.startswith("attached") for mode in answered.values()), answered
    assert {answered[p] for p in answered} == {"attached (slot 0)", "attached (slot 1)"}, answered
    assert len(_engine_cores(server)) == 1, procs.descendants(server.proc.pid)
    # The engine is the launcher's child, not a worker's.
    assert procs.info(_engine_cores(server)[0]).ppid == server.proc.pid  # type: ignore[union-attr]
    print(f"\nworkers {sorted(answered)} both attached: {answered}")


def test_metrics_show_the_one_engine_once(server: ServerProcess) -> None:
    _until_answered_by(server, set(_wait_workers(server, 2)))
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    running = [line for line in text.splitlines() if line.startswith("vllm:num_requests_running")]
    assert len(running) == 1, running  # one engine: one series, whichever worker received the engine's stats
    assert "pid=" not in running[0], running
    chats = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("qwen_server_http_requests_total") and "chat/completions" in line and 'status="200"' in line
    )
    assert chats >= 2, "the HTTP counters of both workers add up"
    print(f"\n/metrics: {running[0]}; {chats:.0f} chats counted over both workers")


class _Stream:
    """One long streaming chat on its own connection, pinned to the worker that answered its /health."""

    def __init__(self) -> None:
        self.worker = -1
        self.chunks = 0
        self.outcome = ""  # "length" (finished), an error code from the stream, or the exception's name
        self.first_chunk = asyncio.Event()

    async def run(self, url: str, wanted: set[int] | None = None) -> None:
        async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1), timeout=300) as client:
            self.worker = (await client.get("/health")).json()["worker_pid"]
            if wanted is not None and self.worker not in wanted:
                self.outcome = "not wanted"
                self.first_chunk.set()
                return
            try:
                async with client.stream("POST", "/v1/chat/completions", json=LONG_STREAM) as r:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        try:
                            event = json.loads(line[6:])
                        except json.JSONDecodeError:  # the connection was cut inside a frame (a killed worker)
                            self.outcome = "cut frame"
                            break
                        if "error" in event:
                            self.outcome = event["error"]["code"]
                        elif event["choices"] and event["choices"][0].get("finish_reason"):
                            self.outcome = event["choices"][0]["finish_reason"]
                        self.chunks += 1
                        self.first_chunk.set()
            except httpx.HTTPError as exc:
                self.outcome = type(exc).__name__
            finally:
                self.first_chunk.set()


async def _streams_on(url: str, total: int, workers: set[int]) -> list[tuple[_Stream, asyncio.Task]]:
    """`total` long streams wherever Granian puts their connections, then more until each of `workers`
    runs at least one (a connection that lands on a worker already covered is closed at once)."""
    running: list[tuple[_Stream, asyncio.Task]] = []
    for _ in range(total):
        stream = _Stream()
        running.append((stream, asyncio.create_task(stream.run(url))))
        await stream.first_chunk.wait()
    for _ in range(MAX_TRIES):
        uncovered = workers - {s.worker for s, _ in running if s.outcome != "not wanted"}
        if not uncovered:
            return running
        stream = _Stream()
        task = asyncio.create_task(stream.run(url, uncovered))
        await stream.first_chunk.wait()
        running.append((stream, task))
    raise AssertionError(f"no stream landed on {uncovered} in {MAX_TRIES} connections")


def test_a_worker_killed_mid_stream_has_its_requests_aborted_and_is_respawned(server: ServerProcess) -> None:
    (core,) = _engine_cores(server)
    old = set(_wait_workers(server, 2))

    async def scenario() -> tuple[list[_Stream], list[_Stream], float]:
        nonlocal victim
        placed = await _streams_on(server.url, 6, old)
        streams = [s for s, _ in placed if s.outcome != "not wanted"]
        by_worker = collections.Counter(s.worker for s in streams)
        victim = max(by_worker, key=lambda w: by_worker[w])  # the worker with the most streams
        async with httpx.AsyncClient(timeout=30) as client:
            metrics = (await client.get(f"{server.url}/metrics")).text
        # The engine's scheduler stats reach the workers (vLLM's gauge: one series, the engine's count).
        assert _gauge(metrics, "vllm:num_requests_running") >= 1, metrics[-2000:]
        log_before = len(server.log())
        t0 = time.monotonic()
        procs.signal_quietly(victim, signal.SIGKILL)
        await asyncio.gather(*(t for _, t in placed))
        took = time.monotonic() - t0
        assert _wait_log(server, "aborted its", log_before), server.log()[-3000:]
        return [s for s in streams if s.worker == victim], [s for s in streams if s.worker != victim], took

    victim = -1
    killed, others, took = asyncio.run(scenario())
    aborted = re.findall(r"the client of slot (\d+) is gone; aborted its (\d+) request", server.log())
    assert aborted, server.log()[-3000:]
    # Every stream of the dead worker was still decoding (thousands of tokens to go): the engine aborted
    # all of them, instead of decoding them to max_tokens for nobody.
    assert int(aborted[-1][1]) == len(killed) >= 1, (aborted, [(s.chunks, s.outcome) for s in killed])
    assert others and all(s.outcome == "length" for s in others), [(s.chunks, s.outcome) for s in others]
    (new,) = _wait_workers(server, 1, exclude=frozenset(old))
    answered = _until_answered_by(server, {new})
    assert answered[new].startswith("attached")
    assert _engine_cores(server) == [core], "the engine must survive a worker's death"
    assert "slot re-used: ready message replayed" in server.log()
    print(
        f"\nSIGKILL of worker {victim} mid-stream: its {len(killed)} requests aborted by the engine "
        f"(slot {aborted[-1][0]}); the other worker's {len(others)} streams finished {took:.1f} s later; "
        f"respawned worker {new} answered ({answered[new]})"
    )


def _gauge(metrics: str, name: str) -> float:
    (line,) = [line for line in metrics.splitlines() if line.startswith(name + "{")]
    return float(line.rsplit(" ", 1)[1])


def _wait_log(server: ServerProcess, text: str, since: int, tries: int = 100) -> bool:
    for _ in range(tries):
        if text in server.log()[since:]:
            return True
        time.sleep(0.1)
    return False


def test_a_killed_engine_is_restarted_by_the_launcher(server: ServerProcess) -> None:
    (core,) = _engine_cores(server)
    old_engine_tree = {core, *procs.descendants(core)}
    workers = set(_wait_workers(server, 2))

    async def scenario() -> tuple[list[_Stream], list[int]]:
        placed = await _streams_on(server.url, 2, workers)
        procs.signal_quietly(core, signal.SIGKILL)
        await asyncio.gather(*(t for _, t in placed))
        # Every worker says dead (with the reason) until the new engine is up.
        codes = []
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            for _ in range(20):
                r = await client.get("/health")
                codes.append(r.status_code)
                if r.status_code == 503 and r.json()["status"] == "dead":
                    assert "the shared engine died" in r.json()["reason"], r.json()
                    break
        return [s for s, _ in placed if s.outcome != "not wanted"], codes

    t0 = time.monotonic()
    streams, codes = asyncio.run(scenario())
    assert len({s.worker for s in streams}) == 2
    assert [s.outcome for s in streams] == ["engine_dead"] * len(streams), [(s.chunks, s.outcome) for s in streams]
    assert codes[-1] == 503, codes
    server.wait_ready(timeout=600)
    took = time.monotonic() - t0
    answered = _until_answered_by(server, workers)
    assert set(answered) == workers, "the same workers re-attach: no worker was restarted"
    (new_core,) = _engine_cores(server)
    assert new_core != core
    assert [p for p in old_engine_tree if procs.alive(p)] == []
    assert "shared engine restarted" in server.log()
    print(f"\nEngineCore SIGKILL -> streams got engine_dead; both workers ready again on a new engine in {took:.1f} s")


def test_sigterm_stops_the_whole_tree_and_frees_the_port(server: ServerProcess) -> None:
    tree = server.remember_tree()
    names = {p: i.cmdline[:60] for p in tree if (i := procs.info(p))}
    assert len(_engine_cores(server)) == 1
    t0 = time.monotonic()
    code = server.stop(signal.SIGTERM)
    took = time.monotonic() - t0
    log = server.log_path.read_text(errors="replace")
    assert code == 0, log[-3000:]
    left = server.leftovers(within=10)  # a SIGKILLed model worker may take a moment to go
    assert left == [], ({p: names.get(p) for p in left}, log[-3000:])
    free_after = wait_port_free(server.port, within=10)
    assert "shared engine stopped" in log
    print(
        f"\nSIGTERM -> launcher exit {took:.1f} s ({len(tree)} processes, none left); port free {free_after:.2f} s later"
    )
