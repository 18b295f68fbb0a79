"""--shared-engine (experimental): one launcher with two workers attached to ONE engine on the tiny model.

The tests run in file order on one server: both workers answer, one EngineCore, a SIGKILLed worker is
respawned and re-attaches to the same engine, and SIGTERM leaves nothing behind. Figures are printed
(run with -s), never asserted.
"""

from __future__ import annotations

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

# The experimental --shared-engine mode boots its own engine per module: on demand (-m slow), not in
# the default run, until the mode is on by default.
pytestmark = pytest.mark.slow

OPTIONS = (
    "--shared-engine",
    "--workers",
    "2",
    "--respawn-failed-workers",
    "--max-model-len",
    "1024",
    "--enforce-eager",
    "--max-num-seqs",
    "4",
)
MAX_TRIES = 200  # connections tried before concluding a worker never answers


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("shared") / "server.log"
    t0 = time.monotonic()
    srv = ServerProcess.launcher(free_port(), log, "--model", str(tiny_model), *OPTIONS)
    try:
        srv.wait_ready()
        _wait_workers(srv, 2)
        print(f"\nshared engine: launch -> first /health 200 in {time.monotonic() - t0:.1f} s")
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.stop(signal.SIGKILL)
            procs.terminate(srv.leftovers(), grace=1.0)


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
            return -1, health.json().get("status", "?"), health.status_code
        r = client.post("/v1/chat/completions", json=body)
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] >= 1
        return health.json()["worker_pid"], health.json()["engine_mode"], r.status_code


def _until_answered_by(srv: ServerProcess, wanted: set[int]) -> dict[int, str]:
    """Image chats on new connections until every pid of `wanted` answered one (200)."""
    answered: dict[int, str] = {}
    for _ in range(MAX_TRIES):
        pid, mode, status = _chat_on_one_connection(srv)
        if status == 200:
            answered[pid] = mode
        if wanted <= set(answered):
            return answered
    raise AssertionError(f"not every worker of {wanted} answered in {MAX_TRIES} tries: {answered}")


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


def test_a_killed_worker_is_respawned_and_reattaches_to_the_same_engine(server: ServerProcess) -> None:
    (core,) = _engine_cores(server)
    old = set(_wait_workers(server, 2))
    victim = min(old)
    t0 = time.monotonic()
    procs.signal_quietly(victim, signal.SIGKILL)
    (new,) = _wait_workers(server, 1, exclude=frozenset(old))
    answered = _until_answered_by(server, {new})
    took = time.monotonic() - t0
    assert answered[new].startswith("attached")
    assert _engine_cores(server) == [core], "the engine must survive a worker's death"
    assert "slot re-used: ready message replayed" in server.log()
    print(
        f"\nSIGKILL of worker {victim} -> respawned worker {new} answered an image chat in {took:.2f} s ({answered[new]})"
    )


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
