"""Port checks and the launcher's side of the socket hand-off to Granian, with real processes on
loopback (no engine, no Granian serving: the hand-off itself is in tests/integration/test_ports.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from qwen_server.launcher import granian_compat, ports, supervise
from qwen_server.testing.servers import free_port
from tests.helpers.serverproc import ROOT, base_env, port_holder_report, port_is_free, run_launcher

HOLD_LISTENING = "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',{port})); s.listen(); print('up',flush=True); time.sleep(60)"
HOLD_BOUND = (
    "import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1); s.bind(('127.0.0.1',{port})); print('up',flush=True); time.sleep(60)"
)


def hold(code: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code.format(port=port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    return proc


def test_take_port_listens_without_reuseport() -> None:
    port = free_port()
    sock = ports.take_port("127.0.0.1", port)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        assert sock.get_inheritable()
        client = socket.create_connection(("127.0.0.1", port), timeout=2)  # listening already
        accepted, _ = sock.accept()
        # What Granian's workers accept is what streams tokens: Nagle must be off on it.
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        accepted.close()
        client.close()
    finally:
        sock.close()


def test_plain_listener_refused_with_its_pid() -> None:
    port = free_port()
    holder = hold(HOLD_LISTENING, port)
    try:
        # Fast because nothing heavy is imported first: the next test proves that, not a clock.
        done, _ = run_launcher(port)
        assert done.returncode == 1
        assert f"PID {holder.pid} (listening)" in done.stderr
        assert "--replace" not in done.stderr  # not a qwen_server: never offered for replacement
        replaced, _ = run_launcher(port, "--replace")
        assert replaced.returncode == 1 and "held by others" in replaced.stderr
        assert holder.poll() is None  # a foreign process is never signalled
    finally:
        holder.kill()


def test_check_answers_before_litestar_torch_or_vllm_are_imported() -> None:
    """The launcher package is the launcher process: the serving side's heavy imports stay out of it."""
    port = free_port()
    holder = hold(HOLD_LISTENING, port)
    code = textwrap.dedent(
        f"""
        import sys, time
        heavy = ("litestar", "torch", "vllm")
        import qwen_server.launcher.cli as cli
        print(*(name in sys.modules for name in heavy))
        t0 = time.monotonic()
        try:
            cli.main(["--port", "{port}"])
        except SystemExit as exc:
            code = exc.code
        print(code, round(time.monotonic() - t0, 3), *(name in sys.modules for name in heavy))
        """
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=30
        )
        after_import, after_check = out.stdout.splitlines()
        assert after_import.split() == ["False", "False", "False"], (
            "import qwen_server.launcher.cli loaded litestar, torch or vllm"
        )
        exit_code, seconds, *loaded = after_check.split()
        assert exit_code == "1"
        print(f"[ports] busy port refused {seconds} s after the launcher's import")
        assert loaded == ["False", "False", "False"], "the port check loaded litestar, torch or vllm"
    finally:
        holder.kill()


def test_bound_but_not_listening_holder_is_named() -> None:
    port = free_port()
    holder = hold(HOLD_BOUND, port)
    try:
        with pytest.raises(ports.PortInUse) as info:
            ports.take_port("127.0.0.1", port)
        assert f"PID {holder.pid} (bound but NOT listening" in str(info.value)
    finally:
        holder.kill()


def test_time_wait_alone_does_not_block() -> None:
    port = free_port()
    listener = ports.take_port("127.0.0.1", port)
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()  # the server side closes first: TIME_WAIT on the server's port
    time.sleep(0.1)
    client.close()
    listener.close()
    assert ports.find_holders(port).lingering >= 1
    ports.take_port("127.0.0.1", port).close()


def test_granian_has_the_private_names_granian_compat_uses() -> None:
    """Names the private API a Granian upgrade removed, before the hand-off fails on it
    (tests/integration/test_ports.py)."""
    from granian._granian import SocketHolder
    from granian._internal import load_target
    from granian.server.mp import MPServer

    assert granian_compat.granian_version_ok()
    assert callable(SocketHolder.get_fd) and callable(load_target)
    for name in ("_init_shared_socket", "signal_handler_interrupt", "serve"):
        assert callable(getattr(MPServer, name, None)), f"granian.server.mp.MPServer.{name} is gone"


BEFORE_FORK = textwrap.dedent(
    """
    import socket, sys
    from qwen_server.launcher import granian_compat, supervise
    assert "prometheus_client.multiprocess" not in sys.modules

    class NoGranian:  # stands in for Granian: reports what a worker forked now would inherit
        def serve(self, target_loader):
            from prometheus_client import values
            print("imported before fork:", "prometheus_client.multiprocess" in sys.modules)
            print("value store:", values.ValueClass.__name__)  # the workers' metrics go to files
        def worker_pids(self): return []

    granian_compat.server_on_socket = lambda sock, granian_kwargs, on_interrupt: NoGranian()
    sys.exit(supervise.run_granian(socket.socket(), {}))
    """
)


def test_serve_imports_what_its_threads_import_before_granian_forks() -> None:
    # A fork while the reaper thread imports leaves the child a module lock no thread of its own
    # holds: a worker respawned at that moment hung importing the app (seen once in CI). Imported too
    # early, before the metrics directory is set, the workers' metrics never reach /metrics.
    out = subprocess.run(
        [sys.executable, "-c", BEFORE_FORK], cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "imported before fork: True" in out.stdout
    assert "value store: MmapedValue" in out.stdout  # imported after PROMETHEUS_MULTIPROC_DIR was set


ORPHAN = textwrap.dedent(
    """
    import os, socket, sys, time, setproctitle
    port = int(sys.argv[1])
    if os.fork():
        os._exit(0)  # the 'supervisor' dies at once: the child is re-parented, like an orphaned worker
    setproctitle.setproctitle(f"qwen-server 127.0.0.1:{port} worker-1")
    s = socket.socket(); s.bind(("127.0.0.1", port)); s.listen()
    print(os.getpid(), flush=True)
    time.sleep(60)
    """
)


def test_orphaned_worker_is_diagnosed_and_replaced() -> None:
    port = free_port()
    starter = subprocess.Popen([sys.executable, "-c", ORPHAN, str(port)], stdout=subprocess.PIPE, text=True)
    orphan = int(starter.stdout.readline())
    starter.wait(10)
    try:
        done, _ = run_launcher(port, "--print-config")  # --print-config starts nothing, even on a busy port
        assert done.returncode == 0
        with pytest.raises(ports.PortInUse) as info:
            ports.take_port("127.0.0.1", port)
        text = str(info.value)
        assert f"PID {orphan} (listening): qwen-server 127.0.0.1:{port} worker-1" in text
        assert "ORPHANED by a dead supervisor" in text
        assert supervise.tree_root(orphan) == orphan
        supervise.stop_trees([orphan], timeout=5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not port_is_free(port):
            time.sleep(0.1)
        assert port_holder_report(port) is None
    finally:
        if starter.poll() is None:
            starter.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)
