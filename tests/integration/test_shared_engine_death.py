"""--shared-engine: past its restart limit, the engine's death stops the launcher (its host) with a
failure code, instead of leaving workers attached to nothing. (A death within the limit is restarted:
test_shared_engine.py.)"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from qwen_server import procs
from qwen_server.testing.servers import free_port
from tests.helpers.serverproc import ServerProcess, wait_port_free

# On demand (-m slow): each module boots its own engine, and the default run covers the give-up path
# with the shared engine too (test_launcher.py's demo test: an EngineCore killed with --engine-restarts 0).
pytestmark = pytest.mark.slow


def test_a_killed_engine_past_the_restart_limit_stops_the_server_with_a_failure_code(
    tiny_model: Path, tmp_path: Path
) -> None:
    options = (
        "--shared-engine",
        "--workers",
        "2",
        "--max-model-len",
        "1024",
        "--enforce-eager",
        "--engine-restarts",
        "0",
    )
    srv = ServerProcess.launcher(free_port(), tmp_path / "server.log", "--model", str(tiny_model), *options)
    try:
        srv.wait_ready()
        tree = srv.remember_tree()
        cores = [p for p in tree if (i := procs.info(p)) and i.cmdline.startswith("VLLM::EngineCore")]
        assert len(cores) == 1, tree
        t0 = time.monotonic()
        procs.signal_quietly(cores[0], signal.SIGKILL)
        code = srv.proc.wait(120)
        took = time.monotonic() - t0
        log = srv.log_path.read_text(errors="replace")
        assert code != 0, log[-3000:]
        assert "the shared engine died" in log
        assert "the limit (--engine-restarts 0): stopping the server" in log
        assert srv.leftovers(within=10) == [], log[-3000:]
        wait_port_free(srv.port, within=10)
        print(f"\nEngineCore SIGKILL -> launcher exit {code} after {took:.1f} s, no process left")
    finally:
        procs.terminate([p for p in srv.tree if procs.alive(p)], grace=1.0)
