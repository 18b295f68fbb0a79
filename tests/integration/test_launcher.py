"""The launcher with the real engine: refusing a busy port, --replace, restarts, SIGKILL, reload, failures."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from qwen_server import procs
from qwen_server.testing.servers import free_port
from tests.helpers.media import image_data_url
from tests.helpers.serverproc import (
    ROOT,
    ServerProcess,
    base_env,
    port_holder_report,
    port_is_free,
    run_launcher,
    wait_port_free,
)

OPTIONS = ("--max-model-len", "1024", "--enforce-eager", "--max-num-seqs", "4")


def chat_ok(url: str) -> None:
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
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_busy_port_replace_restart_and_sigkill(tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    model = ("--model", str(tiny_model), *OPTIONS)

    started: list[ServerProcess] = []
    try:
        _scenario(port, model, tmp_path, started)
    finally:
        for srv in started:
            srv.stop(signal.SIGKILL)
            srv.leftovers()


def _scenario(port: int, model: tuple[str, ...], tmp_path: Path, started: list[ServerProcess]) -> None:
    # 1. A serves.
    a = ServerProcess.launcher(port, tmp_path / "a.log", *model)
    started.append(a)
    a.wait_ready()
    chat_ok(a.url)

    # 2. A second launcher on the same port fails at once, naming A; so does a raw Granian.
    # Refused before anything heavy is imported (tests/unit/launcher: the port check imports no torch or
    # vLLM); the time is printed, not asserted.
    second, elapsed = run_launcher(port, *model)
    print(f"second launcher on a busy port refused in {elapsed:.2f} s")
    assert second.returncode == 1
    assert f"PID {a.proc.pid} (listening): qwen-server 127.0.0.1:{port}" in second.stderr
    assert "--replace" in second.stderr
    raw = subprocess.run(
        [sys.executable, "-m", "granian", "--interface", "asgi", "--port", str(port), "qwen_server.app:app"],
        cwd=ROOT,
        env=base_env(QWEN_SERVER_MODEL=model[1]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert raw.returncode != 0 and "Address already in use" in raw.stderr + raw.stdout
    chat_ok(a.url)

    # 3. B replaces A: A's whole tree stops gracefully, B takes the port and serves.
    a_tree = a.remember_tree()
    b = ServerProcess.launcher(port, tmp_path / "b.log", *model, "--replace")
    started.append(b)
    assert a.proc.wait(60) == 0, a.log()[-2000:]
    b.wait_ready()
    assert [p for p in a_tree if procs.alive(p)] == []
    assert a.shm and a.leaked_shm() == []
    chat_ok(b.url)

    # 4. SIGKILL of B's supervisor: within 5 s the tree is gone and the port free. (A graceful SIGTERM,
    # exit 0 and nothing left, is the session server's teardown in conftest.py, and test_shared_engine.py's.)
    tree = b.remember_tree()
    assert any("VLLM::EngineCore" in (procs.info(p).cmdline if procs.info(p) else "") for p in tree)
    names = {p: procs.info(p) for p in tree}
    b.proc.kill()
    t0 = time.monotonic()
    left = b.leftovers(within=5.0)
    assert left == [], f"left 5 s after SIGKILL of the supervisor: {[names[p] for p in left]}"
    killed_in = time.monotonic() - t0
    freed_in = killed_in + wait_port_free(port, within=5.0 - killed_in)
    # The resource tracker outlives the killed supervisor just long enough to remove what EngineCore
    # left in /dev/shm (it exits when the last process holding its pipe is gone).
    assert b.shm and b.leaked_shm() == []
    print(f"tree gone {killed_in:.2f} s, port free {freed_in:.2f} s after SIGKILL of the supervisor")


# On demand (-m slow), to keep the default run well inside its time: with the shared engine (the default)
# a worker has no engine of its own to orphan; a SIGKILLed worker's orphaned EngineCore (one engine per
# worker) is test_reliability.py's, and a SIGKILLed worker under the shared engine test_shared_engine.py's.
@pytest.mark.slow
def test_sigkill_of_worker_leaves_no_engine_behind(tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    srv = ServerProcess.launcher(port, tmp_path / "w.log", "--model", str(tiny_model), *OPTIONS)
    try:
        srv.wait_ready()
        tree = srv.remember_tree()
        worker = next(p for p in tree if "worker-1" in (procs.info(p).cmdline if procs.info(p) else ""))
        os.kill(worker, signal.SIGKILL)
        # Granian's supervisor sees a worker it did not stop and exits non-zero; the orphaned
        # EngineCore was re-parented to the launcher (a subreaper), which ends it.
        assert srv.proc.wait(30) != 0
    finally:
        srv.stop(signal.SIGKILL)
    assert srv.leftovers(within=5.0) == []
    assert port_holder_report(port) is None


def test_reload_keeps_the_port_and_serves_again(tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    srv = ServerProcess.launcher(port, tmp_path / "r.log", "--model", str(tiny_model), *OPTIONS, "--reload")
    try:
        srv.wait_ready()
        first_worker = {
            p for p in srv.remember_tree() if "worker-1" in (procs.info(p) or procs.ProcInfo(0, 0, "")).cmdline
        }
        cores = [
            p for p in srv.remember_tree() if "VLLM::EngineCore" in (procs.info(p) or procs.ProcInfo(0, 0, "")).cmdline
        ]
        touched = ROOT / "qwen_server" / "__init__.py"
        os.utime(touched)  # a source change: Granian restarts the workers
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(procs.alive(p) for p in first_worker):
            assert not port_is_free(port)
            time.sleep(0.2)
        assert not any(procs.alive(p) for p in first_worker), srv.log()[-3000:]
        assert not port_is_free(port)  # held across the reload
        srv.wait_ready()
        chat_ok(srv.url)
        # The shared engine (the default) is the launcher's: a reload re-forks the workers only.
        assert [p for p in cores if procs.alive(p)] == cores, "the reload must keep the engine"
    finally:
        assert srv.stop() == 0
    assert srv.leftovers() == []


def test_engine_load_failure_exits_non_zero_and_explains(tmp_path: Path) -> None:
    port = free_port()
    srv = ServerProcess.launcher(port, tmp_path / "f.log", "--model", str(tmp_path / "no-such-model"), *OPTIONS)
    code = srv.proc.wait(180)
    srv.remember_tree()
    log = srv.log()
    assert code != 0
    # Said by the launcher (shared engine, the default) or by the worker (one engine per worker).
    assert "The engine failed to load during 'starting the" in log
    assert "exits now" in log
    assert srv.leftovers() == []
    assert port_holder_report(port) is None


def test_ctrl_c_during_model_load_stops_promptly(tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    srv = ServerProcess.launcher(port, tmp_path / "c.log", "--model", str(tiny_model), *OPTIONS)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            body = httpx.get(srv.url + "/health", timeout=2).json()
            # One engine per worker: the worker starts it; the shared engine: the launcher loads it.
            if body.get("stage", "").startswith(("starting the engine", "waiting for the shared engine")):
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        pytest.fail("never saw the engine-start stage:\n" + srv.log()[-3000:])
    # Before readiness, inference gets 503 with Retry-After, in the OpenAI envelope.
    early = httpx.post(
        srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=10
    )
    assert early.status_code == 503 and early.headers["retry-after"].isdigit()
    assert early.json()["error"]["code"] == "loading"
    # So is the model list: clients wait for it to answer before they send work.
    listed = httpx.get(srv.url + "/v1/models", timeout=10)
    assert listed.status_code == 503 and listed.json()["error"]["code"] == "loading"
    health = httpx.get(srv.url + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["elapsed_seconds"] > 0
    time.sleep(3)  # let vLLM spawn its EngineCore
    srv.remember_tree()
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGINT)
    code = srv.proc.wait(30)
    stopped_in = time.monotonic() - t0
    assert code == 0, srv.log()[-3000:]
    assert srv.leftovers() == []
    assert port_holder_report(port) is None
    print(f"stopped {stopped_in:.2f} s after Ctrl+C during load")


RESTART_CYCLES = int(os.environ.get("QWEN_RESTART_CYCLES", "50"))


@pytest.mark.slow
@pytest.mark.timeout(120 * RESTART_CYCLES)  # the suite's 600 s per test would end the loop at about cycle 10
def test_restart_cycles_on_one_port(tiny_model: Path, tmp_path: Path) -> None:
    """Start, answer one chat, SIGTERM, port free: QWEN_RESTART_CYCLES times (50) on one port."""
    port = free_port()
    ready_s, stop_s = [], []
    for i in range(RESTART_CYCLES):
        t0 = time.monotonic()
        srv = ServerProcess.launcher(port, tmp_path / f"cycle{i}.log", "--model", str(tiny_model), *OPTIONS)
        try:
            srv.wait_ready()
            ready_s.append(time.monotonic() - t0)
            chat_ok(srv.url)
            t1 = time.monotonic()
        finally:
            code = srv.stop()
        stop_s.append(time.monotonic() - t1)
        assert srv.leaked_shm() == []
        print(f"cycle {i}: ready {ready_s[-1]:.1f} s, stopped in {stop_s[-1]:.1f} s, exit {code}")
        assert code == 0, srv.log()[-3000:]
        assert srv.leftovers() == []
        assert port_holder_report(port) is None  # free at once: the next cycle binds it again
    print(
        f"{RESTART_CYCLES} restart cycles: ready in {min(ready_s):.1f}-{max(ready_s):.1f} s, "
        f"stopped in {min(stop_s):.1f}-{max(stop_s):.1f} s, every exit 0, nothing left, port free each time"
    )


def test_demo_serves_with_no_options_then_a_dead_engine_past_the_restart_limit_stops_the_server(
    tiny_model: Path, tmp_path: Path
) -> None:
    """What `./run serve` does (no model, no engine options, no VLLM_* variables), then an
    EngineCore killed under it with no restart allowed (QWEN_SERVER_ENGINE_RESTARTS=0, the limit
    reached at once): the launcher (the shared engine's host, by default) gives up, says why, and
    stops with a failure code. Restarts themselves: test_shared_engine.py (shared engine) and
    test_reliability.py (one engine per worker)."""
    port = free_port()
    env = {k: v for k, v in base_env().items() if not k.startswith("VLLM_")} | {"QWEN_SERVER_ENGINE_RESTARTS": "0"}
    srv = ServerProcess.launcher(port, tmp_path / "d.log", env=env)
    try:
        srv.wait_ready()
        assert "Serving the built-in DEMO model" in srv.log()
        chat_ok(srv.url)
        core = next(
            p for p in srv.remember_tree() if "VLLM::EngineCore" in (procs.info(p) or procs.ProcInfo(0, 0, "")).cmdline
        )
        os.kill(core, signal.SIGKILL)
        t0 = time.monotonic()
        dead = None
        while time.monotonic() - t0 < 5 and srv.proc.poll() is None:
            try:
                r = httpx.get(srv.url + "/health", timeout=1)
                if r.status_code == 503 and r.json()["status"] == "dead":
                    dead = r.json()
                    break
            except httpx.HTTPError:
                break  # the worker is already gone: that is the other acceptable outcome
            time.sleep(0.05)
        # The worker exits so that a supervisor can restart it; without respawn, the launcher exits non-zero.
        assert srv.proc.wait(60) != 0
        # Said by the worker of its own engine, or by the launcher of the shared one (the default).
        assert re.search("the (shared )?engine died", srv.log(), re.IGNORECASE), srv.log()[-3000:]
        assert "the limit (--engine-restarts 0)" in srv.log()
        if dead is not None:
            assert "died" in dead["reason"]
    finally:
        srv.stop(signal.SIGKILL)
    assert srv.leftovers() == []
    assert port_holder_report(port) is None
