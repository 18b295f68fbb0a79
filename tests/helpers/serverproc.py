"""Real servers on loopback for the tests: start, wait for readiness, stop, and check nothing is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import httpx

from qwen_server import procs
from qwen_server.launcher import ports

ROOT = Path(__file__).resolve().parents[2]  # the project root (tests/helpers/serverproc.py)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_SERVER_")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.update(extra)
    return env


class ServerProcess:
    """A launcher (or raw granian) process with its log file."""

    started: ClassVar[list[ServerProcess]] = []  # every one, so conftest can stop what a failed test left running

    def __init__(self, args: list[str], log_path: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - held for the server's lifetime, closed in stop()
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env or base_env(), stdout=self._log, stderr=subprocess.STDOUT)
        self.tree: set[int] = set()
        self.shm: set[str] = set()
        ServerProcess.started.append(self)

    @classmethod
    def launcher(cls, port: int, log_path: Path, *options: str, env: dict[str, str] | None = None) -> ServerProcess:
        args = [sys.executable, str(ROOT / "launcher.py"), "--port", str(port), *options]
        return cls(args, log_path, port, env)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def remember_tree(self) -> set[int]:
        """The server's processes so far; also the shared-memory files they map (`leaked_shm`)."""
        self.tree |= {self.proc.pid, *procs.descendants(self.proc.pid)}
        for pid in self.tree:
            self.shm |= shm_files_of(pid)
        return self.tree

    def leaked_shm(self, within: float = 5.0) -> list[str]:
        """Shared-memory files the server's processes mapped (seen by `remember_tree`) that still
        exist `within` seconds after it stopped: vLLM's 160 MiB ring buffers, its semaphores."""
        deadline = time.monotonic() + within
        while True:
            left = sorted(f for f in self.shm if os.path.exists(f))
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode} before ready:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.remember_tree()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90.0) -> int:
        self.remember_tree()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                procs.terminate(sorted(self.tree), grace=1.0)
                self.proc.wait(10)
                raise AssertionError(f"server did not stop within {timeout} s:\n{self.log()[-4000:]}") from None
        self._log.close()
        return self.proc.returncode

    def leftovers(self, within: float = 5.0) -> list[int]:
        """Processes of this server's tree still alive after `within` seconds."""
        deadline = time.monotonic() + within
        while True:
            alive = [p for p in self.tree if procs.alive(p)]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)


def shm_files_of(pid: int) -> set[str]:
    """The files in /dev/shm that `pid` maps and that still have a name (not yet unlinked)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError:  # gone, or not ours
        return set()
    found = set()
    for line in lines:
        parts = line.split(maxsplit=5)
        path = parts[5] if len(parts) == 6 else ""
        if path.startswith("/dev/shm/") and not path.endswith(" (deleted)"):
            found.add(path.strip())
    return found


def run_launcher(port: int, *args: str, timeout: float = 30) -> tuple[subprocess.CompletedProcess, float]:
    """Run the launcher to completion (for runs that must fail fast); return it and its duration."""
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(ROOT / "launcher.py"), "--port", str(port), *args],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, time.monotonic() - t0


def port_holder_report(port: int) -> str | None:
    """None when a new server could take the port now, else who holds it. Connections no process
    owns (TIME_WAIT and the like) do not count: a server with SO_REUSEADDR starts despite them."""
    try:
        ports.take_port("127.0.0.1", port).close()
        return None
    except ports.PortInUse as exc:
        report = exc.report
        return f"{exc}\n(lingering connections: {report.lingering})\n" + _proc_net_lines(port)


def port_is_free(port: int) -> bool:
    return port_holder_report(port) is None


def _proc_net_lines(port: int) -> str:
    lines = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/net/{table}") as f:
            lines += [line.strip() for line in f if line.split()[1].endswith(f":{port:04X}")]
    return "\n".join(lines)


def wait_port_free(port: int, within: float) -> float:
    """Seconds until a new server could take the port; fails with the holders after `within`."""
    t0 = time.monotonic()
    while (report := port_holder_report(port)) is not None:
        assert time.monotonic() - t0 < within, report
        time.sleep(0.05)
    return time.monotonic() - t0
