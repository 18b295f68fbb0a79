"""The engine's lifecycle details that the HTTP tests cannot see (engine.py)."""

from __future__ import annotations

import gc
import re

from qwen_server.engine import _freeze_heap
from tests.serverproc import ServerProcess


def test_freeze_heap_moves_live_objects_out_of_gc() -> None:
    keep = [{"n": i} for i in range(10_000)]
    try:
        frozen = _freeze_heap()
        assert frozen == gc.get_freeze_count()
        assert frozen >= len(keep)
    finally:
        gc.unfreeze()


def test_real_worker_froze_its_startup_heap(server: ServerProcess) -> None:
    # torch + transformers + vLLM leave ~700k objects; the worker reports how many it froze.
    found = re.search(r"(\d+) startup objects frozen out of GC", server.log())
    assert found, server.log()[-2000:]
    assert int(found.group(1)) > 100_000
