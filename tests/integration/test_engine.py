"""The engine's lifecycle details that the HTTP tests cannot see, on the session's real server: its
worker froze its heap, runs above the engine and off the cores vLLM pinned. In process:
tests/unit/engine/test_lifecycle.py and, for the /proc helpers, tests/unit/test_procs.py."""

from __future__ import annotations

import os
import re

import pytest

from qwen_server import procs
from tests.helpers.serverproc import ServerProcess


def test_real_worker_froze_its_startup_heap(server: ServerProcess) -> None:
    # torch + transformers + vLLM leave ~700k objects; the worker reports how many it froze.
    found = re.search(r"(\d+) startup objects frozen out of GC", server.log())
    assert found, server.log()[-2000:]
    assert int(found.group(1)) > 100_000


def _engine_processes(server: ServerProcess) -> list[int]:
    """vLLM's processes under the launcher (EngineCore, its model workers), whoever started them."""
    return [
        pid for pid in procs.descendants(server.proc.pid) if (i := procs.info(pid)) and i.cmdline.startswith("VLLM::")
    ]


def test_real_engine_core_runs_below_the_front_end(server: ServerProcess) -> None:
    # The session server runs with the default --engine-nice 10 on vLLM's CPU engine: EngineCore (it
    # floats) at 10; the model worker, whose model thread vLLM pinned, and this worker at the run's nice.
    tree = procs.descendants(server.proc.pid)
    worker = next(pid for pid in tree if (i := procs.info(pid)) and i.cmdline.endswith("worker-1"))
    engine = _engine_processes(server)  # the launcher's (shared engine, the default) or the worker's

    def nice_of(title: str) -> set[int]:
        pids = [pid for pid in engine if (i := procs.info(pid)) and i.cmdline.startswith(title)]
        assert pids, title
        return {os.getpriority(os.PRIO_PROCESS, t) for pid in pids for t in procs.threads(pid)}

    mine = os.getpriority(os.PRIO_PROCESS, 0)  # the server inherits the test run's
    assert nice_of("VLLM::EngineCore") == {10}
    pinned = any(len(c) == 1 for pid in engine for c in procs.thread_cpus(pid))
    assert nice_of("VLLM::Worker") == ({mine} if pinned else {10})
    assert {os.getpriority(os.PRIO_PROCESS, t) for t in procs.threads(worker)} == {mine}
    assert re.search(r"engine processes not pinned to cores run at nice 10 \(\d+ threads\)", server.log())


def test_real_worker_stays_off_the_cores_vllm_pinned(server: ServerProcess) -> None:
    tree = procs.descendants(server.proc.pid)
    worker = next(pid for pid in tree if (i := procs.info(pid)) and i.cmdline.endswith("worker-1"))
    pinned = set()
    for pid in _engine_processes(server):
        pinned |= set().union(*(c for c in procs.thread_cpus(pid) if len(c) == 1))
    if not pinned or pinned >= os.sched_getaffinity(0):
        pytest.skip(f"vLLM pinned {sorted(pinned)} of {sorted(os.sched_getaffinity(0))}: no other core to move to")
    worker_cpus = procs.thread_cpus(worker)
    assert worker_cpus, "no threads read"
    assert all(not (cpus & pinned) for cpus in worker_cpus), (pinned, worker_cpus)
    assert "front end kept off the engine's pinned cores" in server.log()
