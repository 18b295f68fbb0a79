"""For every test: the engine's CPU KV cache size, no server left running by a failed test, and the
tiny demo checkpoint. The fixtures of the real servers are in tests/integration/conftest.py, those of
the in-process app in tests/unit/conftest.py."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwen_server import procs
from tests.helpers.serverproc import ServerProcess

# vLLM's CPU backend sizes its KV cache from this (GiB); the tiny model needs little. Set before any
# engine starts, in this process (engine tests) and in the servers the tests launch.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(autouse=True)
def _no_server_outlives_its_test() -> Iterator[None]:
    """A test that fails before it stops its server would leave it running, engine and all, for the
    rest of the session and beyond (seen: a load-time test failing before its SIGINT). Servers started
    by session or module fixtures are set up before this and are left to them."""
    before = len(ServerProcess.started)
    yield
    for srv in ServerProcess.started[before:]:
        if srv.proc.poll() is None:
            srv.stop(signal.SIGKILL)  # a launcher's workers take their engines down with it (watchdog)
            procs.terminate(srv.leftovers(), grace=1.0)  # what a raw Granian left
    del ServerProcess.started[before:]


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny Qwen2.5-VL checkpoint (the demo model), built once and cached."""
    from qwen_server.demo.model import demo_model_path

    return demo_model_path()
