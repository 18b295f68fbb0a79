"""--shared-engine: a launcher killed outright (SIGKILL) leaves no process behind. Its workers stop
themselves (the orphan watchdog), and EngineCore, the launcher's own child, is SIGKILLed by the
kernel (PR_SET_PDEATHSIG, engine/vllm_compat.py), and its model worker with it, the same way."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from qwen_server import procs
from qwen_server.testing.servers import free_port
from tests.helpers.serverproc import ServerProcess, wait_port_free

# On demand (-m slow): each module boots its own engine, and the default run covers a SIGKILLed
# launcher with the shared engine too (test_launcher.py's busy-port scenario, step 5).
pytestmark = pytest.mark.slow


def test_sigkill_of_the_launcher_takes_the_engine_with_it(tiny_model: Path, tmp_path: Path) -> None:
    options = ("--shared-engine", "--workers", "2", "--max-model-len", "1024", "--enforce-eager")
    srv = ServerProcess.launcher(free_port(), tmp_path / "server.log", "--model", str(tiny_model), *options)
    try:
        srv.wait_ready()
        tree = srv.remember_tree()
        names = {p: i.cmdline[:40] for p in tree if (i := procs.info(p))}
        assert any(n.startswith("VLLM::EngineCore") for n in names.values()), names
        t0 = time.monotonic()
        procs.signal_quietly(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(10)
        left = srv.leftovers(within=20)
        assert left == [], {p: names.get(p) for p in left}
        print(
            f"\nlauncher SIGKILL -> all {len(tree)} processes gone in {time.monotonic() - t0:.1f} s: {sorted(names.values())}"
        )
        wait_port_free(srv.port, within=10)
    finally:
        procs.terminate([p for p in srv.tree if procs.alive(p)], grace=1.0)
