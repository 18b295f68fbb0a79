"""vllm_compat._die_with_parent on real processes: what ties the shared engine's EngineCore to the
launcher, and its model workers to EngineCore (PR_SET_PDEATHSIG, SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from qwen_server import procs
from qwen_server.engine import vllm_compat

ROOT = Path(__file__).resolve().parents[3]

# The child: arms the tie, says so in a file (with what it set for its own children), then waits.
CHILD = """
import os, sys, time
from qwen_server.engine import vllm_compat
vllm_compat._die_with_parent(9)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(os.environ[vllm_compat._PARENT_ENV])
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""

# The parent: names itself in the environment, as SharedEngine.begin does, and starts the child.
PARENT = """
import os, subprocess, sys, time
from qwen_server.engine import vllm_compat
os.environ[vllm_compat._PARENT_ENV] = str(os.getpid())
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(child.pid, flush=True)
time.sleep(60)
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def _wait_for(path: Path, within: float = 30.0) -> str:
    deadline = time.monotonic() + within
    while not path.exists():
        assert time.monotonic() < deadline, "the child never armed its tie to the parent"
        time.sleep(0.05)
    return path.read_text()


def test_a_child_dies_with_its_parent_killed_outright(tmp_path: Path) -> None:
    armed = tmp_path / "armed"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD, str(armed)], stdout=subprocess.PIPE, text=True, env=_env()
    )
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        # The child names itself for its own children (as EngineCore does for its model workers).
        assert _wait_for(armed) == str(child)
        assert procs.alive(child)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 5.0
        while procs.alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not procs.alive(child), "the child outlived its SIGKILLed parent by 5 s"
    finally:
        parent.kill()
        parent.wait(10)
        if child and procs.alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_child_whose_parent_is_already_gone_exits_at_once(tmp_path: Path) -> None:
    # The parent it was started by (named in the environment) is not its parent any more: re-parented.
    armed = tmp_path / "armed"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(armed)],
        env=_env(**{vllm_compat._PARENT_ENV: "999999999"}),
        timeout=30,
    )
    assert done.returncode == 1
    assert not armed.exists()


def test_without_a_named_parent_the_child_runs_on(tmp_path: Path) -> None:
    # Nothing named (not started by our host): the tie is armed, nothing is judged dead.
    armed = tmp_path / "armed"
    env = _env()
    env.pop(vllm_compat._PARENT_ENV, None)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(armed)], env=env)
    try:
        assert _wait_for(armed) == str(proc.pid)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(10)
