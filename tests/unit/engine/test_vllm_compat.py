"""vllm_compat.limit_processor_threads against real torch and a real one-thread executor (the
renderer's `_mm_executor` is one); the client around it is a stand-in with only that attribute."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest

from qwen_server.engine import vllm_compat

torch = pytest.importorskip("torch")


def _threads_after_an_op() -> int:
    x = torch.ones(256, 256)
    (x * 2).sum()
    return int(torch.get_num_threads())


@pytest.fixture
def client() -> Any:
    executor = ThreadPoolExecutor(max_workers=1)
    yield SimpleNamespace(renderer=SimpleNamespace(_mm_executor=executor))
    executor.shutdown()


@pytest.fixture
def caller_threads() -> Any:
    """The calling thread on 3 torch threads (whatever the machine's default), put back after."""
    kept = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(kept)


def test_only_the_processor_thread_is_limited(client: Any, caller_threads: int) -> None:
    assert vllm_compat.limit_processor_threads(client, 1) == 1
    executor = client.renderer._mm_executor
    assert executor.submit(_threads_after_an_op).result() == 1  # the limit outlives torch's per-thread setup
    assert torch.get_num_threads() == caller_threads  # the caller keeps its own
    seen: list[int] = []
    later = threading.Thread(target=lambda: seen.append(_threads_after_an_op()))
    later.start()
    later.join()
    assert seen == [caller_threads]  # and so does a thread started afterwards


def test_setting_the_thread_without_its_setup_first_would_not_hold(client: Any, caller_threads: int) -> None:
    """Why limit_processor_threads reads the count before it sets it: without that, torch's first-use
    setup of the thread restores the remembered count (the caller's) and the limit is lost."""
    executor = client.renderer._mm_executor
    executor.submit(torch.set_num_threads, 1).result()
    torch.set_num_threads(caller_threads)
    assert executor.submit(_threads_after_an_op).result() == caller_threads
