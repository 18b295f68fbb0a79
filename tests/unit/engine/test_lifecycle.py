"""The engine's lifecycle details (qwen_server/engine/lifecycle.py) that need no engine: the heap
freeze and the engine's nice. On a real server: tests/integration/test_engine.py."""

from __future__ import annotations

import gc
import os
import re
import shutil
import subprocess
import sys

import pytest

from qwen_server.engine.lifecycle import _freeze_heap


def test_freeze_heap_moves_live_objects_out_of_gc() -> None:
    keep = [{"n": i} for i in range(10_000)]
    # Other threads of this process (the image server's poll loop) free objects that may just have
    # been frozen, which lowers the count; a long switch interval keeps them off the GIL until it is read.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(60)
    try:
        frozen = _freeze_heap()
        count = gc.get_freeze_count()
    finally:
        sys.setswitchinterval(interval)
    try:
        assert frozen == count
        assert frozen >= len(keep)
        in_reach = {id(o) for o in gc.get_objects()}  # the collector's generations, without the frozen
        assert not any(id(d) in in_reach for d in keep)
    finally:
        gc.unfreeze()


_UNPRIVILEGED_WORKER = """
import logging, os, subprocess, sys
from qwen_server.engine.lifecycle import _renice_engine
logging.basicConfig(level=logging.INFO, format="%(message)s")
os.nice(5)  # a server started with `nice -n 5`, say
engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # inherits it
try:
    _renice_engine(os.getpriority(os.PRIO_PROCESS, 0) - 3, [engine.pid])  # --engine-nice below the worker's own
    print(os.getpriority(os.PRIO_PROCESS, engine.pid) - os.getpriority(os.PRIO_PROCESS, 0))
finally:
    engine.kill()
"""


def test_engine_nice_that_would_raise_priority_is_skipped_with_a_warning_when_unprivileged() -> None:
    # A real unprivileged process: root drops CAP_SYS_NICE (util-linux's setpriv) so that raising a
    # priority fails with EACCES, as it does for any other user.
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv: cannot drop CAP_SYS_NICE")
        prefix = ["setpriv", "--bounding-set", "-sys_nice"]
    run = subprocess.run(
        [*prefix, sys.executable, "-c", _UNPRIVILEGED_WORKER], check=False, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "0"  # the engine keeps the worker's nice
    assert re.search(r"engine processes left at this worker's nice \d+: \d+ would raise their priority", run.stderr)
